# Workspace: a reusable array of slots, the pointers of one kernel call.
# Included by src_c/_fastpath.pyx, whose header defines the vocabulary.

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
    cdef object cached_policy  # the Policy the slots' kinds came from
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
    cdef object step_values  # the scalar state after the step a fast step is taking
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

    def set_averages(self, list avgs, double weight):
        """Fuse the weight average into the next runs: slot k's average is avgs[k].

        The averages are validated arrays like their parameters, apart from
        every array of the step (fastopt/optim/optimizer.py checks). Returns
        False, changing nothing, unless there is one per slot and every slot
        is plain float32/float64 (a staged kind keeps its own pass).
        """
        cdef Py_ssize_t k
        if len(avgs) != self.count:
            return False
        for k in range(self.count):
            if (self.slots[k].storage != STORAGE_F32 and self.slots[k].storage != STORAGE_F64
                    or elements(<cnp.ndarray>avgs[k]) != self.slots[k].size):
                return False
        for k in range(self.count):
            self.slots[k].avg = <char*>cnp.PyArray_DATA(<cnp.ndarray>avgs[k])
            self.slots[k].avg_weight = weight
        return True

    def clear_averages(self):
        """Undo set_averages: the slots hold no average pointers."""
        cdef Py_ssize_t k
        for k in range(self.count):
            self.slots[k].avg = NULL

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

    cdef inline void put(self, cnp.ndarray p, cnp.ndarray g, char** bufs,
                         const Py_ssize_t* sizes, int storage) noexcept:
        # storage: the slot's kind; -1: p's own, with state alike (storage_of).
        cdef Slot* slot = &self.slots[self.count]
        cdef int j, nd
        slot.p = <char*>cnp.PyArray_DATA(p)
        slot.g = <char*>cnp.PyArray_DATA(g)
        slot.size = elements(p)  # real numbers: a complex array is stepped as its real view
        for j in range(MAX_BUFFERS):
            slot.buf[j] = bufs[j]
            slot.buf_size[j] = slot.size if sizes == NULL else sizes[j]
        nd = cnp.PyArray_NDIM(p)
        slot.rows = cnp.PyArray_DIMS(p)[nd - 2] if nd >= 2 else 0
        slot.cols = cnp.PyArray_DIMS(p)[nd - 1] if nd >= 2 else 0
        slot.storage = storage_of(cnp.PyArray_TYPE(p)) if storage < 0 else storage
        slot.master = NULL
        slot.stochastic = False
        slot.round_key = 0
        slot.avg = NULL
        self.total += slot.size
        self.count += 1

    def fill(self, list params, list grads, tuple buffer_lists, list storage=None,
             list masters=None, list round_keys=None):
        """Load already-validated aligned lists (buffer_lists: per buffer a list or None).

        The half-precision options, per parameter (fastopt/_precision.py):
        ``storage``, its kind (STORAGE_IDS; default: its dtype's, state
        alike); ``masters``, its float32 master array or None; ``round_keys``,
        its stochastic-rounding key or None (round to nearest even).
        """
        cdef Py_ssize_t i, j, n = len(params)
        cdef char* bufs[MAX_BUFFERS]
        cdef Py_ssize_t sizes[MAX_BUFFERS]
        cdef object b, key
        cdef Slot* slot
        self.reserve(n)
        self.count = 0
        self.total = 0
        for i in range(n):
            for j in range(MAX_BUFFERS):
                bufs[j] = NULL
                sizes[j] = 0
                # (None in a list: this parameter has no such buffer, as
                # Adafactor's factors for a vector)
                if (j < len(buffer_lists) and buffer_lists[j] is not None
                        and (<list>buffer_lists[j])[i] is not None):
                    b = (<list>buffer_lists[j])[i]
                    bufs[j] = <char*>cnp.PyArray_DATA(<cnp.ndarray>b)
                    sizes[j] = elements(<cnp.ndarray>b)
            self.put(<cnp.ndarray>params[i], <cnp.ndarray>grads[i], bufs, sizes,
                     -1 if storage is None else <int>storage[i])
            slot = &self.slots[self.count - 1]
            if masters is not None and masters[i] is not None:
                slot.master = <char*>cnp.PyArray_DATA(<cnp.ndarray>masters[i])
            key = None if round_keys is None else round_keys[i]
            if key is not None:
                slot.stochastic = True
                slot.round_key = <unsigned long long>key

    cdef void run(self, int rule, const StepScalars* consts, Py_ssize_t step,
                  bint first_step) noexcept:
        if self.count == 0:
            return
        if self.total >= NOGIL_MIN_SIZE:
            with nogil:
                runner(rule, self.slots, self.count, consts, step, first_step, max_threads)
        else:
            runner(rule, self.slots, self.count, consts, step, first_step, max_threads)
