"""Mini-batches for training loops: full batch, stochastic, or mini-batch.

``batch_size=None`` is (full-)batch gradient descent, ``1`` stochastic
gradient descent, ``k`` mini-batch gradient descent: the same loop covers all
three. Each pass over a :class:`Batches` is one epoch; with ``shuffle`` every
epoch draws a fresh permutation from a seeded generator, so runs repeat.

No array is allocated per batch: unshuffled batches are views of ``X`` and
``y``; shuffled batches are gathered into two buffers that are reused - a
yielded batch is overwritten by the next one, so copy it if you keep it.
"""
import numpy as np

from .. import _validation as V

__all__ = ["batches", "Batches"]


def batches(X, y=None, batch_size=None, shuffle=True, seed=None, drop_last=False):
    """Iterate over ``(X_batch, y_batch)`` (or ``X_batch`` alone when ``y`` is None).

    Parameters
    ----------
    X : ndarray
        Samples along the first axis.
    y : ndarray, optional
        Targets, same length as ``X``.
    batch_size : int or None
        None: the whole data set in every step (batch gradient descent);
        1: stochastic gradient descent; k: mini-batches of k.
    shuffle : bool
        A fresh permutation every epoch (ignored for the full batch: the mean
        gradient does not depend on the order).
    seed : int, numpy.random.Generator or None
        Seeds the permutations; the same seed gives the same epochs.
    drop_last : bool
        Drop the last, smaller batch when ``batch_size`` does not divide the
        number of samples.

    Returns
    -------
    Batches
        Iterable; each iteration is one epoch. ``len()`` is batches per epoch.

    Examples
    --------
    >>> import numpy as np, fastopt
    >>> X = np.arange(10.0).reshape(5, 2); y = np.arange(5.0)
    >>> [yb.tolist() for _, yb in fastopt.batches(X, y, batch_size=2, shuffle=False)]
    [[0.0, 1.0], [2.0, 3.0], [4.0]]
    """
    return Batches(X, y, batch_size, shuffle, seed, drop_last)


class Batches:
    """The iterable that :func:`batches` returns (see there)."""

    def __init__(self, X, y=None, batch_size=None, shuffle=True, seed=None, drop_last=False):
        V.samples("X", X)
        n = len(X)
        if n == 0:
            raise ValueError("X has no samples")
        if y is not None:
            V.samples("y", y)
            if len(y) != n:
                raise ValueError(f"X has {n} samples but y has {len(y)}")
        shuffle = V.flag("shuffle", shuffle)
        drop_last = V.flag("drop_last", drop_last)
        if batch_size is not None:
            V.count("batch_size", batch_size, kind="an int or None")
            if drop_last and batch_size > n:
                raise ValueError(f"batch_size={batch_size} > {n} samples with drop_last=True "
                                 "would yield no batch")
            batch_size = int(batch_size)
        self.X, self.y = X, y
        self.batch_size = batch_size
        self.shuffle = shuffle and batch_size is not None
        self.drop_last = drop_last
        self._rng = np.random.default_rng(seed)
        self._identity = np.arange(n) if self.shuffle else None
        self._order = self._identity.copy() if self.shuffle else None
        self._buffers = None  # (X buffer, y buffer) for shuffled batches, made once

    def __len__(self):
        if self.batch_size is None:
            return 1
        n, k = len(self.X), self.batch_size
        return n // k if self.drop_last else -(-n // k)

    def _pack(self, xb, yb):
        return xb if self.y is None else (xb, yb)

    def __iter__(self):
        n, k = len(self.X), self.batch_size
        if k is None:
            yield self._pack(self.X, self.y)
            return
        if not self.shuffle:
            for start in range(0, len(self) * k, k):
                stop = min(start + k, n)
                yield self._pack(self.X[start:stop], None if self.y is None else self.y[start:stop])
            return
        # A fresh permutation of 0..n-1 each epoch, in place: no allocation.
        np.copyto(self._order, self._identity)
        self._rng.shuffle(self._order)
        if self._buffers is None:
            rows = min(k, n)  # no batch is longer than the data set
            self._buffers = (np.empty((rows,) + self.X.shape[1:], self.X.dtype),
                             None if self.y is None else np.empty((rows,) + self.y.shape[1:], self.y.dtype))
        xbuf, ybuf = self._buffers
        for start in range(0, len(self) * k, k):
            index = self._order[start:start + k]
            m = len(index)
            np.take(self.X, index, axis=0, out=xbuf[:m])
            if ybuf is not None:
                np.take(self.y, index, axis=0, out=ybuf[:m])
            yield self._pack(xbuf[:m], None if ybuf is None else ybuf[:m])
