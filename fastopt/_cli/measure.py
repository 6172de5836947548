"""What fastopt bench and fastopt bench --torch measure and print alike.

The run's header line, how unsteady a case's block times were (and the
limit past which a time is marked ``~``), and how a speedup is written.
Both benches import this module; neither imports the other's internals.
"""
import os
import platform

import numpy as np

from .. import _dispatch
from .._version import __version__

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
