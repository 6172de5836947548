"""NAdam: torch.optim.NAdam's rule - Adam with Nesterov momentum and momentum decay.

Per element (g after ``maximize``; weight decay coupled into g, or decoupled
as AdamW does), with ``mu_t = beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))``
and the parameter's running product ``mu_product *= mu_t``, once per step::

    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
    denom = sqrt(v / (1 - beta2 ** t)) + eps
    p = p - lr * (1 - mu_t) / (1 - mu_product) * g / denom
    p = p - lr * mu_{t+1} / (1 - mu_product * mu_{t+1}) * m / denom

``mu_product`` is per-parameter scalar state (``state[i]["mu_product"]``), kept
rounded to float32 as torch keeps it (a float32 tensor), so trajectories match
torch.optim.NAdam. The fused loop and the per-step scalars, mu_product's
next value included: src_c/rules/nadam.pxi.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import MOMENT_DOC, PARAMS_DOC, Optimizer
from .rule import Rule, apply, moment_consts

__all__ = ["RULE", "nadam", "NAdam"]


def _scalar_error(h, step):
    beta1, rate = h["betas"][0], h["momentum_decay"]
    # torch divides by zero here (ZeroDivisionError); the step is refused cleanly
    return (f"NAdam: mu_product rounds to 1 at step {step} (betas[0]={beta1!r}, "
            f"momentum_decay={rate!r}), so the step sizes divide by zero; use a smaller "
            "betas[0] or momentum_decay")


def _consts(h):
    return dict(moment_consts(h), momentum_decay=h["momentum_decay"])


RULE = Rule(
    name="nadam",
    rule_id=RULE_IDS["nadam"],
    hyper={"lr": V.nonnegative, "betas": V.betas, "eps": V.positive,
           "weight_decay": V.nonnegative, "momentum_decay": V.nonnegative,
           "decoupled_weight_decay": V.flag, "maximize": V.flag},
    buffers=("exp_avg", "exp_avg_sq"),
    needs=lambda h: (True, True),
    twin=reference.nadam,
    consts=_consts,
    scalar_state={"mu_product": 1.0},
    scalar_error=_scalar_error,
)


def nadam(p, g, exp_avg, exp_avg_sq, *, step, mu_product, lr=2e-3, betas=(0.9, 0.999),
          eps=1e-8, weight_decay=0.0, momentum_decay=4e-3, decoupled_weight_decay=False,
          maximize=False):
    """One NAdam step (torch.optim.NAdam's rule), in place; returns the new ``mu_product``.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only).
    exp_avg, exp_avg_sq : ndarray
        First and second moment estimates (start at 0), updated in place.
    step : int
        The step count including this step (1 on the first step).
    mu_product : float
        The product of the momentum coefficients of the earlier steps (1.0
        before the first step).
    lr, eps, weight_decay, momentum_decay : float
        As in torch.optim.NAdam.
    betas : (float, float)
        As in torch.optim.NAdam.
    decoupled_weight_decay, maximize : bool
        As in torch.optim.NAdam.

    Returns
    -------
    float
        ``mu_product`` after this step, for the next call.
    """
    return apply(RULE, p, g, (exp_avg, exp_avg_sq), step,
                 dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                      momentum_decay=momentum_decay,
                      decoupled_weight_decay=decoupled_weight_decay, maximize=maximize),
                 {"mu_product": mu_product})["mu_product"]


class NAdam(Optimizer):
    rule = RULE

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, maximize=False,
                 backend="cython", skip_nonfinite=False, flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize),
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


NAdam.__doc__ = f"""NAdam: Adam with Nesterov momentum and momentum decay.

    Same rule, defaults and state (``mu_product`` included) as ``torch.optim.NAdam``.

    Parameters
    ----------
    {PARAMS_DOC}
    {MOMENT_DOC.format(lr="2e-3", weight_decay=0)}
    momentum_decay : float, default 4e-3
    decoupled_weight_decay : bool, default False
        True decays the parameter directly, as AdamW does (NAdamW).
    maximize : bool, default False
    """
