/* bench_cuda.cu - the CUDA backend at DeepSeek-V2-Lite size, through the public API,
   beside cuBLAS baselines measured in the same run.

   Build:  make bench-cuda   (nvcc -O2 -I. bench/bench_cuda.cu esft_cuda.cu -lcublas)
   Run:    build/bench/bench_cuda [--quick] [--reps N]
           --quick: T 4096 only, AdamW over 1/8 of the parameters, 1 rep (gpu-check)
   Exit:   0 done; 1 a run failed (the message says which); 2 no CUDA device (nothing
           measured, the reason printed).

   What is timed (each the minimum of --reps runs, default 3, after one warm-up):
     MoE layer, D 2048, E 64, K 6, F 1408, FS 2816 (V2-Lite), T 4096 and 16384,
     softmax top-6, aux loss per sequence of 4096, ESFT_CUDA_MATH as set (bf16 by
     default), weights uniform +-0.02, x uniform +-1:
       forward       everything frozen (inference)
       FFT fwd+bwd   all 64 experts, router and shared block trainable
       ESFT fwd+bwd  8 of 64 experts trainable, router and shared frozen
     each with ESFT_CUDA_EXPERTS as set (auto by default), then forward and FFT again
     with the expert GEMMs grouped (cublasGemmGroupedBatchedEx), on side streams, and
     in the per-expert loop, side by side; the issue's bars (H100: forward 1.6 ms at
     T 4096, FFT 4.4 ms at 4096 and 14.6 ms at 16384) are printed with each verdict;
     beside, in the same run:
       dense         one cuBLAS GEMM (T, D) x (D, N) with N chosen for the forward's FLOPs,
                     same compute type: the machine's rate for this math
       per-expert    the forward's GEMMs as the layer issues them (router, gate/up/down per
                     non-empty expert with the real routing, shared block), cuBLAS only,
                     no elementwise kernels: what the layer's GEMMs alone cost
     FLOPs come from the real routing (the forward's expert offsets, read through
     esft_moe_workspace_view_at): forward 2TED + 6FD per routed row + 6 FS D T; the
     backward adds the same for dx and, per trainable tensor, again for its dW rows.
     AdamW over 1.07 B fp32 parameters (esft_adamw_set_backend), against a device copy
     of the same bytes (28 per parameter: cudaMemcpy of 14 n bytes reads and writes 14 n),
     as GB/s and % of the copy's: the float4 update kernel alone (the checked step
     minus a refused step, whose NaN in the last gradient makes the check read all of
     g and the update return at once), the whole checked step (reads the gradients
     twice, NaN check then update: 32 bytes moved, 28 counted), the check alone;
     global-norm clipping over the same gradients (esft_clip_grad_norm_with): the
     sum of squares alone (4 B/param) and with the scale (12 B/param).
     Router statistics over 1 M tokens x 6 (E 64, with weights), esft_stats_add on the
     GPU against esft_stats_add on the CPU with the same data.
     PESC layer, D 4096, 8 adapters, top-2, R 512, T 4096, aux on (Camelidae's
     shape): esft_pesc_forward_with and _backward_with on the CUDA backend, the
     forward alone and forward + backward, against the issue's bar (fwd+bwd
     <= 1.1 ms on an H100; PyTorch grouped 2.19 ms), with ESFT_CUDA_EXPERTS as
     set, then grouped, streams and loop side by side; beside, the forward's
     GEMMs through cuBLAS (router + per adapter down and up over 1024 rows).
   Ops are synchronous (each ends with a stream synchronisation), so host wall-clock
   time around a call is the op's time. Operands are hundreds of MB, far beyond L2,
   so no L2 flush is needed between runs. */
#define _POSIX_C_SOURCE 200809L
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const esft_backend *g; /* the CUDA backend */
static int reps = 3;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char *what, const char *msg)
{
    fprintf(stderr, "bench_cuda: %s: %s\n", what, msg);
    exit(1);
}

static void need(esft_status s, const char *what, const esft_error *e)
{
    if (s != ESFT_OK) die(what, e ? e->message : esft_status_string(s));
}

static void need_cuda(cudaError_t c, const char *what)
{
    if (c != cudaSuccess) die(what, cudaGetErrorString(c));
}

static void need_blas(cublasStatus_t st, const char *what)
{
    if (st != CUBLAS_STATUS_SUCCESS) die(what, cublasGetStatusString(st));
}

/* Device memory, uniform in [-a, a) from a hash of the index (no host copy). */
__global__ static void fill_kernel(float *p, size_t n, float a, unsigned seed)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned long long h = (i + 1) * 0x9E3779B97F4A7C15ULL ^ ((unsigned long long)seed << 32);
        h ^= h >> 31; h *= 0xBF58476D1CE4E5B9ULL; h ^= h >> 29;
        p[i] = a * (2.0f * (float)(h >> 40) / 16777216.0f - 1.0f);
    }
}

static float *dev_fill(size_t n, float a, unsigned seed)
{
    void *p = NULL;
    need_cuda(cudaMalloc(&p, n ? n * sizeof(float) : 4), "cudaMalloc");
    fill_kernel<<<4096, 256>>>((float *)p, n, a, seed);
    need_cuda(cudaDeviceSynchronize(), "fill");
    return (float *)p;
}

/* Host copy of n uniform floats (the trainable tensors esft_moe_init copies). */
static float *host_fill(size_t n, float a, unsigned seed)
{
    float *d = dev_fill(n, a, seed), *h = (float *)malloc(n * sizeof(float));
    if (!h) die("malloc", "out of host memory");
    need_cuda(cudaMemcpy(h, d, n * sizeof(float), cudaMemcpyDeviceToHost), "download");
    cudaFree(d);
    return h;
}

/* ---------------------------------------------------------------------- */
/* the MoE layer                                                            */
/* ---------------------------------------------------------------------- */

enum { D = 2048, E = 64, K = 6, F = 1408, FS = 2816 };

typedef struct weights {
    esft_moe_weights host, dev;
} weights;

/* The same values on both sides (host_fill downloads what dev_fill made). */
static void weights_make(weights *w)
{
    const float **host[7] = {&w->host.router, &w->host.gate, &w->host.up, &w->host.down,
                             &w->host.shared_gate, &w->host.shared_up, &w->host.shared_down};
    const float **dev[7] = {&w->dev.router, &w->dev.gate, &w->dev.up, &w->dev.down,
                            &w->dev.shared_gate, &w->dev.shared_up, &w->dev.shared_down};
    size_t ne = (size_t)E * F * D, ns = (size_t)FS * D, n[7] = {(size_t)E * D, ne, ne, ne, ns, ns, ns};
    int i;
    memset(w, 0, sizeof *w);
    for (i = 0; i < 7; i++) {
        *host[i] = host_fill(n[i], 0.02f, (unsigned)i + 1);
        *dev[i] = dev_fill(n[i], 0.02f, (unsigned)i + 1);
    }
}

/* A layer on the GPU: made from the host weights, moved with esft_moe_set_backend. */
static void layer_make(esft_moe *m, const weights *w, int T, int n_trainable, int train_rest)
{
    esft_moe_config c = esft_moe_config_deepseek_v2_lite();
    unsigned char tr[E];
    esft_error e;
    int i;
    for (i = 0; i < E; i++) tr[i] = i < n_trainable;
    c.aux_seq_len = T < 4096 ? T : 4096;
    c.trainable_experts = tr;
    c.train_router = c.train_shared = train_rest;
    need(esft_moe_init(m, &c, &w->host, NULL, &e), "esft_moe_init", &e);
    need(esft_moe_set_backend(m, g, &w->dev, &e), "esft_moe_set_backend", &e);
}

typedef struct run {
    int T;
    float *x, *y, *dx, *dy;
    void *ws;
    size_t ws_bytes;
    int32_t offsets[E + 1];
} run;

static void run_make(run *r, int T)
{
    esft_moe_config c = esft_moe_config_deepseek_v2_lite();
    esft_error e;
    size_t td = (size_t)T * D;
    c.aux_seq_len = 4096;
    r->T = T;
    need(esft_moe_workspace_size(&c, T, &r->ws_bytes, &e), "workspace size", &e);
    need(g->alloc(g->context, r->ws_bytes, &r->ws), "workspace alloc", NULL);
    r->x = dev_fill(td, 1.0f, 11);
    r->dy = dev_fill(td, 1.0f, 12);
    r->y = dev_fill(td, 0.0f, 0);
    r->dx = dev_fill(td, 0.0f, 0);
}

static void run_free(run *r)
{
    g->free(g->context, r->ws);
    cudaFree(r->x); cudaFree(r->y); cudaFree(r->dx); cudaFree(r->dy);
}

/* The routing of the last forward: expert offsets from the workspace. */
static void read_offsets(const esft_moe *m, run *r)
{
    esft_moe_workspace_view v;
    esft_error e;
    need(esft_moe_workspace_view_at(&m->cfg, r->T, r->ws, &v, &e), "workspace view", &e);
    need_cuda(cudaMemcpy(r->offsets, v.offsets, sizeof r->offsets, cudaMemcpyDeviceToHost), "read offsets");
}

static double fwd_flops(const run *r)
{
    double T = r->T, rows = r->offsets[E];
    return 2.0 * T * E * D + 6.0 * F * D * rows + 6.0 * FS * D * T;
}

/* Backward FLOPs: dx through everything, dW for the trainable tensors. */
static double bwd_flops(const esft_moe *m, const run *r)
{
    double T = r->T, f = 2.0 * T * E * D + 6.0 * F * D * r->offsets[E] + 6.0 * FS * D * T;
    int e;
    for (e = 0; e < E; e++)
        if (m->slot[e] >= 0) f += 6.0 * F * D * (r->offsets[e + 1] - r->offsets[e]);
    if (m->d_router) f += 2.0 * T * E * D;
    if (m->d_shared_gate) f += 6.0 * FS * D * T;
    return f;
}

/* Min time of reps runs after a warm-up; backward = 1 times forward + backward. */
static double time_layer(esft_moe *m, run *r, int backward)
{
    esft_error e;
    float aux;
    double best = 1e30;
    int i;
    for (i = 0; i <= reps; i++) {
        double t0 = now();
        need(esft_moe_forward(m, r->y, &aux, r->x, r->ws, r->ws_bytes, r->T, &e), "esft_moe_forward", &e);
        if (backward)
            need(esft_moe_backward(m, r->dx, r->dy, r->x, r->ws, r->ws_bytes, r->T, &e), "esft_moe_backward", &e);
        if (i > 0 && now() - t0 < best) best = now() - t0;
    }
    return best;
}

static cublasHandle_t blas;
static cublasComputeType_t math_type = CUBLAS_COMPUTE_32F_FAST_16BF;

/* Row-major C (M, N) = A (M, K) op(B), as esft_cuda.cu's GEMMs; tb: B is (N, K). */
static void gemm(int tb, int M, int N, int Kd, const float *A, const float *B, float *C)
{
    const float one = 1.0f, zero = 0.0f;
    if (M == 0 || N == 0) return;
    need_blas(cublasGemmEx(blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, N, M, Kd, &one, B, CUDA_R_32F,
                           tb ? Kd : N, A, CUDA_R_32F, Kd, &zero, C, CUDA_R_32F, N, math_type, CUBLAS_GEMM_DEFAULT),
              "cublasGemmEx");
}

/* The forward's GEMMs as the layer issues them, cuBLAS only: router (fp32),
   per expert gate, up (xg rows) and down, the shared block. Buffers are the
   workspace's (the layer's own data, so the shapes are real). */
static double time_expert_loop(const esft_moe *m, run *r)
{
    esft_moe_workspace_view v;
    esft_error e;
    double best = 1e30;
    int i, ex;
    need(esft_moe_workspace_view_at(&m->cfg, r->T, r->ws, &v, &e), "workspace view", &e);
    for (i = 0; i <= reps; i++) {
        double t0;
        need_cuda(cudaDeviceSynchronize(), "sync");
        t0 = now();
        {
            cublasComputeType_t keep = math_type;
            math_type = CUBLAS_COMPUTE_32F;
            gemm(1, r->T, E, D, r->x, m->frozen.router, v.logits);
            math_type = keep;
        }
        for (ex = 0; ex < E; ex++) {
            int n = r->offsets[ex + 1] - r->offsets[ex];
            size_t o = (size_t)r->offsets[ex], fd = (size_t)F * D;
            gemm(1, n, F, D, v.xg + o * D, m->frozen.gate + ex * fd, v.g + o * F);
            gemm(1, n, F, D, v.xg + o * D, m->frozen.up + ex * fd, v.u + o * F);
            gemm(1, n, D, F, v.g + o * F, m->frozen.down + ex * fd, v.o + o * D);
        }
        gemm(1, r->T, FS, D, r->x, m->frozen.shared_gate, v.gs);
        gemm(1, r->T, FS, D, r->x, m->frozen.shared_up, v.us);
        gemm(1, r->T, D, FS, v.gs, m->frozen.shared_down, r->y);
        need_cuda(cudaDeviceSynchronize(), "sync");
        if (i > 0 && now() - t0 < best) best = now() - t0;
    }
    return best;
}

/* One dense GEMM (T, D) x (D, N) of about `flops`, in the workspace. */
static double time_dense(run *r, double flops)
{
    esft_moe_workspace_view v;
    esft_error e;
    esft_moe_config c = esft_moe_config_deepseek_v2_lite();
    int N = (int)(flops / (2.0 * r->T * D)), i;
    double best = 1e30;
    float *B;
    c.aux_seq_len = 4096;
    N = (N + 63) / 64 * 64;
    need(esft_moe_workspace_view_at(&c, r->T, r->ws, &v, &e), "workspace view", &e);
    B = dev_fill((size_t)N * D, 0.02f, 21);
    if ((size_t)N > (size_t)K * (3 * D + 4 * F)) die("dense", "output does not fit the workspace");
    for (i = 0; i <= reps; i++) {
        double t0;
        need_cuda(cudaDeviceSynchronize(), "sync");
        t0 = now();
        gemm(1, r->T, N, D, r->x, B, v.xg); /* xg .. d are contiguous: T K (3D + 4F) floats */
        need_cuda(cudaDeviceSynchronize(), "sync");
        if (i > 0 && now() - t0 < best) best = now() - t0;
    }
    cudaFree(B);
    return best;
}

static void row(const char *what, int T, double sec, double flops, double bar_sec)
{
    printf("  %-28s T %-6d %9.2f ms  %7.1f TFLOP/s", what, T, sec * 1e3, flops / sec * 1e-12);
    if (bar_sec > 0) printf("  %5.2fx the bar", sec / bar_sec);
    printf("\n");
}

/* ESFT_CUDA_EXPERTS as it was before a side-by-side run (NULL: unset), and
   put back after it. */
static char *experts_mode_save(void)
{
    const char *before = getenv("ESFT_CUDA_EXPERTS");
    return before ? strdup(before) : NULL;
}

static void experts_mode_restore(char *saved)
{
    if (saved) setenv("ESFT_CUDA_EXPERTS", saved, 1);
    else unsetenv("ESFT_CUDA_EXPERTS");
    free(saved);
}

/* The expert GEMMs run each way ESFT_CUDA_EXPERTS offers, side by side (the
   rows above ran the default, auto). A way the backend refuses (cuBLAS's
   grouped call for this math) is printed with its reason. */
static void compare_modes(esft_moe *inf, esft_moe *fft, run *r, double ff, double fb_fft)
{
    static const char *modes[3] = {"grouped", "streams", "loop"};
    char *saved = experts_mode_save();
    int i;
    for (i = 0; i < 3; i++) {
        esft_error e;
        float aux;
        char label[64];
        setenv("ESFT_CUDA_EXPERTS", modes[i], 1);
        if (esft_moe_forward(inf, r->y, &aux, r->x, r->ws, r->ws_bytes, r->T, &e) != ESFT_OK) {
            printf("  ESFT_CUDA_EXPERTS=%-8s refused: %s\n", modes[i], e.message);
            continue;
        }
        snprintf(label, sizeof label, "forward, %s", modes[i]);
        row(label, r->T, time_layer(inf, r, 0), ff, 0);
        snprintf(label, sizeof label, "FFT fwd+bwd, %s", modes[i]);
        row(label, r->T, time_layer(fft, r, 1), fb_fft, 0);
    }
    experts_mode_restore(saved);
}

static void bench_moe(int quick)
{
    static const int Ts[2] = {4096, 16384};
    static const double bar_fwd_ms[2] = {1.6, 0} /* none set for 16384 */, bar_fft_ms[2] = {4.4, 14.6};
    weights w;
    esft_moe inf, fft, esft;
    int k;
    printf("MoE layer, DeepSeek-V2-Lite (D %d, E %d, K %d, F %d, FS %d), ESFT_CUDA_MATH=%s\n", D, E, K, F, FS,
           getenv("ESFT_CUDA_MATH") ? getenv("ESFT_CUDA_MATH") : "bf16");
    weights_make(&w);
    for (k = 0; k < (quick ? 1 : 2); k++) {
        run r;
        double t_f, t_d, t_l, t_fft, t_esft, ff, fb_fft, fb_esft;
        run_make(&r, Ts[k]);
        layer_make(&inf, &w, Ts[k], 0, 0);
        layer_make(&fft, &w, Ts[k], E, 1);
        layer_make(&esft, &w, Ts[k], 8, 0);
        t_f = time_layer(&inf, &r, 0);
        read_offsets(&inf, &r);
        ff = fwd_flops(&r);
        t_d = time_dense(&r, ff);
        t_l = time_expert_loop(&inf, &r);
        t_fft = time_layer(&fft, &r, 1);
        fb_fft = ff + bwd_flops(&fft, &r);
        t_esft = time_layer(&esft, &r, 1);
        fb_esft = ff + bwd_flops(&esft, &r);
        row("dense cuBLAS (bar)", Ts[k], t_d, ff, 0);
        row("per-expert cuBLAS loop", Ts[k], t_l, ff, t_d);
        row("forward", Ts[k], t_f, ff, t_d);
        row("FFT fwd+bwd (64/64)", Ts[k], t_fft, fb_fft, t_d * fb_fft / ff);
        row("ESFT fwd+bwd (8/64)", Ts[k], t_esft, fb_esft, t_d * fb_esft / ff);
        printf("  ratios T %d: forward / per-expert loop %.2f, ESFT / FFT fwd+bwd %.2f (bar 0.75)\n", Ts[k],
               t_f / t_l, t_esft / t_fft);
        if (bar_fwd_ms[k] > 0)
            printf("  issue bar (H100): forward <= %.1f ms: %s\n", bar_fwd_ms[k],
                   t_f * 1e3 <= bar_fwd_ms[k] ? "met" : "NOT met");
        printf("  issue bar (H100): FFT fwd+bwd <= %.1f ms: %s\n", bar_fft_ms[k],
               t_fft * 1e3 <= bar_fft_ms[k] ? "met" : "NOT met");
        compare_modes(&inf, &fft, &r, ff, fb_fft);
        esft_moe_uninit(&inf);
        esft_moe_uninit(&fft);
        esft_moe_uninit(&esft);
        run_free(&r);
    }
}

/* ---------------------------------------------------------------------- */
/* AdamW, statistics, PESC                                                  */
/* ---------------------------------------------------------------------- */

/* Minimum over reps (after one warm-up) of one esft_adamw_step; want: the status expected. */
static double time_adamw(esft_adamw *opt, float *p, float *gr, esft_status want)
{
    esft_error e;
    double best = 1e30;
    int i;
    for (i = 0; i <= reps; i++) {
        double t0 = now(), t;
        esft_status s = esft_adamw_step(opt, p, gr, &e);
        t = now() - t0;
        if (s != want) die("esft_adamw_step", e.message);
        if (i > 0 && t < best) best = t;
    }
    return best;
}

/* Minimum over reps of esft_clip_grad_norm_with over one block. max_norm 0: it
   only measures. Otherwise it scales, and each rep first restores gr from
   `fresh` (untimed): a clipped block would be under the limit the next time. */
static double time_clip(float *gr, const float *fresh, size_t n, float max_norm)
{
    esft_error e;
    double best = 1e30, norm;
    int i;
    for (i = 0; i <= reps; i++) {
        double t0, t;
        if (max_norm > 0.0f) need_cuda(cudaMemcpy(gr, fresh, n * 4, cudaMemcpyDeviceToDevice), "restore gradients");
        need_cuda(cudaDeviceSynchronize(), "restore gradients");
        t0 = now();
        need(esft_clip_grad_norm_with(g, &gr, &n, 1, max_norm, &norm, &e), "esft_clip_grad_norm_with", &e);
        t = now() - t0;
        if (i > 0 && t < best) best = t;
    }
    return best;
}

/* Minimum over reps of a device-to-device copy of `bytes` (moves 2 x bytes). */
static double time_copy(size_t bytes)
{
    char *src = NULL, *dst = NULL;
    double best = 1e30;
    int i;
    need_cuda(cudaMalloc((void **)&src, bytes), "cudaMalloc copy");
    need_cuda(cudaMalloc((void **)&dst, bytes), "cudaMalloc copy");
    for (i = 0; i <= reps; i++) {
        double t0 = now(), t;
        need_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice), "copy");
        need_cuda(cudaDeviceSynchronize(), "copy");
        t = now() - t0;
        if (i > 0 && t < best) best = t;
    }
    cudaFree(src);
    cudaFree(dst);
    return best;
}

static void gbs_row(const char *what, double sec, double bytes, double copy_gbs, const char *note)
{
    double gbs = bytes / sec * 1e-9;
    printf("  %-30s %9.2f ms  %7.0f GB/s  %5.1f%% of copy  %s\n", what, sec * 1e3, gbs, 100.0 * gbs / copy_gbs, note);
}

/* AdamW and the clipping pass over one flat block, each against a device copy
   of the same bytes measured in the same run. The update kernel alone is the
   checked step minus a refused step (a NaN in the last gradient: the float4
   finite check reads all of g, the update kernel sees the flag and returns). */
static void bench_adamw(int quick)
{
    size_t n = (size_t)1070000000 / (quick ? 8 : 1);
    esft_adamw opt;
    esft_adamw_config c = esft_adamw_config_esft();
    esft_error e;
    float *p = dev_fill(n, 0.02f, 31), *gr = dev_fill(n, 1e-3f, 32), *fresh, nan_g = NAN, last;
    double step, refused, clip_measure, clip_scale, copy;
    need(esft_adamw_init(&opt, &c, n, NULL, &e), "esft_adamw_init", &e);
    need(esft_adamw_set_backend(&opt, g, &e), "esft_adamw_set_backend", &e);
    step = time_adamw(&opt, p, gr, ESFT_OK);
    need_cuda(cudaMemcpy(&last, gr + n - 1, 4, cudaMemcpyDeviceToHost), "read the last gradient");
    need_cuda(cudaMemcpy(gr + n - 1, &nan_g, 4, cudaMemcpyHostToDevice), "plant a NaN");
    refused = time_adamw(&opt, p, gr, ESFT_ERR_NUMERIC);
    need_cuda(cudaMemcpy(gr + n - 1, &last, 4, cudaMemcpyHostToDevice), "restore the last gradient");
    esft_adamw_uninit(&opt);
    cudaFree(p);
    clip_measure = time_clip(gr, NULL, n, 0.0f);
    fresh = dev_fill(n, 1e-3f, 32);
    clip_scale = time_clip(gr, fresh, n, 1e-3f); /* the norm is ~1e-3 sqrt(n / 3): always clips */
    cudaFree(gr);
    cudaFree(fresh);
    copy = time_copy(n * 14);
    printf("AdamW over %.3g fp32 parameters (one flat block: every tensor in one launch)\n", (double)n);
    gbs_row("device copy (bar)", copy, 28.0 * n, 28.0 * n / copy * 1e-9, "28 B/param: reads and writes 14 n");
    gbs_row("adamw update kernel (float4)", step - refused, 28.0 * n, 28.0 * n / copy * 1e-9,
            "28 B/param: step - refused step (bar 90%)");
    gbs_row("esft_adamw_step, checked", step, 28.0 * n, 28.0 * n / copy * 1e-9,
            "28 B/param counted; moves 32 with its NaN check");
    gbs_row("finite check (refused step)", refused, 4.0 * n, 28.0 * n / copy * 1e-9, "4 B/param");
    gbs_row("clip: sum of squares only", clip_measure, 4.0 * n, 28.0 * n / copy * 1e-9,
            "4 B/param (max_norm 0: measures)");
    gbs_row("clip: sum of squares + scale", clip_scale, 12.0 * n, 28.0 * n / copy * 1e-9,
            "12 B/param (reads g twice, writes once)");
}

static void bench_stats(void)
{
    const int T = 1000000;
    size_t nk = (size_t)T * K, i;
    int32_t *ids = (int32_t *)malloc(nk * 4);
    float *w = (float *)malloc(nk * 4);
    void *d_ids, *d_w;
    esft_stats sc, sg;
    esft_error e;
    double best = 1e30, t0, cpu;
    int r;
    if (!ids || !w) die("malloc", "out of host memory");
    for (i = 0; i < nk; i++) {
        ids[i] = (int32_t)((i * 2654435761u >> 7) % E);
        w[i] = (float)((i * 40503u) % 1000) / 6000.0f;
    }
    need(g->alloc(g->context, nk * 4, &d_ids), "alloc", NULL);
    need(g->alloc(g->context, nk * 4, &d_w), "alloc", NULL);
    need(g->upload(g->context, d_ids, ids, nk * 4), "upload", NULL);
    need(g->upload(g->context, d_w, w, nk * 4), "upload", NULL);
    need(esft_stats_init(&sc, 1, E, K, NULL), "stats init", NULL);
    need(esft_stats_init(&sg, 1, E, K, NULL), "stats init", NULL);
    need(esft_stats_set_backend(&sg, g, &e), "esft_stats_set_backend", &e);
    t0 = now();
    need(esft_stats_add(&sc, 0, ids, w, NULL, T, &e), "cpu esft_stats_add", &e);
    cpu = now() - t0;
    for (r = 0; r <= reps; r++) {
        esft_stats_reset(&sg);
        t0 = now();
        need(esft_stats_add(&sg, 0, (const int32_t *)d_ids, (const float *)d_w, NULL, T, &e), "esft_stats_add", &e);
        if (r > 0 && now() - t0 < best) best = now() - t0;
    }
    if (memcmp(sc.count, sg.count, E * 8) != 0 || memcmp(sc.gate_sum, sg.gate_sum, E * 8) != 0)
        die("statistics", "GPU counters differ from the CPU's");
    printf("Router statistics, 1 M tokens x %d, E %d, with weights (counters checked equal to the CPU's)\n", K, E);
    printf("  %-28s %9.2f ms  %7.1f GB/s of ids+weights\n", "esft_stats_add, CPU (bar)", cpu * 1e3,
           8.0 * nk / cpu * 1e-9);
    printf("  %-28s %9.2f ms  %7.1f GB/s  %.1fx faster than the CPU\n", "esft_stats_add, CUDA", best * 1e3,
           8.0 * nk / best * 1e-9, cpu / best);
    esft_stats_uninit(&sc);
    esft_stats_uninit(&sg);
    g->free(g->context, d_ids);
    g->free(g->context, d_w);
    free(ids);
    free(w);
}

/* The PESC layer's bar (the issue's): forward + backward at Camelidae's shape in
   at most 1.1 ms on an H100; PyTorch's grouped implementation takes 2.19 ms. */
#define PESC_BAR_SEC 1.1e-3
#define PESC_TORCH_SEC 2.19e-3

/* The PESC layer's operands at the bench's shape (device memory). */
typedef struct pesc_run {
    esft_pesc_config c;
    esft_pesc_saved saved;
    int T;
    float *x, *u, *params, *dy, *y, *dF, *du, *dp;
} pesc_run;

/* Minimum over reps (after one warm-up) of the forward alone and of forward +
   backward, through the public calls (each ends synchronised). Returns the
   first failure's status (e says why), timing nothing more. */
static esft_status time_pesc(pesc_run *p, double *fwd, double *both, esft_error *e)
{
    float aux = 0.0f;
    int i;
    *fwd = *both = 1e30;
    for (i = 0; i <= reps; i++) {
        double t0 = now(), t1;
        esft_status s = esft_pesc_forward_with(g, &p->c, p->y, &aux, p->x, p->u, p->params, &p->saved, p->T, e);
        t1 = now();
        if (s == ESFT_OK)
            s = esft_pesc_backward_with(g, &p->c, p->dF, p->du, p->dp, p->dy, 1.0f, &p->saved, p->x, p->u, p->params,
                                        p->T, e);
        if (s != ESFT_OK) return s;
        if (i > 0 && t1 - t0 < *fwd) *fwd = t1 - t0;
        if (i > 0 && now() - t0 < *both) *both = now() - t0;
    }
    return ESFT_OK;
}

static void pesc_rows(const char *what, double fwd, double both, double flops)
{
    char label[64];
    snprintf(label, sizeof label, "esft_pesc_forward%s", what);
    printf("  %-36s %9.2f ms  %7.1f TFLOP/s\n", label, fwd * 1e3, flops / fwd * 1e-12);
    snprintf(label, sizeof label, "esft_pesc fwd+bwd%s", what);
    printf("  %-36s %9.2f ms  %7.1f TFLOP/s  %.2fx the bar (%.2f ms on an H100: %s; PyTorch grouped %.2f ms)\n",
           label, both * 1e3, 3.0 * flops / both * 1e-12, both / PESC_BAR_SEC, PESC_BAR_SEC * 1e3,
           both <= PESC_BAR_SEC ? "met" : "NOT met", PESC_TORCH_SEC * 1e3);
}

/* The adapters' GEMM batches each way ESFT_CUDA_EXPERTS offers, side by side
   (the rows above ran the setting as it was, auto by default), as
   compare_modes does for the MoE; a way the backend refuses is printed with
   its reason. */
static void compare_pesc_modes(pesc_run *p, double flops)
{
    static const char *modes[3] = {"grouped", "streams", "loop"};
    char *saved = experts_mode_save();
    int i;
    for (i = 0; i < 3; i++) {
        esft_error e;
        double fwd, both;
        char what[32];
        setenv("ESFT_CUDA_EXPERTS", modes[i], 1);
        if (time_pesc(p, &fwd, &both, &e) != ESFT_OK) {
            printf("  ESFT_CUDA_EXPERTS=%-8s refused: %s\n", modes[i], e.message);
            continue;
        }
        snprintf(what, sizeof what, ", %s", modes[i]);
        pesc_rows(what, fwd, both, flops);
    }
    experts_mode_restore(saved);
}

static void bench_pesc(void)
{
    const int Dp = 4096, n = 8, Kp = 2, R = 512, T = 4096, rows = T * Kp / n;
    pesc_run p;
    size_t td = (size_t)T * Dp, np;
    esft_error e;
    float *logits = dev_fill((size_t)T * n, 0.0f, 0), *h = dev_fill((size_t)T * Kp * R, 0.0f, 0);
    float *yl = dev_fill((size_t)T * Kp * Dp, 0.0f, 0);
    double fwd, both, loop = 1e30;
    double flops = 2.0 * T * n * Dp + 2.0 * (double)T * Kp * 2.0 * R * Dp; /* forward; the backward is twice it */
    int i, a;
    p.c = esft_pesc_config_init(Dp, n, Kp, R);
    p.T = T;
    np = esft_pesc_param_count(&p.c);
    p.x = dev_fill(td, 1.0f, 41);
    p.u = dev_fill(td, 1.0f, 45);
    p.params = dev_fill(np, 0.02f, 42);
    p.dy = dev_fill(td, 1.0f, 46);
    p.y = dev_fill(td, 0.0f, 0);
    p.dF = dev_fill(td, 0.0f, 0);
    p.du = dev_fill(td, 0.0f, 0);
    p.dp = dev_fill(np, 0.0f, 0);
    need(esft_pesc_saved_init(&p.saved, &p.c, T, g, &e), "pesc saved", &e);
    printf("PESC layer, D %d, %d adapters, top-%d, R %d, T %d, aux on, ESFT_CUDA_EXPERTS=%s\n", Dp, n, Kp, R, T,
           getenv("ESFT_CUDA_EXPERTS") ? getenv("ESFT_CUDA_EXPERTS") : "auto");
    need(time_pesc(&p, &fwd, &both, &e), "pesc forward + backward", &e);
    for (i = 0; i <= reps; i++) {
        double t0;
        need_cuda(cudaDeviceSynchronize(), "sync");
        t0 = now();
        gemm(1, T, n, Dp, p.u, p.params, logits);
        for (a = 0; a < n; a++) { /* 1024 rows per adapter: balanced top-2 of 8 */
            gemm(1, rows, R, Dp, p.x + (size_t)(a / Kp) * rows * Dp,
                 p.params + esft_pesc_tensor_offset(&p.c, ESFT_PESC_DOWN, a), h + (size_t)a * rows * R);
            gemm(1, rows, Dp, R, h + (size_t)a * rows * R, p.params + esft_pesc_tensor_offset(&p.c, ESFT_PESC_UP, a),
                 yl + (size_t)a * rows * Dp);
        }
        need_cuda(cudaDeviceSynchronize(), "sync");
        if (i > 0 && now() - t0 < loop) loop = now() - t0;
    }
    pesc_rows(" (cuda)", fwd, both, flops);
    printf("  %-36s %9.2f ms  %7.1f TFLOP/s (forward GEMMs only, cuBLAS: the floor of the forward)\n",
           "per-adapter cuBLAS loop", loop * 1e3, flops / loop * 1e-12);
    compare_pesc_modes(&p, flops);
    esft_pesc_saved_uninit(&p.saved);
    cudaFree(p.x); cudaFree(p.u); cudaFree(p.params); cudaFree(p.dy); cudaFree(p.y); cudaFree(p.dF); cudaFree(p.du);
    cudaFree(p.dp); cudaFree(logits); cudaFree(h); cudaFree(yl);
}

int main(int argc, char **argv)
{
    esft_error e;
    const char *m = getenv("ESFT_CUDA_MATH");
    int i, quick = 0;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) quick = 1;
        else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) reps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_cuda [--quick] [--reps N]\n");
            return 1;
        }
    }
    if (quick) reps = 1;
    if (reps < 1) reps = 1;
    g = esft_backend_cuda(&e);
    if (!g) {
        fprintf(stderr, "bench_cuda: %s: nothing measured\n", e.message);
        return 2;
    }
    if (m && strcmp(m, "fp32") == 0) math_type = CUBLAS_COMPUTE_32F;
    else if (m && strcmp(m, "tf32") == 0) math_type = CUBLAS_COMPUTE_32F_FAST_TF32;
    need_blas(cublasCreate(&blas), "cublasCreate");
    {
        cudaDeviceProp prop;
        int dev = 0;
        cudaGetDevice(&dev);
        cudaGetDeviceProperties(&prop, dev);
        printf("bench_cuda on %s (%.0f GiB), %s, minimum of %d runs\n", prop.name,
               (double)prop.totalGlobalMem / (1 << 30), quick ? "--quick" : "full", reps);
    }
    bench_moe(quick);
    bench_adamw(quick);
    bench_stats();
    bench_pesc();
    cublasDestroy(blas);
    return 0;
}
