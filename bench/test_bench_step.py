"""pytest-benchmark suite: one optimizer step, per rule x dtype x size x implementation.

Run with ``pytest bench/`` (add ``--benchmark-json=out.json`` to keep the
numbers). Benchmarks of one rule, dtype and size share a group, so the table
compares implementations side by side. Each benchmark first checks its
implementation's result against fastopt's NumPy reference.
"""
import numpy as np
import pytest

import fastopt

RULES = {
    "sgd": (fastopt.SGD, {"lr": 0.01}),
    "sgd-momentum": (fastopt.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adagrad": (fastopt.Adagrad, {}),
    "rmsprop": (fastopt.RMSprop, {}),
    "adam": (fastopt.Adam, {}),
    "adamw": (fastopt.AdamW, {}),
}
SIZES = [1_000, 100_000, 1_000_000]
DTYPES = {"f32": np.float32, "f64": np.float64}


def _fastopt_stepper(cls, kwargs, p, backend):
    opt = cls([p], backend=backend, **kwargs)
    return lambda g: opt.step([g])


def _torch_stepper(cls, kwargs, p):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(p)
    torch_cls = getattr(torch.optim, cls.__name__)
    try:
        opt = torch_cls([t], fused=True, **kwargs)
    except (TypeError, RuntimeError, ValueError):
        opt = torch_cls([t], **kwargs)

    def step(g):
        t.grad = torch.from_numpy(g)
        opt.step()
    return step


IMPLEMENTATIONS = {
    "fastopt": lambda cls, kw, p: _fastopt_stepper(cls, kw, p, "cython"),
    "numpy-reference": lambda cls, kw, p: _fastopt_stepper(cls, kw, p, "numpy"),
    "torch": _torch_stepper,
}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rule", list(RULES))
def test_step(benchmark, rule, dtype, n, impl):
    cls, kwargs = RULES[rule]
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(DTYPES[dtype])
    g = (rng.standard_normal(n) + 0.5).astype(DTYPES[dtype])

    # Check the implementation once: three steps against the reference.
    p, expected = p0.copy(), p0.copy()
    step = IMPLEMENTATIONS[impl](cls, kwargs, p)
    ref = _fastopt_stepper(cls, kwargs, expected, "numpy")
    for _ in range(3):
        step(g)
        ref(g)
    if impl == "torch":  # same formulas, other rounding order
        scale = np.max(np.abs(expected - p0))
        assert np.max(np.abs(p - expected)) <= 1e-4 * scale
    else:
        np.testing.assert_array_equal(p, expected)

    benchmark.group = f"{rule} {dtype} n={n:,}"
    benchmark(step, g)
