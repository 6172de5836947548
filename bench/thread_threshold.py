"""Where do two threads start to beat one? Measures the serial/parallel crossover.

For each rule and size, times a step with threads forced on (threshold 0)
and with one thread, alternating blocks in one process. The runner's default
threshold (parallel_min_work, in elements x rule cost) should sit near the
crossover: python bench/thread_threshold.py
"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import fastopt
from fastopt import _dispatch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import spec  # noqa: E402  (tests/spec.py: every class as it is typically used)

SIZES = [4096, 8192, 16384, 32768, 65536, 131072, 262144]


def per_step(opt, grads, k):
    t0 = time.perf_counter()
    for _ in range(k):
        opt.step(grads)
    return (time.perf_counter() - t0) / k


def main():
    module = _dispatch._active["module"]
    default = module.get_parallel_min_work()
    threads = max(2, fastopt.get_num_threads())
    print(f"default threshold: {default} work units (elements x rule cost); {threads} threads")
    print(f"{'rule':<14}{'n':>8}{'work':>10}{'1 thread':>12}{'threads':>12}{'ratio':>8}")
    try:
        module.set_parallel_min_work(0)
        for rule, cls, kwargs in spec.typical_cases():
            cost = spec.streams(cls, kwargs)  # memory streams per element (Adam: 7)
            for n in SIZES:
                p = np.random.default_rng(0).standard_normal(n).astype(np.float32)
                g = [np.ones(n, np.float32)]
                opt = cls([p], **kwargs)
                opt.step(g)
                k = max(1, int(2e5 // n))
                samples = {1: [], threads: []}
                for _ in range(15):
                    for t in samples:
                        fastopt.set_num_threads(t)
                        samples[t].append(per_step(opt, g, k))
                one, many = statistics.median(samples[1]), statistics.median(samples[threads])
                print(f"{rule:<14}{n:>8}{n * cost:>10}{one * 1e6:>10.2f}us{many * 1e6:>10.2f}us"
                      f"{one / many:>8.2f}")
    finally:
        module.set_parallel_min_work(default)
        fastopt.set_num_threads(threads)


if __name__ == "__main__":
    main()
