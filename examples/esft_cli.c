/* esft_cli.c - the `esft` command: router statistics, expert selection and
   heatmaps for Expert-Specialized Fine-Tuning, on top of esft.h.

   Build (the Makefile does this as build/esft):
       cc -std=c99 -O2 -I. examples/esft_cli.c -o esft -lm

   Usage:
       esft stats LOGDIR -o summary.json           routing logs -> scores
       esft select summary.json --top-p 0.2 -o config.json
       esft heatmap summary.json --config config.json -o map.svg
       esft help CMD | esft CMD --help | esft --help | esft --version

   Exit status: 0 success, 1 runtime error (bad file, bad value), 2 usage error.
   Messages go to stderr, naming file:line where the library knows them; help
   and --version, which the user asked for, go to stdout. An output file is
   written only when the whole command succeeds (the library writes to
   "<path>.tmp" and renames). docs/cli.md is the manual.

   Adding a command: write `static int cmd_NAME(const char *name, int argc, char **argv)`
   and its help text, then add one row to `commands[]` below. argv[0] is the
   command's name; parse the rest with cli_option()/cli_int()/cli_double(). */
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

#define CLI_MISSING_VALUE(cmd, flag) cli_usage(cmd, "%s needs a value%s", flag, "")

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
    "  --top-k K             experts per token in the logs (default 6, DeepSeek-V2-Lite)\n"
    "  --experts N           routed experts per layer (default 64)\n"
    "  --layers L            layer numbers 0..L-1 are read (default 27: logs 1..26)\n"
    "  --decimals D          round scores to D decimals (default 4, as ESFT);\n"
    "                        -1 writes full precision\n"
    "  -q, --quiet           no summary line on success\n"
    "\n"
    "example:\n"
    "  esft stats build/data/translation -o summary.json\n";

static int cmd_stats(const char *name, int argc, char **argv)
{
    const char *dir = NULL, *out = NULL, *v;
    int i, r, k = 6, experts = 64, layers = 27, decimals = 4, quiet = 0, n_files = 0, l;
    esft_norm norm = ESFT_NORM_POOLED;
    esft_stats st;
    esft_scores sc;
    esft_error err;
    esft_status s;
    unsigned long long samples = 0, tokens = 0;
    memset(&err, 0, sizeof err);
    for (i = 1; i < argc; i++) {
        if ((r = cli_option(argc, argv, &i, "-o", 1, &v)) || (r = cli_option(argc, argv, &i, "--output", 1, &v))) {
            if (r < 0) return CLI_MISSING_VALUE(name, "-o");
            out = v;
        } else if ((r = cli_option(argc, argv, &i, "--norm", 1, &v))) {
            if (r < 0) return CLI_MISSING_VALUE(name, "--norm");
            if (strcmp(v, "pooled") == 0) norm = ESFT_NORM_POOLED;
            else if (strcmp(v, "per-sample") == 0) norm = ESFT_NORM_PER_SAMPLE;
            else return cli_usage(name, "--norm expects pooled or per-sample, got '%s'%s", v, "");
        } else if ((r = cli_option(argc, argv, &i, "--top-k", 1, &v))) {
            if (r < 0 || cli_int(name, "--top-k", v, &k)) return r < 0 ? CLI_MISSING_VALUE(name, "--top-k") : EXIT_USAGE;
        } else if ((r = cli_option(argc, argv, &i, "--experts", 1, &v))) {
            if (r < 0 || cli_int(name, "--experts", v, &experts)) return r < 0 ? CLI_MISSING_VALUE(name, "--experts") : EXIT_USAGE;
        } else if ((r = cli_option(argc, argv, &i, "--layers", 1, &v))) {
            if (r < 0 || cli_int(name, "--layers", v, &layers)) return r < 0 ? CLI_MISSING_VALUE(name, "--layers") : EXIT_USAGE;
        } else if ((r = cli_option(argc, argv, &i, "--decimals", 1, &v))) {
            if (r < 0 || cli_int(name, "--decimals", v, &decimals)) return r < 0 ? CLI_MISSING_VALUE(name, "--decimals") : EXIT_USAGE;
        } else if (cli_option(argc, argv, &i, "-q", 0, &v) || cli_option(argc, argv, &i, "--quiet", 0, &v)) {
            quiet = 1;
        } else if (cli_positional(name, argv[i], &dir, "log directory")) {
            return EXIT_USAGE;
        }
    }
    if (!dir) return cli_usage(name, "missing the log directory%s%s", "", "");
    if (!out) return cli_usage(name, "missing -o SUMMARY.json%s%s", "", "");
    if (decimals < -1 || decimals > 17) return cli_usage(name, "--decimals must be -1..17%s%s", "", "");
    memset(&err, 0, sizeof err);
    if (k < 1 || experts < 1 || layers < 1 || k > experts) {
        snprintf(err.message, sizeof err.message, "need 1 <= top-k (%d) <= experts (%d) and layers (%d) >= 1",
                 k, experts, layers);
        return cli_fail(name, ESFT_ERR_INVALID_ARGUMENT, &err);
    }
    s = esft_stats_init(&st, layers, experts, k, NULL);
    if (s != ESFT_OK) return cli_fail(name, s, NULL);
    s = esft_stats_read_log_dir(&st, dir, &n_files, &err);
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
    if (s != ESFT_OK) return cli_fail(name, s, &err);
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
            if ((r = cli_option(argc, argv, &i, rules[j], 1, &v)) == 0) continue;
            if (r < 0) return CLI_MISSING_VALUE(name, rules[j]);
            if (rule) return cli_usage(name, "give one of --top-p, --top-k, --budget (got %s and %s)", rule, rules[j]);
            rule = rules[j];
            rule_value = v;
            matched = 1;
        }
        if (matched) continue;
        if ((r = cli_option(argc, argv, &i, "-o", 1, &v)) || (r = cli_option(argc, argv, &i, "--output", 1, &v))) {
            if (r < 0) return CLI_MISSING_VALUE(name, "-o");
            out = v;
        } else if ((r = cli_option(argc, argv, &i, "--score", 1, &v))) {
            if (r < 0 || cli_score(name, v, &which)) return r < 0 ? CLI_MISSING_VALUE(name, "--score") : EXIT_USAGE;
        } else if (cli_option(argc, argv, &i, "--shared-experts", 0, &v)) {
            shared = 1;
        } else if (cli_option(argc, argv, &i, "--non-expert-modules", 0, &v)) {
            non_expert = 1;
        } else if (cli_option(argc, argv, &i, "-q", 0, &v) || cli_option(argc, argv, &i, "--quiet", 0, &v)) {
            quiet = 1;
        } else if (cli_positional(name, argv[i], &in, "summary file")) {
            return EXIT_USAGE;
        }
    }
    if (!in) return cli_usage(name, "missing the summary.json to select from%s%s", "", "");
    if (!rule) return cli_usage(name, "missing the rule: --top-p P, --top-k K or --budget N%s%s", "", "");
    if (!out) return cli_usage(name, "missing -o CONFIG.json%s%s", "", "");
    if (strcmp(rule, "--top-p") == 0 ? cli_double(name, rule, rule_value, &p) : cli_int(name, rule, rule_value, &n))
        return EXIT_USAGE;
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
    "\n"
    "example:\n"
    "  esft heatmap summary.json --config config.json -o map.svg\n"
    "  convert map.svg map.png       # or rsvg-convert map.svg -o map.png\n";

/* Reads a whole (small, JSON) file; NULL with err filled on failure. */
static char *cli_read_file(const char *path, size_t *size, esft_error *err)
{
    FILE *f = fopen(path, "rb");
    char *data = NULL;
    size_t cap = 0, n = 0, got;
    memset(err, 0, sizeof *err);
    snprintf(err->file, sizeof err->file, "%s", path);
    if (!f) {
        snprintf(err->message, sizeof err->message, "cannot open: %s", strerror(errno));
        return NULL;
    }
    do {
        if (n == cap) {
            char *grown = (char *)realloc(data, cap = cap ? cap * 2 : 65536);
            if (!grown) { free(data); fclose(f); snprintf(err->message, sizeof err->message, "out of memory"); return NULL; }
            data = grown;
        }
        got = fread(data + n, 1, cap - n, f);
        n += got;
    } while (got > 0);
    if (ferror(f)) {
        snprintf(err->message, sizeof err->message, "read failed");
        free(data);
        data = NULL;
    }
    fclose(f);
    *size = n;
    return data;
}

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

static int cmd_heatmap(const char *name, int argc, char **argv)
{
    const char *in = NULL, *out = NULL, *config = NULL, *v;
    int i, r, kind, experts = 0, have_sc = 0, have_cfg = 0;
    esft_score which = ESFT_SCORE_TOKEN;
    esft_scores sc;
    esft_expert_config cfg;
    esft_error err;
    esft_status s = ESFT_OK;
    char *text;
    size_t size = 0;
    for (i = 1; i < argc; i++) {
        if ((r = cli_option(argc, argv, &i, "-o", 1, &v)) || (r = cli_option(argc, argv, &i, "--output", 1, &v))) {
            if (r < 0) return CLI_MISSING_VALUE(name, "-o");
            out = v;
        } else if ((r = cli_option(argc, argv, &i, "--score", 1, &v))) {
            if (r < 0 || cli_score(name, v, &which)) return r < 0 ? CLI_MISSING_VALUE(name, "--score") : EXIT_USAGE;
        } else if ((r = cli_option(argc, argv, &i, "--config", 1, &v))) {
            if (r < 0) return CLI_MISSING_VALUE(name, "--config");
            config = v;
        } else if ((r = cli_option(argc, argv, &i, "--experts", 1, &v))) {
            if (r < 0 || cli_int(name, "--experts", v, &experts)) return r < 0 ? CLI_MISSING_VALUE(name, "--experts") : EXIT_USAGE;
        } else if (cli_positional(name, argv[i], &in, "input file")) {
            return EXIT_USAGE;
        }
    }
    if (!in) return cli_usage(name, "missing the summary.json or expert config to draw%s%s", "", "");
    if (!out) return cli_usage(name, "missing -o MAP.svg%s%s", "", "");
    if (!(text = cli_read_file(in, &size, &err))) return cli_fail(name, ESFT_ERR_IO, &err);
    kind = cli_json_kind(text, size, in, &err);
    if (kind == 0) s = err.status ? err.status : ESFT_ERR_PARSE;
    else if (kind == 2 && config) {
        free(text);
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
    free(text);
    if (s == ESFT_OK) {
        s = esft_heatmap_write_svg(out, have_sc ? &sc : NULL, which, have_cfg ? &cfg : NULL, &err);
        /* a config that does not fit the scores is the config's fault, not the output's */
        if ((s == ESFT_ERR_RANGE || s == ESFT_ERR_SHAPE) && config) snprintf(err.file, sizeof err.file, "%s", config);
    }
    if (have_sc) esft_scores_free(&sc);
    if (have_cfg) esft_expert_config_free(&cfg);
    return s == ESFT_OK ? EXIT_OK : cli_fail(name, s, &err);
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
    {"stats", "routing logs -> summary.json (token and gate scores per layer and expert)", cmd_stats, stats_help},
    {"select", "summary.json -> expert config (top-p, top-k or a global budget)", cmd_select, select_help},
    {"heatmap", "summary.json or expert config -> SVG picture of layers x experts", cmd_heatmap, heatmap_help},
    /* Checkpoints (safetensors) go here: inspect, extract, merge. */
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
                "  esft heatmap summary.json --config config.json -o map.svg\n");
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
