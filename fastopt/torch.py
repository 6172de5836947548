"""fastopt for PyTorch CPU training loops: torch.optim's optimizers, fastopt's kernels.

``fastopt.torch.SGD``, ``Adagrad``, ``RMSprop``, ``Adam``, ``AdamW``, ``NAdam``,
``Adamax``, ``RAdam``, ``Adadelta``, ``Rprop``, ``ASGD`` and ``Adafactor`` *are*
torch.optim optimizers - subclasses with the very same constructor, param
groups, ``zero_grad``, ``state_dict`` (it loads into the torch.optim
counterpart and back), hooks and lr_scheduler support. Only ``step`` differs:
it reads ``p.grad`` and updates ``p`` in place through fastopt's fused
kernels, with no copy (a CPU tensor shares its memory with a NumPy view).

Switch with one line::

    opt = fastopt.torch.AdamW(model.parameters(), lr=1e-3)   # was torch.optim.AdamW

Parameters are float32, float64, float16, bfloat16, complex64 or complex128
CPU tensors (complex ones are stepped as their real view, as torch.optim
does; Adafactor refuses them, as torch's does; half ones are computed in
float32 and stored rounded to nearest even, their state in their own dtype,
as torch's fused kernels do) in any memory layout. Dense ones whose gradient and state share their layout
(contiguous, channels_last, any permutation of dimensions) are stepped in
place as their memory, at full speed; otherwise (a view with gaps, a
gradient laid out differently) each non-contiguous tensor is stepped through
a contiguous copy that is written back: correct, at the cost of a copy each
way, and on the Python path every step. Anything else (another device, a
sparse gradient, another dtype) is refused with an error naming the
parameter; there is no silent fallback.
A tensor ``lr`` (or tensor betas), as torch.optim takes and its schedulers
update in place, is read at every step.
An optimizer with ``differentiable=True`` in any group is stepped by
torch.optim's own implementation (fastopt's kernels are not differentiable):
meta-learning code keeps working, with torch's results and torch's speed.
``capturable=True`` (CUDA graphs) is refused; ``foreach`` is accepted and
ignored (every fastopt step is a fused one), and ``fused=True`` honours
torch.amp.GradScaler's contract, as torch's fused optimizers do. Only this
module imports torch.
"""
import contextlib
import inspect
import math

import numpy as np
import torch

from . import _fastpath
from . import _precision
from . import _validation as V
from .optim import MODULES, Optimizer, guards, rows
from .optim.rule import Batches, run_lists
from .sparse import SparseRows, check_rows, plan_rows

_REAL = (torch.float32, torch.float64)
# Half parameters are computed in float32 and stored rounded to nearest even,
# with state in their own dtype: torch's fused CPU kernels' behaviour
# (fastopt/_precision.py). NumPy has no bfloat16 of its own: such a tensor
# reaches the kernels as its 16-bit pattern, its storage kind given explicitly.
_HALF = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_STEPPED = _REAL + tuple(_HALF)  # what the kernels step as it is
_ELEMENT = {torch.float32: "float32", torch.float64: "float64", torch.complex64: "float32",
            torch.complex128: "float64", **_HALF}
_TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64, **{
    name: dtype for dtype, name in _HALF.items()}}
_MASTER = "master_param"  # a half parameter's float32 copy (master_weights=True)


def _state_dtype(precision, p):
    """The dtype of ``p``'s state tensors under ``precision`` (complex: its own)."""
    element = precision.state_element(_ELEMENT[p.dtype])
    return p.dtype if element == _ELEMENT[p.dtype] else _TORCH_DTYPE[element]
# Complex parameters are stepped as torch.optim steps them: as their real view
# (torch.view_as_real), two real numbers per element, which every rule here
# treats independently.
_DTYPES = _STEPPED + (torch.complex64, torch.complex128)


def _name(gi, k, p):
    return f"param_groups[{gi}]['params'][{k}] ({tuple(p.shape)} {str(p.dtype).replace('torch.', '')})"


def _dense_cpu(t):
    return t.is_cpu and t.layout is torch.strided


def _check(gi, k, p, g, fused):
    """Why fastopt cannot update ``p`` with ``g``, or None (any memory layout will do)."""
    if fused and not (p.is_cpu and (p.is_floating_point() or p.is_complex())):
        # torch's own words for a fused optimizer (its tests match them)
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors "
                           f"of supported devices: ['cpu'] but {p.dtype} and {p.device.type}")
    if (_dense_cpu(p) and _dense_cpu(g) and g.dtype is p.dtype and p.dtype in _DTYPES
            and g.shape == p.shape):
        return None
    if p.device.type != "cpu":
        return f"is on {p.device}; fastopt updates CPU tensors"
    if p.layout != torch.strided:
        return f"has layout {p.layout}; fastopt needs dense tensors"
    if p.dtype not in _DTYPES:
        return "must be float32, float64, float16, bfloat16, complex64 or complex128"
    if g.layout != torch.strided:
        return "has a sparse gradient; fastopt needs dense gradients"
    return f"has a gradient of {g.dtype} {tuple(g.shape)} on {g.device}, unlike the parameter"


def _check_state(rule, p, name, t, precision=None):
    """Why state tensor ``name`` of ``p`` cannot be updated in place under ``rule``, or None."""
    precision = precision or _PLAIN
    if name == guards.EMA:
        return None  # (a weight average: _FastoptStep._fastopt_guard_checks)
    if name == _MASTER and precision.has_master(_ELEMENT.get(p.dtype)):
        if not (isinstance(t, torch.Tensor) and _dense_cpu(t) and t.dtype is torch.float32
                and t.shape == p.shape) or _overlaps_itself(t):
            return f"has state[{name!r}] that is no float32 CPU tensor of the parameter's shape"
        return None
    if name == "step" or name in rule.scalar_state:  # one-element tensors
        if not (isinstance(t, torch.Tensor) and _dense_cpu(t) and t.numel() == 1
                and t.dtype in _DTYPES):
            return f"has state[{name!r}] = {t!r}; fastopt needs a float32/float64 CPU tensor"
        return None
    shape = rule.buffer_shape(name, p.shape)
    if shape is None:
        return f"has state[{name!r}], which a parameter of its shape does not keep"
    if isinstance(t, torch.Tensor) and _overlaps_itself(t):
        # (an expanded view: the update of one element would land on others)
        return f"has state[{name!r}] whose elements share memory (an expanded view)"
    if not (isinstance(t, torch.Tensor) and _dense_cpu(t)
            and t.dtype is _state_dtype(precision, p) and tuple(t.shape) == shape):
        if shape == tuple(p.shape):
            return (f"has state[{name!r}] unlike the parameter (it must be a CPU tensor of its "
                    "dtype and shape)")
        return (f"has state[{name!r}] that is no CPU tensor of the parameter's dtype and "
                f"shape {shape}")
    return None


def _overlaps_itself(t):
    """Whether two elements of ``t`` may share memory (expand, as_strided with stride 0).

    Dimensions by increasing stride: each must step past everything the
    smaller ones reach. (Conservative: an interleaved as_strided layout that
    does not overlap may still be called overlapping.)
    """
    reach = 1  # elements spanned so far, counting from the first
    for stride, n in sorted((abs(st), n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride < reach:
            return True
        reach += (n - 1) * stride
    return False


def _span(t, name):
    """``(start, end, name)``: the bytes a dense CPU tensor spans, or None (empty, elsewhere)."""
    if not (isinstance(t, torch.Tensor) and _dense_cpu(t)) or t.numel() == 0:
        return None
    extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + extent * t.element_size(), name


def _view(t):
    """The NumPy view of a CPU tensor's memory (a bfloat16 one as its uint16 bits)."""
    t = t.detach()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _storage(p, precision=None, master=None, key=None):
    """A parameter's storage options for Batches/Workspace.fill; None: its dtype's, state alike.

    ``master``: the NumPy view of its float32 master copy; ``key``: its round key.
    """
    precision = precision or _PLAIN
    element = _ELEMENT.get(p.dtype)
    if precision.plain and element not in _HALF.values():
        return None
    return precision.kind(element), master, key


_PLAIN = _precision.Precision()


def _layout(t):
    """The strides of ``t``'s dimensions longer than 1 if its elements fill one
    block of memory without gaps (contiguous, channels_last, any permutation
    of dimensions), else None."""
    dims = [(stride, n) for n, stride in zip(t.shape, t.stride()) if n != 1]
    expected = 1
    for stride, n in sorted(dims):
        if stride != expected:
            return None
        expected *= n
    return tuple(stride for stride, _ in dims)


def _operands(p, g, buffers, shaped=False):
    """The arrays a kernel steps for ``p``, ``g`` and ``buffers``; and the copies to write back.

    Complex tensors become their real views. When all are dense and laid
    out alike, element i of each is at the same place in memory: they are
    stepped in place as their memory, whatever the layout (unless
    ``shaped``: the rule reads rows and columns, as Adafactor does, and
    needs every array in its logical C order). Otherwise each
    one that is not contiguous is stepped through a contiguous copy, which
    the caller copies back into it (the gradient is only read): an update
    always lands in the caller's tensors, at the price of a copy each way.
    """
    tensors = [torch.view_as_real(t) if t.is_complex() else t
               for t in (x.detach() for x in (p, g, *buffers))]
    layout = None if shaped else _layout(tensors[0])
    if layout is not None and all(_layout(t) == layout for t in tensors[1:]):
        return [_view(t.as_strided((t.numel(),), (1,))) for t in tensors], []
    arrays, back = [], []
    for i, t in enumerate(tensors):
        if t.is_contiguous():
            arrays.append(_view(t))
            continue
        copy = t.contiguous()
        arrays.append(_view(copy))
        if i != 1:
            back.append((t, copy))
    return arrays, back


def _row_operands(p, buffers, rows_shape, write_back):
    """``p`` and its state ``buffers`` (None: unused) as the arrays a sparse-row step
    runs on: contiguous, those of ``p``'s shape viewed as ``rows_shape``. A tensor
    that is not contiguous is stepped through a copy, appended to ``write_back``."""
    arrays = []
    for i, t in enumerate((p, *buffers)):
        if t is None:
            arrays.append(None)
            continue
        t = t.detach()
        if not t.is_contiguous():
            copy = t.contiguous()
            write_back.append((t, copy))
            t = copy
        a = _view(t)
        arrays.append(a.reshape(rows_shape) if a.shape == tuple(p.shape) else a)
    return arrays


def _value(where, v):
    """A hyperparameter as the kernels read it: a float for a one-element CPU tensor.

    torch.optim takes a tensor ``lr`` (and tensor betas), which schedulers
    update in place; fastopt reads its value at every step.
    """
    if not isinstance(v, torch.Tensor):
        return v
    if v.numel() != 1 or not v.is_cpu or v.is_complex() or v.layout is not torch.strided:
        raise ValueError(f"{where} must be a number or a one-element real CPU tensor, got "
                         f"a {v.layout} {v.dtype} tensor of shape {tuple(v.shape)} on {v.device}")
    return v.item()


def _tensor_values(group):
    """The values of a group's tensor hyperparameters, or None if it has none.

    An in-place write (``lr.fill_(...)``, as torch's schedulers do) changes
    them without changing the group's objects, so the fast path compares them.
    """
    values = [x.item() for k, v in group.items() if k != "params"
              for x in (v if isinstance(v, (tuple, list)) else (v,))
              if isinstance(x, torch.Tensor)]
    return values or None


class _FastoptStep:
    """The fastopt ``step`` shared by the five optimizers (a mixin before the torch class).

    A step takes one of two paths. The general one, in Python, validates
    every parameter, gradient and state tensor, creates missing state and
    runs the kernels; it then gathers the step (``_gather``): per group a
    ``_fastpath.TensorGroup`` with the pointers of params and state. While
    nothing changes but the gradients (and hyperparameters whose buffers stay
    the same: an lr schedule), later steps run in ``_fastpath.tensor_step``,
    which re-checks in C what could have changed and costs well under a
    microsecond per tensor. Anything else falls back to the general path.
    """

    _rule = None        # fastopt.optim.rule.Rule
    _step_checks = {}   # hyperparameter -> what a step checks (_kind_check)
    _fixed = {}         # options the class sets itself (AdamW: decoupled_weight_decay)

    def _kernel_hyper(self, gi, group):
        # torch.optim checks ranges in its constructor (this class's) and
        # nowhere else: a value written later, by a scheduler or by hand, is
        # the caller's business, as in torch. A step checks only the kind of
        # each value, which is all the kernels need.
        if group.get("capturable"):
            raise ValueError(f"param_groups[{gi}]: capturable=True is not supported by fastopt")
        for k in self._rule.state_hyper:  # a buffer's start (Rprop's lr) is read when made
            if k in group:
                V.real(f"param_groups[{gi}]: {k}", _value(k, group[k]))
        return V.check_hyper(self._step_checks, self._fastopt_hyper(group), f"param_groups[{gi}]: ")

    def _fastopt_hyper(self, group):
        # torch's groups may lack newer flags (a state_dict from an older
        # torch: they are off) and hold betas as a list or tensors (plain
        # floats here); then the class's own fixed options.
        hyper = {}
        for k, rule in self._rule.hyper.items():
            v = group[k] if k in group or rule is not V.flag else False
            if rule in V.PAIRS and isinstance(v, (tuple, list)):  # (Adafactor's eps1 may be None)
                v = tuple(None if b is None else float(_value(f"{k}[{i}]", b))
                          for i, b in enumerate(v))
            hyper[k] = _value(k, v)
        hyper.update(self._fixed)
        return hyper

    #: what a copy (deepcopy, pickle) carries besides torch's defaults, state and
    #: param_groups: the precision options and the step guards
    _FASTOPT_ATTRS = ("_fastopt_options", "max_grad_norm", "ema_decay", "last_grad_norm")

    def __getstate__(self):
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._FASTOPT_ATTRS if k in self.__dict__})
        return state

    @property
    def _fastopt_precision(self):
        """The half-precision options (fastopt/_precision.py) this optimizer was made with."""
        return self.__dict__.get("_fastopt_options", _PLAIN)

    def _init_state(self, p, group):
        """torch.optim's state for a parameter's first step, in torch's layout."""
        state = {}
        if self._rule.counts_steps or self._fastopt_precision.stochastic_rounding:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for name, initial in self._rule.initial_scalars(  # NAdam's mu_product, ASGD's eta
                self._kernel_hyper(None, group)).items():
            state[name] = torch.tensor(initial, dtype=torch.float32)
        return state

    def _buffer(self, state, name, p, group):
        if name not in state:  # torch fills some in __init__ (Adagrad's sum); added groups too
            shape = self._rule.buffer_shape(name, p.shape)
            dtype = _state_dtype(self._fastopt_precision, p)
            if shape != tuple(p.shape):  # Adafactor's factors: contiguous zeros, as torch's
                state[name] = torch.zeros(shape, dtype=dtype)
                return state[name]
            key = self._rule.initial.get(name)
            start = _value(key, group[key]) if key else 0.0
            if p.is_complex():  # as torch: every real number of the view starts there
                start = complex(start, start)
            state[name] = torch.full_like(p, start, dtype=dtype,
                                          memory_format=torch.preserve_format)
        return state[name]

    def step(self, closure=None):
        """One fastopt step over every parameter with a gradient (torch's contract).

        Everything is checked before anything changes: a step that raises has
        updated no parameter and no state.
        """
        if any(group.get("differentiable") for group in self.param_groups):
            # The kernels write in place outside autograd: a differentiable
            # step is torch.optim's own (the class this one subclasses).
            self._fastopt_fast = None
            return super(_FastoptStep, self).step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._amp_contract():
            return loss  # GradScaler found inf/NaN gradients: skipped, as torch's fused step does
        fast = self.__dict__.get("_fastopt_fast")
        if (fast is not None and self._fast_ready(fast) and _fastpath.tensor_step(
                fast["groups"], [group["params"] for group in self.param_groups], self.state,
                fast["guard"], torch.strided) == _fastpath.DONE):
            return loss
        self._fastopt_fast = None
        with torch.no_grad():
            self._general_step()
        if not self._fastopt_guarded:  # (the guards are the general path's)
            self._fastopt_fast = self._gather()
        return loss

    @property
    def _fastopt_guarded(self):
        return (getattr(self, "max_grad_norm", None) is not None
                or getattr(self, "ema_decay", None) is not None)

    def _amp_contract(self):
        """Read what torch.amp.GradScaler hands a fused optimizer; False: skip this step.

        torch's constructor tells GradScaler (``_step_supports_amp_scaling``)
        that an optimizer made with ``fused=True`` unscales the gradients and
        skips overflow steps itself. GradScaler then sets ``grad_scale`` (the
        factor the gradients carry, None once unscaled) and ``found_inf``
        before calling step. The factor goes into the kernels' scalars; a
        found inf skips the step, changing no parameter and no state. Unlike
        torch's fused kernel, fastopt leaves ``p.grad`` scaled (it only reads
        gradients).
        """
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            return False
        grad_scale = getattr(self, "grad_scale", None)
        scale = 1.0 if grad_scale is None else V.positive("grad_scale", _value(
            "grad_scale", grad_scale))
        self._fastopt_scale = {} if scale == 1.0 else {"grad_scale": scale}
        return True

    def _scalars(self, hyper, extra=None):
        """The group's kernel scalars, with this step's gradient scale and clipping."""
        scalars = self._rule.scalars(hyper, extra={**self.__dict__.get("_fastopt_scale", {}),
                                                   **(extra or {})})
        coef = self.__dict__.get("_fastopt_coef", 1.0)
        return scalars if coef == 1.0 else scalars.scaled(coef)

    # ---------------------------------------------------------- general path

    def _sparse_grad(self, gi, k, p, g, hyper):
        """A sparse COO gradient of ``p`` as fastopt.SparseRows, planned; its form
        ("rows" or "dense", fastopt/optim/rows.py). Raises ValueError/TypeError.

        Rows are along the leading axis, as nn.Embedding(sparse=True) makes
        them. A gradient with more sparse dimensions (``tensor.to_sparse()``
        makes one per dimension) lists single elements: its first sparse
        dimensions are read as one flattened axis, over which the rows are
        planned; the rows rules are elementwise, so this changes nothing but
        the bookkeeping. The plan's ``rows_shape`` is that view of ``p``.
        """
        name = _name(gi, k, p)
        form = rows.sparse_form(
            type(self).__name__, self._rule, hyper, self._fastopt_precision,
            f"the gradient of {name}", name, tuple(p.shape))
        if not (_dense_cpu(p) and p.dtype in _REAL):
            raise ValueError(f"{name} has a sparse gradient, which fastopt takes for "
                             "float32 or float64 CPU tensors only")
        if g.shape != p.shape or g.dtype != p.dtype or not g.is_cpu:
            raise ValueError(f"the sparse gradient of {name} must be a CPU COO tensor of the "
                             f"parameter's shape and dtype; got {tuple(g.shape)} {g.dtype} "
                             f"on {g.device}")
        depth = g.sparse_dim()
        if depth > 1 and self._rule.layouts:
            raise ValueError(f"the sparse gradient of {name} has {depth} sparse dimensions, but "
                             f"{type(self).__name__} keeps per-row state: it needs one sparse "
                             "dimension (rows), as nn.Embedding(sparse=True) makes")
        rows_shape = (math.prod(p.shape[:depth]),) + tuple(p.shape[depth:])
        # (uncoalesced is fine: fastopt merges repeated rows itself, without coalesce)
        indices = g._indices().numpy()
        indices = (indices[0] if depth == 1
                   else np.ravel_multi_index(tuple(indices), tuple(p.shape[:depth])))
        values = g._values()
        values = (values if values.is_contiguous() else values.contiguous()).numpy()
        sparse = SparseRows(indices, values)
        # The checks read only the shape and dtype of the parameter's row view.
        shaped = np.broadcast_to(np.zeros((), _view(p).dtype), rows_shape)
        check_rows(f"the gradient of {name}", sparse, name, shaped)
        plans = self.__dict__.setdefault("_fastopt_row_plans", {})
        plan = plans.get(p)
        if plan is None:
            plan = plans[p] = _fastpath.RowPlan()
        plan_rows(plan, f"the gradient of {name}", sparse, name, shaped)
        return form, sparse, (plan, rows_shape)

    def _general_step(self):
        scratch = []  # (plan, zeroed array, values): a sparse gradient merged into zeros
        try:
            self._general_step_with(scratch)
        finally:
            self._fastopt_coef = 1.0
            for plan, dense, values in scratch:  # (only its listed rows were written)
                plan.scatter(dense, values, True)
        if self.__dict__.get("ema_decay") is not None:
            self._fastopt_average()

    def _fastopt_guard_checks(self, plan):
        """Before anything changes: each weight average fits its parameter; with
        ``max_grad_norm``, the step's norm (one pass) and its clipping coefficient."""
        if self.__dict__.get("ema_decay") is not None:
            for gi, group in enumerate(self.param_groups):
                for k, p in enumerate(group["params"]):
                    avg = self.state.get(p, {}).get(guards.EMA)
                    if avg is not None and not (
                            isinstance(avg, torch.Tensor) and _dense_cpu(avg)
                            and avg.dtype == p.dtype and avg.shape == p.shape
                            and not _overlaps_itself(avg)):
                        raise ValueError(f"{_name(gi, k, p)} has state[{guards.EMA!r}] that is "
                                         "no CPU tensor of its dtype and shape")
        self._fastopt_coef = 1.0
        max_norm = self.__dict__.get("max_grad_norm")
        if max_norm is None:
            return
        arrays, kinds = [], []
        for group, hyper, needs, members in plan:
            for p, g, sparse in members:
                if sparse is not None:
                    raise ValueError(f"{type(self).__name__}(max_grad_norm=...) clips dense "
                                     "gradients only: a sparse gradient's norm is not formed")
                t = g.detach()
                t = torch.view_as_real(t) if t.is_complex() else t
                arrays.append(_view(t if t.is_contiguous() else t.contiguous()))
                kinds.append(_PLAIN.kind(_ELEMENT[p.dtype]))
        scale = self.__dict__.get("_fastopt_scale", {}).get("grad_scale", 1.0)
        norm, _ = guards.grad_norm(arrays, scale, kinds)
        self.last_grad_norm = norm
        self._fastopt_coef = guards.coefficient(norm, max_norm)

    def _fastopt_average(self):
        """The weight average's pass over every parameter: a copy on its first step."""
        precision = self._fastopt_precision
        avgs, params, keys, elements = [], [], [], []
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p] if p in self.state else None
                avg = None if state is None else state.get(guards.EMA)
                if avg is None:
                    self.state.setdefault(p, {})[guards.EMA] = p.detach().clone(
                        memory_format=torch.preserve_format)
                elif p.is_contiguous() and avg.is_contiguous():
                    avgs.append(_view(avg))
                    params.append(_view(p))
                    element = _ELEMENT[p.dtype]
                    elements.append(element)
                    keys.append(precision.round_key(int(state.get("step", 0)), index)
                                if precision.stochastic_rounding and element in _precision.HALF
                                else None)
                else:  # (a strided pair: torch's own lerp, as get_ema_multi_avg_fn's)
                    avg.lerp_(p.detach(), 1.0 - self.ema_decay)
                index += 1
        guards.average(avgs, params, self.ema_decay, "cython", keys, elements)

    def ema_params(self):
        """The weight averages (``ema_decay``) aligned with the parameters in group
        order: tensors (the optimizer's own), None before a parameter's first step."""
        if self.__dict__.get("ema_decay") is None:
            raise ValueError(f"{type(self).__name__} keeps no weight average: make it with "
                             "ema_decay=...")
        return [self.state[p].get(guards.EMA) if p in self.state else None
                for group in self.param_groups for p in group["params"]]

    @contextlib.contextmanager
    def averaged(self):
        """A context in which every parameter holds its weight average (evaluation);
        the parameters' own values come back on exit, an exception included."""
        pairs = [(p, avg) for p, avg in zip((p for group in self.param_groups
                                             for p in group["params"]), self.ema_params())
                 if avg is not None]
        with torch.no_grad():
            saved = [p.detach().clone() for p, _ in pairs]
            try:
                for p, avg in pairs:
                    p.copy_(avg)
                yield self
            finally:
                for (p, _), own in zip(pairs, saved):
                    p.copy_(own)

    def _general_step_with(self, scratch):
        rule = self._rule
        precision = self._fastopt_precision
        plan = []
        for gi, group in enumerate(self.param_groups):
            hyper = self._kernel_hyper(gi, group)
            needs = rule.needs(hyper)
            members = []
            for k, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                sparse = None
                if g.layout is torch.sparse_coo and p.layout is torch.strided:
                    form, sparse, (row_plan, rows_shape) = self._sparse_grad(gi, k, p, g, hyper)
                    if form == "dense":  # the dense step of the gradient, zeros elsewhere
                        dense = self.__dict__.setdefault("_fastopt_row_dense", {}).get(p)
                        if dense is None or dense.shape != tuple(p.shape):
                            dense = np.zeros(tuple(p.shape), _view(p).dtype)
                            self._fastopt_row_dense[p] = dense
                        flat = dense.reshape(rows_shape)  # (a view: dense is contiguous)
                        row_plan.scatter(flat, sparse.values)
                        scratch.append((row_plan, flat, sparse.values))
                        g, sparse = torch.from_numpy(dense), None
                    else:
                        sparse = (sparse, row_plan, rows_shape)
                state = self.state.get(p, {})
                if p.is_complex() and not rule.complex_ok:  # torch's error and words
                    raise RuntimeError(f"{type(self).__name__} does not support complex "
                                       "parameters")
                problem = (None if sparse else _check(gi, k, p, g, group.get("fused"))) or next(
                    (why for name, t in state.items()
                     if (why := _check_state(rule, p, name, t, precision))), None)
                if problem:
                    raise ValueError(f"{_name(gi, k, p)} {problem}")
                precision.check_param(_name(gi, k, p), _ELEMENT[p.dtype], p.is_complex())
                if rule.scalar_state:
                    count = int(state["step"]) + 1 if "step" in state else 1
                    rule.check_scalar_state(hyper, count, {n: float(t) for n, t in state.items()
                                                           if n in rule.scalar_state},
                                            f"state of {_name(gi, k, p)}")
                members.append((p, g, sparse))
            plan.append((group, hyper, needs, members))
        self._check_aliasing()
        self._fastopt_guard_checks(plan)
        # Checked: allocate state, then run one kernel call per group and step count.
        write_back = []  # (tensor, the contiguous copy stepped for it)
        index_of = {p: i for i, p in enumerate(p for group in self.param_groups
                                                for p in group["params"])}
        for group, hyper, needs, members in plan:
            batches = Batches(rule, needs)
            for p, g, sparse in members:
                state = self.state.get(p) or self._init_state(p, group)
                master = precision.has_master(_ELEMENT[p.dtype])
                if master and _MASTER not in state:  # laid out as p is
                    state[_MASTER] = torch.empty_like(p, dtype=torch.float32,
                                                      memory_format=torch.preserve_format)
                    state[_MASTER].copy_(p.detach())
                names = [n for n, need in zip(rule.buffers, needs)
                         if rule.uses(n, p.shape, need)]
                created = [n for n in names if n not in state]
                for n in created:
                    self._buffer(state, n, p, group)
                if state:  # torch keeps no entry for a parameter without state (plain SGD)
                    self.state[p] = state
                count = None
                if rule.counts_steps or precision.stochastic_rounding:
                    step_view = _view(state["step"])
                    step_view += 1  # torch's step tensor, through its view
                    count = int(step_view)
                if sparse is not None:  # the listed rows only, of contiguous row views
                    ws = self.__dict__.setdefault("_fastopt_row_ws", _fastpath.Workspace())
                    g_rows, row_plan, rows_shape = sparse
                    p_rows, *buffers = _row_operands(
                        p, [state[n] if n in names else None for n in rule.buffers],
                        rows_shape, write_back)
                    rows.run_rows(rule, p_rows, g_rows, row_plan, buffers,
                                  rule.step_value(count if rule.counts_steps else None, created),
                                  hyper, self._scalars(hyper, rows.SPARSE_SCALARS), "cython", ws)
                    continue
                (p_arr, g_arr, *arrays), back = _operands(
                    p, g, [state[n] for n in names] + ([state[_MASTER]] if master else []),
                    shaped=bool(rule.layouts))
                write_back += back
                key = (precision.round_key(count, index_of[p])
                       if precision.rounds_stochastically(_ELEMENT[p.dtype]) else None)
                batches.add(rule.step_value(count if rule.counts_steps else None, created),
                            p_arr, g_arr, dict(zip(names, arrays)),
                            [float(state[n]) for n in rule.scalar_state], state,
                            _storage(p, precision, arrays[-1] if master else None, key))
            for step_value, values, ps, gs, buffer_lists, owners, storage in batches:
                if not rule.scalar_state:
                    run_lists(rule, ps, gs, buffer_lists, step_value, hyper, self._scalars(hyper),
                              storage)
                    continue
                scalars = self._scalars(hyper)
                new_values = rule.advance_scalars(scalars, hyper, step_value, values)
                run_lists(rule, ps, gs, buffer_lists, step_value, hyper, scalars, storage)
                for state in owners:
                    for name, value in new_values.items():
                        state[name].fill_(value)
        for tensor, stepped in write_back:
            tensor.copy_(stepped)

    def _check_aliasing(self):
        """Params and state tensors are disjoint, and no gradient overlaps one.

        Across all groups: otherwise the result would depend on the order of
        the writes (see fastopt.Optimizer).
        """
        held, reads = [], []
        for gi, group in enumerate(self.param_groups):
            for k, p in enumerate(group["params"]):
                held.append(_span(p, _name(gi, k, p)))
                if p.grad is not None:
                    g = p.grad._values() if p.grad.is_sparse else p.grad
                    reads.append(_span(g, f"the gradient of {_name(gi, k, p)}"))
                for name, t in self.state.get(p, {}).items():
                    held.append(_span(t, f"state[{name!r}] of {_name(gi, k, p)}"))
        V.check_spans_apart([s for s in held if s], [s for s in reads if s])

    # ------------------------------------------------------------- fast path

    def _fast_ready(self, fast):
        """Whether the gathered step still fits; new hyperparameter values are taken."""
        if self.state is not fast["state"] or len(self.param_groups) != len(fast["groups"]):
            return False
        scale = self.__dict__.get("_fastopt_scale", {})
        rescaled = scale != fast["scale"]  # GradScaler's factor moved: every group's scalars
        fast["scale"] = scale
        for gi, group in enumerate(self.param_groups):
            # One C-level comparison with a copy taken when gathered, holding the
            # same params list (tensor_step checks its members; a new list, or
            # a group without one, is gathered again).
            snapshot = fast["snapshots"][gi]
            if not isinstance(group, dict) or group.get("params") is not snapshot["params"]:
                return False
            values = fast["tensor_values"][gi]
            if (rescaled or group != snapshot
                    or (values is not None and _tensor_values(group) != values)):
                hyper = self._kernel_hyper(gi, group)
                if self._rule.needs(hyper) != fast["needs"][gi]:
                    return False
                fast["groups"][gi].set_scalars(self._scalars(hyper))
                fast["snapshots"][gi] = dict(group)
                fast["tensor_values"][gi] = _tensor_values(group)
        return True

    def _gather(self):
        """The fast path's view of the step just taken, or None if it cannot serve it."""
        rule = self._rule
        if not self._fastopt_precision.plain:
            return None  # (the general path makes masters and round keys each step)
        groups, snapshots, needs_list = [], [], []
        for gi, group in enumerate(self.param_groups):
            hyper = self._kernel_hyper(gi, group)
            needs = rule.needs(hyper)
            params = list(group["params"])
            slot_of, dtypes, states, expected, counters, held = [], [], [], [], [], []
            kinds = []  # per slot: its storage kind (-1: its dtype's)
            shapes = []  # (checked each step for a rule that reads rows and columns)
            scalar_views = []  # per slot: views of its scalar state (NAdam's mu_product)
            ps, gs, buffer_lists = [], [], [[] if n else None for n in needs]
            for p in params:
                if not (_dense_cpu(p) and p.dtype in _STEPPED and p.is_contiguous()):
                    return None  # only the general path knows such a group
                state = self.state.get(p, {})
                held += [_view(p)] + [_view(t) for t in state.values()
                                      if isinstance(t, torch.Tensor) and t.numel()]
                if p.grad is None:
                    slot_of.append(-1)
                    continue
                if p.grad.layout is not torch.strided:
                    return None  # (a sparse gradient: the general path's)
                slot_of.append(len(ps))
                ps.append(_view(p))
                gs.append(_view(p.grad))
                for lst, name in zip(buffer_lists, rule.buffers):
                    if lst is not None:  # (None: a buffer of another shape, as Adafactor's)
                        lst.append(_view(state[name]) if name in state else None)
                # what the slot's pointers came from: tensor_step checks they are still there
                watched = [n for n, need in zip(rule.buffers, needs) if need and n in state]
                if not all(state[n].is_contiguous() for n in watched):
                    return None  # (stepped through copies: only the general path does that)
                watched += ["step"] if "step" in state else []
                if rule.scalar_state:
                    if any(n not in state or state[n].dtype not in _REAL
                           for n in rule.scalar_state):
                        return None
                    watched += list(rule.scalar_state)
                    scalar_views.append(tuple(_view(state[n]) for n in rule.scalar_state))
                expected.append(tuple((n, state[n], state[n].data_ptr(), state[n].numel())
                                      for n in watched))
                counters.append(_view(state["step"]) if "step" in state else None)
                shapes.append(p.shape)
                kinds.append(-1 if _storage(p) is None else _storage(p)[0])
                dtypes.append(p.dtype)
                states.append(state)
            ws = _fastpath.Workspace()
            ws.fill(ps, gs, tuple(buffer_lists), kinds)
            ws.protect_arrays(held)
            groups.append(_fastpath.TensorGroup(
                ws, params, slot_of, dtypes, states, expected, counters,
                self._scalars(hyper), rule.counts_steps, scalar_views,
                shapes if rule.layouts else None))
            snapshots.append(dict(group))
            needs_list.append(needs)
        return {"groups": groups, "snapshots": snapshots, "needs": needs_list,
                "tensor_values": [_tensor_values(s) for s in snapshots],
                "scale": self.__dict__.get("_fastopt_scale", {}),
                "state": self.state, "guard": _fastpath.Guard()}

    def load_state_dict(self, state_dict):
        precision = self._fastopt_precision
        saved = {}
        if not precision.plain:
            # torch casts every floating state tensor to its parameter's dtype:
            # keep the master copies and the state in the dtypes they have here.
            saved = {pid: {k: v for k, v in entry.items()
                           if isinstance(v, torch.Tensor) and k != "step"}
                     for pid, entry in state_dict.get("state", {}).items()}
        super().load_state_dict(state_dict)
        for state in self.state.values():
            # A plain-number step (torch's SparseAdam keeps an int) becomes the float32
            # tensor fastopt counts in place, as torch's Adam.__setstate__ makes it.
            step = state.get("step") if isinstance(state, dict) else None  # (hooks add others)
            if isinstance(step, (int, float)) and not isinstance(step, bool):
                state["step"] = torch.tensor(float(step), dtype=torch.float32)
        if saved:
            ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
            params = [p for group in self.param_groups for p in group["params"]]
            for pid, p in zip(ids, params):
                for k, v in saved.get(pid, {}).items():
                    dtype = (torch.float32 if k == _MASTER else p.dtype if k == guards.EMA
                             else _state_dtype(precision, p))
                    self.state[p][k] = v.to(dtype=dtype, copy=True)
        self._fastopt_fast = None  # the state tensors were replaced

    def _fastopt_init(self, options):
        """Take the half-precision options; the state torch made in __init__ gets their dtype."""
        self._fastopt_options = options
        for p, state in self.state.items():  # (Adagrad's sum)
            for k, v in list(state.items()):
                if k != "step" and isinstance(v, torch.Tensor) and v.shape == p.shape:
                    state[k] = v.to(dtype=_state_dtype(options, p))


def _kind_check(check):
    """The step-time form of a rule's hyperparameter check: the kind, not the range."""
    if check in V.PAIRS:
        return V.PAIR_KINDS.get(check, V.pair_of_reals)
    return check if check is V.flag else V.real


def _torch_twin(cls, twins):
    """fastopt.torch's ``cls``: torch.optim's class of that name, stepped by fastopt.

    A subclass of another registry class (AdamW of Adam) subclasses that
    one's twin too, as torch.optim.AdamW does torch.optim.Adam.
    """
    base = twins.get(cls.__bases__[0].__name__, _FastoptStep)
    torch_cls = getattr(torch.optim, cls.__name__)
    return type(cls.__name__, (base, torch_cls), {
        "__doc__": f"torch.optim.{cls.__name__}, stepped by fastopt's fused kernel.\n\n"
                   "    Besides torch's options, the keyword-only ones of "
                   f"fastopt.{cls.__name__}:\n    state_dtype, master_weights, "
                   "stochastic_rounding, seed (half precision), max_grad_norm and\n"
                   "    ema_decay (step guards).\n",
        "__module__": __name__,
        "__init__": _with_precision(torch_cls.__init__),
        "_rule": cls.rule,
        "_fixed": cls.fixed,
        "_step_checks": {k: _kind_check(c) for k, c in cls.rule.hyper.items()},
    })


#: fastopt's keyword-only options of every fastopt.torch class, with their defaults:
#: the half-precision ones and the step guards (fastopt/optim/guards.py)
_OPTIONS = {**_precision.Precision()._asdict(), "max_grad_norm": None, "ema_decay": None}


def _with_precision(init):
    """``init`` (a torch optimizer's constructor) with fastopt's keyword-only options."""
    def __init__(self, params, *args, state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, max_grad_norm=None, ema_decay=None,
                 **kwargs):
        options = _precision.check(state_dtype, master_weights, stochastic_rounding, seed)
        step_guards = guards.check(max_grad_norm, ema_decay)
        init(self, params, *args, **kwargs)
        self._fastopt_init(options)
        self.max_grad_norm, self.ema_decay = step_guards
        self.last_grad_norm = None

    sig = inspect.signature(init)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
             for name, default in _OPTIONS.items()]
    params = list(sig.parameters.values())
    tail = [p for p in params if p.kind is p.VAR_KEYWORD]
    __init__.__signature__ = sig.replace(parameters=[
        p for p in params if p.kind is not p.VAR_KEYWORD] + extra + tail)
    __init__.__doc__ = init.__doc__
    return __init__


#: fastopt's own options, which a torch optimizer does not take
_NUMPY_ONLY = ("backend", "skip_nonfinite", "flush_denormals")


def _torch_style(cls):
    """fastopt.torch's ``cls`` where torch.optim has no such class (Lion, Lamb).

    A torch.optim.Optimizer subclass in torch.optim's style: the NumPy
    class's constructor options (fastopt's own aside), checked in the
    constructor with the rule's validators, and torch's param groups,
    ``state_dict``, hooks and scheduler support. There is no torch
    implementation to defer to, so ``differentiable`` is not an option.
    """
    numpy_sig = inspect.signature(cls.__init__)
    sig = numpy_sig.replace(parameters=[  # (the half-precision keywords: added below)
        p for name, p in numpy_sig.parameters.items()
        if name not in ("self",) + _NUMPY_ONLY + tuple(_OPTIONS)])
    rule = cls.rule

    def __init__(self, params, *args, **kwargs):
        bound = sig.bind(params, *args, **kwargs)
        bound.apply_defaults()
        defaults = {k: v for k, v in bound.arguments.items() if k != "params"}
        checked = V.check_hyper(rule.hyper, {k: _value(k, v) for k, v in defaults.items()})
        if rule.check is not None:
            rule.check(checked)
        torch.optim.Optimizer.__init__(self, params, defaults)

    __init__ = _with_precision(__init__)

    __init__.__signature__ = sig.replace(parameters=[
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *sig.parameters.values(),
        *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
          for name, default in _OPTIONS.items())])
    return type(cls.__name__, (_FastoptStep, torch.optim.Optimizer), {
        "__doc__": (f"{cls.__name__} for torch tensors: fastopt.{cls.__name__}'s rule in a "
                    "torch.optim.Optimizer.\n\n    torch.optim has no such class; this one "
                    "keeps torch.optim's conventions.\n"),
        "__module__": __name__,
        "__init__": __init__,
        "_rule": rule,
        "_fixed": cls.fixed,
        "_step_checks": {k: _kind_check(c) for k, c in rule.hyper.items()},
    })


# One class per optimizer class of the registry: torch.optim's own class
# stepped by fastopt where torch has one, a torch-style one where not.
_twins = {}
for _module in MODULES:
    for _cls in (getattr(_module, n) for n in _module.__all__):
        if isinstance(_cls, type) and issubclass(_cls, Optimizer):
            _twins[_cls.__name__] = (_torch_twin(_cls, _twins) if hasattr(torch.optim, _cls.__name__)
                                     else _torch_style(_cls))
globals().update(_twins)
__all__ = list(_twins)
