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

/* compare_route on T tokens of logits uniform in [lo, hi), drawn from the
   generator as the caller seeded it; cmp_msg says what went wrong. */
static int compare_random_route(const esft_route_config *cfg, int T, float lo, float hi, const char *label)
{
    float *x = random_logits(T, cfg->n_experts, lo, hi);
    int ok = compare_route(cfg, x, T, label, 0);
    free(x);
    return ok;
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
    NEED_GPU();
    rng_seed(1);
    CHECK_MSG(compare_random_route(&cfg, 1000, -4.0f, 4.0f, "softmax E64 K6"), "%s", cmp_msg);
}

TEST(cuda_route_softmax_renormalised)
{
    esft_route_config cfg = esft_route_config_init(8, 2); /* Mixtral */
    NEED_GPU();
    cfg.renormalize = 1;
    rng_seed(2);
    CHECK_MSG(compare_random_route(&cfg, 777, -3.0f, 3.0f, "softmax renorm E8 K2"), "%s", cmp_msg);
}

TEST(cuda_route_sigmoid_deepseek_v3_groups_bias_scaling)
{
    float bias[256];
    esft_route_config cfg;
    int i;
    NEED_GPU();
    rng_seed(3);
    for (i = 0; i < 256; i++) bias[i] = rng_uniform(-0.1f, 0.1f);
    cfg = esft_route_config_deepseek_v3(bias);
    CHECK_MSG(compare_random_route(&cfg, 513, -5.0f, 5.0f, "sigmoid V3 E256 K8 G8/4 top2"), "%s", cmp_msg);
}

TEST(cuda_route_group_limited_greedy)
{
    esft_route_config cfg = esft_route_config_init(64, 6);
    NEED_GPU();
    cfg.n_group = 8;
    cfg.topk_group = 3;
    cfg.group_score = ESFT_GROUP_SCORE_MAX;
    cfg.renormalize = 1;
    rng_seed(4);
    CHECK_MSG(compare_random_route(&cfg, 300, -4.0f, 4.0f, "softmax E64 K6 G8/3 max"), "%s", cmp_msg);
}

TEST(cuda_route_many_experts)
{
    esft_route_config cfg = esft_route_config_init(1024, 16);
    NEED_GPU();
    rng_seed(5);
    CHECK_MSG(compare_random_route(&cfg, 64, -6.0f, 6.0f, "softmax E1024 K16"), "%s", cmp_msg);
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

/* Weights the CPU op refuses (NaN, negative, past ESFT_MAX_GATE_WEIGHT) are
   refused here too, naming the token. */
TEST(cuda_stats_rejects_weights_the_cpu_rejects)
{
    int32_t ids[4] = {0, 1, 2, 3};
    const float bad[3] = {NAN, -0.5f, 1e6f};
    uint64_t c[16];
    esft_error e;
    int k;
    NEED_GPU();
    for (k = 0; k < 3; k++) {
        float w[4] = {0.25f, 0.25f, 0.25f, 0.25f};
        void *d_ids, *d_w, *d_c;
        esft_error cpu;
        w[3] = bad[k];
        d_ids = dev(ids, sizeof ids);
        d_w = dev(w, sizeof w);
        d_c = dev(NULL, sizeof c);
        CHECK(d_ids && d_w && d_c);
        CHECK_STATUS(esft_backend_cpu()->stats_accumulate(NULL, c, c + 8, ids, w, NULL, 2, 2, 8, &cpu), ESFT_ERR_RANGE);
        CHECK_STATUS(gpu()->stats_accumulate(gpu()->context, (uint64_t *)d_c, (uint64_t *)d_c + 8,
                                             (const int32_t *)d_ids, (const float *)d_w, NULL, 2, 2, 8, &e),
                     ESFT_ERR_RANGE);
        CHECK_MSG(strstr(e.message, "token 1") != NULL, "message: %s", e.message);
    }
}

/* ---------------------------------------------------------------------- */
/* MoE layer: CPU vs CUDA, forward and backward                            */
/* ---------------------------------------------------------------------- */

/* esft_moe_forward/_backward check x and dy on the host and esft_moe_init
   fills the parameter block with memcpy, so the CUDA layer lives in managed
   memory (host- and device-addressable): an allocator over cudaMallocManaged. */
static void *managed_alloc(void *user, size_t n)
{
    void *p = NULL;
    (void)user;
    return cudaMallocManaged(&p, n ? n : 1) == cudaSuccess ? p : NULL;
}
static void managed_free(void *user, void *p) { (void)user; cudaFree(p); }

/* A managed copy of n floats (or n zero bytes when src is NULL), freed with the pool. */
static void *managed(const void *src, size_t bytes)
{
    void *p = managed_alloc(NULL, bytes);
    if (!p || pool_n == 64) return NULL;
    pool[pool_n++] = p;
    if (src) memcpy(p, src, bytes);
    else memset(p, 0, bytes);
    return p;
}

static float *random_floats(size_t n, float lo, float hi)
{
    float *x = (float *)malloc(n * sizeof(float));
    size_t i;
    for (i = 0; i < n; i++) x[i] = rng_uniform(lo, hi);
    return x;
}

/* NMSE = sum (a - r)^2 / sum r^2 and the worst |a - r| relative to max |r|;
   prints both and the first elements beyond max_tol. 1 when within both. */
static int close_enough(const char *what, const float *got, const float *ref, size_t n, double nmse_tol,
                        double max_tol)
{
    double num = 0, den = 0, worst = 0, peak = 0, nmse;
    size_t i;
    int shown = 0;
    for (i = 0; i < n; i++) peak = fabs(ref[i]) > peak ? fabs(ref[i]) : peak;
    for (i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]);
        num += d * d;
        den += (double)ref[i] * ref[i];
        if (d > worst) worst = d;
        if (!(d <= max_tol * peak) && shown++ < 5)
            printf("    %s[%lu]: cuda %.9g cpu %.9g\n", what, (unsigned long)i, got[i], ref[i]);
    }
    nmse = den > 0 ? num / den : num;
    printf("    %-8s n %-7lu NMSE %.3g (tol %.0e)  worst |d| %.3g = %.3g of max|ref| (tol %.0e)\n", what,
           (unsigned long)n, nmse, nmse_tol, worst, peak > 0 ? worst / peak : worst, max_tol);
    return nmse <= nmse_tol && shown == 0;
}

typedef struct moe_case {
    esft_moe_config cfg;
    unsigned char trainable[64];
    float bias[64];
    int use_bias, T;
    const char *label;
} moe_case;

/* Runs one case through both backends (ESFT_CUDA_MATH = math) and compares y,
   aux, dx (accumulated onto a non-zero start) and the gradient block. With
   cross_check, also runs the CPU backward on the CUDA forward's workspace: the
   two backends must agree on its layout. */
static int compare_moe(moe_case *mc, const char *math, double nmse_tol, double max_tol, int cross_check)
{
    esft_moe_config cfg = mc->cfg;
    int D = cfg.d_model, E = cfg.route.n_experts, F = cfg.d_expert, FS = cfg.d_shared, T = mc->T, ok = 1;
    size_t nr = (size_t)E * D, ne = (size_t)E * F * D, ns = (size_t)FS * D, td = (size_t)T * D, ws_bytes = 0;
    float *router = random_floats(nr, -2.0f / sqrtf((float)D), 2.0f / sqrtf((float)D));
    float *gate = random_floats(ne, -1.0f / sqrtf((float)D), 1.0f / sqrtf((float)D));
    float *up = random_floats(ne, -1.0f / sqrtf((float)D), 1.0f / sqrtf((float)D));
    float *down = random_floats(ne, -1.0f / sqrtf((float)F), 1.0f / sqrtf((float)F));
    float *sg = random_floats(ns + 1, -1.0f / sqrtf((float)D), 1.0f / sqrtf((float)D));
    float *su = random_floats(ns + 1, -1.0f / sqrtf((float)D), 1.0f / sqrtf((float)D));
    float *sd = random_floats(ns + 1, -1.0f / sqrtf((float)(FS + 1)), 1.0f / sqrtf((float)(FS + 1)));
    float *x = random_floats(td, -1.0f, 1.0f), *dy = random_floats(td, -1.0f, 1.0f);
    float *dx0 = random_floats(td, -0.5f, 0.5f);
    float *y_c = (float *)malloc(td * 4), *dx_c = (float *)malloc(td * 4), aux_c = 0, aux_g = 0;
    float *y_g, *dx_g, *x_g, *dy_g;
    void *ws_c, *ws_g;
    esft_moe_weights wc, wg;
    esft_moe lc, lg;
    esft_allocator man = {NULL, managed_alloc, managed_free};
    esft_error e;
    memset(&lc, 0, sizeof lc);
    memset(&lg, 0, sizeof lg);
    setenv("ESFT_CUDA_MATH", math, 1);
    printf("  %s, ESFT_CUDA_MATH=%s\n", mc->label, math);
    cfg.trainable_experts = mc->trainable;
    wc.router = router; wc.gate = gate; wc.up = up; wc.down = down;
    wc.shared_gate = FS ? sg : NULL; wc.shared_up = FS ? su : NULL; wc.shared_down = FS ? sd : NULL;
    wg.router = (const float *)managed(router, nr * 4);
    wg.gate = (const float *)managed(gate, ne * 4);
    wg.up = (const float *)managed(up, ne * 4);
    wg.down = (const float *)managed(down, ne * 4);
    wg.shared_gate = FS ? (const float *)managed(sg, ns * 4) : NULL;
    wg.shared_up = FS ? (const float *)managed(su, ns * 4) : NULL;
    wg.shared_down = FS ? (const float *)managed(sd, ns * 4) : NULL;
    x_g = (float *)managed(x, td * 4);
    dy_g = (float *)managed(dy, td * 4);
    y_g = (float *)managed(NULL, td * 4);
    dx_g = (float *)managed(dx0, td * 4);
    memcpy(dx_c, dx0, td * 4);
    cmp_msg[0] = 0;
    if (esft_moe_workspace_size(&cfg, T, &ws_bytes, &e) != ESFT_OK) {
        snprintf(cmp_msg, sizeof cmp_msg, "%s: workspace size: %.200s", mc->label, e.message);
        ok = 0;
    }
    ws_c = malloc(ws_bytes);
    ws_g = managed(NULL, ws_bytes);
    if (ok && (!wg.router || !wg.gate || !wg.up || !wg.down || !x_g || !dy_g || !y_g || !dx_g || !ws_g ||
               (mc->use_bias && !(cfg.route.selection_bias = (const float *)managed(mc->bias, (size_t)E * 4))))) {
        snprintf(cmp_msg, sizeof cmp_msg, "%s: managed allocation failed", mc->label);
        ok = 0;
    }
    if (ok) {
        esft_moe_config cfg_c = cfg;
        if (mc->use_bias) cfg_c.route.selection_bias = mc->bias;
        if (esft_moe_init(&lc, &cfg_c, &wc, NULL, &e) != ESFT_OK || esft_moe_init(&lg, &cfg, &wg, &man, &e) != ESFT_OK) {
            snprintf(cmp_msg, sizeof cmp_msg, "%s: esft_moe_init: %.200s", mc->label, e.message);
            ok = 0;
        }
        lg.backend = gpu();
    }
    if (ok && (esft_moe_forward(&lc, y_c, &aux_c, x, ws_c, ws_bytes, T, &e) != ESFT_OK ||
               esft_moe_forward(&lg, y_g, &aux_g, x_g, ws_g, ws_bytes, T, &e) != ESFT_OK)) {
        snprintf(cmp_msg, sizeof cmp_msg, "%s: forward: %.200s", mc->label, e.message);
        ok = 0;
    }
    if (ok && (esft_moe_backward(&lc, dx_c, dy, x, ws_c, ws_bytes, T, &e) != ESFT_OK ||
               esft_moe_backward(&lg, dx_g, dy_g, x_g, ws_g, ws_bytes, T, &e) != ESFT_OK)) {
        snprintf(cmp_msg, sizeof cmp_msg, "%s: backward: %.200s", mc->label, e.message);
        ok = 0;
    }
    if (ok) {
        int good = close_enough("y", y_g, y_c, td, nmse_tol, max_tol);
        printf("    aux      cuda %.9g cpu %.9g\n", aux_g, aux_c);
        good &= fabs(aux_g - aux_c) <= 1e-5 * fabs(aux_c) + 1e-9;
        good &= close_enough("dx", dx_g, dx_c, td, nmse_tol, max_tol);
        good &= lg.n_params == lc.n_params;
        if (lc.n_params) good &= close_enough("grads", lg.grads, lc.grads, lc.n_params, nmse_tol, max_tol);
        if (!good) {
            snprintf(cmp_msg, sizeof cmp_msg, "%s (%s): CUDA and CPU differ beyond tolerance (see above)", mc->label,
                     math);
            ok = 0;
        }
    }
    if (ok && cross_check) { /* CPU backward on the CUDA forward's saved workspace */
        memcpy(dx_g, dx0, td * 4);
        esft_moe_zero_grad(&lg);
        lg.backend = esft_backend_cpu();
        if (esft_moe_backward(&lg, dx_g, dy_g, x_g, ws_g, ws_bytes, T, &e) != ESFT_OK) {
            snprintf(cmp_msg, sizeof cmp_msg, "%s: cpu backward on cuda workspace: %.200s", mc->label, e.message);
            ok = 0;
        } else {
            int good;
            printf("    cross-check: CPU backward from the CUDA forward's workspace\n");
            good = close_enough("dx", dx_g, dx_c, td, nmse_tol, max_tol);
            if (lc.n_params) good &= close_enough("grads", lg.grads, lc.grads, lc.n_params, nmse_tol, max_tol);
            if (!good) {
                snprintf(cmp_msg, sizeof cmp_msg, "%s: workspace layouts of the backends disagree", mc->label);
                ok = 0;
            }
        }
    }
    esft_moe_uninit(&lc);
    esft_moe_uninit(&lg);
    free(router); free(gate); free(up); free(down); free(sg); free(su); free(sd);
    free(x); free(dy); free(dx0); free(y_c); free(dx_c); free(ws_c);
    return ok;
}

/* Tolerances. fp32: only the summation order differs (cuBLAS vs the naive
   GEMM) and expf's last bits: NMSE 1e-8 and 1e-4 of the largest value are
   orders of magnitude above what is expected (~1e-13, ~1e-6). bf16 products
   (8-bit mantissas, fp32 sums): expected NMSE ~1e-5; 5e-4 and 5 % leave room
   and still catch any real error (a wrong row or expert gives NMSE ~1). */
#define MOE_FP32_NMSE 1e-8
#define MOE_FP32_MAX 1e-4
#define MOE_BF16_NMSE 5e-4
#define MOE_BF16_MAX 5e-2

/* DeepSeek-V2 shape in small: softmax, per-sequence aux loss, shared block,
   4 of 16 experts trainable, router and shared block trainable. */
static moe_case moe_case_v2(void)
{
    moe_case mc;
    memset(&mc, 0, sizeof mc);
    mc.cfg = esft_moe_config_init(64, 16, 4, 32, 48);
    mc.cfg.aux_alpha = 0.01f;
    mc.cfg.aux_mode = ESFT_AUX_SEQUENCE;
    mc.cfg.aux_seq_len = 32;
    mc.cfg.train_router = 1;
    mc.cfg.train_shared = 1;
    mc.trainable[1] = mc.trainable[5] = mc.trainable[6] = mc.trainable[11] = 1;
    mc.T = 128;
    mc.label = "V2-like D64 E16 K4 F32 FS48 seq-aux";
    return mc;
}

/* DeepSeek-V3 routing: sigmoid, bias, groups, renormalised, scaled; no shared
   block; 3 of 32 experts trainable, router frozen. */
static moe_case moe_case_v3(void)
{
    moe_case mc;
    int i;
    memset(&mc, 0, sizeof mc);
    mc.cfg = esft_moe_config_init(48, 32, 6, 24, 0);
    mc.cfg.route.gating = ESFT_GATING_SIGMOID;
    mc.cfg.route.renormalize = 1;
    mc.cfg.route.n_group = 4;
    mc.cfg.route.topk_group = 2;
    mc.cfg.route.group_score = ESFT_GROUP_SCORE_TOP2_SUM;
    mc.cfg.route.routed_scaling = 2.5f;
    for (i = 0; i < 32; i++) mc.bias[i] = rng_uniform(-0.05f, 0.05f);
    mc.use_bias = 1;
    mc.trainable[0] = mc.trainable[3] = mc.trainable[31] = 1;
    mc.T = 100;
    mc.label = "V3-like D48 E32 K6 G4/2 sigmoid bias";
    return mc;
}

/* Everything frozen (inference and dx only): no weight gradient at all. */
static moe_case moe_case_frozen(void)
{
    moe_case mc;
    memset(&mc, 0, sizeof mc);
    mc.cfg = esft_moe_config_init(32, 8, 2, 16, 16);
    mc.cfg.route.renormalize = 1;
    mc.cfg.aux_alpha = 0.001f;
    mc.T = 64;
    mc.label = "frozen D32 E8 K2 renorm batch-aux";
    return mc;
}

TEST(cuda_moe_fp32_matches_cpu)
{
    moe_case a, b, c;
    NEED_GPU();
    rng_seed(20);
    a = moe_case_v2();
    CHECK_MSG(compare_moe(&a, "fp32", MOE_FP32_NMSE, MOE_FP32_MAX, 1), "%s", cmp_msg);
    pool_release();
    b = moe_case_v3();
    CHECK_MSG(compare_moe(&b, "fp32", MOE_FP32_NMSE, MOE_FP32_MAX, 1), "%s", cmp_msg);
    pool_release();
    c = moe_case_frozen();
    CHECK_MSG(compare_moe(&c, "fp32", MOE_FP32_NMSE, MOE_FP32_MAX, 1), "%s", cmp_msg);
}

TEST(cuda_moe_bf16_within_tolerance)
{
    moe_case a, b;
    NEED_GPU();
    rng_seed(21);
    a = moe_case_v2();
    CHECK_MSG(compare_moe(&a, "bf16", MOE_BF16_NMSE, MOE_BF16_MAX, 0), "%s", cmp_msg);
    pool_release();
    b = moe_case_v3();
    CHECK_MSG(compare_moe(&b, "tf32", MOE_BF16_NMSE, MOE_BF16_MAX, 0), "%s", cmp_msg);
    unsetenv("ESFT_CUDA_MATH");
}

TEST(cuda_moe_rejects_bad_math_and_host_memory)
{
    moe_case a;
    NEED_GPU();
    rng_seed(22);
    a = moe_case_frozen();
    CHECK(!compare_moe(&a, "fp64", 1, 1, 0));
    CHECK_MSG(strstr(cmp_msg, "ESFT_CUDA_MATH=fp64") != NULL, "message: %s", cmp_msg);
    unsetenv("ESFT_CUDA_MATH");
    {
        esft_moe_config cfg = esft_moe_config_init(8, 4, 2, 4, 0);
        float w[4 * 4 * 8], r[4 * 8], x[16 * 8], y[16 * 8];
        esft_moe_weights wh;
        esft_moe layer;
        esft_error e;
        size_t bytes = 0;
        void *ws;
        memset(w, 0, sizeof w); memset(r, 0, sizeof r); memset(x, 0, sizeof x);
        memset(&wh, 0, sizeof wh);
        wh.router = r; wh.gate = w; wh.up = w; wh.down = w;
        CHECK_STATUS(esft_moe_init(&layer, &cfg, &wh, NULL, &e), ESFT_OK);
        CHECK_STATUS(esft_moe_workspace_size(&cfg, 16, &bytes, &e), ESFT_OK);
        ws = malloc(bytes);
        layer.backend = gpu();
        CHECK_STATUS(esft_moe_forward(&layer, y, NULL, x, ws, bytes, 16, &e), ESFT_ERR_INVALID_ARGUMENT);
        free(ws);
        esft_moe_uninit(&layer);
        CHECK_MSG(strstr(e.message, "host memory") != NULL, "message: %s", e.message);
    }
}

/* ---------------------------------------------------------------------- */
/* AdamW: bit-identical                                                    */
/* ---------------------------------------------------------------------- */

TEST(cuda_adamw_bit_identical_to_cpu)
{
    const size_t n = 100003; /* odd: no assumption of a multiple of anything */
    const esft_backend *cpu = esft_backend_cpu();
    esft_adamw_config cfg = esft_adamw_config_init();
    float *p = NULL, *g = NULL, *m = NULL, *v = NULL, *back = NULL;
    void *dp, *dg, *dm, *dv;
    float *host[4];
    void *dev4[4];
    esft_error e;
    long step;
    int k, diff = 0;
    size_t i;
    NEED_GPU();
    rng_seed(30);
    cfg.lr = 1e-2f;
    p = random_floats(n, -1.0f, 1.0f);
    g = random_floats(n, -1e-2f, 1e-2f);
    m = random_floats(n, -1e-3f, 1e-3f);
    v = random_floats(n, 0.0f, 1e-4f);
    g[7] = 0.0f; v[7] = 0.0f; /* the eps-only denominator */
    back = (float *)malloc(n * 4);
    dp = dev(p, n * 4); dg = dev(g, n * 4); dm = dev(m, n * 4); dv = dev(v, n * 4);
    CHECK(dp && dg && dm && dv && back);
    for (step = 1; step <= 3; step++) {
        CHECK_STATUS(cpu->adamw_step(cpu->context, &cfg, p, g, m, v, n, step, &e), ESFT_OK);
        CHECK_STATUS(gpu()->adamw_step(gpu()->context, &cfg, (float *)dp, (const float *)dg, (float *)dm, (float *)dv,
                                       n, step, &e), ESFT_OK);
    }
    host[0] = p; host[1] = m; host[2] = v; host[3] = NULL;
    dev4[0] = dp; dev4[1] = dm; dev4[2] = dv;
    for (k = 0; k < 3; k++) {
        CHECK(get(back, dev4[k], n * 4));
        for (i = 0; i < n; i++)
            if (memcmp(back + i, host[k] + i, 4) != 0 && diff++ < 5)
                printf("  %s[%lu]: cuda %.9g cpu %.9g\n", k == 0 ? "p" : k == 1 ? "m" : "v", (unsigned long)i,
                       back[i], host[k][i]);
    }
    printf("  adamw n %lu, 3 steps: %d of p, m, v differ in any bit\n", (unsigned long)n, diff);
    free(p); free(g); free(m); free(v); free(back);
    CHECK_EQ_INT(diff, 0);
    CHECK_STATUS(gpu()->adamw_step(gpu()->context, &cfg, (float *)dp, (const float *)dg, (float *)dm, (float *)dv, 0, 4,
                                   &e), ESFT_OK); /* n = 0 */
}

TEST(cuda_adapter_ops_absent_until_implemented)
{
    NEED_GPU();
    /* NULL, so esft.h answers ESFT_ERR_UNSUPPORTED; never a stub that says OK */
    CHECK(gpu()->adapter_forward == NULL && gpu()->adapter_backward == NULL);
}

HARNESS_MAIN()
