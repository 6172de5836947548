# cython: language_level=3, boundscheck=False, wraparound=False
# cython: initializedcheck=False, cdivision=True
"""A fast yes/no screen of a step's arrays, part of the API layer's validation.

``fastopt._validation`` states every array rule once, in Python, with the
messages users see. Running those checks on every array of every step costs
microseconds per array, which is the whole time budget of a small step. This
module applies the same rules with the NumPy C-API and only answers "which
parameter index is the first that might break a rule". When it finds one, the
Python checks run and raise the error with its message; when it finds none, the
step goes ahead. It must therefore never pass what the Python checks refuse.
"""
cimport numpy as cnp

cnp.import_array()


cdef inline bint usable(object obj, bint writeable):
    """A native-order, aligned, C-contiguous float32/float64 ndarray."""
    if not cnp.PyArray_Check(obj):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>obj
    cdef int kind = cnp.PyArray_TYPE(a)
    if kind != cnp.NPY_FLOAT32 and kind != cnp.NPY_FLOAT64:
        return False
    if not (cnp.PyArray_ISNOTSWAPPED(a) and cnp.PyArray_ISALIGNED(a)
            and cnp.PyArray_IS_C_CONTIGUOUS(a)):
        return False
    return not writeable or cnp.PyArray_ISWRITEABLE(a)


cdef inline bint same_layout(cnp.ndarray a, cnp.ndarray b):
    return (cnp.PyArray_TYPE(a) == cnp.PyArray_TYPE(b)
            and cnp.PyArray_SAMESHAPE(a, b))


cdef inline bint overlap(cnp.ndarray a, cnp.ndarray b):
    # Byte ranges of contiguous arrays; an empty array overlaps nothing.
    cdef char* a0 = <char*>cnp.PyArray_DATA(a)
    cdef char* b0 = <char*>cnp.PyArray_DATA(b)
    cdef char* a1 = a0 + cnp.PyArray_NBYTES(a)
    cdef char* b1 = b0 + cnp.PyArray_NBYTES(b)
    return a0 < a1 and b0 < b1 and a0 < b1 and b0 < a1


def first_suspect(list params, list grads, dict state, tuple buffer_names):
    """Index of the first parameter whose step might break a rule, or -1.

    Checked for every ``i`` whose ``grads[i]`` is not None: ``params[i]`` is
    a usable writeable array; ``grads[i]`` is usable, of the same dtype and
    shape, and overlaps neither ``params[i]`` nor any buffer of
    ``state[i]``; ``state[i]["step"]``, if any, is an int >= 0; each buffer
    of ``state[i]`` named in ``buffer_names`` (at most 3) is usable,
    writeable, of the parameter's dtype and shape, and overlaps neither the
    parameter nor another buffer.
    """
    cdef Py_ssize_t i, j, nb
    cdef object p_obj, g_obj, b_obj, entry, step
    cdef cnp.ndarray p, g, b
    cdef char* seen_start[3]   # byte ranges of this parameter's buffers checked so far
    cdef char* seen_end[3]
    cdef char* b0
    cdef char* b1
    for i in range(len(params)):
        g_obj = grads[i]
        if g_obj is None:
            continue
        p_obj = params[i]
        if not usable(p_obj, True) or not usable(g_obj, False):
            return i
        p = <cnp.ndarray>p_obj
        g = <cnp.ndarray>g_obj
        if not same_layout(g, p) or overlap(g, p):
            return i
        entry = state.get(i)
        if entry is None:
            continue
        if type(entry) is not dict:
            return i
        step = (<dict>entry).get("step", 0)
        if type(step) is not int or step < 0:
            return i
        nb = 0
        for name in buffer_names:
            b_obj = (<dict>entry).get(name)
            if b_obj is None:
                continue
            if not usable(b_obj, True):
                return i
            b = <cnp.ndarray>b_obj
            if not same_layout(b, p) or overlap(b, p) or overlap(g, b):
                return i
            b0 = <char*>cnp.PyArray_DATA(b)
            b1 = b0 + cnp.PyArray_NBYTES(b)
            for j in range(nb):
                if b0 < b1 and seen_start[j] < seen_end[j] and b0 < seen_end[j] and seen_start[j] < b1:
                    return i
            if nb < 3:
                seen_start[nb] = b0
                seen_end[nb] = b1
                nb += 1
    return -1
