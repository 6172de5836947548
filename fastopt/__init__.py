"""fastopt: fused, in-place optimizer steps for NumPy arrays.

Each update (SGD, Adagrad, RMSprop, Adam, AdamW) is one pass over memory in
Cython, following torch.optim's formulas, so a training loop can switch
between the two without surprises.
"""
from . import kernels, losses, lr_scheduler, models, reference
from ._dispatch import get_num_threads, set_num_threads, show_config, simd_level
from ._version import __version__
from .accumulate import GradientAccumulator
from .batching import Batches, batches
from .checkpoint import load_optimizer
from .clip import clip_grad_norm, clip_grad_value, grad_norm
from .flat import FlatParams
from .optimizer import Optimizer
from .optimizers import SGD, Adagrad, Adam, AdamW, RMSprop
from .training import EarlyStopping, History, fit, lr_range_test

__all__ = [
    # optimizers
    "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Optimizer", "kernels", "reference",
    # layout and runtime
    "FlatParams", "set_num_threads", "get_num_threads", "show_config", "simd_level",
    # training loops
    "batches", "Batches", "clip_grad_norm", "clip_grad_value", "grad_norm",
    "GradientAccumulator", "fit", "History", "EarlyStopping", "lr_range_test", "load_optimizer",
    "lr_scheduler", "models", "losses",
    "__version__",
]
