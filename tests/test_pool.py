"""src_c/pool.h: the thread pool every multi-threaded pass runs on.

* A step large enough to run in parallel does: the pool counts the job, its
  chunks, and the chunks the calling thread ran itself (it works too).
* Chunks never change a result: 1, 2 and 3 threads, and chunkings from one
  chunk per thread to thousands of tiny ones (threads then steal from each
  other's shares), give the bits of one.
* A job's chunks are a multiple of its threads (even shares), at most
  chunks_per_thread each.
* Steps from several Python threads at once (the pool runs one job at a
  time; the others run on their own thread) give the bits of serial steps.
* A forked child starts with no workers and steps in parallel correctly.
* A step that is too small for threads never reaches the pool.

Timing behaviour (stalls under a busy core) is measured by
bench/contention.py, not here: machines are shared and noisy.
"""
import threading

import numpy as np
import pytest

import fastopt
from fastopt import _dispatch

from test_dispatch import last_json, run_python

N = 1_000_003   # an odd size: the last chunk is short


@pytest.fixture
def threads():
    """set_num_threads for the test; the cap is restored after it."""
    before = fastopt.get_num_threads()
    yield fastopt.set_num_threads
    fastopt.set_num_threads(before)


@pytest.fixture
def chunking():
    """set_chunking on the active level for the test; restored after it."""
    module = _dispatch._active["module"]
    before = module.get_chunking()
    yield module.set_chunking
    module.set_chunking(*before)


def adam_run(n, steps, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(steps)]
    opt = fastopt.Adam([p], lr=1e-2, weight_decay=0.1)
    for g in grads:
        opt.step([g])
    return p, opt


FIRST_STEP_SCRIPT = """
    import json
    import numpy as np
    import fastopt
    from fastopt import _dispatch
    fastopt.set_num_threads(2)
    p = np.zeros(1_000_003, np.float32)
    fastopt.Adam([p], lr=1e-2).step([np.ones_like(p)])
    print(json.dumps({**_dispatch.pool_stats(), "moved": bool((p == -1e-2).all()),
                      "pool": _dispatch.config()["thread_pool"]}))
"""


def test_a_large_step_runs_in_parallel_and_the_caller_works_too(tmp_path):
    # In a fresh interpreter: this process's pool may be backing off after a
    # stall (a worker preempted on a busy machine), and then it runs serially.
    out = last_json(run_python(FIRST_STEP_SCRIPT, tmp_path))
    assert out["moved"], out
    if out["pool"] != "pthreads":
        pytest.skip("the OpenMP fallback keeps no counts")
    assert out["jobs"] == out["parallel"] == 1, out
    assert out["chunks"] >= 2 and 1 <= out["caller_chunks"] <= out["chunks"], out


def test_counts_stay_consistent(threads):
    threads(2)
    before = _dispatch.pool_stats()
    adam_run(N, steps=3)
    after = _dispatch.pool_stats()
    delta = {key: after[key] - before[key] for key in after}
    assert delta["jobs"] == 3, delta
    assert 0 <= delta["stalls"] <= delta["parallel"] <= delta["jobs"], delta
    assert delta["caller_chunks"] <= delta["chunks"], delta


def test_a_small_step_does_not_reach_the_pool(threads):
    threads(2)
    before = _dispatch.pool_stats()["jobs"]
    adam_run(1000, steps=3)
    assert _dispatch.pool_stats()["jobs"] == before


def test_thread_count_never_changes_the_bits(threads):
    results = []
    for count in (1, 2, 3):
        threads(count)
        results.append(adam_run(N, steps=4)[0])
    for other in results[1:]:
        np.testing.assert_array_equal(other.view(np.uint32), results[0].view(np.uint32))


@pytest.mark.parametrize("count", [2, 3])
def test_chunks_are_even_shares(threads, count):
    if _dispatch.config()["thread_pool"] != "pthreads":
        pytest.skip("the OpenMP fallback keeps no counts")
    threads(count)
    # A step runs on at most OpenMP's limit too (threadpoolctl's lands there).
    count = min(count, _dispatch.config()["omp_max_threads"])
    per_thread, _ = _dispatch._active["module"].get_chunking()
    for _ in range(50):     # a job after a stall runs serially: find a parallel one
        before = _dispatch.pool_stats()
        adam_run(N, steps=1)
        delta = {key: value - before[key] for key, value in _dispatch.pool_stats().items()}
        if delta["parallel"]:
            break
    else:
        pytest.skip("every job ran serially (the pool is backing off on a busy machine)")
    assert delta["chunks"] % count == 0 and delta["chunks"] <= count * per_thread, delta


@pytest.mark.parametrize("per_thread, min_work", [(1, 1), (64, 1), (4096, 1)])
def test_chunking_never_changes_the_bits(threads, chunking, per_thread, min_work):
    def run():
        # Adam (one elementwise pass) and Lamb with clipping (block sums of
        # the gradient and of the update, then the update): every pool job.
        rng = np.random.default_rng(0)
        params = [rng.standard_normal(N).astype(np.float32) for _ in range(2)]
        adam = fastopt.Adam(params[:1], lr=1e-2, weight_decay=0.1)
        lamb = fastopt.Lamb(params[1:], lr=1e-2, max_grad_norm=1.0)
        for _ in range(3):
            adam.step([rng.standard_normal(N).astype(np.float32)])
            lamb.step([rng.standard_normal(N).astype(np.float32)])
        return params

    threads(1)
    want = run()
    chunking(per_thread, min_work)
    for count in (2, 3):
        threads(count)
        for got, ref in zip(run(), want):
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_steps_from_several_python_threads_at_once(threads):
    threads(2)
    serial = [adam_run(N // 4, steps=6, seed=s)[0] for s in range(3)]
    out = [None] * 3

    def work(i):
        out[i] = adam_run(N // 4, steps=6, seed=i)[0]

    workers = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for got, want in zip(out, serial):
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


FORK_SCRIPT = """
    import json, os
    import numpy as np
    import fastopt
    fastopt.set_num_threads(2)
    def run():
        rng = np.random.default_rng(0)
        p = rng.standard_normal(1_000_003).astype(np.float32)
        opt = fastopt.Adam([p], lr=1e-2)
        for _ in range(3):
            opt.step([rng.standard_normal(p.size).astype(np.float32)])
        return p
    parent = run()                      # the parent's pool has a worker now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                        # the child inherits no worker thread
        child = run()
        os.write(write, b"1" if child.tobytes() == parent.tobytes() else b"0")
        os._exit(0)
    os.close(write)
    same = os.read(read, 1) == b"1"
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"same": same, "status": status}))
"""


def test_a_forked_child_steps_in_parallel_correctly(tmp_path):
    if not hasattr(__import__("os"), "fork"):
        pytest.skip("no fork here")
    out = last_json(run_python(FORK_SCRIPT, tmp_path))
    assert out == {"same": True, "status": 0}, out


def test_config_names_the_thread_pool():
    assert _dispatch.config()["thread_pool"] in {"pthreads", "openmp"}
