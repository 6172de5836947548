"""pytest-benchmark suite for fastopt.torch against torch.optim on torch models.

Run with ``pytest bench/test_bench_torch.py`` (skipped without torch). Two
groups, each comparing implementations side by side: the optimizer step
alone on a model with 104 parameter tensors, and a whole training step
(forward, backward, step) of a small MLP. Each benchmark first checks its
implementation: ``CHECKED_STEPS`` steps from the same start must stay within
1e-4 of torch.optim's default implementation (fastopt.bench_torch's check).
The same cases run in ``python -m fastopt bench --torch``.
"""
import pytest

torch = pytest.importorskip("torch")
from fastopt import bench_torch as bt  # noqa: E402

IMPLEMENTATIONS = list(bt._optimizers(torch))


def _many_tensor_case(make):
    model = bt._many_tensor_model(torch)
    grads = [torch.randn_like(p, generator=torch.Generator().manual_seed(i))
             for i, p in enumerate(model.parameters())]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    return model, make(list(model.parameters())).step


def _training_case(make):
    model = bt._small_mlp(torch)
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(256, 64, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    opt = make(list(model.parameters()))

    def train_step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model, train_step


CASES = {"optimizer step, 104 tensors": _many_tensor_case,
         "training step, MLP 64-128-128-10": _training_case}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_torch_step(benchmark, case, impl):
    makers = bt._optimizers(torch)
    models, runners = {}, {}
    for name in {impl, "torch default"}:
        torch.manual_seed(0)  # the same model for both
        model, run = CASES[case](makers[name])
        models[name], runners[name] = model, bt._runner(torch, name, run)
    bt._warm_up_and_check(models, runners, case)
    benchmark.group = case
    benchmark(runners[impl])
