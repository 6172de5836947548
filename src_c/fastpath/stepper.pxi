# The whole step in C: fast_step, the optimizer's StepLock and its Stepper.
# Included by src_c/_fastpath.pyx, whose header defines the vocabulary.

# ------------------------------------------------------------ whole step

# A whole step's outcome besides DONE: the Python path must take over. Nothing
# was modified in either case.
DONE = 0
NEEDS_PYTHON = 1


cdef int fast_step(list groups, list grads, object state, list workspaces, Guard guard,
                   tuple names, bint counts_steps, tuple scalar_names=(),
                   Policy policy=None) except -1:
    """DONE after a whole step, or NEEDS_PYTHON with nothing modified.

    ``groups`` are the optimizer's ParamGroups, each with a ``checked`` cache
    (a CheckedGroup) made by the Python layer. Every
    group is screened and gathered first and the whole step checked for
    aliasing (guard_clear); only if all is ready do the kernels run. Anything
    else - an edited group, a grad count that does not match, a suspect array,
    missing state or grads, uneven steps - returns NEEDS_PYTHON, and the
    Python path validates and reports. Allocates no arrays or containers:
    what the second pass needs (scalars, step) waits in each group's
    Workspace; only the new step count is a new int.

    ``scalar_names``: the rule's per-parameter scalar state (NAdam's
    mu_product). Every parameter of a group must hold the same Python floats
    there (else NEEDS_PYTHON); the rule's at_step forms the step from them
    and the values after it, which are written back to every parameter.

    ``policy``: the half-precision options (None: the default); stochastic
    rounding counts steps even where the rule does not.
    """
    cdef Py_ssize_t gi, start = 0, stop, total = 0, step
    cdef Py_ssize_t ngroups = len(groups)
    cdef object checked, params, group
    cdef CheckedGroup plan
    cdef Workspace ws
    cdef bint counted = counts_under(policy, counts_steps)
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
        if type(checked) is not CheckedGroup:
            return NEEDS_PYTHON
        plan = <CheckedGroup>checked
        params = (<dict>groups[gi])["params"]
        stop = start + len(<list>params)
        ws = <Workspace?>workspaces[gi]
        if gather_group(ws, params, grads, start, stop, <dict>state, names,
                        plan.needs, counted, &step, policy) != GATHERED:
            return NEEDS_PYTHON
        ws.step_scalars = plan.scalars
        ws.step_count = step
        if scalar_names and not load_scalar_state(ws, scalar_names, step + 1):
            return NEEDS_PYTHON
        start = stop
    if not guard_clear(guard, workspaces, ngroups):
        return NEEDS_PYTHON
    start = 0
    for gi in range(ngroups):
        ws = <Workspace>workspaces[gi]
        stop = start + ws.params_in_group
        run(ws, ws.step_scalars, ws.step_count + 1 if counts_steps else 0, False)
        if counted:
            commit_group(ws, ws.step_count + 1)
        if scalar_names:
            commit_scalar_state(ws, scalar_names)
        ws.step_scalars = None
        start = stop
    return DONE


cdef bint load_scalar_state(Workspace ws, tuple scalar_names, Py_ssize_t step) except -1:
    """Load a gathered group's common scalar state into its scalars; False: Python's turn.

    Every slot's state dict (the first item of its ws.keep record) must hold
    an exact float under each name, the same one for every slot, from which
    the rule can form this step (state_invalid unset). The values after the
    step wait in ws.step_values.
    """
    cdef Py_ssize_t k, j, n = len(scalar_names)
    cdef double first[MAX_SCALARS]
    cdef object v
    cdef StepScalars s
    if n > MAX_SCALARS or ws.count == 0:
        return False
    for k in range(ws.count):
        entry = <dict>(<tuple>ws.keep[k])[0]
        for j in range(n):
            v = entry.get(scalar_names[j])
            if type(v) is not float:
                return False
            if k == 0:
                first[j] = <double>v
            elif <double>v != first[j]:
                return False  # parameters at different values: one call each, in Python
    s = ws.step_scalars.s
    for j in range(n):
        s.state_in[j] = first[j]
    at_step(ws.step_scalars.rule, &s, step, False)
    if s.state_invalid:
        return False
    for j in range(n):
        ws.step_scalars.s.state_in[j] = first[j]
    ws.step_values = tuple([s.state_out[j] for j in range(n)])
    return True


cdef int commit_scalar_state(Workspace ws, tuple scalar_names) except -1:
    # Written like the step count (commit_group): not an edit a State counts.
    cdef Py_ssize_t k, j
    for k in range(ws.count):
        entry = <dict>(<tuple>ws.keep[k])[0]
        for j in range(len(scalar_names)):
            entry[scalar_names[j]] = (<tuple>ws.step_values)[j]
    ws.step_values = None
    return 0


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
    cdef tuple names, scalar_names
    cdef bint counts_steps, enabled
    cdef Policy policy

    def __init__(self, StepLock lock, Py_ssize_t bindings, object groups, object state,
                 list workspaces, Guard guard, tuple names, bint counts_steps,
                 bint enabled=True, tuple scalar_names=(), Policy policy=None):
        # bindings: lock.bindings read before the other objects were
        self.lock, self.bindings, self.groups, self.state = lock, bindings, groups, state
        self.workspaces, self.guard = workspaces, guard
        self.names, self.counts_steps, self.enabled = names, counts_steps, enabled
        self.scalar_names = scalar_names
        self.policy = policy

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
                             self.guard, self.names, self.counts_steps, self.scalar_names,
                             self.policy)
        finally:
            self.lock.release_held()
        return code == DONE

    def __reduce__(self):
        raise TypeError("a Stepper is bound to one optimizer's objects; make a new one")
