"""Low-level update kernels, for callers that manage their own state.

Each function updates ``p`` and its state buffers in place, in one fused
pass, following torch.optim's formulas (see ``fastopt.reference`` for the
textbook NumPy twin with the same signature). All arguments are validated
first; nothing is modified if a check fails.

Arrays must be C-contiguous NumPy arrays of float32 or float64, all with the
same dtype and shape. ``g`` is read only and must not share memory with ``p``
or a state buffer. Non-contiguous inputs are refused rather than copied, so an
update can never land in a temporary copy.

Examples
--------
>>> import numpy as np
>>> from fastopt import kernels
>>> p = np.ones(4, np.float32); g = np.full(4, 0.5, np.float32)
>>> m = np.zeros_like(p); v = np.zeros_like(p)
>>> kernels.adam(p, g, m, v, step=1, lr=0.1)  # Adam's first step moves each element by ~lr
>>> p.round(6)  # float32 rounding leaves 0.90000004
array([0.9, 0.9, 0.9, 0.9], dtype=float32)
>>> m  # the first moment, updated in place
array([0.05, 0.05, 0.05, 0.05], dtype=float32)
"""
from .optim import FUNCTIONS as _FUNCTIONS, RULES as _RULES
from .optim.rule import Rule, apply, run_lists, run_workspace  # noqa: F401

# The registry's rules, each by its own name: kernels.adam, ... (the public
# low-level API) and kernels.ADAM_RULE, ... (their descriptions).
globals().update(_FUNCTIONS)
globals().update({f"{name.upper()}_RULE": rule for name, rule in _RULES.items()})

__all__ = list(_FUNCTIONS)
