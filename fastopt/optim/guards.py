"""Step guards: global-norm clipping and the weight average, inside the step.

A training step is rarely the update alone. torch's recipe is
``clip_grad_norm_`` (a read pass over every gradient, then a pass that scales
them in place), the fused step, and an ``AveragedModel`` update (a read of
every parameter, a read and a write of its average): at DRAM sizes each pass
costs about what the update does. An optimizer made with these options does
the extra work inside its step:

``max_grad_norm``
    One read pass adds up the squares of every gradient of the step, in
    fixed blocks summed in a fixed order (:func:`norm_pass`, which
    fastopt.clip_grad_norm uses too): the norm has the same bits for any
    thread count and SIMD level. The same pass notes NaN/Inf, which is all
    ``skip_nonfinite`` needs. torch's coefficient ``min(1, max_norm / (norm
    + 1e-6))`` is folded into the kernels' scalars (the sign they already
    multiply every gradient by), so the rule reads ``g * coef`` and no
    gradient is written: unlike ``clip_grad_norm_``, the caller's gradients
    are left as they were. ``last_grad_norm`` is the norm before clipping.
``ema_decay``
    After the update every parameter's average moves towards it (in the
    same pass as the update, block by block while the parameter is in the
    cache, when every group runs as one plain float32/float64 kernel call
    and the averages' checks are cached; else in a pass of its own, which
    gives the same bits),
    ``avg = lerp(avg, p, 1 - decay)`` (``get_ema_multi_avg_fn``); the first
    step makes it a copy (``AveragedModel``'s first ``update_parameters``).
    Every parameter of every group is averaged each step, with a gradient or
    not, as AveragedModel averages the whole model. The average has its
    parameter's dtype and lives in the parameter's state as ``"ema_param"``
    (in ``state_dict`` and checkpoints). A half average rounds to nearest
    even, or stochastically under ``stochastic_rounding`` (an increment far
    below half an ulp never moves it otherwise).

A NaN in the gradients makes the norm NaN. With ``skip_nonfinite`` the step
is skipped (nothing is updated, the averages included); without it the step
goes on with torch's NaN coefficient, as ``clip_grad_norm_`` then a step do.
"""
import math

import numpy as np

from .. import _fastpath
from .. import _precision
from .. import _validation as V
from .. import reference

#: the state key of a parameter's weight average
EMA = "ema_param"

#: the stream the averages' stochastic rounding draws from (apart from the update's)
_EMA_STREAM = 0xE3A5_0000_0000_0001

DOC = """max_grad_norm : float, optional
        Clip the gradients of each step to this global L2 norm, inside the
        step (torch's ``clip_grad_norm_`` coefficient; the gradients
        themselves are not modified). ``last_grad_norm`` holds each step's
        norm before clipping.
    ema_decay : float in [0, 1), optional
        Keep an exponential moving average of every parameter
        (``AveragedModel`` with ``get_ema_multi_avg_fn(ema_decay)``), updated
        by each step: see :meth:`ema_params` and :meth:`averaged`."""


def check(max_grad_norm, ema_decay):
    """The validated ``(max_grad_norm, ema_decay)``: None or a float each."""
    if max_grad_norm is not None:
        max_grad_norm = V.nonnegative("max_grad_norm", max_grad_norm)
        if math.isinf(max_grad_norm):
            raise ValueError("max_grad_norm must be finite (None turns clipping off), got inf")
    if ema_decay is not None:
        ema_decay = V.unit_interval("ema_decay", ema_decay)
    return max_grad_norm, ema_decay


def norm_pass(arrays, kinds=None):
    """The global L2 norm of validated arrays in one read pass: ``(workspace, norm,
    nonfinite)``, the workspace loaded with them (clipping scales through it).

    ``kinds``: each array's storage kind (Workspace.fill), for arrays whose
    dtype does not say it (a torch bfloat16 tensor seen as its uint16 bits).
    The squares are summed in double in a fixed order (_kernels.pxi's
    grad_stats); finite elements whose squares overflow a double still give
    their norm (:func:`_scaled_norm`).
    """
    ws = _fastpath.Workspace()
    ws.fill(arrays, arrays, (), kinds)
    sumsq, nonfinite = _fastpath.grad_stats(ws)
    norm = math.sqrt(sumsq)
    if math.isinf(norm) and not nonfinite:
        norm = _scaled_norm(arrays)
    return ws, norm, nonfinite


def _scaled_norm(arrays):
    """The norm of finite arrays whose sum of squares overflows a double.

    Squares of |g| > ~1.3e154 overflow (float64 only); dividing by the largest
    magnitude first keeps every square <= 1. Rare, so plain NumPy.
    """
    top = max(float(np.max(np.abs(a))) for a in arrays if a.size)
    total = math.fsum(float(np.sum(np.square(np.asarray(a, np.float64) / top))) for a in arrays)
    return top * math.sqrt(total)  # inf only if the norm itself exceeds float64


def grad_norm(arrays, grad_scale=1.0, kinds=None):
    """``(norm, nonfinite)`` of validated gradient arrays, which carry ``grad_scale``
    (``kinds``: :func:`norm_pass`'s)."""
    if not arrays:
        return 0.0, False
    _, norm, nonfinite = norm_pass(arrays, kinds)
    return norm / grad_scale, nonfinite


def coefficient(norm, max_norm):
    """torch's clipping factor: ``min(1, max_norm / (norm + 1e-6))``, NaN for a NaN norm
    (torch.clamp keeps NaN), 0 for an infinite one."""
    coef = max_norm / (norm + 1e-6)
    return coef if coef < 1.0 or coef != coef else 1.0


def scaled_grad(g, coef):
    """``g * coef`` as the kernels read it, for the NumPy twins: a half gradient is
    widened first (the kernels scale it in float32), the factor rounded to the dtype."""
    if g.dtype.itemsize == 2:
        g = g.astype(np.float32)
    return g * g.dtype.type(coef)


def check_average(label, avg, p_label, p):
    """``avg`` can be ``p``'s average: an array of its dtype and shape (TypeError/ValueError)."""
    V.check_float_array(label, avg, writeable=True, complex_ok=True, half_ok=True)
    if avg.dtype != p.dtype or avg.shape != p.shape:
        raise TypeError(f"{label} must be an array of {p_label}'s dtype and shape "
                        f"({p.dtype} {p.shape}), got {avg.dtype} {avg.shape}")


def average(avgs, params, decay, backend, keys=None, elements=None):
    """Move each average in ``avgs`` towards its parameter (validated, aligned lists).

    ``keys``: per pair, the stochastic-rounding key of a half average (None:
    to nearest even); ``elements``: each parameter's element name where its
    dtype does not say it (fastopt.torch's bfloat16 bits). One pass over all.
    """
    if not avgs:
        return
    if backend == "numpy":
        weight = 1.0 - decay
        keys = _stream_keys(keys, len(avgs))
        for a, p, key in zip(avgs, params, keys):
            reference.ema(V.real_view(a), V.real_view(p), weight, key)
        return
    run_average(average_workspace(avgs, params, keys, elements), decay)


def _stream_keys(keys, count):
    return [None if k is None else _precision._splitmix64(k ^ _EMA_STREAM)
            for k in (keys or [None] * count)]


def average_workspace(avgs, params, keys=None, elements=None):
    """The averaging pass over ``avgs`` and ``params`` (see :func:`average`), loaded
    for :func:`run_average`; the averages are its protected spans, for
    ``_fastpath.averages_clear``. It holds raw pointers: keep the arrays alive."""
    avgs = [V.real_view(a) for a in avgs]
    params = [V.real_view(p) for p in params]
    elements = elements or [_precision.element(p.dtype) for p in params]
    kinds = [_precision.Precision().kind(e) for e in elements]
    ws = _fastpath.Workspace()
    ws.fill(avgs, params, (), kinds, None, _stream_keys(keys, len(avgs)))
    ws.protect_arrays(avgs)
    return ws


def run_average(ws, decay):
    """One averaging pass over a workspace of :func:`average_workspace`."""
    _fastpath.ema(ws, 1.0 - decay)
