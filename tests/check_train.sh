#!/bin/sh
# `esft train --method esft` on the tiny checkpoints of tests/models/: a short
# run at lr 1e-3 lowers the loss, writes exactly the config's experts (with the
# config in the metadata), repeats bit for bit for one --seed, merges back into
# a checkpoint that `esft eval` scores below the base; the schedule and eval
# lines of the log; bad input exits 1 (runtime) or 2 (usage) before any step,
# with no output or log written. Needs only python3's standard library.
# Run by tests/run_all.sh with BUILD set.
BUILD=${BUILD:-build}
PYTHON=${PYTHON:-python3}
ESFT=$BUILD/esft
M=tests/models
T=$BUILD/check_train
rm -rf "$T"; mkdir -p "$T"
passed=0; failed=0; skipped=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; [ -s "$T/err" ] && sed 's/^/     /' "$T/err" | head -5; failed=$((failed + 1)); }

if [ ! -x "$ESFT" ]; then
    echo "FAIL setup: need $ESFT (run make test)"; echo "0 passed, 1 failed, 0 skipped"; exit 1
fi

# field LOG STEP KEY -> the value of KEY on the log line of step STEP ("last": the last line)
field() {
    "$PYTHON" - "$@" <<'PY'
import sys, json
lines = [json.loads(l) for l in open(sys.argv[1])]
row = lines[-1] if sys.argv[2] == "last" else lines[int(sys.argv[2]) - 1]
print(repr(row.get(sys.argv[3], "absent")))
PY
}
# lt A B: A < B as numbers
lt() { "$PYTHON" -c "import sys; sys.exit(not (float('$1') < float('$2')))"; }
near() { "$PYTHON" -c "import sys; sys.exit(abs(float('$1') - float('$2')) > 1e-7 * max(1, abs(float('$2'))))"; }

# hf_loss DIR DATA [ADAPTER_DIR] -> transformers' (and PEFT's) pooled mean loss over DATA
hf_loss() {
    "$PYTHON" - "$@" 2> "$T/err" <<'PY'
import sys, json, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
if len(sys.argv) > 3:
    import peft
    m = peft.PeftModel.from_pretrained(m, sys.argv[3]).eval()
total, n = 0.0, 0
with torch.no_grad():
    for line in open(sys.argv[2]):
        s = json.loads(line)
        ids = s["input_ids"]; lab = s.get("labels", ids)
        logits = m(input_ids=torch.tensor([ids])).logits[0]
        t = torch.tensor(lab[1:])
        total += float(torch.nn.functional.cross_entropy(logits[:-1], t, ignore_index=-100, reduction="sum"))
        n += int((t != -100).sum())
print(repr(total / n))
PY
}
# near_hf A B: within 1e-4 relative (torch against esft); the values in $T/err when not
near_hf() { "$PYTHON" -c "import sys; sys.exit(not abs(float('$1') - float('$2')) <= 1e-4 * abs(float('$2')))" 2>> "$T/err" ||
    { echo "transformers $1, esft $2" >> "$T/err"; return 1; }; }

# holds FILE CONFIG -> 0 when FILE's tensors are exactly the gate/up/down of
# CONFIG's experts and its metadata carries CONFIG (safetensors header: JSON)
holds() {
    "$PYTHON" - "$1" "$2" > "$T/err" 2>&1 <<'PY'
import sys, json, struct, re
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    head = json.loads(f.read(n))
cfg = json.load(open(sys.argv[2]))
meta = json.loads(head.pop("__metadata__")["esft_expert_config"])
assert meta["experts"] == cfg["experts"], (meta, cfg)
got = sorted(head)
want = sorted("model.layers.%s.mlp.experts.%d.%s_proj.weight" % (l, e, w)
              for l, es in cfg["experts"].items() for e in es for w in ("gate", "up", "down"))
assert got == want, (got, want)
PY
}

# ---- a run per model: loss goes down, the file holds the config's experts ----
for v in olmoe qwen2_moe_fused; do
    "$ESFT" stats "$M/$v" --data "$M/$v/data.jsonl" -o "$T/$v.sum.json" -q > /dev/null 2>&1 &&
        "$ESFT" select "$T/$v.sum.json" --top-k 1 -o "$T/$v.cfg.json" -q > /dev/null 2>&1 ||
        { fail "train_$v" "could not make a config"; continue; }
    run="train $M/$v --data $M/$v/data.jsonl --method esft --expert-config $T/$v.cfg.json --steps 12 --batch-tokens 40 --lr 1e-3 --seed 7"
    if ! "$ESFT" $run -o "$T/$v.out.safetensors" --log "$T/$v.log" -q > "$T/out" 2> "$T/err"; then
        fail "train_$v" "exit $?"; continue; fi
    pass "train_$v"
    first=$(field "$T/$v.log" 1 loss); last=$(field "$T/$v.log" last loss)
    if [ "$(wc -l < "$T/$v.log")" -eq 12 ] && lt "$last" "$first"; then pass "train_${v}_loss_decreases"
    else fail "train_${v}_loss_decreases" "step 1 $first, last $last"; fi
    if holds "$T/$v.out.safetensors" "$T/$v.cfg.json"; then pass "train_${v}_file_holds_exactly_the_config"
    else fail "train_${v}_file_holds_exactly_the_config" "see above"; fi
    "$ESFT" $run -o "$T/$v.again.safetensors" --log "$T/$v.again.log" -q > "$T/out" 2> "$T/err"
    if cmp -s "$T/$v.log" "$T/$v.again.log" && cmp -s "$T/$v.out.safetensors" "$T/$v.again.safetensors"; then
        pass "train_${v}_same_seed_same_bytes"
    else fail "train_${v}_same_seed_same_bytes" "log or output differs"; fi
    # merge writes the weights; the model's config.json is copied as for any checkpoint
    if "$ESFT" merge "$M/$v" "$T/$v.out.safetensors" -o "$T/$v.merged" -q > "$T/out" 2> "$T/err" &&
       cp "$M/$v/config.json" "$T/$v.merged/" &&
       base=$("$ESFT" eval "$M/$v" --data "$M/$v/data.jsonl" -q | cut -d' ' -f2) &&
       tuned=$("$ESFT" eval "$T/$v.merged" --data "$M/$v/data.jsonl" -q | cut -d' ' -f2) && lt "$tuned" "$base"; then
        pass "train_${v}_merged_checkpoint_evaluates_lower"
    else fail "train_${v}_merged_checkpoint_evaluates_lower" "base $base, merged $tuned"; fi
done

# The first step's batch of all 3 samples (55 scored tokens) has esft eval's loss.
O="$M/olmoe"; C="$T/olmoe.cfg.json"
if "$ESFT" train "$O" --data "$O/data.jsonl" --expert-config "$C" --steps 1 --batch-tokens 55 -o "$T/one.safetensors" \
        --log "$T/one.log" -q > "$T/out" 2> "$T/err" &&
   near "$(field "$T/one.log" 1 loss)" "$("$ESFT" eval "$O" --data "$O/data.jsonl" -q | cut -d' ' -f2)" &&
   [ "$(field "$T/one.log" 1 tokens)" = 55 ]; then
    pass train_first_batch_loss_is_eval_loss
else fail train_first_batch_loss_is_eval_loss "$(cat "$T/one.log")"; fi

# Schedule: warm-up 4 of 8 reaches lr at step 4; cosine then falls, never to 0.
if "$ESFT" train "$O" --data "$O/data.jsonl" --expert-config "$C" --steps 8 --batch-tokens 10 --lr 1e-3 --warmup 4 \
        --schedule cosine -o "$T/cos.safetensors" --log "$T/cos.log" -q > "$T/out" 2> "$T/err" &&
   near "$(field "$T/cos.log" 1 lr)" 2.5e-4 && near "$(field "$T/cos.log" 4 lr)" 1e-3 &&
   near "$(field "$T/cos.log" 5 lr)" 1e-3 && lt "$(field "$T/cos.log" 8 lr)" "$(field "$T/cos.log" 7 lr)" &&
   lt 0 "$(field "$T/cos.log" 8 lr)"; then
    pass train_warmup_then_cosine
else fail train_warmup_then_cosine "$(cut -c1-60 "$T/cos.log" | tr '\n' ' ')"; fi

# --eval-data/--eval-every: eval_loss on steps 2 and 4 only, and it falls.
if "$ESFT" train "$O" --data "$O/data.jsonl" --expert-config "$C" --steps 4 --batch-tokens 40 --lr 1e-3 --eval-data "$O/data.jsonl" \
        --eval-every 2 -o "$T/ev.safetensors" --log "$T/ev.log" -q > "$T/out" 2> "$T/err" &&
   [ "$(field "$T/ev.log" 1 eval_loss)" = "'absent'" ] && [ "$(field "$T/ev.log" 3 eval_loss)" = "'absent'" ] &&
   lt "$(field "$T/ev.log" 4 eval_loss)" "$(field "$T/ev.log" 2 eval_loss)"; then
    pass train_eval_every
else fail train_eval_every "$(cat "$T/ev.log")"; fi

# --state/--resume: 7 steps straight, or 3 (state saved at 2 and 3) and then
# --resume for steps 4..7, give the same log lines and the same output bytes.
# 2 samples a step over 3 samples: the stop falls inside an epoch of the order.
run="train $O --data $O/data.jsonl --expert-config $C --batch-tokens 20 --lr 1e-3 --warmup 2 --seed 5 -q"
if "$ESFT" $run --steps 7 -o "$T/full.safetensors" --log "$T/full.log" > "$T/out" 2> "$T/err" &&
   "$ESFT" $run --steps 3 -o "$T/part.safetensors" --state "$T/state.safetensors" --state-every 2 > "$T/out" 2> "$T/err" &&
   "$ESFT" $run --steps 7 --resume "$T/state.safetensors" --state "$T/state.safetensors" -o "$T/rest.safetensors" \
        --log "$T/rest.log" > "$T/out" 2> "$T/err" &&
   tail -n 4 "$T/full.log" | cmp -s - "$T/rest.log" && cmp -s "$T/full.safetensors" "$T/rest.safetensors"; then
    pass train_resume_equals_an_uninterrupted_run
else fail train_resume_equals_an_uninterrupted_run "$(head -2 "$T/rest.log" 2>/dev/null)"; fi
if "$ESFT" $run --steps 7 --resume "$T/state.safetensors" -o "$T/x.safetensors" > "$T/out" 2> "$T/err"; [ $? -eq 1 ] &&
   grep -q 'at step 7' "$T/err" && [ ! -e "$T/x.safetensors" ]; then
    pass train_resume_a_finished_state_exit_1
else fail train_resume_a_finished_state_exit_1 "$(head -1 "$T/err")"; fi

# ---- fft and lora: the loss falls, the files are what they say, resume ----
# fft: every weight in the file (the checkpoint's names), merged it evaluates as
# the run's last eval; lora: PEFT's two files, and (with peft installed) PEFT
# loading them onto the transformers model gives esft's eval loss.
for v in olmoe llama; do
    D="$M/$v"
    run="train $D --data $D/data.jsonl --steps 8 --batch-tokens 40 --lr 1e-3 --warmup 0 --seed 3 --eval-data $D/data.jsonl -q"
    if "$ESFT" $run --method fft -o "$T/$v.fft.safetensors" --log "$T/$v.fft.log" > "$T/out" 2> "$T/err" &&
       lt "$(field "$T/$v.fft.log" last loss)" "$(field "$T/$v.fft.log" 1 loss)"; then pass "train_fft_${v}_loss_decreases"
    else fail "train_fft_${v}_loss_decreases" "$(tail -1 "$T/$v.fft.log" 2>/dev/null)"; fi
    if "$PYTHON" - "$T/$v.fft.safetensors" "$D" > "$T/err" 2>&1 <<'PY'
import sys, json, struct, os
def names(p):
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return set(h)
d = sys.argv[2]
base = set()
for f in os.listdir(d):
    if f.endswith(".safetensors") and f.startswith("model"):  # the checkpoint, not goldens or PESC starts
        base |= names(os.path.join(d, f))
got = names(sys.argv[1])
assert got == base, (sorted(base - got)[:5], sorted(got - base)[:5])
PY
    then pass "train_fft_${v}_file_holds_every_weight"; else fail "train_fft_${v}_file_holds_every_weight" "see above"; fi
    # base + file (unmerged) and the merged checkpoint hold the same values, the
    # run's fp32 ones rounded to the file dtype: equal to the run's eval only
    # for an fp32 checkpoint (olmoe; llama is bf16)
    unmerged=$("$ESFT" eval "$D" --trained "$T/$v.fft.safetensors" --data "$D/data.jsonl" -q | cut -d' ' -f2)
    if [ $v = llama ] || near "$unmerged" "$(field "$T/$v.fft.log" last eval_loss)"; then
        pass "train_fft_${v}_base_plus_file_evaluates_as_the_run"
    else fail "train_fft_${v}_base_plus_file_evaluates_as_the_run" "$unmerged vs $(field "$T/$v.fft.log" last eval_loss)"; fi
    if "$ESFT" merge "$D" "$T/$v.fft.safetensors" -o "$T/$v.fft.merged" -q > "$T/out" 2> "$T/err" &&
       cmp -s "$D/config.json" "$T/$v.fft.merged/config.json" &&
       merged=$("$ESFT" eval "$T/$v.fft.merged" --data "$D/data.jsonl" -q | cut -d' ' -f2) &&
       near "$merged" "$unmerged" && lt "$merged" "$(field "$T/$v.fft.log" 1 loss)"; then
        pass "train_fft_${v}_merged_evaluates_as_base_plus_file"
    else fail "train_fft_${v}_merged_evaluates_as_base_plus_file" "merged $merged, unmerged $unmerged"; fi
    # merge copied config.json (and the rest a loader needs): transformers loads the result
    if ! "$PYTHON" -c "import transformers, torch" 2> /dev/null; then
        echo "SKIP train_fft_${v}_merged_loads_in_transformers: needs torch and transformers"; skipped=$((skipped + 1))
    elif near_hf "$(hf_loss "$T/$v.fft.merged" "$D/data.jsonl")" "$merged"; then
        pass "train_fft_${v}_merged_loads_in_transformers"; else fail "train_fft_${v}_merged_loads_in_transformers" "see above"; fi
    if "$ESFT" $run --method lora --lora-rank 4 --lora-alpha 8 --lora-targets attn,mlp -o "$T/$v.lora" \
            --log "$T/$v.lora.log" > "$T/out" 2> "$T/err" &&
       [ -s "$T/$v.lora/adapter_model.safetensors" ] && [ -s "$T/$v.lora/adapter_config.json" ] &&
       lt "$(field "$T/$v.lora.log" last loss)" "$(field "$T/$v.lora.log" 1 loss)"; then pass "train_lora_${v}_loss_decreases"
    else fail "train_lora_${v}_loss_decreases" "$(tail -1 "$T/$v.lora.log" 2>/dev/null)"; fi
    if ! "$PYTHON" -c "import peft, transformers, torch" 2> /dev/null; then
        echo "SKIP train_lora_${v}_loads_in_peft: needs torch, transformers and peft (pip install peft)"
        skipped=$((skipped + 1))
    elif near_hf "$(hf_loss "$D" "$D/data.jsonl" "$T/$v.lora")" "$(field "$T/$v.lora.log" last eval_loss)"; then
        pass "train_lora_${v}_loads_in_peft"; else fail "train_lora_${v}_loads_in_peft" "see above"; fi
    adapted=$("$ESFT" eval "$D" --adapter "$T/$v.lora" --data "$D/data.jsonl" -q | cut -d' ' -f2)
    if near "$adapted" "$(field "$T/$v.lora.log" last eval_loss)"; then pass "train_lora_${v}_eval_with_the_adapter"
    else fail "train_lora_${v}_eval_with_the_adapter" "$adapted vs $(field "$T/$v.lora.log" last eval_loss)"; fi
done
# pesc on the dense llama: the loss falls, the file holds Camelidae's names and
# the adapter config, base + file evaluates as the run's last eval
D="$M/llama"
if "$ESFT" train "$D" --data "$D/data.jsonl" --method pesc --pesc-rank 8 --pesc-scale 1 --steps 8 --batch-tokens 40 \
        --lr 1e-2 --warmup 0 --eval-data "$D/data.jsonl" -o "$T/pesc.safetensors" --log "$T/pesc.log" -q > "$T/out" 2> "$T/err" &&
   lt "$(field "$T/pesc.log" last loss)" "$(field "$T/pesc.log" 1 loss)" && [ "$(field "$T/pesc.log" 1 aux_loss)" != "'absent'" ]; then
    pass train_pesc_llama_loss_decreases
else fail train_pesc_llama_loss_decreases "$(tail -1 "$T/pesc.log" 2>/dev/null)"; fi
if "$PYTHON" - "$T/pesc.safetensors" > "$T/err" 2>&1 <<'PY'
import sys, json, struct
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    h = json.loads(f.read(n))
meta = h.pop("__metadata__")
assert meta["pesc_n_experts"] == "8" and meta["pesc_top_k"] == "2" and meta["pesc_rank"] == "8", meta
want = {"model.layers.%d.mlp.moe_adapter.router.weight" % l for l in (0, 1)}
want |= {"model.layers.%d.mlp.moe_adapter.experts.expert_%d.adapter_%s.weight" % (l, e, w)
         for l in (0, 1) for e in range(8) for w in ("down", "up")}
assert set(h) == want, sorted(set(h) ^ want)[:4]
PY
then pass train_pesc_file_holds_camelidae_names; else fail train_pesc_file_holds_camelidae_names "see above"; fi
if near "$("$ESFT" eval "$D" --trained "$T/pesc.safetensors" --data "$D/data.jsonl" -q | cut -d' ' -f2)" \
        "$(field "$T/pesc.log" last eval_loss)"; then pass train_pesc_base_plus_file_evaluates_as_the_run
else fail train_pesc_base_plus_file_evaluates_as_the_run "$(field "$T/pesc.log" last eval_loss)"; fi

# lora on the routed experts too (olmoe): the loss falls, the file holds an A and
# a B for every expert's gate/up/down, eval --adapter gives the run's last eval
if "$ESFT" train "$O" --data "$O/data.jsonl" --method lora --lora-rank 2 --lora-targets attn,experts --steps 6 \
        --batch-tokens 40 --lr 1e-2 --warmup 0 --eval-data "$O/data.jsonl" -o "$T/lx" --log "$T/lx.log" -q \
        > "$T/out" 2> "$T/err" &&
   lt "$(field "$T/lx.log" last loss)" "$(field "$T/lx.log" 1 loss)" &&
   [ "$("$PYTHON" -c "
import json, struct
f = open('$T/lx/adapter_model.safetensors', 'rb'); n = struct.unpack('<Q', f.read(8))[0]
print(sum('.experts.' in k for k in json.loads(f.read(n))))")" = 96 ] &&
   near "$("$ESFT" eval "$O" --adapter "$T/lx" --data "$O/data.jsonl" -q | cut -d' ' -f2)" "$(field "$T/lx.log" last eval_loss)"; then
    pass train_lora_on_experts
else fail train_lora_on_experts "$(tail -1 "$T/lx.log" 2>/dev/null)"; fi

# resume equals uninterrupted for fft and lora too
for meth in fft lora; do
    run="train $O --data $O/data.jsonl --method $meth --batch-tokens 20 --lr 1e-3 --warmup 2 --seed 5 -q"
    out="$T/r.$meth"; [ $meth = fft ] && out="$T/r.$meth.safetensors"
    if "$ESFT" $run --steps 5 -o "$out.full" --log "$T/r.$meth.full.log" > "$T/out" 2> "$T/err" &&
       "$ESFT" $run --steps 2 -o "$out.part" --state "$T/r.$meth.state" > "$T/out" 2> "$T/err" &&
       "$ESFT" $run --steps 5 --resume "$T/r.$meth.state" -o "$out.rest" --log "$T/r.$meth.rest.log" > "$T/out" 2> "$T/err" &&
       tail -n 3 "$T/r.$meth.full.log" | cmp -s - "$T/r.$meth.rest.log"; then
        pass "train_${meth}_resume_equals_an_uninterrupted_run"
    else fail "train_${meth}_resume_equals_an_uninterrupted_run" "$(head -1 "$T/r.$meth.rest.log" 2>/dev/null)"; fi
done
if "$ESFT" train "$O" --data "$O/data.jsonl" --method lora --batch-tokens 20 --seed 5 --steps 5 --resume "$T/r.fft.state" \
        -o "$T/x.lora" -q > "$T/out" 2> "$T/err"; [ $? -eq 1 ] && grep -q 'trains something else' "$T/err" && [ ! -e "$T/x.lora" ]; then
    pass train_resume_another_method_exit_1
else fail train_resume_another_method_exit_1 "$(head -1 "$T/err")"; fi

# ---- failures: exit 1 (runtime) / 2 (usage), nothing on stdout, no output or log ----
expect_fail() {
    name=$1; code=$2; shift 2
    rm -f "$T/x.safetensors"* "$T/x.log"*
    "$ESFT" "$@" > "$T/out" 2> "$T/err"; rc=$?
    if [ "$rc" -ne "$code" ]; then fail "$name" "exit $rc, expected $code"
    elif [ -s "$T/out" ]; then fail "$name" "output on stdout"
    elif [ ! -s "$T/err" ]; then fail "$name" "no message on stderr"
    elif ls "$T/x.safetensors"* "$T/x.log"* > /dev/null 2>&1; then fail "$name" "output or log written"
    else pass "$name"; fi
}
ok="--expert-config $C --steps 2 --batch-tokens 40 -o $T/x.safetensors --log $T/x.log"
printf '{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}\n{"input_ids": [4]}\n' > "$T/unscored.jsonl"
: > "$T/empty.jsonl"
printf '{"experts": {"0": [99]}, "shared_experts": false, "non_expert_modules": false}\n' > "$T/bad_id.json"
printf '{"experts": {"5": [1]}, "shared_experts": false, "non_expert_modules": false}\n' > "$T/bad_layer.json"
printf '{"experts": {"0": [1, 2]}, "shared_experts": false, "non_expert_modules": false}\n' > "$T/olmoe2.cfg.json"
expect_fail train_every_label_ignored_exit_1 1 train "$O" --data "$T/unscored.jsonl" $ok
expect_fail train_empty_data_exit_1 1 train "$O" --data "$T/empty.jsonl" $ok
expect_fail train_missing_data_exit_1 1 train "$O" --data "$T/nothing.jsonl" $ok
expect_fail train_expert_past_E_exit_1 1 train "$O" --data "$O/data.jsonl" $ok --expert-config "$T/bad_id.json"
expect_fail train_layer_past_L_exit_1 1 train "$O" --data "$O/data.jsonl" $ok --expert-config "$T/bad_layer.json"
expect_fail train_bad_eval_data_exit_1 1 train "$O" --data "$O/data.jsonl" $ok --eval-data "$T/nothing.jsonl"
expect_fail train_unscored_eval_data_exit_1 1 train "$O" --data "$O/data.jsonl" $ok --eval-data "$T/unscored.jsonl"
expect_fail train_steps_0_exit_2 2 train "$O" --data "$O/data.jsonl" $ok --steps 0
expect_fail train_batch_tokens_0_exit_2 2 train "$O" --data "$O/data.jsonl" $ok --batch-tokens 0
expect_fail train_lr_nan_exit_2 2 train "$O" --data "$O/data.jsonl" $ok --lr nan
expect_fail train_lr_inf_exit_2 2 train "$O" --data "$O/data.jsonl" $ok --lr inf
expect_fail train_lr_0_exit_2 2 train "$O" --data "$O/data.jsonl" $ok --lr 0
expect_fail train_clip_negative_exit_2 2 train "$O" --data "$O/data.jsonl" $ok --clip -1
expect_fail train_bad_schedule_exit_2 2 train "$O" --data "$O/data.jsonl" $ok --schedule linear
expect_fail train_eval_every_without_data_exit_2 2 train "$O" --data "$O/data.jsonl" $ok --eval-every 2
expect_fail train_resume_other_seed_exit_1 1 train "$O" --data "$O/data.jsonl" $ok --resume "$T/state.safetensors" --steps 9
expect_fail train_resume_other_config_exit_1 1 train "$O" --data "$O/data.jsonl" $ok --resume "$T/state.safetensors" --seed 5 \
    --steps 9 --expert-config "$T/olmoe2.cfg.json"
expect_fail train_resume_not_a_state_exit_1 1 train "$O" --data "$O/data.jsonl" $ok --resume "$O/model.safetensors"
expect_fail train_state_every_without_state_exit_2 2 train "$O" --data "$O/data.jsonl" $ok --state-every 2
expect_fail train_lora_with_expert_config_exit_2 2 train "$O" --data "$O/data.jsonl" $ok --method lora
expect_fail train_lora_options_without_lora_exit_2 2 train "$O" --data "$O/data.jsonl" $ok --lora-rank 4
expect_fail train_lora_bad_target_exit_2 2 train "$O" --data "$O/data.jsonl" --method lora --lora-targets qkv \
    --steps 1 --batch-tokens 4 -o "$T/x.safetensors"
expect_fail train_lora_rank_0_exit_2 2 train "$O" --data "$O/data.jsonl" --method lora --lora-rank 0 \
    --steps 1 --batch-tokens 4 -o "$T/x.safetensors"
expect_fail train_pesc_options_without_pesc_exit_2 2 train "$O" --data "$O/data.jsonl" $ok --pesc-rank 4
expect_fail train_pesc_top_k_past_experts_exit_2 2 train "$M/llama" --data "$O/data.jsonl" --method pesc --pesc-experts 2 \
    --pesc-top-k 3 --steps 1 --batch-tokens 4 -o "$T/x.safetensors"
expect_fail train_pesc_without_a_dense_layer_exit_1 1 train "$M/mixtral" --data "$M/mixtral/data.jsonl" --method pesc \
    --steps 1 --batch-tokens 4 -o "$T/x.safetensors"
expect_fail train_micro_batch_below_a_sample_exit_1 1 train "$O" --data "$O/data.jsonl" $ok --micro-batch-tokens 4
expect_fail train_resume_other_lr_exit_1 1 train "$O" --data "$O/data.jsonl" $ok --resume "$T/state.safetensors" --seed 5 \
    --steps 9 --batch-tokens 20 --warmup 2 --lr 2e-3
cp "$O/data.jsonl" "$T/data_other.jsonl"; echo '{"input_ids": [5, 6, 7, 8]}' >> "$T/data_other.jsonl"
expect_fail train_resume_other_data_exit_1 1 train "$O" --data "$T/data_other.jsonl" $ok --resume "$T/state.safetensors" \
    --seed 5 --steps 9 --batch-tokens 20 --warmup 2 --lr 1e-3
expect_fail train_without_steps_exit_2 2 train "$O" --data "$O/data.jsonl" --expert-config "$C" --batch-tokens 4 -o "$T/x.safetensors"
cp "$O/data.jsonl" "$T/data_copy.jsonl"
expect_fail train_output_is_the_data_exit_2 2 train "$O" --data "$T/data_copy.jsonl" --expert-config "$C" --steps 1 \
    --batch-tokens 4 -o "$T/data_copy.jsonl"
if cmp -s "$O/data.jsonl" "$T/data_copy.jsonl"; then pass train_output_is_the_data_leaves_it
else fail train_output_is_the_data_leaves_it "the data file changed"; fi
expect_fail train_log_is_the_config_exit_2 2 train "$O" --data "$O/data.jsonl" --expert-config "$C" --steps 1 \
    --batch-tokens 4 -o "$T/x.safetensors" --log "$C"
"$ESFT" train "$O" --data "$O/data.jsonl" $ok --method qlora > "$T/out" 2> "$T/err"
if grep -q 'expects esft, fft, lora or pesc' "$T/err"; then pass train_unknown_method_lists_the_methods
else fail train_unknown_method_lists_the_methods "$(head -1 "$T/err")"; fi
if "$ESFT" train --help > "$T/out" 2> "$T/err" && grep -q '^usage: esft train' "$T/out"; then pass train_help
else fail train_help "no usage on stdout"; fi

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
