# fastopt.torch's fast path over torch tensors (no torch import).
# Included by src_c/_fastpath.pyx, whose header defines the vocabulary.

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
    with the pointers of params and state buffers (``expected``: per slot,
    ``(name, tensor, data_ptr, numel)`` of each state tensor it reads), for
    a rule whose state is shaped by the param's dimensions each param's
    shape (``shapes``), and for a rule with
    scalar state (NAdam's mu_product) the addresses of each param's scalar
    tensors. tensor_step re-checks each step what can change without the
    optimizer seeing it.
    """
    cdef Workspace ws
    cdef list params, dtypes, states, expected
    cdef list shapes                   # per slot: the param's shape, or None (any shape)
    cdef Py_ssize_t* slot_of
    cdef char** counters
    cdef bint* counter_f64
    cdef Scalars scalars
    cdef bint counts_steps
    cdef Py_ssize_t nscalars           # scalar state values per param (0: none)
    cdef char** scalar_ptrs            # [slot * nscalars + j]: one-element tensor data
    cdef bint* scalar_f64
    cdef double next_values[MAX_SCALARS]

    def __cinit__(self):
        self.slot_of = NULL
        self.counters = NULL
        self.counter_f64 = NULL
        self.scalar_ptrs = NULL
        self.scalar_f64 = NULL

    def __init__(self, Workspace ws, list params, list slot_of, list dtypes, list states,
                 list expected, list counters, Scalars scalars, bint counts_steps,
                 list scalar_views=None, list shapes=None):
        cdef Py_ssize_t i, j, n = len(counters)
        cdef cnp.ndarray view
        if len(slot_of) != len(params) or not (len(dtypes) == len(states) == len(expected) == n
                                                 == ws.count):
            raise ValueError("internal: TensorGroup lists do not match")
        self.ws, self.params, self.dtypes = ws, params, dtypes
        self.states, self.expected, self.shapes = states, expected, shapes
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
        # per slot, a tuple of one-element float32/float64 views of its scalar state
        self.nscalars = len(scalar_views[0]) if scalar_views else 0
        if self.nscalars:
            if len(scalar_views) != n or self.nscalars > MAX_SCALARS:
                raise ValueError("internal: TensorGroup scalar views do not match")
            self.scalar_ptrs = <char**>realloc(NULL, n * self.nscalars * sizeof(char*))
            self.scalar_f64 = <bint*>realloc(NULL, n * self.nscalars * sizeof(bint))
            if self.scalar_ptrs == NULL or self.scalar_f64 == NULL:
                raise MemoryError()
            for i in range(n):
                for j in range(self.nscalars):
                    view = <cnp.ndarray>(<tuple>scalar_views[i])[j]
                    self.scalar_ptrs[i * self.nscalars + j] = <char*>cnp.PyArray_DATA(view)
                    self.scalar_f64[i * self.nscalars + j] = cnp.PyArray_TYPE(view) == cnp.NPY_FLOAT64

    def __dealloc__(self):
        free(self.slot_of)
        free(self.counters)
        free(self.counter_f64)
        free(self.scalar_ptrs)
        free(self.scalar_f64)

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
        cdef object p, g, dtype, st, pair, t
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
            # ... and they still have the memory the slot points at: the same
            # object can be given other storage (t.data = ..., set_, resize_),
            # and the kernel would then write where the old storage was
            for pair in <tuple>self.expected[k]:
                t = (<dict>st).get((<tuple>pair)[0])
                if (t is not (<tuple>pair)[1] or t.data_ptr() != (<tuple>pair)[2]
                        or t.numel() != (<tuple>pair)[3] or t.is_contiguous() is not True):
                    return False
            # a rule that reads rows and columns (Adafactor) also needs the
            # param's shape unchanged (p.data = p.data.view(...) keeps its memory)
            if self.shapes is not None and p.shape != self.shapes[k]:
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

    cdef double scalar(self, Py_ssize_t k) noexcept:
        if self.scalar_f64[k]:
            return (<double*>self.scalar_ptrs[k])[0]
        return (<float*>self.scalar_ptrs[k])[0]

    cdef bint load_scalars(self, Py_ssize_t step) noexcept:
        """Every param's scalar state equal: load it for this step (False: Python's turn)."""
        cdef Py_ssize_t i, j, m = self.nscalars
        cdef StepScalars s
        if m == 0:
            return True
        if self.ws.count == 0:
            return False
        for i in range(self.ws.count):
            for j in range(m):
                if self.scalar(i * m + j) != self.scalar(j):
                    return False  # params at different values: one call each, in Python
        s = self.scalars.s
        for j in range(m):
            s.state_in[j] = self.scalar(j)
        at_step(self.scalars.rule, &s, step, False)
        if s.state_invalid:
            return False
        for j in range(m):
            self.scalars.s.state_in[j] = s.state_in[j]
            self.next_values[j] = s.state_out[j]
        return True

    cdef void commit_scalars(self) noexcept:
        """Each param's scalar tensors take the values after the step, in their dtype."""
        cdef Py_ssize_t i, j, k, m = self.nscalars
        for i in range(self.ws.count):
            for j in range(m):
                k = i * m + j
                if self.scalar_f64[k]:
                    (<double*>self.scalar_ptrs[k])[0] = self.next_values[j]
                else:
                    (<float*>self.scalar_ptrs[k])[0] = <float>self.next_values[j]

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
            if not tg.load_scalars(<Py_ssize_t>step):
                return NEEDS_PYTHON
        elif tg.nscalars:
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
            tg.commit_scalars()
        else:
            run(tg.ws, tg.scalars, 0, False)
    return DONE
