/* bench_pesc.c - the PESC adapter MoE layer (Camelidae), forward + backward on
   the CPU: esft_pesc_forward/_backward against a per-expert gather/scatter loop
   written the way the released Camelidae code runs under PyTorch autograd.

   Build (bench/run_all.sh does this for every bench/bench_*.c):
     cc -O3 -march=native -std=c99 -fopenmp -I. bench/bench_pesc.c -o build/bench/bench_pesc -lm
   Run:
     build/bench/bench_pesc [T [D [reps]]]      defaults: T 4096, D 4096, reps 3
   (n = 8 experts, k = 2, r = 512, s = 0.25: the released configs.)

   Methods, each timed forward and backward (median of reps):
     esft       esft_pesc_forward + esft_pesc_backward: one counting sort groups the
                T*K routing slots by expert; per expert one gather, down GEMM with
                GELU fused into the scaling pass (gate weight and s folded in), up
                GEMM, one scatter; backward gets dw from an R-long dot (dy W_up . g),
                keeps only the (T*K, R) pre-activations.
     loop       the released code's structure: for each expert, find its tokens by
                scanning the routing (torch.where), index_select, down GEMM, GELU
                in its own pass, up GEMM, scale in its own pass, weight and
                index_add; autograd keeps x, h, GELU(h) and the expert output per
                expert and the backward walks them in reverse (dw as a D-long dot
                of dy with the stored output).
   Both use esft.h's GEMM (esft__sgemm), so the ratio is the structure, not the
   GEMM. Before timing, y, dF, du and every weight gradient of the two are
   compared (max |diff| / max |ref| <= 1e-4); a mismatch exits 1.

   CFLAGS: -fopenmp
   LDLIBS: -lm
*/
#define _POSIX_C_SOURCE 200809L
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static float *falloc(size_t n)
{
    float *p = (float *)calloc(n ? n : 1, sizeof(float));
    if (!p) { fprintf(stderr, "out of memory (%lu floats)\n", (unsigned long)n); exit(2); }
    return p;
}

static uint64_t rng = 88172645463325252ull;
static void fill(float *x, size_t n, float lo, float hi)
{
    size_t i;
    for (i = 0; i < n; i++) {
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
        x[i] = lo + (hi - lo) * (float)(rng >> 40) * (1.0f / 16777216.0f);
    }
}

/* ---- the baseline: the released code's per-expert loop, autograd-style ---- */

typedef struct loop_saved {
    int *idx[64], *pos[64], n[64];       /* per expert: tokens, their slot j */
    float *x[64], *h[64], *g[64], *a[64]; /* per expert: what autograd keeps */
} loop_saved;

static float gelu(float h) { return 0.5f * h * (1.0f + erff(h * 0.70710678f)); }
static float gelu_grad(float h)
{
    return 0.5f * (1.0f + erff(h * 0.70710678f)) + h * 0.39894228f * expf(-0.5f * h * h);
}

static void loop_forward(const esft_pesc_config *c, float *y, const float *F, const esft_pesc_saved *route,
                         const float *params, loop_saved *s, int T)
{
    int D = c->d_model, E = c->n_experts, K = c->top_k, R = c->rank, e, t, j, i;
    memcpy(y, F, (size_t)T * D * sizeof(float));
    for (e = 0; e < E; e++) {
        const float *down = params + esft_pesc_tensor_offset(c, ESFT_PESC_DOWN, e);
        const float *up = params + esft_pesc_tensor_offset(c, ESFT_PESC_UP, e);
        int n = 0;
        for (t = 0; t < T; t++) /* idx, pos = torch.where(selected == e) */
            for (j = 0; j < K; j++)
                if (route->ids[t * K + j] == e) { s->idx[e][n] = t; s->pos[e][n] = j; n++; }
        s->n[e] = n;
        if (!n) continue;
        for (i = 0; i < n; i++) memcpy(s->x[e] + (size_t)i * D, F + (size_t)s->idx[e][i] * D, D * sizeof(float));
        esft__sgemm(0, 1, n, R, D, 1.0f, s->x[e], D, down, D, 0.0f, s->h[e], R);
        for (i = 0; i < n * R; i++) s->g[e][i] = gelu(s->h[e][i]);
        esft__sgemm(0, 1, n, D, R, 1.0f, s->g[e], R, up, R, 0.0f, s->a[e], D);
        for (i = 0; i < n * D; i++) s->a[e][i] *= c->scale;
        for (i = 0; i < n; i++) { /* index_add_(0, idx, w * a) */
            float w = route->weights[s->idx[e][i] * K + s->pos[e][i]];
            float *yt = y + (size_t)s->idx[e][i] * D;
            const float *a = s->a[e] + (size_t)i * D;
            int d;
            for (d = 0; d < D; d++) yt[d] += w * a[d];
        }
    }
}

/* dF, dparams (experts only) and dw (T, K); buffers: dA (T, D), dh (T, R). */
static void loop_backward(const esft_pesc_config *c, float *dF, float *dparams, float *dw, const float *dy,
                          const esft_pesc_saved *route, const float *params, const loop_saved *s, float *dA,
                          float *dh, int T)
{
    int D = c->d_model, E = c->n_experts, K = c->top_k, R = c->rank, e, i, d;
    for (i = 0; i < T * D; i++) dF[i] += dy[i];
    for (e = E - 1; e >= 0; e--) {
        const float *down = params + esft_pesc_tensor_offset(c, ESFT_PESC_DOWN, e);
        const float *up = params + esft_pesc_tensor_offset(c, ESFT_PESC_UP, e);
        int n = s->n[e];
        if (!n) continue;
        for (i = 0; i < n; i++) { /* backward of index_add and of w * a */
            int t = s->idx[e][i];
            float w = route->weights[t * K + s->pos[e][i]];
            const float *dyt = dy + (size_t)t * D, *a = s->a[e] + (size_t)i * D;
            float *da = dA + (size_t)i * D;
            double dot = 0.0;
            for (d = 0; d < D; d++) { dot += (double)dyt[d] * a[d]; da[d] = w * dyt[d] * c->scale; }
            dw[t * K + s->pos[e][i]] += (float)dot;
        }
        esft__sgemm(1, 0, D, R, n, 1.0f, dA, D, s->g[e], R, 1.0f,
                    dparams + esft_pesc_tensor_offset(c, ESFT_PESC_UP, e), R);
        esft__sgemm(0, 0, n, R, D, 1.0f, dA, D, up, R, 0.0f, dh, R);
        for (i = 0; i < n * R; i++) dh[i] *= gelu_grad(s->h[e][i]);
        esft__sgemm(1, 0, R, D, n, 1.0f, dh, R, s->x[e], D, 1.0f,
                    dparams + esft_pesc_tensor_offset(c, ESFT_PESC_DOWN, e), D);
        esft__sgemm(0, 0, n, D, R, 1.0f, dh, R, down, D, 0.0f, dA, D);
        for (i = 0; i < n; i++) { /* backward of index_select */
            float *dft = dF + (size_t)s->idx[e][i] * D;
            const float *dx = dA + (size_t)i * D;
            for (d = 0; d < D; d++) dft[d] += dx[d];
        }
    }
}

/* The router's backward, the same math as esft.h's (it is a few % of the work). */
static void loop_router_backward(const esft_pesc_config *c, float *du, float *dparams, const float *dw,
                                 const esft_pesc_saved *route, const float *u, const float *params,
                                 float *dlogits, int T)
{
    int E = c->n_experts, K = c->top_k, t, j, e;
    for (t = 0; t < T; t++) {
        const float *w = route->weights + t * K, *p = route->probs + (size_t)t * E;
        float *dl = dlogits + (size_t)t * E;
        double wdw = 0.0, pc = 0.0;
        float coef[64];
        for (e = 0; e < E; e++) coef[e] = c->aux_alpha * E * route->frac[e] / T;
        for (j = 0; j < K; j++) wdw += (double)w[j] * dw[t * K + j];
        for (e = 0; e < E; e++) pc += (double)p[e] * coef[e];
        for (e = 0; e < E; e++) dl[e] = p[e] * (coef[e] - (float)pc);
        for (j = 0; j < K; j++) dl[route->ids[t * K + j]] += w[j] * (dw[t * K + j] - (float)wdw);
    }
    esft__sgemm(1, 0, E, c->d_model, T, 1.0f, dlogits, E, u, c->d_model, 1.0f, dparams, c->d_model);
    esft__sgemm(0, 0, T, c->d_model, E, 1.0f, dlogits, E, params, c->d_model, 1.0f, du, c->d_model);
}

static double rel_diff(const float *a, const float *b, size_t n)
{
    double md = 0.0, mr = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > md) md = d;
        if (fabs((double)b[i]) > mr) mr = fabs((double)b[i]);
    }
    return mr > 0.0 ? md / mr : md;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int T = argc > 1 ? atoi(argv[1]) : 4096, D = argc > 2 ? atoi(argv[2]) : 4096;
    int reps = argc > 3 ? atoi(argv[3]) : 3, r, e;
    esft_pesc_config c;
    esft_pesc_saved saved;
    esft_error err;
    loop_saved ls;
    size_t np, nd;
    float *F, *u, *dy, *params, *y, *y2, *dF, *dF2, *du, *du2, *dp, *dp2, *dw, *dA, *dh, *dlogits, aux;
    double tf[2][32], tb[2][32], flops;
    if (T < 1 || D < 1 || reps < 1 || reps > 32) {
        fprintf(stderr, "usage: bench_pesc [T [D [reps <= 32]]]\n");
        return 2;
    }
    c = esft_pesc_config_camelidae(D);
    np = esft_pesc_param_count(&c);
    nd = (size_t)T * D;
    if (esft_pesc_saved_init(&saved, &c, T, NULL, &err) != ESFT_OK) {
        fprintf(stderr, "saved: %s\n", err.message);
        return 2;
    }
    F = falloc(nd); u = falloc(nd); dy = falloc(nd); params = falloc(np);
    y = falloc(nd); y2 = falloc(nd); dF = falloc(nd); dF2 = falloc(nd); du = falloc(nd); du2 = falloc(nd);
    dp = falloc(np); dp2 = falloc(np); dw = falloc((size_t)T * c.top_k);
    dA = falloc(nd); dh = falloc((size_t)T * c.rank); dlogits = falloc((size_t)T * c.n_experts);
    for (e = 0; e < c.n_experts; e++) {
        ls.idx[e] = (int *)calloc((size_t)T, sizeof(int));
        ls.pos[e] = (int *)calloc((size_t)T, sizeof(int));
        ls.x[e] = falloc(nd); ls.a[e] = falloc(nd);
        ls.h[e] = falloc((size_t)T * c.rank); ls.g[e] = falloc((size_t)T * c.rank);
    }
    fill(F, nd, -1, 1); fill(u, nd, -1, 1); fill(dy, nd, -1, 1);
    esft_pesc_init_weights(&c, params, 1, NULL);
    for (e = 0; e < c.n_experts; e++) /* trained-looking W_up (init has 0) */
        fill(params + esft_pesc_tensor_offset(&c, ESFT_PESC_UP, e), (size_t)D * c.rank, -0.05f, 0.05f);
    /* adapter GEMM FLOPs: 2 T K D R per GEMM; 2 forward (down, up), 4 backward */
    flops = 2.0 * T * c.top_k * (double)D * c.rank * 6.0;
    printf("PESC layer T %d, D %d, n %d, k %d, r %d, s %.2f, %d threads max, reps %d\n", T, D, c.n_experts,
           c.top_k, c.rank, (double)c.scale, esft_get_num_threads(), reps);

    for (r = 0; r < reps; r++) {
        double t0, t1, t2;
        memset(dF, 0, nd * sizeof(float)); memset(du, 0, nd * sizeof(float)); memset(dp, 0, np * sizeof(float));
        t0 = now();
        if (esft_pesc_forward(&c, y, &aux, F, u, params, &saved, T, &err) != ESFT_OK) {
            fprintf(stderr, "forward: %s\n", err.message);
            return 1;
        }
        t1 = now();
        if (esft_pesc_backward(&c, dF, du, dp, dy, 1.0f, &saved, F, u, params, T, &err) != ESFT_OK) {
            fprintf(stderr, "backward: %s\n", err.message);
            return 1;
        }
        t2 = now();
        tf[0][r] = t1 - t0; tb[0][r] = t2 - t1;

        /* the loop reuses esft's routing (the router is the same code either way) */
        memset(dF2, 0, nd * sizeof(float)); memset(du2, 0, nd * sizeof(float));
        memset(dp2, 0, np * sizeof(float)); memset(dw, 0, (size_t)T * c.top_k * sizeof(float));
        t0 = now();
        esft__sgemm(0, 1, T, c.n_experts, D, 1.0f, u, D, params, D, 0.0f, dlogits, c.n_experts);
        loop_forward(&c, y2, F, &saved, params, &ls, T);
        t1 = now();
        loop_backward(&c, dF2, dp2, dw, dy, &saved, params, &ls, dA, dh, T);
        loop_router_backward(&c, du2, dp2, dw, &saved, u, params, dlogits, T);
        t2 = now();
        tf[1][r] = t1 - t0; tb[1][r] = t2 - t1;
        if (r == 0) {
            double ey = rel_diff(y2, y, nd), eF = rel_diff(dF2, dF, nd), eu = rel_diff(du2, du, nd);
            double ep = rel_diff(dp2, dp, np);
            printf("validate: max|diff|/max|ref|  y %.2e  dF %.2e  du %.2e  dparams %.2e\n", ey, eF, eu, ep);
            if (!(ey <= 1e-4 && eF <= 1e-4 && eu <= 1e-4 && ep <= 1e-4)) {
                printf("FAIL: the loop and esft disagree\n");
                return 1;
            }
        }
    }
    qsort(tf[0], (size_t)reps, sizeof(double), cmp_double); qsort(tb[0], (size_t)reps, sizeof(double), cmp_double);
    qsort(tf[1], (size_t)reps, sizeof(double), cmp_double); qsort(tb[1], (size_t)reps, sizeof(double), cmp_double);
    {
        double ef = tf[0][reps / 2], eb = tb[0][reps / 2], lf = tf[1][reps / 2], lb = tb[1][reps / 2];
        printf("%-6s forward %8.3f s  backward %8.3f s  total %8.3f s  %6.1f GFLOP/s (adapter GEMMs)\n", "esft", ef,
               eb, ef + eb, flops / (ef + eb) * 1e-9);
        printf("%-6s forward %8.3f s  backward %8.3f s  total %8.3f s  %6.1f GFLOP/s\n", "loop", lf, lb, lf + lb,
               flops / (lf + lb) * 1e-9);
        printf("speedup esft vs loop: forward %.2fx  backward %.2fx  total %.2fx\n", lf / ef, lb / eb,
               (lf + lb) / (ef + eb));
        printf("activation memory kept for backward: esft %.1f MB (T K R pre-activations + routing), loop %.1f MB "
               "(x, h, GELU(h), output per expert)\n",
               ((double)T * c.top_k * c.rank + (double)T * (2 * c.top_k + 2 * c.n_experts)) * 4e-6,
               ((double)T * c.top_k * (2.0 * D + 2.0 * c.rank)) * 4e-6);
    }
    esft_pesc_saved_uninit(&saved);
    return 0;
}
