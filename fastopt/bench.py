"""python -m fastopt bench: fastopt's step against NumPy and torch.optim, side by side.

Every implementation runs the same steps on copies of the same data in one
process, interleaved step by step, so a noisy machine slows all of them
alike; medians are reported. Before a figure is printed, each
implementation's result is checked against fastopt's NumPy reference: a
benchmark that does not check its kernel is not a benchmark.

The machine's memory bandwidth is measured in the same run with a probe that
moves Adam's traffic (7 streams) at fastopt's thread count; "% of bound" is
the time the rule's bytes need at that bandwidth divided by the step's time.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import fastopt
from fastopt import _dispatch, _fastpath, _plotting

RULES = {  # name -> (optimizer class name, options, streams of memory per element)
    "adam": ("Adam", {}, 7),
    "adamw": ("AdamW", {}, 7),
    "sgd": ("SGD", {"lr": 0.01}, 3),
    "sgd-momentum": ("SGD", {"lr": 0.01, "momentum": 0.9}, 5),
    "adagrad": ("Adagrad", {}, 5),
    "rmsprop": ("RMSprop", {}, 5),
}

MANY_SMALL = "200 x 16..4096"
MANY_LARGE = "200 x 64..262144"


def model_sizes(label):
    """Array sizes of a case: one array of n, or 200 log-uniform sizes (seed 0)."""
    if label == MANY_SMALL:
        lo, hi = 16, 4096
    elif label == MANY_LARGE:
        lo, hi = 64, 262144
    else:
        return [int(float(label))]
    rng = np.random.default_rng(0)
    return [int(x) for x in np.exp(rng.uniform(np.log(lo), np.log(hi), 200)).round()]


def plan(quick, full):
    """The (rule, dtype, size label) cases of a run."""
    if quick:
        return ([("adam", "float32", n) for n in ("1e3", "1e5", "1e7")]
                + [("adam", "float32", MANY_SMALL), ("sgd", "float32", "1e5")])
    cases = [("adam", "float32", n) for n in ("1e3", "1e4", "1e5", "1e6", "1e7")]
    cases += [("adam", "float32", m) for m in (MANY_SMALL, MANY_LARGE)]
    for rule in ("sgd", "sgd-momentum", "adagrad", "rmsprop"):
        cases += [(rule, "float32", n) for n in ("1e3", "1e5", "1e7")]
    cases += [("adam", "float64", n) for n in ("1e3", "1e5", "1e7")]
    cases += [("sgd", "float64", "1e7")]
    if full:
        cases += [("adam", "float32", "6.4e7"), ("adam", "float64", MANY_LARGE)]
    return cases


# ------------------------------------------------------------------ bandwidth

def measure_bandwidth(elements=1 << 25, repeats=5):
    """GB/s of the 7-stream probe over float32 arrays, at fastopt's thread count."""
    a, b, c, d = (np.ones(elements, np.float32) for _ in range(4))
    ws = _fastpath.Workspace()
    ws.fill([a], [b], ([c], [d], None))
    _fastpath.stream(ws)  # first touch
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _fastpath.stream(ws)
        times.append(time.perf_counter() - t0)
    if not (a[0] == b[0] * (repeats + 2) and d[-1] == c[-1]):
        raise AssertionError("bandwidth probe computed a wrong result")
    return 7 * 4 * elements / statistics.median(times) / 1e9


# ------------------------------------------------------------ implementations

def _fastopt_impl(cls, options, arrays, backend="cython"):
    opt = cls(arrays, backend=backend, **options)
    return lambda grads: opt.step(grads)


def _flat_impl(cls, options, arrays):
    flat = fastopt.FlatParams({str(i): a for i, a in enumerate(arrays)})
    opt = cls([flat.data], **options)
    views = list(flat.grads.values())
    params = list(flat.params.values())

    def step(grads):
        # The model's backward pass writes into the views; run_case calls
        # step.load(grads) for that before timing a block.
        opt.step([flat.grad])
    step.load = lambda grads: [np.copyto(v, g) for v, g in zip(views, grads)]
    step.params = params
    return step


def _torch_impl(cls_name, options, arrays, threads):
    try:
        import torch
    except ImportError:
        return None
    tensors = [torch.from_numpy(a) for a in arrays]  # share memory with the arrays
    cls = getattr(torch.optim, cls_name)
    try:
        opt = cls(tensors, fused=True, **options)
    except (TypeError, RuntimeError, ValueError):
        opt = cls(tensors, foreach=False, **options)  # no fused kernel (RMSprop)

    grads_cache = {}

    def step(grads):
        key = id(grads)
        if key not in grads_cache:  # wrap once: the data is shared, not copied
            grads_cache[key] = [torch.from_numpy(g) for g in grads]
        for t, g in zip(tensors, grads_cache[key]):
            t.grad = g
        torch.set_num_threads(threads)
        opt.step()
    return step


def run_case(rule, dtype, label, budget_s=0.4, with_torch=True):
    """Time one case; return a dict of medians and derived figures."""
    cls_name, options, streams = RULES[rule]
    cls = getattr(fastopt, cls_name)
    dtype = np.dtype(dtype)
    sizes = model_sizes(label)
    n = sum(sizes)
    rng = np.random.default_rng(1)
    p0 = [rng.standard_normal(s).astype(dtype) for s in sizes]
    # Two gradient sets, alternated; the offset makes parameters drift, so
    # deviations are measured against a growing total change.
    grad_sets = [[(rng.standard_normal(s) + 0.5).astype(dtype) for s in sizes] for _ in range(2)]

    impls, arrays = {}, {}

    def add(name, make):
        arrays[name] = [p.copy() for p in p0]
        impl = make(arrays[name])
        if impl is not None:
            impls[name] = impl
        else:
            del arrays[name]

    add("fastopt", lambda a: _fastopt_impl(cls, options, a))
    add("numpy", lambda a: _fastopt_impl(cls, options, a, backend="numpy"))
    if len(sizes) > 1:
        add("fastopt flat", lambda a: _flat_impl(cls, options, a))
    if with_torch:
        for threads in (1, 2):
            add(f"torch {threads}t", lambda a, t=threads: _torch_impl(cls_name, options, a, t))

    # Rounds: each implementation in turn runs a block of k steps on one
    # gradient set (its working set stays warm, as in a training loop), and
    # its time per step in that block is one sample. Rotating through the
    # implementations every round exposes them all to the same machine noise.
    times = {name: [] for name in impls}

    def block(name, grads, k):
        impl = impls[name]
        if hasattr(impl, "load"):
            impl.load(grads)  # what the model's backward pass would have written
        t0 = time.perf_counter()
        for _ in range(k):
            impl(grads)
        return (time.perf_counter() - t0) / k

    for name in impls:
        block(name, grad_sets[0], 1)  # the first step allocates state: not a sample
    # Block length from one warm step each (the first step of torch or of a
    # lazily allocating optimizer can be 10x its usual time): about 2 ms for
    # the fastest, and at least 3 rounds of every implementation in budget_s.
    warm = {name: block(name, grad_sets[1], 1) for name in impls}
    fastest, slowest = min(warm.values()), max(warm.values())
    k = max(1, min(int(2e-3 / max(fastest, 1e-9)), 64, int(budget_s / 3 / max(slowest, 1e-9))))
    rounds = 0
    deadline = time.perf_counter() + budget_s
    while rounds < 3 or (rounds < 200 and time.perf_counter() < deadline):
        for name in impls:
            times[name].append(block(name, grad_sets[(rounds + 1) % 2], k))
        rounds += 1
    step_count = 2 + rounds * k

    result = {"rule": rule, "dtype": str(dtype), "case": label, "n": n, "arrays": len(sizes),
              "steps": step_count, "bytes_per_step": streams * dtype.itemsize * n}
    result.update(check(arrays, impls, p0))
    result["median_s"] = {name: statistics.median(ts) for name, ts in times.items()}
    return result


def check(arrays, impls, p0):
    """Compare every implementation with the NumPy reference after the same steps."""
    def flat_of(name):
        impl = impls[name]
        return np.concatenate([np.ravel(a) for a in getattr(impl, "params", arrays[name])])
    ref = flat_of("numpy")
    start = np.concatenate([np.ravel(p) for p in p0])
    scale = float(np.max(np.abs(ref.astype(np.float64) - start))) or 1.0
    # Other implementations round differently (torch's fused kernels reorder
    # operations): allow 1e-4 of the total change plus a few units in the last
    # place of the largest parameter, which dominate after only a few steps.
    ulps = 4 * np.finfo(ref.dtype).eps * float(np.max(np.abs(ref))) if ref.size else 0.0
    out = {"max_rel_dev": {}}
    for name in impls:
        got = flat_of(name)
        err = float(np.max(np.abs(got.astype(np.float64) - ref))) if got.size else 0.0
        out["max_rel_dev"][name] = err / scale
        exact = not name.startswith("torch")
        if exact and not np.array_equal(got, ref, equal_nan=True):
            raise AssertionError(f"{name} disagrees with the NumPy reference "
                                 f"(rel. dev {err / scale:.3g})")
        if not exact and not err <= 1e-4 * scale + ulps:
            raise AssertionError(f"{name} deviates from the NumPy reference by {err / scale:.3g}")
    return out


# ----------------------------------------------------------------- reporting

def summarize(result, bandwidth_gbs):
    """Derived figures: ns/element, GB/s, % of bound, speedups."""
    med = result["median_s"]
    fast = med["fastopt"]
    n = result["n"]
    torch = {k: v for k, v in med.items() if k.startswith("torch")}
    best_torch = min(torch.values()) if torch else None
    bound = result["bytes_per_step"] / (bandwidth_gbs * 1e9)
    row = {
        "fastopt_s": fast,
        "ns_per_element": fast / n * 1e9,
        "gb_per_s": result["bytes_per_step"] / fast / 1e9,
        "percent_of_bound": 100 * bound / fast,
        "numpy_s": med["numpy"],
        "speedup_vs_numpy": med["numpy"] / fast,
        "torch_best_s": best_torch,
        "speedup_vs_torch": best_torch / fast if best_torch else None,
    }
    if "fastopt flat" in med:
        row["flat_s"] = med["fastopt flat"]
    return row


def _fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    return f"{seconds * 1e3:.2f} ms"


def format_table(results, with_flat):
    header = ["rule", "dtype", "case", "fastopt", "ns/elem", "GB/s", "% bound", "numpy",
              "torch best", "x numpy", "x torch"]
    if with_flat:
        header.insert(4, "flat")
    rows = []
    for r in results:
        s = r["summary"]
        row = [r["rule"], r["dtype"].replace("float", "f"), r["case"], _fmt_time(s["fastopt_s"]),
               f"{s['ns_per_element']:.3f}", f"{s['gb_per_s']:.1f}", f"{s['percent_of_bound']:.0f}%",
               _fmt_time(s["numpy_s"]), _fmt_time(s["torch_best_s"]),
               f"{s['speedup_vs_numpy']:.1f}x",
               f"{s['speedup_vs_torch']:.1f}x" if s["speedup_vs_torch"] else "-"]
        if with_flat:
            row.insert(4, _fmt_time(s.get("flat_s")))
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def plot(results, path):
    """Throughput vs size per implementation (Adam float32, one array), if matplotlib is here."""
    plt = _plotting.pyplot()
    if plt is None:
        return None
    chosen = [r for r in results if r["rule"] == "adam" and r["dtype"] == "float32"
              and r["arrays"] == 1]
    if len(chosen) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in chosen[0]["median_s"]:
        xs = [r["n"] for r in chosen if name in r["median_s"]]
        ys = [r["n"] / r["median_s"][name] / 1e9 for r in chosen if name in r["median_s"]]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("elements")
    ax.set_ylabel("G elements / s (higher is better)")
    ax.set_title("Adam float32 step, one array")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _plotting.save(fig, path, dpi=120)


def run(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastopt bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few cases, under 30 s")
    parser.add_argument("--full", action="store_true", help="add the 6.4e7-element and float64 many-array cases")
    parser.add_argument("--no-torch", action="store_true", help="skip torch even if installed")
    parser.add_argument("--json", metavar="PATH", default="fastopt-bench.json",
                        help="where to save the results (default: %(default)s)")
    parser.add_argument("--plot", metavar="PATH", default="fastopt-bench.png",
                        help="where to save the plot when matplotlib is installed (default: %(default)s)")
    parser.add_argument("--torch", action="store_true",
                        help="only the torch comparison: fastopt.torch vs torch.optim on torch models")
    parser.add_argument("--cases", metavar="RULE:DTYPE:SIZE", nargs="+",
                        help="run only these cases, e.g. adam:float32:1e5 sgd:float64:'200 x 16..4096'")
    args = parser.parse_args(argv)
    if args.torch:
        from .bench_torch import format_rows, run_torch
        print(format_rows(run_torch(budget_s=0.3 if args.quick else 1.0)))
        print("medians of rotating blocks of steps; results checked against torch.optim's default")
        return 0
    if args.cases:
        cases = [tuple(c.split(":", 2)) for c in args.cases]
        for rule, dtype, label in cases:
            if rule not in RULES or dtype not in ("float32", "float64"):
                parser.error(f"unknown case {rule}:{dtype}:{label}")
    else:
        cases = plan(args.quick, args.full)
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch
        except ImportError:
            with_torch = False
    torch_threads = torch.get_num_threads() if with_torch else None

    config = _dispatch.config()
    print(f"fastopt {fastopt.__version__} | SIMD {config['simd_level']} | threads "
          f"{config['num_threads']} (OpenMP {'on' if config['openmp'] else 'off'}) | "
          f"numpy {np.__version__}"
          + (f" | torch {sys.modules['torch'].__version__}" if with_torch else " | torch: not used")
          + f" | {platform.machine()}, {os.cpu_count()} CPUs")
    print("measuring memory bandwidth ...", file=sys.stderr, flush=True)
    bandwidth = measure_bandwidth(1 << 23 if args.quick else 1 << 25)
    print(f"bandwidth (7-stream probe, {config['num_threads']} threads): {bandwidth:.1f} GB/s")

    results = []
    started = time.perf_counter()
    for k, (rule, dtype, label) in enumerate(cases, start=1):
        print(f"[{k}/{len(cases)}] {rule} {dtype} {label} ... ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)
        result = run_case(rule, dtype, label, budget_s=0.15 if args.quick else 0.4,
                          with_torch=with_torch)
        result["summary"] = summarize(result, bandwidth)
        results.append(result)
    if with_torch:
        torch.set_num_threads(torch_threads)  # the implementations changed it
    print(format_table(results, any(r["arrays"] > 1 for r in results)))
    print("medians of interleaved steps; every implementation checked against the NumPy "
          "reference (fastopt: bit for bit); torch best = torch.optim fused (RMSprop: "
          "for-loop) at the better of 1 and 2 threads")
    with open(args.json, "w") as f:
        json.dump({"config": config, "bandwidth_gbs": bandwidth, "results": results}, f, indent=1)
    print(f"saved {args.json}")
    png = plot(results, args.plot)
    if png:
        print(f"saved {png}")
    return 0
