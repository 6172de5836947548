"""Gradient clipping, as torch.nn.utils does it, in one fused pass.

The global norm is a single pass over all gradients, in double precision,
in fixed blocks summed in a fixed order: the same value for every thread
count and SIMD level, so a clipped run is reproducible anywhere.
"""
import math

import numpy as np

from .. import _fastpath
from .. import _validation as V
from ..optim.guards import norm_pass as _stats

__all__ = ["clip_grad_norm", "clip_grad_value", "grad_norm"]


def _as_list(grads, writeable):
    """The gradient arrays (None entries dropped), checked; names for messages."""
    if isinstance(grads, np.ndarray):
        named = [("grads", grads)]
    elif isinstance(grads, dict):
        named = [(f"grads[{k!r}]", g) for k, g in grads.items()]
    elif isinstance(grads, (list, tuple)):
        named = [(f"grads[{i}]", g) for i, g in enumerate(grads)]
    else:
        raise TypeError(f"grads must be an array, a list or a dict of arrays, got {type(grads).__name__}")
    arrays = []
    for name, g in named:
        if g is None:
            continue
        V.check_float_array(name, g, writeable=writeable)
        arrays.append(g)
    if writeable:
        V.check_distinct_params(list(zip((n for n, g in named if g is not None), arrays)))
    return arrays


def grad_norm(grads):
    """The global L2 norm of ``grads``.

    A float: inf if an element is inf or the norm exceeds float64's range,
    nan if an element is NaN. Squares that would overflow on the way to a
    representable norm (elements beyond ~1e154) do not make it inf.
    """
    _, norm, nonfinite = _stats(_as_list(grads, writeable=False))
    return math.nan if nonfinite and not math.isinf(norm) else norm


def clip_grad_norm(grads, max_norm, error_if_nonfinite=False):
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``.

    Like ``torch.nn.utils.clip_grad_norm_``: the coefficient is
    ``max_norm / (norm + 1e-6)``, applied only when it is below 1.

    Parameters
    ----------
    grads : ndarray, list or dict of ndarray
        Writeable, C-contiguous float32/float64 arrays; None entries are skipped.
    max_norm : float
        The largest norm allowed (>= 0).
    error_if_nonfinite : bool
        Raise ValueError when the norm is NaN or infinite. Otherwise such
        gradients are left as they are (scaling would only spread the NaN,
        or, for a norm beyond float64, zero every gradient as torch does).

    Returns
    -------
    float
        The global norm before clipping.
    """
    max_norm = V.nonnegative("max_norm", max_norm)
    ws, norm, nonfinite = _stats(_as_list(grads, writeable=True))
    if nonfinite or math.isinf(norm):
        if error_if_nonfinite:
            why = "gradients hold NaN or Inf" if nonfinite else "beyond float64's range"
            raise ValueError(f"the total gradient norm is {norm}: {why}")
        return math.nan if nonfinite and not math.isinf(norm) else norm
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        _fastpath.scale(ws, coef)
    return norm


def clip_grad_value(grads, clip_value):
    """Clamp every gradient element to ``[-clip_value, clip_value]``, in place."""
    clip_value = V.nonnegative("clip_value", clip_value)
    for g in _as_list(grads, writeable=True):
        np.clip(g, -clip_value, clip_value, out=g)
