"""fastopt._dispatch: SIMD levels, threads, OpenMP, coexistence, and the hot path.

* Every SIMD level this CPU runs and every thread count give the same bits as
  the baseline level on one thread, and as the NumPy reference, for every
  rule and option set of tests/spec.py - on one large array and on a
  model of many arrays of mixed dtype whose elements the threads split
  across array boundaries (and, for a rule with factored state, on
  matrices).
* FASTOPT_SIMD and FASTOPT_NUM_THREADS are read at import (in subprocesses);
  bad values fail the import with a clear message.
* set_num_threads refuses anything but an int >= 1.
* threadpoolctl's OpenMP limit governs fastopt's threads.
* fastopt and torch share a process in either import order.
* show_config() reports the build; the build is portable.
* A step on the fast path allocates no array.

Every test restores what it changes (SIMD level, thread cap, the per-level
parallel threshold; threadpoolctl restores OpenMP's limit itself).
"""
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

import fastopt
from fastopt import _dispatch

import spec  # tests/spec.py: tests/ is on sys.path under pytest

RUNNABLE = [lvl for lvl in _dispatch.built_levels() if lvl in _dispatch.cpu_levels()]
THREADS = (1, 2, 3, 4)
STEPS = 3
SUBPROCESS_TIMEOUT = 120


def kernel_module(level):
    return importlib.import_module(f"fastopt._kernels_{level}")


@pytest.fixture(autouse=True)
def restore_settings():
    """Put back the SIMD level, thread cap and every level's parallel threshold."""
    level, threads = fastopt.simd_level(), fastopt.get_num_threads()
    thresholds = {lvl: kernel_module(lvl).get_parallel_min_work() for lvl in RUNNABLE}
    try:
        yield
    finally:
        for lvl, work in thresholds.items():
            kernel_module(lvl).set_parallel_min_work(work)
        _dispatch.select_simd(level)
        fastopt.set_num_threads(threads)


@contextlib.contextmanager
def openmp_limit(n):
    """Set OpenMP's own thread limit to ``n`` while inside (threadpoolctl), if possible.

    fastopt uses min(set_num_threads, omp_get_max_threads()) threads, and
    OpenMP's default limit is the number of cores: on a 2-core machine
    set_num_threads(3) alone would still run 2 threads.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        warnings.warn("threadpoolctl is not installed: thread counts above OpenMP's "
                      "default limit are not really run")
        yield False
        return
    with threadpool_limits(limits=n, user_api="openmp"):
        yield True


def use(level, threads, min_work=None):
    """Make ``level`` active with ``threads``; return its compute module."""
    _dispatch.select_simd(level)
    fastopt.set_num_threads(threads)
    module = _dispatch._active["module"]
    assert module is kernel_module(level) and fastopt.simd_level() == level
    if min_work is not None:
        module.set_parallel_min_work(min_work)
    return module


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def run_steps(rule, options, arrays, grads, backend="cython"):
    """``len(grads)`` steps of the optimizer for ``rule`` on copies of ``arrays``.

    Returns ``{label: array or int}``: every parameter and every state entry.
    """
    params = [a.copy() for a in arrays]
    # The rule's first class takes every kernel option (tests/spec.py).
    cls = getattr(fastopt, spec.rule(rule).classes[0].name)
    opt = cls(params, **spec.kernel_kwargs(rule, options), backend=backend)
    for g in grads:
        opt.step(list(g))
    out = {f"params[{i}]": p for i, p in enumerate(params)}
    for i, entry in opt.state.items():
        for key, value in entry.items():
            out[f"state[{i}][{key!r}]"] = value
    return out


def mismatches(result, expected):
    assert result.keys() == expected.keys()
    return [k for k in expected if not same_bits(result[k], expected[k])]


# ---------------------------------------------------- layouts for the sweep

ONE_ARRAY_SIZE = 100_003  # odd: the last thread's share is not a multiple of 16


def one_array(dtype):
    def make(rng):
        return [rng.standard_normal(ONE_ARRAY_SIZE).astype(dtype)]
    return make


def model(rng, count=50, smallest=1, largest=30_000):
    """``count`` arrays of log-uniform odd sizes, float32 and float64 mixed."""
    sizes = np.exp(rng.uniform(np.log(smallest), np.log(largest), count)).astype(int) | 1
    dtypes = rng.choice([np.float32, np.float64], count)
    dtypes[:2] = [np.float32, np.float64]  # both, whatever the draw
    return [rng.standard_normal(n).astype(d) for n, d in zip(sizes, dtypes)]


LAYOUTS = {"one f32 array": one_array(np.float32), "one f64 array": one_array(np.float64),
           "model of 50 arrays": model}


def make_problem(make, seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    arrays = make(rng)
    grads = [[rng.standard_normal(a.shape).astype(a.dtype) for a in arrays] for _ in range(steps)]
    return arrays, grads


def sweep(rule, options, arrays, grads, min_work):
    """Run every runnable level x thread count; compare with baseline/1 thread and NumPy."""
    expected = run_steps(rule, options, arrays, grads, backend="numpy")
    first = None
    failures = []
    with openmp_limit(max(THREADS)) as raised:
        for level in RUNNABLE:
            for threads in THREADS:
                module = use(level, threads, min_work)
                if raised and module.info()["openmp"]:
                    # The sweep really runs 3 and 4 threads, not OpenMP's default.
                    assert module.info()["omp_max_threads"] == max(THREADS)
                result = run_steps(rule, options, arrays, grads)
                if first is None:
                    first = result  # RUNNABLE starts with baseline, THREADS with 1
                    assert (level, threads) == ("baseline", 1)
                for against, name in ((first, "baseline level, 1 thread"), (expected, "numpy")):
                    bad = mismatches(result, against)
                    if bad:
                        failures.append(f"{level}, {threads} threads vs {name}: {bad[:4]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", spec.kernel_cases(), ids=spec.case_id)
def test_results_identical_for_every_thread_count_and_simd_level(case, layout):
    _, rule, options = case
    arrays, grads = make_problem(LAYOUTS[layout])
    # Threshold 0: every step is split over the threads, however small.
    sweep(rule, options, arrays, grads, min_work=0)


def matrices(rng):
    """Weights of several shapes, both dtypes: rows and columns that threads split
    unevenly, a tall one and a wide one, a stack, and a vector."""
    shapes = [((301, 333), np.float32), ((4099, 5), np.float64), ((3, 20011), np.float32),
              ((3, 7, 129), np.float64), ((70001,), np.float32)]
    return [rng.standard_normal(shape).astype(dtype) for shape, dtype in shapes]


@pytest.mark.parametrize("case", [c for c in spec.kernel_cases() if spec.rule(c[1]).shaped],
                         ids=spec.case_id)
def test_factored_rules_identical_for_every_thread_count_and_simd_level(case):
    # (Adafactor) each parameter's sums over rows, columns and blocks of rows,
    # whoever computes them
    _, rule, options = case
    arrays, grads = make_problem(matrices)
    sweep(rule, options, arrays, grads, min_work=0)


@pytest.mark.parametrize("options", [{}, {"amsgrad": True, "weight_decay": 0.1}],
                         ids=["adam", "adam-amsgrad-wd"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_large_adam_identical_with_default_parallel_threshold(dtype, options):
    n = 1_000_003
    for level in RUNNABLE:
        work = kernel_module(level).get_parallel_min_work()
        assert 0 < work < n * 7, f"{level}: a {n}-element Adam step would not be split"
    arrays, grads = make_problem(lambda rng: [rng.standard_normal(n).astype(dtype)], steps=2)
    sweep("adam", options, arrays, grads, min_work=None)


def test_model_really_spans_sizes_and_dtypes():
    arrays = model(np.random.default_rng(0))
    sizes = [a.size for a in arrays]
    assert len(arrays) == 50 and all(n % 2 == 1 for n in sizes)
    assert min(sizes) < 100 and max(sizes) > 10_000
    assert {a.dtype for a in arrays} == {np.dtype(np.float32), np.dtype(np.float64)}


# ----------------------------------------------------- environment (subprocess)

def run_python(code, tmp_path, env=None, prefix=()):
    """Run ``code`` in a fresh interpreter outside the checkout.

    The environment is this one's without FASTOPT_* and OpenMP's variables,
    plus ``env``.
    """
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("FASTOPT_", "OMP_", "GOMP_", "KMP_"))}
    full_env.update(env or {})
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)],
                          cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)


def last_json(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


REPORT = """
    import json, os, fastopt
    from fastopt import _dispatch
    print(json.dumps({"level": fastopt.simd_level(),
                      "isa": _dispatch._active["module"].info()["isa"],
                      "threads": fastopt.get_num_threads(),
                      "affinity": len(os.sched_getaffinity(0))}))
"""


@pytest.mark.parametrize("level", RUNNABLE)
def test_fastopt_simd_selects_each_runnable_level(level, tmp_path):
    out = last_json(run_python(REPORT, tmp_path, {"FASTOPT_SIMD": level}))
    assert out["level"] == out["isa"] == level


def test_without_fastopt_simd_the_best_runnable_level_is_chosen(tmp_path):
    for env in ({}, {"FASTOPT_SIMD": ""}):
        out = last_json(run_python(REPORT, tmp_path, env))
        assert out["level"] == out["isa"] == RUNNABLE[-1]


def test_unknown_fastopt_simd_fails_the_import_clearly(tmp_path):
    proc = run_python("import fastopt", tmp_path, {"FASTOPT_SIMD": "sse9"})
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "FASTOPT_SIMD" in proc.stderr
    assert "'sse9'" in proc.stderr and "baseline" in proc.stderr


def test_select_simd_refuses_unknown_level_and_keeps_the_active_one():
    level = fastopt.simd_level()
    with pytest.raises(ValueError, match="FASTOPT_SIMD"):
        _dispatch.select_simd("sse9")
    assert fastopt.simd_level() == level


@pytest.mark.parametrize("value", ["1", "3"])
def test_fastopt_num_threads_sets_the_thread_cap(value, tmp_path):
    out = last_json(run_python(REPORT, tmp_path, {"FASTOPT_NUM_THREADS": value}))
    assert out["threads"] == int(value)


@pytest.mark.parametrize("value", ["0", "x", "-1", "1.5"])
def test_bad_fastopt_num_threads_fails_the_import_clearly(value, tmp_path):
    proc = run_python("import fastopt", tmp_path, {"FASTOPT_NUM_THREADS": value})
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "FASTOPT_NUM_THREADS" in proc.stderr
    assert repr(value) in proc.stderr


def test_default_thread_count_is_the_cpus_this_process_may_use(tmp_path):
    out = last_json(run_python(REPORT, tmp_path))
    assert out["threads"] == out["affinity"] == len(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    if taskset is None:
        pytest.skip("taskset is not installed")
    out = last_json(run_python(REPORT, tmp_path, prefix=(taskset, "-c", "0")))
    assert out["affinity"] == 1 and out["threads"] == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, False, "2", None])
def test_set_num_threads_refuses_non_positive_ints(bad):
    before = fastopt.get_num_threads()
    with pytest.raises(ValueError, match="int >= 1"):
        fastopt.set_num_threads(bad)
    assert fastopt.get_num_threads() == before


def test_set_num_threads_round_trips():
    for n in (1, 3, 64):
        fastopt.set_num_threads(n)
        assert fastopt.get_num_threads() == n
        assert _dispatch.config()["num_threads"] == n


# ------------------------------------------------------------- threadpoolctl

def test_threadpoolctl_limits_fastopt_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    module = _dispatch._active["module"]
    if not module.info()["openmp"]:
        pytest.skip("compute layer built without OpenMP")
    default = module.info()["omp_max_threads"]
    fastopt.set_num_threads(4)
    module.set_parallel_min_work(0)
    arrays, grads = make_problem(one_array(np.float32))
    outside = run_steps("adam", {}, arrays, grads)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert module.info()["omp_max_threads"] == 1
        assert _dispatch.config()["omp_max_threads"] == 1
        assert fastopt.get_num_threads() == 4  # fastopt's own cap is untouched
        inside = run_steps("adam", {}, arrays, grads)
    assert module.info()["omp_max_threads"] == default
    assert not mismatches(inside, outside)
    assert not mismatches(inside, run_steps("adam", {}, arrays, grads, backend="numpy"))


def test_threadpoolctl_sees_the_openmp_runtime():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not _dispatch._active["module"].info()["openmp"]:
        pytest.skip("compute layer built without OpenMP")
    apis = [lib["user_api"] for lib in threadpoolctl.threadpool_info()]
    assert "openmp" in apis, threadpoolctl.threadpool_info()


THREAD_COUNT_SCRIPT = """
    import json, os
    import numpy as np
    import fastopt

    def os_threads():
        return len(os.listdir("/proc/self/task"))

    p = np.zeros(1_000_003, np.float32)  # above the default parallel threshold
    g = np.ones_like(p)
    opt = fastopt.Adam([p])
    counts = {"start": os_threads()}
    fastopt.set_num_threads(1)
    opt.step([g])
    opt.step([g])
    counts["cap 1"] = os_threads()
    if {threadpoolctl}:
        from threadpoolctl import threadpool_limits
        fastopt.set_num_threads(4)
        with threadpool_limits(limits=1, user_api="openmp"):
            opt.step([g])
            counts["cap 4, threadpoolctl 1"] = os_threads()
    fastopt.set_num_threads(3)
    opt.step([g])
    counts["cap 3"] = os_threads()
    fastopt.set_num_threads(4)
    opt.step([g])
    counts["cap 4"] = os_threads()
    print(json.dumps(counts))
"""


def test_threads_started_follow_the_cap_and_openmp_limits(tmp_path):
    """OpenMP keeps its worker threads: counting the process's threads shows how
    many a step really used (results alone cannot: they are the same bits)."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc/self/task")
    if not _dispatch._active["module"].info()["openmp"]:
        pytest.skip("compute layer built without OpenMP")
    has_threadpoolctl = importlib.util.find_spec("threadpoolctl") is not None
    code = THREAD_COUNT_SCRIPT.replace("{threadpoolctl}", str(has_threadpoolctl))
    counts = last_json(run_python(code, tmp_path, {"OMP_NUM_THREADS": "4"}))
    start = counts["start"]
    assert counts["cap 1"] == start, counts  # set_num_threads(1): no worker started
    if has_threadpoolctl:
        assert counts["cap 4, threadpoolctl 1"] == start, counts  # OpenMP's limit wins
    assert counts["cap 3"] == start + 2, counts
    assert counts["cap 4"] == start + 3, counts
    # OMP_NUM_THREADS=1 caps fastopt too, whatever set_num_threads says.
    counts = last_json(run_python(code, tmp_path, {"OMP_NUM_THREADS": "1"}))
    assert set(counts.values()) == {counts["start"]}, counts


# ---------------------------------------------------------------- with torch

TORCH_SCRIPT = """
    import json, threading
    import numpy as np
    {imports}
    fastopt.set_num_threads(2)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(2_000_003).astype(np.float32)
    grads = [rng.standard_normal(p0.size).astype(np.float32) for _ in range(4)]
    fast, ref = p0.copy(), p0.copy()
    opt = fastopt.Adam([fast], lr=0.01)
    opt_ref = fastopt.Adam([ref], lr=0.01, backend="numpy")
    sums = []
    for g in grads[:2]:  # interleaved on one thread
        opt.step([g])
        sums.append(float(torch.ones(2_000_000).sum()))
        opt_ref.step([g])
    def fastopt_steps():  # then at the same time, on two threads
        for g in grads[2:]:
            opt.step([g])
    worker = threading.Thread(target=fastopt_steps)
    worker.start()
    for _ in range(4):
        sums.append(float(torch.ones(2_000_000).sum()))
    worker.join()
    for g in grads[2:]:
        opt_ref.step([g])
    print(json.dumps({{
        "same_bits": fast.tobytes() == ref.tobytes(),
        "moved": bool((fast != p0).any()),
        "torch_sums_ok": all(s == 2_000_000.0 for s in sums),
        "omp_max_threads": fastopt._dispatch.config()["omp_max_threads"],
        "torch_threads": torch.get_num_threads(),
    }}))
"""


@pytest.mark.parametrize("order", [("torch", "fastopt"), ("fastopt", "torch")],
                         ids=["torch-first", "fastopt-first"])
def test_coexists_with_torch_in_either_import_order(order, tmp_path):
    pytest.importorskip("torch")
    imports = "\n    ".join(f"import {name}" for name in order)
    code = TORCH_SCRIPT.format(imports=imports)
    try:
        proc = run_python(code, tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"import {' then '.join(order)}: hung for {SUBPROCESS_TIMEOUT} s")
    out = last_json(proc)
    assert out["same_bits"] and out["moved"], out
    assert out["torch_sums_ok"] and out["torch_threads"] == 2, out


# -------------------------------------------------------------- show_config

def test_show_config_reports_level_threads_and_build(capsys):
    fastopt.set_num_threads(3)
    fastopt.show_config()
    lines = {}
    for line in capsys.readouterr().out.splitlines():
        key, _, value = line.partition(":")
        lines[key.strip()] = value.strip()
    module = _dispatch._active["module"]
    assert lines["simd_level"] == fastopt.simd_level() == module.info()["isa"]
    assert lines["num_threads"] == "3"
    assert lines["openmp"] == str(module.info()["openmp"])
    assert lines["compiler"] == module.info()["compiler"] != ""
    assert lines["flags"] == module.info()["flags"]
    assert "-march=native" not in lines["flags"]
    assert lines["simd_built"] == ", ".join(_dispatch.built_levels())


@pytest.mark.parametrize("level", RUNNABLE)
def test_build_flags_are_portable_and_contract_no_fma(level):
    flags = kernel_module(level).info()["flags"]
    assert "-march=native" not in flags and "-mtune=native" not in flags
    if "gcc-compatible" in kernel_module(level).info()["compiler"]:
        # The bit-identity across levels rests on this flag.
        assert "-ffp-contract=off" in flags.split()
    assert kernel_module(level).info()["isa"] == level


# ----------------------------------------------------------------- hot path

def test_step_allocates_no_arrays_after_the_first():
    rng = np.random.default_rng(0)
    # Each array's data is >= 8 KiB: a temporary copy of any would show in the peak.
    params = [rng.standard_normal(2048).astype(np.float32 if i % 2 else np.float64)
              for i in range(20)]
    grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in params]
    opt = fastopt.Adam(params, lr=1e-3)
    opt.step(grads)  # allocates the state
    domain = tracemalloc.DomainFilter(inclusive=True, domain=np.lib.tracemalloc_domain)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces([domain])
        gc.collect()
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(200):
            opt.step(grads)
        end, peak = tracemalloc.get_traced_memory()
        after = tracemalloc.take_snapshot().filter_traces([domain])
    finally:
        tracemalloc.stop()
    new_arrays = [s for s in after.compare_to(before, "lineno") if s.size_diff or s.count_diff]
    assert not new_arrays, new_arrays[:5]
    assert end - start < 4096, f"traced memory grew by {end - start} bytes over 200 steps"
    assert peak - start < 4096, f"a step allocated {peak - start} bytes at its peak"
    assert opt.state[0]["step"] == 201
