# CPU features: which optional kernel builds this CPU (and OS) can run.
# Included by src_c/_fastpath.pyx, whose header defines the vocabulary.

cdef extern from *:
    """
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    static int fastopt_has_avx2(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
            && __builtin_cpu_supports("f16c");
    }
    static int fastopt_has_avx512(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("f16c");
    }
    #else
    static int fastopt_has_avx2(void) { return 0; }
    static int fastopt_has_avx512(void) { return 0; }
    #endif
    """
    int fastopt_has_avx2()
    int fastopt_has_avx512()


def cpu_features():
    """Which of the optional kernel builds this CPU (and OS) can run."""
    return {"avx2": bool(fastopt_has_avx2()), "avx512": bool(fastopt_has_avx512())}
