"""fastopt bench --torch: fastopt.torch against torch.optim on torch models.

Two cases, every implementation on its own copy of the same model, in
rotating rounds of blocks of steps (see fastopt.bench): the optimizer step
alone on a model with many parameter tensors, and a whole training step
(forward, backward, step) of a small MLP. Each implementation's first
CHECKED_STEPS steps (the warm-up, through the path the timing then takes) are
checked against torch.optim's default implementation before timing: later
the trajectories of a training run drift apart chaotically, by float32
rounding alone, whichever two implementations are compared.
"""
import importlib.util
import json
import os
import sys

from .. import _dispatch
from .measure import SPREAD_LIMIT, block_spread, fmt_ratio, header, rotating_medians

CHECKED_STEPS = 10
DEFAULT_JSON = "fastopt-bench-torch.json"


def _many_tensor_model(torch, width=64, blocks=26):
    """26 blocks of Linear + LayerNorm: 104 parameter tensors."""
    layers = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(width, width), torch.nn.LayerNorm(width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def _small_mlp(torch):
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


def _optimizers(torch):
    import fastopt.torch as ft
    return {
        "fastopt.torch": lambda ps: ft.Adam(ps, lr=1e-3),
        "torch fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
        "torch fused, 1 thread": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
        "torch foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
        "torch default": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False),
    }


def _runner(torch, name, run):
    """``run``, on one torch thread for the implementations named so."""
    if not name.endswith("1 thread"):
        return run

    def on_one_thread():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # about 0.2 us for both calls
        try:
            run()
        finally:
            torch.set_num_threads(threads)
    return on_one_thread


def _warm_up_and_check(models, runners, what):
    for run in runners.values():
        for _ in range(CHECKED_STEPS):
            run()
    ref = [p.detach() for p in models["torch default"].parameters()]
    for name, model in models.items():
        for p, q in zip(model.parameters(), ref):
            scale = float((q).abs().max()) or 1.0
            if not float((p.detach() - q).abs().max()) <= 1e-4 * scale:
                raise AssertionError(f"{name} left torch's trajectory ({CHECKED_STEPS} {what})")


def run_torch(budget_s=1.0, spreads=None):
    """Time the two cases.

    Parameters
    ----------
    budget_s : float
        Seconds of timed rounds per case.
    spreads : dict, optional
        Filled with case label -> {implementation: block spread}
        (fastopt._cli.measure.block_spread), for the unstable-time marks.

    Returns
    -------
    list of (str, dict)
        One row per case: its label and implementation -> median seconds.
    """
    import torch
    torch.manual_seed(0)
    rows = []
    base = _many_tensor_model(torch)
    grads = [torch.randn_like(p) for p in base.parameters()]
    models, runners = {}, {}
    for name, make in _optimizers(torch).items():
        model = _many_tensor_model(torch)
        model.load_state_dict(base.state_dict())
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt = make(list(model.parameters()))
        models[name], runners[name] = model, _runner(torch, name, opt.step)
    _warm_up_and_check(models, runners, "optimizer steps")
    blocks = {}
    medians, _ = rotating_medians(runners, budget_s, block=5, blocks=blocks)
    n_tensors = len(list(base.parameters()))
    rows.append((f"optimizer step, {n_tensors} tensors", medians))
    _record_spreads(spreads, rows[-1][0], blocks)

    base = _small_mlp(torch)
    X, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    models, runners = {}, {}
    for name, make in _optimizers(torch).items():
        model = _small_mlp(torch)
        model.load_state_dict(base.state_dict())
        opt = make(list(model.parameters()))

        def train_step(model=model, opt=opt):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
        models[name], runners[name] = model, _runner(torch, name, train_step)
    _warm_up_and_check(models, runners, "training steps")
    blocks = {}
    medians, _ = rotating_medians(runners, budget_s, block=5, blocks=blocks)
    rows.append(("training step, MLP 64-128-128-10, batch 256", medians))
    _record_spreads(spreads, rows[-1][0], blocks)
    return rows


def _record_spreads(spreads, label, blocks):
    if spreads is not None:
        spreads[label] = {name: block_spread(ts) for name, ts in blocks.items()}


def unstable(spreads):
    """(case label, implementation) pairs whose blocks spread past SPREAD_LIMIT."""
    return [(label, name) for label, per_impl in spreads.items()
            for name, spread in per_impl.items() if spread > SPREAD_LIMIT]


def format_rows(rows, spreads=None):
    """The rows as an aligned table; with ``spreads``, unstable times are marked ``~``."""
    shaky = set(unstable(spreads or {}))
    names = list(rows[0][1])
    header = ["case"] + names + ["fastopt vs best fused", "fastopt vs default"]
    body = []
    for label, med in rows:
        fused = min(med["torch fused"], med["torch fused, 1 thread"])
        body.append([label] + [f"{med[n] * 1e6:.0f} us" + ("~" if (label, n) in shaky else "")
                               for n in names]
                    + [fmt_ratio(fused / med["fastopt.torch"]),
                       fmt_ratio(med["torch default"] / med["fastopt.torch"])])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    return "\n".join(lines + [" | ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body])


def run_cli(args):
    """``fastopt bench --torch``: print the header and table, save the JSON.

    Parameters
    ----------
    args : argparse.Namespace
        bench's parsed options; ``quick``, ``json`` and ``plot`` are used.

    Returns
    -------
    int
        The exit status.
    """
    if importlib.util.find_spec("torch") is None:
        print('bench --torch needs torch (pip install "fastopt[torch]")')
        return 1
    print(header(with_torch=True))
    budget = 0.3 if args.quick else 1.0
    spreads = {}
    rows = run_torch(budget_s=budget, spreads=spreads)
    first = unstable(spreads)
    if first:  # once more, as bench does for its cases: disturbances seldom last
        print("re-measuring: unstable " + ", ".join(f"{n} ({c.split(',')[0]})" for c, n in first),
              file=sys.stderr, flush=True)
        spreads = {}
        rows = run_torch(budget_s=budget, spreads=spreads)
    print(format_rows(rows, spreads))
    print("medians of rotating blocks of 5 steps; every implementation's first "
          f"{CHECKED_STEPS} steps checked against torch.optim's default (foreach=False); "
          "'torch fused, 1 thread' runs at torch.set_num_threads(1), the others at torch's "
          "default; 'fastopt vs ...' = that time / fastopt.torch's (above 1: fastopt is faster)")
    still = unstable(spreads)
    if first or still:
        print(f"~ marks an unstable time (the middle half of its blocks spread by more than "
              f"{SPREAD_LIMIT:.0%} of their median); "
              + ("both cases were re-measured once; " if first else "")
              + "still unstable: " + (", ".join(f"{n} ({c.split(',')[0]})" for c, n in still)
                                     or "none"))
    path = os.path.abspath(args.json or DEFAULT_JSON)
    with open(path, "w") as f:
        json.dump({"config": _dispatch.config(), "header": header(with_torch=True),
                   "budget_s": budget, "remeasured": bool(first),
                   "rows": [{"case": label, "median_s": med, "block_spread": spreads.get(label)}
                            for label, med in rows]}, f, indent=1)
    print(f"saved {path}")
    if args.plot:
        print(f"no plot: bench --torch draws no figure ({os.path.abspath(args.plot)} not written)")
    return 0
