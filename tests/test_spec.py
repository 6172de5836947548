"""tests/spec.py, the table every sweep iterates, against the code and torch.optim.

The spec is written by hand; these tests hold it to what fastopt (and torch,
when installed) really has, both ways: a rule, kernel or class that one has
and the other lacks fails here, and so does a default, a buffer name or
order, or an option set that turns a buffer on where the code does not.
"""
import inspect

import numpy as np
import pytest

import fastopt
from fastopt import kernels, reference

import spec  # tests/spec.py: tests/ is on sys.path under pytest

EMPTY = inspect.Parameter.empty


def fastopt_classes():
    """fastopt's optimizer classes, by their public names."""
    found = {}
    for name in fastopt.__all__:
        obj = getattr(fastopt, name)
        if (isinstance(obj, type) and issubclass(obj, fastopt.Optimizer)
                and obj is not fastopt.Optimizer):
            found[name] = obj
    return found


def same_names(in_code, in_spec, what):
    """Assert that fastopt and tests/spec.py list the same ``what``, saying which differ."""
    in_code, in_spec = list(in_code), list(in_spec)
    assert sorted(in_code) == sorted(in_spec), (
        f"{what}: fastopt has {sorted(set(in_code) - set(in_spec))} that tests/spec.py lacks "
        f"(add its Rule or Class entry to spec.RULES), tests/spec.py has "
        f"{sorted(set(in_spec) - set(in_code))} that fastopt lacks")


def typed(value):
    """A default with its type: the spec's 0.0 is not the code's 0 or False."""
    return type(value), value


# --------------------------------------------------------------- both ways

def test_every_optimizer_class_is_in_the_spec_and_every_spec_class_in_fastopt():
    names = spec.class_names()
    assert len(set(names)) == len(names)
    same_names(fastopt_classes(), names, "optimizer classes")


def test_every_rule_is_in_the_spec_and_every_spec_rule_in_fastopt():
    assert len(set(spec.rule_names())) == len(spec.rule_names())
    in_code = {cls.rule.name for cls in fastopt_classes().values()}
    same_names(in_code, spec.rule_names(), "rules of the optimizer classes")
    for name, cls in fastopt_classes().items():
        assert cls.rule.name == spec.rule(name).name, name


def test_the_registry_is_the_specs():
    # fastopt.optim lists every rule, low-level function and class once: the
    # public names above are made from it, and so is fastopt.torch.
    from fastopt import optim
    same_names(optim.RULES, spec.rule_names(), "fastopt.optim.RULES")
    same_names(optim.FUNCTIONS, [r.kernel for r in spec.rules()], "fastopt.optim.FUNCTIONS")
    same_names(optim.OPTIMIZERS, spec.class_names(), "fastopt.optim.OPTIMIZERS")
    # ... in the same order (the public API lists them so)
    assert list(optim.RULES) == spec.rule_names()
    assert list(optim.OPTIMIZERS) == spec.class_names()
    for name, cls in optim.OPTIMIZERS.items():
        assert cls.rule is optim.RULES[spec.rule(name).name], name
    for r in spec.rules():
        rule = optim.RULES[r.name]
        assert rule.twin is getattr(reference, r.kernel)
        assert dict(rule.initial) == {b.name: b.start for b in r.buffers if b.start}
        assert list(rule.state_hyper) == list(r.class_options)
        assert rule.initial_scalars(spec.kernel_defaults(r)) == spec.carried(r)
        assert rule.counts_steps == ("step" in r.scalars)


def test_every_kernel_and_reference_twin_is_in_the_spec_and_back():
    wanted = [r.kernel for r in spec.rules()]
    same_names(kernels.__all__, wanted, "fastopt.kernels functions")
    same_names(reference.__all__, wanted, "fastopt.reference twins")


def test_every_torch_adapter_is_in_the_spec_and_back():
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    same_names(ft.__all__, spec.class_names(), "fastopt.torch classes")
    for c in spec.classes():
        if c.torch:
            assert issubclass(getattr(ft, c.name), getattr(torch.optim, c.torch)), c.name
        else:  # a torch-style optimizer of fastopt's own (a rule of optax's, or FBGEMM's)
            assert issubclass(getattr(ft, c.name), torch.optim.Optimizer), c.name
            assert not hasattr(torch.optim, c.name), c.name


# ------------------------------------------------------------- signatures

@pytest.mark.parametrize("name", spec.class_names())
def test_constructor_defaults_are_the_specs(name):
    sig = inspect.signature(fastopt_classes()[name])
    params = list(sig.parameters.values())
    assert params[0].name == "params" and params[0].default is EMPTY
    c = spec.find_class(name)
    options = [(p.name, typed(p.default)) for p in params[1:] if p.kind is not p.KEYWORD_ONLY]
    assert options == [(k, typed(v)) for k, v in c.defaults.items() if k not in c.keyword_only]
    keywords = {p.name: typed(p.default) for p in params if p.kind is p.KEYWORD_ONLY}
    wanted = {**{k: c.defaults[k] for k in c.keyword_only}, **spec.COMMON_KEYWORDS,
              **spec.OPTION_KEYWORDS}
    assert keywords == {k: typed(v) for k, v in wanted.items()}


@pytest.mark.parametrize("name", spec.class_names())
def test_param_groups_hold_the_specs_options(name):
    opt = fastopt_classes()[name]([np.zeros(3)])
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    assert {k: typed(v) for k, v in group.items()} == \
        {k: typed(v) for k, v in spec.group_defaults(name).items()}


@pytest.mark.parametrize("rule_name", spec.rule_names())
def test_kernel_signature_is_the_specs(rule_name):
    r = spec.rule(rule_name)
    sig = inspect.signature(getattr(kernels, r.kernel))
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == ["p", "g"] + [b.param for b in r.buffers]
    for b, p in zip(r.buffers, positional[2:]):
        # a buffer some options leave out is optional (None), one every option uses is not
        assert p.default is (EMPTY if b.used is spec.always else None), b.param
    keywords = [p for p in params if p.kind is p.KEYWORD_ONLY]
    scalars = [r.step_arg, *spec.carried(r)]  # the per-step arguments
    assert set(scalars) <= {p.name for p in keywords}
    assert all(p.default is EMPTY for p in keywords if p.name in spec.carried(r))
    options = [p for p in keywords if p.name not in scalars]
    assert [p.name for p in options] == list(r.options)
    assert {p.name: typed(p.default) for p in options} == \
        {k: typed(v) for k, v in spec.kernel_defaults(r).items()}
    assert inspect.signature(getattr(reference, r.kernel)) == sig  # the twin: the same


@pytest.mark.parametrize("name", spec.class_names())
def test_the_optimizers_rule_is_the_specs(name):
    r, rule = spec.rule(name), fastopt_classes()[name].rule
    assert tuple(rule.buffers) == tuple(b.name for b in r.buffers)
    assert list(rule.hyper) == list(r.options)
    assert rule.step_arg == r.step_arg
    c = spec.find_class(name)
    for options in [{}] + list(c.cases):
        full = spec.full_options(name, options)
        assert tuple(bool(n) for n in rule.needs({k: full[k] for k in r.options})) == \
            spec.needs(name, options), options


def test_torch_optim_defaults_are_the_specs():
    torch = pytest.importorskip("torch")
    for c in spec.classes():
        if not c.torch:
            continue
        params = inspect.signature(getattr(torch.optim, c.torch)).parameters
        for key, value in spec.group_defaults(c.name).items():
            if key in c.fixed:
                assert key not in params or params[key].default == value, (c.torch, key)
                continue
            assert key in params, f"torch.optim.{c.torch} has no option {key!r}"
            assert params[key].default == value, (c.torch, key)


# ------------------------------------------------------------------ state

def _step_once(cls, kwargs, backend="cython"):
    params = [np.ones(5), np.ones((2, 3), np.float32)]
    opt = cls(params, backend=backend, **kwargs)
    opt.step([np.full(p.shape, 0.5, p.dtype) for p in params])
    return opt


@pytest.mark.parametrize("case", spec.optimizer_cases(), ids=spec.case_id)
def test_state_after_a_step_is_the_specs(case):
    _, cls, kwargs = case
    buffers = {b.name: b for b in spec.rule(cls).buffers}
    for backend in ("cython", "numpy"):
        opt = _step_once(cls, kwargs, backend)
        assert sorted(opt.state) == [0, 1]
        for i, p in enumerate(opt.param_groups[0]["params"]):
            assert set(opt.state[i]) == spec.state_keys(cls.__name__, kwargs, p.shape), backend
            for name in spec.buffers_for(cls.__name__, kwargs, p.shape):
                assert opt.state[i][name].shape == buffers[name].shape_for(p.shape)
                assert opt.state[i][name].dtype == p.dtype


@pytest.mark.parametrize("name", spec.class_names())
def test_state_at_the_defaults_is_the_specs(name):
    opt = _step_once(fastopt_classes()[name], {})
    assert set(opt.state[0]) == spec.state_keys(name, shape=(5,))
    assert set(opt.state[1]) == spec.state_keys(name, shape=(2, 3))


def test_buffers_start_where_the_spec_says():
    for c in spec.classes():
        r = spec.rule(c.name)
        for kwargs in c.cases:
            full = spec.full_options(c.name, kwargs)
            p = np.zeros(4)
            opt = fastopt_classes()[c.name]([p], **kwargs)
            opt.step([np.zeros(4)])  # a zero gradient leaves a sum of squares where it started
            for b in r.buffers:
                if b.values == "squares" and not b.moves_at_zero and b.name in opt.state[0]:
                    start = full[b.start] if b.start else 0.0
                    np.testing.assert_array_equal(opt.state[0][b.name], start, (c.name, b.name))


@pytest.mark.parametrize("case", spec.class_cases(), ids=spec.case_id)
def test_torch_state_after_a_step_is_the_specs(case):
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    _, c, kwargs = case
    for module, name in ((torch.optim, c.torch), (ft, c.name))[0 if c.torch else 1:]:
        ps = [torch.ones(shape, dtype=torch.float64, requires_grad=True)
              for shape in ((5,), (2, 3))]
        opt = getattr(module, name)(ps, **kwargs)
        for p in ps:  # (torch's SparseAdam takes rows of a sparse gradient only)
            p.grad = torch.full_like(p, 0.5)
            p.grad = p.grad.to_sparse(1) if c.sparse_only else p.grad
        opt.step()
        for p in ps:
            assert {k for k, v in opt.state[p].items() if v is not None} == \
                spec.state_keys(c.name, kwargs, tuple(p.shape)), f"{module.__name__}.{name}"


@pytest.mark.parametrize("case", spec.kernel_cases(), ids=spec.case_id)
def test_kernels_need_exactly_the_specs_buffers(case):
    _, rule_name, options = case
    r = spec.rule(rule_name)
    kw = {**spec.kernel_kwargs(r, options), **spec.step_kwargs(r, 1), **spec.carried(r)}
    kernel = getattr(kernels, r.kernel)
    # both signs: Rprop holds still where g * prev < 0; a matrix too where
    # the rule's buffers depend on the shape (Adafactor's factors)
    g0 = np.array([0.5, -0.5, 0.5, -0.5])
    for g in [g0] + ([g0.reshape(2, 2)] if r.shaped else []):
        needs = spec.needs(r, kw, g.shape)

        def call(present):
            p = np.ones(g.shape)
            bufs = [np.ones(b.shape_for(g.shape) or g.shape) if here else None
                    for b, here in zip(r.buffers, present)]
            kernel(p, g, *bufs, **kw)
            return p

        assert not np.array_equal(call(needs), np.ones(g.shape))
        for i, b in enumerate(r.buffers):
            flipped = list(needs)
            flipped[i] = not flipped[i]
            if needs[i] and b.used is spec.always:
                with pytest.raises((TypeError, ValueError), match=b.name):
                    call(flipped)
            else:
                with pytest.raises(ValueError, match=b.name):
                    call(flipped)


# ---------------------------------------------------------- the table itself

def test_sweeps_use_known_options_and_valid_combinations():
    for r in spec.rules():
        kernel = set(r.options)
        assert set(r.sweep) <= kernel, r.name
        for options in r.option_sets:
            assert set(options) <= kernel, (r.name, options)
            assert spec.is_valid(r, {**r.sweep, **options}), (r.name, options)
        assert len({repr(o) for o in r.option_sets}) == len(r.option_sets), r.name
        for c in r.classes:
            constructor = set(c.defaults)
            assert set(c.defaults) <= kernel | set(r.class_options), c.name
            assert set(c.fixed) <= kernel - constructor, c.name
            assert set(spec.group_defaults(c.name)) >= kernel, c.name
            for kwargs in list(c.cases) + list((c.typical or {}).values()):
                assert set(kwargs) <= constructor, (c.name, kwargs)
                assert spec.is_valid(c, kwargs), (c.name, kwargs)
        for b in r.buffers:
            assert b.values in ("squares", "small", "signed"), b
            assert b.start is None or b.start in r.class_options, b
        assert ("step" in r.scalars) == (r.step_arg == "step"), r.name
        for c in r.classes:
            assert set(c.keyword_only) <= set(c.defaults), c.name
            assert c.scenario is not None, f"{c.name}: no scenario (test_torch_parity runs one)"
            constructor, group1, changes = c.scenario
            assert set(constructor) <= set(c.defaults), c.name
            changed = {key for _, _, key, _ in changes}
            assert set(group1) | changed <= set(spec.group_defaults(c)), c.name


def test_ids_are_unique():
    for cases in (spec.kernel_cases(), spec.class_cases(), spec.typical_cases()):
        ids = [spec.case_id(c) for c in cases]
        assert len(set(ids)) == len(ids), ids


def test_sweeps_turn_every_optional_buffer_on_and_off_and_every_flag_on():
    # Kernel sweeps: each buffer some options leave out is used by one option
    # set and left out by another; each flag is set in one of them.
    for r in spec.rules():
        sets = [{**r.sweep, **o} for o in r.option_sets]
        for i, b in enumerate(r.buffers):
            used = {spec.needs(r, o)[i] for o in sets}
            assert used == ({True} if b.used is spec.always else {True, False}), (r.name, b.name)
        for key, kind in r.options.items():
            if kind == "flag":
                assert any(o.get(key) for o in sets), (r.name, key)
    # Optimizer sweeps: every class's cases use each of its buffers, and
    # together with the other classes of its rule leave each optional one out.
    for r in spec.rules():
        for i, b in enumerate(r.buffers):
            used = {spec.needs(c, kw)[i] for c in r.classes for kw in c.cases}
            assert used == ({True} if b.used is spec.always else {True, False}), (r.name, b.name)
        for c in r.classes:
            assert c.cases, c.name
            for i, _ in enumerate(r.buffers):
                assert any(spec.needs(c, kw)[i] for kw in c.cases), c.name


def test_richest_cases_use_every_buffer_a_class_can_use():
    picked = {case[1].__name__: case for case in spec.richest_cases()}
    assert list(picked) == spec.class_names()
    for name, (_, _, kwargs) in picked.items():
        most = max(len(spec.buffers_for(name, kw)) for kw in spec.find_class(name).cases)
        assert len(spec.buffers_for(name, kwargs)) == most


def test_helpers_resolve_names():
    assert spec.rule("AdamW") is spec.rule("adam") is spec.rule(fastopt.AdamW.__name__)
    assert spec.find_class(fastopt.AdamW).fixed == {"decoupled_weight_decay": True}
    assert spec.buffers_for("adam", {"amsgrad": True}) == \
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    assert spec.buffers_for("SGD") == ()
    assert spec.buffers_for("SGD", {"momentum": 0.9}) == ("momentum_buffer",)
    assert spec.state_keys("RMSprop", {"centered": True}) == {"step", "square_avg", "grad_avg"}
    assert spec.step_kwargs("sgd", 1) == {"first_step": True}
    assert spec.step_kwargs("adam", 3) == {"step": 3}
    assert not spec.is_valid("SGD", {"nesterov": True})
    assert spec.streams("adam") == 7 and spec.streams("SGD") == 3
    with pytest.raises(KeyError):
        spec.rule("no_such_rule")
    with pytest.raises(KeyError):
        spec.find_class("adam")
