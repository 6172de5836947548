"""fastopt.torch's own torch-style optimizers: the classes torch.optim lacks (Lion, Lamb).

They have no torch.optim counterpart to be compared with, so they are held to
fastopt's NumPy classes of the same name, which share their kernels (and
whose rule tests/test_optax_parity.py compares with optax): the same steps
bit for bit, through param groups, missing gradients, hyperparameter edits,
state_dict round trips and schedulers; and torch.optim's conventions for the
rest (validation in the constructor, state layout).
"""
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402

import spec  # noqa: E402

NAMES = spec.optax_class_names()
STEPS = 12


def scenario_inputs(seed=7):
    rng = np.random.default_rng(seed)
    p0s = [rng.standard_normal((4, 3)), rng.standard_normal(5).astype(np.float32),
           rng.standard_normal(6)]
    grads = [[None if (t % 4 == 3 and i == 2) else rng.standard_normal(p.shape).astype(p.dtype)
              for i, p in enumerate(p0s)] for t in range(STEPS)]
    return p0s, grads


def run(make, name, kwargs, changes, p0s, grads, to_array):
    """Steps of a two-group optimizer; returns the params after every step."""
    params = make(p0s)
    opt = getattr(make.module, name)([{"params": params[:2]},
                                      {"params": params[2:], "lr": 0.002}], **kwargs)
    out = []
    for t, gs in enumerate(grads):
        for when, gi, key, value in changes:
            if when == t:
                opt.param_groups[gi][key] = value
        make.step(opt, params, gs)
        out.append([to_array(p).copy() for p in params])
    return out, opt


class _Numpy:
    module = fastopt

    def __call__(self, p0s):
        return [p.copy() for p in p0s]

    @staticmethod
    def step(opt, params, gs):
        opt.step(gs)


class _Torch:
    module = ft

    def __call__(self, p0s):
        return [torch.tensor(p.copy(), requires_grad=True) for p in p0s]

    @staticmethod
    def step(opt, params, gs):
        for p, g in zip(params, gs):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_steps_are_the_numpy_classes_bit_for_bit(name):
    kwargs, _, changes = spec.find_class(name).scenario
    changes = [(when - 1, gi, key, value) for when, gi, key, value in changes if when <= STEPS]
    p0s, grads = scenario_inputs()
    mine, _ = run(_Torch(), name, kwargs, changes, p0s, grads, lambda p: p.detach().numpy())
    want, _ = run(_Numpy(), name, kwargs, changes, p0s, grads, lambda p: p)
    for t, (a, b) in enumerate(zip(mine, want)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y, f"{name} step {t + 1} param {i}")


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_the_same_run(name):
    kwargs = spec.find_class(name).cases[-1]
    p0s, grads = scenario_inputs(3)
    make = _Torch()
    straight, _ = run(make, name, kwargs, [], p0s, grads, lambda p: p.detach().numpy())
    params = make(p0s)
    opt = getattr(ft, name)([{"params": params[:2]}, {"params": params[2:], "lr": 0.002}],
                            **kwargs)
    for gs in grads[:5]:
        make.step(opt, params, gs)
    saved = opt.state_dict()
    assert set(saved["state"][0]) == spec.state_keys(name, kwargs)
    assert saved["state"][0]["step"].dtype == torch.float32  # torch.optim's layout
    again = getattr(ft, name)([{"params": params[:2]}, {"params": params[2:]}], **kwargs)
    again.load_state_dict(saved)
    assert again.param_groups[1]["lr"] == 0.002
    for gs in grads[5:]:
        make.step(again, params, gs)
    for x, y in zip(params, straight[-1]):
        np.testing.assert_array_equal(x.detach().numpy(), y)


@pytest.mark.parametrize("name", NAMES)
def test_constructor_is_the_numpy_ones_without_fastopts_own_options(name):
    numpy_sig = inspect.signature(getattr(fastopt, name))
    want = [p for p in numpy_sig.parameters.values() if p.name not in spec.COMMON_KEYWORDS]
    assert [p.name for p in want[-6:]] == list(spec.OPTION_KEYWORDS)
    assert list(inspect.signature(getattr(ft, name)).parameters.values()) == want
    assert issubclass(getattr(ft, name), torch.optim.Optimizer)
    p = torch.zeros(3, requires_grad=True)
    for key, kind in spec.option_kinds(name).items():
        if kind in ("nonneg", "positive"):
            with pytest.raises(ValueError, match=key):
                getattr(ft, name)([p], **{key: -1.0})
    with pytest.raises(TypeError):
        getattr(ft, name)([p], backend="numpy")


@pytest.mark.parametrize("name", NAMES)
def test_a_scheduler_drives_the_learning_rate(name):
    p = torch.ones(4, requires_grad=True)
    opt = getattr(ft, name)([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    moves = []
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.ones(4)
        opt.step()
        sched.step()
        moves.append(float((before - p.detach()).abs().max()))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)
    assert moves[0] > moves[1] > moves[2] > 0
