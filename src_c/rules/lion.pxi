# Lion (optax.lion): the sign of an interpolated momentum, with decoupled
# weight decay. Included by the generated src_c/_rules.pxi into each
# _kernels_<isa> module; see src_c/rules/table.py for the contract every rule
# file fulfils.

cdef inline floating jnp_sign(floating x, floating one) noexcept nogil:
    # jnp.sign: +1, -1, and x itself for +-0 and NaN (a NaN propagates, unlike
    # torch.sign). Selects from `one` (StepScalars.one, src_c/_kernels.pxi): the
    # signs are as good as random, and a branch mispredicts on every other one.
    return one if x > 0 else (-one if x < 0 else x)


cdef inline void lion_loop(floating* p, const floating* g, floating* exp_avg, Py_ssize_t n,
                           const StepScalars* s, bint decay) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating beta1 = <floating>s.beta1
    cdef floating one_minus_beta1 = <floating>(1.0 - s.beta1)
    cdef floating beta2 = <floating>s.beta2
    cdef floating one_minus_beta2 = <floating>(1.0 - s.beta2)
    cdef floating neg_lr = <floating>(-s.lr)
    cdef floating one = <floating>s.one  # 1 (src_c/_kernels.pxi says why)
    cdef floating gi, m, u
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        m = exp_avg[i]
        # optax: sign((1 - b1) g + b1 m), then + wd * p, then * -lr, added to p
        u = jnp_sign(one_minus_beta1 * gi + beta1 * m, one)
        if decay:
            u = u + wd * p[i]
        p[i] = p[i] + u * neg_lr
        exp_avg[i] = one_minus_beta2 * gi + beta2 * m


cdef void lion_kernel(floating* p, const floating* g, floating** bufs,
                      Py_ssize_t n, const StepScalars* s) noexcept nogil:
    if s.weight_decay != 0:
        lion_loop(p, g, bufs[0], n, s, True)
    else:
        lion_loop(p, g, bufs[0], n, s, False)


cdef inline void lion_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    s.lr = s.base_lr  # no schedule of its own
