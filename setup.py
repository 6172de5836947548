"""Build fastopt's Cython modules.

- ``fastopt._fastpath``: the API layer's fast path (screen, pointer gathering).
- ``fastopt._kernels_<isa>``: the compute layer, the same source
  (src_c/_kernels.pxi) compiled once per instruction-set level. The default
  flags are portable (no -march=native); fastopt/_dispatch.py picks at import
  the best level this CPU runs, or the one FASTOPT_SIMD names.

Metadata lives in pyproject.toml.
"""
import os
import platform
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src_c", "rules"))
import table  # noqa: E402  (src_c/rules/table.py: the compute layer's one table of rules)

# The rule ids, the dispatch and RULE_IDS are generated from that table.
table.generate(os.path.join(os.path.dirname(os.path.abspath(__file__)), "src_c"))

MSVC = sys.platform == "win32"
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")

if MSVC:
    # /fp:precise keeps the same roundings as the GCC/Clang flags below.
    BASE_FLAGS = ["/O2", "/fp:precise"]
    OPENMP = ["/openmp"]
    OPENMP_LINK = []
    ISA_FLAGS = {"baseline": [], "avx2": ["/arch:AVX2"], "avx512": ["/arch:AVX512"]}
else:
    BASE_FLAGS = [
        "-O3",
        # sqrt() only vectorizes when it need not set errno.
        "-fno-math-errno",
        # No FMA contraction: every ISA level and thread count gives the same
        # bits, and they match torch's separate multiply and add.
        "-ffp-contract=off",
    ]
    # Apple's clang has no OpenMP: the kernels then run on one thread.
    OPENMP = [] if sys.platform == "darwin" or os.environ.get("FASTOPT_NO_OPENMP") else ["-fopenmp"]
    OPENMP_LINK = OPENMP
    ISA_FLAGS = {
        "baseline": [],
        # F16C (float16 conversions) came with AVX2 on every x86 CPU: the
        # avx2 level requires all three (src_c/fastpath/cpu.pxi).
        "avx2": ["-mavx2", "-mfma", "-mf16c"],
        # 512-bit vectors: GCC prefers 256-bit ones on x86-64-v4 unless told.
        "avx512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma",
                   "-mf16c", "-mprefer-vector-width=512"],
    }

# Only x86 has optional levels; elsewhere (aarch64: NEON is baseline) one build.
LEVELS = ["baseline", "avx2", "avx512"] if X86 else ["baseline"]

COMMON = dict(
    include_dirs=[numpy.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

extensions = [
    Extension("fastopt._fastpath", ["src_c/_fastpath.pyx"], extra_compile_args=BASE_FLAGS,
              **COMMON),
] + [
    Extension(
        f"fastopt._kernels_{level}",
        [f"src_c/_kernels_{level}.pyx"],
        extra_compile_args=BASE_FLAGS + OPENMP + ISA_FLAGS[level],
        extra_link_args=OPENMP_LINK,
        # src_c: pool.h, the thread pool the compute layer's loops run on.
        include_dirs=COMMON["include_dirs"] + ["src_c"],
        # Recorded in the module, for fastopt.show_config().
        define_macros=COMMON["define_macros"] + [
            ("FASTOPT_ISA", f'"{level}"'),
            ("FASTOPT_CFLAGS", '"' + " ".join(BASE_FLAGS + OPENMP + ISA_FLAGS[level]) + '"'),
        ],
    )
    for level in LEVELS
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src_c"],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
            "cdivision": True,
        },
    )
)
