#!/bin/sh
# `make sanitize`: every tests/test_*.c built with -fsanitize=address,undefined
# -fno-sanitize-recover=all -g into $BUILD and run; then every one built plainly
# (-O1 -g) and run under valgrind --error-exitcode=1 --leak-check=full.
# Both builds use -fopenmp -march=native as `make` does (when the compiler takes
# them), so the SIMD kernels, the threaded loops and the same-bits-for-any-thread-
# count tests run under the sanitizers too, not only the scalar one-thread code.
# valgrind 3.19 cannot decode AVX-512, so its build adds -mno-avx512f (the AVX2
# kernels run there; the AVX-512 ones under ASan); OpenMP threads there wait
# passively (OMP_WAIT_POLICY=passive), as spinning threads would eat valgrind's
# one serialised CPU.
# Any sanitizer report, valgrind error, leak or failed test fails its line.
# Called with BUILD (default build/asan), ESFT_DATA, CC. Run from the repository
# root. Prints "N passed, N failed, N skipped" last (the tests' own counts,
# summed over both passes); exit 1 when anything failed.
BUILD=${BUILD:-build/asan}
CC=${CC:-cc}
export ESFT_DATA BUILD
mkdir -p "$BUILD/logs" "$BUILD/tests" # tests that write files put them in $BUILD/tests
. "$(dirname "$0")/tally.sh"

# Adds one run's closing line to the totals.
tally() { # label exit-status logfile
    if ! tally_add "$3" "$2"; then echo "FAIL $1: no result line (exit $2); see $3"; tail -15 "$3"; return; fi
    printf '%-36s %s\n' "$1" "$line"
    if [ "$f" -ne 0 ]; then grep -E '^(FAIL|     )|ERROR|runtime error|definitely lost|Invalid' "$3" | head -20; fi
}

build() { # src out flags...
    src=$1; out=$2; shift 2
    $CC -std=c99 "$@" -I. "$src" -o "$out" -lm 2>"$out.build.log"
}

# The flags of `make` that select code paths: OpenMP and the host's SIMD.
probe() { echo 'int main(void){return 0;}' | $CC "$@" -x c - -o /dev/null 2>/dev/null; }
PATHS=
if probe -fopenmp; then PATHS="$PATHS -fopenmp"; fi
if probe -march=native; then PATHS="$PATHS -march=native"; fi
VG_PATHS=$PATHS
if [ -n "$PATHS" ] && probe $PATHS -mno-avx512f; then VG_PATHS="$PATHS -mno-avx512f"; fi
echo "code paths: ASan+UBSan${PATHS:- (scalar, one thread)}; valgrind${VG_PATHS:- (scalar, one thread)}"

# 1. AddressSanitizer + UndefinedBehaviorSanitizer
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
for src in tests/test_*.c; do
    name=$(basename "$src" .c)
    out=$BUILD/tests/$name
    if ! build "$src" "$out" -g -O1 $PATHS -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all; then
        echo "FAIL asan/$name: build failed"; tail -15 "$out.build.log"; failed=$((failed + 1)); continue
    fi
    "$out" >"$BUILD/logs/asan_$name.log" 2>&1; rc=$?
    tally "asan/$name" $rc "$BUILD/logs/asan_$name.log"
done

# 2. valgrind on plain builds (catches what ASan does not: uninitialised reads)
if command -v valgrind >/dev/null 2>&1; then
    for src in tests/test_*.c; do
        name=$(basename "$src" .c)
        out=$BUILD/tests/${name}_vg
        if ! build "$src" "$out" -g -O1 $VG_PATHS; then
            echo "FAIL valgrind/$name: build failed"; tail -15 "$out.build.log"; failed=$((failed + 1)); continue
        fi
        # ESFT_TEST_LIGHT: tests that repeat a whole-model forward hundreds of times
        # (finite differences) check fewer coordinates: the code paths are the same,
        # and valgrind runs them ~50x slower
        ESFT_TEST_LIGHT=1 OMP_WAIT_POLICY=passive valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect \
            "$out" >"$BUILD/logs/valgrind_$name.log" 2>&1; rc=$?
        tally "valgrind/$name" $rc "$BUILD/logs/valgrind_$name.log"
    done
else
    echo "SKIP valgrind: not installed (apt-get install valgrind)"; skipped=$((skipped + 1))
fi

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
