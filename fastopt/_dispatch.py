"""Runtime choices: which compute-layer build runs, and on how many threads.

The compute layer is compiled once per instruction-set level (setup.py). At
import the best level that this CPU runs is chosen - or the one named by
``FASTOPT_SIMD=baseline|avx2|avx512`` - and its runner is installed in the
fast path. A level's module is imported only after the CPU was found able to
run it: its code may use those instructions anywhere, even at import.

Threads: a step splits its elements over at most ``get_num_threads()``
threads, and never more than OpenMP's own limit at the time of the call, so
``threadpoolctl.threadpool_limits`` and ``OMP_NUM_THREADS`` govern fastopt
too. Small steps stay on the calling thread (see ``_kernels.pxi``).
"""
import importlib
import importlib.util
import numbers
import os
import sys

import numpy as np

from . import _fastpath
from ._version import __version__

LEVELS = ("baseline", "avx2", "avx512")  # from least to most capable

_active = {}


def built_levels():
    """The levels compiled into this installation."""
    return [lvl for lvl in LEVELS if importlib.util.find_spec(f"fastopt._kernels_{lvl}")]


def cpu_levels():
    """The levels this CPU can run."""
    features = _fastpath.cpu_features()
    return [lvl for lvl in LEVELS if lvl == "baseline" or features[lvl]]


def select_simd(level=None):
    """Install the compute layer for ``level`` (None: the best this CPU runs).

    Raises ValueError for an unknown level, RuntimeError for one that is not
    built here or that this CPU cannot run.
    """
    built, runnable = built_levels(), cpu_levels()
    if level is None:
        level = [lvl for lvl in LEVELS if lvl in built and lvl in runnable][-1]
    elif level not in LEVELS:
        raise ValueError(f"FASTOPT_SIMD must be one of {', '.join(LEVELS)}, got {level!r}")
    elif level not in built:
        raise RuntimeError(f"SIMD level {level!r} is not built in this installation "
                           f"(built: {', '.join(built)})")
    elif level not in runnable:
        raise RuntimeError(f"this CPU cannot run SIMD level {level!r} "
                           f"(it runs: {', '.join(runnable)})")
    module = importlib.import_module(f"fastopt._kernels_{level}")
    _fastpath.install_runner(module.runner(), module.stats(), module.at_step())
    _active["level"], _active["module"] = level, module
    return level


def simd_level():
    """The SIMD level in use."""
    return _active["level"]


def _default_threads():
    env = os.environ.get("FASTOPT_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"FASTOPT_NUM_THREADS must be a whole number >= 1, got {env!r}") from None
        if n < 1:
            raise ValueError(f"FASTOPT_NUM_THREADS must be >= 1, got {env!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


MAX_THREADS = 1 << 16


def set_num_threads(n):
    """Use at most ``n`` threads per step (OpenMP's limit, if lower, wins)."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"number of threads must be an int >= 1 (at most {MAX_THREADS}), got {n!r}")
    _fastpath.set_max_threads(int(n))


def get_num_threads():
    """The most threads a step may use (before OpenMP's own limit)."""
    return _fastpath.get_max_threads()


def config():
    """Everything show_config() prints, as a dict."""
    info = _active["module"].info()
    return {
        "fastopt": __version__,
        "python": sys.version.split()[0],
        "simd_level": _active["level"],
        "simd_built": built_levels(),
        "simd_cpu": cpu_levels(),
        "num_threads": get_num_threads(),
        "openmp": info["openmp"],
        "omp_max_threads": info["omp_max_threads"],
        "thread_pool": info["thread_pool"],
        "compiler": info["compiler"],
        "flags": info["flags"],
    }


def pool_stats():
    """The active level's thread pool: jobs, jobs run in parallel, stalls (pool.h)."""
    return _active["module"].pool_stats()


def show_config():
    """Print the SIMD level, threads, compiler and flags fastopt runs with."""
    for key, value in config().items():
        if isinstance(value, list):
            value = ", ".join(value)
        print(f"{key:>16}: {value}")


select_simd(os.environ.get("FASTOPT_SIMD") or None)
set_num_threads(_default_threads())
