"""Sphinx configuration for the fastopt documentation.

Build from the root of a clone (see docs/building.rst):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""
import os
import sys

# ------------------------------------------------------------------ import path
#
# autodoc imports fastopt, and fastopt is a compiled package: the docs must be
# built against an installed (or built-in-place) fastopt, never against the
# bare source folder. ``python -m sphinx`` run from the clone's root puts that
# root first on sys.path, where ./fastopt shadows the installed package; when
# its Cython modules were not built in place (a plain ``pip install .``), the
# import would fail. So the root is dropped from sys.path unless the source
# tree there is importable as it is (``pip install -e .``).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _built_in_place(root):
    package = os.path.join(root, "fastopt")
    return os.path.isdir(package) and any(
        name.startswith("_fastpath.") and name.endswith((".so", ".pyd"))
        for name in os.listdir(package))


if not _built_in_place(ROOT):
    sys.path[:] = [entry for entry in sys.path
                   if os.path.abspath(entry or os.curdir) != ROOT]

# ------------------------------------------------------------------ project

import fastopt  # noqa: E402  (after the path fix above)

project = "fastopt"
author = "the fastopt developers"
copyright = "the fastopt developers"
release = fastopt.__version__
version = ".".join(release.split(".")[:2])

# ------------------------------------------------------------------ extensions

extensions = [
    "sphinx.ext.autodoc",   # the API pages are the docstrings themselves
    "sphinx.ext.mathjax",   # the update rules are written as formulas
    "numpydoc",             # the docstrings use the NumPy layout
]

exclude_patterns = ["_build"]
root_doc = "index"
# The docs are the contract for the formulas, so a broken reference or
# directive fails the build (-W); but references to objects outside fastopt
# (numpy.ndarray, torch.optim.Adam, ...) cannot resolve without intersphinx,
# which needs the network: nitpicky mode stays off.
nitpicky = False

# ------------------------------------------------------------------ autodoc

autodoc_default_options = {
    "member-order": "bysource",
}
# Signatures show the defaults' values (repr), e.g. betas=(0.9, 0.999), as
# help() does. Not "as written": the optimizers' signatures name the
# half-precision keywords their source passes on as **precision, and
# autodoc_preserve_defaults, which reads the defaults from the source, fails
# on a signature that is not the source's.
autodoc_preserve_defaults = False
autodoc_typehints = "none"  # the docstrings describe the types

# fastopt.torch imports torch at module level. torch is optional: where it
# imports, the real classes are documented; elsewhere autodoc substitutes a
# mock, so the page still builds (the classes then show their docstrings but
# not torch's constructor signatures). Only mock when torch cannot be
# imported: a mock of a working torch would hide those signatures. An import
# is the test, not a lookup of the package, because a torch that is present
# but broken should not break the docs either.
try:
    import torch  # noqa: F401
except Exception:  # ImportError, or a torch whose native libraries fail to load
    autodoc_mock_imports = ["torch"]

# ------------------------------------------------------------------ numpydoc

# The class pages list the documented methods explicitly (api.rst); numpydoc's
# own member tables would repeat them, and for classes deriving from
# torch.optim would pull in torch's members and their docstrings.
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
# No cross-reference guessing for the types in "Parameters" (``ndarray``,
# ``list of dict``): they would be unresolvable references.
numpydoc_xref_param_type = False
# Checks of docstring style belong to linters, not to the docs build.
numpydoc_validation_checks = set()

# ------------------------------------------------------------------ html

html_theme = "alabaster"  # Sphinx's default: no extra dependency
html_title = f"fastopt {release}"
html_static_path = []
html_theme_options = {
    "description": "Fused, in-place optimizer steps for NumPy arrays",
    "fixed_sidebar": True,
}
