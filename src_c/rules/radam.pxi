# RAdam (torch.optim.RAdam): Adam whose adaptive step is switched on, and
# scaled by a rectification term, once the variance estimate is trustworthy.
# Included by the generated src_c/_rules.pxi into each _kernels_<isa> module;
# see src_c/rules/table.py for the contract every rule file fulfils.
#
# Whether this step is rectified (rho_t > 5) is one decision per step, made
# in radam_at_step: the loop never tests it per element.

cdef inline void radam_loop(floating* p, const floating* g, floating* exp_avg,
                            floating* exp_avg_sq, Py_ssize_t n, const StepScalars* s,
                            bint coupled_decay, bint rectified) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating decay = <floating>s.decay
    cdef floating one_minus_beta1 = <floating>(1.0 - s.beta1)
    cdef floating beta2 = <floating>s.beta2
    cdef floating one_minus_beta2 = <floating>(1.0 - s.beta2)
    cdef floating bc1 = <floating>s.bc1
    cdef floating bc2_sqrt = <floating>s.bc2_sqrt
    cdef floating rect = <floating>s.rect
    cdef floating eps = <floating>s.eps
    cdef floating lr = <floating>s.lr
    cdef floating gi, m, v, q
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        q = p[i] * decay          # decoupled decay first (decay is 1.0 when off: exact)
        if coupled_decay:
            gi = gi + wd * p[i]
        m = lerp(exp_avg[i], gi, one_minus_beta1)
        exp_avg[i] = m
        v = exp_avg_sq[i] * beta2 + one_minus_beta2 * gi * gi
        exp_avg_sq[i] = v
        # torch: (m / bc1) * lr, then * (bc2 ** 0.5 / (sqrt(v) + eps)) * rect,
        # where a scalar over a tensor is the tensor's reciprocal times the scalar
        if rectified:
            p[i] = q - ((m / bc1) * lr * ((<floating>1 / (root(v) + eps)) * bc2_sqrt)) * rect
        else:
            p[i] = q - (m / bc1) * lr


cdef void radam_kernel(floating* p, const floating* g, floating** bufs,
                       Py_ssize_t n, const StepScalars* s) noexcept nogil:
    cdef bint wd = s.weight_decay != 0
    if s.rectified:
        if wd:
            radam_loop(p, g, bufs[0], bufs[1], n, s, True, True)
        else:
            radam_loop(p, g, bufs[0], bufs[1], n, s, False, True)
    else:
        if wd:
            radam_loop(p, g, bufs[0], bufs[1], n, s, True, False)
        else:
            radam_loop(p, g, bufs[0], bufs[1], n, s, False, False)


cdef inline void radam_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    # torch, in Python floats: the bias corrections, the length of the
    # approximated simple moving average rho_t and its limit rho_inf
    cdef double t = <double>step
    cdef double bc2 = 1.0 - pow(s.beta2, t)
    cdef double rho_inf = 2.0 / (1.0 - s.beta2) - 1.0
    cdef double rho_t = rho_inf - 2.0 * t * pow(s.beta2, t) / bc2
    s.lr = s.base_lr
    s.bc1 = 1.0 - pow(s.beta1, t)
    s.bc2_sqrt = pow(bc2, 0.5)
    s.rectified = rho_t > 5.0
    if s.rectified:
        s.rect = pow((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                     / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 0.5)
    else:
        s.rect = 0.0
