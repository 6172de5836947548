"""Memory over long runs: no growth, no reference leaks, no arrays kept alive.

* 100k optimizer steps (every optimizer class, with the options of its
  tests/spec.py case that keeps the most state) of a tiny model leave the
  traced Python/NumPy memory (tracemalloc) and the resident set size (RSS,
  /proc/self/statm: catches C allocations tracemalloc does not see) where
  they were after warm-up; so do 5k steps on the other paths (grads as a
  dict, a None grad, steps that raise, skip_nonfinite, the low-level kernels,
  gradient clipping and accumulation).
* step() leaves the reference counts of params, grads, state buffers (and the
  packed blocks under them) as it found them: on the fast path, on the slow
  path (a None grad) and on the error path (a step that raises).
* The cached Workspaces hold raw pointers to the last step's grads but no
  reference: a grad dies when the caller drops it, and the next step never
  reads through the stale pointer (its results are bit-identical to the NumPy
  backend's; under tools/sanitize.sh such a read would be a use-after-free).
* Known, marked xfail: replaced state buffers (load_state_dict) stay alive
  until the next step on the fast path.

Sizes are tiny on purpose: a step costs about a microsecond, so the leak
that could hide in it is a per-step one, and 1e5 steps make any per-step
allocation that is never freed 100s of KiB - far above the tolerances.
"""
import gc
import os
import sys
import tracemalloc
import weakref

import numpy as np
import pytest

import fastopt
from fastopt import _fastpath, kernels

import spec  # tests/spec.py: tests/ is on sys.path under pytest

STEPS = 100_000        # the fast path: about 1 us a step
OTHER_STEPS = 5_000    # the Python paths: 3-20 us a step (10x that traced)
WARMUP = 1_000
CHUNKS = 10
# The fast path does no Python work that could trigger CPython's own one-off
# growth, so its bounds are tight: 4 KiB of traced memory over 1e5 steps is
# one byte per 25 steps; any leaked malloc block is >= 32 bytes, i.e.
# >= 3 MiB of RSS over 1e5 steps against a 256 KiB bound.
FAST_TRACED_TOTAL = 4 * 1024
FAST_RSS_TOTAL = 256 * 1024
# The Python paths trigger bounded growth inside CPython and NumPy that is
# not fastopt's: NumPy's __array_interface__ (the overlap checks use it)
# interns its dict keys, and CPython 3.11's interned-string dict resizes
# once in a while (one allocation, 1-2 MiB here, more in a process with
# more strings); an exception's message path leaves a few KiB in the first
# thousands of raising steps. So there a leak is growth that goes on: over
# the second half of the run, leaving out its largest chunk (a one-off), at
# most 4 KiB (one leaked object per step would be >= 16 bytes a step, i.e.
# >= 32 KiB); over the whole run, leaving out its largest chunk, 64 KiB.
SLOW_LATE_GROWTH = 4 * 1024
SLOW_TOTAL_BUT_ONE = 64 * 1024

SIZES = (8, 16, 4)


class TrackedGrad(np.ndarray):
    """An ndarray subclass, so that a gradient can be watched with a weakref."""


# Above NumPy's small-buffer cache (< 1 KiB of data is recycled, not freed):
# a dropped grad's memory really goes back to malloc - and, under
# tools/sanitize.sh, a read through a stale pointer is a heap-use-after-free.
FREED_SIZES = (300, 513, 1000)


def make_model(seed=0, dtypes=(np.float32, np.float64, np.float32), sizes=SIZES):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n).astype(d) for n, d in zip(sizes, dtypes)]
    grads = [rng.standard_normal(p.shape).astype(p.dtype) * 1e-3 for p in params]
    return params, grads


def tracked(arrays):
    """TrackedGrad copies of ``arrays`` (each owns its data); None stays None."""
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        t = TrackedGrad(a.shape, a.dtype)
        t[...] = a
        out.append(t)
    return out


# ---------------------------------------------------------------- measuring

def _page_size():
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def rss_bytes():
    """Resident set size from /proc/self/statm, or None where there is none."""
    page = _page_size()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    except (OSError, IndexError, ValueError, TypeError):
        return None


def under_asan():
    """ASan's quarantine holds freed memory back: RSS grows by design there."""
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


def growth(step, steps, traced):
    """Run ``step`` ``steps`` times after warm-up; memory minus the start after each chunk.

    ``traced``: tracemalloc's current total (started here), else RSS. Every
    sample follows a gc.collect(), which also empties CPython's free lists
    (a free list filling up looks like growth until it is full). Samples go
    into a preallocated array so the measuring allocates nothing that lives on.
    """
    samples = np.zeros(CHUNKS, np.int64)
    per_chunk = steps // CHUNKS
    gc.collect()
    if traced:
        tracemalloc.start()
    try:
        for _ in range(WARMUP):
            step()
        gc.collect()
        start = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
        for c in range(CHUNKS):
            for _ in range(per_chunk):
                step()
            gc.collect()
            samples[c] = (tracemalloc.get_traced_memory()[0] if traced else rss_bytes()) - start
    finally:
        if traced:
            tracemalloc.stop()
    return samples


def but_largest(increments):
    return int(increments.sum() - max(increments.max(), 0))


def late_growth(samples):
    """Growth over the second half of the run, less its largest chunk (a one-off)."""
    return but_largest(np.diff(samples)[CHUNKS // 2 - 1:])


def check_flat(samples, label, what, total):
    """At most ``total`` bytes more than after warm-up, at every sample."""
    assert samples.max() <= total, (
        f"{label}: {what} grew; after each chunk of the run: {samples.tolist()} bytes")


def check_not_growing(samples, label, what):
    """No growth that goes on, and little in all besides one one-off (see SLOW_LATE_GROWTH)."""
    total = but_largest(np.diff(samples, prepend=0))
    assert total <= SLOW_TOTAL_BUT_ONE and late_growth(samples) <= SLOW_LATE_GROWTH, (
        f"{label}: {what} keeps growing; after each chunk of the run: {samples.tolist()} bytes")


def rss_available():
    return rss_bytes() is not None and not under_asan()


# ------------------------------------------------------- (a) no growth

# One case per optimizer class (its richest in state), 100k steps each.
@pytest.mark.parametrize("case", spec.richest_cases(), ids=spec.case_id)
def test_100k_fast_path_steps_do_not_grow_memory(case):
    name, cls, kwargs = case
    params, grads = make_model()
    opt = cls(params, **kwargs)
    opt.step(grads)
    # The configuration really runs on the Cython fast path (this is a step
    # too), rules with per-parameter scalars (NAdam's mu_product) included.
    assert opt._make_stepper()(grads) is True

    def step():
        opt.step(grads)

    check_flat(growth(step, STEPS, traced=True), name, "tracemalloc's total", FAST_TRACED_TOTAL)
    if rss_available():
        check_flat(growth(step, STEPS, traced=False), name, "RSS", FAST_RSS_TOTAL)
    if not spec.rule(cls).whole_arrays:
        # (Lamb's steps scale with ||p||: under one constant gradient p grows
        # geometrically and overflows within 10k steps, in optax too.)
        assert all(np.isfinite(p).all() for p in params)


def _dict_grads():
    params, grads = make_model()
    opt = fastopt.Adam(dict(zip("abc", params)), lr=1e-3)
    grad_dict = dict(zip("abc", grads))
    return lambda: opt.step(grad_dict)


def _none_grad():
    params, grads = make_model()
    opt = fastopt.Adam(params, lr=1e-3)
    some = [grads[0], None, grads[2]]
    return lambda: opt.step(some)


def _raising():
    params, grads = make_model()
    opt = fastopt.Adam(params, lr=1e-3)
    opt.step(grads)
    bad = [grads[0], grads[1], grads[2].astype(np.float64)]  # wrong dtype, last

    def step():
        try:
            opt.step(bad)
        except TypeError:
            return
        raise AssertionError("the bad step did not raise")
    return step


def _skip_nonfinite():
    params, grads = make_model()
    opt = fastopt.Adam(params, lr=1e-3, skip_nonfinite=True)
    return lambda: opt.step(grads)


def _low_level_kernel():
    params, grads = make_model()
    p, g = params[0], grads[0]
    m, v = np.zeros_like(p), np.zeros_like(p)
    return lambda: kernels.adam(p, g, m, v, step=10)


def _clip_and_accumulate():
    _, grads = make_model()
    buffers = [np.zeros_like(g) for g in grads]
    acc = fastopt.GradientAccumulator(buffers, steps=2)

    def step():
        acc.add(grads)
        fastopt.clip_grad_norm(buffers, 1e-4)
        acc.reset()
    return step


def _sparse_rows():
    # the row plans (sorted indices, merge buffer) and SGD's zeroed scratch are
    # kept and reused: a steady run of sparse steps allocates nothing that stays
    rng = np.random.default_rng(0)
    tables = [np.zeros((1000, 16)), np.zeros((1000, 16))]
    lazy, dense = fastopt.SparseAdam(tables[:1]), fastopt.SGD(tables[1:], lr=0.1, momentum=0.9)
    g = fastopt.SparseRows(rng.integers(0, 1000, 512), rng.standard_normal((512, 16)))

    def step():
        lazy.step([g])
        dense.step([g])
    return step


OTHER_PATHS = {"dict-grads": _dict_grads, "sparse-rows": _sparse_rows, "none-grad-slow-path": _none_grad,
               "raising-step": _raising, "skip-nonfinite": _skip_nonfinite,
               "low-level-kernel": _low_level_kernel, "clip-accumulate": _clip_and_accumulate}


@pytest.mark.parametrize("name", OTHER_PATHS)
def test_other_paths_do_not_grow_memory(name):
    samples = growth(OTHER_PATHS[name](), OTHER_STEPS, traced=True)
    check_not_growing(samples, name, "tracemalloc's total")


def test_low_level_kernel_frees_its_workspace():
    """A C leak per call (the Workspace's slot array is malloc'd) shows in RSS."""
    if not rss_available():
        pytest.skip("needs /proc/self/statm, and no ASan quarantine")
    samples = growth(_low_level_kernel(), 6 * OTHER_STEPS, traced=False)
    check_flat(samples, "kernels.adam", "RSS", FAST_RSS_TOTAL)


def test_sparse_row_plans_are_reused():
    """The row plans are malloc'd in C: a plan made per step would show in RSS."""
    if not rss_available():
        pytest.skip("needs /proc/self/statm, and no ASan quarantine")
    samples = growth(_sparse_rows(), 6 * OTHER_STEPS, traced=False)
    # A Python path: the allocator's one-offs show in RSS (see SLOW_LATE_GROWTH);
    # a plan leaked per step (>= 300 KiB for these 512 indices) would go on growing.
    assert late_growth(samples) <= SLOW_LATE_GROWTH, (
        f"sparse rows: RSS keeps growing; after each chunk of the run: {samples.tolist()}")


def test_measuring_would_see_a_leak():
    """The bounds are not too loose: one small object kept per step fails them."""
    kept = []
    samples = growth(lambda: kept.append(bytes(1)), OTHER_STEPS, traced=True)
    with pytest.raises(AssertionError):
        check_not_growing(samples, "leak", "memory")
    kept.clear()
    samples = growth(lambda: kept.append(bytes(1)), STEPS // 10, traced=True)
    with pytest.raises(AssertionError):
        check_flat(samples, "leak", "memory", FAST_TRACED_TOTAL)
    # ... and a one-off of 16 MiB after warm-up alone does not.
    kept.clear()
    calls = iter(range(10 * STEPS))
    samples = growth(lambda: kept.append(bytes(16 << 20)) if next(calls) == WARMUP + 1234 else None,
                     OTHER_STEPS, traced=True)
    assert samples.max() >= 16 << 20
    check_not_growing(samples, "one-off", "memory")


# ------------------------------------------------------- (b) refcounts

def watched_objects(opt, params, grads):
    """Every array a step touches: params, grads, state buffers and their packed blocks."""
    objs = list(params) + list(grads)
    for entry in opt.state.values():
        for value in entry.values():
            if isinstance(value, np.ndarray):
                objs.append(value)
                if value.base is not None:
                    objs.append(value.base)
    objs.append(grads)  # the list itself
    return objs


def refcounts(objs):
    return [sys.getrefcount(o) for o in objs]


def state_arrays(opt):
    """ids of the state buffers and the packed blocks under them."""
    ids = set()
    for entry in opt.state.values():
        for value in entry.values():
            if isinstance(value, np.ndarray):
                ids.add(id(value))
                if value.base is not None:
                    ids.add(id(value.base))
    return ids


def changed(objs, before, may_drop=frozenset()):
    """Objects whose count moved: ``(index, type, before, after)``.

    A leak is a count that went up. An object whose id is in ``may_drop``
    may also be one lower: the reference the optimizer's workspace cache
    holds to a state buffer may be let go while steps take the Python path
    (it is taken again by the next fast step, where counts must be exact).
    """
    after = refcounts(objs)
    return [(i, type(o).__name__, b, a) for i, (o, b, a) in enumerate(zip(objs, before, after))
            if not (b - (id(o) in may_drop)) <= a <= b]


@pytest.mark.parametrize("case", spec.optimizer_cases(), ids=spec.case_id)
def test_fast_path_steps_keep_refcounts(case):
    _, cls, kwargs = case
    params, grads = make_model()
    opt = cls(params, **kwargs)
    opt.step(grads)
    opt.step(grads)  # state exists, workspaces cached
    objs = watched_objects(opt, params, grads)
    if spec.buffers_for(cls, kwargs):
        assert len(objs) > len(params) + len(grads) + 1  # the state buffers are watched
    before = refcounts(objs)
    for _ in range(1000):
        opt.step(grads)
    assert not changed(objs, before)


@pytest.mark.parametrize("case", spec.optimizer_cases(), ids=spec.case_id)
def test_slow_path_steps_keep_refcounts(case):
    _, cls, kwargs = case
    params, grads = make_model()
    opt = cls(params, **kwargs)
    opt.step(grads)
    opt.step(grads)
    some = [grads[0], None, grads[2]]
    objs = watched_objects(opt, params, grads) + [some]
    before = refcounts(objs)
    for _ in range(200):
        opt.step(some)  # parameter 1 has no gradient: the Python path
    opt.step(grads)  # counted rules: uneven step counts keep it on the Python path
    assert not changed(objs, before, may_drop=state_arrays(opt))


def test_dict_grads_keep_refcounts():
    params, grads = make_model()
    opt = fastopt.Adam(dict(zip("abc", params)), lr=1e-3)
    grad_dict = dict(zip("abc", grads))
    opt.step(grad_dict)
    opt.step(grad_dict)  # state exists, workspaces cached
    objs = watched_objects(opt, params, grads) + [grad_dict]
    before = refcounts(objs)
    for _ in range(200):
        opt.step(grad_dict)  # not a list: the Python path, gathered by the screen
    assert not changed(objs, before)


def test_skip_nonfinite_keeps_refcounts():
    params, grads = make_model()
    opt = fastopt.Adam(params, lr=1e-3, skip_nonfinite=True)
    opt.step(grads)
    opt.step(grads)  # state exists, workspaces cached
    bad = [g.copy() for g in grads]
    bad[1][0] = np.nan
    objs = watched_objects(opt, params, grads) + bad
    before = refcounts(objs)
    for _ in range(100):
        opt.step(grads)
        opt.step(bad)  # skipped
    assert opt.skipped_steps == 100
    assert not changed(objs, before)


def _bad_dtype(opt, params, grads):
    return [grads[0], grads[1], grads[2].astype(np.float64)], TypeError


def _bad_shape(opt, params, grads):
    return [grads[0], grads[1].reshape(4, 4), grads[2]], ValueError


def _grad_is_param(opt, params, grads):
    return [grads[0], grads[1], params[2]], ValueError


def _grad_is_state(opt, params, grads):
    buffer = next(v for v in opt.state[2].values() if isinstance(v, np.ndarray))
    return [grads[0], grads[1], buffer], ValueError


def _too_few(opt, params, grads):
    return grads[:2], ValueError


def _non_contiguous(opt, params, grads):
    return [grads[0], np.repeat(grads[1], 2)[::2], grads[2]], ValueError


def _not_a_list(opt, params, grads):
    return set(), TypeError


ERRORS = {"dtype": _bad_dtype, "shape": _bad_shape, "grad-is-param": _grad_is_param,
          "grad-is-state": _grad_is_state, "too-few": _too_few,
          "non-contiguous": _non_contiguous, "not-a-list": _not_a_list}


@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("case", spec.richest_cases(), ids=spec.case_id)
def test_raising_steps_keep_refcounts(case, error):
    _, cls, kwargs = case
    params, grads = make_model()
    opt = cls(params, **kwargs)
    opt.step(grads)
    opt.step(grads)
    bad, exc = ERRORS[error](opt, params, grads)
    objs = watched_objects(opt, params, grads) + [bad]
    arrays = [o for o in objs if isinstance(o, np.ndarray)]
    snapshot = [a.tobytes() for a in arrays]
    before = refcounts(objs)
    for _ in range(100):
        with pytest.raises(exc):
            opt.step(bad)
    assert not changed(objs, before, may_drop=state_arrays(opt))
    assert [a.tobytes() for a in arrays] == snapshot  # and nothing was modified
    for _ in range(10):
        opt.step(grads)  # back on the fast path
    assert not changed(objs, before)


def test_raising_on_edited_state_or_group_keeps_refcounts():
    params, grads = make_model()
    opt = fastopt.Adam(params, lr=1e-3)
    opt.step(grads)
    opt.step(grads)
    objs = watched_objects(opt, params, grads)
    before = refcounts(objs)
    # A bad hyperparameter (edited group), then a bad state buffer (edited state).
    opt.param_groups[0]["lr"] = -1.0
    for _ in range(50):
        with pytest.raises(ValueError, match="lr"):
            opt.step(grads)
    opt.param_groups[0]["lr"] = 1e-3
    good = opt.state[1]["exp_avg"]
    opt.state[1]["exp_avg"] = np.zeros(3, good.dtype)
    for _ in range(50):
        with pytest.raises(ValueError, match="exp_avg"):
            opt.step(grads)
    opt.state[1]["exp_avg"] = good
    del good
    params[0].flags.writeable = False
    for _ in range(50):
        with pytest.raises(ValueError, match="read-only"):
            opt.step(grads)
    params[0].flags.writeable = True
    for _ in range(10):
        opt.step(grads)
    assert not changed(objs, before)


def test_low_level_kernels_keep_refcounts():
    params, grads = make_model()
    p, g = params[0], grads[0]
    m, v, mx, buf = (np.zeros_like(p) for _ in range(4))
    objs = [p, g, m, v, mx, buf]
    before = refcounts(objs)
    for step in range(1, 201):
        kernels.adam(p, g, m, v, mx, step=step, amsgrad=True)
        kernels.sgd(p, g, buf, momentum=0.9, first_step=step == 1)
        with pytest.raises(ValueError):
            kernels.adam(p, g, m, v, step=step, amsgrad=True)  # max_exp_avg_sq missing
        with pytest.raises(ValueError):
            kernels.sgd(p, p, buf, momentum=0.9)  # g is p
    assert not changed(objs, before)


# ------------------------------------------- (c) no grad kept alive by a cache

@pytest.mark.parametrize("path", ["fast", "none-grad"])
def test_workspace_keeps_no_grad_alive_and_never_reads_a_dead_one(path):
    rng = np.random.default_rng(1)
    params, _ = make_model(sizes=FREED_SIZES)
    sequence = [[rng.standard_normal(p.shape).astype(p.dtype) for p in params] for _ in range(6)]
    if path == "none-grad":
        for grads in sequence[2:4]:
            grads[1] = None

    opt = fastopt.Adam(params, lr=1e-2)
    ref_params = [p.copy() for p in params]
    ref = fastopt.Adam(ref_params, lr=1e-2, backend="numpy")
    refs = []
    for grads in sequence:
        # Fresh arrays every step, dropped right after it: the workspace's
        # pointers from the last step dangle when the next one runs.
        g = tracked(grads)
        present = [t for t in g if t is not None]
        refs += [weakref.ref(t) for t in present]
        counts = [sys.getrefcount(t) for t in present]
        opt.step(g)
        assert [sys.getrefcount(t) for t in present] == counts
        del g, present
        # No gc.collect(): not even a reference cycle may hold a grad.
        assert all(r() is None for r in refs), "a gradient outlived its step"
        ref.step(grads)
    for p, q in zip(params, ref_params):
        assert p.tobytes() == q.tobytes()
    for i, entry in opt.state.items():
        for key, value in entry.items():
            other = ref.state[i][key]
            assert (value.tobytes() == other.tobytes()) if isinstance(value, np.ndarray) \
                else value == other


def test_accumulator_clip_and_kernels_keep_no_grad_alive():
    params, grads = make_model(sizes=FREED_SIZES)
    buffers = [np.zeros_like(g) for g in grads]
    acc = fastopt.GradientAccumulator(buffers, steps=2)
    g = tracked(grads)
    refs = [weakref.ref(x) for x in g]
    acc.add(g)
    fastopt.clip_grad_norm(g, 1e-3)
    fastopt.grad_norm(g)
    fastopt.clip_grad_value(g, 1e-4)
    p = params[0]
    m, v = np.zeros_like(p), np.zeros_like(p)
    kernels.adam(p, g[0], m, v, step=1)
    del g
    assert all(r() is None for r in refs)
    acc.add(tracked(grads))  # the accumulator's workspace is refilled, never stale
    for b, x in zip(buffers, grads):
        half = x.dtype.type(0.5)
        expected = (np.zeros_like(x) + half * x) + half * x
        assert b.tobytes() == expected.tobytes()


def test_replaced_state_buffers_are_released():
    params, grads = make_model()
    opt = fastopt.Adam(params, lr=1e-3)
    opt.step(grads)
    opt.step(grads)
    old = [weakref.ref(v.base if v.base is not None else v)
           for entry in opt.state.values() for v in entry.values() if isinstance(v, np.ndarray)]
    opt.load_state_dict(opt.state_dict())
    opt.step([grads[0], None, grads[2]])  # a step on the Python path
    gc.collect()
    assert all(r() is None for r in old), "old state buffers are still alive"
