/* test_stats.c - router statistics (ESFT Eq. 6-7): exact counts, masks, pooled
   and per-sample scores on hand-computed cases, merge order independence (same
   bits), and "invalid input adds nothing".
   Build: cc -std=c99 -I. tests/test_stats.c -lm (make does it). */
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"
#include "harness.h"
#include "own_memory.h"

#define ONE 4294967296.0 /* 2^32: one unit of weight in fixed point */

/* A copy of every array of an accumulator, to compare bits before and after. */
typedef struct snapshot {
    uint64_t a[6][64];
    int le, l;
} snapshot;

static void snap(snapshot *s, const esft_stats *st)
{
    memset(s, 0, sizeof *s);
    s->le = st->n_layers * st->n_experts;
    s->l = st->n_layers;
    memcpy(s->a[0], st->count, (size_t)s->le * 8);
    memcpy(s->a[1], st->gate_sum, (size_t)s->le * 8);
    memcpy(s->a[2], st->token_frac_sum, (size_t)s->le * 8);
    memcpy(s->a[3], st->gate_frac_sum, (size_t)s->le * 8);
    memcpy(s->a[4], st->n_tokens, (size_t)s->l * 8);
    memcpy(s->a[5], st->n_samples, (size_t)s->l * 8);
}

static int same_bits(const esft_stats *a, const esft_stats *b)
{
    size_t le = (size_t)a->n_layers * a->n_experts, l = (size_t)a->n_layers;
    return a->n_layers == b->n_layers && a->n_experts == b->n_experts && a->top_k == b->top_k &&
           memcmp(a->count, b->count, le * 8) == 0 && memcmp(a->gate_sum, b->gate_sum, le * 8) == 0 &&
           memcmp(a->token_frac_sum, b->token_frac_sum, le * 8) == 0 &&
           memcmp(a->gate_frac_sum, b->gate_frac_sum, le * 8) == 0 &&
           memcmp(a->n_tokens, b->n_tokens, l * 8) == 0 && memcmp(a->n_samples, b->n_samples, l * 8) == 0;
}

static int unchanged(const snapshot *s, const esft_stats *st)
{
    snapshot now;
    snap(&now, st);
    return memcmp(s->a, now.a, sizeof now.a) == 0;
}

/* Sample A (layer 0, K 2, E 4): three tokens, dyadic weights so sums are exact.
   token 0: experts 0,1 (0.5, 0.25); token 1: 1,2 (0.5, 0.125); token 2: 1,3 (0.25, 0.75) */
static const int32_t A_ids[6] = {0, 1, 1, 2, 1, 3};
static const float A_w[6] = {0.5f, 0.25f, 0.5f, 0.125f, 0.25f, 0.75f};
/* Sample B: one token: experts 2,3 (0.5, 0.5) */
static const int32_t B_ids[2] = {2, 3};
static const float B_w[2] = {0.5f, 0.5f};

/* A fresh accumulator (n_layers, E 4, K 2) holding samples A then B in `layer`;
   0 if any step fails. */
static int stats_of_a_and_b(esft_stats *st, int n_layers, int layer)
{
    return esft_stats_init(st, n_layers, 4, 2, NULL) == ESFT_OK &&
           esft_stats_add(st, layer, A_ids, A_w, NULL, 3, NULL) == ESFT_OK &&
           esft_stats_add(st, layer, B_ids, B_w, NULL, 1, NULL) == ESFT_OK;
}

TEST(exact_counts_and_fixed_point_sums)
{
    esft_stats st;
    CHECK_STATUS(esft_stats_init(&st, 2, 4, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_add(&st, 0, A_ids, A_w, NULL, 3, NULL), ESFT_OK);
    CHECK_EQ_INT(st.count[0], 1);
    CHECK_EQ_INT(st.count[1], 3);
    CHECK_EQ_INT(st.count[2], 1);
    CHECK_EQ_INT(st.count[3], 1);
    CHECK(st.gate_sum[0] == (uint64_t)(0.5 * ONE));
    CHECK(st.gate_sum[1] == (uint64_t)(1.0 * ONE));
    CHECK(st.gate_sum[2] == (uint64_t)(0.125 * ONE));
    CHECK(st.gate_sum[3] == (uint64_t)(0.75 * ONE));
    CHECK_EQ_INT(st.n_tokens[0], 3);
    CHECK_EQ_INT(st.n_samples[0], 1);
    CHECK_EQ_INT(st.n_tokens[1], 0); /* layer 1 untouched */
    CHECK_EQ_INT(st.count[4 + 1], 0);
    esft_stats_uninit(&st);
}

TEST(pooled_scores_hand_computed)
{
    esft_stats st;
    esft_scores sc;
    CHECK(stats_of_a_and_b(&st, 2, 1));
    CHECK_STATUS(esft_stats_scores(&st, ESFT_NORM_POOLED, &sc), ESFT_OK);
    /* N = 4 tokens, K = 2: token score count/8; gate score sum/4 */
    CHECK(!sc.layer_present[0] && sc.layer_present[1]);
    CHECK_NEAR(sc.token[4 + 0], 1.0 / 8, 0);
    CHECK_NEAR(sc.token[4 + 1], 3.0 / 8, 0);
    CHECK_NEAR(sc.token[4 + 2], 2.0 / 8, 0);
    CHECK_NEAR(sc.token[4 + 3], 2.0 / 8, 0);
    CHECK_NEAR(sc.gate[4 + 0], 0.5 / 4, 0);
    CHECK_NEAR(sc.gate[4 + 1], 1.0 / 4, 0);
    CHECK_NEAR(sc.gate[4 + 2], 0.625 / 4, 0);
    CHECK_NEAR(sc.gate[4 + 3], 1.25 / 4, 0);
    esft_scores_free(&sc);
    esft_stats_uninit(&st);
}

TEST(per_sample_scores_hand_computed_and_differ_from_pooled)
{
    esft_stats st;
    esft_scores ps, po;
    CHECK(stats_of_a_and_b(&st, 1, 0));
    CHECK_STATUS(esft_stats_scores(&st, ESFT_NORM_PER_SAMPLE, &ps), ESFT_OK);
    CHECK_STATUS(esft_stats_scores(&st, ESFT_NORM_POOLED, &po), ESFT_OK);
    /* sample A: counts 1,3,1,1 over K*N = 6; B: 0,0,1,1 over 2. Mean of the two. */
    CHECK_NEAR(ps.token[0], (1.0 / 6 + 0.0) / 2, 1e-9);
    CHECK_NEAR(ps.token[1], (3.0 / 6 + 0.0) / 2, 1e-9);
    CHECK_NEAR(ps.token[2], (1.0 / 6 + 1.0 / 2) / 2, 1e-9);
    CHECK_NEAR(ps.token[3], (1.0 / 6 + 1.0 / 2) / 2, 1e-9);
    /* gate: A sums 0.5, 1.0, 0.125, 0.75 over 3 tokens; B 0, 0, 0.5, 0.5 over 1 */
    CHECK_NEAR(ps.gate[0], (0.5 / 3 + 0.0) / 2, 1e-9);
    CHECK_NEAR(ps.gate[1], (1.0 / 3 + 0.0) / 2, 1e-9);
    CHECK_NEAR(ps.gate[2], (0.125 / 3 + 0.5) / 2, 1e-9);
    CHECK_NEAR(ps.gate[3], (0.75 / 3 + 0.5) / 2, 1e-9);
    CHECK(fabs(ps.token[1] - po.token[1]) > 0.1); /* 0.25 vs 0.375: the norms differ */
    esft_scores_free(&ps);
    esft_scores_free(&po);
    esft_stats_uninit(&st);
}

TEST(token_scores_sum_to_one_per_layer)
{
    esft_stats st;
    esft_scores sc;
    int norm, e;
    CHECK(stats_of_a_and_b(&st, 1, 0));
    for (norm = 0; norm < 2; norm++) {
        double sum = 0.0;
        CHECK_STATUS(esft_stats_scores(&st, (esft_norm)norm, &sc), ESFT_OK);
        for (e = 0; e < 4; e++) sum += sc.token[e];
        esft_scores_free(&sc);
        CHECK_NEAR(sum, 1.0, 1e-9);
    }
    esft_stats_uninit(&st);
}

TEST(mask_excludes_tokens)
{
    esft_stats st;
    esft_scores sc;
    const unsigned char mask[3] = {1, 0, 1}, none[3] = {0, 0, 0};
    CHECK_STATUS(esft_stats_init(&st, 1, 4, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_add(&st, 0, A_ids, A_w, mask, 3, NULL), ESFT_OK);
    /* token 1 (experts 1, 2) is not counted */
    CHECK_EQ_INT(st.count[0], 1);
    CHECK_EQ_INT(st.count[1], 2);
    CHECK_EQ_INT(st.count[2], 0);
    CHECK_EQ_INT(st.count[3], 1);
    CHECK(st.gate_sum[1] == (uint64_t)(0.5 * ONE));
    CHECK_EQ_INT(st.n_tokens[0], 2);
    /* a fully masked sample is not a sample */
    CHECK_STATUS(esft_stats_add(&st, 0, A_ids, A_w, none, 3, NULL), ESFT_OK);
    CHECK_EQ_INT(st.n_samples[0], 1);
    CHECK_STATUS(esft_stats_scores(&st, ESFT_NORM_PER_SAMPLE, &sc), ESFT_OK);
    CHECK_NEAR(sc.token[1], 2.0 / 4, 1e-9);
    CHECK_NEAR(sc.gate[3], 0.75 / 2, 1e-9);
    esft_scores_free(&sc);
    esft_stats_uninit(&st);
}

TEST(null_weights_count_tokens_only)
{
    esft_stats st;
    CHECK_STATUS(esft_stats_init(&st, 1, 4, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_add(&st, 0, A_ids, NULL, NULL, 3, NULL), ESFT_OK);
    CHECK_EQ_INT(st.count[1], 3);
    CHECK(st.gate_sum[1] == 0 && st.gate_frac_sum[1] == 0);
    esft_stats_uninit(&st);
}

/* ---- merging ----------------------------------------------------------- */

/* Deterministic random routing: T tokens of K distinct ids in [0, E). */
static unsigned rng_state;
static unsigned rng(void)
{
    rng_state = rng_state * 1664525u + 1013904223u;
    return rng_state >> 8;
}

static void random_sample(int32_t *ids, float *w, int T, int K, int E)
{
    int t, j, m;
    for (t = 0; t < T; t++)
        for (j = 0; j < K; j++) {
            int32_t id;
            do {
                id = (int32_t)(rng() % (unsigned)E);
                for (m = 0; m < j && ids[t * K + m] != id; m++) {}
            } while (m < j);
            ids[t * K + j] = id;
            w[t * K + j] = (float)(rng() % 100000) / 99991.0f; /* not dyadic: rounding matters */
        }
}

TEST(merge_in_any_order_gives_the_same_bits_as_one_accumulator)
{
    enum { L = 3, E = 8, K = 3, N_ACC = 4, N_SAMPLES = 40, TMAX = 37 };
    esft_stats part[N_ACC], all, m1, m2, m3;
    int32_t ids[TMAX * K];
    float w[TMAX * K];
    unsigned char mask[TMAX];
    int i, s, t;
    rng_state = 7;
    CHECK_STATUS(esft_stats_init(&all, L, E, K, NULL), ESFT_OK);
    for (i = 0; i < N_ACC; i++) CHECK_STATUS(esft_stats_init(&part[i], L, E, K, NULL), ESFT_OK);
    for (s = 0; s < N_SAMPLES; s++) {
        int T = 1 + (int)(rng() % TMAX), layer = (int)(rng() % L), who = (int)(rng() % N_ACC);
        random_sample(ids, w, T, K, E);
        for (t = 0; t < T; t++) mask[t] = rng() % 4 != 0;
        CHECK_STATUS(esft_stats_add(&part[who], layer, ids, w, mask, T, NULL), ESFT_OK);
        CHECK_STATUS(esft_stats_add(&all, layer, ids, w, mask, T, NULL), ESFT_OK);
    }
    /* ((0+1)+2)+3, 3+(2+(1+0)), (1+3)+(0+2) */
    CHECK_STATUS(esft_stats_init(&m1, L, E, K, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_init(&m2, L, E, K, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_init(&m3, L, E, K, NULL), ESFT_OK);
    for (i = 0; i < N_ACC; i++) CHECK_STATUS(esft_stats_merge(&m1, &part[i], NULL), ESFT_OK);
    for (i = N_ACC - 1; i >= 0; i--) CHECK_STATUS(esft_stats_merge(&m2, &part[i], NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_merge(&part[1], &part[3], NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_merge(&part[0], &part[2], NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_merge(&m3, &part[1], NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_merge(&m3, &part[0], NULL), ESFT_OK);
    CHECK(same_bits(&m1, &all));
    CHECK(same_bits(&m2, &all));
    CHECK(same_bits(&m3, &all));
    CHECK(all.n_tokens[0] + all.n_tokens[1] + all.n_tokens[2] > 0);
    {
        esft_scores a, b;
        CHECK_STATUS(esft_stats_scores(&all, ESFT_NORM_PER_SAMPLE, &a), ESFT_OK);
        CHECK_STATUS(esft_stats_scores(&m3, ESFT_NORM_PER_SAMPLE, &b), ESFT_OK);
        CHECK(memcmp(a.token, b.token, sizeof(double) * L * E) == 0);
        CHECK(memcmp(a.gate, b.gate, sizeof(double) * L * E) == 0);
        esft_scores_free(&a);
        esft_scores_free(&b);
    }
    for (i = 0; i < N_ACC; i++) esft_stats_uninit(&part[i]);
    esft_stats_uninit(&all);
    esft_stats_uninit(&m1);
    esft_stats_uninit(&m2);
    esft_stats_uninit(&m3);
}

TEST(merge_rejects_other_shapes)
{
    esft_stats a, b;
    esft_error err;
    snapshot before;
    CHECK_STATUS(esft_stats_init(&a, 2, 4, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_init(&b, 2, 4, 3, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_add(&a, 0, A_ids, A_w, NULL, 3, NULL), ESFT_OK);
    snap(&before, &a);
    CHECK_STATUS(esft_stats_merge(&a, &b, &err), ESFT_ERR_SHAPE);
    CHECK(unchanged(&before, &a));
    CHECK_STATUS(esft_stats_merge(&a, NULL, NULL), ESFT_ERR_INVALID_ARGUMENT);
    esft_stats_uninit(&a);
    esft_stats_uninit(&b);
}

/* ---- invalid input adds nothing -------------------------------------- */

TEST(invalid_input_adds_nothing)
{
    esft_stats st;
    esft_error err;
    snapshot before;
    int32_t ids[6];
    float w[6];
    CHECK_STATUS(esft_stats_init(&st, 2, 4, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_add(&st, 0, A_ids, A_w, NULL, 3, NULL), ESFT_OK);
    snap(&before, &st);

    memcpy(ids, A_ids, sizeof ids);
    memcpy(w, A_w, sizeof w);
    ids[5] = 4; /* the last id of the last token is out of range */
    CHECK_STATUS(esft_stats_add(&st, 0, ids, w, NULL, 3, &err), ESFT_ERR_RANGE);
    CHECK_MSG(strstr(err.message, "token 2") != NULL, "message: %s", err.message);
    CHECK(unchanged(&before, &st));
    ids[5] = -1;
    CHECK_STATUS(esft_stats_add(&st, 0, ids, w, NULL, 3, &err), ESFT_ERR_RANGE);
    CHECK(unchanged(&before, &st));

    memcpy(ids, A_ids, sizeof ids);
    w[4] = NAN;
    CHECK_STATUS(esft_stats_add(&st, 0, ids, w, NULL, 3, &err), ESFT_ERR_NUMERIC);
    CHECK(unchanged(&before, &st));
    w[4] = INFINITY;
    CHECK_STATUS(esft_stats_add(&st, 0, ids, w, NULL, 3, &err), ESFT_ERR_NUMERIC);
    CHECK(unchanged(&before, &st));
    w[4] = -0.25f;
    CHECK_STATUS(esft_stats_add(&st, 0, ids, w, NULL, 3, &err), ESFT_ERR_RANGE);
    CHECK(unchanged(&before, &st));

    CHECK_STATUS(esft_stats_add(&st, 2, A_ids, A_w, NULL, 3, &err), ESFT_ERR_RANGE);  /* layer */
    CHECK_STATUS(esft_stats_add(&st, -1, A_ids, A_w, NULL, 3, &err), ESFT_ERR_RANGE);
    CHECK_STATUS(esft_stats_add(&st, 0, A_ids, A_w, NULL, -1, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_stats_add(&st, 0, NULL, A_w, NULL, 3, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_stats_add(NULL, 0, A_ids, A_w, NULL, 3, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK(unchanged(&before, &st));

    /* a log whose last line is bad adds none of its good lines either */
    {
        static const char log[] = "0\t1\t\t0.5\t0.25\n1\t2\t\t0.5\t0.125\n1\t9\t\t0.25\t0.75\n";
        CHECK_STATUS(esft_stats_read_log_memory(&st, 0, log, sizeof log - 1, "log", &err), ESFT_ERR_RANGE);
        CHECK_EQ_INT(err.line, 3);
        CHECK(unchanged(&before, &st));
    }
    esft_stats_uninit(&st);
}

TEST(init_validates_and_reset_zeroes)
{
    esft_stats st;
    CHECK_STATUS(esft_stats_init(&st, 0, 4, 2, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_stats_init(&st, 1, 0, 1, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_stats_init(&st, 1, 4, 5, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_stats_init(&st, 1, 4, 0, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_stats_init(NULL, 1, 4, 2, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_stats_init(&st, 1, 4, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_add(&st, 0, A_ids, A_w, NULL, 3, NULL), ESFT_OK);
    esft_stats_reset(&st);
    {
        esft_stats fresh;
        CHECK_STATUS(esft_stats_init(&fresh, 1, 4, 2, NULL), ESFT_OK);
        CHECK(same_bits(&st, &fresh));
        esft_stats_uninit(&fresh);
    }
    esft_stats_uninit(&st);
    esft_stats_uninit(&st); /* twice is harmless */
}

TEST(null_objects_are_harmless_to_reset_round_and_free)
{
    esft_stats st;
    esft_scores sc;
    memset(&st, 0, sizeof st);
    memset(&sc, 0, sizeof sc);
    esft_stats_reset(NULL);
    esft_stats_reset(&st); /* never initialised */
    esft_stats_uninit(NULL);
    CHECK_STATUS(esft_scores_round(NULL, 4), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_scores_round(&sc, 4), ESFT_ERR_INVALID_ARGUMENT);
    esft_scores_free(NULL);
    CHECK_STATUS(esft_stats_scores(NULL, ESFT_NORM_POOLED, &sc), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_stats_scores(&st, ESFT_NORM_POOLED, &sc), ESFT_ERR_INVALID_ARGUMENT);
}

/* printf reads a negative precision as 6 places: -1 used to round to 6 places
   and say nothing. Counts outside 0..17 are refused and leave the scores alone. */
TEST(rounding_to_a_negative_or_huge_count_of_places_is_refused)
{
    esft_scores sc;
    CHECK_STATUS(esft_scores_alloc(&sc, 1, 2, NULL), ESFT_OK);
    sc.token[0] = sc.gate[0] = 0.123456789;
    sc.token[1] = sc.gate[1] = 0.5;
    CHECK_STATUS(esft_scores_round(&sc, -1), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_scores_round(&sc, 18), ESFT_ERR_INVALID_ARGUMENT);
    CHECK(sc.token[0] == 0.123456789 && sc.gate[0] == 0.123456789);
    CHECK_STATUS(esft_scores_round(&sc, 17), ESFT_OK);
    CHECK_STATUS(esft_scores_round(&sc, 4), ESFT_OK);
    CHECK(sc.token[0] == 0.1235 && sc.gate[0] == 0.1235);
    CHECK_STATUS(esft_scores_round(&sc, 0), ESFT_OK);
    CHECK(sc.token[0] == 0.0 && sc.token[1] == 0.0); /* 0.5 ties to even, as Python */
    esft_scores_free(&sc);
}

/* A counting allocator: everything allocated is freed, and it is the one used. */
static long live_blocks, total_allocs;
static void *count_alloc(void *user, size_t n) { (void)user; live_blocks++; total_allocs++; return malloc(n); }
static void count_free(void *user, void *p) { (void)user; if (p) live_blocks--; free(p); }

TEST(custom_allocator_is_used_and_balanced)
{
    esft_allocator a;
    esft_stats st;
    esft_scores sc;
    a.user = NULL;
    a.alloc = count_alloc;
    a.free = count_free;
    live_blocks = total_allocs = 0;
    CHECK_STATUS(esft_stats_init(&st, 2, 4, 2, &a), ESFT_OK);
    CHECK(total_allocs > 0);
    CHECK_STATUS(esft_stats_add(&st, 1, A_ids, A_w, NULL, 3, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_scores(&st, ESFT_NORM_POOLED, &sc), ESFT_OK);
    esft_scores_free(&sc);
    {
        static const char log[] = "0\t1\t\t0.5\t0.25\n";
        CHECK_STATUS(esft_stats_read_log_memory(&st, 1, log, sizeof log - 1, "log", NULL), ESFT_OK);
    }
    esft_stats_uninit(&st);
    CHECK_EQ_INT(live_blocks, 0);
}

TEST(scores_round_like_python)
{
    esft_scores sc;
    CHECK_STATUS(esft_scores_alloc(&sc, 1, 4, NULL), ESFT_OK);
    sc.token[0] = 0.00015;  /* binary value is below ...15: rounds down */
    sc.token[1] = 0.12345;  /* binary 0.123450000000000004: up */
    sc.token[2] = 2.675;    /* the Python docs' example: 2.67 at 2 places */
    sc.token[3] = 0.5;
    esft_scores_round(&sc, 4);
    CHECK(sc.token[0] == 0.0001);
    CHECK(sc.token[1] == 0.1235);
    CHECK(sc.token[3] == 0.5);
    esft_scores_round(&sc, 2);
    CHECK(sc.token[2] == 2.67);
    CHECK(sc.token[1] == 0.12); /* 0.1235 -> 0.12 (0.1235 is below the tie in binary) */
    sc.token[0] = 1.5;
    esft_scores_round(&sc, 0);
    CHECK(sc.token[3] == 0.0); /* exact ties: half to even, as Python's round() */
    CHECK(sc.token[0] == 2.0);
    esft_scores_free(&sc);
}

/* Gate weights above 2^16 are refused (they used to be accepted up to 2^31, and a
   few of them wrapped the fixed-point sums), with the same status and message
   whichever path meets the weight: the plain loop (short runs), the 4-copy kernel
   (runs >= 8E), a chunk check with a mask, and the log parser. */
TEST(gate_weights_above_65536_are_refused_on_every_path)
{
    enum { T = 64, K = 2, E = 4 };
    static int32_t ids[T * K];
    static float w[T * K];
    static unsigned char mask[T];
    esft_stats st;
    esft_error err;
    snapshot before;
    char want[128];
    const unsigned char *masks[2] = {NULL, mask};
    int Ts[2] = {3, T}, i, a, b;
    for (i = 0; i < T * K; i++) { ids[i] = i % E; w[i] = 0.25f; }
    for (i = 0; i < T; i++) mask[i] = 1;
    CHECK_STATUS(esft_stats_init(&st, 1, E, K, NULL), ESFT_OK);
    w[3] = 65536.0f; /* the largest accepted */
    CHECK_STATUS(esft_stats_add(&st, 0, ids, w, NULL, T, &err), ESFT_OK);
    CHECK(st.gate_sum[3] == (uint64_t)(65536.0 * ONE) + (uint64_t)(T * K / E - 1) * (uint64_t)(0.25 * ONE));
    snap(&before, &st);
    w[3] = 65537.0f; /* token 1 */
    snprintf(want, sizeof want, "token 1: weight 65537 is not a finite number in [0, 65536]");
    for (a = 0; a < 2; a++)
        for (b = 0; b < 2; b++) {
            CHECK_STATUS(esft_stats_add(&st, 0, ids, w, masks[b], Ts[a], &err), ESFT_ERR_RANGE);
            CHECK_MSG(strcmp(err.message, want) == 0, "T %d mask %d: %s", Ts[a], b, err.message);
            CHECK(unchanged(&before, &st));
        }
    w[3] = 3e9f; /* above 2^31: was refused before too, same message now */
    CHECK_STATUS(esft_stats_add(&st, 0, ids, w, NULL, T, &err), ESFT_ERR_RANGE);
    CHECK_MSG(strstr(err.message, "token 1: weight 3e+09 is not a finite number in [0, 65536]") != NULL, "%s",
              err.message);
    {
        static const char log[] = "0\t1\t\t0.5\t0.25\n2\t1\t\t0.5\t65537\n"; /* line 2, token 0 */
        static const char ok[] = "0\t1\t\t0.5\t65536.0\n";
        CHECK_STATUS(esft_stats_read_log_memory(&st, 0, log, sizeof log - 1, "log", &err), ESFT_ERR_RANGE);
        CHECK_EQ_INT(err.line, 2);
        CHECK_MSG(strcmp(err.message, "token 0: weight 65537 is not a finite number in [0, 65536]") == 0, "%s",
                  err.message);
        CHECK(unchanged(&before, &st));
        CHECK_STATUS(esft_stats_read_log_memory(&st, 0, ok, sizeof ok - 1, "ok", &err), ESFT_OK);
    }
    esft_stats_uninit(&st);
}

/* The fixed-point sums have a capacity (2^64 raw, 2^32 units of weight per
   expert): past it they used to wrap silently to a small number. */
TEST(a_sum_past_its_fixed_point_capacity_is_a_range_error_adding_nothing)
{
    esft_stats st, other;
    esft_error err;
    snapshot before;
    CHECK(stats_of_a_and_b(&st, 1, 0));
    st.gate_sum[1] = ~(uint64_t)0 - (uint64_t)(0.5 * ONE); /* room for half a unit; A adds 1 */
    snap(&before, &st);
    CHECK_STATUS(esft_stats_add(&st, 0, A_ids, A_w, NULL, 3, &err), ESFT_ERR_RANGE);
    CHECK_MSG(strstr(err.message, "capacity") != NULL, "%s", err.message);
    CHECK(unchanged(&before, &st));
    st.gate_sum[1] = 0;
    st.count[2] = ~(uint64_t)0; /* every array is guarded, counts too */
    CHECK_STATUS(esft_stats_add(&st, 0, A_ids, A_w, NULL, 3, &err), ESFT_ERR_RANGE);
    st.count[2] = 0;
    st.token_frac_sum[3] = ~(uint64_t)0 - 5;
    CHECK_STATUS(esft_stats_add(&st, 0, A_ids, NULL, NULL, 3, &err), ESFT_ERR_RANGE);
    st.token_frac_sum[3] = 0;
    CHECK_STATUS(esft_stats_add(&st, 0, A_ids, A_w, NULL, 3, &err), ESFT_OK);
    /* merge: checked before anything is added */
    CHECK(stats_of_a_and_b(&other, 1, 0));
    st.gate_frac_sum[2] = ~(uint64_t)0 - 1;
    snap(&before, &st);
    CHECK_STATUS(esft_stats_merge(&st, &other, &err), ESFT_ERR_RANGE);
    CHECK_MSG(strstr(err.message, "layer 0 expert 2") != NULL, "%s", err.message);
    CHECK(unchanged(&before, &st));
    st.gate_frac_sum[2] = 0;
    st.n_samples[0] = ~(uint64_t)0;
    CHECK_STATUS(esft_stats_merge(&st, &other, &err), ESFT_ERR_RANGE);
    st.n_samples[0] = 0;
    CHECK_STATUS(esft_stats_merge(&st, &other, &err), ESFT_OK);
    esft_stats_uninit(&other);
    esft_stats_uninit(&st);
}

/* One sample can wrap its own histogram: 2^16 weights of 2^16 on one expert are
   2^64 in fixed point, which used to add 0 and return OK. */
TEST(one_sample_whose_weights_pass_the_capacity_is_refused)
{
    enum { T = 1 << 16 };
    int32_t *ids = (int32_t *)malloc(2 * T * sizeof *ids);
    float *w = (float *)malloc(2 * T * sizeof *w);
    esft_stats st;
    esft_error err;
    int t;
    CHECK(ids && w);
    for (t = 0; t < 2 * T; t++) { ids[t] = t % 2; w[t] = t % 2 ? 1.0f : 65536.0f; }
    CHECK_STATUS(esft_stats_init(&st, 1, 2, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_add(&st, 0, ids, w, NULL, T, &err), ESFT_ERR_RANGE);
    CHECK_MSG(strstr(err.message, "capacity") != NULL, "%s", err.message);
    CHECK_EQ_INT(st.n_tokens[0], 0);
    CHECK(st.gate_sum[0] == 0 && st.count[0] == 0);
    for (t = 0; t < 2 * T; t += 2) w[t] = 32768.0f; /* half of it fits: 2^63 */
    CHECK_STATUS(esft_stats_add(&st, 0, ids, w, NULL, T, &err), ESFT_OK);
    CHECK(st.gate_sum[0] == (uint64_t)1 << 63);
    esft_stats_uninit(&st);
    free(ids);
    free(w);
}

/* A backend a caller sets on the accumulator is checked like at every other door. */
TEST(stats_add_checks_the_backend_api_version)
{
    esft_backend copy = *esft_backend_cpu();
    esft_stats st;
    esft_error err;
    char want[64];
    CHECK_STATUS(esft_stats_init(&st, 1, 4, 2, NULL), ESFT_OK);
    copy.api_version = ESFT_BACKEND_API_VERSION + 7;
    st.backend = &copy;
    CHECK_STATUS(esft_stats_add(&st, 0, A_ids, A_w, NULL, 3, &err), ESFT_ERR_UNSUPPORTED);
    snprintf(want, sizeof want, "api_version %d, this esft.h expects %d", ESFT_BACKEND_API_VERSION + 7,
             ESFT_BACKEND_API_VERSION);
    CHECK_MSG(strstr(err.message, want) != NULL, "%s", err.message);
    CHECK_EQ_INT(st.n_tokens[0], 0);
    esft_stats_uninit(&st);
}

/* A backend with memory of its own: the sample's histogram lives there
   (esft_stats_set_backend), the wrapper reads it back by download only, and
   the counters are the CPU's; bad input is the op's to name. */
TEST(stats_on_a_backend_with_its_own_memory)
{
    esft_backend b = own_memory_backend();
    esft_stats cpu, own;
    esft_error err;
    int32_t ids[2 * 9];
    float w[2 * 9];
    unsigned char mask[9] = {1, 0, 1, 1, 1, 0, 1, 1, 1};
    int i;
    for (i = 0; i < 18; i++) {
        ids[i] = (i * 5 + 1) % 4;
        w[i] = 0.125f * (float)(i % 7);
    }
    CHECK_STATUS(esft_stats_init(&cpu, 2, 4, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_init(&own, 2, 4, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_set_backend(&own, &b, &err), ESFT_OK);
    CHECK(own_live == 1 && own.backend == &b);
    CHECK_STATUS(esft_stats_add(&cpu, 1, ids, w, mask, 9, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_add(&own, 1, ids, w, mask, 9, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_add(&cpu, 1, ids, NULL, NULL, 9, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_add(&own, 1, ids, NULL, NULL, 9, NULL), ESFT_OK);
    CHECK(memcmp(cpu.count, own.count, 8 * sizeof(uint64_t)) == 0);
    CHECK(memcmp(cpu.gate_sum, own.gate_sum, 8 * sizeof(uint64_t)) == 0);
    CHECK(memcmp(cpu.token_frac_sum, own.token_frac_sum, 8 * sizeof(uint64_t)) == 0);
    CHECK(memcmp(cpu.gate_frac_sum, own.gate_frac_sum, 8 * sizeof(uint64_t)) == 0);
    CHECK_EQ_INT(own.n_tokens[1], cpu.n_tokens[1]);
    CHECK_EQ_INT(own.n_tokens[1], 7 + 9);
    ids[7] = 4; /* token 3 */
    CHECK_STATUS(esft_stats_add(&own, 1, ids, w, mask, 9, &err), ESFT_ERR_RANGE);
    CHECK_MSG(strcmp(err.message, "token 3: expert id 4 outside [0, 4)") == 0, "%s", err.message);
    CHECK_EQ_INT(own.n_tokens[1], 16);
    { /* a routing log is host text: read through the CPU backend, merged on the host */
        const char log[] = "0\t1\t2\t3\t\t0.5\t0.25\t0.125\t0.125\n";
        uint64_t before = own.n_tokens[0];
        CHECK_STATUS(esft_stats_read_log_memory(&own, 0, log, sizeof log - 1, "log", &err), ESFT_OK);
        CHECK_EQ_INT(own.n_tokens[0], before + 2);
        CHECK_EQ_INT(own.count[2], 1);
    }
    own.backend = esft_backend_cpu(); /* by hand: the histogram is still the other backend's */
    CHECK_STATUS(esft_stats_add(&own, 1, ids, w, mask, 9, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_stats_set_backend(&own, esft_backend_cpu(), &err), ESFT_OK);
    CHECK(own_live == 0);
    esft_stats_uninit(&cpu);
    esft_stats_uninit(&own);
}

HARNESS_MAIN()
