"""Learning-rate schedulers with ``torch.optim.lr_scheduler``'s names and numbers.

A scheduler works on any object with a ``param_groups`` list of dicts holding
``"lr"``: fastopt's optimizers, torch's, or a plain stand-in. It writes
``group["lr"]`` (and OneCycleLR the momentum); a fastopt optimizer notices
the edit and re-validates the group on its next step, so an invalid learning
rate is refused there rather than used.

Why the formulas look the way they do
-------------------------------------
Several torch schedulers are *chainable*: each step derives the new learning
rate from the group's current one (``lr * gamma``, a ratio of two cosines,
...) rather than from a closed form of the epoch. The two agree only up to
rounding, and they disagree outright when something else also edits the
learning rate. To give the same numbers as torch, bit for bit on the same
machine, every ``get_lr`` below does torch's arithmetic in torch's order;
the closed forms (``_closed_form_lr``) are used only where torch uses them
(SequentialLR jumping to a milestone, a resumed CosineAnnealingLR).

Each constructor ends with an initial step, as torch's does: it moves
``last_epoch`` from -1 to 0 and sets the epoch-0 learning rate.
"""
import copy
import math
import types
from bisect import bisect_right
from collections import Counter
from collections.abc import Mapping, MutableMapping

from . import _validation as V
from . import checkpoint

__all__ = ["LRScheduler", "LambdaLR", "StepLR", "MultiStepLR", "ExponentialLR",
           "LinearLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "OneCycleLR",
           "SequentialLR", "ReduceLROnPlateau"]

#: Keys of a torch scheduler's state_dict that only describe a call in
#: progress; accepted (and ignored) by ``load_state_dict`` so that a torch
#: checkpoint loads into the fastopt twin.
_TORCH_TRANSIENT = frozenset({"_is_initial", "_get_lr_called_within_step", "verbose"})


# ------------------------------------------------------------------ checks

def _check_optimizer(optimizer):
    """The optimizer's param groups: a non-empty list of dicts, each with an ``"lr"``."""
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list):
        raise TypeError(f"optimizer must have a param_groups list of dicts (a fastopt or "
                        f"torch optimizer), got {type(optimizer).__name__}")
    if not groups:
        raise ValueError("optimizer has no param groups")
    for i, group in enumerate(groups):
        if not isinstance(group, MutableMapping):
            raise TypeError(f"optimizer.param_groups[{i}] must be a dict, got "
                            f"{type(group).__name__}")
        if "lr" not in group:
            raise ValueError(f"optimizer.param_groups[{i}] has no 'lr'")
    return groups


# ------------------------------------------------------------------- bases

class LRScheduler:
    """Base class of the epoch-driven schedulers, torch's ``LRScheduler``.

    Subclasses set their options, call ``super().__init__`` (which takes
    the initial step) and implement :meth:`get_lr`; schedulers with a
    closed form also implement ``_closed_form_lr``.

    Parameters
    ----------
    optimizer : object
        Anything with a ``param_groups`` list of dicts holding ``"lr"``.
    last_epoch : int
        The index of the last epoch. -1 (default) starts the schedule and
        sets ``"initial_lr"`` in every group that has none; a value >= 0
        resumes a schedule and needs ``"initial_lr"`` in every group.

    Attributes
    ----------
    optimizer : object
        The optimizer whose learning rates are scheduled.
    base_lrs : list of float
        Each group's ``"initial_lr"``.
    last_epoch : int
        How many times :meth:`step` has run since the schedule started
        (0 right after construction).
    """

    _is_initial = False  # True only during the constructor's initial step

    def __init__(self, optimizer, last_epoch=-1):
        groups = _check_optimizer(optimizer)
        last_epoch = V.integer("last_epoch", last_epoch, -1)
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for i, group in enumerate(groups):
                if "initial_lr" not in group:
                    raise KeyError(
                        f"param_groups[{i}] has no 'initial_lr', which resuming with "
                        f"last_epoch={last_epoch} needs: load the optimizer's state first, "
                        "or start the schedule with last_epoch=-1")
        self.base_lrs = [group["initial_lr"] for group in groups]
        self.last_epoch = last_epoch
        self._initial_step()

    def _initial_step(self):
        """Take the step that sets epoch 0 (or the resumed epoch)."""
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            del self._is_initial  # back to the class's False, and out of state_dict

    def get_lr(self):
        """The learning rates for the epoch :meth:`step` has just entered.

        Chainable schedulers derive them from the groups' current rates, so
        this is only meaningful inside :meth:`step`; use :meth:`get_last_lr`
        to read the current rates.
        """
        raise NotImplementedError

    def step(self):
        """Advance the schedule by one epoch (or batch) and set the new rates.

        Call it after the optimizer's step.
        """
        self._step_count += 1
        self._update_lr()

    def _update_lr(self, epoch=None):
        # torch's SequentialLR moves a scheduler to epoch 0 through this with
        # ``epoch=0``, which uses the closed form where there is one.
        if epoch is None:
            self.last_epoch += 1
            values = self.get_lr()
        else:
            self.last_epoch = epoch
            closed_form = getattr(self, "_closed_form_lr", self.get_lr)
            values = closed_form()
        self._set_lrs(values)

    def _group_lrs(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def _scaled_lrs(self, factor):
        """Every group's current rate times ``factor`` (the chainable update)."""
        return [group["lr"] * factor for group in self.optimizer.param_groups]

    def _set_lrs(self, values):
        groups = self.optimizer.param_groups
        if len(values) != len(groups):
            raise ValueError(f"the optimizer has {len(groups)} param groups but the scheduler "
                             f"computed {len(values)} learning rates (was a group added?)")
        for group, lr in zip(groups, values):
            # A fastopt group re-validates after any write: skip writes that
            # change nothing, which most steps of StepLR/MultiStepLR are.
            if not (type(group["lr"]) is type(lr) and group["lr"] == lr):
                group["lr"] = lr
        self._last_lr = self._group_lrs()

    def get_last_lr(self):
        """The learning rates the last step set, one per param group.

        Returns
        -------
        list of float
        """
        return list(self._last_lr)

    # ------------------------------------------------------------ state

    #: Attributes whose saved form is not the attribute itself; subclasses
    #: save them with ``_save_special`` and restore them with ``_load_special``.
    _special = ()

    def state_dict(self):
        """The scheduler's state, in torch's layout: every attribute but the optimizer.

        Returns
        -------
        dict
            A deep copy: later steps do not change it.
        """
        state = {key: copy.deepcopy(value) for key, value in self.__dict__.items()
                 if key != "optimizer" and key not in self._special}
        state.update(self._save_special())
        return state

    def _save_special(self):
        return {}

    def save(self, path):
        """Write the scheduler's state to ``path`` (JSON, atomically; see fastopt.checkpoint)."""
        checkpoint.save_scheduler(self, path)

    def load(self, path):
        """Restore a state written by :meth:`save` (checked; unchanged on error)."""
        checkpoint.restore_scheduler(self, path)

    def load_state_dict(self, state_dict):
        """Restore a state from :meth:`state_dict` (torch's state_dicts load too).

        Parameters
        ----------
        state_dict : dict
            Must hold every key this scheduler's own state_dict has, and no
            other (torch's transient flags excepted). Values are copied.

        Raises
        ------
        TypeError, ValueError
            On a missing or unknown key, before anything is changed.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        own = set(self.__dict__) - {"optimizer"}
        own.update(self._special)
        missing = sorted(own - set(state_dict))
        if missing:
            raise ValueError(f"state_dict has no {missing[0]!r}; is it the state of a "
                             f"{type(self).__name__}?")
        unknown = sorted(set(state_dict) - own - _TORCH_TRANSIENT, key=str)
        if unknown:
            raise ValueError(f"state_dict has {unknown[0]!r}, which {type(self).__name__} "
                             "does not keep")
        self._load_special(state_dict)
        self.__dict__.update({key: copy.deepcopy(state_dict[key]) for key in own
                              if key not in self._special})

    def _load_special(self, state_dict):
        """Check and restore the ``_special`` entries (all checks before any change)."""


# --------------------------------------------------------- the schedulers

class LambdaLR(LRScheduler):
    """Each group's rate is its initial rate times a function of the epoch.

    ``lr = initial_lr * lr_lambda(last_epoch)``.

    Parameters
    ----------
    optimizer : object
        An optimizer (anything with ``param_groups``).
    lr_lambda : callable or list of callable
        ``f(epoch) -> factor``; one for all groups or one per group.
    last_epoch : int
        -1 to start; see :class:`LRScheduler`.

    Notes
    -----
    As in torch, :meth:`state_dict` does not save plain functions and
    lambdas (their entry is ``None``); a callable object's ``__dict__`` is
    saved and restored into the corresponding callable on loading.
    """

    _special = ("lr_lambdas",)

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        groups = _check_optimizer(optimizer)
        self.lr_lambdas = V.per_group("lr_lambda", lr_lambda, groups, V.function)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [base_lr * fn(self.last_epoch)
                for fn, base_lr in zip(self.lr_lambdas, self.base_lrs)]

    def _save_special(self):
        return {"lr_lambdas": [None if isinstance(fn, types.FunctionType) else fn.__dict__.copy()
                               for fn in self.lr_lambdas]}

    def _load_special(self, state_dict):
        saved = state_dict["lr_lambdas"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.lr_lambdas):
            raise ValueError(f"state_dict['lr_lambdas'] must be a list of "
                             f"{len(self.lr_lambdas)} entries, got {saved!r}")
        for fn, attrs in zip(self.lr_lambdas, saved):
            if attrs is not None:
                fn.__dict__.update(attrs)


class StepLR(LRScheduler):
    """Multiply the rates by ``gamma`` every ``step_size`` epochs.

    Parameters
    ----------
    optimizer : object
        An optimizer (anything with ``param_groups``).
    step_size : int
        Period of the decay, in epochs (> 0).
    gamma : float
        Factor of each decay (> 0). Default 0.1.
    last_epoch : int
        -1 to start; see :class:`LRScheduler`.
    """

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        self.step_size = V.integer("step_size", step_size, 1)
        self.gamma = V.positive("gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._group_lrs()
        return self._scaled_lrs(self.gamma)

    def _closed_form_lr(self):
        return [base_lr * self.gamma ** (self.last_epoch // self.step_size)
                for base_lr in self.base_lrs]


class MultiStepLR(LRScheduler):
    """Multiply the rates by ``gamma`` at each milestone epoch.

    Parameters
    ----------
    optimizer : object
        An optimizer (anything with ``param_groups``).
    milestones : iterable of int
        Epochs at which to decay; an epoch listed ``n`` times decays by
        ``gamma ** n``.
    gamma : float
        Factor of each decay (> 0). Default 0.1.
    last_epoch : int
        -1 to start; see :class:`LRScheduler`.
    """

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1):
        try:
            listed = list(milestones)
        except TypeError:
            raise TypeError(f"milestones must be a list of ints, got "
                            f"{type(milestones).__name__}") from None
        self.milestones = Counter(V.integer(f"milestones[{i}]", m, 0) for i, m in enumerate(listed))
        self.gamma = V.positive("gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch not in self.milestones:
            return self._group_lrs()
        return self._scaled_lrs(self.gamma ** self.milestones[self.last_epoch])

    def _closed_form_lr(self):
        passed = bisect_right(sorted(self.milestones.elements()), self.last_epoch)
        return [base_lr * self.gamma ** passed for base_lr in self.base_lrs]


class ExponentialLR(LRScheduler):
    """Multiply the rates by ``gamma`` every epoch.

    Parameters
    ----------
    optimizer : object
        An optimizer (anything with ``param_groups``).
    gamma : float
        Factor per epoch (> 0).
    last_epoch : int
        -1 to start; see :class:`LRScheduler`.
    """

    def __init__(self, optimizer, gamma, last_epoch=-1):
        self.gamma = V.positive("gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        # A resumed schedule must not decay once more in its initial step.
        if self._is_initial:
            return self._group_lrs()
        return self._scaled_lrs(self.gamma)

    def _closed_form_lr(self):
        return [base_lr * self.gamma ** self.last_epoch for base_lr in self.base_lrs]


class LinearLR(LRScheduler):
    """Scale the rates by a factor moving linearly from ``start_factor`` to
    ``end_factor`` over ``total_iters`` epochs (a warm-up when rising).

    Parameters
    ----------
    optimizer : object
        An optimizer (anything with ``param_groups``).
    start_factor : float
        Factor at epoch 0, in (0, 1]. Default 1/3.
    end_factor : float
        Factor from epoch ``total_iters`` on, in [0, 1]. Default 1.
    total_iters : int
        Epochs the change takes (> 0). Default 5.
    last_epoch : int
        -1 to start; see :class:`LRScheduler`.
    """

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5,
                 last_epoch=-1):
        self.start_factor = V.in_interval("start_factor", start_factor, 0, 1, "(]")
        self.end_factor = V.in_interval("end_factor", end_factor, 0, 1, "[]")
        self.total_iters = V.integer("total_iters", total_iters, 1)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch == 0:
            return self._scaled_lrs(self.start_factor)
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._group_lrs()
        # The ratio of this epoch's factor to the previous one's.
        slope = self.end_factor - self.start_factor
        return self._scaled_lrs(
            1.0 + slope / (self.total_iters * self.start_factor + (self.last_epoch - 1) * slope))

    def _closed_form_lr(self):
        slope = self.end_factor - self.start_factor
        progress = min(self.total_iters, self.last_epoch)
        return [base_lr * (self.start_factor + slope * progress / self.total_iters)
                for base_lr in self.base_lrs]


def _cosine_lr(eta_min, base_lr, t, period):
    """SGDR's closed form: ``base_lr`` at ``t = 0`` down to ``eta_min`` at ``t = period``."""
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * t / period)) / 2


class CosineAnnealingLR(LRScheduler):
    """Cosine annealing from each initial rate down to ``eta_min`` over ``T_max`` epochs.

    The rate follows ``eta_min + (initial_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2``,
    computed recursively from the current rate as torch does; after
    ``T_max`` it rises again (a cosine, not a restart).

    Parameters
    ----------
    optimizer : object
        An optimizer (anything with ``param_groups``).
    T_max : int
        Half period, in epochs (> 0).
    eta_min : float
        Lowest rate (>= 0). Default 0.
    last_epoch : int
        -1 to start; see :class:`LRScheduler`.
    """

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        self.T_max = V.integer("T_max", T_max, 1)
        self.eta_min = V.nonnegative_finite("eta_min", eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        epoch, period, eta_min = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return self._group_lrs()
        if self._step_count == 1 and epoch > 0:
            return self._closed_form_lr()
        if (epoch - 1 - period) % (2 * period) == 0:
            # Leaving the trough, where the recursive ratio below is 0/0.
            return [group["lr"] + (base_lr - eta_min) * (1 - math.cos(math.pi / period)) / 2
                    for base_lr, group in zip(self.base_lrs, self.optimizer.param_groups)]
        ratio = ((1 + math.cos(math.pi * epoch / period))
                 / (1 + math.cos(math.pi * (epoch - 1) / period)))
        return [ratio * (group["lr"] - eta_min) + eta_min
                for group in self.optimizer.param_groups]

    def _closed_form_lr(self):
        return [_cosine_lr(self.eta_min, base_lr, self.last_epoch, self.T_max)
                for base_lr in self.base_lrs]


class CosineAnnealingWarmRestarts(LRScheduler):
    """Cosine annealing with warm restarts (SGDR).

    Within a cycle of ``T_i`` epochs the rate falls from the initial rate
    towards ``eta_min``; then it restarts and the next cycle is ``T_mult``
    times longer.

    Parameters
    ----------
    optimizer : object
        An optimizer (anything with ``param_groups``).
    T_0 : int
        Length of the first cycle (> 0).
    T_mult : int
        Growth of the cycle length at each restart (>= 1). Default 1.
    eta_min : float
        Lowest rate (>= 0). Default 0.
    last_epoch : int
        -1 to start; see :class:`LRScheduler`.
    """

    def __init__(self, optimizer, T_0, T_mult=1, eta_min=0.0, last_epoch=-1):
        self.T_0 = V.integer("T_0", T_0, 1)
        self.T_i = self.T_0
        self.T_mult = V.integer("T_mult", T_mult, 1)
        self.eta_min = V.nonnegative_finite("eta_min", eta_min)
        self.T_cur = V.integer("last_epoch", last_epoch, -1)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [_cosine_lr(self.eta_min, base_lr, self.T_cur, self.T_i)
                for base_lr in self.base_lrs]

    def step(self, epoch=None):
        """Advance by one epoch, or jump to ``epoch``.

        Parameters
        ----------
        epoch : float, optional
            The (possibly fractional) epoch to move to, e.g. ``epoch + i /
            iters_per_epoch`` to anneal within an epoch. By default, the
            next epoch.
        """
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        else:
            epoch = V.nonnegative_finite("epoch", epoch)
            if epoch >= self.T_0:
                if self.T_mult == 1:
                    self.T_cur = epoch % self.T_0
                else:
                    # The cycle ``epoch`` is in: T_0 * (T_mult**n - 1) / (T_mult - 1) <= epoch.
                    n = int(math.log(epoch / self.T_0 * (self.T_mult - 1) + 1, self.T_mult))
                    self.T_cur = epoch - self.T_0 * (self.T_mult ** n - 1) / (self.T_mult - 1)
                    self.T_i = self.T_0 * self.T_mult ** n
            else:
                self.T_i = self.T_0
                self.T_cur = epoch
        self.last_epoch = math.floor(epoch)
        self._set_lrs(self.get_lr())


def _anneal_cos(start, end, pct):
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _anneal_linear(start, end, pct):
    return (end - start) * pct + start


class OneCycleLR(LRScheduler):
    """The 1cycle policy: warm up to ``max_lr``, then anneal far below the start.

    The rate rises from ``max_lr / div_factor`` to ``max_lr`` over the first
    ``pct_start`` of the steps, then falls to ``max_lr / div_factor /
    final_div_factor``. With ``three_phase`` it first falls back to the
    starting rate symmetrically and only then to the minimum. Momentum (or
    Adam's beta1) moves inversely, between ``max_momentum`` and
    ``base_momentum``. Step it after every batch.

    Parameters
    ----------
    optimizer : object
        An optimizer (anything with ``param_groups``).
    max_lr : float or list of float
        Peak rate, for all groups or per group (> 0).
    total_steps : int, optional
        Steps in the cycle; else ``epochs * steps_per_epoch``.
    epochs, steps_per_epoch : int, optional
        Used when ``total_steps`` is not given.
    pct_start : float
        Fraction of the cycle spent rising, in [0, 1]. Default 0.3.
    anneal_strategy : {"cos", "linear"}
        Shape of each phase. Default "cos".
    cycle_momentum : bool
        Cycle ``group["momentum"]``, or ``group["betas"][0]`` when the
        optimizer has betas (Adam-like). Default True.
    base_momentum, max_momentum : float or list of float
        Momentum at the peak rate and at the ends. Defaults 0.85 and 0.95.
    div_factor : float
        ``initial_lr = max_lr / div_factor`` (> 0). Default 25.
    final_div_factor : float
        ``min_lr = initial_lr / final_div_factor`` (> 0). Default 1e4.
    three_phase : bool
        Use the three-phase schedule. Default False.
    last_epoch : int
        The index of the last *batch*; -1 to start. Resuming needs the
        groups' ``initial_lr``, ``max_lr``, ``min_lr`` (and momenta), as
        saved with the optimizer's state.

    Raises
    ------
    ValueError
        From :meth:`step`, when stepped more than ``total_steps`` times.
    """

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None,
                 pct_start=0.3, anneal_strategy="cos", cycle_momentum=True,
                 base_momentum=0.85, max_momentum=0.95, div_factor=25.0,
                 final_div_factor=1e4, three_phase=False, last_epoch=-1):
        groups = _check_optimizer(optimizer)
        if total_steps is not None:
            self.total_steps = V.integer("total_steps", total_steps, 1)
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = (V.integer("epochs", epochs, 1)
                                * V.integer("steps_per_epoch", steps_per_epoch, 1))
        else:
            raise ValueError("OneCycleLR needs total_steps, or both epochs and steps_per_epoch")
        pct_start = V.in_interval("pct_start", pct_start, 0, 1, "[]")
        self._schedule_phases = _one_cycle_phases(pct_start, self.total_steps,
                                                  V.flag("three_phase", three_phase))
        self._anneal_func_type = V.choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
        max_lrs = V.per_group("max_lr", max_lr, groups, V.positive)
        div_factor = V.positive("div_factor", div_factor)
        final_div_factor = V.positive("final_div_factor", final_div_factor)
        self.cycle_momentum = V.flag("cycle_momentum", cycle_momentum)
        if self.cycle_momentum:
            defaults = getattr(optimizer, "defaults", None)
            if not isinstance(defaults, Mapping):
                defaults = groups[0]  # a stand-in without defaults: its groups show the kind
            if "momentum" not in defaults and "betas" not in defaults:
                raise ValueError("cycle_momentum=True needs an optimizer with 'momentum' or "
                                 "'betas' (pass cycle_momentum=False)")
            self.use_beta1 = "betas" in defaults
            max_momenta = V.per_group("max_momentum", max_momentum, groups, V.finite)
            base_momenta = V.per_group("base_momentum", base_momentum, groups, V.finite)
        if last_epoch == -1:
            for group, peak in zip(groups, max_lrs):
                group["initial_lr"] = peak / div_factor
                group["max_lr"] = peak
                group["min_lr"] = group["initial_lr"] / final_div_factor
            if self.cycle_momentum:
                for group, top, bottom in zip(groups, max_momenta, base_momenta):
                    self._set_momentum(group, top)
                    group["max_momentum"] = top
                    group["base_momentum"] = bottom
        super().__init__(optimizer, last_epoch)

    def _set_momentum(self, group, value):
        if self.use_beta1:
            group["betas"] = (value, *group["betas"][1:])
        else:
            group["momentum"] = value

    def get_lr(self):
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"OneCycleLR stepped {step} times, but its total_steps is "
                             f"{self.total_steps}")
        anneal = _anneal_cos if self._anneal_func_type == "cos" else _anneal_linear
        lrs = []
        for group in self.optimizer.param_groups:
            start = 0.0
            for i, phase in enumerate(self._schedule_phases):
                end = phase["end_step"]
                if step <= end or i == len(self._schedule_phases) - 1:
                    break
                start = end
            pct = (step - start) / (end - start)
            lrs.append(anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct))
            if self.cycle_momentum:
                self._set_momentum(group, anneal(group[phase["start_momentum"]],
                                                 group[phase["end_momentum"]], pct))
        return lrs


def _one_cycle_phases(pct_start, total_steps, three_phase):
    """OneCycleLR's phases: the step each ends at and the group keys it moves between."""
    def phase(end_step, lr_from, lr_to, momentum_from, momentum_to):
        return {"end_step": end_step, "start_lr": lr_from, "end_lr": lr_to,
                "start_momentum": momentum_from, "end_momentum": momentum_to}

    rise = phase(float(pct_start * total_steps) - 1, "initial_lr", "max_lr",
                 "max_momentum", "base_momentum")
    if not three_phase:
        return [rise, phase(total_steps - 1, "max_lr", "min_lr",
                            "base_momentum", "max_momentum")]
    return [rise,
            phase(float(2 * pct_start * total_steps) - 2, "max_lr", "initial_lr",
                  "base_momentum", "max_momentum"),
            phase(total_steps - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum")]


class SequentialLR(LRScheduler):
    """Run schedulers one after another, switching at milestone epochs.

    Scheduler ``i`` runs from ``milestones[i - 1]`` (where it starts at its
    epoch 0) until ``milestones[i]``. A typical use is a LinearLR warm-up
    followed by CosineAnnealingLR.

    Parameters
    ----------
    optimizer : object
        The optimizer all the schedulers belong to.
    schedulers : list of LRScheduler
        The schedulers (not ReduceLROnPlateau), built on ``optimizer``.
    milestones : list of int
        ``len(schedulers) - 1`` strictly increasing epochs (>= 0).
    last_epoch : int
        Default -1.

    Notes
    -----
    Its :meth:`state_dict` holds the nested schedulers' states.
    """

    _special = ("_schedulers",)

    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1):
        groups = _check_optimizer(optimizer)
        if not isinstance(schedulers, (list, tuple)) or not schedulers:
            raise ValueError("SequentialLR needs a non-empty list of schedulers")
        for i, scheduler in enumerate(schedulers):
            if isinstance(scheduler, ReduceLROnPlateau):
                raise ValueError(f"schedulers[{i}] is a ReduceLROnPlateau, which SequentialLR "
                                 "cannot drive (its step needs a metric)")
            if not isinstance(scheduler, LRScheduler):
                raise TypeError(f"schedulers[{i}] must be a fastopt.lr_scheduler scheduler, "
                                f"got {type(scheduler).__name__}")
            if scheduler.optimizer is not optimizer:
                raise ValueError(f"schedulers[{i}] ({type(scheduler).__name__}) belongs to "
                                 "another optimizer")
        if not isinstance(milestones, (list, tuple)) or len(milestones) != len(schedulers) - 1:
            raise ValueError(f"milestones must be a list of len(schedulers) - 1 = "
                             f"{len(schedulers) - 1} epochs, got {milestones!r}")
        milestones = [V.integer(f"milestones[{i}]", m, 0) for i, m in enumerate(milestones)]
        if any(a >= b for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {milestones}")
        self._schedulers = list(schedulers)
        self._milestones = milestones
        self.last_epoch = V.integer("last_epoch", last_epoch, -1) + 1
        self.optimizer = optimizer
        # Building the schedulers has stepped each of them once; start over
        # from the initial rates, with only the scheduler of epoch 0 stepped.
        for group in groups:
            group["lr"] = group["initial_lr"]
        _undo_initial_steps(self)
        first = self._schedulers[bisect_right(self._milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    @property
    def base_lrs(self):
        """The initial rates (those of the first scheduler)."""
        return self._schedulers[0].base_lrs

    def step(self):
        """Advance by one epoch: the current scheduler steps, or, at a
        milestone, the next one starts at its epoch 0."""
        self.last_epoch += 1
        index = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[index]
        if index > 0 and self._milestones[index - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()

    def _save_special(self):
        return {"_schedulers": [s.state_dict() for s in self._schedulers]}

    def _load_special(self, state_dict):
        saved = state_dict["_schedulers"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self._schedulers):
            raise ValueError(f"state_dict['_schedulers'] must hold {len(self._schedulers)} "
                             "scheduler states")
        # Check every nested state before loading any: a failure changes nothing.
        backups = [s.state_dict() for s in self._schedulers]
        try:
            for scheduler, state in zip(self._schedulers, saved):
                scheduler.load_state_dict(state)
        except (TypeError, ValueError):
            for scheduler, state in zip(self._schedulers, backups):
                scheduler.load_state_dict(state)
            raise


def _undo_initial_steps(scheduler):
    """Take back the epoch each nested scheduler's constructor counted."""
    for inner in scheduler._schedulers:
        if isinstance(inner, SequentialLR):
            _undo_initial_steps(inner)
        else:
            inner.last_epoch -= 1


class ReduceLROnPlateau(LRScheduler):
    """Reduce the rates when a metric has stopped improving.

    After more than ``patience`` epochs without a significant improvement
    (see ``threshold``), every rate is multiplied by ``factor`` (not below
    ``min_lr``), and then ``cooldown`` epochs pass before bad epochs count
    again.

    Parameters
    ----------
    optimizer : object
        An optimizer (anything with ``param_groups``).
    mode : {"min", "max"}
        Whether the metric should fall or rise. Default "min".
    factor : float
        ``new_lr = lr * factor``, in (0, 1). Default 0.1.
    patience : int
        Bad epochs tolerated before a reduction (>= 0). Default 10.
    threshold : float
        Least change that counts as an improvement (>= 0). Default 1e-4.
    threshold_mode : {"rel", "abs"}
        ``"rel"``: better than ``best * (1 -/+ threshold)``; ``"abs"``:
        better than ``best -/+ threshold``. Default "rel".
    cooldown : int
        Epochs after a reduction in which bad epochs are not counted (>= 0).
        Default 0.
    min_lr : float or list of float
        Lower bound on the rate, for all groups or per group (>= 0). Default 0.
    eps : float
        A reduction smaller than this is skipped (>= 0). Default 1e-8.

    Notes
    -----
    As in torch, it neither sets ``initial_lr`` nor has ``base_lrs``, and
    ``step`` takes the metric: ``scheduler.step(val_loss)``.
    """

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0, eps=1e-8):
        groups = _check_optimizer(optimizer)
        self.factor = V.in_interval("factor", factor, 0, 1, "()")
        self.optimizer = optimizer
        if isinstance(min_lr, (list, tuple)):
            self.default_min_lr = None
            self.min_lrs = V.per_group("min_lr", min_lr, groups, V.nonnegative_finite)
        else:
            self.default_min_lr = V.nonnegative_finite("min_lr", min_lr)
            self.min_lrs = [self.default_min_lr] * len(groups)
        self.patience = V.integer("patience", patience, 0)
        self.cooldown = V.integer("cooldown", cooldown, 0)
        self.eps = V.nonnegative_finite("eps", eps)
        self.last_epoch = 0
        self._last_lr = self._group_lrs()
        self._set_comparison(mode, V.nonnegative_finite("threshold", threshold), threshold_mode)
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def _set_comparison(self, mode, threshold, threshold_mode):
        self.mode = V.choice("mode", mode, ("min", "max"))
        self.threshold_mode = V.choice("threshold_mode", threshold_mode, ("rel", "abs"))
        self.threshold = threshold
        self.mode_worse = math.inf if mode == "min" else -math.inf

    def _is_better(self, current, best):
        if self.mode == "min":
            if self.threshold_mode == "rel":
                return current < best * (1.0 - self.threshold)
            return current < best - self.threshold
        if self.threshold_mode == "rel":
            return current > best * (self.threshold + 1.0)
        return current > best + self.threshold

    @property
    def in_cooldown(self):
        """Whether bad epochs are being ignored after a reduction."""
        return self.cooldown_counter > 0

    def step(self, metrics):
        """Record this epoch's metric and reduce the rates if it has plateaued.

        Parameters
        ----------
        metrics : float
            The monitored quantity (anything ``float()`` accepts).
        """
        try:
            current = float(metrics)
        except (TypeError, ValueError):
            raise TypeError(f"metrics must be a number, got {metrics!r}") from None
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs in the cooldown do not count
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = self._group_lrs()

    def _reduce_lr(self):
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"the optimizer has {len(groups)} param groups but min_lr lists "
                    f"{len(self.min_lrs)} (was a group added?); set min_lrs to match")
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, min_lr)
            if old_lr - new_lr > self.eps:
                group["lr"] = new_lr

    def _load_special(self, state_dict):
        # The comparison options are checked before anything is loaded; the
        # rest of the state is plain numbers.
        V.choice("state_dict['mode']", state_dict["mode"], ("min", "max"))
        V.choice("state_dict['threshold_mode']", state_dict["threshold_mode"], ("rel", "abs"))
        V.nonnegative_finite("state_dict['threshold']", state_dict["threshold"])
