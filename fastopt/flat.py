"""Flat buffers: a model's arrays packed into one contiguous, aligned buffer.

Model code keeps using its arrays - they become views into the buffer - while
the optimizer sees a single parameter and runs a single kernel call per step
instead of one per array. A matching gradient buffer holds a view per array
for the model's backward pass to write into.

Examples
--------
>>> import numpy as np, fastopt
>>> flat = fastopt.FlatParams({"W": np.ones((3, 2)), "b": np.zeros(2)})
>>> W, b = flat.params["W"], flat.params["b"]        # views into flat.data
>>> opt = fastopt.SGD([flat.data], lr=0.1)
>>> flat.grads["W"][...] = 1.0; flat.grads["b"][...] = 2.0
>>> opt.step([flat.grad])
>>> float(W[0, 0]), float(b[0])
(0.9, -0.2)
"""
import math

import numpy as np

from . import _validation as V

#: Every array starts on a 64-byte boundary: a cache line, and an AVX-512 vector.
ALIGNMENT = 64


def _aligned_empty(count, dtype):
    """A 1-D array of ``count`` elements whose data starts on ALIGNMENT bytes."""
    dtype = np.dtype(dtype)
    raw = np.empty(count * dtype.itemsize + ALIGNMENT, dtype=np.uint8)
    shift = (-raw.ctypes.data) % ALIGNMENT
    return raw[shift:shift + count * dtype.itemsize].view(dtype)


def _padded(size, dtype):
    """``size`` rounded up to whole ALIGNMENT-byte lines of ``dtype``."""
    per_line = ALIGNMENT // np.dtype(dtype).itemsize
    return -(-size // per_line) * per_line


def packed_like(arrays, fill=0.0, shapes=None, dtypes=None):
    """New arrays shaped like ``arrays``, laid out back to back in aligned blocks.

    ``shapes``: the shape of each new array where it is not its model's
    (Adafactor's row and column factors), else None; ``dtypes`` likewise
    (half-precision state of another dtype than its parameter).

    One block per dtype, each array starting on an ALIGNMENT-byte boundary,
    every real number set to ``fill`` (a complex element to ``fill + fill*1j``,
    as torch.optim starts complex state). Optimizer state for a group of many small parameters
    is allocated this way: one pass over it then streams through memory
    instead of hopping between scattered allocations.
    """
    views = [None] * len(arrays)
    shapes = [a.shape for a in arrays] if shapes is None else [tuple(s) for s in shapes]
    sizes = [math.prod(shape) for shape in shapes]
    by_dtype = {}
    for i, a in enumerate(arrays):
        by_dtype.setdefault(a.dtype if dtypes is None else np.dtype(dtypes[i]), []).append(i)
    for dtype, members in by_dtype.items():
        block = _aligned_empty(sum(_padded(sizes[i], dtype) for i in members), dtype)
        block[...] = complex(fill, fill) if dtype.kind == "c" else fill
        offset = 0
        for i in members:
            views[i] = block[offset:offset + sizes[i]].reshape(shapes[i])
            offset += _padded(sizes[i], dtype)
    return views


class FlatParams:
    """Arrays packed into one 64-byte-aligned buffer, with a matching gradient buffer.

    Parameters
    ----------
    arrays : dict name -> ndarray or shape tuple
        In order. An array's values are copied in; a shape gives zeros.
    dtype : float32 or float64, optional
        The buffer's dtype; default: the arrays' common dtype (float64 when
        only shapes are given).

    Attributes
    ----------
    data, grad : ndarray
        The 1-D buffers. Give ``[flat.data]`` to an optimizer and step with
        ``[flat.grad]``. Padding between arrays is zero in both and stays zero
        under every rule (a zero gradient moves no zero parameter).
    params, grads : dict name -> ndarray
        C-contiguous views into ``data`` and ``grad`` with each array's shape.
    """

    def __init__(self, arrays, dtype=None):
        if not isinstance(arrays, dict) or not arrays:
            raise TypeError("arrays must be a non-empty dict name -> array or shape")
        shapes, values = {}, {}
        for name, item in arrays.items():
            if not isinstance(name, str):
                raise TypeError(f"array names must be strings, got {name!r}")
            if isinstance(item, np.ndarray):
                shapes[name], values[name] = item.shape, item
            elif isinstance(item, tuple) and all(isinstance(d, int) and d >= 0 for d in item):
                shapes[name] = item
            else:
                raise TypeError(f"arrays[{name!r}] must be an ndarray or a shape tuple, got {item!r}")
        if dtype is None:
            dtype = np.result_type(*values.values()) if values else np.float64
        dtype = np.dtype(dtype)
        if dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")

        self._offsets = {}
        offset = 0
        for name, shape in shapes.items():
            size = int(np.prod(shape, dtype=np.int64))
            self._offsets[name] = (offset, size, shape)
            offset += _padded(size, dtype)
        self.data = _aligned_empty(offset, dtype)
        self.grad = _aligned_empty(offset, dtype)
        self.data[...] = 0
        self.grad[...] = 0
        self.params = {name: self._view(self.data, name) for name in shapes}
        self.grads = {name: self._view(self.grad, name) for name in shapes}
        for name, value in values.items():
            self.params[name][...] = value

    def _view(self, buffer, name):
        offset, size, shape = self._offsets[name]
        return buffer[offset:offset + size].reshape(shape)

    def segment(self, *names):
        """``(data, grad)`` views spanning consecutive arrays ``names``.

        Use a segment as the single parameter of a param group to give part of
        the model other hyperparameters (e.g. no weight decay on biases).
        """
        order = list(self._offsets)
        if not names or any(n not in self._offsets for n in names):
            missing = [n for n in names if n not in self._offsets]
            raise ValueError(f"unknown array names {missing}" if missing else "give at least one name")
        index = sorted(order.index(n) for n in names)
        if index != list(range(index[0], index[0] + len(index))):
            raise ValueError(f"arrays {list(names)} are not consecutive in the buffer ({order})")
        start = self._offsets[order[index[0]]][0]
        after = index[-1] + 1  # the segment runs up to the next array (padding included)
        stop = self._offsets[order[after]][0] if after < len(order) else self.data.size
        return self.data[start:stop], self.grad[start:stop]

    def __repr__(self):
        return (f"FlatParams({len(self._offsets)} arrays, {self.data.size} elements, "
                f"dtype={self.data.dtype})")
