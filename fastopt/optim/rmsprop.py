"""RMSprop: torch.optim.RMSprop's rule - steps scaled by a running RMS of the gradients.

Per element (g after ``maximize`` and weight decay)::

    sq = alpha * sq + (1 - alpha) * g * g
    avg = sqrt(sq - ga * ga) + eps, ga = lerp(ga, g, 1 - alpha)   (centered)
    avg = sqrt(sq) + eps                                         (otherwise)
    buf = momentum * buf + g / avg;  p = p - lr * buf             (momentum > 0)
    p = p - lr * g / avg                                          (otherwise)

The fused loop: src_c/rules/rmsprop.pxi.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import PARAMS_DOC, Optimizer
from .rule import Rule, apply

__all__ = ["RULE", "rmsprop", "RMSprop"]


RULE = Rule(
    name="rmsprop",
    rule_id=RULE_IDS["rmsprop"],
    hyper={"lr": V.nonnegative, "alpha": V.unit_interval, "eps": V.positive,
           "weight_decay": V.nonnegative, "momentum": V.nonnegative, "centered": V.flag,
           "maximize": V.flag},
    buffers=("square_avg", "grad_avg", "momentum_buffer"),
    needs=lambda h: (True, h["centered"], h["momentum"] > 0),
    twin=reference.rmsprop,
    consts=lambda h: dict(h),
)


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
    apply(RULE, p, g, (square_avg, grad_avg, momentum_buffer), step,
          dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
               centered=centered, maximize=maximize))


class RMSprop(Optimizer):
    rule = RULE

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False, maximize=False, *, backend="cython",
                 skip_nonfinite=False, flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered,
                                      maximize=maximize), backend=backend,
                         skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


RMSprop.__doc__ = f"""RMSprop: steps scaled by a running RMS of the gradients.

    Same rule and defaults as ``torch.optim.RMSprop`` (eps outside the sqrt).

    Parameters
    ----------
    {PARAMS_DOC}
    lr : float, default 1e-2
    alpha : float, default 0.99
    eps : float, default 1e-8
    weight_decay : float, default 0
    momentum : float, default 0
    centered : bool, default False
    maximize : bool, default False
    """
