"""fastopt: fused, in-place optimizer steps for NumPy arrays.

Each update (SGD, Adagrad, RMSprop, Adam, AdamW) is one pass over memory in
Cython, following torch.optim's formulas, so a training loop can switch
between the two without surprises.
"""
import importlib.util as _ilu
import os as _os

# Run from a clone's root, ``python -m fastopt`` or ``python -c "import fastopt"``
# puts the current folder first on sys.path, so the *unbuilt* source tree
# ./fastopt shadows the installed package. Without this check the first
# compiled import fails as a baffling circular-import error.
_here = _os.path.dirname(_os.path.realpath(__file__))
_spec = _ilu.find_spec("fastopt._fastpath")
if _spec is None or _os.path.dirname(_os.path.realpath(_spec.origin)) != _here:
    _tree = _os.path.dirname(_here)
    _in_source_tree = _os.path.isdir(_os.path.join(_tree, "src_c"))
    raise ImportError(
        f"fastopt is being imported from {_here}, "
        + ("its source tree, where the Cython modules are not built. Python puts the current "
           "folder first on sys.path for `python -m ...`, `python -c ...` and `python -m pytest`, "
           "so the source folder hides the installed fastopt. Use the `fastopt` command "
           "(`fastopt bench`), plain `pytest`, or run Python from another folder; for "
           "development, build in place with `pip install -e . --no-build-isolation`."
           if _in_source_tree else
           "which has no compiled modules (fastopt._fastpath is missing): reinstall fastopt "
           "with `pip install --force-reinstall fastopt` (or `pip install .` from its source).")
    )
del _ilu, _os, _here, _spec

from . import _aliases, kernels, lr_scheduler, reference
from ._dispatch import get_num_threads, set_num_threads, show_config, simd_level
from ._version import __version__
from .flat import FlatParams
from .sparse import SparseRows
from .optim import OPTIMIZERS as _OPTIMIZERS, Optimizer, load_optimizer
from .train import (EarlyStopping, GradientAccumulator, History, accumulate, batches, Batches,
                    batching, clip, clip_grad_norm, clip_grad_value, fit, grad_norm, losses,
                    lr_range_test, models, training)

globals().update(_OPTIMIZERS)  # fastopt.SGD, fastopt.Adam, ...: every class of the registry

# The public paths of modules that live in a subpackage: fastopt.models is
# fastopt.train.models (one module object), fastopt.bench is fastopt._cli.bench,
# imported only when asked for (it is the command line's, with matplotlib).
_aliases.install({
    **{f"{__name__}.{name}": f"{__name__}.train.{name}"
       for name in ("accumulate", "batching", "clip", "losses", "models", "training")},
    **{f"{__name__}.{name}": f"{__name__}._cli.{name}" for name in ("bench", "bench_torch", "demo")},
})

__all__ = [
    # optimizers: every class of the registry (fastopt.optim)
    *_OPTIMIZERS, "Optimizer", "kernels", "reference",
    # layout and runtime
    "FlatParams", "SparseRows", "set_num_threads", "get_num_threads", "show_config", "simd_level",
    # training loops
    "batches", "Batches", "clip_grad_norm", "clip_grad_value", "grad_norm",
    "GradientAccumulator", "fit", "History", "EarlyStopping", "lr_range_test", "load_optimizer",
    "lr_scheduler", "models", "losses",
    "__version__",
]
