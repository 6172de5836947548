# SparseAdam (torch.optim.SparseAdam): torch's lazy Adam for embedding tables.
# Included by the generated src_c/_rules.pxi into each _kernels_<isa> module;
# see src_c/rules/table.py for the contract every rule file fulfils.
#
# The kernel is the update of the rows a step lists: the runner hands it the
# listed rows only (src_c/fastpath/rows.pxi), so untouched rows keep their
# moments, which is what makes it lazy. Per element, as torch forms it:
#
#     m += (1 - beta1) * (g - m)
#     v += (1 - beta2) * (g * g - v)
#     p += -step_size * (m / (sqrt(v) + eps)),   step_size = lr * sqrt(bc2) / bc1
#
# Note that, unlike Adam, the bias correction of v is folded into the step
# size, not into the denominator: the eps sits outside it.

cdef void sparse_adam_kernel(floating* p, const floating* g, floating** bufs,
                             Py_ssize_t n, const StepScalars* s) noexcept nogil:
    cdef floating* exp_avg = bufs[0]
    cdef floating* exp_avg_sq = bufs[1]
    cdef floating sign = <floating>s.sign
    cdef floating one_minus_beta1 = <floating>(1.0 - s.beta1)
    cdef floating one_minus_beta2 = <floating>(1.0 - s.beta2)
    cdef floating eps = <floating>s.eps
    cdef floating neg_step_size = <floating>(-s.lr)
    cdef floating gi, m, v
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        m = exp_avg[i] + (gi - exp_avg[i]) * one_minus_beta1
        exp_avg[i] = m
        v = exp_avg_sq[i] + (gi * gi - exp_avg_sq[i]) * one_minus_beta2
        exp_avg_sq[i] = v
        p[i] = p[i] + neg_step_size * (m / (root(v) + eps))


cdef inline void sparse_adam_at_step(StepScalars* s, Py_ssize_t step,
                                     bint first_step) noexcept nogil:
    # torch: step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
    cdef double t = <double>step
    s.lr = s.base_lr * sqrt(1.0 - pow(s.beta2, t)) / (1.0 - pow(s.beta1, t))
