"""Two builds of fastopt side by side: is a change free of speed loss?

    python bench/ab_compare.py OLD_TREE NEW_TREE [--rounds 7]

Each tree is a checkout built in place (``python setup.py build_ext --inplace``
there). Every round runs one child process per tree, in alternating order, so
machine noise hits both alike; each child times the same cases (a warm
``opt.step`` in blocks, the median of its blocks) and reports a digest of the
parameters after a fixed number of steps. The two builds must agree bit for
bit on every case (fastopt's results do not depend on its layout), and the
table gives each case's median over rounds and the ratio new / old.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import hashlib, json, sys, time
import numpy as np
import fastopt

CASES = [("Adam", {}, np.float32, [16]), ("Adam", {}, np.float32, [1000]),
         ("Adam", {}, np.float32, [100000]), ("Adam", {}, np.float32, [1000000]),
         ("Adam", {}, np.float64, [100000]), ("SGD", {"lr": 0.01}, np.float32, [100000]),
         ("SGD", {"lr": 0.01, "momentum": 0.9}, np.float32, [100000]),
         ("Adagrad", {}, np.float32, [100000]), ("RMSprop", {}, np.float32, [100000]),
         ("Adam", {}, np.float32, [16] * 200),
         ("Adam", {}, np.float32, [int(x) for x in np.exp(np.random.default_rng(0).uniform(
             np.log(16), np.log(4096), 200)).round()])]
out = {}
for name, options, dtype, sizes in CASES:
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(n).astype(dtype) for n in sizes]
    grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
    opt = getattr(fastopt, name)(params, **options)
    for _ in range(3):
        opt.step(grads)
    total = sum(sizes)
    k = max(1, min(2000, int(2e6 / total)))
    blocks = []
    for _ in range(15):
        t0 = time.perf_counter()
        for _ in range(k):
            opt.step(grads)
        blocks.append((time.perf_counter() - t0) / k)
    digest = hashlib.sha256(b"".join(p.tobytes() for p in params)).hexdigest()[:16]
    label = (f"{name}{'-momentum' if options.get('momentum') else ''} "
             f"{np.dtype(dtype).name} {len(sizes)} x {total // len(sizes)}")
    out[label] = {"median_s": float(np.median(blocks)), "digest": digest,
                  "steps": 3 + 15 * k}
print(json.dumps(out))
"""


def child(tree):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=tree, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    runs = {"old": [], "new": []}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for which in order:
            runs[which].append(child(getattr(args, which)))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    cases = list(runs["old"][0])
    print(f"{'case':>28} | {'old':>10} | {'new':>10} | new/old | bits")
    for case in cases:
        med = {w: statistics.median(run[case]["median_s"] for run in runs[w]) for w in runs}
        same = {run[case]["digest"] for w in runs for run in runs[w]}
        if len(same) != 1:
            raise AssertionError(f"{case}: the two builds disagree ({same})")
        print(f"{case:>28} | {med['old'] * 1e6:8.2f}us | {med['new'] * 1e6:8.2f}us | "
              f"{med['new'] / med['old']:7.3f} | same")
    return 0


if __name__ == "__main__":
    sys.exit(main())
