#!/bin/sh
# Builds every bench/bench_*.c with -O3 -march=native and runs them in turn.
# Called by `make bench` with BUILD and CC set. A bench file names the libraries it
# links in its top comment, on a line "LDLIBS: -lopenblas -lm" (default -lm);
# extra compile flags go on a "CFLAGS: ..." line the same way.
# Knobs: BENCH_CFLAGS (default -O3 -march=native -std=c99), BENCH_ARGS (passed to
# every bench), BENCH_ONLY (a name such as bench_stats: run only that one).
# Exit status: non-zero if a bench failed to build or to run (a failed validation).
BUILD=${BUILD:-build}
CC=${CC:-cc}
BENCH_CFLAGS=${BENCH_CFLAGS:-"-O3 -march=native -std=c99 -Wall -Wextra"}
ESFT_DATA=${ESFT_DATA:-$BUILD/data}
export ESFT_DATA BUILD
mkdir -p "$BUILD/bench"
status=0

# The value of "KEY: ..." in the first 40 lines of a file (comment closers dropped).
header_value() { # key file
    head -n 40 "$2" | sed -n "s/^.*$1:[[:space:]]*//p" | head -n 1 | sed 's/\*\/.*$//; s/[[:space:]]*$//'
}

for src in bench/bench_*.c; do
    [ -f "$src" ] || continue
    name=$(basename "$src" .c)
    if [ -n "$BENCH_ONLY" ] && [ "$BENCH_ONLY" != "$name" ]; then continue; fi
    libs=$(header_value LDLIBS "$src"); libs=${libs:--lm}
    extra=$(header_value CFLAGS "$src")
    echo "== $name"
    # shellcheck disable=SC2086 # flags are word lists on purpose
    if ! $CC $BENCH_CFLAGS $extra -I. "$src" -o "$BUILD/bench/$name" $libs; then
        echo "FAIL $name: does not build (needs: $libs)"; status=1; continue
    fi
    # OpenBLAS baselines get OpenBLAS's own choice of kernel: OPENBLAS_CORETYPE
    # and OPENBLAS_L2_SIZE (set on some machines) pin an older one (dense GEMM 209
    # instead of 361 GFLOP/s in one run). Only these processes lose them; each
    # such bench prints the core that ran.
    case " $libs " in
    *" -lopenblas "*)
        echo "OpenBLAS baseline: OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset" \
            "(were: ${OPENBLAS_CORETYPE:-unset}, ${OPENBLAS_L2_SIZE:-unset})"
        # shellcheck disable=SC2086
        env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$BUILD/bench/$name" $BENCH_ARGS ;;
    *)
        # shellcheck disable=SC2086
        "$BUILD/bench/$name" $BENCH_ARGS ;;
    esac
    rc=$?
    if [ $rc -ne 0 ]; then echo "FAIL $name: exit status $rc"; status=1; fi
done
exit $status
