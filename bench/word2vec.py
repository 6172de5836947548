"""Skip-gram with negative sampling on a synthetic Zipf corpus, NumPy only.

The classic sparse-row workload: each step reads a batch of (center,
context) pairs and K negative words per pair, and its gradient touches only
those rows of the two embedding tables, with many repeats (Zipf). Two
trainers run the very same steps:

- fastopt: the gradients as fastopt.SparseRows, stepped by fastopt.Adagrad
  (sparse rows merged and updated in one fused pass);
- NumPy: the same Adagrad written with NumPy alone, the usual way
  (``np.unique`` + ``np.add.at`` to merge repeated rows, then fancy-indexed
  updates of the touched rows).

Both compute the forward and backward pass identically; the script checks
that they end with the same tables (to float32 rounding: NumPy's
``np.add.at`` and fastopt add repeats in the same position order, and the
update is Adagrad's sparse form in both) and prints steps per second.

    python bench/word2vec.py                     # vocab 200k, dim 64, batch 1024, K 5
    python bench/word2vec.py --steps 50 --vocab 50000
"""
import argparse
import time

import numpy as np

import fastopt


def corpus(rng, vocab, length, a=1.1):
    """A token stream whose word frequencies follow Zipf(a)."""
    return ((rng.zipf(a, length) - 1) % vocab).astype(np.int64)


def batches(rng, tokens, vocab, batch, window, negatives, steps):
    """(centers, contexts, negatives) per step: random positions, a context within the window."""
    for _ in range(steps):
        at = rng.integers(window, tokens.size - window, batch)
        shift = rng.integers(1, window + 1, batch) * rng.choice([-1, 1], batch)
        yield tokens[at], tokens[at + shift], rng.integers(0, vocab, (batch, negatives))


def sgns_grads(w_in, w_out, centers, contexts, negs):
    """Gradients of the negative-sampling loss: rows of w_in and of w_out, as (indices, values)."""
    v = w_in[centers]                                        # (B, D)
    targets = np.concatenate([contexts[:, None], negs], 1)   # (B, 1 + K)
    u = w_out[targets]                                       # (B, 1 + K, D)
    score = np.einsum("bd,bkd->bk", v, u)
    label = np.zeros_like(score)
    label[:, 0] = 1.0
    coef = (1.0 / (1.0 + np.exp(-score)) - label).astype(np.float32)  # d loss / d score
    g_in = np.einsum("bk,bkd->bd", coef, u)
    g_out = coef[:, :, None] * v[:, None, :]
    return (centers, g_in), (targets.ravel(), g_out.reshape(-1, v.shape[1]))


class NumpyAdagrad:
    """Adagrad over sparse rows with NumPy alone (torch's sparse form of the update)."""

    def __init__(self, table, lr, eps=1e-10):
        self.table, self.lr, self.eps = table, lr, eps
        self.sum = np.zeros_like(table)

    def step(self, indices, values):
        rows, inverse = np.unique(indices, return_inverse=True)
        merged = np.zeros((rows.size, values.shape[1]), values.dtype)
        np.add.at(merged, inverse, values)
        acc = self.sum[rows] + merged * merged
        self.sum[rows] = acc
        self.table[rows] = self.table[rows] + np.float32(-self.lr) * (
            merged / (np.sqrt(acc) + np.float32(self.eps)))


def train(kind, start_in, start_out, data, lr):
    w_in, w_out = start_in.copy(), start_out.copy()
    if kind == "fastopt":
        opt = fastopt.Adagrad([w_in, w_out], lr=lr)
        step = lambda g_in, g_out: opt.step([fastopt.SparseRows(*g_in),  # noqa: E731
                                             fastopt.SparseRows(*g_out)])
    else:
        opt_in, opt_out = NumpyAdagrad(w_in, lr), NumpyAdagrad(w_out, lr)

        def step(g_in, g_out):
            opt_in.step(*g_in)
            opt_out.step(*g_out)
    optimizer_time = 0.0
    t0 = time.perf_counter()
    for centers, contexts, negs in data:
        g_in, g_out = sgns_grads(w_in, w_out, centers, contexts, negs)
        t1 = time.perf_counter()
        step(g_in, g_out)
        optimizer_time += time.perf_counter() - t1
    return w_in, w_out, time.perf_counter() - t0, optimizer_time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--negatives", type=int, default=5)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.1)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    tokens = corpus(rng, args.vocab, 2_000_000)
    data = list(batches(rng, tokens, args.vocab, args.batch, args.window, args.negatives,
                        args.steps))
    start_in = ((rng.random((args.vocab, args.dim)) - 0.5) / args.dim).astype(np.float32)
    start_out = np.zeros((args.vocab, args.dim), np.float32)
    results = {kind: train(kind, start_in, start_out, data, args.lr)
               for kind in ("numpy", "fastopt")}
    (a_in, a_out, *_), (b_in, b_out, *_) = results["numpy"], results["fastopt"]
    for a, b, name in ((a_in, b_in, "w_in"), (a_out, b_out, "w_out")):
        change = float(np.abs(b - (start_in if name == "w_in" else start_out)).max())
        err = float(np.abs(a - b).max())
        assert err <= 1e-4 * change, f"{name}: fastopt and NumPy differ by {err:.3g}"
    print(f"skip-gram, negative sampling: vocab {args.vocab}, dim {args.dim}, batch "
          f"{args.batch}, {args.negatives} negatives, {args.steps} steps (Adagrad lr {args.lr})")
    print(f"{'trainer':8} | {'steps/s':>8} | {'optimizer ms/step':>17}")
    for kind, (_, _, total, opt_time) in results.items():
        print(f"{kind:8} | {args.steps / total:8.1f} | {opt_time / args.steps * 1e3:17.3f}")
    speed = results["numpy"][2] / results["fastopt"][2]
    opt_speed = results["numpy"][3] / results["fastopt"][3]
    print(f"fastopt: {speed:.2f}x the steps per second, its optimizer step {opt_speed:.1f}x faster")


if __name__ == "__main__":
    main()
