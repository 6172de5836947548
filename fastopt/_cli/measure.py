"""What fastopt bench and fastopt bench --torch measure and print alike.

The run's header line, how unsteady a case's block times were (and the
limit past which a time is marked ``~``), and how a speedup is written.
Both benches import this module; neither imports the other's internals.
"""
import os
import platform
import statistics
import time

import numpy as np

from .. import _dispatch
from .._version import __version__

#: the many-array cases: 200 arrays of log-uniform sizes in these ranges
MANY_SMALL = "200 x 16..4096"
MANY_LARGE = "200 x 64..262144"

# Block-time spread (interquartile range / median) beyond which a time is
# unstable. On a quiet 2-core VM the spread stays below 0.15 for nearly every
# implementation and size, and reaches 0.4 at worst (fastopt at 1e4, where
# two threads share 5 us steps); machine noise that moves a median (another
# process taking a core for whole scheduler slices) spreads the blocks by far
# more than half their median.
SPREAD_LIMIT = 0.5


def block_spread(times):
    """Interquartile range of block times over their median (0 for fewer than 2 blocks)."""
    if len(times) < 2:
        return 0.0
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return float((q3 - q1) / med) if med > 0 else 0.0


def fmt_ratio(x):
    """A speedup with two significant digits at least: never '0.0x'."""
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}x"
    if x >= 10:
        return f"{x:.1f}x"
    if x >= 1:
        return f"{x:.2f}x"
    return f"{x:.2g}x"


def cpu_name():
    """The CPU's model name (/proc/cpuinfo, else platform.processor(); may be empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def header(with_torch):
    """The run's first line: fastopt, SIMD level, threads, numpy and torch versions, machine.

    Parameters
    ----------
    with_torch : bool
        Whether torch takes part (its version is printed, else "not used").

    Returns
    -------
    str
    """
    config = _dispatch.config()
    if with_torch:
        import torch
        torch_part = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    else:
        torch_part = "torch: not used"
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    name = cpu_name()
    return (f"fastopt {__version__} | SIMD {config['simd_level']} | threads "
            f"{config['num_threads']} (OpenMP {'on' if config['openmp'] else 'off'}) | "
            f"numpy {np.__version__} | {torch_part} | {machine}" + (f" ({name})" if name else ""))


def rotating_medians(runners, budget_s, block, blocks=None):
    """Time implementations side by side, in rotating rounds of blocks of steps.

    Parameters
    ----------
    runners : dict
        Implementation name -> a function taking one step.
    budget_s : float
        Seconds of rounds, after at least 3 of them.
    block : int
        Steps per block; a block's time / block is one sample.
    blocks : dict, optional
        Filled with name -> the per-step time of every block.

    Returns
    -------
    (dict, int)
        Name -> median seconds per step, and the steps each one ran.
    """
    times = {} if blocks is None else blocks
    times.update({name: [] for name in runners})
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 3 or time.perf_counter() < deadline:
        for name, run in runners.items():
            t0 = time.perf_counter()
            for _ in range(block):
                run()
            times[name].append((time.perf_counter() - t0) / block)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items()}, rounds * block


def model_shapes(label):
    """Array shapes of a case: one matrix "RxC", else those of model_sizes."""
    if "x" in label and " " not in label:
        return [tuple(int(d) for d in label.split("x"))]
    return [(n,) for n in model_sizes(label)]


def model_sizes(label):
    """Array sizes of a case: one array of n ("1e5"), one matrix ("1000x1000": its size),
    or 200 log-uniform sizes (seed 0)."""
    if "x" in label and " " not in label:
        return [int(np.prod(model_shapes(label)[0]))]
    if label == MANY_SMALL:
        lo, hi = 16, 4096
    elif label == MANY_LARGE:
        lo, hi = 64, 262144
    else:
        return [int(float(label))]
    rng = np.random.default_rng(0)
    return [int(x) for x in np.exp(rng.uniform(np.log(lo), np.log(hi), 200)).round()]
