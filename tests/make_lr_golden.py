"""Record torch's learning-rate sequences for fastopt's scheduler tests.

Why this exists
---------------
``fastopt.lr_scheduler`` promises torch.optim.lr_scheduler's numbers, but
torch is optional. This script runs every case of :data:`CASES` through
torch once and stores the learning rate (and, where OneCycleLR cycles it,
the momentum or beta1) of every param group after construction and after
each of :data:`STEPS` steps, in ``tests/data/lr_golden.json``. Then
``tests/test_lr_scheduler.py`` checks fastopt against the recording on any
machine, and against torch live where torch is installed.

How to regenerate
-----------------
Needs torch (recorded with torch 2.13.0, CPU build)::

    python tests/make_lr_golden.py

Do it after changing :data:`CASES`, :data:`STEPS`, :data:`LAMBDAS` or
:data:`METRICS`; ``test_golden_file_matches_case_table`` fails until you do.
The output is deterministic: no randomness, sorted keys, floats written with
``repr`` (exact).

The case table
--------------
A case is ``{"id", "optimizer", "lrs", "scheduler"}`` plus optional keys:

* ``optimizer``: ``"SGD"`` or ``"Adam"`` (``optimizer_kwargs`` for options);
  one parameter per group, one group per entry of ``lrs``;
* ``group_extras``: per-group keys set before the scheduler is built (e.g.
  ``initial_lr`` to resume with ``last_epoch``);
* ``scheduler``: ``{"name", "kwargs"}``, and for SequentialLR
  ``"schedulers"``: a list of such specs. LambdaLR's ``lr_lambda`` names an
  entry (or a list of entries) of :data:`LAMBDAS`;
* ``metrics``: for ReduceLROnPlateau, a key of :data:`METRICS`, the scripted
  metric passed to each step.

This module imports torch only inside :func:`main`; the tests import the rest.
"""
import json
import math
from pathlib import Path

FORMAT = 1
STEPS = 60
GOLDEN_PATH = Path(__file__).resolve().parent / "data" / "lr_golden.json"

#: LambdaLR's factors, by name (functions cannot be stored in JSON).
LAMBDAS = {
    "warmup-decay": lambda epoch: min(1.0, (epoch + 1) / 5) * 0.95 ** epoch,
    "halve-every-10": lambda epoch: 0.5 ** (epoch // 10),
    "linear-to-zero": lambda epoch: max(0.0, 1.0 - epoch / 80),
}

#: ReduceLROnPlateau's scripted metrics, by name: functions of the epoch
#: (1, 2, ...) with plateaus, small wiggles below the thresholds, and jumps.
METRICS = {
    # falls in steps every 12 epochs; wiggles of up to 3e-5 in between
    "loss-plateaus": lambda t: 1.0 / (1 + t // 12) + 1e-5 * (t % 4),
    # rises by 0.01 an epoch for 5 epochs, then by 0.2 at once
    "accuracy-steps": lambda t: 0.2 * (t // 6) + 0.01 * (t % 6),
    # falls slowly (less than 0.05 an epoch) with a bump every 7 epochs
    "loss-slow": lambda t: 3.0 - 0.02 * t + (0.5 if t % 7 == 0 else 0.0),
}


def _case(case_id, scheduler, kwargs=None, *, optimizer="SGD", lrs=(0.1, 0.03), **extra):
    spec = {"name": scheduler, "kwargs": kwargs or {}}
    if "schedulers" in extra:
        spec["schedulers"] = extra.pop("schedulers")
    return {"id": case_id, "optimizer": optimizer, "lrs": list(lrs), "scheduler": spec, **extra}


def _sub(name, **kwargs):
    return {"name": name, "kwargs": kwargs}


SGD_MOMENTUM = {"momentum": 0.9}
CASES = (
    _case("steplr", "StepLR", {"step_size": 7, "gamma": 0.5}),
    _case("steplr-default-gamma-adam", "StepLR", {"step_size": 10}, optimizer="Adam",
          lrs=[0.01]),
    _case("multisteplr-repeated", "MultiStepLR", {"milestones": [5, 12, 12, 30], "gamma": 0.3}),
    _case("multisteplr-unsorted", "MultiStepLR", {"milestones": [40, 10], "gamma": 0.5},
          lrs=[0.2]),
    _case("exponentiallr", "ExponentialLR", {"gamma": 0.93}),
    _case("exponentiallr-growth", "ExponentialLR", {"gamma": 1.05}, lrs=[0.001]),
    _case("cosine-past-T_max", "CosineAnnealingLR", {"T_max": 20, "eta_min": 0.001}),
    _case("cosine-default", "CosineAnnealingLR", {"T_max": 50}, optimizer="Adam", lrs=[0.01]),
    _case("cosine-T_max-1", "CosineAnnealingLR", {"T_max": 1, "eta_min": 0.01}, lrs=[0.1]),
    _case("cawr", "CosineAnnealingWarmRestarts", {"T_0": 10, "eta_min": 0.0005}),
    _case("cawr-T_mult-2", "CosineAnnealingWarmRestarts", {"T_0": 5, "T_mult": 2}, lrs=[0.05]),
    _case("linearlr-default", "LinearLR", {}),
    _case("linearlr-decay", "LinearLR", {"start_factor": 1.0, "end_factor": 0.1,
                                         "total_iters": 40}, lrs=[0.5]),
    _case("onecycle-cos-sgd-momentum", "OneCycleLR",
          {"max_lr": [0.5, 0.1], "total_steps": STEPS}, optimizer_kwargs=SGD_MOMENTUM),
    _case("onecycle-linear-adam", "OneCycleLR",
          {"max_lr": 0.01, "total_steps": STEPS, "anneal_strategy": "linear"},
          optimizer="Adam", lrs=[0.001, 0.002]),
    _case("onecycle-three-phase-cos-adam", "OneCycleLR",
          {"max_lr": 0.02, "total_steps": STEPS, "three_phase": True, "base_momentum": 0.8,
           "max_momentum": [0.9, 0.95]}, optimizer="Adam", lrs=[0.001, 0.002]),
    _case("onecycle-three-phase-linear-sgd-epochs", "OneCycleLR",
          {"max_lr": 1.0, "epochs": 6, "steps_per_epoch": 10, "pct_start": 0.25,
           "anneal_strategy": "linear", "three_phase": True, "div_factor": 10.0,
           "final_div_factor": 100.0}, optimizer_kwargs=SGD_MOMENTUM, lrs=[0.1]),
    _case("onecycle-no-momentum", "OneCycleLR",
          {"max_lr": 0.3, "total_steps": STEPS + 20, "pct_start": 0.4,
           "cycle_momentum": False}),
    _case("lambdalr", "LambdaLR", {"lr_lambda": "warmup-decay"}),
    _case("lambdalr-per-group", "LambdaLR", {"lr_lambda": ["halve-every-10", "linear-to-zero"]}),
    _case("sequential-warmup-cosine", "SequentialLR", {"milestones": [10]},
          schedulers=[_sub("LinearLR", start_factor=0.1, total_iters=10),
                      _sub("CosineAnnealingLR", T_max=50, eta_min=1e-4)],
          optimizer_kwargs=SGD_MOMENTUM),
    _case("sequential-three", "SequentialLR", {"milestones": [5, 20]},
          schedulers=[_sub("LinearLR", start_factor=0.5, total_iters=5),
                      _sub("ExponentialLR", gamma=0.9),
                      _sub("StepLR", step_size=8, gamma=0.5)], optimizer="Adam"),
    _case("sequential-warmup-restarts", "SequentialLR", {"milestones": [8]},
          schedulers=[_sub("LinearLR", start_factor=0.25, total_iters=8),
                      _sub("CosineAnnealingWarmRestarts", T_0=12)], lrs=[0.2]),
    _case("plateau-min-rel", "ReduceLROnPlateau", {"factor": 0.5, "patience": 3},
          metrics="loss-plateaus"),
    _case("plateau-max-abs-cooldown", "ReduceLROnPlateau",
          {"mode": "max", "threshold_mode": "abs", "threshold": 0.05, "patience": 1,
           "cooldown": 2, "factor": 0.6, "min_lr": [0.01, 0.001]}, metrics="accuracy-steps"),
    _case("plateau-min-abs-eps", "ReduceLROnPlateau",
          {"threshold_mode": "abs", "threshold": 0.05, "patience": 2, "factor": 0.3,
           "min_lr": 0.005, "eps": 0.004}, metrics="loss-slow"),
    _case("plateau-max-rel-defaults", "ReduceLROnPlateau",
          {"mode": "max", "patience": 4, "threshold": 0.3}, optimizer="Adam",
          metrics="accuracy-steps"),
    _case("resume-steplr", "StepLR", {"step_size": 5, "gamma": 0.5, "last_epoch": 9},
          group_extras=[{"initial_lr": 0.4}, {"initial_lr": 0.12}]),
    _case("resume-cosine", "CosineAnnealingLR", {"T_max": 30, "last_epoch": 5},
          group_extras=[{"initial_lr": 0.2}, {"initial_lr": 0.05}]),
    _case("resume-exponentiallr", "ExponentialLR", {"gamma": 0.9, "last_epoch": 3},
          group_extras=[{"initial_lr": 0.3}], lrs=[0.2187]),
    _case("resume-cawr", "CosineAnnealingWarmRestarts",
          {"T_0": 4, "T_mult": 3, "last_epoch": 6}, group_extras=[{"initial_lr": 0.1}],
          lrs=[0.05]),
)


# ------------------------------------------------------------ running a case

def optimizer_groups(case, make_param):
    """The param-group dicts of a case; ``make_param(i)`` makes group i's parameter."""
    extras = case.get("group_extras", [{}] * len(case["lrs"]))
    return [{"params": [make_param(i)], "lr": lr, **extra}
            for i, (lr, extra) in enumerate(zip(case["lrs"], extras))]


def build_scheduler(module, optimizer, spec):
    """Build ``spec`` with ``module``'s classes (torch's or fastopt's lr_scheduler)."""
    kwargs = dict(spec["kwargs"])
    if spec["name"] == "LambdaLR":
        names = kwargs["lr_lambda"]
        kwargs["lr_lambda"] = ([LAMBDAS[n] for n in names] if isinstance(names, list)
                               else LAMBDAS[names])
    if spec["name"] == "SequentialLR":
        kwargs["schedulers"] = [build_scheduler(module, optimizer, sub)
                                for sub in spec["schedulers"]]
    return getattr(module, spec["name"])(optimizer, **kwargs)


def cycles_momentum(case):
    """Whether the case's scheduler edits momentum (OneCycleLR's cycle_momentum)."""
    spec = case["scheduler"]
    return spec["name"] == "OneCycleLR" and spec["kwargs"].get("cycle_momentum", True)


def observe(optimizer, case):
    """``(lrs, momenta)`` of every group now; momenta is None unless they are cycled."""
    groups = optimizer.param_groups
    lrs = [float(group["lr"]) for group in groups]
    if not cycles_momentum(case):
        return lrs, None
    return lrs, [float(group["betas"][0] if "betas" in group else group["momentum"])
                 for group in groups]


def step_scheduler(scheduler, case, t):
    """Step ``scheduler`` for the case's step ``t`` (1, 2, ...)."""
    if "metrics" in case:
        scheduler.step(METRICS[case["metrics"]](t))
    else:
        scheduler.step()


def run_case(case, module, optimizer, optimizer_step, steps=STEPS):
    """Run a case; return ``{"lr": [...], "momentum": [...]}``, one row per step.

    Row 0 is right after the scheduler is built; row t after the t-th
    ``optimizer_step()`` and scheduler step. ``"momentum"`` only when cycled.
    """
    scheduler = build_scheduler(module, optimizer, case["scheduler"])
    rows = [observe(optimizer, case)]
    for t in range(1, steps + 1):
        optimizer_step()
        step_scheduler(scheduler, case, t)
        rows.append(observe(optimizer, case))
    out = {"lr": [lrs for lrs, _ in rows]}
    if cycles_momentum(case):
        out["momentum"] = [momenta for _, momenta in rows]
    return out


def torch_optimizer(case):
    """A torch optimizer for the case and a function doing one step of it."""
    import torch

    params = []

    def make_param(i):
        params.append(torch.zeros(3, dtype=torch.float64, requires_grad=True))
        return params[-1]

    optimizer_class = getattr(torch.optim, case["optimizer"])
    optimizer = optimizer_class(optimizer_groups(case, make_param),
                                **case.get("optimizer_kwargs", {}))

    def optimizer_step():
        for i, p in enumerate(params):
            p.grad = torch.full((3,), 0.5 + i, dtype=torch.float64)
        optimizer.step()

    return optimizer, optimizer_step


def run_torch(case, steps=STEPS):
    """Run a case with torch's optimizer and scheduler."""
    import warnings

    import torch.optim.lr_scheduler

    optimizer, optimizer_step = torch_optimizer(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's step-order advice
        return run_case(case, torch.optim.lr_scheduler, optimizer, optimizer_step, steps)


def golden_text(recorded, torch_version):
    """The golden file: a header line, then one line per case (reviewable diffs)."""
    header = json.dumps({"format": FORMAT, "steps": STEPS, "torch_version": torch_version},
                        sort_keys=True)
    lines = [json.dumps({"case": case, **result}, sort_keys=True, allow_nan=False)
             for case, result in recorded]
    return '{"header": ' + header + ',\n"cases": [\n' + ",\n".join(lines) + "\n]}\n"


def main():
    import torch

    recorded = [(case, run_torch(case)) for case in CASES]
    for case, result in recorded:
        assert all(math.isfinite(x) for row in result["lr"] for x in row), case["id"]
    text = golden_text(recorded, torch.__version__)
    GOLDEN_PATH.parent.mkdir(exist_ok=True)
    GOLDEN_PATH.write_text(text)
    print(f"wrote {GOLDEN_PATH} ({len(text)} bytes, {len(recorded)} cases, torch "
          f"{torch.__version__})")


if __name__ == "__main__":
    main()
