#!/bin/sh
# The demo behind `make run` (examples/demo.c) at CI size (--quick, seconds):
# exit codes, the results table's structure, the expected direction of its
# numbers (ESFT and PESC train fewer parameters than full fine-tuning and hold
# 12 bytes of gradient + AdamW state per trainable parameter; every fine-tune
# beats the pre-trained model on the target task; ESFT forgets less than full
# fine-tuning), its output files, and identical numbers on a second run with
# another thread count. No timing is asserted.
# Run by tests/run_all.sh with BUILD set; needs $BUILD/examples/demo (make all).
BUILD=${BUILD:-build}
DEMO=$BUILD/examples/demo
T=$BUILD/check_demo
rm -rf "$T"; mkdir -p "$T"
passed=0; failed=0; skipped=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }
finish() { echo "$passed passed, $failed failed, $skipped skipped"; [ "$failed" -eq 0 ]; exit $?; }

if [ ! -x "$DEMO" ]; then fail setup "$DEMO is missing (run make)"; finish; fi

"$DEMO" --help > "$T/help" 2>&1; rc=$?
if [ "$rc" -eq 0 ] && grep -q -- "--quick" "$T/help"; then pass help; else fail help "exit $rc or no usage text"; fi
"$DEMO" --no-such-option > "$T/bad" 2>&1; rc=$?
if [ "$rc" -eq 2 ]; then pass bad_option_exit_2; else fail bad_option_exit_2 "exit $rc"; fi
"$DEMO" --quick --data "$T/nowhere" --out "$T/none" > "$T/nodata" 2>&1; rc=$?
if [ "$rc" -eq 1 ]; then pass missing_data_exit_1; else fail missing_data_exit_1 "exit $rc"; fi

"$DEMO" --quick --out "$T/run1" > "$T/out1" 2>&1; rc=$?
if [ "$rc" -ne 0 ]; then
    fail quick_run "exit $rc"; sed 's/^/     /' "$T/out1" | tail -5; finish
fi
pass quick_run

# The table: "| method | task bpb | general bpb | params | bytes | time |", 5 rows.
sed -n '/^| method |/,/^$/p' "$T/out1" | grep '^| ' | sed '1d' > "$T/rows"
awk -F'|' '{ gsub(/^ +| +$/, "", $2); print $2 }' "$T/rows" | sed 's/ (.*//' > "$T/names"
printf 'pre-trained\nESFT-Token\nESFT-Gate\nFull fine-tune\nPESC adapters\n' > "$T/want"
if [ "$(wc -l < "$T/rows")" -eq 5 ] && [ "$(awk -F'|' '{ print NF }' "$T/rows" | sort -u)" = 8 ] &&
   cmp -s "$T/names" "$T/want"; then
    pass table_structure
else
    fail table_structure "expected 5 rows of 6 columns: pre-trained, ESFT-Token, ESFT-Gate, Full fine-tune, PESC adapters"
    sed 's/^/     /' "$T/rows"
fi

# Row i, column c (1 = method) as a plain number.
cell() { sed -n "${1}p" "$T/rows" | awk -F'|' -v c=$(($2 + 1)) '{ v = $c; gsub(/[^0-9.]/, "", v); print v }'; }
check() { # name condition (awk syntax) message
    if awk "BEGIN { exit !($2) }"; then pass "$1"; else fail "$1" "$3"; fi
}
pre_task=$(cell 1 2); pre_gen=$(cell 1 3)
full_params=$(cell 4 4); full_gen=$(cell 4 3)
for i in 2 3 5; do
    name=$(sed -n "${i}p" "$T/names" | tr ' ' '_')
    check "${name}_trains_fewer_params_than_full" "$(cell $i 4) > 0 && $(cell $i 4) < $full_params" \
        "$(cell $i 4) trainable parameters vs full fine-tune's $full_params"
done
for i in 2 3 4 5; do
    name=$(sed -n "${i}p" "$T/names" | tr ' ' '_')
    check "${name}_beats_pretrained_on_task" "$(cell $i 2) < $pre_task" \
        "task bits/byte $(cell $i 2), pre-trained $pre_task"
    check "${name}_memory_is_12_bytes_per_param" "$(cell $i 5) == 12 * $(cell $i 4)" \
        "$(cell $i 5) bytes for $(cell $i 4) parameters (gradient 4 + AdamW m, v 8 per parameter)"
done
for i in 2 3; do
    name=$(sed -n "${i}p" "$T/names" | tr ' ' '_')
    check "${name}_forgets_less_than_full" "$(cell $i 3) - $pre_gen < $full_gen - $pre_gen" \
        "general bits/byte $(cell $i 3) vs full fine-tune's $full_gen (pre-trained $pre_gen)"
done

ok=1
for f in summary.json config_token.json config_gate.json heatmap_token.svg heatmap_gate.svg results.tsv; do
    [ -s "$T/run1/$f" ] || { ok=0; fail outputs "$T/run1/$f missing or empty"; }
done
if [ "$ok" -eq 1 ]; then
    if grep -q '"token_scores": {"1": {' "$T/run1/summary.json" && grep -q '"experts": {"1": \[' "$T/run1/config_token.json" &&
       grep -q '<svg' "$T/run1/heatmap_token.svg"; then pass outputs; else fail outputs "unexpected file contents"; fi
fi

# Same seed, two threads: every number but the times identical.
OMP_WAIT_POLICY=passive "$DEMO" --quick --threads 2 --out "$T/run2" > "$T/out2" 2>&1; rc=$?
cut -f1-12 "$T/run1/results.tsv" > "$T/r1"; cut -f1-12 "$T/run2/results.tsv" > "$T/r2" 2>/dev/null
if [ "$rc" -eq 0 ] && cmp -s "$T/r1" "$T/r2" && cmp -s "$T/run1/summary.json" "$T/run2/summary.json"; then
    pass deterministic_across_runs_and_threads
else
    fail deterministic_across_runs_and_threads "exit $rc; results.tsv or summary.json differ"
fi
finish
