"""Adam and AdamW: torch.optim.Adam's rule, AMSGrad and decoupled weight decay included.

Per element (g after ``maximize``; coupled weight decay added to g unless
decoupled), with the bias corrections ``bc1 = 1 - beta1**t`` and
``bc2 = 1 - beta2**t`` once per step::

    p = p * (1 - lr * weight_decay)                  (decoupled: AdamW)
    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
    vmax = max(vmax, v), used below for v            (amsgrad)
    p = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)

The fused loop and its per-step scalars: src_c/rules/adam.pxi.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import MOMENT_DOC, PARAMS_DOC, Optimizer
from .rule import Rule, apply, moment_consts

__all__ = ["RULE", "adam", "Adam", "AdamW"]


def _adam_consts(h):
    return {**moment_consts(h), "amsgrad": h["amsgrad"]}


RULE = Rule(
    name="adam",
    rule_id=RULE_IDS["adam"],
    hyper={"lr": V.nonnegative, "betas": V.betas, "eps": V.positive,
           "weight_decay": V.nonnegative, "amsgrad": V.flag, "maximize": V.flag,
           "decoupled_weight_decay": V.flag},
    buffers=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    needs=lambda h: (True, True, h["amsgrad"]),
    twin=reference.adam,
    consts=_adam_consts,
)


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
    apply(RULE, p, g, (exp_avg, exp_avg_sq, max_exp_avg_sq), step,
          dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
               maximize=maximize, decoupled_weight_decay=decoupled_weight_decay))


class Adam(Optimizer):
    rule = RULE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, decoupled_weight_decay=False, *,
                 backend="cython", skip_nonfinite=False, flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay),
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


class AdamW(Adam):
    fixed = {"decoupled_weight_decay": True}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, *, backend="cython",
                 skip_nonfinite=False, flush_denormals=False, **precision):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True,
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


_ADAM_DOC = MOMENT_DOC.format(lr="1e-3", weight_decay="{weight_decay}") + """
    amsgrad : bool, default False
    maximize : bool, default False"""

Adam.__doc__ = f"""Adam, with optional AMSGrad and decoupled (AdamW) weight decay.

    Same rule and defaults as ``torch.optim.Adam``.

    Parameters
    ----------
    {PARAMS_DOC}
    {_ADAM_DOC.format(weight_decay=0)}
    decoupled_weight_decay : bool, default False
        True decays the parameter directly, as AdamW does.

    Examples
    --------
    >>> import numpy as np, fastopt
    >>> w = np.zeros(3)
    >>> opt = fastopt.Adam([w], lr=0.1)
    >>> opt.step([np.array([1.0, -1.0, 0.0])])
    >>> w
    array([-0.1,  0.1,  0. ])
    """


AdamW.__doc__ = f"""AdamW: Adam with decoupled weight decay (default 1e-2).

    Same rule and defaults as ``torch.optim.AdamW``.

    Parameters
    ----------
    {PARAMS_DOC}
    {_ADAM_DOC.format(weight_decay="1e-2")}
    """
