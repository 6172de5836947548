"""fastopt/__init__.py: importing from an unbuilt source tree fails with a clear message."""
import os
import shutil
import subprocess
import sys

import pytest

import fastopt

PACKAGE = os.path.dirname(fastopt.__file__)


@pytest.fixture
def unbuilt_tree(tmp_path):
    """A checkout-like folder: fastopt/'s Python files without compiled modules, and src_c/."""
    shutil.copytree(PACKAGE, tmp_path / "fastopt",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    (tmp_path / "src_c").mkdir()
    return tmp_path


def _run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args", [["-c", "import fastopt"], ["-m", "fastopt", "--version"]])
def test_source_tree_import_names_the_cause(unbuilt_tree, args):
    out = _run(args, unbuilt_tree)
    assert out.returncode != 0
    assert "its source tree, where the Cython modules are not built" in out.stderr
    assert "fastopt bench" in out.stderr
    assert "circular import" not in out.stderr


def test_python_m_pytest_from_source_tree_stops_with_one_message(unbuilt_tree):
    tests = unbuilt_tree / "tests"
    tests.mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), "conftest.py"), tests / "conftest.py")
    (tests / "test_one.py").write_text("import fastopt\n\ndef test_x():\n    pass\n")
    out = _run(["-m", "pytest", "-p", "no:cacheprovider", "tests"], unbuilt_tree)
    assert out.returncode == 4, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert text.count("its source tree") == 1


def test_a_package_without_compiled_modules_outside_a_checkout_says_reinstall(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "fastopt",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    out = _run(["-c", "import fastopt"], tmp_path)
    assert out.returncode != 0 and "reinstall fastopt" in out.stderr
