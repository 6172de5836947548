#!/usr/bin/env bash
# tools/sanitize.sh - run fastopt's kernel-level tests under AddressSanitizer
# and UndefinedBehaviorSanitizer.
#
# Usage (from anywhere; needs gcc, and Cython, NumPy, setuptools and pytest in
# the current Python):
#
#   tools/sanitize.sh                    # build instrumented copy, run the tests
#   tools/sanitize.sh -- -k adam         # the default test files, extra pytest args
#   tools/sanitize.sh --tests "tests/test_kernels.py -k sgd"   # other tests
#   tools/sanitize.sh --keep             # keep the build directory (its path is printed)
#   tools/sanitize.sh --dir DIR          # build in DIR (reused: rebuilds only what changed)
#   tools/sanitize.sh --inject oob       # self-test: plant a bug in the COPY (see
#   tools/sanitize.sh --inject ubsan     #   below) and show that it is caught
#   tools/sanitize.sh --inject uaf       #   (non-zero exit, with the report)
#
# Exit status: 0 when the tests pass and no sanitizer said anything; non-zero
# (1) on a sanitizer report - in the test process or any child it starts - or
# on a test failure or a build error. Reports are printed at the end.
#
# What it does
#   1. Copies the top-level files (setup.py, pyproject.toml, README.md,
#      LICENSE, ...), src_c/ (sources only: the generated .c files are not
#      copied, so Cython regenerates them from the current .pyx/.pxi),
#      fastopt/*.py and tests/ into a throw-away directory (mktemp -d,
#      removed on exit unless --keep/--dir; a reused --dir gets only the
#      files whose content changed, so only those are rebuilt). The
#      developer's in-place .so files, build/ and src_c/*.c are never touched.
#   2. Builds the Cython extensions there (setup.py build_ext --inplace) with
#      a compiler wrapper that appends, after setup.py's own flags (so they
#      win over its -O3):
#        -O1 -g -fno-omit-frame-pointer
#        -fsanitize=address,undefined -fno-sanitize-recover=undefined
#        -fno-wrapv   (distutils passes CPython's CFLAGS, which hold -fwrapv:
#                      signed overflow would then be defined wrapping and
#                      UBSan would not check it; in the normal build it wraps
#                      silently, which for an index or a size is still a bug)
#      setup.py's -ffp-contract=off, -fopenmp and per-level -m flags stay, so
#      the bit-identity tests still hold and every SIMD level is instrumented.
#   3. Runs, with the copy first on sys.path (checked: the script fails if
#      fastopt's extension modules are not the instrumented ones):
#        tests/test_kernels.py tests/test_optimizer.py tests/test_flat.py
#        tests/test_clip.py tests/test_accumulate.py
#        tests/test_dispatch.py::test_results_identical_for_every_thread_count_and_simd_level
#      and, where present, tests/test_denormals.py (subnormal data through
#      every rule) and the two tests/test_memory.py tests that step with
#      grads freed right after each step (a read through the workspace's stale
#      pointer would be a heap-use-after-free here),
#      under
#        LD_PRELOAD=$(gcc -print-file-name=libasan.so)   (python itself is not
#            instrumented, so the ASan runtime must be loaded first)
#        ASAN_OPTIONS=detect_leaks=0:...   LeakSanitizer is off: CPython's
#            allocator (pymalloc arenas, interned strings, module state that
#            lives until exit) makes the leak report at exit long and noisy and
#            not about fastopt. Leaks are covered by tests/test_memory.py.
#        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
#        PYTHONMALLOC=malloc   so Python objects (the Workspace, lists) are
#            malloc'd too and ASan guards them as well.
#      pytest runs with --capture=sys: its default fd-level capture would
#      swallow a report written to fd 2 as the process dies. ASan reports go
#      to files (log_path; that also catches reports from subprocesses).
#      UBSan ignores log_path when it runs inside ASan's runtime (gcc), so its
#      reports go to stderr, which is teed to a log and searched. Any report
#      in either place fails the run, whatever pytest's exit status.
#
# Limits worth knowing
#   - ASan sees the ends of each malloc'd block. fastopt packs a group's
#     optimizer state back to back in one block (flat.packed_like), and
#     FlatParams packs parameters likewise: a write running from one array
#     into its neighbour inside the same block is NOT reported here; the
#     bit-identity tests are what catch that.
#   - gcc's -fsanitize=undefined does not include float-divide-by-zero or
#     float-cast-overflow (IEEE division by zero and NaN/Inf are expected in
#     these kernels and tested on purpose).
#   - torch is imported by one clip test if installed; it is not
#     instrumented, only its calls into libc are intercepted.
#
# Self-test (--inject): patches the COPY of the sources in the build
# directory - never the repository - and runs tests/test_kernels.py -k sgd
# (uaf: the test_memory test named below):
#   oob    after SGD's loop, writes p[n] (one element past the end of the
#          slice the kernel was given): a heap-buffer-overflow WRITE.
#   ubsan  in SGD's loop body, adds INT_MAX to an int that is >= 1: signed
#          integer overflow.
#   uaf    (in the copy of src_c/_fastpath.pyx) the cached workspace keeps
#          the previous step's grad pointer instead of the new one; that grad
#          was freed after its step: a heap-use-after-free READ, shown by
#          tests/test_memory.py's dangling-pointer test.
# The run must then FAIL with the corresponding report; that is the proof the
# wiring (instrumented build, preload, report detection, exit status) works.
#
# Time, on 2 cores: about 20 s to build the four modules and 30-50 s of
# tests; an --inject run, about 20 s.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
CC_REAL=${SANITIZE_CC:-gcc}
WORK=""
KEEP=0
INJECT=""
TESTS=""
EXTRA=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --keep) KEEP=1 ;;
        --dir) WORK=$2; KEEP=1; shift ;;
        --dir=*) WORK=${1#--dir=}; KEEP=1 ;;
        --inject) INJECT=$2; shift ;;
        --inject=*) INJECT=${1#--inject=} ;;
        --tests) TESTS=$2; shift ;;
        --tests=*) TESTS=${1#--tests=} ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "sanitize.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

case "$INJECT" in
    ""|oob|ubsan|uaf) ;;
    *) echo "sanitize.sh: --inject must be oob, ubsan or uaf, got '$INJECT'" >&2; exit 2 ;;
esac

say() { printf '\n==> %s\n' "$*"; }
die() { printf '\nsanitize.sh: FAILED: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------ toolchain
LIBASAN=$("$CC_REAL" -print-file-name=libasan.so)
[ -e "$LIBASAN" ] || die "$CC_REAL has no libasan.so (gcc -print-file-name=libasan.so gave '$LIBASAN'); install libasan (e.g. apt-get install libasan8)"
LIBASAN=$(readlink -f "$LIBASAN")

# ------------------------------------------------------------ work dir
if [ -z "$WORK" ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastopt-sanitize.XXXXXX")
fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
case "$WORK" in
    "$REPO"|"$REPO/fastopt"*|"$REPO/src_c"*|"$REPO/tests"*) die "--dir must not be the checkout or one of its source folders" ;;
esac
cleanup() { if [ "$KEEP" = 0 ]; then rm -rf "$WORK"; else echo "build directory kept: $WORK"; fi; }
trap cleanup EXIT

say "copying sources into $WORK"
mkdir -p "$WORK/src_c" "$WORK/fastopt" "$WORK/tests"
# A file is copied only if its content differs (with a new mtime, so that
# Cython and the compiler redo what depends on it): a reused --dir rebuilds
# only what changed, and a file an --inject run patched is put back.
copy_changed() {  # copy_changed DEST_DIR FILE...
    local dest=$1 f; shift
    for f in "$@"; do
        cmp -s "$f" "$dest/$(basename "$f")" || cp "$f" "$dest/"
    done
}
# Top-level files: setup.py, pyproject.toml and what its metadata names
# (README.md, LICENSE, ...).
for f in "$REPO"/*; do
    [ -f "$f" ] && copy_changed "$WORK" "$f"
done
copy_changed "$WORK/src_c" "$REPO"/src_c/*.pyx "$REPO"/src_c/*.pxd
mkdir -p "$WORK/src_c/rules" "$WORK/src_c/fastpath"
copy_changed "$WORK/src_c/rules" "$REPO"/src_c/rules/*.pxi "$REPO"/src_c/rules/table.py
copy_changed "$WORK/src_c/fastpath" "$REPO"/src_c/fastpath/*.pxi
copy_changed "$WORK/src_c" "$REPO"/src_c/_kernels.pxi  # the generated .pxi/.pxd are made anew
copy_changed "$WORK/fastopt" "$REPO"/fastopt/*.py
(cd "$REPO/tests" && tar cf - --exclude=__pycache__ .) | (cd "$WORK/tests" && tar xf -)

if [ "$INJECT" = uaf ]; then
    say "self-test: injecting a 'uaf' bug into the COPY $WORK/src_c/fastpath/screen.pxi"
    "$PYTHON" - "$WORK/src_c/fastpath/screen.pxi" <<'EOF'
import sys
path = sys.argv[1]
src = open(path).read()
anchor = "        if g0 != ws.slots[k].g:\n            ws.slots[k].g = g0\n"
if src.count(anchor) != 1:
    sys.exit("sanitize.sh: cannot find the end of regather in the copy of fastpath/screen.pxi")
src = src.replace(anchor, "        if g0 != ws.slots[k].g:\n"
                          "            pass  # INJECTED: the slot keeps the last step's grad\n")
open(path, "w").write(src)
EOF
    grep -n "INJECTED" "$WORK/src_c/fastpath/screen.pxi"
    [ -n "$TESTS" ] || TESTS="tests/test_memory.py::test_workspace_keeps_no_grad_alive_and_never_reads_a_dead_one"
elif [ -n "$INJECT" ]; then
    say "self-test: injecting a '$INJECT' bug into the COPY $WORK/src_c/rules/sgd.pxi"
    "$PYTHON" - "$WORK/src_c/rules/sgd.pxi" "$INJECT" <<'EOF'
import sys
path, kind = sys.argv[1], sys.argv[2]
src = open(path).read()
anchor = "        p[i] = p[i] + neg_lr * gi\n\n\ncdef void sgd_kernel("
if src.count(anchor) != 1:
    sys.exit("sanitize.sh: cannot find the end of sgd_loop in the copy of rules/sgd.pxi")
if kind == "oob":
    bug = ("        p[i] = p[i] + neg_lr * gi\n"
           "    if n > 0:\n"
           "        p[n] = p[0]  # INJECTED: one element past the end\n")
else:
    bug = ("        p[i] = p[i] + neg_lr * gi\n"
           "        overflow = <int>(n - i)  # >= 1\n"
           "        overflow = overflow + 2147483647  # INJECTED: signed overflow\n"
           "        if overflow == 0:\n"
           "            p[i] = 0\n")
    src = src.replace("    cdef floating gi, b\n    cdef Py_ssize_t i\n",
                      "    cdef floating gi, b\n    cdef Py_ssize_t i\n    cdef int overflow\n", 1)
src = src.replace(anchor, bug + "\n\ncdef void sgd_kernel(", 1)
open(path, "w").write(src)
EOF
    grep -n "INJECTED" "$WORK/src_c/rules/sgd.pxi"
    [ -n "$TESTS" ] || TESTS="tests/test_kernels.py -k sgd"
fi

# ------------------------------------------------------------ build
# -fno-wrapv undoes the -fwrapv that distutils copies from CPython's own CFLAGS:
# under -fwrapv signed overflow is defined (it wraps) and UBSan never checks it.
SAN_FLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-wrapv"
cat > "$WORK/cc-sanitize" <<EOF
#!/bin/sh
# Appended last, so they override setup.py's -O3; also used to link.
exec $CC_REAL "\$@" $SAN_FLAGS
EOF
chmod +x "$WORK/cc-sanitize"

say "building the extensions with: $SAN_FLAGS"
build_start=$SECONDS
(cd "$WORK" && CC="$WORK/cc-sanitize" "$PYTHON" setup.py -q build_ext --inplace -j 2 \
    --build-temp "$WORK/build-temp" > "$WORK/build.log" 2>&1) \
    || { tail -40 "$WORK/build.log"; die "build failed (log: $WORK/build.log)"; }
echo "built in $((SECONDS - build_start)) s"
for so in "$WORK"/fastopt/_*.so; do
    symbols=$(nm -D "$so")
    grep -q "__asan_report" <<< "$symbols" || die "$so is not instrumented with ASan"
    grep -q "__ubsan_handle" <<< "$symbols" || die "$so is not instrumented with UBSan"
done

# ------------------------------------------------------------ run
REPORTS="$WORK/reports"
rm -rf "$REPORTS"; mkdir -p "$REPORTS"
export LD_PRELOAD="$LIBASAN${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$REPORTS/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
# (UBSan inside ASan's runtime ignores a log_path: its reports go to stderr.)
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONMALLOC=malloc
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

cd "$WORK"
"$PYTHON" - "$WORK" <<'EOF' || die "the instrumented copy is not the fastopt that gets imported"
import sys
import fastopt, fastopt._fastpath
from fastopt import _dispatch
work = sys.argv[1]
mods = [fastopt._fastpath] + [__import__(f"fastopt._kernels_{lvl}", fromlist=["x"])
                              for lvl in _dispatch.built_levels()]
for m in mods:
    assert m.__file__.startswith(work + "/"), m.__file__
print("fastopt from", fastopt.__file__, "- levels", _dispatch.built_levels())
EOF

if [ -n "$TESTS" ]; then
    read -r -a TEST_ARGS <<< "$TESTS"
else
    TEST_ARGS=(tests/test_kernels.py tests/test_optimizer.py tests/test_flat.py
               tests/test_clip.py tests/test_accumulate.py
               "tests/test_dispatch.py::test_results_identical_for_every_thread_count_and_simd_level")
    # Subnormal inputs on every rule; the workspace's stale grad pointers.
    for extra in tests/test_denormals.py \
            tests/test_memory.py::test_workspace_keeps_no_grad_alive_and_never_reads_a_dead_one \
            tests/test_memory.py::test_accumulator_clip_and_kernels_keep_no_grad_alive; do
        [ -e "${extra%%::*}" ] && TEST_ARGS+=("$extra")
    done
fi
say "running under ASan+UBSan: pytest ${TEST_ARGS[*]} ${EXTRA[*]:-}"
test_start=$SECONDS
set +e
"$PYTHON" -m pytest -q -p no:cacheprovider --capture=sys "${TEST_ARGS[@]}" "${EXTRA[@]}" 2>&1 \
    | tee "$WORK/pytest.log"
status=${PIPESTATUS[0]}
set -e
echo "tests ran in $((SECONDS - test_start)) s, pytest exit status $status"

unset LD_PRELOAD
found=$(find "$REPORTS" -type f -size +0 | sort)
# UBSan's reports (and ASan's, should log_path be overridden) in the output.
PATTERN='runtime error: |ERROR: AddressSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer'
in_log=$(grep -E -c "$PATTERN" "$WORK/pytest.log" || true)
if [ -n "$found" ] || [ "$in_log" != 0 ]; then
    for f in $found; do
        printf '\n----- sanitizer report %s -----\n' "$(basename "$f")" >&2
        cat "$f" >&2
    done
    if [ "$in_log" != 0 ]; then
        printf '\n----- sanitizer output in the test log (%s) -----\n' "$WORK/pytest.log" >&2
        grep -E -A12 "$PATTERN" "$WORK/pytest.log" >&2 || true
    fi
    die "sanitizer report(s) above${INJECT:+ (expected: a '$INJECT' bug was injected on purpose)}"
fi
[ "$status" = 0 ] || die "pytest exit status $status (no sanitizer report)"
say "OK: no AddressSanitizer or UndefinedBehaviorSanitizer report"
