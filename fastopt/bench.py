"""Side-by-side timing of fastopt against its NumPy reference (and torch).

Every implementation runs the same steps on the same data in one process,
interleaved, and its result is checked against fastopt's before any figure is
reported: a benchmark that does not check its kernel is not a benchmark.
"""
import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

import fastopt

OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "adagrad": "Adagrad",
              "rmsprop": "RMSprop"}


def _step_budget(n):
    """How many timed steps a size gets: enough for a stable median, a few seconds at most."""
    return int(min(200, max(5, 2e7 // max(n, 1))))


def _torch_runner(name, params, dtype):
    """A torch.optim fused (or default, where torch has no fused kernel) stepper, or None."""
    try:
        import torch
    except ImportError:
        return None, None
    tensors = [torch.from_numpy(p) for p in params]  # shares memory with p
    cls = getattr(torch.optim, OPTIMIZERS[name])
    try:
        opt = cls(tensors, fused=True)
        label = "torch fused"
    except (TypeError, RuntimeError, ValueError):
        opt = cls(tensors)
        label = "torch"

    def step(grads):
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g)
        opt.step()

    return step, label


def measure(name="adam", n=1000, dtype=np.float32, steps=None, with_torch=True, seed=0):
    """Median seconds per ``opt.step`` for each implementation at size ``n``.

    Returns a dict implementation -> median seconds, plus ``"max_rel_dev"``:
    the largest deviation of another implementation's parameters from
    fastopt's after the same steps, relative to fastopt's total change.
    Raises AssertionError if the NumPy reference and fastopt do not agree
    bit for bit (they compute the same operations in the same order).
    """
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n).astype(dtype)
    # A shared offset makes the parameters drift, so the total change that
    # deviations are measured against grows with the steps.
    grads = [(rng.standard_normal(n) + 0.5).astype(dtype) for _ in range(2)]
    steps = steps or _step_budget(n)
    cls = getattr(fastopt, OPTIMIZERS[name])
    runners = {}
    arrays = {}
    for label, backend in (("fastopt", "cython"), ("numpy reference", "numpy")):
        arrays[label] = p0.copy()
        opt = cls([arrays[label]], backend=backend)
        runners[label] = (lambda o: lambda gs: o.step(gs))(opt)
    if with_torch:
        arrays["torch"] = p0.copy()
        step, label = _torch_runner(name, [arrays["torch"]], dtype)
        if step is not None:
            arrays[label] = arrays.pop("torch")
            runners[label] = step
        else:
            del arrays["torch"]
    times = {label: [] for label in runners}
    for i in range(steps + 1):
        g = [grads[i % 2]]
        for label, run in runners.items():
            t0 = time.perf_counter()
            run(g)
            elapsed = time.perf_counter() - t0
            if i:  # the first step allocates state: not timed
                times[label].append(elapsed)
    ref = arrays["fastopt"]
    if not np.array_equal(ref, arrays["numpy reference"], equal_nan=True):
        raise AssertionError(f"{name} n={n}: fastopt and the NumPy reference disagree")
    change = float(np.max(np.abs(ref - p0))) if n else 0.0
    devs = {label: float(np.max(np.abs(a - ref))) / change if n and change else 0.0
            for label, a in arrays.items() if label != "fastopt"}
    result = {label: statistics.median(ts) for label, ts in times.items()}
    result["max_rel_dev"] = max(devs.values(), default=0.0)
    return result


def _fmt_time(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    return f"{seconds * 1e3:.2f} ms"


def run(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastopt bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--sizes", default="1e3,1e5,1e7",
                        help="comma-separated element counts (default: 1e3,1e5,1e7)")
    parser.add_argument("--quick", action="store_true", help="fewer steps per size")
    parser.add_argument("--no-torch", action="store_true", help="skip torch even if installed")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    dtype = np.dtype(args.dtype)

    print(f"fastopt {fastopt.__version__} | {OPTIMIZERS[args.optimizer]} {dtype} | "
          f"{platform.processor() or platform.machine()} | numpy {np.__version__}")
    rows = []
    for n in sizes:
        print(f"measuring n={n:,} ...", file=sys.stderr, flush=True)
        steps = max(3, _step_budget(n) // 4) if args.quick else None
        r = measure(args.optimizer, n, dtype.type, steps=steps, with_torch=not args.no_torch)
        rows.append({"n": n, **r})

    impls = [k for k in rows[0] if k not in ("n", "max_rel_dev")]
    others = [k for k in impls if k != "fastopt"]
    header = ["n", "fastopt step", "ns/element"] + [f"{k} step" for k in others] + \
             [f"speedup vs {k}" for k in others]
    table = []
    for r in rows:
        fast = r["fastopt"]
        table.append([f"{r['n']:,}", _fmt_time(fast), f"{fast / max(r['n'], 1) * 1e9:.3f}"]
                     + [_fmt_time(r[k]) for k in others]
                     + [f"{r[k] / fast:.1f}x" for k in others])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    print(" | ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in table:
        print(" | ".join(c.rjust(w) for c, w in zip(row, widths)))
    print("(median of interleaved steps; every implementation's result checked against fastopt's;"
          f" largest deviation {max(r['max_rel_dev'] for r in rows):.2g} of the total change)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"optimizer": args.optimizer, "dtype": str(dtype), "rows": rows}, f, indent=2)
    return 0
