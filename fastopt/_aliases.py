"""Public module paths for modules that live in a subpackage.

``fastopt.models`` is ``fastopt.train.models`` and ``fastopt.bench`` is
``fastopt._cli.bench``: the same module object under both names, so that
``import fastopt.models``, ``from fastopt.losses import mse`` and a
monkeypatch of ``fastopt.bench.run_case`` all reach the one module. An
alias is resolved on import, like any submodule: the command line's modules
(and matplotlib behind them) load only when something imports them.
"""
import importlib
import importlib.abc
import importlib.util
import sys


class _Alias(importlib.abc.Loader):
    """Loads an alias as the module it names, imported under its own name."""

    def __init__(self, target):
        self.target = target
        self._spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        # The import system stamped the alias's spec on the module; give it
        # back its own (importlib.reload and pickle go by the real name).
        module.__spec__ = self._spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def __init__(self, aliases):
        self.aliases = aliases

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.aliases:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(self.aliases[fullname]))


def install(aliases):
    """Make every ``alias -> module`` of ``aliases`` importable (once per process).

    An alias whose module is imported already is registered at once, as an
    imported submodule is: it is in ``sys.modules`` from then on.
    """
    for alias, target in aliases.items():
        if target in sys.modules:
            sys.modules.setdefault(alias, sys.modules[target])
    if not any(isinstance(f, _AliasFinder) and f.aliases == aliases for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder(aliases))
