"""src_c/storage.pxi: the 16-bit conversions and the staged storage kinds.

A staged kind runs a rule's float32 loop on blocks widened from the stored
arrays and rounds the results back (to nearest even). Its twin is therefore
the float32 reference on widened copies, cast back with NumPy: the two must
agree bit for bit, for every rule and option set, at sizes on both sides of
the block length, on every thread count and SIMD level.

No public entry takes float16 yet (the dtype policy is the mixed-precision
work); these tests reach the runner through fastopt.optim.rule's internal
``run_one``, below the validation, as that work will.
"""
import importlib

import numpy as np
import pytest

from fastopt import _dispatch, clip, reference
from fastopt.optim import RULES
from fastopt.optim.rule import check_call, run_one

import spec  # tests/spec.py

LEVELS = [lvl for lvl in _dispatch.built_levels() if lvl in _dispatch.cpu_levels()]
STAGE = 256  # src_c/storage.pxi
SIZES = [1, STAGE - 1, STAGE, STAGE + 1, 3 * STAGE + 17, 20011]


def module(level):
    return importlib.import_module(f"fastopt._kernels_{level}")


# ----------------------------------------------------------- conversions

def bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even, in NumPy integers (the twin)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) & 0x8000).astype(np.uint16) | np.uint16(0x7FC0), rounded)


def interesting_floats(rng, n=200_000):
    """Random bit patterns (every exponent) plus the edges of both 16-bit formats."""
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0.0, -0.0, 1.0, 65504, 65519.996, 65520, 65536, 2**-14, 2**-24,
                      2**-25, 1.5 * 2**-25, 2**-26, 3 * 2**-25, np.inf, -np.inf, np.nan,
                      3.4e38, 1e-45, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11],
                     np.float32)
    return np.concatenate([bits.view(np.float32), edges, -edges])


@pytest.mark.parametrize("level", LEVELS)
def test_float16_store_rounds_like_numpy(level):
    x = interesting_floats(np.random.default_rng(0))
    got = np.zeros(x.size, np.uint16)
    module(level).narrow("float16", x, got)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(got.view(np.float16)[nan]).all()
    np.testing.assert_array_equal(np.signbit(got.view(np.float16)[nan]), np.signbit(x[nan]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("level", LEVELS)
def test_every_16_bit_value_widens_exactly_and_round_trips(level, dtype):
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    wide = np.zeros(bits.size, np.float32)
    module(level).widen(dtype, bits, wide)
    if dtype == "float16":
        want = bits.view(np.float16).astype(np.float32)
    else:
        want = (bits.astype(np.uint32) << 16).view(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(wide[~nan], want[~nan])
    assert np.isnan(wide[nan]).all()
    back = np.zeros(bits.size, np.uint16)
    module(level).narrow(dtype, wide, back)
    np.testing.assert_array_equal(back[~nan], bits[~nan])  # every finite and inf value survives


@pytest.mark.parametrize("level", LEVELS)
def test_bfloat16_store_rounds_to_nearest_even(level):
    x = interesting_floats(np.random.default_rng(1))
    got = np.zeros(x.size, np.uint16)
    module(level).narrow("bfloat16", x, got)
    np.testing.assert_array_equal(got, bf16_bits(x))
    # The ties: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7, and goes to even (1).
    one = np.zeros(2, np.uint16)
    module(level).narrow("bfloat16", np.array([1 + 2**-8, 1 + 3 * 2**-8], np.float32), one)
    np.testing.assert_array_equal(one, [0x3F80, 0x3F82])


def test_bfloat16_store_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = interesting_floats(np.random.default_rng(2))
    got = np.zeros(x.size, np.uint16)
    module(_dispatch.simd_level()).narrow("bfloat16", x, got)
    with np.errstate(invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])


# ---------------------------------------------------------- staged kinds

def stored_state(rule_name, hyper, n, rng, dtype):
    bufs = []
    for buf, needed in zip(spec.rule(rule_name).buffers, spec.needs(rule_name, hyper)):
        shape = buf.shape_for((n,))  # (RowWiseAdagrad's: one for the row; None: as before, n)
        size = n if shape is None else int(np.prod(shape))
        if not needed:
            bufs.append(None)
        elif buf.values == "squares":
            bufs.append((0.01 + rng.random(size)).astype(dtype))
        elif buf.values == "small":
            bufs.append((0.1 * rng.random(size) - 0.05).astype(dtype))
        else:
            bufs.append(rng.standard_normal(size).astype(dtype))
    return bufs


def run_staged_and_twin(rule_name, options, n, steps=3, seed=0):
    """float16 storage through the runner, and the float32 twin cast back each step."""
    rng = np.random.default_rng(seed)
    hyper = spec.kernel_kwargs(rule_name, options)
    kernel = spec.rule(rule_name).kernel
    rule = RULES[kernel]
    p = rng.standard_normal(n).astype(np.float16)
    bufs = stored_state(rule_name, hyper, n, rng, np.float16)
    fast = [p.copy()] + [None if b is None else b.copy() for b in bufs]
    slow = [p.copy()] + [None if b is None else b.copy() for b in bufs]
    carried = [spec.carried(rule_name)] * 2
    for t in range(1, steps + 1):
        g = (rng.standard_normal(n) * 2.0).astype(np.float16)
        step = spec.step_kwargs(rule_name, t)
        checked, step_value, values = check_call(rule, next(iter(step.values())), hyper,
                                                 carried[0])
        new = run_one(rule, fast[0], g, fast[1:], step_value, checked, values)
        # (half_step: the float32 twin on widened copies, rounded back; and
        # Adafactor's eps1=None is float16's epsilon, as in torch)
        wide = [None if a is None else a.astype(np.float32) for a in slow]
        eps = hyper.get("eps")
        kwargs = {**hyper, "eps": (2.0 ** -10, eps[1])} if (
            isinstance(eps, tuple) and eps[0] is None) else hyper
        returned = getattr(reference, kernel)(wide[0], g.astype(np.float32), *wide[1:],
                                              **kwargs, **step, **carried[1])
        with np.errstate(over="ignore"):
            slow = [None if a is None else a.astype(np.float16) for a in wide]
        carried = [new or {}, spec.carry(rule_name, returned)]
        assert carried[0] == carried[1]
    return fast, slow


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", spec.kernel_cases(), ids=spec.case_id)
def test_float16_storage_equals_the_float32_twin_rounded(case, n):
    fast, slow = run_staged_and_twin(*case[1:], n)
    for a, b in zip(fast, slow):
        if a is not None:
            assert a.dtype == np.float16
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("level", LEVELS)
def test_staged_bits_do_not_depend_on_threads_or_simd(level):
    case = next(c for c in spec.kernel_cases() if c[1] == "adam")
    want, _ = run_staged_and_twin(*case[1:], 50_021)
    level_before, threads_before = _dispatch.simd_level(), _dispatch.get_num_threads()
    _dispatch.select_simd(level)
    try:
        for threads in (1, 2):
            _dispatch.set_num_threads(threads)
            got, _ = run_staged_and_twin(*case[1:], 50_021)
            for a, b in zip(got, want):
                if a is not None:
                    np.testing.assert_array_equal(a, b)
    finally:
        _dispatch.set_num_threads(threads_before)
        _dispatch.select_simd(level_before)


@pytest.mark.parametrize("n", [1, 255, 8192 + 300, 50_000])
def test_gradient_stats_of_float16_equal_those_of_its_float32_values(n):
    g = (np.random.default_rng(3).standard_normal(n) * 100).astype(np.float16)
    assert clip._stats([g])[1:] == clip._stats([g.astype(np.float32)])[1:]
    g[n // 2] = np.inf
    assert clip._stats([g])[2] and clip._stats([g.astype(np.float32)])[2]
