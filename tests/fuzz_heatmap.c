/* fuzz_heatmap.c - libFuzzer target for the heatmap writer
   (esft_heatmap_write_svg): the input is a summary.json and an expert config
   separated by a NUL byte (either part may be empty or garbage; what parses is
   drawn: scores, config, or both, token and gate). Checks: a success writes a
   whole SVG (XML prolog, one <svg>, ends "</svg>\n", no "nan"/"inf" numbers,
   tags balanced) and leaves no temp file; a failure leaves neither the file nor
   a temp file and says why.

   libFuzzer (tests/fuzz.sh, `make fuzz`):
       clang -g -O1 -fsanitize=fuzzer,address,undefined -DESFT_LIBFUZZER -I. tests/fuzz_heatmap.c -lm
   Plain replay of files (any compiler): cc -I. tests/fuzz_heatmap.c -lm && ./a.out tests/corpus/heatmap/... */
#define _POSIX_C_SOURCE 200809L
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include "fuzz_files.h"

/* A written SVG: whole, one root, no non-finite numbers, '<' and '>' paired. */
static void check_svg(const char *path)
{
    size_t n, i;
    long depth = 0;
    char *svg = slurp(path, &n);
    REQUIRE(svg != NULL);
    REQUIRE(strncmp(svg, "<?xml", 5) == 0);
    REQUIRE(n >= 7 && strcmp(svg + n - 7, "</svg>\n") == 0);
    REQUIRE(strstr(strstr(svg, "<svg") + 4, "<svg") == NULL);
    REQUIRE(strstr(svg, "nan") == NULL && strstr(svg, "inf\"") == NULL);
    for (i = 0; i < n; i++) {
        if (svg[i] == '<') depth++;
        if (svg[i] == '>') depth--;
        REQUIRE(depth == 0 || depth == 1);
    }
    REQUIRE(depth == 0);
    free(svg);
}

static void draw(const char *path, const esft_scores *sc, esft_score which, const esft_expert_config *cfg)
{
    esft_error err;
    esft_status s;
    memset(&err, 0, sizeof err);
    s = esft_heatmap_write_svg(path, sc, which, cfg, &err);
    REQUIRE(!fuzz_temp_left(path));
    if (s == ESFT_OK) {
        check_svg(path);
        REQUIRE(remove(path) == 0);
    } else {
        REQUIRE(err.status == s && err.message[0]);
        REQUIRE(access(path, F_OK) != 0); /* nothing under the real name */
    }
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    const char *text = (const char *)data, *nul = memchr(text, 0, size);
    size_t n1 = nul ? (size_t)(nul - text) : size;
    esft_scores sc;
    esft_expert_config cfg;
    int have_sc, have_cfg;
    char path[1100];
    fuzz_path(path, sizeof path, "heatmap", "map.svg");
    have_sc = esft_scores_parse_json(text, n1, "scores", &sc, NULL) == ESFT_OK;
    have_cfg = nul && esft_expert_config_parse(nul + 1, size - n1 - 1, "config", &cfg, NULL) == ESFT_OK;
    if (have_sc) draw(path, &sc, ESFT_SCORE_TOKEN, NULL);
    if (have_cfg) draw(path, NULL, ESFT_SCORE_TOKEN, &cfg);
    if (have_sc && have_cfg) draw(path, &sc, ESFT_SCORE_GATE, &cfg);
    if (!have_sc && !have_cfg) { /* the door: nothing to draw is refused, nothing written */
        esft_error err;
        REQUIRE(esft_heatmap_write_svg(path, NULL, ESFT_SCORE_TOKEN, NULL, &err) == ESFT_ERR_INVALID_ARGUMENT);
        REQUIRE(access(path, F_OK) != 0);
    }
    if (have_sc) esft_scores_free(&sc);
    if (have_cfg) esft_expert_config_free(&cfg);
    return 0;
}

#include "fuzz_main.h"
