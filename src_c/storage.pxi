# Storage: how the compute layer reads and writes the arrays it is handed.
#
# A rule's loop (src_c/rules/<rule>.pxi) is written once, over `floating`
# pointers: it computes in float32 or float64 and knows nothing of how its
# arrays are stored. A *storage kind* (one row of STORAGE in
# src_c/rules/table.py) names how a slot's arrays are stored and how the loop
# reaches them:
#
# - native kinds (float32, float64): the loop runs on the arrays themselves,
#   in their own precision. This is the fast path of every rule and costs
#   nothing extra.
# - staged kinds (half-precision params, compressed state): the elements are
#   loaded in blocks of STAGE into float32 scratch on the stack ("load as the
#   compute type"), the float32 loop runs on the scratch, and the results are
#   stored back rounded to the storage type ("store with rounding"). A block
#   of every stream fits in L1, so the extra copies cost L1 traffic, not
#   memory traffic: the bytes that cross the memory bus are the stored ones,
#   which is the point of storing fewer of them. An array already float32
#   (an fp32 state beside bf16 params, say) is used in place, not copied.
#
# So every rule gets every storage kind from one loop body, and a new kind is
# a row in the table plus, for a new element type, its load and store below.
#
# Bits: each element is converted on its own, by integer arithmetic on its
# bits, so the result never depends on the block, the thread split or the
# instruction set. Rounding on store is round-to-nearest-even (what NumPy's,
# torch's and ml_dtypes' casts do). Stochastic rounding, when a kind wants it,
# belongs in store_elems too: it receives the element's index in its array,
# from which a counter-based random stream gives the same bits for any split.

from libc.stdint cimport uint16_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* float32 <-> bfloat16 / float16 bit conversions, round-to-nearest-even
       on the way down. A NaN stays a NaN (quiet, sign kept, payload
       dropped: the canonical one torch writes); overflow gives +-inf, tiny
       values round to subnormals or signed zero. */
    static inline uint16_t fastopt_f32_to_bf16(float f) {
        uint32_t u;
        memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u)
            return (uint16_t)(((u >> 16) & 0x8000u) | 0x7fc0u);
        u += 0x7fffu + ((u >> 16) & 1u);   /* ties to the even upper half */
        return (uint16_t)(u >> 16);
    }
    static inline float fastopt_bf16_to_f32(uint16_t h) {
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    static inline uint16_t fastopt_f32_to_f16(float f) {
        uint32_t u, a, e, mant, shift, m, rem, half, r;
        uint16_t sign;
        memcpy(&u, &f, 4);
        sign = (uint16_t)((u >> 16) & 0x8000u);
        a = u & 0x7fffffffu;
        if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);      /* NaN */
        if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);     /* >= 65520 rounds to inf */
        e = a >> 23;
        if (e >= 113) {                                              /* normal in float16 */
            r = a - 0x38000000u;                                     /* rebias 127 -> 15 */
            r += 0x0fffu + ((r >> 13) & 1u);                         /* 13 bits dropped, ties to even */
            return (uint16_t)(sign | (r >> 13));
        }
        if (e < 102) return sign;                                    /* below 2^-25: signed zero */
        mant = (a & 0x7fffffu) | 0x800000u;                          /* subnormal: m * 2^-24 */
        shift = 126 - e;                                             /* 14 .. 24 */
        m = mant >> shift;
        rem = mant & ((1u << shift) - 1u);
        half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (m & 1u))) m += 1u;         /* may carry into the smallest normal */
        return (uint16_t)(sign | m);
    }
    static inline float fastopt_f16_to_f32(uint16_t h) {
        uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
        uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
        float f;
        if (e == 0x1fu) u = sign | 0x7f800000u | (m << 13);          /* inf, NaN */
        else if (e != 0) u = sign | ((e + 112u) << 23) | (m << 13);
        else if (m == 0) u = sign;
        else {                                                       /* subnormal: normalise */
            e = 113u;
            while (!(m & 0x400u)) { m <<= 1; e -= 1u; }
            u = sign | (e << 23) | ((m & 0x3ffu) << 13);
        }
        memcpy(&f, &u, 4);
        return f;
    }
    """
    uint16_t fastopt_f32_to_bf16(float f) noexcept nogil
    float fastopt_bf16_to_f32(uint16_t h) noexcept nogil
    uint16_t fastopt_f32_to_f16(float f) noexcept nogil
    float fastopt_f16_to_f32(uint16_t h) noexcept nogil


# Element types a stored array can have (STORAGE's columns name them).
cdef enum:
    ELEM_F32
    ELEM_F64
    ELEM_BF16
    ELEM_F16

# Elements per staged block: 1 KiB of float32 per stream, so the scratch of a
# rule with three state buffers (5 streams) takes 5 KiB of L1.
cdef enum:
    STAGE = 256

# A rule's kernel at float32, as a staged kind calls it.
ctypedef void (*kernel_f32_t)(float* p, const float* g, float** bufs, Py_ssize_t n,
                              const StepScalars* s) noexcept nogil


cdef inline Py_ssize_t elem_size(int elem) noexcept nogil:
    return 8 if elem == ELEM_F64 else (4 if elem == ELEM_F32 else 2)


cdef inline void load_elems(int elem, const char* src, Py_ssize_t start, float* dst,
                            Py_ssize_t n) noexcept nogil:
    """dst[0..n) = elements [start, start + n) of src, as float32 (exact)."""
    cdef Py_ssize_t i
    cdef const uint16_t* h = <const uint16_t*>src + start
    if elem == ELEM_BF16:
        for i in range(n):
            dst[i] = fastopt_bf16_to_f32(h[i])
    elif elem == ELEM_F16:
        for i in range(n):
            dst[i] = fastopt_f16_to_f32(h[i])
    else:
        for i in range(n):
            dst[i] = (<const float*>src + start)[i]


cdef inline void store_elems(int elem, char* dst, Py_ssize_t start, const float* src,
                             Py_ssize_t n) noexcept nogil:
    """Elements [start, start + n) of dst = src[0..n), rounded to nearest even."""
    cdef Py_ssize_t i
    cdef uint16_t* h = <uint16_t*>dst + start
    if elem == ELEM_BF16:
        for i in range(n):
            h[i] = fastopt_f32_to_bf16(src[i])
    elif elem == ELEM_F16:
        for i in range(n):
            h[i] = fastopt_f32_to_f16(src[i])
    else:
        for i in range(n):
            (<float*>dst + start)[i] = src[i]


cdef void run_staged(kernel_f32_t kernel, int p_elem, int state_elem, const Slot* slot,
                     Py_ssize_t start, Py_ssize_t n, const StepScalars* s) noexcept nogil:
    """Run `kernel` over elements [start, start + n) of a staged slot, STAGE at a time.

    Params and grads are stored as p_elem, state buffers as state_elem; a
    float32 array is handed to the kernel in place, any other is loaded into
    scratch and (params and state: the kernel writes them) stored back.
    """
    cdef float pbuf[STAGE]
    cdef float gbuf[STAGE]
    cdef float sbuf[MAX_BUFFERS][STAGE]
    cdef float* p
    cdef const float* g
    cdef float* bufs[MAX_BUFFERS]
    cdef Py_ssize_t at, m, j
    cdef bint p_native = p_elem == ELEM_F32
    cdef bint s_native = state_elem == ELEM_F32
    at = start
    while at < start + n:
        m = start + n - at if start + n - at < STAGE else STAGE
        if p_native:
            p = <float*>slot.p + at
            g = <const float*>slot.g + at
        else:
            load_elems(p_elem, slot.p, at, pbuf, m)
            load_elems(p_elem, slot.g, at, gbuf, m)
            p = pbuf
            g = gbuf
        for j in range(MAX_BUFFERS):
            if slot.buf[j] == NULL:
                bufs[j] = NULL
            elif s_native:
                bufs[j] = <float*>slot.buf[j] + at
            else:
                load_elems(state_elem, slot.buf[j], at, sbuf[j], m)
                bufs[j] = sbuf[j]
        kernel(p, g, bufs, m, s)
        if not p_native:
            store_elems(p_elem, slot.p, at, pbuf, m)
        if not s_native:
            for j in range(MAX_BUFFERS):
                if slot.buf[j] != NULL:
                    store_elems(state_elem, slot.buf[j], at, sbuf[j], m)
        at += m
