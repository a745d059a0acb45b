# tally.sh - sourced by tests/run_all.sh and tests/sanitize.sh: totals over
# suites whose output each ends with "N passed, N failed, N skipped".
passed=0; failed=0; skipped=0

# tally_add LOGFILE EXIT-STATUS: adds the log's last result line to the totals
# (a run that exited non-zero counts at least one failure); sets $line and $f
# (that run's failures). Returns 1, counting one failure, when there is no
# result line.
tally_add() {
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$1" | tail -n 1)
    if [ -z "$line" ]; then failed=$((failed + 1)); return 1; fi
    p=$(echo "$line" | sed -E 's/^([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/')
    s=$(echo "$line" | sed -nE 's/.* ([0-9]+) skipped.*/\1/p'); s=${s:-0}
    if [ "$2" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
}
