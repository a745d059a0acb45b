/* test_moe.c - the MoE layer with selective expert training, AdamW, clipping.
   Gradient checks (central differences, tests/gradcheck.h), a hand-computed
   forward, freezing, memory accounting, bad inputs. */
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"
#include "harness.h"
#include "gradcheck.h"
#include "own_memory.h"

/* xorshift32: a small portable generator (the same one as tests/oracle_moe_driver.c). */
static uint32_t rng_state = 1;
static float rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return (float)((rng_state >> 8) * (1.0 / 16777216.0)) * 2.0f - 1.0f; /* [-1, 1) */
}
static void fill(float *a, size_t n, float scale) { size_t i; for (i = 0; i < n; i++) a[i] = scale * rnd(); }

/* A small layer, its inputs and everything a loss evaluation needs. */
typedef struct fixture {
    esft_moe_config cfg;
    esft_moe_weights w;
    esft_moe layer;
    float *router, *gate, *up, *down, *sg, *su, *sd, *sr;
    float *x, *y, *r, *dx;
    int32_t *ref_ids;
    void *ws;
    size_t ws_bytes;
    int T;
    unsigned char trainable[16];
} fixture;

enum { TD = 8, TE = 6, TK = 2, TF = 5, TFS = 4, TT = 6 };

static void fixture_init(fixture *f, int renorm, float alpha, esft_aux_mode mode, int all_trainable,
                         esft_gating gating)
{
    int e;
    size_t efd = (size_t)TE * TF * TD;
    memset(f, 0, sizeof *f);
    rng_state = 12345u;
    f->T = TT;
    f->cfg = esft_moe_config_init(TD, TE, TK, TF, TFS);
    f->cfg.route.renormalize = renorm;
    f->cfg.route.gating = gating;
    if (gating == ESFT_GATING_SIGMOID) f->cfg.route.routed_scaling = 2.5f;
    f->cfg.aux_alpha = alpha;
    f->cfg.aux_mode = mode;
    f->cfg.aux_seq_len = 3;
    for (e = 0; e < TE; e++) f->trainable[e] = all_trainable || e == 1 || e == 4;
    f->cfg.trainable_experts = f->trainable;
    f->cfg.train_router = 1;
    f->cfg.train_shared = 1;
    f->router = calloc((size_t)TE * TD, 4); f->gate = calloc(efd, 4); f->up = calloc(efd, 4);
    f->down = calloc(efd, 4); f->sg = calloc((size_t)TFS * TD, 4); f->su = calloc((size_t)TFS * TD, 4);
    f->sd = calloc((size_t)TFS * TD, 4); f->sr = calloc(TD, 4);
    f->x = calloc((size_t)TT * TD, 4); f->y = calloc((size_t)TT * TD, 4);
    f->r = calloc((size_t)TT * TD, 4); f->dx = calloc((size_t)TT * TD, 4);
    f->ref_ids = calloc((size_t)TT * TK, 4);
    fill(f->router, (size_t)TE * TD, 0.7f); fill(f->gate, efd, 0.5f); fill(f->up, efd, 0.5f);
    fill(f->down, efd, 0.5f); fill(f->sg, (size_t)TFS * TD, 0.5f); fill(f->su, (size_t)TFS * TD, 0.5f);
    fill(f->sd, (size_t)TFS * TD, 0.5f); fill(f->sr, TD, 0.8f); fill(f->x, (size_t)TT * TD, 1.0f); fill(f->r, (size_t)TT * TD, 1.0f);
    f->w.router = f->router; f->w.gate = f->gate; f->w.up = f->up; f->w.down = f->down;
    f->w.shared_gate = f->sg; f->w.shared_up = f->su; f->w.shared_down = f->sd;
    f->w.shared_router = f->sr; /* used only when cfg.shared_gated */
}

static void fixture_free(fixture *f)
{
    esft_moe_uninit(&f->layer);
    free(f->router); free(f->gate); free(f->up); free(f->down); free(f->sg); free(f->su); free(f->sd); free(f->sr);
    free(f->x); free(f->y); free(f->r); free(f->dx); free(f->ref_ids); free(f->ws);
}

static int fixture_build(fixture *f)
{
    if (esft_moe_init(&f->layer, &f->cfg, &f->w, NULL, NULL) != ESFT_OK) return 0;
    if (esft_moe_workspace_size(&f->cfg, f->T, &f->ws_bytes, NULL) != ESFT_OK) return 0;
    f->ws = malloc(f->ws_bytes);
    return f->ws != NULL;
}

/* The routing the layer's current router gives x (computed here, not by the layer). */
static void route_of(const fixture *f, int32_t *ids)
{
    const float *wr = f->layer.router ? f->layer.router : f->router;
    float logits[TT * TE], wts[TT * TK];
    int t, e, d;
    for (t = 0; t < f->T; t++)
        for (e = 0; e < TE; e++) {
            double s = 0.0;
            for (d = 0; d < TD; d++) s += (double)f->x[t * TD + d] * wr[e * TD + d];
            logits[t * TE + e] = (float)s;
        }
    esft_route(&f->cfg.route, ids, wts, NULL, logits, f->T, NULL);
}

/* L = sum(y * r) + aux, in double; NAN when the perturbation changed the top-k
   choice (the loss is not differentiable across such a change). */
static double loss_fn(void *ctx)
{
    fixture *f = (fixture *)ctx;
    float aux = 0.0f;
    int32_t ids[TT * TK];
    double L = 0.0;
    int i;
    route_of(f, ids);
    if (memcmp(ids, f->ref_ids, sizeof ids) != 0) return NAN;
    if (esft_moe_forward(&f->layer, f->y, &aux, f->x, f->ws, f->ws_bytes, f->T, NULL) != ESFT_OK) return NAN;
    for (i = 0; i < f->T * TD; i++) L += (double)f->y[i] * f->r[i];
    return L + aux;
}

/* Forward + backward at the fixture's point: gradients into layer.grads and dx. */
static int run_backward(fixture *f)
{
    float aux;
    route_of(f, f->ref_ids);
    esft_moe_zero_grad(&f->layer);
    memset(f->dx, 0, (size_t)f->T * TD * 4);
    if (esft_moe_forward(&f->layer, f->y, &aux, f->x, f->ws, f->ws_bytes, f->T, NULL) != ESFT_OK) return 0;
    return esft_moe_backward(&f->layer, f->dx, f->r, f->x, f->ws, f->ws_bytes, f->T, NULL) == ESFT_OK;
}

/* Tolerances. The loss is evaluated in fp32 (y) and summed in double; with
   |y| ~ 1 and 48 terms its rounding error is a few 1e-7, which the step 2h =
   2e-2 turns into ~1e-5 at most in the quotient; the truncation error of the
   central difference, h^2 f'''/6, is of the same order here. Measured worst
   error over all configurations: below 5e-6 (the test prints each one). atol 5e-5
   plus rtol 1e-3 leaves a 10x margin and is far below a real mistake
   (gradients are 0.05-1: a dropped term or a wrong sign shows as > 1e-2). */
static const gc_options tol = {1e-2, 5e-5, 1e-3};

#define GRADCHECK(ptr, n, ana, name)                                                      \
    do {                                                                                  \
        char buf_[256];                                                                   \
        gc_result r_ = gc_check((ptr), (n), (ana), 1, loss_fn, &f, &tol);                 \
        CHECK_MSG(r_.failed == 0, "%s", gc_describe(&r_, (name), buf_, sizeof buf_));     \
        CHECK_MSG(r_.checked >= (n) / 2, "%s: only %lu of %lu checked", (name),           \
                  (unsigned long)r_.checked, (unsigned long)(n));                         \
        CHECK_MSG(r_.max_abs_grad > 1e-3, "%s: gradient is all ~0, the check proves nothing", (name)); \
        printf("     %-32s %4lu checked, %lu skipped, max |grad| %.3f, worst err %.2e\n", (name),   \
               (unsigned long)r_.checked, (unsigned long)r_.skipped, r_.max_abs_grad, r_.worst_err); \
    } while (0)

/* Checks every trainable tensor and x, for one configuration. */
static void gradcheck_config(int renorm, float alpha, esft_aux_mode mode, int all_trainable,
                             esft_gating gating)
{
    fixture f;
    size_t efl = (size_t)3 * TF * TD, n_exp;
    fixture_init(&f, renorm, alpha, mode, all_trainable, gating);
    CHECK(fixture_build(&f));
    CHECK(run_backward(&f));
    n_exp = (size_t)f.layer.n_trainable_experts * efl;
    GRADCHECK(f.x, (size_t)TT * TD, f.dx, "dx");
    GRADCHECK(f.layer.params, n_exp, f.layer.grads, "routed experts (gate, up, down)");
    GRADCHECK(f.layer.router, (size_t)TE * TD, f.layer.d_router, "router");
    GRADCHECK(f.layer.shared_gate, (size_t)TFS * TD, f.layer.d_shared_gate, "shared gate");
    GRADCHECK(f.layer.shared_up, (size_t)TFS * TD, f.layer.d_shared_up, "shared up");
    GRADCHECK(f.layer.shared_down, (size_t)TFS * TD, f.layer.d_shared_down, "shared down");
    fixture_free(&f);
}

TEST(gradcheck_plain) { gradcheck_config(0, 0.0f, ESFT_AUX_BATCH, 1, ESFT_GATING_SOFTMAX); }
TEST(gradcheck_renormalised) { gradcheck_config(1, 0.0f, ESFT_AUX_BATCH, 1, ESFT_GATING_SOFTMAX); }
TEST(gradcheck_aux_batch) { gradcheck_config(0, 0.3f, ESFT_AUX_BATCH, 1, ESFT_GATING_SOFTMAX); }
TEST(gradcheck_aux_per_sequence) { gradcheck_config(0, 0.3f, ESFT_AUX_SEQUENCE, 1, ESFT_GATING_SOFTMAX); }
TEST(gradcheck_renormalised_aux_batch) { gradcheck_config(1, 0.3f, ESFT_AUX_BATCH, 1, ESFT_GATING_SOFTMAX); }
TEST(gradcheck_renormalised_aux_per_sequence) { gradcheck_config(1, 0.3f, ESFT_AUX_SEQUENCE, 1, ESFT_GATING_SOFTMAX); }
TEST(gradcheck_sigmoid_renormalised_scaled) { gradcheck_config(1, 0.0f, ESFT_AUX_BATCH, 1, ESFT_GATING_SIGMOID); }
/* 2 of 6 experts trainable: dx still flows through the frozen four. */
TEST(gradcheck_selective_2_of_6) { gradcheck_config(0, 0.3f, ESFT_AUX_SEQUENCE, 0, ESFT_GATING_SOFTMAX); }

/* Qwen2-MoE's gated shared block: y = routed + sigmoid(x . w_s) S(x); the
   gradient reaches w_s, the shared experts through the gate, and x by both paths. */
TEST(gradcheck_shared_gated)
{
    fixture f;
    fixture_init(&f, 1, 0.0f, ESFT_AUX_BATCH, 0, ESFT_GATING_SOFTMAX);
    f.cfg.shared_gated = 1;
    CHECK(fixture_build(&f));
    CHECK(f.layer.shared_router != NULL);
    CHECK(run_backward(&f));
    GRADCHECK(f.x, (size_t)TT * TD, f.dx, "dx (gated shared)");
    GRADCHECK(f.layer.shared_router, (size_t)TD, f.layer.d_shared_router, "shared router");
    GRADCHECK(f.layer.shared_gate, (size_t)TFS * TD, f.layer.d_shared_gate, "shared gate (gated)");
    GRADCHECK(f.layer.shared_down, (size_t)TFS * TD, f.layer.d_shared_down, "shared down (gated)");
    GRADCHECK(f.layer.router, (size_t)TE * TD, f.layer.d_router, "router (gated shared)");
    fixture_free(&f);
}

/* The gated forward against the ungated one: routed part R, shared part S from
   two plain layers, then y = R + sigmoid(x . w_s) S with the gate computed here. */
TEST(shared_gate_forward_matches_definition)
{
    fixture plain, gated;
    float *y_routed = calloc((size_t)TT * TD, 4), aux;
    int t, d;
    double worst = 0.0, scale = 0.0;
    fixture_init(&plain, 0, 0.0f, ESFT_AUX_BATCH, 1, ESFT_GATING_SOFTMAX);
    fixture_init(&gated, 0, 0.0f, ESFT_AUX_BATCH, 1, ESFT_GATING_SOFTMAX);
    gated.cfg.shared_gated = 1;
    CHECK(fixture_build(&plain) && fixture_build(&gated) && y_routed);
    CHECK_STATUS(esft_moe_forward(&plain.layer, plain.y, &aux, plain.x, plain.ws, plain.ws_bytes, TT, NULL), ESFT_OK);
    CHECK_STATUS(esft_moe_forward(&gated.layer, gated.y, &aux, gated.x, gated.ws, gated.ws_bytes, TT, NULL), ESFT_OK);
    esft_moe_uninit(&plain.layer); /* the same layer without its shared block: R alone */
    plain.cfg.d_shared = 0;
    plain.cfg.train_shared = 0;
    CHECK(esft_moe_init(&plain.layer, &plain.cfg, &plain.w, NULL, NULL) == ESFT_OK);
    CHECK_STATUS(esft_moe_forward(&plain.layer, y_routed, &aux, plain.x, plain.ws, plain.ws_bytes, TT, NULL), ESFT_OK);
    for (t = 0; t < TT; t++) {
        double z = 0.0, c;
        for (d = 0; d < TD; d++) z += (double)gated.x[t * TD + d] * gated.sr[d];
        c = 1.0 / (1.0 + exp(-z));
        CHECK(c > 0.05 && c < 0.95); /* a gate that is neither ~0 nor ~1 */
        for (d = 0; d < TD; d++) {
            size_t i = (size_t)t * TD + d;
            double want = y_routed[i] + c * ((double)plain.y[i] - y_routed[i]);
            double e = fabs(gated.y[i] - want);
            if (e > worst) worst = e;
            if (fabs(want) > scale) scale = fabs(want);
        }
    }
    printf("     gated shared forward: worst error %.2e (scale %.2f)\n", worst, scale);
    CHECK(worst <= 1e-5 * scale);
    free(y_routed);
    fixture_free(&plain);
    fixture_free(&gated);
}

/* A gate without its weight, or without a shared block, is refused. */
TEST(shared_gate_needs_its_weight_and_block)
{
    fixture f;
    esft_moe layer;
    fixture_init(&f, 0, 0.0f, ESFT_AUX_BATCH, 1, ESFT_GATING_SOFTMAX);
    f.cfg.shared_gated = 1;
    f.w.shared_router = NULL;
    CHECK_STATUS(esft_moe_init(&layer, &f.cfg, &f.w, NULL, NULL), ESFT_ERR_INVALID_ARGUMENT);
    f.w.shared_router = f.sr;
    f.cfg.d_shared = 0;
    CHECK_STATUS(esft_moe_config_validate(&f.cfg, NULL), ESFT_ERR_INVALID_ARGUMENT);
    fixture_free(&f);
}

/* The aux loss alone (dy = 0): its gradient reaches the router and x. */
TEST(gradcheck_aux_loss_alone)
{
    fixture f;
    fixture_init(&f, 0, 0.5f, ESFT_AUX_SEQUENCE, 1, ESFT_GATING_SOFTMAX);
    memset(f.r, 0, sizeof(float) * TT * TD);
    CHECK(fixture_build(&f));
    CHECK(run_backward(&f));
    GRADCHECK(f.layer.router, (size_t)TE * TD, f.layer.d_router, "router (aux only)");
    GRADCHECK(f.x, (size_t)TT * TD, f.dx, "dx (aux only)");
    fixture_free(&f);
}

/* The checker itself must catch a wrong gradient: one corrupted coordinate fails. */
TEST(gradcheck_catches_a_wrong_gradient)
{
    fixture f;
    gc_result r;
    fixture_init(&f, 0, 0.0f, ESFT_AUX_BATCH, 1, ESFT_GATING_SOFTMAX);
    CHECK(fixture_build(&f));
    CHECK(run_backward(&f));
    f.layer.d_router[7] *= 1.1f;
    f.layer.d_router[7] += 0.05f;
    r = gc_check(f.layer.router, (size_t)TE * TD, f.layer.d_router, 1, loss_fn, &f, &tol);
    CHECK_EQ_INT(r.failed, 1);
    CHECK_EQ_INT(r.worst, 7);
    fixture_free(&f);
}

/* The aux loss value against f and P computed here from esft_route's output. */
TEST(aux_loss_value_matches_definition)
{
    fixture f;
    float aux = 0.0f, logits[TT * TE], probs[TT * TE], wts[TT * TK];
    int32_t ids[TT * TK];
    double want = 0.0;
    int s, t, e, j, d, S = 3;
    fixture_init(&f, 0, 0.25f, ESFT_AUX_SEQUENCE, 0, ESFT_GATING_SOFTMAX);
    CHECK(fixture_build(&f));
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, &aux, f.x, f.ws, f.ws_bytes, TT, NULL), ESFT_OK);
    for (t = 0; t < TT; t++)
        for (e = 0; e < TE; e++) {
            double v = 0.0;
            for (d = 0; d < TD; d++) v += (double)f.x[t * TD + d] * f.router[e * TD + d];
            logits[t * TE + e] = (float)v;
        }
    CHECK_STATUS(esft_route(&f.cfg.route, ids, wts, probs, logits, TT, NULL), ESFT_OK);
    for (s = 0; s < TT / S; s++) {
        double fi[TE] = {0}, P[TE] = {0}, sum = 0.0;
        for (t = s * S; t < (s + 1) * S; t++) {
            for (j = 0; j < TK; j++) fi[ids[t * TK + j]] += 1.0 / (S * TK);
            for (e = 0; e < TE; e++) P[e] += probs[t * TE + e] / S;
        }
        for (e = 0; e < TE; e++) sum += fi[e] * P[e];
        want += 0.25 * TE * sum / (TT / S);
    }
    CHECK_NEAR(aux, want, 1e-6);
    CHECK(aux > 0.1f); /* balanced routing gives alpha = 0.25; not a vacuous 0 */
    fixture_free(&f);
}

/* A case small enough to do by hand: D 2, E 2, K 1, F 1, FS 1, T 2, router = I. */
TEST(forward_hand_case)
{
    float router[4] = {1, 0, 0, 1};
    float gate[4] = {1, 1, /* expert 1 */ 0, 1}, up[4] = {1, 0, /* e1 */ 1, 1};
    float down[4] = {1, 2, /* e1 */ -1, 0.5f};
    float sg[2] = {1, 0}, su[2] = {0, 1}, sd[2] = {0.5f, -1};
    float x[4] = {2, 0, /* token 1 */ -1, 1}, y[4], aux;
    esft_moe_config c = esft_moe_config_init(2, 2, 1, 1, 1);
    esft_moe_weights w = {router, gate, up, down, sg, su, sd, NULL};
    esft_moe m;
    size_t bytes;
    void *ws;
    double s2 = 1.0 / (1.0 + exp(-2.0)), p0, silu, shared, p1, g1;
    CHECK_STATUS(esft_moe_init(&m, &c, &w, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_moe_workspace_size(&c, 2, &bytes, NULL), ESFT_OK);
    ws = malloc(bytes);
    CHECK_STATUS(esft_moe_forward(&m, y, &aux, x, ws, bytes, 2, NULL), ESFT_OK);
    /* token 0: logits (2, 0) -> expert 0 with p = sigmoid(2); g = 2, u = 2;
       act = silu(2) * 2; out = act * (1, 2). Shared: g = 2, u = 0 -> 0. */
    p0 = s2;
    silu = 2.0 * s2;
    CHECK_NEAR(y[0], p0 * silu * 2.0 * 1.0, 1e-5);
    CHECK_NEAR(y[1], p0 * silu * 2.0 * 2.0, 1e-5);
    /* token 1: logits (-1, 1) -> expert 1 with p = sigmoid(2); g = 1, u = 0 -> 0.
       Shared: g = -1, u = 1, act = silu(-1) = -sigmoid(-1); out = act * (0.5, -1). */
    p1 = s2;
    g1 = 1.0 * (1.0 / (1.0 + exp(1.0)));
    shared = -g1;
    CHECK_NEAR(y[2], p1 * 0.0 + shared * 0.5, 1e-5);
    CHECK_NEAR(y[3], shared * -1.0, 1e-5);
    CHECK_NEAR(aux, 0.0, 0.0);
    free(ws);
    esft_moe_uninit(&m);
}

/* Same input, same bits. */
TEST(forward_is_deterministic)
{
    fixture f;
    float y2[TT * TD];
    fixture_init(&f, 1, 0.1f, ESFT_AUX_BATCH, 0, ESFT_GATING_SOFTMAX);
    CHECK(fixture_build(&f));
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, NULL, f.x, f.ws, f.ws_bytes, TT, NULL), ESFT_OK);
    memcpy(y2, f.y, sizeof y2);
    memset(f.ws, 0x7f, f.ws_bytes);
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, NULL, f.x, f.ws, f.ws_bytes, TT, NULL), ESFT_OK);
    CHECK(memcmp(y2, f.y, sizeof y2) == 0);
    fixture_free(&f);
}

/* The forward's routing is published (esft_moe_workspace_view_at): its ids and
   weights feed esft_stats_add with no second router pass, and equal what
   esft_route gives on the same router and x. */
TEST(forward_routing_feeds_statistics)
{
    fixture f;
    esft_moe_workspace_view v;
    esft_moe_workspace_layout L;
    esft_stats a, b;
    int32_t ids[TT * TK];
    float w[TT * TK];
    int i;
    fixture_init(&f, 1, 0.0f, ESFT_AUX_BATCH, 0, ESFT_GATING_SOFTMAX);
    CHECK(fixture_build(&f));
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, NULL, f.x, f.ws, f.ws_bytes, TT, NULL), ESFT_OK);
    CHECK_STATUS(esft_moe_workspace_view_at(&f.cfg, TT, f.ws, &v, NULL), ESFT_OK);
    CHECK_STATUS(esft_moe_workspace_regions(&f.cfg, TT, &L, NULL), ESFT_OK);
    CHECK(L.bytes == f.ws_bytes && (char *)v.ids == (char *)v.header + L.ids && L.ids % 64 == 0);
    {
        float logits[TT * TE];
        int t, e, d;
        for (t = 0; t < TT; t++)
            for (e = 0; e < TE; e++) {
                float s = 0.0f;
                for (d = 0; d < TD; d++) s += f.x[t * TD + d] * f.router[e * TD + d];
                logits[t * TE + e] = s;
            }
        CHECK_STATUS(esft_route(&f.cfg.route, ids, w, NULL, logits, TT, NULL), ESFT_OK);
    }
    for (i = 0; i < TT * TK; i++) {
        CHECK_EQ_INT(v.ids[i], ids[i]);
        CHECK_NEAR(v.weights[i], w[i], 1e-6);
    }
    CHECK_STATUS(esft_stats_init(&a, 1, TE, TK, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_init(&b, 1, TE, TK, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_add(&a, 0, v.ids, v.weights, NULL, TT, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_add(&b, 0, ids, v.weights, NULL, TT, NULL), ESFT_OK);
    CHECK(memcmp(a.count, b.count, TE * sizeof(uint64_t)) == 0 && a.n_tokens[0] == TT);
    esft_stats_uninit(&a);
    esft_stats_uninit(&b);
    fixture_free(&f);
}

/* Same bits on 1 and 3 threads (y, dx, gradients). The layer is just large
   enough (T K F D >= 2^22) for the kernels to share work among threads when
   built with -fopenmp, as make does. */
TEST(same_bits_for_any_thread_count)
{
    enum { BD = 256, BE = 8, BK = 2, BF = 128, BFS = 64, BT = 72 };
    unsigned char trainable[BE] = {0, 1, 0, 0, 1, 1, 0, 0};
    esft_moe_config c = esft_moe_config_init(BD, BE, BK, BF, BFS);
    esft_moe_weights w;
    esft_moe m;
    size_t efd = (size_t)BE * BF * BD, bytes, n = (size_t)BT * BD;
    float *x = calloc(n, 4), *dy = calloc(n, 4), *y[2], *dx[2], *g[2];
    void *ws;
    int run;
    rng_state = 99u;
    w.router = calloc((size_t)BE * BD, 4); w.gate = calloc(efd, 4); w.up = calloc(efd, 4); w.down = calloc(efd, 4);
    w.shared_gate = calloc((size_t)BFS * BD, 4); w.shared_up = calloc((size_t)BFS * BD, 4);
    w.shared_down = calloc((size_t)BFS * BD, 4);
    fill((float *)w.router, (size_t)BE * BD, 0.1f); fill((float *)w.gate, efd, 0.1f); fill((float *)w.up, efd, 0.1f);
    fill((float *)w.down, efd, 0.1f); fill((float *)w.shared_gate, (size_t)BFS * BD, 0.1f);
    fill((float *)w.shared_up, (size_t)BFS * BD, 0.1f); fill((float *)w.shared_down, (size_t)BFS * BD, 0.1f);
    fill(x, n, 1.0f); fill(dy, n, 1.0f);
    c.route.renormalize = 1;
    c.aux_alpha = 0.01f;
    c.trainable_experts = trainable;
    c.train_router = c.train_shared = 1;
    CHECK_STATUS(esft_moe_init(&m, &c, &w, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_moe_workspace_size(&c, BT, &bytes, NULL), ESFT_OK);
    ws = malloc(bytes);
    for (run = 0; run < 2; run++) {
        esft_set_num_threads(run == 0 ? 1 : 3);
        y[run] = calloc(n, 4); dx[run] = calloc(n, 4); g[run] = calloc(m.n_params, 4);
        esft_moe_zero_grad(&m);
        CHECK_STATUS(esft_moe_forward(&m, y[run], NULL, x, ws, bytes, BT, NULL), ESFT_OK);
        CHECK_STATUS(esft_moe_backward(&m, dx[run], dy, x, ws, bytes, BT, NULL), ESFT_OK);
        memcpy(g[run], m.grads, m.n_params * 4);
    }
    esft_set_num_threads(0);
    CHECK(memcmp(y[0], y[1], n * 4) == 0);
    CHECK(memcmp(dx[0], dx[1], n * 4) == 0);
    CHECK(memcmp(g[0], g[1], m.n_params * 4) == 0);
    for (run = 0; run < 2; run++) { free(y[run]); free(dx[run]); free(g[run]); }
    esft_moe_uninit(&m);
    free(ws); free(x); free(dy);
    free((void *)w.router); free((void *)w.gate); free((void *)w.up); free((void *)w.down);
    free((void *)w.shared_gate); free((void *)w.shared_up); free((void *)w.shared_down);
}

/* Only trainable tensors own memory: N = 2 experts x 3FD, nothing else. */
TEST(frozen_experts_own_no_gradient_memory)
{
    fixture f;
    size_t n = 0;
    const float *g, *u, *d;
    fixture_init(&f, 0, 0.0f, ESFT_AUX_BATCH, 0, ESFT_GATING_SOFTMAX);
    f.cfg.train_router = 0;
    f.cfg.train_shared = 0;
    CHECK(fixture_build(&f));
    CHECK_STATUS(esft_moe_param_count(&f.cfg, &n, NULL), ESFT_OK);
    CHECK_EQ_INT(n, 2 * 3 * TF * TD);
    CHECK_EQ_INT(f.layer.n_params, n);
    CHECK_EQ_INT(esft_moe_grad_bytes(&f.layer), n * 4);
    CHECK(f.layer.router == NULL && f.layer.d_router == NULL && f.layer.d_shared_gate == NULL);
    CHECK_STATUS(esft_moe_expert_weights(&f.layer, 0, &g, &u, &d, NULL), ESFT_OK);
    CHECK(g == f.gate && u == f.up && d == f.down); /* frozen: the caller's arrays */
    CHECK_STATUS(esft_moe_expert_weights(&f.layer, 4, &g, &u, &d, NULL), ESFT_OK);
    CHECK(g == f.layer.params + 3 * TF * TD); /* trainable: second slot of the block */
    CHECK(memcmp(g, f.gate + 4 * TF * TD, TF * TD * 4) == 0);
    CHECK(run_backward(&f)); /* the backward runs with no gradient memory for them */
    fixture_free(&f);
}

static int same_bits(const float *a, const float *b, size_t n) { return memcmp(a, b, n * 4) == 0; }

/* After steps of AdamW, frozen tensors are bit-identical and trainable ones moved. */
TEST(freezing_is_real)
{
    fixture f;
    esft_adamw opt;
    esft_adamw_config oc = esft_adamw_config_esft();
    size_t efd = (size_t)TE * TF * TD, fd = (size_t)TF * TD, grad_bytes, opt_bytes;
    float *copy[7];
    const float *orig[7];
    size_t sizes[7];
    int i, e, step;
    fixture_init(&f, 0, 0.001f, ESFT_AUX_SEQUENCE, 0, ESFT_GATING_SOFTMAX);
    f.cfg.train_router = 0;
    f.cfg.train_shared = 0;
    CHECK(fixture_build(&f));
    orig[0] = f.router; orig[1] = f.gate; orig[2] = f.up; orig[3] = f.down; orig[4] = f.sg; orig[5] = f.su; orig[6] = f.sd;
    sizes[0] = (size_t)TE * TD; sizes[1] = sizes[2] = sizes[3] = efd; sizes[4] = sizes[5] = sizes[6] = (size_t)TFS * TD;
    for (i = 0; i < 7; i++) { copy[i] = malloc(sizes[i] * 4); memcpy(copy[i], orig[i], sizes[i] * 4); }
    oc.lr = 1e-2f; /* large enough that every trainable weight visibly moves */
    CHECK_STATUS(esft_adamw_init(&opt, &oc, f.layer.n_params, NULL, NULL), ESFT_OK);
    for (step = 0; step < 5; step++) {
        CHECK(run_backward(&f));
        CHECK_STATUS(esft_adamw_step(&opt, f.layer.params, f.layer.grads, NULL), ESFT_OK);
    }
    for (i = 0; i < 7; i++) CHECK_MSG(same_bits(copy[i], orig[i], sizes[i]), "frozen tensor %d changed", i);
    for (e = 0; e < TE; e++) {
        const float *g, *u, *d;
        int moved = 0;
        size_t k;
        CHECK_STATUS(esft_moe_expert_weights(&f.layer, e, &g, &u, &d, NULL), ESFT_OK);
        for (k = 0; k < fd; k++)
            moved += g[k] != f.gate[e * fd + k] && u[k] != f.up[e * fd + k] && d[k] != f.down[e * fd + k];
        if (f.trainable[e]) CHECK_MSG(moved == (int)fd, "trainable expert %d: %d of %d weights moved", e, moved, (int)fd);
        else CHECK_MSG(moved == 0, "frozen expert %d moved", e);
    }
    grad_bytes = esft_moe_grad_bytes(&f.layer);
    opt_bytes = esft_adamw_state_bytes(&opt);
    printf("     gradient + optimizer bytes = %lu + %lu = %lu = 3 x %lu trainable params x 4\n",
           (unsigned long)grad_bytes, (unsigned long)opt_bytes, (unsigned long)(grad_bytes + opt_bytes),
           (unsigned long)f.layer.n_params);
    CHECK_EQ_INT(f.layer.n_params, 2 * 3 * fd);
    CHECK_EQ_INT(grad_bytes + opt_bytes, 3 * f.layer.n_params * 4);
    for (i = 0; i < 7; i++) free(copy[i]);
    esft_adamw_uninit(&opt);
    fixture_free(&f);
}

/* AdamW against the formula, in double, for three steps. */
TEST(adamw_matches_formula)
{
    esft_adamw opt;
    esft_adamw_config c = esft_adamw_config_init();
    float p[3] = {0.5f, -1.0f, 2.0f}, g[3] = {0.1f, -0.2f, 0.0f};
    double P[3] = {0.5, -1.0, 2.0}, M[3] = {0}, V[3] = {0};
    int step, i;
    c.lr = 0.01f; c.beta1 = 0.8f; c.beta2 = 0.9f; c.eps = 1e-6f; c.weight_decay = 0.5f;
    CHECK_STATUS(esft_adamw_init(&opt, &c, 3, NULL, NULL), ESFT_OK);
    for (step = 1; step <= 3; step++) {
        CHECK_STATUS(esft_adamw_step(&opt, p, g, NULL), ESFT_OK);
        for (i = 0; i < 3; i++) {
            M[i] = 0.8 * M[i] + 0.2 * g[i];
            V[i] = 0.9 * V[i] + 0.1 * (double)g[i] * g[i];
            P[i] = P[i] * (1.0 - 0.01 * 0.5) -
                   0.01 * (M[i] / (1 - pow(0.8, step))) / (sqrt(V[i] / (1 - pow(0.9, step))) + 1e-6);
            CHECK_NEAR(p[i], P[i], 1e-6);
        }
    }
    CHECK_EQ_INT(opt.step, 3);
    CHECK(p[2] < 2.0f); /* zero gradient: weight decay alone still shrinks it */
    esft_adamw_uninit(&opt);
    c = esft_adamw_config_esft();
    CHECK_NEAR(c.lr, 1e-5, 1e-12); CHECK_NEAR(c.beta1, 0.9, 1e-7); CHECK_NEAR(c.beta2, 0.95, 1e-7);
    CHECK_NEAR(c.weight_decay, 0.1, 1e-7);
}

TEST(clip_grad_norm_over_blocks)
{
    float a[2] = {3, 0}, b[1] = {4};
    float *blocks[2] = {a, b};
    size_t sizes[2] = {2, 1};
    double norm = 0;
    CHECK_STATUS(esft_clip_grad_norm(blocks, sizes, 2, 10.0f, &norm, NULL), ESFT_OK);
    CHECK_NEAR(norm, 5.0, 1e-12);
    CHECK(a[0] == 3.0f && b[0] == 4.0f); /* under the limit: untouched */
    CHECK_STATUS(esft_clip_grad_norm(blocks, sizes, 2, 1.0f, &norm, NULL), ESFT_OK);
    CHECK_NEAR(a[0], 3.0 / (5.0 + 1e-6), 1e-6);
    CHECK_NEAR(b[0], 4.0 / (5.0 + 1e-6), 1e-6);
    a[1] = NAN;
    CHECK_STATUS(esft_clip_grad_norm(blocks, sizes, 2, 1.0f, &norm, NULL), ESFT_ERR_NUMERIC);
    CHECK_STATUS(esft_clip_grad_norm(NULL, sizes, 2, 1.0f, &norm, NULL), ESFT_ERR_INVALID_ARGUMENT);
}

/* The clipping of esft.h before the backend ops, kept here as the reference:
   one running double sum over all blocks in order, then one float factor. */
static double clip_reference(float **blocks, const size_t *sizes, int n_blocks, float max_norm)
{
    double sum = 0.0, total;
    int b;
    size_t i;
    for (b = 0; b < n_blocks; b++)
        for (i = 0; i < sizes[b]; i++) sum += (double)blocks[b][i] * blocks[b][i];
    total = sqrt(sum);
    if (max_norm > 0.0f && total > max_norm) {
        float scale = (float)(max_norm / (total + 1e-6));
        for (b = 0; b < n_blocks; b++)
            for (i = 0; i < sizes[b]; i++) blocks[b][i] *= scale;
    }
    return total;
}

/* esft_clip_grad_norm_with(esft_backend_cpu()) and esft_clip_grad_norm give the
   reference's bits: the norm and every clipped float, over blocks of odd sizes
   (an empty one among them), clipping and measuring only. */
TEST(clip_grad_norm_with_cpu_backend_is_the_reference_bit_for_bit)
{
    size_t sizes[4] = {1001, 0, 3, 70000}, total = 1001 + 3 + 70000, k;
    float *ref = (float *)malloc(total * sizeof(float)), *got = (float *)malloc(total * sizeof(float));
    float *got2 = (float *)malloc(total * sizeof(float));
    float *rb[4], *gb[4], *gb2[4];
    double want, norm = -1.0, norm2 = -1.0;
    int b, max_i;
    static const float maxes[3] = {0.5f, 1e6f, 0.0f}; /* clips; under the limit; measure only */
    CHECK(ref && got && got2);
    for (max_i = 0; max_i < 3; max_i++) {
        size_t off = 0;
        rng_state = 77;
        fill(ref, total, 0.01f);
        memcpy(got, ref, total * sizeof(float));
        memcpy(got2, ref, total * sizeof(float));
        for (b = 0; b < 4; b++) {
            rb[b] = ref + off; gb[b] = got + off; gb2[b] = got2 + off;
            off += sizes[b];
        }
        want = clip_reference(rb, sizes, 4, maxes[max_i]);
        CHECK_STATUS(esft_clip_grad_norm_with(esft_backend_cpu(), gb, sizes, 4, maxes[max_i], &norm, NULL), ESFT_OK);
        CHECK_STATUS(esft_clip_grad_norm(gb2, sizes, 4, maxes[max_i], &norm2, NULL), ESFT_OK);
        CHECK(memcmp(&norm, &want, sizeof norm) == 0 && memcmp(&norm2, &want, sizeof norm) == 0);
        for (k = 0; k < total; k++)
            if (memcmp(got + k, ref + k, 4) != 0 || memcmp(got2 + k, ref + k, 4) != 0) break;
        CHECK_MSG(k == total, "max_norm %g: element %lu differs", maxes[max_i], (unsigned long)k);
    }
    CHECK(want > 0.5 && want < 1e6); /* the three cases are what they say */
    free(ref); free(got); free(got2);
}

/* Refused calls change nothing: bad arguments, a backend without the ops
   (the scale op is needed only to clip), NaN and Inf gradients. */
TEST(clip_grad_norm_with_refuses_bad_arguments_and_non_finite_gradients)
{
    float a[3] = {3, 0, 0}, b[1] = {4}, keep[3];
    float *blocks[2] = {a, b}, *holes[2] = {a, NULL};
    size_t sizes[2] = {3, 1}, empty_second[2] = {3, 0};
    double norm = -1.0;
    esft_backend no_ops = *esft_backend_cpu(), old = *esft_backend_cpu();
    esft_error err;
    const esft_backend *cpu = esft_backend_cpu();
    no_ops.sum_squares = NULL;
    no_ops.scale = NULL;
    old.api_version = 1;
    CHECK_STATUS(esft_clip_grad_norm_with(NULL, blocks, sizes, 2, 1.0f, &norm, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_clip_grad_norm_with(cpu, NULL, sizes, 2, 1.0f, &norm, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_clip_grad_norm_with(cpu, blocks, NULL, 2, 1.0f, &norm, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_clip_grad_norm_with(cpu, blocks, sizes, -1, 1.0f, &norm, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_clip_grad_norm_with(cpu, holes, sizes, 2, 1.0f, &norm, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strcmp(err.message, "block 1 is NULL") == 0, "%s", err.message);
    CHECK_STATUS(esft_clip_grad_norm_with(&old, blocks, sizes, 2, 1.0f, &norm, NULL), ESFT_ERR_UNSUPPORTED);
    CHECK_STATUS(esft_clip_grad_norm_with(&no_ops, blocks, sizes, 2, 1.0f, &norm, &err), ESFT_ERR_UNSUPPORTED);
    CHECK_MSG(strstr(err.message, "sum_squares") != NULL, "%s", err.message);
    no_ops.sum_squares = cpu->sum_squares;
    CHECK_STATUS(esft_clip_grad_norm_with(&no_ops, blocks, sizes, 2, 1.0f, &norm, &err), ESFT_ERR_UNSUPPORTED);
    CHECK_MSG(strstr(err.message, "scale") != NULL, "%s", err.message);
    CHECK(norm == -1.0 && a[0] == 3.0f && b[0] == 4.0f); /* nothing measured or scaled so far */
    CHECK_STATUS(esft_clip_grad_norm_with(&no_ops, blocks, sizes, 2, 0.0f, &norm, NULL), ESFT_OK); /* measures */
    CHECK_NEAR(norm, 5.0, 1e-12);
    CHECK_STATUS(esft_clip_grad_norm_with(cpu, holes, empty_second, 2, 10.0f, &norm, NULL), ESFT_OK);
    CHECK_NEAR(norm, 3.0, 1e-12); /* a NULL block of size 0 is no block */
    a[1] = NAN;
    memcpy(keep, a, sizeof keep);
    norm = -1.0;
    CHECK_STATUS(esft_clip_grad_norm_with(cpu, blocks, sizes, 2, 1.0f, &norm, &err), ESFT_ERR_NUMERIC);
    CHECK_MSG(strcmp(err.message, "gradient norm is not finite") == 0, "%s", err.message);
    a[1] = 0.0f;
    b[0] = INFINITY;
    CHECK_STATUS(esft_clip_grad_norm_with(cpu, blocks, sizes, 2, 1.0f, &norm, NULL), ESFT_ERR_NUMERIC);
    CHECK(norm == -1.0 && a[0] == keep[0] && a[2] == keep[2]); /* norm not written, nothing scaled */
}

/* Bad configs and arguments: a clear status and nothing written. */
TEST(bad_inputs_write_nothing)
{
    fixture f;
    esft_moe bad;
    esft_moe_config c;
    esft_error err;
    size_t bytes, i, n = (size_t)TT * TD;
    float sentinel[TT * TD], aux = 42.0f;
    fixture_init(&f, 0, 0.1f, ESFT_AUX_SEQUENCE, 0, ESFT_GATING_SOFTMAX);
    CHECK(fixture_build(&f));
    c = f.cfg; c.route.top_k = TE + 1;
    CHECK_STATUS(esft_moe_init(&bad, &c, &f.w, NULL, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "top_k") != NULL);
    c = f.cfg; c.d_model = 0;
    CHECK_STATUS(esft_moe_workspace_size(&c, 4, &bytes, NULL), ESFT_ERR_INVALID_ARGUMENT);
    c = f.cfg; c.aux_seq_len = 0;
    CHECK_STATUS(esft_moe_config_validate(&c, NULL), ESFT_ERR_INVALID_ARGUMENT);
    c = f.cfg; c.route.gating = ESFT_GATING_SIGMOID;
    CHECK_STATUS(esft_moe_config_validate(&c, NULL), ESFT_ERR_UNSUPPORTED);
    c = f.cfg; c.aux_alpha = NAN;
    CHECK_STATUS(esft_moe_config_validate(&c, NULL), ESFT_ERR_INVALID_ARGUMENT);
    { esft_moe_weights w = f.w; w.shared_down = NULL;
      CHECK_STATUS(esft_moe_init(&bad, &f.cfg, &w, NULL, NULL), ESFT_ERR_INVALID_ARGUMENT); }
    CHECK_STATUS(esft_moe_init(&bad, &f.cfg, NULL, NULL, NULL), ESFT_ERR_INVALID_ARGUMENT);

    for (i = 0; i < n; i++) f.y[i] = sentinel[i] = -7.0f;
    CHECK_STATUS(esft_moe_forward(&f.layer, NULL, NULL, f.x, f.ws, f.ws_bytes, TT, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, NULL, NULL, f.ws, f.ws_bytes, TT, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, NULL, f.x, NULL, f.ws_bytes, TT, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_moe_forward(NULL, f.y, NULL, f.x, f.ws, f.ws_bytes, TT, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, &aux, f.x, f.ws, f.ws_bytes - 1, TT, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "workspace") != NULL);
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, &aux, f.x, f.ws, f.ws_bytes, TT - 1, &err), ESFT_ERR_SHAPE);
    f.x[3 * TD + 5] = NAN;
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, &aux, f.x, f.ws, f.ws_bytes, TT, &err), ESFT_ERR_NUMERIC);
    CHECK(strstr(err.message, "x[3][5]") != NULL);
    f.x[3 * TD + 5] = 0.25f;
    f.layer.router[2] = INFINITY; /* a router weight: logits become non-finite */
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, &aux, f.x, f.ws, f.ws_bytes, TT, &err), ESFT_ERR_NUMERIC);
    f.layer.router[2] = 0.1f;
    CHECK(same_bits(f.y, sentinel, n));
    CHECK(aux == 42.0f);

    /* backward: NaN in dy, nothing accumulated */
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, &aux, f.x, f.ws, f.ws_bytes, TT, NULL), ESFT_OK);
    esft_moe_zero_grad(&f.layer);
    for (i = 0; i < n; i++) f.dx[i] = sentinel[i];
    f.r[7] = NAN;
    CHECK_STATUS(esft_moe_backward(&f.layer, f.dx, f.r, f.x, f.ws, f.ws_bytes, TT, &err), ESFT_ERR_NUMERIC);
    CHECK(strstr(err.message, "dy[0][7]") != NULL);
    CHECK(same_bits(f.dx, sentinel, n));
    for (i = 0; i < f.layer.n_params; i++) CHECK(f.layer.grads[i] == 0.0f);
    CHECK_STATUS(esft_moe_backward(&f.layer, NULL, f.r, f.x, f.ws, f.ws_bytes, TT, NULL), ESFT_ERR_INVALID_ARGUMENT);

    /* AdamW: NaN gradient, parameters untouched */
    {
        esft_adamw opt;
        esft_adamw_config oc = esft_adamw_config_esft();
        float p[2] = {1, 2}, g[2] = {0.5f, NAN};
        CHECK_STATUS(esft_adamw_init(&opt, &oc, 2, NULL, NULL), ESFT_OK);
        CHECK_STATUS(esft_adamw_step(&opt, p, g, NULL), ESFT_ERR_NUMERIC);
        CHECK(p[0] == 1.0f && p[1] == 2.0f && opt.m[0] == 0.0f && opt.step == 0);
        CHECK_STATUS(esft_adamw_step(&opt, NULL, g, NULL), ESFT_ERR_INVALID_ARGUMENT);
        esft_adamw_uninit(&opt);
        oc.beta2 = 1.0f;
        CHECK_STATUS(esft_adamw_init(&opt, &oc, 2, NULL, NULL), ESFT_ERR_INVALID_ARGUMENT);
    }
    fixture_free(&f);
}

/* The workspace's regions move with T: a backward of another T than the
   forward's read the saved routing from the wrong places (an ASan heap overflow).
   The forward stamps the workspace; the backward checks the stamp, as PESC
   checks saved->T. */
TEST(backward_needs_a_successful_forward_of_the_same_T_on_the_workspace)
{
    fixture f;
    esft_error err;
    size_t i, n = (size_t)TT * TD;
    fixture_init(&f, 0, 0.0f, ESFT_AUX_BATCH, 0, ESFT_GATING_SOFTMAX);
    CHECK(fixture_build(&f));
    memset(f.ws, 0, f.ws_bytes);
    esft_moe_zero_grad(&f.layer);
    CHECK_STATUS(esft_moe_backward(&f.layer, f.dx, f.r, f.x, f.ws, f.ws_bytes, TT, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strstr(err.message, "holds no forward") != NULL, "%s", err.message);
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, NULL, f.x, f.ws, f.ws_bytes, TT, NULL), ESFT_OK);
    CHECK_STATUS(esft_moe_backward(&f.layer, f.dx, f.r, f.x, f.ws, f.ws_bytes, TT - 2, &err),
                 ESFT_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strstr(err.message, "backward of 4 tokens, the last forward had 6") != NULL, "%s", err.message);
    for (i = 0; i < n; i++) CHECK(f.dx[i] == 0.0f);
    for (i = 0; i < f.layer.n_params; i++) CHECK(f.layer.grads[i] == 0.0f);
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, NULL, f.x, f.ws, f.ws_bytes, TT - 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_moe_backward(&f.layer, f.dx, f.r, f.x, f.ws, f.ws_bytes, TT, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_moe_backward(&f.layer, f.dx, f.r, f.x, f.ws, f.ws_bytes, TT - 2, &err), ESFT_OK);
    /* a forward that fails inside the op leaves nothing for a backward */
    f.layer.router[2] = INFINITY;
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, NULL, f.x, f.ws, f.ws_bytes, TT - 2, NULL), ESFT_ERR_NUMERIC);
    f.layer.router[2] = 0.1f;
    CHECK_STATUS(esft_moe_backward(&f.layer, f.dx, f.r, f.x, f.ws, f.ws_bytes, TT - 2, &err),
                 ESFT_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strstr(err.message, "failed") != NULL, "%s", err.message);
    fixture_free(&f);
}

/* Finite inputs, non-finite outputs: a NaN weight, or values whose SwiGLU
   passes FLT_MAX. The layer used to return ESFT_OK with NaN in y (PESC did not). */
TEST(non_finite_outputs_of_finite_inputs_are_numeric_errors)
{
    fixture f;
    esft_error err;
    size_t i, n = (size_t)TT * TD;
    float keep;
    fixture_init(&f, 0, 0.0f, ESFT_AUX_BATCH, 0, ESFT_GATING_SOFTMAX);
    CHECK(fixture_build(&f));
    keep = f.layer.shared_gate[0];
    f.layer.shared_gate[0] = NAN; /* every token goes through the shared block */
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, NULL, f.x, f.ws, f.ws_bytes, TT, &err), ESFT_ERR_NUMERIC);
    CHECK_MSG(strstr(err.message, "y[0][0] is NaN") != NULL && strstr(err.message, "weight") != NULL, "%s",
              err.message);
    f.layer.shared_gate[0] = keep;
    for (i = 0; i < n; i++) f.x[i] = f.x[i] < 0 ? -1e22f : 1e22f; /* finite; g * u ~ 1e44 */
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, NULL, f.x, f.ws, f.ws_bytes, TT, &err), ESFT_ERR_NUMERIC);
    CHECK_MSG(strstr(err.message, "overflowed") != NULL, "%s", err.message);
    /* backward: dy near FLT_MAX makes dx overflow */
    fill(f.x, n, 1.0f);
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, NULL, f.x, f.ws, f.ws_bytes, TT, NULL), ESFT_OK);
    for (i = 0; i < n; i++) f.r[i] = 3e38f;
    CHECK_STATUS(esft_moe_backward(&f.layer, f.dx, f.r, f.x, f.ws, f.ws_bytes, TT, &err), ESFT_ERR_NUMERIC);
    CHECK_MSG(strstr(err.message, "dx[") != NULL, "%s", err.message);
    fixture_free(&f);
}

/* A backend without the op: ESFT_ERR_UNSUPPORTED, never a silent CPU fallback. */
TEST(missing_backend_op_is_unsupported)
{
    fixture f;
    esft_backend partial = *esft_backend_cpu();
    esft_adamw opt;
    esft_adamw_config oc = esft_adamw_config_esft();
    esft_error err;
    partial.name = "partial";
    partial.moe_forward = NULL;
    partial.moe_backward = NULL;
    partial.adamw_step = NULL;
    fixture_init(&f, 0, 0.0f, ESFT_AUX_BATCH, 0, ESFT_GATING_SOFTMAX);
    CHECK(fixture_build(&f));
    f.layer.backend = &partial;
    CHECK_STATUS(esft_moe_forward(&f.layer, f.y, NULL, f.x, f.ws, f.ws_bytes, TT, &err), ESFT_ERR_UNSUPPORTED);
    CHECK(strstr(err.message, "moe_forward") != NULL);
    CHECK_STATUS(esft_moe_backward(&f.layer, f.dx, f.r, f.x, f.ws, f.ws_bytes, TT, NULL), ESFT_ERR_UNSUPPORTED);
    CHECK_STATUS(esft_adamw_init(&opt, &oc, 4, NULL, NULL), ESFT_OK);
    opt.backend = &partial;
    { float p[4] = {0}, g[4] = {0};
      CHECK_STATUS(esft_adamw_step(&opt, p, g, NULL), ESFT_ERR_UNSUPPORTED); }
    esft_adamw_uninit(&opt);
    fixture_free(&f);
}

/* A backend with memory of its own (the CPU's ops, but alloc/free/upload/
   download of its own, counted): esft_moe_set_backend and esft_adamw_set_backend
   put the blocks there (through its entries), the results are the CPU's bits,
   and uninit frees through it. The same path a GPU backend takes. */
TEST(a_backend_with_its_own_memory_gets_the_blocks)
{
    fixture cpu, own;
    esft_backend b = own_memory_backend();
    esft_adamw oc_cpu, oc_own;
    esft_adamw_config ac = esft_adamw_config_init();
    esft_error err;
    float aux_c = 0.0f, aux_o = 0.0f, *params_before;
    int step;
    fixture_init(&cpu, 1, 0.3f, ESFT_AUX_SEQUENCE, 0, ESFT_GATING_SOFTMAX);
    fixture_init(&own, 1, 0.3f, ESFT_AUX_SEQUENCE, 0, ESFT_GATING_SOFTMAX);
    CHECK(fixture_build(&cpu) && fixture_build(&own));
    CHECK_STATUS(esft_moe_set_backend(&own.layer, &b, NULL, &err), ESFT_ERR_INVALID_ARGUMENT); /* frozen needed */
    params_before = own.layer.params;
    CHECK_STATUS(esft_moe_set_backend(&own.layer, &b, &own.w, &err), ESFT_OK);
    CHECK(own.layer.params != params_before && own.layer.backend == &b && own_live == 2);
    CHECK(own.layer.router == own.layer.params + (size_t)2 * 3 * TF * TD); /* views follow the block */
    CHECK_STATUS(esft_adamw_init(&oc_cpu, &ac, cpu.layer.n_params, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_adamw_init(&oc_own, &ac, own.layer.n_params, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_adamw_set_backend(&oc_own, &b, &err), ESFT_OK);
    CHECK(own_live == 4);
    for (step = 0; step < 2; step++) {
        esft_moe_zero_grad(&cpu.layer);
        esft_moe_zero_grad(&own.layer);
        memset(cpu.dx, 0, (size_t)TT * TD * 4);
        memset(own.dx, 0, (size_t)TT * TD * 4);
        CHECK_STATUS(esft_moe_forward(&cpu.layer, cpu.y, &aux_c, cpu.x, cpu.ws, cpu.ws_bytes, TT, NULL), ESFT_OK);
        CHECK_STATUS(esft_moe_forward(&own.layer, own.y, &aux_o, own.x, own.ws, own.ws_bytes, TT, NULL), ESFT_OK);
        CHECK_STATUS(esft_moe_backward(&cpu.layer, cpu.dx, cpu.r, cpu.x, cpu.ws, cpu.ws_bytes, TT, NULL), ESFT_OK);
        CHECK_STATUS(esft_moe_backward(&own.layer, own.dx, own.r, own.x, own.ws, own.ws_bytes, TT, NULL), ESFT_OK);
        CHECK_STATUS(esft_adamw_step(&oc_cpu, cpu.layer.params, cpu.layer.grads, NULL), ESFT_OK);
        CHECK_STATUS(esft_adamw_step(&oc_own, own.layer.params, own.layer.grads, NULL), ESFT_OK);
        CHECK(aux_c == aux_o);
        CHECK(memcmp(cpu.y, own.y, (size_t)TT * TD * 4) == 0 && memcmp(cpu.dx, own.dx, (size_t)TT * TD * 4) == 0);
        CHECK(memcmp(cpu.layer.params, own.layer.params, cpu.layer.n_params * 4) == 0);
        CHECK(memcmp(oc_cpu.v, oc_own.v, oc_cpu.n * 4) == 0);
    }
    /* a NaN gradient is the op's to find, with the CPU's message */
    own.layer.grads[3] = NAN;
    CHECK_STATUS(esft_adamw_step(&oc_own, own.layer.params, own.layer.grads, &err), ESFT_ERR_NUMERIC);
    CHECK_MSG(strcmp(err.message, "gradient 3 is NaN") == 0, "%s", err.message);
    /* and back: the state moves with its values */
    CHECK_STATUS(esft_adamw_set_backend(&oc_own, esft_backend_cpu(), &err), ESFT_OK);
    CHECK(oc_own.memory == NULL && memcmp(oc_cpu.m, oc_own.m, oc_cpu.n * 4) == 0);
    esft_adamw_uninit(&oc_cpu);
    esft_adamw_uninit(&oc_own);
    fixture_free(&cpu);
    fixture_free(&own);
    CHECK_MSG(own_live == 0, "%d blocks of the backend not freed", own_live);
}

HARNESS_MAIN()
