"""Print the parity table: fastopt's largest deviation per optimizer class from its reference.

    python tests/parity_table.py

Replays every recorded case of ``tests/data/golden.npz`` (torch.optim 2.13)
and ``tests/data/golden_optax.npz`` (optax) through fastopt's fused kernels,
in float64 and float32, and prints, per class, the largest deviation over
its cases and checkpoints, measured as the parity tests measure it
(``max|p_fastopt - p_ref| / max|p_ref - p0|``; tests/test_torch_parity.py,
which also holds the tolerances: 1e-12 and 2e-5). Needs neither torch nor JAX.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_golden as mg  # noqa: E402
import make_optax_golden as mog  # noqa: E402
import test_torch_parity as tp  # noqa: E402


def table():
    """[(class, reference, cases, {dtype: max deviation})], in recording order."""
    rows = {}
    for path, cases, ref in ((mg.GOLDEN_PATH, mg.CASES, "torch.optim"),
                             (mog.GOLDEN_PATH, mog.CASES, "optax")):
        golden = tp.load_golden(path)
        for case_id, optimizer, kwargs in cases:
            _, p0, grads, trajs = golden[case_id]
            row = rows.setdefault((optimizer, ref), [0, dict.fromkeys(mg.DTYPES, 0.0)])
            row[0] += 1
            for dtype in mg.DTYPES:
                got = tp.run_fastopt(optimizer, kwargs, p0, grads, dtype, "cython",
                                     mg.CHECKPOINTS)
                dev = float(tp.deviation(got, trajs[dtype], p0).max())
                row[1][dtype] = max(row[1][dtype], dev)
    return [(opt, ref, n, devs) for (opt, ref), (n, devs) in rows.items()]


def main():
    print(f"{'class':9s} {'reference':12s} {'cases':>5s} {'float64':>9s} {'float32':>9s}")
    for opt, ref, n, devs in table():
        print(f"{opt:9s} {ref:12s} {n:5d} {devs['float64']:9.1e} {devs['float32']:9.1e}")
    print(f"(tolerances: float64 {tp.RTOL['float64']:g}, float32 {tp.RTOL['float32']:g}; "
          f"{mg.STEPS} steps, checkpoints {list(mg.CHECKPOINTS)})")


if __name__ == "__main__":
    main()
