"""The package's layout: layers that import only downwards, and no import cycle.

Every ``import`` and ``from ... import`` statement of every module under
fastopt/ counts, those inside functions too, with relative imports resolved.
``from . import X`` is an edge to the submodule X when X is a module (else
to the package it names). Importing a submodule also runs its packages'
``__init__`` (``fastopt.train.models`` runs ``fastopt/__init__.py`` first):
that is how Python initialises packages, not an import the module wrote,
and it is no edge. Imports of other packages (numpy, torch, matplotlib,
lazily or not) are not part of the graph.
"""
import ast
import importlib
import pathlib
import subprocess
import sys
from fnmatch import fnmatch

import pytest

import fastopt

PACKAGE = pathlib.Path(fastopt.__file__).resolve().parent
ROOT = PACKAGE.parent
PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"  # the checkout's

#: Lowest first. A module imports modules of its own layer and of the layers
#: below it, never above. ``fastopt`` is the package's ``__init__``, which
#: re-exports the optimizers and the training layer; the command line imports
#: it (and everything else).
LAYERS = [
    ("base", ()),  # every module not named below: _validation, checkpoint, flat, ...
    ("optimizers", ("fastopt.optim", "fastopt.kernels", "fastopt.torch", "fastopt.lr_scheduler")),
    ("training", ("fastopt.train",)),
    ("package", ("fastopt",)),
    ("command line", ("fastopt._cli", "fastopt.__main__")),
]

#: Public paths of modules that live in a subpackage: the same module objects.
ALIASES = {
    **{f"fastopt.{name}": f"fastopt.train.{name}"
       for name in ("accumulate", "batching", "clip", "losses", "models", "training")},
    **{f"fastopt.{name}": f"fastopt._cli.{name}" for name in ("bench", "bench_torch", "demo")},
}


def _module_files():
    """Module name -> (path, is a package) for every .py file under fastopt/."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


FILES = _module_files()
#: Compiled modules (fastopt._fastpath, fastopt._kernels_<isa>): leaves of the graph.
COMPILED = {f"fastopt.{p.name.split('.')[0]}" for p in PACKAGE.iterdir()
            if p.suffix in (".so", ".pyd")}
MODULES = set(FILES) | COMPILED


def _imports(name):
    """``(line, imported module)`` for every intra-package import statement of ``name``."""
    path, is_package = FILES[name]
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = (name if is_package else name.rpartition(".")[0]).split(".")
                if node.level > len(base):  # an ImportError when it runs; named as written
                    found.append((node.lineno, f"fastopt:{'.' * node.level}{node.module or ''}"))
                    continue
                base = ".".join(base[:len(base) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else module))
    return [(line, target) for line, target in found
            if target == "fastopt" or target.startswith(("fastopt.", "fastopt:"))]


GRAPH = {name: _imports(name) for name in FILES}


def _layer(name):
    """The index in LAYERS of the layer ``name`` belongs to.

    An entry names a module, or a subpackage and everything in it; the entry
    "fastopt" is the package's ``__init__`` alone.
    """
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if name == entry or (entry != "fastopt" and name.startswith(entry + ".")):
                return index
    return 0


def find_cycle(graph):
    """One cycle of ``graph`` (name -> [(line, target)]) as a list of names, or None."""
    state = {}  # name -> "open" while on the current path, "done" after
    path = []

    def visit(name):
        state[name] = "open"
        path.append(name)
        for _, target in graph.get(name, ()):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            if cycle:
                return cycle
    return None


def _where(name, target):
    lines = [line for line, t in GRAPH[name] if t == target]
    return f"{FILES[name][0].relative_to(ROOT)}:{lines[0]}" if lines else name


def test_the_package_has_its_subpackages_and_modules():
    assert {"fastopt", "fastopt.optim", "fastopt.train", "fastopt._cli"} <= set(FILES)
    assert "fastopt._fastpath" in COMPILED
    assert {"fastopt.optim.optimizer", "fastopt.train.models", "fastopt._cli.bench"} <= set(FILES)


def test_every_intra_package_import_names_a_real_module():
    # Inside the package, modules import each other by their real paths
    # (fastopt.train.models, not its public alias fastopt.models).
    bad = [f"{_where(name, target)} imports {target}" for name, edges in GRAPH.items()
           for _, target in edges if target not in MODULES]
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} ({_where(a, b)})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_find_cycle_finds_one():
    graph = {"a": [(1, "b")], "b": [(1, "c")], "c": [(1, "a")], "d": [(1, "a")]}
    assert find_cycle(graph) in (["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
    assert find_cycle({"a": [(1, "b")], "b": [], "c": [(1, "a"), (2, "b")]}) is None


def test_layers_import_only_downwards():
    bad = [f"{_where(name, target)}: {name} ({LAYERS[_layer(name)][0]}) imports {target} "
           f"({LAYERS[_layer(target)][0]})"
           for name, edges in GRAPH.items() for _, target in edges
           if _layer(target) > _layer(name)]
    assert not bad, "\n".join(bad)


def test_neither_optim_nor_train_imports_the_command_line():
    bad = [f"{_where(name, target)}: {name} imports {target}"
           for name, edges in GRAPH.items() for _, target in edges
           if name.startswith(("fastopt.optim", "fastopt.train"))
           and target.startswith("fastopt._cli")]
    assert not bad, "\n".join(bad)


def test_checkpoint_is_a_leaf():
    # Checkpoints are read before anything else is trusted: plain data,
    # stdlib and NumPy only, and fastopt's version.
    assert {target for _, target in GRAPH["fastopt.checkpoint"]} <= {"fastopt._version"}


@pytest.mark.parametrize("alias, real", sorted(ALIASES.items()))
def test_public_paths_are_the_same_module_objects(alias, real):
    module = importlib.import_module(alias)
    assert module is importlib.import_module(real) is sys.modules[alias]
    assert getattr(fastopt, alias.rpartition(".")[2]) is module
    assert module.__name__ == module.__spec__.name == real  # its own name, not the alias's


def test_importing_fastopt_loads_no_command_line_and_no_matplotlib(tmp_path):
    code = ("import fastopt, sys; print(sorted(m for m in sys.modules if m.startswith("
            "('fastopt._cli', 'fastopt.bench', 'fastopt.demo', 'matplotlib'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not PYPROJECT.exists(), reason="no pyproject.toml above tests/")
def test_pyproject_ships_every_subpackage_and_names_the_console_script():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads(PYPROJECT.read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [name for name, (_, is_package) in FILES.items() if is_package]
    assert all(any(fnmatch(p, pattern) for pattern in patterns) for p in packages), packages
    module, _, function = config["project"]["scripts"]["fastopt"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
