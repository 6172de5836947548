"""fastopt.demo: python -m fastopt demo."""
import numpy as np
import pytest

import fastopt
from fastopt import _plotting, demo
from fastopt.__main__ import main


def test_momentum_rolls_over_the_local_minimum_where_gd_stays():
    gd, ball = demo.roll_ball(momentum=0.0), demo.roll_ball(momentum=0.9)
    assert abs(gd[-1] - 0.96) < 0.01      # the local minimum
    assert abs(ball[-1] + 1.036) < 0.01   # the global one
    assert demo.bumpy(ball[-1]) < demo.bumpy(gd[-1])


def test_digits_like_data_is_deterministic():
    a, b = demo.make_digits_like(0), demo.make_digits_like(0)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape == (1797, 64) and set(np.unique(a[1])) == set(range(10))


def test_demo_runs_and_reports(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--plot", str(tmp_path / "demo.png")]) == 0
    out = capsys.readouterr().out
    for label, *_ in demo.OPTIMIZERS:
        assert label in out
    assert "rolled over the bump" in out and "lr_range_test suggests" in out


def test_part_three_trains_every_learning_rate_as_long_as_part_one(monkeypatch):
    epochs = []
    real_fit = demo.fit

    def recording_fit(*args, **kwargs):
        epochs.append(kwargs["epochs"])
        return real_fit(*args, **kwargs)
    monkeypatch.setattr(demo, "fit", recording_fit)
    found, rows = demo.learning_rates(demo.load_data(), 2)
    assert epochs == [2] * len(rows) and len(rows) == 4
    hand = [r for r in rows if r["learning rate"].startswith("hand-picked")]
    assert [r["lr"] for r in hand] == [demo.HAND_PICKED_LR]
    # The hand-picked rate is part 1's momentum run: same optimizer, same budget, same result.
    model, history = demo.train(demo.load_data(), 32, fastopt.SGD,
                                {"lr": demo.HAND_PICKED_LR, "momentum": 0.9}, 2, "cython")
    assert hand[0]["final loss"] == history.epoch_loss[-1]


def test_demo_says_in_one_line_when_matplotlib_is_missing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(_plotting, "pyplot", lambda: None)
    png = tmp_path / "demo.png"
    assert main(["demo", "--epochs", "1", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "matplotlib" in line] == [
        _plotting.missing_line(str(png))]
    assert "saved" not in out and not png.exists()
    assert "1 epochs each, as in part 1" in out


@pytest.mark.skipif(_plotting.pyplot() is None, reason="needs matplotlib")
def test_demo_prints_the_absolute_path_of_its_figure(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--epochs", "1"]) == 0
    saved = [line for line in capsys.readouterr().out.splitlines() if line.startswith("saved ")]
    assert saved == [f"saved {tmp_path / 'fastopt-demo.png'}"]
    assert (tmp_path / "fastopt-demo.png").stat().st_size > 10_000


def test_demo_help_says_where_the_figure_goes(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "./fastopt-demo.png in the current folder" in " ".join(capsys.readouterr().out.split())
