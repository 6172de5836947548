"""What half precision costs in quality: final losses side by side.

Two problems, each trained the same way under several precision policies:

- least squares: a 512 x 128 float32 system fitted with Adam (500 full-batch
  steps), loss = mean squared residual;
- the demo's MLP (``fastopt demo``, part 1's Adam on the digits task: 64-32-10
  tanh, batch 32), loss = the training loss of the last epoch.

Policies: float32 state (the baseline), bfloat16 state on float32 parameters
(``state_dtype="bfloat16"``), and for least squares also bfloat16 parameters
with round-to-nearest, with stochastic rounding, and with float32 master
weights. Run: ``python bench/half_quality.py`` (a few seconds on 2 cores; needs
ml_dtypes).
"""
import argparse

import ml_dtypes
import numpy as np

import fastopt
from fastopt._cli import demo

BF16 = ml_dtypes.bfloat16


def least_squares(policy, param_dtype=np.float32, steps=500, seed=0):
    """Final mean squared residual of Adam(lr=1e-2) on a fixed random system."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((512, 128)).astype(np.float32) / np.sqrt(128)
    x_true = rng.standard_normal(128).astype(np.float32)
    b = A @ x_true + 0.01 * rng.standard_normal(512).astype(np.float32)
    x = np.zeros(128, param_dtype)
    opt = fastopt.Adam([x], lr=1e-2, **policy)
    for _ in range(steps):
        r = A @ x.astype(np.float32) - b
        opt.step([(2 / len(b) * (A.T @ r)).astype(param_dtype)])
    r = A @ x.astype(np.float32) - b
    return float(np.mean(r * r))


def demo_mlp(policy, epochs):
    """The demo's Adam (batch 32) on its digits task: the last epoch's training loss."""
    _, history = demo.train(demo.load_data(), 32, fastopt.Adam, {"lr": 3e-3, **policy},
                            epochs, "cython")
    return float(history.epoch_loss[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="MLP epochs (default 30)")
    args = parser.parse_args(argv)
    rows = [
        ("float32 params, float32 state", {}, np.float32, True),
        ("float32 params, bfloat16 state", {"state_dtype": "bfloat16"}, np.float32, True),
        ("bfloat16 params and state", {}, BF16, False),
        ("bfloat16 params, stochastic rounding", {"stochastic_rounding": True}, BF16, False),
        ("bfloat16 params, float32 master", {"master_weights": True}, BF16, False),
    ]
    print(f"{'policy':40s} {'least squares':>14s} {'demo MLP':>10s}")
    for label, policy, dtype, mlp in rows:
        ls = least_squares(policy, dtype)
        net = f"{demo_mlp(policy, args.epochs):10.4f}" if mlp else f"{'-':>10s}"
        print(f"{label:40s} {ls:14.3e} {net}")
    print(f"(least squares: 512 x 128, Adam lr 1e-2, 500 steps, noise floor about "
          f"{0.01 ** 2:.0e}; MLP: {args.epochs} epochs of the demo's Adam)")


if __name__ == "__main__":
    main()
