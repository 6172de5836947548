"""Sparse-row gradients (fastopt/sparse.py, fastopt/optim/rows.py, src_c/fastpath/rows.pxi).

- SparseRows and a step's checks: clear errors, and nothing changes;
- the kernels against the NumPy twins (fastopt.reference.sparse_rows_step),
  bit for bit, over widths with odd tails, repeated and empty index lists,
  NaN/Inf, and thread counts;
- the sparse step against the dense step of the same gradient;
- fastopt.torch on nn.Embedding(sparse=True) against torch.optim;
- state_dict and checkpoint round trips.
"""
import numpy as np
import pytest

import fastopt
from fastopt import reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

#: (class, options) of every optimizer that takes sparse rows, as swept here
CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "maximize": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.5, "dampening": 0.3}),
    ("Adagrad", {"lr": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1,
                 "maximize": True}),
    ("SparseAdam", {"lr": 0.01}),
    ("SparseAdam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True}),
    ("RowWiseAdagrad", {"lr": 0.1}),
    ("RowWiseAdagrad", {"lr": 0.1, "weight_decay": 0.01, "maximize": True}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw in CASES]
DTYPES = [np.float32, np.float64]
#: the classes whose sparse step leaves unlisted rows alone under these options
LAZY = {"Adagrad", "SparseAdam", "RowWiseAdagrad"}


def lazy(name, kwargs):
    return name in LAZY or (name == "SGD" and not kwargs.get("momentum")
                            and not kwargs.get("weight_decay"))


def gradient(rng, rows, width, count, dtype, special=False):
    indices = rng.integers(0, rows, count)
    values = rng.standard_normal((count, width)).astype(dtype)
    if special and count:
        values.flat[rng.integers(0, values.size, 3)] = [np.nan, np.inf, -np.inf]
    return fastopt.SparseRows(indices, values)


def assert_same(a, b):
    np.testing.assert_array_equal(a, b)  # (bit for bit, NaN where NaN)


def run(name, kwargs, dtype, steps, rows=40, width=7, count=30, seed=0, backend="cython",
        special=False):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((rows, width)).astype(dtype)
    opt = getattr(fastopt, name)([p], backend=backend, **kwargs)
    for _ in range(steps):
        opt.step([gradient(rng, rows, width, count, dtype, special)])
    return p, opt


# ------------------------------------------------------------------ SparseRows

def test_sparse_rows_keeps_int32_and_int64_and_converts_other_integers():
    v = np.zeros((3, 2))
    assert fastopt.SparseRows(np.array([1, 2, 3], np.int32), v).indices.dtype == np.int32
    assert fastopt.SparseRows([1, 2, 3], v).indices.dtype == np.int64
    assert fastopt.SparseRows(np.array([1, 2, 3], np.uint8), v).indices.dtype == np.int64
    assert fastopt.SparseRows([], np.zeros((0, 2))).indices.shape == (0,)


@pytest.mark.parametrize("indices, values, error, words", [
    (np.array([0.0, 1.0]), np.zeros((2, 2)), TypeError, "integers"),
    (np.array([True, False]), np.zeros((2, 2)), TypeError, "integers"),
    (np.zeros((2, 1), np.int64), np.zeros((2, 2)), ValueError, "1-D"),
    ([0, 1], [[0.0, 0.0], [0.0, 0.0]], TypeError, "numpy.ndarray"),
    ([0, 1, 2], np.zeros((2, 2)), ValueError, "one row per index"),
    ([0, 1], np.array(0.0), ValueError, "one row per index"),
])
def test_sparse_rows_refuses_bad_input(indices, values, error, words):
    with pytest.raises(error, match=words):
        fastopt.SparseRows(indices, values)


def test_to_dense_adds_repeated_rows():
    g = fastopt.SparseRows([2, 0, 2], np.array([[1.0], [2.0], [3.0]]))
    assert_same(g.to_dense((4, 1)), np.array([[2.0], [0.0], [4.0], [0.0]]))


# ------------------------------------------------------------ bad input: no change

def _bad_steps():
    v = np.ones((2, 3))
    return [
        ("Adagrad", {}, (5, 3), fastopt.SparseRows([0, 5], v), ValueError, r"indices\[1\] is 5"),
        ("Adagrad", {}, (5, 3), fastopt.SparseRows([-1, 0], v), ValueError, r"indices\[0\] is -1"),
        ("SparseAdam", {}, (5, 3), fastopt.SparseRows([0, 1], np.ones((2, 4))), ValueError,
         "needs"),
        ("SparseAdam", {}, (5, 3), fastopt.SparseRows([0, 1], v.astype(np.float32)), TypeError,
         "dtype"),
        ("SGD", {}, (), fastopt.SparseRows([0, 1], v), ValueError, "0-d"),
        ("Adam", {}, (5, 3), fastopt.SparseRows([0, 1], v), TypeError, "dense gradients only"),
        ("Adagrad", {"weight_decay": 0.1}, (5, 3), fastopt.SparseRows([0, 1], v), ValueError,
         "weight_decay"),
        ("RowWiseAdagrad", {}, (5,), fastopt.SparseRows([0, 1], np.ones(2)), ValueError,
         "per row"),
        ("SparseAdam", {"state_dtype": "bfloat16"}, (5, 3), fastopt.SparseRows([0, 1], v),
         ValueError, "half-precision"),
        ("SGD", {}, (5, 3), fastopt.SparseRows([0, 1], np.ones((2, 3))[:, ::-1]), ValueError,
         "C-contiguous"),
    ]


@pytest.mark.parametrize("name, kwargs, shape, g, error, words", _bad_steps())
def test_a_bad_sparse_step_raises_and_changes_nothing(name, kwargs, shape, g, error, words):
    dtype = np.float64
    if kwargs.get("state_dtype"):  # (a policy for float32 parameters)
        pytest.importorskip("ml_dtypes")
        dtype = np.float32
        g = fastopt.SparseRows(g.indices, g.values.astype(dtype))
    rng = np.random.default_rng(0)
    p = np.asarray(rng.standard_normal(shape)).astype(dtype)
    other = rng.standard_normal(4).astype(dtype)
    opt = getattr(fastopt, name)([p, other], **kwargs)
    opt.step([np.ones_like(p), np.ones_like(other)])  # some state first
    before = p.copy(), other.copy(), {i: {k: np.copy(v) for k, v in s.items()}
                                      for i, s in opt.state.items()}
    with pytest.raises(error, match=words):
        opt.step([g, np.ones_like(other)])
    assert_same(p, before[0])
    assert_same(other, before[1])  # the dense parameter of the same step did not move either
    for i, s in opt.state.items():
        for k, v in s.items():
            assert_same(v, before[2][i][k])


def test_sparse_values_may_not_overlap_what_the_step_writes():
    p = np.zeros((6, 2))
    opt = fastopt.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="values shares memory with params"):
        opt.step([fastopt.SparseRows([0, 1], p[2:4])])
    assert not p.any()


def test_a_dense_scratch_is_cleared_after_a_refused_step():
    # SGD with momentum merges rows into a zeroed scratch; a step that raises
    # after that must leave it zeroed, or the next step would add them again
    p, q = np.zeros((6, 2)), np.zeros(3)
    opt = fastopt.SGD([p, q], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError):
        opt.step([fastopt.SparseRows([1], np.ones((1, 2))), np.ones(4)])
    opt.step([fastopt.SparseRows([2], np.ones((1, 2))), np.ones(3)])
    assert not p[1].any() and p[2].all()


# ------------------------------------------------------------ kernels vs twins

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("width", [1, 3, 17, 64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernels_equal_the_twins(case, width, dtype):
    name, kwargs = case
    for count, special in ((30, False), (0, False), (200, False), (30, True)):
        a, opt_a = run(name, kwargs, dtype, 4, width=width, count=count, special=special)
        b, opt_b = run(name, kwargs, dtype, 4, width=width, count=count, special=special,
                       backend="numpy")
        assert_same(a, b)
        for i in opt_a.state:
            for k in opt_a.state[i]:
                assert_same(opt_a.state[i][k], opt_b.state[i][k])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_bits_do_not_depend_on_the_thread_count(case):
    name, kwargs = case
    results = []
    for threads in (1, 2):
        old = fastopt.get_num_threads()
        fastopt.set_num_threads(threads)
        try:
            results.append(run(name, kwargs, np.float32, 3, rows=5000, width=64, count=8192)[0])
        finally:
            fastopt.set_num_threads(old)
    assert_same(*results)


# ------------------------------------------------------------ sparse vs dense

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("SGD", "Adagrad")],
                         ids=[i for c, i in zip(CASES, IDS) if c[0] in ("SGD", "Adagrad")])
def test_a_sparse_step_is_the_dense_step_of_its_gradient(case, dtype):
    name, kwargs = case
    rng = np.random.default_rng(3)
    p = rng.standard_normal((30, 5)).astype(dtype)
    q = p.copy()
    sparse, dense = getattr(fastopt, name)([p], **kwargs), getattr(fastopt, name)([q], **kwargs)
    for _ in range(5):
        g = gradient(rng, 30, 5, 20, dtype)
        sparse.step([g])
        dense.step([g.to_dense(q.shape)])
    if name == "SGD":
        assert_same(p, q)  # the same operations on every element
    else:
        # Adagrad: torch's sparse path rounds (-clr) * (g / std), the dense one
        # (-clr * g) / std; the same value, a rounding of an update (at most
        # lr in size) apart per step
        np.testing.assert_allclose(p, q, rtol=0, atol=5 * 4 * np.finfo(dtype).eps * kwargs["lr"])


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES),
       indices=st.lists(st.integers(0, 11), max_size=40),
       width=st.integers(1, 9),
       dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2 ** 16))
def test_property_kernels_equal_twins_and_lazy_rules_leave_unlisted_rows(case, indices, width,
                                                                        dtype, seed):
    name, kwargs = case
    rng = np.random.default_rng(seed)
    start = rng.standard_normal((12, width)).astype(dtype)
    values = rng.standard_normal((len(indices), width)).astype(dtype)
    out = []
    for backend in ("cython", "numpy"):
        p = start.copy()
        opt = getattr(fastopt, name)([p], backend=backend, **kwargs)
        for _ in range(2):
            opt.step([fastopt.SparseRows(np.array(indices, np.int64), values)])
        out.append(p)
    assert_same(*out)
    if lazy(name, kwargs):
        untouched = np.setdiff1d(np.arange(12), indices)
        assert_same(out[0][untouched], start[untouched])


def test_merge_rows_adds_in_position_order():
    values = np.array([[1e8], [1.0], [-1e8], [1.0]], np.float32)
    rows, merged = reference.merge_rows([3, 3, 3, 0], values)
    assert_same(rows, [0, 3])
    # ((1e8 + 1) - 1e8) in float32 is 0: the order is position order
    assert_same(merged, np.array([[1.0], [0.0]], np.float32))
    p = np.zeros((4, 1), np.float32)
    fastopt.SGD([p], lr=1.0).step([fastopt.SparseRows([3, 3, 3, 0], values)])
    assert_same(p, -np.array([[1.0], [0], [0], [0.0]], np.float32))


# ------------------------------------------------------------ state round trips

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_and_checkpoint_round_trips_continue_the_run(case, tmp_path):
    name, kwargs = case
    rng = np.random.default_rng(5)
    grads = [gradient(rng, 20, 4, 15, np.float64) for _ in range(6)]
    start = rng.standard_normal((20, 4))
    whole = start.copy()
    opt = getattr(fastopt, name)([whole], **kwargs)
    for g in grads:
        opt.step([g])
    for how in ("state_dict", "checkpoint"):
        p = start.copy()
        first = getattr(fastopt, name)([p], **kwargs)
        for g in grads[:3]:
            first.step([g])
        if how == "state_dict":
            second = getattr(fastopt, name)([p], **kwargs)
            second.load_state_dict(first.state_dict())
        else:
            first.save(tmp_path / "opt.npz")
            second = fastopt.load_optimizer(tmp_path / "opt.npz", [p])
        for g in grads[3:]:
            second.step([g])
        assert_same(p, whole)
    if name == "RowWiseAdagrad":
        assert second.state[0]["sum"].shape == (20, 1)  # one number per row


# ------------------------------------------------------------ fastopt.torch

TORCH_CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01}),
    ("Adagrad", {"lr": 0.1, "initial_accumulator_value": 0.1, "maximize": True}),
    ("SparseAdam", {"lr": 0.01}),
    ("SparseAdam", {"lr": 0.01, "betas": (0.8, 0.99), "maximize": True}),
]


def _embedding_run(module, name, kwargs, dtype, bag=False, coalesce=False, steps=8):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = (torch.nn.EmbeddingBag(60, 6, sparse=True, mode="sum") if bag
             else torch.nn.Embedding(60, 6, sparse=True)).to(dtype)
    opt = getattr(module, name)(layer.parameters(), **kwargs)
    rng = np.random.default_rng(11)
    for _ in range(steps):
        idx = torch.from_numpy(rng.zipf(1.3, 48) % 60)
        opt.zero_grad()
        out = layer(idx, torch.arange(0, 48, 6)) if bag else layer(idx)
        ((out ** 2).sum() * 0.5 + out.sum()).backward()
        if coalesce:
            layer.weight.grad = layer.weight.grad.coalesce()
        opt.step()
    return layer.weight.detach().clone(), opt


@pytest.mark.parametrize("bag", [False, True], ids=["Embedding", "EmbeddingBag"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("case", TORCH_CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                              for n, kw in TORCH_CASES])
def test_fastopt_torch_matches_torch_optim_on_sparse_embeddings(case, dtype_name, bag):
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    name, kwargs = case
    dtype = getattr(torch, dtype_name)
    mine, _ = _embedding_run(ft, name, kwargs, dtype, bag)
    theirs, _ = _embedding_run(torch.optim, name, kwargs, dtype, bag)
    start, _ = _embedding_run(torch.optim, name, kwargs, dtype, bag, steps=0)
    scale = float((theirs - start).abs().max())
    # torch adds repeated rows (coalesce; SGD: each entry on its own) in its
    # own order; fastopt in position order: rounding apart, compounding over
    # the steps (SGD's momentum most)
    rtol = 1e-11 if dtype is torch.float64 else 1e-4
    assert float((mine - theirs).abs().max()) <= rtol * scale


def test_fastopt_torch_takes_coalesced_and_uncoalesced_gradients_alike():
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    for name, kwargs in TORCH_CASES:
        a, _ = _embedding_run(ft, name, kwargs, torch.float32)
        b, _ = _embedding_run(ft, name, kwargs, torch.float32, coalesce=True)
        assert torch.equal(a, b), name


def test_fastopt_torch_rowwise_adagrad_equals_the_numpy_optimizer():
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    layer = torch.nn.Embedding(30, 5, sparse=True)
    p = layer.weight.detach().numpy().copy()
    opt, ref = ft.RowWiseAdagrad(layer.parameters(), lr=0.1), fastopt.RowWiseAdagrad([p], lr=0.1)
    for step in range(4):
        idx = torch.tensor([1, 4, 4, 7 + step])
        opt.zero_grad()
        layer(idx).pow(2).sum().backward()
        g = layer.weight.grad
        ref.step([fastopt.SparseRows(g._indices()[0].numpy(), g._values().numpy())])
        opt.step()
    assert np.array_equal(layer.weight.detach().numpy(), p)
    assert tuple(opt.state[layer.weight]["sum"].shape) == (30, 1)


def test_fastopt_torch_refuses_a_sparse_gradient_where_its_rule_does():
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    layer = torch.nn.Embedding(10, 3, sparse=True)
    before = layer.weight.detach().clone()
    for opt, words in ((ft.Adam(layer.parameters()), "dense gradients only"),
                       (ft.Adagrad(layer.parameters(), weight_decay=0.1), "weight_decay")):
        layer(torch.tensor([1, 2])).sum().backward()
        with pytest.raises((TypeError, ValueError), match=words):
            opt.step()
        layer.weight.grad = None
    assert torch.equal(layer.weight.detach(), before)


def _element_sparse_run(module, name, kwargs, layout, steps=5):
    """``name`` on a 3-D parameter whose gradients list single elements
    (``to_sparse()``: one sparse dimension per axis), the parameter laid out
    as ``layout`` ("contiguous" or "transposed", a non-contiguous view)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    base = torch.randn(4, 6, 5, dtype=torch.float64)
    if layout == "transposed":
        base = torch.empty_strided(base.shape, (1, 4, 24), dtype=base.dtype).copy_(base)
    p = torch.nn.Parameter(base)
    opt = getattr(module, name)([p], **kwargs)
    rng = np.random.default_rng(5)
    for _ in range(steps):
        dense = torch.from_numpy(rng.standard_normal(p.shape) * (rng.random(p.shape) < 0.3))
        p.grad = dense.to_sparse()  # only the nonzero elements, 3 sparse dimensions
        opt.step()
    return p.detach().clone(), opt


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("case", TORCH_CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                              for n, kw in TORCH_CASES])
def test_fastopt_torch_takes_element_sparse_gradients_of_any_layout_as_torch(case, layout):
    """PyTorch's own suite feeds ``grad.to_sparse()`` to non-contiguous params: such a
    gradient updates exactly the elements it lists, as torch.optim does, and the
    update lands in the caller's (strided) tensor."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    name, kwargs = case
    mine, opt = _element_sparse_run(ft, name, kwargs, layout)
    # (torch's SGD with momentum fails on the strided view: its reference is the contiguous run)
    theirs, _ = _element_sparse_run(torch.optim, name, kwargs, "contiguous")
    assert float((mine - theirs).abs().max()) <= 1e-12 * float(theirs.abs().max())
    if layout == "transposed":
        assert not opt.param_groups[0]["params"][0].is_contiguous()


def test_fastopt_torch_rowwise_adagrad_refuses_element_sparse_gradients():
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = ft.RowWiseAdagrad([p], lr=0.1)
    p.grad = torch.eye(4, 3).to_sparse()
    with pytest.raises(ValueError, match="2 sparse dimensions.*per-row state"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4, 3)) and not opt.state


def test_fastopt_torch_sparse_adam_loads_torchs_integer_step():
    """torch's SparseAdam counts ``state['step']`` as a Python int; a state_dict that
    holds one loads and steps on as if the count were fastopt's own tensor."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    mine, theirs = (_embedding_run(m, "SparseAdam", {"lr": 0.01}, torch.float64, steps=3)
                    for m in (ft, torch.optim))
    assert isinstance(theirs[1].state[next(iter(theirs[1].state))]["step"], int)
    opt = mine[1]
    opt.load_state_dict(theirs[1].state_dict())
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert isinstance(state["step"], torch.Tensor) and float(state["step"]) == 3.0
