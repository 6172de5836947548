# NAdam (torch.optim.NAdam): Adam with Nesterov momentum, momentum_decay.
# Included by the generated src_c/_rules.pxi into each _kernels_<isa> module;
# see src_c/rules/table.py for the contract every rule file fulfils.
#
# The two step sizes depend on the parameter's mu_product, a scalar state the
# API layer keeps and advances (fastopt/optim/nadam.py): it hands them over
# as s.grad_coef and s.avg_coef. Only the bias correction is formed here.

cdef inline void nadam_loop(floating* p, const floating* g, floating* exp_avg,
                            floating* exp_avg_sq, Py_ssize_t n, const StepScalars* s,
                            bint coupled_decay) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating decay = <floating>s.decay
    cdef floating one_minus_beta1 = <floating>(1.0 - s.beta1)
    cdef floating beta2 = <floating>s.beta2
    cdef floating one_minus_beta2 = <floating>(1.0 - s.beta2)
    cdef floating bc2 = <floating>s.bc2
    cdef floating eps = <floating>s.eps
    cdef floating grad_coef = <floating>s.grad_coef
    cdef floating avg_coef = <floating>s.avg_coef
    cdef floating gi, m, v, denom, q
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
        denom = root(v / bc2) + eps
        # torch: two addcdiv_, each p + coef * (x / denom), in this order
        q = q + grad_coef * (gi / denom)
        p[i] = q + avg_coef * (m / denom)


cdef void nadam_kernel(floating* p, const floating* g, floating** bufs,
                       Py_ssize_t n, const StepScalars* s) noexcept nogil:
    if s.weight_decay != 0:
        nadam_loop(p, g, bufs[0], bufs[1], n, s, True)
    else:
        nadam_loop(p, g, bufs[0], bufs[1], n, s, False)


cdef inline void nadam_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    # torch: bias_correction2 = 1 - beta2 ** step
    s.bc2 = 1.0 - pow(s.beta2, <double>step)
