"""SparseAdam: torch.optim.SparseAdam's lazy Adam, for embedding tables.

Per element of the rows a step lists (g after ``maximize``), with
``step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t)`` once per step::

    m = m + (1 - beta1) * (g - m)
    v = v + (1 - beta2) * (g * g - v)
    p = p - step_size * (m / (sqrt(v) + eps))

Rows a sparse gradient (fastopt.SparseRows) does not list keep their moments:
that is what makes it lazy, and what makes it differ from Adam, beside the
bias correction of v folded into the step size. ``t`` counts the steps in
which the parameter had a gradient. A dense gradient lists every row (torch
refuses one; here it is Adam's update in SparseAdam's form).

The fused loop and its per-step scalars: src_c/rules/sparse_adam.pxi.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import PARAMS_DOC, Optimizer
from .rule import Rule, apply

__all__ = ["RULE", "sparse_adam", "SparseAdam"]


def _consts(h):
    beta1, beta2 = h["betas"]
    return dict(lr=h["lr"], beta1=beta1, beta2=beta2, eps=h["eps"], maximize=h["maximize"])


RULE = Rule(
    name="sparse_adam",
    rule_id=RULE_IDS["sparse_adam"],
    hyper={"lr": V.nonnegative, "betas": V.betas, "eps": V.positive, "maximize": V.flag},
    buffers=("exp_avg", "exp_avg_sq"),
    needs=lambda h: (True, True),
    twin=reference.sparse_adam,
    consts=_consts,
    sparse=lambda h: "rows",
)


def sparse_adam(p, g, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                maximize=False):
    """One SparseAdam step (torch.optim.SparseAdam's rule) on every element, in place.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only): the rows to update.
    exp_avg, exp_avg_sq : ndarray
        First and second moment estimates (start at 0), updated in place.
    step : int
        The step count including this step (1 on the first step).
    lr, eps : float
        As in torch.optim.SparseAdam.
    betas : (float, float)
        As in torch.optim.SparseAdam.
    maximize : bool
        Ascend instead of descend.
    """
    apply(RULE, p, g, (exp_avg, exp_avg_sq), step,
          dict(lr=lr, betas=betas, eps=eps, maximize=maximize))


class SparseAdam(Optimizer):
    rule = RULE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False, *,
                 backend="cython", skip_nonfinite=False, flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, maximize=maximize),
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


SparseAdam.__doc__ = f"""SparseAdam: lazy Adam, updating only the rows a gradient lists.

    Same rule and defaults as ``torch.optim.SparseAdam``; pass gradients as
    :class:`fastopt.SparseRows` (a dense gradient lists every row).

    Parameters
    ----------
    {PARAMS_DOC}
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    maximize : bool, default False

    Examples
    --------
    >>> import numpy as np, fastopt
    >>> table = np.zeros((4, 2))
    >>> opt = fastopt.SparseAdam([table], lr=0.1)
    >>> opt.step([fastopt.SparseRows([1, 1], np.ones((2, 2)))])
    >>> table[1].round(6)   # torch's SparseAdam: eps is added before bias correction
    array([-0.1, -0.1])
    """
