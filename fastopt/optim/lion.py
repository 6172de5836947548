"""Lion: optax.lion's rule - the sign of an interpolated momentum (evolved sign momentum).

Per element (g after ``maximize``)::

    u = sign((1 - beta1) * g + beta1 * m) + weight_decay * p
    p = p - lr * u
    m = (1 - beta2) * g + beta2 * m

The decay is decoupled (it is added to the update, not to g). ``sign`` is
jnp.sign: a NaN stays NaN. No bias correction and no step dependence; the
state keeps a step count all the same, as the torch-style optimizers do.
optax's own default ``weight_decay`` is 1e-3; fastopt's is 0.0, the
PyTorch-world default. The fused loop: src_c/rules/lion.pxi.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import PARAMS_DOC, Optimizer
from .rule import Rule, apply

__all__ = ["RULE", "lion", "Lion"]


def _consts(h):
    beta1, beta2 = h["betas"]
    return dict(lr=h["lr"], beta1=beta1, beta2=beta2, weight_decay=h["weight_decay"],
                maximize=h["maximize"])


RULE = Rule(
    name="lion",
    rule_id=RULE_IDS["lion"],
    hyper={"lr": V.nonnegative, "betas": V.betas, "weight_decay": V.nonnegative,
           "maximize": V.flag},
    buffers=("exp_avg",),
    needs=lambda h: (True,),
    twin=reference.lion,
    consts=_consts,
)


def lion(p, g, exp_avg, *, step=1, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
         maximize=False):
    """One Lion step (optax.lion's rule), in place.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only).
    exp_avg : ndarray
        The momentum (starts at 0; optax's ``mu``), updated in place.
    step : int, default 1
        The step count including this step (the rule does not depend on it).
    lr : float
        The learning rate (optax's ``learning_rate``).
    betas : (float, float)
        ``(b1, b2)``: the interpolation weight of the update's momentum and
        the momentum's decay, each in [0, 1).
    weight_decay : float
        Decoupled decay, added to the signed update.
    maximize : bool
        Ascend instead of descend.
    """
    apply(RULE, p, g, (exp_avg,), step,
          dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))


class Lion(Optimizer):
    rule = RULE

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *,
                 maximize=False, backend="cython", skip_nonfinite=False,
                 flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      maximize=maximize),
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


Lion.__doc__ = f"""Lion: steps of equal size per element, in the sign of an interpolated momentum.

    Same rule as ``optax.lion`` (hard sign), with ``weight_decay=0.0`` by
    default. Its steps are as large as the learning rate in every element,
    so it wants an lr 3-10x smaller than AdamW's.

    Parameters
    ----------
    {PARAMS_DOC}
    lr : float, default 1e-4
    betas : (float, float), default (0.9, 0.99)
    weight_decay : float, default 0
        Decoupled: ``p -= lr * weight_decay * p`` with the signed step.
    maximize : bool, default False

    Examples
    --------
    >>> import numpy as np, fastopt
    >>> w = np.zeros(2)
    >>> opt = fastopt.Lion([w], lr=0.1)
    >>> opt.step([np.array([3.0, -0.5])])
    >>> w.round(6)
    array([-0.1,  0.1])
    """
