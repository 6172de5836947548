# ASGD (torch.optim.ASGD): averaged SGD with a decaying step size eta and a
# running average ax of the parameter, from step t0 on.
# Included by the generated src_c/_rules.pxi into each _kernels_<isa> module;
# see src_c/rules/table.py for the contract every rule file fulfils.
#
# eta and mu are per-parameter scalar state (state_in / state_out: [eta, mu]),
# kept in float32 as torch keeps them (float32 tensors).

cdef inline void asgd_loop(floating* p, const floating* g, floating* ax, Py_ssize_t n,
                           const StepScalars* s, bint coupled_decay, bint copy) noexcept nogil:
    cdef floating sign = <floating>s.sign
    cdef floating wd = <floating>s.weight_decay
    cdef floating decay = <floating>s.decay
    cdef floating neg_eta = <floating>(-s.lr)
    cdef floating mu = <floating>s.mu
    cdef floating gi, q
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if coupled_decay:
            gi = gi + wd * p[i]
        # torch: p *= 1 - lambd * eta; p += -eta * g; then the average
        q = p[i] * decay
        q = q + neg_eta * gi
        p[i] = q
        if copy:
            ax[i] = q
        else:
            ax[i] = ax[i] + (q - ax[i]) * mu


cdef void asgd_kernel(floating* p, const floating* g, floating** bufs,
                      Py_ssize_t n, const StepScalars* s) noexcept nogil:
    cdef bint wd = s.weight_decay != 0
    cdef bint copy = s.mu == 1.0  # torch: ax.copy_(p) while mu is 1, before t0
    if wd:
        if copy:
            asgd_loop(p, g, bufs[0], n, s, True, True)
        else:
            asgd_loop(p, g, bufs[0], n, s, True, False)
    else:
        if copy:
            asgd_loop(p, g, bufs[0], n, s, False, True)
        else:
            asgd_loop(p, g, bufs[0], n, s, False, False)


cdef inline void asgd_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    # This step uses the eta and mu the last one left; the next ones follow
    # torch's Python-float formulas, each stored rounded to float32.
    cdef double t = <double>step
    cdef double eta = s.state_in[0]
    cdef double since = t - s.t0
    s.lr = eta
    s.mu = s.state_in[1]
    s.decay = 1.0 - s.lambd * eta
    s.state_out[0] = <double><float>(s.base_lr / pow(1.0 + s.lambd * s.base_lr * t, s.asgd_alpha))
    s.state_out[1] = <double><float>(1.0 / (since if since > 1.0 else 1.0))
    # An eta beyond float32's range is stored as inf, as torch stores it (the
    # parameter then turns to inf or NaN, in torch too)
    s.state_invalid = False
