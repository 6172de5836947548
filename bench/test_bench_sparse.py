"""pytest-benchmark suite: sparse-row steps on an embedding table, side by side.

``pytest bench/test_bench_sparse.py`` (``--benchmark-json=out.json`` keeps the
numbers). One group per rule: torch.optim (when torch is installed),
fastopt.torch and fastopt's NumPy API, each stepping a 1e5 x 64 float32 table
(bench/sparse_rows.py runs the full 1e6-row case) with 8192 Zipf(1.2)
indices. Each benchmark first checks its implementation's step against
fastopt's NumPy twin (fastopt bit for bit, torch to a few ulps).
"""
import sys
from pathlib import Path

import numpy as np
import pytest

import fastopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_rows import make_grads  # noqa: E402

ROWS, DIM, COUNT = 100_000, 64, 8192
RULES = {"SparseAdam": {"lr": 1e-3}, "Adagrad": {"lr": 1e-2}, "SGD": {"lr": 1e-2},
         "RowWiseAdagrad": {"lr": 1e-2}}
IMPLS = ["torch", "fastopt.torch", "fastopt"]


def _start():
    return np.random.default_rng(1).standard_normal((ROWS, DIM)).astype(np.float32)


def _stepper(impl, name, kwargs, table):
    """A function taking one (indices, values) step of ``impl`` on ``table`` (its memory)."""
    if impl == "fastopt":
        opt = getattr(fastopt, name)([table], **kwargs)
        return lambda idx, values: opt.step([fastopt.SparseRows(idx, values)])
    torch = pytest.importorskip("torch")
    if impl == "torch" and not hasattr(torch.optim, name):
        pytest.skip(f"torch.optim has no {name}")
    module = torch.optim if impl == "torch" else pytest.importorskip("fastopt.torch")
    weight = torch.nn.Parameter(torch.from_numpy(table))
    opt = getattr(module, name)([weight], **kwargs)

    def step(idx, values):
        weight.grad = torch.sparse_coo_tensor(torch.from_numpy(idx)[None],
                                              torch.from_numpy(values), weight.shape)
        opt.step()
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(RULES))
def test_sparse_step(benchmark, name, impl):
    kwargs = RULES[name]
    benchmark.group = f"sparse {name} {ROWS}x{DIM} {COUNT} idx"
    grads = make_grads(ROWS, DIM, COUNT, 2)
    # the check: one step against the twin
    table = _start()
    expected = table.copy()
    _stepper(impl, name, kwargs, table)(*grads[0])
    twin_opt = getattr(fastopt, name)([expected], backend="numpy", **kwargs)
    twin_opt.step([fastopt.SparseRows(*grads[0])])
    if impl == "torch":
        np.testing.assert_allclose(table, expected, rtol=0,
                                   atol=4 * np.finfo(np.float32).eps * float(np.abs(expected).max()))
    else:
        assert np.array_equal(table, expected)
    step = _stepper(impl, name, kwargs, _start())
    idx, values = grads[1]
    benchmark(step, idx, values)
