"""Every check of user input, written once and reused by all entry points.

Hyperparameter rules are small functions ``rule(name, value)`` that return
the value (normalised to a Python float/bool/tuple) or raise. Array checks
name the offending array in their message so that a user with hundreds of
parameters knows which one to fix.
"""
import math
import numbers

import numpy as np

#: dtypes the compute layer has kernels for.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ------------------------------------------------------------ hyperparameters

def _real(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


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


def step_count(name, value):
    """A step count ``t >= 1`` (the count after this step's increment)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


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

def check_float_array(name, a, writeable):
    """An ndarray of float32/float64 in C order (writeable when updated in place)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous: fastopt updates arrays in place and never "
            "through a copy (numpy.ascontiguousarray makes one you can keep)"
        )
    if not a.flags.aligned:
        raise ValueError(f"{name} is not aligned to its dtype's size (a view of a byte buffer?)")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only; the update must be written into it")


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


def check_distinct_params(named_params):
    """No two parameters are the same array or overlap in memory.

    An overlap would update the same memory twice in one step. Sorting by
    address keeps this O(n log n) for models with many arrays.
    """
    seen = {}
    for name, p in named_params:
        if id(p) in seen:
            raise ValueError(f"{name} is the same array as {seen[id(p)]}: each parameter may appear once")
        seen[id(p)] = name
    spans = []
    for name, p in named_params:
        if p.size == 0:
            continue
        start = p.__array_interface__["data"][0]
        spans.append((start, start + p.nbytes, name))
    spans.sort(key=lambda span: span[0])
    reach, reach_name = -1, None  # the furthest end seen so far, and whose it is
    for start, end, name in spans:
        if start < reach:
            raise ValueError(
                f"{name} shares memory with {reach_name}: a parameter may appear only once"
            )
        if end > reach:
            reach, reach_name = end, name
