"""The compute layer's one table of rules, and the code generated from it.

A rule's id is its row number here, and nowhere else: setup.py runs
``generate()`` before Cython, which writes

- ``src_c/_rule_ids.pxd``: ``cdef enum`` RULE_<NAME> = row, and RULE_COUNT;
- ``src_c/_rules.pxi``: every rule file included, RULE_COST, and the one
  dispatch of the compute layer: ``call_rule`` (rule x dtype) and
  ``rule_at_step``;
- ``src_c/fastpath/rule_ids.pxi``: ``RULE_IDS``, name -> id, for Python
  (``fastopt/optim`` looks its rules up there), and ``storage_of``, the
  storage kind of an array's dtype.

Beside the rules, ``STORAGE`` lists the storage kinds: how a slot's params,
grads and state are stored, and whether the rule's loop runs on them in place
(``native``) or on float32 blocks loaded from them and stored back rounded
(``staged``; src_c/storage.pxi). Every rule runs on every kind.

Every row names ``src_c/rules/<file>.pxi``, which must define, for the row's
``name``::

    cdef void <name>_kernel(floating* p, const floating* g, floating** bufs,
                            Py_ssize_t n, const StepScalars* s) noexcept nogil
    cdef inline void <name>_at_step(StepScalars* s, Py_ssize_t step,
                                    bint first_step) noexcept nogil

``<name>_kernel`` updates elements [0, n) in place (``bufs``: the state
buffers in the rule's order, NULL when unused); ``<name>_at_step`` turns the
group's step-independent scalars into this step's (bias corrections, decayed
learning rates), in double, once per step. ``cost`` is the relative time of
one element on one thread (SGD = 1): with the element count it decides when
a step is worth splitting over threads.

A rule in ``SLOTWISE`` defines, instead of ``<name>_kernel``::

    cdef void <name>_slot(floating* p, const floating* g, floating** bufs,
                          Py_ssize_t n, Py_ssize_t rows, Py_ssize_t cols,
                          const StepScalars* s, int threads) noexcept nogil

which steps one whole parameter of n elements whose last two dimensions
are (rows, cols) (0, 0 below two dimensions), on ``threads`` threads (1: the
calling one) with the same bits for any count; its buffers have the shapes
the rule's Python side gives them (fastopt/optim/rule.py: ``layouts``).

Adding a rule: a row here, its ``.pxi``, and any new StepScalars fields in
_common.pxd; docs/adding_a_rule.rst lists the Python side.
"""
import pathlib

# (name, file in src_c/rules/, cost). Optimizer rules first, then the passes
# (bandwidth probe, gradient accumulation, clipping, the weight average) that share
# the runner.
RULES = (
    ("sgd", "sgd", 1),
    ("adagrad", "adagrad", 4),
    ("rmsprop", "rmsprop", 5),
    ("adam", "adam", 5),
    ("nadam", "nadam", 6),
    ("adamax", "adamax", 5),
    ("radam", "radam", 6),
    ("adadelta", "adadelta", 6),
    ("rprop", "rprop", 4),
    ("lion", "lion", 3),
    ("asgd", "asgd", 3),
    ("lamb", "lamb", 6),
    ("adafactor", "adafactor", 8),
    ("sparse_adam", "sparse_adam", 5),
    ("rowwise_adagrad", "rowwise_adagrad", 4),
    ("stream", "passes", 2),
    ("axpy", "passes", 1),
    ("scale", "passes", 1),
    ("ema", "passes", 1),
)

# The reducing rules -> how many sums per parameter their pass 0 adds up
# (s.acc: LANES doubles each). The runner runs them in two passes: pass 0
# (s.phase = 0) over fixed blocks of each parameter, whose sums it adds in
# block order (the same bits for every thread count), then <name>_finish per
# parameter, then pass 1 (s.phase = 1) with each parameter's own scalars.
REDUCES = {"lamb": 2}

# The rules whose update needs a whole parameter and its shape (Adafactor's
# factored second moment, RowWiseAdagrad's per-row means): the runner hands
# <name>_slot one parameter (or one listed row) at a time, with the threads a
# slot of its size is worth.
# They run on the native storage kinds (float32, float64); the staged kinds
# wait for a staged form of <name>_slot.
SLOTWISE = ("adafactor", "rowwise_adagrad")

# Storage kinds: (name, dtype of params and grads, dtype of the state, mode).
# A kind's id is its row number. The fastopt/_precision.py policy picks one per
# parameter from its dtype and the optimizer's state_dtype; master weights and
# stochastic rounding are options of a staged slot, not kinds.
_HALF = ("float16", "bfloat16")
STORAGE = (
    ("f32", "float32", "float32", "native"),
    ("f64", "float64", "float64", "native"),
    *((f"{p[0]}{p[-2:]}_{s[0]}{s[-2:]}" if p != s else f"{p[0]}{p[-2:]}", p, s, "staged")
      for p in _HALF + ("float32",) for s in _HALF + ("float32",)
      if (p, s) != ("float32", "float32")),
)

# Per element type: its enum in src_c/storage.pxi, its NumPy type number
# (bfloat16 is ml_dtypes' and has none fixed: fastopt/_precision.py registers
# it at run time), its size.
_ELEMS = {
    "float32": ("ELEM_F32", "NPY_FLOAT32", 4),
    "float64": ("ELEM_F64", "NPY_FLOAT64", 8),
    "float16": ("ELEM_F16", "NPY_FLOAT16", 2),
    "bfloat16": ("ELEM_BF16", None, 2),
}
# The complex type whose real view is a float type (an optimizer steps it so).
_COMPLEX_OF = {"float32": "NPY_COMPLEX64", "float64": "NPY_COMPLEX128"}
# The C type a native kind's loop runs in.
_NATIVE = {"float32": "float", "float64": "double"}

_HEADER = "# Generated by src_c/rules/table.py from its RULES table: do not edit.\n"


def _ids():
    lines = [_HEADER, "cdef enum:"]
    lines += [f"    RULE_{name.upper()} = {i}" for i, (name, _, _) in enumerate(RULES)]
    lines.append(f"    RULE_COUNT = {len(RULES)}")
    lines += ["", "cdef enum:"]
    lines += [f"    STORAGE_{name.upper()} = {i}" for i, (name, _, _, _) in enumerate(STORAGE)]
    lines.append(f"    STORAGE_COUNT = {len(STORAGE)}")
    return "\n".join(lines) + "\n"


def _dispatch():
    files = dict.fromkeys(f for _, f, _ in RULES)  # each file once, in table order
    elementwise = [name for name, _, _ in RULES if name not in SLOTWISE]
    out = [_HEADER, "from _rule_ids cimport *", "from libc.math cimport pow, sqrt", ""]
    out += [f'include "rules/{f}.pxi"' for f in files]
    out += ["", "", "cdef Py_ssize_t RULE_COST[RULE_COUNT]",
            "RULE_COST[:] = [" + ", ".join(str(c) for _, _, c in RULES) + "]", "", ""]
    out += ["cdef inline void rule_at_step(int rule, StepScalars* s, Py_ssize_t step,",
            "                              bint first_step) noexcept nogil:"]
    for i, (name, _, _) in enumerate(RULES):
        out += [f"    {'if' if i == 0 else 'elif'} rule == RULE_{name.upper()}:",
                f"        {name}_at_step(s, step, first_step)"]
    out += ["", "", "# The reducing rules' sums per parameter (0: a one-pass rule).",
            "cdef int RULE_SUMS[RULE_COUNT]",
            "RULE_SUMS[:] = [" + ", ".join(str(REDUCES.get(name, 0)) for name, _, _ in RULES) + "]",
            "", "",
            "cdef inline void rule_finish(int rule, StepScalars* s, const double* sums) noexcept nogil:",
            '    """A reducing rule\'s per-parameter scalars from its sums (pass 0 -> pass 1)."""']
    reducing = [name for name, _, _ in RULES if name in REDUCES]
    for i, name in enumerate(reducing):
        out += [f"    {'if' if i == 0 else 'elif'} rule == RULE_{name.upper()}:",
                f"        {name}_finish(s, sums)"]
    if not reducing:
        out.append("    pass")
    out += ["", "", "# Each rule's float32 kernel, which the staged kinds run on their blocks.",
            "cdef kernel_f32_t KERNEL_F32[RULE_COUNT]"]
    out += [f"KERNEL_F32[RULE_{name.upper()}] = {name}_kernel[float]" for name in elementwise]
    out += ["", "",
            "cdef inline void call_rule(int rule, const Slot* slot, Py_ssize_t start, Py_ssize_t n,",
            "                           const StepScalars* s) noexcept nogil:",
            '    """Run elements [start, start + n) of one slot: the one rule x storage dispatch."""',
            "    cdef int j",
            "    cdef float* fbufs[MAX_BUFFERS]",
            "    cdef double* dbufs[MAX_BUFFERS]"]
    for k, (kind, p_dtype, s_dtype, mode) in enumerate(STORAGE):
        out.append(f"    {'if' if k == 0 else 'elif'} slot.storage == STORAGE_{kind.upper()}:")
        if mode == "staged":
            out.append(f"        run_staged(KERNEL_F32[rule], {_ELEMS[p_dtype][0]}, "
                       f"{_ELEMS[s_dtype][0]}, slot, start, n, s)")
            continue
        assert mode == "native" and p_dtype == s_dtype, kind
        ctype = _NATIVE[p_dtype]
        bufs = ctype[0] + "bufs"
        out += ["        for j in range(MAX_BUFFERS):",
                f"            {bufs}[j] = (<{ctype}*>slot.buf[j] + start) if slot.buf[j] != NULL else NULL"]
        for i, name in enumerate(elementwise):
            out += [f"        {'if' if i == 0 else 'elif'} rule == RULE_{name.upper()}:",
                    f"            {name}_kernel(<{ctype}*>slot.p + start, <{ctype}*>slot.g + start, "
                    f"{bufs}, n, s)"]
    out += ["", "", "# 1: a SLOTWISE rule, which the runner steps a whole slot at a time.",
            "cdef bint RULE_SLOTWISE[RULE_COUNT]",
            "RULE_SLOTWISE[:] = [" + ", ".join(str(int(name in SLOTWISE)) for name, _, _ in RULES) + "]",
            "", "",
            "cdef inline void rule_slot(int rule, const Slot* slot, const StepScalars* s,",
            "                           int threads) noexcept nogil:",
            '    """A SLOTWISE rule over one whole slot (the native storage kinds)."""',
            "    cdef int j",
            "    cdef float* fbufs[MAX_BUFFERS]",
            "    cdef double* dbufs[MAX_BUFFERS]",
            "    for j in range(MAX_BUFFERS):",
            "        fbufs[j] = <float*>slot.buf[j]",
            "        dbufs[j] = <double*>slot.buf[j]"]
    natives = [(kind, _NATIVE[p_dtype]) for kind, p_dtype, _, mode in STORAGE if mode == "native"]
    for i, name in enumerate(SLOTWISE):
        out.append(f"    {'if' if i == 0 else 'elif'} rule == RULE_{name.upper()}:")
        for k, (kind, ctype) in enumerate(natives):
            out += [f"        {'if' if k == 0 else 'elif'} slot.storage == STORAGE_{kind.upper()}:",
                    f"            {name}_slot(<{ctype}*>slot.p, <{ctype}*>slot.g, {ctype[0]}bufs, "
                    "slot.size, slot.rows, slot.cols, s, threads)"]
        out += ["        else:",
                f"            run_staged_slot({name}_slot[float], P_ELEM[slot.storage], "
                "S_ELEM[slot.storage], slot, s, threads)"]
    if not SLOTWISE:
        out.append("    pass")
    out += ["", "", "# The element type of each kind's params and grads (the gradient statistics read g),",
            "# and of its state.",
            "cdef int P_ELEM[STORAGE_COUNT]",
            "P_ELEM[:] = [" + ", ".join(_ELEMS[p][0] for _, p, _, _ in STORAGE) + "]",
            "cdef int S_ELEM[STORAGE_COUNT]",
            "S_ELEM[:] = [" + ", ".join(_ELEMS[s][0] for _, _, s, _ in STORAGE) + "]"]
    return "\n".join(out) + "\n"


def _names():
    body = ", ".join(f'"{name}": RULE_{name.upper()}' for name, _, _ in RULES)
    kinds = ", ".join(f'("{p}", "{s}"): STORAGE_{kind.upper()}' for kind, p, s, _ in STORAGE)
    out = [_HEADER, "from _rule_ids cimport *", "", f"RULE_IDS = {{{body}}}", "",
           "# (params' dtype, state's dtype) -> storage kind, for fastopt/_precision.py.",
           f"STORAGE_IDS = {{{kinds}}}", "",
           "# Each kind's element size of params and grads.",
           "cdef Py_ssize_t P_ITEMSIZE[STORAGE_COUNT]",
           "P_ITEMSIZE[:] = [" + ", ".join(str(_ELEMS[p][2]) for _, p, _, _ in STORAGE) + "]", "",
           "# ml_dtypes.bfloat16's NumPy type number, once registered (register_bfloat16).",
           "cdef int BFLOAT16_TYPENUM = -1", "", "",
           "def register_bfloat16(int typenum):",
           '    """Tell the fast path the NumPy type number of ml_dtypes.bfloat16."""',
           "    global BFLOAT16_TYPENUM",
           "    BFLOAT16_TYPENUM = typenum", "", "",
           "cdef inline int storage_of(int typenum) noexcept:",
           '    """The storage kind of params of NumPy type `typenum` with state alike (-1: none)."""']
    for kind, p_dtype, s_dtype, _ in STORAGE:
        if p_dtype == s_dtype:  # the mixed kinds are chosen by a dtype policy, not by p alone
            number = _ELEMS[p_dtype][1]
            number = f"cnp.{number}" if number else "BFLOAT16_TYPENUM"
            out += [f"    if typenum == {number}:", f"        return STORAGE_{kind.upper()}"]
            if p_dtype in _COMPLEX_OF:  # stepped as its real view, two per element
                out += [f"    if typenum == cnp.{_COMPLEX_OF[p_dtype]}:",
                        f"        return STORAGE_{kind.upper()}"]
    out.append("    return -1")
    return "\n".join(out) + "\n"


def generate(src_c):
    """Write the generated files under ``src_c`` (only those whose text changed)."""
    src_c = pathlib.Path(src_c)
    for path, text in ((src_c / "_rule_ids.pxd", _ids()), (src_c / "_rules.pxi", _dispatch()),
                       (src_c / "fastpath" / "rule_ids.pxi", _names())):
        if not path.exists() or path.read_text() != text:  # keep Cython's rebuild check quiet
            path.write_text(text)


if __name__ == "__main__":
    generate(pathlib.Path(__file__).resolve().parent.parent)
