"""fastopt/_precision.py and the optimizers' half precision.

The policy (``state_dtype``, ``master_weights``, ``stochastic_rounding``,
``seed``) is checked in fastopt/_precision.py and carried out by the
compute layer's staged storage kinds (src_c/storage.pxi). What is held here:

- ``backend="numpy"`` (fastopt.reference.half_step: widen, float32 twin,
  round back) equals the Cython kernels bit for bit, for every rule and
  option set of tests/spec.py and every (parameter, state) dtype pair, with
  master weights and with stochastic rounding, at sizes around the staging
  block and with NaN/Inf in the gradient. "Bit for bit" is docs/numerics.rst's
  "byte for byte, or element for element with NaN in the same places": the
  sign of a NaN is not part of the promise (under ``maximize`` the kernels
  keep a NaN gradient's sign where NumPy's negation flips it, in float32 too).
- a master copy is exactly the float32 optimizer fed the upcast gradients;
- stochastic rounding is unbiased, moves a parameter by updates far below
  half an ulp, and its bits depend on (seed, step, parameter index, element
  index) only: not on threads, SIMD level, groups or a checkpoint resume;
- the compute layer's conversions and random bits equal fastopt.reference's
  integer twins at every SIMD level;
- bad options and bad inputs are refused before anything changes.

bfloat16 is ml_dtypes.bfloat16 in NumPy: the bfloat16 parts skip without
ml_dtypes, the float16 ones still run.
"""
import importlib
import inspect
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastopt
from fastopt import _dispatch, _fastpath, _precision, reference
from fastopt.optim import OPTIMIZERS

import spec  # tests/spec.py

LEVELS = [lvl for lvl in _dispatch.built_levels() if lvl in _dispatch.cpu_levels()]
STAGE = 1024  # src_c/storage.pxi's staging block
#: parameter shapes of the sweeps: odd tails around the block, matrices for
#: Adafactor's factored path, and a last one whose gradient holds NaN and Inf
SHAPES = [(1,), (STAGE - 1,), (STAGE + 1,), (1000 + 17,), (17, 33), (3, 300), (300,)]
NONFINITE = len(SHAPES) - 1
#: the parameter that gets no gradient on step 3 (so step 4 runs uneven steps)
SKIPPED = 1
STEPS = 4


def dtype(name):
    """The NumPy dtype of an element name; bfloat16 skips the test without ml_dtypes."""
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip(
            "ml_dtypes", reason="ml_dtypes is not installed: NumPy has no bfloat16")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def needs_dtypes(p_name, precision):
    """The parameter's dtype (skipping as dtype() does for every dtype the policy names)."""
    if precision.get("state_dtype"):
        dtype(precision["state_dtype"])
    return dtype(p_name)


def module(level):
    return importlib.import_module(f"fastopt._kernels_{level}")


def bits(a):
    """The raw bits of an array, flat, as unsigned integers of its item size."""
    a = np.ascontiguousarray(a).reshape(-1)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same(got, want, what):
    """Same dtype and shape, NaN in the same places, every other element bit for bit."""
    assert isinstance(got, np.ndarray) and isinstance(want, np.ndarray), what
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    nan_got = np.isnan(np.asarray(got, np.float64)).reshape(-1)
    nan_want = np.isnan(np.asarray(want, np.float64)).reshape(-1)
    np.testing.assert_array_equal(nan_got, nan_want, err_msg=f"{what}: NaN in other places")
    np.testing.assert_array_equal(bits(got)[~nan_got], bits(want)[~nan_want],
                                  err_msg=f"{what}: bits differ")


def assert_same_state(got, want, what):
    """Two optimizers' state dicts: the same keys, arrays as assert_same, scalars equal."""
    assert set(got) == set(want), f"{what}: state {sorted(got)} != {sorted(want)}"
    for index in want:
        assert set(got[index]) == set(want[index]), \
            f"{what}: state[{index}] keys {sorted(got[index])} != {sorted(want[index])}"
        for key, value in want[index].items():
            where = f"{what}: state[{index}][{key!r}]"
            if isinstance(value, np.ndarray):
                assert_same(got[index][key], value, where)
            elif isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[index][key]), where
            else:
                assert got[index][key] == value, f"{where}: {got[index][key]!r} != {value!r}"


def assert_same_run(params, want_params, opt, want_opt, what):
    """Two runs' parameters (assert_same) and optimizer states (assert_same_state)."""
    for i, (a, b) in enumerate(zip(params, want_params)):
        assert_same(a, b, f"{what}: params[{i}]")
    assert_same_state(opt.state, want_opt.state, what)

def random_like(rng, shape, dt, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dt)


# --------------------------------------------------- kernels vs the twins

#: (id, parameter dtype, precision options): every (parameter, state) pair
CONFIGS = [
    ("f16", "float16", {}),
    ("bf16", "bfloat16", {}),
    ("f32-state-bf16", "float32", {"state_dtype": "bfloat16"}),
    ("f32-state-f16", "float32", {"state_dtype": "float16"}),
    ("bf16-state-f32", "bfloat16", {"state_dtype": "float32"}),
    ("f16-state-f32", "float16", {"state_dtype": "float32"}),
    ("f16-state-bf16", "float16", {"state_dtype": "bfloat16"}),
    ("bf16-master", "bfloat16", {"master_weights": True}),
    ("f16-master", "float16", {"master_weights": True}),
    ("bf16-master-state-bf16", "bfloat16", {"master_weights": True, "state_dtype": "bfloat16"}),
    ("bf16-sr", "bfloat16", {"stochastic_rounding": True, "seed": 7}),
    ("f16-sr", "float16", {"stochastic_rounding": True, "seed": 2**64 - 1}),
    ("f32-state-bf16-sr", "float32", {"state_dtype": "bfloat16", "stochastic_rounding": True,
                                      "seed": 12345}),
    ("bf16-master-state-bf16-sr", "bfloat16", {"master_weights": True, "state_dtype": "bfloat16",
                                               "stochastic_rounding": True, "seed": 3}),
]
#: the configurations the optimizer-class cases also run under
CLASS_CONFIGS = [c for c in CONFIGS
                 if c[0] in ("bf16", "f16-sr", "f32-state-bf16-sr", "bf16-master-state-bf16")]


def sweep_run(cls, kwargs, p_name, precision, backend, shapes=SHAPES, steps=STEPS, seed=0):
    """``steps`` steps of ``cls`` on params of ``shapes``; (params, optimizer)."""
    dt = needs_dtypes(p_name, precision)
    rng = np.random.default_rng(seed)
    params = [random_like(rng, s, dt) for s in shapes]
    opt = cls(params, **kwargs, backend=backend, **precision)
    for t in range(1, steps + 1):
        grads = [random_like(rng, s, dt, 2.0) for s in shapes]
        flat = grads[NONFINITE].reshape(-1)
        flat[[3, 50, 200, 201]] = [np.nan, np.inf, -np.inf, np.nan]
        if t == 3:
            grads[SKIPPED] = None
        with np.errstate(all="ignore"):
            opt.step(grads)
    return params, opt


def assert_backends_agree(cls, kwargs, p_name, precision):
    with np.errstate(all="ignore"):
        fast_p, fast = sweep_run(cls, kwargs, p_name, precision, "cython")
        slow_p, slow = sweep_run(cls, kwargs, p_name, precision, "numpy")
    for i, (a, b) in enumerate(zip(fast_p, slow_p)):
        assert a.dtype == needs_dtypes(p_name, precision)
        assert_same(a, b, f"params[{i}]")
    assert_same_state(fast.state, slow.state, "cython vs numpy")
    return fast


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0])
@pytest.mark.parametrize("case", spec.kernel_cases(), ids=spec.case_id)
def test_kernels_equal_the_numpy_twin_for_every_rule_and_dtype_pair(case, config):
    _, rule_name, options = case
    cls = getattr(fastopt, spec.rule(rule_name).classes[0].name)
    _, p_name, precision = config
    opt = assert_backends_agree(cls, spec.kernel_kwargs(rule_name, options), p_name, precision)
    # The state is stored as the policy says, and exists for what it should.
    p_element = _precision.element(needs_dtypes(p_name, precision))
    policy = _precision.check(**precision)
    for i, shape in enumerate(SHAPES):
        state = opt.state[i]
        for name in spec.buffers_for(rule_name, spec.kernel_kwargs(rule_name, options), shape):
            assert state[name].dtype == dtype(policy.state_element(p_element)), name
        if policy.has_master(p_element):
            assert state["master_param"].dtype == np.float32
            assert state["master_param"].shape == shape
        else:
            assert "master_param" not in state
        if policy.stochastic_rounding or spec.rule(rule_name).step_arg == "step":
            assert state["step"] == (STEPS - 1 if i == SKIPPED else STEPS)


@pytest.mark.parametrize("config", CLASS_CONFIGS, ids=lambda c: c[0])
@pytest.mark.parametrize("case", spec.optimizer_cases(), ids=spec.case_id)
def test_every_optimizer_class_case_equals_the_numpy_twin(case, config):
    _, cls, kwargs = case
    assert_backends_agree(cls, kwargs, config[1], config[2])


MIXED_CONFIGS = [("plain", {}), ("sr", {"stochastic_rounding": True, "seed": 5}),
                 ("master-sr", {"master_weights": True, "stochastic_rounding": True, "seed": 6})]


@pytest.mark.parametrize("config", MIXED_CONFIGS, ids=lambda c: c[0])
@pytest.mark.parametrize("rule_name", spec.rule_names())
def test_one_optimizer_over_every_dtype_equals_the_numpy_twin(rule_name, config):
    """bfloat16, float16, float32 and float64 parameters (and an empty one) in two groups."""
    bf16 = dtype("bfloat16")
    cls = getattr(fastopt, spec.rule(rule_name).classes[0].name)
    kwargs = spec.kernel_kwargs(rule_name)
    layout = [(bf16, (300,)), (np.float16, (20, 13)), (np.float32, (257,)),
              (np.float64, (5, 7)), (bf16, (0,)), (np.float16, (STAGE + 9,))]
    runs = []
    for backend in ("cython", "numpy"):
        rng = np.random.default_rng(2)
        params = [random_like(rng, s, d) for d, s in layout]
        opt = cls([{"params": params[:3]}, {"params": params[3:]}], **kwargs, backend=backend,
                  **config[1])
        for _ in range(3):
            opt.step([random_like(rng, s, d) for d, s in layout])
        runs.append((params, opt))
    (fast_p, fast), (slow_p, slow) = runs
    for i, (a, b) in enumerate(zip(fast_p, slow_p)):
        assert a.dtype == layout[i][0]
        assert_same(a, b, f"params[{i}]")
    assert_same_state(fast.state, slow.state, "cython vs numpy")


@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("p_name", ["bfloat16", "float16"])
def test_skip_nonfinite_reads_half_gradients(p_name, backend):
    dt = dtype(p_name)
    p = np.ones(300, dt)
    opt = fastopt.Adam([p], lr=0.1, skip_nonfinite=True, stochastic_rounding=True,
                       backend=backend)
    for bad in (np.nan, np.inf, -np.inf):
        g = np.ones(300, dt)
        g[277] = bad
        opt.step([g])
    assert opt.skipped_steps == 3 and 0 not in opt.state
    assert (bits(p) == bits(np.ones(1, dt))[0]).all()
    opt.step([np.ones(300, dt)])
    assert opt.skipped_steps == 3 and opt.state[0]["step"] == 1
    assert (p.astype(np.float32) < 1).all()


# --------------------------------------------------------- master weights

#: (id, precision options but master_weights) the float32 twin optimizer shares
MASTER_STATES = [
    ("state-f32", {}),
    ("state-f16", {"state_dtype": "float16"}),
    ("state-bf16-sr", {"state_dtype": "bfloat16", "stochastic_rounding": True, "seed": 99}),
]


@pytest.mark.parametrize("state", MASTER_STATES, ids=lambda s: s[0])
@pytest.mark.parametrize("p_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", spec.kernel_cases(), ids=spec.case_id)
def test_master_weights_are_the_float32_optimizer_fed_upcast_gradients(case, p_name, state):
    _, rule_name, options = case
    cls = getattr(fastopt, spec.rule(rule_name).classes[0].name)
    kwargs = spec.kernel_kwargs(rule_name, options)
    precision = state[1]
    dt = needs_dtypes(p_name, precision)
    shapes = [(STAGE + 1,), (1000 + 17,), (17, 33)]
    rng = np.random.default_rng(5)
    half = [random_like(rng, s, dt) for s in shapes]
    wide = [p.astype(np.float32) for p in half]
    half_opt = cls(half, **kwargs, master_weights=True, **precision)
    wide_opt = cls(wide, **kwargs, **precision)
    for _ in range(3):
        grads = [random_like(rng, s, dt, 2.0) for s in shapes]
        half_opt.step(grads)
        wide_opt.step([g.astype(np.float32) for g in grads])
    twin = reference.bfloat16_bits if p_name == "bfloat16" else reference.float16_bits
    for i, (p, w) in enumerate(zip(half, wide)):
        master = half_opt.state[i]["master_param"]
        assert_same(master, w, f"master_param {i}")
        # the parameter is its master rounded to nearest even
        np.testing.assert_array_equal(bits(p), twin(master.reshape(-1)))
    assert_same_state({i: {k: v for k, v in s.items() if k != "master_param"}
                       for i, s in half_opt.state.items()}, wide_opt.state, "state")


def test_master_weights_leave_float32_and_float64_parameters_alone():
    rng = np.random.default_rng(6)
    for dt in (np.float32, np.float64):
        p = random_like(rng, 300, dt)
        q = p.copy()
        opt = fastopt.Adam([p], lr=0.05, master_weights=True)
        plain = fastopt.Adam([q], lr=0.05)
        for _ in range(3):
            g = random_like(rng, 300, dt)
            opt.step([g])
            plain.step([g])
        assert "master_param" not in opt.state[0]
        assert opt.state[0]["exp_avg"].dtype == dt
        assert_same(p, q, str(dt))
        assert_same_state(opt.state, plain.state, str(dt))



# ------------------------------------------------------ the warm step in C

@pytest.mark.parametrize("rule", [("Adam", {"lr": 0.01}),
                                  ("SGD", {"lr": 0.1, "momentum": 0.9})], ids=lambda r: r[0])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0])
def test_a_warm_step_under_every_policy_is_taken_in_c_with_the_twins_bits(config, rule):
    """Once the state exists (masters included), every step of every policy
    is the fast path's (src_c/fastpath/policy.pxi): the Stepper takes it, and
    its bits - round keys of each step, counted steps of a rule that counts
    none (SGD under stochastic rounding) - are those of the NumPy twin."""
    _, p_name, precision = config
    cls, kwargs = getattr(fastopt, rule[0]), rule[1]
    dt = needs_dtypes(p_name, precision)
    rng = np.random.default_rng(8)
    shapes = [(STAGE + 3,), (7, 5), (1,)]
    params = [random_like(rng, s, dt) for s in shapes]
    twins = [p.copy() for p in params]
    opt = cls(params, **kwargs, **precision)
    ref = cls(twins, **kwargs, backend="numpy", **precision)
    for t in range(5):
        grads = [random_like(rng, s, dt, 2.0) for s in shapes]
        if t == 0:
            opt.step(grads)  # makes the state: the general path
        else:
            assert opt._make_stepper()(grads), f"step {t + 1} was not taken in C"
        ref.step(grads)
    assert_same_run(params, twins, opt, ref, "fast path vs twin")


def test_a_master_copy_spoiled_in_place_leaves_the_warm_path():
    """A master copy made read-only without a state edit is refused, as a new one is."""
    bf16 = dtype("bfloat16")
    p = np.ones(300, bf16)
    opt = fastopt.Adam([p], lr=0.1, master_weights=True)
    for _ in range(3):
        opt.step([np.ones(300, bf16)])  # warm: the cached slots hold the master
    master = opt.state[0]["master_param"]
    before, master_before = p.copy(), master.copy()
    master.flags.writeable = False
    with pytest.raises(ValueError, match="master_param"):
        opt.step([np.ones(300, bf16)])
    assert_same(p, before, "p")
    assert_same(master, master_before, "master_param")
    assert opt.state[0]["step"] == 3
    master.flags.writeable = True
    opt.step([np.ones(300, bf16)])
    assert opt.state[0]["step"] == 4


# ------------------------------------------------------ stochastic rounding

@pytest.mark.parametrize("p_name", ["bfloat16", "float16"])
def test_stochastic_rounding_keeps_updates_far_below_half_an_ulp(p_name):
    dt = dtype(p_name)
    n, steps, lr = 10_000, 1000, 1e-4  # each update: 1e-4; half an ulp below 1.0 is 2**-9 (bf16)
    g = np.ones(n, dt)
    nearest, stochastic = np.ones(n, dt), np.ones(n, dt)
    wide = np.ones(n, np.float32)
    opts = [fastopt.SGD([nearest], lr=lr),
            fastopt.SGD([stochastic], lr=lr, stochastic_rounding=True, seed=2024),
            fastopt.SGD([wide], lr=lr)]
    for _ in range(steps):
        opts[0].step([g])
        opts[1].step([g])
        opts[2].step([np.ones(n, np.float32)])
    assert (bits(nearest) == bits(np.ones(1, dt))[0]).all()  # never moves
    assert opts[1].state[0]["step"] == steps and "step" not in opts[0].state.get(0, {})
    moved = 1.0 - float(wide[0])
    assert 0.099 < moved < 0.101
    mean = 1.0 - stochastic.astype(np.float64).mean()
    print(f"\n{p_name}: float32 moved {moved:.6f}, stochastic rounding's mean {mean:.6f}")
    assert abs(mean - moved) <= 0.02 * moved
    assert len(np.unique(bits(stochastic))) > 3  # the elements went their own ways


#: (id, class, kwargs, parameter dtype, precision options, shape): big enough to split
SPLIT_RUNS = [
    ("adam-bf16", "Adam", {"lr": 0.01}, "bfloat16", {}, (200_000,)),
    ("adam-f16-state-bf16", "Adam", {"lr": 0.01, "amsgrad": True}, "float16",
     {"state_dtype": "bfloat16"}, (200_003,)),
    ("sgd-momentum-f32-state-bf16", "SGD", {"lr": 0.1, "momentum": 0.9}, "float32",
     {"state_dtype": "bfloat16"}, (200_001,)),
    ("adafactor-f16", "Adafactor", {"lr": 0.05}, "float16", {}, (400, 501)),
]


def split_run(name, kwargs, p_name, precision, shape, seed=11, backend="cython", steps=3):
    dt = needs_dtypes(p_name, precision)
    rng = np.random.default_rng(1)
    p = random_like(rng, shape, dt)
    opt = getattr(fastopt, name)([p], **kwargs, stochastic_rounding=True, seed=seed,
                                 backend=backend, **precision)
    for _ in range(steps):
        opt.step([random_like(rng, shape, dt)])
    return [p] + [v for k, v in sorted(opt.state[0].items()) if isinstance(v, np.ndarray)]


@pytest.mark.parametrize("run", SPLIT_RUNS, ids=lambda r: r[0])
def test_stochastic_bits_do_not_depend_on_threads_or_simd_level(run):
    _, name, kwargs, p_name, precision, shape = run
    want = split_run(name, kwargs, p_name, precision, shape, backend="numpy")
    level, threads = _dispatch.simd_level(), _dispatch.get_num_threads()
    try:
        for lvl in LEVELS:
            _dispatch.select_simd(lvl)
            # (work = elements x the rule's cost: these sizes run on every thread)
            assert math.prod(shape) > module(lvl).get_parallel_min_work()
            for t in (1, 2):
                _dispatch.set_num_threads(t)
                assert _dispatch.get_num_threads() == t
                got = split_run(name, kwargs, p_name, precision, shape)
                for j, (a, b) in enumerate(zip(got, want)):
                    assert_same(a, b, f"{lvl}, {t} threads, array {j}")
    finally:
        _dispatch.set_num_threads(threads)
        _dispatch.select_simd(level)


def test_seeds_choose_the_stream():
    run = SPLIT_RUNS[0][1:]
    first = split_run(*run, seed=1)
    again = split_run(*run, seed=1)
    other = split_run(*run, seed=2)
    for a, b in zip(first, again):
        assert_same(a, b, "same seed")
    differ = (bits(first[0]) != bits(other[0])).mean()
    assert differ > 0.05, f"only {differ:.1%} of the parameter's bits differ between seeds"


def test_stochastic_bits_are_those_of_seed_step_index_and_element():
    """SGD's p is p - lr * g rounded with the bits of (seed, step, flat index, element)."""
    bf16 = dtype("bfloat16")
    rng = np.random.default_rng(3)
    shapes = [(300,), (STAGE + 5,), (40,)]
    params = [random_like(rng, s, bf16) for s in shapes]
    kept = [p.copy() for p in params]
    seed, lr = 2**63 + 17, 0.01
    # three groups: the index is the flat one, whatever the grouping
    opt = fastopt.SGD([{"params": [params[0]]}, {"params": params[1:]}], lr=lr,
                      stochastic_rounding=True, seed=seed)
    policy = _precision.check(stochastic_rounding=True, seed=seed)
    for step in (1, 2):
        grads = [random_like(rng, s, bf16) for s in shapes]
        grads[2] = None if step == 2 else grads[2]  # index 2 stays at step 1
        opt.step(grads)
        for index, g in enumerate(grads):
            if g is None:
                continue
            x = kept[index].astype(np.float32) - np.float32(lr) * g.astype(np.float32)
            key = reference.stream_key(policy.round_key(step, index), 0)
            want = reference.bfloat16_bits(x, reference.random_bits(key, 0, x.size))
            np.testing.assert_array_equal(bits(params[index]), want,
                                          err_msg=f"step {step}, index {index}")
            kept[index] = params[index].copy()
    assert [opt.state[i]["step"] for i in range(3)] == [2, 2, 1]


def test_stochastic_rounding_survives_a_state_dict_resume():
    bf16 = dtype("bfloat16")
    rng = np.random.default_rng(4)
    shapes = [(STAGE * 3 + 7,), (33, 17)]
    start = [random_like(rng, s, bf16) for s in shapes]
    grads = [[random_like(rng, s, bf16) for s in shapes] for _ in range(6)]
    options = dict(lr=0.01, state_dtype="bfloat16", stochastic_rounding=True, seed=77)

    whole = [p.copy() for p in start]
    opt = fastopt.Adam(whole, **options)
    for g in grads:
        opt.step(g)

    first = [p.copy() for p in start]
    before = fastopt.Adam(first, **options)
    for g in grads[:3]:
        before.step(g)
    saved = before.state_dict()
    at_save = [p.copy() for p in first]
    for g in grads[3:]:  # the snapshot is a copy: later steps leave it alone
        before.step(g)

    resumed_params = [p.copy() for p in at_save]
    resumed = fastopt.Adam(resumed_params, **options)
    resumed.load_state_dict(saved)
    assert resumed.state[0]["exp_avg"].dtype == bf16 and resumed.state[0]["step"] == 3
    for g in grads[3:]:
        resumed.step(g)
    for i, (a, b) in enumerate(zip(resumed_params, whole)):
        assert_same(a, b, f"params[{i}]")
    assert_same_state(resumed.state, opt.state, "resumed")
    # ... and the stream is the seed's: another seed's resume goes elsewhere
    other = [p.copy() for p in at_save]
    elsewhere = fastopt.Adam(other, **{**options, "seed": 78})
    elsewhere.load_state_dict(saved)
    for g in grads[3:]:
        elsewhere.step(g)
    assert (bits(other[0]) != bits(whole[0])).any()


def test_stochastic_rounding_counts_steps_and_leaves_float32_bits_alone():
    rng = np.random.default_rng(8)
    p = random_like(rng, 500, np.float32)
    q = p.copy()
    sr = fastopt.SGD([p], lr=0.1, momentum=0.9, stochastic_rounding=True, seed=5)
    plain = fastopt.SGD([q], lr=0.1, momentum=0.9)
    for _ in range(3):
        g = random_like(rng, 500, np.float32)
        sr.step([g])
        plain.step([g])
    assert sr.state[0]["step"] == 3 and "step" not in plain.state[0]
    assert_same(p, q, "params")
    assert_same(sr.state[0]["momentum_buffer"], plain.state[0]["momentum_buffer"], "momentum")


# ------------------------------------- the compute layer's conversions vs the twins

def interesting_floats(rng, n=100_000):
    """Random bit patterns (every exponent) and the edges of both 16-bit formats."""
    random = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([0.0, 1.0, 65504, 65519.996, 65520, 65536, 2**-14, 2**-24, 2**-25,
                      1.5 * 2**-25, 2**-26, 2**-37, 2**-38, 3 * 2**-25, np.inf, np.nan, 3.4e38,
                      3.3895314e38, 1e-45, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11,
                      1.0 + 3 * 2**-11, 0.1, 1 / 3], np.float32)
    return np.concatenate([random, edges, -edges])


def twin_of(dtype_name):
    return reference.bfloat16_bits if dtype_name == "bfloat16" else reference.float16_bits


KEYS = [0, 1, 0x1234_5678_9ABC_DEF0, 2**63 - 1, 2**63, 2**63 + 0xDEAD_BEEF, 2**64 - 1]
STARTS = [0, 5, 2**32 - 7, 2**32, 2**40 + 3]


@pytest.mark.parametrize("level", LEVELS)
def test_random_bits_and_stream_keys_equal_their_twins(level):
    m = module(level)
    for key in KEYS:
        for start in STARTS:
            out = np.zeros(61, np.uint32)
            m.random_bits(key, start, out)
            np.testing.assert_array_equal(out, reference.random_bits(key, start, 61),
                                          err_msg=f"key {key:#x}, start {start}")
        for stream in (0, 1, 2, 4, 2**63 + 1, 2**64 - 1):
            assert m.stream_key(key, stream) == reference.stream_key(key, stream)
    # a key is a 64-bit key: its high half matters, as does the index's
    a, b = np.zeros(8, np.uint32), np.zeros(8, np.uint32)
    m.random_bits(5, 0, a)
    m.random_bits(5 + 2**32, 0, b)
    assert (a != b).all()
    m.random_bits(5, 2**32, b)
    assert (a != b).all()


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("level", LEVELS)
def test_narrow_and_widen_equal_the_twins(level, dtype_name):
    m = module(level)
    twin = twin_of(dtype_name)
    x = interesting_floats(np.random.default_rng(9))
    out = np.zeros(x.size, np.uint16)
    m.narrow(dtype_name, x, out)
    np.testing.assert_array_equal(out, twin(x))
    for key in (3, 2**63 + 5, 2**64 - 1):
        for start in (0, 2**32 - 1000):  # (elements crossing 2**32)
            m.narrow(dtype_name, x, out, key=key, start=start)
            np.testing.assert_array_equal(
                out, twin(x, reference.random_bits(key, start, x.size)),
                err_msg=f"key {key:#x}, start {start}")
    # every 16-bit value widens to what the twin rounds back to it
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    wide = np.zeros(every.size, np.float32)
    m.widen(dtype_name, every, wide)
    nan = np.isnan(wide)
    assert nan.sum() == (2 * 127 if dtype_name == "bfloat16" else 2 * 1023)
    np.testing.assert_array_equal(twin(wide)[~nan], every[~nan])
    if dtype_name == "float16":
        np.testing.assert_array_equal(wide[~nan], every.view(np.float16)[~nan].astype(np.float32))
    else:
        np.testing.assert_array_equal(bits(wide)[~nan], every[~nan].astype(np.uint32) << 16)


def neighbours(x, dtype_name):
    """The bits of the two values of ``dtype_name`` around float32 ``x``: (toward 0, away)."""
    twin = twin_of(dtype_name)
    nearest = twin(np.array([x], np.float32))
    wide = np.zeros(1, np.float32)
    module(LEVELS[0]).widen(dtype_name, nearest, wide)
    n = int(nearest[0])
    return (n, n + 1) if abs(float(wide[0])) <= abs(x) else (n - 1, n)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("level", LEVELS)
def test_stochastic_rounding_is_unbiased(level, dtype_name):
    m = module(level)
    draws = 1_000_000
    values = [1.0 + 2**-9 + 2**-12, -(3.0 + 2**-10), 0.1, 1 / 3]
    values += [3.3e-6, -1e-7] if dtype_name == "float16" else [1e-30, -2.5e30]
    for n, x in enumerate(values):
        x = float(np.float32(x))
        toward, away = neighbours(x, dtype_name)
        out = np.zeros(draws, np.uint16)
        m.narrow(dtype_name, np.full(draws, x, np.float32), out, key=1000 + n, start=n * 2**31)
        assert set(np.unique(out)) <= {toward, away}, f"{x}: not one of its two neighbours"
        wide = np.zeros(draws, np.float32)
        m.widen(dtype_name, out, wide)
        lo, hi = sorted(float(v) for v in np.unique(wide))
        assert lo <= x <= hi
        up = (x - lo) / (hi - lo)
        sd = (hi - lo) * math.sqrt(up * (1 - up) / draws)
        mean = wide.astype(np.float64).mean()
        assert abs(mean - x) <= 6 * sd, f"{x}: mean {mean!r}, off by {abs(mean - x) / sd:.1f} sd"
        # the twin draws the very same values
        np.testing.assert_array_equal(
            out, twin_of(dtype_name)(np.full(draws, x, np.float32),
                                     reference.random_bits(1000 + n, n * 2**31, draws)))
    # an exactly representable value never moves
    exact = np.full(10_000, 1.5, np.float32)
    out = np.zeros(exact.size, np.uint16)
    m.narrow(dtype_name, exact, out, key=42)
    assert (out == twin_of(dtype_name)(exact[:1])[0]).all()


# ---------------------------------------------------------- the policy module

def test_check_refuses_bad_options():
    p = [np.zeros(3, np.float32)]
    for bad in ("int8", 3, "float64", np.float64, "half"):
        with pytest.raises(ValueError, match="state_dtype"):
            fastopt.Adam(p, state_dtype=bad)
    with pytest.raises(TypeError, match="master_weights"):
        fastopt.Adam(p, master_weights="yes")
    with pytest.raises(TypeError, match="stochastic_rounding"):
        fastopt.Adam(p, stochastic_rounding=1)
    with pytest.raises(ValueError, match="seed"):
        fastopt.Adam(p, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        fastopt.Adam(p, seed=2**64)
    for bad in (1.5, True, "1", None):
        with pytest.raises(TypeError, match="seed"):
            fastopt.Adam(p, seed=bad)


def test_check_accepts_dtype_objects_and_numpy_scalars():
    assert _precision.check(np.float16).state_dtype == "float16"
    assert _precision.check(np.dtype("float32")).state_dtype == "float32"
    assert _precision.check("torch.float16").state_dtype == "float16"
    assert _precision.check(dtype("bfloat16")).state_dtype == "bfloat16"
    policy = _precision.check("bfloat16", np.bool_(True), np.bool_(False), np.uint64(2**64 - 1))
    assert policy == _precision.Precision("bfloat16", True, False, 2**64 - 1)
    assert type(policy.master_weights) is bool and type(policy.seed) is int
    assert _precision.check(**policy.options()) == policy
    assert _precision.Precision().plain and not policy.plain


def test_elements_and_storage_kinds():
    assert _precision.element(np.float32) == "float32"
    assert _precision.element(np.float16) == "float16"
    assert _precision.element(np.float64) == "float64"
    for other in (np.int16, np.uint16, np.complex64, np.dtype(">f4"), np.longdouble):
        if np.dtype(other) != np.float64:
            assert _precision.element(other) is None, other
    assert _precision.element(dtype("bfloat16")) == "bfloat16"
    assert _precision.numpy_dtype("bfloat16") == dtype("bfloat16")
    # the policy's state element for each parameter element
    plain, master = _precision.check(), _precision.check(master_weights=True)
    half_state = _precision.check("float16", master_weights=True)
    for p in _precision.ELEMENTS:
        assert plain.state_element(p) == p
        assert master.state_element(p) == ("float32" if p in _precision.HALF else p)
        assert half_state.state_element(p) == ("float64" if p == "float64" else "float16")
        assert master.has_master(p) == (p in _precision.HALF)
        assert plain.kind(p) == _fastpath.STORAGE_IDS[(p, p)]
    assert len(set(_fastpath.STORAGE_IDS.values())) == len(_fastpath.STORAGE_IDS)
    # what rounds stochastically: a half store, nothing else
    sr = dict(stochastic_rounding=True)
    assert not _precision.check(**sr).rounds_stochastically("float32")
    assert _precision.check(**sr).rounds_stochastically("bfloat16")
    assert not _precision.check(master_weights=True, **sr).rounds_stochastically("float16")
    assert _precision.check("bfloat16", master_weights=True, **sr).rounds_stochastically("float16")
    assert _precision.check("float16", **sr).rounds_stochastically("float32")
    assert not _precision.check("float16").rounds_stochastically("float32")


def test_round_keys_are_splitmix64_of_seed_step_and_index():
    # SplitMix64's first two outputs from state 0 (Vigna's reference implementation)
    assert _precision._splitmix64(0) == 0xE220A8397B1DCDAF
    assert _precision._splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    assert _precision.check().round_key(1, 0) is None
    policy = _precision.check(stochastic_rounding=True, seed=2**64 - 1)
    keys = {policy.round_key(step, index) for step in range(1, 50) for index in range(50)}
    assert len(keys) == 49 * 50 and all(0 <= k < 2**64 for k in keys)
    assert policy.round_key(3, 4) == _precision.check(stochastic_rounding=True,
                                                      seed=2**64 - 1).round_key(3, 4)
    assert policy.round_key(3, 4) != _precision.check(stochastic_rounding=True,
                                                      seed=1).round_key(3, 4)


def test_cast_copies_rounding_to_nearest_even():
    x = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1 + 2**-11)], np.float32)[::-1]
    bf = _precision.cast(x, dtype("bfloat16"))
    assert bf.flags.c_contiguous and bf.dtype == dtype("bfloat16")
    np.testing.assert_array_equal(bits(bf), reference.bfloat16_bits(x))
    h = _precision.cast(x, np.float16)
    assert not np.shares_memory(h, x)
    np.testing.assert_array_equal(bits(h), reference.float16_bits(x))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_names_the_four_keywords(name):
    params = inspect.signature(OPTIMIZERS[name]).parameters
    for key, default in _precision.Precision()._asdict().items():
        assert params[key].kind is inspect.Parameter.KEYWORD_ONLY, key
        assert params[key].default == default, key
    assert OPTIMIZERS[name]([np.zeros(2, np.float16)], stochastic_rounding=True,
                            seed=3).precision.seed == 3


# ------------------------------------------------------------- validation

def test_float64_parameters_refuse_another_state_dtype():
    for state_dtype in ("bfloat16", "float16", "float32"):
        if state_dtype == "bfloat16":
            dtype("bfloat16")
        with pytest.raises(ValueError, match=r"params\[1\] is float64"):
            fastopt.Adam([np.zeros(3, np.float32), np.zeros(3)], state_dtype=state_dtype)
    opt = fastopt.Adam([np.zeros(3)], master_weights=True, stochastic_rounding=True)
    opt.step([np.ones(3)])
    assert opt.state[0]["exp_avg"].dtype == np.float64 and "master_param" not in opt.state[0]


@pytest.mark.parametrize("precision", [{}, {"stochastic_rounding": True},
                                       {"master_weights": True}],
                         ids=["plain", "sr", "master"])
@pytest.mark.parametrize("p_name, g_name", [("float16", "float32"), ("float16", "bfloat16"),
                                             ("bfloat16", "float16"), ("float32", "float16"),
                                             ("bfloat16", "float32")])
def test_a_gradient_of_another_dtype_is_refused(p_name, g_name, precision):
    p = np.ones(10, dtype(p_name))
    g = np.ones(10, dtype(g_name))
    opt = fastopt.Adam([p], lr=0.1, **precision)
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype"):
        opt.step([g])
    assert (p.astype(np.float32) == 1).all() and 0 not in opt.state


@pytest.mark.parametrize("precision, wrong", [
    ({}, "float32"),
    ({}, "float64"),
    ({"stochastic_rounding": True, "seed": 4}, "the other half type"),
    ({"state_dtype": "float32"}, "bfloat16"),
    ({"state_dtype": "float16", "master_weights": True}, "float32"),
])
@pytest.mark.parametrize("p_name", ["bfloat16", "float16"])
def test_a_wrong_dtype_state_buffer_is_refused_and_nothing_changes(p_name, precision, wrong):
    dt = needs_dtypes(p_name, precision)
    if wrong == "the other half type":
        wrong = "bfloat16" if p_name == "float16" else "float16"
    wrong = dtype(wrong)
    rng = np.random.default_rng(10)
    params = [random_like(rng, 40, dt), random_like(rng, 30, dt)]
    opt = fastopt.Adam(params, lr=0.1, **precision)
    grads = [random_like(rng, 40, dt), random_like(rng, 30, dt)]
    opt.step(grads)
    if np.dtype(wrong) == opt.state[1]["exp_avg_sq"].dtype:
        pytest.fail("the case must put in a dtype the policy does not store")
    opt.state[1]["exp_avg_sq"] = np.full(30, 0.5, wrong)
    before = [p.copy() for p in params]
    state = opt.state_dict()["state"]
    with pytest.raises(TypeError, match=r"state\[1\]\['exp_avg_sq'\] has dtype"):
        opt.step(grads)
    for a, b in zip(params, before):
        assert_same(a, b, "params")
    assert_same_state(opt.state, state, "after the refused step")


def test_a_master_copy_of_another_dtype_or_shape_is_refused():
    bf16 = dtype("bfloat16")
    p = np.ones(8, bf16)
    opt = fastopt.Adam([p], lr=0.1, master_weights=True)
    opt.step([np.ones(8, bf16)])
    p_before, master_before = p.copy(), opt.state[0]["master_param"].copy()
    for bad in (np.zeros(8, bf16), np.zeros(8, np.float64), np.zeros(9, np.float32)):
        opt.state[0]["master_param"] = bad
        with pytest.raises(TypeError, match="master_param"):
            opt.step([np.ones(8, bf16)])
        assert_same(p, p_before, "p")
        assert opt.state[0]["step"] == 1
    opt.state[0]["master_param"] = master_before
    opt.step([np.ones(8, bf16)])
    assert opt.state[0]["step"] == 2


def test_complex_parameters_with_half_state_are_stepped_as_their_real_view_or_refused(tmp_path):
    """A complex64 parameter with state_dtype="bfloat16"/"float16" (run in a child process:
    a wrong-size state buffer is a write past its end)."""
    script = textwrap.dedent("""
        import faulthandler
        import numpy as np, fastopt
        faulthandler.enable()
        rng = np.random.default_rng(0)
        n = 1000
        p0 = (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(np.complex64)
        g = (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(np.complex64)
        state_dtypes = ["float16"]
        try:
            import ml_dtypes  # noqa: F401
            state_dtypes.append("bfloat16")
        except ImportError:
            pass
        for backend in ("numpy", "cython"):  # (numpy's outcome is reported if cython crashes)
            for state_dtype in state_dtypes:
                p = p0.copy()
                try:
                    opt = fastopt.Adam([p], lr=0.1, state_dtype=state_dtype, backend=backend)
                    for _ in range(3):
                        opt.step([g])
                except (TypeError, ValueError) as e:
                    ok = "state_dtype" in str(e) and np.array_equal(p, p0)
                    print(state_dtype, backend, "refused" if ok else f"FAILED: {e!r}", flush=True)
                    continue
                r = p0.view(np.float32).copy()
                real = fastopt.Adam([r], lr=0.1, state_dtype=state_dtype)
                for _ in range(3):
                    real.step([g.view(np.float32)])
                same = np.array_equal(p.view(np.float32), r)
                print(state_dtype, backend, "like its real view" if same else
                      f"FAILED: {int((p.view(np.float32) != r).sum())} elements differ",
                      flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    report = (f"exit status {done.returncode}\nstdout:\n{done.stdout}"
              f"\nstderr:\n{done.stderr[-3000:]}")
    assert done.returncode == 0 and "FAILED" not in done.stdout, report


# ------------------------------------------------------------- quality

def test_bfloat16_state_trains_least_squares_as_well_as_float32_state():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((256, 64)).astype(np.float32)
    b = (A @ rng.standard_normal(64) + 0.1 * rng.standard_normal(256)).astype(np.float32)
    A64 = A.astype(np.float64)
    optimum = np.linalg.lstsq(A64, b.astype(np.float64), rcond=None)[0]

    def loss(x):
        r = A64 @ np.asarray(x, np.float64) - b
        return 0.5 * float(r @ r) / len(b)

    floor, initial = loss(optimum), loss(np.zeros(64))
    losses = {}
    for label, precision in (("float32 state", {}), ("bfloat16 state",
                                                     {"state_dtype": "bfloat16"})):
        if precision:
            dtype("bfloat16")
        x = np.zeros(64, np.float32)
        opt = fastopt.Adam([x], lr=0.05, **precision)
        for _ in range(300):
            opt.step([(A.T @ (A @ x - b) / len(b)).astype(np.float32)])
        if precision:
            assert opt.state[0]["exp_avg"].dtype == dtype("bfloat16")
        losses[label] = loss(x)
    print(f"\nleast squares: initial {initial:.6g}, optimum {floor:.9g}, "
          + ", ".join(f"{k} {v:.9g}" for k, v in losses.items()))
    f32, bf16 = losses["float32 state"], losses["bfloat16 state"]
    assert f32 <= 1.001 * floor and bf16 <= 1.001 * floor  # both at the optimum
    assert bf16 <= 1.5 * f32 + 1e-7
    assert bf16 < 1e-3 * initial


# --------------------------------------------------------- state_dict

RESUME_CONFIGS = [
    ("bf16", "bfloat16", {}),
    ("bf16-master-sr", "bfloat16", {"master_weights": True, "state_dtype": "bfloat16",
                                    "stochastic_rounding": True, "seed": 9}),
    ("f16-sr", "float16", {"stochastic_rounding": True, "seed": 10}),
]


@pytest.mark.parametrize("config", RESUME_CONFIGS, ids=lambda c: c[0])
@pytest.mark.parametrize("case", spec.richest_cases(), ids=spec.case_id)
def test_state_dict_round_trip_continues_bit_for_bit(case, config):
    _, cls, kwargs = case
    _, p_name, precision = config
    dt = needs_dtypes(p_name, precision)
    shapes = [(STAGE + 3,), (9, 31)]
    rng = np.random.default_rng(12)
    start = [random_like(rng, s, dt) for s in shapes]
    grads = [[random_like(rng, s, dt) for s in shapes] for _ in range(5)]

    whole = [p.copy() for p in start]
    opt = cls(whole, **kwargs, **precision)
    for g in grads[:2]:
        opt.step(g)
    saved = opt.state_dict()
    at_save = [p.copy() for p in whole]
    for g in grads[2:]:
        opt.step(g)

    for i, entry in saved["state"].items():  # stored as the policy says
        for key, value in entry.items():
            if isinstance(value, np.ndarray):
                want = np.float32 if key == "master_param" else opt.state[i][key].dtype
                assert value.dtype == want, key
    resumed_params = [p.copy() for p in at_save]
    resumed = cls(resumed_params, **kwargs, **precision)
    resumed.load_state_dict(saved)
    for g in grads[2:]:
        resumed.step(g)
    assert_same_run(resumed_params, whole, resumed, opt, "resumed")


def test_loading_float32_state_into_a_bfloat16_state_optimizer_rounds_it():
    bf16 = dtype("bfloat16")
    p = np.ones(300, np.float32)
    opt = fastopt.Adam([p], lr=0.1)
    opt.step([np.linspace(-1, 1, 300).astype(np.float32)])
    saved = opt.state_dict()
    half = fastopt.Adam([np.ones(300, np.float32)], lr=0.1, state_dtype="bfloat16")
    half.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        assert half.state[0][key].dtype == bf16
        np.testing.assert_array_equal(bits(half.state[0][key]),
                                      reference.bfloat16_bits(saved["state"][0][key]))
