"""Adamax: torch.optim.Adamax's rule, Adam with an infinity norm.

Per element (g after ``maximize`` and coupled weight decay), with
``clr = lr / (1 - beta1**t)`` once per step::

    m = lerp(m, g, 1 - beta1)
    u = max(beta2 * u, |g| + eps)          (NaN on either side wins, as torch.maximum)
    p = p - clr * m / u

The fused loop and its per-step scalars: src_c/rules/adamax.pxi.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import MOMENT_DOC, PARAMS_DOC, Optimizer
from .rule import Rule, apply, beta_consts

__all__ = ["RULE", "adamax", "Adamax"]


RULE = Rule(
    name="adamax",
    rule_id=RULE_IDS["adamax"],
    hyper={"lr": V.nonnegative, "betas": V.betas, "eps": V.nonnegative,
           "weight_decay": V.nonnegative, "maximize": V.flag},
    buffers=("exp_avg", "exp_inf"),
    needs=lambda h: (True, True),
    twin=reference.adamax,
    consts=beta_consts,
)


def adamax(p, g, exp_avg, exp_inf, *, step, lr=2e-3, betas=(0.9, 0.999), eps=1e-8,
           weight_decay=0.0, maximize=False):
    """One Adamax step (torch.optim.Adamax's rule), in place.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only).
    exp_avg, exp_inf : ndarray
        First moment and exponentially weighted infinity norm (start at 0),
        updated in place.
    step : int
        The step count including this step (1 on the first step); sets the
        bias correction.
    lr, eps, weight_decay : float
        As in torch.optim.Adamax.
    betas : (float, float)
        As in torch.optim.Adamax.
    maximize : bool
        As in torch.optim.Adamax.
    """
    apply(RULE, p, g, (exp_avg, exp_inf), step,
          dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize))


class Adamax(Optimizer):
    rule = RULE

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 maximize=False, backend="cython", skip_nonfinite=False, flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize),
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


Adamax.__doc__ = f"""Adamax: Adam with the infinity norm of past gradients in place of the second moment.

    Same rule and defaults as ``torch.optim.Adamax`` (``maximize`` is
    keyword-only there too).

    Parameters
    ----------
    {PARAMS_DOC}
    {MOMENT_DOC.format(lr="2e-3", weight_decay=0)}
    maximize : bool, default False

    Examples
    --------
    >>> import numpy as np, fastopt
    >>> w = np.zeros(2)
    >>> opt = fastopt.Adamax([w], lr=0.1)
    >>> opt.step([np.array([1.0, -1.0])])
    >>> w.round(6)
    array([-0.1,  0.1])
    """
