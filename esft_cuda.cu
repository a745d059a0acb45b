/* esft_cuda.cu - the CUDA backend of esft.h - licence: MIT, see the end of esft.h

   Build:   nvcc -O2 -std=c++17 -I. -c esft_cuda.cu    (link with -lcublas)
   Use:     const esft_backend *gpu = esft_backend_cuda(&err);   // NULL: no GPU, reason in err
            gpu->alloc / upload / download, then esft_route_with(gpu, ...) etc.

   One exported symbol, esft_backend_cuda(); everything else is static and named
   esft_cuda__*. This file includes esft.h without ESFT_IMPLEMENTATION and calls no
   esft_ function, so it links next to any translation unit that holds the
   implementation. docs/cuda.md describes the kernels, the precision policy and the
   tolerances the tests hold them to.

   Contents
      1. context, errors, pointer checks
      2. memory
      3. routing kernel
      4. router-statistics kernel
      5. the table and its constructor

   Rules kept throughout
      - Every CUDA/cuBLAS failure becomes ESFT_ERR_BACKEND with CUDA's own text in
        err->message (memory entries have no err; see esft_cuda__alloc).
      - Ops take device memory only; a host pointer is rejected with
        ESFT_ERR_INVALID_ARGUMENT, never copied across silently.
      - Ops run on the backend's stream and return after it has finished, so a
        status always describes work that is complete (and ops that can fail on
        data, like NaN logits, can say which token). */
#include <cuda_runtime.h>
#include <cublas_v2.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "esft.h"

/* ===================================================================== */
/* 1. context, errors, pointer checks                                    */
/* ===================================================================== */

typedef struct esft_cuda__context {
    int device;                     /* the device current at construction */
    cudaStream_t stream;            /* every op and copy runs here */
    cublasHandle_t blas;            /* created on first use (GEMM ops) */
    unsigned long long *flag;       /* device: first bad element of an op, ~0 = none */
    char device_name[256];
} esft_cuda__context;

static esft_cuda__context esft_cuda__ctx;

/* Fills err like esft.h's esft__fail (which is private to the implementation). */
static esft_status esft_cuda__fail(esft_error *err, esft_status s, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        memset(err, 0, sizeof *err);
        err->status = s;
        err->offset = -1;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return s;
}

/* A CUDA runtime result as a status: ESFT_ERR_BACKEND with CUDA's name and text. */
static esft_status esft_cuda__check(cudaError_t e, const char *what, esft_error *err)
{
    if (e == cudaSuccess) return ESFT_OK;
    return esft_cuda__fail(err, e == cudaErrorMemoryAllocation ? ESFT_ERR_OUT_OF_MEMORY : ESFT_ERR_BACKEND,
                           "cuda: %s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

/* A kernel launch: launch errors are reported at once, execution errors by the
   synchronisation that every op ends with. */
static esft_status esft_cuda__launched(const char *what, esft_error *err)
{
    return esft_cuda__check(cudaGetLastError(), what, err);
}

static esft_status esft_cuda__finish(esft_cuda__context *c, const char *what, esft_error *err)
{
    return esft_cuda__check(cudaStreamSynchronize(c->stream), what, err);
}

/* 1 when the device can dereference p: device or managed memory, or pinned host
   memory mapped at the same address. Plain malloc'd memory is not. */
static int esft_cuda__device_accessible(const void *p)
{
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        (void)cudaGetLastError(); /* clear the sticky-free error of a failed query */
        return 0;
    }
    if (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged) return 1;
    return a.type == cudaMemoryTypeHost && a.devicePointer == p;
}

/* Validates the memory space of one argument (NULL passes: optional arguments
   are checked for presence by the callers in esft.h). */
static esft_status esft_cuda__need_device(const void *p, const char *name, esft_error *err)
{
    if (!p || esft_cuda__device_accessible(p)) return ESFT_OK;
    return esft_cuda__fail(err, ESFT_ERR_INVALID_ARGUMENT,
                           "cuda: %s is host memory; pass memory from the backend's alloc/upload", name);
}

/* Reads (and re-arms) the context's error flag after an op has finished. */
static esft_status esft_cuda__take_flag(esft_cuda__context *c, unsigned long long *out, esft_error *err)
{
    const unsigned long long none = ~0ULL;
    esft_status s = esft_cuda__check(cudaMemcpyAsync(out, c->flag, sizeof *out, cudaMemcpyDeviceToHost,
                                                     c->stream), "read error flag", err);
    if (s == ESFT_OK && *out != none)
        s = esft_cuda__check(cudaMemcpyAsync(c->flag, &none, sizeof none, cudaMemcpyHostToDevice, c->stream),
                             "reset error flag", err);
    if (s == ESFT_OK) s = esft_cuda__finish(c, "read error flag", err);
    return s;
}

/* ===================================================================== */
/* 2. memory                                                             */
/* ===================================================================== */

/* The memory entries of esft_backend carry no esft_error; a failure is reported
   by status only (ESFT_ERR_OUT_OF_MEMORY for cudaErrorMemoryAllocation). */
static esft_status esft_cuda__alloc(void *context, size_t bytes, void **out)
{
    cudaError_t e;
    (void)context;
    *out = NULL;
    e = cudaMalloc(out, bytes ? bytes : 1);
    if (e == cudaSuccess) return ESFT_OK;
    *out = NULL;
    (void)cudaGetLastError();
    return e == cudaErrorMemoryAllocation ? ESFT_ERR_OUT_OF_MEMORY : ESFT_ERR_BACKEND;
}

static void esft_cuda__free(void *context, void *ptr)
{
    (void)context;
    if (ptr) (void)cudaFree(ptr);
}

/* Copies on the backend's stream and waits, so the host buffer may be reused
   (or freed) as soon as the call returns. */
static esft_status esft_cuda__copy(esft_cuda__context *c, void *dst, const void *src, size_t bytes,
                                   cudaMemcpyKind kind)
{
    cudaError_t e;
    if (!bytes) return ESFT_OK;
    e = cudaMemcpyAsync(dst, src, bytes, kind, c->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(c->stream);
    if (e == cudaSuccess) return ESFT_OK;
    (void)cudaGetLastError();
    return ESFT_ERR_BACKEND;
}

static esft_status esft_cuda__upload(void *context, void *dst, const void *src, size_t bytes)
{
    return esft_cuda__copy((esft_cuda__context *)context, dst, src, bytes, cudaMemcpyHostToDevice);
}

static esft_status esft_cuda__download(void *context, void *dst, const void *src, size_t bytes)
{
    return esft_cuda__copy((esft_cuda__context *)context, dst, src, bytes, cudaMemcpyDeviceToHost);
}

static esft_status esft_cuda__synchronize(void *context)
{
    esft_cuda__context *c = (esft_cuda__context *)context;
    if (cudaStreamSynchronize(c->stream) == cudaSuccess) return ESFT_OK;
    (void)cudaGetLastError();
    return ESFT_ERR_BACKEND;
}

/* ===================================================================== */
/* 3. routing kernel                                                     */
/* ===================================================================== */

/* One warp routes one token; a block holds ESFT_CUDA__ROUTE_WARPS tokens. The
   arithmetic follows esft__route_cpu step by step (same formulas, same order in
   every sequential part), so results differ from the CPU only by expf's last
   bits and the order of the softmax sum; selection is exact given the scores. */
#define ESFT_CUDA__ROUTE_WARPS 4
#define ESFT_CUDA__NO_EXPERT 0x7fffffff

typedef struct esft_cuda__route_params {
    int E, K, sigmoid, renormalize;
    int G, topk_group, top2_sum; /* G <= 1: no grouping */
    float scaling;
    const float *bias;           /* (E) device, or NULL */
} esft_cuda__route_params;

/* esft__ranks_before: higher score first, ties to the lower index. */
__device__ static bool esft_cuda__before(float sa, int a, float sb, int b)
{
    return sa > sb || (sa == sb && a < b);
}

/* The warp's best (score, index) pair under esft_cuda__before; every lane gets it. */
__device__ static void esft_cuda__warp_best(float *s, int *i)
{
    for (int off = 16; off > 0; off >>= 1) {
        float so = __shfl_xor_sync(0xffffffffu, *s, off);
        int io = __shfl_xor_sync(0xffffffffu, *i, off);
        if (esft_cuda__before(so, io, *s, *i)) { *s = so; *i = io; }
    }
}

__device__ static float esft_cuda__warp_max(float v)
{
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

__device__ static float esft_cuda__warp_sum(float v)
{
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

/* Gating probabilities of one token into prob[] (shared) and probs_out (global,
   optional); non-finite logits are flagged with their flat index. */
__device__ static void esft_cuda__gate(float *prob, float *probs_out, const float *x,
                                       const esft_cuda__route_params &p, size_t row,
                                       unsigned long long *flag, int lane)
{
    if (p.sigmoid) {
        for (int i = lane; i < p.E; i += 32) prob[i] = 1.0f / (1.0f + expf(-x[i]));
    } else {
        float mx = -INFINITY, sum = 0.0f;
        for (int i = lane; i < p.E; i += 32) mx = fmaxf(mx, x[i]);
        mx = esft_cuda__warp_max(mx);
        for (int i = lane; i < p.E; i += 32) { prob[i] = expf(x[i] - mx); sum += prob[i]; }
        sum = esft_cuda__warp_sum(sum);
        for (int i = lane; i < p.E; i += 32) prob[i] /= sum;
    }
    for (int i = lane; i < p.E; i += 32) {
        if (!isfinite(x[i])) atomicMin(flag, (unsigned long long)(row * (size_t)p.E + (size_t)i));
        if (probs_out) probs_out[i] = prob[i];
    }
}

/* Group-limited selection: scores each group (its best, or the sum of its best
   two, as esft__allow_best_groups), keeps the topk_group best groups (ties to
   the lower group) and removes the other groups' experts from sel[]. */
__device__ static void esft_cuda__limit_groups(float *sel, float *gscore, const esft_cuda__route_params &p,
                                               int lane)
{
    int per = p.E / p.G;
    for (int g = lane; g < p.G; g += 32) {
        const float *s = sel + g * per;
        float first = -INFINITY, second = -INFINITY;
        for (int i = 0; i < per; i++) {
            if (s[i] > first) { second = first; first = s[i]; }
            else if (s[i] > second) second = s[i];
        }
        gscore[g] = p.top2_sum ? first + second : first;
    }
    __syncwarp();
    if (lane == 0) {
        /* kept groups by repeated best-of; a kept group's score becomes +INF,
           which no group of finite scores reaches */
        for (int r = 0; r < p.topk_group; r++) {
            int best = -1;
            for (int g = 0; g < p.G; g++)
                if (gscore[g] != INFINITY && (best < 0 || esft_cuda__before(gscore[g], g, gscore[best], best)))
                    best = g;
            if (best >= 0) gscore[best] = INFINITY;
        }
    }
    __syncwarp();
    for (int i = lane; i < p.E; i += 32)
        if (gscore[i / per] != INFINITY) sel[i] = -INFINITY;
    __syncwarp();
}

/* Top-K by K rounds of warp arg-max over sel[] (taken or excluded experts hold
   -INF), then the weights exactly as the CPU forms them. */
__device__ static void esft_cuda__select(int32_t *ids, float *weights, float *sel, const float *prob,
                                         const esft_cuda__route_params &p, int lane)
{
    for (int k = 0; k < p.K; k++) {
        float bs = -INFINITY;
        int bi = ESFT_CUDA__NO_EXPERT;
        for (int i = lane; i < p.E; i += 32)
            if (sel[i] != -INFINITY && esft_cuda__before(sel[i], i, bs, bi)) { bs = sel[i]; bi = i; }
        esft_cuda__warp_best(&bs, &bi);
        if (lane == 0) {
            ids[k] = bi == ESFT_CUDA__NO_EXPERT ? 0 : bi; /* none only after a NaN (flagged) */
            if (bi != ESFT_CUDA__NO_EXPERT) sel[bi] = -INFINITY;
        }
        __syncwarp();
    }
    if (lane == 0) {
        float sum = 0.0f;
        for (int k = 0; k < p.K; k++) { weights[k] = prob[ids[k]]; sum += weights[k]; }
        for (int k = 0; k < p.K; k++) {
            if (p.renormalize) weights[k] /= sum + 1e-20f;
            weights[k] *= p.scaling;
        }
    }
}

/* Shared memory per warp: prob[E], sel[E], group scores[G]. */
__host__ __device__ static size_t esft_cuda__route_smem_per_warp(int E, int G)
{
    return ((size_t)2 * E + (size_t)(G > 1 ? G : 1)) * sizeof(float);
}

__global__ static void esft_cuda__route_kernel(int32_t *ids, float *weights, float *probs, const float *logits,
                                               int T, esft_cuda__route_params p, unsigned long long *flag)
{
    extern __shared__ float esft_cuda__route_smem[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int t = blockIdx.x * ESFT_CUDA__ROUTE_WARPS + warp;
    float *prob = esft_cuda__route_smem + warp * (esft_cuda__route_smem_per_warp(p.E, p.G) / sizeof(float));
    float *sel = prob + p.E, *gscore = sel + p.E;
    if (t >= T) return; /* whole warps leave together: t is per warp */
    esft_cuda__gate(prob, probs ? probs + (size_t)t * p.E : NULL, logits + (size_t)t * p.E, p, (size_t)t,
                    flag, lane);
    __syncwarp();
    for (int i = lane; i < p.E; i += 32) sel[i] = p.bias ? prob[i] + p.bias[i] : prob[i];
    __syncwarp();
    if (p.G > 1) esft_cuda__limit_groups(sel, gscore, p, lane);
    esft_cuda__select(ids + (size_t)t * p.K, weights + (size_t)t * p.K, sel, prob, p, lane);
}

static esft_status esft_cuda__route(void *context, const esft_route_config *cfg, int32_t *ids, float *weights,
                                    float *probs, const float *logits, int T, esft_error *err)
{
    esft_cuda__context *c = (esft_cuda__context *)context;
    esft_cuda__route_params p;
    size_t smem;
    unsigned long long bad;
    esft_status s;
    if (T == 0) return ESFT_OK;
    if ((s = esft_cuda__need_device(ids, "ids", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(weights, "weights", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(probs, "probs", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(logits, "logits", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(cfg->selection_bias, "selection_bias", err)) != ESFT_OK)
        return s;
    p.E = cfg->n_experts;
    p.K = cfg->top_k;
    p.sigmoid = cfg->gating == ESFT_GATING_SIGMOID;
    p.renormalize = cfg->renormalize != 0;
    p.G = cfg->n_group > 1 ? cfg->n_group : 0;
    p.topk_group = cfg->topk_group;
    p.top2_sum = cfg->group_score == ESFT_GROUP_SCORE_TOP2_SUM;
    p.scaling = cfg->routed_scaling;
    p.bias = cfg->selection_bias;
    smem = esft_cuda__route_smem_per_warp(p.E, p.G) * ESFT_CUDA__ROUTE_WARPS;
    if (smem > 48 * 1024)
        return esft_cuda__fail(err, ESFT_ERR_UNSUPPORTED, "cuda route: %d experts need %lu bytes of shared memory "
                               "(at most 48 KiB)", p.E, (unsigned long)smem);
    esft_cuda__route_kernel<<<(T + ESFT_CUDA__ROUTE_WARPS - 1) / ESFT_CUDA__ROUTE_WARPS, 32 * ESFT_CUDA__ROUTE_WARPS,
                              smem, c->stream>>>(ids, weights, probs, logits, T, p, c->flag);
    if ((s = esft_cuda__launched("route kernel", err)) != ESFT_OK) return s;
    if ((s = esft_cuda__take_flag(c, &bad, err)) != ESFT_OK) return s;
    if (bad != ~0ULL)
        return esft_cuda__fail(err, ESFT_ERR_NUMERIC, "router logit of token %llu, expert %llu is not finite",
                               bad / (unsigned long long)p.E, bad % (unsigned long long)p.E);
    return ESFT_OK;
}

/* ===================================================================== */
/* 4. router-statistics kernel                                           */
/* ===================================================================== */

/* One thread per (token, slot). Counts and fixed-point weights are integers, so
   atomic addition in any order gives the CPU's bits exactly. A block first sums
   into shared memory when 2E counters fit, to spare the global atomics on the
   few hot experts. An id outside [0, E) is flagged (esft_stats_add validates
   before calling, but the op may be called directly). */
#define ESFT_CUDA__STATS_THREADS 256
#define ESFT_CUDA__STATS_SHARED_E 1024

/* esft__to_fixed: round(w * 2^32) in double; the product is exact, so a fused
   multiply-add would give the same bits as the CPU's multiply then add. */
__device__ static unsigned long long esft_cuda__to_fixed(float w)
{
    return (unsigned long long)__dadd_rn(__dmul_rn((double)w, 4294967296.0), 0.5);
}

__global__ static void esft_cuda__stats_kernel(unsigned long long *count, unsigned long long *gate_sum,
                                               const int32_t *ids, const float *weights,
                                               const unsigned char *mask, int T, int K, int E,
                                               unsigned long long *flag)
{
    extern __shared__ unsigned long long esft_cuda__stats_smem[];
    bool local = E <= ESFT_CUDA__STATS_SHARED_E;
    unsigned long long *c = local ? esft_cuda__stats_smem : count;
    unsigned long long *g = local ? esft_cuda__stats_smem + E : gate_sum;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, n = (size_t)T * (size_t)K;
    if (local) {
        for (int e = threadIdx.x; e < 2 * E; e += blockDim.x) esft_cuda__stats_smem[e] = 0;
        __syncthreads();
    }
    if (i < n && (!mask || mask[i / (size_t)K])) {
        int id = ids[i];
        if (id < 0 || id >= E) atomicMin(flag, (unsigned long long)i);
        else {
            atomicAdd(c + id, 1ULL);
            if (weights) atomicAdd(g + id, esft_cuda__to_fixed(weights[i]));
        }
    }
    if (local) {
        __syncthreads();
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            if (c[e]) atomicAdd(count + e, c[e]);
            if (g[e]) atomicAdd(gate_sum + e, g[e]);
        }
    }
}

static esft_status esft_cuda__stats_accumulate(void *context, uint64_t *count, uint64_t *gate_sum,
                                               const int32_t *ids, const float *weights,
                                               const unsigned char *mask, int T, int K, int E, esft_error *err)
{
    esft_cuda__context *c = (esft_cuda__context *)context;
    size_t n = (size_t)T * (size_t)K, smem;
    unsigned long long bad;
    esft_status s;
    if (n == 0) return ESFT_OK;
    if ((s = esft_cuda__need_device(count, "count", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(gate_sum, "gate_sum", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(ids, "ids", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(weights, "weights", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(mask, "mask", err)) != ESFT_OK)
        return s;
    smem = E <= ESFT_CUDA__STATS_SHARED_E ? 2 * (size_t)E * sizeof(unsigned long long) : 0;
    esft_cuda__stats_kernel<<<(unsigned)((n + ESFT_CUDA__STATS_THREADS - 1) / ESFT_CUDA__STATS_THREADS),
                              ESFT_CUDA__STATS_THREADS, smem, c->stream>>>(
        (unsigned long long *)count, (unsigned long long *)gate_sum, ids, weights, mask, T, K, E, c->flag);
    if ((s = esft_cuda__launched("stats kernel", err)) != ESFT_OK) return s;
    if ((s = esft_cuda__take_flag(c, &bad, err)) != ESFT_OK) return s;
    if (bad != ~0ULL)
        return esft_cuda__fail(err, ESFT_ERR_RANGE, "token %llu: expert id outside [0, %d)",
                               bad / (unsigned long long)K, E);
    return ESFT_OK;
}

/* ===================================================================== */
/* 5. the table and its constructor                                      */
/* ===================================================================== */

/* nvcc takes designated initializers only in declaration order, so the table is
   positional with the field names in comments. */
static const esft_backend esft_cuda__backend = {
    /* .api_version = */ ESFT_BACKEND_API_VERSION,
    /* .name = */ "cuda",
    /* .context = */ &esft_cuda__ctx,
    /* .alloc = */ esft_cuda__alloc,
    /* .free = */ esft_cuda__free,
    /* .upload = */ esft_cuda__upload,
    /* .download = */ esft_cuda__download,
    /* .synchronize = */ esft_cuda__synchronize,
    /* .route = */ esft_cuda__route,
    /* .stats_accumulate = */ esft_cuda__stats_accumulate,
    /* .moe_forward = */ NULL,  /* not yet: ESFT_ERR_UNSUPPORTED through esft.h's dispatch */
    /* .moe_backward = */ NULL,
    /* .adamw_step = */ NULL,
};

static int esft_cuda__ready;

/* Picks the current device, makes the stream and the error flag. */
static esft_status esft_cuda__start(esft_cuda__context *c, esft_error *err)
{
    int n = 0;
    cudaDeviceProp prop;
    const unsigned long long none = ~0ULL;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return esft_cuda__fail(err, ESFT_ERR_BACKEND, "no CUDA device: %s (%s)", cudaGetErrorString(e),
                               cudaGetErrorName(e));
    }
    if (n == 0) return esft_cuda__fail(err, ESFT_ERR_BACKEND, "no CUDA device: cudaGetDeviceCount found 0");
    esft_status s = esft_cuda__check(cudaGetDevice(&c->device), "cudaGetDevice", err);
    if (s == ESFT_OK) s = esft_cuda__check(cudaGetDeviceProperties(&prop, c->device), "cudaGetDeviceProperties", err);
    if (s == ESFT_OK) snprintf(c->device_name, sizeof c->device_name, "%s", prop.name);
    if (s == ESFT_OK) s = esft_cuda__check(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking),
                                           "cudaStreamCreate", err);
    if (s == ESFT_OK) s = esft_cuda__check(cudaMalloc((void **)&c->flag, sizeof *c->flag), "cudaMalloc flag", err);
    if (s == ESFT_OK) s = esft_cuda__check(cudaMemcpy(c->flag, &none, sizeof none, cudaMemcpyHostToDevice),
                                           "cudaMemcpy flag", err);
    if (s != ESFT_OK) {
        if (c->flag) (void)cudaFree(c->flag);
        if (c->stream) (void)cudaStreamDestroy(c->stream);
        memset(c, 0, sizeof *c);
        (void)cudaGetLastError();
    }
    return s;
}

/* The one exported symbol. The table lives as long as the process (like
   esft_backend_cpu); a failed start is retried on the next call. Not
   thread-safe on its first call: construct it once before starting threads. */
extern "C" const esft_backend *esft_backend_cuda(esft_error *err)
{
    if (!esft_cuda__ready) {
        if (esft_cuda__start(&esft_cuda__ctx, err) != ESFT_OK) return NULL;
        esft_cuda__ready = 1;
    }
    return &esft_cuda__backend;
}
