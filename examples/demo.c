/* demo.c - the end-to-end demo behind `make run`: ESFT and PESC on a tiny
   byte-level Mixture-of-Experts language model, trained on real ESFT task text,
   CPU only, about a minute on one core (--quick: seconds).

   Build and run (from the repository root; -fopenmp optional):
       cc -O2 -I. examples/demo.c -o demo -lm && ./demo            (or: make run)
       ./demo --quick                                          (CI size, seconds)
       ./demo --help

   What it does (docs/demo.md has the details and the numbers):
     1. reads the vendored task text data/text/<task>.{train,eval}.jsonl
        (slices of the datasets the ESFT authors ship; data/README.md) with the
        header's JSON reader;
     2. pre-trains the model on a mix of the four tasks (everything trainable;
        the target task is 10 % of the mix, so the base model knows a little of it);
     3. runs the target task's training text through it, feeds the routing of
        every MoE layer to esft_stats_add (one sample per text), writes
        summary.json, selects experts by token and by gate score (top-p), writes
        the expert configs and heatmaps to build/run/;
     4. fine-tunes from the same pre-trained weights four ways with the same
        steps and learning-rate schedule: ESFT-Token, ESFT-Gate, full fine-tune,
        PESC adapters (frozen model + esft_pesc layer after each MoE layer);
     5. prints a table like the paper's: bits per byte on the target task's eval
        text and on the other tasks' eval text (forgetting), trainable
        parameters, gradient + AdamW memory, time.

   The model (next-byte prediction, vocabulary 256):
       x0  = concat(emb[b_{t-8}], ..., emb[b_{t-1}])        (T, CTX*DE)
       h0  = x0 W_in^T + b_in                               (T, D)
       h_{l+1} = h_l + MoE_l(rms(h_l))                      l = 0 .. NL-1
       logits  = rms(h_NL) W_out^T + b_out                  (T, 256)
   rms(h) = h / sqrt(mean(h^2) + 1e-5), without a gain. The MoE layers are
   esft_moe (DeepSeek-V2 shape: routed SwiGLU experts + a shared one); the rest
   (embedding, projection, norms, head, loss) is written out below with its
   backward. Everything is seeded: the numbers are the same on every run. */
#define _POSIX_C_SOURCE 200809L
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#if defined(_OPENMP)
#include <omp.h>
#define DEMO_PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
#else
#define DEMO_PARALLEL_FOR
#endif

/* ---------------------------------------------------------------------- */
/* sizes                                                                  */
/* ---------------------------------------------------------------------- */

enum {
    V = 256,     /* bytes */
    CTX = 8,     /* previous bytes the model sees */
    DE = 16,     /* embedding width of one byte */
    DIN = CTX * DE,
    D = 96,      /* model width */
    NL = 2,      /* MoE layers */
    E = 32,      /* routed experts per layer */
    K = 2,       /* experts per token */
    F = 32,      /* hidden width of one routed expert (FS: of the shared one) */
    FS = 32,
    TB = 256,    /* bytes per training batch */
    TE = 512,    /* bytes per evaluation chunk */
    PE = 8,      /* PESC: adapter experts per layer (Camelidae's n) */
    PK = 2,      /* PESC: adapters per token (Camelidae's k) */
    PR = 16,     /* PESC: adapter rank */
    N_TASKS = 4
};

static const char *const task_names[N_TASKS] = {"intent", "law", "summary", "translation"};

/* dense (non-MoE) parameters, one block: emb, w_in, b_in, w_out, b_out */
#define OFF_EMB 0
#define OFF_WIN (OFF_EMB + V * DE)
#define OFF_BIN (OFF_WIN + D * DIN)
#define OFF_WOUT (OFF_BIN + D)
#define OFF_BOUT (OFF_WOUT + V * D)
#define DENSE_N (OFF_BOUT + V)

/* ---------------------------------------------------------------------- */
/* small utilities                                                        */
/* ---------------------------------------------------------------------- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* splitmix64: the whole demo's randomness comes from one seeded stream. */
static unsigned long long rng_state = 20240702ULL;
static unsigned long long rng_next(void)
{
    unsigned long long z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static float rng_uniform(float a) { return a * (2.0f * (float)((rng_next() >> 40) * (1.0 / 16777216.0)) - 1.0f); }
static void fill_uniform(float *x, size_t n, float a)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = rng_uniform(a);
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "demo: out of memory\n");
        exit(1);
    }
    return p;
}
#define NEW(T, n) ((T *)xcalloc((size_t)(n), sizeof(T)))

static void check(esft_status s, const esft_error *err, const char *what)
{
    if (s == ESFT_OK) return;
    fprintf(stderr, "demo: %s: %s: %s\n", what, esft_status_string(s), err ? err->message : "");
    exit(1);
}

/* ---------------------------------------------------------------------- */
/* matrix products (row-parallel: the same bits for any thread count)     */
/* ---------------------------------------------------------------------- */

/* c (M, N) += a (M, Kd) b (Kd, N), N a multiple of 16 (every width here is).
   16 output columns are kept in a small array across the whole k loop: a loop
   of constant length that compilers vectorise at -O2. */
static void mm_nn(float *c, const float *a, const float *b, int M, int N, int Kd)
{
    int i;
    DEMO_PARALLEL_FOR
    for (i = 0; i < M; i++) {
        int j0, j, k;
        for (j0 = 0; j0 < N; j0 += 16) {
            float acc[16], *ci = c + (size_t)i * N + j0;
            memcpy(acc, ci, sizeof acc);
            for (k = 0; k < Kd; k++) {
                const float aik = a[(size_t)i * Kd + k], *bk = b + (size_t)k * N + j0;
                for (j = 0; j < 16; j++) acc[j] += aik * bk[j];
            }
            memcpy(ci, acc, sizeof acc);
        }
    }
}

/* wt (Kd, N) = w^T, w (N, Kd) */
static void transpose(float *wt, const float *w, int N, int Kd)
{
    int i, k;
    for (i = 0; i < N; i++)
        for (k = 0; k < Kd; k++) wt[(size_t)k * N + i] = w[(size_t)i * Kd + k];
}

/* c (M, N) += a^T b, a (T, M), b (T, N): a weight gradient dW += dy^T x.
   at: M*T floats of scratch for a^T. */
static void mm_tn(float *c, const float *a, const float *b, int M, int N, int T, float *at)
{
    transpose(at, a, T, M);
    mm_nn(c, at, b, M, N, T);
}

/* y (T, N) = x (T, Kd) w^T + b, w (N, Kd), b (N) or NULL; wt: Kd*N scratch */
static void linear(float *y, const float *x, const float *w, const float *b, int T, int N, int Kd, float *wt)
{
    int t;
    transpose(wt, w, N, Kd);
    for (t = 0; t < T; t++) {
        if (b) memcpy(y + (size_t)t * N, b, (size_t)N * sizeof(float));
        else memset(y + (size_t)t * N, 0, (size_t)N * sizeof(float));
    }
    mm_nn(y, x, wt, T, N, Kd);
}

/* n = h / sqrt(mean(h^2) + eps), per row; r keeps 1/rms for the backward */
static void rms_forward(float *n, float *r, const float *h, int T)
{
    int t, i;
    for (t = 0; t < T; t++) {
        const float *ht = h + (size_t)t * D;
        double ss = 0.0;
        for (i = 0; i < D; i++) ss += (double)ht[i] * ht[i];
        r[t] = (float)(1.0 / sqrt(ss / D + 1e-5));
        for (i = 0; i < D; i++) n[(size_t)t * D + i] = ht[i] * r[t];
    }
}

/* dh += (dn - n mean(dn . n)) / rms: accumulates */
static void rms_backward(float *dh, const float *dn, const float *n, const float *r, int T)
{
    int t, i;
    for (t = 0; t < T; t++) {
        const float *dt = dn + (size_t)t * D, *nt = n + (size_t)t * D;
        double dot = 0.0;
        for (i = 0; i < D; i++) dot += (double)dt[i] * nt[i];
        dot /= D;
        for (i = 0; i < D; i++) dh[(size_t)t * D + i] += r[t] * (dt[i] - (float)dot * nt[i]);
    }
}

/* ---------------------------------------------------------------------- */
/* data: data/text/<task>.{train,eval}.jsonl                              */
/* ---------------------------------------------------------------------- */

/* A task's text: samples one after another, each preceded by CTX zero bytes
   (the context at a sample's start). pos lists the bytes to predict. */
typedef struct text {
    unsigned char *buf;
    size_t n, cap;
    int32_t *pos;             /* (n_pos) indices into buf */
    size_t n_pos;
    size_t *start, *len;      /* (n_samples) where each sample's bytes are */
    int n_samples;
} text;

static void text_append(text *tx, const char *s, size_t n)
{
    size_t i;
    if (tx->n + n + CTX > tx->cap) {
        tx->cap = 2 * (tx->n + n + CTX) + 4096;
        tx->buf = (unsigned char *)realloc(tx->buf, tx->cap);
        if (!tx->buf) { fprintf(stderr, "demo: out of memory\n"); exit(1); }
    }
    for (i = 0; i < n; i++) tx->buf[tx->n++] = (unsigned char)s[i];
}

/* Appends a JSON string token's decoded bytes. */
static void append_json_string(text *tx, const esft_json *js, int tok)
{
    size_t cap = js->tokens[tok].end - js->tokens[tok].start + 1;
    char *s = NEW(char, cap);
    check(esft_json_string(js, tok, s, cap), NULL, "decoding a JSON string");
    text_append(tx, s, strlen(s));
    free(s);
}

/* One record: train files {"messages": [{"content": ...}, ...]} give the contents
   one after another; eval files {"prompt": ..., "answers": [...]} give prompt,
   a space, the first answer (data/make_text_slices.py does the same). */
static int append_record(text *tx, const esft_json *js)
{
    int msgs = esft_json_find(js, 0, "messages"), prompt = esft_json_find(js, 0, "prompt");
    if (msgs >= 0 && js->tokens[msgs].type == ESFT_JSON_ARRAY) {
        int i, el = msgs + 1;
        for (i = 0; i < js->tokens[msgs].size; i++, el = js->tokens[el].next) {
            int content = esft_json_find(js, el, "content");
            if (content < 0 || js->tokens[content].type != ESFT_JSON_STRING) return 0;
            append_json_string(tx, js, content);
        }
        return 1;
    }
    if (prompt >= 0 && js->tokens[prompt].type == ESFT_JSON_STRING) {
        int answers = esft_json_find(js, 0, "answers");
        append_json_string(tx, js, prompt);
        if (answers >= 0 && js->tokens[answers].type == ESFT_JSON_ARRAY && js->tokens[answers].size > 0 &&
            js->tokens[answers + 1].type == ESFT_JSON_STRING) {
            text_append(tx, " ", 1);
            append_json_string(tx, js, answers + 1);
        }
        return 1;
    }
    return 0;
}

static int load_text(text *tx, const char *path)
{
    FILE *f = fopen(path, "rb");
    char *data, *line, *end;
    long size;
    int lineno = 0;
    size_t i, p;
    memset(tx, 0, sizeof *tx);
    if (!f) { fprintf(stderr, "demo: cannot open %s (run from the repository root, or --data DIR)\n", path); return 0; }
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    data = NEW(char, size + 1);
    if (size < 0 || fread(data, 1, (size_t)size, f) != (size_t)size) { fclose(f); free(data); return 0; }
    fclose(f);
    tx->start = NEW(size_t, size / 2 + 1);
    tx->len = NEW(size_t, size / 2 + 1);
    for (line = data; line < data + size; line = end + 1) {
        esft_json js;
        esft_error err;
        size_t before;
        end = (char *)memchr(line, '\n', (size_t)(data + size - line));
        if (!end) end = data + size;
        lineno++;
        if (end == line) continue;
        if (esft_json_parse(&js, line, (size_t)(end - line), NULL, &err) != ESFT_OK) {
            fprintf(stderr, "demo: %s:%d: %s\n", path, lineno, err.message);
            free(data);
            return 0;
        }
        text_append(tx, "\0\0\0\0\0\0\0\0", CTX); /* CTX zero bytes of context */
        before = tx->n;
        if (!append_record(tx, &js)) {
            fprintf(stderr, "demo: %s:%d: neither \"messages\" nor \"prompt\"\n", path, lineno);
            esft_json_free(&js);
            free(data);
            return 0;
        }
        esft_json_free(&js);
        tx->start[tx->n_samples] = before;
        tx->len[tx->n_samples++] = tx->n - before;
    }
    free(data);
    tx->pos = NEW(int32_t, tx->n);
    for (i = 0; i < (size_t)tx->n_samples; i++)
        for (p = tx->start[i]; p < tx->start[i] + tx->len[i]; p++) tx->pos[tx->n_pos++] = (int32_t)p;
    return tx->n_samples > 0;
}

static void free_text(text *tx)
{
    free(tx->buf);
    free(tx->pos);
    free(tx->start);
    free(tx->len);
}

/* ---------------------------------------------------------------------- */
/* the model                                                              */
/* ---------------------------------------------------------------------- */

/* The pre-trained weights (after step 2); every fine-tune starts from them. */
typedef struct moe_w {
    float *router, *gate, *up, *down, *sg, *su, *sd; /* HF layout, see esft_moe_weights */
} moe_w;

typedef struct model {
    float dense[DENSE_N];
    moe_w w[NL];
} model;

typedef enum method { M_PRETRAIN, M_FROZEN, M_ESFT, M_FULL, M_PESC } method;

/* One training (or evaluation) set-up: what is trainable, its gradients and
   AdamW state. Frozen tensors are read from the model, never copied. */
typedef struct run {
    method how;
    float *dense;                 /* (DENSE_N) own copy when trained, else the model's */
    float *ddense;                /* (DENSE_N) its gradient, NULL when frozen */
    esft_adamw opt_dense;
    esft_moe moe[NL];
    esft_adamw opt_moe[NL];
    esft_pesc_config pcfg;
    float *pesc[NL], *dpesc[NL];  /* (esft_pesc_param_count) per layer, PESC only */
    esft_pesc_saved psaved[NL];
    esft_adamw opt_pesc[NL];
} run;

/* Activations and scratch for up to TE tokens. */
typedef struct acts {
    unsigned char ctx[TE * CTX];
    int32_t target[TE];
    float x0[TE * DIN], h[NL + 1][TE * D], n[NL][TE * D], r[NL][TE];
    float f[NL][TE * D], m[NL][TE * D]; /* MoE output; layer output (PESC: adapters on f) */
    float o[TE * D], ro[TE], logits[TE * V];
    float dlogits[TE * V], dh[TE * D], dn[TE * D], dm[TE * D], dx0[TE * DIN];
    float wt[V * D > D * DIN ? V * D : D * DIN];
    float at[TE * V];                   /* scratch of mm_tn */
    float rlogits[TE * E];
    void *ws[NL];
    size_t ws_bytes;
} acts;

static esft_moe_config moe_config(void)
{
    esft_moe_config c = esft_moe_config_init(D, E, K, F, FS);
    c.aux_alpha = 0.01f; /* DeepSeek-V2's balance loss; keeps all 16 experts in use */
    c.aux_mode = ESFT_AUX_BATCH;
    return c;
}

static esft_moe_weights moe_weights(const moe_w *w)
{
    esft_moe_weights x;
    x.router = w->router; x.gate = w->gate; x.up = w->up; x.down = w->down;
    x.shared_gate = w->sg; x.shared_up = w->su; x.shared_down = w->sd;
    return x;
}

static void model_init(model *md)
{
    int l;
    fill_uniform(md->dense + OFF_EMB, (size_t)V * DE, 1.0f);
    fill_uniform(md->dense + OFF_WIN, (size_t)D * DIN, 1.0f / sqrtf((float)DIN));
    fill_uniform(md->dense + OFF_WOUT, (size_t)V * D, 1.0f / sqrtf((float)D));
    for (l = 0; l < NL; l++) {
        moe_w *w = &md->w[l];
        w->router = NEW(float, E * D);
        w->gate = NEW(float, E * F * D);
        w->up = NEW(float, E * F * D);
        w->down = NEW(float, E * D * F);
        w->sg = NEW(float, FS * D);
        w->su = NEW(float, FS * D);
        w->sd = NEW(float, D * FS);
        fill_uniform(w->router, (size_t)E * D, 1.0f / sqrtf((float)D));
        fill_uniform(w->gate, (size_t)E * F * D, 1.0f / sqrtf((float)D));
        fill_uniform(w->up, (size_t)E * F * D, 1.0f / sqrtf((float)D));
        fill_uniform(w->down, (size_t)E * D * F, 0.5f / sqrtf((float)F));
        fill_uniform(w->sg, (size_t)FS * D, 1.0f / sqrtf((float)D));
        fill_uniform(w->su, (size_t)FS * D, 1.0f / sqrtf((float)D));
        fill_uniform(w->sd, (size_t)D * FS, 0.5f / sqrtf((float)FS));
    }
}

static void model_free(model *md)
{
    int l;
    for (l = 0; l < NL; l++) {
        moe_w *w = &md->w[l];
        free(w->router); free(w->gate); free(w->up); free(w->down); free(w->sg); free(w->su); free(w->sd);
    }
}

/* Copies a trained run's weights back into the model (after pre-training). */
static void model_take(model *md, const run *rn)
{
    int l, e;
    memcpy(md->dense, rn->dense, sizeof md->dense);
    for (l = 0; l < NL; l++) {
        const esft_moe *m = &rn->moe[l];
        moe_w *w = &md->w[l];
        for (e = 0; e < E; e++) {
            const float *g, *u, *d;
            check(esft_moe_expert_weights(m, e, &g, &u, &d, NULL), NULL, "expert weights");
            memcpy(w->gate + (size_t)e * F * D, g, (size_t)F * D * sizeof(float));
            memcpy(w->up + (size_t)e * F * D, u, (size_t)F * D * sizeof(float));
            memcpy(w->down + (size_t)e * D * F, d, (size_t)D * F * sizeof(float));
        }
        if (m->router) memcpy(w->router, m->router, (size_t)E * D * sizeof(float));
        if (m->shared_gate) {
            memcpy(w->sg, m->shared_gate, (size_t)FS * D * sizeof(float));
            memcpy(w->su, m->shared_up, (size_t)FS * D * sizeof(float));
            memcpy(w->sd, m->shared_down, (size_t)D * FS * sizeof(float));
        }
    }
}

/* Sets up a run. masks[l] (E) marks the trainable experts of layer l (ESFT). */
static void run_init(run *rn, model *md, method how, unsigned char masks[NL][E], const esft_adamw_config *ocfg)
{
    esft_error err;
    int l, train_all = how == M_PRETRAIN || how == M_FULL;
    unsigned char all[E];
    memset(rn, 0, sizeof *rn);
    memset(all, 1, sizeof all);
    rn->how = how;
    rn->dense = md->dense;
    if (train_all) {
        rn->dense = NEW(float, DENSE_N);
        memcpy(rn->dense, md->dense, sizeof md->dense);
        rn->ddense = NEW(float, DENSE_N);
        check(esft_adamw_init(&rn->opt_dense, ocfg, DENSE_N, NULL, &err), &err, "adamw");
    }
    for (l = 0; l < NL; l++) {
        esft_moe_config c = moe_config();
        esft_moe_weights w = moe_weights(&md->w[l]);
        c.trainable_experts = train_all ? all : how == M_ESFT ? masks[l] : NULL;
        c.train_router = c.train_shared = train_all;
        check(esft_moe_init(&rn->moe[l], &c, &w, NULL, &err), &err, "MoE layer");
        if (rn->moe[l].n_params)
            check(esft_adamw_init(&rn->opt_moe[l], ocfg, rn->moe[l].n_params, NULL, &err), &err, "adamw");
    }
    if (how == M_PESC) {
        size_t n;
        rn->pcfg = esft_pesc_config_init(D, PE, PK, PR); /* scale 0.25, aux 0.01, as Camelidae */
        n = esft_pesc_param_count(&rn->pcfg);
        for (l = 0; l < NL; l++) {
            rn->pesc[l] = NEW(float, n);
            rn->dpesc[l] = NEW(float, n);
            check(esft_pesc_init_weights(&rn->pcfg, rn->pesc[l], 1000u + (unsigned)l, &err), &err, "pesc init");
            check(esft_pesc_saved_init(&rn->psaved[l], &rn->pcfg, TE, NULL, &err), &err, "pesc saved");
            check(esft_adamw_init(&rn->opt_pesc[l], ocfg, n, NULL, &err), &err, "adamw");
        }
    }
}

static void run_free(run *rn)
{
    int l;
    if (rn->ddense) {
        free(rn->dense);
        free(rn->ddense);
        esft_adamw_uninit(&rn->opt_dense);
    }
    for (l = 0; l < NL; l++) {
        if (rn->moe[l].n_params) esft_adamw_uninit(&rn->opt_moe[l]);
        esft_moe_uninit(&rn->moe[l]);
        if (rn->pesc[l]) {
            free(rn->pesc[l]);
            free(rn->dpesc[l]);
            esft_pesc_saved_uninit(&rn->psaved[l]);
            esft_adamw_uninit(&rn->opt_pesc[l]);
        }
    }
}

/* Trainable parameters and the bytes of their gradients + AdamW moments. */
static void run_memory(const run *rn, size_t *params, size_t *bytes)
{
    int l;
    *params = *bytes = 0;
    if (rn->ddense) {
        *params += DENSE_N;
        *bytes += DENSE_N * sizeof(float) + esft_adamw_state_bytes(&rn->opt_dense);
    }
    for (l = 0; l < NL; l++) {
        *params += rn->moe[l].n_params;
        if (rn->moe[l].n_params) *bytes += esft_moe_grad_bytes(&rn->moe[l]) + esft_adamw_state_bytes(&rn->opt_moe[l]);
        if (rn->pesc[l]) {
            size_t n = esft_pesc_param_count(&rn->pcfg);
            *params += n;
            *bytes += n * sizeof(float) + esft_adamw_state_bytes(&rn->opt_pesc[l]);
        }
    }
}

/* The router of layer l as the run sees it (trained copy or the model's). */
static const float *run_router(const run *rn, int l)
{
    return rn->moe[l].router ? rn->moe[l].router : rn->moe[l].frozen.router;
}

/* Forward over T positions of tx. Returns the mean cross-entropy (nats) and
   the summed auxiliary losses; counts correct top-1 guesses into *correct.
   ids/wts (optional, per layer (T, K)): the routing of each MoE layer,
   recomputed from its input with esft_route the way the layer routes. */
static double forward(const run *rn, acts *a, const unsigned char *buf, const int32_t *pos, int T,
                      double *aux_total, long *correct, int32_t *ids[NL], float *wts[NL])
{
    const float *dense = rn->dense;
    esft_error err;
    double loss = 0.0;
    int t, c, l;
    *aux_total = 0.0;
    for (t = 0; t < T; t++) {
        a->target[t] = buf[pos[t]];
        for (c = 0; c < CTX; c++) {
            unsigned char b = buf[pos[t] - CTX + c];
            a->ctx[t * CTX + c] = b;
            memcpy(a->x0 + (size_t)t * DIN + c * DE, dense + OFF_EMB + (size_t)b * DE, DE * sizeof(float));
        }
    }
    linear(a->h[0], a->x0, dense + OFF_WIN, dense + OFF_BIN, T, D, DIN, a->wt);
    for (l = 0; l < NL; l++) {
        float aux = 0.0f;
        const float *out = a->f[l];
        rms_forward(a->n[l], a->r[l], a->h[l], T);
        check(esft_moe_forward(&rn->moe[l], a->f[l], &aux, a->n[l], a->ws[l], a->ws_bytes, T, &err), &err,
              "MoE forward");
        *aux_total += aux;
        if (rn->pesc[l]) {
            check(esft_pesc_forward(&rn->pcfg, a->m[l], &aux, a->f[l], a->n[l], rn->pesc[l], (esft_pesc_saved *)&rn->psaved[l],
                                    T, &err), &err, "PESC forward");
            *aux_total += aux;
            out = a->m[l];
        }
        for (t = 0; t < T * D; t++) a->h[l + 1][t] = a->h[l][t] + out[t];
        if (ids) {
            esft_moe_config mc = moe_config();
            linear(a->rlogits, a->n[l], run_router(rn, l), NULL, T, E, D, a->wt);
            check(esft_route(&mc.route, ids[l], wts[l], NULL, a->rlogits, T, &err), &err, "route");
        }
    }
    rms_forward(a->o, a->ro, a->h[NL], T);
    linear(a->logits, a->o, dense + OFF_WOUT, dense + OFF_BOUT, T, V, D, a->wt);
    for (t = 0; t < T; t++) { /* softmax cross-entropy; dlogits = (p - onehot) / T */
        const float *z = a->logits + (size_t)t * V;
        float *dz = a->dlogits + (size_t)t * V, mx = z[0];
        double sum = 0.0;
        int j, best = 0;
        for (j = 1; j < V; j++) if (z[j] > mx) { mx = z[j]; best = j; }
        for (j = 0; j < V; j++) { dz[j] = expf(z[j] - mx); sum += dz[j]; }
        loss += log(sum) - (double)(z[a->target[t]] - mx);
        for (j = 0; j < V; j++) dz[j] = (float)(dz[j] / sum) / (float)T;
        dz[a->target[t]] -= 1.0f / (float)T;
        if (best == a->target[t]) (*correct)++;
    }
    return loss / T;
}

/* Backward of the last forward: accumulates into the run's gradient blocks. */
static void backward(run *rn, acts *a, int T)
{
    esft_error err;
    float *dense = rn->dense, *dd = rn->ddense;
    int t, c, l, j;
    if (dd) {
        mm_tn(dd + OFF_WOUT, a->dlogits, a->o, V, D, T, a->at);
        for (t = 0; t < T; t++)
            for (j = 0; j < V; j++) dd[OFF_BOUT + j] += a->dlogits[(size_t)t * V + j];
    }
    memset(a->dn, 0, (size_t)T * D * sizeof(float));
    mm_nn(a->dn, a->dlogits, dense + OFF_WOUT, T, D, V); /* d o */
    memset(a->dh, 0, (size_t)T * D * sizeof(float));
    rms_backward(a->dh, a->dn, a->o, a->ro, T);
    for (l = NL - 1; l >= 0; l--) {
        /* h_{l+1} = h_l + out_l: dh flows on unchanged, plus the layer's part */
        const float *dy = a->dh;
        memset(a->dn, 0, (size_t)T * D * sizeof(float));
        if (rn->pesc[l]) { /* y = F + adapters(F): dF to the MoE, du (router) to its input */
            memset(a->dm, 0, (size_t)T * D * sizeof(float));
            check(esft_pesc_backward(&rn->pcfg, a->dm, a->dn, rn->dpesc[l], a->dh, 1.0f, &rn->psaved[l], a->f[l],
                                     a->n[l], rn->pesc[l], T, &err), &err, "PESC backward");
            dy = a->dm;
        }
        check(esft_moe_backward(&rn->moe[l], a->dn, dy, a->n[l], a->ws[l], a->ws_bytes, T, &err), &err,
              "MoE backward");
        rms_backward(a->dh, a->dn, a->n[l], a->r[l], T);
    }
    if (!dd) return; /* embedding and projection frozen: nothing below needs dh */
    mm_tn(dd + OFF_WIN, a->dh, a->x0, D, DIN, T, a->at);
    for (t = 0; t < T; t++)
        for (j = 0; j < D; j++) dd[OFF_BIN + j] += a->dh[(size_t)t * D + j];
    memset(a->dx0, 0, (size_t)T * DIN * sizeof(float));
    mm_nn(a->dx0, a->dh, dense + OFF_WIN, T, DIN, D);
    for (t = 0; t < T; t++)
        for (c = 0; c < CTX; c++) {
            float *de = dd + OFF_EMB + (size_t)a->ctx[t * CTX + c] * DE;
            const float *g = a->dx0 + (size_t)t * DIN + c * DE;
            for (j = 0; j < DE; j++) de[j] += g[j];
        }
}

/* Zero grads, clip the global norm to 1, one AdamW step on every block. */
static void zero_grads(run *rn)
{
    int l;
    if (rn->ddense) memset(rn->ddense, 0, DENSE_N * sizeof(float));
    for (l = 0; l < NL; l++) {
        esft_moe_zero_grad(&rn->moe[l]);
        if (rn->dpesc[l]) memset(rn->dpesc[l], 0, esft_pesc_param_count(&rn->pcfg) * sizeof(float));
    }
}

static void step(run *rn, float lr)
{
    float *blocks[1 + 2 * NL];
    size_t sizes[1 + 2 * NL];
    esft_error err;
    int nb = 0, l;
    if (rn->ddense) { blocks[nb] = rn->ddense; sizes[nb++] = DENSE_N; }
    for (l = 0; l < NL; l++) {
        if (rn->moe[l].n_params) { blocks[nb] = rn->moe[l].grads; sizes[nb++] = rn->moe[l].n_params; }
        if (rn->dpesc[l]) { blocks[nb] = rn->dpesc[l]; sizes[nb++] = esft_pesc_param_count(&rn->pcfg); }
    }
    check(esft_clip_grad_norm(blocks, sizes, nb, 1.0f, NULL, &err), &err, "clip");
    if (rn->ddense) {
        rn->opt_dense.cfg.lr = lr;
        check(esft_adamw_step(&rn->opt_dense, rn->dense, rn->ddense, &err), &err, "adamw");
    }
    for (l = 0; l < NL; l++) {
        if (rn->moe[l].n_params) {
            rn->opt_moe[l].cfg.lr = lr;
            check(esft_adamw_step(&rn->opt_moe[l], rn->moe[l].params, rn->moe[l].grads, &err), &err, "adamw");
        }
        if (rn->dpesc[l]) {
            rn->opt_pesc[l].cfg.lr = lr;
            check(esft_adamw_step(&rn->opt_pesc[l], rn->pesc[l], rn->dpesc[l], &err), &err, "adamw");
        }
    }
}

/* Linear warm-up over the first 5 % of the steps, then cosine down to 10 %. */
static float lr_at(float peak, int s, int n)
{
    int warm = n / 20 > 1 ? n / 20 : 1;
    double p;
    if (s < warm) return peak * (float)(s + 1) / (float)warm;
    p = (double)(s - warm) / (double)(n - warm > 1 ? n - warm : 1);
    return peak * (float)(0.1 + 0.9 * 0.5 * (1.0 + cos(3.14159265358979 * p)));
}

/* Trains rn for n_steps batches of TB positions of tx. Each position first
   picks one of the n_parts ranges of tx->pos (a task of the mix) with
   probability part_share[k] (they sum to 1), then a position in it. Prints the loss now and then. */
static void train(run *rn, acts *a, const text *tx, const size_t *part_begin, const size_t *part_end,
                  const double *part_share, int n_parts, int n_steps, float peak_lr, int verbose)
{
    int32_t pos[TB];
    int s, t, print_every = n_steps / 4 > 0 ? n_steps / 4 : 1;
    double avg = 0.0;
    for (s = 0; s < n_steps; s++) {
        double aux, loss;
        long correct = 0;
        for (t = 0; t < TB; t++) {
            double u = (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0), acc = 0.0;
            int k;
            size_t n;
            for (k = 0; k < n_parts - 1; k++) {
                acc += part_share[k];
                if (u < acc) break;
            }
            n = part_end[k] - part_begin[k];
            pos[t] = tx->pos[part_begin[k] + (size_t)(rng_next() % (unsigned long long)n)];
        }
        zero_grads(rn);
        loss = forward(rn, a, tx->buf, pos, TB, &aux, &correct, NULL, NULL);
        backward(rn, a, TB);
        step(rn, lr_at(peak_lr, s, n_steps));
        avg = s == 0 ? loss : 0.9 * avg + 0.1 * loss;
        if (verbose && (s % print_every == 0 || s == n_steps - 1))
            printf("      step %4d/%d  train loss %.3f bits/byte (smoothed %.3f)  aux %.4f\n", s + 1, n_steps,
                   loss / log(2.0), avg / log(2.0), aux);
    }
}

/* ---------------------------------------------------------------------- */
/* evaluation and router statistics                                       */
/* ---------------------------------------------------------------------- */

typedef struct score {
    double bpb; /* bits per byte: mean -log2 p(next byte); lower is better */
    double acc; /* next-byte top-1 accuracy */
} score;

/* Scores the first max_pos positions of tx (all of them when it has fewer). */
static score evaluate(const run *rn, acts *a, const text *tx, size_t max_pos)
{
    size_t n = tx->n_pos < max_pos ? tx->n_pos : max_pos, i;
    double nats = 0.0, aux;
    long correct = 0;
    score sc;
    for (i = 0; i < n; i += TE) {
        int T = (int)(n - i < (size_t)TE ? n - i : (size_t)TE);
        nats += forward(rn, a, tx->buf, tx->pos + i, T, &aux, &correct, NULL, NULL) * T;
    }
    sc.bpb = nats / (double)n / log(2.0);
    sc.acc = (double)correct / (double)n;
    return sc;
}

/* Routes every sample of tx through the model and adds each MoE layer's
   top-K ids and weights to st as one sample per text (layers numbered from
   1, as ESFT numbers DeepSeek's MoE layers; layer 0 is never fed). */
static void collect_stats(const run *rn, acts *a, const text *tx, esft_stats *st)
{
    size_t max_len = 0, first = 0, c;
    int32_t *ids[NL], *ip[NL];
    float *wts[NL], *wp[NL];
    esft_error err;
    int i, l;
    long correct = 0;
    double aux;
    for (i = 0; i < tx->n_samples; i++) if (tx->len[i] > max_len) max_len = tx->len[i];
    for (l = 0; l < NL; l++) {
        ids[l] = NEW(int32_t, max_len * K);
        wts[l] = NEW(float, max_len * K);
    }
    for (i = 0; i < tx->n_samples; first += tx->len[i], i++) {
        for (c = 0; c < tx->len[i]; c += TE) {
            int T = (int)(tx->len[i] - c < (size_t)TE ? tx->len[i] - c : (size_t)TE);
            for (l = 0; l < NL; l++) {
                ip[l] = ids[l] + c * K;
                wp[l] = wts[l] + c * K;
            }
            forward(rn, a, tx->buf, tx->pos + first + c, T, &aux, &correct, ip, wp);
        }
        for (l = 0; l < NL; l++)
            check(esft_stats_add(st, l + 1, ids[l], wts[l], NULL, (int)tx->len[i], &err), &err, "stats");
    }
    for (l = 0; l < NL; l++) {
        free(ids[l]);
        free(wts[l]);
    }
}

/* ---------------------------------------------------------------------- */
/* the pipeline                                                           */
/* ---------------------------------------------------------------------- */

typedef struct options {
    int quick, threads, target, pre_steps, ft_steps;
    const char *data, *out;
    double top_p, ft_lr, target_share;
} options;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: demo [--quick] [--task NAME] [--top-p P] [--data DIR] [--out DIR] [--threads N]\n"
            "\n"
            "ESFT and PESC end to end on a tiny byte-level MoE language model trained on\n"
            "the ESFT authors' task text (CPU only). Pre-trains on a mix of the tasks\n"
            "intent, law, summary, translation; collects router statistics on the target\n"
            "task; selects experts by token and gate score (top-p); fine-tunes four ways\n"
            "(ESFT-Token, ESFT-Gate, full, PESC) and prints the comparison table.\n"
            "\n"
            "  --quick        CI size: few steps, short evaluation (seconds, not minutes)\n"
            "  --task NAME    target task (default translation)\n"
            "  --top-p P      ESFT selection threshold, 0 < P <= 1 (default 0.25)\n"
            "  --data DIR     the text slices (default data/text)\n"
            "  --out DIR      summary.json, expert configs, heatmaps, results.tsv (default build/run)\n"
            "  --threads N    CPU threads (default 1; the numbers do not depend on it)\n"
            "  --pre-steps N, --ft-steps N, --ft-lr LR, --target-share S\n"
            "                 pre-training steps (3000), fine-tuning steps (600), fine-tuning\n"
            "                 peak learning rate (1e-3), the target task's share of the\n"
            "                 pre-training mix (0.1)\n"
            "  -h, --help     this text\n");
}

static int parse_args(options *o, int argc, char **argv)
{
    int i, k;
    o->quick = 0;
    o->threads = 0;
    o->target = 3;
    o->data = "data/text";
    o->out = "build/run";
    o->top_p = 0.25;
    o->pre_steps = o->ft_steps = 0;
    o->ft_lr = 0.0;
    o->target_share = 0.1;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); exit(0); }
        else if (!strcmp(a, "--quick")) o->quick = 1;
        else if (v && !strcmp(a, "--data")) { o->data = v; i++; }
        else if (v && !strcmp(a, "--out")) { o->out = v; i++; }
        else if (v && !strcmp(a, "--threads")) { o->threads = atoi(v); i++; }
        else if (v && !strcmp(a, "--pre-steps")) { o->pre_steps = atoi(v); i++; }
        else if (v && !strcmp(a, "--ft-steps")) { o->ft_steps = atoi(v); i++; }
        else if (v && !strcmp(a, "--ft-lr")) { o->ft_lr = atof(v); i++; }
        else if (v && !strcmp(a, "--target-share")) { o->target_share = atof(v); i++; }
        else if (v && !strcmp(a, "--top-p")) {
            o->top_p = atof(v);
            i++;
            if (!(o->top_p > 0.0 && o->top_p <= 1.0)) { fprintf(stderr, "demo: --top-p must be in (0, 1]\n"); return 0; }
        } else if (v && !strcmp(a, "--task")) {
            for (k = 0; k < N_TASKS && strcmp(v, task_names[k]); k++) {}
            if (k == N_TASKS) { fprintf(stderr, "demo: unknown task '%s' (intent, law, summary, translation)\n", v); return 0; }
            o->target = k;
            i++;
        } else {
            fprintf(stderr, "demo: unknown or incomplete option '%s' (try --help)\n", a);
            return 0;
        }
    }
    return 1;
}

static void make_dirs(const char *path)
{
    char buf[1024];
    size_t i, n = strlen(path);
    if (n >= sizeof buf) return;
    memcpy(buf, path, n + 1);
    for (i = 1; i <= n; i++)
        if (buf[i] == '/' || buf[i] == '\0') {
            char keep = buf[i];
            buf[i] = '\0';
            mkdir(buf, 0755);
            buf[i] = keep;
        }
}

/* Concatenates the tasks' training texts into one; part k = task k's positions. */
static void make_mix(text *mix, const text *tr, size_t *begin, size_t *end)
{
    size_t off = 0, i;
    int k;
    memset(mix, 0, sizeof *mix);
    for (k = 0; k < N_TASKS; k++) mix->n_pos += tr[k].n_pos;
    mix->pos = NEW(int32_t, mix->n_pos);
    mix->n_pos = 0;
    for (k = 0; k < N_TASKS; k++) {
        begin[k] = mix->n_pos;
        text_append(mix, (const char *)tr[k].buf, tr[k].n);
        for (i = 0; i < tr[k].n_pos; i++) mix->pos[mix->n_pos++] = (int32_t)(tr[k].pos[i] + off);
        end[k] = mix->n_pos;
        off += tr[k].n;
    }
}

typedef struct result {
    const char *name;
    score task, general, per_task[N_TASKS];
    size_t params, bytes;
    double seconds;
    int experts; /* routed experts trained, of NL * E; -1: not an expert method */
} result;

static result evaluate_all(const char *name, const run *rn, acts *a, const text *ev, int target, size_t max_pos)
{
    result r;
    int k, n = 0;
    memset(&r, 0, sizeof r);
    r.name = name;
    for (k = 0; k < N_TASKS; k++) {
        r.per_task[k] = evaluate(rn, a, &ev[k], max_pos);
        if (k == target) continue;
        r.general.bpb += r.per_task[k].bpb;
        r.general.acc += r.per_task[k].acc;
        n++;
    }
    r.task = r.per_task[target];
    r.general.bpb /= n;
    r.general.acc /= n;
    run_memory(rn, &r.params, &r.bytes);
    r.experts = 0;
    for (k = 0; k < NL; k++) r.experts += rn->moe[k].n_trainable_experts;
    return r;
}

static void print_layers(const esft_expert_config *cfg)
{
    int l, i;
    for (l = 1; l <= NL; l++) {
        printf("        layer %d: experts", l);
        for (i = cfg->offset[l]; i < cfg->offset[l + 1]; i++) printf(" %d", (int)cfg->ids[i]);
        printf("\n");
    }
}

int main(int argc, char **argv)
{
    static acts a;
    static model md;
    options o;
    text tr[N_TASKS], ev[N_TASKS], mix;
    size_t begin[N_TASKS], end[N_TASKS], one_begin, one_end, max_eval;
    double share[N_TASKS], one_share = 1.0;
    esft_stats st;
    esft_scores sc;
    esft_expert_config sel[2];
    esft_adamw_config ocfg = esft_adamw_config_init();
    esft_error err;
    unsigned char masks[2][NL][E];
    result res[5];
    char path[1200];
    run rn;
    double t0 = now_s(), t;
    float ft_lr;
    int k, l, e, pre_steps, ft_steps, i;
    const char *score_names[2] = {"token", "gate"};
    FILE *f;

    if (!parse_args(&o, argc, argv)) return 2;
    /* One thread unless asked: this model's matrices are so small that waking
       threads costs more than it saves (and the numbers are the same either way). */
    esft_set_num_threads(o.threads > 0 ? o.threads : 1);
#if defined(_OPENMP)
    omp_set_num_threads(o.threads > 0 ? o.threads : 1);
#endif
    pre_steps = o.pre_steps > 0 ? o.pre_steps : o.quick ? 200 : 3000;
    ft_steps = o.ft_steps > 0 ? o.ft_steps : o.quick ? 100 : 600;
    ft_lr = o.ft_lr > 0.0 ? (float)o.ft_lr : 1e-3f;
    max_eval = o.quick ? 2048 : (size_t)-1;
    ocfg.weight_decay = 0.0f;

    printf("esft demo: ESFT vs full fine-tuning vs PESC on a tiny byte-level MoE language model%s\n",
           o.quick ? " (--quick)" : "");
    printf("[1/5] data: %s/<task>.{train,eval}.jsonl (slices of the ESFT authors' datasets)\n", o.data);
    for (k = 0; k < N_TASKS; k++) {
        snprintf(path, sizeof path, "%s/%s.train.jsonl", o.data, task_names[k]);
        if (!load_text(&tr[k], path)) return 1;
        snprintf(path, sizeof path, "%s/%s.eval.jsonl", o.data, task_names[k]);
        if (!load_text(&ev[k], path)) return 1;
        printf("      %-12s train %3d texts %6lu bytes | eval %d texts %6lu bytes%s\n", task_names[k],
               tr[k].n_samples, (unsigned long)tr[k].n_pos, ev[k].n_samples, (unsigned long)ev[k].n_pos,
               k == o.target ? "   <- target task" : "");
    }
    make_mix(&mix, tr, begin, end);
    for (k = 0; k < N_TASKS; k++)
        share[k] = k == o.target ? o.target_share : (1.0 - o.target_share) / (N_TASKS - 1);

    /* ---- 2. pre-train ---- */
    t = now_s();
    a.ws_bytes = 0;
    {
        esft_moe_config mc = moe_config();
        check(esft_moe_workspace_size(&mc, TE, &a.ws_bytes, &err), &err, "workspace");
        for (l = 0; l < NL; l++) a.ws[l] = xcalloc(1, a.ws_bytes);
    }
    model_init(&md);
    ocfg.lr = 3e-3f;
    run_init(&rn, &md, M_PRETRAIN, NULL, &ocfg);
    {
        size_t p, b;
        run_memory(&rn, &p, &b);
        printf("[2/5] pre-train: %lu parameters (%d MoE layers x %d experts, top-%d, expert width %d, one\n"
               "      shared expert; context %d bytes), everything trainable; %d steps x %d bytes, AdamW lr %.0e;\n"
               "      the mix: %s %.0f %%, each other task %.0f %% of the bytes\n",
               (unsigned long)p, NL, E, K, F, CTX, pre_steps, TB, 3e-3, task_names[o.target],
               100.0 * o.target_share, 100.0 * (1.0 - o.target_share) / (N_TASKS - 1));
    }
    train(&rn, &a, &mix, begin, end, share, N_TASKS, pre_steps, 3e-3f, 1);
    model_take(&md, &rn);
    run_free(&rn);
    printf("      done in %.1f s\n", now_s() - t);

    /* ---- 3. router statistics on the target task, selection ---- */
    t = now_s();
    run_init(&rn, &md, M_FROZEN, NULL, &ocfg);
    res[0] = evaluate_all("pre-trained (no fine-tune)", &rn, &a, ev, o.target, max_eval);
    res[0].experts = -1;
    check(esft_stats_init(&st, NL + 1, E, K, NULL), NULL, "stats");
    collect_stats(&rn, &a, &tr[o.target], &st);
    run_free(&rn);
    check(esft_stats_scores(&st, ESFT_NORM_POOLED, &sc), NULL, "scores");
    make_dirs(o.out);
    snprintf(path, sizeof path, "%s/summary.json", o.out);
    check(esft_scores_write_json(path, &sc, 4, &err), &err, "summary.json");
    esft_scores_round(&sc, 4); /* select from the scores as written, as ESFT does */
    printf("[3/5] router statistics on %s's training text: %lu texts, %lu bytes routed per layer -> %s\n",
           task_names[o.target], (unsigned long)st.n_samples[1], (unsigned long)st.n_tokens[1], path);
    for (i = 0; i < 2; i++) {
        check(esft_select_top_p(&sc, i == 0 ? ESFT_SCORE_TOKEN : ESFT_SCORE_GATE, o.top_p, &sel[i], &err), &err,
              "select");
        snprintf(path, sizeof path, "%s/config_%s.json", o.out, score_names[i]);
        check(esft_expert_config_write(path, &sel[i], &err), &err, "expert config");
        snprintf(path, sizeof path, "%s/heatmap_%s.svg", o.out, score_names[i]);
        check(esft_heatmap_write_svg(path, &sc, i == 0 ? ESFT_SCORE_TOKEN : ESFT_SCORE_GATE, &sel[i], &err), &err,
              "heatmap");
        printf("      %s scores, top-p %.2f: %d of %d experts -> %s/config_%s.json, %s\n", score_names[i], o.top_p,
               esft_expert_config_count(&sel[i]), NL * E, o.out, score_names[i], path);
        print_layers(&sel[i]);
        for (l = 0; l < NL; l++)
            for (e = 0; e < E; e++) masks[i][l][e] = (unsigned char)esft_expert_config_has(&sel[i], l + 1, e);
    }
    printf("      done in %.1f s\n", now_s() - t);

    /* ---- 4. fine-tune four ways from the same weights ---- */
    printf("[4/5] fine-tune on %s: %d steps x %d bytes each, AdamW lr %.0e (same schedule for all)\n",
           task_names[o.target], ft_steps, TB, (double)ft_lr);
    one_begin = 0;
    one_end = tr[o.target].n_pos;
    for (i = 1; i <= 4; i++) {
        static const char *names[5] = {"", "ESFT-Token", "ESFT-Gate", "Full fine-tune", "PESC adapters"};
        static const char *what[5] = {"",
                                      "only the token-selected experts train",
                                      "only the gate-selected experts train",
                                      "everything trains",
                                      "model frozen; a PESC adapter layer (8 adapters, top-2, rank 16) after each MoE layer"};
        method how = i <= 2 ? M_ESFT : i == 3 ? M_FULL : M_PESC;
        ocfg.lr = ft_lr;
        run_init(&rn, &md, how, masks[i == 2 ? 1 : 0], &ocfg); /* token or gate selection */
        printf("      %s: %s\n", names[i], what[i]);
        rng_state = 7777u; /* every method sees the same batches */
        t = now_s();
        train(&rn, &a, &tr[o.target], &one_begin, &one_end, &one_share, 1, ft_steps, ft_lr, 0);
        t = now_s() - t;
        res[i] = evaluate_all(names[i], &rn, &a, ev, o.target, max_eval);
        res[i].seconds = t;
        if (how == M_PESC || how == M_FULL) res[i].experts = -1;
        run_free(&rn);
        printf("        trained in %.1f s: %s %.3f bits/byte, general %.3f\n", t, task_names[o.target], res[i].task.bpb,
               res[i].general.bpb);
    }

    /* ---- 5. the table ---- */
    printf("[5/5] results (bits per byte on held-out eval text: lower is better; general = mean over the\n"
           "      other three tasks, so a rise there is forgetting)\n\n");
    printf("| method | %s bpb | general bpb | trainable params | grad + AdamW bytes | fine-tune time |\n",
           task_names[o.target]);
    printf("|---|---:|---:|---:|---:|---:|\n");
    for (i = 0; i < 5; i++) {
        char name[64];
        if (res[i].experts >= 0) snprintf(name, sizeof name, "%s (%d/%d experts)", res[i].name, res[i].experts, NL * E);
        else snprintf(name, sizeof name, "%s", res[i].name);
        if (i == 0)
            printf("| %s | %.3f | %.3f | 0 | 0 | - |\n", name, res[i].task.bpb, res[i].general.bpb);
        else
            printf("| %s | %.3f | %.3f | %lu | %lu | %.1f s |\n", name, res[i].task.bpb, res[i].general.bpb,
                   (unsigned long)res[i].params, (unsigned long)res[i].bytes, res[i].seconds);
    }
    snprintf(path, sizeof path, "%s/results.tsv", o.out);
    f = fopen(path, "w");
    if (f) {
        fprintf(f, "method\ttask\ttask_bpb\ttask_acc\tgeneral_bpb\tgeneral_acc");
        for (k = 0; k < N_TASKS; k++) fprintf(f, "\t%s_bpb", task_names[k]);
        fprintf(f, "\ttrainable_params\tgrad_adam_bytes\tseconds\n");
        for (i = 0; i < 5; i++) {
            fprintf(f, "%s\t%s\t%.4f\t%.4f\t%.4f\t%.4f", res[i].name, task_names[o.target], res[i].task.bpb,
                    res[i].task.acc, res[i].general.bpb, res[i].general.acc);
            for (k = 0; k < N_TASKS; k++) fprintf(f, "\t%.4f", res[i].per_task[k].bpb);
            fprintf(f, "\t%lu\t%lu\t%.2f\n", (unsigned long)res[i].params, (unsigned long)res[i].bytes, res[i].seconds);
        }
        fclose(f);
    }
    printf("\nper task (bpb):");
    for (k = 0; k < N_TASKS; k++) printf("  %s", task_names[k]);
    printf("\n");
    for (i = 0; i < 5; i++) {
        printf("  %-28s", res[i].name);
        for (k = 0; k < N_TASKS; k++) printf("  %.3f", res[i].per_task[k].bpb);
        printf("\n");
    }
    printf("\noutputs in %s/: summary.json, config_token.json, config_gate.json, heatmap_token.svg,\n"
           "heatmap_gate.svg, results.tsv. Total %.1f s.\n", o.out, now_s() - t0);

    for (i = 0; i < 2; i++) esft_expert_config_free(&sel[i]);
    esft_scores_free(&sc);
    esft_stats_uninit(&st);
    for (l = 0; l < NL; l++) free(a.ws[l]);
    for (k = 0; k < N_TASKS; k++) {
        free_text(&tr[k]);
        free_text(&ev[k]);
    }
    free_text(&mix);
    model_free(&md);
    return 0;
}
