/* test_routing.c - esft_route on hand-computed cases, its argument checks, the
   backend contract, esft_status_string, and the version in its four places.
   Build: cc -std=c99 -I. tests/test_routing.c -lm (make does it). Run from the
   repository root (the version test reads esft.h and CHANGES.md). */
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"
#include "harness.h"
#include "slurp.h"

static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

/* ---- softmax ---------------------------------------------------------- */

/* logits log(1..4) give probabilities 0.1, 0.2, 0.3, 0.4 exactly in math. */
static void probs_1234_logits(float *logits)
{
    int i;
    for (i = 0; i < 4; i++) logits[i] = (float)log((double)(i + 1));
}

TEST(softmax_top2_without_renormalisation)
{
    float logits[4], w[2], probs[4];
    int32_t ids[2];
    esft_route_config c = esft_route_config_init(4, 2);
    probs_1234_logits(logits);
    CHECK_STATUS(esft_route(&c, ids, w, probs, logits, 1, NULL), ESFT_OK);
    CHECK_EQ_INT(ids[0], 3);
    CHECK_EQ_INT(ids[1], 2);
    CHECK_NEAR(w[0], 0.4, 1e-6);
    CHECK_NEAR(w[1], 0.3, 1e-6);
    CHECK_NEAR(probs[0], 0.1, 1e-6);
    CHECK_NEAR(probs[1], 0.2, 1e-6);
}

TEST(softmax_top2_with_renormalisation)
{
    float logits[4], w[2];
    int32_t ids[2];
    esft_route_config c = esft_route_config_init(4, 2);
    c.renormalize = 1;
    probs_1234_logits(logits);
    CHECK_STATUS(esft_route(&c, ids, w, NULL, logits, 1, NULL), ESFT_OK);
    CHECK_EQ_INT(ids[0], 3);
    CHECK_EQ_INT(ids[1], 2);
    CHECK_NEAR(w[0], 4.0 / 7.0, 1e-6);
    CHECK_NEAR(w[1], 3.0 / 7.0, 1e-6);
}

TEST(softmax_is_shift_invariant_and_stable_for_large_logits)
{
    /* exp(1000) overflows; a correct softmax subtracts the max first. */
    float logits[3] = {1000.0f, 1000.0f + (float)log(3.0), 999.0f}, w[3], probs[3];
    int32_t ids[3];
    double e0 = 1.0, e1 = 3.0, e2 = exp(-1.0), sum = e0 + e1 + e2;
    esft_route_config c = esft_route_config_init(3, 3);
    CHECK_STATUS(esft_route(&c, ids, w, probs, logits, 1, NULL), ESFT_OK);
    CHECK_EQ_INT(ids[0], 1);
    CHECK_EQ_INT(ids[1], 0);
    CHECK_EQ_INT(ids[2], 2);
    CHECK_NEAR(w[0], e1 / sum, 1e-5);
    CHECK_NEAR(w[1], e0 / sum, 1e-5);
    CHECK_NEAR(w[2], e2 / sum, 1e-5);
}

TEST(ties_go_to_the_lower_id)
{
    float flat[5] = {1, 1, 1, 1, 1}, edge[5] = {0, 5, 7, 5, 5}, w[3];
    int32_t ids[3];
    esft_route_config c = esft_route_config_init(5, 3);
    CHECK_STATUS(esft_route(&c, ids, w, NULL, flat, 1, NULL), ESFT_OK);
    CHECK_EQ_INT(ids[0], 0);
    CHECK_EQ_INT(ids[1], 1);
    CHECK_EQ_INT(ids[2], 2);
    CHECK_NEAR(w[0], 0.2, 1e-6);
    /* the best is 2; then three tied at 5: 1 and 3 win over 4 */
    CHECK_STATUS(esft_route(&c, ids, w, NULL, edge, 1, NULL), ESFT_OK);
    CHECK_EQ_INT(ids[0], 2);
    CHECK_EQ_INT(ids[1], 1);
    CHECK_EQ_INT(ids[2], 3);
}

TEST(every_token_is_routed_independently)
{
    float logits[3 * 4] = {0, 1, 2, 3, 3, 2, 1, 0, 0, 9, 0, 0}, w[3 * 1];
    int32_t ids[3 * 1];
    esft_route_config c = esft_route_config_init(4, 1);
    CHECK_STATUS(esft_route(&c, ids, w, NULL, logits, 3, NULL), ESFT_OK);
    CHECK_EQ_INT(ids[0], 3);
    CHECK_EQ_INT(ids[1], 0);
    CHECK_EQ_INT(ids[2], 1);
    CHECK_NEAR(w[2], exp(9.0) / (exp(9.0) + 3.0), 1e-6);
}

TEST(routed_scaling_multiplies_the_weights)
{
    float logits[4], w[2];
    int32_t ids[2];
    esft_route_config c = esft_route_config_init(4, 2);
    c.routed_scaling = 2.5f;
    probs_1234_logits(logits);
    CHECK_STATUS(esft_route(&c, ids, w, NULL, logits, 1, NULL), ESFT_OK);
    CHECK_NEAR(w[0], 2.5 * 0.4, 1e-6);
    CHECK_NEAR(w[1], 2.5 * 0.3, 1e-6);
    c.renormalize = 1; /* renormalised first, then scaled */
    CHECK_STATUS(esft_route(&c, ids, w, NULL, logits, 1, NULL), ESFT_OK);
    CHECK_NEAR(w[0] + w[1], 2.5, 1e-5);
    CHECK_NEAR(w[0], 2.5 * 4.0 / 7.0, 1e-5);
}

TEST(probs_output_is_the_full_gating_distribution)
{
    float logits[2 * 4] = {0.5f, -1.0f, 2.0f, 0.0f, 3.0f, 3.0f, -2.0f, 1.0f}, w[2 * 2], probs[2 * 4];
    int32_t ids[2 * 2];
    int t, e;
    esft_route_config c = esft_route_config_init(4, 2);
    CHECK_STATUS(esft_route(&c, ids, w, probs, logits, 2, NULL), ESFT_OK);
    for (t = 0; t < 2; t++) {
        double sum = 0.0;
        for (e = 0; e < 4; e++) sum += exp((double)logits[t * 4 + e]);
        for (e = 0; e < 4; e++)
            CHECK_NEAR(probs[t * 4 + e], exp((double)logits[t * 4 + e]) / sum, 1e-6);
        /* the weights are the chosen probabilities */
        CHECK_NEAR(w[t * 2], probs[t * 4 + ids[t * 2]], 0);
        CHECK_NEAR(w[t * 2 + 1], probs[t * 4 + ids[t * 2 + 1]], 0);
    }
}

/* ---- sigmoid with selection bias ------------------------------------- */

TEST(sigmoid_gating_weights_are_unnormalised_sigmoids)
{
    float logits[4] = {2.0f, 1.0f, 0.0f, -1.0f}, w[2], probs[4];
    int32_t ids[2];
    int e;
    esft_route_config c = esft_route_config_init(4, 2);
    c.gating = ESFT_GATING_SIGMOID;
    CHECK_STATUS(esft_route(&c, ids, w, probs, logits, 1, NULL), ESFT_OK);
    CHECK_EQ_INT(ids[0], 0);
    CHECK_EQ_INT(ids[1], 1);
    CHECK_NEAR(w[0], sigmoid(2.0), 1e-6);
    CHECK_NEAR(w[1], sigmoid(1.0), 1e-6);
    for (e = 0; e < 4; e++) CHECK_NEAR(probs[e], sigmoid(logits[e]), 1e-6);
}

TEST(selection_bias_changes_selection_not_weights)
{
    float logits[4] = {2.0f, 1.0f, 0.0f, -1.0f}, bias[4] = {0.0f, 0.0f, 0.5f, 0.0f};
    float w[2], probs[4];
    int32_t ids[2];
    double p0 = sigmoid(2.0), p2 = sigmoid(0.0);
    esft_route_config c = esft_route_config_init(4, 2);
    c.gating = ESFT_GATING_SIGMOID;
    c.selection_bias = bias;
    c.renormalize = 1;
    c.routed_scaling = 2.5f;
    CHECK_STATUS(esft_route(&c, ids, w, probs, logits, 1, NULL), ESFT_OK);
    /* biased scores: 0.881, 0.731, 1.0, 0.269 -> expert 2 first, then 0 */
    CHECK_EQ_INT(ids[0], 2);
    CHECK_EQ_INT(ids[1], 0);
    /* weights from the unbiased sigmoids, renormalised, then scaled */
    CHECK_NEAR(w[0], 2.5 * p2 / (p0 + p2), 1e-6);
    CHECK_NEAR(w[1], 2.5 * p0 / (p0 + p2), 1e-6);
    /* probs are before the bias */
    CHECK_NEAR(probs[2], p2, 1e-7);
}

/* ---- group-limited top-k --------------------------------------------- */

/* E 4 in 2 groups {0,1} {2,3}: expert 0 is the single best, but group {2,3}
   has the larger sum of its two best. Ungrouped top-2 is {0, 2}; V2 (max)
   keeps group 0 -> {0, 1}; V3 (top-2 sum) keeps group 1 -> {2, 3}. */
static const float group_logits[4] = {3.0f, -5.0f, 1.0f, 0.8f};

static esft_route_config group_config(int grouped, esft_group_score score)
{
    esft_route_config c = esft_route_config_init(4, 2);
    c.gating = ESFT_GATING_SIGMOID;
    if (grouped) {
        c.n_group = 2;
        c.topk_group = 1;
        c.group_score = score;
    }
    return c;
}

TEST(group_limited_changes_the_answer_max_and_top2_sum)
{
    float w[2];
    int32_t ids[2];
    esft_route_config c = group_config(0, ESFT_GROUP_SCORE_MAX);
    CHECK_STATUS(esft_route(&c, ids, w, NULL, group_logits, 1, NULL), ESFT_OK);
    CHECK_EQ_INT(ids[0], 0);
    CHECK_EQ_INT(ids[1], 2);
    c = group_config(1, ESFT_GROUP_SCORE_MAX);
    CHECK_STATUS(esft_route(&c, ids, w, NULL, group_logits, 1, NULL), ESFT_OK);
    CHECK_EQ_INT(ids[0], 0);
    CHECK_EQ_INT(ids[1], 1);
    CHECK_NEAR(w[1], sigmoid(-5.0), 1e-7);
    c = group_config(1, ESFT_GROUP_SCORE_TOP2_SUM);
    CHECK_STATUS(esft_route(&c, ids, w, NULL, group_logits, 1, NULL), ESFT_OK);
    CHECK_EQ_INT(ids[0], 2);
    CHECK_EQ_INT(ids[1], 3);
    CHECK_NEAR(w[0], sigmoid(1.0), 1e-6);
    CHECK_NEAR(w[1], sigmoid(0.8), 1e-6);
}

TEST(group_scores_use_the_biased_scores)
{
    /* a bias of +1 on expert 1 lifts group 0's top-2 sum above group 1's */
    float bias[4] = {0.0f, 1.0f, 0.0f, 0.0f}, w[2];
    int32_t ids[2];
    esft_route_config c = group_config(1, ESFT_GROUP_SCORE_TOP2_SUM);
    c.selection_bias = bias;
    CHECK_STATUS(esft_route(&c, ids, w, NULL, group_logits, 1, NULL), ESFT_OK);
    CHECK_EQ_INT(ids[0], 1);
    CHECK_EQ_INT(ids[1], 0);
    CHECK_NEAR(w[0], sigmoid(-5.0), 1e-7);
}

TEST(group_ties_go_to_the_lower_group)
{
    float logits[8] = {1, 0, 0, 0, 1, 0, 0, 0}, w[2];
    int32_t ids[2];
    esft_route_config c = esft_route_config_init(8, 2);
    c.n_group = 4;
    c.topk_group = 1;
    CHECK_STATUS(esft_route(&c, ids, w, NULL, logits, 1, NULL), ESFT_OK);
    CHECK_EQ_INT(ids[0], 0);
    CHECK_EQ_INT(ids[1], 1);
}

TEST(deepseek_v3_preset_routes_within_four_groups)
{
    /* 256 experts, 8 groups of 32, 4 kept, top-8: every chosen id lies in at
       most 4 distinct groups and the weights sum to the scaling 2.5. */
    static float logits[256], bias[256];
    float w[8];
    int32_t ids[8];
    int i, groups[8] = {0}, distinct = 0;
    unsigned s = 12345u;
    esft_route_config c;
    for (i = 0; i < 256; i++) {
        s = s * 1103515245u + 12345u;
        logits[i] = (float)((s >> 8) % 2000) / 500.0f - 2.0f;
        bias[i] = (float)(i % 7) * 0.01f;
    }
    c = esft_route_config_deepseek_v3(bias);
    CHECK_STATUS(esft_route_config_validate(&c, NULL), ESFT_OK);
    CHECK_STATUS(esft_route(&c, ids, w, NULL, logits, 1, NULL), ESFT_OK);
    for (i = 0; i < 8; i++) {
        CHECK(ids[i] >= 0 && ids[i] < 256);
        if (!groups[ids[i] / 32]++) distinct++;
    }
    CHECK(distinct <= 4);
    CHECK_NEAR(w[0] + w[1] + w[2] + w[3] + w[4] + w[5] + w[6] + w[7], 2.5, 1e-5);
}

/* ---- errors ----------------------------------------------------------- */

TEST(nan_and_inf_logits_are_numeric_errors_naming_the_token)
{
    float logits[3 * 4] = {0}, w[3 * 2];
    int32_t ids[3 * 2];
    esft_error err;
    esft_route_config c = esft_route_config_init(4, 2);
    logits[2 * 4 + 1] = NAN;
    CHECK_STATUS(esft_route(&c, ids, w, NULL, logits, 3, &err), ESFT_ERR_NUMERIC);
    CHECK_EQ_INT(err.status, ESFT_ERR_NUMERIC);
    CHECK_MSG(strstr(err.message, "token 2") != NULL, "message: %s", err.message);
    logits[2 * 4 + 1] = 0.0f;
    logits[1 * 4 + 3] = INFINITY;
    CHECK_STATUS(esft_route(&c, ids, w, NULL, logits, 3, &err), ESFT_ERR_NUMERIC);
    CHECK_MSG(strstr(err.message, "token 1") != NULL, "message: %s", err.message);
    logits[1 * 4 + 3] = -INFINITY;
    CHECK_STATUS(esft_route(&c, ids, w, NULL, logits, 3, &err), ESFT_ERR_NUMERIC);
    c.gating = ESFT_GATING_SIGMOID;
    CHECK_STATUS(esft_route(&c, ids, w, NULL, logits, 3, &err), ESFT_ERR_NUMERIC);
}

static int config_rejected(esft_route_config c)
{
    float logits[8] = {0}, w[8];
    int32_t ids[8];
    esft_error err;
    if (esft_route_config_validate(&c, &err) != ESFT_ERR_INVALID_ARGUMENT) return 0;
    if (!err.message[0]) return 0;
    return esft_route(&c, ids, w, NULL, logits, 1, NULL) == ESFT_ERR_INVALID_ARGUMENT;
}

TEST(invalid_configs_are_invalid_arguments)
{
    esft_route_config c;
    CHECK(config_rejected(esft_route_config_init(4, 5)));  /* k > n */
    CHECK(config_rejected(esft_route_config_init(4, 0)));  /* k = 0 */
    CHECK(config_rejected(esft_route_config_init(0, 1)));  /* no experts */
    c = esft_route_config_init(8, 2);
    c.n_group = 3; c.topk_group = 1;                      /* 3 does not divide 8 */
    CHECK(config_rejected(c));
    c = esft_route_config_init(8, 3);
    c.n_group = 4; c.topk_group = 1;                      /* 1 group of 2 < k = 3 */
    CHECK(config_rejected(c));
    c.topk_group = 2;                                     /* 2 groups of 2 >= 3: fine */
    CHECK_STATUS(esft_route_config_validate(&c, NULL), ESFT_OK);
    c.topk_group = 5;                                     /* more groups than exist */
    CHECK(config_rejected(c));
    c.topk_group = 0;
    CHECK(config_rejected(c));
    c = esft_route_config_init(8, 2);
    c.n_group = 8; c.topk_group = 2; c.group_score = ESFT_GROUP_SCORE_TOP2_SUM; /* 1 per group */
    CHECK(config_rejected(c));
    c = esft_route_config_init(8, 2);
    c.routed_scaling = 0.0f;
    CHECK(config_rejected(c));
    c.routed_scaling = NAN;
    CHECK(config_rejected(c));
    c = esft_route_config_init(8, 2);
    c.gating = (esft_gating)7;
    CHECK(config_rejected(c));
}

TEST(null_pointers_and_negative_t_are_invalid_arguments)
{
    float logits[4] = {0}, w[2];
    int32_t ids[2];
    esft_route_config c = esft_route_config_init(4, 2);
    CHECK_STATUS(esft_route(NULL, ids, w, NULL, logits, 1, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_route(&c, NULL, w, NULL, logits, 1, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_route(&c, ids, NULL, NULL, logits, 1, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_route(&c, ids, w, NULL, NULL, 1, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_route(&c, ids, w, NULL, logits, -1, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_route(&c, NULL, NULL, NULL, NULL, 0, NULL), ESFT_OK); /* nothing to do */
}

/* ---- backend contract -------------------------------------------------- */

TEST(cpu_backend_is_complete_and_named)
{
    const esft_backend *b = esft_backend_cpu();
    CHECK(b != NULL);
    CHECK_EQ_INT(b->api_version, ESFT_BACKEND_API_VERSION);
    CHECK(b->name && strcmp(b->name, "cpu") == 0);
    CHECK(b->alloc && b->free && b->upload && b->download && b->route && b->stats_accumulate);
    CHECK_STATUS(esft_backend_check(b, NULL), ESFT_OK);
}

TEST(a_null_op_is_unsupported_not_a_crash)
{
    esft_backend copy = *esft_backend_cpu();
    float logits[4] = {0}, w[2];
    int32_t ids[2];
    esft_error err;
    esft_route_config c = esft_route_config_init(4, 2);
    copy.route = NULL;
    copy.name = "partial";
    CHECK_STATUS(esft_route_with(&copy, &c, ids, w, NULL, logits, 1, &err), ESFT_ERR_UNSUPPORTED);
    CHECK_MSG(strstr(err.message, "partial") && strstr(err.message, "route"), "message: %s", err.message);
    /* the same through the statistics */
    {
        esft_stats st;
        int32_t sid[2] = {0, 1};
        CHECK_STATUS(esft_stats_init(&st, 1, 4, 2, NULL), ESFT_OK);
        copy.route = esft_backend_cpu()->route;
        copy.stats_accumulate = NULL;
        st.backend = &copy;
        CHECK_STATUS(esft_stats_add(&st, 0, sid, NULL, NULL, 1, &err), ESFT_ERR_UNSUPPORTED);
        CHECK_EQ_INT(st.n_tokens[0], 0);
        esft_stats_uninit(&st);
    }
}

TEST(a_copied_backend_with_every_op_gives_the_same_routing)
{
    esft_backend copy = *esft_backend_cpu();
    float logits[4], w1[2], w2[2];
    int32_t i1[2], i2[2];
    esft_route_config c = esft_route_config_init(4, 2);
    probs_1234_logits(logits);
    copy.name = "copy";
    CHECK_STATUS(esft_route_with(&copy, &c, i1, w1, NULL, logits, 1, NULL), ESFT_OK);
    CHECK_STATUS(esft_route(&c, i2, w2, NULL, logits, 1, NULL), ESFT_OK);
    CHECK(memcmp(i1, i2, sizeof i1) == 0 && memcmp(w1, w2, sizeof w1) == 0);
}

TEST(wrong_api_version_is_rejected_with_both_numbers)
{
    esft_backend copy = *esft_backend_cpu();
    float logits[4] = {0}, w[2];
    int32_t ids[2];
    char want[32];
    esft_error err;
    esft_route_config c = esft_route_config_init(4, 2);
    copy.api_version = ESFT_BACKEND_API_VERSION + 98;
    CHECK(esft_backend_check(&copy, &err) != ESFT_OK);
    snprintf(want, sizeof want, "%d", ESFT_BACKEND_API_VERSION + 98);
    CHECK_MSG(strstr(err.message, want) != NULL, "message: %s", err.message);
    snprintf(want, sizeof want, "expects %d", ESFT_BACKEND_API_VERSION);
    CHECK_MSG(strstr(err.message, want) != NULL, "message: %s", err.message);
    CHECK(esft_route_with(&copy, &c, ids, w, NULL, logits, 1, NULL) != ESFT_OK);
    CHECK(esft_backend_check(NULL, NULL) != ESFT_OK);
}

/* ---- status strings ----------------------------------------------------- */

TEST(every_status_has_a_distinct_nonempty_string)
{
    static const esft_status all[] = {
        ESFT_OK, ESFT_ERR_INVALID_ARGUMENT, ESFT_ERR_OUT_OF_MEMORY, ESFT_ERR_PARSE, ESFT_ERR_SHAPE,
        ESFT_ERR_RANGE, ESFT_ERR_NUMERIC, ESFT_ERR_UNSUPPORTED, ESFT_ERR_BACKEND, ESFT_ERR_IO};
    const char *unknown = esft_status_string((esft_status)-999);
    int n = (int)(sizeof all / sizeof all[0]), i, j, named = 0;
    CHECK(unknown && unknown[0]);
    for (i = 0; i < n; i++) {
        const char *s = esft_status_string(all[i]);
        CHECK_MSG(s && s[0] && strcmp(s, unknown) != 0, "status %d has no name", (int)all[i]);
        for (j = 0; j < i; j++)
            CHECK_MSG(strcmp(s, esft_status_string(all[j])) != 0, "statuses %d and %d share \"%s\"",
                      (int)all[i], (int)all[j], s);
    }
    /* a code added to the enum without a name here or in the switch shows up:
       every named code in -200..200 must be one of the list above */
    for (i = -200; i <= 200; i++) {
        const char *s = esft_status_string((esft_status)i);
        if (strcmp(s, unknown) == 0) continue;
        named++;
        for (j = 0; j < n && all[j] != (esft_status)i; j++) {}
        CHECK_MSG(j < n, "status %d (\"%s\") is missing from this test", i, s);
    }
    CHECK_EQ_INT(named, n);
}

/* ---- version ------------------------------------------------------------ */


TEST(version_agrees_in_macros_function_header_and_changes)
{
    char want[40], line1[128], *header, *changes, *h2, *date_h, *date_c;
    snprintf(want, sizeof want, "%d.%d.%d", ESFT_VERSION_MAJOR, ESFT_VERSION_MINOR, ESFT_VERSION_PATCH);
    CHECK(strcmp(want, ESFT_VERSION_STRING) == 0);
    CHECK(strcmp(want, esft_version()) == 0);
    header = slurp("esft.h", NULL);
    changes = slurp("CHANGES.md", NULL);
    CHECK_MSG(header && changes, "run from the repository root: esft.h and CHANGES.md not found");
    snprintf(line1, sizeof line1, "/* esft.h - v%s - ", want);
    CHECK_MSG(strncmp(header, line1, strlen(line1)) == 0, "line 1 of esft.h does not start \"%s\"", line1);
    /* CHANGES.md: the first "## " heading is the current version, with a date
       (after an "## Unreleased" entry of changes not yet in a release) */
    h2 = strstr(changes, "\n## ");
    if (h2 && strncmp(h2 + 4, "Unreleased", 10) == 0) h2 = strstr(h2 + 1, "\n## ");
    CHECK_MSG(h2 && strncmp(h2 + 4, want, strlen(want)) == 0, "CHANGES.md's first entry is not %s", want);
    date_c = strchr(h2, '(');
    CHECK(date_c && strlen(date_c) > 11 && date_c[5] == '-' && date_c[8] == '-' && date_c[11] == ')');
    /* the header's CHANGES block names the same version with the same date */
    snprintf(line1, sizeof line1, "      %s (", want);
    date_h = strstr(header, line1);
    CHECK_MSG(date_h != NULL, "esft.h's CHANGES block has no entry for %s", want);
    CHECK_MSG(strncmp(date_h + strlen(line1), date_c + 1, 10) == 0, "dates differ: esft.h %.10s, CHANGES.md %.10s",
              date_h + strlen(line1), date_c + 1);
    free(header);
    free(changes);
}

/* A NaN bias made every comparison false, so the choice depended on loop order;
   an Inf one pinned an expert. Refused by validation and by routing (whose door
   cannot read the bias, as it may live on a device: the CPU op checks it). */
TEST(non_finite_selection_bias_is_rejected)
{
    float logits[4] = {2.0f, 1.0f, 0.0f, -1.0f}, bias[4] = {0.0f, 0.0f, 0.0f, 0.0f}, w[2];
    int32_t ids[2];
    esft_error err;
    esft_route_config c = esft_route_config_init(4, 2);
    c.gating = ESFT_GATING_SIGMOID;
    c.selection_bias = bias;
    CHECK_STATUS(esft_route_config_validate(&c, &err), ESFT_OK);
    bias[2] = NAN;
    CHECK_STATUS(esft_route_config_validate(&c, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strstr(err.message, "selection_bias[2] is NaN") != NULL, "%s", err.message);
    CHECK_STATUS(esft_route(&c, ids, w, NULL, logits, 1, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strstr(err.message, "selection_bias[2] is NaN") != NULL, "%s", err.message);
    bias[2] = -INFINITY;
    CHECK_STATUS(esft_route_config_validate(&c, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_MSG(strstr(err.message, "selection_bias[2] is Inf") != NULL, "%s", err.message);
}

HARNESS_MAIN()
