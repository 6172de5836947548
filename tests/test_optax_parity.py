"""fastopt against optax for the rules it takes from optax (Lion, Lamb).

The twin of ``test_torch_parity.py`` for the classes torch.optim lacks:
golden trajectories recorded by ``make_optax_golden.py`` (no JAX needed),
the same cases live against the installed optax (skipped without it), and a
check that the recording still describes the case table. Deviations are
measured as in test_torch_parity, relative to the parameter's total change.
"""
import numpy as np
import pytest

import make_golden as mg  # noqa: E402  (tests/ is on sys.path under pytest)
import make_optax_golden as mog  # noqa: E402
import spec  # noqa: E402
from test_torch_parity import BACKENDS, RTOL, assert_close_to_torch, load_golden, run_fastopt

CASE_IDS = [case_id for case_id, _, _ in mog.CASES]
LIVE_STEPS = 100


@pytest.fixture(scope="module")
def golden():
    if not mog.GOLDEN_PATH.exists():
        pytest.fail(f"{mog.GOLDEN_PATH} is missing; run python tests/make_optax_golden.py")
    return load_golden(mog.GOLDEN_PATH)


@pytest.fixture(scope="module")
def optax():
    pytest.importorskip("jax")
    return pytest.importorskip("optax")


def test_golden_file_matches_case_table(golden):
    meta = golden["meta"]
    header = mg.meta_header(mog.CASES)
    assert {k: meta.get(k) for k in header} == header, (
        "tests/make_optax_golden.py changed since the recording: "
        "run python tests/make_optax_golden.py")


def test_case_table_covers_every_optax_class_and_option():
    import inspect

    import fastopt
    recorded = {opt for _, opt, _ in mog.CASES}
    assert recorded == set(spec.optax_class_names())
    assert set(mog.OPTAX) == recorded
    for name in recorded:
        assert spec.find_class(name).optax == mog.OPTAX[name][0]
        sig = inspect.signature(getattr(fastopt, name))
        options = {k for k in sig.parameters  # (the precision keywords: test_precision.py)
                   if k not in ("params", "backend", "skip_nonfinite", "flush_denormals",
                                *spec.OPTION_KEYWORDS)}
        used = {k for _, opt, kw in mog.CASES if opt == name for k, v in kw.items()
                if mg.call_kwargs({k: v})[k] != sig.parameters[k].default}
        assert {} in [kw for _, opt, kw in mog.CASES if opt == name], name
        assert used == options, f"{name}: no case sets {sorted(options - used)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", mg.DTYPES)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_golden_trajectory(golden, case_id, dtype, backend):
    case, p0, grads, trajs = golden[case_id]
    got = run_fastopt(case["optimizer"], case["kwargs"], p0, grads, dtype, backend,
                      mg.CHECKPOINTS)
    assert got.dtype == dtype
    assert_close_to_torch(got, trajs[dtype], p0, dtype, mg.CHECKPOINTS,
                          f"{case_id} {dtype} backend={backend} (optax recording)")


@pytest.mark.parametrize("dtype", mg.DTYPES)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_live_case(optax, case_id, dtype):
    _, optimizer, kwargs = mog.CASES[CASE_IDS.index(case_id)]
    p0, grads = mg.make_inputs(mg.case_seed(case_id), steps=LIVE_STEPS)
    steps = range(1, LIVE_STEPS + 1)
    want = mog.run_optax(optimizer, kwargs, p0, grads, dtype, steps)
    for backend in BACKENDS:
        got = run_fastopt(optimizer, kwargs, p0, grads, dtype, backend, steps)
        assert_close_to_torch(got, want, p0, dtype, steps,
                              f"{case_id} {dtype} backend={backend} (optax {optax.__version__})")


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_installed_optax_reproduces_golden(optax, golden, case_id):
    case, p0, grads, trajs = golden[case_id]
    for dtype in mg.DTYPES:
        now = mog.run_optax(case["optimizer"], case["kwargs"], p0, grads, dtype, mg.CHECKPOINTS)
        assert_close_to_torch(now, trajs[dtype], p0, dtype, mg.CHECKPOINTS,
                              f"{case_id} {dtype}: optax {optax.__version__} vs recording")
