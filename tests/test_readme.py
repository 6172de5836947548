"""README.md: every ```python block runs alone, and the listings match the code.

Each block is written to an empty folder and run there in a fresh interpreter,
as a reader would paste it, so the README cannot rot. A block that says it is
started with ``torchrun --standalone --nproc_per_node=2`` runs that way.
"""
import importlib.util
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import fastopt
from fastopt import kernels

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
pytestmark = pytest.mark.skipif(not README.exists(), reason="README.md is not beside tests/")
TEXT = README.read_text() if README.exists() else ""
TORCHRUN = "torchrun --standalone --nproc_per_node=2"


def _blocks(language):
    """(line number, code, the prose just before it) of each ```language block."""
    found = []
    for m in re.finditer(rf"^```{language}\n(.*?)^```", TEXT, flags=re.S | re.M):
        line = TEXT.count("\n", 0, m.start()) + 1
        found.append((line, m.group(1), TEXT[max(0, m.start() - 300):m.start()]))
    return found


PYTHON_BLOCKS = _blocks("python")


def test_the_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 5


@pytest.mark.parametrize("line, code, before", PYTHON_BLOCKS,
                         ids=[f"line{b[0]}" for b in PYTHON_BLOCKS])
def test_python_block_runs_alone(line, code, before, tmp_path):
    if "torch" in code and importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch (pip install torch==2.13.0)")
    script = tmp_path / "block.py"
    script.write_text(code)
    command = [sys.executable, str(script)]
    if TORCHRUN in before:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", str(script)]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"README.md line {line}:\n{out.stdout}\n{out.stderr}"


def _listing(prefix):
    """name -> signature text of the ```text listing lines starting with ``prefix``."""
    lines = [ln for _, code, _ in _blocks("text") for ln in code.splitlines()]
    pattern = re.compile(rf"^{re.escape(prefix)}(\w+)(\(.*\))$")
    return {m.group(1): m.group(2) for m in map(pattern.match, lines) if m}


@pytest.mark.parametrize("prefix, namespace, names", [
    ("fastopt.", fastopt, list(fastopt.optim.OPTIMIZERS)),
    ("kernels.", kernels, kernels.__all__),
])
def test_signature_listings_match_the_code(prefix, namespace, names):
    listed = _listing(prefix)
    assert sorted(listed) == sorted(names)
    for name, text in listed.items():
        assert text == str(inspect.signature(getattr(namespace, name))), name


def test_two_fresh_machine_commands_and_ci_runs_them():
    spec = importlib.util.spec_from_file_location("readme_commands",
                                                  ROOT / "tools" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first, second = module.commands(TEXT)
    assert first.startswith("pip install . && ") and "bench" in first
    assert second.startswith('pip install ".[test]" && ') and second.endswith("pytest")
    assert "readme_commands.py" in (ROOT / ".ci" / "run").read_text()
