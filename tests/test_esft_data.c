/* test_esft_data.c - the "must show" on the real ESFT data: stats over the
   routing logs of a task reproduce the authors' summary.json (every value and
   the bytes of the file), and top-p 0.2 on its token scores reproduces their
   expert config (same ids, same order, every layer).

   Data: $ESFT_DATA/translation (make unpacks data/esft-translation.tar.xz into
   build/data) against the vendored data/translation_summary.json and
   data/translation_config.json (run from the repository root). Skips when
   ESFT_DATA is unset.

   Other tasks: every $ESFT_DATA/<task>/ holding expert_weights_1.txt and
   summary.json is checked against its own summary.json, and against
   $ESFT_CONFIGS/<task>.json when that variable is set. docs/testing.md has the
   commands that check all four tasks the ESFT authors ship this way.
   Build: cc -std=c99 -I. tests/test_esft_data.c -lm (make does it). */
#define _POSIX_C_SOURCE 200809L
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"
#include "harness.h"
#include "slurp.h"

#include <dirent.h>
#include <unistd.h>

/* DeepSeek-V2-Lite: MoE layers 1..26 (the logs' numbering), 64 experts, top-6. */
#define N_LAYERS 27
#define N_EXPERTS 64
#define TOP_K 6


static int file_exists(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

/* Pooled scores of a log directory, rounded to 4 decimals as ESFT writes them. */
static esft_status task_scores(const char *dir, esft_scores *sc, int round4, esft_error *err)
{
    esft_stats st;
    int n_files = 0;
    esft_status s = esft_stats_init(&st, N_LAYERS, N_EXPERTS, TOP_K, NULL);
    if (s == ESFT_OK) s = esft_stats_read_log_dir(&st, dir, &n_files, err);
    if (s == ESFT_OK && n_files != 26) s = ESFT_ERR_IO;
    if (s == ESFT_OK) s = esft_stats_scores(&st, ESFT_NORM_POOLED, sc);
    if (s == ESFT_OK && round4) esft_scores_round(sc, 4);
    esft_stats_uninit(&st);
    return s;
}

/* Result of comparing one task: number of values compared, first mismatch. */
typedef struct task_check {
    int values, mismatches, layers;
    char first[256];
} task_check;

/* Checks every score of layers 1..26 against the reference summary. */
static void compare_scores(task_check *tc, const esft_scores *mine, const esft_scores *ref)
{
    int l, e;
    memset(tc, 0, sizeof *tc);
    for (l = 1; l < N_LAYERS; l++) {
        if (l >= ref->n_layers || !ref->layer_present[l] || !mine->layer_present[l]) {
            if (!tc->mismatches++) snprintf(tc->first, sizeof tc->first, "layer %d missing", l);
            continue;
        }
        tc->layers++;
        for (e = 0; e < N_EXPERTS; e++) {
            size_t mi = (size_t)l * N_EXPERTS + e, ri = (size_t)l * ref->n_experts + e;
            tc->values += 2;
            if (mine->token[mi] != ref->token[ri] || mine->gate[mi] != ref->gate[ri]) {
                if (!tc->mismatches)
                    snprintf(tc->first, sizeof tc->first, "layer %d expert %d: token %.17g vs %.17g, gate %.17g vs %.17g",
                             l, e, mine->token[mi], ref->token[ri], mine->gate[mi], ref->gate[ri]);
                tc->mismatches++;
            }
        }
    }
}

/* Checks ids and order of every layer of two configs; returns mismatching layers. */
static int compare_configs(const esft_expert_config *mine, const esft_expert_config *ref, char *first, size_t cap)
{
    int l, i, bad = 0;
    for (l = 1; l < N_LAYERS; l++) {
        int n1 = mine->offset[l + 1] - mine->offset[l];
        int n2 = l < ref->n_layers && ref->layer_present[l] ? ref->offset[l + 1] - ref->offset[l] : -1;
        int same = n1 == n2;
        for (i = 0; same && i < n1; i++) same = mine->ids[mine->offset[l] + i] == ref->ids[ref->offset[l] + i];
        if (!same && !bad++) snprintf(first, cap, "layer %d: %d ids vs %d in the reference", l, n1, n2);
    }
    return bad;
}

static const char *data_dir(void)
{
    const char *d = getenv("ESFT_DATA");
    return d && d[0] ? d : NULL;
}

/* Skips the test without data (a macro: SKIP returns from the test). */
#define NEED_DATA()                                                                     \
    do {                                                                                \
        if (!data_dir()) SKIP("ESFT_DATA is unset (make test sets it to build/data)"); \
    } while (0)

/* $ESFT_DATA/translation: the vendored task's routing logs. */
static const char *translation_dir(void)
{
    static char dir[1024];
    snprintf(dir, sizeof dir, "%s/translation", data_dir());
    return dir;
}

/* A scratch file name in $TMPDIR (else /tmp), unique to this process. */
static void temp_path(char *out, size_t cap, const char *stem)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(out, cap, "%s/esft_%s_%ld.json", tmp && tmp[0] ? tmp : "/tmp", stem, (long)getpid());
}

/* Whether the file just written at `written` has the bytes of `ref` (it is
   removed either way); on a difference, `why` says where. */
static int same_bytes(const char *written, const char *ref, char *why, size_t cap)
{
    size_t na, nb, i = 0;
    char *a = slurp(written, &na), *b = slurp(ref, &nb);
    int same;
    remove(written);
    if (!a || !b) snprintf(why, cap, "cannot read %s", a ? ref : written);
    else {
        while (i < na && i < nb && a[i] == b[i]) i++;
        snprintf(why, cap, "files differ at byte %lu (sizes %lu and %lu): ...%.40s", (unsigned long)i,
                 (unsigned long)na, (unsigned long)nb, a + (i > 20 ? i - 20 : 0));
    }
    same = a && b && na == nb && i == na;
    free(a);
    free(b);
    return same;
}

TEST(translation_stats_reproduce_every_value_of_summary_json)
{
    esft_scores mine, ref;
    esft_error err;
    task_check tc;
    NEED_DATA();
    CHECK_STATUS(task_scores(translation_dir(), &mine, 1, &err), ESFT_OK);
    CHECK_STATUS(esft_scores_read_json("data/translation_summary.json", &ref, &err), ESFT_OK);
    CHECK_EQ_INT(ref.n_experts, N_EXPERTS);
    compare_scores(&tc, &mine, &ref);
    CHECK_MSG(tc.mismatches == 0, "%d of %d values differ; first: %s", tc.mismatches, tc.values, tc.first);
    CHECK_EQ_INT(tc.values, 2 * 26 * 64);
    CHECK_EQ_INT(tc.layers, 26);
    esft_scores_free(&mine);
    esft_scores_free(&ref);
}

TEST(translation_summary_json_is_byte_identical)
{
    char out[1100], why[200];
    esft_scores mine;
    esft_error err;
    NEED_DATA();
    temp_path(out, sizeof out, "summary");
    CHECK_STATUS(task_scores(translation_dir(), &mine, 0, &err), ESFT_OK);
    CHECK_STATUS(esft_scores_write_json(out, &mine, 4, &err), ESFT_OK); /* rounds as it writes */
    esft_scores_free(&mine);
    CHECK_MSG(same_bytes(out, "data/translation_summary.json", why, sizeof why), "%s", why);
}

TEST(translation_top_p_reproduces_the_expert_config)
{
    char first[256] = "", out[1100], why[200];
    esft_scores mine;
    esft_expert_config cfg, ref;
    esft_error err;
    NEED_DATA();
    CHECK_STATUS(task_scores(translation_dir(), &mine, 1, &err), ESFT_OK);
    CHECK_STATUS(esft_select_top_p(&mine, ESFT_SCORE_TOKEN, 0.2, &cfg, &err), ESFT_OK);
    CHECK_STATUS(esft_expert_config_read("data/translation_config.json", &ref, &err), ESFT_OK);
    CHECK_MSG(compare_configs(&cfg, &ref, first, sizeof first) == 0, "%s", first);
    CHECK_EQ_INT(esft_expert_config_count(&cfg), esft_expert_config_count(&ref));
    CHECK_EQ_INT(esft_expert_config_count(&cfg), 83); /* SOURCE.md: translation 83 of 1664 */
    /* and the written file is the authors' file, byte for byte */
    temp_path(out, sizeof out, "config");
    CHECK_STATUS(esft_expert_config_write(out, &cfg, &err), ESFT_OK);
    CHECK_MSG(same_bytes(out, "data/translation_config.json", why, sizeof why), "%s", why);
    esft_expert_config_free(&cfg);
    esft_expert_config_free(&ref);
    esft_scores_free(&mine);
}

TEST(translation_per_sample_scores_are_close_to_pooled_but_not_equal)
{
    esft_stats st;
    esft_scores pooled, per;
    size_t i, differ = 0;
    double worst = 0.0;
    NEED_DATA();
    CHECK_STATUS(esft_stats_init(&st, N_LAYERS, N_EXPERTS, TOP_K, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_read_log_dir(&st, translation_dir(), NULL, NULL), ESFT_OK);
    CHECK_EQ_INT(st.n_samples[1], 40); /* SOURCE.md: 40 samples */
    CHECK_STATUS(esft_stats_scores(&st, ESFT_NORM_POOLED, &pooled), ESFT_OK);
    CHECK_STATUS(esft_stats_scores(&st, ESFT_NORM_PER_SAMPLE, &per), ESFT_OK);
    for (i = N_EXPERTS; i < (size_t)N_LAYERS * N_EXPERTS; i++) {
        double d = fabs(pooled.token[i] - per.token[i]);
        differ += d > 1e-6;
        if (d > worst) worst = d;
    }
    CHECK_MSG(differ > 100, "only %lu of 1664 token scores differ", (unsigned long)differ);
    CHECK_MSG(worst < 0.05, "per-sample and pooled differ by %g", worst);
    esft_scores_free(&pooled);
    esft_scores_free(&per);
    esft_stats_uninit(&st);
}

/* Every task directory under ESFT_DATA with its own summary.json. */
TEST(every_task_under_esft_data_reproduces_its_summary_and_config)
{
    DIR *d;
    struct dirent *ent;
    int tasks = 0;
    const char *configs = getenv("ESFT_CONFIGS");
    NEED_DATA();
    d = opendir(data_dir());
    CHECK_MSG(d != NULL, "cannot open %s", data_dir());
    while ((ent = readdir(d)) != NULL) {
        char dir[1024], path[1100], first[256] = "";
        esft_scores mine, ref;
        esft_error err;
        task_check tc;
        if (ent->d_name[0] == '.') continue;
        snprintf(dir, sizeof dir, "%s/%s", data_dir(), ent->d_name);
        snprintf(path, sizeof path, "%s/expert_weights_1.txt", dir);
        if (!file_exists(path)) continue;
        snprintf(path, sizeof path, "%s/summary.json", dir);
        if (!file_exists(path)) continue;
        CHECK_STATUS(task_scores(dir, &mine, 1, &err), ESFT_OK);
        CHECK_STATUS(esft_scores_read_json(path, &ref, &err), ESFT_OK);
        compare_scores(&tc, &mine, &ref);
        CHECK_MSG(tc.mismatches == 0 && tc.values == 2 * 26 * 64, "%.64s: %d of %d values differ; first: %.200s",
                  ent->d_name, tc.mismatches, tc.values, tc.first);
        printf("     %s: %d of %d summary values equal", ent->d_name, tc.values - tc.mismatches, tc.values);
        esft_scores_free(&ref);
        snprintf(path, sizeof path, "%s/%s.json", configs ? configs : "", ent->d_name);
        if (configs && file_exists(path)) {
            esft_expert_config cfg, rc;
            CHECK_STATUS(esft_select_top_p(&mine, ESFT_SCORE_TOKEN, 0.2, &cfg, &err), ESFT_OK);
            CHECK_STATUS(esft_expert_config_read(path, &rc, &err), ESFT_OK);
            CHECK_MSG(compare_configs(&cfg, &rc, first, sizeof first) == 0, "%.64s: %.200s", ent->d_name, first);
            printf("; config %d experts, identical", esft_expert_config_count(&cfg));
            esft_expert_config_free(&cfg);
            esft_expert_config_free(&rc);
        }
        printf("\n");
        esft_scores_free(&mine);
        tasks++;
    }
    closedir(d);
    CHECK_MSG(tasks > 0, "no task directory with logs and summary.json under %s", data_dir());
}

HARNESS_MAIN()
