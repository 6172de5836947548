"""Threads under a busy core: 1- and 2-thread Adam steps, with and without a CPU hog.

A training machine is rarely idle: a data loader, another job or the OS keeps
a core busy. A runner that splits the work evenly in advance then waits for
a worker the OS has descheduled, and one step takes milliseconds instead of
microseconds. fastopt's runner hands out small chunks that running threads
claim, the calling thread works too, and it never waits for a worker that
has not claimed anything. A thread preempted in the middle of a chunk still
holds the step up; the runner counts such stalls and, while they keep
coming, runs steps on the calling thread alone (src_c/pool.h).

Columns: per-step quantiles; the 2-thread/1-thread ratios of the median and
of p99; for the 2-thread steps, the share run in parallel, the stalls, and
the share of chunks the calling thread ran.

This script starts and stops the hog itself (one process spinning in a
loop), and times single steps so that the tail shows, not only the median:

    python bench/contention.py            # 1e5 and 1e6 elements
    python bench/contention.py --quick    # fewer steps

Target (issue 19): loaded, the 2-thread step is never slower than 2x the
1-thread step under the same load; unloaded, no slower than before. The two
optimizers take the same steps from the same start, and their parameters are
checked bit-identical at the end: a thread count never changes a result.
"""
import argparse
import contextlib
import statistics
import subprocess
import sys
import time

import numpy as np

import fastopt
from fastopt import _dispatch

SIZES = (100_000, 1_000_000)


@contextlib.contextmanager
def hog(on):
    """A process that keeps one core busy, for the duration of the block."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start and settle on a core
        yield
    finally:
        proc.kill()
        proc.wait()


def timed_steps(opt, grads, count):
    """Seconds per step, one sample per step."""
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        opt.step(grads)
        out.append(time.perf_counter() - t0)
    return out


def measure(n, steps, rounds):
    """{threads: per-step samples}, the thread counts alternating in rounds."""
    rng = np.random.default_rng(0)
    start = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32)]
    params = {t: start.copy() for t in (1, 2)}
    opts = {t: fastopt.Adam([params[t]], lr=1e-3) for t in (1, 2)}
    samples = {1: [], 2: []}
    before = _dispatch.pool_stats()
    for _ in range(rounds):
        for t in (1, 2):
            fastopt.set_num_threads(t)
            samples[t] += timed_steps(opts[t], grads, steps)
    after = _dispatch.pool_stats()
    pool = {key: after[key] - before[key] for key in after}
    if not np.array_equal(params[1].view(np.uint32), params[2].view(np.uint32)):
        raise AssertionError(f"n={n}: the 2-thread result differs from the 1-thread one")
    return samples, pool


def quantile(xs, q):
    return float(np.quantile(np.asarray(xs), q))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args(argv)
    scale = 0.25 if args.quick else 1.0
    default_threads = fastopt.get_num_threads()
    print(f"fastopt {fastopt.__version__}, SIMD level {fastopt.simd_level()}, "
          f"{default_threads} threads available")
    print(f"{'load':<9}{'n':>9}{'thr':>4}{'median':>10}{'p90':>10}{'p99':>10}{'max':>10}"
          f"{'2t/1t med':>11}{'2t/1t p99':>11}{'parallel':>10}{'stalls':>8}{'caller':>8}")
    rows = []
    try:
        for loaded in (False, True):
            with hog(loaded):
                for n in SIZES:
                    steps = int((2000 if n <= 100_000 else 300) * scale)
                    samples, pool = measure(n, steps, rounds=4)
                    stats = {t: (statistics.median(s), quantile(s, 0.9), quantile(s, 0.99),
                                 max(s)) for t, s in samples.items()}
                    for t in (1, 2):
                        med, p90, p99, top = stats[t]
                        ratio = ""
                        if t == 2:
                            ratio = (f"{stats[2][0] / stats[1][0]:>11.2f}"
                                     f"{stats[2][2] / stats[1][2]:>11.2f}"
                                     f"{pool['parallel'] / len(samples[2]):>9.0%}"
                                     f"{pool['stalls']:>8}"
                                     f"{pool['caller_chunks'] / max(pool['chunks'], 1):>8.0%}")
                        print(f"{'loaded' if loaded else 'idle':<9}{n:>9}{t:>4}"
                              f"{med * 1e6:>8.1f}us{p90 * 1e6:>8.1f}us{p99 * 1e6:>8.1f}us"
                              f"{top * 1e6:>8.0f}us{ratio}")
                    rows.append((loaded, n, stats))
    finally:
        fastopt.set_num_threads(default_threads)
    return rows


if __name__ == "__main__":
    main()
