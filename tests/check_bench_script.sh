#!/bin/sh
# bench/run_all.sh runs OpenBLAS baselines with OpenBLAS's own choice of kernel:
# a bench that links -lopenblas runs with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE
# unset (they pin an older kernel), one that does not keeps the environment.
# Probed with two tiny benches in a scratch folder (a stub libopenblas.a, so no
# OpenBLAS is needed). Run by tests/run_all.sh with BUILD and CC set.
CC=${CC:-cc}; BUILD=${BUILD:-build}
out=$BUILD/check_bench_script; rm -rf "$out"; mkdir -p "$out/tree/bench"
root=$(pwd); abs=$(cd "$out" && pwd)
passed=0; failed=0; skipped=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; sed 's/^/     /' "$abs/out" | head -10; failed=$((failed + 1)); }

probe='#include <stdio.h>
#include <stdlib.h>
int main(void)
{
    const char *c = getenv("OPENBLAS_CORETYPE"), *l = getenv("OPENBLAS_L2_SIZE");
    printf("coretype=%s l2=%s\n", c ? c : "unset", l ? l : "unset");
    return 0;
}'
{ echo "// LDLIBS: -lopenblas -lm"; printf "%s\n" "$probe"; } > "$abs/tree/bench/bench_blas.c"
{ echo "// LDLIBS: -lm"; printf "%s\n" "$probe"; } > "$abs/tree/bench/bench_plain.c"
echo 'void esft_stub_openblas(void) {}' > "$abs/stub.c"
if ! { $CC -c "$abs/stub.c" -o "$abs/stub.o" && ar rcs "$abs/libopenblas.a" "$abs/stub.o"; } 2>"$abs/out"; then
    fail stub_library "cannot build a stub libopenblas.a"
    echo "$passed passed, $failed failed, $skipped skipped"; exit 1
fi
(cd "$abs/tree" && OPENBLAS_CORETYPE=Haswell OPENBLAS_L2_SIZE=262144 BUILD="$abs/build" CC="$CC" \
    BENCH_CFLAGS="-O0 -L$abs" sh "$root/bench/run_all.sh") > "$abs/out" 2>&1; rc=$?
[ $rc -eq 0 ] && pass run_all_exits_0 || fail run_all_exits_0 "exit $rc"
sed -n '/== bench_blas/,/== bench_plain/p' "$abs/out" | grep -qx "coretype=unset l2=unset" &&
    pass openblas_bench_runs_with_both_unset || fail openblas_bench_runs_with_both_unset "still set"
grep -q "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (were: Haswell, 262144)" "$abs/out" &&
    pass run_all_says_what_it_unset || fail run_all_says_what_it_unset "no line"
sed -n '/== bench_plain/,$p' "$abs/out" | grep -qx "coretype=Haswell l2=262144" &&
    pass other_benches_keep_the_environment || fail other_benches_keep_the_environment "lost"

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
