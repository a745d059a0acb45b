#!/bin/sh
# run_analysis.sh BUILD - what `make analysis` does:
# the ESFT expert analysis of the vendored translation task, with the `esft`
# command. Router statistics from the routing logs, expert selection by token
# and by gate score (top-p 0.2), heatmaps; a short report; outputs in BUILD/analysis/.
set -e
BUILD=${1:-build}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ESFT=$BUILD/esft
LOGS=$BUILD/data/translation
OUT=$BUILD/analysis
P=0.2
for need in "$ESFT" "$LOGS/expert_weights_1.txt"; do
    [ -e "$need" ] || { echo "run_analysis.sh: $need is missing (run 'make analysis')" >&2; exit 1; }
done
mkdir -p "$OUT"

# "a b c" -> the number of experts per layer of an expert config, in layer order.
per_layer() {
    sed -e 's/^{"experts": {//' -e 's/}, "shared_experts".*$//' "$1" | tr ']' '\n' |
        awk '/"[0-9]+": \[/ { l = $0; sub(/^[^"]*"/, "", l); sub(/".*$/, "", l)
                              ids = $0; sub(/^[^[]*\[/, "", ids); c[l + 0] = ids == "" ? 0 : split(ids, a, ",") }
             END { for (l = 0; l <= 1000; l++) if (l in c) printf "%s%d", (s++ ? " " : ""), c[l] }'
}
same() { if cmp -s "$1" "$2"; then echo "identical"; else echo "DIFFERENT"; fi; }

"$ESFT" stats "$LOGS" -o "$OUT/summary.json" 2> "$OUT/stats.log" || { cat "$OUT/stats.log" >&2; exit 1; }
for score in token gate; do
    "$ESFT" select "$OUT/summary.json" --score $score --top-p $P -o "$OUT/config_$score.json" \
        2> "$OUT/select_$score.log" || { cat "$OUT/select_$score.log" >&2; exit 1; }
    "$ESFT" heatmap "$OUT/summary.json" --score $score --config "$OUT/config_$score.json" \
        -o "$OUT/heatmap_$score.svg"
done

echo "ESFT expert analysis: translation task (DeepSeek-V2-Lite routing logs, 26 MoE layers x 64 experts)"
sed 's/^esft stats: /  router statistics: /' "$OUT/stats.log"
echo "  summary.json vs the authors' data/translation_summary.json: $(same "$OUT/summary.json" "$ROOT/data/translation_summary.json")"
echo
for score in token gate; do
    n=$(sed -nE 's/.*: ([0-9]+) of ([0-9]+) experts.*/\1/p' "$OUT/select_$score.log")
    total=$(sed -nE 's/.*: ([0-9]+) of ([0-9]+) experts.*/\2/p' "$OUT/select_$score.log")
    pct=$(awk -v n="$n" -v t="$total" 'BEGIN { printf "%.1f", 100 * n / t }')
    printf '  ESFT-%-5s top-p %s: %3d of %d experts (%s%%) to train\n' "$score" "$P" "$n" "$total" "$pct"
    echo "      per layer 1..26: $(per_layer "$OUT/config_$score.json")"
done
echo "  token config vs the authors' data/translation_config.json: $(same "$OUT/config_token.json" "$ROOT/data/translation_config.json")"
echo
echo "  outputs in $OUT/: summary.json, config_token.json, config_gate.json,"
echo "                    heatmap_token.svg, heatmap_gate.svg (docs/heatmap.md explains them)"
cmp -s "$OUT/summary.json" "$ROOT/data/translation_summary.json" &&
    cmp -s "$OUT/config_token.json" "$ROOT/data/translation_config.json"
