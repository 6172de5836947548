# Passes that are not optimizers but run through the same runner: the
# bandwidth probe (stream), gradient accumulation (axpy), clipping (scale) and the
# weight average (ema).
# Included by the generated src_c/_rules.pxi; see src_c/rules/table.py.

cdef void stream_kernel(floating* a, const floating* b, floating** bufs,
                        Py_ssize_t n, const StepScalars* s) noexcept nogil:
    # The bandwidth probe: Adam's memory traffic (read a, b, c, d; write a, c,
    # d: 7 streams) with one add per stream, so memory is all it measures.
    cdef floating* c = bufs[0]
    cdef floating* d = bufs[1]
    cdef floating x
    cdef Py_ssize_t i
    for i in range(n):
        x = b[i]
        a[i] = a[i] + x
        c[i] = c[i] + x
        d[i] = d[i] + x


cdef void axpy_kernel(floating* p, const floating* g, floating** bufs,
                      Py_ssize_t n, const StepScalars* s) noexcept nogil:
    # Gradient accumulation: p += a * g (a = 1 for a sum, 1/k for a mean of k).
    cdef floating a = <floating>s.lr
    cdef Py_ssize_t i
    for i in range(n):
        p[i] = p[i] + a * g[i]


cdef void scale_kernel(floating* p, const floating* g, floating** bufs,
                       Py_ssize_t n, const StepScalars* s) noexcept nogil:
    # Gradient clipping: p *= a.
    cdef floating a = <floating>s.lr
    cdef Py_ssize_t i
    for i in range(n):
        p[i] = p[i] * a


cdef void ema_kernel(floating* p, const floating* g, floating** bufs,
                     Py_ssize_t n, const StepScalars* s) noexcept nogil:
    # The weight average, as torch.optim.swa_utils.get_ema_multi_avg_fn: the
    # average (here p) moves towards the parameter (here g) by w = 1 - decay,
    # with torch's two-form lerp, so w = 1 makes it an exact copy.
    cdef floating w = <floating>s.lr
    cdef Py_ssize_t i
    for i in range(n):
        p[i] = lerp(p[i], g[i], w)


cdef inline void stream_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    pass


cdef inline void axpy_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    pass  # a is s.lr, set by the caller


cdef inline void scale_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    pass  # a is s.lr, set by the caller


cdef inline void ema_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    pass  # w is s.lr, set by the caller
