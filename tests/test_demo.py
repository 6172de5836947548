"""fastopt.demo: python -m fastopt demo."""
import numpy as np

from fastopt import demo
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
