#!/bin/sh
# The `esft` command against hostile paths (issue 12): an output that is one of
# the inputs (same file, through links too) is refused with exit 2 and the input
# stays intact; FIFOs as inputs fail at once (never wait); a device, FIFO or
# directory as an output is refused; a symbolic link is followed; a 0600 file
# stays 0600; a missing output directory is named; heatmap reads through the
# library's limits; merge is all-or-nothing, cleans its own stale temp files,
# refuses a foreign non-empty directory and keeps the index's metadata.
# Run by tests/run_all.sh with BUILD and ESFT_DATA set.
BUILD=${BUILD:-build}
ESFT_DATA=${ESFT_DATA:-$BUILD/data}
ESFT=$BUILD/esft
LOGS=$ESFT_DATA/translation
M=tests/models
T=$BUILD/check_safety
rm -rf "$T"; mkdir -p "$T"
passed=0; failed=0; skipped=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; [ -s "$T/err" ] && sed 's/^/     /' "$T/err" | head -5; failed=$((failed + 1)); }
skip() { echo "SKIP $1: $2"; skipped=$((skipped + 1)); }

# run NAME CODE -- esft args...: the exit code, under a time limit (a command
# that waits on a FIFO is killed: exit 124, a failure)
run() {
    name=$1; code=$2; shift 3
    timeout 20 "$ESFT" "$@" > "$T/out" 2> "$T/err"; rc=$?
    if [ "$rc" -ne "$code" ]; then fail "$name" "exit $rc, expected $code"; return 1; fi
    if [ "$code" -ne 0 ] && [ ! -s "$T/err" ]; then fail "$name" "no message on stderr"; return 1; fi
    pass "$name"
}
# said NAME TEXT: the last command's stderr says TEXT
said() { if grep -qF -- "$2" "$T/err"; then pass "$1"; else fail "$1" "stderr lacks '$2'"; fi; }
# same NAME A B: files A and B are byte-identical
same() { if cmp -s "$2" "$3"; then pass "$1"; else fail "$1" "$2 changed"; fi; }

if [ ! -x "$ESFT" ] || [ ! -f "$LOGS/expert_weights_1.txt" ] || [ ! -f "$M/mixtral/model.safetensors.index.json" ]; then
    echo "FAIL setup: need $ESFT, $LOGS and $M/mixtral (run make test)"; echo "0 passed, 1 failed, 0 skipped"; exit 1
fi

"$ESFT" stats "$LOGS" -q -o "$T/summary.json" && "$ESFT" select "$T/summary.json" --top-p 0.2 -q -o "$T/config.json" ||
    { echo "FAIL setup: stats/select"; echo "0 passed, 1 failed, 0 skipped"; exit 1; }
cp "$T/summary.json" "$T/summary.orig"; cp "$T/config.json" "$T/config.orig"
mkdir -p "$T/base"; cp "$M/mixtral/"* "$T/base/"
printf '{"experts": {"0": [1], "1": [0, 3]}, "shared_experts": false, "non_expert_modules": false}' > "$T/base_config.json"
"$ESFT" extract "$T/base" --config "$T/base_config.json" -q -o "$T/trained.safetensors" ||
    { echo "FAIL setup: extract"; echo "0 passed, 1 failed, 0 skipped"; exit 1; }
cp "$T/trained.safetensors" "$T/trained.orig"
cp "$T/base/model-00001-of-00002.safetensors" "$T/shard1.orig"

# ---- an output that is one of the inputs: exit 2, input intact ----
run select_onto_its_input 2 -- select "$T/summary.json" --top-p 0.2 -o "$T/summary.json"
said select_onto_its_input_says_why "is the input"
same select_input_intact "$T/summary.json" "$T/summary.orig"
ln -s summary.json "$T/link.json"
run select_onto_a_link_to_its_input 2 -- select "$T/summary.json" --top-p 0.2 -o "$T/link.json"
ln "$T/summary.json" "$T/hard.json"
run heatmap_onto_a_hard_link_to_its_input 2 -- heatmap "$T/summary.json" -o "$T/hard.json"
run heatmap_onto_its_config 2 -- heatmap "$T/summary.json" --config "$T/config.json" -o "./$T/config.json"
same heatmap_config_intact "$T/config.json" "$T/config.orig"
same summary_intact_after_links "$T/summary.json" "$T/summary.orig"
mkdir -p "$T/logs"; cp "$LOGS/expert_weights_1.txt" "$T/logs/"; cp "$LOGS/expert_weights_1.txt" "$T/log1.orig"
run stats_onto_a_log 2 -- stats "$T/logs" -o "$T/logs/expert_weights_1.txt"
same stats_log_intact "$T/logs/expert_weights_1.txt" "$T/log1.orig"
run extract_onto_the_base_shard 2 -- extract "$T/base" --config "$T/base_config.json" -o "$T/base/model-00001-of-00002.safetensors"
same extract_base_intact "$T/base/model-00001-of-00002.safetensors" "$T/shard1.orig"
run extract_onto_the_base_file 2 -- extract "$T/trained.safetensors" --config "$T/base_config.json" -o "$T/trained.safetensors"
same extract_trained_intact "$T/trained.safetensors" "$T/trained.orig"
mkdir -p "$T/linked_out"; ln -s ../base/model-00001-of-00002.safetensors "$T/linked_out/model-00001-of-00002.safetensors"
run merge_onto_a_link_to_a_base_shard 2 -- merge "$T/base" "$T/trained.safetensors" -o "$T/linked_out"
same merge_base_intact "$T/base/model-00001-of-00002.safetensors" "$T/shard1.orig"
run eval_logits_onto_the_data 2 -- eval "$T/base" --data "$T/base/data.jsonl" --logits "$T/base/data.jsonl"

# ---- FIFOs as inputs: refused at once ----
mkfifo "$T/fifo.json"
run select_from_a_fifo 1 -- select "$T/fifo.json" --top-p 0.2 -o "$T/f1.json"
said select_from_a_fifo_says_why "not a regular file"
run heatmap_from_a_fifo 1 -- heatmap "$T/fifo.json" -o "$T/f2.svg"
run heatmap_config_from_a_fifo 1 -- heatmap "$T/summary.json" --config "$T/fifo.json" -o "$T/f3.svg"
run extract_config_from_a_fifo 1 -- extract "$T/base" --config "$T/fifo.json" -o "$T/f4.safetensors"
run inspect_a_fifo 1 -- inspect "$T/fifo.json"
mkdir -p "$T/fifo_model"; cp "$M/mixtral/"*.safetensors* "$T/fifo_model/"; mkfifo "$T/fifo_model/config.json"
run inspect_with_a_fifo_config 0 -- inspect "$T/fifo_model" --summary
run eval_data_from_a_fifo 1 -- eval "$T/base" --data "$T/fifo.json"
mkdir -p "$T/fifo_logs"; mkfifo "$T/fifo_logs/expert_weights_1.txt"
run stats_log_is_a_fifo 1 -- stats "$T/fifo_logs" -o "$T/f5.json"
mkdir -p "$T/zero_logs"; ln -s /dev/zero "$T/zero_logs/expert_weights_1.txt"
run stats_log_linked_to_dev_zero 1 -- stats "$T/zero_logs" -o "$T/f6.json"

# ---- heatmap reads through the library's limits ----
: > "$T/huge.json"; truncate -s 300M "$T/huge.json" # sparse: no blocks
run heatmap_of_a_huge_file 1 -- heatmap "$T/huge.json" -o "$T/h.svg"
said heatmap_of_a_huge_file_names_the_limit "over the limit"

# ---- what sits at the output path ----
mkfifo "$T/out_fifo"
run output_is_a_fifo 1 -- select "$T/summary.json" --top-p 0.2 -o "$T/out_fifo"
said output_is_a_fifo_says_why "a FIFO, not a regular file"
[ -p "$T/out_fifo" ] && pass output_fifo_still_a_fifo || fail output_fifo_still_a_fifo "replaced"
mkdir -p "$T/out_dir"
run output_is_a_directory 1 -- select "$T/summary.json" --top-p 0.2 -o "$T/out_dir"
mkdir -p "$T/real"; echo old > "$T/real/c.json"; ln -s real/c.json "$T/c_link.json"
run output_through_a_link 0 -- select "$T/summary.json" --top-p 0.2 -q -o "$T/c_link.json"
{ [ -L "$T/c_link.json" ] && cmp -s "$T/real/c.json" "$T/config.orig"; } && pass link_followed_target_replaced ||
    fail link_followed_target_replaced "the link was replaced or its target not written"
echo old > "$T/private.json"; chmod 600 "$T/private.json"
run output_private_file 0 -- select "$T/summary.json" --top-p 0.2 -q -o "$T/private.json"
mode=$(stat -c %a "$T/private.json" 2>/dev/null || stat -f %Lp "$T/private.json")
[ "$mode" = 600 ] && pass private_file_stays_0600 || fail private_file_stays_0600 "mode $mode"
run output_in_a_missing_directory 1 -- select "$T/summary.json" --top-p 0.2 -o "$T/no-such-dir/c.json"
said missing_directory_is_named "the directory $T/no-such-dir does not exist"

# ---- merge: index kept, own stale temp files removed, foreign dirs refused, interruptions reported ----
run merge_runs 0 -- merge "$T/base" "$T/trained.safetensors" -q -o "$T/merged"
same merge_keeps_the_base_index "$T/merged/model.safetensors.index.json" "$T/base/model.safetensors.index.json"
grep -q '"total_parameters"' "$T/merged/model.safetensors.index.json" && pass merge_index_has_total_parameters ||
    fail merge_index_has_total_parameters "metadata lost"
cp "$M/mixtral/config.json" "$T/merged/"
head -c 100000 "$T/base/model-00001-of-00002.safetensors" > "$T/merged/model-00001-of-00002.safetensors.tmp.99999.0"
echo mine > "$T/merged/notes.tmp.1.2"
run merge_again_same_base 0 -- merge "$T/base" "$T/trained.safetensors" -q -o "$T/merged"
[ ! -e "$T/merged/model-00001-of-00002.safetensors.tmp.99999.0" ] && pass merge_removed_its_stale_temp ||
    fail merge_removed_its_stale_temp "still there"
[ -e "$T/merged/notes.tmp.1.2" ] && [ -e "$T/merged/config.json" ] && pass merge_kept_other_files ||
    fail merge_kept_other_files "removed"
run inspect_merged 0 -- inspect "$T/merged" --summary
mkdir -p "$T/foreign"; cp "$T/trained.safetensors" "$T/foreign/model.safetensors"
run merge_into_a_foreign_checkpoint_dir 1 -- merge "$T/base" "$T/trained.safetensors" -o "$T/foreign"
said merge_into_a_foreign_dir_says_why "already holds model.safetensors"
[ ! -e "$T/foreign/model-00001-of-00002.safetensors" ] && [ ! -e "$T/foreign/esft_merge.json" ] &&
    pass foreign_dir_untouched || fail foreign_dir_untouched "merge wrote into it"
sed 's/"complete"/"renaming"/' "$T/merged/esft_merge.json" > "$T/record" && cp "$T/record" "$T/merged/esft_merge.json"
run inspect_an_interrupted_merge 1 -- inspect "$T/merged"
said inspect_names_the_interrupted_merge "interrupted esft merge"
run merge_repairs_an_interrupted_merge 0 -- merge "$T/base" "$T/trained.safetensors" -q -o "$T/merged"
run inspect_repaired 0 -- inspect "$T/merged" --summary

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
