#!/bin/sh
# Runs every test program and oracle, then prints the total as the last line:
# "N passed, N failed, N skipped". Exit status: 0 only when nothing failed.
# Called by `make test` with BUILD, ESFT_DATA, PYTHON, NVCC, CC, CXX set.
BUILD=${BUILD:-build}
PYTHON=${PYTHON:-python3}
export ESFT_DATA BUILD
log=$BUILD/test-logs
mkdir -p "$log"
. "$(dirname "$0")/tally.sh"

skips=$log/skips.txt
: > "$skips"

# Adds the closing "N passed, N failed, N skipped" line of one suite's output;
# keeps its "SKIP name: reason" lines for the summary.
tally() { # name status logfile
    if ! tally_add "$3" "$2"; then echo "FAIL $1: no result line (exit $2); see $3"; return; fi
    printf '%-28s %s\n' "$1" "$line"
    if [ "$f" -ne 0 ]; then grep -E '^(FAIL|     |first failure)' "$3"; fi
    grep -E '^SKIP ' "$3" | sed "s|^SKIP |  $1/|" >> "$skips"
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

# Every skip with its reason: a count alone hides what did not run.
if [ -s "$skips" ]; then
    echo "skipped ($(wc -l < "$skips" | tr -d ' ') lines; suite/test: reason):"
    cat "$skips"
fi
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
