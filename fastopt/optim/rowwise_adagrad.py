"""RowWiseAdagrad: FBGEMM's exact row-wise Adagrad - one accumulator per row.

A row is a vector along the last axis (an embedding of a table). Per row
``r`` of ``D`` elements (g after ``maximize`` and coupled weight decay)::

    sum[r] = sum[r] + mean(g_r * g_r)          (the mean formed in double)
    p_r = p_r - lr / (sqrt(sum[r]) + eps) * g_r

so the state is ``p.shape[:-1] + (1,)``: rows x 1 instead of rows x D, the
reason to use it on large tables. A 1-D parameter is one row (a 0-d one, a
row of one). With sparse gradients (fastopt.SparseRows, for parameters of two
or more dimensions) only the listed rows move.

The fused loop and its per-step scalars: src_c/rules/rowwise_adagrad.pxi.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import PARAMS_DOC, Optimizer
from .rule import Rule, apply

__all__ = ["RULE", "rowwise_adagrad", "RowWiseAdagrad"]


RULE = Rule(
    name="rowwise_adagrad",
    rule_id=RULE_IDS["rowwise_adagrad"],
    hyper={"lr": V.nonnegative, "eps": V.positive, "weight_decay": V.nonnegative,
           "maximize": V.flag},
    buffers=("sum",),
    needs=lambda h: (True,),
    twin=reference.rowwise_adagrad,
    consts=lambda h: dict(h),
    initial={"sum": "initial_accumulator_value"},
    state_hyper={"initial_accumulator_value": V.nonnegative},
    layouts={"sum": "row_sums"},
    complex_ok=False,  # a real view would make a row twice as long
    whole_arrays=True,  # its rows are each array's own: packing arrays would join them
    sparse=lambda h: "rows",
)


def rowwise_adagrad(p, g, state_sum, *, step=1, lr=1e-2, eps=1e-10, weight_decay=0.0,
                    maximize=False):
    """One row-wise Adagrad step (FBGEMM's rule), in place.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only).
    state_sum : ndarray
        One accumulated mean square per row, shaped ``p.shape[:-1] + (1,)``.
    step : int
        The step count including this step (the rule does not use it).
    lr, eps, weight_decay : float
        Learning rate, the denominator's floor, coupled (L2) weight decay.
    maximize : bool
        Ascend instead of descend.
    """
    apply(RULE, p, g, (state_sum,), step,
          dict(lr=lr, eps=eps, weight_decay=weight_decay, maximize=maximize))


class RowWiseAdagrad(Optimizer):
    rule = RULE

    def __init__(self, params, lr=1e-2, eps=1e-10, weight_decay=0.0,
                 initial_accumulator_value=0.0, maximize=False, *, backend="cython",
                 skip_nonfinite=False, flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      maximize=maximize),
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


RowWiseAdagrad.__doc__ = f"""Row-wise Adagrad (FBGEMM's): one accumulator per row of the last axis.

    For embedding tables: the state is one number per row. torch.optim has
    no such class; the rule is FBGEMM's ``EXACT_ROWWISE_ADAGRAD``.

    Parameters
    ----------
    {PARAMS_DOC}
    lr : float, default 1e-2
    eps : float, default 1e-10
    weight_decay : float, default 0
    initial_accumulator_value : float, default 0
    maximize : bool, default False
    """
