"""The training layer: data, losses, models and loops around an optimizer.

Built on the optimizers (:mod:`fastopt.optim`) and the schedulers, never
below them; :mod:`fastopt` re-exports its public names, and each module is
importable by its public path too (``fastopt.models`` is
``fastopt.train.models``, the same module object).

- ``batching``: :func:`~fastopt.batches`, full-batch, stochastic and mini-batch
- ``clip``: gradient clipping and the global gradient norm
- ``accumulate``: :class:`~fastopt.GradientAccumulator`, micro-batches
- ``losses``: losses with analytic gradients
- ``models``: NumPy models whose backward pass writes one flat gradient
- ``training``: :func:`~fastopt.fit`, early stopping, the learning-rate range test
"""
from . import accumulate, batching, clip, losses, models, training
from .accumulate import GradientAccumulator
from .batching import Batches, batches
from .clip import clip_grad_norm, clip_grad_value, grad_norm
from .training import EarlyStopping, History, fit, lr_range_test

__all__ = ["batches", "Batches", "clip_grad_norm", "clip_grad_value", "grad_norm",
           "GradientAccumulator", "fit", "History", "EarlyStopping", "lr_range_test"]
