/* test_pesc.c - the low-rank adapter primitive, LoRA and the PESC adapter MoE layer
   (Camelidae): hand-computed cases, an independent double-precision reference of
   the layer, central-difference gradient checks for every input and weight,
   upcycling init (y == F exactly), dropout masks, bad input.
   `test_pesc --dump DIR` writes seeded inputs and outputs for tests/oracle_pesc.py. */
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"
#include "harness.h"
#include "gradcheck.h"

#include <stdint.h>

/* ---- small helpers ---- */

static uint64_t rng_state = 1;
static double rng_uniform(void) /* [0, 1) */
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng_state >> 11) * (1.0 / 9007199254740992.0);
}
static void fill(float *x, size_t n, double lo, double hi)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = (float)(lo + (hi - lo) * rng_uniform());
}
static float *fnew(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }

static double gelu_d(double h) { return 0.5 * h * (1.0 + erf(h / sqrt(2.0))); }

/* ---- the primitive ---- */

TEST(adapter_forward_hand_computed)
{
    /* Din 2, Dout 2, R 1: h = 1*1 + 2*(-1) = -1; identity: y += 0.5 * h * up */
    esft_adapter_config c = esft_adapter_config_lora(2, 2, 1, 0.5f); /* s = 0.5 */
    float x[2] = {1, 2}, down[2] = {1, -1}, up[2] = {3, -4}, y[2] = {10, 20}, hid[1], work[1];
    float rs[1] = {2.0f};
    CHECK_STATUS(esft_adapter_forward(&c, y, hid, x, down, up, NULL, work, 1, NULL), ESFT_OK);
    CHECK(hid[0] == -1.0f);
    CHECK(y[0] == 10.0f - 1.5f && y[1] == 20.0f + 2.0f);
    /* GELU and a row scale of 2: y += 2 * 0.5 * gelu(-1) * up */
    c.activation = ESFT_ACT_GELU;
    y[0] = y[1] = 0.0f;
    CHECK_STATUS(esft_adapter_forward(&c, y, hid, x, down, up, rs, work, 1, NULL), ESFT_OK);
    CHECK_NEAR(y[0], 3.0 * gelu_d(-1.0), 1e-6);
    CHECK_NEAR(y[1], -4.0 * gelu_d(-1.0), 1e-6);
}

/* Loss of the primitive: sum dy * y, in double. */
static double adapter_loss(const esft_adapter_config *c, const float *dy, const float *x, const float *down,
                           const float *up, const float *rs, int T)
{
    size_t ny = (size_t)T * c->d_out, i;
    float *y = fnew(ny), *hid = fnew((size_t)T * c->rank), *work = fnew((size_t)T * c->rank);
    double L = 0.0;
    esft_adapter_forward(c, y, hid, x, down, up, rs, work, T, NULL);
    for (i = 0; i < ny; i++) L += (double)dy[i] * y[i];
    free(y); free(hid); free(work);
    return L;
}

/* Central differences (tests/gradcheck.h) of `loss` for n coordinates of p
   against the analytic gradient; fails the test naming the worst coordinate.
   Routing flips are rejected by the loss (NAN) and must stay rare. */
#define GC_EXPECT(p, n, analytic, step, loss, ctx, name)                                         \
    do {                                                                                    \
        gc_options o_;                                                                      \
        gc_result r_;                                                                       \
        char buf_[256];                                                                     \
        o_.h = (step); o_.atol = 2e-3; o_.rtol = 1e-2;                                         \
        r_ = gc_check((p), (n), (analytic), 1, (loss), (ctx), &o_);                          \
        CHECK_MSG(r_.failed == 0 && r_.skipped * 10 <= r_.checked && r_.max_abs_grad > 1e-3,  \
                  "%s (max |grad| %.3g)", gc_describe(&r_, (name), buf_, sizeof buf_),       \
                  r_.max_abs_grad);                                                         \
    } while (0)

typedef struct adapter_case {
    esft_adapter_config c;
    int T;
    float *x, *down, *up, *rs, *dy;
} adapter_case;

static double adapter_case_loss(void *ctx)
{
    adapter_case *a = (adapter_case *)ctx;
    return adapter_loss(&a->c, a->dy, a->x, a->down, a->up, a->rs, a->T);
}

static void adapter_gradcheck(esft_activation act)
{
    adapter_case a;
    int T = 5, Din = 7, Dout = 4, R = 3;
    float *hid, *work, *y, *dx, *ddown, *dup, *drs;
    a.c = esft_adapter_config_lora(Din, Dout, R, 1.5f);
    a.c.activation = act;
    a.T = T;
    rng_state = 42 + (uint64_t)act;
    a.x = fnew((size_t)T * Din); fill(a.x, (size_t)T * Din, -1, 1);
    a.down = fnew((size_t)R * Din); fill(a.down, (size_t)R * Din, -0.7, 0.7);
    a.up = fnew((size_t)Dout * R); fill(a.up, (size_t)Dout * R, -0.7, 0.7);
    a.rs = fnew((size_t)T); fill(a.rs, (size_t)T, 0.2, 1.0);
    a.dy = fnew((size_t)T * Dout); fill(a.dy, (size_t)T * Dout, -1, 1);
    hid = fnew((size_t)T * R); work = fnew(2 * (size_t)T * R); y = fnew((size_t)T * Dout);
    dx = fnew((size_t)T * Din); ddown = fnew((size_t)R * Din); dup = fnew((size_t)Dout * R); drs = fnew((size_t)T);
    CHECK_STATUS(esft_adapter_forward(&a.c, y, hid, a.x, a.down, a.up, a.rs, work, T, NULL), ESFT_OK);
    CHECK_STATUS(esft_adapter_backward(&a.c, dx, ddown, dup, drs, a.dy, hid, a.x, a.down, a.up, a.rs, work, T,
                                       NULL), ESFT_OK);
    GC_EXPECT(a.x, (size_t)T * Din, dx, 1e-2, adapter_case_loss, &a, "dx");
    GC_EXPECT(a.down, (size_t)R * Din, ddown, 1e-2, adapter_case_loss, &a, "dw_down");
    GC_EXPECT(a.up, (size_t)Dout * R, dup, 1e-2, adapter_case_loss, &a, "dw_up");
    GC_EXPECT(a.rs, (size_t)T, drs, 1e-2, adapter_case_loss, &a, "drow_scale");
    /* backward accumulates: a second call doubles every gradient */
    {
        float before = ddown[3];
        CHECK_STATUS(esft_adapter_backward(&a.c, dx, ddown, dup, drs, a.dy, hid, a.x, a.down, a.up, a.rs, work,
                                           T, NULL), ESFT_OK);
        CHECK_NEAR(ddown[3], 2.0 * before, 1e-6 + 1e-6 * fabs(before));
    }
    free(a.x); free(a.down); free(a.up); free(a.rs); free(a.dy);
    free(hid); free(work); free(y); free(dx); free(ddown); free(dup); free(drs);
}

TEST(adapter_gradcheck_gelu) { adapter_gradcheck(ESFT_ACT_GELU); }
TEST(adapter_gradcheck_identity_lora) { adapter_gradcheck(ESFT_ACT_IDENTITY); }

TEST(lora_init_adds_zero_then_a_low_rank_product)
{
    int T = 3, Din = 5, Dout = 4, R = 2, t, o, r, i;
    esft_adapter_config c = esft_adapter_config_lora(Din, Dout, R, 4.0f);
    float x[15], down[10], up[8], y[12], y0[12], hid[6], work[6];
    CHECK_NEAR(c.scale, 2.0, 0);
    CHECK_STATUS(esft_adapter_init_weights(&c, down, up, 7, NULL), ESFT_OK);
    for (i = 0; i < 10; i++) CHECK(fabsf(down[i]) <= 1.0f / sqrtf(5.0f) && down[i] != 0.0f);
    rng_state = 3;
    fill(x, 15, -1, 1); fill(y, 12, -1, 1);
    memcpy(y0, y, sizeof y);
    CHECK_STATUS(esft_adapter_forward(&c, y, hid, x, down, up, NULL, work, T, NULL), ESFT_OK);
    CHECK(memcmp(y, y0, sizeof y) == 0); /* the frozen linear's output, unchanged */
    fill(up, 8, -1, 1);
    CHECK_STATUS(esft_adapter_forward(&c, y, hid, x, down, up, NULL, work, T, NULL), ESFT_OK);
    for (t = 0; t < T; t++)
        for (o = 0; o < Dout; o++) {
            double want = y0[t * Dout + o];
            for (r = 0; r < R; r++) {
                double h = 0.0;
                for (i = 0; i < Din; i++) h += (double)x[t * Din + i] * down[r * Din + i];
                want += 2.0 * h * up[o * R + r];
            }
            CHECK_NEAR(y[t * Dout + o], want, 1e-5);
        }
}

/* ---- the PESC layer: an independent double-precision reference ---- */

typedef struct pesc_case {
    esft_pesc_config c;
    int T;
    float *F, *u, *params, *dy;
    float daux;
    esft_pesc_saved saved;
    float *y;
    int32_t *ids_ref; /* routing the gradient was taken at; NULL = do not compare */
} pesc_case;

static int keep_ref(uint64_t seed, int e, int t, int d, double p); /* below */

/* y and aux of the layer, per token, the way the paper writes it. */
static void pesc_reference(const pesc_case *k, double *y, double *aux)
{
    const esft_pesc_config *c = &k->c;
    int D = c->d_model, E = c->n_experts, K = c->top_k, R = c->rank, t, e, j, d, r;
    double *logit = (double *)calloc((size_t)E, sizeof(double)), *P = (double *)calloc((size_t)E, sizeof(double));
    double *f = (double *)calloc((size_t)E, sizeof(double)), *h = (double *)calloc((size_t)R, sizeof(double));
    double *x = (double *)calloc((size_t)D, sizeof(double));
    int *chosen = (int *)calloc((size_t)E, sizeof(int));
    for (t = 0; t < k->T; t++) {
        double mx = -1e300, sum = 0.0, sel = 0.0;
        for (e = 0; e < E; e++) {
            logit[e] = 0.0;
            for (d = 0; d < D; d++) logit[e] += (double)k->u[t * D + d] * k->params[e * D + d];
            if (logit[e] > mx) mx = logit[e];
            chosen[e] = 0;
        }
        for (e = 0; e < E; e++) sum += exp(logit[e] - mx);
        for (e = 0; e < E; e++) P[e] += exp(logit[e] - mx) / sum / k->T;
        for (j = 0; j < K; j++) { /* best unchosen, ties to the lower id */
            int best = -1;
            for (e = 0; e < E; e++)
                if (!chosen[e] && (best < 0 || logit[e] > logit[best])) best = e;
            chosen[best] = 1;
            f[best] += 1.0 / ((double)k->T * K);
            sel += exp(logit[best] - mx);
        }
        for (d = 0; d < D; d++) y[t * D + d] = k->F[t * D + d];
        for (e = 0; e < E; e++) {
            const float *down = k->params + esft_pesc_tensor_offset(c, ESFT_PESC_DOWN, e);
            const float *up = k->params + esft_pesc_tensor_offset(c, ESFT_PESC_UP, e);
            double w = exp(logit[e] - mx) / sel;
            if (!chosen[e]) continue;
            for (d = 0; d < D; d++)
                x[d] = keep_ref(c->dropout_seed, e, t, d, c->dropout) ? k->F[t * D + d] / (1.0 - c->dropout) : 0.0;
            for (r = 0; r < R; r++) {
                h[r] = 0.0;
                for (d = 0; d < D; d++) h[r] += down[r * D + d] * x[d];
                h[r] = gelu_d(h[r]);
            }
            for (d = 0; d < D; d++) {
                double a = 0.0;
                for (r = 0; r < R; r++) a += up[d * R + r] * h[r];
                y[t * D + d] += w * c->scale * a;
            }
        }
    }
    *aux = 0.0;
    for (e = 0; e < E; e++) *aux += f[e] * P[e];
    *aux *= c->aux_alpha * E;
    free(logit); free(P); free(f); free(h); free(x); free(chosen);
}

/* The documented mask: keep iff splitmix64(splitmix64(seed ^ (e << 32 | t)) + d) >> 32 >= p 2^32. */
static uint64_t mix_ref(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
static int keep_ref(uint64_t seed, int e, int t, int d, double p)
{
    uint64_t key = mix_ref(seed ^ ((uint64_t)(uint32_t)e << 32 | (uint32_t)t));
    if (p == 0.0) return 1;
    return (double)(mix_ref(key + (uint64_t)d) >> 32) >= p * 4294967296.0;
}

static void pesc_case_make(pesc_case *k, int T, int D, int E, int K, int R, float dropout, uint64_t seed)
{
    size_t np;
    memset(k, 0, sizeof *k);
    k->c = esft_pesc_config_init(D, E, K, R);
    k->c.dropout = dropout;
    k->c.dropout_seed = seed * 7 + 1;
    k->c.aux_alpha = 0.1f; /* big enough that its gradient shows in the checks */
    k->T = T;
    k->daux = 1.0f;
    np = esft_pesc_param_count(&k->c);
    k->F = fnew((size_t)T * D); k->u = fnew((size_t)T * D); k->dy = fnew((size_t)T * D);
    k->y = fnew((size_t)T * D); k->params = fnew(np);
    rng_state = seed;
    fill(k->F, (size_t)T * D, -1.5, 1.5);
    fill(k->u, (size_t)T * D, -1.5, 1.5);
    fill(k->dy, (size_t)T * D, -1, 1);
    esft_pesc_init_weights(&k->c, k->params, seed, NULL);
    fill(k->params, (size_t)E * D, -1.0, 1.0); /* a sharper router than the init */
    {
        int e;
        for (e = 0; e < E; e++)
            fill(k->params + esft_pesc_tensor_offset(&k->c, ESFT_PESC_UP, e), (size_t)D * R, -0.8, 0.8);
    }
    esft_pesc_saved_init(&k->saved, &k->c, T, NULL, NULL);
}

static void pesc_case_free(pesc_case *k)
{
    free(k->F); free(k->u); free(k->dy); free(k->y); free(k->params);
    esft_pesc_saved_uninit(&k->saved);
}

TEST(pesc_forward_matches_reference)
{
    static const float drop[2] = {0.0f, 0.3f};
    int v;
    for (v = 0; v < 2; v++) {
        pesc_case k;
        double *yr, aux_r;
        float aux;
        int i;
        pesc_case_make(&k, 9, 12, 5, 2, 4, drop[v], 11 + (uint64_t)v);
        yr = (double *)calloc((size_t)9 * 12, sizeof(double));
        CHECK_STATUS(esft_pesc_forward(&k.c, k.y, &aux, k.F, k.u, k.params, &k.saved, k.T, NULL), ESFT_OK);
        pesc_reference(&k, yr, &aux_r);
        for (i = 0; i < 9 * 12; i++) CHECK_NEAR(k.y[i], yr[i], 1e-5 + 1e-5 * fabs(yr[i]));
        CHECK_NEAR(aux, aux_r, 1e-7);
        free(yr);
        pesc_case_free(&k);
    }
}

TEST(pesc_aux_loss_hand_computed)
{
    /* D 1, E 2, K 1, router (1, -1): u = +1 -> logits (1, -1), u = -1 -> (-1, 1).
       Two tokens, one each way: f = (1/2, 1/2), P = (1/2, 1/2), aux = alpha 2 (1/4 + 1/4) = alpha. */
    esft_pesc_config c = esft_pesc_config_init(1, 2, 1, 1);
    esft_pesc_saved s;
    float params[6] = {1, -1, 0, 0, 0, 0}, F[2] = {0.5f, -0.25f}, u[2] = {1, -1}, y[2], aux;
    c.aux_alpha = 0.01f;
    CHECK_STATUS(esft_pesc_saved_init(&s, &c, 2, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_pesc_forward(&c, y, &aux, F, u, params, &s, 2, NULL), ESFT_OK);
    CHECK_NEAR(aux, 0.01, 1e-8);
    CHECK_EQ_INT(s.ids[0], 0);
    CHECK_EQ_INT(s.ids[1], 1);
    CHECK(s.weights[0] == 1.0f && s.weights[1] == 1.0f); /* softmax over K = 1 */
    /* both tokens to expert 0: f = (1, 0), P_0 = 1/2 (the logits mirror) -> aux = alpha 2 (1/2) */
    u[1] = 1.0f;
    CHECK_STATUS(esft_pesc_forward(&c, y, &aux, F, u, params, &s, 2, NULL), ESFT_OK);
    CHECK_NEAR(aux, 0.01 * 2.0 * (1.0 / (1.0 + exp(-2.0))), 1e-8);
    esft_pesc_saved_uninit(&s);
}

/* ---- gradient checks of the layer ---- */

static double pesc_loss(void *ctx)
{
    pesc_case *k = (pesc_case *)ctx;
    float aux;
    double L = 0.0;
    int i;
    if (esft_pesc_forward(&k->c, k->y, &aux, k->F, k->u, k->params, &k->saved, k->T, NULL) != ESFT_OK) return NAN;
    if (k->ids_ref && memcmp(k->ids_ref, k->saved.ids, (size_t)k->T * k->c.top_k * sizeof(int32_t)) != 0)
        return NAN; /* a top-K boundary was crossed: the loss is not differentiable there */
    for (i = 0; i < k->T * k->c.d_model; i++) L += (double)k->dy[i] * k->y[i];
    return L + (double)k->daux * aux;
}

static void pesc_gradcheck(float dropout, uint64_t seed)
{
    pesc_case k;
    int T = 7, D = 6, E = 4, K = 2, R = 3, e;
    size_t np, i;
    float *dF, *du, *dp, aux;
    int32_t ids0[7 * 2];
    double w;
    pesc_case_make(&k, T, D, E, K, R, dropout, seed);
    np = esft_pesc_param_count(&k.c);
    dF = fnew((size_t)T * D); du = fnew((size_t)T * D); dp = fnew(np);
    CHECK_STATUS(esft_pesc_forward(&k.c, k.y, &aux, k.F, k.u, k.params, &k.saved, T, NULL), ESFT_OK);
    memcpy(ids0, k.saved.ids, sizeof ids0);
    CHECK_STATUS(esft_pesc_backward(&k.c, dF, du, dp, k.dy, k.daux, &k.saved, k.F, k.u, k.params, T, NULL),
                 ESFT_OK);
    k.ids_ref = ids0;
    GC_EXPECT(k.F, (size_t)T * D, dF, 1e-2, pesc_loss, &k, "dF");
    GC_EXPECT(k.u, (size_t)T * D, du, 1e-3, pesc_loss, &k, "du");
    GC_EXPECT(k.params, (size_t)E * D, dp, 1e-3, pesc_loss, &k, "dW_r");
    for (e = 0; e < E; e++) {
        size_t off = esft_pesc_tensor_offset(&k.c, ESFT_PESC_DOWN, e);
        GC_EXPECT(k.params + off, (size_t)R * D, dp + off, 1e-2, pesc_loss, &k, "dW_down");
        off = esft_pesc_tensor_offset(&k.c, ESFT_PESC_UP, e);
        GC_EXPECT(k.params + off, (size_t)D * R, dp + off, 1e-2, pesc_loss, &k, "dW_up");
    }
    k.ids_ref = NULL;
    /* the aux loss really contributes to du: without it du changes */
    for (i = 0; i < (size_t)T * D; i++) du[i] = -du[i];
    CHECK_STATUS(esft_pesc_backward(&k.c, dF, du, NULL, k.dy, 0.0f, &k.saved, k.F, k.u, k.params, T, NULL),
                 ESFT_OK);
    w = 0.0;
    for (i = 0; i < (size_t)T * D; i++) w += fabs(du[i]);
    CHECK(w > 1e-6);
    pesc_case_free(&k);
    free(dF); free(du); free(dp);
}

TEST(pesc_gradcheck_all_inputs_and_weights) { pesc_gradcheck(0.0f, 5); }
TEST(pesc_gradcheck_with_dropout) { pesc_gradcheck(0.25f, 6); }

/* ---- upcycling init ---- */

TEST(pesc_init_returns_F_exactly)
{
    int T = 16, D = 32;
    esft_pesc_config c = esft_pesc_config_camelidae(D);
    esft_pesc_saved s;
    size_t np = esft_pesc_param_count(&c), i;
    float *params = fnew(np), *F = fnew((size_t)T * D), *u = fnew((size_t)T * D), *y = fnew((size_t)T * D);
    float bound = 1.0f / sqrtf((float)D), aux;
    CHECK_EQ_INT(c.n_experts, 8);
    CHECK_EQ_INT(c.top_k, 2);
    CHECK_EQ_INT(c.rank, 512);
    CHECK(c.scale == 0.25f);
    CHECK(np == (size_t)8 * D * (1 + 2 * 512));
    CHECK_STATUS(esft_pesc_init_weights(&c, params, 2024, NULL), ESFT_OK);
    for (i = 0; i < (size_t)8 * D; i++) CHECK(fabsf(params[i]) <= bound);
    for (i = 0; i < 8; i++) {
        const float *down = params + esft_pesc_tensor_offset(&c, ESFT_PESC_DOWN, (int)i);
        const float *up = params + esft_pesc_tensor_offset(&c, ESFT_PESC_UP, (int)i);
        size_t j;
        for (j = 0; j < (size_t)512 * D; j++) {
            CHECK(fabsf(down[j]) <= bound);
            CHECK(up[j] == 0.0f);
        }
    }
    rng_state = 8;
    fill(F, (size_t)T * D, -3, 3);
    fill(u, (size_t)T * D, -3, 3);
    CHECK_STATUS(esft_pesc_saved_init(&s, &c, T, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_pesc_forward(&c, y, &aux, F, u, params, &s, T, NULL), ESFT_OK);
    CHECK(memcmp(y, F, (size_t)T * D * sizeof(float)) == 0);
    CHECK(aux > 0.0f);
    esft_pesc_saved_uninit(&s);
    free(params); free(F); free(u); free(y);
}

TEST(pesc_one_adamw_step_moves_y_off_F)
{
    /* at init y == F; the gradient of W_up is not zero (dW_up = dy^T s w GELU(h)),
       so one AdamW step on the block makes the adapters add something */
    int T = 12, D = 16;
    esft_pesc_config c = esft_pesc_config_init(D, 4, 2, 8);
    esft_pesc_saved s;
    esft_adamw opt;
    esft_adamw_config oc = esft_adamw_config_init();
    size_t np = esft_pesc_param_count(&c), i, moved = 0;
    float *params = fnew(np), *grads = fnew(np), *F = fnew((size_t)T * D), *u = fnew((size_t)T * D);
    float *y = fnew((size_t)T * D), *dy = fnew((size_t)T * D), *dF = fnew((size_t)T * D), aux;
    CHECK_STATUS(esft_pesc_init_weights(&c, params, 5, NULL), ESFT_OK);
    rng_state = 21;
    fill(F, (size_t)T * D, -1, 1); fill(u, (size_t)T * D, -1, 1); fill(dy, (size_t)T * D, -1, 1);
    CHECK_STATUS(esft_pesc_saved_init(&s, &c, T, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_pesc_forward(&c, y, &aux, F, u, params, &s, T, NULL), ESFT_OK);
    CHECK(memcmp(y, F, (size_t)T * D * sizeof(float)) == 0);
    CHECK_STATUS(esft_pesc_backward(&c, dF, NULL, grads, dy, 1.0f, &s, F, u, params, T, NULL), ESFT_OK);
    CHECK_STATUS(esft_adamw_init(&opt, &oc, np, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_adamw_step(&opt, params, grads, NULL), ESFT_OK);
    CHECK_STATUS(esft_pesc_forward(&c, y, &aux, F, u, params, &s, T, NULL), ESFT_OK);
    for (i = 0; i < (size_t)T * D; i++) moved += y[i] != F[i];
    CHECK_MSG(moved > (size_t)T * D / 2, "only %lu of %d outputs moved", (unsigned long)moved, T * D);
    esft_adamw_uninit(&opt);
    esft_pesc_saved_uninit(&s);
    free(params); free(grads); free(F); free(u); free(y); free(dy); free(dF);
}

TEST(pesc_init_is_seeded_and_deterministic)
{
    esft_pesc_config c = esft_pesc_config_init(8, 4, 2, 3);
    size_t np = esft_pesc_param_count(&c);
    float *a = fnew(np), *b = fnew(np);
    CHECK_STATUS(esft_pesc_init_weights(&c, a, 99, NULL), ESFT_OK);
    CHECK_STATUS(esft_pesc_init_weights(&c, b, 99, NULL), ESFT_OK);
    CHECK(memcmp(a, b, np * sizeof(float)) == 0);
    CHECK_STATUS(esft_pesc_init_weights(&c, b, 100, NULL), ESFT_OK);
    CHECK(memcmp(a, b, (size_t)4 * 8 * sizeof(float)) != 0);
    free(a); free(b);
}

/* ---- determinism, dropout, names, bad input ---- */

TEST(pesc_same_input_same_bits)
{
    pesc_case k;
    float *y1, *dF1, *dF2, aux1, aux2;
    size_t n = (size_t)20 * 16;
    pesc_case_make(&k, 20, 16, 6, 3, 5, 0.1f, 77);
    y1 = fnew(n); dF1 = fnew(n); dF2 = fnew(n);
    CHECK_STATUS(esft_pesc_forward(&k.c, y1, &aux1, k.F, k.u, k.params, &k.saved, k.T, NULL), ESFT_OK);
    CHECK_STATUS(esft_pesc_backward(&k.c, dF1, NULL, NULL, k.dy, 1.0f, &k.saved, k.F, k.u, k.params, k.T, NULL),
                 ESFT_OK);
    CHECK_STATUS(esft_pesc_forward(&k.c, k.y, &aux2, k.F, k.u, k.params, &k.saved, k.T, NULL), ESFT_OK);
    CHECK_STATUS(esft_pesc_backward(&k.c, dF2, NULL, NULL, k.dy, 1.0f, &k.saved, k.F, k.u, k.params, k.T, NULL),
                 ESFT_OK);
    CHECK(memcmp(y1, k.y, n * sizeof(float)) == 0 && aux1 == aux2);
    CHECK(memcmp(dF1, dF2, n * sizeof(float)) == 0);
    free(y1); free(dF1); free(dF2);
    pesc_case_free(&k);
}

TEST(pesc_dropout_mask_rate_and_seed)
{
    /* the mask keeps about 1 - p of the columns and changes with the seed */
    pesc_case k;
    float *y2;
    int kept = 0, total = 0, e, t, d, differ = 0, i;
    pesc_case_make(&k, 4, 16, 3, 2, 2, 0.4f, 3);
    for (e = 0; e < 8; e++)
        for (t = 0; t < 64; t++)
            for (d = 0; d < 64; d++) { kept += keep_ref(k.c.dropout_seed, e, t, d, 0.4); total++; }
    CHECK_NEAR((double)kept / total, 0.6, 0.02);
    y2 = fnew(4 * 16);
    CHECK_STATUS(esft_pesc_forward(&k.c, k.y, NULL, k.F, k.u, k.params, &k.saved, k.T, NULL), ESFT_OK);
    k.c.dropout_seed += 1;
    CHECK_STATUS(esft_pesc_forward(&k.c, y2, NULL, k.F, k.u, k.params, &k.saved, k.T, NULL), ESFT_OK);
    for (i = 0; i < 4 * 16; i++) differ += k.y[i] != y2[i];
    CHECK(differ > 0);
    free(y2);
    pesc_case_free(&k);
}

TEST(pesc_tensor_names_of_released_checkpoints)
{
    char buf[128];
    esft_pesc_config c = esft_pesc_config_init(4096, 8, 2, 512);
    CHECK_STATUS(esft_pesc_tensor_name(buf, sizeof buf, 3, ESFT_PESC_ROUTER, 0), ESFT_OK);
    CHECK(strcmp(buf, "model.layers.3.mlp.moe_adapter.router.weight") == 0);
    CHECK_STATUS(esft_pesc_tensor_name(buf, sizeof buf, 31, ESFT_PESC_DOWN, 7), ESFT_OK);
    CHECK(strcmp(buf, "model.layers.31.mlp.moe_adapter.experts.expert_7.adapter_down.weight") == 0);
    CHECK_STATUS(esft_pesc_tensor_name(buf, sizeof buf, 0, ESFT_PESC_UP, 0), ESFT_OK);
    CHECK(strcmp(buf, "model.layers.0.mlp.moe_adapter.experts.expert_0.adapter_up.weight") == 0);
    CHECK_STATUS(esft_pesc_tensor_name(buf, 20, 0, ESFT_PESC_UP, 0), ESFT_ERR_RANGE);
    /* block layout: router, then down/up per expert */
    CHECK(esft_pesc_tensor_offset(&c, ESFT_PESC_ROUTER, 5) == 0);
    CHECK(esft_pesc_tensor_offset(&c, ESFT_PESC_DOWN, 0) == (size_t)8 * 4096);
    CHECK(esft_pesc_tensor_offset(&c, ESFT_PESC_UP, 0) == (size_t)8 * 4096 + (size_t)512 * 4096);
    CHECK(esft_pesc_tensor_offset(&c, ESFT_PESC_DOWN, 7) + (size_t)2 * 512 * 4096 == esft_pesc_param_count(&c));
    /* a size query on no config, or on one with no block, is 0 (NULL used to crash) */
    CHECK(esft_pesc_param_count(NULL) == 0);
    c.rank = -3;
    CHECK(esft_pesc_param_count(&c) == 0);
    c = esft_pesc_config_init(0x40000000, 0x40000000, 2, 0x40000000);
    CHECK(esft_pesc_param_count(&c) == 0); /* 2^90 floats */
}

TEST(pesc_bad_input_clear_status)
{
    esft_pesc_config c = esft_pesc_config_init(4, 3, 2, 2);
    esft_adapter_config ac = esft_adapter_config_lora(4, 4, 0, 1.0f);
    esft_pesc_saved s;
    esft_error err;
    float F[8] = {0}, u[8] = {0}, y[8], dF[8] = {0}, params[3 * 4 * 5] = {0}, w[8] = {0}, hid[2], work[4];
    c.rank = 0;
    CHECK_STATUS(esft_pesc_config_validate(&c, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "rank 0") != NULL);
    CHECK_STATUS(esft_pesc_saved_init(&s, &c, 2, NULL, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_adapter_forward(&ac, y, hid, F, w, w, NULL, work, 2, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "rank 0") != NULL);
    c.rank = 2;
    c.top_k = 4;
    CHECK_STATUS(esft_pesc_config_validate(&c, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "top_k 4") != NULL);
    c.top_k = 2;
    c.dropout = 1.0f;
    CHECK_STATUS(esft_pesc_config_validate(&c, NULL), ESFT_ERR_INVALID_ARGUMENT);
    c.dropout = 0.0f;
    CHECK_STATUS(esft_pesc_saved_init(&s, &c, 2, NULL, NULL), ESFT_OK);
    /* backward before any forward */
    CHECK_STATUS(esft_pesc_backward(&c, dF, NULL, NULL, F, 1.0f, &s, F, u, params, 2, &err),
                 ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_pesc_forward(&c, y, NULL, F, u, params, &s, 3, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_pesc_forward(&c, F, NULL, F, u, params, &s, 2, NULL), ESFT_ERR_INVALID_ARGUMENT);
    F[5] = NAN;
    CHECK_STATUS(esft_pesc_forward(&c, y, NULL, F, u, params, &s, 2, &err), ESFT_ERR_NUMERIC);
    CHECK(strstr(err.message, "F[1][1] is NaN") != NULL);
    F[5] = 0.0f;
    u[2] = INFINITY;
    CHECK_STATUS(esft_pesc_forward(&c, y, NULL, F, u, params, &s, 2, &err), ESFT_ERR_NUMERIC);
    CHECK(strstr(err.message, "u[0][2] is Inf") != NULL);
    u[2] = 0.0f;
    params[30] = NAN;
    CHECK_STATUS(esft_pesc_forward(&c, y, NULL, F, u, params, &s, 2, &err), ESFT_ERR_NUMERIC);
    params[30] = 0.0f;
    CHECK_STATUS(esft_pesc_forward(&c, y, NULL, F, u, params, &s, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_pesc_backward(&c, dF, NULL, NULL, F, NAN, &s, F, u, params, 2, NULL), ESFT_ERR_NUMERIC);
    CHECK_STATUS(esft_pesc_backward(&c, dF, NULL, NULL, F, 1.0f, &s, F, u, params, 1, NULL),
                 ESFT_ERR_INVALID_ARGUMENT);
    c.dropout_seed = 5;
    CHECK_STATUS(esft_pesc_backward(&c, dF, NULL, NULL, F, 1.0f, &s, F, u, params, 2, NULL),
                 ESFT_ERR_INVALID_ARGUMENT);
    c.dropout_seed = 0;
    c.n_experts = 4;
    CHECK_STATUS(esft_pesc_forward(&c, y, NULL, F, u, params, &s, 2, NULL), ESFT_ERR_SHAPE);
    esft_pesc_saved_uninit(&s);
}

TEST(pesc_backend_without_adapter_ops_is_unsupported)
{
    esft_backend b = *esft_backend_cpu();
    esft_pesc_config c = esft_pesc_config_init(4, 2, 1, 1);
    esft_pesc_saved s;
    float F[4] = {0}, y[4], params[2 * 4 * 3] = {0};
    esft_error err;
    b.adapter_forward = NULL;
    CHECK_STATUS(esft_pesc_saved_init(&s, &c, 1, &b, NULL), ESFT_OK);
    CHECK_STATUS(esft_pesc_forward_with(&b, &c, y, NULL, F, F, params, &s, 1, &err), ESFT_ERR_UNSUPPORTED);
    CHECK(strstr(err.message, "adapter_forward") != NULL);
    esft_pesc_saved_uninit(&s);
}

/* ---- dump for tests/oracle_pesc.py ---- */

static int write_floats(const char *dir, const char *name, const float *x, size_t n)
{
    char path[1024];
    FILE *f;
    snprintf(path, sizeof path, "%s/%s.f32", dir, name);
    f = fopen(path, "wb");
    if (!f) return 1;
    if (fwrite(x, sizeof(float), n, f) != n) { fclose(f); return 1; }
    return fclose(f) != 0;
}

/* NaN/Inf inputs are refused before any output is written: y keeps its bytes when
   F is bad (it used to receive a copy of F first), and dF, du, dparams keep theirs
   when dy is bad (dy used to be unchecked: NaN spread into every gradient). */
TEST(pesc_bad_input_leaves_outputs_untouched)
{
    enum { T = 3, D = 4, E = 3, K = 2, R = 2 };
    pesc_case k;
    esft_error err;
    size_t np, i;
    float *dF, *du, *dp;
    int same = 1;
    pesc_case_make(&k, T, D, E, K, R, 0.0f, 11);
    np = esft_pesc_param_count(&k.c);
    dF = fnew((size_t)T * D); du = fnew((size_t)T * D); dp = fnew(np);
    for (i = 0; i < (size_t)T * D; i++) k.y[i] = dF[i] = du[i] = 7.0f;
    for (i = 0; i < np; i++) dp[i] = 7.0f;
    k.F[5] = NAN;
    CHECK_STATUS(esft_pesc_forward(&k.c, k.y, NULL, k.F, k.u, k.params, &k.saved, T, NULL), ESFT_ERR_NUMERIC);
    for (i = 0; i < (size_t)T * D; i++) same &= k.y[i] == 7.0f;
    CHECK_MSG(same, "y was written by a forward that failed on F");
    k.F[5] = 0.5f;
    k.params[np - 1] = INFINITY; /* an adapter weight */
    CHECK_STATUS(esft_pesc_forward(&k.c, k.y, NULL, k.F, k.u, k.params, &k.saved, T, NULL), ESFT_ERR_NUMERIC);
    for (i = 0; i < (size_t)T * D; i++) same &= k.y[i] == 7.0f;
    CHECK_MSG(same, "y was written by a forward that failed on params");
    k.params[np - 1] = 0.0f;
    CHECK_STATUS(esft_pesc_forward(&k.c, k.y, NULL, k.F, k.u, k.params, &k.saved, T, NULL), ESFT_OK);
    k.dy[D + 3] = NAN;
    CHECK_STATUS(esft_pesc_backward(&k.c, dF, du, dp, k.dy, 1.0f, &k.saved, k.F, k.u, k.params, T, &err),
                 ESFT_ERR_NUMERIC);
    CHECK_MSG(strstr(err.message, "dy[1][3] is NaN") != NULL, "%s", err.message);
    for (i = 0; i < (size_t)T * D; i++) same &= dF[i] == 7.0f && du[i] == 7.0f;
    for (i = 0; i < np; i++) same &= dp[i] == 7.0f;
    CHECK_MSG(same, "gradients were written by a backward that failed on dy");
    free(dF); free(du); free(dp);
    pesc_case_free(&k);
}

/* Two cases (no dropout, dropout 0.2): inputs, the seeded init block, and the
   layer's outputs and gradients. */
static int dump(const char *dir)
{
    FILE *meta;
    char path[1024];
    int v, bad = 0;
    snprintf(path, sizeof path, "%s/meta.txt", dir);
    meta = fopen(path, "w");
    if (!meta) return 1;
    for (v = 0; v < 2; v++) {
        pesc_case k;
        int T = 11, D = 16, E = 6, K = 2, R = 5;
        size_t np, n = (size_t)T * D;
        float *init, *dF, *du, *dp, aux;
        char name[64];
        pesc_case_make(&k, T, D, E, K, R, v ? 0.2f : 0.0f, 300 + (uint64_t)v);
        np = esft_pesc_param_count(&k.c);
        init = fnew(np); dF = fnew(n); du = fnew(n); dp = fnew(np);
        bad |= esft_pesc_init_weights(&k.c, init, 1234, NULL) != ESFT_OK;
        bad |= esft_pesc_forward(&k.c, k.y, &aux, k.F, k.u, k.params, &k.saved, T, NULL) != ESFT_OK;
        bad |= esft_pesc_backward(&k.c, dF, du, dp, k.dy, k.daux, &k.saved, k.F, k.u, k.params, T, NULL) != ESFT_OK;
        fprintf(meta, "case%d T %d D %d E %d K %d R %d scale %.9g alpha %.9g dropout %.9g dseed %llu daux %.9g "
                      "init_seed 1234 aux %.9g\n", v, T, D, E, K, R, (double)k.c.scale, (double)k.c.aux_alpha,
                (double)k.c.dropout, (unsigned long long)k.c.dropout_seed, (double)k.daux, (double)aux);
#define DUMP(x, cnt) snprintf(name, sizeof name, "case%d_%s", v, #x); bad |= write_floats(dir, name, x, cnt);
        DUMP(k.F, n) DUMP(k.u, n) DUMP(k.dy, n) DUMP(k.params, np) DUMP(init, np) DUMP(k.y, n)
        DUMP(dF, n) DUMP(du, n) DUMP(dp, np)
#undef DUMP
        free(init); free(dF); free(du); free(dp);
        pesc_case_free(&k);
    }
    bad |= fclose(meta) != 0;
    return bad;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--dump") == 0) return dump(argv[2]);
    return harness_run(argc, argv);
}
