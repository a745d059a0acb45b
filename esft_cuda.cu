/* esft_cuda.cu - the CUDA backend of esft.h - licence: MIT, see the end of esft.h

   Build:   nvcc -O2 -std=c++17 -I. -c esft_cuda.cu    (link with -lcublas)
   Use:     const esft_backend *gpu = esft_backend_cuda(&err);   // NULL: no GPU, reason in err
            gpu->alloc / upload / download, then esft_route_with(gpu, ...) etc.

   One exported symbol, esft_backend_cuda(); everything else is static and named
   esft_cuda__*. This file includes esft.h without ESFT_IMPLEMENTATION and calls
   a few esft_ functions: the published layouts esft_moe_workspace_view_at and
   esft_pesc_work_view_at (each scratch layout has one owner, esft.h) and the
   PESC block's esft_pesc_param_count / esft_pesc_tensor_offset /
   esft_route_config_init, so it links next to the translation unit that holds
   the implementation. docs/cuda.md describes the kernels, the precision policy and the
   tolerances the tests hold them to.

   Contents
      1. context, errors, pointer checks
      2. memory
      3. routing kernel
      4. router-statistics kernel
      5. GEMMs (cuBLAS) and scratch
      6. MoE layer: forward and backward
      7. PESC adapter layer: forward and backward
      8. AdamW
      9. the table and its constructor

   Rules kept throughout
      - Every CUDA/cuBLAS failure becomes ESFT_ERR_BACKEND with CUDA's own text in
        err->message (memory entries have no err; see esft_cuda__alloc).
      - Ops take device memory only; a host pointer is rejected with
        ESFT_ERR_INVALID_ARGUMENT, never copied across silently.
      - Ops check their own data (esft.h's wrappers never read device memory):
        NaN/Inf inputs and outputs, ids and weights out of range are found by a
        kernel that sets the context's flag, and reported with the status and
        message the CPU backend gives (ESFT_ERR_NUMERIC / ESFT_ERR_RANGE).
      - Ops run on the backend's stream and return after it has finished, so a
        status always describes work that is complete (and ops that can fail on
        data, like NaN logits, can say which token). */
#include <cuda_runtime.h>
#include <cublas_v2.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "esft.h"

/* ===================================================================== */
/* 1. context, errors, pointer checks                                    */
/* ===================================================================== */

/* The error flags, device words that kernels set with atomicMin to the first
   bad element they meet (~0 = none). OP is read by the op that set it at once
   (esft_cuda__take_flag); INPUT, LOGITS and PARAMS are deferred: the layer ops
   copy them to the host with the expert offsets, so one wait serves every
   check (x, F or dy; the selection bias; the router logits; PARAMS is the
   PESC parameter block's). WRAP is the statistics' overflow word (0 = none). The deferred
   flags are the last ones, in a row, so one copy brings them all. */
enum {
    ESFT_CUDA__FLAG_OP = 0,
    ESFT_CUDA__FLAG_WRAP = 1,
    ESFT_CUDA__FLAG_INPUT = 2,
    ESFT_CUDA__FLAG_LOGITS = 3,
    ESFT_CUDA__FLAG_PARAMS = 4,
    ESFT_CUDA__FLAG_BIAS = 5,
    ESFT_CUDA__FLAGS = 6
};

/* The streams mode of the expert GEMMs: side streams, each with its own cuBLAS
   handle (a handle's workspace must not be shared by concurrent streams). */
#define ESFT_CUDA__STREAMS 4

typedef struct esft_cuda__context {
    int device;                     /* the device current at construction */
    int sm_count;                   /* its multiprocessors (grid sizes of grid-stride kernels) */
    cudaStream_t stream;            /* every op and copy runs here */
    cublasHandle_t blas;            /* created on first use (GEMM ops) */
    unsigned long long *flag;       /* device (ESFT_CUDA__FLAGS), see the enum above */
    unsigned long long *host_flags; /* pinned host (ESFT_CUDA__FLAGS): deferred flags as last copied */
    void *scratch;                  /* device: op scratch beyond the caller's workspace */
    size_t scratch_bytes;
    int32_t *host;                  /* pinned host: per-op tables (expert offsets) */
    size_t host_count;
    void *batch_host;               /* host: the expert GEMM batches' tables (section 5) */
    size_t batch_host_bytes;
    void **batch_dev;               /* device: their pointer arrays */
    size_t batch_dev_count;
    cudaStream_t side[ESFT_CUDA__STREAMS];      /* streams mode, made on first use */
    cublasHandle_t side_blas[ESFT_CUDA__STREAMS];
    cudaEvent_t fork, join[ESFT_CUDA__STREAMS];
    int sides_ready;
    int experts_mode;               /* esft_cuda__experts_mode of the running layer op (esft_cuda__layer_setup) */
    unsigned grouped_refused;       /* bit per math (esft_cuda__math_bit): cuBLAS refused a grouped call */
    unsigned grouped_worked;        /* bit per math: a grouped call succeeded */
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

/* Waits for the op stream, then reads the OP flag (through its pinned host
   slot, read only after the wait) and re-arms it when set; the re-arm is
   queued on the op stream, before any later op's kernels. */
static esft_status esft_cuda__take_flag(esft_cuda__context *c, unsigned long long *out, esft_error *err)
{
    esft_status s = esft_cuda__check(cudaMemcpyAsync(c->host_flags + ESFT_CUDA__FLAG_OP, c->flag + ESFT_CUDA__FLAG_OP,
                                                     sizeof *c->flag, cudaMemcpyDeviceToHost, c->stream),
                                     "read error flag", err);
    if (s == ESFT_OK) s = esft_cuda__finish(c, "read error flag", err);
    *out = s == ESFT_OK ? c->host_flags[ESFT_CUDA__FLAG_OP] : ~0ULL;
    if (s == ESFT_OK && *out != ~0ULL)
        s = esft_cuda__check(cudaMemsetAsync(c->flag + ESFT_CUDA__FLAG_OP, 0xFF, sizeof *c->flag, c->stream),
                             "re-arm the error flag", err);
    return s;
}

/* --- 16-byte accesses over float arrays ---
   An elementwise kernel moves float4 where its pointers allow: the first `head`
   elements one by one until every pointer sits on a 16-byte boundary, then n4
   float4, then the < 4 left over one by one. Pointers at different offsets
   within 16 bytes never reach a boundary together: then head = n, all scalar.
   The n_one scalar elements are numbered r = 0..n_one-1: the head, then the
   tail (esft_cuda__one_at). */
typedef struct esft_cuda__split {
    size_t head;  /* scalar elements before the first float4 */
    size_t n4;    /* float4 from a + head */
    size_t tail;  /* index of the first scalar element after them */
    size_t n_one; /* head + the tail's length */
} esft_cuda__split;

static esft_cuda__split esft_cuda__split_of(const void *const *ptrs, int count, size_t n)
{
    esft_cuda__split sp;
    uintptr_t off = (uintptr_t)ptrs[0] & 15;
    int i, together = (off & 3) == 0;
    for (i = 1; i < count; i++) together = together && ((uintptr_t)ptrs[i] & 15) == off;
    sp.head = !together ? n : off == 0 ? 0 : (16 - off) / 4 < n ? (16 - off) / 4 : n;
    sp.n4 = (n - sp.head) / 4;
    sp.tail = sp.head + 4 * sp.n4;
    sp.n_one = n - 4 * sp.n4;
    return sp;
}

__device__ static size_t esft_cuda__one_at(const esft_cuda__split *sp, size_t r)
{
    return r < sp->head ? r : sp->tail + (r - sp->head);
}

__device__ static size_t esft_cuda__thread(void) { return (size_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ static size_t esft_cuda__threads(void) { return (size_t)gridDim.x * blockDim.x; }

/* Blocks for a kernel over sp: one thread per float4 or scalar element, at most `cap` blocks. */
static unsigned esft_cuda__split_grid(const esft_cuda__split *sp, unsigned threads, size_t cap)
{
    size_t items = sp->n4 > sp->n_one ? sp->n4 : sp->n_one, blocks = (items + threads - 1) / threads;
    return (unsigned)(blocks > cap ? cap : blocks ? blocks : 1);
}

__device__ static void esft_cuda__flag_nonfinite(float x, size_t i, unsigned long long *flag)
{
    if (!isfinite(x)) atomicMin(flag, (unsigned long long)i);
}

/* Flags the first NaN or Inf of a[0..n) (its index, by atomicMin), in float4. */
__global__ static void esft_cuda__finite_kernel(const float *a, esft_cuda__split sp, unsigned long long *flag)
{
    const float4 *a4 = (const float4 *)(a + sp.head);
    for (size_t i = esft_cuda__thread(); i < sp.n4; i += esft_cuda__threads()) {
        float4 q = a4[i];
        size_t at = sp.head + 4 * i;
        esft_cuda__flag_nonfinite(q.x, at, flag);
        esft_cuda__flag_nonfinite(q.y, at + 1, flag);
        esft_cuda__flag_nonfinite(q.z, at + 2, flag);
        esft_cuda__flag_nonfinite(q.w, at + 3, flag);
    }
    for (size_t r = esft_cuda__thread(); r < sp.n_one; r += esft_cuda__threads()) {
        size_t i = esft_cuda__one_at(&sp, r);
        esft_cuda__flag_nonfinite(a[i], i, flag);
    }
}

/* Launches the finite check of a[0..n) into one flag word (the MoE ops' deferred
   checks use flags of their own; see the flag enum). */
static esft_status esft_cuda__finite_launch(esft_cuda__context *c, const float *a, size_t n,
                                            unsigned long long *flag, esft_error *err)
{
    const void *ptrs[1] = {a};
    esft_cuda__split sp = esft_cuda__split_of(ptrs, 1, n);
    if (n == 0) return ESFT_OK;
    esft_cuda__finite_kernel<<<esft_cuda__split_grid(&sp, 256, 4096), 256, 0, c->stream>>>(a, sp, flag);
    return esft_cuda__launched("finite check kernel", err);
}

/* Queues the check of a[0..n) on the op stream into the OP flag; the flag says
   the result once the stream has run it (esft_cuda__first_nonfinite). */
static esft_status esft_cuda__queue_finite(esft_cuda__context *c, const float *a, size_t n, esft_error *err)
{
    return esft_cuda__finite_launch(c, a, n, c->flag + ESFT_CUDA__FLAG_OP, err);
}

/* The flagged element a[bad], read back to name it (after the stream has
   finished: a legacy-stream copy is not ordered with the op stream). */
static esft_status esft_cuda__read_bad(const float *a, unsigned long long bad, float *v, esft_error *err)
{
    *v = 0.0f;
    return esft_cuda__check(cudaMemcpy(v, a + bad, sizeof *v, cudaMemcpyDeviceToHost), "read a bad value", err);
}

/* After esft_cuda__queue_finite (and whatever else the op queued): waits for the
   stream, then *bad = the first NaN/Inf's index (~0 when none) and *value = it. */
static esft_status esft_cuda__first_nonfinite(esft_cuda__context *c, const float *a, unsigned long long *bad,
                                              float *value, esft_error *err)
{
    esft_status s = esft_cuda__take_flag(c, bad, err);
    *value = 0.0f;
    if (s != ESFT_OK || *bad == ~0ULL) return s;
    return esft_cuda__read_bad(a, *bad, value, err);
}

/* The verdict on a flagged index (~0: none), once the stream has finished:
   ESFT_ERR_NUMERIC naming a's element as what[row][col] (rows of width) or
   what[i] (width 0), as esft.h's esft__check_finite does. */
static esft_status esft_cuda__finite_verdict(const float *a, unsigned long long bad, const char *what, size_t width,
                                             esft_error *err)
{
    float v;
    esft_status s;
    if (bad == ~0ULL) return ESFT_OK;
    if ((s = esft_cuda__read_bad(a, bad, &v, err)) != ESFT_OK) return s;
    if (width)
        return esft_cuda__fail(err, ESFT_ERR_NUMERIC, "%s[%llu][%llu] is %s", what, bad / width, bad % width,
                               isnan(v) ? "NaN" : "Inf");
    return esft_cuda__fail(err, ESFT_ERR_NUMERIC, "%s[%llu] is %s", what, bad, isnan(v) ? "NaN" : "Inf");
}

/* esft.h's esft__check_finite on device memory, waited for at once. */
static esft_status esft_cuda__check_finite(esft_cuda__context *c, const float *a, size_t n, const char *what,
                                           size_t width, esft_error *err)
{
    unsigned long long bad;
    esft_status s = esft_cuda__finite_launch(c, a, n, c->flag + ESFT_CUDA__FLAG_OP, err);
    if (s == ESFT_OK && n > 0) s = esft_cuda__take_flag(c, &bad, err);
    if (s != ESFT_OK || n == 0) return s;
    return esft_cuda__finite_verdict(a, bad, what, width, err);
}

/* Queues the copy of the deferred flags to c->host_flags (pinned, so the copy
   is asynchronous: it lands by the op's next wait). */
static esft_status esft_cuda__queue_flags(esft_cuda__context *c, esft_error *err)
{
    return esft_cuda__check(cudaMemcpyAsync(c->host_flags + ESFT_CUDA__FLAG_INPUT, c->flag + ESFT_CUDA__FLAG_INPUT,
                                            (ESFT_CUDA__FLAGS - ESFT_CUDA__FLAG_INPUT) * sizeof *c->flag,
                                            cudaMemcpyDeviceToHost, c->stream),
                            "read deferred flags", err);
}

/* After the wait: deferred flag `which` as copied, re-armed on the device when set. */
static esft_status esft_cuda__deferred(esft_cuda__context *c, int which, unsigned long long *bad, esft_error *err)
{
    *bad = c->host_flags[which];
    if (*bad == ~0ULL) return ESFT_OK;
    c->host_flags[which] = ~0ULL;
    return esft_cuda__check(cudaMemsetAsync(c->flag + which, 0xFF, sizeof *c->flag, c->stream), "re-arm a flag", err);
}

/* Arms the deferred flags at the start of an op: an earlier op that failed
   between queuing a check and reading it may have left one set. */
static esft_status esft_cuda__arm_deferred(esft_cuda__context *c, esft_error *err)
{
    for (int i = ESFT_CUDA__FLAG_INPUT; i < ESFT_CUDA__FLAGS; i++) c->host_flags[i] = ~0ULL;
    return esft_cuda__check(cudaMemsetAsync(c->flag + ESFT_CUDA__FLAG_INPUT, 0xFF,
                                            (ESFT_CUDA__FLAGS - ESFT_CUDA__FLAG_INPUT) * sizeof *c->flag, c->stream),
                            "arm the deferred flags", err);
}

/* The verdict on an output of finite inputs flagged NaN or Inf at `bad` (~0:
   none): esft.h's esft__moe_check_output. */
static esft_status esft_cuda__output_verdict(const float *a, unsigned long long bad, const char *what, size_t width,
                                             esft_error *err)
{
    esft_error where;
    esft_status s = esft_cuda__finite_verdict(a, bad, what, width, &where);
    if (s != ESFT_ERR_NUMERIC) {
        if (s != ESFT_OK && err) *err = where;
        return s;
    }
    return esft_cuda__fail(err, s, "%s, from finite inputs: a weight is NaN or Inf, or the layer overflowed",
                           where.message);
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

/* Slots (t K + j) per chunk of the counting sort by expert (section 6): the
   routing kernel counts its selections into per-chunk histograms, so the sort
   needs no pass of its own over the ids. */
#define ESFT_CUDA__CHUNK 1024

typedef struct esft_cuda__route_params {
    int E, K, sigmoid, renormalize;
    int G, topk_group, top2_sum; /* G <= 1: no grouping */
    float scaling;
    const float *bias;           /* (E) device, or NULL */
    int32_t *chunk_counts;       /* (chunks, E) device, zeroed: += the selections per chunk; or NULL */
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
    if (p.chunk_counts && lane == 0) /* lane 0 wrote the ids: its own writes, visible to it */
        for (int k = 0; k < p.K; k++) {
            size_t slot = (size_t)t * p.K + (size_t)k;
            atomicAdd(p.chunk_counts + slot / ESFT_CUDA__CHUNK * (size_t)p.E + ids[slot], 1);
        }
}

/* Launches the routing kernel; non-finite logits set `flag` (device memory
   already checked by the caller). The bias, this backend's memory, is checked
   here first, as the CPU op checks its own. */
static esft_status esft_cuda__route_launch(esft_cuda__context *c, const esft_route_config *cfg, int32_t *ids,
                                           float *weights, float *probs, const float *logits, int T,
                                           unsigned long long *flag, int32_t *chunk_counts,
                                           unsigned long long *bias_flag, esft_error *err)
{
    esft_cuda__route_params p;
    size_t smem;
    esft_status s;
    p.E = cfg->n_experts;
    p.K = cfg->top_k;
    p.sigmoid = cfg->gating == ESFT_GATING_SIGMOID;
    p.renormalize = cfg->renormalize != 0;
    p.G = cfg->n_group > 1 ? cfg->n_group : 0;
    p.topk_group = cfg->topk_group;
    p.top2_sum = cfg->group_score == ESFT_GROUP_SCORE_TOP2_SUM;
    p.scaling = cfg->routed_scaling;
    p.bias = cfg->selection_bias;
    p.chunk_counts = chunk_counts;
    smem = esft_cuda__route_smem_per_warp(p.E, p.G) * ESFT_CUDA__ROUTE_WARPS;
    if (smem > 48 * 1024)
        return esft_cuda__fail(err, ESFT_ERR_UNSUPPORTED, "cuda route: %d experts need %lu bytes of shared memory "
                               "(at most 48 KiB)", p.E, (unsigned long)smem);
    if (p.bias && bias_flag) { /* deferred: read with the caller's next wait (NaN bias: ids safe, refused) */
        if ((s = esft_cuda__finite_launch(c, p.bias, (size_t)p.E, bias_flag, err)) != ESFT_OK) return s;
    } else if (p.bias) {
        esft_error where;
        s = esft_cuda__check_finite(c, p.bias, (size_t)p.E, "selection_bias", 0, &where);
        if (s == ESFT_ERR_NUMERIC) return esft_cuda__fail(err, ESFT_ERR_INVALID_ARGUMENT, "%s", where.message);
        if (s != ESFT_OK) {
            if (err) *err = where;
            return s;
        }
    }
    esft_cuda__route_kernel<<<(T + ESFT_CUDA__ROUTE_WARPS - 1) / ESFT_CUDA__ROUTE_WARPS, 32 * ESFT_CUDA__ROUTE_WARPS,
                              smem, c->stream>>>(ids, weights, probs, logits, T, p, flag);
    return esft_cuda__launched("route kernel", err);
}

/* The verdict on a flagged logit (~0: none), once the stream has finished, as
   the CPU router words it (the value read back says NaN or Inf). */
static esft_status esft_cuda__route_verdict(const float *logits, unsigned long long bad, int E, int in_layer,
                                            esft_error *err)
{
    float v;
    esft_status s;
    if (bad == ~0ULL) return ESFT_OK;
    if ((s = esft_cuda__read_bad(logits, bad, &v, err)) != ESFT_OK) return s;
    /* the CPU's MoE layer checks its logits itself and says "not finite" */
    return esft_cuda__fail(err, ESFT_ERR_NUMERIC, "router logit of token %llu, expert %llu is %s",
                           bad / (unsigned long long)E, bad % (unsigned long long)E,
                           in_layer ? "not finite" : isnan(v) ? "NaN" : "Inf");
}

/* Routes and waits for the verdict. */
static esft_status esft_cuda__route_run(esft_cuda__context *c, const esft_route_config *cfg, int32_t *ids,
                                        float *weights, float *probs, const float *logits, int T, esft_error *err)
{
    unsigned long long bad;
    esft_status s = esft_cuda__route_launch(c, cfg, ids, weights, probs, logits, T, c->flag + ESFT_CUDA__FLAG_OP,
                                            NULL, NULL, err);
    if (s == ESFT_OK) s = esft_cuda__take_flag(c, &bad, err);
    if (s == ESFT_OK) s = esft_cuda__route_verdict(logits, bad, cfg->n_experts, 0, err);
    return s;
}

static esft_status esft_cuda__route(void *context, const esft_route_config *cfg, int32_t *ids, float *weights,
                                    float *probs, const float *logits, int T, esft_error *err)
{
    esft_status s;
    if (T == 0) return ESFT_OK;
    if ((s = esft_cuda__need_device(ids, "ids", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(weights, "weights", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(probs, "probs", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(logits, "logits", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(cfg->selection_bias, "selection_bias", err)) != ESFT_OK)
        return s;
    return esft_cuda__route_run((esft_cuda__context *)context, cfg, ids, weights, probs, logits, T, err);
}

/* ===================================================================== */
/* 4. router-statistics kernel                                           */
/* ===================================================================== */

/* A grid-stride loop over (token, slot) pairs. Counts and fixed-point weights
   are integers, so atomic addition in any order gives the CPU's bits exactly.
   Each block sums its pairs into shared memory when 2E counters fit, then adds
   its 2E sums to the histogram: a grid of a few blocks per SM keeps the global
   atomics to a few per expert per block, whatever T. The op checks its input as
   the CPU op does (esft_stats_add never reads it): an id outside [0, E) or a
   weight not finite in [0, ESFT_MAX_GATE_WEIGHT] is flagged, masked tokens
   included; a gate sum that wraps its 64 bits (a sample past the fixed-point
   capacity), in a block's sums or the histogram's, sets the WRAP flag. */
#define ESFT_CUDA__STATS_THREADS 256
#define ESFT_CUDA__STATS_SHARED_E 1024
#define ESFT_CUDA__STATS_BLOCKS_PER_SM 4

/* esft__to_fixed: round(w * 2^32) in double; the product is exact, so a fused
   multiply-add would give the same bits as the CPU's multiply then add. */
__device__ static unsigned long long esft_cuda__to_fixed(float w)
{
    return (unsigned long long)__dadd_rn(__dmul_rn((double)w, 4294967296.0), 0.5);
}

/* *sum += v, noting a wrap of the 64 bits. */
__device__ static void esft_cuda__add_fixed(unsigned long long *sum, unsigned long long v, unsigned long long *wrapped)
{
    unsigned long long old = atomicAdd(sum, v);
    if (old + v < old) *wrapped = 1;
}

__global__ static void esft_cuda__stats_kernel(unsigned long long *count, unsigned long long *gate_sum,
                                               const int32_t *ids, const float *weights,
                                               const unsigned char *mask, int T, int K, int E,
                                               unsigned long long *flag, unsigned long long *wrapped)
{
    extern __shared__ unsigned long long esft_cuda__stats_smem[];
    bool local = E <= ESFT_CUDA__STATS_SHARED_E;
    unsigned long long *c = local ? esft_cuda__stats_smem : count;
    unsigned long long *g = local ? esft_cuda__stats_smem + E : gate_sum;
    size_t n = (size_t)T * (size_t)K, stride = (size_t)gridDim.x * blockDim.x;
    if (local) {
        for (int e = threadIdx.x; e < 2 * E; e += blockDim.x) esft_cuda__stats_smem[e] = 0;
        __syncthreads();
    }
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        int id = ids[i];
        float w = weights ? weights[i] : 0.0f;
        /* the CPU op's rule: an id in [0, E), a weight finite in [0, ESFT_MAX_GATE_WEIGHT] */
        if (id < 0 || id >= E || !(w >= 0.0f && w <= ESFT_MAX_GATE_WEIGHT)) atomicMin(flag, (unsigned long long)i);
        else if (!mask || mask[i / (size_t)K]) {
            atomicAdd(c + id, 1ULL);
            if (weights) esft_cuda__add_fixed(g + id, esft_cuda__to_fixed(w), wrapped);
        }
    }
    if (local) {
        __syncthreads();
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            if (c[e]) atomicAdd(count + e, c[e]);
            if (g[e]) esft_cuda__add_fixed(gate_sum + e, g[e], wrapped);
        }
    }
}

static esft_status esft_cuda__stats_accumulate(void *context, uint64_t *count, uint64_t *gate_sum,
                                               const int32_t *ids, const float *weights,
                                               const unsigned char *mask, int T, int K, int E, esft_error *err)
{
    esft_cuda__context *c = (esft_cuda__context *)context;
    size_t n = (size_t)T * (size_t)K, smem, blocks;
    unsigned long long bad, wrapped = 0;
    int32_t id = 0;
    float w = 0.0f;
    esft_status s;
    if (n == 0) return ESFT_OK;
    if ((s = esft_cuda__need_device(count, "count", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(gate_sum, "gate_sum", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(ids, "ids", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(weights, "weights", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(mask, "mask", err)) != ESFT_OK)
        return s;
    smem = E <= ESFT_CUDA__STATS_SHARED_E ? 2 * (size_t)E * sizeof(unsigned long long) : 0;
    s = esft_cuda__check(cudaMemsetAsync(c->flag + ESFT_CUDA__FLAG_WRAP, 0, sizeof *c->flag, c->stream), "clear wrap flag", err);
    if (s != ESFT_OK) return s;
    blocks = (n + ESFT_CUDA__STATS_THREADS - 1) / ESFT_CUDA__STATS_THREADS;
    if (blocks > (size_t)c->sm_count * ESFT_CUDA__STATS_BLOCKS_PER_SM)
        blocks = (size_t)c->sm_count * ESFT_CUDA__STATS_BLOCKS_PER_SM;
    esft_cuda__stats_kernel<<<(unsigned)blocks, ESFT_CUDA__STATS_THREADS, smem, c->stream>>>(
        (unsigned long long *)count, (unsigned long long *)gate_sum, ids, weights, mask, T, K, E, c->flag,
        c->flag + ESFT_CUDA__FLAG_WRAP);
    if ((s = esft_cuda__launched("stats kernel", err)) != ESFT_OK) return s;
    if ((s = esft_cuda__take_flag(c, &bad, err)) != ESFT_OK) return s;
    if (bad == ~0ULL) {
        s = esft_cuda__check(cudaMemcpy(&wrapped, c->flag + ESFT_CUDA__FLAG_WRAP, sizeof wrapped, cudaMemcpyDeviceToHost),
                             "read wrap flag", err);
        if (s == ESFT_OK && wrapped)
            s = esft_cuda__fail(err, ESFT_ERR_RANGE, "the sample's gate weights sum past the fixed-point capacity "
                                "(%.6g per sample)", ESFT_MAX_SAMPLE_WEIGHT);
        return s;
    }
    /* the culprit, named as the CPU op names it */
    s = esft_cuda__check(cudaMemcpy(&id, ids + bad, sizeof id, cudaMemcpyDeviceToHost), "read a bad id", err);
    if (s == ESFT_OK && weights)
        s = esft_cuda__check(cudaMemcpy(&w, weights + bad, sizeof w, cudaMemcpyDeviceToHost), "read a bad weight", err);
    if (s != ESFT_OK) return s;
    if (id < 0 || id >= E)
        return esft_cuda__fail(err, ESFT_ERR_RANGE, "token %llu: expert id %ld outside [0, %d)",
                               bad / (unsigned long long)K, (long)id, E);
    return esft_cuda__fail(err, isnan(w) || isinf(w) ? ESFT_ERR_NUMERIC : ESFT_ERR_RANGE,
                           "token %llu: weight %g is not a finite number in [0, %g]", bad / (unsigned long long)K,
                           (double)w, (double)ESFT_MAX_GATE_WEIGHT);
}

/* ===================================================================== */
/* 5. GEMMs (cuBLAS) and scratch                                         */
/* ===================================================================== */

/* cuBLAS results as statuses, with cuBLAS's own name and text. */
static esft_status esft_cuda__check_blas(cublasStatus_t st, const char *what, esft_error *err)
{
    if (st == CUBLAS_STATUS_SUCCESS) return ESFT_OK;
    return esft_cuda__fail(err, st == CUBLAS_STATUS_ALLOC_FAILED ? ESFT_ERR_OUT_OF_MEMORY : ESFT_ERR_BACKEND,
                           "cublas: %s: %s (%s)", what, cublasGetStatusString(st), cublasGetStatusName(st));
}

/* The cuBLAS handle, made on first use and bound to the backend's stream. */
static esft_status esft_cuda__blas(esft_cuda__context *c, esft_error *err)
{
    esft_status s;
    if (c->blas) return ESFT_OK;
    s = esft_cuda__check_blas(cublasCreate(&c->blas), "cublasCreate", err);
    if (s == ESFT_OK) s = esft_cuda__check_blas(cublasSetStream(c->blas, c->stream), "cublasSetStream", err);
    if (s != ESFT_OK && c->blas) {
        (void)cublasDestroy(c->blas);
        c->blas = NULL;
    }
    return s;
}

/* The math of the expert and shared-expert GEMMs, from ESFT_CUDA_MATH (read at
   each op, so a program can switch): "bf16" (default: bf16 tensor-core products
   of the fp32 tensors, fp32 accumulation; weights stay fp32 masters), "tf32", or
   "fp32" (full fp32, for comparisons with the CPU). Router GEMMs are always
   fp32: the top-K selection must not flip on rounding. */
static esft_status esft_cuda__math(cublasComputeType_t *out, esft_error *err)
{
    const char *m = getenv("ESFT_CUDA_MATH");
    if (!m || !*m || strcmp(m, "bf16") == 0) *out = CUBLAS_COMPUTE_32F_FAST_16BF;
    else if (strcmp(m, "tf32") == 0) *out = CUBLAS_COMPUTE_32F_FAST_TF32;
    else if (strcmp(m, "fp32") == 0) *out = CUBLAS_COMPUTE_32F;
    else return esft_cuda__fail(err, ESFT_ERR_INVALID_ARGUMENT, "ESFT_CUDA_MATH=%s: use bf16, tf32 or fp32", m);
    return ESFT_OK;
}

/* esft__sgemm's contract on the GPU: row-major C (M, N) = alpha op(A) op(B) +
   beta C, op(X) = X^T when tX. cuBLAS is column-major, where a row-major matrix
   reads as its transpose, so this computes C^T = op(B)^T op(A)^T. */
static esft_status esft_cuda__gemm(esft_cuda__context *c, cublasComputeType_t math, int ta, int tb, int M, int N,
                                   int K, float alpha, const float *A, int lda, const float *B, int ldb, float beta,
                                   float *C, int ldc, esft_error *err)
{
    if (M == 0 || N == 0) return ESFT_OK;
    return esft_cuda__check_blas(cublasGemmEx(c->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                              N, M, K, &alpha, B, CUDA_R_32F, ldb, A, CUDA_R_32F, lda, &beta, C,
                                              CUDA_R_32F, ldc, math, CUBLAS_GEMM_DEFAULT),
                                 "cublasGemmEx", err);
}

/* At least `bytes` of device scratch, kept between ops (grown, never shrunk). */
static esft_status esft_cuda__scratch(esft_cuda__context *c, size_t bytes, void **out, esft_error *err)
{
    if (bytes > c->scratch_bytes) {
        /* queued kernels may still use the old scratch: let them finish first */
        esft_status s = c->scratch ? esft_cuda__finish(c, "grow scratch", err) : ESFT_OK;
        if (s != ESFT_OK) return s;
        if (c->scratch) (void)cudaFree(c->scratch);
        c->scratch = NULL;
        c->scratch_bytes = 0;
        s = esft_cuda__check(cudaMalloc(&c->scratch, bytes), "cudaMalloc scratch", err);
        if (s != ESFT_OK) return s;
        c->scratch_bytes = bytes;
    }
    *out = c->scratch;
    return ESFT_OK;
}

/* At least n int32 of pinned host memory for per-op tables, kept between ops:
   pinned, so copies into it queue without waiting and one wait serves them all. */
static esft_status esft_cuda__host_table(esft_cuda__context *c, size_t n, esft_error *err)
{
    if (n > c->host_count) {
        esft_status s;
        if (c->host) (void)cudaFreeHost(c->host);
        c->host = NULL;
        c->host_count = 0;
        s = esft_cuda__check(cudaMallocHost((void **)&c->host, n * sizeof(int32_t)), "cudaMallocHost table", err);
        if (s != ESFT_OK) return s;
        c->host_count = n;
    }
    return ESFT_OK;
}

/* --- expert GEMM batches: one GEMM kind over every expert ---
   A batch lists one problem per expert (two for gate and up), all with the
   same transposes, leading dimensions and beta in esft_cuda__gemm's row-major
   terms, each with its own M, N, K and pointers. ESFT_CUDA_EXPERTS picks how a
   batch runs, so the ways can be measured side by side on one GPU:
     grouped   one cublasGemmGroupedBatchedEx per batch; problems of one shape
               in a row (an expert's gate and up) share a group;
     streams   one cublasGemmEx per problem, dealt over ESFT_CUDA__STREAMS side
               streams forked from the op stream and joined back to it;
     loop      one cublasGemmEx per problem on the op stream (the baseline);
     auto      (unset) grouped, or streams once cuBLAS has refused a grouped
               call for the math (remembered per math). A refusal is
               CUBLAS_STATUS_NOT_SUPPORTED, or INVALID_VALUE before any grouped
               call of that math has worked (cuBLAS versions differ in how they
               answer a compute type the grouped call lacks; after one success
               an error is a real error).
   Every problem writes its own C, and a batch's problems never share one (the
   two halves of the input gradient go in two batches), so the ways give the
   same products; only cuBLAS's choice of kernel can change the last bits. */
typedef enum esft_cuda__experts_mode {
    ESFT_CUDA__AUTO,
    ESFT_CUDA__GROUPED,
    ESFT_CUDA__STREAMED,
    ESFT_CUDA__LOOPED
} esft_cuda__experts_mode;

typedef struct esft_cuda__batch {
    int ta, tb, lda, ldb, ldc; /* row-major, as esft_cuda__gemm */
    float beta;
    int n, cap;                /* problems, room */
    int *M, *N, *K;            /* (cap) host */
    const float **A, **B;      /* (cap) host */
    float **C;
    unsigned char *group_tables; /* host room for the grouped call's per-group arrays */
} esft_cuda__batch;

/* One bit per compute type the expert GEMMs use. */
static unsigned esft_cuda__math_bit(cublasComputeType_t math)
{
    return math == CUBLAS_COMPUTE_32F ? 1u : math == CUBLAS_COMPUTE_32F_FAST_TF32 ? 2u : 4u;
}

static esft_status esft_cuda__experts_mode_get(esft_cuda__experts_mode *out, esft_error *err)
{
    const char *m = getenv("ESFT_CUDA_EXPERTS");
    if (!m || !*m || strcmp(m, "auto") == 0) *out = ESFT_CUDA__AUTO;
    else if (strcmp(m, "grouped") == 0) *out = ESFT_CUDA__GROUPED;
    else if (strcmp(m, "streams") == 0) *out = ESFT_CUDA__STREAMED;
    else if (strcmp(m, "loop") == 0) *out = ESFT_CUDA__LOOPED;
    else return esft_cuda__fail(err, ESFT_ERR_INVALID_ARGUMENT, "ESFT_CUDA_EXPERTS=%s: use auto, grouped, streams or loop",
                                m);
    return ESFT_OK;
}

/* What a layer op reads before it queues anything: the GEMM math
   (ESFT_CUDA_MATH), the way its expert batches run (ESFT_CUDA_EXPERTS, kept in
   the context for the op's batches, so a bad value can never stop an op midway
   and every batch of one op runs the same way), and the cuBLAS handle. */
static esft_status esft_cuda__layer_setup(esft_cuda__context *c, cublasComputeType_t *math, esft_error *err)
{
    esft_cuda__experts_mode mode = ESFT_CUDA__AUTO;
    esft_status s = esft_cuda__math(math, err);
    if (s == ESFT_OK) s = esft_cuda__experts_mode_get(&mode, err);
    if (s == ESFT_OK) c->experts_mode = (int)mode;
    if (s == ESFT_OK) s = esft_cuda__blas(c, err);
    return s;
}

/* Host bytes per problem: the batch's own arrays, then the grouped call's
   per-group arrays (a group per problem at most). */
#define ESFT_CUDA__BATCH_BYTES (3 * sizeof(int) + 3 * sizeof(void *) + 2 * sizeof(cublasOperation_t) + \
                                7 * sizeof(int) + 2 * sizeof(float))

/* An empty batch with room for cap problems (the context's host block). */
static esft_status esft_cuda__batch_begin(esft_cuda__context *c, esft_cuda__batch *b, int cap, int ta, int tb,
                                          int lda, int ldb, int ldc, float beta, esft_error *err)
{
    size_t bytes = (size_t)cap * ESFT_CUDA__BATCH_BYTES;
    unsigned char *at;
    if (bytes > c->batch_host_bytes) {
        void *p = realloc(c->batch_host, bytes);
        if (!p) return esft_cuda__fail(err, ESFT_ERR_OUT_OF_MEMORY, "cuda: GEMM batch of %d problems", cap);
        c->batch_host = p;
        c->batch_host_bytes = bytes;
    }
    at = (unsigned char *)c->batch_host; /* pointers first: the block is malloc-aligned */
    b->A = (const float **)at;
    b->B = (const float **)(at + (size_t)cap * sizeof(void *));
    b->C = (float **)(at + 2 * (size_t)cap * sizeof(void *));
    b->M = (int *)(at + 3 * (size_t)cap * sizeof(void *));
    b->N = b->M + cap;
    b->K = b->N + cap;
    b->group_tables = (unsigned char *)(b->K + cap);
    b->ta = ta;
    b->tb = tb;
    b->lda = lda;
    b->ldb = ldb;
    b->ldc = ldc;
    b->beta = beta;
    b->n = 0;
    b->cap = cap;
    return ESFT_OK;
}

/* Adds C (M, N) = op(A) op(B) (+ beta C); empty problems are left out. */
static void esft_cuda__batch_add(esft_cuda__batch *b, int M, int N, int K, const float *A, const float *B, float *C)
{
    if (M == 0 || N == 0 || b->n >= b->cap) return; /* cap is every caller's exact bound */
    b->M[b->n] = M;
    b->N[b->n] = N;
    b->K[b->n] = K;
    b->A[b->n] = A;
    b->B[b->n] = B;
    b->C[b->n] = C;
    b->n++;
}

static esft_status esft_cuda__batch_loop(esft_cuda__context *c, const esft_cuda__batch *b, cublasComputeType_t math,
                                         esft_error *err)
{
    esft_status s = ESFT_OK;
    for (int i = 0; i < b->n && s == ESFT_OK; i++)
        s = esft_cuda__gemm(c, math, b->ta, b->tb, b->M[i], b->N[i], b->K[i], 1.0f, b->A[i], b->lda, b->B[i],
                            b->ldb, b->beta, b->C[i], b->ldc, err);
    return s;
}

/* The side streams, their handles and the fork/join events, made on first use. */
static esft_status esft_cuda__sides(esft_cuda__context *c, esft_error *err)
{
    esft_status s = ESFT_OK;
    if (c->sides_ready) return ESFT_OK;
    s = esft_cuda__check(cudaEventCreateWithFlags(&c->fork, cudaEventDisableTiming), "cudaEventCreate", err);
    for (int i = 0; i < ESFT_CUDA__STREAMS && s == ESFT_OK; i++) {
        s = esft_cuda__check(cudaStreamCreateWithFlags(&c->side[i], cudaStreamNonBlocking), "cudaStreamCreate", err);
        if (s == ESFT_OK)
            s = esft_cuda__check(cudaEventCreateWithFlags(&c->join[i], cudaEventDisableTiming), "cudaEventCreate", err);
        if (s == ESFT_OK) s = esft_cuda__check_blas(cublasCreate(&c->side_blas[i]), "cublasCreate", err);
        if (s == ESFT_OK)
            s = esft_cuda__check_blas(cublasSetStream(c->side_blas[i], c->side[i]), "cublasSetStream", err);
    }
    if (s == ESFT_OK) c->sides_ready = 1; /* a failure keeps what was made, freed at exit with the process */
    return s;
}

/* One problem per side stream in turn, forked after the op stream's work so
   far and joined before its next. */
static esft_status esft_cuda__batch_streams(esft_cuda__context *c, const esft_cuda__batch *b,
                                            cublasComputeType_t math, esft_error *err)
{
    const float one = 1.0f;
    int used = b->n < ESFT_CUDA__STREAMS ? b->n : ESFT_CUDA__STREAMS;
    esft_status s = esft_cuda__sides(c, err);
    if (s == ESFT_OK) s = esft_cuda__check(cudaEventRecord(c->fork, c->stream), "cudaEventRecord", err);
    for (int i = 0; i < used && s == ESFT_OK; i++)
        s = esft_cuda__check(cudaStreamWaitEvent(c->side[i], c->fork, 0), "cudaStreamWaitEvent", err);
    for (int i = 0; i < b->n && s == ESFT_OK; i++) {
        int k = i % ESFT_CUDA__STREAMS;
        /* column-major: C^T = op(B)^T op(A)^T, as esft_cuda__gemm */
        s = esft_cuda__check_blas(cublasGemmEx(c->side_blas[k], b->tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                                               b->ta ? CUBLAS_OP_T : CUBLAS_OP_N, b->N[i], b->M[i], b->K[i], &one,
                                               b->B[i], CUDA_R_32F, b->ldb, b->A[i], CUDA_R_32F, b->lda, &b->beta,
                                               b->C[i], CUDA_R_32F, b->ldc, math, CUBLAS_GEMM_DEFAULT),
                                  "cublasGemmEx (side stream)", err);
    }
    /* joined even after a failure, so the op stream never runs ahead of a side */
    for (int i = 0; i < used; i++) {
        esft_status j = esft_cuda__check(cudaEventRecord(c->join[i], c->side[i]), "cudaEventRecord", err);
        if (j == ESFT_OK) j = esft_cuda__check(cudaStreamWaitEvent(c->stream, c->join[i], 0), "cudaStreamWaitEvent", err);
        if (s == ESFT_OK) s = j;
    }
    return s;
}

/* Device room for the grouped call's pointer arrays (3 per problem). They are
   rewritten by the next batch's copy, which the op stream orders after this
   batch's GEMMs, so one array serves every batch. */
static esft_status esft_cuda__batch_pointers(esft_cuda__context *c, size_t count, esft_error *err)
{
    if (count > c->batch_dev_count) {
        esft_status s = ESFT_OK;
        /* the old array may still feed a queued GEMM */
        if (c->batch_dev) s = esft_cuda__finish(c, "grow pointer arrays", err);
        if (c->batch_dev && s == ESFT_OK) (void)cudaFree(c->batch_dev);
        if (s != ESFT_OK) return s;
        c->batch_dev = NULL;
        c->batch_dev_count = 0;
        s = esft_cuda__check(cudaMalloc((void **)&c->batch_dev, count * sizeof(void *)), "cudaMalloc pointer arrays",
                             err);
        if (s != ESFT_OK) return s;
        c->batch_dev_count = count;
    }
    return ESFT_OK;
}

/* One cublasGemmGroupedBatchedEx: groups of consecutive problems of one shape.
   The per-group arrays are host memory, the pointer arrays device memory
   (cuBLAS's contract); in column-major terms cuBLAS's A is our B, as in
   esft_cuda__gemm. Sets *refused when cuBLAS refuses the call (see auto above),
   so the caller can fall back. */
static esft_status esft_cuda__batch_grouped(esft_cuda__context *c, const esft_cuda__batch *b,
                                            cublasComputeType_t math, int *refused, esft_error *err)
{
    cublasOperation_t *opa = (cublasOperation_t *)b->group_tables, *opb = opa + b->cap;
    int *m = (int *)(opb + b->cap), *n = m + b->cap, *k = n + b->cap, *lda = k + b->cap, *ldb = lda + b->cap;
    int *ldc = ldb + b->cap, *size = ldc + b->cap, groups = 0;
    float *alpha = (float *)(size + b->cap), *beta = alpha + b->cap;
    const void **ptrs = (const void **)b->A; /* A, B, C lie in a row on the host: one copy */
    cublasStatus_t st;
    esft_status s;
    *refused = 0;
    if (b->n == 0) return ESFT_OK;
    for (int i = 0; i < b->n; i++) {
        if (groups > 0 && b->M[i] == n[groups - 1] && b->N[i] == m[groups - 1] && b->K[i] == k[groups - 1]) {
            size[groups - 1]++;
            continue;
        }
        opa[groups] = b->tb ? CUBLAS_OP_T : CUBLAS_OP_N;
        opb[groups] = b->ta ? CUBLAS_OP_T : CUBLAS_OP_N;
        m[groups] = b->N[i];
        n[groups] = b->M[i];
        k[groups] = b->K[i];
        lda[groups] = b->ldb;
        ldb[groups] = b->lda;
        ldc[groups] = b->ldc;
        alpha[groups] = 1.0f;
        beta[groups] = b->beta;
        size[groups] = 1;
        groups++;
    }
    if ((s = esft_cuda__batch_pointers(c, 3 * (size_t)b->cap, err)) != ESFT_OK) return s;
    /* host A, B, C arrays are cap apart; the device copy packs each at cap too */
    s = esft_cuda__check(cudaMemcpyAsync(c->batch_dev, ptrs, 3 * (size_t)b->cap * sizeof(void *),
                                         cudaMemcpyHostToDevice, c->stream), "upload pointer arrays", err);
    if (s != ESFT_OK) return s;
    st = cublasGemmGroupedBatchedEx(c->blas, opa, opb, m, n, k, alpha, (const void *const *)(c->batch_dev + b->cap),
                                    CUDA_R_32F, lda, (const void *const *)c->batch_dev, CUDA_R_32F, ldb, beta,
                                    (void *const *)(c->batch_dev + 2 * (size_t)b->cap), CUDA_R_32F, ldc, groups, size,
                                    math);
    if (st == CUBLAS_STATUS_SUCCESS) c->grouped_worked |= esft_cuda__math_bit(math);
    *refused = st == CUBLAS_STATUS_NOT_SUPPORTED ||
               (st == CUBLAS_STATUS_INVALID_VALUE && !(c->grouped_worked & esft_cuda__math_bit(math)));
    return esft_cuda__check_blas(st, "cublasGemmGroupedBatchedEx", err);
}

/* Runs a batch the way ESFT_CUDA_EXPERTS says. */
static esft_status esft_cuda__batch_run(esft_cuda__context *c, const esft_cuda__batch *b, cublasComputeType_t math,
                                        esft_error *err)
{
    esft_cuda__experts_mode mode = (esft_cuda__experts_mode)c->experts_mode;
    esft_status s;
    int refused;
    if (b->n == 0) return ESFT_OK;
    if (mode == ESFT_CUDA__LOOPED) return esft_cuda__batch_loop(c, b, math, err);
    if (mode == ESFT_CUDA__STREAMED || (mode == ESFT_CUDA__AUTO && (c->grouped_refused & esft_cuda__math_bit(math))))
        return esft_cuda__batch_streams(c, b, math, err);
    s = esft_cuda__batch_grouped(c, b, math, &refused, err);
    if (!refused || mode == ESFT_CUDA__GROUPED) return s;
    c->grouped_refused |= esft_cuda__math_bit(math);
    return esft_cuda__batch_streams(c, b, math, err);
}

/* ===================================================================== */
/* 6. MoE layer: forward and backward                                    */
/* ===================================================================== */

/* The workspace is the caller's, sized by esft_moe_workspace_size(), carved
   by esft.h's published layout (esft_moe_workspace_view_at): one owner, so a
   forward on one backend can be followed by the backward on another. The
   regions of the gated shared block, aux_offsets and route_tmp are the CPU's
   and unused here. */
typedef esft_moe_workspace_view esft_cuda__moe_ws;

/* --- elementwise kernels: the CPU's formulas, one thread per element --- */

__device__ static float esft_cuda__sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

/* act = silu(g) * u (esft__swiglu_forward). */
__global__ static void esft_cuda__swiglu_kernel(float *act, const float *g, const float *u, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        act[i] = g[i] * esft_cuda__sigmoid(g[i]) * u[i];
}

/* From dact in b and the saved g, u: b <- dg, a <- du (esft__swiglu_backward). */
__global__ static void esft_cuda__swiglu_back_kernel(float *a, float *b, const float *g, const float *u, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float s = esft_cuda__sigmoid(g[i]), silu = g[i] * s, da = b[i];
        b[i] = da * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
        a[i] = da * silu;
    }
}

static unsigned esft_cuda__grid(size_t n, unsigned threads)
{
    size_t blocks = (n + threads - 1) / threads;
    return (unsigned)(blocks > 65535 * 8 ? 65535 * 8 : blocks ? blocks : 1);
}

/* --- the permutation by expert: a stable counting sort ---
   Slots are cut into chunks of ESFT_CUDA__CHUNK; (1) the routing kernel counts
   each chunk's selections per expert as it writes them (integer atomics: the
   same counts in any order), (2) one block turns the counts into each chunk's
   first position per expert and writes offsets, (3) one warp per chunk places
   its slots in order, 32 at a time, ranking equal experts with
   __match_any_sync. Stable, so perm and pos are the CPU's exactly (slot order
   within an expert). */

__global__ static void esft_cuda__scan_kernel(int32_t *counts, int32_t *offsets, int n_chunks, int E)
{
    extern __shared__ int32_t esft_cuda__scan_smem[]; /* (E + 1) */
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int run = 0;
        for (int b = 0; b < n_chunks; b++) {
            int v = counts[(size_t)b * E + e];
            counts[(size_t)b * E + e] = run;
            run += v;
        }
        esft_cuda__scan_smem[e + 1] = run;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        esft_cuda__scan_smem[0] = 0;
        for (int e = 0; e < E; e++) esft_cuda__scan_smem[e + 1] += esft_cuda__scan_smem[e];
    }
    __syncthreads();
    for (int e = threadIdx.x; e <= E; e += blockDim.x) offsets[e] = esft_cuda__scan_smem[e];
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        for (int b = 0; b < n_chunks; b++) counts[(size_t)b * E + e] += esft_cuda__scan_smem[e];
}

__global__ static void esft_cuda__place_kernel(int32_t *perm, int32_t *pos, const int32_t *ids,
                                               const int32_t *base, int n, int E)
{
    extern __shared__ int32_t esft_cuda__place_smem[]; /* (E) next position per expert */
    int lane = threadIdx.x, start = blockIdx.x * ESFT_CUDA__CHUNK, end = min(n, start + ESFT_CUDA__CHUNK);
    for (int e = lane; e < E; e += 32) esft_cuda__place_smem[e] = base[(size_t)blockIdx.x * E + e];
    __syncwarp();
    for (int i0 = start; i0 < end; i0 += 32) {
        int i = i0 + lane, id = i < end ? ids[i] : -1;
        unsigned peers = __match_any_sync(0xffffffffu, id);
        int rank = __popc(peers & ((1u << lane) - 1u));
        if (id >= 0) {
            int p = esft_cuda__place_smem[id] + rank;
            perm[p] = i;
            if (pos) pos[i] = p;
        }
        __syncwarp();
        if (id >= 0 && lane == __ffs(peers) - 1) esft_cuda__place_smem[id] += __popc(peers);
        __syncwarp();
    }
}

/* Bytes of the chunk histograms (chunks, E) for n slots. */
static size_t esft_cuda__chunk_bytes(int n, int E)
{
    return (size_t)((n + ESFT_CUDA__CHUNK - 1) / ESFT_CUDA__CHUNK) * (size_t)E * sizeof(int32_t);
}

/* Queues the zeroing of the chunk histograms at counts, for the routing kernel
   to fill and esft_cuda__sort_slots to use. */
static esft_status esft_cuda__zero_chunk_counts(esft_cuda__context *c, int32_t *counts, int n, int E, esft_error *err)
{
    return esft_cuda__check(cudaMemsetAsync(counts, 0, esft_cuda__chunk_bytes(n, E), c->stream),
                            "zero the chunk histograms", err);
}

/* The zeroed chunk histograms for n slots in the context's scratch (the MoE's;
   the PESC ops place theirs after their rows, esft_cuda__pesc_rows_at). */
static esft_status esft_cuda__chunk_counts(esft_cuda__context *c, int n, int E, int32_t **counts, esft_error *err)
{
    void *scratch;
    esft_status s = esft_cuda__scratch(c, esft_cuda__chunk_bytes(n, E), &scratch, err);
    if (s != ESFT_OK) return s;
    *counts = (int32_t *)scratch;
    return esft_cuda__zero_chunk_counts(c, *counts, n, E, err);
}

/* esft.h's esft__sort_slots on the device, for both layers: order[p] is the
   slot at sorted position p, pos (NULL: not wanted) its inverse, expert e's
   positions are [offsets[e], offsets[e+1]). n >= 1; ids in [0, E) and counts
   filled by the routing kernel that wrote them (esft_cuda__chunk_counts). */
static esft_status esft_cuda__sort_slots(esft_cuda__context *c, int32_t *order, int32_t *pos, int32_t *offsets,
                                         const int32_t *ids, int32_t *counts, int n, int E, esft_error *err)
{
    int n_chunks = (n + ESFT_CUDA__CHUNK - 1) / ESFT_CUDA__CHUNK;
    size_t smem = (size_t)(E + 1) * sizeof(int32_t);
    esft_cuda__scan_kernel<<<1, 256, smem, c->stream>>>(counts, offsets, n_chunks, E);
    esft_cuda__place_kernel<<<n_chunks, 32, smem, c->stream>>>(order, pos, ids, counts, n, E);
    return esft_cuda__launched("permutation kernels", err);
}

/* --- gather, combine, scatter: one block per row, threads over D --- */

/* xg[p] = x[token of slot perm[p]]. */
__global__ static void esft_cuda__gather_kernel(float *xg, const float *x, const int32_t *perm, int K, int D)
{
    const float *src = x + (size_t)(perm[blockIdx.x] / K) * D;
    float *dst = xg + (size_t)blockIdx.x * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
}

/* y[t] += sum_j w[t,j] o[pos[t,j]], in slot order as the CPU (deterministic). */
__global__ static void esft_cuda__combine_kernel(float *y, const float *o, const float *weights, const int32_t *pos,
                                                 int K, int D)
{
    size_t t = blockIdx.x;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = y[t * D + d];
        for (int j = 0; j < K; j++) acc += weights[t * K + j] * o[(size_t)pos[t * K + j] * D + d];
        y[t * D + d] = acc;
    }
}

/* dx[t] += sum_j d[pos[t,j]], in slot order. */
__global__ static void esft_cuda__scatter_kernel(float *dx, const float *dd, const int32_t *pos, int K, int D)
{
    size_t t = blockIdx.x;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = dx[t * D + d];
        for (int j = 0; j < K; j++) acc += dd[(size_t)pos[t * K + j] * D + d];
        dx[t * D + d] = acc;
    }
}

/* Row r of the sorted slots: dO = w * dy[t] into dd, and dL/dw = dy[t] . o. */
__global__ static void esft_cuda__dout_kernel(float *dd, float *dw, const float *dy, const float *o,
                                              const float *weights, const int32_t *perm, int K, int D)
{
    __shared__ float part[32];
    size_t r = blockIdx.x;
    int slot = perm[r], lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const float *g = dy + (size_t)(slot / K) * D, *orow = o + r * D;
    float wt = weights[slot], dot = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        dd[r * D + d] = wt * g[d];
        dot += g[d] * orow[d];
    }
    dot = esft_cuda__warp_sum(dot);
    if (lane == 0) part[warp] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int i = 0; i < (int)(blockDim.x / 32); i++) sum += part[i];
        dw[slot] = sum;
    }
}

/* --- auxiliary loss --- */

/* One block per sequence. The block first counts the sequence's selections per
   expert into shared memory (integer atomics over all its threads: exact in any
   order), then each thread takes an expert and forms the CPU's double sums in
   the CPU's order (esft__moe_aux_forward / esft__balance): P adds the same
   floats token by token, f_e = count / (S K), the term f_e (P / S), and the
   coefficient from f_e rounded to float first, as the CPU stores it. The host
   adds each sequence's terms in expert order and scales the sum, as the CPU. */
__global__ static void esft_cuda__aux_kernel(double *terms, float *coef, const int32_t *ids, const float *probs,
                                             int S, int K, int E, double scale)
{
    extern __shared__ int esft_cuda__aux_count[]; /* (E) */
    int s = blockIdx.x;
    const int32_t *seq_ids = ids + (size_t)s * S * K;
    for (int e = threadIdx.x; e < E; e += blockDim.x) esft_cuda__aux_count[e] = 0;
    __syncthreads();
    for (size_t i = threadIdx.x; i < (size_t)S * K; i += blockDim.x) atomicAdd(esft_cuda__aux_count + seq_ids[i], 1);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        double P = 0.0, f = __ddiv_rn((double)esft_cuda__aux_count[e], (double)S * K);
        for (int t = s * S; t < (s + 1) * S; t++) P = __dadd_rn(P, (double)probs[(size_t)t * E + e]);
        terms[(size_t)s * E + e] = __dmul_rn(f, __ddiv_rn(P, (double)S));
        coef[(size_t)s * E + e] = (float)__ddiv_rn(__dmul_rn(scale, (double)(float)f), (double)S);
    }
}

/* Tokens per aux-loss sequence: aux_seq_len when the loss is on per sequence,
   else all T (aux_seq_len may be 0 when the loss is off: never a divisor then). */
static int esft_cuda__aux_len(const esft_moe_config *cfg, int T)
{
    return cfg->aux_alpha > 0.0f && cfg->aux_mode == ESFT_AUX_SEQUENCE && cfg->aux_seq_len > 0 ? cfg->aux_seq_len
                                                                                               : (T > 0 ? T : 1);
}

/* Loss = the terms added one by one in (sequence, expert) order, as the CPU. */
static esft_status esft_cuda__aux_forward(esft_cuda__context *c, const esft_moe_config *cfg, esft_cuda__moe_ws *w,
                                          int T, float *aux_loss, esft_error *err)
{
    int E = cfg->route.n_experts, K = cfg->route.top_k;
    int S = esft_cuda__aux_len(cfg, T), n_seq = T / S, i;
    size_t n = (size_t)n_seq * E;
    double loss = 0.0, *terms, scale = (double)cfg->aux_alpha * E / n_seq;
    void *scratch;
    esft_status s;
    if (cfg->aux_alpha == 0.0f) { *aux_loss = 0.0f; return ESFT_OK; }
    if ((s = esft_cuda__scratch(c, n * sizeof(double), &scratch, err)) != ESFT_OK) return s;
    esft_cuda__aux_kernel<<<n_seq, 128, (size_t)E * sizeof(int), c->stream>>>(
        (double *)scratch, w->aux_coef, w->ids, w->probs, S, K, E, scale);
    if ((s = esft_cuda__launched("aux kernel", err)) != ESFT_OK) return s;
    terms = (double *)malloc(n * sizeof(double));
    if (!terms) return esft_cuda__fail(err, ESFT_ERR_OUT_OF_MEMORY, "cuda: %lu aux terms", (unsigned long)n);
    s = esft_cuda__check(cudaMemcpyAsync(terms, scratch, n * sizeof(double), cudaMemcpyDeviceToHost, c->stream),
                         "download aux terms", err);
    if (s == ESFT_OK) s = esft_cuda__finish(c, "aux kernel", err);
    for (i = 0; s == ESFT_OK && i < n_seq; i++) { /* the CPU's order: a sequence's balance, then scaled */
        double balance = 0.0;
        for (int e = 0; e < E; e++) balance += terms[(size_t)i * E + e];
        loss += scale * balance;
    }
    free(terms);
    if (s == ESFT_OK) *aux_loss = (float)loss;
    return s;
}

/* --- router backward: one warp per token (esft__moe_route_backward_token) --- */

__global__ static void esft_cuda__route_back_kernel(float *dl_all, const float *probs, const int32_t *ids_all,
                                                    const float *dw_all, const float *aux_coef, int T, int E, int K,
                                                    int S, int renormalize, int sigmoid, float scale)
{
    int lane = threadIdx.x % 32, t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    float *dl;
    const float *p, *dw, *aux;
    const int32_t *ids;
    if (t >= T) return;
    dl = dl_all + (size_t)t * E;
    p = probs + (size_t)t * E;
    ids = ids_all + (size_t)t * K;
    dw = dw_all + (size_t)t * K;
    aux = aux_coef ? aux_coef + (size_t)(t / S) * E : NULL;
    for (int e = lane; e < E; e += 32) dl[e] = aux ? aux[e] : 0.0f; /* dL/dp first */
    __syncwarp();
    if (lane == 0) {
        if (renormalize) {
            float s = 0.0f, dot = 0.0f;
            for (int j = 0; j < K; j++) s += p[ids[j]];
            s += 1e-20f;
            for (int j = 0; j < K; j++) dot += dw[j] * p[ids[j]];
            for (int j = 0; j < K; j++) dl[ids[j]] += scale * (dw[j] / s - dot / (s * s));
        } else {
            for (int j = 0; j < K; j++) dl[ids[j]] += scale * dw[j];
        }
    }
    __syncwarp();
    if (!sigmoid) {
        float dot = 0.0f;
        for (int e = lane; e < E; e += 32) dot += p[e] * dl[e];
        dot = esft_cuda__warp_sum(dot);
        for (int e = lane; e < E; e += 32) dl[e] = p[e] * (dl[e] - dot);
    } else {
        for (int e = lane; e < E; e += 32) dl[e] *= p[e] * (1.0f - p[e]);
    }
}

/* --- the layer --- */

/* Expert e's gate, up, down (its trainable copy or the frozen tensors) and its
   gradients (NULL when frozen), from the layer's slot table (host memory). */
static void esft_cuda__expert(const esft_moe *m, int e, const float **W, float **G)
{
    const int32_t *slot = m->slot;
    size_t fd = (size_t)m->cfg.d_expert * (size_t)m->cfg.d_model;
    for (int i = 0; i < 3; i++) {
        if (slot[e] >= 0) {
            W[i] = m->params + ((size_t)slot[e] * 3 + (size_t)i) * fd;
            G[i] = m->grads + ((size_t)slot[e] * 3 + (size_t)i) * fd;
        } else {
            const float *base = i == 0 ? m->frozen.gate : i == 1 ? m->frozen.up : m->frozen.down;
            W[i] = base + (size_t)e * fd;
            G[i] = NULL;
        }
    }
}

static const float *esft_cuda__router_w(const esft_moe *m) { return m->router ? m->router : m->frozen.router; }
static const float *esft_cuda__shared_w(const esft_moe *m, int i)
{
    if (i == 0) return m->shared_gate ? m->shared_gate : m->frozen.shared_gate;
    if (i == 1) return m->shared_up ? m->shared_up : m->frozen.shared_up;
    return m->shared_down ? m->shared_down : m->frozen.shared_down;
}

/* Checks the memory space of the layer's tensors and of the call's arrays. */
static esft_status esft_cuda__moe_check(const esft_moe *m, const void *out, const float *in, const float *x,
                                        const void *workspace, esft_error *err)
{
    const esft_moe_config *c = &m->cfg;
    esft_status s;
    if (c->shared_gated) /* Qwen2-MoE's gated shared expert: CPU backend only, for now */
        return esft_cuda__fail(err, ESFT_ERR_UNSUPPORTED, "cuda moe: a gated shared block (shared_gated) is not implemented");
    if ((s = esft_cuda__need_device(out, "output", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(in, "input", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(x, "x", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(workspace, "workspace", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(esft_cuda__router_w(m), "router weight", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(m->frozen.gate, "expert weights", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(m->frozen.up, "expert weights", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(m->frozen.down, "expert weights", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(m->n_params ? m->params : NULL, "layer params", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(m->n_params ? m->grads : NULL, "layer grads", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(c->route.selection_bias, "selection_bias", err)) != ESFT_OK)
        return s;
    if (c->d_shared > 0)
        for (int i = 0; i < 3; i++)
            if ((s = esft_cuda__need_device(esft_cuda__shared_w(m, i), "shared weights", err)) != ESFT_OK) return s;
    return ESFT_OK;
}

/* Queues the copy of E + 1 expert offsets into the pinned host table (both
   layers launch their per-expert GEMMs from the host); valid after the op's
   next wait. */
static esft_status esft_cuda__queue_offsets(esft_cuda__context *c, const int32_t *device_offsets, int E,
                                            int32_t **offsets, esft_error *err)
{
    esft_status s = esft_cuda__host_table(c, (size_t)E + 1, err);
    if (s != ESFT_OK) return s;
    *offsets = c->host;
    return esft_cuda__check(cudaMemcpyAsync(*offsets, device_offsets, (size_t)(E + 1) * sizeof(int32_t),
                                            cudaMemcpyDeviceToHost, c->stream), "read expert offsets", err);
}

/* The expert offsets (E + 1) on the host, with the deferred flags, in one wait:
   the expert GEMM batches are built on the host. (The slot table is the
   layer's host memory: esft_moe_init allocates it with the layer's allocator.) */
static esft_status esft_cuda__moe_tables(esft_cuda__context *c, const esft_moe *m, const esft_cuda__moe_ws *w,
                                         int32_t **offsets, esft_error *err)
{
    esft_status s = esft_cuda__queue_offsets(c, w->offsets, m->cfg.route.n_experts, offsets, err);
    if (s == ESFT_OK) s = esft_cuda__queue_flags(c, err);
    if (s == ESFT_OK) s = esft_cuda__finish(c, "read expert tables", err);
    return s;
}

/* A forward refused by the routing step (too many experts, a CUDA or cuBLAS
   error) after x's check was queued: the CPU checks x first, so a bad
   x is named instead; else the routing's own error (`failed`, in err). */
static esft_status esft_cuda__x_before(esft_cuda__context *c, const float *x, int D, esft_status failed,
                                       esft_error *err)
{
    esft_error mine;
    unsigned long long bad;
    esft_status s = esft_cuda__queue_flags(c, &mine);
    if (s == ESFT_OK) s = esft_cuda__finish(c, "read the check of x", &mine);
    if (s == ESFT_OK) s = esft_cuda__deferred(c, ESFT_CUDA__FLAG_INPUT, &bad, &mine);
    if (s == ESFT_OK && bad != ~0ULL) return esft_cuda__finite_verdict(x, bad, "x", (size_t)D, err);
    return failed;
}

/* The verdicts deferred to the tables' wait: the op's input (x or dy) first,
   then the router logits (a finite x with NaN router weights). */
static esft_status esft_cuda__moe_verdicts(esft_cuda__context *c, const float *input, const char *what, int D,
                                           const float *bias, const float *logits, int E, esft_error *err)
{
    unsigned long long bad_input, bad_bias, bad_logit;
    esft_status s = esft_cuda__deferred(c, ESFT_CUDA__FLAG_INPUT, &bad_input, err);
    if (s == ESFT_OK) s = esft_cuda__deferred(c, ESFT_CUDA__FLAG_BIAS, &bad_bias, err);
    if (s == ESFT_OK) s = esft_cuda__deferred(c, ESFT_CUDA__FLAG_LOGITS, &bad_logit, err);
    if (s == ESFT_OK) s = esft_cuda__finite_verdict(input, bad_input, what, (size_t)D, err);
    if (s == ESFT_OK && bad_bias != ~0ULL) { /* a bad argument, as the CPU router words it */
        esft_error where;
        s = esft_cuda__finite_verdict(bias, bad_bias, "selection_bias", 0, &where);
        if (s == ESFT_ERR_NUMERIC) return esft_cuda__fail(err, ESFT_ERR_INVALID_ARGUMENT, "%s", where.message);
        if (s != ESFT_OK && err) *err = where;
    }
    if (s == ESFT_OK) s = esft_cuda__route_verdict(logits, bad_logit, E, 1, err);
    return s;
}

/* Routed experts forward: one batch of gate and up GEMMs over every expert,
   one fused SwiGLU over all rows, one batch of down GEMMs. */
static esft_status esft_cuda__experts_forward(esft_cuda__context *c, const esft_moe *m, esft_cuda__moe_ws *w,
                                              const int32_t *off, int T, cublasComputeType_t math, esft_error *err)
{
    int D = m->cfg.d_model, F = m->cfg.d_expert, E = m->cfg.route.n_experts, K = m->cfg.route.top_k;
    size_t nf = (size_t)T * K * F;
    const float *W[3];
    float *G[3];
    esft_cuda__batch b;
    esft_status s = esft_cuda__batch_begin(c, &b, 2 * E, 0, 1, D, D, F, 0.0f, err);
    if (s != ESFT_OK) return s;
    for (int e = 0; e < E; e++) { /* g = xg Wg^T, u = xg Wu^T */
        int n = off[e + 1] - off[e];
        size_t rf = (size_t)off[e] * F, rd = (size_t)off[e] * D;
        esft_cuda__expert(m, e, W, G);
        esft_cuda__batch_add(&b, n, F, D, w->xg + rd, W[0], w->g + rf);
        esft_cuda__batch_add(&b, n, F, D, w->xg + rd, W[1], w->u + rf);
    }
    if ((s = esft_cuda__batch_run(c, &b, math, err)) != ESFT_OK) return s;
    esft_cuda__swiglu_kernel<<<esft_cuda__grid(nf, 256), 256, 0, c->stream>>>(w->a, w->g, w->u, nf);
    if ((s = esft_cuda__launched("swiglu kernel", err)) != ESFT_OK) return s;
    if ((s = esft_cuda__batch_begin(c, &b, E, 0, 1, F, F, D, 0.0f, err)) != ESFT_OK) return s;
    for (int e = 0; e < E; e++) { /* o = act Wd^T */
        esft_cuda__expert(m, e, W, G);
        esft_cuda__batch_add(&b, off[e + 1] - off[e], D, F, w->a + (size_t)off[e] * F, W[2], w->o + (size_t)off[e] * D);
    }
    return esft_cuda__batch_run(c, &b, math, err);
}

/* The shared SwiGLU block writes y (or y = 0 without one). */
static esft_status esft_cuda__shared_forward(esft_cuda__context *c, const esft_moe *m, esft_cuda__moe_ws *w,
                                             float *y, const float *x, int T, cublasComputeType_t math,
                                             esft_error *err)
{
    int D = m->cfg.d_model, FS = m->cfg.d_shared;
    size_t n = (size_t)T * FS;
    esft_status s;
    if (FS == 0) return esft_cuda__check(cudaMemsetAsync(y, 0, (size_t)T * D * sizeof(float), c->stream), "memset y", err);
    s = esft_cuda__gemm(c, math, 0, 1, T, FS, D, 1.0f, x, D, esft_cuda__shared_w(m, 0), D, 0.0f, w->gs, FS, err);
    if (s == ESFT_OK)
        s = esft_cuda__gemm(c, math, 0, 1, T, FS, D, 1.0f, x, D, esft_cuda__shared_w(m, 1), D, 0.0f, w->us, FS, err);
    if (s != ESFT_OK) return s;
    esft_cuda__swiglu_kernel<<<esft_cuda__grid(n, 256), 256, 0, c->stream>>>(w->as, w->gs, w->us, n);
    if ((s = esft_cuda__launched("swiglu kernel", err)) != ESFT_OK) return s;
    return esft_cuda__gemm(c, math, 0, 1, T, D, FS, 1.0f, w->as, FS, esft_cuda__shared_w(m, 2), FS, 0.0f, y, D, err);
}

/* Two waits per forward: one for the expert offsets (the GEMM batches are
   built on the host) that also brings the verdicts on x and the logits, before
   anything of the caller's is written; one at the end for the aux loss and the
   verdict on y. */
static esft_status esft_cuda__moe_forward(void *context, const esft_moe *m, float *y, float *aux_loss, const float *x,
                                          void *workspace, int T, esft_error *err)
{
    esft_cuda__context *c = (esft_cuda__context *)context;
    const esft_moe_config *cfg = &m->cfg;
    int D = cfg->d_model, E = cfg->route.n_experts, K = cfg->route.top_k, n = T * K;
    int32_t *off, *counts = NULL;
    unsigned long long bad_y;
    cublasComputeType_t math;
    esft_cuda__moe_ws w;
    esft_status s;
    if ((s = esft_cuda__moe_check(m, y, x, x, workspace, err)) != ESFT_OK) return s;
    if ((s = esft_cuda__layer_setup(c, &math, err)) != ESFT_OK) return s;
    if ((s = esft_moe_workspace_view_at(cfg, T, workspace, &w, err)) != ESFT_OK) return s;
    /* x is this backend's to check (NaN/Inf: nothing of the caller's written);
       the router runs in fp32 and the routing kernel flags non-finite logits */
    s = esft_cuda__arm_deferred(c, err);
    if (s == ESFT_OK) s = esft_cuda__finite_launch(c, x, (size_t)T * D, c->flag + ESFT_CUDA__FLAG_INPUT, err);
    if (s == ESFT_OK)
        s = esft_cuda__gemm(c, CUBLAS_COMPUTE_32F, 0, 1, T, E, D, 1.0f, x, D, esft_cuda__router_w(m), D, 0.0f,
                            w.logits, E, err);
    if (s == ESFT_OK) s = esft_cuda__chunk_counts(c, n, E, &counts, err);
    if (s == ESFT_OK)
        s = esft_cuda__route_launch(c, &cfg->route, w.ids, w.weights, w.probs, w.logits, T,
                                    c->flag + ESFT_CUDA__FLAG_LOGITS, counts, c->flag + ESFT_CUDA__FLAG_BIAS, err);
    if (s != ESFT_OK) return esft_cuda__x_before(c, x, D, s, err);
    s = esft_cuda__sort_slots(c, w.perm, w.pos, w.offsets, w.ids, counts, n, E, err);
    if (s == ESFT_OK) s = esft_cuda__moe_tables(c, m, &w, &off, err);
    if (s == ESFT_OK) s = esft_cuda__moe_verdicts(c, x, "x", D, cfg->route.selection_bias, w.logits, E, err);
    if (s != ESFT_OK) return s;
    esft_cuda__gather_kernel<<<n, 128, 0, c->stream>>>(w.xg, x, w.perm, K, D);
    if ((s = esft_cuda__launched("gather kernel", err)) != ESFT_OK) return s;
    s = esft_cuda__experts_forward(c, m, &w, off, T, math, err);
    if (s == ESFT_OK) s = esft_cuda__shared_forward(c, m, &w, y, x, T, math, err);
    if (s != ESFT_OK) return s;
    esft_cuda__combine_kernel<<<T, 128, 0, c->stream>>>(y, w.o, w.weights, w.pos, K, D);
    if ((s = esft_cuda__launched("combine kernel", err)) != ESFT_OK) return s;
    /* y's check is queued before the aux loss's wait, which then serves both */
    s = esft_cuda__finite_launch(c, y, (size_t)T * D, c->flag + ESFT_CUDA__FLAG_INPUT, err);
    if (s == ESFT_OK) s = esft_cuda__queue_flags(c, err);
    if (s == ESFT_OK) s = esft_cuda__aux_forward(c, cfg, &w, T, aux_loss, err);
    if (s == ESFT_OK) s = esft_cuda__finish(c, "moe forward", err);
    if (s == ESFT_OK) s = esft_cuda__deferred(c, ESFT_CUDA__FLAG_INPUT, &bad_y, err);
    if (s == ESFT_OK) s = esft_cuda__output_verdict(y, bad_y, "y", (size_t)D, err);
    return s;
}

/* Routed experts backward: fills w->dw, accumulates into dx, and into the
   gradients of trainable experts only (frozen experts skip every dW GEMM).
   Each GEMM kind is one batch over the experts; the input gradient's two halves
   (dg Wg, then du Wu into the same rows) are two batches, so no batch has two
   problems writing one matrix. */
static esft_status esft_cuda__experts_backward(esft_cuda__context *c, const esft_moe *m, esft_cuda__moe_ws *w,
                                               const int32_t *off, float *dx, const float *dy, int T,
                                               cublasComputeType_t math, esft_error *err)
{
    int D = m->cfg.d_model, F = m->cfg.d_expert, E = m->cfg.route.n_experts, K = m->cfg.route.top_k;
    int n_all = T * K;
    size_t nf = (size_t)n_all * F;
    const float *W[3];
    float *G[3];
    esft_cuda__batch b;
    esft_status s;
    esft_cuda__dout_kernel<<<n_all, 128, 0, c->stream>>>(w->d, w->dw, dy, w->o, w->weights, w->perm, K, D);
    if ((s = esft_cuda__launched("dout kernel", err)) != ESFT_OK) return s;
    if ((s = esft_cuda__batch_begin(c, &b, E, 0, 0, D, F, F, 0.0f, err)) != ESFT_OK) return s;
    for (int e = 0; e < E; e++) { /* b = dO Wd */
        esft_cuda__expert(m, e, W, G);
        esft_cuda__batch_add(&b, off[e + 1] - off[e], F, D, w->d + (size_t)off[e] * D, W[2], w->b + (size_t)off[e] * F);
    }
    if ((s = esft_cuda__batch_run(c, &b, math, err)) != ESFT_OK) return s;
    if (m->n_trainable_experts > 0) { /* dWd += dO^T act: the activations recomputed once */
        esft_cuda__swiglu_kernel<<<esft_cuda__grid(nf, 256), 256, 0, c->stream>>>(w->a, w->g, w->u, nf);
        if ((s = esft_cuda__launched("swiglu kernel", err)) != ESFT_OK) return s;
        if ((s = esft_cuda__batch_begin(c, &b, E, 1, 0, D, F, F, 1.0f, err)) != ESFT_OK) return s;
        for (int e = 0; e < E; e++) {
            esft_cuda__expert(m, e, W, G);
            if (G[2] && off[e + 1] > off[e])
                esft_cuda__batch_add(&b, D, F, off[e + 1] - off[e], w->d + (size_t)off[e] * D,
                                     w->a + (size_t)off[e] * F, G[2]);
        }
        if ((s = esft_cuda__batch_run(c, &b, math, err)) != ESFT_OK) return s;
    }
    esft_cuda__swiglu_back_kernel<<<esft_cuda__grid(nf, 256), 256, 0, c->stream>>>(w->a, w->b, w->g, w->u, nf);
    if ((s = esft_cuda__launched("swiglu backward kernel", err)) != ESFT_OK) return s;
    if (m->n_trainable_experts > 0) { /* dWg += dg^T xg, dWu += du^T xg */
        if ((s = esft_cuda__batch_begin(c, &b, 2 * E, 1, 0, F, D, D, 1.0f, err)) != ESFT_OK) return s;
        for (int e = 0; e < E; e++) {
            int n = off[e + 1] - off[e];
            size_t rf = (size_t)off[e] * F, rd = (size_t)off[e] * D;
            esft_cuda__expert(m, e, W, G);
            if (!G[0] || n == 0) continue; /* K = n = 0 would still be a problem: C += 0 */
            esft_cuda__batch_add(&b, F, D, n, w->b + rf, w->xg + rd, G[0]);
            esft_cuda__batch_add(&b, F, D, n, w->a + rf, w->xg + rd, G[1]);
        }
        if ((s = esft_cuda__batch_run(c, &b, math, err)) != ESFT_OK) return s;
    }
    for (int half = 0; half < 2; half++) { /* d = dg Wg, then d += du Wu */
        const float *src = half == 0 ? w->b : w->a;
        if ((s = esft_cuda__batch_begin(c, &b, E, 0, 0, F, D, D, half == 0 ? 0.0f : 1.0f, err)) != ESFT_OK) return s;
        for (int e = 0; e < E; e++) {
            esft_cuda__expert(m, e, W, G);
            esft_cuda__batch_add(&b, off[e + 1] - off[e], D, F, src + (size_t)off[e] * F, W[half], w->d + (size_t)off[e] * D);
        }
        if ((s = esft_cuda__batch_run(c, &b, math, err)) != ESFT_OK) return s;
    }
    esft_cuda__scatter_kernel<<<T, 128, 0, c->stream>>>(dx, w->d, w->pos, K, D);
    return esft_cuda__launched("scatter kernel", err);
}

/* Shared block backward (esft__moe_shared_backward). */
static esft_status esft_cuda__shared_backward(esft_cuda__context *c, const esft_moe *m, esft_cuda__moe_ws *w,
                                              float *dx, const float *dy, const float *x, int T,
                                              cublasComputeType_t math, esft_error *err)
{
    int D = m->cfg.d_model, FS = m->cfg.d_shared;
    size_t n = (size_t)T * FS;
    unsigned grid = esft_cuda__grid(n, 256);
    esft_status s;
    if (FS == 0) return ESFT_OK;
    s = esft_cuda__gemm(c, math, 0, 0, T, FS, D, 1.0f, dy, D, esft_cuda__shared_w(m, 2), FS, 0.0f, w->bs, FS, err);
    if (s == ESFT_OK && m->d_shared_down) {
        esft_cuda__swiglu_kernel<<<grid, 256, 0, c->stream>>>(w->as, w->gs, w->us, n);
        s = esft_cuda__launched("swiglu kernel", err);
        if (s == ESFT_OK)
            s = esft_cuda__gemm(c, math, 1, 0, D, FS, T, 1.0f, dy, D, w->as, FS, 1.0f, m->d_shared_down, FS, err);
    }
    if (s != ESFT_OK) return s;
    esft_cuda__swiglu_back_kernel<<<grid, 256, 0, c->stream>>>(w->as, w->bs, w->gs, w->us, n);
    if ((s = esft_cuda__launched("swiglu backward kernel", err)) != ESFT_OK) return s;
    if (m->d_shared_gate) {
        s = esft_cuda__gemm(c, math, 1, 0, FS, D, T, 1.0f, w->bs, FS, x, D, 1.0f, m->d_shared_gate, D, err);
        if (s == ESFT_OK)
            s = esft_cuda__gemm(c, math, 1, 0, FS, D, T, 1.0f, w->as, FS, x, D, 1.0f, m->d_shared_up, D, err);
    }
    if (s == ESFT_OK)
        s = esft_cuda__gemm(c, math, 0, 0, T, D, FS, 1.0f, w->bs, FS, esft_cuda__shared_w(m, 0), D, 1.0f, dx, D, err);
    if (s == ESFT_OK)
        s = esft_cuda__gemm(c, math, 0, 0, T, D, FS, 1.0f, w->as, FS, esft_cuda__shared_w(m, 1), D, 1.0f, dx, D, err);
    return s;
}

/* Two waits per backward, as the forward: the expert offsets with the
   verdict on dy (before any gradient is touched), and the end with dx's. */
static esft_status esft_cuda__moe_backward(void *context, const esft_moe *m, float *dx, const float *dy,
                                           const float *x, void *workspace, int T, esft_error *err)
{
    esft_cuda__context *c = (esft_cuda__context *)context;
    const esft_moe_config *cfg = &m->cfg;
    int D = cfg->d_model, E = cfg->route.n_experts, K = cfg->route.top_k;
    int S = esft_cuda__aux_len(cfg, T);
    int32_t *off;
    unsigned long long bad_dx;
    cublasComputeType_t math;
    esft_cuda__moe_ws w;
    esft_status s;
    if ((s = esft_cuda__moe_check(m, dx, dy, x, workspace, err)) != ESFT_OK) return s;
    if ((s = esft_cuda__layer_setup(c, &math, err)) != ESFT_OK) return s;
    if ((s = esft_moe_workspace_view_at(cfg, T, workspace, &w, err)) != ESFT_OK) return s;
    s = esft_cuda__arm_deferred(c, err);
    if (s == ESFT_OK) s = esft_cuda__finite_launch(c, dy, (size_t)T * D, c->flag + ESFT_CUDA__FLAG_INPUT, err);
    if (s == ESFT_OK) s = esft_cuda__moe_tables(c, m, &w, &off, err);
    if (s == ESFT_OK) s = esft_cuda__moe_verdicts(c, dy, "dy", D, NULL, NULL, E, err);
    if (s == ESFT_OK) s = esft_cuda__experts_backward(c, m, &w, off, dx, dy, T, math, err);
    if (s == ESFT_OK) s = esft_cuda__shared_backward(c, m, &w, dx, dy, x, T, math, err);
    if (s != ESFT_OK) return s;
    esft_cuda__route_back_kernel<<<(T + 3) / 4, 128, 0, c->stream>>>(
        w.logits, w.probs, w.ids, w.dw, cfg->aux_alpha > 0.0f ? w.aux_coef : NULL, T, E, K, S,
        cfg->route.renormalize != 0, cfg->route.gating == ESFT_GATING_SIGMOID, cfg->route.routed_scaling);
    if ((s = esft_cuda__launched("router backward kernel", err)) != ESFT_OK) return s;
    s = esft_cuda__gemm(c, CUBLAS_COMPUTE_32F, 0, 0, T, D, E, 1.0f, w.logits, E, esft_cuda__router_w(m), D, 1.0f, dx,
                        D, err);
    if (s == ESFT_OK && m->d_router)
        s = esft_cuda__gemm(c, CUBLAS_COMPUTE_32F, 1, 0, E, D, T, 1.0f, w.logits, E, x, D, 1.0f, m->d_router, D, err);
    if (s == ESFT_OK) s = esft_cuda__finite_launch(c, dx, (size_t)T * D, c->flag + ESFT_CUDA__FLAG_INPUT, err);
    if (s == ESFT_OK) s = esft_cuda__queue_flags(c, err);
    if (s == ESFT_OK) s = esft_cuda__finish(c, "moe backward", err);
    if (s == ESFT_OK) s = esft_cuda__deferred(c, ESFT_CUDA__FLAG_INPUT, &bad_dx, err);
    if (s == ESFT_OK) s = esft_cuda__output_verdict(dx, bad_dx, "dx", (size_t)D, err);
    return s;
}

/* ===================================================================== */
/* 7. PESC adapter layer: forward and backward                           */
/* ===================================================================== */

/* esft.h's esft__pesc_forward_cpu / _backward_cpu on the device, every expert
   at once: router GEMM (fp32) and the routing kernel; the slots sorted by
   expert with the MoE's counting sort; then one gather kernel over all T K
   routed rows (through the dropout mask), one batch of W_down GEMMs over the
   experts, one GELU kernel over all rows, one batch of W_up GEMMs (section 5's
   batches: ESFT_CUDA_EXPERTS picks grouped, streams or loop), and one combine
   kernel, a block per token, that adds its K adapter outputs to F in ascending
   expert order, the CPU's order: no atomics, the same bits on every run. The
   backward mirrors it with four batches (z = dy_g W_up, dW_up, dW_down, dx =
   dh W_down) between one gather and one combine.

   Where the rows live: in the backend's scratch (esft_cuda__scratch, grown on
   demand, one per backend), laid out by esft_cuda__pesc_rows_at. Not in
   saved->work: the CPU path runs expert by expert and needs only T rows there,
   so growing the published layout to T K rows would cost every CPU user K
   times the memory for the GPU's sake, and one saved per layer would each hold
   it; the scratch is shared by every layer and op. saved->work keeps what both
   backends read by its layout (dw, dlogits, coef).

   Host waits: two per forward (one for the expert offsets the batches are
   built from, which brings the aux loss's balance and the verdicts on F, the
   parameters and the router logits with it, before y is written; one at the
   end with y's verdict) and two per backward (the offsets with dy's verdict,
   before any gradient is touched; the end). More only on a failure path
   (reading the bad value, checking u after a bad logit) or when the scratch,
   the host table or the grouped call's pointer arrays grow. */

/* The dropout of the adapters' input (esft_pesc_config's dropout, seed). */
typedef struct esft_cuda__pesc_dropout {
    int on;                 /* 0: a plain copy, as the CPU's memcpy */
    uint32_t threshold;     /* a column is kept when its hash's top 32 bits are >= this */
    float keep_scale;       /* 1 / (1 - p) */
    unsigned long long seed;
} esft_cuda__pesc_dropout;

/* The CPU's formulas for threshold and scale, so both backends drop the same
   columns and scale them by the same float. */
static esft_cuda__pesc_dropout esft_cuda__pesc_dropout_of(const esft_pesc_config *cfg)
{
    esft_cuda__pesc_dropout dr;
    dr.on = cfg->dropout != 0.0f;
    dr.threshold = (uint32_t)((double)cfg->dropout * 4294967296.0);
    dr.keep_scale = 1.0f / (1.0f - cfg->dropout);
    dr.seed = cfg->dropout_seed;
    return dr;
}

/* splitmix64, esft.h's esft__adapter_mix (private there): the masks must be
   the CPU's bits, and integer arithmetic makes them so. */
__device__ static unsigned long long esft_cuda__mix(unsigned long long x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* esft__pesc_keep: 1 keeps column d of token t's input to expert e. */
__device__ static bool esft_cuda__pesc_keep(const esft_cuda__pesc_dropout &dr, int e, int t, int d)
{
    unsigned long long key = esft_cuda__mix(dr.seed ^ ((unsigned long long)(uint32_t)e << 32 | (uint32_t)t));
    return (uint32_t)(esft_cuda__mix(key + (unsigned long long)d) >> 32) >= dr.threshold;
}

__device__ static float esft_cuda__gelu(float h) { return 0.5f * h * (1.0f + erff(h * 0.70710678118654752f)); }

/* d gelu / dh = Phi(h) + h phi(h) (esft__gelu_grad). */
__device__ static float esft_cuda__gelu_grad(float h)
{
    return 0.5f * (1.0f + erff(h * 0.70710678118654752f)) + h * 0.39894228040143268f * expf(-0.5f * h * h);
}

/* Row p of `in` = dropout_e(F[t]) for the slot order[p] = t K + j of expert
   e = ids[slot] (esft__pesc_gather_input for every expert at once); with dy,
   row p of dyg = dy[t] as well (the backward's plain gather). One block per row. */
__global__ static void esft_cuda__pesc_gather_kernel(float *in, float *dyg, const float *F, const float *dy,
                                                     const int32_t *order, const int32_t *ids, int K, int D,
                                                     esft_cuda__pesc_dropout dr)
{
    size_t p = blockIdx.x;
    int slot = order[p], t = slot / K, e = ids[slot];
    const float *from = F + (size_t)t * D;
    float *to = in + p * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x)
        to[d] = !dr.on ? from[d] : esft_cuda__pesc_keep(dr, e, t, d) ? from[d] * dr.keep_scale : 0.0f;
    if (!dy) return;
    for (int d = threadIdx.x; d < D; d += blockDim.x) dyg[p * D + d] = dy[(size_t)t * D + d];
}

/* Thread 0 writes token t's K sorted positions in ascending expert order to
   at[0..K) and their experts to expert[0..K) (an insertion sort: K is small;
   a token's experts are distinct), for the whole block. */
__device__ static void esft_cuda__pesc_by_expert(int32_t *at, int32_t *expert, const int32_t *ids,
                                                 const int32_t *pos, size_t t, int K)
{
    if (threadIdx.x == 0)
        for (int j = 0; j < K; j++) {
            int32_t e = ids[t * K + j], p = pos[t * K + j];
            int i = j;
            for (; i > 0 && expert[i - 1] > e; i--) {
                expert[i] = expert[i - 1];
                at[i] = at[i - 1];
            }
            expert[i] = e;
            at[i] = p;
        }
    __syncthreads();
}

/* out[t] = base[t] + the rows of token t's K slots, experts ascending, each
   through its expert's dropout mask when dr.on (the product rounded before the
   sum, as the CPU's), then + extra[t] when given: esft__pesc_scatter_add after
   y = F (forward: out y, base F, rows the adapter outputs; y's first NaN/Inf
   goes to flag) and esft__pesc_scatter_dx then the residual (backward: out =
   base = dF, rows dx, extra dy). One block per token, the CPU's order of
   additions, no atomics. Shared memory: 2 K int32. */
__global__ static void esft_cuda__pesc_combine_kernel(float *out, const float *base, const float *rows,
                                                      const float *extra, const int32_t *ids, const int32_t *pos,
                                                      int K, int D, esft_cuda__pesc_dropout dr,
                                                      unsigned long long *flag)
{
    extern __shared__ int32_t esft_cuda__combine_smem[];
    int32_t *at = esft_cuda__combine_smem, *expert = at + K;
    size_t t = blockIdx.x;
    esft_cuda__pesc_by_expert(at, expert, ids, pos, t, K);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        size_t i = t * D + d;
        float acc = base[i];
        for (int j = 0; j < K; j++) {
            float v = rows[(size_t)at[j] * D + d];
            if (!dr.on) acc += v;
            else if (esft_cuda__pesc_keep(dr, expert[j], (int)t, d)) acc += __fmul_rn(v, dr.keep_scale);
        }
        if (extra) acc += extra[i];
        out[i] = acc;
        if (flag) esft_cuda__flag_nonfinite(acc, i, flag);
    }
}

/* pos[order[p]] = p: every slot's sorted position (the forward's sort writes
   pos itself; the backward has only saved->order). */
__global__ static void esft_cuda__pesc_invert_kernel(int32_t *pos, const int32_t *order, int n)
{
    for (size_t p = esft_cuda__thread(); p < (size_t)n; p += esft_cuda__threads()) pos[order[p]] = (int32_t)p;
}

/* g[j][r] = k_j gelu(hidden[j][r]), k_j = scale * the gate weight of slot
   slots[j] (esft__adapter_forward_cpu's activation pass, row_scale = weights),
   over every expert's rows at once (n = T K R, slots = saved->order). */
__global__ static void esft_cuda__pesc_act_kernel(float *g, const float *hidden, const float *weights,
                                                  const int32_t *slots, size_t n, int R, float scale)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float k = scale * weights[slots[i / (size_t)R]];
        g[i] = k * esft_cuda__gelu(hidden[i]);
    }
}

/* esft__adapter_backward_cpu's row pass, one warp per row j: from z = dy W_up
   (n, R), writes kg = k g, turns z into dh = k z gelu'(h), and dw[slot] = scale
   <z, gelu(h)> (the gate weight's gradient; the dot in double, as the CPU, in a
   fixed warp order). Rows j are all T K rows at once (slots = saved->order). */
__global__ static void esft_cuda__pesc_act_back_kernel(float *z, float *kg, float *dw, const float *hidden,
                                                       const float *weights, const int32_t *slots, int n, int R,
                                                       float scale)
{
    int lane = threadIdx.x % 32, j = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    float k;
    double dot = 0.0;
    if (j >= n) return; /* whole warps leave together: j is per warp */
    k = scale * weights[slots[j]];
    for (int r = lane; r < R; r += 32) {
        size_t i = (size_t)j * R + r;
        float h = hidden[i], g = esft_cuda__gelu(h);
        dot += (double)z[i] * g;
        kg[i] = k * g;
        z[i] *= k * esft_cuda__gelu_grad(h);
    }
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) dw[slots[j]] = scale * (float)dot;
}

/* esft__balance: frac[e] = count_e / (T K) and *sum = sum_e f_e (P_e / T), P_e
   the double sum of expert e's probabilities over the tokens in order. One
   block: tiles of ESFT_CUDA__BALANCE_FLOATS probabilities are loaded into
   shared memory together (coalesced), then thread e adds its column of the
   tile to its running P_e (kept in shared memory, always by the same thread);
   thread 0 adds the terms in expert order. The CPU's operations in the CPU's
   order (the _rn intrinsics forbid contractions), so the loss is the CPU's
   bits when the probabilities are; the tiles only spare each thread a chain
   of T dependent global loads. Shared memory: E doubles, then the tile. */
#define ESFT_CUDA__BALANCE_FLOATS 4096

__global__ static void esft_cuda__pesc_balance_kernel(double *sum, float *frac, const float *probs,
                                                      const int32_t *offset, int T, int E, int K)
{
    extern __shared__ double esft_cuda__balance_smem[]; /* (E) P_e, later the terms; then the tile */
    double *acc = esft_cuda__balance_smem;
    float *tile = (float *)(acc + E);
    int rows = ESFT_CUDA__BALANCE_FLOATS / E; /* >= 1: E <= 4096 is checked by the caller */
    for (int e = threadIdx.x; e < E; e += blockDim.x) acc[e] = 0.0;
    for (int t0 = 0; t0 < T; t0 += rows) {
        int n = min(rows, T - t0);
        __syncthreads(); /* the previous tile is consumed */
        for (int i = threadIdx.x; i < n * E; i += blockDim.x) tile[i] = probs[(size_t)t0 * E + i];
        __syncthreads();
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            double P = acc[e];
            for (int t = 0; t < n; t++) P = __dadd_rn(P, (double)tile[t * E + e]);
            acc[e] = P;
        }
    }
    for (int e = threadIdx.x; e < E; e += blockDim.x) { /* the thread that summed P_e */
        double fe = __ddiv_rn((double)(offset[e + 1] - offset[e]), (double)T * K);
        frac[e] = (float)fe;
        acc[e] = __dmul_rn(fe, __ddiv_rn(acc[e], (double)T));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int e = 0; e < E; e++) s = __dadd_rn(s, acc[e]);
        *sum = s;
    }
}

/* coef[e] = (float)(a * frac[e] / T), a = daux alpha E formed on the host in
   double as esft__pesc_router_grad forms it: the CPU's bits. */
__global__ static void esft_cuda__pesc_coef_kernel(float *coef, const float *frac, double a, int T, int E)
{
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        coef[e] = (float)__ddiv_rn(__dmul_rn(a, (double)frac[e]), (double)T);
}

/* Checks the memory space of the call's arrays (saved's buffers are the
   backend's own: esft.h checks saved->backend). */
static esft_status esft_cuda__pesc_check(const float *out, const char *out_name, const float *F, const float *u,
                                         const float *params, const float *du, const float *dparams,
                                         const float *dy, esft_error *err)
{
    esft_status s;
    if ((s = esft_cuda__need_device(out, out_name, err)) != ESFT_OK ||
        (s = esft_cuda__need_device(F, "F", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(u, "u", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(params, "params", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(du, "du", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(dparams, "dparams", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(dy, "dy", err)) != ESFT_OK)
        return s;
    return ESFT_OK;
}

/* The op's scratch for all T K routed rows, in sorted order (row p belongs to
   slot order[p]), laid out once at the op's start so that no region grows while
   queued work reads another. Forward: in = the gathered, dropped-out F; act =
   k gelu(hidden); out = the adapter outputs. Backward: in = the gathered F,
   later dx; out = the gathered dy; act = k g; dh = z, then dh. */
typedef struct esft_cuda__pesc_rows {
    float *in, *out;     /* (T K, D) each */
    float *act, *dh;     /* (T K, R) each */
    int32_t *pos;        /* (T K) the sorted position of slot t K + j */
    int32_t *counts;     /* the routing kernel's chunk histograms (forward) */
    double *balance;     /* (1) the aux loss's balance (forward) */
} esft_cuda__pesc_rows;

static size_t esft_cuda__round256(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

/* The regions above in the context's scratch, each 256-byte aligned. */
static esft_status esft_cuda__pesc_rows_at(esft_cuda__context *c, const esft_pesc_config *cfg, int T,
                                           esft_cuda__pesc_rows *r, esft_error *err)
{
    int n = T * cfg->top_k;
    size_t nb = esft_cuda__round256(sizeof(double));
    size_t nd = esft_cuda__round256((size_t)n * cfg->d_model * sizeof(float));
    size_t nr = esft_cuda__round256((size_t)n * cfg->rank * sizeof(float));
    size_t np = esft_cuda__round256((size_t)n * sizeof(int32_t));
    unsigned char *at;
    void *base;
    esft_status s = esft_cuda__scratch(c, nb + 2 * nd + 2 * nr + np + esft_cuda__chunk_bytes(n, cfg->n_experts),
                                       &base, err);
    if (s != ESFT_OK) return s;
    at = (unsigned char *)base;
    r->balance = (double *)at;
    r->in = (float *)(at += nb);
    r->out = (float *)(at += nd);
    r->act = (float *)(at += nd);
    r->dh = (float *)(at += nr);
    r->pos = (int32_t *)(at += nr);
    r->counts = (int32_t *)(at + np);
    return ESFT_OK;
}

/* An operand of the per-expert GEMMs: the expert's rows of a row array (sorted
   order, ld floats a row), or one of the expert's tensors in a block shaped as
   the parameters (params or dparams; W_down is (R, D), W_up (D, R)). */
typedef struct esft_cuda__pesc_operand {
    float *base;
    int ld;
    int tensor; /* ESFT_CUDA__PESC_ROWS, or an esft_pesc_tensor */
} esft_cuda__pesc_operand;

#define ESFT_CUDA__PESC_ROWS (-1)

static esft_cuda__pesc_operand esft_cuda__pesc_rows_of(float *rows, int ld)
{
    esft_cuda__pesc_operand o;
    o.base = rows;
    o.ld = ld;
    o.tensor = ESFT_CUDA__PESC_ROWS;
    return o;
}

/* The operand type serves outputs too; a read-only block (params) is only
   ever passed as A or B, so dropping its const here writes nothing. */
static esft_cuda__pesc_operand esft_cuda__pesc_tensor_of(const esft_pesc_config *cfg, const float *block,
                                                         esft_pesc_tensor which)
{
    esft_cuda__pesc_operand o;
    o.base = const_cast<float *>(block);
    o.ld = which == ESFT_PESC_DOWN ? cfg->d_model : cfg->rank;
    o.tensor = which;
    return o;
}

static float *esft_cuda__pesc_at(const esft_pesc_config *cfg, const esft_cuda__pesc_operand *o, const int32_t *off,
                                 int e)
{
    if (o->tensor == ESFT_CUDA__PESC_ROWS) return o->base + (size_t)off[e] * o->ld;
    return o->base + esft_pesc_tensor_offset(cfg, (esft_pesc_tensor)o->tensor, e);
}

/* One GEMM kind of the adapters: C_e = op(A_e) op(B_e) (+ C_e when beta is 1)
   for every expert e, in esft_cuda__gemm's row-major terms; M, N or K is
   ESFT_CUDA__PESC_N where it is the expert's row count. */
typedef struct esft_cuda__pesc_gemm {
    int ta, tb, M, N, K;
    esft_cuda__pesc_operand a, b, c;
    float beta;
} esft_cuda__pesc_gemm;

#define ESFT_CUDA__PESC_N 0

static int esft_cuda__pesc_dim(int dim, int rows) { return dim == ESFT_CUDA__PESC_N ? rows : dim; }

/* Runs g over every expert with rows as one batch (section 5). Each problem
   writes its own expert's rows or tensor, so no two share a C; experts without
   rows are left out (a dW problem with K = 0 would still be C += 0). */
static esft_status esft_cuda__pesc_batch(esft_cuda__context *c, const esft_pesc_config *cfg,
                                         const esft_cuda__pesc_gemm *g, const int32_t *off,
                                         cublasComputeType_t math, esft_error *err)
{
    esft_cuda__batch b;
    esft_status s = esft_cuda__batch_begin(c, &b, cfg->n_experts, g->ta, g->tb, g->a.ld, g->b.ld, g->c.ld, g->beta,
                                           err);
    if (s != ESFT_OK) return s;
    for (int e = 0; e < cfg->n_experts; e++) {
        int n = off[e + 1] - off[e];
        if (n == 0) continue;
        esft_cuda__batch_add(&b, esft_cuda__pesc_dim(g->M, n), esft_cuda__pesc_dim(g->N, n),
                             esft_cuda__pesc_dim(g->K, n), esft_cuda__pesc_at(cfg, &g->a, off, e),
                             esft_cuda__pesc_at(cfg, &g->b, off, e), esft_cuda__pesc_at(cfg, &g->c, off, e));
    }
    return esft_cuda__batch_run(c, &b, math, err);
}

/* Shared memory of the balance kernel: E doubles and the tile. */
static size_t esft_cuda__pesc_balance_smem(int E)
{
    return (size_t)E * sizeof(double) + ESFT_CUDA__BALANCE_FLOATS * sizeof(float);
}

/* Router logits (fp32), routing and the slots by expert, queued: non-finite
   logits go to the deferred LOGITS flag (esft_cuda__pesc_verdicts names them). */
static esft_status esft_cuda__pesc_route(esft_cuda__context *c, const esft_pesc_config *cfg, esft_pesc_saved *sv,
                                         const esft_cuda__pesc_rows *r, const float *u, const float *params, int T,
                                         esft_error *err)
{
    int D = cfg->d_model, E = cfg->n_experts, K = cfg->top_k;
    esft_route_config rc = esft_route_config_init(E, K);
    esft_status s;
    rc.renormalize = 1; /* softmax over the K chosen, as the CPU routes */
    s = esft_cuda__gemm(c, CUBLAS_COMPUTE_32F, 0, 1, T, E, D, 1.0f, u, D, params, D, 0.0f, sv->logits, E, err);
    if (s == ESFT_OK) s = esft_cuda__zero_chunk_counts(c, r->counts, T * K, E, err);
    if (s == ESFT_OK)
        s = esft_cuda__route_launch(c, &rc, sv->ids, sv->weights, sv->probs, sv->logits, T,
                                    c->flag + ESFT_CUDA__FLAG_LOGITS, r->counts, NULL, err);
    if (s == ESFT_OK) s = esft_cuda__sort_slots(c, sv->order, r->pos, sv->offset, sv->ids, r->counts, T * K, E, err);
    return s;
}

/* Queues frac (on the device) and the aux loss's balance into r->balance. */
static esft_status esft_cuda__pesc_balance(esft_cuda__context *c, const esft_pesc_config *cfg, esft_pesc_saved *sv,
                                           const esft_cuda__pesc_rows *r, int T, esft_error *err)
{
    int E = cfg->n_experts;
    esft_cuda__pesc_balance_kernel<<<1, 256, esft_cuda__pesc_balance_smem(E), c->stream>>>(
        r->balance, sv->frac, sv->probs, sv->offset, T, E, cfg->top_k);
    return esft_cuda__launched("balance kernel", err);
}

/* The op's one wait before its batches: the expert offsets (E + 1) to the
   host table, the aux loss's balance when balance_dev is given (a double at
   the table's first even index past the offsets, so 8-byte aligned) and the
   deferred flags. */
static esft_status esft_cuda__pesc_tables(esft_cuda__context *c, const esft_pesc_saved *sv, int E,
                                          const double *balance_dev, int32_t **off, double *balance,
                                          esft_error *err)
{
    size_t at = ((size_t)E + 2) & ~(size_t)1;
    esft_status s = esft_cuda__host_table(c, at + 2, err);
    if (s == ESFT_OK) s = esft_cuda__queue_offsets(c, sv->offset, E, off, err);
    if (s == ESFT_OK && balance_dev)
        s = esft_cuda__check(cudaMemcpyAsync(c->host + at, balance_dev, sizeof(double), cudaMemcpyDeviceToHost,
                                             c->stream), "read the balance", err);
    if (s == ESFT_OK) s = esft_cuda__queue_flags(c, err);
    if (s == ESFT_OK) s = esft_cuda__finish(c, "read expert offsets", err);
    if (s == ESFT_OK && balance_dev) memcpy(balance, c->host + at, sizeof *balance);
    return s;
}

/* The forward's verdicts, deferred to the offsets' wait, in the CPU's order:
   F, the parameters, then the router logits (u named when it holds the
   NaN/Inf, else an overflow, as the CPU words it). Every flag is re-armed
   before any verdict returns. */
static esft_status esft_cuda__pesc_verdicts(esft_cuda__context *c, const esft_pesc_config *cfg, const float *F,
                                            const float *u, const float *params, int T, esft_error *err)
{
    unsigned long long bad_F, bad_params, bad_logit;
    esft_status s = esft_cuda__deferred(c, ESFT_CUDA__FLAG_INPUT, &bad_F, err);
    if (s == ESFT_OK) s = esft_cuda__deferred(c, ESFT_CUDA__FLAG_PARAMS, &bad_params, err);
    if (s == ESFT_OK) s = esft_cuda__deferred(c, ESFT_CUDA__FLAG_LOGITS, &bad_logit, err);
    if (s == ESFT_OK) s = esft_cuda__finite_verdict(F, bad_F, "F", (size_t)cfg->d_model, err);
    if (s == ESFT_OK) s = esft_cuda__finite_verdict(params, bad_params, "params", 0, err);
    if (s != ESFT_OK || bad_logit == ~0ULL) return s;
    s = esft_cuda__check_finite(c, u, (size_t)T * cfg->d_model, "u", (size_t)cfg->d_model, err);
    if (s != ESFT_OK) return s;
    return esft_cuda__fail(err, ESFT_ERR_NUMERIC, "router logits overflow (u or router weights too large)");
}

/* The adapters over all rows into r->out (esft__adapter_forward_cpu per expert,
   beta 0): gather, hidden = in W_down^T (saved for the backward), act =
   k gelu(hidden), out = act W_up^T. */
static esft_status esft_cuda__pesc_experts_forward(esft_cuda__context *c, const esft_pesc_config *cfg,
                                                   esft_pesc_saved *sv, const esft_cuda__pesc_rows *r, const float *F,
                                                   const float *params, const int32_t *off, int T,
                                                   cublasComputeType_t math, esft_error *err)
{
    int D = cfg->d_model, R = cfg->rank, K = cfg->top_k, n = T * K;
    size_t nr = (size_t)n * R;
    esft_cuda__pesc_gemm down = {0, 1, ESFT_CUDA__PESC_N, R, D, esft_cuda__pesc_rows_of(r->in, D),
                                 esft_cuda__pesc_tensor_of(cfg, params, ESFT_PESC_DOWN),
                                 esft_cuda__pesc_rows_of(sv->hidden, R), 0.0f};
    esft_cuda__pesc_gemm up = {0, 1, ESFT_CUDA__PESC_N, D, R, esft_cuda__pesc_rows_of(r->act, R),
                               esft_cuda__pesc_tensor_of(cfg, params, ESFT_PESC_UP),
                               esft_cuda__pesc_rows_of(r->out, D), 0.0f};
    esft_status s;
    esft_cuda__pesc_gather_kernel<<<n, 128, 0, c->stream>>>(r->in, NULL, F, NULL, sv->order, sv->ids, K, D,
                                                           esft_cuda__pesc_dropout_of(cfg));
    if ((s = esft_cuda__launched("adapter gather kernel", err)) != ESFT_OK) return s;
    if ((s = esft_cuda__pesc_batch(c, cfg, &down, off, math, err)) != ESFT_OK) return s;
    esft_cuda__pesc_act_kernel<<<esft_cuda__grid(nr, 256), 256, 0, c->stream>>>(r->act, sv->hidden, sv->weights,
                                                                                sv->order, nr, R, cfg->scale);
    if ((s = esft_cuda__launched("adapter activation kernel", err)) != ESFT_OK) return s;
    return esft_cuda__pesc_batch(c, cfg, &up, off, math, err);
}

/* Two waits (see the section's comment): the tables with every input verdict,
   then the end with y's. Nothing of the caller's is written before the first. */
static esft_status esft_cuda__pesc_forward(void *context, const esft_pesc_config *cfg, float *y, float *aux_loss,
                                           const float *F, const float *u, const float *params, esft_pesc_saved *sv,
                                           int T, esft_error *err)
{
    esft_cuda__context *c = (esft_cuda__context *)context;
    int D = cfg->d_model, E = cfg->n_experts, K = cfg->top_k;
    esft_cuda__pesc_dropout plain = esft_cuda__pesc_dropout_of(cfg);
    cublasComputeType_t math;
    esft_cuda__pesc_rows r;
    unsigned long long bad_y;
    double balance = 0.0;
    int32_t *off;
    esft_status s;
    sv->T = 0;
    if (T == 0) {
        sv->aux_loss = 0.0f;
        if (aux_loss) *aux_loss = 0.0f;
        return ESFT_OK;
    }
    plain.on = 0; /* y adds the adapters' outputs as they are */
    if ((s = esft_cuda__pesc_check(y, "y", F, u, params, NULL, NULL, NULL, err)) != ESFT_OK) return s;
    if ((s = esft_cuda__layer_setup(c, &math, err)) != ESFT_OK) return s;
    /* unreachable (routing stops at E ~ 1500), but refused before anything is queued */
    if (E > ESFT_CUDA__BALANCE_FLOATS || esft_cuda__pesc_balance_smem(E) > 48 * 1024)
        return esft_cuda__fail(err, ESFT_ERR_UNSUPPORTED, "cuda pesc: %d experts are too many for the balance kernel",
                               E);
    if ((s = esft_cuda__pesc_rows_at(c, cfg, T, &r, err)) != ESFT_OK) return s;
    if ((s = esft_cuda__arm_deferred(c, err)) != ESFT_OK) return s;
    /* routing first: its launch can refuse (shared memory) before any deferred
       flag is set, and a flag set by queued work is always read below */
    s = esft_cuda__pesc_route(c, cfg, sv, &r, u, params, T, err);
    if (s == ESFT_OK) s = esft_cuda__finite_launch(c, F, (size_t)T * D, c->flag + ESFT_CUDA__FLAG_INPUT, err);
    if (s == ESFT_OK)
        s = esft_cuda__finite_launch(c, params, esft_pesc_param_count(cfg), c->flag + ESFT_CUDA__FLAG_PARAMS, err);
    if (s == ESFT_OK) s = esft_cuda__pesc_balance(c, cfg, sv, &r, T, err);
    if (s == ESFT_OK) s = esft_cuda__pesc_tables(c, sv, E, r.balance, &off, &balance, err); /* wait 1 */
    if (s == ESFT_OK) s = esft_cuda__pesc_verdicts(c, cfg, F, u, params, T, err);
    if (s != ESFT_OK) return s;
    sv->aux_loss = (float)((double)cfg->aux_alpha * E * balance);
    if ((s = esft_cuda__pesc_experts_forward(c, cfg, sv, &r, F, params, off, T, math, err)) != ESFT_OK) return s;
    esft_cuda__pesc_combine_kernel<<<T, 128, 2 * (size_t)K * sizeof(int32_t), c->stream>>>(
        y, F, r.out, NULL, sv->ids, r.pos, K, D, plain, c->flag + ESFT_CUDA__FLAG_INPUT);
    s = esft_cuda__launched("adapter combine kernel", err);
    if (s == ESFT_OK) s = esft_cuda__queue_flags(c, err);
    if (s == ESFT_OK) s = esft_cuda__finish(c, "pesc forward", err); /* wait 2 */
    if (s == ESFT_OK) s = esft_cuda__deferred(c, ESFT_CUDA__FLAG_INPUT, &bad_y, err);
    /* worded as esft__pesc_forward_cpu's check of y (no "from finite inputs") */
    if (s == ESFT_OK) s = esft_cuda__finite_verdict(y, bad_y, "y", (size_t)D, err);
    if (s != ESFT_OK) return s;
    sv->cfg = *cfg;
    sv->T = T;
    if (aux_loss) *aux_loss = sv->aux_loss;
    return ESFT_OK;
}

/* The adapters' backward over all rows (esft__adapter_backward_cpu per
   expert, then dx = dh W_down and its scatter through the mask): gather F and
   dy; dh = dy_g W_up; one warp per row forms k g, turns z into dh and writes
   the gate weights' gradients into w->dw; dW_up += dy_g^T (k g) and dW_down +=
   dh^T in (when dparams); dx = dh W_down over `in` (the batches run in order
   on the op stream, so dW_down has read it); then one combine into dF, the
   residual dy added last. */
static esft_status esft_cuda__pesc_experts_backward(esft_cuda__context *c, const esft_pesc_config *cfg,
                                                    const esft_pesc_saved *sv, const esft_pesc_work_view *w,
                                                    const esft_cuda__pesc_rows *r, float *dF, float *dparams,
                                                    const float *dy, const float *F, const float *params,
                                                    const int32_t *off, int T, cublasComputeType_t math,
                                                    esft_error *err)
{
    int D = cfg->d_model, R = cfg->rank, K = cfg->top_k, n = T * K;
    esft_cuda__pesc_dropout dr = esft_cuda__pesc_dropout_of(cfg);
    esft_cuda__pesc_gemm z = {0, 0, ESFT_CUDA__PESC_N, R, D, esft_cuda__pesc_rows_of(r->out, D),
                              esft_cuda__pesc_tensor_of(cfg, params, ESFT_PESC_UP),
                              esft_cuda__pesc_rows_of(r->dh, R), 0.0f};
    esft_cuda__pesc_gemm d_up = {1, 0, D, R, ESFT_CUDA__PESC_N, esft_cuda__pesc_rows_of(r->out, D),
                                 esft_cuda__pesc_rows_of(r->act, R),
                                 esft_cuda__pesc_tensor_of(cfg, dparams, ESFT_PESC_UP), 1.0f};
    esft_cuda__pesc_gemm d_down = {1, 0, R, D, ESFT_CUDA__PESC_N, esft_cuda__pesc_rows_of(r->dh, R),
                                   esft_cuda__pesc_rows_of(r->in, D),
                                   esft_cuda__pesc_tensor_of(cfg, dparams, ESFT_PESC_DOWN), 1.0f};
    esft_cuda__pesc_gemm dx = {0, 0, ESFT_CUDA__PESC_N, D, R, esft_cuda__pesc_rows_of(r->dh, R),
                               esft_cuda__pesc_tensor_of(cfg, params, ESFT_PESC_DOWN),
                               esft_cuda__pesc_rows_of(r->in, D), 0.0f};
    esft_status s;
    esft_cuda__pesc_gather_kernel<<<n, 128, 0, c->stream>>>(r->in, r->out, F, dy, sv->order, sv->ids, K, D, dr);
    esft_cuda__pesc_invert_kernel<<<esft_cuda__grid((size_t)n, 256), 256, 0, c->stream>>>(r->pos, sv->order, n);
    if ((s = esft_cuda__launched("adapter gather kernels", err)) != ESFT_OK) return s;
    if ((s = esft_cuda__pesc_batch(c, cfg, &z, off, math, err)) != ESFT_OK) return s;
    esft_cuda__pesc_act_back_kernel<<<(n + 3) / 4, 128, 0, c->stream>>>(r->dh, r->act, w->dw, sv->hidden,
                                                                        sv->weights, sv->order, n, R, cfg->scale);
    if ((s = esft_cuda__launched("adapter activation backward kernel", err)) != ESFT_OK) return s;
    if (dparams && (s = esft_cuda__pesc_batch(c, cfg, &d_up, off, math, err)) != ESFT_OK) return s;
    if (dparams && (s = esft_cuda__pesc_batch(c, cfg, &d_down, off, math, err)) != ESFT_OK) return s;
    if ((s = esft_cuda__pesc_batch(c, cfg, &dx, off, math, err)) != ESFT_OK) return s;
    esft_cuda__pesc_combine_kernel<<<T, 128, 2 * (size_t)K * sizeof(int32_t), c->stream>>>(
        dF, dF, r->in, dy, sv->ids, r->pos, K, D, dr, NULL);
    return esft_cuda__launched("adapter combine kernel", err);
}

/* dlogits from the gate weights' gradient and the aux loss (the MoE's router
   backward kernel: renormalised softmax, routed_scaling 1, one sequence of T
   tokens), then the router's dW and du in fp32. */
static esft_status esft_cuda__pesc_router_backward(esft_cuda__context *c, const esft_pesc_config *cfg,
                                                   const esft_pesc_saved *sv, esft_pesc_work_view *w, float *du,
                                                   float *dparams, const float *u, const float *params, float daux,
                                                   int T, esft_error *err)
{
    int D = cfg->d_model, E = cfg->n_experts, K = cfg->top_k;
    esft_status s;
    esft_cuda__pesc_coef_kernel<<<1, 256, 0, c->stream>>>(w->coef, sv->frac, (double)daux * cfg->aux_alpha * E, T, E);
    if ((s = esft_cuda__launched("aux coefficient kernel", err)) != ESFT_OK) return s;
    esft_cuda__route_back_kernel<<<(T + 3) / 4, 128, 0, c->stream>>>(w->dlogits, sv->probs, sv->ids, w->dw, w->coef, T,
                                                                     E, K, T, 1, 0, 1.0f);
    if ((s = esft_cuda__launched("router backward kernel", err)) != ESFT_OK) return s;
    if (dparams)
        s = esft_cuda__gemm(c, CUBLAS_COMPUTE_32F, 1, 0, E, D, T, 1.0f, w->dlogits, E, u, D, 1.0f, dparams, D, err);
    if (s == ESFT_OK && du)
        s = esft_cuda__gemm(c, CUBLAS_COMPUTE_32F, 0, 0, T, D, E, 1.0f, w->dlogits, E, params, D, 1.0f, du, D, err);
    return s;
}

/* Two waits (see the section's comment): the tables with dy's verdict, before
   any gradient is touched (a NaN in dy would spread into all of them); the end. */
static esft_status esft_cuda__pesc_backward(void *context, const esft_pesc_config *cfg, float *dF, float *du,
                                            float *dparams, const float *dy, float daux, esft_pesc_saved *sv,
                                            const float *F, const float *u, const float *params, int T,
                                            esft_error *err)
{
    esft_cuda__context *c = (esft_cuda__context *)context;
    int D = cfg->d_model, E = cfg->n_experts;
    cublasComputeType_t math;
    esft_pesc_work_view w;
    esft_cuda__pesc_rows r;
    unsigned long long bad_dy;
    int32_t *off;
    esft_status s;
    if (T == 0) return ESFT_OK;
    if (!isfinite(daux)) return esft_cuda__fail(err, ESFT_ERR_NUMERIC, "daux is not finite");
    if ((s = esft_cuda__pesc_check(dF, "dF", F, u, params, du, dparams, dy, err)) != ESFT_OK) return s;
    if ((s = esft_cuda__layer_setup(c, &math, err)) != ESFT_OK) return s;
    if ((s = esft_pesc_work_view_at(cfg, T, sv->work, &w, err)) != ESFT_OK) return s;
    if ((s = esft_cuda__pesc_rows_at(c, cfg, T, &r, err)) != ESFT_OK) return s;
    s = esft_cuda__arm_deferred(c, err);
    if (s == ESFT_OK) s = esft_cuda__finite_launch(c, dy, (size_t)T * D, c->flag + ESFT_CUDA__FLAG_INPUT, err);
    if (s == ESFT_OK) s = esft_cuda__pesc_tables(c, sv, E, NULL, &off, NULL, err); /* wait 1 */
    if (s == ESFT_OK) s = esft_cuda__deferred(c, ESFT_CUDA__FLAG_INPUT, &bad_dy, err);
    if (s == ESFT_OK) s = esft_cuda__finite_verdict(dy, bad_dy, "dy", (size_t)D, err);
    if (s == ESFT_OK)
        s = esft_cuda__pesc_experts_backward(c, cfg, sv, &w, &r, dF, dparams, dy, F, params, off, T, math, err);
    if (s == ESFT_OK) s = esft_cuda__pesc_router_backward(c, cfg, sv, &w, du, dparams, u, params, daux, T, err);
    if (s == ESFT_OK) s = esft_cuda__finish(c, "pesc backward", err); /* wait 2 */
    return s;
}

/* ===================================================================== */
/* 8. AdamW                                                              */
/* ===================================================================== */

/* One pass over the block: reads p, g, m, v and writes p, m, v — 28 bytes per
   parameter, the minimum — in float4 (16-byte accesses) when the four pointers
   share their offset within 16 bytes (cudaMalloc'd blocks all do), element by
   element for the rest (esft_cuda__split). Multi-tensor by layout: the trainer
   and esft_moe keep every trainable tensor of a model in one flat block with
   mirrored gradients, m and v, so one launch updates all tensors at once (what
   torch's fused multi-tensor apply assembles from per-tensor pointers). Every
   element takes the CPU's float operations in the CPU's order, each rounded on
   its own (the _rn intrinsics forbid fused multiply-adds), with the scalar
   factors computed on the host by the CPU's formulas: the result is the CPU's
   bits, whichever path an element takes.
   The CPU contract — a NaN/Inf gradient gives ESFT_ERR_NUMERIC and nothing
   changes — costs one float4 read of g (4 bytes per parameter) before the
   update, and no extra round trip: the check and the update are queued
   together and the update kernel does nothing when the check has set the flag,
   so the op waits for the stream once. */
typedef struct esft_cuda__adamw_params {
    float b1, b2, one_minus_b1, one_minus_b2, decay, step_size, bc2_sqrt, eps;
} esft_cuda__adamw_params;

__device__ static void esft_cuda__adamw_one(float *p, float g, float *m, float *v, const esft_cuda__adamw_params *a)
{
    float mi = __fadd_rn(__fmul_rn(a->b1, *m), __fmul_rn(a->one_minus_b1, g));
    float vi = __fadd_rn(__fmul_rn(a->b2, *v), __fmul_rn(__fmul_rn(a->one_minus_b2, g), g));
    float den = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), a->bc2_sqrt), a->eps);
    *p = __fsub_rn(__fmul_rn(*p, a->decay), __fdiv_rn(__fmul_rn(a->step_size, mi), den));
    *m = mi;
    *v = vi;
}

/* p, g, m, v must not overlap (mirrored blocks never do). flag: the finite
   check's result, queued before; anything but ~0 means leave everything. */
__global__ static void esft_cuda__adamw_kernel(float *__restrict__ p, const float *__restrict__ g,
                                               float *__restrict__ m, float *__restrict__ v, esft_cuda__split sp,
                                               esft_cuda__adamw_params a, const unsigned long long *flag)
{
    float4 *p4 = (float4 *)(p + sp.head), *m4 = (float4 *)(m + sp.head), *v4 = (float4 *)(v + sp.head);
    const float4 *g4 = (const float4 *)(g + sp.head);
    if (*flag != ~0ULL) return;
    for (size_t i = esft_cuda__thread(); i < sp.n4; i += esft_cuda__threads()) {
        float4 pv = p4[i], gv = g4[i], mv = m4[i], vv = v4[i];
        esft_cuda__adamw_one(&pv.x, gv.x, &mv.x, &vv.x, &a);
        esft_cuda__adamw_one(&pv.y, gv.y, &mv.y, &vv.y, &a);
        esft_cuda__adamw_one(&pv.z, gv.z, &mv.z, &vv.z, &a);
        esft_cuda__adamw_one(&pv.w, gv.w, &mv.w, &vv.w, &a);
        p4[i] = pv;
        m4[i] = mv;
        v4[i] = vv;
    }
    for (size_t r = esft_cuda__thread(); r < sp.n_one; r += esft_cuda__threads()) {
        size_t i = esft_cuda__one_at(&sp, r);
        esft_cuda__adamw_one(p + i, g[i], m + i, v + i, &a);
    }
}

static esft_cuda__adamw_params esft_cuda__adamw_factors(const esft_adamw_config *cfg, long step)
{
    esft_cuda__adamw_params a;
    double bc1 = 1.0 - pow((double)cfg->beta1, (double)step);
    double bc2 = 1.0 - pow((double)cfg->beta2, (double)step);
    a.b1 = cfg->beta1;
    a.b2 = cfg->beta2;
    a.one_minus_b1 = 1.0f - cfg->beta1;
    a.one_minus_b2 = 1.0f - cfg->beta2;
    a.decay = 1.0f - cfg->lr * cfg->weight_decay;
    a.step_size = (float)(cfg->lr / bc1);
    a.bc2_sqrt = (float)sqrt(bc2);
    a.eps = cfg->eps;
    return a;
}

static esft_status esft_cuda__adamw_step(void *context, const esft_adamw_config *cfg, float *params,
                                         const float *grads, float *m, float *v, size_t n, long step,
                                         esft_error *err)
{
    esft_cuda__context *c = (esft_cuda__context *)context;
    const void *ptrs[4] = {params, grads, m, v};
    esft_cuda__split sp = esft_cuda__split_of(ptrs, 4, n);
    unsigned long long bad;
    float value;
    esft_status s;
    if (n == 0) return ESFT_OK;
    if ((s = esft_cuda__need_device(params, "params", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(grads, "grads", err)) != ESFT_OK ||
        (s = esft_cuda__need_device(m, "m", err)) != ESFT_OK || (s = esft_cuda__need_device(v, "v", err)) != ESFT_OK)
        return s;
    if ((s = esft_cuda__queue_finite(c, grads, n, err)) != ESFT_OK) return s;
    esft_cuda__adamw_kernel<<<esft_cuda__split_grid(&sp, 256, 65535 * 8), 256, 0, c->stream>>>(
        params, grads, m, v, sp, esft_cuda__adamw_factors(cfg, step), c->flag);
    if ((s = esft_cuda__launched("adamw kernel", err)) != ESFT_OK) {
        (void)esft_cuda__take_flag(c, &bad, NULL); /* waits for the queued check, re-arms the flag */
        return s;
    }
    if ((s = esft_cuda__first_nonfinite(c, grads, &bad, &value, err)) != ESFT_OK || bad == ~0ULL) return s;
    /* the CPU op's message (esft__adamw_step_cpu), word for word */
    return esft_cuda__fail(err, ESFT_ERR_NUMERIC, "gradient %llu is %s", bad, isnan(value) ? "NaN" : "Inf");
}

/* --- global-norm gradient clipping (esft_clip_grad_norm_with) ---
   sum_squares: two passes with a fixed shape, so the same block gives the same
   bits on every run. Pass 1: ESFT_CUDA__SUM_BLOCKS at most (fewer for small n,
   a function of n and the pointer's offset within 16 bytes only, never of the
   device), each thread adds the squares of its elements in double (float4
   reads), the block adds its threads in a fixed tree; pass 2: one block adds
   the partials the same way. No atomics. Each square of a float is exact in
   double, so the only difference from the CPU's running sum is the order of
   the additions (docs/cuda.md: ~1e-12 relative at worst in practice). */
#define ESFT_CUDA__SUM_THREADS 256 /* a power of two: the tree halves it */
#define ESFT_CUDA__SUM_BLOCKS 1024

/* The sum of every thread's v, in a fixed tree; the result is valid in thread 0. */
__device__ static double esft_cuda__block_sum(double v, double *smem)
{
    smem[threadIdx.x] = v;
    __syncthreads();
    for (unsigned half = ESFT_CUDA__SUM_THREADS / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) smem[threadIdx.x] += smem[threadIdx.x + half];
        __syncthreads();
    }
    return smem[0];
}

__device__ static double esft_cuda__square(float x) { return (double)x * (double)x; }

__global__ static void esft_cuda__sum_squares_kernel(double *partial, const float *x, esft_cuda__split sp)
{
    __shared__ double smem[ESFT_CUDA__SUM_THREADS];
    const float4 *x4 = (const float4 *)(x + sp.head);
    double acc = 0.0, total;
    for (size_t i = esft_cuda__thread(); i < sp.n4; i += esft_cuda__threads()) {
        float4 q = x4[i];
        acc += esft_cuda__square(q.x) + esft_cuda__square(q.y) + esft_cuda__square(q.z) + esft_cuda__square(q.w);
    }
    for (size_t r = esft_cuda__thread(); r < sp.n_one; r += esft_cuda__threads())
        acc += esft_cuda__square(x[esft_cuda__one_at(&sp, r)]);
    total = esft_cuda__block_sum(acc, smem);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

/* One block: out[0] = the sum of partial[0..n), each thread's share in index order, then the tree. */
__global__ static void esft_cuda__sum_partials_kernel(double *out, const double *partial, unsigned n)
{
    __shared__ double smem[ESFT_CUDA__SUM_THREADS];
    double acc = 0.0, total;
    for (unsigned i = threadIdx.x; i < n; i += ESFT_CUDA__SUM_THREADS) acc += partial[i];
    total = esft_cuda__block_sum(acc, smem);
    if (threadIdx.x == 0) out[0] = total;
}

static esft_status esft_cuda__sum_squares(void *context, const float *x, size_t n, double *sum, esft_error *err)
{
    esft_cuda__context *c = (esft_cuda__context *)context;
    const void *ptrs[1] = {x};
    esft_cuda__split sp = esft_cuda__split_of(ptrs, 1, n);
    unsigned blocks = esft_cuda__split_grid(&sp, ESFT_CUDA__SUM_THREADS, ESFT_CUDA__SUM_BLOCKS);
    double *scratch, block_sum = 0.0;
    void *mem;
    esft_status s;
    if (n == 0) return ESFT_OK;
    if ((s = esft_cuda__need_device(x, "gradients", err)) != ESFT_OK) return s;
    if ((s = esft_cuda__scratch(c, (ESFT_CUDA__SUM_BLOCKS + 1) * sizeof(double), &mem, err)) != ESFT_OK) return s;
    scratch = (double *)mem; /* [0, blocks): the partials; [ESFT_CUDA__SUM_BLOCKS]: the sum */
    esft_cuda__sum_squares_kernel<<<blocks, ESFT_CUDA__SUM_THREADS, 0, c->stream>>>(scratch, x, sp);
    if ((s = esft_cuda__launched("sum of squares kernel", err)) != ESFT_OK) return s;
    esft_cuda__sum_partials_kernel<<<1, ESFT_CUDA__SUM_THREADS, 0, c->stream>>>(scratch + ESFT_CUDA__SUM_BLOCKS,
                                                                                scratch, blocks);
    if ((s = esft_cuda__launched("sum of partials kernel", err)) != ESFT_OK) return s;
    s = esft_cuda__check(cudaMemcpyAsync(&block_sum, scratch + ESFT_CUDA__SUM_BLOCKS, sizeof block_sum,
                                         cudaMemcpyDeviceToHost, c->stream), "download the sum of squares", err);
    if (s == ESFT_OK) s = esft_cuda__finish(c, "sum of squares", err);
    if (s != ESFT_OK) return s;
    /* the CPU op's check and message (esft__sum_squares_cpu) */
    if (!isfinite(*sum + block_sum)) return esft_cuda__fail(err, ESFT_ERR_NUMERIC, "gradient norm is not finite");
    *sum += block_sum;
    return ESFT_OK;
}

/* x[i] *= factor, float4 where x's alignment allows; __fmul_rn is the CPU's product. */
__global__ static void esft_cuda__scale_kernel(float *x, esft_cuda__split sp, float factor)
{
    float4 *x4 = (float4 *)(x + sp.head);
    for (size_t i = esft_cuda__thread(); i < sp.n4; i += esft_cuda__threads()) {
        float4 q = x4[i];
        x4[i] = make_float4(__fmul_rn(q.x, factor), __fmul_rn(q.y, factor), __fmul_rn(q.z, factor),
                            __fmul_rn(q.w, factor));
    }
    for (size_t r = esft_cuda__thread(); r < sp.n_one; r += esft_cuda__threads()) {
        size_t i = esft_cuda__one_at(&sp, r);
        x[i] = __fmul_rn(x[i], factor);
    }
}

static esft_status esft_cuda__scale(void *context, float *x, size_t n, float factor, esft_error *err)
{
    esft_cuda__context *c = (esft_cuda__context *)context;
    const void *ptrs[1] = {x};
    esft_cuda__split sp = esft_cuda__split_of(ptrs, 1, n);
    esft_status s;
    if (n == 0) return ESFT_OK;
    if ((s = esft_cuda__need_device(x, "gradients", err)) != ESFT_OK) return s;
    esft_cuda__scale_kernel<<<esft_cuda__split_grid(&sp, 256, 65535 * 8), 256, 0, c->stream>>>(x, sp, factor);
    if ((s = esft_cuda__launched("scale kernel", err)) != ESFT_OK) return s;
    return esft_cuda__finish(c, "scale", err);
}

/* ===================================================================== */
/* 9. the table and its constructor                                      */
/* ===================================================================== */

/* The layer ops as the table holds them: a failure after work was queued
   (a cuBLAS refusal mid-op, a launch error, an input verdict) still returns
   with the stream finished, so the caller may free or refill its buffers at
   once, as after success (every op ends synchronised). */
static esft_status esft_cuda__settled(void *context, esft_status s)
{
    if (s != ESFT_OK) (void)cudaStreamSynchronize(((esft_cuda__context *)context)->stream);
    return s;
}

static esft_status esft_cuda__moe_forward_op(void *context, const esft_moe *m, float *y, float *aux_loss,
                                             const float *x, void *workspace, int T, esft_error *err)
{
    return esft_cuda__settled(context, esft_cuda__moe_forward(context, m, y, aux_loss, x, workspace, T, err));
}

static esft_status esft_cuda__moe_backward_op(void *context, const esft_moe *m, float *dx, const float *dy,
                                              const float *x, void *workspace, int T, esft_error *err)
{
    return esft_cuda__settled(context, esft_cuda__moe_backward(context, m, dx, dy, x, workspace, T, err));
}

static esft_status esft_cuda__pesc_forward_op(void *context, const esft_pesc_config *cfg, float *y, float *aux_loss,
                                              const float *F, const float *u, const float *params,
                                              esft_pesc_saved *sv, int T, esft_error *err)
{
    return esft_cuda__settled(context, esft_cuda__pesc_forward(context, cfg, y, aux_loss, F, u, params, sv, T, err));
}

static esft_status esft_cuda__pesc_backward_op(void *context, const esft_pesc_config *cfg, float *dF, float *du,
                                               float *dparams, const float *dy, float daux, esft_pesc_saved *sv,
                                               const float *F, const float *u, const float *params, int T,
                                               esft_error *err)
{
    return esft_cuda__settled(context, esft_cuda__pesc_backward(context, cfg, dF, du, dparams, dy, daux, sv, F, u,
                                                                params, T, err));
}

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
    /* .moe_forward = */ esft_cuda__moe_forward_op,
    /* .moe_backward = */ esft_cuda__moe_backward_op,
    /* .adamw_step = */ esft_cuda__adamw_step,
    /* .adapter_forward = */ esft_cuda__pesc_forward_op,
    /* .adapter_backward = */ esft_cuda__pesc_backward_op,
    /* .sum_squares = */ esft_cuda__sum_squares,
    /* .scale = */ esft_cuda__scale,
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
    if (s == ESFT_OK) {
        snprintf(c->device_name, sizeof c->device_name, "%s", prop.name);
        c->sm_count = prop.multiProcessorCount > 0 ? prop.multiProcessorCount : 1;
    }
    if (s == ESFT_OK) s = esft_cuda__check(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking),
                                           "cudaStreamCreate", err);
    if (s == ESFT_OK)
        s = esft_cuda__check(cudaMalloc((void **)&c->flag, ESFT_CUDA__FLAGS * sizeof *c->flag), "cudaMalloc flag", err);
    if (s == ESFT_OK)
        s = esft_cuda__check(cudaMallocHost((void **)&c->host_flags, ESFT_CUDA__FLAGS * sizeof *c->host_flags),
                             "cudaMallocHost flags", err);
    /* armed on the op stream (non-blocking, so unordered with the legacy stream) and waited for */
    for (int i = 0; i < ESFT_CUDA__FLAGS && s == ESFT_OK; i++) {
        c->host_flags[i] = none;
        s = esft_cuda__check(cudaMemcpyAsync(c->flag + i, &none, sizeof none, cudaMemcpyHostToDevice, c->stream),
                             "arm the error flags", err);
    }
    if (s == ESFT_OK) s = esft_cuda__check(cudaStreamSynchronize(c->stream), "arm the error flags", err);
    if (s != ESFT_OK) {
        if (c->flag) (void)cudaFree(c->flag);
        if (c->host_flags) (void)cudaFreeHost(c->host_flags);
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
