"""fastopt for PyTorch CPU training loops: torch.optim's optimizers, fastopt's kernels.

``fastopt.torch.SGD``, ``Adagrad``, ``RMSprop``, ``Adam`` and ``AdamW`` *are*
torch.optim optimizers - subclasses with the very same constructor, param
groups, ``zero_grad``, ``state_dict`` (it loads into the torch.optim
counterpart and back), hooks and lr_scheduler support. Only ``step`` differs:
it reads ``p.grad`` and updates ``p`` in place through fastopt's fused
kernels, with no copy (a CPU tensor shares its memory with a NumPy view).

Switch with one line::

    opt = fastopt.torch.AdamW(model.parameters(), lr=1e-3)   # was torch.optim.AdamW

What fastopt cannot update in place is refused with a clear error naming the
parameter - there is no silent fallback: parameters must be dense, contiguous
float32/float64 CPU tensors, and their gradients dense and contiguous too.
torch's ``differentiable=True`` and ``capturable=True`` are refused; the
``foreach`` and ``fused`` flags are accepted and ignored (every fastopt step is
a fused one). Only this module imports torch.
"""
import torch

from . import _validation as V
from . import kernels as K

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]

_DTYPES = (torch.float32, torch.float64)


def _name(gi, k, p):
    return f"param_groups[{gi}]['params'][{k}] ({tuple(p.shape)} {str(p.dtype).replace('torch.', '')})"


def _check(gi, k, p, g):
    """Why fastopt cannot update ``p`` in place with ``g``, or None."""
    if (p.is_cpu and g.is_cpu and p.layout is torch.strided and g.layout is torch.strided
            and g.dtype is p.dtype and p.dtype in _DTYPES and g.shape == p.shape
            and p.is_contiguous() and g.is_contiguous() and p.data_ptr() != g.data_ptr()):
        return None if not p.numel() else _overlap(p, g)
    if p.device.type != "cpu":
        return f"is on {p.device}; fastopt updates CPU tensors"
    if p.layout != torch.strided:
        return f"has layout {p.layout}; fastopt needs dense tensors"
    if p.dtype not in _DTYPES:
        return "must be float32 or float64"
    if not p.is_contiguous():
        return "is not contiguous; fastopt updates in place, never through a copy"
    if g.is_sparse or g.layout != torch.strided:
        return "has a sparse gradient; fastopt needs dense gradients"
    if g.device.type != "cpu" or g.dtype != p.dtype or g.shape != p.shape:
        return f"has a gradient of {g.dtype} {tuple(g.shape)} on {g.device}, unlike the parameter"
    if not g.is_contiguous():
        return "has a non-contiguous gradient"
    return _overlap(p, g)


def _overlap(p, g):
    p0, g0 = p.data_ptr(), g.data_ptr()
    nbytes = p.numel() * p.element_size()
    if p.numel() and p0 < g0 + nbytes and g0 < p0 + nbytes:
        return "shares memory with its gradient"
    return None


class _FastoptStep:
    """The fastopt ``step`` shared by the five optimizers (a mixin before the torch class)."""

    _rule = None        # fastopt.kernels.Rule
    _hyper_keys = ()    # torch group keys -> fastopt kernel hyperparameters

    def _kernel_hyper(self, gi, group):
        for flag in ("differentiable", "capturable"):
            if group.get(flag):
                raise ValueError(f"param_groups[{gi}]: {flag}=True is not supported by fastopt")
        hyper = self._fastopt_hyper(group)
        hyper = V.check_hyper(self._rule.hyper, hyper, f"param_groups[{gi}]: ")
        if self._rule.check is not None:
            self._rule.check(hyper)
        return hyper

    def _fastopt_hyper(self, group):
        return {k: group[k] for k in self._rule.hyper}

    def _init_state(self, p, group):
        """torch.optim's state for a parameter's first step, in torch's layout."""
        state = {}
        if self._rule.step_arg == "step":
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        return state

    def _buffer(self, state, name, p, group):
        if name not in state:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state[name]

    def _views(self, p, state, needs):
        """NumPy views (no copies) of p, its needed state buffers and its step count.

        Cached per parameter while the state holds the same tensors, because
        making a view costs about a microsecond.
        """
        tensors = (p, state.get("step")) + tuple(state.get(n) if need else None
                                                  for n, need in zip(self._rule.buffers, needs))
        hit = self._fastopt_cache.get(id(p))
        if hit is not None and all(a is b for a, b in zip(hit[0], tensors)):
            return hit[1]
        views = tuple(None if t is None else t.detach().numpy() for t in tensors)
        self._fastopt_cache[id(p)] = (tensors, views)
        return views

    @torch.no_grad()
    def step(self, closure=None):
        """One fastopt step over every parameter with a gradient (torch's contract).

        Everything is checked before anything changes: a step that raises has
        updated no parameter and no state.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not hasattr(self, "_fastopt_cache"):
            self._fastopt_cache = {}
        rule = self._rule
        counts_steps = rule.step_arg == "step"
        plan = []
        for gi, group in enumerate(self.param_groups):
            hyper = self._kernel_hyper(gi, group)
            needs = rule.needs(hyper)
            members = []
            for k, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                problem = _check(gi, k, p, g)
                if problem:
                    raise ValueError(f"{_name(gi, k, p)} {problem}")
                members.append((p, g))
            plan.append((group, hyper, needs, members))
        # Checked: allocate state, then run one kernel call per group and step count.
        for group, hyper, needs, members in plan:
            batches = {}
            for p, g in members:
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, group))
                created = [n for n, need in zip(rule.buffers, needs) if need and n not in state]
                for n in created:
                    self._buffer(state, n, p, group)
                views = self._views(p, state, needs)
                if counts_steps:
                    step_view = views[1]
                    step_view += 1  # torch's float32 step tensor, through its view
                    key = int(step_view)
                else:
                    key = "momentum_buffer" in created
                batch = batches.get(key)
                if batch is None:
                    batch = batches[key] = ([], [], [[] if n else None for n in needs])
                batch[0].append(views[0])
                batch[1].append(g.detach().numpy())
                for lst, view in zip(batch[2], views[2:]):
                    if lst is not None:
                        lst.append(view)
            for key, (ps, gs, buffer_lists) in batches.items():
                K.run_lists(rule, ps, gs, tuple(buffer_lists), key, hyper)
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._fastopt_cache = {}  # the state tensors were replaced


class SGD(_FastoptStep, torch.optim.SGD):
    """torch.optim.SGD, stepped by fastopt's fused kernel."""

    _rule = K.SGD_RULE


class Adagrad(_FastoptStep, torch.optim.Adagrad):
    """torch.optim.Adagrad, stepped by fastopt's fused kernel."""

    _rule = K.ADAGRAD_RULE

    def _buffer(self, state, name, p, group):
        if name not in state:  # torch fills "sum" in __init__; this covers added groups
            state[name] = torch.full_like(p, group["initial_accumulator_value"],
                                          memory_format=torch.preserve_format)
        return state[name]


class RMSprop(_FastoptStep, torch.optim.RMSprop):
    """torch.optim.RMSprop, stepped by fastopt's fused kernel."""

    _rule = K.RMSPROP_RULE


class Adam(_FastoptStep, torch.optim.Adam):
    """torch.optim.Adam, stepped by fastopt's fused kernel."""

    _rule = K.ADAM_RULE

    def _fastopt_hyper(self, group):
        hyper = {k: group[k] for k in self._rule.hyper if k != "decoupled_weight_decay"}
        hyper["decoupled_weight_decay"] = bool(group.get("decoupled_weight_decay", False))
        hyper["betas"] = tuple(float(b) for b in group["betas"])
        return hyper


class AdamW(Adam, torch.optim.AdamW):
    """torch.optim.AdamW, stepped by fastopt's fused kernel."""

    def _fastopt_hyper(self, group):
        hyper = super()._fastopt_hyper(group)
        hyper["decoupled_weight_decay"] = True
        return hyper
