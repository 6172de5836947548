"""Adadelta: torch.optim.Adadelta's rule - units-consistent steps from two running averages.

Per element (g after ``maximize`` and weight decay)::

    v = rho * v + (1 - rho) * g * g
    delta = sqrt(u + eps) / sqrt(v + eps) * g
    u = rho * u + (1 - rho) * delta * delta
    p = p - lr * delta

``v`` is ``square_avg`` and ``u`` is ``acc_delta``, torch's state names. The
fused loop: src_c/rules/adadelta.pxi.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import PARAMS_DOC, Optimizer
from .rule import Rule, apply

__all__ = ["RULE", "adadelta", "Adadelta"]


def _rho(name, value):
    return V.in_interval(name, value, 0.0, 1.0)


RULE = Rule(
    name="adadelta",
    rule_id=RULE_IDS["adadelta"],
    hyper={"lr": V.nonnegative, "rho": _rho, "eps": V.nonnegative,
           "weight_decay": V.nonnegative, "maximize": V.flag},
    buffers=("square_avg", "acc_delta"),
    needs=lambda h: (True, True),
    twin=reference.adadelta,
    consts=lambda h: dict(h),
)


def adadelta(p, g, square_avg, acc_delta, *, step, lr=1.0, rho=0.9, eps=1e-6,
             weight_decay=0.0, maximize=False):
    """One Adadelta step (torch.optim.Adadelta's rule), in place.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only).
    square_avg, acc_delta : ndarray
        Running averages of squared gradients and of squared updates (start
        at 0), updated in place.
    step : int
        The step count including this step (the rule does not depend on it;
        torch keeps it in the state).
    lr, rho, eps, weight_decay : float
        As in torch.optim.Adadelta.
    maximize : bool
        As in torch.optim.Adadelta.
    """
    apply(RULE, p, g, (square_avg, acc_delta), step,
          dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize))


class Adadelta(Optimizer):
    rule = RULE

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *,
                 maximize=False, backend="cython", skip_nonfinite=False,
                 flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize),
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


Adadelta.__doc__ = f"""Adadelta: steps scaled by the ratio of running RMS of updates and of gradients.

    Same rule and defaults as ``torch.optim.Adadelta`` (``maximize`` is
    keyword-only there too).

    Parameters
    ----------
    {PARAMS_DOC}
    lr : float, default 1.0
        Scales the delta (torch's addition to the original rule).
    rho : float, default 0.9
        Smoothing constant of both running averages, in [0, 1].
    eps : float, default 1e-6
    weight_decay : float, default 0
    maximize : bool, default False
    """
