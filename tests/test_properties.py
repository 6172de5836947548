"""Property-based tests (hypothesis) for every public entry point of fastopt.

Entry points: the optimizers (SGD, Adagrad, RMSprop, Adam, AdamW: construction,
``add_param_group`` and ``step``), the low-level kernels
(``fastopt.kernels.sgd/adagrad/rmsprop/adam``), ``FlatParams``,
``clip_grad_norm`` / ``clip_grad_value`` / ``grad_norm``,
``GradientAccumulator`` and ``fastopt.batches``.

Every generated case must end in one of two ways:

(a) it is accepted and the result equals an independent NumPy oracle bit for
    bit (``fastopt.reference`` for the kernels; for the optimizers the
    ``backend="numpy"`` optimizer *and* ``ModelOptimizer`` below, which does the
    optimizer's bookkeeping itself over ``fastopt.reference``): values, NaN
    positions and the signs of zeros;
(b) it raises a clean ``TypeError``/``ValueError`` and has modified nothing:
    parameters, gradients, state buffers, ``opt.state``, ``param_groups``.

A crash, a hang, another exception type, or a step that "succeeds" without
doing the update the oracle does, fails the test. Inputs are classified
OK (must be accepted), BAD (must be refused) or EITHER (both are fine, but an
accepted one must be right: e.g. ``Fraction`` hyperparameters, unaligned or
byte-swapped arrays, ndarray subclasses).

Profiles (the env var HYPOTHESIS_PROFILE selects one; per-test example counts
are scaled by the profile):

* ``ci`` (default): 150 to 400 cases per test, the whole file in about 30 s
  on 2 cores.
* ``thorough``: 20x the examples. Run it with::

      HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_properties.py \\
          --hypothesis-show-statistics

Neither profile keeps an example database (Hypothesis may still cache
constants under ``.hypothesis/``, which git-ignores itself); a failure prints a
``@reproduce_failure`` blob to replay it instead.

Bugs these properties found (B1-B14) were fixed; the generated domains cover
them, and one regression test per bug at the end of the file states the
documented behaviour for the case that found it.
"""
import decimal
import fractions
import math
import numbers
import os
import warnings

import numpy as np
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

import fastopt
from fastopt import kernels, reference

import spec  # tests/spec.py: tests/ is on sys.path under pytest

# ------------------------------------------------------------------ profiles

_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
settings.register_profile("ci", max_examples=100, **_COMMON)
settings.register_profile("thorough", max_examples=2000, **_COMMON)
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
_SCALE = {"ci": 1, "thorough": 20}.get(_PROFILE, 1)
try:
    _PARENT = settings.get_profile(_PROFILE)
except Exception:  # noqa: BLE001 - a profile registered elsewhere under another name
    _PARENT = settings.get_profile("ci")


def cases(n):
    """Settings for a test that runs ``n`` examples in the ci profile."""
    return settings(_PARENT, max_examples=n * _SCALE)


# ------------------------------------------------------------------ verdicts

OK, EITHER, BAD = "ok", "either", "bad"


def combine(*verdicts):
    if BAD in verdicts:
        return BAD
    if EITHER in verdicts:
        return EITHER
    return OK


def quiet():
    """NumPy's overflow/invalid warnings are expected with the values generated here."""
    state = np.errstate(all="ignore")
    catcher = warnings.catch_warnings()

    class _Both:
        def __enter__(self):
            state.__enter__()
            catcher.__enter__()
            warnings.simplefilter("ignore")

        def __exit__(self, *exc):
            catcher.__exit__(*exc)
            return state.__exit__(*exc)

    return _Both()


# ------------------------------------------------------------ hyperparameters

MAXF = np.finfo(np.float64).max
INF, NAN = math.inf, math.nan


def _real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


#: the kinds that are a pair: beta-like, Rprop's etas, (min, max) bounds, and
#: Adafactor's (eps1 or None, eps2)
PAIRS = ("betas", "etas", "bounds", "eps_pair")


def normalize(kind, v):
    """The value fastopt computes with: a Python float, bool, pair or int."""
    if kind == "flag":
        return bool(v)
    if kind in PAIRS:
        return (None if v[0] is None else float(v[0]), float(v[1]))
    if kind == "step":
        return int(v)
    return float(v)


_OK_VALUES = {
    "nonneg": [0, 0.0, -0.0, 5e-324, 1e-300, 1e-8, 1e-3, 0.01, 0.1, 0.5, 1, 1.0, 2, 10.0,
               1e10, 1e300, MAXF, np.float32(0.1), np.float64(0.25), np.int64(2),
               np.float16(0.5), np.int8(1)],
    "positive": [5e-324, 1e-300, 1e-10, 1e-8, 1e-3, 1.0, 3, 1e10, 1e300, MAXF,
                 np.float32(1e-8), np.int64(1)],
    "unit": [0, 0.0, -0.0, 5e-324, 0.5, 0.9, 0.99, 0.999, 0.9999999, 1 - 2 ** -53,
             np.float32(0.99999994), np.float32(0.9), np.float64(0.999)],
    "finite": [0, 0.0, -0.0, 0.5, 1, -1.0, 2.0, -1e300, 1e300, 5e-324, -MAXF,
               np.float32(0.1)],
    "closed_unit": [0, 0.0, -0.0, 5e-324, 0.5, 0.9, 1 - 2 ** -53, 1, 1.0, np.float32(1.0)],
    "nonpos": [0, 0.0, -0.0, -5e-324, -0.5, -0.8, -1, -1e300, -MAXF, np.float32(-0.8),
               np.int64(-2)],
    "at_least_one": [1, 1.0, 1 + 2 ** -52, 2, 10.0, 1e300, MAXF, np.float32(1.5), np.int64(3)],
    "flag": [True, False, np.True_, np.False_],
    "step": [1, 2, 3, 10, 1000, 2 ** 31, 2 ** 53, 2 ** 53 + 1, 2 ** 53 + 3, 2 ** 62,
             2 ** 63 - 1, np.int64(5), np.int32(1), np.uint64(7)],
}


def ok_value(kind):
    """Values that must be accepted."""
    pool = st.sampled_from(_OK_VALUES.get(kind, []) or [None])
    if kind == "nonneg":
        return st.one_of(pool, st.floats(0, MAXF))
    if kind == "positive":
        return st.one_of(pool, st.floats(5e-324, MAXF))
    if kind == "unit":
        return st.one_of(pool, st.floats(0, 1, exclude_max=True))
    if kind == "finite":
        return st.one_of(pool, st.floats(allow_nan=False, allow_infinity=False))
    if kind == "closed_unit":
        return st.one_of(pool, st.floats(0, 1))
    if kind == "nonpos":
        return st.one_of(pool, st.floats(-MAXF, 0))
    if kind == "at_least_one":
        return st.one_of(pool, st.floats(1, MAXF))
    if kind == "eps_pair":
        pair = st.tuples(st.one_of(st.none(), ok_value("nonneg")), ok_value("nonneg"))
        return st.one_of(pair, pair.map(list))
    if kind == "etas":
        pair = st.tuples(st.floats(0, 1, exclude_min=True, exclude_max=True),
                         st.floats(1, MAXF, exclude_min=True))
        return st.one_of(pair, pair.map(list))
    if kind == "bounds":
        pair = st.tuples(st.floats(0, MAXF), st.floats(0, INF)).map(lambda t: tuple(sorted(t)))
        return st.one_of(pair, pair.map(list), st.sampled_from([(0, 0), (1e-6, 50), (0.0, INF)]))
    if kind == "flag":
        return pool
    if kind == "betas":
        unit = ok_value("unit")
        return st.one_of(st.tuples(unit, unit), st.lists(unit, min_size=2, max_size=2))
    if kind == "step":
        return st.one_of(pool, st.integers(1, 2 ** 63 - 1))
    raise AssertionError(kind)


_EITHER_VALUES = {
    "nonneg": [INF, fractions.Fraction(1, 3), decimal.Decimal("0.5"), np.array(0.5),
               np.longdouble(0.5)],
    "positive": [fractions.Fraction(1, 10 ** 8), decimal.Decimal("1e-8"), np.array(1e-8)],
    "unit": [fractions.Fraction(9, 10), decimal.Decimal("0.9"), np.array(0.9)],
    "finite": [fractions.Fraction(-1, 2), decimal.Decimal("0.1"), np.array(0.0)],
    "flag": [np.array(True)],
    "betas": [np.array([0.9, 0.999]), (fractions.Fraction(9, 10), 0.999)],
    "closed_unit": [fractions.Fraction(9, 10), decimal.Decimal("0.9"), np.array(1.0)],
    "etas": [np.array([0.5, 1.2]), (fractions.Fraction(1, 2), 1.2)],
    "bounds": [np.array([1e-6, 50.0]), (fractions.Fraction(1, 10 ** 6), 50)],
    "nonpos": [-INF, fractions.Fraction(-1, 3), decimal.Decimal("-0.5"), np.array(-0.5)],
    "at_least_one": [INF, fractions.Fraction(3, 2), decimal.Decimal("1.5"), np.array(2.0)],
    "eps_pair": [np.array([1e-3, 1e-3]), (None, INF), (INF, 1e-3),
                 (None, fractions.Fraction(1, 1000))],
    "step": [np.array(3)],
}

# Wrong types every numeric hyperparameter must refuse.
_WRONG_TYPES = ["0.1", "", None, [0.1], (0.1,), {}, b"1", 1j, complex(0.5, 0),
                np.complex64(1)]
_BAD_VALUES = {
    "nonneg": _WRONG_TYPES + [True, False, np.True_, NAN, np.float32(NAN), -1e-300,
                              -5e-324, -1, -1.0, -INF, np.int64(-1), 10 ** 400, -10 ** 400],
    "positive": _WRONG_TYPES + [True, np.False_, NAN, 0, 0.0, -0.0, -1e-8, INF, -INF,
                                np.float64(INF), 10 ** 400],
    "unit": _WRONG_TYPES + [True, False, NAN, 1, 1.0, 1.5, -1e-300, INF, -0.5,
                            np.float32(1.0), 10 ** 400],
    "finite": _WRONG_TYPES + [True, NAN, INF, -INF, 10 ** 400, -10 ** 400],
    "flag": ["True", "", None, 0, 1, 1.0, 0.0, [True], NAN, "False"],
    "betas": [(0.9,), (0.9, 0.999, 0.5), [], "ab", None, 0.9, (1.0, 0.9), (0.9, 1.0),
              (0.9, NAN), (-0.1, 0.9), (True, 0.9), ("0.9", 0.999), (None, None),
              {0.9: 1, 0.99: 2}, (10 ** 400, 0.9)],
    "closed_unit": _WRONG_TYPES + [True, False, NAN, 1.5, 1 + 2 ** -52, -1e-300, INF, -0.5,
                                   10 ** 400],
    "etas": [(0.5,), (0.5, 1.2, 2.0), [], None, 0.5, (0.0, 1.2), (1.0, 1.2), (0.5, 1.0),
             (0.5, 0.9), (-0.5, 1.2), (0.5, INF), (NAN, 1.2), (0.5, NAN), (True, 1.2),
             ("0.5", 1.2), (10 ** 400, 1.2)],
    "bounds": [(1e-6,), (1e-6, 50, 60), [], None, 50, (-1e-6, 50), (50, 1e-6), (NAN, 50),
               (1e-6, NAN), (-INF, 50), (True, 50), ("0", 50), (0, 10 ** 400)],
    "nonpos": _WRONG_TYPES + [True, False, NAN, 5e-324, 0.5, 1, INF, np.int64(1), 10 ** 400,
                              -10 ** 400],
    "at_least_one": _WRONG_TYPES + [True, False, NAN, 1 - 2 ** -53, 0.5, 0, -1, -INF,
                                    np.float32(0.5), 10 ** 400],
    "eps_pair": [(None,), (None, 1e-3, 1.0), [], None, 1e-3, (None, None), (1e-3, None),
                 (-1e-3, 1e-3), (None, -1e-3), (NAN, 1e-3), (None, NAN), (True, 1e-3),
                 (None, "1e-3"), ("0", 1e-3), (10 ** 400, 1e-3)],
    "step": [0, -1, -2 ** 63, 1.0, 1.5, True, False, np.True_, "1", None, [1],
             np.float64(2.0), NAN, 2 ** 63, 10 ** 30, 10 ** 400],
}


def bad_kind_of(kind, v):
    """A label for the kind of bad hyperparameter (for the statistics)."""
    if isinstance(v, (bool, np.bool_)):
        return "bool where a number is expected" if kind != "flag" else "?"
    if kind == "flag":
        return "number/str/None where a bool is expected"
    if kind in PAIRS:
        if isinstance(v, (tuple, list)) and len(v) == 2:
            return f"{kind} element out of range or wrong type"
        return f"{kind} not a pair"
    if isinstance(v, (str, bytes, type(None), list, tuple, dict, complex, np.complexfloating)):
        return "wrong type (str/None/container/complex)"
    if isinstance(v, numbers.Real):
        try:
            x = float(v)
        except OverflowError:
            return "beyond float64's range"
        if kind == "step" and isinstance(v, numbers.Integral) and v > 2 ** 63 - 1:
            return "step count beyond int64"
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "infinite"
        if kind == "step" and not isinstance(v, numbers.Integral):
            return "float step count"
        return "out of range (negative, zero or >= 1)"
    return "other"


def draw_hyper(data, kind, verdict):
    """(value, verdict) for a hyperparameter of ``kind``: ok, either or bad."""
    if verdict == OK:
        return data.draw(ok_value(kind)), OK
    if verdict == EITHER:
        return data.draw(st.sampled_from(_EITHER_VALUES[kind])), EITHER
    v = data.draw(st.sampled_from(_BAD_VALUES[kind]))
    event(f"bad hyperparameter: {bad_kind_of(kind, v)}")
    return v, BAD


def hyper_verdict(kind, v):
    """The spec of a hyperparameter value (README; torch's ranges, eps > 0)."""
    if kind == "flag":
        return OK if isinstance(v, (bool, np.bool_)) else (EITHER if isinstance(v, np.ndarray) else BAD)
    if kind == "betas":
        if isinstance(v, np.ndarray):
            return EITHER
        if not isinstance(v, (tuple, list)) or len(v) != 2:
            return BAD
        return combine(hyper_verdict("unit", v[0]), hyper_verdict("unit", v[1]))
    if kind in ("etas", "bounds"):
        return _pair_verdict(kind, v)
    if kind == "eps_pair":
        if isinstance(v, np.ndarray):
            return EITHER
        if not isinstance(v, (tuple, list)) or len(v) != 2:
            return BAD
        first = OK if v[0] is None else hyper_verdict("nonneg", v[0])
        return combine(first, hyper_verdict("nonneg", v[1]))
    if kind == "step":
        if isinstance(v, np.ndarray):
            return EITHER
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            return BAD
        return OK if 1 <= v <= 2 ** 63 - 1 else BAD
    if isinstance(v, (np.ndarray, decimal.Decimal, fractions.Fraction)):
        if isinstance(v, fractions.Fraction):
            x = float(v)
        else:
            return EITHER
    elif not _real(v):
        return BAD
    try:
        x = float(v)
    except OverflowError:  # a Python int beyond float64, e.g. 10**400
        return BAD
    if kind == "nonneg":
        return OK if 0 <= x < INF else (EITHER if x == INF else BAD)
    if kind == "positive":
        return OK if 0 < x < INF else BAD
    if kind == "unit":
        return OK if 0 <= x < 1 else BAD
    if kind == "finite":
        return OK if math.isfinite(x) else BAD
    if kind == "closed_unit":
        return OK if 0 <= x <= 1 else BAD
    if kind == "nonpos":
        return OK if -INF < x <= 0 else (EITHER if x == -INF else BAD)
    if kind == "at_least_one":
        return OK if 1 <= x < INF else (EITHER if x == INF else BAD)
    raise AssertionError(kind)


def _pair_verdict(kind, v):
    """Rprop's etas (0 < etaminus < 1 < etaplus, finite) and (min, max) bounds (0 <= min <= max)."""
    if isinstance(v, np.ndarray):
        return EITHER
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        return BAD
    if not all(_real(x) for x in v):
        return BAD
    try:
        low, high = float(v[0]), float(v[1])
    except OverflowError:
        return BAD
    if kind == "etas":
        return OK if 0 < low < 1 < high < INF else BAD
    return OK if 0 <= low <= high else BAD


def fix_verdict(verdict, computed):
    """Keep the stricter of a drawn verdict and a computed one."""
    if computed == BAD or verdict == BAD:
        return BAD
    if computed == EITHER or verdict == EITHER:
        return EITHER
    return OK


# ------------------------------------------------------------------ values

F32_SPECIALS = [NAN, INF, -INF, 0.0, -0.0, 1.4e-45, 1e-40, 1.1754944e-38, 3.4028235e38,
                -3.4028235e38, 1.0, -1.0, 1e20, -1e-30, 65504.0]
F64_SPECIALS = [NAN, INF, -INF, 0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1e-310, MAXF,
                -MAXF, 1e200, -1e-200, 1.0, -1.0, 1e154, -1.5e154]
PROFILES = ("normal", "normal", "normal", "specials", "huge", "tiny", "zeros", "constant",
            "mixed")


def make_values(seed, shape, dtype, profile):
    """Deterministic values of ``dtype`` (any dtype) from a seed and a profile."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape, dtype=np.int64))
    dtype = np.dtype(dtype)
    small = dtype.kind == "f" and dtype.itemsize <= 4
    specials = np.array(F32_SPECIALS if small else F64_SPECIALS)
    if profile == "normal":
        v = rng.standard_normal(size) * 10.0 ** float(rng.integers(-3, 4))
    elif profile == "specials":
        v = rng.choice(specials, size)
    elif profile == "huge":
        top = 38.5 if small else 308.0
        v = rng.choice([-1.0, 1.0], size) * 10.0 ** rng.uniform(15, top, size)
    elif profile == "tiny":
        low, high = (-46, -37) if small else (-324, -300)
        v = rng.choice([-1.0, 1.0], size) * 10.0 ** rng.uniform(low, high, size)
    elif profile == "zeros":
        v = np.where(rng.random(size) < 0.5, 0.0, -0.0)
    elif profile == "constant":
        v = np.full(size, rng.choice(np.append(specials, 0.5)))
    else:  # mixed
        v = rng.standard_normal(size)
        mask = rng.random(size) < 0.1
        v[mask] = rng.choice(specials, int(mask.sum()))
    with quiet():
        if dtype.kind == "c":
            out = (v + 1j * v[::-1]).astype(dtype)
        else:
            out = v.astype(dtype)
    return out.reshape(shape)


@st.composite
def value_specs(draw):
    """(seed, profile) for make_values."""
    return draw(st.integers(0, 2 ** 32 - 1)), draw(st.sampled_from(PROFILES))


def draw_values(data, shape, dtype):
    """make_values of this shape and dtype, from a drawn seed and profile."""
    seed, profile = data.draw(value_specs())
    return make_values(seed, shape, dtype, profile)


def draw_float_array(data, shapes):
    """Values of a drawn shape (from ``shapes``) and float dtype."""
    shape = data.draw(shapes, label="shape")
    return draw_values(data, shape, data.draw(st.sampled_from(FLOATS), label="dtype"))


SMALL_SHAPES = st.one_of(
    st.sampled_from([(), (0,), (1,), (2, 0), (0, 3), (1, 1)]),
    st.tuples(st.integers(1, 33)),
    st.tuples(st.integers(1, 7), st.integers(1, 7)),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4)),
)
# Sizes around the kernels' thresholds: 16384 elements release the GIL; work
# (elements x rule cost) >= 32768 splits over threads, at multiples of 16.
LARGE_SHAPES = st.sampled_from([(6553,), (6555,), (8191,), (16383,), (16385,), (32769,),
                                (49999,), (3, 16411), (129, 131), (7, 5003)])
SHAPES = st.one_of(SMALL_SHAPES, LARGE_SHAPES)

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
BAD_DTYPES = [np.dtype(t) for t in (np.int8, np.int32, np.int64, np.bool_, np.float16,
                                    np.complex64, np.complex128, object, np.longdouble,
                                    np.uint16)]
SWAPPED = [np.dtype(">f4"), np.dtype(">f8")]
# An optimizer steps complex parameters (as their real view) and float16 ones
# (half precision: tests/test_precision.py); the kernels take neither.
PARAM_BAD_DTYPES = [d for d in BAD_DTYPES if d.kind != "c" and d != np.dtype(np.float16)]


class Sub(np.ndarray):
    """A plain ndarray subclass (EITHER: fine to accept, fine to refuse)."""


# ------------------------------------------------------------------ layouts

class Mem:
    """Keeps what an array case may touch: owners (nothing may change after a
    refused call) and guards (regions no call may ever change)."""

    def __init__(self):
        self.owners = []
        self.guards = []

    def own(self, *arrays):
        for a in arrays:
            if isinstance(a, np.ndarray):
                self.owners.append((a, a.tobytes()))
                if isinstance(a.base, np.ndarray):
                    self.own(a.base)

    def guard(self, owner, lo, hi):
        if hi > lo:
            self.guards.append((owner, lo, hi, owner[lo:hi].tobytes()))

    def assert_untouched(self):
        for a, before in self.owners:
            assert a.tobytes() == before, "a refused call modified an array"

    def assert_guards(self):
        for owner, lo, hi, before in self.guards:
            assert owner[lo:hi].tobytes() == before, "memory next to an array was written"


VALID_LAYOUTS = ("C", "C", "C", "offset", "subclass")
NONCONTIG_LAYOUTS = ("F", "T", "step", "step_last", "neg", "broadcast", "zero_stride")
OTHER_LAYOUTS = ("readonly", "unaligned", "swapped")


def lay_out(values, layout, mem, pad=3):
    """``values`` (C order, any dtype) placed in memory as ``layout`` says."""
    shape, dtype, n = values.shape, values.dtype, values.size
    if layout == "C":
        return values.copy()
    if layout == "subclass":
        return values.copy().view(Sub)
    if layout == "readonly":
        a = values.copy()
        a.flags.writeable = False
        return a
    if layout == "offset":  # a C-contiguous window of a larger buffer, guarded on both sides
        big = np.zeros(n + 2 * pad, dtype)
        with quiet():
            big[:] = make_values(pad, (n + 2 * pad,), dtype, "specials")
        a = big[pad:pad + n].reshape(shape)
        a[...] = values
        mem.guard(big, 0, pad)
        mem.guard(big, pad + n, n + 2 * pad)
        return a
    if layout == "F":
        return np.asfortranarray(values)
    if layout == "T":  # a transposed view (reversed axes) of a C-contiguous array
        return np.ascontiguousarray(values.T).T
    if layout == "step" and values.ndim:
        big = np.zeros((shape[0] * 2,) + shape[1:], dtype)
        big[::2] = values
        return big[::2]
    if layout == "step_last" and values.ndim:
        big = np.zeros(shape[:-1] + (shape[-1] * 2,), dtype)
        big[..., ::2] = values
        return big[..., ::2]
    if layout == "neg" and values.ndim:
        return values[::-1].copy()[::-1]
    if layout == "broadcast":
        first = values.reshape(-1)[:1].reshape(()) if n else values
        return np.broadcast_to(first, shape)
    if layout == "zero_stride" and n:
        one = values.reshape(-1)[:1].copy()
        return np.lib.stride_tricks.as_strided(one, shape, (0,) * len(shape), writeable=True)
    if layout == "unaligned" and dtype != object and dtype.itemsize > 1:
        raw = np.zeros(values.nbytes + 1, np.uint8)
        a = raw[1:].view(dtype).reshape(shape)
        a[...] = values
        return a
    if layout == "swapped":
        return values.astype(dtype.newbyteorder())
    return values.copy()


def array_verdict(a, writeable):
    """Spec of one array (README): an ndarray of float32/float64, C-contiguous,
    writeable when it is updated. Unaligned, byte-swapped or subclassed: EITHER."""
    if not isinstance(a, np.ndarray):
        return BAD
    if a.dtype not in FLOATS:
        swapped = a.dtype.kind == "f" and a.dtype.newbyteorder() in FLOATS
        if not swapped:
            return BAD
        verdict = EITHER
    else:
        verdict = OK
    if not a.flags.c_contiguous:
        return BAD
    if writeable and not a.flags.writeable:
        return BAD
    if not a.flags.aligned or type(a) is not np.ndarray:
        verdict = EITHER
    return verdict


def native(a):
    """A C-contiguous native-order plain ndarray copy of ``a`` (for the oracle)."""
    a = np.asarray(a)
    return np.array(a, dtype=a.dtype.newbyteorder("="), order="C", copy=True)


def overlaps(a, b):
    try:
        return bool(np.shares_memory(a, b, max_work=10 ** 6))
    except np.exceptions.TooHardError:
        return True


def assert_same_numbers(actual, expected, what="array"):
    """Same dtype, shape, values, NaN positions and signs of zeros."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype.newbyteorder("=") == expected.dtype.newbyteorder("="), what
    assert actual.shape == expected.shape, what
    np.testing.assert_array_equal(actual, expected, err_msg=what)
    a, e = actual.ravel(), expected.ravel()
    numbers_ = ~np.isnan(e)
    assert np.array_equal(np.signbit(a[numbers_]), np.signbit(e[numbers_])), f"{what}: sign of zero"


def expect_clean_error(call):
    """Run ``call``; return the TypeError/ValueError it raised (anything else fails)."""
    try:
        with quiet():
            call()
    except (TypeError, ValueError) as e:
        return e
    except BaseException as e:  # any other type is the failure reported
        raise AssertionError(f"expected TypeError/ValueError, got {type(e).__name__}: {e}") from e
    return None


def settle(call, verdict, mem, what):
    """Run ``call`` as ``verdict`` says: ``(True, its result)`` when it was
    accepted (and had to be), ``(False, None)`` when refused cleanly (and could
    be) with every array ``mem`` owns untouched."""
    out = []
    error = expect_clean_error(lambda: out.append(call()))
    if error is not None:
        assert verdict != OK, f"valid {what} refused: {error!r}"
        mem.assert_untouched()
        event(f"{what} outcome: refused cleanly")
        return False, None
    assert verdict != BAD, f"invalid {what} accepted"
    return True, out[0]


# ================================================================ kernels

#: rule -> its kernel and NumPy twin and what tests/spec.py says of them: the
#: buffer arguments (kernel order), the per-step argument and its kind, the
#: kind of each hyperparameter (kernel order), and the scalars a call takes
#: and returns anew (NAdam's mu_product) at their first step's values
KERNELS = {
    r.name: dict(fast=getattr(kernels, r.kernel), ref=getattr(reference, r.kernel),
                 buffers=tuple(b.param for b in r.buffers), step_arg=r.step_arg,
                 step_kind="step" if r.step_arg == "step" else "flag", hyper=dict(r.options),
                 scalars=spec.carried(r))
    for r in spec.rules()
}
#: the kernel arguments that hold sums or averages of squares (never negative)
SQUARES = {b.param for r in spec.rules() for b in r.buffers if b.values == "squares"}


def kernel_needs(rule, h, shape):
    """Which buffers the options use for a parameter of ``shape`` (README: required if
    used, refused if not)."""
    return spec.needs(rule, h, shape)


def buffer_shape(rule, name, shape):
    """The shape of buffer ``name`` for a parameter of ``shape`` (its own where it has none)."""
    buf = next(b for b in spec.rule(rule).buffers if b.name == name or b.param == name)
    return buf.shape_for(shape) or tuple(shape)


def cross_verdict(rule, h):
    return OK if spec.is_valid(rule, h) else BAD


ALIAS_KINDS = ("g_is_p", "g_view_p", "g_overlaps_p", "buf_is_p", "buf_is_g", "buf_is_buf",
               "buf_overlaps_p", "buf_overlaps_buf", "g_overlaps_buf")


def _overlapping_pair(values_a, values_b, shift):
    """Two C-contiguous arrays in one buffer, the second starting ``shift`` elements on.

    The two may differ in shape (RowWiseAdagrad's row sums are smaller than the
    gradient); whether they really overlap is judged later by np.shares_memory.
    """
    na, nb = values_a.size, values_b.size
    buf = np.zeros(max(na, shift + nb), values_a.dtype)
    a = buf[:na].reshape(values_a.shape)
    b = buf[shift:shift + nb].reshape(values_b.shape)
    b[...] = values_b
    a[...] = values_a
    return a, b


@cases(400)
@given(data=st.data())
def test_kernels_match_reference_or_refuse_cleanly(data):
    """fastopt.kernels.* against fastopt.reference.*, or a clean refusal."""
    rule = data.draw(st.sampled_from(sorted(KERNELS)), label="rule")
    spec = KERNELS[rule]
    mode = data.draw(st.sampled_from(["valid"] * 4 + ["hyper", "array", "array", "alias", "alias",
                                                      "buffers", "step", "mixed"]), label="mode")
    event(f"kernel mode: {mode}")
    fields = sorted(spec["hyper"])

    # hyperparameters
    bad_fields = set()
    if mode in ("hyper", "mixed"):
        bad_fields = data.draw(st.sets(st.sampled_from(fields), min_size=1, max_size=2))
    kwargs, by_field = {}, {}
    for field in fields:
        kind = spec["hyper"][field]
        wanted = BAD if field in bad_fields else data.draw(st.sampled_from([OK] * 40 + [EITHER]))
        kwargs[field], v = draw_hyper(data, kind, wanted)
        by_field[field] = fix_verdict(v, hyper_verdict(kind, kwargs[field]))
    if rule == "sgd" and mode == "hyper" and data.draw(st.booleans()):
        kwargs["nesterov"], kwargs["momentum"] = True, data.draw(st.sampled_from([0, 0.0, 0.9]))
        kwargs["dampening"] = data.draw(st.sampled_from([0.0, 0.5, -0.0]))
        for f in ("nesterov", "momentum", "dampening"):
            by_field[f] = hyper_verdict(spec["hyper"][f], kwargs[f])
        event("bad hyperparameter: nesterov without momentum > 0 and dampening == 0"
              if not (kwargs["momentum"] > 0 and kwargs["dampening"] == 0) else "nesterov ok")
    if rule == "sgd" and mode == "valid" and by_field["nesterov"] == OK and bool(kwargs["nesterov"]):
        kwargs["dampening"] = data.draw(st.sampled_from([0, 0.0, -0.0]))
        if not (by_field["momentum"] == OK and float(kwargs["momentum"]) > 0):
            kwargs["momentum"] = data.draw(st.sampled_from([0.9, 1e-300, 1, 1e10]))
        by_field["dampening"] = by_field["momentum"] = OK
    verdicts = list(by_field.values())
    hyper_ok = combine(*verdicts) != BAD
    norm = {f: normalize(spec["hyper"][f], kwargs[f]) for f in fields} if hyper_ok else None
    if hyper_ok:
        verdicts.append(cross_verdict(rule, norm))

    # the per-step argument
    step_verdict = BAD if mode in ("step", "mixed") and data.draw(st.booleans()) else OK
    if mode == "step":
        step_verdict = BAD
    step_value, v = draw_hyper(data, spec["step_kind"], step_verdict)
    verdicts.append(fix_verdict(v, hyper_verdict(spec["step_kind"], step_value)))

    # arrays
    shape = data.draw(SHAPES, label="shape")
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    needs = kernel_needs(rule, norm, shape) if hyper_ok else tuple(
        data.draw(st.booleans()) for _ in spec["buffers"])
    present = list(needs)
    if rule == "adagrad":
        present = [True]
    if mode in ("buffers", "mixed"):
        flip = data.draw(st.integers(0, len(present) - 1))
        present[flip] = not present[flip]
        event("bad buffers: " + ("a needed buffer is missing" if needs[flip] else
                                 "a buffer the options do not use is given"))
    names = ["p", "g"] + list(spec["buffers"])
    mem = Mem()
    arrays = {}
    for name in names:
        if name not in ("p", "g") and not present[names.index(name) - 2]:
            arrays[name] = None
            continue
        seed, profile = data.draw(value_specs())
        if name in SQUARES and data.draw(st.booleans()):
            profile = data.draw(st.sampled_from(["zeros", "tiny", "normal"]))
        values = make_values(seed, shape if name in ("p", "g") else
                             buffer_shape(rule, name, shape), dtype, profile)
        if name in SQUARES and profile in ("normal", "tiny"):
            values = np.abs(values)
        layouts = VALID_LAYOUTS + (("readonly",) if name == "g" else ())
        arrays[name] = lay_out(values, data.draw(st.sampled_from(layouts)), mem)
    if mode in ("array", "mixed"):
        target = data.draw(st.sampled_from([n for n in names if arrays[n] is not None]))
        how = data.draw(st.sampled_from(["dtype", "shape", "layout", "not an array"]))
        a = arrays[target]
        if how == "dtype":
            new = data.draw(st.sampled_from(BAD_DTYPES + SWAPPED + [d for d in FLOATS if d != dtype]))
            with quiet():
                arrays[target] = np.ascontiguousarray(np.asarray(a).astype(new))
            event("bad array: dtype " + ("byte-swapped float" if new in SWAPPED else
                                         "other float" if new in FLOATS else str(new)))
        elif how == "shape":
            options = [(1,) + a.shape, a.shape + (1,), (a.size + 1,)]
            if a.ndim >= 2:
                if a.shape[::-1] != a.shape:  # (a square one reversed is the same)
                    options.append(a.shape[::-1])
                options.append((a.size,))
            new_shape = data.draw(st.sampled_from(options))
            arrays[target] = make_values(0, new_shape, dtype, "normal")
            event("bad array: shape")
        elif how == "layout":
            layout = data.draw(st.sampled_from(NONCONTIG_LAYOUTS + OTHER_LAYOUTS))
            arrays[target] = lay_out(native(a), layout, mem)
            event(f"bad array: layout {layout}")
        else:
            junk = [np.asarray(a).tolist(), 1.0, "p", [0.0]]
            if target in ("p", "g"):
                junk.append(None)  # (a buffer given as None is simply not given)
            arrays[target] = data.draw(st.sampled_from(junk))
            event("bad array: not an ndarray (list/float/None/str)")
    if mode in ("alias", "valid") and all(isinstance(a, np.ndarray) for a in arrays.values()
                                          if a is not None):
        bufs = [n for n in names[2:] if arrays[n] is not None]
        kinds = [k for k in ALIAS_KINDS if ("buf" not in k or bufs)
                 and (k != "buf_is_buf" and k != "buf_overlaps_buf" or len(bufs) >= 2)]
        if mode == "alias":
            kind = data.draw(st.sampled_from(kinds))
            event(f"aliasing: {kind}" + (" (empty arrays: allowed)" if arrays["p"].size == 0 else ""))
            b1 = bufs[0] if bufs else None
            b2 = bufs[1] if len(bufs) >= 2 else None
            n = arrays["p"].size
            shift = data.draw(st.integers(1, max(1, n - 1))) if n >= 2 else 1
            if kind == "g_is_p":
                arrays["g"] = arrays["p"]
            elif kind == "g_view_p":
                arrays["g"] = arrays["p"].view(np.ndarray)[...]
            elif kind == "buf_is_p":
                arrays[b1] = arrays["p"]
            elif kind == "buf_is_g":
                arrays[b1] = arrays["g"]
            elif kind == "buf_is_buf":
                arrays[b2] = arrays[b1]
            elif kind == "g_overlaps_p":
                arrays["p"], arrays["g"] = _overlapping_pair(native(arrays["p"]), native(arrays["g"]), shift)
            elif kind == "buf_overlaps_p":
                arrays["p"], arrays[b1] = _overlapping_pair(native(arrays["p"]), native(arrays[b1]), shift)
            elif kind == "buf_overlaps_buf":
                arrays[b1], arrays[b2] = _overlapping_pair(native(arrays[b1]), native(arrays[b2]), shift)
            else:  # g_overlaps_buf
                arrays[b1], arrays["g"] = _overlapping_pair(native(arrays[b1]), native(arrays["g"]), shift)
        elif data.draw(st.integers(0, 3)) == 0:
            # valid packing: every array a window of one buffer, with gaps (guarded)
            live = [n for n in names if arrays[n] is not None]
            sizes = {n: arrays[n].size for n in live}  # (Adafactor's factors are smaller)
            gaps = [data.draw(st.integers(0, 17)) for _ in range(len(live) + 1)]
            big = np.zeros(sum(sizes.values()) + sum(gaps), dtype)
            big[:] = make_values(1, big.shape, dtype, "specials")
            pos = gaps[0]
            for name, gap in zip(live, gaps[1:]):
                window = big[pos:pos + sizes[name]].reshape(arrays[name].shape)
                window[...] = arrays[name]
                arrays[name] = window
                pos += sizes[name] + gap
            covered = np.zeros(big.size, bool)
            for name in live:
                start = (arrays[name].__array_interface__["data"][0]
                         - big.__array_interface__["data"][0]) // big.itemsize
                covered[start:start + sizes[name]] = True
            for i in np.flatnonzero(~covered):
                mem.guard(big, int(i), int(i) + 1)
            event("valid: all arrays adjacent windows of one buffer")

    # the verdict for the arrays
    p = arrays["p"]
    av = [array_verdict(p, True), array_verdict(arrays["g"], False)]
    av += [array_verdict(arrays[n], True) for n in names[2:] if arrays[n] is not None]
    live = ["p", "g"] + [n for n in names[2:] if arrays[n] is not None]
    if all(isinstance(arrays[n], np.ndarray) for n in live):
        for n in live[1:]:
            want = p.shape if n == "g" else buffer_shape(rule, n, p.shape)
            if arrays[n].dtype != p.dtype or arrays[n].shape != want:
                av.append(BAD)
        if combine(*av) != BAD:
            pairs = [(a, b) for i, a in enumerate(live) for b in live[i + 1:]]
            for a, b in pairs:
                if overlaps(arrays[a], arrays[b]):
                    av.append(BAD)
    if hyper_ok:
        for name, need, given_ in zip(spec["buffers"], needs, present):
            if need != given_:
                av.append(BAD)
    verdict = combine(*verdicts, *av)
    note(f"rule={rule} mode={mode} verdict={verdict} kwargs={kwargs} step={step_value!r}")
    event(f"kernel verdict: {verdict}")

    # the oracle, on independent copies
    expected = None
    if verdict != BAD:
        expected = {n: native(arrays[n]) for n in live}
        ref_buffers = [expected.get(n) for n in spec["buffers"]]
        try:
            with quiet():
                returned = spec["ref"](expected["p"], expected["g"], *ref_buffers,
                                       **{spec["step_arg"]: normalize(spec["step_kind"], step_value)},
                                       **spec["scalars"], **norm)
        except ZeroDivisionError:  # NAdam's mu_product rounds to 1: torch cannot step either
            verdict = BAD
    if verdict == BAD:
        expected = None
    mem.own(*[arrays[n] for n in live])
    g_before = arrays["g"].tobytes() if isinstance(arrays["g"], np.ndarray) else None
    call_buffers = [arrays[n] for n in spec["buffers"]]
    accepted, out = settle(lambda: spec["fast"](
        arrays["p"], arrays["g"], *call_buffers, **{spec["step_arg"]: step_value},
        **spec["scalars"], **kwargs), verdict, mem, "kernel")
    if not accepted:
        return
    event("kernel outcome: matched the reference")
    assert out == returned, f"the kernel returned {out!r}, the reference {returned!r}"
    for name in live:
        if name != "g":
            assert_same_numbers(arrays[name], expected[name], name)
    assert arrays["g"].tobytes() == g_before, "the gradient was modified"
    mem.assert_guards()


# ================================================================ optimizers

#: optimizer class -> (class, rule, constructor option -> kind), from tests/spec.py
OPTIMIZERS = {c.name: (getattr(fastopt, c.name), spec.rule(c).name, spec.option_kinds(c))
              for c in spec.classes()}
#: torch.optim's defaults (README "API"), with the options a class fixes (AdamW)
DEFAULTS = {c.name: spec.group_defaults(c) for c in spec.classes()}
#: what a param group holds -> kind
GROUP_KINDS = {c.name: dict(spec.option_kinds(c), **{k: spec.rule(c).options[k] for k in c.fixed})
               for c in spec.classes()}
STATE_BUFFERS = {r.name: tuple(b.name for b in r.buffers) for r in spec.rules()}
KERNEL_FIELDS = {rule: tuple(KERNELS[rule]["hyper"]) for rule in KERNELS}


def nadam_divides_by_zero(hyper, steps=16):
    """Whether torch's NAdam divides by zero within ``steps``: its float32
    mu_product (or mu_product * mu_next) rounds to 1, which fastopt refuses at
    that step (tests/test_nadam.py covers the refusal)."""
    beta1 = normalize("betas", hyper["betas"])[0]
    rate = normalize("nonneg", hyper["momentum_decay"])
    product = np.float32(1.0)
    for t in range(1, steps + 1):
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * rate))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * rate))
        product = np.float32(product * np.float32(mu))
        if float(product) == 1.0 or float(product) * mu_next == 1.0:
            return True
    return False


def group_verdict(name, hyper):
    """Spec of a whole group's hyperparameters (each rule, plus SGD's nesterov rule)."""
    kinds = GROUP_KINDS[name]
    if any(k not in hyper for k in kinds):
        return BAD
    v = combine(*(hyper_verdict(kind, hyper[k]) for k, kind in kinds.items()))
    if v == BAD:
        return BAD
    norm = {k: normalize(kind, hyper[k]) for k, kind in kinds.items()}
    return combine(v, cross_verdict(OPTIMIZERS[name][1], norm))


class ModelOptimizer:
    """What a step must do, written out over fastopt.reference (the oracle).

    README: None means no gradient (param and state left alone); state is
    created on a parameter's first step with a gradient, in the parameter's
    dtype, with torch.optim's names; "step" counts the steps with a gradient;
    SGD's momentum buffer starts as the gradient; Adagrad's sum starts at
    initial_accumulator_value; skip_nonfinite skips a step with NaN/Inf grads.
    """

    def __init__(self, name, groups, skip_nonfinite):
        self.name, self.rule = name, OPTIMIZERS[name][1]
        self.groups = groups  # [{"params": [arrays], "hyper": {normalized}}]
        self.state = {}
        self.skip = skip_nonfinite
        self.skipped = 0

    @property
    def params(self):
        return [p for g in self.groups for p in g["params"]]

    def step(self, grads):
        present = [np.asarray(g) for g in grads if g is not None]
        if self.skip and any(not np.all(np.isfinite(g)) for g in present):
            self.skipped += 1
            return
        i = 0
        for group in self.groups:
            for p in group["params"]:
                if grads[i] is not None:
                    with quiet():
                        self._update(i, p, native(grads[i]), group["hyper"])
                i += 1

    def _update(self, i, p, g, h):
        st_ = self.state.setdefault(i, {})
        rule = self.rule
        kh = {k: h[k] for k in KERNEL_FIELDS[rule]}
        needs = kernel_needs(rule, h, p.shape)
        created = set()
        for buf, need in zip(spec.rule(rule).buffers, needs):
            if need and st_.get(buf.name) is None:
                fill = h[buf.start] if buf.start else 0.0
                st_[buf.name] = np.full(buf.shape_for(p.shape), fill, p.dtype)
                created.add(buf.name)
        bufs = [st_[name] if need else None for name, need in zip(STATE_BUFFERS[rule], needs)]
        twin = KERNELS[rule]["ref"]
        if KERNELS[rule]["step_arg"] == "first_step":
            # no step count (SGD): the first step is the one that made the buffer
            twin(p, g, *bufs, first_step=bool(created), **kh)
            return
        st_["step"] = st_.get("step", 0) + 1
        carried = {k: st_.get(k, start) for k, start in spec.carried(rule, kh).items()}
        st_.update(spec.carry(rule, twin(p, g, *bufs, step=st_["step"], **carried, **kh)))


def assert_matches_model(opt, params, model, what):
    for k, (p, q) in enumerate(zip(params, model.params)):
        assert_same_numbers(p, q, f"{what}: params[{k}]")
    assert sorted(opt.state) == sorted(model.state), f"{what}: state keys"
    for i, expected in model.state.items():
        got = opt.state[i]
        assert sorted(got) == sorted(expected), f"{what}: state[{i}] keys"
        for key, value in expected.items():
            if isinstance(value, np.ndarray):
                assert got[key].dtype == model.params[i].dtype, f"{what}: state[{i}][{key!r}] dtype"
                assert_same_numbers(got[key], value, f"{what}: state[{i}][{key!r}]")
            else:
                assert type(got[key]) is type(value) and got[key] == value, f"{what}: state[{i}][{key!r}]"
    assert opt.skipped_steps == model.skipped, f"{what}: skipped_steps"
    assert len(opt.param_groups) == len(model.groups)
    kinds = GROUP_KINDS[model.name]
    for group, mg in zip(opt.param_groups, model.groups):
        for k, v in mg["hyper"].items():
            # an edited value stays as the user wrote it; it computes as its normal form
            assert normalize(kinds[k], group[k]) == v, f"{what}: param_groups {k}"


def opt_snapshot(opt, params, grads):
    """Everything a refused step must leave as it was."""
    state = opt.state
    snap_state = None
    if isinstance(state, dict):
        snap_state = {i: (entry, dict(entry) if isinstance(entry, dict) else None)
                      for i, entry in state.items()}
    bytes_ = {}
    for entry in (snap_state or {}).values():
        for v in (entry[1] or {}).values():
            if isinstance(v, np.ndarray):
                bytes_[id(v)] = (v, v.tobytes())
    in_groups = [a for g in opt.param_groups if isinstance(g, dict) and isinstance(g.get("params"), list)
                 for a in g["params"] if isinstance(a, np.ndarray)]
    for a in list(params) + in_groups + [g for g in grads if isinstance(g, np.ndarray)]:
        bytes_[id(a)] = (a, a.tobytes())
    groups = [(g, dict(g) if isinstance(g, dict) else None,
               list(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None)
              for g in opt.param_groups] if isinstance(opt.param_groups, list) else None
    return dict(state_obj=state, state=snap_state, bytes=bytes_, groups=groups,
                skipped=opt.skipped_steps)


def assert_snapshot(opt, snap):
    assert opt.state is snap["state_obj"], "opt.state was replaced"
    if snap["state"] is not None:
        assert sorted(opt.state, key=repr) == sorted(snap["state"], key=repr), "opt.state keys changed"
        for i, (entry, content) in snap["state"].items():
            assert opt.state[i] is entry, f"state[{i}] replaced"
            if content is not None:
                assert list(entry) == list(content), f"state[{i}] keys changed"
                for k, v in content.items():
                    assert entry[k] is v, f"state[{i}][{k!r}] replaced"
    for a, before in snap["bytes"].values():
        assert a.tobytes() == before, "an array was modified by a refused step"
    if snap["groups"] is not None:
        for group, content, plist in snap["groups"]:
            if content is not None:
                assert list(group) == list(content)
                for k, v in content.items():
                    assert group[k] is v or group[k] == v, f"param_groups: {k} changed"
            if plist is not None:
                assert group["params"] == plist or all(a is b for a, b in zip(group["params"], plist))
    assert opt.skipped_steps == snap["skipped"]


NAME_POOL = ["w", "", "b.0", "ü", "a b", "0", "layer/1", "W"]


@st.composite
def param_setups(draw, max_groups=3, max_per_group=3):
    """Groups of parameter *values* and how they are laid out and named."""
    big_budget = draw(st.sampled_from([0, 0, 0, 1]))
    n_groups = draw(st.integers(1, max_groups))
    named = draw(st.booleans())
    groups = []
    counter = 0
    for gi in range(n_groups):
        n = draw(st.integers(0 if n_groups > 1 else 1, max_per_group))
        layout = draw(st.sampled_from(["separate", "separate", "shared", "flat"]))
        dtype = draw(st.sampled_from(FLOATS))
        entries = []
        for _ in range(n):
            if big_budget and draw(st.booleans()):
                shape = draw(LARGE_SHAPES)
                big_budget -= 1
            else:
                shape = draw(SMALL_SHAPES)
            if layout == "separate":
                dtype = draw(st.sampled_from(FLOATS))
            seed, profile = draw(value_specs())
            name = draw(st.sampled_from(NAME_POOL)) + str(counter)
            counter += 1
            entries.append(dict(shape=shape, dtype=dtype, seed=seed, profile=profile, name=name,
                                param_layout=draw(st.sampled_from(VALID_LAYOUTS))))
        groups.append(dict(entries=entries, layout=layout, named=named))
    return groups


def build_params(setup):
    """Fresh arrays for one optimizer, per the setup: list of lists (per group)."""
    out = []
    mem = Mem()
    for group in setup:
        values = [make_values(e["seed"], e["shape"], e["dtype"], e["profile"])
                  for e in group["entries"]]
        if group["layout"] == "flat" and values:
            flat = fastopt.FlatParams({e["name"]: v for e, v in zip(group["entries"], values)},
                                      dtype=group["entries"][0]["dtype"])
            arrays = [flat.params[e["name"]] for e in group["entries"]]
        elif group["layout"] == "shared" and values:
            # adjacent windows of one buffer with small gaps: valid, never overlapping
            dtype = group["entries"][0]["dtype"]
            total = sum(v.size + 3 for v in values)
            big = np.zeros(total, dtype)
            arrays, pos = [], 1
            for v in values:
                a = big[pos:pos + v.size].reshape(v.shape)
                a[...] = v.astype(dtype)
                arrays.append(a)
                pos += v.size + 3
        else:
            arrays = [lay_out(v, e["param_layout"], mem) for e, v in zip(group["entries"], values)]
        out.append(arrays)
    return out


def params_argument(setup, arrays, overrides, form):
    """The ``params`` argument to the constructor."""
    named = setup[0]["named"]
    groups = []
    for g, arr, ov in zip(setup, arrays, overrides):
        ps = {e["name"]: a for e, a in zip(g["entries"], arr)} if named else list(arr)
        groups.append(dict(ov, params=ps))
    if len(groups) == 1 and not overrides[0]:
        ps = groups[0]["params"]
        if form == "groups":
            return groups
        if named:
            return ps
        if form == "tuple":
            return tuple(ps)
        if form == "iter":
            return iter(ps)
        return ps
    return groups


BAD_GRAD_KINDS = ("dtype", "shape", "layout", "not_array", "is_param", "view_of_param",
                  "overlaps_param", "is_state", "is_other_param", "is_other_state", "structure")
BAD_STATE_KINDS = ("step", "buffer_dtype", "buffer_shape", "buffer_layout", "buffer_readonly",
                   "buffer_not_array", "buffer_is_param", "buffer_is_grad", "buffer_is_buffer",
                   "buffer_is_other_param", "buffer_of_other_param", "buffer_readonly_in_place",
                   "buffer_reshaped_in_place", "entry_not_dict")


@st.composite
def grad_values(draw, params_shapes, none_ok=True):
    """Per parameter: None, or (seed, profile, layout)."""
    out = []
    for _ in params_shapes:
        if none_ok and draw(st.integers(0, 5)) == 0:
            out.append(None)
        else:
            seed, profile = draw(value_specs())
            out.append((seed, profile, draw(st.sampled_from(("C", "C", "readonly", "offset",
                                                             "subclass", "shared")))))
    return out


def build_grads(spec, params):
    """Gradient arrays for ``spec`` (shared between the optimizers: read only)."""
    mem = Mem()
    grads = []
    shared = [i for i, s in enumerate(spec) if s is not None and s[2] == "shared"]
    if shared:
        total = sum(params[i].size + 1 for i in shared)
        buffers = {}
        for dt in {params[i].dtype for i in shared}:
            buffers[dt] = [np.zeros(total, dt), 0]
    for i, s in enumerate(spec):
        if s is None:
            grads.append(None)
            continue
        seed, profile, layout = s
        values = make_values(seed, params[i].shape, params[i].dtype, profile)
        if layout == "shared":
            buf = buffers[params[i].dtype]
            a = buf[0][buf[1]:buf[1] + values.size].reshape(values.shape)
            a[...] = values
            buf[1] += values.size + 1
            grads.append(a)
        else:
            grads.append(lay_out(values, layout, mem))
    # sometimes two parameters of one shape and dtype share one gradient array
    return grads


def grads_container(grads, names, form):
    if form == "dict" and names is not None:
        return dict(zip(names, grads))
    if form == "tuple":
        return tuple(grads)
    return list(grads)


class Lockstep:
    """A cython optimizer, a numpy-backend optimizer and the model, driven together."""

    def __init__(self, name, setup, overrides, kwargs, skip, form):
        cls = OPTIMIZERS[name][0]
        self.name = name
        self.setup = setup
        self.named = setup[0]["named"]
        self.opts, self.params = [], []
        for backend in ("cython", "numpy"):
            arrays = build_params(setup)
            self.params.append([a for arr in arrays for a in arr])
            with quiet():
                self.opts.append(cls(params_argument(setup, arrays, overrides, form), **kwargs,
                                     backend=backend, skip_nonfinite=skip))
        defaults = {k: normalize(GROUP_KINDS[name][k], v)
                    for k, v in dict(DEFAULTS[name], **kwargs).items()}
        model_groups = []
        model_arrays = build_params(setup)
        for arr, ov in zip(model_arrays, overrides):
            hyper = dict(defaults, **{k: normalize(GROUP_KINDS[name][k], v) for k, v in ov.items()})
            model_groups.append(dict(params=[native(a) for a in arr], hyper=hyper))
        self.model = ModelOptimizer(name, model_groups, skip)
        self.names = ([e["name"] for g in setup for e in g["entries"]] if self.named else None)

    @property
    def count(self):
        return len(self.params[0])

    def check(self, what):
        sizes = [len(g["params"]) for g in self.model.groups]
        for opt, params in zip(self.opts, self.params):
            pos = 0
            for group, size in zip(opt.param_groups, sizes):
                assert len(group["params"]) == size
                assert all(a is b for a, b in zip(group["params"], params[pos:pos + size])), \
                    "param_groups hold other arrays than the user's"
                pos += size
            assert_matches_model(opt, params, self.model, f"{opt.backend}: {what}")

    def step(self, grads, form):
        befores = [a.tobytes() for a in grads if a is not None]
        for opt in self.opts:
            with quiet():
                opt.step(grads_container(grads, self.names, form))
        self.model.step(grads)
        assert [a.tobytes() for a in grads if a is not None] == befores, "a gradient was modified"

    def refused(self, make_call, what):
        """Each optimizer must refuse ``make_call(k)``'s step with nothing modified."""
        for k, opt in enumerate(self.opts):
            call, grads_seen = make_call(k)
            snap = opt_snapshot(opt, self.params[k], grads_seen)
            error = expect_clean_error(call)
            assert error is not None, f"{opt.backend}: {what}: invalid step accepted"
            assert_snapshot(opt, snap)


def _bad_grad_choice(data, kind, lock, base, t):
    """Draw the details of a bad gradient once (the same for both optimizers)."""
    p, g = lock.params[0][t], base[t]
    if kind == "dtype":
        return data.draw(st.sampled_from(BAD_DTYPES + SWAPPED + [d for d in FLOATS if d != p.dtype]),
                         label="dtype")
    if kind == "shape":
        options = [(1,) + p.shape, p.shape + (2,), (p.size + 1,)]
        if p.ndim >= 2 and p.shape[::-1] != p.shape:
            options.append(p.shape[::-1])
        if p.ndim != 1:
            options.append((p.size,))
        return data.draw(st.sampled_from(options), label="shape")
    if kind == "layout":
        options = [lay for lay in NONCONTIG_LAYOUTS
                   if not lay_out(native(g), lay, Mem()).flags.c_contiguous]
        return data.draw(st.sampled_from(options), label="layout") if options else None
    if kind == "not_array":
        return data.draw(st.sampled_from(["list", 1.0, "g", 3, {"a": 1}, b""]), label="junk")
    if kind == "is_state":
        # any buffer, also one the options no longer use (grad_avg after
        # centered=False, ...): a gradient shares no memory with its state
        entry = lock.opts[0].state.get(t)
        bufs = sorted(k for k, b in (entry or {}).items() if isinstance(b, np.ndarray) and b.size)
        return data.draw(st.sampled_from(bufs), label="buffer") if bufs else None
    if kind in ("is_other_param", "is_other_state"):
        # the same dtype and shape, so that only the aliasing is wrong
        others = [u for u in _twins(lock, t) if kind == "is_other_param" or any(
            isinstance(b, np.ndarray) for b in (lock.opts[0].state.get(u) or {}).values())]
        if not others:
            return None
        u = data.draw(st.sampled_from(others), label="other param")
        if kind == "is_other_param":
            return u
        entry = lock.opts[0].state[u]
        return u, data.draw(st.sampled_from(sorted(k for k, b in entry.items()
                                                   if isinstance(b, np.ndarray))), label="buffer")
    return True


def _twins(lock, t):
    """The other parameters with parameter t's dtype and shape (non-empty)."""
    p = lock.params[0][t]
    return [u for u, q in enumerate(lock.params[0])
            if u != t and q.size and q.dtype == p.dtype and q.shape == p.shape]


def _group_of(lock, t):
    """(group index, position in the group) of flat parameter index t."""
    for gi, group in enumerate(lock.model.groups):
        if t < len(group["params"]):
            return gi, t
        t -= len(group["params"])
    raise IndexError(t)


def _bad_grad(kind, choice, lock, k, base, t):
    """(bad gradient for parameter t of optimizer k, label), or (None, None) if n/a."""
    p, g = lock.params[k][t], base[t]
    if choice is None:
        return None, None
    if kind == "dtype":
        with quiet():
            return np.ascontiguousarray(native(g).astype(choice)), f"dtype {choice}"
    if kind == "shape":
        return np.zeros(choice, p.dtype), "shape"
    if kind == "layout":
        return lay_out(native(g), choice, Mem()), f"layout {choice}"
    if kind == "not_array":
        return (native(g).tolist() if choice == "list" else choice), "not an ndarray"
    if kind == "is_param":
        return (p if p.size else None), "grad is its parameter"
    if kind == "view_of_param":
        return (p.view(np.ndarray).reshape(p.shape) if p.size else None), \
            "grad is a view of its parameter"
    if kind == "overlaps_param":
        base_arr = p.base
        while isinstance(base_arr, np.ndarray) and isinstance(base_arr.base, np.ndarray):
            base_arr = base_arr.base
        if not isinstance(base_arr, np.ndarray) or p.size < 2 or base_arr.ndim != 1 \
                or base_arr.dtype != p.dtype:
            return None, None
        start = (p.__array_interface__["data"][0]
                 - base_arr.__array_interface__["data"][0]) // p.itemsize
        for shift in (1, -1):
            lo = start + shift
            if 0 <= lo and lo + p.size <= base_arr.size:
                return base_arr[lo:lo + p.size].reshape(p.shape), \
                    "grad partially overlaps its parameter"
        return None, None
    if kind == "is_state":
        return lock.opts[k].state[t][choice], "grad is one of its state buffers"
    if kind == "is_other_param":
        return lock.params[k][choice], "grad is another parameter"
    if kind == "is_other_state":
        return lock.opts[k].state[choice[0]][choice[1]], "grad is another parameter's state"
    raise AssertionError(kind)


def _bad_structure(data, lock, base):
    n = lock.count
    options = ["short", "long", "None", "ndarray", "generator", "str", "int", "set"]
    if lock.named:
        options += ["dict_missing", "dict_extra", "dict_nonstr"]
    else:
        options += ["dict_unnamed"]
    kind = data.draw(st.sampled_from(options), label="structure")

    def make(grads):
        if kind == "short":
            return list(grads[:-1])
        if kind == "long":
            return list(grads) + [None]
        if kind == "None":
            return None
        if kind == "ndarray":
            return np.zeros(n)
        if kind == "generator":
            return (g for g in grads)
        if kind == "str":
            return "grads"
        if kind == "int":
            return 0
        if kind == "set":
            return {1, 2}
        if kind == "dict_unnamed":
            return {str(i): g for i, g in enumerate(grads)}
        d = dict(zip(lock.names, grads))
        if kind == "dict_missing":
            d.pop(lock.names[-1])
        elif kind == "dict_extra":
            d["no such parameter"] = None
        else:
            d[0] = None
        return d
    return make, f"grads container: {kind}"


@cases(300)
@given(data=st.data())
def test_optimizer_steps_match_reference_or_refuse_cleanly(data):
    """Optimizer sequences: valid steps match the numpy backend and the model bit
    for bit; invalid steps, edits and state changes are refused with nothing
    modified, and the optimizer carries on correctly afterwards."""
    name = data.draw(st.sampled_from(sorted(OPTIMIZERS)), label="optimizer")
    kinds = GROUP_KINDS[name]
    setup = data.draw(param_setups(), label="setup")
    kwargs = {}
    for k in sorted(OPTIMIZERS[name][2]):
        if data.draw(st.booleans()):
            kwargs[k] = data.draw(ok_value(kinds[k]), label=k)
    overrides = []
    for _ in setup:
        ov = {}
        for k in sorted(data.draw(st.sets(st.sampled_from(sorted(kinds)), max_size=2))):
            ov[k] = data.draw(ok_value(kinds[k]), label=f"group {k}")
        overrides.append(ov)
    merged = [{**DEFAULTS[name], **kwargs, **ov} for ov in overrides]
    if group_verdict(name, dict(DEFAULTS[name], **kwargs)) != OK or any(
            group_verdict(name, m) != OK for m in merged):
        # e.g. nesterov without momentum: construction must refuse (its own test covers it)
        arrays = build_params(setup)
        error = expect_clean_error(lambda: OPTIMIZERS[name][0](
            params_argument(setup, arrays, overrides, "list"), **kwargs))
        assert error is not None
        return
    # A setup torch's NAdam cannot step (it refuses at that step, not here).
    assume(not (name == "NAdam" and any(nadam_divides_by_zero(m) for m in merged)))
    # "fast" examples keep to what the cython fast path (one call per step,
    # cached screening) handles: list grads, every parameter with a gradient
    fast = data.draw(st.booleans(), label="fast-path style")
    skip = False if fast else data.draw(st.booleans(), label="skip_nonfinite")
    form = data.draw(st.sampled_from(["list", "list", "tuple", "iter", "groups"]), label="params form")
    lock = Lockstep(name, setup, overrides, kwargs, skip, form)
    lock.check("after construction")
    if lock.count == 0:
        return
    shapes = [p.shape for p in lock.params[0]]
    n_actions = data.draw(st.integers(2, 10), label="actions")
    for action_no in range(n_actions):
        if action_no == 0 and data.draw(st.integers(0, 3)):
            action = "step"  # usually start with state in place
        else:
            action = data.draw(st.sampled_from(["step"] * 5 + ["bad_step"] * 3 + ["edit"] * 2
                                               + ["state_edit", "bad_state", "bad_state",
                                                  "bad_param"]), label="action")
        dense = data.draw(st.integers(0, 9), label="every param has a grad") < (9 if fast else 5)
        spec = data.draw(grad_values(shapes, none_ok=not dense), label="grads")
        grads = build_grads(spec, lock.params[0])
        form_g = "list" if fast else data.draw(st.sampled_from(["list", "tuple", "dict"]))
        what = f"action {action_no} ({action})"
        if action == "step":
            lock.step(grads, form_g)
            lock.check(what)
            event("optimizer: valid step (matched)")
            continue
        with_grad = [i for i, g in enumerate(grads) if g is not None]
        if action == "bad_step":
            kind = data.draw(st.sampled_from(BAD_GRAD_KINDS), label="bad grad")
            if kind == "structure" or not with_grad:
                make, label = _bad_structure(data, lock, grads)
                event(f"bad step: {label}")
                lock.refused(lambda k, make=make, grads=grads: (
                    (lambda: lock.opts[k].step(make(grads))), grads), label)
                continue
            t = data.draw(st.sampled_from(with_grad), label="target")
            choice = _bad_grad_choice(data, kind, lock, grads, t)
            bad = [_bad_grad(kind, choice, lock, k, grads, t) for k in range(2)]
            if bad[0][0] is None or bad[1][0] is None:
                continue
            event(f"bad step: {bad[0][1]}")

            def make_call(k, t=t, bad=bad, grads=grads, form_g=form_g):
                gl = list(grads)
                gl[t] = bad[k][0]
                return (lambda: lock.opts[k].step(grads_container(gl, lock.names, form_g))), gl
            lock.refused(make_call, bad[0][1])
            lock.check(what + " (refused)")
            continue
        if action == "edit":
            _edit_action(data, lock, grads, form_g, what)
            continue
        if action == "state_edit":
            _state_edit_action(data, lock, grads, form_g, what)
            continue
        if not with_grad:
            continue
        t = data.draw(st.sampled_from(with_grad), label="target")
        if action == "bad_state":
            _bad_state_action(data, lock, grads, form_g, t, what)
        else:
            _bad_param_action(data, lock, grads, form_g, t, what)


def _edit_action(data, lock, grads, form_g, what):
    """Edit a group's hyperparameters (valid or not) between steps."""
    gi = data.draw(st.integers(0, len(lock.model.groups) - 1), label="group")
    kinds = GROUP_KINDS[lock.name]
    how = data.draw(st.sampled_from(["set", "set", "set", "update", "del", "plain_dict"]),
                    label="edit")
    key = data.draw(st.sampled_from(sorted(kinds)), label="key")
    wanted = data.draw(st.sampled_from([OK, OK, BAD]), label="edit verdict")
    value, _ = draw_hyper(data, kinds[key], wanted)
    groups = [opt.param_groups for opt in lock.opts]
    old = [g[gi].get(key) for g in groups]
    new_hyper = dict(lock.model.groups[gi]["hyper"])
    if how == "del":
        new_hyper.pop(key)
        verdict = BAD
        event("group edit: a hyperparameter deleted")
    elif how == "plain_dict":
        verdict = OK
        event("group edit: group replaced by a plain dict copy")
    else:
        new_hyper[key] = value
        verdict = group_verdict(lock.name, new_hyper)
        if verdict == BAD:
            if hyper_verdict(kinds[key], value) != BAD:
                event("group edit: bad combination (nesterov)")
        else:
            event(f"group edit: valid {key}")
    if verdict == EITHER:
        return
    for groups_, o in zip(groups, old):
        if how == "set":
            groups_[gi][key] = value
        elif how == "update":
            groups_[gi].update({key: value})
        elif how == "del":
            del groups_[gi][key]
        else:
            groups_[gi] = dict(groups_[gi])
    if verdict == OK:
        if how != "plain_dict":
            lock.model.groups[gi]["hyper"][key] = normalize(kinds[key], value)
        lock.step(grads, form_g)
        lock.check(what + " (valid edit, then a step)")
        return
    lock.refused(lambda k: ((lambda: lock.opts[k].step(grads_container(grads, lock.names, form_g))),
                            grads), "bad group edit")
    for groups_, o in zip(groups, old):  # undo, then the optimizer must carry on
        groups_[gi][key] = o
    lock.check(what + " (refused, undone)")


def _state_edit_action(data, lock, grads, form_g, what):
    """Valid changes to opt.state: step count, fresh buffer, dropped buffer, reset."""
    with_state = sorted(i for i in lock.model.state)
    how = data.draw(st.sampled_from(["step", "buffer", "drop", "reset_entry", "reset_all",
                                     "extra_key"]), label="state edit")
    if how == "reset_all":
        for opt in lock.opts:
            opt.state = {}
        lock.model.state = {}
        event("state edit: opt.state = {}")
    elif not with_state:
        return
    else:
        i = data.draw(st.sampled_from(with_state), label="param")
        entry = lock.model.state[i]
        bufs = [k for k in entry if isinstance(entry[k], np.ndarray)]
        if how == "step" and lock.model.rule != "sgd":
            # the largest count from which every later step of the run (at most
            # 10 actions) still fits int64; the regression test of B3 goes beyond
            top = 2 ** 63 - 2 - 10
            value = data.draw(st.one_of(st.integers(0, 5), st.integers(0, top)), label="step")
            for opt in lock.opts:
                opt.state[i]["step"] = value
            entry["step"] = value
        elif how == "buffer" and bufs:
            key = data.draw(st.sampled_from(bufs), label="buffer")
            values = draw_values(data, entry[key].shape, entry[key].dtype)
            for opt in lock.opts:
                opt.state[i][key] = values.copy()
            entry[key] = values.copy()
        elif how == "drop" and bufs:
            key = data.draw(st.sampled_from(bufs), label="buffer")
            for opt in lock.opts:
                del opt.state[i][key]
            del entry[key]
        elif how == "reset_entry":
            for opt in lock.opts:
                del opt.state[i]
            del lock.model.state[i]
        elif how == "extra_key":
            for opt in lock.opts:
                opt.state[i]["note"] = "ignored"
            entry["note"] = "ignored"
        else:
            return
        event(f"state edit: {how}")
    lock.step(grads, form_g)
    lock.check(what + f" (state edit {how}, then a step)")


def set_shape_in_place(a, shape):
    """Reshape ``a`` itself, as a user's ``a.shape = ...`` does (NumPy >= 2.5 deprecates it;
    the property is that fastopt notices, so the warning is not the point here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        a.shape = shape


def _bad_state_action(data, lock, grads, form_g, t, what):
    """Corrupt parameter t's state; the step must refuse; undo; carry on."""
    kind = data.draw(st.sampled_from(BAD_STATE_KINDS), label="bad state")
    if "step" not in spec.rule(lock.model.rule).scalars and kind == "step":  # SGD
        kind = "entry_not_dict"
    entries = [opt.state.get(t) for opt in lock.opts]
    bufs = sorted(k for k in (entries[0] or {}) if isinstance(entries[0][k], np.ndarray))
    needs_buf = kind.startswith("buffer")
    if needs_buf and not bufs:
        return
    key = data.draw(st.sampled_from(bufs), label="buffer") if needs_buf else None
    if kind == "buffer_is_buffer" and len(bufs) < 2:
        return
    other = data.draw(st.sampled_from([b for b in bufs if b != key]), label="other") \
        if kind == "buffer_is_buffer" else None
    step_value = data.draw(st.sampled_from([-1, -2 ** 40, 1.5, 2.0, "3", True, np.int64(3),
                                            [1], NAN, None, 2 ** 63 - 1, 2 ** 63, 10 ** 30]),
                           label="step") if kind == "step" else None
    twins = [u for u in _twins(lock, t) if kind != "buffer_of_other_param" or any(
        isinstance(b, np.ndarray) for b in (lock.opts[0].state.get(u) or {}).values())]
    if kind in ("buffer_is_other_param", "buffer_of_other_param"):
        if not twins:
            return
        u = data.draw(st.sampled_from(twins), label="other param")
        other_key = data.draw(st.sampled_from(sorted(
            k for k, b in lock.opts[0].state[u].items() if isinstance(b, np.ndarray))),
            label="other buffer") if kind == "buffer_of_other_param" else None
    dtype_new = data.draw(st.sampled_from(BAD_DTYPES + SWAPPED), label="dtype") \
        if kind == "buffer_dtype" else None
    layout = data.draw(st.sampled_from(NONCONTIG_LAYOUTS), label="layout") \
        if kind == "buffer_layout" else None
    junk = data.draw(st.sampled_from(["x", 5, [1.0], None, (1,)]), label="junk") \
        if kind == "entry_not_dict" else None
    if kind == "entry_not_dict" and junk is None:
        junk = "x"   # None as an entry means "no state" (valid): use a str
    undo = []
    in_place = []  # undo of changes made to a buffer itself
    for k, opt in enumerate(lock.opts):
        entry = opt.state.get(t)
        p = lock.params[k][t]
        if kind == "entry_not_dict":
            undo.append((opt.state, t, entry))
            opt.state[t] = junk
            continue
        if entry is None:
            return
        old = entry.get(key if key else "step")
        undo.append((entry, key if key else "step", old))
        if kind == "step":
            entry["step"] = step_value
        elif kind == "buffer_dtype":
            with quiet():
                entry[key] = np.ascontiguousarray(old.astype(dtype_new))
        elif kind == "buffer_shape":
            entry[key] = np.zeros((1,) + old.shape, old.dtype)
        elif kind == "buffer_layout":
            new = lay_out(native(old), layout, Mem())
            if new.flags.c_contiguous:
                undo.pop()
                return
            entry[key] = new
        elif kind == "buffer_readonly":
            new = old.copy()
            new.flags.writeable = False
            entry[key] = new
        elif kind == "buffer_not_array":
            entry[key] = old.tolist()
        elif kind == "buffer_is_param":
            if p.size == 0:
                undo.pop()
                return
            entry[key] = p
        elif kind == "buffer_is_grad":
            if p.size == 0:
                undo.pop()
                return
            entry[key] = grads[t]
        elif kind == "buffer_is_other_param":
            entry[key] = lock.params[k][u]
        elif kind == "buffer_of_other_param":
            entry[key] = opt.state[u][other_key]
        elif kind in ("buffer_readonly_in_place", "buffer_reshaped_in_place"):
            # changed in place: the state dict sees no edit
            undo.pop()
            if old.size == 0 or kind.endswith("reshaped_in_place") and old.ndim == 0:
                return
            if kind == "buffer_readonly_in_place":
                old.flags.writeable = False
                in_place.append(lambda old=old: setattr(old.flags, "writeable", True))
            else:
                shape = old.shape
                set_shape_in_place(old, (1,) + shape)
                in_place.append(lambda old=old, shape=shape: set_shape_in_place(old, shape))
        else:
            if p.size == 0:  # empty buffers overlap nothing: not an error
                undo.pop()
                return
            entry[key] = entry[other]
    event(f"bad state: {kind}")
    lock.refused(lambda k: ((lambda: lock.opts[k].step(grads_container(grads, lock.names, form_g))),
                            grads), f"bad state {kind}")
    for container, key_, old in undo:
        if old is None and key_ not in container:
            continue
        if old is None:
            del container[key_]
        else:
            container[key_] = old
    for restore in in_place:
        restore()
    lock.check(what + " (refused, undone)")


def _bad_param_action(data, lock, grads, form_g, t, what):
    """Make parameter t unusable after construction; the step must refuse."""
    kind = data.draw(st.sampled_from(["readonly", "swap_readonly", "swap_noncontig", "swap_dtype",
                                      "swap_not_array", "swap_in_place"]), label="bad param")
    gi, j = _group_of(lock, t)
    undo = []
    for k, opt in enumerate(lock.opts):
        p = lock.params[k][t]
        group = opt.param_groups[gi]
        if kind == "readonly":
            p.flags.writeable = False
            undo.append(lambda p=p: setattr(p.flags, "writeable", True))
            continue
        if kind == "swap_readonly":
            bad = p.copy()
            bad.flags.writeable = False
        elif kind == "swap_noncontig":
            bad = lay_out(native(p), "step_last", Mem())
            if bad.flags.c_contiguous:
                return
        elif kind == "swap_dtype":
            with quiet():
                bad = p.astype(np.int32) if p.size else p.astype(np.float16)
        elif kind == "swap_not_array":
            bad = native(p).tolist()
        else:  # in-place list mutation, which ParamGroup cannot notice
            bad = p.copy()
            bad.flags.writeable = False
        old_list = group["params"]
        if kind == "swap_in_place":
            old_list[j] = bad
            undo.append(lambda lst=old_list, j=j, p=p: lst.__setitem__(j, p))
        else:
            new_list = list(old_list)
            new_list[j] = bad
            group["params"] = new_list
            undo.append(lambda group=group, old=old_list: group.__setitem__("params", old))
    event(f"bad param after construction: {kind}")
    # the arrays the step could touch are the original ones (the bad ones are copies)
    lock.refused(lambda k: ((lambda: lock.opts[k].step(grads_container(grads, lock.names, form_g))),
                            grads), f"bad param {kind}")
    for u in undo:
        u()
    lock.check(what + " (refused, undone)")


# ------------------------------------------------------- construction, groups

def _draw_param_arrays(data, n, mode, mem, existing):
    """n parameter arrays (plus events); mode "arrays"/"mixed" makes some bad."""
    arrays = []
    for _ in range(n):
        values = draw_float_array(data, SMALL_SHAPES)
        layouts = VALID_LAYOUTS
        if mode in ("arrays", "mixed") and data.draw(st.integers(0, 2)) == 0:
            kind = data.draw(st.sampled_from(["layout", "dtype", "not_array"]), label="bad array")
            if kind == "layout":
                layout = data.draw(st.sampled_from(NONCONTIG_LAYOUTS + OTHER_LAYOUTS), label="layout")
                a = lay_out(values, layout, mem)
                event(f"construction: param layout {layout}"
                      + ("" if array_verdict(a, True) == BAD else " (still valid)"))
            elif kind == "dtype":
                with quiet():
                    a = values.astype(data.draw(st.sampled_from(PARAM_BAD_DTYPES),
                                                label="bad dtype"))
                event(f"construction: param dtype {a.dtype}")
            else:
                a = data.draw(st.sampled_from([values.tolist(), 1.0, None, "w"]), label="junk")
                event("construction: param not an ndarray")
        else:
            a = lay_out(values, data.draw(st.sampled_from(layouts), label="layout"), mem)
        arrays.append(a)
    if mode in ("aliasing", "mixed") and (arrays or existing):
        pool = [a for a in arrays + existing if isinstance(a, np.ndarray)]
        kind = data.draw(st.sampled_from(["same_array", "view", "overlap", "adjacent",
                                          "empty_views"]), label="aliasing")
        if kind == "same_array" and pool:
            arrays.append(data.draw(st.sampled_from(pool), label="again"))
        elif kind == "view" and pool:
            a = data.draw(st.sampled_from(pool), label="viewed")
            arrays.append(a.view(np.ndarray) if a.ndim == 0 else a.reshape(-1)[:a.size].reshape(a.shape)
                          if a.flags.c_contiguous else a[...])
        elif kind in ("overlap", "adjacent"):
            n_el = data.draw(st.integers(1, 9), label="size")
            shift = data.draw(st.integers(1, n_el), label="shift") if kind == "overlap" else n_el
            dtype = data.draw(st.sampled_from(FLOATS))
            buf = np.zeros(n_el + shift, dtype)
            arrays += [buf[:n_el], buf[shift:shift + n_el]]
        else:
            buf = np.zeros(4)
            arrays += [buf[:0], buf[2:2]]
        event(f"construction: aliasing {kind}")
    return arrays


def _params_spec_verdict(all_arrays):
    """README: each parameter a C-contiguous writeable float array, given once."""
    verdicts = [array_verdict(a, True) for a in all_arrays]
    if combine(*verdicts) == BAD:
        return BAD
    seen = set()
    for a in all_arrays:
        if id(a) in seen:
            return BAD
        seen.add(id(a))
    live = [a for a in all_arrays if a.size]
    for i, a in enumerate(live):
        for b in live[i + 1:]:
            if overlaps(a, b):
                return BAD
    return combine(*verdicts)


def _draw_override(data, name, mode):
    kinds = GROUP_KINDS[name]
    ov = {}
    for k in sorted(data.draw(st.sets(st.sampled_from(sorted(kinds)), max_size=3), label="keys")):
        wanted = OK
        if mode in ("hyper", "mixed") and data.draw(st.integers(0, 2)) == 0:
            wanted = BAD
        elif data.draw(st.integers(0, 15)) == 0:
            wanted = EITHER
        ov[k], _ = draw_hyper(data, kinds[k], wanted)
    if data.draw(st.integers(0, 5)) == 0:
        ov["note"] = "kept"  # an unknown key: kept as it is
    return ov


def _check_constructed(opt, name, groups_spec, defaults):
    """param_groups as documented: same arrays, normalised hyperparameters, no state."""
    kinds = GROUP_KINDS[name]
    assert len(opt.param_groups) == len(groups_spec)
    for group, (arrays, names, ov) in zip(opt.param_groups, groups_spec):
        assert len(group["params"]) == len(arrays)
        assert all(a is b for a, b in zip(group["params"], arrays))
        if names is not None:
            assert group["param_names"] == names
        for k, kind in kinds.items():
            expected = normalize(kind, ov[k]) if k in ov else defaults[k]
            assert normalize(kind, group[k]) == expected, k
        if "note" in ov:
            assert group["note"] == "kept"
    assert len(opt.state) == 0


def _model_from(opt, name):
    groups = []
    for group in opt.param_groups:
        hyper = {k: group[k] for k in GROUP_KINDS[name]}
        groups.append(dict(params=[native(p) for p in group["params"]], hyper=hyper))
    model = ModelOptimizer(name, groups, opt.skip_nonfinite)
    model.state = {i: {k: native(v) if isinstance(v, np.ndarray) else v for k, v in entry.items()}
                   for i, entry in opt.state.items()}
    model.skipped = opt.skipped_steps
    return model


def _random_grads(data, params):
    grads = []
    for p in params:
        if data.draw(st.integers(0, 4)) == 0:
            grads.append(None)
        else:
            grads.append(draw_values(data, p.shape, native(p).dtype))
    return grads


def _step_and_compare(data, opt, name):
    """One step of an accepted optimizer against the model built from its groups."""
    model = _model_from(opt, name)
    params = [p for g in opt.param_groups for p in g["params"]]
    grads = _random_grads(data, params)
    with quiet():
        opt.step(grads)
    model.step(grads)
    assert_matches_model(opt, params, model, "first step")


@cases(250)
@given(data=st.data())
def test_optimizer_construction_accepts_valid_and_refuses_invalid(data):
    """Constructors: params as list/tuple/iterator/dict/groups, every hyperparameter,
    backend and skip_nonfinite; valid ones are normalised and step correctly."""
    name = data.draw(st.sampled_from(sorted(OPTIMIZERS)), label="optimizer")
    cls, _, kinds = OPTIMIZERS[name]
    mode = data.draw(st.sampled_from(["valid"] * 3 + ["hyper", "arrays", "aliasing", "structure",
                                                      "options", "mixed"]), label="mode")
    event(f"construction mode: {mode}")
    verdicts = []
    kwargs = {}
    for k in sorted(kinds):
        if data.draw(st.booleans()):
            wanted = OK
            if mode in ("hyper", "mixed") and data.draw(st.integers(0, 3)) == 0:
                wanted = BAD
            elif data.draw(st.integers(0, 20)) == 0:
                wanted = EITHER
            kwargs[k], _ = draw_hyper(data, kinds[k], wanted)
    if name == "SGD" and mode in ("hyper", "valid") and data.draw(st.integers(0, 3)) == 0:
        kwargs["nesterov"] = True
        if mode == "valid":
            kwargs["momentum"], kwargs["dampening"] = 0.9, 0.0
        else:
            event("construction: nesterov without momentum/dampening 0")
    verdicts.append(group_verdict(name, {**DEFAULTS[name], **kwargs}))
    options = {}
    if mode in ("options", "mixed"):
        which = data.draw(st.sampled_from(["backend", "skip_nonfinite"]), label="option")
        if which == "backend":
            options["backend"] = data.draw(st.sampled_from(["torch", None, 1, "CYTHON", "", ["numpy"]]))
        else:
            options["skip_nonfinite"] = data.draw(st.sampled_from(_BAD_VALUES["flag"]))
        event(f"construction: bad {which}")
        verdicts.append(BAD)
    else:
        options["backend"] = data.draw(st.sampled_from(["cython", "numpy", np.str_("cython")]))
        options["skip_nonfinite"] = data.draw(st.sampled_from(_OK_VALUES["flag"]))

    mem = Mem()
    n_groups = data.draw(st.integers(1, 3), label="groups")
    named = data.draw(st.booleans(), label="named")
    groups_spec = []
    all_arrays = []
    group_dicts = []
    used = []
    for gi in range(n_groups):
        used_before = list(used)  # a name repeated inside one dict would just collapse
        arrays = _draw_param_arrays(data, data.draw(st.integers(0, 3), label="n"), mode, mem,
                                    [a for a in all_arrays if isinstance(a, np.ndarray)])
        all_arrays += arrays
        names = None
        if named:
            names = []
            for _ in arrays:
                nm = data.draw(st.sampled_from(NAME_POOL), label="name") + str(len(used))
                if used_before and mode in ("structure", "mixed") and data.draw(st.integers(0, 5)) == 0:
                    nm = data.draw(st.sampled_from(used_before))
                    event("construction: a name used twice")
                used.append(nm)
                names.append(nm)
        ov = _draw_override(data, name, mode)
        merged = {**DEFAULTS[name], **kwargs,
                  **{k: v for k, v in ov.items() if k in GROUP_KINDS[name]}}
        gv = group_verdict(name, merged)
        # a valid setup torch's NAdam cannot step (refused at the step: test_nadam)
        assume(not (gv == OK and name == "NAdam" and nadam_divides_by_zero(merged)))
        verdicts.append(gv)
        groups_spec.append((arrays, names, ov))
        ps = dict(zip(names, arrays)) if named else arrays
        group_dicts.append(dict(ov, params=ps))
    if named and len(set(used)) != len(used):
        verdicts.append(BAD)
    verdicts.append(_params_spec_verdict(all_arrays) if all(isinstance(a, np.ndarray) for a in all_arrays)
                    else BAD)

    # the params argument itself
    form = "groups"
    if n_groups == 1 and not groups_spec[0][2]:
        form = data.draw(st.sampled_from(["plain", "groups", "tuple", "iter"]), label="form")
    arrays0, names0, _ = groups_spec[0]
    if form == "plain":
        params = dict(zip(names0, arrays0)) if named else list(arrays0)
        if not named and not arrays0:
            verdicts.append(BAD)  # an empty parameter list
        if named and not arrays0:
            verdicts.append(EITHER)  # an empty dict: torch refuses, fastopt may accept
    elif form == "tuple" and not named:
        params = tuple(arrays0)
        if not arrays0:
            verdicts.append(BAD)
    elif form == "iter" and not named:
        params = iter(list(arrays0))
        if not arrays0:
            verdicts.append(BAD)
    else:
        form = "groups"
        params = group_dicts
    if mode in ("structure", "mixed") and data.draw(st.booleans()):
        kind = data.draw(st.sampled_from(["ndarray", "none", "int", "str", "mixed", "no_params",
                                          "group_not_dict", "names_mixed", "nonstr_name"]),
                         label="structure")
        event(f"construction: params structure {kind}")
        verdicts.append(BAD)
        if kind == "ndarray":
            params = np.zeros(3)
        elif kind == "none":
            params = None
        elif kind == "int":
            params = 3
        elif kind == "str":
            params = "abc"
        elif kind == "mixed":
            params = [np.zeros(2), {"params": [np.zeros(2)]}]
        elif kind == "no_params":
            params = group_dicts + [{"lr": 0.1}]
        elif kind == "group_not_dict":
            params = group_dicts + ["group"]
        elif kind == "names_mixed":
            other = {"x_other": np.zeros(2)} if not named else [np.zeros(2)]
            params = group_dicts + [{"params": other}]
        else:
            params = group_dicts + [{"params": {3: np.zeros(2)}}]
    verdict = combine(*verdicts)
    note(f"verdict={verdict} form={form} kwargs={kwargs} options={options}")
    event(f"construction verdict: {verdict}")
    mem.own(*[a for a in all_arrays if isinstance(a, np.ndarray)])
    accepted, opt = settle(lambda: cls(params, **kwargs, **options), verdict, mem, "construction")
    if not accepted:
        return
    event("construction outcome: accepted")
    defaults = {k: normalize(kind, v) for k, v in {**DEFAULTS[name], **kwargs}.items()
                for kind in [GROUP_KINDS[name][k]]}
    _check_constructed(opt, name, groups_spec, defaults)
    if all(g["params"] for g in opt.param_groups) or any(g["params"] for g in opt.param_groups):
        _step_and_compare(data, opt, name)


@cases(150)
@given(data=st.data())
def test_add_param_group_appends_or_changes_nothing(data):
    """add_param_group: a valid group is appended (and steps correctly); a bad one
    (overlapping or repeated arrays, name clashes, bad hyperparameters...) is
    refused and the optimizer is exactly as before."""
    name = data.draw(st.sampled_from(sorted(OPTIMIZERS)), label="optimizer")
    cls = OPTIMIZERS[name][0]
    named = data.draw(st.booleans(), label="named")
    mem = Mem()
    first = _draw_param_arrays(data, data.draw(st.integers(1, 3)), "valid", mem, [])
    names = [f"p{i}" for i in range(len(first))]
    backend = data.draw(st.sampled_from(["cython", "numpy"]))
    opt = cls(dict(zip(names, first)) if named else first, backend=backend)
    if data.draw(st.booleans()):
        with quiet():
            opt.step([make_values(1, p.shape, p.dtype, "normal") for p in first])
    mode = data.draw(st.sampled_from(["valid"] * 3 + ["hyper", "arrays", "aliasing", "structure",
                                                      "mixed"]), label="mode")
    event(f"add_param_group mode: {mode}")
    arrays = _draw_param_arrays(data, data.draw(st.integers(0, 3)), mode, mem, list(first))
    ov = _draw_override(data, name, mode)
    verdicts = [group_verdict(name, {**DEFAULTS[name], **{k: v for k, v in ov.items() if k in GROUP_KINDS[name]}})]
    verdicts.append(_params_spec_verdict(first + arrays)
                    if all(isinstance(a, np.ndarray) for a in arrays) else BAD)
    new_names = [f"q{i}" for i in range(len(arrays))]
    group = dict(ov, params=dict(zip(new_names, arrays)) if named else arrays)
    if mode in ("structure", "mixed") and data.draw(st.booleans()):
        kind = data.draw(st.sampled_from(["not_dict", "no_params", "name_clash", "names_mixed",
                                          "nonstr_name"]), label="structure")
        if kind in ("name_clash", "nonstr_name") and not named:
            kind = "names_mixed"
        event(f"add_param_group: {kind}")
        verdicts = [BAD]
        if kind == "not_dict":
            group = data.draw(st.sampled_from([[np.zeros(2)], "group", None, np.zeros(2)]))
        elif kind == "no_params":
            group = {k: v for k, v in group.items() if k != "params"}
        elif kind == "name_clash":
            group = dict(ov, params={names[0]: np.zeros(2)})
        elif kind == "names_mixed":
            group = dict(ov, params=[np.zeros(2)] if named else {"x": np.zeros(2)})
        else:
            group = dict(ov, params={1: np.zeros(2)})
    verdict = combine(*verdicts)
    note(f"verdict={verdict}")
    before_groups = [(g, dict(g), list(g["params"])) for g in opt.param_groups]
    snap = opt_snapshot(opt, first, [])
    mem.own(*[a for a in arrays if isinstance(a, np.ndarray)])
    error = expect_clean_error(lambda: opt.add_param_group(group))
    if error is not None:
        assert verdict != OK, f"valid group refused: {error!r}"
        assert len(opt.param_groups) == len(before_groups)
        for g, content, plist in before_groups:
            assert dict(g) == content or all(g[k] is v for k, v in content.items())
        assert_snapshot(opt, snap)
        mem.assert_untouched()
        event("add_param_group outcome: refused cleanly")
        _step_and_compare(data, opt, name)  # the optimizer still works
        return
    assert verdict != BAD, "invalid group accepted"
    event("add_param_group outcome: appended")
    defaults = {k: normalize(GROUP_KINDS[name][k], v) for k, v in DEFAULTS[name].items()}
    spec = [(list(g["params"]), g.get("param_names"), {}) for g in opt.param_groups[:-1]]
    spec.append((arrays, new_names if named else None, ov))
    if not opt.state:
        _check_constructed(opt, name, spec, defaults)
        _step_and_compare(data, opt, name)


# ---------------------------------------------------------------- FlatParams

@cases(150)
@given(data=st.data())
def test_flat_params_packs_aligned_views_or_refuses(data):
    """FlatParams: aligned buffers, views in order with the values copied in, zero
    padding that an optimizer step keeps at zero, segments; or a clean refusal."""
    mode = data.draw(st.sampled_from(["valid"] * 4 + ["dtype", "items", "structure", "values"]),
                     label="mode")
    event(f"FlatParams mode: {mode}")
    n = data.draw(st.integers(1, 5), label="n")
    items, verdicts = {}, []
    mem = Mem()
    for i in range(n):
        nm = data.draw(st.sampled_from(NAME_POOL), label="name") + str(i)
        kind = data.draw(st.sampled_from(["array", "array", "shape"]), label="item")
        if kind == "shape":
            items[nm] = data.draw(st.one_of(SMALL_SHAPES, st.sampled_from([(16383,), (5, 7, 3)])))
        else:
            shape = data.draw(st.one_of(SMALL_SHAPES, LARGE_SHAPES), label="shape")
            dtype = data.draw(st.sampled_from(list(FLOATS) + [np.dtype(np.int32), np.dtype(np.bool_),
                                                              np.dtype(np.float16)]))
            values = draw_values(data, shape, dtype)
            layout = data.draw(st.sampled_from(VALID_LAYOUTS + NONCONTIG_LAYOUTS + OTHER_LAYOUTS))
            items[nm] = lay_out(values, layout, mem)
    dtype_arg = data.draw(st.sampled_from([None, None, np.float32, np.float64, "float32", "f8",
                                           np.dtype(np.float64)]), label="dtype")
    if mode == "dtype":
        dtype_arg = data.draw(st.sampled_from([np.int32, ">f8", "nonsense", 5, np.float16, object,
                                               np.complex64, "float128"]))
        event(f"FlatParams bad dtype: {dtype_arg!r}")
        verdicts.append(BAD)
    if mode == "items":
        nm = data.draw(st.sampled_from(sorted(items)))
        items[nm] = data.draw(st.sampled_from([[3], (-1,), (1.5,), (np.int64(2),), None, "abc", 3,
                                               (3, None), {"shape": 3}]))
        event(f"FlatParams bad item: {type(items[nm]).__name__}")
        verdicts.append(BAD)
    if mode == "values":
        nm = data.draw(st.sampled_from(sorted(items)))
        items[nm] = np.array(["1.5", "x"] if data.draw(st.booleans()) else [1.0, "x"], dtype=object)
        dtype_arg = np.float64
        event("FlatParams: values that do not convert to float")
        verdicts.append(BAD)
    arg = items
    if mode == "structure":
        arg = data.draw(st.sampled_from(["list", "empty", "nonstr", "none", "ndarray"]))
        event(f"FlatParams bad structure: {arg}")
        arg = {"list": list(items.values()), "empty": {}, "nonstr": {1: (2,)}, "none": None,
               "ndarray": np.zeros(3)}[arg]
        verdicts.append(BAD)
    # the dtype the buffer must get
    arrays_in = [v for v in items.values() if isinstance(v, np.ndarray)]
    target = None
    try:
        if dtype_arg is None:
            target = np.result_type(*arrays_in) if arrays_in else np.dtype(np.float64)
        else:
            target = np.dtype(dtype_arg)
    except TypeError:
        verdicts.append(BAD)
    if target is not None and target not in FLOATS:
        swapped = target.kind == "f" and target.newbyteorder() in FLOATS and dtype_arg is None
        verdicts.append(EITHER if swapped else BAD)
    for v in items.values():
        if not isinstance(v, np.ndarray) and not (isinstance(v, tuple) and all(
                type(d) is int and d >= 0 for d in v)):
            verdicts.append(BAD)
    verdict = combine(*verdicts)
    note(f"verdict={verdict} dtype={dtype_arg!r}")
    mem.own(*arrays_in)
    accepted, flat = settle(lambda: fastopt.FlatParams(arg, dtype=dtype_arg), verdict, mem,
                            "FlatParams")
    if not accepted:
        return
    event("FlatParams outcome: built")
    mem.assert_untouched()  # the inputs are copied, never written
    for buf in (flat.data, flat.grad):
        assert buf.ndim == 1 and buf.dtype == target and buf.flags.c_contiguous
        assert buf.ctypes.data % 64 == 0 or buf.size == 0
    assert list(flat.params) == list(items) == list(flat.grads)
    covered = np.zeros(flat.data.size, bool)
    starts = []
    for nm, item in items.items():
        view, gview = flat.params[nm], flat.grads[nm]
        shape = item.shape if isinstance(item, np.ndarray) else item
        assert view.shape == shape and gview.shape == shape
        assert view.dtype == target and view.flags.c_contiguous and view.flags.writeable
        assert np.shares_memory(view, flat.data) or view.size == 0
        start = (view.ctypes.data - flat.data.ctypes.data) // target.itemsize
        if view.size:  # (an empty view's address means nothing)
            assert view.ctypes.data % 64 == 0
            assert gview.ctypes.data - flat.grad.ctypes.data == view.ctypes.data - flat.data.ctypes.data
            assert not covered[start:start + view.size].any(), "views overlap"
            covered[start:start + view.size] = True
            starts.append(start)
        else:
            starts.append(None)
        expected = np.zeros(shape, target)
        if isinstance(item, np.ndarray):
            with quiet():
                expected[...] = item
        assert_same_numbers(view, expected, nm)
        assert not gview.any()
    placed = [s for s in starts if s is not None]
    assert placed == sorted(placed), "views are not in the order given"
    assert not flat.data[~covered].any() and not flat.grad[~covered].any(), "padding is not zero"
    # segments
    names = list(items)
    i = data.draw(st.integers(0, n - 1))
    j = data.draw(st.integers(i, n - 1))
    seg_names = names[i:j + 1]
    if data.draw(st.booleans()):
        seg_names = seg_names[::-1]
    d, g = flat.segment(*seg_names)
    inside = [s for s in starts[i:j + 1] if s is not None]
    after = [s for s in starts[j + 1:] if s is not None]
    assert d.size == g.size
    assert np.shares_memory(d, flat.data) or d.size == 0
    if inside:  # the segment starts at its first array and runs to the next one
        assert d.ctypes.data == flat.data.ctypes.data + inside[0] * target.itemsize
        assert g.ctypes.data == flat.grad.ctypes.data + inside[0] * target.itemsize
        end = after[0] if after else flat.data.size
        assert d.size == end - inside[0]
    seg_cover = np.zeros(flat.data.size, bool)
    if d.size:
        lo = (d.ctypes.data - flat.data.ctypes.data) // target.itemsize
        seg_cover[lo:lo + d.size] = True
    for nm in seg_names:
        v = flat.params[nm]
        if v.size:
            s = (v.ctypes.data - flat.data.ctypes.data) // target.itemsize
            assert seg_cover[s:s + v.size].all(), "a segment misses one of its arrays"
    for bad in ([], ["no such array"], [names[0], names[2]] if n >= 3 else [["unhashable"]]):
        assert expect_clean_error(lambda bad=bad: flat.segment(*bad)) is not None
    # a step on the flat buffer: matches the model, and keeps the padding at zero
    oname = data.draw(st.sampled_from(sorted(OPTIMIZERS)), label="optimizer")
    kw = {"lr": data.draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 100.0]))}
    if "weight_decay" in DEFAULTS[oname]:  # (Rprop has none)
        kw["weight_decay"] = data.draw(st.sampled_from([0.0, 0.01, 1.0]))
    opt = OPTIMIZERS[oname][0]([flat.data], **kw)
    model = ModelOptimizer(oname, [dict(params=[flat.data.copy()], hyper={
        k: normalize(GROUP_KINDS[oname][k], v) for k, v in {**DEFAULTS[oname], **kw}.items()})],
        False)
    for nm in names:
        flat.grads[nm][...] = draw_values(data, flat.grads[nm].shape, target)
    for _ in range(2):
        with quiet():
            opt.step([flat.grad])
        model.step([flat.grad])
        assert_matches_model(opt, [flat.data], model, "FlatParams step")
    if not spec.rule(oname).whole_arrays:
        # (Lamb's one trust ratio covers the whole buffer, padding included:
        # a NaN anywhere in it turns the padding's zero step into NaN.)
        assert not flat.data[~covered].any(), "a step moved the padding"


# ---------------------------------------------------------------- clipping

def _exact_norm(arrays):
    """sqrt(sum of squares), computed without overflow and accurately (fsum)."""
    vals = [native(a).astype(np.float64).ravel() for a in arrays]
    vals = [v for v in vals if v.size]
    if not vals:
        return 0.0, 0.0
    scale = max(float(np.max(np.abs(v))) for v in vals)
    if scale == 0.0:
        return 0.0, 0.0
    total = math.fsum(math.fsum((v / scale) ** 2) for v in vals)
    # returns (norm, log2 of the sum of squares) so callers can tell an overflow
    return scale * math.sqrt(total), 2 * math.log2(scale) + math.log2(total)


def _grads_for_clip(data, writeable_needed):
    """A grads argument (array/list/tuple/dict with None entries) and its arrays."""
    mode = data.draw(st.sampled_from(["valid"] * 3 + ["arrays", "aliasing", "container"]),
                     label="mode")
    mem = Mem()
    n = data.draw(st.integers(0, 4), label="n")
    arrays = []
    for _ in range(n):
        values = draw_float_array(data, SHAPES)
        layouts = VALID_LAYOUTS + ("readonly",)
        if mode == "arrays" and data.draw(st.booleans()):
            layouts = NONCONTIG_LAYOUTS + OTHER_LAYOUTS
            if data.draw(st.booleans()):
                with quiet():
                    values = values.astype(data.draw(st.sampled_from(BAD_DTYPES)))
        arrays.append(lay_out(values, data.draw(st.sampled_from(layouts), label="layout"), mem))
    if mode == "aliasing" and arrays:
        kind = data.draw(st.sampled_from(["same", "overlap", "adjacent"]), label="aliasing")
        if kind == "same":
            arrays.append(arrays[0])
        else:
            m = data.draw(st.integers(1, 9))
            shift = data.draw(st.integers(1, m)) if kind == "overlap" else m
            buf = make_values(3, (m + shift,), np.float64, "normal")
            arrays += [buf[:m], buf[shift:shift + m]]
        event(f"clip: aliasing {kind}")
    entries = list(arrays)
    if entries and data.draw(st.booleans()):
        entries.insert(data.draw(st.integers(0, len(entries))), None)
    form = data.draw(st.sampled_from(["list", "tuple", "dict", "array"]), label="form")
    if form == "array" and len(arrays) == 1:
        arg = arrays[0]
    elif form == "dict":
        arg = {f"g{i}": a for i, a in enumerate(entries)}
    elif form == "tuple":
        arg = tuple(entries)
    else:
        arg = entries
    verdicts = []
    if mode == "container":
        arg = data.draw(st.sampled_from([None, 3, "grads", {1, 2}, iter([]), 1.5]))
        event(f"clip: bad container {type(arg).__name__}")
        verdicts.append(BAD)
    verdicts += [array_verdict(a, writeable_needed) for a in arrays]
    if writeable_needed and combine(*verdicts) != BAD:
        if len({id(a) for a in arrays}) != len(arrays):
            verdicts.append(BAD)
        live = [a for a in arrays if a.size]
        if any(overlaps(a, b) for i, a in enumerate(live) for b in live[i + 1:]):
            verdicts.append(BAD)
    for a in arrays:
        if array_verdict(a, writeable_needed) == BAD:
            event("clip: bad array (dtype/layout/read-only)")
    return arg, arrays, combine(*verdicts), mem


@cases(250)
@given(data=st.data())
def test_grad_norm_and_clip_grad_norm(data):
    """grad_norm / clip_grad_norm: the global L2 norm (accurate, inf/nan as
    documented), clipping by max_norm / (norm + 1e-6) bit for bit, nothing
    changed on NaN/Inf or on a refusal; the norm is the same for 1 and 2 threads."""
    which = data.draw(st.sampled_from(["grad_norm", "clip_grad_norm"]), label="function")
    arg, arrays, verdict, mem = _grads_for_clip(data, which == "clip_grad_norm")
    max_norm, error_if = None, False
    if which == "clip_grad_norm":
        wanted = data.draw(st.sampled_from([OK] * 6 + [BAD]))
        max_norm, v = draw_hyper(data, "nonneg", wanted)
        verdict = combine(verdict, fix_verdict(v, hyper_verdict("nonneg", max_norm)))
        error_if = data.draw(st.booleans())
    event(f"{which} verdict: {verdict}")
    mem.own(*arrays)
    before = [native(a) for a in arrays]
    out = []
    call = (lambda: out.append(fastopt.grad_norm(arg))) if which == "grad_norm" else \
        (lambda: out.append(fastopt.clip_grad_norm(arg, max_norm, error_if_nonfinite=error_if)))
    error = expect_clean_error(call)
    nonfinite = any(b.dtype.kind in "fc" and not np.all(np.isfinite(b)) for b in before)
    exact, log2_sumsq = (_exact_norm(before) if not nonfinite and all(
        b.dtype.kind == "f" for b in before) else (None, 0.0))
    # the norm itself is (about) beyond float64: inf, as documented (at the edge
    # a rounding may give MAXF instead)
    beyond = exact is not None and not exact < MAXF * (1 - 1e-11)
    if error is not None:
        if verdict == OK and which == "clip_grad_norm" and error_if and isinstance(error, ValueError):
            assert nonfinite or beyond, "error_if_nonfinite raised for a finite norm"
            event(f"{which}: error_if_nonfinite raised")
        else:
            assert verdict != OK, f"valid call refused: {error!r}"
            event(f"{which} outcome: refused cleanly")
        mem.assert_untouched()
        return
    assert verdict != BAD, "invalid call accepted"
    norm = out[0]
    assert type(norm) is float
    if any(np.isnan(b).any() for b in before if b.dtype.kind in "fc"):
        assert math.isnan(norm)
        event(f"{which}: NaN in the gradients")
    elif nonfinite:
        assert norm == INF
        event(f"{which}: Inf in the gradients")
    elif beyond:
        assert norm == INF or math.isclose(norm, exact, rel_tol=1e-11), (norm, exact)
        event(f"{which}: norm at or beyond float64's largest value")
    else:
        if log2_sumsq >= 1024:
            event(f"{which}: the sum of squares overflows, the norm does not")
        # squares in double: relative error ~ n * eps; squares below the normal
        # range lose their precision, hence the absolute tolerance
        assert math.isclose(norm, exact, rel_tol=1e-11, abs_tol=1e-150), (norm, exact)
    if which == "grad_norm" or not math.isfinite(norm):
        mem.assert_untouched()
    else:
        coef = float(max_norm) / (norm + 1e-6)
        for a, b in zip(arrays, before):
            expected = b
            if coef < 1.0:
                with quiet():
                    expected = b * coef
            assert_same_numbers(a, expected, "clipped gradient")
        event(f"{which}: " + ("clipped" if coef < 1 else "left as is"))
    # the same bits whatever the thread count (README)
    if sum(b.size for b in before) >= 16384 and all(isinstance(a, np.ndarray) for a in arrays):
        threads = fastopt.get_num_threads()
        try:
            fastopt.set_num_threads(1)
            one = fastopt.grad_norm([b for b in before])
            fastopt.set_num_threads(2)
            two = fastopt.grad_norm([b for b in before])
        finally:
            fastopt.set_num_threads(threads)
        assert one == two or (math.isnan(one) and math.isnan(two))
        event("grad_norm: 1 and 2 threads agree")


@cases(150)
@given(data=st.data())
def test_clip_grad_value(data):
    """clip_grad_value clamps every element into [-c, c] in place (NumPy's clip on
    a copy is the oracle), or refuses with nothing modified."""
    arg, arrays, verdict, mem = _grads_for_clip(data, True)
    wanted = data.draw(st.sampled_from([OK] * 6 + [BAD]))
    clip, v = draw_hyper(data, "nonneg", wanted)
    verdict = combine(verdict, fix_verdict(v, hyper_verdict("nonneg", clip)))
    event(f"clip_grad_value verdict: {verdict}")
    mem.own(*arrays)
    before = [native(a) for a in arrays]
    if not settle(lambda: fastopt.clip_grad_value(arg, clip), verdict, mem, "clip_grad_value")[0]:
        return
    c = float(clip)
    for a, b in zip(arrays, before):
        with quiet():
            expected = np.clip(b, -c, c)
        assert_same_numbers(a, expected, "clamped gradient")
    event("clip_grad_value outcome: matched np.clip")


# ------------------------------------------------------- GradientAccumulator

@cases(150)
@given(data=st.data())
def test_gradient_accumulator(data):
    """Construction validates; add() is buffer + (1/steps or 1) * grad in the
    buffer's dtype, bit for bit, and counts; a bad add changes nothing."""
    mode = data.draw(st.sampled_from(["valid"] * 3 + ["buffers", "steps", "reduction"]),
                     label="mode")
    event(f"accumulator mode: {mode}")
    mem = Mem()
    n = data.draw(st.integers(1, 3), label="n")
    buffers = []
    for _ in range(n):
        buffers.append(lay_out(draw_float_array(data, SHAPES),
                               data.draw(st.sampled_from(VALID_LAYOUTS)), mem))
    steps = data.draw(st.one_of(st.integers(1, 8), st.sampled_from([np.int64(3), 2 ** 63 - 1])))
    reduction = data.draw(st.sampled_from(["mean", "sum", np.str_("mean")]))
    verdicts = [combine(*(array_verdict(b, True) for b in buffers))]
    arg = data.draw(st.sampled_from(["list", "tuple"]))
    arg = list(buffers) if arg == "list" else tuple(buffers)
    if mode == "buffers":
        kind = data.draw(st.sampled_from(["layout", "same", "overlap", "container", "empty"]))
        event(f"accumulator bad buffers: {kind}")
        if kind == "layout":
            i = data.draw(st.integers(0, n - 1))
            lay = data.draw(st.sampled_from(NONCONTIG_LAYOUTS + ("readonly",)))
            buffers[i] = lay_out(native(buffers[i]), lay, mem)
            arg = list(buffers)
            verdicts.append(array_verdict(buffers[i], True))
        elif kind == "same":
            arg = list(buffers) + [buffers[0]]
            verdicts.append(BAD)  # the same array twice (even an empty one)
        elif kind == "overlap":
            m = data.draw(st.integers(2, 9))
            buf = np.zeros(m + 1)
            arg = [buf[:m], buf[1:]]
            buffers = list(arg)
            verdicts.append(BAD)
        elif kind == "container":
            arg = data.draw(st.sampled_from([None, buffers[0], {"a": buffers[0]}, "b"]))
            verdicts.append(BAD)
        else:
            arg = []
            verdicts.append(BAD)
    if mode == "steps":
        steps = data.draw(st.sampled_from([0, -1, True, 2.0, "2", None, np.float64(2),
                                               2 ** 63, 10 ** 400]))
        verdicts.append(BAD)
        event(f"accumulator bad steps: {steps!r}")
    if mode == "reduction":
        reduction = data.draw(st.sampled_from(["avg", "", None, ["mean"], b"mean", "MEAN"]))
        verdicts.append(BAD)
        event(f"accumulator bad reduction: {reduction!r}")
    verdict = combine(*verdicts)
    mem.own(*buffers)
    accepted, acc = settle(lambda: fastopt.GradientAccumulator(arg, steps, reduction), verdict,
                           mem, "accumulator")
    if not accepted:
        return
    for b in buffers:
        assert not b.any() and not np.signbit(b).any(), "buffers not zeroed"
    assert acc.count == 0 and not acc.ready
    scale = 1.0 / int(steps) if reduction == "mean" else 1.0
    model = [native(b) for b in buffers]
    count = 0
    for _ in range(data.draw(st.integers(1, 5), label="adds")):
        if data.draw(st.integers(0, 5)) == 0:
            acc.reset()
            model = [np.zeros_like(m) for m in model]
            count = 0
        grads = []
        for b in buffers:
            grads.append(lay_out(draw_values(data, b.shape, b.dtype),
                                 data.draw(st.sampled_from(VALID_LAYOUTS + ("readonly",))), Mem()))
        bad = data.draw(st.sampled_from([None] * 3 + ["dtype", "shape", "layout", "is_buffer",
                                                      "count", "not_array"]))
        if bad is not None:
            i = data.draw(st.integers(0, n - 1))
            b = buffers[i]
            if bad == "dtype":
                with quiet():
                    grads[i] = grads[i].astype(np.float32 if b.dtype == np.float64 else np.float64)
            elif bad == "shape":
                grads[i] = np.zeros((1,) + b.shape, b.dtype)
            elif bad == "layout":
                new = lay_out(native(grads[i]), data.draw(st.sampled_from(NONCONTIG_LAYOUTS)), Mem())
                if new.flags.c_contiguous:
                    continue
                grads[i] = new
            elif bad == "is_buffer":
                if b.size == 0:
                    continue
                grads[i] = b
            elif bad == "count":
                grads = grads + [grads[0]] if data.draw(st.booleans()) else grads[:-1]
            else:
                grads[i] = native(grads[i]).tolist()
            event(f"accumulator bad add: {bad}")
            snap = [b.tobytes() for b in buffers]
            assert expect_clean_error(lambda g=grads: acc.add(g)) is not None, "bad add accepted"
            assert [b.tobytes() for b in buffers] == snap and acc.count == count
            continue
        if n >= 2 and buffers[0].shape == buffers[1].shape and buffers[0].dtype == buffers[1].dtype \
                and data.draw(st.booleans()):
            grads[1] = grads[0]  # one array for two buffers: fine, it is only read
        acc.add(grads if data.draw(st.booleans()) else tuple(grads))
        count += 1
        with quiet():
            model = [m + scale * native(g) for m, g in zip(model, grads)]
        for b, m in zip(buffers, model):
            assert_same_numbers(b, m, "accumulated buffer")
        assert acc.count == count and acc.ready == (count >= int(steps))
        event("accumulator: add matched")


# ---------------------------------------------------------------- batches

@cases(200)
@given(data=st.data())
def test_batches_cover_every_sample_once_per_epoch(data):
    """batches(): len() batches per epoch of the documented sizes; without shuffle
    views of X in order; with shuffle each epoch a permutation (rows of X and y
    stay paired); the same seed gives the same epochs. Bad input: a clean error."""
    mode = data.draw(st.sampled_from(["valid"] * 4 + ["X", "y", "batch_size", "seed", "flag"]),
                     label="mode")
    event(f"batches mode: {mode}")
    n = data.draw(st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 997, 4099])), label="n")
    row = data.draw(st.sampled_from([(), (3,), (2, 2), (0,)]), label="row shape")
    dtype = data.draw(st.sampled_from(list(FLOATS) + BAD_DTYPES + SWAPPED), label="dtype")
    X = lay_out(make_values(data.draw(st.integers(0, 99)), (n,) + row, dtype, "normal"),
                data.draw(st.sampled_from(VALID_LAYOUTS + NONCONTIG_LAYOUTS + ("readonly",))), Mem())
    ids = np.arange(n)
    y_kind = data.draw(st.sampled_from(["ids", "ids", "none", "ids_f32", "ids_2d"]))
    y = {"ids": ids, "none": None, "ids_f32": ids.astype(np.float32),
         "ids_2d": np.stack([ids, ids], axis=1)[:, ::-1]}[y_kind]
    batch_size = data.draw(st.one_of(st.none(), st.integers(1, 2 * n + 3),
                                     st.sampled_from([np.int64(1), np.int8(3), 1, 2 ** 40,
                                                      10 ** 30])), label="k")
    shuffle = data.draw(st.sampled_from([True, False, np.True_]))
    seed = data.draw(st.one_of(st.integers(0, 2 ** 64), st.none(),
                               st.sampled_from([np.int64(3), [1, 2]])), label="seed")
    drop_last = data.draw(st.booleans())
    verdicts = []
    if mode == "X":
        X = data.draw(st.sampled_from([X.tolist(), np.zeros(()), np.zeros((0, 2)), None, 3.0]))
        verdicts.append(BAD)
        event(f"batches bad X: {type(X).__name__}")
    elif mode == "y":
        y = data.draw(st.sampled_from([np.arange(n + 1), np.zeros(()), ids.tolist(), "y"]))
        verdicts.append(BAD)
        event(f"batches bad y: {type(y).__name__}")
    elif mode == "batch_size":
        batch_size = data.draw(st.sampled_from([0, -1, True, 2.0, "2", np.float64(2), [2]]))
        verdicts.append(BAD)
        event(f"batches bad batch_size: {batch_size!r}")
    elif mode == "seed":
        seed = data.draw(st.sampled_from(["abc", -1, 1.5, [-1], object()]))
        verdicts.append(BAD)
        event(f"batches bad seed: {type(seed).__name__}")
    elif mode == "flag":
        junk = data.draw(st.sampled_from(["False", "True", 0, 1, None, [True], 1.0]))
        if data.draw(st.booleans()):
            shuffle = junk
        else:
            drop_last = junk
        verdicts.append(BAD)
        event(f"batches bad flag: {junk!r}")
    if batch_size is not None and drop_last and mode != "batch_size" and int(batch_size) > n:
        verdicts.append(BAD)  # documented: no batch at all would be yielded
    verdict = combine(*verdicts)
    out = []
    error = expect_clean_error(lambda: out.append(fastopt.batches(X, y, batch_size=batch_size,
                                                                  shuffle=shuffle, seed=seed,
                                                                  drop_last=drop_last)))
    if error is None and verdict == BAD:
        # some refusals may come on iteration; they must still be clean
        error = expect_clean_error(lambda: list(out[0]))
    if error is not None:
        assert verdict != OK, f"valid batches refused: {error!r}"
        event("batches outcome: refused cleanly")
        return
    assert verdict != BAD, "invalid batches accepted"
    b = out[0]
    k = None if batch_size is None else int(batch_size)
    expected_len = 1 if k is None else (n // k if drop_last else -(-n // k))
    assert len(b) == expected_len
    epochs = []
    for _ in range(2):
        got_x, got_y = [], []
        count = 0
        for item in b:
            xb, yb = item if y is not None else (item, None)
            count += 1
            if k is None:
                assert xb is X and yb is y
            else:
                size = xb.shape[0]
                assert size == k or (not drop_last and count == expected_len and size == n % k)
                if not b.shuffle:
                    assert np.shares_memory(xb, X) or xb.size == 0, "unshuffled batch is a copy"
            got_x.append(np.array(xb, copy=True))
            got_y.append(None if yb is None else np.array(yb, copy=True))
        assert count == expected_len
        xs = np.concatenate(got_x) if k is not None else got_x[0]
        m = xs.shape[0]
        assert m == (n if k is None or not drop_last else expected_len * k)
        if y is not None:
            ys = np.concatenate(got_y) if k is not None else got_y[0]
            order = (ys[:, 0] if ys.ndim == 2 else ys).astype(np.int64)
            if ys.ndim == 2:
                assert np.array_equal(ys[:, 0], ys[:, 1])
            assert len(set(order.tolist())) == m, "a sample came twice in one epoch"
            if not b.shuffle or k is None:
                assert np.array_equal(order, np.arange(m))
            assert native(xs).tobytes() == native(X[order]).tobytes(), "X and y rows unpaired"
        elif not b.shuffle or k is None:
            assert native(xs).tobytes() == native(X[:m]).tobytes()
        epochs.append((native(xs).tobytes(), None if y is None else order.tolist()))
    event("batches outcome: " + ("full batch" if k is None else "shuffled" if b.shuffle else "in order"))
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        again = fastopt.batches(X, y, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                drop_last=drop_last)
        for epoch in epochs:
            got = [np.array(item if y is None else item[0], copy=True) for item in again]
            xs = np.concatenate(got) if k is not None else got[0]
            assert native(xs).tobytes() == epoch[0], "the same seed gave other epochs"


# ============================================================ fixed bugs
# Found by the properties above (B1-B14) and fixed; the generators now cover
# them. One regression test per bug states the documented behaviour for the
# case that found it, so that each stays fixed whatever Hypothesis draws.

def _outcome(call, arrays=()):
    """'ok', 'clean refusal', 'refusal that modified its input', or the exception type."""
    before = [a.tobytes() for a in arrays]
    try:
        with quiet():
            call()
    except (TypeError, ValueError):
        if [a.tobytes() for a in arrays] != before:
            return "refusal that modified its input"
        return "clean refusal"
    except Exception as e:  # noqa: BLE001 - what we report
        return type(e).__name__
    return "ok"


def test_b1_huge_int_hyperparameter():
    """B1: a Python int beyond float64 (10**400) as a hyperparameter, or as the
    accumulator's steps, is a clean ValueError (was OverflowError from float())."""
    p, g = np.ones(3), np.ones(3)
    huge = 10 ** 400
    calls = {
        "kernels.sgd(lr=10**400)": lambda: kernels.sgd(p, g, lr=huge),
        "SGD(lr=10**400)": lambda: fastopt.SGD([p], lr=huge).step([g]),
        "Adam(betas=(10**400, 0.9))": lambda: fastopt.Adam([p], betas=(huge, 0.9)).step([g]),
        "clip_grad_norm(max_norm=10**400)": lambda: fastopt.clip_grad_norm([p], huge),
        "clip_grad_value(clip_value=10**400)": lambda: fastopt.clip_grad_value([p], huge),
        "GradientAccumulator(steps=10**400).add": lambda: fastopt.GradientAccumulator(
            [p], steps=huge).add([g]),
    }
    problems = {}
    for name, call in calls.items():
        p[...] = 1.0
        outcome = _outcome(call, [g])
        if outcome not in ("ok", "clean refusal"):
            problems[name] = outcome
    assert not problems, problems


def test_b2_kernel_step_beyond_int64():
    """B2: kernel step counts beyond int64 are refused by validation (they
    passed, then raised OverflowError converting to Py_ssize_t)."""
    problems = {}
    for rule in [r.name for r in spec.rules() if r.step_arg == "step"]:
        for step in (2 ** 63, 10 ** 30):
            p, g = np.ones(3), np.ones(3)
            bufs = [np.zeros(3) if n else None for n in spec.needs(rule, shape=(3,))]
            outcome = _outcome(lambda f=KERNELS[rule]["fast"], a=(p, g, *bufs), s=step:
                               f(*a, step=s, **KERNELS[rule]["scalars"]),
                               [p] + [b for b in bufs if b is not None])
            if outcome not in ("ok", "clean refusal"):
                problems[f"{rule}(step={step})"] = outcome
    assert not problems, problems


def test_b3_state_step_beyond_int64():
    """B3: a state step count from which the next step overflows int64 is refused
    before anything changes (the cython backend had updated earlier groups)."""
    problems = {}
    for backend, step in [("cython", 2 ** 63 - 1), ("cython", 2 ** 63), ("numpy", 2 ** 63),
                          ("cython", "load 1e19")]:
        w0, w1 = np.ones(3), np.ones(3)
        opt = fastopt.Adam([{"params": [w0]}, {"params": [w1]}], lr=0.1, backend=backend)
        grads = [np.ones(3), np.ones(3)]
        opt.step(grads)
        if step == "load 1e19":
            sd = opt.state_dict()
            sd["state"][1]["step"] = 1e19
            error = expect_clean_error(lambda opt=opt, sd=sd: opt.load_state_dict(sd))
            if not isinstance(error, ValueError) or opt.state[1]["step"] != 1:
                problems["load 1e19"] = f"accepted or not clean: {error!r}"
            continue
        else:
            opt.state[1]["step"] = step
        steps_before = opt.state[0]["step"]
        outcome = _outcome(lambda opt=opt, grads=grads: opt.step(grads), [w0, w1])
        if outcome == "clean refusal" and opt.state[0]["step"] != steps_before:
            outcome = "refusal that advanced state[0]['step']"
        if outcome not in ("ok", "clean refusal"):
            problems[f"{backend}, step {step}"] = outcome
    assert not problems, problems


def test_b4_state_buffer_changed_in_place():
    """B4: with the step cache warm, a state buffer made read-only or reshaped in
    place is refused, as in the numpy backend (it was written through)."""
    problems = {}
    for change in ("read-only", "reshaped", "unused, read-only"):
        w = np.ones(3)
        opt = fastopt.Adam([w], lr=0.1, amsgrad=change.startswith("unused"))
        opt.step([np.ones(3)])
        opt.param_groups[0]["amsgrad"] = False  # max_exp_avg_sq stays, unused
        for _ in range(3):  # from the third step on the cache is warm
            opt.step([np.ones(3)])
        buf = opt.state[0]["max_exp_avg_sq" if change.startswith("unused") else "exp_avg"]
        if change.endswith("read-only"):
            buf.flags.writeable = False
        else:
            buf.shape = (3, 1)
        outcome = _outcome(lambda opt=opt: opt.step([np.ones(3)]), [w, buf])
        if outcome != "clean refusal":
            problems[change] = outcome
    assert not problems, problems


def test_b5_cross_parameter_aliasing():
    """B5: a gradient or state buffer overlapping *another* parameter or its state
    is refused by both backends (the result depended on thread timing)."""
    aliases = {
        "grad is another param": lambda opt, a, b, g: (None, [g[0], a]),
        "grad is another param's state": lambda opt, a, b, g: (None, [g[0], opt.state[0]["exp_avg"]]),
        "state buffer shared by two params": lambda opt, a, b, g: (("exp_avg", opt.state[0]["exp_avg"]), g),
        "state buffer is another param": lambda opt, a, b, g: (("exp_avg_sq", a), g),
    }
    for backend in ("cython", "numpy"):
        for groups in (1, 2):
            for alias, make in aliases.items():
                rng = np.random.default_rng(0)
                a, b = rng.standard_normal(1000), rng.standard_normal(1000)
                params = [a, b] if groups == 1 else [{"params": [a]}, {"params": [b]}]
                opt = fastopt.Adam(params, lr=0.1, backend=backend)
                grads = [rng.standard_normal(1000), rng.standard_normal(1000)]
                for _ in range(3):  # the third step runs from the warm cache
                    opt.step(grads)
                entry, grads = make(opt, a, b, grads)
                if entry is not None:
                    opt.state[1][entry[0]] = entry[1]
                snap = opt_snapshot(opt, [a, b], grads)
                error = expect_clean_error(lambda opt=opt, grads=grads: opt.step(grads))
                assert isinstance(error, ValueError) and "shares memory with" in str(error), \
                    (backend, groups, alias, error)
                assert_snapshot(opt, snap)
    buffers = [np.zeros(4), np.zeros(4)]
    acc = fastopt.GradientAccumulator(buffers, steps=2)
    error = expect_clean_error(lambda: acc.add([np.ones(4), buffers[0]]))
    assert isinstance(error, ValueError) and "grads[1] shares memory with buffers[0]" in str(error)
    assert acc.count == 0 and not buffers[0].any()


def test_b6_batch_size_beyond_samples_with_shuffle():
    """B6: a shuffled batch_size far beyond the number of samples allocates no more
    rows than there are samples (it allocated batch_size rows)."""
    X = np.arange(10.0)
    problems = {}
    for k in (2 ** 40, 10 ** 30):
        got = []
        outcome = _outcome(lambda got=got, k=k: got.extend(
            b.copy() for b in fastopt.batches(X, batch_size=k, shuffle=True, seed=0)))
        if outcome != "ok" or len(got) != 1 or sorted(got[0].tolist()) != X.tolist():
            problems[f"batch_size={k}"] = outcome
    assert not problems, problems


def test_b7_state_step_none():
    """B7: state step None is refused before anything changes (it passed the
    screen, then advanced earlier parameters' steps and raised)."""
    problems = {}
    for backend in ("cython", "numpy"):
        a, b = np.ones(3), np.ones(3)
        opt = fastopt.Adam([a, b], lr=0.1, backend=backend)
        grads = [np.ones(3), np.ones(3)]
        opt.step(grads)
        opt.state[1]["step"] = None
        snap = opt_snapshot(opt, [a, b], grads)
        steps_before = opt.state[0]["step"]
        outcome = _outcome(lambda opt=opt, grads=grads: opt.step(grads), [a, b])
        if outcome == "clean refusal":
            try:
                assert opt.state[0]["step"] == steps_before
                assert_snapshot(opt, snap)
            except AssertionError:
                outcome = "refusal that advanced state[0]['step']"
        if outcome not in ("ok", "clean refusal"):
            problems[backend] = outcome
    assert not problems, problems


def test_b8_param_group_replaced_by_non_dict():
    """B8: a param group replaced by a non-dict is a TypeError (the fast path
    raised SystemError)."""
    problems = {}
    for junk in ("x", 5, [1], np.zeros(2)):
        w = np.ones(3)
        opt = fastopt.SGD([w], lr=0.1)
        opt.step([np.ones(3)])
        opt.param_groups[0] = junk
        outcome = _outcome(lambda opt=opt: opt.step([np.ones(3)]), [w])
        if outcome != "clean refusal":
            problems[repr(junk)] = outcome
    assert not problems, problems


def test_b9_batches_flags_take_any_object():
    """B9: batches() checks shuffle/drop_last like every fastopt flag ('False'
    used to mean True)."""
    X = np.arange(10.0)
    problems = {}
    for option in ("shuffle", "drop_last"):
        error = expect_clean_error(lambda option=option: fastopt.batches(
            X, batch_size=3, seed=0, **{option: "False"}))
        if not isinstance(error, TypeError):
            problems[option] = "'False' taken as True"
    assert not problems, problems


def test_b10_masked_array_param():
    """B10: masked arrays are refused by both backends (the kernels updated masked
    elements, the numpy backend did not)."""
    results = []
    for backend in ("cython", "numpy"):
        m = np.ma.array(np.ones(4), mask=[0, 1, 0, 0])
        try:
            fastopt.SGD([m], lr=1.0, backend=backend).step([np.ones(4)])
        except (TypeError, ValueError):
            results.append(None)
            continue
        results.append(np.asarray(m.data).copy())
    if results[0] is not None and results[1] is not None:
        assert_same_numbers(results[0], results[1], "cython vs numpy backend")
    else:
        assert results == [None, None]


def test_b11_adagrad_step_beyond_2_53():
    """B11: Adagrad's lr decay subtracts 1 from the step exactly, like the
    reference, also above 2**53."""
    problems = []
    for step in (2 ** 53 + 3, 2 ** 54 + 3):
        p, g, s = np.zeros(1), np.ones(1), np.zeros(1)
        ep, es = p.copy(), s.copy()
        kernels.adagrad(p, g, s, step=step, lr=1.0, lr_decay=0.1)
        reference.adagrad(ep, g, es, step=step, lr=1.0, lr_decay=0.1)
        if p.tobytes() != ep.tobytes():
            problems.append(f"step={step}: kernel {p[0]!r} != reference {ep[0]!r}")
    assert not problems, problems


def test_b12_norm_overflow():
    """B12: finite gradients whose squares overflow a double (|g| > ~1.3e154) get
    their true, finite norm and are clipped by it (they got inf and were zeroed);
    a norm beyond float64 is inf and handled as documented for non-finite norms."""
    assert fastopt.grad_norm([np.array([1e200, 1.0])]) == 1e200
    for error_if_nonfinite in (True, False):
        g = np.array([1e200, 1.0])
        assert fastopt.clip_grad_norm([g], 1.0, error_if_nonfinite=error_if_nonfinite) == 1e200
        coef = 1.0 / (1e200 + 1e-6)
        assert_same_numbers(g, np.array([1e200 * coef, coef]), "clipped gradient")
        assert 0.999 < np.linalg.norm(g) <= 1.0
        # a norm beyond float64's range: inf, an error on request, else untouched
        g = np.array([1e308, 1e308, -1e308, 1e308])  # norm 2e308
        assert fastopt.grad_norm([g]) == INF
        error = expect_clean_error(lambda g=g, e=error_if_nonfinite: fastopt.clip_grad_norm(
            [g], 1.0, error_if_nonfinite=e))
        assert isinstance(error, ValueError) if error_if_nonfinite else error is None
        assert np.array_equal(g, [1e308, 1e308, -1e308, 1e308])


def test_b13_grad_is_an_unused_state_buffer():
    """B13: a gradient that is a state buffer the options no longer use is refused
    by the warm fast path too."""
    problems = []
    for key in ("grad_avg", "momentum_buffer", "max_exp_avg_sq"):
        w = np.ones(4)
        if key == "grad_avg":
            opt, edit = fastopt.RMSprop([w], centered=True), ("centered", False)
        elif key == "momentum_buffer":
            opt, edit = fastopt.RMSprop([w], momentum=0.9), ("momentum", 0.0)
        else:
            opt, edit = fastopt.Adam([w], amsgrad=True), ("amsgrad", False)
        opt.step([np.ones(4)])
        opt.param_groups[0][edit[0]] = edit[1]
        opt.step([np.ones(4)])  # warms the cache
        if _outcome(lambda opt=opt, key=key: opt.step([opt.state[0][key]]), [w]) != "clean refusal":
            problems.append(f"gradient == unused state buffer {key!r} accepted")
    assert not problems, problems


def test_b14_amsgrad_max_of_signed_zeros():
    """B14: amsgrad's running max keeps the second of two equal values, as
    numpy.maximum does (max(-0.0, +0.0) is +0.0)."""
    problems = []
    for dtype in (np.float32, np.float64):
        arrays = [np.zeros(8, dtype) for _ in range(4)] + [np.full(8, -0.0, dtype)]
        expected = [a.copy() for a in arrays]
        kernels.adam(*arrays, step=1, amsgrad=True)
        reference.adam(*expected, step=1, amsgrad=True)
        if arrays[4].tobytes() != expected[4].tobytes():
            problems.append(f"{dtype.__name__}: max_exp_avg_sq signbit kernel "
                            f"{np.signbit(arrays[4][0])}, reference {np.signbit(expected[4][0])}")
    assert not problems, problems
