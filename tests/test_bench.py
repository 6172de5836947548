"""fastopt.bench and the command line (python -m fastopt)."""
import json
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import bench
from fastopt.__main__ import main


@pytest.mark.parametrize("rule", sorted(bench.RULES))
def test_run_case_checks_and_times_every_implementation(rule):
    result = bench.run_case(rule, "float64", "257", budget_s=0.01, with_torch=False)
    assert set(result["median_s"]) == {"fastopt", "numpy"}
    assert result["max_rel_dev"]["fastopt"] == 0.0  # the reference agrees bit for bit
    assert result["steps"] >= 3


def test_many_array_case_includes_flat_buffer():
    result = bench.run_case("adam", "float32", bench.MANY_SMALL, budget_s=0.01, with_torch=False)
    assert result["arrays"] == 200 and "fastopt flat" in result["median_s"]
    sizes = bench.model_sizes(bench.MANY_SMALL)
    assert min(sizes) >= 16 and max(sizes) <= 4096 and result["n"] == sum(sizes)


def test_check_catches_a_wrong_implementation():
    p0 = [np.zeros(4)]
    arrays = {"numpy": [np.ones(4)], "fastopt": [np.ones(4) + 1e-12]}
    with pytest.raises(AssertionError, match="fastopt disagrees"):
        bench.check(arrays, {"numpy": None, "fastopt": None}, p0)


def test_bandwidth_probe_is_positive_and_checked():
    assert bench.measure_bandwidth(1 << 16, repeats=2) > 0.1


def test_bench_cli_writes_table_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--cases", "adam:float32:1000", "sgd:float64:100", "--no-torch",
                 "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "% bound" in text and "x numpy" in text and "bandwidth" in text
    saved = json.loads(out.read_text())
    assert [r["case"] for r in saved["results"]] == ["1000", "100"]
    assert saved["bandwidth_gbs"] > 0


def test_version_and_usage(tmp_path):
    # Run outside the checkout so the installed package is the one imported.
    version = subprocess.run([sys.executable, "-m", "fastopt", "--version"], cwd=tmp_path,
                             capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"fastopt {fastopt.__version__}"
    assert main(["nonsense"]) == 2
