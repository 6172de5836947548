# SGD (torch.optim.SGD): momentum, dampening, Nesterov, coupled weight decay.
# Included by the generated src_c/_rules.pxi into each _kernels_<isa> module;
# see src_c/rules/table.py for the contract every rule file fulfils.

cdef inline void sgd_loop(floating* p, const floating* g, floating* buf, Py_ssize_t n,
                          const StepScalars* s, bint decay, bint use_momentum,
                          bint first_step, bint nesterov) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating neg_lr = <floating>(-s.lr)
    cdef floating mom = <floating>s.momentum
    cdef floating keep = <floating>(1.0 - s.dampening)
    cdef floating gi, b
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if decay:
            gi = gi + wd * p[i]
        if use_momentum:
            if first_step:
                b = gi
            else:
                b = buf[i] * mom + keep * gi
            buf[i] = b
            if nesterov:
                gi = gi + mom * b
            else:
                gi = b
        p[i] = p[i] + neg_lr * gi


cdef void sgd_kernel(floating* p, const floating* g, floating** bufs,
                     Py_ssize_t n, const StepScalars* s) noexcept nogil:
    cdef bint wd = s.weight_decay != 0
    if s.momentum == 0:
        if wd:
            sgd_loop(p, g, NULL, n, s, True, False, False, False)
        else:
            sgd_loop(p, g, NULL, n, s, False, False, False, False)
    elif s.first_step:
        # Runs once per parameter: one generic copy is enough.
        sgd_loop(p, g, bufs[0], n, s, wd, True, True, s.nesterov)
    elif s.nesterov:
        if wd:
            sgd_loop(p, g, bufs[0], n, s, True, True, False, True)
        else:
            sgd_loop(p, g, bufs[0], n, s, False, True, False, True)
    else:
        if wd:
            sgd_loop(p, g, bufs[0], n, s, True, True, False, False)
        else:
            sgd_loop(p, g, bufs[0], n, s, False, True, False, False)


cdef inline void sgd_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    s.lr = s.base_lr
    s.first_step = first_step  # the momentum buffer starts as a copy of g
