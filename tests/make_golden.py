"""Record golden trajectories from torch.optim for fastopt's torch-parity tests.

Why this exists
---------------
fastopt promises torch.optim's update rules and defaults (docs/update_rules.rst),
but torch is an optional dependency. This script runs torch.optim once, on
fixed inputs, and stores what it did in ``tests/data/golden.npz``, so that
``tests/test_torch_parity.py`` can check fastopt against torch on every
machine, torch installed or not. When torch is installed, the same test file
also compares with torch live and checks that this recording still matches.

How to regenerate
-----------------
Needs torch (the recording was made with torch 2.13.0, CPU build)::

    python tests/make_golden.py

Regenerate after changing anything in the case table or the constants below;
``test_golden_file_matches_case_table`` fails until you do. The output is
byte-for-byte deterministic for a given torch build and CPU (fixed seeds, one
thread, fixed zip timestamps, no compression).

What is recorded
----------------
Each entry of :data:`CASES` is one optimizer with one option set. Its inputs
are a parameter of :data:`SIZE` elements (odd on purpose: vectorized loops
leave a tail), or of the shape :data:`SHAPES` gives the case (Adafactor's
factored state needs matrices), and one gradient per step for :data:`STEPS` steps, drawn from
``numpy.random.default_rng(seed)`` with a seed derived from the case id (so a
case's inputs do not depend on its place in the table). The gradient of
step t is that input plus a pull towards zero, ``grads[t] + FEEDBACK * p``
(:func:`gradient`, from the parameter the run has reached): gradients depend
on the trajectory, so a step that goes wrong also changes every later
gradient and the runs drift apart, as in training. Inputs are rounded to
float32 and stored once: the float32 and float64 runs of a case start from
the same numbers, so the float64 run can serve as the exact answer for the
float32 run. Each case is run through torch's default single-tensor path
(``foreach=False``) in float32 and in float64, and the parameter is recorded
after the steps in :data:`CHECKPOINTS`.

``golden.npz`` holds (C cases, K checkpoints):

* ``meta``: a 0-d bytes array holding UTF-8 JSON: format version, torch/numpy versions, SIZE, STEPS,
  CHECKPOINTS, and the case list (id, optimizer, kwargs, seed).
* ``p0``: (C, SIZE) float32, the initial parameters.
* ``grads``: (C, STEPS, SIZE) float32, the input each step's gradient is formed from.
* ``traj_float32``: (C, K, SIZE) float32 and ``traj_float64``: (C, K, SIZE)
  float64, torch's parameter after each checkpoint step.

A case of another shape (at most SIZE elements) is stored flat in its row's
first elements, the rest 0; ``meta["cases"]`` gives its ``"shape"``.

This module imports torch only inside the functions that run it, so the tests
can import the case table without torch.
"""
import io
import json
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

FORMAT = 2
SIZE = 37
#: The gradient's dependence on the parameter: g = input + FEEDBACK * p.
FEEDBACK = 0.5
STEPS = 30
#: Steps after which torch's parameter is recorded (every step would not fit in
#: the size budget; these still show where a divergence starts).
CHECKPOINTS = (1, 2, 3, 5, 10, 15, 20, 30)
DTYPES = ("float32", "float64")
GOLDEN_PATH = Path(__file__).resolve().parent / "data" / "golden.npz"

#: (case id, torch.optim class name, constructor kwargs). JSON-able values
#: only (betas as lists); ``call_kwargs`` turns them into call arguments.
#: Every option of every optimizer appears in at least one case, and each
#: optimizer has a ``defaults`` case ({}) so that default values are compared too.
CASES = (
    ("sgd-defaults", "SGD", {}),
    ("sgd-plain", "SGD", {"lr": 0.05}),
    ("sgd-momentum-dampening-wd", "SGD",
     {"lr": 0.02, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05}),
    ("sgd-nesterov", "SGD", {"lr": 0.02, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01}),
    ("sgd-maximize", "SGD", {"lr": 0.03, "momentum": 0.5, "maximize": True}),

    ("adagrad-defaults", "Adagrad", {}),
    ("adagrad-lr_decay", "Adagrad", {"lr": 0.1, "lr_decay": 0.05}),
    ("adagrad-weight_decay", "Adagrad", {"lr": 0.05, "weight_decay": 0.1}),
    ("adagrad-initial_accumulator_value", "Adagrad",
     {"lr": 0.05, "initial_accumulator_value": 0.5, "eps": 1e-6}),
    ("adagrad-maximize", "Adagrad",
     {"lr": 0.05, "lr_decay": 0.01, "weight_decay": 0.02, "maximize": True}),

    ("rmsprop-defaults", "RMSprop", {}),
    ("rmsprop-plain", "RMSprop", {"lr": 0.01, "alpha": 0.9}),
    ("rmsprop-centered", "RMSprop", {"lr": 0.005, "centered": True}),
    ("rmsprop-momentum", "RMSprop", {"lr": 0.003, "momentum": 0.9}),
    ("rmsprop-centered-momentum-wd", "RMSprop",
     {"lr": 0.002, "alpha": 0.95, "eps": 1e-6, "centered": True, "momentum": 0.7,
      "weight_decay": 0.05}),
    ("rmsprop-maximize", "RMSprop", {"lr": 0.01, "momentum": 0.5, "maximize": True}),

    ("adam-defaults", "Adam", {}),
    ("adam-plain", "Adam", {"lr": 0.01}),
    ("adam-weight_decay", "Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("adam-amsgrad", "Adam", {"lr": 0.02, "amsgrad": True}),
    ("adam-maximize", "Adam", {"lr": 0.01, "weight_decay": 0.05, "maximize": True}),
    ("adam-betas-fast", "Adam", {"lr": 0.05, "betas": [0.5, 0.9], "eps": 1e-6}),
    ("adam-betas-beta1-zero", "Adam", {"lr": 0.01, "betas": [0.0, 0.99]}),
    ("adam-decoupled_weight_decay", "Adam",
     {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),

    ("adamw-defaults", "AdamW", {}),
    ("adamw-plain", "AdamW", {"lr": 0.01}),
    ("adamw-amsgrad-eps", "AdamW",
     {"lr": 0.01, "weight_decay": 0.05, "amsgrad": True, "eps": 1e-3}),
    ("adamw-weight_decay-big", "AdamW", {"lr": 0.01, "weight_decay": 2.0}),
    ("adamw-maximize", "AdamW", {"lr": 0.01, "betas": [0.8, 0.95], "maximize": True}),

    ("nadam-defaults", "NAdam", {}),
    ("nadam-plain", "NAdam", {"lr": 0.01}),
    ("nadam-weight_decay", "NAdam", {"lr": 0.01, "weight_decay": 0.1}),
    ("nadam-decoupled_weight_decay", "NAdam",
     {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("nadam-momentum_decay-maximize", "NAdam",
     {"lr": 0.01, "momentum_decay": 0.01, "betas": [0.8, 0.95], "eps": 1e-6, "maximize": True}),

    ("adamax-defaults", "Adamax", {}),
    ("adamax-plain", "Adamax", {"lr": 0.01}),
    ("adamax-weight_decay", "Adamax", {"lr": 0.01, "weight_decay": 0.1}),
    ("adamax-betas-eps-maximize", "Adamax",
     {"lr": 0.01, "betas": [0.8, 0.95], "eps": 1e-3, "maximize": True}),

    ("radam-defaults", "RAdam", {}),
    ("radam-plain", "RAdam", {"lr": 0.01}),
    ("radam-weight_decay", "RAdam", {"lr": 0.01, "weight_decay": 0.1}),
    ("radam-decoupled-maximize", "RAdam",
     {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}),
    ("radam-betas-eps", "RAdam", {"lr": 0.02, "betas": [0.8, 0.9], "eps": 1e-4}),

    ("adadelta-defaults", "Adadelta", {}),
    ("adadelta-rho-eps", "Adadelta", {"lr": 0.5, "rho": 0.8, "eps": 1e-4}),
    ("adadelta-weight_decay-maximize", "Adadelta",
     {"lr": 2.0, "weight_decay": 0.1, "maximize": True}),

    ("rprop-defaults", "Rprop", {}),
    ("rprop-etas", "Rprop", {"lr": 0.05, "etas": [0.3, 1.5]}),
    ("rprop-step_sizes-maximize", "Rprop",
     {"lr": 0.02, "step_sizes": [1e-3, 0.1], "maximize": True}),

    ("asgd-defaults", "ASGD", {}),
    ("asgd-averaging", "ASGD", {"lr": 0.05, "lambd": 0.01, "alpha": 0.5, "t0": 5}),
    ("asgd-weight_decay-maximize", "ASGD",
     {"lr": 0.02, "weight_decay": 0.1, "maximize": True, "t0": 0}),

    ("adafactor-defaults", "Adafactor", {}),
    ("adafactor-vector", "Adafactor", {"lr": 0.05}),
    ("adafactor-weight_decay-maximize", "Adafactor",
     {"lr": 0.05, "weight_decay": 0.1, "maximize": True}),
    ("adafactor-eps-d-beta2_decay", "Adafactor",
     {"lr": 0.02, "beta2_decay": -0.5, "eps": [1e-3, 1e-2], "d": 2.0}),
    ("adafactor-stack", "Adafactor", {"lr": 0.05, "eps": [None, 0.0]}),
)

#: case id -> the parameter's shape, where it is not (SIZE,): Adafactor
#: factors the second moment of a matrix (the last two dimensions)
SHAPES = {
    "adafactor-defaults": (5, 7),
    "adafactor-weight_decay-maximize": (7, 5),
    "adafactor-eps-d-beta2_decay": (1, 36),
    "adafactor-stack": (3, 2, 6),
}


def case_seed(case_id):
    """The input seed of a case: a stable function of its id (CRC-32)."""
    return zlib.crc32(case_id.encode("utf-8"))


def case_table(cases=CASES):
    """The case list as stored in ``meta["cases"]``."""
    return [{"id": cid, "optimizer": opt, "kwargs": kwargs, "seed": case_seed(cid),
             **({"shape": list(SHAPES[cid])} if cid in SHAPES else {})}
            for cid, opt, kwargs in cases]


def case_shape(case):
    """The parameter shape of a case of ``meta["cases"]`` (a dict)."""
    return tuple(case.get("shape", (SIZE,)))


def case_inputs(case, steps=STEPS):
    """``make_inputs`` of a case (a dict of ``meta["cases"]``), in the case's shape."""
    shape = case_shape(case)
    p0, grads = make_inputs(case["seed"], steps, int(np.prod(shape)))
    return p0.reshape(shape), grads.reshape((steps,) + shape)


def stored(a, leading):
    """``a`` as a golden row: its ``leading`` dimensions, then SIZE elements (0-padded)."""
    flat = np.asarray(a).reshape(a.shape[:leading] + (-1,))
    return np.pad(flat, [(0, 0)] * leading + [(0, SIZE - flat.shape[-1])])


def unstored(row, leading, case):
    """A golden row back in the case's shape (``stored``'s inverse)."""
    shape = case_shape(case)
    return row[..., :int(np.prod(shape))].reshape(row.shape[:leading] + shape)


def meta_header(cases=CASES):
    """The parts of ``meta`` that describe the recording layout (no versions)."""
    return {"format": FORMAT, "size": SIZE, "steps": STEPS, "feedback": FEEDBACK,
            "checkpoints": list(CHECKPOINTS), "cases": case_table(cases)}


def call_kwargs(kwargs):
    """Constructor kwargs from a JSON-able table entry (betas, eps list -> tuple)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def make_inputs(seed, steps=STEPS, size=SIZE):
    """Initial parameter and gradients for one case, float32-exact.

    Returns ``(p0, grads)``: float32 arrays of shape (size,) and (steps, size).
    Gradients are a per-element drift plus noise, with per-element scales
    spread over three decades (so eps and the square roots see small and large
    values), element 0 never receiving a gradient (0 / (0 + eps) paths),
    sporadic exact zeros, and a spike halfway (AMSGrad's max then matters).
    """
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(size)
    scale = 10.0 ** rng.uniform(-2.0, 1.0, size)
    drift = rng.standard_normal(size)
    grads = scale * (drift + rng.standard_normal((steps, size)))
    grads[rng.random((steps, size)) < 0.05] = 0.0
    grads[:, 0] = 0.0
    grads[steps // 2, size - 1] *= 100.0
    return p0.astype(np.float32), grads.astype(np.float32)


def gradient(noise, p):
    """Step t's gradient from its input and the parameter ``p`` reached (NumPy, p's dtype).

    Both the recording and fastopt's replays form it with this one line, so
    equal parameters give bit-equal gradients.
    """
    return np.asarray(noise, dtype=p.dtype) + FEEDBACK * p


def run_torch(optimizer, kwargs, p0, grads, dtype, record_steps):
    """Run ``torch.optim.<optimizer>`` (single-tensor path) on one parameter.

    ``p0`` and ``grads`` are NumPy arrays; they are converted to ``dtype``
    (a NumPy dtype name). Returns the parameter after each step in
    ``record_steps``, stacked: shape (len(record_steps), *p0.shape).
    """
    import torch

    torch.set_num_threads(1)
    tdtype = getattr(torch, dtype)
    p = torch.tensor(np.asarray(p0, dtype=dtype), dtype=tdtype, requires_grad=True)
    opt = getattr(torch.optim, optimizer)([p], foreach=False, **call_kwargs(kwargs))
    record = set(record_steps)
    out = []
    for t, g in enumerate(grads, start=1):
        p.grad = torch.from_numpy(gradient(g, p.detach().numpy()))
        opt.step()
        if t in record:
            out.append(p.detach().numpy().copy())
    return np.stack(out)


def record():
    """Run every case through torch; return the arrays of ``golden.npz``."""
    import torch

    return record_cases(meta_header(), run_torch, {"torch_version": torch.__version__})


def record_cases(header, run, versions):
    """The arrays of a golden file: every case of ``header["cases"]`` through ``run``.

    ``run(optimizer, kwargs, p0, grads, dtype, record_steps)`` is
    :func:`run_torch` or a twin of it for another reference library;
    ``versions`` go into ``meta`` beside the header.
    """
    p0s, gradss = [], []
    trajs = {dtype: [] for dtype in DTYPES}
    for case in header["cases"]:
        p0, grads = case_inputs(case)
        p0s.append(stored(p0[None], 1)[0])
        gradss.append(stored(grads, 1))
        for dtype in DTYPES:
            trajs[dtype].append(stored(run(case["optimizer"], case["kwargs"], p0, grads, dtype,
                                           CHECKPOINTS), 1))
    meta = {**header, **versions, "numpy_version": np.__version__}
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True).encode("utf-8")),
              "p0": np.stack(p0s), "grads": np.stack(gradss)}
    for dtype in DTYPES:
        arrays[f"traj_{dtype}"] = np.stack(trajs[dtype]).astype(dtype, copy=False)
    return arrays


def write_npz(path, arrays):
    """Write an .npz that np.load reads, with fixed zip timestamps.

    np.savez stamps each member with the current time, so its output changes on
    every run; this writes the same bytes for the same arrays.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name], order="C"),
                                      allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else GOLDEN_PATH
    arrays = record()
    write_npz(path, arrays)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(CASES)} cases x "
          f"{len(DTYPES)} dtypes, {STEPS} steps)")


if __name__ == "__main__":
    main()
