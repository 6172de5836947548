"""fastopt.torch against torch.optim for every configuration PyTorch's own suite uses.

PyTorch's suite (../shared/torch_suite, run by .ci/run) compares an
optimizer's ``foreach`` and ``fused`` runs with its for-loop run; with
fastopt's classes in place, that compares fastopt with itself. Here each
configuration of ``torch.testing._internal.common_optimizers``'
``optim_inputs_func`` runs on fastopt.torch and on torch.optim's own
single-tensor implementation (and, where torch has one, its fused one), side
by side, so the suite's configurations are held to torch's numbers too.
"""
import copy
import inspect

import pytest

torch = pytest.importorskip("torch")
common = pytest.importorskip("torch.testing._internal.common_optimizers")
import fastopt.torch as ft  # noqa: E402

RTOL = 1e-12  # of the total change, in float64 (docs/numerics.rst)


def configurations():
    """``(id, class name, kwargs)`` for every fastopt.torch class torch's optim_db knows."""
    out = []
    for info in common.optim_db:
        name = info.optim_cls.__name__
        if name not in ft.__all__:
            continue
        for k, optim_input in enumerate(info.optim_inputs_func(device="cpu")):
            out.append((f"{name}-{k}-{optim_input.desc}", name, optim_input.kwargs))
    return out


CONFIGS = configurations()


def _model(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(10, 5, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(10, dtype=torch.float64))]


#: torch.optim classes that take sparse gradients only (their runs get rows of one)
SPARSE_ONLY = {"SparseAdam"}


def _run(cls, kwargs, steps=12):
    params = _model()
    sparse = cls.__name__ in SPARSE_ONLY
    start = [p.detach().clone() for p in params]
    opt = cls(params, **copy.deepcopy(kwargs))  # a tensor lr is the run's own
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)
            if sparse:  # every row listed, as a sparse COO gradient (uncoalesced is fine too)
                p.grad = p.grad.to_sparse(1)
        if step % 5 == 2:
            params[1].grad = None  # a parameter without a gradient this step
        opt.step()
        scheduler.step()
    return start, [p.detach() for p in params], opt


def _assert_matches(mine, theirs, rtol=RTOL):
    (start, a, opt_a), (_, b, opt_b) = mine, theirs
    for p0, x, y in zip(start, a, b):
        scale = float((y - p0).abs().max())
        assert float((x - y).abs().max()) <= rtol * scale
    for p, q in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
        assert opt_a.state[p].keys() == opt_b.state[q].keys()


def test_the_suites_configurations_are_found():
    names = {name for _, name, _ in CONFIGS}
    # every fastopt.torch class with a torch.optim namesake (Lion and Lamb have none)
    assert names == {n for n in ft.__all__ if hasattr(torch.optim, n)}
    assert len(CONFIGS) >= 5 * len(names)


@pytest.mark.parametrize("case", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_torchs_for_loop(case):
    _, name, kwargs = case
    loop = {} if name in SPARSE_ONLY else {"foreach": False}  # (SparseAdam has one loop)
    rtol = RTOL
    if name in SPARSE_ONLY and isinstance(kwargs.get("lr"), torch.Tensor):
        # torch's SparseAdam forms lr * sqrt(bc2) / bc1 as a tensor of the lr's
        # dtype (float32 here), fastopt in double: they differ by its rounding
        rtol = 4 * torch.finfo(kwargs["lr"].dtype).eps
    _assert_matches(_run(getattr(ft, name), kwargs),
                    _run(getattr(torch.optim, name), {**kwargs, **loop}), rtol)


FUSED = [c for c in CONFIGS
         if "fused" in inspect.signature(getattr(torch.optim, c[1])).parameters]


@pytest.mark.parametrize("case", FUSED, ids=[c[0] for c in FUSED])
def test_fused_matches_torchs_fused(case):
    _, name, kwargs = case
    _assert_matches(_run(getattr(ft, name), {**kwargs, "fused": True}),
                    _run(getattr(torch.optim, name), {**kwargs, "fused": True}))
