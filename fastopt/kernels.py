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
from typing import Callable, NamedTuple

from . import _dispatch  # noqa: F401  (installs the compute layer for this CPU)
from . import _fastpath
from . import _validation as V

__all__ = ["sgd", "adagrad", "rmsprop", "adam"]


class Rule(NamedTuple):
    """Everything the API layer needs to know about one update rule."""

    name: str
    #: the compute layer's number for this rule
    rule_id: int
    #: hyperparameter -> validation rule (the kernel's keyword arguments)
    hyper: dict
    #: state buffer names, in kernel argument order (torch.optim's names)
    buffers: tuple
    #: hyper -> tuple of bools: which buffers these options use
    needs: Callable
    #: the per-step argument: "step" (count t >= 1) or "first_step" (bool)
    step_arg: str
    #: hyper -> the kernel's step-independent scalars (fields of _fastpath.Scalars)
    consts: Callable
    #: cross-field constraints, hyper -> None or raise
    check: Callable = None

    def scalars(self, hyper, flush_denormals=False):
        """The compiled scalars for validated ``hyper``; the step adds the rest."""
        return _fastpath.Scalars(self.rule_id, **self.consts(hyper),
                                 flush_denormals=flush_denormals)


# Step-independent scalars, computed once per group in double precision;
# _fastpath.Scalars.at_step adds what depends on the step count (Adam's bias
# corrections, Adagrad's decayed lr) with the operations torch.optim uses.

def _adam_consts(h):
    beta1, beta2 = h["betas"]
    if h["decoupled_weight_decay"]:
        # AdamW: p *= 1 - lr * weight_decay, and no decay term in the gradient
        coupled_wd, decay = 0.0, 1 - h["lr"] * h["weight_decay"]
    else:
        coupled_wd, decay = h["weight_decay"], 1.0
    return dict(lr=h["lr"], beta1=beta1, beta2=beta2, eps=h["eps"], weight_decay=coupled_wd,
                decay=decay, amsgrad=h["amsgrad"], maximize=h["maximize"])


def _check_sgd(h):
    if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError("nesterov=True requires momentum > 0 and dampening == 0")


SGD_RULE = Rule(
    name="sgd",
    rule_id=_fastpath.RULE_IDS["sgd"],
    hyper={"lr": V.nonnegative, "momentum": V.nonnegative, "dampening": V.finite,
           "weight_decay": V.nonnegative, "nesterov": V.flag, "maximize": V.flag},
    buffers=("momentum_buffer",),
    needs=lambda h: (h["momentum"] != 0,),
    step_arg="first_step",
    consts=lambda h: dict(h),  # every hyperparameter is a field as it is
    check=_check_sgd,
)

ADAGRAD_RULE = Rule(
    name="adagrad",
    rule_id=_fastpath.RULE_IDS["adagrad"],
    hyper={"lr": V.nonnegative, "lr_decay": V.nonnegative, "weight_decay": V.nonnegative,
           "eps": V.positive, "maximize": V.flag},
    buffers=("sum",),
    needs=lambda h: (True,),
    step_arg="step",
    consts=lambda h: dict(h),
)

RMSPROP_RULE = Rule(
    name="rmsprop",
    rule_id=_fastpath.RULE_IDS["rmsprop"],
    hyper={"lr": V.nonnegative, "alpha": V.unit_interval, "eps": V.positive,
           "weight_decay": V.nonnegative, "momentum": V.nonnegative, "centered": V.flag,
           "maximize": V.flag},
    buffers=("square_avg", "grad_avg", "momentum_buffer"),
    needs=lambda h: (True, h["centered"], h["momentum"] > 0),
    step_arg="step",
    consts=lambda h: dict(h),
)

ADAM_RULE = Rule(
    name="adam",
    rule_id=_fastpath.RULE_IDS["adam"],
    hyper={"lr": V.nonnegative, "betas": V.betas, "eps": V.positive,
           "weight_decay": V.nonnegative, "amsgrad": V.flag, "maximize": V.flag,
           "decoupled_weight_decay": V.flag},
    buffers=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    needs=lambda h: (True, True, h["amsgrad"]),
    step_arg="step",
    consts=_adam_consts,
)


def check_step_value(rule, name, value):
    """Validate the per-step argument of ``rule`` (a step count or a flag)."""
    if rule.step_arg == "step":
        return V.step_count(name, value)
    return V.flag(name, value)


def apply(rule, p, g, buffers, step_value, hyper):
    """Validate one parameter's update under ``rule``, then run it."""
    hyper = V.check_hyper(rule.hyper, hyper)
    if rule.check is not None:
        rule.check(hyper)
    step_value = check_step_value(rule, rule.step_arg, step_value)
    V.check_float_array("p", p, writeable=True)
    V.check_float_array("g", g, writeable=False)
    V.check_like("g", g, "p", p)
    named = {}
    for name, buf, needed in zip(rule.buffers, buffers, rule.needs(hyper)):
        if needed and buf is None:
            raise ValueError(f"{name} is required with these options")
        if buf is not None and not needed:
            raise ValueError(f"{name} was given but these options do not use it")
        if buf is not None:
            V.check_float_array(name, buf, writeable=True)
            V.check_like(name, buf, "p", p)
            V.check_no_overlap(name, buf, {"p": p, **named})
            named[name] = buf
    V.check_no_overlap("g", g, {"p": p, **named})
    run_lists(rule, [p], [g], tuple(None if b is None else [b] for b in buffers),
              step_value, hyper)


def run_lists(rule, params, grads, buffer_lists, step_value, hyper, scalars=None):
    """Run ``rule`` over aligned, already validated lists (one kernel call)."""
    ws = _fastpath.Workspace()
    ws.fill(params, grads, buffer_lists)
    run_workspace(rule, ws, step_value, scalars or rule.scalars(hyper))


def run_workspace(rule, ws, step_value, scalars):
    """Run a loaded workspace; ``step_value`` is the step count or SGD's first_step."""
    if rule.step_arg == "step":
        _fastpath.run_workspace(ws, scalars, step_value, False)
    else:
        _fastpath.run_workspace(ws, scalars, 0, step_value)


# ------------------------------------------------------------------ public API

def sgd(p, g, momentum_buffer=None, *, lr=1e-3, momentum=0.0, dampening=0.0,
        weight_decay=0.0, nesterov=False, maximize=False, first_step=False):
    """One SGD step (torch.optim.SGD's rule), in place.

    Parameters
    ----------
    p : ndarray
        Parameter, updated in place.
    g : ndarray
        Gradient (read only).
    momentum_buffer : ndarray, optional
        Required when ``momentum != 0``; updated in place.
    lr, momentum, dampening, weight_decay : float
        As in torch.optim.SGD.
    nesterov, maximize : bool
        As in torch.optim.SGD.
    first_step : bool
        True on the buffer's first use: it is set to the gradient (after
        maximize and weight decay) instead of being blended, as torch does.
    """
    apply(SGD_RULE, p, g, (momentum_buffer,), first_step,
          dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
               nesterov=nesterov, maximize=maximize))


def adagrad(p, g, state_sum, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
            eps=1e-10, maximize=False):
    """One Adagrad step (torch.optim.Adagrad's rule), in place.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only).
    state_sum : ndarray
        Accumulated squared gradients, updated in place; start it at
        ``initial_accumulator_value``.
    step : int
        The step count including this step (1 on the first step).
    lr, lr_decay, weight_decay, eps : float
        As in torch.optim.Adagrad.
    maximize : bool
        Ascend instead of descend.
    """
    apply(ADAGRAD_RULE, p, g, (state_sum,), step,
          dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
               maximize=maximize))


def rmsprop(p, g, square_avg, grad_avg=None, momentum_buffer=None, *, step=1, lr=1e-2,
            alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
            maximize=False):
    """One RMSprop step (torch.optim.RMSprop's rule), in place.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only).
    square_avg : ndarray
        Running average of squared gradients (starts at 0).
    grad_avg : ndarray, optional
        Running average of gradients; required when ``centered``.
    momentum_buffer : ndarray, optional
        Required when ``momentum > 0``.
    step : int
        The step count including this step. RMSprop's formula does not use
        it; it is validated and kept for symmetry with the other rules.
    lr, alpha, eps, weight_decay, momentum : float
        As in torch.optim.RMSprop.
    centered, maximize : bool
        As in torch.optim.RMSprop.
    """
    apply(RMSPROP_RULE, p, g, (square_avg, grad_avg, momentum_buffer), step,
          dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
               centered=centered, maximize=maximize))


def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3,
         betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
         decoupled_weight_decay=False):
    """One Adam / AdamW step (torch.optim.Adam's rule), in place.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only).
    exp_avg, exp_avg_sq : ndarray
        First and second moment estimates (start at 0), updated in place.
    max_exp_avg_sq : ndarray, optional
        Running maximum of ``exp_avg_sq``; required when ``amsgrad``.
    step : int
        The step count including this step (1 on the first step); sets the
        bias corrections.
    lr, eps, weight_decay : float
        As in torch.optim.Adam.
    betas : (float, float)
        As in torch.optim.Adam.
    amsgrad, maximize : bool
        As in torch.optim.Adam.
    decoupled_weight_decay : bool
        True for AdamW: ``p *= 1 - lr * weight_decay`` instead of adding
        ``weight_decay * p`` to the gradient.
    """
    apply(ADAM_RULE, p, g, (exp_avg, exp_avg_sq, max_exp_avg_sq), step,
          dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
               maximize=maximize, decoupled_weight_decay=decoupled_weight_decay))
