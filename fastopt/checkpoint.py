"""Checkpoints: optimizer and scheduler state on disk, safely.

Training runs for hours, and a lost or corrupted optimizer state costs the
run. So a checkpoint is

- **plain data**: an optimizer is one ``.npz`` file (state arrays) whose
  member ``meta.json`` holds JSON metadata - optimizer type, hyperparameters
  per group, step counts, the parameters' shapes and dtypes, format and
  fastopt versions. It is read with ``allow_pickle=False``: loading never
  runs code from the file. A scheduler is one JSON file.
- **written atomically**: to a temporary file in the same folder, flushed and
  fsync'ed, then renamed over the target (and the folder fsync'ed), so a crash
  mid-write leaves the old checkpoint or the new one, never a broken file.
- **checked before use**: a checkpoint that does not fit the optimizer (other
  type, other shapes, dtypes or counts, a newer format, a truncated or corrupt
  file, pickled objects) raises ValueError/TypeError and changes nothing.
"""
import io
import json
import math
import os
import tempfile
import zipfile

import numpy as np

from ._version import __version__

FORMAT = "fastopt-optimizer"
SCHEDULER_FORMAT = "fastopt-scheduler"
FORMAT_VERSION = 1
META = "meta.json"

__all__ = ["save_optimizer", "restore_optimizer", "read_layout", "save_scheduler",
           "restore_scheduler"]


# ---------------------------------------------------------------- atomic write

def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file, then rename it to ``path``.

    The data is flushed and fsync'ed before the rename and the folder after
    it, so the rename is durable and a crash leaves either the old file or
    the complete new one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without folder handles (Windows)
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ------------------------------------------------------------------ optimizer

def _json_value(value):
    """Hyperparameters as JSON: tuples become lists, and back in _from_json."""
    return list(value) if isinstance(value, tuple) else value


def save_optimizer(optimizer, path):
    """Write ``optimizer``'s state and hyperparameters to ``path`` (an .npz file)."""
    sd = optimizer.state_dict()
    params = optimizer._flat_params()
    arrays, steps, bits = {}, {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if key == "step":
                steps[str(index)] = int(value)
            else:
                # (not ascontiguousarray: it makes a 0-d array 1-d)
                value = np.asarray(value, order="C")
                if value.dtype.name == "bfloat16":  # no NumPy type: its 16 bits, and the name
                    bits[f"state/{index}/{key}"] = "bfloat16"
                    value = value.view(np.uint16)
                arrays[f"state/{index}/{key}"] = value
    groups = []
    for group in sd["param_groups"]:
        groups.append({k: _finite_or_tagged(_json_value(v)) for k, v in group.items()
                       if isinstance(v, (bool, int, float, str, tuple, list, type(None)))})
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fastopt_version": __version__,
        "optimizer": type(optimizer).__name__, "param_groups": groups, "steps": steps,
        "state_keys": {str(i): sorted(k for k in e if k != "step") for i, e in sd["state"].items()},
        "params": [{"shape": list(p.shape), "dtype": str(p.dtype)} for p in params],
        "skipped_steps": int(getattr(optimizer, "skipped_steps", 0)),
        # arrays stored as the raw bits of a dtype NumPy lacks -> that dtype's name
        "bit_patterns": bits,
        # the constructor's options beside the hyperparameters (half precision)
        "options": dict(optimizer.precision.options()) if hasattr(optimizer, "precision") else {},
    }
    meta_bytes = np.frombuffer(json.dumps(meta, allow_nan=False).encode(), dtype=np.uint8)

    def write(f):
        np.savez(f, **{META: meta_bytes}, **arrays)
    atomic_write(path, write)


def _hyper_value(key, value):
    """A saved group value as the optimizer held it: JSON keeps its pairs
    (betas, Rprop's etas and step_sizes) as lists."""
    if isinstance(value, list) and key not in ("params", "param_names"):
        return tuple(value)
    return value


def _read_npz(path):
    """The arrays and metadata of an optimizer checkpoint; ValueError if unreadable."""
    if not os.path.exists(os.fspath(path)):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(os.fspath(path)):
        raise ValueError(f"{path}: truncated or corrupt checkpoint (not an .npz archive)")
    try:
        with np.load(os.fspath(path), allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except ValueError as e:
        if "object arrays" in str(e).lower():
            raise ValueError(f"{path}: holds pickled objects; fastopt never loads those") from None
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {e})") from None
    if META not in arrays:
        raise ValueError(f"{path}: no {META}; not a fastopt optimizer checkpoint")
    try:
        meta = _untag(json.loads(arrays.pop(META).tobytes().decode()))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt metadata ({e})") from None
    _check_header(meta, FORMAT, "optimizer", path)
    return meta, arrays


def _check_header(payload, kind, what, path):
    """A checkpoint's format tag and version: ours, and not newer than we read."""
    if not isinstance(payload, dict) or payload.get("format") != kind:
        raise ValueError(f"{path}: not a fastopt {what} checkpoint")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version!r} is newer than this fastopt "
                         f"understands ({FORMAT_VERSION}); upgrade fastopt to load it")


def _state_dict_from(meta, arrays, path):
    """Rebuild a state_dict from checkpoint contents (shape checks happen in load_state_dict)."""
    try:
        state = {}
        for name, dtype in meta.get("bit_patterns", {}).items():
            if dtype != "bfloat16" or arrays[name].dtype != np.uint16:
                raise ValueError(f"{name} is no {dtype} bit pattern")
            arrays[name] = arrays[name].view(_bfloat16(path))
        for index, keys in meta["state_keys"].items():
            entry = {key: arrays[f"state/{index}/{key}"] for key in keys}
            if index in meta["steps"]:
                entry["step"] = meta["steps"][index]
            state[int(index)] = entry
        groups = []
        for group in meta["param_groups"]:
            groups.append({k: _hyper_value(k, v) for k, v in group.items()})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: incomplete checkpoint ({type(e).__name__}: {e})") from None
    return {"state": state, "param_groups": groups}


def _bfloat16(path):
    """ml_dtypes' bfloat16, which NumPy lacks (the optional package, imported when needed)."""
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(f"{path} holds bfloat16 state; reading it needs ml_dtypes "
                          "(pip install ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)


def _a(word):
    """``word`` with its indefinite article: "an Adam", "an SGD", "a StepLR"."""
    word = str(word)
    # An acronym is read letter by letter: "an SGD" (ess), "an RMSprop" (ar).
    vowel_sound = "AEFHILMNORSX" if word[:2].isupper() else "AEIOUaeiou"
    return ("an " if word[:1] and word[0] in vowel_sound else "a ") + word


def restore_optimizer(optimizer, path):
    """Load the checkpoint at ``path`` into ``optimizer`` (validated; all or nothing)."""
    meta, arrays = _read_npz(path)
    kind = type(optimizer).__name__
    if meta.get("optimizer") != kind:
        raise ValueError(f"{path}: holds {_a(meta.get('optimizer'))} optimizer, not {_a(kind)}")
    params = optimizer._flat_params()
    saved = meta.get("params", [])
    if len(saved) != len(params):
        raise ValueError(f"{path}: has {len(saved)} parameters, the optimizer has {len(params)}")
    for i, (p, s) in enumerate(zip(params, saved)):
        if list(p.shape) != s.get("shape") or str(p.dtype) != s.get("dtype"):
            raise ValueError(f"{path}: parameter {i} was {s.get('dtype')} {tuple(s.get('shape', ()))}, "
                             f"the optimizer's is {p.dtype} {p.shape}")
    optimizer.load_state_dict(_state_dict_from(meta, arrays, path))
    optimizer.skipped_steps = int(meta.get("skipped_steps", 0))


def read_layout(path):
    """The saved optimizer's type name and its param groups, as plain data.

    Returns ``(kind, groups, options)``: ``groups`` is a list of ``(members,
    hyper)`` with the parameter indices of each group and its hyperparameters
    (betas as a tuple); ``options`` the constructor's other saved options
    (half precision: state_dtype, master_weights, ...). The optimizer layer builds an optimizer from it
    (``fastopt.load_optimizer``); this module knows no optimizer class.
    """
    meta, _ = _read_npz(path)
    try:
        groups = [(list(group.get("params", [])),
                   {k: _hyper_value(k, v) for k, v in group.items()
                    if k not in ("params", "param_names")})
                  for group in meta["param_groups"]]
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: incomplete checkpoint ({type(e).__name__}: {e})") from None
    options = meta.get("options", {})
    if not isinstance(options, dict):
        raise ValueError(f"{path}: corrupt options {options!r}")
    return str(meta.get("optimizer")), groups, options


# ------------------------------------------------------------------ scheduler

def _finite_or_tagged(value):
    """JSON without NaN/Infinity extensions: tag non-finite floats."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, dict):
        return {k: _finite_or_tagged(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_tagged(v) for v in value]
    return value


def _untag(value):
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag(v) for v in value]
    return value


def save_scheduler(scheduler, path):
    """Write a learning-rate scheduler's state to ``path`` (JSON, atomically)."""
    payload = {"format": SCHEDULER_FORMAT, "format_version": FORMAT_VERSION,
               "fastopt_version": __version__, "scheduler": type(scheduler).__name__,
               "state": _finite_or_tagged(scheduler.state_dict())}
    text = json.dumps(payload, allow_nan=False, indent=1).encode()
    atomic_write(path, lambda f: f.write(text))


def restore_scheduler(scheduler, path):
    """Load a scheduler checkpoint into ``scheduler`` (validated by its load_state_dict)."""
    try:
        with open(os.fspath(path), "rb") as f:
            payload = json.load(io.TextIOWrapper(f, encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: truncated or corrupt scheduler checkpoint ({e})") from None
    _check_header(payload, SCHEDULER_FORMAT, "scheduler", path)
    kind = type(scheduler).__name__
    if payload.get("scheduler") != kind:
        raise ValueError(f"{path}: holds {_a(payload.get('scheduler'))} scheduler, not {_a(kind)}")
    scheduler.load_state_dict(_untag(payload.get("state")))
