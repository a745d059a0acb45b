/* test_safety.c - inputs and outputs that are not what they seem (issue 12, "data
   safety" and "hangs and memory"): FIFOs and devices as inputs (refused at once,
   never waited on), long log lines (a stated limit), JSON token memory bounded by
   the input, accumulator sizes capped before anything is touched, and the atomic
   writer's rules for what already sits at the output path (a device, a FIFO, a
   directory, a symbolic link, a 0600 file, a missing directory).
   A check that would hang before its fix runs under alarm(): a hang kills the
   program, which counts as a failure. Files live in a temporary directory
   ($TMPDIR or /tmp, removed at exit).
   Build: cc -std=c99 -I. tests/test_safety.c -lm (make does it). */
#define _POSIX_C_SOURCE 200809L
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"
#include "harness.h"
#include "slurp.h"
#include "temp_files.h"

#include <dirent.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- temporary files --------------------------------------------------- */

static char tmp_root[512];

static void remove_tree(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *ent;
    char path[1024];
    if (!d) return;
    while ((ent = readdir(d)) != NULL) {
        struct stat sb;
        if (!strcmp(ent->d_name, ".") || !strcmp(ent->d_name, "..")) continue;
        snprintf(path, sizeof path, "%s/%s", dir, ent->d_name);
        if (lstat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) remove_tree(path);
        else remove(path);
    }
    closedir(d);
    rmdir(dir);
}

static void cleanup(void) { if (tmp_root[0]) remove_tree(tmp_root); }

/* A fresh directory for one test: <root>/<name>. */
static const char *fresh_dir(const char *name)
{
    static char dir[600];
    if (!tmp_root[0]) {
        const char *base = getenv("TMPDIR");
        snprintf(tmp_root, sizeof tmp_root, "%s/esft_safety_XXXXXX", base && base[0] ? base : "/tmp");
        if (!mkdtemp(tmp_root)) { tmp_root[0] = 0; return NULL; }
        atexit(cleanup);
    }
    snprintf(dir, sizeof dir, "%s/%s", tmp_root, name);
    remove_tree(dir);
    return mkdir(dir, 0755) == 0 ? dir : NULL;
}

static const char *join(const char *dir, const char *file)
{
    static char bufs[8][700];
    static int i;
    char tmp[700], *b = bufs[i++ & 7]; /* via tmp: dir may be an earlier result */
    if ((size_t)snprintf(tmp, sizeof tmp, "%s/%s", dir, file) >= sizeof tmp) tmp[0] = 0;
    memcpy(b, tmp, sizeof tmp);
    return b;
}

static const char *join3(const char *dir, const char *sub, const char *file)
{
    static char bufs[4][900];
    static int i;
    char *b = bufs[i++ & 3];
    snprintf(b, 900, "%s/%s/%s", dir, sub, file);
    return b;
}

static int write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    size_t n = strlen(text);
    int ok;
    if (!f) return 0;
    ok = fwrite(text, 1, n, f) == n;
    return fclose(f) == 0 && ok;
}

static int has(const char *s, const char *part) { return s && strstr(s, part) != NULL; }

#define GOOD "0\t1\t\t0.5\t0.25\n"
static const char config_json[] = "{\"experts\": {\"0\": [3, 1]}, \"shared_experts\": false, \"non_expert_modules\": false}";

/* ---- inputs that are not regular files ---------------------------------- */

/* Every reader opens without waiting: a FIFO with no writer used to block in
   open() forever, before any check could run. */
TEST(fifo_inputs_are_refused_without_waiting)
{
    const char *dir = fresh_dir("fifo_in"), *fifo;
    esft_scores sc;
    esft_expert_config cfg;
    esft_safetensors st;
    esft_checkpoint ck;
    esft_stats stats;
    esft_error err;
    char *text = NULL;
    size_t n = 0;
    CHECK(dir != NULL);
    fifo = join(dir, "expert_weights_1.txt");
    CHECK(mkfifo(fifo, 0644) == 0);
    alarm(20);
    CHECK_STATUS(esft_scores_read_json(fifo, &sc, &err), ESFT_ERR_IO);
    CHECK_MSG(has(err.message, "not a regular file"), "%s", err.message);
    CHECK_STATUS(esft_expert_config_read(fifo, &cfg, &err), ESFT_ERR_IO);
    CHECK_STATUS(esft_safetensors_open(&st, fifo, NULL, &err), ESFT_ERR_IO);
    CHECK_STATUS(esft_checkpoint_open(&ck, fifo, NULL, &err), ESFT_ERR_IO);
    CHECK_STATUS(esft_file_read(fifo, 0, NULL, &text, &n, &err), ESFT_ERR_IO);
    CHECK_STATUS(esft_stats_init(&stats, 4, 8, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_read_log(&stats, 1, fifo, &err), ESFT_ERR_IO);
    CHECK_MSG(has(err.message, "not a regular file"), "%s", err.message);
    CHECK_STATUS(esft_stats_read_log_dir(&stats, dir, NULL, &err), ESFT_ERR_IO); /* the probe does not open */
    CHECK_MSG(has(err.file, "expert_weights_1.txt"), "%s", err.file);
    esft_stats_uninit(&stats);
    alarm(0);
}

/* A log that is a link to /dev/zero has no end and no '\n': refused at once. */
TEST(log_linked_to_dev_zero_fails_fast)
{
    const char *dir = fresh_dir("dev_zero");
    esft_stats stats;
    esft_error err;
    CHECK(dir != NULL);
    CHECK(symlink("/dev/zero", join(dir, "expert_weights_2.txt")) == 0);
    CHECK_STATUS(esft_stats_init(&stats, 4, 8, 2, NULL), ESFT_OK);
    alarm(20);
    CHECK_STATUS(esft_stats_read_log_dir(&stats, dir, NULL, &err), ESFT_ERR_IO);
    alarm(0);
    CHECK_MSG(has(err.message, "not a regular file"), "%s", err.message);
    esft_stats_uninit(&stats);
}

/* A line longer than ESFT_LOG_MAX_LINE is an error naming the line, read in
   bounded memory; the lines before it were fine. */
TEST(log_line_over_the_limit_is_a_range_error)
{
    const char *dir = fresh_dir("long_line"), *log;
    esft_stats stats;
    esft_error err;
    FILE *f;
    static char block[1 << 16];
    size_t i, n = ESFT_LOG_MAX_LINE / sizeof block + 1; /* blocks of "0\t": just over the limit */
    CHECK(dir != NULL);
    log = join(dir, "expert_weights_1.txt");
    for (i = 0; i < sizeof block; i += 2) memcpy(block + i, "0\t", 2);
    f = fopen(log, "wb");
    CHECK(f != NULL);
    if (!f) return;
    fputs(GOOD GOOD, f);
    for (i = 0; i < n; i++) fwrite(block, 1, sizeof block, f);
    fputs("\t0.5\n", f);
    CHECK(fclose(f) == 0);
    CHECK_STATUS(esft_stats_init(&stats, 4, 8, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_read_log(&stats, 1, log, &err), ESFT_ERR_RANGE);
    CHECK_MSG(has(err.message, "ESFT_LOG_MAX_LINE"), "%s", err.message);
    CHECK_MSG(err.line == 3, "line %ld", err.line);
    esft_stats_uninit(&stats);
    remove(log);
}

/* A long line under the limit, fed in many chunks, reads the same as from memory. */
TEST(log_line_longer_than_many_chunks_reads_like_memory)
{
    const char *dir = fresh_dir("chunks"), *log;
    esft_stats a, b;
    esft_error err;
    char *text;
    size_t i, n = 0, tokens = 700000; /* ~5.6 MB: six 1 MiB chunks */
    CHECK(dir != NULL);
    log = join(dir, "expert_weights_1.txt");
    text = (char *)malloc(tokens * 16 + 64);
    CHECK(text != NULL);
    if (!text) return;
    n += (size_t)sprintf(text, GOOD);
    for (i = 0; i < tokens * 2; i++, n += 2) { text[n] = (char)('0' + i % 8); text[n + 1] = '\t'; }
    text[n++] = '\t';
    for (i = 0; i < tokens * 2; i++, n += 5) memcpy(text + n, i + 1 < tokens * 2 ? "0.25\t" : "0.25\n", 5);
    n += (size_t)sprintf(text + n, GOOD);
    CHECK(write_text(log, text));
    CHECK_STATUS(esft_stats_init(&a, 4, 8, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_init(&b, 4, 8, 2, NULL), ESFT_OK);
    CHECK_STATUS(esft_stats_read_log(&a, 1, log, &err), ESFT_OK);
    CHECK_STATUS(esft_stats_read_log_memory(&b, 1, text, n, "mem", &err), ESFT_OK);
    CHECK(a.n_samples[1] == 3 && b.n_samples[1] == 3);
    CHECK(memcmp(a.count, b.count, 4 * 8 * sizeof *a.count) == 0);
    esft_stats_uninit(&a);
    esft_stats_uninit(&b);
    free(text);
}

/* ---- what the atomic writer finds at the output path -------------------- */

/* A FIFO or a directory at the output is refused and left as it was (rename()
   used to put a regular file in its place; a device takes the same path, not
   tried here: a regression run as root would replace /dev/null). */
TEST(writer_refuses_non_regular_outputs)
{
    const char *dir = fresh_dir("non_regular"), *fifo, *sub;
    esft_expert_config cfg;
    esft_error err;
    struct stat sb;
    CHECK(dir != NULL);
    fifo = join(dir, "fifo");
    sub = join(dir, "sub");
    CHECK(mkfifo(fifo, 0644) == 0);
    CHECK(mkdir(sub, 0755) == 0);
    CHECK_STATUS(esft_expert_config_parse(config_json, strlen(config_json), "cfg", &cfg, NULL), ESFT_OK);
    alarm(20);
    CHECK_STATUS(esft_expert_config_write(fifo, &cfg, &err), ESFT_ERR_IO);
    CHECK_MSG(has(err.message, "a FIFO, not a regular file"), "%s", err.message);
    CHECK(stat(fifo, &sb) == 0 && S_ISFIFO(sb.st_mode));
    CHECK(!temp_left(fifo));
    CHECK_STATUS(esft_expert_config_write(sub, &cfg, &err), ESFT_ERR_IO);
    CHECK_MSG(has(err.message, "a directory"), "%s", err.message);
    CHECK(stat(sub, &sb) == 0 && S_ISDIR(sb.st_mode));
    alarm(0);
    esft_expert_config_free(&cfg);
}

/* The symbolic-link rule: the link is followed and its target replaced
   atomically (temp file beside the target); the link stays a link. */
TEST(writer_follows_a_symbolic_link_and_replaces_its_target)
{
    const char *dir = fresh_dir("symlink");
    char target[700], link[700], *text;
    esft_expert_config cfg;
    struct stat sb;
    CHECK(dir != NULL);
    CHECK(mkdir(join(dir, "real"), 0755) == 0);
    snprintf(target, sizeof target, "%s", join(dir, "real/config.json"));
    snprintf(link, sizeof link, "%s", join(dir, "config.json"));
    CHECK(write_text(target, "old"));
    CHECK(symlink("real/config.json", link) == 0); /* relative, as users make them */
    CHECK_STATUS(esft_expert_config_parse(config_json, strlen(config_json), "cfg", &cfg, NULL), ESFT_OK);
    CHECK_STATUS(esft_expert_config_write(link, &cfg, NULL), ESFT_OK);
    CHECK(lstat(link, &sb) == 0 && S_ISLNK(sb.st_mode));
    text = slurp(target, NULL);
    CHECK_MSG(has(text, "[3, 1]"), "target holds: %s", text ? text : "(nothing)");
    free(text);
    CHECK(!temp_left(target) && !temp_left(link));
    /* a link to a file that does not exist yet creates it, as '>' does */
    CHECK(symlink("real/new.json", join(dir, "new.json")) == 0);
    CHECK_STATUS(esft_expert_config_write(join(dir, "new.json"), &cfg, NULL), ESFT_OK);
    text = slurp(join(dir, "real/new.json"), NULL);
    CHECK(has(text, "[3, 1]"));
    free(text);
    esft_expert_config_free(&cfg);
}

/* A replaced file keeps its permission bits: a 0600 file stays 0600 (it came
   back 0644), a 0664 one stays 0664 whatever the umask. */
TEST(writer_keeps_the_mode_of_the_file_it_replaces)
{
    const char *dir = fresh_dir("mode"), *out;
    esft_expert_config cfg;
    struct stat sb;
    mode_t old_mask = umask(022);
    CHECK(dir != NULL);
    out = join(dir, "config.json");
    CHECK(write_text(out, "old"));
    CHECK(chmod(out, 0600) == 0);
    CHECK_STATUS(esft_expert_config_parse(config_json, strlen(config_json), "cfg", &cfg, NULL), ESFT_OK);
    CHECK_STATUS(esft_expert_config_write(out, &cfg, NULL), ESFT_OK);
    CHECK(stat(out, &sb) == 0);
    CHECK_MSG((sb.st_mode & 0777) == 0600, "mode %o", (unsigned)(sb.st_mode & 0777));
    CHECK(chmod(out, 0664) == 0);
    CHECK_STATUS(esft_expert_config_write(out, &cfg, NULL), ESFT_OK);
    CHECK(stat(out, &sb) == 0);
    CHECK_MSG((sb.st_mode & 0777) == 0664, "mode %o", (unsigned)(sb.st_mode & 0777));
    umask(old_mask);
    esft_expert_config_free(&cfg);
}

/* A missing directory is named as such, not as a temp file that cannot be made. */
TEST(writer_names_a_missing_directory)
{
    const char *dir = fresh_dir("no_dir");
    esft_expert_config cfg;
    esft_error err;
    char want[700];
    CHECK(dir != NULL);
    CHECK_STATUS(esft_expert_config_parse(config_json, strlen(config_json), "cfg", &cfg, NULL), ESFT_OK);
    CHECK_STATUS(esft_expert_config_write(join(dir, "missing/c.json"), &cfg, &err), ESFT_ERR_IO);
    snprintf(want, sizeof want, "the directory %s does not exist", join(dir, "missing"));
    CHECK_MSG(has(err.message, want), "%s", err.message);
    CHECK_MSG(!has(err.message, ".tmp."), "%s", err.message);
    esft_expert_config_free(&cfg);
}

/* ---- memory bounded by the input ---------------------------------------- */

/* An allocator that counts calls and bytes and can fail from the nth call on. */
typedef struct counting {
    int calls, fail_from;
    size_t bytes, peak, live;
} counting;

static void *counting_alloc(void *user, size_t n)
{
    counting *c = (counting *)user;
    size_t *p;
    c->calls++;
    if (c->fail_from && c->calls >= c->fail_from) return NULL;
    p = (size_t *)malloc(n + sizeof(size_t) * 2);
    if (!p) return NULL;
    p[0] = n;
    c->bytes += n;
    c->live += n;
    if (c->live > c->peak) c->peak = c->live;
    return p + 2;
}

static void counting_free(void *user, void *ptr)
{
    counting *c = (counting *)user;
    size_t *p = (size_t *)ptr - 2;
    c->live -= p[0];
    free(p);
}

/* JSON tokens are counted first, then allocated once at exactly their number:
   65 tokens used to take a 64-token array, then a 128-token one (doubling, and
   both alive while copying); invalid text allocates nothing. */
TEST(json_tokens_are_allocated_once_at_their_exact_count)
{
    counting c;
    esft_allocator a;
    esft_json js;
    char text[400];
    int i, n = 0;
    memset(&c, 0, sizeof c);
    a.user = &c;
    a.alloc = counting_alloc;
    a.free = counting_free;
    n += sprintf(text + n, "[");
    for (i = 0; i < 64; i++) n += sprintf(text + n, i ? ",%d" : "%d", i % 10);
    n += sprintf(text + n, "]");
    CHECK_STATUS(esft_json_parse(&js, text, (size_t)n, &a, NULL), ESFT_OK);
    CHECK_EQ_INT(js.n_tokens, 65);
    CHECK_EQ_INT(c.calls, 1);
    CHECK_MSG(c.peak == 65 * sizeof(esft_json_token), "peak %lu bytes for 65 tokens", (unsigned long)c.peak);
    CHECK(js.tokens[0].size == 64 && js.tokens[64].start == (size_t)n - 2); /* filled as before */
    esft_json_free(&js);
    CHECK(c.live == 0);
    c.calls = 0;
    CHECK_STATUS(esft_json_parse(&js, text, (size_t)n - 1, &a, NULL), ESFT_ERR_PARSE);
    CHECK_EQ_INT(c.calls, 0);
}

/* Absurd accumulator sizes are a range error before any allocation, and each
   allocation is checked before the next is made (zero-filled): a failure at
   the first stops there instead of touching every other array first. */
TEST(stats_init_caps_sizes_and_checks_each_allocation)
{
    counting c;
    esft_allocator a;
    esft_stats st;
    memset(&c, 0, sizeof c);
    a.user = &c;
    a.alloc = counting_alloc;
    a.free = counting_free;
    CHECK_STATUS(esft_stats_init(&st, ESFT_STATS_MAX_LAYERS + 1, 64, 6, &a), ESFT_ERR_RANGE);
    CHECK_STATUS(esft_stats_init(&st, 27, ESFT_STATS_MAX_EXPERTS + 1, 6, &a), ESFT_ERR_RANGE);
    CHECK_STATUS(esft_stats_init(&st, ESFT_STATS_MAX_LAYERS, ESFT_STATS_MAX_EXPERTS, 6, &a), ESFT_ERR_RANGE);
    CHECK_STATUS(esft_stats_init(&st, 300000000, 64, 6, &a), ESFT_ERR_RANGE);
    CHECK_EQ_INT(c.calls, 0);
    c.fail_from = 1;
    CHECK_STATUS(esft_stats_init(&st, 27, 64, 6, &a), ESFT_ERR_OUT_OF_MEMORY);
    CHECK_EQ_INT(c.calls, 1);
    c.calls = 0;
    c.fail_from = 3;
    CHECK_STATUS(esft_stats_init(&st, 27, 64, 6, &a), ESFT_ERR_OUT_OF_MEMORY);
    CHECK_EQ_INT(c.calls, 3);
    CHECK(c.live == 0); /* what was made is freed */
    c.fail_from = 0;
    CHECK_STATUS(esft_stats_init(&st, ESFT_STATS_MAX_LAYERS, 8, 6, &a), ESFT_OK); /* at the layer limit: fine */
    esft_stats_uninit(&st);
}

/* ---- merge: all-or-nothing, its own temp files, foreign directories ------ */

#define MIXTRAL "tests/models/mixtral"
static const char *mixtral_files[] = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                      "model.safetensors.index.json", "config.json"};

static int copy_file(const char *from, const char *to)
{
    size_t n = 0;
    char *data = slurp(from, &n);
    FILE *f = data ? fopen(to, "wb") : NULL;
    int ok = f && fwrite(data, 1, n, f) == n;
    if (f) ok = fclose(f) == 0 && ok;
    free(data);
    return ok;
}

static int same_bytes(const char *a, const char *b)
{
    size_t na = 0, nb = 0;
    char *x = slurp(a, &na), *y = slurp(b, &nb);
    int same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

/* A copy of the tiny sharded Mixtral checkpoint in dir/base and a trained file
   (two experts extracted from it) in dir/trained.safetensors; 0 if unavailable. */
static int merge_setup(const char *dir)
{
    const char *cfg_text = "{\"experts\": {\"0\": [1], \"1\": [0]}, \"shared_experts\": false, \"non_expert_modules\": false}";
    esft_expert_config cfg;
    size_t i;
    int ok = mkdir(join(dir, "base"), 0755) == 0;
    for (i = 0; ok && i < sizeof mixtral_files / sizeof *mixtral_files; i++) {
        char from[300], to[700];
        snprintf(from, sizeof from, "%s/%s", MIXTRAL, mixtral_files[i]);
        snprintf(to, sizeof to, "%s", join3(dir, "base", mixtral_files[i]));
        ok = copy_file(from, to);
    }
    ok = ok && esft_expert_config_parse(cfg_text, strlen(cfg_text), "cfg", &cfg, NULL) == ESFT_OK;
    if (!ok) return 0;
    ok = esft_checkpoint_extract(join(dir, "base"), &cfg, join(dir, "trained.safetensors"), NULL, NULL) == ESFT_OK;
    esft_expert_config_free(&cfg);
    return ok;
}

/* The merged index is the base's, metadata (total_parameters) included; a second
   merge of the same base into the same directory is fine. */
TEST(merge_keeps_the_index_metadata_and_may_redo_a_merge_of_the_same_base)
{
    const char *dir = fresh_dir("merge_meta");
    char out[700];
    esft_checkpoint ck;
    char *index;
    CHECK(dir != NULL);
    if (!merge_setup(dir)) SKIP("tests/models/mixtral not readable");
    if ((size_t)snprintf(out, sizeof out, "%s", join(dir, "out")) >= sizeof out) return; /* join's buffers rotate */
    CHECK_STATUS(esft_checkpoint_merge(join(dir, "base"), join(dir, "trained.safetensors"), out, NULL, NULL), ESFT_OK);
    index = slurp(join(out, "model.safetensors.index.json"), NULL);
    CHECK_MSG(has(index, "\"total_parameters\": 123712"), "index: %.200s", index ? index : "(none)");
    free(index);
    CHECK(same_bytes(join(out, "model.safetensors.index.json"), join3(dir, "base", "model.safetensors.index.json")));
    index = slurp(join(out, ESFT_MERGE_RECORD), NULL);
    CHECK_MSG(has(index, "\"state\": \"complete\""), "record: %s", index ? index : "(none)");
    free(index);
    CHECK(copy_file(MIXTRAL "/config.json", join(out, "config.json"))); /* what a user copies in */
    CHECK_STATUS(esft_checkpoint_merge(join(dir, "base"), join(dir, "trained.safetensors"), out, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_checkpoint_open(&ck, out, NULL, NULL), ESFT_OK);
    esft_checkpoint_close(&ck);
}

/* Another checkpoint in the output directory (stale shards inspect would then
   report) is refused before anything is written; so is a merge of another base. */
TEST(merge_refuses_a_directory_holding_another_checkpoint)
{
    const char *dir = fresh_dir("merge_foreign");
    char out[700];
    esft_error err;
    CHECK(dir != NULL);
    if (!merge_setup(dir)) SKIP("tests/models/mixtral not readable");
    if ((size_t)snprintf(out, sizeof out, "%s", join(dir, "out")) >= sizeof out) return; /* join's buffers rotate */
    CHECK(mkdir(out, 0755) == 0);
    CHECK(copy_file(join(dir, "trained.safetensors"), join(out, "model.safetensors")));
    CHECK_STATUS(esft_checkpoint_merge(join(dir, "base"), join(dir, "trained.safetensors"), out, NULL, &err),
                 ESFT_ERR_INVALID_ARGUMENT);
    CHECK_MSG(has(err.message, "already holds model.safetensors"), "%s", err.message);
    CHECK(!temp_left(join(out, mixtral_files[0])));
    CHECK(access(join(out, mixtral_files[0]), F_OK) != 0 && access(join(out, ESFT_MERGE_RECORD), F_OK) != 0);
    /* a record of a merge of other shards (another base) does not make it ours */
    CHECK(remove(join(out, "model.safetensors")) == 0);
    CHECK(copy_file(join3(dir, "base", mixtral_files[0]), join(out, mixtral_files[0])));
    CHECK(write_text(join(out, ESFT_MERGE_RECORD), "{\"state\": \"complete\", \"base_shards\": {\"model-00001-of-00002.safetensors\": 1, \"model-00002-of-00002.safetensors\": 2}}"));
    CHECK_STATUS(esft_checkpoint_merge(join(dir, "base"), join(dir, "trained.safetensors"), out, NULL, &err),
                 ESFT_ERR_INVALID_ARGUMENT);
    CHECK_MSG(has(err.message, "not an earlier merge of this base"), "%s", err.message);
}

/* Temp files of merge's own outputs left by a killed run are removed; files that
   only look alike, and the user's other files, stay. */
TEST(merge_removes_its_own_stale_temp_files_only)
{
    const char *dir = fresh_dir("merge_stale");
    char out[700];
    char stale[700];
    CHECK(dir != NULL);
    if (!merge_setup(dir)) SKIP("tests/models/mixtral not readable");
    if ((size_t)snprintf(out, sizeof out, "%s", join(dir, "out")) >= sizeof out) return; /* join's buffers rotate */
    CHECK(mkdir(out, 0755) == 0);
    snprintf(stale, sizeof stale, "%s.tmp.999999.0", join(out, mixtral_files[0]));
    CHECK(write_text(stale, "half a shard from a killed merge"));
    CHECK(write_text(join(out, "model.safetensors.index.json.tmp.12.3"), "{"));
    CHECK(write_text(join(out, "notes.txt.tmp.12.3"), "mine"));
    CHECK(write_text(join(out, "model-00001-of-00002.safetensors.tmp.x"), "mine too"));
    CHECK(write_text(join(out, "tokenizer.json"), "{}"));
    CHECK_STATUS(esft_checkpoint_merge(join(dir, "base"), join(dir, "trained.safetensors"), out, NULL, NULL), ESFT_OK);
    CHECK(access(stale, F_OK) != 0);
    CHECK(access(join(out, "model.safetensors.index.json.tmp.12.3"), F_OK) != 0);
    CHECK(access(join(out, "notes.txt.tmp.12.3"), F_OK) == 0);
    CHECK(access(join(out, "model-00001-of-00002.safetensors.tmp.x"), F_OK) == 0);
    CHECK(access(join(out, "tokenizer.json"), F_OK) == 0);
}

/* The rename phase is recorded: a directory whose record is not "complete"
   (a merge killed while renaming: some shards new, some old) is refused by
   esft_checkpoint_open, and merging again repairs it. */
TEST(an_interrupted_merge_is_detected_and_repaired_by_merging_again)
{
    const char *dir = fresh_dir("merge_interrupted");
    char out[700];
    esft_checkpoint ck;
    esft_error err;
    char *record;
    CHECK(dir != NULL);
    if (!merge_setup(dir)) SKIP("tests/models/mixtral not readable");
    if ((size_t)snprintf(out, sizeof out, "%s", join(dir, "out")) >= sizeof out) return; /* join's buffers rotate */
    CHECK_STATUS(esft_checkpoint_merge(join(dir, "base"), join(dir, "trained.safetensors"), out, NULL, NULL), ESFT_OK);
    record = slurp(join(out, ESFT_MERGE_RECORD), NULL);
    CHECK(record != NULL);
    if (!record) return;
    /* the state a kill between two renames leaves */
    CHECK(write_text(join(out, ESFT_MERGE_RECORD), "{\"state\": \"renaming\", \"base_shards\": {}}"));
    CHECK_STATUS(esft_checkpoint_open(&ck, out, NULL, &err), ESFT_ERR_IO);
    CHECK_MSG(has(err.message, "interrupted esft merge"), "%s", err.message);
    CHECK_STATUS(esft_checkpoint_open(&ck, join(out, mixtral_files[0]), NULL, &err), ESFT_ERR_IO); /* a shard alone too */
    CHECK_STATUS(esft_checkpoint_open(&ck, join(dir, "base"), NULL, &err), ESFT_OK); /* the base is not concerned */
    esft_checkpoint_close(&ck);
    /* "renaming" with the same base shards: merge again is allowed and repairs it */
    {
        char *renaming = (char *)malloc(strlen(record) + 16), *at = strstr(record, "complete");
        CHECK(renaming && at);
        if (!renaming || !at) { free(renaming); free(record); return; }
        sprintf(renaming, "%.*srenaming%s", (int)(at - record), record, at + strlen("complete"));
        CHECK(write_text(join(out, ESFT_MERGE_RECORD), renaming));
        free(renaming);
    }
    CHECK_STATUS(esft_checkpoint_merge(join(dir, "base"), join(dir, "trained.safetensors"), out, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_checkpoint_open(&ck, out, NULL, NULL), ESFT_OK);
    esft_checkpoint_close(&ck);
    free(record);
}

/* A failure in the middle of the renames (here: one shard's name turned into a
   directory while the copy ran) leaves the record at "renaming": the mixed
   directory is reported, not opened as if whole. */
typedef struct rename_trap {
    const char *path;
    int armed;
} rename_trap;

static void trap_progress(void *user, uint64_t done, uint64_t total)
{
    rename_trap *t = (rename_trap *)user;
    if (!t->armed || done != total) return;
    t->armed = 0; /* every temp file is open by now: block the second shard's rename */
    remove(t->path);
    if (mkdir(t->path, 0755) == 0) write_text(join(t->path, "keep"), "x");
}

TEST(a_merge_failing_between_renames_leaves_a_detectable_state)
{
    const char *dir = fresh_dir("merge_half");
    char out[700];
    char second[700];
    esft_checkpoint_options opt;
    rename_trap trap;
    esft_checkpoint ck;
    esft_error err;
    CHECK(dir != NULL);
    if (!merge_setup(dir)) SKIP("tests/models/mixtral not readable");
    if ((size_t)snprintf(out, sizeof out, "%s", join(dir, "out")) >= sizeof out) return; /* join's buffers rotate */
    CHECK_STATUS(esft_checkpoint_merge(join(dir, "base"), join(dir, "trained.safetensors"), out, NULL, NULL), ESFT_OK);
    snprintf(second, sizeof second, "%s", join(out, mixtral_files[1]));
    memset(&opt, 0, sizeof opt);
    trap.path = second;
    trap.armed = 1;
    opt.progress = trap_progress;
    opt.user = &trap;
    CHECK(esft_checkpoint_merge(join(dir, "base"), join(dir, "trained.safetensors"), out, &opt, &err) != ESFT_OK);
    CHECK_MSG(trap.armed == 0, "the trap never ran");
    CHECK_STATUS(esft_checkpoint_open(&ck, out, NULL, &err), ESFT_ERR_IO);
    CHECK_MSG(has(err.message, "interrupted esft merge"), "%s", err.message);
    CHECK(!temp_left(join(out, mixtral_files[0])) && !temp_left(second));
}

/* The library refuses too (for callers other than the command): extract onto a
   shard of its base, merge onto a link to a base shard or to the trained file. */
TEST(extract_and_merge_refuse_an_output_that_is_an_input)
{
    const char *dir = fresh_dir("lib_same_file");
    const char *cfg_text = "{\"experts\": {\"0\": [1]}, \"shared_experts\": false, \"non_expert_modules\": false}";
    char out[700], shard[700];
    esft_expert_config cfg;
    esft_error err;
    CHECK(dir != NULL);
    if (!merge_setup(dir)) SKIP("tests/models/mixtral not readable");
    snprintf(shard, sizeof shard, "%s", join3(dir, "base", mixtral_files[0]));
    CHECK(copy_file(shard, join(dir, "shard.orig")));
    CHECK_STATUS(esft_expert_config_parse(cfg_text, strlen(cfg_text), "cfg", &cfg, NULL), ESFT_OK);
    CHECK_STATUS(esft_checkpoint_extract(join(dir, "base"), &cfg, shard, NULL, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_MSG(has(err.message, "the output is the input"), "%s", err.message);
    CHECK(same_bytes(shard, join(dir, "shard.orig")));
    esft_expert_config_free(&cfg);
    if ((size_t)snprintf(out, sizeof out, "%s", join(dir, "out")) >= sizeof out) return;
    CHECK(mkdir(out, 0755) == 0);
    CHECK_STATUS(esft_checkpoint_merge(join(dir, "base"), join(dir, "trained.safetensors"), out, NULL, NULL), ESFT_OK);
    CHECK(remove(join(out, mixtral_files[1])) == 0); /* an earlier merge, one shard now a link to the base's */
    CHECK(symlink(join3(dir, "base", mixtral_files[1]), join(out, mixtral_files[1])) == 0);
    CHECK(copy_file(join3(dir, "base", mixtral_files[1]), join(dir, "shard2.orig")));
    CHECK_STATUS(esft_checkpoint_merge(join(dir, "base"), join(dir, "trained.safetensors"), out, NULL, &err),
                 ESFT_ERR_INVALID_ARGUMENT);
    CHECK_MSG(has(err.message, "the output is the input"), "%s", err.message);
    CHECK(same_bytes(join3(dir, "base", mixtral_files[1]), join(dir, "shard2.orig")));
    CHECK(!temp_left(join3(dir, "base", mixtral_files[1])) && !temp_left(join(out, mixtral_files[0])));
}

HARNESS_MAIN()
