"""fastopt.bench and the command line (python -m fastopt)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from fastopt import bench
from fastopt.__main__ import main


@pytest.mark.parametrize("name", sorted(bench.OPTIMIZERS))
def test_measure_checks_and_times_every_implementation(name):
    result = bench.measure(name, n=257, dtype=np.float64, steps=3, with_torch=False)
    assert result["fastopt"] > 0 and result["numpy reference"] > 0
    assert result["max_rel_dev"] == 0.0  # the reference agrees bit for bit


def test_bench_cli_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--sizes", "100,1000", "--quick", "--no-torch", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "speedup vs numpy reference" in text and "1,000" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["n"] for r in rows] == [100, 1000]


def test_version_and_usage(tmp_path):
    # Run outside the checkout so the installed package is the one imported.
    version = subprocess.run([sys.executable, "-m", "fastopt", "--version"], cwd=tmp_path,
                             capture_output=True, text=True, check=True).stdout
    import fastopt
    assert version.strip() == f"fastopt {fastopt.__version__}"
    assert main(["nonsense"]) == 2
