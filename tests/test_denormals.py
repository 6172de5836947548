"""The subnormal range: fastopt keeps IEEE gradual underflow, bit for bit.

* With params, grads and state in (or stepping into) the subnormal range,
  the kernels give the NumPy reference's bits - every rule and option set
  of tests/spec.py, both dtypes, plus an eps so small that the
  square root of a subnormal second moment matters; the optimizers give the
  numpy backend's bits at every SIMD level on 1 and 2 threads (so an OpenMP
  thread left flushing subnormals would show on the next step).
* A step leaves the thread's floating-point control state as it found it:
  NumPy and Python arithmetic that produces or reads subnormals still does
  after steps on every path, in the main thread and in another thread. (An
  x86 flush-to-zero / denormals-are-zero mode, set by a library and not
  restored, would make these products 0.) The probes are plain arithmetic on
  literal constants, not np.finfo, whose values are fixed at import.

bench/denormals.py measures what gradual underflow costs (a lot, on x86).
"""
import importlib
import threading

import numpy as np
import pytest

import fastopt
from fastopt import _dispatch, kernels, reference

import spec  # tests/spec.py: tests/ is on sys.path under pytest

DTYPES = [np.float32, np.float64]
N = 257
STEPS = 4
# g * g is subnormal for these (g itself is normal): the second moments land
# in the subnormal range from the first step.
SQUARE_TO_SUBNORMAL = {np.float32: 1e-21, np.float64: 1e-158}


def smallest_normal(dtype):
    return np.finfo(dtype).smallest_normal


def is_subnormal(a):
    a = np.asarray(a)
    return (a != 0) & (np.abs(a) < smallest_normal(a.dtype))


def subnormals(rng, n, dtype, signed=True):
    """Mostly subnormal values, plus the edge cases (0, -0, the smallest and largest subnormal)."""
    tiny = smallest_normal(dtype)
    least = np.finfo(dtype).smallest_subnormal
    x = (rng.random(n) * tiny).astype(dtype)
    edges = np.array([least, tiny - least, 0.0, least * 3, tiny * 0.5], dtype)
    x[:edges.size] = edges[:n]  # (a buffer of one number per row may be tiny)
    if signed:
        x *= np.where(rng.random(n) < 0.5, -1, 1).astype(dtype)
        x[0:1], x[2:3] = -least, -0.0
    rng.shuffle(x)
    return x


def subnormal_grads(rng, n, dtype):
    """Half subnormal, half normal but with subnormal squares."""
    g = subnormals(rng, n, dtype)
    scale = SQUARE_TO_SUBNORMAL[np.dtype(dtype).type]
    half = n // 2
    g[:half] = (rng.standard_normal(half) * scale).astype(dtype)
    rng.shuffle(g)
    return g


def subnormal_state(rule_name, hyper, p, rng):
    """The buffers the options need (tests/spec.py), all in the subnormal range."""
    buffers = []
    for buf, needed in zip(spec.rule(rule_name).buffers, spec.needs(rule_name, hyper, p.shape)):
        size = int(np.prod(buf.shape_for(p.shape) or ()))
        if not needed:
            buffers.append(None)
        elif buf.values == "squares":
            buffers.append(np.abs(subnormals(rng, size, p.dtype, signed=False)).reshape(
                buf.shape_for(p.shape)))
        else:
            buffers.append(subnormals(rng, size, p.dtype).reshape(buf.shape_for(p.shape)))
    return buffers


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# Besides every rule's option sets (tests/spec.py): eps at the bottom of the
# normal range, so that sqrt(subnormal second moment) is not drowned by eps.
TINY_EPS = "smallest normal"
CASES = spec.kernel_cases() + [spec.kernel_case(*case) for case in [
    ("adam", {"eps": TINY_EPS}),
    ("adam", {"eps": TINY_EPS, "amsgrad": True, "decoupled_weight_decay": True,
              "weight_decay": 0.1}),
    ("rmsprop", {"eps": TINY_EPS, "centered": True, "momentum": 0.9}),
    ("adagrad", {"eps": TINY_EPS, "lr_decay": 0.1}),
]]


def resolve(options, dtype):
    return {k: (float(smallest_normal(dtype)) if v == TINY_EPS else v) for k, v in options.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=spec.case_id)
def test_kernels_equal_reference_in_the_subnormal_range(case, dtype):
    _, rule_name, options = case
    kernel = spec.rule(rule_name).kernel
    rng = np.random.default_rng(7)
    hyper = spec.kernel_kwargs(rule_name, resolve(options, dtype))
    p = subnormals(rng, N, dtype)
    p[: N // 4] = (rng.standard_normal(N // 4) * 1e-3).astype(dtype)  # some normal ones too
    buffers = subnormal_state(rule_name, hyper, p, rng)
    fast = [p.copy()] + [None if b is None else b.copy() for b in buffers]
    slow = [p.copy()] + [None if b is None else b.copy() for b in buffers]
    seen_subnormal = 0
    carried = [spec.carried(rule_name)] * 2  # per-parameter scalars (NAdam's mu_product)
    with np.errstate(all="ignore"):
        for t in range(1, STEPS + 1):
            g = subnormal_grads(rng, N, dtype)
            kw = {**hyper, **spec.step_kwargs(rule_name, t)}
            carried = [spec.carry(rule_name, getattr(module, kernel)(arrays[0], g, *arrays[1:],
                                                                    **kw, **scalars))
                       for module, arrays, scalars in ((kernels, fast, carried[0]),
                                                       (reference, slow, carried[1]))]
            assert carried[0] == carried[1], f"step {t}: the returned scalars differ"
            for i, (a, b) in enumerate(zip(fast, slow)):
                if a is None:
                    continue
                differ = a.view(np.uint8) != b.view(np.uint8)
                assert same_bits(a, b), (
                    f"step {t}, array {i}: bytes {np.flatnonzero(differ)[:5]} differ; "
                    f"fastopt {a[a != b][:3]}, numpy {b[a != b][:3]}")
                seen_subnormal += int(is_subnormal(a).sum())
    assert seen_subnormal > 0  # the comparison really covered subnormal results


def _model(rng):
    sizes_dtypes = [(1000, np.float32), (37, np.float64), (4099, np.float32), (513, np.float64)]
    params = []
    for n, dtype in sizes_dtypes:
        p = subnormals(rng, n, dtype)
        p[: n // 3] = (rng.standard_normal(n // 3) * 1e-2).astype(dtype)
        params.append(p)
    return params


RUNNABLE = [lvl for lvl in _dispatch.built_levels() if lvl in _dispatch.cpu_levels()]


@pytest.fixture
def restore_dispatch():
    level, threads = fastopt.simd_level(), fastopt.get_num_threads()
    modules = {lvl: importlib.import_module(f"fastopt._kernels_{lvl}") for lvl in RUNNABLE}
    work = {lvl: m.get_parallel_min_work() for lvl, m in modules.items()}
    try:
        yield modules
    finally:
        for lvl, m in modules.items():
            m.set_parallel_min_work(work[lvl])
        _dispatch.select_simd(level)
        fastopt.set_num_threads(threads)


def _run_optimizer(cls, kw, backend, params0, grad_seq):
    params = [p.copy() for p in params0]
    opt = cls(params, **kw, backend=backend)
    with np.errstate(all="ignore"):
        for grads in grad_seq:
            opt.step(list(grads))
    out = list(params)
    for i in sorted(opt.state):
        for key in sorted(opt.state[i]):
            value = opt.state[i][key]
            if isinstance(value, np.ndarray):
                out.append(value)
    return out


@pytest.mark.parametrize("case", spec.optimizer_cases(), ids=spec.case_id)
def test_optimizers_equal_numpy_backend_in_the_subnormal_range(case, restore_dispatch):
    _, cls, kw = case
    rng = np.random.default_rng(3)
    params0 = _model(rng)
    grad_seq = [[subnormal_grads(rng, p.size, p.dtype) for p in params0] for _ in range(STEPS)]
    expected = _run_optimizer(cls, kw, "numpy", params0, grad_seq)
    assert sum(int(is_subnormal(a).sum()) for a in expected) > 0
    for level in RUNNABLE:
        for threads in (1, 2):
            _dispatch.select_simd(level)
            fastopt.set_num_threads(threads)
            restore_dispatch[level].set_parallel_min_work(0)  # split even these small steps
            result = _run_optimizer(cls, kw, "cython", params0, grad_seq)
            bad = [i for i, (a, b) in enumerate(zip(result, expected)) if not same_bits(a, b)]
            assert not bad, f"{level}, {threads} thread(s): arrays {bad} differ from NumPy"


# ---------------------------------------------------------- control state

def fpu_probe():
    """Does this thread's arithmetic produce and read subnormals? (No np.finfo.)"""
    f32_make = np.full(16, 1e-38, np.float32) * np.float32(1e-3)   # 1e-41: subnormal result
    f32_read = np.full(16, 1e-41, np.float32) * np.float32(1.0)    # subnormal input
    f64_make = np.full(16, 1e-300, np.float64) * 1e-10             # 1e-310
    f64_read = np.full(16, 1e-310, np.float64) + 0.0
    py_make = 1e-300 * 1e-10                                        # scalar SSE in Python itself
    py_read = 1e-310 * 1.0
    return {
        "f32 produces subnormals": bool((f32_make != 0).all()),
        "f32 reads subnormals": bool((f32_read != 0).all()),
        "f64 produces subnormals": bool((f64_make != 0).all()),
        "f64 reads subnormals": bool((f64_read != 0).all()),
        "python produces subnormals": py_make != 0.0,
        "python reads subnormals": py_read != 0.0,
        # gradual underflow, not a flush: 2**-126 / 4 = 2**-128 is exact
        "f32 exact": bool(np.float32(2.0 ** -126) / np.float32(4) * np.float32(4)
                          == np.float32(2.0 ** -126)),
    }


IEEE = {key: True for key in fpu_probe()}


def every_path(restore_dispatch):
    """A step on every path that reaches the compute layer."""
    rng = np.random.default_rng(5)
    small = [subnormals(rng, 64, np.float32), subnormals(rng, 33, np.float64)]
    big = [rng.standard_normal(200_000).astype(np.float32)]
    small_g = [subnormal_grads(rng, p.size, p.dtype) for p in small]
    big_g = [subnormal_grads(rng, p.size, p.dtype) for p in big]
    with np.errstate(all="ignore"):
        opt = fastopt.Adam(small, lr=1e-3)
        for _ in range(3):
            opt.step(small_g)                     # slow path (state), then the fast path
        opt.step([small_g[0], None])               # the Python path
        fastopt.set_num_threads(2)
        big_opt = fastopt.SGD(big, lr=0.1, momentum=0.9)
        for _ in range(2):
            big_opt.step(big_g)                   # large: threads, GIL released
        kernels.rmsprop(small[0], small_g[0], np.abs(subnormals(rng, 64, np.float32)), step=1)
        fastopt.clip_grad_norm([g.copy() for g in small_g], 1e-40)   # stats + scale kernels
        acc = fastopt.GradientAccumulator([np.zeros_like(g) for g in small_g], steps=2)
        acc.add(small_g)                           # axpy kernel


def test_a_step_leaves_the_fp_control_state_alone(restore_dispatch):
    assert fpu_probe() == IEEE, "subnormals are flushed before fastopt ran: see the probe"
    every_path(restore_dispatch)
    assert fpu_probe() == IEEE


def test_a_step_in_another_thread_leaves_its_fp_control_state_alone(restore_dispatch):
    seen = {}

    def work():
        seen["before"] = fpu_probe()
        every_path(restore_dispatch)
        seen["after"] = fpu_probe()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen["before"] == seen["after"] == IEEE
    assert fpu_probe() == IEEE


# ------------------------------------------------------- flush_denormals=True

def _subnormal_adam(flush, n=20_003, threads=None):
    import fastopt as fo
    p = np.ones(n, np.float32)
    opt = fo.Adam([p], lr=1e-3, flush_denormals=flush)
    opt.step([np.full(n, 1e-20, np.float32)])  # v = 1e-43: subnormal
    for _ in range(3):
        opt.step([np.zeros(n, np.float32)])
    return opt.state[0]


def test_flush_denormals_zeroes_subnormal_state_and_restores_the_fpu():
    kept = _subnormal_adam(False)
    flushed = _subnormal_adam(True)
    tiny = np.finfo(np.float32).tiny
    assert np.all((kept["exp_avg_sq"] > 0) & (kept["exp_avg_sq"] < tiny))  # IEEE: subnormals
    assert np.all(flushed["exp_avg_sq"] == 0)                               # flushed to zero
    # The mode was restored: NumPy's own arithmetic still makes subnormals.
    x = np.float32(1e-38) / np.float32(100.0)
    assert 0 < x < tiny


def test_flush_denormals_is_validated_and_default_off():
    import fastopt as fo
    with pytest.raises(TypeError, match="flush_denormals must be a bool"):
        fo.SGD([np.zeros(2)], flush_denormals="yes")
    assert fo.AdamW([np.zeros(2)]).flush_denormals is False
