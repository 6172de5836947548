"""fastopt.torch under torch.distributed: DDP and ZeroRedundancyOptimizer, 2 gloo processes.

Two worker processes (this file run as a script) train the same small float64
MLP on the same global batches, each on its half of every batch, once per case
in CASES, over one gloo process group on 127.0.0.1. The parent trains the same
model on the whole batches in one process and checks that the parameters and
the optimizer state agree. fastopt adds no communication: DDP averages the
gradients before ``step()``, and ZeroRedundancyOptimizer steps each rank's
shard with the fastopt optimizer and broadcasts the result.

Every wait is bounded: the process group has a 60 s timeout, and the parent
kills the workers as soon as one fails, or after WORKER_TIMEOUT seconds. One
launch serves every case (the workers spend most of their ~3 s importing torch).
"""
import datetime
import os
import socket
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import fastopt.torch as ft  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

WORLD = 2
STEPS, BATCH, N_IN, N_HIDDEN, N_OUT = 6, 8, 6, 16, 2   # BATCH samples per global batch
PG_TIMEOUT = datetime.timedelta(seconds=60)
WORKER_TIMEOUT = 120
# (mode, optimizer, its kwargs, kwargs of DDP or of ZeroRedundancyOptimizer)
CASES = [
    ("ddp", "SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-3), {}),
    ("ddp", "Adam", dict(lr=0.01), {}),
    ("ddp", "AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True), {}),
    ("ddp", "Adam", dict(lr=0.01), dict(gradient_as_bucket_view=True)),
    ("zero", "Adam", dict(lr=0.01), {}),
    ("zero", "AdamW", dict(lr=0.01, weight_decay=0.1), dict(parameters_as_bucket_view=True)),
]
# The two runs do the same arithmetic except for how a batch's gradient is
# summed: the reference sums 8 samples in one matmul, the workers sum 4 each,
# DDP halves both sums (exact) and gloo adds them (a + b, the same on both
# ranks). So the results differ by a few float64 roundings per step, relative
# to the gradient, never by a real discrepancy: 1e-12 of the total change of a
# tensor (or of a state buffer's size) leaves ~1000x room above the ~1e-15
# measured and still catches any wrong step, lost update or doubled gradient.
RTOL = 1e-12


def case_id(case):
    mode, name, kwargs, wrapper = case
    return "-".join([mode, name] + [f"{k}={v}" for k, v in {**kwargs, **wrapper}.items()])


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(  # tanh, not relu: no gradient sits at exactly zero
        torch.nn.Linear(N_IN, N_HIDDEN), torch.nn.Tanh(),
        torch.nn.Linear(N_HIDDEN, N_HIDDEN), torch.nn.Tanh(),
        torch.nn.Linear(N_HIDDEN, N_OUT),
    ).double()


def global_batches():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(STEPS, BATCH, N_IN, dtype=torch.float64, generator=gen)
    y = torch.randn(STEPS, BATCH, N_OUT, dtype=torch.float64, generator=gen)
    return X, y


def train(model, opt, X, y):
    """Mean-squared-error steps; with DDP the mean over a rank's half, averaged over ranks."""
    for Xb, yb in zip(X, y):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(Xb), yb).backward()
        opt.step()


# -- the worker: `python test_torch_distributed.py RANK PORT OUT_DIR` --------

def worker(rank, port, out_dir):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=PG_TIMEOUT)
    try:
        X, y = global_batches()
        half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        results = {}
        for case in CASES:
            mode, name, kwargs, wrapper = case
            model = make_model()
            ddp = DDP(model, **(wrapper if mode == "ddp" else {}))
            if mode == "ddp":
                opt = getattr(ft, name)(ddp.parameters(), **kwargs)
            else:
                opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=getattr(ft, name),
                                              **wrapper, **kwargs)
            train(ddp, opt, X[:, half], y[:, half])
            if mode == "zero":
                owned = sum(len(g["params"]) for g in opt.optim.param_groups)
                opt.consolidate_state_dict(to=0)   # a collective: every rank calls it
                state = opt.state_dict() if rank == 0 else None
            else:
                owned = None
                state = opt.state_dict()
            results[case_id(case)] = {
                "params": [p.detach().clone() for p in model.parameters()],
                "state": state, "owned": owned,
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# -- the parent ---------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir):
    """Runs the WORLD workers to the end; returns each one's exit code (< 0: killed) and stderr.

    A worker that fails makes the parent kill the others at once rather than
    leave them waiting for it until the process group's timeout.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        loopback = [name for _, name in socket.if_nameindex() if name in ("lo", "lo0")]
    except (AttributeError, OSError):
        loopback = []
    if loopback and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = loopback[0]   # gloo's own connections on 127.0.0.1 too
    port = free_port()
    procs, logs = [], [out_dir / f"rank{rank}.err" for rank in range(WORLD)]
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), str(rank), str(port), str(out_dir)],
                    env=env, cwd=out_dir, stdout=subprocess.DEVNULL, stderr=err))
        deadline = time.monotonic() + WORKER_TIMEOUT
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs]
            if None not in codes or any(code for code in codes):
                break
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return [(proc.returncode, log.read_text()) for proc, log in zip(procs, logs)]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    for attempt in range(3):
        out_dir = tmp_path_factory.mktemp("ddp")
        outcome = launch(out_dir)
        if all(code == 0 for code, _ in outcome):
            return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]
        errors = "\n".join(f"--- rank {rank} (exit {code})\n{err[-3000:]}"
                           for rank, (code, err) in enumerate(outcome))
        if "address already in use" not in errors.lower():   # else another process took the port
            break
    pytest.fail(f"the {WORLD} workers did not all succeed (one failing, or {WORKER_TIMEOUT} s, "
                f"stops them all):\n{errors}")


def reference(name, kwargs, module=ft):
    model = make_model()
    opt = getattr(module, name)(model.parameters(), **kwargs)
    train(model, opt, *global_batches())
    return [p.detach() for p in model.parameters()], opt.state_dict()


def max_scaled_diff(a, b, scale):
    return ((a - b).abs().max() / scale.abs().max()).item()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_two_processes_train_like_one(case, worker_results):
    mode, name, kwargs, _ = case
    ranks = [r[case_id(case)] for r in worker_results]
    start = [p.detach() for p in make_model().parameters()]
    want, want_state = reference(name, kwargs)

    # The replicas are in sync: both ranks applied the same averaged update
    # (DDP) or received the owner's parameters (ZeRO's broadcast).
    for k, (p0, p1) in enumerate(zip(ranks[0]["params"], ranks[1]["params"])):
        assert torch.equal(p0, p1), f"parameter {k} differs between the ranks"
    if mode == "zero":   # each rank stepped its own shard: both did some of the work
        assert all(r["owned"] > 0 for r in ranks) and sum(r["owned"] for r in ranks) == len(start)

    for k, (got, ref, p0) in enumerate(zip(ranks[0]["params"], want, start)):
        change = ref - p0
        assert change.abs().min() > 0   # every entry trained: the comparison is not vacuous
        assert max_scaled_diff(got, ref, change) <= RTOL, f"parameter {k}"

    # The optimizer state: ZeRO's consolidated state_dict has the reference's layout.
    got_state = ranks[0]["state"]["state"]
    assert sorted(got_state) == sorted(want_state["state"]) == list(range(len(start)))
    for k, ref in want_state["state"].items():
        assert sorted(got_state[k]) == sorted(ref)
        for key, value in ref.items():
            if key == "step":
                assert torch.equal(got_state[k][key], value), f"state[{k}]['step']"
            else:
                assert max_scaled_diff(got_state[k][key], value, value) <= RTOL, f"state[{k}][{key!r}]"


@pytest.mark.parametrize("name, kwargs", sorted({(c[1], tuple(c[2].items())) for c in CASES}),
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v))
def test_reference_matches_torch_optim(name, kwargs):
    """The single-process reference itself agrees with torch.optim (sanity check)."""
    kwargs = dict(kwargs)
    mine, _ = reference(name, kwargs)
    theirs, _ = reference(name, kwargs, module=torch.optim)
    start = [p.detach() for p in make_model().parameters()]
    for a, b, p0 in zip(mine, theirs, start):
        assert max_scaled_diff(a, b, b - p0) <= RTOL


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
