"""Every check of user input, written once and reused by all entry points.

Hyperparameter rules are small functions ``rule(name, value)`` that return
the value (normalised to a Python float/bool/tuple) or raise. Array checks
name the offending array in their message so that a user with hundreds of
parameters knows which one to fix.
"""
import math
import numbers

import numpy as np

from . import _precision

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # NumPy < 2
    from numpy import byte_bounds

#: dtypes the compute layer has kernels for.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# An optimizer steps a complex array as its real view (two floats per element),
# as torch.optim does: every rule treats real and imaginary parts alike.
COMPLEX_DTYPES = (np.dtype(np.complex64), np.dtype(np.complex128))

#: ndarray subclasses whose elements are not simply their memory: a masked
#: array's mask would be ignored by the kernels, and np.matrix changes what the
#: operators of the reference twins mean. Other subclasses (np.memmap, ...) are
#: fine. numpy.asarray(x) gives a plain view of the same memory.
REFUSED_SUBCLASSES = (np.ma.MaskedArray, np.matrix)


# ------------------------------------------------------------ hyperparameters

#: The largest step count a kernel takes: steps travel as a C int64. A stored
#: count must stay below it so that the next step still fits.
MAX_STEP = 2 ** 63 - 1


def _is_torch(value):
    """Whether ``value`` is a torch object (checked without importing torch)."""
    return type(value).__module__.split(".", 1)[0] == "torch"


def _real(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        if _is_torch(value):
            short = name.rsplit(": ", 1)[-1]  # "param_groups[0]: lr" -> "lr"
            raise TypeError(
                f"{name} must be a real number, got a torch {type(value).__name__} {value!r}: "
                "fastopt does not read hyperparameters from tensors yet (torch.optim accepts a "
                f"0-d tensor {short} that a scheduler updates in place); pass a float, e.g. "
                f"{short}=float({short})")
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float64's range, e.g. 10**400
        raise ValueError(f"{name} must be within float64's range (about 1.8e308)") from None


def real(name, value):
    """Any real number, NaN and infinities included (a bool is not one)."""
    return _real(name, value)


def pair_of_reals(name, value):
    """A pair of real numbers (betas whose range is the caller's business)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    return (_real(f"{name}[0]", value[0]), _real(f"{name}[1]", value[1]))


def nonnegative(name, value):
    """``value >= 0`` (NaN fails)."""
    x = _real(name, value)
    if not x >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return x


def positive(name, value):
    """``value > 0`` and finite."""
    x = _real(name, value)
    if not (x > 0.0 and math.isfinite(x)):
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return x


def unit_interval(name, value):
    """``0 <= value < 1``."""
    x = _real(name, value)
    if not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return x


def finite(name, value):
    """Any finite real number."""
    x = _real(name, value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return x


def flag(name, value):
    """A bool (NumPy bools accepted)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def betas(name, value):
    """A pair ``(beta1, beta2)``, each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    return (unit_interval(f"{name}[0]", value[0]), unit_interval(f"{name}[1]", value[1]))


def etas(name, value):
    """Rprop's ``(etaminus, etaplus)``: ``0 < etaminus < 1 < etaplus``, finite."""
    low, high = pair_of_reals(name, value)
    if not (0.0 < low < 1.0 < high and math.isfinite(high)):
        raise ValueError(f"{name} must be (etaminus, etaplus) with 0 < etaminus < 1 < etaplus, "
                         f"got {value!r}")
    return (low, high)


def bounds(name, value):
    """A pair ``(low, high)`` with ``0 <= low <= high`` (Rprop's step_sizes; high may be inf)."""
    low, high = pair_of_reals(name, value)
    if not 0.0 <= low <= high:
        raise ValueError(f"{name} must be (min, max) with 0 <= min <= max, got {value!r}")
    return (low, high)


def _holds(name, value, ok, rule):
    """A real ``value`` for which ``ok(value)`` holds, else a ValueError saying ``rule``."""
    x = _real(name, value)
    if not ok(x):  # (NaN fails every comparison)
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return x


def nonpositive(name, value):
    """``value <= 0`` (NaN fails): Adafactor's beta2_decay."""
    return _holds(name, value, lambda x: x <= 0.0, "<= 0")


def at_least_one(name, value):
    """``value >= 1`` (NaN fails): Adafactor's clipping threshold d."""
    return _holds(name, value, lambda x: x >= 1.0, ">= 1")


def optional_pair(name, value):
    """A pair whose first member may be None (the kind of Adafactor's eps)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (eps1, eps2), got {value!r}")
    first = None if value[0] is None else _real(f"{name}[0]", value[0])
    return (first, _real(f"{name}[1]", value[1]))


def eps_pair(name, value):
    """Adafactor's ``(eps1, eps2)``: eps1 None (the dtype's machine epsilon) or >= 0; eps2 >= 0."""
    first, second = optional_pair(name, value)
    if first is not None:
        nonnegative(f"{name}[0]", first)
    return (first, nonnegative(f"{name}[1]", second))


#: the validators of a pair of reals (a step checks only their kind)
PAIRS = (pair_of_reals, betas, etas, bounds, eps_pair)
#: A pair check -> the check of its kind alone (what a torch step re-checks)
PAIR_KINDS = {eps_pair: optional_pair}


def _integral(name, value, kind="an int"):
    """Raise TypeError unless ``value`` is an integer that is not a bool (NumPy's pass)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {kind}, got {value!r}")


def integer(name, value, minimum):
    """An int (not a bool) ``>= minimum``."""
    _integral(name, value)
    if value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def count(name, value, kind="an int"):
    """An int (not a bool) ``>= 1``: a size, a number of items; ``kind`` names the type."""
    _integral(name, value, kind)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def step_count(name, value):
    """A count ``1 <= t <= MAX_STEP`` (a step count after this step's increment)."""
    count(name, value, "an integer")
    if value > MAX_STEP:
        raise ValueError(f"{name} must be <= 2**63 - 1 (counts are int64), got {value!r}")
    return int(value)


def stored_step(name, value):
    """A step count kept in optimizer state: an int with ``0 <= value < MAX_STEP``.

    Only exact ``int`` passes (not bool, not None, not a NumPy integer): the
    fast path compares it with C integers and commits ``value + 1``.
    """
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if value >= MAX_STEP:
        raise ValueError(f"{name} must be < 2**63 - 1, so that the next step's count "
                         f"fits an int64; got {value!r}")
    return value


def in_interval(name, value, low, high, brackets="[]"):
    """A finite real number in the interval ``brackets[0] low, high brackets[1]``."""
    x = finite(name, value)
    above = x >= low if brackets[0] == "[" else x > low
    below = x <= high if brackets[1] == "]" else x < high
    if not (above and below):
        raise ValueError(f"{name} must be in {brackets[0]}{low}, {high}{brackets[1]}, "
                         f"got {value!r}")
    return x


def nonnegative_finite(name, value):
    """A finite real number ``>= 0``."""
    return in_interval(name, value, 0, math.inf, "[)")


def choice(name, value, options):
    """One of ``options``, which the message lists as they print."""
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def either(name, value, first, second):
    """``first`` or ``second`` (two modes, named in the message)."""
    if value not in (first, second):
        raise ValueError(f"{name} must be {first!r} or {second!r}, got {value!r}")
    return value


def function(name, value):
    """Anything callable."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def per_group(name, value, groups, rule):
    """``value`` as one entry per param group, each checked by ``rule`` (a scalar is repeated)."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise ValueError(f"{name} has {len(value)} entries but the optimizer has "
                             f"{len(groups)} param groups")
        return [rule(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [rule(name, value)] * len(groups)


def check_hyper(rules, hyper, where=""):
    """Apply ``rules`` (name -> rule) to ``hyper``; return the normalised dict.

    ``where`` prefixes messages, e.g. ``"param_groups[1]: "``.
    """
    out = {}
    for name, rule in rules.items():
        if name not in hyper:
            raise TypeError(f"{where}missing hyperparameter {name!r}")
        out[name] = rule(f"{where}{name}", hyper[name])
    return out


# --------------------------------------------------------------------- arrays

def check_float_array(name, a, writeable, torch_twin=None, complex_ok=False, half_ok=False):
    """An ndarray of float32/float64 in C order (writeable when updated in place).

    ``torch_twin`` names the fastopt.torch class to suggest when ``a`` is a
    torch tensor (an optimizer given ``model.parameters()``); ``complex_ok``
    admits complex64/complex128 too (an optimizer steps their real view);
    ``half_ok`` float16 and ml_dtypes.bfloat16 (fastopt/_precision.py).
    """
    if not isinstance(a, np.ndarray):
        hint = ""
        if torch_twin and _is_torch(a):
            hint = f" (a torch tensor: did you mean {torch_twin}? It steps torch models)"
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}{hint}")
    if isinstance(a, REFUSED_SUBCLASSES):
        raise TypeError(
            f"{name} is a {type(a).__name__}, which fastopt does not update (it would "
            "update every element, masked or not); pass numpy.asarray of it, a plain "
            "view of the same memory"
        )
    if (a.dtype not in FLOAT_DTYPES and not (complex_ok and a.dtype in COMPLEX_DTYPES)
            and not (half_ok and _precision.element(a.dtype) in _precision.HALF)):
        kinds = ["float32", "float64"] + (["float16", "bfloat16"] if half_ok else []) + (
            ["complex64", "complex128"] if complex_ok else [])
        raise TypeError(f"{name} must have dtype {', '.join(kinds[:-1])} or {kinds[-1]}, "
                        f"got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous: fastopt updates arrays in place and never "
            "through a copy (numpy.ascontiguousarray makes one you can keep)"
        )
    if not a.flags.aligned:
        raise ValueError(f"{name} is not aligned to its dtype's size (a view of a byte buffer?)")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only; the update must be written into it")


def real_view(a):
    """A complex array as the real array of its parts (the same memory), else ``a``."""
    return a.view(a.real.dtype) if a.dtype in COMPLEX_DTYPES else a


def float_ndarray(name, a):
    """An ndarray of float32 or float64, in any layout (input that is only read)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    return a


def samples(name, a):
    """An ndarray with samples along its first axis (at least 1-D)."""
    if not isinstance(a, np.ndarray) or a.ndim == 0:
        raise TypeError(f"{name} must be an ndarray with samples along axis 0, got "
                        f"{type(a).__name__}")
    return a


def check_like(name, a, ref_name, ref):
    """``a`` has the dtype and shape of ``ref``."""
    if a.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {a.dtype} but {ref_name} has dtype {ref.dtype}")
    if a.shape != ref.shape:
        raise ValueError(f"{name} has shape {a.shape} but {ref_name} has shape {ref.shape}")


def check_no_overlap(name, a, others):
    """``a`` shares no memory with any array in ``others`` (name -> array)."""
    for other_name, b in others.items():
        if b is not None and np.may_share_memory(a, b):
            # may_share_memory compares address bounds, which is exact for the
            # contiguous arrays that reach this point.
            raise ValueError(f"{name} shares memory with {other_name}")


def array_span(a):
    """The byte range ``(start, end)`` of a non-empty ndarray's elements."""
    if a.flags.c_contiguous:
        start = a.__array_interface__["data"][0]
        return start, start + a.nbytes
    return byte_bounds(a)  # rare here (refused elsewhere): its whole strided extent


def check_no_aliasing(writes, reads=()):
    """No two arrays of ``writes`` overlap, nor any of ``reads`` one of ``writes``.

    ``writes`` and ``reads`` are lists of ``(name, array)``; arrays in
    ``reads`` may overlap each other. Exact for contiguous arrays; a strided
    one counts as its whole extent.
    """
    check_spans_apart([(*array_span(a), name) for name, a in writes if a.size],
                      [(*array_span(a), name) for name, a in reads if a.size])


def check_spans_apart(writes, reads=()):
    """:func:`check_no_aliasing` on byte ranges ``(start, end, name)``.

    One sweep over the ranges sorted by address: O(n log n) for models with
    many arrays.
    """
    spans = sorted([(*span, True) for span in writes] + [(*span, False) for span in reads],
                   key=lambda span: span[0])
    reach = reach_write = (-1, None)  # the furthest end so far (of any range, of a write), whose
    for start, end, name, written in spans:
        other = reach[1] if written and start < reach[0] else (
            reach_write[1] if start < reach_write[0] else None)
        if other is not None:
            raise ValueError(f"{name} shares memory with {other}")
        if end > reach[0]:
            reach = (end, name)
        if written and end > reach_write[0]:
            reach_write = (end, name)


def check_distinct_params(named_params):
    """No two parameters are the same array or overlap in memory.

    An overlap would update the same memory twice in one step.
    """
    seen = {}
    for name, p in named_params:
        if id(p) in seen:
            raise ValueError(f"{name} is the same array as {seen[id(p)]}: each parameter may appear once")
        seen[id(p)] = name
    try:
        check_no_aliasing(named_params)
    except ValueError as e:
        raise ValueError(f"{e}: a parameter may appear only once") from None


# ---------------------------------------------------------------- data
# The inputs and targets of a loss or a model; ``where`` (the function or the
# model) and ``name`` (its argument) start every message.

def check_input(where, name, x, ndim=None):
    """A non-empty float32/float64 ndarray (of ``ndim`` dimensions, if given)."""
    float_ndarray(f"{where}: {name}", x)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{where}: {name} must be {ndim}-D, got shape {x.shape}")
    if x.ndim == 0 or x.size == 0:
        raise ValueError(f"{where}: {name} must be a non-empty array of at least 1 dimension, "
                         f"got shape {x.shape}")
    return x


def _real_numbers(where, name, t):
    if t.dtype.kind not in "biuf":
        raise TypeError(f"{where}: {name} must hold real numbers, got dtype {t.dtype}")


def check_target(where, name, target, shape):
    """Real numbers (bool, int or float) of exactly ``shape``, as an ndarray.

    No broadcasting: a (n, 1) prediction against a (n,) target would silently
    compare every row with every target.
    """
    t = np.asarray(target)
    _real_numbers(where, name, t)
    if t.shape != shape:
        raise ValueError(f"{where}: {name} has shape {t.shape}, expected {shape}")
    return t


def check_class_target(where, name, target, n, k):
    """Class targets for ``n`` rows of ``k`` logits; return ``(target, is_labels)``.

    Either integer class indices of shape (n,), each in [0, k), or one-hot /
    probability rows of shape (n, k).
    """
    t = np.asarray(target)
    if t.ndim == 1:
        if t.dtype.kind not in "iu":
            raise TypeError(f"{where}: {name} of shape (n,) holds class indices and must be "
                            f"integers, got dtype {t.dtype} (one-hot or probabilities have "
                            f"shape (n, {k}))")
        if t.shape[0] != n:
            raise ValueError(f"{where}: {name} has {t.shape[0]} labels for {n} rows")
        low, high = t.min(), t.max()
        if low < 0 or high >= k:
            raise ValueError(f"{where}: class indices in {name} must be in [0, {k}), "
                             f"got values from {low} to {high}")
        return t, True
    if t.shape == (n, k):
        _real_numbers(where, name, t)
        return t, False
    raise ValueError(f"{where}: {name} must be class indices of shape ({n},) or one-hot / "
                     f"probabilities of shape ({n}, {k}), got shape {t.shape}")
