# Lamb (optax.lamb): Adam's update, rescaled per parameter by the trust ratio
# ||p|| / ||u||. Included by the generated src_c/_rules.pxi into each
# _kernels_<isa> module; see src_c/rules/table.py for the contract every rule
# file fulfils, and for REDUCES: a reducing rule runs in two passes.
#
# Pass 0 forms the moments and u without storing them, and adds, lane by
# lane, p*p and u*u into s.acc[0..LANES) and s.acc[LANES..2*LANES);
# lamb_finish turns a parameter's two sums into its trust ratio; pass 1 forms
# the moments and u again from the same inputs (the same bits), stores the
# moments and moves p. Pass 0 writes nothing, so on staged (half) storage
# both passes see the same stored values and the step is the float32 rule
# rounded once, as for every one-pass rule. Element i of a call goes to lane
# i % LANES: the
# runner starts every call of pass 0 at a multiple of LANES of its parameter
# (a block of STATS_BLOCK; staged storage cuts it in STAGE pieces), so the
# sums do not depend on how the work was split.

cdef inline floating lamb_update(floating p, floating m, floating v, floating bc1,
                                 floating bc2, floating eps, floating wd,
                                 bint decay) noexcept nogil:
    # optax: mu_hat / (sqrt(nu_hat) + eps), then + weight_decay * p
    cdef floating u = (m / bc1) / (root(v / bc2) + eps)
    if decay:
        u = u + wd * p
    return u


cdef inline void lamb_moments(const floating* p, const floating* g, const floating* mu,
                              const floating* nu,
                              Py_ssize_t n, const StepScalars* s, bint decay) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating beta1 = <floating>s.beta1
    cdef floating one_minus_beta1 = <floating>(1.0 - s.beta1)
    cdef floating beta2 = <floating>s.beta2
    cdef floating one_minus_beta2 = <floating>(1.0 - s.beta2)
    cdef floating bc1 = <floating>s.bc1
    cdef floating bc2 = <floating>s.bc2
    cdef floating eps = <floating>s.eps
    cdef floating gi, m, v
    # u a chunk at a time on the stack, then both sums over the chunk: two
    # simple loops the compiler vectorizes. Local sums: the compiler cannot
    # tell s.acc from p. STAGE is a multiple of LANES, so every element keeps
    # its lane (i % LANES) whatever the chunking.
    cdef floating u[STAGE]
    cdef double pp[LANES]
    cdef double uu[LANES]
    cdef double* acc = <double*>s.acc
    cdef Py_ssize_t i, j, start, size
    for j in range(LANES):
        pp[j] = acc[j]
        uu[j] = acc[LANES + j]
    start = 0
    while start < n:
        size = n - start if n - start < STAGE else STAGE
        for i in range(size):
            gi = sign * g[start + i]
            m = one_minus_beta1 * gi + beta1 * mu[start + i]
            v = one_minus_beta2 * (gi * gi) + beta2 * nu[start + i]
            u[i] = lamb_update(p[start + i], m, v, bc1, bc2, eps, wd, decay)
        lane_sumsq(p + start, size, pp)
        lane_sumsq(u, size, uu)
        start += size
    for j in range(LANES):
        acc[j] = pp[j]
        acc[LANES + j] = uu[j]


cdef inline void lamb_apply(floating* p, const floating* g, floating* mu, floating* nu,
                            Py_ssize_t n, const StepScalars* s, bint decay) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating beta1 = <floating>s.beta1
    cdef floating one_minus_beta1 = <floating>(1.0 - s.beta1)
    cdef floating beta2 = <floating>s.beta2
    cdef floating one_minus_beta2 = <floating>(1.0 - s.beta2)
    cdef floating bc1 = <floating>s.bc1
    cdef floating bc2 = <floating>s.bc2
    cdef floating eps = <floating>s.eps
    cdef floating trust = <floating>s.trust
    cdef floating neg_lr = <floating>(-s.lr)
    cdef floating gi, m, v, q
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        m = one_minus_beta1 * gi + beta1 * mu[i]
        v = one_minus_beta2 * (gi * gi) + beta2 * nu[i]
        mu[i] = m
        nu[i] = v
        q = p[i]
        # optax: (u * trust_ratio) * -lr, added to p
        p[i] = q + (lamb_update(q, m, v, bc1, bc2, eps, wd, decay) * trust) * neg_lr


cdef void lamb_kernel(floating* p, const floating* g, floating** bufs,
                      Py_ssize_t n, const StepScalars* s) noexcept nogil:
    cdef bint decay = s.weight_decay != 0
    if s.phase == 0:
        if decay:
            lamb_moments(p, g, bufs[0], bufs[1], n, s, True)
        else:
            lamb_moments(p, g, bufs[0], bufs[1], n, s, False)
    else:
        if decay:
            lamb_apply(p, g, bufs[0], bufs[1], n, s, True)
        else:
            lamb_apply(p, g, bufs[0], bufs[1], n, s, False)


cdef inline void lamb_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    # optax: 1 - b ** count, the moments divided by it
    cdef double t = <double>step
    s.lr = s.base_lr
    s.bc1 = 1.0 - pow(s.beta1, t)
    s.bc2 = 1.0 - pow(s.beta2, t)


cdef inline void lamb_finish(StepScalars* s, const double* sums) noexcept nogil:
    # optax: ||p|| / ||u||, and 1 where either norm is 0
    cdef double param_norm = sqrt(sums[0])
    cdef double update_norm = sqrt(sums[1])
    if param_norm == 0.0 or update_norm == 0.0:
        s.trust = 1.0
    else:
        s.trust = param_norm / update_norm
