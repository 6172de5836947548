"""fastopt.checkpoint: optimizer and scheduler checkpoints."""
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import fastopt
from fastopt.lr_scheduler import CosineAnnealingLR, OneCycleLR, ReduceLROnPlateau, StepLR

import spec  # tests/spec.py: tests/ is on sys.path under pytest


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(7).astype(np.float32), rng.standard_normal((3, 4)),
            rng.standard_normal(5).astype(np.float32)]


def grad_seq(steps, seed=1):
    rng = np.random.default_rng(seed)
    seq = []
    for k in range(steps):
        grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in make_params()]
        if k == 2:
            grads[1] = None  # uneven step counts must survive
        seq.append(grads)
    return seq


def build(cls, kwargs, params):
    return cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], **kwargs)


def snapshot(opt, params):
    return [p.copy() for p in params], opt.state_dict()


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        np.testing.assert_array_equal(x, y)
    assert a[1]["param_groups"] == b[1]["param_groups"]
    assert a[1]["state"].keys() == b[1]["state"].keys()
    for i in a[1]["state"]:
        for k, v in a[1]["state"][i].items():
            np.testing.assert_array_equal(v, b[1]["state"][i][k])


@pytest.mark.parametrize("case", spec.optimizer_cases(), ids=spec.case_id)
def test_save_load_continues_bit_identically(tmp_path, case):
    _, cls, kwargs = case
    seq = grad_seq(8)
    straight = make_params()
    opt = build(cls, kwargs, straight)
    for grads in seq:
        opt.step(grads)

    resumed = make_params()
    first = build(cls, kwargs, resumed)
    for grads in seq[:4]:
        first.step(grads)
    first.save(tmp_path / "opt.npz")
    # Two ways back: into an optimizer built by hand, and load_optimizer.
    by_hand = build(cls, {}, resumed)  # hyperparameters come from the file
    by_hand.load(tmp_path / "opt.npz")
    other = [p.copy() for p in resumed]
    loaded = fastopt.load_optimizer(tmp_path / "opt.npz", other)
    assert type(loaded) is cls
    for grads in seq[4:]:
        by_hand.step(grads)
        loaded.step(grads)
    assert_same(snapshot(opt, straight), snapshot(by_hand, resumed))
    assert_same(snapshot(opt, straight), snapshot(loaded, other))


def test_zero_dimensional_params_keep_their_shape(tmp_path):
    # a 0-d parameter's state is 0-d too (np.ascontiguousarray would store it 1-d)
    params = [np.array(0.5), np.zeros(3)]
    opt = fastopt.Adam(params, lr=0.1)
    opt.step([np.array(1.0), np.ones(3)])
    opt.save(tmp_path / "ckpt")
    loaded = fastopt.load_optimizer(tmp_path / "ckpt", [p.copy() for p in params])
    assert loaded.state[0]["exp_avg"].shape == ()
    np.testing.assert_array_equal(loaded.state[0]["exp_avg_sq"], opt.state[0]["exp_avg_sq"])


def test_named_params_round_trip(tmp_path):
    params = dict(zip("abc", make_params()))
    opt = fastopt.Adam(params, lr=0.1)
    opt.step({k: np.ones_like(v) for k, v in params.items()})
    opt.save(tmp_path / "named.npz")
    loaded = fastopt.load_optimizer(tmp_path / "named.npz", {k: v.copy() for k, v in params.items()})
    assert loaded.param_groups[0]["param_names"] == ["a", "b", "c"]
    assert loaded.state[2]["step"] == 1


RESUME_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, fastopt
    from fastopt.lr_scheduler import CosineAnnealingLR
    phase, folder = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(1001).astype(np.float32), rng.standard_normal((30, 7))]
    grads = [[(rng.standard_normal(p.shape)).astype(p.dtype) for p in params] for _ in range(40)]
    opt = fastopt.AdamW(params, lr=0.01, amsgrad=True)
    sched = CosineAnnealingLR(opt, T_max=40)
    steps = range(40)
    if phase == "second":
        for p, saved in zip(params, np.load(folder + "/params.npz").values()):
            p[...] = saved
        opt.load(folder + "/opt.npz")
        sched.load(folder + "/sched.json")
        steps = range(20, 40)
    for k in steps:
        if phase == "first" and k == 20:
            opt.save(folder + "/opt.npz")
            sched.save(folder + "/sched.json")
            np.savez(folder + "/params.npz", *params)
            sys.exit(0)
        opt.step(grads[k])
        sched.step()
    np.savez(folder + f"/final-{phase}.npz", *params)
""")


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    for phase in ("whole", "first", "second"):
        subprocess.run([sys.executable, str(script), phase, str(tmp_path)], cwd=tmp_path,
                       check=True, timeout=120)
    whole = np.load(tmp_path / "final-whole.npz")
    second = np.load(tmp_path / "final-second.npz")
    for key in whole.files:
        np.testing.assert_array_equal(whole[key], second[key])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    params = make_params()
    opt = fastopt.Adam(params)
    opt.step([np.ones_like(p) for p in params])
    path = tmp_path / "opt.npz"
    opt.save(path)
    good = path.read_bytes()

    def crash(f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        opt.save(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["opt.npz"]  # no temporary file left behind


def _saved(tmp_path, opt_cls=fastopt.Adam, params=None):
    params = params or make_params()
    opt = opt_cls(params)
    opt.step([np.ones_like(p) for p in params])
    path = tmp_path / "opt.npz"
    opt.save(path)
    return path


def _rewrite(path, change):
    """Rewrite a checkpoint with change(members) applied to its members (name -> bytes)."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    change(members)
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)


def _edit_meta(members, edit):
    arr = np.load(io.BytesIO(members["meta.json.npy"]))
    meta = json.loads(arr.tobytes().decode())
    edit(meta)
    buf = io.BytesIO()
    np.save(buf, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    members["meta.json.npy"] = buf.getvalue()


BAD = {
    "other optimizer": (lambda p: None, fastopt.SGD, ValueError, "holds an Adam optimizer, not an SGD"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:200]), fastopt.Adam, ValueError, "truncated or corrupt"),
    "garbage": (lambda p: p.write_bytes(b"not a zip at all" * 10), fastopt.Adam, ValueError, "truncated or corrupt|not a readable"),
    "newer format": (lambda p: _rewrite(p, lambda m: _edit_meta(m, lambda meta: meta.update(format_version=99))),
                     fastopt.Adam, ValueError, "newer than this fastopt"),
    "other shapes": (lambda p: _rewrite(p, lambda m: _edit_meta(m, lambda meta: meta["params"][1].update(shape=[4, 3]))),
                     fastopt.Adam, ValueError, "parameter 1 was"),
    "missing array": (lambda p: _rewrite(p, lambda m: m.pop("state/0/exp_avg.npy")), fastopt.Adam, ValueError, "incomplete"),
    "pickled objects": (lambda p: np.savez(p, **{"meta.json": np.array([{"a": 1}], dtype=object)}),
                        fastopt.Adam, ValueError, "pickled"),
    "not fastopt": (lambda p: np.savez(p, x=np.zeros(3)), fastopt.Adam, ValueError, "not a fastopt"),
    "bad state shape": (lambda p: _rewrite(p, lambda m: m.update({"state/0/exp_avg.npy": _npy(np.zeros(3, np.float32))})),
                        fastopt.Adam, ValueError, "has shape"),
}


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("name", BAD)
def test_bad_checkpoints_are_refused_and_change_nothing(tmp_path, name):
    corrupt, cls, error, message = BAD[name]
    path = _saved(tmp_path)
    corrupt(path)
    params = make_params(5)
    opt = cls(params, lr=0.123)
    opt.step([np.ones_like(p) for p in params])
    before = snapshot(opt, params)
    with pytest.raises(error, match=message):
        opt.load(path)
    assert_same(snapshot(opt, params), before)


def test_different_parameter_count_is_refused(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(ValueError, match="has 3 parameters, the optimizer has 2"):
        fastopt.Adam(make_params()[:2]).load(path)
    with pytest.raises(ValueError, match="do not fit"):
        fastopt.load_optimizer(path, make_params()[:2])


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastopt.Adam(make_params()).load(tmp_path / "nope.npz")


@pytest.mark.parametrize("make", [
    lambda opt: StepLR(opt, 3, gamma=0.5),
    lambda opt: CosineAnnealingLR(opt, T_max=10, eta_min=0.001),
    lambda opt: OneCycleLR(opt, max_lr=0.5, total_steps=30),
    lambda opt: ReduceLROnPlateau(opt, patience=1),
], ids=["step", "cosine", "onecycle", "plateau"])
def test_scheduler_checkpoint_resumes(tmp_path, make):
    def run(resume_at=None):
        opt = fastopt.SGD([np.zeros(2)], lr=0.1, momentum=0.9)
        sched = make(opt)
        lrs = []
        for k in range(20):
            if k == resume_at:
                sched.save(tmp_path / "sched.json")
                opt2 = fastopt.SGD([np.zeros(2)], lr=0.1, momentum=0.9)
                sched = make(opt2)
                sched.load(tmp_path / "sched.json")
                opt2.param_groups[0].update({k2: v for k2, v in opt.param_groups[0].items()
                                             if k2 != "params"})
                opt = opt2
            if isinstance(sched, ReduceLROnPlateau):
                sched.step(1.0)  # a plateau: the lr drops every patience + 1 epochs
            else:
                sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs
    assert run() == run(resume_at=7)


def test_bad_scheduler_checkpoints(tmp_path):
    opt = fastopt.SGD([np.zeros(2)], lr=0.1)
    StepLR(opt, 3).save(tmp_path / "s.json")
    sched = CosineAnnealingLR(fastopt.SGD([np.zeros(2)], lr=0.1), T_max=5)
    with pytest.raises(ValueError, match="holds a StepLR scheduler"):
        sched.load(tmp_path / "s.json")
    (tmp_path / "t.json").write_text('{"format": "fastopt-scheduler", "format_ver')
    with pytest.raises(ValueError, match="corrupt"):
        sched.load(tmp_path / "t.json")
    payload = json.loads((tmp_path / "s.json").read_text())
    payload["format_version"] = 7
    (tmp_path / "n.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="newer"):
        StepLR(fastopt.SGD([np.zeros(2)], lr=0.1), 3).load(tmp_path / "n.json")


def test_plateau_infinities_round_trip(tmp_path):
    sched = ReduceLROnPlateau(fastopt.SGD([np.zeros(2)], lr=0.1))  # best starts at inf
    sched.save(tmp_path / "p.json")
    assert "Infinity" not in (tmp_path / "p.json").read_text()  # strict JSON
    again = ReduceLROnPlateau(fastopt.SGD([np.zeros(2)], lr=0.1))
    again.load(tmp_path / "p.json")
    assert again.state_dict() == sched.state_dict()
