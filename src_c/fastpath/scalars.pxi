# Scalars: a group's step-independent kernel scalars; the per-step ones from them.
# Included by src_c/_fastpath.pyx, whose header defines the vocabulary.

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
