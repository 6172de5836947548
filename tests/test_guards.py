"""The step guards (fastopt/optim/guards.py): max_grad_norm and ema_decay.

Clipping inside the step must equal fastopt.clip_grad_norm then the step (bit
for bit: the same norm pass, the same coefficient, one rounding of g * coef),
and torch.nn.utils.clip_grad_norm_ then torch's step; the weight average must
equal AveragedModel(get_ema_multi_avg_fn). The caller's gradients are never
written. Every registry class is swept.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fastopt
from fastopt.optim import guards

import spec  # tests/spec.py

DENSE = [(cid, cls, kw) for cid, cls, kw in spec.optimizer_cases()
         if not spec.find_class(cls.__name__).sparse_only]
SHAPES = [(7,), (3, 5), (33,)]


def _problem(dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    # every other step far above the threshold: some steps clipped, some not
    grads = [[(rng.standard_normal(s) * (30.0 if t % 2 else 0.05)).astype(dtype)
              for s in SHAPES] for t in range(6)]
    return params, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cid, cls, kwargs", DENSE, ids=[c[0] for c in DENSE])
def test_clipping_in_the_step_equals_clip_grad_norm_then_the_step(cid, cls, kwargs, dtype):
    params, grads = _problem(dtype)
    mine = [p.copy() for p in params]
    theirs = [p.copy() for p in params]
    opt = cls(mine, **kwargs, max_grad_norm=1.0)
    ref = cls(theirs, **kwargs)
    clipped = 0
    for step in grads:
        before = [g.copy() for g in step]
        opt.step(step)
        assert all(np.array_equal(g, b) for g, b in zip(step, before)), "a gradient changed"
        copies = [g.copy() for g in step]
        norm = fastopt.clip_grad_norm(copies, 1.0)
        ref.step(copies)
        assert opt.last_grad_norm == norm
        clipped += norm > 1.0
    assert 0 < clipped < len(grads)
    for a, b in zip(mine, theirs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cid, cls, kwargs", DENSE, ids=[c[0] for c in DENSE])
def test_numpy_backend_clips_and_averages_as_the_kernels_do(cid, cls, kwargs):
    params, grads = _problem(np.float64, seed=1)
    runs = []
    for backend in ("cython", "numpy"):
        ps = [p.copy() for p in params]
        opt = cls(ps, **kwargs, backend=backend, max_grad_norm=0.5, ema_decay=0.8)
        for step in grads:
            opt.step(step)
        runs.append((ps, opt.ema_params(), opt.last_grad_norm))
    (p1, e1, n1), (p2, e2, n2) = runs
    assert n1 == n2
    for a, b in zip(p1 + e1, p2 + e2):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_average_is_a_copy_then_a_lerp_of_every_parameter(dtype):
    params, grads = _problem(dtype, seed=2)
    ps = [p.copy() for p in params]
    opt = fastopt.SGD(ps, lr=0.1, momentum=0.9, ema_decay=0.75)
    assert opt.ema_params() == [None, None, None]
    expected = None
    for t, step in enumerate(grads):
        step = [step[0], None, step[2]]  # the middle one never has a gradient
        opt.step(step)
        if expected is None:
            expected = [p.copy() for p in ps]
        else:
            w = dtype(0.25)
            expected = [e + w * (p - e) for e, p in zip(expected, ps)]  # lerp, w < 0.5
        for e, avg in zip(expected, opt.ema_params()):
            np.testing.assert_array_equal(avg, e)
    assert np.array_equal(opt.ema_params()[1], params[1])  # averaged, though never stepped


def test_averaged_swaps_in_the_averages_and_restores_on_error():
    p = np.zeros(4)
    opt = fastopt.Adam([p], lr=0.5, ema_decay=0.5)
    opt.step([np.ones(4)])
    opt.step([np.ones(4)])
    own, avg = p.copy(), opt.ema_params()[0].copy()
    assert not np.array_equal(own, avg)
    with pytest.raises(RuntimeError):
        with opt.averaged():
            np.testing.assert_array_equal(p, avg)
            raise RuntimeError("evaluation failed")
    np.testing.assert_array_equal(p, own)
    with opt.averaged() as same:
        assert same is opt and np.array_equal(p, avg)
    np.testing.assert_array_equal(p, own)


def test_a_nan_gradient_skips_the_step_and_reports_a_nan_norm():
    p = np.ones(5)
    opt = fastopt.Adam([p], lr=0.1, max_grad_norm=1.0, ema_decay=0.9, skip_nonfinite=True)
    opt.step([np.full(5, 3.0)])
    state = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in opt.state[0].items()}
    before = p.copy()
    g = np.full(5, 3.0)
    g[2] = np.nan
    opt.step([g])
    assert math.isnan(opt.last_grad_norm) and opt.skipped_steps == 1
    np.testing.assert_array_equal(p, before)
    for k, v in opt.state[0].items():
        assert np.array_equal(v, state[k]), k  # the average too
    g[2] = np.inf
    opt.step([g])
    assert opt.last_grad_norm == math.inf and opt.skipped_steps == 2


def test_without_skipping_a_nan_norm_poisons_the_step_as_torch_does():
    p = np.ones(3)
    opt = fastopt.SGD([p], lr=0.1, max_grad_norm=1.0)
    opt.step([np.array([1.0, np.nan, 1.0])])
    assert np.isnan(p).all()  # torch: clip_coef = max_norm / (nan + 1e-6) = nan, g * nan


def test_an_infinite_norm_zeroes_the_update_as_torch_does():
    p = np.ones(3)
    opt = fastopt.SGD([p], lr=0.1, max_grad_norm=1.0)
    opt.step([np.array([1.0, np.inf, 1.0])])
    assert np.isnan(p[1]) and np.array_equal(p[[0, 2]], [1.0, 1.0])  # inf * 0 = nan


def test_the_norm_survives_squares_beyond_float64():
    p = np.zeros(3)
    opt = fastopt.SGD([p], lr=1.0, max_grad_norm=1.0)
    opt.step([np.array([3e200, 4e200, 0.0])])
    assert opt.last_grad_norm == pytest.approx(5e200, rel=1e-15)
    np.testing.assert_allclose(p, [-0.6, -0.8, 0.0], rtol=1e-12)


def test_squares_beyond_float64_beside_a_float32_param_are_not_non_finite():
    # One block of the norm pass holds both: the float64 lanes overflow to
    # inf, the float32 element after them is finite, and nothing is skipped.
    params = [np.zeros(3), np.zeros(1, np.float32)]
    opt = fastopt.SGD(params, lr=1.0, max_grad_norm=1.0, skip_nonfinite=True)
    opt.step([np.array([3e200, 4e200, 0.0]), np.ones(1, np.float32)])
    assert opt.skipped_steps == 0 and opt.last_grad_norm == pytest.approx(5e200, rel=1e-15)


def test_the_norm_and_the_step_have_the_same_bits_for_any_thread_count():
    rng = np.random.default_rng(7)
    n = 3_000_001
    start, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    results = []
    saved = fastopt.get_num_threads()
    try:
        for threads in (1, 2, 3):
            fastopt.set_num_threads(threads)
            p = start.copy()
            opt = fastopt.Adam([p], lr=0.01, max_grad_norm=10.0, ema_decay=0.9)
            opt.step([g])
            opt.step([g * 0.5])
            results.append((opt.last_grad_norm, p, opt.ema_params()[0]))
    finally:
        fastopt.set_num_threads(saved)
    for norm, p, avg in results[1:]:
        assert norm == results[0][0]
        assert np.array_equal(p, results[0][1]) and np.array_equal(avg, results[0][2])


@pytest.mark.parametrize("sizes", [[5 * 8192 + 13], [2 * 8192, 3, 3 * 8192 + 7, 100]])
def test_the_norm_has_the_same_bits_at_every_simd_level_and_in_the_reference(sizes):
    # Whole float32 blocks are summed two at a time, in explicit vectors
    # (src_c/_kernels.pxi, fastopt_sumsq_pair); each keeps its own lane order.
    from fastopt import _dispatch, reference
    from test_dispatch import RUNNABLE
    rng = np.random.default_rng(3)
    grads = [(rng.standard_normal(n) * 7).astype(np.float32) for n in sizes]
    saved = _dispatch.config()["simd_level"]
    norms = {}
    try:
        for level in RUNNABLE:
            _dispatch.select_simd(level)
            for bad in (None, np.inf, np.nan):
                g = [x.copy() for x in grads]
                if bad is not None:
                    g[0][8192 + 5] = bad    # in the second block of a pair
                opt = fastopt.SGD([np.zeros_like(x) for x in g], lr=0.1, max_grad_norm=1.0)
                opt.step(g)
                norms[level, bad] = opt.last_grad_norm
    finally:
        _dispatch.select_simd(saved)
    for level in RUNNABLE:
        assert norms[level, None] == norms[RUNNABLE[0], None], level
        assert norms[level, np.inf] == math.inf and math.isnan(norms[level, np.nan]), level
    if len(sizes) == 1:
        assert norms[RUNNABLE[0], None] == math.sqrt(reference._fixed_order_sumsq(grads[0]))


def test_checkpoints_and_state_dicts_carry_the_averages(tmp_path):
    params, grads = _problem(np.float32, seed=3)
    whole = [p.copy() for p in params]
    opt = fastopt.AdamW(whole, lr=0.01, ema_decay=0.9, max_grad_norm=1.0)
    for step in grads:
        opt.step(step)
    for how in ("state_dict", "file"):
        half = [p.copy() for p in params]
        first = fastopt.AdamW(half, lr=0.01, ema_decay=0.9, max_grad_norm=1.0)
        for step in grads[:3]:
            first.step(step)
        if how == "state_dict":
            second = fastopt.AdamW(half, lr=0.01, ema_decay=0.9, max_grad_norm=1.0)
            second.load_state_dict(first.state_dict())
        else:
            first.save(tmp_path / "opt.npz")
            second = fastopt.AdamW(half, lr=0.01, ema_decay=0.9, max_grad_norm=1.0)
            second.load(tmp_path / "opt.npz")
        for step in grads[3:]:
            second.step(step)
        for a, b in zip(second.ema_params() + half, opt.ema_params() + whole):
            np.testing.assert_array_equal(a, b)


def test_half_parameters_average_in_their_dtype():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(4)
    p = rng.standard_normal(100).astype(bf16)
    runs = []
    for backend in ("cython", "numpy"):
        q = p.copy()
        opt = fastopt.Adam([q], lr=0.01, max_grad_norm=1.0, ema_decay=0.5, backend=backend)
        for t in range(4):
            opt.step([(rng.standard_normal(100) * 5).astype(bf16)])
        assert opt.ema_params()[0].dtype == bf16
        runs.append((q.view(np.uint16).copy(), opt.ema_params()[0].view(np.uint16).copy()))
        rng = np.random.default_rng(4)
        rng.standard_normal(100)
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("kwargs, words", [
    ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ({"max_grad_norm": float("inf")}, "max_grad_norm must be finite"),
    ({"max_grad_norm": "1"}, "max_grad_norm"),
    ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
    ({"ema_decay": -0.1}, "ema_decay"),
])
def test_bad_guard_options_are_refused_naming_them(kwargs, words):
    with pytest.raises((TypeError, ValueError), match=words):
        fastopt.Adam([np.zeros(3)], **kwargs)


def test_a_bad_average_in_the_state_fails_the_step_before_anything_changes():
    p, q = np.ones(3), np.ones(2)
    opt = fastopt.Adam([p, q], lr=0.1, ema_decay=0.9)
    opt.step([np.ones(3), np.ones(2)])
    opt.state[1][guards.EMA] = np.zeros(2, np.float32)  # the wrong dtype
    before = p.copy(), dict(opt.state[0])
    with pytest.raises(TypeError, match=r"state\[1\]\['ema_param'\].*float64"):
        opt.step([np.ones(3), None])  # (q has no gradient: its average is still checked)
    assert np.array_equal(p, before[0]) and int(opt.state[0]["step"]) == 1


def _warm(n_params=4, steps=3):
    """An Adam with ema_decay past its first steps: the averages' checks are cached."""
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(5) for _ in range(n_params)]
    opt = fastopt.Adam(params, lr=0.1, max_grad_norm=1.0, ema_decay=0.9)
    grads = [rng.standard_normal(5) for _ in range(n_params)]
    for _ in range(steps):
        opt.step(grads)
    assert opt.__dict__.get("_ema_cache") is not None  # the path under test
    return opt, params, grads


def _unchanged(opt, params, action, error, match):
    before = ([p.copy() for p in params], [a.copy() for a in opt.ema_params()],
              [int(opt.state[i]["step"]) for i in range(len(params))])
    with pytest.raises(error, match=match):
        action()
    assert all(np.array_equal(a, b) for a, b in zip(params, before[0]))
    assert all(np.array_equal(a, b) for a, b in zip(opt.ema_params(), before[1]))
    assert [int(opt.state[i]["step"]) for i in range(len(params))] == before[2]


def test_a_gradient_sharing_an_average_is_refused_on_a_cached_step():
    opt, params, grads = _warm()
    alias = list(grads)
    alias[2] = opt.ema_params()[0]   # the average the step writes
    _unchanged(opt, params, lambda: opt.step(alias), ValueError, "shares memory")


def test_an_average_swapped_for_a_view_of_a_parameter_is_refused():
    opt, params, grads = _warm()
    opt.state[1][guards.EMA] = params[3]   # an edit: the cache is not trusted
    _unchanged(opt, params, lambda: opt.step(grads), ValueError, "shares memory")


def _read_only(a):
    a.flags.writeable = False


def _reshaped(a):
    a.shape = (5, 1)


def _retyped(a):
    a.dtype = np.int64


@pytest.mark.parametrize("edit", [_read_only, _reshaped, _retyped],
                         ids=["read-only", "reshaped", "retyped"])
def test_an_average_changed_in_place_is_refused_on_a_cached_step(edit):
    """An array can change without an edit of the state: the cached step sees it too."""
    opt, params, grads = _warm()
    edit(opt.state[0][guards.EMA])
    before = [p.copy() for p in params]
    with pytest.raises((TypeError, ValueError), match=r"state\[0\]\['ema_param'\]"):
        opt.step(grads)
    assert all(np.array_equal(a, b) for a, b in zip(params, before))


def test_after_switching_to_the_numpy_backend_the_averages_are_numpys(monkeypatch):
    opt, params, grads = _warm()
    opt.backend = "numpy"
    calls = []
    monkeypatch.setattr(guards, "run_average", lambda *a: calls.append(a))
    opt.step(grads)
    assert calls == []   # the cached C pass is not used


def test_a_replaced_parameter_is_averaged_from_its_new_memory():
    opt, params, grads = _warm()
    fresh = np.full(5, 7.0)
    opt.param_groups[0]["params"][0] = fresh   # not a state edit: the identity check sees it
    avg = opt.ema_params()[0].copy()
    opt.step(grads)
    assert np.allclose(opt.ema_params()[0], avg + 0.1 * (fresh - avg))


@pytest.mark.parametrize("copy", ["deepcopy", "load_state_dict"])
def test_a_copy_or_a_reload_averages_as_the_original(copy):
    import copy as copy_module
    opt, params, grads = _warm()
    if copy == "deepcopy":
        other = copy_module.deepcopy(opt)
        other_params = [p for g in other.param_groups for p in g["params"]]
    else:
        other_params = [p.copy() for p in params]
        other = fastopt.Adam(other_params, lr=0.1, max_grad_norm=1.0, ema_decay=0.9)
        other.load_state_dict(copy_module.deepcopy(opt.state_dict()))
    for _ in range(2):
        opt.step(grads)
        other.step(grads)
    for a, b in zip(opt.ema_params() + params, other.ema_params() + other_params):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cls, kwargs", [(fastopt.Adam, {"weight_decay": 0.1}),
                                         (fastopt.SGD, {"momentum": 0.9}),
                                         (fastopt.Lamb, {}), (fastopt.Adafactor, {})],
                         ids=["adam", "sgd", "lamb-reducing", "adafactor-slotwise"])
def test_the_average_fused_into_the_update_has_the_bits_of_its_own_pass(
        cls, kwargs, threads, monkeypatch):
    """From the third step the kernels move each block of an average right after
    the block of the update (Slot.avg; a reducing or slotwise rule in a pass
    after it): the same bits as the separate pass, at any thread count."""
    from fastopt.optim.optimizer import Optimizer
    rng = np.random.default_rng(3)
    shapes = [(100_003,), (37, 29), (4096,), (1,)]     # odd sizes, past a 2048 block
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(5)]
    fused_calls = []
    real = Optimizer._fuse_averages

    def recording(self, plan):
        if not getattr(self, "_record", False):
            return ()   # the reference: the averages in their own pass
        out = real(self, plan)
        fused_calls.append(bool(out))
        return out

    monkeypatch.setattr(Optimizer, "_fuse_averages", recording)
    before = fastopt.get_num_threads()
    fastopt.set_num_threads(threads)
    try:
        results = []
        for record in (True, False):
            params = [p.copy() for p in start]
            opt = cls(params, lr=1e-2, max_grad_norm=5.0, ema_decay=0.9, **kwargs)
            object.__setattr__(opt, "_record", record)
            for g in grads:
                opt.step(g)
            results.append(params + [a.copy() for a in opt.ema_params()])
    finally:
        fastopt.set_num_threads(before)
    assert fused_calls[2:] == [True] * 3, fused_calls   # steps 3-5 fused
    for a, b in zip(*results):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_ema_params_without_ema_decay_is_an_error():
    with pytest.raises(ValueError, match="ema_decay"):
        fastopt.SGD([np.zeros(2)], lr=0.1).ema_params()


def test_clipping_refuses_sparse_rows():
    table = np.zeros((5, 2))
    opt = fastopt.SGD([table], lr=0.1, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="dense gradients only"):
        opt.step([fastopt.SparseRows([1], np.ones((1, 2)))])
    assert not table.any()


def test_the_average_follows_sparse_row_steps():
    table = np.zeros((5, 2))
    opt = fastopt.Adagrad([table], lr=0.1, ema_decay=0.5)
    for _ in range(3):
        opt.step([fastopt.SparseRows([1, 3], np.ones((2, 2)))])
    assert opt.ema_params()[0][1, 0] != 0 and not opt.ema_params()[0][0].any()


@settings(max_examples=60, deadline=None, database=None)
@given(norm=st.floats(0.0, 1e3), max_norm=st.floats(0.0, 1e3),
       decay=st.floats(0.0, 0.999), n=st.integers(1, 50), seed=st.integers(0, 2 ** 16))
def test_property_clip_and_average_equal_their_definitions(norm, max_norm, decay, n, seed):
    """For any scale of gradient, threshold and decay: the step is the step of
    ``g * min(1, max_norm / (|g| + 1e-6))`` and the average its definition."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(n)
    g *= norm / max(np.linalg.norm(g), 1e-300)
    p0 = rng.standard_normal(n)
    p, ref = p0.copy(), p0.copy()
    opt = fastopt.SGD([p], lr=0.1, max_grad_norm=max_norm, ema_decay=decay)
    opt.step([g])
    opt.step([g])
    true_norm = fastopt.grad_norm([g])
    coef = guards.coefficient(true_norm, max_norm)
    assert opt.last_grad_norm == true_norm
    assert coef <= 1.0 and (coef == 1.0 or coef == pytest.approx(max_norm / (true_norm + 1e-6)))
    ref -= 0.1 * (g * coef)
    first = ref.copy()
    ref -= 0.1 * (g * coef)
    np.testing.assert_array_equal(p, ref)
    w = 1.0 - decay
    avg = first + w * (ref - first) if w < 0.5 else ref - (ref - first) * (1 - w)
    np.testing.assert_array_equal(opt.ema_params()[0], avg)


# ------------------------------------------------------------ fastopt.torch

TORCH_CASES = [(cid, kw) for cid, cls, kw in DENSE if cls.__name__ in spec.torch_class_names()]


def _torch_model(torch):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(),
                               torch.nn.Linear(12, 1)).double()


@pytest.mark.parametrize("cid, kwargs", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_fastopt_torch_equals_clip_grad_norm_then_step_then_averaged_model(cid, kwargs):
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    name = cid.split("-")[0]
    a, b = _torch_model(torch), _torch_model(torch)
    mine = getattr(ft, name)(a.parameters(), **kwargs, max_grad_norm=0.5, ema_decay=0.9)
    theirs = getattr(torch.optim, name)(b.parameters(), **kwargs, foreach=False)
    ema = AveragedModel(b, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(32, 6, generator=gen).double(), torch.randn(32, 1, generator=gen).double()
    norms = []
    for t in range(8):
        for model, opt in ((a, mine), (b, theirs)):
            opt.zero_grad()
            (((model(X) - y) ** 2).mean() * (40.0 if t % 2 else 0.01)).backward()
        grads = [p.grad.clone() for p in a.parameters()]
        mine.step()
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, a.parameters()))
        norms.append(float(torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)))
        theirs.step()
        ema.update_parameters(b)
        assert mine.last_grad_norm == pytest.approx(norms[-1], rel=1e-12)
    assert min(norms) < 0.5 < max(norms)
    for p, q in zip(list(a.parameters()) + mine.ema_params(),
                    list(b.parameters()) + list(ema.module.parameters())):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)
    with mine.averaged():
        for p, q in zip(a.parameters(), ema.module.parameters()):
            assert torch.equal(p, q.detach()) or torch.allclose(p, q, rtol=1e-10, atol=1e-12)
    assert "ema_param" in mine.state_dict()["state"][0]


def test_fastopt_torch_bf16_model_clips_and_averages():
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    model = _torch_model(torch).to(torch.bfloat16)
    opt = ft.AdamW(model.parameters(), lr=0.01, max_grad_norm=1.0, ema_decay=0.9)
    X = torch.randn(16, 6, dtype=torch.bfloat16)
    for _ in range(3):
        opt.zero_grad()
        (model(X) ** 2).mean().mul(100).backward()
        opt.step()
    want = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    assert opt.last_grad_norm == pytest.approx(want, rel=1e-12)
    assert all(e.dtype == torch.bfloat16 for e in opt.ema_params())


def test_fastopt_torch_guards_on_strided_params():
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    base = torch.randn(6, 4, dtype=torch.float64)
    p = torch.nn.Parameter(torch.empty_strided((6, 4), (1, 6), dtype=torch.float64).copy_(base))
    q = torch.nn.Parameter(base.clone())
    a = ft.Adam([p], lr=0.1, max_grad_norm=0.1, ema_decay=0.5)
    b = ft.Adam([q], lr=0.1, max_grad_norm=0.1, ema_decay=0.5)
    for t in range(3):
        g = torch.full((6, 4), float(t + 1), dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(p.detach(), q.detach())
    assert torch.equal(a.ema_params()[0], b.ema_params()[0])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_fastopt_torch_copies_keep_the_guards_and_the_precision(how):
    """torch's Optimizer.__getstate__ keeps defaults, state and param_groups only:
    fastopt.torch's copies also carry its options, so a copy steps as the original."""
    import copy
    import pickle
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))]
    params[0].grad = torch.randn(5, dtype=torch.bfloat16) * 10
    opt = ft.Adam(params, lr=0.1, max_grad_norm=1.0, ema_decay=0.9, state_dtype="float32")
    opt.step()
    opt.step()
    other = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert (other.max_grad_norm, other.ema_decay, other.last_grad_norm) == (
        1.0, 0.9, opt.last_grad_norm)
    assert other._fastopt_precision == opt._fastopt_precision
    copied = [p for g in other.param_groups for p in g["params"]]
    copied[0].grad = params[0].grad.clone()
    opt.step()
    other.step()
    assert torch.equal(copied[0], params[0])
    assert torch.equal(other.ema_params()[0], opt.ema_params()[0])
    assert other.state[copied[0]]["exp_avg"].dtype == torch.float32
