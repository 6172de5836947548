"""fastopt.accumulate: gradient accumulation over micro-batches."""
import doctest

import numpy as np
import pytest

import fastopt.accumulate
from fastopt import GradientAccumulator


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accumulates_mean_or_sum(reduction, dtype):
    rng = np.random.default_rng(0)
    buffers = [np.empty(1001, dtype), np.empty((3, 4), dtype)]
    acc = GradientAccumulator(buffers, steps=3, reduction=reduction)
    micro = [[rng.standard_normal(b.shape).astype(dtype) for b in buffers] for _ in range(3)]
    for k, grads in enumerate(micro):
        assert not acc.ready
        acc.add(grads)
    assert acc.ready and acc.count == 3
    scale = dtype(1 / 3) if reduction == "mean" else dtype(1)
    for i, b in enumerate(buffers):
        expected = np.zeros_like(b)
        for grads in micro:
            expected = expected + scale * grads[i]  # same order, same roundings
        np.testing.assert_array_equal(b, expected)
    acc.reset()
    assert acc.count == 0 and all(np.all(b == 0) for b in buffers)


def test_bad_input():
    with pytest.raises(ValueError, match="steps"):
        GradientAccumulator([np.zeros(2)], steps=0)
    with pytest.raises(ValueError, match="reduction"):
        GradientAccumulator([np.zeros(2)], steps=2, reduction="max")
    acc = GradientAccumulator([np.zeros(2)], steps=2)
    with pytest.raises(ValueError, match="list of 1"):
        acc.add([np.zeros(2), np.zeros(2)])
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        acc.add([np.zeros(3)])
    with pytest.raises(ValueError, match="shares memory"):
        acc.add(acc.buffers)
    assert acc.count == 0


def test_module_example():
    assert doctest.testmod(fastopt.accumulate).failed == 0
