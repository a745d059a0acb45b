/* test_heatmap.c - esft_heatmap_write_svg: one cell per (present layer, expert),
   colours from the ends of the scale, one outline per selected expert, a config
   drawn alone, and every bad input refused with no file written. */
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"
#include "harness.h"
#include "slurp.h"

#include <locale.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *out_path(const char *name)
{
    static char path[1024];
    const char *dir = getenv("BUILD");
    snprintf(path, sizeof path, "%s/tests/%s", dir && *dir ? dir : "build", name);
    return path;
}

/* The whole file as a string, or NULL when absent. Caller frees. */

static int count(const char *hay, const char *needle)
{
    int n = 0;
    for (hay = strstr(hay, needle); hay; hay = strstr(hay + 1, needle)) n++;
    return n;
}

static int exists(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

/* 3 layers, layer 0 absent (as in DeepSeek logs), 8 experts; layer 1 rises
   0..0.7 by expert, layer 2 is flat 0.125. */
static void make_scores(esft_scores *sc)
{
    int e;
    esft_scores_alloc(sc, 3, 8, NULL);
    sc->layer_present[1] = sc->layer_present[2] = 1;
    for (e = 0; e < 8; e++) {
        sc->token[8 + e] = 0.1 * e;
        sc->token[16 + e] = 0.125;
        sc->gate[8 + e] = sc->gate[16 + e] = 0.01 * e;
    }
}

TEST(heatmap_scores_with_selection)
{
    esft_scores sc;
    esft_expert_config cfg;
    esft_error err;
    char *svg;
    const char *path = out_path("heatmap_scores.svg");
    make_scores(&sc);
    CHECK_STATUS(esft_select_top_k(&sc, ESFT_SCORE_TOKEN, 2, &cfg, &err), ESFT_OK);
    remove(path);
    CHECK_STATUS(esft_heatmap_write_svg(path, &sc, ESFT_SCORE_TOKEN, &cfg, &err), ESFT_OK);
    svg = slurp(path, NULL);
    CHECK(svg != NULL);
    CHECK(strncmp(svg, "<?xml", 5) == 0);
    CHECK(strstr(svg, "</svg>\n") != NULL);
    CHECK_EQ_INT(count(svg, "<title>layer 0,"), 0); /* absent layer: no row */
    CHECK_EQ_INT(count(svg, "<title>layer 1,"), 8);
    CHECK_EQ_INT(count(svg, "<title>layer 2,"), 8);
    CHECK_EQ_INT(count(svg, ", selected (#"), 4);
    CHECK(strstr(svg, "layer 1, expert 7: token score 0.7, selected (#1)") != NULL);
    CHECK(strstr(svg, "layer 2, expert 1: token score 0.125, selected (#2)") != NULL); /* ties: lower ids */
    /* zero is the dark end of the scale; the maximum 0.7 sits at 0.7 of a 0.8 scale */
    CHECK(strstr(svg, "fill=\"#440154\"><title>layer 1, expert 0:") != NULL);
    CHECK(strstr(svg, ">0.8</text>") != NULL); /* ticks 0, 0.2, .., 0.8 */
    CHECK(strstr(svg, "selected for training: 4 of 16 experts") != NULL);
    free(svg);
    esft_expert_config_free(&cfg);
    esft_scores_free(&sc);
}

TEST(heatmap_top_of_scale_is_yellow)
{
    esft_scores sc;
    esft_error err;
    char *svg;
    const char *path = out_path("heatmap_gate.svg");
    make_scores(&sc);
    sc.gate[8 + 7] = 0.08; /* exactly the top of a 0..0.08 scale */
    CHECK_STATUS(esft_heatmap_write_svg(path, &sc, ESFT_SCORE_GATE, NULL, &err), ESFT_OK);
    svg = slurp(path, NULL);
    CHECK(svg != NULL);
    CHECK(strstr(svg, "fill=\"#fde725\"><title>layer 1, expert 7: gate score 0.08</title>") != NULL);
    CHECK_EQ_INT(count(svg, "selected"), 0); /* no config, no outlines or legend */
    free(svg);
    esft_scores_free(&sc);
}

TEST(heatmap_config_alone_infers_experts)
{
    const char *text = "{\"experts\": {\"1\": [9, 2], \"3\": []}, \"shared_experts\": false, "
                       "\"non_expert_modules\": false}";
    esft_expert_config cfg;
    esft_error err;
    char *svg;
    const char *path = out_path("heatmap_config.svg");
    CHECK_STATUS(esft_expert_config_parse(text, strlen(text), "cfg", &cfg, &err), ESFT_OK);
    CHECK_STATUS(esft_heatmap_write_svg(path, NULL, ESFT_SCORE_TOKEN, &cfg, &err), ESFT_OK);
    svg = slurp(path, NULL);
    CHECK(svg != NULL);
    CHECK_EQ_INT(count(svg, "<title>layer 1,"), 16); /* id 9 -> 16 experts, a multiple of 8 */
    CHECK_EQ_INT(count(svg, "<title>layer 3,"), 16); /* present with nothing selected */
    CHECK_EQ_INT(count(svg, "<title>layer 2,"), 0);
    CHECK(strstr(svg, "layer 1, expert 9, selected (#1)") != NULL);
    CHECK(strstr(svg, "layer 1, expert 2, selected (#2)") != NULL);
    CHECK(strstr(svg, "2 of 32") != NULL);
    free(svg);
    cfg.n_experts = 64; /* a caller who knows E says so */
    CHECK_STATUS(esft_heatmap_write_svg(path, NULL, ESFT_SCORE_TOKEN, &cfg, &err), ESFT_OK);
    svg = slurp(path, NULL);
    CHECK_EQ_INT(count(svg, "<title>layer 1,"), 64);
    free(svg);
    esft_expert_config_free(&cfg);
}

TEST(heatmap_bad_input_writes_nothing)
{
    esft_scores sc;
    esft_expert_config cfg;
    esft_error err;
    const char *path = out_path("heatmap_bad.svg");
    const char *wide = "{\"experts\": {\"1\": [8]}}", *layer0 = "{\"experts\": {\"0\": [1]}}";
    make_scores(&sc);
    remove(path);
    CHECK_STATUS(esft_heatmap_write_svg(NULL, &sc, ESFT_SCORE_TOKEN, NULL, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_heatmap_write_svg(path, NULL, ESFT_SCORE_TOKEN, NULL, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_heatmap_write_svg(path, &sc, (esft_score)7, NULL, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_expert_config_parse(wide, strlen(wide), "wide", &cfg, &err), ESFT_OK);
    CHECK_STATUS(esft_heatmap_write_svg(path, &sc, ESFT_SCORE_TOKEN, &cfg, &err), ESFT_ERR_RANGE);
    CHECK(strstr(err.message, "expert 8 of layer 1") != NULL);
    esft_expert_config_free(&cfg);
    CHECK_STATUS(esft_expert_config_parse(layer0, strlen(layer0), "layer0", &cfg, &err), ESFT_OK);
    CHECK_STATUS(esft_heatmap_write_svg(path, &sc, ESFT_SCORE_TOKEN, &cfg, &err), ESFT_ERR_SHAPE);
    esft_expert_config_free(&cfg);
    sc.token[8 + 3] = NAN;
    CHECK_STATUS(esft_heatmap_write_svg(path, &sc, ESFT_SCORE_TOKEN, NULL, &err), ESFT_ERR_NUMERIC);
    CHECK(strstr(err.message, "layer 1 expert 3") != NULL);
    CHECK(!exists(path));
    sc.token[8 + 3] = 0.0;
    sc.layer_present[1] = sc.layer_present[2] = 0;
    CHECK_STATUS(esft_heatmap_write_svg(path, &sc, ESFT_SCORE_TOKEN, NULL, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK(!exists(path));
    esft_scores_free(&sc);
}

TEST(heatmap_failure_keeps_existing_file)
{
    esft_scores sc;
    esft_error err;
    char *before, *after;
    const char *path = out_path("heatmap_keep.svg");
    make_scores(&sc);
    CHECK_STATUS(esft_heatmap_write_svg(path, &sc, ESFT_SCORE_TOKEN, NULL, &err), ESFT_OK);
    before = slurp(path, NULL);
    sc.gate[9] = INFINITY;
    CHECK_STATUS(esft_heatmap_write_svg(path, &sc, ESFT_SCORE_GATE, NULL, &err), ESFT_ERR_NUMERIC);
    after = slurp(path, NULL);
    CHECK(before && after && strcmp(before, after) == 0);
    free(before);
    free(after);
    esft_scores_free(&sc);
}

/* A config alone takes E from its highest id: a 62-byte config naming expert
   999999 used to make a 330 MB picture. Over 4096 experts or 65536 cells: refused. */
TEST(heatmap_refuses_oversized_grids)
{
    const char *huge = "{\"experts\": {\"1\": [999999]}, \"shared_experts\": false}";
    esft_expert_config cfg;
    esft_scores sc;
    esft_error err;
    const char *path = out_path("heatmap_huge.svg");
    remove(path);
    CHECK_STATUS(esft_expert_config_parse(huge, strlen(huge), "huge", &cfg, &err), ESFT_OK);
    CHECK_STATUS(esft_heatmap_write_svg(path, NULL, ESFT_SCORE_TOKEN, &cfg, &err), ESFT_ERR_RANGE);
    CHECK_MSG(strstr(err.message, "1000000 experts is too wide") != NULL, "%s", err.message);
    CHECK(!exists(path));
    esft_expert_config_free(&cfg);
    /* 17 layers x 4096 experts = 69632 cells > 65536 */
    CHECK_STATUS(esft_scores_alloc(&sc, 17, 4096, NULL), ESFT_OK);
    memset(sc.layer_present, 1, 17);
    CHECK_STATUS(esft_heatmap_write_svg(path, &sc, ESFT_SCORE_TOKEN, NULL, &err), ESFT_ERR_RANGE);
    CHECK_MSG(strstr(err.message, "17 layers x 4096 experts is too large") != NULL, "%s", err.message);
    CHECK(!exists(path));
    sc.layer_present[16] = 0; /* 16 x 4096 = 65536: the largest drawn */
    CHECK_STATUS(esft_heatmap_write_svg(path, &sc, ESFT_SCORE_TOKEN, NULL, &err), ESFT_OK);
    esft_scores_free(&sc);
    remove(path);
}

/* Under a comma-decimal locale the SVG still says y="12.5", not y="12,5" (which
   no renderer reads). Skipped where de_DE is not installed. */
TEST(heatmap_numbers_ignore_a_comma_decimal_locale)
{
    esft_scores sc;
    esft_expert_config cfg;
    const char *sel = "{\"experts\": {\"1\": [7, 2]}}";
    const char *path = out_path("heatmap_locale.svg"), *p;
    char *svg;
    int commas = 0;
    if (!setlocale(LC_NUMERIC, "de_DE.UTF-8") && !setlocale(LC_NUMERIC, "de_DE.utf8"))
        SKIP("locale de_DE.UTF-8 not installed");
    make_scores(&sc);
    CHECK_STATUS(esft_expert_config_parse(sel, strlen(sel), "sel", &cfg, NULL), ESFT_OK);
    CHECK_STATUS(esft_heatmap_write_svg(path, &sc, ESFT_SCORE_TOKEN, &cfg, NULL), ESFT_OK);
    svg = slurp(path, NULL);
    CHECK(svg != NULL);
    for (p = svg; p && *p; p++) /* a digit, a comma, a digit: a decimal comma */
        commas += p > svg && p[-1] >= '0' && p[-1] <= '9' && *p == ',' && p[1] >= '0' && p[1] <= '9';
    CHECK_MSG(commas == 0, "%d decimal commas in the SVG", commas);
    CHECK(svg && strstr(svg, "score 0.125<") != NULL && strstr(svg, "(12.5%)") != NULL);
    free(svg);
    esft_expert_config_free(&cfg);
    esft_scores_free(&sc);
    setlocale(LC_NUMERIC, "C");
}

HARNESS_MAIN()
