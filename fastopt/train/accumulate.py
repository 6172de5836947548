"""Gradient accumulation over micro-batches, without extra copies.

Training with a large effective batch on little memory: k micro-batches each
add their gradient into the same buffers (scaled by 1/k for a mean), and the
optimizer steps once on the result. Each ``add`` is one fused pass.

Models from ``fastopt.models`` can do the same in their backward pass
(``loss_and_grad(..., accumulate=True, scale=1/k)``); this class is for
gradients computed elsewhere.
"""
from .. import _fastpath
from .. import _validation as V

__all__ = ["GradientAccumulator"]


class GradientAccumulator:
    """Sum or average the gradients of ``steps`` micro-batches into ``buffers``.

    Parameters
    ----------
    buffers : list of ndarray
        Where the accumulated gradients live (what the optimizer steps with).
        Zeroed here and by :meth:`reset`.
    steps : int
        Micro-batches per optimizer step.
    reduction : {"mean", "sum"}
        "mean" adds each micro-batch gradient times ``1 / steps``.

    Examples
    --------
    >>> import numpy as np, fastopt
    >>> w = np.zeros(2); g = np.empty(2)
    >>> opt = fastopt.SGD([w], lr=1.0)
    >>> acc = fastopt.GradientAccumulator([g], steps=2)
    >>> acc.add([np.array([1.0, 2.0])]); acc.add([np.array([3.0, 4.0])])
    >>> if acc.ready:
    ...     opt.step([g]); acc.reset()
    >>> w
    array([-2., -3.])
    """

    def __init__(self, buffers, steps, reduction="mean"):
        steps = V.step_count("steps", steps)
        V.either("reduction", reduction, "mean", "sum")
        if not isinstance(buffers, (list, tuple)) or not buffers:
            raise TypeError("buffers must be a non-empty list of arrays")
        named = [(f"buffers[{i}]", b) for i, b in enumerate(buffers)]
        for name, b in named:
            V.check_float_array(name, b, writeable=True)
        V.check_distinct_params(named)
        self.buffers = list(buffers)
        self.steps = steps
        self.reduction = reduction
        self._scale = 1.0 / steps if reduction == "mean" else 1.0
        self.count = 0
        self._ws = _fastpath.Workspace()
        self.reset()

    @property
    def ready(self):
        """True once ``steps`` micro-batches were added."""
        return self.count >= self.steps

    def add(self, grads):
        """Add one micro-batch's gradients (a list aligned with the buffers)."""
        if not isinstance(grads, (list, tuple)) or len(grads) != len(self.buffers):
            raise ValueError(f"grads must be a list of {len(self.buffers)} arrays")
        for i, (b, g) in enumerate(zip(self.buffers, grads)):
            V.check_float_array(f"grads[{i}]", g, writeable=False)
            V.check_like(f"grads[{i}]", g, f"buffers[{i}]", b)
        # A gradient overlapping any buffer (not only its own) would be read
        # while another buffer's update writes it.
        V.check_no_aliasing([(f"buffers[{i}]", b) for i, b in enumerate(self.buffers)],
                            [(f"grads[{i}]", g) for i, g in enumerate(grads)])
        self._ws.fill(self.buffers, list(grads), ())
        _fastpath.axpy(self._ws, self._scale)
        self.count += 1

    def reset(self):
        """Zero the buffers and start counting again (after the optimizer step)."""
        for b in self.buffers:
            b[...] = 0
        self.count = 0
