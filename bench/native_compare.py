"""Is the portable build's runtime dispatch within 10% of a -march=native build?

Builds the compute layer once more, with -march=native, into a throw-away
module in a temporary folder (never shipped), then times both on in-cache
sizes in one process, alternating, with the same Workspace. Both must give
the same bits.

    python bench/native_compare.py            # needs Cython, NumPy headers, a C compiler
"""
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fastopt
from fastopt import _dispatch, _fastpath

SRC = Path(__file__).resolve().parent.parent / "src_c"
sys.path.insert(0, str(SRC.parent / "tests"))
import spec  # noqa: E402  (tests/spec.py: every class as it is typically used)


def build_native(folder):
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    pyx = Path(folder) / "_kernels_native.pyx"
    pyx.write_text(f'include "{SRC / "_kernels.pxi"}"\n')
    flags = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-march=native"]
    ext = Extension("_kernels_native", [str(pyx)], include_dirs=[np.get_include()],
                    extra_compile_args=flags, extra_link_args=["-fopenmp"],
                    define_macros=[("FASTOPT_ISA", '"native"'),
                                   ("FASTOPT_CFLAGS", '"' + " ".join(flags) + '"')])
    dist = Distribution({"ext_modules": cythonize([ext], include_path=[str(SRC)], quiet=True,
                                                 compiler_directives={"language_level": 3,
                                                                      "boundscheck": False,
                                                                      "wraparound": False,
                                                                      "cdivision": True})})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib = folder
    cmd.build_temp = os.path.join(folder, "tmp")
    dist.run_command("build_ext")
    sys.path.insert(0, folder)
    import _kernels_native
    return _kernels_native


def time_step(opt, grads, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step(grads)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    fastopt.set_num_threads(1)  # in-cache kernel speed, not threading
    with tempfile.TemporaryDirectory() as folder:
        native = build_native(folder)
        dispatched = _dispatch.simd_level()
        print(f"dispatched level: {dispatched}; native build flags: {native.info()['flags']}")
        print(f"{'rule':<14}{'n':>8}{'dispatched':>14}{'native':>12}{'dispatched/native':>20}")
        worst = 0.0
        for rule, cls, kwargs in spec.typical_cases():
            for n in (1000, 4099, 16384, 65536):
                rng = np.random.default_rng(0)
                p0 = rng.standard_normal(n).astype(np.float32)
                g = [rng.standard_normal(n).astype(np.float32)]
                results, params = {}, {}
                for label in ("dispatched", "native"):
                    params[label] = p0.copy()
                    results[label] = []
                opts = {label: cls([params[label]], **kwargs) for label in params}
                for _ in range(7):  # alternate the two builds, 7 rounds
                    for label, opt in opts.items():
                        if label == "native":
                            _fastpath.install_runner(native.runner(), native.stats())
                        else:
                            _dispatch.select_simd(dispatched)
                        results[label].append(time_step(opt, g, 300))
                _dispatch.select_simd(dispatched)
                if not np.array_equal(params["dispatched"], params["native"]):
                    raise AssertionError(f"{rule} n={n}: the native build computed other bits")
                d, nat = min(results["dispatched"]), min(results["native"])
                worst = max(worst, d / nat)
                print(f"{rule:<14}{n:>8}{d * 1e6:>11.2f} us{nat * 1e6:>9.2f} us{d / nat:>20.3f}")
        print(f"worst dispatched/native ratio: {worst:.3f} (target <= 1.10); results bit-identical")


if __name__ == "__main__":
    main()
