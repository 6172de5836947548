"""fastopt.optimizer: param groups, state, step, state_dict - for every optimizer."""
import copy

import numpy as np
import pytest

import fastopt
from fastopt.optim.optimizer import ParamGroup

import spec  # tests/spec.py: tests/ is on sys.path under pytest


def make_params(seed=0, dtypes=(np.float32, np.float64, np.float32), shapes=((5,), (3, 4), (17,))):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]


def grads_like(params, rng):
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def snapshot(opt, params):
    return [p.copy() for p in params], copy.deepcopy(opt.state)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys()
        for k in a[i]:
            if isinstance(a[i][k], np.ndarray):
                np.testing.assert_array_equal(a[i][k], b[i][k])
            else:
                assert a[i][k] == b[i][k]


def assert_unchanged(opt, params, snap):
    for p, before in zip(params, snap[0]):
        np.testing.assert_array_equal(p, before)
    assert_same_state(opt.state, snap[1])


# ------------------------------------------------------------ construction

def test_params_as_list_dict_and_groups():
    a, b, c = make_params()
    assert len(fastopt.SGD([a, b]).param_groups) == 1
    assert len(fastopt.SGD(iter([a, b])).param_groups) == 1
    named = fastopt.SGD({"a": a, "b": b})
    assert named.param_groups[0]["param_names"] == ["a", "b"]
    groups = fastopt.SGD([{"params": [a]}, {"params": [b, c], "lr": 0.5}], lr=0.1)
    assert [g["lr"] for g in groups.param_groups] == [0.1, 0.5]
    assert groups.param_groups[1]["params"][0] is b


@pytest.mark.parametrize("params, error, message", [
    (np.zeros(3), TypeError, "single ndarray"),
    ([], ValueError, "empty parameter list"),
    (5, TypeError, "params must be"),
    ([np.zeros(3), {"params": [np.zeros(2)]}], TypeError, "mixes arrays and param-group"),
    ([{"lr": 0.1}], TypeError, "'params' entry"),
    ([np.zeros(3, np.int32)], TypeError, r"params\[0\] must have dtype float32, float64, float16, bfloat16, complex64 or complex128, got int32"),
    ([np.zeros(3), np.zeros((4, 4))[:, 0]], ValueError, r"params\[1\] must be C-contiguous"),
    ([np.broadcast_to(np.zeros(3), (3,))], ValueError, "read-only"),
    ({"w": np.zeros(3), 1: np.zeros(2)}, TypeError, "names must be strings"),
    ([{"params": {"a": np.zeros(2)}}, {"params": [np.zeros(2)]}], ValueError, "every param group names"),
])
def test_bad_params_are_refused(params, error, message):
    with pytest.raises(error, match=message):
        fastopt.Adam(params)


def test_same_array_twice_is_refused():
    a = np.zeros(4)
    with pytest.raises(ValueError, match=r"params\[1\] is the same array as params\[0\]"):
        fastopt.SGD([a, a])
    with pytest.raises(ValueError, match="shares memory"):
        fastopt.SGD([a[:3], a[2:]])
    empty = np.zeros(0)
    with pytest.raises(ValueError, match="same array"):
        fastopt.SGD([empty, empty])


@pytest.mark.parametrize("cls, kwargs, message", [
    (fastopt.SGD, dict(lr=-0.1), "lr must be >= 0"),
    (fastopt.SGD, dict(momentum=-1.0), "momentum must be >= 0"),
    (fastopt.SGD, dict(weight_decay=-1e-3), "weight_decay must be >= 0"),
    (fastopt.SGD, dict(nesterov=True), "nesterov"),
    (fastopt.SGD, dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov"),
    (fastopt.SGD, dict(maximize="yes"), "maximize must be a bool"),
    (fastopt.Adagrad, dict(eps=0.0), "eps must be > 0"),
    (fastopt.Adagrad, dict(lr_decay=-1.0), "lr_decay must be >= 0"),
    (fastopt.Adagrad, dict(initial_accumulator_value=-0.1), "initial_accumulator_value must be >= 0"),
    (fastopt.RMSprop, dict(alpha=1.0), r"alpha must be in \[0, 1\)"),
    (fastopt.RMSprop, dict(alpha=-0.1), r"alpha must be in \[0, 1\)"),
    (fastopt.RMSprop, dict(momentum=-0.5), "momentum must be >= 0"),
    (fastopt.Adam, dict(betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\)"),
    (fastopt.Adam, dict(betas=(-0.1, 0.9)), r"betas\[0\]"),
    (fastopt.Adam, dict(eps=float("inf")), "eps must be > 0 and finite"),
    (fastopt.AdamW, dict(lr=float("nan")), "lr must be >= 0"),
    (fastopt.AdamW, dict(weight_decay=-0.01), "weight_decay must be >= 0"),
])
def test_bad_hyperparameters_are_refused(cls, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        cls([np.zeros(3)], **kwargs)


def test_bad_group_hyperparameter_names_the_group():
    with pytest.raises(ValueError, match=r"param_groups\[1\]: lr must be >= 0"):
        fastopt.Adam([{"params": [np.zeros(2)]}, {"params": [np.zeros(3)], "lr": -1.0}])


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        fastopt.Adam([np.zeros(2)], backend="fortran")


def test_add_param_group():
    a, b, c = make_params()
    opt = fastopt.Adam([a], lr=0.1)
    opt.add_param_group({"params": [b], "lr": 0.01})
    assert opt.param_groups[1]["lr"] == 0.01
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)  # defaults filled in
    with pytest.raises(ValueError, match="same array"):
        opt.add_param_group({"params": [a]})
    with pytest.raises(ValueError, match="eps"):
        opt.add_param_group({"params": [c], "eps": -1.0})
    assert len(opt.param_groups) == 2  # the refused groups left no trace
    opt.add_param_group({"params": c})
    rng = np.random.default_rng(0)
    opt.step(grads_like([a, b, c], rng))
    assert sorted(opt.state) == [0, 1, 2]


def test_named_groups_refuse_duplicate_names():
    opt = fastopt.SGD({"w": np.zeros(2)})
    with pytest.raises(ValueError, match="'w' is used twice"):
        opt.add_param_group({"params": {"w": np.zeros(3)}})


# -------------------------------------------------------------------- step

@pytest.mark.parametrize("case", spec.optimizer_cases(), ids=spec.case_id)
def test_cython_and_numpy_backends_agree_bit_for_bit(case):
    _, cls, kwargs = case
    params_fast, params_slow = make_params(), make_params()
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}]
    fast = cls(groups(params_fast), **kwargs)
    slow = cls(groups(params_slow), **kwargs, backend="numpy")
    rng = np.random.default_rng(1)
    for step in range(6):
        grads = grads_like(params_fast, rng)
        if step % 3 == 1:
            grads[1] = None  # no gradient this step: skipped, its step count lags
        fast.step(grads)
        slow.step(grads)
    for a, b in zip(params_fast, params_slow):
        np.testing.assert_array_equal(a, b)
    assert_same_state(fast.state, slow.state)


def complex_params(seed=0):
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal((2,) + s) for s in ((5,), (3, 4), (17,))]
    return [(a + 1j * b).astype(d)
            for (a, b), d in zip(parts, (np.complex64, np.complex128, np.complex64))]


@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("case", [c for c in spec.optimizer_cases() if spec.rule(c[1]).complex_ok],
                         ids=spec.case_id)
def test_complex_params_are_stepped_as_their_real_view(case, backend):
    """torch.optim's rule for complex parameters (view_as_real), bit for bit, in place."""
    _, cls, kwargs = case
    params = complex_params()
    reals = [p.view(p.real.dtype).copy() for p in params]
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], **kwargs,
              backend=backend)
    ref = cls([{"params": reals[:2]}, {"params": reals[2:], "lr": 0.05}], **kwargs)
    rng = np.random.default_rng(1)
    for step in range(5):
        grads = [g.astype(p.dtype) for g, p in zip(complex_params(10 + step), params)]
        if step == 2:
            grads[1] = None
        opt.step(grads)
        ref.step([None if g is None else g.view(g.real.dtype).copy() for g in grads])
    for p, r in zip(params, reals):
        assert np.iscomplexobj(p)
        np.testing.assert_array_equal(p.view(p.real.dtype), r)
    for i, state in opt.state.items():
        for name, value in state.items():
            if isinstance(value, np.ndarray) and value.ndim:
                assert value.dtype == params[i].dtype  # torch's layout: state like the param
                np.testing.assert_array_equal(value.view(value.real.dtype), ref.state[i][name])


@pytest.mark.parametrize("name", [n for n in spec.class_names() if not spec.rule(n).complex_ok])
def test_complex_params_are_refused_where_the_rule_reads_shapes(name):
    """Adafactor, as torch's: a TypeError naming the parameter, at construction and at
    add_param_group, and nothing changes."""
    cls = getattr(fastopt, name)
    with pytest.raises(TypeError, match=r"params\[0\] must have dtype float32, float64, float16 or bfloat16"):
        cls([np.zeros((2, 3), np.complex64)])
    opt = cls([np.zeros((2, 3))])
    with pytest.raises(TypeError, match="must have dtype float32, float64, float16 or bfloat16, got complex128"):
        opt.add_param_group({"params": [np.zeros(4, np.complex128)]})
    assert len(opt.param_groups) == 1 and not opt.state


def test_complex_adagrad_starts_every_real_number_of_its_sum_at_the_initial_value():
    """As torch.optim.Adagrad: complex(init, init), so the real view starts at init."""
    p = np.array([1 + 2j, -1j], np.complex128)
    g = np.array([3 + 4j, 1 - 2j], np.complex128)
    opt = fastopt.Adagrad([p], initial_accumulator_value=0.5)
    opt.step([g])
    np.testing.assert_array_equal(opt.state[0]["sum"], [9.5 + 16.5j, 1.5 + 4.5j])  # torch's


@pytest.mark.parametrize("case", spec.optimizer_cases(), ids=spec.case_id)
def test_step_updates_the_callers_arrays_in_place(case):
    _, cls, kwargs = case
    params = make_params()
    ids = [id(p) for p in params]
    before = [p.copy() for p in params]
    opt = cls(params, **kwargs)
    opt.step(grads_like(params, np.random.default_rng(0)))
    assert [id(p) for p in opt.param_groups[0]["params"]] == ids
    for p, b in zip(params, before):
        assert not np.array_equal(p, b)


def test_step_matches_low_level_kernel_per_parameter():
    params = make_params()
    opt = fastopt.Adam(params, lr=0.01, weight_decay=0.1)
    copies = [p.copy() for p in params]
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in copies]
    rng = np.random.default_rng(3)
    for t in range(1, 5):
        grads = grads_like(params, rng)
        opt.step(grads)
        for p, g, (m, v) in zip(copies, grads, moments):
            fastopt.kernels.adam(p, g, m, v, step=t, lr=0.01, weight_decay=0.1)
    for a, b in zip(params, copies):
        np.testing.assert_array_equal(a, b)


def test_none_grad_leaves_param_and_state_alone():
    params = make_params()
    opt = fastopt.Adam(params, lr=0.1)
    rng = np.random.default_rng(0)
    opt.step([params[0] * 0 + 1, None, None])
    assert sorted(opt.state) == [0]  # state is made only for params with a gradient
    frozen = params[1].copy()
    opt.step([None, None, grads_like(params, rng)[2]])
    np.testing.assert_array_equal(params[1], frozen)
    assert opt.state[0]["step"] == 1 and opt.state[2]["step"] == 1


def test_state_has_torch_names_and_param_dtype():
    params = make_params()
    opt = fastopt.Adam(params, amsgrad=True)
    opt.step(grads_like(params, np.random.default_rng(0)))
    for i, p in enumerate(params):
        assert set(opt.state[i]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert opt.state[i]["exp_avg"].dtype == p.dtype
        assert opt.state[i]["exp_avg"].shape == p.shape
    sgd = fastopt.SGD(make_params(), momentum=0.9)
    sgd.step(grads_like(make_params(), np.random.default_rng(0)))
    assert set(sgd.state[0]) == {"momentum_buffer"}  # torch's SGD keeps no step


def test_group_edits_take_effect_on_next_step():
    p_opt, p_ref = np.ones(6), np.ones(6)
    opt = fastopt.Adam([p_opt], lr=0.1)
    m, v = np.zeros(6), np.zeros(6)
    rng = np.random.default_rng(0)
    schedule = [0.1, 0.1, 0.01, 0.5]
    for t, lr in enumerate(schedule, start=1):
        opt.param_groups[0]["lr"] = lr
        if t == 4:
            opt.param_groups[0]["betas"] = (0.5, 0.9)
        g = rng.standard_normal(6)
        opt.step([g])
        betas = (0.5, 0.9) if t == 4 else (0.9, 0.999)
        fastopt.kernels.adam(p_ref, g, m, v, step=t, lr=lr, betas=betas)
    np.testing.assert_array_equal(p_opt, p_ref)


def test_invalid_group_edit_fails_the_step_and_changes_nothing():
    params = make_params()
    opt = fastopt.Adam(params)
    rng = np.random.default_rng(0)
    opt.step(grads_like(params, rng))
    snap = snapshot(opt, params)
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: betas\[1\]"):
        opt.step(grads_like(params, rng))
    assert_unchanged(opt, params, snap)
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    opt.step(grads_like(params, rng))


def test_turning_amsgrad_on_mid_run_allocates_its_buffer():
    params = make_params()
    opt = fastopt.Adam(params)
    rng = np.random.default_rng(0)
    opt.step(grads_like(params, rng))
    opt.param_groups[0]["amsgrad"] = True
    opt.step(grads_like(params, rng))
    assert "max_exp_avg_sq" in opt.state[0]


def test_sgd_momentum_switched_on_later_starts_buffer_from_gradient():
    p, ref = np.ones(3), np.ones(3)
    opt = fastopt.SGD([p], lr=0.1)
    opt.step([np.ones(3)])
    opt.param_groups[0]["momentum"] = 0.9
    g = np.array([1.0, 2.0, 3.0])
    opt.step([g])
    np.testing.assert_array_equal(opt.state[0]["momentum_buffer"], g)
    fastopt.kernels.sgd(ref, np.ones(3), lr=0.1)
    fastopt.kernels.sgd(ref, g, np.zeros(3), lr=0.1, momentum=0.9, first_step=True)
    np.testing.assert_array_equal(p, ref)


def test_grads_as_dict_for_named_params():
    a, b, c = make_params()
    opt = fastopt.SGD({"a": a, "b": b, "c": c}, lr=0.1)
    before = b.copy()
    opt.step({"a": np.ones_like(a), "b": None, "c": np.ones_like(c)})
    np.testing.assert_array_equal(b, before)
    opt.step([np.ones_like(a), np.ones_like(b), np.ones_like(c)])  # a list works too


# --------------------------------------------------------------- bad steps

def _bad_grads(params, opt):
    """name -> (function of the good grads giving bad grads, error, message)."""
    def replace(i, value):
        return lambda grads: [value if k == i else g for k, g in enumerate(grads)]
    p0, p1 = params[0], params[1]
    return {
        "too few": (lambda grads: grads[:-1], ValueError, "got 2 grads for 3 parameters"),
        "too many": (lambda grads: grads + [grads[0]], ValueError, "got 4 grads"),
        "not a list": (lambda grads: grads[0], TypeError, "grads must be a list"),
        "dict for unnamed": (lambda grads: {"a": grads[0]}, TypeError, "without names"),
        "int grad": (replace(1, np.zeros(p1.shape, np.int64)), TypeError, r"grads\[1\] must have dtype"),
        "dtype mismatch": (replace(0, np.zeros(p0.shape, np.float64)), TypeError, r"grads\[0\] has dtype float64 but params\[0\] has dtype float32"),
        "shape mismatch": (replace(1, np.zeros(p1.size, p1.dtype)), ValueError, r"grads\[1\] has shape \(12,\) but params\[1\] has shape \(3, 4\)"),
        "non-contiguous": (replace(1, np.zeros((4, 3), p1.dtype).T), ValueError, r"grads\[1\] must be C-contiguous"),
        "byte-swapped": (replace(1, np.zeros(p1.shape, p1.dtype.newbyteorder())), TypeError, r"grads\[1\] must have dtype"),
        "grad is param": (replace(0, p0), ValueError, r"grads\[0\] shares memory with params\[0\]"),
        "grad is view of param": (replace(1, p1[:]), ValueError, "shares memory"),
        "grad is state": (lambda grads: [opt.state[0]["exp_avg"]] + grads[1:], ValueError, r"shares memory with state\[0\]\['exp_avg'\]"),
        "list grad": (replace(0, [0.0] * p0.size), TypeError, "numpy.ndarray"),
    }


BAD_GRAD_NAMES = list(_bad_grads(make_params(), None))


@pytest.mark.parametrize("name", BAD_GRAD_NAMES)
def test_bad_grads_raise_and_change_nothing(name):
    params = make_params()
    opt = fastopt.Adam(params, amsgrad=True)
    rng = np.random.default_rng(0)
    opt.step(grads_like(params, rng))  # state exists, so it must stay put too
    make_bad, error, message = _bad_grads(params, opt)[name]
    bad = make_bad(grads_like(params, rng))
    snap = snapshot(opt, params)
    with pytest.raises(error, match=message):
        opt.step(bad)
    assert_unchanged(opt, params, snap)


def test_named_grads_errors_name_the_key():
    params = dict(zip("abc", make_params()))
    opt = fastopt.SGD(params)
    with pytest.raises(ValueError, match="grads is missing 'b'"):
        opt.step({"a": np.ones(5, np.float32), "c": np.ones(17, np.float32)})
    with pytest.raises(ValueError, match="grads has key 'zz'"):
        opt.step({"a": None, "b": None, "c": None, "zz": None})
    with pytest.raises(TypeError, match=r"grads\['b'\] has dtype"):
        opt.step({"a": None, "b": np.ones((3, 4), np.float32), "c": None})


def test_param_made_read_only_after_construction_is_refused():
    params = make_params()
    opt = fastopt.SGD(params)
    params[2].flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[2\] is read-only"):
        opt.step(grads_like(params, np.random.default_rng(0)))


@pytest.mark.parametrize("corrupt, error, message", [
    (lambda s: s[0].__setitem__("exp_avg", np.zeros(2, np.float32)), ValueError, r"state\[0\]\['exp_avg'\] has shape"),
    (lambda s: s[0].__setitem__("exp_avg", s[0]["exp_avg"].astype(np.float64)), TypeError, r"state\[0\]\['exp_avg'\] has dtype"),
    (lambda s: s[0].__setitem__("exp_avg_sq", s[0]["exp_avg"]), ValueError, "shares memory"),
    (lambda s: s[1].__setitem__("step", 1.5), TypeError, r"state\[1\]\['step'\] must be an int"),
    (lambda s: s.__setitem__(2, []), TypeError, r"state\[2\] must be a dict"),
])
def test_corrupted_state_is_refused_before_any_update(corrupt, error, message):
    # A hand-edited state must never send a wrong-sized buffer to a kernel.
    params = make_params()
    opt = fastopt.Adam(params)
    rng = np.random.default_rng(0)
    opt.step(grads_like(params, rng))
    corrupt(opt.state)
    before = [p.copy() for p in params]
    with pytest.raises(error, match=message):
        opt.step(grads_like(params, rng))
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p, b)


def test_screen_never_disagrees_with_the_checks():
    """Random corruptions of a valid step: always a clean error or a valid step."""
    rng = np.random.default_rng(123)
    mutations = [  # (mutation, is the result invalid?)
        (lambda g, p: g.astype(np.float64 if g.dtype == np.float32 else np.float32), True),
        (lambda g, p: g.reshape(-1) if g.ndim > 1 else g.reshape(1, -1), True),
        (lambda g, p: np.stack([g, g], axis=-1)[..., 0], True),  # strided
        (lambda g, p: p, True),
        (lambda g, p: np.frombuffer(b"\0" + g.tobytes(), dtype=g.dtype, offset=1,
                                    count=g.size).reshape(g.shape), True),  # misaligned
        (lambda g, p: g.astype(g.dtype.newbyteorder()), True),
        (lambda g, p: g.astype(np.float16), True),
        (lambda g, p: None, False),
        (lambda g, p: np.ascontiguousarray(g), False),
    ]
    for trial in range(200):
        params = make_params(seed=trial)
        opt = fastopt.Adam(params)
        grads = grads_like(params, rng)
        k = int(rng.integers(len(params)))
        mutate, invalid = mutations[int(rng.integers(len(mutations)))]
        grads[k] = mutate(grads[k], params[k])
        snap = snapshot(opt, params)
        if invalid:
            with pytest.raises((TypeError, ValueError)):
                opt.step(grads)
            assert_unchanged(opt, params, snap)
        else:
            opt.step(grads)


# -------------------------------------------------------------- state_dict

@pytest.mark.parametrize("case", spec.optimizer_cases(), ids=spec.case_id)
def test_state_dict_round_trip_continues_bit_identically(case):
    _, cls, kwargs = case
    rng = np.random.default_rng(7)
    grads = [grads_like(make_params(), rng) for _ in range(8)]
    grads[2][1] = None  # uneven step counts must survive the round trip
    build = lambda ps: cls([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.03}], **kwargs)

    straight = make_params()
    uninterrupted = build(straight)
    for g in grads:
        uninterrupted.step(g)

    resumed = make_params()
    first = build(resumed)
    for g in grads[:4]:
        first.step(g)
    saved = first.state_dict()
    del first
    fresh = build(resumed)
    fresh.load_state_dict(saved)
    for g in grads[4:]:
        fresh.step(g)
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a, b)
    assert_same_state(uninterrupted.state, fresh.state)


def test_state_dict_layout_is_torchs():
    params = make_params()
    opt = fastopt.Adam({"w": params[0], "b": params[1]}, lr=0.1)
    opt.step({"w": np.ones(5, np.float32), "b": None})
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert sd["param_groups"][0]["params"] == [0, 1]
    assert sd["param_groups"][0]["param_names"] == ["w", "b"]
    assert sd["param_groups"][0]["lr"] == 0.1
    assert set(sd["state"]) == {0}
    assert sd["state"][0]["step"] == 1
    kept = sd["state"][0]["exp_avg"].copy()
    opt.step({"w": np.ones(5, np.float32), "b": None})
    np.testing.assert_array_equal(sd["state"][0]["exp_avg"], kept)  # a snapshot, not a view


def test_load_state_dict_restores_hyperparameters():
    a = make_params()
    opt = fastopt.Adam(a, lr=0.1)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.5
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5


def _good_state_dict():
    params = make_params()
    opt = fastopt.Adam([{"params": params[:2]}, {"params": params[2:]}])
    opt.step(grads_like(params, np.random.default_rng(0)))
    return opt.state_dict()


@pytest.mark.parametrize("break_it, error, message", [
    (lambda sd: sd["param_groups"].pop(), ValueError, "1 param groups"),
    (lambda sd: sd["param_groups"][0]["params"].pop(), ValueError, "has 1 parameters in state_dict"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", np.zeros(3)), ValueError, "has shape"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", np.zeros(5, np.int64)), TypeError, "float array"),
    (lambda sd: sd["state"][0].__setitem__("momentum_buffer", np.zeros(5)), ValueError, "not state of Adam"),
    (lambda sd: sd["state"][1].__setitem__("step", -1), ValueError, "must be an int >= 0"),
    (lambda sd: sd["state"][1].__setitem__("step", "x"), TypeError, "must be a number"),
    (lambda sd: sd["state"].__setitem__(9, {}), ValueError, "parameter id 9"),
    (lambda sd: sd["param_groups"][1].__setitem__("eps", 0.0), ValueError, "eps must be > 0"),
    (lambda sd: sd.pop("state"), TypeError, "keys 'state' and 'param_groups'"),
])
def test_bad_state_dict_is_refused_and_changes_nothing(break_it, error, message):
    params = make_params()
    opt = fastopt.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.2)
    opt.step(grads_like(params, np.random.default_rng(1)))
    before = copy.deepcopy(opt.state)
    groups_before = [dict(g) for g in opt.param_groups]
    sd = _good_state_dict()
    break_it(sd)
    with pytest.raises(error, match=message):
        opt.load_state_dict(sd)
    assert_same_state(opt.state, before)
    for g, b in zip(opt.param_groups, groups_before):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in b.items() if k != "params"}


def test_loaded_state_is_cast_to_param_dtype_and_owned():
    params = make_params()
    opt = fastopt.Adam([{"params": params[:2]}, {"params": params[2:]}])
    sd = _good_state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].astype(np.float64)
    opt.load_state_dict(sd)
    assert opt.state[0]["exp_avg"].dtype == np.float32
    assert opt.state[2]["exp_avg"] is not sd["state"][2]["exp_avg"]


def test_param_group_notices_every_kind_of_edit():
    group = ParamGroup(lr=0.1)
    for edit in (lambda g: g.__setitem__("lr", 1), lambda g: g.update(lr=2),
                 lambda g: g.setdefault("x", 1), lambda g: g.pop("x"),
                 lambda g: g.__ior__({"lr": 3})):
        group.checked = {"lr": 0.1}
        edit(group)
        assert group.checked is None


def test_repr_lists_groups():
    text = repr(fastopt.Adam([np.zeros(2)], lr=0.5))
    assert "Adam (" in text and "lr: 0.5" in text


# ------------------------------------------------- cached state on the hot path

def test_replacing_a_state_buffer_between_steps_takes_effect():
    # The hot path caches buffer pointers; an edit of opt.state must win.
    params, twin = make_params(), make_params()
    opt, ref = fastopt.Adam(params, lr=0.1), fastopt.Adam(twin, lr=0.1, backend="numpy")
    rng = np.random.default_rng(0)
    for _ in range(2):
        grads = grads_like(params, rng)
        opt.step(grads)
        ref.step(grads)
    opt.state[1]["exp_avg"] = np.zeros_like(params[1])
    ref.state[1]["exp_avg"] = np.zeros_like(twin[1])
    opt.state[2] = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in opt.state[2].items()}
    opt.state[2]["exp_avg_sq"][...] = 1.0  # an edit of the adopted entry, in place
    ref.state[2]["exp_avg_sq"][...] = 1.0
    grads = grads_like(params, rng)
    opt.step(grads)
    ref.step(grads)
    for a, b in zip(params, twin):
        np.testing.assert_array_equal(a, b)


def test_state_entries_are_adopted_and_report_edits():
    from fastopt._watched import ParamState, State
    opt = fastopt.SGD(make_params(), momentum=0.9)
    assert isinstance(opt.state, State)
    before = opt.state.version
    opt.state[0] = {"momentum_buffer": np.zeros(5, np.float32)}
    assert isinstance(opt.state[0], ParamState) and opt.state[0].owner is opt.state
    opt.state[0]["momentum_buffer"] = np.ones(5, np.float32)
    assert opt.state.version == before + 2
    copied = copy.deepcopy(opt)
    assert copied.state[0].owner is copied.state


def test_swapping_a_parameter_for_another_shape_is_refused():
    params = make_params()
    opt = fastopt.Adam(params)
    rng = np.random.default_rng(0)
    opt.step(grads_like(params, rng))
    opt.param_groups[0]["params"][1] = np.zeros(7, np.float64)  # list edited in place
    grads = grads_like(params, rng)
    grads[1] = np.zeros(7, np.float64)
    with pytest.raises(ValueError, match=r"state\[1\]\['exp_avg'\] has shape"):
        opt.step(grads)


@pytest.mark.parametrize("case", spec.optimizer_cases(), ids=spec.case_id)
def test_skip_nonfinite_skips_and_counts(case):
    _, cls, kwargs = case
    params = make_params()
    opt = cls(params, skip_nonfinite=True, **kwargs)
    rng = np.random.default_rng(0)
    opt.step(grads_like(params, rng))
    snap = snapshot(opt, params)
    for bad in (np.nan, np.inf, -np.inf):
        grads = grads_like(params, rng)
        grads[2][5] = bad
        opt.step(grads)
        assert_unchanged(opt, params, snap)
    assert opt.skipped_steps == 3
    opt.step(grads_like(params, rng))  # finite again: steps
    assert not np.array_equal(params[0], snap[0][0])


def test_without_skip_nonfinite_nan_propagates():
    p = np.ones(3)
    fastopt.SGD([p], lr=0.1).step([np.array([np.nan, 1.0, 1.0])])
    assert np.isnan(p[0]) and p[1] == 0.9


# --------------------------------------------------------------- threads

def test_optimizers_stepping_in_threads_match_serial_runs():
    import threading
    rng = np.random.default_rng(0)
    seqs = [[[rng.standard_normal(400_003).astype(np.float32)] for _ in range(5)] for _ in range(4)]
    serial, threaded = [], []
    for out, parallel in ((serial, False), (threaded, True)):
        params = [np.ones(400_003, np.float32) for _ in seqs]
        opts = [fastopt.Adam([p], lr=0.01) for p in params]
        work = [lambda o=o, s=s: [o.step(g) for g in s] for o, s in zip(opts, seqs)]
        if parallel:
            threads = [threading.Thread(target=w) for w in work]
            [t.start() for t in threads]
            [t.join() for t in threads]
        else:
            [w() for w in work]
        out.extend(params)
    for a, b in zip(serial, threaded):
        np.testing.assert_array_equal(a, b)


def test_concurrent_steps_on_one_optimizer_take_turns():
    import threading
    p_threads, p_serial = np.zeros(100_001), np.zeros(100_001)
    g = [np.full(100_001, 0.5)]
    shared = fastopt.Adam([p_threads], lr=0.01)
    threads = [threading.Thread(target=lambda: [shared.step(g) for _ in range(50)]) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    serial = fastopt.Adam([p_serial], lr=0.01)
    for _ in range(200):
        serial.step(g)
    assert shared.state[0]["step"] == 200
    np.testing.assert_array_equal(p_threads, p_serial)


def test_step_lock_behaves_like_a_lock():
    from fastopt._fastpath import StepLock
    lock = StepLock()
    assert not lock.locked()
    with lock:
        assert lock.locked()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="unlocked"):
        lock.release()


def test_a_step_waits_while_another_thread_holds_the_lock():
    import threading
    p = np.zeros(10)
    opt = fastopt.SGD([p], lr=1.0)
    opt.step([np.ones(10)])  # warm: the next step takes the fast path
    finished = threading.Event()
    with opt._lock:
        worker = threading.Thread(target=lambda: (opt.step([np.ones(10)]), finished.set()))
        worker.start()
        assert not finished.wait(0.2)  # blocked on the lock, nothing written
        assert p[0] == -1.0
    worker.join()
    assert finished.is_set() and p[0] == -2.0


def test_rebinding_an_attribute_the_fast_path_holds_takes_effect():
    params = make_params()
    rng = np.random.default_rng(0)
    opt = fastopt.Adam(params)
    opt.step(grads_like(params, rng))
    opt.step(grads_like(params, rng))  # the fast path is bound now
    opt.skip_nonfinite = True
    grads = grads_like(params, rng)
    grads[0][0] = np.nan
    snap = snapshot(opt, params)
    opt.step(grads)
    assert_unchanged(opt, params, snap)
    assert opt.skipped_steps == 1
    opt.skip_nonfinite = False
    # A new state dict (as load_state_dict makes) is what the next step uses.
    twin_params = [p.copy() for p in params]
    twin = fastopt.Adam(twin_params)
    opt.state = type(opt.state)()
    for _ in range(2):
        grads = grads_like(params, rng)
        opt.step(grads)
        twin.step([g.copy() for g in grads])
    assert opt.state[0]["step"] == 2
    for a, b in zip(params, twin_params):
        np.testing.assert_array_equal(a, b)


def test_a_stepper_made_before_a_rebind_declines_and_is_replaced():
    # Another thread rebinds opt.state while this one is making the Stepper.
    from fastopt._watched import State
    params = [np.ones(3)]
    grads = [np.ones(3)]
    opt = fastopt.Adam(params)
    opt.step(grads)
    make = opt._make_stepper

    def make_while_rebinding():
        stepper = make()
        opt.state = State()
        return stepper
    opt._fast = None
    opt._make_stepper = make_while_rebinding
    opt.step(grads)
    del opt._make_stepper
    for _ in range(3):
        opt.step(grads)
    assert opt.state[0]["step"] == 4  # every step landed in the state opt holds


@pytest.mark.parametrize("groups", [1, 2])
def test_a_step_count_at_the_int64_limit_is_refused_on_the_warm_path(groups):
    params = [np.ones(3) for _ in range(groups)]
    grads = [np.ones(3) for _ in range(groups)]
    opt = fastopt.Adam([{"params": [p]} for p in params])
    opt.step(grads)
    for i in range(groups):
        opt.state[i]["step"] = 2**63 - 2
    opt.step(grads)  # the last count that fits; the next step's would not
    assert opt.state[0]["step"] == 2**63 - 1
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"state\[0\]\['step'\] must be < 2\*\*63 - 1"):
        opt.step(grads)
    assert all(np.array_equal(a, b) for a, b in zip(params, before))
    assert all(opt.state[i]["step"] == 2**63 - 1 for i in range(groups))


def test_large_steps_release_the_gil():
    import threading
    import time
    p = np.zeros(8_000_000, np.float32)
    g = [np.ones_like(p)]
    opt = fastopt.Adam([p])
    opt.step(g)
    ticks = []
    done = threading.Event()

    def count():
        while not done.is_set():
            ticks.append(time.perf_counter())
    counter = threading.Thread(target=count)
    fastopt.set_num_threads(1)
    try:
        counter.start()
        time.sleep(0.01)
        t0 = time.perf_counter()
        for _ in range(5):
            opt.step(g)
        t1 = time.perf_counter()
    finally:
        done.set()
        counter.join()
        fastopt.set_num_threads(fastopt._dispatch._default_threads())
    during = [t for t in ticks if t0 < t < t1]
    assert len(during) > 50  # Python ran in the other thread while the kernels worked


def test_optimizer_pickles_and_copies():
    import pickle
    params = make_params()
    opt = fastopt.Adam(params)
    opt.step(grads_like(params, np.random.default_rng(0)))
    again = pickle.loads(pickle.dumps(opt))
    again.step(grads_like(params, np.random.default_rng(1)))  # its own lock and workspaces
    assert again.state[0]["step"] == 2 and opt.state[0]["step"] == 1


# ------------------------------------------------------- messages for first-time mistakes

def test_step_without_grads_says_what_to_pass():
    w = np.zeros(3)
    opt = fastopt.Adam([w])
    with pytest.raises(TypeError, match=r"Adam.step\(\) needs the gradients: pass a list aligned"):
        opt.step()
    assert not opt.state and np.all(w == 0)


def test_torch_parameters_suggest_the_torch_adapter():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match=r"params\[0\] must be a numpy.ndarray, got Parameter "
                                        r"\(a torch tensor: did you mean fastopt.torch.SGD\?"):
        fastopt.SGD(model.parameters(), lr=0.1)
