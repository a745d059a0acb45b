/* test_train.c - training through whole Hugging Face MoE models
   (esft_model_forward_backward): the gradients of ESFT's trainable experts
   against double-precision central differences of esft_model_forward's loss on
   the tiny checkpoints of tests/models (points where a perturbation changes a
   top-k choice are rejected: the loss is not differentiable there), the same
   bits for any thread count, the loss equal to the forward's, and bad expert
   configs. Run from the repository root (make test does). */
#define _POSIX_C_SOURCE 200809L
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"
#include "gradcheck.h"
#include "harness.h"

#include <stdlib.h>
#include <sys/stat.h>

#define MODELS "tests/models/"

/* ---- a model, one sample, and an expert config of the most used experts ---- */

typedef struct fixture {
    esft_model m;
    esft_dataset ds;
    const int32_t *ids, *labels;
    int T, L, E, K;
    int32_t *ref_ids;     /* (L, T, K) routing of the unperturbed model */
    int64_t *counts;      /* (L, E) */
    int recording, moved; /* on_route: record the routing, or note a change */
    int32_t *pesc_ref;    /* (L, T, PESC K) routing of the PESC layers, when tr has them */
    double aux_weight;    /* loss_fn adds aux_weight * the PESC aux loss (n_scored: the training objective) */
    esft_expert_config cfg;
    int cfg_offset[ESFT_MODEL_MAX_LAYERS + 1];
    int32_t cfg_ids[256];
    unsigned char cfg_present[ESFT_MODEL_MAX_LAYERS];
    esft_model_trainable tr;
} fixture;

static void on_route(void *user, int layer, const int32_t *ids, const float *weights, int T, int K)
{
    fixture *f = (fixture *)user;
    int32_t *ref = f->ref_ids + (size_t)layer * T * K;
    int i;
    (void)weights;
    if (!f->m.cfg.is_moe[layer]) { /* a PESC layer: its adapter MoE's routing */
        ref = f->pesc_ref + (size_t)layer * T * K;
        if (f->recording) memcpy(ref, ids, (size_t)T * K * sizeof(int32_t));
        else if (memcmp(ref, ids, (size_t)T * K * sizeof(int32_t)) != 0) f->moved = 1;
        return;
    }
    if (f->recording) {
        memcpy(ref, ids, (size_t)T * K * sizeof(int32_t));
        for (i = 0; i < T * K; i++) f->counts[(size_t)layer * f->E + ids[i]]++;
    } else if (memcmp(ref, ids, (size_t)T * K * sizeof(int32_t)) != 0) {
        f->moved = 1;
    }
}

/* loss_sum of the sample with the trainable copies; NAN when routing moved. */
static double loss_fn(void *ctx)
{
    fixture *f = (fixture *)ctx;
    esft_model_run run;
    double loss = 0.0, aux = 0.0;
    int64_t n = 0;
    memset(&run, 0, sizeof run);
    run.labels = f->labels;
    run.trainable = &f->tr;
    run.on_route = on_route;
    run.user = f;
    run.aux_loss = &aux;
    f->moved = 0;
    if (esft_model_forward(&f->m, f->ids, f->T, &run, &loss, &n, NULL) != ESFT_OK || f->moved) return NAN;
    return loss + f->aux_weight * aux;
}

/* The per_layer most used experts of every MoE layer (ties: lower id). */
static void pick_experts(fixture *f, int per_layer)
{
    int l, k, n = 0;
    memset(&f->cfg, 0, sizeof f->cfg);
    f->cfg.n_layers = f->L;
    f->cfg.n_experts = f->E;
    f->cfg.offset = f->cfg_offset;
    f->cfg.ids = f->cfg_ids;
    f->cfg.layer_present = f->cfg_present;
    for (l = 0; l < f->L; l++) {
        f->cfg_offset[l] = n;
        f->cfg_present[l] = f->m.cfg.is_moe[l];
        if (!f->m.cfg.is_moe[l]) continue;
        for (k = 0; k < per_layer && k < f->E; k++) {
            int e, best = -1;
            for (e = 0; e < f->E; e++) {
                int taken = 0, j;
                for (j = f->cfg_offset[l]; j < n; j++) taken |= f->cfg_ids[j] == e;
                if (!taken && (best < 0 || f->counts[(size_t)l * f->E + e] > f->counts[(size_t)l * f->E + best]))
                    best = e;
            }
            f->cfg_ids[n++] = best;
        }
    }
    f->cfg_offset[f->L] = n;
}

static int fixture_open_shared(fixture *f, const char *name, int sample, int per_layer, int shared, char *why,
                               size_t why_n);

static int fixture_open(fixture *f, const char *name, int sample, int per_layer, char *why, size_t why_n)
{
    return fixture_open_shared(f, name, sample, per_layer, 0, why, why_n);
}

/* Opens fixture f in a test, or fails the test with the reason (why: the
   caller's char array); a macro because failing returns from the test. */
#define FIXTURE_OPEN_OR_FAIL(f, name, sample, per_layer, why)                 \
    do {                                                                      \
        if (!fixture_open(f, name, sample, per_layer, why, sizeof why)) {     \
            fixture_close(f);                                                 \
            HARNESS_FAIL_("%.400s", why);                                     \
        }                                                                     \
    } while (0)

static int fixture_open_shared(fixture *f, const char *name, int sample, int per_layer, int shared, char *why,
                               size_t why_n)
{
    char dir[256], path[300];
    int64_t o;
    esft_error err;
    memset(f, 0, sizeof *f);
    snprintf(dir, sizeof dir, MODELS "%s", name);
    snprintf(path, sizeof path, "%s/data.jsonl", dir);
    if (esft_model_open(&f->m, dir, NULL, &err) != ESFT_OK ||
        esft_dataset_read_jsonl(&f->ds, path, 0, f->m.cfg.vocab, NULL, &err) != ESFT_OK) {
        snprintf(why, why_n, "%s: %s", name, err.message);
        return 0;
    }
    o = f->ds.offset[sample];
    f->ids = f->ds.ids + o;
    f->labels = f->ds.labels + o;
    f->T = (int)(f->ds.offset[sample + 1] - o);
    f->L = f->m.cfg.n_layers;
    f->E = f->m.cfg.route.n_experts;
    f->K = f->m.cfg.route.top_k;
    f->ref_ids = (int32_t *)calloc((size_t)f->L * f->T * f->K, sizeof(int32_t));
    f->counts = (int64_t *)calloc((size_t)f->L * f->E, sizeof(int64_t));
    /* record the routing with the model's own weights, then train the most used experts */
    {
        esft_model_run run;
        memset(&run, 0, sizeof run);
        run.on_route = on_route;
        run.user = f;
        f->recording = 1;
        if (esft_model_forward(&f->m, f->ids, f->T, &run, NULL, NULL, &err) != ESFT_OK) {
            snprintf(why, why_n, "%s: forward: %s", name, err.message);
            return 0;
        }
        f->recording = 0;
    }
    pick_experts(f, per_layer);
    f->cfg.shared_experts = shared && f->m.cfg.d_shared > 0;
    if (esft_model_trainable_init(&f->tr, &f->m, &f->cfg, NULL, &err) != ESFT_OK) {
        snprintf(why, why_n, "%s: trainable: %s", name, err.message);
        return 0;
    }
    return 1;
}

static void fixture_close(fixture *f);

/* fixture_open, then the trainable set of spec in place of the expert config's. */
static int fixture_spec(fixture *f, const char *name, int sample, const esft_train_spec *spec, char *why,
                        size_t why_n)
{
    esft_error err;
    if (!fixture_open(f, name, sample, 1, why, why_n)) return 0;
    esft_model_trainable_uninit(&f->tr);
    if (esft_model_trainable_init_spec(&f->tr, &f->m, spec, NULL, &err) == ESFT_OK) return 1;
    snprintf(why, why_n, "%s: trainable set: %s", name, err.message);
    return 0;
}

static void fixture_close(fixture *f)
{
    esft_model_trainable_uninit(&f->tr);
    esft_dataset_free(&f->ds);
    esft_model_close(&f->m);
    free(f->ref_ids);
    free(f->counts);
    free(f->pesc_ref);
}

/* ---- gradient checks ----------------------------------------------------------- */


/* h: fp32 forward, loss ~ 1e2: a step of 1e-2 keeps rounding noise in the
   difference well under the tolerance; the loss is smooth at that scale. */
static const gc_options tol = {1e-2, 2e-4, 2e-2};

/* Coordinates checked per tensor block: ~25, or ~6 under ESFT_TEST_LIGHT (set by
   tests/sanitize.sh for valgrind, which runs each whole-model forward ~50x
   slower; the code paths are the same). */
static size_t gc_stride(size_t n) { return (n / (getenv("ESFT_TEST_LIGHT") ? 6 : 25)) | 1; }
static size_t gc_min_checked(void) { return getenv("ESFT_TEST_LIGHT") ? 3 : 10; }

static void gradcheck_family(const char *name, double *worst_rel)
{
    fixture f;
    char why[1024], buf[2048];
    double loss = 0.0, fwd_loss;
    int64_t n = 0;
    int i;
    esft_error err;
    if (!fixture_open_shared(&f, name, 0, 2, 1, why, sizeof why)) {
        fixture_close(&f);
        HARNESS_FAIL_("%.400s", why);
    }
    CHECK_STATUS(esft_model_forward_backward(&f.m, &f.tr, f.ids, f.labels, f.T, 1.0f, &loss, &n, &err), ESFT_OK);
    fwd_loss = loss_fn(&f);
    if (loss != fwd_loss) {
        fixture_close(&f);
        HARNESS_FAIL_("%s: training loss %.17g != forward loss %.17g", name, loss, fwd_loss);
    }
    *worst_rel = 0.0;
    for (i = 0; i < f.tr.n_trained; i++) {
        float *p = f.tr.params + (size_t)i * f.tr.expert_floats, *g = f.tr.grads + (size_t)i * f.tr.expert_floats;
        gc_result r = gc_check(p, f.tr.expert_floats, g, gc_stride(f.tr.expert_floats), loss_fn, &f, &tol);
        double rel = r.worst_err / (r.max_abs_grad + 1e-30);
        if (getenv("ESFT_TEST_VERBOSE"))
            printf("      L%d e%d checked %lu skipped %lu worst num %.6g ana %.6g max|g| %.3g\n", f.tr.layer[i],
                   f.tr.expert[i], (unsigned long)r.checked, (unsigned long)r.skipped, r.worst_num, r.worst_ana,
                   r.max_abs_grad);
        if (rel > *worst_rel) *worst_rel = rel;
        if (r.failed || r.checked < gc_min_checked() || r.max_abs_grad == 0.0) {
            snprintf(buf, sizeof buf, "%s layer %d expert %d: %s", name, f.tr.layer[i], f.tr.expert[i],
                     gc_describe(&r, "dW", why, sizeof why));
            fixture_close(&f);
            HARNESS_FAIL_("%.400s (checked %lu)", buf, (unsigned long)r.checked);
        }
    }
    for (i = 0; i < f.L; i++) {
        float *p = esft_model_trainable_shared(&f.tr, f.tr.params, i), *g = esft_model_trainable_shared(&f.tr, f.tr.grads, i);
        gc_result r;
        double rel;
        if (!p) continue;
        r = gc_check(p, f.tr.shared_floats, g, gc_stride(f.tr.shared_floats), loss_fn, &f, &tol);
        rel = r.worst_err / (r.max_abs_grad + 1e-30);
        if (rel > *worst_rel) *worst_rel = rel;
        if (getenv("ESFT_TEST_VERBOSE"))
            printf("      L%d shared checked %lu skipped %lu worst num %.6g ana %.6g max|g| %.3g\n", i,
                   (unsigned long)r.checked, (unsigned long)r.skipped, r.worst_num, r.worst_ana, r.max_abs_grad);
        if (r.failed || r.checked < gc_min_checked() || r.max_abs_grad == 0.0) {
            snprintf(buf, sizeof buf, "%s layer %d shared experts: %s", name, i, gc_describe(&r, "dW", why, sizeof why));
            fixture_close(&f);
            HARNESS_FAIL_("%.400s (checked %lu)", buf, (unsigned long)r.checked);
        }
    }
    fixture_close(&f);
}

#define GRADCHECK_TEST(fam)                                            \
    TEST(gradcheck_##fam)                                              \
    {                                                                  \
        double worst = 0.0;                                            \
        gradcheck_family(#fam, &worst);                                \
        if (harness_state == 0) printf("    %s: worst |a - num| / max|num| = %.2e\n", #fam, worst); \
    }

GRADCHECK_TEST(olmoe)
GRADCHECK_TEST(qwen3_moe)
GRADCHECK_TEST(mixtral)
GRADCHECK_TEST(qwen2_moe)
GRADCHECK_TEST(qwen2_moe_fused)
GRADCHECK_TEST(deepseek_v2_lite)
GRADCHECK_TEST(deepseek_v2_qlora_yarn)
GRADCHECK_TEST(deepseek_v3_bf16_tied)
GRADCHECK_TEST(deepseek_v3_fp8)

/* ---- FFT and LoRA: every tensor of the trainable set ------------------------ */

/* One block of the trainable set against central differences, ~4 coordinates
   (1 under ESFT_TEST_LIGHT: valgrind wants every path run, not many points);
   its worst relative error into *worst. 0 on failure (why filled). */
static int gradcheck_block(fixture *f, float *p, float *g, size_t n, const char *what, double *worst, char *why,
                           size_t why_n)
{
    char buf[512];
    int light = getenv("ESFT_TEST_LIGHT") != NULL;
    gc_result r = gc_check(p, n, g, light ? n : (n / 4) | 1, loss_fn, f, &tol);
    double rel = r.worst_err / (r.max_abs_grad + 1e-30);
    if (getenv("ESFT_TEST_VERBOSE"))
        printf("      %s: checked %lu skipped %lu worst num %.6g ana %.6g max|g| %.3g\n", what,
               (unsigned long)r.checked, (unsigned long)r.skipped, r.worst_num, r.worst_ana, r.max_abs_grad);
    if (rel > *worst) *worst = rel;
    if (r.failed || (!light && r.checked > 0 && r.max_abs_grad == 0.0)) {
        snprintf(why, why_n, "%s: %s (checked %lu)", what, gc_describe(&r, "d", buf, sizeof buf),
                 (unsigned long)r.checked);
        return 0;
    }
    return 1;
}

/* PESC: W_up drawn small and non-zero (at the upcycling init W_up = 0, so
   W_down's gradient is 0), and room for the adapter routing's reference. */
static void pesc_prepare(fixture *f)
{
    const esft_pesc_config *c = &f->tr.pesc;
    int l, e;
    size_t j, rd = (size_t)c->rank * c->d_model;
    if (f->tr.n_pesc == 0) return;
    f->pesc_ref = (int32_t *)calloc((size_t)f->L * f->T * c->top_k, sizeof(int32_t));
    for (l = 0; l < f->L; l++) {
        float *p = esft_model_trainable_pesc(&f->tr, f->tr.params, l);
        for (e = 0; p && e < c->n_experts; e++) {
            float *up = p + esft_pesc_tensor_offset(c, ESFT_PESC_UP, e);
            for (j = 0; j < rd; j++) up[j] = 0.3f * (float)sin(1.0 + (double)(j + e * rd) * 0.7);
        }
    }
}

/* Every PESC block: its router, and W_down and W_up of each adapter expert
   the sample routes to (an unused one has no gradient; each layer must use one). */
static int gradcheck_pesc(fixture *f, double *worst, char *why, size_t why_n)
{
    const esft_pesc_config *c = &f->tr.pesc;
    size_t rd = (size_t)c->rank * c->d_model, j;
    int l, e, k;
    char what[200];
    for (l = 0; l < f->L; l++) {
        float *p = esft_model_trainable_pesc(&f->tr, f->tr.params, l), *g = esft_model_trainable_pesc(&f->tr, f->tr.grads, l);
        int used = 0;
        if (!p) continue;
        snprintf(what, sizeof what, "layer %d PESC router", l);
        if (!gradcheck_block(f, p, g, (size_t)c->n_experts * c->d_model, what, worst, why, why_n)) return 0;
        for (e = 0; e < c->n_experts; e++) {
            size_t down = esft_pesc_tensor_offset(c, ESFT_PESC_DOWN, e);
            for (j = 0; j < rd && g[down + j] == 0.0f; j++) {
            }
            if (j == rd) continue;
            used++;
            for (k = 0; k < 2; k++) {
                size_t at = esft_pesc_tensor_offset(c, k ? ESFT_PESC_UP : ESFT_PESC_DOWN, e);
                snprintf(what, sizeof what, "layer %d PESC expert %d adapter_%s", l, e, k ? "up" : "down");
                if (!gradcheck_block(f, p + at, g + at, rd, what, worst, why, why_n)) return 0;
            }
        }
        if (!used) {
            snprintf(why, why_n, "layer %d: no PESC expert got a gradient", l);
            return 0;
        }
    }
    return 1;
}

/* The trainable set of spec on a family's model, every block of it checked:
   each non-expert tensor (the embedding on the row of a token the sample
   holds), the first expert and shared block, each adapter's A and B (B drawn
   non-zero first: at B = 0 A's gradient is 0). */
static void gradcheck_method(const char *name, const esft_train_spec *spec, double *worst)
{
    fixture f;
    char why[1024];
    double loss = 0.0, aux = 0.0;
    int64_t scored = 0;
    int i, experts_checked = 0;
    size_t j;
    esft_error err;
    *worst = 0.0;
    if (!fixture_spec(&f, name, 0, spec, why, sizeof why)) {
        fixture_close(&f);
        HARNESS_FAIL_("%.400s", why);
    }
    for (i = 0; i < f.tr.n_lora; i++) {
        const esft_matrix *w = esft_model_trainable_lora_base(&f.tr, &f.m, i, NULL, 0, NULL, NULL);
        float *b = f.tr.params + (f.tr.lora[i].b - f.tr.params);
        for (j = 0; j < (size_t)w->rows * f.tr.lora_rank; j++) b[j] = 0.05f * (float)sin(1.0 + (double)j * 0.7);
    }
    pesc_prepare(&f);
    f.recording = 1; /* the routing of the model as adapted is the reference now */
    loss_fn(&f);
    f.recording = 0;
    CHECK_STATUS(esft_model_forward_backward(&f.m, &f.tr, f.ids, f.labels, f.T, 1.0f, &loss, &scored, &err), ESFT_OK);
    aux = f.tr.aux_loss;
    if (loss != loss_fn(&f)) {
        fixture_close(&f);
        HARNESS_FAIL_("%s: training loss %.17g != forward loss %.17g", name, loss, loss_fn(&f));
    }
    /* PESC's objective: loss_sum + n_scored * aux (grad_scale 1), aux as the forward reports it */
    f.aux_weight = (double)scored;
    if (f.tr.n_pesc && (!(aux > 0.0) || loss_fn(&f) != loss + scored * aux)) {
        fixture_close(&f);
        HARNESS_FAIL_("%s: training aux %.17g, forward objective %.17g != %.17g", name, aux, loss_fn(&f),
                      loss + scored * aux);
    }
    if (!gradcheck_pesc(&f, worst, why, sizeof why)) {
        fixture_close(&f);
        HARNESS_FAIL_("%s: %.400s", name, why);
    }
    for (i = 0; i < f.tr.n_modules; i++) {
        const esft_model_tensor *t = &f.m.tensors[f.tr.module[i]];
        size_t at = f.tr.module_offset[i], n = (size_t)t->matrix->rows * t->matrix->cols;
        if (t->matrix == &f.m.embed) at += (size_t)f.ids[1] * t->matrix->cols, n = (size_t)t->matrix->cols;
        if (!gradcheck_block(&f, f.tr.params + at, f.tr.grads + at, n, t->name, worst, why, sizeof why)) {
            fixture_close(&f);
            HARNESS_FAIL_("%s: %.400s", name, why);
        }
    }
    for (i = 0; i < f.tr.n_trained; i++) { /* the first expert the sample routes to */
        for (j = 0; j < f.tr.expert_floats && f.tr.grads[(size_t)i * f.tr.expert_floats + j] == 0.0f; j++) {
        }
        if (j < f.tr.expert_floats) break;
    }
    if ((i < f.tr.n_trained && !gradcheck_block(&f, f.tr.params + (size_t)i * f.tr.expert_floats,
                                                f.tr.grads + (size_t)i * f.tr.expert_floats, f.tr.expert_floats,
                                                "first used expert", worst, why, sizeof why)) ||
        (f.tr.n_shared && !gradcheck_block(&f, f.tr.params + (size_t)f.tr.n_trained * f.tr.expert_floats,
                                           f.tr.grads + (size_t)f.tr.n_trained * f.tr.expert_floats,
                                           f.tr.shared_floats, "first shared block", worst, why, sizeof why))) {
        fixture_close(&f);
        HARNESS_FAIL_("%s: %.400s", name, why);
    }
    for (i = 0; i < 2 * f.tr.n_lora; i++) {
        char base[160], what[200];
        const esft_matrix *w = esft_model_trainable_lora_base(&f.tr, &f.m, i / 2, base, sizeof base, NULL, NULL);
        const float *p = i % 2 ? f.tr.lora[i / 2].b : f.tr.lora[i / 2].a;
        size_t at = (size_t)(p - f.tr.params), n = (size_t)f.tr.lora_rank * (i % 2 ? w->rows : w->cols);
        if (f.tr.lora_tensor[i / 2] < 0) { /* a routed expert's: zero when the sample never reaches it */
            for (j = 0; j < n && f.tr.grads[at + j] == 0.0f; j++) {
            }
            if (j == n) continue;
            experts_checked++;
        }
        snprintf(what, sizeof what, "%s lora_%c", base, i % 2 ? 'B' : 'A');
        if (!gradcheck_block(&f, f.tr.params + at, f.tr.grads + at, n, what, worst, why, sizeof why)) {
            fixture_close(&f);
            HARNESS_FAIL_("%s: %.400s", name, why);
        }
    }
    for (i = 0; i < f.tr.n_lora && f.tr.lora_tensor[i] >= 0; i++) {
    }
    if (i < f.tr.n_lora && experts_checked == 0) {
        fixture_close(&f);
        HARNESS_FAIL_("%s: no routed expert's adapter has a gradient", name);
    }
    fixture_close(&f);
}

static void gradcheck_fft(const char *name)
{
    esft_train_spec sp;
    double worst = 0.0;
    memset(&sp, 0, sizeof sp);
    sp.method = ESFT_TRAIN_FFT;
    gradcheck_method(name, &sp, &worst);
    if (harness_state == 0) printf("    %s fft: worst |a - num| / max|num| = %.2e\n", name, worst);
}

/* A spec of method; for LoRA rank r, alpha 2r, attention, dense MLPs and routed experts. */
static esft_train_spec method_spec(esft_train_method method, int rank, uint64_t seed)
{
    esft_train_spec sp;
    memset(&sp, 0, sizeof sp);
    sp.method = method;
    sp.lora_rank = rank;
    sp.lora_alpha = 2.0f * (float)rank;
    sp.lora_targets = ESFT_LORA_ATTN | ESFT_LORA_MLP | ESFT_LORA_EXPERTS;
    sp.seed = seed;
    return sp;
}

static void gradcheck_lora(const char *name)
{
    esft_train_spec sp = method_spec(ESFT_TRAIN_LORA, 3, 7);
    double worst = 0.0;
    gradcheck_method(name, &sp, &worst);
    if (harness_state == 0) printf("    %s lora: worst |a - num| / max|num| = %.2e\n", name, worst);
}

/* Under ESFT_TEST_LIGHT (valgrind) the FFT / LoRA checks run on three
   families that cover their code paths: GQA with q/k norms (olmoe), MLA with
   q_lora (deepseek_v2_qlora_yarn), biases + tied embeddings + dense MLPs (qwen2). */
static int light_skips(const char *fam)
{
    return getenv("ESFT_TEST_LIGHT") && strcmp(fam, "olmoe") != 0 && strcmp(fam, "deepseek_v2_qlora_yarn") != 0 &&
           strcmp(fam, "qwen2") != 0;
}
#define LIGHT_SKIP(fam) \
    if (light_skips(fam)) SKIP("ESFT_TEST_LIGHT: olmoe, deepseek_v2_qlora_yarn and qwen2 cover these paths")

/* every weight kind: GQA + whole q/k norms + clip (OLMoE), qkv bias + gated
   shared expert (Qwen2), per-head norms (Qwen3), plain GQA (Mixtral), MLA +
   dense layer (V2-Lite), MLA with q_lora (V2), tied embeddings + sigmoid
   routing (V3) */
static void gradcheck_pesc_method(const char *name)
{
    esft_train_spec sp;
    double worst = 0.0;
    memset(&sp, 0, sizeof sp);
    sp.method = ESFT_TRAIN_PESC;
    sp.pesc = esft_pesc_config_init(0, 4, 2, 3); /* d_model: the model's */
    sp.pesc.scale = 1.0f;
    sp.pesc.aux_alpha = 0.1f; /* large enough that a wrong aux gradient shows */
    sp.seed = 11;
    gradcheck_method(name, &sp, &worst);
    if (harness_state == 0) printf("    %s pesc: worst |a - num| / max|num| = %.2e\n", name, worst);
}

/* dense llama (attention bias), mistral, qwen2 (qkv bias); DeepSeek-V2-Lite's
   dense layer 0 under MLA, its MoE layers untouched */
#define PESC_TEST(fam)                 \
    TEST(gradcheck_pesc_##fam)         \
    {                                  \
        LIGHT_SKIP(#fam);              \
        gradcheck_pesc_method(#fam);   \
    }

PESC_TEST(llama)
PESC_TEST(mistral)
PESC_TEST(qwen2)
PESC_TEST(deepseek_v2_lite)

#define FFT_TEST(fam)                                   \
    TEST(gradcheck_fft_##fam)                           \
    {                                                   \
        LIGHT_SKIP(#fam);                               \
        gradcheck_fft(#fam);                            \
    }                                                   \
    TEST(gradcheck_lora_##fam)                          \
    {                                                   \
        LIGHT_SKIP(#fam);                               \
        gradcheck_lora(#fam);                           \
    }

FFT_TEST(olmoe)
FFT_TEST(qwen2_moe)
FFT_TEST(qwen3_moe)
FFT_TEST(mixtral)
FFT_TEST(deepseek_v2_lite)
FFT_TEST(deepseek_v2_qlora_yarn)
FFT_TEST(deepseek_v3_bf16_tied)
FFT_TEST(llama)
FFT_TEST(mistral)
FFT_TEST(qwen2)

/* Longer than one attention block and one head block (T = 150 > 64), with a
   sliding window switched on in the config (it changes the loss: the
   backward's mask is exercised), on a GQA and an MLA model. clip_qkv is
   checked one layer at a time below: through a whole model too many clamped
   values cross the clip under a perturbation to keep the loss smooth. */
static void long_family(const char *name, int window)
{
    fixture f;
    char why[1024], buf[2048];
    int32_t ids[150], labels[150];
    int t, i;
    FIXTURE_OPEN_OR_FAIL(&f, name, 0, 1, why);
    for (t = 0; t < 150; t++) {
        ids[t] = f.ds.ids[(t * 7) % (int)f.ds.offset[f.ds.n_samples]];
        labels[t] = t < 10 ? -100 : ids[t];
    }
    f.ids = ids;
    f.labels = labels;
    f.m.cfg.sliding_window = window;
    f.T = 150;
    free(f.ref_ids);
    f.ref_ids = (int32_t *)calloc((size_t)f.L * 150 * f.K, sizeof(int32_t));
    f.recording = 1;
    {
        double with = loss_fn(&f), without;
        f.recording = 0;
        f.m.cfg.sliding_window = 0;
        without = loss_fn(&f);
        f.m.cfg.sliding_window = window;
        if (!(with != without) || isnan(with)) {
            fixture_close(&f);
            HARNESS_FAIL_("%s: the window did not change the loss (%.9g)", name, with);
        }
    }
    CHECK_STATUS(esft_model_forward_backward(&f.m, &f.tr, f.ids, f.labels, f.T, 1.0f, NULL, NULL, NULL), ESFT_OK);
    for (i = 0; i < f.tr.n_trained; i++) {
        float *p = f.tr.params + (size_t)i * f.tr.expert_floats, *g = f.tr.grads + (size_t)i * f.tr.expert_floats;
        gc_result r = gc_check(p, f.tr.expert_floats, g, gc_stride(f.tr.expert_floats), loss_fn, &f, &tol);
        if (getenv("ESFT_TEST_VERBOSE"))
            printf("      L%d e%d checked %lu skipped %lu worst num %.6g ana %.6g max|g| %.3g\n", f.tr.layer[i],
                   f.tr.expert[i], (unsigned long)r.checked, (unsigned long)r.skipped, r.worst_num, r.worst_ana,
                   r.max_abs_grad);
        if (r.failed || r.checked < (getenv("ESFT_TEST_LIGHT") ? 2u : 5u) || r.max_abs_grad == 0.0) {
            snprintf(buf, sizeof buf, "%s (T 150) layer %d expert %d: %s", name, f.tr.layer[i], f.tr.expert[i],
                     gc_describe(&r, "dW", why, sizeof why));
            fixture_close(&f);
            HARNESS_FAIL_("%.400s (checked %lu)", buf, (unsigned long)r.checked);
        }
    }
    fixture_close(&f);
}

TEST(gradcheck_long_window)
{
    long_family("olmoe", 50);
    if (harness_state) return;
    long_family("deepseek_v2_qlora_yarn", 40);
}

/* ---- one layer at a time: the gradient w.r.t. the layer's input ------------ */

/* L = sum(r * X[l+1]) of one recomputed layer; NAN when the routing or any
   clamp (clip_qkv) decision moved, so kinks are never differenced. */
typedef struct layer_ctx {
    fixture *f;
    esft__trn b;
    unsigned char *base;
    int l;
    float *r;
    int32_t *ref_ids;
    uint64_t ref_mask;
} layer_ctx;

static uint64_t clip_mask_hash(const layer_ctx *c)
{
    const esft_model_config *mc = &c->f->m.cfg;
    size_t nq = (size_t)c->f->T * mc->n_heads * mc->head_dim, nk = (size_t)c->f->T * mc->n_kv_heads * mc->head_dim, i;
    uint64_t h = 14695981039346656037ull;
    float clip = mc->clip_qkv;
    if (clip <= 0.0f || mc->mla) return 0;
    for (i = 0; i < nq; i++) h = (h ^ (uint64_t)(fabsf(c->b.qn[i]) > clip)) * 1099511628211ull;
    for (i = 0; i < nk; i++) h = (h ^ (uint64_t)(fabsf(c->b.kn[i]) > clip)) * 1099511628211ull;
    for (i = 0; i < nk; i++) h = (h ^ (uint64_t)(fabsf(c->b.vb[i]) > clip)) * 1099511628211ull;
    return h;
}

static double layer_loss(void *ctx)
{
    layer_ctx *c = (layer_ctx *)ctx;
    fixture *f = c->f;
    size_t n = (size_t)f->T * f->m.cfg.d_model, i;
    const float *y = c->b.X + (size_t)(c->l + 1) * n;
    double L = 0.0;
    if (esft__trn_layer_forward(&c->b, &f->m, c->l, f->T, NULL) != ESFT_OK) return NAN;
    if (f->m.cfg.is_moe[c->l] && memcmp(c->b.f.ids, c->ref_ids, (size_t)f->T * f->K * sizeof(int32_t)) != 0)
        return NAN;
    if (clip_mask_hash(c) != c->ref_mask) return NAN;
    for (i = 0; i < n; i++) L += (double)c->r[i] * y[i];
    return L;
}

static void layer_family(const char *name, int l, int T, int window, float clip)
{
    fixture f;
    layer_ctx c;
    char why[1024], buf[2048];
    int32_t ids[128];
    size_t n, i, bytes;
    int t;
    uint32_t seed = 12345u;
    gc_result r;
    FIXTURE_OPEN_OR_FAIL(&f, name, 0, 1, why);
    memset(&c, 0, sizeof c);
    f.m.cfg.sliding_window = window;
    f.m.cfg.clip_qkv = clip;
    for (t = 0; t < T; t++) ids[t] = f.ds.ids[(t * 5) % (int)f.ds.offset[f.ds.n_samples]];
    f.T = T;
    c.f = &f;
    c.l = l;
    bytes = esft__trn_layout(&c.b, &f.m.cfg, T, 1, NULL);
    c.base = (unsigned char *)malloc(bytes);
    esft__trn_layout(&c.b, &f.m.cfg, T, 1, (unsigned char *)(((uintptr_t)c.base + 63) & ~(uintptr_t)63));
    c.b.f.tr = &f.tr;
    n = (size_t)T * f.m.cfg.d_model;
    c.r = (float *)malloc(n * sizeof(float));
    c.ref_ids = (int32_t *)malloc((size_t)T * f.K * sizeof(int32_t));
    for (i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        c.r[i] = (float)((seed >> 8) * (1.0 / 16777216.0) - 0.5);
    }
    esft_set_num_threads(1);
    /* X[l] = the model's own residual stream entering layer l */
    for (t = 0; t < T; t++) esft__matrix_rows_f32(c.b.X + (size_t)t * f.m.cfg.d_model, &f.m.embed, ids[t], 1);
    esft__rope_tables(c.b.f.cos_, c.b.f.sin_, &f.m.cfg.rope, f.m.cfg.mla ? f.m.cfg.qk_rope_dim : f.m.cfg.head_dim, T);
    for (t = 0; t < l; t++) esft__trn_layer_forward(&c.b, &f.m, t, T, NULL);
    esft__trn_layer_forward(&c.b, &f.m, l, T, NULL);
    memcpy(c.ref_ids, c.b.f.ids, (size_t)T * f.K * sizeof(int32_t));
    c.ref_mask = clip_mask_hash(&c);
    memcpy(c.b.dx, c.r, n * sizeof(float));
    CHECK_STATUS(esft__trn_layer_backward(&c.b, &f.m, &f.tr, l, T, 0, NULL), ESFT_OK);
    {
        float *dx = (float *)malloc(n * sizeof(float));
        memcpy(dx, c.b.dx, n * sizeof(float));
        /* with clip_qkv a smaller step keeps most clamp decisions from flipping */
        gc_options o = {1e-2, 2e-4, 2e-2};
        if (clip > 0.0f) o.h = 1e-3;
        r = gc_check(c.b.X + (size_t)l * n, n, dx, n / (getenv("ESFT_TEST_LIGHT") ? 20 : 80) | 1, layer_loss, &c, &o);
        free(dx);
    }
    esft_set_num_threads(0);
    if (getenv("ESFT_TEST_VERBOSE"))
        printf("      %s layer %d: checked %lu skipped %lu worst num %.6g ana %.6g max|g| %.3g\n", name, l,
               (unsigned long)r.checked, (unsigned long)r.skipped, r.worst_num, r.worst_ana, r.max_abs_grad);
    free(c.base);
    free(c.r);
    free(c.ref_ids);
    fixture_close(&f);
    if (r.failed || r.checked < (getenv("ESFT_TEST_LIGHT") ? 5u : 20u) || r.max_abs_grad == 0.0) {
        snprintf(buf, sizeof buf, "%s layer %d dx: %s", name, l, gc_describe(&r, "dx", why, sizeof why));
        HARNESS_FAIL_("%.400s (checked %lu)", buf, (unsigned long)r.checked);
    }
}

/* dx through each kind of layer, 100 tokens (two attention blocks):
   whole-projection q/k norms with clip_qkv and a sliding window (OLMoE), GQA
   (Mixtral), qkv bias + gated shared expert (Qwen2), per-head norms (Qwen3),
   a dense MLP layer and an MLA MoE layer (DeepSeek-V2), MLA with q_lora, YaRN
   and a window, sigmoid routing with bias (DeepSeek-V3). */
TEST(gradcheck_layer_input)
{
    layer_family("olmoe", 1, 100, 30, 0.4f);
    if (harness_state) return;
    layer_family("mixtral", 0, 100, 0, 0.0f);
    if (harness_state) return;
    layer_family("qwen2_moe", 1, 100, 0, 0.0f);
    if (harness_state) return;
    layer_family("qwen3_moe", 0, 100, 0, 0.0f);
    if (harness_state) return;
    layer_family("deepseek_v2_lite", 0, 100, 0, 0.0f);
    if (harness_state) return;
    layer_family("deepseek_v2_lite", 2, 100, 0, 0.0f);
    if (harness_state) return;
    layer_family("deepseek_v2_qlora_yarn", 1, 100, 25, 0.0f);
    if (harness_state) return;
    layer_family("deepseek_v3_bf16_tied", 1, 100, 0, 0.0f);
}

/* ---- against torch (tests/gen_train_goldens.py) --------------------------------- */

#define TORCH_TOL 1e-4 /* loss: relative; gradients: relative to each expert's largest */

typedef struct train_golden {
    esft_safetensors st;
    int64_t layers[16], experts[16], n_scored;
    int n;
    double loss, adamw[8];
    float *grad, *shared_grad; /* shared_grad: (M, 3 FS D) or NULL */
    int n_shared;
} train_golden;

static int golden_raw_st(const esft_safetensors *st, const char *name, void *dst, size_t bytes)
{
    int i = esft_safetensors_find(st, name);
    return i >= 0 && st->tensors[i].n_bytes == bytes && esft_safetensors_read(st, i, dst, 0, bytes, NULL) == ESFT_OK;
}

static int golden_raw(train_golden *g, const char *name, void *dst, size_t bytes)
{
    return golden_raw_st(&g->st, name, dst, bytes);
}

static int train_golden_open(train_golden *g, const char *name, size_t expert_floats)
{
    char path[300];
    int i;
    memset(g, 0, sizeof *g);
    snprintf(path, sizeof path, MODELS "%s/train_golden.safetensors", name);
    if (esft_safetensors_open(&g->st, path, NULL, NULL) != ESFT_OK) return 0;
    i = esft_safetensors_find(&g->st, "train_layers");
    if (i < 0 || g->st.tensors[i].n_elements > 16) return 0;
    g->n = (int)g->st.tensors[i].n_elements;
    g->grad = (float *)malloc((size_t)g->n * expert_floats * sizeof(float));
    i = esft_safetensors_find(&g->st, "shared_grad");
    if (i >= 0) {
        g->n_shared = (int)g->st.tensors[i].shape[0];
        g->shared_grad = (float *)malloc((size_t)g->st.tensors[i].n_elements * sizeof(float));
        if (!g->shared_grad || esft_safetensors_read_f32(&g->st, i, g->shared_grad, NULL) != ESFT_OK) return 0;
    }
    i = esft_safetensors_find(&g->st, "grad");
    return g->grad && golden_raw(g, "train_layers", g->layers, (size_t)g->n * 8) &&
           golden_raw(g, "train_experts", g->experts, (size_t)g->n * 8) &&
           golden_raw(g, "n_scored", &g->n_scored, 8) && golden_raw(g, "loss", &g->loss, 8) &&
           golden_raw(g, "adamw_losses", g->adamw, 6 * 8) && i >= 0 &&
           g->st.tensors[i].n_elements == (uint64_t)g->n * expert_floats &&
           esft_safetensors_read_f32(&g->st, i, g->grad, NULL) == ESFT_OK;
}

/* Every sample of data.jsonl through forward_backward with grad_scale 1 / n:
   the pooled mean loss and its gradient, as the golden's batch. */
static esft_status batch_pass(fixture *f, int64_t n_total, double *mean)
{
    double sum = 0.0;
    int64_t count = 0;
    int s;
    esft_error err;
    for (s = 0; s < f->ds.n_samples; s++) {
        int64_t o = f->ds.offset[s], n = 0;
        double ls = 0.0;
        esft_status st = esft_model_forward_backward(&f->m, &f->tr, f->ds.ids + o, f->ds.labels + o,
                                                     (int)(f->ds.offset[s + 1] - o), (float)(1.0 / n_total), &ls,
                                                     &n, &err);
        if (st != ESFT_OK) return st;
        sum += ls;
        count += n;
    }
    *mean = sum / (double)count;
    return count == n_total ? ESFT_OK : ESFT_ERR_SHAPE;
}

/* FNV-1a over every weight the model holds: frozen means bit-identical. */
static uint64_t hash_bytes(uint64_t h, const esft_matrix *w)
{
    const unsigned char *p = (const unsigned char *)w->data;
    size_t n = w->data ? (size_t)w->rows * w->cols * esft_dtype_size(w->dtype) : 0, i;
    for (i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static uint64_t model_hash(const esft_model *m)
{
    uint64_t h = 14695981039346656037ull;
    int l, e;
    h = hash_bytes(h, &m->embed);
    h = hash_bytes(h, &m->lm_head);
    for (l = 0; l < m->cfg.n_layers; l++) {
        const esft_model_layer *w = &m->layers[l];
        const esft_matrix *mats[] = {&w->attn_norm, &w->ffn_norm, &w->q, &w->k, &w->v, &w->o, &w->q_a, &w->q_b,
                                     &w->kv_a, &w->kv_b, &w->router, &w->mlp_gate, &w->mlp_down, &w->shared_gate,
                                     &w->shared_down};
        size_t i;
        for (i = 0; i < sizeof mats / sizeof mats[0]; i++) h = hash_bytes(h, mats[i]);
        for (e = 0; w->expert_gate && e < m->cfg.route.n_experts; e++) {
            h = hash_bytes(h, &w->expert_gate[e]);
            h = hash_bytes(h, &w->expert_up[e]);
            h = hash_bytes(h, &w->expert_down[e]);
        }
    }
    return h;
}

/* 5 AdamW steps over the whole batch, as torch.optim.AdamW took them (lr 1e-3,
   betas 0.9/0.95, eps 1e-8, wd 0.1): the worst relative difference of the
   pooled loss before each step and after the last from golden (6) into
   *worst. Returns the passes made (6 when all went through). */
static int adamw_steps(fixture *f, int64_t n_scored, const double *golden, double *worst)
{
    esft_adamw opt;
    esft_adamw_config ac = esft_adamw_config_init(); /* lr 1e-3, eps 1e-8 */
    double mean = 0.0;
    int step;
    ac.beta2 = 0.95f;
    ac.weight_decay = 0.1f;
    *worst = 0.0;
    if (esft_adamw_init(&opt, &ac, f->tr.n_params, NULL, NULL) != ESFT_OK) return 0;
    for (step = 0; step <= 5; step++) {
        double d;
        memset(f->tr.grads, 0, f->tr.n_params * sizeof(float));
        if (batch_pass(f, n_scored, &mean) != ESFT_OK) break;
        d = fabs(mean - golden[step]) / fabs(golden[step]);
        if (d > *worst) *worst = d;
        if (step < 5 && esft_adamw_step(&opt, f->tr.params, f->tr.grads, NULL) != ESFT_OK) break;
    }
    esft_adamw_uninit(&opt);
    return step;
}

static void torch_family(const char *name, double *worst_loss, double *worst_grad, double *worst_step)
{
    fixture f;
    train_golden g;
    char why[1024];
    esft_error err;
    double mean = 0.0;
    uint64_t before;
    int i, l;
    FIXTURE_OPEN_OR_FAIL(&f, name, 0, 1, why);
    if (!train_golden_open(&g, name, f.tr.expert_floats)) {
        free(g.grad);
        free(g.shared_grad);
        esft_safetensors_close(&g.st);
        fixture_close(&f);
        HARNESS_FAIL_("%s: train_golden.safetensors missing or malformed", name);
    }
    /* the golden's expert config, not the fixture's */
    esft_model_trainable_uninit(&f.tr);
    for (l = 0, i = 0; l < f.L; l++) {
        f.cfg_offset[l] = i;
        f.cfg_present[l] = 0;
        while (i < g.n && g.layers[i] == l) {
            f.cfg_present[l] = 1;
            f.cfg_ids[i] = (int32_t)g.experts[i];
            i++;
        }
    }
    f.cfg_offset[f.L] = i;
    f.cfg.shared_experts = g.shared_grad != NULL;
    CHECK_STATUS(esft_model_trainable_init(&f.tr, &f.m, &f.cfg, NULL, &err), ESFT_OK);
    CHECK_EQ_INT(f.tr.n_trained, g.n);
    CHECK_EQ_INT(f.tr.n_shared, g.n_shared);
    before = model_hash(&f.m);
    CHECK_STATUS(batch_pass(&f, g.n_scored, &mean), ESFT_OK);
    *worst_loss = fabs(mean - g.loss) / fabs(g.loss);
    *worst_grad = 0.0;
    for (i = 0; i < g.n; i++) {
        const float *a = f.tr.grads + (size_t)i * f.tr.expert_floats, *b = g.grad + (size_t)i * f.tr.expert_floats;
        double mx = 0.0, err_max = 0.0;
        size_t j;
        for (j = 0; j < f.tr.expert_floats; j++) {
            if (fabs(b[j]) > mx) mx = fabs(b[j]);
            if (fabs((double)a[j] - b[j]) > err_max) err_max = fabs((double)a[j] - b[j]);
        }
        if (err_max / mx > *worst_grad) *worst_grad = err_max / mx;
    }
    for (l = 0, i = 0; l < f.L; l++) {
        const float *a = esft_model_trainable_shared(&f.tr, f.tr.grads, l), *b;
        double mx = 0.0, err_max = 0.0;
        size_t j;
        if (!a) continue;
        b = g.shared_grad + (size_t)i++ * f.tr.shared_floats;
        for (j = 0; j < f.tr.shared_floats; j++) {
            if (fabs(b[j]) > mx) mx = fabs(b[j]);
            if (fabs((double)a[j] - b[j]) > err_max) err_max = fabs((double)a[j] - b[j]);
        }
        if (err_max / mx > *worst_grad) *worst_grad = err_max / mx;
    }
    CHECK_EQ_INT(adamw_steps(&f, g.n_scored, g.adamw, worst_step), 6);
    CHECK(model_hash(&f.m) == before);
    free(g.grad);
    free(g.shared_grad);
    esft_safetensors_close(&g.st);
    fixture_close(&f);
}

#define TORCH_TEST(fam)                                                                                        \
    TEST(torch_##fam)                                                                                          \
    {                                                                                                          \
        double wl = 0, wg = 0, ws = 0;                                                                         \
        torch_family(#fam, &wl, &wg, &ws);                                                                     \
        if (harness_state) return;                                                                             \
        printf("    %s vs torch: loss %.2e, gradient %.2e (of max), AdamW step losses %.2e\n", #fam, wl, wg, ws); \
        CHECK_MSG(wl <= TORCH_TOL && wg <= TORCH_TOL && ws <= TORCH_TOL, "%s: over 1e-4", #fam);               \
    }

TORCH_TEST(olmoe)
TORCH_TEST(qwen3_moe)
TORCH_TEST(mixtral)
TORCH_TEST(qwen2_moe)
TORCH_TEST(deepseek_v2_lite)
TORCH_TEST(deepseek_v2_qlora_yarn)
TORCH_TEST(deepseek_v3_bf16_tied)

/* FFT and LoRA against torch / PEFT (fft_golden.safetensors, lora/ and
   lora_golden.safetensors of tests/gen_train_goldens.py): the batch's loss,
   each tensor's gradient (the golden's sample of it: every stride-th value,
   stride = max(1, numel / 256), relative to its largest), 5 AdamW steps; the
   model's own weights bit-identical after. LoRA starts from the adapters PEFT
   saved (esft_model_lora_open reads PEFT's own files). */
static void torch_method(const char *name, esft_train_method method, double *worst_loss, double *worst_grad,
                         double *worst_step)
{
    fixture f;
    esft_safetensors g;
    esft_train_spec sp;
    char why[1024], path[300];
    esft_error err;
    double loss = 0.0, adamw[6];
    int64_t n_scored = 0;
    uint64_t before;
    int i, steps;
    FIXTURE_OPEN_OR_FAIL(&f, name, 0, 1, why);
    snprintf(path, sizeof path, MODELS "%s/%s_golden.safetensors", name, method == ESFT_TRAIN_FFT ? "fft" : "lora");
    if (esft_safetensors_open(&g, path, NULL, &err) != ESFT_OK || !golden_raw_st(&g, "loss", &loss, 8) ||
        !golden_raw_st(&g, "n_scored", &n_scored, 8) || !golden_raw_st(&g, "adamw_losses", adamw, 48)) {
        fixture_close(&f);
        HARNESS_FAIL_("%s missing or malformed", path);
    }
    esft_model_trainable_uninit(&f.tr);
    memset(&sp, 0, sizeof sp);
    sp.method = method;
    snprintf(path, sizeof path, MODELS "%s/lora", name);
    if (method == ESFT_TRAIN_FFT) CHECK_STATUS(esft_model_trainable_init_spec(&f.tr, &f.m, &sp, NULL, &err), ESFT_OK);
    else CHECK_STATUS(esft_model_lora_open(&f.tr, &f.m, path, &err), ESFT_OK);
    before = model_hash(&f.m);
    {
        double mean = 0.0;
        CHECK_STATUS(batch_pass(&f, n_scored, &mean), ESFT_OK);
        *worst_loss = fabs(mean - loss) / fabs(loss);
    }
    *worst_grad = 0.0;
    for (i = 0; i < g.n_tensors; i++) {
        const char *tn = g.tensors[i].name;
        char gmax_name[300];
        float *sample, gmax = 0.0f, *ours;
        int64_t shape[2];
        size_t n, stride, j, k = (size_t)g.tensors[i].n_elements;
        if (strncmp(tn, "grad.", 5) != 0) continue;
        ours = method == ESFT_TRAIN_FFT ? esft__trainable_target(&f.tr, &f.m, tn + 5, shape)
                                        : esft__lora_target(&f.tr, &f.m, tn + 5, shape);
        if (!ours) {
            esft_safetensors_close(&g);
            fixture_close(&f);
            HARNESS_FAIL_("%s: golden tensor %s is not one esft trains", name, tn + 5);
        }
        snprintf(gmax_name, sizeof gmax_name, "gmax.%s", tn + 5);
        sample = (float *)malloc(k * sizeof(float));
        CHECK(sample && esft_safetensors_read_f32(&g, i, sample, NULL) == ESFT_OK &&
              golden_raw_st(&g, gmax_name, &gmax, 4));
        n = (size_t)(shape[0] * shape[1]);
        stride = n / 256 > 1 ? n / 256 : 1;
        ours = f.tr.grads + (ours - f.tr.params);
        for (j = 0; sample && j < k && j * stride < n; j++) {
            double d = fabs((double)ours[j * stride] - sample[j]) / (gmax > 0.0f ? gmax : 1.0f);
            if (d > *worst_grad) *worst_grad = d;
        }
        free(sample);
    }
    steps = adamw_steps(&f, n_scored, adamw, worst_step);
    CHECK_EQ_INT(steps, 6);
    CHECK(model_hash(&f.m) == before);
    esft_safetensors_close(&g);
    fixture_close(&f);
}

#define TORCH_METHOD_TEST(fam)                                                                                 \
    TEST(torch_fft_lora_##fam)                                                                                 \
    {                                                                                                          \
        double wl = 0, wg = 0, ws = 0, ll = 0, lg = 0, ls = 0;                                                 \
        LIGHT_SKIP(#fam);                                                                                      \
        torch_method(#fam, ESFT_TRAIN_FFT, &wl, &wg, &ws);                                                     \
        if (harness_state) return;                                                                             \
        torch_method(#fam, ESFT_TRAIN_LORA, &ll, &lg, &ls);                                                    \
        if (harness_state) return;                                                                             \
        printf("    %s fft vs torch: loss %.2e, gradient %.2e, steps %.2e; lora vs PEFT: %.2e, %.2e, %.2e\n", \
               #fam, wl, wg, ws, ll, lg, ls);                                                                   \
        CHECK_MSG(wl <= TORCH_TOL && wg <= TORCH_TOL && ws <= TORCH_TOL && ll <= TORCH_TOL && lg <= TORCH_TOL && \
                      ls <= TORCH_TOL,                                                                         \
                  "%s: over 1e-4", #fam);                                                                      \
    }

TORCH_METHOD_TEST(olmoe)
TORCH_METHOD_TEST(qwen3_moe)
TORCH_METHOD_TEST(mixtral)
TORCH_METHOD_TEST(qwen2_moe)
TORCH_METHOD_TEST(deepseek_v2_lite)
TORCH_METHOD_TEST(deepseek_v2_qlora_yarn)
TORCH_METHOD_TEST(deepseek_v3_bf16_tied)
TORCH_METHOD_TEST(llama)
TORCH_METHOD_TEST(mistral)
TORCH_METHOD_TEST(qwen2)


/* PESC on the tiny llama against transformers' LlamaForCausalLM with an adapter
   MoE hooked after each MLP (tests/gen_pesc_goldens.py): the starting
   adapters read from Camelidae-named tensors (esft_model_trainable_load), the
   pooled loss, the aux term, the gradient of (CE sum + n_scored aux) / N,
   and the loss after each of 5 AdamW steps. */
TEST(torch_pesc_llama)
{
    fixture f;
    char why[1024];
    esft_train_spec sp;
    esft_safetensors st;
    esft_error err;
    double config[5], loss, aux, adamw[6], mean = 0.0, aux_sum = 0.0, wl, wa, wg = 0.0, ws = 0.0, mx = 0.0;
    int64_t n_scored;
    float *grad;
    int i, step;
    size_t j;
    FIXTURE_OPEN_OR_FAIL(&f, "llama", 0, 1, why);
    CHECK_STATUS(esft_safetensors_open(&st, MODELS "llama/pesc_golden.safetensors", NULL, &err), ESFT_OK);
    CHECK_STATUS(esft_safetensors_read(&st, esft_safetensors_find(&st, "config"), config, 0, sizeof config, &err), ESFT_OK);
    CHECK_STATUS(esft_safetensors_read(&st, esft_safetensors_find(&st, "loss"), &loss, 0, 8, &err), ESFT_OK);
    CHECK_STATUS(esft_safetensors_read(&st, esft_safetensors_find(&st, "aux"), &aux, 0, 8, &err), ESFT_OK);
    CHECK_STATUS(esft_safetensors_read(&st, esft_safetensors_find(&st, "n_scored"), &n_scored, 0, 8, &err), ESFT_OK);
    CHECK_STATUS(esft_safetensors_read(&st, esft_safetensors_find(&st, "adamw_losses"), adamw, 0, sizeof adamw, &err),
                 ESFT_OK);
    esft_model_trainable_uninit(&f.tr);
    memset(&sp, 0, sizeof sp);
    sp.method = ESFT_TRAIN_PESC;
    sp.pesc = esft_pesc_config_init(0, (int)config[0], (int)config[1], (int)config[2]);
    sp.pesc.scale = (float)config[3];
    sp.pesc.aux_alpha = (float)config[4];
    CHECK_STATUS(esft_model_trainable_init_spec(&f.tr, &f.m, &sp, NULL, &err), ESFT_OK);
    CHECK_STATUS(esft_model_trainable_load(&f.tr, &f.m, MODELS "llama/pesc_init.safetensors", &err), ESFT_OK);
    i = esft_safetensors_find(&st, "grad");
    CHECK(i >= 0 && st.tensors[i].n_elements == f.tr.n_params);
    grad = (float *)malloc(f.tr.n_params * sizeof(float));
    CHECK_STATUS(esft_safetensors_read_f32(&st, i, grad, &err), ESFT_OK);
    esft_safetensors_close(&st);
    /* one batch pass: the mean CE, the aux term (each sample's tr->aux_loss weighted by its scored tokens) */
    for (i = 0; i < f.ds.n_samples; i++) {
        int64_t o = f.ds.offset[i], n = 0;
        double ls = 0.0;
        CHECK_STATUS(esft_model_forward_backward(&f.m, &f.tr, f.ds.ids + o, f.ds.labels + o,
                                                 (int)(f.ds.offset[i + 1] - o), (float)(1.0 / n_scored), &ls, &n,
                                                 &err),
                     ESFT_OK);
        mean += ls / (double)n_scored;
        aux_sum += (double)n * f.tr.aux_loss / (double)n_scored;
    }
    wl = fabs(mean - loss) / loss;
    wa = fabs(aux_sum - aux) / aux;
    for (j = 0; j < f.tr.n_params; j++) mx = fabs(grad[j]) > mx ? fabs(grad[j]) : mx;
    for (j = 0; j < f.tr.n_params; j++) {
        double d = fabs((double)f.tr.grads[j] - grad[j]) / mx;
        wg = d > wg ? d : wg;
    }
    free(grad);
    step = adamw_steps(&f, n_scored, adamw, &ws);
    fixture_close(&f);
    CHECK_EQ_INT(step, 6);
    printf("    llama PESC vs torch: loss %.2e, aux %.2e, gradient %.2e (of max), AdamW step losses %.2e\n", wl, wa,
           wg, ws);
    CHECK_MSG(wl <= TORCH_TOL && wa <= TORCH_TOL && wg <= TORCH_TOL && ws <= TORCH_TOL, "llama PESC: over 1e-4");
}

/* ---- save, merge, reload ----------------------------------------------------- */

static int copy_file(const char *from, const char *to)
{
    FILE *a = fopen(from, "rb"), *b = a ? fopen(to, "wb") : NULL;
    char buf[4096];
    size_t n;
    int ok = a && b;
    while (ok && (n = fread(buf, 1, sizeof buf, a)) > 0) ok = fwrite(buf, 1, n, b) == n;
    if (a) fclose(a);
    if (b && fclose(b) != 0) ok = 0;
    return ok;
}

/* Trained experts (moved off the base) saved under the checkpoint's names and
   dtype, merged into a copy of the base (per-expert, fused, Mixtral's names,
   bf16, shards): the merged model's loss equals the base + trained copies'
   bit for bit, and the file carries the expert config. */
static void roundtrip_family(const char *name)
{
    fixture f;
    char why[1024], dir[512], base[300], trained[600], out[600], from[700], to[700];
    esft_model merged;
    esft_safetensors st;
    esft_expert_config back;
    esft_error err;
    esft_model_run run;
    double want = 0.0, got = 0.0;
    int64_t n1 = 0, n2 = 0;
    size_t i;
    int bf16;
    if (!fixture_open_shared(&f, name, 0, 2, 1, why, sizeof why)) {
        fixture_close(&f);
        HARNESS_FAIL_("%.400s", why);
    }
    snprintf(dir, sizeof dir, "%s", getenv("BUILD") && *getenv("BUILD") ? getenv("BUILD") : "build");
    mkdir(dir, 0755);
    strcat(dir, "/test-tmp");
    mkdir(dir, 0755);
    strcat(dir, "/train");
    mkdir(dir, 0755);
    snprintf(base, sizeof base, MODELS "%s", name);
    snprintf(trained, sizeof trained, "%s/%s.safetensors", dir, name);
    snprintf(out, sizeof out, "%s/%s_merged", dir, name);
    bf16 = f.m.layers[f.tr.layer[0]].expert_gate[f.tr.expert[0]].dtype == ESFT_DTYPE_BF16;
    for (i = 0; i < f.tr.n_params; i++) {
        f.tr.params[i] += 0.01f * (float)((i * 2654435761u) % 1000u) / 1000.0f - 0.005f;
        if (bf16) f.tr.params[i] = esft_bf16_to_f32(esft_f32_to_bf16(f.tr.params[i]));
    }
    memset(&run, 0, sizeof run);
    run.labels = f.labels;
    run.trainable = &f.tr;
    CHECK_STATUS(esft_model_forward(&f.m, f.ids, f.T, &run, &want, &n1, &err), ESFT_OK);
    CHECK_STATUS(esft_model_trainable_save(&f.tr, &f.m, &f.cfg, trained, &err), ESFT_OK);
    CHECK_STATUS(esft_checkpoint_merge(base, trained, out, NULL, &err), ESFT_OK);
    snprintf(from, sizeof from, "%s/config.json", base);
    snprintf(to, sizeof to, "%s/config.json", out);
    CHECK(copy_file(from, to));
    CHECK_STATUS(esft_model_open(&merged, out, NULL, &err), ESFT_OK);
    run.trainable = NULL;
    CHECK_STATUS(esft_model_forward(&merged, f.ids, f.T, &run, &got, &n2, &err), ESFT_OK);
    esft_model_close(&merged);
    CHECK_STATUS(esft_safetensors_open(&st, trained, NULL, &err), ESFT_OK);
    CHECK_STATUS(esft_checkpoint_read_config(&st, &back, &err), ESFT_OK);
    CHECK_EQ_INT(st.n_tensors, 3 * (f.tr.n_trained + f.tr.n_shared));
    CHECK_EQ_INT(esft_expert_config_count(&back), f.tr.n_trained);
    esft_expert_config_free(&back);
    esft_safetensors_close(&st);
    /* and back into a fresh block: the same values */
    {
        esft_model_trainable tr2;
        CHECK_STATUS(esft_model_trainable_init(&tr2, &f.m, &f.cfg, NULL, &err), ESFT_OK);
        CHECK_STATUS(esft_model_trainable_load(&tr2, &f.m, trained, &err), ESFT_OK);
        i = memcmp(tr2.params, f.tr.params, f.tr.n_params * sizeof(float)) == 0;
        esft_model_trainable_uninit(&tr2);
        CHECK_MSG(i, "%s: loaded experts differ from the saved ones", name);
        /* a file with tensors this block does not train (its shared experts) */
        if (f.tr.n_shared > 0) {
            f.cfg.shared_experts = 0;
            CHECK_STATUS(esft_model_trainable_init(&tr2, &f.m, &f.cfg, NULL, &err), ESFT_OK);
            i = esft_model_trainable_load(&tr2, &f.m, trained, &err) == ESFT_ERR_RANGE;
            esft_model_trainable_uninit(&tr2);
            CHECK_MSG(i, "%s: a file with untrained tensors was accepted", name);
        }
    }
    fixture_close(&f);
    CHECK_MSG(want == got && n1 == n2, "%s: merged loss %.17g != trained %.17g", name, got, want);
}

TEST(save_merge_reload)
{
    static const char *const names[] = {"qwen2_moe", "qwen2_moe_fused", "mixtral", "qwen3_moe",
                                        "deepseek_v3_bf16_tied"};
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0] && !harness_state; i++) roundtrip_family(names[i]);
}

TEST(save_refuses_fp8)
{
    fixture f;
    char why[1024];
    esft_error err;
    FIXTURE_OPEN_OR_FAIL(&f, "deepseek_v3_fp8", 0, 1, why);
    CHECK_STATUS(esft_model_trainable_save(&f.tr, &f.m, &f.cfg, "build/test-tmp-never-written.safetensors", &err),
                 ESFT_ERR_UNSUPPORTED);
    fixture_close(&f);
}

/* ---- threads, bad configs ------------------------------------------------------ */

/* A fixture's trainable set replaced by a PESC set (E 4, K 2, R 3), W_up
   left at the upcycling init (0) unless prepare. 0 on failure (why filled). */
static int fixture_pesc(fixture *f, const char *name, int sample, int prepare, char *why, size_t why_n)
{
    esft_train_spec sp;
    memset(&sp, 0, sizeof sp);
    sp.method = ESFT_TRAIN_PESC;
    sp.pesc = esft_pesc_config_init(0, 4, 2, 3);
    sp.seed = 5;
    if (!fixture_spec(f, name, sample, &sp, why, why_n)) return 0;
    if (prepare) pesc_prepare(f);
    return 1;
}

/* One pass of f's set on 1 and on 3 threads: the same loss, aux and gradient
   bits. 1100 tokens: a model this small runs on one thread below ~1000 tokens.
   Closes f. */
static void threads_run(fixture *f, const char *name)
{
    enum { TT = 1100 };
    double l1 = 0.0, l3 = 0.0, a1;
    int64_t n1 = 0, n3 = 0;
    float *g1 = (float *)malloc(f->tr.n_params * sizeof(float));
    int32_t *ids = (int32_t *)malloc(2 * TT * sizeof(int32_t)), *labels = ids + TT;
    int same, t;
    for (t = 0; t < TT; t++) {
        ids[t] = f->ds.ids[(t * 11) % (int)f->ds.offset[f->ds.n_samples]];
        labels[t] = t % 3 ? ids[t] : -100;
    }
    esft_set_num_threads(1);
    CHECK_STATUS(esft_model_forward_backward(&f->m, &f->tr, ids, labels, TT, 0.5f, &l1, &n1, NULL), ESFT_OK);
    memcpy(g1, f->tr.grads, f->tr.n_params * sizeof(float));
    a1 = f->tr.aux_loss;
    memset(f->tr.grads, 0, f->tr.n_params * sizeof(float));
    esft_set_num_threads(3);
    CHECK_STATUS(esft_model_forward_backward(&f->m, &f->tr, ids, labels, TT, 0.5f, &l3, &n3, NULL), ESFT_OK);
    esft_set_num_threads(0);
    same = memcmp(g1, f->tr.grads, f->tr.n_params * sizeof(float)) == 0 && l1 == l3 && n1 == n3 &&
           a1 == f->tr.aux_loss;
    free(g1);
    free(ids);
    fixture_close(f);
    CHECK_MSG(same, "%s: 1 and 3 threads differ (loss %.17g vs %.17g)", name, l1, l3);
}

static void threads_family(const char *name, int pesc)
{
    fixture f;
    char why[1024];
    if (!(pesc ? fixture_pesc(&f, name, 2, 1, why, sizeof why) : fixture_open(&f, name, 2, 3, why, sizeof why))) {
        fixture_close(&f);
        HARNESS_FAIL_("%.400s", why);
    }
    threads_run(&f, name);
}

/* The same for FFT and LoRA sets (weight gradients of every kind: linears,
   norms, biases, the embedding's rows, adapters' A and B). */
static void threads_method(const char *name, esft_train_method method)
{
    fixture f;
    char why[1024];
    esft_train_spec sp = method_spec(method, 4, 3);
    if (!fixture_spec(&f, name, 2, &sp, why, sizeof why)) {
        fixture_close(&f);
        HARNESS_FAIL_("%.400s", why);
    }
    threads_run(&f, name);
}

TEST(same_bits_any_thread_count)
{
    /* under valgrind (ESFT_TEST_LIGHT) one 1100-token pass pair costs minutes:
       the FFT set alone, which has every kind of weight gradient */
    if (!getenv("ESFT_TEST_LIGHT")) threads_family("qwen2_moe", 0);
    if (harness_state) return;
    if (!getenv("ESFT_TEST_LIGHT")) threads_family("deepseek_v2_qlora_yarn", 0);
    if (harness_state) return;
    if (!getenv("ESFT_TEST_LIGHT")) threads_family("llama", 1); /* PESC */
    if (harness_state) return;
    threads_method("qwen2_moe", ESFT_TRAIN_FFT);
    if (harness_state) return;
    if (!getenv("ESFT_TEST_LIGHT")) threads_method("deepseek_v2_lite", ESFT_TRAIN_LORA);
}

/* At the upcycling init (W_up = 0) the crafted model is the base: the same
   loss bits, in the forward and in training; trained adapters change it. */
static void pesc_init_family(const char *name)
{
    fixture f;
    char why[1024];
    double base = 0.0, crafted = 0.0, trained = 0.0;
    esft_model_run run;
    if (!fixture_pesc(&f, name, 0, 0, why, sizeof why)) {
        fixture_close(&f);
        HARNESS_FAIL_("%.400s", why);
    }
    memset(&run, 0, sizeof run);
    run.labels = f.labels;
    CHECK_STATUS(esft_model_forward(&f.m, f.ids, f.T, &run, &base, NULL, NULL), ESFT_OK);
    run.trainable = &f.tr;
    CHECK_STATUS(esft_model_forward(&f.m, f.ids, f.T, &run, &crafted, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_model_forward_backward(&f.m, &f.tr, f.ids, f.labels, f.T, 1.0f, &trained, NULL, NULL),
                 ESFT_OK);
    CHECK_MSG(base == crafted && base == trained, "%s: base %.17g, PESC at init %.17g / %.17g", name, base, crafted,
              trained);
    pesc_prepare(&f);
    CHECK_STATUS(esft_model_forward(&f.m, f.ids, f.T, &run, &crafted, NULL, NULL), ESFT_OK);
    CHECK_MSG(crafted != base, "%s: adapters with W_up != 0 leave the loss at %.17g", name, base);
    fixture_close(&f);
}

TEST(pesc_at_init_is_the_base)
{
    pesc_init_family("llama");
    if (harness_state) return;
    pesc_init_family("qwen2");
    if (harness_state) return;
    pesc_init_family("deepseek_v2_lite");
}

/* save -> load into a fresh set: the same block bits; Camelidae's names and the
   config in the file; a file of another config refused. */
TEST(pesc_save_load)
{
    const char *path = "build/test-tmp-pesc.safetensors";
    fixture f;
    char why[1024], name[160];
    esft_model_trainable again;
    esft_train_spec sp;
    esft_safetensors st;
    esft_error err;
    size_t i;
    if (!fixture_pesc(&f, "mistral", 0, 1, why, sizeof why)) {
        fixture_close(&f);
        HARNESS_FAIL_("%.400s", why);
    }
    for (i = 0; i < f.tr.n_params; i++) f.tr.params[i] += 1e-3f * (float)(i % 7);
    CHECK_STATUS(esft_model_trainable_save(&f.tr, &f.m, NULL, path, &err), ESFT_OK);
    CHECK_STATUS(esft_safetensors_open(&st, path, NULL, &err), ESFT_OK);
    CHECK(st.n_tensors == f.tr.n_pesc * (1 + 2 * 4));
    CHECK(esft_safetensors_metadata(&st, "pesc_n_experts") && strcmp(esft_safetensors_metadata(&st, "pesc_n_experts"), "4") == 0);
    CHECK(esft_safetensors_metadata(&st, "pesc_scale") && strcmp(esft_safetensors_metadata(&st, "pesc_scale"), "0.25") == 0);
    CHECK_STATUS(esft_pesc_tensor_name(name, sizeof name, 1, ESFT_PESC_UP, 3), ESFT_OK);
    CHECK(esft_safetensors_find(&st, name) >= 0);
    esft_safetensors_close(&st);
    memset(&sp, 0, sizeof sp);
    sp.method = ESFT_TRAIN_PESC;
    sp.pesc = f.tr.pesc;
    sp.seed = 99; /* another init: the file must overwrite all of it */
    CHECK_STATUS(esft_model_trainable_init_spec(&again, &f.m, &sp, NULL, &err), ESFT_OK);
    CHECK_STATUS(esft_model_trainable_load(&again, &f.m, path, &err), ESFT_OK);
    CHECK(again.n_params == f.tr.n_params && memcmp(again.params, f.tr.params, f.tr.n_params * sizeof(float)) == 0);
    esft_model_trainable_uninit(&again);
    sp.pesc.scale = 0.5f; /* same shapes, another scale */
    CHECK_STATUS(esft_model_trainable_init_spec(&again, &f.m, &sp, NULL, &err), ESFT_OK);
    CHECK_STATUS(esft_model_trainable_load(&again, &f.m, path, &err), ESFT_ERR_SHAPE);
    esft_model_trainable_uninit(&again);
    sp.pesc.scale = 0.25f;
    sp.pesc.rank = 2;
    CHECK_STATUS(esft_model_trainable_init_spec(&again, &f.m, &sp, NULL, &err), ESFT_OK);
    CHECK_STATUS(esft_model_trainable_load(&again, &f.m, path, &err), ESFT_ERR_SHAPE);
    esft_model_trainable_uninit(&again);
    remove(path);
    fixture_close(&f);
}

/* A model with no dense layer, PESC dropout, a bad PESC config: refused. */
TEST(pesc_refusals)
{
    esft_model m;
    esft_model_trainable tr;
    esft_train_spec sp;
    esft_error err;
    memset(&sp, 0, sizeof sp);
    sp.method = ESFT_TRAIN_PESC;
    sp.pesc = esft_pesc_config_init(0, 4, 2, 3);
    CHECK_STATUS(esft_model_open(&m, MODELS "mixtral", NULL, &err), ESFT_OK);
    CHECK_STATUS(esft_model_trainable_init_spec(&tr, &m, &sp, NULL, &err), ESFT_ERR_UNSUPPORTED);
    CHECK(strstr(err.message, "dense") != NULL);
    esft_model_close(&m);
    CHECK_STATUS(esft_model_open(&m, MODELS "llama", NULL, &err), ESFT_OK);
    sp.pesc.dropout = 0.1f;
    CHECK_STATUS(esft_model_trainable_init_spec(&tr, &m, &sp, NULL, &err), ESFT_ERR_UNSUPPORTED);
    sp.pesc.dropout = 0.0f;
    sp.pesc.top_k = 5;
    CHECK_STATUS(esft_model_trainable_init_spec(&tr, &m, &sp, NULL, &err), ESFT_ERR_INVALID_ARGUMENT);
    esft_model_close(&m);
}

/* Accumulation: two passes with scale 1 give twice one pass's gradient; the
   experts of a layer above all trained ones still get nothing wrong. */
TEST(backward_accumulates)
{
    fixture f;
    char why[1024];
    float *g1;
    size_t i;
    double worst = 0.0;
    FIXTURE_OPEN_OR_FAIL(&f, "olmoe", 0, 1, why);
    g1 = (float *)malloc(f.tr.n_params * sizeof(float));
    CHECK_STATUS(esft_model_forward_backward(&f.m, &f.tr, f.ids, f.labels, f.T, 1.0f, NULL, NULL, NULL), ESFT_OK);
    memcpy(g1, f.tr.grads, f.tr.n_params * sizeof(float));
    CHECK_STATUS(esft_model_forward_backward(&f.m, &f.tr, f.ids, f.labels, f.T, 1.0f, NULL, NULL, NULL), ESFT_OK);
    for (i = 0; i < f.tr.n_params; i++) {
        double d = fabs((double)f.tr.grads[i] - 2.0 * g1[i]);
        if (d > worst) worst = d;
    }
    free(g1);
    fixture_close(&f);
    CHECK_MSG(worst == 0.0, "second pass did not add exactly: %g", worst);
}

TEST(bad_expert_configs)
{
    fixture f;
    char why[1024];
    esft_model_trainable tr;
    esft_error err;
    int32_t ids[1] = {0}, labels[1] = {-100};
    FIXTURE_OPEN_OR_FAIL(&f, "deepseek_v2_lite", 1, 1, why);
    /* layer 0 is dense in this model */
    f.cfg_ids[0] = 1;
    f.cfg_offset[1] = 1;
    f.cfg_present[0] = 1;
    CHECK_STATUS(esft_model_trainable_init(&tr, &f.m, &f.cfg, NULL, &err), ESFT_ERR_RANGE);
    f.cfg_present[0] = 0;
    f.cfg_offset[1] = 0;
    f.cfg_ids[0] = 99;  /* past E in layer 1 */
    CHECK_STATUS(esft_model_trainable_init(&tr, &f.m, &f.cfg, NULL, &err), ESFT_ERR_RANGE);
    f.cfg_ids[0] = 0;
    f.cfg.non_expert_modules = 1; /* every non-expert tensor trains too */
    CHECK_STATUS(esft_model_trainable_init(&tr, &f.m, &f.cfg, NULL, &err), ESFT_OK);
    CHECK(tr.n_modules == f.m.n_tensors && tr.n_modules > 0);
    esft_model_trainable_uninit(&tr);
    f.cfg.non_expert_modules = 0;
    CHECK_STATUS(esft_model_trainable_init(&tr, &f.m, &f.cfg, NULL, &err), ESFT_OK);
    CHECK(esft_model_trainable_expert(&tr, tr.params, 1, f.cfg_ids[0]) == tr.params);
    CHECK(esft_model_trainable_expert(&tr, tr.params, 0, 0) == NULL);
    CHECK_STATUS(esft_model_forward_backward(&f.m, &tr, ids, NULL, 1, 1.0f, NULL, NULL, &err),
                 ESFT_ERR_INVALID_ARGUMENT);
    ids[0] = f.m.cfg.vocab;
    CHECK_STATUS(esft_model_forward_backward(&f.m, &tr, ids, labels, 1, 1.0f, NULL, NULL, &err), ESFT_ERR_RANGE);
    /* a block built for one model, used with another */
    {
        esft_model other;
        esft_model_run run;
        int32_t one[2] = {1, 2};
        CHECK_STATUS(esft_model_open(&other, MODELS "qwen2_moe", NULL, &err), ESFT_OK);
        memset(&run, 0, sizeof run);
        run.trainable = &tr;
        CHECK_STATUS(esft_model_forward(&other, one, 2, &run, NULL, NULL, &err), ESFT_ERR_SHAPE);
        CHECK_STATUS(esft_model_forward_backward(&other, &tr, one, one, 2, 1.0f, NULL, NULL, &err), ESFT_ERR_SHAPE);
        esft_model_close(&other);
    }
    esft_model_trainable_uninit(&tr);
    fixture_close(&f);
}

HARNESS_MAIN()
