#!/bin/sh
# The demo behind `make run` (examples/demo.c) at CI size (--quick, seconds):
# exit codes; the results table's structure and the expected direction of its
# numbers (ESFT, LoRA and PESC train fewer parameters than full fine-tuning and
# hold 12 bytes of gradient + AdamW state per trainable parameter; every
# fine-tune beats its pre-trained model on the target task; ESFT forgets less
# than full fine-tuning); its output files; the checkpoints it writes: the
# merged one evaluates with `esft eval` to the demo's own number, and, where
# torch + transformers are installed, transformers loads the pre-trained ones
# with the same loss as `esft eval`; identical numbers on a second run with
# another thread count. No timing is asserted.
# Run by tests/run_all.sh with BUILD set; needs $BUILD/examples/demo and $BUILD/esft (make all).
BUILD=${BUILD:-build}
PYTHON=${PYTHON:-python3}
DEMO=$BUILD/examples/demo
ESFT=$BUILD/esft
T=$BUILD/check_demo
rm -rf "$T"; mkdir -p "$T"
passed=0; failed=0; skipped=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }
skip() { echo "SKIP $1: $2"; skipped=$((skipped + 1)); }
finish() { echo "$passed passed, $failed failed, $skipped skipped"; [ "$failed" -eq 0 ]; exit $?; }

if [ ! -x "$DEMO" ] || [ ! -x "$ESFT" ]; then fail setup "$DEMO or $ESFT is missing (run make)"; finish; fi

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

# The table: "| method | task bpb | general bpb | params | bytes | time |", 7 rows.
sed -n '/^| method |/,/^$/p' "$T/out1" | grep '^| ' | sed '1d' > "$T/rows"
awk -F'|' '{ gsub(/^ +| +$/, "", $2); print $2 }' "$T/rows" | sed 's/ (.*//' > "$T/names"
printf 'pre-trained\nESFT-Token\nESFT-Gate\nFull fine-tune\nLoRA\ndense twin, pre-trained\nPESC on the dense twin\n' > "$T/want"
if [ "$(wc -l < "$T/rows")" -eq 7 ] && [ "$(awk -F'|' '{ print NF }' "$T/rows" | sort -u)" = 8 ] &&
   cmp -s "$T/names" "$T/want"; then
    pass table_structure
else
    fail table_structure "expected 7 rows of 6 columns: pre-trained, ESFT-Token, ESFT-Gate, Full fine-tune, LoRA, dense twin, PESC"
    sed 's/^/     /' "$T/rows"
fi

# Row i, column c (1 = method) as a plain number.
cell() { sed -n "${1}p" "$T/rows" | awk -F'|' -v c=$(($2 + 1)) '{ v = $c; gsub(/[^0-9.]/, "", v); print v }'; }
check() { # name condition (awk syntax) message
    if awk "BEGIN { exit !($2) }"; then pass "$1"; else fail "$1" "$3"; fi
}
rows="2 3 4 5 7"
pre_task=$(cell 1 2); pre_gen=$(cell 1 3)
full_params=$(cell 4 4); full_gen=$(cell 4 3)
for i in $rows; do
    name=$(sed -n "${i}p" "$T/names" | tr ' ' '_')
    base=$pre_task; [ "$i" -eq 7 ] && base=$(cell 6 2)
    check "${name}_beats_pretrained_on_task" "$(cell $i 2) < $base" \
        "task bits/byte $(cell $i 2), pre-trained $base"
    check "${name}_memory_is_12_bytes_per_param" "$(cell $i 5) == 12 * $(cell $i 4)" \
        "$(cell $i 5) bytes for $(cell $i 4) parameters (gradient 4 + AdamW m, v 8 per parameter)"
    [ "$i" -eq 4 ] && continue
    check "${name}_trains_fewer_params_than_full" "$(cell $i 4) > 0 && $(cell $i 4) < $full_params" \
        "$(cell $i 4) trainable parameters vs full fine-tune's $full_params"
done
for i in 2 3; do
    name=$(sed -n "${i}p" "$T/names" | tr ' ' '_')
    check "${name}_forgets_less_than_full" "$(cell $i 3) - $pre_gen < $full_gen - $pre_gen" \
        "general bits/byte $(cell $i 3) vs full fine-tune's $full_gen (pre-trained $pre_gen)"
done

ok=1
R=$T/run1
for f in summary.json config_token.json config_gate.json heatmap_token.svg heatmap_gate.svg results.tsv \
         esft_token.safetensors translation.eval.jsonl base/config.json base/model.safetensors \
         dense_base/config.json dense_base/model.safetensors merged/config.json merged/model.safetensors; do
    [ -s "$R/$f" ] || { ok=0; fail outputs "$R/$f missing or empty"; }
done
if [ "$ok" -eq 1 ]; then
    if grep -q '"token_scores": {"0": {' "$R/summary.json" && grep -q '"experts": {"0": \[' "$R/config_token.json" &&
       grep -q '<svg' "$R/heatmap_token.svg" && grep -q '"model_type": "qwen2_moe"' "$R/base/config.json" &&
       grep -q '"model_type": "qwen2"' "$R/dense_base/config.json"; then
        pass outputs
    else
        fail outputs "unexpected file contents"
    fi
fi

# The merged checkpoint (base + ESFT-Token's experts) through `esft eval`: the
# demo's own ESFT-Token task loss (results.tsv task_nats, column 11).
want=$(awk -F'\t' '$1 ~ /^ESFT-Token/ { print $11 }' "$R/results.tsv")
got=$("$ESFT" eval "$R/merged" --data "$R/translation.eval.jsonl" -q 2>"$T/eval_err" | awk '{ print $2 }')
check merged_checkpoint_evaluates_as_esft_token "\"$got\" != \"\" && \"$want\" != \"\" && ($got - $want < 1e-7 && $want - $got < 1e-7)" \
    "esft eval merged: '$got' nats, the demo's ESFT-Token row: '$want' ($(cat "$T/eval_err"))"

# transformers loads the pre-trained checkpoints, with esft eval's loss (1e-4).
head -4 "$R/translation.eval.jsonl" > "$T/hf.jsonl"
for d in base dense_base; do
    hf=$("$PYTHON" tests/check_demo_hf.py "$R/$d" "$T/hf.jsonl" 2>"$T/hf_err"); rc=$?
    if [ "$rc" -eq 3 ] || ! command -v "$PYTHON" > /dev/null 2>&1; then
        skip "transformers_loads_$d" "$hf"; continue
    fi
    ours=$("$ESFT" eval "$R/$d" --data "$T/hf.jsonl" -q 2>/dev/null | awk '{ print $2 }')
    theirs=$(echo "$hf" | awk '/^loss/ { print $2 }')
    if [ "$rc" -eq 0 ] && [ -n "$theirs" ] && [ -n "$ours" ] &&
       awk "BEGIN { d = $theirs - $ours; exit !(d < 1e-4 && d > -1e-4) }"; then
        pass "transformers_loads_$d"
    else
        fail "transformers_loads_$d" "transformers '$theirs', esft eval '$ours' (exit $rc: $(tail -1 "$T/hf_err"))"
    fi
done

# Same seed, two threads: every number but the times identical.
OMP_WAIT_POLICY=passive "$DEMO" --quick --threads 2 --out "$T/run2" > "$T/out2" 2>&1; rc=$?
cut -f1-13 "$R/results.tsv" > "$T/r1"; cut -f1-13 "$T/run2/results.tsv" > "$T/r2" 2>/dev/null
if [ "$rc" -eq 0 ] && cmp -s "$T/r1" "$T/r2" && cmp -s "$R/summary.json" "$T/run2/summary.json"; then
    pass deterministic_across_runs_and_threads
else
    fail deterministic_across_runs_and_threads "exit $rc; results.tsv or summary.json differ"
fi
finish
