#!/bin/sh
# `esft eval`, `esft stats MODEL` and `esft inspect MODEL` on the tiny MoE and dense checkpoints
# of tests/models/ against the goldens transformers wrote: the printed loss and
# token count, the --logits .npy, the summary.json token scores from the model's
# own routing, the architecture lines, and exit codes with no output on failure.
# Run by tests/run_all.sh with BUILD set; the comparisons need numpy + safetensors.
BUILD=${BUILD:-build}
PYTHON=${PYTHON:-python3}
ESFT=$BUILD/esft
M=tests/models
T=$BUILD/check_models
rm -rf "$T"; mkdir -p "$T"
passed=0; failed=0; skipped=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; [ -s "$T/err" ] && sed 's/^/     /' "$T/err" | head -5; failed=$((failed + 1)); }
skip() { echo "SKIP $1: $2"; skipped=$((skipped + 1)); }
have_numpy() { "$PYTHON" -c 'import numpy, safetensors' 2>/dev/null; }

if [ ! -x "$ESFT" ]; then
    echo "FAIL setup: need $ESFT (run make test)"; echo "0 passed, 1 failed, 0 skipped"; exit 1
fi

# golden VARIANT -> "loss n_tokens" from golden.safetensors
golden() {
    "$PYTHON" - "$M/$1/golden.safetensors" <<'PY'
import sys
from safetensors.numpy import load_file
g = load_file(sys.argv[1])
print("%.8f %d" % (float(g["loss"][0]), int(g["n_tokens"][0])))
PY
}

for v in deepseek_v2_lite deepseek_v3_fp8 qwen2_moe_fused olmoe mixtral llama mistral qwen2; do
    if ! "$ESFT" eval "$M/$v" --data "$M/$v/data.jsonl" --logits "$T/$v.npy" > "$T/out" 2> "$T/err"; then
        fail "eval_$v" "exit $?"; continue
    fi
    if ! grep -Eq '^loss [0-9.]+ tokens [0-9]+$' "$T/out"; then fail "eval_$v" "stdout: $(cat "$T/out")"; continue; fi
    if ! have_numpy; then skip "eval_$v" "numpy/safetensors missing: loss not compared"; continue; fi
    set -- $(cat "$T/out") $(golden "$v")
    # $2 our loss, $4 our tokens, $5 golden loss, $6 golden tokens
    if [ "$4" != "$6" ]; then fail "eval_$v" "tokens $4, golden $6"; continue; fi
    if ! "$PYTHON" -c "import sys; a, b = float('$2'), float('$5'); sys.exit(abs(a - b) > 1e-5 * max(1, abs(b)))"; then
        fail "eval_$v" "loss $2, golden $5"; continue; fi
    if "$PYTHON" - "$T/$v.npy" "$M/$v/golden.safetensors" > "$T/err" 2>&1 <<'PY'
import sys, numpy as np
from safetensors.numpy import load_file
ours, gold = np.load(sys.argv[1]), load_file(sys.argv[2])["logits"]
assert ours.dtype == np.float32 and ours.shape == gold.shape, (ours.dtype, ours.shape, gold.shape)
d = float(np.abs(ours - gold).max()) / max(1.0, float(np.abs(gold).max()))
assert d <= 1e-4, "logits differ by %.3g relative" % d
PY
    then pass "eval_$v"; else fail "eval_$v" "--logits"; fi
done

# esft stats MODEL: the token scores are the golden routing counts / (tokens x K)
for v in deepseek_v2_lite qwen3_moe; do
    if ! "$ESFT" stats "$M/$v" --data "$M/$v/data.jsonl" --decimals 6 -o "$T/$v.json" > "$T/out" 2> "$T/err"; then
        fail "stats_model_$v" "exit $?"; continue; fi
    if ! have_numpy; then skip "stats_model_$v" "numpy/safetensors missing"; continue; fi
    if "$PYTHON" - "$T/$v.json" "$M/$v/golden.safetensors" > "$T/err" 2>&1 <<'PY'
import sys, json, numpy as np
from safetensors.numpy import load_file
s, g = json.load(open(sys.argv[1])), load_file(sys.argv[2])
layers, counts = g["moe_layers"], g["router_counts_all"]
assert sorted(s["token_scores"], key=int) == [str(int(l)) for l in layers], s["token_scores"].keys()
for l, c in zip(layers, counts):
    want = c / c.sum()
    got = np.array([s["token_scores"][str(int(l))][str(e)] for e in range(len(c))])
    assert np.abs(got - want).max() <= 1e-6, (int(l), got, want)
PY
    then pass "stats_model_$v"; else fail "stats_model_$v" "scores differ from the golden counts"; fi
done

if "$ESFT" stats "$M/olmoe" --data "$M/olmoe/data.jsonl" --tokens labelled -o "$T/lab.json" > "$T/out" 2> "$T/err" &&
   "$ESFT" stats "$M/olmoe" --data "$M/olmoe/data.jsonl" --tokens all -o "$T/all.json" > "$T/out" 2> "$T/err" &&
   ! cmp -s "$T/lab.json" "$T/all.json"; then
    pass stats_model_tokens_option_counts_differently
else fail stats_model_tokens_option_counts_differently "labelled and all gave the same file"; fi

if "$ESFT" inspect "$M/deepseek_v2_qlora_yarn" > "$T/out" 2> "$T/err" &&
   grep -q '^architecture: deepseek_v2, 3 layers' "$T/out" && grep -q 'q_lora_rank 24' "$T/out" &&
   grep -q 'yarn' "$T/out"; then
    pass inspect_prints_the_architecture
else fail inspect_prints_the_architecture "$(head -3 "$T/out")"; fi

if "$ESFT" inspect "$M/mistral" > "$T/out" 2> "$T/err" &&
   grep -q '^architecture: mistral, 2 layers (all dense, no MoE layer)' "$T/out" &&
   grep -q '^sliding window: 8' "$T/out" && grep -q '^experts: none (dense model' "$T/out"; then
    pass inspect_dense_model
else fail inspect_dense_model "$(head -5 "$T/out")"; fi

# Fused 3-D experts: extract then merge the unchanged experts back gives the
# base file byte for byte; the merged directory evaluates like the base.
printf '{"experts": {"0": [1, 6], "1": [3]}, "shared_experts": false, "non_expert_modules": false}\n' > "$T/fcfg.json"
if "$ESFT" extract "$M/qwen2_moe_fused" --config "$T/fcfg.json" -o "$T/fused_ex.safetensors" -q > "$T/out" 2> "$T/err" &&
   "$ESFT" inspect "$T/fused_ex.safetensors" > "$T/out" 2> "$T/err" &&
   [ "$(grep -c 'mlp.experts.[0-9]*.\(gate\|up\|down\)_proj.weight' "$T/out")" -eq 9 ] &&
   "$ESFT" merge "$M/qwen2_moe_fused" "$T/fused_ex.safetensors" -o "$T/fused_merged" -q > "$T/out" 2> "$T/err" &&
   cmp -s "$M/qwen2_moe_fused/model.safetensors" "$T/fused_merged/model.safetensors"; then
    pass fused_extract_merge_round_trip_is_byte_identical
else fail fused_extract_merge_round_trip_is_byte_identical "$(head -3 "$T/out")"; fi
if "$ESFT" inspect "$M/qwen2_moe_fused" > "$T/out" 2> "$T/err" && grep -q '^expert layout: fused 3-D' "$T/out" &&
   grep -q '^  layer 1 experts: 0-7 (8)' "$T/out"; then
    pass inspect_shows_the_fused_layout
else fail inspect_shows_the_fused_layout "$(grep -i expert "$T/out" | head -3)"; fi

# ---- failures: exit 1 (runtime) / 2 (usage), nothing on stdout, no output file ----
expect_fail() {
    name=$1; code=$2; out=$3; shift 3
    "$ESFT" "$@" > "$T/out" 2> "$T/err"; rc=$?
    if [ "$rc" -ne "$code" ]; then fail "$name" "exit $rc, expected $code"
    elif [ -s "$T/out" ]; then fail "$name" "output on stdout"
    elif [ ! -s "$T/err" ]; then fail "$name" "no message on stderr"
    elif [ -n "$out" ] && ls "$out"* > /dev/null 2>&1; then fail "$name" "$out written"
    else pass "$name"; fi
}
printf '{"input_ids": [1, 2, 999999]}\n' > "$T/range.jsonl"
printf '{"input_ids": [1, 2,\n' > "$T/bad.jsonl"
expect_fail eval_id_past_vocab_exit_1 1 "$T/x.npy" eval "$M/olmoe" --data "$T/range.jsonl" --logits "$T/x.npy"
expect_fail eval_bad_jsonl_exit_1 1 "$T/x.npy" eval "$M/olmoe" --data "$T/bad.jsonl" --logits "$T/x.npy"
expect_fail eval_missing_model_exit_1 1 "" eval "$T/nothing" --data "$M/olmoe/data.jsonl"
expect_fail eval_without_data_exit_2 2 "" eval "$M/olmoe"
expect_fail stats_model_bad_jsonl_exit_1 1 "$T/s.json" stats "$M/olmoe" --data "$T/bad.jsonl" -o "$T/s.json"
# a dense model has no router: nothing to score or train, said before any weight loads
expect_fail stats_dense_model_exit_1 1 "$T/d.json" stats "$M/llama" --data "$M/llama/data.jsonl" -o "$T/d.json"
if grep -q 'no MoE layer' "$T/err"; then pass stats_dense_model_says_why
else fail stats_dense_model_says_why "$(cat "$T/err")"; fi
printf '{"experts": {}, "shared_experts": false, "non_expert_modules": false}\n' > "$T/empty.json"
expect_fail train_dense_model_exit_1 1 "$T/d.safetensors" train "$M/qwen2" --data "$M/qwen2/data.jsonl" \
    --expert-config "$T/empty.json" --steps 1 --batch-tokens 64 -o "$T/d.safetensors"
if "$ESFT" eval --help > "$T/out" 2> "$T/err" && grep -q '^usage: esft eval' "$T/out"; then pass eval_help
else fail eval_help "no usage on stdout"; fi

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
