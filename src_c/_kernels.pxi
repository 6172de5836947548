# Compute layer, included once per instruction-set level by
# _kernels_baseline.pyx, _kernels_avx2.pyx and _kernels_avx512.pyx, which are
# the same code compiled with different -m flags (setup.py). fastopt/_dispatch.py
# picks the best module this CPU runs and hands its runner to the fast path.
#
# Nothing here validates. The API layer has already checked every array
# (ndarray, float32/float64, C-contiguous, aligned, writeable, matching dtype
# and size, no aliasing) and every hyperparameter, and has computed the
# per-step scalars in double precision. This layer only runs loops over
# pointers: one fused, in-place pass per update rule.
#
# Numerics follow torch.optim's single-tensor formulas operation by operation
# (docs/update_rules.rst). A float32 array is updated in float32 arithmetic with
# the per-step scalars rounded to float32 once, as torch does. The modules are
# compiled with -ffp-contract=off: no FMA changes a rounding, so every ISA
# level and every thread count gives bit-identical results (the update of an
# element never depends on how the elements are split).

from cpython.pycapsule cimport PyCapsule_New
from cython.parallel cimport parallel, prange, threadid
from libc.float cimport DBL_EPSILON, FLT_EPSILON
from libc.math cimport fabs, fabsf, sqrt, sqrtf
from libc.stdlib cimport malloc, free
from libc.string cimport memset

from _common cimport Slot, StepScalars, runner_t, stats_t, at_step_t, MAX_BUFFERS

cdef extern from *:
    """
    #if defined(__clang__) || defined(__GNUC__)
    #define FASTOPT_COMPILER ("gcc-compatible " __VERSION__)
    #elif defined(_MSC_VER)
    #define FASTOPT_COMPILER "msvc"
    #else
    #define FASTOPT_COMPILER "unknown"
    #endif
    /* Opt-in flush-to-zero (MXCSR FTZ, bit 15) and denormals-are-zero (DAZ,
       bit 6) around a kernel call, restored on exit. Subnormal numbers cost
       10-20x per operation on x86; the mode is per thread, so each OpenMP
       thread sets and restores its own. Elsewhere: a no-op. */
    #if defined(__SSE2__) || defined(_M_X64)
    #include <xmmintrin.h>
    static inline unsigned int fastopt_fp_enter(int flush) {
        unsigned int saved = _mm_getcsr();
        if (flush) _mm_setcsr(saved | 0x8040u);
        return saved;
    }
    static inline void fastopt_fp_leave(unsigned int saved) { _mm_setcsr(saved); }
    #else
    static inline unsigned int fastopt_fp_enter(int flush) { (void)flush; return 0; }
    static inline void fastopt_fp_leave(unsigned int saved) { (void)saved; }
    #endif
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTOPT_OPENMP 1
    #else
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_num_threads(void) { return 1; }
    #define FASTOPT_OPENMP 0
    #endif
    """
    int omp_get_max_threads() noexcept nogil
    unsigned int fastopt_fp_enter(int flush) noexcept nogil
    void fastopt_fp_leave(unsigned int saved) noexcept nogil
    int omp_get_num_threads() noexcept nogil
    const int FASTOPT_OPENMP
    const char* FASTOPT_ISA     # set per module by setup.py
    const char* FASTOPT_CFLAGS  # likewise
    const char* FASTOPT_COMPILER

# The parallel loop every multi-threaded pass runs on (src_c/pool.h says why
# it is not an OpenMP region): items [0, total) in chunks of `grain`, claimed
# by whichever thread is running. OpenMP's thread limit (omp_get_max_threads,
# which threadpoolctl sets) still caps the threads.
cdef extern from "pool.h":
    ctypedef void (*fastopt_task_t)(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil
    void fastopt_pool_run(int threads, Py_ssize_t total, Py_ssize_t grain,
                          fastopt_task_t task, void* ctx) noexcept nogil
    const int FASTOPT_POOL_THREADS
    void fastopt_pool_stats(unsigned long long out[5]) noexcept nogil


ctypedef fused floating:
    float
    double


# The work (elements x the rule's relative cost, RULE_COST in _rules.pxi)
# below which a step stays on the calling thread: waking a thread pool costs a
# few microseconds, more than a small update. Measured with
# bench/thread_threshold.py on 2 cores: two threads win from about 6k elements
# for Adam, 16k for SGD with momentum and 32k for plain SGD.
cdef Py_ssize_t parallel_min_work = 32768

# Chunks: up to chunks_per_thread per thread, and at least min_chunk_work
# work units each (set_chunking changes both). More chunks than threads let a
# thread that runs late do less than its share; few and large ones keep the
# claims (a compare-and-swap on a line two cores write) and the uneven end
# cheap: measured side by side on 2 cores, 16 chunks of 16k units cost Adam
# at 1e5 elements about 7% against 4 of 64k, and bench/contention.py gives
# the same tail under a hog either way (a stall costs an OS time slice,
# whatever the chunk). The count is a multiple of the threads, so that
# threads running alike end together. Chunk edges fall on multiples of 16
# elements (64 bytes of float32): two threads rarely write the same cache line.
cdef enum:
    SPLIT_ALIGN = 16
cdef Py_ssize_t chunks_per_thread = 4
cdef Py_ssize_t min_chunk_work = 65536

# Fixed-order sums (the gradient statistics, the reducing rules' pass 0): the
# elements are cut into blocks of STATS_BLOCK, each summed in double with
# LANES interleaved accumulators, and the block sums added in block order.
cdef enum:
    STATS_BLOCK = 8192
    LANES = 8
    MAX_SUMS = 2     # sums per parameter of a reducing rule (RULE_SUMS)


cdef inline floating lerp(floating a, floating b, floating w) noexcept nogil:
    # torch's lerp: two forms, so that w = 0 gives a and w = 1 gives b exactly.
    # The cast keeps 1 - w in float for float32: Cython writes a bare 1 as the
    # double literal 1.0, which would compute this line in double.
    if w < <floating>0.5:
        return a + w * (b - a)
    return b - (b - a) * (<floating>1 - w)


cdef inline floating nan_max(floating a, floating b) noexcept nogil:
    # NaN if either side is NaN (torch.maximum, numpy.maximum), so a NaN never
    # vanishes here. Of two equal values b wins, as in numpy.maximum: that
    # decides max(-0.0, +0.0), and the reference twin uses numpy.maximum.
    # One select, no early return: loops that use it stay vectorizable (a NaN
    # b fails a > b and is taken as b).
    return a if (a > b or a != a) else b


# s.one (StepScalars) is 1.0, set at run time, so the compiler cannot fold
# it. A loop that picks a sign or factor per element and multiplies by it
# vectorizes only if the picks are selects; with the constants 1 and -1
# among them, GCC folds those multiplications away and leaves the remaining
# one in an arm of a branch, where it must stay (an FP operation the source
# runs only sometimes may not run always: -ftrapping-math, the default) -
# and the loop stays scalar, mispredicting on every other random sign
# (Rprop, Lion: 10-20x). Picking from s.one keeps the multiplication whole.
# (Not x * 0 + 1 from a hyperparameter: an infinite one, as torch allows
# Rprop's etaplus, would make it NaN.)


cdef inline floating absolute(floating x) noexcept nogil:
    if floating is float:
        return fabsf(x)
    else:
        return fabs(x)


cdef inline floating root(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline void lane_sumsq(const floating* x, Py_ssize_t n, double* acc) noexcept nogil:
    """Add x's squares into acc[0..LANES) in double, element i into lane i % LANES."""
    cdef Py_ssize_t i, j, base
    cdef Py_ssize_t whole = n - n % LANES
    cdef double v
    for i in range(whole // LANES):
        base = i * LANES
        for j in range(LANES):
            v = <double>x[base + j]
            acc[j] = acc[j] + v * v
    for i in range(whole, n):
        v = <double>x[i]
        acc[i - whole] = acc[i - whole] + v * v


# ---------------------------------------------------------------- storage
# How a kind of stored array reaches a rule's loop: in place (float32,
# float64) or through float32 blocks, loaded and stored back rounded.

include "storage.pxi"


# ---------------------------------------------------------------- rules
# Each rule lives in src_c/rules/<name>.pxi: a loop body with its option
# switches as arguments, a kernel that calls it once per switch combination
# with constant switches, and its per-step scalars. After inlining each call is
# a straight-line loop the compiler vectorizes; a single loop testing the
# switches per element stays scalar ("control flow in loop"), about 4x slower
# for Adam. The generated _rules.pxi includes them all and holds the one
# dispatch: call_rule (rule x storage kind) and rule_at_step.

include "_rules.pxi"


# ----------------------------------------------------------------- driver

# A slot with a weight average (Slot.avg) moves it in blocks of this many
# elements right after the rule: the block of p just written is still in the
# core's cache (32 KiB of float32: L2), so the average costs its own read and
# write only. 2048 measured slower on the 2-core EPYC (1.5x the bare step
# at 1e7 against 1.3-1.45x).
DEF AVERAGE_BLOCK = 8192


cdef void average_range(const Slot* slot, Py_ssize_t start, Py_ssize_t n) noexcept nogil:
    """Elements [start, start + n) of a slot's average: avg = lerp(avg, p, avg_weight)."""
    cdef Slot pair
    cdef StepScalars w
    memset(&pair, 0, sizeof(Slot))
    memset(&w, 0, sizeof(StepScalars))
    pair.p = slot.avg           # the ema rule's "parameter" is the average,
    pair.g = slot.p             # its "gradient" the parameter
    pair.size = slot.size
    pair.storage = slot.storage
    w.lr = slot.avg_weight
    call_rule(RULE_EMA, &pair, start, n, &w)


cdef void run_range(int rule, const Slot* slots, Py_ssize_t count, Py_ssize_t lo,
                    Py_ssize_t hi, const StepScalars* s) noexcept nogil:
    """Run elements [lo, hi) of the slots laid end to end."""
    cdef Py_ssize_t i, size, a, b, e
    cdef Py_ssize_t offset = 0
    for i in range(count):
        size = slots[i].size
        if offset >= hi:
            break
        if offset + size > lo:
            a = lo - offset if lo > offset else 0
            b = hi - offset if hi - offset < size else size
            if slots[i].avg == NULL:
                call_rule(rule, &slots[i], a, b - a, s)
            else:
                while a < b:
                    e = a + AVERAGE_BLOCK if b - a > AVERAGE_BLOCK else b
                    call_rule(rule, &slots[i], a, e - a, s)
                    average_range(&slots[i], a, e - a)
                    a = e
        offset += size


cdef void average_task(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """The averages alone, elements [lo, hi) of the slots laid end to end."""
    cdef RangeJob* job = <RangeJob*>ctx
    cdef Py_ssize_t i, size, a, b, offset = 0
    for i in range(job.count):
        size = job.slots[i].size
        if offset >= hi:
            break
        if offset + size > lo and job.slots[i].avg != NULL:
            a = lo - offset if lo > offset else 0
            b = hi - offset if hi - offset < size else size
            average_range(&job.slots[i], a, b - a)
        offset += size


cdef int step_threads(int rule, Py_ssize_t total, int max_threads) noexcept nogil:
    """Threads for a step of `total` elements: 1 below parallel_min_work."""
    cdef int threads = omp_get_max_threads()  # threadpoolctl's limit lands here
    if max_threads < threads:
        threads = max_threads
    if threads < 1 or total * RULE_COST[rule] < parallel_min_work:
        return 1
    return threads


cdef Py_ssize_t chunk_count(Py_ssize_t work, int threads) noexcept nogil:
    """Chunks for `work` units: a multiple of threads, up to chunks_per_thread
    each while every chunk keeps min_chunk_work."""
    cdef Py_ssize_t per_thread = work // (min_chunk_work * threads)
    if per_thread > chunks_per_thread:
        per_thread = chunks_per_thread
    return threads * (per_thread if per_thread > 1 else 1)


cdef Py_ssize_t element_grain(int rule, Py_ssize_t total, int threads) noexcept nogil:
    """Elements per chunk (see chunks_per_thread), a multiple of SPLIT_ALIGN."""
    cdef Py_ssize_t count = chunk_count(total * RULE_COST[rule], threads)
    cdef Py_ssize_t grain = (total + count - 1) // count
    return (grain + SPLIT_ALIGN - 1) // SPLIT_ALIGN * SPLIT_ALIGN


cdef Py_ssize_t block_grain(Py_ssize_t nblocks, int threads) noexcept nogil:
    """Blocks (of STATS_BLOCK elements) per chunk."""
    cdef Py_ssize_t count = chunk_count(nblocks * STATS_BLOCK, threads)
    return (nblocks + count - 1) // count


# A task of the pool: one job's items [lo, hi). Each sets the thread's
# floating-point mode itself, as it may run on any thread.

cdef struct RangeJob:
    int rule
    const Slot* slots
    Py_ssize_t count
    const StepScalars* s          # the step's scalars (flush_denormals read here)
    const StepScalars* per_slot   # each slot's own scalars (a reducing rule), or NULL


cdef void range_task(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Elements [lo, hi) of the slots laid end to end."""
    cdef RangeJob* job = <RangeJob*>ctx
    cdef unsigned int saved = fastopt_fp_enter(job.s.flush_denormals)
    if job.per_slot == NULL:
        run_range(job.rule, job.slots, job.count, lo, hi, job.s)
    else:
        run_range_each(job.rule, job.slots, job.count, lo, hi, job.per_slot)
    fastopt_fp_leave(saved)


cdef void run_slots(int rule, const Slot* slots, Py_ssize_t count, const StepScalars* consts,
                    Py_ssize_t step, bint first_step, int max_threads) noexcept nogil:
    """The runner: all slots of a step in one pass, in chunks over the threads."""
    cdef StepScalars scalars = consts[0]
    rule_at_step(rule, &scalars, step, first_step)  # once per step, in double
    cdef Py_ssize_t total = 0, i
    cdef bint averages = False
    for i in range(count):
        total += slots[i].size
        averages = averages or slots[i].avg != NULL
    if RULE_SLOTWISE[rule] or RULE_SUMS[rule] > 0:
        if RULE_SLOTWISE[rule]:
            run_slotwise(rule, slots, count, &scalars, max_threads)
        else:
            run_reduced(rule, slots, count, &scalars, max_threads)
        if averages:  # these rules read whole arrays: the averages after, in a pass
            run_averages(slots, count, total, max_threads)
        return
    cdef int threads = step_threads(rule, total, max_threads)
    cdef RangeJob job
    job.rule = rule
    job.slots = slots
    job.count = count
    job.s = &scalars
    job.per_slot = NULL
    fastopt_pool_run(threads, total, element_grain(rule, total, threads), range_task, &job)


cdef void run_averages(const Slot* slots, Py_ssize_t count, Py_ssize_t total,
                       int max_threads) noexcept nogil:
    """The slots' averages alone, in chunks over the threads."""
    cdef int threads = step_threads(RULE_EMA, total, max_threads)
    cdef RangeJob job
    job.rule = RULE_EMA
    job.slots = slots
    job.count = count
    job.s = NULL
    job.per_slot = NULL
    fastopt_pool_run(threads, total, element_grain(RULE_EMA, total, threads), average_task, &job)


# ------------------------------------------------------------ reducing rules
# A reducing rule (Lamb) needs a sum over each parameter before it can update
# it: pass 0 (the moments, and the sums into s.acc) over fixed blocks of each
# parameter, the block sums added in block order per parameter, the rule's
# finish turning them into that parameter's scalars, and pass 1 (the update).
# The blocks are the same for any thread count, so are the bits.

cdef inline Py_ssize_t blocks_of(Py_ssize_t size) noexcept nogil:
    return (size + STATS_BLOCK - 1) // STATS_BLOCK


cdef inline void reduce_block(int rule, const Slot* slot, Py_ssize_t b, const StepScalars* s,
                              double* sums) noexcept nogil:
    """Pass 0 over block b of one slot; sums[r] = the block's r-th sum."""
    cdef double acc[MAX_SUMS * LANES]
    cdef StepScalars local = s[0]
    cdef Py_ssize_t start = b * STATS_BLOCK, n, r, j
    n = slot.size - start if slot.size - start < STATS_BLOCK else STATS_BLOCK
    for j in range(MAX_SUMS * LANES):
        acc[j] = 0.0
    local.phase = 0
    local.acc = <size_t>acc
    call_rule(rule, slot, start, n, &local)
    for r in range(RULE_SUMS[rule]):
        sums[r] = 0.0
        for j in range(LANES):
            sums[r] += acc[r * LANES + j]


cdef inline void finish_slot(int rule, const double* sums, const StepScalars* s,
                             StepScalars* out) noexcept nogil:
    """A slot's pass-1 scalars from its sums."""
    out[0] = s[0]
    out.phase = 1
    out.acc = 0
    rule_finish(rule, out, sums)


cdef void reduce_blocks(int rule, const Slot* slots, const Py_ssize_t* first_block,
                        Py_ssize_t k0, Py_ssize_t k1, const StepScalars* s,
                        double* block_sums) noexcept nogil:
    """Pass 0 over blocks k0..k1-1 of all slots (numbered slot by slot)."""
    cdef Py_ssize_t i = 0, k
    for k in range(k0, k1):
        while first_block[i + 1] <= k:
            i += 1
        reduce_block(rule, &slots[i], k - first_block[i], s, block_sums + k * RULE_SUMS[rule])


cdef struct BlockJob:
    int rule
    const Slot* slots
    const Py_ssize_t* first_block
    const StepScalars* s
    double* block_sums


cdef void block_task(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Pass 0 over blocks [lo, hi)."""
    cdef BlockJob* job = <BlockJob*>ctx
    cdef unsigned int saved = fastopt_fp_enter(job.s.flush_denormals)
    reduce_blocks(job.rule, job.slots, job.first_block, lo, hi, job.s, job.block_sums)
    fastopt_fp_leave(saved)


cdef void run_reduced(int rule, const Slot* slots, Py_ssize_t count, const StepScalars* s,
                      int max_threads) noexcept nogil:
    cdef Py_ssize_t total = 0, nblocks = 0, i, b, r
    cdef Py_ssize_t nsums = RULE_SUMS[rule]
    cdef int threads
    cdef unsigned int saved = 0
    cdef double sums[MAX_SUMS]
    cdef double block[MAX_SUMS]
    cdef double* block_sums = NULL
    cdef Py_ssize_t* first_block
    cdef StepScalars* per_slot
    cdef StepScalars after
    cdef BlockJob blocks
    cdef RangeJob update
    for i in range(count):
        total += slots[i].size
        nblocks += blocks_of(slots[i].size)
    threads = step_threads(rule, total, max_threads)
    if threads > 1:
        block_sums = <double*>malloc(nblocks * nsums * sizeof(double) + count * sizeof(StepScalars)
                                     + (count + 1) * sizeof(Py_ssize_t))
    if block_sums == NULL:
        # One thread (or no memory for the parallel plan): slot by slot, the
        # same blocks added in the same order, so the same bits.
        saved = fastopt_fp_enter(s.flush_denormals)
        for i in range(count):
            for r in range(nsums):
                sums[r] = 0.0
            for b in range(blocks_of(slots[i].size)):
                reduce_block(rule, &slots[i], b, s, block)
                for r in range(nsums):
                    sums[r] += block[r]
            finish_slot(rule, sums, s, &after)
            call_rule(rule, &slots[i], 0, slots[i].size, &after)
        fastopt_fp_leave(saved)
        return
    per_slot = <StepScalars*>(block_sums + nblocks * nsums)
    first_block = <Py_ssize_t*>(per_slot + count)
    first_block[0] = 0
    for i in range(count):
        first_block[i + 1] = first_block[i] + blocks_of(slots[i].size)
    blocks.rule = rule
    blocks.slots = slots
    blocks.first_block = first_block
    blocks.s = s
    blocks.block_sums = block_sums
    fastopt_pool_run(threads, nblocks, block_grain(nblocks, threads), block_task, &blocks)
    for i in range(count):
        for r in range(nsums):
            sums[r] = 0.0
        for b in range(first_block[i], first_block[i + 1]):
            for r in range(nsums):
                sums[r] += block_sums[b * nsums + r]
        finish_slot(rule, sums, s, &per_slot[i])
    update.rule = rule
    update.slots = slots
    update.count = count
    update.s = s
    update.per_slot = per_slot
    fastopt_pool_run(threads, total, element_grain(rule, total, threads), range_task, &update)
    free(block_sums)


cdef void run_range_each(int rule, const Slot* slots, Py_ssize_t count, Py_ssize_t lo,
                         Py_ssize_t hi, const StepScalars* per_slot) noexcept nogil:
    """run_range with each slot's own scalars."""
    cdef Py_ssize_t i, size, a, b
    cdef Py_ssize_t offset = 0
    for i in range(count):
        size = slots[i].size
        if offset >= hi:
            break
        if offset + size > lo:
            a = lo - offset if lo > offset else 0
            b = hi - offset if hi - offset < size else size
            call_rule(rule, &slots[i], a, b - a, &per_slot[i])
        offset += size


# ------------------------------------------------------------ slotwise rules
# A SLOTWISE rule (Adafactor) steps each parameter whole: its passes need the
# parameter's own sums and shape. Slot by slot, each on as many threads as its
# size is worth; the rule's sums are ordered by the shape alone, so the bits
# never depend on the threads.

cdef void run_slotwise(int rule, const Slot* slots, Py_ssize_t count, const StepScalars* s,
                       int max_threads) noexcept nogil:
    cdef Py_ssize_t i
    cdef int threads = omp_get_max_threads()
    cdef unsigned int saved
    if max_threads < threads:
        threads = max_threads
    saved = fastopt_fp_enter(s.flush_denormals)
    for i in range(count):
        if threads > 1 and slots[i].size * RULE_COST[rule] >= parallel_min_work:
            rule_slot(rule, &slots[i], s, threads)
        else:
            rule_slot(rule, &slots[i], s, 1)
    fastopt_fp_leave(saved)


# ---------------------------------------------------------- gradient stats
# The global gradient norm must not depend on the thread count or the ISA
# level: the elements, laid end to end, are cut into fixed blocks; each block
# is summed in double with eight interleaved accumulators (a fixed order the
# compiler may vectorize as it is, without reassociating), and the block sums
# are added in block order on one thread.


cdef inline void sumsq_piece(const floating* x, Py_ssize_t n, double* acc,
                             double* bad) noexcept nogil:
    """Add x's squares into acc[0..LANES) (element i into lane i % LANES); bad's
    lanes turn NaN once any element is NaN or infinite."""
    cdef Py_ssize_t i, j, base
    cdef double v
    cdef Py_ssize_t whole = n - n % LANES
    # (acc alone cannot say it: a float64 square may overflow to inf in a
    # finite gradient, and a block's lanes run on across pieces.)
    for i in range(whole // LANES):
        base = i * LANES
        for j in range(LANES):
            v = <double>x[base + j]
            acc[j] = acc[j] + v * v
            bad[j] = bad[j] + v * 0.0   # NaN once any element is NaN or infinite
    for i in range(whole, n):
        v = <double>x[i]
        acc[i - whole] = acc[i - whole] + v * v
        bad[i - whole] = bad[i - whole] + v * 0.0


# Two blocks' sums of squares side by side: each lane's sum is a chain of
# dependent adds, so one block keeps few adds in flight and the pass runs
# below a read's bandwidth; two independent blocks double them. gcc does not
# vectorize the two-array form on its own, hence the explicit vectors; every
# version adds element i into lane i % 8 (a multiply, then an add: no FMA),
# as lane_sumsq does, so the bits are the same at every level.
cdef extern from *:
    """
    #if defined(__AVX__)
    #include <immintrin.h>
    #elif defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    static inline void fastopt_sumsq_pair(const float* x, const float* y, long n,
                                          double* sx, double* sy) {
        double a[8], b[8];
        long i;
        int j;
    #if defined(__AVX__)
        __m256d a0 = _mm256_setzero_pd(), a1 = a0, b0 = a0, b1 = a0, v;
        for (i = 0; i + 8 <= n; i += 8) {
            v = _mm256_cvtps_pd(_mm_loadu_ps(x + i));     a0 = _mm256_add_pd(a0, _mm256_mul_pd(v, v));
            v = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4)); a1 = _mm256_add_pd(a1, _mm256_mul_pd(v, v));
            v = _mm256_cvtps_pd(_mm_loadu_ps(y + i));     b0 = _mm256_add_pd(b0, _mm256_mul_pd(v, v));
            v = _mm256_cvtps_pd(_mm_loadu_ps(y + i + 4)); b1 = _mm256_add_pd(b1, _mm256_mul_pd(v, v));
        }
        _mm256_storeu_pd(a, a0); _mm256_storeu_pd(a + 4, a1);
        _mm256_storeu_pd(b, b0); _mm256_storeu_pd(b + 4, b1);
    #elif defined(__SSE2__)
        __m128d ax[4], bx[4], v;
        for (j = 0; j < 4; j++) ax[j] = bx[j] = _mm_setzero_pd();
        for (i = 0; i + 8 <= n; i += 8) {
            for (j = 0; j < 4; j++) {
                v = _mm_cvtps_pd(_mm_castpd_ps(_mm_load_sd((const double*)(x + i + 2 * j))));
                ax[j] = _mm_add_pd(ax[j], _mm_mul_pd(v, v));
                v = _mm_cvtps_pd(_mm_castpd_ps(_mm_load_sd((const double*)(y + i + 2 * j))));
                bx[j] = _mm_add_pd(bx[j], _mm_mul_pd(v, v));
            }
        }
        for (j = 0; j < 4; j++) { _mm_storeu_pd(a + 2 * j, ax[j]); _mm_storeu_pd(b + 2 * j, bx[j]); }
    #else
        for (j = 0; j < 8; j++) a[j] = b[j] = 0.0;
        for (i = 0; i + 8 <= n; i += 8)
            for (j = 0; j < 8; j++) {
                double v = (double)x[i + j], w = (double)y[i + j];
                a[j] = a[j] + v * v;
                b[j] = b[j] + w * w;
            }
    #endif
        *sx = 0.0;
        *sy = 0.0;
        for (j = 0; j < 8; j++) {
            *sx += a[j];
            *sy += b[j];
        }
    }
    """
    # sx, sy = the sums of squares of x[0..n), y[0..n) (n a multiple of 8),
    # in lane_sumsq's order from zero
    void fastopt_sumsq_pair(const float* x, const float* y, long n, double* sx,
                            double* sy) noexcept nogil


cdef void stats_blocks(const Slot* slots, Py_ssize_t count, Py_ssize_t total,
                       Py_ssize_t k0, Py_ssize_t k1, double* sums, double* bads) noexcept nogil:
    """Blocks k0..k1-1: sums[k] = sum of squares, bads[k] = NaN if any non-finite."""
    cdef Py_ssize_t i = 0, offset = 0, k = k0, pos, stop, end, j, m
    cdef int elem
    cdef float block[STAGE]
    cdef double acc[LANES]
    cdef double bad[LANES]
    cdef const float* x
    while k < k1:
        pos = k * STATS_BLOCK
        while offset + slots[i].size <= pos:  # the slot holding pos (skips empty ones)
            offset += slots[i].size
            i += 1
        if (k + 1 < k1 and P_ELEM[slots[i].storage] == ELEM_F32
                and pos + 2 * STATS_BLOCK <= offset + slots[i].size):
            # Two whole blocks of one float32 gradient (the common case). A
            # float32 square cannot overflow double, so a block's sum is
            # non-finite exactly when an element is: no second sum for bads.
            x = <const float*>slots[i].g + (pos - offset)
            fastopt_sumsq_pair(x, x + STATS_BLOCK, STATS_BLOCK, &sums[k], &sums[k + 1])
            bads[k] = sums[k] * 0.0
            bads[k + 1] = sums[k + 1] * 0.0
            k += 2
            continue
        for j in range(LANES):
            acc[j] = 0.0
            bad[j] = 0.0
        stop = pos + STATS_BLOCK if pos + STATS_BLOCK < total else total
        while pos < stop:
            while offset + slots[i].size <= pos:  # the slot holding pos (skips empty ones)
                offset += slots[i].size
                i += 1
            end = offset + slots[i].size if offset + slots[i].size < stop else stop
            elem = P_ELEM[slots[i].storage]
            if elem == ELEM_F64:
                sumsq_piece(<double*>slots[i].g + (pos - offset), end - pos, acc, bad)
            elif elem == ELEM_F32:
                sumsq_piece(<float*>slots[i].g + (pos - offset), end - pos, acc, bad)
            else:
                # Widened a block at a time; STAGE is a multiple of LANES, so
                # every element keeps its lane.
                while pos < end:
                    m = end - pos if end - pos < STAGE else STAGE
                    load_elems(elem, slots[i].g, pos - offset, block, m)
                    sumsq_piece(block, m, acc, bad)
                    pos += m
            pos = end
        sums[k] = 0.0
        bads[k] = 0.0
        for j in range(LANES):
            sums[k] += acc[j]
            bads[k] += bad[j]
        k += 1


cdef struct StatsJob:
    const Slot* slots
    Py_ssize_t count
    Py_ssize_t total
    double* sums
    double* bads


cdef void stats_task(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Blocks [lo, hi) of the gradient statistics."""
    cdef StatsJob* job = <StatsJob*>ctx
    stats_blocks(job.slots, job.count, job.total, lo, hi, job.sums, job.bads)


cdef int grad_stats(const Slot* slots, Py_ssize_t count, int max_threads, double* sumsq,
                    bint* nonfinite) noexcept nogil:
    cdef Py_ssize_t total = 0, nblocks, k, i
    cdef int threads = omp_get_max_threads()
    cdef double s = 0.0, b = 0.0
    cdef StatsJob job
    for i in range(count):
        total += slots[i].size
    nblocks = (total + STATS_BLOCK - 1) // STATS_BLOCK
    job.sums = <double*>malloc((nblocks + 1) * 2 * sizeof(double))
    if job.sums == NULL:
        return -1
    job.bads = job.sums + nblocks + 1
    job.slots = slots
    job.count = count
    job.total = total
    if max_threads < threads:
        threads = max_threads
    if total < parallel_min_work:
        threads = 1
    fastopt_pool_run(threads, nblocks, block_grain(nblocks, threads), stats_task, &job)
    for k in range(nblocks):
        s += job.sums[k]
        b += job.bads[k]
    free(job.sums)
    sumsq[0] = s
    nonfinite[0] = b != b
    return 0


# ------------------------------------------------------------------ exports


def runner():
    """This module's runner, as a capsule for fastopt._fastpath."""
    return PyCapsule_New(<void*>run_slots, b"fastopt.runner", NULL)


def stats():
    """This module's gradient statistics, as a capsule for fastopt._fastpath."""
    return PyCapsule_New(<void*>grad_stats, b"fastopt.stats", NULL)


cdef void at_step_entry(int rule, StepScalars* s, Py_ssize_t step,
                        bint first_step) noexcept nogil:
    rule_at_step(rule, s, step, first_step)


def at_step():
    """This module's per-step scalars (rule_at_step), as a capsule for fastopt._fastpath."""
    return PyCapsule_New(<void*>at_step_entry, b"fastopt.at_step", NULL)


_ELEM_NAMES = {"bfloat16": ELEM_BF16, "float16": ELEM_F16}


def narrow(str dtype, const float[::1] src, unsigned short[::1] dst, key=None,
           Py_ssize_t start=0):
    """Round float32 ``src`` into ``dst``, the bits of a 16-bit ``dtype`` (storage.pxi's store).

    ``key``: round stochastically with stream ``key``'s bits, ``src[i]`` being
    element ``start + i`` of its array (None: to nearest even).
    """
    cdef Py_ssize_t n = min(src.shape[0], dst.shape[0])
    if n:
        store_elems(_ELEM_NAMES[dtype], <char*>&dst[0] - 2 * start, start, &src[0], n,
                    key is not None, 0 if key is None else <uint64_t>key)


def random_bits(uint64_t key, Py_ssize_t start, unsigned int[::1] out):
    """out[i] = the random integer of element start + i of stream ``key`` (storage.pxi)."""
    cdef Py_ssize_t i
    for i in range(out.shape[0]):
        out[i] = fastopt_random_bits(key, start + i)


def stream_key(uint64_t key, uint64_t stream):
    """The key of array ``stream`` of a slot whose round_key is ``key`` (0: p, 1 + j: buffer j)."""
    return fastopt_stream_key(key, stream)


def widen(str dtype, const unsigned short[::1] src, float[::1] dst):
    """Widen the bits of a 16-bit ``dtype`` in ``src`` into float32 ``dst`` (storage.pxi's load)."""
    load_elems(_ELEM_NAMES[dtype], <const char*>&src[0], 0, &dst[0], min(src.shape[0], dst.shape[0]))


def info():
    """How this module was built, and OpenMP's current thread limit."""
    return {
        "isa": FASTOPT_ISA.decode(),
        "compiler": FASTOPT_COMPILER.decode(),
        "flags": FASTOPT_CFLAGS.decode(),
        "openmp": bool(FASTOPT_OPENMP),
        "omp_max_threads": omp_get_max_threads(),
        "f16c": bool(FASTOPT_F16C),
        "thread_pool": "pthreads" if FASTOPT_POOL_THREADS else "openmp",
    }


def pool_stats():
    """This module's thread pool so far (counts since the module loaded).

    jobs: parallel loops asked for; parallel: those that ran on several
    threads; stalls: those whose caller waited for a claimed chunk well past a
    chunk's time (a preempted worker; the jobs after one run serially a
    while); chunks: the parallel jobs' chunks; caller_chunks: how many of
    those the calling thread ran.
    """
    cdef unsigned long long out[5]
    fastopt_pool_stats(out)
    return {"jobs": out[0], "parallel": out[1], "stalls": out[2],
            "chunks": out[3], "caller_chunks": out[4]}


def set_parallel_min_work(Py_ssize_t work):
    """Work (elements x rule cost) below which a step runs on one thread."""
    global parallel_min_work
    parallel_min_work = work


def get_parallel_min_work():
    return parallel_min_work


def set_chunking(Py_ssize_t per_thread, Py_ssize_t min_work):
    """Chunks per thread (at most) and the least work (elements x rule cost) in one."""
    global chunks_per_thread, min_chunk_work
    chunks_per_thread = max(per_thread, 1)
    min_chunk_work = max(min_work, 1)


def get_chunking():
    return chunks_per_thread, min_chunk_work
