"""Adafactor: torch.optim.Adafactor's rule - a factored second moment and a relative step.

Per parameter at step t (g after ``maximize``), with ``w = t ** beta2_decay``
and ``rho = min(lr, 1 / sqrt(t))``::

    alpha = max(eps2, ||p|| / sqrt(numel)) * rho       (||p|| before the decay)
    p = p * (1 - lr * weight_decay)
    matrix (..., R, C):  row_var = lerp(row_var, mean(g*g, last dim), w)      (..., R, 1)
                         col_var = lerp(col_var, mean(g*g, dim -2), w)        (..., 1, C)
                         var = row_var * col_var / max(mean(row_var over R), eps1)
    fewer than 2 dims:   variance = lerp(variance, g*g, w);  var = variance
    update = g / sqrt(max(var, eps1**2))
    p = p - alpha / max(1, ||update|| / (sqrt(numel) * d)) * update

``eps1`` None is the parameter dtype's machine epsilon. Every parameter of
two or more dimensions keeps only its row and column factors (R + C numbers
per matrix instead of R * C). The norms and means need whole passes over the
parameter, so a step is three: the sums and the factors, the update's norm,
then the update (src_c/rules/adafactor.pxi); all sums in double, in a fixed
order, so the bits do not depend on the thread count.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import PARAMS_DOC, Optimizer
from .rule import Rule, apply

__all__ = ["RULE", "adafactor", "Adafactor"]


def _consts(h):
    eps1, eps2 = h["eps"]
    # eps1 None: the kernel takes its parameter dtype's epsilon (any value
    # written into a torch group later, negative or NaN too, is used as is)
    return dict(lr=h["lr"], beta2_decay=h["beta2_decay"], eps=0.0 if eps1 is None else eps1,
                eps_from_dtype=eps1 is None, eps2=eps2, clip_threshold=h["d"],
                weight_decay=h["weight_decay"], maximize=h["maximize"])


RULE = Rule(
    name="adafactor",
    rule_id=RULE_IDS["adafactor"],
    hyper={"lr": V.nonnegative, "beta2_decay": V.nonpositive, "eps": V.eps_pair,
           "d": V.at_least_one, "weight_decay": V.nonnegative, "maximize": V.flag},
    buffers=("row_var", "col_var", "variance"),
    needs=lambda h: (True, True, True),
    twin=reference.adafactor,
    consts=_consts,
    whole_arrays=True,
    layouts={"row_var": "rows", "col_var": "cols", "variance": "vector"},
    complex_ok=False,
)


def adafactor(p, g, row_var, col_var, variance, *, step, lr=1e-2, beta2_decay=-0.8,
              eps=(None, 1e-3), d=1.0, weight_decay=0.0, maximize=False):
    """One Adafactor step (torch.optim.Adafactor's rule), in place.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only); the step reads ``p``
        as a whole (its norm, and its last two dimensions).
    row_var, col_var : ndarray or None
        For ``p`` of shape ``(..., R, C)``: the row factor, shape
        ``(..., R, 1)``, and the column factor, shape ``(..., 1, C)``, of the
        second moment (start at 0). None for a ``p`` of fewer dimensions.
    variance : ndarray or None
        For ``p`` of 0 or 1 dimensions: the full second moment, shaped like
        ``p`` (starts at 0). None for a matrix.
    step : int
        The step count including this step (1 on the first step).
    lr : float
        The largest relative step size (the step uses ``min(lr, 1/sqrt(step))``).
    beta2_decay : float
        The second moment's weight is ``step ** beta2_decay`` (<= 0).
    eps : (float or None, float)
        ``eps1`` bounds the second moment from below (None: the dtype's
        machine epsilon); ``eps2`` bounds the parameter's RMS in the step size.
    d : float
        The update's RMS above which it is scaled down (>= 1).
    weight_decay : float
        Decoupled decay: ``p *= 1 - lr * weight_decay``.
    maximize : bool
        Ascend instead of descend.
    """
    apply(RULE, p, g, (row_var, col_var, variance), step,
          dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
               maximize=maximize))


class Adafactor(Optimizer):
    rule = RULE

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, maximize=False, backend="cython", skip_nonfinite=False,
                 flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                                      weight_decay=weight_decay, maximize=maximize),
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


Adafactor.__doc__ = f"""Adafactor: factored second moments and a step relative to the parameter's RMS.

    Same rule, defaults and state (``row_var``, ``col_var`` for parameters
    of two or more dimensions, ``variance`` for the others) as
    ``torch.optim.Adafactor``. Pass each weight matrix as its own array: the
    factors are over its last two dimensions, and the norms over the whole
    array. Complex parameters are refused, as in torch.

    Parameters
    ----------
    {PARAMS_DOC}
    lr : float, default 1e-2
        The largest relative step size (``min(lr, 1/sqrt(step))`` is used).
    beta2_decay : float, default -0.8
    eps : (float or None, float), default (None, 1e-3)
    d : float, default 1.0
    weight_decay : float, default 0.0
    maximize : bool, default False
    """
