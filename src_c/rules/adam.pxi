# Adam / AdamW (torch.optim.Adam, decoupled_weight_decay): AMSGrad too.
# Included by the generated src_c/_rules.pxi into each _kernels_<isa> module;
# see src_c/rules/table.py for the contract every rule file fulfils.

cdef inline void adam_loop(floating* p, const floating* g, floating* exp_avg,
                           floating* exp_avg_sq, floating* max_exp_avg_sq, Py_ssize_t n,
                           const StepScalars* s, bint coupled_decay,
                           bint amsgrad) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating decay = <floating>s.decay
    cdef floating one_minus_beta1 = <floating>(1.0 - s.beta1)
    cdef floating beta2 = <floating>s.beta2
    cdef floating one_minus_beta2 = <floating>(1.0 - s.beta2)
    cdef floating bc2_sqrt = <floating>s.bc2_sqrt
    cdef floating eps = <floating>s.eps
    cdef floating neg_step_size = <floating>(-s.lr)
    cdef floating gi, m, v
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if coupled_decay:
            gi = gi + wd * p[i]
        m = lerp(exp_avg[i], gi, one_minus_beta1)
        exp_avg[i] = m
        v = exp_avg_sq[i] * beta2 + one_minus_beta2 * gi * gi
        exp_avg_sq[i] = v
        if amsgrad:
            v = nan_max(max_exp_avg_sq[i], v)
            max_exp_avg_sq[i] = v
        p[i] = p[i] * decay + neg_step_size * m / (root(v) / bc2_sqrt + eps)


cdef void adam_kernel(floating* p, const floating* g, floating** bufs,
                      Py_ssize_t n, const StepScalars* s) noexcept nogil:
    cdef bint wd = s.weight_decay != 0
    if s.amsgrad:
        if wd:
            adam_loop(p, g, bufs[0], bufs[1], bufs[2], n, s, True, True)
        else:
            adam_loop(p, g, bufs[0], bufs[1], bufs[2], n, s, False, True)
    else:
        if wd:
            adam_loop(p, g, bufs[0], bufs[1], NULL, n, s, True, False)
        else:
            adam_loop(p, g, bufs[0], bufs[1], NULL, n, s, False, False)


cdef inline void adam_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    # torch: step_size = lr / (1 - beta1 ** t); bias_correction2 ** 0.5
    cdef double t = <double>step
    s.lr = s.base_lr / (1.0 - pow(s.beta1, t))
    s.bc2_sqrt = pow(1.0 - pow(s.beta2, t), 0.5)
