# RowWiseAdagrad (FBGEMM's exact row-wise Adagrad): one accumulator per row.
# Included by the generated src_c/_rules.pxi into each _kernels_<isa> module;
# see src_c/rules/table.py for the contract, and for SLOTWISE: the runner
# hands this rule whole parameters or whole listed rows, never element ranges.
#
# A row is a vector along the last axis (an embedding). Per row r of D
# elements, with g after maximize and coupled weight decay:
#
#     sum[r] = sum[r] + mean(g_r * g_r)           (the mean in double, then rounded)
#     p_r    = p_r - (lr / (sqrt(sum[r]) + eps)) * g_r
#
# so the state is rows x 1 instead of rows x D. The mean's sum is in double
# with LANES running sums (element i into lane i % LANES) added in lane order:
# an order fixed by D alone, so the bits depend on no thread split or ISA.

cdef inline void rowwise_adagrad_row(floating* p, const floating* g, floating* acc,
                                     Py_ssize_t d, const StepScalars* s) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef bint decay = s.weight_decay != 0
    cdef double lanes[LANES]
    cdef double total = 0.0
    cdef floating gi, sq, multiplier
    cdef Py_ssize_t i
    cdef int j
    for j in range(LANES):
        lanes[j] = 0.0
    for i in range(d):
        gi = sign * g[i]
        if decay:
            gi = gi + wd * p[i]
        lanes[i % LANES] += <double>gi * <double>gi
    for j in range(LANES):
        total += lanes[j]
    sq = acc[0] + <floating>(total / <double>d)
    acc[0] = sq
    multiplier = <floating>s.lr / (root(sq) + <floating>s.eps)
    for i in range(d):
        gi = sign * g[i]
        if decay:
            gi = gi + wd * p[i]
        p[i] = p[i] - multiplier * gi


cdef void rowwise_adagrad_slot(floating* p, const floating* g, floating** bufs, Py_ssize_t n,
                               Py_ssize_t rows, Py_ssize_t cols, const StepScalars* s,
                               int threads) noexcept nogil:
    # (cols = 0: a parameter of fewer than two dimensions, one row of n)
    cdef Py_ssize_t width = cols if cols > 0 else n
    cdef Py_ssize_t r, count = n // width if width > 0 else 0
    if threads > 1 and count > 1:
        for r in prange(count, num_threads=threads, schedule="static"):
            rowwise_adagrad_row(p + r * width, g + r * width, bufs[0] + r, width, s)
    else:
        for r in range(count):
            rowwise_adagrad_row(p + r * width, g + r * width, bufs[0] + r, width, s)


cdef inline void rowwise_adagrad_at_step(StepScalars* s, Py_ssize_t step,
                                         bint first_step) noexcept nogil:
    s.lr = s.base_lr
