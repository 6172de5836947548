"""The machinery every optimizer shares: param groups, state, step, state_dict.

A concrete optimizer (see ``fastopt.optim``) is only a description: its
update rule (``fastopt.kernels.Rule``), its defaults and how its state starts.
Everything here works for any rule.

A step runs in two phases. First every input is validated - the structure of
``grads``, every hyperparameter of every group, every parameter and gradient
array - without touching anything. Only then is state allocated and are the
kernels run, so a step that raises has modified no parameter and no state.
"""
import contextlib
import inspect
import numbers
import operator

import numpy as np

from .. import _fastpath
from .. import _precision
from .. import _validation as V
from .. import reference
from .. import checkpoint
from .._watched import ParamGroup, State
from ..flat import packed_like
from ..sparse import SparseRows, check_rows
from . import guards, rows
from .rule import Batches, run_lists, run_workspace

BACKENDS = ("cython", "numpy")
#: step()'s default, so that a call without gradients gets a message, not
#: Python's bare "missing 1 required positional argument".
_NO_GRADS = object()
# The attributes an optimizer's Stepper is bound to (see Optimizer.__setattr__).
_STEPPER_INPUTS = frozenset({"_lock", "param_groups", "state", "_workspaces", "_guard",
                             "backend", "skip_nonfinite", "rule", "precision",
                             "max_grad_norm", "ema_decay"})
#: the state key of a half parameter's float32 copy under master_weights
MASTER = "master_param"


#: The constructor parameters every optimizer shares, for their docstrings.
#: The Adam family's common constructor options, for its classes' docstrings.
MOMENT_DOC = """lr : float, default {lr}
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default {weight_decay}"""

PARAMS_DOC = """params : list of ndarray, dict or list of dict
        The arrays to optimize (updated in place), a dict name -> array, or
        param-group dicts ``{"params": ..., "lr": ..., ...}``. Complex arrays
        are stepped as their real view, as torch.optim steps complex tensors.
    backend : {"cython", "numpy"}
        ``"numpy"`` runs the pure-NumPy reference twins instead of the fused
        kernels (for comparison; much slower).
    skip_nonfinite : bool
        Skip (and count in ``skipped_steps``) any step whose gradients hold
        NaN or Inf: parameters and state stay untouched.
    flush_denormals : bool
        Run the kernels with the CPU's flush-to-zero and denormals-are-zero
        modes (x86; restored after every call): subnormal values, which make
        each operation 10-20x slower, count as zero. Off by default, because
        results then differ from torch.optim's in the subnormal range.
    """ + _precision.DOC + "\n    " + guards.DOC


def _split_groups(params):
    """Normalise the ``params`` argument into a list of group dicts."""
    if isinstance(params, np.ndarray):
        raise TypeError(
            "params must be a list of arrays, a dict name -> array, or a list of "
            "param-group dicts; got a single ndarray (wrap it in a list)"
        )
    if isinstance(params, dict):
        return [{"params": params}]
    try:
        items = list(params)
    except TypeError:
        raise TypeError(
            f"params must be a list of arrays, a dict or a list of dicts, got "
            f"{type(params).__name__}"
        ) from None
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if all(isinstance(x, dict) for x in items):
        return items
    if any(isinstance(x, dict) for x in items):
        raise TypeError("params mixes arrays and param-group dicts; use one or the other")
    return [{"params": items}]


class Optimizer:
    """Base class: holds param groups and state, validates and runs steps.

    Subclasses set :attr:`rule` (a fastopt.optim.rule.Rule, whose data says
    everything rule-specific) and their constructor's signature.

    Attributes
    ----------
    param_groups : list of dict
        One dict per group: ``"params"`` (the arrays), the hyperparameters,
        and ``"param_names"`` when parameters were given by name. Values may
        be changed between steps and take effect on the next step.
    state : dict
        Flat parameter index -> dict of that parameter's state (``"step"``
        and the rule's buffers, named as in torch.optim). Filled lazily on a
        parameter's first step with a gradient.
    """

    rule = None
    #: options the class always sets (AdamW: decoupled weight decay), for its torch twin
    fixed = {}

    def __init_subclass__(cls, **kwargs):
        # A class's ``**precision`` is passed on to this constructor: its
        # signature shows the four keywords instead (help(), the README).
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        sig = inspect.signature(init)
        kept = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        if len(kept) < len(sig.parameters):
            init.__signature__ = sig.replace(parameters=kept + [
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
                for name, default in [*_precision.Precision()._asdict().items(),
                                      ("max_grad_norm", None), ("ema_decay", None)]])

    def __init__(self, params, defaults, *, backend="cython", skip_nonfinite=False,
                 flush_denormals=False, state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, max_grad_norm=None, ema_decay=None):
        V.choice("backend", backend, BACKENDS)
        #: the half-precision options (fastopt/_precision.py), fixed at construction
        self.precision = _precision.check(state_dtype, master_weights, stochastic_rounding, seed)
        self._fast = None  # the fast path (a _fastpath.Stepper), made on the first step
        self.backend = backend
        self.skip_nonfinite = V.flag("skip_nonfinite", skip_nonfinite)
        self.skipped_steps = 0  # steps skipped for NaN/Inf gradients
        # the step guards (fastopt/optim/guards.py): clipping and the weight average
        self.max_grad_norm, self.ema_decay = guards.check(max_grad_norm, ema_decay)
        self.last_grad_norm = None  # each step's gradient norm before clipping
        self.flush_denormals = V.flag("flush_denormals", flush_denormals)
        # step() from two threads on one optimizer would race on its
        # workspaces and state; they take turns instead.
        self._lock = _fastpath.StepLock()
        self.defaults = self._check_group_hyper(defaults, "")
        self.param_groups = []
        self.state = State()
        self._workspaces = []  # one reusable pointer array per group (fast path)
        self._guard = _fastpath.Guard()  # the step's protected memory, for check_step
        self._named = None  # True/False once the first group fixes it
        for group in _split_groups(params):
            self.add_param_group(group)

    # ------------------------------------------------------------ groups

    def _hyper_rules(self):
        return {**self.rule.hyper, **self.rule.state_hyper}

    def _check_group_hyper(self, group, where):
        hyper = V.check_hyper(self._hyper_rules(), group, where)
        if self.rule.check is not None:
            try:
                self.rule.check(hyper)
            except ValueError as e:
                raise ValueError(f"{where}{e}") from None
        return hyper

    def _labels(self, index, name):
        """How messages name parameter ``index`` and its gradient."""
        key = index if name is None else repr(name)
        return f"params[{key}]", f"grads[{key}]"

    def _flat_params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _flat_names(self):
        if not self._named:
            return None
        return [n for group in self.param_groups for n in group["param_names"]]

    def add_param_group(self, param_group):
        """Add a group of parameters with its own hyperparameters.

        Parameters
        ----------
        param_group : dict
            ``"params"``: a list of arrays or a dict name -> array; any other
            key overrides the optimizer's default for this group.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise TypeError("a param group needs a 'params' entry")
        params = param_group["params"]
        if isinstance(params, dict):
            names, arrays = list(params.keys()), list(params.values())
            for name in names:
                if not isinstance(name, str):
                    raise TypeError(f"parameter names must be strings, got {name!r}")
        elif isinstance(params, np.ndarray):
            names, arrays = None, [params]
        else:
            names, arrays = None, list(params)
        named = names is not None
        if self._named is not None and named != self._named:
            raise ValueError("either every param group names its parameters or none does")
        where = f"param_groups[{len(self.param_groups)}]: "
        group = self._check_group_hyper({**self.defaults, **param_group}, where)
        extras = {k: v for k, v in param_group.items() if k not in group and k != "params"}

        start = len(self._flat_params())
        old_names = self._flat_names() or []
        labelled = []
        for k, p in enumerate(arrays):
            label = self._labels(start + k, names[k] if named else None)[0]
            V.check_float_array(label, p, writeable=True, complex_ok=self.rule.complex_ok,
                                torch_twin=f"fastopt.torch.{type(self).__name__}", half_ok=True)
            self.precision.check_param(label, _precision.element(V.real_view(p).dtype),
                                       p.dtype.kind == "c")
            labelled.append((label, p))
        if named:
            clash = set(old_names) & set(names)
            if clash:
                raise ValueError(f"parameter name {sorted(clash)[0]!r} is used twice")
        existing = [
            (self._labels(i, old_names[i] if named else None)[0], p)
            for i, p in enumerate(self._flat_params())
        ]
        V.check_distinct_params(existing + labelled)

        # Validated: now change the optimizer.
        group = ParamGroup({**group, **extras})
        group["params"] = arrays
        if named:
            group["param_names"] = names
        self._named = named
        self.param_groups.append(group)
        self._workspaces.append(_fastpath.Workspace())

    # -------------------------------------------------------------- step

    def _align(self, grads, count):
        """Return grads as a list aligned with the flat parameter list."""
        if isinstance(grads, dict):
            names = self._flat_names()
            if names is None:
                raise TypeError(
                    "grads is a dict but the parameters were given without names; "
                    "pass a list aligned with the parameters"
                )
            for name in names:
                if name not in grads:
                    raise ValueError(
                        f"grads is missing {name!r} (give None for a parameter "
                        "without a gradient this step)"
                    )
            if len(grads) != count:
                extra = next(k for k in grads if k not in set(names))
                raise ValueError(f"grads has key {extra!r}, which names no parameter")
            return [grads[name] for name in names]
        if isinstance(grads, (list, tuple)):
            if len(grads) != count:
                raise ValueError(f"got {len(grads)} grads for {count} parameters")
            return grads if isinstance(grads, list) else list(grads)
        raise TypeError(
            f"grads must be a list aligned with the parameters or a dict name -> "
            f"array, got {type(grads).__name__}"
        )

    def _group_hyper(self, gi, group):
        """The group's _fastpath.CheckedGroup, cached on it until it is edited."""
        checked = getattr(group, "checked", None)
        if checked is None:
            hyper = self._check_group_hyper(group, f"param_groups[{gi}]: ")
            kernel_hyper = {k: hyper[k] for k in self.rule.hyper}
            checked = _fastpath.CheckedGroup(
                hyper, kernel_hyper, self.rule.screen_needs(hyper),
                self.rule.scalars(kernel_hyper, self.flush_denormals))
            if isinstance(group, ParamGroup):
                group.checked = checked
        return checked

    def _explain(self, grads):
        """Raise the error for what the screen flagged (a parameter, or aliasing)."""
        self._check_each(grads)
        self._check_aliasing(grads)
        raise RuntimeError(  # pragma: no cover - the screen and the checks disagree
            "fastopt internal error: the fast input screen refused a step that the "
            "checks accept; please report this"
        )

    def _check_aliasing(self, grads):
        """What the optimizer holds is disjoint, and no gradient overlaps it.

        Every parameter and every state buffer, across all groups - also of
        parameters without a gradient this step, whose memory a write through
        an alias would change on a step that leaves them alone. Otherwise the
        result would depend on the order of the writes (the thread count).
        Objects that are not arrays are left to the other checks.
        """
        held, reads = [], []
        names = self._flat_names()
        for index, p in enumerate(self._flat_params()):
            p_label, g_label = self._labels(index, None if names is None else names[index])
            if isinstance(p, np.ndarray):
                held.append((p_label, p))
            if grads[index] is not None:
                reads.append((g_label, grads[index]))
            state = self.state.get(index)
            for name in self._held_buffers() if isinstance(state, dict) else ():
                if isinstance(state.get(name), np.ndarray):
                    held.append((f"state[{index}][{name!r}]", state[name]))
        V.check_no_aliasing(held, reads)

    def _check_each(self, grads):
        """Every rule on each parameter with a gradient, its gradient and its state."""
        names = self._flat_names()
        for index, (p, g) in enumerate(zip(self._flat_params(), grads)):
            if g is not None:
                self._check_one(index, p, g, names)

    def _check_one(self, index, p, g, names):
        """The rules on parameter ``index``, its gradient ``g`` (an array or a
        fastopt.SparseRows) and its state."""
        p_label, g_label = self._labels(index, None if names is None else names[index])
        state = self.state.get(index)
        V.check_float_array(p_label, p, writeable=True, complex_ok=self.rule.complex_ok,
                            half_ok=True)
        if isinstance(g, SparseRows):
            check_rows(g_label, g, p_label, p)
            g_label, g = f"{g_label}.values", g.values
        else:
            V.check_float_array(g_label, g, writeable=False, complex_ok=self.rule.complex_ok,
                                half_ok=True)
            V.check_like(g_label, g, p_label, p)
        V.check_no_overlap(g_label, g, {p_label: p})
        if state is None:
            return
        if not isinstance(state, dict):
            raise TypeError(f"state[{index}] must be a dict, got {type(state).__name__}")
        if "step" in state:
            V.stored_step(f"state[{index}]['step']", state["step"])
        checked = {p_label: p}
        p_element = _precision.element(V.real_view(p).dtype)
        for name in self._held_buffers():
            if state.get(name) is None:
                continue
            label = f"state[{index}][{name!r}]"
            V.check_float_array(label, state[name], writeable=True, complex_ok=True,
                                half_ok=True)
            if name == MASTER:
                _check_master(label, state[name], p_label, p, self.precision, p_element)
            elif name == guards.EMA:
                guards.check_average(label, state[name], p_label, p)
            else:
                self.rule.check_buffer(label, state[name], name, p_label, p,
                                       self._state_dtype(p))
            V.check_no_overlap(label, state[name], checked)
            V.check_no_overlap(g_label, g, {label: state[name]})
            checked[label] = state[name]

    def _check_groups(self):
        """Each param group is a dict whose "params" is a list."""
        for gi, group in enumerate(self.param_groups):
            if not isinstance(group, dict) or type(group.get("params")) is not list:
                raise TypeError(f"param_groups[{gi}] must be a dict whose 'params' is a list "
                                f"of arrays, got {type(group).__name__}")

    def _plan(self, grads):
        """Validate everything a step touches.

        Returns the aligned grads and, per group, its hyperparameters and
        whether the fast path loaded its workspace (with the common step).
        This runs on every step: it avoids any work per parameter in Python.
        """
        groups = self.param_groups
        self._check_groups()
        grads = self._align(grads, sum([len(group["params"]) for group in groups]))
        rule = self.rule
        plan = []
        start = 0
        everything_gathered = True
        policy = self.precision.policy()
        if policy is not None:  # (the screen applies it too: the messages are Python's)
            self._check_each(grads)
        for gi, group in enumerate(groups):
            checked = self._group_hyper(gi, group)
            params = group["params"]
            stop = start + len(params)
            code, step = _fastpath.gather(self._workspaces[gi], params, grads, start, stop,
                                          self.state, rule.buffers, checked.needs,
                                          self._counts_steps, policy)
            if code >= 0:
                self._explain(grads)
            # A rule with scalar state (NAdam) always takes the general path.
            gathered = code == _fastpath.GATHERED and not rule.scalar_state
            plan.append((checked, start, stop, gathered, step))
            everything_gathered &= gathered
            start = stop
        if rule.scalar_state:  # the screen knows buffers, not scalars (NAdam's mu_product)
            start = 0
            for gi, group in enumerate(groups):
                hyper = plan[gi][0].kernel_hyper
                for index in range(start, start + len(group["params"])):
                    state = self.state.get(index, {})
                    if grads[index] is not None and isinstance(state, dict):
                        rule.check_scalar_state(hyper, state.get("step", 0) + 1, state,
                                                f"state[{index}]")
                start += len(group["params"])
        # Aliasing across parameters: in C when every workspace is loaded,
        # else (the general path, Python work per parameter anyway) here.
        if not everything_gathered:
            self._check_aliasing(grads)
        elif not _fastpath.check_step(self._guard, self._workspaces, len(groups)):
            self._explain(grads)
        return grads, plan

    def _initial_value(self, name, hyper):
        """The value state buffer ``name`` starts at: zero unless the rule names a hyperparameter."""
        return hyper[self.rule.initial[name]] if name in self.rule.initial else 0.0

    def _held_buffers(self):
        """The state arrays a parameter may hold: the rule's buffers and its master copy."""
        return (self.rule.buffers + ((MASTER,) if self.precision.master_weights else ())
                + ((guards.EMA,) if self.ema_decay is not None else ()))

    def _state_dtype(self, p):
        """The dtype of ``p``'s state buffers under this optimizer's precision."""
        own = _precision.element(V.real_view(p).dtype)  # (complex: state is complex too)
        element = self.precision.state_element(own)
        return p.dtype if element == own else _precision.numpy_dtype(element)

    @property
    def _counts_steps(self):
        """Whether a step counts in ``state[i]["step"]``: the rule's count, or the
        stochastic rounding's (its random bits follow the step)."""
        return self.rule.counts_steps or self.precision.stochastic_rounding

    def _advance(self, state, created):
        """Count this step in ``state`` (if the rule counts steps); the rule's per-step value."""
        if self._counts_steps:
            state["step"] = state.get("step", 0) + 1
        return self.rule.step_value(state.get("step"), created)

    def step(self, grads=_NO_GRADS):
        """Update every parameter that has a gradient, in place.

        Parameters
        ----------
        grads : list or dict
            A list aligned with the parameters (in group order), or, when the
            parameters were given by name, a dict with the same keys. ``None``
            means that parameter has no gradient this step: it and its state
            are left alone. Gradients must be C-contiguous arrays of the
            parameter's dtype and shape (non-contiguous ones are refused, not
            copied) and must not share memory with any parameter or state
            buffer of the step.

        Raises
        ------
        TypeError, ValueError
            On any invalid input, before anything is modified.

        Notes
        -----
        With ``skip_nonfinite=True`` a step whose gradients hold NaN or Inf
        changes nothing and is counted in ``skipped_steps``.

        Thread safety: the kernels release the GIL, so optimizers stepping in
        different threads run in parallel; concurrent calls on one optimizer
        are serialized by a lock.
        """
        if grads is _NO_GRADS:
            raise TypeError(
                f"{type(self).__name__}.step() needs the gradients: pass a list aligned with "
                "the parameters (in group order), or a dict keyed by their names, e.g. "
                "opt.step([grad_w, grad_b]); None stands for 'no gradient this step'. "
                "(torch.optim reads p.grad instead: for torch models use fastopt.torch.)")
        fast = self._fast
        if fast is None:
            fast = self._fast = self._make_stepper()
        if fast(grads):
            return  # the common case, done in Cython with no work per parameter here
        with self._lock:
            self._step(grads)

    def _make_stepper(self):
        """The fast path (_fastpath.Stepper) bound to what this optimizer steps now."""
        lock = self._lock
        bindings = lock.bindings  # read first: a rebind from here on makes it decline
        return _fastpath.Stepper(lock, bindings, self.param_groups, self.state, self._workspaces,
                                 self._guard, self.rule.buffers, self.rule.counts_steps,
                                 enabled=(self.backend == "cython" and not self.skip_nonfinite
                                          and not self._guarded),
                                 scalar_names=tuple(self.rule.scalar_state),
                                 policy=self.precision.policy())

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name in _STEPPER_INPUTS:
            # The Stepper holds the old object: it declines from now on (even
            # one being made in another thread right now), and the next step
            # makes a new one.
            object.__setattr__(self, "_fast", None)
            lock = self.__dict__.get("_lock")
            if lock is not None:
                lock.bindings += 1

    @property
    def _guarded(self):
        """Whether a step guard (clipping, the weight average) is on: the general path's."""
        return self.max_grad_norm is not None or self.ema_decay is not None

    def _step(self, grads):
        # The fast path declined. If it was made before a rebind, replace it.
        self._fast = None
        if isinstance(grads, (list, tuple, dict)) and any(
                isinstance(g, SparseRows) for g in (grads.values() if isinstance(grads, dict)
                                                    else grads)):
            ran = rows.step(self, grads)
        else:
            grads, plan = self._plan(grads)
            ran = self._run_plan(grads, plan)
        if ran and self.ema_decay is not None:
            self._average()

    def _run_plan(self, grads, plan, also=()):
        """Run a validated step (``_plan``'s result): every group's kernels.

        With ``skip_nonfinite``, a NaN or Inf in ``grads`` or in the arrays
        ``also`` (sparse-row values) skips the step: returns False, else True.
        With ``max_grad_norm``, the same pass gives the norm and the kernels
        read the gradients clipped (fastopt/optim/guards.py).
        """
        coef = 1.0
        if self.ema_decay is not None:
            self._check_averages(grads, all(entry[3] for entry in plan))
        if self.skip_nonfinite or self.max_grad_norm is not None:
            norm, nonfinite = guards.grad_norm([g for g in grads if g is not None] + list(also))
            if self.max_grad_norm is not None:
                self.last_grad_norm = norm
                coef = guards.coefficient(norm, self.max_grad_norm)
            if nonfinite and self.skip_nonfinite:
                self.skipped_steps += 1
                return False
        # Everything is valid: from here on nothing raises. (A sparse-row step
        # updates its rows after this: its averages wait for _average.)
        fused = () if also else self._fuse_averages(plan)
        try:
            self._run_groups(grads, plan, coef)
        finally:
            for gi in fused:
                self._workspaces[gi].clear_averages()
        if fused:
            object.__setattr__(self, "_ema_ready", None)  # done: _average has nothing left
            object.__setattr__(self, "_ema_fused", True)
        return True

    def _fuse_averages(self, plan):
        """Hand the averages to the kernels (``Slot.avg``), when ``_check_averages``
        cleared them and every group runs as one plain float32/float64 kernel
        call: then each block of a parameter's average moves right after the
        block of the update, while it is in the cache. All groups or none (a
        half-fused step would average some parameters twice); returns the
        groups' indices."""
        ready = self.__dict__.get("_ema_ready")
        if (ready is None or self.flush_denormals or self.backend != "cython"
                or not all(entry[3] for entry in plan)):
            return ()
        avgs, weight, done = ready[1], 1.0 - self.ema_decay, []
        for gi, (_, start, stop, _, _) in enumerate(plan):
            if not self._workspaces[gi].set_averages(avgs[start:stop], weight):
                for other in done:
                    self._workspaces[other].clear_averages()
                return ()
            done.append(gi)
        return done

    def _run_groups(self, grads, plan, coef):
        """Every group's kernels (``_run_plan``'s second half: all is validated)."""
        rule = self.rule
        for gi, (checked, start, stop, gathered, step) in enumerate(plan):
            scalars = checked.scalars if coef == 1.0 else checked.scalars.scaled(coef)
            if gathered and self.backend == "cython":
                # Every parameter has its state at the same step: one kernel call.
                run_workspace(rule, self._workspaces[gi], step + 1 if rule.counts_steps else False,
                              scalars)
                if self._counts_steps:
                    _fastpath.commit_steps(self._workspaces[gi], step + 1)
            else:
                self._step_group(self.param_groups[gi]["params"], grads, start, stop, checked,
                                 scalars, coef)

    def _check_averages(self, grads, gathered=False):
        """Every parameter's weight average, if it has one, before a step runs (the
        averaging pass touches every parameter, stepped or not).

        ``gathered``: every group's workspace was loaded by this step's plan.
        Then, while the state reports no edit and the parameters are the same
        objects as at the last full check, the averages are known good and
        only their overlaps with this step's arrays are checked, in C; the
        averaging pass's workspace is reused (``_ema_ready``: it and the
        averages in parameter order).
        """
        object.__setattr__(self, "_ema_ready", None)
        params = self._flat_params()
        cache = self.__dict__.get("_ema_cache")
        if (gathered and self.backend == "cython" and cache is not None
                and cache[0] is self.state and cache[1] == self.state.version
                and len(cache[2]) == len(params) and all(map(operator.is_, cache[2], params))
                and _fastpath.averages_clear(cache[3], cache[4], cache[2], self._workspaces,
                                             len(self.param_groups))):
            object.__setattr__(self, "_ema_ready", (cache[3], cache[4]))
            return
        object.__setattr__(self, "_ema_cache", None)
        names = self._flat_names()
        avgs = []
        for index, p in enumerate(params):
            state = self.state.get(index)
            avg = state.get(guards.EMA) if isinstance(state, dict) else None
            if avg is not None:
                p_label, _ = self._labels(index, None if names is None else names[index])
                guards.check_average(f"state[{index}][{guards.EMA!r}]", avg, p_label, p)
            avgs.append(avg)
        self._check_aliasing(grads)  # (the fast path's C check knows no averages)
        # Every average there and rounded to nearest (no per-step keys): the
        # pass can be loaded once and reused while nothing changes.
        if (self.backend == "cython" and params and all(a is not None for a in avgs)
                and not (self.precision.stochastic_rounding
                         and any(p.dtype.itemsize == 2 for p in params))):
            ws = guards.average_workspace(avgs, params)
            # (state, its version, the params, the pass, the averages it points into)
            object.__setattr__(self, "_ema_cache",
                               (self.state, self.state.version, list(params), ws, avgs))
            object.__setattr__(self, "_ema_ready", (ws, avgs))

    def _average(self):
        """The weight average's pass over every parameter: a copy on its first step."""
        if self.__dict__.get("_ema_fused"):
            object.__setattr__(self, "_ema_fused", False)  # the kernels moved them
            return
        ready = self.__dict__.get("_ema_ready")
        if ready is not None:
            object.__setattr__(self, "_ema_ready", None)
            guards.run_average(ready[0], self.ema_decay)
            return
        avgs, params, keys = [], [], []
        precision = self.precision
        for index, p in enumerate(self._flat_params()):
            state = self.state.setdefault(index, {})
            if state.get(guards.EMA) is None:
                state[guards.EMA] = np.array(p, copy=True, order="C")
                continue
            avgs.append(state[guards.EMA])
            params.append(p)
            keys.append(precision.round_key(state.get("step", 0), index)
                        if precision.stochastic_rounding and p.dtype.itemsize == 2 else None)
        guards.average(avgs, params, self.ema_decay, self.backend, keys)

    def ema_params(self):
        """The weight averages (``ema_decay``), aligned with the parameters in group order.

        Returns
        -------
        list of ndarray or None
            Each parameter's average (the optimizer's own array: copy it to
            keep it), None before its first step.
        """
        if self.ema_decay is None:
            raise ValueError(f"{type(self).__name__} keeps no weight average: make it with "
                             "ema_decay=...")
        return [s.get(guards.EMA) if isinstance(s := self.state.get(i), dict) else None
                for i in range(len(self._flat_params()))]

    @contextlib.contextmanager
    def averaged(self):
        """A context in which every parameter holds its weight average (for evaluation).

        The parameters' own values are put back on exit, an exception
        included. Parameters without an average yet keep their values.
        """
        pairs = [(p, avg) for p, avg in zip(self._flat_params(), self.ema_params())
                 if avg is not None]
        with self._lock:
            saved = [p.copy() for p, _ in pairs]
            try:
                for p, avg in pairs:
                    np.copyto(p, avg)
                yield self
            finally:
                for (p, _), own in zip(pairs, saved):
                    np.copyto(p, own)

    def _step_group(self, params, grads, start, stop, checked, scalars=None, coef=1.0):
        """The general path: lazy state, uneven steps, missing gradients.

        ``scalars``: the group's, with clipping's coefficient ``coef`` in them.
        """
        hyper, kernel_hyper, needs = checked.hyper, checked.kernel_hyper, checked.needs
        scalars = checked.scalars if scalars is None else scalars
        rule = self.rule
        # New state buffers of the group are allocated together, packed back
        # to back (fastopt.flat.packed_like), so a step streams through them.
        created = {}
        for name, needed in zip(rule.buffers, needs):
            if not needed:
                continue
            missing = [i for i in range(start, stop) if grads[i] is not None
                       and self.state.get(i, {}).get(name) is None
                       and rule.uses(name, params[i - start].shape, True)]
            views = packed_like([params[i - start] for i in missing],
                                self._initial_value(name, hyper),
                                [rule.buffer_shape(name, params[i - start].shape)
                                 for i in missing],
                                [self._state_dtype(params[i - start]) for i in missing])
            for i, view in zip(missing, views):
                self.state.setdefault(i, {})[name] = view
                created.setdefault(i, []).append(name)
        batches = Batches(rule, needs)
        precision = self.precision
        for index in range(start, stop):
            g = grads[index]
            if g is None:
                continue
            p = params[index - start]
            state = self.state.setdefault(index, {})
            for name, initial in rule.initial_scalars(hyper).items():
                state.setdefault(name, initial)
            p_element = _precision.element(V.real_view(p).dtype)
            if precision.has_master(p_element) and state.get(MASTER) is None:
                state[MASTER] = p.astype(np.float32)
            step_value = self._advance(state, created.get(index, ()))
            storage = None
            if not precision.plain:
                storage = (precision.kind(p_element), state.get(MASTER),
                           precision.round_key(state["step"], index)
                           if precision.rounds_stochastically(p_element) else None)
            batches.add(step_value, p, g, state, [state[name] for name in rule.scalar_state],
                        state, storage)
        for step_value, values, ps, gs, buffer_lists, owners, storage in batches:
            if rule.scalar_state:
                new_values = rule.advance_scalars(scalars, kernel_hyper, step_value, values)
            self._run(ps, gs, buffer_lists, step_value, kernel_hyper, scalars, values, storage,
                      coef)
            if rule.scalar_state:
                for state in owners:
                    state.update(new_values)

    def _run(self, params, grads, buffer_lists, step_value, kernel_hyper, scalars, values,
             storage=None, coef=1.0):
        if self.backend == "cython":
            run_lists(self.rule, params, grads, buffer_lists, step_value, kernel_hyper, scalars,
                      storage)
            return
        for i, (p, g) in enumerate(zip(params, grads)):
            buffers = [None if lst is None or lst[i] is None else V.real_view(lst[i])
                       for lst in buffer_lists]
            master, key = (None, None) if storage is None else (storage[1][i], storage[2][i])
            g = V.real_view(g) if coef == 1.0 else guards.scaled_grad(V.real_view(g), coef)
            reference.half_step(self.rule.twin, V.real_view(p), g, buffers,
                                master, key, **{self.rule.step_arg: step_value}, **values,
                                **kernel_hyper)

    # -------------------------------------------------------- state_dict

    def state_dict(self):
        """A snapshot of the optimizer, in torch.optim's layout.

        Returns
        -------
        dict
            ``"state"``: flat parameter index -> {name: value} (arrays are
            copies, so later steps do not change the snapshot);
            ``"param_groups"``: hyperparameters per group, with ``"params"``
            holding the flat indices of the group's parameters.
        """
        groups = []
        index = 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
            groups.append(packed)
        state = {
            i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
            for i, s in self.state.items()
        }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore a snapshot from :meth:`state_dict` (validated before use).

        The snapshot must describe the same group layout (number of groups and
        of parameters in each). Arrays are copied into new buffers of each
        parameter's dtype. On any mismatch a ValueError/TypeError is raised
        and the optimizer is unchanged.
        """
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            raise TypeError("state_dict must be a dict with keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, the optimizer has "
                f"{len(self.param_groups)}"
            )
        new_hyper = []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(
                    f"param_groups[{gi}] has {len(saved.get('params', ()))} parameters in "
                    f"state_dict but {len(group['params'])} in the optimizer"
                )
            hyper = self._check_group_hyper(saved, f"state_dict param_groups[{gi}]: ")
            extras = {k: v for k, v in saved.items() if k not in hyper and k != "params"}
            new_hyper.append({**extras, **hyper})

        params = self._flat_params()
        # Map the snapshot's parameter ids onto our flat order, group by group.
        ids = [i for saved in saved_groups for i in saved["params"]]
        id_to_index = {pid: index for index, pid in enumerate(ids)}
        allowed = set(self._held_buffers()) | set(self.rule.scalar_state) | {"step"}
        new_state = {}
        for pid, entry in state_dict["state"].items():
            if pid not in id_to_index:
                raise ValueError(f"state_dict has state for parameter id {pid!r}, which no group lists")
            index = id_to_index[pid]
            p = params[index]
            if not isinstance(entry, dict):
                raise TypeError(f"state[{pid!r}] must be a dict")
            restored = {}
            for key, value in entry.items():
                where = f"state[{pid!r}][{key!r}]"
                if key not in allowed:
                    raise ValueError(f"{where} is not state of {type(self).__name__}")
                if key == "step":
                    restored[key] = _step_from(where, value)
                    continue
                if key in self.rule.scalar_state:  # a number (a 0-d array from a checkpoint)
                    value = np.asarray(value)
                    if value.size != 1 or value.dtype.kind != "f":
                        raise TypeError(f"{where} must be a real number, got {value!r}")
                    restored[key] = self.rule.scalar_kind(where, float(value.reshape(())))
                    continue
                value = np.asarray(value)
                if key == MASTER:
                    if _precision.element(p.dtype) not in _precision.HALF:
                        raise ValueError(f"{where}: a {p.dtype} parameter has no master copy")
                    if value.shape != p.shape or value.dtype.kind != "f":
                        raise ValueError(f"{where} must be a float array of shape {p.shape}, "
                                         f"got {value.dtype} {value.shape}")
                    restored[key] = np.array(value, dtype=np.float32, order="C", copy=True)
                    continue
                if key == guards.EMA:
                    if value.shape != p.shape or (value.dtype.kind not in "fc" and
                                                  _precision.element(value.dtype) is None):
                        raise ValueError(f"{where} must be a float array of shape {p.shape}, "
                                         f"got {value.dtype} {value.shape}")
                    restored[key] = _precision.cast(value, p.dtype)
                    continue
                shape = self.rule.buffer_shape(key, p.shape)
                if shape is None:
                    raise ValueError(f"{where} is not state of a parameter of shape {p.shape} "
                                     f"under {type(self).__name__}")
                if value.shape != shape:
                    raise ValueError(f"{where} has shape {value.shape}, parameter has {p.shape}"
                                     + (f" (it needs {shape})" if shape != p.shape else ""))
                if value.dtype.kind != "f" and _precision.element(value.dtype) is None:
                    raise TypeError(f"{where} must be a float array, got dtype {value.dtype}")
                restored[key] = _precision.cast(value, self._state_dtype(p))
            new_state[index] = restored

        # Validated: now change the optimizer.
        for group, hyper in zip(self.param_groups, new_hyper):
            hyper = {k: v for k, v in hyper.items() if k != "param_names"}
            group.update(hyper)
        self.state = State(new_state)

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]  # locks do not pickle; a copy gets its own
        del state["_fast"]  # bound to this optimizer's objects
        state.pop("_ema_cache", None)  # raw pointers into this optimizer's arrays
        state.pop("_ema_ready", None)
        state.pop("_ema_fused", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = _fastpath.StepLock()  # (and, via __setattr__, _fast = None)

    def save(self, path):
        """Write this optimizer's state and hyperparameters to ``path`` atomically.

        A NumPy ``.npz`` file (loaded with ``allow_pickle=False``) with JSON
        metadata; see ``fastopt.checkpoint``.
        """
        checkpoint.save_optimizer(self, path)

    def load(self, path):
        """Restore state and hyperparameters saved by :meth:`save`.

        Raises ValueError/TypeError, leaving the optimizer unchanged, when the
        checkpoint does not fit (other optimizer, shapes, dtypes, counts, a
        newer format, a truncated or corrupt file, pickled objects).
        """
        checkpoint.restore_optimizer(self, path)

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k not in ("params", "param_names")):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)


def _check_master(label, master, p_label, p, precision, p_element):
    """A master copy: float32, shaped like its half parameter."""
    if not precision.has_master(p_element):
        raise ValueError(f"{label} is given, but {p_label} is {p.dtype}, which has no master copy")
    if master.dtype != np.float32 or master.shape != p.shape:
        raise TypeError(f"{label} must be a float32 array of shape {p.shape} (its parameter's), "
                        f"got {master.dtype} {master.shape}")


def _step_from(where, value):
    """A saved step count: an integer >= 0 (an integral float, as torch saves, is fine)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where} must be a number, got {value!r}")
    if isinstance(value, numbers.Integral):
        return V.stored_step(where, int(value))
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where} must be a number, got {value!r}") from None
    if not as_float.is_integer():
        raise ValueError(f"{where} must be a whole number >= 0, got {value!r}")
    return V.stored_step(where, int(as_float))
