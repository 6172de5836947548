"""fastopt's Lion and Lamb against optax's, jit-compiled on the CPU, side by side.

    python bench/optax_compare.py [--sizes 1e3 1e5 1e6 1e7] [--seconds 1.0]

Needs JAX and optax (``pip install jax jaxlib optax``). For each rule and
size, both implementations start from the same float32 parameter and run
the same gradients; before timing, their parameters after CHECK_STEPS steps
are compared (relative to the total change: they must agree as the parity
tests require), so the timed code is known to compute the rule. Then
rotating blocks of steps, one implementation after the other, give each a
median time per step; optax's step is one jitted call (update and
apply_updates fused by XLA) with its result blocked on.
"""
import argparse
import statistics
import time

import numpy as np

import fastopt

CHECK_STEPS = 5
# float32, of the total change: the parity tests' 2e-5 (tests/test_torch_parity.py);
# Lamb 1e-4 here, because optax sums its norms in float32 (the rounding error
# of a float32 sum grows with the size; fastopt sums in double)
RTOL = {"Lion": 2e-5, "Lamb": 1e-4}
# fastopt's defaults, spelled out: optax.lion's own weight_decay default is 1e-3
RULES = {"Lion": ("lion", {"learning_rate": 1e-4, "weight_decay": 0.0}),
         "Lamb": ("lamb", {"learning_rate": 1e-3, "weight_decay": 0.0})}


def optax_step(name, n, p0):
    import jax
    import jax.numpy as jnp
    import optax

    fn, kwargs = RULES[name]
    tx = getattr(optax, fn)(**kwargs)

    @jax.jit
    def step(x, state, g):
        updates, state = tx.update(g, state, x)
        return optax.apply_updates(x, updates), state

    box = {"x": jnp.asarray(p0)}
    box["state"] = tx.init(box["x"])

    def run(g):
        box["x"], box["state"] = step(box["x"], box["state"], g)
        box["x"].block_until_ready()
    run.params = lambda: np.asarray(box["x"])
    run.wrap = jnp.asarray
    return run


def fastopt_step(name, p0):
    p = p0.copy()
    opt = getattr(fastopt, name)([p])

    def run(g):
        opt.step([g])
    run.params = lambda: p
    run.wrap = lambda g: g
    return run


def compare(name, n, seconds):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n, dtype=np.float32)
    grads = [rng.standard_normal(n, dtype=np.float32) + np.float32(0.5) for _ in range(2)]
    impls = {"fastopt": fastopt_step(name, p0), "optax": optax_step(name, n, p0)}
    inputs = {k: [impl.wrap(g) for g in grads] for k, impl in impls.items()}
    for t in range(CHECK_STEPS):
        for k, impl in impls.items():
            impl(inputs[k][t % 2])
    a, b = impls["fastopt"].params(), impls["optax"].params()
    scale = float(np.abs(b.astype(np.float64) - p0).max())
    deviation = float(np.abs(a.astype(np.float64) - b).max()) / scale
    assert deviation <= RTOL[name], f"{name} {n}: fastopt and optax differ by {deviation:.3g}"
    warm = {}
    for k, impl in impls.items():
        t0 = time.perf_counter()
        impl(inputs[k][0])
        warm[k] = time.perf_counter() - t0
    k_steps = max(1, min(200, int(2e-3 / max(min(warm.values()), 1e-9))))
    times = {k: [] for k in impls}
    deadline = time.perf_counter() + seconds
    rounds = 0
    while rounds < 5 or (time.perf_counter() < deadline and rounds < 500):
        for k, impl in impls.items():
            g = inputs[k][rounds % 2]
            t0 = time.perf_counter()
            for _ in range(k_steps):
                impl(g)
            times[k].append((time.perf_counter() - t0) / k_steps)
        rounds += 1
    return {k: statistics.median(v) for k, v in times.items()}, deviation


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1e3", "1e5", "1e6", "1e7"])
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    import jax
    import optax
    print(f"fastopt {fastopt.__version__}, optax {optax.__version__}, jax {jax.__version__} "
          f"({jax.devices()[0].platform}), float32, one array, {args.seconds:g} s per case")
    print(f"{'rule':6s} {'size':>6s} {'fastopt':>12s} {'optax jit':>12s} {'x optax':>8s} "
          f"{'deviation':>10s}")
    for name in RULES:
        for size in args.sizes:
            medians, dev = compare(name, int(float(size)), args.seconds)
            f, o = medians["fastopt"], medians["optax"]
            print(f"{name:6s} {size:>6s} {f * 1e6:10.1f}us {o * 1e6:10.1f}us {o / f:7.1f}x "
                  f"{dev:10.2g}")


if __name__ == "__main__":
    main()
