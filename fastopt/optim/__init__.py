"""The update rules and the optimizer machinery: one module per rule, one registry.

Each rule module (``sgd``, ``adagrad``, ``rmsprop``, ``adam``, ...) holds the
whole story of its rule: its :class:`~fastopt.optim.rule.Rule` (the data the
machinery reads), its low-level function and its optimizer classes. Its
fused loop and per-step scalars live in ``src_c/rules/<rule>.pxi``.

Everything that needs "all rules" iterates the registry below: the public
``fastopt.kernels`` functions, ``fastopt.load_optimizer``, the torch adapter
and the tests. Adding a rule is a new module here plus its row in
``MODULES`` (docs/adding_a_rule.rst).
"""
from .. import checkpoint
from . import (adadelta, adafactor, adagrad, adam, adamax, asgd, lamb, lion, nadam, radam, rmsprop,
               rowwise_adagrad, rprop, sgd, sparse_adam)
from .optimizer import Optimizer
from .rule import Rule

__all__ = ["RULES", "FUNCTIONS", "OPTIMIZERS", "Optimizer", "Rule", "load_optimizer"]

#: The rule modules, in the order the public API lists them.
MODULES = (sgd, adagrad, rmsprop, adam, nadam, adamax, radam, adadelta, rprop, asgd, lion, lamb,
           adafactor, sparse_adam, rowwise_adagrad)

#: rule name -> Rule
RULES = {m.RULE.name: m.RULE for m in MODULES}
#: rule name -> its low-level function (``fastopt.kernels.<name>``)
FUNCTIONS = {m.RULE.name: getattr(m, m.RULE.name) for m in MODULES}
#: class name -> optimizer class (``fastopt.<Name>``), every class of every rule
OPTIMIZERS = {name: getattr(m, name) for m in MODULES for name in m.__all__
              if isinstance(getattr(m, name), type) and issubclass(getattr(m, name), Optimizer)}


def load_optimizer(path, params, *, backend="cython"):
    """A new optimizer of the saved type, over ``params``, restored from ``path``.

    ``params`` are the model's arrays in the saved order (a list, or a dict
    for an optimizer saved with named parameters); the param-group layout and
    hyperparameters come from the checkpoint, and so do the half-precision
    options (``state_dtype``, ``master_weights``, ``stochastic_rounding``,
    ``seed``).
    """
    kind, layout, options = checkpoint.read_layout(path)
    if kind not in OPTIMIZERS:
        raise ValueError(f"{path}: unknown optimizer type {kind!r}")
    items = list(params.items()) if isinstance(params, dict) else list(enumerate(params))
    groups = []
    for members, hyper in layout:
        if any(not isinstance(i, int) or not 0 <= i < len(items) for i in members):
            raise ValueError(f"{path}: the checkpoint's groups do not fit {len(items)} parameters")
        chosen = [items[i] for i in members]
        groups.append({**hyper, "params": dict(chosen) if isinstance(params, dict)
                       else [p for _, p in chosen]})
    # Every group carries its saved hyperparameters: constructor defaults do not matter;
    # the other saved options (half precision) are passed as they were.
    optimizer = OPTIMIZERS[kind](groups, backend=backend, **options)
    checkpoint.restore_optimizer(optimizer, path)
    return optimizer
