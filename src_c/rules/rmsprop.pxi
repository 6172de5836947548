# RMSprop (torch.optim.RMSprop): centered and momentum variants.
# Included by the generated src_c/_rules.pxi into each _kernels_<isa> module;
# see src_c/rules/table.py for the contract every rule file fulfils.

cdef inline void rmsprop_loop(floating* p, const floating* g, floating* square_avg,
                              floating* grad_avg, floating* buf, Py_ssize_t n,
                              const StepScalars* s, bint decay, bint centered,
                              bint use_momentum) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating neg_lr = <floating>(-s.lr)
    cdef floating alpha = <floating>s.alpha
    cdef floating one_minus_alpha = <floating>(1.0 - s.alpha)
    cdef floating eps = <floating>s.eps
    cdef floating mom = <floating>s.momentum
    cdef floating gi, sq, ga, avg, b
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if decay:
            gi = gi + wd * p[i]
        sq = square_avg[i] * alpha + one_minus_alpha * gi * gi
        square_avg[i] = sq
        if centered:
            ga = lerp(grad_avg[i], gi, one_minus_alpha)
            grad_avg[i] = ga
            avg = root(sq - ga * ga) + eps
        else:
            avg = root(sq) + eps
        if use_momentum:
            b = buf[i] * mom + gi / avg
            buf[i] = b
            p[i] = p[i] + neg_lr * b
        else:
            p[i] = p[i] + neg_lr * gi / avg


cdef void rmsprop_kernel(floating* p, const floating* g, floating** bufs,
                         Py_ssize_t n, const StepScalars* s) noexcept nogil:
    cdef floating* sq = bufs[0]
    cdef floating* ga = bufs[1]
    cdef floating* buf = bufs[2]
    if s.weight_decay != 0 or (s.centered and s.momentum > 0):
        # The less common combinations share one generic copy.
        rmsprop_loop(p, g, sq, ga, buf, n, s, s.weight_decay != 0, s.centered,
                     s.momentum > 0)
    elif s.centered:
        rmsprop_loop(p, g, sq, ga, buf, n, s, False, True, False)
    elif s.momentum > 0:
        rmsprop_loop(p, g, sq, ga, buf, n, s, False, False, True)
    else:
        rmsprop_loop(p, g, sq, ga, buf, n, s, False, False, False)


cdef inline void rmsprop_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    s.lr = s.base_lr
