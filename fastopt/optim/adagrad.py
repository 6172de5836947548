"""Adagrad: torch.optim.Adagrad's rule - step sizes from accumulated squared gradients.

Per element (g after ``maximize`` and weight decay), with
``clr = lr / (1 + (t - 1) * lr_decay)`` once per step::

    sum = sum + g * g                    (starts at initial_accumulator_value)
    p = p - clr * g / (sqrt(sum) + eps)

Sparse-row gradients (fastopt.SparseRows) update only the listed rows, as
torch's sparse path does, which forms the last line as
``p + (-clr) * (g / (sqrt(sum) + eps))``; weight decay refuses them.

The fused loop and its per-step scalars: src_c/rules/adagrad.pxi.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import PARAMS_DOC, Optimizer
from .rule import Rule, apply

__all__ = ["RULE", "adagrad", "Adagrad"]


def _sparse_form(h):
    if h["weight_decay"] != 0:
        raise ValueError("weight_decay is not compatible with sparse gradients (as in "
                         "torch.optim.Adagrad): set it to 0 or pass dense gradients")
    return "rows"


RULE = Rule(
    name="adagrad",
    rule_id=RULE_IDS["adagrad"],
    hyper={"lr": V.nonnegative, "lr_decay": V.nonnegative, "weight_decay": V.nonnegative,
           "eps": V.positive, "maximize": V.flag},
    buffers=("sum",),
    needs=lambda h: (True,),
    twin=reference.adagrad,
    consts=lambda h: dict(h),
    initial={"sum": "initial_accumulator_value"},
    state_hyper={"initial_accumulator_value": V.nonnegative},
    sparse=_sparse_form,
)


def adagrad(p, g, state_sum, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
            eps=1e-10, maximize=False):
    """One Adagrad step (torch.optim.Adagrad's rule), in place.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only).
    state_sum : ndarray
        Accumulated squared gradients, updated in place; start it at
        ``initial_accumulator_value``.
    step : int
        The step count including this step (1 on the first step).
    lr, lr_decay, weight_decay, eps : float
        As in torch.optim.Adagrad.
    maximize : bool
        Ascend instead of descend.
    """
    apply(RULE, p, g, (state_sum,), step,
          dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
               maximize=maximize))


class Adagrad(Optimizer):
    rule = RULE

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, maximize=False, *,
                 backend="cython", skip_nonfinite=False, flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps, maximize=maximize), backend=backend,
                         skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


Adagrad.__doc__ = f"""Adagrad: per-element step sizes from accumulated squared gradients.

    Same rule and defaults as ``torch.optim.Adagrad``.

    Parameters
    ----------
    {PARAMS_DOC}
    lr : float, default 1e-2
    lr_decay : float, default 0
    weight_decay : float, default 0
    initial_accumulator_value : float, default 0
    eps : float, default 1e-10
    maximize : bool, default False
    """
