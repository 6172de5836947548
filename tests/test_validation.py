"""fastopt._validation: the constraint rules every entry point reuses."""
import math

import numpy as np
import pytest

from fastopt import _validation as V


@pytest.mark.parametrize("rule, good, bad", [
    (V.nonnegative, [0, 0.0, 1e-3, 5, np.float32(2)], [-1e-12, math.nan, -math.inf]),
    (V.positive, [1e-300, 2], [0.0, -1.0, math.inf, math.nan]),
    (V.unit_interval, [0.0, 0.5, 0.999999], [1.0, -0.1, math.nan]),
    (V.finite, [-3.0, 0, 7], [math.inf, math.nan]),
])
def test_numeric_rules(rule, good, bad):
    for value in good:
        assert rule("x", value) == float(value)
        assert type(rule("x", value)) is float
    for value in bad:
        with pytest.raises(ValueError, match="^x must be"):
            rule("x", value)


@pytest.mark.parametrize("value", ["0.1", None, True, np.array([0.1]), [0.1]])
def test_numeric_rules_refuse_non_numbers(value):
    with pytest.raises(TypeError, match="x must be a real number"):
        V.nonnegative("x", value)


def test_flag_and_betas_and_step_count():
    assert V.flag("f", np.bool_(True)) is True
    with pytest.raises(TypeError, match="f must be a bool"):
        V.flag("f", 1)
    assert V.betas("betas", [0.5, 0.25]) == (0.5, 0.25)
    with pytest.raises(TypeError, match="pair"):
        V.betas("betas", (0.9,))
    assert V.step_count("step", np.int64(3)) == 3
    with pytest.raises(TypeError):
        V.step_count("step", True)


def test_check_hyper_reports_missing_and_prefixes_where():
    rules = {"lr": V.nonnegative}
    with pytest.raises(TypeError, match="missing hyperparameter 'lr'"):
        V.check_hyper(rules, {})
    with pytest.raises(ValueError, match=r"^param_groups\[2\]: lr must be >= 0"):
        V.check_hyper(rules, {"lr": -1}, "param_groups[2]: ")


def test_array_checks():
    a = np.zeros(4, np.float32)
    V.check_float_array("a", a, writeable=True)
    for bad, error in [(np.zeros(4, np.int8), TypeError), (np.zeros(4, np.complex64), TypeError),
                       (np.zeros(4, ">f8"), TypeError), (np.zeros(8)[::2], ValueError)]:
        with pytest.raises(error, match="^a "):
            V.check_float_array("a", bad, writeable=False)
    misaligned = np.frombuffer(bytes(17), dtype=np.float32, offset=1, count=4)
    with pytest.raises(ValueError, match="not aligned"):
        V.check_float_array("a", misaligned, writeable=False)


def test_distinct_params_sees_overlap_beyond_neighbours():
    big = np.zeros(100)
    # sorted by start: big[0:100], x (separate), big[50:60] -> overlaps big, not its neighbour
    with pytest.raises(ValueError, match="shares memory"):
        V.check_distinct_params([("a", big), ("b", big[50:60]), ("c", np.zeros(3))])
