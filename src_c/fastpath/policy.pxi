# Policy: an optimizer's half-precision options, as the screen applies them.
# Included by src_c/_fastpath.pyx, whose header defines the vocabulary.

# ------------------------------------------------------------------ policy
# A parameter's dtype alone gives its storage kind only under the default
# policy (state like the parameter, rounding to nearest). Under any other -
# state_dtype, master_weights, stochastic_rounding - fastopt/_precision.py
# decides per parameter dtype what its state is stored in, whether it keeps a
# float32 master copy and whether it rounds stochastically; a Policy holds
# those answers per dtype, so that a warm step applies them with no Python.

# The index of a master copy in a Workspace's keep records (the rule's
# buffers are 0 .. MAX_BUFFERS - 1).
cdef enum:
    KEEP_MASTER = MAX_BUFFERS


cdef inline unsigned long long splitmix64(unsigned long long x) noexcept nogil:
    # fastopt/_precision.py's _splitmix64, in 64-bit arithmetic.
    x += 0x9E3779B97F4A7C15ULL
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL
    return x ^ (x >> 31)


cdef class Policy:
    """Per parameter dtype (by its default storage kind): the slot's kind, the
    NumPy type number of its state, whether it has a master copy and whether
    it rounds stochastically. Made by fastopt/_precision.py (Precision.policy).
    """
    cdef int kind[STORAGE_COUNT]
    cdef int state_type[STORAGE_COUNT]
    cdef bint master[STORAGE_COUNT]
    cdef bint stochastic[STORAGE_COUNT]
    cdef bint any_master, any_stochastic
    cdef bint counts_steps  # stochastic rounding counts every parameter's steps (its keys' clock)
    cdef unsigned long long seed_mix  # splitmix64(seed): the first link of every round key

    def __init__(self, list rows, seed, bint counts_steps):
        """``rows``: per default kind, (its kind, state type number, master, stochastic),
        or None for a dtype that cannot occur (bfloat16 without ml_dtypes);
        ``counts_steps``: every rule counts steps (stochastic rounding is on)."""
        cdef int k
        if len(rows) != STORAGE_COUNT:
            raise ValueError("internal: a Policy needs a row per storage kind")
        for k in range(STORAGE_COUNT):
            row = rows[k]
            if row is None:
                self.kind[k], self.state_type[k] = -1, -1
                self.master[k] = self.stochastic[k] = False
                continue
            self.kind[k], self.state_type[k] = row[0], row[1]
            self.master[k], self.stochastic[k] = row[2], row[3]
            self.any_master |= self.master[k]
            self.any_stochastic |= self.stochastic[k]
        self.seed_mix = splitmix64(<unsigned long long>seed)
        self.counts_steps = counts_steps

    def __reduce__(self):
        raise TypeError("a Policy is rebuilt from its Precision, not copied")

    cdef inline unsigned long long round_key(self, Py_ssize_t step,
                                             Py_ssize_t index) noexcept:
        # Precision.round_key(step, index)
        return splitmix64(splitmix64(self.seed_mix ^ <unsigned long long>step)
                          ^ <unsigned long long>index)


cdef inline int kind_under(Policy policy, int own) noexcept:
    """The storage kind of a parameter whose dtype's default kind is ``own`` (-1: none)."""
    if own < 0 or policy is None:
        return own
    return policy.kind[own]


cdef inline int state_type_of(Policy policy, cnp.ndarray p) noexcept:
    """The NumPy type number p's state buffers must have."""
    cdef int own = storage_of(cnp.PyArray_TYPE(p))
    if policy is None or own < 0 or cnp.PyArray_ISCOMPLEX(p):
        return cnp.PyArray_TYPE(p)  # (complex state is complex like its parameter)
    return policy.state_type[own]


cdef inline bint usable_master(object obj, cnp.ndarray p):
    """A float32 master copy of ``p``: usable, writeable and of p's shape."""
    if not usable(obj, True):
        return False
    cdef cnp.ndarray m = <cnp.ndarray>obj
    cdef int d, nd = cnp.PyArray_NDIM(p)
    if cnp.PyArray_TYPE(m) != cnp.NPY_FLOAT32 or cnp.PyArray_NDIM(m) != nd:
        return False
    for d in range(nd):
        if cnp.PyArray_DIMS(m)[d] != cnp.PyArray_DIMS(p)[d]:
            return False
    return True


cdef inline void set_round_keys(Workspace ws, Policy policy, Py_ssize_t start,
                                Py_ssize_t step) noexcept:
    """The round keys of a gathered group's stochastic slots at step ``step``
    (the count after it); slot k is parameter start + k."""
    cdef Py_ssize_t k
    if policy is None or not policy.any_stochastic:
        return
    for k in range(ws.count):
        if ws.slots[k].stochastic:
            ws.slots[k].round_key = policy.round_key(step, start + k)


cdef inline bint counts_under(Policy policy, bint rule_counts) noexcept:
    """Whether a step counts in state["step"]: the rule's own count, or the policy's."""
    return rule_counts or (policy is not None and policy.counts_steps)
