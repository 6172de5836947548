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

Half precision (test_half_step, Adam): bf16 parameters and gradients with
bf16 state, float32 parameters with bf16 state (state_dtype="bfloat16"), and
bf16 with float32 master weights, against fastopt's NumPy reference (bit for
bit) and torch's fused kernel: on bf16 tensors for bf16 (its state in their
dtype, as fastopt's default), in float32 for the other two (torch has no
state_dtype or master weights), each checked against the NumPy reference run
in torch's precision, to ``fastopt.bench.within_tolerance`` (a few ulps of
each element plus a few eps of the change in bf16). Groups "adam bf16 1e5"
and so on sit beside "adam f32 1e5".
"""
import sys
from pathlib import Path

import numpy as np
import pytest

import fastopt
from fastopt import _precision, bench
from fastopt.bench import MANY_LARGE, MANY_SMALL, MATRIX, as_tensor, model_shapes

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
    tensors = [as_tensor(torch, a) for a in arrays]  # (bf16 arrays too)
    try:
        opt = getattr(torch.optim, spec.find_class(cls).torch)(tensors, **{flavour: on}, **kwargs)
    except (TypeError, RuntimeError, ValueError) as e:
        pytest.skip(f"torch {cls.__name__} has no {flavour} path: {e}")
    wrapped = {}

    def step(grads):
        if id(grads) not in wrapped:
            wrapped[id(grads)] = [as_tensor(torch, g) for g in grads]
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


#: half-precision cases: id -> fastopt.bench's dtype label (parameter dtype and options)
HALF = {"bf16": "bfloat16", "f32+bf16": "f32+bf16", "bf16+master": "bf16+master"}
HALF_SIZES = ["1e3", "1e5", "1e6", MANY_SMALL]
HALF_IMPLEMENTATIONS = ["fastopt", "numpy-reference", "torch-fused"]


def _half_arrays(label, shapes):
    """Starting parameters and gradients of a half case (drawn in float32, then rounded)."""
    element = bench.DTYPES[label][0]
    if bench.needs_bfloat16(label):
        pytest.importorskip("ml_dtypes")
    dtype = _precision.numpy_dtype(element)
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(n, dtype=np.float32).astype(dtype) for n in shapes]
    grads = [(rng.standard_normal(n, dtype=np.float32) + 0.5).astype(dtype) for n in shapes]
    return p0, grads


def _masters(opt, count):
    """An optimizer's float32 master copies of its parameters (none without master weights)."""
    return [opt.state[i]["master_param"] for i in range(count) if "master_param" in opt.state[i]]


@pytest.mark.parametrize("impl", HALF_IMPLEMENTATIONS)
@pytest.mark.parametrize("size", HALF_SIZES)
@pytest.mark.parametrize("dtype", list(HALF))
def test_half_step(benchmark, dtype, size, impl):
    label = HALF[dtype]
    precision = bench.DTYPES[label][1]
    shapes = model_shapes(size)
    p0, grads = _half_arrays(label, shapes)
    if impl == "torch-fused":
        # torch runs plain Adam in its element (bf16 for bf16, float32 where
        # the case keeps bf16 state or a master), from the same numbers
        # widened exactly; its reference is the NumPy reference run so.
        t_dtype = _precision.numpy_dtype(bench.torch_element(label))
        p0, grads, precision = [p.astype(t_dtype) for p in p0], [g.astype(t_dtype)
                                                                 for g in grads], {}
        step, params = _torch(fastopt.Adam, {}, [p.copy() for p in p0], "fused")
        opt = None
    else:
        params = [p.copy() for p in p0]
        opt = fastopt.Adam(params, backend="numpy" if impl == "numpy-reference" else "cython",
                           **precision)
        step = lambda grads: opt.step(grads)  # noqa: E731

    # Check the implementation once: three steps against the reference.
    expected = [p.copy() for p in p0]
    reference = fastopt.Adam(expected, backend="numpy", **precision)
    for _ in range(3):
        step(grads)
        reference.step(grads)
    got, want, start = (np.concatenate([p.ravel() for p in arrays])
                        for arrays in (params, expected, p0))
    if opt is None:
        ok, dev = bench.within_tolerance(got, want, start)
        assert ok, f"torch deviates from the NumPy reference by {dev:.3g} of the change"
    else:  # bit for bit: half types by their 16-bit patterns, and the master copies
        bits = (lambda a: a.view(np.uint16)) if got.dtype.itemsize == 2 else (lambda a: a)
        np.testing.assert_array_equal(bits(got), bits(want))
        for mine, theirs in zip(_masters(opt, len(p0)), _masters(reference, len(p0)),
                                strict=True):
            np.testing.assert_array_equal(mine, theirs)

    benchmark.group = f"adam {dtype} {size}"
    benchmark(step, grads)
