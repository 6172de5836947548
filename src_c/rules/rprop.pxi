# Rprop (torch.optim.Rprop): per-element step sizes that grow while the
# gradient keeps its sign and shrink when it flips; only the sign of the
# gradient moves the parameter.
# Included by the generated src_c/_rules.pxi into each _kernels_<isa> module;
# see src_c/rules/table.py for the contract every rule file fulfils.

# Every choice below is a select, not a branch: the signs of g * prev are
# as good as random in training, so a branchy loop mispredicts about every
# other element and does not vectorize (11 ns per element, 20x the other
# rules). The factors and signs are picked from `one`, StepScalars.one
# (src_c/_kernels.pxi says why), and multiplied outside the selects.

cdef inline floating torch_sign(floating x, floating one) noexcept nogil:
    # torch.sign on the CPU: +1, -1, or 0 for a zero of either sign and for NaN
    return one if x > 0 else (-one if x < 0 else <floating>0)


cdef inline floating clamp(floating x, floating low, floating high) noexcept nogil:
    # torch.clamp_(min, max): max(x, low) then min(., high); a NaN fails both
    # comparisons and stays NaN
    x = low if x < low else x
    return high if x > high else x


cdef void rprop_kernel(floating* p, const floating* g, floating** bufs,
                       Py_ssize_t n, const StepScalars* s) noexcept nogil:
    cdef floating* prev = bufs[0]
    cdef floating* step_size = bufs[1]
    cdef floating sign = <floating>s.sign
    cdef floating etaminus = <floating>s.etaminus
    cdef floating etaplus = <floating>s.etaplus
    cdef floating low = <floating>s.step_size_min
    cdef floating high = <floating>s.step_size_max
    cdef floating one = <floating>s.one  # 1 (src_c/_kernels.pxi says why)
    cdef floating gi, x, factor, size
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        x = gi * prev[i]
        # torch maps sign(g * prev) to etaplus, etaminus or 1 (a NaN product
        # has sign 0 there, so it keeps the step size)
        factor = etaplus if x > 0 else (etaminus if x < 0 else one)
        size = clamp(step_size[i] * factor, low, high)
        step_size[i] = size
        gi = <floating>0 if x < 0 else gi  # a flipped sign: no move now, no flip next step
        p[i] = p[i] - torch_sign(gi, one) * size
        prev[i] = gi


cdef inline void rprop_at_step(StepScalars* s, Py_ssize_t step, bint first_step) noexcept nogil:
    pass  # nothing depends on the step
