/* demo.c - the end-to-end demo behind `make run`: ESFT and PESC on a tiny
   byte-level Mixture-of-Experts language model, trained on real ESFT task text,
   CPU only, a few minutes on 2 cores.

   Build and run (from the repository root; -fopenmp optional):
       cc -O2 examples/demo.c -o demo -lm && ./demo            (or: make run)
       ./demo --quick                                          (CI size, seconds)
       ./demo --help

   What it does (docs/demo.md has the details and the numbers):
     1. reads the vendored task text data/text/<task>.{train,eval}.jsonl
        (slices of the datasets the ESFT authors ship; data/README.md) with the
        header's JSON reader;
     2. pre-trains the model on a mix of the four tasks (everything trainable);
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
#include "../esft.h"

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
    E = 16,      /* routed experts per layer */
    K = 2,       /* experts per token */
    F = 32,      /* hidden width of one routed expert */
    FS = 32,     /* hidden width of the shared expert */
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

/* c (M, N) += a (M, Kd) b (Kd, N) */
static void mm_nn(float *c, const float *a, const float *b, int M, int N, int Kd)
{
    int i;
    DEMO_PARALLEL_FOR
    for (i = 0; i < M; i++) {
        float *ci = c + (size_t)i * N;
        int j, k;
        for (k = 0; k < Kd; k++) {
            const float aik = a[(size_t)i * Kd + k], *bk = b + (size_t)k * N;
            for (j = 0; j < N; j++) ci[j] += aik * bk[j];
        }
    }
}

/* c (M, N) += a^T b, a (T, M), b (T, N): a weight gradient dW += dy^T x */
static void mm_tn(float *c, const float *a, const float *b, int M, int N, int T)
{
    int i;
    DEMO_PARALLEL_FOR
    for (i = 0; i < M; i++) {
        float *ci = c + (size_t)i * N;
        int j, t;
        for (t = 0; t < T; t++) {
            const float ati = a[(size_t)t * M + i], *bt = b + (size_t)t * N;
            if (ati == 0.0f) continue;
            for (j = 0; j < N; j++) ci[j] += ati * bt[j];
        }
    }
}

/* wt (Kd, N) = w^T, w (N, Kd): x w^T is then mm_nn(x, wt) with a vector inner loop */
static void transpose(float *wt, const float *w, int N, int Kd)
{
    int i, k;
    for (i = 0; i < N; i++)
        for (k = 0; k < Kd; k++) wt[(size_t)k * N + i] = w[(size_t)i * Kd + k];
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
        check(esft_moe_forward(a->f[l], &aux, a->n[l], &rn->moe[l], a->ws[l], a->ws_bytes, T, &err), &err,
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
        mm_tn(dd + OFF_WOUT, a->dlogits, a->o, V, D, T);
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
        check(esft_moe_backward(a->dn, &rn->moe[l], dy, a->n[l], a->ws[l], a->ws_bytes, T, &err), &err,
              "MoE backward");
        rms_backward(a->dh, a->dn, a->n[l], a->r[l], T);
    }
    if (!dd) return; /* embedding and projection frozen: nothing below needs dh */
    mm_tn(dd + OFF_WIN, a->dh, a->x0, D, DIN, T);
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
   picks one of the n_parts ranges of tx->pos uniformly (a task of the mix),
   then a position in it. Prints the loss now and then. */
static void train(run *rn, acts *a, const text *tx, const size_t *part_begin, const size_t *part_end, int n_parts,
                  int n_steps, float peak_lr, int verbose)
{
    int32_t pos[TB];
    int s, t, print_every = n_steps / 4 > 0 ? n_steps / 4 : 1;
    double avg = 0.0;
    for (s = 0; s < n_steps; s++) {
        double aux, loss;
        long correct = 0;
        for (t = 0; t < TB; t++) {
            int k = (int)(rng_next() % (unsigned long long)n_parts);
            size_t n = part_end[k] - part_begin[k];
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
