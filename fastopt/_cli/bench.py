"""fastopt bench: fastopt's step against NumPy and torch.optim, side by side.

Every implementation runs the same steps on copies of the same data in one
process, in rotating blocks of steps, so a noisy machine slows all of them
alike; medians are reported. Before a figure is printed, each
implementation's result is checked against fastopt's NumPy reference: a
benchmark that does not check its kernel is not a benchmark.

% of bound. A memory-bandwidth bound holds only for a step whose working set
(parameters, gradients and optimizer state) cannot stay in the caches, so
"% bound" is shown only where that working set is at least CACHE_FACTOR
times the last-level cache (see last_level_cache). The bandwidth is the best
pass of a probe that moves Adam's traffic (7 streams) at fastopt's thread
count over a working set of exactly that threshold - so the probe gets at
least as much help from the cache as any case it is compared with. It runs
at the start, before and after every such case, every PROBE_EVERY_S seconds
in between and at the end, and every row is computed from the best pass of
the whole run: a probe slowed by other load cannot inflate the figure. The
probe checks its own result.

Unstable measurements. A printed time is marked "~" when its blocks spread
(interquartile range over median) by more than SPREAD_LIMIT, and fastopt's
time also when other processes kept more than LOAD_LIMIT CPUs busy during
the case (from /proc/stat, less the bench's own CPU time), or when its
ns/element is more than NEIGHBOUR_FACTOR times off that of every
neighbouring size of the same rule and dtype. Such cases are re-measured
once, after the rest of the plan; the notes under the table say which were
re-measured and which are still unstable. A case flagged only for its
neighbours whose second reading, with steady blocks, repeats the first
(within REPRODUCED_WITHIN) is a real cost at that size, not noise: it loses
its "~" and the notes say it was reproduced.

Half precision. Cases of dtype bfloat16 and float16 (state in the same
dtype) run beside torch's fused kernel on tensors of that dtype; the mixed
policies (float32 with bfloat16 state, bfloat16 with float32 master weights,
see DTYPES) beside torch's fused float32 step, the run they would replace,
for reference. GB/s and % bound count each array at its own itemsize
(traffic): 14 bytes per bf16 Adam element against float32's 28. fastopt
must match the NumPy reference bit for bit, master copies included; torch
is held to a tolerance in ulps of the half type (see HALF_ULPS). bfloat16
cases need ml_dtypes, imported only when one runs; without it they are
skipped and the notes say so.
"""
import argparse
import glob
import importlib.util
import json
import os
import statistics
import sys
import math
import textwrap
import time

import numpy as np

import fastopt

from .. import _dispatch, _fastpath, _plotting, _precision
from ..optim import OPTIMIZERS
from . import bench_guards, bench_torch
from .measure import (MANY_LARGE, MANY_SMALL, SPREAD_LIMIT, block_spread, fmt_ratio as _fmt_ratio,
                      header, model_shapes, model_sizes)

def _case_rule(cls_name, options):
    """``(class name, options, memory streams per element, arrays)`` of a bench rule.

    Streams: every array read once, every updated array written once (Adam:
    read p, g, m, v; write p, m, v). Arrays: the distinct arrays a step
    touches, which is what has to fit in a cache. Both follow from the
    buffers the rule's options use.
    """
    used = _full_buffers(cls_name, options, (1,))
    return cls_name, options, 3 + 2 * used, 2 + used


def _full_buffers(cls_name, options, shape):
    """How many state buffers shaped like the parameter a parameter of ``shape`` keeps.

    (Adafactor keeps a full variance for a vector and only row and column
    factors, R + C numbers, for a matrix: those are not memory streams.)
    """
    opt = OPTIMIZERS[cls_name]([np.zeros(1, np.float32)], **options)
    rule = opt.rule
    needs = rule.needs(opt._check_group_hyper(opt.param_groups[0], ""))
    return sum(need and rule.buffer_shape(name, shape) == tuple(shape)
               for name, need in zip(rule.buffers, needs))


#: name -> (optimizer class, options, streams, arrays): every class of the
#: registry at its defaults (SGD at lr=0.01), and SGD with momentum; Adam first.
RULES = {}
#: the embedding-table rules: timed on sparse rows by bench/sparse_rows.py, not here
#: (torch's SparseAdam refuses dense gradients)
SPARSE_ROW_CLASSES = ("SparseAdam", "RowWiseAdagrad")
for _name in OPTIMIZERS:
    if _name in SPARSE_ROW_CLASSES:
        continue
    RULES[_name.lower()] = _case_rule(_name, {"lr": 0.01} if _name == "SGD" else {})
    if _name == "SGD":
        RULES["sgd-momentum"] = _case_rule("SGD", {"lr": 0.01, "momentum": 0.9})
RULES = {"adam": RULES.pop("adam"), **RULES}  # the headline rule first (tables, figure)
#: the rules the default plan runs at three sizes beside Adam's sweep
OTHER_RULES = [r for r in RULES if r not in ("adam", "adamw")]

#: dtype label of a case -> (parameter element, precision options): what its
#: parameters are stored in (gradients come in the same dtype) and the
#: optimizer's half-precision options (fastopt/_precision.py). The table
#: prints a label with "float" shortened to "f" (bf16, f16, f32+bf16).
DTYPES = {
    "float32": ("float32", {}),
    "float64": ("float64", {}),
    "bfloat16": ("bfloat16", {}),
    "float16": ("float16", {}),
    "f32+bf16": ("float32", {"state_dtype": "bfloat16"}),
    "bf16+master": ("bfloat16", {"master_weights": True}),
    "bf16+master+bf16": ("bfloat16", {"master_weights": True, "state_dtype": "bfloat16"}),
}
#: bytes of an element; bfloat16 written out so that planning a run needs no ml_dtypes
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
#: stored mantissa bits: an element's spacing (ulp) is 2**(exponent - bits)
MANTISSA_BITS = {"float64": 52, "float32": 23, "float16": 10, "bfloat16": 7}
SMALLEST_NORMAL = {"float64": 2.0 ** -1022, "float32": 2.0 ** -126, "float16": 2.0 ** -14,
                   "bfloat16": 2.0 ** -126}
HALF = _precision.HALF


def dtype_elements(label):
    """``(parameter, gradient, state, master)`` elements of a dtype label (master: None if none).

    >>> dtype_elements("bf16+master")
    ('bfloat16', 'bfloat16', 'float32', 'float32')
    """
    p, options = DTYPES[label]
    precision = _precision.check(**options)
    return (p, p, precision.state_element(p),
            "float32" if precision.has_master(p) else None)


def torch_element(label):
    """The element torch.optim's rival step runs in: the parameter's for a plain case (its
    fused kernels keep half state in the parameter's dtype), else float32 (torch has no
    state_dtype or master weights: a float32 model is what such a run replaces)."""
    p, options = DTYPES[label]
    return p if _precision.check(**options).plain else "float32"


def needs_bfloat16(label):
    """Whether a case of this dtype label has bfloat16 arrays (and so needs ml_dtypes)."""
    return "bfloat16" in dtype_elements(label)


def traffic(rule, label, shape=None):
    """Bytes one element of a parameter costs a step of ``rule``: ``(moved, touched)``.

    Moved: every array read once, every updated one written once, each at its
    own itemsize. Read: the parameter (or, with master weights, its float32
    master instead: the kernel updates the master and writes the parameter as
    its rounding), the gradient and every state buffer; written: the
    parameter, the master and every state buffer. Adam (state m, v): float32
    4 x 7 = 28; bf16 read 2 x 4, written 2 x 3: 14; f32+bf16 (4 + 4 + 2 + 2) +
    (4 + 2 + 2) = 20; bf16+master (4 + 2 + 4 + 4) + (2 + 4 + 4 + 4) = 28;
    bf16+master+bf16 (4 + 2 + 2 + 2) + (2 + 4 + 2 + 2) = 20. Touched: the
    distinct arrays (parameter, gradient, master, state), which is what has
    to fit in a cache.

    ``shape``: a matrix case's (Adafactor keeps only row and column factors
    of a matrix, which are not streams); default a vector.
    """
    cls_name, options = RULES[rule][:2]
    used = _full_buffers(cls_name, options, shape or (1,))
    p, g, state, master = (ITEMSIZE[e] if e else 0 for e in dtype_elements(label))
    read = (master or p) + g + used * state
    written = p + master + used * state
    return read + written, p + g + master + used * state


#: one matrix: the case of a rule whose state is factored over rows and
#: columns (Adafactor), timed beside its vectors
MATRIX = "1000x1000"
#: rule -> the matrix cases the default plan adds for it
MATRIX_RULES = {"adafactor": (MATRIX,)}

# A working set counts as past the cache at CACHE_FACTOR x the last-level
# cache, not 1x: caches do not evict in strict LRU order (Intel's adaptive
# insertion, for one, keeps part of a cyclic working set somewhat larger than
# the cache), and the cache also holds other data.
CACHE_FACTOR = 2
# When the cache size cannot be read: larger than the last-level cache of
# most machines, so that an unknown machine errs towards "-" rather than
# towards a DRAM bound applied to a cache-resident case.
FALLBACK_LLC = 256 << 20
# fastopt's ns/element at neighbouring sizes of one rule and dtype differ by
# at most 7x in a quiet run (1e3, where a call's fixed cost dominates, against
# 1e5); 10x off every neighbour is a disturbed measurement, not a cache level.
NEIGHBOUR_FACTOR = 10
# Other processes keeping this many CPUs busy on average during a case make
# it unstable: fastopt's steps split over threads, and a thread that loses its
# core waits out another process's time slice (one busy process next to the
# bench on this 2-core VM turns Adam's 32 us step at 1e5 into 1.5 ms).
LOAD_LIMIT = 0.25
# A case far off its neighbours whose re-measured median is within this
# fraction of the first reading, blocks steady both times, is reproduced.
REPRODUCED_WITHIN = 0.25
PROBE_PASSES = 3
# Besides around every case past the cache, the probe runs whenever this long
# has passed since it last ran: more chances to catch the machine quiet.
PROBE_EVERY_S = 10.0
#: the half-precision cases of the default plan: bf16 Adam's sweep beside
#: float32's, and at 1e7 float16 and the mixed policies (each 1e7 case costs
#: a few seconds, most of them the NumPy reference's steps)
HALF_CASES = ([("adam", "bfloat16", n) for n in ("1e3", "1e5", "1e7", MANY_SMALL)]
              + [("adam", d, "1e7") for d in ("f32+bf16", "bf16+master")])
#: the half cases only --full adds (each 1e7 half case costs about 30 s, most
#: of it the NumPy reference's integer rounding, which checks it)
FULL_HALF_CASES = [("adam", d, "1e7") for d in ("float16", "bf16+master+bf16")]
# Sizes tried, smallest first, for the one Adam float32 case that is past the
# cache, added to the default plan when none of its cases is.
DRAM_SIZES = ("1e7", "2e7", "3.2e7", "6.4e7", "1.28e8", "2.56e8", "5.12e8")
# Rough peak memory of a case, in bytes per element per byte of the dtype:
# the starting copy, two gradient sets, and parameters plus state for each of
# up to five implementations, plus NumPy's temporaries.
MEMORY_PER_ELEMENT = 24

DEFAULT_JSON = "fastopt-bench.json"
DEFAULT_PLOT = "fastopt-bench.png"

# Every column the table can print and every mark in it, explained once: the
# legend under the table and bench --help both print this.
COLUMNS = [
    ("rule", "the update rule: " + ", ".join(
        name + (" (" + ", ".join(f"{k} {v}" for k, v in RULES[name][1].items()) + ")"
                if RULES[name][1] else "") for name in RULES)
     + "; each optimizer's other options at their defaults"),
    ("dtype", "f32 = float32, f64 = float64, bf16 = bfloat16 (ml_dtypes), f16 = float16 "
              "parameters, gradients and state (a half type's state in its own dtype, "
              "computed in float32); f32+bf16: float32 parameters and gradients, bfloat16 "
              "state (state_dtype='bfloat16'); bf16+master: bf16 parameters and gradients, a "
              "float32 master copy and float32 state (master_weights=True); "
              "bf16+master+bf16: that with bf16 state"),
    ("case", "elements of the one parameter array (1e5), one matrix of that shape "
             "('1000x1000'), or '200 x 16..4096': 200 arrays of log-uniform sizes in that "
             "range (seed 0), stepped by one optimizer"),
    ("fastopt", "median time of one fastopt step (backend='cython') on the case's arrays"),
    ("flat", "many-array cases: the same arrays packed into one fastopt.FlatParams buffer, "
             "stepped as one array"),
    ("ns/elem", "fastopt's time per element (time / elements of all arrays); comparable "
                "across sizes, cache-resident ones included"),
    ("GB/s", "bytes the rule must move per step / fastopt's time, wherever those bytes "
             "are served from: elements x bytes per element, every array read once and every "
             "updated one written once at its own itemsize (with master weights the master is "
             "read instead of the parameter; Adam: " + ", ".join(
                 f"{d.replace('float', 'f')} {traffic('adam', d)[0]}"
                 for d in DTYPES if d != "float64") + " bytes per element)"),
    ("% bound", "time those bytes need at the measured memory bandwidth / fastopt's time "
                "(100% = as fast as memory allows); '-' where the working set may fit in the "
                "cache (see the notes)"),
    ("numpy", "median time of the same step with fastopt's NumPy reference "
              "(backend='numpy'), which every implementation is checked against"),
    ("torch best", "the fastest of torch.optim's fused kernel (a rule without one: RMSprop, "
                   "NAdam, Adamax, ...: its for-loop and its foreach path) at 1 and 2 threads, "
                   "on tensors sharing the arrays' memory; bf16 and f16: the fused kernel on "
                   "bf16/f16 tensors (state in their dtype, as fastopt's default), the mixed "
                   "cases (f32+bf16, bf16+master...): fused float32 (torch has neither "
                   "option), for reference only"),
    ("x numpy", "numpy / fastopt: how many times faster fastopt's step is (below 1: slower)"),
    ("x torch", "torch best / fastopt"),
]
MARKS = [
    ("~", "after a time: that implementation's measurement was unstable (see the notes)"),
    ("-", "not measured (torch not installed or not used) or not meaningful (% bound of a "
          "cache-resident case)"),
]


def working_set_bytes(rule, dtype, n):
    """Distinct bytes one step of ``rule`` touches over ``n`` elements of dtype label ``dtype``."""
    return traffic(rule, dtype)[1] * n


def dram_case(dram_bytes, available_bytes=None):
    """The smallest Adam float32 case whose working set reaches ``dram_bytes``.

    Parameters
    ----------
    dram_bytes : int
        Working-set size from which a case counts as past the cache.
    available_bytes : int, optional
        Memory the machine has free; a case (and the probe) must need at most
        half of it.

    Returns
    -------
    tuple or None
        ``("adam", "float32", label)``, or None when no size in DRAM_SIZES is
        large enough or fits in memory.
    """
    for label in DRAM_SIZES:
        n = int(float(label))
        if working_set_bytes("adam", "float32", n) < dram_bytes:
            continue
        need = MEMORY_PER_ELEMENT * 4 * n + dram_bytes
        if available_bytes is not None and need > available_bytes / 2:
            return None
        return ("adam", "float32", label)
    return None


def plan(quick, full, dram_bytes=None, available_bytes=None):
    """The (rule, dtype, size label) cases of a run.

    Parameters
    ----------
    quick, full : bool
        The --quick (a few cases) and --full (two more large ones) plans.
    dram_bytes : int, optional
        Working-set size from which a case counts as past the cache. Given,
        the default and full plans gain one Adam float32 case past it when
        none of their cases is, so that "% bound" is shown at least once.
    available_bytes : int, optional
        Free memory, which that extra case must fit in (see dram_case).
    """
    if quick:
        return ([("adam", "float32", n) for n in ("1e3", "1e5", "1e7")]
                + [("adam", "float32", MANY_SMALL), ("sgd", "float32", "1e5"),
                   ("adam", "bfloat16", "1e5")])
    cases = [("adam", "float32", n) for n in ("1e3", "1e4", "1e5", "1e6", "1e7")]
    cases += [("adam", "float32", m) for m in (MANY_SMALL, MANY_LARGE)]
    for rule in OTHER_RULES:
        cases += [(rule, "float32", n) for n in ("1e3", "1e5", "1e7")]
        cases += [(rule, "float32", m) for m in MATRIX_RULES.get(rule, ())]
    cases += [("adam", "float64", n) for n in ("1e3", "1e5", "1e7")]
    cases += [("sgd", "float64", "1e7")]
    cases += HALF_CASES
    if full:
        cases += [("adam", "float32", "6.4e7"), ("adam", "float64", MANY_LARGE)]
        cases += FULL_HALF_CASES
    if dram_bytes is not None and not any(
            working_set_bytes(rule, dtype, sum(model_sizes(label))) >= dram_bytes
            for rule, dtype, label in cases):
        extra = dram_case(dram_bytes, available_bytes)
        if extra is not None:
            cases.append(extra)
    return cases


# ------------------------------------------------------------- the machine

def _parse_size(text):
    """'491520K' (sysfs) -> bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def last_level_cache(root="/sys/devices/system/cpu", cpus=None):
    """Bytes of the last-level cache this process's CPUs share, and where that came from.

    Linux: the highest-level data or unified cache of every CPU this process
    may run on (``root``/cpuN/cache/index*/), summed over distinct instances,
    since threads on two sockets have two caches between them. Elsewhere:
    ``os.sysconf("SC_LEVEL3_CACHE_SIZE")`` (or level 2) where the C library
    reports it. Failing both: FALLBACK_LLC.

    On a virtual machine this is the host's cache, shared with other guests;
    the figure is the most cache a step could possibly use, which is the
    right side to err on before calling a case DRAM-bound.

    Parameters
    ----------
    root : str
        Where the CPUs' sysfs entries are.
    cpus : iterable of int, optional
        The CPUs to look at (default: those this process may run on).

    Returns
    -------
    (int, str)
        Bytes, and a short description of the source.
    """
    if cpus is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = range(os.cpu_count() or 1)
    instances = {}  # (level, CPUs sharing it) -> bytes
    for cpu in cpus:
        best = None
        for index in glob.glob(os.path.join(root, f"cpu{cpu}", "cache", "index*")):
            try:
                with open(os.path.join(index, "type")) as f:
                    kind = f.read().strip()
                with open(os.path.join(index, "level")) as f:
                    level = int(f.read())
                with open(os.path.join(index, "size")) as f:
                    size = _parse_size(f.read())
                with open(os.path.join(index, "shared_cpu_list")) as f:
                    shared = f.read().strip()
            except (OSError, ValueError):
                continue
            if kind != "Instruction" and (best is None or level > best[0]):
                best = (level, shared, size)
        if best is not None:
            instances[best[:2]] = best[2]
    if instances:
        level = max(lvl for lvl, _ in instances)
        total = sum(size for (lvl, _), size in instances.items() if lvl == level)
        count = sum(1 for lvl, _ in instances if lvl == level)
        source = f"L{level}" + (f", {count} instances" if count > 1 else "") + f", {root}"
        if _virtual_machine():
            source += "; on a virtual machine: the host's, shared with other guests"
        return total, source
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        if name in os.sysconf_names:
            try:
                value = os.sysconf(name)
            except (OSError, ValueError):
                continue
            if value > 0:
                return value, f"os.sysconf {name}"
    return FALLBACK_LLC, "size unknown: assumed"


def _virtual_machine():
    """Whether /proc/cpuinfo says this is a guest (its CPU flags include 'hypervisor')."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "hypervisor" in line.split()
    except OSError:
        pass
    return False


def available_memory():
    """Bytes of memory available to new allocations, or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def cpu_snapshot():
    """CPU time so far: the machine's busy and stolen seconds, this process's, and the clock.

    Returns
    -------
    tuple or None
        ``(busy_s, stolen_s, own_s, perf_counter)``, or None where
        /proc/stat cannot be read (not Linux).
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    user, nice, system, _, _, irq, softirq, steal = (fields + [0] * 8)[:8]
    own = os.times()  # every thread of this process, torch's included
    return ((user + nice + system + irq + softirq) / tick, steal / tick,
            own.user + own.system, time.perf_counter())


def other_load(start, end):
    """How busy the machine was with work other than this benchmark between two snapshots.

    Parameters
    ----------
    start, end : tuple or None
        From cpu_snapshot.

    Returns
    -------
    dict or None
        ``other_cpus``: CPUs other processes kept busy on average;
        ``stolen_cpus``: CPU time the hypervisor gave to other guests, in
        CPUs on average; None without both snapshots.
    """
    if start is None or end is None or end[3] <= start[3]:
        return None
    wall = end[3] - start[3]
    others = max(0.0, (end[0] - start[0]) - (end[2] - start[2]))
    return {"other_cpus": others / wall, "stolen_cpus": max(0.0, end[1] - start[1]) / wall,
            "wall_s": wall}


def _fmt_bytes(n):
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------ bandwidth

class BandwidthProbe:
    """The 7-stream memory probe over a fixed working set, run as often as asked.

    Four float32 arrays of ``working_set_bytes`` in all; a pass reads a, b, c,
    d and writes a, c, d (Adam's traffic) at fastopt's thread count. The
    arrays stay allocated for the whole run so that every later probe costs
    only its passes. Every timed pass is kept; ``best`` is the fastest, since
    other load can only slow a pass down.

    Parameters
    ----------
    working_set_bytes : int
        Bytes of the four arrays together.
    """

    def __init__(self, working_set_bytes):
        n = max(1024, int(working_set_bytes) // 16)
        self.a, self.c, self.d = (np.zeros(n, np.float32) for _ in range(3))
        self.b = np.ones(n, np.float32)
        self.working_set_bytes = 16 * n
        self._ws = _fastpath.Workspace()
        self._ws.fill([self.a], [self.b], ([self.c], [self.d], None))
        self.passes = 0
        self.samples = []  # GB/s of every timed pass
        self._pass()  # first touch of a, c and d: page faults, not bandwidth

    def _pass(self):
        t0 = time.perf_counter()
        _fastpath.stream(self._ws)
        elapsed = time.perf_counter() - t0
        self.passes += 1
        return elapsed

    def measure(self, passes=PROBE_PASSES):
        """Run ``passes`` timed passes, check the arrays, return this call's best GB/s."""
        found = [7 * self.a.nbytes / self._pass() / 1e9 for _ in range(passes)]
        self.check()
        self.samples += found
        return max(found)

    def check(self):
        """Raise AssertionError unless every element saw every pass (b = 1 is added each time)."""
        k = np.float32(self.passes)  # exact: fewer than 2**24 passes
        if not (np.all(self.a == k) and np.all(self.c == k) and np.all(self.d == k)):
            raise AssertionError("bandwidth probe computed a wrong result")

    @property
    def best(self):
        """The fastest pass so far in GB/s, or None before any."""
        return max(self.samples) if self.samples else None


# ------------------------------------------------------------ implementations

def _fastopt_impl(cls, options, arrays, backend="cython"):
    opt = cls(arrays, backend=backend, **options)
    step = lambda grads: opt.step(grads)  # noqa: E731
    # float32 master copies, where the options keep them (check compares them too)
    step.masters = lambda: [opt.state[i]["master_param"] for i in range(len(arrays))
                            if "master_param" in opt.state[i]]
    return step


def _flat_impl(cls, options, arrays):
    flat = fastopt.FlatParams({str(i): a for i, a in enumerate(arrays)})
    opt = cls([flat.data], **options)
    views = list(flat.grads.values())
    params = list(flat.params.values())

    def step(grads):
        # The model's backward pass writes into the views; run_case calls
        # step.load(grads) for that before timing a block.
        opt.step([flat.grad])
    step.load = lambda grads: [np.copyto(v, g) for v, g in zip(views, grads)]
    step.params = params
    return step


def as_tensor(torch, array):
    """A torch tensor sharing ``array``'s memory; a bfloat16 array (ml_dtypes) included.

    torch.from_numpy refuses ml_dtypes' bfloat16: its 16-bit patterns are
    wrapped as int16 and viewed as torch.bfloat16, which is the same layout.
    """
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _torch_impl(cls_name, options, arrays, threads, foreach=False):
    try:
        import torch
    except ImportError:
        return None
    cls = getattr(torch.optim, cls_name, None)
    if cls is None:
        return None  # Lion, Lamb: optax's rules (bench/optax_compare.py times them against optax)
    tensors = [as_tensor(torch, a) for a in arrays]  # share memory with the arrays
    if arrays[0].dtype.itemsize == 2 and not (_has_fused(cls) and not foreach):
        # Only torch's fused kernels compute a half step in float32 and round
        # on store, as fastopt does; its other paths compute in the half type.
        return None
    if foreach:  # torch's multi-tensor path, for a rule without a fused kernel
        if _has_fused(cls):
            return None
        opt = cls(tensors, foreach=True, **options)
    elif _has_fused(cls):
        opt = cls(tensors, fused=True, **options)
    else:
        opt = cls(tensors, foreach=False, **options)  # the for-loop (RMSprop, NAdam, ...)

    grads_cache = {}

    def step(grads):
        key = id(grads)
        if key not in grads_cache:  # wrap once: the data is shared, not copied
            grads_cache[key] = [as_tensor(torch, g) for g in grads]
        for t, g in zip(tensors, grads_cache[key]):
            t.grad = g
        torch.set_num_threads(threads)
        opt.step()
    return step


def _has_fused(cls):
    """Whether torch.optim's ``cls`` has a fused CPU kernel (Adam, AdamW, SGD, Adagrad)."""
    import torch
    try:
        cls([torch.zeros(1)], fused=True)
    except (TypeError, RuntimeError, ValueError):
        return False
    return True


def _draw(rng, shape, element):
    """Standard normal numbers stored as ``element`` (drawn in float32 for a half type)."""
    if element in ("float32", "float64"):
        # Drawn in the dtype itself: no float64 copy of a large case to convert.
        return rng.standard_normal(shape, dtype=element)
    return rng.standard_normal(shape, dtype=np.float32).astype(_precision.numpy_dtype(element))


def run_case(rule, dtype, label, budget_s=0.4, with_torch=True):
    """Time one case; return a dict of block times, medians and the checks' deviations.

    ``dtype``: a label of DTYPES ("float32", "bfloat16", "f32+bf16", ...).
    """
    cls_name, options = RULES[rule][:2]
    cls = getattr(fastopt, cls_name)
    p_element, precision = DTYPES[dtype]
    t_element = torch_element(dtype)
    sizes = model_sizes(label)
    shapes = model_shapes(label)
    # (a matrix case has its own streams and working set)
    moved, touched = traffic(rule, dtype, shapes[0] if len(shapes[0]) > 1 else None)
    n = sum(sizes)
    rng = np.random.default_rng(1)
    p0 = [_draw(rng, s, p_element) for s in shapes]
    # Two gradient sets, alternated; the offset makes parameters drift, so
    # deviations are measured against a growing total change. (Added in
    # float32 for a half type, then rounded.)
    grad_sets = [[(_draw(rng, s, "float32" if p_element in HALF else p_element) + 0.5)
                  .astype(p0[0].dtype, copy=False) for s in shapes] for _ in range(2)]
    # torch's rival runs in its own element where the case has no torch
    # equivalent (float32 for state_dtype and master weights): the same
    # numbers, widened exactly.
    t_dtype = p0[0].dtype if t_element == p_element else np.dtype(t_element)
    torch_grad_sets = (grad_sets if t_dtype == p0[0].dtype
                       else [[g.astype(t_dtype) for g in gs] for gs in grad_sets])

    impls, arrays, impl_grads = {}, {}, {}

    def add(name, make, element_dtype=p0[0].dtype, grads=grad_sets):
        arrays[name] = [p.astype(element_dtype) for p in p0]  # (a copy)
        impl = make(arrays[name])
        if impl is not None:
            impls[name], impl_grads[name] = impl, grads
        else:
            del arrays[name]

    both = {**options, **precision}
    add("fastopt", lambda a: _fastopt_impl(cls, both, a))
    add("numpy", lambda a: _fastopt_impl(cls, both, a, backend="numpy"))
    if len(sizes) > 1 and not cls.rule.whole_arrays and p_element in ("float32", "float64"):
        # (Lamb's trust ratio is per array: one flat buffer is another
        # problem; FlatParams holds float32 and float64 only)
        add("fastopt flat", lambda a: _flat_impl(cls, both, a))
    if with_torch:
        for threads in (1, 2):
            add(f"torch {threads}t", lambda a, t=threads: _torch_impl(cls_name, options, a, t),
                t_dtype, torch_grad_sets)
        for threads in (1, 2):  # (rules without a fused kernel: the for-loop's rival)
            add(f"torch foreach {threads}t",
                lambda a, t=threads: _torch_impl(cls_name, options, a, t, foreach=True),
                t_dtype, torch_grad_sets)

    # Rounds: each implementation in turn runs a block of k steps on one
    # gradient set (its working set stays warm, as in a training loop), and
    # its time per step in that block is one sample. Rotating through the
    # implementations every round exposes them all to the same machine noise.
    times = {name: [] for name in impls}
    schedule = []  # (gradient set, steps) of every block, for a replay

    def block(name, which, k):
        impl, grads = impls[name], impl_grads[name][which]
        if hasattr(impl, "load"):
            impl.load(grads)  # what the model's backward pass would have written
        t0 = time.perf_counter()
        for _ in range(k):
            impl(grads)
        return (time.perf_counter() - t0) / k

    for name in impls:
        block(name, 0, 1)  # the first step allocates state: not a sample
    # Block length from one warm step each (the first step of torch or of a
    # lazily allocating optimizer can be 10x its usual time): about 2 ms for
    # the fastest, and at least 3 rounds of every implementation in budget_s.
    warm = {name: block(name, 1, 1) for name in impls}
    schedule += [(0, 1), (1, 1)]
    fastest, slowest = min(warm.values()), max(warm.values())
    k = max(1, min(int(2e-3 / max(fastest, 1e-9)), 64, int(budget_s / 3 / max(slowest, 1e-9))))
    rounds = 0
    deadline = time.perf_counter() + budget_s
    while rounds < 3 or (rounds < 200 and time.perf_counter() < deadline):
        for name in impls:
            times[name].append(block(name, (rounds + 1) % 2, k))
        schedule.append(((rounds + 1) % 2, k))
        rounds += 1
    step_count = 2 + rounds * k

    result = {"rule": rule, "dtype": dtype, "case": label, "n": n, "arrays": len(sizes),
              "steps": step_count, "block_steps": k,
              "param_dtype": p_element, "state_dtype": dtype_elements(dtype)[2],
              "master_weights": dtype_elements(dtype)[3] is not None,
              "torch_dtype": t_element if any(x.startswith("torch") for x in impls) else None,
              "bytes_per_element": moved,
              "bytes_per_step": moved * n, "working_set_bytes": touched * n}
    masters = {name: impls[name].masters() for name in ("fastopt", "numpy")}
    rival = None  # torch's step is the case's own: checked against the reference's params
    state_element = dtype_elements(dtype)[2]
    if any(name.startswith("torch") for name in impls) and (
            p_element, state_element) != (t_element, t_element):
        start = [p.astype(t_dtype) for p in p0]
        if masters["numpy"] and state_element == t_element:
            # torch's float32 step is what the float32 master goes through
            rival = (masters["numpy"], start)
        else:
            # The case's state is stored in another element than torch's
            # (bf16 state against torch's float32): a different computation.
            # torch is checked against the NumPy reference run as torch runs
            # (its element, plain precision) on the same gradients.
            replay = [p.copy() for p in start]
            ref_step = _fastopt_impl(cls, options, replay, backend="numpy")
            for which, steps in schedule:
                for _ in range(steps):
                    ref_step(torch_grad_sets[which])
            rival = (replay, start)
    result.update(check(arrays, impls, p0, max(sizes) if cls.rule.whole_arrays else 0,
                        masters=masters, rival=rival))
    result["median_s"] = {name: statistics.median(ts) for name, ts in times.items()}
    result["block_s"] = times
    return result


def _max_abs_diff(a, b, chunk=1 << 20):
    """max |a - b| in float64, a chunk at a time (no float64 copy of a large case)."""
    worst = 0.0
    for i in range(0, a.size, chunk):
        d = float(np.max(np.abs(a[i:i + chunk].astype(np.float64)
                                - b[i:i + chunk].astype(np.float64))))
        if d != d:
            return d  # NaN: no tolerance accepts it (max() would drop it)
        worst = max(worst, d)
    return worst


def _same(got, ref):
    """Bit for bit (half types: their 16-bit patterns), or equal with NaN where NaN."""
    if got.dtype != ref.dtype or got.shape != ref.shape:
        return False
    if got.dtype.itemsize == 2:
        return np.array_equal(got.view(np.uint16), ref.view(np.uint16))
    # equal_nan costs two isnan passes: only when plain equality fails.
    return np.array_equal(got, ref) or np.array_equal(got, ref, equal_nan=True)


def spacing(x, element):
    """The spacing (ulp) of ``element`` numbers at each of ``x`` (a float32/float64 array).

    2**(exponent - MANTISSA_BITS), where x = m 2**exponent with 1 <= m < 2;
    below the smallest normal number, the subnormals' fixed spacing.
    """
    _, exponent = np.frexp(np.maximum(np.abs(x), SMALLEST_NORMAL[element]))
    return np.ldexp(1.0, exponent - 1 - MANTISSA_BITS[element])


# Tolerances of a rival (torch) against the NumPy reference.
#
# float32, float64: torch's fused kernels reorder operations; allow RTOL of
# the total change plus ULPS units in the last place of the largest
# parameter, which dominate after only a few steps.
RTOL, ULPS = 1e-4, 4
# float16, bfloat16: both compute in float32 and round on store, so an
# element differs only where their float32 results straddle a rounding
# boundary of the half type. A parameter once apart stays about that far
# apart (Adam's update does not depend on p): a few of its own ulps. A state
# element apart (m, v 1 ulp: 2**-8 of itself in bf16) changes its
# parameter's updates by a fraction of eps while it stays apart, which adds
# up to a few eps of that parameter's change. So each element may be
# HALF_ULPS of its own spacing off, plus HALF_RTOL_EPS eps (of the half
# type) of the total change. The total change alone would not do: a bf16
# parameter of magnitude 1 is 2**-7 apart after one disagreement, over the
# whole change of a few steps at lr 1e-3 (0.08 of it observed); ulps of the
# largest parameter (4% of it in bf16) would let a wrong small parameter,
# the ones a bf16 step at lr 1e-3 moves, pass unnoticed for many steps.
# Observed, torch 2.13's fused Adam on AVX2 against fastopt, 1e5 elements:
# at 50 steps bf16 bit for bit or 1-2 elements 1-2 ulps apart (depending on
# the gradient sequence); f16 one element 1 ulp apart. Over 2000 steps at
# 1e5 and 1000 at 1e6, in blocks of 1 to 40 steps on one gradient set: at
# most 17 elements in 1e6 apart, the worst 10 ulps of itself and 3.3 eps of
# the change (bf16, 1e6, near zero), i.e. at most 0.31 of this tolerance:
# over 3x margin.
HALF_ULPS, HALF_RTOL_EPS = 8, 8


def _rival_excess(got, ref, scale, summed=0, chunk=1 << 20):
    """How far ``got`` is outside the tolerance around ``ref`` (<= 0: within), and max |got-ref|.

    ``got`` and ``ref`` are flat arrays of one element (that of the rival's
    arrays, which decides the tolerance: see RTOL, HALF_ULPS).
    """
    element = got.dtype.name  # (ml_dtypes' bfloat16 too: "bfloat16")
    eps = 2.0 ** -MANTISSA_BITS[element]
    # torch forms a whole array's sums in the array's precision, whose error
    # grows as sqrt(n) eps (fastopt and the reference sum in double): its
    # Adafactor at 1e7 float32 elements is 3.7e-4 of the total change off the
    # float64 answer, fastopt 1.7e-5. Every element's step carries that error.
    summed_rtol = 2 * math.sqrt(summed) * eps
    half = element in HALF
    if half:
        floor = (HALF_RTOL_EPS * eps + summed_rtol) * scale
    else:
        largest = max((float(np.max(np.abs(ref[i:i + chunk].astype(np.float64))))
                       for i in range(0, ref.size, chunk)), default=0.0)
        floor = (RTOL + summed_rtol) * scale + ULPS * eps * largest
    excess, err = -math.inf, 0.0
    for i in range(0, got.size, chunk):
        g = got[i:i + chunk].astype(np.float64)
        r = ref[i:i + chunk].astype(np.float64)
        d = np.abs(g - r)
        if np.isnan(d).any():
            return math.nan, math.nan
        err = max(err, float(np.max(d)))
        allowed = floor + (HALF_ULPS * spacing(np.maximum(np.abs(g), np.abs(r)), element)
                           if half else 0.0)
        excess = max(excess, float(np.max(d - allowed)))
    return excess, err


def within_tolerance(got, ref, start, summed=0):
    """Whether a rival's (torch's) parameters ``got`` pass the check against ``ref``.

    Parameters
    ----------
    got, ref, start : arrays of one shape
        The rival's result, the NumPy reference's, and where both started
        (the total change ``max |ref - start|`` scales the tolerance).
    summed : int
        Elements of the largest array a step sums whole (0: elementwise).

    Returns
    -------
    (bool, float)
        Whether it is within the tolerance, and its deviation: max |got - ref|
        over the total change.
    """
    got, ref, start = (np.ravel(a) for a in (got, ref, start))
    scale = _max_abs_diff(ref, start) or 1.0
    if not got.size:
        return True, 0.0
    excess, err = _rival_excess(got, ref, scale, summed)
    return bool(excess <= 0), err / scale


def check(arrays, impls, p0, summed=0, masters=None, rival=None):
    """Compare every implementation with the NumPy reference after the same steps.

    fastopt's implementations must agree bit for bit, parameters and float32
    master copies (``masters``: name -> list of arrays); torch's within the
    tolerance of its element (see RTOL and HALF_ULPS), against ``rival``:
    ``(reference arrays, start arrays)`` where torch's step is not the case's
    own (None: the reference's parameters, from ``p0``).

    ``summed``: the elements of the largest array a step sums whole (Adafactor's
    norms; 0 for an elementwise rule), for the tolerance of torch's own sums.
    """
    def flat(parts):
        return np.concatenate([np.ravel(a) for a in parts])

    def flat_of(name):
        impl = impls[name]
        return flat(getattr(impl, "params", arrays[name]))
    ref = flat_of("numpy")
    start = flat(p0)
    scale = _max_abs_diff(ref, start) or 1.0
    rival_ref, rival_start = (ref, start) if rival is None else (flat(rival[0]), flat(rival[1]))
    masters = masters or {}
    out = {"max_rel_dev": {}}
    for name in impls:
        got = flat_of(name)
        if name.startswith("torch"):
            ok, dev = within_tolerance(got, rival_ref, rival_start, summed)
            out["max_rel_dev"][name] = dev
            if not ok:
                raise AssertionError(f"{name} deviates from the NumPy reference by {dev:.3g}")
            continue
        same = _same(got, ref)
        err = 0.0 if same or not got.size else _max_abs_diff(got, ref)
        out["max_rel_dev"][name] = err / scale
        if not same:
            raise AssertionError(f"{name} disagrees with the NumPy reference "
                                 f"(rel. dev {err / scale:.3g})")
        if masters.get(name) and not _same(flat(masters[name]), flat(masters["numpy"])):
            raise AssertionError(f"{name}'s float32 master weights disagree with the NumPy "
                                 "reference's")
    return out


# -------------------------------------------------------------- instability

def _best_torch(medians):
    torch = {k: v for k, v in medians.items() if k.startswith("torch")}
    return min(torch, key=torch.get) if torch else None


def find_unstable(results):
    """Which printed times of each result are unreliable, and why.

    A printed time (fastopt, flat, numpy, the best torch) is unstable when
    its blocks spread by more than SPREAD_LIMIT (block_spread). fastopt's
    time is also unstable when other processes kept more than LOAD_LIMIT
    CPUs busy during the case (``other_cpus``, which bench.run records; a
    steady slowdown does not spread the blocks), and when its ns/element is
    more than NEIGHBOUR_FACTOR
    times above, or below, that of every neighbouring size of the same rule
    and dtype (one-array cases). Only fastopt is held to its neighbours: the
    NumPy reference's fixed cost per step is large enough that its
    ns/element legitimately falls by more than 10x between 1e3 and 1e5.

    Returns
    -------
    list of dict
        One per result: ``{"impls": [names], "reasons": [text]}``, both
        empty for a stable case.
    """
    flags = [{"impls": [], "reasons": []} for _ in results]
    for r, flag in zip(results, flags):
        if r.get("other_cpus", 0.0) > LOAD_LIMIT:
            flag["impls"].append("fastopt")
            flag["reasons"].append(f"other processes kept {r['other_cpus']:.2f} CPUs busy")
        shown = ["fastopt", "fastopt flat", "numpy", _best_torch(r["median_s"])]
        for name in shown:
            if name in r.get("block_s", {}):
                spread = block_spread(r["block_s"][name])
                if spread > SPREAD_LIMIT:
                    if name not in flag["impls"]:
                        flag["impls"].append(name)
                    flag["reasons"].append(f"{name} blocks spread {spread:.0%}")
    groups = {}
    for i, r in enumerate(results):
        if _one_vector(r):
            groups.setdefault((r["rule"], r["dtype"]), []).append(i)
    for members in groups.values():
        members.sort(key=lambda i: results[i]["n"])
        per_elem = [results[i]["median_s"]["fastopt"] / results[i]["n"] for i in members]

        def off(pos, others):
            """The worst ratio to ``others`` if pos is NEIGHBOUR_FACTOR off all of them."""
            ratios = [per_elem[pos] / per_elem[j] for j in others if per_elem[j] > 0]
            if ratios and (all(x > NEIGHBOUR_FACTOR for x in ratios)
                           or all(x < 1 / NEIGHBOUR_FACTOR for x in ratios)):
                return max(ratios, key=lambda x: max(x, 1 / x))
            return None

        def neighbours(pos):
            return [j for j in (pos - 1, pos + 1) if 0 <= j < len(members)]

        # First the sizes with a neighbour on both sides; then the others,
        # held only to neighbours not already found off: one bad reading
        # between two good ones must not also condemn the ends next to it.
        outliers = {}
        for pos in range(len(members)):
            if len(neighbours(pos)) == 2 and off(pos, neighbours(pos)) is not None:
                outliers[pos] = off(pos, neighbours(pos))
        ends = {}
        for pos in range(len(members)):
            if pos not in outliers:
                worst = off(pos, [j for j in neighbours(pos) if j not in outliers])
                if worst is not None:
                    ends[pos] = worst
        outliers.update(ends)
        for pos, worst in sorted(outliers.items()):
            flag = flags[members[pos]]
            if "fastopt" not in flag["impls"]:
                flag["impls"].append("fastopt")
            flag["reasons"].append(f"ns/elem {_fmt_ratio(max(worst, 1 / worst))} "
                                   f"{'above' if worst > 1 else 'below'} its neighbours'")
    return flags


def _unless_reproduced(result, flag):
    """``flag`` without the neighbour test when a re-measurement repeated the reading.

    Only a case whose every reason was its neighbours, and which is steady
    now: then the same time twice is what the step costs at that size (NAdam's
    per-step Python work at 1e3, say), and it is recorded as reproduced.
    """
    first = result.get("remeasured")
    if (not first or not flag["reasons"]
            or not all("neighbours'" in why for why in first["reasons"] + flag["reasons"])):
        return flag
    before, now = first["first_median_s"]["fastopt"], result["median_s"]["fastopt"]
    if abs(now - before) > REPRODUCED_WITHIN * before:
        return flag
    result["reproduced"] = {"first_s": before, "second_s": now, "reasons": first["reasons"]}
    return {"impls": [], "reasons": []}


# ----------------------------------------------------------------- reporting

def summarize(result, bandwidth_gbs, dram_bytes=None):
    """Derived figures of one result: ns/element, GB/s, % of bound, speedups.

    Parameters
    ----------
    result : dict
        From run_case.
    bandwidth_gbs : float or None
        The best bandwidth of the run (None: not measured).
    dram_bytes : int, optional
        Working-set size from which a case counts as past the cache;
        ``percent_of_bound`` is None for smaller working sets (and without a
        bandwidth).

    Returns
    -------
    dict
    """
    med = result["median_s"]
    fast = med["fastopt"]
    n = result["n"]
    best = _best_torch(med)
    best_torch = med[best] if best else None
    past_cache = dram_bytes is not None and result["working_set_bytes"] >= dram_bytes
    percent = None
    if past_cache and bandwidth_gbs:
        percent = 100 * result["bytes_per_step"] / (bandwidth_gbs * 1e9) / fast
    row = {
        "fastopt_s": fast,
        "ns_per_element": fast / n * 1e9,
        "gb_per_s": result["bytes_per_step"] / fast / 1e9,
        "past_cache": past_cache,
        "percent_of_bound": percent,
        "numpy_s": med["numpy"],
        "speedup_vs_numpy": med["numpy"] / fast,
        "torch_best": best,
        "torch_best_s": best_torch,
        "speedup_vs_torch": best_torch / fast if best_torch else None,
    }
    if "fastopt flat" in med:
        row["flat_s"] = med["fastopt flat"]
    return row


def _fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _fmt_rate(x):
    """GB/s: one decimal, or two significant digits below 1 (a disturbed case is not '0.0')."""
    return f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def _one_vector(result):
    """Whether a result is a case of one 1-D array (a point on its rule's size sweep)."""
    return result["arrays"] == 1 and len(model_shapes(result["case"])[0]) == 1


def case_name(result):
    """'adam f32 1e5': how the notes name a case."""
    return f"{result['rule']} {result['dtype'].replace('float', 'f')} {result['case']}"


def table_columns(with_flat):
    """The table's column names, in order."""
    names = [name for name, _ in COLUMNS]
    return names if with_flat else [name for name in names if name != "flat"]


def format_table(results, with_flat):
    """The results as an aligned text table (each result needs its ``summary``)."""
    header = table_columns(with_flat)
    rows = []
    for r in results:
        s = r["summary"]
        marked = set(r.get("unstable", {}).get("impls", []))

        def t(seconds, name):
            return _fmt_time(seconds) + ("~" if name in marked else "")
        percent = s["percent_of_bound"]
        cells = {
            "rule": r["rule"], "dtype": r["dtype"].replace("float", "f"), "case": r["case"],
            "fastopt": t(s["fastopt_s"], "fastopt"), "flat": t(s.get("flat_s"), "fastopt flat"),
            "ns/elem": f"{s['ns_per_element']:.3f}", "GB/s": _fmt_rate(s["gb_per_s"]),
            "% bound": "-" if percent is None else f"{percent:.0f}%",
            "numpy": t(s["numpy_s"], "numpy"), "torch best": t(s["torch_best_s"], s["torch_best"]),
            "x numpy": _fmt_ratio(s["speedup_vs_numpy"]),
            "x torch": _fmt_ratio(s["speedup_vs_torch"]),
        }
        rows.append([cells[h] for h in header])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def legend(columns=None, width=100):
    """What every column (default: all) and every mark of the table means, one entry a line.

    Parameters
    ----------
    columns : list of str, optional
        The columns to explain, in order (default: every column of COLUMNS).
    width : int
        Lines are wrapped to this width.

    Returns
    -------
    str
    """
    meaning = dict(COLUMNS)
    entries = [(name, meaning[name]) for name in (columns or list(meaning))] + MARKS
    pad = max(len(name) for name, _ in entries)
    lines = []
    for name, text in entries:
        lines += textwrap.wrap(text, width, initial_indent=f"  {name:<{pad}}  ",
                               subsequent_indent=" " * (pad + 4), break_on_hyphens=False)
    return "\n".join(lines)


def notes(results, llc, llc_source, dram_bytes, probe, load=None, skipped=()):
    """The notes under the table: how times were taken, other load, % bound and instability."""
    threads = _dispatch.config()["num_threads"]
    rtol = f"{RTOL:.0e}".replace("e-0", "e-")  # 1e-4
    out = [f"Times: medians of rotating blocks of steps; every implementation checked against the "
           f"NumPy reference (fastopt: bit for bit, float32 master weights too; torch: within "
           f"{rtol} of the total change plus {ULPS} ulps of the largest parameter, and 2 "
           f"sqrt(n) eps where torch sums a whole array of n in its precision; in bf16 and f16 "
           f"within {HALF_ULPS} ulps of each element plus {HALF_RTOL_EPS} eps of the total "
           f"change). Where torch's step is not the case's own (bf16 state against its float32 "
           f"state) it is checked against the NumPy reference run as torch runs; with master "
           f"weights and float32 state, against the reference's master."]
    if skipped:
        out.append("Skipped, ml_dtypes is not installed (pip install ml_dtypes): "
                   + ", ".join(f"{r} {d.replace('float', 'f')} {c}" for r, d, c in skipped)
                   + ".")
    if load is not None:
        busy = load["other_cpus"] + load["stolen_cpus"]
        line = (f"Other load: other processes kept {load['other_cpus']:.2f} of the "
                f"{os.cpu_count()} CPUs busy on average during the run"
                + (f", and the hypervisor gave {load['stolen_cpus']:.2f} CPUs to other guests"
                   if load["stolen_cpus"] >= 0.01 else "") + ".")
        if busy >= 0.1:
            line += (" The benchmark shared the machine: its times are slower than on a quiet "
                     "one, and steps split over threads suffer most (a thread that loses its "
                     "core waits out another process's time slice).")
        out.append(line)
    rule = (f"% bound is shown only where the working set of a step (parameters, gradients, "
            f"master copies and state: each array's itemsize x elements) is at least "
            f"{CACHE_FACTOR}x the last-level cache ({_fmt_bytes(llc)}, {llc_source}), i.e. at "
            f"least {_fmt_bytes(dram_bytes)}: only there must every step stream its bytes from "
            f"memory. Smaller working sets may be served partly from the cache, where no "
            f"memory bound applies (it could read over 100%); for them read ns/elem.")
    if probe is not None and probe.samples:
        rule += (f" Bandwidth: {probe.best:.1f} GB/s, the best of {len(probe.samples)} passes "
                 f"(slowest {min(probe.samples):.1f} GB/s) of a 7-stream probe over "
                 f"{_fmt_bytes(probe.working_set_bytes)} at {threads} threads, run at the "
                 f"start, before and after every such case, every {PROBE_EVERY_S:.0f} s and at "
                 f"the end; the probe checks its result.")
    else:
        rule += " No case reaches that size, so the bandwidth was not measured."
    out.append(rule)
    over = [r for r in results if (r["summary"]["percent_of_bound"] or 0) > 100]
    if over:
        out.append("% bound over 100% (" + ", ".join(case_name(r) for r in over) + "): that "
                   "step beat every probe pass, so the probe under-read the bandwidth (it was "
                   "disturbed every time); those rows' bound is uncertain.")
    remeasured = [r for r in results if r.get("remeasured")]
    unstable = [r for r in results if r["unstable"]["reasons"]]
    rule = (f"the middle half of its blocks spread by more than {SPREAD_LIMIT:.0%} of their "
            f"median; or, for fastopt, other processes kept more than {LOAD_LIMIT} CPUs busy "
            f"during the case, or its ns/elem is more than {NEIGHBOUR_FACTOR}x off every "
            f"neighbouring size of the same rule and dtype")
    if not remeasured and not unstable:
        out.append(f"No time is marked ~ (unstable: {rule}).")
    else:
        out.append(f"~ marks an unstable time: {rule}.")
        if remeasured:
            out.append("Re-measured once: " + "; ".join(
                f"{case_name(r)} ({', '.join(r['remeasured']['reasons'])})" for r in remeasured)
                + ".")
        reproduced = [r for r in results if r.get("reproduced")]
        if reproduced:
            out.append("Reproduced, so not marked: " + "; ".join(
                f"{case_name(r)} ({', '.join(r['reproduced']['reasons'])}; "
                f"{_fmt_time(r['reproduced']['first_s'])} then "
                f"{_fmt_time(r['reproduced']['second_s'])})" for r in reproduced)
                + ". The same time twice, blocks steady: what a step costs at that size, "
                  "not noise.")
        out.append("Still unstable: " + ("; ".join(
            f"{case_name(r)} ({', '.join(r['unstable']['reasons'])})" for r in unstable)
            if unstable else "none") + ".")
    return "\n".join(textwrap.fill(line, 100, subsequent_indent="  ") for line in out)


# ------------------------------------------------------------------ the plot

_COLOURS = {"fastopt": "tab:blue", "fastopt flat": "tab:cyan", "numpy": "tab:gray",
            "torch 1t": "tab:orange", "torch 2t": "tab:red",
            "torch foreach 1t": "tab:olive", "torch foreach 2t": "tab:brown"}
_DTYPE_STYLE = {"float32": ("-", "o"), "float64": ("--", "s"), "bfloat16": (":", "^"),
                "float16": (":", "v"), "f32+bf16": ("-.", "D"), "bf16+master": ("-.", "P"),
                "bf16+master+bf16": ("-.", "X")}


def plot(results, path):
    """Throughput of every implementation, rule and dtype, if matplotlib is here.

    One panel per rule with one-array cases (G elements/s against elements,
    a line per implementation, float32 solid, float64 dashed, bf16 and f16 dotted, the
    mixed policies dash-dotted), and one panel
    of bars for the many-array and matrix cases.

    Returns
    -------
    str or None
        ``path``, or None when matplotlib is missing or nothing can be drawn.
    """
    plt = _plotting.pyplot()
    if plt is None:
        return None
    single = [r for r in results if _one_vector(r)]
    many = [r for r in results if not _one_vector(r)]  # (and the matrix cases: bars too)
    rules = [rule for rule in RULES if any(r["rule"] == rule for r in single)]
    panels = len(rules) + bool(many)
    if not panels:
        return None
    ncols = panels if panels <= 3 else 3 if panels <= 6 else 4  # no half-empty last row
    nrows = -(-panels // ncols)
    width = max(8.5, 4.3 * ncols + (1.5 if many else 0))  # room for the legend's row
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 3.6 * nrows + 0.8), squeeze=False)
    axes = list(axes.flat)
    impls = [name for name in _COLOURS if any(name in r["median_s"] for r in results)]

    def throughput(r, name):
        return r["n"] / r["median_s"][name] / 1e9

    for ax, rule in zip(axes, rules):
        for dtype, (ls, marker) in _DTYPE_STYLE.items():
            chosen = sorted((r for r in single if r["rule"] == rule and r["dtype"] == dtype),
                            key=lambda r: r["n"])
            for name in impls:
                pts = [(r["n"], throughput(r, name)) for r in chosen if name in r["median_s"]]
                if pts:
                    ax.plot(*zip(*pts), ls=ls, marker=marker, ms=4, color=_COLOURS[name])
                shaky = [(r["n"], throughput(r, name)) for r in chosen
                         if name in r.get("unstable", {}).get("impls", [])]
                if shaky:
                    ax.plot(*zip(*shaky), ls="", marker="o", ms=9, mfc="none",
                            color=_COLOURS[name])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(rule, fontsize=10)
        ax.set_xlabel("elements (one array)", fontsize=8)
        ax.set_ylabel("G elements / s", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    if many:
        ax = axes[len(rules)]
        names = [name for name in impls if any(name in r["median_s"] for r in many)]
        height = 0.8 / len(names)
        for j, name in enumerate(names):
            ys = [i + (j - (len(names) - 1) / 2) * height for i in range(len(many))]
            xs = [throughput(r, name) if name in r["median_s"] else 0 for r in many]
            ax.barh(ys, xs, height=height, color=_COLOURS[name])
        ax.set_yticks(range(len(many)))
        ax.set_yticklabels([f"{r['rule']} {r['dtype'].replace('float', 'f')}\n{r['case']}"
                            for r in many], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("G elements / s", fontsize=8)
        ax.set_title("many arrays (one optimizer), matrices", fontsize=10)
        ax.tick_params(labelsize=7)
        ax.grid(True, axis="x", which="both", alpha=0.3)
    for ax in axes[panels:]:
        ax.axis("off")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=_COLOURS[name], lw=6 if name == "fastopt flat" else 2,
                      label=name) for name in impls]
    handles += [Line2D([], [], color="black", ls=ls, marker=marker, ms=4, label=dtype)
                for dtype, (ls, marker) in _DTYPE_STYLE.items()
                if any(r["dtype"] == dtype for r in single)]
    if any(r.get("unstable", {}).get("impls") for r in single):
        handles.append(Line2D([], [], ls="", marker="o", ms=9, mfc="none", color="black",
                              label="~ unstable (see the table's notes)"))
    per_row = max(1, min(len(handles), int(width / 1.6)))
    legend_rows = -(-len(handles) // per_row)
    height = fig.get_figheight()
    # Title, then the legend, above the panels (in inches from the top).
    top = 1 - (0.2 + 0.2 * legend_rows) / height  # tight_layout pads a little more
    fig.suptitle("fastopt bench: optimizer step throughput (higher is better)", fontsize=11,
                 y=1 - 0.06 / height, va="top")
    fig.legend(handles=handles, loc="upper center", ncol=per_row, fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 1 - 0.3 / height))
    return _plotting.save(fig, path, dpi=110, rect=(0, 0, 1, top))


# ------------------------------------------------------------------ the CLI

class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's own line breaks and never splits './fastopt-bench.json' at a hyphen."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def make_parser():
    """bench's argument parser; its epilog explains every column of the table."""
    epilog = ("columns of the table:\n" + legend(width=78) + "\n\n"
              + textwrap.fill(
                  f"% bound is shown only for working sets of at least {CACHE_FACTOR}x the "
                  "last-level cache (the default plan adds one such Adam float32 case when "
                  "none of its cases is that large); the bandwidth is the best pass of a "
                  "7-stream probe run before, between and after those cases. Unstable times "
                  f"(blocks spread over {SPREAD_LIMIT:.0%}; for fastopt also other processes "
                  f"busy on over {LOAD_LIMIT} CPUs during the case, or its ns/elem "
                  f"{NEIGHBOUR_FACTOR}x off its neighbours) are marked ~ and re-measured "
                  "once.", 78)
              + "\n\nfiles: written to the current folder unless --json/--plot say otherwise; "
                "their\nabsolute paths are printed.")
    parser = argparse.ArgumentParser(prog="fastopt bench",
                                     description=__doc__.splitlines()[0], epilog=epilog,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few cases, under 30 s")
    parser.add_argument("--full", action="store_true",
                        help="add the 6.4e7-element and float64 many-array cases")
    parser.add_argument("--no-torch", action="store_true", help="skip torch even if installed")
    parser.add_argument("--json", metavar="PATH",
                        help=f"where to save the results (default: ./{DEFAULT_JSON} in the "
                             "current folder; with --torch ./fastopt-bench-torch.json)")
    parser.add_argument("--plot", metavar="PATH",
                        help=f"where to save the figure when matplotlib is installed (default: "
                             f"./{DEFAULT_PLOT} in the current folder; --torch draws none)")
    parser.add_argument("--torch", action="store_true",
                        help="only the torch comparison: fastopt.torch vs torch.optim on torch "
                             "models")
    parser.add_argument("--guards", action="store_true",
                        help="only the step guards: Adam with max_grad_norm and ema_decay "
                             "against the bare step and torch's clip_grad_norm_ + fused step + "
                             "AveragedModel (writes ./fastopt-bench-guards.json)")
    parser.add_argument("--cases", metavar="RULE:DTYPE:SIZE", nargs="+",
                        help="run only these cases, e.g. adam:float32:1e5 adam:bfloat16:1e5 "
                             "adam:f32+bf16:1e7 adafactor:float32:1000x1000 "
                             "sgd:float64:'200 x 16..4096' (dtypes: " + ", ".join(DTYPES)
                             + ")")
    return parser


def _parse_cases(parser, specs):
    cases = []
    for spec in specs:
        parts = spec.split(":", 2)
        if len(parts) != 3 or parts[0] not in RULES or parts[1] not in DTYPES:
            parser.error(f"unknown case {spec!r} (RULE:DTYPE:SIZE, rules {', '.join(RULES)}; "
                         f"dtypes {', '.join(DTYPES)})")
        try:
            if sum(model_sizes(parts[2])) < 1:
                raise ValueError
        except ValueError:
            parser.error(f"unknown size in case {spec!r}")
        cases.append(tuple(parts))
    return cases


def have_bfloat16():
    """Whether ml_dtypes (NumPy's bfloat16) can be imported; not importing it yet."""
    return importlib.util.find_spec("ml_dtypes") is not None


def _progress(text):
    print(text, file=sys.stderr, flush=True)


def run(argv=None):
    """``fastopt bench``: run the plan, print the table, save JSON and a figure."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.torch:
        return bench_torch.run_cli(args)
    if args.guards:
        return bench_guards.run_cli(args)
    llc, llc_source = last_level_cache()
    dram_bytes = CACHE_FACTOR * llc
    if args.cases:
        cases = _parse_cases(parser, args.cases)
    else:
        cases = plan(args.quick, args.full, dram_bytes, available_memory())
    skipped = []
    if not have_bfloat16():
        skipped = [c for c in cases if needs_bfloat16(c[1])]
        cases = [c for c in cases if not needs_bfloat16(c[1])]
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch
        except ImportError:
            with_torch = False
    torch_threads = torch.get_num_threads() if with_torch else None
    budget = 0.15 if args.quick else 0.4

    print(header(with_torch))
    print(f"last-level cache {_fmt_bytes(llc)} ({llc_source}): % bound for working sets of "
          f"{_fmt_bytes(dram_bytes)} or more")
    past = [working_set_bytes(rule, dtype, sum(model_sizes(label))) >= dram_bytes
            for rule, dtype, label in cases]
    probe = None
    if any(past):
        _progress(f"allocating the {_fmt_bytes(dram_bytes)} bandwidth probe ...")
        probe = BandwidthProbe(dram_bytes)
        probe.measure()

    last_probe = [time.perf_counter()]

    def measure(i):
        if probe is not None and (past[i] or time.perf_counter() - last_probe[0] > PROBE_EVERY_S):
            # Right before a memory-bound case (the bound is its neighbour in
            # time), and now and then in between.
            probe.measure()
            last_probe[0] = time.perf_counter()
        before = cpu_snapshot()
        result = run_case(*cases[i], budget_s=budget, with_torch=with_torch)
        during = other_load(before, cpu_snapshot())
        if during is not None:
            result["other_cpus"] = during["other_cpus"] + during["stolen_cpus"]
        if past[i]:
            probe.measure()
            last_probe[0] = time.perf_counter()
        return result

    results = []
    started = time.perf_counter()
    cpu_at_start = cpu_snapshot()
    for i, (rule, dtype, label) in enumerate(cases):
        _progress(f"[{i + 1}/{len(cases)}] {rule} {dtype} {label} ... "
                  f"({time.perf_counter() - started:.0f} s)")
        results.append(measure(i))
    # Unstable cases once more, after the rest: a disturbance seldom lasts
    # that long. Flags are then recomputed from scratch, since a case's
    # neighbours may have been re-measured too.
    for i, flag in enumerate(find_unstable(results)):
        if flag["reasons"]:
            _progress(f"re-measuring {case_name(results[i])}: {', '.join(flag['reasons'])}")
            first = results[i]
            results[i] = measure(i)
            results[i]["remeasured"] = {"reasons": flag["reasons"],
                                        "first_median_s": first["median_s"]}
    load = other_load(cpu_at_start, cpu_snapshot())
    for r, flag in zip(results, find_unstable(results)):
        r["unstable"] = _unless_reproduced(r, flag)
    bandwidth = None
    if probe is not None:
        probe.measure()
        # A memory-bound step faster than every probe pass means the probes
        # were all disturbed: probe a few more times before settling.
        for _ in range(3):
            fastest = max(r["bytes_per_step"] / r["median_s"]["fastopt"] / 1e9
                          for r, p in zip(results, past) if p)
            if fastest <= probe.best:
                break
            probe.measure()
        bandwidth = probe.best
    if with_torch:
        torch.set_num_threads(torch_threads)  # the implementations changed it
    for r in results:
        r["summary"] = summarize(r, bandwidth, dram_bytes)

    with_flat = any(r["arrays"] > 1 for r in results)
    print(format_table(results, with_flat))
    print("\ncolumns:\n" + legend(table_columns(with_flat)))
    print("\nnotes:\n" + notes(results, llc, llc_source, dram_bytes, probe, load, skipped)
          + "\n")

    json_path = os.path.abspath(args.json or DEFAULT_JSON)
    with open(json_path, "w") as f:
        json.dump({"config": _dispatch.config(), "header": header(with_torch),
                   "last_level_cache_bytes": llc, "last_level_cache_source": llc_source,
                   "dram_working_set_bytes": dram_bytes, "bandwidth_gbs": bandwidth,
                   "probe_passes_gbs": probe.samples if probe else [], "other_load": load,
                   "skipped": [{"rule": r, "dtype": d, "case": c,
                                "reason": "ml_dtypes is not installed"} for r, d, c in skipped],
                   "results": results}, f, indent=1)
    print(f"saved {json_path}")
    plot_path = os.path.abspath(args.plot or DEFAULT_PLOT)
    if _plotting.pyplot() is None:
        print(_plotting.missing_line(plot_path))
    elif plot(results, plot_path):
        print(f"saved {plot_path}")
    return 0
