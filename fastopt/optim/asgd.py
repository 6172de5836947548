"""ASGD: torch.optim.ASGD's rule - averaged SGD with a decaying step size.

Per element (g after ``maximize`` and weight decay), with the parameter's
scalar state ``eta`` (starts at lr) and ``mu`` (starts at 1)::

    p = p * (1 - lambd * eta)
    p = p - eta * g
    ax = p                        if mu == 1 (before step t0)
    ax = ax + (p - ax) * mu       otherwise

and after the step, for the next one (t: this step's count)::

    eta = lr / (1 + lambd * lr * t) ** alpha
    mu = 1 / max(1, t - t0)

``eta`` and ``mu`` are kept rounded to float32, as torch keeps them (float32
tensors), so trajectories match torch.optim.ASGD. ``ax`` is the running
average of the parameter, the model to evaluate. The fused loop and the
per-step scalars: src_c/rules/asgd.pxi.
"""
import numpy as np

from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import PARAMS_DOC, Optimizer
from .rule import Rule, apply

__all__ = ["RULE", "asgd", "ASGD"]


def _consts(h):
    return dict(lr=h["lr"], lambd=h["lambd"], asgd_alpha=h["alpha"], t0=h["t0"],
                weight_decay=h["weight_decay"], maximize=h["maximize"])


RULE = Rule(
    name="asgd",
    rule_id=RULE_IDS["asgd"],
    hyper={"lr": V.nonnegative, "lambd": V.nonnegative_finite, "alpha": V.finite,
           "t0": V.finite, "weight_decay": V.nonnegative, "maximize": V.flag},
    buffers=("ax",),
    needs=lambda h: (True,),
    twin=reference.asgd,
    consts=_consts,
    # torch.optim.ASGD: eta starts as a float32 tensor holding lr
    scalar_state={"eta": lambda h: np.float32(h["lr"]), "mu": 1.0},
    # an lr beyond float32's range gives an infinite eta, as in torch
    scalar_kind=V.real,
)


def asgd(p, g, ax, *, step, eta, mu, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6,
         weight_decay=0.0, maximize=False):
    """One ASGD step (torch.optim.ASGD's rule), in place; returns the new ``(eta, mu)``.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only).
    ax : ndarray
        The running average of the parameter (starts at 0), updated in place.
    step : int
        The step count including this step (1 on the first step).
    eta, mu : float
        The step size and averaging weight the previous step left (before
        the first step: ``float32(lr)`` and 1.0).
    lr, lambd, alpha, t0, weight_decay : float
        As in torch.optim.ASGD.
    maximize : bool
        As in torch.optim.ASGD.

    Returns
    -------
    (float, float)
        ``eta`` and ``mu`` after this step, for the next call.
    """
    after = apply(RULE, p, g, (ax,), step,
                  dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay,
                       maximize=maximize), {"eta": eta, "mu": mu})
    return after["eta"], after["mu"]


class ASGD(Optimizer):
    rule = RULE

    def __init__(self, params, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0,
                 maximize=False, *, backend="cython", skip_nonfinite=False,
                 flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0,
                                      weight_decay=weight_decay, maximize=maximize),
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


ASGD.__doc__ = f"""ASGD: averaged stochastic gradient descent.

    Same rule, defaults and state (``eta``, ``mu``, ``ax``) as
    ``torch.optim.ASGD``. The averaged parameter is ``opt.state[i]["ax"]``.

    Parameters
    ----------
    {PARAMS_DOC}
    lr : float, default 1e-2
    lambd : float, default 1e-4
        Decay term: the step multiplies p by ``1 - lambd * eta``.
    alpha : float, default 0.75
        Power of the step-size schedule.
    t0 : float, default 1e6
        The step from which ``ax`` averages (before it, ``ax`` is a copy of p).
    weight_decay : float, default 0
    maximize : bool, default False
    """
