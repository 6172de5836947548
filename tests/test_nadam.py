"""NAdam (fastopt/optim/nadam.py, src_c/rules/nadam.pxi): the first rule of the new layout.

Its fused kernel against its NumPy twin bit for bit; against torch.optim.NAdam
live (when torch is installed); its per-parameter scalar state (mu_product)
through param groups, state_dict, checkpoints and the torch adapter.
"""
import importlib.util

import numpy as np
import pytest

import fastopt
from fastopt import _dispatch, kernels, reference

SIZES = [0, 1, 7, 17, 1000, 4099]
OPTIONS = [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True},
           {"maximize": True, "momentum_decay": 0.01, "betas": (0.8, 0.9), "eps": 1e-3}]
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _data(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n).astype(dtype),
            [rng.standard_normal(n).astype(dtype) for _ in range(6)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_kernel_matches_twin_bit_for_bit(dtype, n, options):
    p0, grads = _data(n, dtype)
    fast, slow = p0.copy(), p0.copy()
    m_f, v_f, m_s, v_s = (np.zeros_like(p0) for _ in range(4))
    mu_f = mu_s = 1.0
    for t, g in enumerate(grads, start=1):
        mu_f = kernels.nadam(fast, g, m_f, v_f, step=t, mu_product=mu_f, lr=1e-2, **options)
        mu_s = reference.nadam(slow, g, m_s, v_s, step=t, mu_product=mu_s, lr=1e-2, **options)
        assert mu_f == mu_s
    for a, b in ((fast, slow), (m_f, m_s), (v_f, v_s)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nan_and_inf_propagate_as_in_the_twin():
    p0 = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    g = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    outs = []
    for fn in (kernels.nadam, reference.nadam):
        p, m, v = p0.copy(), np.zeros(4, np.float32), np.zeros(4, np.float32)
        fn(p, g, m, v, step=1, mu_product=1.0)
        outs.append(p)
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("level", [lvl for lvl in _dispatch.built_levels()
                                   if lvl in _dispatch.cpu_levels()])
def test_same_bits_for_every_thread_count_and_simd_level(threads, level):
    before = (_dispatch.simd_level(), fastopt.get_num_threads())
    p0, grads = _data(100003, np.float32)
    runs = []
    try:
        for setting in ((level, threads), ("baseline", 1)):
            _dispatch.select_simd(setting[0])
            fastopt.set_num_threads(setting[1])
            p = p0.copy()
            opt = fastopt.NAdam([p], lr=1e-2, weight_decay=0.01)
            for g in grads:
                opt.step([g])
            runs.append(p)
    finally:
        _dispatch.select_simd(before[0])
        fastopt.set_num_threads(before[1])
    np.testing.assert_array_equal(runs[0], runs[1])


def test_optimizer_matches_numpy_backend_with_groups_and_missing_grads():
    p0, grads = _data(64, np.float64)
    runs = []
    for backend in ("cython", "numpy"):
        a, b = p0[:40].copy(), p0[40:].copy()
        opt = fastopt.NAdam([{"params": [a]}, {"params": [b], "lr": 1e-3,
                                                "decoupled_weight_decay": True,
                                                "weight_decay": 0.5}],
                            lr=1e-2, backend=backend)
        for t, g in enumerate(grads):
            # b has no gradient on step 2: its step count and mu_product fall behind a's
            opt.step([g[:40].copy(), None if t == 2 else g[40:].copy()])
        runs.append((a, b, opt.state[0]["mu_product"], opt.state[1]["mu_product"],
                     opt.state[1]["step"]))
    (a1, b1, mu_a1, mu_b1, step_b1), (a2, b2, mu_a2, mu_b2, _) = runs
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    assert mu_a1 == mu_a2 and mu_b1 == mu_b2 and mu_a1 != mu_b1 and step_b1 == len(grads) - 1


def test_state_dict_and_checkpoint_resume_bit_identical(tmp_path):
    p0, grads = _data(33, np.float32)
    straight = p0.copy()
    opt = fastopt.NAdam([straight])
    for g in grads:
        opt.step([g])
    resumed = p0.copy()
    first = fastopt.NAdam([resumed])
    for g in grads[:3]:
        first.step([g])
    first.save(tmp_path / "nadam.npz")
    second = fastopt.load_optimizer(tmp_path / "nadam.npz", [resumed])
    assert second.state[0]["mu_product"] == first.state[0]["mu_product"]
    for g in grads[3:]:
        second.step([g])
    np.testing.assert_array_equal(straight, resumed)


@pytest.mark.parametrize("bad, error, message", [
    ({"momentum_decay": -1.0}, ValueError, "momentum_decay must be >= 0"),
    ({"betas": (1.0, 0.9)}, ValueError, "betas"),
    ({"eps": 0.0}, ValueError, "eps must be > 0"),
])
def test_bad_hyperparameters_are_refused(bad, error, message):
    with pytest.raises(error, match=message):
        fastopt.NAdam([np.zeros(3)], **bad)


def test_bad_mu_product_state_is_refused_before_anything_changes():
    p = np.ones(4)
    opt = fastopt.NAdam([p])
    opt.step([np.ones(4)])
    opt.state[0]["mu_product"] = "0.5"
    before = p.copy()
    with pytest.raises(TypeError, match=r"state\[0\]\['mu_product'\] must be a real number"):
        opt.step([np.ones(4)])
    np.testing.assert_array_equal(p, before)
    assert opt.state[0]["step"] == 1


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch (pip install torch==2.13.0)")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_matches_torch_nadam_live(dtype, options):
    import torch

    import fastopt.torch as ft
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(500, dtype=torch_dtype, generator=gen)
    ref = p0.clone().requires_grad_()
    ours = p0.clone().requires_grad_()
    arrays = p0.numpy().copy()
    opts = (torch.optim.NAdam([ref], lr=1e-2, **options), ft.NAdam([ours], lr=1e-2, **options),
            fastopt.NAdam([arrays], lr=1e-2, **options))
    for _ in range(30):
        g = torch.randn(500, dtype=torch_dtype, generator=gen)
        ref.grad, ours.grad = g.clone(), g.clone()
        opts[0].step()
        opts[1].step()
        opts[2].step([g.numpy().copy()])
    moved = float((ref.detach() - p0).abs().max())
    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    assert float((ref.detach() - ours.detach()).abs().max()) <= tol * moved
    np.testing.assert_array_equal(ours.detach().numpy(), arrays)  # the same kernel
    assert float(opts[0].state[ref]["mu_product"]) == float(opts[1].state[ours]["mu_product"])
    # torch's state_dict layout: loads into torch.optim.NAdam and back
    back = torch.optim.NAdam([ours], lr=1e-2, **options)
    back.load_state_dict(opts[1].state_dict())
    again = ft.NAdam([ours], lr=1e-2, **options)
    again.load_state_dict(back.state_dict())
    assert float(again.state[ours]["mu_product"]) == float(opts[1].state[ours]["mu_product"])


def test_a_mu_product_that_rounds_to_one_is_refused_with_nothing_changed():
    # float32 mu_product can round to exactly 1; torch then divides by zero
    p = np.ones(3)
    opt = fastopt.NAdam([p], betas=(0.99999999, 0.999), momentum_decay=1000)
    with pytest.raises(ValueError, match="mu_product rounds to 1 at step 1"):
        opt.step([np.ones(3)])
    assert not opt.state and np.all(p == 1)
    with pytest.raises(ValueError, match="mu_product rounds to 1"):
        kernels.nadam(p, np.ones(3), np.zeros(3), np.zeros(3), step=1, mu_product=1.0,
                      betas=(0.99999999, 0.999), momentum_decay=1000)
    assert np.all(p == 1)


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch (pip install torch==2.13.0)")
def test_torch_adapter_refuses_the_degenerate_step_too():
    import torch

    import fastopt.torch as ft
    t = torch.ones(3, requires_grad=True)
    opt = ft.NAdam([t], betas=(0.99999999, 0.999), momentum_decay=1000)
    t.grad = torch.ones(3)
    with pytest.raises(ValueError, match="mu_product rounds to 1"):
        opt.step()
    assert not opt.state and torch.equal(t.detach(), torch.ones(3))
