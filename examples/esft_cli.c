/* esft_cli.c - the `esft` command: router statistics, expert selection and
   heatmaps for Expert-Specialized Fine-Tuning, on top of esft.h.

   Build (the Makefile does this as build/esft):
       cc -std=c99 -O2 -I. examples/esft_cli.c -o esft -lm

   Usage:
       esft stats LOGDIR -o summary.json           routing logs -> scores
       esft select summary.json --top-p 0.2 -o config.json
       esft heatmap summary.json --config config.json -o map.svg
       esft inspect MODEL_DIR                       tensors, dtypes, experts
       esft extract MODEL_DIR --config config.json -o experts.safetensors
       esft merge MODEL_DIR trained.safetensors -o MERGED_DIR
       esft train MODEL_DIR --data t.jsonl --expert-config c.json --steps N --batch-tokens B -o out.safetensors
       esft help CMD | esft CMD --help | esft --help | esft --version

   Exit status: 0 success, 1 runtime error (bad file, bad value), 2 usage error.
   Messages go to stderr, naming file:line where the library knows them; help
   and --version, which the user asked for, go to stdout. An output file is
   written only when the whole command succeeds (the library writes to
   "<path>.tmp.<pid>.<n>" and renames). docs/cli.md is the manual.

   Adding a command: write `static int cmd_NAME(const char *name, int argc, char **argv)`
   and its help text, then add one row to `commands[]` below. argv[0] is the
   command's name; parse the rest with cli_text()/cli_int_option()/cli_flag()
   (and cli_int()/cli_double()/cli_score() for values read with cli_text()). */
/* A POSIX program: posix_fadvise lets esft merge/extract start writing finished
   chunks to disk while copying (see docs/checkpoints.md). */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { EXIT_OK = 0, EXIT_RUNTIME = 1, EXIT_USAGE = 2 };

/* ---- messages ---------------------------------------------------------- */

/* "esft CMD: FILE:LINE: message (status)" on stderr; returns EXIT_RUNTIME. */
static int cli_fail(const char *cmd, esft_status s, const esft_error *err)
{
    fprintf(stderr, "esft %s: ", cmd);
    if (err && err->file[0]) {
        fprintf(stderr, "%s", err->file);
        if (err->line > 0) fprintf(stderr, ":%ld", err->line);
        fprintf(stderr, ": ");
    }
    if (err && err->message[0]) fprintf(stderr, "%s (%s)\n", err->message, esft_status_string(s));
    else fprintf(stderr, "%s\n", esft_status_string(s));
    return EXIT_RUNTIME;
}

/* A usage error: the reason, then where to read more; returns EXIT_USAGE. */
static int cli_usage(const char *cmd, const char *fmt, const char *a, const char *b)
{
    fprintf(stderr, "esft%s%s: ", cmd ? " " : "", cmd ? cmd : "");
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, "\nTry 'esft help%s%s'.\n", cmd ? " " : "", cmd ? cmd : "");
    return EXIT_USAGE;
}

/* ---- option parsing ---------------------------------------------------- */

/* Matches argv[*i] against an option (e.g. "--top-p", or "-o"), accepting
   "--top-p 0.2" and "--top-p=0.2". Returns 0: not this option; 1: matched,
   *value set (NULL for a flag, which takes none); -1: a value is missing. */
static int cli_option(int argc, char **argv, int *i, const char *name, int takes_value,
                      const char **value)
{
    const char *a = argv[*i];
    size_t n = strlen(name);
    *value = NULL;
    if (strncmp(a, name, n) != 0) return 0;
    if (a[n] == '=' && takes_value) { *value = a + n + 1; return 1; }
    if (a[n] != 0) return 0;
    if (!takes_value) return 1;
    if (*i + 1 >= argc) return -1;
    *value = argv[++*i];
    return 1;
}

/* A whole-string integer, else a usage error. */
static int cli_int(const char *cmd, const char *flag, const char *text, int *out)
{
    char *end;
    long v = strtol(text, &end, 10);
    if (!*text || *end || v < -1000000000L || v > 1000000000L)
        return cli_usage(cmd, "%s expects an integer, got '%s'", flag, text);
    *out = (int)v;
    return EXIT_OK;
}

/* A whole-string number, else a usage error (its range is the library's to judge). */
static int cli_double(const char *cmd, const char *flag, const char *text, double *out)
{
    char *end;
    *out = strtod(text, &end);
    if (!*text || *end) return cli_usage(cmd, "%s expects a number, got '%s'", flag, text);
    return EXIT_OK;
}

/* "token" or "gate", else a usage error. */
static int cli_score(const char *cmd, const char *text, esft_score *out)
{
    if (strcmp(text, "token") == 0) *out = ESFT_SCORE_TOKEN;
    else if (strcmp(text, "gate") == 0) *out = ESFT_SCORE_GATE;
    else return cli_usage(cmd, "--score expects token or gate, got '%s'%s", text, "");
    return EXIT_OK;
}

/* The common tail of every option loop: "-h/--help" was handled by main, so
   what is left is an unknown option or a positional argument. */
static int cli_positional(const char *cmd, const char *arg, const char **slot, const char *what)
{
    if (arg[0] == '-' && arg[1] != 0) return cli_usage(cmd, "unknown option '%s'%s", arg, "");
    if (*slot) return cli_usage(cmd, "more than one %s: '%s'", what, arg);
    *slot = arg;
    return EXIT_OK;
}

/* A value option, with an optional second spelling ("-o", "--output"), read
   into *out. Returns 0: not this option; 1: read; -1: no value (reported). */
static int cli_text(const char *cmd, int argc, char **argv, int *i, const char *flag,
                    const char *alias, const char **out)
{
    const char *v;
    int r = cli_option(argc, argv, i, flag, 1, &v);
    if (r == 0 && alias) r = cli_option(argc, argv, i, alias, 1, &v);
    if (r < 0) cli_usage(cmd, "%s needs a value%s", flag, "");
    else if (r > 0) *out = v;
    return r;
}

/* An integer option: 0 not this option; 1 read; -1 usage error (reported). */
static int cli_int_option(const char *cmd, int argc, char **argv, int *i, const char *flag, int *out)
{
    const char *v;
    int r = cli_text(cmd, argc, argv, i, flag, NULL, &v);
    return r > 0 && cli_int(cmd, flag, v, out) != EXIT_OK ? -1 : r;
}

/* A flag (no value) under either spelling (alias may be NULL). */
static int cli_flag(int argc, char **argv, int *i, const char *flag, const char *alias)
{
    const char *v;
    return cli_option(argc, argv, i, flag, 0, &v) || (alias && cli_option(argc, argv, i, alias, 0, &v));
}

/* A required argument or option that was not given. */
static int cli_missing(const char *cmd, const char *what)
{
    return cli_usage(cmd, "missing %s%s", what, "");
}

/* ---- outputs that are inputs ------------------------------------------ */

/* The files a command reads, by identity (device and inode), so that an output
   which is one of them, under any name (a hard or symbolic link, "./x" for
   "x"), is refused before anything is written: the atomic writer would
   otherwise rename its result over the input (`esft extract m.safetensors -o
   m.safetensors` replaced the checkpoint with a 288-byte file). */
typedef struct cli_inputs {
    int n, cap;
    dev_t *dev;
    ino_t *ino;
    char **name;
} cli_inputs;

static void cli_inputs_free(cli_inputs *in)
{
    int i;
    for (i = 0; i < in->n; i++) free(in->name[i]);
    free(in->dev);
    free(in->ino);
    free(in->name);
    memset(in, 0, sizeof *in);
}

/* Adds path if it is a regular file (what is not there cannot be overwritten;
   a directory or FIFO is refused as an output anyway). 0 when out of memory. */
static int cli_inputs_add(cli_inputs *in, const char *path)
{
    struct stat sb;
    size_t len = strlen(path) + 1;
    if (stat(path, &sb) != 0 || !S_ISREG(sb.st_mode)) return 1;
    if (in->n == in->cap) {
        int cap = in->cap ? in->cap * 2 : 16;
        dev_t *dev = (dev_t *)realloc(in->dev, (size_t)cap * sizeof *dev);
        ino_t *ino = dev ? (ino_t *)realloc(in->ino, (size_t)cap * sizeof *ino) : NULL;
        char **name = ino ? (char **)realloc(in->name, (size_t)cap * sizeof *name) : NULL;
        if (dev) in->dev = dev;
        if (ino) in->ino = ino;
        if (!name) return 0;
        in->name = name;
        in->cap = cap;
    }
    if (!(in->name[in->n] = (char *)malloc(len))) return 0;
    memcpy(in->name[in->n], path, len);
    in->dev[in->n] = sb.st_dev;
    in->ino[in->n] = sb.st_ino;
    in->n++;
    return 1;
}

/* A checkpoint: the path itself, its index and every shard it names. One that
   does not open adds only the path; the command then reports why it fails. */
static int cli_inputs_add_checkpoint(cli_inputs *in, const char *path)
{
    char file[4200];
    esft_checkpoint ck;
    int ok = cli_inputs_add(in, path), s;
    if (esft_checkpoint_open(&ck, path, NULL, NULL) != ESFT_OK) return ok;
    for (s = 0; ok && s < ck.n_shards; s++) {
        snprintf(file, sizeof file, "%s/%s", ck.dir, ck.shard_files[s]);
        ok = cli_inputs_add(in, file);
    }
    snprintf(file, sizeof file, "%s/model.safetensors.index.json", ck.dir);
    ok = ok && cli_inputs_add(in, file);
    snprintf(file, sizeof file, "%s/config.json", ck.dir);
    ok = ok && cli_inputs_add(in, file);
    esft_checkpoint_close(&ck);
    return ok;
}

/* Refuses out when it is one of the inputs: a usage error (exit 2), before
   anything is written. Returns EXIT_OK when out is a new file or another one. */
static int cli_check_output(const char *cmd, const cli_inputs *in, const char *out)
{
    struct stat sb;
    int i;
    if (stat(out, &sb) != 0) return EXIT_OK;
    for (i = 0; i < in->n; i++)
        if (in->dev[i] == sb.st_dev && in->ino[i] == sb.st_ino)
            return cli_usage(cmd, "the output '%s' is the input '%s' (the same file); choose another output", out,
                             in->name[i]);
    return EXIT_OK;
}

/* The end of every command's check: out against the inputs gathered (ok: all
   were added), then the list is freed. */
static int cli_check_done(const char *cmd, cli_inputs *in, int ok, const char *out)
{
    int r = ok ? cli_check_output(cmd, in, out) : cli_fail(cmd, ESFT_ERR_OUT_OF_MEMORY, NULL);
    cli_inputs_free(in);
    return r;
}

/* The usual case: up to three plain input files (NULL ones skipped). */
static int cli_check_files(const char *cmd, const char *out, const char *a, const char *b, const char *c)
{
    cli_inputs in;
    int ok = 1;
    memset(&in, 0, sizeof in);
    if (a) ok = cli_inputs_add(&in, a);
    if (b && ok) ok = cli_inputs_add(&in, b);
    if (c && ok) ok = cli_inputs_add(&in, c);
    return cli_check_done(cmd, &in, ok, out);
}

/* A model run: MODEL_DIR's files and the data file. */
static int cli_check_model(const char *cmd, const char *out, const char *dir, const char *data)
{
    cli_inputs in;
    int ok;
    memset(&in, 0, sizeof in);
    ok = cli_inputs_add_checkpoint(&in, dir) && cli_inputs_add(&in, data);
    return cli_check_done(cmd, &in, ok, out);
}

/* ---- esft stats -------------------------------------------------------- */

static const char stats_help[] =
    "usage: esft stats LOGDIR -o SUMMARY.json [options]\n"
    "\n"
    "Router statistics from ESFT routing logs: reads LOGDIR/expert_weights_<L>.txt\n"
    "(one line per sample: the top-K expert ids of every token, a tab-tab, then the\n"
    "gate weights) and writes token and gate scores per (layer, expert) in the\n"
    "layout of ESFT's summary.json.\n"
    "\n"
    "options:\n"
    "  -o, --output FILE     where to write the scores (required)\n"
    "  --norm pooled|per-sample\n"
    "                        pooled (default): count / (K * tokens of the layer), as\n"
    "                        ESFT's summary.json; per-sample: the paper's Eq. 6-7,\n"
    "                        the mean over samples of each sample's value\n"
    "  --model-config FILE   the model's config.json (Hugging Face): E, K and the layer\n"
    "                        count come from it (n_routed_experts / num_experts,\n"
    "                        num_experts_per_tok, num_hidden_layers); an --experts,\n"
    "                        --top-k or --layers that disagrees with it is an error\n"
    "  --top-k K             experts per token in the logs (default 6, DeepSeek-V2-Lite)\n"
    "  --experts N           routed experts per layer (default 64)\n"
    "  --layers L            layer numbers 0..L-1 are read (default 27: logs 1..26)\n"
    "  --decimals D          round scores to D decimals (default 4, as ESFT);\n"
    "                        -1 writes full precision\n"
    "  -q, --quiet           no summary line on success\n"
    "\n"
    "A wrong --top-k or --experts does not give plausible scores: a token naming an\n"
    "expert twice, an id count that --top-k does not divide, or an id >= --experts\n"
    "is an error saying which K or E the log looks like; experts that no token of\n"
    "any layer selected at the top of the range get a warning naming the likely E.\n"
    "\n"
    "example:\n"
    "  esft stats build/data/translation -o summary.json\n"
    "  esft stats LOGDIR --model-config DeepSeek-V2-Lite/config.json -o summary.json\n"
    "\n"
    "With --data, esft stats runs a model instead (the second form):\n"
"\n"
    "usage: esft stats MODEL_DIR --data FILE.jsonl -o SUMMARY.json [options]\n"
    "\n"
    "Router statistics from the model itself: runs the Hugging Face checkpoint\n"
    "MODEL_DIR over the samples (see esft eval) and counts the routing each MoE\n"
    "layer's forward used; layers are numbered by the model's layer index, as\n"
    "ESFT numbers them.\n"
    "  --data FILE        the samples (JSONL; see esft help eval)\n"
    "  --tokens all|labelled\n"
    "                     which tokens count: every token (default, as ESFT's\n"
    "                     scoring runs did) or only those whose label is not -100\n"
    "  --max-samples N    only the first N samples\n"
    "  --norm, --decimals, -q as above\n";

static int cmd_stats_model(const char *name, int argc, char **argv);
static int cli_has_option(int argc, char **argv, const char *flag);

/* One of E, K, L from the model's config.json: the value, unless the command
   line gave another (given >= 0), which is a usage error. */
static int cli_model_value(const char *cmd, const char *flag, int given, int model, const char *path, int *out)
{
    char a[64], b[600];
    if (given >= 0 && given != model) {
        snprintf(a, sizeof a, "%s %d", flag, given);
        snprintf(b, sizeof b, "%d in %.500s", model, path);
        return cli_usage(cmd, "%s disagrees with the model: %s", a, b);
    }
    *out = model;
    return EXIT_OK;
}

/* --model-config: E, K and the layer count from a Hugging Face config.json, with
   the library's reader (the one esft eval uses). given_* are the command line's
   values, -1 where not given. */
static int cli_stats_model_config(const char *cmd, const char *path, int given_k, int given_e, int given_l,
                                  int *k, int *experts, int *layers)
{
    esft_model_config mc;
    esft_error err;
    esft_status s;
    memset(&err, 0, sizeof err);
    s = esft_model_config_read(&mc, path, &err);
    if (s != ESFT_OK) return cli_fail(cmd, s, &err);
    if (esft_model_config_moe_layers(&mc) == 0) {
        fprintf(stderr, "esft %s: %s: the model has no MoE layer (%s): no router, so no routing logs to score\n", cmd,
                path, esft_model_family_name(mc.family));
        return EXIT_RUNTIME;
    }
    if (cli_model_value(cmd, "--top-k", given_k, mc.route.top_k, path, k) ||
        cli_model_value(cmd, "--experts", given_e, mc.route.n_experts, path, experts) ||
        cli_model_value(cmd, "--layers", given_l, mc.n_layers, path, layers))
        return EXIT_USAGE;
    return EXIT_OK;
}

/* Experts above the highest one any token of any layer selected score 0
   everywhere: with --experts larger than the model's, that is what it looks
   like. A warning, not an error (a short log may leave the last experts idle). */
static void cli_warn_idle_top_experts(const char *cmd, const esft_stats *st)
{
    int l, e, top = -1;
    for (l = 0; l < st->n_layers; l++)
        for (e = st->n_experts - 1; e > top; e--)
            if (st->count[(size_t)l * st->n_experts + e]) { top = e; break; }
    if (top >= 0 && top + 1 < st->n_experts)
        fprintf(stderr,
                "esft %s: warning: no token of any layer selected an expert above %d: the logs look like "
                "--experts %d, not %d (experts %d..%d score 0); --model-config FILE reads E from the model\n",
                cmd, top, top + 1, st->n_experts, top + 1, st->n_experts - 1);
}

static int cmd_stats(const char *name, int argc, char **argv)
{
    const char *dir = NULL, *out = NULL, *v, *model_config = NULL;
    int i, r, k = -1, experts = -1, layers = -1, decimals = 4, quiet = 0, n_files = 0, l;
    esft_norm norm = ESFT_NORM_POOLED;
    esft_stats st;
    esft_scores sc;
    esft_error err;
    esft_status s;
    unsigned long long samples = 0, tokens = 0;
    if (cli_has_option(argc, argv, "--data")) return cmd_stats_model(name, argc, argv);
    memset(&err, 0, sizeof err);
    for (i = 1; i < argc; i++) {
        if ((r = cli_text(name, argc, argv, &i, "-o", "--output", &out)) ||
            (r = cli_text(name, argc, argv, &i, "--model-config", NULL, &model_config)) ||
            (r = cli_int_option(name, argc, argv, &i, "--top-k", &k)) ||
            (r = cli_int_option(name, argc, argv, &i, "--experts", &experts)) ||
            (r = cli_int_option(name, argc, argv, &i, "--layers", &layers)) ||
            (r = cli_int_option(name, argc, argv, &i, "--decimals", &decimals))) {
            if (r < 0) return EXIT_USAGE;
        } else if ((r = cli_text(name, argc, argv, &i, "--norm", NULL, &v))) {
            if (r < 0) return EXIT_USAGE;
            if (strcmp(v, "pooled") == 0) norm = ESFT_NORM_POOLED;
            else if (strcmp(v, "per-sample") == 0) norm = ESFT_NORM_PER_SAMPLE;
            else return cli_usage(name, "--norm expects pooled or per-sample, got '%s'%s", v, "");
        } else if (cli_flag(argc, argv, &i, "-q", "--quiet")) {
            quiet = 1;
        } else if (cli_positional(name, argv[i], &dir, "log directory")) {
            return EXIT_USAGE;
        }
    }
    if (!dir) return cli_missing(name, "the log directory");
    if (!out) return cli_missing(name, "-o SUMMARY.json");
    if (decimals < -1 || decimals > 17) return cli_usage(name, "--decimals must be -1..17%s%s", "", "");
    if (model_config) {
        r = cli_stats_model_config(name, model_config, k, experts, layers, &k, &experts, &layers);
        if (r != EXIT_OK) return r;
    } else { /* DeepSeek-V2-Lite, whose logs ESFT published */
        if (k == -1) k = 6;
        if (experts == -1) experts = 64;
        if (layers == -1) layers = 27;
    }
    memset(&err, 0, sizeof err);
    if (k < 1 || experts < 1 || layers < 1 || k > experts) {
        snprintf(err.message, sizeof err.message, "need 1 <= top-k (%d) <= experts (%d) and layers (%d) >= 1",
                 k, experts, layers);
        return cli_fail(name, ESFT_ERR_INVALID_ARGUMENT, &err);
    }
    s = esft_stats_init(&st, layers, experts, k, NULL);
    if (s == ESFT_ERR_RANGE)
        snprintf(err.message, sizeof err.message, "need layers (%d) <= %d, experts (%d) <= %d, layers x experts <= %lld",
                 layers, ESFT_STATS_MAX_LAYERS, experts, ESFT_STATS_MAX_EXPERTS, (long long)ESFT_STATS_MAX_CELLS);
    if (s != ESFT_OK) return cli_fail(name, s, &err);
    {   /* the logs read: layers 0..L-1, and the ones probed past them */
        cli_inputs in;
        char path[4200];
        int ok = 1;
        memset(&in, 0, sizeof in);
        for (l = 0; ok && l < layers + 1024; l++) {
            snprintf(path, sizeof path, "%s/expert_weights_%d.txt", dir, l);
            ok = cli_inputs_add(&in, path);
        }
        if ((r = cli_check_done(name, &in, ok, out)) != EXIT_OK) { esft_stats_uninit(&st); return r; }
    }
    s = esft_stats_read_log_dir(&st, dir, &n_files, &err);
    if (s == ESFT_OK && !model_config) cli_warn_idle_top_experts(name, &st);
    if (s == ESFT_OK) {
        s = esft_stats_scores(&st, norm, &sc);
        if (s == ESFT_OK) {
            s = esft_scores_write_json(out, &sc, decimals, &err);
            esft_scores_free(&sc);
        }
    }
    for (l = 0; l < st.n_layers; l++) { /* the same samples pass every layer, so one count says it */
        if (!st.n_tokens[l]) continue;
        if (st.n_samples[l] > samples) samples = st.n_samples[l];
        if (st.n_tokens[l] > tokens) tokens = st.n_tokens[l];
    }
    esft_stats_uninit(&st);
    if (s != ESFT_OK) {
        cli_fail(name, s, &err);
        if (!model_config && (s == ESFT_ERR_SHAPE || s == ESFT_ERR_RANGE) && (strstr(err.message, " looks like") || strstr(err.message, " experts, not ")))
            fprintf(stderr, "esft %s: --top-k and --experts must be the model's: --model-config FILE reads them "
                            "from its config.json\n", name);
        return EXIT_RUNTIME;
    }
    if (!quiet)
        fprintf(stderr, "esft stats: %d layer logs, up to %llu samples and %llu tokens per layer; %s scores -> %s\n",
                n_files, samples, tokens, norm == ESFT_NORM_POOLED ? "pooled" : "per-sample", out);
    return EXIT_OK;
}

/* ---- esft select ------------------------------------------------------- */

static const char select_help[] =
    "usage: esft select SUMMARY.json (--top-p P | --top-k K | --budget N) -o CONFIG.json [options]\n"
    "\n"
    "Chooses the experts to train from router scores and writes ESFT's expert config\n"
    "({\"experts\": {\"<layer>\": [ids...]}, \"shared_experts\": ..., \"non_expert_modules\": ...}).\n"
    "Ids are listed per layer in selection order (highest score first).\n"
    "\n"
    "rule (exactly one):\n"
    "  --top-p P             per layer: sort by score, take experts while the running\n"
    "                        sum is < P, the one that crosses P included; P in (0, 1]\n"
    "                        (ESFT's shipped configs: token score, P = 0.2)\n"
    "  --top-k K             the K best experts of every layer\n"
    "  --budget N            the N best (layer, expert) pairs over all layers\n"
    "options:\n"
    "  -o, --output FILE     where to write the config (required)\n"
    "  --score token|gate    which score to rank by (default token)\n"
    "  --shared-experts      mark the shared experts trainable in the config\n"
    "  --non-expert-modules  mark attention, norms, router, embeddings trainable\n"
    "  -q, --quiet           no summary line on success\n"
    "\n"
    "example:\n"
    "  esft select summary.json --top-p 0.2 -o config.json\n"
    "  esft select summary.json --score gate --top-p 0.1 -o config_gate.json\n";

static int cmd_select(const char *name, int argc, char **argv)
{
    const char *in = NULL, *out = NULL, *v, *rule = NULL, *rule_value = NULL;
    int i, r, quiet = 0, shared = 0, non_expert = 0, n = 0;
    double p = 0.0;
    esft_score which = ESFT_SCORE_TOKEN;
    esft_scores sc;
    esft_expert_config cfg;
    esft_error err;
    esft_status s;
    memset(&err, 0, sizeof err);
    for (i = 1; i < argc; i++) {
        const char *rules[3] = {"--top-p", "--top-k", "--budget"};
        int j, matched = 0;
        for (j = 0; j < 3 && !matched; j++) {
            if ((r = cli_text(name, argc, argv, &i, rules[j], NULL, &v)) == 0) continue;
            if (r < 0) return EXIT_USAGE;
            if (rule) return cli_usage(name, "give one of --top-p, --top-k, --budget (got %s and %s)", rule, rules[j]);
            rule = rules[j];
            rule_value = v;
            matched = 1;
        }
        if (matched) continue;
        if ((r = cli_text(name, argc, argv, &i, "-o", "--output", &out))) {
            if (r < 0) return EXIT_USAGE;
        } else if ((r = cli_text(name, argc, argv, &i, "--score", NULL, &v))) {
            if (r < 0 || cli_score(name, v, &which)) return EXIT_USAGE;
        } else if (cli_flag(argc, argv, &i, "--shared-experts", NULL)) {
            shared = 1;
        } else if (cli_flag(argc, argv, &i, "--non-expert-modules", NULL)) {
            non_expert = 1;
        } else if (cli_flag(argc, argv, &i, "-q", "--quiet")) {
            quiet = 1;
        } else if (cli_positional(name, argv[i], &in, "summary file")) {
            return EXIT_USAGE;
        }
    }
    if (!in) return cli_missing(name, "the summary.json to select from");
    if (!rule) return cli_missing(name, "the rule: --top-p P, --top-k K or --budget N");
    if (!out) return cli_missing(name, "-o CONFIG.json");
    if (strcmp(rule, "--top-p") == 0 ? cli_double(name, rule, rule_value, &p) : cli_int(name, rule, rule_value, &n))
        return EXIT_USAGE;
    if ((r = cli_check_files(name, out, in, NULL, NULL)) != EXIT_OK) return r;
    s = esft_scores_read_json(in, &sc, &err);
    if (s != ESFT_OK) return cli_fail(name, s, &err);
    if (strcmp(rule, "--top-p") == 0) s = esft_select_top_p(&sc, which, p, &cfg, &err);
    else if (strcmp(rule, "--top-k") == 0) s = esft_select_top_k(&sc, which, n, &cfg, &err);
    else s = esft_select_budget(&sc, which, n, &cfg, &err);
    if (s == ESFT_OK) {
        int total = 0, l;
        for (l = 0; l < sc.n_layers; l++) total += sc.layer_present[l] ? sc.n_experts : 0;
        cfg.shared_experts = shared;
        cfg.non_expert_modules = non_expert;
        s = esft_expert_config_write(out, &cfg, &err);
        if (s == ESFT_OK && !quiet)
            fprintf(stderr, "esft select: %d of %d experts by %s score, %s %s -> %s\n", esft_expert_config_count(&cfg),
                    total, which == ESFT_SCORE_GATE ? "gate" : "token", rule, rule_value, out);
        esft_expert_config_free(&cfg);
    }
    esft_scores_free(&sc);
    return s == ESFT_OK ? EXIT_OK : cli_fail(name, s, &err);
}

/* ---- esft heatmap ------------------------------------------------------ */

static const char heatmap_help[] =
    "usage: esft heatmap SUMMARY_OR_CONFIG [--config CONFIG.json] -o MAP.svg [options]\n"
    "\n"
    "Draws layers x experts as an SVG picture. Given a summary.json: colour = score,\n"
    "with a colour bar; with --config, the selected experts are outlined. Given an\n"
    "expert config alone: the selected experts, numbered by their rank in the layer.\n"
    "The kind of input file is detected from its content. docs/heatmap.md explains\n"
    "how to read the picture.\n"
    "\n"
    "options:\n"
    "  -o, --output FILE     where to write the SVG (required)\n"
    "  --score token|gate    which score colours the cells (default token)\n"
    "  --config FILE         outline the experts this expert config selects\n"
    "  --experts N           experts per layer when drawing a config alone\n"
    "                        (default: the highest id, rounded up to a multiple of 8)\n"
    "  -q, --quiet           no summary line on success\n"
    "\n"
    "example:\n"
    "  esft heatmap summary.json --config config.json -o map.svg\n"
    "  convert map.svg map.png       # or rsvg-convert map.svg -o map.png\n";

/* Which ESFT JSON file the text is: 1 summary, 2 expert config, 0 neither (err filled). */
static int cli_json_kind(const char *text, size_t size, const char *path, esft_error *err)
{
    esft_json js;
    int kind = 0;
    esft_status s = esft_json_parse(&js, text, size, NULL, err);
    if (s != ESFT_OK) {
        snprintf(err->file, sizeof err->file, "%s", path);
        return 0;
    }
    if (js.tokens[0].type == ESFT_JSON_OBJECT) {
        if (esft_json_find(&js, 0, "token_scores") >= 0 || esft_json_find(&js, 0, "gate_scores") >= 0) kind = 1;
        else if (esft_json_find(&js, 0, "experts") >= 0) kind = 2;
    }
    esft_json_free(&js);
    if (!kind) {
        memset(err, 0, sizeof *err);
        snprintf(err->file, sizeof err->file, "%s", path);
        snprintf(err->message, sizeof err->message,
                 "neither a summary.json (token_scores, gate_scores) nor an expert config (experts)");
        err->status = ESFT_ERR_PARSE;
    }
    return kind;
}

/* The summary line of a drawn heatmap: what it shows and where it went. */
static void cli_heatmap_summary(const esft_scores *sc, esft_score which, const esft_expert_config *cfg,
                                const char *out)
{
    fprintf(stderr, "esft heatmap: ");
    if (sc) fprintf(stderr, "%d layers x %d experts, %s scores", sc->n_layers, sc->n_experts,
                    which == ESFT_SCORE_GATE ? "gate" : "token");
    if (cfg) fprintf(stderr, "%s%d experts selected in %d layers", sc ? ", " : "", esft_expert_config_count(cfg),
                     cfg->n_layers);
    fprintf(stderr, " -> %s\n", out);
}

static int cmd_heatmap(const char *name, int argc, char **argv)
{
    const char *in = NULL, *out = NULL, *config = NULL, *v;
    int i, r, kind, experts = 0, have_sc = 0, have_cfg = 0, quiet = 0;
    esft_score which = ESFT_SCORE_TOKEN;
    esft_scores sc;
    esft_expert_config cfg;
    esft_error err;
    esft_status s = ESFT_OK;
    char *text;
    size_t size = 0;
    for (i = 1; i < argc; i++) {
        if ((r = cli_text(name, argc, argv, &i, "-o", "--output", &out)) ||
            (r = cli_text(name, argc, argv, &i, "--config", NULL, &config)) ||
            (r = cli_int_option(name, argc, argv, &i, "--experts", &experts))) {
            if (r < 0) return EXIT_USAGE;
        } else if ((r = cli_text(name, argc, argv, &i, "--score", NULL, &v))) {
            if (r < 0 || cli_score(name, v, &which)) return EXIT_USAGE;
        } else if (cli_flag(argc, argv, &i, "-q", "--quiet")) {
            quiet = 1;
        } else if (cli_positional(name, argv[i], &in, "input file")) {
            return EXIT_USAGE;
        }
    }
    if (!in) return cli_missing(name, "the summary.json or expert config to draw");
    if (!out) return cli_missing(name, "-o MAP.svg");
    if ((r = cli_check_files(name, out, in, config, NULL)) != EXIT_OK) return r;
    memset(&err, 0, sizeof err);
    if ((s = esft_file_read(in, 0, NULL, &text, &size, &err)) != ESFT_OK) return cli_fail(name, s, &err);
    kind = cli_json_kind(text, size, in, &err);
    if (kind == 0) s = err.status ? err.status : ESFT_ERR_PARSE;
    else if (kind == 2 && config) {
        esft_file_free(text, NULL);
        return cli_usage(name, "--config outlines a selection on scores, but '%s' is already a config%s", in, "");
    } else if (kind == 1) {
        s = esft_scores_parse_json(text, size, in, &sc, &err);
        have_sc = s == ESFT_OK;
        if (s == ESFT_OK && config) {
            s = esft_expert_config_read(config, &cfg, &err);
            have_cfg = s == ESFT_OK;
        }
    } else {
        s = esft_expert_config_parse(text, size, in, &cfg, &err);
        have_cfg = s == ESFT_OK;
        if (s == ESFT_OK && experts > 0) cfg.n_experts = experts;
    }
    esft_file_free(text, NULL);
    if (s == ESFT_OK) {
        s = esft_heatmap_write_svg(out, have_sc ? &sc : NULL, which, have_cfg ? &cfg : NULL, &err);
        /* a config that does not fit the scores is the config's fault, not the output's */
        if ((s == ESFT_ERR_RANGE || s == ESFT_ERR_SHAPE) && config) snprintf(err.file, sizeof err.file, "%s", config);
        if (s == ESFT_OK && !quiet) cli_heatmap_summary(have_sc ? &sc : NULL, which, have_cfg ? &cfg : NULL, out);
    }
    if (have_sc) esft_scores_free(&sc);
    if (have_cfg) esft_expert_config_free(&cfg);
    return s == ESFT_OK ? EXIT_OK : cli_fail(name, s, &err);
}

/* ---- esft inspect / extract / merge (checkpoints) ---------------------- */

/* "1.5 GB", "12.0 MB", "512 B" */
static const char *cli_bytes(uint64_t n, char *buf, size_t cap)
{
    static const char *unit[] = {"B", "KB", "MB", "GB", "TB"};
    double v = (double)n;
    int u = 0;
    while (v >= 1000.0 && u < 4) { v /= 1000.0; u++; }
    if (u == 0) snprintf(buf, cap, "%llu B", (unsigned long long)n);
    else snprintf(buf, cap, "%.1f %s", v, unit[u]);
    return buf;
}

/* Progress on stderr for long copies: a line every 10 %, only above 64 MB. */
typedef struct cli_progress {
    const char *cmd;
    int last; /* last tenth printed */
} cli_progress;

static void cli_progress_cb(void *user, uint64_t done, uint64_t total)
{
    cli_progress *p = (cli_progress *)user;
    int tenth = total ? (int)(done * 10 / total) : 10;
    char a[32], b[32];
    if (total < ((uint64_t)64 << 20) || tenth <= p->last) return;
    p->last = tenth;
    fprintf(stderr, "esft %s: %3d%% (%s of %s)\n", p->cmd, tenth * 10, cli_bytes(done, a, sizeof a),
            cli_bytes(total, b, sizeof b));
}

/* Checkpoint options that report progress into *pr, unless quiet. */
static esft_checkpoint_options cli_progress_options(cli_progress *pr, const char *cmd, int quiet)
{
    esft_checkpoint_options opt;
    memset(&opt, 0, sizeof opt);
    pr->cmd = cmd;
    pr->last = 0;
    if (!quiet) { opt.progress = cli_progress_cb; opt.user = pr; }
    return opt;
}

typedef struct cli_moe_key {
    int layer, expert;
} cli_moe_key;

static int cli_cmp_key(const void *pa, const void *pb)
{
    const cli_moe_key *a = (const cli_moe_key *)pa, *b = (const cli_moe_key *)pb;
    if (a->layer != b->layer) return a->layer < b->layer ? -1 : 1;
    return a->expert < b->expert ? -1 : a->expert > b->expert;
}

/* Per layer: which routed experts (or adapters) have tensors, as ranges. */
static void cli_print_experts(const esft_checkpoint *ck)
{
    cli_moe_key *k;
    int i, n = 0, shared = 0, routers = 0, fused = 0, fam[ESFT_FAMILY_COUNT] = {0};
    size_t cap = (size_t)ck->n_tensors + 1;
    for (i = 0; i < ck->n_tensors; i++) { /* a fused tensor holds E experts */
        const esft_st_tensor *t = ck->shards[ck->name_shard[i]].tensors + ck->name_tensor[i];
        esft_tensor_name tn;
        if (esft_tensor_name_parse(ck->names[i], &tn) && tn.part == ESFT_PART_FUSED_DOWN && t->n_dims == 3)
            cap += (size_t)t->shape[0];
    }
    if (!(k = (cli_moe_key *)malloc(cap * sizeof *k))) return;
    for (i = 0; i < ck->n_tensors; i++) {
        const esft_st_tensor *t = ck->shards[ck->name_shard[i]].tensors + ck->name_tensor[i];
        esft_tensor_name tn;
        if (!esft_tensor_name_parse(ck->names[i], &tn)) continue;
        fam[tn.family]++;
        if (tn.part == ESFT_PART_ROUTER) routers++;
        else if (tn.part == ESFT_PART_SHARED_DOWN) shared++; /* one per layer */
        if (tn.part == ESFT_PART_FUSED_DOWN && t->n_dims == 3) { /* one per layer */
            int64_t e;
            fused++;
            for (e = 0; e < t->shape[0]; e++) { k[n].layer = tn.layer; k[n].expert = (int)e; n++; }
        }
        if (tn.expert >= 0) { k[n].layer = tn.layer; k[n].expert = tn.expert; n++; }
    }
    qsort(k, (size_t)n, sizeof *k, cli_cmp_key);
    printf("MoE tensors:");
    for (i = 0; i < (int)ESFT_FAMILY_COUNT; i++)
        if (fam[i]) printf(" %d %s", fam[i], esft_family_name((esft_family)i));
    printf("%s; %d routers; shared experts in %d layers\n", n || routers ? "" : " none", routers, shared);
    if (fused)
        printf("expert layout: fused 3-D (mlp.experts.gate_up_proj (E, 2F, D), down_proj (E, D, F)) in %d layers;\n"
               "  extract writes each selected expert as its own gate/up/down tensors, merge puts them back in their slices\n",
               fused);
    for (i = 0; i < n;) { /* one line per layer: expert id ranges */
        int layer = k[i].layer, count = 0, start = -1, prev = -2;
        printf("  layer %d experts:", layer);
        for (; i < n && k[i].layer == layer; i++) {
            if (k[i].expert == prev) continue; /* same expert, another part */
            if (k[i].expert != prev + 1) {
                if (start >= 0) printf(start == prev ? " %d" : " %d-%d", start, prev);
                start = k[i].expert;
            }
            prev = k[i].expert;
            count++;
        }
        printf(start == prev ? " %d" : " %d-%d", start, prev);
        printf(" (%d)\n", count);
    }
    free(k);
}

static const char inspect_help[] =
    "usage: esft inspect FILE|DIR [--summary]\n"
    "\n"
    "Validates a safetensors checkpoint and describes it: every tensor (name,\n"
    "dtype, shape, bytes, shard), the metadata, the MoE tensors it holds by\n"
    "family (DeepSeek-V2, Mixtral, Qwen-MoE, Camelidae) and, per layer, which\n"
    "experts have tensors; an ESFT expert config in the metadata is shown too.\n"
    "\n"
    "  FILE|DIR        a .safetensors file, a directory with\n"
    "                  model.safetensors.index.json (shards) or model.safetensors,\n"
    "                  or an .index.json file\n"
    "  -s, --summary   no tensor list, only the totals and the expert map\n"
    "\n"
    "A malformed file is an error (exit 1) naming the file and the byte offset.\n";

static int cli_print_architecture(const char *dir);

/* Prints up to max bytes of s (a name or value from a file) to stdout, with
   terminal control characters escaped: bytes below 0x20, DEL and the C1
   controls U+0080..U+009F (UTF-8 C2 80..C2 9F) as \xNN / \u00NN, and '\'
   as "\\" so an escape in the output is always ours. A hostile tensor name
   could otherwise move the cursor, clear the screen or set the window title.
   Pads with spaces to width columns; returns the columns written. */
static int cli_put_escaped(const char *s, size_t max, int width)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i;
    int cols = 0;
    for (i = 0; i < max && u[i]; i++) {
        if (u[i] < 0x20 || u[i] == 0x7f) cols += printf("\\x%02x", u[i]);
        else if (u[i] == '\\') cols += printf("\\\\");
        else if (u[i] == 0xc2 && i + 1 < max && u[i + 1] >= 0x80 && u[i + 1] <= 0x9f) {
            cols += printf("\\u%04x", u[i + 1]);
            i++;
        } else {
            putchar(u[i]);
            cols += (u[i] & 0xc0) != 0x80; /* a column per character, not per byte */
        }
    }
    for (; cols < width; cols++) putchar(' ');
    return cols;
}

static int cmd_inspect(const char *name, int argc, char **argv)
{
    const char *in = NULL;
    int i, s, summary = 0;
    esft_checkpoint ck;
    esft_error err;
    esft_status st;
    char b1[32];
    uint64_t by_dtype[ESFT_DTYPE_COUNT] = {0};
    memset(&err, 0, sizeof err);
    for (i = 1; i < argc; i++) {
        if (cli_flag(argc, argv, &i, "-s", "--summary")) summary = 1;
        else if (cli_positional(name, argv[i], &in, "checkpoint")) return EXIT_USAGE;
    }
    if (!in) return cli_missing(name, "the FILE or DIR to inspect");
    st = esft_checkpoint_open(&ck, in, NULL, &err);
    if (st != ESFT_OK) return cli_fail(name, st, &err);
    cli_print_architecture(in);
    printf("%s: %s, %d tensor%s, %s of tensor data\n", in,
           ck.sharded ? "sharded checkpoint (model.safetensors.index.json)" : "safetensors file", ck.n_tensors,
           ck.n_tensors == 1 ? "" : "s", cli_bytes(ck.total_bytes, b1, sizeof b1));
    for (s = 0; s < ck.n_shards; s++) {
        const esft_safetensors *sh = ck.shards + s;
        printf("shard ");
        cli_put_escaped(ck.shard_files[s], (size_t)-1, 0);
        printf(": %d tensors, %s\n", sh->n_tensors, cli_bytes(sh->file_size, b1, sizeof b1));
        for (i = 0; i < sh->n_metadata; i++) {
            const char *val = sh->meta_values[i];
            printf("  metadata ");
            cli_put_escaped(sh->meta_keys[i], (size_t)-1, 0);
            printf(" = ");
            cli_put_escaped(val, 100, 0);
            printf("%s\n", strlen(val) > 100 ? "..." : "");
        }
        for (i = 0; i < sh->n_tensors; i++) by_dtype[sh->tensors[i].dtype] += sh->tensors[i].n_bytes;
    }
    if (!summary) {
        printf("%-64s %-7s %-18s %12s  %s\n", "name", "dtype", "shape", "bytes", "shard");
        for (i = 0; i < ck.n_tensors; i++) {
            const esft_st_tensor *t = ck.shards[ck.name_shard[i]].tensors + ck.name_tensor[i];
            char shape[96];
            int d, n = 0;
            n += snprintf(shape, sizeof shape, "[");
            for (d = 0; d < t->n_dims && n < (int)sizeof shape; d++)
                n += snprintf(shape + n, sizeof shape - (size_t)n, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
            if (n < (int)sizeof shape) snprintf(shape + n, sizeof shape - (size_t)n, "]");
            cli_put_escaped(t->name, (size_t)-1, 64);
            printf(" %-7s %-18s %12llu  %d\n", esft_dtype_name(t->dtype), shape, (unsigned long long)t->n_bytes,
                   ck.name_shard[i]);
        }
    }
    printf("bytes by dtype:");
    for (i = 0; i < (int)ESFT_DTYPE_COUNT; i++)
        if (by_dtype[i]) printf(" %s %s", esft_dtype_name((esft_dtype)i), cli_bytes(by_dtype[i], b1, sizeof b1));
    printf("\n");
    cli_print_experts(&ck);
    if (ck.n_shards == 1) {
        esft_expert_config cfg;
        if (esft_checkpoint_read_config(ck.shards, &cfg, NULL) == ESFT_OK) {
            printf("expert config in metadata: %d experts, shared_experts %s, non_expert_modules %s\n",
                   esft_expert_config_count(&cfg), cfg.shared_experts ? "true" : "false",
                   cfg.non_expert_modules ? "true" : "false");
            esft_expert_config_free(&cfg);
        }
    }
    esft_checkpoint_close(&ck);
    return EXIT_OK;
}

static const char extract_help[] =
    "usage: esft extract BASE --config CONFIG.json -o EXPERTS.safetensors [-q]\n"
    "\n"
    "Copies the tensors an ESFT expert config trains out of a base checkpoint into\n"
    "one small safetensors file (dtypes and bytes unchanged; the config goes into\n"
    "its __metadata__): the routed experts it lists (config layers are the\n"
    "model's layer indices), the shared experts of every layer if\n"
    "\"shared_experts\" is true, every other tensor if \"non_expert_modules\" is.\n"
    "From a base with fused 3-D experts (transformers v5), each selected expert\n"
    "is written as its own gate_proj / up_proj / down_proj tensors.\n"
    "\n"
    "  BASE              checkpoint directory (sharded or not) or .safetensors file\n"
    "  --config FILE     the expert config (esft select writes one)\n"
    "  -o, --output FILE the experts file to write (atomically)\n"
    "  -q, --quiet       no progress or summary on stderr\n"
    "\n"
    "An expert the config names but the checkpoint lacks is an error (exit 1).\n";

static int cmd_extract(const char *name, int argc, char **argv)
{
    const char *base = NULL, *config = NULL, *out = NULL;
    int i, r, quiet = 0;
    esft_expert_config cfg;
    esft_checkpoint_options opt;
    cli_progress pr;
    esft_safetensors st;
    esft_error err;
    esft_status s;
    char b1[32];
    memset(&err, 0, sizeof err);
    for (i = 1; i < argc; i++) {
        if ((r = cli_text(name, argc, argv, &i, "--config", NULL, &config)) ||
            (r = cli_text(name, argc, argv, &i, "-o", "--output", &out))) {
            if (r < 0) return EXIT_USAGE;
        } else if (cli_flag(argc, argv, &i, "-q", "--quiet")) {
            quiet = 1;
        } else if (cli_positional(name, argv[i], &base, "base checkpoint")) {
            return EXIT_USAGE;
        }
    }
    if (!base) return cli_missing(name, "the BASE checkpoint");
    if (!config) return cli_missing(name, "--config CONFIG.json");
    if (!out) return cli_missing(name, "-o EXPERTS.safetensors");
    {
        cli_inputs in;
        int ok;
        memset(&in, 0, sizeof in);
        ok = cli_inputs_add_checkpoint(&in, base) && cli_inputs_add(&in, config);
        if ((r = cli_check_done(name, &in, ok, out)) != EXIT_OK) return r;
    }
    s = esft_expert_config_read(config, &cfg, &err);
    if (s != ESFT_OK) return cli_fail(name, s, &err);
    opt = cli_progress_options(&pr, name, quiet);
    s = esft_checkpoint_extract(base, &cfg, out, &opt, &err);
    if (s == ESFT_OK && !quiet && esft_safetensors_open(&st, out, NULL, NULL) == ESFT_OK) {
        fprintf(stderr, "esft extract: %d tensors of %d experts, %s -> %s\n", st.n_tensors,
                esft_expert_config_count(&cfg), cli_bytes(st.file_size, b1, sizeof b1), out);
        esft_safetensors_close(&st);
    }
    esft_expert_config_free(&cfg);
    return s == ESFT_OK ? EXIT_OK : cli_fail(name, s, &err);
}

static const char merge_help[] =
    "usage: esft merge BASE TRAINED -o OUTDIR [-q]\n"
    "\n"
    "Puts the tensors of TRAINED (a safetensors file, e.g. saved trained experts)\n"
    "into the base checkpoint and writes the result to OUTDIR: every shard under\n"
    "its own name plus, for a sharded base, model.safetensors.index.json. Copies\n"
    "stream in chunks of a few MB whatever the model size. Every TRAINED tensor\n"
    "must exist in BASE with the same dtype and shape, checked before anything is\n"
    "written; shards are written as temp files and renamed only when all succeed,\n"
    "the renames recorded in OUTDIR/esft_merge.json (an interrupted merge is then\n"
    "reported by inspect; merge again to repair it). OUTDIR may not hold another\n"
    "checkpoint; a previous merge of the same BASE is replaced. The index is the\n"
    "base's (metadata kept). A base with fused 3-D experts (mlp.experts.gate_up_proj\n"
    "/ down_proj) takes per-expert tensors (mlp.experts.{e}.gate_proj.weight, ...)\n"
    "into their slices; no other byte changes. Copy config.json and the tokenizer\n"
    "files yourself.\n"
    "\n"
    "  BASE              checkpoint directory (sharded or not) or .safetensors file\n"
    "  TRAINED           safetensors file of replacement tensors\n"
    "  -o, --output DIR  the new checkpoint's directory (created; not BASE's; no\n"
    "                    other checkpoint in it)\n"
    "  -q, --quiet       no progress or summary on stderr\n";

/* Every file merge writes (OUTDIR/<shard>, the index) against BASE's files and
   TRAINED: a shard of OUTDIR may be a link to the base's. */
static int cli_check_merge(const char *cmd, const char *base, const char *trained, const char *out_dir)
{
    cli_inputs in;
    esft_checkpoint ck;
    char path[4200];
    int ok, s, r = EXIT_OK;
    memset(&in, 0, sizeof in);
    ok = cli_inputs_add_checkpoint(&in, base) && cli_inputs_add(&in, trained);
    if (!ok) return cli_check_done(cmd, &in, ok, out_dir);
    if (esft_checkpoint_open(&ck, base, NULL, NULL) == ESFT_OK) {
        for (s = 0; r == EXIT_OK && s <= ck.n_shards; s++) {
            snprintf(path, sizeof path, "%s/%s", out_dir, s < ck.n_shards ? ck.shard_files[s] : "model.safetensors.index.json");
            r = cli_check_output(cmd, &in, path);
        }
        esft_checkpoint_close(&ck);
    }
    cli_inputs_free(&in);
    return r;
}

static int cmd_merge(const char *name, int argc, char **argv)
{
    const char *base = NULL, *trained = NULL, *out = NULL;
    int i, r, quiet = 0;
    esft_checkpoint_options opt;
    cli_progress pr;
    esft_safetensors st;
    esft_error err;
    esft_status s;
    memset(&err, 0, sizeof err);
    for (i = 1; i < argc; i++) {
        if ((r = cli_text(name, argc, argv, &i, "-o", "--output", &out))) {
            if (r < 0) return EXIT_USAGE;
        } else if (cli_flag(argc, argv, &i, "-q", "--quiet")) {
            quiet = 1;
        } else if (argv[i][0] == '-' && argv[i][1]) {
            return cli_usage(name, "unknown option '%s'%s", argv[i], "");
        } else if (!base) {
            base = argv[i];
        } else if (cli_positional(name, argv[i], &trained, "trained file")) {
            return EXIT_USAGE;
        }
    }
    if (!base || !trained) return cli_usage(name, "give BASE and TRAINED%s%s", "", "");
    if (!out) return cli_missing(name, "-o OUTDIR");
    if ((r = cli_check_merge(name, base, trained, out)) != EXIT_OK) return r;
    opt = cli_progress_options(&pr, name, quiet);
    s = esft_checkpoint_merge(base, trained, out, &opt, &err);
    if (s == ESFT_OK && !quiet && esft_safetensors_open(&st, trained, NULL, NULL) == ESFT_OK) {
        fprintf(stderr, "esft merge: %d tensors of %s put into %s -> %s\n", st.n_tensors, trained, base, out);
        esft_safetensors_close(&st);
    }
    return s == ESFT_OK ? EXIT_OK : cli_fail(name, s, &err);
}

/* ---- models: esft eval, esft stats MODEL_DIR --data ------------------------ */

#include <time.h>
#include <sys/resource.h>

/* Peak resident memory of this process so far (bytes; 0 if unknown): the
   summaries report it so a user sees what a model costs. Linux: VmHWM of
   /proc/self/status, which starts afresh at exec (getrusage's ru_maxrss keeps
   the parent's peak across fork + exec); elsewhere getrusage (KB on Linux/BSD). */
static uint64_t cli_peak_rss(void)
{
    struct rusage ru;
    char line[256];
    unsigned long long kb = 0;
    FILE *f = fopen("/proc/self/status", "r");
    if (f) {
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "VmHWM: %llu kB", &kb) == 1) break;
        fclose(f);
        if (kb) return (uint64_t)kb * 1024u;
    }
    if (getrusage(RUSAGE_SELF, &ru) != 0 || ru.ru_maxrss <= 0) return 0;
    return (uint64_t)ru.ru_maxrss * 1024u;
}

static double cli_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Progress with an ETA on stderr: nothing for the first 3 s, then a line at
   most every 5 s (long runs only; quiet turns it off). */
typedef struct cli_eta {
    const char *cmd;
    double start, last;
    int quiet;
} cli_eta;

static void cli_eta_begin(cli_eta *e, const char *cmd, int quiet)
{
    e->cmd = cmd;
    e->start = e->last = cli_now();
    e->quiet = quiet;
}

static void cli_eta_tick(cli_eta *e, long long done, long long total, const char *unit)
{
    double now = cli_now(), rate;
    if (e->quiet || now - e->start < 3.0 || now - e->last < 5.0 || done <= 0) return;
    e->last = now;
    rate = done / (now - e->start);
    fprintf(stderr, "esft %s: %lld of %lld %s, %.0f %s/s, about %.0f s left\n", e->cmd, done, total, unit, rate, unit,
            (double)(total - done) / rate);
}

/* 1 if argv holds the option (as "--x" or "--x=..."). */
static int cli_has_option(int argc, char **argv, const char *flag)
{
    int i;
    size_t n = strlen(flag);
    for (i = 1; i < argc; i++)
        if (strncmp(argv[i], flag, n) == 0 && (argv[i][n] == 0 || argv[i][n] == '=')) return 1;
    return 0;
}

/* ESFT scores and trains routed experts, which a dense model (llama, mistral,
   qwen2) does not have. Reads only config.json, so the refusal comes before
   the weights load; a config that does not read is left to the open after. */
static int cli_require_moe(const char *cmd, const char *dir, const char *what)
{
    char path[4200];
    esft_model_config c;
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (esft_model_config_read(&c, path, NULL) != ESFT_OK || esft_model_config_moe_layers(&c) > 0) return EXIT_OK;
    fprintf(stderr, "esft %s: %s: the model has no MoE layer (%s, %d dense layers): no router, so no expert to %s\n",
            cmd, dir, esft_model_family_name(c.family), c.n_layers, what);
    return EXIT_RUNTIME;
}

/* Opens MODEL_DIR and reads the data; prints what failed. */
static int cli_open_model(const char *cmd, const char *dir, const char *data, int max_samples, esft_model *m,
                          esft_dataset *ds, int quiet)
{
    esft_error err;
    esft_status s;
    double t0 = cli_now();
    char b1[32];
    memset(&err, 0, sizeof err);
    s = esft_model_open(m, dir, NULL, &err);
    if (s != ESFT_OK) return cli_fail(cmd, s, &err);
    if (!quiet)
        fprintf(stderr, "esft %s: %s: %s, %d layers (%d MoE), %s of weights, opened in %.1f s\n", cmd, dir,
                esft_model_family_name(m->cfg.family), m->cfg.n_layers, esft_model_config_moe_layers(&m->cfg),
                cli_bytes(m->weight_bytes, b1, sizeof b1), cli_now() - t0);
    s = esft_dataset_read_jsonl(ds, data, max_samples, m->cfg.vocab, NULL, &err);
    if (s != ESFT_OK) {
        esft_model_close(m);
        return cli_fail(cmd, s, &err);
    }
    return EXIT_OK;
}

static const char eval_help[] =
    "usage: esft eval MODEL_DIR --data FILE.jsonl [--trained FILE | --adapter DIR] [--logits OUT.npy]\n"
    "                 [--max-samples N] [-q]\n"
    "\n"
    "Runs a Hugging Face checkpoint (config.json + safetensors; MoE families\n"
    "deepseek_v2, deepseek_v3, qwen2_moe, qwen3_moe, olmoe, mixtral; dense llama,\n"
    "mistral, qwen2) over the samples of FILE.jsonl and prints, on stdout:\n"
    "  loss <mean cross-entropy in nats> tokens <scored targets>\n"
    "the mean over every scored target of every sample (position t predicts\n"
    "labels[t+1]; labels of -100 are not scored), as transformers computes it.\n"
    "\n"
    "  --data FILE        one sample a line: {\"input_ids\": [...], \"labels\": [...]}\n"
    "                     (labels optional: then every token is scored)\n"
    "  --trained FILE     with what `esft train` wrote (esft or fft) in place of the\n"
    "                     checkpoint's tensors, unmerged (exactly the run's fp32 values)\n"
    "  --adapter DIR      with a LoRA adapter directory (PEFT's layout) on the model\n"
    "  --logits OUT.npy   every position's logits, float32, shape (positions, vocab),\n"
    "                     samples concatenated in file order\n"
    "  --max-samples N    only the first N samples\n"
    "  -q, --quiet        no progress on stderr\n";

static int cmd_eval(const char *name, int argc, char **argv)
{
    const char *dir = NULL, *data = NULL, *logits_path = NULL, *trained = NULL, *adapter = NULL;
    int i, r, max_samples = 0, quiet = 0, sidx, have_tr = 0;
    esft_model m;
    esft_model_trainable tr;
    esft_dataset ds;
    esft_npy_writer npy;
    esft_error err;
    esft_status s = ESFT_OK;
    float *logits = NULL;
    double loss = 0.0;
    long long scored = 0, max_len = 0;
    cli_eta eta;
    memset(&err, 0, sizeof err);
    for (i = 1; i < argc; i++) {
        if ((r = cli_text(name, argc, argv, &i, "--data", NULL, &data)) ||
            (r = cli_text(name, argc, argv, &i, "--logits", NULL, &logits_path)) ||
            (r = cli_text(name, argc, argv, &i, "--trained", NULL, &trained)) ||
            (r = cli_text(name, argc, argv, &i, "--adapter", NULL, &adapter)) ||
            (r = cli_int_option(name, argc, argv, &i, "--max-samples", &max_samples))) {
            if (r < 0) return EXIT_USAGE;
        } else if (cli_flag(argc, argv, &i, "-q", "--quiet")) {
            quiet = 1;
        } else if (cli_positional(name, argv[i], &dir, "model directory")) {
            return EXIT_USAGE;
        }
    }
    if (!dir) return cli_missing(name, "the MODEL_DIR");
    if (!data) return cli_missing(name, "--data FILE.jsonl");
    if (max_samples < 0) return cli_usage(name, "--max-samples must be >= 1%s%s", "", "");
    if (trained && adapter) return cli_usage(name, "give --trained or --adapter, not both%s%s", "", "");
    if (logits_path && (r = cli_check_model(name, logits_path, dir, data)) != EXIT_OK) return r;
    if ((r = cli_open_model(name, dir, data, max_samples, &m, &ds, quiet)) != EXIT_OK) return r;
    if (trained || adapter) {
        s = trained ? esft_model_trainable_open(&tr, &m, trained, &err) : esft_model_lora_open(&tr, &m, adapter, &err);
        have_tr = s == ESFT_OK;
    }
    for (sidx = 0; sidx < ds.n_samples; sidx++) {
        long long n = ds.offset[sidx + 1] - ds.offset[sidx];
        if (n > max_len) max_len = n;
    }
    if (s == ESFT_OK && logits_path) {
        logits = (float *)malloc((size_t)max_len * (size_t)m.cfg.vocab * sizeof(float));
        if (!logits) s = ESFT_ERR_OUT_OF_MEMORY;
        else s = esft_npy_open(&npy, logits_path, ds.offset[ds.n_samples], m.cfg.vocab, &err);
    }
    cli_eta_begin(&eta, name, quiet);
    for (sidx = 0; s == ESFT_OK && sidx < ds.n_samples; sidx++) {
        esft_model_run run;
        double ls = 0.0;
        int64_t ns = 0;
        int T = (int)(ds.offset[sidx + 1] - ds.offset[sidx]);
        memset(&run, 0, sizeof run);
        run.labels = ds.labels + ds.offset[sidx];
        run.logits = logits;
        run.trainable = have_tr ? &tr : NULL;
        s = esft_model_forward(&m, ds.ids + ds.offset[sidx], T, &run, &ls, &ns, &err);
        if (s == ESFT_OK && logits) s = esft_npy_append(&npy, logits, T, &err);
        loss += ls;
        scored += ns;
        cli_eta_tick(&eta, ds.offset[sidx + 1], ds.offset[ds.n_samples], "tokens");
    }
    if (s == ESFT_OK && logits) s = esft_npy_commit(&npy, &err);
    else if (logits_path && logits) esft_npy_abort(&npy);
    free(logits);
    if (s == ESFT_OK) {
        printf("loss %.9g tokens %lld\n", scored ? loss / (double)scored : 0.0, scored);
        if (!quiet)
        {
            char mem[32];
            fprintf(stderr, "esft eval: %d samples, %lld tokens in %.1f s (%.0f tokens/s), peak memory %s%s%s\n",
                    ds.n_samples, (long long)ds.offset[ds.n_samples], cli_now() - eta.start,
                    ds.offset[ds.n_samples] / (cli_now() - eta.start), cli_bytes(cli_peak_rss(), mem, sizeof mem),
                    logits_path ? "; logits -> " : "", logits_path ? logits_path : "");
        }
    }
    if (have_tr) esft_model_trainable_uninit(&tr);
    esft_dataset_free(&ds);
    esft_model_close(&m);
    return s == ESFT_OK ? EXIT_OK : cli_fail(name, s, &err);
}


static int cmd_stats_model(const char *name, int argc, char **argv)
{
    const char *dir = NULL, *data = NULL, *out = NULL, *v;
    int i, r, max_samples = 0, quiet = 0, decimals = 4, labelled = 0, sidx;
    esft_norm norm = ESFT_NORM_POOLED;
    esft_model m;
    esft_dataset ds;
    esft_stats st;
    esft_scores sc;
    esft_error err;
    esft_status s;
    unsigned char *mask = NULL;
    cli_eta eta;
    memset(&err, 0, sizeof err);
    for (i = 1; i < argc; i++) {
        if ((r = cli_text(name, argc, argv, &i, "--data", NULL, &data)) ||
            (r = cli_text(name, argc, argv, &i, "-o", "--output", &out)) ||
            (r = cli_int_option(name, argc, argv, &i, "--max-samples", &max_samples)) ||
            (r = cli_int_option(name, argc, argv, &i, "--decimals", &decimals))) {
            if (r < 0) return EXIT_USAGE;
        } else if ((r = cli_text(name, argc, argv, &i, "--tokens", NULL, &v))) {
            if (r < 0) return EXIT_USAGE;
            if (strcmp(v, "all") == 0) labelled = 0;
            else if (strcmp(v, "labelled") == 0 || strcmp(v, "labeled") == 0) labelled = 1;
            else return cli_usage(name, "--tokens expects all or labelled, got '%s'%s", v, "");
        } else if ((r = cli_text(name, argc, argv, &i, "--norm", NULL, &v))) {
            if (r < 0) return EXIT_USAGE;
            if (strcmp(v, "pooled") == 0) norm = ESFT_NORM_POOLED;
            else if (strcmp(v, "per-sample") == 0) norm = ESFT_NORM_PER_SAMPLE;
            else return cli_usage(name, "--norm expects pooled or per-sample, got '%s'%s", v, "");
        } else if (cli_flag(argc, argv, &i, "-q", "--quiet")) {
            quiet = 1;
        } else if (cli_positional(name, argv[i], &dir, "model directory")) {
            return EXIT_USAGE;
        }
    }
    if (!dir) return cli_missing(name, "the MODEL_DIR");
    if (!data) return cli_missing(name, "--data FILE.jsonl");
    if (!out) return cli_missing(name, "-o SUMMARY.json");
    if (decimals < -1 || decimals > 17) return cli_usage(name, "--decimals must be -1..17%s%s", "", "");
    if (max_samples < 0) return cli_usage(name, "--max-samples must be >= 1%s%s", "", "");
    if ((r = cli_check_model(name, out, dir, data)) != EXIT_OK) return r;
    if ((r = cli_require_moe(name, dir, "score")) != EXIT_OK) return r;
    if ((r = cli_open_model(name, dir, data, max_samples, &m, &ds, quiet)) != EXIT_OK) return r;
    s = esft_stats_init(&st, m.cfg.n_layers, m.cfg.route.n_experts, m.cfg.route.top_k, NULL);
    if (s == ESFT_OK && labelled) {
        mask = (unsigned char *)malloc((size_t)ds.offset[ds.n_samples] + 1);
        if (!mask) s = ESFT_ERR_OUT_OF_MEMORY;
        else
            for (i = 0; i < (int)ds.offset[ds.n_samples]; i++) mask[i] = ds.labels[i] != -100;
    }
    cli_eta_begin(&eta, name, quiet);
    for (sidx = 0; s == ESFT_OK && sidx < ds.n_samples; sidx++) {
        esft_model_run run;
        memset(&run, 0, sizeof run);
        run.stats = &st;
        run.stats_mask = mask ? mask + ds.offset[sidx] : NULL;
        s = esft_model_forward(&m, ds.ids + ds.offset[sidx], (int)(ds.offset[sidx + 1] - ds.offset[sidx]), &run, NULL,
                               NULL, &err);
        cli_eta_tick(&eta, ds.offset[sidx + 1], ds.offset[ds.n_samples], "tokens");
    }
    if (s == ESFT_OK && (s = esft_stats_scores(&st, norm, &sc)) == ESFT_OK) {
        s = esft_scores_write_json(out, &sc, decimals, &err);
        esft_scores_free(&sc);
    }
    if (s == ESFT_OK && !quiet)
    {
        char mem[32];
        fprintf(stderr, "esft stats: %d samples, %lld tokens (%s counted) through %d MoE layers in %.1f s, peak memory %s; %s scores -> %s\n",
                ds.n_samples, (long long)ds.offset[ds.n_samples], labelled ? "labelled" : "all",
                esft_model_config_moe_layers(&m.cfg), cli_now() - eta.start, cli_bytes(cli_peak_rss(), mem, sizeof mem),
                norm == ESFT_NORM_POOLED ? "pooled" : "per-sample", out);
    }
    free(mask);
    esft_stats_uninit(&st);
    esft_dataset_free(&ds);
    esft_model_close(&m);
    return s == ESFT_OK ? EXIT_OK : cli_fail(name, s, &err);
}

/* ---- esft train -------------------------------------------------------- */

static const char train_help[] =
    "usage: esft train MODEL_DIR --data TRAIN.jsonl --method esft|fft|lora|pesc --steps N\n"
    "                  --batch-tokens B -o OUT [options]\n"
    "\n"
    "Fine-tunes a Hugging Face checkpoint with one of the methods of ESFT's comparison:\n"
    "  esft  the routed experts an ESFT expert config lists (+ its shared_experts /\n"
    "        non_expert_modules flags); OUT.safetensors holds only those tensors,\n"
    "        under the checkpoint's own names with the config in its metadata\n"
    "  fft   every parameter; OUT.safetensors holds them all\n"
    "  lora  rank-r adapters on the attention projections (and/or dense MLPs), base\n"
    "        frozen; OUT is a directory in PEFT's layout (adapter_model.safetensors,\n"
    "        adapter_config.json) that peft.PeftModel.from_pretrained loads\n"
    "  pesc  Camelidae: an adapter MoE after each frozen dense MLP (router + rank-r\n"
    "        adapters train, upcycled so step 0 is the base); OUT.safetensors holds\n"
    "        them under Camelidae's names, the adapter config in the metadata\n"
    "`esft merge MODEL_DIR OUT.safetensors -o DIR` puts an esft/fft result back into\n"
    "a full checkpoint (pesc: `esft eval MODEL_DIR --trained OUT` runs base + adapters).\n"
    "Each step packs whole samples, in a seeded shuffled order,\n"
    "until the batch holds at least B scored tokens; each sample is one micro-batch\n"
    "whose gradient is accumulated; the batch's mean-loss gradient is clipped to a\n"
    "global norm, then one AdamW step (ESFT's recipe by default).\n"
    "\n"
    "  --method M              esft (default), fft, lora or pesc\n"
    "  --data FILE             training samples, {\"input_ids\": [...], \"labels\": [...]}\n"
    "  --expert-config FILE    esft: ESFT's expert config (esft select writes one)\n"
    "  --lora-rank R           lora: adapter rank (default 8)\n"
    "  --lora-alpha A          lora: scale alpha / R (default alpha = R)\n"
    "  --lora-targets T        lora: a comma list of attn, mlp (dense MLP layers) and\n"
    "                          experts (every routed expert's gate/up/down); default attn\n"
    "  --pesc-experts N        pesc: adapters per layer (default 8)\n"
    "  --pesc-top-k K          pesc: adapters per token (default 2)\n"
    "  --pesc-rank R           pesc: adapter rank (default 512, at most the width)\n"
    "  --pesc-scale S          pesc: adapter output scale (default 0.25)\n"
    "  --pesc-aux A            pesc: auxiliary loss weight (default 0.01)\n"
    "  --steps N               optimizer steps (>= 1)\n"
    "  --batch-tokens B        scored tokens per step, at least (>= 1)\n"
    "  --micro-batch-tokens b  refuse samples longer than b tokens before any step (one\n"
    "                          sample is one forward-backward: b bounds its memory)\n"
    "  -o, --output OUT        the trained tensors (.safetensors; lora: a directory),\n"
    "                          written at the end\n"
    "  --lr LR                 peak learning rate (default 1e-5)\n"
    "  --warmup W              linear warm-up steps (default min(100, N / 10))\n"
    "  --schedule S            constant (default) or cosine (to 0 after the warm-up)\n"
    "  --weight-decay WD       AdamW weight decay (default 0.1; betas 0.9, 0.95)\n"
    "  --clip C                global gradient-norm clip (default 1.0; 0 = off)\n"
    "  --seed S                sample order and LoRA init (default 1); same seed, same bits\n"
    "  --eval-data FILE        held-out samples: mean loss every K steps and at the end\n"
    "  --eval-every K          (default: only at the end)\n"
    "  --log FILE              one JSON object a line per step: step, loss, lr,\n"
    "                          grad_norm, tokens (and eval_loss on eval steps)\n"
    "  --state FILE            save the run's state (trained tensors, AdamW moments,\n"
    "                          step, sample order) every K steps and at the end\n"
    "  --state-every K         (default: only at the end)\n"
    "  --resume FILE           go on from such a state with the same data, options and\n"
    "                          seed: the steps after it as an uninterrupted run's\n"
    "  -q, --quiet             no progress or summary on stderr\n";

typedef struct cli_train_opts {
    const char *dir, *data, *method, *config, *out, *log, *eval_data, *schedule, *state, *resume, *lora_targets;
    int steps, batch_tokens, micro_tokens, warmup, eval_every, state_every, quiet, lora_rank;
    int pesc_experts, pesc_top_k, pesc_rank;
    double lr, weight_decay, clip, lora_alpha, pesc_scale, pesc_aux;
    long long seed;
    esft_train_spec spec; /* the method, filled by cli_train_check_usage */
} cli_train_opts;

/* A number option read with cli_double: 0 not this option; 1 read; -1 usage error. */
static int cli_double_option(const char *cmd, int argc, char **argv, int *i, const char *flag, double *out)
{
    const char *v;
    int r = cli_text(cmd, argc, argv, i, flag, NULL, &v);
    return r > 0 && cli_double(cmd, flag, v, out) != EXIT_OK ? -1 : r;
}

static int cli_train_parse(const char *name, int argc, char **argv, cli_train_opts *o)
{
    esft_adamw_config esft = esft_adamw_config_esft();
    const char *seed = NULL;
    int i, r;
    memset(o, 0, sizeof *o);
    o->method = "esft";
    o->schedule = "constant";
    o->steps = o->batch_tokens = o->micro_tokens = o->warmup = o->eval_every = o->state_every = -1;
    o->lora_rank = o->pesc_experts = o->pesc_top_k = o->pesc_rank = -1;
    o->lora_alpha = o->pesc_scale = o->pesc_aux = -1.0;
    o->lr = esft.lr;
    o->weight_decay = esft.weight_decay;
    o->clip = 1.0;
    o->seed = 1;
    for (i = 1; i < argc; i++) {
        if ((r = cli_text(name, argc, argv, &i, "--data", NULL, &o->data)) ||
            (r = cli_text(name, argc, argv, &i, "--method", NULL, &o->method)) ||
            (r = cli_text(name, argc, argv, &i, "--expert-config", NULL, &o->config)) ||
            (r = cli_text(name, argc, argv, &i, "-o", "--output", &o->out)) ||
            (r = cli_text(name, argc, argv, &i, "--log", NULL, &o->log)) ||
            (r = cli_text(name, argc, argv, &i, "--state", NULL, &o->state)) ||
            (r = cli_text(name, argc, argv, &i, "--resume", NULL, &o->resume)) ||
            (r = cli_int_option(name, argc, argv, &i, "--state-every", &o->state_every)) ||
            (r = cli_text(name, argc, argv, &i, "--eval-data", NULL, &o->eval_data)) ||
            (r = cli_text(name, argc, argv, &i, "--schedule", NULL, &o->schedule)) ||
            (r = cli_text(name, argc, argv, &i, "--seed", NULL, &seed)) ||
            (r = cli_int_option(name, argc, argv, &i, "--steps", &o->steps)) ||
            (r = cli_int_option(name, argc, argv, &i, "--batch-tokens", &o->batch_tokens)) ||
            (r = cli_int_option(name, argc, argv, &i, "--micro-batch-tokens", &o->micro_tokens)) ||
            (r = cli_int_option(name, argc, argv, &i, "--lora-rank", &o->lora_rank)) ||
            (r = cli_double_option(name, argc, argv, &i, "--lora-alpha", &o->lora_alpha)) ||
            (r = cli_text(name, argc, argv, &i, "--lora-targets", NULL, &o->lora_targets)) ||
            (r = cli_int_option(name, argc, argv, &i, "--pesc-experts", &o->pesc_experts)) ||
            (r = cli_int_option(name, argc, argv, &i, "--pesc-top-k", &o->pesc_top_k)) ||
            (r = cli_int_option(name, argc, argv, &i, "--pesc-rank", &o->pesc_rank)) ||
            (r = cli_double_option(name, argc, argv, &i, "--pesc-scale", &o->pesc_scale)) ||
            (r = cli_double_option(name, argc, argv, &i, "--pesc-aux", &o->pesc_aux)) ||
            (r = cli_int_option(name, argc, argv, &i, "--warmup", &o->warmup)) ||
            (r = cli_int_option(name, argc, argv, &i, "--eval-every", &o->eval_every)) ||
            (r = cli_double_option(name, argc, argv, &i, "--lr", &o->lr)) ||
            (r = cli_double_option(name, argc, argv, &i, "--weight-decay", &o->weight_decay)) ||
            (r = cli_double_option(name, argc, argv, &i, "--clip", &o->clip))) {
            if (r < 0) return EXIT_USAGE;
        } else if (cli_flag(argc, argv, &i, "-q", "--quiet")) {
            o->quiet = 1;
        } else if (cli_positional(name, argv[i], &o->dir, "model directory")) {
            return EXIT_USAGE;
        }
    }
    if (seed) {
        char *end;
        o->seed = strtoll(seed, &end, 10);
        if (!*seed || *end || o->seed < 0) return cli_usage(name, "--seed expects an integer >= 0, got '%s'%s", seed, "");
    }
    return EXIT_OK;
}

/* --lora-targets: a comma list of attn, mlp and experts; 0 when malformed (what names the bad word). */
static unsigned cli_lora_targets(const char *list, char *what, size_t cap)
{
    unsigned bits = 0;
    const char *p = list;
    while (*p) {
        size_t n = strcspn(p, ",");
        if (n == 4 && strncmp(p, "attn", 4) == 0) bits |= ESFT_LORA_ATTN;
        else if (n == 3 && strncmp(p, "mlp", 3) == 0) bits |= ESFT_LORA_MLP;
        else if (n == 7 && strncmp(p, "experts", 7) == 0) bits |= ESFT_LORA_EXPERTS;
        else {
            snprintf(what, cap, "%.*s", (int)(n < 60 ? n : 60), p);
            return 0;
        }
        p += n + (p[n] == ',');
    }
    if (!bits) snprintf(what, cap, "(empty)");
    return bits;
}

/* --pesc-*: Camelidae's adapter MoE (8 adapters, top 2, scale 0.25, aux 0.01;
   rank 512, or the model's width when that is smaller, decided at open). */
static int cli_train_check_pesc(const char *name, cli_train_opts *o)
{
    esft_pesc_config *c = &o->spec.pesc;
    *c = esft_pesc_config_camelidae(0);
    if (o->pesc_experts != -1) c->n_experts = o->pesc_experts;
    if (o->pesc_top_k != -1) c->top_k = o->pesc_top_k;
    c->rank = o->pesc_rank; /* -1: the default, set when the model's width is known */
    if (o->pesc_scale != -1.0) c->scale = (float)o->pesc_scale;
    if (o->pesc_aux != -1.0) c->aux_alpha = (float)o->pesc_aux;
    if (c->n_experts < 1 || c->n_experts > 4096 || c->top_k < 1 || c->top_k > c->n_experts)
        return cli_usage(name, "--pesc-experts must be in [1, 4096] and --pesc-top-k in [1, experts]%s%s", "", "");
    if (o->pesc_rank != -1 && (o->pesc_rank < 1 || o->pesc_rank > 65536))
        return cli_usage(name, "--pesc-rank must be in [1, 65536]%s%s", "", "");
    if (!isfinite(c->scale) || !isfinite(c->aux_alpha) || c->aux_alpha < 0.0f)
        return cli_usage(name, "--pesc-scale must be finite and --pesc-aux finite and >= 0%s%s", "", "");
    o->spec.seed = (uint64_t)o->seed;
    return EXIT_OK;
}

/* --method and the options that belong to it into o->spec. */
static int cli_train_check_method(const char *name, cli_train_opts *o)
{
    int esft = strcmp(o->method, "esft") == 0, lora = strcmp(o->method, "lora") == 0;
    int pesc = strcmp(o->method, "pesc") == 0;
    char bad[64];
    memset(&o->spec, 0, sizeof o->spec);
    if (!esft && !lora && !pesc && strcmp(o->method, "fft") != 0)
        return cli_usage(name, "--method expects esft, fft, lora or pesc, got '%s'%s", o->method, "");
    if (!pesc && (o->pesc_experts != -1 || o->pesc_top_k != -1 || o->pesc_rank != -1 || o->pesc_scale != -1.0 ||
                  o->pesc_aux != -1.0))
        return cli_usage(name, "--pesc-experts, --pesc-top-k, --pesc-rank, --pesc-scale and --pesc-aux are for --method pesc%s%s", "", "");
    if (esft && !o->config) return cli_missing(name, "--expert-config CFG.json");
    if (!esft && o->config) return cli_usage(name, "--expert-config is for --method esft, not %s%s", o->method, "");
    if (!lora && (o->lora_rank != -1 || o->lora_alpha != -1.0 || o->lora_targets))
        return cli_usage(name, "--lora-rank, --lora-alpha and --lora-targets are for --method lora%s%s", "", "");
    o->spec.method = esft ? ESFT_TRAIN_ESFT : lora ? ESFT_TRAIN_LORA : pesc ? ESFT_TRAIN_PESC : ESFT_TRAIN_FFT;
    if (pesc) return cli_train_check_pesc(name, o);
    if (!lora) return EXIT_OK;
    /* PEFT's defaults: r 8, alpha 8; the attention projections */
    o->spec.lora_rank = o->lora_rank == -1 ? 8 : o->lora_rank;
    o->spec.lora_alpha = (float)(o->lora_alpha == -1.0 ? o->spec.lora_rank : o->lora_alpha);
    if (o->spec.lora_rank < 1 || o->spec.lora_rank > 65536) return cli_usage(name, "--lora-rank must be in [1, 65536]%s%s", "", "");
    if (!isfinite(o->lora_alpha) || (o->lora_alpha != -1.0 && !(o->lora_alpha > 0.0)))
        return cli_usage(name, "--lora-alpha must be a number > 0%s%s", "", "");
    o->spec.lora_targets = o->lora_targets ? cli_lora_targets(o->lora_targets, bad, sizeof bad) : ESFT_LORA_ATTN;
    if (!o->spec.lora_targets) return cli_usage(name, "--lora-targets: '%s' is not attn, mlp or experts%s", bad, "");
    o->spec.seed = (uint64_t)o->seed;
    return EXIT_OK;
}

/* Everything that can be judged from the command line alone: usage errors (2). */
static int cli_train_check_usage(const char *name, cli_train_opts *o)
{
    int r;
    if (!o->dir) return cli_missing(name, "the MODEL_DIR");
    if (!o->data) return cli_missing(name, "--data TRAIN.jsonl");
    if ((r = cli_train_check_method(name, o)) != EXIT_OK) return r;
    if (!o->out) return cli_missing(name, o->spec.method == ESFT_TRAIN_LORA ? "-o ADAPTER_DIR" : "-o OUT.safetensors");
    if (o->steps == -1) return cli_missing(name, "--steps N");
    if (o->batch_tokens == -1) return cli_missing(name, "--batch-tokens B");
    if (o->steps < 1) return cli_usage(name, "--steps must be >= 1%s%s", "", "");
    if (o->batch_tokens < 1) return cli_usage(name, "--batch-tokens must be >= 1%s%s", "", "");
    if (o->micro_tokens != -1 && o->micro_tokens < 2) return cli_usage(name, "--micro-batch-tokens must be >= 2%s%s", "", "");
    /* the default: a short ramp, at most 100 steps, that a short run barely sees */
    if (o->warmup == -1) o->warmup = o->steps / 10 < 100 ? o->steps / 10 : 100;
    if (o->warmup < 0) return cli_usage(name, "--warmup must be >= 0%s%s", "", "");
    if (strcmp(o->schedule, "constant") != 0 && strcmp(o->schedule, "cosine") != 0)
        return cli_usage(name, "--schedule expects constant or cosine, got '%s'%s", o->schedule, "");
    if (!isfinite(o->lr) || !(o->lr > 0.0) || o->lr > 1e3)
        return cli_usage(name, "--lr must be a number in (0, 1000]%s%s", "", "");
    if (!isfinite(o->weight_decay) || o->weight_decay < 0.0)
        return cli_usage(name, "--weight-decay must be a finite number >= 0%s%s", "", "");
    if (!isfinite(o->clip) || o->clip < 0.0) return cli_usage(name, "--clip must be a finite number >= 0 (0 = off)%s%s", "", "");
    if (o->eval_every != -1 && !o->eval_data) return cli_usage(name, "--eval-every needs --eval-data%s%s", "", "");
    if (o->eval_every == -1) o->eval_every = o->steps;
    if (o->state_every != -1 && !o->state) return cli_usage(name, "--state-every needs --state%s%s", "", "");
    if (o->state_every == -1) o->state_every = o->steps;
    if (o->state_every < 1) return cli_usage(name, "--state-every must be >= 1%s%s", "", "");
    if (o->state && (strcmp(o->state, o->out) == 0 || (o->log && strcmp(o->state, o->log) == 0)))
        return cli_usage(name, "--state '%s' is also -o or --log%s", o->state, "");
    if (o->eval_every < 1) return cli_usage(name, "--eval-every must be >= 1%s%s", "", "");
    if (o->log && strcmp(o->log, o->out) == 0) return cli_usage(name, "--log and -o are the same file '%s'%s", o->log, "");
    return EXIT_OK;
}

/* The outputs (-o and --log) must not be any input: the checkpoint's files,
   the data, the eval data or the expert config. */
static int cli_train_check_outputs(const char *name, const cli_train_opts *o)
{
    cli_inputs in;
    int ok, r;
    memset(&in, 0, sizeof in);
    ok = cli_inputs_add_checkpoint(&in, o->dir) && cli_inputs_add(&in, o->data) &&
         (!o->config || cli_inputs_add(&in, o->config)) && (!o->eval_data || cli_inputs_add(&in, o->eval_data));
    r = ok && o->log ? cli_check_output(name, &in, o->log) : EXIT_OK;
    /* the state may be the file resumed from (that is how a run goes on), so it is
       checked before the resumed file joins the inputs */
    if (r == EXIT_OK && ok && o->state) r = cli_check_output(name, &in, o->state);
    if (r == EXIT_OK && ok && o->resume) ok = cli_inputs_add(&in, o->resume);
    return r == EXIT_OK ? cli_check_done(name, &in, ok, o->out) : (cli_inputs_free(&in), r);
}

/* Scored targets of sample s: position t predicts labels[t + 1]. */
static int64_t cli_scored(const esft_dataset *ds, int s)
{
    int64_t t, n = 0;
    for (t = ds->offset[s] + 1; t < ds->offset[s + 1]; t++) n += ds->labels[t] != -100;
    return n;
}

/* The sample order: epoch after epoch, a Fisher-Yates shuffle of the samples
   that score at least one token, drawn from splitmix64(seed + k) for the k-th
   draw of the run, so one seed gives one order everywhere. */
typedef struct cli_order {
    int *perm, n, pos;
    uint64_t seed, draws;
} cli_order;

static uint64_t cli_mix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static void cli_order_shuffle(cli_order *o)
{
    int i;
    for (i = o->n - 1; i > 0; i--) {
        int j = (int)(cli_mix(o->seed + o->draws++) % (uint64_t)(i + 1)), t = o->perm[i];
        o->perm[i] = o->perm[j];
        o->perm[j] = t;
    }
    o->pos = 0;
}

/* The samples that score (file order), shuffled once; 0 when out of memory. */
static int cli_order_init(cli_order *o, const int64_t *scored, int n_samples, uint64_t seed)
{
    int s;
    memset(o, 0, sizeof *o);
    o->perm = (int *)malloc((size_t)(n_samples > 0 ? n_samples : 1) * sizeof *o->perm);
    if (!o->perm) return 0;
    for (s = 0; s < n_samples; s++)
        if (scored[s] > 0) o->perm[o->n++] = s;
    o->seed = seed;
    cli_order_shuffle(o);
    return 1;
}

static int cli_order_next(cli_order *o)
{
    if (o->pos == o->n) cli_order_shuffle(o);
    return o->perm[o->pos++];
}

/* The learning rate of step i (1-based) of n: linear warm-up to lr over the
   first w steps (step w reaches lr), then constant, or a half cosine from lr at
   step w + 1 towards 0 (never 0 itself: the last step still learns). */
static double cli_train_lr(const cli_train_opts *o, int i)
{
    if (i <= o->warmup) return o->lr * (double)i / (double)o->warmup;
    if (strcmp(o->schedule, "cosine") == 0)
        return o->lr * 0.5 * (1.0 + cos(3.14159265358979323846 * (double)(i - o->warmup - 1) / (double)(o->steps - o->warmup)));
    return o->lr;
}

/* Mean loss of ds with tr's experts in place. */
static esft_status cli_train_eval(const esft_model *m, const esft_model_trainable *tr, const esft_dataset *ds,
                                  double *mean, esft_error *err)
{
    double sum = 0.0;
    int64_t n = 0;
    int s;
    esft_status st = ESFT_OK;
    for (s = 0; st == ESFT_OK && s < ds->n_samples; s++) {
        esft_model_run run;
        double ls = 0.0;
        int64_t ns = 0;
        memset(&run, 0, sizeof run);
        run.labels = ds->labels + ds->offset[s];
        run.trainable = tr;
        st = esft_model_forward(m, ds->ids + ds->offset[s], (int)(ds->offset[s + 1] - ds->offset[s]), &run, &ls, &ns, err);
        sum += ls;
        n += ns;
    }
    *mean = n ? sum / (double)n : 0.0;
    return st;
}

/* --micro-batch-tokens bounds the tokens of one forward-backward (its memory):
   a sample is one micro-batch, so a longer one is an error before any step. */
static esft_status cli_train_check_lengths(const cli_train_opts *o, const esft_dataset *ds, esft_error *err)
{
    int s;
    for (s = 0; o->micro_tokens > 0 && s < ds->n_samples; s++) {
        int64_t n = ds->offset[s + 1] - ds->offset[s];
        if (n <= o->micro_tokens) continue;
        snprintf(err->file, sizeof err->file, "%.200s", o->data);
        snprintf(err->message, sizeof err->message,
                 "sample %d has %lld tokens, more than --micro-batch-tokens %d (one sample is one forward: split it, "
                 "or raise the bound)", s, (long long)n, o->micro_tokens);
        return ESFT_ERR_RANGE;
    }
    return ESFT_OK;
}

/* What a run holds; zeroed, then filled as it opens. */
typedef struct cli_train_state {
    esft_model m;
    esft_dataset ds, eval;
    esft_expert_config cfg;
    esft_model_trainable tr;
    esft_adamw opt;
    cli_order order;
    int64_t *scored, total_scored;
    int *batch;        /* (cap) sample ids of the step's batch */
    int batch_cap;
    int have_model, have_ds, have_eval, have_cfg, have_tr, have_opt;
} cli_train_state;

static void cli_train_close(cli_train_state *t)
{
    free(t->batch);
    free(t->scored);
    free(t->order.perm);
    if (t->have_opt) esft_adamw_uninit(&t->opt);
    if (t->have_tr) esft_model_trainable_uninit(&t->tr);
    if (t->have_cfg) esft_expert_config_free(&t->cfg);
    if (t->have_eval) esft_dataset_free(&t->eval);
    if (t->have_ds) esft_dataset_free(&t->ds);
    if (t->have_model) esft_model_close(&t->m);
}

/* Opens the model, data, config, trainable block and optimizer; every runtime
   check (exit 1) before the first step. */
static esft_status cli_train_open(const char *name, const cli_train_opts *o, cli_train_state *t, esft_error *err)
{
    esft_adamw_config ac = esft_adamw_config_esft();
    esft_train_spec spec = o->spec;
    esft_status s;
    int i;
    if ((s = esft_model_open(&t->m, o->dir, NULL, err)) != ESFT_OK) return s;
    t->have_model = 1;
    if (!o->quiet)
        fprintf(stderr, "esft %s: %s: %s, %d layers (%d MoE)\n", name, o->dir, esft_model_family_name(t->m.cfg.family),
                t->m.cfg.n_layers, esft_model_config_moe_layers(&t->m.cfg));
    if ((s = esft_dataset_read_jsonl(&t->ds, o->data, 0, t->m.cfg.vocab, NULL, err)) != ESFT_OK) return s;
    t->have_ds = 1;
    if (o->eval_data) {
        if ((s = esft_dataset_read_jsonl(&t->eval, o->eval_data, 0, t->m.cfg.vocab, NULL, err)) != ESFT_OK) return s;
        t->have_eval = 1;
        for (i = 0; i < t->eval.n_samples && !cli_scored(&t->eval, i); i++) {}
        if (i == t->eval.n_samples) {
            snprintf(err->file, sizeof err->file, "%.200s", o->eval_data);
            snprintf(err->message, sizeof err->message, "no eval sample scores a token (%d samples)", t->eval.n_samples);
            return ESFT_ERR_INVALID_ARGUMENT;
        }
    }
    t->scored = (int64_t *)malloc((size_t)(t->ds.n_samples + 1) * sizeof *t->scored);
    if (!t->scored) return ESFT_ERR_OUT_OF_MEMORY;
    for (i = 0; i < t->ds.n_samples; i++) t->total_scored += t->scored[i] = cli_scored(&t->ds, i);
    if (t->total_scored == 0) {
        snprintf(err->file, sizeof err->file, "%.200s", o->data);
        snprintf(err->message, sizeof err->message, "%s: no sample scores a token (%d samples, every label -100 or a single token)",
                 t->ds.n_samples ? "no training signal" : "empty data", t->ds.n_samples);
        return ESFT_ERR_INVALID_ARGUMENT;
    }
    if ((s = cli_train_check_lengths(o, &t->ds, err)) != ESFT_OK) return s;
    if (o->config) {
        if ((s = esft_expert_config_read(o->config, &t->cfg, err)) != ESFT_OK) return s;
        t->have_cfg = 1;
        spec.experts = &t->cfg;
    }
    if (spec.method == ESFT_TRAIN_PESC && spec.pesc.rank == -1) /* Camelidae's 512, at most the width */
        spec.pesc.rank = t->m.cfg.d_model < 512 ? t->m.cfg.d_model : 512;
    if ((s = esft_model_trainable_init_spec(&t->tr, &t->m, &spec, NULL, err)) != ESFT_OK) return s;
    t->have_tr = 1;
    if (t->tr.n_params == 0 && o->config) {
        snprintf(err->file, sizeof err->file, "%.200s", o->config);
        snprintf(err->message, sizeof err->message, "the expert config selects no expert: nothing to train");
        return ESFT_ERR_INVALID_ARGUMENT;
    }
    ac.lr = (float)o->lr;
    ac.weight_decay = (float)o->weight_decay;
    if ((s = esft_adamw_init(&t->opt, &ac, t->tr.n_params, NULL, err)) != ESFT_OK) return s;
    t->have_opt = 1;
    if (!cli_order_init(&t->order, t->scored, t->ds.n_samples, (uint64_t)o->seed)) return ESFT_ERR_OUT_OF_MEMORY;
    return ESFT_OK;
}

/* Picks the next batch: samples in order until >= B scored tokens. */
static esft_status cli_train_pick(cli_train_state *t, int batch_tokens, int *n, int64_t *scored)
{
    *n = 0;
    *scored = 0;
    while (*scored < batch_tokens) {
        if (*n == t->batch_cap) {
            int cap = t->batch_cap ? 2 * t->batch_cap : 64;
            int *b = (int *)realloc(t->batch, (size_t)cap * sizeof *b);
            if (!b) return ESFT_ERR_OUT_OF_MEMORY;
            t->batch = b;
            t->batch_cap = cap;
        }
        t->batch[*n] = cli_order_next(&t->order);
        *scored += t->scored[t->batch[*n]];
        ++*n;
    }
    return ESFT_OK;
}

/* One optimizer step; loss is the batch's mean before the update, aux (PESC,
   else -1) the token-weighted mean of the samples' auxiliary losses, the term
   the gradient also holds. */
static esft_status cli_train_step(cli_train_state *t, const cli_train_opts *o, int step, double *loss, double *aux,
                                  double *lr, double *norm, int64_t *tokens, esft_error *err)
{
    esft_status s;
    double sum = 0.0, aux_sum = 0.0;
    int n, b;
    float *g = t->tr.grads;
    if ((s = cli_train_pick(t, o->batch_tokens, &n, tokens)) != ESFT_OK) return s;
    memset(t->tr.grads, 0, t->tr.n_params * sizeof(float));
    for (b = 0; b < n; b++) {
        int sidx = t->batch[b];
        double ls = 0.0;
        int64_t ns = 0;
        s = esft_model_forward_backward(&t->m, &t->tr, t->ds.ids + t->ds.offset[sidx], t->ds.labels + t->ds.offset[sidx],
                                        (int)(t->ds.offset[sidx + 1] - t->ds.offset[sidx]), (float)(1.0 / (double)*tokens),
                                        &ls, &ns, err);
        if (s != ESFT_OK) return s;
        sum += ls;
        aux_sum += t->tr.aux_loss * (double)ns;
    }
    *loss = sum / (double)*tokens;
    *aux = t->tr.method == ESFT_TRAIN_PESC ? aux_sum / (double)*tokens : -1.0;
    if ((s = esft_clip_grad_norm(&g, &t->tr.n_params, 1, (float)o->clip, norm, err)) != ESFT_OK) return s;
    *lr = cli_train_lr(o, step);
    t->opt.cfg.lr = (float)*lr;
    return esft_adamw_step(&t->opt, t->tr.params, t->tr.grads, err);
}

/* The log line of one step (eval < 0: no eval this step). */
static void cli_train_log(FILE *f, int step, double loss, double lr, double norm, int64_t tokens, double eval,
                          double aux)
{
    fprintf(f, "{\"step\": %d, \"loss\": %.9g, \"lr\": %.9g, \"grad_norm\": %.9g, \"tokens\": %lld", step, loss, lr, norm,
            (long long)tokens);
    if (aux >= 0.0) fprintf(f, ", \"aux_loss\": %.9g", aux);
    if (eval >= 0.0) fprintf(f, ", \"eval_loss\": %.9g", eval);
    fprintf(f, "}\n");
}

/* ---- train state: --state / --resume -------------------------------------- */

/* The state file is a safetensors file: "params", "adam_m", "adam_v" (F32,
   n_params each, the trainable block's layout), "experts" (I32: what the
   block holds, cli_train_experts), "order" (I32, the current shuffle of the
   scoring samples), "counters" (I64: steps done, position in the order,
   draws taken, seed) and "setup" (I64: fingerprints of the data and of the
   options that change the math), all a run needs to go on with the same
   bits, and what tells a resume with other data or options. I64 and I32
   bytes are written as this machine holds them (safetensors is
   little-endian, as are x86 and ARM Linux). */
#define CLI_LAYOUT_TAIL 6

/* What the block trains, as the state records it: (layer, expert) per slot,
   then -1, shared blocks, non-expert tensors, adapters, LoRA rank, method.
   NULL when out of memory. */
static int32_t *cli_train_experts(const esft_model_trainable *tr)
{
    int32_t *ex = (int32_t *)malloc((size_t)(2 * tr->n_trained + CLI_LAYOUT_TAIL) * sizeof *ex), *tail;
    int i;
    if (!ex) return NULL;
    for (i = 0; i < tr->n_trained; i++) ex[2 * i] = tr->layer[i], ex[2 * i + 1] = tr->expert[i];
    tail = ex + 2 * tr->n_trained;
    tail[0] = -1;
    tail[1] = tr->n_shared;
    tail[2] = tr->n_modules;
    tail[3] = tr->n_lora;
    tail[4] = tr->lora_rank;
    tail[5] = (int32_t)tr->method;
    return ex;
}

static uint64_t cli_fnv(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = (const unsigned char *)data;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* Fingerprints: [0] the training data (ids, labels, sample bounds), [1] the
   options a resumed run must keep (lr, weight decay, clip, batch, warm-up,
   schedule, LoRA alpha). --steps may grow; eval and state options may change. */
static void cli_train_setup(const cli_train_state *t, const cli_train_opts *o, int64_t setup[2])
{
    uint64_t h = 14695981039346656037ull;
    int64_t n = t->ds.offset[t->ds.n_samples];
    double opts[6];
    int ints[2];
    h = cli_fnv(h, t->ds.offset, (size_t)(t->ds.n_samples + 1) * sizeof *t->ds.offset);
    h = cli_fnv(h, t->ds.ids, (size_t)n * sizeof *t->ds.ids);
    setup[0] = (int64_t)cli_fnv(h, t->ds.labels, (size_t)n * sizeof *t->ds.labels);
    opts[0] = o->lr, opts[1] = o->weight_decay, opts[2] = o->clip, opts[3] = o->spec.lora_alpha;
    opts[4] = o->spec.pesc.scale, opts[5] = o->spec.pesc.aux_alpha;
    ints[0] = o->batch_tokens, ints[1] = o->warmup;
    h = cli_fnv(14695981039346656037ull, opts, sizeof opts);
    h = cli_fnv(h, ints, sizeof ints);
    setup[1] = (int64_t)cli_fnv(h, o->schedule, strlen(o->schedule));
}

static esft_status cli_train_state_save(const cli_train_state *t, const cli_train_opts *o, esft_error *err)
{
    static const char *const keys[] = {"format"}, *const values[] = {"esft-train-state"};
    int64_t counters[4], setup[2];
    uint64_t seed = (uint64_t)o->seed;
    esft_st_write_tensor w[7];
    int32_t *ex;
    esft_status s;
    int i;
    counters[0] = t->opt.step;
    counters[1] = t->order.pos;
    counters[2] = (int64_t)t->order.draws;
    counters[3] = (int64_t)seed;
    memset(w, 0, sizeof w);
    w[0].name = "params", w[0].f32 = t->tr.params;
    w[1].name = "adam_m", w[1].f32 = t->opt.m;
    w[2].name = "adam_v", w[2].f32 = t->opt.v;
    for (i = 0; i < 3; i++) w[i].dtype = ESFT_DTYPE_F32, w[i].n_dims = 1, w[i].shape[0] = (int64_t)t->tr.n_params;
    w[3].name = "order", w[3].dtype = ESFT_DTYPE_I32, w[3].n_dims = 1, w[3].shape[0] = t->order.n, w[3].data = t->order.perm;
    w[4].name = "counters", w[4].dtype = ESFT_DTYPE_I64, w[4].n_dims = 1, w[4].shape[0] = 4, w[4].data = counters;
    if (!(ex = cli_train_experts(&t->tr))) return ESFT_ERR_OUT_OF_MEMORY;
    w[5].name = "experts", w[5].dtype = ESFT_DTYPE_I32, w[5].n_dims = 1;
    w[5].shape[0] = 2 * t->tr.n_trained + CLI_LAYOUT_TAIL;
    w[5].data = ex;
    cli_train_setup(t, o, setup);
    w[6].name = "setup", w[6].dtype = ESFT_DTYPE_I64, w[6].n_dims = 1, w[6].shape[0] = 2, w[6].data = setup;
    s = esft_safetensors_write(o->state, w, 7, keys, values, 1, err);
    free(ex);
    return s;
}

/* Tensor name of st as n values (F32 into f, or I32/I64 into l); its size must be n. */
static esft_status cli_state_tensor(const esft_safetensors *st, const char *path, const char *name, size_t n, float *f,
                                    int64_t *l, esft_error *err)
{
    int i = esft_safetensors_find(st, name);
    if (i < 0 || st->tensors[i].n_elements != (uint64_t)n) {
        snprintf(err->file, sizeof err->file, "%.200s", path);
        snprintf(err->message, sizeof err->message,
                 "%s: %s, the run has %lu (another model, expert config or data?)", name,
                 i < 0 ? "missing" : "another size", (unsigned long)n);
        return i < 0 ? ESFT_ERR_PARSE : ESFT_ERR_SHAPE;
    }
    return f ? esft_safetensors_read_f32(st, i, f, err) : esft_safetensors_read_i64(st, i, l, err);
}

/* The state's "experts" must be the block's (work: 2 n_trained + CLI_LAYOUT_TAIL
   values), its "setup" this run's. */
static esft_status cli_train_state_experts(const cli_train_state *t, const cli_train_opts *o,
                                           const esft_safetensors *st, const char *path, int64_t *work,
                                           esft_error *err)
{
    size_t n = 2 * (size_t)t->tr.n_trained + CLI_LAYOUT_TAIL, i;
    int32_t *ex = cli_train_experts(&t->tr);
    int64_t setup[2];
    int at = esft_safetensors_find(st, "experts");
    int other = at >= 0 && st->tensors[at].n_elements != n; /* another layout: another trainable set */
    esft_status s = !ex      ? ESFT_ERR_OUT_OF_MEMORY
                    : other ? ESFT_ERR_SHAPE
                            : cli_state_tensor(st, path, "experts", n, NULL, work, err);
    for (i = 0; s == ESFT_OK && i < n; i++) other |= work[i] != ex[i];
    if (other) {
        snprintf(err->file, sizeof err->file, "%.200s", path);
        snprintf(err->message, sizeof err->message, "the state trains something else than this run (method %s, "
                 "--expert-config, --lora-rank or --lora-targets differ)", o->method);
        s = ESFT_ERR_SHAPE;
    }
    free(ex);
    if (s == ESFT_OK) s = cli_state_tensor(st, path, "setup", 2, NULL, work, err);
    cli_train_setup(t, o, setup);
    if (s == ESFT_OK && (work[0] != setup[0] || work[1] != setup[1])) {
        snprintf(err->file, sizeof err->file, "%.200s", path);
        snprintf(err->message, sizeof err->message, "the state's run had %s: resume with the same %s",
                 work[0] != setup[0] ? "other training data" : "other options",
                 work[0] != setup[0] ? "--data"
                                     : "--lr, --weight-decay, --clip, --batch-tokens, --warmup, --schedule, --lora-alpha, "
                                       "--pesc-scale and --pesc-aux");
        s = ESFT_ERR_INVALID_ARGUMENT;
    }
    return s;
}

/* Reads a state written by cli_train_state_save for this very run setup. */
static esft_status cli_train_state_load(cli_train_state *t, const cli_train_opts *o, esft_error *err)
{
    const char *path = o->resume;
    uint64_t seed = (uint64_t)o->seed;
    int steps = o->steps;
    esft_safetensors st;
    int64_t c[4], *order = NULL;
    esft_status s;
    size_t n;
    int i;
    if ((s = esft_safetensors_open(&st, path, NULL, err)) != ESFT_OK) return s;
    s = cli_state_tensor(&st, path, "counters", 4, NULL, c, err);
    n = 2 * (size_t)t->tr.n_trained + CLI_LAYOUT_TAIL;
    n = n > (size_t)t->order.n ? n : (size_t)t->order.n;
    if (s == ESFT_OK && !(order = (int64_t *)malloc((n + 1) * sizeof *order))) s = ESFT_ERR_OUT_OF_MEMORY;
    if (s == ESFT_OK) s = cli_train_state_experts(t, o, &st, path, order, err);
    if (s == ESFT_OK) s = cli_state_tensor(&st, path, "order", (size_t)t->order.n, NULL, order, err);
    if (s == ESFT_OK) s = cli_state_tensor(&st, path, "params", t->tr.n_params, t->tr.params, NULL, err);
    if (s == ESFT_OK) s = cli_state_tensor(&st, path, "adam_m", t->tr.n_params, t->opt.m, NULL, err);
    if (s == ESFT_OK) s = cli_state_tensor(&st, path, "adam_v", t->tr.n_params, t->opt.v, NULL, err);
    esft_safetensors_close(&st);
    if (s == ESFT_OK && ((uint64_t)c[3] != seed || c[0] < 0 || c[0] >= steps || c[1] < 0 || c[1] > t->order.n || c[2] < 0)) {
        snprintf(err->file, sizeof err->file, "%.200s", path);
        snprintf(err->message, sizeof err->message, "the state is at step %lld of seed %lld: resume needs --seed %lld and --steps above %lld",
                 (long long)c[0], (long long)c[3], (long long)c[3], (long long)c[0]);
        s = ESFT_ERR_INVALID_ARGUMENT;
    }
    for (i = 0; s == ESFT_OK && i < t->order.n; i++) {
        if (order[i] < 0 || order[i] >= t->ds.n_samples || t->scored[order[i]] == 0) {
            snprintf(err->file, sizeof err->file, "%.200s", path);
            snprintf(err->message, sizeof err->message, "order: sample %lld is not a scoring sample of the data", (long long)order[i]);
            s = ESFT_ERR_RANGE;
        } else {
            t->order.perm[i] = (int)order[i];
        }
    }
    if (s == ESFT_OK) {
        t->opt.step = (long)c[0];
        t->order.pos = (int)c[1];
        t->order.draws = (uint64_t)c[2];
    }
    free(order);
    return s;
}

/* The training loop; the log goes to log_tmp (renamed by the caller). */
static esft_status cli_train_run(const char *name, const cli_train_opts *o, cli_train_state *t, FILE *log,
                                 long long *tokens_done, esft_error *err)
{
    cli_eta eta;
    double run_loss = 0.0, last_eval = -1.0;
    int step, run_n = 0;
    cli_eta_begin(&eta, name, o->quiet);
    for (step = (int)t->opt.step + 1; step <= o->steps; step++) {
        double loss, aux, lr, norm, eval = -1.0, now;
        int64_t tokens;
        esft_status s = cli_train_step(t, o, step, &loss, &aux, &lr, &norm, &tokens, err);
        if (s != ESFT_OK) return s;
        if (t->have_eval && (step % o->eval_every == 0 || step == o->steps)) {
            if ((s = cli_train_eval(&t->m, &t->tr, &t->eval, &eval, err)) != ESFT_OK) return s;
            last_eval = eval;
        }
        *tokens_done += tokens;
        if (log) cli_train_log(log, step, loss, lr, norm, tokens, eval, aux);
        if (log && fflush(log) != 0) return ESFT_ERR_IO;
        if (o->state && (step % o->state_every == 0 || step == o->steps) &&
            (s = cli_train_state_save(t, o, err)) != ESFT_OK)
            return s;
        run_loss += loss;
        run_n++;
        now = cli_now();
        if (!o->quiet && now - eta.start >= 3.0 && now - eta.last >= 5.0) {
            eta.last = now;
            char ev[48] = "";
            if (last_eval >= 0.0) snprintf(ev, sizeof ev, ", eval loss %.4f", last_eval);
            fprintf(stderr, "esft %s: step %d of %d, loss %.4f (mean of the last %d)%s, %.0f tokens/s, about %.0f s left\n",
                    name, step, o->steps, run_loss / run_n, run_n, ev,
                    (double)*tokens_done / (now - eta.start), (now - eta.start) * (o->steps - step) / step);
            run_loss = 0.0;
            run_n = 0;
        }
    }
    return ESFT_OK;
}

static int cmd_train(const char *name, int argc, char **argv)
{
    cli_train_opts o;
    cli_train_state t;
    esft_error err;
    esft_status s;
    FILE *log = NULL;
    char log_tmp[4200];
    long long tokens = 0;
    double t0;
    int r, first;
    if ((r = cli_train_parse(name, argc, argv, &o)) != EXIT_OK) return r;
    if ((r = cli_train_check_usage(name, &o)) != EXIT_OK) return r;
    if ((r = cli_train_check_outputs(name, &o)) != EXIT_OK) return r;
    if (o.spec.method == ESFT_TRAIN_ESFT && (r = cli_require_moe(name, o.dir, "train")) != EXIT_OK) return r;
    memset(&t, 0, sizeof t);
    memset(&err, 0, sizeof err);
    s = cli_train_open(name, &o, &t, &err);
    if (s == ESFT_OK && o.resume) s = cli_train_state_load(&t, &o, &err);
    if (s == ESFT_OK && o.log) {
        /* the log is written beside its name and renamed at the end, so a failed
           run leaves an earlier log untouched (watch the .tmp file meanwhile) */
        snprintf(log_tmp, sizeof log_tmp, "%s.tmp.%ld", o.log, (long)getpid());
        if (!(log = fopen(log_tmp, "w"))) {
            snprintf(err.file, sizeof err.file, "%.200s", log_tmp);
            snprintf(err.message, sizeof err.message, "cannot create: %s", strerror(errno));
            s = ESFT_ERR_IO;
        }
    }
    first = (int)t.opt.step + 1;
    t0 = cli_now();
    if (s == ESFT_OK) s = cli_train_run(name, &o, &t, log, &tokens, &err);
    if (s == ESFT_OK)
        s = o.spec.method == ESFT_TRAIN_LORA ? esft_model_lora_save(&t.tr, o.out, &err)
                                             : esft_model_trainable_save(&t.tr, &t.m, t.have_cfg ? &t.cfg : NULL, o.out, &err);
    /* (fft and pesc: no config; the file says what it holds) */
    if (log && fclose(log) != 0 && s == ESFT_OK) s = ESFT_ERR_IO;
    if (log && s == ESFT_OK && rename(log_tmp, o.log) != 0) {
        snprintf(err.file, sizeof err.file, "%.200s", o.log);
        snprintf(err.message, sizeof err.message, "cannot rename the log into place: %s", strerror(errno));
        s = ESFT_ERR_IO;
        remove(o.out);
    }
    if (log && s != ESFT_OK) remove(log_tmp);
    if (s == ESFT_OK && !o.quiet) {
        char mem[32], opt[32];
        double dt = cli_now() - t0;
        fprintf(stderr, "esft %s: %d steps (%d..%d), %lld scored tokens in %.1f s (%.0f tokens/s); %s: %d experts, "
                        "%d other tensors, %d adapters, %d PESC layers, %llu trainable parameters, optimizer state %s, peak memory %s -> %s\n",
                name, o.steps - first + 1, first, o.steps, tokens, dt, dt > 0 ? (double)tokens / dt : 0.0, o.method,
                t.tr.n_trained + t.tr.n_shared, t.tr.n_modules, t.tr.n_lora, t.tr.n_pesc, (unsigned long long)t.tr.n_params, cli_bytes(esft_adamw_state_bytes(&t.opt), opt, sizeof opt),
                cli_bytes(cli_peak_rss(), mem, sizeof mem), o.out);
    }
    cli_train_close(&t);
    return s == ESFT_OK ? EXIT_OK : cli_fail(name, s, &err);
}

/* The architecture of MODEL_DIR/config.json, for esft inspect; 0 when there is none. */
static int cli_print_architecture(const char *dir)
{
    char path[4200];
    esft_model_config c;
    esft_error err;
    esft_status s;
    struct stat sb;
    int l, first = -1, dense = 0;
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (stat(path, &sb) != 0) return 0; /* not a trial fopen: that waits forever on a FIFO */
    memset(&err, 0, sizeof err);
    s = esft_model_config_read(&c, path, &err);
    if (s != ESFT_OK) {
        printf("architecture: config.json not usable: %s (%s)\n", err.message, esft_status_string(s));
        return 1;
    }
    for (l = 0; l < c.n_layers; l++) {
        if (c.is_moe[l] && first < 0) first = l;
        dense += !c.is_moe[l];
    }
    if (first < 0)
        printf("architecture: %s, %d layers (all dense, no MoE layer), hidden %d, vocab %d%s\n",
               esft_model_family_name(c.family), c.n_layers, c.d_model, c.vocab,
               c.tie_embeddings ? ", tied embeddings" : "");
    else
        printf("architecture: %s, %d layers (%d MoE from layer %d, %d dense), hidden %d, vocab %d%s\n",
               esft_model_family_name(c.family), c.n_layers, c.n_layers - dense, first, dense, c.d_model, c.vocab,
               c.tie_embeddings ? ", tied embeddings" : "");
    if (c.mla)
        printf("attention: MLA, %d heads, q_lora_rank %d, kv_lora_rank %d, qk nope/rope %d/%d, v %d\n", c.n_heads,
               c.q_lora_rank, c.kv_lora_rank, c.qk_nope_dim, c.qk_rope_dim, c.v_head_dim);
    else
        printf("attention: %s, %d heads, %d kv heads, head_dim %d%s%s\n", c.n_kv_heads == c.n_heads ? "MHA" : "GQA",
               c.n_heads, c.n_kv_heads, c.head_dim, c.o_bias ? ", q/k/v/o bias" : c.qkv_bias ? ", qkv bias" : "",
               c.qk_norm == ESFT_QK_NORM_HEAD ? ", per-head q/k norm" : c.qk_norm == ESFT_QK_NORM_WHOLE ? ", q/k norm" : "");
    printf("rope: theta %g%s%s\n", c.rope.theta, c.rope.interleaved ? ", interleaved" : "",
           c.rope.yarn ? ", YaRN" : "");
    if (c.sliding_window) printf("sliding window: %d\n", c.sliding_window);
    if (c.n_layers == dense) {
        printf("experts: none (dense model: every layer an MLP of hidden %d)\n", c.d_ff);
        return 1;
    }
    printf("experts: %d routed (hidden %d), top-%d, %s gating%s%s, scaling %g%s; shared hidden %d%s\n",
           c.route.n_experts, c.d_expert, c.route.top_k, c.route.gating == ESFT_GATING_SIGMOID ? "sigmoid" : "softmax",
           c.route.renormalize ? ", renormalised" : "", c.route.n_group > 1 ? ", group-limited" : "",
           (double)c.route.routed_scaling, c.route_bias ? ", selection bias" : "", c.d_shared,
           c.shared_gate ? " (sigmoid-gated)" : "");
    if (c.fp8_block_rows) printf("quantization: FP8 E4M3, %dx%d blocks\n", c.fp8_block_rows, c.fp8_block_cols);
    return 1;
}

/* ---- the command table ------------------------------------------------- */

typedef struct cli_command {
    const char *name;
    const char *summary; /* one line for `esft --help` */
    int (*run)(const char *name, int argc, char **argv);
    const char *help;    /* `esft help NAME` */
} cli_command;

static const cli_command commands[] = {
    /* ESFT analysis: which experts does a task use? */
    {"stats", "routing logs, or a model run over data -> summary.json (token and gate scores)", cmd_stats, stats_help},
    {"select", "summary.json -> expert config (top-p, top-k or a global budget)", cmd_select, select_help},
    {"heatmap", "summary.json or expert config -> SVG picture of layers x experts", cmd_heatmap, heatmap_help},
    /* Checkpoints (safetensors): look inside, take the experts out, put them back. */
    {"inspect", "safetensors file or sharded checkpoint -> tensors, dtypes, shapes, experts", cmd_inspect, inspect_help},
    {"extract", "base checkpoint + expert config -> small file of the selected experts", cmd_extract, extract_help},
    {"merge", "base checkpoint + trained experts -> new checkpoint (shards + index)", cmd_merge, merge_help},
    /* Models (Hugging Face MoE checkpoints): run them, measure their routing. */
    {"eval", "model directory + JSONL samples -> mean loss (and logits as .npy)", cmd_eval, eval_help},
    {"train", "model directory + JSONL samples + expert config -> trained experts (ESFT)", cmd_train, train_help},
};
#define N_COMMANDS ((int)(sizeof commands / sizeof commands[0]))

static const cli_command *cli_find(const char *name)
{
    int i;
    for (i = 0; i < N_COMMANDS; i++)
        if (strcmp(commands[i].name, name) == 0) return &commands[i];
    return NULL;
}

static void cli_overview(FILE *to)
{
    int i;
    fprintf(to, "usage: esft COMMAND [ARGS...]\n\n"
                "Expert-Specialized Fine-Tuning tools (esft.h %s).\n\ncommands:\n", esft_version());
    for (i = 0; i < N_COMMANDS; i++) fprintf(to, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(to, "\n  esft help COMMAND     the options of one command (or: esft COMMAND --help)\n"
                "  esft --version        print the version\n\n"
                "Exit status: 0 success, 1 runtime error, 2 usage error.\n"
                "Typical use:\n"
                "  esft stats LOGDIR -o summary.json\n"
                "  esft select summary.json --top-p 0.2 -o config.json\n"
                "  esft heatmap summary.json --config config.json -o map.svg\n"
                "From a Hugging Face MoE checkpoint:\n"
                "  esft inspect MODEL_DIR\n"
                "  esft eval MODEL_DIR --data task.jsonl\n"
                "  esft stats MODEL_DIR --data task.jsonl -o summary.json\n"
                "  esft extract MODEL_DIR --config config.json -o experts.safetensors\n"
                "  esft train MODEL_DIR --data task.jsonl --expert-config config.json --steps N --batch-tokens B \\\n"
                "      -o trained.safetensors\n"
                "  esft merge MODEL_DIR trained.safetensors -o MERGED_DIR\n"
                "  esft inspect MERGED_DIR\n");
}

static int is_help(const char *a) { return strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0; }

int main(int argc, char **argv)
{
    const cli_command *c;
    int i;
    if (argc < 2) {
        cli_overview(stderr);
        return EXIT_USAGE;
    }
    if (is_help(argv[1])) { cli_overview(stdout); return EXIT_OK; }
    if (strcmp(argv[1], "--version") == 0) { printf("esft %s\n", esft_version()); return EXIT_OK; }
    if (strcmp(argv[1], "help") == 0) {
        if (argc == 2) { cli_overview(stdout); return EXIT_OK; }
        if (!(c = cli_find(argv[2]))) return cli_usage(NULL, "no command '%s'%s", argv[2], "");
        fputs(c->help, stdout);
        return EXIT_OK;
    }
    if (!(c = cli_find(argv[1]))) return cli_usage(NULL, "no command '%s'%s", argv[1], "");
    for (i = 2; i < argc; i++)
        if (is_help(argv[i])) { fputs(c->help, stdout); return EXIT_OK; }
    return c->run(c->name, argc - 1, argv + 1);
}
