#!/bin/sh
# gpu_check.sh - everything esft owes on a GPU machine, in one run: `make gpu-check`.
#
#   1. build     make cuda and build/bench/bench_cuda (nvcc)
#   2. device    is there a CUDA device? (test_cuda's constructor probe under
#                ESFT_REQUIRE_CUDA=1); none: stop here, exit 2, the reason printed
#   3. test      build/tests/test_cuda with ESFT_REQUIRE_CUDA=1: every op against
#                the CPU, through the public API on cudaMalloc memory, V2-Lite shape
#   4. memcheck  compute-sanitizer --tool memcheck on the small cases
#   5. racecheck compute-sanitizer --tool racecheck on the kernels with shared memory
#   6. bench     build/bench/bench_cuda (--quick when less than 4 minutes are left)
#
# Each step runs under `timeout`; the whole stays within GPU_CHECK_SECONDS (480):
# a step that no longer fits is marked "no time", which fails the check. Logs go
# to $OUT when it is set (the device runner collects it), else $BUILD/gpu-check/;
# the summary table comes last, also written to summary.txt.
# Exit: 0 all passed; 1 a step failed; 2 no CUDA device (nothing on a GPU ran).
# Knobs: BUILD (build), MAKE (make), NVCC, GPU_CHECK_SECONDS, SANITIZER (path to
# compute-sanitizer; found on PATH or in /usr/local/cuda/bin by default).
BUILD=${BUILD:-build}
MAKE=${MAKE:-make}
BUDGET=${GPU_CHECK_SECONDS:-480}
LOGS=${OUT:-$BUILD/gpu-check}
mkdir -p "$LOGS" || exit 1
LOGS=$(cd "$LOGS" && pwd)
START=$(date +%s)
SUMMARY="$LOGS/summary.txt"
: > "$SUMMARY.rows"
failed=0

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }

# record step status seconds log note
record() {
    printf '%-10s %-8s %5ss  %-28s %s\n' "$1" "$2" "$3" "$4" "$5" >> "$SUMMARY.rows"
    case $2 in PASS|SKIP) ;; *) failed=1 ;; esac
}

# step name limit log cmd...: runs cmd under timeout (at most limit seconds and
# what is left of the budget), its output to the log; records PASS/FAIL/TIMEOUT.
step() {
    name=$1 limit=$2 log=$3
    shift 3
    room=$(left)
    if [ "$room" -lt 10 ]; then
        record "$name" "NO-TIME" 0 "$log" "budget of ${BUDGET}s spent"
        return 1
    fi
    [ "$limit" -gt "$room" ] && limit=$room
    echo "== $name (at most ${limit}s): $*"
    t0=$(date +%s)
    timeout "$limit" "$@" > "$LOGS/$log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    tail -n 3 "$LOGS/$log" | sed 's/^/   /'
    if [ $rc -eq 0 ]; then record "$name" PASS "$secs" "$log" ""
    elif [ $rc -eq 124 ]; then record "$name" TIMEOUT "$secs" "$log" "killed after ${limit}s"
    else record "$name" FAIL "$secs" "$log" "exit $rc"; fi
    return $rc
}

finish() {
    {
        echo
        echo "gpu-check summary ($(elapsed)s of ${BUDGET}s; logs in $LOGS)"
        printf '%-10s %-8s %6s  %-28s %s\n' step status time log note
        cat "$SUMMARY.rows"
        echo "$1"
    } | tee "$SUMMARY"
    rm -f "$SUMMARY.rows"
    exit "$2"
}

# 1. build
if [ -z "$NVCC" ] && ! command -v nvcc >/dev/null 2>&1; then
    record build FAIL 0 - "nvcc not found"
    finish "gpu-check: FAILED: nvcc not found (install the CUDA toolkit)" 1
fi
step build 300 build.log sh -c "$MAKE cuda $BUILD/bench/bench_cuda BUILD=$BUILD" ||
    finish "gpu-check: FAILED: the CUDA parts do not build (see $LOGS/build.log)" 1

# 2. device: the constructor must return a backend; its reason otherwise
if ! step device 60 device.log env ESFT_REQUIRE_CUDA=1 "$BUILD/tests/test_cuda" cuda_device_starts; then
    reason=$(grep -o 'no CUDA device[^)]*)' "$LOGS/device.log" | head -n 1)
    [ -n "$reason" ] || reason="the CUDA backend did not start (see $LOGS/device.log)"
    if grep -q 'no CUDA device' "$LOGS/device.log"; then
        sed 's/^device     FAIL    /device     NO-DEV  /' "$SUMMARY.rows" > "$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY.rows"
        for s in test memcheck racecheck bench; do record "$s" SKIP 0 - "no device"; done
        finish "gpu-check: NO DEVICE: $reason; nothing was checked on a GPU" 2
    fi
    finish "gpu-check: FAILED: $reason" 1
fi
nvidia-smi > "$LOGS/nvidia-smi.log" 2>&1 || true

# 3. every op against the CPU, a missing device a failure
step test 180 test_cuda.log env ESFT_REQUIRE_CUDA=1 "$BUILD/tests/test_cuda"

# 4-5. compute-sanitizer on small cases (ESFT_TEST_LIGHT: the V2-Lite case at T 64)
SAN=${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [ -x "$SAN" ]; then
    for t in cuda_route_softmax_renormalised cuda_stats_rejects cuda_moe_fp32 cuda_moe_expert_gemm_modes \
             cuda_moe_non_finite cuda_adamw cuda_clip cuda_pesc_fp32; do
        step memcheck 60 "memcheck_$t.log" env ESFT_REQUIRE_CUDA=1 ESFT_TEST_LIGHT=1 \
            "$SAN" --tool memcheck --error-exitcode 3 "$BUILD/tests/test_cuda" "$t"
    done
    for t in cuda_route_exact_ties cuda_stats_rejects cuda_moe_fp32 cuda_clip cuda_pesc_fp32; do
        step racecheck 90 "racecheck_$t.log" env ESFT_REQUIRE_CUDA=1 ESFT_TEST_LIGHT=1 \
            "$SAN" --tool racecheck --error-exitcode 3 "$BUILD/tests/test_cuda" "$t"
    done
else
    record memcheck FAIL 0 - "compute-sanitizer not found ($SAN)"
    record racecheck FAIL 0 - "compute-sanitizer not found"
fi

# 6. the benchmark, whole when it fits
if [ "$(left)" -ge 240 ]; then step bench 240 bench_cuda.log "$BUILD/bench/bench_cuda"
else step bench 150 bench_cuda.log "$BUILD/bench/bench_cuda" --quick; fi

if [ $failed -eq 0 ]; then finish "gpu-check: PASSED" 0; fi
finish "gpu-check: FAILED (see the logs named above)" 1
