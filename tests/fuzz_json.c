/* fuzz_json.c - libFuzzer target for the JSON reader and the two JSON formats:
   esft_json_parse, esft_scores_parse_json, esft_expert_config_parse. Beyond "no
   crash, no leak, no UB" it checks invariants of what a successful parse returns
   and aborts when one breaks.

   libFuzzer (tests/fuzz.sh, `make fuzz`):
       clang -g -O1 -fsanitize=fuzzer,address,undefined -DESFT_LIBFUZZER -I. tests/fuzz_json.c -lm
   Plain replay of files (any compiler): cc -I. tests/fuzz_json.c -lm && ./a.out tests/corpus/json/... */
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) { fprintf(stderr, "invariant failed: %s (%s:%d)\n", #c, __FILE__, __LINE__); abort(); } } while (0)

/* Token tree invariants: spans inside the text, subtrees well nested, and
   every string and number token decodes. */
static void check_tokens(const esft_json *js, size_t size)
{
    int i;
    REQUIRE(js->n_tokens >= 1 && js->tokens[0].next == js->n_tokens);
    for (i = 0; i < js->n_tokens; i++) {
        const esft_json_token *t = js->tokens + i;
        char buf[64];
        double v;
        REQUIRE(t->start <= t->end && t->end <= size);
        REQUIRE(t->next > i && t->next <= js->n_tokens);
        if (t->type == ESFT_JSON_STRING) {
            esft_status s = esft_json_string(js, i, buf, sizeof buf);
            REQUIRE(s == ESFT_OK || s == ESFT_ERR_RANGE);
            (void)esft_json_string_equals(js, i, "token_scores");
        } else if (t->type == ESFT_JSON_NUMBER) {
            esft_status s = esft_json_number(js, i, &v);
            REQUIRE(s == ESFT_OK || s == ESFT_ERR_RANGE);
            REQUIRE(s != ESFT_OK || isfinite(v));
        } else if (t->type == ESFT_JSON_OBJECT || t->type == ESFT_JSON_ARRAY) {
            int k = i + 1, n;
            for (n = 0; n < t->size; n++) {
                if (t->type == ESFT_JSON_OBJECT) {
                    REQUIRE(js->tokens[k].type == ESFT_JSON_STRING);
                    k++;
                }
                REQUIRE(k < t->next);
                k = js->tokens[k].next;
            }
            REQUIRE(k == t->next);
        } else {
            REQUIRE(t->next == i + 1);
        }
    }
    (void)esft_json_find(js, 0, "experts");
}

static void check_scores(const esft_scores *sc)
{
    int l, e, present = 0;
    esft_expert_config cfg;
    REQUIRE(sc->n_layers >= 1 && sc->n_experts >= 1);
    for (l = 0; l < sc->n_layers; l++) {
        present += sc->layer_present[l] != 0;
        for (e = 0; e < sc->n_experts; e++) {
            size_t i = (size_t)l * sc->n_experts + e;
            REQUIRE(isfinite(sc->token[i]) && isfinite(sc->gate[i]));
        }
    }
    REQUIRE(present >= 1);
    /* selection must cope with whatever scores a file holds (negative too) */
    if (esft_select_top_p(sc, ESFT_SCORE_TOKEN, 0.2, &cfg, NULL) == ESFT_OK) {
        REQUIRE(esft_expert_config_count(&cfg) >= present);
        esft_expert_config_free(&cfg);
    }
    if (esft_select_top_k(sc, ESFT_SCORE_GATE, 1, &cfg, NULL) == ESFT_OK) {
        REQUIRE(esft_expert_config_count(&cfg) == present);
        esft_expert_config_free(&cfg);
    }
    if (esft_select_budget(sc, ESFT_SCORE_TOKEN, 1, &cfg, NULL) == ESFT_OK) {
        REQUIRE(esft_expert_config_count(&cfg) == 1);
        esft_expert_config_free(&cfg);
    }
}

static void check_config(const esft_expert_config *cfg)
{
    int l, i;
    REQUIRE(cfg->n_layers >= 1 && cfg->offset[0] == 0);
    for (l = 0; l < cfg->n_layers; l++) {
        REQUIRE(cfg->offset[l] <= cfg->offset[l + 1]);
        REQUIRE(cfg->layer_present[l] || cfg->offset[l] == cfg->offset[l + 1]);
        for (i = cfg->offset[l]; i < cfg->offset[l + 1]; i++) {
            REQUIRE(cfg->ids[i] >= 0);
            REQUIRE(esft_expert_config_has(cfg, l, cfg->ids[i]));
        }
    }
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    const char *text = (const char *)data;
    esft_json js;
    esft_scores sc;
    esft_expert_config cfg;
    esft_error err;
    memset(&err, 0, sizeof err); /* esft_json_parse fills only what a failure sets */
    if (esft_json_parse(&js, text, size, NULL, &err) == ESFT_OK) {
        check_tokens(&js, size);
        esft_json_free(&js);
    } else {
        REQUIRE(err.status != ESFT_OK && err.message[0] && err.line >= 1);
        REQUIRE(err.offset >= 0 && (size_t)err.offset <= size);
    }
    if (esft_scores_parse_json(text, size, "fuzz", &sc, &err) == ESFT_OK) {
        check_scores(&sc);
        esft_scores_free(&sc);
    } else {
        REQUIRE(err.message[0] && strcmp(err.file, "fuzz") == 0);
        REQUIRE(sc.token == NULL && sc.gate == NULL);
    }
    if (esft_expert_config_parse(text, size, "fuzz", &cfg, &err) == ESFT_OK) {
        check_config(&cfg);
        esft_expert_config_free(&cfg);
    } else {
        REQUIRE(err.message[0] && strcmp(err.file, "fuzz") == 0);
        REQUIRE(cfg.ids == NULL && cfg.offset == NULL);
    }
    return 0;
}

#include "fuzz_main.h"
