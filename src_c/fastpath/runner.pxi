# The compute layer's entry points, and the thread limit.
# Included by src_c/_fastpath.pyx, whose header defines the vocabulary.

# ------------------------------------------------------------ runner, threads

cdef runner_t runner = NULL
cdef stats_t stats = NULL
cdef at_step_t at_step = NULL
cdef int max_threads = 1
# Below this many elements the GIL is kept: releasing it costs more than the work.
cdef Py_ssize_t NOGIL_MIN_SIZE = 16384


def install_runner(runner_capsule, stats_capsule, at_step_capsule):
    """Use the compute layer whose runner(), stats() and at_step() made the capsules."""
    global runner, stats, at_step
    runner = <runner_t>PyCapsule_GetPointer(runner_capsule, b"fastopt.runner")
    stats = <stats_t>PyCapsule_GetPointer(stats_capsule, b"fastopt.stats")
    at_step = <at_step_t>PyCapsule_GetPointer(at_step_capsule, b"fastopt.at_step")


def set_max_threads(int n):
    global max_threads
    max_threads = n if n > 0 else 1


def get_max_threads():
    return max_threads
