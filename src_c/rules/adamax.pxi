# Adamax (torch.optim.Adamax): Adam with an infinity norm in place of the
# second moment. Included by the generated src_c/_rules.pxi into each
# _kernels_<isa> module; see src_c/rules/table.py for the contract.

cdef inline void adamax_loop(floating* p, const floating* g, floating* exp_avg,
                             floating* exp_inf, Py_ssize_t n, const StepScalars* s,
                             bint decay) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating one_minus_beta1 = <floating>(1.0 - s.beta1)
    cdef floating beta2 = <floating>s.beta2
    cdef floating eps = <floating>s.eps
    cdef floating neg_clr = <floating>(-s.lr)
    cdef floating gi, m, u
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if decay:
            gi = gi + wd * p[i]
        m = lerp(exp_avg[i], gi, one_minus_beta1)
        exp_avg[i] = m
        # torch.maximum(exp_inf * beta2, |g| + eps): a NaN on either side wins
        u = nan_max(exp_inf[i] * beta2, absolute(gi) + eps)
        exp_inf[i] = u
        p[i] = p[i] + neg_clr * m / u


cdef void adamax_kernel(floating* p, const floating* g, floating** bufs,
                        Py_ssize_t n, const StepScalars* s) noexcept nogil:
    if s.weight_decay != 0:
        adamax_loop(p, g, bufs[0], bufs[1], n, s, True)
    else:
        adamax_loop(p, g, bufs[0], bufs[1], n, s, False)


cdef inline void adamax_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    # torch: clr = lr / (1 - beta1 ** t)
    s.lr = s.base_lr / (1.0 - pow(s.beta1, <double>step))
