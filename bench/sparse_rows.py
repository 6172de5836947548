"""Sparse-row steps side by side: torch.optim, fastopt.torch and fastopt's NumPy API.

An embedding table (default 1e6 x 64 float32) and, per step, a gradient of
8192 Zipf(1.2) indices with repeats, as nn.Embedding(sparse=True) makes it
(uncoalesced COO). Only the optimizer step is timed; every implementation
takes the same steps from the same table, and the tables are compared at the
end: fastopt.torch and the NumPy API bit for bit, torch to 1e-5 of the total
change or a few ulps of the values (it adds repeated rows in its own order).

    python bench/sparse_rows.py                 # the issue's case
    python bench/sparse_rows.py --rows 100000 --steps 20

torch is timed at its best of 1 and 2 threads; fastopt at its default.
Prints per implementation the median step time and the ratio to torch.
"""
import argparse
import time

import numpy as np
import torch

import fastopt
import fastopt.torch as ft

CASES = [  # (label, class name, kwargs)
    ("SparseAdam", "SparseAdam", {"lr": 1e-3}),
    ("Adagrad (sparse)", "Adagrad", {"lr": 1e-2}),
    ("SGD (sparse)", "SGD", {"lr": 1e-2}),
    ("RowWiseAdagrad", "RowWiseAdagrad", {"lr": 1e-2}),
]


def zipf_indices(rng, rows, count, a=1.2):
    """``count`` row indices, Zipf(a)-distributed (row 0 the most frequent)."""
    return ((rng.zipf(a, count) - 1) % rows).astype(np.int64)


def make_grads(rows, dim, count, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [(zipf_indices(rng, rows, count),
             rng.standard_normal((count, dim)).astype(np.float32)) for _ in range(steps)]


def time_torch(cls, kwargs, start, grads, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weight = torch.nn.Parameter(torch.from_numpy(start.copy()))
        opt = cls([weight], **kwargs)
        times = []
        for idx, values in grads:
            weight.grad = torch.sparse_coo_tensor(torch.from_numpy(idx)[None],
                                                  torch.from_numpy(values), weight.shape)
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        return times, weight.detach().numpy()
    finally:
        torch.set_num_threads(old)


def time_numpy(cls, kwargs, start, grads):
    table = start.copy()
    opt = cls([table], **kwargs)
    times = []
    for idx, values in grads:
        g = fastopt.SparseRows(idx, values)
        t0 = time.perf_counter()
        opt.step([g])
        times.append(time.perf_counter() - t0)
    return times, table


def median_ms(times, warmup=3):
    return float(np.median(times[warmup:])) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=float, default=1e6)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--indices", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    rows = int(args.rows)
    grads = make_grads(rows, args.dim, args.indices, args.steps)
    unique = np.mean([np.unique(idx).size for idx, _ in grads])
    start = np.random.default_rng(1).standard_normal((rows, args.dim)).astype(np.float32)
    print(f"table {rows} x {args.dim} float32, {args.indices} Zipf(1.2) indices per step "
          f"({unique:.0f} distinct rows on average), {args.steps} steps, median of the last "
          f"{args.steps - 3}; fastopt {fastopt.__version__} ({fastopt.simd_level()}, "
          f"{fastopt.get_num_threads()} threads), torch {torch.__version__}")
    print(f"{'rule':18} | {'torch (best of 1,2 thr)':>24} | {'fastopt.torch':>13} | "
          f"{'fastopt numpy':>13} | {'x torch':>8} | {'numpy/torch API':>15}")
    for label, name, kwargs in CASES:
        ours_t, ours_table = time_torch(getattr(ft, name), kwargs, start, grads, 1)
        ours_np, np_table = time_numpy(getattr(fastopt, name), kwargs, start, grads)
        assert np.array_equal(ours_table, np_table), f"{label}: fastopt.torch != NumPy API"
        theirs = "-"
        ratio = "-"
        if hasattr(torch.optim, name):
            best, table = None, None
            for threads in (1, 2):
                times, table = time_torch(getattr(torch.optim, name), kwargs, start, grads,
                                          threads)
                best = median_ms(times) if best is None else min(best, median_ms(times))
            change = float(np.abs(table - start).max())
            err = float(np.abs(ours_table - table).max())
            # (a few ulps of the table's values, or 1e-5 of the change: torch adds
            # repeated rows in another order)
            bound = max(1e-5 * change, 4 * np.finfo(np.float32).eps * float(np.abs(table).max()))
            assert err <= bound, f"{label}: fastopt {err:.3g} from torch (change {change:.3g})"
            theirs = f"{best:.3f} ms"
            ratio = f"{best / median_ms(ours_t):.1f}x"
        print(f"{label:18} | {theirs:>24} | {median_ms(ours_t):10.3f} ms | "
              f"{median_ms(ours_np):10.3f} ms | {ratio:>8} | "
              f"{median_ms(ours_np) / median_ms(ours_t):14.2f}x")


if __name__ == "__main__":
    main()
