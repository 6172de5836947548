"""An optimizer step whose gradients include sparse rows (fastopt.SparseRows).

The step keeps the machinery's contract: everything is validated first -
each sparse gradient against its parameter and state, its index range (by
planning its rows), then the whole step as ``Optimizer._plan`` validates a
dense one - and only then does anything run. A rule says how it takes sparse
rows (``Rule.sparse``):

- "rows": its kernel runs on the listed rows only, each with its summed
  value rows, one slot per row (src_c/fastpath/rows.pxi). Adagrad's kernel
  then takes torch's sparse form (StepScalars.sparse_rows).
- "dense": the options move unlisted rows too (SGD's momentum buffer decays
  on every row, weight decay pulls every row): the step is the dense step of
  the gradient with zeros elsewhere. The rows are merged into a zeroed
  scratch array kept per parameter, which the step hands to the dense path
  and clears again (only the listed rows) when it is done.

Each parameter keeps its own row plan (its sorted indices and merge buffer),
grown to the largest step seen: steps allocate nothing once warm.
"""
import numpy as np

from .. import _fastpath
from .. import reference
from ..sparse import SparseRows, plan_rows
from .rule import run_workspace


#: the kernel scalars a sparse-row step adds (Adagrad's sparse form)
SPARSE_SCALARS = {"sparse_rows": True}


def step(opt, grads):
    """Take ``opt``'s step (under its lock) for gradients of which some are SparseRows.

    Returns False if ``skip_nonfinite`` skipped it, else True.
    """
    if opt.max_grad_norm is not None:
        raise ValueError(f"{type(opt).__name__}(max_grad_norm=...) clips dense gradients only: "
                         "a SparseRows gradient's norm is not formed (clip its values, or "
                         "pass it dense)")
    opt._check_groups()
    grads = opt._align(grads, sum(len(group["params"]) for group in opt.param_groups))
    rule = opt.rule
    names = opt._flat_names()
    params = opt._flat_params()
    plans = opt.__dict__.setdefault("_row_plans", {})
    scratch = opt.__dict__.setdefault("_row_dense", {})
    rows, dense, values = [], [], []
    surrogate = list(grads)
    start = 0
    for gi, group in enumerate(opt.param_groups):
        stop = start + len(group["params"])
        for index in range(start, stop):
            g = grads[index]
            if not isinstance(g, SparseRows):
                continue
            p = params[index]
            p_label, g_label = opt._labels(index, None if names is None else names[index])
            checked = opt._group_hyper(gi, group)
            form = sparse_form(type(opt).__name__, rule, checked.hyper, opt.precision,
                               g_label, p_label, p.shape)
            opt._check_one(index, p, g, names)
            plan = plans.get(index)
            if plan is None:
                plan = plans[index] = _fastpath.RowPlan()
            plan_rows(plan, g_label, g, p_label, p)
            values.append(g.values)
            if form == "rows":
                surrogate[index] = None
                rows.append((index, gi, checked))
            else:
                dense.append(index)
        start = stop
    # The merged rows of the "dense" parameters go into their zeroed scratch
    # arrays; whatever happens next, those rows are zeroed again.
    try:
        for index in dense:
            p = params[index]
            buf = scratch.get(index)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
                buf = scratch[index] = np.zeros_like(p)
            plans[index].scatter(buf, grads[index].values)
            surrogate[index] = buf
        checked_grads, plan = opt._plan(surrogate)
        # (the sparse values stay clear of every parameter and state buffer)
        opt._check_aliasing([g.values if isinstance(g, SparseRows) else g for g in grads])
        if not opt._run_plan(checked_grads, plan, also=values):
            return False
        for index, gi, checked in rows:
            _step_rows(opt, index, params[index], grads[index], plans[index], checked)
        return True
    finally:
        for index in dense:
            if index in scratch:
                plans[index].scatter(scratch[index], grads[index].values, True)


def sparse_form(cls_name, rule, hyper, precision, g_label, p_label, shape):
    """How ``rule`` under ``hyper`` takes a sparse gradient of a parameter of ``shape``:
    "rows" or "dense" (module docstring), or TypeError/ValueError saying why it cannot."""
    if rule.sparse is None:
        raise TypeError(f"{g_label} is sparse, but {cls_name} takes dense gradients only "
                        "(sparse rows: SGD, Adagrad, SparseAdam, RowWiseAdagrad)")
    if not precision.plain:
        raise ValueError(f"{g_label} is sparse: sparse gradients do not take the "
                         "half-precision options (state_dtype, master_weights, "
                         "stochastic_rounding) yet")
    try:
        form = rule.sparse(hyper)
    except ValueError as err:
        raise ValueError(f"{g_label}: {err}") from None
    for name, needed in zip(rule.buffers, rule.needs(hyper)):
        kept = rule.buffer_shape(name, tuple(shape)) if needed else None
        if kept is not None and tuple(kept[:1]) != tuple(shape[:1]):
            raise ValueError(f"{g_label} is sparse, but {p_label} of shape {tuple(shape)} keeps "
                             f"its {name!r} as {tuple(kept)} under {cls_name}, not per row of "
                             "its leading axis: pass a dense gradient, or a parameter of two "
                             "or more dimensions")
    return form


def run_rows(rule, p, g, plan, buffers, step_value, kernel_hyper, scalars, backend, ws):
    """Run ``rule`` on the rows ``plan`` holds for SparseRows ``g`` of ``p`` (validated).

    ``buffers``: p's state arrays in the rule's order (None: unused); ``ws``:
    a _fastpath.Workspace to load (reused across steps).
    """
    if backend == "numpy":
        reference.sparse_rows_step(rule.twin, p, g.indices, g.values, buffers,
                                   **{rule.step_arg: step_value}, **kernel_hyper)
        return
    plan.fill(ws, p, g.values, tuple(buffers))
    run_workspace(rule, ws, step_value, scalars)


def _step_rows(opt, index, p, g, plan, checked):
    """The listed rows of one validated parameter: state made if new, the step counted, run."""
    rule = opt.rule
    hyper = checked.hyper
    state = opt.state.setdefault(index, {})
    created = []
    for name, needed in zip(rule.buffers, rule.needs(hyper)):
        if state.get(name) is None and rule.uses(name, p.shape, needed):
            state[name] = np.full(rule.buffer_shape(name, p.shape), opt._initial_value(name, hyper),
                                  dtype=opt._state_dtype(p))
            created.append(name)
    step_value = opt._advance(state, created)
    ws = opt.__dict__.get("_row_workspace")
    if ws is None:
        ws = opt.__dict__["_row_workspace"] = _fastpath.Workspace()
    run_rows(rule, p, g, plan, [state.get(name) for name in rule.buffers], step_value,
             checked.kernel_hyper,
             rule.scalars(checked.kernel_hyper, opt.flush_denormals, SPARSE_SCALARS),
             opt.backend, ws)
