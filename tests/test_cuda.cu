/* test_cuda.cu - the CUDA backend against the CPU reference.

   Build:  make cuda   (nvcc -I. tests/test_cuda.cu esft_cuda.cu -lcublas)
   Every test that needs a GPU SKIPs with "no CUDA device" when there is none;
   the constructor test runs everywhere. Same seeded inputs go through
   esft_backend_cpu() and esft_backend_cuda(); tolerances are stated next to each
   comparison (docs/cuda.md explains them). Mismatches print the first few
   elements and the worst error, and fail the process. */
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"
#include "harness.h"

/* ---------------------------------------------------------------------- */
/* the device, seeded data, device buffers                                 */
/* ---------------------------------------------------------------------- */

static esft_error gpu_err;
static const esft_backend *gpu_backend;
static int gpu_tried;

static const esft_backend *gpu(void)
{
    if (!gpu_tried) {
        gpu_tried = 1;
        gpu_backend = esft_backend_cuda(&gpu_err);
    }
    return gpu_backend;
}

/* No device: SKIP. A device that fails to start is a failure, not a skip. */
#define NEED_GPU()                                                                      \
    do {                                                                                \
        if (!gpu()) {                                                                   \
            if (strncmp(gpu_err.message, "no CUDA device", 14) == 0) SKIP("%s", gpu_err.message); \
            CHECK_MSG(0, "CUDA backend failed to start: %s", gpu_err.message);          \
        }                                                                               \
        pool_release();                                                                 \
    } while (0)

static uint64_t rng_state;
static void rng_seed(uint64_t s) { rng_state = s * 0x9E3779B97F4A7C15ULL + 1; }
static uint32_t rng_u32(void)
{
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1DULL) >> 32);
}
static float rng_uniform(float lo, float hi) { return lo + (hi - lo) * (float)(rng_u32() >> 8) / 16777216.0f; }

/* Device buffers of the current test; released when the next GPU test starts. */
static void *pool[64];
static int pool_n;

static void pool_release(void)
{
    int i;
    for (i = 0; i < pool_n; i++) gpu()->free(gpu()->context, pool[i]);
    pool_n = 0;
}

/* bytes of device memory holding a copy of host (or uninitialised when host is NULL). */
static void *dev(const void *host, size_t bytes)
{
    void *d = NULL;
    if (pool_n == 64 || gpu()->alloc(gpu()->context, bytes, &d) != ESFT_OK) return NULL;
    pool[pool_n++] = d;
    if (host && gpu()->upload(gpu()->context, d, host, bytes) != ESFT_OK) return NULL;
    return d;
}

static int get(void *host, const void *d, size_t bytes)
{
    return gpu()->download(gpu()->context, host, d, bytes) == ESFT_OK;
}

/* ---------------------------------------------------------------------- */
/* routing: CPU vs CUDA                                                    */
/* ---------------------------------------------------------------------- */

/* Tolerances: gating probabilities differ by expf's last bits and the order of
   the softmax sum (a few ulp); weights add renormalisation and scaling. */
#define PROB_ATOL 1e-6
#define PROB_RTOL 1e-5

static char cmp_msg[384];

static int near_enough(double a, double ref, double atol, double rtol, double *worst)
{
    double d = fabs(a - ref);
    if (d > *worst) *worst = d;
    return d <= atol + rtol * fabs(ref);
}

/* Compares one routing of T tokens; returns 1 when CUDA agrees with the CPU.
   Ids are compared position by position: where they differ, the selection
   scores at that position must tie within tolerance (a near tie resolved the
   other way), and each row must hold K distinct ids in range. With exact_ids,
   ids must be identical (inputs whose ties are exact on both backends). */
static int compare_route(const esft_route_config *cfg, const float *logits, int T, const char *label,
                         int exact_ids)
{
    int E = cfg->n_experts, K = cfg->top_k, t, j, bad = 0, near_ties = 0;
    size_t nk = (size_t)T * K, ne = (size_t)T * E;
    int32_t *ic = (int32_t *)malloc(nk * 4), *ig = (int32_t *)malloc(nk * 4);
    float *wc = (float *)malloc(nk * 4), *wg = (float *)malloc(nk * 4);
    float *pc = (float *)malloc(ne * 4), *pg = (float *)malloc(ne * 4);
    double worst_p = 0, worst_w = 0;
    esft_route_config dcfg = *cfg;
    esft_error e;
    void *d_ids = dev(NULL, nk * 4), *d_w = dev(NULL, nk * 4), *d_p = dev(NULL, ne * 4);
    void *d_logits = dev(logits, ne * 4);
    cmp_msg[0] = 0;
    if (cfg->selection_bias) dcfg.selection_bias = (const float *)dev(cfg->selection_bias, (size_t)E * 4);
    if (!d_ids || !d_w || !d_p || !d_logits || (cfg->selection_bias && !dcfg.selection_bias)) {
        snprintf(cmp_msg, sizeof cmp_msg, "%s: device allocation failed", label);
        bad = 1;
    } else if (esft_route(cfg, ic, wc, pc, logits, T, &e) != ESFT_OK) {
        snprintf(cmp_msg, sizeof cmp_msg, "%s: cpu route failed: %.200s", label, e.message);
        bad = 1;
    } else if (esft_route_with(gpu(), &dcfg, (int32_t *)d_ids, (float *)d_w, (float *)d_p,
                               (const float *)d_logits, T, &e) != ESFT_OK) {
        snprintf(cmp_msg, sizeof cmp_msg, "%s: cuda route failed: %.200s", label, e.message);
        bad = 1;
    } else if (!get(ig, d_ids, nk * 4) || !get(wg, d_w, nk * 4) || !get(pg, d_p, ne * 4)) {
        snprintf(cmp_msg, sizeof cmp_msg, "%s: download failed", label);
        bad = 1;
    }
    for (t = 0; !bad && t < T; t++) {
        const int32_t *rc = ic + (size_t)t * K, *rg = ig + (size_t)t * K;
        const float *prc = pc + (size_t)t * E;
        for (j = 0; j < E; j++)
            if (!near_enough(pg[(size_t)t * E + j], prc[j], PROB_ATOL, PROB_RTOL, &worst_p) && bad++ < 5)
                printf("  %s: token %d expert %d prob cuda %.9g cpu %.9g\n", label, t, j,
                       pg[(size_t)t * E + j], prc[j]);
        for (j = 0; j < K; j++) {
            int i, dup = 0;
            for (i = 0; i < j; i++) dup |= rg[i] == rg[j];
            if (rg[j] < 0 || rg[j] >= E || dup) {
                if (bad++ < 5) printf("  %s: token %d slot %d cuda id %d invalid or repeated\n", label, t, j, rg[j]);
                continue;
            }
            if (rg[j] != rc[j]) {
                double bc = cfg->selection_bias ? cfg->selection_bias[rc[j]] : 0.0;
                double bg = cfg->selection_bias ? cfg->selection_bias[rg[j]] : 0.0;
                double sc = prc[rc[j]] + bc, sg = prc[rg[j]] + bg;
                near_ties++;
                if ((exact_ids || fabs(sc - sg) > PROB_ATOL + PROB_RTOL * fabs(sc)) && bad++ < 5)
                    printf("  %s: token %d slot %d cuda id %d (score %.9g) cpu id %d (score %.9g)\n", label, t,
                           j, rg[j], sg, rc[j], sc);
            }
            if (!near_enough(wg[(size_t)t * K + j], wc[(size_t)t * K + j], PROB_ATOL * cfg->routed_scaling,
                             PROB_RTOL, &worst_w) && bad++ < 5)
                printf("  %s: token %d slot %d weight cuda %.9g cpu %.9g\n", label, t, j,
                       wg[(size_t)t * K + j], wc[(size_t)t * K + j]);
        }
    }
    printf("  %s: T %d E %d K %d: worst prob error %.3g, worst weight error %.3g, ids differing at near ties %d, "
           "mismatches %d\n", label, T, E, K, worst_p, worst_w, near_ties, bad);
    if (bad && !cmp_msg[0]) snprintf(cmp_msg, sizeof cmp_msg, "%s: %d mismatches (see above)", label, bad);
    free(ic); free(ig); free(wc); free(wg); free(pc); free(pg);
    return !bad;
}

static float *random_logits(int T, int E, float lo, float hi)
{
    float *x = (float *)malloc((size_t)T * E * sizeof(float));
    size_t i;
    for (i = 0; i < (size_t)T * E; i++) x[i] = rng_uniform(lo, hi);
    return x;
}

TEST(cuda_constructor_gives_backend_or_reason)
{
    esft_error e;
    const esft_backend *b;
    memset(&e, 0, sizeof e);
    b = esft_backend_cuda(&e);
    if (!b) {
        CHECK_EQ_INT(e.status, ESFT_ERR_BACKEND);
        CHECK_MSG(e.message[0] != 0, "esft_backend_cuda returned NULL without a reason");
        printf("  no backend, as expected without a GPU: %s\n", e.message);
        CHECK(esft_backend_cuda(NULL) == NULL); /* err is optional */
        return;
    }
    CHECK_STATUS(esft_backend_check(b, &e), ESFT_OK);
    CHECK(strcmp(b->name, "cuda") == 0);
    CHECK(esft_backend_cuda(NULL) == b); /* one table per process */
    CHECK(b->alloc && b->free && b->upload && b->download && b->route && b->stats_accumulate);
}

TEST(cuda_route_softmax_deepseek_v2_lite)
{
    esft_route_config cfg = esft_route_config_deepseek_v2_lite();
    float *x;
    int ok;
    NEED_GPU();
    rng_seed(1);
    x = random_logits(1000, cfg.n_experts, -4.0f, 4.0f);
    ok = compare_route(&cfg, x, 1000, "softmax E64 K6", 0);
    free(x);
    CHECK_MSG(ok, "%s", cmp_msg);
}

TEST(cuda_route_softmax_renormalised)
{
    esft_route_config cfg = esft_route_config_init(8, 2); /* Mixtral */
    float *x;
    int ok;
    NEED_GPU();
    cfg.renormalize = 1;
    rng_seed(2);
    x = random_logits(777, 8, -3.0f, 3.0f);
    ok = compare_route(&cfg, x, 777, "softmax renorm E8 K2", 0);
    free(x);
    CHECK_MSG(ok, "%s", cmp_msg);
}

TEST(cuda_route_sigmoid_deepseek_v3_groups_bias_scaling)
{
    float bias[256], *x;
    esft_route_config cfg;
    int i, ok;
    NEED_GPU();
    rng_seed(3);
    for (i = 0; i < 256; i++) bias[i] = rng_uniform(-0.1f, 0.1f);
    cfg = esft_route_config_deepseek_v3(bias);
    x = random_logits(513, 256, -5.0f, 5.0f);
    ok = compare_route(&cfg, x, 513, "sigmoid V3 E256 K8 G8/4 top2", 0);
    free(x);
    CHECK_MSG(ok, "%s", cmp_msg);
}

TEST(cuda_route_group_limited_greedy)
{
    esft_route_config cfg = esft_route_config_init(64, 6);
    float *x;
    int ok;
    NEED_GPU();
    cfg.n_group = 8;
    cfg.topk_group = 3;
    cfg.group_score = ESFT_GROUP_SCORE_MAX;
    cfg.renormalize = 1;
    rng_seed(4);
    x = random_logits(300, 64, -4.0f, 4.0f);
    ok = compare_route(&cfg, x, 300, "softmax E64 K6 G8/3 max", 0);
    free(x);
    CHECK_MSG(ok, "%s", cmp_msg);
}

TEST(cuda_route_many_experts)
{
    esft_route_config cfg = esft_route_config_init(1024, 16);
    float *x;
    int ok;
    NEED_GPU();
    rng_seed(5);
    x = random_logits(64, 1024, -6.0f, 6.0f);
    ok = compare_route(&cfg, x, 64, "softmax E1024 K16", 0);
    free(x);
    CHECK_MSG(ok, "%s", cmp_msg);
}

/* Logits from {0, 0.5, 1}: equal logits give bit-equal probabilities on both
   backends, so every tie is exact and must go to the lower id, identically. */
TEST(cuda_route_exact_ties_go_to_lower_id)
{
    esft_route_config cfg = esft_route_config_init(16, 4);
    float *x;
    int ok, i;
    NEED_GPU();
    rng_seed(6);
    x = random_logits(500, 16, 0.0f, 1.0f);
    for (i = 0; i < 500 * 16; i++) x[i] = (float)(int)(x[i] * 3.0f) * 0.5f;
    ok = compare_route(&cfg, x, 500, "exact ties E16 K4", 1);
    cfg.gating = ESFT_GATING_SIGMOID;
    cfg.n_group = 4;
    cfg.topk_group = 2;
    cfg.group_score = ESFT_GROUP_SCORE_TOP2_SUM;
    if (ok) ok = compare_route(&cfg, x, 500, "exact ties sigmoid G4/2", 1);
    free(x);
    CHECK_MSG(ok, "%s", cmp_msg);
}

TEST(cuda_route_nan_logit_names_the_token)
{
    esft_route_config cfg = esft_route_config_init(32, 2);
    esft_error e;
    float *x;
    void *d_x, *d_ids, *d_w;
    NEED_GPU();
    rng_seed(7);
    x = random_logits(40, 32, -1.0f, 1.0f);
    x[17 * 32 + 3] = NAN;
    x[30 * 32 + 1] = INFINITY;
    d_x = dev(x, 40 * 32 * 4);
    free(x);
    d_ids = dev(NULL, 40 * 2 * 4);
    d_w = dev(NULL, 40 * 2 * 4);
    CHECK(d_x && d_ids && d_w);
    CHECK_STATUS(esft_route_with(gpu(), &cfg, (int32_t *)d_ids, (float *)d_w, NULL, (const float *)d_x, 40, &e),
                 ESFT_ERR_NUMERIC);
    CHECK_MSG(strstr(e.message, "token 17, expert 3") != NULL, "message: %s", e.message);
    /* the flag re-arms: a clean call afterwards succeeds */
    CHECK_STATUS(esft_route_with(gpu(), &cfg, (int32_t *)d_ids, (float *)d_w, NULL, (const float *)d_x, 17, &e),
                 ESFT_OK);
}

TEST(cuda_route_rejects_host_memory_and_huge_E)
{
    esft_route_config cfg = esft_route_config_init(4, 1);
    float x[8] = {1, 2, 3, 4, 4, 3, 2, 1}, w[2];
    int32_t ids[2];
    esft_error e;
    void *d_x, *d_ids, *d_w;
    NEED_GPU();
    CHECK_STATUS(esft_route_with(gpu(), &cfg, ids, w, NULL, x, 2, &e), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strstr(e.message, "host memory") != NULL, "message: %s", e.message);
    CHECK_STATUS(esft_route_with(gpu(), &cfg, ids, w, NULL, x, 0, &e), ESFT_OK); /* nothing to do */
    cfg = esft_route_config_init(8192, 2);
    d_x = dev(NULL, 8192 * 4);
    d_ids = dev(NULL, 8);
    d_w = dev(NULL, 8);
    CHECK(d_x && d_ids && d_w);
    CHECK_STATUS(esft_route_with(gpu(), &cfg, (int32_t *)d_ids, (float *)d_w, NULL, (const float *)d_x, 1, &e),
                 ESFT_ERR_UNSUPPORTED);
}

/* ---------------------------------------------------------------------- */
/* router statistics: bit-identical                                        */
/* ---------------------------------------------------------------------- */

/* Adds the same routing twice (the op accumulates) on both backends and
   compares the counters bit for bit. */
static int compare_stats(int T, int K, int E, int with_weights, int with_mask, const char *label)
{
    size_t nk = (size_t)T * K, i;
    int32_t *ids = (int32_t *)malloc(nk * 4);
    float *w = (float *)malloc(nk * 4);
    unsigned char *mask = (unsigned char *)malloc((size_t)T);
    uint64_t *cc = (uint64_t *)calloc(2 * (size_t)E, 8), *cg = (uint64_t *)calloc(2 * (size_t)E, 8);
    void *d_ids, *d_w, *d_mask, *d_c;
    const esft_backend *cpu = esft_backend_cpu();
    esft_error e;
    int r, ok = 1, shown = 0;
    for (i = 0; i < nk; i++) {
        /* skewed ids, so a few experts are hot (the atomics' hard case) */
        uint32_t u = rng_u32() % (uint32_t)(E * 4);
        ids[i] = (int32_t)(u < (uint32_t)E * 3 ? u % 4 : u % (uint32_t)E);
        w[i] = rng_uniform(0.0f, 2.5f);
    }
    for (i = 0; i < (size_t)T; i++) mask[i] = (unsigned char)(rng_u32() % 5 != 0);
    d_ids = dev(ids, nk * 4);
    d_w = dev(w, nk * 4);
    d_mask = dev(mask, (size_t)T);
    d_c = dev(cg, 2 * (size_t)E * 8);
    cmp_msg[0] = 0;
    if (!d_ids || !d_w || !d_mask || !d_c) {
        snprintf(cmp_msg, sizeof cmp_msg, "%s: device allocation failed", label);
        ok = 0;
    }
    for (r = 0; ok && r < 2; r++) {
        const float *hw = with_weights ? w : NULL, *dw = with_weights ? (const float *)d_w : NULL;
        const unsigned char *hm = with_mask ? mask : NULL, *dm = with_mask ? (const unsigned char *)d_mask : NULL;
        if (cpu->stats_accumulate(cpu->context, cc, cc + E, ids, hw, hm, T, K, E, &e) != ESFT_OK ||
            gpu()->stats_accumulate(gpu()->context, (uint64_t *)d_c, (uint64_t *)d_c + E, (const int32_t *)d_ids,
                                    dw, dm, T, K, E, &e) != ESFT_OK) {
            snprintf(cmp_msg, sizeof cmp_msg, "%s: stats_accumulate failed: %.200s", label, e.message);
            ok = 0;
        }
    }
    if (ok && !get(cg, d_c, 2 * (size_t)E * 8)) {
        snprintf(cmp_msg, sizeof cmp_msg, "%s: download failed", label);
        ok = 0;
    }
    for (i = 0; ok && i < 2 * (size_t)E; i++)
        if (cc[i] != cg[i] && shown++ < 5)
            printf("  %s: %s[%lu] cuda %llu cpu %llu\n", label, i < (size_t)E ? "count" : "gate_sum",
                   (unsigned long)(i % E), (unsigned long long)cg[i], (unsigned long long)cc[i]);
    if (ok) printf("  %s: T %d K %d E %d: %d counters differ\n", label, T, K, E, shown);
    if (ok && shown) {
        snprintf(cmp_msg, sizeof cmp_msg, "%s: %d counters differ (see above)", label, shown);
        ok = 0;
    }
    free(ids); free(w); free(mask); free(cc); free(cg);
    return ok;
}

TEST(cuda_stats_bit_identical_to_cpu)
{
    NEED_GPU();
    rng_seed(10);
    CHECK_MSG(compare_stats(20000, 6, 64, 1, 1, "E64 weights+mask"), "%s", cmp_msg);
    CHECK_MSG(compare_stats(3001, 8, 256, 1, 0, "E256 weights"), "%s", cmp_msg);
    CHECK_MSG(compare_stats(999, 2, 8, 0, 1, "E8 counts only"), "%s", cmp_msg);
    CHECK_MSG(compare_stats(5000, 4, 3000, 1, 1, "E3000 global atomics"), "%s", cmp_msg);
}

TEST(cuda_stats_rejects_bad_ids_and_host_memory)
{
    int32_t ids[6] = {0, 1, 2, 3, 64, 5};
    uint64_t c[128];
    esft_error e;
    void *d_ids, *d_c;
    NEED_GPU();
    d_ids = dev(ids, sizeof ids);
    d_c = dev(NULL, sizeof c);
    CHECK(d_ids && d_c);
    CHECK_STATUS(gpu()->stats_accumulate(gpu()->context, (uint64_t *)d_c, (uint64_t *)d_c + 64,
                                         (const int32_t *)d_ids, NULL, NULL, 3, 2, 64, &e), ESFT_ERR_RANGE);
    CHECK_MSG(strstr(e.message, "token 2") != NULL, "message: %s", e.message);
    CHECK_STATUS(gpu()->stats_accumulate(gpu()->context, c, c + 64, ids, NULL, NULL, 3, 2, 64, &e),
                 ESFT_ERR_INVALID_ARGUMENT);
}

HARNESS_MAIN()
