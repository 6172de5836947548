"""Sparse-row gradients: :class:`SparseRows`, and the checks a step runs on one.

An embedding table's gradient touches a few rows of many. ``SparseRows``
lists them: ``indices`` along the parameter's leading axis (they may repeat:
repeated rows add up, as torch's ``coalesce`` adds them) and one value row
per index. It stands wherever a dense gradient may, for the optimizers whose
rule takes one (``Rule.sparse``: SGD, Adagrad, SparseAdam, RowWiseAdagrad).

How a step runs on it (src_c/fastpath/rows.pxi): the indices are sorted
into runs of one row, each run's value rows are added in position order, and
the rule's own kernel runs on the listed rows only, one slot per row. The
plan's memory is kept per parameter and reused, so steps allocate nothing
once the largest has been seen.
"""
import numpy as np

from . import _validation as V

__all__ = ["SparseRows"]

_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


class SparseRows:
    """A gradient for some rows of a parameter's leading axis.

    Parameters
    ----------
    indices : array_like of int, 1-D
        The rows, in any order; a row may repeat (its value rows add up).
        int32 and int64 are used as they are; other integer types are
        converted.
    values : ndarray
        One value row per index: shape ``(len(indices),) + param.shape[1:]``,
        the parameter's dtype, C-contiguous. Read only.

    Examples
    --------
    >>> import numpy as np, fastopt
    >>> table = np.zeros((5, 2))
    >>> opt = fastopt.SGD([table], lr=0.5)
    >>> opt.step([fastopt.SparseRows([3, 0, 3], np.ones((3, 2)))])
    >>> table[:, 0]
    array([-0.5,  0. ,  0. , -1. ,  0. ])
    """

    __slots__ = ("indices", "values")

    def __init__(self, indices, values):
        if isinstance(indices, np.ndarray):
            array = indices
        else:
            try:
                array = np.asarray(indices)
            except (TypeError, ValueError) as err:
                raise TypeError(f"SparseRows indices must be an array of integers: {err}") from None
            if array.size == 0 and array.dtype.kind == "f":  # [] is float64 to NumPy
                array = array.astype(np.int64)
        if array.dtype.kind not in "iu" or array.dtype == np.bool_:
            raise TypeError(f"SparseRows indices must be integers, got dtype {array.dtype}")
        if array.ndim != 1:
            raise ValueError(f"SparseRows indices must be 1-D, got shape {array.shape}")
        if array.dtype not in _INDEX_DTYPES:
            if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
                raise ValueError("SparseRows indices must be below 2**63")
            array = array.astype(np.int64)
        if not isinstance(values, np.ndarray):
            raise TypeError(f"SparseRows values must be a numpy.ndarray, got "
                            f"{type(values).__name__}")
        if values.ndim < 1 or values.shape[0] != array.shape[0]:
            raise ValueError(f"SparseRows values must have one row per index: shape "
                             f"({array.shape[0]}, ...), got {values.shape}")
        self.indices = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("="),
                                                          copy=False)
        self.values = values

    def __repr__(self):
        return (f"SparseRows({self.indices.shape[0]} indices, values of shape "
                f"{self.values.shape} {self.values.dtype})")

    def to_dense(self, shape):
        """The dense gradient of shape ``shape`` this stands for (listed rows summed)."""
        out = np.zeros(shape, dtype=self.values.dtype)
        np.add.at(out, self.indices, self.values)
        return out


def check_rows(g_label, g, p_label, p):
    """``g``, a SparseRows, fits parameter ``p``: TypeError/ValueError naming what breaks.

    The index range is checked by the plan (:func:`plan_rows`).
    """
    if p.ndim == 0:
        raise ValueError(f"{g_label} is a SparseRows, but {p_label} is 0-d and has no rows")
    if p.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{g_label} is a SparseRows, which needs a float32 or float64 "
                        f"parameter; {p_label} has dtype {p.dtype}")
    values = g.values
    V.check_float_array(f"{g_label}.values", values, writeable=False)
    if values.dtype != p.dtype:
        raise TypeError(f"{g_label}.values has dtype {values.dtype} but {p_label} has dtype "
                        f"{p.dtype}")
    want = (g.indices.shape[0],) + p.shape[1:]
    if values.shape != want:
        raise ValueError(f"{g_label}.values has shape {values.shape} but {p_label} of shape "
                         f"{p.shape} needs {want} (one row per index)")


def plan_rows(plan, g_label, g, p_label, p):
    """Plan ``g``'s rows in ``plan`` (a _fastpath.RowPlan); ValueError for an index out of range."""
    found = plan.plan(g.indices, p.shape[0])
    if found < 0:
        i = -1 - found
        raise ValueError(f"{g_label}.indices[{i}] is {int(g.indices[i])}, outside the "
                         f"{p.shape[0]} rows of {p_label} (indices must be in [0, "
                         f"{p.shape[0]}); negative ones are not counted from the end)")
    return found
