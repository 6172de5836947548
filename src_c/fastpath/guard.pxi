# Guard: no write of a step may overlap another array of the step.
# Included by src_c/_fastpath.pyx, whose header defines the vocabulary.

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
            if not guard.clear_of(slot.g, slot.g + slot.size * P_ITEMSIZE[slot.storage]):
                return False
        ws.grads_clear = True
    return True


def averages_clear(Workspace averages, list avgs, list params, list workspaces,
                   Py_ssize_t ngroups):
    """Whether a step's weight averages are still those ``averages`` was loaded
    with, and apart from everything else the step touches.

    ``averages``: the averaging pass (slot k: avgs[k] moved towards
    params[k]), with the averages as its protected spans (protect_arrays);
    ``workspaces``: the step's gathered groups. True when every average and
    parameter is the same usable memory as when the pass was loaded (an
    array can be made read-only, reshaped, retyped or resized in place
    without an edit of the state), no two averages overlap, and none
    overlaps a parameter, a state buffer or a gradient of those groups (each
    a binary search in the sorted averages). False means that Python must
    check everything again and name what is wrong. Sorts ``averages``' spans
    in place (they are a set).
    """
    cdef Py_ssize_t gi, k
    cdef Workspace ws
    cdef Slot* slot
    cdef cnp.ndarray a, p
    cdef Guard sorted_averages = Guard()
    if len(avgs) != averages.count or len(params) != averages.count:
        return False
    for k in range(averages.count):
        slot = &averages.slots[k]
        if not usable(avgs[k], True) or not usable(params[k], True):
            return False
        a = <cnp.ndarray>avgs[k]
        p = <cnp.ndarray>params[k]
        if (<char*>cnp.PyArray_DATA(a) != slot.p or <char*>cnp.PyArray_DATA(p) != slot.g
                or elements(a) != slot.size or storage_of(cnp.PyArray_TYPE(p)) != slot.storage
                or not same_layout(a, p)):
            return False
    qsort(averages.protect, averages.nprotect, sizeof(Span), span_order)
    for k in range(1, averages.nprotect):
        if averages.protect[k].start < averages.protect[k - 1].end:
            return False
    # A Guard over the averages' spans alone (borrowed: the Guard frees only
    # what it allocated, and this one is emptied before it goes).
    sorted_averages.spans = averages.protect
    sorted_averages.count = averages.nprotect
    try:
        for gi in range(ngroups):
            ws = <Workspace>workspaces[gi]
            for k in range(ws.nprotect):
                if not sorted_averages.clear_of(ws.protect[k].start, ws.protect[k].end):
                    return False
            for k in range(ws.count):
                slot = &ws.slots[k]
                if not sorted_averages.clear_of(slot.g, slot.g + slot.size * P_ITEMSIZE[slot.storage]):
                    return False
        return True
    finally:
        sorted_averages.spans = NULL
        sorted_averages.count = 0
