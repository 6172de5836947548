# Scalars: a group's step-independent kernel scalars; the per-step ones from them.
# Included by src_c/_fastpath.pyx, whose header defines the vocabulary.

# ------------------------------------------------------------ step scalars

# StepScalars' fields, all zero: what a rule's consts start from. A rule sets
# only the fields its kernel reads (fastopt/optim/<rule>.py says which).
cdef StepScalars _ZERO
memset(&_ZERO, 0, sizeof(_ZERO))
_ZERO.decay = 1.0  # AdamW's p *= decay: 1.0 is "off" (and exact)
_FIELDS = frozenset(<dict>_ZERO) - {"base_lr", "sign", "first_step", "flush_denormals",
                                    "state_in", "state_out", "state_invalid", "phase", "acc",
                                    "trust", "one"}


cdef class Scalars:
    """A rule's step-independent scalars; the compute layer's at_step adds the rest.

    Built once per group from validated hyperparameters and reused every
    step, so a step only computes what depends on the step count - once, in
    double precision, with the operations torch.optim uses in Python (each
    rule's ``<rule>_at_step`` in src_c/rules/).

    Parameters
    ----------
    rule : int
        The rule's id (``RULE_IDS``).
    lr : float
        The group's learning rate (``base_lr``, from which at_step derives ``lr``).
    maximize : bool
        Ascend: the gradient's sign flips.
    grad_scale : float
        The factor the gradients carry (torch's GradScaler): folded into the
        sign the kernels multiply every gradient by, so unscaling costs no
        pass. Exact for a power of two, which is what GradScaler uses.
    flush_denormals : bool
        Run the kernels with FTZ/DAZ on.
    **consts
        Any other field of StepScalars (see _common.pxd) the rule's kernel reads.
    """
    cdef readonly int rule
    cdef StepScalars s

    def __init__(self, int rule, *, double lr=0.0, bint maximize=False, double grad_scale=1.0,
                 bint flush_denormals=False, **consts):
        if not 0 <= rule < RULE_COUNT:
            raise ValueError(f"unknown rule {rule}")
        unknown = consts.keys() - _FIELDS
        if unknown:
            raise TypeError(f"StepScalars has no field {sorted(unknown)[0]!r}")
        fields = <dict>_ZERO
        fields.update(consts)
        self.s = fields
        self.rule = rule
        self.s.base_lr = lr
        self.s.sign = (-1.0 if maximize else 1.0) / grad_scale
        self.s.flush_denormals = flush_denormals
        self.s.one = 1.0  # (read by the kernels as a value the compiler cannot see)

    def scaled(self, double factor):
        """A copy whose kernels multiply every gradient by ``factor`` as well.

        Gradient clipping's coefficient, folded into the sign the kernels
        already multiply by: for grad_scale 1 the product is exact, so the
        kernel's ``g * coef`` rounds once, as torch's ``grad.mul_(coef)``.
        """
        cdef Scalars out = Scalars.__new__(Scalars)
        out.rule = self.rule
        out.s = self.s
        out.s.sign = self.s.sign * factor
        return out

    def values(self, Py_ssize_t step=1, bint first_step=False):
        """The scalars a kernel would get at ``step`` (for tests and debugging)."""
        cdef StepScalars s = self.s
        at_step(self.rule, &s, step, first_step)
        return s

    def set_state(self, values):
        """Load a parameter's scalar state (the rule's order) for the steps that follow."""
        cdef Py_ssize_t k
        if len(values) > MAX_SCALARS:
            raise ValueError(f"at most {MAX_SCALARS} scalar state values")
        for k in range(len(values)):
            self.s.state_in[k] = values[k]

    def next_state(self, Py_ssize_t step, values):
        """The scalar state after a step at ``step`` from ``values``, or None if it cannot be formed.

        Changes nothing: the rule's at_step runs on a copy.
        """
        cdef StepScalars s = self.s
        cdef Py_ssize_t k, n = len(values)
        if n > MAX_SCALARS:
            raise ValueError(f"at most {MAX_SCALARS} scalar state values")
        for k in range(n):
            s.state_in[k] = values[k]
        at_step(self.rule, &s, step, False)
        if s.state_invalid:
            return None
        return tuple([s.state_out[k] for k in range(n)])


cdef class CheckedGroup:
    """What the Python layer derived from one param group, cached on it until an edit.

    Attributes
    ----------
    hyper : dict
        Every validated hyperparameter of the group.
    kernel_hyper : dict
        The ones the rule's kernel takes (its keyword arguments).
    needs : tuple of bool
        Which of the rule's state buffers these options use, in its order.
    scalars : Scalars
        The kernel's step-independent scalars.
    """
    cdef readonly dict hyper
    cdef readonly dict kernel_hyper
    cdef readonly tuple needs
    cdef readonly Scalars scalars

    def __init__(self, dict hyper, dict kernel_hyper, tuple needs, Scalars scalars):
        self.hyper = hyper
        self.kernel_hyper = kernel_hyper
        self.needs = needs
        self.scalars = scalars


cdef void run(Workspace ws, Scalars scalars, Py_ssize_t step, bint first_step) noexcept:
    ws.run(scalars.rule, &scalars.s, step, first_step)


def run_workspace(Workspace ws, Scalars scalars, Py_ssize_t step, bint first_step):
    """Run the loaded workspace with ``scalars`` at ``step`` (Python entry)."""
    run(ws, scalars, step, first_step)


def stream(Workspace ws):
    """Run the bandwidth probe over a workspace loaded as (a, b, (c, d, None))."""
    cdef StepScalars s
    memset(&s, 0, sizeof(s))
    ws.run(RULE_STREAM, &s, 0, False)


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
    ws.run(RULE_AXPY, &s, 0, False)


def ema(Workspace ws, double weight):
    """p = lerp(p, g, weight) over a loaded workspace (p: the averages, g: the params)."""
    cdef StepScalars s
    memset(&s, 0, sizeof(s))
    s.lr = weight
    ws.run(RULE_EMA, &s, 0, False)


def scale(Workspace ws, double a):
    """p *= a over a loaded workspace."""
    cdef StepScalars s
    memset(&s, 0, sizeof(s))
    s.lr = a
    ws.run(RULE_SCALE, &s, 0, False)
