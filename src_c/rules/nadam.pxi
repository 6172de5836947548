# NAdam (torch.optim.NAdam): Adam with Nesterov momentum, momentum_decay.
# Included by the generated src_c/_rules.pxi into each _kernels_<isa> module;
# see src_c/rules/table.py for the contract every rule file fulfils.
#
# The two step sizes depend on the parameter's mu_product, a scalar state the
# API layer keeps (state_in[0] before the step, state_out[0] after it).

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
    # torch, in Python floats, except mu_product: a float32 tensor there, so
    # the product is formed in float32 and rounded
    cdef double t = <double>step
    cdef double mu = s.beta1 * (1.0 - 0.5 * pow(0.96, t * s.momentum_decay))
    cdef double mu_next = s.beta1 * (1.0 - 0.5 * pow(0.96, (t + 1.0) * s.momentum_decay))
    cdef double mu_product = <double>(<float>s.state_in[0] * <float>mu)
    s.bc2 = 1.0 - pow(s.beta2, t)
    s.state_out[0] = mu_product
    # torch divides by zero here; the Python layer refuses the step instead
    s.state_invalid = mu_product == 1.0 or mu_product * mu_next == 1.0
    if s.state_invalid:
        s.grad_coef = 0.0
        s.avg_coef = 0.0
        return
    s.grad_coef = -s.base_lr * (1.0 - mu) / (1.0 - mu_product)
    s.avg_coef = (-s.base_lr * mu_next) / (1.0 - mu_product * mu_next)
