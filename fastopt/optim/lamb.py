"""Lamb: optax.lamb's rule - Adam's step, rescaled per parameter by a trust ratio.

Per element (g after ``maximize``), then per parameter array::

    m = (1 - beta1) * g + beta1 * m;  v = (1 - beta2) * g * g + beta2 * v
    u = (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps) + weight_decay * p
    r = ||p|| / ||u||                 (1 where either norm is 0)
    p = p - lr * r * u

The norms are over each whole parameter, so a step is two passes over it:
the moments and both sums of squares, then the update. The sums are formed
in double in a fixed order (the same bits for every thread count). optax's
default ``weight_decay`` is also 0. The fused passes: src_c/rules/lamb.pxi.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import MOMENT_DOC, PARAMS_DOC, Optimizer
from .rule import Rule, apply, beta_consts

__all__ = ["RULE", "lamb", "Lamb"]


RULE = Rule(
    name="lamb",
    rule_id=RULE_IDS["lamb"],
    hyper={"lr": V.nonnegative, "betas": V.betas, "eps": V.nonnegative,
           "weight_decay": V.nonnegative, "maximize": V.flag},
    buffers=("exp_avg", "exp_avg_sq"),
    needs=lambda h: (True, True),
    twin=reference.lamb,
    consts=beta_consts,
    whole_arrays=True,
)


def lamb(p, g, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
         weight_decay=0.0, maximize=False):
    """One Lamb step (optax.lamb's rule), in place.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only); the trust ratio is
        formed over the whole of ``p``.
    exp_avg, exp_avg_sq : ndarray
        First and second moment estimates (start at 0; optax's ``mu`` and
        ``nu``), updated in place.
    step : int
        The step count including this step (1 on the first step).
    lr, eps, weight_decay : float
        As optax.lamb's ``learning_rate``, ``eps`` and ``weight_decay``.
    betas : (float, float)
        optax.lamb's ``(b1, b2)``.
    maximize : bool
        Ascend instead of descend.
    """
    apply(RULE, p, g, (exp_avg, exp_avg_sq), step,
          dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize))


class Lamb(Optimizer):
    rule = RULE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *,
                 maximize=False, backend="cython", skip_nonfinite=False,
                 flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize),
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


Lamb.__doc__ = f"""Lamb: Adam's update scaled per parameter by ||p|| / ||update|| (layer-wise trust ratio).

    Same rule and defaults as ``optax.lamb``. Each parameter array is one
    "layer": pass the arrays separately, not concatenated, to keep their
    trust ratios apart.

    Parameters
    ----------
    {PARAMS_DOC}
    {MOMENT_DOC.format(lr="1e-3", weight_decay=0).replace("default 1e-8", "default 1e-6")}
    maximize : bool, default False
    """
