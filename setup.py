"""Build the Cython modules (``fastopt._kernels``, ``fastopt._screen``).

Metadata lives in pyproject.toml; this file only describes the extension.
Flags are portable on purpose: no -march=native, so a wheel built here runs
on any CPU of its architecture.
"""
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

if sys.platform == "win32":
    # MSVC: /fp:precise keeps the same roundings as the GCC/Clang flags below.
    COMPILE_ARGS = ["/O2", "/fp:precise"]
else:
    COMPILE_ARGS = [
        "-O3",
        # sqrt() only vectorizes when it need not set errno.
        "-fno-math-errno",
        # No FMA contraction: results stay bit-identical across compilers and ISAs,
        # and match torch's separate multiply and add.
        "-ffp-contract=off",
    ]

extensions = [
    Extension(
        f"fastopt.{name}",
        [f"src_c/{name}.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=COMPILE_ARGS,
    )
    # _kernels: the compute layer.  _screen: the fast half of input validation.
    for name in ("_kernels", "_screen")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
            "cdivision": True,
        },
    )
)
