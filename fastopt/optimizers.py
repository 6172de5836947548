"""The optimizers: torch.optim's names, signatures and defaults.

Each class only describes itself - its rule, defaults and how its state
starts; ``fastopt.optimizer.Optimizer`` does the rest.
"""

from . import _validation as V
from . import checkpoint
from . import kernels as K
from .optimizer import Optimizer

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "load_optimizer"]

_PARAMS_DOC = """params : list of ndarray, dict or list of dict
        The arrays to optimize (updated in place), a dict name -> array, or
        param-group dicts ``{"params": ..., "lr": ..., ...}``.
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
        results then differ from torch.optim's in the subnormal range."""


class SGD(Optimizer):
    rule = K.SGD_RULE

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, maximize=False, *, backend="cython",
                 skip_nonfinite=False, flush_denormals=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize), backend=backend,
                         skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals)

    def _advance(self, state, created):
        # torch.optim.SGD keeps no step count; what matters is whether the
        # momentum buffer is new (it then starts as a copy of the gradient).
        return "momentum_buffer" in created


class Adagrad(Optimizer):
    rule = K.ADAGRAD_RULE
    extra_hyper = {"initial_accumulator_value": V.nonnegative}

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, maximize=False, *,
                 backend="cython", skip_nonfinite=False, flush_denormals=False):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps, maximize=maximize), backend=backend,
                         skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals)

    def _initial_value(self, name, hyper):
        return hyper["initial_accumulator_value"]


class RMSprop(Optimizer):
    rule = K.RMSPROP_RULE

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False, maximize=False, *, backend="cython",
                 skip_nonfinite=False, flush_denormals=False):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered,
                                      maximize=maximize), backend=backend,
                         skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals)


class Adam(Optimizer):
    rule = K.ADAM_RULE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, decoupled_weight_decay=False, *,
                 backend="cython", skip_nonfinite=False, flush_denormals=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay),
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals)


class AdamW(Adam):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, *, backend="cython",
                 skip_nonfinite=False, flush_denormals=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True,
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals)


SGD.__doc__ = f"""Stochastic gradient descent, optionally with (Nesterov) momentum.

    Same rule and defaults as ``torch.optim.SGD``.

    Parameters
    ----------
    {_PARAMS_DOC}
    lr : float, default 1e-3
    momentum : float, default 0
    dampening : float, default 0
    weight_decay : float, default 0
        L2 penalty added to the gradient.
    nesterov : bool, default False
        Needs ``momentum > 0`` and ``dampening == 0``.
    maximize : bool, default False
    """

Adagrad.__doc__ = f"""Adagrad: per-element step sizes from accumulated squared gradients.

    Same rule and defaults as ``torch.optim.Adagrad``.

    Parameters
    ----------
    {_PARAMS_DOC}
    lr : float, default 1e-2
    lr_decay : float, default 0
    weight_decay : float, default 0
    initial_accumulator_value : float, default 0
    eps : float, default 1e-10
    maximize : bool, default False
    """

RMSprop.__doc__ = f"""RMSprop: steps scaled by a running RMS of the gradients.

    Same rule and defaults as ``torch.optim.RMSprop`` (eps outside the sqrt).

    Parameters
    ----------
    {_PARAMS_DOC}
    lr : float, default 1e-2
    alpha : float, default 0.99
    eps : float, default 1e-8
    weight_decay : float, default 0
    momentum : float, default 0
    centered : bool, default False
    maximize : bool, default False
    """

_ADAM_DOC = """lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default {weight_decay}
    amsgrad : bool, default False
    maximize : bool, default False"""

Adam.__doc__ = f"""Adam, with optional AMSGrad and decoupled (AdamW) weight decay.

    Same rule and defaults as ``torch.optim.Adam``.

    Parameters
    ----------
    {_PARAMS_DOC}
    {_ADAM_DOC.format(weight_decay=0)}
    decoupled_weight_decay : bool, default False
        True decays the parameter directly, as AdamW does.

    Examples
    --------
    >>> import numpy as np, fastopt
    >>> w = np.zeros(3)
    >>> opt = fastopt.Adam([w], lr=0.1)
    >>> opt.step([np.array([1.0, -1.0, 0.0])])
    >>> w
    array([-0.1,  0.1,  0. ])
    """

AdamW.__doc__ = f"""AdamW: Adam with decoupled weight decay (default 1e-2).

    Same rule and defaults as ``torch.optim.AdamW``.

    Parameters
    ----------
    {_PARAMS_DOC}
    {_ADAM_DOC.format(weight_decay="1e-2")}
    """


def load_optimizer(path, params, *, backend="cython"):
    """A new optimizer of the saved type, over ``params``, restored from ``path``.

    ``params`` are the model's arrays in the saved order (a list, or a dict
    for an optimizer saved with named parameters); the param-group layout and
    hyperparameters come from the checkpoint.
    """
    kind, layout = checkpoint.read_layout(path)
    classes = {name: globals()[name] for name in __all__ if name != "load_optimizer"}
    if kind not in classes:
        raise ValueError(f"{path}: unknown optimizer type {kind!r}")
    items = list(params.items()) if isinstance(params, dict) else list(enumerate(params))
    groups = []
    for members, hyper in layout:
        if any(not isinstance(i, int) or not 0 <= i < len(items) for i in members):
            raise ValueError(f"{path}: the checkpoint's groups do not fit {len(items)} parameters")
        chosen = [items[i] for i in members]
        groups.append({**hyper, "params": dict(chosen) if isinstance(params, dict)
                       else [p for _, p in chosen]})
    # Every group carries its saved hyperparameters: constructor defaults do not matter.
    optimizer = classes[kind](groups, backend=backend)
    checkpoint.restore_optimizer(optimizer, path)
    return optimizer
