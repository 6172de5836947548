"""fastopt.torch: torch.optim subclasses stepped by fastopt's kernels."""
import copy
import inspect

import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402

import spec  # noqa: E402  (tests/spec.py: tests/ is on sys.path under pytest)

#: (id, class name, kwargs): every class's cases; each runs against torch.optim.<its torch name>
CASES = [(cid, c.name, kwargs) for cid, c, kwargs in spec.torch_class_cases()]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # of the total change (docs/numerics.rst)


def torch_class(name):
    """torch.optim's counterpart of fastopt.torch.<name> (tests/spec.py)."""
    return getattr(torch.optim, spec.find_class(name).torch)


def tensors(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(37, dtype=dtype, generator=gen), torch.randn(3, 4, dtype=dtype, generator=gen)]


def run_pair(name, kwargs, dtype, steps=40, groups=False):
    start = tensors(dtype)
    mine = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    make = (lambda ps: [{"params": ps[:1]}, {"params": ps[1:], "lr": kwargs.get("lr", 0.01) / 3}]) \
        if groups else (lambda ps: ps)
    a = getattr(ft, name)(make(mine), **kwargs)
    b = torch_class(name)(make(theirs), foreach=False, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for x, y in zip(mine, theirs):
            g = torch.randn(x.shape, dtype=dtype, generator=gen)
            x.grad, y.grad = g.clone(), g.clone()
        if step % 7 == 3:
            mine[1].grad = theirs[1].grad = None
        if step == 20:
            for opt in (a, b):
                opt.param_groups[0]["lr"] *= 0.5
        a.step()
        b.step()
    return start, mine, theirs, a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=spec.case_id)
def test_trajectories_match_torch(case, dtype):
    start, mine, theirs, a, b = run_pair(*case[1:], dtype, groups=True)
    for p0, x, y in zip(start, mine, theirs):
        x, y = x.detach(), y.detach()
        scale = float((y - p0).abs().max())
        assert float((x - y).abs().max()) <= RTOL[dtype] * scale
    # state in torch's layout: same keys, dtypes, and close values
    for p, q in zip(mine, theirs):
        sa, sb = a.state[p], b.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape


@pytest.mark.parametrize("case", CASES, ids=spec.case_id)
def test_state_dict_loads_both_ways(case):
    _, name, kwargs = case
    start, mine, theirs, a, b = run_pair(name, kwargs, torch.float64, steps=10)
    # fastopt -> torch and torch -> fastopt, then one more identical step each
    into_torch = torch_class(name)([p.detach().clone().requires_grad_() for p in mine],
                                   foreach=False, **kwargs)
    saved = a.state_dict()
    into_torch.load_state_dict(copy.deepcopy(saved))
    # torch.optim's load_state_dict casts floating state to the parameter's dtype,
    # per-parameter scalars too: NAdam's float32 mu_product turns float64, and a
    # reloaded torch.optim.NAdam then rounds differently from the run it came from
    # (torch's own save and load does the same). Keep them as they were saved.
    for i, p in enumerate(into_torch.param_groups[0]["params"]):
        for key in spec.carried(name):
            into_torch.state[p][key] = into_torch.state[p][key].to(saved["state"][i][key].dtype)
    into_fastopt = getattr(ft, name)([p.detach().clone().requires_grad_() for p in theirs], **kwargs)
    into_fastopt.load_state_dict(copy.deepcopy(b.state_dict()))
    for opt in (into_torch, into_fastopt, a, b):
        for p in (q for g in opt.param_groups for q in g["params"]):
            p.grad = torch.ones_like(p)
        opt.step()
    for x, y in zip(a.param_groups[0]["params"], into_torch.param_groups[0]["params"]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    for x, y in zip(b.param_groups[0]["params"], into_fastopt.param_groups[0]["params"]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_updates_the_parameter_memory_in_place():
    model = torch.nn.Linear(5, 3)
    addresses = [p.data_ptr() for p in model.parameters()]
    opt = ft.Adam(model.parameters(), lr=0.1)
    model(torch.randn(8, 5)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert [p.data_ptr() for p in model.parameters()] == addresses
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_scheduler_zero_grad_and_closure():
    model = torch.nn.Linear(4, 1)
    opt = ft.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    X, y = torch.randn(16, 4), torch.randn(16, 1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), y)
        loss.backward()
        return loss
    losses = []
    for _ in range(3):
        losses.append(float(opt.step(closure)))
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5 ** 3
    assert losses[-1] < losses[0]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("make, message", [
    (lambda: torch.zeros(4, dtype=torch.int32),
     "float32, float64, float16, bfloat16, complex64 or complex128"),
    (lambda: torch.zeros(4, device="meta", requires_grad=True), "is on meta"),
])
def test_parameters_fastopt_cannot_serve_are_refused(make, message):
    p = make()
    ok = torch.zeros(3, requires_grad=True)
    opt = ft.Adam([ok, p])
    ok.grad = torch.ones(3)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*" + message):
        opt.step()
    assert torch.equal(ok, torch.zeros(3)) and len(opt.state) == 0  # nothing changed


def test_sparse_grads_are_refused_where_fastopt_cannot_take_them():
    # (rows of a sparse gradient, for the rules that take them: tests/test_sparse.py)
    p = torch.zeros(5, requires_grad=True)
    p.grad = torch.zeros(5).to_sparse()
    with pytest.raises(TypeError, match="is sparse, but Adam takes dense gradients only"):
        ft.Adam([p]).step()
    q = torch.zeros(2, 3, dtype=torch.bfloat16, requires_grad=True)
    q.grad = torch.ones(2, 3, dtype=torch.bfloat16).to_sparse()  # rows of half params: not yet
    with pytest.raises(ValueError, match="float32 or float64 CPU tensors only"):
        ft.SGD([q], lr=0.1).step()
    assert not p.any() and not q.any()


# ------------------------------------------------------------- fast path
# From the second step, fastopt.torch steps in C (_fastpath.tensor_step) while
# nothing but the gradients changed; these pin what it must notice.

def warm_pair(name="Adam", steps=2, **kwargs):
    """(fastopt opt, torch opt, their params): the same two-tensor model, stepped."""
    start = tensors(torch.float64)
    mine = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    a = getattr(ft, name)(mine, lr=0.1, **kwargs)
    b = torch_class(name)(theirs, lr=0.1, foreach=False, **kwargs)
    for k in range(steps):
        step_both(a, b, mine, theirs, seed=k)
    return a, b, mine, theirs


def step_both(a, b, mine, theirs, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    for x, y in zip(mine, theirs):
        g = torch.randn(x.shape, dtype=x.dtype, generator=gen)
        x.grad, y.grad = g.clone(), g.clone()
    a.step()
    b.step()


def assert_same(mine, theirs):
    for x, y in zip(mine, theirs):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_fast_path_is_taken_and_matches_torch():
    from fastopt import _fastpath
    a, b, mine, theirs = warm_pair()
    fast = a._fastopt_fast
    assert fast is not None
    calls = []
    original = _fastpath.tensor_step

    def spy(*args):
        calls.append(original(*args))
        return calls[-1]
    _fastpath.tensor_step = spy
    try:
        for k in range(5):
            step_both(a, b, mine, theirs, seed=10 + k)
    finally:
        _fastpath.tensor_step = original
    assert calls == [_fastpath.DONE] * 5
    assert_same(mine, theirs)
    assert float(a.state[mine[0]]["step"]) == float(b.state[theirs[0]]["step"]) == 7


@pytest.mark.parametrize("change", ["param.data", "state dict", "state tensor", "lr",
                                    "momentum on", "new params list", "grad None"])
def test_fast_path_notices_changes(change):
    a, b, mine, theirs = warm_pair("SGD" if change == "momentum on" else "Adam")
    if change == "param.data":  # e.g. ZeroRedundancyOptimizer's bucket views
        for x, y in ((mine[0], theirs[0]),):
            x.data = x.detach().clone()
            y.data = y.detach().clone()
    elif change == "state dict":
        a.state[mine[1]] = {}
        b.state[theirs[1]] = {}
    elif change == "state tensor":
        for opt, p in ((a, mine[0]), (b, theirs[0])):
            opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].clone() * 0.5
    elif change == "lr":
        for opt in (a, b):
            opt.param_groups[0]["lr"] = 0.03
    elif change == "momentum on":  # a state buffer comes into use
        for opt in (a, b):
            opt.param_groups[0]["momentum"] = 0.9
    elif change == "new params list":
        a.param_groups[0]["params"] = list(a.param_groups[0]["params"])
    for k in range(3):
        step_both(a, b, mine, theirs, seed=20 + k)
        if change == "grad None" and k == 0:
            for x, y in zip(mine[1:], theirs[1:]):
                x.grad = y.grad = None
    assert_same(mine, theirs)
    if change == "param.data":
        assert a._fastopt_fast is not None  # gathered again, at the new memory


def test_fast_path_refuses_what_the_general_path_refuses():
    a, _, mine, _ = warm_pair()
    snapshot = [p.detach().clone() for p in mine]
    state = copy.deepcopy(a.state_dict())
    bad = {
        "dense gradients only": (TypeError, lambda: torch.zeros(
            mine[1].shape, dtype=torch.float64).to_sparse(1)),
        "shares memory with": (ValueError, lambda: mine[0].detach()[:12].view(3, 4)),
        "shares memory with ": (ValueError,
                                lambda: a.state[mine[0]]["exp_avg_sq"][:12].view(3, 4)),
    }
    for message, (error, make) in bad.items():
        mine[0].grad = torch.ones_like(mine[0])
        mine[1].grad = make()
        with pytest.raises(error, match=message.strip()):
            a.step()
        assert all(torch.equal(p, q) for p, q in zip(mine, snapshot)), message
        assert float(a.state[mine[0]]["step"]) == state["state"][0]["step"]


def test_unsupported_torch_options_are_refused():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="capturable=True"):
        ft.Adam([p], capturable=True).step()


@pytest.mark.parametrize("name", spec.torch_class_names())
def test_a_differentiable_optimizer_is_torch_optims_own_step(name):
    """Gradients flow through the updates back to the start, as with torch.optim
    (and where torch's own differentiable step cannot do it, fastopt fails alike)."""
    def run(cls):
        w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
        p = w * 1.0  # a non-leaf parameter, as in meta-learning
        opt = cls([p], lr=0.1, differentiable=True)
        for _ in range(3):
            p.grad = 2 * p  # part of the graph: d(step)/dw includes it
            opt.step()
        (g,) = torch.autograd.grad(p.square().sum(), w)
        return p.detach().clone(), g
    if "differentiable" not in inspect.signature(torch_class(name)).parameters:
        for cls in (torch_class(name), getattr(ft, name)):  # (Adafactor): neither takes it
            with pytest.raises(TypeError, match="differentiable"):
                cls([torch.zeros(2, requires_grad=True)], differentiable=True)
        return
    try:
        theirs = run(torch_class(name))
    except RuntimeError as error:  # torch.optim.Adamax: an in-place lerp autograd needs
        with pytest.raises(RuntimeError, match=str(error).split(":")[0]):
            run(getattr(ft, name))
        return
    torch.testing.assert_close(run(getattr(ft, name)), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("name", spec.torch_class_names())
def test_warm_path_follows_state_tensors_given_new_storage(name):
    # t.data = ... keeps the state's tensor objects but moves their memory: the
    # warm path must notice (it once wrote into the freed storage)
    results = []
    for general in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3))
        opt = getattr(ft, name)([p])
        for _ in range(2):
            p.grad = torch.randn(4, 3)
            opt.step()
        for key, t in opt.state[p].items():
            if key != "step" and t.numel() > 1:
                t.data = torch.full_like(t, 0.25)
        for _ in range(2):
            if general:
                opt._fastopt_fast = None
            p.grad = torch.randn(4, 3)
            opt.step()
        results.append([p.detach().clone()] + [t.clone() for t in opt.state[p].values()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_rprop_takes_an_infinite_etaplus_as_torch_does():
    results = []
    for cls in (torch.optim.Rprop, ft.Rprop):
        p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        opt = cls([p], etas=(0.5, float("inf")))
        for g in ([1.0, -1.0, 0.0], [1.0, -1.0, 0.0]):
            p.grad = torch.tensor(g)
            opt.step()
        results.append((p.detach().clone(), opt.state[p]["step_size"].clone()))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_is_a_torch_optimizer():
    p = torch.zeros(3, requires_grad=True)
    for name in spec.torch_class_names():
        opt = getattr(ft, name)([p])
        assert isinstance(opt, torch_class(name))


def test_bench_torch_runs_and_checks():
    from fastopt.bench_torch import format_rows, run_torch
    rows = run_torch(budget_s=0.05)
    assert [label.split(",")[0] for label, _ in rows] == ["optimizer step", "training step"]
    assert "fastopt vs best fused" in format_rows(rows)


def parity_table():
    """Max deviation from torch.optim per case, relative to the total change (f32, f64)."""
    rows = []
    for case in CASES:
        worst = []
        for dtype in (torch.float32, torch.float64):
            start, mine, theirs, _, _ = run_pair(*case[1:], dtype, groups=True)
            change = max(float((y - s).abs().max()) for y, s in zip(theirs, start))
            worst.append(max(float((x - y).abs().max()) for x, y in zip(mine, theirs)) / change)
        rows.append(f"{spec.case_id(case):78s} f32 {worst[0]:.1e}  f64 {worst[1]:.1e}")
    return "\n".join(rows)


if __name__ == "__main__":  # python tests/test_torch.py
    print(parity_table())


def tensor_lr_pair(name, make_scheduler, steps=12, **kwargs):
    """fastopt.torch and torch.optim with a tensor lr a scheduler moves in place."""
    params = {}
    for which in ("mine", "theirs"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        cls = getattr(ft, name) if which == "mine" else torch_class(name)
        opt = cls(model.parameters(), lr=torch.tensor(0.05), **kwargs)
        schedule = make_scheduler(opt)
        x = torch.linspace(-1, 1, 32).reshape(8, 4)
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            schedule.step()
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # still the caller's tensor
        params[which] = [t.detach().clone() for t in model.parameters()]
    return params["mine"], params["theirs"]


@pytest.mark.parametrize("name", spec.torch_class_names())
def test_a_tensor_lr_moved_by_a_scheduler_in_place_is_read_every_step(name):
    def schedule(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    mine, theirs = tensor_lr_pair(name, schedule)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_in_place_lr_write_reaches_the_fast_path():
    a, b, mine, theirs = warm_pair("Adam")
    for opt in (a, b):
        opt.param_groups[0]["lr"] = torch.tensor(0.01, dtype=torch.float64)  # as the params
    step_both(a, b, mine, theirs, seed=30)
    for opt in (a, b):
        opt.param_groups[0]["lr"].fill_(0.2)  # same object, new value
    for k in range(3):
        step_both(a, b, mine, theirs, seed=31 + k)
    assert a._fastopt_fast is not None
    assert_same(mine, theirs)


def test_tensor_betas_are_read_as_their_values():
    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    betas = (torch.tensor(0.8), torch.tensor(0.99))
    mine, theirs = tensor_lr_pair("Adam", schedule, betas=betas)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_tensor_lr_that_is_not_one_number_is_refused_before_anything_changes():
    model = torch.nn.Linear(2, 1)
    opt = ft.SGD(model.parameters(), lr=torch.tensor(0.1))
    opt.param_groups[0]["lr"] = torch.tensor([0.1, 0.2])
    model(torch.ones(1, 2)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"lr must be a number or a one-element real CPU tensor, "
                                         r"got a torch.strided torch.float32 tensor of shape \(2,\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------- layouts and complex

def _layouts(dtype):
    """(label, make parameter, make gradient for it): every layout a model can hand over."""
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype)
    return [
        ("channels_last", lambda: randn(4, 3, 5, 5).to(memory_format=torch.channels_last), None),
        ("transposed", lambda: randn(6, 7).t(), None),
        ("gaps", lambda: randn(10, 5, 2)[..., 0], None),
        ("strided grad", lambda: randn(6, 7), lambda p: randn(7, 6).t()),
        ("contiguous grad of channels_last",
         lambda: randn(2, 3, 4, 4).to(memory_format=torch.channels_last),
         lambda p: randn(*p.shape)),
    ]


def _step_layout_pair(name, make_p, make_g, dtype, steps=6, **kwargs):
    """fastopt.torch and torch.optim on the same parameter, each in the given layout."""
    params = []
    for _ in range(2):
        torch.manual_seed(3)
        params.append(torch.nn.Parameter(make_p()))
    mine, theirs = params
    start = theirs.detach().clone()
    a = getattr(ft, name)([mine], **kwargs)
    b = torch_class(name)([theirs], foreach=False, **kwargs)
    address, strides = mine.data_ptr(), mine.stride()
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        g = make_g(mine) if make_g else torch.empty_like(mine)
        g.copy_(torch.randn(mine.shape, dtype=mine.dtype, generator=gen))
        mine.grad, theirs.grad = g, g.clone()
        a.step()
        b.step()
    assert mine.data_ptr() == address and mine.stride() == strides  # stepped where it lives
    return start, mine.detach(), theirs.detach()


def _assert_close_to_torch(start, mine, theirs):
    real = [torch.view_as_real(t) if t.is_complex() else t for t in (start, mine, theirs)]
    scale = float((real[2] - real[0]).abs().max())
    assert float((real[1] - real[2]).abs().max()) <= RTOL[real[0].dtype] * scale


@pytest.mark.parametrize("layout", range(len(_layouts(torch.float32))),
                         ids=[label for label, _, _ in _layouts(torch.float32)])
@pytest.mark.parametrize("name", spec.torch_class_names())
def test_every_memory_layout_is_stepped_like_torch(name, layout):
    _, make_p, make_g = _layouts(torch.float64)[layout]
    _assert_close_to_torch(*_step_layout_pair(name, make_p, make_g, torch.float64))


def test_a_parameter_with_gaps_is_written_back_and_its_neighbours_left_alone():
    base = torch.randn(10, 5, 2)
    other = base[..., 1].clone()
    p = torch.nn.Parameter(base[..., 0])  # shares base's memory, every other float
    assert p.data_ptr() == base.data_ptr()
    opt = ft.Adam([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.ones(10, 5)
        opt.step()
    assert torch.equal(base[..., 0], p.detach()) and torch.equal(base[..., 1], other)
    assert not torch.equal(p.detach(), other)  # it moved


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["c64", "c128"])
@pytest.mark.parametrize("case", [c for c in CASES if spec.rule(c[1]).complex_ok],
                         ids=spec.case_id)
def test_complex_parameters_are_stepped_as_their_real_view(case, dtype):
    name, kwargs = case[1:]
    result = _step_layout_pair(name, lambda: torch.randn(7, 3, dtype=dtype), None, dtype,
                               **kwargs)
    _assert_close_to_torch(*result)


@pytest.mark.parametrize("name", [n for n in spec.torch_class_names()
                                  if not spec.rule(n).complex_ok])
def test_complex_parameters_are_refused_with_torchs_error(name):
    # torch.optim.Adafactor raises this RuntimeError at its step; so does fastopt's,
    # before anything changes (the real parameter of the same step stays put)
    errors = []
    for cls in (torch_class(name), getattr(ft, name)):
        real = torch.ones(3, 2, requires_grad=True)
        z = torch.zeros(4, dtype=torch.complex64, requires_grad=True)
        opt = cls([real, z])
        real.grad, z.grad = torch.ones_like(real), torch.ones_like(z)
        with pytest.raises(RuntimeError) as info:
            opt.step()
        errors.append(str(info.value))
        if cls is not torch_class(name):
            assert torch.equal(real.detach(), torch.ones(3, 2)) and not opt.state
    assert errors[0] == errors[1]


def test_fused_params_on_another_device_raise_torchs_error_then_work_on_the_cpu():
    with torch.device("meta"):
        model = torch.nn.Linear(2, 3)
    opt = ft.Adam(model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating "
                                           "point Tensors of supported devices: \\['cpu'\\]"):
        opt.step()
    assert not opt.state  # nothing changed
    # torch's test goes on like this: the optimizer's (meta) params have no
    # gradient any more, so the step skips them.
    opt.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    opt.step()


def test_values_written_after_construction_are_checked_for_kind_only_as_in_torch():
    """torch checks ranges in the constructor; a scheduler's beta1 of 22 is the caller's business."""
    results = []
    for cls in (ft.Adam, torch.optim.Adam):
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
        opt = cls([p], lr=0.1)
        opt.param_groups[0]["betas"] = (22.0, 0.999)
        for _ in range(3):
            p.grad = 2 * p.detach()
            opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=0)
    opt = ft.Adam([torch.nn.Parameter(torch.ones(2))])
    opt.param_groups[0]["lr"] = "fast"
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    with pytest.raises(TypeError, match=r"param_groups\[0\]: lr must be a real number, got 'fast'"):
        opt.step()
    assert not opt.state


def test_plain_sgd_keeps_no_state_entry_as_torch():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ft.SGD([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    assert dict(opt.state) == {} and torch.equal(p.detach(), torch.full((3,), 0.9))
    opt.param_groups[0]["momentum"] = 0.9  # a buffer comes into use: state from now on
    opt.step()
    assert set(opt.state[p]) == {"momentum_buffer"}


# ----------------------------------------------------- torch.amp.GradScaler

FUSED = [name for name in spec.torch_class_names() if "fused" in
         __import__("inspect").signature(torch_class(name).__init__).parameters]


def _scaled_run(cls, steps=8, overflow_at=(3,), **kwargs):
    """A float64 model trained through GradScaler; gradients overflow at ``overflow_at``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model.double()
    opt = cls(model.parameters(), lr=0.05, fused=True, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    x = torch.linspace(-1, 1, 32, dtype=torch.float64).reshape(8, 4)
    for step in range(steps):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if step in overflow_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()], opt, scaler


@pytest.mark.parametrize("name", FUSED)
def test_fused_honours_the_grad_scaler_contract(name):
    """GradScaler trusts a fused optimizer to unscale and to skip overflow steps (torch's
    CUDA-only test, run on the CPU): fastopt must land where torch's fused optimizer does."""
    mine, opt, scaler = _scaled_run(getattr(ft, name))
    theirs, ref, _ = _scaled_run(torch_class(name))
    assert opt._step_supports_amp_scaling
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]):
        for key in ref.state[q]:
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-12, atol=1e-14)
    assert scaler.get_scale() < 2.0 ** 10 * 2 ** 4  # the overflow step backed the scale off


def test_an_overflow_step_changes_nothing():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = ft.Adam([p], fused=True)
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    param_before = p.detach().clone()
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    p.grad = torch.full((3,), float("inf"), dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), param_before) and all(
        torch.equal(before[k], v) for k, v in opt.state[p].items())
    opt.found_inf = torch.tensor(0.0)
    p.grad = torch.full((3,), 8.0, dtype=torch.float64)
    opt.step()  # scale 8: the kernel sees gradients of 1
    assert float(opt.state[p]["step"]) == 2
    torch.testing.assert_close(opt.state[p]["exp_avg"], before["exp_avg"] * 0.9 + 0.1,
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", [n for n in spec.torch_class_names() if spec.carried(n)])
def test_scalar_state_rules_take_the_warm_path_with_the_general_paths_bits(name, monkeypatch):
    """NAdam's mu_product, ASGD's eta and mu: read and written in C after the first step."""
    from fastopt import _fastpath

    def make():
        gen = torch.Generator().manual_seed(3)
        return [torch.randn(37, generator=gen).requires_grad_(),
                torch.randn(3, 4, dtype=torch.float64, generator=gen).requires_grad_()]

    warm_params, cold_params = make(), make()
    kwargs = spec.find_class(name).cases[-1]
    warm, cold = getattr(ft, name)(warm_params, **kwargs), getattr(ft, name)(cold_params, **kwargs)
    done = []
    real = _fastpath.tensor_step

    def spy(*args):
        code = real(*args)
        done.append(code == _fastpath.DONE)
        return code
    monkeypatch.setattr(_fastpath, "tensor_step", spy)
    gen = torch.Generator().manual_seed(4)
    for _ in range(6):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in warm_params]
        for params in (warm_params, cold_params):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        warm.step()
        cold._fastopt_fast = None  # the general path, every step
        cold.step()
    assert done and all(done), "the warm path declined a step"
    for a, b in zip(warm_params, cold_params):
        assert torch.equal(a, b)
        for key in spec.state_keys(name, kwargs):
            assert torch.equal(warm.state[a][key], cold.state[b][key]), key
