/* collect_stats.c - how an inference engine that vendors esft.h collects ESFT
   router statistics during its own forward passes, with no Python and no log files.

   Build and run (from the repository root):
       cc -std=c99 -O2 -I. examples/collect_stats.c -o collect_stats -lm
       ./collect_stats [OUTDIR]          # writes OUTDIR/summary.json, config.json, heatmap.svg

   The "model" is a stand-in with the shape of DeepSeek-V2-Lite, shrunk: layer 0
   is dense (no router), layers 1..4 are MoE layers with 16 routed experts, top-4,
   softmax gating without renormalisation. Router weights and token embeddings
   are seeded random numbers. The task data are a few samples of prompt + response
   tokens; the response tokens come from a narrow part of the vocabulary (a
   "task"), so a few experts carry most of them. Only response tokens are
   counted (the mask), as you would when scoring a fine-tuning task.

   Where your engine does the same:
     1. once:              esft_stats_init(&st, n_layers, n_experts, top_k, NULL)
     2. every MoE layer:   esft_route(...) on the router logits (or your own top-k),
                           then esft_stats_add(&st, layer, ids, weights, mask, T, &err)
     3. at the end:        esft_stats_scores -> esft_scores_write_json,
                           esft_select_top_p -> esft_expert_config_write,
                           esft_heatmap_write_svg.
   With several threads or GPUs, give each its own esft_stats and esft_stats_merge
   them: the sums are integers, so the result is the same bits in any order. */
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

enum { D = 16, E = 16, K = 4, LAYERS = 5, FIRST_MOE = 1, VOCAB = 256, SAMPLES = 6, MAX_T = 48 };

/* A tiny deterministic generator (xorshift64*), so every run gives the same numbers. */
static unsigned long long rng_state = 0x9E3779B97F4A7C15ULL;
static double rng_uniform(void) /* [0, 1) */
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

typedef struct model {
    float embed[VOCAB][D];        /* token embeddings */
    float router[LAYERS][E][D];   /* router weights of each MoE layer, (E, D) */
    float expert[LAYERS][E][D];   /* each expert's output direction (a stand-in for its FFN) */
} model;

static void model_init(model *m)
{
    float *all = &m->embed[0][0];
    size_t i, n = sizeof *m / sizeof(float);
    for (i = 0; i < n; i++) all[i] = (float)(rng_uniform() * 2.0 - 1.0);
}

/* One MoE layer on T tokens: router logits, routing, statistics, then the
   experts' (stand-in) update of the hidden states. */
static esft_status moe_layer(const model *m, int layer, float h[][D], int T, const unsigned char *mask,
                             esft_stats *st, esft_error *err)
{
    static float logits[MAX_T * E], weights[MAX_T * K];
    static int32_t ids[MAX_T * K];
    esft_route_config rc = esft_route_config_init(E, K); /* softmax, no renormalisation */
    esft_status s;
    int t, e, j, d;
    for (t = 0; t < T; t++)
        for (e = 0; e < E; e++) {
            float acc = 0.0f;
            for (d = 0; d < D; d++) acc += m->router[layer][e][d] * h[t][d];
            logits[t * E + e] = acc;
        }
    s = esft_route(&rc, ids, weights, NULL, logits, T, err);
    if (s != ESFT_OK) return s;
    s = esft_stats_add(st, layer, ids, weights, mask, T, err); /* <- the one line an engine adds */
    if (s != ESFT_OK) return s;
    for (t = 0; t < T; t++)
        for (d = 0; d < D; d++) {
            float acc = h[t][d];
            for (j = 0; j < K; j++) acc += weights[t * K + j] * m->expert[layer][ids[t * K + j]][d];
            h[t][d] = (float)tanh(acc);
        }
    return ESFT_OK;
}

/* A forward pass over one sample: embeddings, a dense layer 0, the MoE layers. */
static esft_status forward(const model *m, const int *tokens, int T, const unsigned char *mask, esft_stats *st,
                           esft_error *err)
{
    static float h[MAX_T][D];
    int t, d, l;
    for (t = 0; t < T; t++)
        for (d = 0; d < D; d++) h[t][d] = (float)tanh(m->embed[tokens[t]][d]); /* "dense layer 0" */
    for (l = FIRST_MOE; l < LAYERS; l++) {
        esft_status s = moe_layer(m, l, h, T, mask, st, err);
        if (s != ESFT_OK) return s;
    }
    return ESFT_OK;
}

static int fail(const char *what, esft_status s, const esft_error *err)
{
    fprintf(stderr, "collect_stats: %s: %s%s%s (%s)\n", what, err->file, err->file[0] ? ": " : "", err->message,
            esft_status_string(s));
    return 1;
}

int main(int argc, char **argv)
{
    static model m;
    const char *dir = argc > 1 ? argv[1] : ".";
    char path[3][1024];
    esft_stats st;
    esft_scores sc;
    esft_expert_config cfg;
    esft_error err;
    esft_status s;
    int i, t;
    memset(&err, 0, sizeof err);
    model_init(&m);
    s = esft_stats_init(&st, LAYERS, E, K, NULL); /* layer 0 is never fed: absent from the outputs */
    if (s != ESFT_OK) return fail("init", s, &err);

    for (i = 0; i < SAMPLES; i++) {
        int tokens[MAX_T], prompt = 8 + i % 3, T = 24 + 4 * i;
        unsigned char mask[MAX_T];
        for (t = 0; t < T; t++) {
            int is_response = t >= prompt;
            /* prompts use the whole vocabulary, responses a narrow "task" slice of it */
            tokens[t] = is_response ? (int)(rng_uniform() * 12) : (int)(rng_uniform() * VOCAB);
            mask[t] = (unsigned char)is_response; /* count only response tokens */
        }
        s = forward(&m, tokens, T, mask, &st, &err);
        if (s != ESFT_OK) return fail("forward", s, &err);
    }

    snprintf(path[0], sizeof path[0], "%s/summary.json", dir);
    snprintf(path[1], sizeof path[1], "%s/config.json", dir);
    snprintf(path[2], sizeof path[2], "%s/heatmap.svg", dir);
    s = esft_stats_scores(&st, ESFT_NORM_POOLED, &sc); /* ESFT's summary.json normalisation */
    if (s != ESFT_OK) return fail("scores", s, &err);
    esft_scores_round(&sc, 4); /* as ESFT does before selecting */
    if ((s = esft_scores_write_json(path[0], &sc, 4, &err)) != ESFT_OK) return fail("summary", s, &err);
    if ((s = esft_select_top_p(&sc, ESFT_SCORE_TOKEN, 0.2, &cfg, &err)) != ESFT_OK) return fail("select", s, &err);
    if ((s = esft_expert_config_write(path[1], &cfg, &err)) != ESFT_OK) return fail("config", s, &err);
    if ((s = esft_heatmap_write_svg(path[2], &sc, ESFT_SCORE_TOKEN, &cfg, &err)) != ESFT_OK)
        return fail("heatmap", s, &err);

    printf("%d samples through %d MoE layers (%d experts, top-%d); %llu response tokens counted per layer\n",
           SAMPLES, LAYERS - FIRST_MOE, E, K, (unsigned long long)st.n_tokens[FIRST_MOE]);
    for (i = FIRST_MOE; i < LAYERS; i++) {
        printf("  layer %d: train experts", i);
        for (t = cfg.offset[i]; t < cfg.offset[i + 1]; t++) printf(" %d", (int)cfg.ids[t]);
        printf("\n");
    }
    printf("%d of %d experts selected (token score, top-p 0.2)\nwrote %s, %s, %s\n", esft_expert_config_count(&cfg),
           (LAYERS - FIRST_MOE) * E, path[0], path[1], path[2]);
    esft_expert_config_free(&cfg);
    esft_scores_free(&sc);
    esft_stats_uninit(&st);
    return 0;
}
