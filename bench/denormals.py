"""Does Adam slow down when its state decays into the subnormal range?

On x86 an arithmetic instruction whose input or output is subnormal (below
the smallest normal number: 1.2e-38 in float32, 2.2e-308 in float64) takes a
microcode assist - tens to hundreds of cycles instead of one - unless the
thread's MXCSR has FTZ (flush results to zero) and DAZ (treat subnormal
inputs as zero) set. fastopt leaves MXCSR alone, so its results match the
NumPy reference bit for bit in that range too (tests/test_denormals.py). The
price is measured here.

Two measurements, on fastopt.Adam with default hyperparameters:

1. steady: ns per step with every element in the normal range, and with
   the gradients tiny (1e-20 in float32, 1e-160 in float64) so that every
   (or 10% of every) exp_avg_sq element is subnormal at every step;
2. decay: one long run of a fresh optimizer: tiny gradients for a while
   (exp_avg_sq builds up inside the subnormal range), then zero gradients,
   so exp_avg_sq decays into the subnormals towards 0. ns per step by
   window, next to the fraction of subnormal elements and of elements that
   still change, against a run with ordinary gradients.

   It never gets to 0. With round-to-nearest, v * beta2 rounds back to v
   once v is below 0.5 / (1 - beta2) units of the smallest subnormal (500
   for beta2 = 0.999: v sticks at 7e-43 in float32, 2.5e-321 in float64),
   and exp_avg sticks at 4 units (0.1 * 4 rounds to 0). An element whose
   gradient stays 0 keeps subnormal state forever, and every later step
   pays for it. torch.optim and NumPy do exactly the same arithmetic.

    python bench/denormals.py               # 1e5 and 1e6 elements (about a minute)
    python bench/denormals.py --quick       # 1e5 elements, shorter decay (~10 s)
    python bench/denormals.py --threads 1 --sizes 100000 --json out.json

Keep it short on a shared machine: --quick, or one size.
"""
import argparse
import json
import sys
import time

import numpy as np

import fastopt

TINY = {np.float32: 1e-20, np.float64: 1e-160}  # g * g is subnormal, g is not


def subnormal_fraction(a):
    tiny = np.finfo(a.dtype).smallest_normal
    return float(np.mean((a != 0) & (np.abs(a) < tiny)))


def zero_fraction(a):
    return float(np.mean(a == 0))


def make(dtype, n, seed=0, beta2=0.999):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    opt = fastopt.Adam([p], lr=1e-3, betas=(0.9, beta2))
    return opt, p, rng


def time_steps(opt, grads, steps, repeats=3):
    """Best of ``repeats``: mean seconds per step over ``steps`` steps."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            opt.step(grads)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def steady(dtype, n, steps, fraction):
    """ns/step with ``fraction`` of the elements held in the subnormal range (0: none)."""
    opt, _, rng = make(dtype, n)
    g = (rng.standard_normal(n) * 1e-3).astype(dtype)
    opt.step([g])  # allocates the state
    if fraction:
        k = round(n * fraction)
        tiny = dtype(TINY[dtype])
        g[:k] = tiny
        state = opt.state[0]
        state["exp_avg"][:k] = tiny
        # the fixed point of v = beta2 * v + (1 - beta2) * g * g: g * g
        state["exp_avg_sq"][:k] = tiny * tiny
    for _ in range(3):
        opt.step([g])
    seconds = time_steps(opt, [g], steps)
    return seconds * 1e9, subnormal_fraction(opt.state[0]["exp_avg_sq"])


def decay(dtype, n, tiny_steps, zero_steps, window, beta2):
    """A fresh run: ``tiny_steps`` of tiny gradients, then ``zero_steps`` of zeros."""
    opt = make(dtype, n, beta2=beta2)[0]
    g = np.full(n, TINY[dtype], dtype)
    rows = []
    step = 0
    before = np.zeros(n, dtype)
    for phase, count in (("tiny grads", tiny_steps), ("zero grads", zero_steps)):
        if phase == "zero grads":
            g[...] = 0
        done = 0
        while done < count:
            w = min(window, count - done)
            start = time.perf_counter()
            for _ in range(w):
                opt.step([g])
            seconds = (time.perf_counter() - start) / w
            done += w
            step += w
            state = opt.state[0]
            v = state["exp_avg_sq"]
            units = float(v.max() / np.finfo(dtype).smallest_subnormal)
            rows.append({"phase": phase, "last_step": step, "ns_per_step": seconds * 1e9,
                         "exp_avg_sq_subnormal": subnormal_fraction(v),
                         "exp_avg_sq_zero": zero_fraction(v),
                         "exp_avg_sq_changing": float(np.mean(v != before)),
                         "exp_avg_sq_max_units": units,
                         "exp_avg_subnormal": subnormal_fraction(state["exp_avg"])})
            before = v.copy()
    return rows


def decay_length(dtype, beta2):
    """Steps exp_avg_sq would take from its tiny-grads level to 0 in exact arithmetic.

    (It sticks before: see the module's docstring.)
    """
    info = np.finfo(dtype)
    level = TINY[dtype] ** 2
    smallest = float(info.smallest_subnormal)
    return int(np.log(level / smallest) / -np.log(beta2) * 1.1) + 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000",
                    help="comma-separated element counts for the steady measurement")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--threads", type=int, default=None,
                    help="fastopt.set_num_threads (default: fastopt's default)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per steady measurement")
    ap.add_argument("--decay-size", type=int, default=100_000)
    ap.add_argument("--beta2", type=float, default=0.999,
                    help="beta2 of the decay run (smaller: a shorter decay)")
    ap.add_argument("--windows", type=int, default=12, help="windows of the decay run")
    ap.add_argument("--quick", action="store_true",
                    help="1e5 elements, fewer steps, beta2=0.99 in the decay run")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.steps, args.beta2 = "100000", 10, 0.99
    if args.threads:
        fastopt.set_num_threads(args.threads)
    dtypes = [getattr(np, name) for name in args.dtypes.split(",")]
    sizes = [int(float(s)) for s in args.sizes.split(",")]

    print(f"fastopt {fastopt.__version__}, SIMD {fastopt.simd_level()}, "
          f"{fastopt.get_num_threads()} thread(s), numpy {np.__version__}")
    results = {"simd": fastopt.simd_level(), "threads": fastopt.get_num_threads(),
               "steady": [], "decay": []}

    print("\n1. steady state: Adam ns/step (ns/element), exp_avg_sq all normal vs subnormal")
    print(f"{'dtype':>8} {'n':>9} {'normal':>20} {'10% subnormal':>20} {'all subnormal':>20}"
          f" {'slowdown':>9}")
    for dtype in dtypes:
        for n in sizes:
            row = {"dtype": dtype.__name__, "n": n}
            cells = []
            for key, fraction in (("normal", 0.0), ("10%", 0.1), ("all", 1.0)):
                ns, frac = steady(dtype, n, args.steps, fraction)
                row[key] = {"ns_per_step": ns, "subnormal_fraction": frac}
                cells.append(f"{ns / 1e3:10.1f} us ({ns / n:5.2f})")
            row["slowdown"] = row["all"]["ns_per_step"] / row["normal"]["ns_per_step"]
            print(f"{dtype.__name__:>8} {n:>9} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20}"
                  f" {row['slowdown']:8.1f}x")
            results["steady"].append(row)

    n = args.decay_size
    print(f"\n2. decay: fresh Adam(betas=(0.9, {args.beta2})), n={n}: tiny grads, then zeros")
    for dtype in dtypes:
        zero_steps = decay_length(dtype, args.beta2)
        tiny_steps = max(zero_steps // 10, 50)
        window = max((tiny_steps + zero_steps) // args.windows, 1)
        normal_ns, _ = steady(dtype, n, max(args.steps, window // 4), 0.0)
        rows = decay(dtype, n, tiny_steps, zero_steps, window, args.beta2)
        results["decay"].append({"dtype": dtype.__name__, "n": n, "normal_ns_per_step": normal_ns,
                                 "windows": rows})
        print(f"  {dtype.__name__}: normal-range run {normal_ns / 1e3:.1f} us/step")
        print(f"  {'phase':>10} {'to step':>8} {'us/step':>9} {'vs normal':>9} "
              f"{'v subnormal':>11} {'v zero':>7} {'v changing':>10} {'max v/ulp':>10}"
              f" {'m subnormal':>11}")
        for r in rows:
            print(f"  {r['phase']:>10} {r['last_step']:>8} {r['ns_per_step'] / 1e3:9.1f} "
                  f"{r['ns_per_step'] / normal_ns:8.1f}x {r['exp_avg_sq_subnormal']:11.2f} "
                  f"{r['exp_avg_sq_zero']:7.2f} {r['exp_avg_sq_changing']:10.2f} "
                  f"{r['exp_avg_sq_max_units']:10.0f} {r['exp_avg_subnormal']:11.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
