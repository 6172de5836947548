"""Training loops: fit(), early stopping, and the learning-rate range test.

Written against the model contract of ``fastopt.models``: a model has
``loss_and_grad(X, y, accumulate=False, scale=1.0)`` (mean loss; writes
``scale *`` the gradient into its gradient buffers, or adds it), and
``parameters()`` / ``gradients()`` (the arrays an optimizer steps with),
``flat`` (its FlatParams) and ``score(X, y)``. Any object with those works.
"""
import math
import sys
import time

import numpy as np

from .. import _plotting
from .. import _validation as V
from ..lr_scheduler import ReduceLROnPlateau
from .batching import batches
from .clip import clip_grad_norm

__all__ = ["fit", "History", "EarlyStopping", "lr_range_test", "LRRangeTest"]


class History:
    """What a :func:`fit` run recorded.

    Attributes
    ----------
    step_loss : list of float
        Mini-batch loss at every optimizer step (the mean over its micro-batches).
    epoch_loss : list of float
        Mean mini-batch loss of each epoch.
    lr : list of float
        Learning rate of the first param group at every step.
    grad_norm : list of float
        Global gradient norm before clipping, per step (when ``clip`` is set).
    val_loss, val_score : list of float
        Per epoch, when ``validation_data`` is given.
    wall_time, optimizer_time : float
        Seconds for the whole run, and within ``optimizer.step`` alone.
    steps, skipped_steps : int
        Optimizer steps taken, and steps the optimizer skipped (NaN/Inf).
    stopped_early : bool
        A callback ended the run.
    """

    def __init__(self):
        self.step_loss, self.epoch_loss, self.lr, self.grad_norm = [], [], [], []
        self.val_loss, self.val_score = [], []
        self.wall_time = self.optimizer_time = 0.0
        self.steps = self.skipped_steps = 0
        self.stopped_early = False

    def as_dict(self):
        return dict(vars(self))

    def __repr__(self):
        last = f"{self.epoch_loss[-1]:.4g}" if self.epoch_loss else "-"
        return (f"History({len(self.epoch_loss)} epochs, {self.steps} steps, final loss {last}, "
                f"{self.wall_time:.3g} s, {self.optimizer_time:.3g} s in the optimizer)")


class EarlyStopping:
    """Stop when the monitored loss has not improved for ``patience`` epochs.

    Parameters
    ----------
    monitor : {"loss", "val_loss"}
        The epoch's training loss, or the validation loss.
    patience : int
        Epochs without an improvement of more than ``min_delta`` before stopping.
    min_delta : float
        The smallest decrease that counts as an improvement.
    restore_best : bool
        Put back the parameters of the best epoch when stopping (needs ``model.flat``).
    """

    def __init__(self, monitor="loss", patience=5, min_delta=0.0, restore_best=False):
        V.either("monitor", monitor, "loss", "val_loss")
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        if not min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.monitor, self.patience, self.min_delta = monitor, patience, float(min_delta)
        self.restore_best = restore_best
        self.best, self.best_epoch, self._best_params = math.inf, -1, None

    def on_epoch_end(self, epoch, history, model):
        values = history.epoch_loss if self.monitor == "loss" else history.val_loss
        if not values:
            raise ValueError("EarlyStopping(monitor='val_loss') needs validation_data")
        if values[-1] < self.best - self.min_delta:
            self.best, self.best_epoch = values[-1], epoch
            if self.restore_best:
                self._best_params = model.flat.data.copy()
            return False
        if epoch - self.best_epoch < self.patience:
            return False
        if self._best_params is not None:
            model.flat.data[...] = self._best_params
        return True


class _Progress:
    """A progress bar: tqdm when installed, a plain line otherwise, nothing off a TTY."""

    def __init__(self, total, enabled):
        self.bar = None
        self.plain = False
        if not enabled or not sys.stderr.isatty():
            return
        try:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, unit="step", leave=False)
        except ImportError:
            self.plain, self.total, self.done = True, total, 0

    def update(self, epoch, loss):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4g}", refresh=False)
        elif self.plain:
            self.done += 1
            if self.done == self.total or self.done % max(1, self.total // 100) == 0:
                print(f"\rstep {self.done}/{self.total}  epoch {epoch}  loss {loss:.4g}",
                      end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.plain:
            print(file=sys.stderr)


def fit(model, optimizer, X, y, epochs=1, batch_size=None, schedule=None, clip=None,
        callbacks=(), progress=True, *, shuffle=True, seed=None, accumulate=1,
        schedule_interval="epoch", validation_data=None):
    """Train ``model`` with ``optimizer`` on ``(X, y)``; return a :class:`History`.

    Parameters
    ----------
    model
        A ``fastopt.models`` model (or any object with the same contract).
    optimizer
        A fastopt optimizer over ``model.parameters()``.
    X, y : ndarray
        Training data.
    epochs : int
        Passes over the data.
    batch_size : int or None
        None: full-batch gradient descent; 1: stochastic; k: mini-batches.
    schedule : scheduler, optional
        A ``fastopt.lr_scheduler`` scheduler, stepped every epoch (or every
        optimizer step with ``schedule_interval="step"``, as OneCycleLR
        wants). ReduceLROnPlateau gets the epoch's loss (validation loss if
        there is validation data).
    clip : float, optional
        Clip the global gradient norm to this before each step.
    callbacks : iterable
        Objects with ``on_epoch_end(epoch, history, model)``; one returning
        True stops training (see :class:`EarlyStopping`).
    progress : bool
        Show a progress bar on a terminal (tqdm when installed).
    shuffle, seed
        Passed to :func:`fastopt.batches`.
    accumulate : int
        Average the gradients of this many consecutive batches per step.
    validation_data : (X_val, y_val), optional
        Scored after every epoch (``model.loss`` and ``model.score``).
    """
    epochs = V.integer("epochs", epochs, 0)
    accumulate = V.integer("accumulate", accumulate, 1)
    V.either("schedule_interval", schedule_interval, "epoch", "step")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip!r}")
    plateau = isinstance(schedule, ReduceLROnPlateau)
    if plateau and schedule_interval == "step":
        raise ValueError("ReduceLROnPlateau steps once per epoch")
    callbacks = list(callbacks)
    data = batches(X, y, batch_size=batch_size, shuffle=shuffle, seed=seed)
    grads = model.gradients()
    history = History()
    steps_per_epoch = -(-len(data) // accumulate)
    bar = _Progress(epochs * steps_per_epoch, progress)
    skipped_before = getattr(optimizer, "skipped_steps", 0)
    started = time.perf_counter()
    try:
        for epoch in range(epochs):
            batch_losses = []
            pending, pending_loss = 0, 0.0
            for k, (xb, yb) in enumerate(data):
                pending_loss += model.loss_and_grad(xb, yb, accumulate=pending > 0,
                                                    scale=1.0 / accumulate)
                pending += 1
                if pending < accumulate and k < len(data) - 1:
                    continue
                if pending < accumulate:  # a short last group: rescale to its mean
                    for g in grads:
                        g *= accumulate / pending
                loss = pending_loss / pending
                if clip is not None:
                    history.grad_norm.append(clip_grad_norm(grads, clip))
                t0 = time.perf_counter()
                optimizer.step(grads)
                history.optimizer_time += time.perf_counter() - t0
                history.steps += 1
                history.step_loss.append(loss)
                history.lr.append(optimizer.param_groups[0]["lr"])
                batch_losses.append(loss)
                if schedule is not None and schedule_interval == "step":
                    schedule.step()
                bar.update(epoch, loss)
                pending, pending_loss = 0, 0.0
            history.epoch_loss.append(float(np.mean(batch_losses)))
            if validation_data is not None:
                history.val_loss.append(model.loss(*validation_data))
                history.val_score.append(model.score(*validation_data))
            if schedule is not None and schedule_interval == "epoch":
                if plateau:
                    schedule.step(history.val_loss[-1] if validation_data is not None
                                  else history.epoch_loss[-1])
                else:
                    schedule.step()
            if any([cb.on_epoch_end(epoch, history, model) for cb in callbacks]):
                history.stopped_early = True
                break
    finally:
        bar.close()
        history.wall_time = time.perf_counter() - started
        history.skipped_steps = getattr(optimizer, "skipped_steps", 0) - skipped_before
    return history


class LRRangeTest(dict):
    """The result of :func:`lr_range_test`: ``lrs``, ``losses`` (smoothed),
    ``raw_losses``, ``suggestion`` and ``diverged`` (keys, also attributes)."""

    def __getattr__(self, name):
        # AttributeError, not KeyError: hasattr(), copy and pickle probe attributes.
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"LRRangeTest has no attribute {name!r}") from None

    def plot(self, path):
        """Save the loss-vs-lr curve as a PNG (needs matplotlib); return the path or None."""
        plt = _plotting.pyplot()
        if plt is None:
            return None
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self["lrs"], self["losses"], label="smoothed loss")
        ax.axvline(self["suggestion"], color="tab:red", linestyle="--",
                   label=f"suggested lr {self['suggestion']:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.set_title("Learning-rate range test")
        ax.legend()
        return _plotting.save(fig, path)


def lr_range_test(model, optimizer, X, y, start_lr=1e-7, end_lr=10.0, steps=100,
                  batch_size=32, smoothing=0.05, diverge=4.0, seed=0):
    """The exponential learning-rate range test (Smith, 2017).

    Raises the learning rate geometrically from ``start_lr`` to ``end_lr``
    over ``steps`` mini-batches, records the exponentially smoothed loss,
    stops once the loss exceeds ``diverge`` times its best (or is not
    finite), then restores the model's parameters and the optimizer's state
    and hyperparameters as they were.

    Returns
    -------
    LRRangeTest
        ``lrs``, ``losses`` (smoothed), ``raw_losses``, ``diverged`` and
        ``suggestion``: the learning rate where the smoothed loss falls
        fastest against log(lr).
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr!r}, {end_lr!r}")
    if not isinstance(steps, int) or steps < 5:
        raise ValueError(f"steps must be an int >= 5, got {steps!r}")
    if not 0 < smoothing < 1:
        raise ValueError(f"smoothing must be in (0, 1), got {smoothing!r}")
    if not diverge > 1:
        raise ValueError(f"diverge must be > 1, got {diverge!r}")
    saved_params = model.flat.data.copy()
    saved_optimizer = optimizer.state_dict()
    grads = model.gradients()
    data = batches(X, y, batch_size=batch_size, shuffle=True, seed=seed)
    lrs, raw, smooth = [], [], []
    avg, best, diverged = 0.0, math.inf, False
    schedule = start_lr * (end_lr / start_lr) ** (np.arange(steps) / (steps - 1))
    try:
        batch_iter = iter(data)
        for i, lr in enumerate(schedule):
            try:
                xb, yb = next(batch_iter)
            except StopIteration:  # next epoch
                batch_iter = iter(data)
                xb, yb = next(batch_iter)
            for group in optimizer.param_groups:
                group["lr"] = float(lr)
            loss = model.loss_and_grad(xb, yb)
            optimizer.step(grads)
            avg = smoothing * loss + (1 - smoothing) * avg
            smoothed = avg / (1 - (1 - smoothing) ** (i + 1))  # bias-corrected, as for Adam
            lrs.append(float(lr))
            raw.append(float(loss))
            smooth.append(float(smoothed))
            if not math.isfinite(smoothed) or smoothed > diverge * best:
                diverged = True
                break
            best = min(best, smoothed)
    finally:
        model.flat.data[...] = saved_params
        optimizer.load_state_dict(saved_optimizer)
    return LRRangeTest(lrs=lrs, losses=smooth, raw_losses=raw, diverged=diverged,
                       suggestion=_steepest(lrs, smooth))


def _steepest(lrs, losses):
    """The lr where the smoothed loss falls fastest against log(lr), before divergence."""
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    if len(finite) < 3:
        return lrs[0]
    lrs_f = np.log(np.array([lrs[i] for i in finite]))
    losses_f = np.array([losses[i] for i in finite])
    # Only up to the minimum: past it the slope is the divergence, not learning.
    # The first tenth is skipped too: there the smoothed loss still mostly
    # reflects which mini-batches came first, not the learning rate.
    # The slope is taken across a window of points on each side: mini-batch
    # noise makes neighbouring points useless for a derivative.
    stop = int(np.argmin(losses_f)) + 1
    skip = max(2, len(losses_f) // 10)
    half = max(2, len(losses_f) // 20)
    centres = np.arange(max(skip, half), stop - half)
    if centres.size == 0:
        return float(np.exp(lrs_f[min(skip, stop - 1)]))
    slope = ((losses_f[centres + half] - losses_f[centres - half])
             / (lrs_f[centres + half] - lrs_f[centres - half]))
    return float(np.exp(lrs_f[centres[int(np.argmin(slope))]]))
