"""What the API layer knows about an update rule, and how it runs one.

A :class:`Rule` is data: the hyperparameters and their validators, the state
it keeps, how the options decide which buffers are used, how the per-step
value is formed, and the step-independent scalars its kernel reads. Each rule
module (``fastopt/optim/<rule>.py``) defines one, next to its low-level
function and its optimizer classes; the machinery below, the optimizers, the
torch adapter and the checkpoints only ever read those fields.
"""
from typing import Callable, NamedTuple

from .. import _dispatch  # noqa: F401  (installs the compute layer for this CPU)
from .. import _fastpath
from .. import _validation as V


#: A state buffer's layout -> its shape for a parameter of shape ``shape``, or
#: None where such a parameter has no such buffer. Most buffers are "like" the
#: parameter; Adafactor factors a matrix's second moment into "rows" (...,
#: R, 1) and "cols" (..., 1, C), and keeps a full one only for a "vector"
#: (fewer than two dimensions), as torch.optim.Adafactor does.
LAYOUTS = {
    "like": lambda shape: shape,
    "rows": lambda shape: shape[:-1] + (1,) if len(shape) >= 2 else None,
    "cols": lambda shape: shape[:-2] + (1,) + shape[-1:] if len(shape) >= 2 else None,
    "vector": lambda shape: shape if len(shape) < 2 else None,
    # one number per row of the last axis (RowWiseAdagrad): (..., 1); a 0-d
    # parameter is a row of one
    "row_sums": lambda shape: shape[:-1] + (1,) if len(shape) >= 1 else shape,
}

#: How the fast path's screen (src_c/fastpath/screen.pxi) knows the layouts:
#: a group's ``needs`` carries, per buffer, 0 (unused) or its layout's code.
LAYOUT_CODES = {"like": 1, "rows": 2, "cols": 3, "vector": 4, "row_sums": 5}


class Rule(NamedTuple):
    """Everything the API layer needs to know about one update rule."""

    name: str
    #: the compute layer's number for this rule (src_c/rules/table.py)
    rule_id: int
    #: hyperparameter -> validation rule (the kernel's keyword arguments)
    hyper: dict
    #: state buffer names, in kernel argument order (torch.optim's names)
    buffers: tuple
    #: hyper -> tuple of bools: which buffers these options use
    needs: Callable
    #: hyper -> the kernel's step-independent scalars (fields of StepScalars)
    consts: Callable
    #: the pure-NumPy twin (fastopt.reference), same signature as the kernel function
    twin: Callable
    #: True: the state holds a step count t >= 1, passed as ``step``. False: the
    #: per-step value is ``first_step``, True on ``first_step_buffer``'s first use
    counts_steps: bool = True
    first_step_buffer: str = None
    #: buffer -> the hyperparameter holding its initial value (else it starts at 0)
    initial: dict = {}
    #: hyperparameters that only shape the state (not kernel arguments) -> validator
    state_hyper: dict = {}
    #: per-parameter scalar state (NAdam's mu_product, ASGD's eta and mu) -> its
    #: initial value, a number or a function of the hyperparameters. The rule's
    #: at_step (src_c/rules/) forms each step from these values and the values
    #: after it; one kernel call per distinct (step, scalar values)
    scalar_state: dict = {}
    #: (hyper, step) -> why at_step cannot form that step from the scalar state
    #: (NAdam: mu_product rounds to 1)
    scalar_error: Callable = None
    #: the validator of a stored scalar state value (finite unless the rule says)
    scalar_kind: Callable = V.finite
    #: cross-field constraints, hyper -> None or raise
    check: Callable = None
    #: True: a step reads each parameter array as a whole (Lamb's norms;
    #: src_c/rules/table.py's REDUCES), so arrays packed into one buffer
    #: (fastopt.FlatParams) are one parameter to it
    whole_arrays: bool = False
    #: buffer -> its layout (a key of LAYOUTS) where it is not shaped like the
    #: parameter; a rule with any runs through src_c/rules/table.py's
    #: SLOTWISE path, which reads each parameter's shape
    layouts: dict = {}
    #: False: complex parameters are refused (torch.optim.Adafactor's rule
    #: depends on the shape, which a real view would change)
    complex_ok: bool = True
    #: how the rule takes a fastopt.SparseRows gradient: None, it refuses one;
    #: else hyper -> "rows" (its kernel runs on the listed rows only, each
    #: with its summed value rows: src_c/fastpath/rows.pxi) or "dense" (the
    #: options move unlisted rows too, as SGD's momentum does: the step is the
    #: dense one of the gradient with zeros elsewhere); it raises ValueError
    #: for options that refuse sparse gradients (Adagrad's weight decay)
    sparse: Callable = None

    def buffer_shape(self, name, shape):
        """The shape of buffer ``name`` for a parameter of ``shape``; None: it has none."""
        return LAYOUTS[self.layouts.get(name, "like")](tuple(shape))

    def screen_needs(self, hyper):
        """Per buffer, 0 if ``hyper`` does not use it, else its layout's code (LAYOUT_CODES)."""
        return tuple(LAYOUT_CODES[self.layouts.get(name, "like")] if needed else 0
                     for name, needed in zip(self.buffers, self.needs(hyper)))

    def uses(self, name, shape, needed):
        """Whether a parameter of ``shape`` uses buffer ``name`` (``needed``: the options do)."""
        return needed and self.buffer_shape(name, shape) is not None

    def check_buffer(self, label, buf, name, p_label, p, dtype=None):
        """``buf``, which ``label`` names, fits buffer ``name`` of parameter ``p``.

        ``dtype``: the state's dtype where it is not the parameter's (an
        optimizer's ``state_dtype``, fastopt/_precision.py). Raises TypeError
        (dtype) or ValueError (shape, or a buffer such a parameter has none of).
        """
        if dtype is not None and dtype != p.dtype:
            if buf.dtype != dtype:
                raise TypeError(f"{label} has dtype {buf.dtype} but the state of {p_label} "
                                f"is {dtype}")
        elif buf.dtype != p.dtype:
            raise TypeError(f"{label} has dtype {buf.dtype} but {p_label} has dtype {p.dtype}")
        shape = self.buffer_shape(name, p.shape)
        if shape is None:
            raise ValueError(f"{label} is given, but a parameter of shape {p.shape} ({p_label}) "
                             f"has no {name!r} under {self.name}")
        if buf.shape != shape:
            raise ValueError(f"{label} has shape {buf.shape} but {p_label} of shape {p.shape} "
                             f"needs {shape}")

    @property
    def step_arg(self):
        """The name of the kernel's per-step argument: "step" or "first_step"."""
        return "step" if self.counts_steps else "first_step"

    def step_value(self, new_count, created):
        """This step's per-step value, from the new step count and the buffers just made."""
        return new_count if self.counts_steps else self.first_step_buffer in created

    def initial_scalars(self, hyper):
        """The scalar state of a parameter before its first step, under ``hyper``."""
        return {name: float(initial(hyper)) if callable(initial) else float(initial)
                for name, initial in self.scalar_state.items()}

    def check_scalar_state(self, hyper, step, state, where):
        """Validate a parameter's scalar state and the step it would take, changing nothing.

        ``state``: its state dict (or {} before its first step); ``step``: the
        count this step would give it. Raises TypeError/ValueError.
        """
        initial = self.initial_scalars(hyper)
        values = {name: self.scalar_kind(f"{where}[{name!r}]", state.get(name, initial[name]))
                  for name in self.scalar_state}
        self.advance_scalars(self.scalars(hyper), hyper, step, values, load=False)

    def advance_scalars(self, scalars, hyper, step, values, load=True):
        """The scalar state after a step at ``step`` from ``values`` (name -> float).

        ``load``: also load ``values`` into ``scalars`` (a Scalars), for the
        kernel call that takes the step. Raises ValueError where the rule
        cannot form the step (``scalar_error`` says why).
        """
        ordered = [values[name] for name in self.scalar_state]
        after = scalars.next_state(step, ordered)
        if after is None:
            raise ValueError(self.scalar_error(hyper, step))
        if load:
            scalars.set_state(ordered)
        return dict(zip(self.scalar_state, after))

    def scalars(self, hyper, flush_denormals=False, extra=None):
        """The compiled scalars for validated ``hyper`` (and ``extra`` fields); the step adds the rest."""
        return _fastpath.Scalars(self.rule_id, **self.consts(hyper), **(extra or {}),
                                 flush_denormals=flush_denormals)


def beta_consts(h):
    """The StepScalars of lr, betas, eps, coupled weight_decay and maximize (Adamax, Lamb)."""
    beta1, beta2 = h["betas"]
    return dict(lr=h["lr"], beta1=beta1, beta2=beta2, eps=h["eps"],
                weight_decay=h["weight_decay"], maximize=h["maximize"])


def moment_consts(h):
    """The StepScalars of the Adam family (Adam, AdamW, NAdam) from validated ``h``."""
    beta1, beta2 = h["betas"]
    if h["decoupled_weight_decay"]:
        # AdamW: p *= 1 - lr * weight_decay, and no decay term in the gradient
        coupled_wd, decay = 0.0, 1 - h["lr"] * h["weight_decay"]
    else:
        coupled_wd, decay = h["weight_decay"], 1.0
    return dict(lr=h["lr"], beta1=beta1, beta2=beta2, eps=h["eps"], weight_decay=coupled_wd,
                decay=decay, maximize=h["maximize"])


def check_step_value(rule, name, value):
    """Validate the per-step argument of ``rule`` (a step count or a flag)."""
    if rule.counts_steps:
        return V.step_count(name, value)
    return V.flag(name, value)


def apply(rule, p, g, buffers, step_value, hyper, scalar_values=None):
    """Validate one parameter's update under ``rule``, then run it (the low-level API).

    Returns the new scalar state (a dict) for a rule that keeps one, else None.
    """
    hyper, step_value, scalar_values = check_call(rule, step_value, hyper, scalar_values)
    V.check_float_array("p", p, writeable=True)
    V.check_float_array("g", g, writeable=False)
    V.check_like("g", g, "p", p)
    named = {}
    for name, buf, needed in zip(rule.buffers, buffers, rule.needs(hyper)):
        needed = rule.uses(name, p.shape, needed)
        if needed and buf is None:
            raise ValueError(f"{name} is required with these options")
        if buf is not None and not needed:
            raise ValueError(f"{name} was given but these options do not use it"
                             + (f" for a parameter of shape {p.shape}" if rule.layouts else ""))
        if buf is not None:
            V.check_float_array(name, buf, writeable=True)
            rule.check_buffer(name, buf, name, "p", p)
            V.check_no_overlap(name, buf, {"p": p, **named})
            named[name] = buf
    V.check_no_overlap("g", g, {"p": p, **named})
    return run_one(rule, p, g, buffers, step_value, hyper, scalar_values)


def check_call(rule, step_value, hyper, scalar_values=None):
    """The checked ``(hyper, step_value, scalar_values)`` of a low-level call."""
    hyper = V.check_hyper(rule.hyper, hyper)
    scalar_values = {k: rule.scalar_kind(k, v) for k, v in (scalar_values or {}).items()}
    if rule.check is not None:
        rule.check(hyper)
    return hyper, check_step_value(rule, rule.step_arg, step_value), scalar_values


def run_one(rule, p, g, buffers, step_value, hyper, scalar_values):
    """Run one parameter's checked update (:func:`apply` after its checks)."""
    scalars = rule.scalars(hyper)
    new_values = (rule.advance_scalars(scalars, hyper, step_value, scalar_values)
                  if rule.scalar_state else None)
    run_lists(rule, [p], [g], tuple(None if b is None else [b] for b in buffers),
              step_value, hyper, scalars)
    return new_values


def run_lists(rule, params, grads, buffer_lists, step_value, hyper, scalars=None, storage=None):
    """Run ``rule`` over aligned, already validated lists (one kernel call).

    ``storage``: None (each array as its dtype says, state alike), or the
    half-precision options per parameter, ``(kinds, masters, round_keys)``
    (fastopt/_precision.py; Workspace.fill).
    """
    ws = _fastpath.Workspace()
    if storage is None:
        ws.fill(params, grads, buffer_lists)
    else:
        ws.fill(params, grads, buffer_lists, *storage)
    run_workspace(rule, ws, step_value, scalars or rule.scalars(hyper))


def run_workspace(rule, ws, step_value, scalars):
    """Run a loaded workspace; ``step_value`` is the step count or SGD's first_step."""
    if rule.counts_steps:
        _fastpath.run_workspace(ws, scalars, step_value, False)
    else:
        _fastpath.run_workspace(ws, scalars, 0, step_value)


class Batches:
    """A group's validated updates sorted by per-step value: one kernel call each.

    The general path of a step (fastopt's optimizers and fastopt.torch) adds
    each parameter with its gradient and buffers; parameters can be at
    different step counts (one had no gradient once), and each distinct
    value is one call.
    """

    def __init__(self, rule, needs):
        self.rule = rule
        self.needs = needs
        self._by_value = {}

    def add(self, step_value, p, g, buffers, scalar_values=(), owner=None, storage=None):
        """Queue one update; ``buffers`` maps the rule's buffer names to arrays.

        ``scalar_values``: the parameter's scalar state, in the order of
        ``rule.scalar_state`` (parameters with other values need another call);
        ``owner``: where the caller writes the new values back (its state);
        ``storage``: its half-precision options ``(kind, master, round_key)``,
        or None (its dtype's kind, state alike).
        """
        key = (step_value, tuple(scalar_values))
        batch = self._by_value.get(key)
        if batch is None:
            batch = self._by_value[key] = ([], [], [[] if n else None for n in self.needs], [],
                                           [])
        batch[0].append(p)
        batch[1].append(g)
        for name, lst in zip(self.rule.buffers, batch[2]):
            if lst is not None:  # (None: a parameter without it, as Adafactor's vectors)
                lst.append(buffers.get(name))
        batch[3].append(owner)
        batch[4].append(storage)

    def __iter__(self):
        """``(step_value, scalar_values, params, grads, buffer_lists, owners, storage)``
        per call; ``storage``: None, or per option a list (run_lists)."""
        for (step_value, values), (ps, gs, buffer_lists, owners, storage) in \
                self._by_value.items():
            storage = (None if all(s is None for s in storage) else
                       tuple(list(column) for column in zip(*(
                           s if s is not None else (-1, None, None) for s in storage))))
            yield (step_value, dict(zip(self.rule.scalar_state, values)), ps, gs,
                   tuple(buffer_lists), owners, storage)
