# RowPlan: a sparse-row gradient turned into slots, one per distinct row.
# Included by src_c/_fastpath.pyx, whose header defines the vocabulary.
#
# A fastopt.SparseRows gradient lists rows of a parameter's leading axis,
# possibly more than once, with a value row each. A step over it is the
# rule's own kernel run on the listed rows, each with its merged gradient:
#
# 1. plan: sort the positions by row, stably (an LSD radix sort on the row
#    numbers, RADIX_BITS per pass), so equal rows stay in position order, and
#    cut the sorted positions into runs of one row each. The index range is
#    checked in the same pass; nothing but the plan's own memory is written.
# 2. fill: one Workspace slot per run. The slot's p and state pointers are
#    the row's; its gradient is the value row itself when the row is listed
#    once, else the run's values added in position order (the first copied,
#    the next added one by one, in the parameter's dtype, as torch's coalesce
#    adds them) into the plan's merge buffer.
# 3. the Workspace runs as any other: the runner splits the slots' elements
#    between threads, and since every row is one slot, no two threads write
#    one element; each element's result depends on nothing but its row.
#
# All memory is the plan's, grown to the largest step seen and reused: a step
# allocates nothing once the sizes have been seen.

from libc.string cimport memcpy

cdef enum:
    RADIX_BITS = 11
    RADIX = 1 << RADIX_BITS


cdef class RowPlan:
    """Reusable workspace of sparse-row steps: the listed rows sorted, merged, as slots."""
    cdef Py_ssize_t* order     # positions sorted by row (stable)
    cdef Py_ssize_t* keys      # the row of each sorted position
    cdef Py_ssize_t* spare     # radix scratch: positions, then keys
    cdef Py_ssize_t* spare_keys
    cdef Py_ssize_t* starts    # runs: the sorted positions of row k are [starts[k], starts[k+1])
    cdef Py_ssize_t capacity   # of the arrays above, in positions
    cdef char* merged          # the merged gradients of the rows listed more than once
    cdef Py_ssize_t merged_capacity  # bytes
    cdef readonly Py_ssize_t listed    # positions of the last plan
    cdef readonly Py_ssize_t distinct  # rows of the last plan

    def __dealloc__(self):
        free(self.order)
        free(self.keys)
        free(self.spare)
        free(self.spare_keys)
        free(self.starts)
        free(self.merged)

    def __reduce__(self):
        return (RowPlan, ())  # scratch space: a copy starts empty

    cdef int reserve(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t** arrays[5]
        cdef void* grown
        cdef int k
        if n <= self.capacity and self.order != NULL:  # (n = 0 still needs starts[0])
            return 0
        arrays[0] = &self.order
        arrays[1] = &self.keys
        arrays[2] = &self.spare
        arrays[3] = &self.spare_keys
        arrays[4] = &self.starts
        for k in range(5):
            grown = realloc(arrays[k][0], (n + 1) * sizeof(Py_ssize_t))
            if grown == NULL:
                raise MemoryError()
            arrays[k][0] = <Py_ssize_t*>grown
        self.capacity = n
        return 0

    def plan(self, cnp.ndarray indices, Py_ssize_t nrows):
        """Sort ``indices`` (1-D, C-contiguous int32 or int64) into runs of rows.

        Returns the number of distinct rows, or ``-1 - i`` when ``indices[i]``
        is outside ``[0, nrows)`` (the first such position; the plan is then
        empty).
        """
        cdef Py_ssize_t n = cnp.PyArray_SIZE(indices), i, row, shift, d, total, c
        cdef Py_ssize_t bad = -1
        cdef Py_ssize_t* tmp
        cdef Py_ssize_t count[RADIX]
        cdef const int* i32 = NULL
        cdef const long long* i64 = NULL
        self.reserve(n)
        self.listed = 0
        self.distinct = 0
        if cnp.PyArray_TYPE(indices) == cnp.NPY_INT32:
            i32 = <const int*>cnp.PyArray_DATA(indices)
        else:
            i64 = <const long long*>cnp.PyArray_DATA(indices)
        with nogil:
            for i in range(n):
                row = i32[i] if i32 != NULL else <Py_ssize_t>i64[i]
                if row < 0 or row >= nrows:
                    bad = i
                    break
                self.order[i] = i
                self.keys[i] = row
            shift = 0
            while bad < 0 and n > 1 and shift < 63 and ((nrows - 1) >> shift) > 0:
                memset(count, 0, sizeof(count))
                for i in range(n):
                    count[(self.keys[i] >> shift) & (RADIX - 1)] += 1
                total = 0
                for d in range(RADIX):
                    c = count[d]
                    count[d] = total
                    total += c
                for i in range(n):  # in order: equal digits keep their order (stable)
                    d = (self.keys[i] >> shift) & (RADIX - 1)
                    self.spare[count[d]] = self.order[i]
                    self.spare_keys[count[d]] = self.keys[i]
                    count[d] += 1
                tmp = self.order
                self.order = self.spare
                self.spare = tmp
                tmp = self.keys
                self.keys = self.spare_keys
                self.spare_keys = tmp
                shift += RADIX_BITS
            if bad < 0:
                for i in range(n):
                    if i == 0 or self.keys[i] != self.keys[i - 1]:
                        self.starts[self.distinct] = i
                        self.distinct += 1
                self.starts[self.distinct] = n
                self.listed = n
        if bad >= 0:
            self.distinct = 0
            return -1 - bad
        return self.distinct

    def rows(self):
        """The distinct rows of the last plan, in increasing order (a new int64 array)."""
        out = np.empty(self.distinct, dtype=np.int64)
        cdef long long[::1] view = out
        cdef Py_ssize_t k
        for k in range(self.distinct):
            view[k] = self.keys[self.starts[k]]
        return out

    cdef int merge(self, cnp.ndarray values, Py_ssize_t width) except -1:
        """Add up the value rows of every row listed more than once (see the header)."""
        cdef Py_ssize_t k, j, e, at = 0, need = 0
        cdef char* grown
        cdef const char* src = <const char*>cnp.PyArray_DATA(values)
        cdef int typenum = cnp.PyArray_TYPE(values)
        cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(values)
        cdef float* f
        cdef double* dd
        for k in range(self.distinct):
            if self.starts[k + 1] - self.starts[k] > 1:
                need += width * isz
        if need > self.merged_capacity:
            grown = <char*>realloc(self.merged, need)
            if grown == NULL:
                raise MemoryError()
            self.merged = grown
            self.merged_capacity = need
        with nogil:
            for k in range(self.distinct):
                if self.starts[k + 1] - self.starts[k] == 1:
                    continue
                memcpy(self.merged + at, src + self.order[self.starts[k]] * width * isz,
                       width * isz)
                for j in range(self.starts[k] + 1, self.starts[k + 1]):
                    if typenum == cnp.NPY_FLOAT32:
                        f = <float*>(self.merged + at)
                        for e in range(width):
                            f[e] = f[e] + (<const float*>src)[self.order[j] * width + e]
                    else:
                        dd = <double*>(self.merged + at)
                        for e in range(width):
                            dd[e] = dd[e] + (<const double*>src)[self.order[j] * width + e]
                at += width * isz
        return 0

    def fill(self, Workspace ws, cnp.ndarray p, cnp.ndarray values, tuple buffers):
        """Load ``ws`` with one slot per planned row of ``p`` (already validated).

        ``p``: float32 or float64, C-contiguous, at least 1-D, whose leading
        axis the plan's rows index; ``values``: its value rows, shaped
        ``(listed,) + p.shape[1:]``; ``buffers``: the rule's state arrays of
        ``p`` in its order (None: unused), each with a leading axis of p's
        length (a row's share of a buffer is its elements / that length).
        """
        cdef Py_ssize_t nrows = cnp.PyArray_DIMS(p)[0]
        cdef Py_ssize_t width = elements(p) // nrows if nrows > 0 else 0
        cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(p)
        cdef int nd = cnp.PyArray_NDIM(p)
        cdef Py_ssize_t cols = cnp.PyArray_DIMS(p)[nd - 1] if nd >= 2 else 0
        cdef Py_ssize_t k, j, row, at = 0
        cdef char* pdata = <char*>cnp.PyArray_DATA(p)
        cdef char* vdata = <char*>cnp.PyArray_DATA(values)
        cdef char* bufs[MAX_BUFFERS]
        cdef Py_ssize_t stride[MAX_BUFFERS]
        cdef int storage = storage_of(cnp.PyArray_TYPE(p))
        cdef Slot* slot
        for j in range(MAX_BUFFERS):
            bufs[j] = NULL
            stride[j] = 0
            if j < len(buffers) and buffers[j] is not None:
                bufs[j] = <char*>cnp.PyArray_DATA(<cnp.ndarray>buffers[j])
                stride[j] = elements(<cnp.ndarray>buffers[j]) // nrows * isz
        self.merge(values, width)
        ws.reserve(self.distinct)
        ws.count = 0
        ws.total = 0
        ws.cached = False  # (its slots are rows now, not a group's parameters)
        for k in range(self.distinct):
            row = self.keys[self.starts[k]]
            slot = &ws.slots[k]
            slot.p = pdata + row * width * isz
            if self.starts[k + 1] - self.starts[k] == 1:
                slot.g = vdata + self.order[self.starts[k]] * width * isz
            else:
                slot.g = self.merged + at
                at += width * isz
            for j in range(MAX_BUFFERS):
                slot.buf[j] = bufs[j] + row * stride[j] if bufs[j] != NULL else NULL
                slot.buf_size[j] = stride[j] // isz
            slot.size = width
            # a row's own last two dimensions, as a SLOTWISE rule reads them:
            # (rows of the row, its last axis); a row of a 2-D table is (1, C)
            slot.rows = width // cols if cols > 0 else 0
            slot.cols = cols
            slot.storage = storage
            slot.master = NULL
            slot.stochastic = False
            slot.round_key = 0
            slot.avg = NULL
            ws.total += width
        ws.count = self.distinct

    def scatter(self, cnp.ndarray dense, cnp.ndarray values, bint clear=False):
        """Write the planned rows' merged gradients into ``dense`` (shaped like the
        parameter, zero on those rows); ``clear``: write zeros there instead."""
        cdef Py_ssize_t nrows = cnp.PyArray_DIMS(dense)[0]
        cdef Py_ssize_t width = elements(dense) // nrows if nrows > 0 else 0
        cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(dense)
        cdef Py_ssize_t k, at = 0
        cdef char* out = <char*>cnp.PyArray_DATA(dense)
        cdef const char* vdata = <const char*>cnp.PyArray_DATA(values)
        cdef const char* src
        if not clear:
            self.merge(values, width)
        with nogil:
            for k in range(self.distinct):
                if clear:
                    memset(out + self.keys[self.starts[k]] * width * isz, 0, width * isz)
                    continue
                if self.starts[k + 1] - self.starts[k] == 1:
                    src = vdata + self.order[self.starts[k]] * width * isz
                else:
                    src = self.merged + at
                    at += width * isz
                memcpy(out + self.keys[self.starts[k]] * width * isz, src, width * isz)
