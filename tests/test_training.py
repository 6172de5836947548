"""fastopt.training: fit(), EarlyStopping, lr_range_test.

A small least-squares model is defined here so these tests do not depend on
fastopt.models (tests/test_models.py covers those with fit as well).
"""

import copy

import numpy as np
import pytest

import fastopt
from fastopt import FlatParams
from fastopt.training import EarlyStopping, History, fit, lr_range_test


class LeastSquares:
    """loss = mean((X @ w + b - y) ** 2) / 2, the model contract of fastopt.models."""

    def __init__(self, d):
        self.flat = FlatParams({"w": (d,), "b": ()})
        self.calls = 0

    def parameters(self):
        return [self.flat.data]

    def gradients(self):
        return [self.flat.grad]

    def loss(self, X, y):
        r = X @ self.flat.params["w"] + self.flat.params["b"] - y
        return float(np.mean(r * r) / 2)

    def loss_and_grad(self, X, y, accumulate=False, scale=1.0):
        self.calls += 1
        r = X @ self.flat.params["w"] + self.flat.params["b"] - y
        gw, gb = X.T @ r / len(y), np.mean(r)
        if not accumulate:
            self.flat.grad[...] = 0
        self.flat.grads["w"][...] += scale * gw
        self.flat.grads["b"][...] += scale * gb
        return float(np.mean(r * r) / 2)

    def score(self, X, y):
        return -self.loss(X, y)


def problem(n=256, d=5, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    return X, X @ w + 0.5 + noise * rng.standard_normal(n)


@pytest.mark.parametrize("batch_size", [None, 1, 32])
def test_fit_converges_for_gd_sgd_and_minibatch(batch_size):
    X, y = problem()
    model = LeastSquares(5)
    opt = fastopt.SGD(model.parameters(), lr=0.1 if batch_size != 1 else 0.02, momentum=0.5)
    history = fit(model, opt, X, y, epochs=30, batch_size=batch_size, seed=0, progress=False)
    assert history.epoch_loss[-1] < 1e-4 < history.epoch_loss[0]
    steps_per_epoch = {None: 1, 1: 256, 32: 8}[batch_size]
    assert history.steps == 30 * steps_per_epoch == len(history.step_loss) == len(history.lr)
    assert 0 < history.optimizer_time < history.wall_time


def test_fit_is_reproducible_with_a_seed():
    X, y = problem()
    runs = []
    for _ in range(2):
        model = LeastSquares(5)
        fit(model, fastopt.Adam(model.parameters(), lr=0.01), X, y, epochs=3, batch_size=16,
            seed=7, progress=False)
        runs.append(model.flat.data.copy())
    np.testing.assert_array_equal(*runs)


def test_accumulate_averages_consecutive_batches():
    X, y = problem(64)
    a, b = LeastSquares(5), LeastSquares(5)
    # 4 batches of 16 accumulated == one full batch of 64 (equal sizes, mean loss)
    fit(a, fastopt.SGD(a.parameters(), lr=0.1), X, y, epochs=2, batch_size=16, accumulate=4,
        shuffle=False, progress=False)
    fit(b, fastopt.SGD(b.parameters(), lr=0.1), X, y, epochs=2, batch_size=None, progress=False)
    np.testing.assert_allclose(a.flat.data, b.flat.data, rtol=1e-12, atol=1e-14)
    assert a.calls == 8 and b.calls == 2


def test_clip_records_norms_and_limits_steps():
    X, y = problem()
    model = LeastSquares(5)
    history = fit(model, fastopt.SGD(model.parameters(), lr=1.0), X, y, epochs=1,
                  batch_size=None, clip=1e-3, progress=False)
    assert history.grad_norm[0] > 1e-3
    assert np.linalg.norm(model.flat.data) <= 1e-3 * (1 + 1e-6)  # one clipped step of lr 1


def test_schedule_steps_per_epoch_or_per_step():
    from fastopt.lr_scheduler import StepLR
    X, y = problem(64)
    model = LeastSquares(5)
    opt = fastopt.SGD(model.parameters(), lr=0.1)
    history = fit(model, opt, X, y, epochs=4, batch_size=32, schedule=StepLR(opt, 1, gamma=0.5),
                  progress=False)
    assert history.lr == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125]
    opt = fastopt.SGD(model.parameters(), lr=0.1)
    history = fit(model, opt, X, y, epochs=1, batch_size=16, schedule=StepLR(opt, 1, gamma=0.5),
                  schedule_interval="step", progress=False)
    assert history.lr == [0.1, 0.05, 0.025, 0.0125]


def test_early_stopping_and_validation():
    X, y = problem(noise=0.3)
    model = LeastSquares(5)
    stop = EarlyStopping(monitor="val_loss", patience=2, min_delta=1e-3, restore_best=True)
    history = fit(model, fastopt.SGD(model.parameters(), lr=0.05), X, y, epochs=500,
                  batch_size=32, callbacks=[stop], validation_data=(X[:64], y[:64]),
                  progress=False)
    assert history.stopped_early and len(history.epoch_loss) < 500
    assert len(history.val_loss) == len(history.epoch_loss) == len(history.val_score)
    assert model.loss(X[:64], y[:64]) == pytest.approx(stop.best)


def test_skipped_steps_are_counted():
    X, y = problem(32)
    X[3, 0] = np.nan  # one poisoned sample: the full-batch gradient is NaN
    model = LeastSquares(5)
    opt = fastopt.Adam(model.parameters(), skip_nonfinite=True)
    history = fit(model, opt, X, y, epochs=3, progress=False)
    assert history.skipped_steps == 3 and np.all(model.flat.data == 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(epochs=-1), "epochs"), (dict(accumulate=0), "accumulate"),
    (dict(schedule_interval="batch"), "schedule_interval"), (dict(clip=0.0), "clip"),
])
def test_bad_arguments(kwargs, message):
    X, y = problem(8)
    model = LeastSquares(5)
    with pytest.raises(ValueError, match=message):
        fit(model, fastopt.SGD(model.parameters()), X, y, **kwargs)


def test_lr_range_test_restores_and_suggests_a_working_lr():
    X, y = problem(512)
    model = LeastSquares(5)
    model.flat.data[...] = 0.25
    opt = fastopt.SGD(model.parameters(), lr=3e-4, momentum=0.9)
    before = model.flat.data.copy()
    result = lr_range_test(model, opt, X, y, start_lr=1e-5, end_lr=10.0, steps=120)
    np.testing.assert_array_equal(model.flat.data, before)
    assert opt.param_groups[0]["lr"] == 3e-4 and len(opt.state) == 0
    assert result.diverged and len(result.lrs) < 120
    assert 1e-3 < result.suggestion < result.lrs[-1]
    # The suggestion is a working lr: 40 full-batch steps cut the loss 20-fold.
    start = model.loss(X, y)
    opt.param_groups[0]["lr"] = result.suggestion
    for _ in range(40):
        model.loss_and_grad(X, y)
        opt.step(model.gradients())
    assert model.loss(X, y) < start / 20


def test_lr_range_test_arguments():
    X, y = problem(16)
    model = LeastSquares(5)
    opt = fastopt.SGD(model.parameters())
    with pytest.raises(ValueError, match="start_lr"):
        lr_range_test(model, opt, X, y, start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match="steps"):
        lr_range_test(model, opt, X, y, steps=2)


def test_history_repr():
    assert "0 epochs" in repr(History())


def test_progress_is_silent_off_a_terminal(capsys):
    X, y = problem(16)
    model = LeastSquares(5)
    fit(model, fastopt.SGD(model.parameters()), X, y, epochs=2, progress=True)
    assert capsys.readouterr().err == ""  # pytest's stderr is not a TTY


def test_progress_plain_line_on_a_terminal_without_tqdm(monkeypatch, capsys):
    import sys
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setitem(sys.modules, "tqdm", None)      # as if tqdm were not installed
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    X, y = problem(16)
    model = LeastSquares(5)
    fit(model, fastopt.SGD(model.parameters()), X, y, epochs=3, progress=True)
    err = capsys.readouterr().err
    assert "step 3/3" in err and "loss" in err


def test_lr_range_test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    X, y = problem(128)
    model = LeastSquares(5)
    result = lr_range_test(model, fastopt.SGD(model.parameters()), X, y, steps=30)
    path = result.plot(tmp_path / "range.png")
    assert path and (tmp_path / "range.png").stat().st_size > 1000


@pytest.mark.parametrize("epochs, error", [(True, TypeError), (1.0, TypeError), (-1, ValueError)])
def test_fit_refuses_epochs_that_are_not_ints(epochs, error):
    model = fastopt.models.LinearRegression(3, seed=0)
    opt = fastopt.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match="epochs must be"):
        fit(model, opt, np.zeros((4, 3)), np.zeros(4), epochs=epochs, progress=False)


def test_lr_range_test_result_is_a_dict_with_attributes():
    from fastopt.training import LRRangeTest
    result = LRRangeTest(lrs=[1e-3], suggestion=1e-3)
    assert result.suggestion == 1e-3 and not hasattr(result, "missing")
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        result.missing
    assert copy.deepcopy(result) == result
