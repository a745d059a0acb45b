/* bench_stats.c - router statistics: routing-log parsing and accumulation, one
   core, from memory, against ESFT's own Python pipeline.

   Build (bench/run_all.sh does this for every bench/bench_*.c):
     cc -O3 -march=native -std=c99 -I. bench/bench_stats.c -o build/bench/bench_stats -lm
   Run:
     ESFT_DATA=build/data build/bench/bench_stats [--reps N] [--no-python]
   (`make bench` unpacks the data and runs it.)

   What it measures, each the median of --reps runs (default 21) in thread CPU
   time, single thread:
     parse       esft_stats_read_log_memory over the 26 translation logs (12.5 MB,
                 1.29 M routing assignments), parsing + validation + accumulation:
                 MB/s (1 MB = 1e6 bytes) and M assignments/s.
     accumulate  esft_stats_add over pre-parsed ids/weights: the real logs one line
                 (sample, 206 tokens on average) per call, from one contiguous
                 buffer of 10 MB (out of L2), and synthetic batches of 1M tokens x 6 (uniform
                 ids; and every token on the same 6 experts, the worst case for a
                 histogram): M assignments/s.
     naive       the same work with a plain strtol/strtod parser and the textbook
                 scalar histogram loop, for scale.
     python      bench/esft_python_baseline.py on the same bytes (ESFT's parse_line
                 + np.add.at), run as a subprocess.
   Before timing, every method's integer counts (and, for the C methods, the
   fixed-point weight sums) are checked equal; the Python side is checked by its
   total and a checksum of the counts. A mismatch exits 1.

   LDLIBS: -lm
*/
#define _POSIX_C_SOURCE 200809L
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define N_LAYERS 26
#define N_EXPERTS 64
#define TOP_K 6

/* CPU time of this thread: on a shared machine, time spent preempted by other
   processes is not counted (the Python baseline uses time.thread_time too). */
static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *xs, int n)
{
    qsort(xs, (size_t)n, sizeof *xs, cmp_double);
    return xs[n / 2];
}

static void die(const char *what, const esft_error *err)
{
    fprintf(stderr, "bench_stats: %s", what);
    if (err) fprintf(stderr, ": %s:%ld: %s", err->file, err->line, err->message);
    fprintf(stderr, "\n");
    exit(1);
}

/* ---- the data ---------------------------------------------------------- */

typedef struct log_file {
    char *data;
    size_t size;
} log_file;

/* One pre-parsed line (sample) of one layer. */
typedef struct sample {
    int layer, T;
    int32_t *ids;  /* (T, K) */
    float *weights; /* (T, K) */
} sample;

static log_file files[N_LAYERS + 1]; /* layers 1..26 */
static sample *samples;
static int n_samples;
static size_t total_bytes, total_assign;

static char *read_all(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = (char *)malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) exit(1);
    fclose(f);
    buf[n] = 0;
    *size = (size_t)n;
    return buf;
}

/* Moves every pre-parsed sample into one contiguous arena, as an inference
   engine's routing buffers would be (and as the library's line buffer is). */
static void pack_samples(void)
{
    int i;
    size_t at = 0;
    int32_t *ids = (int32_t *)malloc(total_assign * sizeof(int32_t));
    float *w = (float *)malloc(total_assign * sizeof(float));
    for (i = 0; i < n_samples; i++) {
        size_t n = (size_t)samples[i].T * TOP_K;
        memcpy(ids + at, samples[i].ids, n * sizeof(int32_t));
        memcpy(w + at, samples[i].weights, n * sizeof(float));
        free(samples[i].ids);
        free(samples[i].weights);
        samples[i].ids = ids + at;
        samples[i].weights = w + at;
        at += n;
    }
}

/* The naive parser: strtol/strtod per field, one line at a time. Independent of
   esft.h, so it also cross-checks the library's parser. */
static void naive_parse_file(int layer, const char *p, const char *end)
{
    while (p < end) {
        const char *nl = (const char *)memchr(p, '\n', (size_t)(end - p));
        const char *sep;
        size_t n_ids = 0, n_w = 0, cap;
        sample *s;
        if (!nl) nl = end;
        sep = strstr(p, "\t\t");
        if (!sep || sep > nl) die("naive parser: no tab-tab separator", NULL);
        cap = (size_t)(sep - p) / 2 + 2;
        samples = (sample *)realloc(samples, (size_t)(n_samples + 1) * sizeof *samples);
        s = &samples[n_samples++];
        s->layer = layer;
        s->ids = (int32_t *)malloc(cap * sizeof(int32_t));
        s->weights = (float *)malloc(cap * sizeof(float));
        while (p < sep) {
            char *q;
            s->ids[n_ids++] = (int32_t)strtol(p, &q, 10);
            p = q + 1;
        }
        p = sep + 2;
        while (p < nl) {
            char *q;
            if (n_w == cap) die("naive parser: more weights than ids", NULL);
            s->weights[n_w++] = (float)strtod(p, &q);
            p = q + 1;
        }
        if (n_ids != n_w || n_ids % TOP_K) die("naive parser: id/weight count", NULL);
        s->T = (int)(n_ids / TOP_K);
        p = nl + 1;
    }
}

/* The textbook histogram: what esft's kernel is measured against. */
static void naive_accumulate(esft_stats *st, const sample *s)
{
    int i, n = s->T * TOP_K;
    uint64_t *count = st->count + (size_t)s->layer * N_EXPERTS;
    uint64_t *gsum = st->gate_sum + (size_t)s->layer * N_EXPERTS;
    for (i = 0; i < n; i++) {
        count[s->ids[i]]++;
        gsum[s->ids[i]] += (uint64_t)((double)s->weights[i] * ESFT_FIXED_ONE + 0.5);
    }
    st->n_tokens[s->layer] += (uint64_t)s->T;
}

/* ---- checks ------------------------------------------------------------ */

static void same_stats(const char *what, const esft_stats *a, const esft_stats *b, int check_gate)
{
    size_t i, le = (size_t)a->n_layers * (size_t)a->n_experts;
    for (i = 0; i < le; i++) {
        if (a->count[i] != b->count[i]) {
            fprintf(stderr, "bench_stats: %s: count[%lu] %llu != %llu\n", what, (unsigned long)i,
                    (unsigned long long)a->count[i], (unsigned long long)b->count[i]);
            exit(1);
        }
        if (check_gate && a->gate_sum[i] != b->gate_sum[i]) {
            fprintf(stderr, "bench_stats: %s: gate_sum[%lu] differs\n", what, (unsigned long)i);
            exit(1);
        }
    }
    for (i = 0; i < (size_t)a->n_layers; i++)
        if (a->n_tokens[i] != b->n_tokens[i]) {
            fprintf(stderr, "bench_stats: %s: n_tokens[%lu] differs\n", what, (unsigned long)i);
            exit(1);
        }
}

static unsigned long long count_checksum(const esft_stats *st)
{
    size_t i, le = (size_t)st->n_layers * (size_t)st->n_experts;
    unsigned long long sum = 0;
    for (i = 0; i < le; i++) sum += st->count[i] * (unsigned long long)(i + 1);
    return sum;
}

/* ---- the methods --------------------------------------------------------- */

static void run_parse(esft_stats *st)
{
    int l;
    esft_error err;
    for (l = 1; l <= N_LAYERS; l++)
        if (esft_stats_read_log_memory(st, l, files[l].data, files[l].size, "log", &err) != ESFT_OK)
            die("esft_stats_read_log_memory", &err);
}

static void run_naive_parse(esft_stats *st)
{
    int i, first = n_samples;
    for (i = 1; i <= N_LAYERS; i++) naive_parse_file(i, files[i].data, files[i].data + files[i].size);
    for (i = first; i < n_samples; i++) {
        naive_accumulate(st, &samples[i]);
        free(samples[i].ids);
        free(samples[i].weights);
    }
    n_samples = first;
}

static void run_add_samples(esft_stats *st)
{
    int i;
    esft_error err;
    for (i = 0; i < n_samples; i++)
        if (esft_stats_add(st, samples[i].layer, samples[i].ids, samples[i].weights, NULL, samples[i].T,
                           &err) != ESFT_OK)
            die("esft_stats_add", &err);
}

static void run_naive_samples(esft_stats *st)
{
    int i;
    for (i = 0; i < n_samples; i++) naive_accumulate(st, &samples[i]);
}

static sample synth; /* layer 0: 1M tokens x 6 */

static void run_add_synth(esft_stats *st)
{
    esft_error err;
    if (esft_stats_add(st, 0, synth.ids, synth.weights, NULL, synth.T, &err) != ESFT_OK)
        die("esft_stats_add (synthetic)", &err);
}

static void run_naive_synth(esft_stats *st) { naive_accumulate(st, &synth); }

/* Median seconds of reps runs of fn on a freshly reset accumulator. */
static double time_method(void (*fn)(esft_stats *), esft_stats *st, int reps)
{
    double t[101];
    int r;
    if (reps > 101) reps = 101;
    for (r = 0; r < reps; r++) {
        double t0;
        esft_stats_reset(st);
        t0 = now_s();
        fn(st);
        t[r] = now_s() - t0;
    }
    return median(t, reps);
}

/* Deterministic synthetic routing: K distinct ids per token, 4-decimal weights. */
static void make_synth(int T, int same_experts, uint64_t seed)
{
    int t, j;
    synth.layer = 0;
    synth.T = T;
    synth.ids = (int32_t *)malloc((size_t)T * TOP_K * sizeof(int32_t));
    synth.weights = (float *)malloc((size_t)T * TOP_K * sizeof(float));
    for (t = 0; t < T; t++) {
        int32_t *row = synth.ids + (size_t)t * TOP_K;
        for (j = 0; j < TOP_K; j++) {
            int32_t id;
            int k, dup;
            do {
                seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
                id = same_experts ? j : (int32_t)((seed >> 33) % N_EXPERTS);
                for (dup = 0, k = 0; k < j; k++) dup |= row[k] == id;
            } while (dup);
            row[j] = id;
            synth.weights[(size_t)t * TOP_K + j] = (float)((seed >> 40) % 2000) / 10000.0f;
        }
    }
}

/* ---- Python baseline ----------------------------------------------------- */

typedef struct py_result {
    int ok;
    double parse_mb_s, pipeline_massign_s, accum_massign_s;
    unsigned long long bytes, assignments, checksum;
} py_result;

static py_result run_python(const char *dir)
{
    py_result r;
    char cmd[4200], line[256];
    const char *py = getenv("PYTHON");
    FILE *p;
    memset(&r, 0, sizeof r);
    snprintf(cmd, sizeof cmd, "%s bench/esft_python_baseline.py '%s' 3", py ? py : "python3", dir);
    p = popen(cmd, "r");
    if (!p) return r;
    while (fgets(line, sizeof line, p)) {
        sscanf(line, "bytes %llu", &r.bytes);
        sscanf(line, "assignments %llu", &r.assignments);
        sscanf(line, "checksum %llu", &r.checksum);
        sscanf(line, "parse_mb_s %lf", &r.parse_mb_s);
        sscanf(line, "pipeline_massign_s %lf", &r.pipeline_massign_s);
        if (sscanf(line, "accum_massign_s %lf", &r.accum_massign_s) == 1) r.ok = 1;
    }
    if (pclose(p) != 0) r.ok = 0;
    return r;
}

/* ---- main ---------------------------------------------------------------- */

static void row(const char *name, const char *what, double mb_s, double massign_s, double python)
{
    char mb[32] = "", ratio[32] = "";
    if (mb_s > 0) snprintf(mb, sizeof mb, "%9.1f", mb_s);
    if (python > 0) snprintf(ratio, sizeof ratio, "%8.0fx", (mb_s > 0 ? mb_s : massign_s) / python);
    printf("  %-34s %-22s %9s %12.1f %9s\n", name, what, mb, massign_s, ratio);
}

int main(int argc, char **argv)
{
    const char *data = getenv("ESFT_DATA");
    char dir[4096], path[4200];
    int l, i, reps = 21, python = 1;
    esft_stats ref, st;
    py_result py;
    double t, synth_assign = 1e6 * TOP_K;
    double parse_mb, parse_ma, naive_mb, naive_ma, add_real, naive_real, add_synth, naive_synth,
        add_same, naive_same;

    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-python")) python = 0;
        else { fprintf(stderr, "usage: bench_stats [--reps N] [--no-python]\n"); return 2; }
    }
    if (reps < 1) reps = 1;
    snprintf(dir, sizeof dir, "%s/translation", data ? data : "build/data");
    for (l = 1; l <= N_LAYERS; l++) {
        snprintf(path, sizeof path, "%s/expert_weights_%d.txt", dir, l);
        files[l].data = read_all(path, &files[l].size);
        if (!files[l].data) {
            fprintf(stderr, "bench_stats: cannot read %s (run `make bench`, which unpacks it)\n", path);
            return 1;
        }
        total_bytes += files[l].size;
    }
    for (l = 1; l <= N_LAYERS; l++) naive_parse_file(l, files[l].data, files[l].data + files[l].size);
    for (i = 0; i < n_samples; i++) total_assign += (size_t)samples[i].T * TOP_K;
    pack_samples();

    /* Validate: every method gives the same counts and fixed-point sums. */
    if (esft_stats_init(&ref, N_LAYERS + 1, N_EXPERTS, TOP_K, NULL) != ESFT_OK ||
        esft_stats_init(&st, N_LAYERS + 1, N_EXPERTS, TOP_K, NULL) != ESFT_OK)
        die("esft_stats_init", NULL);
    run_naive_samples(&ref);
    run_parse(&st);
    same_stats("esft_stats_read_log_memory vs naive", &st, &ref, 1);
    esft_stats_reset(&st);
    run_add_samples(&st);
    same_stats("esft_stats_add vs naive", &st, &ref, 1);
    esft_stats_reset(&st);
    run_naive_parse(&st);
    same_stats("naive parse", &st, &ref, 1);
    for (l = 0; l < 2; l++) {
        make_synth(1000000, l, 42);
        esft_stats_reset(&ref);
        esft_stats_reset(&st);
        run_naive_synth(&ref);
        run_add_synth(&st);
        same_stats(l ? "synthetic (same experts)" : "synthetic", &st, &ref, 1);
        free(synth.ids);
        free(synth.weights);
    }

    /* Time. */
    t = time_method(run_parse, &st, reps);
    parse_mb = (double)total_bytes / t / 1e6;
    parse_ma = (double)total_assign / t / 1e6;
    t = time_method(run_naive_parse, &st, reps);
    naive_mb = (double)total_bytes / t / 1e6;
    naive_ma = (double)total_assign / t / 1e6;
    add_real = (double)total_assign / time_method(run_add_samples, &st, reps) / 1e6;
    naive_real = (double)total_assign / time_method(run_naive_samples, &st, reps) / 1e6;
    make_synth(1000000, 0, 42);
    add_synth = synth_assign / time_method(run_add_synth, &st, reps) / 1e6;
    naive_synth = synth_assign / time_method(run_naive_synth, &st, reps) / 1e6;
    free(synth.ids);
    free(synth.weights);
    make_synth(1000000, 1, 42);
    add_same = synth_assign / time_method(run_add_synth, &st, reps) / 1e6;
    naive_same = synth_assign / time_method(run_naive_synth, &st, reps) / 1e6;

    memset(&py, 0, sizeof py);
    if (python) {
        esft_stats_reset(&ref);
        run_naive_samples(&ref);
        py = run_python(dir);
        if (!py.ok) fprintf(stderr, "bench_stats: Python baseline unavailable (python3 + numpy?); skipped\n");
        else if (py.bytes != total_bytes || py.assignments != total_assign ||
                 py.checksum != count_checksum(&ref)) {
            fprintf(stderr, "bench_stats: Python baseline disagrees: %llu bytes, %llu assignments, checksum %llu"
                            " (C: %lu, %lu, %llu)\n", py.bytes, py.assignments, py.checksum,
                    (unsigned long)total_bytes, (unsigned long)total_assign, count_checksum(&ref));
            return 1;
        }
    }

    printf("router statistics, one core, from memory: %d logs, %.1f MB, %.2f M assignments; "
           "median of %d runs\n", N_LAYERS, (double)total_bytes / 1e6, (double)total_assign / 1e6, reps);
    printf("  %-34s %-22s %9s %12s %9s\n", "method", "data", "MB/s", "M assign/s", "vs Python");
    row("esft_stats_read_log_memory", "translation logs", parse_mb, parse_ma, py.ok ? py.parse_mb_s : 0);
    row("naive C (strtol/strtod + loop)", "translation logs", naive_mb, naive_ma, py.ok ? py.parse_mb_s : 0);
    if (py.ok) row("ESFT Python (parse_line+add.at)", "translation logs", py.parse_mb_s, py.pipeline_massign_s, 0);
    row("esft_stats_add", "logs, 1 call/sample", 0, add_real, py.ok ? py.accum_massign_s : 0);
    row("esft_stats_add", "1M tokens x 6 uniform", 0, add_synth, py.ok ? py.accum_massign_s : 0);
    row("esft_stats_add", "1M tokens x 6 same", 0, add_same, py.ok ? py.accum_massign_s : 0);
    row("naive C loop", "logs, 1 call/sample", 0, naive_real, py.ok ? py.accum_massign_s : 0);
    row("naive C loop", "1M tokens x 6 uniform", 0, naive_synth, py.ok ? py.accum_massign_s : 0);
    row("naive C loop", "1M tokens x 6 same", 0, naive_same, py.ok ? py.accum_massign_s : 0);
    if (py.ok) row("ESFT Python np.add.at", "logs, pre-parsed", 0, py.accum_massign_s, 0);
    printf("goal: parsing >= 500 MB/s (%s), accumulating >= 1000 M assign/s (%s)\n",
           parse_mb >= 500 ? "met" : "NOT met",
           add_real >= 1000 && add_synth >= 1000 ? "met" : "NOT met");

    if (n_samples) {
        free(samples[0].ids);
        free(samples[0].weights);
    }
    free(samples);
    free(synth.ids);
    free(synth.weights);
    for (l = 1; l <= N_LAYERS; l++) free(files[l].data);
    esft_stats_uninit(&ref);
    esft_stats_uninit(&st);
    return 0;
}
