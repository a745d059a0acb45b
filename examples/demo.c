/* demo.c - the end-to-end demo behind `make run`: ESFT on a small Hugging Face
   MoE checkpoint (qwen2_moe: attention + routed experts + a gated shared
   expert, byte-level vocabulary) that the demo writes, pre-trains on real ESFT
   task text and then fine-tunes five ways, on the CPU, in a few minutes
   (--quick: seconds).

   Build and run (from the repository root; -fopenmp optional):
       cc -O2 -I. examples/demo.c -o demo -lm && ./demo            (or: make run)
       ./demo --quick                                          (CI size, seconds)
       ./demo --help

   What it does (docs/demo.md has the details and the numbers):
     1. reads the vendored task text data/text/<task>.{train,eval}.jsonl
        (slices of the datasets the ESFT authors ship; data/README.md);
     2. writes two checkpoint directories (config.json + model.safetensors,
        random init): a qwen2_moe model and its dense twin (qwen2, the same
        attention, one dense MLP as wide as the MoE layer's active experts);
        pre-trains each with the library's full fine-tune (esft_train_spec
        ESFT_TRAIN_FFT) on a mix of the four tasks and writes the result back
        as a checkpoint directory (esft_model_trainable_save +
        esft_checkpoint_merge): out/base and out/dense_base, which transformers
        loads;
     3. runs the target task's training text through out/base with
        esft_model_run.stats, writes summary.json, selects experts by token and
        gate score (esft_select_top_p), writes the expert configs and heatmaps;
     4. fine-tunes from the same weights with the same batches: ESFT-Token,
        ESFT-Gate, full fine-tune, LoRA on attention, and PESC on the dense twin;
     5. prints the table (bits per byte on the target task and on the other
        tasks, trainable parameters, gradient + AdamW bytes, time), and merges
        the ESFT-Token experts into out/merged, a full checkpoint directory.

   Everything is seeded: the numbers are the same on every run and for any
   thread count. */
#define _POSIX_C_SOURCE 200809L
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* ---------------------------------------------------------------------- */
/* sizes                                                                  */
/* ---------------------------------------------------------------------- */

enum {
    V = 256,        /* bytes: the vocabulary, no tokenizer */
    SEQ = 128,      /* bytes per training sequence */
    BATCH = 4,      /* sequences per optimizer step */
    EVAL_T = SEQ,   /* bytes per evaluation and statistics window: the length trained */
    N_TASKS = 4,
    N_ROWS = 6      /* table rows: pre-trained + five fine-tunes */
};

static const char *const task_names[N_TASKS] = {"intent", "law", "summary", "translation"};

/* The shape of both checkpoints. The dense twin's MLP width is the MoE
   layer's active width (K routed experts + the shared one), so both spend
   about the same compute per token. */
typedef struct shape {
    int d_model, n_layers, n_heads, n_kv_heads, head_dim;
    int n_experts, top_k, d_expert, d_shared;
    int max_positions;
} shape;

static shape demo_shape(void)
{
    shape s;
    s.d_model = 64;
    s.n_layers = 2;
    s.n_heads = 4;
    s.n_kv_heads = 2;
    s.head_dim = 16;
    s.n_experts = 32;
    s.top_k = 2;
    s.d_expert = 32;
    s.d_shared = 64;
    s.max_positions = 8192; /* the longest text a statistics pass runs whole */
    return s;
}

static int dense_width(const shape *s) { return s->top_k * s->d_expert + s->d_shared; }

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
static double rng_unit(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); }

/* Normal(0, std) by Box-Muller: the init transformers uses for Linear and
   Embedding weights (initializer_range). */
static float rng_normal(float std)
{
    double u1 = rng_unit(), u2 = rng_unit();
    if (u1 < 1e-300) u1 = 1e-300;
    return std * (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
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

static FILE *open_out(const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "demo: cannot write %s\n", path);
        exit(1);
    }
    return f;
}

/* ---------------------------------------------------------------------- */
/* data: data/text/<task>.{train,eval}.jsonl                              */
/* ---------------------------------------------------------------------- */

/* A task's text: records one after another, each preceded by one zero byte
   (the model's "start of text"). */
typedef struct text {
    unsigned char *buf;
    size_t n, cap;
    size_t *start, *len;      /* (n_samples) where each record's bytes are (after its zero byte) */
    int n_samples;
} text;

static void text_append(text *tx, const char *s, size_t n)
{
    size_t i;
    if (tx->n + n + 1 > tx->cap) {
        tx->cap = 2 * (tx->n + n + 1) + 4096;
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
        text_append(tx, "", 1); /* the zero byte that starts a record */
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
    return tx->n_samples > 0 && tx->n > SEQ;
}

static void free_text(text *tx)
{
    free(tx->buf);
    free(tx->start);
    free(tx->len);
}

/* ---------------------------------------------------------------------- */
/* the checkpoints: config.json and random-init model.safetensors         */
/* ---------------------------------------------------------------------- */

/* config.json as transformers writes it for Qwen2MoeForCausalLM (moe = 1) or
   Qwen2ForCausalLM (moe = 0): the fields esft_model_config_parse reads and
   the ones transformers needs to build the model. No tokenizer: ids are bytes. */
static void write_config(const char *dir, const shape *s, int moe)
{
    char path[1200];
    FILE *f;
    int l;
    snprintf(path, sizeof path, "%s/config.json", dir);
    f = open_out(path);
    fprintf(f, "{\n  \"architectures\": [\"%s\"],\n  \"model_type\": \"%s\",\n",
            moe ? "Qwen2MoeForCausalLM" : "Qwen2ForCausalLM", moe ? "qwen2_moe" : "qwen2");
    fprintf(f, "  \"vocab_size\": %d,\n  \"hidden_size\": %d,\n  \"num_hidden_layers\": %d,\n"
               "  \"num_attention_heads\": %d,\n  \"num_key_value_heads\": %d,\n  \"hidden_act\": \"silu\",\n"
               "  \"max_position_embeddings\": %d,\n  \"rms_norm_eps\": 1e-06,\n  \"rope_theta\": 10000.0,\n"
               "  \"rope_scaling\": null,\n  \"tie_word_embeddings\": false,\n  \"attention_dropout\": 0.0,\n"
               "  \"initializer_range\": 0.02,\n  \"use_sliding_window\": false,\n  \"sliding_window\": null,\n"
               "  \"max_window_layers\": %d,\n  \"use_cache\": true,\n  \"bos_token_id\": 0,\n"
               "  \"eos_token_id\": 0,\n  \"pad_token_id\": null,\n  \"dtype\": \"float32\",\n  \"layer_types\": [",
            V, s->d_model, s->n_layers, s->n_heads, s->n_kv_heads, s->max_positions, s->n_layers);
    for (l = 0; l < s->n_layers; l++) fprintf(f, "%s\"full_attention\"", l ? ", " : "");
    fprintf(f, "],\n");
    if (moe)
        fprintf(f, "  \"qkv_bias\": true,\n  \"intermediate_size\": %d,\n  \"moe_intermediate_size\": %d,\n"
                   "  \"shared_expert_intermediate_size\": %d,\n  \"num_experts\": %d,\n"
                   "  \"num_experts_per_tok\": %d,\n  \"norm_topk_prob\": true,\n  \"decoder_sparse_step\": 1,\n"
                   "  \"mlp_only_layers\": [],\n  \"output_router_logits\": false,\n"
                   "  \"router_aux_loss_coef\": 0.001\n}\n",
                dense_width(s), s->d_expert, s->d_shared, s->n_experts, s->top_k);
    else
        fprintf(f, "  \"intermediate_size\": %d\n}\n", dense_width(s));
    if (fclose(f) != 0) { fprintf(stderr, "demo: cannot write %s\n", path); exit(1); }
}

/* The tensors of a checkpoint being built: names, shapes, fp32 values. */
typedef struct tensor_list {
    esft_st_write_tensor *t;
    char (*names)[128];
    int n, cap;
} tensor_list;

typedef enum init_kind { INIT_NORMAL, INIT_ONES, INIT_ZEROS } init_kind;

/* Adds one tensor (rows, cols; rows 0 = a vector of cols) named prefix+name. */
static void add_tensor(tensor_list *tl, const char *prefix, const char *name, int rows, int cols, init_kind init)
{
    esft_st_write_tensor *t;
    size_t n = (size_t)(rows ? rows : 1) * (size_t)cols, i;
    float *v = NEW(float, n);
    if (tl->n == tl->cap) {
        tl->cap = 2 * tl->cap + 64;
        tl->t = (esft_st_write_tensor *)realloc(tl->t, (size_t)tl->cap * sizeof *tl->t);
        tl->names = (char(*)[128])realloc(tl->names, (size_t)tl->cap * sizeof *tl->names);
        if (!tl->t || !tl->names) { fprintf(stderr, "demo: out of memory\n"); exit(1); }
    }
    snprintf(tl->names[tl->n], sizeof tl->names[tl->n], "%s%s", prefix, name);
    for (i = 0; i < n; i++) v[i] = init == INIT_NORMAL ? rng_normal(0.02f) : init == INIT_ONES ? 1.0f : 0.0f;
    t = &tl->t[tl->n++];
    memset(t, 0, sizeof *t);
    t->dtype = ESFT_DTYPE_F32;
    t->n_dims = rows ? 2 : 1;
    t->shape[0] = rows ? rows : cols;
    t->shape[1] = cols;
    t->f32 = v;
}

/* Layer l's attention (Qwen2: GQA, q/k/v with bias, o without) and norms. */
static void add_attention(tensor_list *tl, const char *p, const shape *s)
{
    int D = s->d_model, q = s->n_heads * s->head_dim, kv = s->n_kv_heads * s->head_dim;
    add_tensor(tl, p, "input_layernorm.weight", 0, D, INIT_ONES);
    add_tensor(tl, p, "self_attn.q_proj.weight", q, D, INIT_NORMAL);
    add_tensor(tl, p, "self_attn.q_proj.bias", 0, q, INIT_ZEROS);
    add_tensor(tl, p, "self_attn.k_proj.weight", kv, D, INIT_NORMAL);
    add_tensor(tl, p, "self_attn.k_proj.bias", 0, kv, INIT_ZEROS);
    add_tensor(tl, p, "self_attn.v_proj.weight", kv, D, INIT_NORMAL);
    add_tensor(tl, p, "self_attn.v_proj.bias", 0, kv, INIT_ZEROS);
    add_tensor(tl, p, "self_attn.o_proj.weight", D, q, INIT_NORMAL);
    add_tensor(tl, p, "post_attention_layernorm.weight", 0, D, INIT_ONES);
}

/* Layer l's FFN: Qwen2-MoE's router, per-expert SwiGLUs (the names of the
   released checkpoints), shared expert and its gate; or a dense SwiGLU. */
static void add_ffn(tensor_list *tl, const char *p, const shape *s, int moe)
{
    int D = s->d_model, e;
    char name[128];
    if (!moe) {
        add_tensor(tl, p, "mlp.gate_proj.weight", dense_width(s), D, INIT_NORMAL);
        add_tensor(tl, p, "mlp.up_proj.weight", dense_width(s), D, INIT_NORMAL);
        add_tensor(tl, p, "mlp.down_proj.weight", D, dense_width(s), INIT_NORMAL);
        return;
    }
    add_tensor(tl, p, "mlp.gate.weight", s->n_experts, D, INIT_NORMAL);
    for (e = 0; e < s->n_experts; e++) {
        snprintf(name, sizeof name, "mlp.experts.%d.gate_proj.weight", e);
        add_tensor(tl, p, name, s->d_expert, D, INIT_NORMAL);
        snprintf(name, sizeof name, "mlp.experts.%d.up_proj.weight", e);
        add_tensor(tl, p, name, s->d_expert, D, INIT_NORMAL);
        snprintf(name, sizeof name, "mlp.experts.%d.down_proj.weight", e);
        add_tensor(tl, p, name, D, s->d_expert, INIT_NORMAL);
    }
    add_tensor(tl, p, "mlp.shared_expert.gate_proj.weight", s->d_shared, D, INIT_NORMAL);
    add_tensor(tl, p, "mlp.shared_expert.up_proj.weight", s->d_shared, D, INIT_NORMAL);
    add_tensor(tl, p, "mlp.shared_expert.down_proj.weight", D, s->d_shared, INIT_NORMAL);
    add_tensor(tl, p, "mlp.shared_expert_gate.weight", 1, D, INIT_NORMAL);
}

/* dir/config.json and dir/model.safetensors with transformers' init: normal
   weights of std initializer_range (0.02), norms 1, biases 0. */
static void write_init_checkpoint(const char *dir, const shape *s, int moe)
{
    tensor_list tl;
    esft_error err;
    char path[1200], p[64];
    int l, i;
    memset(&tl, 0, sizeof tl);
    make_dirs(dir);
    write_config(dir, s, moe);
    add_tensor(&tl, "", "model.embed_tokens.weight", V, s->d_model, INIT_NORMAL);
    for (l = 0; l < s->n_layers; l++) {
        snprintf(p, sizeof p, "model.layers.%d.", l);
        add_attention(&tl, p, s);
        add_ffn(&tl, p, s, moe);
    }
    add_tensor(&tl, "", "model.norm.weight", 0, s->d_model, INIT_ONES);
    add_tensor(&tl, "", "lm_head.weight", V, s->d_model, INIT_NORMAL);
    for (i = 0; i < tl.n; i++) tl.t[i].name = tl.names[i];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    check(esft_safetensors_write(path, tl.t, tl.n, NULL, NULL, 0, &err), &err, "writing the initial checkpoint");
    for (i = 0; i < tl.n; i++) free((void *)tl.t[i].f32);
    free(tl.t);
    free(tl.names);
}

/* ---------------------------------------------------------------------- */
/* training                                                               */
/* ---------------------------------------------------------------------- */

/* Where training batches come from: n_parts texts, part k drawn with
   probability share[k] (they sum to 1). */
typedef struct sampler {
    const text *parts;
    const double *share;
    int n_parts;
} sampler;

/* One sequence of SEQ bytes at a random place of a randomly drawn part. */
static void sample_sequence(const sampler *sp, int32_t *ids)
{
    double u = rng_unit(), acc = 0.0;
    const text *tx;
    size_t start;
    int k, t;
    for (k = 0; k < sp->n_parts - 1; k++) {
        acc += sp->share[k];
        if (u < acc) break;
    }
    tx = &sp->parts[k];
    start = (size_t)(rng_next() % (unsigned long long)(tx->n - SEQ + 1));
    for (t = 0; t < SEQ; t++) ids[t] = tx->buf[start + t];
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

/* A trainable set and its optimizer. */
typedef struct trainer {
    esft_model_trainable tr;
    esft_adamw opt;
} trainer;

static void trainer_init(trainer *t, const esft_model *m, const esft_train_spec *spec, float weight_decay)
{
    esft_adamw_config ac = esft_adamw_config_init();
    esft_error err;
    ac.weight_decay = weight_decay;
    check(esft_model_trainable_init_spec(&t->tr, m, spec, NULL, &err), &err, "trainable set");
    check(esft_adamw_init(&t->opt, &ac, t->tr.n_params, NULL, &err), &err, "AdamW");
}

static void trainer_uninit(trainer *t)
{
    esft_adamw_uninit(&t->opt);
    esft_model_trainable_uninit(&t->tr);
}

/* Gradient + AdamW state: what training holds beyond the weights. */
static size_t trainer_bytes(const trainer *t) { return t->tr.n_params * sizeof(float) + esft_adamw_state_bytes(&t->opt); }

/* n_steps AdamW steps, each on BATCH sequences of the sampler: the gradient of
   the batch's mean loss, clipped at global norm 1. Returns the last steps'
   smoothed loss (nats). */
static double train(const esft_model *m, trainer *t, const sampler *sp, int n_steps, float peak_lr, int verbose)
{
    int32_t ids[BATCH][SEQ];
    float *grads = t->tr.grads;
    size_t n_params = t->tr.n_params;
    esft_error err;
    int s, b, print_every = n_steps / 4 > 0 ? n_steps / 4 : 1;
    double avg = 0.0;
    for (s = 0; s < n_steps; s++) {
        double loss = 0.0;
        int64_t n = 0;
        for (b = 0; b < BATCH; b++) sample_sequence(sp, ids[b]);
        memset(grads, 0, n_params * sizeof(float));
        for (b = 0; b < BATCH; b++) {
            double l;
            int64_t k;
            /* labels = ids: position t predicts byte t+1 (Hugging Face's shift) */
            check(esft_model_forward_backward(m, &t->tr, ids[b], ids[b], SEQ, 1.0f / (float)(BATCH * (SEQ - 1)), &l,
                                              &k, &err),
                  &err, "forward/backward");
            loss += l;
            n += k;
        }
        check(esft_clip_grad_norm(&grads, &n_params, 1, 1.0f, NULL, &err), &err, "clipping");
        t->opt.cfg.lr = lr_at(peak_lr, s, n_steps);
        check(esft_adamw_step(&t->opt, t->tr.params, grads, &err), &err, "AdamW step");
        loss /= (double)n;
        avg = s == 0 ? loss : 0.9 * avg + 0.1 * loss;
        if (verbose && (s % print_every == 0 || s == n_steps - 1))
            printf("      step %4d/%d  train loss %.3f bits/byte (smoothed %.3f)\n", s + 1, n_steps, loss / log(2.0),
                   avg / log(2.0));
    }
    return avg;
}

/* ---------------------------------------------------------------------- */
/* evaluation and router statistics                                       */
/* ---------------------------------------------------------------------- */

typedef struct score {
    double bpb;  /* bits per byte: mean -log2 p(next byte); lower is better */
    double acc;  /* next-byte top-1 accuracy */
    double nats; /* mean loss in nats, as `esft eval` prints it */
} score;

/* Windows of EVAL_T bytes over the first max_bytes of tx (every byte of a
   window but the first is scored): the held-out text as the model sees it. */
static int n_windows(const text *tx, size_t max_bytes)
{
    size_t n = tx->n < max_bytes ? tx->n : max_bytes;
    return (int)((n + EVAL_T - 2) / (EVAL_T - 1));
}

/* Window w: its first byte and length (consecutive windows share one byte, so
   every byte after the first is predicted once). */
static void window_at(const text *tx, size_t max_bytes, int w, size_t *first, int *T)
{
    size_t n = tx->n < max_bytes ? tx->n : max_bytes, a = (size_t)w * (EVAL_T - 1);
    *first = a;
    *T = (int)(n - a < (size_t)EVAL_T ? n - a : (size_t)EVAL_T);
}

/* Scores the model (with tr's training when tr is not NULL) on tx. */
static score evaluate(const esft_model *m, const esft_model_trainable *tr, const text *tx, size_t max_bytes)
{
    static int32_t ids[EVAL_T];
    static float logits[EVAL_T * V];
    esft_model_run run;
    esft_error err;
    double nats = 0.0;
    int64_t n = 0, correct = 0;
    int w, t, v, T;
    score sc;
    memset(&run, 0, sizeof run);
    run.labels = ids;
    run.logits = logits;
    run.trainable = tr;
    for (w = 0; w < n_windows(tx, max_bytes); w++) {
        size_t first;
        double l;
        int64_t k;
        window_at(tx, max_bytes, w, &first, &T);
        if (T < 2) continue;
        for (t = 0; t < T; t++) ids[t] = tx->buf[first + t];
        check(esft_model_forward(m, ids, T, &run, &l, &k, &err), &err, "evaluation forward");
        nats += l;
        n += k;
        for (t = 0; t + 1 < T; t++) {
            const float *row = logits + (size_t)t * V;
            int best = 0;
            for (v = 1; v < V; v++) if (row[v] > row[best]) best = v;
            correct += best == ids[t + 1];
        }
    }
    sc.nats = nats / (double)n;
    sc.bpb = sc.nats / log(2.0);
    sc.acc = (double)correct / (double)n;
    return sc;
}

/* The windows evaluate() scores, as esft_dataset JSONL (labels = the ids), so
   `esft eval DIR --data FILE` computes the same loss. */
static void write_eval_jsonl(const char *path, const text *tx, size_t max_bytes)
{
    FILE *f = open_out(path);
    int w, t, T;
    for (w = 0; w < n_windows(tx, max_bytes); w++) {
        size_t first;
        window_at(tx, max_bytes, w, &first, &T);
        if (T < 2) continue;
        fprintf(f, "{\"input_ids\": [");
        for (t = 0; t < T; t++) fprintf(f, "%s%d", t ? ", " : "", tx->buf[first + t]);
        fprintf(f, "]}\n");
    }
    if (fclose(f) != 0) { fprintf(stderr, "demo: cannot write %s\n", path); exit(1); }
}

/* The first max_bytes of tx through the model in the windows evaluate()
   scores, one statistics sample per window, every token counted (ESFT's
   scoring counted every token of whole samples; the model here has only seen
   positions below SEQ, so longer texts go in windows of that length). */
static void collect_stats(const esft_model *m, const text *tx, size_t max_bytes, esft_stats *st)
{
    int32_t ids[EVAL_T];
    esft_model_run run;
    esft_error err;
    int w, t, T;
    memset(&run, 0, sizeof run);
    run.stats = st;
    for (w = 0; w < n_windows(tx, max_bytes); w++) {
        size_t first;
        window_at(tx, max_bytes, w, &first, &T);
        for (t = 0; t < T; t++) ids[t] = tx->buf[first + t];
        check(esft_model_forward(m, ids, T, &run, NULL, NULL, &err), &err, "statistics forward");
    }
}

/* ---------------------------------------------------------------------- */
/* the pipeline                                                           */
/* ---------------------------------------------------------------------- */

typedef struct options {
    int quick, threads, target, pre_steps, ft_steps;
    const char *data, *out;
    double top_p, pre_lr, ft_lr, target_share;
} options;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: demo [--quick] [--task NAME] [--top-p P] [--data DIR] [--out DIR] [--threads N]\n"
            "\n"
            "ESFT end to end on a small Hugging Face MoE checkpoint (qwen2_moe, byte-level,\n"
            "CPU only): writes and pre-trains it and its dense twin (qwen2) on the ESFT\n"
            "authors' task text (intent, law, summary, translation) as checkpoint\n"
            "directories; collects router statistics on the target task; selects experts\n"
            "by token and gate score (top-p); fine-tunes five ways from the same weights\n"
            "and batches (ESFT-Token, ESFT-Gate, full, LoRA; PESC on the dense twin) and\n"
            "prints the comparison table; merges the ESFT-Token experts into a checkpoint.\n"
            "\n"
            "  --quick        CI size: few steps, short evaluation (seconds, not minutes)\n"
            "  --task NAME    target task (default translation)\n"
            "  --top-p P      ESFT selection threshold, 0 < P <= 1 (default 0.25)\n"
            "  --data DIR     the text slices (default data/text)\n"
            "  --out DIR      checkpoints, summary.json, expert configs, heatmaps, results.tsv\n"
            "                 (default build/run)\n"
            "  --threads N    CPU threads (default 1: these matrices are too small to share; the\n"
            "                 numbers do not depend on it)\n"
            "  --pre-steps N, --ft-steps N, --pre-lr LR, --ft-lr LR, --target-share S\n"
            "                 pre-training steps (1000), fine-tuning steps (300), peak learning\n"
            "                 rates (3e-3, 1e-3), the target task's share of the pre-training\n"
            "                 mix (0.1)\n"
            "  -h, --help     this text\n");
}

static int parse_args(options *o, int argc, char **argv)
{
    int i, k;
    memset(o, 0, sizeof *o);
    o->target = 3;
    o->data = "data/text";
    o->out = "build/run";
    o->top_p = 0.25;
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
        else if (v && !strcmp(a, "--pre-lr")) { o->pre_lr = atof(v); i++; }
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
    if (!(o->target_share > 0.0 && o->target_share < 1.0)) {
        fprintf(stderr, "demo: --target-share must be in (0, 1)\n");
        return 0;
    }
    return 1;
}

/* One row of the table. */
typedef struct result {
    char name[64];
    score task, general, per_task[N_TASKS];
    size_t params, bytes;
    double seconds;
} result;

static void evaluate_all(result *r, const esft_model *m, const esft_model_trainable *tr, const text *ev, int target,
                         size_t max_bytes)
{
    int k, n = 0;
    memset(&r->general, 0, sizeof r->general);
    for (k = 0; k < N_TASKS; k++) {
        r->per_task[k] = evaluate(m, tr, &ev[k], max_bytes);
        if (k == target) continue;
        r->general.bpb += r->per_task[k].bpb;
        r->general.acc += r->per_task[k].acc;
        r->general.nats += r->per_task[k].nats;
        n++;
    }
    r->task = r->per_task[target];
    r->general.bpb /= n;
    r->general.acc /= n;
    r->general.nats /= n;
}

/* Pre-trains the checkpoint in init_dir with every parameter trainable
   (the library's FFT) on the mix and writes it to base_dir as a checkpoint
   directory: the trained tensors (esft_model_trainable_save, every one) merged
   into the initial shards (the merge copies config.json too). */
static void pretrain(const char *init_dir, const char *base_dir, const char *trained_path, const sampler *mix,
                     int steps, float lr, const char *what)
{
    esft_model m;
    esft_train_spec spec;
    esft_error err;
    trainer t;
    double t0 = now_s();
    check(esft_model_open(&m, init_dir, NULL, &err), &err, init_dir);
    memset(&spec, 0, sizeof spec);
    spec.method = ESFT_TRAIN_FFT;
    trainer_init(&t, &m, &spec, 0.0f);
    printf("      %s: %lu parameters, every one trainable\n", what, (unsigned long)t.tr.n_params);
    rng_state = 4242u; /* both checkpoints see the same batches */
    train(&m, &t, mix, steps, lr, 1);
    check(esft_model_trainable_save(&t.tr, &m, NULL, trained_path, &err), &err, "saving the pre-trained tensors");
    check(esft_checkpoint_merge(init_dir, trained_path, base_dir, NULL, &err), &err, "merging the pre-trained tensors");
    trainer_uninit(&t);
    esft_model_close(&m);
    printf("        -> %s (config.json + model.safetensors) in %.1f s\n", base_dir, now_s() - t0);
}

/* Fine-tunes one way: the trainable set of spec over m, the target task's
   batches (the sampler re-seeded: every method sees the same ones), then
   every eval text. With keep, the trained set stays in *keep (the caller
   uninits it); without, it is freed here. */
static void fine_tune(result *r, const esft_model *m, const esft_train_spec *spec, const sampler *task,
                      const options *o, int steps, float lr, const text *ev, size_t max_eval, trainer *keep)
{
    trainer own, *t = keep ? keep : &own;
    double t0;
    trainer_init(t, m, spec, 0.0f);
    rng_state = 7777u;
    t0 = now_s();
    train(m, t, task, steps, lr, 0);
    r->seconds = now_s() - t0;
    r->params = t->tr.n_params;
    r->bytes = trainer_bytes(t);
    evaluate_all(r, m, &t->tr, ev, o->target, max_eval);
    printf("        %-14s trained in %5.1f s: %s %.3f bits/byte, general %.3f\n", r->name, r->seconds,
           task_names[o->target], r->task.bpb, r->general.bpb);
    if (!keep) trainer_uninit(t);
}

static void print_layers(const esft_expert_config *cfg)
{
    int l, i;
    for (l = 0; l < cfg->n_layers; l++) {
        if (cfg->offset[l] == cfg->offset[l + 1]) continue;
        printf("        layer %d: experts", l);
        for (i = cfg->offset[l]; i < cfg->offset[l + 1]; i++) printf(" %d", (int)cfg->ids[i]);
        printf("\n");
    }
}

static void print_table(const result *res, int n, const options *o)
{
    int i, k;
    printf("| method | %s bpb | general bpb | trainable params | grad + AdamW bytes | fine-tune time |\n",
           task_names[o->target]);
    printf("|---|---:|---:|---:|---:|---:|\n");
    for (i = 0; i < n; i++) {
        if (res[i].seconds == 0.0)
            printf("| %s | %.3f | %.3f | 0 | 0 | - |\n", res[i].name, res[i].task.bpb, res[i].general.bpb);
        else
            printf("| %s | %.3f | %.3f | %lu | %lu | %.1f s |\n", res[i].name, res[i].task.bpb, res[i].general.bpb,
                   (unsigned long)res[i].params, (unsigned long)res[i].bytes, res[i].seconds);
    }
    printf("\nper task (bpb):             ");
    for (k = 0; k < N_TASKS; k++) printf("  %11s", task_names[k]);
    printf("\n");
    for (i = 0; i < n; i++) {
        printf("  %-26s", res[i].name);
        for (k = 0; k < N_TASKS; k++) printf("  %11.3f", res[i].per_task[k].bpb);
        printf("\n");
    }
}

static void write_results(const char *path, const result *res, int n, const options *o)
{
    FILE *f = open_out(path);
    int i, k;
    fprintf(f, "method\ttask\ttask_bpb\ttask_acc\tgeneral_bpb\tgeneral_acc");
    for (k = 0; k < N_TASKS; k++) fprintf(f, "\t%s_bpb", task_names[k]);
    fprintf(f, "\ttask_nats\ttrainable_params\tgrad_adam_bytes\tseconds\n");
    for (i = 0; i < n; i++) {
        fprintf(f, "%s\t%s\t%.4f\t%.4f\t%.4f\t%.4f", res[i].name, task_names[o->target], res[i].task.bpb,
                res[i].task.acc, res[i].general.bpb, res[i].general.acc);
        for (k = 0; k < N_TASKS; k++) fprintf(f, "\t%.4f", res[i].per_task[k].bpb);
        fprintf(f, "\t%.8f\t%lu\t%lu\t%.2f\n", res[i].task.nats, (unsigned long)res[i].params,
                (unsigned long)res[i].bytes, res[i].seconds);
    }
    if (fclose(f) != 0) { fprintf(stderr, "demo: cannot write %s\n", path); exit(1); }
}

/* PESC on the dense twin: Camelidae's adapter MoE after each frozen dense MLP
   (8 adapters, top-2, rank 16, scale 0.25, aux alpha 0.01; upcycled, so the
   model equals the dense base at step 0). */
static void pesc_row(result *r, const char *dense_dir, const sampler *task, const options *o, int steps, float lr,
                     const text *ev, size_t max_eval)
{
    esft_model dm;
    esft_train_spec spec;
    esft_error err;
    check(esft_model_open(&dm, dense_dir, NULL, &err), &err, dense_dir);
    memset(&spec, 0, sizeof spec);
    spec.method = ESFT_TRAIN_PESC;
    spec.pesc = esft_pesc_config_init(dm.cfg.d_model, 8, 2, 16);
    spec.pesc.scale = 0.25f;
    spec.pesc.aux_alpha = 0.01f;
    spec.seed = 1;
    fine_tune(r, &dm, &spec, task, o, steps, lr, ev, max_eval, NULL);
    esft_model_close(&dm);
}

int main(int argc, char **argv)
{
    options o;
    shape sh = demo_shape();
    text tr[N_TASKS], ev[N_TASKS];
    double share[N_TASKS], one = 1.0;
    sampler mix, task;
    esft_model m;
    esft_stats st;
    esft_scores sc;
    esft_expert_config sel[2];
    esft_train_spec spec;
    esft_error err;
    result res[N_ROWS + 1];
    trainer keep;
    char path[1200], dir[1200], dense_dir[1200], base_dir[1200];
    double t0 = now_s(), t;
    float pre_lr, ft_lr;
    int k, i, pre_steps, ft_steps, n_res = 0;
    size_t max_eval;
    const char *score_names[2] = {"token", "gate"};

    if (!parse_args(&o, argc, argv)) return 2;
    setvbuf(stdout, NULL, _IOLBF, 0); /* progress shows through a pipe (make run | tee) */
    esft_set_num_threads(o.threads > 0 ? o.threads : 1);
    pre_steps = o.pre_steps > 0 ? o.pre_steps : o.quick ? 60 : 1000;
    ft_steps = o.ft_steps > 0 ? o.ft_steps : o.quick ? 20 : 300;
    pre_lr = o.pre_lr > 0.0 ? (float)o.pre_lr : 3e-3f;
    ft_lr = o.ft_lr > 0.0 ? (float)o.ft_lr : 1e-3f;
    max_eval = o.quick ? 2048 : (size_t)-1;
    memset(res, 0, sizeof res);

    printf("esft demo: ESFT vs full fine-tuning vs LoRA vs PESC on a small Hugging Face MoE checkpoint%s\n",
           o.quick ? " (--quick)" : "");
    printf("[1/6] data: %s/<task>.{train,eval}.jsonl (slices of the ESFT authors' datasets)\n", o.data);
    for (k = 0; k < N_TASKS; k++) {
        snprintf(path, sizeof path, "%s/%s.train.jsonl", o.data, task_names[k]);
        if (!load_text(&tr[k], path)) return 1;
        snprintf(path, sizeof path, "%s/%s.eval.jsonl", o.data, task_names[k]);
        if (!load_text(&ev[k], path)) return 1;
        printf("      %-12s train %3d texts %6lu bytes | eval %d texts %6lu bytes%s\n", task_names[k],
               tr[k].n_samples, (unsigned long)tr[k].n, ev[k].n_samples, (unsigned long)ev[k].n,
               k == o.target ? "   <- target task" : "");
        share[k] = k == o.target ? o.target_share : (1.0 - o.target_share) / (N_TASKS - 1);
    }
    mix.parts = tr;
    mix.share = share;
    mix.n_parts = N_TASKS;
    task.parts = &tr[o.target];
    task.share = &one;
    task.n_parts = 1;

    /* ---- 2. the checkpoints, pre-trained ---- */
    make_dirs(o.out);
    snprintf(base_dir, sizeof base_dir, "%s/base", o.out);
    snprintf(dense_dir, sizeof dense_dir, "%s/dense_base", o.out);
    printf("[2/6] pre-train: qwen2_moe (%d layers, hidden %d, GQA %d/%d heads of %d, %d experts of width %d,\n"
           "      top-%d, shared expert %d) and its dense twin qwen2 (MLP width %d), byte vocabulary; %d steps\n"
           "      x %d sequences of %d bytes, AdamW lr %.0e, the same batches for both; the mix: %s %.0f %%,\n"
           "      each other task %.0f %%\n",
           sh.n_layers, sh.d_model, sh.n_heads, sh.n_kv_heads, sh.head_dim, sh.n_experts, sh.d_expert, sh.top_k,
           sh.d_shared, dense_width(&sh), pre_steps, BATCH, SEQ, (double)pre_lr, task_names[o.target],
           100.0 * o.target_share, 100.0 * (1.0 - o.target_share) / (N_TASKS - 1));
    rng_state = 20240702u;
    snprintf(dir, sizeof dir, "%s/init/qwen2_moe", o.out);
    write_init_checkpoint(dir, &sh, 1);
    snprintf(path, sizeof path, "%s/init/qwen2_moe.trained.safetensors", o.out);
    pretrain(dir, base_dir, path, &mix, pre_steps, pre_lr, "qwen2_moe");
    snprintf(dir, sizeof dir, "%s/init/qwen2", o.out);
    write_init_checkpoint(dir, &sh, 0);
    snprintf(path, sizeof path, "%s/init/qwen2.trained.safetensors", o.out);
    pretrain(dir, dense_dir, path, &mix, pre_steps, pre_lr, "qwen2 (dense twin)");

    /* ---- 3. router statistics on the target task, selection ---- */
    t = now_s();
    check(esft_model_open(&m, base_dir, NULL, &err), &err, base_dir);
    snprintf(res[n_res].name, sizeof res[n_res].name, "pre-trained (no fine-tune)");
    evaluate_all(&res[n_res++], &m, NULL, ev, o.target, max_eval);
    check(esft_stats_init(&st, m.cfg.n_layers, m.cfg.route.n_experts, m.cfg.route.top_k, NULL), NULL, "stats");
    collect_stats(&m, &tr[o.target], o.quick ? 8192 : (size_t)-1, &st);
    check(esft_stats_scores(&st, ESFT_NORM_POOLED, &sc), NULL, "scores");
    snprintf(path, sizeof path, "%s/summary.json", o.out);
    check(esft_scores_write_json(path, &sc, 4, &err), &err, "summary.json");
    esft_scores_round(&sc, 4); /* select from the scores as written, as ESFT does */
    printf("[3/6] router statistics of %s on %s's training text: %lu windows of %d bytes,\n"
           "      %lu bytes routed per layer -> %s\n",
           base_dir, task_names[o.target], (unsigned long)st.n_samples[0], EVAL_T, (unsigned long)st.n_tokens[0],
           path);
    for (i = 0; i < 2; i++) {
        esft_score which = i == 0 ? ESFT_SCORE_TOKEN : ESFT_SCORE_GATE;
        check(esft_select_top_p(&sc, which, o.top_p, &sel[i], &err), &err, "select");
        snprintf(path, sizeof path, "%s/config_%s.json", o.out, score_names[i]);
        check(esft_expert_config_write(path, &sel[i], &err), &err, "expert config");
        snprintf(path, sizeof path, "%s/heatmap_%s.svg", o.out, score_names[i]);
        check(esft_heatmap_write_svg(path, &sc, which, &sel[i], &err), &err, "heatmap");
        printf("      %s scores, top-p %.2f: %d of %d experts -> %s/config_%s.json, %s\n", score_names[i], o.top_p,
               esft_expert_config_count(&sel[i]), sh.n_layers * sh.n_experts, o.out, score_names[i], path);
        print_layers(&sel[i]);
    }
    printf("      done in %.1f s\n", now_s() - t);

    /* ---- 4. five fine-tunes from the same weights and batches ---- */
    printf("[4/6] fine-tune on %s: %d steps x %d sequences of %d bytes each, AdamW lr %.0e, warm-up + cosine,\n"
           "      clipping at 1 (the same batches and schedule for all)\n",
           task_names[o.target], ft_steps, BATCH, SEQ, (double)ft_lr);
    for (i = 0; i < 2; i++) {
        memset(&spec, 0, sizeof spec);
        spec.method = ESFT_TRAIN_ESFT;
        spec.experts = &sel[i];
        snprintf(res[n_res].name, sizeof res[n_res].name, "ESFT-%s (%d/%d experts)", i == 0 ? "Token" : "Gate",
                 esft_expert_config_count(&sel[i]), sh.n_layers * sh.n_experts);
        fine_tune(&res[n_res++], &m, &spec, &task, &o, ft_steps, ft_lr, ev, max_eval, i == 0 ? &keep : NULL);
    }
    memset(&spec, 0, sizeof spec);
    spec.method = ESFT_TRAIN_FFT;
    snprintf(res[n_res].name, sizeof res[n_res].name, "Full fine-tune");
    fine_tune(&res[n_res++], &m, &spec, &task, &o, ft_steps, ft_lr, ev, max_eval, NULL);
    memset(&spec, 0, sizeof spec);
    spec.method = ESFT_TRAIN_LORA;
    spec.lora_rank = 8;
    spec.lora_alpha = 16.0f;
    spec.lora_targets = ESFT_LORA_ATTN;
    spec.seed = 1;
    snprintf(res[n_res].name, sizeof res[n_res].name, "LoRA (attention, r 8)");
    fine_tune(&res[n_res++], &m, &spec, &task, &o, ft_steps, ft_lr, ev, max_eval, NULL);
    {
        esft_model dm;
        check(esft_model_open(&dm, dense_dir, NULL, &err), &err, dense_dir);
        snprintf(res[n_res].name, sizeof res[n_res].name, "dense twin, pre-trained");
        evaluate_all(&res[n_res++], &dm, NULL, ev, o.target, max_eval);
        esft_model_close(&dm);
    }
    snprintf(res[n_res].name, sizeof res[n_res].name, "PESC on the dense twin");
    pesc_row(&res[n_res++], dense_dir, &task, &o, ft_steps, ft_lr, ev, max_eval);

    /* ---- 5. the ESFT-Token experts as a checkpoint ---- */
    t = now_s();
    snprintf(path, sizeof path, "%s/esft_token.safetensors", o.out);
    check(esft_model_trainable_save(&keep.tr, &m, &sel[0], path, &err), &err, "saving the ESFT-Token experts");
    trainer_uninit(&keep);
    snprintf(dir, sizeof dir, "%s/merged", o.out);
    check(esft_checkpoint_merge(base_dir, path, dir, NULL, &err), &err, "merging the ESFT-Token experts");
    snprintf(path, sizeof path, "%s/%s.eval.jsonl", o.out, task_names[o.target]);
    write_eval_jsonl(path, &ev[o.target], max_eval);
    {
        esft_model mm;
        score s;
        check(esft_model_open(&mm, dir, NULL, &err), &err, dir);
        s = evaluate(&mm, NULL, &ev[o.target], max_eval);
        esft_model_close(&mm);
        printf("[5/6] ESFT-Token's %d experts -> %s/esft_token.safetensors, merged into %s (a full checkpoint\n"
               "      directory): %s loss %.8f nats = %.3f bits/byte (ESFT-Token's row: %.8f nats)%s\n"
               "      %s holds the scored windows: build/esft eval %s --data %s\n",
               esft_expert_config_count(&sel[0]), o.out, dir, task_names[o.target], s.nats, s.bpb, res[1].task.nats,
               s.nats == res[1].task.nats ? ", the same" : " DIFFERENT", path, dir, path);
        if (s.nats != res[1].task.nats) {
            fprintf(stderr, "demo: the merged checkpoint does not evaluate as the trained experts did\n");
            return 1;
        }
    }
    printf("      done in %.1f s\n", now_s() - t);

    /* ---- 6. the table ---- */
    printf("[6/6] results (bits per byte on held-out eval text: lower is better; general = mean over the\n"
           "      other three tasks, so a rise there is forgetting)\n\n");
    print_table(res, n_res, &o);
    snprintf(path, sizeof path, "%s/results.tsv", o.out);
    write_results(path, res, n_res, &o);
    printf("\noutputs in %s/: base/ and dense_base/ (pre-trained checkpoints), summary.json,\n"
           "config_token.json, config_gate.json, heatmap_token.svg, heatmap_gate.svg, esft_token.safetensors,\n"
           "merged/ (base + ESFT-Token experts), %s.eval.jsonl, results.tsv. Total %.1f s.\n",
           o.out, task_names[o.target], now_s() - t0);

    for (i = 0; i < 2; i++) esft_expert_config_free(&sel[i]);
    esft_scores_free(&sc);
    esft_stats_uninit(&st);
    esft_model_close(&m);
    for (k = 0; k < N_TASKS; k++) {
        free_text(&tr[k]);
        free_text(&ev[k]);
    }
    return 0;
}
