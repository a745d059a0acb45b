#!/bin/sh
# Runs every test program and oracle, then prints the total as the last line:
# "N passed, N failed, N skipped". Exit status: 0 only when nothing failed.
# Called by `make test` with BUILD, ESFT_DATA, PYTHON, NVCC, CC, CXX set.
BUILD=${BUILD:-build}
PYTHON=${PYTHON:-python3}
export ESFT_DATA BUILD
passed=0; failed=0; skipped=0
log=$BUILD/test-logs
mkdir -p "$log"

# Adds the closing "N passed, N failed, N skipped" line of one suite's output.
tally() { # name status logfile
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$3" | tail -n 1)
    if [ -z "$line" ]; then
        echo "FAIL $1: no result line (exit $2); see $3"; failed=$((failed + 1)); return
    fi
    p=$(echo "$line" | sed -E 's/^([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/')
    s=$(echo "$line" | sed -nE 's/.* ([0-9]+) skipped.*/\1/p'); s=${s:-0}
    if [ "$2" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
    printf '%-28s %s\n' "$1" "$line"
    if [ "$f" -ne 0 ]; then grep -E '^(FAIL|     )' "$3"; fi
}

for t in "$BUILD"/tests/test_*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    "$t" > "$log/$name.log" 2>&1; rc=$?
    tally "$name" $rc "$log/$name.log"
done

for py in tests/oracle_*.py; do
    [ -f "$py" ] || continue
    name=$(basename "$py" .py)
    "$PYTHON" "$py" > "$log/$name.log" 2>&1; rc=$?
    tally "$name" $rc "$log/$name.log"
done

for sh in tests/check_*.sh; do
    [ -f "$sh" ] || continue
    name=$(basename "$sh" .sh)
    sh "$sh" > "$log/$name.log" 2>&1; rc=$?
    tally "$name" $rc "$log/$name.log"
done

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
