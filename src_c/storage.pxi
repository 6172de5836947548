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
# Bits: each element is converted on its own, so the result never depends on
# the block, the thread split or the instruction set. Rounding on store is
# round-to-nearest-even (what NumPy's, torch's and ml_dtypes' casts do), by
# integer arithmetic on the bits, or by F16C's vcvtps2ph/vcvtph2ps where the
# module is built with it (the avx2 and avx512 levels): the two agree on every
# value, NaNs included (quieted, payload truncated, as the instruction does).
# bfloat16 has no instruction before AVX-512-BF16; its shift-and-round is
# four integer operations that the compiler vectorizes.
#
# Stochastic rounding (a slot's `stochastic`): add a random integer below the
# weight of the last kept bit and truncate, so E[result] = x. The integer is
# random_bits(stream key, element index): a counter-based hash, never a
# sequence, so it depends on no split. A slot's stream key comes from its
# round_key (seed, step, parameter) and the array's place in the slot
# (0: p, 1 + j: buffer j); fastopt.reference.random_bits is its twin.
#
# A master-weights slot (slot.master) runs the float32 loop on the master in
# place and writes p as the master rounded to nearest even, in the same pass.

from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__F16C__) || defined(__AVX2__)
    #include <immintrin.h>
    #endif
    #if defined(__F16C__)
    #define FASTOPT_F16C 1
    #else
    #define FASTOPT_F16C 0
    #endif
    /* float32 <-> bfloat16 / float16 bit conversions, round-to-nearest-even
       on the way down. A NaN stays a NaN (bfloat16: the canonical quiet one
       torch writes, sign kept; float16: quieted, its payload truncated, as
       F16C does); overflow gives +-inf, tiny values round to subnormals or
       signed zero. Written as selects, so that the loops vectorize. */
    static inline uint16_t fastopt_f32_to_bf16(float f) {
        uint32_t u, r, nan;
        memcpy(&u, &f, 4);
        r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;   /* ties to the even upper half */
        nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
        return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : r);
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
        if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  /* NaN */
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
        if (e == 0x1fu) u = sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u);  /* inf; NaN, quieted */
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

    /* Stochastic rounding: r is a uniform 32-bit random integer. */
    static inline uint16_t fastopt_f32_to_bf16_sr(float f, uint32_t r) {
        uint32_t u, nan;
        memcpy(&u, &f, 4);
        nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
        /* an infinity's low bits are 0: it stays; the largest finite values may round up to inf */
        return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : (u + (r & 0xffffu)) >> 16);
    }
    static inline uint16_t fastopt_f32_to_f16_sr(float f, uint32_t r) {
        uint32_t u, a, e, shift, m;
        uint16_t sign;
        memcpy(&u, &f, 4);
        sign = (uint16_t)((u >> 16) & 0x8000u);
        a = u & 0x7fffffffu;
        if (a >= 0x7f800000u) return fastopt_f32_to_f16(f);          /* inf, NaN: as rounded to nearest */
        e = a >> 23;
        if (e >= 113) {                                              /* normal in float16: 13 bits dropped */
            m = (a - 0x38000000u + (r & 0x1fffu)) >> 13;
            return (uint16_t)(sign | (m >= 0x7c00u ? 0x7c00u : m));  /* past the largest: inf */
        }
        shift = 126 - e;                                             /* subnormal in float16: m * 2^-24 */
        if (shift > 31) return sign;                                 /* below 2^-37: zero */
        m = (((a & 0x7fffffu) | 0x800000u) + (r & ((1u << shift) - 1u))) >> shift;
        return (uint16_t)(sign | m);                                 /* may carry into the smallest normal */
    }

    /* The random integer of element i of a stream: a counter-based hash
       (Chris Wellons' lowbias32 finaliser, twice: the index's high and low
       halves), so it depends on nothing but (key, i). */
    static inline uint32_t fastopt_mix32(uint32_t x) {
        x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
        return x;
    }
    static inline uint32_t fastopt_random_bits(uint64_t key, uint64_t i) {
        uint32_t high = fastopt_mix32((uint32_t)(i >> 32) ^ (uint32_t)(key >> 32));
        return fastopt_mix32((uint32_t)i ^ (uint32_t)key ^ high);
    }
    static inline uint64_t fastopt_stream_key(uint64_t key, uint64_t stream) {
        return key + stream * 0x9e3779b97f4a7c15ull;
    }

    /* Whole blocks of bfloat16 in AVX2 where the module has it: the scalar
       functions' very operations, eight lanes at a time (so the same bits),
       with the NaN test as one unordered compare. Returns how many elements
       it did. */
    #if defined(__AVX2__)
    #define FASTOPT_AVX2_BF16 1
    #else
    #define FASTOPT_AVX2_BF16 0
    #endif
    static inline long fastopt_avx2_bf16_widen(const uint16_t* h, float* dst, long n) {
    #if FASTOPT_AVX2_BF16
        long i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(h + i)));
            _mm256_storeu_si256((__m256i*)(dst + i), _mm256_slli_epi32(w, 16));
        }
        return i;
    #else
        (void)h; (void)dst; (void)n;
        return 0;
    #endif
    }
    static inline long fastopt_avx2_bf16_narrow(const float* src, uint16_t* h, long n) {
    #if FASTOPT_AVX2_BF16
        const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7fff);
        const __m256i sign = _mm256_set1_epi32(0x8000), quiet = _mm256_set1_epi32(0x7fc0);
        long i = 0;
        for (; i + 16 <= n; i += 16) {
            __m256i r[2];
            int k;
            for (k = 0; k < 2; k++) {
                __m256 x = _mm256_loadu_ps(src + i + 8 * k);
                __m256i u = _mm256_castps_si256(x);
                __m256i hi = _mm256_srli_epi32(u, 16);
                __m256i rounded = _mm256_srli_epi32(
                    _mm256_add_epi32(u, _mm256_add_epi32(half, _mm256_and_si256(hi, one))), 16);
                __m256i nan = _mm256_or_si256(_mm256_and_si256(hi, sign), quiet);
                r[k] = _mm256_blendv_epi8(rounded, nan,
                                          _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
            }
            /* packus works within 128-bit lanes: put the halves back in order */
            _mm256_storeu_si256((__m256i*)(h + i),
                                _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xd8));
        }
        return i;
    #else
        (void)src; (void)h; (void)n;
        return 0;
    #endif
    }

    /* Whole blocks of float16 through F16C where the module has it (same bits
       as the scalar functions); returns how many elements it did. */
    static inline long fastopt_f16c_widen(const uint16_t* h, float* dst, long n) {
    #if FASTOPT_F16C
        long i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
        return i;
    #else
        (void)h; (void)dst; (void)n;
        return 0;
    #endif
    }
    static inline long fastopt_f16c_narrow(const float* src, uint16_t* h, long n) {
    #if FASTOPT_F16C
        long i = 0;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i*)(h + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
        return i;
    #else
        (void)src; (void)h; (void)n;
        return 0;
    #endif
    }
    """
    const int FASTOPT_F16C
    uint16_t fastopt_f32_to_bf16(float f) noexcept nogil
    float fastopt_bf16_to_f32(uint16_t h) noexcept nogil
    uint16_t fastopt_f32_to_f16(float f) noexcept nogil
    float fastopt_f16_to_f32(uint16_t h) noexcept nogil
    uint16_t fastopt_f32_to_bf16_sr(float f, uint32_t r) noexcept nogil
    uint16_t fastopt_f32_to_f16_sr(float f, uint32_t r) noexcept nogil
    uint32_t fastopt_random_bits(uint64_t key, uint64_t i) noexcept nogil
    uint64_t fastopt_stream_key(uint64_t key, uint64_t stream) noexcept nogil
    long fastopt_f16c_widen(const uint16_t* h, float* dst, long n) noexcept nogil
    long fastopt_avx2_bf16_widen(const uint16_t* h, float* dst, long n) noexcept nogil
    long fastopt_avx2_bf16_narrow(const float* src, uint16_t* h, long n) noexcept nogil
    long fastopt_f16c_narrow(const float* src, uint16_t* h, long n) noexcept nogil


# Element types a stored array can have (STORAGE's columns name them).
cdef enum:
    ELEM_F32
    ELEM_F64
    ELEM_BF16
    ELEM_F16

# Elements per staged block: 4 KiB of float32 per stream, so the scratch of a
# rule with three state buffers (5 streams) takes 20 KiB of L1. Each block
# costs a kernel call and a load and a store call per stream: at 256 that
# overhead was about a quarter of a bf16 Adam step (measured side by side on
# 2 cores at 1e7: bf16 1.01 -> 0.76 ns/element, float32 params with bf16
# state 0.83 -> 0.58; 2048 is no faster).
cdef enum:
    STAGE = 1024

# A rule's kernel at float32, as a staged kind calls it.
ctypedef void (*kernel_f32_t)(float* p, const float* g, float** bufs, Py_ssize_t n,
                              const StepScalars* s) noexcept nogil
# A SLOTWISE rule's whole-parameter step at float32 (table.py).
ctypedef void (*slot_f32_t)(float* p, const float* g, float** bufs, Py_ssize_t n,
                            Py_ssize_t rows, Py_ssize_t cols, const StepScalars* s,
                            int threads) noexcept nogil


cdef inline Py_ssize_t elem_size(int elem) noexcept nogil:
    return 8 if elem == ELEM_F64 else (4 if elem == ELEM_F32 else 2)


cdef inline void load_elems(int elem, const char* src, Py_ssize_t start, float* dst,
                            Py_ssize_t n) noexcept nogil:
    """dst[0..n) = elements [start, start + n) of src, as float32 (exact)."""
    cdef Py_ssize_t i
    cdef const uint16_t* h = <const uint16_t*>src + start
    if elem == ELEM_BF16:
        for i in range(fastopt_avx2_bf16_widen(h, dst, n), n):
            dst[i] = fastopt_bf16_to_f32(h[i])
    elif elem == ELEM_F16:
        for i in range(fastopt_f16c_widen(h, dst, n), n):
            dst[i] = fastopt_f16_to_f32(h[i])
    else:
        for i in range(n):
            dst[i] = (<const float*>src + start)[i]


cdef inline void store_elems(int elem, char* dst, Py_ssize_t start, const float* src,
                             Py_ssize_t n, bint stochastic, uint64_t key) noexcept nogil:
    """Elements [start, start + n) of dst = src[0..n), rounded to nearest even, or
    stochastically with the random bits of stream ``key`` at each element's index."""
    cdef Py_ssize_t i
    cdef uint16_t* h = <uint16_t*>dst + start
    if elem == ELEM_BF16:
        if stochastic:
            for i in range(n):
                h[i] = fastopt_f32_to_bf16_sr(src[i], fastopt_random_bits(key, start + i))
        else:
            for i in range(fastopt_avx2_bf16_narrow(src, h, n), n):
                h[i] = fastopt_f32_to_bf16(src[i])
    elif elem == ELEM_F16:
        if stochastic:
            for i in range(n):
                h[i] = fastopt_f32_to_f16_sr(src[i], fastopt_random_bits(key, start + i))
        else:
            for i in range(fastopt_f16c_narrow(src, h, n), n):
                h[i] = fastopt_f32_to_f16(src[i])
    else:
        for i in range(n):
            (<float*>dst + start)[i] = src[i]


cdef void run_staged(kernel_f32_t kernel, int p_elem, int state_elem, const Slot* slot,
                     Py_ssize_t start, Py_ssize_t n, const StepScalars* s) noexcept nogil:
    """Run `kernel` over elements [start, start + n) of a staged slot, STAGE at a time.

    Params and grads are stored as p_elem, state buffers as state_elem; a
    float32 array is handed to the kernel in place, any other is loaded into
    scratch and (params and state: the kernel writes them) stored back. With
    a master, the kernel updates the master in place and p is stored from it.
    """
    cdef float pbuf[STAGE]
    cdef float gbuf[STAGE]
    cdef float sbuf[MAX_BUFFERS][STAGE]
    cdef float* p
    cdef const float* g
    cdef float* bufs[MAX_BUFFERS]
    cdef Py_ssize_t at, m, j
    cdef bint master = slot.master != NULL
    cdef bint p_native = p_elem == ELEM_F32
    cdef bint s_native = state_elem == ELEM_F32
    cdef bint sr = slot.stochastic
    cdef uint64_t keys[MAX_BUFFERS + 1]
    for j in range(MAX_BUFFERS + 1):
        keys[j] = fastopt_stream_key(slot.round_key, j)
    at = start
    while at < start + n:
        m = start + n - at if start + n - at < STAGE else STAGE
        if p_native:
            p = <float*>slot.p + at
            g = <const float*>slot.g + at
        else:
            if master:
                p = <float*>slot.master + at
            else:
                load_elems(p_elem, slot.p, at, pbuf, m)
                p = pbuf
            load_elems(p_elem, slot.g, at, gbuf, m)
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
        if master:
            store_elems(p_elem, slot.p, at, p, m, False, 0)
        elif not p_native:
            store_elems(p_elem, slot.p, at, pbuf, m, sr, keys[0])
        if not s_native:
            for j in range(MAX_BUFFERS):
                if slot.buf[j] != NULL:
                    store_elems(state_elem, slot.buf[j], at, sbuf[j], m, sr, keys[j + 1])
        at += m


cdef bint widen_whole(int elem, const char* src, Py_ssize_t n, float** out) noexcept nogil:
    """out[0] = src's n elements as a new float32 array (in place if float32); False: no memory."""
    if elem == ELEM_F32 or src == NULL:
        out[0] = <float*>src
        return True
    out[0] = <float*>malloc((n if n > 0 else 1) * sizeof(float))
    if out[0] == NULL:
        return False
    load_elems(elem, src, 0, out[0], n)
    return True


cdef void run_staged_slot(slot_f32_t step, int p_elem, int state_elem, const Slot* slot,
                          const StepScalars* s, int threads) noexcept nogil:
    """A SLOTWISE rule over one staged slot: widened whole, stepped, stored back.

    Its passes read whole rows and columns, so a slot is widened into float32
    copies at once rather than block by block; the bits are those of the
    float32 step on the widened values, rounded as run_staged rounds. If the
    copies do not fit in memory the slot is left unchanged.
    """
    cdef float* p = NULL
    cdef float* g = NULL
    cdef float* bufs[MAX_BUFFERS]
    cdef int j
    cdef bint ok
    cdef StepScalars local = s[0]
    cdef bint master = slot.master != NULL
    if local.eps_from_dtype and p_elem != ELEM_F32 and not master:
        # (Adafactor's eps1=None: the machine epsilon of the parameter's dtype,
        # as torch takes finfo(grad.dtype).eps, not float32's it computes in;
        # a master copy is a float32 parameter, and takes float32's)
        local.eps = 0.0078125 if p_elem == ELEM_BF16 else 0.0009765625
        local.eps_from_dtype = False
    cdef bint s_native = state_elem == ELEM_F32
    for j in range(MAX_BUFFERS):
        bufs[j] = NULL
    if master:
        p = <float*>slot.master
        ok = widen_whole(p_elem, slot.g, slot.size, &g)
    else:
        ok = (widen_whole(p_elem, slot.p, slot.size, &p)
              and widen_whole(p_elem, slot.g, slot.size, &g))
    for j in range(MAX_BUFFERS):
        if ok and slot.buf[j] != NULL:
            ok = widen_whole(state_elem, slot.buf[j], slot.buf_size[j], &bufs[j])
    if ok:
        step(p, g, bufs, slot.size, slot.rows, slot.cols, &local, threads)
        if master:
            store_elems(p_elem, slot.p, 0, p, slot.size, False, 0)
        elif p_elem != ELEM_F32:
            store_elems(p_elem, slot.p, 0, p, slot.size, slot.stochastic,
                        fastopt_stream_key(slot.round_key, 0))
        for j in range(MAX_BUFFERS):
            if slot.buf[j] != NULL and not s_native:
                store_elems(state_elem, slot.buf[j], 0, bufs[j], slot.buf_size[j],
                            slot.stochastic, fastopt_stream_key(slot.round_key, j + 1))
    if p != NULL and not master and p_elem != ELEM_F32:
        free(p)
    if g != NULL and p_elem != ELEM_F32:
        free(g)
    for j in range(MAX_BUFFERS):
        if bufs[j] != NULL and not s_native:
            free(bufs[j])
