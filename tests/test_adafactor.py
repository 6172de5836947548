"""Adafactor (fastopt/optim/adafactor.py, src_c/rules/adafactor.pxi): the rule whose state
is not shaped like its parameters.

The registry-driven sweeps (test_kernels, test_dispatch, test_torch_parity)
cover its numbers; this module covers what only a factored state has: the
shapes of row_var, col_var and variance through the optimizers, state_dict,
checkpoints and fastopt.torch, and the errors for state of the wrong shape.
"""
import copy
import importlib.util

import numpy as np
import pytest

import fastopt
from fastopt import kernels

HAS_TORCH = importlib.util.find_spec("torch") is not None
SHAPES = [(6, 4), (9,), (), (2, 3, 5), (1, 7)]


def _params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]


def _grads(params, t):
    # depend on the parameters, so that a wrong step changes every later one
    return [np.asarray(np.sin(3.0 * p + t) + 0.1 * p, p.dtype) for p in params]


def _run(opt, params, steps, start=1):
    for t in range(start, start + steps):
        opt.step(_grads(params, t))


def test_state_shapes_follow_torch():
    params = _params()
    opt = fastopt.Adafactor(params, lr=0.05)
    _run(opt, params, 2)
    for i, p in enumerate(params):
        state = opt.state[i]
        if p.ndim >= 2:
            assert set(state) == {"step", "row_var", "col_var"}
            assert state["row_var"].shape == p.shape[:-1] + (1,)
            assert state["col_var"].shape == p.shape[:-2] + (1,) + p.shape[-1:]
        else:
            assert set(state) == {"step", "variance"}
            assert state["variance"].shape == p.shape
        assert all(v.dtype == p.dtype for k, v in state.items() if k != "step")


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_state_dict_round_trip_continues_bit_for_bit(backend):
    params = _params(1)
    opt = fastopt.Adafactor(params, lr=0.05, weight_decay=0.01, backend=backend)
    _run(opt, params, 3)
    copies = [p.copy() for p in params]
    restored = fastopt.Adafactor(copies, lr=0.05, weight_decay=0.01, backend=backend)
    restored.load_state_dict(opt.state_dict())
    _run(opt, params, 4, start=4)
    _run(restored, copies, 4, start=4)
    for a, b in zip(params, copies):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_round_trip(tmp_path):
    params = _params(2, np.float32)
    opt = fastopt.Adafactor(params, eps=(1e-4, 1e-3), d=2.0)
    _run(opt, params, 3)
    opt.save(tmp_path / "ckpt")
    copies = [p.copy() for p in params]
    loaded = fastopt.load_optimizer(tmp_path / "ckpt", copies)
    assert type(loaded) is fastopt.Adafactor
    assert loaded.param_groups[0]["eps"] == (1e-4, 1e-3)
    _run(opt, params, 2, start=4)
    _run(loaded, copies, 2, start=4)
    for a, b in zip(params, copies):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("key, bad, match", [
    ("row_var", np.zeros((6, 4)), r"row_var.* has shape \(6, 4\).*needs \(6, 1\)"),
    ("col_var", np.zeros((4,)), r"col_var.* has shape \(4,\).*needs \(1, 4\)"),
    ("variance", np.zeros((6, 4)), "variance.* not state of a parameter of shape"),
])
def test_load_state_dict_refuses_state_of_another_shape(key, bad, match):
    params = _params()
    opt = fastopt.Adafactor(params)
    _run(opt, params, 1)
    sd = opt.state_dict()
    sd["state"][0][key] = bad
    before = [p.copy() for p in params]
    snapshot = {k: v.copy() for k, v in opt.state[0].items() if isinstance(v, np.ndarray)}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    for k, v in snapshot.items():
        np.testing.assert_array_equal(opt.state[0][k], v)
    for a, b in zip(params, before):
        np.testing.assert_array_equal(a, b)


def test_a_step_refuses_state_replaced_by_another_shape_and_changes_nothing():
    params = _params()
    opt = fastopt.Adafactor(params)
    _run(opt, params, 1)
    opt.state[0]["row_var"] = np.zeros((1, 4))  # a column factor's shape
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"state\[0\]\['row_var'\] has shape \(1, 4\)"):
        opt.step(_grads(params, 2))
    for a, b in zip(params, before):
        np.testing.assert_array_equal(a, b)
    assert opt.state[1]["step"] == 1


def test_low_level_function_checks_each_buffer_against_the_shape():
    p, g = np.ones((3, 4)), np.full((3, 4), 0.5)
    row, col = np.zeros((3, 1)), np.zeros((1, 4))
    with pytest.raises(ValueError, match="variance was given but these options do not use "
                                         r"it for a parameter of shape \(3, 4\)"):
        kernels.adafactor(p, g, row, col, np.zeros((3, 4)), step=1)
    with pytest.raises(ValueError, match="col_var is required"):
        kernels.adafactor(p, g, row, None, None, step=1)
    with pytest.raises(ValueError, match=r"row_var has shape \(1, 4\).*needs \(3, 1\)"):
        kernels.adafactor(p, g, col.copy(), col, None, step=1)
    with pytest.raises(TypeError, match="row_var has dtype float32"):
        kernels.adafactor(p, g, row.astype(np.float32), col, None, step=1)
    np.testing.assert_array_equal(p, 1.0)
    kernels.adafactor(p, g, row, col, None, step=1)
    assert np.all(p < 1.0) and np.all(row > 0) and np.all(col > 0)


@pytest.mark.parametrize("eps, match", [
    ((None,), "eps must be a pair"), ((-1e-3, 1e-3), r"eps\[0\] must be >= 0"),
    ((None, float("nan")), r"eps\[1\] must be >= 0"), ((None, None), r"eps\[1\]"),
])
def test_eps_pair_is_validated(eps, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fastopt.Adafactor([np.zeros(3)], eps=eps)


@pytest.mark.parametrize("kwargs, match", [
    ({"beta2_decay": 0.1}, "beta2_decay must be <= 0"), ({"d": 0.5}, "d must be >= 1"),
    ({"lr": -1.0}, "lr must be >= 0"), ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
])
def test_ranges_are_torchs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastopt.Adafactor([np.zeros(3)], **kwargs)


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_state_dict_loads_into_torch_optim_and_back():
    import torch
    import fastopt.torch as ft

    torch.manual_seed(0)
    start = [torch.randn(shape, dtype=torch.float64) for shape in SHAPES]

    def run(cls, params, steps, opt=None):
        opt = opt or cls(params, lr=0.05, weight_decay=0.01)
        for _ in range(steps):
            for p in params:
                p.grad = torch.sin(3 * p) + 0.1 * p
            opt.step()
        return opt

    mine = [t.clone() for t in start]
    ours = run(ft.Adafactor, mine, 3)
    theirs = [t.clone() for t in mine]
    torch_opt = torch.optim.Adafactor(theirs, lr=0.05, weight_decay=0.01)
    # (deep copies: a state_dict holds the state tensors themselves)
    torch_opt.load_state_dict(copy.deepcopy(ours.state_dict()))
    run(None, mine, 3, ours)
    run(None, theirs, 3, torch_opt)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    back = [t.clone() for t in theirs]
    again = ft.Adafactor(back, lr=0.05, weight_decay=0.01)
    again.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    run(None, back, 2, again)
    run(None, theirs, 2, torch_opt)
    for a, b in zip(back, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_refuses_state_of_another_shape_and_changes_nothing():
    import torch
    import fastopt.torch as ft

    p = torch.ones(4, 3, dtype=torch.float64, requires_grad=True)
    opt = ft.Adafactor([p])
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    opt.state[p]["row_var"] = torch.zeros(4, 3, dtype=torch.float64)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"state\['row_var'\] that is no CPU tensor of the "
                                         r"parameter's dtype and shape \(4, 1\)"):
        opt.step()
    assert torch.equal(p.detach(), before)
    opt.state[p]["variance"] = torch.zeros(4, 3, dtype=torch.float64)
    del opt.state[p]["row_var"]
    with pytest.raises(ValueError, match="state\\['variance'\\], which a parameter of its "
                                         "shape does not keep"):
        opt.step()


def _warm_torch_adafactor(shape=(4, 3)):
    import torch
    import fastopt.torch as ft

    p = torch.nn.Parameter(torch.arange(float(np.prod(shape))).reshape(shape) / 7)
    opt = ft.Adafactor([p])
    for _ in range(2):  # the second step gathers the warm path
        p.grad = torch.ones(shape)
        opt.step()
    return torch, p, opt


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_warm_path_sees_a_param_reshaped_in_place():
    # p.data = p.data.view(...) keeps the memory: the factored state no longer fits
    torch, p, opt = _warm_torch_adafactor()
    p.data = p.data.view(3, 4)
    p.grad = torch.ones(3, 4)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"state\['row_var'\].*shape \(3, 1\)"):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_state_with_gaps_is_stepped_through_a_copy_every_step():
    torch, p, opt = _warm_torch_adafactor()
    base = torch.zeros(1, 6)
    gapped = base[:, ::2]
    gapped.copy_(opt.state[p]["col_var"])
    import fastopt.torch as ft

    twin = p.detach().clone().requires_grad_()
    other = ft.Adafactor([twin])
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.state[p]["col_var"] = gapped
    for _ in range(3):
        p.grad, twin.grad = torch.ones(4, 3), torch.ones(4, 3)
        opt.step()
        other.step()
    assert torch.equal(base[:, 1::2], torch.zeros(1, 3))  # the gaps untouched
    assert torch.equal(p.detach(), twin.detach())


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_refuses_an_expanded_state_tensor_before_changing_anything():
    torch, p, opt = _warm_torch_adafactor()
    opt.state[p]["row_var"] = torch.zeros(1, 1).expand(4, 1)
    before, step = p.detach().clone(), float(opt.state[p]["step"])
    p.grad = torch.ones(4, 3)
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert torch.equal(p.detach(), before) and float(opt.state[p]["step"]) == step


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_uses_an_eps1_written_into_the_group_as_is():
    # torch checks ranges only in its constructor; a later eps1 (even negative) is used
    import torch
    import fastopt.torch as ft

    ps = [torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(4, 3)) for _ in range(2)]
    opts = [torch.optim.Adafactor([ps[0]]), ft.Adafactor([ps[1]])]
    for opt in opts:
        opt.param_groups[0]["eps"] = (-0.5, 1e-3)
    for _ in range(3):
        for p, opt in zip(ps, opts):
            p.grad = torch.sin(3 * p.detach())
            opt.step()
    torch.testing.assert_close(ps[1].detach(), ps[0].detach(), rtol=0, atol=1e-6)
