"""fastopt.clip: global-norm and value clipping."""
import math

import numpy as np
import pytest

import fastopt
from fastopt import _dispatch, clip_grad_norm, clip_grad_value, grad_norm


def grads(seed=0, dtype=np.float32, sizes=(5, 8193, 17, 100003, 1)):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for n in sizes]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norm_matches_numpy(dtype):
    gs = grads(dtype=dtype)
    expected = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in gs))
    assert grad_norm(gs) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("max_norm", [0.5, 10.0, 1e6])
def test_clip_scales_like_torch(max_norm):
    gs = grads()
    before = [g.copy() for g in gs]
    norm = clip_grad_norm(gs, max_norm)
    coef = max_norm / (norm + 1e-6)
    for g, b in zip(gs, before):
        if coef < 1:
            np.testing.assert_array_equal(g, b * np.float32(coef))
        else:
            np.testing.assert_array_equal(g, b)
    assert grad_norm(gs) <= max_norm * (1 + 1e-6) or coef >= 1


def test_clip_matches_torch():
    torch = pytest.importorskip("torch")
    gs = grads(3, np.float64)
    tensors = [torch.zeros(len(g), dtype=torch.float64, requires_grad=True) for g in gs]
    for t, g in zip(tensors, gs):
        t.grad = torch.tensor(g)
    expected = float(torch.nn.utils.clip_grad_norm_(tensors, 1.0))
    assert clip_grad_norm(gs, 1.0) == pytest.approx(expected, rel=1e-12)
    for t, g in zip(tensors, gs):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-12)


def test_norm_is_identical_for_every_thread_count_and_simd_level():
    gs = grads(5, np.float32, sizes=(3, 70001, 123457, 8192, 9))
    level, threads = _dispatch.simd_level(), fastopt.get_num_threads()
    saved = {}
    results = set()
    try:
        for lvl in set(_dispatch.built_levels()) & set(_dispatch.cpu_levels()):
            _dispatch.select_simd(lvl)
            module = _dispatch._active["module"]
            saved[module] = module.get_parallel_min_work()
            module.set_parallel_min_work(0)
            for t in (1, 2, 3):
                fastopt.set_num_threads(t)
                results.add(grad_norm(gs))
    finally:
        for module, threshold in saved.items():
            module.set_parallel_min_work(threshold)
        _dispatch.select_simd(level)
        fastopt.set_num_threads(threads)
    assert len(results) == 1


def test_nonfinite_gradients():
    gs = grads()
    gs[1][7] = np.nan
    kept = [g.copy() for g in gs]
    assert math.isnan(clip_grad_norm(gs, 1.0))
    for g, k in zip(gs, kept):
        np.testing.assert_array_equal(g, k)  # left alone
    gs[1][7] = np.inf
    assert clip_grad_norm(gs, 1.0) == math.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_grad_norm(gs, 1.0, error_if_nonfinite=True)


def test_dict_list_single_array_and_none():
    g = np.full(4, 3.0)
    assert grad_norm(g) == 6.0
    assert grad_norm({"a": g, "b": None}) == 6.0
    assert grad_norm([None, g]) == 6.0
    assert grad_norm([]) == 0.0


def test_clip_value():
    g = np.array([-5.0, 0.5, 7.0])
    clip_grad_value([g], 1.0)
    np.testing.assert_array_equal(g, [-1.0, 0.5, 1.0])


@pytest.mark.parametrize("call, error, message", [
    (lambda: clip_grad_norm([np.zeros(3)], -1.0), ValueError, "max_norm must be >= 0"),
    (lambda: clip_grad_norm([np.zeros(3, np.int32)], 1.0), TypeError, r"grads\[0\] must have dtype"),
    (lambda: clip_grad_norm([np.zeros(6)[::2]], 1.0), ValueError, "C-contiguous"),
    (lambda: clip_grad_norm(np.broadcast_to(np.zeros(3), (3,)), 1.0), ValueError, "read-only"),
    (lambda: clip_grad_norm([np.zeros(3)] * 2, 1.0), ValueError, "same array"),
    (lambda: clip_grad_norm(5.0, 1.0), TypeError, "grads must be"),
    (lambda: clip_grad_value([np.zeros(3)], -0.1), ValueError, "clip_value"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
