# Adadelta (torch.optim.Adadelta): step sizes from the ratio of two running
# averages, of squared updates and of squared gradients.
# Included by the generated src_c/_rules.pxi into each _kernels_<isa> module;
# see src_c/rules/table.py for the contract every rule file fulfils.

cdef inline void adadelta_loop(floating* p, const floating* g, floating* square_avg,
                               floating* acc_delta, Py_ssize_t n, const StepScalars* s,
                               bint decay) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating rho = <floating>s.rho
    cdef floating one_minus_rho = <floating>(1.0 - s.rho)
    cdef floating eps = <floating>s.eps
    cdef floating neg_lr = <floating>(-s.lr)
    cdef floating gi, sq, delta
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if decay:
            gi = gi + wd * p[i]
        sq = square_avg[i] * rho + one_minus_rho * gi * gi
        square_avg[i] = sq
        # torch: sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g
        delta = root(acc_delta[i] + eps) / root(sq + eps) * gi
        acc_delta[i] = acc_delta[i] * rho + one_minus_rho * delta * delta
        p[i] = p[i] + neg_lr * delta


cdef void adadelta_kernel(floating* p, const floating* g, floating** bufs,
                          Py_ssize_t n, const StepScalars* s) noexcept nogil:
    if s.weight_decay != 0:
        adadelta_loop(p, g, bufs[0], bufs[1], n, s, True)
    else:
        adadelta_loop(p, g, bufs[0], bufs[1], n, s, False)


cdef inline void adadelta_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    s.lr = s.base_lr  # no schedule of its own
