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
      - ESFT file formats: routing logs (streamed), summary.json, expert configs.
      - Expert selection: top-p per layer (ESFT's exact rule), top-k per layer,
        global budget.
      - A small strict JSON reader/writer of our own (no outside library).

   CONTENTS (same order in declarations and implementation)
      1. version & options       5. routing               9. JSON
      2. status & error detail   6. router statistics
      3. allocation              7. expert selection
      4. backend interface       8. ESFT file formats

   COMPILE-TIME OPTIONS (#define before including)
      ESFT_IMPLEMENTATION      emit the implementation in this translation unit
      ESFT_STATIC              make every function static (private copy per unit)
      ESFT_MALLOC(sz)          \
      ESFT_REALLOC(p,sz)        > all three or none; default libc
      ESFT_FREE(p)             /
      ESFT_ASSERT(x)           internal invariant checks; default assert()

   DIMENSIONS used in shape comments
      T tokens   D model width   E routed experts   K experts per token (top-k)
      L layers   G expert groups

   CHANGES
      0.1.0 (2026-11-25)  routing, router statistics, selection, ESFT formats, JSON.
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
   - Pointers passed to ops live in the backend's own memory (alloc/upload).
     The CPU backend's memory is ordinary host memory.
   - An op the backend lacks is NULL; calling it returns ESFT_ERR_UNSUPPORTED.
     Nothing falls back to another backend silently.
   To add a backend: fill an esft_backend with your functions (NULL for what you
   do not have), return it from a constructor, and run tests/test_backend.c's
   comparison against esft_backend_cpu(). */
#define ESFT_BACKEND_API_VERSION 1

struct esft_route_config;

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
} esft_backend;

/* The CPU reference backend; always present, never NULL. */
ESFTDEF const esft_backend *esft_backend_cpu(void);

/* Checks a backend's api_version (and that it has a name). */
ESFTDEF esft_status esft_backend_check(const esft_backend *b, esft_error *err);

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

/* Validates cfg: sizes, groups dividing E, K reachable within the kept groups. */
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
   2^-32 ~ 2.3e-10 per weight; capacity 2^31 units of weight per (layer, expert). */
#define ESFT_FIXED_ONE 4294967296.0

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
    uint64_t *scratch;        /* (2E) one sample's histogram */
    const esft_backend *backend; /* runs stats_accumulate; CPU by default */
    esft_allocator allocator;
} esft_stats;

/* Allocates zeroed accumulators. allocator may be NULL. Pair: esft_stats_uninit. */
ESFTDEF esft_status esft_stats_init(esft_stats *st, int n_layers, int n_experts, int top_k,
                                    const esft_allocator *allocator);
ESFTDEF void esft_stats_uninit(esft_stats *st);
ESFTDEF void esft_stats_reset(esft_stats *st);

/* Adds one sample's routing at one layer: T tokens, K ids and weights each.
   mask (optional): tokens with mask[t] == 0 are not counted (e.g. the prompt).
   weights may be NULL (token scores only; gate sums then stay 0).
   Validates everything first (ids in [0,E), weights finite and >= 0, layer in
   range); on error nothing is added. */
ESFTDEF esft_status esft_stats_add(esft_stats *st, int layer,
                                   const int32_t *ids,        /* (T, K) */
                                   const float *weights,      /* (T, K) or NULL */
                                   const unsigned char *mask, /* (T) or NULL */
                                   int T, esft_error *err);

/* dst += src. Shapes must agree. The result does not depend on merge order. */
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
/* Rounds every score to `decimals` places the way Python's round() does. */
ESFTDEF void esft_scores_round(esft_scores *sc, int decimals);

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
   kept in st (it is added to a private accumulator first and merged at the end). */
ESFTDEF esft_status esft_stats_read_log(esft_stats *st, int layer, const char *path,
                                        esft_error *err);
/* The same from memory (a whole file's bytes); name is used in messages. */
ESFTDEF esft_status esft_stats_read_log_memory(esft_stats *st, int layer, const char *data,
                                               size_t size, const char *name, esft_error *err);
/* Every expert_weights_<L>.txt in dir, layer L each. Layers found are reported
   through n_files (optional). */
ESFTDEF esft_status esft_stats_read_log_dir(esft_stats *st, const char *dir, int *n_files,
                                            esft_error *err);

/* summary.json: {"token_scores": {"<L>": {"<e>": s, ...}, ...}, "gate_scores": {...}}.
   decimals >= 0 rounds on writing (ESFT's files use 4); -1 writes full precision
   (shortest round-trip). Keys are written in ESFT's order, so a rounded file is
   byte-identical to theirs. Files are written to "<path>.tmp" and renamed. */
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

/* ===================================================================== */
/* 9. JSON                                                               */
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
ESFTDEF esft_status esft_json_number(const esft_json *js, int tok, double *out);

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
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* Records a failure in err (if given) and returns its status, so call sites
   read `return esft__fail(err, ESFT_ERR_RANGE, "...", ...);`. */
static esft_status esft__fail(esft_error *err, esft_status s, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        err->status = s;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return s;
}

/* Like esft__fail, with the place: file and line (0 = none). */
static esft_status esft__fail_at(esft_error *err, esft_status s, const char *file, long line,
                                 const char *fmt, ...)
{
    if (err) {
        va_list ap;
        err->status = s;
        err->line = line;
        err->offset = -1;
        snprintf(err->file, sizeof err->file, "%s", file ? file : "");
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return s;
}

static void esft__error_clear(esft_error *err)
{
    if (err) {
        memset(err, 0, sizeof *err);
        err->offset = -1;
    }
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

ESFTDEF esft_status esft_route_config_validate(const esft_route_config *c, esft_error *err)
{
    if (!c) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "route config is NULL");
    if (c->n_experts < 1) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "n_experts %d < 1", c->n_experts);
    if (c->top_k < 1 || c->top_k > c->n_experts)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "top_k %d outside [1, %d experts]",
                          c->top_k, c->n_experts);
    if (c->gating != ESFT_GATING_SOFTMAX && c->gating != ESFT_GATING_SIGMOID)
        return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "unknown gating %d", (int)c->gating);
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

static esft_status esft__route_cpu(void *context, const esft_route_config *c, int32_t *ids,
                                   float *weights, float *probs, const float *logits, int T,
                                   esft_error *err)
{
    esft_allocator a = esft__allocator_or_default(NULL);
    int E = c->n_experts, G = c->n_group > 0 ? c->n_group : 1, t, j;
    /* scratch: [0,E) a probs row when the caller wants none, [E,2E) biased
       choice, [2E,3E) allowed mask (bytes), then G group scores and G group ids */
    size_t floats = (size_t)E * 3 + (size_t)G * 2;
    float *scratch;
    (void)context;
    for (t = 0; t < T; t++)
        for (j = 0; j < E; j++)
            if (!isfinite(logits[(size_t)t * E + j]))
                return esft__fail(err, ESFT_ERR_NUMERIC, "router logit of token %d, expert %d is %s",
                                  t, j, isnan(logits[(size_t)t * E + j]) ? "NaN" : "Inf");
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
    esft_status s = esft_route_config_validate(c, err);
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
    if (!st) return ESFT_ERR_INVALID_ARGUMENT;
    memset(st, 0, sizeof *st);
    if (n_layers < 1 || n_experts < 1 || top_k < 1 || top_k > n_experts)
        return ESFT_ERR_INVALID_ARGUMENT;
    if (!esft__product_fits((size_t)n_layers, (size_t)n_experts)) return ESFT_ERR_OUT_OF_MEMORY;
    le = (size_t)n_layers * (size_t)n_experts;
    st->n_layers = n_layers;
    st->n_experts = n_experts;
    st->top_k = top_k;
    st->backend = esft_backend_cpu();
    st->allocator = esft__allocator_or_default(allocator);
    st->count = ESFT__CAST(uint64_t *, esft__calloc(&st->allocator, le, sizeof(uint64_t)));
    st->gate_sum = ESFT__CAST(uint64_t *, esft__calloc(&st->allocator, le, sizeof(uint64_t)));
    st->token_frac_sum = ESFT__CAST(uint64_t *, esft__calloc(&st->allocator, le, sizeof(uint64_t)));
    st->gate_frac_sum = ESFT__CAST(uint64_t *, esft__calloc(&st->allocator, le, sizeof(uint64_t)));
    st->n_tokens = ESFT__CAST(uint64_t *, esft__calloc(&st->allocator, (size_t)n_layers, sizeof(uint64_t)));
    st->n_samples = ESFT__CAST(uint64_t *, esft__calloc(&st->allocator, (size_t)n_layers, sizeof(uint64_t)));
    st->scratch = ESFT__CAST(uint64_t *, esft__calloc(&st->allocator, 2 * (size_t)n_experts, sizeof(uint64_t)));
    if (!st->count || !st->gate_sum || !st->token_frac_sum || !st->gate_frac_sum || !st->n_tokens ||
        !st->n_samples || !st->scratch) {
        esft_stats_uninit(st);
        return ESFT_ERR_OUT_OF_MEMORY;
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
    memset(st, 0, sizeof *st);
}

ESFTDEF void esft_stats_reset(esft_stats *st)
{
    size_t le = (size_t)st->n_layers * (size_t)st->n_experts;
    memset(st->count, 0, le * sizeof(uint64_t));
    memset(st->gate_sum, 0, le * sizeof(uint64_t));
    memset(st->token_frac_sum, 0, le * sizeof(uint64_t));
    memset(st->gate_frac_sum, 0, le * sizeof(uint64_t));
    memset(st->n_tokens, 0, (size_t)st->n_layers * sizeof(uint64_t));
    memset(st->n_samples, 0, (size_t)st->n_layers * sizeof(uint64_t));
}

/* A weight in fixed point. Callers have checked 0 <= w < 2^31. */
static uint64_t esft__to_fixed(float w) { return (uint64_t)((double)w * ESFT_FIXED_ONE + 0.5); }

/* Checks one sample's routing before anything is added, so a failure adds nothing. */
static esft_status esft__stats_check_routing(const int32_t *ids, const float *weights, int T, int K,
                                             int E, esft_error *err)
{
    size_t i, n = (size_t)T * (size_t)K;
    for (i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= E)
            return esft__fail(err, ESFT_ERR_RANGE, "token %lu: expert id %ld outside [0, %d)",
                              (unsigned long)(i / (size_t)K), (long)ids[i], E);
        if (weights && !(weights[i] >= 0.0f && weights[i] < 2147483648.0f))
            return esft__fail(err, isnan(weights[i]) || isinf(weights[i]) ? ESFT_ERR_NUMERIC : ESFT_ERR_RANGE,
                              "token %lu: weight %g is not a finite number >= 0",
                              (unsigned long)(i / (size_t)K), (double)weights[i]);
    }
    return ESFT_OK;
}

/* count_fx / den in fixed point, rounded to nearest; exact integer arithmetic. */
static uint64_t esft__fixed_ratio(uint64_t num_fixed, uint64_t den)
{
    return (num_fixed + den / 2) / den;
}

ESFTDEF esft_status esft_stats_add(esft_stats *st, int layer, const int32_t *ids,
                                   const float *weights, const unsigned char *mask, int T,
                                   esft_error *err)
{
    int E, K, e, t;
    uint64_t n_counted = 0, *count, *gsum;
    esft_status s;
    if (!st || !st->count) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "stats not initialised");
    if (layer < 0 || layer >= st->n_layers)
        return esft__fail(err, ESFT_ERR_RANGE, "layer %d outside [0, %d)", layer, st->n_layers);
    if (T < 0 || (T > 0 && !ids)) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "T < 0 or ids NULL");
    E = st->n_experts;
    K = st->top_k;
    s = esft__stats_check_routing(ids, weights, T, K, E, err);
    if (s != ESFT_OK) return s;
    for (t = 0; t < T; t++) n_counted += !mask || mask[t];
    if (n_counted == 0) return ESFT_OK;
    if (n_counted > (uint64_t)0x7fffffff / (uint64_t)K)
        return esft__fail(err, ESFT_ERR_RANGE, "a sample of %d tokens is too long", T);
    count = st->scratch;
    gsum = st->scratch + E;
    memset(st->scratch, 0, 2 * (size_t)E * sizeof(uint64_t));
    s = st->backend->stats_accumulate(st->backend->context, count, gsum, ids, weights, mask, T, K, E, err);
    if (s != ESFT_OK) return s;
    {
        uint64_t *row_count = st->count + (size_t)layer * E;
        uint64_t *row_gate = st->gate_sum + (size_t)layer * E;
        uint64_t *row_tfrac = st->token_frac_sum + (size_t)layer * E;
        uint64_t *row_gfrac = st->gate_frac_sum + (size_t)layer * E;
        for (e = 0; e < E; e++) {
            row_count[e] += count[e];
            row_gate[e] += gsum[e];
            row_tfrac[e] += esft__fixed_ratio(count[e] << 32, n_counted * (uint64_t)K);
            row_gfrac[e] += esft__fixed_ratio(gsum[e], n_counted);
        }
    }
    st->n_tokens[layer] += n_counted;
    st->n_samples[layer] += 1;
    return ESFT_OK;
}

/* The CPU accumulation kernel: a histogram of ids and fixed-point weight sums. */
static esft_status esft__stats_accumulate_cpu(void *context, uint64_t *count, uint64_t *gate_sum,
                                              const int32_t *ids, const float *weights,
                                              const unsigned char *mask, int T, int K, int E,
                                              esft_error *err)
{
    int t, j;
    (void)context; (void)E; (void)err;
    for (t = 0; t < T; t++) {
        const int32_t *row = ids + (size_t)t * K;
        if (mask && !mask[t]) continue;
        for (j = 0; j < K; j++) count[row[j]]++;
        if (weights) {
            const float *w = weights + (size_t)t * K;
            for (j = 0; j < K; j++) gate_sum[row[j]] += esft__to_fixed(w[j]);
        }
    }
    return ESFT_OK;
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
    char buf[64];
    snprintf(buf, sizeof buf, "%.*f", decimals, x);
    return strtod(buf, NULL);
}

ESFTDEF void esft_scores_round(esft_scores *sc, int decimals)
{
    size_t i, le = (size_t)sc->n_layers * (size_t)sc->n_experts;
    for (i = 0; i < le; i++) {
        sc->token[i] = esft__round_decimals(sc->token[i], decimals);
        sc->gate[i] = esft__round_decimals(sc->gate[i], decimals);
    }
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

#if defined(_WIN32)
#include <io.h>
#else
#include <fcntl.h>
#include <unistd.h>
#endif

/* Writes all bytes to a new file and forces them to disk. */
static int esft__write_and_sync(const char *tmp, const char *data, size_t size)
{
#if defined(_WIN32)
    FILE *f = fopen(tmp, "wb");
    int ok;
    if (!f) return 0;
    ok = fwrite(data, 1, size, f) == size;
    ok = fflush(f) == 0 && ok;
    ok = _commit(_fileno(f)) == 0 && ok;
    return fclose(f) == 0 && ok;
#else
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644), ok = 1;
    if (fd < 0) return 0;
    while (ok && size > 0) {
        ssize_t n = write(fd, data, size);
        if (n < 0 && errno == EINTR) continue;
        ok = n > 0;
        if (ok) { data += n; size -= (size_t)n; }
    }
    ok = fsync(fd) == 0 && ok;
    return close(fd) == 0 && ok;
#endif
}

/* Writes bytes to "<path>.tmp", flushes them to disk, then renames over path:
   a crash or error never leaves a half-written file under the real name. */
static esft_status esft__write_file_atomic(const char *path, const char *data, size_t size,
                                           esft_error *err)
{
    char tmp[4096];
    int ok;
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
        return esft__fail_at(err, ESFT_ERR_INVALID_ARGUMENT, path, 0, "path too long");
    ok = esft__write_and_sync(tmp, data, size);
#if defined(_WIN32)
    if (ok) remove(path);
#endif
    if (ok) ok = rename(tmp, path) == 0;
    if (!ok) {
        int e = errno;
        remove(tmp);
        return esft__fail_at(err, ESFT_ERR_IO, path, 0, "cannot write: %s", strerror(e));
    }
    return ESFT_OK;
}

static esft_status esft__write_buf_atomic(const char *path, esft__buf *b, esft_error *err)
{
    esft_status s;
    if (b->failed) s = esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, 0, "output of %lu bytes",
                                     (unsigned long)b->size);
    else s = esft__write_file_atomic(path, b->data ? b->data : "", b->size, err);
    esft__buf_free(b);
    return s;
}

/* Reads a whole file into memory (for JSON files; logs are streamed). */
static esft_status esft__read_file(const char *path, const esft_allocator *a, char **out,
                                   size_t *size, esft_error *err)
{
    FILE *f;
    long n;
    char *data;
    *out = NULL;
    *size = 0;
    f = fopen(path, "rb");
    if (!f) return esft__fail_at(err, ESFT_ERR_IO, path, 0, "cannot open: %s", strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return esft__fail_at(err, ESFT_ERR_IO, path, 0, "cannot size the file (not a regular file?)");
    }
    data = ESFT__CAST(char *, a->alloc(a->user, (size_t)n + 1));
    if (!data) {
        fclose(f);
        return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, 0, "%ld bytes", n);
    }
    if (fread(data, 1, (size_t)n, f) != (size_t)n) {
        fclose(f);
        a->free(a->user, data);
        return esft__fail_at(err, ESFT_ERR_IO, path, 0, "read failed");
    }
    fclose(f);
    data[n] = 0;
    *out = data;
    *size = (size_t)n;
    return ESFT_OK;
}

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
    char tmp[64];
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
    if (n >= sizeof tmp) return NULL;
    memcpy(tmp, start, n);
    tmp[n] = 0;
    {
        char *stop;
        *out = strtod(tmp, &stop);
        if (stop != tmp + n) return NULL;
    }
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

/* One parsed line -> one sample of `layer` in st. */
static esft_status esft__add_log_line(esft_stats *st, int layer, esft__log_line *ln,
                                      const char *line, const char *end, esft_error *err)
{
    int K = st->top_k;
    esft_status s = esft__parse_log_line(ln, line, end, err);
    if (s != ESFT_OK) return s;
    if (ln->n_ids != ln->n_weights)
        return esft__fail(err, ESFT_ERR_SHAPE, "%lu expert ids but %lu weights",
                          (unsigned long)ln->n_ids, (unsigned long)ln->n_weights);
    if (ln->n_ids % (size_t)K)
        return esft__fail(err, ESFT_ERR_SHAPE, "%lu expert ids is not a multiple of top-k %d",
                          (unsigned long)ln->n_ids, K);
    if (ln->n_ids / (size_t)K > 0x7fffffff)
        return esft__fail(err, ESFT_ERR_RANGE, "too many tokens on one line");
    return esft_stats_add(st, layer, ln->ids, ln->weights, NULL, (int)(ln->n_ids / (size_t)K), err);
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
   With at_eof, a final line without '\n' is consumed too. */
static esft_status esft__log_consume(esft__log_reader *r, const char *data, size_t size,
                                     int at_eof, size_t *consumed, esft_error *err)
{
    const char *p = data, *end = data + size;
    *consumed = 0;
    while (p < end) {
        const char *nl = ESFT__CAST(const char *, memchr(p, '\n', (size_t)(end - p)));
        const char *line_end;
        esft_status s;
        if (!nl && !at_eof) break;
        line_end = nl ? nl : end;
        r->line++;
        if (line_end > p && line_end[-1] == '\r') line_end--;
        s = esft__add_log_line(r->st, r->layer, &r->scratch, p, line_end, err);
        if (s != ESFT_OK) return esft__locate(err, s, r->name, r->line);
        p = nl ? nl + 1 : end;
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
    priv->backend = like->backend;
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

ESFTDEF esft_status esft_stats_read_log(esft_stats *st, int layer, const char *path, esft_error *err)
{
    esft_stats priv;
    esft__log_reader r;
    esft__buf buf;
    FILE *f;
    esft_status s;
    esft__error_clear(err);
    if (!path) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path is NULL");
    s = esft__log_reader_begin(&r, &priv, st, layer, path, err);
    if (s != ESFT_OK) return s;
    f = fopen(path, "rb");
    if (!f) {
        s = esft__fail_at(err, ESFT_ERR_IO, path, 0, "cannot open: %s", strerror(errno));
        return esft__log_reader_end(&r, st, s, err);
    }
    esft__buf_init(&buf, &st->allocator);
    for (;;) {
        size_t got, used;
        int eof;
        if (!esft__buf_reserve(&buf, ESFT__LOG_CHUNK)) {
            s = esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, r.line + 1, "line buffer");
            break;
        }
        got = fread(buf.data + buf.size, 1, ESFT__LOG_CHUNK, f);
        buf.size += got;
        if (got < ESFT__LOG_CHUNK && ferror(f)) {
            s = esft__fail_at(err, ESFT_ERR_IO, path, r.line + 1, "read failed");
            break;
        }
        eof = got == 0;
        s = esft__log_consume(&r, buf.data, buf.size, eof, &used, err);
        if (s != ESFT_OK || eof) break;
        memmove(buf.data, buf.data + used, buf.size - used); /* keep the partial line */
        buf.size -= used;
    }
    fclose(f);
    esft__buf_free(&buf);
    return esft__log_reader_end(&r, st, s, err);
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
    if (esft_stats_init(&all, st->n_layers, st->n_experts, st->top_k, &st->allocator) != ESFT_OK)
        return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, dir, 0, "accumulator");
    all.backend = st->backend;
    for (layer = 0; layer <= st->n_layers && s == ESFT_OK; layer++) {
        FILE *probe;
        snprintf(path, sizeof path, "%s/expert_weights_%d.txt", dir, layer);
        probe = fopen(path, "rb");
        if (!probe) continue;
        fclose(probe);
        if (layer == st->n_layers)
            s = esft__fail_at(err, ESFT_ERR_RANGE, path, 0,
                              "layer %d is beyond the %d layers of the accumulator", layer, st->n_layers);
        else if ((s = esft_stats_read_log(&all, layer, path, err)) == ESFT_OK)
            found++;
    }
    if (s == ESFT_OK && !found)
        s = esft__fail_at(err, ESFT_ERR_IO, dir, 0, "no expert_weights_<L>.txt files for layers 0..%d",
                          st->n_layers - 1);
    if (s == ESFT_OK) s = esft_stats_merge(st, &all, err);
    esft_stats_uninit(&all);
    if (s == ESFT_OK && n_files) *n_files = found;
    return s;
}

/* ---- summary.json and expert configs --------------------------------- */

/* Formats a score as Python's json.dump writes round(x, decimals) (decimals >= 0:
   fixed digits, trailing zeros dropped, at least one kept) or repr(x) (-1:
   shortest text that reads back to the same double). */
static void esft__format_score(char *out, size_t cap, double x, int decimals)
{
    if (decimals >= 0) {
        size_t n;
        snprintf(out, cap, "%.*f", decimals, x);
        if (!strchr(out, '.')) { strncat(out, ".0", cap - strlen(out) - 1); return; }
        n = strlen(out);
        while (n > 2 && out[n - 1] == '0' && out[n - 2] != '.') out[--n] = 0;
        if (strcmp(out, "-0.0") == 0) snprintf(out, cap, "-0.0");
        return;
    }
    {
        int prec;
        for (prec = 1; prec <= 17; prec++) {
            snprintf(out, cap, "%.*g", prec, x);
            if (strtod(out, NULL) == x) break;
        }
        if (!strpbrk(out, ".eEn")) strncat(out, ".0", cap - strlen(out) - 1);
    }
}

/* Present layers ordered as Python sorts their decimal keys as strings ("1" <
   "10" < "2"), which is the order ESFT's files list them in. */
static int esft__layers_in_key_order(int *order, const unsigned char *present, int L)
{
    int l, n = 0;
    for (l = 0; l < L; l++) {
        char a[16];
        int j = n;
        if (!present[l]) continue;
        snprintf(a, sizeof a, "%d", l);
        while (j > 0) {
            char b[16];
            snprintf(b, sizeof b, "%d", order[j - 1]);
            if (strcmp(b, a) <= 0) break;
            order[j] = order[j - 1];
            j--;
        }
        order[j] = l;
        n++;
    }
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

ESFTDEF esft_status esft_expert_config_write(const char *path, const esft_expert_config *cfg,
                                             esft_error *err)
{
    esft__buf b;
    int *order, n_order, i, j;
    esft__error_clear(err);
    if (!path || !cfg || !cfg->offset) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path or config is NULL");
    esft__buf_init(&b, &cfg->allocator);
    order = ESFT__CAST(int *, esft__calloc(&b.allocator, (size_t)cfg->n_layers, sizeof(int)));
    if (!order) return esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, path, 0, "layer order");
    n_order = esft__layers_in_key_order(order, cfg->layer_present, cfg->n_layers);
    esft__buf_puts(&b, "{\"experts\": {");
    for (i = 0; i < n_order; i++) {
        int l = order[i];
        esft__buf_printf(&b, "%s\"%d\": [", i ? ", " : "", l);
        for (j = cfg->offset[l]; j < cfg->offset[l + 1]; j++)
            esft__buf_printf(&b, "%s%d", j > cfg->offset[l] ? ", " : "", (int)cfg->ids[j]);
        esft__buf_puts(&b, "]");
    }
    esft__buf_printf(&b, "}, \"shared_experts\": %s, \"non_expert_modules\": %s}",
                     cfg->shared_experts ? "true" : "false", cfg->non_expert_modules ? "true" : "false");
    esft__release(&b.allocator, order);
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

ESFTDEF esft_status esft_scores_read_json(const char *path, esft_scores *out, esft_error *err)
{
    char *text;
    size_t size;
    esft_allocator a = esft__allocator_or_default(NULL);
    esft_status s;
    esft__error_clear(err);
    if (!path || !out) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path or output is NULL");
    memset(out, 0, sizeof *out);
    s = esft__read_file(path, &a, &text, &size, err);
    if (s != ESFT_OK) return s;
    s = esft_scores_parse_json(text, size, path, out, err);
    a.free(a.user, text);
    return s;
}

/* One layer's id list of an expert config: integers in [0, limit), no repeats. */
static esft_status esft__parse_id_list(const esft_json *js, int arr, const char *name, int32_t *dst,
                                       esft_error *err)
{
    int j, m, k = arr + 1;
    for (j = 0; j < js->tokens[arr].size; j++, k = js->tokens[k].next) {
        double v;
        if (esft_json_number(js, k, &v) != ESFT_OK || v != floor(v) || v < 0 || v >= ESFT__MAX_INDEX)
            return esft__json_fail(js, k, err, name, ESFT_ERR_PARSE, "%s is not a non-negative integer", "expert id");
        dst[j] = (int32_t)v;
        for (m = 0; m < j; m++)
            if (dst[m] == dst[j]) return esft__json_fail(js, k, err, name, ESFT_ERR_PARSE, "%s listed twice", "expert id");
    }
    return ESFT_OK;
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
    int *count = NULL, *start = NULL;
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
    start = ESFT__CAST(int *, esft__calloc(&out->allocator, (size_t)L, sizeof(int)));
    if (!count || !start) { s = esft__fail_at(err, ESFT_ERR_OUT_OF_MEMORY, name, 0, "config"); goto done; }
    for (i = 0, k = ex + 1; i < js.tokens[ex].size; i++, k = js.tokens[k + 1].next) {
        long layer = esft__json_index_key(&js, k, ESFT__MAX_INDEX);
        if (out->layer_present[layer]) { s = esft__json_fail(&js, k, err, name, ESFT_ERR_PARSE, "duplicate %s key", "layer"); goto done; }
        out->layer_present[layer] = 1;
        count[layer] = js.tokens[k + 1].size;
    }
    for (i = 0; i < L; i++) out->offset[i + 1] = out->offset[i] + count[i];
    for (i = 0, k = ex + 1; i < js.tokens[ex].size && s == ESFT_OK; i++, k = js.tokens[k + 1].next) {
        long layer = esft__json_index_key(&js, k, ESFT__MAX_INDEX);
        s = esft__parse_id_list(&js, k + 1, name, out->ids + out->offset[layer], err);
    }
    if (s == ESFT_OK) s = esft__parse_flag(&js, "shared_experts", name, &out->shared_experts, err);
    if (s == ESFT_OK) s = esft__parse_flag(&js, "non_expert_modules", name, &out->non_expert_modules, err);
done:
    if (count) esft__release(&out->allocator, count);
    if (start) esft__release(&out->allocator, start);
    if (s != ESFT_OK) esft_expert_config_free(out);
    esft_json_free(&js);
    return s;
}

ESFTDEF esft_status esft_expert_config_read(const char *path, esft_expert_config *out, esft_error *err)
{
    char *text;
    size_t size;
    esft_allocator a = esft__allocator_or_default(NULL);
    esft_status s;
    esft__error_clear(err);
    if (!path || !out) return esft__fail(err, ESFT_ERR_INVALID_ARGUMENT, "path or output is NULL");
    memset(out, 0, sizeof *out);
    s = esft__read_file(path, &a, &text, &size, err);
    if (s != ESFT_OK) return s;
    s = esft_expert_config_parse(text, size, path, out, err);
    a.free(a.user, text);
    return s;
}

/* ===================================================================== */
/* 9. JSON                                                               */
/* ===================================================================== */

#define ESFT__JSON_MAX_DEPTH 64

typedef struct esft__json_parser {
    const char *s;
    size_t n, pos;
    esft_json *js;
    int cap;
    esft_error *err;
} esft__json_parser;

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

/* Appends a token; returns its index or -1 when memory runs out. */
static int esft__json_push(esft__json_parser *p, esft_json_type type, size_t start)
{
    esft_json_token *t;
    if (p->js->n_tokens == p->cap) {
        int cap = p->cap ? p->cap * 2 : 64;
        esft_json_token *grown;
        if (cap > (1 << 28)) return -1;
        grown = ESFT__CAST(esft_json_token *, esft__calloc(&p->js->allocator, (size_t)cap, sizeof *grown));
        if (!grown) return -1;
        if (p->js->n_tokens) memcpy(grown, p->js->tokens, (size_t)p->js->n_tokens * sizeof *grown);
        esft__release(&p->js->allocator, p->js->tokens);
        p->js->tokens = grown;
        p->cap = cap;
    }
    t = p->js->tokens + p->js->n_tokens;
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
            p->js->tokens[tok].end = p->pos++;
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
    p->js->tokens[tok].end = p->pos;
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
    p->js->tokens[tok].end = p->pos;
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
            p->js->tokens[tok].size++;
            esft__json_skip_ws(p);
            if (p->pos < p->n && p->s[p->pos] == ',') { p->pos++; continue; }
            if (p->pos < p->n && p->s[p->pos] == close) { p->pos++; break; }
            return esft__json_error(p, is_object ? "expected ',' or '}'" : "expected ',' or ']'");
        }
    }
    p->js->tokens[tok].end = p->pos;
    p->js->tokens[tok].next = p->js->n_tokens;
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
    s = esft__json_value(&p, 0);
    if (s == ESFT_OK) {
        esft__json_skip_ws(&p);
        if (p.pos != p.n) s = esft__json_error(&p, "trailing characters after the value");
    }
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
ESFTDEF esft_status esft_json_string(const esft_json *js, int tok, char *buf, size_t cap)
{
    const esft_json_token *t;
    size_t i, n = 0;
    if (!js || tok < 0 || tok >= js->n_tokens || !buf || cap == 0) return ESFT_ERR_INVALID_ARGUMENT;
    t = js->tokens + tok;
    if (t->type != ESFT_JSON_STRING) return ESFT_ERR_INVALID_ARGUMENT;
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
    char buf[512];
    size_t n;
    char *stop;
    if (!js || !out || tok < 0 || tok >= js->n_tokens || js->tokens[tok].type != ESFT_JSON_NUMBER)
        return ESFT_ERR_INVALID_ARGUMENT;
    n = js->tokens[tok].end - js->tokens[tok].start;
    if (n >= sizeof buf) return ESFT_ERR_RANGE;
    memcpy(buf, js->text + js->tokens[tok].start, n);
    buf[n] = 0;
    *out = strtod(buf, &stop);
    return *stop ? ESFT_ERR_PARSE : ESFT_OK;
}

/* ===================================================================== */
/* CPU kernels: GEMM                                                     */
/* ===================================================================== */

/* C (M, N) = alpha * op(A) @ op(B) + beta * C, row-major, fp32.
   op(A) is (M, K): A is (M, K) with row stride lda, or (K, M) when trans_a.
   op(B) is (K, N): B is (K, N) with row stride ldb, or (N, K) when trans_b.
   beta = 0 overwrites C (NaN in C is not propagated). */
ESFT__UNUSED static void esft__sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                        const float *A, int lda, const float *B, int ldb, float beta,
                        float *C, int ldc)
{
    int i, j, k;
    for (i = 0; i < M; i++) {
        float *c = C + (size_t)i * ldc;
        for (j = 0; j < N; j++) c[j] = beta == 0.0f ? 0.0f : beta * c[j];
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
