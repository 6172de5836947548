"""NumPy models with analytic gradients, for CPU training loops with fastopt.

Every model keeps its parameters in one :class:`fastopt.FlatParams`, so an
optimizer steps the whole model with one call::

    model = MLP([64, 32, 10], activation="tanh", seed=0)
    opt = fastopt.Adam(model.parameters(), lr=1e-3)
    for X_batch, y_batch in fastopt.batches(X, y, batch_size=32):
        loss = model.loss_and_grad(X_batch, y_batch)   # writes model.grads
        opt.step(model.gradients())

All models are stacks of dense layers (``X @ W + b``) trained with a loss from
:mod:`fastopt.losses`: :class:`LinearRegression` is one layer with MSE or MAE,
:class:`LogisticRegression` one layer with binary cross-entropy on a logit,
:class:`MLP` any number of hidden layers and a softmax cross-entropy output.
Parameters are named ``W0, b0, W1, b1, ...`` from the input onwards.

The training path allocates nothing once warm: activations, deltas and
scratch are kept per batch size (a few sizes at a time, the most recent) and
reused, matrix products write through ``out=``, and the backward pass writes
each gradient straight into its view of ``model.flat.grad``.
"""
import collections
import math

import numpy as np

from .. import _validation as V
from ..flat import FlatParams
from .losses import LOSSES, _sigmoid, _softmax, bce_with_logits, softmax_cross_entropy

__all__ = ["Model", "LinearRegression", "LogisticRegression", "MLP", "ACTIVATIONS"]


# -------------------------------------------------------------- activations
# Each activation is applied in place, and its derivative is computed from its
# *output* a = f(z), so the forward pass need not keep the pre-activations.

def _relu(a):
    np.maximum(a, 0, out=a)


def _relu_derivative(a, out):
    np.sign(a, out=out)  # a = relu(z) >= 0, so sign(a) = 1[z > 0] (0 at the kink, as torch)


def _tanh(a):
    np.tanh(a, out=a)


def _tanh_derivative(a, out):
    np.multiply(a, a, out=out)
    np.subtract(1, out, out=out)


def _sigmoid_inplace(a):
    _sigmoid(a, a)


def _sigmoid_derivative(a, out):
    np.subtract(1, a, out=out)
    out *= a


_Activation = collections.namedtuple("_Activation", "forward derivative init")

#: Hidden-layer activations: in-place forward, derivative from the output, weight init.
ACTIVATIONS = {
    "relu": _Activation(_relu, _relu_derivative, "he"),
    "tanh": _Activation(_tanh, _tanh_derivative, "glorot"),
    "sigmoid": _Activation(_sigmoid_inplace, _sigmoid_derivative, "glorot"),
}


def _init_weights(rng, fan_in, fan_out, scheme):
    """He normal (for ReLU) or Glorot uniform (for tanh, sigmoid and outputs)."""
    if scheme == "he":
        return rng.standard_normal((fan_in, fan_out)) * math.sqrt(2.0 / fan_in)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, (fan_in, fan_out))


# ----------------------------------------------------------------- buffers

class _Buffers:
    """The arrays one forward/backward pass over ``n`` rows writes into.

    ``acts[l]`` is layer l's output (the last one: the model's outputs) and
    ``deltas[l]`` d(loss)/d(layer l's pre-activation). ``scratch`` holds an
    activation's derivative, for the widest hidden layer.
    """

    def __init__(self, n, widths, dtype, backward=True):
        self.acts = [np.empty((n, w), dtype) for w in widths]
        if backward:
            self.deltas = [np.empty((n, w), dtype) for w in widths]
            self.scratch = np.empty(n * max(widths[:-1], default=0), dtype)


def _views_like(buffer, views, base):
    """Views into ``buffer`` at the places ``views`` occupy in ``base`` (same layout)."""
    start = base.__array_interface__["data"][0]
    out = {}
    for name, v in views.items():
        offset = (v.__array_interface__["data"][0] - start) // base.itemsize
        out[name] = buffer[offset:offset + v.size].reshape(v.shape)
    return out


# -------------------------------------------------------------------- base

class Model:
    """A stack of dense layers trained with a loss from :mod:`fastopt.losses`.

    The base of :class:`LinearRegression`, :class:`LogisticRegression` and
    :class:`MLP`; subclasses choose the sizes, the loss and the targets.

    Parameters
    ----------
    sizes : list of int
        ``[n_features, hidden..., n_outputs]``.
    loss : callable
        ``loss(outputs, target, grad_out) -> (mean loss, grad)``.
    activation : str
        Hidden-layer activation, a key of :data:`ACTIVATIONS`.
    dtype : float32 or float64
        Of the parameters and all computation.
    seed : int or None
        For ``numpy.random.default_rng``: He-normal weights before ReLU,
        Glorot-uniform otherwise; biases start at 0.
    squeeze : bool
        A single output column is presented as shape (n,) (regression with one
        output, binary logits).

    Attributes
    ----------
    flat : FlatParams
        All parameters, and their gradients, in one buffer each.
    params, grads : dict name -> ndarray
        ``flat.params`` and ``flat.grads``: ``W0, b0, W1, b1, ...``, with
        ``W`` of shape (inputs, outputs).
    sizes, n_features, activation, dtype
        As constructed.

    Notes
    -----
    ``X`` must be a 2-D float32 or float64 ndarray with ``n_features``
    columns. When its dtype is not the model's it is converted (a copy per
    call): pass data in the model's dtype to avoid it.
    """

    #: Batch sizes whose buffers are kept (least recently used dropped first):
    #: room for a training batch size, a short last batch and a validation set.
    cache_sizes = 4

    def __init__(self, sizes, loss, activation="relu", dtype=np.float64, seed=None, squeeze=False):
        name = type(self).__name__
        if not isinstance(sizes, (list, tuple)) or len(sizes) < 2:
            raise ValueError(f"{name}: sizes must be a list of >= 2 layer sizes, got {sizes!r}")
        sizes = [V.count(f"{name}: sizes[{i}]", s) for i, s in enumerate(sizes)]
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {activation!r}")
        try:
            checked = np.dtype(dtype)
        except TypeError:
            checked = None
        if checked is None or checked not in V.FLOAT_DTYPES:  # (dtype == None is True for float64)
            raise TypeError(f"{name}: dtype must be float32 or float64, got {dtype!r}")
        dtype = checked
        self.sizes = sizes
        self.n_features = self.sizes[0]
        self.activation = activation
        self.dtype = dtype
        self._act = ACTIVATIONS[activation]
        self._loss_fn = loss
        self._squeeze = squeeze and self.sizes[-1] == 1

        rng = np.random.default_rng(seed)
        arrays = {}
        last = len(self.sizes) - 2
        for l, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            scheme = self._act.init if l < last else "glorot"
            arrays[f"W{l}"] = _init_weights(rng, fan_in, fan_out, scheme)
            arrays[f"b{l}"] = (fan_out,)
        self.flat = FlatParams(arrays, dtype=dtype)
        self.params, self.grads = self.flat.params, self.flat.grads
        self._layers = [(self.params[f"W{l}"], self.params[f"b{l}"]) for l in range(last + 1)]
        self._grad_layers = self._layer_grads(self.grads)
        self._cache = collections.OrderedDict()
        self._accum = None  # (buffer, layer views) for accumulate=True, made on first use

    def _layer_grads(self, views):
        return [(views[f"W{l}"], views[f"b{l}"]) for l in range(len(self._layers))]

    # ------------------------------------------------------------ optimizer

    def parameters(self):
        """``[flat.data]``: the one array an optimizer steps."""
        return [self.flat.data]

    def gradients(self):
        """``[flat.grad]``: what to pass to ``optimizer.step``."""
        return [self.flat.grad]

    def zero_grad(self):
        """Set every gradient to 0 (before a run of ``accumulate=True`` calls)."""
        self.flat.grad[...] = 0

    # --------------------------------------------------------------- checks

    def _check_X(self, X):
        """``X`` validated, in the model's dtype (converted, a copy, only if needed)."""
        where = type(self).__name__
        V.float_ndarray(f"{where}: X", X)
        if X.ndim != 2 or X.shape[1] != self.n_features or X.shape[0] == 0:
            raise ValueError(f"{where}: X must be 2-D with at least one row and "
                             f"{self.n_features} columns, got shape {X.shape}")
        return X if X.dtype == self.dtype else X.astype(self.dtype)

    def _check_y(self, y, n):
        """``y`` validated for ``n`` rows, shaped as the loss takes it."""
        raise NotImplementedError

    def _check_data(self, X, y):
        X = self._check_X(X)
        return X, self._check_y(y, X.shape[0])

    # -------------------------------------------------------------- compute

    def _buffers(self, n):
        """The cached buffers for batch size ``n``."""
        buffers = self._cache.get(n)
        if buffers is None:
            buffers = self._cache[n] = _Buffers(n, self.sizes[1:], self.dtype)
            if len(self._cache) > self.cache_sizes:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(n)
        return buffers

    def _head(self, a):
        """The (n, n_outputs) array as the loss and the user see it."""
        return a.reshape(a.shape[0]) if self._squeeze else a

    def _forward(self, X, buffers):
        """Run the layers into ``buffers.acts``; return the output layer's array."""
        a = X
        last = len(self._layers) - 1
        for l, (W, b) in enumerate(self._layers):
            z = buffers.acts[l]
            np.matmul(a, W, out=z)
            z += b
            if l < last:
                self._act.forward(z)
            a = z
        return a

    def _backward(self, X, buffers, grads):
        """Backpropagate ``buffers.deltas[-1]`` and write every gradient into ``grads``."""
        for l in range(len(self._layers) - 1, -1, -1):
            delta = buffers.deltas[l]
            inputs = X if l == 0 else buffers.acts[l - 1]
            gW, gb = grads[l]
            np.matmul(inputs.T, delta, out=gW)
            np.sum(delta, axis=0, out=gb)
            if l:
                below = buffers.deltas[l - 1]
                np.matmul(delta, self._layers[l][0].T, out=below)
                derivative = buffers.scratch[:below.size].reshape(below.shape)
                self._act.derivative(buffers.acts[l - 1], derivative)
                below *= derivative

    def _loss_on(self, X, y):
        """Forward pass and loss on the cached buffers; return (loss, buffers)."""
        buffers = self._buffers(X.shape[0])
        out = self._forward(X, buffers)
        loss, _ = self._loss_fn(self._head(out), y, self._head(buffers.deltas[-1]))
        return loss, buffers

    def _accumulator(self):
        """A zeroed buffer laid out like ``flat.grad``, and its per-layer views."""
        if self._accum is None:
            buffer = np.zeros_like(self.flat.grad)  # padding stays 0, so adding it is harmless
            views = _views_like(buffer, self.grads, self.flat.grad)
            self._accum = (buffer, self._layer_grads(views))
        return self._accum

    # --------------------------------------------------------------- public

    def forward(self, X):
        """The model's outputs for ``X`` (a new array).

        Shape (n,) for one output column (single-output regression, the
        logit of :class:`LogisticRegression`), else (n, n_outputs).
        """
        X = self._check_X(X)
        return self._head(self._forward(X, _Buffers(X.shape[0], self.sizes[1:], self.dtype,
                                                    backward=False)))

    def predict(self, X):
        """Predicted values (regression); overridden by classifiers to give labels."""
        return self.forward(X)

    def loss(self, X, y):
        """The mean loss on ``(X, y)``; parameters' gradients are left alone."""
        X, y = self._check_data(X, y)
        return self._loss_on(X, y)[0]

    def loss_and_grad(self, X, y, accumulate=False, scale=1.0):
        """The mean loss on ``(X, y)``; ``scale *`` its gradient goes into ``grads``.

        Parameters
        ----------
        X : ndarray, (n, n_features)
        y : ndarray
            Targets, as the model's class documents.
        accumulate : bool
            False: overwrite ``model.grads``. True: add to what is there, so
            k micro-batches with ``scale=1/k`` leave the mean gradient.
        scale : float
            Multiplies the gradient (not the returned loss).

        Returns
        -------
        float
            The mean loss over the batch, unscaled.
        """
        accumulate = V.flag("accumulate", accumulate)
        scale = V.finite("scale", scale)
        X, y = self._check_data(X, y)
        loss, buffers = self._loss_on(X, y)
        if scale != 1.0:
            buffers.deltas[-1] *= scale  # every gradient is linear in the output delta
        if accumulate:
            buffer, grads = self._accumulator()
            self._backward(X, buffers, grads)
            self.flat.grad += buffer
        else:
            self._backward(X, buffers, self._grad_layers)
        return loss

    def score(self, X, y):
        """Accuracy (classifiers) or R^2 (regression) on ``(X, y)``."""
        raise NotImplementedError

    def __repr__(self):
        hidden = f", activation={self.activation!r}" if len(self.sizes) > 2 else ""
        return (f"{type(self).__name__}(sizes={self.sizes}{hidden}, dtype={self.dtype}, "
                f"{sum(p.size for p in self.params.values())} parameters)")


def _labels_shape(where, y, n, width):
    """``y`` as a target for ``n`` rows and ``width`` output columns.

    One column takes (n,) or (n, 1) and gives (n,), the shape the model's
    squeezed output has; more columns take (n, width).
    """
    y = np.asarray(y)
    if width == 1 and y.shape == (n, 1):
        y = y.reshape(n)
    return V.check_target(where, "y", y, (n,) if width == 1 else (n, width))


# ---------------------------------------------------------------- models

class LinearRegression(Model):
    """Linear regression ``X @ W0 + b0`` fitted by mean squared or absolute error.

    Parameters
    ----------
    n_features : int
    n_outputs : int
        Target columns; with 1, outputs and targets have shape (n,)
        (targets of shape (n, 1) are accepted too).
    loss : {"mse", "mae"}
    dtype : float32 or float64
    seed : int or None
        Glorot-uniform initial weights; the bias starts at 0.

    Notes
    -----
    ``y`` holds real numbers of shape (n,) or (n, n_outputs). ``X`` is
    converted to the model's dtype when it has the other float dtype.
    """

    def __init__(self, n_features, n_outputs=1, loss="mse", dtype=np.float64, seed=None):
        V.either("LinearRegression: loss", loss, "mse", "mae")
        sizes = [V.count("LinearRegression: n_features", n_features),
                 V.count("LinearRegression: n_outputs", n_outputs)]
        super().__init__(sizes, LOSSES[loss], dtype=dtype, seed=seed, squeeze=True)
        self.n_outputs = self.sizes[-1]
        self.loss_name = loss

    def _check_y(self, y, n):
        return _labels_shape("LinearRegression", y, n, self.n_outputs)

    def score(self, X, y):
        """The coefficient of determination R^2, averaged over outputs.

        1 is a perfect fit; a constant target scores 1 if predicted exactly,
        else 0 (as scikit-learn).
        """
        X, y = self._check_data(X, y)
        y = y.astype(np.float64).reshape(len(y), -1)
        pred = self.forward(X).astype(np.float64).reshape(y.shape)
        ss_res = np.sum((y - pred) ** 2, axis=0)
        ss_tot = np.sum((y - y.mean(axis=0)) ** 2, axis=0)
        constant = ss_tot == 0
        r2 = np.where(constant, (ss_res == 0).astype(np.float64),
                      1.0 - ss_res / np.where(constant, 1.0, ss_tot))
        return float(np.mean(r2))


class _Classifier(Model):
    """Accuracy for :meth:`score`; subclasses give ``predict`` and ``_true_labels``."""

    def _true_labels(self, y):
        raise NotImplementedError

    def score(self, X, y):
        """The fraction of rows whose predicted class is the target's."""
        X, y = self._check_data(X, y)
        return float(np.mean(self.predict(X) == self._true_labels(y)))


class LogisticRegression(_Classifier):
    """Binary logistic regression: ``sigmoid(X @ W0 + b0)``, binary cross-entropy.

    Parameters
    ----------
    n_features : int
    dtype : float32 or float64
    seed : int or None
        Glorot-uniform initial weights; the bias starts at 0.

    Notes
    -----
    ``y`` has shape (n,) (or (n, 1)): 0/1 labels, or probabilities in [0, 1]
    (soft labels: :meth:`score` counts them as class 1 from 0.5). ``forward``
    gives the logits, ``predict_proba`` P(class 1) of shape (n,), ``predict``
    labels 0/1. ``X`` is converted to the model's dtype when it has the other
    float dtype.
    """

    def __init__(self, n_features, dtype=np.float64, seed=None):
        super().__init__([V.count("LogisticRegression: n_features", n_features), 1],
                         bce_with_logits, dtype=dtype, seed=seed, squeeze=True)

    def _check_y(self, y, n):
        y = _labels_shape("LogisticRegression", y, n, 1)
        if y.min() < 0 or y.max() > 1:
            raise ValueError(f"LogisticRegression: y must hold 0/1 labels or probabilities in "
                             f"[0, 1], got values from {y.min()} to {y.max()}")
        return y

    def _true_labels(self, y):
        return (y >= 0.5).astype(np.int64)

    def predict_proba(self, X):
        """P(class 1 | x) for each row, shape (n,)."""
        logits = self.forward(X)
        return _sigmoid(logits, logits)

    def predict(self, X):
        """Class labels 0/1 (int64): 1 where the logit is > 0."""
        return (self.forward(X) > 0).astype(np.int64)


class MLP(_Classifier):
    """A multilayer perceptron classifier with a softmax cross-entropy output.

    Parameters
    ----------
    sizes : list of int
        ``[n_features, hidden..., n_classes]``, ``n_classes >= 2``; with no
        hidden size this is multinomial logistic regression.
    activation : {"relu", "tanh", "sigmoid"}
        Of the hidden layers.
    dtype : float32 or float64
    seed : int or None
        He-normal hidden weights for ReLU, Glorot-uniform otherwise and for
        the output layer; biases start at 0.

    Notes
    -----
    ``y`` holds integer class indices of shape (n,), each in [0, n_classes),
    or one-hot / probability rows of shape (n, n_classes). ``forward`` gives
    the logits, ``predict_proba`` the softmax, ``predict`` the argmax. ``X``
    is converted to the model's dtype when it has the other float dtype.
    """

    def __init__(self, sizes, activation="relu", dtype=np.float64, seed=None):
        if isinstance(sizes, (list, tuple)) and len(sizes) >= 2 and sizes[-1] == 1:
            raise ValueError("MLP: needs n_classes = sizes[-1] >= 2 (use LogisticRegression "
                             "for one logit)")
        super().__init__(sizes, softmax_cross_entropy, activation=activation, dtype=dtype,
                         seed=seed)
        self.n_classes = self.sizes[-1]

    def _check_y(self, y, n):
        return V.check_class_target("MLP", "y", y, n, self.n_classes)[0]

    def _true_labels(self, y):
        return y if y.ndim == 1 else np.argmax(y, axis=1)

    def predict_proba(self, X):
        """Class probabilities (softmax of the logits), shape (n, n_classes)."""
        logits = self.forward(X)
        return _softmax(logits, logits)

    def predict(self, X):
        """The most probable class of each row (int64)."""
        return np.argmax(self.forward(X), axis=1)
