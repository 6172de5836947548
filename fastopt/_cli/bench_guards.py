"""fastopt bench --guards: the step guards (max_grad_norm, ema_decay) against the bare step and torch.

A training step is often clip_grad_norm_, the update and an EMA of the
weights: three passes over memory in torch's recipe, one read pass plus the
update in fastopt's (see fastopt.optim.guards). Two cases, Adam on float32
(lr 1e-3, weight_decay 1e-2), gradients of norm well above MAX_NORM so that
every step clips:

* one array of 1e7 elements (past the cache: every pass is a memory pass);
* 200 arrays of 16..4096 elements (per-array overhead dominates).

Implementations, each on its own copy of the same parameters, timed side by
side in rotating rounds of blocks of steps (medians):

* ``step``: fastopt's bare Adam step;
* ``clip``: with ``max_grad_norm=MAX_NORM``;
* ``clip+ema``: with ``ema_decay=EMA_DECAY`` as well;
* ``torch clip``: ``torch.nn.utils.clip_grad_norm_(foreach=True)`` then
  ``torch.optim.Adam(fused=True)``;
* ``torch clip+ema``: that, then ``AveragedModel.update_parameters`` with
  ``get_ema_multi_avg_fn(EMA_DECAY)``.

Before timing, every implementation takes CHECKED_STEPS steps from the same
start with fresh gradients, and its parameters (and averages) are checked
against fastopt's NumPy reference with the same options, and fastopt's
``last_grad_norm`` against NumPy's norm. The weight decay makes the check
see the clipping: Adam alone is nearly blind to a gradient's scale. While
timed, torch's ``clip_grad_norm_`` scales its gradients in place, so after
the first step it scales by a factor near 1; it still reads and writes them
all, which is its cost.
"""
import importlib.util

import numpy as np

import fastopt

from .measure import (MANY_SMALL, SPREAD_LIMIT, block_spread, fmt_ratio, header, model_sizes,
                      rotating_medians)

MAX_NORM = 1.0
EMA_DECAY = 0.999
OPTIONS = {"lr": 1e-3, "weight_decay": 1e-2}
CHECKED_STEPS = 3
#: the share of torch's elements allowed off the reference (see _check)
TORCH_OFF_SHARE = 1e-4
#: the ratios the table prints: (label, numerator, denominator)
RATIOS = [
    ("clip / step", "clip", "step"),
    ("clip+ema / step", "clip+ema", "step"),
    ("torch clip / clip", "torch clip", "clip"),
    ("torch clip+ema / clip+ema", "torch clip+ema", "clip+ema"),
]


def cases():
    """(label, array sizes) of the two cases."""
    return [("1e7", [10_000_000]), (MANY_SMALL, model_sizes(MANY_SMALL))]


def _fastopt(params, **guards):
    opt = fastopt.Adam(params, **OPTIONS, **guards)
    return opt, opt.step


def _torch(torch, params, with_ema):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    tensors = [torch.nn.Parameter(torch.from_numpy(p)) for p in params]
    module = torch.nn.ParameterList(tensors)
    opt = torch.optim.Adam(tensors, **OPTIONS, fused=True)
    ema = (AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY))
           if with_ema else None)

    def step(grads):
        if step.loaded is not grads:     # tensors sharing the arrays' memory, once
            for t, g in zip(tensors, grads):
                t.grad = torch.from_numpy(g)
            step.loaded = grads
        torch.nn.utils.clip_grad_norm_(tensors, MAX_NORM, foreach=True)
        opt.step()
        if ema is not None:
            ema.update_parameters(module)
    step.loaded = None
    averages = (lambda: [p.detach().numpy() for p in ema.module.parameters()]) if ema else None
    return step, averages


def _check(name, got, want, what):
    """Every element within 1e-5 of the largest (fastopt); for torch, all but
    TORCH_OFF_SHARE of them, and those within a sign flip of every step.

    torch's clip_grad_norm_ adds the squares in float32: at 1e7 elements its
    norm is off by about 4e-4 (relative), and where k g is close to -wd p
    that flips the sign of the elements' first Adam updates (2 lr apart).
    """
    torch_impl = name.startswith("torch")
    for i, (a, b) in enumerate(zip(got, want)):
        scale = float(np.abs(b).max()) or 1.0
        err = np.abs(a.astype(np.float64) - b)
        off = float((err > 1e-5 * scale).mean())
        worst = float(err.max())
        if torch_impl:
            ok = off <= TORCH_OFF_SHARE and worst <= 2.5 * OPTIONS["lr"] * CHECKED_STEPS
        else:
            ok = off == 0.0
        if not ok:
            raise AssertionError(f"{name}: {what} of array {i} off NumPy's reference: "
                                 f"{off:.2g} of the elements by over 1e-5 x {scale:.3g}, at "
                                 f"worst {worst:.3g}, after {CHECKED_STEPS} steps")


def run_case(label, sizes, budget_s, with_torch):
    """Check, then time, every implementation on one case.

    Returns
    -------
    dict
        label, arrays, elements, median_s and block_spread per implementation.
    """
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    # Two gradient sets, alternated; their global norm is far above MAX_NORM.
    grad_sets = [[rng.standard_normal(n).astype(np.float32) for n in sizes] for _ in range(2)]
    checks = [[g.copy() for g in grad_sets[k % 2]] for k in range(CHECKED_STEPS)]

    ref_params = [p.copy() for p in start]
    ref = fastopt.Adam(ref_params, backend="numpy", **OPTIONS, max_grad_norm=MAX_NORM,
                       ema_decay=EMA_DECAY)
    ref_plain = [p.copy() for p in start]
    ref_bare = fastopt.Adam(ref_plain, backend="numpy", **OPTIONS)
    for grads in checks:
        ref.step(grads)
        ref_bare.step(grads)
    want_norm = float(np.sqrt(sum(np.dot(g.astype(np.float64), g) for g in checks[-1])))

    runners, params_of, averages_of = {}, {}, {}
    for name, guards in (("step", {}), ("clip", {"max_grad_norm": MAX_NORM}),
                         ("clip+ema", {"max_grad_norm": MAX_NORM, "ema_decay": EMA_DECAY})):
        params = [p.copy() for p in start]
        opt, runners[name] = _fastopt(params, **guards)
        params_of[name] = params
        if "ema_decay" in guards:
            averages_of[name] = opt.ema_params
        if "max_grad_norm" in guards:
            runners[name + ":opt"] = opt
    if with_torch:
        import torch
        for name, with_ema in (("torch clip", False), ("torch clip+ema", True)):
            params = [p.copy() for p in start]
            runners[name], averages = _torch(torch, params, with_ema)
            params_of[name] = params
            if averages is not None:
                averages_of[name] = averages
    opts = {name[:-4]: runners.pop(name) for name in list(runners) if name.endswith(":opt")}

    # The check: fresh gradients every step (torch's clip scales them in place).
    for name, step in runners.items():
        for grads in checks:
            step([g.copy() for g in grads])
        want = ref_plain if name == "step" else ref_params
        _check(name, params_of[name], want, "parameters")
        if name in averages_of:
            _check(name, averages_of[name](), ref.ema_params(), "averages")
        if name in opts and not abs(opts[name].last_grad_norm - want_norm) <= 1e-5 * want_norm:
            raise AssertionError(f"{name}: last_grad_norm {opts[name].last_grad_norm} against "
                                 f"NumPy's {want_norm}")
    for name, step in list(runners.items()):
        runners[name] = (lambda step=step, k=[0]: (step(grad_sets[k[0] % 2]),
                                                   k.__setitem__(0, k[0] + 1)))
    blocks = {}
    elements = sum(sizes)
    block = 2 if elements >= 1_000_000 else 20
    medians, steps = rotating_medians(runners, budget_s, block=block, blocks=blocks)
    return {"case": label, "arrays": len(sizes), "elements": elements, "median_s": medians,
            "block_spread": {name: block_spread(ts) for name, ts in blocks.items()},
            "steps": steps}


def _fmt_us(seconds):
    return f"{seconds * 1e6:.0f} us" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"


def format_table(results):
    """The results as an aligned table: medians, then the RATIOS."""
    names = list(results[0]["median_s"])
    ratios = [r for r in RATIOS if r[1] in names and r[2] in names]
    head = ["case"] + names + [r[0] for r in ratios]
    body = []
    for res in results:
        med, spread = res["median_s"], res["block_spread"]
        body.append([res["case"]]
                    + [_fmt_us(med[n]) + ("~" if spread[n] > SPREAD_LIMIT else "") for n in names]
                    + [fmt_ratio(med[a] / med[b]) for _, a, b in ratios])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(head, widths)),
             "-+-".join("-" * w for w in widths)]
    return "\n".join(lines + [" | ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body])


def run_cli(args):
    """``fastopt bench --guards``: print the header and the table, save the JSON.

    Parameters
    ----------
    args : argparse.Namespace
        bench's parsed options; ``quick``, ``no_torch`` and ``json`` are used.

    Returns
    -------
    int
        The exit status.
    """
    import json
    import os
    from .. import _dispatch
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    print(header(with_torch))
    budget = 0.5 if args.quick else 2.0
    results = [run_case(label, sizes, budget, with_torch) for label, sizes in cases()]
    print(format_table(results))
    print(f"Adam float32 (lr {OPTIONS['lr']}, weight_decay {OPTIONS['weight_decay']}); "
          f"max_grad_norm {MAX_NORM} (every step clips), ema_decay {EMA_DECAY}; medians of "
          "rotating blocks; every implementation checked against fastopt's NumPy reference "
          f"over {CHECKED_STEPS} steps first. A / B = A's time over B's: the guards' cost "
          "over the bare step, torch's recipe over fastopt's (above 1: fastopt is faster). "
          f"~: blocks spread over {SPREAD_LIMIT:.0%} of their median."
          + ("" if with_torch else " torch: not installed or not used."))
    path = os.path.abspath(args.json or "fastopt-bench-guards.json")
    with open(path, "w") as f:
        json.dump({"config": _dispatch.config(), "header": header(with_torch),
                   "results": results}, f, indent=1)
    print(f"saved {path}")
    return 0
