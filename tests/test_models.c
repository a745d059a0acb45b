/* test_models.c - Hugging Face MoE and dense checkpoints through esft_model_forward,
   against the goldens transformers wrote (tests/gen_models.py, tests/models/):
   logits, pooled loss, every MoE layer's routing (ids as sets, weights), the
   router counts over all and over labelled tokens through esft_stats, the same
   bits for any thread count, and bad input (unknown model_type, an FP8 weight
   without its scale, truncated files, malformed JSONL, ids past the vocabulary).
   Run from the repository root (make test does). */
#define _POSIX_C_SOURCE 200809L
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"
#include "harness.h"
#include "slurp.h"

#include <sys/stat.h>
#include <unistd.h>

#define MODELS "tests/models/"
#define LOGITS_TOL 1e-4  /* relative to the largest logit (issue 9) */
#define WEIGHT_TOL 1e-4

static const char *const variants[] = {
    "deepseek_v2_lite", "deepseek_v2_qlora_yarn", "deepseek_v3_fp8", "deepseek_v3_bf16_tied",
    "qwen2_moe",        "qwen2_moe_fused",        "qwen3_moe",       "olmoe",
    "mixtral",          "llama",                  "mistral",         "qwen2",
};
#define N_VARIANTS ((int)(sizeof variants / sizeof variants[0]))

/* ---- the golden file ---------------------------------------------------- */

typedef struct golden {
    esft_safetensors st;
    float *logits, *router_weights;
    int64_t *router_ids, *counts_all, *counts_labelled, *moe_layers;
    float loss;
    int64_t n_tokens;
    int P, V, M, K, E;
} golden;

static int64_t shape_numel(const esft_st_tensor *t)
{
    int64_t n = 1;
    int i;
    for (i = 0; i < t->n_dims; i++) n *= t->shape[i];
    return n;
}

static float *golden_f32(golden *g, const char *name)
{
    int i = esft_safetensors_find(&g->st, name);
    float *dst;
    if (i < 0) return NULL;
    dst = (float *)malloc((size_t)shape_numel(&g->st.tensors[i]) * sizeof(float));
    if (dst && esft_safetensors_read_f32(&g->st, i, dst, NULL) != ESFT_OK) {
        free(dst);
        return NULL;
    }
    return dst;
}

static int64_t *golden_i64(golden *g, const char *name)
{
    int i = esft_safetensors_find(&g->st, name);
    int64_t *dst;
    if (i < 0) return NULL;
    dst = (int64_t *)malloc((size_t)shape_numel(&g->st.tensors[i]) * sizeof(int64_t));
    if (dst && esft_safetensors_read_i64(&g->st, i, dst, NULL) != ESFT_OK) {
        free(dst);
        return NULL;
    }
    return dst;
}

static void golden_free(golden *g)
{
    free(g->logits);
    free(g->router_weights);
    free(g->router_ids);
    free(g->counts_all);
    free(g->counts_labelled);
    free(g->moe_layers);
    esft_safetensors_close(&g->st);
}

static int golden_read(golden *g, const char *variant)
{
    char path[512];
    float *loss;
    int64_t *n;
    const esft_st_tensor *ids;
    int dense;
    memset(g, 0, sizeof *g);
    snprintf(path, sizeof path, MODELS "%s/golden.safetensors", variant);
    if (esft_safetensors_open(&g->st, path, NULL, NULL) != ESFT_OK) return 0;
    g->logits = golden_f32(g, "logits");
    g->router_weights = golden_f32(g, "router_weights");
    g->router_ids = golden_i64(g, "router_ids");
    g->counts_all = golden_i64(g, "router_counts_all");
    g->counts_labelled = golden_i64(g, "router_counts_labelled");
    g->moe_layers = golden_i64(g, "moe_layers");
    loss = golden_f32(g, "loss");
    n = golden_i64(g, "n_tokens");
    /* a dense model's golden has no routing tensors at all (M = K = E = 0) */
    dense = esft_safetensors_find(&g->st, "moe_layers") < 0;
    if (!g->logits || !loss || !n ||
        (!dense && (!g->router_weights || !g->router_ids || !g->counts_all || !g->counts_labelled || !g->moe_layers))) {
        free(loss);
        free(n);
        return 0;
    }
    g->loss = loss[0];
    g->n_tokens = n[0];
    free(loss);
    free(n);
    g->P = (int)g->st.tensors[esft_safetensors_find(&g->st, "logits")].shape[0];
    g->V = (int)g->st.tensors[esft_safetensors_find(&g->st, "logits")].shape[1];
    if (dense) return 1;
    ids = &g->st.tensors[esft_safetensors_find(&g->st, "router_ids")];
    g->M = (int)ids->shape[0];
    g->K = (int)ids->shape[2];
    g->E = (int)g->st.tensors[esft_safetensors_find(&g->st, "router_counts_all")].shape[1];
    return 1;
}

/* ---- one pass of a dataset through a model ------------------------------- */

/* What the forward produced for every position of every sample. */
typedef struct pass {
    float *logits;       /* (P, V) */
    int32_t *ids;        /* (L, P, K) at the model's layer index */
    float *weights;      /* (L, P, K) */
    int64_t base;        /* first position of the sample being run */
    int P, K, calls;
    double loss_sum;
    int64_t n_scored;
    esft_stats all, labelled;
} pass;

static void record_route(void *user, int layer, const int32_t *ids, const float *w, int T, int K)
{
    pass *p = (pass *)user;
    size_t at = ((size_t)layer * p->P + (size_t)p->base) * K;
    memcpy(p->ids + at, ids, (size_t)T * K * sizeof *ids);
    memcpy(p->weights + at, w, (size_t)T * K * sizeof *w);
    p->calls++;
}

static void pass_free(pass *p)
{
    free(p->logits);
    free(p->ids);
    free(p->weights);
    esft_stats_uninit(&p->all);
    esft_stats_uninit(&p->labelled);
}

/* Runs every sample of ds; 0 with err set on failure. */
static esft_status pass_run(pass *p, const esft_model *m, const esft_dataset *ds, esft_error *err)
{
    const esft_model_config *c = &m->cfg;
    int V = c->vocab, K = c->route.top_k, L = c->n_layers, s;
    unsigned char *mask;
    esft_status st = ESFT_OK;
    memset(p, 0, sizeof *p);
    p->P = (int)ds->offset[ds->n_samples];
    p->K = K;
    p->logits = (float *)malloc((size_t)p->P * V * sizeof(float));
    /* + 1: a dense model routes nothing (K = 0), and calloc(0) may be NULL */
    p->ids = (int32_t *)calloc((size_t)L * p->P * K + 1, sizeof(int32_t));
    p->weights = (float *)calloc((size_t)L * p->P * K + 1, sizeof(float));
    mask = (unsigned char *)malloc((size_t)p->P);
    if (!p->logits || !p->ids || !p->weights || !mask) {
        free(mask);
        return ESFT_ERR_OUT_OF_MEMORY;
    }
    if (esft_model_config_moe_layers(c) > 0) { /* stats of a model without a router: nothing to count */
        esft_stats_init(&p->all, L, c->route.n_experts, K, NULL);
        esft_stats_init(&p->labelled, L, c->route.n_experts, K, NULL);
    }
    for (s = 0; s < p->P; s++) mask[s] = ds->labels[s] != -100;
    for (s = 0; s < ds->n_samples && st == ESFT_OK; s++) {
        int64_t o = ds->offset[s];
        int T = (int)(ds->offset[s + 1] - o);
        double loss = 0;
        int64_t n = 0;
        esft_model_run r;
        memset(&r, 0, sizeof r);
        r.labels = ds->labels + o;
        r.logits = p->logits + (size_t)o * V;
        r.stats = p->all.count ? &p->all : NULL;
        r.on_route = record_route;
        r.user = p;
        p->base = o;
        st = esft_model_forward(m, ds->ids + o, T, &r, &loss, &n, err);
        if (st == ESFT_OK) {
            /* a second forward for the labelled counts: the same model twice
               must route the same tokens the same way */
            esft_model_run r2;
            memset(&r2, 0, sizeof r2);
            r2.stats = p->labelled.count ? &p->labelled : NULL;
            r2.stats_mask = mask + o;
            st = esft_model_forward(m, ds->ids + o, T, &r2, NULL, NULL, err);
        }
        p->loss_sum += loss;
        p->n_scored += n;
    }
    free(mask);
    return st;
}

/* ---- comparisons --------------------------------------------------------- */

static double max_abs_f(const float *a, size_t n)
{
    double m = 0;
    size_t i;
    for (i = 0; i < n; i++) m = fmax(m, fabs((double)a[i]));
    return m;
}

static double max_diff_f(const float *a, const float *b, size_t n)
{
    double m = 0;
    size_t i;
    for (i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - (double)b[i]));
    return m;
}

/* Routing of one token as a set: the golden's weight of the expert our forward
   chose, or -1 when the golden did not choose it. */
static double golden_weight_of(const golden *g, int mi, int t, int id)
{
    size_t at = ((size_t)mi * g->P + t) * g->K;
    int k;
    for (k = 0; k < g->K; k++)
        if (g->router_ids[at + k] == id) return g->router_weights[at + k];
    return -1;
}

typedef struct route_diff {
    int set_mismatch;   /* tokens whose chosen experts differ */
    double weight_diff; /* worst |w - w_golden| over matching tokens */
} route_diff;

static route_diff compare_routing(const golden *g, const pass *p)
{
    route_diff d = {0, 0};
    int mi, t, k;
    for (mi = 0; mi < g->M; mi++) {
        int layer = (int)g->moe_layers[mi];
        for (t = 0; t < g->P; t++) {
            size_t at = ((size_t)layer * p->P + t) * p->K;
            int bad = 0;
            for (k = 0; k < p->K; k++) {
                double gw = golden_weight_of(g, mi, t, p->ids[at + k]);
                if (gw < 0) bad = 1;
                else d.weight_diff = fmax(d.weight_diff, fabs(gw - p->weights[at + k]));
            }
            d.set_mismatch += bad;
        }
    }
    return d;
}

/* Counts of the golden's layer mi against the accumulator's row of that layer. */
static int counts_equal(const int64_t *golden_counts, const golden *g, const esft_stats *st)
{
    int mi, e;
    for (mi = 0; mi < g->M; mi++) {
        int layer = (int)g->moe_layers[mi];
        for (e = 0; e < g->E; e++)
            if ((int64_t)st->count[(size_t)layer * st->n_experts + e] != golden_counts[(size_t)mi * g->E + e])
                return 0;
    }
    return 1;
}

static int open_variant(esft_model *m, esft_dataset *ds, const char *variant, esft_error *err)
{
    char path[512];
    snprintf(path, sizeof path, MODELS "%s", variant);
    if (esft_model_open(m, path, NULL, err) != ESFT_OK) return 0;
    snprintf(path, sizeof path, MODELS "%s/data.jsonl", variant);
    if (esft_dataset_read_jsonl(ds, path, 0, m->cfg.vocab, NULL, err) != ESFT_OK) {
        esft_model_close(m);
        return 0;
    }
    return 1;
}

/* One variant against its golden: everything transformers recorded. */
static void check_variant(const char *variant)
{
    esft_model m;
    esft_dataset ds;
    esft_error err;
    golden g;
    pass p;
    double scale, diff, loss;
    route_diff rd;
    int moe_layers;
    memset(&err, 0, sizeof err);
    CHECK_MSG(golden_read(&g, variant), "%s: golden.safetensors unreadable", variant);
    if (!open_variant(&m, &ds, variant, &err)) {
        golden_free(&g);
        CHECK_MSG(0, "%s: open: %s", variant, err.message);
    }
    moe_layers = esft_model_config_moe_layers(&m.cfg);
    if (pass_run(&p, &m, &ds, &err) != ESFT_OK) {
        pass_free(&p);
        esft_dataset_free(&ds);
        esft_model_close(&m);
        golden_free(&g);
        CHECK_MSG(0, "%s: forward: %s", variant, err.message);
    }
    scale = fmax(1.0, max_abs_f(g.logits, (size_t)g.P * g.V));
    diff = g.P == p.P && g.V == m.cfg.vocab ? max_diff_f(p.logits, g.logits, (size_t)g.P * g.V) : 1e30;
    loss = p.n_scored ? p.loss_sum / (double)p.n_scored : 0;
    rd = compare_routing(&g, &p);
    printf("     %-24s logits max|diff|/max|logit| %.2e  loss %.7f (golden %.7f)  weights %.1e\n", variant,
           diff / scale, loss, g.loss, rd.weight_diff);
    {
        int ok_shape = g.P == p.P && g.V == m.cfg.vocab && g.M == moe_layers && g.K == p.K;
        int ok_logits = diff <= LOGITS_TOL * scale;
        int ok_loss = fabs(loss - g.loss) <= 1e-5 * fmax(1.0, fabs(g.loss)) && p.n_scored == g.n_tokens;
        int ok_calls = p.calls == moe_layers * ds.n_samples;
        int ok_counts = counts_equal(g.counts_all, &g, &p.all) && counts_equal(g.counts_labelled, &g, &p.labelled);
        int sets = rd.set_mismatch;
        double wd = rd.weight_diff;
        pass_free(&p);
        esft_dataset_free(&ds);
        esft_model_close(&m);
        golden_free(&g);
        CHECK_MSG(ok_shape, "%s: shapes differ from the golden", variant);
        CHECK_MSG(ok_logits, "%s: logits differ by %.3g (max logit %.3g)", variant, diff, scale);
        CHECK_MSG(ok_loss, "%s: loss %.8f over %lld tokens, golden %.8f", variant, loss,
                  (long long)p.n_scored, g.loss);
        CHECK_MSG(ok_calls, "%s: %d route callbacks, expected %d", variant, p.calls, moe_layers * ds.n_samples);
        CHECK_MSG(sets == 0, "%s: %d tokens routed to other experts than transformers chose", variant, sets);
        CHECK_MSG(wd <= WEIGHT_TOL, "%s: routing weights differ by %.3g", variant, wd);
        CHECK_MSG(ok_counts, "%s: router counts differ from the golden", variant);
    }
}

TEST(deepseek_v2_lite_matches_transformers) { check_variant("deepseek_v2_lite"); }
TEST(deepseek_v2_qlora_yarn_matches_transformers) { check_variant("deepseek_v2_qlora_yarn"); }
TEST(deepseek_v3_fp8_matches_transformers) { check_variant("deepseek_v3_fp8"); }
TEST(deepseek_v3_bf16_tied_matches_transformers) { check_variant("deepseek_v3_bf16_tied"); }
TEST(qwen2_moe_matches_transformers) { check_variant("qwen2_moe"); }
TEST(qwen2_moe_fused_matches_transformers) { check_variant("qwen2_moe_fused"); }
TEST(qwen3_moe_matches_transformers) { check_variant("qwen3_moe"); }
TEST(olmoe_matches_transformers) { check_variant("olmoe"); }
TEST(mixtral_matches_transformers) { check_variant("mixtral"); }
TEST(llama_dense_matches_transformers) { check_variant("llama"); }
TEST(mistral_dense_sliding_window_matches_transformers) { check_variant("mistral"); }
TEST(qwen2_dense_tied_matches_transformers) { check_variant("qwen2"); }

/* The forward's logits and routing: the same bits for 1 and 3 threads. */
TEST(forward_same_bits_for_any_thread_count)
{
    int v, bad = -1;
    for (v = 0; v < N_VARIANTS && bad < 0; v++) {
        esft_model m;
        esft_dataset ds;
        esft_error err;
        pass one, three;
        int same;
        if (!open_variant(&m, &ds, variants[v], &err)) CHECK_MSG(0, "%s: %s", variants[v], err.message);
        esft_set_num_threads(1);
        pass_run(&one, &m, &ds, &err);
        esft_set_num_threads(3);
        pass_run(&three, &m, &ds, &err);
        esft_set_num_threads(0);
        same = memcmp(one.logits, three.logits, (size_t)one.P * m.cfg.vocab * sizeof(float)) == 0 &&
               memcmp(one.weights, three.weights, (size_t)m.cfg.n_layers * one.P * one.K * sizeof(float)) == 0 &&
               memcmp(one.ids, three.ids, (size_t)m.cfg.n_layers * one.P * one.K * sizeof(int32_t)) == 0 &&
               one.loss_sum == three.loss_sum;
        if (!same) bad = v;
        pass_free(&one);
        pass_free(&three);
        esft_dataset_free(&ds);
        esft_model_close(&m);
    }
    CHECK_MSG(bad < 0, "%s: 1 and 3 threads give different bits", bad >= 0 ? variants[bad] : "");
}

/* Each family reads as its model_type, with the MoE layers of its config. */
TEST(config_names_family_and_moe_layers)
{
    esft_model_config c;
    esft_error err;
    CHECK_STATUS(esft_model_config_read(&c, MODELS "deepseek_v2_lite/config.json", &err), ESFT_OK);
    CHECK(c.family == ESFT_MODEL_DEEPSEEK_V2 && c.mla && c.q_lora_rank == 0);
    CHECK(!c.is_moe[0] && c.is_moe[1] && c.is_moe[2]);
    CHECK_EQ_INT(esft_model_config_moe_layers(&c), 2);
    CHECK(strcmp(esft_model_family_name(c.family), "deepseek_v2") == 0);
    CHECK_STATUS(esft_model_config_read(&c, MODELS "deepseek_v2_qlora_yarn/config.json", &err), ESFT_OK);
    CHECK(c.q_lora_rank > 0 && c.rope.yarn && c.rope.interleaved);
    CHECK_STATUS(esft_model_config_read(&c, MODELS "qwen3_moe/config.json", &err), ESFT_OK);
    CHECK(c.family == ESFT_MODEL_QWEN3_MOE && c.qk_norm == ESFT_QK_NORM_HEAD);
    CHECK_STATUS(esft_model_config_read(&c, MODELS "olmoe/config.json", &err), ESFT_OK);
    CHECK(c.family == ESFT_MODEL_OLMOE && c.qk_norm == ESFT_QK_NORM_WHOLE && c.tie_embeddings);
}

/* A dense model through what ESFT's training builds on: an empty trainable
   set, a forward-backward that trains nothing but computes the forward's loss
   (its own attention: window, biases), and an expert of a dense layer refused. */
static void check_dense_trainable(const char *variant)
{
    esft_model m;
    esft_model_trainable tr;
    esft_expert_config none, one;
    esft_model_run r;
    esft_error err;
    const char *empty = "{\"experts\": {}, \"shared_experts\": false, \"non_expert_modules\": false}";
    const char *layer0 = "{\"experts\": {\"0\": [0]}, \"shared_experts\": false, \"non_expert_modules\": false}";
    int32_t ids[20] = {1, 5, 9, 3, 7, 2, 8, 4, 6, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20};
    char path[256];
    double loss = 0, fwd_loss = 0;
    int64_t n = 0, fwd_n = 0;
    snprintf(path, sizeof path, MODELS "%s", variant);
    CHECK_STATUS(esft_model_open(&m, path, NULL, &err), ESFT_OK);
    CHECK_STATUS(esft_expert_config_parse(empty, strlen(empty), "e.json", &none, &err), ESFT_OK);
    CHECK_STATUS(esft_expert_config_parse(layer0, strlen(layer0), "e.json", &one, &err), ESFT_OK);
    CHECK_STATUS(esft_model_trainable_init(&tr, &m, &none, NULL, &err), ESFT_OK);
    CHECK(tr.n_trained == 0 && tr.n_params == 0 && tr.n_experts == 0);
    CHECK(esft_model_trainable_expert(&tr, tr.params, 0, 0) == NULL);
    CHECK_STATUS(esft_model_forward_backward(&m, &tr, ids, ids, 20, 1.0f, &loss, &n, &err), ESFT_OK);
    memset(&r, 0, sizeof r);
    r.labels = ids;
    CHECK_STATUS(esft_model_forward(&m, ids, 20, &r, &fwd_loss, &fwd_n, &err), ESFT_OK);
    CHECK_MSG(n == 19 && fwd_n == 19 && fabs(loss - fwd_loss) <= 1e-6 * fabs(fwd_loss), "%s: loss %.9g vs %.9g",
              variant, loss, fwd_loss);
    esft_model_trainable_uninit(&tr);
    CHECK_STATUS(esft_model_trainable_init(&tr, &m, &one, NULL, &err), ESFT_ERR_RANGE);
    CHECK_MSG(strstr(err.message, "dense layer") != NULL, "message: %s", err.message);
    esft_expert_config_free(&none);
    esft_expert_config_free(&one);
    esft_model_close(&m);
}

TEST(dense_model_trainable_set_is_empty)
{
    check_dense_trainable("llama");
    check_dense_trainable("mistral");
    check_dense_trainable("qwen2");
}

/* ---- bad input ---------------------------------------------------------- */

/* Text of config.json of a variant with one substring replaced. */
static esft_status parse_edited_config(const char *variant, const char *from, const char *to, esft_error *err)
{
    char path[512], *text, *at, *edited;
    size_t size;
    esft_model_config c;
    esft_status st;
    snprintf(path, sizeof path, MODELS "%s/config.json", variant);
    text = slurp(path, &size);
    if (!text) return ESFT_ERR_IO;
    at = strstr(text, from);
    if (!at) {
        free(text);
        return ESFT_ERR_IO;
    }
    edited = (char *)malloc(size + strlen(to) + 1);
    memcpy(edited, text, (size_t)(at - text));
    strcpy(edited + (at - text), to);
    strcat(edited, at + strlen(from));
    st = esft_model_config_parse(&c, edited, strlen(edited), "config.json", err);
    free(text);
    free(edited);
    return st;
}

/* The dense families: every layer dense, no router (E = K = 0), the fields each reads. */
TEST(dense_configs_have_no_moe_layer)
{
    esft_model_config c;
    esft_error err;
    int l, dense = 1;
    CHECK_STATUS(esft_model_config_read(&c, MODELS "llama/config.json", &err), ESFT_OK);
    CHECK(c.family == ESFT_MODEL_LLAMA && !c.mla && c.head_dim == 24 && c.n_kv_heads == 2);
    CHECK(c.qkv_bias && c.o_bias); /* attention_bias true: q/k/v and o */
    CHECK(c.d_ff == 96 && c.route.n_experts == 0 && c.route.top_k == 0 && c.rope.theta == 500000.0);
    CHECK_EQ_INT(esft_model_config_moe_layers(&c), 0);
    CHECK_STATUS(esft_model_config_read(&c, MODELS "mistral/config.json", &err), ESFT_OK);
    CHECK(c.family == ESFT_MODEL_MISTRAL && c.sliding_window == 8 && c.head_dim == 16);
    CHECK_STATUS(esft_model_config_read(&c, MODELS "qwen2/config.json", &err), ESFT_OK);
    CHECK(c.family == ESFT_MODEL_QWEN2 && c.qkv_bias && c.tie_embeddings && c.sliding_window == 0);
    for (l = 0; l < c.n_layers; l++) dense &= !c.is_moe[l];
    CHECK(dense);
    CHECK(strcmp(esft_model_family_name(ESFT_MODEL_QWEN2), "qwen2") == 0);
    /* head_dim null (older Mistral configs) is hidden / heads */
    CHECK_STATUS(parse_edited_config("mistral", "\"head_dim\": 16", "\"head_dim\": null", &err), ESFT_OK);
}

TEST(unknown_model_type_is_unsupported_naming_the_field)
{
    esft_error err;
    CHECK_STATUS(parse_edited_config("olmoe", "\"olmoe\"", "\"gpt_oss\"", &err), ESFT_ERR_UNSUPPORTED);
    CHECK_MSG(strstr(err.message, "model_type") != NULL, "message: %s", err.message);
}

TEST(unimplemented_field_values_are_unsupported_naming_the_field)
{
    esft_error err;
    CHECK_STATUS(parse_edited_config("mixtral", "\"silu\"", "\"gelu\"", &err), ESFT_ERR_UNSUPPORTED);
    CHECK_MSG(strstr(err.message, "hidden_act") != NULL, "message: %s", err.message);
    CHECK_STATUS(parse_edited_config("deepseek_v2_lite", "\"topk_method\": \"greedy\"",
                                     "\"topk_method\": \"sinkhorn\"", &err),
                 ESFT_ERR_UNSUPPORTED);
    CHECK_MSG(strstr(err.message, "topk_method") != NULL, "message: %s", err.message);
}

/* What the dense families' configs may ask for that the forward does not
   compute: refused, the message naming the field. */
TEST(dense_unsupported_options_are_refused_naming_the_field)
{
    static const struct {
        const char *variant, *from, *to, *field;
    } cases[] = {
        {"llama", "\"mlp_bias\": false", "\"mlp_bias\": true", "mlp_bias"},
        {"llama", "\"rope_type\": \"default\"", "\"rope_type\": \"llama3\"", "rope_type"},
        {"mistral", "\"rope_type\": \"default\"", "\"rope_type\": \"linear\"", "rope_type"},
        {"qwen2", "\"use_sliding_window\": false", "\"use_sliding_window\": true", "use_sliding_window"},
        {"qwen2", "\"silu\"", "\"gelu\"", "hidden_act"},
    };
    int i;
    for (i = 0; i < (int)(sizeof cases / sizeof cases[0]); i++) {
        esft_error err;
        memset(&err, 0, sizeof err);
        CHECK_STATUS(parse_edited_config(cases[i].variant, cases[i].from, cases[i].to, &err), ESFT_ERR_UNSUPPORTED);
        CHECK_MSG(strstr(err.message, cases[i].field) != NULL, "%s: message: %s", cases[i].variant, err.message);
    }
}

TEST(malformed_config_is_a_parse_error)
{
    esft_model_config c;
    esft_error err;
    const char *text = "{\"model_type\": \"olmoe\", \"hidden_size\": ";
    CHECK_STATUS(esft_model_config_parse(&c, text, strlen(text), "config.json", &err), ESFT_ERR_PARSE);
}

TEST(missing_model_directory_is_io)
{
    esft_model m;
    esft_error err;
    CHECK_STATUS(esft_model_open(&m, "tests/models/no_such_model", NULL, &err), ESFT_ERR_IO);
    CHECK_MSG(strstr(err.file, "config.json") != NULL, "file: %s", err.file);
}

/* A copy of a variant directory in build/, model.safetensors edited by fn. */
static int copy_file(const char *from, const char *to)
{
    size_t size;
    char *text = slurp(from, &size);
    FILE *f;
    if (!text) return 0;
    f = fopen(to, "wb");
    if (!f || fwrite(text, 1, size, f) != size) {
        if (f) fclose(f);
        free(text);
        return 0;
    }
    free(text);
    return fclose(f) == 0;
}

static const char *copy_variant(const char *variant, const char *as)
{
    static char dir[512];
    char from[512], to[600];
    const char *files[] = {"config.json", "model.safetensors"};
    int i;
    mkdir("build", 0777);
    mkdir("build/test_models", 0777);
    snprintf(dir, sizeof dir, "build/test_models/%s", as);
    mkdir(dir, 0777);
    for (i = 0; i < 2; i++) {
        snprintf(from, sizeof from, MODELS "%s/%s", variant, files[i]);
        snprintf(to, sizeof to, "%s/%s", dir, files[i]);
        if (!copy_file(from, to)) return NULL;
    }
    return dir;
}

/* Renames the first tensor whose name contains from (same length: the header
   keeps its size) in dir/model.safetensors. */
static int rename_tensor(const char *dir, const char *from, const char *to)
{
    char path[600];
    size_t size;
    char *bytes, *at;
    FILE *f;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    bytes = slurp(path, &size);
    if (!bytes || strlen(from) != strlen(to)) return 0;
    at = strstr(bytes + 8, from);
    if (!at) return 0;
    memcpy(at, to, strlen(to));
    f = fopen(path, "wb");
    fwrite(bytes, 1, size, f);
    fclose(f);
    free(bytes);
    return 1;
}

TEST(fp8_weight_without_its_scale_is_an_error)
{
    esft_model m;
    esft_error err;
    const char *dir = copy_variant("deepseek_v3_fp8", "fp8_no_scale");
    CHECK(dir != NULL);
    CHECK(rename_tensor(dir, "weight_scale_inv", "weight_scale_xxx"));
    CHECK(esft_model_open(&m, dir, NULL, &err) != ESFT_OK);
    CHECK_MSG(strstr(err.message, "scale") != NULL, "message: %s", err.message);
}

TEST(missing_tensor_is_an_error_naming_it)
{
    esft_model m;
    esft_error err;
    const char *dir = copy_variant("olmoe", "olmoe_missing");
    CHECK(dir != NULL);
    CHECK(rename_tensor(dir, "model.norm.weight", "model.norX.weight"));
    CHECK(esft_model_open(&m, dir, NULL, &err) != ESFT_OK);
    CHECK_MSG(strstr(err.message, "model.norm.weight") != NULL, "message: %s", err.message);
}

TEST(truncated_safetensors_is_an_error)
{
    esft_model m;
    esft_error err;
    char path[600];
    const char *dir = copy_variant("olmoe", "olmoe_truncated");
    struct stat sb;
    CHECK(dir != NULL);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK(stat(path, &sb) == 0);
    CHECK(truncate(path, sb.st_size / 2) == 0);
    CHECK(esft_model_open(&m, dir, NULL, &err) != ESFT_OK);
}

TEST(jsonl_errors_name_the_line)
{
    esft_dataset ds;
    esft_error err;
    const char *bad = "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 2,\n";
    const char *range = "{\"input_ids\": [1, 2, 3]}\n\n{\"input_ids\": [1, 900, 3]}\n";
    const char *labels = "{\"input_ids\": [1, 2, 3], \"labels\": [1, 2]}\n";
    const char *empty = "{\"input_ids\": []}\n";
    CHECK_STATUS(esft_dataset_parse_jsonl(&ds, bad, strlen(bad), "d.jsonl", 0, 192, NULL, &err), ESFT_ERR_PARSE);
    CHECK_EQ_INT(err.line, 2);
    CHECK_STATUS(esft_dataset_parse_jsonl(&ds, range, strlen(range), "d.jsonl", 0, 192, NULL, &err),
                 ESFT_ERR_RANGE);
    CHECK_EQ_INT(err.line, 3);
    CHECK(esft_dataset_parse_jsonl(&ds, labels, strlen(labels), "d.jsonl", 0, 192, NULL, &err) != ESFT_OK);
    CHECK(esft_dataset_parse_jsonl(&ds, empty, strlen(empty), "d.jsonl", 0, 192, NULL, &err) != ESFT_OK);
}

TEST(jsonl_reads_samples_and_max_samples)
{
    esft_dataset ds;
    esft_error err;
    const char *text = "{\"input_ids\": [1, 2, 3], \"labels\": [-100, 2, 3]}\n{\"input_ids\": [4, 5]}\n";
    CHECK_STATUS(esft_dataset_parse_jsonl(&ds, text, strlen(text), "d.jsonl", 0, 0, NULL, &err), ESFT_OK);
    CHECK_EQ_INT(ds.n_samples, 2);
    CHECK_EQ_INT((int)ds.offset[2], 5);
    CHECK_EQ_INT(ds.labels[0], -100);
    CHECK_EQ_INT(ds.labels[4], 5);
    esft_dataset_free(&ds);
    CHECK_STATUS(esft_dataset_parse_jsonl(&ds, text, strlen(text), "d.jsonl", 1, 0, NULL, &err), ESFT_OK);
    CHECK_EQ_INT(ds.n_samples, 1);
    esft_dataset_free(&ds);
}

TEST(forward_refuses_ids_past_the_vocabulary)
{
    esft_model m;
    esft_error err;
    int32_t ids[3] = {1, 2, 0};
    CHECK_STATUS(esft_model_open(&m, MODELS "olmoe", NULL, &err), ESFT_OK);
    ids[2] = m.cfg.vocab;
    CHECK_STATUS(esft_model_forward(&m, ids, 3, NULL, NULL, NULL, &err), ESFT_ERR_RANGE);
    ids[2] = -1;
    CHECK_STATUS(esft_model_forward(&m, ids, 3, NULL, NULL, NULL, &err), ESFT_ERR_RANGE);
    esft_model_close(&m);
}

HARNESS_MAIN()
