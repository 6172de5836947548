"""fastopt.batching: full-batch, stochastic and mini-batch iteration."""
import doctest
import tracemalloc

import numpy as np
import pytest

import fastopt.batching
from fastopt import batches


def data(n=10, d=3):
    X = np.arange(n * d, dtype=np.float64).reshape(n, d)
    return X, np.arange(n) * 10


def test_full_batch_is_the_data_itself():
    X, y = data()
    (xb, yb), = list(batches(X, y))
    assert xb is X and yb is y
    assert len(batches(X, y)) == 1


@pytest.mark.parametrize("batch_size, drop_last, sizes", [
    (1, False, [1] * 10), (3, False, [3, 3, 3, 1]), (3, True, [3, 3, 3]), (10, True, [10]),
    (12, False, [10]),
])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batch_sizes_and_coverage(batch_size, drop_last, sizes, shuffle):
    X, y = data()
    it = batches(X, y, batch_size=batch_size, shuffle=shuffle, seed=0, drop_last=drop_last)
    got = [(xb.copy(), yb.copy()) for xb, yb in it]
    assert [len(xb) for xb, _ in got] == sizes == [len(yb) for _, yb in got]
    assert len(it) == len(sizes)
    seen = np.concatenate([yb for _, yb in got])
    for xb, yb in got:
        np.testing.assert_array_equal(xb[:, 0], yb / 10 * 3)  # rows stay paired with targets
    if not drop_last:
        assert sorted(seen.tolist()) == y.tolist()
    if not shuffle:
        assert seen.tolist() == y[:len(seen)].tolist()


def test_unshuffled_batches_are_views():
    X, y = data()
    for xb, yb in batches(X, y, batch_size=4, shuffle=False):
        assert np.shares_memory(xb, X) and np.shares_memory(yb, y)


def test_epochs_reshuffle_reproducibly():
    X, y = data(50)
    def epochs(seed):
        it = batches(X, y, batch_size=7, seed=seed)
        return [[yb.tolist() for _, yb in it] for _ in range(3)]
    first, again, other = epochs(1), epochs(1), epochs(2)
    assert first == again
    assert first[0] != first[1]  # a fresh permutation each epoch
    assert first != other


def test_shuffled_batches_reuse_two_buffers():
    X, y = data(64, 5)
    it = batches(X, y, batch_size=8, seed=0)
    list(it)  # first epoch makes the buffers
    tracemalloc.start()
    snap = tracemalloc.take_snapshot()
    addresses = {xb.ctypes.data for xb, _ in it}
    grown = tracemalloc.take_snapshot().compare_to(snap, "filename")
    tracemalloc.stop()
    assert len(addresses) == 1
    numpy_data = [s for s in grown if s.size_diff > 0 and s.traceback[0].filename.endswith("batching.py")]
    assert sum(s.size_diff for s in numpy_data) < 1024


def test_x_alone():
    X, _ = data()
    assert [len(xb) for xb in batches(X, batch_size=4, shuffle=False)] == [4, 4, 2]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(y=np.arange(9)), ValueError, "10 samples but y has 9"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(batch_size=-2), ValueError, "batch_size must be >= 1"),
    (dict(batch_size=2.5), TypeError, "batch_size must be an int"),
    (dict(batch_size=True), TypeError, "batch_size must be an int"),
    (dict(batch_size=11, drop_last=True), ValueError, "would yield no batch"),
])
def test_bad_arguments(kwargs, error, message):
    X, _ = data()
    with pytest.raises(error, match=message):
        batches(X, **kwargs)


def test_bad_data():
    with pytest.raises(TypeError, match="X must be an ndarray"):
        batches([[1.0]])
    with pytest.raises(ValueError, match="no samples"):
        batches(np.zeros((0, 3)))


def test_module_example():
    assert doctest.testmod(fastopt.batching).failed == 0
