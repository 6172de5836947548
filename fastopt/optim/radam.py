"""RAdam: torch.optim.RAdam's rule - Adam with a rectified adaptive step.

Per element (g after ``maximize``; weight decay coupled into g, or decoupled
as AdamW does). Once per step, in double: ``bc1 = 1 - beta1**t``,
``bc2 = 1 - beta2**t``, the length of the approximated simple moving average
``rho_t = rho_inf - 2 t beta2**t / bc2`` with ``rho_inf = 2 / (1 - beta2) - 1``,
and, where ``rho_t > 5``, the rectification term
``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``::

    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
    p = p - lr * (m / bc1) * sqrt(bc2) / (sqrt(v) + eps) * r_t    if rho_t > 5
    p = p - lr * (m / bc1)                                         otherwise

The first steps (rho_t <= 5: the first five with the default betas) are
plain momentum SGD. The fused loop and its per-step scalars:
src_c/rules/radam.pxi.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import MOMENT_DOC, PARAMS_DOC, Optimizer
from .rule import Rule, apply, moment_consts

__all__ = ["RULE", "radam", "RAdam"]


RULE = Rule(
    name="radam",
    rule_id=RULE_IDS["radam"],
    hyper={"lr": V.nonnegative, "betas": V.betas, "eps": V.nonnegative,
           "weight_decay": V.nonnegative, "decoupled_weight_decay": V.flag,
           "maximize": V.flag},
    buffers=("exp_avg", "exp_avg_sq"),
    needs=lambda h: (True, True),
    twin=reference.radam,
    consts=moment_consts,
)


def radam(p, g, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
          weight_decay=0.0, decoupled_weight_decay=False, maximize=False):
    """One RAdam step (torch.optim.RAdam's rule), in place.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only).
    exp_avg, exp_avg_sq : ndarray
        First and second moment estimates (start at 0), updated in place.
    step : int
        The step count including this step (1 on the first step); sets the
        bias corrections and whether the step is rectified.
    lr, eps, weight_decay : float
        As in torch.optim.RAdam.
    betas : (float, float)
        As in torch.optim.RAdam.
    decoupled_weight_decay, maximize : bool
        As in torch.optim.RAdam.
    """
    apply(RULE, p, g, (exp_avg, exp_avg_sq), step,
          dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
               decoupled_weight_decay=decoupled_weight_decay, maximize=maximize))


class RAdam(Optimizer):
    rule = RULE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, *, maximize=False, backend="cython",
                 skip_nonfinite=False, flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize),
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


RAdam.__doc__ = f"""RAdam: Adam whose adaptive step is rectified while its variance estimate is young.

    Same rule and defaults as ``torch.optim.RAdam`` (``maximize`` is
    keyword-only there too).

    Parameters
    ----------
    {PARAMS_DOC}
    {MOMENT_DOC.format(lr="1e-3", weight_decay=0)}
    decoupled_weight_decay : bool, default False
        True decays the parameter directly, as AdamW does.
    maximize : bool, default False

    Examples
    --------
    >>> import numpy as np, fastopt
    >>> w = np.zeros(2)
    >>> opt = fastopt.RAdam([w], lr=0.1)
    >>> opt.step([np.array([1.0, -1.0])])   # an early step: momentum SGD
    >>> w.round(6)
    array([-0.1,  0.1])
    """
