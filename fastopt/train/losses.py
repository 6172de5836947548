"""Losses with analytic gradients, written into a buffer the caller owns.

Every loss here returns ``(loss, grad)``: the mean loss over the batch as a
Python float, and d(loss)/d(input) with the input's shape and dtype. Pass
``grad_out`` (for instance a model's output-gradient buffer) and the gradient
is written there: after a first call with a batch of that size, a call
allocates no array. The per-row statistics of the softmax and the
element-wise scratch of the binary cross-entropy live in per-thread buffers
that grow to the largest batch seen and are then reused.

The formulas are arranged so that nothing overflows and nothing cancels
catastrophically: log-sum-exp on logits shifted by their row maximum,
``log(1 + e^-|x|)`` for the softplus, and sums of non-negative terms only, so
the loss of a confidently right float32 classifier is still accurate.

Examples
--------
>>> import numpy as np, fastopt.losses as L
>>> logits = np.array([[2.0, 0.0], [0.0, 2.0]])
>>> loss, grad = L.softmax_cross_entropy(logits, np.array([0, 1]))
>>> round(loss, 4)
0.1269
"""
import threading

import numpy as np

from .. import _validation as V

__all__ = ["mse", "mae", "bce_with_logits", "softmax_cross_entropy", "LOSSES"]


# ----------------------------------------------------------------- scratch

class _Scratch(threading.local):
    """Per-thread 1-D buffers by slot and dtype, grown on demand and reused.

    Thread-local, so two threads computing losses at once never write into
    the same buffer. A buffer keeps the size of the largest batch seen.
    """

    def __init__(self):
        self._buffers = {}

    def get(self, slot, size, dtype):
        """``size`` elements of slot ``slot``'s buffer (contents undefined)."""
        key = (slot, np.dtype(dtype))
        buf = self._buffers.get(key)
        if buf is None or buf.size < size:
            buf = self._buffers[key] = np.empty(size, dtype)
        return buf[:size]

    def arange(self, size):
        """``np.arange(size)`` as intp, kept between calls."""
        buf = self._buffers.get("arange")
        if buf is None or buf.size < size:
            buf = self._buffers["arange"] = np.arange(size, dtype=np.intp)
        return buf[:size]


_scratch = _Scratch()


# -------------------------------------------------------------- validation

def _grad_buffer(where, grad_out, x, target):
    """``grad_out`` checked against the input ``x``, or a new array like ``x``."""
    if grad_out is None:
        return np.empty(x.shape, x.dtype)
    name = f"{where}: grad_out"
    V.check_float_array(name, grad_out, writeable=True)
    V.check_like(name, grad_out, "the input", x)
    # The input and target are read after the gradient is first written.
    V.check_no_overlap(name, grad_out, {"the input": x, "the target": target})
    return grad_out


def _prepare(where, x, target, grad_out, input_name="pred"):
    """Validated ``(input, target, grad)`` for an element-wise loss."""
    x = V.check_input(where, input_name, x)
    t = V.check_target(where, "target", target, x.shape)
    return x, t, _grad_buffer(where, grad_out, x, t)


# ----------------------------------------------------------------- helpers

def _sigmoid(x, out):
    """``out = 1 / (1 + exp(-x))``, in place when ``out is x``.

    Accurate relative to the result over the whole range: where ``exp(-x)``
    overflows to inf the result is its reciprocal, 0, as it should be.
    """
    np.negative(x, out=out)
    with np.errstate(over="ignore"):
        np.exp(out, out=out)
    out += 1
    np.reciprocal(out, out=out)
    return out


def _shift_by_row_max(z, out, rows):
    """``out = z - max(z, axis=1)`` (each row <= 0, with a 0 at its maximum).

    Exponentials of shifted logits never overflow and their row sum is >= 1,
    so its logarithm is finite: the log-sum-exp trick.
    """
    np.max(z, axis=1, keepdims=True, out=rows)
    np.subtract(z, rows, out=out)


def _exp_normalize(shifted, rows):
    """Softmax of shifted logits, in place; ``rows`` gets each row's sum of exponentials."""
    np.exp(shifted, out=shifted)
    np.sum(shifted, axis=1, keepdims=True, out=rows)
    shifted /= rows


def _softmax(z, out):
    """Row-wise softmax of the 2-D array ``z`` into ``out``."""
    rows = _scratch.get("rows", z.shape[0], z.dtype).reshape(-1, 1)
    _shift_by_row_max(z, out, rows)
    _exp_normalize(out, rows)
    return out


# ------------------------------------------------------------------ losses

def mse(pred, target, grad_out=None):
    """Mean squared error, ``mean((pred - target) ** 2)``, and its gradient.

    Parameters
    ----------
    pred : ndarray, float32 or float64
        Predictions, any shape.
    target : array_like of real numbers
        Same shape as ``pred`` (no broadcasting). A target in ``pred``'s dtype
        avoids a conversion.
    grad_out : ndarray, optional
        C-contiguous, writeable, ``pred``'s shape and dtype, sharing no memory
        with ``pred`` or ``target``: the gradient is written here.

    Returns
    -------
    loss : float
        The mean over all elements (``torch.nn.functional.mse_loss``).
    grad : ndarray
        ``2 * (pred - target) / pred.size``; ``grad_out`` when given.
    """
    pred, target, grad = _prepare("mse", pred, target, grad_out)
    np.subtract(pred, target, out=grad)
    flat = grad.reshape(-1)
    loss = float(np.dot(flat, flat)) / grad.size
    grad *= 2.0 / grad.size
    return loss, grad


def mae(pred, target, grad_out=None):
    """Mean absolute error, ``mean(|pred - target|)``, and its (sub)gradient.

    Parameters and returns as for :func:`mse`; the gradient is
    ``sign(pred - target) / pred.size``, 0 where the residual is 0
    (``torch.nn.functional.l1_loss``).
    """
    pred, target, grad = _prepare("mae", pred, target, grad_out)
    np.subtract(pred, target, out=grad)
    np.abs(grad, out=grad)
    loss = float(grad.sum()) / grad.size
    # The gradient needs the residual's sign, which abs() took away: recomputing
    # the residual costs one pass and spares a second buffer.
    np.subtract(pred, target, out=grad)
    np.sign(grad, out=grad)
    grad *= 1.0 / grad.size
    return loss, grad


def bce_with_logits(logits, target, grad_out=None):
    """Binary cross-entropy of ``sigmoid(logits)`` against ``target``, and its gradient.

    Per element ``max(x, 0) - x * y + log(1 + exp(-|x|))``, which equals
    ``-y log(sigmoid(x)) - (1 - y) log(1 - sigmoid(x))`` without ever
    evaluating a sigmoid that rounds to 0 or 1: finite for any finite logit.

    Parameters
    ----------
    logits : ndarray, float32 or float64
        Any shape.
    target : array_like of real numbers
        Same shape; 0/1 labels or probabilities in [0, 1].
    grad_out : ndarray, optional
        As for :func:`mse`.

    Returns
    -------
    loss : float
        The mean over all elements
        (``torch.nn.functional.binary_cross_entropy_with_logits``).
    grad : ndarray
        ``(sigmoid(logits) - target) / logits.size``.
    """
    x, y, grad = _prepare("bce_with_logits", logits, target, grad_out, input_name="logits")
    extra = _scratch.get("bce", x.size, x.dtype).reshape(x.shape)
    np.maximum(x, 0, out=grad)
    np.multiply(x, y, out=extra)
    grad -= extra          # max(x, 0) - x*y >= 0 for 0 <= y <= 1: exact for 0/1 labels
    np.abs(x, out=extra)
    np.negative(extra, out=extra)
    np.logaddexp(extra, 0, out=extra)   # log(1 + e^-|x|), in (0, log 2]
    grad += extra
    loss = float(grad.sum()) / grad.size  # a sum of non-negative terms: no cancellation
    _sigmoid(x, grad)
    grad -= y
    grad *= 1.0 / grad.size
    return loss, grad


def softmax_cross_entropy(logits, target, grad_out=None):
    """Cross-entropy of ``softmax(logits)`` against class targets, and its gradient.

    Parameters
    ----------
    logits : ndarray, float32 or float64, shape (n, k)
    target : ndarray
        Integer class indices of shape (n,), each in [0, k); or one-hot /
        probability rows of shape (n, k) (real numbers; in ``logits``' dtype
        and C order they need no conversion copy).
    grad_out : ndarray, optional
        As for :func:`mse`.

    Returns
    -------
    loss : float
        ``-sum(target * log_softmax(logits)) / n``, the mean over rows
        (``torch.nn.functional.cross_entropy``, for probability rows too).
    grad : ndarray
        ``(softmax(logits) * rowsum(target) - target) / n``, which is
        ``(softmax - onehot) / n`` for labels.
    """
    where = "softmax_cross_entropy"
    z = V.check_input(where, "logits", logits, ndim=2)
    n, k = z.shape
    t, labels = V.check_class_target(where, "target", target, n, k)
    grad = _grad_buffer(where, grad_out, z, t)
    flat = grad.reshape(-1)
    rows = _scratch.get("rows", n, z.dtype).reshape(n, 1)
    # loss_i = mass_i * log(sum_j e^(z_ij - m_i)) - sum_j t_ij (z_ij - m_i), with
    # m_i the row maximum: both terms are >= 0, so they never cancel.
    _shift_by_row_max(z, grad, rows)
    if labels:
        # grad.flat[index[i]] is row i's entry for its label.
        index = _scratch.get("index", n, np.intp)
        np.multiply(_scratch.arange(n), k, out=index)
        np.add(index, t, out=index, casting="unsafe")  # labels were range-checked
        picked = rows.reshape(n)  # the row maxima are no longer needed
        np.take(flat, index, out=picked, mode="clip")  # mode="raise" would buffer `out`
        target_term = float(picked.sum())
        _exp_normalize(grad, rows)
        np.log(rows, out=rows)
        loss = (float(rows.sum()) - target_term) / n
        np.take(flat, index, out=picked, mode="clip")
        picked -= 1
        np.put(flat, index, picked, mode="clip")
    else:
        mass = _scratch.get("mass", n, z.dtype).reshape(n, 1)
        np.sum(t, axis=1, keepdims=True, dtype=z.dtype, out=mass)
        target_term = float(np.vdot(t, grad))
        _exp_normalize(grad, rows)
        np.log(rows, out=rows)
        loss = (float(np.vdot(mass, rows)) - target_term) / n
        grad *= mass
        grad -= t
    grad *= 1.0 / n
    return loss, grad


#: Every loss by name.
LOSSES = {
    "mse": mse,
    "mae": mae,
    "bce_with_logits": bce_with_logits,
    "softmax_cross_entropy": softmax_cross_entropy,
}
