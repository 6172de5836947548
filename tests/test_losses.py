"""fastopt.losses: gradients against finite differences and torch, stability, validation."""
import tracemalloc

import numpy as np
import pytest

from fastopt import losses as L

SHAPES = [(1,), (7,), (5, 3), (4, 2, 3)]


def numeric_grad(f, x, eps=1e-6):
    """Central finite differences of the scalar ``f`` at ``x`` (float64)."""
    grad = np.empty_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        up = f(x)
        flat[i] = saved - eps
        down = f(x)
        flat[i] = saved
        gflat[i] = (up - down) / (2 * eps)
    return grad


def assert_grad_matches_fd(loss, x, target, rtol=1e-6, atol=1e-9):
    value, grad = loss(x, target)
    expected = numeric_grad(lambda a: loss(a, target)[0], x.copy())
    np.testing.assert_allclose(grad, expected, rtol=rtol, atol=atol)
    assert isinstance(value, float)
    return value


def element_targets(rng, shape):
    """Predictions, and targets at least 0.1 away from each (MAE has a kink at 0)."""
    pred = rng.standard_normal(shape)
    offset = rng.uniform(0.1, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    return pred, pred + offset


# ----------------------------------------------------------------- gradients

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["mse", "mae"])
def test_regression_loss_gradients_match_finite_differences(name, shape):
    pred, target = element_targets(np.random.default_rng(len(shape)), shape)
    assert_grad_matches_fd(L.LOSSES[name], pred, target)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("soft", [False, True])
def test_bce_gradient_matches_finite_differences(shape, soft):
    rng = np.random.default_rng(3)
    logits = 3 * rng.standard_normal(shape)
    target = rng.random(shape) if soft else rng.integers(0, 2, shape).astype(np.float64)
    assert_grad_matches_fd(L.bce_with_logits, logits, target)


@pytest.mark.parametrize("n, k", [(1, 2), (6, 3), (4, 7), (3, 1)])
@pytest.mark.parametrize("kind", ["labels", "one-hot", "probabilities", "unnormalised"])
def test_softmax_cross_entropy_gradient_matches_finite_differences(n, k, kind):
    rng = np.random.default_rng(n * k)
    logits = 2 * rng.standard_normal((n, k))
    labels = rng.integers(0, k, n)
    target = {
        "labels": labels,
        "one-hot": np.eye(k)[labels],
        "probabilities": rng.dirichlet(np.ones(k), n),
        "unnormalised": rng.random((n, k)),  # torch allows rows that do not sum to 1
    }[kind]
    assert_grad_matches_fd(L.softmax_cross_entropy, logits, target)


def test_int_labels_and_one_hot_agree():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 5))
    labels = rng.integers(0, 5, 8).astype(np.int32)
    loss_a, grad_a = L.softmax_cross_entropy(logits, labels)
    loss_b, grad_b = L.softmax_cross_entropy(logits, np.eye(5, dtype=bool)[labels])
    assert loss_a == pytest.approx(loss_b, rel=1e-14)
    np.testing.assert_allclose(grad_a, grad_b, rtol=1e-14, atol=1e-17)


def test_mae_gradient_is_zero_where_the_residual_is_zero():
    pred = np.array([1.0, 2.0, 3.0, 4.0])
    loss, grad = L.mae(pred, np.array([1.0, 0.0, 3.0, 5.0]))
    assert loss == pytest.approx(0.75)
    np.testing.assert_array_equal(grad, [0.0, 0.25, 0.0, -0.25])


# --------------------------------------------------------------------- torch

def torch_reference(name, x, target):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    tx = torch.tensor(x, requires_grad=True)
    tt = torch.tensor(target)
    fn = {"mse": F.mse_loss, "mae": F.l1_loss, "bce_with_logits": F.binary_cross_entropy_with_logits,
          "softmax_cross_entropy": F.cross_entropy}[name]
    loss = fn(tx, tt)
    loss.backward()
    return loss.item(), tx.grad.numpy()


def torch_cases():
    rng = np.random.default_rng(42)
    x = 4 * rng.standard_normal((16, 5))
    labels = rng.integers(0, 5, 16)
    return [
        ("mse", x, rng.standard_normal((16, 5))),
        ("mae", x, rng.standard_normal((16, 5))),
        ("mae", x[:, 0], rng.standard_normal(16)),
        ("bce_with_logits", x, rng.integers(0, 2, (16, 5)).astype(np.float64)),
        ("bce_with_logits", 30 * x, rng.random((16, 5))),
        ("softmax_cross_entropy", x, labels),
        ("softmax_cross_entropy", 100 * x, labels),
        ("softmax_cross_entropy", x, np.eye(5)[labels]),
        ("softmax_cross_entropy", x, rng.dirichlet(np.ones(5), 16)),
        ("softmax_cross_entropy", x, rng.random((16, 5))),
    ]


@pytest.mark.parametrize("name, x, target", torch_cases())
def test_losses_match_torch_in_float64(name, x, target):
    expected_loss, expected_grad = torch_reference(name, x, target)
    loss, grad = L.LOSSES[name](x, target)
    assert loss == pytest.approx(expected_loss, rel=1e-13, abs=1e-300)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-17)


# ----------------------------------------------------------------- stability

def test_bce_is_finite_and_accurate_at_extreme_float32_logits():
    x = np.array([1e4, -1e4, 1e4, -1e4, 30.0, -30.0], np.float32)
    y = np.array([1, 0, 0, 1, 1, 0], np.float32)
    loss, grad = L.bce_with_logits(x, y)
    assert np.isfinite(loss) and np.all(np.isfinite(grad)) and grad.dtype == np.float32
    assert loss == pytest.approx(2e4 / 6, rel=1e-6)  # two wrong by 1e4, the rest ~0
    np.testing.assert_allclose(grad, np.array([0, 0, 1, -1, 0, 0]) / 6, atol=1e-7)
    # Confidently right: the loss is tiny but still accurate in float32 (no cancellation).
    loss, _ = L.bce_with_logits(np.full(1000, 20.0, np.float32), np.ones(1000, np.float32))
    assert loss == pytest.approx(np.log1p(np.exp(-20.0)), rel=1e-5)


def test_softmax_cross_entropy_is_finite_at_extreme_float32_logits():
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [3e4, 3e4, -3e4]], np.float32)
    loss, grad = L.softmax_cross_entropy(logits, np.array([0, 0, 1]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad)) and grad.dtype == np.float32
    assert loss == pytest.approx((0 + 2e4 + np.log(2)) / 3, rel=1e-6)
    np.testing.assert_allclose(grad, np.array([[0, 0, 0], [-1, 1, 0], [0.5, -0.5, 0]]) / 3,
                               atol=1e-7)
    one_hot = np.eye(3, dtype=np.float32)[[0, 0, 1]]
    loss_b, grad_b = L.softmax_cross_entropy(logits, one_hot)
    assert loss_b == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(grad_b, grad, atol=1e-7)


@pytest.mark.parametrize("name", ["mse", "mae"])
def test_regression_losses_keep_float32(name):
    pred = np.array([1e4, -1e4], np.float32)
    loss, grad = L.LOSSES[name](pred, np.zeros(2, np.float32))
    assert np.isfinite(loss) and grad.dtype == np.float32


# ------------------------------------------------------------------ grad_out

@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_grad_out_is_written_without_allocating(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 10))
    target = rng.integers(0, 10, 2048) if name == "softmax_cross_entropy" else rng.random(x.shape)
    out = np.full_like(x, np.nan)
    loss, grad = L.LOSSES[name](x, target, grad_out=out)
    assert grad is out
    np.testing.assert_array_equal(out, L.LOSSES[name](x, target)[1])
    tracemalloc.start()
    L.LOSSES[name](x, target, grad_out=out)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # NumPy's broadcasting keeps a bounded iterator buffer (<= 64 KiB); nothing
    # proportional to the 160 KiB input is allocated once the scratch is warm.
    assert peak < x.nbytes / 2


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("name", sorted(L.LOSSES))
@pytest.mark.parametrize("bad, error", [
    (np.ones((3, 2), np.int64), TypeError),
    (np.ones((3, 2), np.float16), TypeError),
    ([[1.0, 2.0]], TypeError),
    (np.ones((0, 2)), ValueError),
    (np.ones(()), ValueError),
])
def test_bad_inputs_raise(name, bad, error):
    target = np.zeros(3, np.int64) if name == "softmax_cross_entropy" else np.zeros((3, 2))
    with pytest.raises(error):
        L.LOSSES[name](bad, target)


@pytest.mark.parametrize("name", ["mse", "mae", "bce_with_logits"])
def test_element_losses_refuse_mismatched_targets(name):
    x = np.zeros((4, 1))
    with pytest.raises(ValueError, match="shape"):
        L.LOSSES[name](x, np.zeros(4))  # would broadcast to (4, 4)
    with pytest.raises(TypeError, match="real numbers"):
        L.LOSSES[name](x, np.array([["a"]] * 4))


@pytest.mark.parametrize("target, error, match", [
    (np.array([0, 1, 3]), ValueError, r"\[0, 3\)"),
    (np.array([0, -1, 2]), ValueError, r"\[0, 3\)"),
    (np.array([0.0, 1.0, 2.0]), TypeError, "integers"),
    (np.array([0, 1]), ValueError, "2 labels for 3 rows"),
    (np.zeros((3, 2)), ValueError, "shape"),
    (np.zeros((3, 3), dtype=object), TypeError, "real numbers"),
])
def test_softmax_cross_entropy_refuses_bad_targets(target, error, match):
    with pytest.raises(error, match=match):
        L.softmax_cross_entropy(np.zeros((3, 3)), target)
    with pytest.raises(ValueError, match="2-D"):
        L.softmax_cross_entropy(np.zeros(3), np.array([0, 1, 2]))


@pytest.mark.parametrize("make, error", [
    (lambda x: np.empty(x.shape, np.float32), TypeError),
    (lambda x: np.empty((x.shape[0], 1)), ValueError),
    (lambda x: np.empty((x.shape[1], x.shape[0])).T, ValueError),
    (lambda x: x, ValueError),
    ([1.0], TypeError),
])
@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_bad_grad_out_raises_before_writing(name, make, error):
    x = np.arange(6.0).reshape(3, 2)
    target = np.array([0, 1, 1]) if name == "softmax_cross_entropy" else np.ones((3, 2))
    before = x.copy()
    with pytest.raises(error, match="grad_out"):
        L.LOSSES[name](x, target, grad_out=make(x) if callable(make) else make)
    np.testing.assert_array_equal(x, before)
