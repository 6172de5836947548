# Adafactor (torch.optim.Adafactor): a second moment factored over the last two
# dimensions of each parameter, a relative step size, and an update clipped by
# its RMS. Included by the generated src_c/_rules.pxi into each _kernels_<isa>
# module; see src_c/rules/table.py for the contract, and for SLOTWISE: the
# runner hands this rule whole parameters (slots), never element ranges.
#
# Why whole slots: every update needs three numbers of its parameter that only
# a full pass can give (||p|| for the step size, the row and column means of
# g*g, then ||update|| for the clipping), and the factors are shaped
# (..., R, 1) and (..., 1, C), not like p. So a parameter of shape (..., R, C)
# (slot.rows = R, slot.cols = C) is stepped in three passes:
#
#   1. per row: ||p_row||^2 and ||g_row||^2 -> row_var; per column of each
#      matrix: ||g_col||^2 -> col_var (torch's lerp towards the means);
#   2. per element: var = (row_var / mean(row_var)) * col_var and the terms
#      (g / max(var, eps1^2)) * g of ||update||^2;
#   3. p = p * (1 - lr * weight_decay) - (alpha / denom) * update with
#      update = g / sqrt(max(var, eps1^2)), formed again from the same values,
#      so no scratch array.
#
# torch forms var as (row_var * col_var) / mean and the update as
# rsqrt(var) * g, three divisions and a square root per element in each of
# passes 2 and 3; the forms above need one division in pass 2 and a division
# and a square root in pass 3 (2x faster), and differ from torch's by
# rounding alone (tests/test_torch_parity.py holds them to torch's numbers).
#
# A parameter with fewer than two dimensions (slot.cols = 0) keeps a full
# `variance` shaped like p; its passes 1 and 2 are one loop, and for its sums
# it is cut into "rows" of VECTOR_ROW elements.
#
# The bits depend neither on the thread count nor on the ISA level, because
# every sum is in double and in an order fixed by the shape alone:
# - a row's sum: LANES running sums (element i into lane i % LANES), added in
#   lane order (the row means, and the terms of the two norms);
# - a column's sum: its rows in order;
# - a norm: the rows cut into min(rows, SUM_BLOCKS) blocks (block b starts at
#   row b * rows // blocks), each block's rows added in order, then the blocks
#   in order.
# Threads take whole blocks of rows (and, for the column sums, whole
# columns), so they only change who computes each number. The twin
# (fastopt/reference.py) sums in the same order.

cdef enum:
    SUM_BLOCKS = 256     # blocks of rows per parameter, at most (fixed by the shape)
    VECTOR_ROW = 4096    # a vector's rows, for its sums
    COLUMN_CHUNK = 128   # columns one thread sums at a time (their sums on the stack)


cdef inline double row_sumsq(const floating* x, Py_ssize_t n) noexcept nogil:
    """The sum of x's squares in double: LANES running sums, then the lanes in order."""
    cdef double acc[LANES]
    cdef double total = 0.0
    cdef int j
    for j in range(LANES):
        acc[j] = 0.0
    lane_sumsq(x, n, acc)
    for j in range(LANES):
        total += acc[j]
    return total


cdef inline floating type_eps(floating x) noexcept nogil:
    # torch: eps1 = None means finfo(param.dtype).eps
    if floating is float:
        return <floating>FLT_EPSILON
    else:
        return <floating>DBL_EPSILON


cdef inline floating adafactor_u(floating var, floating eps1_sq, floating gi) noexcept nogil:
    # torch: var.clamp_(min=eps1 * eps1).rsqrt_() * grad, as g / sqrt(.): one
    # rounding fewer (a NaN stays NaN)
    return gi / root(nan_max(var, eps1_sq))


cdef inline floating adafactor_u_sq(floating var, floating eps1_sq, floating gi) noexcept nogil:
    # the update's square for its norm, as (g / var) * g: no square root
    return (gi / nan_max(var, eps1_sq)) * gi


cdef inline void lane_sum(const floating* x, Py_ssize_t n, double* acc) noexcept nogil:
    """Add x into acc[0..LANES) in double, element i into lane i % LANES."""
    cdef Py_ssize_t i, j, base
    cdef Py_ssize_t whole = n - n % LANES
    for i in range(whole // LANES):
        base = i * LANES
        for j in range(LANES):
            acc[j] = acc[j] + <double>x[base + j]
    for i in range(whole, n):
        acc[i - whole] = acc[i - whole] + <double>x[i]


cdef inline double row_grad_sums(const floating* g, Py_ssize_t n, floating sign,
                                 double* col_sum) noexcept nogil:
    """||sign * g||^2 of one row, in lanes; each element's square also into col_sum[c]."""
    cdef double acc[LANES]
    cdef double total = 0.0, v
    cdef floating gi
    cdef Py_ssize_t i, j, base
    cdef Py_ssize_t whole = n - n % LANES
    for j in range(LANES):
        acc[j] = 0.0
    for i in range(whole // LANES):
        base = i * LANES
        for j in range(LANES):
            gi = sign * g[base + j]
            v = <double>gi * <double>gi
            acc[j] = acc[j] + v
            col_sum[base + j] = col_sum[base + j] + v
    for i in range(whole, n):
        gi = sign * g[i]
        v = <double>gi * <double>gi
        acc[i - whole] = acc[i - whole] + v
        col_sum[i] = col_sum[i] + v
    for j in range(LANES):
        total += acc[j]
    return total


cdef inline double factored_row(floating* p, const floating* g, floating scale,
                                const floating* col_var, floating eps1_sq, floating sign,
                                Py_ssize_t n, floating decay, floating coef,
                                bint apply, bint decay_on) noexcept nogil:
    """Pass 2 (apply False: returns ||update||^2 of the row) or pass 3 (apply: moves p).

    ``scale``: the row's factor over its matrix's mean, so that the second
    moment of element i is scale * col_var[i].
    """
    # Pass 2 forms the squares a chunk at a time on the stack and sums the
    # chunk in a second loop: two simple loops the compiler vectorizes.
    # STAGE is a multiple of LANES: element i keeps lane i % LANES.
    cdef double acc[LANES]
    cdef floating u_sq[STAGE]
    cdef double total = 0.0
    cdef floating q
    cdef Py_ssize_t i, start, size
    cdef int j
    start = 0
    if apply:
        for i in range(n):
            q = p[i]
            if decay_on:
                q = q * decay
            p[i] = q + coef * adafactor_u(scale * col_var[i], eps1_sq, sign * g[i])
        return 0.0
    for j in range(LANES):
        acc[j] = 0.0
    while start < n:
        size = n - start if n - start < STAGE else STAGE
        for i in range(size):
            u_sq[i] = adafactor_u_sq(scale * col_var[start + i], eps1_sq, sign * g[start + i])
        lane_sum(u_sq, size, acc)
        start += size
    for j in range(LANES):
        total += acc[j]
    return total


cdef inline double vector_pass(floating* p, const floating* g, floating* variance, Py_ssize_t n,
                               floating w, floating eps1_sq, floating sign, floating decay,
                               floating coef, bint apply, bint decay_on) noexcept nogil:
    """A 0-d or 1-d parameter: pass 1+2 (variance, ||update||^2) or pass 3 (moves p)."""
    cdef double acc[LANES]
    cdef floating u_sq[STAGE]
    cdef double total = 0.0
    cdef floating gi, q
    cdef Py_ssize_t i, start, size
    cdef int j
    start = 0
    if apply:
        for i in range(n):
            q = p[i]
            if decay_on:
                q = q * decay
            p[i] = q + coef * adafactor_u(variance[i], eps1_sq, sign * g[i])
        return 0.0
    for j in range(LANES):
        acc[j] = 0.0
    while start < n:  # a chunk on the stack, then its sum (as factored_row)
        size = n - start if n - start < STAGE else STAGE
        for i in range(size):
            gi = sign * g[start + i]
            # torch: variance.lerp_(grad * grad, one_minus_beta2_t)
            variance[start + i] = lerp(variance[start + i], gi * gi, w)
            u_sq[i] = adafactor_u_sq(variance[start + i], eps1_sq, gi)
        lane_sum(u_sq, size, acc)
        start += size
    for j in range(LANES):
        total += acc[j]
    return total


cdef inline Py_ssize_t block_row(Py_ssize_t b, Py_ssize_t rows, Py_ssize_t blocks) noexcept nogil:
    """The first row of block b of ``blocks`` (the last block ends at ``rows``)."""
    return b * rows // blocks


cdef inline void finish_columns(floating* col_var, const double* col_sum, Py_ssize_t rows,
                                Py_ssize_t cols, floating w) noexcept nogil:
    # torch: col_var.lerp_(||g_col||^2 / R, one_minus_beta2_t)
    cdef Py_ssize_t c
    for c in range(cols):
        col_var[c] = lerp(col_var[c], <floating>(col_sum[c] / <double>rows), w)


cdef void factored_sums(const floating* p, const floating* g, floating* row_var, floating* col_var,
                        Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t total_rows, Py_ssize_t blocks,
                        Py_ssize_t b0, Py_ssize_t b1, floating w, floating sign,
                        double* col_sum, double* block_p) noexcept nogil:
    """Pass 1 over blocks b0..b1-1: block_p[b] and the row factors.

    With ``col_sum`` (cols doubles; one thread taking every block in order)
    the column factors too, from the same read of g; without, column_sums
    forms them.
    """
    cdef Py_ssize_t b, row, r
    cdef double acc, sq
    for b in range(b0, b1):
        acc = 0.0
        for row in range(block_row(b, total_rows, blocks), block_row(b + 1, total_rows, blocks)):
            acc += row_sumsq(p + row * cols, cols)
            r = row % rows
            if col_sum != NULL:
                if r == 0:
                    memset(col_sum, 0, cols * sizeof(double))
                sq = row_grad_sums(g + row * cols, cols, sign, col_sum)
                if r == rows - 1:
                    finish_columns(col_var + (row // rows) * cols, col_sum, rows, cols, w)
            else:
                sq = row_sumsq_signed(g + row * cols, cols, sign)
            # torch: row_var.lerp_(||g_row||^2 / C, one_minus_beta2_t)
            row_var[row] = lerp(row_var[row], <floating>(sq / <double>cols), w)
        block_p[b] = acc


cdef void column_sums(const floating* g, floating* col_var, Py_ssize_t rows, Py_ssize_t cols,
                      Py_ssize_t k0, Py_ssize_t k1, floating w, floating sign) noexcept nogil:
    """The column factors k0..k1-1 (k: column k % cols of matrix k // cols).

    A column's sum over its rows in row order, as row_grad_sums adds them,
    COLUMN_CHUNK neighbouring columns at a time.
    """
    cdef double acc[COLUMN_CHUNK]
    cdef const floating* at
    cdef Py_ssize_t k = k0, m, c0, width, r, j
    cdef floating gi
    while k < k1:
        m = k // cols
        c0 = k - m * cols
        width = cols - c0
        if k1 - k < width:
            width = k1 - k
        if width > COLUMN_CHUNK:
            width = COLUMN_CHUNK
        for j in range(width):
            acc[j] = 0.0
        for r in range(rows):
            at = g + (m * rows + r) * cols + c0
            for j in range(width):
                gi = sign * at[j]
                acc[j] = acc[j] + <double>gi * <double>gi
        finish_columns(col_var + k, acc, rows, width, w)
        k += width


cdef void factored_update(floating* p, const floating* g, const floating* row_var,
                          const floating* col_var, Py_ssize_t rows, Py_ssize_t cols,
                          Py_ssize_t total_rows, Py_ssize_t blocks, Py_ssize_t b0, Py_ssize_t b1,
                          floating eps1, floating eps1_sq, floating sign, floating decay,
                          floating coef, bint apply, bint decay_on, double* block_u) noexcept nogil:
    """Pass 2 (block_u[b] = ||update||^2 of block b) or, with apply, pass 3."""
    cdef Py_ssize_t b, row, m, seen = -1
    cdef double acc
    cdef floating row_mean = 1, scale
    for b in range(b0, b1):
        acc = 0.0
        for row in range(block_row(b, total_rows, blocks), block_row(b + 1, total_rows, blocks)):
            m = row // rows
            if m != seen:  # each matrix's mean once per block (the same value every time)
                row_mean = matrix_row_mean(row_var + m * rows, rows, eps1)
                seen = m
            # torch: (row_var @ col_var) / mean, formed as (row_var / mean) * col_var
            scale = row_var[row] / row_mean
            if not apply:
                acc += factored_row(p + row * cols, g + row * cols, scale, col_var + m * cols,
                                    eps1_sq, sign, cols, decay, coef, False, False)
            elif decay_on:
                factored_row(p + row * cols, g + row * cols, scale, col_var + m * cols,
                             eps1_sq, sign, cols, decay, coef, True, True)
            else:
                factored_row(p + row * cols, g + row * cols, scale, col_var + m * cols,
                             eps1_sq, sign, cols, decay, coef, True, False)
        if not apply:
            block_u[b] = acc


cdef void vector_blocks(floating* p, const floating* g, floating* variance, Py_ssize_t n,
                        Py_ssize_t total_rows, Py_ssize_t blocks, Py_ssize_t b0, Py_ssize_t b1,
                        floating w, floating eps1_sq, floating sign, floating decay,
                        floating coef, bint apply, bint decay_on, double* block_p,
                        double* block_u) noexcept nogil:
    """A vector's pass 1+2 (block_p, block_u, the variance) or, with apply, pass 3."""
    cdef Py_ssize_t b, row, start, size
    cdef double ap, au
    for b in range(b0, b1):
        ap = 0.0
        au = 0.0
        for row in range(block_row(b, total_rows, blocks), block_row(b + 1, total_rows, blocks)):
            start = row * VECTOR_ROW
            size = n - start if n - start < VECTOR_ROW else VECTOR_ROW
            if not apply:
                ap += row_sumsq(p + start, size)
                au += vector_pass(p + start, g + start, variance + start, size, w, eps1_sq,
                                  sign, decay, coef, False, False)
            elif decay_on:
                vector_pass(p + start, g + start, variance + start, size, w, eps1_sq, sign,
                            decay, coef, True, True)
            else:
                vector_pass(p + start, g + start, variance + start, size, w, eps1_sq, sign,
                            decay, coef, True, False)
        if not apply:
            block_p[b] = ap
            block_u[b] = au


cdef void adafactor_slot(floating* p, const floating* g, floating** bufs, Py_ssize_t n,
                         Py_ssize_t rows, Py_ssize_t cols, const StepScalars* s,
                         int threads) noexcept nogil:
    cdef floating* row_var = bufs[0]
    cdef floating* col_var = bufs[1]
    cdef floating* variance = bufs[2]
    cdef floating sign = <floating>s.sign
    cdef floating w = <floating>s.beta2_weight
    cdef double eps1 = <double>type_eps(<floating>0) if s.eps_from_dtype else s.eps
    cdef floating eps1_f = <floating>eps1
    cdef floating eps1_sq = <floating>(eps1 * eps1)
    cdef bint decay_on = s.weight_decay != 0.0
    cdef floating decay = <floating>(1.0 - s.base_lr * s.weight_decay)
    cdef floating coef = 0
    cdef bint factored = cols > 0
    cdef double block_p[SUM_BLOCKS]
    cdef double block_u[SUM_BLOCKS]
    cdef double p_sq = 0.0, u_sq = 0.0, rms, alpha, denom
    cdef double* col_sum = NULL
    # Initialised although each thread sets them (firstprivate; see run_slots)
    cdef Py_ssize_t total_rows, blocks, columns = 0, b0 = 0, b1 = 0, k0 = 0, k1 = 0, b
    cdef int tid = 0, nthreads = 1
    cdef unsigned int saved = 0  # each thread's own FTZ/DAZ mode (see run_slots)
    if n == 0:
        return
    if factored:
        total_rows = n // cols
        columns = (total_rows // rows) * cols
    else:
        total_rows = (n + VECTOR_ROW - 1) // VECTOR_ROW
    blocks = total_rows if total_rows < SUM_BLOCKS else SUM_BLOCKS
    # Passes 1 and 2
    if threads > 1:
        with parallel(num_threads=threads):
            saved = fastopt_fp_enter(s.flush_denormals)
            tid = threadid()
            nthreads = omp_get_num_threads()
            b0 = blocks * tid // nthreads
            b1 = blocks * (tid + 1) // nthreads
            if factored:
                factored_sums(p, g, row_var, col_var, rows, cols, total_rows, blocks, b0, b1,
                              w, sign, NULL, block_p)
                k0 = columns * tid // nthreads
                k1 = columns * (tid + 1) // nthreads
                column_sums(g, col_var, rows, cols, k0, k1, w, sign)
            else:
                vector_blocks(p, g, variance, n, total_rows, blocks, b0, b1, w, eps1_sq, sign,
                              decay, coef, False, False, block_p, block_u)
            fastopt_fp_leave(saved)
        if factored:
            with parallel(num_threads=threads):
                saved = fastopt_fp_enter(s.flush_denormals)
                tid = threadid()
                nthreads = omp_get_num_threads()
                b0 = blocks * tid // nthreads
                b1 = blocks * (tid + 1) // nthreads
                factored_update(p, g, row_var, col_var, rows, cols, total_rows, blocks, b0, b1,
                                eps1_f, eps1_sq, sign, decay, coef, False, False, block_u)
                fastopt_fp_leave(saved)
    elif factored:
        col_sum = <double*>malloc(cols * sizeof(double))
        factored_sums(p, g, row_var, col_var, rows, cols, total_rows, blocks, 0, blocks, w, sign,
                      col_sum, block_p)
        if col_sum == NULL:  # no memory for the fused column sums: the same sums apart
            column_sums(g, col_var, rows, cols, 0, columns, w, sign)
        free(col_sum)
        factored_update(p, g, row_var, col_var, rows, cols, total_rows, blocks, 0, blocks,
                        eps1_f, eps1_sq, sign, decay, coef, False, False, block_u)
    else:
        vector_blocks(p, g, variance, n, total_rows, blocks, 0, blocks, w, eps1_sq, sign,
                      decay, coef, False, False, block_p, block_u)
    for b in range(blocks):
        p_sq += block_p[b]
        u_sq += block_u[b]
    # torch, in Python floats: max(eps2, ||p|| / sqrt(numel)) * rho_t, then
    # max(1, ||update|| / (sqrt(numel) * d)); max(a, b) keeps a unless b > a
    rms = sqrt(p_sq) / pow(<double>n, 0.5)
    alpha = (rms if rms > s.eps2 else s.eps2) * s.lr
    denom = sqrt(u_sq) / (pow(<double>n, 0.5) * s.clip_threshold)
    denom = denom if denom > 1.0 else 1.0
    coef = <floating>(-alpha / denom)
    # Pass 3
    if threads > 1:
        with parallel(num_threads=threads):
            saved = fastopt_fp_enter(s.flush_denormals)
            tid = threadid()
            nthreads = omp_get_num_threads()
            b0 = blocks * tid // nthreads
            b1 = blocks * (tid + 1) // nthreads
            if factored:
                factored_update(p, g, row_var, col_var, rows, cols, total_rows, blocks, b0, b1,
                                eps1_f, eps1_sq, sign, decay, coef, True, decay_on, block_u)
            else:
                vector_blocks(p, g, variance, n, total_rows, blocks, b0, b1, w, eps1_sq, sign,
                              decay, coef, True, decay_on, block_p, block_u)
            fastopt_fp_leave(saved)
    elif factored:
        factored_update(p, g, row_var, col_var, rows, cols, total_rows, blocks, 0, blocks,
                        eps1_f, eps1_sq, sign, decay, coef, True, decay_on, block_u)
    else:
        vector_blocks(p, g, variance, n, total_rows, blocks, 0, blocks, w, eps1_sq, sign, decay,
                      coef, True, decay_on, block_p, block_u)


cdef inline double row_sumsq_signed(const floating* g, Py_ssize_t n, floating sign) noexcept nogil:
    """row_grad_sums without the column sums (same lanes, same bits)."""
    cdef double acc[LANES]
    cdef double total = 0.0
    cdef floating gi
    cdef Py_ssize_t i, j, base
    cdef Py_ssize_t whole = n - n % LANES
    for j in range(LANES):
        acc[j] = 0.0
    for i in range(whole // LANES):
        base = i * LANES
        for j in range(LANES):
            gi = sign * g[base + j]
            acc[j] = acc[j] + <double>gi * <double>gi
    for i in range(whole, n):
        gi = sign * g[i]
        acc[i - whole] = acc[i - whole] + <double>gi * <double>gi
    for j in range(LANES):
        total += acc[j]
    return total


cdef inline floating matrix_row_mean(const floating* row_var, Py_ssize_t rows,
                                     floating eps1) noexcept nogil:
    # torch: row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1)
    cdef double total = 0.0
    cdef Py_ssize_t r
    for r in range(rows):
        total = total + <double>row_var[r]
    return nan_max(<floating>(total / <double>rows), eps1)


cdef inline void adafactor_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    # torch, in Python floats: one_minus_beta2_t = t ** beta2_decay and
    # rho_t = min(lr, 1 / t ** 0.5) (min keeps lr unless the other is smaller)
    cdef double t = <double>step
    cdef double rho = 1.0 / pow(t, 0.5)
    s.beta2_weight = pow(t, s.beta2_decay)
    s.lr = rho if rho < s.base_lr else s.base_lr
