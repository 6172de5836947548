"""fastopt.kernels (the fused Cython kernels) against fastopt.reference (NumPy).

Both follow the same operation order per element, the extension is built
without FMA contraction, and NumPy's float32 arithmetic with Python-float
scalars rounds like the kernels' float32 arithmetic - so the two must agree
bit for bit, NaN and Inf included, for every dtype, size and option set.
"""
import numpy as np
import pytest

from fastopt import kernels, reference

import spec  # tests/spec.py: tests/ is on sys.path under pytest

SIZES = [0, 1, 7, 16, 17, 1000, 4099, 100003]
DTYPES = [np.float32, np.float64]
STEPS = 3


def make_state(rule_name, hyper, p, rng):
    """Buffers the options need (tests/spec.py), with non-trivial starting values."""
    buffers = []
    for buf, needed in zip(spec.rule(rule_name).buffers, spec.needs(rule_name, hyper, p.shape)):
        shape = buf.shape_for(p.shape)
        if not needed:
            buffers.append(None)
        elif buf.values == "squares":
            # >= 0, and square_avg above grad_avg ** 2 as in a real run
            buffers.append((0.01 + rng.random(shape)).astype(p.dtype))
        elif buf.values == "small":
            buffers.append((0.1 * rng.random(shape) - 0.05).astype(p.dtype))
        else:
            buffers.append(rng.standard_normal(shape).astype(p.dtype))
    return buffers


def run_both(rule_name, options, dtype, n, grads_fn, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    hyper = spec.kernel_kwargs(rule_name, options)
    p = rng.standard_normal(n).astype(dtype)
    buffers = make_state(rule_name, hyper, p, rng)
    fast = [p.copy()] + [None if b is None else b.copy() for b in buffers]
    slow = [p.copy()] + [None if b is None else b.copy() for b in buffers]
    kernel = spec.rule(rule_name).kernel
    carried = [spec.carried(rule_name)] * 2  # per-parameter scalars (NAdam's mu_product)
    for t in range(1, steps + 1):
        g = grads_fn(rng, n, dtype)
        kw = {**hyper, **spec.step_kwargs(rule_name, t)}
        carried = [spec.carry(rule_name, getattr(module, kernel)(arrays[0], g, *arrays[1:],
                                                                **kw, **scalars))
                   for module, arrays, scalars in ((kernels, fast, carried[0]),
                                                   (reference, slow, carried[1]))]
        assert carried[0] == carried[1], f"step {t}: the returned scalars differ"
    return fast, slow


def normal_grads(rng, n, dtype):
    return rng.standard_normal(n).astype(dtype)


def hostile_grads(rng, n, dtype):
    """``n`` (a size or a shape) values of 1e30's scale, with NaN, Inf, 0, -0 and extremes."""
    g = rng.standard_normal(n).astype(dtype) * np.asarray(1e30, dtype)
    flat = g.reshape(-1)  # (a view: the specials land in g)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, 1e38], dtype)
    flat[: min(flat.size, specials.size)] = specials[: min(flat.size, specials.size)]
    rng.shuffle(flat)
    return g


def shaped_cases():
    """The kernel cases of the rules whose buffers are shaped by the parameter's dimensions,
    each with each of the rule's sweep shapes: ``(id, rule name, options, shape)``."""
    return [(f"{cid}-{'x'.join(map(str, shape))}", name, options, shape)
            for cid, name, options in spec.kernel_cases() if spec.rule(name).shaped
            for shape in spec.rule(name).shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", shaped_cases(), ids=spec.case_id)
def test_fast_equals_reference_shaped(case, dtype):
    # matrices and stacks of them: the factored state (Adafactor's rows and
    # columns), row and column sums in the twin's order; then NaN, Inf and extremes
    _, name, options, shape = case
    fast, slow = run_both(name, options, dtype, shape, normal_grads)
    for a, b in zip(fast, slow):
        if a is not None:
            assert a.dtype == dtype
            np.testing.assert_array_equal(a, b)
    with np.errstate(all="ignore"):
        fast, slow = run_both(name, options, dtype, shape, hostile_grads, seed=3)
    for a, b in zip(fast, slow):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", spec.kernel_cases(), ids=spec.case_id)
def test_fast_equals_reference(case, dtype, n):
    fast, slow = run_both(*case[1:], dtype, n, normal_grads)
    for a, b in zip(fast, slow):
        if a is not None:
            assert a.dtype == dtype
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", spec.kernel_cases(), ids=spec.case_id)
def test_fast_equals_reference_with_nan_and_inf(case, dtype):
    with np.errstate(all="ignore"):
        fast, slow = run_both(*case[1:], dtype, 37, hostile_grads)
    for a, b in zip(fast, slow):
        if a is not None:
            np.testing.assert_array_equal(a, b)  # NaN positions must match too


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_multidimensional_arrays_are_updated_as_flat(dtype):
    rng = np.random.default_rng(1)
    p = rng.standard_normal((3, 5, 7)).astype(dtype)
    g = rng.standard_normal((3, 5, 7)).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    flat = [x.ravel().copy() for x in (p, g, m, v)]
    kernels.adam(p, g, m, v, step=1, lr=0.1)
    kernels.adam(flat[0], flat[1], flat[2], flat[3], step=1, lr=0.1)
    np.testing.assert_array_equal(p.ravel(), flat[0])


def test_sgd_first_step_copies_gradient_into_buffer():
    p = np.zeros(4)
    g = np.array([1.0, -2.0, 3.0, 0.5])
    buf = np.full(4, 123.0)
    kernels.sgd(p, g, buf, lr=0.1, momentum=0.9, dampening=0.5, first_step=True)
    np.testing.assert_array_equal(buf, g)  # no dampening on the first step
    np.testing.assert_allclose(p, -0.1 * g)


def test_adam_first_step_moves_by_lr_in_sign_direction():
    # After bias correction, the first Adam step is lr * g / (|g| + eps').
    p = np.zeros(3)
    kernels.adam(p, np.array([2.0, -3.0, 0.0]), np.zeros(3), np.zeros(3), step=1, lr=0.5)
    np.testing.assert_allclose(p, [-0.5, 0.5, 0.0], rtol=1e-7)


def test_amsgrad_keeps_running_maximum():
    p, m, v, vmax = np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2)
    kernels.adam(p, np.array([10.0, 1.0]), m, v, vmax, step=1, amsgrad=True)
    first = vmax.copy()
    kernels.adam(p, np.array([0.0, 0.0]), m, v, vmax, step=2, amsgrad=True)
    np.testing.assert_array_equal(vmax, first)  # v decayed, the max did not
    assert np.all(v < vmax)


# ----------------------------------------------------------------- bad input

def fresh_adam_args(dtype=np.float32, n=8):
    p = np.ones(n, dtype)
    g = np.full(n, 0.5, dtype)
    return p, g, np.zeros(n, dtype), np.zeros(n, dtype)


BAD_KERNEL_CALLS = {
    "int param": (lambda p, g, m, v: (p.astype(np.int64), g, m, v, {}), TypeError, "dtype"),
    "float16 param": (lambda p, g, m, v: (p.astype(np.float16), g, m, v, {}), TypeError, "float32 or float64"),
    "list param": (lambda p, g, m, v: (list(p), g, m, v, {}), TypeError, "numpy.ndarray"),
    "grad dtype": (lambda p, g, m, v: (p, g.astype(np.float64), m, v, {}), TypeError, "g has dtype"),
    "grad shape": (lambda p, g, m, v: (p, g[:4], m, v, {}), ValueError, "g has shape"),
    "strided param": (lambda p, g, m, v: (np.ones(16, p.dtype)[::2], g, m, v, {}), ValueError, "C-contiguous"),
    "strided grad": (lambda p, g, m, v: (p, np.ones(16, p.dtype)[::2], m, v, {}), ValueError, "g must be C-contiguous"),
    "read-only param": (lambda p, g, m, v: (np.broadcast_to(p, p.shape), g, m, v, {}), ValueError, "read-only"),
    "grad is param": (lambda p, g, m, v: (p, p, m, v, {}), ValueError, "g shares memory with p"),
    "grad is state": (lambda p, g, m, v: (p, m, m, v, {}), ValueError, "shares memory with exp_avg"),
    "state is state": (lambda p, g, m, v: (p, g, m, m, {}), ValueError, "exp_avg_sq shares memory"),
    "missing amsgrad buffer": (lambda p, g, m, v: (p, g, m, v, {"amsgrad": True}), ValueError, "max_exp_avg_sq is required"),
    "negative lr": (lambda p, g, m, v: (p, g, m, v, {"lr": -1.0}), ValueError, "lr must be >= 0"),
    "nan lr": (lambda p, g, m, v: (p, g, m, v, {"lr": float("nan")}), ValueError, "lr must be >= 0"),
    "beta1 = 1": (lambda p, g, m, v: (p, g, m, v, {"betas": (1.0, 0.999)}), ValueError, r"betas\[0\] must be in \[0, 1\)"),
    "beta2 < 0": (lambda p, g, m, v: (p, g, m, v, {"betas": (0.9, -0.1)}), ValueError, r"betas\[1\]"),
    "betas scalar": (lambda p, g, m, v: (p, g, m, v, {"betas": 0.9}), TypeError, "pair"),
    "eps = 0": (lambda p, g, m, v: (p, g, m, v, {"eps": 0.0}), ValueError, "eps must be > 0"),
    "lr string": (lambda p, g, m, v: (p, g, m, v, {"lr": "0.1"}), TypeError, "lr must be a real number"),
    "step 0": (lambda p, g, m, v: (p, g, m, v, {"step": 0}), ValueError, "step must be >= 1"),
    "step float": (lambda p, g, m, v: (p, g, m, v, {"step": 1.5}), TypeError, "step must be an integer"),
}


@pytest.mark.parametrize("name", BAD_KERNEL_CALLS)
def test_bad_kernel_input_raises_and_changes_nothing(name):
    make, error, message = BAD_KERNEL_CALLS[name]
    p, g, m, v, extra = make(*fresh_adam_args())
    before = [np.array(x, copy=True) for x in (p, g, m, v)]
    kwargs = {"step": 1, **extra}
    with pytest.raises(error, match=message):
        kernels.adam(p, g, m, v, **kwargs)
    for x, b in zip((p, g, m, v), before):
        np.testing.assert_array_equal(np.asarray(x), b)


def test_unused_buffer_is_refused():
    p, g, m, v = fresh_adam_args()
    with pytest.raises(ValueError, match="max_exp_avg_sq was given but"):
        kernels.adam(p, g, m, v, np.zeros_like(p), step=1)


def test_nesterov_needs_momentum_and_no_dampening():
    p = np.zeros(3)
    with pytest.raises(ValueError, match="nesterov"):
        kernels.sgd(p, np.ones(3), np.zeros(3), momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        kernels.sgd(p, np.ones(3), np.zeros(3), momentum=0.9, dampening=0.1, nesterov=True)
    np.testing.assert_array_equal(p, 0)
