# cython: language_level=3, boundscheck=False, wraparound=False
# cython: initializedcheck=False, cdivision=True
"""The API layer's fast path: check a step's arrays, gather their pointers, run.

``fastopt._validation`` states every array rule once, in Python, with the
messages users see. Running those checks on every array of every step costs
microseconds per array - the whole time budget of a small step. This module
applies the same rules with the NumPy C-API while it gathers the data
pointers into a :class:`Workspace`, and only answers "the first parameter that
might break a rule is i". The Python checks then run and raise the error with
its message. The screen must therefore never pass what those checks refuse
(tests/test_optimizer.py fuzzes the two against each other).

The compute layer (``_kernels_<isa>``) is reached through one function
pointer, installed by fastopt/_dispatch.py for the CPU's best ISA level.
"""
cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock, NOWAIT_LOCK,
                               PyLockStatus, PY_LOCK_ACQUIRED)

cdef extern from "pythread.h":
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds,
                                             int intr_flag) nogil
from libc.math cimport pow
from libc.stdint cimport uintptr_t
from libc.stdlib cimport realloc, free, qsort
from libc.string cimport memset

from _common cimport (Slot, StepScalars, runner_t, stats_t, RULE_SGD, RULE_ADAGRAD,
                      RULE_RMSPROP, RULE_ADAM, RULE_STREAM, RULE_AXPY, RULE_SCALE,
                      MAX_BUFFERS)

cnp.import_array()

from fastopt._validation import MAX_STEP, REFUSED_SUBCLASSES
from fastopt._watched import State

cdef Py_ssize_t MAX_STEP_C = MAX_STEP  # stored step counts are < this


ctypedef struct Span:
    # The bytes [start, end) of a contiguous array.
    char* start
    char* end


cdef int grow_spans(Span** spans, Py_ssize_t* capacity, Py_ssize_t n) except -1:
    cdef Span* grown
    if n > capacity[0]:
        grown = <Span*>realloc(spans[0], n * sizeof(Span))
        if grown == NULL:
            raise MemoryError()
        spans[0] = grown
        capacity[0] = n
    return 0

cdef extern from *:
    """
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    static int fastopt_has_avx2(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    static int fastopt_has_avx512(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    }
    #else
    static int fastopt_has_avx2(void) { return 0; }
    static int fastopt_has_avx512(void) { return 0; }
    #endif
    """
    int fastopt_has_avx2()
    int fastopt_has_avx512()


def cpu_features():
    """Which of the optional kernel builds this CPU (and OS) can run."""
    return {"avx2": bool(fastopt_has_avx2()), "avx512": bool(fastopt_has_avx512())}


# ------------------------------------------------------------ runner, threads

cdef runner_t runner = NULL
cdef stats_t stats = NULL
cdef int max_threads = 1
# Below this many elements the GIL is kept: releasing it costs more than the work.
cdef Py_ssize_t NOGIL_MIN_SIZE = 16384


def install_runner(runner_capsule, stats_capsule):
    """Use the compute layer whose runner() and stats() made the capsules."""
    global runner, stats
    runner = <runner_t>PyCapsule_GetPointer(runner_capsule, b"fastopt.runner")
    stats = <stats_t>PyCapsule_GetPointer(stats_capsule, b"fastopt.stats")


def set_max_threads(int n):
    global max_threads
    max_threads = n if n > 0 else 1


def get_max_threads():
    return max_threads


# ------------------------------------------------------------------ workspace

cdef class Scalars  # below, with the per-step scalars

cdef class Workspace:
    """Reusable slot array: the pointers of one kernel call (grown, never shrunk)."""
    cdef Slot* slots
    cdef Py_ssize_t capacity
    cdef Py_ssize_t count
    cdef Py_ssize_t total
    # What the last full gather() saw. While the optimizer's State reports no
    # edit (same object, same version) and the group's options are the same
    # objects, the state buffers cannot have changed: the next gather only
    # re-checks the params and grads (see regather).
    cdef bint cached
    cdef object cached_state
    cdef Py_ssize_t cached_version
    cdef object cached_needs
    cdef Py_ssize_t cached_start, cached_stop, cached_step
    # Per slot, (entry, j, buffer, j, buffer, ...): the param's state dict
    # (where the step count goes) and every state buffer it has (used or
    # not), with its index in the rule's names: what the slots' pointers
    # came from, for regather.
    cdef list keep
    # The memory a step over these slots must keep apart from every gradient:
    # each param and every state buffer it has (used by the options or not).
    # Rebuilt by each full gather, which bumps generation (see Guard).
    cdef Span* protect
    cdef Py_ssize_t nprotect, protect_capacity
    cdef Py_ssize_t generation
    # check_step found the slots' gradients clear of the guard's spans; any
    # new gradient pointer (or a new gather) clears the flag.
    cdef bint grads_clear
    # Between fast_step's screening pass and its running pass: the group's
    # scalars, common step count and parameter count.
    cdef Scalars step_scalars
    cdef Py_ssize_t step_count, params_in_group

    def __dealloc__(self):
        free(self.slots)
        free(self.protect)

    def protect_arrays(self, list arrays):
        """Set the protected spans to these contiguous arrays' (see check_step)."""
        cdef cnp.ndarray a
        grow_spans(&self.protect, &self.protect_capacity, len(arrays))
        self.nprotect = 0
        self.generation += 1
        self.grads_clear = False
        for a in arrays:
            self.add_protect(<char*>cnp.PyArray_DATA(a), end_of(a))

    cdef inline void add_protect(self, char* start, char* end) noexcept:
        # Capacity reserved by full_gather; empty ranges overlap nothing.
        if start < end:
            self.protect[self.nprotect].start = start
            self.protect[self.nprotect].end = end
            self.nprotect += 1

    def __reduce__(self):
        # Scratch space only: a copy (deepcopy, pickle) starts empty.
        return (Workspace, ())

    cdef int reserve(self, Py_ssize_t n) except -1:
        cdef Slot* grown
        if n > self.capacity:
            grown = <Slot*>realloc(self.slots, n * sizeof(Slot))
            if grown == NULL:
                raise MemoryError()
            self.slots = grown
            self.capacity = n
        return 0

    cdef inline void put(self, cnp.ndarray p, cnp.ndarray g, char** bufs) noexcept:
        cdef Slot* slot = &self.slots[self.count]
        cdef int j
        slot.p = <char*>cnp.PyArray_DATA(p)
        slot.g = <char*>cnp.PyArray_DATA(g)
        for j in range(MAX_BUFFERS):
            slot.buf[j] = bufs[j]
        slot.size = cnp.PyArray_SIZE(p)
        slot.f64 = cnp.PyArray_TYPE(p) == cnp.NPY_FLOAT64
        self.total += slot.size
        self.count += 1

    def fill(self, list params, list grads, tuple buffer_lists):
        """Load already-validated aligned lists (buffer_lists: per buffer a list or None)."""
        cdef Py_ssize_t i, j, n = len(params)
        cdef char* bufs[MAX_BUFFERS]
        self.reserve(n)
        self.count = 0
        self.total = 0
        for i in range(n):
            for j in range(MAX_BUFFERS):
                bufs[j] = NULL
                if j < len(buffer_lists) and buffer_lists[j] is not None:
                    bufs[j] = <char*>cnp.PyArray_DATA(<cnp.ndarray>(<list>buffer_lists[j])[i])
            self.put(<cnp.ndarray>params[i], <cnp.ndarray>grads[i], bufs)

    cdef void run(self, int rule, const StepScalars* s) noexcept:
        if self.count == 0:
            return
        if self.total >= NOGIL_MIN_SIZE:
            with nogil:
                runner(rule, self.slots, self.count, s, max_threads)
        else:
            runner(rule, self.slots, self.count, s, max_threads)


# --------------------------------------------------------------------- screen

cdef inline bint usable(object obj, bint writeable):
    """A native-order, aligned, C-contiguous float32/float64 ndarray."""
    if not cnp.PyArray_Check(obj):
        return False
    if not cnp.PyArray_CheckExact(obj) and isinstance(obj, REFUSED_SUBCLASSES):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>obj
    cdef int kind = cnp.PyArray_TYPE(a)
    if kind != cnp.NPY_FLOAT32 and kind != cnp.NPY_FLOAT64:
        return False
    if not (cnp.PyArray_ISNOTSWAPPED(a) and cnp.PyArray_ISALIGNED(a)
            and cnp.PyArray_IS_C_CONTIGUOUS(a)):
        return False
    return not writeable or cnp.PyArray_ISWRITEABLE(a)


cdef inline bint same_layout(cnp.ndarray a, cnp.ndarray b):
    # PyArray_SAMESHAPE, inlined: a warm step asks this several times per parameter.
    cdef int d, nd = cnp.PyArray_NDIM(a)
    cdef cnp.npy_intp* da
    cdef cnp.npy_intp* db
    if cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(b) or cnp.PyArray_NDIM(b) != nd:
        return False
    da = cnp.PyArray_DIMS(a)
    db = cnp.PyArray_DIMS(b)
    for d in range(nd):
        if da[d] != db[d]:
            return False
    return True


cdef inline Py_ssize_t elements(cnp.ndarray a):
    # PyArray_SIZE, inlined.
    cdef int d
    cdef Py_ssize_t n = 1
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(a)
    for d in range(cnp.PyArray_NDIM(a)):
        n *= dims[d]
    return n


cdef inline bint ranges_overlap(char* a0, char* a1, char* b0, char* b1):
    # Byte ranges of contiguous arrays; an empty range overlaps nothing.
    return a0 < a1 and b0 < b1 and a0 < b1 and b0 < a1


cdef inline char* end_of(cnp.ndarray a):
    return <char*>cnp.PyArray_DATA(a) + cnp.PyArray_NBYTES(a)


# Return codes of gather(), besides the index of a suspect parameter.
GATHERED = -1   # every parameter of the range is ready: run the workspace
SLOW_PATH = -2  # valid, but some parameter needs Python's help (no gradient, no state yet, uneven steps)


def gather(Workspace ws, list params, list grads, Py_ssize_t start, Py_ssize_t stop,
           object state, tuple names, tuple needs, bint counts_steps):
    """Screen one group and load ``ws``: see full_gather for what is checked.

    Returns ``(code, step)``: GATHERED, SLOW_PATH or the first suspect index,
    and the parameters' common step count.
    """
    cdef Py_ssize_t step = 0
    if not isinstance(state, dict):
        raise TypeError(f"the optimizer's state must be a dict, got {type(state).__name__}")
    code = gather_group(ws, params, grads, start, stop, <dict>state, names, needs,
                        counts_steps, &step)
    return code, step


cdef Py_ssize_t gather_group(Workspace ws, list params, list grads, Py_ssize_t start,
                             Py_ssize_t stop, dict state, tuple names, tuple needs,
                             bint counts_steps, Py_ssize_t* step) except? -3:
    # When nothing in ``state`` was edited since the last successful gather
    # into ``ws`` (State.version), only the params and grads are re-checked.
    ws.params_in_group = stop - start
    if (ws.cached and state is ws.cached_state and state.version == ws.cached_version
            and needs is ws.cached_needs and start == ws.cached_start
            and stop == ws.cached_stop):
        # The cached count was checked when it was read, not after the steps
        # counted since: the full screen reports one at the limit (and the
        # caller's step + 1 cannot overflow).
        if regather(ws, params, grads, start) == GATHERED and ws.cached_step < MAX_STEP_C:
            step[0] = ws.cached_step
            return GATHERED
    return full_gather(ws, params, grads, start, stop, state, names, needs, counts_steps, step)


cdef Py_ssize_t regather(Workspace ws, list params, list grads, Py_ssize_t start):
    """Re-check params, grads and the buffers in use against the cached slots.

    GATHERED when every parameter is the same memory as before, every buffer
    still usable and shaped like its parameter, every gradient usable and
    shaped like its parameter; then only the gradients' pointers are new
    (check_step keeps them off the protected memory). Any doubt returns
    SLOW_PATH so that full_gather decides, with everything checked.
    """
    cdef Py_ssize_t k, j, idx
    cdef Slot* slot
    cdef object p_obj, g_obj, b_obj, pair
    cdef cnp.ndarray p, g
    cdef char* g0
    for k in range(ws.count):
        slot = &ws.slots[k]
        g_obj = grads[start + k]
        p_obj = params[k]
        if g_obj is None or not usable(p_obj, True) or not usable(g_obj, False):
            return SLOW_PATH
        p = <cnp.ndarray>p_obj
        g = <cnp.ndarray>g_obj
        # The buffers and the protected spans were made for this param's memory.
        if (<char*>cnp.PyArray_DATA(p) != slot.p or elements(p) != slot.size
                or (cnp.PyArray_TYPE(p) == cnp.NPY_FLOAT64) != slot.f64
                or not same_layout(g, p)):
            return SLOW_PATH
        # A buffer can be made read-only or reshaped in place without an edit
        # of the state that State.version would see; the full screen refuses
        # that for every buffer, in use or not.
        pair = ws.keep[k]
        for idx in range(1, len(<tuple>pair), 2):
            j = (<tuple>pair)[idx]
            b_obj = (<tuple>pair)[idx + 1]
            if not usable(b_obj, True) or not same_layout(<cnp.ndarray>b_obj, p):
                return SLOW_PATH
            if slot.buf[j] != NULL and <char*>cnp.PyArray_DATA(<cnp.ndarray>b_obj) != slot.buf[j]:
                return SLOW_PATH
    for k in range(ws.count):
        g0 = <char*>cnp.PyArray_DATA(<cnp.ndarray>grads[start + k])
        if g0 != ws.slots[k].g:
            ws.slots[k].g = g0
            ws.grads_clear = False  # same pointer and size: the same span as checked
    return GATHERED


cdef Py_ssize_t full_gather(Workspace ws, list params, list grads, Py_ssize_t start,
                            Py_ssize_t stop, dict state, tuple names, tuple needs,
                            bint counts_steps, Py_ssize_t* common_step) except? -3:
    """Screen one group's ``params`` (flat indices start..stop-1) and load ``ws``.

    ``grads`` and ``state`` are indexed by flat index; ``params`` by position
    in the group, ``params[i - start]``, written ``params[i]`` below.

    Checked for every ``i`` whose ``grads[i]`` is not None: ``params[i]`` is a
    usable writeable array; ``grads[i]`` is usable, of the same dtype and
    shape, and overlaps neither ``params[i]`` nor a buffer of ``state[i]``;
    ``state[i]``, if present, is a dict whose ``"step"`` (if any) is an int
    in [0, MAX_STEP) and whose buffers named in ``names`` (if present) are usable,
    writeable, of the parameter's dtype and shape, and overlap neither the
    parameter nor each other.

    Returns the first suspect index, or GATHERED (``ws`` holds the whole
    range; ``common_step[0]`` is the parameters' common step count, 0 if the
    rule counts none), or SLOW_PATH. Nothing is modified except ``ws``.
    """
    cdef Py_ssize_t i, j, k, nb
    cdef object p_obj, g_obj, b_obj, entry, step_obj
    cdef cnp.ndarray p, g, b
    cdef char* p0
    cdef char* p1
    cdef char* g0
    cdef char* g1
    cdef char* b0
    cdef char* b1
    cdef char* seen0[MAX_BUFFERS]
    cdef char* seen1[MAX_BUFFERS]
    cdef char* bufs[MAX_BUFFERS]
    cdef bint slow = False
    cdef Py_ssize_t step = -1, this_step = -1  # set before use; -1 quiets the C compiler
    cdef Py_ssize_t nnames = len(names)
    if len(params) != stop - start:
        raise ValueError("internal: params does not match start..stop")
    ws.reserve(stop - start)
    grow_spans(&ws.protect, &ws.protect_capacity, (stop - start) * (1 + nnames))
    ws.nprotect = 0
    ws.generation += 1
    ws.grads_clear = False
    ws.count = 0
    ws.total = 0
    ws.cached = False
    ws.cached_state = None  # drop what the last gather held on to, now
    ws.keep = None
    keep = []
    for i in range(start, stop):
        g_obj = grads[i]
        if g_obj is None:
            slow = True
            continue
        p_obj = params[i - start]
        if not usable(p_obj, True) or not usable(g_obj, False):
            return i
        p = <cnp.ndarray>p_obj
        g = <cnp.ndarray>g_obj
        p0 = <char*>cnp.PyArray_DATA(p)
        p1 = end_of(p)
        g0 = <char*>cnp.PyArray_DATA(g)
        g1 = end_of(g)
        if not same_layout(g, p) or ranges_overlap(g0, g1, p0, p1):
            return i
        entry = state.get(i)
        if entry is None:
            slow = True
            continue
        if not isinstance(entry, dict):
            return i
        if "step" in <dict>entry:  # present but None is refused, like any non-int
            step_obj = (<dict>entry)["step"]
            if type(step_obj) is not int or not 0 <= step_obj < MAX_STEP:
                return i
            this_step = step_obj
        elif counts_steps:
            slow = True
        ws.add_protect(p0, p1)
        nb = 0
        present = [entry]
        for j in range(MAX_BUFFERS):
            bufs[j] = NULL
        for j in range(nnames):
            b_obj = (<dict>entry).get(names[j])
            if b_obj is None:
                if needs[j]:
                    slow = True
                continue
            if not usable(b_obj, True):
                return i
            b = <cnp.ndarray>b_obj
            b0 = <char*>cnp.PyArray_DATA(b)
            b1 = end_of(b)
            if (not same_layout(b, p) or ranges_overlap(b0, b1, p0, p1)
                    or ranges_overlap(b0, b1, g0, g1)):
                return i
            for k in range(nb):
                if ranges_overlap(b0, b1, seen0[k], seen1[k]):
                    return i
            seen0[nb] = b0
            seen1[nb] = b1
            nb += 1
            ws.add_protect(b0, b1)
            present += (j, b)
            if needs[j]:
                bufs[j] = b0
        if slow:
            continue  # keep screening; the workspace will not be used
        if counts_steps:
            if step == -1:
                step = this_step
            elif this_step != step:
                slow = True
                continue
        ws.put(p, g, bufs)
        keep.append(tuple(present))
    if slow:
        return SLOW_PATH
    step = step if step > 0 else 0
    ws.keep = keep  # the buffers whose pointers the slots now hold, cached or not
    ws.cached = isinstance(state, State)
    if ws.cached:
        ws.cached_state = state
        ws.cached_version = state.version
        ws.cached_needs = needs
        ws.cached_start, ws.cached_stop, ws.cached_step = start, stop, step
    common_step[0] = step
    return GATHERED


def commit_steps(Workspace ws, object step):
    """Set ``"step"`` to ``step`` in the state dict of every param of a gathered workspace.

    A gathered workspace holds a slot for each param of its group (all have
    gradients), and each slot's record starts with the param's state dict.
    Written with PyDict_SetItem, which a State does not count as an edit: the
    workspace's cache follows the step itself.
    """
    if ws.keep is None or len(ws.keep) != ws.count:
        raise ValueError("internal: commit_steps needs a gathered workspace")
    commit_group(ws, step)


cdef int commit_group(Workspace ws, object step) except -1:
    cdef Py_ssize_t k
    for k in range(ws.count):
        (<dict>(<tuple>ws.keep[k])[0])["step"] = step
    ws.cached_step = step
    return 0


# ------------------------------------------------------------------ aliasing

cdef int span_order(const void* a, const void* b) noexcept nogil:
    cdef uintptr_t x = <uintptr_t>(<const Span*>a).start
    cdef uintptr_t y = <uintptr_t>(<const Span*>b).start
    return (x > y) - (x < y)


cdef class Guard:
    """The protected memory of a whole step (every group), sorted; cached.

    A step writes its params and state buffers and reads its gradients, so
    no two protected spans may overlap, and no gradient may overlap one -
    across parameters and groups, not only within one parameter. Otherwise
    the result would depend on the order of the writes, and so on the number
    of threads. The spans change only when a workspace is fully gathered
    again; the guard rebuilds then, and otherwise only places each gradient
    (a binary search, or nothing when it lies outside all of them).
    """
    cdef Span* spans
    cdef Py_ssize_t count, capacity
    cdef list sources  # [(workspace, generation)] the spans were merged from
    cdef bint disjoint

    def __dealloc__(self):
        free(self.spans)

    def __reduce__(self):
        return (Guard, ())

    cdef int refresh(self, list workspaces, Py_ssize_t ngroups) except -1:
        """Merge the workspaces' spans unless they are those merged last; 1 if rebuilt."""
        cdef Py_ssize_t gi, k, total = 0
        cdef Workspace ws
        cdef list sources
        cdef tuple seen
        cdef bint same = self.sources is not None and len(self.sources) == ngroups
        for gi in range(ngroups):  # compared without allocating: a step allocates nothing
            if not same:
                break
            ws = <Workspace>workspaces[gi]
            seen = <tuple>self.sources[gi]
            same = seen[0] is ws and seen[1] == ws.generation
        if same:
            return 0
        sources = []
        for gi in range(ngroups):
            ws = <Workspace>workspaces[gi]
            sources.append((ws, ws.generation))
            total += ws.nprotect
        for gi in range(ngroups):  # their gradients were checked against other spans
            (<Workspace>workspaces[gi]).grads_clear = False
        grow_spans(&self.spans, &self.capacity, total)
        self.count = 0
        for gi in range(ngroups):
            ws = <Workspace>workspaces[gi]
            for k in range(ws.nprotect):
                self.spans[self.count] = ws.protect[k]
                self.count += 1
        qsort(self.spans, self.count, sizeof(Span), span_order)
        self.disjoint = True
        for k in range(1, self.count):
            if self.spans[k].start < self.spans[k - 1].end:
                self.disjoint = False
        self.sources = sources
        return 1

    cdef bint clear_of(self, char* start, char* end) noexcept:
        """Whether [start, end) overlaps no span (which are sorted and disjoint)."""
        cdef Py_ssize_t lo = 0, hi = self.count, mid
        if start >= end or self.count == 0:
            return True
        if end <= self.spans[0].start or start >= self.spans[self.count - 1].end:
            return True
        # Disjoint and sorted by start, so sorted by end too: find the first
        # span ending after start; only it can begin before end.
        while lo < hi:
            mid = (lo + hi) // 2
            if self.spans[mid].end <= start:
                lo = mid + 1
            else:
                hi = mid
        return lo == self.count or self.spans[lo].start >= end


def check_step(Guard guard, list workspaces, Py_ssize_t ngroups):
    """Whether the gathered workspaces of a step are free of cross-aliasing.

    True when no protected spans overlap and no gradient overlaps any of them.
    False means that Python must find and name the overlap.
    """
    return guard_clear(guard, workspaces, ngroups)


cdef bint guard_clear(Guard guard, list workspaces, Py_ssize_t ngroups) except -1:
    cdef Py_ssize_t gi, k
    cdef Workspace ws
    cdef Slot* slot
    guard.refresh(workspaces, ngroups)
    if not guard.disjoint:
        return False
    for gi in range(ngroups):
        ws = <Workspace>workspaces[gi]
        if ws.grads_clear:
            continue
        for k in range(ws.count):
            slot = &ws.slots[k]
            if not guard.clear_of(slot.g, slot.g + slot.size * (8 if slot.f64 else 4)):
                return False
        ws.grads_clear = True
    return True


# ------------------------------------------------------------ step scalars

cdef class Scalars:
    """A rule's step-independent scalars; :meth:`at_step` adds the rest.

    Built once per group from validated hyperparameters (fastopt.kernels
    says which fields each rule sets) and reused every step, so a step only
    computes what depends on the step count - in double precision, with the
    same operations torch.optim uses in Python.
    """
    cdef readonly int rule
    cdef StepScalars s

    def __init__(self, int rule, *, double lr=0.0, double lr_decay=0.0, bint maximize=False,
                 double weight_decay=0.0, double momentum=0.0, double dampening=0.0,
                 bint nesterov=False, double eps=0.0, double alpha=0.0, bint centered=False,
                 double beta1=0.0, double beta2=0.0, double decay=1.0, bint amsgrad=False,
                 bint flush_denormals=False):
        if rule not in (RULE_SGD, RULE_ADAGRAD, RULE_RMSPROP, RULE_ADAM):
            raise ValueError(f"unknown rule {rule}")
        memset(&self.s, 0, sizeof(self.s))
        self.rule = rule
        self.s.base_lr = lr
        self.s.lr_decay = lr_decay
        self.s.sign = -1.0 if maximize else 1.0
        self.s.weight_decay = weight_decay
        self.s.momentum = momentum
        self.s.dampening = dampening
        self.s.nesterov = nesterov
        self.s.eps = eps
        self.s.alpha = alpha
        self.s.centered = centered
        self.s.beta1 = beta1
        self.s.beta2 = beta2
        self.s.decay = decay
        self.s.amsgrad = amsgrad
        self.s.flush_denormals = flush_denormals

    cdef StepScalars at_step(self, Py_ssize_t step, bint first_step) noexcept:
        cdef StepScalars s = self.s
        cdef double t = <double>step
        if self.rule == RULE_ADAM:
            # torch: step_size = lr / (1 - beta1 ** t); bias_correction2 ** 0.5
            s.lr = s.base_lr / (1.0 - pow(s.beta1, t))
            s.bc2_sqrt = pow(1.0 - pow(s.beta2, t), 0.5)
        elif self.rule == RULE_ADAGRAD:
            # torch: clr = lr / (1 + (step - 1) * lr_decay), the subtraction on
            # integers (exact), then one rounding to double, as Python does
            s.lr = s.base_lr / (1.0 + <double>(step - 1) * s.lr_decay)
        else:
            s.lr = s.base_lr
        s.first_step = first_step
        return s

    def values(self, Py_ssize_t step=1, bint first_step=False):
        """The scalars a kernel would get at ``step`` (for tests and debugging)."""
        return self.at_step(step, first_step)


cdef void run(Workspace ws, Scalars scalars, Py_ssize_t step, bint first_step) noexcept:
    cdef StepScalars s = scalars.at_step(step, first_step)
    ws.run(scalars.rule, &s)


def run_workspace(Workspace ws, Scalars scalars, Py_ssize_t step, bint first_step):
    """Run the loaded workspace with ``scalars`` at ``step`` (Python entry)."""
    run(ws, scalars, step, first_step)


def stream(Workspace ws):
    """Run the bandwidth probe over a workspace loaded as (a, b, (c, d, None))."""
    cdef StepScalars s
    memset(&s, 0, sizeof(s))
    ws.run(RULE_STREAM, &s)


def grad_stats(Workspace ws):
    """(sum of squares, any NaN/Inf) over the g arrays of a loaded workspace."""
    cdef double sumsq = 0.0
    cdef bint nonfinite = False
    cdef int failed
    with nogil:
        failed = stats(ws.slots, ws.count, max_threads, &sumsq, &nonfinite)
    if failed:
        raise MemoryError()
    return sumsq, bool(nonfinite)


def axpy(Workspace ws, double a):
    """p += a * g over a loaded workspace."""
    cdef StepScalars s
    memset(&s, 0, sizeof(s))
    s.lr = a
    ws.run(RULE_AXPY, &s)


def scale(Workspace ws, double a):
    """p *= a over a loaded workspace."""
    cdef StepScalars s
    memset(&s, 0, sizeof(s))
    s.lr = a
    ws.run(RULE_SCALE, &s)


# ------------------------------------------------------------ whole step

# A whole step's outcome besides DONE: the Python path must take over. Nothing
# was modified in either case.
DONE = 0
NEEDS_PYTHON = 1


cdef int fast_step(list groups, list grads, object state, list workspaces, Guard guard,
                   tuple names, bint counts_steps) except -1:
    """DONE after a whole step, or NEEDS_PYTHON with nothing modified.

    ``groups`` are the optimizer's ParamGroups, each with a ``checked`` cache
    ``(hyper, kernel_hyper, needs, Scalars)`` made by the Python layer. Every
    group is screened and gathered first and the whole step checked for
    aliasing (guard_clear); only if all is ready do the kernels run. Anything
    else - an edited group, a grad count that does not match, a suspect array,
    missing state or grads, uneven steps - returns NEEDS_PYTHON, and the
    Python path validates and reports. Allocates no arrays or containers:
    what the second pass needs (scalars, step) waits in each group's
    Workspace; only the new step count is a new int.
    """
    cdef Py_ssize_t gi, start = 0, stop, total = 0, step
    cdef Py_ssize_t ngroups = len(groups)
    cdef object checked, params, group
    cdef Workspace ws
    if not isinstance(state, dict) or len(workspaces) < ngroups:
        return NEEDS_PYTHON
    for gi in range(ngroups):
        group = groups[gi]
        if not isinstance(group, dict):
            return NEEDS_PYTHON
        params = (<dict>group).get("params")
        if type(params) is not list:
            return NEEDS_PYTHON
        total += len(<list>params)
    if total != len(grads):
        return NEEDS_PYTHON
    for gi in range(ngroups):
        checked = getattr(groups[gi], "checked", None)
        if type(checked) is not tuple or len(<tuple>checked) != 4:
            return NEEDS_PYTHON
        params = (<dict>groups[gi])["params"]
        stop = start + len(<list>params)
        ws = <Workspace?>workspaces[gi]
        if gather_group(ws, params, grads, start, stop, <dict>state, names,
                        (<tuple>checked)[2], counts_steps, &step) != GATHERED:
            return NEEDS_PYTHON
        ws.step_scalars = <Scalars?>(<tuple>checked)[3]
        ws.step_count = step
        start = stop
    if not guard_clear(guard, workspaces, ngroups):
        return NEEDS_PYTHON
    start = 0
    for gi in range(ngroups):
        ws = <Workspace>workspaces[gi]
        stop = start + ws.params_in_group
        if counts_steps:
            run(ws, ws.step_scalars, ws.step_count + 1, False)
            commit_group(ws, ws.step_count + 1)
        else:
            run(ws, ws.step_scalars, 0, False)
        ws.step_scalars = None
        start = stop
    return DONE


cdef class StepLock:
    """An optimizer's lock: concurrent step() calls on one optimizer take turns.

    A plain C lock, so that the fast path takes it in nanoseconds; waiting
    for it releases the GIL (and Ctrl-C interrupts it). Not reentrant, like
    threading.Lock.

    ``bindings`` counts the optimizer's rebinds of what its Stepper holds
    (Optimizer.__setattr__): a Stepper made before a rebind declines to step.
    """
    cdef PyThread_type_lock handle
    cdef bint held
    cdef public Py_ssize_t bindings

    def __cinit__(self):
        self.handle = PyThread_allocate_lock()
        if self.handle == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.handle != NULL:
            PyThread_free_lock(self.handle)

    cdef inline bint try_acquire(self) noexcept:
        if PyThread_acquire_lock(self.handle, NOWAIT_LOCK):
            self.held = True
            return True
        return False

    cdef inline void release_held(self) noexcept:
        # Never twice: had another thread wrongly released the lock meanwhile,
        # a second release would leave it unable to exclude anyone.
        if self.held:
            self.held = False
            PyThread_release_lock(self.handle)

    def acquire(self):
        """Wait for the lock (with the GIL released) and take it."""
        cdef PyLockStatus status
        while not self.try_acquire():
            with nogil:  # in slices, so that a signal (Ctrl-C) is seen
                status = PyThread_acquire_lock_timed(self.handle, 20000, 0)
            if status == PY_LOCK_ACQUIRED:
                self.held = True
                break
            PyErr_CheckSignals()
        return True

    def release(self):
        if not self.held:
            raise RuntimeError("release of an unlocked StepLock")
        self.release_held()

    def locked(self):
        return self.held

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()
        return False

    def __reduce__(self):
        return (StepLock, ())  # a copy gets its own, unlocked


cdef class Stepper:
    """``opt.step(grads)`` in C when nothing needs Python's help.

    Bound to the objects an optimizer steps - its lock, param_groups, state,
    workspaces and guard - so that a step reads no Python attributes. The
    optimizer makes a new one whenever it rebinds any of them.
    """
    cdef StepLock lock
    cdef Py_ssize_t bindings
    cdef object groups, state
    cdef list workspaces
    cdef Guard guard
    cdef tuple names
    cdef bint counts_steps, enabled

    def __init__(self, StepLock lock, Py_ssize_t bindings, object groups, object state,
                 list workspaces, Guard guard, tuple names, bint counts_steps,
                 bint enabled=True):
        # bindings: lock.bindings read before the other objects were
        self.lock, self.bindings, self.groups, self.state = lock, bindings, groups, state
        self.workspaces, self.guard = workspaces, guard
        self.names, self.counts_steps, self.enabled = names, counts_steps, enabled

    def __call__(self, grads):
        """True after a whole step; False, with nothing modified, if Python must take it."""
        cdef int code
        if not self.enabled or type(grads) is not list or type(self.groups) is not list:
            return False
        if not self.lock.try_acquire():
            self.lock.acquire()  # another thread is stepping: wait, GIL released
        try:
            if self.lock.bindings != self.bindings:
                return False  # made before a rebind: the Python path makes a new one
            code = fast_step(<list>self.groups, <list>grads, self.state, self.workspaces,
                             self.guard, self.names, self.counts_steps)
        finally:
            self.lock.release_held()
        return code == DONE

    def __reduce__(self):
        raise TypeError("a Stepper is bound to one optimizer's objects; make a new one")


# ------------------------------------------------------------ foreign tensors
# fastopt.torch's fast path. This module does not import torch: it only calls
# the few tensor methods it needs (``grad``, ``data_ptr()``, ...), about 50 ns
# each, where the general path in Python costs microseconds per tensor.

cdef class TensorGroup:
    """One param group of torch tensors, gathered by fastopt/torch.py.

    Built after a step that validated everything: the group's params in
    order, which of them step (``slot_of[i]`` >= 0: those that had a
    gradient), per stepping param its dtype, state dict and the tensors
    expected in it, the address of its step counter, and a Workspace loaded
    with the pointers of params and state buffers. tensor_step re-checks
    each step what can change without the optimizer seeing it.
    """
    cdef Workspace ws
    cdef list params, dtypes, states, expected
    cdef Py_ssize_t* slot_of
    cdef char** counters
    cdef bint* counter_f64
    cdef Scalars scalars
    cdef bint counts_steps

    def __cinit__(self):
        self.slot_of = NULL
        self.counters = NULL
        self.counter_f64 = NULL

    def __init__(self, Workspace ws, list params, list slot_of, list dtypes, list states,
                 list expected, list counters, Scalars scalars, bint counts_steps):
        cdef Py_ssize_t i, n = len(counters)
        if len(slot_of) != len(params) or not (len(dtypes) == len(states) == len(expected) == n
                                                 == ws.count):
            raise ValueError("internal: TensorGroup lists do not match")
        self.ws, self.params, self.dtypes = ws, params, dtypes
        self.states, self.expected = states, expected
        self.scalars, self.counts_steps = scalars, counts_steps
        self.slot_of = <Py_ssize_t*>realloc(NULL, max(len(params), 1) * sizeof(Py_ssize_t))
        self.counters = <char**>realloc(NULL, max(n, 1) * sizeof(char*))
        self.counter_f64 = <bint*>realloc(NULL, max(n, 1) * sizeof(bint))
        if self.slot_of == NULL or self.counters == NULL or self.counter_f64 == NULL:
            raise MemoryError()
        for i in range(len(params)):
            self.slot_of[i] = slot_of[i]
        for i in range(n):  # 0-d float32/float64 views of the step tensors, or None
            self.counters[i] = NULL
            if counters[i] is not None:
                self.counters[i] = <char*>cnp.PyArray_DATA(<cnp.ndarray>counters[i])
                self.counter_f64[i] = cnp.PyArray_TYPE(<cnp.ndarray>counters[i]) == cnp.NPY_FLOAT64

    def __dealloc__(self):
        free(self.slot_of)
        free(self.counters)
        free(self.counter_f64)

    def __reduce__(self):
        raise TypeError("a TensorGroup holds raw pointers and does not pickle")

    def set_scalars(self, Scalars scalars):
        """New hyperparameter values (an lr schedule); the same buffers in use."""
        self.scalars = scalars

    cdef double counter(self, Py_ssize_t i) noexcept:
        if self.counter_f64[i]:
            return (<double*>self.counters[i])[0]
        return (<float*>self.counters[i])[0]

    cdef bint load(self, list live, dict state, object strided) except -1:
        """Check the group as it is now and take its gradients' pointers."""
        cdef Py_ssize_t i, k, n = len(self.params)
        cdef object p, g, dtype, st, pair
        cdef Slot* slot
        cdef uintptr_t ptr
        if len(live) != n:
            return False
        for i in range(n):
            p = live[i]
            if p is not self.params[i]:
                return False
            g = p.grad
            k = self.slot_of[i]
            if k < 0:
                if g is not None:
                    return False
                continue
            if g is None:
                return False
            slot = &self.ws.slots[k]
            dtype = self.dtypes[k]
            # The param is still the memory the slot points at (p.data = ... moves
            # it). The slot's views of it keep that memory alive, so an equal
            # pointer is the same storage.
            ptr = p.data_ptr()
            if ptr != <uintptr_t>slot.p:
                return False
            # A dense contiguous gradient of the param's dtype and size. Its
            # device is the param's (CPU): torch's grad setter checks it, and
            # no .data assignment changes a tensor's device type.
            if (g.layout is not strided or g.dtype is not dtype or g.numel() != slot.size
                    or g.is_contiguous() is not True):
                return False
            # the state holds the tensors the slot points at
            st = state.get(p)
            if st is not self.states[k]:
                return False
            for pair in <tuple>self.expected[k]:
                if (<dict>st).get((<tuple>pair)[0]) is not (<tuple>pair)[1]:
                    return False
            ptr = g.data_ptr()
            if <char*>ptr != slot.g:
                slot.g = <char*>ptr
                self.ws.grads_clear = False
        return True

    cdef bint next_step(self, double* step) noexcept:
        """The step the counters will hold after advance(): False unless all agree."""
        cdef Py_ssize_t i
        cdef double first
        if self.ws.count == 0:
            step[0] = 1.0
            return True
        first = self.counter(0)
        for i in range(self.ws.count):
            if (self.counters[i] == NULL or self.counter(i) != first
                    or self.counter_f64[i] != self.counter_f64[0]):
                return False
        # torch's update uses the counter's value after step_t += 1, in its dtype
        step[0] = first + 1.0 if self.counter_f64[0] else <double>(<float>first + <float>1.0)
        return True

    cdef void advance(self) noexcept:
        """``step += 1`` in each counter's own dtype, as torch does."""
        cdef Py_ssize_t i
        for i in range(self.ws.count):
            if self.counter_f64[i]:
                (<double*>self.counters[i])[0] += 1.0
            else:
                (<float*>self.counters[i])[0] += <float>1.0


def tensor_step(list groups, list live_groups, object state, Guard guard, object strided):
    """A whole fastopt.torch step when nothing changed that needs Python.

    ``groups``: the TensorGroups, ``live_groups``: the optimizer's param lists
    as they are now (aligned), ``state``: its state dict, ``strided``:
    torch.strided. Everything is checked before anything is written; returns
    DONE, or NEEDS_PYTHON with nothing modified.
    """
    cdef Py_ssize_t gi, n = len(groups)
    cdef TensorGroup tg
    cdef double step
    cdef list workspaces = []
    cdef list steps = []
    if len(live_groups) != n or not isinstance(state, dict):  # torch's is a defaultdict
        return NEEDS_PYTHON
    for gi in range(n):
        tg = <TensorGroup>groups[gi]
        if not tg.load(live_groups[gi], <dict>state, strided):
            return NEEDS_PYTHON
        step = 0.0
        if tg.counts_steps:
            if not tg.next_step(&step) or not 1.0 <= step < 9.2e18:  # a valid int64 count
                return NEEDS_PYTHON
        steps.append(step)
        workspaces.append(tg.ws)
    if not check_step(guard, workspaces, n):
        return NEEDS_PYTHON
    for gi in range(n):
        tg = <TensorGroup>groups[gi]
        if tg.counts_steps:
            tg.advance()
            run(tg.ws, tg.scalars, <Py_ssize_t><double>steps[gi], False)
        else:
            run(tg.ws, tg.scalars, 0, False)
    return DONE
