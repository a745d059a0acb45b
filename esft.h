/* esft.h - v0.1.0 - expert-specialised fine-tuning of Mixture-of-Experts models - licence at end

   Do this:
      #define ESFT_IMPLEMENTATION
   before you include this file in *one* C or C++ file to create the implementation.

      #include ...
      #define ESFT_IMPLEMENTATION
      #include "esft.h"

   A short example: measure which experts a task uses and pick the ones to train.

      esft_stats st;
      esft_stats_init(&st, n_layers, n_experts, top_k, NULL);
      for each sample s, for each MoE layer l of your forward pass:
          esft_stats_add(&st, l, ids, weights, mask, n_tokens, NULL);   // ids (T,K)
      esft_scores sc;
      esft_stats_scores(&st, ESFT_NORM_POOLED, &sc);
      esft_expert_config cfg;
      esft_select_top_p(&sc, ESFT_SCORE_TOKEN, 0.2, &cfg, NULL);
      esft_expert_config_write("config.json", &cfg, NULL);
      esft_expert_config_free(&cfg); esft_scores_free(&sc); esft_stats_uninit(&st);

   WHAT IT IS
      The CPU reference implementation of ESFT (DeepSeek, arXiv 2407.01906) and
      PESC (Camelidae, arXiv 2401.02731), plus the backend vtable that the optional
      esft_cuda.cu fills with GPU kernels. C99, no dependencies beyond libc and libm.

   FEATURES
      - Routing: softmax or sigmoid gating, top-k with or without renormalisation,
        selection bias (DeepSeek-V3), group-limited top-k, routed scaling factor.
      - Router statistics (ESFT Eq. 6-7): exact integer counts, fixed-point weight
        sums that merge to the same bits in any order; pooled and per-sample scores.
      - ESFT file formats: routing logs (streamed), summary.json, expert configs;
        a layers x experts heatmap (SVG) of scores and selection.
      - Expert selection: top-p per layer (ESFT's exact rule), top-k per layer,
        global budget.
      - MoE layer (DeepSeek-V2: router, routed + shared SwiGLU experts) forward and
        backward with selective training: gradients and optimizer state only for
        the trainable experts; load-balancing aux loss (batch or per sequence).
      - Adapters: one low-rank primitive (down, GELU or identity, up, scale) for
        plain LoRA and for PESC (Camelidae): a frozen dense FFN upcycled into an
        adapter MoE (router, top-k, n GELU adapters), forward/backward to every
        weight and input, seeded upcycling init (y == F at step 0), aux loss.
      - AdamW over the trainable block, global-norm gradient clipping.
      - Checkpoints: safetensors read/write (validated header, positioned reads,
        atomic writes, F32/F16/BF16), sharded index, Hugging Face MoE names
        (DeepSeek-V2, Mixtral, Qwen-MoE, Camelidae), fused 3-D experts; extract /
        save / merge experts.
      - Models: Hugging Face MoE checkpoint directories (DeepSeek-V2/V3, Qwen2/3-MoE,
        OLMoE, Mixtral; per-expert or fused experts; fp32, bf16, FP8 + block scales),
        and the dense Llama, Mistral and Qwen2 that PESC upcycles, run whole on the CPU with weights in their file dtype; the forward's own
        routing feeds the statistics; backward through the frozen model to the
        experts an ESFT config trains, or to a PESC adapter MoE after each dense
        MLP (fp32 master copies, 12 bytes per trainable parameter beyond them).
      - A small strict JSON reader/writer of our own (no outside library).

   CONTENTS (same order in declarations and implementation)
      1. version & options       5. routing               9. MoE layer
      2. status & error detail   6. router statistics    10. adapters (LoRA, PESC)
      3. allocation              7. expert selection     11. optimizer
      4. backend interface       8. ESFT file formats    12. checkpoints (safetensors)
                                                         13. JSON
                                                         14. models (Hugging Face MoE)

   COMPILE-TIME OPTIONS (#define before including)
      ESFT_IMPLEMENTATION      emit the implementation in this translation unit
      ESFT_STATIC              make every function static (private copy per unit)
      ESFT_MALLOC(sz)          \
      ESFT_REALLOC(p,sz)        > all three or none; default libc
      ESFT_FREE(p)             /
      ESFT_ASSERT(x)           internal invariant checks; default assert()
      ESFT_USE_CBLAS           route the internal GEMM to cblas_sgemm (#include
                               <cblas.h>; link your CBLAS, e.g. -lopenblas)
      ESFT_NO_SIMD             portable C micro-kernel even where AVX2/AVX-512 is on
      ESFT_NO_THREAD_LOCAL     no thread-local GEMM scratch (allocated per call)
      ESFT_NO_MODELS           leave out section 14 (model forward, JSONL data, .npy)
      ESFT_LOG_MAX_LINE        longest routing-log line read (default 64 MiB)
      (compiler flag) -fopenmp the CPU kernels use all cores; esft_set_num_threads

   DIMENSIONS used in shape comments
      T tokens   D model width   E routed experts   K experts per token (top-k)
      L layers   G expert groups   F routed expert hidden width   FS shared hidden width
      N floats in a layer's trainable block   R adapter rank (LoRA, PESC)

   CHANGES
      0.1.0 (2026-11-25)  routing, router statistics, selection, ESFT formats, JSON;
                          MoE layer with selective expert training, AdamW, clipping;
                          LoRA / PESC adapters; safetensors checkpoints; packed GEMM;
                          CUDA backend (esft_cuda.cu). See CHANGES.md.
*/
#ifndef ESFT_H
#define ESFT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ===================================================================== */
/* 1. version & options                                                  */
/* ===================================================================== */

#define ESFT_VERSION_MAJOR 0
#define ESFT_VERSION_MINOR 1
#define ESFT_VERSION_PATCH 0
#define ESFT_VERSION_STRING "0.1.0"

#ifndef ESFTDEF
#ifdef ESFT_STATIC
#define ESFTDEF static
#else
#define ESFTDEF extern
#endif
#endif

/* The version this implementation was compiled as; compare with the macros. */
ESFTDEF const char *esft_version(void);

/* Threads the CPU kernels use (built with OpenMP; otherwise always 1). 0, the
   default, means all: omp_get_max_threads(). Results have the same bits for any
   count. Set it before starting work, not while other threads call esft.
   Counts above ESFT_MAX_THREADS are taken as ESFT_MAX_THREADS (a mistyped count
   would otherwise ask OpenMP for millions of threads); negative counts as 0. */
#define ESFT_MAX_THREADS 1024
ESFTDEF void esft_set_num_threads(int n);
ESFTDEF int esft_get_num_threads(void);
/* Frees the packing scratch the CPU GEMM keeps for the calling thread (kept
   between calls so that no call allocates; the next call allocates it again). */
ESFTDEF void esft_release_thread_scratch(void);

/* ===================================================================== */
/* 2. status & error detail                                              */
/* ===================================================================== */

/* Every fallible function returns one of these. 0 is success; errors are
   negative and grouped: general (-1..), data (-10..), backend (-20..), I/O (-30..). */
typedef enum esft_status {
    ESFT_OK = 0,
    ESFT_ERR_INVALID_ARGUMENT = -1, /* a NULL pointer, a size out of range, p outside (0,1] */
    ESFT_ERR_OUT_OF_MEMORY = -2,    /* an allocation failed, or a size product overflowed */
    ESFT_ERR_PARSE = -10,           /* malformed input text or file content */
    ESFT_ERR_SHAPE = -11,           /* dimensions that do not agree */
    ESFT_ERR_RANGE = -12,           /* a value outside its domain: expert id >= E, weight < 0 */
    ESFT_ERR_NUMERIC = -13,         /* NaN or Inf where a finite number is required */
    ESFT_ERR_UNSUPPORTED = -20,     /* the backend lacks this op, or a format feature is unknown */
    ESFT_ERR_BACKEND = -21,         /* the backend failed (its text is in the error detail) */
    ESFT_ERR_IO = -30               /* a file could not be opened, read or written */
} esft_status;

/* One line naming the status, e.g. "parse error". Never NULL. */
ESFTDEF const char *esft_status_string(esft_status s);

/* Optional, caller-owned detail about a failure: where it happened and why.
   Pass NULL when you do not care. Filled only when a function fails. */
typedef struct esft_error {
    esft_status status;
    char message[256]; /* human text, e.g. "expert id 64 >= 64 experts" */
    char file[256];    /* the file being read or written, "" if none */
    long line;         /* 1-based line in file, 0 if not applicable */
    long offset;       /* byte offset in the input, -1 if not applicable */
} esft_error;

/* ===================================================================== */
/* 3. allocation                                                         */
/* ===================================================================== */

/* A run-time allocator; NULL everywhere means ESFT_MALLOC / ESFT_FREE.
   Objects remember the allocator that made them. */
typedef struct esft_allocator {
    void *user;
    void *(*alloc)(void *user, size_t size);
    void (*free)(void *user, void *ptr);
} esft_allocator;

/* ===================================================================== */
/* 4. backend interface                                                  */
/* ===================================================================== */

/* A backend is a table of function pointers that runs the heavy ops of this
   library somewhere (the CPU here, a GPU in esft_cuda.cu). Contract:
   - api_version is the first field and must equal ESFT_BACKEND_API_VERSION;
     a mismatch is rejected with both numbers in the error detail.
   - Memory spaces are explicit. Pointers passed to ops live in the backend's
     own memory (alloc/upload); the CPU backend's memory is ordinary host
     memory. No public function reads a backend's memory on the host: the
     wrappers move data only through the backend's upload/download (the MoE
     workspace's stamp, a stats histogram), and objects put their blocks in the
     backend's memory when given one (esft_stats_set_backend,
     esft_moe_set_backend, esft_adamw_set_backend: object first, the one way
     to choose an object's backend; stateless calls take it as esft_*_with(b, ...)).
   - An op the backend lacks is NULL; calling it returns ESFT_ERR_UNSUPPORTED.
     Nothing falls back to another backend silently.
   - The wrapper checks the request (shapes, NULLs, workspace size, config);
     the op checks the data, which only it can read: NaN/Inf in inputs
     (ESFT_ERR_NUMERIC), ids and weights out of range (ESFT_ERR_RANGE), and
     reports them through its status and err, as the CPU backend does.
   - Backwards accumulate into gradients, as the CPU reference does.
   - Results match the CPU backend within the tolerances each test states.
   To add a backend (docs/backend.md has a worked example):
     1. Start from a zeroed esft_backend (every op NULL: unsupported) or, for a
        backend whose memory is host memory, from a copy of *esft_backend_cpu()
        (ops not yet written stay the CPU's). Set api_version, name, context.
     2. Fill the memory entries (alloc/free/upload/download, synchronize) and
        replace ops one at a time with yours, same signatures, same semantics.
     3. Return the table from a constructor (`const esft_backend *my_backend(...)`).
     4. Use it: esft_route_with(b, ...), stats.backend = b, layer.backend = b,
        opt.backend = b; every public call then runs on it.
     5. Run the same tests through it and compare with the CPU backend. */
#define ESFT_BACKEND_API_VERSION 2 /* 2: sum_squares and scale appended */

struct esft_route_config;
struct esft_moe;
struct esft_adamw_config;
struct esft_pesc_config;
struct esft_pesc_saved;

typedef struct esft_backend {
    int api_version;  /* ESFT_BACKEND_API_VERSION */
    const char *name; /* "cpu", "cuda", ... */
    void *context;    /* the backend's own state */

    /* memory */
    esft_status (*alloc)(void *context, size_t bytes, void **out);
    void (*free)(void *context, void *ptr);
    esft_status (*upload)(void *context, void *dst, const void *src, size_t bytes);
    esft_status (*download)(void *context, void *dst, const void *src, size_t bytes);
    esft_status (*synchronize)(void *context); /* (optional) */

    /* ops */
    esft_status (*route)(void *context, const struct esft_route_config *cfg,
                         int32_t *ids,      /* (T, K) */
                         float *weights,    /* (T, K) */
                         float *probs,      /* (T, E) or NULL */
                         const float *logits, /* (T, E) */
                         int T, esft_error *err);
    esft_status (*stats_accumulate)(void *context,
                                    uint64_t *count,    /* (E) += selections */
                                    uint64_t *gate_sum, /* (E) += weights, fixed point */
                                    const int32_t *ids, /* (T, K) */
                                    const float *weights,       /* (T, K) or NULL */
                                    const unsigned char *mask,  /* (T) or NULL */
                                    int T, int K, int E, esft_error *err);
    /* MoE layer (section "MoE layer"): weights, gradients and workspace are the layer's
       (see esft_moe); the backward accumulates into dx and layer->grads. */
    esft_status (*moe_forward)(void *context, const struct esft_moe *layer,
                               float *y,          /* (T, D) out */
                               float *aux_loss,   /* (1) out */
                               const float *x,    /* (T, D) */
                               void *workspace, int T, esft_error *err);
    esft_status (*moe_backward)(void *context, const struct esft_moe *layer,
                                float *dx,         /* (T, D) += */
                                const float *dy,   /* (T, D) */
                                const float *x,    /* (T, D) */
                                void *workspace, int T, esft_error *err);
    /* Optimizer (section "optimizer"): one AdamW step over n floats of mirrored blocks. */
    esft_status (*adamw_step)(void *context, const struct esft_adamw_config *cfg,
                              float *params,      /* (n) updated in place */
                              const float *grads, /* (n) */
                              float *m, float *v, /* (n) Adam moments, updated */
                              size_t n, long step, esft_error *err);
    /* the PESC adapter MoE layer (esft_pesc_forward / _backward) */
    esft_status (*adapter_forward)(void *context, const struct esft_pesc_config *cfg,
                                   float *y,            /* (T, D) */
                                   float *aux_loss,     /* (1) host memory, or NULL */
                                   const float *F,      /* (T, D) */
                                   const float *u,      /* (T, D) */
                                   const float *params, /* (esft_pesc_param_count) */
                                   struct esft_pesc_saved *saved, int T, esft_error *err);
    esft_status (*adapter_backward)(void *context, const struct esft_pesc_config *cfg,
                                    float *dF,           /* (T, D) += */
                                    float *du,           /* (T, D) += or NULL */
                                    float *dparams,      /* (esft_pesc_param_count) += or NULL */
                                    const float *dy,     /* (T, D) */
                                    float daux, struct esft_pesc_saved *saved,
                                    const float *F, const float *u, const float *params,
                                    int T, esft_error *err);
    /* Global-norm clipping (esft_clip_grad_norm_with), one gradient block per call.
       sum_squares: *sum += the sum of x[i]^2 in double (sum is host memory; each
       square is exact in double, the additions are the backend's own order);
       NaN/Inf in x -> ESFT_ERR_NUMERIC and *sum unchanged. scale: x[i] *= factor,
       each product rounded to float (the CPU's bits on every backend). */
    esft_status (*sum_squares)(void *context, const float *x, /* (n) */
                               size_t n, double *sum, esft_error *err);
    esft_status (*scale)(void *context, float *x, /* (n) updated */
                         size_t n, float factor, esft_error *err);
} esft_backend;

/* The CPU reference backend; always present, never NULL. */
ESFTDEF const esft_backend *esft_backend_cpu(void);

/* Checks a backend's api_version (and that it has a name). */
ESFTDEF esft_status esft_backend_check(const esft_backend *b, esft_error *err);

/* The CUDA backend, defined in esft_cuda.cu (link it and -lcublas to use it).
   Returns NULL with the reason in err (ESFT_ERR_BACKEND, CUDA's text) when there
   is no GPU or CUDA fails to start; otherwise the same table on every call, on
   the device current at the first call. Memory from its alloc is device memory;
   its ops reject host pointers. Not ESFTDEF: it lives in its own file. */
extern const esft_backend *esft_backend_cuda(esft_error *err);

/* ===================================================================== */
/* 5. routing                                                            */
/* ===================================================================== */

typedef enum esft_gating {
    ESFT_GATING_SOFTMAX = 0, /* DeepSeek-V2, Mixtral, Qwen-MoE: p = softmax(logits) */
    ESFT_GATING_SIGMOID = 1  /* DeepSeek-V3/R1: p = sigmoid(logits) */
} esft_gating;

typedef enum esft_group_score {
    ESFT_GROUP_SCORE_MAX = 0,     /* a group's score is its best expert (V2 group_limited_greedy) */
    ESFT_GROUP_SCORE_TOP2_SUM = 1 /* sum of its two best biased scores (V3 noaux_tc) */
} esft_group_score;

typedef struct esft_route_config {
    int n_experts;                /* E */
    int top_k;                    /* K, 1 <= K <= E */
    esft_gating gating;
    int renormalize;              /* 1: weights of the K chosen sum to 1 (norm_topk_prob) */
    int n_group;                  /* G; 0 or 1 = no grouping. E must divide by G */
    int topk_group;               /* groups kept per token, 1..G */
    esft_group_score group_score;
    float routed_scaling;         /* weights are multiplied by this; 1 = none */
    const float *selection_bias;  /* (E) or NULL: added for selection only (V3 e_score_correction_bias) */
} esft_route_config;

/* Defaults: softmax, no renormalisation, no groups, scaling 1 (DeepSeek-V2-Lite). */
ESFTDEF esft_route_config esft_route_config_init(int n_experts, int top_k);

/* Presets of named model families (values from their Hugging Face configs). */
ESFTDEF esft_route_config esft_route_config_deepseek_v2_lite(void); /* E 64, K 6 */
ESFTDEF esft_route_config esft_route_config_deepseek_v3(const float *bias); /* E 256, K 8, G 8/4, 2.5 */

/* Validates cfg: sizes, groups dividing E, K reachable within the kept groups, and
   every selection_bias entry finite (so the bias, when given, must be host memory
   here). esft_route_with checks the sizes only, as the bias may live on a device;
   the CPU backend checks the bias when it routes. */
ESFTDEF esft_status esft_route_config_validate(const esft_route_config *cfg, esft_error *err);

/* Router logits -> top-K expert ids and weights, per token.
   Ids of a token are in descending order of selection score; ties go to the
   lower expert id. probs (optional) receives the gating probabilities of all E
   experts (softmax or sigmoid, before bias), which the auxiliary loss needs.
   NaN/Inf logits -> ESFT_ERR_NUMERIC naming the token; outputs are then undefined. */
ESFTDEF esft_status esft_route(const esft_route_config *cfg,
                               int32_t *ids,         /* (T, K) out */
                               float *weights,       /* (T, K) out */
                               float *probs,         /* (T, E) out, or NULL */
                               const float *logits,  /* (T, E) */
                               int T, esft_error *err);

/* The same through a backend (memory must be that backend's). */
ESFTDEF esft_status esft_route_with(const esft_backend *b, const esft_route_config *cfg,
                                    int32_t *ids, float *weights, float *probs,
                                    const float *logits, int T, esft_error *err);

/* ===================================================================== */
/* 6. router statistics (ESFT Eq. 6-7)                                   */
/* ===================================================================== */

/* Weight sums are kept in fixed point: a weight w adds round(w * 2^32) to a
   64-bit integer. Integer sums are exact and associative, so accumulators merged
   in any order (threads, files, machines) give the same bits. Resolution
   2^-32 ~ 2.3e-10 per weight; capacity 2^32 units of weight per (layer, expert)
   (4e9 tokens of weight 1). esft_stats_add and esft_stats_merge refuse, with
   ESFT_ERR_RANGE and nothing added, what would pass it (a sum would wrap), as
   they do a single sample whose weights sum past ESFT_MAX_SAMPLE_WEIGHT. */
#define ESFT_FIXED_ONE 4294967296.0

/* The largest gate weight accepted. Gate weights are router probabilities times
   a routed scaling factor (1 to 16 in real models), so 2^16 is far above any real
   model's; a larger weight is a bug upstream (logits passed as weights), and a
   few of them would wrap the fixed-point sums. Refused with ESFT_ERR_RANGE. */
#define ESFT_MAX_GATE_WEIGHT 65536.0f

/* The most weight one sample may carry over all its tokens and experts (just
   below 2^32, the fixed-point capacity of one expert's sum): a sample's histogram
   could otherwise wrap. Checked only for samples of at least 2^16 assignments,
   the smallest that can reach it; softmax weights (<= 1) never do. */
#define ESFT_MAX_SAMPLE_WEIGHT 4.29e9

typedef enum esft_norm {
    ESFT_NORM_POOLED = 0,     /* pool all tokens of a layer (reproduces ESFT's summary.json) */
    ESFT_NORM_PER_SAMPLE = 1  /* mean over samples of the per-sample value (the paper's Eq. 6-7) */
} esft_norm;

typedef enum esft_score {
    ESFT_SCORE_TOKEN = 0, /* selection frequency: count / (K * N) */
    ESFT_SCORE_GATE = 1   /* mean gate weight: sum of weights / N */
} esft_score;

/* Accumulator over (layer, expert). Layers are numbered 0..n_layers-1 as the
   caller numbers them (ESFT's logs use 1..26 for DeepSeek-V2-Lite, so 27 layers
   with layer 0 never fed). Not thread-safe: give each thread its own and merge. */
typedef struct esft_stats {
    int n_layers, n_experts, top_k;   /* L, E, K */
    uint64_t *count;          /* (L, E) times e was in a counted token's top-K */
    uint64_t *gate_sum;       /* (L, E) sum of e's weights, fixed point */
    uint64_t *n_tokens;       /* (L) counted tokens */
    uint64_t *n_samples;      /* (L) samples with at least one counted token */
    uint64_t *token_frac_sum; /* (L, E) sum over samples of count_s/(K N_s), fixed point */
    uint64_t *gate_frac_sum;  /* (L, E) sum over samples of gate_sum_s/N_s, fixed point */
    uint64_t *scratch;        /* (2E) one sample's histogram, host */
    const esft_backend *backend; /* runs stats_accumulate; CPU by default (esft_stats_set_backend) */
    void *backend_scratch;    /* (2E) the histogram in the backend's memory, or NULL (host backends) */
    const esft_backend *scratch_backend; /* the backend that made backend_scratch */
    esft_allocator allocator;
} esft_stats;

/* Allocates zeroed accumulators. allocator may be NULL. Pair: esft_stats_uninit.
   Sizes past the limits below are ESFT_ERR_RANGE, before any allocation (a
   mistyped --layers used to touch gigabytes on its way to "out of memory"):
   the largest MoE models have ~100 layers and ~2048 experts. */
#define ESFT_STATS_MAX_LAYERS 16384
#define ESFT_STATS_MAX_EXPERTS 65536
#define ESFT_STATS_MAX_CELLS ((int64_t)1 << 24) /* layers x experts: 4 x 128 MiB of counters */
ESFTDEF esft_status esft_stats_init(esft_stats *st, int n_layers, int n_experts, int top_k,
                                    const esft_allocator *allocator);
ESFTDEF void esft_stats_uninit(esft_stats *st);
ESFTDEF void esft_stats_reset(esft_stats *st);

/* Adds one sample's routing at one layer: T tokens, K ids and weights each.
   mask (optional): tokens with mask[t] == 0 are not counted (e.g. the prompt).
   weights may be NULL (token scores only; gate sums then stay 0).
   ids, weights and mask are in st->backend's memory (host memory for the CPU).
   Validates everything before st changes (ids in [0,E), weights finite in [0,
   ESFT_MAX_GATE_WEIGHT], layer in range, no sum past its capacity: see
   ESFT_FIXED_ONE); the data checks are the backend's, so on a GPU they run
   there. On error nothing is added. */
ESFTDEF esft_status esft_stats_add(esft_stats *st, int layer,
                                   const int32_t *ids,        /* (T, K) */
                                   const float *weights,      /* (T, K) or NULL */
                                   const unsigned char *mask, /* (T) or NULL */
                                   int T, esft_error *err);

/* Runs st's later esft_stats_add calls on b (its stats_accumulate op), whose
   memory then holds their ids, weights and mask. A backend with memory of its
   own (not the host's) gets the sample's histogram (2E counters) allocated
   there; the accumulator itself stays in host memory, so merging, scores and
   files work as before. The backend checks the routing (ids, weights) and
   reports through its status. Replaces setting st->backend by hand. */
ESFTDEF esft_status esft_stats_set_backend(esft_stats *st, const esft_backend *b, esft_error *err);

/* dst += src. Shapes must agree. The result does not depend on merge order.
   A sum that would pass its capacity is ESFT_ERR_RANGE naming the (layer, expert);
   dst is then unchanged. */
ESFTDEF esft_status esft_stats_merge(esft_stats *dst, const esft_stats *src, esft_error *err);

/* ===================================================================== */
/* 7. expert selection                                                   */
/* ===================================================================== */

/* Scores of every (layer, expert); what summary.json holds. */
typedef struct esft_scores {
    int n_layers, n_experts;        /* L, E */
    double *token;                  /* (L, E) */
    double *gate;                   /* (L, E) */
    unsigned char *layer_present;   /* (L) 1 if the layer has scores */
    esft_allocator allocator;
} esft_scores;

/* Scores from an accumulator; layers never fed are marked absent. Pair: esft_scores_free. */
ESFTDEF esft_status esft_stats_scores(const esft_stats *st, esft_norm norm, esft_scores *out);
ESFTDEF esft_status esft_scores_alloc(esft_scores *sc, int n_layers, int n_experts,
                                      const esft_allocator *allocator);
ESFTDEF void esft_scores_free(esft_scores *sc);
/* Rounds every score to `decimals` places, 0..17, the way Python's round() does.
   Other counts are ESFT_ERR_INVALID_ARGUMENT (printf would read a negative count
   as 6 places), as are NULL scores or scores without tables; sc is then unchanged. */
ESFTDEF esft_status esft_scores_round(esft_scores *sc, int decimals);

/* Which experts of each layer to train, in selection order; ESFT's expert config. */
typedef struct esft_expert_config {
    int n_layers, n_experts;      /* L, E (E = 0 if unknown, e.g. read from a file) */
    int *offset;                  /* (L + 1): layer l's ids are ids[offset[l] .. offset[l+1]) */
    int32_t *ids;                 /* (offset[L]) */
    unsigned char *layer_present; /* (L) */
    int shared_experts;           /* train the shared experts too */
    int non_expert_modules;       /* train attention, norms, router, embeddings too */
    esft_allocator allocator;
} esft_expert_config;

ESFTDEF void esft_expert_config_free(esft_expert_config *cfg);
/* 1 if expert e of layer l is selected. */
ESFTDEF int esft_expert_config_has(const esft_expert_config *cfg, int layer, int expert);
/* Total selected experts over all layers. */
ESFTDEF int esft_expert_config_count(const esft_expert_config *cfg);

/* ESFT's rule, per layer: sort scores descending (ties: lower id first), take
   experts while the running sum is < p; the expert that crosses p is included.
   p in (0, 1]. */
ESFTDEF esft_status esft_select_top_p(const esft_scores *sc, esft_score which, double p,
                                      esft_expert_config *out, esft_error *err);
/* The k best experts of every present layer (ties: lower id). 1 <= k <= E. */
ESFTDEF esft_status esft_select_top_k(const esft_scores *sc, esft_score which, int k,
                                      esft_expert_config *out, esft_error *err);
/* The n best (layer, expert) pairs over all layers (ties: lower layer, then lower
   id); ids listed per layer in descending score. 1 <= n <= present layers * E. */
ESFTDEF esft_status esft_select_budget(const esft_scores *sc, esft_score which, int n,
                                       esft_expert_config *out, esft_error *err);

/* ===================================================================== */
/* 8. ESFT file formats                                                  */
/* ===================================================================== */

/* Routing log: one line per sample; the K ids of every token (token-major),
   tab-separated; "\t\t"; the matching weights, tab-separated. Streamed in chunks,
   so a file of any size is read in bounded memory. Adds every line as one sample
   of `layer`. err names file and line on failure; then nothing of this file is
   kept in st (it is added to a private accumulator first and merged at the end).
   Only a regular file is read (a FIFO or device is ESFT_ERR_IO, without waiting);
   a line longer than ESFT_LOG_MAX_LINE bytes is ESFT_ERR_RANGE naming it. Time is
   linear in the file's size, however long its lines. */
#ifndef ESFT_LOG_MAX_LINE
#define ESFT_LOG_MAX_LINE ((size_t)64 << 20) /* a 32k-token sample at top-8 is ~3 MB */
#endif
ESFTDEF esft_status esft_stats_read_log(esft_stats *st, int layer, const char *path,
                                        esft_error *err);
/* The same from memory (a whole file's bytes); name is used in messages. */
ESFTDEF esft_status esft_stats_read_log_memory(esft_stats *st, int layer, const char *data,
                                               size_t size, const char *name, esft_error *err);
/* Every expert_weights_<L>.txt in dir, layer L each. Layers found are reported
   through n_files (optional). A file for a layer L >= n_layers (probed up to
   n_layers + 1023) is ESFT_ERR_RANGE naming it, before anything is read. */
ESFTDEF esft_status esft_stats_read_log_dir(esft_stats *st, const char *dir, int *n_files,
                                            esft_error *err);

/* summary.json: {"token_scores": {"<L>": {"<e>": s, ...}, ...}, "gate_scores": {...}}.
   decimals >= 0 rounds on writing (ESFT's files use 4); -1 writes full precision
   (shortest round-trip). Keys are written in ESFT's order, so a rounded file is
   byte-identical to theirs. Files are written to "<path>.tmp.<pid>.<n>" and renamed. */
ESFTDEF esft_status esft_scores_write_json(const char *path, const esft_scores *sc,
                                           int decimals, esft_error *err);
ESFTDEF esft_status esft_scores_read_json(const char *path, esft_scores *out, esft_error *err);
ESFTDEF esft_status esft_scores_parse_json(const char *text, size_t size, const char *name,
                                           esft_scores *out, esft_error *err);

/* Expert config: {"experts": {"<L>": [ids...], ...}, "shared_experts": b, "non_expert_modules": b}. */
ESFTDEF esft_status esft_expert_config_write(const char *path, const esft_expert_config *cfg,
                                             esft_error *err);
ESFTDEF esft_status esft_expert_config_read(const char *path, esft_expert_config *out,
                                            esft_error *err);
ESFTDEF esft_status esft_expert_config_parse(const char *text, size_t size, const char *name,
                                             esft_expert_config *out, esft_error *err);

/* Heatmap of layers x experts as an SVG picture: colour = the chosen score
   (a viridis-like scale with a colour bar), the experts of `selected` outlined,
   layer numbers and expert ids on the axes, the selected count per layer.
   sc may be NULL to draw a config alone (outlines and selection ranks; E is
   selected->n_experts, or the highest id rounded up to a multiple of 8 when 0);
   selected may be NULL to draw scores alone. Over 4096 experts or 65536 cells:
   ESFT_ERR_RANGE. Written to "<path>.tmp.<pid>.<n>" and renamed. */
ESFTDEF esft_status esft_heatmap_write_svg(const char *path, const esft_scores *sc, esft_score which,
                                           const esft_expert_config *selected, esft_error *err);

/* ===================================================================== */
/* 9. MoE layer with selective expert training                           */
/* ===================================================================== */

/* A DeepSeek-V2 MoE feed-forward layer: router, E routed SwiGLU experts of
   which each token uses K, and an always-on shared SwiGLU block.

       p   = softmax(x W_r^T)                 router probabilities  (T, E)
       ids, w = top-K of p (esft_route)       optional renormalisation, scaling
       E_e(x) = W_down,e (silu(W_gate,e x) * (W_up,e x))
       y   = sum_j w_j E_{ids_j}(x) + c(x) S(x)   S: the same SwiGLU, width FS
       c(x) = 1, or sigmoid(x . w_s) when shared_gated (Qwen2-MoE's
              shared_expert_gate, one scalar per token)

   Dimensions: T tokens, D model, E routed experts, K per token, F hidden width
   of one routed expert (moe_intermediate_size), FS hidden width of the shared
   block (n_shared_experts * F; 0 = no shared block).

   Weight layout = the Hugging Face tensors, so loading a checkpoint is a memcpy:
       router       (E, D)      model.layers.{l}.mlp.gate.weight
       gate, up     (E, F, D)   ...mlp.experts.{e}.{gate,up}_proj.weight, expert-major
       down         (E, D, F)   ...mlp.experts.{e}.down_proj.weight
       shared gate, up (FS, D), shared down (D, FS)   ...mlp.shared_experts.*
       shared router w_s (1, D)   Qwen2-MoE ...mlp.shared_expert_gate.weight

   Selective training (ESFT): only the experts marked trainable, and the router
   and shared block when their flags are set, are copied into ONE contiguous
   parameter block of N floats, mirrored by a gradient block of the same layout
   (and by the optimizer's m and v). Frozen weights stay where the caller keeps
   them, read-only. A layer with 6 of 64 experts trainable owns 6 experts'
   parameters and gradients and nothing else. Block layout, in this order:
       for each trainable expert e, increasing id: gate (F, D), up (F, D), down (D, F)
       router (E, D)                                    if train_router
       shared gate (FS, D), up (FS, D), down (D, FS)    if train_shared
       shared router (1, D)                             if train_shared and shared_gated

   Load-balancing auxiliary loss (DeepSeek-V2; ESFT trains with alpha 0.001):
       batch:        L = alpha * E * sum_i f_i P_i over all T tokens
       per sequence: the same per sequence of aux_seq_len tokens, averaged
   f_i = fraction of the routing slots (K per token) that go to expert i,
   P_i = mean router probability of i. Its gradient (through P; f is piecewise
   constant) flows into the router and x in the backward, with upstream 1.
   Softmax gating only (sigmoid gating with alpha > 0 -> ESFT_ERR_UNSUPPORTED).

   Backend: a layer runs its ops on layer->backend, esft_backend_cpu() after
   init, whose blocks are host memory from the allocator; esft_moe_set_backend
   moves the blocks into another backend's memory and runs the layer there. */

typedef enum esft_aux_mode {
    ESFT_AUX_BATCH = 0,   /* f and P over the whole batch of T tokens */
    ESFT_AUX_SEQUENCE = 1 /* per sequence of aux_seq_len tokens, averaged (seq_aux) */
} esft_aux_mode;

typedef struct esft_moe_config {
    int d_model;                  /* D */
    int d_expert;                 /* F, hidden width of one routed expert */
    int d_shared;                 /* FS, hidden width of the shared block; 0 = none */
    esft_route_config route;      /* E, K, gating, renormalisation, scaling */
    float aux_alpha;              /* auxiliary loss weight; 0 disables it */
    esft_aux_mode aux_mode;
    int aux_seq_len;              /* ESFT_AUX_SEQUENCE: tokens per sequence; T % it == 0 */
    const unsigned char *trainable_experts; /* (E) nonzero = train; NULL = none */
    int train_router;             /* ESFT's non_expert_modules (router part) */
    int train_shared;             /* ESFT's shared_experts (with the shared router when gated) */
    int shared_gated;             /* Qwen2-MoE: shared output times sigmoid(x . shared_router) */
} esft_moe_config;

/* The layer's weights as the caller holds them (see the layout above). */
typedef struct esft_moe_weights {
    const float *router;      /* (E, D) */
    const float *gate;        /* (E, F, D) */
    const float *up;          /* (E, F, D) */
    const float *down;        /* (E, D, F) */
    const float *shared_gate; /* (FS, D), NULL when FS = 0 */
    const float *shared_up;   /* (FS, D) */
    const float *shared_down; /* (D, FS) */
    const float *shared_router; /* (1, D) when cfg.shared_gated, else unused */
} esft_moe_weights;

typedef struct esft_moe {
    esft_moe_config cfg;          /* cfg.trainable_experts is not kept: see slot */
    esft_moe_weights frozen;      /* the caller's weights (trainable parts unused) */
    const esft_backend *backend;  /* runs moe_forward / moe_backward (esft_moe_set_backend) */
    const esft_backend *memory;   /* made params and grads; NULL: the allocator did */
    size_t n_params;              /* N, floats in the trainable block */
    float *params;                /* (N) trainable parameters */
    float *grads;                 /* (N) their gradients, same layout */
    int32_t *slot;                /* (E) index among trainable experts, -1 = frozen */
    int n_trainable_experts;
    float *router;                /* views into params, NULL when frozen */
    float *shared_gate, *shared_up, *shared_down, *shared_router;
    float *d_router;              /* views into grads, NULL when frozen */
    float *d_shared_gate, *d_shared_up, *d_shared_down, *d_shared_router;
    esft_allocator allocator;
} esft_moe;

/* D, F, FS, softmax top-K routing without renormalisation, no aux loss,
   nothing trainable. */
ESFTDEF esft_moe_config esft_moe_config_init(int d_model, int n_experts, int top_k,
                                             int d_expert, int d_shared);

/* DeepSeek-V2-Lite's MoE layer: D 2048, E 64, K 6, F 1408, FS 2816,
   aux alpha 0.001 per sequence (set aux_seq_len to your sequence length). */
ESFTDEF esft_moe_config esft_moe_config_deepseek_v2_lite(void);

/* Sizes, routing, aux mode. */
ESFTDEF esft_status esft_moe_config_validate(const esft_moe_config *cfg, esft_error *err);

/* Floats in the trainable block for cfg, without allocating anything. */
ESFTDEF esft_status esft_moe_param_count(const esft_moe_config *cfg, size_t *n_params,
                                         esft_error *err);

/* Builds a layer: copies the trainable experts (and router, shared block by
   flag) from w into a new parameter block, allocates the gradient block
   (zeroed), keeps pointers to w for everything frozen (w's arrays must outlive
   the layer). allocator may be NULL. Pair: esft_moe_uninit. */
ESFTDEF esft_status esft_moe_init(esft_moe *layer, const esft_moe_config *cfg,
                                  const esft_moe_weights *w, const esft_allocator *allocator,
                                  esft_error *err);
ESFTDEF void esft_moe_uninit(esft_moe *layer);

/* Sets the gradient block to 0 (backward accumulates). */
ESFTDEF void esft_moe_zero_grad(esft_moe *layer);

/* Bytes of the gradient block: 4 N. */
ESFTDEF size_t esft_moe_grad_bytes(const esft_moe *layer);

/* The weights expert e uses now: its trainable copy, or the frozen ones. */
ESFTDEF esft_status esft_moe_expert_weights(const esft_moe *layer, int e,
                                            const float **gate, /* (F, D) out */
                                            const float **up,   /* (F, D) out */
                                            const float **down, /* (D, F) out */
                                            esft_error *err);

/* Bytes of workspace a forward + backward over T tokens needs. The forward
   writes what the backward reads there (routing, permutation, activations);
   keep it untouched between the two. Allocate it once for the largest T. */
ESFTDEF esft_status esft_moe_workspace_size(const esft_moe_config *cfg, int T, size_t *bytes,
                                            esft_error *err);

/* The workspace's regions, published so that every backend carves the same
   ones (one owner: esft_moe_workspace_size and the CPU ops use it too). Offsets
   in bytes from the workspace's base, the first 64-byte aligned address at or
   after the pointer the caller passes; each region is 64-byte aligned. The
   first ESFT_MOE_WS_HEADER bytes at the base are the wrapper's (the stamp of the
   forward that filled the workspace); regions marked saved carry the forward's
   results to the backward, the others are scratch any backend may use. */
#define ESFT_MOE_WS_HEADER 64
typedef struct esft_moe_workspace_layout {
    size_t probs;      /* (T, E) float, saved router probabilities */
    size_t weights;    /* (T, K) float, saved routing weights */
    size_t ids;        /* (T, K) int32, saved expert ids */
    size_t perm;       /* (TK) int32, saved: sorted position -> slot t*K + j */
    size_t pos;        /* (TK) int32, saved: slot -> sorted position */
    size_t offsets;    /* (E + 1) int32, saved: expert e's rows are [offsets[e], offsets[e+1]) */
    size_t xg;         /* (TK, D) float, saved: x gathered in sorted order */
    size_t g, u;       /* (TK, F) float, saved gate and up pre-activations, sorted */
    size_t o;          /* (TK, D) float, saved expert outputs, unweighted, sorted */
    size_t a, b;       /* (TK, F) float, scratch: activations, their gradients */
    size_t d;          /* (TK, D) float, scratch: output gradients, then input gradients */
    size_t gs, us;     /* (T, FS) float, saved shared pre-activations */
    size_t as, bs;     /* (T, FS) float, scratch */
    size_t so;         /* (T, D) float, saved shared output before its gate (shared_gated; else empty) */
    size_t sig;        /* (T) float, saved gate sigmoid(x . w_s) (shared_gated) */
    size_t dys;        /* (T, D) float, scratch (shared_gated) */
    size_t dz;         /* (T) float, scratch (shared_gated) */
    size_t logits;     /* (T, E) float, scratch: logits, then their gradient */
    size_t dw;         /* (T, K) float, scratch: gradient of the routing weights */
    size_t aux_coef;   /* (T / aux_seq_len + 1 or 1, E) float, saved: dL_aux / dp per sequence */
    size_t aux_offsets; /* (E + 1) int32, scratch */
    size_t route_tmp;  /* (3E + 2G) float, scratch of the CPU router */
    size_t end;        /* bytes from the base to the end of the last region */
    size_t bytes;      /* what esft_moe_workspace_size reports: end + 64 of alignment slack */
} esft_moe_workspace_layout;

ESFTDEF esft_status esft_moe_workspace_regions(const esft_moe_config *cfg, int T,
                                               esft_moe_workspace_layout *out, esft_error *err);

/* The same regions as pointers into a workspace (any memory space: nothing is
   read), for backends: header is the base, the others as in the layout. */
typedef struct esft_moe_workspace_view {
    void *header;
    float *probs, *weights;
    int32_t *ids, *perm, *pos, *offsets;
    float *xg, *g, *u, *o, *a, *b, *d, *gs, *us, *as, *bs, *so, *sig, *dys, *dz, *logits, *dw, *aux_coef;
    int32_t *aux_offsets;
    float *route_tmp;
} esft_moe_workspace_view;

ESFTDEF esft_status esft_moe_workspace_view_at(const esft_moe_config *cfg, int T, void *workspace,
                                               esft_moe_workspace_view *out, esft_error *err);

/* Moves the layer onto backend b: its trainable block and gradients are copied
   into b's memory (b's alloc and upload; the old blocks are freed), and
   `frozen` (may be NULL only for the CPU backend: then the weights stay)
   gives the layer's frozen weights as b holds them: arrays in b's memory, the
   same layout as at init (its trainable parts are not read). Then
   esft_moe_forward / _backward run on b, and every pointer passed to them
   (x, y, dy, dx, the workspace) must be b's memory. The one way to choose a
   layer's backend (setting layer->backend by hand leaves the blocks where they
   were). Parameters move back with esft_moe_set_backend(layer, cpu, host_w). */
ESFTDEF esft_status esft_moe_set_backend(esft_moe *layer, const esft_backend *b,
                                         const esft_moe_weights *frozen, esft_error *err);

/* y = layer(x). aux_loss (optional, host memory) receives the auxiliary loss
   (0 when alpha = 0). x, y and the workspace are in layer->backend's memory:
   this function checks shapes and the workspace size, and the backend checks
   that x is finite before writing anything; NaN/Inf in x -> ESFT_ERR_NUMERIC,
   y untouched. A y that
   comes out NaN or Inf from a finite x (a NaN weight; a SwiGLU that overflows)
   is ESFT_ERR_NUMERIC naming its first bad element; y then holds it, and the
   workspace is not usable by a backward. */
ESFTDEF esft_status esft_moe_forward(const esft_moe *layer,
                                     float *y,          /* (T, D) out */
                                     float *aux_loss,   /* (1) out, or NULL */
                                     const float *x,    /* (T, D) */
                                     void *workspace, size_t workspace_bytes, int T,
                                     esft_error *err);

/* The backward of the last forward on the same x and workspace, with dL/dy
   = dy and the auxiliary loss added to L with weight 1. Accumulates into dx
   (always: through routed, shared and router paths) and into layer->grads
   (only trainable tensors). NaN/Inf in dy -> ESFT_ERR_NUMERIC (the backend's
   check), nothing written.
   The workspace must hold a successful forward of the same T (and layer
   shape): otherwise ESFT_ERR_INVALID_ARGUMENT (ESFT_ERR_SHAPE for another
   shape), nothing written. A dx that comes out NaN or Inf is ESFT_ERR_NUMERIC
   (dx and the gradients then hold the bad values: discard them). */
ESFTDEF esft_status esft_moe_backward(const esft_moe *layer, /* layer->grads += */
                                      float *dx,        /* (T, D) += */
                                      const float *dy,  /* (T, D) */
                                      const float *x,   /* (T, D), as in the forward */
                                      void *workspace, size_t workspace_bytes, int T,
                                      esft_error *err);

/* ===================================================================== */
/* 10. adapters: the low-rank adapter, LoRA, PESC adapter MoE (Camelidae) */
/* ===================================================================== */

/* Dimensions here: T tokens, D model width, E adapter experts (the paper's n),
   K experts per token, R adapter rank, Din/Dout a frozen linear's in/out width.

   One primitive, two uses. The low-rank adapter
       A(x) = s * act(x W_down^T) W_up^T        W_down (R, Din), W_up (Dout, R)
   with act = GELU (erf form, PESC experts) or identity (plain LoRA, added to a
   frozen linear's output). The PESC layer (Camelidae, arXiv 2401.02731) puts E
   of them after a frozen dense FFN:
       u = RMSNorm(h) (the FFN input), F = FFN(u) (frozen, computed by the host)
       logits = u W_r^T, W_r (E, D), no bias; top-K of the logits, softmax over
       the K chosen (= renormalised softmax); y = F + sum_j w_j A_{id_j}(F).
   Auxiliary load-balancing loss (the paper's, with gradient):
       aux = alpha * E * sum_i f_i P_i, f_i = share of the T*K routing slots that
       went to expert i, P_i = mean over tokens of softmax(logits)_i. */

typedef enum esft_activation {
    ESFT_ACT_IDENTITY = 0, /* plain LoRA */
    ESFT_ACT_GELU = 1      /* 0.5 x (1 + erf(x / sqrt 2)), PESC experts */
} esft_activation;

typedef struct esft_adapter_config {
    int d_in;                  /* Din */
    int d_out;                 /* Dout */
    int rank;                  /* R >= 1 */
    esft_activation activation;
    float scale;               /* s: LoRA alpha / R; PESC 0.25 (Camelidae configs) */
} esft_adapter_config;

/* LoRA on a frozen linear Din -> Dout: identity activation, s = alpha / rank. */
ESFTDEF esft_adapter_config esft_adapter_config_lora(int d_in, int d_out, int rank, float alpha);
ESFTDEF esft_status esft_adapter_config_validate(const esft_adapter_config *c, esft_error *err);

/* Upcycling/LoRA init: W_down uniform in +-1/sqrt(Din) from seed, W_up = 0, so
   the adapter adds exactly 0 until it trains. Same seed, same bits, everywhere
   (splitmix64; the generator is documented in docs/pesc.md). */
ESFTDEF esft_status esft_adapter_init_weights(const esft_adapter_config *c,
                                              float *w_down, /* (R, Din) out */
                                              float *w_up,   /* (Dout, R) out */
                                              uint64_t seed, esft_error *err);

/* y += row_scale[t] * s * act(x W_down^T) W_up^T, row by row (accumulates into y,
   so LoRA adds onto the frozen linear's output). hidden receives x W_down^T for
   the backward pass. row_scale NULL means 1. work: T*R floats of scratch. */
ESFTDEF esft_status esft_adapter_forward(const esft_adapter_config *c,
                                         float *y,               /* (T, Dout) += */
                                         float *hidden,          /* (T, R) out, saved */
                                         const float *x,         /* (T, Din) */
                                         const float *w_down,    /* (R, Din) */
                                         const float *w_up,      /* (Dout, R) */
                                         const float *row_scale, /* (T) or NULL */
                                         float *work,            /* (T, R) scratch */
                                         int T, esft_error *err);

/* Backward of esft_adapter_forward; accumulates into dx, dw_down, dw_up and
   drow_scale (each may be NULL: not wanted, e.g. a frozen input). work: 2*T*R floats. */
ESFTDEF esft_status esft_adapter_backward(const esft_adapter_config *c,
                                          float *dx,              /* (T, Din) += or NULL */
                                          float *dw_down,         /* (R, Din) += or NULL */
                                          float *dw_up,           /* (Dout, R) += or NULL */
                                          float *drow_scale,      /* (T) += or NULL */
                                          const float *dy,        /* (T, Dout) */
                                          const float *hidden,    /* (T, R) from forward */
                                          const float *x,         /* (T, Din) */
                                          const float *w_down,    /* (R, Din) */
                                          const float *w_up,      /* (Dout, R) */
                                          const float *row_scale, /* (T) or NULL */
                                          float *work,            /* (2T, R) scratch */
                                          int T, esft_error *err);

typedef struct esft_pesc_config {
    int d_model;           /* D */
    int n_experts;         /* E, the paper's n */
    int top_k;             /* K, 1 <= K <= E */
    int rank;              /* R >= 1 */
    float scale;           /* s, adapter output scale */
    float aux_alpha;       /* alpha of the auxiliary loss, >= 0 (0: none) */
    float dropout;         /* p in [0, 1) on the adapters' input F; 0 = off */
    uint64_t dropout_seed; /* masks are a function of (seed, expert, token, column):
                              change it every step */
} esft_pesc_config;

/* scale 0.25, aux_alpha 0.01, no dropout. */
ESFTDEF esft_pesc_config esft_pesc_config_init(int d_model, int n_experts, int top_k, int rank);
/* The released Camelidae configs: E 8, K 2, R 512, s 0.25. (Qwen2idae: E 16, K 4.) */
ESFTDEF esft_pesc_config esft_pesc_config_camelidae(int d_model);
ESFTDEF esft_status esft_pesc_config_validate(const esft_pesc_config *c, esft_error *err);

/* The trainable tensors of one PESC layer live in one block of
   esft_pesc_param_count() floats; gradients and AdamW moments use the same
   layout, so the optimizer is one loop over the block. Layout, with the released
   checkpoints' tensor names (nn.Linear weights, (out, in)):
     router (E, D)        model.layers.{L}.mlp.moe_adapter.router.weight
     then per expert i = 0..E-1:
     down_i (R, D)        model.layers.{L}.mlp.moe_adapter.experts.expert_{i}.adapter_down.weight
     up_i   (D, R)        model.layers.{L}.mlp.moe_adapter.experts.expert_{i}.adapter_up.weight */
typedef enum esft_pesc_tensor {
    ESFT_PESC_ROUTER = 0,
    ESFT_PESC_DOWN = 1,
    ESFT_PESC_UP = 2
} esft_pesc_tensor;

/* 0 for a NULL config or one whose sizes are < 1 or whose block overflows size_t. */
ESFTDEF size_t esft_pesc_param_count(const esft_pesc_config *c);
/* Offset in floats of a tensor inside the block (expert ignored for the router). */
ESFTDEF size_t esft_pesc_tensor_offset(const esft_pesc_config *c, esft_pesc_tensor which, int expert);
/* The Hugging Face name of a tensor of layer `layer`; ESFT_ERR_RANGE if cap is too small. */
ESFTDEF esft_status esft_pesc_tensor_name(char *buf, size_t cap, int layer, esft_pesc_tensor which,
                                          int expert);

/* Upcycling init of a parameter block: router and every W_down uniform in
   +-1/sqrt(D) from seed (router first, then expert 0's W_down, ...), every
   W_up = 0, so the crafted layer returns exactly F at step 0. */
ESFTDEF esft_status esft_pesc_init_weights(const esft_pesc_config *c,
                                           float *params, /* (esft_pesc_param_count) out */
                                           uint64_t seed, esft_error *err);

/* What forward keeps for backward, plus scratch; allocated in a backend's
   memory for up to max_tokens tokens. Pair: esft_pesc_saved_uninit. */
typedef struct esft_pesc_saved {
    int max_tokens, T;       /* capacity; tokens of the last forward */
    esft_pesc_config cfg;    /* the config it was made for */
    int32_t *ids;            /* (T, K) chosen experts, best first */
    float *weights;          /* (T, K) renormalised gate weights */
    float *logits;           /* (T, E) router logits */
    float *probs;            /* (T, E) softmax over all E (auxiliary loss) */
    int32_t *order;          /* (T*K) routing slots t*K+j grouped by expert, tokens ascending */
    int32_t *offset;         /* (E + 1) expert e's slots: order[offset[e] .. offset[e+1]) */
    float *hidden;           /* (T*K, R) W_down x per slot, in `order` */
    float *frac;             /* (E) f_i of the last forward */
    float aux_loss;          /* of the last forward */
    float *work;             /* scratch, laid out by esft_pesc_work_view_at */
    const esft_backend *backend;
} esft_pesc_saved;

ESFTDEF esft_status esft_pesc_saved_init(esft_pesc_saved *s, const esft_pesc_config *c,
                                         int max_tokens, const esft_backend *backend,
                                         esft_error *err);
ESFTDEF void esft_pesc_saved_uninit(esft_pesc_saved *s);

/* The scratch regions of saved->work for T tokens, as pointers (any memory
   space: nothing is read), for backends: the layout has one owner, this file,
   as esft_moe_workspace_view_at is for the MoE. xg (T, D) gathered adapter
   inputs, later dx; yg (T, D) adapter outputs or gathered dy; g (2T, R) the
   adapter's work; dw (T, K) gate-weight gradients; dlogits (T, E); wg (T) and
   dwg (T) one expert's row scales and their gradients; coef (E) the auxiliary
   loss's dL/dP. (The CUDA backend uses dw, dlogits and coef; it runs every
   expert at once, on T K rows in its own scratch.) */
typedef struct esft_pesc_work_view {
    float *xg, *yg, *g, *dw, *dlogits, *wg, *dwg, *coef;
} esft_pesc_work_view;

ESFTDEF esft_status esft_pesc_work_view_at(const esft_pesc_config *c, int T, float *work,
                                           esft_pesc_work_view *out, esft_error *err);

/* y = F + sum_j w_j A_{id_j}(F); aux_loss (optional) receives the auxiliary loss.
   y must not alias F. NaN/Inf in u, F or the router weights -> ESFT_ERR_NUMERIC. */
ESFTDEF esft_status esft_pesc_forward(const esft_pesc_config *c,
                                      float *y,             /* (T, D) out */
                                      float *aux_loss,      /* (1) out, or NULL */
                                      const float *F,       /* (T, D) frozen FFN output */
                                      const float *u,       /* (T, D) FFN input (router input) */
                                      const float *params,  /* (esft_pesc_param_count) */
                                      esft_pesc_saved *saved, int T, esft_error *err);

/* Backward of the last forward of `saved`; accumulates into dF, du and dparams
   (du and dparams may be NULL: not wanted). dy is dLoss/dy; daux is
   dLoss/daux_loss (1 when the loss is task + aux, 0 to ignore the aux loss).
   dF gets dy (the residual path) plus the adapters' part; du gets the router's
   part only (the host adds what flows back through its frozen FFN). */
ESFTDEF esft_status esft_pesc_backward(const esft_pesc_config *c,
                                       float *dF,            /* (T, D) += */
                                       float *du,            /* (T, D) += or NULL */
                                       float *dparams,       /* (esft_pesc_param_count) += or NULL */
                                       const float *dy,      /* (T, D) */
                                       float daux,
                                       esft_pesc_saved *saved,
                                       const float *F,       /* (T, D) as given to forward */
                                       const float *u,       /* (T, D) as given to forward */
                                       const float *params,  /* (esft_pesc_param_count) */
                                       int T, esft_error *err);

/* The same through a backend (all pointers in that backend's memory, saved made
   for that backend). A backend without adapter ops -> ESFT_ERR_UNSUPPORTED. */
ESFTDEF esft_status esft_pesc_forward_with(const esft_backend *b, const esft_pesc_config *c,
                                           float *y, float *aux_loss, const float *F,
                                           const float *u, const float *params,
                                           esft_pesc_saved *saved, int T, esft_error *err);
ESFTDEF esft_status esft_pesc_backward_with(const esft_backend *b, const esft_pesc_config *c,
                                            float *dF, float *du, float *dparams,
                                            const float *dy, float daux, esft_pesc_saved *saved,
                                            const float *F, const float *u, const float *params,
                                            int T, esft_error *err);

/* ===================================================================== */
/* 11. optimizer                                                         */
/* ===================================================================== */

/* AdamW (Loshchilov & Hutter; the step of PyTorch's torch.optim.AdamW):
       m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
       p = p (1 - lr wd) - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
   over one block of n floats: a layer's trainable block, state for it only. */
typedef struct esft_adamw_config {
    float lr, beta1, beta2, eps, weight_decay;
} esft_adamw_config;

/* PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 0.01. */
ESFTDEF esft_adamw_config esft_adamw_config_init(void);

/* DeepSeek's ESFT recipe: lr 1e-5, betas (0.9, 0.95), eps 1e-8, wd 0.1. */
ESFTDEF esft_adamw_config esft_adamw_config_esft(void);

typedef struct esft_adamw {
    esft_adamw_config cfg;
    size_t n;                     /* floats in the block it updates */
    float *m, *v;                 /* (n) each: Adam moments, zero at start */
    long step;                    /* steps taken */
    const esft_backend *backend;  /* runs adamw_step; CPU by default (esft_adamw_set_backend) */
    const esft_backend *memory;   /* made m and v; NULL: the allocator did */
    esft_allocator allocator;
} esft_adamw;

/* Zeroed state for a block of n floats (n = layer->n_params). Pair: _uninit. */
ESFTDEF esft_status esft_adamw_init(esft_adamw *opt, const esft_adamw_config *cfg, size_t n,
                                    const esft_allocator *allocator, esft_error *err);
ESFTDEF void esft_adamw_uninit(esft_adamw *opt);

/* Runs later steps on backend b: m and v move into b's memory (their values
   kept), and params and grads given to esft_adamw_step must be b's memory
   too (a layer moved with esft_moe_set_backend has its blocks there). The one
   way to choose the optimizer's backend. */
ESFTDEF esft_status esft_adamw_set_backend(esft_adamw *opt, const esft_backend *b, esft_error *err);

/* Bytes of optimizer state: 8 n (m and v). */
ESFTDEF size_t esft_adamw_state_bytes(const esft_adamw *opt);

/* One step: params updated from grads (n floats each, opt->backend's memory).
   NaN/Inf in grads -> ESFT_ERR_NUMERIC (the backend's check) and nothing changes. */
ESFTDEF esft_status esft_adamw_step(esft_adamw *opt,
                                    float *params,      /* (n) updated */
                                    const float *grads, /* (n) */
                                    esft_error *err);

/* Global-norm clipping over several gradient blocks (one per layer): the norm
   is sqrt of the sum of squares of all of them (accumulated in double); when it
   exceeds max_norm every block is scaled by max_norm / (norm + 1e-6)
   (torch.nn.utils.clip_grad_norm_). norm (optional, host) receives the norm
   before clipping. max_norm <= 0: measure only. A NaN or Inf gradient ->
   ESFT_ERR_NUMERIC, nothing scaled and norm not written.
   esft_clip_grad_norm_with runs on backend b (ops sum_squares and scale): the
   blocks are b's memory, the arrays grads and sizes are host memory. The CPU
   sums in block order, element by element; a GPU sums in a fixed tree, so its
   norm agrees with the CPU's to ~1e-12 relative (same bits run to run), and the
   blocks are then scaled by the same float factor as the CPU would from that norm.
   esft_clip_grad_norm is the CPU call: host blocks. */
ESFTDEF esft_status esft_clip_grad_norm_with(const esft_backend *b,
                                             float *const *grads, /* (n_blocks) blocks in b's memory */
                                             const size_t *sizes, /* (n_blocks) floats each */
                                             int n_blocks, float max_norm, double *norm,
                                             esft_error *err);
ESFTDEF esft_status esft_clip_grad_norm(float *const *grads,   /* (n_blocks) blocks */
                                        const size_t *sizes,   /* (n_blocks) floats each */
                                        int n_blocks, float max_norm, double *norm,
                                        esft_error *err);

/* ===================================================================== */
/* 12. checkpoints (safetensors, Hugging Face names)                     */
/* ===================================================================== */

/* safetensors (Hugging Face): an 8-byte little-endian header length N, N bytes of
   JSON {"<name>": {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]}, ...,
   "__metadata__": {"<key>": "<string>", ...}}, then the data area; offsets are
   relative to its start. Readers here validate everything before trusting it
   (docs/checkpoints.md lists the rules) and read tensors with positioned reads,
   never the whole file. Writers write "<path>.tmp.<pid>.<n>" in the same directory, fsync,
   then rename: a crash or an error never leaves a half file under the real name.
   Sharded checkpoints are a directory of shards plus model.safetensors.index.json
   ({"metadata": {"total_size": n}, "weight_map": {"<name>": "<shard file>"}}). */

typedef enum esft_dtype {
    ESFT_DTYPE_F32 = 0, ESFT_DTYPE_F16, ESFT_DTYPE_BF16, ESFT_DTYPE_F64,
    ESFT_DTYPE_I64, ESFT_DTYPE_I32, ESFT_DTYPE_I16, ESFT_DTYPE_I8,
    ESFT_DTYPE_U64, ESFT_DTYPE_U32, ESFT_DTYPE_U16, ESFT_DTYPE_U8, ESFT_DTYPE_BOOL,
    ESFT_DTYPE_F8_E4M3, ESFT_DTYPE_F8_E5M2,
    ESFT_DTYPE_COUNT
} esft_dtype;

/* "F32", "BF16", ... as safetensors spells them; "?" when out of range. */
ESFTDEF const char *esft_dtype_name(esft_dtype t);
/* Bytes per element; 0 when out of range. */
ESFTDEF size_t esft_dtype_size(esft_dtype t);
/* The dtype named name (exact, case-sensitive); ESFT_ERR_UNSUPPORTED if unknown. */
ESFTDEF esft_status esft_dtype_parse(const char *name, esft_dtype *out);

/* fp32 <-> bf16 / fp16 bit patterns, round to nearest, ties to even. NaN stays NaN
   (sign and top payload bits kept, never rounded into Inf), +-Inf stays +-Inf;
   fp16 overflow gives +-Inf, tiny values fp16 subnormals or +-0. */
ESFTDEF uint16_t esft_f32_to_bf16(float x);
ESFTDEF float esft_bf16_to_f32(uint16_t h);
ESFTDEF uint16_t esft_f32_to_f16(float x);
ESFTDEF float esft_f16_to_f32(uint16_t h);
/* n values between file bytes (little-endian F32, F16 or BF16) and fp32.
   Other dtypes: ESFT_ERR_UNSUPPORTED. */
ESFTDEF esft_status esft_convert_to_f32(float *dst,      /* (n) out */
                                        const void *src, /* (n) values of dtype */
                                        esft_dtype dtype, size_t n);
ESFTDEF esft_status esft_convert_from_f32(void *dst,        /* (n) values of dtype out */
                                          const float *src, /* (n) */
                                          esft_dtype dtype, size_t n);

#define ESFT_ST_MAX_DIMS 8
#define ESFT_ST_MAX_HEADER 100000000 /* header JSON above 100 MB is refused (as the reference does) */

typedef struct esft_st_tensor {
    const char *name;      /* owned by the file object */
    esft_dtype dtype;
    int n_dims;            /* 0 for a scalar */
    int64_t shape[ESFT_ST_MAX_DIMS];
    uint64_t n_elements;
    uint64_t offset;       /* absolute byte offset of the data in the file */
    uint64_t n_bytes;      /* n_elements * esft_dtype_size(dtype) */
} esft_st_tensor;

/* An open, validated safetensors file. Reads are positioned reads on one file
   descriptor: not thread-safe; open the file once per thread instead. */
typedef struct esft_safetensors {
    int n_tensors;
    esft_st_tensor *tensors;   /* (n_tensors) in data order (ascending offset) */
    int n_metadata;
    const char **meta_keys;    /* (n_metadata) the __metadata__ object, in file order */
    const char **meta_values;  /* (n_metadata) */
    uint64_t header_size;      /* N, the JSON bytes after the 8-byte length */
    uint64_t file_size;        /* 8 + N + data bytes */
    /* private */
    int fd_;                         /* -1 when opened from memory */
    const unsigned char *memory_;    /* the whole file when opened from memory */
    int *by_name_;                   /* (n_tensors) tensor indices sorted by name */
    char *strings_;                  /* names, keys and values */
    esft_allocator allocator;
} esft_safetensors;

/* Opens and validates path. Pair: esft_safetensors_close. err names the file and,
   for header problems, the byte offset in the file. */
ESFTDEF esft_status esft_safetensors_open(esft_safetensors *st, const char *path,
                                          const esft_allocator *allocator, esft_error *err);
/* The same over a whole file's bytes in memory (kept, not copied: data must
   outlive st); name is used in messages. The fuzz target's entry point. */
ESFTDEF esft_status esft_safetensors_open_memory(esft_safetensors *st, const void *data, size_t size,
                                                 const char *name, const esft_allocator *allocator,
                                                 esft_error *err);
ESFTDEF void esft_safetensors_close(esft_safetensors *st);
/* Index of the tensor called name, or -1 (binary search). */
ESFTDEF int esft_safetensors_find(const esft_safetensors *st, const char *name);
/* The __metadata__ value of key, or NULL. */
ESFTDEF const char *esft_safetensors_metadata(const esft_safetensors *st, const char *key);
/* n bytes of tensor i starting at byte `at` of its data, raw (little-endian). */
ESFTDEF esft_status esft_safetensors_read(const esft_safetensors *st, int i,
                                          void *dst, /* (n) bytes out */
                                          uint64_t at, size_t n, esft_error *err);
/* Tensor i (F32, F16 or BF16) as fp32. No allocation: converts in small chunks. */
ESFTDEF esft_status esft_safetensors_read_f32(const esft_safetensors *st, int i,
                                              float *dst, /* (n_elements) out */
                                              esft_error *err);
/* Tensor i (I32 or I64) as int64. */
ESFTDEF esft_status esft_safetensors_read_i64(const esft_safetensors *st, int i,
                                              int64_t *dst, /* (n_elements) out */
                                              esft_error *err);

/* One tensor to write: bytes in the file's dtype (raw, little-endian), or fp32
   values converted to dtype (F32, F16 or BF16) on the way out. */
typedef struct esft_st_write_tensor {
    const char *name;
    esft_dtype dtype;        /* dtype in the file */
    int n_dims;
    int64_t shape[ESFT_ST_MAX_DIMS];
    const void *data;        /* (n_elements) values of dtype, or NULL when f32 is given */
    const float *f32;        /* (n_elements) or NULL */
} esft_st_write_tensor;

/* Writes a safetensors file: tensors in the order given, header padded with
   spaces to a multiple of 8 bytes (as the reference writer does), metadata
   (n_meta string pairs; may be 0) as __metadata__. Names must be unique, valid
   UTF-8, not "__metadata__". Atomic (temp file, fsync, rename). */
ESFTDEF esft_status esft_safetensors_write(const char *path, const esft_st_write_tensor *tensors,
                                           int n, const char *const *meta_keys,
                                           const char *const *meta_values, int n_meta,
                                           esft_error *err);

/* ---- Hugging Face tensor names ---------------------------------------- */

/* What an MoE tensor is. Shapes are PyTorch Linear weights (out, in). */
typedef enum esft_part {
    ESFT_PART_NONE = 0,      /* not an MoE tensor: attention, norms, embeddings, dense MLP */
    ESFT_PART_EXPERT_GATE,   /* routed expert e, SwiGLU gate projection (F, D) */
    ESFT_PART_EXPERT_UP,     /* routed expert e, up projection (F, D) */
    ESFT_PART_EXPERT_DOWN,   /* routed expert e, down projection (D, F) */
    ESFT_PART_ROUTER,        /* router (E, D) */
    ESFT_PART_SHARED_GATE,   /* shared experts, gate projection (F_s, D) */
    ESFT_PART_SHARED_UP,     /* (F_s, D) */
    ESFT_PART_SHARED_DOWN,   /* (D, F_s) */
    ESFT_PART_SHARED_ROUTER, /* Qwen-MoE's shared_expert_gate (1, D) */
    ESFT_PART_ADAPTER_DOWN,  /* PESC adapter e, W_down (R, D) */
    ESFT_PART_ADAPTER_UP,    /* PESC adapter e, W_up (D, R) */
    ESFT_PART_FUSED_GATE_UP, /* every routed expert in one 3-D tensor (E, 2F, D): rows [0, F) of
                                plane e are expert e's gate, [F, 2F) its up (transformers v5) */
    ESFT_PART_FUSED_DOWN,    /* every routed expert's down projection, (E, D, F) */
    ESFT_PART_COUNT
} esft_part;

/* Naming schemes, one table row each (docs/checkpoints.md has the table). Qwen-MoE
   names its routed experts and router like DeepSeek-V2, so those parse as
   DeepSeek-V2; only its shared expert tensors parse as Qwen-MoE. */
typedef enum esft_family {
    ESFT_FAMILY_DEEPSEEK_V2 = 0, /* model.layers.{l}.mlp.experts.{e}.gate_proj.weight, ... */
    ESFT_FAMILY_MIXTRAL,         /* model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight, ... */
    ESFT_FAMILY_QWEN_MOE,        /* ... mlp.shared_expert.gate_proj.weight, mlp.shared_expert_gate */
    ESFT_FAMILY_CAMELIDAE,       /* model.layers.{l}.mlp.moe_adapter.experts.expert_{e}.adapter_down.weight */
    ESFT_FAMILY_COUNT
} esft_family;

typedef struct esft_tensor_name {
    esft_family family;
    esft_part part;   /* ESFT_PART_NONE when the name is no MoE tensor */
    int layer;        /* the model's layer index, -1 if none */
    int expert;       /* routed expert / adapter index, -1 for routers and shared experts */
} esft_tensor_name;

/* Parses a tensor name. Returns 1 for an MoE tensor (out filled), 0 otherwise
   (out->part = ESFT_PART_NONE, layer and expert -1). Fused 3-D expert tensors
   parse with expert -1; esft_fused_slice says where one expert lies in them. */
ESFTDEF int esft_tensor_name_parse(const char *name, esft_tensor_name *out);
/* The name of (family, part, layer, expert) into buf; ESFT_ERR_UNSUPPORTED when
   the family has no such part, ESFT_ERR_RANGE when buf is too small. */
ESFTDEF esft_status esft_tensor_name_format(char *buf, size_t cap, esft_family family, esft_part part,
                                            int layer, int expert);
ESFTDEF const char *esft_family_name(esft_family f); /* "deepseek_v2", ... */
/* Where routed expert e's part (ESFT_PART_EXPERT_GATE, _UP or _DOWN) lies in a
   fused tensor of shape fused_shape (3 dims: (E, 2F, D) for the gate/up tensor,
   (E, D, F) for down): its first element (*at, in elements, row-major) and its
   own shape (F, D) or (D, F). Each slice is contiguous. 1 on success, 0 when
   part is no expert projection, e is outside [0, E) or the shape does not fit. */
ESFTDEF int esft_fused_slice(const int64_t *fused_shape, int n_dims, esft_part part, int e, uint64_t *at,
                             int64_t shape[2]);
ESFTDEF const char *esft_part_name(esft_part p);     /* "expert.gate", ... */
/* 1 if a tensor of this name is trained under cfg, ESFT's rule: routed experts
   (and PESC adapters) listed in cfg; shared experts of every layer when
   cfg->shared_experts; every other tensor (attention, norms, embeddings, routers)
   when cfg->non_expert_modules. */
ESFTDEF int esft_expert_config_trains(const esft_expert_config *cfg, const char *name);

/* ---- checkpoints: one file or shards + index --------------------------- */

typedef struct esft_checkpoint {
    int n_shards;
    esft_safetensors *shards;   /* (n_shards) open shards */
    const char **shard_files;   /* (n_shards) file names inside dir, sorted */
    const char *dir;            /* the directory holding the shards ("." for a bare name) */
    int sharded;                /* 1 when read through model.safetensors.index.json */
    int n_tensors;              /* over all shards */
    const char **names;         /* (n_tensors) every tensor name, sorted */
    int *name_shard;            /* (n_tensors) its shard */
    int *name_tensor;           /* (n_tensors) its index in that shard */
    uint64_t total_bytes;       /* sum of tensor bytes (the index's total_size) */
    /* private */
    char *strings_;
    esft_allocator allocator;
} esft_checkpoint;

/* Opens a checkpoint: a directory with model.safetensors.index.json (every shard
   it names is opened and checked against the index both ways), a directory with
   model.safetensors, an .index.json file, or one .safetensors file.
   Pair: esft_checkpoint_close. */
ESFTDEF esft_status esft_checkpoint_open(esft_checkpoint *ck, const char *path,
                                         const esft_allocator *allocator, esft_error *err);
ESFTDEF void esft_checkpoint_close(esft_checkpoint *ck);
/* Finds a tensor: 1 and its shard and index in that shard, or 0. */
ESFTDEF int esft_checkpoint_find(const esft_checkpoint *ck, const char *name, int *shard, int *index);
/* Writes model.safetensors.index.json for ck's tensors and shards (keys sorted,
   total_size = tensor bytes), atomically. */
ESFTDEF esft_status esft_checkpoint_write_index(const char *path, const esft_checkpoint *ck,
                                                esft_error *err);

/* Progress of long operations: done of total bytes; called every few MB and at the end. */
typedef struct esft_checkpoint_options {
    void (*progress)(void *user, uint64_t done, uint64_t total); /* (optional) */
    void *user;
    const esft_allocator *allocator; /* (optional) */
} esft_checkpoint_options;

/* The metadata key that holds the expert config JSON in files written here. */
#define ESFT_METADATA_CONFIG "esft_expert_config"

/* Copies the tensors that cfg trains (esft_expert_config_trains) from the base
   checkpoint into one small safetensors file, dtypes and bytes unchanged, with
   cfg in __metadata__. Every (layer, expert) of cfg must exist in base
   (ESFT_ERR_RANGE names the first that does not). opt may be NULL. */
ESFTDEF esft_status esft_checkpoint_extract(const char *base, const esft_expert_config *cfg,
                                            const char *out_path, const esft_checkpoint_options *opt,
                                            esft_error *err);
/* Saves trained tensors only: each must be trained under cfg (ESFT_ERR_RANGE
   otherwise); cfg goes into __metadata__. Give each tensor's file dtype and its
   fp32 values (f32) or bytes (data). */
ESFTDEF esft_status esft_checkpoint_save_trained(const char *path, const esft_expert_config *cfg,
                                                 const esft_st_write_tensor *tensors, int n,
                                                 esft_error *err);
/* The expert config stored in a file's __metadata__ (ESFT_ERR_PARSE if absent or bad).
   Pair: esft_expert_config_free. */
ESFTDEF esft_status esft_checkpoint_read_config(const esft_safetensors *st, esft_expert_config *out,
                                                esft_error *err);
/* Writes base with the tensors of the trained file put in, into out_dir (created
   if missing; must not be base's directory): every shard anew (same names,
   same header, bytes streamed in chunks, memory bounded by a few MB whatever the
   model size) and, for a sharded base, the index. Every trained tensor must
   exist in base with the same dtype and shape, checked before anything is
   written (ESFT_ERR_SHAPE / ESFT_ERR_RANGE name the tensor). All shards are
   written as temp files and renamed only when all succeeded. opt may be NULL.
   The index is the base's, byte for byte (its "metadata" kept: total_size,
   total_parameters). The commit is detectably all-or-nothing: once every temp
   file is on disk, out_dir/ESFT_MERGE_RECORD says "renaming", then the renames
   run, then it says "complete"; a merge killed in between leaves "renaming",
   and esft_checkpoint_open of that directory is then ESFT_ERR_IO naming an
   interrupted merge (merge again to repair it). Before writing, merge removes
   its own temp files left by killed runs ("<one of its output files>.tmp.<pid>.<n>")
   and refuses (ESFT_ERR_INVALID_ARGUMENT) an out_dir holding checkpoint files
   (*.safetensors, *.index.json) unless its record names the same base shards
   (names and sizes): an earlier merge of the same base. When base is a
   directory, its other files that a loader needs (config.json,
   generation_config.json, tokenizer files, *.txt, *.model, *.tiktoken,
   *.jinja, remote code *.py) are copied into out_dir (each atomically,
   replacing what is there), so out_dir is a whole model directory. */
#define ESFT_MERGE_RECORD "esft_merge.json"
ESFTDEF esft_status esft_checkpoint_merge(const char *base, const char *trained, const char *out_dir,
                                          const esft_checkpoint_options *opt, esft_error *err);

/* ===================================================================== */
/* 13. JSON                                                              */
/* ===================================================================== */

/* A small strict JSON reader (RFC 8259): tokens in one array, no trailing commas,
   valid escapes and numbers, nesting depth <= 64, nothing but whitespace after the
   value. Used by every file format here; exposed for fuzzing and for tools. */
typedef enum esft_json_type {
    ESFT_JSON_NULL, ESFT_JSON_FALSE, ESFT_JSON_TRUE, ESFT_JSON_NUMBER,
    ESFT_JSON_STRING, ESFT_JSON_ARRAY, ESFT_JSON_OBJECT
} esft_json_type;

typedef struct esft_json_token {
    esft_json_type type;
    size_t start, end; /* byte span in the text; strings exclude the quotes */
    int size;          /* arrays: elements; objects: key/value pairs */
    int next;          /* index of the token after this subtree */
} esft_json_token;

typedef struct esft_json {
    const char *text;
    size_t length;
    esft_json_token *tokens; /* tokens[0] is the root; object members are key, value, ... */
    int n_tokens;
    esft_allocator allocator;
} esft_json;

/* Tokenises text (not necessarily NUL-terminated). Pair: esft_json_free. */
ESFTDEF esft_status esft_json_parse(esft_json *out, const char *text, size_t length,
                                    const esft_allocator *allocator, esft_error *err);
ESFTDEF void esft_json_free(esft_json *js);
/* The value of key in object token obj, or -1. */
ESFTDEF int esft_json_find(const esft_json *js, int obj, const char *key);
/* 1 if the string token equals s (escapes compared decoded). */
ESFTDEF int esft_json_string_equals(const esft_json *js, int tok, const char *s);
/* Decodes a string token into buf (NUL-terminated); ESFT_ERR_RANGE if too small. */
ESFTDEF esft_status esft_json_string(const esft_json *js, int tok, char *buf, size_t cap);
/* A number token as a double; ESFT_ERR_RANGE when it overflows to +-Inf (1e999). */
ESFTDEF esft_status esft_json_number(const esft_json *js, int tok, double *out);
/* A whole JSON (or other small) file into memory, NUL-terminated, with the
   limits every reader of the library applies: only a regular file (a FIFO,
   device or directory is ESFT_ERR_IO, without waiting for it), at most max_bytes
   (0: 256 MiB; more is ESFT_ERR_IO naming the size). allocator may be NULL.
   Pair: esft_file_free with the same allocator. */
ESFTDEF esft_status esft_file_read(const char *path, uint64_t max_bytes, const esft_allocator *allocator,
                                   char **data, size_t *size, esft_error *err);
ESFTDEF void esft_file_free(char *data, const esft_allocator *allocator);

/* ===================================================================== */
/* 14. models: Hugging Face MoE checkpoints, forward, routing statistics  */
/* ===================================================================== */

/* Dimensions here: T tokens of one sample, V vocabulary, D model width, H query
   heads, HK key/value heads, HD head width (GQA), L layers, E routed experts,
   K experts per token, F routed expert hidden, FF dense MLP hidden, FS shared
   hidden. MLA (DeepSeek): QR q_lora_rank, KR kv_lora_rank, DN qk_nope_head_dim,
   DR qk_rope_head_dim, DV v_head_dim.

   A model directory (config.json + safetensors, one file or shards) opened as
   one frozen transformer: embeddings, L x (RMSNorm, causal self-attention
   with the family's RoPE, residual, RMSNorm, dense SwiGLU MLP or MoE,
   residual), final RMSNorm, lm_head. The dense families (Llama, Mistral,
   Qwen2) have no MoE layer at all: route.n_experts is 0. Weights stay in their file dtype (F32, BF16, F16, or
   FP8 E4M3 with per-block weight_scale_inv) and are converted to fp32 a panel at
   a time inside the matrix products, so memory is about the checkpoint's bytes.
   docs/models.md lists the families, the config fields each reads, the layouts. */

#ifndef ESFT_NO_MODELS

#define ESFT_MODEL_MAX_LAYERS 1024

typedef enum esft_model_family {
    ESFT_MODEL_DEEPSEEK_V2 = 0, /* MLA, softmax greedy / group-limited routing, shared experts */
    ESFT_MODEL_DEEPSEEK_V3,     /* as V2, sigmoid gating + e_score_correction_bias, noaux_tc */
    ESFT_MODEL_QWEN2_MOE,       /* GQA + qkv bias, shared expert behind a sigmoid gate */
    ESFT_MODEL_QWEN3_MOE,       /* GQA, per-head q_norm / k_norm */
    ESFT_MODEL_OLMOE,           /* MHA/GQA, q_norm / k_norm over the whole projections */
    ESFT_MODEL_MIXTRAL,         /* GQA, top-2 renormalised */
    ESFT_MODEL_LLAMA,           /* dense: GQA, SwiGLU MLP in every layer (no MoE layer) */
    ESFT_MODEL_MISTRAL,         /* dense: as Llama, optional sliding window */
    ESFT_MODEL_QWEN2,           /* dense: GQA + qkv bias */
    ESFT_MODEL_FAMILY_COUNT
} esft_model_family;

typedef enum esft_qk_norm {
    ESFT_QK_NORM_NONE = 0,
    ESFT_QK_NORM_HEAD,  /* RMSNorm of each head's q and k over HD (Qwen3) */
    ESFT_QK_NORM_WHOLE  /* RMSNorm of the whole q (H HD) and k (HK HD) rows (OLMoE) */
} esft_qk_norm;

/* Rotary position embedding. Pairs (2i, 2i+1) when interleaved (DeepSeek),
   else (i, i + n/2) (rotate_half: Llama, Qwen, Mixtral, OLMoE), frequency
   theta^(-2i/n) over the n rotated dims; YaRN (DeepSeek's, as transformers
   computes it) blends interpolated and original frequencies and scales cos/sin
   by attention_factor. */
typedef struct esft_rope_config {
    double theta;
    int interleaved;
    int yarn;                  /* 0: plain RoPE */
    double factor;             /* YaRN: context extension factor */
    int original_max_position; /* YaRN: original_max_position_embeddings */
    double beta_fast, beta_slow;
    double attention_factor;   /* YaRN: multiplies cos and sin (1 = none) */
} esft_rope_config;

/* One architecture, from config.json. */
typedef struct esft_model_config {
    esft_model_family family;
    int vocab;                 /* V */
    int d_model;               /* D */
    int n_layers;              /* L */
    int n_heads, n_kv_heads;   /* H, HK */
    int head_dim;              /* HD (GQA families) */
    int mla;                   /* 1: DeepSeek multi-head latent attention */
    int q_lora_rank;           /* QR; 0 = q_proj directly */
    int kv_lora_rank;          /* KR */
    int qk_nope_dim, qk_rope_dim, v_head_dim; /* DN, DR, DV */
    int qkv_bias;              /* q/k/v projections have a bias (Qwen2-MoE, Qwen2) */
    int o_bias;                /* o_proj has a bias too (Llama attention_bias) */
    esft_qk_norm qk_norm;
    float clip_qkv;            /* OLMoE: clamp q, k, v to +-clip; 0 = none */
    int sliding_window;        /* keys at distance >= this are masked; 0 = none */
    float rms_eps;
    esft_rope_config rope;
    double attn_scale;         /* softmax scale (1/sqrt(head dim), YaRN's mscale^2 folded in) */
    int d_ff;                  /* FF, dense MLP layers */
    int d_expert;              /* F */
    int d_shared;              /* FS, 0 = no shared expert */
    int shared_gate;           /* Qwen2-MoE: shared output times sigmoid(x . w) */
    esft_route_config route;   /* E, K, gating, groups, renormalisation, scaling (bias per layer) */
    int route_bias;            /* DeepSeek-V3: each MoE layer has e_score_correction_bias */
    int tie_embeddings;        /* lm_head = embed_tokens */
    int fp8_block_rows, fp8_block_cols; /* FP8 weight_scale_inv block; 0 = no FP8 */
    unsigned char is_moe[ESFT_MODEL_MAX_LAYERS]; /* (L) 1 = MoE layer, 0 = dense MLP */
} esft_model_config;

/* Reads config.json's text into cfg. An unknown model_type, a missing field, or
   a value not implemented (hidden_act other than silu, a rope type other than
   none/default/yarn, ...) is ESFT_ERR_UNSUPPORTED / ESFT_ERR_PARSE naming the field. */
ESFTDEF esft_status esft_model_config_parse(esft_model_config *cfg, const char *text, size_t size,
                                            const char *name, esft_error *err);
ESFTDEF esft_status esft_model_config_read(esft_model_config *cfg, const char *path, esft_error *err);
ESFTDEF const char *esft_model_family_name(esft_model_family f); /* the model_type */
/* Layers that are MoE layers (those ESFT scores and trains); 0 for the dense families. */
ESFTDEF int esft_model_config_moe_layers(const esft_model_config *cfg);

/* A low-rank adapter (LoRA) on a frozen matrix W (rows, cols): the product
   x W^T becomes x W^T + scale (x A^T) B^T, A (rank, cols), B (rows, rank),
   scale = lora_alpha / rank (PEFT's lora_A, lora_B and scaling). */
typedef struct esft_lora {
    int rank;
    float scale;
    const float *a, *b;
} esft_lora;

/* A frozen matrix (rows, cols) as the file stores it, row-major. FP8 matrices
   carry their dequantisation scales: value = fp8 * scale[r / BR][c / BC]. */
typedef struct esft_matrix {
    esft_dtype dtype;          /* F32, BF16, F16 or F8_E4M3 */
    int rows, cols;
    const void *data;          /* (rows, cols) values of dtype */
    const float *scale;        /* (ceil(rows/BR), ceil(cols/BC)) FP8 only, else NULL */
    int block_rows, block_cols;/* BR, BC */
    const esft_lora *lora;     /* training: an adapter on this matrix; NULL = none */
} esft_matrix;

/* The weights of one decoder layer (absent ones have data NULL). */
typedef struct esft_model_layer {
    esft_matrix attn_norm, ffn_norm;          /* (1, D) */
    esft_matrix q, k, v, o;                   /* GQA: (H HD, D) (HK HD, D) (HK HD, D) (D, H HD) */
    esft_matrix q_bias, k_bias, v_bias;       /* (1, H HD) (1, HK HD) (1, HK HD) */
    esft_matrix o_bias;                       /* (1, D) */
    esft_matrix q_norm, k_norm;               /* (1, HD) per head, or (1, H HD) (1, HK HD) whole */
    esft_matrix q_a, q_a_norm, q_b;           /* MLA: (QR, D) (1, QR) (H (DN+DR), QR); q = (H (DN+DR), D) */
    esft_matrix kv_a, kv_a_norm, kv_b;        /* MLA: (KR+DR, D) (1, KR) (H (DN+DV), KR); o (D, H DV) */
    esft_matrix mlp_gate, mlp_up, mlp_down;   /* dense: (FF, D) (FF, D) (D, FF) */
    esft_matrix router;                       /* (E, D) */
    esft_matrix router_bias;                  /* (1, E) DeepSeek-V3 e_score_correction_bias */
    esft_matrix *expert_gate, *expert_up, *expert_down; /* (E) each (F, D) (F, D) (D, F) */
    esft_matrix shared_gate, shared_up, shared_down;    /* (FS, D) (FS, D) (D, FS) */
    esft_matrix shared_router;                /* (1, D) Qwen2-MoE shared_expert_gate */
} esft_model_layer;

/* A weight of the model that is no expert: embedding, norms, attention,
   dense MLPs, routers, lm_head (what ESFT calls non-expert modules), with the
   name it has in the checkpoint. */
typedef struct esft_model_tensor {
    const char *name;          /* Hugging Face name, e.g. model.layers.3.self_attn.q_proj.weight */
    const esft_matrix *matrix; /* in the model */
    int layer;                 /* -1: embedding, final norm, lm_head */
    int attention;             /* 1: the attention half of its layer (input norm, projections, q/k norms) */
    esft_dtype file_dtype;     /* as the checkpoint stores it (vectors are held as F32) */
    int file_dims;             /* 1 (a vector stored 1-D) or 2 */
} esft_model_tensor;

typedef struct esft_model {
    esft_model_config cfg;
    esft_matrix embed;          /* (V, D) */
    esft_matrix final_norm;     /* (1, D) */
    esft_matrix lm_head;        /* (V, D), the embedding when tied */
    esft_model_layer *layers;   /* (L) */
    int fused_experts;          /* experts read from 3-D gate_up_proj / down_proj tensors */
    esft_family expert_names;   /* naming of per-expert tensors: DeepSeek-V2's (mlp.experts.{e}.gate_proj)
                                   or Mixtral's (block_sparse_moe.experts.{e}.w1) */
    uint64_t weight_bytes;      /* bytes of weights held in memory */
    esft_model_tensor *tensors; /* (n_tensors) the non-expert weights, in load order; a tied
                                   lm_head is the embedding's entry; routed and shared experts
                                   and DeepSeek-V3's selection bias (a buffer) are not here */
    int n_tensors;
    /* private */
    void **blobs_;
    int n_blobs_, cap_blobs_;
    esft_allocator allocator;
} esft_model;

/* Opens dir (config.json plus model.safetensors or a sharded index) and reads
   every weight the forward uses into memory in its file dtype. Tensors the
   architecture does not use (rotary buffers, DeepSeek-V3's MTP layers) are
   skipped; a missing or misshapen one is an error naming it. Pair: esft_model_close. */
ESFTDEF esft_status esft_model_open(esft_model *m, const char *dir, const esft_allocator *allocator,
                                    esft_error *err);
ESFTDEF void esft_model_close(esft_model *m);

/* Called by the forward for each MoE layer with the routing it used, and for
   each PESC layer of run->trainable with its adapter MoE's routing (K = the
   PESC top_k; a PESC layer is a dense layer, so the layer index tells which). */
typedef void (*esft_route_fn)(void *user, int layer,
                              const int32_t *ids,    /* (T, K) */
                              const float *weights,  /* (T, K) as multiplied into the outputs */
                              int T, int K);

/* What one forward computes besides the hidden states. Every member optional. */
typedef struct esft_model_run {
    const int32_t *labels;       /* (T) Hugging Face labels: position t predicts labels[t+1];
                                    -100 = not scored. NULL: no loss */
    float *logits;               /* (T, V) out, every position */
    esft_stats *stats;           /* routing of each MoE layer added at the model's layer index */
    const unsigned char *stats_mask; /* (T) tokens counted in stats; NULL = all */
    esft_route_fn on_route;      /* and/or a callback */
    void *user;
    const struct esft_model_trainable *trainable; /* the forward runs trainable->view (its trained copies and adapters) */
    double *aux_loss;            /* out: PESC, the sum over layers of the adapter MoEs' auxiliary
                                    losses (alpha included); 0 without PESC. NULL = not wanted */
} esft_model_run;

/* One sample through the model. loss_sum (optional) receives the sum of the
   cross-entropies (nats) of the scored positions and n_scored their number (the
   mean is loss_sum / n_scored, pooled over samples as transformers does over a
   batch). Ids must be < V; a non-finite router logit or logit is ESFT_ERR_NUMERIC.
   Threads: esft_set_num_threads; the same bits for any count. Attention works on
   blocks of 64 queries: no (T, T) matrix is formed. */
ESFTDEF esft_status esft_model_forward(const esft_model *m, const int32_t *ids, /* (T) */
                                       int T, const esft_model_run *run,
                                       double *loss_sum, int64_t *n_scored, esft_error *err);

/* ---- training: what trains, and the backward to it ---------------------- */

/* The methods of ESFT's comparison (plus the PEFT baseline). */
typedef enum esft_train_method {
    ESFT_TRAIN_ESFT = 0, /* the experts of an expert config (+ its shared / non-expert flags) */
    ESFT_TRAIN_FFT,      /* every parameter */
    ESFT_TRAIN_LORA,     /* rank-r adapters on chosen frozen matrices */
    ESFT_TRAIN_PESC      /* Camelidae: an adapter MoE after each frozen dense MLP (router + adapters train) */
} esft_train_method;

/* Which matrices LoRA adapts (bits). */
#define ESFT_LORA_ATTN 1u /* the attention projections (q/k/v/o; MLA's q_a, q_b, kv_a, kv_b, o) */
#define ESFT_LORA_MLP  2u /* dense MLP layers' gate/up/down */
#define ESFT_LORA_EXPERTS 4u /* every routed expert's gate/up/down (Hugging Face per-expert names) */
#define ESFT__LORA_ALL (ESFT_LORA_ATTN | ESFT_LORA_MLP | ESFT_LORA_EXPERTS)

typedef struct esft_train_spec {
    esft_train_method method;
    const esft_expert_config *experts; /* ESFT: what trains (required) */
    int lora_rank;                     /* LoRA: r >= 1 */
    float lora_alpha;                  /* LoRA: scale = alpha / r */
    unsigned lora_targets;             /* LoRA: ESFT_LORA_* bits */
    uint64_t seed;                     /* LoRA: A drawn as PEFT's default (uniform +-1/sqrt(cols)), B = 0;
                                          PESC: the upcycling draw (layer l's block from seed mixed with l) */
    esft_pesc_config pesc;             /* PESC: n_experts, top_k, rank, scale, aux_alpha; d_model is taken
                                          from the model; dropout must be 0 (not implemented on models) */
} esft_train_spec;

/* The trainable set, as fp32 master copies in ONE parameter block, mirrored
   by ONE gradient block (and by esft_adamw's m and v: the optimizer is one
   loop over n_params floats). Frozen weights stay in their file dtype and own
   no gradient and no optimizer state: training costs 12 bytes per trainable
   parameter (gradient 4, Adam moments 8) beyond the fp32 copy (4).
   Block layout, in order:
   1. routed experts in increasing (layer, expert) order, each gate (F, D),
      up (F, D), down (D, F), the Hugging Face shapes;
   2. shared experts of every MoE layer in layer order (ESFT's shared_experts
      flag, or FFT), each gate (FS, D), up (FS, D), down (D, FS);
   3. non-expert tensors trained in full (ESFT's non_expert_modules flag, or
      FFT), in m->tensors order, each (rows, cols) as the file has it;
   4. LoRA adapters, in m->tensors order, each A (r, cols) then B (rows, r);
   5. PESC blocks, one per dense-MLP layer (cfg.is_moe[l] == 0) in layer
      order, each esft_pesc_param_count(&tr->pesc) floats laid out as
      esft_pesc_tensor_offset says: router (E, D), then per adapter expert
      W_down (R, D), W_up (D, R); upcycled by esft_pesc_init_weights (W_up = 0:
      the model equals the base until it trains).
   The model as trained (frozen weights, trained copies, adapters) is tr->view:
   forward it (esft_model_run.trainable does) to evaluate base + training. */
typedef struct esft_model_trainable {
    esft_train_method method;
    int n_layers, n_experts;   /* L, E of the model it was built for */
    int n_trained;             /* experts in the block */
    size_t expert_floats;      /* 3 F D */
    size_t n_params;           /* every float of the block */
    float *params;             /* (n_params) fp32 copies, initialised from the model's weights */
    float *grads;              /* (n_params) mirrored; the backward accumulates, the caller zeroes */
    int32_t *layer, *expert;   /* (n_trained) the (layer, expert) of each block slot */
    int32_t *slot;             /* (L, E) slot of expert e of layer l, -1 = frozen */
    int n_shared;              /* shared blocks in the block */
    size_t shared_floats;      /* 3 FS D */
    int32_t *shared_slot;      /* (L) shared block of layer l, -1 = frozen */
    int n_modules;             /* non-expert tensors trained in full */
    int32_t *module;           /* (n_modules) index into m->tensors */
    size_t *module_offset;     /* (n_modules) first float in the block */
    int n_lora;                /* adapted matrices */
    int lora_rank;
    float lora_alpha;
    unsigned lora_targets;
    int32_t *lora_tensor;      /* (n_lora) index into m->tensors, or for a routed expert's
                                  projection -1 - ((layer E + expert) 3 + part), part 0 gate,
                                  1 up, 2 down (esft_model_trainable_lora_base says which) */
    esft_lora *lora;           /* (n_lora) a, b point into params */
    int n_pesc;                /* PESC blocks (dense-MLP layers) */
    esft_pesc_config pesc;     /* PESC: the layers' config (d_model = the model's) */
    size_t pesc_floats;        /* esft_pesc_param_count(&pesc) */
    size_t pesc_offset;        /* first float of section 5 in the block */
    int32_t *pesc_slot;        /* (L) PESC block of layer l, -1 = none */
    double aux_loss;           /* PESC: sum over layers of the auxiliary losses (alpha included) of the
                                  last esft_model_forward_backward; 0 otherwise */
    esft_model view;           /* m with trained tensors and adapters in place (shares m's memory) */
    esft_allocator allocator;
    /* private */
    esft_model_layer *view_layers_;
    esft_matrix *view_experts_;  /* (L, 3, E) the view's expert tables, when experts carry adapters */
    const esft_model *base_;
} esft_model_trainable;

/* Builds the trainable set of spec over m: the experts (any file dtype,
   per-expert or fused) and tensors it trains copied out of m, adapters drawn,
   gradients zero. ESFT: an id past E, a layer past L or a dense layer is
   ESFT_ERR_RANGE. LoRA: a rank < 1 or no target is ESFT_ERR_INVALID_ARGUMENT.
   m must outlive tr. Pair: _uninit. */
ESFTDEF esft_status esft_model_trainable_init_spec(esft_model_trainable *tr, const esft_model *m,
                                                   const esft_train_spec *spec, const esft_allocator *allocator,
                                                   esft_error *err);
/* ESFT's trainable set of cfg (esft_model_trainable_init_spec with method ESFT). */
ESFTDEF esft_status esft_model_trainable_init(esft_model_trainable *tr, const esft_model *m,
                                              const esft_expert_config *cfg, const esft_allocator *allocator,
                                              esft_error *err);
ESFTDEF void esft_model_trainable_uninit(esft_model_trainable *tr);
/* Expert e of layer l inside block (tr->params or tr->grads): its gate (F, D),
   then up (F, D), then down (D, F); NULL when that expert is frozen. */
ESFTDEF float *esft_model_trainable_expert(const esft_model_trainable *tr, float *block, int layer, int expert);
/* Layer l's shared experts inside block: gate (FS, D), up (FS, D), down (D,
   FS); NULL when frozen. */
ESFTDEF float *esft_model_trainable_shared(const esft_model_trainable *tr, float *block, int layer);
/* LoRA adapter i's frozen matrix in m (tr->lora[i] adapts it), and, each
   optional, its checkpoint name (into name, cap bytes), its layer and 1 when
   it is in the attention half of that layer; NULL for i out of range. */
ESFTDEF const esft_matrix *esft_model_trainable_lora_base(const esft_model_trainable *tr, const esft_model *m, int i,
                                                          char *name, size_t cap, int *layer, int *attention);
/* Layer l's PESC block inside block (esft_pesc_param_count(&tr->pesc)
   floats, esft_pesc_tensor_offset's layout); NULL when l has none. */
ESFTDEF float *esft_model_trainable_pesc(const esft_model_trainable *tr, float *block, int layer);
/* Writes what tr trains in full (experts, shared experts, non-expert tensors)
   to path (safetensors) under the Hugging Face names of m's checkpoint, in
   m's file dtype (fp32 copies rounded to nearest-even for BF16/F16), with
   the expert config in __metadata__ (cfg: the one tr was built from; NULL
   for FFT: every expert, shared_experts and non_expert_modules set), so
   esft_checkpoint_merge puts them back into the base, per-expert or fused.
   FP8 tensors are ESFT_ERR_UNSUPPORTED (no re-quantisation); a LoRA set is
   saved by esft_model_lora_save. A PESC set (cfg ignored, NULL allowed) writes
   its routers and adapters in F32 under Camelidae's names
   (esft_pesc_tensor_name) with the PESC config in __metadata__ (keys
   "pesc_n_experts", "pesc_top_k", "pesc_rank", "pesc_scale"): new tensors,
   not merged into the base (docs/pesc.md says how a model directory is built). */
ESFTDEF esft_status esft_model_trainable_save(const esft_model_trainable *tr, const esft_model *m,
                                              const esft_expert_config *cfg, const char *path, esft_error *err);
/* Reads a file of trained tensors (as _save writes, F32/BF16/F16) into
   tr->params, e.g. to evaluate base + trained file or to go on training.
   Every tensor in it must be one tr trains, with its shape (ESFT_ERR_RANGE /
   ESFT_ERR_SHAPE naming it); tensors the file lacks keep their values. A
   PESC file's __metadata__ config, when present, must match tr's
   (ESFT_ERR_SHAPE). */
ESFTDEF esft_status esft_model_trainable_load(esft_model_trainable *tr, const esft_model *m, const char *path,
                                              esft_error *err);
/* A LoRA set in PEFT's layout: dir/adapter_model.safetensors (F32,
   base_model.model.<module>.lora_A.weight (r, cols) and .lora_B.weight
   (rows, r)) and dir/adapter_config.json (peft_type LORA, r, lora_alpha,
   target_modules, ...), which peft.PeftModel.from_pretrained loads onto the
   base model. dir is created if missing; each file is written atomically. */
ESFTDEF esft_status esft_model_lora_save(const esft_model_trainable *tr, const char *dir, esft_error *err);
/* Reads dir/adapter_model.safetensors into tr's adapters (every tensor must
   be one of tr's, with its shape). */
ESFTDEF esft_status esft_model_lora_load(esft_model_trainable *tr, const char *dir, esft_error *err);
/* Rebuilds a trainable set from what training wrote, to evaluate base +
   training without merging (or to go on training): from a trained file (the
   expert config in its metadata says what it trains; FFT's says everything;
   a PESC file's pesc_* keys give its adapter config, aux_alpha 0),
   or from a PEFT LoRA directory (r and lora_alpha from adapter_config.json,
   the targets from the adapted modules' names; modules PEFT did not adapt
   get B = 0, which adds nothing). Pair: esft_model_trainable_uninit. */
ESFTDEF esft_status esft_model_trainable_open(esft_model_trainable *tr, const esft_model *m, const char *path,
                                              esft_error *err);
ESFTDEF esft_status esft_model_lora_open(esft_model_trainable *tr, const esft_model *m, const char *dir,
                                         esft_error *err);

/* One training pass over one sample: the forward of tr->view, the
   cross-entropy of the scored positions (labels as esft_model_run's; loss_sum
   and n_scored as esft_model_forward's: the SUM of the token losses), and the
   backward through the model (lm_head, final norm, every layer's MoE or dense
   MLP, router weights, shared experts, norms, attention, residuals,
   embedding), down to the lowest layer that trains anything, into tr->grads: accumulates grad_scale * d(loss_sum)/d(params). For the mean loss
   of a batch pass grad_scale = 1 / (scored tokens of the whole batch).
   PESC: the objective is loss_sum + n_scored * aux (aux = the sum over PESC
   layers of this sample's auxiliary losses, alpha included, left in
   tr->aux_loss; loss_sum stays the cross-entropy alone): each layer's aux
   gradient enters with daux = grad_scale * n_scored. With grad_scale =
   1 / (batch's scored tokens) the batch gradient is that of mean CE +
   (token-weighted mean over samples of aux); for one sample it is exactly
   Camelidae's CE + sum of the layers' aux. A sample with nothing scored adds
   no aux gradient.
   Memory: the residual stream entering each layer is kept ((L + 1) T D
   floats); everything inside a layer is recomputed in the backward, one layer
   at a time (docs/training.md). The same bits for any thread count. */
ESFTDEF esft_status esft_model_forward_backward(const esft_model *m, esft_model_trainable *tr,
                                                const int32_t *ids,    /* (T) */
                                                const int32_t *labels, /* (T) */
                                                int T, float grad_scale, double *loss_sum,
                                                int64_t *n_scored, esft_error *err);

/* ---- data: JSONL samples ----------------------------------------------- */

/* Samples of token ids, one JSON object a line: {"input_ids": [...], "labels":
   [...]}. labels is optional (then every id is its own label); -100 marks a
   position that is not scored. Blank lines are skipped. */
typedef struct esft_dataset {
    int n_samples;
    int64_t *offset;     /* (n_samples + 1): sample s is [offset[s], offset[s+1]) */
    int32_t *ids;        /* (offset[n]) */
    int32_t *labels;     /* (offset[n]) */
    esft_allocator allocator;
} esft_dataset;

/* Reads path. max_samples > 0 stops after that many; vocab > 0 checks every id
   and label (ESFT_ERR_RANGE with the line). Errors name the file and line.
   Pair: esft_dataset_free. */
ESFTDEF esft_status esft_dataset_read_jsonl(esft_dataset *ds, const char *path, int max_samples, int vocab,
                                            const esft_allocator *allocator, esft_error *err);
ESFTDEF esft_status esft_dataset_parse_jsonl(esft_dataset *ds, const char *text, size_t size,
                                             const char *name, int max_samples, int vocab,
                                             const esft_allocator *allocator, esft_error *err);
ESFTDEF void esft_dataset_free(esft_dataset *ds);

/* ---- a float32 .npy written as it streams ---------------------------- */

/* rows x cols float32, C order, NumPy format 1.0; rows appended in order and the
   file renamed into place by commit only when all rows came (abort removes it). */
typedef struct esft_npy_writer {
    int64_t rows, cols, written;
    void *impl_;
    esft_allocator allocator;
} esft_npy_writer;
ESFTDEF esft_status esft_npy_open(esft_npy_writer *w, const char *path, int64_t rows, int64_t cols,
                                  esft_error *err);
ESFTDEF esft_status esft_npy_append(esft_npy_writer *w, const float *data, /* (n, cols) */
                                    int64_t n, esft_error *err);
ESFTDEF esft_status esft_npy_commit(esft_npy_writer *w, esft_error *err);
ESFTDEF void esft_npy_abort(esft_npy_writer *w);

#endif /* ESFT_NO_MODELS */

/* ---------------------------------------------------------------------- */
/* end of API                                                             */
/* ---------------------------------------------------------------------- */

#ifdef __cplusplus
}
#endif
#endif /* ESFT_H */

/* ===================================================================== */
/* ===================================================================== */
/*                           IMPLEMENTATION                              */
/* ===================================================================== */
/* ===================================================================== */

#ifdef ESFT_IMPLEMENTATION
#ifndef ESFT_IMPLEMENTATION_DONE
#define ESFT_IMPLEMENTATION_DONE

#include <errno.h>
#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Files: temp files, positioned reads, fsync, rename (ESFT file formats,
   checkpoints, .npy). */
#if defined(_WIN32)
#include <direct.h>
#include <fcntl.h>
#include <io.h>
#include <process.h>
#include <sys/stat.h>
#else
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/sendfile.h>
#endif
#endif

/* Threads (MoE layer, models, GEMM) and the CBLAS GEMM, when asked for. */
#if defined(_OPENMP)
#include <omp.h>
#if !defined(ESFT_NO_THREAD_LOCAL) && (defined(__unix__) || defined(__APPLE__))
#include <pthread.h> /* the GEMM scratch of a thread that ends is freed by a key destructor */
#endif
#endif
#if defined(ESFT_USE_CBLAS)
#include <cblas.h>
#endif

/* SIMD: SSE2 in the log parser's fast path, AVX2/AVX-512 in the GEMM kernels;
   each section defines its own ESFT__<feature> switch from the same tests. */
#if (defined(__SSE2__) || defined(_M_X64) || defined(_M_AMD64)) && !defined(ESFT_NO_SIMD)
#include <emmintrin.h>
#endif
#if (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))) && !defined(ESFT_NO_SIMD)
#include <immintrin.h>
#endif

#if defined(ESFT_MALLOC) && defined(ESFT_FREE) && defined(ESFT_REALLOC)
/* all three given */
#elif !defined(ESFT_MALLOC) && !defined(ESFT_FREE) && !defined(ESFT_REALLOC)
#define ESFT_MALLOC(sz) malloc(sz)
#define ESFT_REALLOC(p, sz) realloc(p, sz)
#define ESFT_FREE(p) free(p)
#else
#error "define all or none of ESFT_MALLOC, ESFT_REALLOC, ESFT_FREE"
#endif

#ifndef ESFT_ASSERT
#include <assert.h>
#define ESFT_ASSERT(x) assert(x)
#endif

/* Marks a helper that some configurations do not call. */
#if defined(__GNUC__) || defined(__clang__)
#define ESFT__UNUSED __attribute__((unused))
#else
#define ESFT__UNUSED
#endif

/* A pragma from inside a macro (C99 _Pragma; MSVC spells it __pragma), for the
   OpenMP work-sharing macros of the MoE and GEMM sections, which expand to it
   only when built with OpenMP (no unknown pragma under -Werror otherwise). */
#if defined(_MSC_VER) && !defined(__clang__)
#define ESFT__PRAGMA(x) __pragma(x)
#else
#define ESFT__PRAGMA(x) _Pragma(#x)
#endif

#ifdef __cplusplus
#define ESFT__CAST(T, x) static_cast<T>(x)
#else
#define ESFT__CAST(T, x) ((T)(x))
#endif

/* ===================================================================== */
/* 1. version & options                                                  */
/* ===================================================================== */

ESFTDEF const char *esft_version(void) { return ESFT_VERSION_STRING; }

/* ===================================================================== */
/* 2. status & error detail                                              */
/* ===================================================================== */

ESFTDEF const char *esft_status_string(esft_status s)
{
    switch (s) {
    case ESFT_OK: return "ok";
    case ESFT_ERR_INVALID_ARGUMENT: return "invalid argument";
    case ESFT_ERR_OUT_OF_MEMORY: return "out of memory";
    case ESFT_ERR_PARSE: return "parse error";
    case ESFT_ERR_SHAPE: return "shape mismatch";
    case ESFT_ERR_RANGE: return "value out of range";
    case ESFT_ERR_NUMERIC: return "NaN or Inf";
    case ESFT_ERR_UNSUPPORTED: return "unsupported";
    case ESFT_ERR_BACKEND: return "backend failure";
    case ESFT_ERR_IO: return "I/O error";
    }
    return "unknown status";
}

/* The one place that fills a failure: every field is set, so an esft_error
   reused after an earlier failure never keeps that failure's file, line or
   offset (a message would then point at the wrong file). */
static void esft__error_vset(esft_error *err, esft_status s, const char *file, long line, const char *fmt,
                             va_list ap)
{
    if (!err) return;
    memset(err, 0, sizeof *err);
    err->status = s;
    err->line = line;
    err->offset = -1;
    snprintf(err->file, sizeof err->file, "%s", file ? file : "");
    vsnprintf(err->message, sizeof err->message, fmt, ap);
}

/* Records a failure in err (if given) and returns its status, so call sites
   read `return esft__fail(err, ESFT_ERR_RANGE, "...", ...);`. */
static esft_status esft__fail(esft_error *err, esft_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    esft__error_vset(err, s, NULL, 0, fmt, ap);
    va_end(ap);
    return s;
}

/* Like esft__fail, with the place: file and line (0 = none). */
static esft_status esft__fail_at(esft_error *err, esft_status s, const char *file, long line,
                                 const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    esft__error_vset(err, s, file, line, fmt, ap);
    va_end(ap);
    return s;
}

static void esft__error_clear(esft_error *err)
{
    if (err) {
        memset(err, 0, sizeof *err);
        err->offset = -1;
    }
}

/* ---- NaN and Inf: one scan ------------------------------------------- */

/* Magnitude bits of a float: NaN or Inf iff >= 0x7f800000 (exponent all ones). */
static uint32_t esft__abs_bits(float v)
{
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    return b & 0x7fffffffu;
}

/* Index of x's first NaN or Inf; n when all n values are finite. An integer max
   of the magnitude bits vectorises where isfinite's early exit does not, and 64
   chunks split over the threads (each writes its own slot): PESC's checks of F,
   params and dy read ~200 MB per call at D 4096, which a scalar loop made ~10%
   of the layer. Only a hit pays for the scalar pass that finds the element. */
static size_t esft__first_nonfinite(const float *x, size_t n)
{
    uint32_t top[64];
    size_t per = (n + 63) / 64, i;
    int ch, any = 0, nt = n < 1048576 ? 1 : esft_get_num_threads(); /* below ~1M a team costs more */
    (void)nt; /* unused without OpenMP */
#if defined(_OPENMP)
    ESFT__PRAGMA(omp parallel for if(nt > 1) num_threads(nt) schedule(static))
#endif
    for (ch = 0; ch < 64; ch++) {
        size_t j, lo = (size_t)ch * per, hi = lo + per < n ? lo + per : n;
        uint32_t m = 0;
        for (j = lo; j < hi; j++) {
            uint32_t b = esft__abs_bits(x[j]);
            m = b > m ? b : m;
        }
        top[ch] = m;
    }
    for (ch = 0; ch < 64; ch++) any |= top[ch] >= 0x7f800000u;
    if (!any) return n;
    for (i = 0; i < n; i++)
        if (!isfinite(x[i])) break;
    return i;
}

/* ESFT_ERR_NUMERIC naming x's first NaN or Inf as what[row][col] (rows of
   width values) or, with width 0, what[i] (a flat block such as parameters). */
static esft_status esft__check_finite(const float *x, size_t n, const char *what, size_t width,
                                      esft_error *err)
{
    size_t i = esft__first_nonfinite(x, n);
    if (i == n) return ESFT_OK;
    if (width)
        return esft__fail(err, ESFT_ERR_NUMERIC, "%s[%lu][%lu] is %s", what, (unsigned long)(i / width),
                          (unsigned long)(i % width), isnan(x[i]) ? "NaN" : "Inf");
    return esft__fail(err, ESFT_ERR_NUMERIC, "%s[%lu] is %s", what, (unsigned long)i, isnan(x[i]) ? "NaN" : "Inf");
}

/* ---- numbers as text, whatever the locale ----------------------------- */

/* printf and strtod follow the host's LC_NUMERIC: under a comma-decimal locale
   (de_DE, fr_FR, ...) they write "0,25", which is not JSON, and stop reading
   "0.25" at the '.'. Files always use '.', so every number in or out of a file
   goes through these two, which swap the locale's decimal point for '.'. */

/* The locale's decimal point; "." when it is "." or unknown. */
static const char *esft__decimal_point(void)
{
    const struct lconv *lc = localeconv();
    return lc && lc->decimal_point && lc->decimal_point[0] ? lc->decimal_point : ".";
}

/* x as printf's "%.*f" (fixed) or "%.*g" would write it in the C locale. */
static void esft__dtoa(char *out, size_t cap, double x, int prec, int fixed)
{
    const char *dp = esft__decimal_point();
    char *at;
    if (fixed) snprintf(out, cap, "%.*f", prec, x);
    else snprintf(out, cap, "%.*g", prec, x);
    if (strcmp(dp, ".") == 0 || (at = strstr(out, dp)) == NULL) return;
    *at = '.';
    memmove(at + 1, at + strlen(dp), strlen(at + strlen(dp)) + 1);
}

/* Reads s[0..n) as strtod would in the C locale; 1 only if all n bytes are the
   number (callers have checked the characters; a locale decimal point such as
   ',' is refused, as the C locale would). */
static int esft__strtod(const char *s, size_t n, double *out)
{
    const char *dp = esft__decimal_point();
    size_t dn = strlen(dp), i, j = 0;
    char buf[600], *stop;
    for (i = 0; i < n; i++) {
        if (j + dn + 1 > sizeof buf) return 0;
        if (s[i] == '.') { memcpy(buf + j, dp, dn); j += dn; continue; }
        if (s[i] == 0 || (strcmp(dp, ".") != 0 && strchr(dp, s[i]) != NULL)) return 0;
        buf[j++] = s[i];
    }
    buf[j] = 0;
    *out = strtod(buf, &stop);
    return j > 0 && stop == buf + j;
}

/* ===================================================================== */
/* 3. allocation                                                         */
/* ===================================================================== */

static void *esft__default_alloc(void *user, size_t size) { (void)user; return ESFT_MALLOC(size); }
static void esft__default_free(void *user, void *p) { (void)user; ESFT_FREE(p); }

static esft_allocator esft__allocator_or_default(const esft_allocator *a)
{
    esft_allocator d;
    if (a && a->alloc && a->free) return *a;
    d.user = NULL;
    d.alloc = esft__default_alloc;
    d.free = esft__default_free;
    return d;
}

/* n * size bytes, zeroed; NULL when the product overflows or memory runs out. */
static void *esft__calloc(const esft_allocator *a, size_t n, size_t size)
{
    void *p;
    if (size && n > (size_t)-1 / size) return NULL;
    if (n * size == 0) n = size = 1;
    p = a->alloc(a->user, n * size);
    if (p) memset(p, 0, n * size);
    return p;
}

static void esft__release(const esft_allocator *a, void *p)
{
    if (p) a->free(a->user, p);
}

/* ===================================================================== */
/* 4. backend interface: dispatch (the CPU backend is at the end)        */
/* ===================================================================== */

ESFTDEF esft_status esft_backend_check(const esft_backend *b, esft_error *err)
{
    if (!b) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "backend is NULL");
    if (b->api_version != ESFT_BACKEND_API_VERSION)
        return esft__fail(err, ESFT_ERR_UNSUPPORTED,
                          "backend '%s' has api_version %d, this esft.h expects %d",
                          b->name ? b->name : "?", b->api_version, ESFT_BACKEND_API_VERSION);
    if (!b->name) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "backend has no name");
    return ESFT_OK;
}

/* The CPU backend's alloc (defined with the table at the end): a backend that
   uses it has host memory. */
static esft_status esft__cpu_alloc(void *context, size_t bytes, void **out);

static esft_status esft__missing_op(const esft_backend *b, const char *op, esft_error *err)
{
    return esft__fail(err, ESFT_ERR_UNSUPPORTED, "backend '%s' has no %s op", b->name, op);
}

/* ===================================================================== */
/* 5. routing                                                            */
/* ===================================================================== */

ESFTDEF esft_route_config esft_route_config_init(int n_experts, int top_k)
{
    esft_route_config c;
    memset(&c, 0, sizeof c);
    c.n_experts = n_experts;
    c.top_k = top_k;
    c.gating = ESFT_GATING_SOFTMAX;
    c.renormalize = 0;
    c.n_group = 0;
    c.topk_group = 0;
    c.group_score = ESFT_GROUP_SCORE_MAX;
    c.routed_scaling = 1.0f;
    c.selection_bias = NULL;
    return c;
}

ESFTDEF esft_route_config esft_route_config_deepseek_v2_lite(void)
{
    return esft_route_config_init(64, 6);
}

ESFTDEF esft_route_config esft_route_config_deepseek_v3(const float *bias)
{
    esft_route_config c = esft_route_config_init(256, 8);
    c.gating = ESFT_GATING_SIGMOID;
    c.renormalize = 1;
    c.n_group = 8;
    c.topk_group = 4;
    c.group_score = ESFT_GROUP_SCORE_TOP2_SUM;
    c.routed_scaling = 2.5f;
    c.selection_bias = bias;
    return c;
}

static int esft__grouped(const esft_route_config *c) { return c->n_group > 1; }

/* Everything of esft_route_config_validate but the bias, which is not read here:
   it may be device memory (the backend doors use this). */
static esft_status esft__route_config_sizes(const esft_route_config *c, esft_error *err)
{
    if (!c) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "route config is NULL");
    if (c->n_experts < 1) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "n_experts %d < 1", c->n_experts);
    if (c->top_k < 1 || c->top_k > c->n_experts)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "top_k %d outside [1, %d experts]",
                          c->top_k, c->n_experts);
    if (c->gating != ESFT_GATING_SOFTMAX && c->gating != ESFT_GATING_SIGMOID)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "unknown gating %d", (int)c->gating);
    /* checked even without groups: a config that is wrong stays wrong when a
       later edit turns the groups on */
    if (c->group_score != ESFT_GROUP_SCORE_MAX && c->group_score != ESFT_GROUP_SCORE_TOP2_SUM)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "unknown group_score %d", (int)c->group_score);
    if (!(c->routed_scaling > 0.0f) || !isfinite(c->routed_scaling))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "routed_scaling must be finite and > 0");
    if (esft__grouped(c)) {
        int per_group;
        if (c->n_experts % c->n_group)
            return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "%d experts do not split into %d groups",
                              c->n_experts, c->n_group);
        if (c->topk_group < 1 || c->topk_group > c->n_group)
            return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "topk_group %d outside [1, %d]",
                              c->topk_group, c->n_group);
        per_group = c->n_experts / c->n_group;
        if (c->group_score == ESFT_GROUP_SCORE_TOP2_SUM && per_group < 2)
            return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "top-2 group score needs >= 2 experts per group");
        if (c->topk_group * per_group < c->top_k)
            return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT,
                              "top_k %d > %d experts in the %d kept groups", c->top_k,
                              c->topk_group * per_group, c->topk_group);
    }
    return ESFT_OK;
}

/* A NaN bias would make every comparison of the selection false (the choice then
   depends on the order of the loop), an Inf one would pin an expert. */
static esft_status esft__route_bias_check(const esft_route_config *c, esft_error *err)
{
    int j;
    for (j = 0; c->selection_bias && j < c->n_experts; j++)
        if (!isfinite(c->selection_bias[j]))
            return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "selection_bias[%d] is %s", j,
                              isnan(c->selection_bias[j]) ? "NaN" : "Inf");
    return ESFT_OK;
}

ESFTDEF esft_status esft_route_config_validate(const esft_route_config *c, esft_error *err)
{
    esft_status s = esft__route_config_sizes(c, err);
    return s != ESFT_OK ? s : esft__route_bias_check(c, err);
}

/* True when a ranks before b: higher score, ties to the lower index. */
static int esft__ranks_before(float sa, int a, float sb, int b)
{
    return sa > sb || (sa == sb && a < b);
}

/* Indices of the k best of score[0..n) into out, best first; allowed (optional)
   masks candidates. Insertion into a sorted list of k: k is small (<= 16 typical). */
static void esft__top_k(int32_t *out, const float *score, const unsigned char *allowed, int n, int k)
{
    int i, filled = 0;
    for (i = 0; i < n; i++) {
        int j;
        if (allowed && !allowed[i]) continue;
        if (filled == k && !esft__ranks_before(score[i], i, score[out[k - 1]], out[k - 1])) continue;
        j = filled < k ? filled++ : k - 1;
        while (j > 0 && esft__ranks_before(score[i], i, score[out[j - 1]], out[j - 1])) {
            out[j] = out[j - 1];
            j--;
        }
        out[j] = i;
    }
}

static void esft__softmax_row(float *p, const float *x, int n)
{
    int i;
    float mx = x[0], sum = 0.0f;
    for (i = 1; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    for (i = 0; i < n; i++) { p[i] = expf(x[i] - mx); sum += p[i]; }
    for (i = 0; i < n; i++) p[i] /= sum;
}

static void esft__sigmoid_row(float *p, const float *x, int n)
{
    int i;
    for (i = 0; i < n; i++) p[i] = 1.0f / (1.0f + expf(-x[i]));
}

/* Marks the experts of the topk_group best groups as allowed. */
static void esft__allow_best_groups(unsigned char *allowed, const esft_route_config *c,
                                    const float *choice, float *group_score, int32_t *best_groups)
{
    int g, i, per = c->n_experts / c->n_group;
    for (g = 0; g < c->n_group; g++) {
        const float *s = choice + g * per;
        float first = -INFINITY, second = -INFINITY;
        for (i = 0; i < per; i++) {
            if (s[i] > first) { second = first; first = s[i]; }
            else if (s[i] > second) second = s[i];
        }
        group_score[g] = c->group_score == ESFT_GROUP_SCORE_TOP2_SUM ? first + second : first;
    }
    esft__top_k(best_groups, group_score, NULL, c->n_group, c->topk_group);
    memset(allowed, 0, (size_t)c->n_experts);
    for (g = 0; g < c->topk_group; g++) memset(allowed + best_groups[g] * per, 1, (size_t)per);
}

/* One token: probs from logits, selection, weights. scratch holds 2E floats + E bytes + 2G. */
static void esft__route_token(const esft_route_config *c, int32_t *ids, float *weights,
                              float *probs, const float *logits, float *scratch)
{
    int E = c->n_experts, K = c->top_k, j;
    float *choice = scratch + E;
    unsigned char *allowed = ESFT__CAST(unsigned char *, (void *)(scratch + 2 * E));
    float *group_score = scratch + 3 * E;
    int32_t *best_groups = ESFT__CAST(int32_t *, (void *)(group_score + (c->n_group > 0 ? c->n_group : 1)));
    const float *sel = probs;
    if (c->gating == ESFT_GATING_SOFTMAX) esft__softmax_row(probs, logits, E);
    else esft__sigmoid_row(probs, logits, E);
    if (c->selection_bias) {
        for (j = 0; j < E; j++) choice[j] = probs[j] + c->selection_bias[j];
        sel = choice;
    }
    if (esft__grouped(c)) esft__allow_best_groups(allowed, c, sel, group_score, best_groups);
    esft__top_k(ids, sel, esft__grouped(c) ? allowed : NULL, E, K);
    {
        float sum = 0.0f;
        for (j = 0; j < K; j++) { weights[j] = probs[ids[j]]; sum += weights[j]; }
        for (j = 0; j < K; j++) {
            if (c->renormalize) weights[j] /= sum + 1e-20f;
            weights[j] *= c->routed_scaling;
        }
    }
}

/* ---- routing slots by expert: grouping, load balance, backward ---------- */
/* Shared by the MoE layer, the PESC layer and the models' forward. */

/* offset (E + 1): expert e has offset[e+1] - offset[e] of the n slots of ids,
   offset[e] the count of the slots of lower experts. */
static void esft__count_slots(int32_t *offset, const int32_t *ids, int n, int E)
{
    int i, e;
    memset(offset, 0, (size_t)(E + 1) * sizeof(int32_t));
    for (i = 0; i < n; i++) offset[ids[i] + 1]++;
    for (e = 0; e < E; e++) offset[e + 1] += offset[e];
}

/* Counting sort of the n routing slots t*K+j by expert, stable (slot order
   inside an expert), so each expert's rows are one contiguous GEMM: order[p] is
   the slot at sorted position p, pos (NULL: not wanted) its inverse, and expert
   e's positions are [offset[e], offset[e+1]). */
static void esft__sort_slots(int32_t *order, int32_t *pos, int32_t *offset, const int32_t *ids, int n, int E)
{
    int i, e;
    esft__count_slots(offset, ids, n, E);
    for (i = 0; i < n; i++) {
        int p = offset[ids[i]]++;
        order[p] = i;
        if (pos) pos[i] = p;
    }
    for (e = E; e > 0; e--) offset[e] = offset[e - 1]; /* the fill advanced each start to its end */
    offset[0] = 0;
}

/* Load balance of tokens [0, T) (docs/moe.md): f_e, the share of the T*K slots
   that went to expert e (offset from esft__count_slots), goes to f (E); returns
   sum_e f_e P_e with P_e expert e's mean router probability. The auxiliary
   loss is alpha * E times it. */
static double esft__balance(float *f, const float *probs, const int32_t *offset, int T, int E, int K)
{
    int e, t;
    double sum = 0.0;
    for (e = 0; e < E; e++) {
        double P = 0.0, fe = (double)(offset[e + 1] - offset[e]) / ((double)T * K);
        for (t = 0; t < T; t++) P += probs[(size_t)t * E + e];
        f[e] = (float)fe;
        sum += fe * (P / T);
    }
    return sum;
}

/* dL/dlogits of one token (E) from dL/dweights (dw, K) and the aux loss's
   dL/dp (aux, E; NULL: none); p (E) its probabilities, ids (K) its experts.
   Renormalised softmax gating is the softmax over the K chosen (PESC's form). */
static void esft__route_backward_token(const esft_route_config *rc, float *dl, const float *p,
                                       const int32_t *ids, const float *dw, const float *aux, int E)
{
    int K = rc->top_k, j, e;
    float scale = rc->routed_scaling;
    for (e = 0; e < E; e++) dl[e] = aux ? aux[e] : 0.0f; /* dl holds dL/dp first */
    if (rc->renormalize) {
        float s = 0.0f, dot = 0.0f;
        for (j = 0; j < K; j++) s += p[ids[j]];
        s += 1e-20f; /* as esft__route_token */
        for (j = 0; j < K; j++) dot += dw[j] * p[ids[j]];
        for (j = 0; j < K; j++) dl[ids[j]] += scale * (dw[j] / s - dot / (s * s));
    } else {
        for (j = 0; j < K; j++) dl[ids[j]] += scale * dw[j];
    }
    if (rc->gating == ESFT_GATING_SOFTMAX) {
        float dot = 0.0f;
        for (e = 0; e < E; e++) dot += p[e] * dl[e];
        for (e = 0; e < E; e++) dl[e] = p[e] * (dl[e] - dot);
    } else {
        for (e = 0; e < E; e++) dl[e] *= p[e] * (1.0f - p[e]);
    }
}

static esft_status esft__route_cpu(void *context, const esft_route_config *c, int32_t *ids,
                                   float *weights, float *probs, const float *logits, int T,
                                   esft_error *err)
{
    esft_allocator a = esft__allocator_or_default(NULL);
    int E = c->n_experts, G = c->n_group > 0 ? c->n_group : 1, t;
    size_t bad;
    /* scratch: [0,E) a probs row when the caller wants none, [E,2E) biased
       choice, [2E,3E) allowed mask (bytes), then G group scores and G group ids */
    size_t floats = (size_t)E * 3 + (size_t)G * 2;
    float *scratch;
    esft_status s = esft__route_bias_check(c, err);
    (void)context;
    if (s != ESFT_OK) return s;
    bad = esft__first_nonfinite(logits, (size_t)T * E);
    if (bad < (size_t)T * E)
        return esft__fail(err, ESFT_ERR_NUMERIC, "router logit of token %lu, expert %lu is %s",
                          (unsigned long)(bad / E), (unsigned long)(bad % E), isnan(logits[bad]) ? "NaN" : "Inf");
    scratch = ESFT__CAST(float *, esft__calloc(&a, floats, sizeof(float)));
    if (!scratch) return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "routing scratch of %lu floats",
                                    (unsigned long)floats);
    for (t = 0; t < T; t++) {
        float *p = probs ? probs + (size_t)t * E : scratch;
        esft__route_token(c, ids + (size_t)t * c->top_k, weights + (size_t)t * c->top_k, p,
                          logits + (size_t)t * E, scratch);
    }
    esft__release(&a, scratch);
    return ESFT_OK;
}

static esft_status esft__route_check(const esft_route_config *c, const int32_t *ids,
                                     const float *weights, const float *logits, int T,
                                     esft_error *err)
{
    esft_status s = esft__route_config_sizes(c, err);
    if (s != ESFT_OK) return s;
    if (T < 0) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "T = %d < 0", T);
    if (T > 0 && (!ids || !weights || !logits))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "ids, weights and logits must not be NULL");
    return ESFT_OK;
}

ESFTDEF esft_status esft_route_with(const esft_backend *b, const esft_route_config *cfg,
                                    int32_t *ids, float *weights, float *probs,
                                    const float *logits, int T, esft_error *err)
{
    esft_status s = esft_backend_check(b, err);
    if (s == ESFT_OK) s = esft__route_check(cfg, ids, weights, logits, T, err);
    if (s != ESFT_OK) return s;
    if (!b->route) return esft__missing_op(b, "route", err);
    return b->route(b->context, cfg, ids, weights, probs, logits, T, err);
}

ESFTDEF esft_status esft_route(const esft_route_config *cfg, int32_t *ids, float *weights,
                               float *probs, const float *logits, int T, esft_error *err)
{
    return esft_route_with(esft_backend_cpu(), cfg, ids, weights, probs, logits, T, err);
}

/* ===================================================================== */
/* 6. router statistics                                                  */
/* ===================================================================== */

static int esft__product_fits(size_t a, size_t b) { return b == 0 || a <= (size_t)-1 / b; }

ESFTDEF esft_status esft_stats_init(esft_stats *st, int n_layers, int n_experts, int top_k,
                                    const esft_allocator *allocator)
{
    size_t le;
    uint64_t **arrays[7];
    size_t sizes[7];
    int i;
    if (!st) return ESFT_ERR_INVALID_ARGUMENT;
    memset(st, 0, sizeof *st);
    if (n_layers < 1 || n_experts < 1 || top_k < 1 || top_k > n_experts)
        return ESFT_ERR_INVALID_ARGUMENT;
    if (n_layers > ESFT_STATS_MAX_LAYERS || n_experts > ESFT_STATS_MAX_EXPERTS ||
        (int64_t)n_layers * n_experts > ESFT_STATS_MAX_CELLS)
        return ESFT_ERR_RANGE;
    le = (size_t)n_layers * (size_t)n_experts;
    st->n_layers = n_layers;
    st->n_experts = n_experts;
    st->top_k = top_k;
    st->backend = esft_backend_cpu();
    st->allocator = esft__allocator_or_default(allocator);
    arrays[0] = &st->count;          sizes[0] = le;
    arrays[1] = &st->gate_sum;       sizes[1] = le;
    arrays[2] = &st->token_frac_sum; sizes[2] = le;
    arrays[3] = &st->gate_frac_sum;  sizes[3] = le;
    arrays[4] = &st->n_tokens;       sizes[4] = (size_t)n_layers;
    arrays[5] = &st->n_samples;      sizes[5] = (size_t)n_layers;
    arrays[6] = &st->scratch;        sizes[6] = 2 * (size_t)n_experts;
    for (i = 0; i < 7; i++) { /* each checked before the next is made (esft__calloc zero-fills) */
        *arrays[i] = ESFT__CAST(uint64_t *, esft__calloc(&st->allocator, sizes[i], sizeof(uint64_t)));
        if (!*arrays[i]) {
            esft_stats_uninit(st);
            return ESFT_ERR_OUT_OF_MEMORY;
        }
    }
    return ESFT_OK;
}

ESFTDEF void esft_stats_uninit(esft_stats *st)
{
    if (!st || !st->allocator.free) return;
    esft__release(&st->allocator, st->count);
    esft__release(&st->allocator, st->gate_sum);
    esft__release(&st->allocator, st->token_frac_sum);
    esft__release(&st->allocator, st->gate_frac_sum);
    esft__release(&st->allocator, st->n_tokens);
    esft__release(&st->allocator, st->n_samples);
    esft__release(&st->allocator, st->scratch);
    if (st->backend_scratch) st->scratch_backend->free(st->scratch_backend->context, st->backend_scratch);
    memset(st, 0, sizeof *st);
}

ESFTDEF void esft_stats_reset(esft_stats *st)
{
    size_t le;
    if (!st || !st->count) return;
    le = (size_t)st->n_layers * (size_t)st->n_experts;
    memset(st->count, 0, le * sizeof(uint64_t));
    memset(st->gate_sum, 0, le * sizeof(uint64_t));
    memset(st->token_frac_sum, 0, le * sizeof(uint64_t));
    memset(st->gate_frac_sum, 0, le * sizeof(uint64_t));
    memset(st->n_tokens, 0, (size_t)st->n_layers * sizeof(uint64_t));
    memset(st->n_samples, 0, (size_t)st->n_layers * sizeof(uint64_t));
}

/* A weight in fixed point. Callers have checked 0 <= w <= ESFT_MAX_GATE_WEIGHT. */
static uint64_t esft__to_fixed(float w) { return (uint64_t)((double)w * ESFT_FIXED_ONE + 0.5); }

/* Fast checks over n values: nonzero if any id is outside [0, E) / any weight is
   not a finite number in [0, ESFT_MAX_GATE_WEIGHT]. Branch-free and in blocks of constant length,
   so compilers vectorize them even at -O2; the exact culprit is searched for only
   when one of these says there is one. */
#define ESFT__CHECK_BLOCK 64

static unsigned esft__ids_bad(const int32_t *ids, size_t n, int E)
{
    size_t i = 0, j;
    unsigned bad = 0;
    for (; i + ESFT__CHECK_BLOCK <= n; i += ESFT__CHECK_BLOCK)
        for (j = 0; j < ESFT__CHECK_BLOCK; j++) bad |= (uint32_t)ids[i + j] >= (uint32_t)E;
    for (; i < n; i++) bad |= (uint32_t)ids[i] >= (uint32_t)E;
    return bad;
}

static unsigned esft__weights_bad(const float *w, size_t n)
{
    size_t i = 0, j;
    unsigned bad = 0;
    for (; i + ESFT__CHECK_BLOCK <= n; i += ESFT__CHECK_BLOCK)
        for (j = 0; j < ESFT__CHECK_BLOCK; j++)
            bad |= (unsigned)!((w[i + j] >= 0.0f) & (w[i + j] <= ESFT_MAX_GATE_WEIGHT));
    for (; i < n; i++) bad |= (unsigned)!((w[i] >= 0.0f) & (w[i] <= ESFT_MAX_GATE_WEIGHT));
    return bad;
}

/* Checks T tokens of routing, naming the first bad one. t0 is the index of the
   first of them in the caller's sample (for messages). */
static esft_status esft__stats_check_routing(const int32_t *ids, const float *weights, int T, int K,
                                             int E, int t0, esft_error *err)
{
    size_t i, n = (size_t)T * (size_t)K;
    if (!esft__ids_bad(ids, n, E) && (!weights || !esft__weights_bad(weights, n))) return ESFT_OK;
    for (i = 0; i < n; i++) {
        unsigned long t = (unsigned long)t0 + (unsigned long)(i / (size_t)K);
        if (ids[i] < 0 || ids[i] >= E)
            return esft__fail(err, ESFT_ERR_RANGE, "token %lu: expert id %ld outside [0, %d)", t,
                              (long)ids[i], E);
        if (weights && !(weights[i] >= 0.0f && weights[i] <= ESFT_MAX_GATE_WEIGHT))
            return esft__fail(err, isnan(weights[i]) || isinf(weights[i]) ? ESFT_ERR_NUMERIC : ESFT_ERR_RANGE,
                              "token %lu: weight %g is not a finite number in [0, %g]", t, (double)weights[i],
                              (double)ESFT_MAX_GATE_WEIGHT);
    }
    return ESFT_OK;
}

/* dst[e] += (num[e] * 2^shift + den / 2) / den: a ratio in fixed point, rounded to
   nearest, exact integer arithmetic (unsigned, wrapping like the plain formula).
   A hardware division per value would cost more than a sample's histogram, so:
   a double reciprocal gives the quotient to within 1 when the dividend is below
   2^52, and one integer correction makes it exact; larger dividends divide. */
static void esft__fixed_ratio_add(uint64_t *dst, const uint64_t *num, int shift, uint64_t den, int E)
{
    double inv = 1.0 / (double)den;
    uint64_t half = den / 2;
    int e;
    for (e = 0; e < E; e++) {
        uint64_t x = (num[e] << shift) + half, q;
        if (x < ((uint64_t)1 << 52)) {
            q = (uint64_t)((double)x * inv);
            if (q * den > x) q--;
            else if (x - q * den >= den) q++;
        } else q = x / den;
        dst[e] += q;
    }
}

/* One fixed-point ratio of the fast case of esft__fixed_ratio_add: x < 2^52 and
   den < 2^62. The double quotient is off by at most 1; the remainder's sign and
   size correct it without branches (a mispredicted branch per expert cost more
   than the rest of the row), so the loop below vectorizes. */
static uint64_t esft__ratio_small(uint64_t x, double inv, uint64_t den)
{
    uint64_t q = (uint64_t)((double)x * inv);
    int64_t r = (int64_t)(x - q * den);
    return q + (uint64_t)(r >= (int64_t)den) - (uint64_t)(r < 0);
}

/* Adds one sample's histogram (count, gsum) to the layer's rows: counts, weight
   sums and both per-sample ratios, in one pass over the experts. When every
   dividend is below 2^52 (always, short of samples with millions of tokens or
   weights far above 1), the ratios take the branch-free path; otherwise
   esft__fixed_ratio_add gives the same values. */
static void esft__stats_fold_row(uint64_t *row_count, uint64_t *row_gate, uint64_t *token_frac,
                                 uint64_t *gate_frac, /* (E) each, a layer's rows */
                                 const uint64_t *count, const uint64_t *gsum, /* (E) the sample */
                                 uint64_t n_counted, int K, int E)
{
    uint64_t den_t = n_counted * (uint64_t)K, den_g = n_counted, top = 0;
    uint64_t half_t = den_t / 2, half_g = den_g / 2;
    double inv_t = 1.0 / (double)den_t, inv_g = 1.0 / (double)den_g;
    int e;
    for (e = 0; e < E; e++) {
        row_count[e] += count[e];
        row_gate[e] += gsum[e];
        top |= (count[e] << 32) | gsum[e];
    }
    /* count <= n_counted * K < 2^31, so count << 32 does not wrap; halves < 2^31. */
    if (top >= ((uint64_t)1 << 51)) {
        esft__fixed_ratio_add(token_frac, count, 32, den_t, E);
        esft__fixed_ratio_add(gate_frac, gsum, 0, den_g, E);
        return;
    }
    for (e = 0; e < E; e++) {
        token_frac[e] += esft__ratio_small((count[e] << 32) + half_t, inv_t, den_t);
        gate_frac[e] += esft__ratio_small(gsum[e] + half_g, inv_g, den_g);
    }
}

/* Nonzero if esft__stats_fold_row would wrap one of the layer's sums. The
   per-sample ratios add at most 2^32 (token: count <= K N) and gsum[e] (gate:
   a mean over N >= 1 tokens, rounded, is at most the sum). Branch-free over E. */
static unsigned esft__stats_row_full(const uint64_t *row_count, const uint64_t *row_gate,
                                     const uint64_t *token_frac, const uint64_t *gate_frac, /* (E) */
                                     const uint64_t *count, const uint64_t *gsum, int E) /* (E) */
{
    const uint64_t frac_room = ~(uint64_t)0 - ((uint64_t)1 << 32);
    unsigned full = 0;
    int e;
    for (e = 0; e < E; e++)
        full |= (unsigned)(row_count[e] + count[e] < row_count[e]) | (unsigned)(row_gate[e] + gsum[e] < row_gate[e]) |
                (unsigned)(token_frac[e] > frac_room) | (unsigned)(gate_frac[e] + gsum[e] < gate_frac[e]);
    return full;
}

/* ESFT_ERR_RANGE when a sample's weights sum past ESFT_MAX_SAMPLE_WEIGHT. */
static esft_status esft__stats_sample_weight(double total, esft_error *err)
{
    if (total > ESFT_MAX_SAMPLE_WEIGHT)
        return esft__fail(err, ESFT_ERR_RANGE,
                          "the sample's gate weights sum to %.6g, past the fixed-point capacity (%.6g per sample)",
                          total, ESFT_MAX_SAMPLE_WEIGHT);
    return ESFT_OK;
}

/* A sample of at least 2^16 assignments could, with large weights, wrap its own
   histogram (2^16 weights of 2^16 are 2^64 in fixed point): its weights, all of
   them (masked tokens too, so this bounds the counted ones), must sum to at most
   ESFT_MAX_SAMPLE_WEIGHT. Called after the weights were checked finite. */
static esft_status esft__stats_sample_fits(const float *w, size_t n, esft_error *err)
{
    double part[4] = {0.0, 0.0, 0.0, 0.0}, total;
    size_t i = 0;
    if (!w || n < ((size_t)1 << 16)) return ESFT_OK;
    for (; i + 4 <= n; i += 4) {
        part[0] += w[i];
        part[1] += w[i + 1];
        part[2] += w[i + 2];
        part[3] += w[i + 3];
    }
    for (; i < n; i++) part[0] += w[i];
    total = (part[0] + part[1]) + (part[2] + part[3]);
    return esft__stats_sample_weight(total, err);
}

/* ---- the CPU accumulation kernel ---------------------------------------- */

/* count[ids[i]] += 1 and gate_sum[ids[i]] += fixed(weights[i]) for n assignments,
   after checking all of them; the textbook loop, for short runs and large E.
   Returns nonzero, adding nothing, if an id or weight is bad. */
static unsigned esft__hist_simple(uint64_t *count, uint64_t *gate_sum, const int32_t *ids,
                                  const float *weights, size_t n, int E)
{
    size_t i;
    if (esft__ids_bad(ids, n, E) || (weights && esft__weights_bad(weights, n))) return 1;
    if (weights)
        for (i = 0; i < n; i++) {
            count[ids[i]]++;
            gate_sum[ids[i]] += esft__to_fixed(weights[i]);
        }
    else
        for (i = 0; i < n; i++) count[ids[i]]++;
    return 0;
}

#define ESFT__HIST_BLOCK 256 /* checked and converted to fixed point a block at a time */
#define ESFT__HIST_COPIES 4  /* private histograms, assignment i goes to copy i % 4 */
#define ESFT__HIST_MAX_E 256 /* their size: 4 x 256 x 8 bytes = 8 KiB of stack */
/* A packed counter holds an expert's count above bit 48 and its weight sum below:
   with weights <= 1 (fixed point <= 2^32) and at most 2^15 assignments between
   flushes, the sum stays below 2^47 and the count below 2^16, so neither spills. */
#define ESFT__HIST_SHIFT 48
#define ESFT__HIST_FLUSH ((size_t)1 << 15)

/* One block, constant trip counts: vectorized even at -O2. */
static unsigned esft__block_bad(const int32_t *ids, const float *w, int E)
{
    int i;
    unsigned bad = 0;
    for (i = 0; i < ESFT__HIST_BLOCK; i++) bad |= (uint32_t)ids[i] >= (uint32_t)E;
    if (w)
        for (i = 0; i < ESFT__HIST_BLOCK; i++) bad |= (unsigned)!((w[i] >= 0.0f) & (w[i] <= ESFT_MAX_GATE_WEIGHT));
    return bad;
}

/* Packs a checked block: v[i] = 2^48 + fixed(w[i]). Nonzero if a weight is above 1
   (it would not fit the packed sum); the caller then adds that block unpacked. */
static unsigned esft__pack_block(uint64_t *v, const float *w)
{
    int i;
    unsigned big = 0;
    for (i = 0; i < ESFT__HIST_BLOCK; i++) {
        big |= w[i] > 1.0f;
        v[i] = esft__to_fixed(w[i]) + ((uint64_t)1 << ESFT__HIST_SHIFT);
    }
    return big;
}

/* Adds the packed copies into count and gate_sum and clears them. */
static void esft__hist_flush(uint64_t *count, uint64_t *gate_sum, uint64_t (*h)[ESFT__HIST_MAX_E], int E)
{
    const uint64_t low = ((uint64_t)1 << ESFT__HIST_SHIFT) - 1;
    int e;
    for (e = 0; e < E; e++) {
        uint64_t s = h[0][e] + h[1][e] + h[2][e] + h[3][e];
        count[e] += s >> ESFT__HIST_SHIFT;
        gate_sum[e] += s & low;
        h[0][e] = h[1][e] = h[2][e] = h[3][e] = 0;
    }
}

/* The same sums as esft__hist_simple, faster, for E <= 256:
   - one pass over memory: each block of ids and weights is checked while it is in
     L1, then added (checking the whole input first would read it twice);
   - an expert's count and weight sum share one 64-bit counter (see
     ESFT__HIST_SHIFT), so an assignment is one add to memory, not two; a block
     with a weight above 1 (never seen from a softmax router) is added unpacked;
   - consecutive tokens often pick the same experts, and an update that reads a
     counter the previous update just wrote waits for that store; four private
     copies, filled round-robin, make neighbouring updates independent;
   - weights become fixed point a block at a time with vector instructions, not
     one by one inside the scatter loop.
   The copies are summed with integer adds: the same bits as the simple loop,
   whatever the order. Returns nonzero if an id or weight is bad; then the blocks
   before it may have been added (callers discard the result). */
static unsigned esft__hist_copies(uint64_t *count, uint64_t *gate_sum, const int32_t *ids,
                                  const float *weights, size_t n, int E)
{
    uint64_t h[ESFT__HIST_COPIES][ESFT__HIST_MAX_E]; /* (copy, E) packed counters */
    uint64_t v[ESFT__HIST_BLOCK];
    size_t b, i, packed = 0;
    int c;
    for (c = 0; c < ESFT__HIST_COPIES; c++) memset(h[c], 0, (size_t)E * sizeof(uint64_t));
    if (!weights)
        for (i = 0; i < ESFT__HIST_BLOCK; i++) v[i] = (uint64_t)1 << ESFT__HIST_SHIFT;
    for (b = 0; b < n; b += ESFT__HIST_BLOCK) {
        const int32_t *id = ids + b;
        const float *w = weights ? weights + b : NULL;
        size_t m = n - b < ESFT__HIST_BLOCK ? n - b : ESFT__HIST_BLOCK;
        unsigned big = 0;
        if (m == ESFT__HIST_BLOCK) {
            if (esft__block_bad(id, w, E)) return 1;
            if (w) big = esft__pack_block(v, w);
        } else { /* the last, partial block */
            if (esft__ids_bad(id, m, E) || (w && esft__weights_bad(w, m))) return 1;
            if (w)
                for (i = 0; i < m; i++) {
                    big |= w[i] > 1.0f;
                    v[i] = esft__to_fixed(w[i]) + ((uint64_t)1 << ESFT__HIST_SHIFT);
                }
        }
        if (big) {
            for (i = 0; i < m; i++) {
                count[id[i]]++;
                gate_sum[id[i]] += esft__to_fixed(w[i]);
            }
            continue;
        }
        if (packed + m > ESFT__HIST_FLUSH) {
            esft__hist_flush(count, gate_sum, h, E);
            packed = 0;
        }
        packed += m;
        for (i = 0; i + ESFT__HIST_COPIES <= m; i += ESFT__HIST_COPIES) {
            h[0][id[i]] += v[i];
            h[1][id[i + 1]] += v[i + 1];
            h[2][id[i + 2]] += v[i + 2];
            h[3][id[i + 3]] += v[i + 3];
        }
        for (; i < m; i++) h[0][id[i]] += v[i];
    }
    esft__hist_flush(count, gate_sum, h, E);
    return 0;
}

/* The CPU stats_accumulate op: the histogram over each run of counted tokens,
   a chunk of ESFT__STATS_CHUNK tokens at a time. It checks its input itself, as
   every backend does (the wrapper never reads it): with a mask, each chunk is
   checked first, while it fits in cache (masked tokens are checked too);
   without one, the kernel checks in its single pass and, on failure, the chunk
   is searched for the culprit, named by its token in the sample. Last the
   sample's total weight (esft__stats_sample_fits). On error the histogram holds
   a partial sum: the caller discards it. */
#define ESFT__STATS_CHUNK 8192

static esft_status esft__stats_accumulate_cpu(void *context, uint64_t *count, uint64_t *gate_sum,
                                              const int32_t *ids, const float *weights,
                                              const unsigned char *mask, int T, int K, int E,
                                              esft_error *err)
{
    int c0, t, t1;
    esft_status s;
    (void)context;
    for (c0 = 0; c0 < T; c0 += ESFT__STATS_CHUNK) {
        int c1 = T - c0 < ESFT__STATS_CHUNK ? T : c0 + ESFT__STATS_CHUNK;
        if (mask && (s = esft__stats_check_routing(ids + (size_t)c0 * K, weights ? weights + (size_t)c0 * K : NULL,
                                                   c1 - c0, K, E, c0, err)) != ESFT_OK)
            return s;
        for (t = c0; t < c1; t = t1) {
            if (mask) {
                while (t < c1 && !mask[t]) t++;
                for (t1 = t; t1 < c1 && mask[t1]; t1++) {}
            } else t1 = c1;
            if (t1 > t) {
                size_t n = (size_t)(t1 - t) * (size_t)K;
                const int32_t *run_ids = ids + (size_t)t * K;
                const float *run_w = weights ? weights + (size_t)t * K : NULL;
                /* Zeroing and summing the copies costs about 8E operations: worth it from 8E up. */
                unsigned bad = E <= ESFT__HIST_MAX_E && n >= 8 * (size_t)E
                                   ? esft__hist_copies(count, gate_sum, run_ids, run_w, n, E)
                                   : esft__hist_simple(count, gate_sum, run_ids, run_w, n, E);
                if (bad) {
                    s = esft__stats_check_routing(run_ids, run_w, t1 - t, K, E, t, err);
                    return s != ESFT_OK ? s : esft__fail(err, ESFT_ERR_RANGE, "expert id outside [0, %d) or "
                                                         "weight not finite in [0, %g]", E,
                                                         (double)ESFT_MAX_GATE_WEIGHT);
                }
            }
        }
    }
    return esft__stats_sample_fits(weights, (size_t)T * (size_t)K, err);
}

/* The histogram the op fills: the host scratch for a backend whose memory is the
   host's, else 2E counters in the backend's memory (esft_stats_set_backend). */
static esft_status esft__stats_histogram(esft_stats *st, uint64_t **out, esft_error *err)
{
    size_t bytes = 2 * (size_t)st->n_experts * sizeof(uint64_t);
    esft_status s;
    memset(st->scratch, 0, bytes);
    if (!st->backend_scratch) {
        *out = st->scratch;
        return ESFT_OK;
    }
    if (st->scratch_backend != st->backend)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "stats.backend is '%s' but its histogram lives on '%s': "
                          "choose backends with esft_stats_set_backend", st->backend->name, st->scratch_backend->name);
    if (!st->backend->upload) return esft__missing_op(st->backend, "upload", err);
    s = st->backend->upload(st->backend->context, st->backend_scratch, st->scratch, bytes);
    if (s != ESFT_OK) return esft__fail(err, s, "backend '%s': cannot clear the histogram", st->backend->name);
    *out = ESFT__CAST(uint64_t *, st->backend_scratch);
    return ESFT_OK;
}

ESFTDEF esft_status esft_stats_set_backend(esft_stats *st, const esft_backend *b, esft_error *err)
{
    esft_status s;
    void *p = NULL;
    if (!st || !st->count) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "stats not initialised");
    if ((s = esft_backend_check(b, err)) != ESFT_OK) return s;
    if (b->alloc != esft__cpu_alloc) { /* another memory space: the histogram lives there */
        if (!b->alloc || !b->free || !b->download || !b->upload)
            return esft__fail(err, ESFT_ERR_UNSUPPORTED, "backend '%s' lacks memory entries", b->name);
        s = b->alloc(b->context, 2 * (size_t)st->n_experts * sizeof(uint64_t), &p);
        if (s != ESFT_OK) return esft__fail(err, s, "backend '%s': histogram of %d experts", b->name, st->n_experts);
    }
    if (st->backend_scratch) st->scratch_backend->free(st->scratch_backend->context, st->backend_scratch);
    st->backend_scratch = p;
    st->scratch_backend = p ? b : NULL;
    st->backend = b;
    return ESFT_OK;
}

ESFTDEF esft_status esft_stats_add(esft_stats *st, int layer, const int32_t *ids,
                                   const float *weights, const unsigned char *mask, int T,
                                   esft_error *err)
{
    int E, K, e;
    uint64_t n_assigned = 0, n_counted, *hist = NULL, *count, *gsum;
    double total = 0.0;
    esft_status s;
    if (!st || !st->count) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "stats not initialised");
    if (layer < 0 || layer >= st->n_layers)
        return esft__fail(err, ESFT_ERR_RANGE, "layer %d outside [0, %d)", layer, st->n_layers);
    if (T < 0 || (T > 0 && !ids)) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "T < 0 or ids NULL");
    E = st->n_experts;
    K = st->top_k;
    /* st->backend is a public field a caller may set: checked like every other door */
    if ((s = esft_backend_check(st->backend, err)) != ESFT_OK) return s;
    if (!st->backend->stats_accumulate) return esft__missing_op(st->backend, "stats_accumulate", err);
    if (T == 0) return ESFT_OK;
    /* The sample goes into a zeroed histogram; the op checks ids, weights (and its
       own capacity) and st changes only once all of it has been added. ids,
       weights and mask are the backend's memory: never read here. */
    if ((s = esft__stats_histogram(st, &hist, err)) != ESFT_OK) return s;
    s = st->backend->stats_accumulate(st->backend->context, hist, hist + E, ids, weights, mask, T, K, E, err);
    if (s != ESFT_OK) return s;
    if (hist != st->scratch) {
        s = st->backend->download(st->backend->context, st->scratch, hist, 2 * (size_t)E * sizeof(uint64_t));
        if (s != ESFT_OK) return esft__fail(err, s, "backend '%s': cannot read the histogram", st->backend->name);
    }
    count = st->scratch;
    gsum = st->scratch + E;
    /* every counted token adds K selections: the count of tokens without the mask */
    for (e = 0; e < E; e++) {
        n_assigned += count[e];
        total += (double)gsum[e];
    }
    n_counted = n_assigned / (uint64_t)K;
    if (n_counted == 0) return ESFT_OK;
    if (n_counted > (uint64_t)0x7fffffff / (uint64_t)K)
        return esft__fail(err, ESFT_ERR_RANGE, "a sample of %d tokens is too long", T);
    /* the op's check again on the sums it made (a device op cannot see the total) */
    if ((s = esft__stats_sample_weight(total / ESFT_FIXED_ONE, err)) != ESFT_OK) return s;
    {
        size_t row = (size_t)layer * E;
        if (esft__stats_row_full(st->count + row, st->gate_sum + row, st->token_frac_sum + row,
                                 st->gate_frac_sum + row, count, gsum, E) ||
            st->n_tokens[layer] + n_counted < n_counted || st->n_samples[layer] + 1 == 0)
            return esft__fail(err, ESFT_ERR_RANGE,
                              "layer %d: a sum would pass its fixed-point capacity (2^32 units of weight "
                              "per expert)", layer);
        esft__stats_fold_row(st->count + row, st->gate_sum + row, st->token_frac_sum + row,
                             st->gate_frac_sum + row, count, gsum, n_counted, K, E);
    }
    st->n_tokens[layer] += n_counted;
    st->n_samples[layer] += 1;
    return ESFT_OK;
}

/* The first i where a[i] + b[i] wraps, or n. */
static size_t esft__first_wrap(const uint64_t *a, const uint64_t *b, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (a[i] + b[i] < a[i]) return i;
    return n;
}

ESFTDEF esft_status esft_stats_merge(esft_stats *dst, const esft_stats *src, esft_error *err)
{
    size_t i, le;
    int l;
    if (!dst || !src || !dst->count || !src->count)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "stats not initialised");
    if (dst->n_layers != src->n_layers || dst->n_experts != src->n_experts || dst->top_k != src->top_k)
        return esft__fail(err, ESFT_ERR_SHAPE, "merging stats of %dx%d top-%d into %dx%d top-%d",
                          src->n_layers, src->n_experts, src->top_k, dst->n_layers, dst->n_experts,
                          dst->top_k);
    le = (size_t)dst->n_layers * (size_t)dst->n_experts;
    if ((i = esft__first_wrap(dst->count, src->count, le)) < le ||
        (i = esft__first_wrap(dst->gate_sum, src->gate_sum, le)) < le ||
        (i = esft__first_wrap(dst->token_frac_sum, src->token_frac_sum, le)) < le ||
        (i = esft__first_wrap(dst->gate_frac_sum, src->gate_frac_sum, le)) < le)
        return esft__fail(err, ESFT_ERR_RANGE, "layer %d expert %d: the merged sum would pass its capacity",
                          (int)(i / (size_t)dst->n_experts), (int)(i % (size_t)dst->n_experts));
    if ((i = esft__first_wrap(dst->n_tokens, src->n_tokens, (size_t)dst->n_layers)) < (size_t)dst->n_layers ||
        (i = esft__first_wrap(dst->n_samples, src->n_samples, (size_t)dst->n_layers)) < (size_t)dst->n_layers)
        return esft__fail(err, ESFT_ERR_RANGE, "layer %d: the merged token or sample count would wrap", (int)i);
    for (i = 0; i < le; i++) {
        dst->count[i] += src->count[i];
        dst->gate_sum[i] += src->gate_sum[i];
        dst->token_frac_sum[i] += src->token_frac_sum[i];
        dst->gate_frac_sum[i] += src->gate_frac_sum[i];
    }
    for (l = 0; l < dst->n_layers; l++) {
        dst->n_tokens[l] += src->n_tokens[l];
        dst->n_samples[l] += src->n_samples[l];
    }
    return ESFT_OK;
}

/* ===================================================================== */
/* 7. expert selection                                                   */
/* ===================================================================== */

ESFTDEF esft_status esft_scores_alloc(esft_scores *sc, int n_layers, int n_experts,
                                      const esft_allocator *allocator)
{
    size_t le;
    if (!sc) return ESFT_ERR_INVALID_ARGUMENT;
    memset(sc, 0, sizeof *sc);
    if (n_layers < 1 || n_experts < 1) return ESFT_ERR_INVALID_ARGUMENT;
    if (!esft__product_fits((size_t)n_layers, (size_t)n_experts)) return ESFT_ERR_OUT_OF_MEMORY;
    le = (size_t)n_layers * (size_t)n_experts;
    sc->n_layers = n_layers;
    sc->n_experts = n_experts;
    sc->allocator = esft__allocator_or_default(allocator);
    sc->token = ESFT__CAST(double *, esft__calloc(&sc->allocator, le, sizeof(double)));
    sc->gate = ESFT__CAST(double *, esft__calloc(&sc->allocator, le, sizeof(double)));
    sc->layer_present = ESFT__CAST(unsigned char *, esft__calloc(&sc->allocator, (size_t)n_layers, 1));
    if (!sc->token || !sc->gate || !sc->layer_present) {
        esft_scores_free(sc);
        return ESFT_ERR_OUT_OF_MEMORY;
    }
    return ESFT_OK;
}

ESFTDEF void esft_scores_free(esft_scores *sc)
{
    if (!sc || !sc->allocator.free) return;
    esft__release(&sc->allocator, sc->token);
    esft__release(&sc->allocator, sc->gate);
    esft__release(&sc->allocator, sc->layer_present);
    memset(sc, 0, sizeof *sc);
}

ESFTDEF esft_status esft_stats_scores(const esft_stats *st, esft_norm norm, esft_scores *out)
{
    int l, e, E;
    esft_status s;
    if (!st || !st->count || !out) return ESFT_ERR_INVALID_ARGUMENT;
    if (norm != ESFT_NORM_POOLED && norm != ESFT_NORM_PER_SAMPLE) return ESFT_ERR_INVALID_ARGUMENT;
    s = esft_scores_alloc(out, st->n_layers, st->n_experts, &st->allocator);
    if (s != ESFT_OK) return s;
    E = st->n_experts;
    for (l = 0; l < st->n_layers; l++) {
        size_t row = (size_t)l * E;
        out->layer_present[l] = st->n_tokens[l] > 0;
        if (!out->layer_present[l]) continue;
        for (e = 0; e < E; e++) {
            if (norm == ESFT_NORM_POOLED) {
                double n = (double)st->n_tokens[l];
                out->token[row + e] = (double)st->count[row + e] / ((double)st->top_k * n);
                out->gate[row + e] = (double)st->gate_sum[row + e] / ESFT_FIXED_ONE / n;
            } else {
                double n = (double)st->n_samples[l];
                out->token[row + e] = (double)st->token_frac_sum[row + e] / ESFT_FIXED_ONE / n;
                out->gate[row + e] = (double)st->gate_frac_sum[row + e] / ESFT_FIXED_ONE / n;
            }
        }
    }
    return ESFT_OK;
}

/* round(x, decimals) as Python does it: correctly rounded from the exact binary
   value, which is what printf's %.*f does; parsed back to the nearest double. */
static double esft__round_decimals(double x, int decimals)
{
    char buf[400]; /* %.*f of DBL_MAX has 309 digits */
    double r = x;
    esft__dtoa(buf, sizeof buf, x, decimals, 1);
    esft__strtod(buf, strlen(buf), &r);
    return r;
}

ESFTDEF esft_status esft_scores_round(esft_scores *sc, int decimals)
{
    size_t i, le;
    if (!sc || !sc->token || !sc->gate) return ESFT_ERR_INVALID_ARGUMENT;
    if (decimals < 0 || decimals > 17) return ESFT_ERR_INVALID_ARGUMENT;
    le = (size_t)sc->n_layers * (size_t)sc->n_experts;
    for (i = 0; i < le; i++) {
        sc->token[i] = esft__round_decimals(sc->token[i], decimals);
        sc->gate[i] = esft__round_decimals(sc->gate[i], decimals);
    }
    return ESFT_OK;
}

ESFTDEF void esft_expert_config_free(esft_expert_config *cfg)
{
    if (!cfg || !cfg->allocator.free) return;
    esft__release(&cfg->allocator, cfg->offset);
    esft__release(&cfg->allocator, cfg->ids);
    esft__release(&cfg->allocator, cfg->layer_present);
    memset(cfg, 0, sizeof *cfg);
}

/* Allocates a config for n_layers layers holding up to capacity ids. */
static esft_status esft__config_alloc(esft_expert_config *cfg, int n_layers, int n_experts,
                                      size_t capacity, const esft_allocator *allocator)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->n_layers = n_layers;
    cfg->n_experts = n_experts;
    cfg->allocator = esft__allocator_or_default(allocator);
    cfg->offset = ESFT__CAST(int *, esft__calloc(&cfg->allocator, (size_t)n_layers + 1, sizeof(int)));
    cfg->ids = ESFT__CAST(int32_t *, esft__calloc(&cfg->allocator, capacity, sizeof(int32_t)));
    cfg->layer_present = ESFT__CAST(unsigned char *, esft__calloc(&cfg->allocator, (size_t)n_layers, 1));
    if (!cfg->offset || !cfg->ids || !cfg->layer_present) {
        esft_expert_config_free(cfg);
        return ESFT_ERR_OUT_OF_MEMORY;
    }
    return ESFT_OK;
}

ESFTDEF int esft_expert_config_has(const esft_expert_config *cfg, int layer, int expert)
{
    int i;
    if (!cfg || layer < 0 || layer >= cfg->n_layers) return 0;
    for (i = cfg->offset[layer]; i < cfg->offset[layer + 1]; i++)
        if (cfg->ids[i] == expert) return 1;
    return 0;
}

ESFTDEF int esft_expert_config_count(const esft_expert_config *cfg)
{
    return cfg && cfg->offset ? cfg->offset[cfg->n_layers] : 0;
}

static const double *esft__score_table(const esft_scores *sc, esft_score which)
{
    return which == ESFT_SCORE_GATE ? sc->gate : sc->token;
}

/* Expert indices of one layer sorted by descending score, ties to the lower id
   (insertion sort: stable, and E is small). */
static void esft__rank_experts(int32_t *order, const double *score, int E)
{
    int i;
    for (i = 0; i < E; i++) {
        int j = i;
        while (j > 0 && score[i] > score[order[j - 1]]) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
}

static esft_status esft__select_check(const esft_scores *sc, esft_score which,
                                      esft_expert_config *out, esft_error *err)
{
    if (!sc || !sc->token || !out) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "scores or output is NULL");
    if (which != ESFT_SCORE_TOKEN && which != ESFT_SCORE_GATE)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "unknown score %d", (int)which);
    return ESFT_OK;
}

/* Per-layer selection shared by top-p and top-k: rank, then keep a prefix whose
   length `keep(ranked scores)` decides. */
typedef int (*esft__prefix_rule)(const double *score, const int32_t *order, int E, double param);

static int esft__prefix_top_p(const double *score, const int32_t *order, int E, double p)
{
    double running = 0.0;
    int n = 0;
    while (n < E && running < p) running += score[order[n++]];
    return n;
}

static int esft__prefix_top_k(const double *score, const int32_t *order, int E, double k)
{
    (void)score; (void)order;
    return (int)k < E ? (int)k : E;
}

static esft_status esft__select_per_layer(const esft_scores *sc, esft_score which,
                                          esft__prefix_rule rule, double param,
                                          esft_expert_config *out, esft_error *err)
{
    int l, E = sc->n_experts, L = sc->n_layers;
    const double *table = esft__score_table(sc, which);
    if (esft__config_alloc(out, L, E, (size_t)L * E, &sc->allocator) != ESFT_OK)
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "expert config of %d x %d", L, E);
    for (l = 0; l < L; l++) {
        int32_t *order = out->ids + out->offset[l];
        int n = 0;
        out->layer_present[l] = sc->layer_present[l];
        if (sc->layer_present[l]) {
            esft__rank_experts(order, table + (size_t)l * E, E);
            n = rule(table + (size_t)l * E, order, E, param);
        }
        out->offset[l + 1] = out->offset[l] + n;
    }
    return ESFT_OK;
}

ESFTDEF esft_status esft_select_top_p(const esft_scores *sc, esft_score which, double p,
                                      esft_expert_config *out, esft_error *err)
{
    esft_status s = esft__select_check(sc, which, out, err);
    if (s != ESFT_OK) return s;
    if (!(p > 0.0 && p <= 1.0)) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "top-p %g outside (0, 1]", p);
    return esft__select_per_layer(sc, which, esft__prefix_top_p, p, out, err);
}

ESFTDEF esft_status esft_select_top_k(const esft_scores *sc, esft_score which, int k,
                                      esft_expert_config *out, esft_error *err)
{
    esft_status s = esft__select_check(sc, which, out, err);
    if (s != ESFT_OK) return s;
    if (k < 1 || k > sc->n_experts)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "top-k %d outside [1, %d]", k, sc->n_experts);
    return esft__select_per_layer(sc, which, esft__prefix_top_k, (double)k, out, err);
}

ESFTDEF esft_status esft_select_budget(const esft_scores *sc, esft_score which, int n,
                                       esft_expert_config *out, esft_error *err)
{
    int l, e, i, E, L, present = 0;
    const double *table;
    unsigned char *chosen;
    esft_status s = esft__select_check(sc, which, out, err);
    if (s != ESFT_OK) return s;
    E = sc->n_experts;
    L = sc->n_layers;
    for (l = 0; l < L; l++) present += sc->layer_present[l] != 0;
    if (n < 1 || (size_t)n > (size_t)present * (size_t)E)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "budget %d outside [1, %d layers x %d experts]",
                          n, present, E);
    table = esft__score_table(sc, which);
    s = esft__config_alloc(out, L, E, (size_t)L * E, &sc->allocator);
    chosen = ESFT__CAST(unsigned char *, esft__calloc(&out->allocator, (size_t)L * E, 1));
    if (s != ESFT_OK || !chosen) {
        esft__release(&out->allocator, chosen);
        esft_expert_config_free(out);
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "budget selection over %d x %d", L, E);
    }
    /* n passes of an argmax keep the rule obvious; L*E is a few thousand. */
    for (i = 0; i < n; i++) {
        long best = -1;
        for (l = 0; l < L; l++) {
            if (!sc->layer_present[l]) continue;
            for (e = 0; e < E; e++) {
                long at = (long)l * E + e;
                if (!chosen[at] && (best < 0 || table[at] > table[best])) best = at;
            }
        }
        chosen[best] = 1;
    }
    for (l = 0; l < L; l++) {
        int32_t *order = out->ids + out->offset[l];
        int kept = 0;
        out->layer_present[l] = sc->layer_present[l];
        if (sc->layer_present[l]) {
            int32_t *ranked = order; /* rank in place, then compact the chosen ones */
            esft__rank_experts(ranked, table + (size_t)l * E, E);
            for (e = 0; e < E; e++)
                if (chosen[(size_t)l * E + ranked[e]]) order[kept++] = ranked[e];
        }
        out->offset[l + 1] = out->offset[l] + kept;
    }
    esft__release(&out->allocator, chosen);
    return ESFT_OK;
}

/* ===================================================================== */
/* 8. ESFT file formats                                                  */
/* ===================================================================== */

/* A growable byte buffer: outputs are built in memory and written in one go. */
typedef struct esft__buf {
    char *data;
    size_t size, cap;
    int failed; /* an allocation failed; the content is incomplete */
    esft_allocator allocator;
} esft__buf;

static void esft__buf_init(esft__buf *b, const esft_allocator *a)
{
    memset(b, 0, sizeof *b);
    b->allocator = esft__allocator_or_default(a);
}

static void esft__buf_free(esft__buf *b) { esft__release(&b->allocator, b->data); b->data = NULL; }

static int esft__buf_reserve(esft__buf *b, size_t extra)
{
    char *grown;
    size_t cap;
    if (b->failed) return 0;
    if (b->size + extra + 1 <= b->cap) return 1;
    cap = b->cap ? b->cap : 4096;
    while (cap < b->size + extra + 1) cap *= 2;
    grown = ESFT__CAST(char *, b->allocator.alloc(b->allocator.user, cap));
    if (!grown) { b->failed = 1; return 0; }
    if (b->size) memcpy(grown, b->data, b->size);
    esft__release(&b->allocator, b->data);
    b->data = grown;
    b->cap = cap;
    return 1;
}

static void esft__buf_append(esft__buf *b, const char *s, size_t n)
{
    if (!esft__buf_reserve(b, n)) return;
    memcpy(b->data + b->size, s, n);
    b->size += n;
    b->data[b->size] = 0;
}

static void esft__buf_puts(esft__buf *b, const char *s) { esft__buf_append(b, s, strlen(s)); }

static void esft__buf_printf(esft__buf *b, const char *fmt, ...)
{
    char small[128];
    va_list ap;
    int n;
    va_start(ap, fmt);
    n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) { b->failed = 1; return; }
    if ((size_t)n < sizeof small) { esft__buf_append(b, small, (size_t)n); return; }
    if (!esft__buf_reserve(b, (size_t)n)) return;
    va_start(ap, fmt);
    vsnprintf(b->data + b->size, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->size += (size_t)n;
}

/* Writes bytes to a fresh temp file, flushes them to disk, then renames it over
   path: a crash or error never leaves a half-written file under the real name,
   and a failure removes the temp file. Defined with the other file helpers in
   the checkpoints section, on the same streamed writer (esft__out). */
static esft_status esft__write_file_atomic(const char *path, const char *data, size_t size,
                                           esft_error *err);

static esft_status esft__write_buf_atomic(const char *path, esft__buf *b, esft_error *err)
{
    esft_status s;
    if (b->failed) s = esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, 0, "output of %lu bytes",
                                     (unsigned long)b->size);
    else s = esft__write_file_atomic(path, b->data ? b->data : "", b->size, err);
    esft__buf_free(b);
    return s;
}

/* Reads a whole regular file of at most max_bytes into memory, NUL-terminated
   (JSON files, checkpoint indexes; logs are streamed). Defined with the other
   file helpers in the checkpoints section. Pair: a->free. */
#define ESFT__MAX_TEXT_FILE ((uint64_t)256 << 20) /* summary.json of a 1000-layer model is ~10 MB */
static esft_status esft__read_file(const char *path, uint64_t max_bytes, const esft_allocator *a, char **out,
                                   size_t *size, esft_error *err);
/* File descriptors, defined with the other file helpers in the checkpoints
   section: a non-blocking open for reading, the size of a regular file (0 for
   anything else), a read of up to n bytes (-1 on error) and close. */
static int esft__fd_open_read(const char *path);
static int esft__fd_size(int fd, uint64_t *size);
static long esft__fd_read_some(int fd, void *dst, size_t n);
static void esft__fd_close(int fd);

/* Sets where a failure happened, keeping the message. */
static esft_status esft__locate(esft_error *err, esft_status s, const char *file, long line)
{
    if (err && s != ESFT_OK) {
        snprintf(err->file, sizeof err->file, "%s", file ? file : "");
        err->line = line;
    }
    return s;
}

/* ---- routing logs ---------------------------------------------------- */

/* A log's ids and weights are parsed into host memory: the private accumulator
   that takes them runs on the caller's backend when its memory is the host's,
   and on the CPU backend when it has memory of its own (a GPU); the result is
   merged into the caller's accumulator, whose totals live on the host. An
   invalid backend is kept, for esft_stats_add to refuse. */
static const esft_backend *esft__stats_host_backend(const esft_backend *b)
{
    if (b && b->api_version == ESFT_BACKEND_API_VERSION && b->alloc && b->alloc != esft__cpu_alloc)
        return esft_backend_cpu();
    return b;
}

static const double esft__pow10[] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10,
                                     1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
                                     1e21, 1e22};

/* Parses a number as Python's float() would at p (up to end); returns the end
   of the number, or NULL when there is none. Fast path: up to 15 significant
   digits without exponent is mantissa / 10^digits, correctly rounded. */
static const char *esft__scan_number(const char *p, const char *end, double *out)
{
    const char *start = p;
    uint64_t mant = 0;
    int digits = 0, frac = 0, neg = 0, simple = 1;
    size_t n;
    if (p < end && (*p == '-' || *p == '+')) { neg = *p == '-'; p++; }
    while (p < end && *p >= '0' && *p <= '9') { mant = mant * 10 + (uint64_t)(*p - '0'); digits++; p++; }
    if (p < end && *p == '.') {
        p++;
        while (p < end && *p >= '0' && *p <= '9') {
            mant = mant * 10 + (uint64_t)(*p - '0');
            digits++; frac++; p++;
        }
    }
    if (digits == 0) { /* nan, inf, infinity */
        simple = 0;
        while (p < end && ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z'))) p++;
        if (p == start + neg || p - start > 10) return NULL;
    } else if (p < end && (*p == 'e' || *p == 'E')) {
        simple = 0;
        p++;
        if (p < end && (*p == '-' || *p == '+')) p++;
        if (!(p < end && *p >= '0' && *p <= '9')) return NULL;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    if (simple && digits <= 15) {
        *out = (double)mant / esft__pow10[frac];
        if (neg) *out = -*out;
        return p;
    }
    n = (size_t)(p - start);
    if (n >= 64 || !esft__strtod(start, n, out)) return NULL;
    return p;
}

/* Scratch arrays for one line of a log. */
typedef struct esft__log_line {
    int32_t *ids;
    float *weights;
    size_t n_ids, n_weights, cap;
    esft_allocator allocator;
} esft__log_line;

static int esft__log_line_grow(esft__log_line *ln)
{
    size_t cap = ln->cap ? ln->cap * 2 : 4096;
    int32_t *ids = ESFT__CAST(int32_t *, esft__calloc(&ln->allocator, cap, sizeof(int32_t)));
    float *w = ESFT__CAST(float *, esft__calloc(&ln->allocator, cap, sizeof(float)));
    if (!ids || !w) {
        esft__release(&ln->allocator, ids);
        esft__release(&ln->allocator, w);
        return 0;
    }
    if (ln->n_ids) memcpy(ids, ln->ids, ln->n_ids * sizeof *ids);
    if (ln->n_weights) memcpy(w, ln->weights, ln->n_weights * sizeof *w);
    esft__release(&ln->allocator, ln->ids);
    esft__release(&ln->allocator, ln->weights);
    ln->ids = ids;
    ln->weights = w;
    ln->cap = cap;
    return 1;
}

/* Splits "ids \t\t weights" into ln. Integers for ids (a '-' is kept so the
   range check names it), Python floats for weights. */
static esft_status esft__parse_log_line(esft__log_line *ln, const char *p, const char *end,
                                        esft_error *err)
{
    int in_weights = 0;
    ln->n_ids = ln->n_weights = 0;
    if (p == end) return esft__fail(err, ESFT_ERR_PARSE, "empty line");
    while (p < end) {
        if ((in_weights ? ln->n_weights : ln->n_ids) == ln->cap && !esft__log_line_grow(ln))
            return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "a line of %lu values",
                              (unsigned long)ln->cap);
        if (!in_weights) {
            const char *q = p;
            int neg = 0;
            int64_t v = 0;
            if (q < end && *q == '-') { neg = 1; q++; }
            while (q < end && *q >= '0' && *q <= '9' && v < 100000000) v = v * 10 + (*q++ - '0');
            if (q == p + neg || (q < end && *q != '\t'))
                return esft__fail(err, ESFT_ERR_PARSE, "expert id %lu is not an integer",
                                  (unsigned long)ln->n_ids + 1);
            ln->ids[ln->n_ids++] = (int32_t)(neg ? -v : v);
            p = q;
            if (p == end) return esft__fail(err, ESFT_ERR_PARSE, "no tab-tab separator between ids and weights");
            p++;
            if (p < end && *p == '\t') { in_weights = 1; p++; }
        } else {
            double w;
            const char *q = esft__scan_number(p, end, &w);
            if (!q || (q < end && *q != '\t'))
                return esft__fail(err, ESFT_ERR_PARSE, "weight %lu is not a number",
                                  (unsigned long)ln->n_weights + 1);
            ln->weights[ln->n_weights++] = (float)w;
            p = q;
            if (p < end && ++p == end)
                return esft__fail(err, ESFT_ERR_PARSE, "trailing tab after the last weight");
        }
    }
    if (!in_weights) return esft__fail(err, ESFT_ERR_PARSE, "no tab-tab separator between ids and weights");
    return ESFT_OK;
}

/* ---- the fast path of the log parser ---------------------------------- */

#if (defined(__SSE2__) || defined(_M_X64) || defined(_M_AMD64)) && !defined(ESFT_NO_SIMD)
#define ESFT__SSE2 1
#endif

/* Up to 8 bytes at p, little-endian order whatever the machine (compilers turn
   this into one load); bytes past end read as 0, which no field accepts. */
static uint64_t esft__load8(const char *p, const char *end)
{
    const unsigned char *u = (const unsigned char *)p;
    size_t n = (size_t)(end - p), i;
    uint64_t x = 0;
    if (n >= 8)
        return (uint64_t)u[0] | (uint64_t)u[1] << 8 | (uint64_t)u[2] << 16 | (uint64_t)u[3] << 24 |
               (uint64_t)u[4] << 32 | (uint64_t)u[5] << 40 | (uint64_t)u[6] << 48 | (uint64_t)u[7] << 56;
    for (i = 0; i < n; i++) x |= (uint64_t)u[i] << (8 * i);
    return x;
}

/* Bit 7 of each byte of the result is set where that byte of x is not an ASCII
   digit; no carries cross bytes. */
static uint64_t esft__nondigits8(uint64_t x)
{
    uint64_t y = x ^ 0x3030303030303030u; /* digits become 0..9 */
    return (((y & 0x7f7f7f7f7f7f7f7fu) + 0x7676767676767676u) | y) & 0x8080808080808080u;
}

/* Bit 7 of each byte of the result is set where that byte of x is zero (exact). */
static uint64_t esft__zero_bytes8(uint64_t x)
{
    return ~(((x & 0x7f7f7f7f7f7f7f7fu) + 0x7f7f7f7f7f7f7f7fu) | x) & 0x8080808080808080u;
}

/* Bit-7 flags of the low n bytes (0 <= n <= 8). */
static uint64_t esft__low_flags(size_t n)
{
    return n >= 8 ? 0x8080808080808080u : 0x8080808080808080u & (((uint64_t)1 << (8 * n)) - 1);
}

/* Index of the lowest set bit of m (m != 0). */
static int esft__ctz64(uint64_t m)
{
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctzll(m);
#else
    int i = 0;
    while (!(m & 1)) { m >>= 1; i++; }
    return i;
#endif
}

/* The value of the n (1..8) ASCII digits in the low bytes of x, first digit in
   the lowest byte: the digits are moved to the top (leading zeros below), then
   pairs, quads and octets are combined with three multiplications. */
static uint32_t esft__digits8(uint64_t x, size_t n)
{
    uint64_t v = ((x ^ 0x3030303030303030u) & 0x0f0f0f0f0f0f0f0fu) << (8 * (8 - n));
    v = (v * 2561) >> 8;                                     /* 10 * 256 + 1 */
    v = ((v & 0x00ff00ff00ff00ffu) * 6553601) >> 16;         /* 100 * 65536 + 1 */
    return (uint32_t)(((v & 0x0000ffff0000ffffu) * 42949672960001u) >> 32); /* 10000 * 2^32 + 1 */
}

/* Bit i is set where byte i of [p, p + 64) is a tab or a newline; bytes at or
   past end never are. Fields are then found by walking the set bits, so where
   one field starts does not wait for the previous one to be parsed. */
static uint64_t esft__separators64(const char *p, const char *end)
{
    size_t avail = (size_t)(end - p), i;
    uint64_t mask = 0;
#ifdef ESFT__SSE2
    if (avail >= 64) {
        const __m128i tab = _mm_set1_epi8('\t'), nl = _mm_set1_epi8('\n');
        for (i = 0; i < 4; i++) {
            __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(p + 16 * i));
            int m = _mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, tab), _mm_cmpeq_epi8(v, nl)));
            mask |= (uint64_t)(unsigned)m << (16 * i);
        }
        return mask;
    }
#endif
    for (i = 0; i < 8 && 8 * i < avail; i++) {
        uint64_t x = esft__load8(p + 8 * i, end);
        uint64_t m = esft__zero_bytes8(x ^ 0x0909090909090909u) | esft__zero_bytes8(x ^ 0x0a0a0a0a0a0a0a0au);
        mask |= (((m >> 7) * 0x0102040810204080u) >> 56) << (8 * i); /* gathers the 8 flags */
    }
    return mask;
}

/* An expert id of n bytes at p: 1..7 digits; -1 for anything else. */
static int32_t esft__field_id(const char *p, size_t n, const char *end)
{
    uint64_t x;
    if (n < 1 || n > 7) return -1;
    x = esft__load8(p, end);
    if (esft__nondigits8(x) & esft__low_flags(n)) return -1;
    if (n <= 2) { /* most ids: one or two digits, no multiplications */
        int32_t d0 = (int32_t)(x & 0x0f), d1 = (int32_t)((x >> 8) & 0x0f);
        return n == 1 ? d0 : d0 * 10 + d1;
    }
    return (int32_t)esft__digits8(x, n);
}

/* 10^-k rounded to double, k = 0..6. */
static const double esft__inv_pow10[] = {1e0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6};

/* A weight of n bytes at p; 1 when it is a number (*w set), else 0. The common
   form, at most 7 bytes of digits with at most one '.', is decoded from one 8-byte
   load; anything else goes to esft__scan_number. The value is the one
   esft__scan_number gives, (float)(mantissa / 10^fraction digits), computed with
   a multiplication by 10^-k instead of a division (whose latency cost a third of
   the parse time): for every mantissa < 10^7 and k <= 6 the two round to the same
   float; tests/test_log_fastpath.c checks all of them. */
static int esft__field_weight(const char *p, size_t n, const char *end, float *w)
{
    double d;
    if (n >= 3 && n <= 7 && p[0] == '0' && p[1] == '.') { /* "0.ddddd", a probability */
        uint64_t x = esft__load8(p, end) >> 16;
        if (!(esft__nondigits8(x) & esft__low_flags(n - 2))) {
            *w = (float)((double)esft__digits8(x, n - 2) * esft__inv_pow10[n - 2]);
            return 1;
        }
    }
    if (n >= 1 && n <= 7) {
        uint64_t x = esft__load8(p, end), low = esft__low_flags(n);
        uint64_t dots = esft__zero_bytes8(x ^ 0x2e2e2e2e2e2e2e2eu) & low;
        if (!dots && !(esft__nondigits8(x) & low)) {
            *w = (float)esft__digits8(x, n);
            return 1;
        }
        if (dots && !(dots & (dots - 1)) && n >= 2) { /* one '.': drop it */
            int a = esft__ctz64(dots) >> 3;
            uint64_t below = ((uint64_t)1 << (8 * a)) - 1;
            x = (x & below) | ((x >> 8) & ~below);
            if (!(esft__nondigits8(x) & esft__low_flags(n - 1))) {
                *w = (float)((double)esft__digits8(x, n - 1) * esft__inv_pow10[n - 1 - (size_t)a]);
                return 1;
            }
        }
    }
    if (esft__scan_number(p, p + n, &d) != p + n) return 0;
    *w = (float)d;
    return 1;
}

/* Parses the line at p in one pass, finding its end as it goes, into ln; *next
   is where the next line starts. Returns 0 (ln then holds garbage) for anything
   it does not handle: an empty, malformed or incomplete line (no '\n' yet and not
   at_eof), ids with a sign or more than 7 digits. Then the exact parser reads
   that line again and says what is wrong with it, so messages do not depend on
   which path ran. For every line it accepts, ids and weights are the values the
   exact parser gives. */
static int esft__parse_log_line_fast(esft__log_line *ln, const char *p, const char *end, int at_eof,
                                     const char **next)
{
    const char *block = p, *field = p;
    uint64_t seps = esft__separators64(block, end);
    int in_weights = 0;
    ln->n_ids = ln->n_weights = 0;
    for (;;) {
        const char *s; /* the separator after the field, or end */
        while (!seps && (size_t)(end - block) > 64) {
            block += 64;
            seps = esft__separators64(block, end);
        }
        if (seps) {
            s = block + esft__ctz64(seps);
            seps &= seps - 1;
        } else s = end;
        if (!in_weights) { /* ids: digits, then a tab; an empty field (a second tab) starts the weights */
            int32_t id;
            if (s == end || *s != '\t') return 0;
            if (s == field) {
                if (ln->n_ids == 0) return 0;
                in_weights = 1;
            } else {
                if ((id = esft__field_id(field, (size_t)(s - field), end)) < 0) return 0;
                if (ln->n_ids == ln->cap && !esft__log_line_grow(ln)) return 0;
                ln->ids[ln->n_ids++] = id;
            }
        } else { /* weights: numbers separated by tabs, up to the end of the line */
            const char *field_end = s;
            int last = s == end || *s == '\n';
            float w;
            if (s == end && !at_eof) return 0;
            if (last && field_end > field && field_end[-1] == '\r') field_end--;
            if (field_end == field || !esft__field_weight(field, (size_t)(field_end - field), end, &w))
                return 0;
            if (ln->n_weights == ln->cap && !esft__log_line_grow(ln)) return 0;
            ln->weights[ln->n_weights++] = w;
            if (last) {
                *next = s == end ? end : s + 1;
                return 1;
            }
        }
        field = s + 1;
    }
}

/* The first token of n ids, read K at a time, that names an expert twice (*id
   gets the expert), or -1. A router's top-K are K distinct experts, so a repeat
   means K is wrong: K larger than the log's joins the ids of two tokens. */
static long esft__log_first_repeat(const int32_t *ids, size_t n, int K, int32_t *id)
{
    size_t t, n_tok = n / (size_t)K;
    int i, j;
    for (t = 0; t < n_tok; t++) {
        const int32_t *tok = ids + t * (size_t)K;
        unsigned rep = 0;
        for (i = 1; i < K; i++)
            for (j = 0; j < i; j++) rep |= tok[i] == tok[j];
        if (!rep) continue;
        for (i = 1; i < K; i++)
            for (j = 0; j < i; j++)
                if (tok[i] == tok[j]) { *id = tok[i]; return (long)t; }
    }
    return -1;
}

/* The top-k a line of n ids looks like: the largest k <= k_max that divides n
   with no token naming an expert twice (1 when nothing larger fits). */
static int esft__log_guess_k(const int32_t *ids, size_t n, int k_max)
{
    int32_t id;
    int k;
    for (k = k_max; k > 1; k--)
        if ((size_t)k <= n && n % (size_t)k == 0 && esft__log_first_repeat(ids, n, k, &id) < 0) return k;
    return 1;
}

/* The largest id of the line (-1 for none). */
static int32_t esft__log_max_id(const int32_t *ids, size_t n)
{
    int32_t m = -1;
    size_t i;
    for (i = 0; i < n; i++) m = ids[i] > m ? ids[i] : m;
    return m;
}

/* The checks after parsing, then the line is one sample of `layer` in st.
   line is its 1-based number. A wrong top-k or expert count in the caller's
   accumulator shows as a repeat, a count that does not divide or an id out of
   range: the messages say which K or E the line looks like. */
static esft_status esft__add_parsed_line(esft_stats *st, int layer, long line, const esft__log_line *ln,
                                         esft_error *err)
{
    int K = st->top_k, E = st->n_experts;
    int32_t id;
    long t;
    esft_status s;
    if (ln->n_ids != ln->n_weights)
        return esft__fail(err, ESFT_ERR_SHAPE, "%lu expert ids but %lu weights",
                          (unsigned long)ln->n_ids, (unsigned long)ln->n_weights);
    if (ln->n_ids % (size_t)K)
        return esft__fail(err, ESFT_ERR_SHAPE, "%lu expert ids is not a multiple of top-k %d: the line looks like top-k %d",
                          (unsigned long)ln->n_ids, K, esft__log_guess_k(ln->ids, ln->n_ids, 2 * K > 16 ? 2 * K : 16));
    if (ln->n_ids / (size_t)K > 0x7fffffff)
        return esft__fail(err, ESFT_ERR_RANGE, "too many tokens on one line");
    if (K > 1 && (t = esft__log_first_repeat(ln->ids, ln->n_ids, K, &id)) >= 0)
        return esft__fail(err, ESFT_ERR_SHAPE,
                          "token %ld of sample %ld at layer %d selects expert %ld twice: the log looks like top-k %d, not %d",
                          t, line - 1, layer, (long)id, esft__log_guess_k(ln->ids, ln->n_ids, K - 1), K);
    s = esft_stats_add(st, layer, ln->ids, ln->weights, NULL, (int)(ln->n_ids / (size_t)K), err);
    if (s == ESFT_ERR_RANGE && (id = esft__log_max_id(ln->ids, ln->n_ids)) >= E && err) {
        char why[sizeof err->message];
        memcpy(why, err->message, sizeof why);
        esft__fail(err, s, "%s: the log has ids up to %ld, so at least %ld experts, not %d", why, (long)id,
                   (long)id + 1, E);
    }
    return s;
}

/* A log reader: bytes arrive in pieces, complete lines go to the accumulator. */
typedef struct esft__log_reader {
    esft_stats *st;          /* private accumulator, merged into the caller's at the end */
    int layer;
    long line;               /* lines consumed so far */
    esft__log_line scratch;
    const char *name;
} esft__log_reader;

/* Consumes the complete lines of [data, data+size); returns bytes consumed.
   With at_eof, a final line without '\n' is consumed too. Each line goes through
   the one-pass fast parser; a line it declines is cut at its '\n' and read by the
   exact parser, which also names what is wrong. */
static esft_status esft__log_consume(esft__log_reader *r, const char *data, size_t size,
                                     int at_eof, size_t *consumed, esft_error *err)
{
    const char *p = data, *end = data + size;
    *consumed = 0;
    while (p < end) {
        const char *next;
        esft_status s;
        if (!esft__parse_log_line_fast(&r->scratch, p, end, at_eof, &next)) {
            const char *nl = ESFT__CAST(const char *, memchr(p, '\n', (size_t)(end - p)));
            const char *line_end;
            if (!nl && !at_eof) break;
            line_end = nl ? nl : end;
            if (line_end > p && line_end[-1] == '\r') line_end--;
            next = nl ? nl + 1 : end;
            s = esft__parse_log_line(&r->scratch, p, line_end, err);
            if (s != ESFT_OK) return esft__locate(err, s, r->name, r->line + 1);
        }
        r->line++;
        s = esft__add_parsed_line(r->st, r->layer, r->line, &r->scratch, err);
        if (s != ESFT_OK) return esft__locate(err, s, r->name, r->line);
        p = next;
    }
    *consumed = (size_t)(p - data);
    return ESFT_OK;
}

static esft_status esft__log_reader_begin(esft__log_reader *r, esft_stats *priv, const esft_stats *like,
                                          int layer, const char *name, esft_error *err)
{
    memset(r, 0, sizeof *r);
    if (!like || !like->count) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "stats not initialised");
    if (layer < 0 || layer >= like->n_layers)
        return esft__fail_at(err, ESFT_ERR_RANGE, name, 0, "layer %d outside [0, %d)", layer, like->n_layers);
    if (esft_stats_init(priv, like->n_layers, like->n_experts, like->top_k, &like->allocator) != ESFT_OK)
        return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, name, 0, "accumulator");
    priv->backend = esft__stats_host_backend(like->backend);
    r->st = priv;
    r->layer = layer;
    r->name = name;
    r->scratch.allocator = like->allocator;
    return ESFT_OK;
}

/* Merges the private accumulator into st when everything went well. */
static esft_status esft__log_reader_end(esft__log_reader *r, esft_stats *st, esft_status s,
                                        esft_error *err)
{
    if (s == ESFT_OK && r->line == 0) s = esft__fail_at(err, ESFT_ERR_PARSE, r->name, 0, "empty file: no samples");
    if (s == ESFT_OK) s = esft_stats_merge(st, r->st, err);
    esft__release(&r->scratch.allocator, r->scratch.ids);
    esft__release(&r->scratch.allocator, r->scratch.weights);
    esft_stats_uninit(r->st);
    return s;
}

ESFTDEF esft_status esft_stats_read_log_memory(esft_stats *st, int layer, const char *data,
                                               size_t size, const char *name, esft_error *err)
{
    esft_stats priv;
    esft__log_reader r;
    size_t used;
    esft_status s;
    esft__error_clear(err);
    if (!data && size) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "data is NULL");
    s = esft__log_reader_begin(&r, &priv, st, layer, name ? name : "<memory>", err);
    if (s != ESFT_OK) return s;
    s = esft__log_consume(&r, data ? data : "", size, 1, &used, err);
    return esft__log_reader_end(&r, st, s, err);
}

#define ESFT__LOG_CHUNK (1u << 20)

/* Reads the next chunk of fd after the kept partial line. Why `scanned`: the
   partial line's first `scanned` bytes are known to hold no '\n', so only the new
   bytes are searched, and the parser runs again only once a line is complete;
   searching the whole partial line after every chunk made one long line
   quadratic. The buffer starts with the partial line, so the first '\n' found
   tells its length, checked against the limit before the parser sees it. */
static esft_status esft__log_fill(esft__buf *buf, int fd, size_t *scanned, int *complete, int *eof,
                                  const char *path, long line, esft_error *err)
{
    const char *nl;
    long got;
    *complete = *eof = 0;
    if (!esft__buf_reserve(buf, ESFT__LOG_CHUNK))
        return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, line, "line buffer");
    got = esft__fd_read_some(fd, buf->data + buf->size, ESFT__LOG_CHUNK);
    if (got < 0) return esft__fail_at(err, ESFT_ERR_IO, path, line, "read failed: %s", strerror(errno));
    buf->size += (size_t)got;
    *eof = got == 0;
    nl = ESFT__CAST(const char *, memchr(buf->data + *scanned, '\n', buf->size - *scanned));
    *scanned = buf->size;
    if ((nl ? (size_t)(nl - buf->data) : buf->size) > ESFT_LOG_MAX_LINE)
        return esft__fail_at(err, ESFT_ERR_RANGE, path, line, "line longer than the limit of %lu bytes (ESFT_LOG_MAX_LINE)",
                             (unsigned long)ESFT_LOG_MAX_LINE);
    *complete = *eof || nl;
    return ESFT_OK;
}

ESFTDEF esft_status esft_stats_read_log(esft_stats *st, int layer, const char *path, esft_error *err)
{
    esft_stats priv;
    esft__log_reader r;
    esft__buf buf;
    int fd, complete, eof = 0;
    uint64_t file_size;
    size_t scanned = 0, used;
    esft_status s;
    esft__error_clear(err);
    if (!path) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path is NULL");
    s = esft__log_reader_begin(&r, &priv, st, layer, path, err);
    if (s != ESFT_OK) return s;
    fd = esft__fd_open_read(path);
    if (fd < 0) {
        s = esft__fail_at(err, ESFT_ERR_IO, path, 0, "cannot open: %s", strerror(errno));
        return esft__log_reader_end(&r, st, s, err);
    }
    if (!esft__fd_size(fd, &file_size)) { /* a FIFO or /dev/zero would never end */
        esft__fd_close(fd);
        s = esft__fail_at(err, ESFT_ERR_IO, path, 0, "not a regular file");
        return esft__log_reader_end(&r, st, s, err);
    }
    esft__buf_init(&buf, &st->allocator);
    while (s == ESFT_OK && !eof) {
        s = esft__log_fill(&buf, fd, &scanned, &complete, &eof, path, r.line + 1, err);
        if (s != ESFT_OK || !complete) continue;
        s = esft__log_consume(&r, buf.data, buf.size, eof, &used, err);
        memmove(buf.data, buf.data + used, buf.size - used); /* keep the partial line */
        buf.size -= used;
        scanned = buf.size; /* consume stops only at a line without '\n' */
    }
    esft__fd_close(fd);
    esft__buf_free(&buf);
    return esft__log_reader_end(&r, st, s, err);
}

/* Layers past the accumulator's probed for a log file (a wrong n_layers). */
#define ESFT__LOG_PROBE_BEYOND 1024

/* Writes dir/expert_weights_<layer>.txt to path; 1 if something is there. Why
   stat, not a trial open: opening a FIFO waits for a writer. What is there is
   then read by esft_stats_read_log, which refuses anything but a regular file. */
static int esft__log_file_exists(char *path, size_t cap, const char *dir, int layer)
{
    struct stat sb;
    snprintf(path, cap, "%s/expert_weights_%d.txt", dir, layer);
    return stat(path, &sb) == 0;
}

ESFTDEF esft_status esft_stats_read_log_dir(esft_stats *st, const char *dir, int *n_files,
                                            esft_error *err)
{
    char path[4096];
    int layer, found = 0;
    esft_stats all; /* everything of the directory, merged into st only on success */
    esft_status s = ESFT_OK;
    esft__error_clear(err);
    if (n_files) *n_files = 0;
    if (!st || !st->count || !dir) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "stats or dir is NULL");
    /* A log of a layer the accumulator lacks means n_layers is wrong: refuse it
       before reading anything, even when the layers in between have no file. */
    for (layer = st->n_layers; layer < st->n_layers + ESFT__LOG_PROBE_BEYOND; layer++)
        if (esft__log_file_exists(path, sizeof path, dir, layer))
            return esft__fail_at(err, ESFT_ERR_RANGE, path, 0, "layer %d is beyond the %d layers of the accumulator",
                                 layer, st->n_layers);
    if (esft_stats_init(&all, st->n_layers, st->n_experts, st->top_k, &st->allocator) != ESFT_OK)
        return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, dir, 0, "accumulator");
    all.backend = esft__stats_host_backend(st->backend);
    for (layer = 0; layer < st->n_layers && s == ESFT_OK; layer++)
        if (esft__log_file_exists(path, sizeof path, dir, layer) &&
            (s = esft_stats_read_log(&all, layer, path, err)) == ESFT_OK)
            found++;
    if (s == ESFT_OK && !found)
        s = esft__fail_at(err, ESFT_ERR_IO, dir, 0, "no expert_weights_<L>.txt files for layers 0..%d",
                          st->n_layers - 1);
    if (s == ESFT_OK) s = esft_stats_merge(st, &all, err);
    esft_stats_uninit(&all);
    if (s == ESFT_OK && n_files) *n_files = found;
    return s;
}

/* ---- summary.json and expert configs --------------------------------- */

/* Formats a score as Python's json.dump writes round(x, decimals) (decimals >= 0)
   or x (-1): repr(), the shortest text that reads back to the same double, so
   round(1e-5, 6) is "1e-05" as in Python. (Python also switches to an exponent
   from 1e16 up; %g does so only past 17 digits. Scores never get there.) */
static void esft__format_score(char *out, size_t cap, double x, int decimals)
{
    int prec;
    if (decimals >= 0) x = esft__round_decimals(x, decimals);
    for (prec = 1; prec <= 17; prec++) {
        double back;
        esft__dtoa(out, cap, x, prec, 0);
        if (esft__strtod(out, strlen(out), &back) && back == x) break;
    }
    if (!strpbrk(out, ".eEn")) strncat(out, ".0", cap - strlen(out) - 1);
}

/* Appends the present layers of v's decimal subtree (v, then v*10 .. v*10+9 and
   theirs) to order: the digit trie in preorder is the string order of the keys. */
static void esft__key_order_from(int *order, int *n, const unsigned char *present, int L, int64_t v)
{
    int d;
    if (present[v]) order[(*n)++] = (int)v;
    for (d = 0; d < 10 && v * 10 + d < L; d++) esft__key_order_from(order, n, present, L, v * 10 + d);
}

/* Present layers ordered as Python sorts their decimal keys as strings ("1" <
   "10" < "2"), which is the order ESFT's files list them in. Linear in L (an
   insertion sort of the key strings took 20 s for 100k layers); recursion depth
   <= 10, the digits of an int. "0" has no subtree (no leading zeros). */
static int esft__layers_in_key_order(int *order, const unsigned char *present, int L)
{
    int n = 0, r;
    if (L > 0 && present[0]) order[n++] = 0;
    for (r = 1; r <= 9 && r < L; r++) esft__key_order_from(order, &n, present, L, r);
    return n;
}

static void esft__write_score_table(esft__buf *b, const esft_scores *sc, const double *table,
                                    const int *order, int n_order, int decimals)
{
    int i, e;
    esft__buf_puts(b, "{");
    for (i = 0; i < n_order; i++) {
        const double *row = table + (size_t)order[i] * sc->n_experts;
        esft__buf_printf(b, "%s\"%d\": {", i ? ", " : "", order[i]);
        for (e = 0; e < sc->n_experts; e++) {
            char num[64];
            esft__format_score(num, sizeof num, row[e], decimals);
            esft__buf_printf(b, "%s\"%d\": %s", e ? ", " : "", e, num);
        }
        esft__buf_puts(b, "}");
    }
    esft__buf_puts(b, "}");
}

ESFTDEF esft_status esft_scores_write_json(const char *path, const esft_scores *sc, int decimals,
                                           esft_error *err)
{
    esft__buf b;
    int *order, n_order;
    esft__error_clear(err);
    if (!path || !sc || !sc->token || decimals < -1 || decimals > 17)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path, scores or decimals (%d) invalid", decimals);
    { /* JSON has no NaN or Infinity: refuse before anything is written */
        size_t i, le = (size_t)sc->n_layers * (size_t)sc->n_experts;
        for (i = 0; i < le; i++)
            if (sc->layer_present[i / (size_t)sc->n_experts] && (!isfinite(sc->token[i]) || !isfinite(sc->gate[i])))
                return esft__fail_at(err, ESFT_ERR_NUMERIC, path, 0, "score of layer %d, expert %d is not finite",
                                     (int)(i / (size_t)sc->n_experts), (int)(i % (size_t)sc->n_experts));
    }
    esft__buf_init(&b, &sc->allocator);
    order = ESFT__CAST(int *, esft__calloc(&b.allocator, (size_t)sc->n_layers, sizeof(int)));
    if (!order) return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, 0, "layer order");
    n_order = esft__layers_in_key_order(order, sc->layer_present, sc->n_layers);
    esft__buf_puts(&b, "{\"token_scores\": ");
    esft__write_score_table(&b, sc, sc->token, order, n_order, decimals);
    esft__buf_puts(&b, ", \"gate_scores\": ");
    esft__write_score_table(&b, sc, sc->gate, order, n_order, decimals);
    esft__buf_puts(&b, "}");
    esft__release(&b.allocator, order);
    return esft__write_buf_atomic(path, &b, err);
}

/* The expert config as ESFT's JSON text (layer keys in their string order). */
static void esft__config_json(esft__buf *b, const esft_expert_config *cfg)
{
    int *order, n_order, i, j;
    order = ESFT__CAST(int *, esft__calloc(&b->allocator, (size_t)cfg->n_layers, sizeof(int)));
    if (!order) { b->failed = 1; return; }
    n_order = esft__layers_in_key_order(order, cfg->layer_present, cfg->n_layers);
    esft__buf_puts(b, "{\"experts\": {");
    for (i = 0; i < n_order; i++) {
        int l = order[i];
        esft__buf_printf(b, "%s\"%d\": [", i ? ", " : "", l);
        for (j = cfg->offset[l]; j < cfg->offset[l + 1]; j++)
            esft__buf_printf(b, "%s%d", j > cfg->offset[l] ? ", " : "", (int)cfg->ids[j]);
        esft__buf_puts(b, "]");
    }
    esft__buf_printf(b, "}, \"shared_experts\": %s, \"non_expert_modules\": %s}",
                     cfg->shared_experts ? "true" : "false", cfg->non_expert_modules ? "true" : "false");
    esft__release(&b->allocator, order);
}

ESFTDEF esft_status esft_expert_config_write(const char *path, const esft_expert_config *cfg,
                                             esft_error *err)
{
    esft__buf b;
    esft__error_clear(err);
    if (!path || !cfg || !cfg->offset) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path or config is NULL");
    esft__buf_init(&b, &cfg->allocator);
    esft__config_json(&b, cfg);
    return esft__write_buf_atomic(path, &b, err);
}

/* A JSON object key that is a non-negative decimal integer below limit, or -1. */
static long esft__json_index_key(const esft_json *js, int tok, long limit)
{
    char key[16];
    char *stop;
    long v;
    if (esft_json_string(js, tok, key, sizeof key) != ESFT_OK || !key[0]) return -1;
    if (key[0] == '0' && key[1]) return -1; /* no leading zeros: "01" would alias "1" */
    if (key[0] < '0' || key[0] > '9') return -1;
    v = strtol(key, &stop, 10);
    return *stop || v >= limit ? -1 : v;
}

/* Fails with the place of token tok in the JSON text. */
static esft_status esft__json_fail(const esft_json *js, int tok, esft_error *err, const char *name,
                                   esft_status s, const char *fmt, const char *what)
{
    long line = 1;
    size_t i, at = tok >= 0 ? js->tokens[tok].start : 0;
    for (i = 0; i < at && i < js->length; i++) line += js->text[i] == '\n';
    esft__fail_at(err, s, name, line, fmt, what);
    if (err) err->offset = (long)at;
    return s;
}

#define ESFT__MAX_INDEX 1000000L /* layers and experts above this are not real models */
#define ESFT__MAX_CELLS ((size_t)1 << 22) /* layers x experts of a summary; real models: ~10^4 */

/* Layer table: {"<L>": {"<e>": number, ...}, ...}. Pass 1 (fill == NULL) finds
   the dimensions; pass 2 fills the table and checks every layer has all E. */
static esft_status esft__parse_score_table(const esft_json *js, int obj, const char *name,
                                           int *n_layers, int *n_experts, double *fill,
                                           unsigned char *present, esft_error *err)
{
    int i, k;
    if (obj < 0 || js->tokens[obj].type != ESFT_JSON_OBJECT)
        return esft__json_fail(js, obj, err, name, ESFT_ERR_PARSE, "%s is not an object of layers", "score table");
    k = obj + 1;
    for (i = 0; i < js->tokens[obj].size; i++) {
        int val = k + 1, j, kk = val + 1, n_in_layer = 0;
        long layer = esft__json_index_key(js, k, ESFT__MAX_INDEX);
        if (layer < 0) return esft__json_fail(js, k, err, name, ESFT_ERR_PARSE, "%s is not a layer number", "key");
        if (js->tokens[val].type != ESFT_JSON_OBJECT)
            return esft__json_fail(js, val, err, name, ESFT_ERR_PARSE, "%s is not an object of experts", "layer");
        if (!fill && layer + 1 > *n_layers) *n_layers = (int)layer + 1;
        if (fill) {
            if (present[layer]) return esft__json_fail(js, k, err, name, ESFT_ERR_PARSE, "duplicate %s key", "layer");
            present[layer] = 1;
        }
        for (j = 0; j < js->tokens[val].size; j++) {
            long e = esft__json_index_key(js, kk, ESFT__MAX_INDEX);
            double v;
            if (e < 0) return esft__json_fail(js, kk, err, name, ESFT_ERR_PARSE, "%s is not an expert number", "key");
            if (esft_json_number(js, kk + 1, &v) != ESFT_OK)
                return esft__json_fail(js, kk + 1, err, name, ESFT_ERR_PARSE, "%s is not a number", "score");
            if (!fill && e + 1 > *n_experts) *n_experts = (int)e + 1;
            if (fill) {
                double *cell = fill + (size_t)layer * *n_experts + e;
                if (*cell == *cell) /* cells start as NaN, so a second write is a duplicate */
                    return esft__json_fail(js, kk, err, name, ESFT_ERR_PARSE, "duplicate %s key", "expert");
                *cell = v;
            }
            n_in_layer++;
            kk = js->tokens[kk + 1].next;
        }
        if (fill && n_in_layer != *n_experts)
            return esft__json_fail(js, k, err, name, ESFT_ERR_SHAPE, "%s does not score every expert", "layer");
        k = js->tokens[val].next;
    }
    return ESFT_OK;
}

ESFTDEF esft_status esft_scores_parse_json(const char *text, size_t size, const char *name,
                                           esft_scores *out, esft_error *err)
{
    esft_json js;
    int tok_t, tok_g, L = 0, E = 0, l;
    unsigned char *gate_present = NULL;
    size_t i, le;
    esft_status s;
    esft__error_clear(err);
    if (!out) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "output is NULL");
    memset(out, 0, sizeof *out);
    if (!name) name = "<memory>";
    s = esft_json_parse(&js, text, size, NULL, err);
    if (s != ESFT_OK) return esft__locate(err, s, name, err ? err->line : 0);
    if (js.tokens[0].type != ESFT_JSON_OBJECT) {
        s = esft__json_fail(&js, 0, err, name, ESFT_ERR_PARSE, "%s: top level is not an object", "summary");
        goto done;
    }
    tok_t = esft_json_find(&js, 0, "token_scores");
    tok_g = esft_json_find(&js, 0, "gate_scores");
    if (tok_t < 0 || tok_g < 0) {
        s = esft__json_fail(&js, 0, err, name, ESFT_ERR_PARSE, "%s needs token_scores and gate_scores", "summary");
        goto done;
    }
    s = esft__parse_score_table(&js, tok_t, name, &L, &E, NULL, NULL, err);
    if (s == ESFT_OK) s = esft__parse_score_table(&js, tok_g, name, &L, &E, NULL, NULL, err);
    if (s == ESFT_OK && (L == 0 || E == 0))
        s = esft__json_fail(&js, 0, err, name, ESFT_ERR_PARSE, "%s has no scores", "summary");
    if (s == ESFT_OK && (size_t)L * (size_t)E > ESFT__MAX_CELLS) /* a few bytes must not allocate terabytes */
        s = esft__json_fail(&js, 0, err, name, ESFT_ERR_RANGE, "%s: layers x experts above 2^22", "summary");
    if (s != ESFT_OK) goto done;
    if (esft_scores_alloc(out, L, E, NULL) != ESFT_OK ||
        !(gate_present = ESFT__CAST(unsigned char *, esft__calloc(&out->allocator, (size_t)L, 1)))) {
        s = esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, name, 0, "scores of %d x %d", L, E);
        goto done;
    }
    le = (size_t)L * E;
    for (i = 0; i < le; i++) out->token[i] = out->gate[i] = NAN;
    s = esft__parse_score_table(&js, tok_t, name, &L, &E, out->token, out->layer_present, err);
    if (s == ESFT_OK) s = esft__parse_score_table(&js, tok_g, name, &L, &E, out->gate, gate_present, err);
    for (l = 0; s == ESFT_OK && l < L; l++)
        if (out->layer_present[l] != gate_present[l])
            s = esft__json_fail(&js, tok_g, err, name, ESFT_ERR_SHAPE, "%s cover different layers",
                                "token_scores and gate_scores");
    for (i = 0; i < le; i++) { /* absent layers read as 0, not NaN */
        if (out->token[i] != out->token[i]) out->token[i] = 0.0;
        if (out->gate[i] != out->gate[i]) out->gate[i] = 0.0;
    }
done:
    if (gate_present) esft__release(&out->allocator, gate_present);
    if (s != ESFT_OK) esft_scores_free(out);
    esft_json_free(&js);
    return s;
}

/* A whole small file (JSON) as NUL-terminated text; pair: esft__text_free. */
typedef struct esft__text {
    char *data;
    size_t size;
    esft_allocator allocator;
} esft__text;

static esft_status esft__text_read(esft__text *t, const char *path, esft_error *err)
{
    esft__error_clear(err);
    t->allocator = esft__allocator_or_default(NULL);
    t->data = NULL;
    if (!path) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path is NULL");
    return esft__read_file(path, ESFT__MAX_TEXT_FILE, &t->allocator, &t->data, &t->size, err);
}

static void esft__text_free(esft__text *t) { esft__release(&t->allocator, t->data); }

ESFTDEF esft_status esft_scores_read_json(const char *path, esft_scores *out, esft_error *err)
{
    esft__text text;
    esft_status s = esft__text_read(&text, path, err);
    if (s == ESFT_OK) s = esft_scores_parse_json(text.data, text.size, path, out, err);
    else if (out) memset(out, 0, sizeof *out);
    esft__text_free(&text);
    return s;
}

/* One layer's id list of an expert config: integers in [0, ESFT__MAX_INDEX), no
   repeats. seen (ESFT__MAX_INDEX bits, zero on entry) finds repeats in one pass
   (a pairwise check is quadratic: minutes for a list of 10^6 ids); its bits are
   cleared again before returning, so one bitmap serves every layer of a parse. */
static esft_status esft__parse_id_list(const esft_json *js, int arr, const char *name, int32_t *dst,
                                       unsigned char *seen, esft_error *err)
{
    int j, m, k = arr + 1;
    esft_status s = ESFT_OK;
    for (j = 0; j < js->tokens[arr].size; j++, k = js->tokens[k].next) {
        double v;
        if (esft_json_number(js, k, &v) != ESFT_OK || v != floor(v) || v < 0 || v >= ESFT__MAX_INDEX) {
            s = esft__json_fail(js, k, err, name, ESFT_ERR_PARSE, "%s is not a non-negative integer", "expert id");
            break;
        }
        dst[j] = (int32_t)v;
        if (seen[dst[j] >> 3] & (1u << (dst[j] & 7))) {
            s = esft__json_fail(js, k, err, name, ESFT_ERR_PARSE, "%s listed twice", "expert id");
            break;
        }
        seen[dst[j] >> 3] |= (unsigned char)(1u << (dst[j] & 7));
    }
    for (m = 0; m < j; m++) seen[dst[m] >> 3] = 0;
    return s;
}

static esft_status esft__parse_flag(const esft_json *js, const char *key, const char *name, int *out,
                                    esft_error *err)
{
    int t = esft_json_find(js, 0, key);
    *out = 0;
    if (t < 0) return ESFT_OK;
    if (js->tokens[t].type != ESFT_JSON_TRUE && js->tokens[t].type != ESFT_JSON_FALSE)
        return esft__json_fail(js, t, err, name, ESFT_ERR_PARSE, "%s must be true or false", key);
    *out = js->tokens[t].type == ESFT_JSON_TRUE;
    return ESFT_OK;
}

ESFTDEF esft_status esft_expert_config_parse(const char *text, size_t size, const char *name,
                                             esft_expert_config *out, esft_error *err)
{
    esft_json js;
    int ex, i, k, L = 0;
    size_t total = 0;
    int *count = NULL;
    unsigned char *seen = NULL; /* (ESFT__MAX_INDEX bits) for esft__parse_id_list */
    esft_status s;
    esft__error_clear(err);
    if (!out) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "output is NULL");
    memset(out, 0, sizeof *out);
    if (!name) name = "<memory>";
    s = esft_json_parse(&js, text, size, NULL, err);
    if (s != ESFT_OK) return esft__locate(err, s, name, err ? err->line : 0);
    ex = js.tokens[0].type == ESFT_JSON_OBJECT ? esft_json_find(&js, 0, "experts") : -1;
    if (ex < 0 || js.tokens[ex].type != ESFT_JSON_OBJECT) {
        s = esft__json_fail(&js, ex, err, name, ESFT_ERR_PARSE, "%s needs an \"experts\" object", "expert config");
        goto done;
    }
    for (i = 0, k = ex + 1; i < js.tokens[ex].size; i++, k = js.tokens[k + 1].next) {
        long layer = esft__json_index_key(&js, k, ESFT__MAX_INDEX);
        if (layer < 0) { s = esft__json_fail(&js, k, err, name, ESFT_ERR_PARSE, "%s is not a layer number", "key"); goto done; }
        if (js.tokens[k + 1].type != ESFT_JSON_ARRAY) {
            s = esft__json_fail(&js, k + 1, err, name, ESFT_ERR_PARSE, "%s is not a list of expert ids", "layer");
            goto done;
        }
        if (layer + 1 > L) L = (int)layer + 1;
        total += (size_t)js.tokens[k + 1].size;
    }
    if (L == 0) L = 1; /* an empty selection still makes a valid (empty) config */
    if (esft__config_alloc(out, L, 0, total, NULL) != ESFT_OK) {
        s = esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, name, 0, "config of %d layers", L);
        goto done;
    }
    count = ESFT__CAST(int *, esft__calloc(&out->allocator, (size_t)L, sizeof(int)));
    if (!count) { s = esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, name, 0, "config"); goto done; }
    for (i = 0, k = ex + 1; i < js.tokens[ex].size; i++, k = js.tokens[k + 1].next) {
        long layer = esft__json_index_key(&js, k, ESFT__MAX_INDEX);
        if (out->layer_present[layer]) { s = esft__json_fail(&js, k, err, name, ESFT_ERR_PARSE, "duplicate %s key", "layer"); goto done; }
        out->layer_present[layer] = 1;
        count[layer] = js.tokens[k + 1].size;
    }
    for (i = 0; i < L; i++) out->offset[i + 1] = out->offset[i] + count[i];
    seen = ESFT__CAST(unsigned char *, esft__calloc(&out->allocator, (ESFT__MAX_INDEX + 7) / 8, 1));
    if (!seen) { s = esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, name, 0, "config"); goto done; }
    for (i = 0, k = ex + 1; i < js.tokens[ex].size && s == ESFT_OK; i++, k = js.tokens[k + 1].next) {
        long layer = esft__json_index_key(&js, k, ESFT__MAX_INDEX);
        s = esft__parse_id_list(&js, k + 1, name, out->ids + out->offset[layer], seen, err);
    }
    if (s == ESFT_OK) s = esft__parse_flag(&js, "shared_experts", name, &out->shared_experts, err);
    if (s == ESFT_OK) s = esft__parse_flag(&js, "non_expert_modules", name, &out->non_expert_modules, err);
done:
    if (count) esft__release(&out->allocator, count);
    if (seen) esft__release(&out->allocator, seen);
    if (s != ESFT_OK) esft_expert_config_free(out);
    esft_json_free(&js);
    return s;
}

ESFTDEF esft_status esft_expert_config_read(const char *path, esft_expert_config *out, esft_error *err)
{
    esft__text text;
    esft_status s = esft__text_read(&text, path, err);
    if (s == ESFT_OK) s = esft_expert_config_parse(text.data, text.size, path, out, err);
    else if (out) memset(out, 0, sizeof *out);
    esft__text_free(&text);
    return s;
}

/* ---- heatmap (SVG) --------------------------------------------------- */

/* A perceptual sequential colour scale, dark violet -> teal -> yellow:
   piecewise-linear through nine samples of matplotlib's viridis. Its lightness
   rises monotonically, so brighter always means a higher score (in grey print
   and for the common colour-vision deficiencies too). t in [0, 1]. */
static void esft__ramp(double t, int rgb[3])
{
    static const unsigned char stop[9][3] = {
        {68, 1, 84},    {71, 44, 122},  {59, 81, 139},  {44, 113, 142}, {33, 144, 141},
        {39, 173, 129}, {92, 200, 99},  {170, 220, 50}, {253, 231, 37}};
    double x;
    int i, c;
    if (!(t > 0.0)) t = 0.0; /* also NaN */
    if (t > 1.0) t = 1.0;
    x = t * 8.0;
    i = x >= 8.0 ? 7 : (int)x;
    x -= i;
    for (c = 0; c < 3; c++)
        rgb[c] = (int)(stop[i][c] + (stop[i + 1][c] - stop[i][c]) * x + 0.5);
}

/* A tick step of 1, 2 or 5 times a power of ten giving at most max_ticks steps. */
static double esft__nice_step(double range, int max_ticks)
{
    double raw = range / max_ticks, mag, f;
    if (!(raw > 0.0)) return 1.0;
    mag = pow(10.0, floor(log10(raw)));
    f = raw / mag;
    return (f <= 1.0 ? 1.0 : f <= 2.0 ? 2.0 : f <= 5.0 ? 5.0 : 10.0) * mag;
}

/* What to draw and where, in pixels. Rows are the present layers, top to bottom. */
typedef struct esft__heatmap {
    const esft_scores *sc;         /* or NULL: a config alone */
    const double *table;           /* (L, E) the chosen score, or NULL */
    const esft_expert_config *cfg; /* or NULL: scores alone */
    esft_score which;
    int *rows;                     /* (n_rows) the layer shown in each row */
    int n_rows, L, E, n_selected;
    int cell, left, top, grid_w, grid_h, bar_h, width, height;
    double vmax, step;             /* colour scale [0, vmax], a tick every step */
} esft__heatmap;

/* 1-based position of expert e in layer l's selection (1 = chosen first), 0 if not selected. */
static int esft__config_rank(const esft_expert_config *cfg, int l, int e)
{
    int i;
    if (!cfg || l < 0 || l >= cfg->n_layers) return 0;
    for (i = cfg->offset[l]; i < cfg->offset[l + 1]; i++)
        if (cfg->ids[i] == e) return i - cfg->offset[l] + 1;
    return 0;
}

/* Checks the config against the grid: every selected (layer, expert) must be a cell. */
static esft_status esft__heatmap_check_config(const esft__heatmap *h, const char *path, esft_error *err)
{
    const esft_expert_config *cfg = h->cfg;
    int l, i;
    for (l = 0; l < cfg->n_layers; l++) {
        for (i = cfg->offset[l]; i < cfg->offset[l + 1]; i++) {
            int e = cfg->ids[i];
            if (e < 0 || e >= h->E)
                return esft__fail_at(err, ESFT_ERR_RANGE, path, 0,
                                     "config selects expert %d of layer %d; experts are 0..%d", e, l, h->E - 1);
            if (h->sc && (l >= h->sc->n_layers || !h->sc->layer_present[l]))
                return esft__fail_at(err, ESFT_ERR_SHAPE, path, 0,
                                     "config selects experts of layer %d, which has no scores", l);
        }
    }
    return ESFT_OK;
}

/* Largest picture drawn: ~120 bytes of SVG per cell, so at most ~8 MB. Real models
   have at most a few hundred experts and ~100 layers (DeepSeek-V3: 58 x 256). */
#define ESFT__HEATMAP_MAX_EXPERTS 4096
#define ESFT__HEATMAP_MAX_CELLS 65536L

/* Grid dimensions, scale and layout from the inputs; validates them on the way. */
static esft_status esft__heatmap_plan(esft__heatmap *h, const char *path, esft_error *err)
{
    const unsigned char *present;
    int l, e, i;
    double vmax = 0.0;
    if (h->sc) {
        h->L = h->sc->n_layers;
        h->E = h->sc->n_experts;
        present = h->sc->layer_present;
    } else { /* a config read from a file does not know E: the highest id, up to a multiple of 8 */
        int max_id = 0;
        for (i = 0; i < h->cfg->offset[h->cfg->n_layers]; i++)
            if (h->cfg->ids[i] > max_id) max_id = h->cfg->ids[i];
        h->L = h->cfg->n_layers;
        h->E = h->cfg->n_experts > 0 ? h->cfg->n_experts : (max_id / 8 + 1) * 8;
        present = h->cfg->layer_present;
    }
    if (h->E > ESFT__HEATMAP_MAX_EXPERTS) /* an id of 10^6 in a config would make a 330 MB picture */
        return esft__fail_at(err, ESFT_ERR_RANGE, path, 0, "a heatmap of %d experts is too wide to draw "
                             "(at most %d)", h->E, ESFT__HEATMAP_MAX_EXPERTS);
    if (h->cfg) {
        esft_status s = esft__heatmap_check_config(h, path, err);
        if (s != ESFT_OK) return s;
        h->n_selected = esft_expert_config_count(h->cfg);
    }
    for (l = 0; l < h->L; l++) {
        if (!present[l]) continue;
        for (e = 0; h->table && e < h->E; e++) {
            double v = h->table[(size_t)l * h->E + e];
            if (v != v || v - v != 0.0)
                return esft__fail_at(err, ESFT_ERR_NUMERIC, path, 0, "score of layer %d expert %d is %g", l, e, v);
            if (v > vmax) vmax = v;
        }
        h->rows[h->n_rows++] = l;
    }
    if (h->n_rows == 0) return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "no layer to draw");
    if ((long)h->n_rows * h->E > ESFT__HEATMAP_MAX_CELLS)
        return esft__fail_at(err, ESFT_ERR_RANGE, path, 0, "a heatmap of %d layers x %d experts is too large "
                             "to draw (at most %ld cells)", h->n_rows, h->E, (long)ESFT__HEATMAP_MAX_CELLS);
    h->step = esft__nice_step(vmax > 0.0 ? vmax : 1.0, 5);
    h->vmax = ceil((vmax > 0.0 ? vmax : 1.0) / h->step - 1e-9) * h->step;
    /* square cells, ~900 px of grid for 64 experts; wider grids get smaller cells */
    h->cell = 896 / h->E;
    if (h->cell > 28) h->cell = 28;
    if (h->cell < 5) h->cell = 5;
    h->left = 76;
    h->top = 70;
    h->grid_w = h->E * h->cell;
    h->grid_h = h->n_rows * h->cell;
    h->bar_h = h->grid_h < 160 ? 160 : h->grid_h; /* a readable colour bar even for few layers */
    h->width = h->left + h->grid_w + (h->cfg ? 44 : 16) + (h->table ? 90 : 0);
    if (h->width < 780) h->width = 780; /* room for the title lines */
    h->height = h->top + h->grid_h + (h->cfg ? 80 : 56);
    if (h->table && h->height < h->top + h->bar_h + 16) h->height = h->top + h->bar_h + 16;
    return ESFT_OK;
}

static const char *esft__score_name(esft_score which) { return which == ESFT_SCORE_GATE ? "Gate" : "Token"; }

static void esft__heatmap_titles(esft__buf *b, const esft__heatmap *h)
{
    int total = h->n_rows * h->E;
    if (h->table)
        esft__buf_printf(b, "<text x=\"%d\" y=\"26\" font-size=\"18\" font-weight=\"bold\">%s scores per "
                         "layer and routed expert</text>\n", h->left, esft__score_name(h->which));
    else
        esft__buf_printf(b, "<text x=\"%d\" y=\"26\" font-size=\"18\" font-weight=\"bold\">Experts selected "
                         "for training: %d of %d</text>\n", h->left, h->n_selected, total);
    esft__buf_printf(b, "<text x=\"%d\" y=\"46\" font-size=\"12\" fill=\"#444\">", h->left);
    if (!h->table)
        esft__buf_puts(b, "each row is a layer; a number is the expert's rank in its layer's selection (1 = chosen first)");
    else if (h->which == ESFT_SCORE_TOKEN)
        esft__buf_puts(b, "colour = how often the router picks the expert (its share of the layer's top-K picks; a row sums to 1)");
    else
        esft__buf_puts(b, "colour = mean gate weight the router gives the expert per token (a row sums to at most 1)");
    esft__buf_puts(b, "</text>\n");
}

/* The grid: one square per (layer, expert), then the outlines of the selected
   ones on top (drawn last so no neighbour covers them). */
static void esft__heatmap_cells(esft__buf *b, const esft__heatmap *h)
{
    int r, e, c = h->cell;
    for (r = 0; r < h->n_rows; r++) {
        int l = h->rows[r], y = h->top + r * c;
        for (e = 0; e < h->E; e++) {
            int x = h->left + e * c, rank = esft__config_rank(h->cfg, l, e), rgb[3] = {236, 236, 236};
            if (h->table) esft__ramp(h->table[(size_t)l * h->E + e] / h->vmax, rgb);
            else if (rank) { rgb[0] = 255; rgb[1] = 214; rgb[2] = 102; }
            esft__buf_printf(b, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"#%02x%02x%02x\">"
                             "<title>layer %d, expert %d", x, y, c - 1, c - 1, rgb[0], rgb[1], rgb[2], l, e);
            if (h->table) {
                char v[32];
                esft__dtoa(v, sizeof v, h->table[(size_t)l * h->E + e], 4, 0);
                esft__buf_printf(b, ": %s score %s", h->which == ESFT_SCORE_GATE ? "gate" : "token", v);
            }
            if (rank) esft__buf_printf(b, ", selected (#%d)", rank);
            esft__buf_puts(b, "</title></rect>\n");
        }
    }
    if (!h->cfg) return;
    /* red-orange: a hue viridis never uses, so outlines stand out on every cell colour */
    esft__buf_puts(b, "<g fill=\"none\" stroke=\"#ff2a00\" stroke-width=\"2.5\">\n");
    for (r = 0; r < h->n_rows; r++) {
        int l = h->rows[r];
        for (e = 0; e < h->E; e++)
            if (esft__config_rank(h->cfg, l, e))
                esft__buf_printf(b, "<rect x=\"%d.5\" y=\"%d.5\" width=\"%d\" height=\"%d\"/>\n",
                                 h->left + e * c, h->top + r * c, c - 2, c - 2);
    }
    esft__buf_puts(b, "</g>\n");
    if (h->table || c < 12) return;
    esft__buf_printf(b, "<g font-size=\"%d\" text-anchor=\"middle\" fill=\"#000\">\n", c * 6 / 10);
    for (r = 0; r < h->n_rows; r++) {
        int l = h->rows[r];
        for (e = 0; e < h->E; e++) {
            int rank = esft__config_rank(h->cfg, l, e);
            if (rank)
                esft__buf_printf(b, "<text x=\"%d\" y=\"%d\">%d</text>\n", h->left + e * c + (c - 1) / 2,
                                 h->top + r * c + c * 7 / 10, rank);
        }
    }
    esft__buf_puts(b, "</g>\n");
}

/* Layer numbers on the left, expert ids below (every 8, or sparser when cells are
   small), the selected count per layer on the right. */
static void esft__heatmap_axes(esft__buf *b, const esft__heatmap *h)
{
    int r, e, c = h->cell, every = h->E <= 16 ? 1 : 8, rows_every = c >= 10 ? 1 : 5;
    int bottom = h->top + h->grid_h;
    while (every * c < 40 && every < h->E && h->E > 16) every *= 2;
    esft__buf_printf(b, "<g font-size=\"%d\" fill=\"#222\" text-anchor=\"end\">\n", c < 11 ? c : 11);
    for (r = 0; r < h->n_rows; r += rows_every)
        esft__buf_printf(b, "<text x=\"%d\" y=\"%d\">%d</text>\n", h->left - 6, h->top + r * c + c * 3 / 4, h->rows[r]);
    esft__buf_puts(b, "</g>\n");
    esft__buf_printf(b, "<text transform=\"translate(%d %d) rotate(-90)\" font-size=\"13\" text-anchor=\"middle\">"
                     "layer</text>\n", h->left - 44, h->top + h->grid_h / 2);
    esft__buf_puts(b, "<g font-size=\"11\" fill=\"#222\" text-anchor=\"middle\">\n");
    for (e = 0; e < h->E; e += every) {
        int x = h->left + e * c + (c - 1) / 2;
        esft__buf_printf(b, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#222\"/>"
                         "<text x=\"%d\" y=\"%d\">%d</text>\n", x, bottom, x, bottom + 4, x, bottom + 16, e);
    }
    esft__buf_puts(b, "</g>\n");
    esft__buf_printf(b, "<text x=\"%d\" y=\"%d\" font-size=\"13\" text-anchor=\"middle\">routed expert id</text>\n",
                     h->left + h->grid_w / 2, bottom + 34);
    if (!h->cfg) return;
    esft__buf_printf(b, "<g font-size=\"%d\" fill=\"#222\" text-anchor=\"end\">\n<text x=\"%d\" y=\"%d\" "
                     "font-size=\"10\">sel.</text>\n", c < 11 ? c : 11, h->left + h->grid_w + 30, h->top - 12);
    for (r = 0; r < h->n_rows; r += 1) {
        int l = h->rows[r], n = l < h->cfg->n_layers ? h->cfg->offset[l + 1] - h->cfg->offset[l] : 0;
        if (c >= 10 || n) esft__buf_printf(b, "<text x=\"%d\" y=\"%d\">%d</text>\n", h->left + h->grid_w + 30,
                                           h->top + r * c + c * 3 / 4, n);
    }
    esft__buf_puts(b, "</g>\n");
}

/* A vertical colour bar with ticks at round values. */
static void esft__heatmap_colorbar(esft__buf *b, const esft__heatmap *h)
{
    int i, slices = 64, x = h->left + h->grid_w + (h->cfg ? 44 : 16), decimals;
    double v, slice_h = (double)h->bar_h / slices;
    decimals = h->step >= 1.0 ? 0 : (int)ceil(-log10(h->step) - 1e-9);
    esft__buf_printf(b, "<text x=\"%d\" y=\"%d\" font-size=\"11\">%s score</text>\n<g>\n", x - 4, h->top - 12,
                     h->which == ESFT_SCORE_GATE ? "gate" : "token");
    for (i = 0; i < slices; i++) { /* slices, not a gradient: every renderer draws rects the same */
        int rgb[3];
        char y[32], hh[32];
        esft__ramp((i + 0.5) / slices, rgb);
        esft__dtoa(y, sizeof y, h->top + h->bar_h - (i + 1) * slice_h, 2, 1);
        esft__dtoa(hh, sizeof hh, slice_h + 0.3, 2, 1);
        esft__buf_printf(b, "<rect x=\"%d\" y=\"%s\" width=\"14\" height=\"%s\" fill=\"#%02x%02x%02x\"/>\n", x,
                         y, hh, rgb[0], rgb[1], rgb[2]);
    }
    esft__buf_printf(b, "</g>\n<rect x=\"%d\" y=\"%d\" width=\"14\" height=\"%d\" fill=\"none\" stroke=\"#222\" "
                     "stroke-width=\"0.5\"/>\n<g font-size=\"11\" fill=\"#222\">\n", x, h->top, h->bar_h);
    for (v = 0.0; v <= h->vmax + h->step * 1e-6; v += h->step) {
        double y = h->top + h->bar_h - v / h->vmax * h->bar_h;
        char y0[32], y1[32], label[64];
        esft__dtoa(y0, sizeof y0, y, 1, 1);
        esft__dtoa(y1, sizeof y1, y + 4, 1, 1);
        esft__dtoa(label, sizeof label, v, decimals, 1);
        esft__buf_printf(b, "<line x1=\"%d\" y1=\"%s\" x2=\"%d\" y2=\"%s\" stroke=\"#222\"/>"
                         "<text x=\"%d\" y=\"%s\">%s</text>\n", x + 14, y0, x + 18, y0, x + 21, y1, label);
    }
    esft__buf_puts(b, "</g>\n");
}

/* Below the axis: what an outline means, with the totals. */
static void esft__heatmap_legend(esft__buf *b, const esft__heatmap *h)
{
    int y = h->top + h->grid_h + 50, total = h->n_rows * h->E;
    char pct[32];
    esft__dtoa(pct, sizeof pct, 100.0 * h->n_selected / total, 1, 1);
    esft__buf_printf(b, "<rect x=\"%d\" y=\"%d\" width=\"13\" height=\"13\" fill=\"%s\" stroke=\"#ff2a00\" "
                     "stroke-width=\"2.5\"/>\n<text x=\"%d\" y=\"%d\" font-size=\"12\">selected for training: %d of "
                     "%d experts (%s%%) over %d layers</text>\n", h->left, y, h->table ? "none" : "#ffd666",
                     h->left + 20, y + 11, h->n_selected, total, pct, h->n_rows);
}

ESFTDEF esft_status esft_heatmap_write_svg(const char *path, const esft_scores *sc, esft_score which,
                                           const esft_expert_config *selected, esft_error *err)
{
    esft__heatmap h;
    esft__buf b;
    esft_status s;
    int n_layers;
    esft__error_clear(err);
    if (!path || (!sc && !selected))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path is NULL, or neither scores nor config given");
    if (which != ESFT_SCORE_TOKEN && which != ESFT_SCORE_GATE)
        return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "unknown score %d", (int)which);
    if ((sc && (!sc->token || !sc->gate || !sc->layer_present)) || (selected && !selected->offset))
        return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "scores or config not initialised");
    memset(&h, 0, sizeof h);
    h.sc = sc;
    h.table = sc ? esft__score_table(sc, which) : NULL;
    h.cfg = selected;
    h.which = which;
    n_layers = sc ? sc->n_layers : selected->n_layers;
    esft__buf_init(&b, sc ? &sc->allocator : &selected->allocator);
    h.rows = ESFT__CAST(int *, esft__calloc(&b.allocator, (size_t)n_layers, sizeof(int)));
    if (!h.rows) return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, 0, "%d rows", n_layers);
    s = esft__heatmap_plan(&h, path, err);
    if (s != ESFT_OK) {
        esft__release(&b.allocator, h.rows);
        return s;
    }
    esft__buf_printf(&b, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" "
                     "width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\" font-family=\"DejaVu Sans, Helvetica, "
                     "Arial, sans-serif\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"#fff\"/>\n",
                     h.width, h.height, h.width, h.height);
    esft__heatmap_titles(&b, &h);
    esft__heatmap_cells(&b, &h);
    esft__heatmap_axes(&b, &h);
    if (h.table) esft__heatmap_colorbar(&b, &h);
    if (h.cfg) esft__heatmap_legend(&b, &h);
    esft__buf_puts(&b, "</svg>\n");
    esft__release(&b.allocator, h.rows);
    return esft__write_buf_atomic(path, &b, err);
}

/* ===================================================================== */
/* 9. MoE layer with selective expert training                           */
/* ===================================================================== */

/* The GEMM kernel is defined with the CPU kernels near the end. */
static void esft__sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                        const float *A, int lda, const float *B, int ldb, float beta,
                        float *C, int ldc);

/* Work-sharing over experts and rows when built with OpenMP (-fopenmp), on
   esft_get_num_threads() threads. Every iteration writes its own rows, so the
   result has the same bits for any thread count. The GEMMs called inside a
   parallel loop run on one thread each (OpenMP does not nest by default). */
#if defined(_OPENMP)
#define ESFT__MOE_FOR_DYNAMIC(nt) ESFT__PRAGMA(omp parallel for if(nt > 1) num_threads(nt) schedule(dynamic, 1))
#define ESFT__MOE_FOR_STATIC(nt) ESFT__PRAGMA(omp parallel for if(nt > 1) num_threads(nt) schedule(static))
#else
#define ESFT__MOE_FOR_DYNAMIC(nt)
#define ESFT__MOE_FOR_STATIC(nt)
#endif

/* Threads for one call: a small layer runs on one (starting a team costs more
   than its work, and far more when the machine is busy). */
static int esft__moe_threads(const esft_moe_config *c, int T)
{
    double work = (double)T * c->route.top_k * c->d_expert * c->d_model;
    return work < 4194304.0 ? 1 : esft_get_num_threads();
}

ESFTDEF esft_moe_config esft_moe_config_init(int d_model, int n_experts, int top_k,
                                             int d_expert, int d_shared)
{
    esft_moe_config c;
    memset(&c, 0, sizeof c);
    c.d_model = d_model;
    c.d_expert = d_expert;
    c.d_shared = d_shared;
    c.route = esft_route_config_init(n_experts, top_k);
    c.aux_alpha = 0.0f;
    c.aux_mode = ESFT_AUX_BATCH;
    c.aux_seq_len = 0;
    c.trainable_experts = NULL;
    c.train_router = 0;
    c.train_shared = 0;
    c.shared_gated = 0;
    return c;
}

ESFTDEF esft_moe_config esft_moe_config_deepseek_v2_lite(void)
{
    /* config.json: hidden 2048, 64 routed, 6 per token, moe_intermediate 1408,
       2 shared experts (2 x 1408), aux_loss_alpha 0.001, seq_aux true */
    esft_moe_config c = esft_moe_config_init(2048, 64, 6, 1408, 2816);
    c.route = esft_route_config_deepseek_v2_lite();
    c.aux_alpha = 0.001f;
    c.aux_mode = ESFT_AUX_SEQUENCE;
    return c;
}

ESFTDEF esft_status esft_moe_config_validate(const esft_moe_config *c, esft_error *err)
{
    esft_status s;
    if (!c) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "MoE config is NULL");
    if (c->d_model < 1 || c->d_expert < 1 || c->d_shared < 0)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "D %d, F %d must be >= 1 and FS %d >= 0",
                          c->d_model, c->d_expert, c->d_shared);
    s = esft__route_config_sizes(&c->route, err); /* the bias may be on a device: its backend checks it */
    if (s != ESFT_OK) return s;
    if (!(c->aux_alpha >= 0.0f) || !isfinite(c->aux_alpha))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "aux_alpha must be finite and >= 0");
    if (c->aux_mode != ESFT_AUX_BATCH && c->aux_mode != ESFT_AUX_SEQUENCE)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "unknown aux mode %d", (int)c->aux_mode);
    if (c->aux_alpha > 0.0f && c->aux_mode == ESFT_AUX_SEQUENCE && c->aux_seq_len < 1)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "per-sequence aux loss needs aux_seq_len >= 1");
    if (c->aux_alpha > 0.0f && c->route.gating != ESFT_GATING_SOFTMAX)
        return esft__fail(err, ESFT_ERR_UNSUPPORTED, "the auxiliary loss is implemented for softmax gating only");
    if (c->shared_gated && c->d_shared == 0)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "shared_gated needs a shared block (FS = 0)");
    return ESFT_OK;
}

/* Floats of one routed expert (gate, up, down) and of the shared block. */
static size_t esft__moe_expert_floats(const esft_moe_config *c)
{
    return (size_t)3 * (size_t)c->d_expert * (size_t)c->d_model;
}

static size_t esft__moe_shared_floats(const esft_moe_config *c)
{
    return ((size_t)3 * (size_t)c->d_shared + (c->shared_gated ? 1 : 0)) * (size_t)c->d_model;
}

/* Sizes of the config's tensors must fit size_t (and GEMM dimensions int). */
static esft_status esft__moe_check_sizes(const esft_moe_config *c, esft_error *err)
{
    double e = 3.0 * c->d_expert * (double)c->d_model * c->route.n_experts;
    double sh = 3.0 * c->d_shared * (double)c->d_model;
    if (e + sh + (double)c->route.n_experts * c->d_model > (double)((size_t)-1 / 8))
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "MoE layer too large for this machine");
    return ESFT_OK;
}

ESFTDEF esft_status esft_moe_param_count(const esft_moe_config *c, size_t *n_params, esft_error *err)
{
    esft_status s = esft_moe_config_validate(c, err);
    size_t n = 0;
    int e;
    if (s == ESFT_OK) s = esft__moe_check_sizes(c, err);
    if (s != ESFT_OK) return s;
    if (!n_params) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "n_params is NULL");
    if (c->trainable_experts)
        for (e = 0; e < c->route.n_experts; e++)
            if (c->trainable_experts[e]) n += esft__moe_expert_floats(c);
    if (c->train_router) n += (size_t)c->route.n_experts * (size_t)c->d_model;
    if (c->train_shared) n += esft__moe_shared_floats(c);
    *n_params = n;
    return ESFT_OK;
}

static esft_status esft__moe_check_weights(const esft_moe_config *c, const esft_moe_weights *w,
                                           esft_error *err)
{
    if (!w || !w->router || !w->gate || !w->up || !w->down)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "router and expert weights must not be NULL");
    if (c->d_shared > 0 && (!w->shared_gate || !w->shared_up || !w->shared_down))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "FS = %d but a shared weight is NULL", c->d_shared);
    if (c->shared_gated && !w->shared_router)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "shared_gated but shared_router is NULL");
    return ESFT_OK;
}

/* Points the router/shared views of params (or grads) at their place after the experts. */
static void esft__moe_set_views(esft_moe *m)
{
    const esft_moe_config *c = &m->cfg;
    size_t off = (size_t)m->n_trainable_experts * esft__moe_expert_floats(c);
    size_t sd = (size_t)c->d_shared * (size_t)c->d_model;
    if (c->train_router) {
        m->router = m->params + off;
        m->d_router = m->grads + off;
        off += (size_t)c->route.n_experts * (size_t)c->d_model;
    }
    if (c->train_shared && c->d_shared > 0) {
        m->shared_gate = m->params + off;
        m->shared_up = m->params + off + sd;
        m->shared_down = m->params + off + 2 * sd;
        m->d_shared_gate = m->grads + off;
        m->d_shared_up = m->grads + off + sd;
        m->d_shared_down = m->grads + off + 2 * sd;
        if (c->shared_gated) {
            m->shared_router = m->params + off + 3 * sd;
            m->d_shared_router = m->grads + off + 3 * sd;
        }
    }
}

/* Copies the trainable tensors from the caller's weights into the block. */
static void esft__moe_copy_trainable(esft_moe *m, const esft_moe_weights *w)
{
    const esft_moe_config *c = &m->cfg;
    size_t fd = (size_t)c->d_expert * (size_t)c->d_model, sd = (size_t)c->d_shared * (size_t)c->d_model;
    int e;
    for (e = 0; e < c->route.n_experts; e++) {
        float *dst;
        if (m->slot[e] < 0) continue;
        dst = m->params + (size_t)m->slot[e] * 3 * fd;
        memcpy(dst, w->gate + (size_t)e * fd, fd * sizeof(float));
        memcpy(dst + fd, w->up + (size_t)e * fd, fd * sizeof(float));
        memcpy(dst + 2 * fd, w->down + (size_t)e * fd, fd * sizeof(float));
    }
    if (m->router) memcpy(m->router, w->router, (size_t)c->route.n_experts * c->d_model * sizeof(float));
    if (m->shared_gate) {
        memcpy(m->shared_gate, w->shared_gate, sd * sizeof(float));
        memcpy(m->shared_up, w->shared_up, sd * sizeof(float));
        memcpy(m->shared_down, w->shared_down, sd * sizeof(float));
    }
    if (m->shared_router) memcpy(m->shared_router, w->shared_router, (size_t)c->d_model * sizeof(float));
}

ESFTDEF esft_status esft_moe_init(esft_moe *m, const esft_moe_config *cfg, const esft_moe_weights *w,
                                  const esft_allocator *allocator, esft_error *err)
{
    size_t n;
    int e, E;
    esft_status s;
    if (!m) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "layer is NULL");
    memset(m, 0, sizeof *m);
    s = esft_moe_param_count(cfg, &n, err);
    if (s == ESFT_OK) s = esft__moe_check_weights(cfg, w, err);
    if (s != ESFT_OK) return s;
    E = cfg->route.n_experts;
    m->cfg = *cfg;
    m->cfg.trainable_experts = NULL;
    if (cfg->d_shared == 0) m->cfg.train_shared = 0;
    m->frozen = *w;
    m->backend = esft_backend_cpu();
    m->allocator = esft__allocator_or_default(allocator);
    m->n_params = n;
    m->params = ESFT__CAST(float *, esft__calloc(&m->allocator, n, sizeof(float)));
    m->grads = ESFT__CAST(float *, esft__calloc(&m->allocator, n, sizeof(float)));
    m->slot = ESFT__CAST(int32_t *, esft__calloc(&m->allocator, (size_t)E, sizeof(int32_t)));
    if (!m->params || !m->grads || !m->slot) {
        esft_moe_uninit(m);
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "MoE layer of %lu trainable floats", (unsigned long)n);
    }
    for (e = 0; e < E; e++)
        m->slot[e] = cfg->trainable_experts && cfg->trainable_experts[e] ? m->n_trainable_experts++ : -1;
    esft__moe_set_views(m);
    esft__moe_copy_trainable(m, w);
    return ESFT_OK;
}

/* Frees a block made by the allocator (memory NULL) or by a backend's alloc. */
static void esft__block_release(const esft_allocator *a, const esft_backend *memory, void *p)
{
    if (!p) return;
    if (memory) memory->free(memory->context, p);
    else esft__release(a, p);
}

ESFTDEF void esft_moe_uninit(esft_moe *m)
{
    if (!m || !m->allocator.free) return;
    esft__block_release(&m->allocator, m->memory, m->params);
    esft__block_release(&m->allocator, m->memory, m->grads);
    esft__release(&m->allocator, m->slot);
    memset(m, 0, sizeof *m);
}

/* Zeroes n floats of b's memory at p by uploads from a zeroed host buffer. */
static esft_status esft__backend_zero(const esft_backend *b, void *p, size_t bytes)
{
    const size_t CHUNK = (size_t)1 << 20;
    esft_allocator a = esft__allocator_or_default(NULL);
    void *zero;
    size_t off;
    esft_status s = ESFT_OK;
    if (!bytes) return ESFT_OK;
    zero = esft__calloc(&a, bytes < CHUNK ? bytes : CHUNK, 1);
    if (!zero) return ESFT_ERR_OUT_OF_MEMORY;
    for (off = 0; off < bytes && s == ESFT_OK; off += CHUNK)
        s = b->upload(b->context, ESFT__CAST(char *, p) + off, zero, bytes - off < CHUNK ? bytes - off : CHUNK);
    esft__release(&a, zero);
    return s;
}

ESFTDEF void esft_moe_zero_grad(esft_moe *m)
{
    if (!m || !m->grads) return;
    if (m->memory) (void)esft__backend_zero(m->memory, m->grads, m->n_params * sizeof(float));
    else memset(m->grads, 0, m->n_params * sizeof(float));
}

/* n bytes from src (in `from`'s memory, or host memory when from is NULL) to a
   new block of `to`'s memory (NULL: host memory from a), through host staging. */
static esft_status esft__block_move(const esft_allocator *a, const esft_backend *from, const esft_backend *to,
                                    const void *src, size_t bytes, void **out)
{
    void *host = NULL, *dst = NULL;
    esft_status s = ESFT_OK;
    *out = NULL;
    if (from) {
        host = esft__calloc(a, bytes ? bytes : 1, 1);
        if (!host) return ESFT_ERR_OUT_OF_MEMORY;
        s = from->download(from->context, host, src, bytes);
        src = host;
    }
    if (s == ESFT_OK && to) {
        s = to->alloc(to->context, bytes, &dst);
        if (s == ESFT_OK) s = to->upload(to->context, dst, src, bytes);
        if (s != ESFT_OK && dst) to->free(to->context, dst);
    } else if (s == ESFT_OK) {
        dst = host ? host : esft__calloc(a, bytes ? bytes : 1, 1);
        if (!dst) s = ESFT_ERR_OUT_OF_MEMORY;
        else if (!host && bytes) memcpy(dst, src, bytes);
        host = NULL;
    }
    if (host) esft__release(a, host);
    if (s == ESFT_OK) *out = dst;
    return s;
}

/* Moves an object's two mirrored blocks of n floats (x, y: the layer's params
   and grads, the optimizer's m and v) from *memory's space to b's (host memory
   from a when b's memory is the host's); *memory then names b, or NULL. On
   failure nothing changes. */
static esft_status esft__move_pair(const esft_allocator *a, const esft_backend **memory, const esft_backend *b,
                                   float **x, float **y, size_t n, const char *what, esft_error *err)
{
    const esft_backend *to = b->alloc == esft__cpu_alloc ? NULL : b;
    void *nx = NULL, *ny = NULL;
    esft_status s;
    if (to && (!b->alloc || !b->free || !b->upload || !b->download))
        return esft__fail(err, ESFT_ERR_UNSUPPORTED, "backend '%s' lacks memory entries", b->name);
    s = esft__block_move(a, *memory, to, *x, n * sizeof(float), &nx);
    if (s == ESFT_OK) s = esft__block_move(a, *memory, to, *y, n * sizeof(float), &ny);
    if (s != ESFT_OK) {
        esft__block_release(a, to, nx);
        return esft__fail(err, s, "moving %s of %lu floats to backend '%s'", what, (unsigned long)n, b->name);
    }
    esft__block_release(a, *memory, *x);
    esft__block_release(a, *memory, *y);
    *x = ESFT__CAST(float *, nx);
    *y = ESFT__CAST(float *, ny);
    *memory = to;
    return ESFT_OK;
}

ESFTDEF esft_status esft_moe_set_backend(esft_moe *m, const esft_backend *b, const esft_moe_weights *frozen,
                                         esft_error *err)
{
    esft_status s;
    if (!m || !m->slot) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "layer not initialised");
    if ((s = esft_backend_check(b, err)) != ESFT_OK) return s;
    if (b->alloc != esft__cpu_alloc && !frozen)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "backend '%s' needs the frozen weights in its memory",
                          b->name);
    if (frozen && (s = esft__moe_check_weights(&m->cfg, frozen, err)) != ESFT_OK) return s;
    s = esft__move_pair(&m->allocator, &m->memory, b, &m->params, &m->grads, m->n_params,
                        "the trainable block and gradients", err);
    if (s != ESFT_OK) return s;
    m->backend = b;
    if (frozen) m->frozen = *frozen;
    esft__moe_set_views(m);
    return ESFT_OK;
}

ESFTDEF size_t esft_moe_grad_bytes(const esft_moe *m) { return m ? m->n_params * sizeof(float) : 0; }

/* Expert e's three matrices, trainable copy or frozen; grads NULL when frozen. */
static void esft__moe_expert(const esft_moe *m, int e, const float **w, float **g)
{
    size_t fd = (size_t)m->cfg.d_expert * (size_t)m->cfg.d_model;
    int s = m->slot[e], i;
    for (i = 0; i < 3; i++) {
        if (s >= 0) {
            w[i] = m->params + ((size_t)s * 3 + (size_t)i) * fd;
            g[i] = m->grads + ((size_t)s * 3 + (size_t)i) * fd;
        } else {
            const float *base = i == 0 ? m->frozen.gate : i == 1 ? m->frozen.up : m->frozen.down;
            w[i] = base + (size_t)e * fd;
            g[i] = NULL;
        }
    }
}

ESFTDEF esft_status esft_moe_expert_weights(const esft_moe *m, int e, const float **gate,
                                            const float **up, const float **down, esft_error *err)
{
    const float *w[3];
    float *g[3];
    if (!m || !m->slot || !gate || !up || !down)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "layer or output is NULL");
    if (e < 0 || e >= m->cfg.route.n_experts)
        return esft__fail(err, ESFT_ERR_RANGE, "expert %d outside [0, %d)", e, m->cfg.route.n_experts);
    esft__moe_expert(m, e, w, g);
    *gate = w[0];
    *up = w[1];
    *down = w[2];
    return ESFT_OK;
}

/* The workspace starts with a header that says which forward filled it (the
   public wrapper writes it through the backend's upload, so it works on device
   memory too): the regions' places depend on T, and a backward of another T
   would read the saved ids and permutation from the wrong places. */
#define ESFT__MOE_WS_MAGIC 0x4553464d /* "ESFM" */
typedef struct esft__moe_ws_stamp {
    int32_t magic, T, D, E, K, F, FS; /* magic = 0: no successful forward */
} esft__moe_ws_stamp;

/* The workspace's regions as pointers (esft_moe_workspace_layout says what each holds). */
typedef esft_moe_workspace_view esft__moe_ws;

/* Reserves count * elem bytes at *off (64-aligned) and returns where they start.
   *ok drops to 0 on overflow. */
static size_t esft__carve(size_t *off, size_t count, size_t elem, int *ok)
{
    size_t start = (*off + 63) & ~(size_t)63, bytes;
    if (!esft__product_fits(count, elem) || start < *off) { *ok = 0; return 0; }
    bytes = count * elem;
    if (start + bytes < start) { *ok = 0; return 0; }
    *off = start + bytes;
    return start;
}

static int esft__moe_n_seq(const esft_moe_config *c, int T)
{
    if (c->aux_mode == ESFT_AUX_SEQUENCE && c->aux_seq_len > 0) return T / c->aux_seq_len + 1;
    return 1;
}

/* The layout of cfg's workspace for T tokens (cfg validated). 0 on overflow. */
static int esft__moe_ws_layout(esft_moe_workspace_layout *w, const esft_moe_config *c, int T)
{
    size_t off = ESFT_MOE_WS_HEADER, t = (size_t)T, E = (size_t)c->route.n_experts, K = (size_t)c->route.top_k;
    size_t D = (size_t)c->d_model, F = (size_t)c->d_expert, FS = (size_t)c->d_shared;
    size_t G = (size_t)(c->route.n_group > 0 ? c->route.n_group : 1), f = sizeof(float), i = sizeof(int32_t);
    size_t tk = t * K; /* T, K are ints: no overflow in size_t */
    int ok = esft__product_fits(tk, D) && esft__product_fits(tk, F) && esft__product_fits(t, FS);
    if (!ok) return 0;
    w->probs = esft__carve(&off, t * E, f, &ok);
    w->weights = esft__carve(&off, tk, f, &ok);
    w->ids = esft__carve(&off, tk, i, &ok);
    w->perm = esft__carve(&off, tk, i, &ok);
    w->pos = esft__carve(&off, tk, i, &ok);
    w->offsets = esft__carve(&off, E + 1, i, &ok);
    w->xg = esft__carve(&off, tk * D, f, &ok);
    w->g = esft__carve(&off, tk * F, f, &ok);
    w->u = esft__carve(&off, tk * F, f, &ok);
    w->o = esft__carve(&off, tk * D, f, &ok);
    w->a = esft__carve(&off, tk * F, f, &ok);
    w->b = esft__carve(&off, tk * F, f, &ok);
    w->d = esft__carve(&off, tk * D, f, &ok);
    w->gs = esft__carve(&off, t * FS, f, &ok);
    w->us = esft__carve(&off, t * FS, f, &ok);
    w->as = esft__carve(&off, t * FS, f, &ok);
    w->bs = esft__carve(&off, t * FS, f, &ok);
    w->so = esft__carve(&off, c->shared_gated ? t * D : 0, f, &ok);
    w->sig = esft__carve(&off, c->shared_gated ? t : 0, f, &ok);
    w->dys = esft__carve(&off, c->shared_gated ? t * D : 0, f, &ok);
    w->dz = esft__carve(&off, c->shared_gated ? t : 0, f, &ok);
    w->logits = esft__carve(&off, t * E, f, &ok);
    w->dw = esft__carve(&off, tk, f, &ok);
    w->aux_coef = esft__carve(&off, (size_t)esft__moe_n_seq(c, T) * E, f, &ok);
    w->aux_offsets = esft__carve(&off, E + 1, i, &ok);
    w->route_tmp = esft__carve(&off, 3 * E + 2 * G, f, &ok);
    w->end = off;
    w->bytes = off + 64; /* alignment slack */
    return ok && w->bytes > off;
}

ESFTDEF esft_status esft_moe_workspace_regions(const esft_moe_config *c, int T, esft_moe_workspace_layout *out,
                                               esft_error *err)
{
    esft_status s = esft_moe_config_validate(c, err);
    if (s != ESFT_OK) return s;
    if (!out) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "layout is NULL");
    if (T < 0) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "T = %d < 0", T);
    if ((double)T * c->route.top_k > 2147483647.0)
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "T * K exceeds 2^31 routing slots");
    if (!esft__moe_ws_layout(out, c, T))
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "workspace of %d tokens overflows size_t", T);
    return ESFT_OK;
}

ESFTDEF esft_status esft_moe_workspace_size(const esft_moe_config *c, int T, size_t *bytes,
                                            esft_error *err)
{
    esft_moe_workspace_layout w;
    esft_status s;
    if (!bytes) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "bytes is NULL");
    if ((s = esft_moe_workspace_regions(c, T, &w, err)) != ESFT_OK) return s;
    *bytes = w.bytes;
    return ESFT_OK;
}

/* The workspace's base: the pointer the caller gave, aligned up to 64 bytes
   (the size query reserves the slack). The header is there. */
static char *esft__moe_ws_header(void *workspace)
{
    uintptr_t u = (uintptr_t)workspace;
    return ESFT__CAST(char *, workspace) + ((64 - (u & 63)) & 63);
}

/* The view of a workspace whose layout L has been computed. */
static void esft__moe_ws_view(esft__moe_ws *w, const esft_moe_workspace_layout *Lp, void *workspace)
{
    esft_moe_workspace_layout L = *Lp;
    char *p = esft__moe_ws_header(workspace);
    w->header = p;
#define ESFT__WS_REGION(name, type) w->name = ESFT__CAST(type *, (void *)(p + L.name))
    ESFT__WS_REGION(probs, float); ESFT__WS_REGION(weights, float); ESFT__WS_REGION(ids, int32_t);
    ESFT__WS_REGION(perm, int32_t); ESFT__WS_REGION(pos, int32_t); ESFT__WS_REGION(offsets, int32_t);
    ESFT__WS_REGION(xg, float); ESFT__WS_REGION(g, float); ESFT__WS_REGION(u, float);
    ESFT__WS_REGION(o, float); ESFT__WS_REGION(a, float); ESFT__WS_REGION(b, float);
    ESFT__WS_REGION(d, float); ESFT__WS_REGION(gs, float); ESFT__WS_REGION(us, float);
    ESFT__WS_REGION(as, float); ESFT__WS_REGION(bs, float); ESFT__WS_REGION(so, float);
    ESFT__WS_REGION(sig, float); ESFT__WS_REGION(dys, float); ESFT__WS_REGION(dz, float);
    ESFT__WS_REGION(logits, float); ESFT__WS_REGION(dw, float); ESFT__WS_REGION(aux_coef, float);
    ESFT__WS_REGION(aux_offsets, int32_t); ESFT__WS_REGION(route_tmp, float);
#undef ESFT__WS_REGION
}

static void esft__moe_ws_at(esft__moe_ws *w, const esft_moe_config *c, int T, void *workspace)
{
    esft_moe_workspace_layout L;
    int ok = esft__moe_ws_layout(&L, c, T);
    ESFT_ASSERT(ok);
    (void)ok;
    esft__moe_ws_view(w, &L, workspace);
}

ESFTDEF esft_status esft_moe_workspace_view_at(const esft_moe_config *c, int T, void *workspace,
                                               esft_moe_workspace_view *out, esft_error *err)
{
    esft_moe_workspace_layout L;
    esft_status s;
    if (!out || !workspace) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "view or workspace is NULL");
    if ((s = esft_moe_workspace_regions(c, T, &L, err)) != ESFT_OK) return s;
    esft__moe_ws_view(out, &L, workspace);
    return ESFT_OK;
}

/* An output of finite inputs that came out NaN or Inf: a weight is NaN or Inf,
   or the values overflowed (the SwiGLU's u * silu(g) passes FLT_MAX from
   finite g, u). ESFT_ERR_NUMERIC naming the first bad element and why. */
static esft_status esft__moe_check_output(const float *a, size_t n, const char *what, int D, esft_error *err)
{
    esft_error where;
    if (esft__check_finite(a, n, what, (size_t)D, &where) == ESFT_OK) return ESFT_OK;
    return esft__fail(err, ESFT_ERR_NUMERIC, "%s, from finite inputs: a weight is NaN or Inf, or the layer overflowed",
                      where.message);
}

static float esft__sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

/* act = silu(g) * u over n floats. */
static void esft__swiglu_forward(float *act, const float *g, const float *u, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) act[i] = g[i] * esft__sigmoidf(g[i]) * u[i];
}

/* From dact (in b) and the saved g, u: b <- dg, a <- du (a's old content is
   not read). dg = dact * u * silu'(g), du = dact * silu(g). */
static void esft__swiglu_backward(float *a, float *b, const float *g, const float *u, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        float s = esft__sigmoidf(g[i]), silu = g[i] * s, da = b[i];
        b[i] = da * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
        a[i] = da * silu;
    }
}

/* The same over rows x cols, rows shared among nt threads (the shared block). */
static void esft__swiglu_forward_rows(float *act, const float *g, const float *u, int rows, int cols, int nt)
{
    int r;
    (void)nt;
    ESFT__MOE_FOR_STATIC(nt)
    for (r = 0; r < rows; r++) {
        size_t o = (size_t)r * cols;
        esft__swiglu_forward(act + o, g + o, u + o, (size_t)cols);
    }
}

static void esft__swiglu_backward_rows(float *a, float *b, const float *g, const float *u, int rows, int cols,
                                       int nt)
{
    int r;
    (void)nt;
    ESFT__MOE_FOR_STATIC(nt)
    for (r = 0; r < rows; r++) {
        size_t o = (size_t)r * cols;
        esft__swiglu_backward(a + o, b + o, g + o, u + o, (size_t)cols);
    }
}

/* The auxiliary loss and its gradient coefficients dL/dp per (sequence, expert). */
static float esft__moe_aux_forward(esft__moe_ws *w, const esft_moe_config *c, int T)
{
    int E = c->route.n_experts, K = c->route.top_k, S, n_seq, s, e;
    double loss = 0.0, scale;
    if (c->aux_alpha == 0.0f || T == 0) return 0.0f;
    S = c->aux_mode == ESFT_AUX_SEQUENCE ? c->aux_seq_len : T;
    n_seq = T / S;
    scale = (double)c->aux_alpha * E / n_seq;
    for (s = 0; s < n_seq; s++) {
        float *coef = w->aux_coef + (size_t)s * E; /* f_e first, then scale f_e / S */
        esft__count_slots(w->aux_offsets, w->ids + (size_t)s * S * K, S * K, E);
        loss += scale * esft__balance(coef, w->probs + (size_t)s * S * E, w->aux_offsets, S, E, K);
        for (e = 0; e < E; e++) coef[e] = (float)(scale * coef[e] / S);
    }
    return (float)loss;
}

/* Routed experts: for each expert, its rows of xg through gate/up, SwiGLU, down. */
static void esft__moe_experts_forward(const esft_moe *m, esft__moe_ws *w, int nt)
{
    const esft_moe_config *c = &m->cfg;
    int D = c->d_model, F = c->d_expert, E = c->route.n_experts, e;
    (void)nt;
    ESFT__MOE_FOR_DYNAMIC(nt)
    for (e = 0; e < E; e++) {
        int r0 = w->offsets[e], n = w->offsets[e + 1] - r0;
        const float *W[3];
        float *G[3];
        size_t rf = (size_t)r0 * F, rd = (size_t)r0 * D;
        if (n == 0) continue;
        esft__moe_expert(m, e, W, G);
        esft__sgemm(0, 1, n, F, D, 1.0f, w->xg + rd, D, W[0], D, 0.0f, w->g + rf, F);
        esft__sgemm(0, 1, n, F, D, 1.0f, w->xg + rd, D, W[1], D, 0.0f, w->u + rf, F);
        esft__swiglu_forward(w->a + rf, w->g + rf, w->u + rf, (size_t)n * F);
        esft__sgemm(0, 1, n, D, F, 1.0f, w->a + rf, F, W[2], F, 0.0f, w->o + rd, D);
    }
}

static const float *esft__moe_router_w(const esft_moe *m) { return m->router ? m->router : m->frozen.router; }
static const float *esft__moe_shared_w(const esft_moe *m, int i)
{
    if (i == 0) return m->shared_gate ? m->shared_gate : m->frozen.shared_gate;
    if (i == 1) return m->shared_up ? m->shared_up : m->frozen.shared_up;
    if (i == 2) return m->shared_down ? m->shared_down : m->frozen.shared_down;
    return m->shared_router ? m->shared_router : m->frozen.shared_router;
}

/* The shared block's output into y: S(x), or sigmoid(x . w_s) S(x) when gated
   (S(x) and the gate saved for the backward). */
static void esft__moe_shared_forward(const esft_moe *m, esft__moe_ws *w, float *y, const float *x, int T,
                                     int nt)
{
    int D = m->cfg.d_model, FS = m->cfg.d_shared, t;
    float *out = m->cfg.shared_gated ? w->so : y;
    esft__sgemm(0, 1, T, FS, D, 1.0f, x, D, esft__moe_shared_w(m, 0), D, 0.0f, w->gs, FS);
    esft__sgemm(0, 1, T, FS, D, 1.0f, x, D, esft__moe_shared_w(m, 1), D, 0.0f, w->us, FS);
    esft__swiglu_forward_rows(w->as, w->gs, w->us, T, FS, nt);
    esft__sgemm(0, 1, T, D, FS, 1.0f, w->as, FS, esft__moe_shared_w(m, 2), FS, 0.0f, out, D);
    if (!m->cfg.shared_gated) return;
    esft__sgemm(0, 1, T, 1, D, 1.0f, x, D, esft__moe_shared_w(m, 3), D, 0.0f, w->sig, 1);
    ESFT__MOE_FOR_STATIC(nt)
    for (t = 0; t < T; t++) {
        float c = 1.0f / (1.0f + expf(-w->sig[t]));
        const float *s = w->so + (size_t)t * D;
        float *yt = y + (size_t)t * D;
        int d;
        w->sig[t] = c;
        for (d = 0; d < D; d++) yt[d] = c * s[d];
    }
}

static esft_status esft__moe_forward_cpu(void *context, const esft_moe *m, float *y, float *aux_loss,
                                         const float *x, void *workspace, int T, esft_error *err)
{
    const esft_moe_config *c = &m->cfg;
    int D = c->d_model, E = c->route.n_experts, K = c->route.top_k, FS = c->d_shared, t, r;
    int nt = esft__moe_threads(c, T);
    size_t i, te = (size_t)T * E;
    esft__moe_ws w;
    esft_status s = esft__check_finite(x, (size_t)T * D, "x", (size_t)D, err); /* the backend's own check */
    (void)context;
    if (s == ESFT_OK) s = esft__route_bias_check(&c->route, err); /* host memory on this backend */
    if (s != ESFT_OK) return s;
    esft__moe_ws_at(&w, c, T, workspace);
    esft__sgemm(0, 1, T, E, D, 1.0f, x, D, esft__moe_router_w(m), D, 0.0f, w.logits, E);
    if ((i = esft__first_nonfinite(w.logits, te)) < te)
        return esft__fail(err, ESFT_ERR_NUMERIC, "router logit of token %lu, expert %lu is not finite",
                          (unsigned long)(i / E), (unsigned long)(i % E));
    for (t = 0; t < T; t++)
        esft__route_token(&c->route, w.ids + (size_t)t * K, w.weights + (size_t)t * K,
                          w.probs + (size_t)t * E, w.logits + (size_t)t * E, w.route_tmp);
    esft__sort_slots(w.perm, w.pos, w.offsets, w.ids, T * K, E);
    ESFT__MOE_FOR_STATIC(nt)
    for (r = 0; r < T * K; r++)
        memcpy(w.xg + (size_t)r * D, x + (size_t)(w.perm[r] / K) * D, (size_t)D * sizeof(float));
    esft__moe_experts_forward(m, &w, nt);
    if (FS > 0) {
        esft__moe_shared_forward(m, &w, y, x, T, nt);
    } else {
        memset(y, 0, (size_t)T * D * sizeof(float));
    }
    /* combine in slot order per token: the same bits whatever the expert order */
    ESFT__MOE_FOR_STATIC(nt)
    for (t = 0; t < T; t++) {
        float *yt = y + (size_t)t * D;
        int j;
        for (j = 0; j < K; j++) {
            size_t slot = (size_t)t * K + j;
            const float *o = w.o + (size_t)w.pos[slot] * D;
            float wt = w.weights[slot];
            int d;
            for (d = 0; d < D; d++) yt[d] += wt * o[d];
        }
    }
    *aux_loss = esft__moe_aux_forward(&w, c, T);
    return esft__moe_check_output(y, (size_t)T * D, "y", D, err);
}

/* Routed experts backward. Fills w->dw (dL/d routing weight) and accumulates
   into dx and into the gradients of trainable experts. */
static void esft__moe_experts_backward(const esft_moe *m, esft__moe_ws *w, float *dx, const float *dy, int T,
                                       int nt)
{
    const esft_moe_config *c = &m->cfg;
    int D = c->d_model, F = c->d_expert, K = c->route.top_k, E = c->route.n_experts, e, t;
    (void)nt;
    ESFT__MOE_FOR_DYNAMIC(nt)
    for (e = 0; e < E; e++) {
        int r0 = w->offsets[e], n = w->offsets[e + 1] - r0, r, d;
        const float *W[3];
        float *G[3];
        size_t rf = (size_t)r0 * F, rd = (size_t)r0 * D;
        if (n == 0) continue;
        esft__moe_expert(m, e, W, G);
        for (r = r0; r < r0 + n; r++) { /* dO = w * dy; dw = dy . o */
            int slot = w->perm[r];
            const float *g = dy + (size_t)(slot / K) * D, *o = w->o + (size_t)r * D;
            float *dO = w->d + (size_t)r * D, wt = w->weights[slot], dot = 0.0f;
            for (d = 0; d < D; d++) { dO[d] = wt * g[d]; dot += g[d] * o[d]; }
            w->dw[slot] = dot;
        }
        esft__sgemm(0, 0, n, F, D, 1.0f, w->d + rd, D, W[2], F, 0.0f, w->b + rf, F);
        if (G[2]) {
            esft__swiglu_forward(w->a + rf, w->g + rf, w->u + rf, (size_t)n * F);
            esft__sgemm(1, 0, D, F, n, 1.0f, w->d + rd, D, w->a + rf, F, 1.0f, G[2], F);
        }
        esft__swiglu_backward(w->a + rf, w->b + rf, w->g + rf, w->u + rf, (size_t)n * F);
        if (G[0]) {
            esft__sgemm(1, 0, F, D, n, 1.0f, w->b + rf, F, w->xg + rd, D, 1.0f, G[0], D);
            esft__sgemm(1, 0, F, D, n, 1.0f, w->a + rf, F, w->xg + rd, D, 1.0f, G[1], D);
        }
        esft__sgemm(0, 0, n, D, F, 1.0f, w->b + rf, F, W[0], D, 0.0f, w->d + rd, D);
        esft__sgemm(0, 0, n, D, F, 1.0f, w->a + rf, F, W[1], D, 1.0f, w->d + rd, D);
    }
    ESFT__MOE_FOR_STATIC(nt)
    for (t = 0; t < T; t++) { /* scatter in slot order: deterministic */
        float *g = dx + (size_t)t * D;
        int j, d;
        for (j = 0; j < K; j++) {
            const float *src = w->d + (size_t)w->pos[(size_t)t * K + j] * D;
            for (d = 0; d < D; d++) g[d] += src[d];
        }
    }
}

/* The gate of a gated shared block: with z = x . w_s, c = sigmoid(z) and
   y = c S(x), dL/dz = (dy . S(x)) c (1 - c), into dx (+= dz w_s) and, by flag,
   the shared router's gradient (+= sum_t dz_t x_t). Returns the gradient that
   reaches S(x): c dy, in w->dys. */
static const float *esft__moe_shared_gate_backward(const esft_moe *m, esft__moe_ws *w, float *dx,
                                                   const float *dy, const float *x, int T, int nt)
{
    int D = m->cfg.d_model, t;
    const float *ws = esft__moe_shared_w(m, 3);
    (void)nt;
    ESFT__MOE_FOR_STATIC(nt)
    for (t = 0; t < T; t++) {
        const float *g = dy + (size_t)t * D, *s = w->so + (size_t)t * D;
        float *gS = w->dys + (size_t)t * D, *dxt = dx + (size_t)t * D, c = w->sig[t], dot = 0.0f, dz;
        int d;
        for (d = 0; d < D; d++) { dot += g[d] * s[d]; gS[d] = c * g[d]; }
        dz = dot * c * (1.0f - c);
        for (d = 0; d < D; d++) dxt[d] += dz * ws[d];
        w->dz[t] = dz;
    }
    if (m->d_shared_router) esft__sgemm(1, 0, 1, D, T, 1.0f, w->dz, 1, x, D, 1.0f, m->d_shared_router, D);
    return w->dys;
}

/* Shared SwiGLU block backward: accumulates into dx and, by flag, its grads. */
static void esft__moe_shared_backward(const esft_moe *m, esft__moe_ws *w, float *dx, const float *dy,
                                      const float *x, int T, int nt)
{
    int D = m->cfg.d_model, FS = m->cfg.d_shared;
    if (FS == 0) return;
    if (m->cfg.shared_gated) dy = esft__moe_shared_gate_backward(m, w, dx, dy, x, T, nt);
    esft__sgemm(0, 0, T, FS, D, 1.0f, dy, D, esft__moe_shared_w(m, 2), FS, 0.0f, w->bs, FS);
    if (m->d_shared_down) {
        esft__swiglu_forward_rows(w->as, w->gs, w->us, T, FS, nt);
        esft__sgemm(1, 0, D, FS, T, 1.0f, dy, D, w->as, FS, 1.0f, m->d_shared_down, FS);
    }
    esft__swiglu_backward_rows(w->as, w->bs, w->gs, w->us, T, FS, nt);
    if (m->d_shared_gate) {
        esft__sgemm(1, 0, FS, D, T, 1.0f, w->bs, FS, x, D, 1.0f, m->d_shared_gate, D);
        esft__sgemm(1, 0, FS, D, T, 1.0f, w->as, FS, x, D, 1.0f, m->d_shared_up, D);
    }
    esft__sgemm(0, 0, T, D, FS, 1.0f, w->bs, FS, esft__moe_shared_w(m, 0), D, 1.0f, dx, D);
    esft__sgemm(0, 0, T, D, FS, 1.0f, w->as, FS, esft__moe_shared_w(m, 1), D, 1.0f, dx, D);
}

static esft_status esft__moe_backward_cpu(void *context, const esft_moe *m, float *dx, const float *dy,
                                          const float *x, void *workspace, int T, esft_error *err)
{
    const esft_moe_config *c = &m->cfg;
    int D = c->d_model, E = c->route.n_experts, K = c->route.top_k, t;
    int S = c->aux_mode == ESFT_AUX_SEQUENCE ? c->aux_seq_len : T, nt = esft__moe_threads(c, T);
    esft__moe_ws w;
    esft_status s = esft__check_finite(dy, (size_t)T * D, "dy", (size_t)D, err); /* the backend's own check */
    (void)context;
    if (s != ESFT_OK) return s;
    esft__moe_ws_at(&w, c, T, workspace);
    esft__moe_experts_backward(m, &w, dx, dy, T, nt);
    esft__moe_shared_backward(m, &w, dx, dy, x, T, nt);
    for (t = 0; t < T; t++) {
        const float *aux = c->aux_alpha > 0.0f ? w.aux_coef + (size_t)(t / S) * E : NULL;
        esft__route_backward_token(&c->route, w.logits + (size_t)t * E, w.probs + (size_t)t * E,
                                   w.ids + (size_t)t * K, w.dw + (size_t)t * K, aux, E);
    }
    esft__sgemm(0, 0, T, D, E, 1.0f, w.logits, E, esft__moe_router_w(m), D, 1.0f, dx, D);
    if (m->d_router) esft__sgemm(1, 0, E, D, T, 1.0f, w.logits, E, x, D, 1.0f, m->d_router, D);
    /* dx goes on to the layers below; the gradient block is checked by the
       optimizer step (esft_adamw_step refuses a non-finite gradient) */
    return esft__moe_check_output(dx, (size_t)T * D, "dx", D, err);
}

/* Checks shared by forward and backward, before anything is written. The
   arrays are the backend's memory: only their presence is checked here. */
static esft_status esft__moe_check_call(const esft_moe *m, const void *out, const float *in,
                                        const float *x, const char *in_name, void *workspace,
                                        size_t workspace_bytes, int T, esft_error *err)
{
    size_t need = 0;
    esft_status s;
    if (!m || !m->slot) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "layer not initialised");
    s = esft_backend_check(m->backend, err);
    if (s == ESFT_OK) s = esft_moe_workspace_size(&m->cfg, T, &need, err);
    if (s != ESFT_OK) return s;
    if (T == 0) return ESFT_OK;
    if (!out || !in || !x || !workspace)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "output, %s, x or workspace is NULL", in_name);
    if (workspace_bytes < need)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "workspace of %lu bytes < %lu needed for T = %d",
                          (unsigned long)workspace_bytes, (unsigned long)need, T);
    if (m->cfg.aux_alpha > 0.0f && m->cfg.aux_mode == ESFT_AUX_SEQUENCE && T % m->cfg.aux_seq_len)
        return esft__fail(err, ESFT_ERR_SHAPE, "T = %d is not a multiple of aux_seq_len %d", T,
                          m->cfg.aux_seq_len);
    return ESFT_OK;
}

/* The stamp a forward of T tokens leaves (T < 0: none, before the op runs, so
   that a failed forward leaves nothing for a backward). */
static esft__moe_ws_stamp esft__moe_stamp_of(const esft_moe_config *c, int T)
{
    esft__moe_ws_stamp st;
    memset(&st, 0, sizeof st);
    if (T < 0) return st;
    st.magic = ESFT__MOE_WS_MAGIC;
    st.T = T;
    st.D = c->d_model;
    st.E = c->route.n_experts;
    st.K = c->route.top_k;
    st.F = c->d_expert;
    st.FS = c->d_shared;
    return st;
}

static esft_status esft__moe_stamp_write(const esft_moe *m, void *workspace, int T, esft_error *err)
{
    esft__moe_ws_stamp st = esft__moe_stamp_of(&m->cfg, T);
    if (!m->backend->upload) return esft__missing_op(m->backend, "upload", err);
    return m->backend->upload(m->backend->context, esft__moe_ws_header(workspace), &st, sizeof st);
}

/* Like PESC's saved->T: the backward must follow a successful forward of the
   same T and shapes on this workspace. */
static esft_status esft__moe_stamp_check(const esft_moe *m, void *workspace, int T, esft_error *err)
{
    esft__moe_ws_stamp want = esft__moe_stamp_of(&m->cfg, T), got;
    esft_status s;
    if (!m->backend->download) return esft__missing_op(m->backend, "download", err);
    s = m->backend->download(m->backend->context, &got, esft__moe_ws_header(workspace), sizeof got);
    if (s != ESFT_OK) return esft__fail(err, s, "cannot read the workspace header");
    if (got.magic != ESFT__MOE_WS_MAGIC)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT,
                          "backward of %d tokens, but the workspace holds no forward (none ran, or it failed)", T);
    if (got.T != T)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "backward of %d tokens, the last forward had %d", T,
                          (int)got.T);
    if (memcmp(&got, &want, sizeof got) != 0)
        return esft__fail(err, ESFT_ERR_SHAPE, "the workspace holds a forward of another layer shape");
    return ESFT_OK;
}

ESFTDEF esft_status esft_moe_forward(const esft_moe *m, float *y, float *aux_loss, const float *x,
                                     void *workspace, size_t workspace_bytes, int T, esft_error *err)
{
    float aux = 0.0f;
    esft_status s = esft__moe_check_call(m, y, x, x, "x", workspace, workspace_bytes, T, err);
    if (s != ESFT_OK || T == 0) {
        if (s == ESFT_OK && aux_loss) *aux_loss = 0.0f;
        return s;
    }
    if (!m->backend->moe_forward) return esft__missing_op(m->backend, "moe_forward", err);
    if ((s = esft__moe_stamp_write(m, workspace, -1, err)) != ESFT_OK) return s;
    s = m->backend->moe_forward(m->backend->context, m, y, &aux, x, workspace, T, err);
    if (s == ESFT_OK) s = esft__moe_stamp_write(m, workspace, T, err);
    if (s == ESFT_OK && aux_loss) *aux_loss = aux;
    return s;
}

ESFTDEF esft_status esft_moe_backward(const esft_moe *m, float *dx, const float *dy, const float *x,
                                      void *workspace, size_t workspace_bytes, int T, esft_error *err)
{
    esft_status s = esft__moe_check_call(m, dx, dy, x, "dy", workspace, workspace_bytes, T, err);
    if (s != ESFT_OK || T == 0) return s;
    if (!m->backend->moe_backward) return esft__missing_op(m->backend, "moe_backward", err);
    if ((s = esft__moe_stamp_check(m, workspace, T, err)) != ESFT_OK) return s;
    return m->backend->moe_backward(m->backend->context, m, dx, dy, x, workspace, T, err);
}

/* ===================================================================== */
/* 10. adapters                                                          */
/* ===================================================================== */

/* splitmix64: a counter-based generator, so a value depends only on (seed, index)
   and the Python oracle can reproduce it bit for bit. */
static uint64_t esft__adapter_mix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* n floats uniform in [-bound, bound): value i uses mix(seed + i); 24 random bits
   make u in [0, 1) exactly, then (2u - 1) * bound in float. */
static void esft__adapter_uniform(float *out, size_t n, uint64_t seed, size_t first, float bound)
{
    size_t i;
    for (i = 0; i < n; i++) {
        float r = (float)(esft__adapter_mix(seed + (uint64_t)(first + i)) >> 40) * (1.0f / 16777216.0f);
        out[i] = (2.0f * r - 1.0f) * bound;
    }
}

static float esft__gelu(float h) { return 0.5f * h * (1.0f + erff(h * 0.70710678118654752f)); }

/* Threads for an elementwise pass over `work` values: below ~1M one thread (a
   team start costs more than the pass). Every split below gives each thread
   its own rows, so results have the same bits for any thread count. */
static int esft__pesc_threads(double work)
{
    return work < 1048576.0 ? 1 : esft_get_num_threads();
}

/* d gelu / dh = Phi(h) + h phi(h). */
static float esft__gelu_grad(float h)
{
    return 0.5f * (1.0f + erff(h * 0.70710678118654752f)) +
           h * 0.39894228040143268f * expf(-0.5f * h * h);
}

ESFTDEF esft_adapter_config esft_adapter_config_lora(int d_in, int d_out, int rank, float alpha)
{
    esft_adapter_config c;
    c.d_in = d_in;
    c.d_out = d_out;
    c.rank = rank;
    c.activation = ESFT_ACT_IDENTITY;
    c.scale = rank > 0 ? alpha / (float)rank : 0.0f;
    return c;
}

/* Dimensions reach esft__sgemm as int, and products as size_t: both must fit. */
static esft_status esft__adapter_check_dims(int T, int a, int b, esft_error *err)
{
    if (T < 0) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "T = %d < 0", T);
    if (!esft__product_fits((size_t)T, (size_t)a) || !esft__product_fits((size_t)T * (size_t)a, sizeof(float)) ||
        !esft__product_fits((size_t)T, (size_t)b) || !esft__product_fits((size_t)T * (size_t)b, sizeof(float)))
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "T = %d tokens: sizes overflow", T);
    return ESFT_OK;
}

ESFTDEF esft_status esft_adapter_config_validate(const esft_adapter_config *c, esft_error *err)
{
    if (!c) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "adapter config is NULL");
    if (c->d_in < 1 || c->d_out < 1)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "widths %d -> %d must be >= 1", c->d_in, c->d_out);
    if (c->rank < 1) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "adapter rank %d < 1", c->rank);
    if (c->activation != ESFT_ACT_IDENTITY && c->activation != ESFT_ACT_GELU)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "unknown activation %d", (int)c->activation);
    if (!isfinite(c->scale)) return esft__fail(err, ESFT_ERR_NUMERIC, "adapter scale is not finite");
    if (!esft__product_fits((size_t)c->rank, (size_t)c->d_in) || !esft__product_fits((size_t)c->rank, (size_t)c->d_out))
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "adapter weights overflow size_t");
    return ESFT_OK;
}

ESFTDEF esft_status esft_adapter_init_weights(const esft_adapter_config *c, float *w_down, float *w_up,
                                              uint64_t seed, esft_error *err)
{
    esft_status s = esft_adapter_config_validate(c, err);
    if (s != ESFT_OK) return s;
    if (!w_down || !w_up) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "weights are NULL");
    esft__adapter_uniform(w_down, (size_t)c->rank * c->d_in, seed, 0, (float)(1.0 / sqrt((double)c->d_in)));
    memset(w_up, 0, (size_t)c->d_out * c->rank * sizeof(float));
    return ESFT_OK;
}

/* The primitive, unchecked (the PESC layer calls it on gathered rows).
   work (T, R) receives the scaled activations. y = beta y + A(x): beta 1 for the
   public accumulate, 0 for the PESC layer's scratch rows (no memset needed). */
static void esft__adapter_forward_cpu(const esft_adapter_config *c, float *y, float *hidden,
                                      const float *x, const float *w_down, const float *w_up,
                                      const float *row_scale, float *work, float beta, int T)
{
    int t, R = c->rank, nt = esft__pesc_threads((double)T * R);
    if (T == 0) return;
    (void)nt; /* unused without OpenMP */
    esft__sgemm(0, 1, T, R, c->d_in, 1.0f, x, c->d_in, w_down, c->d_in, 0.0f, hidden, R);
    ESFT__MOE_FOR_STATIC(nt) /* erff dominates this pass: rows split over threads */
    for (t = 0; t < T; t++) {
        const float *h = hidden + (size_t)t * R;
        float *g = work + (size_t)t * R;
        float k = c->scale * (row_scale ? row_scale[t] : 1.0f);
        int r;
        if (c->activation == ESFT_ACT_GELU) for (r = 0; r < R; r++) g[r] = k * esft__gelu(h[r]);
        else for (r = 0; r < R; r++) g[r] = k * h[r];
    }
    esft__sgemm(0, 1, T, c->d_out, R, 1.0f, work, R, w_up, R, beta, y, c->d_out);
}

/* Backward, unchecked. With g = act(h), k_t = s * row_scale[t], z = dy W_up (T, R):
   drow_scale[t] += s * <z_t, g_t>, dW_up += dy^T (k g), dh = k z * act'(h),
   dW_down += dh^T x, dx += dh W_down. */
static void esft__adapter_backward_cpu(const esft_adapter_config *c, float *dx, float *dw_down,
                                       float *dw_up, float *drow_scale, const float *dy,
                                       const float *hidden, const float *x, const float *w_down,
                                       const float *w_up, const float *row_scale, float *work, int T)
{
    int t, R = c->rank, nt = esft__pesc_threads((double)T * R);
    int gelu = c->activation == ESFT_ACT_GELU;
    float *z = work, *kg = work + (size_t)T * R;
    if (T == 0) return;
    (void)nt; /* unused without OpenMP */
    esft__sgemm(0, 0, T, R, c->d_out, 1.0f, dy, c->d_out, w_up, R, 0.0f, z, R);
    ESFT__MOE_FOR_STATIC(nt) /* each row's dot and drow_scale[t] are its own */
    for (t = 0; t < T; t++) {
        const float *h = hidden + (size_t)t * R;
        float *zt = z + (size_t)t * R, *kgt = kg + (size_t)t * R;
        float k = c->scale * (row_scale ? row_scale[t] : 1.0f);
        double dot = 0.0;
        int r;
        for (r = 0; r < R; r++) {
            float g = gelu ? esft__gelu(h[r]) : h[r];
            dot += (double)zt[r] * g;
            kgt[r] = k * g;
            zt[r] *= k * (gelu ? esft__gelu_grad(h[r]) : 1.0f); /* z becomes dh */
        }
        if (drow_scale) drow_scale[t] += c->scale * (float)dot;
    }
    if (dw_up) esft__sgemm(1, 0, c->d_out, R, T, 1.0f, dy, c->d_out, kg, R, 1.0f, dw_up, R);
    if (dw_down) esft__sgemm(1, 0, R, c->d_in, T, 1.0f, z, R, x, c->d_in, 1.0f, dw_down, c->d_in);
    if (dx) esft__sgemm(0, 0, T, c->d_in, R, 1.0f, z, R, w_down, c->d_in, 1.0f, dx, c->d_in);
}

ESFTDEF esft_status esft_adapter_forward(const esft_adapter_config *c, float *y, float *hidden,
                                         const float *x, const float *w_down, const float *w_up,
                                         const float *row_scale, float *work, int T, esft_error *err)
{
    esft_status s = esft_adapter_config_validate(c, err);
    if (s == ESFT_OK) s = esft__adapter_check_dims(T, c->d_in > c->d_out ? c->d_in : c->d_out, 2 * c->rank, err);
    if (s != ESFT_OK) return s;
    if (T > 0 && (!y || !hidden || !x || !w_down || !w_up || !work))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "y, hidden, x, weights and work must not be NULL");
    esft__adapter_forward_cpu(c, y, hidden, x, w_down, w_up, row_scale, work, 1.0f, T);
    return ESFT_OK;
}

ESFTDEF esft_status esft_adapter_backward(const esft_adapter_config *c, float *dx, float *dw_down,
                                          float *dw_up, float *drow_scale, const float *dy,
                                          const float *hidden, const float *x, const float *w_down,
                                          const float *w_up, const float *row_scale, float *work,
                                          int T, esft_error *err)
{
    esft_status s = esft_adapter_config_validate(c, err);
    if (s == ESFT_OK) s = esft__adapter_check_dims(T, c->d_in > c->d_out ? c->d_in : c->d_out, 2 * c->rank, err);
    if (s != ESFT_OK) return s;
    if (T > 0 && (!dy || !hidden || !x || !w_down || !w_up || !work))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "dy, hidden, x, weights and work must not be NULL");
    esft__adapter_backward_cpu(c, dx, dw_down, dw_up, drow_scale, dy, hidden, x, w_down, w_up,
                               row_scale, work, T);
    return ESFT_OK;
}

/* ---- PESC layer ---- */

ESFTDEF esft_pesc_config esft_pesc_config_init(int d_model, int n_experts, int top_k, int rank)
{
    esft_pesc_config c;
    memset(&c, 0, sizeof c);
    c.d_model = d_model;
    c.n_experts = n_experts;
    c.top_k = top_k;
    c.rank = rank;
    c.scale = 0.25f;
    c.aux_alpha = 0.01f;
    c.dropout = 0.0f;
    c.dropout_seed = 0;
    return c;
}

ESFTDEF esft_pesc_config esft_pesc_config_camelidae(int d_model)
{
    return esft_pesc_config_init(d_model, 8, 2, 512);
}

/* The whole block, (E (1 + 2R)) D floats, is addressable in bytes (sizes >= 1). */
static int esft__pesc_block_fits(const esft_pesc_config *c)
{
    size_t per_expert;
    if (!esft__product_fits((size_t)c->rank, 2) || !esft__product_fits(2 * (size_t)c->rank + 1, (size_t)c->d_model))
        return 0;
    per_expert = (2 * (size_t)c->rank + 1) * (size_t)c->d_model;
    return esft__product_fits(per_expert, (size_t)c->n_experts) &&
           esft__product_fits(per_expert * (size_t)c->n_experts, sizeof(float));
}

ESFTDEF esft_status esft_pesc_config_validate(const esft_pesc_config *c, esft_error *err)
{
    if (!c) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "PESC config is NULL");
    if (c->d_model < 1) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "d_model %d < 1", c->d_model);
    if (c->n_experts < 1) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "n_experts %d < 1", c->n_experts);
    if (c->top_k < 1 || c->top_k > c->n_experts)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "top_k %d outside [1, %d experts]", c->top_k,
                          c->n_experts);
    if (c->rank < 1) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "adapter rank %d < 1", c->rank);
    if (!isfinite(c->scale)) return esft__fail(err, ESFT_ERR_NUMERIC, "adapter scale is not finite");
    if (!(c->aux_alpha >= 0.0f) || !isfinite(c->aux_alpha))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "aux_alpha must be finite and >= 0");
    if (!(c->dropout >= 0.0f && c->dropout < 1.0f))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "dropout %g outside [0, 1)", (double)c->dropout);
    if (!esft__pesc_block_fits(c))
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "PESC parameter count overflows size_t");
    return ESFT_OK;
}

ESFTDEF size_t esft_pesc_param_count(const esft_pesc_config *c)
{
    if (!c || c->d_model < 1 || c->n_experts < 1 || c->rank < 1 || !esft__pesc_block_fits(c)) return 0;
    return (size_t)c->n_experts * (size_t)c->d_model * (1 + 2 * (size_t)c->rank);
}

ESFTDEF size_t esft_pesc_tensor_offset(const esft_pesc_config *c, esft_pesc_tensor which, int expert)
{
    size_t D = (size_t)c->d_model, RD = (size_t)c->rank * D;
    size_t base = (size_t)c->n_experts * D + (size_t)expert * 2 * RD;
    if (which == ESFT_PESC_ROUTER) return 0;
    return which == ESFT_PESC_DOWN ? base : base + RD;
}

ESFTDEF esft_status esft_pesc_tensor_name(char *buf, size_t cap, int layer, esft_pesc_tensor which,
                                          int expert)
{
    /* the names are the Camelidae row of the family name table (checkpoints section) */
    esft_part part = which == ESFT_PESC_ROUTER ? ESFT_PART_ROUTER
                     : which == ESFT_PESC_DOWN ? ESFT_PART_ADAPTER_DOWN
                     : which == ESFT_PESC_UP   ? ESFT_PART_ADAPTER_UP
                                               : ESFT_PART_NONE;
    if (!buf || cap == 0 || part == ESFT_PART_NONE) return ESFT_ERR_INVALID_ARGUMENT;
    return esft_tensor_name_format(buf, cap, ESFT_FAMILY_CAMELIDAE, part, layer, expert);
}

ESFTDEF esft_status esft_pesc_init_weights(const esft_pesc_config *c, float *params, uint64_t seed,
                                           esft_error *err)
{
    size_t D, RD, e, drawn;
    float bound;
    esft_status s = esft_pesc_config_validate(c, err);
    if (s != ESFT_OK) return s;
    if (!params) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "params is NULL");
    D = (size_t)c->d_model;
    RD = (size_t)c->rank * D;
    bound = (float)(1.0 / sqrt((double)c->d_model));
    /* one stream: router, then expert 0's W_down, expert 1's W_down, ... */
    esft__adapter_uniform(params, (size_t)c->n_experts * D, seed, 0, bound);
    drawn = (size_t)c->n_experts * D;
    for (e = 0; e < (size_t)c->n_experts; e++) {
        esft__adapter_uniform(params + esft_pesc_tensor_offset(c, ESFT_PESC_DOWN, (int)e), RD, seed, drawn, bound);
        memset(params + esft_pesc_tensor_offset(c, ESFT_PESC_UP, (int)e), 0, RD * sizeof(float));
        drawn += RD;
    }
    return ESFT_OK;
}

/* The scratch inside saved->work for T tokens: the published view (its
   regions are described where esft_pesc_work_view is declared). */
typedef esft_pesc_work_view esft__pesc_work;

static size_t esft__pesc_work_floats(const esft_pesc_config *c, size_t T)
{
    return T * (2 * (size_t)c->d_model + 2 * (size_t)c->rank + (size_t)c->top_k + (size_t)c->n_experts + 2) +
           (size_t)c->n_experts;
}

static esft__pesc_work esft__pesc_work_split(const esft_pesc_config *c, float *base, size_t T)
{
    esft__pesc_work w;
    w.xg = base;
    w.yg = w.xg + T * (size_t)c->d_model;
    w.g = w.yg + T * (size_t)c->d_model;
    w.dw = w.g + 2 * T * (size_t)c->rank;
    w.dlogits = w.dw + T * (size_t)c->top_k;
    w.wg = w.dlogits + T * (size_t)c->n_experts;
    w.dwg = w.wg + T;
    w.coef = w.dwg + T;
    return w;
}

ESFTDEF esft_status esft_pesc_work_view_at(const esft_pesc_config *c, int T, float *work,
                                           esft_pesc_work_view *out, esft_error *err)
{
    esft_status st = esft_pesc_config_validate(c, err);
    if (st != ESFT_OK) return st;
    if (!out || !work) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "view or work is NULL");
    if (T < 0) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "T = %d < 0", T);
    *out = esft__pesc_work_split(c, work, (size_t)T);
    return ESFT_OK;
}

ESFTDEF void esft_pesc_saved_uninit(esft_pesc_saved *s)
{
    const esft_backend *b;
    if (!s || !s->backend) return;
    b = s->backend;
#define ESFT__PESC_FREE(field) if (s->field) b->free(b->context, s->field);
    ESFT__PESC_FREE(ids) ESFT__PESC_FREE(weights) ESFT__PESC_FREE(logits) ESFT__PESC_FREE(probs)
    ESFT__PESC_FREE(order) ESFT__PESC_FREE(offset) ESFT__PESC_FREE(hidden) ESFT__PESC_FREE(frac)
    ESFT__PESC_FREE(work)
#undef ESFT__PESC_FREE
    memset(s, 0, sizeof *s);
}

ESFTDEF esft_status esft_pesc_saved_init(esft_pesc_saved *s, const esft_pesc_config *c, int max_tokens,
                                         const esft_backend *backend, esft_error *err)
{
    esft_status st;
    size_t T, K, E, R, D;
    if (!s) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "saved is NULL");
    memset(s, 0, sizeof *s);
    if (!backend) backend = esft_backend_cpu();
    if ((st = esft_backend_check(backend, err)) != ESFT_OK) return st;
    if ((st = esft_pesc_config_validate(c, err)) != ESFT_OK) return st;
    if (max_tokens < 1) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "max_tokens %d < 1", max_tokens);
    T = (size_t)max_tokens; K = (size_t)c->top_k; E = (size_t)c->n_experts;
    R = (size_t)c->rank; D = (size_t)c->d_model;
    /* every buffer in bytes must fit, and GEMM dimensions (T*K rows, T*D) are int */
    if (!esft__product_fits(T * K, R) || !esft__product_fits(T * K * R, sizeof(float)) ||
        !esft__product_fits(T, 2 * D + 2 * R + K + E + 2) ||
        !esft__product_fits(T * (2 * D + 2 * R + K + E + 2) + E, sizeof(float)) ||
        T * K > 0x7fffffff || T * D > 0x7fffffff)
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "PESC buffers for %d tokens overflow", max_tokens);
    s->backend = backend;
    s->cfg = *c;
    s->max_tokens = max_tokens;
    st = ESFT_OK;
#define ESFT__PESC_ALLOC(field, type, n)                                                          \
    if (st == ESFT_OK) {                                                                          \
        void *p_ = NULL;                                                                          \
        if (backend->alloc(backend->context, (n) * sizeof(type), &p_) != ESFT_OK)                 \
            st = esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "PESC buffer " #field " of %lu bytes",   \
                            (unsigned long)((n) * sizeof(type)));                                 \
        s->field = ESFT__CAST(type *, p_);                                                        \
    }
    ESFT__PESC_ALLOC(ids, int32_t, T * K)
    ESFT__PESC_ALLOC(weights, float, T * K)
    ESFT__PESC_ALLOC(logits, float, T * E)
    ESFT__PESC_ALLOC(probs, float, T * E)
    ESFT__PESC_ALLOC(order, int32_t, T * K)
    ESFT__PESC_ALLOC(offset, int32_t, E + 1)
    ESFT__PESC_ALLOC(hidden, float, T * K * R)
    ESFT__PESC_ALLOC(frac, float, E)
    ESFT__PESC_ALLOC(work, float, esft__pesc_work_floats(c, T))
#undef ESFT__PESC_ALLOC
    if (st != ESFT_OK) esft_pesc_saved_uninit(s);
    return st;
}

/* 1 keeps column d of token t's input to expert e; a function of the seed, so
   backward recomputes the forward's mask instead of storing T*K*D bits. */
static int esft__pesc_keep(uint64_t seed, int e, int t, int d, uint32_t threshold)
{
    uint64_t key = esft__adapter_mix(seed ^ ((uint64_t)(uint32_t)e << 32 | (uint32_t)t));
    return (uint32_t)(esft__adapter_mix(key + (uint64_t)d) >> 32) >= threshold;
}

/* rows j of xg = dropout_e(F[t_j]) for the slots of expert e; a plain copy without dropout. */
static void esft__pesc_gather_input(const esft_pesc_config *c, float *xg, const float *F,
                                    const int32_t *slots, int n, int e)
{
    int j, D = c->d_model, K = c->top_k, nt = esft__pesc_threads((double)n * D);
    uint32_t threshold = (uint32_t)((double)c->dropout * 4294967296.0);
    float keep_scale = 1.0f / (1.0f - c->dropout);
    (void)nt; /* unused without OpenMP */
    ESFT__MOE_FOR_STATIC(nt)
    for (j = 0; j < n; j++) {
        int t = slots[j] / K, d;
        const float *f = F + (size_t)t * D;
        float *x = xg + (size_t)j * D;
        if (c->dropout == 0.0f) { memcpy(x, f, (size_t)D * sizeof(float)); continue; }
        for (d = 0; d < D; d++)
            x[d] = esft__pesc_keep(c->dropout_seed, e, t, d, threshold) ? f[d] * keep_scale : 0.0f;
    }
}

/* y[t_j] += a_j over one expert's slots (distinct tokens, so rows split over
   threads; experts go in ascending order, so each sum's order is fixed).
   Returns nonzero if a sum came out NaN or Inf: non-finite values persist
   through later additions, so this stands in for a pass over all of y. */
static int esft__pesc_scatter_add(float *y, const float *a, const int32_t *slots, int n, int K, int D)
{
    uint32_t top[64];
    int ch, any = 0, per = (n + 63) / 64, nt = esft__pesc_threads((double)n * D);
    (void)nt; /* unused without OpenMP */
    ESFT__MOE_FOR_STATIC(nt)
    for (ch = 0; ch < 64; ch++) {
        int j, d, hi = (ch + 1) * per < n ? (ch + 1) * per : n;
        uint32_t m = 0;
        for (j = ch * per; j < hi; j++) {
            float *yt = y + (size_t)(slots[j] / K) * D;
            const float *aj = a + (size_t)j * D;
            for (d = 0; d < D; d++) {
                uint32_t b;
                yt[d] += aj[d];
                b = esft__abs_bits(yt[d]);
                m = b > m ? b : m;
            }
        }
        top[ch] = m;
    }
    for (ch = 0; ch < 64; ch++) any |= top[ch] >= 0x7f800000u;
    return any;
}

static esft_adapter_config esft__pesc_expert_config(const esft_pesc_config *c)
{
    esft_adapter_config ac;
    ac.d_in = ac.d_out = c->d_model;
    ac.rank = c->rank;
    ac.activation = ESFT_ACT_GELU;
    ac.scale = c->scale;
    return ac;
}

static esft_status esft__pesc_forward_cpu(void *context, const esft_pesc_config *c, float *y,
                                          float *aux_loss, const float *F, const float *u,
                                          const float *params, esft_pesc_saved *s, int T,
                                          esft_error *err)
{
    int D = c->d_model, E = c->n_experts, K = c->top_k, R = c->rank, e, j, overflow = 0;
    esft__pesc_work w = esft__pesc_work_split(c, s->work, (size_t)T);
    esft_adapter_config ac = esft__pesc_expert_config(c);
    esft_route_config rc = esft_route_config_init(E, K);
    esft_status st;
    (void)context;
    s->T = 0;
    if (T == 0) { s->aux_loss = 0.0f; if (aux_loss) *aux_loss = 0.0f; return ESFT_OK; }
    /* F and the parameters are checked before y is written, so a failed call
       leaves y as it was (one pass each, cheap next to the adapters); a bad u
       shows in the logits (route checks them) and is named only then. Finite
       inputs that overflow are caught in y itself, after it is written. */
    if ((st = esft__check_finite(F, (size_t)T * D, "F", D, err)) != ESFT_OK) return st;
    if ((st = esft__check_finite(params, esft_pesc_param_count(c), "params", 0, err)) != ESFT_OK) return st;
    esft__sgemm(0, 1, T, E, D, 1.0f, u, D, params, D, 0.0f, s->logits, E);
    rc.renormalize = 1;
    if ((st = esft__route_cpu(NULL, &rc, s->ids, s->weights, s->probs, s->logits, T, err)) != ESFT_OK) {
        if (st != ESFT_ERR_NUMERIC) return st;
        if ((st = esft__check_finite(u, (size_t)T * D, "u", D, err)) != ESFT_OK) return st;
        return esft__fail(err, ESFT_ERR_NUMERIC, "router logits overflow (u or router weights too large)");
    }
    esft__sort_slots(s->order, NULL, s->offset, s->ids, T * K, E);
    s->aux_loss = (float)((double)c->aux_alpha * E * esft__balance(s->frac, s->probs, s->offset, T, E, K));
    memcpy(y, F, (size_t)T * D * sizeof(float));
    for (e = 0; e < E; e++) {
        const int32_t *slots = s->order + s->offset[e];
        int n = s->offset[e + 1] - s->offset[e];
        if (n == 0) continue;
        esft__pesc_gather_input(c, w.xg, F, slots, n, e);
        for (j = 0; j < n; j++) w.wg[j] = s->weights[slots[j]];
        esft__adapter_forward_cpu(&ac, w.yg, s->hidden + (size_t)s->offset[e] * R, w.xg,
                                  params + esft_pesc_tensor_offset(c, ESFT_PESC_DOWN, e),
                                  params + esft_pesc_tensor_offset(c, ESFT_PESC_UP, e), w.wg, w.g, 0.0f, n);
        overflow |= esft__pesc_scatter_add(y, w.yg, slots, n, K, D);
    }
    if (overflow && esft__check_finite(y, (size_t)T * D, "y", D, err) != ESFT_OK)
        return ESFT_ERR_NUMERIC; /* finite inputs, an overflow: err names y's first bad element */
    s->cfg = *c;
    s->T = T;
    if (aux_loss) *aux_loss = s->aux_loss;
    return ESFT_OK;
}

/* dlogits from the gate weights' gradient dw (softmax over the K chosen) and from
   the auxiliary loss (softmax over all E; f is constant almost everywhere, so
   d aux / d p_te = alpha E f_e / T). */
static void esft__pesc_router_grad(const esft_pesc_config *c, const esft__pesc_work *w,
                                   const esft_pesc_saved *s, float daux, int T)
{
    int t, e, E = c->n_experts, K = c->top_k;
    esft_route_config rc = esft_route_config_init(E, K);
    rc.renormalize = 1; /* as the forward routes */
    for (e = 0; e < E; e++)
        w->coef[e] = (float)((double)daux * c->aux_alpha * E * s->frac[e] / T);
    for (t = 0; t < T; t++)
        esft__route_backward_token(&rc, w->dlogits + (size_t)t * E, s->probs + (size_t)t * E, s->ids + (size_t)t * K,
                                   w->dw + (size_t)t * K, w->coef, E);
}

/* dF[t_j] += mask_e(t_j) * dx_j / (1 - p) over one expert's slots. */
static void esft__pesc_scatter_dx(const esft_pesc_config *c, float *dF, const float *dx,
                                  const int32_t *slots, int n, int e)
{
    int j, D = c->d_model, K = c->top_k, nt = esft__pesc_threads((double)n * D);
    uint32_t threshold = (uint32_t)((double)c->dropout * 4294967296.0);
    float keep_scale = 1.0f / (1.0f - c->dropout);
    (void)nt; /* unused without OpenMP */
    ESFT__MOE_FOR_STATIC(nt) /* one expert's slots are distinct tokens: rows are disjoint */
    for (j = 0; j < n; j++) {
        int t = slots[j] / K, d;
        float *dft = dF + (size_t)t * D;
        const float *dxj = dx + (size_t)j * D;
        if (c->dropout == 0.0f) { for (d = 0; d < D; d++) dft[d] += dxj[d]; continue; }
        for (d = 0; d < D; d++)
            if (esft__pesc_keep(c->dropout_seed, e, t, d, threshold)) dft[d] += dxj[d] * keep_scale;
    }
}

static esft_status esft__pesc_backward_cpu(void *context, const esft_pesc_config *c, float *dF,
                                           float *du, float *dparams, const float *dy, float daux,
                                           esft_pesc_saved *s, const float *F, const float *u,
                                           const float *params, int T, esft_error *err)
{
    int D = c->d_model, E = c->n_experts, K = c->top_k, R = c->rank, e, j, t;
    int nt = esft__pesc_threads((double)T * D);
    esft__pesc_work w = esft__pesc_work_split(c, s->work, (size_t)T);
    esft_adapter_config ac = esft__pesc_expert_config(c);
    esft_status st;
    (void)context;
    (void)nt; /* unused without OpenMP */
    if (T == 0) return ESFT_OK;
    if (!isfinite(daux)) return esft__fail(err, ESFT_ERR_NUMERIC, "daux is not finite");
    /* before any gradient is touched: a NaN in dy would spread into all of them */
    if ((st = esft__check_finite(dy, (size_t)T * D, "dy", D, err)) != ESFT_OK) return st;
    for (e = 0; e < E; e++) {
        const int32_t *slots = s->order + s->offset[e];
        const float *down = params + esft_pesc_tensor_offset(c, ESFT_PESC_DOWN, e);
        int n = s->offset[e + 1] - s->offset[e];
        if (n == 0) continue;
        esft__pesc_gather_input(c, w.xg, F, slots, n, e);
        ESFT__MOE_FOR_STATIC(nt)
        for (j = 0; j < n; j++) {
            w.wg[j] = s->weights[slots[j]];
            w.dwg[j] = 0.0f;
            memcpy(w.yg + (size_t)j * D, dy + (size_t)(slots[j] / K) * D, (size_t)D * sizeof(float));
        }
        esft__adapter_backward_cpu(&ac, NULL,
                                   dparams ? dparams + esft_pesc_tensor_offset(c, ESFT_PESC_DOWN, e) : NULL,
                                   dparams ? dparams + esft_pesc_tensor_offset(c, ESFT_PESC_UP, e) : NULL,
                                   w.dwg, w.yg, s->hidden + (size_t)s->offset[e] * R, w.xg, down,
                                   params + esft_pesc_tensor_offset(c, ESFT_PESC_UP, e), w.wg, w.g, n);
        /* the primitive leaves dh (n, R) at the start of its work: dx = dh W_down,
           written over xg (done with), then scattered through the dropout mask */
        esft__sgemm(0, 0, n, D, R, 1.0f, w.g, R, down, D, 0.0f, w.xg, D);
        esft__pesc_scatter_dx(c, dF, w.xg, slots, n, e);
        for (j = 0; j < n; j++) w.dw[slots[j]] = w.dwg[j];
    }
    ESFT__MOE_FOR_STATIC(nt) /* the residual path y = F + ... */
    for (t = 0; t < T; t++) {
        float *dft = dF + (size_t)t * D;
        const float *dyt = dy + (size_t)t * D;
        int d;
        for (d = 0; d < D; d++) dft[d] += dyt[d];
    }
    esft__pesc_router_grad(c, &w, s, daux, T);
    if (dparams) esft__sgemm(1, 0, E, D, T, 1.0f, w.dlogits, E, u, D, 1.0f, dparams, D);
    if (du) esft__sgemm(0, 0, T, D, E, 1.0f, w.dlogits, E, params, D, 1.0f, du, D);
    return ESFT_OK;
}

/* Door checks shared by forward and backward. */
static esft_status esft__pesc_check(const esft_backend *b, const esft_pesc_config *c,
                                    const esft_pesc_saved *s, int T, esft_error *err)
{
    esft_status st = esft_backend_check(b, err);
    if (st == ESFT_OK) st = esft_pesc_config_validate(c, err);
    if (st != ESFT_OK) return st;
    if (!s || !s->work) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "saved is not initialised");
    if (s->backend != b)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "saved was made for backend '%s', not '%s'",
                          s->backend->name, b->name);
    if (s->cfg.d_model != c->d_model || s->cfg.n_experts != c->n_experts || s->cfg.top_k != c->top_k ||
        s->cfg.rank != c->rank)
        return esft__fail(err, ESFT_ERR_SHAPE, "saved is for D %d, E %d, K %d, R %d; config has D %d, E %d, K %d, R %d",
                          s->cfg.d_model, s->cfg.n_experts, s->cfg.top_k, s->cfg.rank, c->d_model,
                          c->n_experts, c->top_k, c->rank);
    if (T < 0 || T > s->max_tokens)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "T = %d outside [0, %d]", T, s->max_tokens);
    return ESFT_OK;
}

ESFTDEF esft_status esft_pesc_forward_with(const esft_backend *b, const esft_pesc_config *c, float *y,
                                           float *aux_loss, const float *F, const float *u,
                                           const float *params, esft_pesc_saved *saved, int T,
                                           esft_error *err)
{
    esft_status st = esft__pesc_check(b, c, saved, T, err);
    if (st != ESFT_OK) return st;
    if (T > 0 && (!y || !F || !u || !params))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "y, F, u and params must not be NULL");
    if (T > 0 && y == F) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "y must not alias F");
    if (!b->adapter_forward) return esft__missing_op(b, "adapter_forward", err);
    saved->T = 0; /* a failed forward leaves nothing for backward */
    return b->adapter_forward(b->context, c, y, aux_loss, F, u, params, saved, T, err);
}

ESFTDEF esft_status esft_pesc_backward_with(const esft_backend *b, const esft_pesc_config *c, float *dF,
                                            float *du, float *dparams, const float *dy, float daux,
                                            esft_pesc_saved *saved, const float *F, const float *u,
                                            const float *params, int T, esft_error *err)
{
    esft_status st = esft__pesc_check(b, c, saved, T, err);
    if (st != ESFT_OK) return st;
    if (T != saved->T)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "backward of %d tokens, the last forward had %d%s", T,
                          saved->T, saved->T == 0 ? " (or failed)" : "");
    if (c->dropout != saved->cfg.dropout || c->dropout_seed != saved->cfg.dropout_seed ||
        c->scale != saved->cfg.scale || c->aux_alpha != saved->cfg.aux_alpha)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "config differs from the forward's");
    if (T > 0 && (!dF || !dy || !F || !u || !params))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "dF, dy, F, u and params must not be NULL");
    if (!b->adapter_backward) return esft__missing_op(b, "adapter_backward", err);
    return b->adapter_backward(b->context, c, dF, du, dparams, dy, daux, saved, F, u, params, T, err);
}

ESFTDEF esft_status esft_pesc_forward(const esft_pesc_config *c, float *y, float *aux_loss, const float *F,
                                      const float *u, const float *params, esft_pesc_saved *saved, int T,
                                      esft_error *err)
{
    return esft_pesc_forward_with(esft_backend_cpu(), c, y, aux_loss, F, u, params, saved, T, err);
}

ESFTDEF esft_status esft_pesc_backward(const esft_pesc_config *c, float *dF, float *du, float *dparams,
                                       const float *dy, float daux, esft_pesc_saved *saved, const float *F,
                                       const float *u, const float *params, int T, esft_error *err)
{
    return esft_pesc_backward_with(esft_backend_cpu(), c, dF, du, dparams, dy, daux, saved, F, u, params,
                                   T, err);
}

/* ===================================================================== */
/* 11. optimizer                                                         */
/* ===================================================================== */

ESFTDEF esft_adamw_config esft_adamw_config_init(void)
{
    esft_adamw_config c;
    c.lr = 1e-3f;
    c.beta1 = 0.9f;
    c.beta2 = 0.999f;
    c.eps = 1e-8f;
    c.weight_decay = 0.01f;
    return c;
}

ESFTDEF esft_adamw_config esft_adamw_config_esft(void)
{
    esft_adamw_config c = esft_adamw_config_init();
    c.lr = 1e-5f;
    c.beta2 = 0.95f;
    c.weight_decay = 0.1f;
    return c;
}

static esft_status esft__adamw_check_config(const esft_adamw_config *c, esft_error *err)
{
    if (!c) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "AdamW config is NULL");
    if (!(c->lr >= 0.0f) || !isfinite(c->lr) || !(c->eps > 0.0f) || !isfinite(c->eps) ||
        !(c->weight_decay >= 0.0f) || !isfinite(c->weight_decay))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "AdamW needs finite lr >= 0, eps > 0, wd >= 0");
    if (!(c->beta1 >= 0.0f && c->beta1 < 1.0f) || !(c->beta2 >= 0.0f && c->beta2 < 1.0f))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "AdamW betas (%g, %g) outside [0, 1)",
                          (double)c->beta1, (double)c->beta2);
    return ESFT_OK;
}

ESFTDEF esft_status esft_adamw_init(esft_adamw *opt, const esft_adamw_config *cfg, size_t n,
                                    const esft_allocator *allocator, esft_error *err)
{
    esft_status s;
    if (!opt) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "optimizer is NULL");
    memset(opt, 0, sizeof *opt);
    s = esft__adamw_check_config(cfg, err);
    if (s != ESFT_OK) return s;
    opt->cfg = *cfg;
    opt->n = n;
    opt->backend = esft_backend_cpu();
    opt->allocator = esft__allocator_or_default(allocator);
    opt->m = ESFT__CAST(float *, esft__calloc(&opt->allocator, n, sizeof(float)));
    opt->v = ESFT__CAST(float *, esft__calloc(&opt->allocator, n, sizeof(float)));
    if (!opt->m || !opt->v) {
        esft_adamw_uninit(opt);
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "AdamW state for %lu floats", (unsigned long)n);
    }
    return ESFT_OK;
}

ESFTDEF void esft_adamw_uninit(esft_adamw *opt)
{
    if (!opt || !opt->allocator.free) return;
    esft__block_release(&opt->allocator, opt->memory, opt->m);
    esft__block_release(&opt->allocator, opt->memory, opt->v);
    memset(opt, 0, sizeof *opt);
}

ESFTDEF esft_status esft_adamw_set_backend(esft_adamw *opt, const esft_backend *b, esft_error *err)
{
    esft_status s;
    if (!opt || !opt->m) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "optimizer not initialised");
    if ((s = esft_backend_check(b, err)) != ESFT_OK) return s;
    s = esft__move_pair(&opt->allocator, &opt->memory, b, &opt->m, &opt->v, opt->n, "the AdamW state", err);
    if (s == ESFT_OK) opt->backend = b;
    return s;
}

ESFTDEF size_t esft_adamw_state_bytes(const esft_adamw *opt) { return opt ? 2 * opt->n * sizeof(float) : 0; }

/* The CPU step, PyTorch's arithmetic: decay first, then the Adam update. */
static esft_status esft__adamw_step_cpu(void *context, const esft_adamw_config *c, float *p,
                                        const float *g, float *m, float *v, size_t n, long step,
                                        esft_error *err)
{
    double bc1 = 1.0 - pow((double)c->beta1, (double)step);
    double bc2 = 1.0 - pow((double)c->beta2, (double)step);
    float step_size = (float)(c->lr / bc1), bc2_sqrt = (float)sqrt(bc2);
    float decay = 1.0f - c->lr * c->weight_decay, b1 = c->beta1, b2 = c->beta2, eps = c->eps;
    size_t i = esft__first_nonfinite(g, n); /* the backend's own check, before anything changes */
    (void)context;
    if (i < n) return esft__fail(err, ESFT_ERR_NUMERIC, "gradient %lu is %s", (unsigned long)i, isnan(g[i]) ? "NaN" : "Inf");
    for (i = 0; i < n; i++) {
        float gi = g[i];
        m[i] = b1 * m[i] + (1.0f - b1) * gi;
        v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
        p[i] = p[i] * decay - step_size * m[i] / (sqrtf(v[i]) / bc2_sqrt + eps);
    }
    return ESFT_OK;
}

ESFTDEF esft_status esft_adamw_step(esft_adamw *opt, float *params, const float *grads, esft_error *err)
{
    esft_status s;
    if (!opt || !opt->m) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "optimizer not initialised");
    if (opt->n > 0 && (!params || !grads))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "params or grads is NULL");
    s = esft_backend_check(opt->backend, err);
    if (s == ESFT_OK) s = esft__adamw_check_config(&opt->cfg, err);
    if (s != ESFT_OK) return s;
    if (!opt->backend->adamw_step) return esft__missing_op(opt->backend, "adamw_step", err);
    s = opt->backend->adamw_step(opt->backend->context, &opt->cfg, params, grads, opt->m, opt->v, opt->n,
                                 opt->step + 1, err);
    if (s == ESFT_OK) opt->step++;
    return s;
}

/* The CPU's sum_squares: one running double sum in element order (with
   esft_clip_grad_norm_with's block order, the same sum as a single loop). */
static esft_status esft__sum_squares_cpu(void *context, const float *x, size_t n, double *sum, esft_error *err)
{
    double acc = *sum;
    size_t i;
    (void)context;
    for (i = 0; i < n; i++) acc += (double)x[i] * x[i];
    if (!isfinite(acc)) return esft__fail(err, ESFT_ERR_NUMERIC, "gradient norm is not finite");
    *sum = acc;
    return ESFT_OK;
}

static esft_status esft__scale_cpu(void *context, float *x, size_t n, float factor, esft_error *err)
{
    size_t i;
    (void)context;
    (void)err;
    for (i = 0; i < n; i++) x[i] *= factor;
    return ESFT_OK;
}

/* Every block present and the ops the call will use: checked before any op
   runs, so a refused call changes nothing. */
static esft_status esft__clip_check(const esft_backend *b, float *const *grads, const size_t *sizes, int n_blocks,
                                    float max_norm, esft_error *err)
{
    esft_status s;
    int i;
    if (n_blocks < 0 || (n_blocks > 0 && (!grads || !sizes)))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "blocks or sizes is NULL");
    for (i = 0; i < n_blocks; i++)
        if (sizes[i] > 0 && !grads[i]) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "block %d is NULL", i);
    if ((s = esft_backend_check(b, err)) != ESFT_OK) return s;
    if (!b->sum_squares) return esft__missing_op(b, "sum_squares", err);
    if (max_norm > 0.0f && !b->scale) return esft__missing_op(b, "scale", err);
    return ESFT_OK;
}

ESFTDEF esft_status esft_clip_grad_norm_with(const esft_backend *b, float *const *grads, const size_t *sizes,
                                             int n_blocks, float max_norm, double *norm, esft_error *err)
{
    double sum = 0.0, total;
    esft_status s = esft__clip_check(b, grads, sizes, n_blocks, max_norm, err);
    int i;
    for (i = 0; s == ESFT_OK && i < n_blocks; i++)
        if (sizes[i] > 0) s = b->sum_squares(b->context, grads[i], sizes[i], &sum, err);
    if (s != ESFT_OK) return s;
    total = sqrt(sum);
    /* the ops report NaN/Inf; this guards against a backend whose op does not */
    if (!isfinite(total)) return esft__fail(err, ESFT_ERR_NUMERIC, "gradient norm is not finite");
    if (norm) *norm = total;
    if (max_norm > 0.0f && total > max_norm) {
        float factor = (float)(max_norm / (total + 1e-6));
        for (i = 0; s == ESFT_OK && i < n_blocks; i++)
            if (sizes[i] > 0) s = b->scale(b->context, grads[i], sizes[i], factor, err);
    }
    return s;
}

ESFTDEF esft_status esft_clip_grad_norm(float *const *grads, const size_t *sizes, int n_blocks,
                                        float max_norm, double *norm, esft_error *err)
{
    return esft_clip_grad_norm_with(esft_backend_cpu(), grads, sizes, n_blocks, max_norm, norm, err);
}

/* ===================================================================== */
/* 12. checkpoints (safetensors, Hugging Face names)                     */
/* ===================================================================== */

/* ---- dtypes and conversions ------------------------------------------ */

static const struct esft__dtype_info {
    const char *name;
    size_t size;
} esft__dtypes[ESFT_DTYPE_COUNT] = {
    {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F64", 8}, {"I64", 8}, {"I32", 4}, {"I16", 2},
    {"I8", 1}, {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1}, {"BOOL", 1},
    {"F8_E4M3", 1}, {"F8_E5M2", 1},
};

static int esft__dtype_ok(esft_dtype t) { return (int)t >= 0 && (int)t < (int)ESFT_DTYPE_COUNT; }

ESFTDEF const char *esft_dtype_name(esft_dtype t) { return esft__dtype_ok(t) ? esft__dtypes[t].name : "?"; }

ESFTDEF size_t esft_dtype_size(esft_dtype t) { return esft__dtype_ok(t) ? esft__dtypes[t].size : 0; }

ESFTDEF esft_status esft_dtype_parse(const char *name, esft_dtype *out)
{
    int i;
    if (!name || !out) return ESFT_ERR_INVALID_ARGUMENT;
    for (i = 0; i < (int)ESFT_DTYPE_COUNT; i++)
        if (strcmp(name, esft__dtypes[i].name) == 0) { *out = (esft_dtype)i; return ESFT_OK; }
    return ESFT_ERR_UNSUPPORTED;
}

static uint32_t esft__f32_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static float esft__bits_f32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

ESFTDEF uint16_t esft_f32_to_bf16(float x)
{
    uint32_t u = esft__f32_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) { /* NaN: truncate, but never to the Inf pattern */
        uint16_t h = (uint16_t)(u >> 16);
        return (h & 0x7Fu) ? h : (uint16_t)(h | 0x40u);
    }
    /* adding 0x7FFF plus the lowest kept bit rounds half to even; a carry into the
       exponent is the correct rounding up (to Inf above the largest bf16) */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

ESFTDEF float esft_bf16_to_f32(uint16_t h) { return esft__bits_f32((uint32_t)h << 16); }

/* Rounds m >> shift to nearest, ties to even (shift in 1..31). */
static uint32_t esft__shift_rne(uint32_t m, uint32_t shift)
{
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    return r + (rem > half || (rem == half && (r & 1u)));
}

ESFTDEF uint16_t esft_f32_to_f16(float x)
{
    uint32_t u = esft__f32_bits(x), a = u & 0x7FFFFFFFu;
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    if (a > 0x7F800000u) { /* NaN: keep the top 10 payload bits, never the Inf pattern */
        uint16_t mant = (uint16_t)((a >> 13) & 0x3FFu);
        return (uint16_t)(sign | 0x7C00u | (mant ? mant : 0x200u));
    }
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* >= 65520 rounds to Inf */
    if (a >= 0x38800000u) /* normal fp16 (>= 2^-14): rebias 127 -> 15, round 13 bits off */
        return (uint16_t)(sign | esft__shift_rne(a - 0x38000000u, 13));
    if (a < 0x33000000u) return sign; /* below 2^-25: rounds to zero */
    /* subnormal fp16: value / 2^-24 rounded; exponent 102..112 gives shift 24..14 */
    return (uint16_t)(sign | esft__shift_rne((a & 0x7FFFFFu) | 0x800000u, 126u - (a >> 23)));
}

ESFTDEF float esft_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1Fu) return esft__bits_f32(sign | 0x7F800000u | (m << 13)); /* Inf, NaN */
    if (e == 0) {
        if (!m) return esft__bits_f32(sign);
        e = 113; /* subnormal m * 2^-24: normalise */
        while (!(m & 0x400u)) { m <<= 1; e--; }
        return esft__bits_f32(sign | (e << 23) | ((m & 0x3FFu) << 13));
    }
    return esft__bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

static uint32_t esft__le32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t esft__le64(const unsigned char *p)
{
    return (uint64_t)esft__le32(p) | ((uint64_t)esft__le32(p + 4) << 32);
}

static void esft__put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16); p[3] = (unsigned char)(v >> 24);
}

/* Files are little-endian; so is nearly every host, where bytes copy as they are. */
static int esft__host_little_endian(void)
{
    const uint16_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

ESFTDEF esft_status esft_convert_to_f32(float *dst, const void *src, esft_dtype dtype, size_t n)
{
    const unsigned char *p = ESFT__CAST(const unsigned char *, src);
    size_t i;
    if (n && (!dst || !src)) return ESFT_ERR_INVALID_ARGUMENT;
    switch (dtype) {
    case ESFT_DTYPE_F32:
        for (i = 0; i < n; i++) dst[i] = esft__bits_f32(esft__le32(p + 4 * i));
        return ESFT_OK;
    case ESFT_DTYPE_F16:
        for (i = 0; i < n; i++) dst[i] = esft_f16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
        return ESFT_OK;
    case ESFT_DTYPE_BF16:
        if (esft__host_little_endian()) { /* the model's hot path: a widening shift the compiler vectorises */
            for (i = 0; i < n; i++) {
                uint16_t h;
                uint32_t u;
                memcpy(&h, p + 2 * i, 2);
                u = (uint32_t)h << 16;
                memcpy(dst + i, &u, 4);
            }
            return ESFT_OK;
        }
        for (i = 0; i < n; i++)
            dst[i] = esft__bits_f32(((uint32_t)p[2 * i] << 16) | ((uint32_t)p[2 * i + 1] << 24));
        return ESFT_OK;
    default: return ESFT_ERR_UNSUPPORTED;
    }
}

ESFTDEF esft_status esft_convert_from_f32(void *dst, const float *src, esft_dtype dtype, size_t n)
{
    unsigned char *p = ESFT__CAST(unsigned char *, dst);
    size_t i;
    if (n && (!dst || !src)) return ESFT_ERR_INVALID_ARGUMENT;
    if (dtype == ESFT_DTYPE_F32) {
        for (i = 0; i < n; i++) esft__put_le32(p + 4 * i, esft__f32_bits(src[i]));
        return ESFT_OK;
    }
    if (dtype != ESFT_DTYPE_F16 && dtype != ESFT_DTYPE_BF16) return ESFT_ERR_UNSUPPORTED;
    for (i = 0; i < n; i++) {
        uint16_t h = dtype == ESFT_DTYPE_F16 ? esft_f32_to_f16(src[i]) : esft_f32_to_bf16(src[i]);
        p[2 * i] = (unsigned char)h;
        p[2 * i + 1] = (unsigned char)(h >> 8);
    }
    return ESFT_OK;
}

/* ---- files: positioned reads, streamed atomic writes ------------------ */

#if defined(_WIN32)
#define ESFT__O_BINARY _O_BINARY
typedef int esft__ssize;
#define esft__sys_read(fd, p, n) _read(fd, p, (unsigned)(n))
#define esft__sys_write(fd, p, n) _write(fd, p, (unsigned)(n))
#define esft__sys_close _close
#else
#define ESFT__O_BINARY 0
typedef ssize_t esft__ssize;
#define esft__sys_read(fd, p, n) read(fd, p, n)
#define esft__sys_write(fd, p, n) write(fd, p, n)
#define esft__sys_close close
#endif

#define ESFT__IO_CHUNK ((size_t)1 << 30) /* largest single read/write call */

/* Opens path for reading without blocking: open() of a FIFO waits for a writer,
   forever if none comes, and that is before any regular-file check can run. So
   the open does not wait (O_NONBLOCK), callers then refuse what esft__fd_size
   says is not a regular file, and a regular file is read in blocking mode. */
static int esft__fd_open_read(const char *path)
{
#if defined(_WIN32)
    return _open(path, _O_RDONLY | ESFT__O_BINARY);
#else
    int fd = open(path, O_RDONLY | O_NONBLOCK), flags;
    if (fd >= 0 && (flags = fcntl(fd, F_GETFL)) != -1) (void)fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    return fd;
#endif
}

/* Size of a regular file; 0 for directories, pipes and errors. */
static int esft__fd_size(int fd, uint64_t *size)
{
#if defined(_WIN32)
    struct _stat64 s;
    if (_fstat64(fd, &s) != 0 || !(s.st_mode & _S_IFREG)) return 0;
#else
    struct stat s;
    if (fstat(fd, &s) != 0 || !S_ISREG(s.st_mode)) return 0;
#endif
    *size = (uint64_t)s.st_size;
    return 1;
}

static int esft__fd_seek(int fd, uint64_t offset)
{
#if defined(_WIN32)
    return _lseeki64(fd, (__int64)offset, SEEK_SET) >= 0;
#else
    if (sizeof(off_t) < 8 && offset > 0x7FFFFFFFu) return 0;
    return lseek(fd, (off_t)offset, SEEK_SET) != (off_t)-1;
#endif
}

static long esft__fd_read_some(int fd, void *dst, size_t n)
{
    for (;;) {
        esft__ssize r = esft__sys_read(fd, dst, n < ESFT__IO_CHUNK ? n : ESFT__IO_CHUNK);
        if (r < 0 && errno == EINTR) continue;
        return (long)r;
    }
}

static void esft__fd_close(int fd) { esft__sys_close(fd); }

/* Reads exactly n bytes at offset; 0 on error or an early end of file. */
static int esft__fd_read_at(int fd, uint64_t offset, void *dst, size_t n)
{
    unsigned char *p = ESFT__CAST(unsigned char *, dst);
    if (!esft__fd_seek(fd, offset)) return 0;
    while (n > 0) {
        esft__ssize r = esft__sys_read(fd, p, n < ESFT__IO_CHUNK ? n : ESFT__IO_CHUNK);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return 0;
        p += r;
        n -= (size_t)r;
    }
    return 1;
}

/* A whole small file into memory (declared near the top of the implementation).
   Only a regular file: a directory or device has no meaningful size (ftell of a
   directory is LLONG_MAX on Linux), and the limit keeps a wrong path from
   allocating gigabytes. */
static esft_status esft__read_file(const char *path, uint64_t max_bytes, const esft_allocator *a, char **out,
                                   size_t *size, esft_error *err)
{
    uint64_t n = 0;
    int fd = esft__fd_open_read(path);
    *out = NULL;
    *size = 0;
    if (fd < 0) return esft__fail_at(err, ESFT_ERR_IO, path, 0, "cannot open: %s", strerror(errno));
    if (!esft__fd_size(fd, &n)) {
        esft__sys_close(fd);
        return esft__fail_at(err, ESFT_ERR_IO, path, 0, "not a regular file");
    }
    if (n > max_bytes || n >= (uint64_t)(size_t)-1) {
        esft__sys_close(fd);
        return esft__fail_at(err, ESFT_ERR_IO, path, 0, "file of %llu bytes is over the limit of %llu bytes",
                             (unsigned long long)n, (unsigned long long)max_bytes);
    }
    *out = ESFT__CAST(char *, a->alloc(a->user, (size_t)n + 1));
    if (!*out) { esft__sys_close(fd); return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, 0, "%lu bytes", (unsigned long)n); }
    if (!esft__fd_read_at(fd, 0, *out, (size_t)n)) {
        esft__sys_close(fd);
        a->free(a->user, *out);
        *out = NULL;
        return esft__fail_at(err, ESFT_ERR_IO, path, 0, "read failed");
    }
    esft__sys_close(fd);
    (*out)[n] = 0;
    *size = (size_t)n;
    return ESFT_OK;
}

/* lstat and readlink are declared: POSIX.1-2001 (a strict -std=c99 build without
   a feature macro has neither; there a link at the output is replaced, not followed). */
#if !defined(_WIN32) && ((defined(_POSIX_C_SOURCE) && _POSIX_C_SOURCE >= 200112L) || defined(__APPLE__))
#define ESFT__POSIX_2001 1
#endif

/* The directory part of path, "." when it has none. */
static void esft__dir_of(const char *path, char *dir, size_t cap)
{
    const char *slash = strrchr(path, '/');
#if defined(_WIN32)
    const char *back = strrchr(path, '\\');
    if (back && (!slash || back > slash)) slash = back;
#endif
    if (!slash) snprintf(dir, cap, ".");
    else if (slash == path) snprintf(dir, cap, "/");
    else snprintf(dir, cap, "%.*s", (int)(slash - path), path);
}

#if !defined(_WIN32)
static const char *esft__file_kind(mode_t m)
{
    if (S_ISDIR(m)) return "a directory";
    if (S_ISFIFO(m)) return "a FIFO";
    if (S_ISCHR(m)) return "a character device";
    if (S_ISBLK(m)) return "a block device";
    return "not a regular file";
}
#endif

/* Where a write to path lands, and the permission bits of what it replaces. The
   rules (docs/formats.md, "Output files"): nothing there: a new file, in a
   directory that must exist (named when it does not); a regular file: replaced,
   its mode kept (*mode; -1 for a new file); a symbolic link: followed, and its
   target written the same way, so the link stays a link (a link to a missing
   file creates that file, as a shell's '>' does); a directory, FIFO, device or
   socket: refused. Why refuse: rename()
   would put a regular file in place of /dev/null, and a FIFO is someone's pipe. */
static esft_status esft__out_target(const char *path, char *target, size_t cap, int *mode, esft_error *err)
{
    char dir[4200];
#if defined(_WIN32)
    struct _stat64 sb;
#else
    struct stat sb;
#endif
    *mode = -1;
    if (strlen(path) >= cap) return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "path too long");
    snprintf(target, cap, "%s", path);
#if defined(ESFT__POSIX_2001)
    {
        int hops;
        for (hops = 0; lstat(target, &sb) == 0 && S_ISLNK(sb.st_mode); hops++) {
            char link[4096];
            ssize_t n = hops < 40 ? readlink(target, link, sizeof link - 1) : -1;
            if (n < 0) return esft__fail_at(err, ESFT_ERR_IO, path, 0, "cannot follow the symbolic link: %s",
                                            hops < 40 ? strerror(errno) : "too many levels");
            link[n] = 0;
            esft__dir_of(target, dir, sizeof dir); /* a relative link is relative to its own directory */
            if ((size_t)(link[0] == '/' ? snprintf(target, cap, "%s", link)
                                        : snprintf(target, cap, "%s/%s", dir, link)) >= cap)
                return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "path too long");
        }
    }
#endif
#if defined(_WIN32)
    if (_stat64(target, &sb) == 0) {
        if (!(sb.st_mode & _S_IFREG))
            return esft__fail_at(err, ESFT_ERR_IO, path, 0, "not a regular file: refusing to replace it");
        return ESFT_OK;
    }
#else
    if (stat(target, &sb) == 0) {
        if (!S_ISREG(sb.st_mode))
            return esft__fail_at(err, ESFT_ERR_IO, path, 0, "%s, not a regular file: refusing to replace it",
                                 esft__file_kind(sb.st_mode));
        *mode = (int)(sb.st_mode & 0777);
        return ESFT_OK;
    }
#endif
    if (errno != ENOENT) return esft__fail_at(err, ESFT_ERR_IO, path, 0, "cannot use the output: %s", strerror(errno));
    esft__dir_of(target, dir, sizeof dir);
#if defined(_WIN32)
    if (_stat64(dir, &sb) != 0) return esft__fail_at(err, ESFT_ERR_IO, path, 0, "the directory %s does not exist", dir);
#else
    if (stat(dir, &sb) != 0) return esft__fail_at(err, ESFT_ERR_IO, path, 0, "the directory %s does not exist", dir);
    if (!S_ISDIR(sb.st_mode)) return esft__fail_at(err, ESFT_ERR_IO, path, 0, "%s is not a directory", dir);
#endif
    return ESFT_OK;
}

/* Creates the temp file of a write to path (esft__out_target says where that
   lands: target, cap bytes), "<target>.tmp.<pid>.<n>" with the first n not
   taken, exclusively (O_CREAT | O_EXCL): two writers of the same path, in two
   processes or two threads, never share or truncate one temp file, and a file or
   link already there is never opened. It gets the mode of the file it replaces
   from its creation on (a 0600 file's data is never readable by others). Fills
   target, tmp (tmp_cap bytes) and *fd. */
static esft_status esft__open_temp(const char *path, char *target, size_t cap, char *tmp, size_t tmp_cap, int *fd,
                                   esft_error *err)
{
    unsigned n;
    int mode;
    esft_status s;
#if defined(_WIN32)
    long pid = (long)_getpid();
#else
    long pid = (long)getpid();
#endif
    *fd = -1;
    tmp[0] = 0;
    if ((s = esft__out_target(path, target, cap, &mode, err)) != ESFT_OK) return s;
    for (n = 0; n < 10000; n++) {
        if ((size_t)snprintf(tmp, tmp_cap, "%s.tmp.%ld.%u", target, pid, n) >= tmp_cap) {
            tmp[0] = 0;
            return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "path too long");
        }
#if defined(_WIN32)
        *fd = _open(tmp, _O_WRONLY | _O_CREAT | _O_EXCL | _O_BINARY, _S_IREAD | _S_IWRITE);
#else
        *fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, mode >= 0 ? (mode_t)mode : 0644);
        if (*fd >= 0 && mode >= 0) (void)chmod(tmp, (mode_t)mode); /* the umask may have cleared bits */
#endif
        if (*fd >= 0) return ESFT_OK;
        if (errno != EEXIST) break;
    }
    {
        int e = errno;
        s = esft__fail_at(err, ESFT_ERR_IO, path, 0, "cannot create %s: %s", tmp, strerror(e));
        tmp[0] = 0;
        return s;
    }
}

/* A file being written: bytes go to a fresh "<path>.tmp.<pid>.<n>"
   (esft__open_temp); commit renames it to path, which is the target of the
   caller's path when that is a symbolic link (esft__out_target). */
typedef struct esft__out {
    int fd;
    uint64_t written, kicked; /* bytes written; bytes handed to writeback so far */
    char path[4096];
    char tmp[4200];
} esft__out;

#define ESFT__WRITEBACK_STEP ((uint64_t)2 << 20) /* bytes between writeback starts (Linux) */

/* Counts n bytes just appended. Why: the final fsync waits for every byte
   still dirty, and Linux starts writing a big new file back only after seconds
   or at the dirty limit, so by default the disk idles while we copy and we idle
   while it writes. Starting writeback of each finished step at once overlaps
   the two, and fsync waits for the tail only (measured in docs/performance.md).
   The calls only queue I/O and their failures are ignored: fsync stays the one
   durability check. sync_file_range is declared under _GNU_SOURCE (C++ builds
   have it); otherwise POSIX posix_fadvise(DONTNEED), which on Linux starts
   writeback of dirty pages too; in strict C99 neither is declared and only the
   final fsync runs. */
static void esft__out_advance(esft__out *o, uint64_t n)
{
    o->written += n;
#if defined(__linux__) && (defined(SYNC_FILE_RANGE_WRITE) || defined(POSIX_FADV_DONTNEED))
    if (sizeof(off_t) < 8 || o->written - o->kicked < ESFT__WRITEBACK_STEP) return;
#if defined(SYNC_FILE_RANGE_WRITE)
    (void)sync_file_range(o->fd, (off_t)o->kicked, (off_t)(o->written - o->kicked), SYNC_FILE_RANGE_WRITE);
#else
    (void)posix_fadvise(o->fd, (off_t)o->kicked, (off_t)(o->written - o->kicked), POSIX_FADV_DONTNEED);
#endif
    o->kicked = o->written;
#endif
}

static esft_status esft__out_open(esft__out *o, const char *path, esft_error *err)
{
    o->fd = -1;
    o->tmp[0] = 0;
    o->written = o->kicked = 0;
    return esft__open_temp(path, o->path, sizeof o->path, o->tmp, sizeof o->tmp, &o->fd, err); /* o->path: the target */
}

static esft_status esft__out_write(esft__out *o, const void *data, size_t n, esft_error *err)
{
    const unsigned char *p = ESFT__CAST(const unsigned char *, data);
    while (n > 0) {
        esft__ssize w = esft__sys_write(o->fd, p, n < ESFT__IO_CHUNK ? n : ESFT__IO_CHUNK);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return esft__fail_at(err, ESFT_ERR_IO, o->path, 0, "write failed: %s", strerror(errno));
        p += w;
        n -= (size_t)w;
        esft__out_advance(o, (uint64_t)w);
    }
    return ESFT_OK;
}

/* Forces the bytes to disk and closes; the temp file stays until commit or abort. */
static esft_status esft__out_finish(esft__out *o, esft_error *err)
{
    int ok;
#if defined(_WIN32)
    ok = _commit(o->fd) == 0;
#else
    ok = fsync(o->fd) == 0;
#endif
    ok = esft__sys_close(o->fd) == 0 && ok;
    o->fd = -1;
    if (!ok) return esft__fail_at(err, ESFT_ERR_IO, o->path, 0, "cannot flush to disk: %s", strerror(errno));
    return ESFT_OK;
}

static esft_status esft__out_commit(esft__out *o, esft_error *err)
{
#if defined(_WIN32)
    remove(o->path);
#endif
    if (rename(o->tmp, o->path) != 0)
        return esft__fail_at(err, ESFT_ERR_IO, o->path, 0, "cannot rename %s: %s", o->tmp, strerror(errno));
    o->tmp[0] = 0;
    return ESFT_OK;
}

/* Closes and deletes the temp file, if any: nothing stays behind. */
static void esft__out_abort(esft__out *o)
{
    if (o->fd >= 0) esft__sys_close(o->fd);
    o->fd = -1;
    if (o->tmp[0]) remove(o->tmp);
    o->tmp[0] = 0;
}

/* The whole-buffer form of esft__out (declared in the ESFT file formats section). */
static esft_status esft__write_file_atomic(const char *path, const char *data, size_t size,
                                           esft_error *err)
{
    esft__out o;
    esft_status s = esft__out_open(&o, path, err);
    if (s == ESFT_OK) s = esft__out_write(&o, data, size, err);
    if (s == ESFT_OK) s = esft__out_finish(&o, err);
    if (s == ESFT_OK) s = esft__out_commit(&o, err);
    esft__out_abort(&o);
    return s;
}

/* Progress reporting of long copies. */
typedef struct esft__progress {
    const esft_checkpoint_options *opt;
    uint64_t done, total;
} esft__progress;

static void esft__progress_add(esft__progress *pr, uint64_t n)
{
    pr->done += n;
    if (pr->opt && pr->opt->progress) pr->opt->progress(pr->opt->user, pr->done, pr->total);
}

#define ESFT__COPY_CHUNK ((size_t)2 << 20) /* bytes per copy step: the memory bound of merges */

/* Copies n bytes at offset of file src (or memory) into o. buf (cap bytes) is
   the bounce buffer when the kernel cannot copy file to file itself. */
static esft_status esft__out_copy(esft__out *o, const esft_safetensors *src, uint64_t offset, uint64_t n,
                                  unsigned char *buf, size_t cap, esft__progress *pr, esft_error *err)
{
    esft_status s;
    if (src->memory_) {
        while (n > 0) {
            size_t m = n < ESFT__COPY_CHUNK ? (size_t)n : ESFT__COPY_CHUNK;
            if ((s = esft__out_write(o, src->memory_ + offset, m, err)) != ESFT_OK) return s;
            offset += m;
            n -= m;
            if (pr) esft__progress_add(pr, m);
        }
        return ESFT_OK;
    }
#if defined(__linux__)
    if (sizeof(off_t) >= 8) { /* in-kernel copy, as cp does; falls back when refused */
        off_t at = (off_t)offset;
        while (n > 0) {
            size_t m = n < ESFT__COPY_CHUNK ? (size_t)n : ESFT__COPY_CHUNK;
            ssize_t w = sendfile(o->fd, src->fd_, &at, m);
            if (w < 0 && errno == EINTR) continue;
            if (w < 0 && (errno == EINVAL || errno == ENOSYS)) break;
            if (w <= 0) return esft__fail_at(err, ESFT_ERR_IO, o->path, 0, "copy failed: %s", w < 0 ? strerror(errno) : "source ended early");
            n -= (uint64_t)w;
            esft__out_advance(o, (uint64_t)w);
            if (pr) esft__progress_add(pr, (uint64_t)w);
        }
        offset = (uint64_t)at;
    }
#endif
    while (n > 0) {
        size_t m = n < cap ? (size_t)n : cap;
        if (!esft__fd_read_at(src->fd_, offset, buf, m))
            return esft__fail_at(err, ESFT_ERR_IO, o->path, 0, "reading the source failed at byte %llu",
                                 (unsigned long long)offset);
        if ((s = esft__out_write(o, buf, m, err)) != ESFT_OK) return s;
        offset += m;
        n -= m;
        if (pr) esft__progress_add(pr, m);
    }
    return ESFT_OK;
}

/* ---- JSON helpers ----------------------------------------------------- */

/* 1 if s[0..n) is well-formed UTF-8 (no overlongs, surrogates or > U+10FFFF). */
static int esft__utf8_valid(const char *text, size_t n)
{
    const unsigned char *s = ESFT__CAST(const unsigned char *, ESFT__CAST(const void *, text));
    size_t i = 0, len, k;
    while (i < n) {
        uint32_t c = s[i], cp, min;
        if (c < 0x80) { i++; continue; }
        if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; min = 0x80; }
        else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; min = 0x800; }
        else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; min = 0x10000; }
        else return 0;
        if (n - i < len) return 0;
        for (k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3Fu);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        i += len;
    }
    return 1;
}

/* A number token that is a plain non-negative integer below 2^63 (digits only,
   no sign, fraction, exponent or leading zero). */
static int esft__json_u64(const esft_json *js, int tok, uint64_t *out)
{
    const esft_json_token *t = js->tokens + tok;
    uint64_t v = 0;
    size_t i;
    if (t->type != ESFT_JSON_NUMBER || t->end == t->start) return 0;
    if (t->end - t->start > 1 && js->text[t->start] == '0') return 0;
    for (i = t->start; i < t->end; i++) {
        unsigned d = (unsigned)(js->text[i] - '0');
        if (d > 9 || v > (0x7FFFFFFFFFFFFFFFull - d) / 10) return 0;
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

/* Decodes string token tok into the arena; NULL when it holds \u0000 or is
   not valid UTF-8 once decoded (lone surrogates). The arena is sized so it
   cannot run out: decoding never lengthens a string. */
static const char *esft__arena_string(const esft_json *js, int tok, char *arena, size_t cap, size_t *used)
{
    const esft_json_token *t = js->tokens + tok;
    char *dst = arena + *used;
    size_t i, n;
    for (i = t->start; i < t->end; i++) {
        if (js->text[i] != '\\') continue;
        i++;
        if (js->text[i] == 'u' && memcmp(js->text + i + 1, "0000", 4) == 0) return NULL;
    }
    if (esft_json_string(js, tok, dst, cap - *used) != ESFT_OK) return NULL;
    n = strlen(dst);
    if (!esft__utf8_valid(dst, n)) return NULL;
    *used += n + 1;
    return dst;
}

/* Appends s as a JSON string literal (quotes, escapes). */
static void esft__buf_json_string(esft__buf *b, const char *s)
{
    esft__buf_puts(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') { esft__buf_append(b, "\\", 1); esft__buf_append(b, s, 1); }
        else if (c < 0x20) esft__buf_printf(b, "\\u%04x", (unsigned)c);
        else esft__buf_append(b, s, 1);
    }
    esft__buf_puts(b, "\"");
}

static void esft__shape_string(char *buf, size_t cap, int n_dims, const int64_t *shape)
{
    size_t n = 0;
    int d;
    n += (size_t)snprintf(buf, cap, "[");
    for (d = 0; d < n_dims && n < cap; d++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

static int esft__cmp_str_ptr(const void *a, const void *b)
{
    return strcmp(*ESFT__CAST(const char *const *, a), *ESFT__CAST(const char *const *, b));
}

/* The first string that occurs twice in a sorted array, or NULL. */
static const char *esft__first_duplicate(const char **sorted, int n)
{
    int i;
    for (i = 1; i < n; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0) return sorted[i];
    return NULL;
}

/* ---- safetensors: reading --------------------------------------------- */

/* Fails with a header problem; offset = the byte in the file (-1 if none). */
static esft_status esft__st_bad(esft_error *err, esft_status s, const char *file, long offset,
                                const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        esft__error_vset(err, s, file, 0, fmt, ap);
        va_end(ap);
        err->offset = offset;
        if (offset >= 0) { /* the place, for callers that print only the message */
            size_t n = strlen(err->message);
            snprintf(err->message + n, sizeof err->message - n, " (at byte %ld)", offset);
        }
    }
    return s;
}

#define ESFT__TOK_AT(js, tok) ((long)(8 + (js)->tokens[tok].start))

/* One tensor's {"dtype", "shape", "data_offsets"}; t->offset is left relative. */
static esft_status esft__st_tensor_info(const esft_json *js, int obj, esft_st_tensor *t,
                                        const char *file, esft_error *err)
{
    int i, k, dt = -1, sh = -1, off = -1;
    uint64_t b, e, numel = 1, dim;
    char dtype[16];
    if (js->tokens[obj].type != ESFT_JSON_OBJECT)
        return esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(js, obj), "tensor '%s' is not a JSON object", t->name);
    for (i = 0, k = obj + 1; i < js->tokens[obj].size; i++, k = js->tokens[k + 1].next) {
        int *slot = esft_json_string_equals(js, k, "dtype") ? &dt
                  : esft_json_string_equals(js, k, "shape") ? &sh
                  : esft_json_string_equals(js, k, "data_offsets") ? &off : NULL;
        if (!slot || *slot >= 0)
            return esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(js, k), "tensor '%s': %s field",
                                t->name, slot ? "duplicate" : "unknown");
        *slot = k + 1;
    }
    if (dt < 0 || sh < 0 || off < 0)
        return esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(js, obj), "tensor '%s' lacks %s", t->name,
                            dt < 0 ? "dtype" : sh < 0 ? "shape" : "data_offsets");
    if (js->tokens[dt].type != ESFT_JSON_STRING || esft_json_string(js, dt, dtype, sizeof dtype) != ESFT_OK ||
        esft_dtype_parse(dtype, &t->dtype) != ESFT_OK) {
        esft_json_string(js, dt, dtype, sizeof dtype); /* best effort for the message */
        return esft__st_bad(err, ESFT_ERR_UNSUPPORTED, file, ESFT__TOK_AT(js, dt), "tensor '%s': unknown dtype '%s'",
                            t->name, js->tokens[dt].type == ESFT_JSON_STRING ? dtype : "(not a string)");
    }
    if (js->tokens[sh].type != ESFT_JSON_ARRAY)
        return esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(js, sh), "tensor '%s': shape is not a list", t->name);
    if (js->tokens[sh].size > ESFT_ST_MAX_DIMS)
        return esft__st_bad(err, ESFT_ERR_UNSUPPORTED, file, ESFT__TOK_AT(js, sh), "tensor '%s': %d dimensions (at most %d)",
                            t->name, js->tokens[sh].size, ESFT_ST_MAX_DIMS);
    t->n_dims = js->tokens[sh].size;
    for (i = 0, k = sh + 1; i < t->n_dims; i++, k = js->tokens[k].next) {
        if (!esft__json_u64(js, k, &dim))
            return esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(js, k), "tensor '%s': a dimension is not a non-negative integer", t->name);
        if (dim && numel > (uint64_t)-1 / dim)
            return esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(js, k), "tensor '%s': shape overflows", t->name);
        t->shape[i] = (int64_t)dim;
        numel *= dim;
    }
    if (numel > (uint64_t)-1 / esft_dtype_size(t->dtype))
        return esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(js, sh), "tensor '%s': size overflows", t->name);
    t->n_elements = numel;
    t->n_bytes = numel * esft_dtype_size(t->dtype);
    if (js->tokens[off].type != ESFT_JSON_ARRAY || js->tokens[off].size != 2 ||
        !esft__json_u64(js, off + 1, &b) || !esft__json_u64(js, js->tokens[off + 1].next, &e) || e < b)
        return esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(js, off),
                            "tensor '%s': data_offsets must be [begin, end] with 0 <= begin <= end", t->name);
    if (e - b != t->n_bytes) {
        char shape[160];
        esft__shape_string(shape, sizeof shape, t->n_dims, t->shape);
        return esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(js, off),
                            "tensor '%s': shape %s of %s is %llu bytes but data_offsets span %llu", t->name, shape,
                            esft_dtype_name(t->dtype), (unsigned long long)t->n_bytes, (unsigned long long)(e - b));
    }
    t->offset = b;
    return ESFT_OK;
}

/* Data order; zero-byte tensors before a tensor at the same offset; names break ties. */
static int esft__cmp_tensor_offset(const void *pa, const void *pb)
{
    const esft_st_tensor *a = ESFT__CAST(const esft_st_tensor *, pa), *b = ESFT__CAST(const esft_st_tensor *, pb);
    if (a->offset != b->offset) return a->offset < b->offset ? -1 : 1;
    if (a->n_bytes != b->n_bytes) return a->n_bytes < b->n_bytes ? -1 : 1;
    return strcmp(a->name, b->name);
}

static int esft__cmp_tensor_name(const void *pa, const void *pb)
{
    const esft_st_tensor *a = *ESFT__CAST(const esft_st_tensor *const *, pa);
    const esft_st_tensor *b = *ESFT__CAST(const esft_st_tensor *const *, pb);
    return strcmp(a->name, b->name);
}

/* Tensors must tile the data area exactly: sorted by offset, each begins where
   the previous ended, the last ends at the end of the file. */
static esft_status esft__st_check_layout(esft_safetensors *st, uint64_t data_size, const char *file,
                                         esft_error *err)
{
    uint64_t expect = 0;
    int i;
    qsort(st->tensors, (size_t)st->n_tensors, sizeof *st->tensors, esft__cmp_tensor_offset);
    for (i = 0; i < st->n_tensors; i++) {
        const esft_st_tensor *t = st->tensors + i;
        if (t->offset < expect)
            return esft__st_bad(err, ESFT_ERR_PARSE, file, -1,
                                "tensor '%s' data_offsets [%llu, %llu] overlap tensor '%s' (ends at %llu)", t->name,
                                (unsigned long long)t->offset, (unsigned long long)(t->offset + t->n_bytes),
                                st->tensors[i - 1].name, (unsigned long long)expect);
        if (t->offset > expect)
            return esft__st_bad(err, ESFT_ERR_PARSE, file, -1, "%llu unused bytes before tensor '%s' (data_offsets begin at %llu)",
                                (unsigned long long)(t->offset - expect), t->name, (unsigned long long)t->offset);
        expect = t->offset + t->n_bytes;
    }
    if (expect > data_size)
        return esft__st_bad(err, ESFT_ERR_PARSE, file, -1,
                            "file truncated: the tensors need %llu data bytes, the file has %llu after the header",
                            (unsigned long long)expect, (unsigned long long)data_size);
    if (expect < data_size)
        return esft__st_bad(err, ESFT_ERR_PARSE, file, -1, "%llu bytes after the last tensor (data area %llu, tensors %llu)",
                            (unsigned long long)(data_size - expect), (unsigned long long)data_size,
                            (unsigned long long)expect);
    for (i = 0; i < st->n_tensors; i++) st->tensors[i].offset += 8 + st->header_size;
    return ESFT_OK;
}

/* Name index for lookups, and the check that names are unique. */
static esft_status esft__st_index_names(esft_safetensors *st, const char *file, esft_error *err)
{
    const esft_st_tensor **p;
    int i;
    if (st->n_tensors == 0) return ESFT_OK;
    p = ESFT__CAST(const esft_st_tensor **, esft__calloc(&st->allocator, (size_t)st->n_tensors, sizeof *p));
    if (!p) return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, file, 0, "name index");
    for (i = 0; i < st->n_tensors; i++) p[i] = st->tensors + i;
    qsort(p, (size_t)st->n_tensors, sizeof *p, esft__cmp_tensor_name);
    for (i = 0; i < st->n_tensors; i++) {
        st->by_name_[i] = (int)(p[i] - st->tensors);
        if (i && strcmp(p[i - 1]->name, p[i]->name) == 0) {
            esft__st_bad(err, ESFT_ERR_PARSE, file, -1, "duplicate tensor name '%s'", p[i]->name);
            esft__release(&st->allocator, p);
            return ESFT_ERR_PARSE;
        }
    }
    esft__release(&st->allocator, p);
    return ESFT_OK;
}

/* "__metadata__": {"key": "string", ...}; keys unique. */
static esft_status esft__st_metadata(esft_safetensors *st, const esft_json *js, int obj, char *arena,
                                     size_t cap, size_t *used, const char *file, esft_error *err)
{
    int i, k;
    const char **sorted, *dup;
    if (js->tokens[obj].type != ESFT_JSON_OBJECT)
        return esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(js, obj), "__metadata__ is not an object");
    for (i = 0, k = obj + 1; i < js->tokens[obj].size; i++, k = js->tokens[k + 1].next) {
        if (js->tokens[k + 1].type != ESFT_JSON_STRING)
            return esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(js, k + 1), "__metadata__ values must be strings");
        st->meta_keys[i] = esft__arena_string(js, k, arena, cap, used);
        st->meta_values[i] = esft__arena_string(js, k + 1, arena, cap, used);
        if (!st->meta_keys[i] || !st->meta_values[i])
            return esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(js, k), "__metadata__ string holds NUL or invalid UTF-8");
    }
    st->n_metadata = js->tokens[obj].size;
    if (st->n_metadata < 2) return ESFT_OK;
    sorted = ESFT__CAST(const char **, esft__calloc(&st->allocator, (size_t)st->n_metadata, sizeof *sorted));
    if (!sorted) return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, file, 0, "metadata");
    memcpy(sorted, st->meta_keys, (size_t)st->n_metadata * sizeof *sorted);
    qsort(sorted, (size_t)st->n_metadata, sizeof *sorted, esft__cmp_str_ptr);
    dup = esft__first_duplicate(sorted, st->n_metadata);
    if (dup) esft__st_bad(err, ESFT_ERR_PARSE, file, -1, "duplicate __metadata__ key '%s'", dup);
    esft__release(&st->allocator, ESFT__CAST(void *, sorted));
    return dup ? ESFT_ERR_PARSE : ESFT_OK;
}

/* Allocates the tables for n tensors, m metadata pairs and `chars` string bytes. */
static esft_status esft__st_alloc(esft_safetensors *st, int n, int m, size_t chars, const char *file,
                                  esft_error *err)
{
    st->tensors = ESFT__CAST(esft_st_tensor *, esft__calloc(&st->allocator, (size_t)n, sizeof *st->tensors));
    st->by_name_ = ESFT__CAST(int *, esft__calloc(&st->allocator, (size_t)n, sizeof(int)));
    st->meta_keys = ESFT__CAST(const char **, esft__calloc(&st->allocator, (size_t)m, sizeof(char *)));
    st->meta_values = ESFT__CAST(const char **, esft__calloc(&st->allocator, (size_t)m, sizeof(char *)));
    st->strings_ = ESFT__CAST(char *, esft__calloc(&st->allocator, chars, 1));
    if (!st->tensors || !st->by_name_ || !st->meta_keys || !st->meta_values || !st->strings_)
        return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, file, 0, "header tables (%d tensors)", n);
    return ESFT_OK;
}

/* Parses and validates the header JSON (n bytes); data_size = bytes after it. */
static esft_status esft__st_parse(esft_safetensors *st, const char *hdr, size_t n, uint64_t data_size,
                                  const char *file, esft_error *err)
{
    esft_json js;
    int i, k, meta = -1, n_t = 0, t = 0;
    size_t cap, used = 0;
    esft_status s;
    if (!esft__utf8_valid(hdr, n))
        return esft__st_bad(err, ESFT_ERR_PARSE, file, 8, "header is not valid UTF-8");
    s = esft_json_parse(&js, hdr, n, &st->allocator, err);
    if (s != ESFT_OK) {
        char why[256] = "";
        long at = err ? err->offset + 8 : -1;
        if (err) snprintf(why, sizeof why, "%s", err->message);
        esft__st_bad(err, s, file, -1, "header: %s (the JSON starts at byte 8)", why);
        if (err) err->offset = at;
        return s;
    }
    if (js.tokens[0].type != ESFT_JSON_OBJECT) { s = esft__st_bad(err, ESFT_ERR_PARSE, file, 8, "header is not a JSON object"); goto done; }
    for (i = 0, k = 1; i < js.tokens[0].size; i++, k = js.tokens[k + 1].next) {
        if (!esft_json_string_equals(&js, k, "__metadata__")) { n_t++; continue; }
        if (meta >= 0) { s = esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(&js, k), "two __metadata__ entries"); goto done; }
        meta = k + 1;
    }
    cap = n + (size_t)js.n_tokens + 1;
    s = esft__st_alloc(st, n_t, meta >= 0 ? js.tokens[meta].size : 0, cap, file, err);
    if (s == ESFT_OK && meta >= 0) s = esft__st_metadata(st, &js, meta, st->strings_, cap, &used, file, err);
    for (i = 0, k = 1; s == ESFT_OK && i < js.tokens[0].size; i++, k = js.tokens[k + 1].next) {
        esft_st_tensor *ten = st->tensors + t;
        if (k + 1 == meta) continue;
        ten->name = esft__arena_string(&js, k, st->strings_, cap, &used);
        if (!ten->name) { s = esft__st_bad(err, ESFT_ERR_PARSE, file, ESFT__TOK_AT(&js, k), "tensor name holds NUL or invalid UTF-8"); break; }
        s = esft__st_tensor_info(&js, k + 1, ten, file, err);
        t++;
    }
    st->n_tensors = n_t;
    if (s == ESFT_OK) s = esft__st_check_layout(st, data_size, file, err);
    if (s == ESFT_OK) s = esft__st_index_names(st, file, err);
done:
    esft_json_free(&js);
    return s;
}

static void esft__st_init(esft_safetensors *st, const esft_allocator *allocator)
{
    memset(st, 0, sizeof *st);
    st->fd_ = -1;
    st->allocator = esft__allocator_or_default(allocator);
}

/* The 8-byte length and its sanity checks; returns N. */
static esft_status esft__st_header_length(const unsigned char *first8, uint64_t file_size, const char *file,
                                          uint64_t *n, esft_error *err)
{
    if (file_size < 8)
        return esft__st_bad(err, ESFT_ERR_PARSE, file, 0, "file truncated: %llu bytes, a safetensors file starts with an 8-byte header length",
                            (unsigned long long)file_size);
    *n = esft__le64(first8);
    if (*n > ESFT_ST_MAX_HEADER)
        return esft__st_bad(err, ESFT_ERR_PARSE, file, 0, "header length %llu is over the 100 MB limit", (unsigned long long)*n);
    if (*n > file_size - 8)
        return esft__st_bad(err, ESFT_ERR_PARSE, file, 0, "header length %llu goes beyond the end of the file (%llu bytes)",
                            (unsigned long long)*n, (unsigned long long)file_size);
    if (*n < 2)
        return esft__st_bad(err, ESFT_ERR_PARSE, file, 0, "header length %llu is too short for a JSON object", (unsigned long long)*n);
    return ESFT_OK;
}

ESFTDEF esft_status esft_safetensors_open_memory(esft_safetensors *st, const void *data, size_t size,
                                                 const char *name, const esft_allocator *allocator,
                                                 esft_error *err)
{
    const unsigned char *p = ESFT__CAST(const unsigned char *, data);
    uint64_t n = 0;
    esft_status s;
    esft__error_clear(err);
    if (!st) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "output is NULL");
    esft__st_init(st, allocator);
    if (!data && size) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "data is NULL");
    if (!name) name = "<memory>";
    s = esft__st_header_length(p, size, name, &n, err);
    if (s != ESFT_OK) return s;
    st->memory_ = p;
    st->header_size = n;
    st->file_size = size;
    s = esft__st_parse(st, ESFT__CAST(const char *, ESFT__CAST(const void *, p + 8)), (size_t)n, size - 8 - n, name, err);
    if (s != ESFT_OK) esft_safetensors_close(st);
    return s;
}

ESFTDEF esft_status esft_safetensors_open(esft_safetensors *st, const char *path,
                                          const esft_allocator *allocator, esft_error *err)
{
    unsigned char first8[8];
    uint64_t size = 0, n = 0;
    char *hdr;
    esft_status s;
    esft__error_clear(err);
    if (!st || !path) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "output or path is NULL");
    esft__st_init(st, allocator);
    st->fd_ = esft__fd_open_read(path);
    if (st->fd_ < 0) return esft__fail_at(err, ESFT_ERR_IO, path, 0, "cannot open: %s", strerror(errno));
    if (!esft__fd_size(st->fd_, &size)) {
        esft_safetensors_close(st);
        return esft__fail_at(err, ESFT_ERR_IO, path, 0, "not a regular file");
    }
    if (size >= 8 && !esft__fd_read_at(st->fd_, 0, first8, 8)) {
        esft_safetensors_close(st);
        return esft__fail_at(err, ESFT_ERR_IO, path, 0, "read failed");
    }
    s = esft__st_header_length(first8, size, path, &n, err);
    if (s != ESFT_OK) { esft_safetensors_close(st); return s; }
    st->header_size = n;
    st->file_size = size;
    hdr = ESFT__CAST(char *, esft__calloc(&st->allocator, (size_t)n, 1));
    if (!hdr) s = esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, 0, "header of %llu bytes", (unsigned long long)n);
    else if (!esft__fd_read_at(st->fd_, 8, hdr, (size_t)n)) s = esft__fail_at(err, ESFT_ERR_IO, path, 0, "read failed");
    else s = esft__st_parse(st, hdr, (size_t)n, size - 8 - n, path, err);
    esft__release(&st->allocator, hdr);
    if (s != ESFT_OK) esft_safetensors_close(st);
    return s;
}

ESFTDEF void esft_safetensors_close(esft_safetensors *st)
{
    if (!st) return;
    if (st->fd_ >= 0) esft__sys_close(st->fd_);
    if (st->allocator.free) {
        esft__release(&st->allocator, st->tensors);
        esft__release(&st->allocator, st->by_name_);
        esft__release(&st->allocator, ESFT__CAST(void *, st->meta_keys));
        esft__release(&st->allocator, ESFT__CAST(void *, st->meta_values));
        esft__release(&st->allocator, st->strings_);
    }
    memset(st, 0, sizeof *st);
    st->fd_ = -1;
}

ESFTDEF int esft_safetensors_find(const esft_safetensors *st, const char *name)
{
    int lo = 0, hi;
    if (!st || !name) return -1;
    hi = st->n_tensors - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, c = strcmp(st->tensors[st->by_name_[mid]].name, name);
        if (c == 0) return st->by_name_[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

ESFTDEF const char *esft_safetensors_metadata(const esft_safetensors *st, const char *key)
{
    int i;
    if (!st || !key) return NULL;
    for (i = 0; i < st->n_metadata; i++)
        if (strcmp(st->meta_keys[i], key) == 0) return st->meta_values[i];
    return NULL;
}

ESFTDEF esft_status esft_safetensors_read(const esft_safetensors *st, int i, void *dst, uint64_t at, size_t n,
                                          esft_error *err)
{
    const esft_st_tensor *t;
    if (!st || i < 0 || i >= st->n_tensors || (n && !dst))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "no tensor %d or no destination", i);
    t = st->tensors + i;
    if (at > t->n_bytes || n > t->n_bytes - at)
        return esft__fail(err, ESFT_ERR_RANGE, "bytes [%llu, +%lu) outside tensor '%s' (%llu bytes)",
                          (unsigned long long)at, (unsigned long)n, t->name, (unsigned long long)t->n_bytes);
    if (n == 0) return ESFT_OK;
    if (st->memory_) { memcpy(dst, st->memory_ + t->offset + at, n); return ESFT_OK; }
    if (!esft__fd_read_at(st->fd_, t->offset + at, dst, n))
        return esft__fail(err, ESFT_ERR_IO, "reading tensor '%s' failed (file changed since it was opened?)", t->name);
    return ESFT_OK;
}

/* Reads tensor i in chunks of whole elements and converts each chunk. */
static esft_status esft__st_read_converted(const esft_safetensors *st, int i, void *dst, int to_f32,
                                           esft_error *err)
{
    unsigned char chunk[16384];
    const esft_st_tensor *t = st->tensors + i;
    size_t es = esft_dtype_size(t->dtype), per = sizeof chunk / es, j;
    uint64_t done;
    for (done = 0; done < t->n_elements; done += per) {
        size_t m = t->n_elements - done < per ? (size_t)(t->n_elements - done) : per;
        esft_status s = esft_safetensors_read(st, i, chunk, done * es, m * es, err);
        if (s != ESFT_OK) return s;
        if (to_f32) {
            esft_convert_to_f32(ESFT__CAST(float *, dst) + done, chunk, t->dtype, m);
            continue;
        }
        for (j = 0; j < m; j++) {
            int64_t *o = ESFT__CAST(int64_t *, dst) + done + j;
            if (es == 4) *o = (int64_t)(int32_t)esft__le32(chunk + 4 * j);
            else *o = (int64_t)esft__le64(chunk + 8 * j);
        }
    }
    return ESFT_OK;
}

ESFTDEF esft_status esft_safetensors_read_f32(const esft_safetensors *st, int i, float *dst, esft_error *err)
{
    esft_dtype d;
    if (!st || i < 0 || i >= st->n_tensors || !dst) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "no tensor %d or no destination", i);
    d = st->tensors[i].dtype;
    if (d != ESFT_DTYPE_F32 && d != ESFT_DTYPE_F16 && d != ESFT_DTYPE_BF16)
        return esft__fail(err, ESFT_ERR_UNSUPPORTED, "tensor '%s' is %s, not F32, F16 or BF16", st->tensors[i].name, esft_dtype_name(d));
    return esft__st_read_converted(st, i, dst, 1, err);
}

ESFTDEF esft_status esft_safetensors_read_i64(const esft_safetensors *st, int i, int64_t *dst, esft_error *err)
{
    esft_dtype d;
    if (!st || i < 0 || i >= st->n_tensors || !dst) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "no tensor %d or no destination", i);
    d = st->tensors[i].dtype;
    if (d != ESFT_DTYPE_I32 && d != ESFT_DTYPE_I64)
        return esft__fail(err, ESFT_ERR_UNSUPPORTED, "tensor '%s' is %s, not I32 or I64", st->tensors[i].name, esft_dtype_name(d));
    return esft__st_read_converted(st, i, dst, 0, err);
}

/* ---- safetensors: writing --------------------------------------------- */

/* One tensor of a file being written and where its bytes come from. */
typedef struct esft__wt {
    const char *name;
    esft_dtype dtype;
    int n_dims;
    const int64_t *shape;
    uint64_t n_bytes;
    const void *data;            /* raw bytes in the file's dtype, or */
    const float *f32;            /* fp32 values converted on the way out, or */
    const esft_safetensors *src; /* tensor src_index of an open file, copied */
    int src_index;
    uint64_t src_at;             /* from this byte of it (a slice of a fused tensor) */
} esft__wt;

/* Names and metadata keys: present, UTF-8, unique; names not "__metadata__". */
static esft_status esft__wt_check_names(const esft__wt *t, int n, const char *const *mk, const char *const *mv,
                                        int n_meta, const esft_allocator *a, const char *path, esft_error *err)
{
    const char **sorted, *dup = NULL;
    int i, m = n > n_meta ? n : n_meta;
    for (i = 0; i < n; i++)
        if (!t[i].name || !t[i].name[0] || strcmp(t[i].name, "__metadata__") == 0 ||
            !esft__utf8_valid(t[i].name, strlen(t[i].name)))
            return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "tensor %d: name is missing, empty, not UTF-8 or __metadata__", i);
    for (i = 0; i < n_meta; i++)
        if (!mk || !mv || !mk[i] || !mv[i] || !esft__utf8_valid(mk[i], strlen(mk[i])) ||
            !esft__utf8_valid(mv[i], strlen(mv[i])))
            return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "metadata pair %d is missing or not UTF-8", i);
    if (m < 2) return ESFT_OK;
    sorted = ESFT__CAST(const char **, esft__calloc(a, (size_t)m, sizeof *sorted));
    if (!sorted) return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, 0, "name check");
    for (i = 0; i < n; i++) sorted[i] = t[i].name;
    qsort(sorted, (size_t)n, sizeof *sorted, esft__cmp_str_ptr);
    dup = esft__first_duplicate(sorted, n);
    if (dup) esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "duplicate tensor name '%s'", dup);
    if (!dup && n_meta > 1) {
        memcpy(sorted, mk, (size_t)n_meta * sizeof *sorted);
        qsort(sorted, (size_t)n_meta, sizeof *sorted, esft__cmp_str_ptr);
        dup = esft__first_duplicate(sorted, n_meta);
        if (dup) esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "duplicate metadata key '%s'", dup);
    }
    esft__release(a, ESFT__CAST(void *, sorted));
    return dup ? ESFT_ERR_INVALID_ARGUMENT : ESFT_OK;
}

/* The header JSON, padded with spaces so the data area starts 8-byte aligned. */
static void esft__st_header_json(esft__buf *b, const esft__wt *t, int n, const char *const *mk,
                                 const char *const *mv, int n_meta)
{
    uint64_t off = 0;
    int i, d;
    esft__buf_puts(b, "{");
    if (n_meta > 0) {
        esft__buf_puts(b, "\"__metadata__\":{");
        for (i = 0; i < n_meta; i++) {
            if (i) esft__buf_puts(b, ",");
            esft__buf_json_string(b, mk[i]);
            esft__buf_puts(b, ":");
            esft__buf_json_string(b, mv[i]);
        }
        esft__buf_puts(b, "}");
    }
    for (i = 0; i < n; i++) {
        if (i || n_meta > 0) esft__buf_puts(b, ",");
        esft__buf_json_string(b, t[i].name);
        esft__buf_printf(b, ":{\"dtype\":\"%s\",\"shape\":[", esft_dtype_name(t[i].dtype));
        for (d = 0; d < t[i].n_dims; d++) esft__buf_printf(b, "%s%lld", d ? "," : "", (long long)t[i].shape[d]);
        esft__buf_printf(b, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                         (unsigned long long)(off + t[i].n_bytes));
        off += t[i].n_bytes;
    }
    esft__buf_puts(b, "}");
    while ((b->size + 8) % 8) esft__buf_append(b, " ", 1);
}

/* Streams one tensor's bytes into o. */
static esft_status esft__wt_emit(esft__out *o, const esft__wt *t, unsigned char *bounce, size_t cap,
                                 esft__progress *pr, esft_error *err)
{
    unsigned char conv[16384];
    size_t es, per;
    uint64_t done;
    esft_status s = ESFT_OK;
    if (t->src)
        return esft__out_copy(o, t->src, t->src->tensors[t->src_index].offset + t->src_at, t->n_bytes, bounce, cap,
                              pr, err);
    if (!t->f32) {
        s = esft__out_write(o, t->data, (size_t)t->n_bytes, err);
        if (s == ESFT_OK && pr) esft__progress_add(pr, t->n_bytes);
        return s;
    }
    es = esft_dtype_size(t->dtype);
    per = sizeof conv / es;
    for (done = 0; done < t->n_bytes / es && s == ESFT_OK; done += per) {
        size_t m = t->n_bytes / es - done < per ? (size_t)(t->n_bytes / es - done) : per;
        esft_convert_from_f32(conv, t->f32 + done, t->dtype, m);
        s = esft__out_write(o, conv, m * es, err);
    }
    if (s == ESFT_OK && pr) esft__progress_add(pr, t->n_bytes);
    return s;
}

/* Writes a whole safetensors file atomically from a list of tensors. */
static esft_status esft__st_write(const char *path, const esft__wt *t, int n, const char *const *mk,
                                  const char *const *mv, int n_meta, esft__progress *pr,
                                  const esft_allocator *a, esft_error *err)
{
    esft__buf hdr;
    esft__out o;
    unsigned char len8[8], *bounce = NULL;
    size_t cap = 0;
    int i;
    esft_status s = esft__wt_check_names(t, n, mk, mv, n_meta, a, path, err);
    if (s != ESFT_OK) return s;
    for (i = 0; i < n; i++) /* a bounce buffer only when the kernel copy may be refused */
        if (t[i].src && !t[i].src->memory_ && t[i].n_bytes > cap)
            cap = t[i].n_bytes < ESFT__COPY_CHUNK ? (size_t)t[i].n_bytes : ESFT__COPY_CHUNK;
    if (cap && !(bounce = ESFT__CAST(unsigned char *, a->alloc(a->user, cap))))
        return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, 0, "copy buffer");
    esft__buf_init(&hdr, a);
    esft__st_header_json(&hdr, t, n, mk, mv, n_meta);
    if (hdr.failed) s = esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, 0, "header of %d tensors", n);
    if (s == ESFT_OK) s = esft__out_open(&o, path, err);
    if (s == ESFT_OK) {
        esft__put_le32(len8, (uint32_t)hdr.size);
        esft__put_le32(len8 + 4, (uint32_t)((uint64_t)hdr.size >> 32));
        s = esft__out_write(&o, len8, 8, err);
        if (s == ESFT_OK) s = esft__out_write(&o, hdr.data, hdr.size, err);
        for (i = 0; i < n && s == ESFT_OK; i++) s = esft__wt_emit(&o, t + i, bounce, cap, pr, err);
        if (s == ESFT_OK) s = esft__out_finish(&o, err);
        if (s == ESFT_OK) s = esft__out_commit(&o, err);
        esft__out_abort(&o);
    }
    esft__buf_free(&hdr);
    if (bounce) a->free(a->user, bounce);
    return s;
}

/* A public tensor description as a write entry, its byte size checked. */
static esft_status esft__wt_from(esft__wt *w, const esft_st_write_tensor *t, int i, const char *path,
                                 esft_error *err)
{
    uint64_t numel = 1;
    int d;
    memset(w, 0, sizeof *w);
    if (!esft__dtype_ok(t->dtype) || t->n_dims < 0 || t->n_dims > ESFT_ST_MAX_DIMS)
        return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "tensor %d: bad dtype or n_dims %d", i, t->n_dims);
    for (d = 0; d < t->n_dims; d++) {
        uint64_t dim = (uint64_t)t->shape[d];
        if (t->shape[d] < 0 || (dim && numel > (uint64_t)-1 / dim))
            return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "tensor %d: negative or overflowing shape", i);
        numel *= dim;
    }
    if (numel > ((uint64_t)-1 >> 1) / esft_dtype_size(t->dtype) || (uint64_t)(size_t)(numel * esft_dtype_size(t->dtype)) != numel * esft_dtype_size(t->dtype))
        return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "tensor %d: too large", i);
    if (t->f32 && t->dtype != ESFT_DTYPE_F32 && t->dtype != ESFT_DTYPE_F16 && t->dtype != ESFT_DTYPE_BF16)
        return esft__fail_at(err, ESFT_ERR_UNSUPPORTED, path, 0, "tensor %d: fp32 values are written as F32, F16 or BF16, not %s",
                             i, esft_dtype_name(t->dtype));
    if (numel && !t->f32 && !t->data)
        return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "tensor %d has no data", i);
    w->name = t->name;
    w->dtype = t->dtype;
    w->n_dims = t->n_dims;
    w->shape = t->shape;
    w->n_bytes = numel * esft_dtype_size(t->dtype);
    w->data = t->data;
    w->f32 = t->f32;
    return ESFT_OK;
}

static esft_status esft__write_public(const char *path, const esft_st_write_tensor *tensors, int n,
                                      const char *const *mk, const char *const *mv, int n_meta, esft_error *err)
{
    esft_allocator a = esft__allocator_or_default(NULL);
    esft__wt *w;
    int i;
    esft_status s = ESFT_OK;
    if (!path || n < 0 || (n && !tensors) || n_meta < 0)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path, tensors or counts invalid");
    w = ESFT__CAST(esft__wt *, esft__calloc(&a, (size_t)n, sizeof *w));
    if (!w) return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, 0, "%d tensors", n);
    for (i = 0; i < n && s == ESFT_OK; i++) s = esft__wt_from(w + i, tensors + i, i, path, err);
    if (s == ESFT_OK) s = esft__st_write(path, w, n, mk, mv, n_meta, NULL, &a, err);
    esft__release(&a, w);
    return s;
}

ESFTDEF esft_status esft_safetensors_write(const char *path, const esft_st_write_tensor *tensors, int n,
                                           const char *const *meta_keys, const char *const *meta_values,
                                           int n_meta, esft_error *err)
{
    esft__error_clear(err);
    return esft__write_public(path, tensors, n, meta_keys, meta_values, n_meta, err);
}

/* ---- Hugging Face tensor names ---------------------------------------- */

static const char *const esft__family_names[ESFT_FAMILY_COUNT] = {"deepseek_v2", "mixtral", "qwen_moe", "camelidae"};

static const char *const esft__part_names[ESFT_PART_COUNT] = {
    "none", "expert.gate", "expert.up", "expert.down", "router", "shared.gate", "shared.up",
    "shared.down", "shared.router", "adapter.down", "adapter.up", "experts.gate_up", "experts.down"};

/* One row per naming scheme: the name of each part ({l} layer, {e} expert),
   NULL where the family has no such tensor. A new MoE family is one new row. */
static const char *const esft__name_table[ESFT_FAMILY_COUNT][ESFT_PART_COUNT] = {
    /* DeepSeek-V2 / V3, ESFT */
    {NULL, "model.layers.{l}.mlp.experts.{e}.gate_proj.weight", "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
     "model.layers.{l}.mlp.experts.{e}.down_proj.weight", "model.layers.{l}.mlp.gate.weight",
     "model.layers.{l}.mlp.shared_experts.gate_proj.weight", "model.layers.{l}.mlp.shared_experts.up_proj.weight",
     "model.layers.{l}.mlp.shared_experts.down_proj.weight", NULL, NULL, NULL,
     "model.layers.{l}.mlp.experts.gate_up_proj", "model.layers.{l}.mlp.experts.down_proj"},
    /* Mixtral: w1 gate, w3 up, w2 down */
    {NULL, "model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",
     "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",
     "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight", "model.layers.{l}.block_sparse_moe.gate.weight",
     NULL, NULL, NULL, NULL, NULL, NULL},
    /* Qwen1.5-MoE / Qwen2-MoE */
    {NULL, "model.layers.{l}.mlp.experts.{e}.gate_proj.weight", "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
     "model.layers.{l}.mlp.experts.{e}.down_proj.weight", "model.layers.{l}.mlp.gate.weight",
     "model.layers.{l}.mlp.shared_expert.gate_proj.weight", "model.layers.{l}.mlp.shared_expert.up_proj.weight",
     "model.layers.{l}.mlp.shared_expert.down_proj.weight", "model.layers.{l}.mlp.shared_expert_gate.weight", NULL, NULL,
     "model.layers.{l}.mlp.experts.gate_up_proj", "model.layers.{l}.mlp.experts.down_proj"},
    /* Camelidae (PESC adapters after a dense FFN) */
    {NULL, NULL, NULL, NULL, "model.layers.{l}.mlp.moe_adapter.router.weight", NULL, NULL, NULL, NULL,
     "model.layers.{l}.mlp.moe_adapter.experts.expert_{e}.adapter_down.weight",
     "model.layers.{l}.mlp.moe_adapter.experts.expert_{e}.adapter_up.weight"},
};

/* Matches name against a pattern; {l} and {e} take decimal numbers (no leading
   zeros, at most 6 digits). */
static int esft__name_match(const char *pat, const char *s, int *layer, int *expert)
{
    *layer = *expert = -1;
    while (*pat) {
        if (pat[0] == '{' && (pat[1] == 'l' || pat[1] == 'e') && pat[2] == '}') {
            int v = 0, digits = 0;
            if (*s < '0' || *s > '9' || (s[0] == '0' && s[1] >= '0' && s[1] <= '9')) return 0;
            for (; *s >= '0' && *s <= '9'; s++) {
                if (++digits > 6) return 0;
                v = v * 10 + (*s - '0');
            }
            *(pat[1] == 'l' ? layer : expert) = v;
            pat += 3;
        } else if (*pat++ != *s++) {
            return 0;
        }
    }
    return *s == 0;
}

ESFTDEF int esft_tensor_name_parse(const char *name, esft_tensor_name *out)
{
    int f, p, l, e;
    esft_tensor_name none;
    none.family = ESFT_FAMILY_DEEPSEEK_V2;
    none.part = ESFT_PART_NONE;
    none.layer = none.expert = -1;
    if (out) *out = none;
    if (!name) return 0;
    for (f = 0; f < (int)ESFT_FAMILY_COUNT; f++)
        for (p = 1; p < (int)ESFT_PART_COUNT; p++) {
            const char *pat = esft__name_table[f][p];
            if (!pat || !esft__name_match(pat, name, &l, &e)) continue;
            if (out) {
                out->family = (esft_family)f;
                out->part = (esft_part)p;
                out->layer = l;
                out->expert = e;
            }
            return 1;
        }
    return 0;
}

ESFTDEF esft_status esft_tensor_name_format(char *buf, size_t cap, esft_family family, esft_part part,
                                            int layer, int expert)
{
    const char *pat;
    size_t n = 0;
    if (!buf || cap == 0 || (int)family < 0 || family >= ESFT_FAMILY_COUNT || (int)part < 0 || part >= ESFT_PART_COUNT)
        return ESFT_ERR_INVALID_ARGUMENT;
    buf[0] = 0;
    pat = esft__name_table[family][part];
    if (!pat) return ESFT_ERR_UNSUPPORTED;
    if (layer < 0 || (strstr(pat, "{e}") && expert < 0)) return ESFT_ERR_INVALID_ARGUMENT;
    while (*pat) {
        int w;
        if (pat[0] == '{' && (pat[1] == 'l' || pat[1] == 'e') && pat[2] == '}') {
            w = snprintf(buf + n, cap - n, "%d", pat[1] == 'l' ? layer : expert);
            pat += 3;
        } else {
            w = snprintf(buf + n, cap - n, "%c", *pat++);
        }
        if (w < 0 || (size_t)w >= cap - n) { buf[0] = 0; return ESFT_ERR_RANGE; }
        n += (size_t)w;
    }
    return ESFT_OK;
}

ESFTDEF const char *esft_family_name(esft_family f)
{
    return (int)f >= 0 && f < ESFT_FAMILY_COUNT ? esft__family_names[f] : "?";
}

ESFTDEF const char *esft_part_name(esft_part p)
{
    return (int)p >= 0 && p < ESFT_PART_COUNT ? esft__part_names[p] : "?";
}

static int esft__part_is_routed(esft_part p)
{
    return p == ESFT_PART_EXPERT_GATE || p == ESFT_PART_EXPERT_UP || p == ESFT_PART_EXPERT_DOWN ||
           p == ESFT_PART_ADAPTER_DOWN || p == ESFT_PART_ADAPTER_UP;
}

static int esft__part_is_fused(esft_part p)
{
    return p == ESFT_PART_FUSED_GATE_UP || p == ESFT_PART_FUSED_DOWN;
}

/* The fused tensor that holds a per-expert part. */
static esft_part esft__part_fused_of(esft_part p)
{
    if (p == ESFT_PART_EXPERT_GATE || p == ESFT_PART_EXPERT_UP) return ESFT_PART_FUSED_GATE_UP;
    return p == ESFT_PART_EXPERT_DOWN ? ESFT_PART_FUSED_DOWN : ESFT_PART_NONE;
}

ESFTDEF int esft_fused_slice(const int64_t *fs, int n_dims, esft_part part, int e, uint64_t *at, int64_t shape[2])
{
    int gate_up = part == ESFT_PART_EXPERT_GATE || part == ESFT_PART_EXPERT_UP;
    if (!fs || !at || !shape || n_dims != 3 || e < 0 || e >= fs[0] || fs[1] < 1 || fs[2] < 1) return 0;
    if (!gate_up && part != ESFT_PART_EXPERT_DOWN) return 0;
    if (gate_up && fs[1] % 2) return 0;
    shape[0] = gate_up ? fs[1] / 2 : fs[1];
    shape[1] = fs[2];
    *at = ((uint64_t)e * (uint64_t)fs[1] + (part == ESFT_PART_EXPERT_UP ? (uint64_t)shape[0] : 0)) * (uint64_t)fs[2];
    return 1;
}

static int esft__part_is_shared(esft_part p)
{
    return p == ESFT_PART_SHARED_GATE || p == ESFT_PART_SHARED_UP || p == ESFT_PART_SHARED_DOWN;
}

ESFTDEF int esft_expert_config_trains(const esft_expert_config *cfg, const char *name)
{
    esft_tensor_name tn;
    if (!cfg || !name) return 0;
    esft_tensor_name_parse(name, &tn);
    if (esft__part_is_routed(tn.part)) return esft_expert_config_has(cfg, tn.layer, tn.expert);
    if (esft__part_is_fused(tn.part)) return 0; /* the experts in it are, slice by slice */
    if (esft__part_is_shared(tn.part)) return cfg->shared_experts != 0;
    return cfg->non_expert_modules != 0;
}

/* ---- checkpoints: one file or shards + index --------------------------- */

typedef struct esft__ck_entry {
    const char *name;
    const char *file; /* index entries: the shard named for it */
    int shard, tensor;
} esft__ck_entry;

static int esft__cmp_ck_entry(const void *a, const void *b)
{
    return strcmp(ESFT__CAST(const esft__ck_entry *, a)->name, ESFT__CAST(const esft__ck_entry *, b)->name);
}

static int esft__is_file(const char *path)
{
    uint64_t size;
    int ok, fd = esft__fd_open_read(path);
    if (fd < 0) return 0;
    ok = esft__fd_size(fd, &size);
    esft__sys_close(fd);
    return ok;
}

/* 1 if something is at path (not opened: a FIFO would wait). */
static int esft__fd_exists(const char *path)
{
#if defined(_WIN32)
    struct _stat64 sb;
    return _stat64(path, &sb) == 0;
#else
    struct stat sb;
    return stat(path, &sb) == 0;
#endif
}

static const char *esft__basename(const char *path)
{
    const char *slash = strrchr(path, '/'), *back = strrchr(path, '\\');
    if (back && (!slash || back > slash)) slash = back;
    return slash ? slash + 1 : path;
}

/* A shard named by an index: a plain file name in the index's directory. */
static int esft__shard_name_ok(const char *s)
{
    return s[0] && !strchr(s, '/') && !strchr(s, '\\') && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

/* ck->strings_ = dir, NUL, then room for `extra` bytes; returns the room. */
static char *esft__ck_strings(esft_checkpoint *ck, const char *path_in_dir, size_t extra)
{
    const char *base = esft__basename(path_in_dir);
    size_t dlen = (size_t)(base - path_in_dir);
    char *p = ESFT__CAST(char *, esft__calloc(&ck->allocator, dlen + 2 + extra, 1));
    if (!p) return NULL;
    ck->strings_ = p;
    if (dlen == 0) memcpy(p, ".", 2);
    else {
        memcpy(p, path_in_dir, dlen > 1 ? dlen - 1 : 1); /* drop the separator unless it is the root */
    }
    ck->dir = p;
    return p + dlen + 2;
}

/* Opens shard s (ck->shard_files[s]) in ck->dir. */
static esft_status esft__ck_open_shard(esft_checkpoint *ck, int s, esft_error *err)
{
    char path[4200];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", ck->dir, ck->shard_files[s]) >= sizeof path)
        return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, ck->shard_files[s], 0, "path too long");
    return esft_safetensors_open(ck->shards + s, path, &ck->allocator, err);
}

static esft_status esft__ck_alloc_shards(esft_checkpoint *ck, int n, esft_error *err)
{
    int i;
    ck->shards = ESFT__CAST(esft_safetensors *, esft__calloc(&ck->allocator, (size_t)n, sizeof *ck->shards));
    ck->shard_files = ESFT__CAST(const char **, esft__calloc(&ck->allocator, (size_t)n, sizeof(char *)));
    if (!ck->shards || !ck->shard_files) return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "%d shards", n);
    for (i = 0; i < n; i++) ck->shards[i].fd_ = -1;
    ck->n_shards = n;
    return ESFT_OK;
}

/* The sorted name table over all shards; a name in two shards is an error. */
static esft_status esft__ck_build_names(esft_checkpoint *ck, esft_error *err)
{
    esft__ck_entry *e;
    int s, i, n = 0;
    for (s = 0; s < ck->n_shards; s++) n += ck->shards[s].n_tensors;
    e = ESFT__CAST(esft__ck_entry *, esft__calloc(&ck->allocator, (size_t)n, sizeof *e));
    ck->names = ESFT__CAST(const char **, esft__calloc(&ck->allocator, (size_t)n, sizeof(char *)));
    ck->name_shard = ESFT__CAST(int *, esft__calloc(&ck->allocator, (size_t)n, sizeof(int)));
    ck->name_tensor = ESFT__CAST(int *, esft__calloc(&ck->allocator, (size_t)n, sizeof(int)));
    if (!e || !ck->names || !ck->name_shard || !ck->name_tensor) {
        esft__release(&ck->allocator, e);
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "name table of %d tensors", n);
    }
    for (s = 0, n = 0; s < ck->n_shards; s++)
        for (i = 0; i < ck->shards[s].n_tensors; i++, n++) {
            e[n].name = ck->shards[s].tensors[i].name;
            e[n].shard = s;
            e[n].tensor = i;
            ck->total_bytes += ck->shards[s].tensors[i].n_bytes;
        }
    qsort(e, (size_t)n, sizeof *e, esft__cmp_ck_entry);
    for (i = 0; i < n; i++) {
        if (i && strcmp(e[i - 1].name, e[i].name) == 0) {
            esft__fail_at(err, ESFT_ERR_PARSE, ck->dir, 0, "tensor '%s' is in two shards: %s and %s", e[i].name,
                          ck->shard_files[e[i - 1].shard], ck->shard_files[e[i].shard]);
            esft__release(&ck->allocator, e);
            return ESFT_ERR_PARSE;
        }
        ck->names[i] = e[i].name;
        ck->name_shard[i] = e[i].shard;
        ck->name_tensor[i] = e[i].tensor;
    }
    ck->n_tensors = n;
    esft__release(&ck->allocator, e);
    return ESFT_OK;
}

static esft_status esft__ck_open_single(esft_checkpoint *ck, const char *path, esft_error *err)
{
    char *room = esft__ck_strings(ck, path, strlen(esft__basename(path)) + 1);
    esft_status s;
    if (!room) return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "checkpoint");
    if ((s = esft__ck_alloc_shards(ck, 1, err)) != ESFT_OK) return s;
    memcpy(room, esft__basename(path), strlen(esft__basename(path)) + 1);
    ck->shard_files[0] = room;
    if ((s = esft__ck_open_shard(ck, 0, err)) != ESFT_OK) return s;
    return esft__ck_build_names(ck, err);
}

/* Index entries against the shards, both ways (e sorted by name). */
static esft_status esft__ck_check_index(const esft_checkpoint *ck, const esft__ck_entry *e, int n, const char *index,
                                        esft_error *err)
{
    int i = 0, j = 0;
    while (i < ck->n_tensors || j < n) {
        int c = i == ck->n_tensors ? 1 : j == n ? -1 : strcmp(ck->names[i], e[j].name);
        if (c < 0)
            return esft__fail_at(err, ESFT_ERR_PARSE, index, 0, "shard %s holds tensor '%s' that the index does not list",
                                 ck->shard_files[ck->name_shard[i]], ck->names[i]);
        if (c > 0)
            return esft__fail_at(err, ESFT_ERR_PARSE, index, 0, "the index puts tensor '%s' in %s, but no shard holds it",
                                 e[j].name, e[j].file);
        if (strcmp(ck->shard_files[ck->name_shard[i]], e[j].file) != 0)
            return esft__fail_at(err, ESFT_ERR_PARSE, index, 0, "the index puts tensor '%s' in %s, but it is in %s", e[j].name,
                                 e[j].file, ck->shard_files[ck->name_shard[i]]);
        i++;
        j++;
    }
    return ESFT_OK;
}

/* weight_map entries into e (n of them), strings into the arena. */
static esft_status esft__ck_parse_index(const esft_json *js, esft__ck_entry *e, char *arena, size_t cap,
                                        const char *index, esft_error *err)
{
    int wm = js->tokens[0].type == ESFT_JSON_OBJECT ? esft_json_find(js, 0, "weight_map") : -1, i, k;
    size_t used = 0;
    if (wm < 0 || js->tokens[wm].type != ESFT_JSON_OBJECT)
        return esft__fail_at(err, ESFT_ERR_PARSE, index, 0, "no \"weight_map\" object");
    for (i = 0, k = wm + 1; i < js->tokens[wm].size; i++, k = js->tokens[k + 1].next) {
        e[i].name = esft__arena_string(js, k, arena, cap, &used);
        e[i].file = js->tokens[k + 1].type == ESFT_JSON_STRING ? esft__arena_string(js, k + 1, arena, cap, &used) : NULL;
        if (!e[i].name || !e[i].file || !esft__shard_name_ok(e[i].file)) {
            esft__fail_at(err, ESFT_ERR_PARSE, index, 0, "weight_map entry %d: the shard must be a file name in the same directory", i);
            if (err) err->offset = (long)js->tokens[k].start;
            return ESFT_ERR_PARSE;
        }
    }
    return ESFT_OK;
}

/* The distinct shard files of the index, sorted, as ck's shards. */
static esft_status esft__ck_shards_from_index(esft_checkpoint *ck, const esft__ck_entry *e, int n, const char *index,
                                              esft_error *err)
{
    const char **files = ESFT__CAST(const char **, esft__calloc(&ck->allocator, (size_t)n, sizeof(char *)));
    int i, m = 0;
    esft_status s;
    if (!files) return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "shard list");
    for (i = 0; i < n; i++) files[i] = e[i].file;
    qsort(files, (size_t)n, sizeof *files, esft__cmp_str_ptr);
    for (i = 0; i < n; i++)
        if (!m || strcmp(files[m - 1], files[i]) != 0) files[m++] = files[i];
    s = m ? esft__ck_alloc_shards(ck, m, err) : esft__fail_at(err, ESFT_ERR_PARSE, index, 0, "the index lists no tensors");
    if (s == ESFT_OK) memcpy(ck->shard_files, files, (size_t)m * sizeof *files);
    esft__release(&ck->allocator, ESFT__CAST(void *, files));
    for (i = 0; i < m && s == ESFT_OK; i++) s = esft__ck_open_shard(ck, i, err);
    return s;
}

static esft_status esft__ck_open_index(esft_checkpoint *ck, const char *index, esft_error *err)
{
    char *text = NULL, *arena;
    size_t size = 0, cap;
    esft__ck_entry *e = NULL;
    esft_json js;
    int n, i;
    const char *dup;
    esft_status s = esft__read_file(index, ESFT_ST_MAX_HEADER, &ck->allocator, &text, &size, err);
    if (s != ESFT_OK) return s;
    s = esft_json_parse(&js, text, size, &ck->allocator, err);
    if (s != ESFT_OK) {
        esft__release(&ck->allocator, text);
        if (err) snprintf(err->file, sizeof err->file, "%s", index);
        return s;
    }
    cap = size + (size_t)js.n_tokens + 1;
    arena = esft__ck_strings(ck, index, cap);
    n = js.tokens[0].type == ESFT_JSON_OBJECT && esft_json_find(&js, 0, "weight_map") >= 0
            ? js.tokens[esft_json_find(&js, 0, "weight_map")].size : 0;
    e = ESFT__CAST(esft__ck_entry *, esft__calloc(&ck->allocator, (size_t)n, sizeof *e));
    if (!arena || !e) s = esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "index of %d entries", n);
    if (s == ESFT_OK) s = esft__ck_parse_index(&js, e, arena, cap, index, err);
    if (s == ESFT_OK) {
        qsort(e, (size_t)n, sizeof *e, esft__cmp_ck_entry);
        for (i = 1, dup = NULL; i < n && !dup; i++)
            if (strcmp(e[i - 1].name, e[i].name) == 0) dup = e[i].name;
        if (dup) s = esft__fail_at(err, ESFT_ERR_PARSE, index, 0, "the index lists tensor '%s' twice", dup);
    }
    if (s == ESFT_OK) s = esft__ck_shards_from_index(ck, e, n, index, err);
    if (s == ESFT_OK) s = esft__ck_build_names(ck, err);
    if (s == ESFT_OK) s = esft__ck_check_index(ck, e, n, index, err);
    ck->sharded = 1;
    esft__release(&ck->allocator, e);
    esft_json_free(&js);
    esft__release(&ck->allocator, text);
    return s;
}

/* ---- the merge record (ESFT_MERGE_RECORD) ----------------------------- */

/* What dir/ESFT_MERGE_RECORD says: *present 0 when there is none; *complete 1
   when its state is "complete"; *same_base 1 when its base_shards are ck's
   shards, names and sizes (ck may be NULL). A record that cannot be read or
   parsed counts as present and incomplete. */
static esft_status esft__merge_read_record(const char *dir, const esft_checkpoint *ck, const esft_allocator *a,
                                           int *present, int *complete, int *same_base)
{
    char path[4200], *text = NULL;
    size_t size = 0;
    esft_json js;
    int shards, i, k;
    *present = *complete = *same_base = 0;
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, ESFT_MERGE_RECORD) >= sizeof path) return ESFT_ERR_INVALID_ARGUMENT;
    if (!esft__fd_exists(path)) return ESFT_OK;
    *present = 1;
    if (esft__read_file(path, (uint64_t)16 << 20, a, &text, &size, NULL) != ESFT_OK) return ESFT_OK;
    if (esft_json_parse(&js, text, size, a, NULL) == ESFT_OK) {
        int state = js.tokens[0].type == ESFT_JSON_OBJECT ? esft_json_find(&js, 0, "state") : -1;
        *complete = state >= 0 && esft_json_string_equals(&js, state, "complete");
        shards = js.tokens[0].type == ESFT_JSON_OBJECT ? esft_json_find(&js, 0, "base_shards") : -1;
        if (ck && shards >= 0 && js.tokens[shards].type == ESFT_JSON_OBJECT && js.tokens[shards].size == ck->n_shards) {
            *same_base = 1;
            for (i = 0, k = shards + 1; i < ck->n_shards && *same_base; i++, k = js.tokens[k + 1].next) {
                double v;
                *same_base = esft_json_string_equals(&js, k, ck->shard_files[i]) &&
                             esft_json_number(&js, k + 1, &v) == ESFT_OK && v == (double)ck->shards[i].file_size;
            }
        }
        esft_json_free(&js);
    }
    esft__release(a, text);
    return ESFT_OK;
}

/* A checkpoint (path: its directory, or a file in it) whose directory holds an
   unfinished merge record is refused before any shard is opened: its shards
   may come from two merges, and that is the diagnosis to give. */
static esft_status esft__merge_check_record(const char *path, const esft_allocator *a, esft_error *err)
{
    char dir[4200];
    int present, complete, same;
#if defined(_WIN32)
    struct _stat64 sb;
    int is_dir = _stat64(path, &sb) == 0 && (sb.st_mode & _S_IFDIR);
#else
    struct stat sb;
    int is_dir = stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
#endif
    if (is_dir) snprintf(dir, sizeof dir, "%s", path);
    else esft__dir_of(path, dir, sizeof dir);
    esft__merge_read_record(dir, NULL, a, &present, &complete, &same);
    if (present && !complete)
        return esft__fail_at(err, ESFT_ERR_IO, dir, 0,
                             "an interrupted esft merge (%s is not \"complete\"): the shards may come from two merges; "
                             "run the merge again", ESFT_MERGE_RECORD);
    return ESFT_OK;
}

ESFTDEF esft_status esft_checkpoint_open(esft_checkpoint *ck, const char *path, const esft_allocator *allocator,
                                         esft_error *err)
{
    char buf[4200];
    size_t n;
    esft_status s;
    esft__error_clear(err);
    if (!ck || !path) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "checkpoint or path is NULL");
    memset(ck, 0, sizeof *ck);
    ck->allocator = esft__allocator_or_default(allocator);
    n = strlen(path);
    if (n == 0 || n > 4000) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path empty or too long");
    if ((s = esft__merge_check_record(path, &ck->allocator, err)) != ESFT_OK) return s;
    snprintf(buf, sizeof buf, "%s/model.safetensors.index.json", path);
    if (esft__is_file(buf)) s = esft__ck_open_index(ck, buf, err);
    else if (n > 11 && strcmp(path + n - 11, ".index.json") == 0) s = esft__ck_open_index(ck, path, err);
    else {
        snprintf(buf, sizeof buf, "%s/model.safetensors", path);
        s = esft__ck_open_single(ck, esft__is_file(buf) ? buf : path, err);
    }
    if (s != ESFT_OK) esft_checkpoint_close(ck);
    return s;
}

ESFTDEF void esft_checkpoint_close(esft_checkpoint *ck)
{
    int i;
    if (!ck || !ck->allocator.free) return;
    for (i = 0; ck->shards && i < ck->n_shards; i++) esft_safetensors_close(ck->shards + i);
    esft__release(&ck->allocator, ck->shards);
    esft__release(&ck->allocator, ESFT__CAST(void *, ck->shard_files));
    esft__release(&ck->allocator, ESFT__CAST(void *, ck->names));
    esft__release(&ck->allocator, ck->name_shard);
    esft__release(&ck->allocator, ck->name_tensor);
    esft__release(&ck->allocator, ck->strings_);
    memset(ck, 0, sizeof *ck);
}

ESFTDEF int esft_checkpoint_find(const esft_checkpoint *ck, const char *name, int *shard, int *index)
{
    int lo = 0, hi;
    if (!ck || !name) return 0;
    hi = ck->n_tensors - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, c = strcmp(ck->names[mid], name);
        if (c == 0) {
            if (shard) *shard = ck->name_shard[mid];
            if (index) *index = ck->name_tensor[mid];
            return 1;
        }
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return 0;
}

/* The index JSON as Hugging Face writes it (indent 2, keys sorted). */
static void esft__ck_index_json(esft__buf *b, const esft_checkpoint *ck)
{
    int i;
    esft__buf_printf(b, "{\n  \"metadata\": {\n    \"total_size\": %llu\n  },\n  \"weight_map\": {\n",
                     (unsigned long long)ck->total_bytes);
    for (i = 0; i < ck->n_tensors; i++) {
        esft__buf_puts(b, "    ");
        esft__buf_json_string(b, ck->names[i]);
        esft__buf_puts(b, ": ");
        esft__buf_json_string(b, ck->shard_files[ck->name_shard[i]]);
        esft__buf_puts(b, i + 1 < ck->n_tensors ? ",\n" : "\n");
    }
    esft__buf_puts(b, "  }\n}\n");
}

ESFTDEF esft_status esft_checkpoint_write_index(const char *path, const esft_checkpoint *ck, esft_error *err)
{
    esft__buf b;
    esft_status s;
    esft__error_clear(err);
    if (!path || !ck) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path or checkpoint is NULL");
    esft__buf_init(&b, &ck->allocator);
    esft__ck_index_json(&b, ck);
    s = b.failed ? esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, 0, "index") : esft__write_file_atomic(path, b.data, b.size, err);
    esft__buf_free(&b);
    return s;
}

/* ---- extract, save, merge --------------------------------------------- */

static int esft__config_ok(const esft_expert_config *cfg)
{
    return cfg && cfg->n_layers > 0 && cfg->offset && cfg->layer_present && (cfg->ids || cfg->offset[cfg->n_layers] == 0);
}

/* Marks the config entries (layer, expert) that tensor name belongs to. */
static void esft__config_mark(const esft_expert_config *cfg, const char *name, unsigned char *seen)
{
    esft_tensor_name tn;
    int j;
    if (!esft_tensor_name_parse(name, &tn) || !esft__part_is_routed(tn.part) || tn.layer >= cfg->n_layers) return;
    for (j = cfg->offset[tn.layer]; j < cfg->offset[tn.layer + 1]; j++)
        if (cfg->ids[j] == tn.expert) seen[j] = 1;
}

/* The extract plan: write entries, and names and shapes for fused slices. */
typedef struct esft__extract_plan {
    esft__wt *w;
    int n;
    char (*names)[160];   /* (cap_slices) per-expert names of fused slices */
    int64_t (*shapes)[2]; /* (cap_slices) their shapes */
    int n_slices, cap_slices;
} esft__extract_plan;

/* The slices of a fused tensor (layer tn->layer) that cfg selects, as
   per-expert tensors named as the family names them one by one, so the
   trained file looks the same whatever the base layout. */
static esft_status esft__extract_fused(esft__extract_plan *pl, const esft_expert_config *cfg,
                                       const esft_tensor_name *tn, const esft_safetensors *sh, int i,
                                       unsigned char *seen, const char *base, esft_error *err)
{
    static const esft_part gate_up[2] = {ESFT_PART_EXPERT_GATE, ESFT_PART_EXPERT_UP}, down[1] = {ESFT_PART_EXPERT_DOWN};
    const esft_st_tensor *t = sh->tensors + i;
    const esft_part *parts = tn->part == ESFT_PART_FUSED_GATE_UP ? gate_up : down;
    int n_parts = tn->part == ESFT_PART_FUSED_GATE_UP ? 2 : 1, j, k;
    size_t es = esft_dtype_size(t->dtype);
    if (tn->layer >= cfg->n_layers) return ESFT_OK;
    for (j = cfg->offset[tn->layer]; j < cfg->offset[tn->layer + 1]; j++) {
        int e = cfg->ids[j];
        if (e >= t->shape[0]) continue; /* reported by esft__config_all_seen */
        for (k = 0; k < n_parts; k++) {
            esft__wt *w = pl->w + pl->n;
            uint64_t at;
            if (pl->n_slices >= pl->cap_slices) return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "extract plan");
            if (!esft_fused_slice(t->shape, t->n_dims, parts[k], e, &at, pl->shapes[pl->n_slices]))
                return esft__fail_at(err, ESFT_ERR_SHAPE, base, 0, "fused expert tensor '%s' has shape %d-D, not (E, 2F, D) or (E, D, F)",
                                     t->name, t->n_dims);
            if (esft_tensor_name_format(pl->names[pl->n_slices], sizeof pl->names[0], tn->family, parts[k], tn->layer, e) != ESFT_OK)
                return esft__fail_at(err, ESFT_ERR_UNSUPPORTED, base, 0, "no per-expert name for '%s'", t->name);
            w->name = pl->names[pl->n_slices];
            w->dtype = t->dtype;
            w->n_dims = 2;
            w->shape = pl->shapes[pl->n_slices];
            w->n_bytes = (uint64_t)w->shape[0] * (uint64_t)w->shape[1] * es;
            w->src = sh;
            w->src_index = i;
            w->src_at = at * es;
            pl->n++;
            pl->n_slices++;
        }
        seen[j] = 1;
    }
    return ESFT_OK;
}

/* Every tensor of ck that cfg trains, whole or (fused experts) slice by slice. */
static esft_status esft__extract_collect(esft__extract_plan *pl, const esft_checkpoint *ck, const esft_expert_config *cfg,
                                         unsigned char *seen, esft__progress *pr, const char *base, esft_error *err)
{
    int sh, i, before;
    esft_status s = ESFT_OK;
    for (sh = 0; s == ESFT_OK && sh < ck->n_shards; sh++)
        for (i = 0; s == ESFT_OK && i < ck->shards[sh].n_tensors; i++) {
            const esft_st_tensor *t = ck->shards[sh].tensors + i;
            esft_tensor_name tn;
            esft__wt *w = pl->w + pl->n;
            before = pl->n;
            if (esft_tensor_name_parse(t->name, &tn) && esft__part_is_fused(tn.part)) {
                s = esft__extract_fused(pl, cfg, &tn, ck->shards + sh, i, seen, base, err);
                for (; before < pl->n; before++) pr->total += pl->w[before].n_bytes;
                continue;
            }
            if (!esft_expert_config_trains(cfg, t->name)) continue;
            esft__config_mark(cfg, t->name, seen);
            w->name = t->name;
            w->dtype = t->dtype;
            w->n_dims = t->n_dims;
            w->shape = t->shape;
            w->n_bytes = t->n_bytes;
            w->src = ck->shards + sh;
            w->src_index = i;
            pr->total += t->n_bytes;
            pl->n++;
        }
    return s;
}

/* Every (layer, expert) of cfg was seen. */
static esft_status esft__config_all_seen(const esft_expert_config *cfg, const unsigned char *seen, const char *base,
                                         esft_error *err)
{
    int l, j;
    for (l = 0; l < cfg->n_layers; l++)
        for (j = cfg->offset[l]; j < cfg->offset[l + 1]; j++)
            if (!seen[j])
                return esft__fail_at(err, ESFT_ERR_RANGE, base, 0,
                                     "the config selects expert %d of layer %d, but the checkpoint has no tensor of it",
                                     (int)cfg->ids[j], l);
    return ESFT_OK;
}

/* 1 if path is the file open as st (same device and inode, through links):
   writing there would rename the result over an input still being read. */
static int esft__is_open_file(const char *path, const esft_safetensors *st)
{
#if defined(_WIN32)
    (void)path; (void)st;
    return 0;
#else
    struct stat a, b;
    return st->fd_ >= 0 && stat(path, &a) == 0 && fstat(st->fd_, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino;
#endif
}

/* Refuses an output that is one of the checkpoint's shards or the file tr (may be NULL). */
static esft_status esft__refuse_input_as_output(const char *path, const esft_checkpoint *ck, const esft_safetensors *tr,
                                                esft_error *err)
{
    int sh;
    for (sh = 0; sh < ck->n_shards; sh++)
        if (esft__is_open_file(path, ck->shards + sh))
            return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "the output is the input %s/%s (the same file); choose another",
                                 ck->dir, ck->shard_files[sh]);
    if (tr && esft__is_open_file(path, tr))
        return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "the output is the trained input (the same file); choose another");
    return ESFT_OK;
}

ESFTDEF esft_status esft_checkpoint_extract(const char *base, const esft_expert_config *cfg, const char *out_path,
                                            const esft_checkpoint_options *opt, esft_error *err)
{
    esft_checkpoint ck;
    esft__extract_plan pl;
    unsigned char *seen = NULL;
    esft__buf meta;
    esft__progress pr;
    const char *keys[2] = {"format", ESFT_METADATA_CONFIG}, *values[2];
    size_t n_selected;
    esft_status s;
    esft__error_clear(err);
    if (!base || !out_path || !esft__config_ok(cfg))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "base, config or output path missing or empty");
    s = esft_checkpoint_open(&ck, base, opt ? opt->allocator : NULL, err);
    if (s != ESFT_OK) return s;
    s = esft__refuse_input_as_output(out_path, &ck, NULL, err);
    esft__buf_init(&meta, &ck.allocator);
    memset(&pr, 0, sizeof pr);
    memset(&pl, 0, sizeof pl);
    pr.opt = opt;
    n_selected = (size_t)cfg->offset[cfg->n_layers];
    pl.cap_slices = (int)(3 * n_selected); /* gate, up, down of each selected expert, at most */
    pl.w = ESFT__CAST(esft__wt *, esft__calloc(&ck.allocator, (size_t)ck.n_tensors + 3 * n_selected, sizeof *pl.w));
    pl.names = ESFT__CAST(char(*)[160], esft__calloc(&ck.allocator, 3 * n_selected + 1, sizeof *pl.names));
    pl.shapes = ESFT__CAST(int64_t(*)[2], esft__calloc(&ck.allocator, 3 * n_selected + 1, sizeof *pl.shapes));
    seen = ESFT__CAST(unsigned char *, esft__calloc(&ck.allocator, n_selected + 1, 1));
    if (s == ESFT_OK && (!pl.w || !pl.names || !pl.shapes || !seen)) s = esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "extract plan");
    if (s == ESFT_OK) s = esft__extract_collect(&pl, &ck, cfg, seen, &pr, base, err);
    if (s == ESFT_OK) s = esft__config_all_seen(cfg, seen, base, err);
    if (s == ESFT_OK && pl.n == 0) s = esft__fail_at(err, ESFT_ERR_RANGE, base, 0, "the config selects no tensor of the checkpoint");
    if (s == ESFT_OK) {
        esft__config_json(&meta, cfg);
        values[0] = "pt";
        values[1] = meta.data;
        s = meta.failed ? esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "metadata")
                        : esft__st_write(out_path, pl.w, pl.n, keys, values, 2, &pr, &ck.allocator, err);
    }
    esft__buf_free(&meta);
    esft__release(&ck.allocator, pl.w);
    esft__release(&ck.allocator, pl.names);
    esft__release(&ck.allocator, pl.shapes);
    esft__release(&ck.allocator, seen);
    esft_checkpoint_close(&ck);
    return s;
}

ESFTDEF esft_status esft_checkpoint_save_trained(const char *path, const esft_expert_config *cfg,
                                                 const esft_st_write_tensor *tensors, int n, esft_error *err)
{
    esft__buf meta;
    const char *keys[2] = {"format", ESFT_METADATA_CONFIG}, *values[2];
    int i;
    esft_status s;
    esft__error_clear(err);
    if (!path || !esft__config_ok(cfg) || n < 0 || (n && !tensors))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path, config or tensors missing");
    for (i = 0; i < n; i++)
        if (!tensors[i].name || !esft_expert_config_trains(cfg, tensors[i].name))
            return esft__fail_at(err, ESFT_ERR_RANGE, path, 0, "tensor '%s' is not trained under the expert config (only trained tensors are saved)",
                                 tensors[i].name ? tensors[i].name : "(null)");
    esft__buf_init(&meta, &cfg->allocator);
    esft__config_json(&meta, cfg);
    values[0] = "pt";
    values[1] = meta.data;
    s = meta.failed ? esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "metadata")
                    : esft__write_public(path, tensors, n, keys, values, 2, err);
    esft__buf_free(&meta);
    return s;
}

ESFTDEF esft_status esft_checkpoint_read_config(const esft_safetensors *st, esft_expert_config *out, esft_error *err)
{
    const char *text;
    esft__error_clear(err);
    if (!st || !out) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "file or output is NULL");
    memset(out, 0, sizeof *out);
    text = esft_safetensors_metadata(st, ESFT_METADATA_CONFIG);
    if (!text) return esft__fail(err, ESFT_ERR_PARSE, "no \"%s\" in the file's __metadata__", ESFT_METADATA_CONFIG);
    return esft_expert_config_parse(text, strlen(text), "__metadata__." ESFT_METADATA_CONFIG, out, err);
}

/* One span of a base shard that the merge takes from the trained file: the
   whole of a base tensor, or one expert's slice of a fused 3-D tensor. */
typedef struct esft__patch {
    int shard;
    uint64_t pos;   /* absolute byte position in the base shard file */
    uint64_t n;     /* bytes */
    int tr;         /* tensor index in the trained file */
} esft__patch;

static int esft__cmp_patch(const void *pa, const void *pb)
{
    const esft__patch *a = (const esft__patch *)pa, *b = (const esft__patch *)pb;
    if (a->shard != b->shard) return a->shard < b->shard ? -1 : 1;
    return a->pos < b->pos ? -1 : a->pos > b->pos;
}

/* Where a trained per-expert tensor goes in a base that keeps its experts in
   fused 3-D tensors: 1 with shard, tensor and byte offset, 0 if nowhere. */
static int esft__merge_find_fused(const esft_checkpoint *ck, const esft_st_tensor *t, int *shard, int *index,
                                  uint64_t *at, int64_t shape[2])
{
    esft_tensor_name tn;
    char fused[160];
    const esft_st_tensor *b;
    if (!esft_tensor_name_parse(t->name, &tn) || esft__part_fused_of(tn.part) == ESFT_PART_NONE) return 0;
    if (esft_tensor_name_format(fused, sizeof fused, tn.family, esft__part_fused_of(tn.part), tn.layer, -1) != ESFT_OK ||
        !esft_checkpoint_find(ck, fused, shard, index))
        return 0;
    b = ck->shards[*shard].tensors + *index;
    if (!esft_fused_slice(b->shape, b->n_dims, tn.part, tn.expert, at, shape)) return 0;
    *at *= esft_dtype_size(b->dtype);
    return 1;
}

/* The spans each trained tensor replaces, sorted by shard and position. Every
   trained tensor must match its base tensor (or fused slice) in dtype and
   shape, and no two may write the same bytes. */
static esft_status esft__merge_plan(const esft_checkpoint *ck, const esft_safetensors *tr, esft__patch *pt,
                                    const char *trained, esft_error *err)
{
    int j;
    for (j = 0; j < tr->n_tensors; j++) {
        const esft_st_tensor *t = tr->tensors + j, *b;
        char ts[160], bs[160];
        int64_t slice[2];
        uint64_t at = 0;
        int s, i, whole = esft_checkpoint_find(ck, t->name, &s, &i);
        if (!whole && !esft__merge_find_fused(ck, t, &s, &i, &at, slice))
            return esft__fail_at(err, ESFT_ERR_RANGE, trained, 0, "tensor '%s' is not in the base checkpoint", t->name);
        b = ck->shards[s].tensors + i;
        esft__shape_string(ts, sizeof ts, t->n_dims, t->shape);
        if (whole) esft__shape_string(bs, sizeof bs, b->n_dims, b->shape);
        else esft__shape_string(bs, sizeof bs, 2, slice);
        if (t->dtype != b->dtype || strcmp(ts, bs) != 0)
            return esft__fail_at(err, ESFT_ERR_SHAPE, trained, 0, "tensor '%s': trained %s %s, base %s %s%s (refusing to merge)",
                                 t->name, esft_dtype_name(t->dtype), ts, esft_dtype_name(b->dtype), bs,
                                 whole ? "" : " (its slice of a fused tensor)");
        pt[j].shard = s;
        pt[j].pos = b->offset + at;
        pt[j].n = t->n_bytes;
        pt[j].tr = j;
    }
    qsort(pt, (size_t)tr->n_tensors, sizeof *pt, esft__cmp_patch);
    for (j = 1; j < tr->n_tensors; j++)
        if (pt[j].shard == pt[j - 1].shard && pt[j - 1].pos + pt[j - 1].n > pt[j].pos)
            return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, trained, 0, "tensors '%s' and '%s' write the same bytes of the base",
                                 tr->tensors[pt[j - 1].tr].name, tr->tensors[pt[j].tr].name);
    return ESFT_OK;
}

/* One output shard: the base shard's bytes (header included, verbatim: dtypes,
   shapes and offsets are unchanged) with the n patched spans taken from the
   trained file. Runs of unchanged bytes are copied in one go. */
static esft_status esft__merge_shard(esft__out *o, const esft_safetensors *b, const esft__patch *pt, int n,
                                     const esft_safetensors *tr, unsigned char *buf, esft__progress *pr,
                                     esft_error *err)
{
    uint64_t at = 0, end = 8 + b->header_size;
    int i;
    esft_status s;
    for (i = 0; i < b->n_tensors; i++)
        if (b->tensors[i].offset + b->tensors[i].n_bytes > end) end = b->tensors[i].offset + b->tensors[i].n_bytes;
    for (i = 0; i < n; i++) {
        if ((s = esft__out_copy(o, b, at, pt[i].pos - at, buf, ESFT__COPY_CHUNK, pr, err)) != ESFT_OK) return s;
        s = esft__out_copy(o, tr, tr->tensors[pt[i].tr].offset, pt[i].n, buf, ESFT__COPY_CHUNK, pr, err);
        if (s != ESFT_OK) return s;
        at = pt[i].pos + pt[i].n;
    }
    return esft__out_copy(o, b, at, end - at, buf, ESFT__COPY_CHUNK, pr, err);
}

/* Creates dir if missing. */
static esft_status esft__make_dir(const char *dir, esft_error *err)
{
#if defined(_WIN32)
    if (_mkdir(dir) != 0 && errno != EEXIST)
#else
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
#endif
        return esft__fail_at(err, ESFT_ERR_IO, dir, 0, "cannot create the directory: %s", strerror(errno));
    return ESFT_OK;
}

/* Creates dir if missing; refuses the base checkpoint's own directory. */
static esft_status esft__merge_dir(const char *dir, const char *base_dir, esft_error *err)
{
    esft_status s = esft__make_dir(dir, err);
#if defined(_WIN32)
    if (s != ESFT_OK) return s;
    if (strcmp(dir, base_dir) == 0)
#else
    struct stat a, b;
    if (s != ESFT_OK) return s;
    if (stat(dir, &a) == 0 && stat(base_dir, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
#endif
        return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, dir, 0, "the output directory is the base checkpoint's; choose another");
    return ESFT_OK;
}

/* The files merge writes into out_dir: output i < n_shards is shard i, then
   the index (sharded bases only), then the record. */
static const char *esft__merge_output(const esft_checkpoint *ck, int i)
{
    if (i < ck->n_shards) return ck->shard_files[i];
    if (i == ck->n_shards && ck->sharded) return "model.safetensors.index.json";
    return i == ck->n_shards + ck->sharded ? ESFT_MERGE_RECORD : NULL;
}

static int esft__merge_is_output(const esft_checkpoint *ck, const char *name)
{
    int i;
    const char *o;
    for (i = 0; (o = esft__merge_output(ck, i)) != NULL; i++)
        if (strcmp(o, name) == 0) return 1;
    return 0;
}

/* 1 if name is a temp file of one of merge's outputs: "<output>.tmp.<pid>.<n>". */
static int esft__merge_is_own_temp(const esft_checkpoint *ck, const char *name)
{
    int i;
    const char *o;
    for (i = 0; (o = esft__merge_output(ck, i)) != NULL; i++) {
        size_t n = strlen(o);
        const char *p = name + n;
        int digits = 0, dots = 0;
        if (strncmp(name, o, n) != 0 || strncmp(p, ".tmp.", 5) != 0) continue;
        for (p += 5; *p; p++) {
            if (*p == '.' && digits && !dots) { dots = 1; digits = 0; }
            else if (*p >= '0' && *p <= '9') digits++;
            else break;
        }
        if (!*p && dots && digits) return 1;
    }
    return 0;
}

static int esft__ends_with(const char *s, const char *tail)
{
    size_t a = strlen(s), b = strlen(tail);
    return a >= b && strcmp(s + a - b, tail) == 0;
}

/* Looks at what out_dir holds before a merge writes there: checkpoint files
   (*.safetensors, *.index.json) are refused unless the directory is an earlier
   merge of the same base (same_base) and they are merge's own outputs; temp
   files of merge's outputs left by killed runs are removed (remove = 1, after a
   first pass that found nothing to refuse). Other files stay. */
static esft_status esft__merge_scan(const char *out_dir, const esft_checkpoint *ck, int same_base, int remove_temps,
                                    esft_error *err)
{
#if defined(_WIN32)
    (void)out_dir; (void)ck; (void)same_base; (void)remove_temps; (void)err;
    return ESFT_OK;
#else
    DIR *d = opendir(out_dir);
    struct dirent *ent;
    char path[4200];
    esft_status s = ESFT_OK;
    if (!d) return esft__fail_at(err, ESFT_ERR_IO, out_dir, 0, "cannot list the directory: %s", strerror(errno));
    while (s == ESFT_OK && (ent = readdir(d)) != NULL) {
        const char *name = ent->d_name;
        if (esft__merge_is_own_temp(ck, name)) {
            if (remove_temps && (size_t)snprintf(path, sizeof path, "%s/%s", out_dir, name) < sizeof path) remove(path);
        } else if ((esft__ends_with(name, ".safetensors") || esft__ends_with(name, ".index.json")) &&
                   (!same_base || !esft__merge_is_output(ck, name))) {
            s = esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, out_dir, 0,
                              "the directory already holds %s and is not an earlier merge of this base "
                              "(no %s naming the same shards); choose an empty directory", name, ESFT_MERGE_RECORD);
        }
    }
    closedir(d);
    return s;
#endif
}

/* The files of a model directory that are not weights but that a loader of
   the merged checkpoint needs: config.json, generation_config.json, tokenizer
   files, remote code (DeepSeek's modeling_*.py). */
static int esft__is_side_file(const char *name)
{
    if (esft__ends_with(name, ".index.json") || strcmp(name, ESFT_MERGE_RECORD) == 0) return 0;
    return esft__ends_with(name, ".json") || esft__ends_with(name, ".txt") || esft__ends_with(name, ".model") ||
           esft__ends_with(name, ".py") || esft__ends_with(name, ".tiktoken") || esft__ends_with(name, ".jinja");
}

/* Copies base's side files (base a directory) into out_dir, each atomically. */
static esft_status esft__merge_side_files(const char *base, const char *out_dir, const esft_checkpoint *ck,
                                          esft_error *err)
{
#if defined(_WIN32)
    (void)base; (void)out_dir; (void)ck; (void)err;
    return ESFT_OK;
#else
    struct stat sb;
    DIR *d;
    struct dirent *ent;
    esft_status s = ESFT_OK;
    if (stat(base, &sb) != 0 || !S_ISDIR(sb.st_mode)) return ESFT_OK; /* a bare file: nothing beside it is ours */
    if (!(d = opendir(base))) return esft__fail_at(err, ESFT_ERR_IO, base, 0, "cannot list the directory: %s", strerror(errno));
    while (s == ESFT_OK && (ent = readdir(d)) != NULL) {
        char from[4200], to[4200], *text = NULL;
        size_t size = 0;
        if (!esft__is_side_file(ent->d_name)) continue;
        if ((size_t)snprintf(from, sizeof from, "%s/%s", base, ent->d_name) >= sizeof from ||
            (size_t)snprintf(to, sizeof to, "%s/%s", out_dir, ent->d_name) >= sizeof to)
            s = esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, ent->d_name, 0, "path too long");
        else if (stat(from, &sb) == 0 && S_ISREG(sb.st_mode) &&
                 (s = esft__read_file(from, (uint64_t)256 << 20, &ck->allocator, &text, &size, err)) == ESFT_OK)
            s = esft__write_file_atomic(to, text, size, err);
        esft__release(&ck->allocator, text);
    }
    closedir(d);
    return s;
#endif
}

/* Makes out_dir ready: created, not the base's, nothing foreign in it, stale
   temp files of killed merges removed. */
static esft_status esft__merge_prepare(const char *out_dir, const esft_checkpoint *ck, esft_error *err)
{
    int present, complete, same_base;
    esft_status s = esft__merge_dir(out_dir, ck->dir, err);
    if (s != ESFT_OK) return s;
    esft__merge_read_record(out_dir, ck, &ck->allocator, &present, &complete, &same_base);
    if ((s = esft__merge_scan(out_dir, ck, present && same_base, 0, err)) != ESFT_OK) return s;
    return esft__merge_scan(out_dir, ck, present && same_base, 1, err);
}

/* Writes out_dir/ESFT_MERGE_RECORD: the state and the base's shards (names and
   sizes), atomically. */
static esft_status esft__merge_write_record(const char *out_dir, const esft_checkpoint *ck, const char *state,
                                            esft_error *err)
{
    char path[4200];
    esft__buf b;
    int i;
    if ((size_t)snprintf(path, sizeof path, "%s/%s", out_dir, ESFT_MERGE_RECORD) >= sizeof path)
        return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, out_dir, 0, "path too long");
    esft__buf_init(&b, &ck->allocator);
    esft__buf_printf(&b, "{\"state\": \"%s\", \"base_shards\": {", state);
    for (i = 0; i < ck->n_shards; i++) {
        esft__buf_puts(&b, i ? ", " : "");
        esft__buf_json_string(&b, ck->shard_files[i]);
        esft__buf_printf(&b, ": %llu", (unsigned long long)ck->shards[i].file_size);
    }
    esft__buf_puts(&b, "}}\n");
    return esft__write_buf_atomic(path, &b, err);
}

/* The base's index file: the path itself when it names one, else dir's. */
static void esft__merge_index_path(const char *base, const esft_checkpoint *ck, char *path, size_t cap)
{
    if (esft__ends_with(base, ".index.json")) snprintf(path, cap, "%s", base);
    else snprintf(path, cap, "%s/model.safetensors.index.json", ck->dir);
}

/* Writes every shard (and the index, a copy of the base's) as temp files, then
   commits them: record "renaming", the renames, record "complete". */
static esft_status esft__merge_write(const esft_checkpoint *ck, const esft_safetensors *tr, const esft__patch *pt,
                                     const char *base, const char *out_dir, esft__out *outs,
                                     unsigned char *buf, esft__progress *pr, esft_error *err)
{
    char path[4200];
    int sh, first = 0, n;
    esft_status s = ESFT_OK;
    for (sh = 0; esft__merge_output(ck, sh) && s == ESFT_OK; sh++) /* an output linked to an input: before any write */
        if ((size_t)snprintf(path, sizeof path, "%s/%s", out_dir, esft__merge_output(ck, sh)) < sizeof path)
            s = esft__refuse_input_as_output(path, ck, tr, err);
    for (sh = 0; sh <= ck->n_shards && s == ESFT_OK; sh++) {
        const char *file = esft__merge_output(ck, sh);
        if (sh == ck->n_shards && !ck->sharded) break;
        if ((size_t)snprintf(path, sizeof path, "%s/%s", out_dir, file) >= sizeof path)
            return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, out_dir, 0, "path too long");
        if ((s = esft__out_open(outs + sh, path, err)) != ESFT_OK) break;
        if (sh < ck->n_shards) {
            for (n = 0; first + n < tr->n_tensors && pt[first + n].shard == sh; n++) {}
            s = esft__merge_shard(outs + sh, ck->shards + sh, pt + first, n, tr, buf, pr, err);
            first += n;
        } else { /* names, shards, dtypes, shapes and sizes are the base's: so is its index, metadata included */
            char index[4200], *text = NULL;
            size_t size = 0;
            esft__merge_index_path(base, ck, index, sizeof index);
            s = esft__read_file(index, ESFT_ST_MAX_HEADER, &ck->allocator, &text, &size, err);
            if (s == ESFT_OK) s = esft__out_write(outs + sh, text, size, err);
            esft__release(&ck->allocator, text);
        }
    }
    /* fsync only now: writeback of each shard started while it was copied
       (esft__out_advance), so these wait for the last steps only */
    for (sh = 0; sh <= ck->n_shards && s == ESFT_OK; sh++)
        if (outs[sh].fd >= 0) s = esft__out_finish(outs + sh, err);
    if (s == ESFT_OK) s = esft__merge_side_files(base, out_dir, ck, err);
    if (s == ESFT_OK) s = esft__merge_write_record(out_dir, ck, "renaming", err);
    for (sh = 0; sh <= ck->n_shards && s == ESFT_OK; sh++)
        if (outs[sh].tmp[0]) s = esft__out_commit(outs + sh, err);
    if (s == ESFT_OK) s = esft__merge_write_record(out_dir, ck, "complete", err);
    return s;
}

ESFTDEF esft_status esft_checkpoint_merge(const char *base, const char *trained, const char *out_dir,
                                          const esft_checkpoint_options *opt, esft_error *err)
{
    esft_checkpoint ck;
    esft_safetensors tr;
    esft__patch *pt = NULL;
    int sh;
    esft__out *outs = NULL;
    unsigned char *buf = NULL;
    esft__progress pr;
    esft_status s;
    esft__error_clear(err);
    if (!base || !trained || !out_dir) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "base, trained or out_dir is NULL");
    s = esft_checkpoint_open(&ck, base, opt ? opt->allocator : NULL, err);
    if (s != ESFT_OK) return s;
    s = esft_safetensors_open(&tr, trained, &ck.allocator, err);
    if (s != ESFT_OK) { esft_checkpoint_close(&ck); return s; }
    memset(&pr, 0, sizeof pr);
    pr.opt = opt;
    for (sh = 0; sh < ck.n_shards; sh++) pr.total += ck.shards[sh].file_size;
    pt = ESFT__CAST(esft__patch *, esft__calloc(&ck.allocator, (size_t)tr.n_tensors + 1, sizeof *pt));
    outs = ESFT__CAST(esft__out *, esft__calloc(&ck.allocator, (size_t)ck.n_shards + 1, sizeof *outs));
    buf = ESFT__CAST(unsigned char *, esft__calloc(&ck.allocator, ESFT__COPY_CHUNK, 1));
    if (!pt || !outs || !buf) s = esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "merge buffers");
    for (sh = 0; outs && sh <= ck.n_shards; sh++) outs[sh].fd = -1;
    if (s == ESFT_OK) s = esft__merge_plan(&ck, &tr, pt, trained, err);
    if (s == ESFT_OK) s = esft__merge_prepare(out_dir, &ck, err);
    if (s == ESFT_OK) s = esft__merge_write(&ck, &tr, pt, base, out_dir, outs, buf, &pr, err);
    for (sh = 0; outs && sh <= ck.n_shards; sh++) esft__out_abort(outs + sh); /* temp files left by a failure */
    esft__release(&ck.allocator, pt);
    esft__release(&ck.allocator, outs);
    esft__release(&ck.allocator, buf);
    esft_safetensors_close(&tr);
    esft_checkpoint_close(&ck);
    return s;
}

/* ===================================================================== */
/* 13. JSON                                                              */
/* ===================================================================== */

#define ESFT__JSON_MAX_DEPTH 64

/* Two passes over the text: the first (counting) validates and counts the
   tokens, writing each to `scratch`; the second fills an array of exactly that
   many. Why: grown by doubling, the array took up to ~26x the text's bytes
   (a 250 MB summary.json needed 6.5 GB); counted first, it is 32 bytes a token,
   allocated once, and invalid JSON allocates nothing. */
typedef struct esft__json_parser {
    const char *s;
    size_t n, pos;
    esft_json *js;
    int counting;
    esft_json_token scratch;
    esft_error *err;
} esft__json_parser;

#define ESFT__JSON_MAX_TOKENS (1 << 28)

/* Token tok, or the scratch token while counting. */
static esft_json_token *esft__json_tok(esft__json_parser *p, int tok)
{
    return p->counting ? &p->scratch : p->js->tokens + tok;
}

static esft_status esft__json_error(esft__json_parser *p, const char *what)
{
    long line = 1;
    size_t i;
    for (i = 0; i < p->pos && i < p->n; i++) line += p->s[i] == '\n';
    esft__fail(p->err, ESFT_ERR_PARSE, "invalid JSON at line %ld, byte %lu: %s", line,
               (unsigned long)p->pos, what);
    if (p->err) { p->err->line = line; p->err->offset = (long)p->pos; }
    return ESFT_ERR_PARSE;
}

static void esft__json_skip_ws(esft__json_parser *p)
{
    while (p->pos < p->n && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' || p->s[p->pos] == '\n' ||
                             p->s[p->pos] == '\r'))
        p->pos++;
}

/* Appends a token; returns its index or -1 past ESFT__JSON_MAX_TOKENS. */
static int esft__json_push(esft__json_parser *p, esft_json_type type, size_t start)
{
    esft_json_token *t;
    if (p->js->n_tokens >= ESFT__JSON_MAX_TOKENS) return -1;
    t = esft__json_tok(p, p->js->n_tokens);
    t->type = type;
    t->start = t->end = start;
    t->size = 0;
    t->next = p->js->n_tokens + 1;
    return p->js->n_tokens++;
}

static int esft__is_hex(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static esft_status esft__json_string_token(esft__json_parser *p)
{
    int tok;
    p->pos++; /* opening quote */
    tok = esft__json_push(p, ESFT_JSON_STRING, p->pos);
    if (tok < 0) return esft__fail(p->err, ESFT_ERR_OUT_OF_MEMORY, "JSON tokens");
    while (p->pos < p->n) {
        unsigned char c = (unsigned char)p->s[p->pos];
        if (c == '"') {
            esft__json_tok(p, tok)->end = p->pos++;
            return ESFT_OK;
        }
        if (c < 0x20) return esft__json_error(p, "control character in string");
        if (c == '\\') {
            char e;
            if (++p->pos >= p->n) break;
            e = p->s[p->pos];
            if (e == 'u') {
                int i;
                for (i = 1; i <= 4; i++)
                    if (p->pos + (size_t)i >= p->n || !esft__is_hex(p->s[p->pos + (size_t)i]))
                        return esft__json_error(p, "bad \\u escape");
                p->pos += 4;
            } else if (!strchr("\"\\/bfnrt", e) || e == 0) {
                return esft__json_error(p, "bad escape");
            }
        }
        p->pos++;
    }
    return esft__json_error(p, "unterminated string");
}

static esft_status esft__json_number_token(esft__json_parser *p)
{
    size_t start = p->pos;
    int tok;
    const char *s = p->s;
    if (p->pos < p->n && s[p->pos] == '-') p->pos++;
    if (p->pos < p->n && s[p->pos] == '0') p->pos++;
    else if (p->pos < p->n && s[p->pos] >= '1' && s[p->pos] <= '9')
        while (p->pos < p->n && s[p->pos] >= '0' && s[p->pos] <= '9') p->pos++;
    else return esft__json_error(p, "bad number");
    if (p->pos < p->n && s[p->pos] == '.') {
        p->pos++;
        if (!(p->pos < p->n && s[p->pos] >= '0' && s[p->pos] <= '9')) return esft__json_error(p, "bad fraction");
        while (p->pos < p->n && s[p->pos] >= '0' && s[p->pos] <= '9') p->pos++;
    }
    if (p->pos < p->n && (s[p->pos] == 'e' || s[p->pos] == 'E')) {
        p->pos++;
        if (p->pos < p->n && (s[p->pos] == '+' || s[p->pos] == '-')) p->pos++;
        if (!(p->pos < p->n && s[p->pos] >= '0' && s[p->pos] <= '9')) return esft__json_error(p, "bad exponent");
        while (p->pos < p->n && s[p->pos] >= '0' && s[p->pos] <= '9') p->pos++;
    }
    tok = esft__json_push(p, ESFT_JSON_NUMBER, start);
    if (tok < 0) return esft__fail(p->err, ESFT_ERR_OUT_OF_MEMORY, "JSON tokens");
    esft__json_tok(p, tok)->end = p->pos;
    return ESFT_OK;
}

static esft_status esft__json_literal(esft__json_parser *p, const char *word, esft_json_type type)
{
    size_t n = strlen(word);
    int tok;
    if (p->n - p->pos < n || memcmp(p->s + p->pos, word, n) != 0) return esft__json_error(p, "unexpected character");
    tok = esft__json_push(p, type, p->pos);
    if (tok < 0) return esft__fail(p->err, ESFT_ERR_OUT_OF_MEMORY, "JSON tokens");
    p->pos += n;
    esft__json_tok(p, tok)->end = p->pos;
    return ESFT_OK;
}

static esft_status esft__json_value(esft__json_parser *p, int depth);

/* Arrays and objects: elements separated by commas, no trailing comma. */
static esft_status esft__json_container(esft__json_parser *p, int depth)
{
    int is_object = p->s[p->pos] == '{';
    char close = is_object ? '}' : ']';
    int tok = esft__json_push(p, is_object ? ESFT_JSON_OBJECT : ESFT_JSON_ARRAY, p->pos);
    if (tok < 0) return esft__fail(p->err, ESFT_ERR_OUT_OF_MEMORY, "JSON tokens");
    if (depth >= ESFT__JSON_MAX_DEPTH) return esft__json_error(p, "nesting deeper than 64");
    p->pos++;
    esft__json_skip_ws(p);
    if (p->pos < p->n && p->s[p->pos] == close) {
        p->pos++;
    } else {
        for (;;) {
            esft_status s;
            esft__json_skip_ws(p);
            if (is_object) {
                if (p->pos >= p->n || p->s[p->pos] != '"') return esft__json_error(p, "expected a string key");
                if ((s = esft__json_string_token(p)) != ESFT_OK) return s;
                esft__json_skip_ws(p);
                if (p->pos >= p->n || p->s[p->pos] != ':') return esft__json_error(p, "expected ':'");
                p->pos++;
            }
            if ((s = esft__json_value(p, depth + 1)) != ESFT_OK) return s;
            esft__json_tok(p, tok)->size++;
            esft__json_skip_ws(p);
            if (p->pos < p->n && p->s[p->pos] == ',') { p->pos++; continue; }
            if (p->pos < p->n && p->s[p->pos] == close) { p->pos++; break; }
            return esft__json_error(p, is_object ? "expected ',' or '}'" : "expected ',' or ']'");
        }
    }
    esft__json_tok(p, tok)->end = p->pos;
    esft__json_tok(p, tok)->next = p->js->n_tokens;
    return ESFT_OK;
}

static esft_status esft__json_value(esft__json_parser *p, int depth)
{
    char c;
    esft__json_skip_ws(p);
    if (p->pos >= p->n) return esft__json_error(p, "unexpected end of input");
    c = p->s[p->pos];
    if (c == '{' || c == '[') return esft__json_container(p, depth);
    if (c == '"') return esft__json_string_token(p);
    if (c == '-' || (c >= '0' && c <= '9')) return esft__json_number_token(p);
    if (c == 't') return esft__json_literal(p, "true", ESFT_JSON_TRUE);
    if (c == 'f') return esft__json_literal(p, "false", ESFT_JSON_FALSE);
    if (c == 'n') return esft__json_literal(p, "null", ESFT_JSON_NULL);
    return esft__json_error(p, "unexpected character");
}

/* One object key, decoded, for the duplicate check. */
typedef struct esft__json_key {
    const char *s;
    size_t n;
    int tok;
} esft__json_key;

static int esft__cmp_json_key(const void *pa, const void *pb)
{
    const esft__json_key *a = (const esft__json_key *)pa, *b = (const esft__json_key *)pb;
    int c = memcmp(a->s, b->s, a->n < b->n ? a->n : b->n);
    if (c) return c;
    if (a->n != b->n) return a->n < b->n ? -1 : 1;
    return a->tok < b->tok ? -1 : a->tok > b->tok;
}

static esft_status esft__json_decode(const esft_json *js, int tok, char *buf, size_t cap, size_t *out_len);

/* The keys of object obj into keys, decoded ("a" and "\u0061" are one key, as
   in Python), sorted; escaped keys are decoded into arena (which holds the
   object's raw key bytes plus one per key: decoding never lengthens a key). */
static void esft__json_object_keys(const esft_json *js, int obj, esft__json_key *keys, char *arena)
{
    int i, k;
    size_t used = 0;
    for (i = 0, k = obj + 1; i < js->tokens[obj].size; i++, k = js->tokens[k + 1].next) {
        const esft_json_token *t = js->tokens + k;
        keys[i].tok = k;
        keys[i].s = js->text + t->start;
        keys[i].n = t->end - t->start;
        if (arena && memchr(keys[i].s, '\\', keys[i].n)) {
            /* decoded <= raw: cannot run out */
            esft__json_decode(js, k, arena + used, keys[i].n + 1, &keys[i].n);
            keys[i].s = arena + used;
            used += keys[i].n + 1;
        }
    }
    qsort(keys, (size_t)js->tokens[obj].size, sizeof *keys, esft__cmp_json_key);
}

/* Python's json keeps the last of two equal keys; the readers here would keep
   the first: one file, two meanings. Refused: the first repeated key, in text
   order within the first object that has one, as a parse error at its place. */
static esft_status esft__json_no_duplicate_keys(esft__json_parser *p)
{
    const esft_json *js = p->js;
    esft__json_key *keys;
    char *arena = NULL, what[120];
    size_t max_bytes = 0;
    int i, j, max_n = 0, dup = -1, escaped;
    for (i = 0; i < js->n_tokens; i++) { /* the largest object: its key count and key bytes */
        int m, k;
        size_t bytes = 0;
        if (js->tokens[i].type != ESFT_JSON_OBJECT || js->tokens[i].size < 2) continue;
        for (m = 0, k = i + 1; m < js->tokens[i].size; m++, k = js->tokens[k + 1].next)
            bytes += js->tokens[k].end - js->tokens[k].start + 1;
        if (js->tokens[i].size > max_n) max_n = js->tokens[i].size;
        if (bytes > max_bytes) max_bytes = bytes;
    }
    if (max_n < 2) return ESFT_OK;
    escaped = memchr(js->text, '\\', js->length) != NULL;
    keys = ESFT__CAST(esft__json_key *, esft__calloc(&js->allocator, (size_t)max_n, sizeof *keys));
    if (escaped) arena = ESFT__CAST(char *, esft__calloc(&js->allocator, max_bytes, 1));
    if (!keys || (escaped && !arena)) {
        esft__release(&js->allocator, keys);
        esft__release(&js->allocator, arena);
        return esft__fail(p->err, ESFT_ERR_OUT_OF_MEMORY, "JSON key check");
    }
    for (i = 0; i < js->n_tokens && dup < 0; i++) {
        if (js->tokens[i].type != ESFT_JSON_OBJECT || js->tokens[i].size < 2) continue;
        esft__json_object_keys(js, i, keys, arena);
        for (j = 1; j < js->tokens[i].size; j++)
            if (keys[j].n == keys[j - 1].n && memcmp(keys[j].s, keys[j - 1].s, keys[j].n) == 0 &&
                (dup < 0 || keys[j].tok < dup))
                dup = keys[j].tok; /* the later of the two: sorted by token within equal keys */
    }
    esft__release(&js->allocator, keys);
    esft__release(&js->allocator, arena);
    if (dup < 0) return ESFT_OK;
    {
        const esft_json_token *t = js->tokens + dup;
        size_t n = t->end - t->start;
        snprintf(what, sizeof what, "duplicate key \"%.*s%s\"", n > 60 ? 60 : (int)n, js->text + t->start,
                 n > 60 ? "..." : "");
        p->pos = t->start - 1; /* the opening quote */
    }
    return esft__json_error(p, what);
}

ESFTDEF esft_status esft_json_parse(esft_json *out, const char *text, size_t length,
                                    const esft_allocator *allocator, esft_error *err)
{
    esft__json_parser p;
    esft_status s;
    if (!out) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "output is NULL");
    memset(out, 0, sizeof *out);
    if (!text && length) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "text is NULL");
    out->text = text ? text : "";
    out->length = length;
    out->allocator = esft__allocator_or_default(allocator);
    memset(&p, 0, sizeof p);
    p.s = out->text;
    p.n = length;
    p.js = out;
    p.err = err;
    for (p.counting = 1; p.counting >= 0; p.counting--) {
        p.pos = 0;
        out->n_tokens = 0;
        s = esft__json_value(&p, 0);
        if (s == ESFT_OK) {
            esft__json_skip_ws(&p);
            if (p.pos != p.n) s = esft__json_error(&p, "trailing characters after the value");
        }
        if (s != ESFT_OK) break;
        if (p.counting) {
            out->tokens = ESFT__CAST(esft_json_token *, esft__calloc(&out->allocator, (size_t)out->n_tokens, sizeof *out->tokens));
            if (!out->tokens) { s = esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "%d JSON tokens", out->n_tokens); break; }
        }
    }
    if (s == ESFT_OK) s = esft__json_no_duplicate_keys(&p);
    if (s != ESFT_OK) esft_json_free(out);
    return s;
}

ESFTDEF void esft_json_free(esft_json *js)
{
    if (!js) return;
    if (js->allocator.free) esft__release(&js->allocator, js->tokens);
    js->tokens = NULL;
    js->n_tokens = 0;
}

ESFTDEF esft_status esft_file_read(const char *path, uint64_t max_bytes, const esft_allocator *allocator,
                                   char **data, size_t *size, esft_error *err)
{
    esft_allocator a = esft__allocator_or_default(allocator);
    esft__error_clear(err);
    if (!path || !data || !size) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path or output is NULL");
    return esft__read_file(path, max_bytes ? max_bytes : ESFT__MAX_TEXT_FILE, &a, data, size, err);
}

ESFTDEF void esft_file_free(char *data, const esft_allocator *allocator)
{
    esft_allocator a = esft__allocator_or_default(allocator);
    esft__release(&a, data);
}

/* Four hex digits (validated by the tokenizer) as a number. */
static unsigned long esft__hex4(const char *h)
{
    unsigned long v = 0;
    int i;
    for (i = 0; i < 4; i++) {
        char c = h[i];
        v = v * 16 + (unsigned long)(c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
    }
    return v;
}

/* Decodes a string token's escapes into buf (cap >= 1). \u escapes become UTF-8,
   surrogate pairs joined. Returns ESFT_ERR_RANGE when buf is too small. */
static esft_status esft__json_decode(const esft_json *js, int tok, char *buf, size_t cap, size_t *out_len);

ESFTDEF esft_status esft_json_string(const esft_json *js, int tok, char *buf, size_t cap)
{
    size_t len;
    if (!js || tok < 0 || tok >= js->n_tokens || !buf || cap == 0) return ESFT_ERR_INVALID_ARGUMENT;
    if (js->tokens[tok].type != ESFT_JSON_STRING) return ESFT_ERR_INVALID_ARGUMENT;
    return esft__json_decode(js, tok, buf, cap, &len);
}

/* esft_json_string's decoding, with the decoded length (a \u0000 puts a NUL
   inside the text, so strlen would not give it). tok is a string token. */
static esft_status esft__json_decode(const esft_json *js, int tok, char *buf, size_t cap, size_t *out_len)
{
    const esft_json_token *t = js->tokens + tok;
    size_t i, n = 0;
    *out_len = 0;
    for (i = t->start; i < t->end; i++) {
        unsigned long cp;
        char c = js->text[i];
        char utf8[4];
        int len = 1, k;
        if (c != '\\') { utf8[0] = c; goto emit; }
        c = js->text[++i];
        switch (c) {
        case 'b': utf8[0] = '\b'; goto emit;
        case 'f': utf8[0] = '\f'; goto emit;
        case 'n': utf8[0] = '\n'; goto emit;
        case 'r': utf8[0] = '\r'; goto emit;
        case 't': utf8[0] = '\t'; goto emit;
        case 'u': break;
        default: utf8[0] = c; goto emit;
        }
        cp = esft__hex4(js->text + i + 1);
        i += 4;
        if (cp >= 0xD800 && cp < 0xDC00 && i + 6 < t->end + 1 && js->text[i + 1] == '\\' && js->text[i + 2] == 'u') {
            unsigned long lo = esft__hex4(js->text + i + 3);
            if (lo >= 0xDC00 && lo < 0xE000) { cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00); i += 6; }
        }
        if (cp < 0x80) utf8[0] = (char)cp;
        else if (cp < 0x800) { utf8[0] = (char)(0xC0 | (cp >> 6)); utf8[1] = (char)(0x80 | (cp & 0x3F)); len = 2; }
        else if (cp < 0x10000) {
            utf8[0] = (char)(0xE0 | (cp >> 12)); utf8[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
            utf8[2] = (char)(0x80 | (cp & 0x3F)); len = 3;
        } else {
            utf8[0] = (char)(0xF0 | (cp >> 18)); utf8[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
            utf8[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); utf8[3] = (char)(0x80 | (cp & 0x3F)); len = 4;
        }
    emit:
        if (n + (size_t)len >= cap) { buf[n] = 0; return ESFT_ERR_RANGE; }
        for (k = 0; k < len; k++) buf[n++] = utf8[k];
    }
    buf[n] = 0;
    *out_len = n;
    return ESFT_OK;
}

ESFTDEF int esft_json_string_equals(const esft_json *js, int tok, const char *s)
{
    char small[256];
    size_t n;
    if (!js || !s || tok < 0 || tok >= js->n_tokens || js->tokens[tok].type != ESFT_JSON_STRING) return 0;
    n = js->tokens[tok].end - js->tokens[tok].start;
    /* fast path: no escapes in the raw text */
    if (!memchr(js->text + js->tokens[tok].start, '\\', n))
        return strlen(s) == n && memcmp(js->text + js->tokens[tok].start, s, n) == 0;
    if (esft_json_string(js, tok, small, sizeof small) != ESFT_OK) return 0;
    return strcmp(small, s) == 0;
}

ESFTDEF int esft_json_find(const esft_json *js, int obj, const char *key)
{
    int i, k;
    if (!js || obj < 0 || obj >= js->n_tokens || js->tokens[obj].type != ESFT_JSON_OBJECT) return -1;
    for (i = 0, k = obj + 1; i < js->tokens[obj].size; i++, k = js->tokens[k + 1].next)
        if (esft_json_string_equals(js, k, key)) return k + 1;
    return -1;
}

ESFTDEF esft_status esft_json_number(const esft_json *js, int tok, double *out)
{
    size_t n;
    if (!js || !out || tok < 0 || tok >= js->n_tokens || js->tokens[tok].type != ESFT_JSON_NUMBER)
        return ESFT_ERR_INVALID_ARGUMENT;
    n = js->tokens[tok].end - js->tokens[tok].start;
    if (n >= 512) return ESFT_ERR_RANGE;
    if (!esft__strtod(js->text + js->tokens[tok].start, n, out)) return ESFT_ERR_PARSE;
    return isfinite(*out) ? ESFT_OK : ESFT_ERR_RANGE; /* 1e999 is valid JSON but no number here */
}

/* ===================================================================== */
/* 14. models                                                            */
/* ===================================================================== */

#ifndef ESFT_NO_MODELS

/* ---- config.json -------------------------------------------------------- */

/* Reads fields of one JSON object; the first failure sticks (later reads are
   no-ops), so a family's parser reads like the list of its fields. */
typedef struct esft__cfg_reader {
    const esft_json *js;
    int obj;
    const char *name;
    esft_error *err;
    esft_status status;
} esft__cfg_reader;

static int esft__cfg_token(esft__cfg_reader *r, const char *key)
{
    int t = r->status == ESFT_OK ? esft_json_find(r->js, r->obj, key) : -1;
    return t >= 0 && r->js->tokens[t].type == ESFT_JSON_NULL ? -1 : t;
}

static void esft__cfg_fail(esft__cfg_reader *r, esft_status s, const char *key, const char *why)
{
    if (r->status != ESFT_OK) return;
    r->status = esft__fail_at(r->err, s, r->name, 0, "field \"%s\": %s", key, why);
}

/* A number; def when absent or null (required: absent is an error). */
static double esft__cfg_number(esft__cfg_reader *r, const char *key, double def, int required)
{
    int t = esft__cfg_token(r, key);
    double v = def;
    if (t < 0) {
        if (required) esft__cfg_fail(r, ESFT_ERR_PARSE, key, "missing");
        return def;
    }
    if (r->js->tokens[t].type != ESFT_JSON_NUMBER || esft_json_number(r->js, t, &v) != ESFT_OK)
        esft__cfg_fail(r, ESFT_ERR_PARSE, key, "not a finite number");
    return v;
}

/* A whole number in [lo, hi]. */
static int esft__cfg_int(esft__cfg_reader *r, const char *key, int def, int required, int lo, int hi)
{
    double v = esft__cfg_number(r, key, def, required);
    if (r->status == ESFT_OK && (v != floor(v) || v < lo || v > hi)) {
        char why[96];
        snprintf(why, sizeof why, "%g is not a whole number in [%d, %d]", v, lo, hi);
        esft__cfg_fail(r, ESFT_ERR_PARSE, key, why);
    }
    return r->status == ESFT_OK ? (int)v : def;
}

static int esft__cfg_bool(esft__cfg_reader *r, const char *key, int def)
{
    int t = esft__cfg_token(r, key);
    if (t < 0) return def;
    if (r->js->tokens[t].type == ESFT_JSON_TRUE) return 1;
    if (r->js->tokens[t].type == ESFT_JSON_FALSE) return 0;
    esft__cfg_fail(r, ESFT_ERR_PARSE, key, "not true or false");
    return def;
}

/* 1 if the field is absent/null or equals one of the allowed strings (then
   *which is its index, -1 when absent); a string outside the list is
   ESFT_ERR_UNSUPPORTED. */
static int esft__cfg_choice(esft__cfg_reader *r, const char *key, const char *const *allowed, int n,
                            int *which)
{
    int t = esft__cfg_token(r, key), i;
    *which = -1;
    if (t < 0) return 1;
    if (r->js->tokens[t].type != ESFT_JSON_STRING) {
        esft__cfg_fail(r, ESFT_ERR_PARSE, key, "not a string");
        return 0;
    }
    for (i = 0; i < n; i++)
        if (esft_json_string_equals(r->js, t, allowed[i])) { *which = i; return 1; }
    {
        char value[64], why[160];
        if (esft_json_string(r->js, t, value, sizeof value) != ESFT_OK) snprintf(value, sizeof value, "(long)");
        snprintf(why, sizeof why, "\"%s\" is not implemented", value);
        esft__cfg_fail(r, ESFT_ERR_UNSUPPORTED, key, why);
    }
    return 0;
}

/* A field that, when present and true (or non-null), asks for something not
   implemented; why says what (NULL: a generic line). */
static void esft__cfg_refuse_true_why(esft__cfg_reader *r, const char *key, const char *why)
{
    int t = esft__cfg_token(r, key);
    if (t >= 0 && r->js->tokens[t].type != ESFT_JSON_FALSE)
        esft__cfg_fail(r, ESFT_ERR_UNSUPPORTED, key, why ? why : "only false/null is implemented");
}

static void esft__cfg_refuse_true(esft__cfg_reader *r, const char *key) { esft__cfg_refuse_true_why(r, key, NULL); }

static double esft__yarn_mscale(double scale, double mscale)
{
    return scale <= 1.0 ? 1.0 : 0.1 * mscale * log(scale) + 1.0;
}

/* rope_theta and rope scaling: transformers v5 writes one "rope_parameters"
   object, earlier versions rope_theta plus "rope_scaling". rope_dim is the
   number of rotated dims (YaRN's correction range depends on it). Returns
   YaRN's mscale_all_dim (0 when none) for the softmax scale. */
static double esft__cfg_rope(esft__cfg_reader *r, esft_model_config *c, int max_positions)
{
    static const char *const types[] = {"default", "yarn"};
    esft__cfg_reader s = *r;
    int t = esft__cfg_token(r, "rope_parameters"), type = -1;
    double factor, cfg_factor, mscale, mscale_all;
    if (t < 0) t = esft__cfg_token(r, "rope_scaling");
    c->rope.theta = esft__cfg_number(r, "rope_theta", 10000.0, 0);
    c->rope.attention_factor = 1.0;
    if (t < 0) return 0.0;
    if (r->js->tokens[t].type != ESFT_JSON_OBJECT) {
        esft__cfg_fail(r, ESFT_ERR_PARSE, "rope_scaling", "not an object");
        return 0.0;
    }
    s.obj = t;
    if (esft__cfg_token(&s, "rope_theta") >= 0) c->rope.theta = esft__cfg_number(&s, "rope_theta", 0, 1);
    if (esft__cfg_token(&s, "rope_type") >= 0) esft__cfg_choice(&s, "rope_type", types, 2, &type);
    else esft__cfg_choice(&s, "type", types, 2, &type);
    if (s.status != ESFT_OK) { r->status = s.status; return 0.0; }
    if (type != 1) return 0.0;
    c->rope.yarn = 1;
    factor = cfg_factor = esft__cfg_number(&s, "factor", 1.0, 1);
    c->rope.original_max_position = esft__cfg_int(&s, "original_max_position_embeddings", max_positions, 0, 1,
                                                  0x7FFFFFFF);
    /* transformers: with an original length given, the factor that sets the
       attention scaling is the ratio of the two lengths (DeepSeek-V3's rule) */
    if (esft__cfg_token(&s, "original_max_position_embeddings") >= 0 && max_positions > 0)
        factor = (double)max_positions / c->rope.original_max_position;
    c->rope.factor = factor;
    c->rope.beta_fast = esft__cfg_number(&s, "beta_fast", 32.0, 0);
    c->rope.beta_slow = esft__cfg_number(&s, "beta_slow", 1.0, 0);
    mscale = esft__cfg_number(&s, "mscale", 0.0, 0);
    mscale_all = esft__cfg_number(&s, "mscale_all_dim", 0.0, 0);
    if (esft__cfg_token(&s, "attention_factor") >= 0)
        c->rope.attention_factor = esft__cfg_number(&s, "attention_factor", 1.0, 1);
    else if (mscale != 0.0 && mscale_all != 0.0)
        c->rope.attention_factor = esft__yarn_mscale(factor, mscale) / esft__yarn_mscale(factor, mscale_all);
    else
        c->rope.attention_factor = esft__yarn_mscale(factor, 1.0);
    if (esft__cfg_bool(&s, "truncate", 1) != 1) esft__cfg_fail(&s, ESFT_ERR_UNSUPPORTED, "truncate", "only true");
    if (s.status != ESFT_OK) r->status = s.status;
    return mscale_all != 0.0 ? esft__yarn_mscale(cfg_factor, mscale_all) : 0.0;
}

/* Fields every family shares. */
static void esft__cfg_common(esft__cfg_reader *r, esft_model_config *c)
{
    static const char *const acts[] = {"silu"};
    int which;
    c->vocab = esft__cfg_int(r, "vocab_size", 0, 1, 1, 0x7FFFFFFF);
    c->d_model = esft__cfg_int(r, "hidden_size", 0, 1, 1, 1 << 20);
    c->n_layers = esft__cfg_int(r, "num_hidden_layers", 0, 1, 1, ESFT_MODEL_MAX_LAYERS);
    c->n_heads = esft__cfg_int(r, "num_attention_heads", 0, 1, 1, 1 << 16);
    c->n_kv_heads = esft__cfg_int(r, "num_key_value_heads", c->n_heads, 0, 1, 1 << 16);
    c->rms_eps = (float)esft__cfg_number(r, "rms_norm_eps", 1e-6, 0);
    c->tie_embeddings = esft__cfg_bool(r, "tie_word_embeddings", 0);
    esft__cfg_choice(r, "hidden_act", acts, 1, &which);
    if (r->status == ESFT_OK && c->n_heads % c->n_kv_heads != 0)
        esft__cfg_fail(r, ESFT_ERR_PARSE, "num_key_value_heads", "does not divide num_attention_heads");
}

/* The MoE / dense pattern of Qwen's configs: decoder_sparse_step and mlp_only_layers. */
static void esft__cfg_qwen_layers(esft__cfg_reader *r, esft_model_config *c)
{
    int step = esft__cfg_int(r, "decoder_sparse_step", 1, 0, 1, 1 << 20), l, t, i, k;
    for (l = 0; l < c->n_layers; l++) c->is_moe[l] = (unsigned char)((l + 1) % step == 0);
    t = esft__cfg_token(r, "mlp_only_layers");
    if (t < 0) return;
    if (r->js->tokens[t].type != ESFT_JSON_ARRAY) {
        esft__cfg_fail(r, ESFT_ERR_PARSE, "mlp_only_layers", "not an array");
        return;
    }
    for (i = 0, k = t + 1; i < r->js->tokens[t].size; i++, k = r->js->tokens[k].next) {
        double v;
        if (r->js->tokens[k].type != ESFT_JSON_NUMBER || esft_json_number(r->js, k, &v) != ESFT_OK ||
            v != floor(v) || v < 0 || v >= c->n_layers) {
            esft__cfg_fail(r, ESFT_ERR_PARSE, "mlp_only_layers", "holds something that is not a layer index");
            return;
        }
        c->is_moe[(int)v] = 0;
    }
}

static void esft__cfg_deepseek(esft__cfg_reader *r, esft_model_config *c, int v3)
{
    static const char *const methods[] = {"greedy", "group_limited_greedy", "noaux_tc"};
    static const char *const scorings[] = {"softmax", "sigmoid"};
    int method, scoring, first_dense, freq, E, K, l, max_pos;
    double mscale_all, scaling;
    c->mla = 1;
    c->q_lora_rank = esft__cfg_int(r, "q_lora_rank", 0, 0, 0, 1 << 20); /* null or 0: no q LoRA */
    c->kv_lora_rank = esft__cfg_int(r, "kv_lora_rank", 0, 1, 1, 1 << 20);
    c->qk_nope_dim = esft__cfg_int(r, "qk_nope_head_dim", 0, 1, 0, 1 << 16);
    c->qk_rope_dim = esft__cfg_int(r, "qk_rope_head_dim", 0, 1, 2, 1 << 16);
    c->v_head_dim = esft__cfg_int(r, "v_head_dim", 0, 1, 1, 1 << 16);
    c->n_kv_heads = c->n_heads;
    c->d_ff = esft__cfg_int(r, "intermediate_size", 0, 1, 1, 1 << 24);
    c->d_expert = esft__cfg_int(r, "moe_intermediate_size", 0, 1, 1, 1 << 24);
    c->d_shared = c->d_expert * esft__cfg_int(r, "n_shared_experts", 0, 0, 0, 1 << 10);
    E = esft__cfg_int(r, "n_routed_experts", 0, 1, 1, 1 << 16);
    K = esft__cfg_int(r, "num_experts_per_tok", 0, 1, 1, 1 << 16);
    first_dense = esft__cfg_int(r, "first_k_dense_replace", 0, 0, 0, 1 << 20);
    freq = esft__cfg_int(r, "moe_layer_freq", 1, 0, 1, 1 << 20);
    esft__cfg_choice(r, "topk_method", methods, 3, &method);
    esft__cfg_choice(r, "scoring_func", scorings, 2, &scoring);
    esft__cfg_refuse_true(r, "attention_bias");
    c->rope.interleaved = v3 ? esft__cfg_bool(r, "rope_interleave", 1) : 1;
    max_pos = esft__cfg_int(r, "max_position_embeddings", 0, 0, 0, 0x7FFFFFFF);
    if (r->status != ESFT_OK) return;
    c->route = esft_route_config_init(E, K);
    if (method < 0) method = v3 ? 2 : 0;
    if (scoring < 0) scoring = v3 ? 1 : 0;
    if (method == 2 && !v3) { esft__cfg_fail(r, ESFT_ERR_UNSUPPORTED, "topk_method", "noaux_tc is DeepSeek-V3's"); return; }
    if (v3 && method != 2) { esft__cfg_fail(r, ESFT_ERR_UNSUPPORTED, "topk_method", "DeepSeek-V3 routes with noaux_tc"); return; }
    c->route.gating = scoring == 1 ? ESFT_GATING_SIGMOID : ESFT_GATING_SOFTMAX;
    if (method >= 1) {
        c->route.n_group = esft__cfg_int(r, "n_group", 1, 1, 1, E);
        c->route.topk_group = esft__cfg_int(r, "topk_group", 1, 1, 1, E);
        c->route.group_score = method == 2 ? ESFT_GROUP_SCORE_TOP2_SUM : ESFT_GROUP_SCORE_MAX;
    }
    c->route_bias = v3;
    c->route.renormalize = K > 1 && esft__cfg_bool(r, "norm_topk_prob", v3);
    scaling = esft__cfg_number(r, "routed_scaling_factor", 1.0, 0);
    /* DeepSeek-V2 scales only weights it did not renormalise; V3 scales always */
    c->route.routed_scaling = (float)(!v3 && c->route.renormalize ? 1.0 : scaling);
    for (l = 0; l < c->n_layers; l++) c->is_moe[l] = (unsigned char)(l >= first_dense && l % freq == 0);
    mscale_all = esft__cfg_rope(r, c, max_pos);
    c->attn_scale = 1.0 / sqrt((double)(c->qk_nope_dim + c->qk_rope_dim));
    if (mscale_all != 0.0) c->attn_scale *= mscale_all * mscale_all;
}

static void esft__cfg_gqa(esft__cfg_reader *r, esft_model_config *c)
{
    c->head_dim = esft__cfg_int(r, "head_dim", r->status == ESFT_OK ? c->d_model / c->n_heads : 0, 0, 2, 1 << 16);
    if (r->status == ESFT_OK && c->head_dim % 2) esft__cfg_fail(r, ESFT_ERR_UNSUPPORTED, "head_dim", "odd");
    c->attn_scale = 1.0 / sqrt((double)c->head_dim);
    c->rope.interleaved = 0;
    esft__cfg_rope(r, c, esft__cfg_int(r, "max_position_embeddings", 0, 0, 0, 0x7FFFFFFF));
    if (esft__cfg_number(r, "partial_rotary_factor", 1.0, 0) != 1.0)
        esft__cfg_fail(r, ESFT_ERR_UNSUPPORTED, "partial_rotary_factor", "only 1");
}

static void esft__cfg_route_plain(esft__cfg_reader *r, esft_model_config *c, const char *experts_key,
                                  int renormalize_default)
{
    int E, K;
    /* transformers v5 writes Qwen3-MoE's expert count as num_local_experts */
    if (esft__cfg_token(r, experts_key) < 0 && esft__cfg_token(r, "num_local_experts") >= 0)
        experts_key = "num_local_experts";
    E = esft__cfg_int(r, experts_key, 0, 1, 1, 1 << 16);
    K = esft__cfg_int(r, "num_experts_per_tok", 0, 1, 1, 1 << 16);
    if (r->status != ESFT_OK) return;
    c->route = esft_route_config_init(E, K);
    c->route.renormalize = esft__cfg_bool(r, "norm_topk_prob", renormalize_default);
}

/* The dense families (Llama, Mistral, Qwen2): a SwiGLU MLP of intermediate_size
   in every layer and no router (is_moe all 0, route.n_experts 0), the models
   PESC turns into MoEs. Each refuses what its transformers class would compute
   and the forward does not. */
static void esft__cfg_dense(esft__cfg_reader *r, esft_model_config *c)
{
    esft__cfg_gqa(r, c);
    c->d_ff = esft__cfg_int(r, "intermediate_size", 0, 1, 1, 1 << 24);
    switch (c->family) {
    case ESFT_MODEL_LLAMA:
        c->qkv_bias = c->o_bias = esft__cfg_bool(r, "attention_bias", 0);
        esft__cfg_refuse_true_why(r, "mlp_bias", "true (biases on gate/up/down_proj) is not implemented");
        break;
    case ESFT_MODEL_MISTRAL:
        /* Mistral's class has no attention_bias: it ignores the field, and so do we */
        c->sliding_window = esft__cfg_int(r, "sliding_window", 0, 0, 0, 0x7FFFFFFF);
        break;
    default:
        /* Qwen2: q/k/v always biased; its window applies only to the layers
           from max_window_layers on, a per-layer mask the forward lacks */
        c->qkv_bias = 1;
        esft__cfg_refuse_true_why(r, "use_sliding_window",
                                  "true (a sliding window from max_window_layers on) is not implemented");
        break;
    }
}

static void esft__cfg_family(esft__cfg_reader *r, esft_model_config *c)
{
    int l;
    esft__cfg_common(r, c);
    if (r->status != ESFT_OK) return;
    switch (c->family) {
    case ESFT_MODEL_DEEPSEEK_V2:
    case ESFT_MODEL_DEEPSEEK_V3:
        esft__cfg_deepseek(r, c, c->family == ESFT_MODEL_DEEPSEEK_V3);
        break;
    case ESFT_MODEL_QWEN2_MOE:
    case ESFT_MODEL_QWEN3_MOE:
        esft__cfg_gqa(r, c);
        esft__cfg_route_plain(r, c, "num_experts", c->family == ESFT_MODEL_QWEN3_MOE);
        c->d_ff = esft__cfg_int(r, "intermediate_size", 0, 1, 1, 1 << 24);
        c->d_expert = esft__cfg_int(r, "moe_intermediate_size", 0, 1, 1, 1 << 24);
        esft__cfg_refuse_true(r, "use_sliding_window");
        if (c->family == ESFT_MODEL_QWEN2_MOE) {
            c->qkv_bias = 1;
            c->d_shared = esft__cfg_int(r, "shared_expert_intermediate_size", 0, 0, 0, 1 << 24);
            c->shared_gate = c->d_shared > 0;
        } else {
            c->qk_norm = ESFT_QK_NORM_HEAD;
            esft__cfg_refuse_true(r, "attention_bias");
        }
        esft__cfg_qwen_layers(r, c);
        break;
    case ESFT_MODEL_OLMOE:
        esft__cfg_gqa(r, c);
        esft__cfg_route_plain(r, c, "num_experts", 0);
        c->d_expert = esft__cfg_int(r, "intermediate_size", 0, 1, 1, 1 << 24);
        c->qk_norm = ESFT_QK_NORM_WHOLE;
        c->clip_qkv = (float)esft__cfg_number(r, "clip_qkv", 0.0, 0);
        esft__cfg_refuse_true(r, "attention_bias");
        for (l = 0; l < c->n_layers; l++) c->is_moe[l] = 1;
        break;
    case ESFT_MODEL_MIXTRAL:
        esft__cfg_gqa(r, c);
        esft__cfg_route_plain(r, c, "num_local_experts", 1);
        c->route.renormalize = 1;
        c->d_expert = esft__cfg_int(r, "intermediate_size", 0, 1, 1, 1 << 24);
        c->sliding_window = esft__cfg_int(r, "sliding_window", 0, 0, 0, 0x7FFFFFFF);
        for (l = 0; l < c->n_layers; l++) c->is_moe[l] = 1;
        break;
    case ESFT_MODEL_LLAMA:
    case ESFT_MODEL_MISTRAL:
    case ESFT_MODEL_QWEN2:
        esft__cfg_dense(r, c);
        break;
    default:
        break;
    }
}

/* FP8 checkpoints: quantization_config {"quant_method": "fp8", "weight_block_size": [BR, BC]}. */
static void esft__cfg_quantization(esft__cfg_reader *r, esft_model_config *c)
{
    static const char *const methods[] = {"fp8"};
    static const char *const formats[] = {"e4m3"};
    esft__cfg_reader q = *r;
    int t = esft__cfg_token(r, "quantization_config"), which, b;
    if (t < 0) return;
    q.obj = t;
    if (r->js->tokens[t].type != ESFT_JSON_OBJECT) {
        esft__cfg_fail(r, ESFT_ERR_PARSE, "quantization_config", "not an object");
        return;
    }
    esft__cfg_choice(&q, "quant_method", methods, 1, &which);
    if (q.status == ESFT_OK && which < 0) esft__cfg_fail(&q, ESFT_ERR_UNSUPPORTED, "quant_method", "missing");
    esft__cfg_choice(&q, "fmt", formats, 1, &which);
    b = esft__cfg_token(&q, "weight_block_size");
    c->fp8_block_rows = c->fp8_block_cols = 128;
    if (b >= 0) {
        const esft_json_token *tk = q.js->tokens + b;
        double v0, v1;
        if (tk->type != ESFT_JSON_ARRAY || tk->size != 2 || esft_json_number(q.js, b + 1, &v0) != ESFT_OK ||
            esft_json_number(q.js, b + 2, &v1) != ESFT_OK || v0 < 1 || v1 < 1 || v0 != floor(v0) ||
            v1 != floor(v1) || v0 > 1 << 20 || v1 > 1 << 20)
            esft__cfg_fail(&q, ESFT_ERR_PARSE, "weight_block_size", "not two positive whole numbers");
        else {
            c->fp8_block_rows = (int)v0;
            c->fp8_block_cols = (int)v1;
        }
    }
    if (q.status != ESFT_OK) r->status = q.status;
}

ESFTDEF const char *esft_model_family_name(esft_model_family f)
{
    static const char *const names[ESFT_MODEL_FAMILY_COUNT] = {"deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe",
                                                              "olmoe",       "mixtral",     "llama",     "mistral",
                                                              "qwen2"};
    return (int)f >= 0 && f < ESFT_MODEL_FAMILY_COUNT ? names[f] : "?";
}

ESFTDEF int esft_model_config_moe_layers(const esft_model_config *cfg)
{
    int l, n = 0;
    if (!cfg) return 0;
    for (l = 0; l < cfg->n_layers && l < ESFT_MODEL_MAX_LAYERS; l++) n += cfg->is_moe[l] != 0;
    return n;
}

ESFTDEF esft_status esft_model_config_parse(esft_model_config *cfg, const char *text, size_t size,
                                            const char *name, esft_error *err)
{
    esft_json js;
    esft__cfg_reader r;
    esft_status s;
    int t, f;
    if (!cfg || (!text && size)) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL config or text");
    memset(cfg, 0, sizeof *cfg);
    if (!name) name = "config.json";
    s = esft_json_parse(&js, text, size, NULL, err);
    if (s != ESFT_OK) return esft__locate(err, s, name, err ? err->line : 0);
    r.js = &js;
    r.obj = 0;
    r.name = name;
    r.err = err;
    r.status = js.tokens[0].type == ESFT_JSON_OBJECT
                   ? ESFT_OK
                   : esft__fail_at(err, ESFT_ERR_PARSE, name, 0, "config.json is not a JSON object");
    t = esft__cfg_token(&r, "model_type");
    if (r.status == ESFT_OK && t < 0) esft__cfg_fail(&r, ESFT_ERR_PARSE, "model_type", "missing");
    for (f = 0; r.status == ESFT_OK && f < ESFT_MODEL_FAMILY_COUNT; f++)
        if (esft_json_string_equals(&js, t, esft_model_family_name((esft_model_family)f))) break;
    if (r.status == ESFT_OK && f == ESFT_MODEL_FAMILY_COUNT) {
        char value[64], why[240];
        if (esft_json_string(&js, t, value, sizeof value) != ESFT_OK) snprintf(value, sizeof value, "?");
        snprintf(why, sizeof why,
                 "\"%s\" is not one of deepseek_v2, deepseek_v3, qwen2_moe, qwen3_moe, olmoe, mixtral, llama, mistral, "
                 "qwen2", value);
        esft__cfg_fail(&r, ESFT_ERR_UNSUPPORTED, "model_type", why);
    }
    if (r.status == ESFT_OK) {
        cfg->family = (esft_model_family)f;
        esft__cfg_family(&r, cfg);
        esft__cfg_quantization(&r, cfg);
    }
    /* a dense model has no router to check (route.n_experts stays 0) */
    if (r.status == ESFT_OK && esft_model_config_moe_layers(cfg) > 0) {
        esft_route_config rc = cfg->route;
        esft_error e2;
        if (esft_route_config_validate(&rc, &e2) != ESFT_OK)
            r.status = esft__fail_at(err, ESFT_ERR_PARSE, name, 0, "routing: %s", e2.message);
    }
    esft_json_free(&js);
    return r.status;
}

ESFTDEF esft_status esft_model_config_read(esft_model_config *cfg, const char *path, esft_error *err)
{
    esft_allocator a = esft__allocator_or_default(NULL);
    char *text;
    size_t n;
    esft_status s;
    if (!cfg || !path) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL config or path");
    s = esft__read_file(path, (uint64_t)16 << 20, &a, &text, &n, err);
    if (s != ESFT_OK) return s;
    s = esft_model_config_parse(cfg, text, n, path, err);
    a.free(a.user, text);
    return s;
}

/* ---- matrices in their file dtype ----------------------------------------- */

/* FP8 E4M3 (the "fn" variant: no infinities, S.1111.111 is NaN) to fp32. */
static float esft__fp8_e4m3_to_f32(unsigned char b)
{
    uint32_t sign = (uint32_t)(b & 0x80u) << 24, e = (b >> 3) & 0xFu, m = b & 0x7u;
    if (e == 0xFu && m == 0x7u) return esft__bits_f32(sign | 0x7FC00000u);
    if (e == 0) {
        float v = (float)m * (1.0f / 512.0f); /* subnormal: m * 2^-9 */
        return sign ? -v : v;
    }
    return esft__bits_f32(sign | ((e + 120u) << 23) | (m << 20));
}

/* Rows r0 .. r0+n of W as fp32 into dst (n, cols). */
static void esft__matrix_rows_f32(float *dst, const esft_matrix *W, int r0, int n)
{
    size_t cols = (size_t)W->cols, count = (size_t)n * cols;
    if (W->dtype != ESFT_DTYPE_F8_E4M3) {
        const unsigned char *src = ESFT__CAST(const unsigned char *, W->data) +
                                   (size_t)r0 * cols * esft_dtype_size(W->dtype);
        (void)esft_convert_to_f32(dst, src, W->dtype, count);
        return;
    }
    {
        const unsigned char *src = ESFT__CAST(const unsigned char *, W->data) + (size_t)r0 * cols;
        int scale_cols = (W->cols + W->block_cols - 1) / W->block_cols, r;
        for (r = 0; r < n; r++) {
            const float *srow = W->scale + (size_t)((r0 + r) / W->block_rows) * scale_cols;
            size_t c;
            for (c = 0; c < cols; c++)
                dst[(size_t)r * cols + c] = esft__fp8_e4m3_to_f32(src[(size_t)r * cols + c]) * srow[c / W->block_cols];
        }
    }
}

/* Floats of one thread's conversion panel: rows of a non-fp32 matrix are turned
   into fp32 this many at a time right before the product reads them (1 MB:
   stays in L2/L3; a panel of >= 32 rows keeps the GEMM's packing cost at a few
   per cent of its arithmetic). */
#define ESFT__PANEL_FLOATS ((size_t)256 * 1024)

static int esft__panel_rows(const esft_matrix *W)
{
    size_t rows = ESFT__PANEL_FLOATS / (size_t)W->cols;
    if (rows >= 32) rows -= rows % 32;
    return rows < 1 ? 1 : rows > (size_t)W->rows ? W->rows : (int)rows;
}

/* y (T, W.rows) = x (T, W.cols) W^T, y's rows ldy apart and x's ldx. W in any
   of its dtypes; panel holds ESFT__PANEL_FLOATS (unused for fp32 W). */
/* Rows of T a LoRA product can take at once: its (rows, r) intermediate fits the panel. */
static int esft__lora_chunk(const esft_lora *a) { return (int)(ESFT__PANEL_FLOATS / (size_t)a->rank); }

/* The adapter's part of a product with W: forward, y (T, W.rows) += scale
   (x A^T) B^T (of y = x W^T); backward, y (T, W.cols) += scale (x B) A (of
   y += x W). The (rows of T, r) intermediate lives in panel. */
static void esft__lora_apply(float *y, int ldy, const float *x, int ldx, int T, const esft_matrix *W, int backward,
                             float *panel)
{
    const esft_lora *a = W->lora;
    int t0, step = esft__lora_chunk(a), r = a->rank, in = backward ? W->rows : W->cols;
    int out = backward ? W->cols : W->rows;
    const float *first = backward ? a->b : a->a, *second = backward ? a->a : a->b;
    for (t0 = 0; t0 < T; t0 += step) {
        int n = T - t0 < step ? T - t0 : step;
        esft__sgemm(0, !backward, n, r, in, 1.0f, x + (size_t)t0 * ldx, ldx, first, backward ? r : in, 0.0f, panel, r);
        esft__sgemm(0, !backward, n, out, r, a->scale, panel, r, second, backward ? out : r, 1.0f,
                    y + (size_t)t0 * ldy, ldy);
    }
}

static void esft__matmul(float *y, int ldy, const float *x, int ldx, int T, const esft_matrix *W, float *panel)
{
    int r0, step;
    if (W->dtype == ESFT_DTYPE_F32) {
        esft__sgemm(0, 1, T, W->rows, W->cols, 1.0f, x, ldx, ESFT__CAST(const float *, W->data), W->cols, 0.0f, y,
                    ldy);
    } else {
        step = esft__panel_rows(W);
        for (r0 = 0; r0 < W->rows; r0 += step) {
            int n = W->rows - r0 < step ? W->rows - r0 : step;
            esft__matrix_rows_f32(panel, W, r0, n);
            esft__sgemm(0, 1, T, n, W->cols, 1.0f, x, ldx, panel, W->cols, 0.0f, y + r0, ldy);
        }
    }
    if (W->lora) esft__lora_apply(y, ldy, x, ldx, T, W, 0, panel);
}

/* A vector (norm weights, biases) is read as fp32 at load; this is its data. */
static const float *esft__vec(const esft_matrix *v) { return ESFT__CAST(const float *, v->data); }

/* ---- loading ------------------------------------------------------------- */

typedef struct esft__loader {
    esft_model *m;
    esft_checkpoint ck;
    esft_error *err;
    int listing;        /* 1: what loads next goes into m->tensors (no expert, no buffer) */
    int layer, attention; /* and is of this layer / half */
    int capacity;       /* of m->tensors */
    char *names;        /* (capacity, ESFT__TENSOR_NAME) */
} esft__loader;

#define ESFT__TENSOR_NAME 128

/* Lists a loaded non-expert weight in m->tensors, under its checkpoint name. */
static esft_status esft__loader_list(esft__loader *ld, const esft_matrix *w, const char *name,
                                     const esft_st_tensor *file)
{
    esft_model *m = ld->m;
    esft_model_tensor *t;
    char *dst;
    if (!ld->listing) return ESFT_OK;
    if (m->n_tensors == ld->capacity || strlen(name) >= ESFT__TENSOR_NAME)
        return esft__fail(ld->err, ESFT_ERR_RANGE, "tensor %s: more weights or a longer name than a layer has", name);
    dst = ld->names + (size_t)m->n_tensors * ESFT__TENSOR_NAME;
    strcpy(dst, name);
    t = &m->tensors[m->n_tensors++];
    t->name = dst;
    t->matrix = w;
    t->layer = ld->layer;
    t->attention = ld->attention;
    t->file_dtype = file->dtype;
    t->file_dims = file->n_dims == 1 ? 1 : 2;
    return ESFT_OK;
}

static void *esft__model_blob(esft_model *m, size_t bytes)
{
    void *p;
    if (m->n_blobs_ == m->cap_blobs_) {
        int cap = m->cap_blobs_ ? 2 * m->cap_blobs_ : 256;
        void **grown = ESFT__CAST(void **, esft__calloc(&m->allocator, (size_t)cap, sizeof(void *)));
        if (!grown) return NULL;
        if (m->n_blobs_) memcpy(grown, m->blobs_, (size_t)m->n_blobs_ * sizeof(void *));
        esft__release(&m->allocator, m->blobs_);
        m->blobs_ = grown;
        m->cap_blobs_ = cap;
    }
    p = m->allocator.alloc(m->allocator.user, bytes ? bytes : 1);
    if (p) m->blobs_[m->n_blobs_++] = p;
    return p;
}

static const esft_st_tensor *esft__loader_find(esft__loader *ld, const char *name, const esft_safetensors **st,
                                               int *index)
{
    int shard;
    if (!esft_checkpoint_find(&ld->ck, name, &shard, index)) return NULL;
    *st = &ld->ck.shards[shard];
    return &(*st)->tensors[*index];
}

static int esft__shape_is(const esft_st_tensor *t, int n_dims, const int64_t *dims)
{
    int i;
    if (t->n_dims != n_dims) return 0;
    for (i = 0; i < n_dims; i++)
        if (t->shape[i] != dims[i]) return 0;
    return 1;
}

static esft_status esft__loader_shape_error(esft__loader *ld, const char *name, const esft_st_tensor *t,
                                            const char *want)
{
    char got[160];
    esft__shape_string(got, sizeof got, t->n_dims, t->shape);
    return esft__fail(ld->err, ESFT_ERR_SHAPE, "tensor %s has shape %s, the config says %s", name, got, want);
}

/* Reads the FP8 scales of name into out->scale. */
static esft_status esft__load_scale(esft__loader *ld, esft_matrix *out, const char *name)
{
    const esft_model_config *c = &ld->m->cfg;
    char sname[300];
    const esft_safetensors *st;
    const esft_st_tensor *t;
    int i;
    int64_t dims[2];
    float *scale;
    if (!c->fp8_block_rows)
        return esft__fail(ld->err, ESFT_ERR_UNSUPPORTED,
                          "tensor %s is F8_E4M3 but config.json has no fp8 quantization_config", name);
    snprintf(sname, sizeof sname, "%s_scale_inv", name);
    t = esft__loader_find(ld, sname, &st, &i);
    if (!t)
        return esft__fail(ld->err, ESFT_ERR_PARSE, "tensor %s is F8_E4M3 without its scale %s: FP8 is never read raw",
                          name, sname);
    dims[0] = (out->rows + c->fp8_block_rows - 1) / c->fp8_block_rows;
    dims[1] = (out->cols + c->fp8_block_cols - 1) / c->fp8_block_cols;
    if (!esft__shape_is(t, 2, dims)) {
        char want[64];
        snprintf(want, sizeof want, "(%lld, %lld) for %dx%d blocks", (long long)dims[0], (long long)dims[1],
                 c->fp8_block_rows, c->fp8_block_cols);
        return esft__loader_shape_error(ld, sname, t, want);
    }
    scale = ESFT__CAST(float *, esft__model_blob(ld->m, (size_t)t->n_elements * sizeof(float)));
    if (!scale) return esft__fail(ld->err, ESFT_ERR_OUT_OF_MEMORY, "scales of %s", name);
    if (esft_safetensors_read_f32(st, i, scale, ld->err) != ESFT_OK) return ld->err ? ld->err->status : ESFT_ERR_IO;
    for (i = 0; i < (int)t->n_elements; i++)
        if (!isfinite(scale[i]))
            return esft__fail(ld->err, ESFT_ERR_NUMERIC, "tensor %s: scale %d is not finite", sname, i);
    out->scale = scale;
    out->block_rows = c->fp8_block_rows;
    out->block_cols = c->fp8_block_cols;
    ld->m->weight_bytes += t->n_bytes;
    return ESFT_OK;
}

/* Loads tensor name of n_dims dims (1: a vector of cols; 2: (rows, cols); 3:
   (planes, rows, cols), returned as one (planes*rows, cols) matrix). as_f32:
   converted to fp32 (vectors, routers); otherwise kept in its file dtype.
   A missing tensor is an error when required, else out->data stays NULL. */
static esft_status esft__load(esft__loader *ld, esft_matrix *out, const char *name, int n_dims, int planes,
                              int rows, int cols, int required, int as_f32)
{
    const esft_safetensors *st;
    const esft_st_tensor *t;
    int64_t dims[3];
    int i;
    void *blob;
    memset(out, 0, sizeof *out);
    t = esft__loader_find(ld, name, &st, &i);
    if (!t) return required ? esft__fail(ld->err, ESFT_ERR_PARSE, "tensor %s is missing from the checkpoint", name)
                            : ESFT_OK;
    dims[0] = n_dims == 3 ? planes : n_dims == 2 ? rows : cols;
    dims[1] = n_dims == 3 ? rows : cols;
    dims[2] = cols;
    if (!esft__shape_is(t, n_dims, dims) && !(n_dims == 1 && rows == 1 && t->n_dims == 2 && t->shape[0] == 1 &&
                                             t->shape[1] == cols)) {
        char want[96];
        esft__shape_string(want, sizeof want, n_dims, dims);
        return esft__loader_shape_error(ld, name, t, want);
    }
    out->rows = n_dims == 3 ? planes * rows : n_dims == 2 ? rows : 1;
    out->cols = cols;
    if (t->dtype != ESFT_DTYPE_F32 && t->dtype != ESFT_DTYPE_BF16 && t->dtype != ESFT_DTYPE_F16 &&
        t->dtype != ESFT_DTYPE_F8_E4M3)
        return esft__fail(ld->err, ESFT_ERR_UNSUPPORTED, "tensor %s is %s; weights must be F32, BF16, F16 or F8_E4M3",
                          name, esft_dtype_name(t->dtype));
    if (as_f32 || t->dtype == ESFT_DTYPE_F32) {
        float *f;
        if (t->dtype == ESFT_DTYPE_F8_E4M3)
            return esft__fail(ld->err, ESFT_ERR_UNSUPPORTED, "tensor %s: FP8 is implemented for matrices only", name);
        f = ESFT__CAST(float *, esft__model_blob(ld->m, (size_t)t->n_elements * sizeof(float)));
        if (!f) return esft__fail(ld->err, ESFT_ERR_OUT_OF_MEMORY, "tensor %s (%llu values)", name,
                                  (unsigned long long)t->n_elements);
        if (esft_safetensors_read_f32(st, i, f, ld->err) != ESFT_OK) return ld->err ? ld->err->status : ESFT_ERR_IO;
        out->dtype = ESFT_DTYPE_F32;
        out->data = f;
        ld->m->weight_bytes += t->n_elements * sizeof(float);
        return esft__loader_list(ld, out, name, t);
    }
    blob = esft__model_blob(ld->m, (size_t)t->n_bytes);
    if (!blob) return esft__fail(ld->err, ESFT_ERR_OUT_OF_MEMORY, "tensor %s (%llu bytes)", name,
                                 (unsigned long long)t->n_bytes);
    if (esft_safetensors_read(st, i, blob, 0, (size_t)t->n_bytes, ld->err) != ESFT_OK)
        return ld->err ? ld->err->status : ESFT_ERR_IO;
    out->dtype = t->dtype;
    out->data = blob;
    ld->m->weight_bytes += t->n_bytes;
    if (t->dtype == ESFT_DTYPE_F8_E4M3) {
        esft_status s;
        if (n_dims == 3) return esft__fail(ld->err, ESFT_ERR_UNSUPPORTED, "tensor %s: fused FP8 experts", name);
        if ((s = esft__load_scale(ld, out, name)) != ESFT_OK) return s;
    }
    return esft__loader_list(ld, out, name, t);
}

/* Loads "<prefix><suffix>". */
static esft_status esft__load_at(esft__loader *ld, esft_matrix *out, const char *prefix, const char *suffix,
                                 int rows, int cols, int required, int as_f32)
{
    char name[300];
    snprintf(name, sizeof name, "%s%s", prefix, suffix);
    return esft__load(ld, out, name, rows == 1 && as_f32 ? 1 : 2, 0, rows, cols, required, as_f32);
}

static esft_status esft__load_attention(esft__loader *ld, esft_model_layer *w, const char *p)
{
    const esft_model_config *c = &ld->m->cfg;
    int D = c->d_model, H = c->n_heads, HK = c->n_kv_heads, HD = c->head_dim;
    esft_status s;
    if (c->mla) {
        int dq = c->qk_nope_dim + c->qk_rope_dim;
        if (c->q_lora_rank) {
            if ((s = esft__load_at(ld, &w->q_a, p, "self_attn.q_a_proj.weight", c->q_lora_rank, D, 1, 0)) ||
                (s = esft__load_at(ld, &w->q_a_norm, p, "self_attn.q_a_layernorm.weight", 1, c->q_lora_rank, 1, 1)) ||
                (s = esft__load_at(ld, &w->q_b, p, "self_attn.q_b_proj.weight", H * dq, c->q_lora_rank, 1, 0)))
                return s;
        } else if ((s = esft__load_at(ld, &w->q, p, "self_attn.q_proj.weight", H * dq, D, 1, 0)))
            return s;
        if ((s = esft__load_at(ld, &w->kv_a, p, "self_attn.kv_a_proj_with_mqa.weight", c->kv_lora_rank + c->qk_rope_dim,
                               D, 1, 0)) ||
            (s = esft__load_at(ld, &w->kv_a_norm, p, "self_attn.kv_a_layernorm.weight", 1, c->kv_lora_rank, 1, 1)) ||
            (s = esft__load_at(ld, &w->kv_b, p, "self_attn.kv_b_proj.weight", H * (c->qk_nope_dim + c->v_head_dim),
                               c->kv_lora_rank, 1, 0)))
            return s;
        return esft__load_at(ld, &w->o, p, "self_attn.o_proj.weight", D, H * c->v_head_dim, 1, 0);
    }
    if ((s = esft__load_at(ld, &w->q, p, "self_attn.q_proj.weight", H * HD, D, 1, 0)) ||
        (s = esft__load_at(ld, &w->k, p, "self_attn.k_proj.weight", HK * HD, D, 1, 0)) ||
        (s = esft__load_at(ld, &w->v, p, "self_attn.v_proj.weight", HK * HD, D, 1, 0)) ||
        (s = esft__load_at(ld, &w->o, p, "self_attn.o_proj.weight", D, H * HD, 1, 0)))
        return s;
    if (c->qkv_bias &&
        ((s = esft__load_at(ld, &w->q_bias, p, "self_attn.q_proj.bias", 1, H * HD, 1, 1)) ||
         (s = esft__load_at(ld, &w->k_bias, p, "self_attn.k_proj.bias", 1, HK * HD, 1, 1)) ||
         (s = esft__load_at(ld, &w->v_bias, p, "self_attn.v_proj.bias", 1, HK * HD, 1, 1))))
        return s;
    if (c->o_bias && (s = esft__load_at(ld, &w->o_bias, p, "self_attn.o_proj.bias", 1, D, 1, 1))) return s;
    if (c->qk_norm != ESFT_QK_NORM_NONE) {
        int whole = c->qk_norm == ESFT_QK_NORM_WHOLE;
        if ((s = esft__load_at(ld, &w->q_norm, p, "self_attn.q_norm.weight", 1, whole ? H * HD : HD, 1, 1)) ||
            (s = esft__load_at(ld, &w->k_norm, p, "self_attn.k_norm.weight", 1, whole ? HK * HD : HD, 1, 1)))
            return s;
    }
    return ESFT_OK;
}

/* The experts of one layer: per-expert tensors (the names released checkpoints
   use), or the fused 3-D gate_up_proj (E, 2F, D) / down_proj (E, D, F) that
   transformers v5 keeps in memory; each expert is then a view of its slice. */
static esft_status esft__load_experts(esft__loader *ld, esft_model_layer *w, const char *moe)
{
    const esft_model_config *c = &ld->m->cfg;
    int E = c->route.n_experts, F = c->d_expert, D = c->d_model, e, shard, idx;
    int mixtral = strstr(moe, "block_sparse_moe") != NULL;
    char name[300];
    esft_status s;
    size_t bytes = (size_t)E * sizeof(esft_matrix);
    w->expert_gate = ESFT__CAST(esft_matrix *, esft__model_blob(ld->m, 3 * bytes));
    if (!w->expert_gate) return esft__fail(ld->err, ESFT_ERR_OUT_OF_MEMORY, "expert table");
    w->expert_up = w->expert_gate + E;
    w->expert_down = w->expert_up + E;
    snprintf(name, sizeof name, "%sexperts.gate_up_proj", moe);
    if (esft_checkpoint_find(&ld->ck, name, &shard, &idx)) {
        esft_matrix gu, dn;
        size_t esz;
        if ((s = esft__load(ld, &gu, name, 3, E, 2 * F, D, 1, 0))) return s;
        snprintf(name, sizeof name, "%sexperts.down_proj", moe);
        if ((s = esft__load(ld, &dn, name, 3, E, D, F, 1, 0))) return s;
        esz = esft_dtype_size(gu.dtype);
        for (e = 0; e < E; e++) {
            const unsigned char *g = ESFT__CAST(const unsigned char *, gu.data) + (size_t)e * 2 * F * D * esz;
            w->expert_gate[e] = gu;
            w->expert_gate[e].rows = F;
            w->expert_gate[e].data = g;
            w->expert_up[e] = w->expert_gate[e];
            w->expert_up[e].data = g + (size_t)F * D * esz;
            w->expert_down[e] = dn;
            w->expert_down[e].rows = D;
            w->expert_down[e].data = ESFT__CAST(const unsigned char *, dn.data) + (size_t)e * D * F * esft_dtype_size(dn.dtype);
        }
        ld->m->fused_experts = 1;
        return ESFT_OK;
    }
    for (e = 0; e < E; e++) {
        char p[160];
        snprintf(p, sizeof p, "%sexperts.%d.", moe, e);
        if ((s = esft__load_at(ld, &w->expert_gate[e], p, mixtral ? "w1.weight" : "gate_proj.weight", F, D, 1, 0)) ||
            (s = esft__load_at(ld, &w->expert_up[e], p, mixtral ? "w3.weight" : "up_proj.weight", F, D, 1, 0)) ||
            (s = esft__load_at(ld, &w->expert_down[e], p, mixtral ? "w2.weight" : "down_proj.weight", D, F, 1, 0)))
            return s;
    }
    return ESFT_OK;
}

static esft_status esft__load_ffn(esft__loader *ld, esft_model_layer *w, const char *p, int layer)
{
    const esft_model_config *c = &ld->m->cfg;
    int D = c->d_model, E = c->route.n_experts, FS = c->d_shared, shard, idx;
    char moe[128], name[300];
    esft_status s;
    if (!c->is_moe[layer]) {
        if ((s = esft__load_at(ld, &w->mlp_gate, p, "mlp.gate_proj.weight", c->d_ff, D, 1, 0)) ||
            (s = esft__load_at(ld, &w->mlp_up, p, "mlp.up_proj.weight", c->d_ff, D, 1, 0)))
            return s;
        return esft__load_at(ld, &w->mlp_down, p, "mlp.down_proj.weight", D, c->d_ff, 1, 0);
    }
    /* Mixtral's released checkpoints say block_sparse_moe; the others mlp */
    snprintf(moe, sizeof moe, "%smlp.", p);
    snprintf(name, sizeof name, "%sblock_sparse_moe.gate.weight", p);
    if (c->family == ESFT_MODEL_MIXTRAL && esft_checkpoint_find(&ld->ck, name, &shard, &idx)) {
        snprintf(moe, sizeof moe, "%sblock_sparse_moe.", p);
        ld->m->expert_names = ESFT_FAMILY_MIXTRAL;
    }
    if ((s = esft__load_at(ld, &w->router, moe, "gate.weight", E, D, 1, 1))) return s;
    ld->listing = 0; /* the selection bias is a buffer; experts have their own table */
    if (c->route_bias && (s = esft__load_at(ld, &w->router_bias, moe, "gate.e_score_correction_bias", 1, E, 1, 1)))
        return s;
    if ((s = esft__load_experts(ld, w, moe))) return s;
    ld->listing = 1;
    if (FS > 0) {
        const char *sh = c->family == ESFT_MODEL_QWEN2_MOE ? "shared_expert." : "shared_experts.";
        char q[160];
        snprintf(q, sizeof q, "%s%s", moe, sh);
        ld->listing = 0;
        if ((s = esft__load_at(ld, &w->shared_gate, q, "gate_proj.weight", FS, D, 1, 0)) ||
            (s = esft__load_at(ld, &w->shared_up, q, "up_proj.weight", FS, D, 1, 0)) ||
            (s = esft__load_at(ld, &w->shared_down, q, "down_proj.weight", D, FS, 1, 0)))
            return s;
        ld->listing = 1;
        if (c->shared_gate && (s = esft__load_at(ld, &w->shared_router, moe, "shared_expert_gate.weight", 1, D, 1, 1)))
            return s;
    }
    return ESFT_OK;
}

static esft_status esft__load_model(esft__loader *ld)
{
    esft_model *m = ld->m;
    const esft_model_config *c = &m->cfg;
    int l;
    esft_status s;
    /* at most 16 weights a layer (MLA with q_lora and a router: 9 + 2 norms +
       router; GQA: 4 + 3 biases + 2 q/k norms + 2 norms + router + shared gate) */
    ld->capacity = 16 * c->n_layers + 3;
    m->tensors = ESFT__CAST(esft_model_tensor *, esft__model_blob(m, (size_t)ld->capacity * sizeof(esft_model_tensor)));
    ld->names = ESFT__CAST(char *, esft__model_blob(m, (size_t)ld->capacity * ESFT__TENSOR_NAME));
    if (!m->tensors || !ld->names) return esft__fail(ld->err, ESFT_ERR_OUT_OF_MEMORY, "tensor table");
    ld->listing = 1;
    ld->layer = -1;
    ld->attention = 0;
    if ((s = esft__load(ld, &m->embed, "model.embed_tokens.weight", 2, 0, c->vocab, c->d_model, 1, 0)) ||
        (s = esft__load(ld, &m->final_norm, "model.norm.weight", 1, 0, 1, c->d_model, 1, 1)))
        return s;
    if (c->tie_embeddings) m->lm_head = m->embed;
    else if ((s = esft__load(ld, &m->lm_head, "lm_head.weight", 2, 0, c->vocab, c->d_model, 1, 0)))
        return s;
    m->layers = ESFT__CAST(esft_model_layer *, esft__model_blob(m, (size_t)c->n_layers * sizeof(esft_model_layer)));
    if (!m->layers) return esft__fail(ld->err, ESFT_ERR_OUT_OF_MEMORY, "layer table");
    memset(m->layers, 0, (size_t)c->n_layers * sizeof(esft_model_layer));
    for (l = 0; l < c->n_layers; l++) {
        esft_model_layer *w = &m->layers[l];
        char p[64];
        snprintf(p, sizeof p, "model.layers.%d.", l);
        ld->layer = l;
        ld->attention = 1;
        if ((s = esft__load_at(ld, &w->attn_norm, p, "input_layernorm.weight", 1, c->d_model, 1, 1)) ||
            (s = esft__load_attention(ld, w, p)))
            return s;
        ld->attention = 0;
        if ((s = esft__load_at(ld, &w->ffn_norm, p, "post_attention_layernorm.weight", 1, c->d_model, 1, 1)) ||
            (s = esft__load_ffn(ld, w, p, l)))
            return s;
    }
    return ESFT_OK;
}

ESFTDEF void esft_model_close(esft_model *m)
{
    int i;
    if (!m) return;
    for (i = 0; i < m->n_blobs_; i++) esft__release(&m->allocator, m->blobs_[i]);
    esft__release(&m->allocator, m->blobs_);
    memset(m, 0, sizeof *m);
}

ESFTDEF esft_status esft_model_open(esft_model *m, const char *dir, const esft_allocator *allocator,
                                    esft_error *err)
{
    esft__loader ld;
    char path[4200];
    esft_status s;
    if (!m || !dir) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL model or directory");
    memset(m, 0, sizeof *m);
    m->allocator = esft__allocator_or_default(allocator);
    snprintf(path, sizeof path, "%s/config.json", dir);
    s = esft_model_config_read(&m->cfg, path, err);
    if (s != ESFT_OK) return s;
    memset(&ld, 0, sizeof ld);
    ld.m = m;
    ld.err = err;
    s = esft_checkpoint_open(&ld.ck, dir, allocator, err);
    if (s != ESFT_OK) return s;
    s = esft__load_model(&ld);
    esft_checkpoint_close(&ld.ck);
    if (s != ESFT_OK) {
        esft_allocator a = m->allocator;
        esft_model_close(m);
        m->allocator = a;
    }
    return s;
}

/* ---- forward ------------------------------------------------------------- */

/* Query rows per attention block: a (64, T) score block per thread. */
#define ESFT__ATTN_BLOCK 64
/* Positions per lm_head block (logits of 64 positions at a time when not kept). */
#define ESFT__HEAD_BLOCK 64

/* Scratch of one forward over T tokens, carved from one allocation. */
typedef struct esft__fwd {
    float *x, *h, *a;        /* (T, D) residual stream, normed input, sublayer output */
    float *q, *k, *v, *ao;   /* attention: (T, H DQ) (T, HKV DQ) (T, HKV DV) (T, H DV) */
    float *lat;              /* (T, QR + KR + DR) MLA latents */
    float *kvb;              /* (T, H (DN + DV)) MLA kv_b output */
    float *cos_, *sin_;      /* (T, R/2) rotary tables */
    float *scores;           /* (nt, ATTN_BLOCK, T) */
    float *g, *u;            /* (T K or T, max(F, FF, FS)) SwiGLU */
    float *xg, *o;           /* (T K, D) gathered inputs, expert outputs */
    float *logits;           /* (T, E) router; (HEAD_BLOCK, V) head */
    float *sg;               /* (T) shared gate */
    float *panels;           /* (nt, PANEL_FLOATS) */
    float *route_tmp;        /* (3E + 2G) */
    int32_t *ids, *offsets, *perm, *pos; /* (T K) (E + 1) (T K) (T K) */
    float *weights;          /* (T K) */
    int nt;
    const esft_model_trainable *tr; /* experts run from their fp32 copies; NULL = none */
    esft_pesc_saved ps;      /* PESC (tr has PESC blocks): one layer's saved, reused layer after layer */
    float *py, *pdF;         /* PESC: (T, D) the adapter MoE's output y; the gradient of its input F */
    double aux;              /* PESC: auxiliary losses summed over the layers run */
} esft__fwd;

static size_t esft__max3(size_t a, size_t b, size_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

/* Lays out (or, with base NULL, sizes) the scratch. Returns its bytes. */
static size_t esft__fwd_layout(esft__fwd *f, const esft_model_config *c, int T, int nt, unsigned char *base)
{
    size_t at = 0, t = (size_t)T, K = (size_t)c->route.top_k, E = (size_t)c->route.n_experts, D = (size_t)c->d_model;
    size_t H = (size_t)c->n_heads, dq, dk_heads, dv, hid, rot, lat;
    if (c->mla) {
        dq = (size_t)(c->qk_nope_dim + c->qk_rope_dim);
        dk_heads = H;
        dv = (size_t)c->v_head_dim;
        rot = (size_t)c->qk_rope_dim;
    } else {
        dq = dv = (size_t)c->head_dim;
        dk_heads = (size_t)c->n_kv_heads;
        rot = dq;
    }
    lat = c->mla ? (size_t)(c->q_lora_rank + c->kv_lora_rank + c->qk_rope_dim) : 0;
    hid = esft__max3((size_t)c->d_expert * (E ? K : 0), (size_t)c->d_ff, (size_t)c->d_shared);
#define ESFT__CARVE(field, type, count)                                                      \
    do {                                                                                     \
        at = (at + 63) & ~(size_t)63;                                                        \
        if (base) f->field = ESFT__CAST(type *, (void *)(base + at));                        \
        at += (size_t)(count) * sizeof(type);                                                \
    } while (0)
    ESFT__CARVE(x, float, t * D);
    ESFT__CARVE(h, float, t * D);
    ESFT__CARVE(a, float, t * D);
    ESFT__CARVE(q, float, t * H * dq);
    ESFT__CARVE(k, float, t * dk_heads * dq);
    ESFT__CARVE(v, float, t * dk_heads * dv);
    ESFT__CARVE(ao, float, t * H * dv);
    ESFT__CARVE(lat, float, t * lat);
    ESFT__CARVE(kvb, float, c->mla ? t * H * (size_t)(c->qk_nope_dim + c->v_head_dim) : 0);
    ESFT__CARVE(cos_, float, t * rot / 2);
    ESFT__CARVE(sin_, float, t * rot / 2);
    ESFT__CARVE(scores, float, (size_t)nt * ESFT__ATTN_BLOCK * t);
    ESFT__CARVE(g, float, t * hid);
    ESFT__CARVE(u, float, t * hid);
    ESFT__CARVE(xg, float, E ? t * K * D : 0);
    ESFT__CARVE(o, float, E ? t * K * D : 0);
    ESFT__CARVE(logits, float, t * E > (size_t)ESFT__HEAD_BLOCK * c->vocab ? t * E : (size_t)ESFT__HEAD_BLOCK * c->vocab);
    ESFT__CARVE(sg, float, t);
    ESFT__CARVE(panels, float, (size_t)nt * ESFT__PANEL_FLOATS);
    ESFT__CARVE(route_tmp, float, 3 * E + 2 * (size_t)(c->route.n_group > 0 ? c->route.n_group : 1));
    ESFT__CARVE(ids, int32_t, t * K);
    ESFT__CARVE(offsets, int32_t, E + 1);
    ESFT__CARVE(perm, int32_t, t * K);
    ESFT__CARVE(pos, int32_t, t * K);
    ESFT__CARVE(weights, float, t * K);
#undef ESFT__CARVE
    if (base) f->nt = nt;
    return at + 64;
}

static int esft__thread_id(void)
{
#if defined(_OPENMP)
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* y = RMSNorm(x) * w over rows of n (fp32 as transformers computes it). */
static void esft__rmsnorm_rows(float *y, int ldy, const float *x, int ldx, const float *w, int rows, int n, float eps,
                               int nt)
{
    int r;
    (void)nt;
    ESFT__MOE_FOR_STATIC(nt)
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx;
        float *yr = y + (size_t)r * ldy;
        double ss = 0.0;
        float inv;
        int i;
        for (i = 0; i < n; i++) ss += (double)xr[i] * xr[i];
        inv = 1.0f / sqrtf((float)(ss / n) + eps);
        for (i = 0; i < n; i++) yr[i] = w[i] * (xr[i] * inv);
    }
}

/* The rotary tables cos/sin (T, R/2) of positions 0..T-1. */
static void esft__rope_tables(float *cs, float *sn, const esft_rope_config *rc, int R, int T)
{
    int half = R / 2, i, t;
    double low = 0.0, high = 0.0;
    if (rc->yarn) {
        /* YaRN: dims rotating fewer than beta_slow times over the original
           context are interpolated (theta / factor), those rotating more than
           beta_fast times kept, a linear ramp between */
        double two_log_base = 2.0 * log(rc->theta), L = (double)rc->original_max_position;
        low = floor(R * log(L / (rc->beta_fast * 2.0 * 3.14159265358979323846)) / two_log_base);
        high = ceil(R * log(L / (rc->beta_slow * 2.0 * 3.14159265358979323846)) / two_log_base);
        if (low < 0) low = 0;
        if (high > R - 1) high = R - 1;
        if (low == high) high += 0.001;
    }
    for (i = 0; i < half; i++) {
        float inv = (float)(1.0 / pow(rc->theta, (double)(2 * i) / R));
        if (rc->yarn) {
            float ramp = (float)(((double)i - low) / (high - low)), keep;
            ramp = ramp < 0.0f ? 0.0f : ramp > 1.0f ? 1.0f : ramp;
            keep = 1.0f - ramp; /* share of the original frequency */
            inv = (inv / (float)rc->factor) * (1.0f - keep) + inv * keep;
        }
        for (t = 0; t < T; t++) {
            float angle = (float)t * inv; /* fp32 as transformers computes positions * inv_freq */
            cs[(size_t)t * half + i] = (float)(cos((double)angle) * rc->attention_factor);
            sn[(size_t)t * half + i] = (float)(sin((double)angle) * rc->attention_factor);
        }
    }
}

/* Rotates R dims of each of n_heads heads of every row (stride ld, head stride hs). */
static void esft__rope_apply(float *x, int ld, int n_heads, int hs, int T, int R, int interleaved, const float *cs,
                             const float *sn, int nt)
{
    int t, half = R / 2;
    (void)nt;
    ESFT__MOE_FOR_STATIC(nt)
    for (t = 0; t < T; t++) {
        const float *c = cs + (size_t)t * half, *s = sn + (size_t)t * half;
        int hh, i;
        for (hh = 0; hh < n_heads; hh++) {
            float *p = x + (size_t)t * ld + (size_t)hh * hs;
            for (i = 0; i < half; i++) {
                int i1 = interleaved ? 2 * i : i, i2 = interleaved ? 2 * i + 1 : i + half;
                float x1 = p[i1], x2 = p[i2];
                p[i1] = x1 * c[i] - x2 * s[i];
                p[i2] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/* Causal softmax attention, one (query block, head) at a time: scores of the
   block against the keys it may see, softmax, times V. out (T, H DV). */
static void esft__attention(float *out, const float *q, const float *k, const float *v, const esft_model_config *c,
                            int T, int H, int HK, int dq, int dv, float *scores, int nt)
{
    int n_blocks = (T + ESFT__ATTN_BLOCK - 1) / ESFT__ATTN_BLOCK, jobs = n_blocks * H, job;
    int window = c->sliding_window;
    float scale = (float)c->attn_scale;
    (void)nt;
    ESFT__MOE_FOR_DYNAMIC(nt)
    for (job = 0; job < jobs; job++) {
        int hh = job % H, b = job / H, q0 = b * ESFT__ATTN_BLOCK, kvh = hh / (H / HK);
        int nq = T - q0 < ESFT__ATTN_BLOCK ? T - q0 : ESFT__ATTN_BLOCK, nk = q0 + nq, i;
        float *S = scores + (size_t)esft__thread_id() * ESFT__ATTN_BLOCK * T;
        esft__sgemm(0, 1, nq, nk, dq, scale, q + (size_t)q0 * H * dq + (size_t)hh * dq, H * dq,
                    k + (size_t)kvh * dq, HK * dq, 0.0f, S, nk);
        for (i = 0; i < nq; i++) {
            float *row = S + (size_t)i * nk, mx = -INFINITY, sum = 0.0f;
            int j, last = q0 + i, first = window > 0 && last - window + 1 > 0 ? last - window + 1 : 0;
            for (j = first; j <= last; j++) mx = row[j] > mx ? row[j] : mx;
            for (j = 0; j < nk; j++) {
                float e = j >= first && j <= last ? expf(row[j] - mx) : 0.0f;
                row[j] = e;
                sum += e;
            }
            for (j = first; j <= last; j++) row[j] /= sum;
        }
        esft__sgemm(0, 0, nq, dv, nk, 1.0f, S, nk, v + (size_t)kvh * dv, HK * dv, 0.0f,
                    out + (size_t)q0 * H * dv + (size_t)hh * dv, H * dv);
    }
}

static void esft__add_bias_rows(float *y, const esft_matrix *b, int T, int n)
{
    int t, i;
    if (!b->data) return;
    for (t = 0; t < T; t++)
        for (i = 0; i < n; i++) y[(size_t)t * n + i] += esft__vec(b)[i];
}

static void esft__clamp(float *x, size_t n, float clip)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = x[i] > clip ? clip : x[i] < -clip ? -clip : x[i];
}

/* a (T, D) = self-attention of h (T, D), GQA families. */
static void esft__attn_gqa(esft__fwd *f, const esft_model_config *c, const esft_model_layer *w, int T)
{
    int H = c->n_heads, HK = c->n_kv_heads, HD = c->head_dim, D = c->d_model, nt = f->nt;
    esft__matmul(f->q, H * HD, f->h, D, T, &w->q, f->panels);
    esft__matmul(f->k, HK * HD, f->h, D, T, &w->k, f->panels);
    esft__matmul(f->v, HK * HD, f->h, D, T, &w->v, f->panels);
    esft__add_bias_rows(f->q, &w->q_bias, T, H * HD);
    esft__add_bias_rows(f->k, &w->k_bias, T, HK * HD);
    esft__add_bias_rows(f->v, &w->v_bias, T, HK * HD);
    if (c->qk_norm == ESFT_QK_NORM_WHOLE) {
        esft__rmsnorm_rows(f->q, H * HD, f->q, H * HD, esft__vec(&w->q_norm), T, H * HD, c->rms_eps, nt);
        esft__rmsnorm_rows(f->k, HK * HD, f->k, HK * HD, esft__vec(&w->k_norm), T, HK * HD, c->rms_eps, nt);
    } else if (c->qk_norm == ESFT_QK_NORM_HEAD) {
        esft__rmsnorm_rows(f->q, HD, f->q, HD, esft__vec(&w->q_norm), T * H, HD, c->rms_eps, nt);
        esft__rmsnorm_rows(f->k, HD, f->k, HD, esft__vec(&w->k_norm), T * HK, HD, c->rms_eps, nt);
    }
    if (c->clip_qkv > 0.0f) {
        esft__clamp(f->q, (size_t)T * H * HD, c->clip_qkv);
        esft__clamp(f->k, (size_t)T * HK * HD, c->clip_qkv);
        esft__clamp(f->v, (size_t)T * HK * HD, c->clip_qkv);
    }
    esft__rope_apply(f->q, H * HD, H, HD, T, HD, c->rope.interleaved, f->cos_, f->sin_, nt);
    esft__rope_apply(f->k, HK * HD, HK, HD, T, HD, c->rope.interleaved, f->cos_, f->sin_, nt);
    esft__attention(f->ao, f->q, f->k, f->v, c, T, H, HK, HD, HD, f->scores, nt);
    esft__matmul(f->a, D, f->ao, H * HD, T, &w->o, f->panels);
    esft__add_bias_rows(f->a, &w->o_bias, T, D);
}

/* a (T, D) = multi-head latent attention of h (DeepSeek-V2/V3): q from h (or
   through the q_lora bottleneck), one compressed kv latent + a shared rotary
   key per token, expanded per head by kv_b. */
#define ESFT__MLA_NORM_EPS 1e-6f

static void esft__attn_mla(esft__fwd *f, const esft_model_config *c, const esft_model_layer *w, int T)
{
    int H = c->n_heads, D = c->d_model, DN = c->qk_nope_dim, DR = c->qk_rope_dim, DV = c->v_head_dim;
    int QR = c->q_lora_rank, KR = c->kv_lora_rank, dq = DN + DR, nt = f->nt, LW = QR + KR + DR, t;
    float *qa = f->lat, *kva = f->lat + QR;
    if (QR) {
        esft__matmul(qa, LW, f->h, D, T, &w->q_a, f->panels);
        /* DeepSeek builds q_a_layernorm and kv_a_layernorm with the default eps, not rms_norm_eps */
        esft__rmsnorm_rows(qa, LW, qa, LW, esft__vec(&w->q_a_norm), T, QR, ESFT__MLA_NORM_EPS, nt);
        esft__matmul(f->q, H * dq, qa, LW, T, &w->q_b, f->panels);
    } else {
        esft__matmul(f->q, H * dq, f->h, D, T, &w->q, f->panels);
    }
    esft__matmul(kva, LW, f->h, D, T, &w->kv_a, f->panels);
    esft__rmsnorm_rows(kva, LW, kva, LW, esft__vec(&w->kv_a_norm), T, KR, ESFT__MLA_NORM_EPS, nt);
    esft__matmul(f->kvb, H * (DN + DV), kva, LW, T, &w->kv_b, f->panels);
    esft__rope_apply(f->q + DN, H * dq, H, dq, T, DR, c->rope.interleaved, f->cos_, f->sin_, nt);
    esft__rope_apply(kva + KR, LW, 1, DR, T, DR, c->rope.interleaved, f->cos_, f->sin_, nt);
    for (t = 0; t < T; t++) {
        int hh;
        for (hh = 0; hh < H; hh++) {
            const float *src = f->kvb + ((size_t)t * H + hh) * (DN + DV);
            float *kd = f->k + ((size_t)t * H + hh) * dq;
            memcpy(kd, src, (size_t)DN * sizeof(float));
            memcpy(kd + DN, kva + (size_t)t * LW + KR, (size_t)DR * sizeof(float));
            memcpy(f->v + ((size_t)t * H + hh) * DV, src + DN, (size_t)DV * sizeof(float));
        }
    }
    esft__attention(f->ao, f->q, f->k, f->v, c, T, H, H, dq, DV, f->scores, nt);
    esft__matmul(f->a, D, f->ao, H * DV, T, &w->o, f->panels);
}

/* out (n, D) = SwiGLU MLP of in (n, D): down(silu(gate in) * up in). */
static void esft__swiglu_mlp(float *out, const float *in, int n, int D, const esft_matrix *gate, const esft_matrix *up,
                             const esft_matrix *down, float *g, float *u, float *panel)
{
    int F = gate->rows;
    esft__matmul(g, F, in, D, n, gate, panel);
    esft__matmul(u, F, in, D, n, up, panel);
    esft__swiglu_forward(g, g, u, (size_t)n * F);
    esft__matmul(out, D, g, F, n, down, panel);
}

/* Routes h (T, D) through layer w's router: ids and weights (T, K). */
static esft_status esft__moe_route(esft__fwd *f, const esft_model_config *c, const esft_model_layer *w, int layer,
                                   int T, esft_error *err)
{
    int E = c->route.n_experts, K = c->route.top_k, t;
    size_t i, te = (size_t)T * E;
    esft_route_config rc = c->route;
    float *probs = f->route_tmp; /* the first E floats of the scratch hold one token's probabilities */
    rc.selection_bias = w->router_bias.data ? esft__vec(&w->router_bias) : NULL;
    esft__sgemm(0, 1, T, E, c->d_model, 1.0f, f->h, c->d_model, esft__vec(&w->router), c->d_model, 0.0f, f->logits, E);
    if ((i = esft__first_nonfinite(f->logits, te)) < te)
        return esft__fail(err, ESFT_ERR_NUMERIC, "layer %d: router logit of token %lu, expert %lu is not finite",
                          layer, (unsigned long)(i / E), (unsigned long)(i % E));
    for (t = 0; t < T; t++)
        esft__route_token(&rc, f->ids + (size_t)t * K, f->weights + (size_t)t * K, probs, f->logits + (size_t)t * E,
                          f->route_tmp);
    return ESFT_OK;
}

/* Expert e of layer l: the fp32 copy when f->tr trains it, else the model's. */
static void esft__expert_mats(const esft__fwd *f, const esft_model_layer *w, int l, int e, esft_matrix *gate,
                              esft_matrix *up, esft_matrix *down)
{
    const esft_model_trainable *tr = f->tr;
    int slot = tr ? tr->slot[(size_t)l * tr->n_experts + e] : -1;
    *gate = w->expert_gate[e];
    *up = w->expert_up[e];
    *down = w->expert_down[e];
    if (slot >= 0) {
        const float *p = tr->params + (size_t)slot * tr->expert_floats;
        size_t fd = (size_t)gate->rows * gate->cols;
        memset(gate, 0, sizeof *gate);
        gate->dtype = ESFT_DTYPE_F32;
        gate->rows = w->expert_gate[e].rows;
        gate->cols = w->expert_gate[e].cols;
        *up = *gate;
        gate->data = p;
        up->data = p + fd;
        *down = *gate;
        down->rows = gate->cols;
        down->cols = gate->rows;
        down->data = p + 2 * fd;
    }
}

/* Layer l's shared experts: the fp32 copy when f->tr trains them, else the model's. */
static void esft__shared_mats(const esft__fwd *f, const esft_model_layer *w, int l, esft_matrix *gate,
                              esft_matrix *up, esft_matrix *down)
{
    const float *p = f->tr ? esft_model_trainable_shared(f->tr, f->tr->params, l) : NULL;
    *gate = w->shared_gate;
    *up = w->shared_up;
    *down = w->shared_down;
    if (p) {
        size_t sd = (size_t)gate->rows * gate->cols;
        memset(gate, 0, sizeof *gate);
        gate->dtype = ESFT_DTYPE_F32;
        gate->rows = w->shared_gate.rows;
        gate->cols = w->shared_gate.cols;
        *up = *gate;
        gate->data = p;
        up->data = p + sd;
        *down = *gate;
        down->rows = gate->cols;
        down->cols = gate->rows;
        down->data = p + 2 * sd;
    }
}

/* Groups the T K routing slots by expert (a counting sort): offsets (E + 1),
   perm (slot of each grouped row), pos (grouped row of each slot); gathers the
   rows of h into xg. */
static void esft__moe_group(esft__fwd *f, const esft_model_config *c, int T)
{
    int E = c->route.n_experts, K = c->route.top_k, D = c->d_model, TK = T * K, r;
    esft__sort_slots(f->perm, f->pos, f->offsets, f->ids, TK, E);
    ESFT__MOE_FOR_STATIC(f->nt)
    for (r = 0; r < TK; r++)
        memcpy(f->xg + (size_t)r * D, f->h + (size_t)(f->perm[r] / K) * D, (size_t)D * sizeof(float));
}

/* Qwen2-MoE's gated shared expert: z = h . w_s (kept in z, T floats), and the
   shared output in f->a scaled row by row by sigmoid(z). */
static void esft__shared_gate_scale(esft__fwd *f, const esft_model_layer *w, float *z, int T)
{
    int D = w->shared_router.cols, t, d;
    esft__sgemm(0, 1, T, 1, D, 1.0f, f->h, D, esft__vec(&w->shared_router), D, 0.0f, z, 1);
    for (t = 0; t < T; t++) {
        float s = esft__sigmoidf(z[t]);
        for (d = 0; d < D; d++) f->a[(size_t)t * D + d] *= s;
    }
}

/* f->a (T, D) += the routed experts' outputs (f->o, grouped), each times its
   routing weight, per token in slot order: the same bits whatever the expert order. */
static void esft__moe_combine(esft__fwd *f, int T, int K, int D)
{
    int t;
    ESFT__MOE_FOR_STATIC(f->nt)
    for (t = 0; t < T; t++) {
        float *at = f->a + (size_t)t * D;
        int j, d;
        for (j = 0; j < K; j++) {
            size_t slot = (size_t)t * K + j;
            const float *o = f->o + (size_t)f->pos[slot] * D;
            float wt = f->weights[slot];
            for (d = 0; d < D; d++) at[d] += wt * o[d];
        }
    }
}

/* a (T, D) = MoE of h: routed experts over their tokens (grouped by a counting
   sort), plus the shared expert(s), combined per token in slot order. */
static void esft__moe_ffn(esft__fwd *f, const esft_model_config *c, const esft_model_layer *w, int l, int T)
{
    int E = c->route.n_experts, K = c->route.top_k, D = c->d_model, F = c->d_expert, FS = c->d_shared;
    int e;
    esft__moe_group(f, c, T);
    ESFT__MOE_FOR_DYNAMIC(f->nt)
    for (e = 0; e < E; e++) {
        int r0 = f->offsets[e], n = f->offsets[e + 1] - r0;
        float *panel = f->panels + (size_t)esft__thread_id() * ESFT__PANEL_FLOATS;
        esft_matrix mg, mu, md;
        if (n == 0) continue;
        esft__expert_mats(f, w, l, e, &mg, &mu, &md);
        esft__swiglu_mlp(f->o + (size_t)r0 * D, f->xg + (size_t)r0 * D, n, D, &mg, &mu, &md, f->g + (size_t)r0 * F,
                         f->u + (size_t)r0 * F, panel);
    }
    if (FS > 0) {
        esft_matrix sg, su, sd;
        esft__shared_mats(f, w, l, &sg, &su, &sd);
        esft__swiglu_mlp(f->a, f->h, T, D, &sg, &su, &sd, f->g, f->u, f->panels);
        if (w->shared_router.data) esft__shared_gate_scale(f, w, f->sg, T);
    } else {
        memset(f->a, 0, (size_t)T * D * sizeof(float));
    }
    esft__moe_combine(f, T, K, D);
}

/* PESC buffers of f for T tokens when f->tr has PESC blocks (none otherwise):
   one esft_pesc_saved (the backward recomputes each layer's forward just
   before its backward, so one serves every layer) and py, pdF. Pair: _end. */
static esft_status esft__pesc_begin(esft__fwd *f, const esft_model *m, int T, esft_error *err)
{
    esft_status s;
    memset(&f->ps, 0, sizeof f->ps);
    f->py = f->pdF = NULL;
    f->aux = 0.0;
    if (!f->tr || f->tr->n_pesc == 0) return ESFT_OK;
    if ((s = esft_pesc_saved_init(&f->ps, &f->tr->pesc, T, NULL, err)) != ESFT_OK) return s;
    f->py = ESFT__CAST(float *, m->allocator.alloc(m->allocator.user, 2 * (size_t)T * m->cfg.d_model * sizeof(float)));
    if (!f->py) {
        esft_pesc_saved_uninit(&f->ps);
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "PESC buffers for %d tokens", T);
    }
    f->pdF = f->py + (size_t)T * m->cfg.d_model;
    return ESFT_OK;
}

static void esft__pesc_end(esft__fwd *f, const esft_model *m)
{
    esft_pesc_saved_uninit(&f->ps);
    if (f->py) m->allocator.free(m->allocator.user, f->py);
    f->py = f->pdF = NULL;
}

/* Camelidae's adapter MoE after layer l's frozen MLP, when f->tr gives l a
   PESC block: f->py = PESC(F = f->a, u = f->h) (the router reads the MLP's
   input), *out = f->py, aux added to f->aux, the routing shown to run's
   on_route; otherwise *out stays f->a. */
static esft_status esft__pesc_layer(esft__fwd *f, int l, int T, const esft_model_run *run, const float **out,
                                    esft_error *err)
{
    const esft_model_trainable *tr = f->tr;
    const float *p = tr ? esft_model_trainable_pesc(tr, tr->params, l) : NULL;
    float aux = 0.0f;
    esft_status s;
    if (!p) return ESFT_OK;
    if ((s = esft_pesc_forward(&tr->pesc, f->py, &aux, f->a, f->h, p, &f->ps, T, err)) != ESFT_OK) return s;
    if (run && run->on_route) run->on_route(run->user, l, f->ps.ids, f->ps.weights, T, tr->pesc.top_k);
    f->aux += aux;
    *out = f->py;
    return ESFT_OK;
}

/* Cross-entropy of rows t0 .. t0+n of logits (n, V) against labels[t+1]. */
static esft_status esft__head_loss(const float *logits, int t0, int n, int V, const int32_t *labels, int T,
                                   double *loss, int64_t *count, esft_error *err)
{
    int i;
    for (i = 0; i < n; i++) {
        int t = t0 + i, j, y;
        const float *row = logits + (size_t)i * V;
        double mx = -INFINITY, sum = 0.0;
        for (j = 0; j < V; j++)
            if (!isfinite(row[j])) return esft__fail(err, ESFT_ERR_NUMERIC, "logit %d of position %d is not finite", j, t);
        if (!labels || t + 1 >= T || labels[t + 1] == -100) continue;
        y = labels[t + 1];
        for (j = 0; j < V; j++) mx = row[j] > mx ? row[j] : mx;
        /* expf of values <= 0 is exact to an ulp; the sum over V stays in double */
        for (j = 0; j < V; j++) sum += (double)expf(row[j] - (float)mx);
        *loss += mx + log(sum) - row[y];
        (*count)++;
    }
    return ESFT_OK;
}

static esft_status esft__forward_check(const esft_model *m, const int32_t *ids, int T, const esft_model_run *run,
                                       esft_error *err)
{
    int t, V = m->cfg.vocab;
    if (!m->layers) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "model not open");
    if (!ids || T < 1) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "no tokens (T = %d)", T);
    for (t = 0; t < T; t++)
        if (ids[t] < 0 || ids[t] >= V) return esft__fail(err, ESFT_ERR_RANGE, "token %d: id %d is not in [0, %d)", t, (int)ids[t], V);
    if (run && run->labels)
        for (t = 0; t < T; t++)
            if (run->labels[t] != -100 && (run->labels[t] < 0 || run->labels[t] >= V))
                return esft__fail(err, ESFT_ERR_RANGE, "token %d: label %d is neither -100 nor in [0, %d)", t,
                                  (int)run->labels[t], V);
    if (run && run->stats &&
        (run->stats->n_layers < m->cfg.n_layers || run->stats->n_experts != m->cfg.route.n_experts ||
         run->stats->top_k != m->cfg.route.top_k))
        return esft__fail(err, ESFT_ERR_SHAPE, "stats of %d layers, E %d, K %d for a model of %d layers, E %d, K %d",
                          run->stats->n_layers, run->stats->n_experts, run->stats->top_k, m->cfg.n_layers,
                          m->cfg.route.n_experts, m->cfg.route.top_k);
    if (run && run->trainable && run->trainable->base_ != m)
        return esft__fail(err, ESFT_ERR_SHAPE, "trainable set built for another model (L %d, E %d)",
                          run->trainable->n_layers, run->trainable->n_experts);
    return ESFT_OK;
}

static esft_status esft__forward_layers(const esft_model *m, esft__fwd *f, int T, const esft_model_run *run,
                                        esft_error *err)
{
    const esft_model_config *c = &m->cfg;
    int D = c->d_model, l;
    size_t n = (size_t)T * D, i;
    esft_status s;
    for (l = 0; l < c->n_layers; l++) {
        const esft_model_layer *w = &m->layers[l];
        const float *out = f->a; /* the FFN half's output: the MLP's, or PESC's after it */
        esft__rmsnorm_rows(f->h, D, f->x, D, esft__vec(&w->attn_norm), T, D, c->rms_eps, f->nt);
        if (c->mla) esft__attn_mla(f, c, w, T);
        else esft__attn_gqa(f, c, w, T);
        for (i = 0; i < n; i++) f->x[i] += f->a[i];
        esft__rmsnorm_rows(f->h, D, f->x, D, esft__vec(&w->ffn_norm), T, D, c->rms_eps, f->nt);
        if (c->is_moe[l]) {
            if ((s = esft__moe_route(f, c, w, l, T, err)) != ESFT_OK) return s;
            if (run && run->stats &&
                (s = esft_stats_add(run->stats, l, f->ids, f->weights, run->stats_mask, T, err)) != ESFT_OK)
                return s;
            if (run && run->on_route) run->on_route(run->user, l, f->ids, f->weights, T, c->route.top_k);
            esft__moe_ffn(f, c, w, l, T);
        } else {
            esft__swiglu_mlp(f->a, f->h, T, D, &w->mlp_gate, &w->mlp_up, &w->mlp_down, f->g, f->u, f->panels);
            if ((s = esft__pesc_layer(f, l, T, run, &out, err)) != ESFT_OK) return s;
        }
        for (i = 0; i < n; i++) f->x[i] += out[i];
    }
    return ESFT_OK;
}

ESFTDEF esft_status esft_model_forward(const esft_model *m, const int32_t *ids, int T, const esft_model_run *run,
                                       double *loss_sum, int64_t *n_scored, esft_error *err)
{
    esft_model view;
    const esft_model_config *c;
    esft__fwd f;
    unsigned char *base;
    size_t bytes;
    int nt = esft_get_num_threads(), t, V, D;
    double loss = 0.0;
    int64_t count = 0;
    esft_status s;
    if (!m) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL model");
    if ((s = esft__forward_check(m, ids, T, run, err)) != ESFT_OK) return s;
    if (run && run->trainable) { /* trained copies and adapters in place, m's config as it is now */
        view = run->trainable->view;
        view.cfg = m->cfg;
        m = &view;
    }
    c = &m->cfg;
    V = c->vocab;
    D = c->d_model;
    bytes = esft__fwd_layout(&f, c, T, nt, NULL);
    base = ESFT__CAST(unsigned char *, m->allocator.alloc(m->allocator.user, bytes));
    if (!base) return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "forward scratch of %lu bytes for %d tokens",
                                 (unsigned long)bytes, T);
    esft__fwd_layout(&f, c, T, nt, ESFT__CAST(unsigned char *, (void *)(((uintptr_t)base + 63) & ~(uintptr_t)63)));
    f.tr = run ? run->trainable : NULL;
    for (t = 0; t < T; t++) esft__matrix_rows_f32(f.x + (size_t)t * D, &m->embed, ids[t], 1);
    esft__rope_tables(f.cos_, f.sin_, &c->rope, c->mla ? c->qk_rope_dim : c->head_dim, T);
    s = esft__pesc_begin(&f, m, T, err);
    if (s == ESFT_OK) s = esft__forward_layers(m, &f, T, run, err);
    esft__pesc_end(&f, m);
    if (s == ESFT_OK) esft__rmsnorm_rows(f.h, D, f.x, D, esft__vec(&m->final_norm), T, D, c->rms_eps, nt);
    for (t = 0; s == ESFT_OK && t < T; t += ESFT__HEAD_BLOCK) {
        int n = T - t < ESFT__HEAD_BLOCK ? T - t : ESFT__HEAD_BLOCK;
        float *out = run && run->logits ? run->logits + (size_t)t * V : f.logits;
        esft__matmul(out, V, f.h + (size_t)t * D, D, n, &m->lm_head, f.panels);
        s = esft__head_loss(out, t, n, V, run ? run->labels : NULL, T, &loss, &count, err);
    }
    m->allocator.free(m->allocator.user, base);
    if (s != ESFT_OK) return s;
    if (loss_sum) *loss_sum = loss;
    if (n_scored) *n_scored = count;
    if (run && run->aux_loss) *run->aux_loss = f.aux;
    return ESFT_OK;
}

/* ---- training: the trainable set ------------------------------------------ */

ESFTDEF void esft_model_trainable_uninit(esft_model_trainable *tr)
{
    if (!tr) return;
    esft__release(&tr->allocator, tr->params);
    esft__release(&tr->allocator, tr->grads);
    esft__release(&tr->allocator, tr->layer);
    esft__release(&tr->allocator, tr->slot);
    esft__release(&tr->allocator, tr->shared_slot);
    esft__release(&tr->allocator, tr->module);
    esft__release(&tr->allocator, tr->module_offset);
    esft__release(&tr->allocator, tr->lora_tensor);
    esft__release(&tr->allocator, tr->lora);
    esft__release(&tr->allocator, tr->pesc_slot);
    esft__release(&tr->allocator, tr->view_layers_);
    esft__release(&tr->allocator, tr->view_experts_);
    memset(tr, 0, sizeof *tr);
}

/* Checks an ESFT config against m. */
static esft_status esft__trainable_check_config(const esft_model *m, const esft_expert_config *cfg, esft_error *err)
{
    const esft_model_config *c = &m->cfg;
    int l, i;
    for (l = 0; l < cfg->n_layers; l++) {
        if (cfg->layer_present && !cfg->layer_present[l]) continue;
        for (i = cfg->offset[l]; i < cfg->offset[l + 1]; i++) {
            int e = cfg->ids[i];
            if (l >= c->n_layers || !c->is_moe[l])
                return esft__fail(err, ESFT_ERR_RANGE, "expert config: layer %d is %s", l,
                                  l >= c->n_layers ? "past the model's layers" : "a dense layer, not MoE");
            if (e < 0 || e >= c->route.n_experts)
                return esft__fail(err, ESFT_ERR_RANGE, "expert config: layer %d names expert %d of %d", l, e,
                                  c->route.n_experts);
        }
    }
    return ESFT_OK;
}

/* The PESC config of sp on m: the template with the model's width. */
static esft_pesc_config esft__spec_pesc(const esft_model *m, const esft_train_spec *sp)
{
    esft_pesc_config pc = sp->pesc;
    pc.d_model = m->cfg.d_model;
    return pc;
}

static esft_status esft__pesc_spec_check(const esft_model *m, const esft_train_spec *sp, esft_error *err)
{
    esft_pesc_config pc = esft__spec_pesc(m, sp);
    esft_status s = esft_pesc_config_validate(&pc, err);
    if (s != ESFT_OK) return s;
    if (pc.dropout != 0.0f)
        return esft__fail(err, ESFT_ERR_UNSUPPORTED, "PESC dropout %g on a model: not implemented (set 0)",
                          (double)pc.dropout);
    if (esft_model_config_moe_layers(&m->cfg) == m->cfg.n_layers)
        return esft__fail(err, ESFT_ERR_UNSUPPORTED,
                          "PESC goes after dense MLPs, and every layer of this %s model is an MoE layer",
                          esft_model_family_name(m->cfg.family));
    return ESFT_OK;
}

static esft_status esft__train_spec_check(const esft_model *m, const esft_train_spec *sp, esft_error *err)
{
    switch (sp->method) {
    case ESFT_TRAIN_ESFT:
        if (!sp->experts) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "ESFT needs an expert config");
        return esft__trainable_check_config(m, sp->experts, err);
    case ESFT_TRAIN_FFT:
        return ESFT_OK;
    case ESFT_TRAIN_LORA:
        if (sp->lora_rank < 1 || sp->lora_rank > 65536 || !(sp->lora_alpha > 0.0f) || !isfinite(sp->lora_alpha))
            return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "LoRA rank %d / alpha %g: rank in [1, 65536], alpha > 0",
                              sp->lora_rank, (double)sp->lora_alpha);
        if (!(sp->lora_targets & ESFT__LORA_ALL) || (sp->lora_targets & ~ESFT__LORA_ALL))
            return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT,
                              "LoRA targets 0x%x: ESFT_LORA_ATTN, ESFT_LORA_MLP and/or ESFT_LORA_EXPERTS",
                              sp->lora_targets);
        return ESFT_OK;
    case ESFT_TRAIN_PESC:
        return esft__pesc_spec_check(m, sp, err);
    }
    return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "unknown training method %d", (int)sp->method);
}

/* What sp trains in full, and where LoRA goes. */
static int esft__spec_expert(const esft_train_spec *sp, const esft_model_config *c, int l, int e)
{
    if (!c->is_moe[l]) return 0;
    if (sp->method == ESFT_TRAIN_FFT) return 1;
    return sp->method == ESFT_TRAIN_ESFT && l < sp->experts->n_layers && esft_expert_config_has(sp->experts, l, e);
}

static int esft__spec_shared(const esft_train_spec *sp, const esft_model_config *c, int l)
{
    if (!c->is_moe[l] || c->d_shared == 0) return 0;
    return sp->method == ESFT_TRAIN_FFT || (sp->method == ESFT_TRAIN_ESFT && sp->experts->shared_experts);
}

static int esft__spec_module(const esft_train_spec *sp)
{
    return sp->method == ESFT_TRAIN_FFT || (sp->method == ESFT_TRAIN_ESFT && sp->experts->non_expert_modules);
}

static int esft__spec_lora(const esft_train_spec *sp, const esft_model *m, const esft_model_tensor *t)
{
    if (sp->method != ESFT_TRAIN_LORA || t->layer < 0 || t->matrix->rows < 2) return 0; /* vectors: norms, biases */
    if (t->attention) return (sp->lora_targets & ESFT_LORA_ATTN) != 0;
    return !m->cfg.is_moe[t->layer] && (sp->lora_targets & ESFT_LORA_MLP) != 0; /* a dense layer's MLP */
}

/* A routed expert's projection by its code (layer E + expert) 3 + part
   (part 0 gate, 1 up, 2 down); its layer, expert and part where wanted. */
static const esft_matrix *esft__expert_part(const esft_model *m, int code, int *layer, int *expert, int *part)
{
    int E = m->cfg.route.n_experts, l = code / (3 * E), e = (code / 3) % E, p = code % 3;
    const esft_model_layer *w = &m->layers[l];
    if (layer) *layer = l;
    if (expert) *expert = e;
    if (part) *part = p;
    return p == 0 ? &w->expert_gate[e] : p == 1 ? &w->expert_up[e] : &w->expert_down[e];
}

ESFTDEF const esft_matrix *esft_model_trainable_lora_base(const esft_model_trainable *tr, const esft_model *m, int i,
                                                          char *name, size_t cap, int *layer, int *attention)
{
    const esft_model_tensor *t;
    const esft_matrix *w;
    int l, e, p;
    if (!tr || !m || i < 0 || i >= tr->n_lora) return NULL;
    if (tr->lora_tensor[i] >= 0) {
        t = &m->tensors[tr->lora_tensor[i]];
        if (name && cap) snprintf(name, cap, "%s", t->name);
        if (layer) *layer = t->layer;
        if (attention) *attention = t->attention;
        return t->matrix;
    }
    w = esft__expert_part(m, -1 - tr->lora_tensor[i], &l, &e, &p);
    if (name && cap && esft_tensor_name_format(name, cap, m->expert_names, (esft_part)(ESFT_PART_EXPERT_GATE + p), l, e) !=
                           ESFT_OK)
        name[0] = 0;
    if (layer) *layer = l;
    if (attention) *attention = 0;
    return w;
}

/* Sizes the block and fills the tables (tr's arrays allocated by the caller
   when counting is done: pass 0 counts, pass 1 fills). */
static void esft__trainable_plan(esft_model_trainable *tr, const esft_model *m, const esft_train_spec *sp, int fill)
{
    const esft_model_config *c = &m->cfg;
    int L = c->n_layers, E = c->route.n_experts, l, e, i;
    size_t at = 0;
    tr->n_trained = tr->n_shared = tr->n_modules = tr->n_lora = tr->n_pesc = 0;
    for (l = 0; l < L; l++)
        for (e = 0; e < E; e++) {
            int on = esft__spec_expert(sp, c, l, e);
            if (fill) {
                tr->slot[(size_t)l * E + e] = on ? tr->n_trained : -1;
                if (on) tr->layer[tr->n_trained] = l, tr->expert[tr->n_trained] = e;
            }
            tr->n_trained += on;
        }
    at += (size_t)tr->n_trained * tr->expert_floats;
    for (l = 0; l < L; l++) {
        int on = esft__spec_shared(sp, c, l);
        if (fill) tr->shared_slot[l] = on ? tr->n_shared : -1;
        tr->n_shared += on;
    }
    at += (size_t)tr->n_shared * tr->shared_floats;
    for (i = 0; i < m->n_tensors; i++) {
        const esft_matrix *w = m->tensors[i].matrix;
        if (!esft__spec_module(sp)) break;
        if (fill) tr->module[tr->n_modules] = i, tr->module_offset[tr->n_modules] = at;
        tr->n_modules++;
        at += (size_t)w->rows * w->cols;
    }
    for (i = 0; i < m->n_tensors; i++) {
        const esft_matrix *w = m->tensors[i].matrix;
        size_t ra = (size_t)sp->lora_rank * w->cols;
        if (!esft__spec_lora(sp, m, &m->tensors[i])) continue;
        if (fill) {
            esft_lora *a = &tr->lora[tr->n_lora];
            tr->lora_tensor[tr->n_lora] = i;
            a->rank = sp->lora_rank;
            a->scale = sp->lora_alpha / (float)sp->lora_rank;
            a->a = tr->params + at;
            a->b = tr->params + at + ra;
        }
        tr->n_lora++;
        at += ra + (size_t)w->rows * sp->lora_rank;
    }
    for (i = 0; sp->method == ESFT_TRAIN_LORA && (sp->lora_targets & ESFT_LORA_EXPERTS) && i < L * E * 3; i++) {
        const esft_matrix *w;
        if (!c->is_moe[i / (3 * E)]) continue;
        w = esft__expert_part(m, i, NULL, NULL, NULL);
        if (fill) {
            tr->lora_tensor[tr->n_lora] = -1 - i;
            esft_lora *a = &tr->lora[tr->n_lora];
            a->rank = sp->lora_rank;
            a->scale = sp->lora_alpha / (float)sp->lora_rank;
            a->a = tr->params + at;
            a->b = tr->params + at + (size_t)sp->lora_rank * w->cols;
        }
        tr->n_lora++;
        at += (size_t)sp->lora_rank * ((size_t)w->cols + w->rows);
    }
    tr->pesc_offset = at;
    for (l = 0; l < L; l++) {
        int on = sp->method == ESFT_TRAIN_PESC && !c->is_moe[l];
        if (fill) tr->pesc_slot[l] = on ? tr->n_pesc : -1;
        tr->n_pesc += on;
    }
    at += (size_t)tr->n_pesc * tr->pesc_floats;
    tr->n_params = at;
}

/* The view's copy of one of m's matrices (same place in view / its layers). */
static esft_matrix *esft__view_matrix(esft_model_trainable *tr, const esft_model *m, const esft_matrix *w)
{
    uintptr_t p = (uintptr_t)w, lo = (uintptr_t)m->layers;
    if (p >= lo && p < lo + (size_t)m->cfg.n_layers * sizeof(esft_model_layer))
        return ESFT__CAST(esft_matrix *, (void *)((unsigned char *)tr->view_layers_ + (p - lo)));
    return ESFT__CAST(esft_matrix *, (void *)((unsigned char *)&tr->view + (p - (uintptr_t)m)));
}

/* Copies what trains out of m and builds tr->view around it. */
static void esft__trainable_fill(esft_model_trainable *tr, const esft_model *m, const esft_train_spec *sp)
{
    const esft_model_config *c = &m->cfg;
    int F = c->d_expert, D = c->d_model, FS = c->d_shared, k, l, i;
    size_t drawn = 0;
    for (k = 0; k < tr->n_trained; k++) {
        const esft_model_layer *w = &m->layers[tr->layer[k]];
        float *p = tr->params + (size_t)k * tr->expert_floats;
        esft__matrix_rows_f32(p, &w->expert_gate[tr->expert[k]], 0, F);
        esft__matrix_rows_f32(p + (size_t)F * D, &w->expert_up[tr->expert[k]], 0, F);
        esft__matrix_rows_f32(p + 2 * (size_t)F * D, &w->expert_down[tr->expert[k]], 0, D);
    }
    for (l = 0; l < c->n_layers; l++) {
        float *p = esft_model_trainable_shared(tr, tr->params, l);
        if (!p) continue;
        esft__matrix_rows_f32(p, &m->layers[l].shared_gate, 0, FS);
        esft__matrix_rows_f32(p + (size_t)FS * D, &m->layers[l].shared_up, 0, FS);
        esft__matrix_rows_f32(p + 2 * (size_t)FS * D, &m->layers[l].shared_down, 0, D);
    }
    tr->view = *m;
    tr->view.layers = tr->view_layers_;
    tr->view.blobs_ = NULL; /* the view owns nothing: closing it frees nothing */
    tr->view.n_blobs_ = tr->view.cap_blobs_ = 0;
    memcpy(tr->view_layers_, m->layers, (size_t)c->n_layers * sizeof(esft_model_layer));
    for (i = 0; i < tr->n_modules; i++) {
        const esft_matrix *w = m->tensors[tr->module[i]].matrix;
        esft_matrix *v = esft__view_matrix(tr, m, w);
        float *p = tr->params + tr->module_offset[i];
        esft__matrix_rows_f32(p, w, 0, w->rows);
        memset(v, 0, sizeof *v);
        v->dtype = ESFT_DTYPE_F32;
        v->rows = w->rows;
        v->cols = w->cols;
        v->data = p;
    }
    if (c->tie_embeddings) tr->view.lm_head = tr->view.embed;
    if (tr->view_experts_) { /* the view's own expert tables, so its experts can carry adapters */
        int E = c->route.n_experts;
        for (l = 0; l < c->n_layers; l++) {
            esft_matrix *v = tr->view_experts_ + (size_t)l * 3 * E;
            if (!c->is_moe[l]) continue;
            memcpy(v, m->layers[l].expert_gate, (size_t)E * sizeof *v);
            memcpy(v + E, m->layers[l].expert_up, (size_t)E * sizeof *v);
            memcpy(v + 2 * E, m->layers[l].expert_down, (size_t)E * sizeof *v);
            tr->view_layers_[l].expert_gate = v;
            tr->view_layers_[l].expert_up = v + E;
            tr->view_layers_[l].expert_down = v + 2 * E;
        }
    }
    for (i = 0; i < tr->n_lora; i++) {
        const esft_matrix *w = esft_model_trainable_lora_base(tr, m, i, NULL, 0, NULL, NULL);
        size_t ra = (size_t)tr->lora_rank * w->cols;
        /* PEFT's default: A kaiming-uniform (a = sqrt 5), i.e. +-1/sqrt(cols); B = 0 (the start is the base) */
        esft__adapter_uniform(tr->params + (tr->lora[i].a - tr->params), ra, sp->seed, drawn,
                              (float)(1.0 / sqrt((double)w->cols)));
        drawn += ra;
        if (tr->lora_tensor[i] >= 0) {
            esft__view_matrix(tr, m, w)->lora = &tr->lora[i];
        } else {
            int code = -1 - tr->lora_tensor[i], E = c->route.n_experts;
            tr->view_experts_[(size_t)(code / (3 * E)) * 3 * E + (size_t)(code % 3) * E + (size_t)((code / 3) % E)].lora =
                &tr->lora[i];
        }
    }
    for (l = 0; l < c->n_layers; l++) { /* upcycling: each layer its own stream, W_up = 0 */
        float *p = esft_model_trainable_pesc(tr, tr->params, l);
        if (p) (void)esft_pesc_init_weights(&tr->pesc, p, esft__adapter_mix(sp->seed + (uint64_t)l), NULL);
    }
}

ESFTDEF esft_status esft_model_trainable_init_spec(esft_model_trainable *tr, const esft_model *m,
                                                   const esft_train_spec *sp, const esft_allocator *allocator,
                                                   esft_error *err)
{
    const esft_model_config *c;
    size_t le;
    int L;
    esft_status s;
    if (!tr || !m || !m->layers || !sp)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL trainable, model or training spec");
    memset(tr, 0, sizeof *tr);
    tr->allocator = esft__allocator_or_default(allocator);
    if ((s = esft__train_spec_check(m, sp, err)) != ESFT_OK) return s;
    c = &m->cfg;
    L = c->n_layers;
    tr->method = sp->method;
    tr->base_ = m;
    tr->n_layers = L;
    tr->n_experts = c->route.n_experts;
    tr->expert_floats = 3 * (size_t)c->d_expert * c->d_model;
    tr->shared_floats = 3 * (size_t)c->d_shared * c->d_model;
    tr->lora_rank = sp->method == ESFT_TRAIN_LORA ? sp->lora_rank : 0;
    tr->lora_alpha = sp->method == ESFT_TRAIN_LORA ? sp->lora_alpha : 0.0f;
    tr->lora_targets = sp->method == ESFT_TRAIN_LORA ? sp->lora_targets : 0;
    if (sp->method == ESFT_TRAIN_PESC) {
        tr->pesc = esft__spec_pesc(m, sp);
        tr->pesc_floats = esft_pesc_param_count(&tr->pesc);
    }
    esft__trainable_plan(tr, m, sp, 0);
    le = (size_t)L * (tr->n_experts > 0 ? tr->n_experts : 1);
    tr->params = ESFT__CAST(float *, esft__calloc(&tr->allocator, tr->n_params ? tr->n_params : 1, sizeof(float)));
    tr->grads = ESFT__CAST(float *, esft__calloc(&tr->allocator, tr->n_params ? tr->n_params : 1, sizeof(float)));
    tr->layer = ESFT__CAST(int32_t *, esft__calloc(&tr->allocator, 2 * (size_t)(tr->n_trained + 1), sizeof(int32_t)));
    tr->slot = ESFT__CAST(int32_t *, esft__calloc(&tr->allocator, le, sizeof(int32_t)));
    tr->shared_slot = ESFT__CAST(int32_t *, esft__calloc(&tr->allocator, (size_t)L, sizeof(int32_t)));
    tr->module = ESFT__CAST(int32_t *, esft__calloc(&tr->allocator, (size_t)tr->n_modules + 1, sizeof(int32_t)));
    tr->module_offset = ESFT__CAST(size_t *, esft__calloc(&tr->allocator, (size_t)tr->n_modules + 1, sizeof(size_t)));
    tr->lora_tensor = ESFT__CAST(int32_t *, esft__calloc(&tr->allocator, (size_t)tr->n_lora + 1, sizeof(int32_t)));
    tr->lora = ESFT__CAST(esft_lora *, esft__calloc(&tr->allocator, (size_t)tr->n_lora + 1, sizeof(esft_lora)));
    tr->pesc_slot = ESFT__CAST(int32_t *, esft__calloc(&tr->allocator, (size_t)L, sizeof(int32_t)));
    tr->view_layers_ = ESFT__CAST(esft_model_layer *, esft__calloc(&tr->allocator, (size_t)L, sizeof(esft_model_layer)));
    if (tr->lora_targets & ESFT_LORA_EXPERTS)
        tr->view_experts_ = ESFT__CAST(esft_matrix *, esft__calloc(&tr->allocator, le * 3, sizeof(esft_matrix)));
    if (!tr->params || !tr->grads || !tr->layer || !tr->slot || !tr->shared_slot || !tr->module ||
        !tr->module_offset || !tr->lora_tensor || !tr->lora || !tr->pesc_slot || !tr->view_layers_ ||
        ((tr->lora_targets & ESFT_LORA_EXPERTS) && !tr->view_experts_)) {
        size_t n = tr->n_params;
        esft_allocator a = tr->allocator;
        esft_model_trainable_uninit(tr);
        tr->allocator = a;
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "trainable block of %lu floats (and its gradient)",
                          (unsigned long)n);
    }
    tr->expert = tr->layer + tr->n_trained + 1;
    esft__trainable_plan(tr, m, sp, 1);
    esft__trainable_fill(tr, m, sp);
    return ESFT_OK;
}

ESFTDEF esft_status esft_model_trainable_init(esft_model_trainable *tr, const esft_model *m,
                                              const esft_expert_config *cfg, const esft_allocator *allocator,
                                              esft_error *err)
{
    esft_train_spec sp;
    memset(&sp, 0, sizeof sp);
    sp.method = ESFT_TRAIN_ESFT;
    sp.experts = cfg;
    if (!cfg) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL expert config");
    return esft_model_trainable_init_spec(tr, m, &sp, allocator, err);
}

ESFTDEF float *esft_model_trainable_shared(const esft_model_trainable *tr, float *block, int layer)
{
    if (!tr || !block || !tr->shared_slot || layer < 0 || layer >= tr->n_layers || tr->shared_slot[layer] < 0)
        return NULL;
    return block + (size_t)tr->n_trained * tr->expert_floats + (size_t)tr->shared_slot[layer] * tr->shared_floats;
}

ESFTDEF float *esft_model_trainable_pesc(const esft_model_trainable *tr, float *block, int layer)
{
    if (!tr || !block || !tr->pesc_slot || layer < 0 || layer >= tr->n_layers || tr->pesc_slot[layer] < 0)
        return NULL;
    return block + tr->pesc_offset + (size_t)tr->pesc_slot[layer] * tr->pesc_floats;
}

ESFTDEF float *esft_model_trainable_expert(const esft_model_trainable *tr, float *block, int layer, int expert)
{
    int slot;
    if (!tr || !block || !tr->slot || layer < 0 || layer >= tr->n_layers || expert < 0 || expert >= tr->n_experts)
        return NULL;
    slot = tr->slot[(size_t)layer * tr->n_experts + expert];
    return slot < 0 ? NULL : block + (size_t)slot * tr->expert_floats;
}

/* The gradient of a value of tr->params (its mirror in tr->grads); NULL for
   memory outside the block (frozen weights). */
static float *esft__grad_of(const esft_model_trainable *tr, const void *p)
{
    uintptr_t u = (uintptr_t)p, lo;
    if (!tr || !p || !tr->n_params) return NULL;
    lo = (uintptr_t)tr->params;
    if (u < lo || u >= lo + tr->n_params * sizeof(float)) return NULL;
    return tr->grads + (u - lo) / sizeof(float);
}

/* Every bit of an expert config set (all experts of every MoE layer, shared
   experts, non-expert modules): what FFT trains, for its file's metadata. */
static esft_status esft__config_every(esft_expert_config *cfg, const esft_model *m, const esft_allocator *a,
                                      esft_error *err)
{
    const esft_model_config *c = &m->cfg;
    int L = c->n_layers, E = c->route.n_experts, l, e, n = 0;
    if (esft__config_alloc(cfg, L, E, (size_t)L * E + 1, a) != ESFT_OK)
        return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "expert config of %d layers", L);
    for (l = 0; l < L; l++) {
        cfg->offset[l] = n;
        cfg->layer_present[l] = 1;
        for (e = 0; c->is_moe[l] && e < E; e++) cfg->ids[n++] = e;
    }
    cfg->offset[L] = n;
    cfg->shared_experts = cfg->non_expert_modules = 1;
    return ESFT_OK;
}

/* One tensor of a trained file: its name (written into name, 160 bytes),
   dtype and shape from the model, values from the block. */
static esft_status esft__trained_tensor(esft_st_write_tensor *x, char *name, const esft_matrix *w, esft_dtype dtype,
                                        int n_dims, const float *values, esft_error *err)
{
    if (dtype == ESFT_DTYPE_F8_E4M3)
        return esft__fail(err, ESFT_ERR_UNSUPPORTED, "%s is FP8: saving it would re-quantise", name);
    x->name = name;
    x->dtype = dtype;
    x->n_dims = n_dims;
    x->shape[0] = n_dims == 1 ? w->cols : w->rows;
    x->shape[1] = w->cols;
    x->f32 = values;
    return ESFT_OK;
}

/* The PESC config as __metadata__ strings (keys and values of 4 pairs; vals 4 x 32 bytes). */
static const char *const esft__pesc_meta_keys[4] = {"pesc_n_experts", "pesc_top_k", "pesc_rank", "pesc_scale"};

static void esft__pesc_meta_values(const esft_pesc_config *c, char vals[4][32])
{
    snprintf(vals[0], 32, "%d", c->n_experts);
    snprintf(vals[1], 32, "%d", c->top_k);
    snprintf(vals[2], 32, "%d", c->rank);
    snprintf(vals[3], 32, "%.9g", (double)c->scale);
}

/* A PESC set's routers and adapters, F32, Camelidae's names, config in __metadata__. */
static esft_status esft__pesc_save(const esft_model_trainable *tr, const char *path, esft_error *err)
{
    const esft_pesc_config *c = &tr->pesc;
    int per = 1 + 2 * c->n_experts, n = tr->n_pesc * per, l, j, at = 0;
    const char *keys[5], *values[5];
    char vals[4][32], *names;
    esft_st_write_tensor *t = ESFT__CAST(esft_st_write_tensor *, esft__calloc(&tr->allocator, (size_t)n + 1, sizeof *t));
    esft_status s = ESFT_OK;
    names = ESFT__CAST(char *, esft__calloc(&tr->allocator, (size_t)n + 1, 160));
    if (!t || !names) s = esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "names of %d tensors", n);
    for (l = 0; s == ESFT_OK && l < tr->n_layers; l++) {
        const float *p = esft_model_trainable_pesc(tr, tr->params, l);
        for (j = 0; p && s == ESFT_OK && j < per; j++, at++) {
            esft_pesc_tensor which = j == 0 ? ESFT_PESC_ROUTER : (j - 1) % 2 ? ESFT_PESC_UP : ESFT_PESC_DOWN;
            int e = (j - 1) / 2;
            t[at].name = names + (size_t)at * 160;
            s = esft_pesc_tensor_name(names + (size_t)at * 160, 160, l, which, e);
            t[at].dtype = ESFT_DTYPE_F32;
            t[at].n_dims = 2;
            t[at].shape[0] = which == ESFT_PESC_ROUTER ? c->n_experts : which == ESFT_PESC_DOWN ? c->rank : c->d_model;
            t[at].shape[1] = which == ESFT_PESC_UP ? c->rank : c->d_model;
            t[at].f32 = p + esft_pesc_tensor_offset(c, which, e);
        }
    }
    esft__pesc_meta_values(c, vals);
    keys[0] = "format";
    values[0] = "pt";
    for (j = 0; j < 4; j++) keys[j + 1] = esft__pesc_meta_keys[j], values[j + 1] = vals[j];
    if (s == ESFT_OK) s = esft_safetensors_write(path, t, n, keys, values, 5, err);
    esft__release(&tr->allocator, t);
    esft__release(&tr->allocator, names);
    return s;
}

ESFTDEF esft_status esft_model_trainable_save(const esft_model_trainable *tr, const esft_model *m,
                                              const esft_expert_config *cfg, const char *path, esft_error *err)
{
    static const esft_part parts[3] = {ESFT_PART_EXPERT_GATE, ESFT_PART_EXPERT_UP, ESFT_PART_EXPERT_DOWN};
    static const esft_part shared_parts[3] = {ESFT_PART_SHARED_GATE, ESFT_PART_SHARED_UP, ESFT_PART_SHARED_DOWN};
    esft_expert_config every;
    esft_st_write_tensor *t;
    char *names;
    int i, j, n, at = 0;
    esft_status s = ESFT_OK;
    if (!tr || !m || !m->layers || !path || !tr->slot ||
        (!cfg && tr->method != ESFT_TRAIN_FFT && tr->method != ESFT_TRAIN_PESC))
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL trainable, model, config or path");
    if (tr->n_layers != m->cfg.n_layers || tr->n_experts != m->cfg.route.n_experts || tr->base_ != m)
        return esft__fail(err, ESFT_ERR_SHAPE, "trainable set built for another model");
    if (tr->method == ESFT_TRAIN_PESC) return esft__pesc_save(tr, path, err);
    if (tr->method == ESFT_TRAIN_LORA)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "a LoRA set is saved with esft_model_lora_save");
    memset(&every, 0, sizeof every);
    if (!cfg && (s = esft__config_every(&every, m, &tr->allocator, err)) != ESFT_OK) return s;
    n = 3 * (tr->n_trained + tr->n_shared) + tr->n_modules;
    t = ESFT__CAST(esft_st_write_tensor *, esft__calloc(&tr->allocator, (size_t)n + 1, sizeof *t));
    names = ESFT__CAST(char *, esft__calloc(&tr->allocator, (size_t)n + 1, 160));
    if (!t || !names) s = esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "names of %d tensors", n);
    for (i = 0; s == ESFT_OK && i < tr->n_trained; i++) {
        const esft_model_layer *w = &m->layers[tr->layer[i]];
        const float *p = tr->params + (size_t)i * tr->expert_floats;
        const esft_matrix *mats[3];
        mats[0] = &w->expert_gate[tr->expert[i]];
        mats[1] = &w->expert_up[tr->expert[i]];
        mats[2] = &w->expert_down[tr->expert[i]];
        for (j = 0; s == ESFT_OK && j < 3; j++, at++) {
            char *name = names + (size_t)at * 160;
            s = esft_tensor_name_format(name, 160, m->expert_names, parts[j], tr->layer[i], tr->expert[i]);
            if (s == ESFT_OK)
                s = esft__trained_tensor(&t[at], name, mats[j], mats[j]->dtype, 2, p + (size_t)j * tr->expert_floats / 3,
                                         err);
        }
    }
    for (i = 0; s == ESFT_OK && i < tr->n_layers; i++) {
        const esft_model_layer *w = &m->layers[i];
        const float *p = esft_model_trainable_shared(tr, tr->params, i);
        esft_family fam = m->cfg.family == ESFT_MODEL_QWEN2_MOE ? ESFT_FAMILY_QWEN_MOE : ESFT_FAMILY_DEEPSEEK_V2;
        const esft_matrix *mats[3];
        if (!p) continue;
        mats[0] = &w->shared_gate;
        mats[1] = &w->shared_up;
        mats[2] = &w->shared_down;
        for (j = 0; s == ESFT_OK && j < 3; j++, at++) {
            char *name = names + (size_t)at * 160;
            s = esft_tensor_name_format(name, 160, fam, shared_parts[j], i, -1);
            if (s == ESFT_OK)
                s = esft__trained_tensor(&t[at], name, mats[j], mats[j]->dtype, 2, p + (size_t)j * tr->shared_floats / 3,
                                         err);
        }
    }
    for (i = 0; s == ESFT_OK && i < tr->n_modules; i++, at++) {
        const esft_model_tensor *mt = &m->tensors[tr->module[i]];
        char *name = names + (size_t)at * 160;
        snprintf(name, 160, "%s", mt->name);
        s = esft__trained_tensor(&t[at], name, mt->matrix, mt->file_dtype, mt->file_dims,
                                 tr->params + tr->module_offset[i], err);
    }
    if (s == ESFT_OK) s = esft_checkpoint_save_trained(path, cfg ? cfg : &every, t, n, err);
    esft_expert_config_free(&every);
    esft__release(&tr->allocator, t);
    esft__release(&tr->allocator, names);
    return s;
}

/* Where a PESC tensor (Camelidae's name, parsed) goes in tr->params, and its shape. */
static float *esft__pesc_target(const esft_model_trainable *tr, const esft_tensor_name *tn, int64_t shape[2])
{
    const esft_pesc_config *c = &tr->pesc;
    float *p = esft_model_trainable_pesc(tr, tr->params, tn->layer);
    esft_pesc_tensor which = tn->part == ESFT_PART_ROUTER ? ESFT_PESC_ROUTER
                             : tn->part == ESFT_PART_ADAPTER_DOWN ? ESFT_PESC_DOWN : ESFT_PESC_UP;
    if (!p || (which != ESFT_PESC_ROUTER && (tn->expert < 0 || tn->expert >= c->n_experts))) return NULL;
    shape[0] = which == ESFT_PESC_ROUTER ? c->n_experts : which == ESFT_PESC_DOWN ? c->rank : c->d_model;
    shape[1] = which == ESFT_PESC_UP ? c->rank : c->d_model;
    return p + esft_pesc_tensor_offset(c, which, tn->expert);
}

/* Where tensor name of a trained file goes in tr->params, and its shape. */
static float *esft__trainable_target(const esft_model_trainable *tr, const esft_model *m, const char *name,
                                     int64_t shape[2])
{
    esft_tensor_name tn;
    const esft_model_config *c = &m->cfg;
    float *p = NULL;
    size_t width;
    int k, i;
    esft_tensor_name_parse(name, &tn);
    if (tn.family == ESFT_FAMILY_CAMELIDAE && tn.part != ESFT_PART_NONE) return esft__pesc_target(tr, &tn, shape);
    switch (tn.part) {
    case ESFT_PART_EXPERT_GATE: case ESFT_PART_EXPERT_UP: case ESFT_PART_EXPERT_DOWN:
        p = esft_model_trainable_expert(tr, tr->params, tn.layer, tn.expert);
        k = tn.part - ESFT_PART_EXPERT_GATE;
        width = (size_t)c->d_expert;
        break;
    case ESFT_PART_SHARED_GATE: case ESFT_PART_SHARED_UP: case ESFT_PART_SHARED_DOWN:
        p = esft_model_trainable_shared(tr, tr->params, tn.layer);
        k = tn.part - ESFT_PART_SHARED_GATE;
        width = (size_t)c->d_shared;
        break;
    default:
        for (i = 0; i < tr->n_modules; i++) {
            const esft_model_tensor *mt = &m->tensors[tr->module[i]];
            if (strcmp(mt->name, name) != 0) continue;
            shape[0] = mt->matrix->rows;
            shape[1] = mt->matrix->cols;
            return tr->params + tr->module_offset[i];
        }
        return NULL;
    }
    if (!p) return NULL;
    shape[0] = k == 2 ? c->d_model : (int64_t)width;
    shape[1] = k == 2 ? (int64_t)width : c->d_model;
    return p + (size_t)k * width * c->d_model;
}

/* 1 if tensor t has the shape (rows, cols), a vector (1, cols) also as 1-D (cols). */
static int esft__tensor_is(const esft_st_tensor *t, const int64_t shape[2])
{
    if (t->n_dims == 2) return t->shape[0] == shape[0] && t->shape[1] == shape[1];
    return t->n_dims == 1 && shape[0] == 1 && t->shape[0] == shape[1];
}

/* Reads every tensor of path into the block place target gives, all checked
   before any value is written. */
static esft_status esft__trainable_read(esft_model_trainable *tr, const esft_model *m, const char *path,
                                        float *(*target)(const esft_model_trainable *, const esft_model *,
                                                         const char *, int64_t[2]),
                                        esft_error *err)
{
    esft_safetensors st;
    esft_status s;
    int i;
    if ((s = esft_safetensors_open(&st, path, &tr->allocator, err)) != ESFT_OK) return s;
    for (i = 0; s == ESFT_OK && i < st.n_tensors; i++) {
        const esft_st_tensor *t = &st.tensors[i];
        int64_t shape[2];
        if (!target(tr, m, t->name, shape))
            s = esft__fail(err, ESFT_ERR_RANGE, "%s: tensor %s is not one this run trains", path, t->name);
        else if (!esft__tensor_is(t, shape))
            s = esft__fail(err, ESFT_ERR_SHAPE, "%s: tensor %s is not (%lld, %lld)", path, t->name,
                           (long long)shape[0], (long long)shape[1]);
    }
    for (i = 0; s == ESFT_OK && i < st.n_tensors; i++) {
        int64_t shape[2];
        s = esft_safetensors_read_f32(&st, i, target(tr, m, st.tensors[i].name, shape), err);
    }
    esft_safetensors_close(&st);
    return s;
}

/* A PESC file's __metadata__ config (where given) against tr's: adapters
   trained at another scale would load with the right shapes and mean
   something else. */
static esft_status esft__pesc_meta_check(const esft_model_trainable *tr, const char *path, esft_error *err)
{
    esft_safetensors st;
    char vals[4][32];
    int j;
    esft_status s = esft_safetensors_open(&st, path, &tr->allocator, err);
    if (s != ESFT_OK) return s;
    esft__pesc_meta_values(&tr->pesc, vals);
    for (j = 0; s == ESFT_OK && j < 4; j++) {
        const char *v = esft_safetensors_metadata(&st, esft__pesc_meta_keys[j]);
        if (v && strcmp(v, vals[j]) != 0)
            s = esft__fail(err, ESFT_ERR_SHAPE, "%s: %s is %s, this PESC set has %s", path, esft__pesc_meta_keys[j], v,
                           vals[j]);
    }
    esft_safetensors_close(&st);
    return s;
}

ESFTDEF esft_status esft_model_trainable_load(esft_model_trainable *tr, const esft_model *m, const char *path,
                                              esft_error *err)
{
    if (!tr || !m || !m->layers || !path || !tr->slot)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL trainable, model or path");
    if (tr->n_layers != m->cfg.n_layers || tr->n_experts != m->cfg.route.n_experts || tr->base_ != m)
        return esft__fail(err, ESFT_ERR_SHAPE, "trainable set built for another model");
    if (tr->method == ESFT_TRAIN_PESC) {
        esft_status s = esft__pesc_meta_check(tr, path, err);
        if (s != ESFT_OK) return s;
    }
    return esft__trainable_read(tr, m, path, esft__trainable_target, err);
}

/* ---- LoRA in PEFT's files ------------------------------------------------- */

/* PEFT's name of adapter i's A (which 0) or B (1): base_model.model.<module>.lora_A.weight. */
static void esft__lora_name(char *buf, size_t cap, const esft_model *m, const esft_model_trainable *tr, int i, int which)
{
    char name[ESFT__TENSOR_NAME];
    size_t n;
    esft_model_trainable_lora_base(tr, m, i, name, sizeof name, NULL, NULL);
    n = strlen(name);
    if (n > 7 && strcmp(name + n - 7, ".weight") == 0) n -= 7;
    snprintf(buf, cap, "base_model.model.%.*s.lora_%c.weight", (int)n, name, which ? 'B' : 'A');
}

/* Adapter i's module relative to its layer, into mod (ESFT__TENSOR_NAME
   bytes): self_attn.q_proj, mlp.gate_proj, and for routed experts
   mlp.experts.#.gate_proj (# standing for every expert's number). */
static void esft__lora_module(const esft_model *m, const esft_model_trainable *tr, int i, char *mod)
{
    char name[ESFT__TENSOR_NAME];
    const char *p = name, *ex;
    size_t n;
    int dots = 0;
    esft_model_trainable_lora_base(tr, m, i, name, sizeof name, NULL, NULL);
    while (*p && dots < 3) dots += *p++ == '.'; /* past "model.layers.N." */
    n = strlen(p) - (strlen(p) > 7 && strcmp(p + strlen(p) - 7, ".weight") == 0 ? 7 : 0);
    snprintf(mod, ESFT__TENSOR_NAME, "%.*s", (int)n, p);
    if (tr->lora_tensor[i] < 0 && (ex = strstr(mod, ".experts.")) != NULL) {
        char *num = mod + (ex - mod) + 9, *end = num;
        while (*end >= '0' && *end <= '9') end++;
        memmove(num + 1, end, strlen(end) + 1);
        *num = '#';
    }
}

/* adapter_config.json: what PEFT's LoraConfig needs to rebuild the adapters.
   target_modules is a regular expression PEFT matches against whole module
   names: the adapted modules exactly (a list of last components such as
   gate_proj would also catch shared experts' gate_proj). */
static void esft__lora_config_json(esft__buf *b, const esft_model_trainable *tr, const esft_model *m)
{
    enum { MAX_KINDS = 64 };
    char kinds[MAX_KINDS][ESFT__TENSOR_NAME], mod[ESFT__TENSOR_NAME];
    esft__buf re;
    int i, j, n_kinds = 0;
    esft__buf_printf(b, "{\n  \"peft_type\": \"LORA\",\n  \"task_type\": \"CAUSAL_LM\",\n  \"r\": %d,\n"
                        "  \"lora_alpha\": %.9g,\n  \"lora_dropout\": 0.0,\n  \"bias\": \"none\",\n"
                        "  \"fan_in_fan_out\": false,\n  \"use_rslora\": false,\n  \"inference_mode\": true,\n"
                        "  \"base_model_name_or_path\": null,\n  \"target_modules\": ",
                     tr->lora_rank, (double)tr->lora_alpha);
    for (i = 0; i < tr->n_lora; i++) { /* the distinct modules: a handful */
        esft__lora_module(m, tr, i, mod);
        for (j = 0; j < n_kinds && strcmp(kinds[j], mod) != 0; j++) {
        }
        if (j == n_kinds && n_kinds < MAX_KINDS) strcpy(kinds[n_kinds++], mod);
    }
    esft__buf_init(&re, &tr->allocator);
    esft__buf_puts(&re, ".*\\.layers\\.\\d+\\.(");
    for (j = 0; j < n_kinds; j++) {
        const char *c;
        if (j) esft__buf_puts(&re, "|");
        for (c = kinds[j]; *c; c++) {
            if (*c == '.') esft__buf_puts(&re, "\\.");
            else if (*c == '#') esft__buf_puts(&re, "\\d+");
            else esft__buf_append(&re, c, 1);
        }
    }
    esft__buf_puts(&re, ")");
    if (re.failed) b->failed = 1;
    else esft__buf_json_string(b, re.data);
    esft__buf_free(&re);
    esft__buf_puts(b, "\n}\n");
}

ESFTDEF esft_status esft_model_lora_save(const esft_model_trainable *tr, const char *dir, esft_error *err)
{
    const esft_model *m;
    esft_st_write_tensor *t;
    char *names, path[4200];
    esft__buf json;
    int i, n;
    esft_status s = ESFT_OK;
    if (!tr || !dir || !tr->base_) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL trainable or directory");
    if (tr->method != ESFT_TRAIN_LORA || !tr->n_lora)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "the trainable set holds no LoRA adapter");
    m = tr->base_;
    if ((s = esft__make_dir(dir, err)) != ESFT_OK) return s;
    n = 2 * tr->n_lora;
    t = ESFT__CAST(esft_st_write_tensor *, esft__calloc(&tr->allocator, (size_t)n, sizeof *t));
    names = ESFT__CAST(char *, esft__calloc(&tr->allocator, (size_t)n, 2 * ESFT__TENSOR_NAME));
    if (!t || !names) s = esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "names of %d tensors", n);
    for (i = 0; s == ESFT_OK && i < n; i++) {
        const esft_matrix *w = esft_model_trainable_lora_base(tr, m, i / 2, NULL, 0, NULL, NULL);
        const esft_lora *a = &tr->lora[i / 2];
        char *name = names + (size_t)i * 2 * ESFT__TENSOR_NAME;
        esft__lora_name(name, 2 * ESFT__TENSOR_NAME, m, tr, i / 2, i % 2);
        t[i].name = name;
        t[i].dtype = ESFT_DTYPE_F32;
        t[i].n_dims = 2;
        t[i].shape[0] = i % 2 ? w->rows : a->rank;
        t[i].shape[1] = i % 2 ? a->rank : w->cols;
        t[i].f32 = i % 2 ? a->b : a->a;
    }
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    if (s == ESFT_OK) s = esft_safetensors_write(path, t, n, NULL, NULL, 0, err);
    esft__buf_init(&json, &tr->allocator);
    esft__lora_config_json(&json, tr, m);
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    if (s == ESFT_OK)
        s = json.failed ? esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "adapter_config.json")
                        : esft__write_file_atomic(path, json.data, json.size, err);
    esft__buf_free(&json);
    esft__release(&tr->allocator, t);
    esft__release(&tr->allocator, names);
    return s;
}

/* The adapter of module (a checkpoint weight name): its index among tr's, or -1.
   A routed expert's by its parsed (layer, expert, part); the others by name. */
static int esft__lora_find(const esft_model_trainable *tr, const esft_model *m, const char *module)
{
    esft_tensor_name tn;
    int i, lo, hi;
    if (esft_tensor_name_parse(module, &tn) && tn.part >= ESFT_PART_EXPERT_GATE && tn.part <= ESFT_PART_EXPERT_DOWN) {
        int32_t want;
        if (tn.layer < 0 || tn.layer >= m->cfg.n_layers || tn.expert < 0 || tn.expert >= m->cfg.route.n_experts)
            return -1;
        want = -1 - ((tn.layer * m->cfg.route.n_experts + tn.expert) * 3 + (int)(tn.part - ESFT_PART_EXPERT_GATE));
        /* expert adapters come last, their codes increasing: lora_tensor decreasing */
        for (lo = 0, hi = tr->n_lora; lo < hi;) {
            int mid = (lo + hi) / 2;
            if (tr->lora_tensor[mid] >= 0 || tr->lora_tensor[mid] > want) lo = mid + 1;
            else hi = mid;
        }
        return lo < tr->n_lora && tr->lora_tensor[lo] == want ? lo : -1;
    }
    for (i = 0; i < tr->n_lora && tr->lora_tensor[i] >= 0; i++)
        if (strcmp(m->tensors[tr->lora_tensor[i]].name, module) == 0) return i;
    return -1;
}

/* Where a PEFT tensor name (base_model.model.<module>.lora_A.weight) goes
   among tr's adapters, and its shape. */
static float *esft__lora_target(const esft_model_trainable *tr, const esft_model *m, const char *name,
                                int64_t shape[2])
{
    static const char head[] = "base_model.model.", tail_a[] = ".lora_A.weight", tail_b[] = ".lora_B.weight";
    char module[ESFT__TENSOR_NAME + 8];
    size_t n = strlen(name), h = sizeof head - 1, t = sizeof tail_a - 1;
    const esft_matrix *w;
    int which, i;
    if (n <= h + t || strncmp(name, head, h) != 0) return NULL;
    if (strcmp(name + n - t, tail_a) == 0) which = 0;
    else if (strcmp(name + n - t, tail_b) == 0) which = 1;
    else return NULL;
    if (n - h - t >= ESFT__TENSOR_NAME) return NULL;
    snprintf(module, sizeof module, "%.*s.weight", (int)(n - h - t), name + h);
    if ((i = esft__lora_find(tr, m, module)) < 0) return NULL;
    w = esft_model_trainable_lora_base(tr, m, i, NULL, 0, NULL, NULL);
    shape[0] = which ? w->rows : tr->lora_rank;
    shape[1] = which ? tr->lora_rank : w->cols;
    return tr->params + ((which ? tr->lora[i].b : tr->lora[i].a) - tr->params);
}

ESFTDEF esft_status esft_model_lora_load(esft_model_trainable *tr, const char *dir, esft_error *err)
{
    char path[4200];
    if (!tr || !dir || !tr->base_) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL trainable or directory");
    if (tr->method != ESFT_TRAIN_LORA)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "the trainable set holds no LoRA adapter");
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    return esft__trainable_read(tr, tr->base_, path, esft__lora_target, err);
}

ESFTDEF esft_status esft_model_trainable_open(esft_model_trainable *tr, const esft_model *m, const char *path,
                                              esft_error *err)
{
    esft_safetensors st;
    esft_expert_config cfg;
    esft_status s;
    if (!tr || !m || !path) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL trainable, model or path");
    memset(tr, 0, sizeof *tr);
    if ((s = esft_safetensors_open(&st, path, NULL, err)) != ESFT_OK) return s;
    if (esft_safetensors_metadata(&st, esft__pesc_meta_keys[0])) { /* PESC adapters: their config, no expert config */
        esft_train_spec sp;
        const char *v[4];
        int j;
        for (j = 0; j < 4; j++) v[j] = esft_safetensors_metadata(&st, esft__pesc_meta_keys[j]);
        memset(&sp, 0, sizeof sp);
        sp.method = ESFT_TRAIN_PESC;
        sp.pesc = esft_pesc_config_init(0, v[0] ? atoi(v[0]) : 0, v[1] ? atoi(v[1]) : 0, v[2] ? atoi(v[2]) : 0);
        sp.pesc.scale = v[3] ? (float)atof(v[3]) : 0.0f;
        sp.pesc.aux_alpha = 0.0f; /* evaluation: the aux loss is training's */
        esft_safetensors_close(&st);
        s = esft_model_trainable_init_spec(tr, m, &sp, NULL, err);
    } else {
        s = esft_checkpoint_read_config(&st, &cfg, err);
        esft_safetensors_close(&st);
        if (s != ESFT_OK) return s;
        s = esft_model_trainable_init(tr, m, &cfg, NULL, err);
        esft_expert_config_free(&cfg);
    }
    if (s == ESFT_OK && (s = esft_model_trainable_load(tr, m, path, err)) != ESFT_OK) esft_model_trainable_uninit(tr);
    return s;
}

/* r and lora_alpha of a PEFT adapter_config.json. */
static esft_status esft__lora_config_read(const char *path, int *rank, double *alpha, esft_error *err)
{
    char *text = NULL;
    size_t size = 0;
    esft_json js;
    int tr, ta;
    esft_status s = esft_file_read(path, 1u << 20, NULL, &text, &size, err);
    if (s != ESFT_OK) return s;
    s = esft_json_parse(&js, text, size, NULL, err);
    if (s == ESFT_OK) {
        double r = 0.0;
        tr = esft_json_find(&js, 0, "r");
        ta = esft_json_find(&js, 0, "lora_alpha");
        if (tr < 0 || ta < 0 || esft_json_number(&js, tr, &r) != ESFT_OK || esft_json_number(&js, ta, alpha) != ESFT_OK ||
            r != floor(r) || r < 1 || r > 65536)
            s = esft__fail_at(err, ESFT_ERR_PARSE, path, 0, "r (an integer >= 1) and lora_alpha (a number) are needed");
        *rank = (int)r;
        esft_json_free(&js);
    }
    esft_file_free(text, NULL);
    return s;
}

ESFTDEF esft_status esft_model_lora_open(esft_model_trainable *tr, const esft_model *m, const char *dir,
                                         esft_error *err)
{
    esft_train_spec sp;
    esft_safetensors st;
    char path[4200];
    double alpha = 0.0;
    int i;
    esft_status s;
    if (!tr || !m || !dir) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL trainable, model or directory");
    memset(tr, 0, sizeof *tr);
    memset(&sp, 0, sizeof sp);
    sp.method = ESFT_TRAIN_LORA;
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    if ((s = esft__lora_config_read(path, &sp.lora_rank, &alpha, err)) != ESFT_OK) return s;
    sp.lora_alpha = (float)alpha;
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    if ((s = esft_safetensors_open(&st, path, NULL, err)) != ESFT_OK) return s;
    for (i = 0; i < st.n_tensors; i++) {
        if (strstr(st.tensors[i].name, ".self_attn.")) sp.lora_targets |= ESFT_LORA_ATTN;
        else if (strstr(st.tensors[i].name, ".experts.")) sp.lora_targets |= ESFT_LORA_EXPERTS;
        else if (strstr(st.tensors[i].name, ".mlp.")) sp.lora_targets |= ESFT_LORA_MLP;
    }
    esft_safetensors_close(&st);
    if ((s = esft_model_trainable_init_spec(tr, m, &sp, NULL, err)) != ESFT_OK) return s;
    memset(tr->params, 0, tr->n_params * sizeof(float)); /* what the file lacks adds nothing */
    if ((s = esft_model_lora_load(tr, dir, err)) != ESFT_OK) esft_model_trainable_uninit(tr);
    return s;
}

/* y (T, W.cols) += x (T, W.rows) W, the product the backward of y = x W^T
   needs; W in any of its dtypes, converted a panel of rows at a time. */
static void esft__matmul_acc(float *y, int ldy, const float *x, int ldx, int T, const esft_matrix *W, float *panel)
{
    int r0, step;
    if (W->dtype == ESFT_DTYPE_F32) {
        esft__sgemm(0, 0, T, W->cols, W->rows, 1.0f, x, ldx, ESFT__CAST(const float *, W->data), W->cols, 1.0f, y,
                    ldy);
    } else {
        step = esft__panel_rows(W);
        for (r0 = 0; r0 < W->rows; r0 += step) {
            int n = W->rows - r0 < step ? W->rows - r0 : step;
            esft__matrix_rows_f32(panel, W, r0, n);
            esft__sgemm(0, 0, T, W->cols, n, 1.0f, x + r0, ldx, panel, W->cols, 1.0f, y, ldy);
        }
    }
    if (W->lora) esft__lora_apply(y, ldy, x, ldx, T, W, 1, panel);
}

/* dx += backward of y = RMSNorm(x) * w over rows of n, from dy:
   dx_i += inv w_i dy_i - x_i inv^3 (sum_j w_j dy_j x_j) / n, inv as the
   forward's; and dw_i += sum over rows of dy_i x_i inv when dw is given (one
   thread, rows in order: the same bits for any thread count). */
static void esft__rmsnorm_backward_rows(float *dx, int lddx, const float *dy, int lddy, const float *x, int ldx,
                                        const float *w, float *dw, int rows, int n, float eps, int nt)
{
    int r;
    (void)nt;
    for (r = 0; dw && r < rows; r++) {
        const float *xr = x + (size_t)r * ldx, *dyr = dy + (size_t)r * lddy;
        double ss = 0.0;
        float inv;
        int i;
        for (i = 0; i < n; i++) ss += (double)xr[i] * xr[i];
        inv = 1.0f / sqrtf((float)(ss / n) + eps);
        for (i = 0; i < n; i++) dw[i] += dyr[i] * xr[i] * inv;
    }
    ESFT__MOE_FOR_STATIC(nt)
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx, *dyr = dy + (size_t)r * lddy;
        float *dxr = dx + (size_t)r * lddx, inv, coef;
        double ss = 0.0, dot = 0.0;
        int i;
        for (i = 0; i < n; i++) {
            ss += (double)xr[i] * xr[i];
            dot += (double)w[i] * dyr[i] * xr[i];
        }
        inv = 1.0f / sqrtf((float)(ss / n) + eps);
        coef = (float)(dot / n) * inv * inv * inv;
        for (i = 0; i < n; i++) dxr[i] += inv * (w[i] * dyr[i]) - xr[i] * coef;
    }
}

/* The transpose of esft__rope_apply (a rotation by -angle), in place on the gradient. */
static void esft__rope_backward(float *dx, int ld, int n_heads, int hs, int T, int R, int interleaved, const float *cs,
                                const float *sn, int nt)
{
    int t, half = R / 2;
    (void)nt;
    ESFT__MOE_FOR_STATIC(nt)
    for (t = 0; t < T; t++) {
        const float *c = cs + (size_t)t * half, *s = sn + (size_t)t * half;
        int hh, i;
        for (hh = 0; hh < n_heads; hh++) {
            float *p = dx + (size_t)t * ld + (size_t)hh * hs;
            for (i = 0; i < half; i++) {
                int i1 = interleaved ? 2 * i : i, i2 = interleaved ? 2 * i + 1 : i + half;
                float d1 = p[i1], d2 = p[i2];
                p[i1] = d1 * c[i] + d2 * s[i];
                p[i2] = d2 * c[i] - d1 * s[i];
            }
        }
    }
}

/* Scratch of one training pass: the forward's (f), plus what a layer's
   backward needs from its recomputed forward, plus the gradients. */
typedef struct esft__trn {
    esft__fwd f;             /* f.h holds the FFN's normed input, f.q/k/v the attention's final q, k, v */
    float *X;                /* (L + 1, T, D) residual stream entering each layer, and after the last */
    float *h1, *xm;          /* (T, D) attention's normed input; residual between attention and FFN */
    float *qb, *kb, *vb;     /* GQA: projections + bias (T, H HD) (T, HK HD) (T, HK HD); MLA: qb = latents (T, QR+KR+DR) before norms */
    float *qn, *kn;          /* GQA: after the q/k norms, before the clamp */
    float *dq, *dk, *dv, *dao; /* gradients of f.q, f.k, f.v, f.ao */
    float *dqb, *dkb;        /* GQA: gradients of qb, kb; MLA: dqb = latents' (T, QR+KR+DR) */
    float *P, *dP;           /* (nt, ATTN_BLOCK, T) a block's probabilities and their gradient */
    float *dh, *dx;          /* (T, D) gradient of a normed input; of the residual stream */
    float *eg, *eu, *eact, *edg, *edu; /* (T K, F) experts: gate, up, silu(gate) up, and their gradients */
    float *dO, *dxg;         /* (T K, D) gradients of expert outputs and inputs */
    float *probs, *dl, *dw;  /* (T, E) router probabilities, d logits; (T K) d weights */
    float *sg, *su, *sact, *sdg, *sdu; /* (T, max(FF, FS)) dense MLP / shared expert */
    float *ys, *sz;          /* (T, D) shared expert output before its gate; (T) gate logit */
    float *dlogits;          /* (HEAD_BLOCK, V) */
    float daux;              /* PESC: d objective / d (a layer's aux loss) = grad_scale * n_scored */
} esft__trn;

static size_t esft__trn_layout(esft__trn *b, const esft_model_config *c, int T, int nt, unsigned char *base)
{
    size_t at, t = (size_t)T, D = (size_t)c->d_model, H = (size_t)c->n_heads, K = (size_t)c->route.top_k;
    size_t E = (size_t)c->route.n_experts, F = (size_t)c->d_expert, qw, kw, vw, aw, lat, sf;
    if (c->mla) {
        qw = H * (size_t)(c->qk_nope_dim + c->qk_rope_dim);
        kw = qw;
        vw = H * (size_t)c->v_head_dim;
    } else {
        qw = H * (size_t)c->head_dim;
        kw = vw = (size_t)c->n_kv_heads * c->head_dim;
    }
    aw = c->mla ? H * (size_t)c->v_head_dim : qw;
    lat = c->mla ? (size_t)(c->q_lora_rank + c->kv_lora_rank + c->qk_rope_dim) : 0;
    sf = (size_t)c->d_ff > (size_t)c->d_shared ? (size_t)c->d_ff : (size_t)c->d_shared;
    at = esft__fwd_layout(&b->f, c, T, nt, base);
#define ESFT__CARVE(field, count)                                                            \
    do {                                                                                     \
        at = (at + 63) & ~(size_t)63;                                                        \
        if (base) b->field = ESFT__CAST(float *, (void *)(base + at));                       \
        at += (size_t)(count) * sizeof(float);                                               \
    } while (0)
    ESFT__CARVE(X, ((size_t)c->n_layers + 1) * t * D);
    ESFT__CARVE(h1, t * D);
    ESFT__CARVE(xm, t * D);
    ESFT__CARVE(qb, c->mla ? t * lat : t * qw);
    ESFT__CARVE(kb, t * kw);
    ESFT__CARVE(vb, t * vw);
    ESFT__CARVE(qn, t * (qw > lat ? qw : lat)); /* MLA: the latents' gradient before their norms */
    ESFT__CARVE(kn, t * kw);
    ESFT__CARVE(dq, t * qw);
    ESFT__CARVE(dk, t * kw);
    ESFT__CARVE(dv, t * vw);
    ESFT__CARVE(dao, t * aw);
    ESFT__CARVE(dqb, c->mla ? t * lat : t * qw);
    ESFT__CARVE(dkb, c->mla ? t * H * (size_t)(c->qk_nope_dim + c->v_head_dim) : t * kw);
    ESFT__CARVE(P, (size_t)nt * ESFT__ATTN_BLOCK * t);
    ESFT__CARVE(dP, (size_t)nt * ESFT__ATTN_BLOCK * t);
    ESFT__CARVE(dh, t * D);
    ESFT__CARVE(dx, t * D);
    ESFT__CARVE(eg, t * K * F);
    ESFT__CARVE(eu, t * K * F);
    ESFT__CARVE(eact, t * K * F);
    ESFT__CARVE(edg, t * K * F);
    ESFT__CARVE(edu, t * K * F);
    ESFT__CARVE(dO, E ? t * K * D : 0);
    ESFT__CARVE(dxg, E ? t * K * D : 0);
    ESFT__CARVE(probs, t * E);
    ESFT__CARVE(dl, t * E);
    ESFT__CARVE(dw, t * K);
    ESFT__CARVE(sg, t * sf);
    ESFT__CARVE(su, t * sf);
    ESFT__CARVE(sact, t * sf);
    ESFT__CARVE(sdg, t * sf);
    ESFT__CARVE(sdu, t * sf);
    ESFT__CARVE(ys, t * D);
    ESFT__CARVE(sz, t);
    ESFT__CARVE(dlogits, (size_t)ESFT__HEAD_BLOCK * c->vocab);
#undef ESFT__CARVE
    return at + 64;
}

/* out (n, D) = SwiGLU of in (n, D), keeping g and u (n, F) before the
   activation and act = silu(g) u for the backward. */
static void esft__swiglu_mlp_keep(float *out, const float *in, int n, int D, const esft_matrix *gate,
                                  const esft_matrix *up, const esft_matrix *down, float *g, float *u, float *act,
                                  float *panel)
{
    int F = gate->rows;
    esft__matmul(g, F, in, D, n, gate, panel);
    esft__matmul(u, F, in, D, n, up, panel);
    esft__swiglu_forward(act, g, u, (size_t)n * F);
    esft__matmul(out, D, act, F, n, down, panel);
}

/* The weight gradients of y (T, W.rows) = x (T, W.cols) W^T (+ its LoRA)
   from dy: dW += dy^T x when W is one of tr's trained copies (its data in
   tr->params); dA += scale (dy B)^T x and dB += scale dy^T (x A^T) when W
   carries an adapter. Frozen, unadapted W: nothing. */
static void esft__linear_grads(const esft_model_trainable *tr, const esft_matrix *W, const float *dy, int ldy,
                               const float *x, int ldx, int T, float *panel)
{
    float *dW = esft__grad_of(tr, W->data);
    if (dW) esft__sgemm(1, 0, W->rows, W->cols, T, 1.0f, dy, ldy, x, ldx, 1.0f, dW, W->cols);
    if (W->lora) {
        const esft_lora *a = W->lora;
        float *dA = esft__grad_of(tr, a->a), *dB = esft__grad_of(tr, a->b);
        int t0, step = esft__lora_chunk(a), r = a->rank;
        for (t0 = 0; dA && dB && t0 < T; t0 += step) {
            int n = T - t0 < step ? T - t0 : step;
            const float *xt = x + (size_t)t0 * ldx, *dyt = dy + (size_t)t0 * ldy;
            esft__sgemm(0, 1, n, r, W->cols, 1.0f, xt, ldx, a->a, W->cols, 0.0f, panel, r);
            esft__sgemm(1, 0, W->rows, r, n, a->scale, dyt, ldy, panel, r, 1.0f, dB, r);
            esft__sgemm(0, 0, n, r, W->rows, 1.0f, dyt, ldy, a->b, r, 0.0f, panel, r);
            esft__sgemm(1, 0, r, W->cols, n, a->scale, panel, r, xt, ldx, 1.0f, dA, W->cols);
        }
    }
}

/* db (n) += the column sums of dy (T, n), when the bias b trains. */
static void esft__bias_grad(const esft_model_trainable *tr, const esft_matrix *b, const float *dy, int T, int n)
{
    float *db = esft__grad_of(tr, b->data);
    int t, i;
    for (t = 0; db && t < T; t++)
        for (i = 0; i < n; i++) db[i] += dy[(size_t)t * n + i];
}

/* dx (n, D) += backward of esft__swiglu_mlp_keep from dy (n, D), and the
   gradients of whichever of gate/up/down tr trains. dg and du (n, F) are scratch. */
static void esft__swiglu_mlp_backward(const esft_model_trainable *tr, float *dx, const float *dy, const float *in,
                                      int n, int D, const esft_matrix *gate, const esft_matrix *up,
                                      const esft_matrix *down, const float *g, const float *u, const float *act,
                                      float *dg, float *du, float *panel)
{
    int F = gate->rows;
    memset(dg, 0, (size_t)n * F * sizeof(float));
    esft__matmul_acc(dg, F, dy, D, n, down, panel);
    esft__linear_grads(tr, down, dy, D, act, F, n, panel);
    esft__swiglu_backward(du, dg, g, u, (size_t)n * F);
    esft__linear_grads(tr, gate, dg, F, in, D, n, panel);
    esft__linear_grads(tr, up, du, F, in, D, n, panel);
    esft__matmul_acc(dx, D, dg, F, n, gate, panel);
    esft__matmul_acc(dx, D, du, F, n, up, panel);
}

/* a (T, D) = self-attention of h1, GQA families, keeping what the backward reads. */
static void esft__trn_gqa_forward(esft__trn *b, const esft_model_config *c, const esft_model_layer *w, int T)
{
    esft__fwd *f = &b->f;
    int H = c->n_heads, HK = c->n_kv_heads, HD = c->head_dim, D = c->d_model, nt = f->nt;
    size_t nq = (size_t)T * H * HD, nk = (size_t)T * HK * HD;
    esft__matmul(b->qb, H * HD, b->h1, D, T, &w->q, f->panels);
    esft__matmul(b->kb, HK * HD, b->h1, D, T, &w->k, f->panels);
    esft__matmul(b->vb, HK * HD, b->h1, D, T, &w->v, f->panels);
    esft__add_bias_rows(b->qb, &w->q_bias, T, H * HD);
    esft__add_bias_rows(b->kb, &w->k_bias, T, HK * HD);
    esft__add_bias_rows(b->vb, &w->v_bias, T, HK * HD);
    if (c->qk_norm == ESFT_QK_NORM_WHOLE) {
        esft__rmsnorm_rows(b->qn, H * HD, b->qb, H * HD, esft__vec(&w->q_norm), T, H * HD, c->rms_eps, nt);
        esft__rmsnorm_rows(b->kn, HK * HD, b->kb, HK * HD, esft__vec(&w->k_norm), T, HK * HD, c->rms_eps, nt);
    } else if (c->qk_norm == ESFT_QK_NORM_HEAD) {
        esft__rmsnorm_rows(b->qn, HD, b->qb, HD, esft__vec(&w->q_norm), T * H, HD, c->rms_eps, nt);
        esft__rmsnorm_rows(b->kn, HD, b->kb, HD, esft__vec(&w->k_norm), T * HK, HD, c->rms_eps, nt);
    } else {
        memcpy(b->qn, b->qb, nq * sizeof(float));
        memcpy(b->kn, b->kb, nk * sizeof(float));
    }
    memcpy(f->q, b->qn, nq * sizeof(float));
    memcpy(f->k, b->kn, nk * sizeof(float));
    memcpy(f->v, b->vb, nk * sizeof(float));
    if (c->clip_qkv > 0.0f) {
        esft__clamp(f->q, nq, c->clip_qkv);
        esft__clamp(f->k, nk, c->clip_qkv);
        esft__clamp(f->v, nk, c->clip_qkv);
    }
    esft__rope_apply(f->q, H * HD, H, HD, T, HD, c->rope.interleaved, f->cos_, f->sin_, nt);
    esft__rope_apply(f->k, HK * HD, HK, HD, T, HD, c->rope.interleaved, f->cos_, f->sin_, nt);
    esft__attention(f->ao, f->q, f->k, f->v, c, T, H, HK, HD, HD, f->scores, nt);
    esft__matmul(f->a, D, f->ao, H * HD, T, &w->o, f->panels);
    esft__add_bias_rows(f->a, &w->o_bias, T, D);
}

/* The backward of esft__attention from dout (T, H dv): dq (T, H dq), dk (T,
   HK dq) and dv (T, HK dv) written (not accumulated). One key/value head per
   job, so each job writes only its own dk and dv columns and sums its group's
   heads in one order (the same bits for any thread count). Per (head, query
   block) the probabilities P are recomputed as the forward computes them;
   dS = P (dP - rowsum(P dP)) with dP = dout V^T. */
static void esft__attention_backward(float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                                     const float *dout, const esft_model_config *c, int T, int H, int HK, int dqd,
                                     int dvd, float *P, float *dP, int nt)
{
    int n_blocks = (T + ESFT__ATTN_BLOCK - 1) / ESFT__ATTN_BLOCK, group = H / HK, kvh;
    int window = c->sliding_window;
    float scale = (float)c->attn_scale;
    (void)nt;
    memset(dk, 0, (size_t)T * HK * dqd * sizeof(float));
    memset(dv, 0, (size_t)T * HK * dvd * sizeof(float));
    ESFT__MOE_FOR_DYNAMIC(nt)
    for (kvh = 0; kvh < HK; kvh++) {
        float *S = P + (size_t)esft__thread_id() * ESFT__ATTN_BLOCK * T;
        float *dS = dP + (size_t)esft__thread_id() * ESFT__ATTN_BLOCK * T;
        int hh, bl;
        for (hh = kvh * group; hh < (kvh + 1) * group; hh++)
            for (bl = 0; bl < n_blocks; bl++) {
                int q0 = bl * ESFT__ATTN_BLOCK, nq = T - q0 < ESFT__ATTN_BLOCK ? T - q0 : ESFT__ATTN_BLOCK;
                int nk = q0 + nq, i;
                const float *qblk = q + (size_t)q0 * H * dqd + (size_t)hh * dqd;
                const float *oblk = dout + (size_t)q0 * H * dvd + (size_t)hh * dvd;
                esft__sgemm(0, 1, nq, nk, dqd, scale, qblk, H * dqd, k + (size_t)kvh * dqd, HK * dqd, 0.0f, S, nk);
                esft__sgemm(0, 1, nq, nk, dvd, 1.0f, oblk, H * dvd, v + (size_t)kvh * dvd, HK * dvd, 0.0f, dS, nk);
                for (i = 0; i < nq; i++) {
                    float *row = S + (size_t)i * nk, *drow = dS + (size_t)i * nk, mx = -INFINITY, sum = 0.0f;
                    int j, last = q0 + i, first = window > 0 && last - window + 1 > 0 ? last - window + 1 : 0;
                    double dot = 0.0;
                    for (j = first; j <= last; j++) mx = row[j] > mx ? row[j] : mx;
                    for (j = 0; j < nk; j++) {
                        float e = j >= first && j <= last ? expf(row[j] - mx) : 0.0f;
                        row[j] = e;
                        sum += e;
                    }
                    for (j = first; j <= last; j++) row[j] /= sum;
                    for (j = first; j <= last; j++) dot += (double)row[j] * drow[j];
                    for (j = 0; j < nk; j++) drow[j] = row[j] * (drow[j] - (float)dot);
                }
                esft__sgemm(0, 0, nq, dqd, nk, scale, dS, nk, k + (size_t)kvh * dqd, HK * dqd, 0.0f,
                            dq + (size_t)q0 * H * dqd + (size_t)hh * dqd, H * dqd);
                esft__sgemm(1, 0, nk, dqd, nq, scale, dS, nk, qblk, H * dqd, 1.0f, dk + (size_t)kvh * dqd, HK * dqd);
                esft__sgemm(1, 0, nk, dvd, nq, 1.0f, S, nk, oblk, H * dvd, 1.0f, dv + (size_t)kvh * dvd, HK * dvd);
            }
    }
}

/* Zeroes the gradient where the forward clamped (torch.clamp passes it only inside [-clip, clip]). */
static void esft__clamp_backward(float *d, const float *x, size_t n, float clip)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (x[i] > clip || x[i] < -clip) d[i] = 0.0f;
}

/* b->dh (T, D) += backward of GQA attention from da (T, D), after the
   layer's forward; and the gradients of whichever of its weights tr trains. */
static void esft__trn_gqa_backward(esft__trn *b, const esft_model_config *c, const esft_model_layer *w, int T,
                                   const float *da)
{
    esft__fwd *f = &b->f;
    const esft_model_trainable *tr = f->tr;
    int H = c->n_heads, HK = c->n_kv_heads, HD = c->head_dim, D = c->d_model, nt = f->nt;
    size_t nq = (size_t)T * H * HD, nk = (size_t)T * HK * HD;
    const float *dqp = b->dq, *dkp = b->dk; /* gradients of the projections (+ bias), qb and kb */
    memset(b->dao, 0, nq * sizeof(float));
    esft__matmul_acc(b->dao, H * HD, da, D, T, &w->o, f->panels);
    esft__linear_grads(tr, &w->o, da, D, f->ao, H * HD, T, f->panels);
    esft__bias_grad(tr, &w->o_bias, da, T, D);
    esft__attention_backward(b->dq, b->dk, b->dv, f->q, f->k, f->v, b->dao, c, T, H, HK, HD, HD, b->P, b->dP, nt);
    esft__rope_backward(b->dq, H * HD, H, HD, T, HD, c->rope.interleaved, f->cos_, f->sin_, nt);
    esft__rope_backward(b->dk, HK * HD, HK, HD, T, HD, c->rope.interleaved, f->cos_, f->sin_, nt);
    if (c->clip_qkv > 0.0f) {
        esft__clamp_backward(b->dq, b->qn, nq, c->clip_qkv);
        esft__clamp_backward(b->dk, b->kn, nk, c->clip_qkv);
        esft__clamp_backward(b->dv, b->vb, nk, c->clip_qkv);
    }
    if (c->qk_norm != ESFT_QK_NORM_NONE) {
        /* whole rows (OLMoE) or one row per head (Qwen3) */
        int whole = c->qk_norm == ESFT_QK_NORM_WHOLE, qn = whole ? H * HD : HD, kn = whole ? HK * HD : HD;
        int qrows = whole ? T : T * H, krows = whole ? T : T * HK;
        memset(b->dqb, 0, nq * sizeof(float));
        memset(b->dkb, 0, nk * sizeof(float));
        esft__rmsnorm_backward_rows(b->dqb, qn, b->dq, qn, b->qb, qn, esft__vec(&w->q_norm),
                                    esft__grad_of(tr, w->q_norm.data), qrows, qn, c->rms_eps, nt);
        esft__rmsnorm_backward_rows(b->dkb, kn, b->dk, kn, b->kb, kn, esft__vec(&w->k_norm),
                                    esft__grad_of(tr, w->k_norm.data), krows, kn, c->rms_eps, nt);
        dqp = b->dqb;
        dkp = b->dkb;
    }
    esft__bias_grad(tr, &w->q_bias, dqp, T, H * HD);
    esft__bias_grad(tr, &w->k_bias, dkp, T, HK * HD);
    esft__bias_grad(tr, &w->v_bias, b->dv, T, HK * HD);
    esft__linear_grads(tr, &w->q, dqp, H * HD, b->h1, D, T, f->panels);
    esft__linear_grads(tr, &w->k, dkp, HK * HD, b->h1, D, T, f->panels);
    esft__linear_grads(tr, &w->v, b->dv, HK * HD, b->h1, D, T, f->panels);
    esft__matmul_acc(b->dh, D, dqp, H * HD, T, &w->q, f->panels);
    esft__matmul_acc(b->dh, D, dkp, HK * HD, T, &w->k, f->panels);
    esft__matmul_acc(b->dh, D, b->dv, HK * HD, T, &w->v, f->panels);
}

/* a (T, D) = MLA of h1 as esft__attn_mla computes it, keeping the latents
   before their norms (b->qb) for the backward. */
static void esft__trn_mla_forward(esft__trn *b, const esft_model_config *c, const esft_model_layer *w, int T)
{
    esft__fwd *f = &b->f;
    int H = c->n_heads, D = c->d_model, DN = c->qk_nope_dim, DR = c->qk_rope_dim, DV = c->v_head_dim;
    int QR = c->q_lora_rank, KR = c->kv_lora_rank, dq = DN + DR, nt = f->nt, LW = QR + KR + DR, t;
    float *lat = f->lat, *raw = b->qb;
    if (QR) {
        esft__matmul(raw, LW, b->h1, D, T, &w->q_a, f->panels);
        esft__rmsnorm_rows(lat, LW, raw, LW, esft__vec(&w->q_a_norm), T, QR, ESFT__MLA_NORM_EPS, nt);
        esft__matmul(f->q, H * dq, lat, LW, T, &w->q_b, f->panels);
    } else {
        esft__matmul(f->q, H * dq, b->h1, D, T, &w->q, f->panels);
    }
    esft__matmul(raw + QR, LW, b->h1, D, T, &w->kv_a, f->panels);
    esft__rmsnorm_rows(lat + QR, LW, raw + QR, LW, esft__vec(&w->kv_a_norm), T, KR, ESFT__MLA_NORM_EPS, nt);
    for (t = 0; t < T; t++)
        memcpy(lat + (size_t)t * LW + QR + KR, raw + (size_t)t * LW + QR + KR, (size_t)DR * sizeof(float));
    esft__matmul(f->kvb, H * (DN + DV), lat + QR, LW, T, &w->kv_b, f->panels);
    esft__rope_apply(f->q + DN, H * dq, H, dq, T, DR, c->rope.interleaved, f->cos_, f->sin_, nt);
    esft__rope_apply(lat + QR + KR, LW, 1, DR, T, DR, c->rope.interleaved, f->cos_, f->sin_, nt);
    for (t = 0; t < T; t++) {
        int hh;
        for (hh = 0; hh < H; hh++) {
            const float *src = f->kvb + ((size_t)t * H + hh) * (DN + DV);
            float *kd = f->k + ((size_t)t * H + hh) * dq;
            memcpy(kd, src, (size_t)DN * sizeof(float));
            memcpy(kd + DN, lat + (size_t)t * LW + QR + KR, (size_t)DR * sizeof(float));
            memcpy(f->v + ((size_t)t * H + hh) * DV, src + DN, (size_t)DV * sizeof(float));
        }
    }
    esft__attention(f->ao, f->q, f->k, f->v, c, T, H, H, dq, DV, f->scores, nt);
    esft__matmul(f->a, D, f->ao, H * DV, T, &w->o, f->panels);
}

/* b->dh (T, D) += backward of MLA from da (T, D): the shared rotary key's
   gradient is the sum over heads; the latents go back through their norms. */
static void esft__trn_mla_backward(esft__trn *b, const esft_model_config *c, const esft_model_layer *w, int T,
                                   const float *da)
{
    esft__fwd *f = &b->f;
    int H = c->n_heads, D = c->d_model, DN = c->qk_nope_dim, DR = c->qk_rope_dim, DV = c->v_head_dim;
    int QR = c->q_lora_rank, KR = c->kv_lora_rank, dq = DN + DR, nt = f->nt, LW = QR + KR + DR, t;
    float *dlat = b->dqb, *dkvb = b->dkb, *tmp = b->qn; /* tmp: (T, LW) gradient of the normed latents */
    const esft_model_trainable *tr = f->tr;
    memset(b->dao, 0, (size_t)T * H * DV * sizeof(float));
    esft__matmul_acc(b->dao, H * DV, da, D, T, &w->o, f->panels);
    esft__linear_grads(tr, &w->o, da, D, f->ao, H * DV, T, f->panels);
    esft__attention_backward(b->dq, b->dk, b->dv, f->q, f->k, f->v, b->dao, c, T, H, H, dq, DV, b->P, b->dP, nt);
    memset(dlat, 0, (size_t)T * LW * sizeof(float));
    memset(tmp, 0, (size_t)T * LW * sizeof(float));
    for (t = 0; t < T; t++) {
        float *dr = dlat + (size_t)t * LW + QR + KR;
        int hh, i;
        for (hh = 0; hh < H; hh++) {
            const float *dkh = b->dk + ((size_t)t * H + hh) * dq;
            float *dst = dkvb + ((size_t)t * H + hh) * (DN + DV);
            memcpy(dst, dkh, (size_t)DN * sizeof(float));
            memcpy(dst + DN, b->dv + ((size_t)t * H + hh) * DV, (size_t)DV * sizeof(float));
            for (i = 0; i < DR; i++) dr[i] += dkh[DN + i];
        }
    }
    esft__rope_backward(dlat + QR + KR, LW, 1, DR, T, DR, c->rope.interleaved, f->cos_, f->sin_, nt);
    esft__rope_backward(b->dq + DN, H * dq, H, dq, T, DR, c->rope.interleaved, f->cos_, f->sin_, nt);
    esft__matmul_acc(tmp + QR, LW, dkvb, H * (DN + DV), T, &w->kv_b, f->panels);
    esft__linear_grads(tr, &w->kv_b, dkvb, H * (DN + DV), f->lat + QR, LW, T, f->panels);
    esft__rmsnorm_backward_rows(dlat + QR, LW, tmp + QR, LW, b->qb + QR, LW, esft__vec(&w->kv_a_norm),
                                esft__grad_of(tr, w->kv_a_norm.data), T, KR, ESFT__MLA_NORM_EPS, nt);
    if (QR) {
        esft__matmul_acc(tmp, LW, b->dq, H * dq, T, &w->q_b, f->panels);
        esft__linear_grads(tr, &w->q_b, b->dq, H * dq, f->lat, LW, T, f->panels);
        esft__rmsnorm_backward_rows(dlat, LW, tmp, LW, b->qb, LW, esft__vec(&w->q_a_norm),
                                    esft__grad_of(tr, w->q_a_norm.data), T, QR, ESFT__MLA_NORM_EPS, nt);
        esft__linear_grads(tr, &w->q_a, dlat, LW, b->h1, D, T, f->panels);
        esft__matmul_acc(b->dh, D, dlat, LW, T, &w->q_a, f->panels);
    } else {
        esft__linear_grads(tr, &w->q, b->dq, H * dq, b->h1, D, T, f->panels);
        esft__matmul_acc(b->dh, D, b->dq, H * dq, T, &w->q, f->panels);
    }
    esft__linear_grads(tr, &w->kv_a, dlat + QR, LW, b->h1, D, T, f->panels);
    esft__matmul_acc(b->dh, D, dlat + QR, LW, T, &w->kv_a, f->panels);
}

/* f->a (T, D) = MoE of f->h (routed with esft__moe_route first), keeping each
   expert's g, u, act and output rows and the shared expert's for the backward. */
static void esft__trn_moe_forward(esft__trn *b, const esft_model_config *c, const esft_model_layer *w, int l, int T)
{
    esft__fwd *f = &b->f;
    int E = c->route.n_experts, K = c->route.top_k, D = c->d_model, F = c->d_expert, FS = c->d_shared, e;
    esft__moe_group(f, c, T);
    ESFT__MOE_FOR_DYNAMIC(f->nt)
    for (e = 0; e < E; e++) {
        int r0 = f->offsets[e], n = f->offsets[e + 1] - r0;
        float *panel = f->panels + (size_t)esft__thread_id() * ESFT__PANEL_FLOATS;
        size_t rf = (size_t)r0 * F;
        esft_matrix mg, mu, md;
        if (n == 0) continue;
        esft__expert_mats(f, w, l, e, &mg, &mu, &md);
        esft__swiglu_mlp_keep(f->o + (size_t)r0 * D, f->xg + (size_t)r0 * D, n, D, &mg, &mu, &md, b->eg + rf,
                              b->eu + rf, b->eact + rf, panel);
    }
    if (FS > 0) {
        esft_matrix sg, su, sd;
        esft__shared_mats(f, w, l, &sg, &su, &sd);
        esft__swiglu_mlp_keep(b->ys, f->h, T, D, &sg, &su, &sd, b->sg, b->su, b->sact, f->panels);
        memcpy(f->a, b->ys, (size_t)T * D * sizeof(float));
        if (w->shared_router.data) esft__shared_gate_scale(f, w, b->sz, T);
    } else {
        memset(f->a, 0, (size_t)T * D * sizeof(float));
    }
    esft__moe_combine(f, T, K, D);
}

/* b->dh (T, D) += backward of the MoE from da (T, D), after its forward:
   routed experts (weights' gradients for the trained ones), the routing
   weights through the router's softmax / sigmoid (the top-k choice is
   piecewise constant), the shared expert and its sigmoid gate. */
static void esft__trn_moe_backward(esft__trn *b, const esft_model_config *c, const esft_model_layer *w,
                                   esft_model_trainable *tr, int l, int T, const float *da)
{
    esft__fwd *f = &b->f;
    int E = c->route.n_experts, K = c->route.top_k, D = c->d_model, F = c->d_expert, FS = c->d_shared, e, t;
    esft_route_config rc = c->route;
    rc.selection_bias = w->router_bias.data ? esft__vec(&w->router_bias) : NULL;
    ESFT__MOE_FOR_STATIC(f->nt)
    for (t = 0; t < T; t++) {
        const float *dat = da + (size_t)t * D;
        int j, d;
        for (j = 0; j < K; j++) {
            size_t slot = (size_t)t * K + j, r = (size_t)f->pos[slot];
            const float *o = f->o + r * D;
            float *dor = b->dO + r * D, wt = f->weights[slot];
            double dot = 0.0;
            for (d = 0; d < D; d++) {
                dot += (double)dat[d] * o[d];
                dor[d] = wt * dat[d];
            }
            b->dw[slot] = (float)dot;
        }
    }
    ESFT__MOE_FOR_DYNAMIC(f->nt)
    for (e = 0; e < E; e++) {
        int r0 = f->offsets[e], n = f->offsets[e + 1] - r0;
        float *panel = f->panels + (size_t)esft__thread_id() * ESFT__PANEL_FLOATS;
        size_t rf = (size_t)r0 * F, rd = (size_t)r0 * D;
        esft_matrix mg, mu, md;
        if (n == 0) continue;
        esft__expert_mats(f, w, l, e, &mg, &mu, &md);
        memset(b->dxg + rd, 0, (size_t)n * D * sizeof(float));
        esft__swiglu_mlp_backward(tr, b->dxg + rd, b->dO + rd, f->xg + rd, n, D, &mg, &mu, &md, b->eg + rf,
                                  b->eu + rf, b->eact + rf, b->edg + rf, b->edu + rf, panel);
    }
    ESFT__MOE_FOR_STATIC(f->nt)
    for (t = 0; t < T; t++) {
        float *dht = b->dh + (size_t)t * D;
        int j, d;
        for (j = 0; j < K; j++) {
            const float *g = b->dxg + (size_t)f->pos[(size_t)t * K + j] * D;
            for (d = 0; d < D; d++) dht[d] += g[d];
        }
    }
    for (t = 0; t < T; t++) {
        float *p = b->probs + (size_t)t * E;
        if (rc.gating == ESFT_GATING_SOFTMAX) esft__softmax_row(p, f->logits + (size_t)t * E, E);
        else esft__sigmoid_row(p, f->logits + (size_t)t * E, E);
        esft__route_backward_token(&rc, b->dl + (size_t)t * E, p, f->ids + (size_t)t * K, b->dw + (size_t)t * K,
                                   NULL, E);
    }
    esft__linear_grads(tr, &w->router, b->dl, E, f->h, D, T, f->panels);
    esft__sgemm(0, 0, T, D, E, 1.0f, b->dl, E, esft__vec(&w->router), D, 1.0f, b->dh, D);
    if (FS > 0) {
        const float *dys = da;
        esft_matrix sg, su, smd;
        esft__shared_mats(f, w, l, &sg, &su, &smd);
        if (w->shared_router.data) {
            const float *ws = esft__vec(&w->shared_router);
            float *dws = esft__grad_of(tr, w->shared_router.data);
            for (t = 0; t < T; t++) {
                const float *dat = da + (size_t)t * D, *y = b->ys + (size_t)t * D;
                float s = esft__sigmoidf(b->sz[t]), *dst = b->dxg + (size_t)t * D, dz;
                double dot = 0.0;
                int d;
                for (d = 0; d < D; d++) {
                    dot += (double)dat[d] * y[d];
                    dst[d] = s * dat[d];
                }
                dz = (float)dot * s * (1.0f - s);
                for (d = 0; d < D; d++) b->dh[(size_t)t * D + d] += dz * ws[d];
                for (d = 0; dws && d < D; d++) dws[d] += dz * f->h[(size_t)t * D + d];
            }
            dys = b->dxg; /* free again after the routed experts' scatter: (T K, D) >= (T, D) */
        }
        esft__swiglu_mlp_backward(tr, b->dh, dys, f->h, T, D, &sg, &su, &smd, b->sg, b->su, b->sact, b->sdg, b->sdu,
                                  f->panels);
    }
}

/* One decoder layer l of the training forward, X[l] -> X[l+1], keeping its
   insides in b for the backward that follows (or for nothing: the first pass
   keeps only X). */
static esft_status esft__trn_layer_forward(esft__trn *b, const esft_model *m, int l, int T, esft_error *err)
{
    const esft_model_config *c = &m->cfg;
    const esft_model_layer *w = &m->layers[l];
    esft__fwd *f = &b->f;
    int D = c->d_model;
    size_t n = (size_t)T * D, i;
    const float *xin = b->X + (size_t)l * n;
    float *xout = b->X + (size_t)(l + 1) * n;
    const float *out = f->a; /* the FFN half's output (PESC's when l has a block; f->a keeps its input F) */
    esft_status s;
    esft__rmsnorm_rows(b->h1, D, xin, D, esft__vec(&w->attn_norm), T, D, c->rms_eps, f->nt);
    if (c->mla) esft__trn_mla_forward(b, c, w, T);
    else esft__trn_gqa_forward(b, c, w, T);
    for (i = 0; i < n; i++) b->xm[i] = xin[i] + f->a[i];
    esft__rmsnorm_rows(f->h, D, b->xm, D, esft__vec(&w->ffn_norm), T, D, c->rms_eps, f->nt);
    if (c->is_moe[l]) {
        if ((s = esft__moe_route(f, c, w, l, T, err)) != ESFT_OK) return s;
        esft__trn_moe_forward(b, c, w, l, T);
    } else {
        esft__swiglu_mlp_keep(f->a, f->h, T, D, &w->mlp_gate, &w->mlp_up, &w->mlp_down, b->sg, b->su, b->sact,
                              f->panels);
        if ((s = esft__pesc_layer(f, l, T, NULL, &out, err)) != ESFT_OK) return s;
    }
    for (i = 0; i < n; i++) xout[i] = b->xm[i] + out[i];
    return ESFT_OK;
}

/* b->dx (T, D) = gradient of grad_scale * loss_sum w.r.t. X[L], through the
   final norm and lm_head (logits recomputed 64 positions at a time), and their
   gradients when they train; the loss as esft_model_forward computes it. */
static esft_status esft__trn_head(esft__trn *b, const esft_model *m, const int32_t *labels, int T, float grad_scale,
                                  double *loss, int64_t *count, esft_error *err)
{
    const esft_model_config *c = &m->cfg;
    esft__fwd *f = &b->f;
    int D = c->d_model, V = c->vocab, t;
    const float *xl = b->X + (size_t)c->n_layers * T * D;
    esft_status s = ESFT_OK;
    esft__rmsnorm_rows(f->h, D, xl, D, esft__vec(&m->final_norm), T, D, c->rms_eps, f->nt);
    memset(b->dh, 0, (size_t)T * D * sizeof(float));
    for (t = 0; s == ESFT_OK && t < T; t += ESFT__HEAD_BLOCK) {
        int n = T - t < ESFT__HEAD_BLOCK ? T - t : ESFT__HEAD_BLOCK, i;
        esft__matmul(f->logits, V, f->h + (size_t)t * D, D, n, &m->lm_head, f->panels);
        s = esft__head_loss(f->logits, t, n, V, labels, T, loss, count, err);
        if (s != ESFT_OK) break;
        /* dlogits = s (softmax - onehot): one expf per logit, as esft__head_loss
           sums them (values <= 0: exact to an ulp; the sum in double); rows
           are independent, so any thread count gives the same bits */
        ESFT__MOE_FOR_STATIC(f->nt)
        for (i = 0; i < n; i++) {
            const float *row = f->logits + (size_t)i * V;
            float *drow = b->dlogits + (size_t)i * V, mx = -INFINITY;
            int y = t + i + 1 < T ? labels[t + i + 1] : -100, j;
            double sum = 0.0, inv;
            if (y == -100) {
                memset(drow, 0, (size_t)V * sizeof(float));
                continue;
            }
            for (j = 0; j < V; j++) mx = row[j] > mx ? row[j] : mx;
            for (j = 0; j < V; j++) sum += (double)(drow[j] = expf(row[j] - mx));
            inv = (double)grad_scale / sum;
            for (j = 0; j < V; j++) drow[j] = (float)(drow[j] * inv - (j == y ? (double)grad_scale : 0.0));
        }
        esft__linear_grads(f->tr, &m->lm_head, b->dlogits, V, f->h + (size_t)t * D, D, n, f->panels);
        esft__matmul_acc(b->dh + (size_t)t * D, D, b->dlogits, V, n, &m->lm_head, f->panels);
    }
    if (s != ESFT_OK) return s;
    memset(b->dx, 0, (size_t)T * D * sizeof(float));
    esft__rmsnorm_backward_rows(b->dx, D, b->dh, D, xl, D, esft__vec(&m->final_norm),
                                esft__grad_of(f->tr, m->final_norm.data), T, D, c->rms_eps, f->nt);
    return ESFT_OK;
}

/* b->dx: gradient w.r.t. X[l+1] in, w.r.t. X[l] out. The lowest layer that
   trains anything stops as soon as nothing below needs a gradient: after its
   FFN when its attention half trains nothing (last = 1), else after the
   attention (last = 2; the embedding's gradient needs X[0]'s: last = 0). */
static esft_status esft__trn_layer_backward(esft__trn *b, const esft_model *m, esft_model_trainable *tr, int l,
                                            int T, int last, esft_error *err)
{
    const esft_model_config *c = &m->cfg;
    const esft_model_layer *w = &m->layers[l];
    esft__fwd *f = &b->f;
    int D = c->d_model;
    size_t n = (size_t)T * D;
    esft_status s = esft__trn_layer_forward(b, m, l, T, err);
    const float *pesc = esft_model_trainable_pesc(tr, tr->params, l), *dmlp = b->dx;
    if (s != ESFT_OK) return s;
    memset(b->dh, 0, n * sizeof(float));
    if (pesc) { /* y = PESC(F, u): dF feeds the frozen MLP's backward, du the FFN input's gradient */
        memset(f->pdF, 0, n * sizeof(float));
        s = esft_pesc_backward(&tr->pesc, f->pdF, b->dh, esft__grad_of(tr, pesc), b->dx, b->daux, &f->ps, f->a,
                               f->h, pesc, T, err);
        if (s != ESFT_OK) return s;
        dmlp = f->pdF;
    }
    if (c->is_moe[l]) esft__trn_moe_backward(b, c, w, tr, l, T, b->dx);
    else esft__swiglu_mlp_backward(tr, b->dh, dmlp, f->h, T, D, &w->mlp_gate, &w->mlp_up, &w->mlp_down, b->sg,
                                   b->su, b->sact, b->sdg, b->sdu, f->panels);
    esft__rmsnorm_backward_rows(b->dx, D, b->dh, D, b->xm, D, esft__vec(&w->ffn_norm),
                                esft__grad_of(tr, w->ffn_norm.data), T, D, c->rms_eps, f->nt);
    if (last == 1) return ESFT_OK;
    memset(b->dh, 0, n * sizeof(float));
    if (c->mla) esft__trn_mla_backward(b, c, w, T, b->dx);
    else esft__trn_gqa_backward(b, c, w, T, b->dx);
    esft__rmsnorm_backward_rows(b->dx, D, b->dh, D, b->X + (size_t)l * n, D, esft__vec(&w->attn_norm),
                                esft__grad_of(tr, w->attn_norm.data), T, D, c->rms_eps, f->nt);
    return ESFT_OK;
}

/* How far down the backward goes: the lowest layer whose FFN half trains
   anything (*attn 0) or whose attention half does (*attn 1); L when nothing
   trains; *embed when the embedding does (then down to X[0]). */
static int esft__trn_lowest(const esft_model_trainable *tr, const esft_model *m, int *attn, int *embed)
{
    int l, i, lowest = m->cfg.n_layers;
    *attn = *embed = 0;
    if (tr->n_trained > 0) lowest = tr->layer[0];
    for (l = 0; l < lowest; l++)
        if (tr->shared_slot[l] >= 0 || tr->pesc_slot[l] >= 0) lowest = l;
    for (i = 0; i < tr->n_modules + tr->n_lora; i++) {
        const esft_matrix *w;
        int layer, attention;
        if (i < tr->n_modules) {
            const esft_model_tensor *t = &m->tensors[tr->module[i]];
            w = t->matrix, layer = t->layer, attention = t->attention;
        } else {
            w = esft_model_trainable_lora_base(tr, m, i - tr->n_modules, NULL, 0, &layer, &attention);
        }
        if (layer < 0) {
            *embed |= w == &m->embed;
            continue;
        }
        if (layer < lowest || (layer == lowest && attention)) *attn = attention;
        if (layer < lowest) lowest = layer;
    }
    if (*embed) lowest = 0, *attn = 1;
    return lowest;
}

ESFTDEF esft_status esft_model_forward_backward(const esft_model *m, esft_model_trainable *tr, const int32_t *ids,
                                                const int32_t *labels, int T, float grad_scale, double *loss_sum,
                                                int64_t *n_scored, esft_error *err)
{
    const esft_model_config *c;
    esft_model view;
    const esft_model *v;
    esft_model_run run;
    esft__trn b;
    unsigned char *base;
    size_t bytes;
    int nt = esft_get_num_threads(), t, l, D, lowest, attn, embed;
    double loss = 0.0;
    int64_t count = 0;
    esft_status s;
    if (!m || !tr || !labels) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL model, trainable or labels");
    if (!isfinite(grad_scale)) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "grad_scale is not finite");
    memset(&run, 0, sizeof run);
    run.labels = labels;
    run.trainable = tr;
    if ((s = esft__forward_check(m, ids, T, &run, err)) != ESFT_OK) return s;
    view = tr->view; /* the model as trained: copies and adapters in place, m's config as it is now */
    view.cfg = m->cfg;
    v = &view;
    c = &m->cfg;
    D = c->d_model;
    /* a small model runs on one thread: starting a team per loop costs more
       than the loop (and far more on a busy machine) */
    if ((double)T * D * D < 4194304.0) nt = 1;
    bytes = esft__trn_layout(&b, c, T, nt, NULL);
    base = ESFT__CAST(unsigned char *, m->allocator.alloc(m->allocator.user, bytes));
    if (!base) return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, "training scratch of %lu bytes for %d tokens",
                                 (unsigned long)bytes, T);
    esft__trn_layout(&b, c, T, nt, ESFT__CAST(unsigned char *, (void *)(((uintptr_t)base + 63) & ~(uintptr_t)63)));
    b.f.tr = tr;
    for (t = 0; t < T; t++) esft__matrix_rows_f32(b.X + (size_t)t * D, &v->embed, ids[t], 1);
    esft__rope_tables(b.f.cos_, b.f.sin_, &c->rope, c->mla ? c->qk_rope_dim : c->head_dim, T);
    s = esft__pesc_begin(&b.f, m, T, err);
    for (l = 0; s == ESFT_OK && l < c->n_layers; l++) s = esft__trn_layer_forward(&b, v, l, T, err);
    tr->aux_loss = b.f.aux; /* the first pass's; the backward's recomputations add to b.f.aux again */
    if (s == ESFT_OK) s = esft__trn_head(&b, v, labels, T, grad_scale, &loss, &count, err);
    b.daux = grad_scale * (float)count;
    lowest = esft__trn_lowest(tr, m, &attn, &embed);
    for (l = c->n_layers - 1; s == ESFT_OK && l >= lowest; l--)
        s = esft__trn_layer_backward(&b, v, tr, l, T, l > lowest || embed ? 0 : attn ? 2 : 1, err);
    if (s == ESFT_OK && embed) {
        float *dE = esft__grad_of(tr, v->embed.data);
        for (t = 0; t < T; t++) {
            const float *g = b.dx + (size_t)t * D;
            float *row = dE + (size_t)ids[t] * D;
            int d;
            for (d = 0; d < D; d++) row[d] += g[d];
        }
    }
    esft__pesc_end(&b.f, m);
    m->allocator.free(m->allocator.user, base);
    if (s != ESFT_OK) return s;
    if (loss_sum) *loss_sum = loss;
    if (n_scored) *n_scored = count;
    return ESFT_OK;
}


/* ---- JSONL samples ------------------------------------------------------- */

/* Reads a whole-number array token into dst (when given); its length in *n. */
static esft_status esft__jsonl_ints(const esft_json *js, int tok, int32_t *dst, int *n, int allow_ignore, int vocab,
                                    const char *name, long line, const char *key, esft_error *err)
{
    int i, k;
    if (js->tokens[tok].type != ESFT_JSON_ARRAY)
        return esft__fail_at(err, ESFT_ERR_PARSE, name, line, "\"%s\" is not an array", key);
    *n = js->tokens[tok].size;
    for (i = 0, k = tok + 1; i < *n; i++, k = js->tokens[k].next) {
        double v;
        if (js->tokens[k].type != ESFT_JSON_NUMBER || esft_json_number(js, k, &v) != ESFT_OK || v != floor(v) ||
            v < -2147483648.0 || v > 2147483647.0)
            return esft__fail_at(err, ESFT_ERR_PARSE, name, line, "\"%s\"[%d] is not a whole number", key, i);
        if ((v < 0 && !(allow_ignore && v == -100)) || (vocab > 0 && v >= vocab))
            return esft__fail_at(err, ESFT_ERR_RANGE, name, line, "\"%s\"[%d] = %.0f is not a token id%s (vocab %d)",
                                 key, i, v, allow_ignore ? " or -100" : "", vocab);
        if (dst) dst[i] = (int32_t)v;
    }
    return ESFT_OK;
}

/* One line: its ids (and labels, or a copy of the ids) into dst when given. */
static esft_status esft__jsonl_line(const char *text, size_t len, const char *name, long line, int vocab,
                                    int32_t *ids, int32_t *labels, int *n, esft_error *err)
{
    esft_json js;
    int ti, tl, nl = 0;
    esft_status s = esft_json_parse(&js, text, len, NULL, err);
    if (s != ESFT_OK) return esft__locate(err, s, name, line);
    ti = js.tokens[0].type == ESFT_JSON_OBJECT ? esft_json_find(&js, 0, "input_ids") : -1;
    tl = js.tokens[0].type == ESFT_JSON_OBJECT ? esft_json_find(&js, 0, "labels") : -1;
    if (ti < 0) s = esft__fail_at(err, ESFT_ERR_PARSE, name, line, "no \"input_ids\" array");
    if (s == ESFT_OK) s = esft__jsonl_ints(&js, ti, ids, n, 0, vocab, name, line, "input_ids", err);
    if (s == ESFT_OK && *n == 0) s = esft__fail_at(err, ESFT_ERR_PARSE, name, line, "\"input_ids\" is empty");
    if (s == ESFT_OK && tl >= 0 && js.tokens[tl].type != ESFT_JSON_NULL) {
        s = esft__jsonl_ints(&js, tl, labels, &nl, 1, vocab, name, line, "labels", err);
        if (s == ESFT_OK && nl != *n)
            s = esft__fail_at(err, ESFT_ERR_SHAPE, name, line, "%d labels for %d input_ids", nl, *n);
    } else if (s == ESFT_OK && labels) {
        memcpy(labels, ids, (size_t)*n * sizeof(int32_t));
    }
    esft_json_free(&js);
    return s;
}

/* Walks the lines: with ds->ids NULL counts samples and ids, else fills them. */
static esft_status esft__jsonl_pass(esft_dataset *ds, const char *text, size_t size, const char *name,
                                    int max_samples, int vocab, int64_t *total, esft_error *err)
{
    size_t at = 0;
    long line = 0;
    int n_samples = 0;
    *total = 0;
    while (at < size && (max_samples <= 0 || n_samples < max_samples)) {
        const char *nl = ESFT__CAST(const char *, memchr(text + at, '\n', size - at));
        size_t end = nl ? (size_t)(nl - text) : size, i;
        int blank = 1, n = 0;
        line++;
        for (i = at; i < end; i++)
            if (text[i] != ' ' && text[i] != '\t' && text[i] != '\r') { blank = 0; break; }
        if (!blank) {
            int32_t *ids = ds->ids ? ds->ids + *total : NULL, *labels = ds->ids ? ds->labels + *total : NULL;
            esft_status s = esft__jsonl_line(text + at, end - at, name, line, vocab, ids, labels, &n, err);
            if (s != ESFT_OK) return s;
            if (*total + n > (int64_t)1 << 40) return esft__fail_at(err, ESFT_ERR_RANGE, name, line, "too many tokens");
            *total += n;
            if (ds->offset) ds->offset[n_samples + 1] = *total;
            n_samples++;
        }
        at = end + 1;
    }
    ds->n_samples = n_samples;
    return ESFT_OK;
}

ESFTDEF void esft_dataset_free(esft_dataset *ds)
{
    if (!ds) return;
    esft__release(&ds->allocator, ds->offset);
    esft__release(&ds->allocator, ds->ids);
    esft__release(&ds->allocator, ds->labels);
    memset(ds, 0, sizeof *ds);
}

ESFTDEF esft_status esft_dataset_parse_jsonl(esft_dataset *ds, const char *text, size_t size, const char *name,
                                             int max_samples, int vocab, const esft_allocator *allocator,
                                             esft_error *err)
{
    int64_t total;
    esft_status s;
    if (!ds || (!text && size)) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL dataset or text");
    memset(ds, 0, sizeof *ds);
    ds->allocator = esft__allocator_or_default(allocator);
    if (!name) name = "data";
    s = esft__jsonl_pass(ds, text, size, name, max_samples, vocab, &total, err);
    if (s != ESFT_OK) return s;
    if (ds->n_samples == 0) return esft__fail_at(err, ESFT_ERR_PARSE, name, 0, "no samples");
    ds->offset = ESFT__CAST(int64_t *, esft__calloc(&ds->allocator, (size_t)ds->n_samples + 1, sizeof(int64_t)));
    ds->ids = ESFT__CAST(int32_t *, esft__calloc(&ds->allocator, (size_t)total, sizeof(int32_t)));
    ds->labels = ESFT__CAST(int32_t *, esft__calloc(&ds->allocator, (size_t)total, sizeof(int32_t)));
    if (!ds->offset || !ds->ids || !ds->labels) {
        esft_dataset_free(ds);
        return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, name, 0, "%lld tokens", (long long)total);
    }
    s = esft__jsonl_pass(ds, text, size, name, max_samples, vocab, &total, err);
    if (s != ESFT_OK) {
        esft_allocator a = ds->allocator;
        esft_dataset_free(ds);
        ds->allocator = a;
    }
    return s;
}

ESFTDEF esft_status esft_dataset_read_jsonl(esft_dataset *ds, const char *path, int max_samples, int vocab,
                                            const esft_allocator *allocator, esft_error *err)
{
    esft_allocator a = esft__allocator_or_default(allocator);
    char *text;
    size_t n;
    esft_status s;
    if (!ds || !path) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "NULL dataset or path");
    memset(ds, 0, sizeof *ds);
    s = esft__read_file(path, (uint64_t)4 << 30, &a, &text, &n, err);
    if (s != ESFT_OK) return s;
    s = esft_dataset_parse_jsonl(ds, text, n, path, max_samples, vocab, allocator, err);
    a.free(a.user, text);
    return s;
}

/* ---- .npy ---------------------------------------------------------------- */

ESFTDEF esft_status esft_npy_open(esft_npy_writer *w, const char *path, int64_t rows, int64_t cols, esft_error *err)
{
    char head[128];
    unsigned char pre[10];
    int n, total;
    esft__out *o;
    esft_status s;
    if (!w || !path || rows < 0 || cols < 0) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "bad .npy arguments");
    memset(w, 0, sizeof *w);
    w->allocator = esft__allocator_or_default(NULL);
    o = ESFT__CAST(esft__out *, esft__calloc(&w->allocator, 1, sizeof *o));
    if (!o) return esft__fail(err, ESFT_ERR_OUT_OF_MEMORY, ".npy writer");
    if ((s = esft__out_open(o, path, err)) != ESFT_OK) {
        esft__release(&w->allocator, o);
        return s;
    }
    /* format 1.0: magic, version, header length, a Python dict literal padded
       with spaces and a newline so the data starts 64-byte aligned */
    n = snprintf(head, sizeof head, "{'descr': '<f4', 'fortran_order': False, 'shape': (%lld, %lld), }",
                 (long long)rows, (long long)cols);
    total = (10 + n + 1 + 63) / 64 * 64;
    memset(head + n, ' ', (size_t)(total - 10 - n - 1));
    head[total - 10 - 1] = '\n';
    memcpy(pre, "\x93NUMPY\x01\x00", 8);
    pre[8] = (unsigned char)((total - 10) & 0xFF);
    pre[9] = (unsigned char)((total - 10) >> 8);
    w->rows = rows;
    w->cols = cols;
    w->impl_ = o;
    if ((s = esft__out_write(o, pre, 10, err)) != ESFT_OK || (s = esft__out_write(o, head, (size_t)(total - 10), err)) != ESFT_OK)
        esft_npy_abort(w);
    return s;
}

ESFTDEF esft_status esft_npy_append(esft_npy_writer *w, const float *data, int64_t n, esft_error *err)
{
    esft_status s;
    if (!w || !w->impl_ || (!data && n) || n < 0 || w->written + n > w->rows)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, ".npy append of %lld rows past %lld", (long long)n,
                          w ? (long long)w->rows : 0LL);
    s = esft__out_write(ESFT__CAST(esft__out *, w->impl_), data, (size_t)(n * w->cols) * sizeof(float), err);
    if (s != ESFT_OK) esft_npy_abort(w);
    else w->written += n;
    return s;
}

ESFTDEF esft_status esft_npy_commit(esft_npy_writer *w, esft_error *err)
{
    esft__out *o;
    esft_status s;
    if (!w || !w->impl_) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "no open .npy");
    o = ESFT__CAST(esft__out *, w->impl_);
    if (w->written != w->rows) {
        s = esft__fail_at(err, ESFT_ERR_SHAPE, o->path, 0, "%lld of %lld rows written", (long long)w->written,
                          (long long)w->rows);
        esft_npy_abort(w);
        return s;
    }
    s = esft__out_finish(o, err);
    if (s == ESFT_OK) s = esft__out_commit(o, err);
    if (s != ESFT_OK) esft__out_abort(o);
    esft__release(&w->allocator, o);
    w->impl_ = NULL;
    return s;
}

ESFTDEF void esft_npy_abort(esft_npy_writer *w)
{
    if (!w || !w->impl_) return;
    esft__out_abort(ESFT__CAST(esft__out *, w->impl_));
    esft__release(&w->allocator, w->impl_);
    w->impl_ = NULL;
}

#endif /* ESFT_NO_MODELS */

/* ===================================================================== */
/* CPU kernels: GEMM                                                     */
/* ===================================================================== */

/* A packed, cache-blocked SGEMM in the Goto/BLIS manner, in plain C99 plus an
   optional SIMD micro-kernel:

     for each K block (KC)             C is updated once per K block, in order
       for each N panel (NC)           pack op(B) rows k..k+KC, cols j..j+NC
         for each M block (MC)         pack alpha*op(A) rows i..i+MC (stays in L2)
           for each NR column strip    its packed B strip (KC x NR), L1/L2
             for each MR row strip     micro-kernel: an MR x NR tile in registers

   Packed panels are zero-padded to whole tiles, and an edge tile runs through a
   local MR x NR buffer with the same micro-kernel, so every element of C sees the
   same arithmetic wherever it sits. Threads split C along tile boundaries, never
   K: the result has the same bits for any thread count (tests/test_gemm.c).

   Scratch: the packing buffers come from a caller workspace (esft__sgemm_ws) or,
   for esft__sgemm, from a per-thread buffer grown once to its largest size and
   then reused (no allocation per call; esft_release_thread_scratch frees it).
   A per-call malloc would put an allocator round trip on every expert GEMM, and
   a process-wide static buffer would make concurrent callers race.
   ESFT_USE_CBLAS sends every call to the cblas_sgemm you link instead. */

#if defined(_OPENMP)
/* Expands to an OpenMP work-sharing pragma only when compiled with OpenMP, so a
   build without it sees no unknown pragma (-Wunknown-pragmas under -Werror). */
#define ESFT__OMP_PARALLEL_FOR(n_threads) ESFT__PRAGMA(omp parallel for num_threads(n_threads) schedule(static))
#else
#define ESFT__OMP_PARALLEL_FOR(n_threads)
#endif

#if defined(ESFT_NO_THREAD_LOCAL)
/* no thread-local storage: esft__sgemm allocates its scratch per call */
#elif defined(__cplusplus) && __cplusplus >= 201103L
#define ESFT__THREAD_LOCAL thread_local
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define ESFT__THREAD_LOCAL _Thread_local
#elif defined(__GNUC__) || defined(__clang__)
#define ESFT__THREAD_LOCAL __thread
#elif defined(_MSC_VER)
#define ESFT__THREAD_LOCAL __declspec(thread)
#endif

static int esft__n_threads_wanted; /* esft_set_num_threads; 0 = all */

ESFTDEF void esft_set_num_threads(int n)
{
    esft__n_threads_wanted = n < 0 ? 0 : n > ESFT_MAX_THREADS ? ESFT_MAX_THREADS : n;
}

ESFTDEF int esft_get_num_threads(void)
{
#if defined(_OPENMP)
    return esft__n_threads_wanted > 0 ? esft__n_threads_wanted : omp_get_max_threads();
#else
    return 1;
#endif
}

/* C = beta * C (beta 0 writes zeros, whatever C held). */
static void esft__gemm_scale(int M, int N, float beta, float *C, int ldc)
{
    int i, j;
    for (i = 0; i < M; i++) {
        float *c = C + (size_t)i * ldc;
        for (j = 0; j < N; j++) c[j] = beta == 0.0f ? 0.0f : beta * c[j];
    }
}

#if defined(ESFT_USE_CBLAS)

/* The packed kernels are not built: both entries go to the linked CBLAS. */
ESFT__UNUSED static size_t esft__sgemm_ws_floats(int M, int N, int K, int n_threads)
{
    (void)M, (void)N, (void)K, (void)n_threads;
    return 0;
}

static void esft__sgemm_ws(int trans_a, int trans_b, int M, int N, int K, float alpha,
                           const float *A, /* (M, K), or (K, M) if trans_a; stride lda */
                           int lda,
                           const float *B, /* (K, N), or (N, K) if trans_b; stride ldb */
                           int ldb, float beta,
                           float *C,       /* (M, N), stride ldc */
                           int ldc, float *ws, int n_threads)
{
    (void)ws, (void)n_threads;
    if (M <= 0 || N <= 0) return;
    if (K <= 0 || alpha == 0.0f) {
        esft__gemm_scale(M, N, beta, C, ldc);
        return;
    }
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

ESFTDEF void esft_release_thread_scratch(void) {}

#else /* the packed kernels */

/* Register tile (MR x NR) and cache blocks: a KC x NR strip of B is read from
   L1/L2, MC x KC of A stays in L2, KC x NC of B sits in L3 (tuned on a 2-core
   Zen 4 with bench/bench_gemm.c; KC 256..512 all within a few per cent). */
#if defined(__AVX512F__) && !defined(ESFT_NO_SIMD)
#define ESFT__GEMM_AVX512 1
enum { ESFT__MR = 12, ESFT__NR = 32 };
#elif defined(__AVX2__) && defined(__FMA__) && !defined(ESFT_NO_SIMD)
#define ESFT__GEMM_AVX2 1
enum { ESFT__MR = 6, ESFT__NR = 16 };
#elif (defined(__GNUC__) || defined(__clang__)) && !defined(ESFT_NO_SIMD)
#define ESFT__GEMM_VEC 1
enum { ESFT__MR = 6, ESFT__NR = 8 };
#else
enum { ESFT__MR = 4, ESFT__NR = 16 };
#endif
#ifndef ESFT__KC /* (-D to tune) */
#define ESFT__KC 384
#endif
#ifndef ESFT__MC
#define ESFT__MC (12 * ESFT__MR)
#endif
#ifndef ESFT__NC
#define ESFT__NC (64 * ESFT__NR)
#endif

/* How the micro-kernel combines its tile with C (see esft__gemm_tile). */
enum { ESFT__GEMM_STORE = 0, ESFT__GEMM_BETA = 1, ESFT__GEMM_ADD = 2 };

/* The SIMD micro-kernel below is written once, over a small vector vocabulary
   that each instruction set maps to its own operations. A row of the tile is two
   vectors (NR = 2 * ESFT__VW), so every kernel keeps 2 * MR accumulators, two B
   vectors and one broadcast in registers.
     esft__vf              a vector of ESFT__VW floats
     ESFT__VZERO()         all lanes 0
     ESFT__VBCAST(p)       *p in every lane
     ESFT__VFMA(a, b, c)   a * b + c (fused where the instruction set has it)
     ESFT__VADD(a, b)      a + b
     ESFT__VLOAD(p)        load from packed B (64-byte aligned)
     ESFT__VLOADU(p), ESFT__VSTOREU(p, v)   unaligned, for C
     ESFT__ROWS(X)         X(r) for each of the MR rows */
#if defined(ESFT__GEMM_AVX512)
/* 12 x 32 tile in 24 zmm accumulators. */
typedef __m512 esft__vf;
#define ESFT__VW 16
#define ESFT__VZERO() _mm512_setzero_ps()
#define ESFT__VBCAST(p) _mm512_set1_ps(*(p))
#define ESFT__VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define ESFT__VADD(a, b) _mm512_add_ps(a, b)
#define ESFT__VLOAD(p) _mm512_load_ps(p)
#define ESFT__VLOADU(p) _mm512_loadu_ps(p)
#define ESFT__VSTOREU(p, v) _mm512_storeu_ps(p, v)
#define ESFT__ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#elif defined(ESFT__GEMM_AVX2)
/* 6 x 16 tile in 12 ymm accumulators. */
typedef __m256 esft__vf;
#define ESFT__VW 8
#define ESFT__VZERO() _mm256_setzero_ps()
#define ESFT__VBCAST(p) _mm256_broadcast_ss(p)
#define ESFT__VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define ESFT__VADD(a, b) _mm256_add_ps(a, b)
#define ESFT__VLOAD(p) _mm256_load_ps(p)
#define ESFT__VLOADU(p) _mm256_loadu_ps(p)
#define ESFT__VSTOREU(p, v) _mm256_storeu_ps(p, v)
#define ESFT__ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#elif defined(ESFT__GEMM_VEC)
/* GCC/Clang vector extensions, for any target without AVX2 (SSE2-only x86
   builds, ARM, ...): a 6 x 8 tile in twelve 4-float vectors (the native width
   there; wider ones end up on the stack), which fit 16 SSE or NEON registers. No
   fused multiply-add (ISO C mode does not contract), so the last bits differ
   from the AVX kernels, never between thread counts. memcpy is the portable
   unaligned load/store; compilers turn it into one vector move. */
typedef float esft__vf __attribute__((vector_size(16)));
#define ESFT__VW 4
static esft__vf esft__v_set1(float s)
{
    esft__vf v = {s, s, s, s};
    return v;
}
static esft__vf esft__v_loadu(const float *p)
{
    esft__vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static void esft__v_storeu(float *p, esft__vf v) { memcpy(p, &v, sizeof v); }
#define ESFT__VZERO() esft__v_set1(0.0f)
#define ESFT__VBCAST(p) esft__v_set1(*(p))
#define ESFT__VFMA(a, b, c) ((a) * (b) + (c))
#define ESFT__VADD(a, b) ((a) + (b))
#define ESFT__VLOAD(p) esft__v_loadu(p)
#define ESFT__VLOADU(p) esft__v_loadu(p)
#define ESFT__VSTOREU(p, v) esft__v_storeu(p, v)
#define ESFT__ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#endif

#if defined(ESFT__ROWS)
static void esft__gemm_micro(int kc, const float *pa, /* (KC, MR) packed */
                             const float *pb,         /* (KC, NR) packed */
                             float *c, size_t ldc,    /* (MR, NR) tile of C */
                             int mode, float beta)
{
#define ESFT__DECL(r) esft__vf c##r##a = ESFT__VZERO(), c##r##b = ESFT__VZERO();
#define ESFT__FMA(r)                                                              \
    { esft__vf a = ESFT__VBCAST(pa + (r));                                        \
      c##r##a = ESFT__VFMA(a, b0, c##r##a); c##r##b = ESFT__VFMA(a, b1, c##r##b); }
#define ESFT__OUT(r)                                                               \
    { float *cr = c + (size_t)(r) * ldc;                                           \
      if (mode == ESFT__GEMM_ADD) {                                                \
          c##r##a = ESFT__VADD(ESFT__VLOADU(cr), c##r##a);                         \
          c##r##b = ESFT__VADD(ESFT__VLOADU(cr + ESFT__VW), c##r##b);              \
      } else if (mode == ESFT__GEMM_BETA) {                                        \
          c##r##a = ESFT__VFMA(vbeta, ESFT__VLOADU(cr), c##r##a);                  \
          c##r##b = ESFT__VFMA(vbeta, ESFT__VLOADU(cr + ESFT__VW), c##r##b);       \
      }                                                                            \
      ESFT__VSTOREU(cr, c##r##a); ESFT__VSTOREU(cr + ESFT__VW, c##r##b); }
    esft__vf vbeta = ESFT__VBCAST(&beta);
    int k;
    ESFT__ROWS(ESFT__DECL)
    for (k = 0; k < kc; k++) {
        esft__vf b0 = ESFT__VLOAD(pb), b1 = ESFT__VLOAD(pb + ESFT__VW);
        ESFT__ROWS(ESFT__FMA)
        pa += ESFT__MR;
        pb += ESFT__NR;
    }
    ESFT__ROWS(ESFT__OUT)
#undef ESFT__DECL
#undef ESFT__FMA
#undef ESFT__OUT
}
#undef ESFT__ROWS
#else
/* Portable C (any compiler, ESFT_NO_SIMD): the accumulator tile lives in a local
   array the compiler may keep in vector registers; no fused multiply-add, so the
   last bits differ from the SIMD kernels (never between thread counts). */
static void esft__gemm_micro(int kc, const float *pa, /* (KC, MR) packed */
                             const float *pb,         /* (KC, NR) packed */
                             float *c, size_t ldc,    /* (MR, NR) tile of C */
                             int mode, float beta)
{
    float acc[ESFT__MR][ESFT__NR];
    int k, r, j;
    memset(acc, 0, sizeof acc);
    for (k = 0; k < kc; k++) {
        for (r = 0; r < ESFT__MR; r++) {
            float a = pa[r];
            for (j = 0; j < ESFT__NR; j++) acc[r][j] += a * pb[j];
        }
        pa += ESFT__MR;
        pb += ESFT__NR;
    }
    for (r = 0; r < ESFT__MR; r++) {
        float *cr = c + (size_t)r * ldc;
        for (j = 0; j < ESFT__NR; j++) {
            if (mode == ESFT__GEMM_ADD) cr[j] = cr[j] + acc[r][j];
            else if (mode == ESFT__GEMM_BETA) cr[j] = beta * cr[j] + acc[r][j];
            else cr[j] = acc[r][j];
        }
    }
}
#endif

/* Packs alpha * op(A)[i0 .. i0+mc, k0 .. k0+kc] as MR-row strips, each (kc, MR),
   rows past mc zero. A is (M, K) with stride lda, or (K, M) when trans_a. */
static void esft__gemm_pack_a(float *pa, /* (ceil(mc/MR) * kc * MR) */
                              const float *A, int lda, int trans_a, int i0, int k0,
                              int mc, int kc, float alpha)
{
    int s, r, k;
    for (s = 0; s < mc; s += ESFT__MR) {
        int rows = mc - s < ESFT__MR ? mc - s : ESFT__MR;
        if (trans_a) {
            for (k = 0; k < kc; k++) {
                const float *src = A + (size_t)(k0 + k) * lda + i0 + s;
                float *dst = pa + (size_t)k * ESFT__MR;
                for (r = 0; r < rows; r++) dst[r] = alpha * src[r];
                for (; r < ESFT__MR; r++) dst[r] = 0.0f;
            }
        } else {
            for (r = 0; r < rows; r++) {
                const float *src = A + (size_t)(i0 + s + r) * lda + k0;
                for (k = 0; k < kc; k++) pa[(size_t)k * ESFT__MR + r] = alpha * src[k];
            }
            for (; r < ESFT__MR; r++)
                for (k = 0; k < kc; k++) pa[(size_t)k * ESFT__MR + r] = 0.0f;
        }
        pa += (size_t)kc * ESFT__MR;
    }
}

#if defined(ESFT__GEMM_AVX512) || defined(ESFT__GEMM_AVX2)
/* dst[t * NR + r] = src[r * lds + t] for an 8 x 8 block: the transposing step
   of packing a transposed B, eight times faster than scalar copies. */
static void esft__gemm_transpose8(float *dst, const float *src, size_t lds)
{
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds);
    __m256 r2 = _mm256_loadu_ps(src + 2 * lds), r3 = _mm256_loadu_ps(src + 3 * lds);
    __m256 r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds);
    __m256 r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst + 0 * ESFT__NR, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + 1 * ESFT__NR, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ESFT__NR, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ESFT__NR, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ESFT__NR, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ESFT__NR, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ESFT__NR, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ESFT__NR, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

/* Packs op(B)[k0 .. k0+kc, j0 .. j0+cols] (cols <= NR) as one strip (kc, NR),
   columns past cols zero, for a B stored (N, K) with stride ldb (trans_b). */
static void esft__gemm_pack_bt(float *pb, /* (kc, NR) */
                               const float *B, int ldb, int k0, int j0, int kc, int cols)
{
    int j = 0, k = 0;
#if defined(ESFT__GEMM_AVX512) || defined(ESFT__GEMM_AVX2)
    /* 16 k at a time: each 64-byte line of a B row is used whole before the
       next rows can evict it (a power-of-two ldb maps the rows to one set). */
    if (cols == ESFT__NR) {
        for (; k + 16 <= kc; k += 16)
            for (j = 0; j < ESFT__NR; j += 8) {
                const float *src = B + (size_t)(j0 + j) * ldb + k0 + k;
                esft__gemm_transpose8(pb + (size_t)k * ESFT__NR + j, src, (size_t)ldb);
                esft__gemm_transpose8(pb + (size_t)(k + 8) * ESFT__NR + j, src + 8, (size_t)ldb);
            }
    }
#endif
    for (j = 0; j < cols; j++) {
        const float *src = B + (size_t)(j0 + j) * ldb + k0;
        int kk;
        for (kk = k; kk < kc; kk++) pb[(size_t)kk * ESFT__NR + j] = src[kk];
    }
    for (; j < ESFT__NR; j++)
        for (k = 0; k < kc; k++) pb[(size_t)k * ESFT__NR + j] = 0.0f;
}

/* Packs op(B)[k0 .. k0+kc, j0 .. j0+nc] as NR-column strips, each (kc, NR),
   columns past nc zero, for a B stored (K, N) with stride ldb: row by row, so
   the reads stream whatever ldb is. */
static void esft__gemm_pack_bn(float *pb, /* (ceil(nc/NR) * kc * NR) */
                               const float *B, int ldb, int k0, int j0, int kc, int nc)
{
    int s, j, k;
    for (k = 0; k < kc; k++) {
        const float *src = B + (size_t)(k0 + k) * ldb + j0;
        float *dst = pb + (size_t)k * ESFT__NR;
        for (s = 0; s + ESFT__NR <= nc; s += ESFT__NR) {
            memcpy(dst, src + s, ESFT__NR * sizeof(float));
            dst += (size_t)kc * ESFT__NR;
        }
        if (s < nc) {
            for (j = 0; j < nc - s; j++) dst[j] = src[s + j];
            for (; j < ESFT__NR; j++) dst[j] = 0.0f;
        }
    }
}

/* One MR x NR tile of C; a partial tile (rows x cols) goes through a local
   buffer so that it gets exactly the arithmetic of a full one. */
static void esft__gemm_tile(int kc, const float *pa, const float *pb, float *c, int ldc,
                            int rows, int cols, int mode, float beta)
{
    float tile[ESFT__MR * ESFT__NR];
    int r, j;
    if (rows == ESFT__MR && cols == ESFT__NR) {
        esft__gemm_micro(kc, pa, pb, c, (size_t)ldc, mode, beta);
        return;
    }
    if (mode != ESFT__GEMM_STORE)
        for (r = 0; r < rows; r++)
            for (j = 0; j < cols; j++) tile[r * ESFT__NR + j] = c[(size_t)r * ldc + j];
    esft__gemm_micro(kc, pa, pb, tile, ESFT__NR, mode, beta);
    for (r = 0; r < rows; r++)
        for (j = 0; j < cols; j++) c[(size_t)r * ldc + j] = tile[r * ESFT__NR + j];
}

/* Block sizes for one call: the full blocks, cut down to the product's size. */
typedef struct esft__gemm_blocks {
    int mc, kc, nc; /* multiples of MR, any, multiple of NR */
} esft__gemm_blocks;

static esft__gemm_blocks esft__gemm_blocks_for(int M, int N, int K)
{
    esft__gemm_blocks b;
    int m = (M + ESFT__MR - 1) / ESFT__MR * ESFT__MR, n = (N + ESFT__NR - 1) / ESFT__NR * ESFT__NR;
    b.mc = m < ESFT__MC ? m : ESFT__MC;
    b.kc = K < ESFT__KC ? K : ESFT__KC;
    b.nc = n < ESFT__NC ? n : ESFT__NC;
    return b;
}

/* Floats of the packed A block, rounded up so that B's panel after it stays
   64-byte aligned (the micro-kernel makes aligned loads from it). */
static size_t esft__gemm_a_floats(esft__gemm_blocks b)
{
    return ((size_t)b.mc * b.kc + 15) / 16 * 16;
}

/* Floats of scratch one thread needs: A block, B panel, slack to align. */
static size_t esft__gemm_thread_floats(esft__gemm_blocks b)
{
    return esft__gemm_a_floats(b) + (size_t)b.kc * b.nc + 16;
}

/* C[m0..m1, n0..n1] (m0, n0 on the tile grid) with one thread's scratch. The B
   strips are packed during the first M block, right before the micro-kernel
   reads them (still in L1), and reused by the later M blocks; a B stored
   (K, N) is packed whole, row by row, before them. */
static void esft__sgemm_part(int trans_a, int trans_b, int m0, int m1, int n0, int n1, int K,
                             float alpha, const float *A, int lda, const float *B, int ldb,
                             float beta, float *C, int ldc, esft__gemm_blocks bs, float *ws)
{
    float *pa = ESFT__CAST(float *, (void *)(((uintptr_t)ws + 63) & ~(uintptr_t)63));
    float *pb = pa + esft__gemm_a_floats(bs);
    int k0, j0, i0, jr, ir;
    for (k0 = 0; k0 < K; k0 += bs.kc) {
        int kc = K - k0 < bs.kc ? K - k0 : bs.kc;
        int mode = k0 > 0 ? ESFT__GEMM_ADD : beta == 0.0f ? ESFT__GEMM_STORE : ESFT__GEMM_BETA;
        for (j0 = n0; j0 < n1; j0 += bs.nc) {
            int nc = n1 - j0 < bs.nc ? n1 - j0 : bs.nc;
            for (i0 = m0; i0 < m1; i0 += bs.mc) {
                int mc = m1 - i0 < bs.mc ? m1 - i0 : bs.mc;
                esft__gemm_pack_a(pa, A, lda, trans_a, i0, k0, mc, kc, alpha);
                if (i0 == m0 && !trans_b) esft__gemm_pack_bn(pb, B, ldb, k0, j0, kc, nc);
                for (jr = 0; jr < nc; jr += ESFT__NR) {
                    float *pbs = pb + (size_t)jr * kc;
                    int cols = nc - jr < ESFT__NR ? nc - jr : ESFT__NR;
                    if (i0 == m0 && trans_b) esft__gemm_pack_bt(pbs, B, ldb, k0, j0 + jr, kc, cols);
                    for (ir = 0; ir < mc; ir += ESFT__MR) {
                        int rows = mc - ir < ESFT__MR ? mc - ir : ESFT__MR;
                        esft__gemm_tile(kc, pa + (size_t)ir * kc, pbs,
                                        C + (size_t)(i0 + ir) * ldc + j0 + jr, ldc, rows, cols,
                                        mode, beta);
                    }
                }
            }
        }
    }
}

/* Floats of workspace esft__sgemm_ws needs for this product on n_threads. */
ESFT__UNUSED static size_t esft__sgemm_ws_floats(int M, int N, int K, int n_threads)
{
    if (M <= 0 || N <= 0 || K <= 0) return 0;
    return (size_t)(n_threads < 1 ? 1 : n_threads) *
           esft__gemm_thread_floats(esft__gemm_blocks_for(M, N, K));
}

/* esft__sgemm with caller scratch: ws holds esft__sgemm_ws_floats(M, N, K,
   n_threads) floats; at most n_threads threads run (one for small products). */
static void esft__sgemm_ws(int trans_a, int trans_b, int M, int N, int K, float alpha,
                           const float *A, /* (M, K), or (K, M) if trans_a; stride lda */
                           int lda,
                           const float *B, /* (K, N), or (N, K) if trans_b; stride ldb */
                           int ldb, float beta,
                           float *C,       /* (M, N), stride ldc */
                           int ldc, float *ws, int n_threads)
{
    esft__gemm_blocks bs;
    int m_tiles, n_tiles, split_m, tiles, nt, t;
    if (M <= 0 || N <= 0) return;
    if (K <= 0 || alpha == 0.0f) {
        esft__gemm_scale(M, N, beta, C, ldc);
        return;
    }
    ESFT_ASSERT(ws);
    bs = esft__gemm_blocks_for(M, N, K);
    /* Split the dimension with more tiles; small products stay on one thread. */
    m_tiles = (M + ESFT__MR - 1) / ESFT__MR;
    n_tiles = (N + ESFT__NR - 1) / ESFT__NR;
    split_m = m_tiles > n_tiles;
    tiles = split_m ? m_tiles : n_tiles;
    nt = n_threads < 1 ? 1 : n_threads;
    if ((double)M * N * K < 1e6) nt = 1;
    if (nt > tiles) nt = tiles;
    if (nt == 1) {
        esft__sgemm_part(trans_a, trans_b, 0, M, 0, N, K, alpha, A, lda, B, ldb, beta, C, ldc,
                         bs, ws);
        return;
    }
    ESFT__OMP_PARALLEL_FOR(nt)
    for (t = 0; t < nt; t++) {
        int a = (int)((long long)tiles * t / nt), b = (int)((long long)tiles * (t + 1) / nt);
        float *mine = ws + (size_t)t * esft__gemm_thread_floats(bs);
        if (split_m) {
            int m0 = a * ESFT__MR, m1 = b * ESFT__MR < M ? b * ESFT__MR : M;
            esft__sgemm_part(trans_a, trans_b, m0, m1, 0, N, K, alpha, A, lda, B, ldb, beta, C,
                             ldc, bs, mine);
        } else {
            int n0 = a * ESFT__NR, n1 = b * ESFT__NR < N ? b * ESFT__NR : N;
            esft__sgemm_part(trans_a, trans_b, 0, M, n0, n1, K, alpha, A, lda, B, ldb, beta, C,
                             ldc, bs, mine);
        }
    }
}

/* The scratch esft__sgemm keeps per calling thread (grown, never shrunk). */
#if defined(ESFT__THREAD_LOCAL)
static ESFT__THREAD_LOCAL float *esft__scratch;
static ESFT__THREAD_LOCAL size_t esft__scratch_floats;
#endif

/* A thread that ends (an OpenMP team shrinking when the thread count drops)
   cannot call esft_release_thread_scratch: with POSIX threads its buffer is also
   registered under a key whose destructor frees it at the thread's exit. */
#if defined(ESFT__THREAD_LOCAL) && defined(_OPENMP) && (defined(__unix__) || defined(__APPLE__))
#define ESFT__SCRATCH_KEY 1
static pthread_key_t esft__scratch_key;
static pthread_once_t esft__scratch_once = PTHREAD_ONCE_INIT;
static void esft__scratch_destroy(void *p) { ESFT_FREE(p); }
static void esft__scratch_key_init(void) { (void)pthread_key_create(&esft__scratch_key, esft__scratch_destroy); }
#endif

#if defined(ESFT__THREAD_LOCAL)
/* The calling thread's scratch is now p (NULL: none). */
static void esft__scratch_set(float *p, size_t floats)
{
    esft__scratch = p;
    esft__scratch_floats = floats;
#if defined(ESFT__SCRATCH_KEY)
    (void)pthread_once(&esft__scratch_once, esft__scratch_key_init);
    (void)pthread_setspecific(esft__scratch_key, p);
#endif
}
#endif

ESFTDEF void esft_release_thread_scratch(void)
{
#if defined(ESFT__THREAD_LOCAL)
    ESFT_FREE(esft__scratch);
    esft__scratch_set(NULL, 0);
#endif
}

/* Plain triple loop: the fallback when no scratch can be had. */
static void esft__sgemm_naive(int trans_a, int trans_b, int M, int N, int K, float alpha,
                              const float *A, int lda, const float *B, int ldb, float beta,
                              float *C, int ldc)
{
    int i, j, k;
    esft__gemm_scale(M, N, beta, C, ldc);
    for (i = 0; i < M; i++) {
        float *c = C + (size_t)i * ldc;
        for (k = 0; k < K; k++) {
            float a = alpha * (trans_a ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k]);
            if (trans_b) for (j = 0; j < N; j++) c[j] += a * B[(size_t)j * ldb + k];
            else {
                const float *b = B + (size_t)k * ldb;
                for (j = 0; j < N; j++) c[j] += a * b[j];
            }
        }
    }
}

#endif /* ESFT_USE_CBLAS */

/* C (M, N) = alpha * op(A) @ op(B) + beta * C, row-major, fp32.
   op(A) is (M, K): A is (M, K) with row stride lda, or (K, M) when trans_a.
   op(B) is (K, N): B is (K, N) with row stride ldb, or (N, K) when trans_b.
   beta = 0 overwrites C (NaN in C is not propagated). Threads: esft_set_num_threads
   (one when called from inside an OpenMP parallel region). Same bits for any
   thread count. Only if its scratch cannot be allocated does it fall back to a
   slow unpacked loop (correct; the last bits may differ). */
static void esft__sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                        const float *A, /* (M, K), or (K, M) if trans_a; stride lda */
                        int lda,
                        const float *B, /* (K, N), or (N, K) if trans_b; stride ldb */
                        int ldb, float beta,
                        float *C,       /* (M, N), stride ldc */
                        int ldc)
{
#if defined(ESFT_USE_CBLAS)
    esft__sgemm_ws(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, NULL, 1);
#else
    int nt = esft_get_num_threads();
    size_t need;
    float *ws;
    if (M <= 0 || N <= 0) return;
    if (K <= 0 || alpha == 0.0f) {
        esft__gemm_scale(M, N, beta, C, ldc);
        return;
    }
#if defined(_OPENMP)
    if (omp_in_parallel()) nt = 1;
#endif
    need = esft__sgemm_ws_floats(M, N, K, nt);
#if defined(ESFT__THREAD_LOCAL)
    if (esft__scratch_floats < need) {
        float *grown = ESFT__CAST(float *, ESFT_MALLOC(need * sizeof(float)));
        if (grown) {
            ESFT_FREE(esft__scratch);
            esft__scratch_set(grown, need);
        }
    }
    ws = esft__scratch_floats >= need ? esft__scratch : NULL;
#else
    ws = ESFT__CAST(float *, ESFT_MALLOC(need * sizeof(float)));
#endif
    if (!ws) {
        esft__sgemm_naive(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    esft__sgemm_ws(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, ws, nt);
#if !defined(ESFT__THREAD_LOCAL)
    ESFT_FREE(ws);
#endif
#endif
}

/* ===================================================================== */
/* CPU backend and dispatch                                              */
/* ===================================================================== */

static esft_status esft__cpu_alloc(void *context, size_t bytes, void **out)
{
    (void)context;
    *out = ESFT_MALLOC(bytes ? bytes : 1);
    return *out ? ESFT_OK : ESFT_ERR_OUT_OF_MEMORY;
}

static void esft__cpu_free(void *context, void *ptr) { (void)context; ESFT_FREE(ptr); }

static esft_status esft__cpu_copy(void *context, void *dst, const void *src, size_t bytes)
{
    (void)context;
    if (bytes) memmove(dst, src, bytes);
    return ESFT_OK;
}

static esft_status esft__cpu_synchronize(void *context) { (void)context; return ESFT_OK; }

ESFTDEF const esft_backend *esft_backend_cpu(void)
{
    static const esft_backend cpu = {
        ESFT_BACKEND_API_VERSION, "cpu", NULL,
        esft__cpu_alloc, esft__cpu_free, esft__cpu_copy, esft__cpu_copy, esft__cpu_synchronize,
        esft__route_cpu, esft__stats_accumulate_cpu,
        esft__moe_forward_cpu, esft__moe_backward_cpu, esft__adamw_step_cpu,
        esft__pesc_forward_cpu, esft__pesc_backward_cpu, /* adapter_forward, adapter_backward */
        esft__sum_squares_cpu, esft__scale_cpu,
    };
    return &cpu;
}

#endif /* ESFT_IMPLEMENTATION_DONE */
#endif /* ESFT_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
This software is available under the MIT License.
------------------------------------------------------------------------------
Copyright (c) 2026 the esft authors

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
*/
