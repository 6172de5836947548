"""fastopt.flat: packed parameters and gradients."""
import doctest

import numpy as np
import pytest

import fastopt
import fastopt.flat
from fastopt.flat import ALIGNMENT, FlatParams

import spec  # tests/spec.py: tests/ is on sys.path under pytest


def model(rng, dtype=np.float32):
    shapes = {"W1": (7, 13), "b1": (13,), "W2": (13, 3), "b2": (3,), "scale": ()}
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_views_are_aligned_contiguous_and_share_the_buffers(dtype):
    arrays = model(np.random.default_rng(0), dtype)
    flat = FlatParams(arrays)
    assert flat.data.dtype == dtype and flat.data.ctypes.data % ALIGNMENT == 0
    for name, value in arrays.items():
        view, grad = flat.params[name], flat.grads[name]
        np.testing.assert_array_equal(view, value)
        assert view.shape == value.shape and view.flags.c_contiguous
        assert view.ctypes.data % ALIGNMENT == 0
        assert np.shares_memory(view, flat.data) and np.shares_memory(grad, flat.grad)
        assert not np.shares_memory(view, value)  # values were copied in


@pytest.mark.parametrize("case", spec.optimizer_cases(), ids=spec.case_id)
def test_flat_optimizer_equals_per_array_optimizer(case):
    _, cls, kwargs = case
    rng = np.random.default_rng(1)
    arrays = model(rng)
    separate = {k: v.copy() for k, v in arrays.items()}
    flat = FlatParams(arrays)
    # A rule that reads each parameter whole (Lamb's trust ratio) steps the
    # flat buffer's views, one parameter each; any other steps the buffer.
    whole = spec.rule(cls).whole_arrays
    opt_flat = cls(dict(flat.params) if whole else [flat.data], **kwargs)
    opt_sep = cls(separate, **kwargs)
    for _ in range(5):
        grads = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in arrays.items()}
        for k, g in grads.items():
            flat.grads[k][...] = g
        opt_flat.step(dict(flat.grads) if whole else [flat.grad])
        opt_sep.step(grads)
    for k in arrays:
        np.testing.assert_array_equal(flat.params[k], separate[k])
    padding = np.ones(flat.data.size, bool)
    for k in arrays:
        offset, size, _ = flat._offsets[k]
        padding[offset:offset + size] = False
    assert padding.any() and np.all(flat.data[padding] == 0)  # padding never moves


def test_segments_make_param_groups():
    flat = FlatParams({"W1": (4, 4), "W2": (4, 4), "b1": (4,), "b2": (4,)})
    weights, weight_grads = flat.segment("W1", "W2")
    biases, bias_grads = flat.segment("b2", "b1")
    assert weights.size + biases.size == flat.data.size
    opt = fastopt.AdamW([{"params": [weights]}, {"params": [biases], "weight_decay": 0.0}],
                        lr=0.1, weight_decay=0.5)
    flat.params["W1"][...] = 1.0
    flat.params["b1"][...] = 1.0
    opt.step([weight_grads, bias_grads])  # zero gradients: only decay moves anything
    assert np.all(flat.params["W1"] == np.float64(1.0) * (1 - 0.1 * 0.5))
    assert np.all(flat.params["b1"] == 1.0)
    with pytest.raises(ValueError, match="not consecutive"):
        flat.segment("W1", "b1")
    with pytest.raises(ValueError, match="unknown"):
        flat.segment("nope")


@pytest.mark.parametrize("arrays, error", [
    ({}, TypeError), ([np.zeros(2)], TypeError), ({"a": [1.0]}, TypeError),
    ({"a": (2, -1)}, TypeError), ({1: (2,)}, TypeError),
])
def test_bad_specs_are_refused(arrays, error):
    with pytest.raises(error):
        FlatParams(arrays)


def test_integer_dtype_is_refused():
    with pytest.raises(TypeError, match="float32 or float64"):
        FlatParams({"a": (3,)}, dtype=np.int32)


def test_module_example():
    assert doctest.testmod(fastopt.flat).failed == 0
