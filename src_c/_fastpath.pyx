# cython: language_level=3, boundscheck=False, wraparound=False
# cython: initializedcheck=False, cdivision=True
"""The API layer's fast path: check a step's arrays, gather their pointers, run.

``fastopt._validation`` states every array rule once, in Python, with the
messages users see. Running those checks on every array of every step costs
microseconds per array - the whole time budget of a small step. This module
applies the same rules with the NumPy C-API while it gathers the data
pointers into a :class:`Workspace`, and only answers "the first parameter that
might break a rule is i". The Python checks then run and raise the error with
its message. The screen must therefore never pass what those checks refuse
(tests/test_optimizer.py fuzzes the two against each other).

The compute layer (``_kernels_<isa>``) is reached through one function
pointer, installed by fastopt/_dispatch.py for the CPU's best ISA level.

The module is one concern per included file (src_c/fastpath/), in this order:

    rule_ids.pxi   RULE_IDS, generated from src_c/rules/table.py
    cpu.pxi        which optional kernel builds the CPU runs
    runner.pxi     the installed compute layer and the thread limit
    workspace.pxi  Workspace
    policy.pxi     Policy: the half-precision options per parameter dtype
    screen.pxi     screen, gather, regather, commit
    rows.pxi       RowPlan: a sparse-row gradient as one slot per listed row
    guard.pxi      Guard, the step-wide aliasing check
    scalars.pxi    Scalars and CheckedGroup
    stepper.pxi    fast_step, StepLock, Stepper
    tensor.pxi     TensorGroup and tensor_step, for fastopt.torch

Vocabulary
----------
slot
    One parameter's update as the kernels see it: pointers to its data, its
    gradient and its state buffers, its element count and dtype (a C
    ``Slot``, _common.pxd). A group's slots sit in its Workspace.
span
    The bytes ``[start, end)`` of one contiguous array (``Span`` below).
screen
    Checking an array with the C-API against the rules fastopt/_validation.py
    states in Python. The screen never raises: it answers "parameter i may
    break a rule" and the Python checks then raise with the message.
gather
    Screening a group while writing its slots. A full gather reads the
    optimizer's state; a regather, while the state reports no edit, re-checks
    only the params and grads against the cached slots.
keep
    Per slot, the objects its pointers came from (state dict, buffers), held
    by the Workspace so that the memory stays alive and a regather can check
    that nothing was swapped.
guard
    The step-wide check that no array written by the step overlaps any other
    array of the step, across all groups (Guard).
commit
    Writing the new step counts into the state dicts, after the kernels ran.
"""
import numpy as np
cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock, NOWAIT_LOCK,
                               PyLockStatus, PY_LOCK_ACQUIRED)

cdef extern from "pythread.h":
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds,
                                             int intr_flag) nogil
from libc.math cimport pow
from libc.stdint cimport uintptr_t
from libc.stdlib cimport realloc, free, qsort
from libc.string cimport memset

from _common cimport Slot, StepScalars, runner_t, stats_t, at_step_t, MAX_BUFFERS, MAX_SCALARS
from _rule_ids cimport *

cnp.import_array()

from fastopt._validation import MAX_STEP, REFUSED_SUBCLASSES
from fastopt._watched import State

cdef Py_ssize_t MAX_STEP_C = MAX_STEP  # stored step counts are < this


ctypedef struct Span:
    # The bytes [start, end) of a contiguous array.
    char* start
    char* end


cdef int grow_spans(Span** spans, Py_ssize_t* capacity, Py_ssize_t n) except -1:
    cdef Span* grown
    if n > capacity[0]:
        grown = <Span*>realloc(spans[0], n * sizeof(Span))
        if grown == NULL:
            raise MemoryError()
        spans[0] = grown
        capacity[0] = n
    return 0


include "fastpath/rule_ids.pxi"
include "fastpath/cpu.pxi"
include "fastpath/runner.pxi"
include "fastpath/workspace.pxi"
include "fastpath/policy.pxi"
include "fastpath/screen.pxi"
include "fastpath/rows.pxi"
include "fastpath/guard.pxi"
include "fastpath/scalars.pxi"
include "fastpath/stepper.pxi"
include "fastpath/tensor.pxi"
