# cython: language_level=3, boundscheck=False, wraparound=False
# cython: initializedcheck=False, cdivision=True, embedsignature=True
"""Compute layer: one fused, in-place pass per update rule.

Nothing here validates. The callers in ``fastopt`` (the API layer) have
already checked every array (ndarray, float32/float64, C-contiguous,
writeable, matching dtype and size, no aliasing) and every hyperparameter,
and have computed the per-step scalars in double precision. These entry
points only take the data pointers and run the loops.

Numerics follow torch.optim's single-tensor formulas operation by operation
(see shared/SEMANTICS.md). A float32 array is updated in float32 arithmetic
with the per-step scalars rounded to float32 once, as torch does, and the
extension is compiled with -ffp-contract=off so no FMA changes a rounding.
"""

cimport numpy as cnp
from libc.math cimport sqrt, sqrtf
from libc.string cimport memset

cnp.import_array()

ctypedef fused floating:
    float
    double


cdef struct StepScalars:
    # Every rule reads the fields it needs; the entry points below fill them.
    double lr            # SGD, RMSprop: lr.  Adagrad: clr.  Adam: lr / bc1.
    double sign          # -1.0 when maximizing, else 1.0 (multiplying by +-1 is exact)
    double weight_decay  # coupled (L2) decay added to the gradient; 0 means off
    double momentum
    double dampening
    bint nesterov
    bint first_step      # SGD: the momentum buffer starts as a copy of g
    double eps
    double alpha         # RMSprop smoothing constant
    bint centered
    double beta1
    double beta2
    double bc2_sqrt      # sqrt(1 - beta2 ** t)
    double decay         # AdamW: p *= decay, decay = 1 - lr * wd (1.0 when off: exact)
    bint amsgrad


# A kernel updates n elements. bufs holds the rule's state buffers in the
# order of its entry point's arguments (NULL for a buffer the options do not use).
ctypedef void (*kernel_f32)(float*, const float*, float**, Py_ssize_t,
                            const StepScalars*) noexcept nogil
ctypedef void (*kernel_f64)(double*, const double*, double**, Py_ssize_t,
                            const StepScalars*) noexcept nogil

DEF MAX_BUFFERS = 3

# Below this many elements the kernel runs with the GIL held: releasing and
# re-acquiring it costs more than the update itself.
cdef Py_ssize_t NOGIL_MIN_SIZE = 16384


cdef inline floating lerp(floating a, floating b, floating w) noexcept nogil:
    # torch's lerp: two forms, so that w = 0 gives a and w = 1 gives b exactly.
    # The cast keeps 1 - w in float for float32: Cython writes a bare 1 as the
    # double literal 1.0, which would compute this line in double.
    if w < <floating>0.5:
        return a + w * (b - a)
    return b - (b - a) * (<floating>1 - w)


cdef inline floating nan_max(floating a, floating b) noexcept nogil:
    # torch.maximum: NaN if either side is NaN, so a NaN never vanishes here.
    if a != a:
        return a
    if b != b:
        return b
    return a if a >= b else b


cdef inline floating root(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


# ---------------------------------------------------------------- kernels
# Each rule is a loop body with its option switches as arguments, plus a
# kernel that calls it once per switch combination with constant switches.
# After inlining each call is a straight-line loop the compiler vectorizes; a
# single loop testing the switches per element stays scalar ("control flow in
# loop"), about 4x slower for Adam.

cdef inline void sgd_loop(floating* p, const floating* g, floating* buf, Py_ssize_t n,
                          const StepScalars* s, bint decay, bint use_momentum,
                          bint first_step, bint nesterov) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating neg_lr = <floating>(-s.lr)
    cdef floating mom = <floating>s.momentum
    cdef floating keep = <floating>(1.0 - s.dampening)
    cdef floating gi, b
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if decay:
            gi = gi + wd * p[i]
        if use_momentum:
            if first_step:
                b = gi
            else:
                b = buf[i] * mom + keep * gi
            buf[i] = b
            if nesterov:
                gi = gi + mom * b
            else:
                gi = b
        p[i] = p[i] + neg_lr * gi


cdef void sgd_kernel(floating* p, const floating* g, floating** bufs,
                     Py_ssize_t n, const StepScalars* s) noexcept nogil:
    cdef bint wd = s.weight_decay != 0
    if s.momentum == 0:
        if wd:
            sgd_loop(p, g, NULL, n, s, True, False, False, False)
        else:
            sgd_loop(p, g, NULL, n, s, False, False, False, False)
    elif s.first_step:
        # Runs once per parameter: one generic copy is enough.
        sgd_loop(p, g, bufs[0], n, s, wd, True, True, s.nesterov)
    elif s.nesterov:
        if wd:
            sgd_loop(p, g, bufs[0], n, s, True, True, False, True)
        else:
            sgd_loop(p, g, bufs[0], n, s, False, True, False, True)
    else:
        if wd:
            sgd_loop(p, g, bufs[0], n, s, True, True, False, False)
        else:
            sgd_loop(p, g, bufs[0], n, s, False, True, False, False)


cdef inline void adagrad_loop(floating* p, const floating* g, floating* state_sum,
                              Py_ssize_t n, const StepScalars* s, bint decay) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating neg_clr = <floating>(-s.lr)
    cdef floating eps = <floating>s.eps
    cdef floating gi, acc
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if decay:
            gi = gi + wd * p[i]
        acc = state_sum[i] + gi * gi
        state_sum[i] = acc
        p[i] = p[i] + neg_clr * gi / (root(acc) + eps)


cdef void adagrad_kernel(floating* p, const floating* g, floating** bufs,
                         Py_ssize_t n, const StepScalars* s) noexcept nogil:
    if s.weight_decay != 0:
        adagrad_loop(p, g, bufs[0], n, s, True)
    else:
        adagrad_loop(p, g, bufs[0], n, s, False)


cdef inline void rmsprop_loop(floating* p, const floating* g, floating* square_avg,
                              floating* grad_avg, floating* buf, Py_ssize_t n,
                              const StepScalars* s, bint decay, bint centered,
                              bint use_momentum) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating neg_lr = <floating>(-s.lr)
    cdef floating alpha = <floating>s.alpha
    cdef floating one_minus_alpha = <floating>(1.0 - s.alpha)
    cdef floating eps = <floating>s.eps
    cdef floating mom = <floating>s.momentum
    cdef floating gi, sq, ga, avg, b
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if decay:
            gi = gi + wd * p[i]
        sq = square_avg[i] * alpha + one_minus_alpha * gi * gi
        square_avg[i] = sq
        if centered:
            ga = lerp(grad_avg[i], gi, one_minus_alpha)
            grad_avg[i] = ga
            avg = root(sq - ga * ga) + eps
        else:
            avg = root(sq) + eps
        if use_momentum:
            b = buf[i] * mom + gi / avg
            buf[i] = b
            p[i] = p[i] + neg_lr * b
        else:
            p[i] = p[i] + neg_lr * gi / avg


cdef void rmsprop_kernel(floating* p, const floating* g, floating** bufs,
                         Py_ssize_t n, const StepScalars* s) noexcept nogil:
    cdef floating* sq = bufs[0]
    cdef floating* ga = bufs[1]
    cdef floating* buf = bufs[2]
    if s.weight_decay != 0 or (s.centered and s.momentum > 0):
        # The less common combinations share one generic copy.
        rmsprop_loop(p, g, sq, ga, buf, n, s, s.weight_decay != 0, s.centered,
                     s.momentum > 0)
    elif s.centered:
        rmsprop_loop(p, g, sq, ga, buf, n, s, False, True, False)
    elif s.momentum > 0:
        rmsprop_loop(p, g, sq, ga, buf, n, s, False, False, True)
    else:
        rmsprop_loop(p, g, sq, ga, buf, n, s, False, False, False)


cdef inline void adam_loop(floating* p, const floating* g, floating* exp_avg,
                           floating* exp_avg_sq, floating* max_exp_avg_sq, Py_ssize_t n,
                           const StepScalars* s, bint coupled_decay,
                           bint amsgrad) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating decay = <floating>s.decay
    cdef floating one_minus_beta1 = <floating>(1.0 - s.beta1)
    cdef floating beta2 = <floating>s.beta2
    cdef floating one_minus_beta2 = <floating>(1.0 - s.beta2)
    cdef floating bc2_sqrt = <floating>s.bc2_sqrt
    cdef floating eps = <floating>s.eps
    cdef floating neg_step_size = <floating>(-s.lr)
    cdef floating gi, m, v
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if coupled_decay:
            gi = gi + wd * p[i]
        m = lerp(exp_avg[i], gi, one_minus_beta1)
        exp_avg[i] = m
        v = exp_avg_sq[i] * beta2 + one_minus_beta2 * gi * gi
        exp_avg_sq[i] = v
        if amsgrad:
            v = nan_max(max_exp_avg_sq[i], v)
            max_exp_avg_sq[i] = v
        p[i] = p[i] * decay + neg_step_size * m / (root(v) / bc2_sqrt + eps)


cdef void adam_kernel(floating* p, const floating* g, floating** bufs,
                      Py_ssize_t n, const StepScalars* s) noexcept nogil:
    cdef bint wd = s.weight_decay != 0
    if s.amsgrad:
        if wd:
            adam_loop(p, g, bufs[0], bufs[1], bufs[2], n, s, True, True)
        else:
            adam_loop(p, g, bufs[0], bufs[1], bufs[2], n, s, False, True)
    else:
        if wd:
            adam_loop(p, g, bufs[0], bufs[1], NULL, n, s, True, False)
        else:
            adam_loop(p, g, bufs[0], bufs[1], NULL, n, s, False, False)


# ----------------------------------------------------------------- driver

cdef int run_many(kernel_f32 k32, kernel_f64 k64, list params, list grads,
                  tuple buffer_lists, const StepScalars* s) except -1:
    """Run one rule over aligned lists of arrays (already validated).

    buffer_lists holds, per state buffer of the rule, a list aligned with
    params, or None for a buffer that the current options do not use.
    """
    cdef Py_ssize_t count = len(params)
    cdef Py_ssize_t nbuf = len(buffer_lists)
    cdef Py_ssize_t i, j, size
    cdef cnp.ndarray p, g
    cdef void* bufs[MAX_BUFFERS]
    cdef list blist
    for j in range(MAX_BUFFERS):
        bufs[j] = NULL
    for i in range(count):
        p = <cnp.ndarray>params[i]
        g = <cnp.ndarray>grads[i]
        for j in range(nbuf):
            blist = <list>buffer_lists[j]
            if blist is not None:
                bufs[j] = cnp.PyArray_DATA(<cnp.ndarray>blist[i])
        size = cnp.PyArray_SIZE(p)
        # The one dtype dispatch: params were checked to be float32 or float64.
        if cnp.PyArray_TYPE(p) == cnp.NPY_FLOAT32:
            if size >= NOGIL_MIN_SIZE:
                with nogil:
                    k32(<float*>cnp.PyArray_DATA(p), <float*>cnp.PyArray_DATA(g),
                        <float**>bufs, size, s)
            else:
                k32(<float*>cnp.PyArray_DATA(p), <float*>cnp.PyArray_DATA(g),
                    <float**>bufs, size, s)
        else:
            if size >= NOGIL_MIN_SIZE:
                with nogil:
                    k64(<double*>cnp.PyArray_DATA(p), <double*>cnp.PyArray_DATA(g),
                        <double**>bufs, size, s)
            else:
                k64(<double*>cnp.PyArray_DATA(p), <double*>cnp.PyArray_DATA(g),
                    <double**>bufs, size, s)
    return 0


# ------------------------------------------------------------ entry points
# One per rule: typed scalars in, a StepScalars out, then the shared driver.

cdef StepScalars common(double lr, double weight_decay, bint maximize) noexcept:
    """The fields every rule reads; the others start as 'off' (never garbage)."""
    cdef StepScalars s
    memset(&s, 0, sizeof(s))
    s.lr = lr
    s.weight_decay = weight_decay
    s.sign = -1.0 if maximize else 1.0
    s.decay = 1.0
    return s


def sgd(list params, list grads, list momentum_buffer, double lr,
        double weight_decay, double momentum, double dampening, bint nesterov,
        bint maximize, bint first_step):
    cdef StepScalars s = common(lr, weight_decay, maximize)
    s.momentum = momentum
    s.dampening = dampening
    s.nesterov = nesterov
    s.first_step = first_step
    run_many(sgd_kernel[float], sgd_kernel[double], params, grads,
             (momentum_buffer,), &s)


def adagrad(list params, list grads, list state_sum, double clr,
            double weight_decay, double eps, bint maximize):
    cdef StepScalars s = common(clr, weight_decay, maximize)
    s.eps = eps
    run_many(adagrad_kernel[float], adagrad_kernel[double], params, grads,
             (state_sum,), &s)


def rmsprop(list params, list grads, list square_avg, list grad_avg,
            list momentum_buffer, double lr, double alpha, double eps,
            double weight_decay, double momentum, bint centered, bint maximize):
    cdef StepScalars s = common(lr, weight_decay, maximize)
    s.alpha = alpha
    s.eps = eps
    s.momentum = momentum
    s.centered = centered
    run_many(rmsprop_kernel[float], rmsprop_kernel[double], params, grads,
             (square_avg, grad_avg, momentum_buffer), &s)


def adam(list params, list grads, list exp_avg, list exp_avg_sq,
         list max_exp_avg_sq, double step_size, double beta1, double beta2,
         double bc2_sqrt, double eps, double weight_decay, double decay,
         bint maximize):
    cdef StepScalars s = common(step_size, weight_decay, maximize)
    s.beta1 = beta1
    s.beta2 = beta2
    s.bc2_sqrt = bc2_sqrt
    s.eps = eps
    s.decay = decay
    s.amsgrad = max_exp_avg_sq is not None
    run_many(adam_kernel[float], adam_kernel[double], params, grads,
             (exp_avg, exp_avg_sq, max_exp_avg_sq), &s)
