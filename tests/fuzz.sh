#!/bin/sh
# Fuzzing: every tests/fuzz_*.c as a libFuzzer target (clang
# -fsanitize=fuzzer,address,undefined), run FUZZ_SECONDS each on a working copy
# of its seed corpus tests/corpus/<name without fuzz_>/. Before that, each
# target's plain-main build replays its seed corpus under ASan+UBSan, so the
# fallback compiles and the seeds are clean.
# Called by `make fuzz` with BUILD (default build/fuzz) and FUZZ_SECONDS (30).
# A crash leaves its input as $BUILD/<target>-crash-*: replay it with
#     $BUILD/<target>_replay $BUILD/<target>-crash-...
# Prints "N passed, N failed, N skipped" last; exit 1 when anything failed.
BUILD=${BUILD:-build/fuzz}
FUZZ_SECONDS=${FUZZ_SECONDS:-30}
CLANG=${CLANG:-clang}
mkdir -p "$BUILD"
passed=0; failed=0; skipped=0
# Targets that write files (heatmap, config round trip, checkpoint index) keep
# them in $TMPDIR/esft_fuzz_<target>_<pid>: on tmpfs the writer's fsync is free,
# on a disk it would make those targets a hundred times slower.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi
ok()   { echo "PASS $1${2:+: $2}"; passed=$((passed + 1)); }
bad()  { echo "FAIL $1: $2"; failed=$((failed + 1)); }
skip() { echo "SKIP $1: $2"; skipped=$((skipped + 1)); }

if ! command -v "$CLANG" >/dev/null 2>&1; then
    for src in tests/fuzz_*.c; do skip "$(basename "$src" .c)" "clang not found (apt-get install clang libclang-rt-14-dev)"; done
    echo "$passed passed, $failed failed, $skipped skipped"
    exit 0
fi

SAN="-g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
for src in tests/fuzz_*.c; do
    name=$(basename "$src" .c)
    seeds=tests/corpus/${name#fuzz_}
    log=$BUILD/$name.log
    # 1. the plain-main fallback replays the seeds
    if ! $CLANG -std=c99 $SAN -I. "$src" -o "$BUILD/${name}_replay" -lm 2>"$log"; then
        bad "${name}_replay_seeds" "build failed, see $log"; tail -20 "$log"; continue
    elif [ -z "$(ls "$seeds" 2>/dev/null)" ]; then skip "${name}_replay_seeds" "no seeds in $seeds"; seeds=
    elif "$BUILD/${name}_replay" "$seeds"/* >>"$log" 2>&1; then ok "${name}_replay_seeds" "$(ls "$seeds" | wc -l) seeds"
    else bad "${name}_replay_seeds" "see $log"; tail -20 "$log"; fi
    # 2. libFuzzer for FUZZ_SECONDS on a working corpus (the seeds stay as they are)
    if ! $CLANG -std=c99 $SAN -fsanitize=fuzzer -DESFT_LIBFUZZER -I. "$src" -o "$BUILD/$name" -lm 2>"$log"; then
        if grep -q "libclang_rt.fuzzer\|fuzzer" "$log"; then skip "$name" "no libFuzzer runtime (apt-get install libclang-rt-14-dev)"
        else bad "$name" "build failed, see $log"; tail -20 "$log"; fi
        continue
    fi
    work=$BUILD/corpus_${name#fuzz_}
    mkdir -p "$work"
    if "$BUILD/$name" -max_total_time="$FUZZ_SECONDS" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$BUILD/$name-" -print_final_stats=1 "$work" $seeds >"$log" 2>&1; then
        runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n 1)
        cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n 1)
        ok "$name" "${runs:-?} inputs in ${FUZZ_SECONDS}s, $cov"
    else
        bad "$name" "crash or leak; input saved as $BUILD/$name-*; log $log"
        grep -E "ERROR|invariant|SUMMARY|Test unit written" "$log" | head -10
    fi
done
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
