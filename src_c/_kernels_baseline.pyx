# cython: language_level=3, boundscheck=False, wraparound=False
# cython: initializedcheck=False, cdivision=True
"""fastopt's compute layer built for the 'baseline' instruction-set level (see _kernels.pxi)."""
include "_kernels.pxi"
