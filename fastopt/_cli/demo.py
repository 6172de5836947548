"""fastopt demo: the trade-offs between optimizers, with fastopt's own numbers.

Part 1 trains one MLP on a digits-like classification task with batch
gradient descent, stochastic gradient descent, mini-batch SGD, momentum,
RMSProp and Adam, and times the optimizer against fastopt's NumPy reference
(which must follow the very same trajectory). Part 2 shows momentum carrying
a point over a local minimum where plain gradient descent stays stuck. Part 3
shows a learning rate too small, one too large, and the one the learning-rate
range test suggests, each trained for as many epochs as part 1's runs, next
to part 1's hand-picked learning rate for the same optimizer.
"""
import argparse
import math
import os
import sys
import time

import numpy as np

import fastopt

from .. import _plotting
from ..train.models import MLP
from ..train.training import fit, lr_range_test


# ------------------------------------------------------------------- data

def load_data(seed=0):
    """scikit-learn's bundled digits when installed, else a digits-like set made here.

    Returns X_train, X_test, y_train, y_test (float32 features scaled to
    [0, 1]) and a description.
    """
    try:
        from sklearn.datasets import load_digits
        digits = load_digits()
        X, y, name = digits.data.astype(np.float32) / 16.0, digits.target, "scikit-learn digits"
    except ImportError:
        X, y = make_digits_like(seed)
        name = "synthetic digits-like blobs (install scikit-learn for the real digits)"
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    X, y = X[order], y[order]
    cut = int(0.8 * len(X))
    return X[:cut], X[cut:], y[:cut], y[cut:], name


def make_digits_like(seed=0, n=1797, classes=10, features=64):
    """Ten overlapping clusters in 64 dimensions, values in [0, 1], like 8x8 digits.

    The noise is large enough that the classes overlap: a model can overfit,
    and the optimizers end at visibly different places.
    """
    rng = np.random.default_rng(seed)
    centres = rng.random((classes, features)) ** 2
    y = rng.integers(0, classes, n)
    X = centres[y] + 0.8 * rng.standard_normal((n, features))
    return np.clip(X, 0.0, 1.0).astype(np.float32), y


# ---------------------------------------------------------------- part 1

OPTIMIZERS = [  # label, batch_size, optimizer class, options
    ("GD (full batch)", None, fastopt.SGD, {"lr": 0.5}),
    ("SGD (batch 1)", 1, fastopt.SGD, {"lr": 0.01}),
    ("mini-batch SGD (32)", 32, fastopt.SGD, {"lr": 0.1}),
    ("momentum 0.9 (32)", 32, fastopt.SGD, {"lr": 0.05, "momentum": 0.9}),
    ("RMSProp (32)", 32, fastopt.RMSprop, {"lr": 1e-3}),
    ("Adam (32)", 32, fastopt.Adam, {"lr": 3e-3}),
]


def train(data, batch_size, cls, options, epochs, backend, seed=0):
    X_train, X_test, y_train, y_test, _ = data
    model = MLP([X_train.shape[1], 32, 10], activation="tanh", dtype=np.float32, seed=seed)
    optimizer = cls(model.parameters(), backend=backend, **options)
    history = fit(model, optimizer, X_train, y_train, epochs=epochs, batch_size=batch_size,
                  seed=seed, progress=False)
    return model, history


def compare_optimizers(data, epochs):
    X_train, X_test, y_train, y_test, _ = data
    rows, curves = [], {}
    for label, batch_size, cls, options in OPTIMIZERS:
        model, history = train(data, batch_size, cls, options, epochs, "cython")
        twin, reference = train(data, batch_size, cls, options, epochs, "numpy")
        if not np.array_equal(model.flat.data, twin.flat.data):
            raise AssertionError(f"{label}: fastopt and its NumPy reference diverged")
        rows.append({
            "optimizer": label, "final loss": history.epoch_loss[-1],
            "train acc": model.score(X_train, y_train), "test acc": model.score(X_test, y_test),
            "steps": history.steps, "wall s": history.wall_time,
            "% in optimizer": 100 * history.optimizer_time / history.wall_time,
            "optimizer us/step": 1e6 * history.optimizer_time / history.steps,
            "NumPy-ref us/step": 1e6 * reference.optimizer_time / reference.steps,
        })
        rows[-1]["optimizer speedup"] = rows[-1]["NumPy-ref us/step"] / rows[-1]["optimizer us/step"]
        curves[label] = history.epoch_loss
    return rows, curves


# ---------------------------------------------------------------- part 2

def bumpy(x):
    """f(x) = (x^2 - 1)^2 + 0.3 x: a local minimum near +0.96, the global one near -1.04."""
    return (x * x - 1) ** 2 + 0.3 * x


def bumpy_grad(x):
    return 4 * x * (x * x - 1) + 0.3


def roll_ball(momentum, lr=0.01, start=2.0, steps=300):
    """Minimise ``bumpy`` from ``start`` with fastopt.SGD; return the path."""
    x = np.array([start])
    g = np.empty(1)
    opt = fastopt.SGD([x], lr=lr, momentum=momentum)
    path = [float(x[0])]
    for _ in range(steps):
        g[0] = bumpy_grad(x[0])
        opt.step([g])
        path.append(float(x[0]))
    return path


# ---------------------------------------------------------------- part 3

HAND_PICKED_LR = dict((label, options) for label, _, _, options in OPTIMIZERS)[
    "momentum 0.9 (32)"]["lr"]  # part 1's SGD with momentum 0.9, batch 32: part 3's optimizer


def learning_rates(data, epochs):
    """lr_range_test's suggestion against smaller, larger and hand-picked learning rates.

    Every run trains the same MLP with SGD (momentum 0.9, batch 32) for
    ``epochs`` epochs, the budget part 1 gives each optimizer, so that the
    rows compare learning rates and nothing else.

    Returns
    -------
    found : dict
        lr_range_test's result.
    rows : list of dict
        One per learning rate: its label, value, first and final epoch loss
        and test accuracy.
    """
    X_train, X_test, y_train, y_test, _ = data
    model = MLP([X_train.shape[1], 32, 10], activation="tanh", dtype=np.float32, seed=0)
    probe = fastopt.SGD(model.parameters(), lr=0.1, momentum=0.9)
    found = lr_range_test(model, probe, X_train, y_train, start_lr=1e-5, end_lr=100.0,
                          steps=150, batch_size=32)
    good = found["suggestion"]
    rows = []
    for label, lr in (("too small (suggestion / 1000)", good / 1000),
                      ("suggested by lr_range_test", good),
                      ("hand-picked (part 1's momentum run)", HAND_PICKED_LR),
                      ("too large (the range test's last lr)", found["lrs"][-1])):
        model = MLP([X_train.shape[1], 32, 10], activation="tanh", dtype=np.float32, seed=0)
        opt = fastopt.SGD(model.parameters(), lr=lr, momentum=0.9)
        with np.errstate(all="ignore"):
            history = fit(model, opt, X_train, y_train, epochs=epochs, batch_size=32, seed=0,
                          progress=False)
            accuracy = model.score(X_test, y_test)
        rows.append({"learning rate": label, "lr": lr, "first epoch loss": history.epoch_loss[0],
                     "final loss": history.epoch_loss[-1], "test acc": accuracy})
    return found, rows


# ---------------------------------------------------------------- report

def table(rows):
    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}")
        return str(v)
    header = list(rows[0])
    body = [[cell(r[k]) for k in header] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths)),
             "-+-".join("-" * w for w in widths)]
    return "\n".join(lines + [" | ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body])


def plot(curves, path_ball, path_gd, found, path):
    plt = _plotting.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for label, losses in curves.items():
        axes[0].plot(range(1, len(losses) + 1), losses, label=label)
    axes[0].set_yscale("log")
    axes[0].set(xlabel="epoch", ylabel="training loss", title="One MLP, six optimizers")
    axes[0].legend(fontsize=8)
    xs = np.linspace(-1.6, 2.05, 300)
    axes[1].plot(xs, bumpy(xs), color="gray")
    axes[1].plot(path_gd, bumpy(np.array(path_gd)), ".-", label="gradient descent", ms=3)
    axes[1].plot(path_ball, bumpy(np.array(path_ball)), ".-", label="momentum 0.9", ms=3, alpha=0.7)
    axes[1].set(xlabel="x", ylabel="f(x)", title="Momentum rolls over a local minimum")
    axes[1].legend(fontsize=8)
    axes[2].plot(found["lrs"], found["losses"])
    axes[2].axvline(found["suggestion"], color="tab:red", ls="--",
                    label=f"suggested lr {found['suggestion']:.3g}")
    axes[2].set_xscale("log")
    axes[2].set(xlabel="learning rate", ylabel="smoothed loss", title="Learning-rate range test")
    axes[2].legend(fontsize=8)
    return _plotting.save(fig, path)


def run(argv=None):
    parser = argparse.ArgumentParser(prog="fastopt demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15,
                        help="epochs per training run in parts 1 and 3 (default 15)")
    parser.add_argument("--plot", metavar="PATH", default="fastopt-demo.png",
                        help="where to save the figure when matplotlib is installed (default: "
                             "./%(default)s in the current folder; its absolute path is printed)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data = load_data()
    print(f"fastopt {fastopt.__version__} demo | data: {data[4]}, {len(data[0])} train / "
          f"{len(data[1])} test samples | MLP 64-32-10 (tanh), float32\n")

    print(f"1. One model, six ways to train it ({args.epochs} epochs each; every run repeated "
          "with the NumPy reference optimizer, which must give the same weights bit for bit)",
          file=sys.stdout)
    rows, curves = compare_optimizers(data, args.epochs)
    print(table(rows))

    gd, ball = roll_ball(momentum=0.0), roll_ball(momentum=0.9)
    print("\n2. f(x) = (x^2 - 1)^2 + 0.3x from x = 2, lr 0.01, 300 steps:")
    print(f"   gradient descent  ends at x = {gd[-1]:+.3f}, f = {bumpy(gd[-1]):.3f} (stuck in the local minimum)")
    print(f"   momentum 0.9      ends at x = {ball[-1]:+.3f}, f = {bumpy(ball[-1]):.3f} (rolled over the bump)")

    found, lr_rows = learning_rates(data, args.epochs)
    edge = (f"it diverged at {found['lrs'][-1]:.3g}" if found["diverged"]
            else f"no divergence up to {found['lrs'][-1]:.3g}")
    print(f"\n3. Learning rates (SGD, momentum 0.9, batch 32, {args.epochs} epochs each, as in "
          f"part 1); lr_range_test suggests {found['suggestion']:.3g} ({edge}):")
    print(table(lr_rows))
    path = os.path.abspath(args.plot)
    if _plotting.pyplot() is None:
        print("\n" + _plotting.missing_line(path))
    elif plot(curves, ball, gd, found, path):
        print(f"\nsaved {path}")
    print(f"demo took {time.perf_counter() - started:.1f} s")
    return 0
