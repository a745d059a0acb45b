// LDLIBS: -lopenblas -lm
/* bench_moe.c - the MoE layer at DeepSeek-V2-Lite size: forward and
   forward+backward, ESFT (6 of 64 experts trainable) against full training,
   one thread and all cores, beside the same GEMMs through OpenBLAS.

   Build (bench/run_all.sh does this; needs libopenblas-dev):
     cc -O3 -march=native -std=c99 -fopenmp -I. bench/bench_moe.c -o build/bench/bench_moe -lopenblas -lm
   Run:
     build/bench/bench_moe [--reps N] [--tokens T]
   CFLAGS: -fopenmp

   Layer: D 2048, E 64, K 6, F 1408, FS 2816 (2 shared experts), T 512 tokens,
   softmax top-6 without renormalisation, aux loss alpha 0.001 per sequence of
   512. Weights uniform in +-0.02, x in +-1, so routing is close to uniform.
     esft  experts 0..5 trainable; router and shared block frozen (ESFT's
           defaults: shared_experts false, non_expert_modules false)
     full  all 64 experts, router and shared block trainable
   FLOPs are counted from the actual routing: forward 2*T*E*D (router) +
   6*F*D per routed row + 6*FS*D*T (shared); the backward adds the same for dx,
   and again for dW of each trainable tensor's rows.
   blas: the layer's own GEMM sequence (router, per-expert gate/up/down, shared)
   with cblas_sgemm instead of esft's kernel, plus the same elementwise work;
   its output is checked against the layer's before anything is timed.
   dense: one cblas_sgemm of (T, D) x (D, 6*FS) for the machine's dense rate.
   Each time is the minimum of --reps runs (default 3) after one warm-up run
   (the minimum, not the median: on a shared machine other processes only add);
   gradients are zeroed once, outside the clock (the backward accumulates).
   Exit 1 if validation fails.

   Bars on a 2-core machine (issue 4): PyTorch eager 1541 ms forward (46 GFLOP/s),
   4469 ms fwd+bwd all trainable, 3450 ms fwd+bwd 6/64; dense BLAS 198 GFLOP/s;
   goal ESFT fwd+bwd <= 0.72 x full. */
#define _POSIX_C_SOURCE 200809L
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint32_t rng = 2463534242u;
static float rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return (float)((rng >> 8) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

static float *make(size_t n, float scale)
{
    float *a = (float *)malloc(n * sizeof(float));
    size_t i;
    if (!a) { fprintf(stderr, "out of memory (%lu floats)\n", (unsigned long)n); exit(1); }
    for (i = 0; i < n; i++) a[i] = scale * rnd();
    return a;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The layer's GEMMs through cblas_sgemm, with the same elementwise work. */
typedef struct blas_ctx {
    const esft_moe_config *c;
    const esft_moe_weights *w;
    const float *x;
    float *y, *logits, *probs, *wts, *xg, *g, *u, *o, *gs, *us;
    int32_t *ids, *rows, *count;
    int T;
} blas_ctx;

static void gemm_nt(int M, int N, int K, const float *A, const float *B, float beta, float *C)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, A, K, B, K, beta, C, N);
}

static void swiglu(float *g, const float *u, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void blas_forward(blas_ctx *b)
{
    const esft_moe_config *c = b->c;
    int D = c->d_model, E = c->route.n_experts, K = c->route.top_k, F = c->d_expert, FS = c->d_shared;
    int T = b->T, t, j, e, d, r = 0;
    size_t fd = (size_t)F * D;
    gemm_nt(T, E, D, b->x, b->w->router, 0.0f, b->logits);
    esft_route(&c->route, b->ids, b->wts, b->probs, b->logits, T, NULL);
    for (e = 0; e < E; e++) { /* group rows by expert (slot order within one) */
        int start = r;
        for (t = 0; t < T; t++)
            for (j = 0; j < K; j++)
                if (b->ids[t * K + j] == e) {
                    b->rows[r] = t * K + j;
                    memcpy(b->xg + (size_t)r * D, b->x + (size_t)t * D, (size_t)D * 4);
                    r++;
                }
        b->count[e] = r - start;
    }
    for (e = 0, r = 0; e < E; r += b->count[e], e++) {
        int n = b->count[e];
        if (!n) continue;
        gemm_nt(n, F, D, b->xg + (size_t)r * D, b->w->gate + e * fd, 0.0f, b->g + (size_t)r * F);
        gemm_nt(n, F, D, b->xg + (size_t)r * D, b->w->up + e * fd, 0.0f, b->u + (size_t)r * F);
        swiglu(b->g + (size_t)r * F, b->u + (size_t)r * F, (size_t)n * F);
        gemm_nt(n, D, F, b->g + (size_t)r * F, b->w->down + e * fd, 0.0f, b->o + (size_t)r * D);
    }
    gemm_nt(T, FS, D, b->x, b->w->shared_gate, 0.0f, b->gs);
    gemm_nt(T, FS, D, b->x, b->w->shared_up, 0.0f, b->us);
    swiglu(b->gs, b->us, (size_t)T * FS);
    gemm_nt(T, D, FS, b->gs, b->w->shared_down, 0.0f, b->y);
    for (r = 0; r < T * K; r++) {
        int slot = b->rows[r];
        float wt = b->wts[slot], *yt = b->y + (size_t)(slot / K) * D;
        const float *o = b->o + (size_t)r * D;
        for (d = 0; d < D; d++) yt[d] += wt * o[d];
    }
}

typedef struct layer_run {
    esft_moe layer;
    float *y, *dx, *dy;
    const float *x;
    void *ws;
    size_t ws_bytes;
    int T;
} layer_run;

static double time_median(int reps, int backward, layer_run *L)
{
    double *t = (double *)malloc(sizeof(double) * reps), med;
    int i;
    esft_moe_zero_grad(&L->layer); /* outside the clock: backward accumulates */
    for (i = -1; i < reps; i++) { /* run -1 warms up (first touch of gradient pages) */
        double t0 = now();
        float aux;
        if (esft_moe_forward(&L->layer, L->y, &aux, L->x, L->ws, L->ws_bytes, L->T, NULL) != ESFT_OK) exit(1);
        if (backward) {
            if (esft_moe_backward(&L->layer, L->dx, L->dy, L->x, L->ws, L->ws_bytes, L->T, NULL) != ESFT_OK) exit(1);
        }
        if (i >= 0) t[i] = now() - t0;
    }
    qsort(t, reps, sizeof(double), cmp_double);
    med = t[0];
    free(t);
    return med;
}

static double time_blas(int reps, blas_ctx *b)
{
    double *t = (double *)malloc(sizeof(double) * reps), med;
    int i;
    for (i = 0; i < reps; i++) {
        double t0 = now();
        blas_forward(b);
        t[i] = now() - t0;
    }
    qsort(t, reps, sizeof(double), cmp_double);
    med = t[0];
    free(t);
    return med;
}

static double time_dense(int reps, int M, int N, int K, const float *A, const float *B, float *C)
{
    double best = 1e30;
    int i;
    for (i = 0; i < reps; i++) {
        double t0 = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, A, K, B, K, 0.0f, C, N);
        t0 = now() - t0;
        if (t0 < best) best = t0;
    }
    return best;
}

int main(int argc, char **argv)
{
    int reps = 3, T = 512, i, e, threads_all = (int)sysconf(_SC_NPROCESSORS_ONLN), pass;
    esft_moe_config cfg = esft_moe_config_deepseek_v2_lite();
    esft_moe_weights w;
    unsigned char esft_mask[64], full_mask[64];
    layer_run esft_run, full_run;
    blas_ctx b;
    int D, E, K, F, FS;
    size_t efd, ws_bytes;
    double flop_fwd, flop_bwd_dx, flop_dw_esft = 0, flop_dw_full, max_err = 0, max_ref = 0;
    float *x, *dense_b, *dense_c;
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) T = atoi(argv[++i]);
        else { fprintf(stderr, "usage: %s [--reps N] [--tokens T]\n", argv[0]); return 2; }
    }
    if (reps < 1) reps = 1;
    D = cfg.d_model; E = cfg.route.n_experts; K = cfg.route.top_k; F = cfg.d_expert; FS = cfg.d_shared;
    cfg.aux_seq_len = T;
    efd = (size_t)E * F * D;
    printf("MoE layer D %d, E %d, K %d, F %d, FS %d, T %d; %d cores; best of %d\n", D, E, K, F, FS, T,
           threads_all, reps);
    /* which OpenBLAS kernel ran: OPENBLAS_CORETYPE can pin an older one (bench/run_all.sh unsets it) */
    printf("OpenBLAS: core %s; %s\n", openblas_get_corename(), openblas_get_config());
    w.router = make((size_t)E * D, 0.02f);
    w.gate = make(efd, 0.02f); w.up = make(efd, 0.02f); w.down = make(efd, 0.02f);
    w.shared_gate = make((size_t)FS * D, 0.02f); w.shared_up = make((size_t)FS * D, 0.02f);
    w.shared_down = make((size_t)FS * D, 0.02f);
    x = make((size_t)T * D, 1.0f);
    for (e = 0; e < E; e++) { esft_mask[e] = e < 6; full_mask[e] = 1; }

    cfg.trainable_experts = esft_mask;
    if (esft_moe_workspace_size(&cfg, T, &ws_bytes, NULL) != ESFT_OK) return 1;
    memset(&esft_run, 0, sizeof esft_run);
    esft_run.x = x; esft_run.T = T; esft_run.ws_bytes = ws_bytes;
    esft_run.ws = malloc(ws_bytes);
    esft_run.y = make((size_t)T * D, 0.0f); esft_run.dx = make((size_t)T * D, 0.0f);
    esft_run.dy = make((size_t)T * D, 0.01f);
    if (esft_moe_init(&esft_run.layer, &cfg, &w, NULL, NULL) != ESFT_OK) return 1;
    full_run = esft_run;
    cfg.trainable_experts = full_mask;
    cfg.train_router = cfg.train_shared = 1;
    if (esft_moe_init(&full_run.layer, &cfg, &w, NULL, NULL) != ESFT_OK) return 1;
    printf("trainable floats: esft %lu (%.1f MB grads + %.1f MB Adam), full %lu (%.1f + %.1f MB)\n",
           (unsigned long)esft_run.layer.n_params, esft_run.layer.n_params * 4e-6, esft_run.layer.n_params * 8e-6,
           (unsigned long)full_run.layer.n_params, full_run.layer.n_params * 4e-6, full_run.layer.n_params * 8e-6);

    /* validate: the layer's y against the BLAS re-implementation */
    memset(&b, 0, sizeof b);
    b.c = &cfg; b.w = &w; b.x = x; b.T = T;
    b.y = make((size_t)T * D, 0); b.logits = make((size_t)T * E, 0); b.probs = make((size_t)T * E, 0);
    b.wts = make((size_t)T * K, 0); b.xg = make((size_t)T * K * D, 0); b.g = make((size_t)T * K * F, 0);
    b.u = make((size_t)T * K * F, 0); b.o = make((size_t)T * K * D, 0); b.gs = make((size_t)T * FS, 0);
    b.us = make((size_t)T * FS, 0);
    b.ids = (int32_t *)malloc((size_t)T * K * 4); b.rows = (int32_t *)malloc((size_t)T * K * 4);
    b.count = (int32_t *)malloc((size_t)E * 4);
    blas_forward(&b);
    time_median(1, 0, &esft_run);
    for (i = 0; i < T * D; i++) {
        double d = fabs((double)esft_run.y[i] - b.y[i]);
        if (d > max_err) max_err = d;
        if (fabs(b.y[i]) > max_ref) max_ref = fabs(b.y[i]);
    }
    printf("validation: max |y_esft - y_blas| = %.3g (max |y| %.3g)\n", max_err, max_ref);
    if (!(max_err <= 1e-4 * max_ref + 1e-6)) { printf("FAIL validation\n"); return 1; }

    /* FLOPs from the actual routing */
    flop_fwd = 2.0 * T * E * D + 6.0 * F * D * T * K + 6.0 * FS * D * T;
    flop_bwd_dx = flop_fwd; /* dx through router, experts, shared: the same GEMM sizes */
    for (e = 0; e < 6; e++) flop_dw_esft += 6.0 * F * D * b.count[e];
    flop_dw_full = 6.0 * F * D * T * K + 6.0 * FS * D * T + 2.0 * T * E * D;
    printf("GFLOP: forward %.1f, fwd+bwd esft %.1f, fwd+bwd full %.1f (rows of experts 0-5: %d of %d)\n",
           flop_fwd * 1e-9, (flop_fwd + flop_bwd_dx + flop_dw_esft) * 1e-9,
           (flop_fwd + flop_bwd_dx + flop_dw_full) * 1e-9,
           b.count[0] + b.count[1] + b.count[2] + b.count[3] + b.count[4] + b.count[5], T * K);

    dense_b = make((size_t)6 * FS * D, 0.02f);
    dense_c = make((size_t)T * 6 * FS, 0.0f);
    for (pass = 0; pass < 2; pass++) {
        int nt = pass == 0 ? 1 : threads_all;
        double t_ef, t_eb, t_fb, t_blas, t_dense;
        esft_set_num_threads(nt);
        openblas_set_num_threads(nt);
        t_ef = time_median(reps, 0, &esft_run);
        t_eb = time_median(reps, 1, &esft_run);
        t_fb = time_median(reps, 1, &full_run);
        t_blas = time_blas(reps, &b);
        t_dense = time_dense(reps, T, 6 * FS, D, x, dense_b, dense_c);
        printf("\n%d thread%s (esft_get_num_threads %d)\n", nt, nt > 1 ? "s" : "", esft_get_num_threads());
        printf("  %-28s %9.1f ms  %6.1f GFLOP/s\n", "forward (esft kernels)", t_ef * 1e3, flop_fwd / t_ef * 1e-9);
        printf("  %-28s %9.1f ms  %6.1f GFLOP/s\n", "fwd+bwd ESFT 6/64", t_eb * 1e3,
               (flop_fwd + flop_bwd_dx + flop_dw_esft) / t_eb * 1e-9);
        printf("  %-28s %9.1f ms  %6.1f GFLOP/s\n", "fwd+bwd full", t_fb * 1e3,
               (flop_fwd + flop_bwd_dx + flop_dw_full) / t_fb * 1e-9);
        printf("  %-28s %9.3f   (goal <= 0.72; FLOP ratio %.3f)\n", "ratio ESFT / full fwd+bwd", t_eb / t_fb,
               (flop_fwd + flop_bwd_dx + flop_dw_esft) / (flop_fwd + flop_bwd_dx + flop_dw_full));
        printf("  %-28s %9.1f ms  %6.1f GFLOP/s\n", "forward, same GEMMs OpenBLAS", t_blas * 1e3,
               flop_fwd / t_blas * 1e-9);
        printf("  %-28s %9.1f ms  %6.1f GFLOP/s\n", "dense OpenBLAS (T,D)x(D,6FS)", t_dense * 1e3,
               2.0 * T * 6 * FS * D / t_dense * 1e-9);
        printf("  %-28s %9.2f   (goal >= 0.50)\n", "esft forward / dense rate",
               (flop_fwd / t_ef) / (2.0 * T * 6 * FS * D / t_dense));
    }
    printf("\nbars (issue 4, 2 cores): PyTorch 1541 ms fwd, 4469 ms fwd+bwd full, 3450 ms fwd+bwd 6/64; dense 198 GFLOP/s\n");
    esft_moe_uninit(&esft_run.layer);
    esft_moe_uninit(&full_run.layer);
    return 0;
}
