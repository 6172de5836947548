"""pytest-benchmark suite: one optimizer step, per rule x dtype x size x implementation.

Run with ``pytest bench/`` (add ``--benchmark-json=out.json`` to keep the
numbers, ``-k "adam and f32"`` to narrow). Benchmarks of one rule, dtype and
size share a group, so each table compares implementations side by side.
Each benchmark first checks its implementation's result against fastopt's
NumPy reference (fastopt bit for bit, others to 1e-4 of the total change).

Implementations: fastopt (separate arrays), fastopt-flat (one FlatParams
buffer; many-array cases), numpy-reference, torch-fused, torch-foreach,
torch-forloop (torch's single-tensor path), and deepspeed-cpuadam when
DeepSpeed is importable (Adam only). The size 1000x1000 is one matrix, for
the rules whose state is factored over its rows and columns (Adafactor).
"""
import sys
from pathlib import Path

import numpy as np
import pytest

import fastopt
from fastopt.bench import MANY_LARGE, MANY_SMALL, MATRIX, model_shapes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import spec  # noqa: E402  (tests/spec.py: the rules, as every class is typically used)

SIZES = ["1e3", "1e5", "1e6", MANY_SMALL, MANY_LARGE, MATRIX]
DTYPES = {"f32": np.float32, "f64": np.float64}


def _fastopt(cls, kwargs, arrays, backend="cython"):
    opt = cls(arrays, backend=backend, **kwargs)
    return lambda grads: opt.step(grads), arrays


def _flat(cls, kwargs, arrays):
    if len(arrays) == 1:
        pytest.skip("one array is already flat")
    if spec.rule(cls).whole_arrays:
        pytest.skip(f"{cls.__name__} reads each array whole: a flat buffer is another problem")
    flat = fastopt.FlatParams({str(i): a for i, a in enumerate(arrays)})
    opt = cls([flat.data], **kwargs)

    def step(grads):
        # Backward passes write straight into flat.grads; copying is setup.
        if step.loaded is not grads:
            for view, g in zip(flat.grads.values(), grads):
                view[...] = g
            step.loaded = grads
        opt.step([flat.grad])
    step.loaded = None
    return step, list(flat.params.values())


def _torch(cls, kwargs, arrays, flavour, on=True):
    torch = pytest.importorskip("torch")
    if not spec.find_class(cls).torch:
        pytest.skip(f"torch.optim has no {cls.__name__} (bench/optax_compare.py times it "
                    "against optax)")
    tensors = [torch.from_numpy(a) for a in arrays]
    try:
        opt = getattr(torch.optim, spec.find_class(cls).torch)(tensors, **{flavour: on}, **kwargs)
    except (TypeError, RuntimeError, ValueError) as e:
        pytest.skip(f"torch {cls.__name__} has no {flavour} path: {e}")
    wrapped = {}

    def step(grads):
        if id(grads) not in wrapped:
            wrapped[id(grads)] = [torch.from_numpy(g) for g in grads]
        for t, g in zip(tensors, wrapped[id(grads)]):
            t.grad = g
        opt.step()
    return step, arrays


def _deepspeed(cls, kwargs, arrays):
    if cls not in (fastopt.Adam, fastopt.AdamW):
        pytest.skip("DeepSpeed's CPUAdam is Adam only")
    torch = pytest.importorskip("torch")
    adam = pytest.importorskip("deepspeed.ops.adam")
    tensors = [torch.from_numpy(a) for a in arrays]
    opt = adam.DeepSpeedCPUAdam(tensors, adamw_mode=cls is fastopt.AdamW, **kwargs)

    def step(grads):
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g)
        opt.step()
    return step, arrays


IMPLEMENTATIONS = {
    "fastopt": _fastopt,
    "fastopt-flat": _flat,
    "numpy-reference": lambda cls, kw, a: _fastopt(cls, kw, a, backend="numpy"),
    "torch-fused": lambda cls, kw, a: _torch(cls, kw, a, "fused"),
    "torch-foreach": lambda cls, kw, a: _torch(cls, kw, a, "foreach"),
    "torch-forloop": lambda cls, kw, a: _torch(cls, kw, a, "foreach", on=False),
    "deepspeed-cpuadam": _deepspeed,
}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", spec.typical_cases(), ids=spec.case_id)
def test_step(benchmark, case, dtype, size, impl):
    rule, cls, kwargs = case
    shapes = model_shapes(size)
    if len(shapes[0]) > 1 and not spec.rule(cls).shaped:
        pytest.skip(f"{cls.__name__} steps a matrix as its elements: the 1e6 case")
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(n).astype(DTYPES[dtype]) for n in shapes]
    grads = [(rng.standard_normal(n) + 0.5).astype(DTYPES[dtype]) for n in shapes]

    # Check the implementation once: three steps against the reference.
    step, params = IMPLEMENTATIONS[impl](cls, kwargs, [p.copy() for p in p0])
    expected = [p.copy() for p in p0]
    reference, _ = _fastopt(cls, kwargs, expected, backend="numpy")
    for _ in range(3):
        step(grads)
        reference(grads)
    got = np.concatenate([p.ravel() for p in params])
    want = np.concatenate([p.ravel() for p in expected])
    if impl.startswith(("fastopt", "numpy")):
        np.testing.assert_array_equal(got, want)
    else:  # same formulas, other rounding order: 1e-4 of the change + a few ulps of p
        scale = np.max(np.abs(want - np.concatenate([p.ravel() for p in p0])))
        ulps = 4 * np.finfo(want.dtype).eps * np.max(np.abs(want))
        assert np.max(np.abs(got - want)) <= 1e-4 * scale + ulps

    benchmark.group = f"{rule} {dtype} {size}"
    benchmark(step, grads)
