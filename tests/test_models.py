"""fastopt.models: parameter gradients, accumulation, training, predictions, validation."""
import tracemalloc
import zlib

import numpy as np
import pytest

import fastopt
from fastopt.models import MLP, LinearRegression, LogisticRegression
from fastopt.training import fit
from test_losses import numeric_grad  # tests/ is on sys.path under pytest's default import mode

ACTIVATIONS = ["relu", "tanh", "sigmoid"]


def regression_data(n_outputs=1, n=64, d=4, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    W = rng.standard_normal((d, n_outputs))
    y = X @ W + 0.3 + noise * rng.standard_normal((n, n_outputs))
    return X, (y[:, 0] if n_outputs == 1 else y)


def blobs(n=300, d=5, classes=3, seed=0, spread=0.7):
    """Gaussian clusters around well-separated centres: a separable problem."""
    rng = np.random.default_rng(seed)
    centres = 3 * rng.standard_normal((classes, d))
    y = rng.integers(0, classes, n)
    return centres[y] + spread * rng.standard_normal((n, d)), y


def case(name):
    """A model and data on which its gradient is checked, by case name."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # str hash() varies per process
    X = rng.standard_normal((9, 4))
    if name.startswith("linear"):
        outputs = 3 if name.endswith("multi") else 1
        model = LinearRegression(4, outputs, loss="mae" if "mae" in name else "mse", seed=1)
        # Targets >= 0.1 away from the predictions: MAE's kink at a zero residual.
        offset = rng.uniform(0.1, 1.0, (9, outputs)) * rng.choice([-1.0, 1.0], (9, outputs))
        y = model.forward(X).reshape(9, outputs) + offset
        return model, X, (y[:, 0] if outputs == 1 else y)
    if name.startswith("logistic"):
        y = rng.random(9) if name.endswith("soft") else rng.integers(0, 2, 9)
        return LogisticRegression(4, seed=1), X, y
    _, sizes, activation, target = name.split(":")
    sizes = [int(s) for s in sizes.split("-")]
    model = MLP(sizes, activation=activation, seed=1)
    labels = rng.integers(0, sizes[-1], 9)
    return model, X, (labels if target == "labels" else np.eye(sizes[-1])[labels])


GRADIENT_CASES = (
    ["linear-mse", "linear-mse-multi", "linear-mae", "linear-mae-multi",
     "logistic", "logistic-soft", "mlp:4-3:relu:labels", "mlp:4-3:relu:one-hot"]
    + [f"mlp:{sizes}:{act}:{target}" for sizes in ["4-6-3", "4-5-4-2"] for act in ACTIVATIONS
       for target in ["labels", "one-hot"]]
)


def model_numeric_grad(model, X, y):
    return numeric_grad(lambda _: model.loss(X, y), model.flat.data)


def gradient(model, X, y, **kwargs):
    model.loss_and_grad(X, y, **kwargs)
    return model.flat.grad.copy()


# ----------------------------------------------------------------- gradients

@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_parameter_gradients_match_finite_differences(name):
    model, X, y = case(name)
    analytic = gradient(model, X, y)
    np.testing.assert_allclose(analytic, model_numeric_grad(model, X, y), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_matches_torch(activation):
    torch = pytest.importorskip("torch")
    model, X, y = case(f"mlp:4-5-4-3:{activation}:labels")
    loss = model.loss_and_grad(X, y)
    weights = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    act = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[activation]
    a = torch.tensor(X)
    for l in range(3):
        a = a @ weights[f"W{l}"] + weights[f"b{l}"]
        a = act(a) if l < 2 else a
    expected = torch.nn.functional.cross_entropy(a, torch.tensor(y))
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-13)
    for k, w in weights.items():
        np.testing.assert_allclose(model.grads[k], w.grad.numpy(), rtol=1e-11, atol=1e-15)


# -------------------------------------------------------------- accumulation

def padding_of(model):
    """flat.grad outside every named gradient view."""
    covered = np.zeros(model.flat.grad.size, bool)
    base, item = model.flat.grad.ctypes.data, model.flat.grad.itemsize
    for view in model.grads.values():
        start = (view.ctypes.data - base) // item
        covered[start:start + view.size] = True
    return model.flat.grad[~covered]


@pytest.mark.parametrize("name", ["linear-mse-multi", "logistic", "mlp:4-5-4-2:tanh:labels"])
def test_accumulate_and_scale(name):
    model, X, y = case(name)
    X, y = np.concatenate([X] * 4), np.concatenate([y] * 4)  # 36 rows: 4 micro-batches of 9
    full = gradient(model, X, y)

    for g in model.grads.values():  # without accumulate, what was there is overwritten
        g[...] = 7.0
    np.testing.assert_array_equal(gradient(model, X, y), full)

    doubled = gradient(model, X, y, scale=2.5)
    np.testing.assert_allclose(doubled, 2.5 * full, rtol=1e-12, atol=1e-15)

    # fit()'s pattern: the first micro-batch overwrites, the others add; 1/k each.
    losses = [model.loss_and_grad(X[i::4], y[i::4], accumulate=i > 0, scale=0.25)
              for i in range(4)]
    np.testing.assert_allclose(model.flat.grad, full, rtol=1e-12, atol=1e-15)
    assert np.mean(losses) == pytest.approx(model.loss(X, y), rel=1e-12)  # unscaled losses

    model.zero_grad()
    for i in range(4):
        model.loss_and_grad(X[i::4], y[i::4], accumulate=True, scale=0.25)
    np.testing.assert_allclose(model.flat.grad, full, rtol=1e-12, atol=1e-15)
    assert np.all(padding_of(model) == 0)


def test_loss_leaves_gradients_alone_and_buffers_survive_many_batch_sizes():
    model, X, y = case("mlp:4-5-4-2:relu:labels")
    model.flat.grad[...] = 0
    model.loss(X, y)
    assert np.all(model.flat.grad == 0)
    reference = {n: gradient(model, X[:n], y[:n]) for n in range(1, 10)}
    for n in [3, 9, 1, 3, 8, 7, 6, 5, 9, 3]:  # more sizes than the cache keeps
        np.testing.assert_array_equal(gradient(model, X[:n], y[:n]), reference[n])


def test_training_step_allocates_nothing_proportional_to_the_batch():
    X, y = blobs(n=1024, d=32, classes=10)
    model = MLP([32, 256, 10], seed=0)
    for accumulate in (False, True):
        model.loss_and_grad(X, y, accumulate=accumulate, scale=0.5)  # warm up the buffers
        tracemalloc.start()
        model.loss_and_grad(X, y, accumulate=accumulate, scale=0.5)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # One hidden activation is 1024 x 256 float64 = 2 MiB; NumPy's broadcasting
        # keeps a bounded iterator buffer (<= 64 KiB) per call, and that is all.
        assert peak < 256 * 1024


# ------------------------------------------------------------------ training

def adam_train(model, X, y, steps=200, lr=0.05):
    opt = fastopt.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        model.loss_and_grad(X, y)
        opt.step(model.gradients())
    return model


@pytest.mark.parametrize("loss", ["mse", "mae"])
def test_linear_regression_fits_linear_data(loss):
    X, y = regression_data(n=256, d=8, noise=0.01)
    runs = [adam_train(LinearRegression(8, loss=loss, seed=0), X, y) for _ in range(2)]
    assert runs[0].score(X, y) > 0.99
    np.testing.assert_array_equal(runs[0].flat.data, runs[1].flat.data)  # deterministic


def test_logistic_regression_separates_separable_data():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 6))
    y = (X @ rng.standard_normal(6) + 0.2 > 0).astype(np.int64)
    runs = [adam_train(LogisticRegression(6, seed=0), X, y) for _ in range(2)]
    assert runs[0].score(X, y) > 0.95
    np.testing.assert_array_equal(runs[0].flat.data, runs[1].flat.data)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_classifies_blobs(activation):
    X, y = blobs()
    runs = [adam_train(MLP([5, 16, 3], activation=activation, seed=0), X, y, lr=0.01)
            for _ in range(2)]
    assert runs[0].score(X, y) > 0.95
    np.testing.assert_array_equal(runs[0].flat.data, runs[1].flat.data)


def test_float32_mlp_trains_with_fit_and_accumulation():
    X, y = blobs(n=256, seed=3)
    model = MLP([5, 16, 3], activation="tanh", dtype=np.float32, seed=0)
    history = fit(model, fastopt.Adam(model.parameters(), lr=0.01), X.astype(np.float32), y,
                  epochs=10, batch_size=16, accumulate=2, seed=0, progress=False)
    assert model.flat.data.dtype == np.float32
    assert history.epoch_loss[-1] < history.epoch_loss[0]
    assert model.score(X, y) > 0.95  # float64 X is converted to the model's float32


# --------------------------------------------------------------- predictions

def test_regression_outputs_and_score():
    X, y = regression_data()
    model = LinearRegression(4, seed=0)
    assert model.forward(X).shape == model.predict(X).shape == (64,)
    assert model.loss(X, y[:, None]) == model.loss(X, y)  # (n, 1) targets accepted
    model.params["W0"][:, 0] = np.linalg.lstsq(np.c_[X, np.ones(64)], y, rcond=None)[0][:4]
    model.params["b0"][0] = 0.3
    assert model.score(X, y) == pytest.approx(1.0)
    assert model.score(X, np.full(64, 5.0)) == 0.0  # a constant target not predicted
    multi = LinearRegression(4, 3, seed=0)
    assert multi.forward(X).shape == (64, 3)


def test_logistic_outputs():
    X, y = regression_data()
    model = LogisticRegression(4, seed=0)
    logits, proba = model.forward(X), model.predict_proba(X)
    assert logits.shape == proba.shape == (64,)
    np.testing.assert_allclose(proba, 1 / (1 + np.exp(-logits)), rtol=1e-15)
    np.testing.assert_array_equal(model.predict(X), (proba > 0.5).astype(np.int64))
    assert model.score(X, model.predict(X)) == 1.0


def test_mlp_outputs():
    X, y = blobs(n=20)
    model = MLP([5, 8, 3], seed=0)
    proba = model.predict_proba(X)
    assert proba.shape == (20, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-15)
    np.testing.assert_array_equal(np.argmax(proba, axis=1), model.predict(X))
    assert model.score(X, y) == model.score(X, np.eye(3)[y])
    out = model.forward(X)
    out[...] = 0  # a new array each call, not a buffer the model reuses
    assert np.any(model.forward(X) != 0)


def test_parameters_layout_and_seeded_init():
    model = MLP([6, 40, 30, 4], activation="relu", dtype=np.float32, seed=5)
    assert list(model.params) == ["W0", "b0", "W1", "b1", "W2", "b2"]
    assert model.params is model.flat.params and model.grads is model.flat.grads
    assert model.parameters()[0] is model.flat.data and model.gradients()[0] is model.flat.grad
    assert model.params["W1"].shape == (40, 30) and model.params["W1"].dtype == np.float32
    assert np.all(model.params["b1"] == 0)
    np.testing.assert_array_equal(model.flat.data, MLP([6, 40, 30, 4], seed=5,
                                                       dtype=np.float32).flat.data)
    assert np.abs(model.params["W2"]).max() <= np.sqrt(6 / 34)  # Glorot on the output
    assert np.std(model.params["W1"]) == pytest.approx(np.sqrt(2 / 40), rel=0.1)  # He
    assert not np.array_equal(model.flat.data, MLP([6, 40, 30, 4], seed=6).flat.data)
    assert "activation='relu'" in repr(model)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("build, error", [
    (lambda: MLP([4]), ValueError),
    (lambda: MLP([4, 0, 3]), ValueError),
    (lambda: MLP([4, 2.5, 3]), TypeError),
    (lambda: MLP([4, 1]), ValueError),
    (lambda: MLP([4, 3], activation="gelu"), ValueError),
    (lambda: MLP([4, 3], dtype=np.float16), TypeError),
    (lambda: MLP([4, 3], dtype="int64"), TypeError),
    (lambda: MLP([4, 3], dtype="no such type"), TypeError),
    (lambda: LinearRegression(4, loss="huber"), ValueError),
    (lambda: LinearRegression(0), ValueError),
    (lambda: LogisticRegression(True), TypeError),
])
def test_bad_constructor_arguments_raise(build, error):
    with pytest.raises(error):
        build()


@pytest.mark.parametrize("name, X, y, error, match", [
    ("mlp", [[0.0] * 4] * 9, None, TypeError, "numpy.ndarray"),
    ("mlp", np.zeros((9, 4), np.int64), None, TypeError, "float32 or float64"),
    ("mlp", np.zeros(4), None, ValueError, "2-D"),
    ("mlp", np.zeros((9, 5)), None, ValueError, "4 columns"),
    ("mlp", np.zeros((0, 4)), np.zeros(0, np.int64), ValueError, "at least one row"),
    ("mlp", None, np.zeros(8, np.int64), ValueError, "8 labels for 9 rows"),
    ("mlp", None, np.full(9, 3), ValueError, r"\[0, 3\)"),
    ("mlp", None, np.zeros(9), TypeError, "integers"),
    ("mlp", None, np.zeros((9, 2)), ValueError, "shape"),
    ("logistic", None, np.full(9, 2.0), ValueError, r"\[0, 1\]"),
    ("logistic", None, np.zeros((9, 2)), ValueError, "shape"),
    ("linear", None, np.zeros(8), ValueError, "shape"),
    ("linear", None, np.array(["a"] * 9), TypeError, "real numbers"),
])
def test_bad_data_raises_before_touching_gradients(name, X, y, error, match):
    model = {"mlp": lambda: MLP([4, 5, 3], seed=0), "logistic": lambda: LogisticRegression(4),
             "linear": lambda: LinearRegression(4)}[name]()
    good_y = {"mlp": np.zeros(9, np.int64), "logistic": np.zeros(9), "linear": np.zeros(9)}[name]
    X = np.zeros((9, 4)) if X is None else X
    y = good_y if y is None else y
    model.flat.grad[...] = 1.0
    for call in (model.loss_and_grad, model.loss, model.score):
        with pytest.raises(error, match=match):
            call(X, y)
    assert np.all(model.flat.grad == 1.0)


def test_bad_accumulate_and_scale_raise():
    model, X, y = case("logistic")
    with pytest.raises(TypeError, match="accumulate"):
        model.loss_and_grad(X, y, accumulate="yes")
    with pytest.raises(ValueError, match="scale"):
        model.loss_and_grad(X, y, scale=float("nan"))
