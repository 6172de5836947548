# Screen and gather: check a group's arrays with the C-API while collecting their pointers.
# Included by src_c/_fastpath.pyx, whose header defines the vocabulary.

# --------------------------------------------------------------------- screen

cdef inline bint usable(object obj, bint writeable):
    """A native-order, aligned, C-contiguous float32/float64 (or complex) ndarray."""
    if not cnp.PyArray_Check(obj):
        return False
    if not cnp.PyArray_CheckExact(obj) and isinstance(obj, REFUSED_SUBCLASSES):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>obj
    cdef int kind = cnp.PyArray_TYPE(a)
    if storage_of(kind) < 0:
        return False
    if not (cnp.PyArray_ISNOTSWAPPED(a) and cnp.PyArray_ISALIGNED(a)
            and cnp.PyArray_IS_C_CONTIGUOUS(a)):
        return False
    return not writeable or cnp.PyArray_ISWRITEABLE(a)


cdef inline bint same_layout(cnp.ndarray a, cnp.ndarray b):
    """The same dtype and shape."""
    return cnp.PyArray_TYPE(a) == cnp.PyArray_TYPE(b) and same_shape(a, b)


cdef inline bint same_shape(cnp.ndarray a, cnp.ndarray b):
    # PyArray_SAMESHAPE, inlined: a warm step asks this several times per parameter.
    cdef int d, nd = cnp.PyArray_NDIM(a)
    cdef cnp.npy_intp* da
    cdef cnp.npy_intp* db
    if cnp.PyArray_NDIM(b) != nd:
        return False
    da = cnp.PyArray_DIMS(a)
    db = cnp.PyArray_DIMS(b)
    for d in range(nd):
        if da[d] != db[d]:
            return False
    return True


# A buffer's layout, as ``needs`` carries it per buffer (fastopt/optim/rule.py:
# LAYOUT_CODES): 0, the options do not use it; LIKE_P, shaped like the
# parameter; ROWS (..., R, 1) and COLS (..., 1, C), the factors of a
# parameter (..., R, C); VECTOR, like a parameter of fewer than 2 dimensions
# (and absent for a matrix); ROW_SUMS (..., 1), one number per row of the last
# axis (a 0-d parameter: like it). A shaped layout (ROWS and up) reads the
# parameter's shape, which a complex array's real view changes: such a rule
# (Adafactor) takes no complex parameter.
cdef enum:
    LIKE_P = 1
    ROWS = 2
    COLS = 3
    VECTOR = 4
    ROW_SUMS = 5


cdef inline bint layout_applies(int layout, int nd) noexcept:
    """Whether a parameter of nd dimensions has a buffer of this layout."""
    if layout == ROWS or layout == COLS:
        return nd >= 2
    if layout == VECTOR:
        return nd < 2
    return True


cdef inline bint fits(cnp.ndarray b, cnp.ndarray p, int layout, int typenum):
    """``b`` has NumPy type ``typenum`` (the state's: state_type_of) and the shape
    ``layout`` gives a buffer of ``p``."""
    cdef int d, nd = cnp.PyArray_NDIM(p)
    cdef cnp.npy_intp* db
    cdef cnp.npy_intp* dp
    if cnp.PyArray_TYPE(b) != typenum:
        return False
    if layout < ROWS:
        return same_shape(b, p)
    if not layout_applies(layout, nd):
        return False
    if layout == VECTOR or (layout == ROW_SUMS and nd == 0):
        return same_shape(b, p)
    if cnp.PyArray_NDIM(b) != nd:
        return False
    db = cnp.PyArray_DIMS(b)
    dp = cnp.PyArray_DIMS(p)
    for d in range(nd):
        if ((d == nd - 1 and (layout == ROWS or layout == ROW_SUMS))
                or (d == nd - 2 and layout == COLS)):
            if db[d] != 1:
                return False
        elif db[d] != dp[d]:
            return False
    return True


cdef inline bint shaped(tuple needs):
    """Whether any buffer has a shaped layout (the rule reads the parameter's shape)."""
    cdef object code
    for code in needs:
        if <int>code >= ROWS:
            return True
    return False


cdef inline bint same_matrix(const Slot* slot, cnp.ndarray p):
    """The slot's last two dimensions are still p's (a SLOTWISE rule reads them)."""
    cdef int nd = cnp.PyArray_NDIM(p)
    if nd < 2:
        return slot.rows == 0 and slot.cols == 0
    return slot.rows == cnp.PyArray_DIMS(p)[nd - 2] and slot.cols == cnp.PyArray_DIMS(p)[nd - 1]


cdef inline Py_ssize_t elements(cnp.ndarray a):
    # The real numbers a slot steps: PyArray_SIZE, inlined, twice for complex.
    cdef int d
    cdef Py_ssize_t n = 2 if cnp.PyArray_ISCOMPLEX(a) else 1
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
           object state, tuple names, tuple needs, bint counts_steps, Policy policy=None):
    """Screen one group and load ``ws``: see full_gather for what is checked.

    ``policy``: the optimizer's half-precision options (None: the default).
    Returns ``(code, step)``: GATHERED, SLOW_PATH or the first suspect index,
    and the parameters' common step count.
    """
    cdef Py_ssize_t step = 0
    if not isinstance(state, dict):
        raise TypeError(f"the optimizer's state must be a dict, got {type(state).__name__}")
    code = gather_group(ws, params, grads, start, stop, <dict>state, names, needs,
                        counts_steps, &step, policy)
    return code, step


cdef Py_ssize_t gather_group(Workspace ws, list params, list grads, Py_ssize_t start,
                             Py_ssize_t stop, dict state, tuple names, tuple needs,
                             bint counts_steps, Py_ssize_t* step,
                             Policy policy=None) except? -3:
    # When nothing in ``state`` was edited since the last successful gather
    # into ``ws`` (State.version), only the params and grads are re-checked.
    # A gathered group's stochastic slots get this step's round keys.
    cdef Py_ssize_t code
    ws.params_in_group = stop - start
    if (ws.cached and state is ws.cached_state and state.version == ws.cached_version
            and needs is ws.cached_needs and policy is ws.cached_policy
            and start == ws.cached_start and stop == ws.cached_stop):
        # The cached count was checked when it was read, not after the steps
        # counted since: the full screen reports one at the limit (and the
        # caller's step + 1 cannot overflow).
        if (regather(ws, params, grads, start, needs, policy) == GATHERED
                and ws.cached_step < MAX_STEP_C):
            step[0] = ws.cached_step
            set_round_keys(ws, policy, start, step[0] + 1)
            return GATHERED
    code = full_gather(ws, params, grads, start, stop, state, names, needs, counts_steps, step,
                       policy)
    if code == GATHERED:
        set_round_keys(ws, policy, start, step[0] + 1)
    return code


cdef Py_ssize_t regather(Workspace ws, list params, list grads, Py_ssize_t start, tuple needs,
                         Policy policy):
    """Re-check params, grads and the buffers in use against the cached slots.

    GATHERED when every parameter is the same memory as before, every buffer
    still usable and shaped like its parameter, every gradient usable and
    shaped like its parameter; then only the gradients' pointers are new
    (check_step keeps them off the protected memory). Any doubt returns
    SLOW_PATH so that full_gather decides, with everything checked.
    """
    cdef Py_ssize_t k, j, idx
    cdef int stype
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
                or kind_under(policy, storage_of(cnp.PyArray_TYPE(p))) != slot.storage
                or not same_matrix(slot, p) or not same_layout(g, p)):
            return SLOW_PATH
        # A buffer can be made read-only or reshaped in place without an edit
        # of the state that State.version would see; the full screen refuses
        # that for every buffer, in use or not.
        pair = ws.keep[k]
        stype = state_type_of(policy, p)
        for idx in range(1, len(<tuple>pair), 2):
            j = (<tuple>pair)[idx]
            b_obj = (<tuple>pair)[idx + 1]
            if j == KEEP_MASTER:
                if (not usable_master(b_obj, p)
                        or <char*>cnp.PyArray_DATA(<cnp.ndarray>b_obj) != slot.master):
                    return SLOW_PATH
                continue
            if not usable(b_obj, True) or not fits(<cnp.ndarray>b_obj, p, <int>needs[j], stype):
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
                            bint counts_steps, Py_ssize_t* common_step,
                            Policy policy) except? -3:
    """Screen one group's ``params`` (flat indices start..stop-1) and load ``ws``.

    ``grads`` and ``state`` are indexed by flat index; ``params`` by position
    in the group, ``params[i - start]``, written ``params[i]`` below.

    Checked for every ``i`` whose ``grads[i]`` is not None: ``params[i]`` is a
    usable writeable array; ``grads[i]`` is usable, of the same dtype and
    shape, and overlaps neither ``params[i]`` nor a buffer of ``state[i]``;
    ``state[i]``, if present, is a dict whose ``"step"`` (if any) is an int
    in [0, MAX_STEP) and whose buffers named in ``names`` (if present) are usable,
    writeable, of the state's dtype (the parameter's unless ``policy`` says
    otherwise) and of the shape their layout in ``needs`` gives (fits), and
    overlap neither the parameter nor each other. Under a policy with master
    weights, a half parameter's ``"master_param"`` is such a buffer too
    (float32, shaped like it: without one the step is Python's, which makes
    it), and any other parameter has none.

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
    cdef char* seen0[MAX_BUFFERS + 1]
    cdef char* seen1[MAX_BUFFERS + 1]
    cdef char* master
    cdef char* bufs[MAX_BUFFERS]
    cdef Py_ssize_t sizes[MAX_BUFFERS]
    cdef bint slow = False
    cdef Py_ssize_t step = -1, this_step = -1  # set before use; -1 quiets the C compiler
    cdef Py_ssize_t nnames = len(names)
    cdef bint real_only = shaped(needs)
    cdef int nd, own, kind, stype
    if len(params) != stop - start:
        raise ValueError("internal: params does not match start..stop")
    ws.reserve(stop - start)
    grow_spans(&ws.protect, &ws.protect_capacity, (stop - start) * (2 + nnames))
    ws.nprotect = 0
    ws.generation += 1
    ws.grads_clear = False
    ws.count = 0
    ws.total = 0
    ws.cached = False
    ws.cached_state = None  # drop what the last gather held on to, now
    ws.cached_policy = None
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
        if (not same_layout(g, p) or ranges_overlap(g0, g1, p0, p1)
                or (real_only and cnp.PyArray_ISCOMPLEX(p))):
            return i
        nd = cnp.PyArray_NDIM(p)
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
        own = storage_of(cnp.PyArray_TYPE(p))
        kind = kind_under(policy, own)
        stype = state_type_of(policy, p)
        if kind < 0:
            slow = True  # (a dtype the policy could not resolve: Python says why)
            continue
        for j in range(MAX_BUFFERS):
            bufs[j] = NULL
            sizes[j] = 0
        for j in range(nnames):
            b_obj = (<dict>entry).get(names[j])
            if b_obj is None:
                if needs[j] and layout_applies(<int>needs[j], nd):
                    slow = True
                continue
            if not usable(b_obj, True):
                return i
            b = <cnp.ndarray>b_obj
            b0 = <char*>cnp.PyArray_DATA(b)
            b1 = end_of(b)
            if (not fits(b, p, <int>needs[j], stype) or ranges_overlap(b0, b1, p0, p1)
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
                sizes[j] = elements(b)
        master = NULL
        if policy is not None and policy.any_master:
            b_obj = (<dict>entry).get("master_param")
            if b_obj is None:
                slow = slow or policy.master[own]
            elif not policy.master[own] or not usable_master(b_obj, p):
                return i  # (Python refuses a master copy of a float32/float64 parameter)
            else:
                b = <cnp.ndarray>b_obj
                b0 = <char*>cnp.PyArray_DATA(b)
                b1 = end_of(b)
                if ranges_overlap(b0, b1, p0, p1) or ranges_overlap(b0, b1, g0, g1):
                    return i
                for k in range(nb):
                    if ranges_overlap(b0, b1, seen0[k], seen1[k]):
                        return i
                ws.add_protect(b0, b1)
                present += (KEEP_MASTER, b)
                master = b0
        if slow:
            continue  # keep screening; the workspace will not be used
        if counts_steps:
            if step == -1:
                step = this_step
            elif this_step != step:
                slow = True
                continue
        ws.put(p, g, bufs, sizes, kind)
        ws.slots[ws.count - 1].master = master
        ws.slots[ws.count - 1].stochastic = policy is not None and policy.stochastic[own]
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
        ws.cached_policy = policy
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
