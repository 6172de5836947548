# Types shared by the compute layer (_kernels_*.pyx) and the API layer's fast
# path (_fastpath.pyx). Only plain C: pointers, sizes and scalars.

# The rule ids (RULE_SGD, ...) are generated into _rule_ids.pxd from the one
# table in src_c/rules/table.py.

cdef enum:
    MAX_BUFFERS = 3
    MAX_SCALARS = 2   # per-parameter scalar state of a rule (ASGD: eta, mu)


cdef struct StepScalars:
    # Every rule reads the fields it needs; the others are zero ("off").
    double base_lr       # the group's lr, from which lr is derived each step (at_step)
    bint sparse_rows     # Adagrad: torch's sparse-gradient form of the update (adagrad.pxi)
    double lr_decay      # Adagrad
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
    double bc2           # NAdam: 1 - beta2 ** t
    double grad_coef     # NAdam: -lr * (1 - mu_t) / (1 - mu_product), from its scalar state
    double avg_coef      # NAdam: -lr * mu_{t+1} / (1 - mu_product * mu_{t+1})
    double decay         # AdamW: p *= decay, decay = 1 - lr * wd (1.0 when off: exact)
    bint amsgrad
    double bc1           # RAdam: 1 - beta1 ** t
    double rect          # RAdam: the variance rectification term of this step
    bint rectified       # RAdam: rho_t > 5, the adaptive form of the update
    double rho           # Adadelta smoothing constant
    double etaminus      # Rprop: step size factors after a sign flip / a kept sign
    double etaplus
    double step_size_min # Rprop: bounds of the step sizes
    double step_size_max
    double momentum_decay  # NAdam
    double lambd         # ASGD: decay term
    double asgd_alpha    # ASGD: power of the eta schedule
    double t0            # ASGD: the step averaging starts at
    double mu            # ASGD: this step's averaging weight (1.0: ax becomes a copy of p)
    double beta2_decay   # Adafactor: the exponent of its second-moment weight t ** beta2_decay
    double beta2_weight  # Adafactor: this step's t ** beta2_decay (torch's one_minus_beta2_t)
    double eps2          # Adafactor: the floor of the parameter RMS in the step size (eps[1])
    double clip_threshold  # Adafactor: d, the update RMS above which it is scaled down
    bint eps_from_dtype  # Adafactor: eps[0] is None, the parameter dtype's machine epsilon
    double one           # always 1.0, set at run time: a 1 the compiler cannot fold
                         # (src_c/_kernels.pxi says why Rprop and Lion need it)
    # A rule with per-parameter scalar state (NAdam's mu_product, ASGD's eta and
    # mu): the values before this step go in, at_step forms this step's
    # scalars from them and the values after it (state_out), or flags that
    # they cannot be formed (state_invalid: the Python layer explains).
    # A reducing rule (Lamb): which pass runs (0: the moments and the sums, 1:
    # the update), where pass 0 adds its sums, and the parameter's factor
    # that pass 1 applies (Lamb's trust ratio), formed from the sums.
    # (acc is a double*, held as an address: the struct converts to a dict.)
    int phase
    size_t acc
    double trust
    double state_in[MAX_SCALARS]
    double state_out[MAX_SCALARS]
    bint state_invalid
    bint flush_denormals  # run with the FPU's flush-to-zero / denormals-are-zero modes on


cdef struct Slot:
    # One parameter's update: its data, its gradient, its state buffers (in the
    # rule's order, NULL when unused), its element count and its storage kind
    # (STORAGE_<kind> in the generated _rule_ids.pxd: how p, g and the buffers
    # are stored; src_c/storage.pxi). Buffers are shaped like p except for a
    # SLOTWISE rule's, which has its own (Adafactor's row and column factors).
    char* p
    char* g
    char* buf[MAX_BUFFERS]
    Py_ssize_t size
    int storage
    # The last two dimensions of p (0 when it has fewer than two): the shape
    # a SLOTWISE rule reads (Adafactor factors over them; table.py).
    Py_ssize_t rows
    Py_ssize_t cols
    # Each buffer's element count (a SLOTWISE rule's are not p's; a staged
    # SLOTWISE step widens them whole).
    Py_ssize_t buf_size[MAX_BUFFERS]
    # Half-precision options of a staged kind (src_c/storage.pxi):
    # master: a float32 copy of p that the rule updates in place (NULL: none);
    # p is then written as the master rounded to nearest even.
    # stochastic: every rounding to a half type (p without a master, half
    # state) is stochastic, its random bits a function of round_key (the
    # optimizer's seed, the parameter's step and index; fastopt/_precision.py)
    # and of the element's index, so never of the thread split.
    char* master
    bint stochastic
    unsigned long long round_key
    # The step guard ema_decay fused into the update (a plain float32/float64
    # slot only): avg, an array like p, moves towards the updated p by
    # avg_weight = 1 - decay, block by block right after the rule, while p is
    # still in the cache. NULL: no average here (the optimizer may run its
    # own pass).
    char* avg
    double avg_weight


# The compute layer's entries. runner: run `rule` over `count` slots, splitting
# the elements over at most `max_threads` threads when the work is large;
# `consts` are the group's step-independent scalars, from which the rule's
# at_step derives this step's (once, in double).
ctypedef void (*runner_t)(int rule, const Slot* slots, Py_ssize_t count,
                          const StepScalars* consts, Py_ssize_t step, bint first_step,
                          int max_threads) noexcept nogil
# at_step: the scalars a kernel gets at `step` (for tests and debugging).
ctypedef void (*at_step_t)(int rule, StepScalars* s, Py_ssize_t step,
                           bint first_step) noexcept nogil
# stats: the sum of squares of the slots' g arrays and whether any element is
# NaN or infinite, in fixed blocks summed in a fixed order (the same bits for
# every thread count and ISA level). Returns -1 if out of memory, else 0.
ctypedef int (*stats_t)(const Slot* slots, Py_ssize_t count, int max_threads,
                        double* sumsq, bint* nonfinite) noexcept nogil
