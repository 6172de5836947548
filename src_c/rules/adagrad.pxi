# Adagrad (torch.optim.Adagrad): the accumulated squared gradient, a decaying lr.
# Included by the generated src_c/_rules.pxi into each _kernels_<isa> module;
# see src_c/rules/table.py for the contract every rule file fulfils.

cdef inline void adagrad_loop(floating* p, const floating* g, floating* state_sum,
                              Py_ssize_t n, const StepScalars* s, bint decay,
                              bint sparse_rows) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating neg_clr = <floating>(-s.lr)
    cdef floating eps = <floating>s.eps
    cdef floating gi, acc
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if decay:
            gi = gi + wd * p[i]
        acc = state_sum[i] + gi * gi
        state_sum[i] = acc
        if sparse_rows:
            # torch's sparse path divides first and scales after (param.add_
            # with alpha=-clr): the same value, rounded differently
            p[i] = p[i] + neg_clr * (gi / (root(acc) + eps))
        else:
            p[i] = p[i] + neg_clr * gi / (root(acc) + eps)


cdef void adagrad_kernel(floating* p, const floating* g, floating** bufs,
                         Py_ssize_t n, const StepScalars* s) noexcept nogil:
    # (weight decay and sparse rows never meet: torch refuses the pair)
    if s.sparse_rows:
        adagrad_loop(p, g, bufs[0], n, s, False, True)
    elif s.weight_decay != 0:
        adagrad_loop(p, g, bufs[0], n, s, True, False)
    else:
        adagrad_loop(p, g, bufs[0], n, s, False, False)


cdef inline void adagrad_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    # torch: clr = lr / (1 + (step - 1) * lr_decay), the subtraction on
    # integers (exact), then one rounding to double, as Python does
    s.lr = s.base_lr / (1.0 + <double>(step - 1) * s.lr_decay)
