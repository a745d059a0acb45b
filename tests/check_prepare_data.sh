#!/bin/sh
# examples/prepare_data.py end to end: --byte-level on a few records of data/text
# (train and eval format): ids are the UTF-8 bytes of ESFT's formatting, the prompt is
# -100 and the response scored, labels align with input_ids, the stderr summary agrees
# with the file; --max-length / --truncate / --max-samples / --max-tokens / --shuffle;
# exit codes (0 / 1 bad input / 2 usage), file:line in messages, nothing written on
# failure. With transformers + tokenizers importable it also trains a tiny BPE tokenizer
# in a temp dir and checks the chat-template path and ESFT's own formatting (BOS, EOS);
# otherwise that part is SKIPped with the reason. Run by tests/run_all.sh with BUILD set.
BUILD=${BUILD:-build}
PYTHON=${PYTHON:-python3}
PREP=examples/prepare_data.py
T=$BUILD/check_prepare_data
rm -rf "$T"; mkdir -p "$T"
passed=0; failed=0; skipped=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; [ -s "$T/err" ] && sed 's/^/     /' "$T/err" | head -5; failed=$((failed + 1)); }
skip() { echo "SKIP $1: $2"; skipped=$((skipped + 1)); }
finish() { echo "$passed passed, $failed failed, $skipped skipped"; [ "$failed" -eq 0 ]; exit $?; }

# temp_left PATH: a temp file of PATH ("PATH.tmp.<pid>") is on disk
temp_left() { for f in "$1".tmp*; do [ -e "$f" ] && return 0; done; return 1; }

# expect NAME CODE [OUTPUT-THAT-MUST-NOT-EXIST] -- prepare_data args...
expect() {
    name=$1; code=$2; shift 2; must_not=""
    if [ "$1" != "--" ]; then must_not=$1; shift; fi
    shift
    "$PYTHON" "$PREP" "$@" > "$T/out" 2> "$T/err"; rc=$?
    if [ "$rc" -ne "$code" ]; then fail "$name" "exit $rc, expected $code"; return 1; fi
    if [ -n "$must_not" ] && { [ -e "$must_not" ] || temp_left "$must_not"; }; then
        fail "$name" "$must_not was written although the command failed"; return 1; fi
    if [ "$code" -ne 0 ] && [ ! -s "$T/err" ]; then fail "$name" "no message on stderr"; return 1; fi
    pass "$name"
}

if ! "$PYTHON" -c 'import json, argparse' 2>/dev/null; then
    skip all "no $PYTHON: examples/prepare_data.py is a Python script"; finish
fi

# A few records of each input format.
head -n 3 data/text/intent.train.jsonl > "$T/train.jsonl"
head -n 2 data/text/law.train.jsonl >> "$T/train.jsonl"
head -n 2 data/text/translation.eval.jsonl > "$T/eval.jsonl"
cat "$T/train.jsonl" "$T/eval.jsonl" > "$T/both.jsonl"

# verify OUT.jsonl INPUT.jsonl: each output line is the byte-level conversion of the
# matching input record, and the stderr summary ($T/err) counts what the file holds.
verify_bytes() {
    "$PYTHON" - "$1" "$2" "$T/err" <<'PY'
import json, re, sys
out = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8")]
src = [json.loads(l) for l in open(sys.argv[2], encoding="utf-8") if l.strip()]
assert len(out) == len(src), (len(out), len(src))
tokens = scored = 0
for n, (o, r) in enumerate(zip(out, src)):
    assert set(o) == {"input_ids", "labels"}, o.keys()
    ids, lab = o["input_ids"], o["labels"]
    assert len(ids) == len(lab), (n, len(ids), len(lab))
    assert all(isinstance(i, int) and 0 <= i <= 255 for i in ids), n
    assert all(l == -100 or l == i for i, l in zip(ids, lab)), f"{n}: a label is neither -100 nor its id"
    if "messages" in r:
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        prompt = "User: " + q.strip() + "\n\nAssistant:"
    else:
        prompt, a = r["prompt"], r["answers"][0]
    answer = " " + a.strip()
    text = bytes(ids).decode("utf-8")
    assert text == prompt + answer, f"{n}: text differs: {text[:80]!r}"
    k = len(prompt.encode("utf-8"))
    assert lab[:k] == [-100] * k, f"{n}: prompt not fully masked"
    assert lab[k:] == ids[k:], f"{n}: response not fully scored"
    tokens += len(ids); scored += sum(1 for l in lab[1:] if l != -100)
m = re.search(r"(\d+) samples, (\d+) tokens, (\d+) scored tokens", open(sys.argv[3]).read())
assert m, "no summary line on stderr"
assert tuple(map(int, m.groups())) == (len(out), tokens, scored), (m.groups(), len(out), tokens, scored)
PY
}

# ---- byte-level: the conversion itself ----
expect byte_level_train 0 -- --byte-level --max-length 0 "$T/train.jsonl" -o "$T/train.out.jsonl"
if verify_bytes "$T/train.out.jsonl" "$T/train.jsonl" > "$T/err2" 2>&1; then pass byte_level_train_bytes_masking_summary
else cp "$T/err2" "$T/err"; fail byte_level_train_bytes_masking_summary "see above"; fi
expect byte_level_eval 0 -- --byte-level --max-length 0 "$T/eval.jsonl" -o "$T/eval.out.jsonl"
if verify_bytes "$T/eval.out.jsonl" "$T/eval.jsonl" > "$T/err2" 2>&1; then pass byte_level_eval_bytes_masking_summary
else cp "$T/err2" "$T/err"; fail byte_level_eval_bytes_masking_summary "see above"; fi
[ -s "$T/out" ] && fail summary_not_on_stdout "stdout not empty" || pass summary_not_on_stdout
expect byte_level_both_files 0 -- --byte-level --max-length 0 "$T/train.jsonl" "$T/eval.jsonl" -o "$T/both.out.jsonl"
if cat "$T/train.out.jsonl" "$T/eval.out.jsonl" | cmp -s - "$T/both.out.jsonl"; then pass inputs_read_in_order
else fail inputs_read_in_order "two inputs differ from the two outputs concatenated"; fi

# ---- limits ----
expect max_samples 0 -- --byte-level "$T/both.jsonl" --max-samples 2 -o "$T/two.jsonl"
[ "$(wc -l < "$T/two.jsonl")" -eq 2 ] && head -n 2 "$T/both.out.jsonl" | cmp -s - "$T/two.jsonl" &&
    pass max_samples_first_two || fail max_samples_first_two "not the first two samples"
for how in left right drop; do
    expect "max_length_$how" 0 -- --byte-level "$T/both.jsonl" --max-length 300 --truncate $how -o "$T/cut_$how.jsonl"
done
if "$PYTHON" - "$T/both.out.jsonl" "$T/cut_left.jsonl" "$T/cut_right.jsonl" "$T/cut_drop.jsonl" > "$T/err" 2>&1 <<'PY'
import json, sys
full, left, right, drop = ([json.loads(l) for l in open(p)] for p in sys.argv[1:])
assert len(full) == len(left) == len(right)
for f, l, r in zip(full, left, right):
    for k in ("input_ids", "labels"):
        want_l = f[k][-300:] if len(f[k]) > 300 else f[k]
        want_r = f[k][:300] if len(f[k]) > 300 else f[k]
        assert l[k] == want_l and r[k] == want_r, k
assert drop == [f for f in full if len(f["input_ids"]) <= 300], "drop kept a long sample or lost a short one"
assert any(len(f["input_ids"]) > 300 for f in full) and any(len(f["input_ids"]) <= 300 for f in full)
PY
then pass truncate_left_right_drop; else fail truncate_left_right_drop "see above"; fi
# The default --max-length is ESFT's seq_length 4096: the two ~4.3 KB eval records keep their last 4096.
expect default_max_length_4096 0 -- --byte-level "$T/eval.jsonl" -o "$T/eval4096.jsonl"
if grep -q "2 truncated to 4096 (left)" "$T/err" && "$PYTHON" - "$T/eval.out.jsonl" "$T/eval4096.jsonl" > "$T/err" 2>&1 <<'PY'
import json, sys
full, cut = ([json.loads(l) for l in open(p)] for p in sys.argv[1:])
assert [o["input_ids"][-4096:] for o in full] == [o["input_ids"] for o in cut]
assert [o["labels"][-4096:] for o in full] == [o["labels"] for o in cut]
PY
then pass default_keeps_last_4096; else fail default_keeps_last_4096 "see above"; fi
expect max_tokens 0 -- --byte-level "$T/both.jsonl" --max-tokens 600 -o "$T/tok.jsonl"
if "$PYTHON" - "$T/tok.jsonl" > "$T/err" 2>&1 <<'PY'
import json, sys
n = [len(json.loads(l)["input_ids"]) for l in open(sys.argv[1])]
assert sum(n) >= 600 and sum(n) - n[-1] < 600, n  # ESFT: stop once done_tokens >= N
PY
then pass max_tokens_stops_after_crossing; else fail max_tokens_stops_after_crossing "see above"; fi
expect shuffle_a 0 -- --byte-level --max-length 0 "$T/both.jsonl" --shuffle 5934875 -o "$T/sh1.jsonl"
expect shuffle_b 0 -- --byte-level --max-length 0 "$T/both.jsonl" --shuffle 5934875 -o "$T/sh2.jsonl"
if cmp -s "$T/sh1.jsonl" "$T/sh2.jsonl" && ! cmp -s "$T/sh1.jsonl" "$T/both.out.jsonl" &&
   [ "$(sort "$T/sh1.jsonl" | cksum)" = "$(sort "$T/both.out.jsonl" | cksum)" ]; then pass shuffle_seeded_permutation
else fail shuffle_seeded_permutation "not a reproducible permutation"; fi

# ---- usage errors: exit 2, nothing written ----
expect no_tokenizer_nor_byte_level 2 "$T/u1.jsonl" -- "$T/train.jsonl" -o "$T/u1.jsonl"
expect no_output 2 -- --byte-level "$T/train.jsonl"
expect no_input 2 "$T/u2.jsonl" -- --byte-level -o "$T/u2.jsonl"
expect negative_max_length 2 "$T/u3.jsonl" -- --byte-level "$T/train.jsonl" --max-length -1 -o "$T/u3.jsonl"
expect format_with_byte_level 2 "$T/u4.jsonl" -- --byte-level --format chat "$T/train.jsonl" -o "$T/u4.jsonl"
expect help 0 -- --help
grep -q -- "--byte-level" "$T/out" && grep -q "^usage: prepare_data.py" "$T/out" && pass help_text || fail help_text "no usage"

# ---- bad input: exit 1, file:line named, nothing written ----
expect missing_input 1 "$T/r1.jsonl" -- --byte-level "$T/no-such.jsonl" -o "$T/r1.jsonl"
grep -q "no-such.jsonl" "$T/err" && pass missing_input_names_file || fail missing_input_names_file "file not named"
{ head -n 2 "$T/train.jsonl"; echo '{"messages": [{"role": "user", "content": "x"}'; } > "$T/badjson.jsonl"
expect malformed_json 1 "$T/r2.jsonl" -- --byte-level "$T/badjson.jsonl" -o "$T/r2.jsonl"
grep -q "badjson.jsonl:3:" "$T/err" && pass malformed_json_file_line || fail malformed_json_file_line "no file:3:"
{ head -n 1 "$T/train.jsonl"; echo; echo '{"text": "hello"}'; } > "$T/unknown.jsonl"
expect unknown_record 1 "$T/r3.jsonl" -- --byte-level "$T/unknown.jsonl" -o "$T/r3.jsonl"
grep -q "unknown.jsonl:3:" "$T/err" && pass unknown_record_line_counts_blank_lines || fail unknown_record_line_counts_blank_lines "no file:3:"
echo '{"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]}' > "$T/role.jsonl"
expect unknown_role 1 "$T/r4.jsonl" -- --byte-level "$T/role.jsonl" -o "$T/r4.jsonl"
echo '{"prompt": "User: x\n\nAssistant:", "answers": []}' > "$T/noans.jsonl"
expect eval_without_answer 1 "$T/r5.jsonl" -- --byte-level "$T/noans.jsonl" -o "$T/r5.jsonl"
printf '\377\376{}\n' > "$T/binary.jsonl"
expect not_utf8 1 "$T/r6.jsonl" -- --byte-level "$T/binary.jsonl" -o "$T/r6.jsonl"
: > "$T/empty.jsonl"
expect empty_input 1 "$T/r7.jsonl" -- --byte-level "$T/empty.jsonl" -o "$T/r7.jsonl"
expect output_dir_missing 1 -- --byte-level "$T/train.jsonl" -o "$T/no-such-dir/o.jsonl"
expect missing_tokenizer_dir 1 "$T/r8.jsonl" -- --tokenizer "$T/no-such-model" "$T/train.jsonl" -o "$T/r8.jsonl"
cp "$T/two.jsonl" "$T/keep.jsonl"
expect failure_keeps_existing_output 1 -- --byte-level "$T/badjson.jsonl" -o "$T/keep.jsonl"
cmp -s "$T/keep.jsonl" "$T/two.jsonl" && ! temp_left "$T/keep.jsonl" && pass existing_output_untouched ||
    fail existing_output_untouched "overwritten or temp left"

# ---- a real tokenizer: chat template and ESFT's own formatting ----
if ! reason=$("$PYTHON" -c 'import transformers, tokenizers' 2>&1); then
    skip tokenizer_paths "transformers/tokenizers not importable: $(echo "$reason" | tail -n 1)"; finish
fi
if ! "$PYTHON" - "$T/tok" "$T/both.jsonl" > "$T/err" 2>&1 <<'PY'
# A 600-entry byte-level BPE trained on the sample text; one copy with a chat template
# (DeepSeek-style: BOS "User: q\n\n" "Assistant: a" EOS), one without.
import json, os, sys
from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<bos>", "<eos>", "<pad>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
def texts():
    for l in open(sys.argv[2], encoding="utf-8"):
        r = json.loads(l)
        yield from ([m["content"] for m in r["messages"]] if "messages" in r else [r["prompt"], r["answers"][0]])
tok.train_from_iterator(texts(), trainer)
template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n\n' }}"
            "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
for name, tmpl in (("chat", template), ("plain", None)):
    d = os.path.join(sys.argv[1], name)
    os.makedirs(d)
    tok.save(os.path.join(d, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
           "pad_token": "<pad>", "add_bos_token": False}
    if tmpl:
        cfg["chat_template"] = tmpl
    json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"))
PY
then fail build_tiny_tokenizer "see above"; finish; fi
pass build_tiny_tokenizer

expect chat_template 0 -- --tokenizer "$T/tok/chat" --max-length 0 "$T/both.jsonl" -o "$T/chat.jsonl"
expect esft_fallback 0 -- --tokenizer "$T/tok/plain" --max-length 0 "$T/both.jsonl" -o "$T/plain.jsonl"
grep -q "no chat template: using ESFT's own formatting" "$T/err" && pass fallback_said_on_stderr ||
    fail fallback_said_on_stderr "no notice"
expect format_esft 0 -- --tokenizer "$T/tok/chat" --format esft --max-length 0 "$T/both.jsonl" -o "$T/esft.jsonl"
expect format_chat_without_template 1 "$T/r9.jsonl" -- --tokenizer "$T/tok/plain" --format chat "$T/both.jsonl" -o "$T/r9.jsonl"
if "$PYTHON" - "$T/tok/chat" "$T/both.jsonl" "$T/chat.jsonl" "$T/plain.jsonl" "$T/esft.jsonl" > "$T/err" 2>&1 <<'PY'
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
bos, eos = tok.bos_token_id, tok.eos_token_id
src = [json.loads(l) for l in open(sys.argv[2], encoding="utf-8")]
chat, plain, esft = ([json.loads(l) for l in open(p)] for p in sys.argv[3:6])
assert plain == esft, "--format esft and the no-template fallback differ"
assert len(chat) == len(plain) == len(src)
enc = lambda s: tok.encode(s, add_special_tokens=False)
for n, r in enumerate(src):
    if "messages" in r:
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        prompt = "User: " + q.strip() + "\n\nAssistant:"
    else:
        prompt, a = r["prompt"], r["answers"][0]
    p_ids, a_ids = enc(prompt), enc(" " + a.strip()) + [eos]
    # ESFT (utils.py get_formatted_input_and_target): BOS labelled with itself, prompt -100, answer+EOS scored
    e = esft[n]
    assert e["input_ids"] == [bos] + p_ids + a_ids, f"{n}: esft ids"
    assert e["labels"] == [bos] + [-100] * len(p_ids) + a_ids, f"{n}: esft labels"
    # chat template: same text here; BOS, "User: ..." and "Assistant:" masked, " answer" EOS scored
    c = chat[n]
    ids, lab = c["input_ids"], c["labels"]
    assert len(ids) == len(lab) and ids[0] == bos and lab[0] == -100, f"{n}: chat BOS"
    assert all(l == -100 or l == i for i, l in zip(ids, lab)), f"{n}: chat label neither -100 nor id"
    k = lab.index(next(l for l in lab if l != -100))
    assert all(l != -100 for l in lab[k:]), f"{n}: chat mask not prompt-then-response"
    assert tok.decode(ids[1:k]) == prompt, f"{n}: chat prompt {tok.decode(ids[1:k])[-40:]!r}"
    assert ids[k:] == a_ids, f"{n}: chat response {tok.decode(ids[k:])[:40]!r}"
PY
then pass tokenizer_paths_ids_and_masking; else fail tokenizer_paths_ids_and_masking "see above"; fi

finish
