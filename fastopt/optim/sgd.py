"""SGD: torch.optim.SGD's rule - momentum, dampening, Nesterov, L2 weight decay.

Per element (g after ``maximize`` and weight decay)::

    buf = g                              on the buffer's first step
    buf = momentum * buf + (1 - dampening) * g
    d = g + momentum * buf (nesterov) | buf | g (no momentum)
    p = p - lr * d

The fused loop and its per-step scalars: src_c/rules/sgd.pxi.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import PARAMS_DOC, Optimizer
from .rule import Rule, apply

__all__ = ["RULE", "sgd", "SGD"]


def _check_sgd(h):
    if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError("nesterov=True requires momentum > 0 and dampening == 0")


RULE = Rule(
    name="sgd",
    rule_id=RULE_IDS["sgd"],
    hyper={"lr": V.nonnegative, "momentum": V.nonnegative, "dampening": V.finite,
           "weight_decay": V.nonnegative, "nesterov": V.flag, "maximize": V.flag},
    buffers=("momentum_buffer",),
    needs=lambda h: (h["momentum"] != 0,),
    counts_steps=False,
    first_step_buffer="momentum_buffer",  # it starts as a copy of g
    twin=reference.sgd,
    consts=lambda h: dict(h),  # every hyperparameter is a field as it is
    check=_check_sgd,
    # momentum and weight decay move rows the gradient does not list
    sparse=lambda h: "rows" if h["momentum"] == 0 and h["weight_decay"] == 0 else "dense",
)


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
    apply(RULE, p, g, (momentum_buffer,), first_step,
          dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
               nesterov=nesterov, maximize=maximize))


class SGD(Optimizer):
    rule = RULE

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, maximize=False, *, backend="cython",
                 skip_nonfinite=False, flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize), backend=backend,
                         skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


SGD.__doc__ = f"""Stochastic gradient descent, optionally with (Nesterov) momentum.

    Same rule and defaults as ``torch.optim.SGD``.

    Parameters
    ----------
    {PARAMS_DOC}
    lr : float, default 1e-3
    momentum : float, default 0
    dampening : float, default 0
    weight_decay : float, default 0
        L2 penalty added to the gradient.
    nesterov : bool, default False
        Needs ``momentum > 0`` and ``dampening == 0``.
    maximize : bool, default False
    """
