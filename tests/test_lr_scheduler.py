"""fastopt.lr_scheduler against torch.optim.lr_scheduler.

* Golden tests (no torch needed): every case of ``make_lr_golden.py`` runs on
  a fastopt optimizer (whose step runs between scheduler steps, so every
  edit of ``group["lr"]`` and of the momentum is re-validated and used) and
  must reproduce torch's recorded learning rates and momenta.
* Live tests (skipped without torch): the same cases side by side with
  torch, bit for bit; torch still produces the recording; state_dicts move
  between torch's and fastopt's schedulers in both directions.
* state_dict round trips, argument checks, and an invalid rate caught by the
  optimizer's step.

Tolerances: fastopt does torch's arithmetic in torch's order, so in one
process (same libm) the sequences are identical and the live tests demand
equality. The recording may come from another machine, whose ``cos`` may
round differently in the last bit: against it the tests allow 1e-12 relative.
"""
import importlib.util
import json
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

import fastopt
from fastopt import lr_scheduler as fls

try:
    import torch
    import torch.optim.lr_scheduler as torch_lrs
except ImportError:  # the golden tests still run
    torch = torch_lrs = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
# torch advises on the order of optimizer and scheduler steps; not our concern here.
quiet_torch = pytest.mark.filterwarnings("ignore::UserWarning")


def _load_make_lr_golden():
    """Import tests/make_lr_golden.py (no package here, no torch needed)."""
    name = "fastopt_tests_make_lr_golden"
    if name not in sys.modules:
        path = Path(__file__).resolve().with_name("make_lr_golden.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


mg = _load_make_lr_golden()
CASES = mg.CASES
case_ids = pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
GOLDEN_RTOL = 1e-12
RESUME_AT = 23  # a step after the first milestones and restarts of most cases


def golden():
    with open(mg.GOLDEN_PATH) as f:
        return json.load(f)


GOLDEN = golden()
GOLDEN_BY_ID = {entry["case"]["id"]: entry for entry in GOLDEN["cases"]}


# ------------------------------------------------------------------ helpers

def fastopt_optimizer(case):
    """The case's optimizer in fastopt (one float64 array per group) and its step."""
    params = []

    def make_param(i):
        params.append(np.zeros(3))
        return params[-1]

    optimizer = getattr(fastopt, case["optimizer"])(mg.optimizer_groups(case, make_param),
                                                    **case.get("optimizer_kwargs", {}))
    grads = [np.full(3, 0.5 + i) for i in range(len(params))]
    return optimizer, lambda: optimizer.step(grads)


def run_fastopt(case):
    return mg.run_case(case, fls, *fastopt_optimizer(case))


def assert_sequences_match(got, want, rtol, what):
    """Every learning rate (and momentum) within ``rtol``; names the first miss."""
    assert sorted(got) == sorted(want), what
    for key in want:
        a, b = np.asarray(got[key], np.float64), np.asarray(want[key], np.float64)
        assert a.shape == b.shape, f"{what}: {key} has shape {a.shape}, expected {b.shape}"
        bad = np.argwhere(~(np.abs(a - b) <= rtol * np.abs(b)))
        if bad.size:
            step, group = bad[0]
            raise AssertionError(f"{what}: {key} of group {group} after step {step} is "
                                 f"{a[step, group]!r}, expected {b[step, group]!r} "
                                 f"({len(bad)} entries differ)")


def advance(scheduler, optimizer, optimizer_step, case, first, last):
    """Steps ``first..last`` of a case; the observed rows (and get_last_lr checked)."""
    rows = []
    for t in range(first, last + 1):
        optimizer_step()
        mg.step_scheduler(scheduler, case, t)
        rows.append(mg.observe(optimizer, case))
        assert scheduler.get_last_lr() == rows[-1][0]
    return rows


def copy_group_settings(source, target):
    """Copy the scheduled keys (lr, initial_lr, momentum, ...) between optimizers."""
    for src, dst in zip(source.param_groups, target.param_groups):
        dst.update({key: src[key] for key in src if key in dst and key != "params"})


def sgd(lr=0.1, groups=1, **kwargs):
    return fastopt.SGD([{"params": [np.zeros(2)], "lr": lr} for _ in range(groups)], **kwargs)


# -------------------------------------------------------- golden and torch

def test_golden_file_matches_case_table():
    recorded = [entry["case"] for entry in GOLDEN["cases"]]
    assert recorded == json.loads(json.dumps(CASES)), (
        "tests/data/lr_golden.json is out of date: run python tests/make_lr_golden.py")
    assert GOLDEN["header"]["steps"] == mg.STEPS
    assert GOLDEN["header"]["format"] == mg.FORMAT


def test_case_table_covers_every_scheduler():
    names = {case["scheduler"]["name"] for case in CASES}
    names |= {sub["name"] for case in CASES for sub in case["scheduler"].get("schedulers", ())}
    assert names == set(fls.__all__) - {"LRScheduler"}


@case_ids
def test_matches_golden(case):
    entry = GOLDEN_BY_ID[case["id"]]
    want = {key: entry[key] for key in ("lr", "momentum") if key in entry}
    assert_sequences_match(run_fastopt(case), want, GOLDEN_RTOL, case["id"])


@needs_torch
@case_ids
def test_matches_torch_live_exactly(case):
    want = mg.run_torch(case)
    assert_sequences_match(run_fastopt(case), want, 0.0, case["id"])
    # fastopt's schedulers drive a torch optimizer just as well.
    on_torch = mg.run_case(case, fls, *mg.torch_optimizer(case))
    assert_sequences_match(on_torch, want, 0.0, f"{case['id']}: on a torch optimizer")
    entry = GOLDEN_BY_ID[case["id"]]
    recorded = {key: entry[key] for key in want}
    assert_sequences_match(want, recorded, GOLDEN_RTOL, f"{case['id']}: torch vs recording")


@needs_torch
@quiet_torch
@case_ids
def test_state_dicts_move_between_torch_and_fastopt(case):
    """torch's state loads into fastopt's scheduler and back, continuing identically."""
    t_opt, t_step = mg.torch_optimizer(case)
    t_sched = mg.build_scheduler(torch_lrs, t_opt, case["scheduler"])
    advance(t_sched, t_opt, t_step, case, 1, RESUME_AT)

    f_opt, f_step = fastopt_optimizer(case)
    f_sched = mg.build_scheduler(fls, f_opt, case["scheduler"])
    copy_group_settings(t_opt, f_opt)
    f_sched.load_state_dict(t_sched.state_dict())
    middle = 40
    want = advance(t_sched, t_opt, t_step, case, RESUME_AT + 1, middle)
    assert advance(f_sched, f_opt, f_step, case, RESUME_AT + 1, middle) == want

    t_opt2, t_step2 = mg.torch_optimizer(case)
    t_sched2 = mg.build_scheduler(torch_lrs, t_opt2, case["scheduler"])
    copy_group_settings(f_opt, t_opt2)
    t_sched2.load_state_dict(f_sched.state_dict())
    want = advance(f_sched, f_opt, f_step, case, middle + 1, mg.STEPS)
    assert advance(t_sched2, t_opt2, t_step2, case, middle + 1, mg.STEPS) == want


@needs_torch
def test_warm_restarts_with_fractional_epochs_match_torch():
    epochs = [0.0, 0.25, 1.5, 4.0, 5.75, 14.9, 15.0, 40.2, 3.0, 100.5]
    for t_mult in (1, 2, 3):
        f_opt, t_opt = sgd(), torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
        f_sched = fls.CosineAnnealingWarmRestarts(f_opt, T_0=5, T_mult=t_mult, eta_min=0.01)
        t_sched = torch_lrs.CosineAnnealingWarmRestarts(t_opt, T_0=5, T_mult=t_mult,
                                                        eta_min=0.01)
        for epoch in epochs:
            f_sched.step(epoch)
            t_sched.step(epoch)
            assert f_sched.get_last_lr() == t_sched.get_last_lr(), (t_mult, epoch)
            assert (f_sched.T_cur, f_sched.T_i, f_sched.last_epoch) == \
                   (t_sched.T_cur, t_sched.T_i, t_sched.last_epoch)


def test_warm_restarts_fractional_epoch_follows_the_cosine():
    sched = fls.CosineAnnealingWarmRestarts(sgd(lr=0.1), T_0=4, T_mult=2, eta_min=0.0)
    # Cycles [0, 4), [4, 12), [12, 28): epoch 6 is 2 into a cycle of 8.
    for epoch, t_cur, t_i in [(1.0, 1.0, 4), (6.0, 2.0, 8), (13.0, 1.0, 16), (2.5, 2.5, 4)]:
        sched.step(epoch)
        expected = 0.1 * (1 + math.cos(math.pi * t_cur / t_i)) / 2
        assert sched.get_last_lr()[0] == pytest.approx(expected, rel=1e-14)
        assert sched.last_epoch == math.floor(epoch)


# ---------------------------------------------------------- state_dict

@case_ids
def test_state_dict_round_trip_continues_identically(case):
    opt_a, step_a = fastopt_optimizer(case)
    sched_a = mg.build_scheduler(fls, opt_a, case["scheduler"])
    rows_a = advance(sched_a, opt_a, step_a, case, 1, mg.STEPS)

    opt_b, step_b = fastopt_optimizer(case)
    sched_b = mg.build_scheduler(fls, opt_b, case["scheduler"])
    advance(sched_b, opt_b, step_b, case, 1, RESUME_AT)
    params_b = [g["params"][0] for g in opt_b.param_groups]
    saved = pickle.loads(pickle.dumps((opt_b.state_dict(), sched_b.state_dict(),
                                       [p.copy() for p in params_b])))

    # A fresh optimizer and scheduler, as after a restart: build, then load.
    opt_c, step_c = fastopt_optimizer(case)
    sched_c = mg.build_scheduler(fls, opt_c, case["scheduler"])
    opt_c.load_state_dict(saved[0])
    sched_c.load_state_dict(saved[1])
    for group, value in zip(opt_c.param_groups, saved[2]):
        group["params"][0][...] = value
    assert sched_c.get_last_lr() == sched_b.get_last_lr()
    assert sched_c.last_epoch == sched_b.last_epoch
    rows_c = advance(sched_c, opt_c, step_c, case, RESUME_AT + 1, mg.STEPS)

    assert rows_c == rows_a[RESUME_AT:]
    assert sched_c.state_dict() == sched_a.state_dict()
    for group_a, group_c in zip(opt_a.param_groups, opt_c.param_groups):
        np.testing.assert_array_equal(group_c["params"][0], group_a["params"][0])


def test_state_dict_is_a_snapshot():
    opt = sgd()
    sched = fls.MultiStepLR(opt, milestones=[2, 4])
    state = sched.state_dict()
    for _ in range(5):
        sched.step()
    assert state["last_epoch"] == 0 and state["_last_lr"] == [0.1]
    sched.load_state_dict(state)
    state["milestones"][9] = 1  # the loaded copy is the scheduler's own
    assert 9 not in sched.milestones


def test_lambda_state_saves_callable_objects_not_functions():
    class Decay:
        def __init__(self, rate):
            self.rate = rate

        def __call__(self, epoch):
            return self.rate ** epoch

    opt = sgd(groups=2)
    sched = fls.LambdaLR(opt, [Decay(0.5), lambda epoch: 1.0])
    sched.lr_lambdas[0].rate = 0.7
    state = sched.state_dict()
    assert state["lr_lambdas"] == [{"rate": 0.7}, None]
    other = fls.LambdaLR(sgd(groups=2), [Decay(0.5), lambda epoch: 2.0])
    other.load_state_dict(state)
    assert other.lr_lambdas[0].rate == 0.7
    other.step()
    assert other.get_last_lr() == [0.1 * 0.7, 0.1 * 2.0]


def test_sequential_state_holds_nested_states():
    opt = sgd()
    warm = fls.LinearLR(opt, start_factor=0.5, total_iters=3)
    sched = fls.SequentialLR(opt, [warm, fls.ExponentialLR(opt, gamma=0.9)], milestones=[3])
    state = sched.state_dict()
    assert [s["gamma"] if "gamma" in s else s["start_factor"] for s in state["_schedulers"]] \
        == [0.5, 0.9]
    assert "optimizer" not in state and "optimizer" not in state["_schedulers"][0]
    assert sched.base_lrs == [0.1]


@pytest.mark.parametrize("mutate, error, match", [
    (lambda s: s.pop("step_size"), ValueError, "state_dict has no 'step_size'"),
    (lambda s: s.update(T_max=3), ValueError, "'T_max', which StepLR does not keep"),
    (lambda s: s.update(_get_lr_called_within_step=False, _is_initial=False), None, None),
])
def test_load_state_dict_checks_keys(mutate, error, match):
    sched = fls.StepLR(sgd(), step_size=3)
    state = sched.state_dict()
    mutate(state)
    if error is None:  # torch's transient flags are accepted
        sched.load_state_dict(state)
        return
    before = sched.state_dict()
    with pytest.raises(error, match=match):
        sched.load_state_dict(state)
    assert sched.state_dict() == before


def test_load_state_dict_refuses_other_states_unchanged():
    cosine = fls.CosineAnnealingLR(sgd(), T_max=10)
    with pytest.raises(ValueError, match="is it the state of a CosineAnnealingLR"):
        cosine.load_state_dict(fls.StepLR(sgd(), step_size=2).state_dict())
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        cosine.load_state_dict([("T_max", 3)])
    plateau = fls.ReduceLROnPlateau(sgd())
    bad = {**plateau.state_dict(), "mode": "sideways"}
    with pytest.raises(ValueError, match=r"state_dict\['mode'\] must be one of"):
        plateau.load_state_dict(bad)
    assert plateau.mode == "min"
    opt = sgd()
    seq = fls.SequentialLR(opt, [fls.LinearLR(opt), fls.StepLR(opt, 2)], milestones=[5])
    state = seq.state_dict()
    state["_schedulers"][1]["surprise"] = 1
    before = seq.state_dict()
    with pytest.raises(ValueError, match="'surprise'"):
        seq.load_state_dict(state)
    assert seq.state_dict() == before


# ------------------------------------------------------- common behaviour

def test_constructor_sets_initial_lr_and_resume_needs_it():
    opt = sgd(lr=0.2)
    sched = fls.ExponentialLR(opt, gamma=0.5)
    assert opt.param_groups[0]["initial_lr"] == 0.2 and sched.base_lrs == [0.2]
    assert sched.last_epoch == 0 and sched.get_last_lr() == [0.2]
    with pytest.raises(KeyError, match=r"param_groups\[0\] has no 'initial_lr'.*last_epoch=4"):
        fls.StepLR(sgd(), step_size=2, last_epoch=4)
    # A second scheduler keeps the first one's initial_lr (setdefault), as in torch.
    sched.step()
    assert fls.StepLR(opt, step_size=2).base_lrs == [0.2]


def test_works_on_any_object_with_param_groups():
    class Holder:
        param_groups = [{"lr": 1.0}, {"lr": 0.5}]

    holder = Holder()
    sched = fls.StepLR(holder, step_size=2, gamma=0.5)
    for _ in range(4):
        sched.step()
    assert [g["lr"] for g in holder.param_groups] == [0.25, 0.125] == sched.get_last_lr()


def test_unchanged_rate_is_not_rewritten():
    # A fastopt group re-validates after any write; StepLR's quiet steps write nothing.
    opt = sgd()
    sched = fls.StepLR(opt, step_size=3)
    opt.step([np.ones(2)])
    group = opt.param_groups[0]
    assert group.checked is not None
    sched.step()
    assert group.checked is not None
    sched.step()
    sched.step()  # epoch 3: decays
    assert group.checked is None and group["lr"] == pytest.approx(0.01)


def test_added_param_group_is_reported():
    opt = sgd()
    sched = fls.LambdaLR(opt, lambda epoch: 0.5)  # one rate per group it was made for
    opt.add_param_group({"params": [np.zeros(2)], "lr": 0.3})
    with pytest.raises(ValueError, match="optimizer has 2 param groups but the scheduler"):
        sched.step()
    plateau = fls.ReduceLROnPlateau(sgd(), patience=0, min_lr=[0.0])
    plateau.optimizer.add_param_group({"params": [np.zeros(2)], "lr": 0.3})
    plateau.step(1.0)
    with pytest.raises(RuntimeError, match="min_lr lists 1"):
        plateau.step(2.0)
    scalar = fls.ReduceLROnPlateau(sgd(), patience=0, min_lr=0.01)
    scalar.optimizer.add_param_group({"params": [np.zeros(2)], "lr": 0.3})
    scalar.step(1.0)
    scalar.step(2.0)
    assert scalar.get_last_lr() == pytest.approx([0.01, 0.03])


def test_one_cycle_refuses_steps_past_total_steps():
    sched = fls.OneCycleLR(sgd(momentum=0.9), max_lr=1.0, total_steps=3)
    for _ in range(3):
        sched.step()
    with pytest.raises(ValueError, match="stepped 4 times, but its total_steps is 3"):
        sched.step()


def test_plateau_counts_cooldown_and_threshold():
    # min mode, abs threshold 0.1: 0.95 is not an improvement on 1.0.
    opt = sgd(lr=1.0)
    sched = fls.ReduceLROnPlateau(opt, factor=0.5, patience=1, threshold=0.1,
                                  threshold_mode="abs", cooldown=2)
    lrs = []
    for metric in [1.0, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.5, 0.45]:
        sched.step(metric)
        lrs.append(sched.get_last_lr()[0])
    # bad, bad -> cut at epoch 3; 2 cooldown epochs; bad, bad -> cut at epoch 7;
    # epoch 8 improves; epoch 9 is bad but still in the cooldown, so not counted.
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert (sched.best, sched.num_bad_epochs, sched.cooldown_counter) == (0.5, 0, 0)


# ------------------------------------------------------- invalid arguments

def _adagrad():
    return fastopt.Adagrad([np.zeros(2)], lr=0.1)


BAD_ARGUMENTS = [
    (lambda o: fls.StepLR(o, step_size=0), ValueError, "step_size must be a positive int, got 0"),
    (lambda o: fls.StepLR(o, step_size=2.5), TypeError, "step_size must be an int, got 2.5"),
    (lambda o: fls.StepLR(o, step_size=True), TypeError, "step_size must be an int"),
    (lambda o: fls.StepLR(o, 2, gamma=0.0), ValueError, "gamma must be > 0"),
    (lambda o: fls.StepLR(o, 2, gamma="0.1"), TypeError, "gamma must be a real number"),
    (lambda o: fls.StepLR(o, 2, last_epoch=-2), ValueError, "last_epoch must be an int >= -1"),
    (lambda o: fls.MultiStepLR(o, milestones=[3, "5"]), TypeError, r"milestones\[1\] must be an int"),
    (lambda o: fls.MultiStepLR(o, milestones=[-1]), ValueError, r"milestones\[0\] must be an int >= 0"),
    (lambda o: fls.MultiStepLR(o, milestones=5), TypeError, "milestones must be a list of ints"),
    (lambda o: fls.MultiStepLR(o, [2], gamma=-0.5), ValueError, "gamma must be > 0"),
    (lambda o: fls.ExponentialLR(o, gamma=float("nan")), ValueError, "gamma must be > 0 and finite"),
    (lambda o: fls.LinearLR(o, start_factor=0.0), ValueError, r"start_factor must be in \(0, 1\]"),
    (lambda o: fls.LinearLR(o, start_factor=1.5), ValueError, r"start_factor must be in \(0, 1\]"),
    (lambda o: fls.LinearLR(o, end_factor=-0.1), ValueError, r"end_factor must be in \[0, 1\]"),
    (lambda o: fls.LinearLR(o, total_iters=0), ValueError, "total_iters must be a positive int"),
    (lambda o: fls.CosineAnnealingLR(o, T_max=0), ValueError, "T_max must be a positive int"),
    (lambda o: fls.CosineAnnealingLR(o, T_max=10, eta_min=-1e-3), ValueError, r"eta_min must be in \[0, inf\)"),
    (lambda o: fls.CosineAnnealingWarmRestarts(o, T_0=0), ValueError, "T_0 must be a positive int"),
    (lambda o: fls.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=1.5), TypeError, "T_mult must be an int"),
    (lambda o: fls.CosineAnnealingWarmRestarts(o, T_0=5, eta_min="0"), TypeError, "eta_min must be a real number"),
    (lambda o: fls.LambdaLR(o, lr_lambda=0.5), TypeError, "lr_lambda must be callable, got float"),
    (lambda o: fls.LambdaLR(o, lr_lambda=[abs, abs]), ValueError, "lr_lambda has 2 entries but the optimizer has 1 param groups"),
    (lambda o: fls.OneCycleLR(o, max_lr=1.0), ValueError, "needs total_steps, or both epochs and steps_per_epoch"),
    (lambda o: fls.OneCycleLR(o, max_lr=1.0, epochs=2), ValueError, "needs total_steps"),
    (lambda o: fls.OneCycleLR(o, max_lr=1.0, total_steps=0), ValueError, "total_steps must be a positive int"),
    (lambda o: fls.OneCycleLR(o, max_lr=1.0, epochs=0, steps_per_epoch=3), ValueError, "epochs must be a positive int"),
    (lambda o: fls.OneCycleLR(o, max_lr=1.0, epochs=2, steps_per_epoch=2.0), TypeError, "steps_per_epoch must be an int"),
    (lambda o: fls.OneCycleLR(o, max_lr=1.0, total_steps=9, pct_start=1.2), ValueError, r"pct_start must be in \[0, 1\]"),
    (lambda o: fls.OneCycleLR(o, max_lr=1.0, total_steps=9, anneal_strategy="exp"), ValueError, "anneal_strategy must be one of"),
    (lambda o: fls.OneCycleLR(o, max_lr=[1.0, 2.0], total_steps=9), ValueError, "max_lr has 2 entries"),
    (lambda o: fls.OneCycleLR(o, max_lr=-1.0, total_steps=9), ValueError, "max_lr must be > 0"),
    (lambda o: fls.OneCycleLR(o, max_lr=1.0, total_steps=9, div_factor=0), ValueError, "div_factor must be > 0"),
    (lambda o: fls.OneCycleLR(o, max_lr=1.0, total_steps=9, final_div_factor=-1), ValueError, "final_div_factor must be > 0"),
    (lambda o: fls.OneCycleLR(o, max_lr=1.0, total_steps=9, three_phase="yes"), TypeError, "three_phase must be a bool"),
    (lambda o: fls.OneCycleLR(_adagrad(), max_lr=1.0, total_steps=9), ValueError, "cycle_momentum=True needs an optimizer with 'momentum' or 'betas'"),
    (lambda o: fls.ReduceLROnPlateau(o, factor=1.0), ValueError, r"factor must be in \(0, 1\)"),
    (lambda o: fls.ReduceLROnPlateau(o, factor=0.0), ValueError, r"factor must be in \(0, 1\)"),
    (lambda o: fls.ReduceLROnPlateau(o, mode="avg"), ValueError, r"mode must be one of \('min', 'max'\), got 'avg'"),
    (lambda o: fls.ReduceLROnPlateau(o, threshold_mode="pct"), ValueError, "threshold_mode must be one of"),
    (lambda o: fls.ReduceLROnPlateau(o, patience=-1), ValueError, "patience must be an int >= 0"),
    (lambda o: fls.ReduceLROnPlateau(o, cooldown=0.5), TypeError, "cooldown must be an int"),
    (lambda o: fls.ReduceLROnPlateau(o, threshold=-1e-4), ValueError, r"threshold must be in \[0, inf\)"),
    (lambda o: fls.ReduceLROnPlateau(o, min_lr=[0.0, 0.1]), ValueError, "min_lr has 2 entries"),
    (lambda o: fls.ReduceLROnPlateau(o, min_lr=-0.1), ValueError, r"min_lr must be in \[0, inf\)"),
    (lambda o: fls.ReduceLROnPlateau(o, eps=float("inf")), ValueError, "eps must be finite"),
    (lambda o: fls.SequentialLR(o, [], []), ValueError, "needs a non-empty list of schedulers"),
    (lambda o: fls.SequentialLR(o, [fls.ReduceLROnPlateau(o)], []), ValueError, r"schedulers\[0\] is a ReduceLROnPlateau"),
    (lambda o: fls.SequentialLR(o, [fls.StepLR(o, 2), "cosine"], [3]), TypeError, r"schedulers\[1\] must be a fastopt.lr_scheduler scheduler, got str"),
    (lambda o: fls.SequentialLR(o, [fls.StepLR(sgd(), 2)], []), ValueError, r"schedulers\[0\] \(StepLR\) belongs to another optimizer"),
    (lambda o: fls.SequentialLR(o, [fls.StepLR(o, 2), fls.StepLR(o, 3)], []), ValueError, "milestones must be a list of len"),
    (lambda o: fls.SequentialLR(o, [fls.StepLR(o, 2)] * 3, [5, 5]), ValueError, "milestones must be strictly increasing"),
    (lambda o: fls.StepLR(object(), 2), TypeError, "optimizer must have a param_groups list of dicts"),
    (lambda o: fls.StepLR(type("Empty", (), {"param_groups": []})(), 2), ValueError, "optimizer has no param groups"),
    (lambda o: fls.StepLR(type("NoLr", (), {"param_groups": [{"momentum": 0.9}]})(), 2), ValueError, r"param_groups\[0\] has no 'lr'"),
]


@pytest.mark.parametrize("make, error, match", BAD_ARGUMENTS,
                         ids=[f"{i}-{m[:30]}" for i, (_, _, m) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_raise_clear_errors(make, error, match):
    opt = sgd(momentum=0.9)
    with pytest.raises(error, match=match):
        make(opt)


def test_failed_construction_leaves_the_optimizer_alone():
    opt = sgd(momentum=0.9)
    before = dict(opt.param_groups[0])
    for make in (lambda: fls.StepLR(opt, 0), lambda: fls.LinearLR(opt, start_factor=2.0),
                 lambda: fls.OneCycleLR(opt, max_lr=1.0, total_steps=5, div_factor=0),
                 lambda: fls.ReduceLROnPlateau(opt, factor=2.0)):
        with pytest.raises(ValueError):
            make()
    assert dict(opt.param_groups[0]) == before


def test_bad_step_arguments():
    plateau = fls.ReduceLROnPlateau(sgd())
    with pytest.raises(TypeError, match="metrics must be a number, got 'low'"):
        plateau.step("low")
    plateau.step(np.float32(0.5))  # NumPy scalars and 0-d arrays are numbers
    plateau.step(np.array(0.25))
    assert plateau.best == 0.25
    restarts = fls.CosineAnnealingWarmRestarts(sgd(), T_0=3)
    with pytest.raises(ValueError, match=r"epoch must be in \[0, inf\), got -1"):
        restarts.step(-1)


# ------------------------------------------ an invalid rate reaches the step

@pytest.mark.parametrize("bad, match", [(-1.0, "lr must be >= 0"),
                                        (float("nan"), "lr must be >= 0, got nan")])
def test_invalid_rate_is_caught_by_the_optimizer_step(bad, match):
    w = np.ones(3)
    opt = fastopt.SGD([w], lr=0.1, momentum=0.9)
    sched = fls.LambdaLR(opt, lambda epoch: 1.0 if epoch < 2 else bad)
    grads = [np.full(3, 0.5)]
    for _ in range(2):
        opt.step(grads)
        sched.step()
    assert math.isnan(opt.param_groups[0]["lr"]) or opt.param_groups[0]["lr"] < 0
    before, buffer = w.copy(), opt.state[0]["momentum_buffer"].copy()
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: {match}"):
        opt.step(grads)
    np.testing.assert_array_equal(w, before)  # nothing was updated with the bad rate
    np.testing.assert_array_equal(opt.state[0]["momentum_buffer"], buffer)


def test_invalid_cycled_beta_is_caught_by_the_optimizer_step():
    opt = fastopt.Adam([np.ones(3)], lr=0.01)
    fls.OneCycleLR(opt, max_lr=0.1, total_steps=10, max_momentum=1.0)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: betas\[0\] must be in \[0, 1\)"):
        opt.step([np.ones(3)])
