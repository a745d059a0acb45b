#!/bin/sh
# The `esft` command end to end: reproduces the ESFT authors' summary.json and
# expert config byte-for-byte from the vendored routing logs, exit codes
# (0 ok / 1 runtime error / 2 usage), no output file on failure, --help, and
# well-formed heatmaps. Run by tests/run_all.sh with BUILD and ESFT_DATA set.
BUILD=${BUILD:-build}
ESFT_DATA=${ESFT_DATA:-$BUILD/data}
PYTHON=${PYTHON:-python3}
ESFT=$BUILD/esft
LOGS=$ESFT_DATA/translation
T=$BUILD/check_cli
rm -rf "$T"; mkdir -p "$T"
passed=0; failed=0; skipped=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; [ -s "$T/err" ] && sed 's/^/     /' "$T/err" | head -5; failed=$((failed + 1)); }
skip() { echo "SKIP $1: $2"; skipped=$((skipped + 1)); }
have_python() { "$PYTHON" -c 'import xml.etree.ElementTree' 2>/dev/null; }

# temp_left PATH: a temp file of PATH ("PATH.tmp.<pid>.<n>", any "PATH.tmp*") is on disk
temp_left() { for f in "$1".tmp*; do [ -e "$f" ] && return 0; done; return 1; }

# expect NAME CODE [OUTPUT-THAT-MUST-NOT-EXIST] -- esft args...
expect() {
    name=$1; code=$2; shift 2; must_not=""
    if [ "$1" != "--" ]; then must_not=$1; shift; fi
    shift
    "$ESFT" "$@" > "$T/out" 2> "$T/err"; rc=$?
    if [ "$rc" -ne "$code" ]; then fail "$name" "exit $rc, expected $code"; return 1; fi
    if [ -n "$must_not" ] && { [ -e "$must_not" ] || temp_left "$must_not"; }; then
        fail "$name" "$must_not was written although the command failed"; return 1; fi
    if [ "$code" -ne 0 ] && [ -s "$T/out" ]; then fail "$name" "error output on stdout, not stderr"; return 1; fi
    if [ "$code" -ne 0 ] && [ ! -s "$T/err" ]; then fail "$name" "no message on stderr"; return 1; fi
    pass "$name"
}

if [ ! -x "$ESFT" ] || [ ! -f "$LOGS/expert_weights_1.txt" ]; then
    echo "FAIL setup: need $ESFT and $LOGS (run make test)"; echo "0 passed, 1 failed, 0 skipped"; exit 1
fi

# ---- the authors' files, byte for byte ----
if expect stats_runs 0 -- stats "$LOGS" -o "$T/summary.json" &&
   cmp "$T/summary.json" data/translation_summary.json > "$T/err" 2>&1; then
    pass stats_reproduces_translation_summary_json
else fail stats_reproduces_translation_summary_json "differs from data/translation_summary.json"; fi
if expect select_runs 0 -- select "$T/summary.json" --top-p 0.2 -o "$T/config.json" &&
   cmp "$T/config.json" data/translation_config.json > "$T/err" 2>&1; then
    pass select_top_p_0.2_reproduces_translation_config_json
else fail select_top_p_0.2_reproduces_translation_config_json "differs from data/translation_config.json"; fi
# The same from the authors' own summary (what a user with only summary.json does).
if expect select_from_authors_summary 0 -- select data/translation_summary.json --score token --top-p=0.2 -o "$T/config2.json" &&
   cmp "$T/config2.json" data/translation_config.json > "$T/err" 2>&1; then pass select_from_authors_summary_matches
else fail select_from_authors_summary_matches "differs"; fi

# ---- other options ----
expect stats_full_precision 0 -- stats "$LOGS" --decimals -1 -o "$T/full.json"
if ! cmp -s "$T/full.json" "$T/summary.json" && grep -q '"0": 0.0[0-9]\{5,\}' "$T/full.json"; then pass decimals_-1_keeps_more_digits
else fail decimals_-1_keeps_more_digits "full-precision file looks rounded"; fi
expect stats_per_sample 0 -- stats "$LOGS" --norm per-sample -o "$T/per_sample.json"
if ! cmp -s "$T/per_sample.json" "$T/summary.json"; then pass per_sample_differs_from_pooled
else fail per_sample_differs_from_pooled "identical files"; fi
expect select_gate 0 -- select "$T/summary.json" --score gate --top-p 0.2 --shared-experts --non-expert-modules -o "$T/gate.json"
if grep -q '"shared_experts": true, "non_expert_modules": true}$' "$T/gate.json"; then pass select_flags_written
else fail select_flags_written "flags not in $T/gate.json"; fi
expect select_top_k 0 -- select "$T/summary.json" --top-k 3 -o "$T/topk.json"
expect select_budget 0 -- select "$T/summary.json" --budget 100 -o "$T/budget.json"
if have_python; then
    if "$PYTHON" - "$T/topk.json" "$T/budget.json" > "$T/err" 2>&1 <<'PY'
import json, sys
topk = json.load(open(sys.argv[1]))["experts"]
budget = json.load(open(sys.argv[2]))["experts"]
assert len(topk) == 26 and all(len(v) == 3 for v in topk.values()), topk
assert sum(len(v) for v in budget.values()) == 100, budget
PY
    then pass top_k_and_budget_counts; else fail top_k_and_budget_counts "wrong counts"; fi
else skip top_k_and_budget_counts "no python3"; fi

# ---- usage errors: exit 2, nothing written ----
expect no_arguments 2 -- 
expect unknown_command 2 -- frobnicate
expect unknown_option 2 "$T/u1.json" -- stats "$LOGS" --bogus -o "$T/u1.json"
expect missing_output 2 -- stats "$LOGS"
expect missing_option_value 2 -- select "$T/summary.json" -o
expect two_rules 2 "$T/u2.json" -- select "$T/summary.json" --top-p 0.2 --top-k 3 -o "$T/u2.json"
expect no_rule 2 "$T/u3.json" -- select "$T/summary.json" -o "$T/u3.json"
expect non_numeric_top_k 2 "$T/u4.json" -- select "$T/summary.json" --top-k three -o "$T/u4.json"
expect bad_score_name 2 "$T/u5.json" -- select "$T/summary.json" --score logit --top-p 0.2 -o "$T/u5.json"
expect bad_norm 2 "$T/u6.json" -- stats "$LOGS" --norm mean -o "$T/u6.json"
expect config_on_config 2 "$T/u7.svg" -- heatmap "$T/config.json" --config "$T/config.json" -o "$T/u7.svg"

# ---- runtime errors: exit 1, nothing written, the file named ----
expect missing_log_dir 1 "$T/r1.json" -- stats "$T/no-such-dir" -o "$T/r1.json"
expect missing_summary 1 "$T/r2.json" -- select "$T/no-such.json" --top-p 0.2 -o "$T/r2.json"
grep -q "no-such.json" "$T/err" && pass missing_summary_names_file || fail missing_summary_names_file "file not named"
expect top_p_zero 1 "$T/r3.json" -- select "$T/summary.json" --top-p 0 -o "$T/r3.json"
expect top_p_above_one 1 "$T/r4.json" -- select "$T/summary.json" --top-p 1.5 -o "$T/r4.json"
expect top_k_too_large 1 "$T/r5.json" -- select "$T/summary.json" --top-k 65 -o "$T/r5.json"
head -c 1000 "$T/summary.json" > "$T/truncated.json"
expect truncated_summary 1 "$T/r6.json" -- select "$T/truncated.json" --top-p 0.2 -o "$T/r6.json"
grep -q "truncated.json:1:" "$T/err" && pass truncated_summary_names_file_and_line || fail truncated_summary_names_file_and_line "no file:line"
mkdir -p "$T/badlogs"; cp "$LOGS/expert_weights_1.txt" "$T/badlogs/"
printf '1\t2\t3\t4\t5\t64\t\t0.1\t0.1\t0.1\t0.1\t0.1\t0.1\n' > "$T/badlogs/expert_weights_2.txt"
expect bad_expert_id_in_log 1 "$T/r7.json" -- stats "$T/badlogs" -o "$T/r7.json"
grep -q "expert_weights_2.txt:1:" "$T/err" && pass bad_log_names_file_and_line || fail bad_log_names_file_and_line "no file:line"
cp "$T/summary.json" "$T/keep.json"
expect failure_keeps_existing_output 1 -- stats "$T/badlogs" -o "$T/keep.json"
cmp -s "$T/keep.json" "$T/summary.json" && pass existing_output_untouched || fail existing_output_untouched "overwritten"
echo '{"hello": 1}' > "$T/other.json"
expect heatmap_of_unknown_json 1 "$T/r8.svg" -- heatmap "$T/other.json" -o "$T/r8.svg"
printf '{"experts": {"0": [1]}, "shared_experts": false, "non_expert_modules": false}' > "$T/layer0.json"
expect heatmap_config_layer_without_scores 1 "$T/r9.svg" -- heatmap "$T/summary.json" --config "$T/layer0.json" -o "$T/r9.svg"
printf '{"experts": {"1": [70]}, "shared_experts": false, "non_expert_modules": false}' > "$T/wide.json"
expect heatmap_config_id_beyond_scores 1 "$T/r10.svg" -- heatmap "$T/summary.json" --config "$T/wide.json" -o "$T/r10.svg"
expect output_dir_missing 1 -- select "$T/summary.json" --top-p 0.2 -o "$T/no-such-dir/c.json"

# ---- help and version ----
for cmd in stats select heatmap train; do
    expect "help_$cmd" 0 -- help $cmd && grep -q "^usage: esft $cmd" "$T/out" || fail "help_${cmd}_text" "no usage line"
    expect "${cmd}_--help" 0 -- $cmd --help && grep -q "^usage: esft $cmd" "$T/out" || fail "${cmd}_--help_text" "no usage line"
done
expect top_level_help 0 -- --help && grep -q "heatmap" "$T/out" || fail top_level_help_lists_commands "no command list"
# the typical use covers both halves: analysis and checkpoints/models
missing=""
for use in "esft stats LOGDIR" "esft select" "esft heatmap" "esft inspect MODEL_DIR" "esft eval MODEL_DIR" \
    "esft stats MODEL_DIR" "esft extract MODEL_DIR" "esft merge MODEL_DIR"; do
    grep -q "^  $use" "$T/out" || missing="$missing '$use'"
done
[ -z "$missing" ] && pass top_level_help_typical_use_complete || fail top_level_help_typical_use_complete "no$missing"
version=$(sed -n 's/^#define ESFT_VERSION_STRING "\(.*\)"/\1/p' esft.h)
expect version 0 -- --version && grep -qx "esft $version" "$T/out" && pass version_matches_header ||
    fail version_matches_header "'$(cat "$T/out")' vs $version"

# ---- heatmaps: well-formed SVG with one cell per (layer, expert), outlines per selection ----
expect heatmap_token 0 -- heatmap "$T/summary.json" --config "$T/config.json" -o "$T/token.svg"
expect heatmap_gate 0 -- heatmap "$T/summary.json" --score gate --config "$T/gate.json" -o "$T/gate.svg"
expect heatmap_scores_only 0 -- heatmap "$T/summary.json" -o "$T/plain.svg"
expect heatmap_config_only 0 -- heatmap "$T/config.json" -o "$T/cfg.svg"
# every command prints one summary line on success (docs/cli.md); -q silences it
grep -qx "esft heatmap: [0-9]* experts selected in [0-9]* layers -> $T/cfg.svg" "$T/err" &&
    pass heatmap_summary_line || fail heatmap_summary_line "stderr: '$(cat "$T/err")'"
expect heatmap_both_summary 0 -- heatmap "$T/summary.json" --score gate --config "$T/gate.json" -o "$T/gate2.svg" &&
    grep -qx "esft heatmap: 27 layers x 64 experts, gate scores, [0-9]* experts selected in 27 layers -> $T/gate2.svg" "$T/err" &&
    pass heatmap_summary_line_scores || fail heatmap_summary_line_scores "stderr: '$(cat "$T/err")'"
expect heatmap_quiet 0 -- heatmap "$T/summary.json" -q -o "$T/quiet.svg" && [ ! -s "$T/err" ] &&
    pass heatmap_quiet_is_silent || fail heatmap_quiet_is_silent "stderr: '$(cat "$T/err")'"
if [ -x "$BUILD/examples/collect_stats" ]; then
    mkdir -p "$T/engine"
    "$BUILD/examples/collect_stats" "$T/engine" > "$T/err" 2>&1 && [ -s "$T/engine/summary.json" ] &&
        [ -s "$T/engine/config.json" ] && pass example_collect_stats_runs || fail example_collect_stats_runs "failed"
    expect engine_summary_selectable 0 -- select "$T/engine/summary.json" --top-p 0.2 -o "$T/engine/again.json"
    cmp -s "$T/engine/again.json" "$T/engine/config.json" && pass engine_config_reproducible_by_cli ||
        fail engine_config_reproducible_by_cli "esft select disagrees with the example's own selection"
else skip example_collect_stats_runs "$BUILD/examples/collect_stats not built"; fi
if have_python; then
    # expected: cells = layers x experts, outlines = selected experts of the config
    for spec in "token.svg 1664 83" "gate.svg 1664 $T/gate.json" "plain.svg 1664 0" \
                "cfg.svg 1664 83" "engine/heatmap.svg 64 -"; do
        set -- $spec
        [ -f "$T/$1" ] || { skip "svg_$1" "not written"; continue; }
        if "$PYTHON" - "$T/$1" "$2" "$3" > "$T/err" 2>&1 <<'PY'
import sys, xml.etree.ElementTree as ET
ns = "{http://www.w3.org/2000/svg}"
root = ET.parse(sys.argv[1]).getroot()
assert root.tag == ns + "svg", root.tag
cells = [r for r in root.iter(ns + "rect") if r.find(ns + "title") is not None]
assert len(cells) == int(sys.argv[2]), "cells %d != %s" % (len(cells), sys.argv[2])
outlines = [r for g in root.iter(ns + "g") if g.get("stroke") for r in g.iter(ns + "rect")]
want = sys.argv[3]
if want.endswith(".json"):  # the config's selection size
    import json
    want = str(sum(len(v) for v in json.load(open(want))["experts"].values()))
if want != "-":
    assert len(outlines) == int(want), "outlines %d != %s" % (len(outlines), want)
selected = [c for c in cells if "selected" in c.find(ns + "title").text]
assert len(selected) == len(outlines), (len(selected), len(outlines))
PY
        then pass "svg_well_formed_$1"; else fail "svg_well_formed_$1" "see above"; fi
    done
else skip svg_well_formed "no python3"; fi

# ---- wrong answers that looked right (issue 12) ----
# --top-k 12 over K = 6 logs joined token pairs (a token naming an expert twice,
# its weight counted twice) and exited 0: now an error naming K = 6.
expect stats_top_k_twice_the_logs 1 "$T/k12.json" -- stats "$LOGS" --top-k 12 -o "$T/k12.json"
grep -q "expert_weights_1.txt:1: token 0 of sample 0 at layer 1 selects expert [0-9]* twice: the log looks like top-k 6, not 12" "$T/err" &&
    grep -q -- "--model-config" "$T/err" && pass stats_wrong_top_k_names_the_logs_k ||
    fail stats_wrong_top_k_names_the_logs_k "message does not name top-k 6"
expect stats_experts_too_few 1 "$T/e60.json" -- stats "$LOGS" --experts 60 -o "$T/e60.json"
grep -q "at least 64 experts, not 60" "$T/err" && pass stats_too_few_experts_names_the_logs_e ||
    fail stats_too_few_experts_names_the_logs_e "message does not suggest 64"
# --experts 72: experts 64..71 score 0 everywhere; a warning names E = 64
expect stats_experts_too_many 0 -- stats "$LOGS" --experts 72 -o "$T/e72.json"
grep -q "warning: .*look like --experts 64, not 72" "$T/err" && pass stats_too_many_experts_warns ||
    fail stats_too_many_experts_warns "no warning naming 64"
# --model-config: E, K and L from a Hugging Face config.json; the authors' file again
sed -e 's/"n_routed_experts": 8/"n_routed_experts": 64/' -e 's/"num_experts_per_tok": 2/"num_experts_per_tok": 6/' \
    -e 's/"num_hidden_layers": 3/"num_hidden_layers": 27/' tests/models/deepseek_v2_lite/config.json > "$T/v2lite.json"
if expect stats_model_config 0 -- stats "$LOGS" --model-config "$T/v2lite.json" -o "$T/mc.json" &&
   cmp "$T/mc.json" data/translation_summary.json > "$T/err" 2>&1 && ! grep -q warning "$T/err"; then
    pass stats_model_config_reproduces_translation_summary_json
else fail stats_model_config_reproduces_translation_summary_json "differs, or warned"; fi
expect stats_model_config_agreeing_flags 0 -- stats "$LOGS" --model-config "$T/v2lite.json" --top-k 6 --experts 64 --layers 27 -o "$T/mc2.json"
expect stats_model_config_conflicting_top_k 2 "$T/mc3.json" -- stats "$LOGS" --model-config "$T/v2lite.json" --top-k 4 -o "$T/mc3.json"
grep -q -- "--top-k 4 disagrees with the model: 6 in" "$T/err" && pass stats_model_config_conflict_named ||
    fail stats_model_config_conflict_named "no message naming both values"
expect stats_model_config_conflicting_experts 2 "$T/mc4.json" -- stats "$LOGS" --model-config "$T/v2lite.json" --experts 72 -o "$T/mc4.json"
expect stats_model_config_missing 1 "$T/mc5.json" -- stats "$LOGS" --model-config "$T/no-such.json" -o "$T/mc5.json"
grep -q "no-such.json" "$T/err" && pass stats_model_config_missing_named || fail stats_model_config_missing_named "file not named"
# inspect: control characters in tensor names and metadata are escaped, not sent to the terminal
h='{"a\u001b[2Jb\u0007":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"k\u009bx":"v\u001b]0;pwned\u0007"}}'
{ printf "\\$(printf %03o ${#h})\\000\\000\\000\\000\\000\\000\\000"; printf '%s' "$h"; printf '\000\000\000\000'; } > "$T/ctrl.safetensors"
expect inspect_control_characters 0 -- inspect "$T/ctrl.safetensors"
if ! LC_ALL=C grep -q "$(printf '[\001-\010\013-\037\177]')" "$T/out" && ! LC_ALL=C grep -q "$(printf '\302[\200-\237]')" "$T/out" &&
   grep -qF 'a\x1b[2Jb\x07' "$T/out" && grep -qF 'k\u009bx = v\x1b]0;pwned\x07' "$T/out"; then
    pass inspect_escapes_control_characters
else fail inspect_escapes_control_characters "raw control bytes on stdout"; fi

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
