/* fastopt's thread pool: a parallel loop that a busy core cannot stall.
 *
 * Why not an OpenMP parallel region with an even split: each thread is given
 * its share in advance and the caller waits at the closing barrier for all of
 * them. When another process keeps one core busy, the OS runs a woken worker
 * only when the hog's time slice ends, and a 25 us step takes 4-8 ms
 * (bench/contention.py measures it).
 *
 * Here the work is cut into a few chunks per thread, and each thread taking
 * part (the caller is share 0, worker i share i + 1) owns a contiguous share
 * of them: the same share every step, so that what a thread wrote last step
 * is still in its core's cache. Each share is one word on its own cache line,
 * gen:32 | lo:16 | hi:16: its owner claims chunk lo from the front, and a
 * thread done with its own share steals chunk hi - 1 from the back of the
 * others', each with one compare-and-swap. The caller publishes a job by
 * storing the shares and then the job word (gen:32 | nchunks:16 | parts:16),
 * and starts at once; it waits only for chunks that were claimed: a worker
 * that wakes late finds its share taken and goes back to sleep, and nobody
 * waited for it. A claim names its generation, so a thread still looking at
 * an old job can never take a chunk of a new one. A chunk's result never
 * depends on who ran it, so the bits are those of one thread.
 *
 * Even so, a worker that the OS preempts in the middle of a chunk holds that
 * chunk for the other process's whole time slice (milliseconds), and Linux
 * will not move a thread that just ran to the idle core ("cache hot"). A
 * chunk cannot be taken from the thread that claimed it (the updates are in
 * place; running one twice is wrong), and a third runnable thread on two
 * cores can push the caller itself onto the busy core. So the pool learns.
 * Each parallel job times its caller's fastest whole chunk; a job that took
 * over twice as long as that pace on one thread would have is a stall. After
 * one, the next jobs run on the caller alone: 16 after a first stall, then
 * 2x + 16 (up to 1024) after each stall that follows within
 * FASTOPT_POOL_CALM clean parallel jobs; each such calm run halves the
 * count. Under a steady hog, stalls come every few hundred parallel jobs,
 * the count climbs to 1024 and most steps run serially (two threads buy
 * nothing there anyway); idle, a stray stall costs a few dozen serial steps.
 *
 * Workers spin a bounded while after a job (steps come back to back in a
 * loop), then sleep on a condition variable; the caller signals only when
 * one sleeps. One job runs at a time: a caller that finds the pool busy
 * (another Python thread stepping) runs its job on its own thread. After a
 * fork the child starts with no workers.
 *
 * Each compute-layer module (one per SIMD level) includes this header and
 * has its own pool; only the active level's ever starts threads.
 */
#ifndef FASTOPT_POOL_H
#define FASTOPT_POOL_H

#include <stddef.h>
#include <stdint.h>

typedef void (*fastopt_task_t)(void *ctx, Py_ssize_t lo, Py_ssize_t hi);

#define FASTOPT_POOL_MAX_CHUNKS 0xffff

/* Items [0, total) in chunks of grain items: task(ctx, lo, hi) on up to
   `threads` threads (the caller's included). */
static void fastopt_pool_run(int threads, Py_ssize_t total, Py_ssize_t grain,
                             fastopt_task_t task, void *ctx);

#if !defined(_WIN32) && (defined(__GNUC__) || defined(__clang__))
#define FASTOPT_POOL_THREADS 1
#include <pthread.h>
#include <signal.h>
#include <sched.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define fastopt_relax() _mm_pause()
#elif defined(__aarch64__)
#define fastopt_relax() __asm__ __volatile__("yield")
#else
#define fastopt_relax() ((void)0)
#endif

/* Spins before a waiting worker sleeps (about 50 us of pause instructions),
   and before the caller, waiting for claimed chunks, sleeps. */
#define FASTOPT_POOL_SPIN 2000
#define FASTOPT_POOL_MAX_WORKERS 255
/* Serial jobs after a first stall and at most; clean parallel jobs in a row
   that halve the count. */
#define FASTOPT_POOL_BACKOFF_MIN 16
#define FASTOPT_POOL_BACKOFF_MAX 1024
#define FASTOPT_POOL_CALM 256

static struct {
    pthread_mutex_t lock;          /* guards sleeping and waking */
    pthread_cond_t wake;           /* workers wait here for a job */
    pthread_cond_t finished;       /* the caller waits here for claimed chunks */
    uint64_t word;                 /* gen:32 | nchunks:16 | parts:16 (atomic) */
    Py_ssize_t done;               /* chunks finished this generation (atomic) */
    int sleepers;                  /* workers asleep on `wake` (atomic) */
    int waiting;                   /* the caller is asleep on `finished` (atomic) */
    int busy;                      /* a job is running (atomic) */
    int workers;                   /* started; only the caller that holds busy starts more */
    int atfork;                    /* the fork handler is registered */
    /* The caller that holds busy alone reads and writes these. */
    int backoff;                   /* serial jobs after the last stall */
    int countdown;                 /* jobs left to run serially */
    int calm;                      /* clean parallel jobs since the last stall or halving */
    uint64_t jobs, parallel, stalls, chunks, mine;   /* counters for fastopt_pool_stats */
    fastopt_task_t task;           /* the job: read only after claiming a chunk */
    void *ctx;
    Py_ssize_t total, grain;
} fastopt_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};

/* The shares of the job: share s is chunks [lo, hi) (atomic), one cache
   line each, so that claims in one share do not slow the others. */
static struct {
    uint64_t word;                 /* gen:32 | lo:16 | hi:16 */
    char pad[64 - sizeof(uint64_t)];
} fastopt_shares[FASTOPT_POOL_MAX_WORKERS + 1] __attribute__((aligned(64)));

#define FASTOPT_GEN(w) ((uint32_t)((w) >> 32))
#define FASTOPT_HIGH(w) ((Py_ssize_t)(((w) >> 16) & 0xffff))   /* nchunks, or a share's lo */
#define FASTOPT_LOW(w) ((Py_ssize_t)((w) & 0xffff))            /* parts, or a share's hi */

static double fastopt_pool_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Take one chunk of share s of generation gen: its owner from the front,
   any other thread from the back. Returns the chunk, or -1 if none is left. */
static Py_ssize_t fastopt_pool_take(int s, uint32_t gen, int owner) {
    uint64_t *share = &fastopt_shares[s].word;
    uint64_t w = __atomic_load_n(share, __ATOMIC_ACQUIRE);
    for (;;) {
        Py_ssize_t lo = FASTOPT_HIGH(w), hi = FASTOPT_LOW(w);
        if (FASTOPT_GEN(w) != gen || lo >= hi)
            return -1;
        if (__atomic_compare_exchange_n(share, &w, owner ? w + (1u << 16) : w - 1, 1,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return owner ? lo : hi - 1;
        /* w now holds the current word */
    }
}

/* Run chunks of generation gen, which has nchunks chunks in `parts` shares:
   share `me` first, then the others' until none is left; returns how many.
   Whoever finishes the last chunk wakes the caller if it sleeps. The caller
   passes `fastest` and gets the shortest time a whole chunk took it. */
static Py_ssize_t fastopt_pool_claim(uint32_t gen, int me, int parts, Py_ssize_t nchunks,
                                     double *fastest) {
    Py_ssize_t ran = 0, chunk;
    double t0 = 0.0, t1;
    int i = 0;
    while (i < parts) {
        int s = (me + i) % parts;
        chunk = fastopt_pool_take(s, gen, i == 0);
        if (chunk < 0) {
            i++;
            continue;
        }
        /* The job cannot change while a chunk of it is outstanding. */
        Py_ssize_t lo = chunk * fastopt_pool.grain;
        Py_ssize_t hi = lo + fastopt_pool.grain;
        if (hi > fastopt_pool.total) hi = fastopt_pool.total;
        if (fastest) t0 = fastopt_pool_now();
        fastopt_pool.task(fastopt_pool.ctx, lo, hi);
        if (fastest && hi - lo == fastopt_pool.grain) {
            t1 = fastopt_pool_now() - t0;
            if (*fastest < 0.0 || t1 < *fastest) *fastest = t1;
        }
        ran++;
        /* Sequentially consistent, like the caller's store of `waiting`
           before its check of `done`: one of the two sees the other. */
        if (__atomic_add_fetch(&fastopt_pool.done, 1, __ATOMIC_SEQ_CST) == nchunks &&
            __atomic_load_n(&fastopt_pool.waiting, __ATOMIC_SEQ_CST)) {
            pthread_mutex_lock(&fastopt_pool.lock);
            pthread_cond_signal(&fastopt_pool.finished);
            pthread_mutex_unlock(&fastopt_pool.lock);
        }
    }
    return ran;
}

static void *fastopt_pool_worker(void *arg) {
    int me = (int)(intptr_t)arg + 1;   /* share 0 is the caller's */
    uint64_t w = __atomic_load_n(&fastopt_pool.word, __ATOMIC_ACQUIRE);
    uint32_t seen = FASTOPT_GEN(w);
    int spin = FASTOPT_POOL_SPIN;
    for (;;) {
        int i;
        uint32_t gen = seen;
        for (i = 0; i < spin && gen == seen; i++) {
            /* Past the first spins, give the core away at each turn: when
               cores are oversubscribed this worker may share one with the
               caller, and a plain spin would keep the caller off its core. */
            if (i < FASTOPT_POOL_SPIN / 8) fastopt_relax();
            else sched_yield();
            w = __atomic_load_n(&fastopt_pool.word, __ATOMIC_ACQUIRE);
            gen = FASTOPT_GEN(w);
        }
        if (gen == seen) {
            pthread_mutex_lock(&fastopt_pool.lock);
            /* Announced before the check: the caller stores the word, then
               reads sleepers (both sequentially consistent), so either it
               signals or this thread sees the new word. */
            __atomic_fetch_add(&fastopt_pool.sleepers, 1, __ATOMIC_SEQ_CST);
            while ((gen = FASTOPT_GEN(w = __atomic_load_n(&fastopt_pool.word, __ATOMIC_SEQ_CST))) == seen)
                pthread_cond_wait(&fastopt_pool.wake, &fastopt_pool.lock);
            __atomic_fetch_sub(&fastopt_pool.sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&fastopt_pool.lock);
        }
        seen = gen;
        /* The shares were stored before the word that names them. */
        if (me < FASTOPT_LOW(w)) {
            fastopt_pool_claim(gen, me, (int)FASTOPT_LOW(w), FASTOPT_HIGH(w), NULL);
            spin = FASTOPT_POOL_SPIN;
        } else {
            spin = 0;   /* not taking part (fewer threads now): back to sleep at once */
        }
    }
    return NULL;
}

/* Jobs run, jobs run on more than one thread, stalls; chunks of the
   parallel jobs, and how many of them the caller ran. */
static void fastopt_pool_stats(unsigned long long out[5]) {
    out[0] = fastopt_pool.jobs;
    out[1] = fastopt_pool.parallel;
    out[2] = fastopt_pool.stalls;
    out[3] = fastopt_pool.chunks;
    out[4] = fastopt_pool.mine;
}

static void fastopt_pool_after_fork(void) {
    /* The child has only the forking thread: no workers, nothing running. */
    pthread_mutex_init(&fastopt_pool.lock, NULL);
    pthread_cond_init(&fastopt_pool.wake, NULL);
    pthread_cond_init(&fastopt_pool.finished, NULL);
    fastopt_pool.workers = 0;
    fastopt_pool.waiting = 0;
    fastopt_pool.backoff = fastopt_pool.countdown = fastopt_pool.calm = 0;
    fastopt_pool.sleepers = 0;
    fastopt_pool.busy = 0;
}

/* Start workers up to n (ids 0..n-1); returns how many run. */
static int fastopt_pool_grow(int n) {
    if (n > FASTOPT_POOL_MAX_WORKERS) n = FASTOPT_POOL_MAX_WORKERS;
    if (fastopt_pool.workers >= n) return fastopt_pool.workers;
    if (!fastopt_pool.atfork) {
        if (pthread_atfork(NULL, NULL, fastopt_pool_after_fork) != 0) return fastopt_pool.workers;
        fastopt_pool.atfork = 1;
    }
    /* Workers take no asynchronous signals: Python handles them on the main
       thread. A fault in a worker (SIGSEGV, SIGBUS, SIGFPE, SIGILL) still
       reaches it, so that faulthandler can report it. */
    sigset_t all, saved;
    sigfillset(&all);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 1 << 18);   /* the tasks keep small frames */
    while (fastopt_pool.workers < n) {
        pthread_t thread;
        if (pthread_create(&thread, &attr, fastopt_pool_worker,
                           (void *)(intptr_t)fastopt_pool.workers) != 0)
            break;      /* fewer threads: the job still completes */
        fastopt_pool.workers++;
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    return fastopt_pool.workers;
}

static void fastopt_pool_run(int threads, Py_ssize_t total, Py_ssize_t grain,
                             fastopt_task_t task, void *ctx) {
    Py_ssize_t nchunks, mine, spins = 0;
    int expected = 0, helpers, parts, s;
    double start, elapsed, fastest = -1.0;
    if (grain < 1) grain = 1;
    nchunks = (total + grain - 1) / grain;
    if (nchunks > FASTOPT_POOL_MAX_CHUNKS) {
        grain = (total + FASTOPT_POOL_MAX_CHUNKS - 1) / FASTOPT_POOL_MAX_CHUNKS;
        nchunks = (total + grain - 1) / grain;
    }
    if (threads <= 1 || nchunks <= 1 ||
        !__atomic_compare_exchange_n(&fastopt_pool.busy, &expected, 1, 0,
                                     __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        task(ctx, 0, total);
        return;
    }
    fastopt_pool.jobs++;
    helpers = fastopt_pool.countdown > 0 ? 0 : fastopt_pool_grow(threads - 1);
    if (helpers == 0) {
        if (fastopt_pool.countdown > 0) fastopt_pool.countdown--;
        __atomic_store_n(&fastopt_pool.busy, 0, __ATOMIC_RELEASE);
        task(ctx, 0, total);
        return;
    }
    fastopt_pool.parallel++;
    fastopt_pool.task = task;
    fastopt_pool.ctx = ctx;
    fastopt_pool.total = total;
    fastopt_pool.grain = grain;
    parts = (helpers < threads - 1 ? helpers : threads - 1) + 1;   /* more may run from before */
    if (parts > nchunks) parts = (int)nchunks;
    __atomic_store_n(&fastopt_pool.done, 0, __ATOMIC_RELAXED);
    uint32_t gen = FASTOPT_GEN(fastopt_pool.word) + 1;
    for (s = 0; s < parts; s++) {
        uint64_t lo = (uint64_t)(s * nchunks / parts), hi = (uint64_t)((s + 1) * nchunks / parts);
        __atomic_store_n(&fastopt_shares[s].word, ((uint64_t)gen << 32) | (lo << 16) | hi,
                         __ATOMIC_RELAXED);
    }
    start = fastopt_pool_now();
    __atomic_store_n(&fastopt_pool.word,
                     ((uint64_t)gen << 32) | ((uint64_t)nchunks << 16) | (uint64_t)parts,
                     __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&fastopt_pool.sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&fastopt_pool.lock);
        pthread_cond_broadcast(&fastopt_pool.wake);
        pthread_mutex_unlock(&fastopt_pool.lock);
    }
    mine = fastopt_pool_claim(gen, 0, parts, nchunks, &fastest);
    fastopt_pool.chunks += (uint64_t)nchunks;
    fastopt_pool.mine += (uint64_t)mine;
    /* Only chunks that a running (or just preempted) worker claimed are left.
       Spin a little: usually the worker is running and about done. Then
       sleep rather than yield: a yielding caller keeps its core busy, and a
       preempted worker that could run there waits all the longer. */
    while (__atomic_load_n(&fastopt_pool.done, __ATOMIC_ACQUIRE) < nchunks &&
           ++spins < FASTOPT_POOL_SPIN)
        fastopt_relax();
    if (__atomic_load_n(&fastopt_pool.done, __ATOMIC_ACQUIRE) < nchunks) {
        pthread_mutex_lock(&fastopt_pool.lock);
        __atomic_store_n(&fastopt_pool.waiting, 1, __ATOMIC_SEQ_CST);
        while (__atomic_load_n(&fastopt_pool.done, __ATOMIC_SEQ_CST) < nchunks)
            pthread_cond_wait(&fastopt_pool.finished, &fastopt_pool.lock);
        __atomic_store_n(&fastopt_pool.waiting, 0, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&fastopt_pool.lock);
    }
    /* A stall: the job took over twice as long as the caller alone would
       have, at the pace of its fastest chunk. Then some thread (a worker,
       or the caller itself, now sharing a core with another process) sat
       preempted in the middle of a chunk. (The caller, first to claim,
       nearly always runs a whole chunk; without one there is no measure.) */
    elapsed = fastopt_pool_now() - start;
    if (fastest > 0.0 && elapsed > 50e-6 && elapsed > 2.0 * (double)nchunks * fastest) {
        fastopt_pool.stalls++;
        fastopt_pool.backoff = 2 * fastopt_pool.backoff + FASTOPT_POOL_BACKOFF_MIN;
        if (fastopt_pool.backoff > FASTOPT_POOL_BACKOFF_MAX)
            fastopt_pool.backoff = FASTOPT_POOL_BACKOFF_MAX;
        fastopt_pool.countdown = fastopt_pool.backoff;
        fastopt_pool.calm = 0;
    } else if (++fastopt_pool.calm >= FASTOPT_POOL_CALM) {
        fastopt_pool.backoff /= 2;
        fastopt_pool.calm = 0;
    }
    __atomic_store_n(&fastopt_pool.busy, 0, __ATOMIC_RELEASE);
}

#else  /* no POSIX threads (MSVC): OpenMP, each thread claiming chunks */
#define FASTOPT_POOL_THREADS 0

static void fastopt_pool_stats(unsigned long long out[5]) {
    out[0] = out[1] = out[2] = out[3] = out[4] = 0;
}

static void fastopt_pool_run(int threads, Py_ssize_t total, Py_ssize_t grain,
                             fastopt_task_t task, void *ctx) {
    Py_ssize_t nchunks, k;
    if (grain < 1) grain = 1;
    nchunks = (total + grain - 1) / grain;
    if (threads <= 1 || nchunks <= 1) {
        task(ctx, 0, total);
        return;
    }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (k = 0; k < nchunks; k++) {
        Py_ssize_t hi = (k + 1) * grain < total ? (k + 1) * grain : total;
        task(ctx, k * grain, hi);
    }
}
#endif

#endif  /* FASTOPT_POOL_H */
