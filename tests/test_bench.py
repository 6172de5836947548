"""fastopt.bench and the command line (python -m fastopt)."""
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import _plotting, bench, bench_torch
from fastopt.__main__ import main

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
HAVE_ML_DTYPES = importlib.util.find_spec("ml_dtypes") is not None
needs_ml_dtypes = pytest.mark.skipif(not HAVE_ML_DTYPES, reason="needs ml_dtypes (bfloat16)")
try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

_real_run_case = bench.run_case


@pytest.fixture
def quiet_machine(monkeypatch):
    """The bench sees no other load (the test suite may share the machine with anything)."""
    monkeypatch.setattr(bench, "other_load",
                        lambda start, end: {"other_cpus": 0.0, "stolen_cpus": 0.0, "wall_s": 1.0})


@pytest.fixture
def fast_cases(monkeypatch, quiet_machine):
    """bench.run with tiny timing budgets, so that a CLI test takes well under a second."""
    def quick(rule, dtype, label, budget_s=0.4, with_torch=True):
        return _real_run_case(rule, dtype, label, budget_s=0.01, with_torch=with_torch)
    monkeypatch.setattr(bench, "run_case", quick)


def table_of(text):
    """The header cells and the rows (cell lists) of the printed table."""
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if line.strip().startswith("rule |"))
    header = [c.strip() for c in lines[top].split("|")]
    rows = []
    for line in lines[top + 2:]:
        if " | " not in line:
            break
        rows.append([c.strip() for c in line.split("|")])
    return header, rows


def saved_paths(text):
    return [line[len("saved "):] for line in text.splitlines() if line.startswith("saved ")]


# ------------------------------------------------------------------ cases

@pytest.mark.parametrize("rule", sorted(bench.RULES))
def test_run_case_checks_and_times_every_implementation(rule):
    result = bench.run_case(rule, "float64", "257", budget_s=0.01, with_torch=False)
    assert set(result["median_s"]) == {"fastopt", "numpy"}
    assert result["max_rel_dev"]["fastopt"] == 0.0  # the reference agrees bit for bit
    assert result["steps"] >= 3
    assert all(len(ts) >= 3 for ts in result["block_s"].values())
    assert result["working_set_bytes"] == bench.RULES[rule][3] * 8 * 257


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


# ------------------------------------------------------- bandwidth and cache

def test_bandwidth_probe_keeps_its_best_pass_and_checks_itself():
    probe = bench.BandwidthProbe(1 << 16)
    first = probe.measure(passes=2)
    second = probe.measure(passes=2)
    assert len(probe.samples) == 4 and probe.best == max(first, second) > 0.1
    probe.c[7] = 0.0  # as if a pass had skipped an element
    with pytest.raises(AssertionError, match="wrong result"):
        probe.measure(passes=1)


def _fake_cache(root, cpu, level, size, shared, kind="Unified"):
    index = root / f"cpu{cpu}" / "cache" / f"index{level}"
    index.mkdir(parents=True)
    for name, value in (("type", kind), ("level", level), ("size", size),
                        ("shared_cpu_list", shared)):
        (index / name).write_text(f"{value}\n")


def test_last_level_cache_from_sysfs_one_and_two_instances(tmp_path):
    one = tmp_path / "one"
    for cpu in (0, 1):
        _fake_cache(one, cpu, 1, "48K", str(cpu), kind="Data")
        _fake_cache(one, cpu, 3, "32768K", "0-1")
    size, source = bench.last_level_cache(str(one), cpus=[0, 1])
    assert size == 32 << 20 and source.startswith("L3")
    two = tmp_path / "two"  # two sockets: each CPU has its own L3
    for cpu in (0, 1):
        _fake_cache(two, cpu, 2, "2M", str(cpu))
        _fake_cache(two, cpu, 3, "16M", str(cpu))
    size, source = bench.last_level_cache(str(two), cpus=[0, 1])
    assert size == 32 << 20 and "2 instances" in source


def test_last_level_cache_falls_back_when_sysfs_has_nothing(tmp_path):
    size, source = bench.last_level_cache(str(tmp_path), cpus=[0])
    assert size > 0
    if "sysconf" not in source:
        assert size == bench.FALLBACK_LLC and "assumed" in source


def test_percent_of_bound_only_past_the_cache():
    r = bench.run_case("adam", "float32", "1000", budget_s=0.01, with_torch=False)
    resident = bench.summarize(r, 50.0, dram_bytes=r["working_set_bytes"] + 1)
    assert resident["percent_of_bound"] is None and not resident["past_cache"]
    past = bench.summarize(r, 50.0, dram_bytes=r["working_set_bytes"])
    expected = 100 * r["bytes_per_step"] / 50e9 / r["median_s"]["fastopt"]
    assert past["past_cache"] and past["percent_of_bound"] == pytest.approx(expected)
    assert bench.summarize(r, None, dram_bytes=1)["percent_of_bound"] is None


def test_plan_adds_one_case_past_the_cache_only_when_needed():
    default = bench.plan(False, False)
    # A 480 MiB cache: no default case reaches 960 MiB, so Adam f32 6.4e7 joins.
    added = bench.plan(False, False, dram_bytes=960 << 20, available_bytes=64 << 30)
    assert added == default + [("adam", "float32", "6.4e7")]
    # A 32 MiB cache: the 1e7 cases are already past it.
    assert bench.plan(False, False, dram_bytes=64 << 20) == default
    # Not enough memory for the extra case: none is added.
    assert bench.plan(False, False, dram_bytes=960 << 20, available_bytes=2 << 30) == default
    assert bench.plan(True, False, dram_bytes=960 << 20) == bench.plan(True, False)


# ------------------------------------------------------------- instability

def _with_blocks(result, **blocks):
    """A copy of ``result`` with the given block times, every other implementation's steady
    (the real ones, from a tiny budget on a shared machine, may spread by chance)."""
    r = copy.deepcopy(result)
    for name, median in r["median_s"].items():
        r["block_s"][name] = [median] * 5
    for name, times in blocks.items():
        r["block_s"][name] = list(times)
        r["median_s"][name] = float(np.median(times))
    return r


def test_block_spread_flags_scattered_blocks_only():
    base = bench.run_case("sgd", "float32", "1000", budget_s=0.01, with_torch=False)
    steady = _with_blocks(base, fastopt=[1e-6, 1.02e-6, 0.99e-6, 1.01e-6, 1e-6])
    scattered = _with_blocks(base, fastopt=[1e-6] * 5 + [5e-6] * 5,
                             numpy=[2e-5, 2e-5, 2e-5, 9e-5, 9e-5])
    flags = bench.find_unstable([steady, scattered])
    assert "fastopt" not in flags[0]["impls"]
    assert {"fastopt", "numpy"} <= set(flags[1]["impls"])
    assert any("fastopt blocks spread" in reason for reason in flags[1]["reasons"])


def test_a_case_ten_times_off_its_neighbours_is_flagged():
    base = bench.run_case("adam", "float32", "1000", budget_s=0.01, with_torch=False)
    cases = []
    for n, ns_per_elem in ((1000, 1.0), (100_000, 30.0), (10_000_000, 0.6)):
        r = _with_blocks(base, fastopt=[ns_per_elem * n * 1e-9] * 5)
        r["n"], r["case"] = n, f"{n:.0e}"
        cases.append(r)
    flags = bench.find_unstable(cases)
    assert flags[1]["impls"] == ["fastopt"] and "above its neighbours" in flags[1]["reasons"][0]
    assert not flags[0]["reasons"] and not flags[2]["reasons"]
    cases[1] = _with_blocks(cases[1], fastopt=[0.3 * 100_000 * 1e-9] * 5)  # a sane reading
    assert not any(f["reasons"] for f in bench.find_unstable(cases))
    # Two sizes only, 20x apart: which one is wrong cannot be told, so both are re-measured.
    cases[1] = _with_blocks(cases[1], fastopt=[20 * 0.6 * 100_000 * 1e-9] * 5)
    flags = bench.find_unstable(cases[1:])
    assert [f["impls"] for f in flags] == [["fastopt"], ["fastopt"]]


def test_ratios_never_print_as_zero():
    assert bench._fmt_ratio(0.0031) == "0.0031x"
    assert bench._fmt_ratio(0.04) == "0.04x"
    assert bench._fmt_ratio(1.5) == "1.50x" and bench._fmt_ratio(26.8) == "26.8x"
    assert bench._fmt_ratio(None) == "-"
    assert bench._fmt_rate(0.0488) == "0.049" and bench._fmt_rate(56.04) == "56.0"


def _unstable_then(monkeypatch, stable_second):
    """run_case whose first reading of every case is scattered; the second as asked."""
    calls = {}

    def fake(rule, dtype, label, budget_s=0.4, with_torch=True):
        r = _real_run_case(rule, dtype, label, budget_s=0.01, with_torch=with_torch)
        calls[label] = calls.get(label, 0) + 1
        if calls[label] == 1 or not stable_second:
            t = r["median_s"]["fastopt"]
            r = _with_blocks(r, fastopt=[t] * 4 + [20 * t] * 4)
        else:
            r = _with_blocks(r, fastopt=[r["median_s"]["fastopt"]] * 5)
        return r
    monkeypatch.setattr(bench, "run_case", fake)
    return calls


@pytest.mark.parametrize("stable_second", [True, False])
def test_unstable_case_is_marked_and_measured_again(monkeypatch, capsys, tmp_path, stable_second,
                                                    quiet_machine):
    calls = _unstable_then(monkeypatch, stable_second)
    assert main(["bench", "--cases", "adam:float32:1000", "--no-torch",
                 "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]) == 0
    text = capsys.readouterr().out
    assert calls == {"1000": 2}  # re-measured once, and only once
    _, rows = table_of(text)
    fastopt_cell = rows[0][3]
    notes = " ".join(text.split())
    assert "Re-measured once: adam f32 1000 (fastopt blocks spread" in notes
    if stable_second:
        assert not fastopt_cell.endswith("~") and "Still unstable: none." in notes
    else:
        assert fastopt_cell.endswith("~") and "Still unstable: adam f32 1000 (fastopt" in notes
    saved = json.loads((tmp_path / "b.json").read_text())["results"][0]
    assert saved["remeasured"]["reasons"] and bool(saved["unstable"]["reasons"]) != stable_second


@pytest.mark.parametrize("second_factor", [1.1, 3.0])
def test_a_slow_size_that_repeats_on_remeasuring_is_reproduced_not_unstable(
        monkeypatch, capsys, tmp_path, quiet_machine, second_factor):
    """35x its neighbours' ns/elem twice, blocks steady: a real cost (e.g. per-step Python work).
    A second reading 3x off the first is not a repeat: still unstable."""
    calls = {}

    def fake(rule, dtype, label, budget_s=0.4, with_torch=True):
        r = _real_run_case(rule, dtype, label, budget_s=0.01, with_torch=with_torch)
        calls[label] = calls.get(label, 0) + 1
        per_elem = 0.5e-9 * (35 if label == "1000" else 1)
        if label == "1000" and calls[label] == 2:
            per_elem *= second_factor
        return _with_blocks(r, fastopt=[per_elem * float(label)] * 5)
    monkeypatch.setattr(bench, "run_case", fake)
    assert main(["bench", "--cases", "adam:float32:100", "adam:float32:1000",
                 "adam:float32:10000", "--no-torch", "--json", str(tmp_path / "b.json"),
                 "--plot", str(tmp_path / "b.png")]) == 0
    text = capsys.readouterr().out
    assert calls == {"100": 1, "1000": 2, "10000": 1}
    notes = " ".join(text.split())
    cell = table_of(text)[1][1][3]
    saved = json.loads((tmp_path / "b.json").read_text())["results"][1]
    if second_factor < 1 + bench.REPRODUCED_WITHIN:
        assert not cell.endswith("~") and "Still unstable: none." in notes
        assert "Reproduced, so not marked: adam f32 1000 (ns/elem 35.0x above" in notes
        assert saved["reproduced"]["second_s"] > saved["reproduced"]["first_s"]
    else:
        assert cell.endswith("~") and "Still unstable: adam f32 1000" in notes
        assert "Reproduced" not in notes and "reproduced" not in saved


# ------------------------------------------------------------- the command line

def test_bench_cli_table_legend_json_and_absolute_paths(fast_cases, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert main(["bench", "--cases", "adam:float32:1000", "sgd:float64:100",
                 "adam:float32:200 x 16..4096", "--no-torch", "--json", "out/bench.json"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith(f"fastopt {fastopt.__version__} | SIMD ")
    header, rows = table_of(text)
    assert header == bench.table_columns(with_flat=True) and len(rows) == 3
    # The legend explains every printed column, and every mark.
    explained = re.findall(r"^  (\S+(?: \S+)?)\s{2,}", text, flags=re.M)
    for name in header + ["~", "-"]:
        assert name in explained, name
    paths = saved_paths(text)
    assert paths and all(os.path.isabs(p) and os.path.exists(p) for p in paths)
    assert paths[0] == str(tmp_path / "out" / "bench.json")
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["case"] for r in saved["results"]] == ["1000", "100", "200 x 16..4096"]


def test_help_explains_every_column_and_default_paths(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for name, _ in bench.COLUMNS + bench.MARKS:
        assert re.search(rf"^  {re.escape(name)}\s{{2,}}\S", text, flags=re.M), name
    flat = " ".join(text.split())
    assert "./fastopt-bench.json in the current folder" in flat
    assert "./fastopt-bench.png in the current folder" in flat
    assert "./fastopt-bench-torch.json" in flat


def test_percent_bound_shown_past_the_cache_and_dash_inside_it(fast_cases, monkeypatch, capsys,
                                                              tmp_path):
    # A pretend 64 KiB cache: the 1e5 case (1.6 MB) is past it, the 100-element one is not.
    monkeypatch.setattr(bench, "last_level_cache", lambda: (64 << 10, "test"))
    assert main(["bench", "--cases", "adam:float32:100", "adam:float32:1e5", "--no-torch",
                 "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]) == 0
    text = capsys.readouterr().out
    header, rows = table_of(text)
    bound = header.index("% bound")
    assert rows[0][bound] == "-" and rows[1][bound].endswith("%")
    notes = " ".join(text.split())
    assert "at least 2x the last-level cache (64 KiB, test)" in notes and "Bandwidth:" in notes
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["bandwidth_gbs"] == max(saved["probe_passes_gbs"]) > 0
    # Probes at the start, before and after the one case past the cache, and at the end.
    assert len(saved["probe_passes_gbs"]) >= 4 * bench.PROBE_PASSES
    past = saved["results"][1]["summary"]
    assert past["percent_of_bound"] == pytest.approx(
        100 * saved["results"][1]["bytes_per_step"] / (saved["bandwidth_gbs"] * 1e9)
        / saved["results"][1]["median_s"]["fastopt"])


def test_no_case_past_the_cache_measures_no_bandwidth(fast_cases, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "BandwidthProbe", None)  # must not be needed
    assert main(["bench", "--cases", "sgd:float32:1000", "--no-torch",
                 "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]) == 0
    text = capsys.readouterr().out
    header, rows = table_of(text)
    assert rows[0][header.index("% bound")] == "-"
    assert "bandwidth was not measured" in " ".join(text.split())


def test_missing_matplotlib_is_said_in_one_line(fast_cases, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(_plotting, "pyplot", lambda: None)
    png = tmp_path / "asked.png"
    assert main(["bench", "--cases", "sgd:float32:1000", "--no-torch",
                 "--json", str(tmp_path / "b.json"), "--plot", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    missing = [line for line in lines if "matplotlib is not installed" in line]
    assert missing == [_plotting.missing_line(str(png))]
    assert str(png) in missing[0] and 'pip install "fastopt[plot]"' in missing[0]
    assert not png.exists()


def _capture_figures(monkeypatch):
    """The figures fastopt._plotting.save writes from now on (still saved), as a list."""
    figures = []
    real_save = _plotting.save
    monkeypatch.setattr(_plotting, "save", lambda fig, path, **kw: (figures.append(fig),
                                                                     real_save(fig, path, **kw))[1])
    return figures


@pytest.mark.skipif(not HAVE_MPL, reason="needs matplotlib")
def test_plot_has_a_panel_per_rule_and_one_for_many_arrays(monkeypatch, tmp_path):
    figures = _capture_figures(monkeypatch)
    results = [bench.run_case(rule, dtype, n, budget_s=0.005, with_torch=False)
               for rule, dtype, n in [("adam", "float32", "100"), ("adam", "float32", "1000"),
                                      ("adam", "float64", "1000"), ("sgd", "float64", "1000"),
                                      ("rmsprop", "float32", "100"),
                                      ("adam", "float32", bench.MANY_SMALL),
                                      ("adafactor", "float32", "30x40")]]
    png = tmp_path / "bench.png"
    assert bench.plot(results, str(png)) == str(png) and png.stat().st_size > 10_000
    titles = [ax.get_title() for ax in figures[0].axes if ax.axison]
    # (a matrix case is a bar beside the many-array cases, not a point of a size sweep)
    assert titles == ["adam", "sgd", "rmsprop", "many arrays (one optimizer), matrices"]
    adam = figures[0].axes[0]
    assert {line.get_linestyle() for line in adam.get_lines()} == {"-", "--"}  # f32, f64


def test_a_matrix_case_is_one_array_of_that_shape_with_its_own_streams():
    assert bench.model_shapes("1000x1000") == [(1000, 1000)]
    assert bench.model_sizes("1000x1000") == [1_000_000]
    assert bench.model_shapes("1e3") == [(1000,)]
    vector = bench.run_case("adafactor", "float64", "12", budget_s=0.005, with_torch=False)
    matrix = bench.run_case("adafactor", "float64", "3x4", budget_s=0.005, with_torch=False)
    # a vector keeps its full variance (read and written); a matrix only its factors
    assert vector["bytes_per_step"] == 5 * 8 * 12 and matrix["bytes_per_step"] == 3 * 8 * 12
    assert matrix["max_rel_dev"]["fastopt"] == 0.0
    assert ("adafactor", "float32", bench.MATRIX) in bench.plan(quick=False, full=False)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_bench_torch_prints_the_header_and_saves_json(monkeypatch, capsys, tmp_path):
    # The timing itself is tested in test_torch.py; here only what the command does with it.
    names = list(bench_torch._optimizers(torch))
    rows = [("optimizer step, 104 tensors", {n: 1e-4 * (i + 1) for i, n in enumerate(names)}),
            ("training step, MLP", {n: 1e-3 * (i + 1) for i, n in enumerate(names)})]
    monkeypatch.setattr(bench_torch, "run_torch", lambda budget_s, spreads=None: rows)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--torch", "--quick"]) == 0
    text = capsys.readouterr().out
    first = text.splitlines()[0]
    assert first.startswith(f"fastopt {fastopt.__version__} | SIMD ") and " | torch 2" in first
    assert saved_paths(text) == [str(tmp_path / "fastopt-bench-torch.json")]
    saved = json.loads((tmp_path / "fastopt-bench-torch.json").read_text())
    assert [row["case"].split(",")[0] for row in saved["rows"]] == ["optimizer step",
                                                                    "training step"]
    assert saved["header"] == first and saved["rows"][0]["median_s"] == rows[0][1]
    assert "fastopt vs best fused" in text
    assert main(["bench", "--torch", "--quick", "--json", "other.json"]) == 0
    assert saved_paths(capsys.readouterr().out) == [str(tmp_path / "other.json")]


def test_version_and_usage(tmp_path):
    # Run outside the checkout so the installed package is the one imported.
    version = subprocess.run([sys.executable, "-m", "fastopt", "--version"], cwd=tmp_path,
                             capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"fastopt {fastopt.__version__}"
    assert main(["nonsense"]) == 2


def test_bad_case_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--cases", "adam:int8:1000"])
    with pytest.raises(SystemExit):
        main(["bench", "--cases", "adam:bf16:1000"])  # (the table's short name, not a label)
    with pytest.raises(SystemExit):
        main(["bench", "--cases", "adam:float32:lots"])
    assert "unknown" in capsys.readouterr().err


def test_check_catches_nan_and_a_torch_deviation():
    p0 = [np.zeros(3 << 20)]  # more than one chunk of _max_abs_diff
    ref = np.ones(3 << 20)
    for bad in (np.nan, 1.01):
        got = ref.copy()
        got[-1] = bad
        with pytest.raises(AssertionError, match="torch 1t deviates"):
            bench.check({"numpy": [ref], "torch 1t": [got]}, {"numpy": None, "torch 1t": None},
                        p0)
    close = ref + 1e-7
    assert bench.check({"numpy": [ref], "torch 1t": [close]}, {"numpy": None, "torch 1t": None},
                       p0)["max_rel_dev"]["torch 1t"] == pytest.approx(1e-7)


def test_check_allows_torchs_own_sums_of_a_whole_array_and_no_more():
    # torch sums a whole float32 array in float32 (Adafactor's norms): 3.7e-4 of
    # the total change at 1e7; elementwise rules keep the plain 1e-4
    p0 = [np.zeros(1000, np.float32)]
    ref = np.ones(1000, np.float32)
    off = ref + np.float32(4e-4)
    impls = {"numpy": None, "torch 1t": None}
    with pytest.raises(AssertionError, match="torch 1t deviates"):
        bench.check({"numpy": [ref], "torch 1t": [off]}, impls, p0)
    assert bench.check({"numpy": [ref], "torch 1t": [off]}, impls, p0, summed=10 ** 7)
    with pytest.raises(AssertionError, match="torch 1t deviates"):  # 1e-4 + 2 sqrt(n) eps: 8.5e-4
        bench.check({"numpy": [ref], "torch 1t": [ref + np.float32(1e-3)]}, impls, p0,
                    summed=10 ** 7)


class _SlowProbe:
    """A probe that always reads 1 MB/s, as if every pass had been disturbed."""

    def __init__(self, working_set_bytes):
        self.working_set_bytes, self.samples = working_set_bytes, []

    def measure(self, passes=bench.PROBE_PASSES):
        self.samples += [1e-3] * passes
        return 1e-3

    @property
    def best(self):
        return max(self.samples)


def test_a_step_faster_than_every_probe_gets_more_probes_and_a_warning(fast_cases, monkeypatch,
                                                                     capsys, tmp_path):
    monkeypatch.setattr(bench, "last_level_cache", lambda: (64 << 10, "test"))
    monkeypatch.setattr(bench, "BandwidthProbe", _SlowProbe)
    monkeypatch.setattr(bench, "SPREAD_LIMIT", float("inf"))  # no re-measuring: exact count
    assert main(["bench", "--cases", "sgd:float32:1e5", "--no-torch",
                 "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    saved = json.loads((tmp_path / "b.json").read_text())
    # start, before, after, end, then three more because the step beat them all
    assert len(saved["probe_passes_gbs"]) == 7 * bench.PROBE_PASSES
    assert saved["results"][0]["summary"]["percent_of_bound"] > 100
    assert "% bound over 100% (sgd f32 1e5): that step beat every probe pass" in text


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
@pytest.mark.parametrize("stable_second", [True, False])
def test_bench_torch_marks_and_remeasures_unstable_times(monkeypatch, capsys, tmp_path,
                                                         stable_second):
    names = list(bench_torch._optimizers(torch))
    rows = [("optimizer step, 104 tensors", {n: 1e-4 for n in names}),
            ("training step, MLP", {n: 1e-3 for n in names})]
    calls = []

    def fake(budget_s, spreads=None):
        calls.append(budget_s)
        shaky = len(calls) == 1 or not stable_second
        for label, _ in rows:
            spreads[label] = {n: 0.9 if shaky and n == "torch fused" else 0.01 for n in names}
        return rows
    monkeypatch.setattr(bench_torch, "run_torch", fake)
    assert main(["bench", "--torch", "--quick", "--json", str(tmp_path / "t.json")]) == 0
    text = capsys.readouterr().out
    assert len(calls) == 2  # measured again once
    table_lines = [line for line in text.splitlines() if line.strip().startswith(("optimizer",
                                                                                  "training"))]
    assert all(("100 us~" in line or "1000 us~" in line) != stable_second for line in table_lines)
    assert "re-measured once" in text
    assert ("still unstable: none" in text) == stable_second
    assert "1.00x" in text  # ratios with two decimals, never 0.0x


def test_other_load_is_the_machine_busy_time_less_this_process():
    start = (100.0, 5.0, 10.0, 1000.0)
    end = (130.0, 6.0, 25.0, 1010.0)  # 30 CPU-s busy in 10 s, 15 of them ours
    load = bench.other_load(start, end)
    assert load["other_cpus"] == pytest.approx(1.5) and load["stolen_cpus"] == pytest.approx(0.1)
    assert bench.other_load(None, end) is None
    if sys.platform.startswith("linux"):
        snap = bench.cpu_snapshot()
        assert snap is not None and snap[0] >= snap[2] - 1  # the machine's time includes ours


@pytest.mark.parametrize("busy_again", [False, True])
def test_a_case_run_beside_other_load_is_flagged_and_measured_again(fast_cases, monkeypatch,
                                                                    capsys, tmp_path, busy_again):
    # other_load is asked around every case and once for the whole run: busy
    # during the first reading of the case (and, if busy_again, the second).
    calls = []

    def fake(start, end):
        calls.append(1)
        busy = len(calls) == 1 or busy_again
        return {"other_cpus": 0.9 if busy else 0.0, "stolen_cpus": 0.0, "wall_s": 1.0}
    monkeypatch.setattr(bench, "other_load", fake)
    monkeypatch.setattr(bench, "SPREAD_LIMIT", float("inf"))  # only the load can flag it
    assert main(["bench", "--cases", "sgd:float32:1000", "--no-torch",
                 "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert len(calls) == 3
    assert "Re-measured once: sgd f32 1000 (other processes kept 0.90 CPUs busy)" in text
    assert ("Still unstable: none." in text) != busy_again
    shared = f"other processes kept 0.90 of the {os.cpu_count()} CPUs busy on average"
    assert (shared in text and "The benchmark shared the machine" in text) == busy_again


# ------------------------------------------------------------ half precision

#: dtype label -> (Adam's bytes per element moved, touched), from the streams:
#: bf16 reads p, g, m, v (2 B each) and writes p, m, v; f32+bf16 p 4 + 4, g 4,
#: m and v 2 + 2; bf16+master reads g 2 and master, m, v 4 and writes p 2 and
#: master, m, v 4; bf16+master+bf16 that with m and v 2 + 2
ADAM_BYTES = {"float32": (28, 16), "float64": (56, 32), "bfloat16": (14, 8),
              "float16": (14, 8), "f32+bf16": (20, 12), "bf16+master": (28, 16),
              "bf16+master+bf16": (20, 12)}
HALF_LABELS = [d for d in bench.DTYPES if d not in ("float32", "float64")]


def _half_marks(label):
    return [needs_ml_dtypes] if bench.needs_bfloat16(label) else []


def test_bytes_per_element_follow_the_streams_and_itemsizes():
    assert set(ADAM_BYTES) == set(bench.DTYPES)
    for label, expected in ADAM_BYTES.items():
        assert bench.traffic("adam", label) == expected, label
        assert bench.working_set_bytes("adam", label, 1000) == expected[1] * 1000
    # SGD keeps no state: p and g read, p written; the master replaces p's read
    assert bench.traffic("sgd", "bfloat16") == (6, 4)
    assert bench.traffic("sgd", "bf16+master") == (12, 8)
    assert bench.traffic("sgd-momentum", "f32+bf16") == (16, 10)
    assert bench.dtype_elements("f32+bf16") == ("float32", "float32", "bfloat16", None)
    assert bench.dtype_elements("bf16+master+bf16") == ("bfloat16", "bfloat16", "bfloat16",
                                                        "float32")
    assert [bench.torch_element(d) for d in HALF_LABELS] == [
        "bfloat16", "float16", "float32", "float32", "float32"]


def test_plan_has_the_half_cases_beside_torch():
    default = bench.plan(False, False)
    for n in ("1e3", "1e5", "1e7", bench.MANY_SMALL):
        assert ("adam", "bfloat16", n) in default
    for label in ("f32+bf16", "bf16+master"):
        assert ("adam", label, "1e7") in default
    full = bench.plan(False, True)
    for label in ("float16", "f32+bf16", "bf16+master", "bf16+master+bf16"):
        assert ("adam", label, "1e7") in full
    quick = bench.plan(True, False)
    assert ("adam", "bfloat16", "1e5") in quick
    assert [c for c in quick if c[1] != "float32"] == [("adam", "bfloat16", "1e5")]


@pytest.mark.parametrize("label", [pytest.param(d, marks=_half_marks(d)) for d in HALF_LABELS])
def test_a_half_case_checks_itself_and_counts_its_bytes(label):
    result = bench.run_case("adam", label, "257", budget_s=0.01, with_torch=HAVE_TORCH)
    assert result["max_rel_dev"]["fastopt"] == 0.0  # bit for bit, master weights too
    moved, touched = ADAM_BYTES[label]
    assert result["bytes_per_element"] == moved and result["bytes_per_step"] == moved * 257
    assert result["working_set_bytes"] == touched * 257
    assert result["dtype"] == label and result["param_dtype"] == bench.DTYPES[label][0]
    assert result["master_weights"] == ("master" in label)
    if HAVE_TORCH:
        assert {"torch 1t", "torch 2t"} <= set(result["median_s"])
        assert result["torch_dtype"] == bench.torch_element(label)
        if label in ("f32+bf16", "bf16+master+bf16"):
            # torch's float32 step is checked against the reference run in
            # float32: that close (bf16 state drifts much further than this)
            assert result["max_rel_dev"]["torch 1t"] < 1e-3


@needs_ml_dtypes
def test_bf16_many_arrays_case_runs_without_a_flat_buffer():
    result = bench.run_case("adam", "bfloat16", bench.MANY_SMALL, budget_s=0.01,
                            with_torch=False)
    assert result["arrays"] == 200 and result["max_rel_dev"]["fastopt"] == 0.0
    assert "fastopt flat" not in result["median_s"]  # FlatParams holds float32/float64 only


@needs_ml_dtypes
def test_check_compares_half_parameters_and_masters_bit_for_bit():
    bf16 = np.dtype(__import__("ml_dtypes").bfloat16)
    p0 = [np.zeros(8, bf16)]
    ref = np.linspace(-1, 1, 8).astype(bf16)
    off = ref.copy()
    off.view(np.uint16)[3] ^= 1  # one bit
    impls = {"numpy": None, "fastopt": None}
    with pytest.raises(AssertionError, match="fastopt disagrees"):
        bench.check({"numpy": [ref], "fastopt": [off]}, impls, p0)
    zero = np.zeros(8, bf16)
    with pytest.raises(AssertionError, match="fastopt disagrees"):  # -0 is not +0, bitwise
        bench.check({"numpy": [zero], "fastopt": [-zero]}, impls, p0)
    masters = {"numpy": [np.ones(8, np.float32)], "fastopt": [np.ones(8, np.float32)]}
    assert bench.check({"numpy": [ref], "fastopt": [ref.copy()]}, impls, p0,
                       masters=masters)["max_rel_dev"]["fastopt"] == 0.0
    masters["fastopt"][0][5] = np.nextafter(np.float32(1), np.float32(2))
    with pytest.raises(AssertionError, match="master weights disagree"):
        bench.check({"numpy": [ref], "fastopt": [ref.copy()]}, impls, p0, masters=masters)


@pytest.mark.parametrize("element", [pytest.param("bfloat16", marks=needs_ml_dtypes),
                                     "float16"])
def test_half_tolerance_is_ulps_of_each_element_plus_eps_of_the_change(element):
    dtype = np.dtype(__import__("ml_dtypes").bfloat16) if element == "bfloat16" else np.float16
    bits = bench.MANTISSA_BITS[element]
    eps = 2.0 ** -bits
    start = np.linspace(-2, 2, 1001).astype(dtype)
    ref = (start.astype(np.float32) - 0.05).astype(dtype)  # a total change of about 0.05
    scale = float(np.max(np.abs(ref.astype(np.float64) - start.astype(np.float64))))

    def nudged(i, ulps):
        got = ref.copy()
        got.view(np.uint16)[i] += ulps  # (ref[i] > 0: ulps of its magnitude up)
        return got
    big = int(np.argmax(ref.astype(np.float32)))  # ~1.95: its ulp is 2**-bits
    assert bench.spacing(np.array([1.95]), element)[0] == eps
    # a rounding disagreement, some ulps of an element: accepted
    ok, dev = bench.within_tolerance(nudged(big, 2), ref, start)
    assert ok and dev == pytest.approx(2 * eps / scale)
    # far past HALF_ULPS of itself and HALF_RTOL_EPS eps of the change: refused
    far = bench.HALF_ULPS + int(bench.HALF_RTOL_EPS * scale / eps) + 2
    assert not bench.within_tolerance(nudged(big, far), ref, start)[0]
    # a small element a few eps of the change off (drifting state): accepted, but every
    # small element 20% of the change off (a wrong update) is not
    small = int(np.argmin(np.abs(ref.astype(np.float32) - 0.01)))
    drift = ref.astype(np.float32)
    drift[small] += 3 * eps * scale
    assert bench.within_tolerance(drift.astype(dtype), ref, start)[0]
    wrong = ref.astype(np.float32)
    near = np.abs(wrong) < 0.1
    wrong[near] += 0.2 * scale
    assert not bench.within_tolerance(wrong.astype(dtype), ref, start)[0]
    got = ref.copy()
    got[7] = np.nan
    assert not bench.within_tolerance(got, ref, start)[0]


@needs_ml_dtypes
def test_as_tensor_shares_a_bf16_arrays_memory():
    torch = pytest.importorskip("torch")
    a = np.zeros(4, np.dtype(__import__("ml_dtypes").bfloat16))
    t = bench.as_tensor(torch, a)
    assert t.dtype == torch.bfloat16
    t += 1.5
    assert a.astype(np.float32).tolist() == [1.5] * 4


@needs_ml_dtypes
def test_half_rows_print_compact_dtypes_and_save_their_bytes(fast_cases, capsys, tmp_path):
    assert main(["bench", "--cases", "adam:bfloat16:1000", "adam:float16:1000",
                 "adam:f32+bf16:1000", "adam:bf16+master:1000", "adam:bf16+master+bf16:1000",
                 "--no-torch", "--json", str(tmp_path / "b.json"),
                 "--plot", str(tmp_path / "b.png")]) == 0
    text = capsys.readouterr().out
    header, rows = table_of(text)
    assert [row[header.index("dtype")] for row in rows] == [
        "bf16", "f16", "f32+bf16", "bf16+master", "bf16+master+bf16"]
    saved = json.loads((tmp_path / "b.json").read_text())
    results = saved["results"]
    assert [r["bytes_per_element"] for r in results] == [14, 14, 20, 28, 20]
    for r, row in zip(results, rows):
        gbs = r["bytes_per_step"] / r["median_s"]["fastopt"] / 1e9
        assert row[header.index("GB/s")] == bench._fmt_rate(gbs)
    assert saved["skipped"] == []


def test_bf16_cases_are_skipped_with_a_note_without_ml_dtypes(fast_cases, monkeypatch, capsys,
                                                            tmp_path):
    monkeypatch.setattr(bench, "have_bfloat16", lambda: False)
    assert main(["bench", "--cases", "adam:bfloat16:1000", "adam:float16:1000",
                 "adam:f32+bf16:1000", "--no-torch", "--json", str(tmp_path / "b.json"),
                 "--plot", str(tmp_path / "b.png")]) == 0
    text = capsys.readouterr().out
    header, rows = table_of(text)
    assert [row[header.index("dtype")] for row in rows] == ["f16"]  # float16 needs no ml_dtypes
    notes = " ".join(text.split())
    assert ("Skipped, ml_dtypes is not installed (pip install ml_dtypes): adam bf16 1000, "
            "adam f32+bf16 1000.") in notes
    saved = json.loads((tmp_path / "b.json").read_text())
    assert [(s["dtype"], s["case"]) for s in saved["skipped"]] == [("bfloat16", "1000"),
                                                                   ("f32+bf16", "1000")]


def test_planning_a_run_does_not_import_ml_dtypes(tmp_path):
    code = ("import sys, fastopt.bench as b; b.plan(False, False, dram_bytes=1 << 20); "
            "b.working_set_bytes('adam', 'bf16+master', 10); b.legend(); "
            "print('ml_dtypes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "False"


@needs_ml_dtypes
@pytest.mark.skipif(not HAVE_MPL, reason="needs matplotlib")
def test_plot_draws_half_cases_in_their_own_style(monkeypatch, tmp_path):
    figures = _capture_figures(monkeypatch)
    results = [bench.run_case("adam", dtype, n, budget_s=0.005, with_torch=False)
               for dtype, n in [("float32", "100"), ("bfloat16", "100"), ("bfloat16", "1000"),
                                ("f32+bf16", "1000"), ("bfloat16", bench.MANY_SMALL)]]
    png = tmp_path / "bench.png"
    assert bench.plot(results, str(png)) == str(png)
    adam = figures[0].axes[0]
    assert {line.get_linestyle() for line in adam.get_lines()} == {"-", ":", "-."}
    labels = [t.get_text() for t in figures[0].axes[1].get_yticklabels()]
    assert labels == ["adam bf16\n200 x 16..4096"]


# ------------------------------------------------------------ bench --guards

def test_guards_bench_checks_then_times_every_implementation():
    from fastopt._cli import bench_guards
    res = bench_guards.run_case("3000", [1000, 2000], budget_s=0.01, with_torch=HAVE_TORCH)
    names = ["step", "clip", "clip+ema"] + (["torch clip", "torch clip+ema"] if HAVE_TORCH else [])
    assert list(res["median_s"]) == names
    assert all(t > 0 for t in res["median_s"].values()) and res["elements"] == 3000
    table = bench_guards.format_table([res])
    assert "clip+ema / step" in table and "3000" in table


def test_guards_bench_refuses_a_result_off_the_reference():
    from fastopt._cli import bench_guards
    want = [np.linspace(-1, 1, 100_000)]
    off = [want[0].copy()]
    off[0][10] += 1e-3                                  # one element: fastopt allows none
    with pytest.raises(AssertionError, match="clip: parameters"):
        bench_guards._check("clip", off, want, "parameters")
    bench_guards._check("torch clip", off, want, "parameters")  # torch: a few sign flips
    off[0][:] += 1e-3                                   # all of them: nobody may
    with pytest.raises(AssertionError, match="torch clip"):
        bench_guards._check("torch clip", off, want, "parameters")


def test_guards_bench_cli_writes_its_json(tmp_path, monkeypatch):
    from fastopt._cli import bench_guards
    monkeypatch.setattr(bench_guards, "cases", lambda: [("2000", [2000])])
    path = tmp_path / "g.json"
    assert main(["bench", "--guards", "--quick", "--no-torch", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["results"][0]["case"] == "2000"
