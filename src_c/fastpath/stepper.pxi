# The whole step in C: fast_step, the optimizer's StepLock and its Stepper.
# Included by src_c/_fastpath.pyx, whose header defines the vocabulary.

# ------------------------------------------------------------ whole step

# A whole step's outcome besides DONE: the Python path must take over. Nothing
# was modified in either case.
DONE = 0
NEEDS_PYTHON = 1


cdef int fast_step(list groups, list grads, object state, list workspaces, Guard guard,
                   tuple names, bint counts_steps) except -1:
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
    """
    cdef Py_ssize_t gi, start = 0, stop, total = 0, step
    cdef Py_ssize_t ngroups = len(groups)
    cdef object checked, params, group
    cdef CheckedGroup plan
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
        if type(checked) is not CheckedGroup:
            return NEEDS_PYTHON
        plan = <CheckedGroup>checked
        params = (<dict>groups[gi])["params"]
        stop = start + len(<list>params)
        ws = <Workspace?>workspaces[gi]
        if gather_group(ws, params, grads, start, stop, <dict>state, names,
                        plan.needs, counts_steps, &step) != GATHERED:
            return NEEDS_PYTHON
        ws.step_scalars = plan.scalars
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
