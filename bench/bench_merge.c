/* bench_merge.c - esft_checkpoint_merge throughput on a ~1 GB synthetic
   DeepSeek-V2-style sharded checkpoint, against plain `cp` of the same bytes in
   the same run.

   Build (bench/run_all.sh does this for every bench/bench_*.c):
     cc -O3 -march=native -std=c99 -I. bench/bench_merge.c -o build/bench/bench_merge -lm
   Run:
     BUILD=build build/bench/bench_merge [--mb 1024] [--reps 3] [--dir DIR]

   The checkpoint (in DIR, default $BUILD/bench-merge, deleted at the end): 2
   shards + index, BF16, DeepSeek-V2-Lite expert shapes (D 2048, F 1408:
   5.8 MB per matrix, 17.3 MB per expert), as many layers of 16 experts as fit
   --mb. The trained file: 2 experts per layer extracted with
   esft_checkpoint_extract, every byte changed, saved with
   esft_checkpoint_save_trained. Before timing, one merge is checked byte for
   byte: replaced spans equal the trained file, everything else the base.

   Timed, median of --reps (page cache warm for all; the first run of each is
   a warm-up and not counted):
     merge     esft_checkpoint_merge (writes temp files, fsync, rename)
     cp        cp -r BASE DIR (coreutils; uses copy_file_range, no fsync):
               the speed of copying into the page cache, not to the disk
     cp + sync cp -r, then `sync` of the copied files: the same durability as
               merge, so the fair baseline (bounded by the disk's write speed)
   GB/s = bytes of the base checkpoint / seconds (1 GB = 1e9 bytes). The goal
   of issue 6 is merge >= 0.7 x cp; docs/performance.md ("merge") says why
   only merge vs cp + sync can be judged when the disk is slower than memory.
   _GNU_SOURCE: esft.h then starts writeback with sync_file_range (without
   it, posix_fadvise; in strict C99 neither, only the final fsync).

   LDLIBS: -lm
*/
#define _GNU_SOURCE
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { D = 2048, F = 1408, E = 16 };

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int run(const char *cmd)
{
    int rc = system(cmd);
    if (rc != 0) fprintf(stderr, "bench_merge: '%s' failed (%d)\n", cmd, rc);
    return rc == 0;
}

static int die(const char *what, const esft_error *e)
{
    fprintf(stderr, "bench_merge: %s: %s: %s\n", what, e->file, e->message);
    return 0;
}

static const char *shard_name(int s)
{
    return s == 0 ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
}

/* Writes the base: layers 1..n_layers of E experts (3 BF16 matrices each) plus
   a router per layer, split in two shards, and the index. */
static int make_base(const char *dir, int n_layers, uint64_t *bytes)
{
    static const char *parts[3] = {"gate_proj", "up_proj", "down_proj"};
    int n = n_layers * (E * 3 + 1), half = (n_layers + 1) / 2, s, l, e, p, k;
    esft_st_write_tensor *t = (esft_st_write_tensor *)calloc((size_t)n, sizeof *t);
    char (*names)[96] = (char (*)[96])calloc((size_t)n, 96);
    uint16_t *data = (uint16_t *)malloc((size_t)D * F * sizeof(uint16_t));
    const char *keys[1] = {"format"}, *vals[1] = {"pt"};
    char path[2048];
    esft_error err;
    FILE *f;
    size_t i;
    if (!t || !names || !data) return 0;
    for (i = 0; i < (size_t)D * F; i++) data[i] = esft_f32_to_bf16((float)((i * 2654435761u) % 1000003) * 1e-6f - 0.5f);
    *bytes = 0;
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    f = fopen(path, "w");
    if (!f) return 0;
    fprintf(f, "{\"metadata\": {}, \"weight_map\": {");
    for (s = 0; s < 2; s++) {
        int m = 0;
        for (l = 1; l <= n_layers; l++) {
            if ((l <= half) != (s == 0)) continue;
            snprintf(names[m], 96, "model.layers.%d.mlp.gate.weight", l);
            t[m].n_dims = 2; t[m].shape[0] = E; t[m].shape[1] = D;
            m++;
            for (e = 0; e < E; e++)
                for (p = 0; p < 3; p++, m++) {
                    snprintf(names[m], 96, "model.layers.%d.mlp.experts.%d.%s.weight", l, e, parts[p]);
                    t[m].n_dims = 2;
                    t[m].shape[0] = p == 2 ? D : F;
                    t[m].shape[1] = p == 2 ? F : D;
                }
        }
        for (k = 0; k < m; k++) {
            t[k].name = names[k];
            t[k].dtype = ESFT_DTYPE_BF16;
            t[k].data = data;
            *bytes += (uint64_t)t[k].shape[0] * (uint64_t)t[k].shape[1] * 2;
            fprintf(f, "%s\"%s\": \"%s\"", (s || k) ? ", " : "", names[k], shard_name(s));
        }
        snprintf(path, sizeof path, "%s/%s", dir, shard_name(s));
        if (esft_safetensors_write(path, t, m, keys, vals, 1, &err) != ESFT_OK) return die("write base", &err);
    }
    fprintf(f, "}}\n");
    fclose(f);
    free(t);
    free(names);
    free(data);
    return 1;
}

/* Experts 3 and 11 of every layer, extracted, every byte flipped, saved. */
static int make_trained(const char *base, const char *dir, int n_layers, esft_expert_config *cfg)
{
    char json[8192], path[2048], out[2048];
    size_t n = 0;
    int l, i;
    esft_safetensors st;
    esft_st_write_tensor *w;
    unsigned char **buf;
    esft_error err;
    n += (size_t)snprintf(json + n, sizeof json - n, "{\"experts\": {");
    for (l = 1; l <= n_layers; l++) n += (size_t)snprintf(json + n, sizeof json - n, "%s\"%d\": [3, 11]", l > 1 ? ", " : "", l);
    snprintf(json + n, sizeof json - n, "}, \"shared_experts\": false, \"non_expert_modules\": false}");
    if (esft_expert_config_parse(json, strlen(json), "bench", cfg, &err) != ESFT_OK) return die("config", &err);
    snprintf(path, sizeof path, "%s/extracted.safetensors", dir);
    if (esft_checkpoint_extract(base, cfg, path, NULL, &err) != ESFT_OK) return die("extract", &err);
    if (esft_safetensors_open(&st, path, NULL, &err) != ESFT_OK) return die("open extracted", &err);
    w = (esft_st_write_tensor *)calloc((size_t)st.n_tensors, sizeof *w);
    buf = (unsigned char **)calloc((size_t)st.n_tensors, sizeof *buf);
    for (i = 0; i < st.n_tensors; i++) {
        size_t b = (size_t)st.tensors[i].n_bytes, k;
        buf[i] = (unsigned char *)malloc(b);
        if (esft_safetensors_read(&st, i, buf[i], 0, b, &err) != ESFT_OK) return die("read", &err);
        for (k = 0; k < b; k++) buf[i][k] ^= 0x5A;
        w[i].name = st.tensors[i].name;
        w[i].dtype = st.tensors[i].dtype;
        w[i].n_dims = st.tensors[i].n_dims;
        memcpy(w[i].shape, st.tensors[i].shape, sizeof w[i].shape);
        w[i].data = buf[i];
    }
    snprintf(out, sizeof out, "%s/trained.safetensors", dir);
    if (esft_checkpoint_save_trained(out, cfg, w, st.n_tensors, &err) != ESFT_OK) return die("save", &err);
    for (i = 0; i < st.n_tensors; i++) free(buf[i]);
    free(buf);
    free(w);
    esft_safetensors_close(&st);
    remove(path);
    return 1;
}

/* The merged checkpoint, tensor by tensor: trained tensors hold the trained
   bytes, all others the base's; headers (and so offsets) identical. */
static int validate(const char *base, const char *merged, const char *trained, const esft_expert_config *cfg)
{
    esft_checkpoint b, m;
    esft_safetensors tr;
    esft_error err;
    unsigned char *x = (unsigned char *)malloc((size_t)D * F * 2), *y = (unsigned char *)malloc((size_t)D * F * 2);
    int i, ok = 1, changed = 0;
    if (esft_checkpoint_open(&b, base, NULL, &err) != ESFT_OK || esft_checkpoint_open(&m, merged, NULL, &err) != ESFT_OK ||
        esft_safetensors_open(&tr, trained, NULL, &err) != ESFT_OK)
        return die("validate: open", &err);
    ok = b.n_tensors == m.n_tensors && b.n_shards == m.n_shards;
    for (i = 0; ok && i < b.n_tensors; i++) {
        int s = 0, k = 0, j;
        const esft_safetensors *src;
        size_t n;
        if (!esft_checkpoint_find(&m, b.names[i], &s, &k)) { ok = 0; break; }
        n = (size_t)m.shards[s].tensors[k].n_bytes;
        ok = esft_safetensors_read(m.shards + s, k, x, 0, n, NULL) == ESFT_OK;
        j = esft_safetensors_find(&tr, b.names[i]);
        src = j >= 0 ? &tr : b.shards + b.name_shard[i];
        if (j < 0) j = b.name_tensor[i];
        ok = ok && esft_safetensors_read(src, j, y, 0, n, NULL) == ESFT_OK && memcmp(x, y, n) == 0;
        ok = ok && (esft_expert_config_trains(cfg, b.names[i]) == (src == &tr));
        changed += src == &tr;
    }
    ok = ok && changed == tr.n_tensors;
    if (!ok) fprintf(stderr, "bench_merge: merged checkpoint differs from the expected bytes\n");
    esft_checkpoint_close(&b);
    esft_checkpoint_close(&m);
    esft_safetensors_close(&tr);
    free(x);
    free(y);
    return ok;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    const char *build = getenv("BUILD");
    char dir[1024], base[1100], out[1100], trained[1100], copy[1100], cmd[8192];
    int mb = 1024, reps = 3, i, r, n_layers;
    double t_merge[16], t_cp[16], t_sync[16];
    uint64_t bytes = 0;
    esft_expert_config cfg;
    esft_error err;
    snprintf(dir, sizeof dir, "%s/bench-merge", build && *build ? build : "build");
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--mb") == 0 && i + 1 < argc) mb = atoi(argv[++i]);
        else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) reps = atoi(argv[++i]);
        else if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc) snprintf(dir, sizeof dir, "%s", argv[++i]);
        else { fprintf(stderr, "usage: bench_merge [--mb N] [--reps N] [--dir DIR]\n"); return 2; }
    }
    if (reps < 1) reps = 1;
    if (reps > 15) reps = 15;
    n_layers = (int)((double)mb * 1e6 / ((double)E * 3 * D * F * 2) + 0.5);
    if (n_layers < 2) n_layers = 2;
    snprintf(base, sizeof base, "%s/base", dir);
    snprintf(out, sizeof out, "%s/merged", dir);
    snprintf(copy, sizeof copy, "%s/copy", dir);
    snprintf(trained, sizeof trained, "%s/trained.safetensors", dir);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", dir, base);
    if (!run(cmd)) return 1;
    if (!make_base(base, n_layers, &bytes) || !make_trained(base, dir, n_layers, &cfg)) return 1;
    printf("checkpoint: %d MoE layers x %d experts, BF16, 2 shards, %.3f GB; trained file: %d experts\n", n_layers, E,
           (double)bytes / 1e9, esft_expert_config_count(&cfg));
    /* check, and warm the page cache */
    if (esft_checkpoint_merge(base, trained, out, NULL, &err) != ESFT_OK) return die("merge", &err) ? 0 : 1;
    if (!validate(base, out, trained, &cfg)) return 1;
    printf("validated: trained experts replaced, every other byte equal to the base\n");
    for (r = 0; r <= reps; r++) { /* r = 0 is the warm-up */
        double t0;
        snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", out, copy);
        if (!run(cmd)) return 1;
        t0 = now();
        if (esft_checkpoint_merge(base, trained, out, NULL, &err) != ESFT_OK) return die("merge", &err) ? 0 : 1;
        t_merge[r] = now() - t0;
        snprintf(cmd, sizeof cmd, "cp -r '%s' '%s'", base, copy);
        t0 = now();
        if (!run(cmd)) return 1;
        t_cp[r] = now() - t0;
        snprintf(cmd, sizeof cmd, "rm -rf '%s' && cp -r '%s' '%s' && sync '%s'/*", copy, base, copy, copy);
        t0 = now();
        if (!run(cmd)) return 1;
        t_sync[r] = now() - t0;
    }
    qsort(t_merge + 1, (size_t)reps, sizeof(double), cmp_double);
    qsort(t_cp + 1, (size_t)reps, sizeof(double), cmp_double);
    qsort(t_sync + 1, (size_t)reps, sizeof(double), cmp_double);
    {
        double m = t_merge[1 + reps / 2], c = t_cp[1 + reps / 2], cs = t_sync[1 + reps / 2], gb = (double)bytes / 1e9;
        printf("%-10s %8.3f s  %6.2f GB/s\n", "merge", m, gb / m);
        printf("%-10s %8.3f s  %6.2f GB/s\n", "cp", c, gb / c);
        printf("%-10s %8.3f s  %6.2f GB/s  (rm of the old copy included)\n", "cp + sync", cs, gb / cs);
        printf("merge / cp = %.2f x (goal >= 0.7)   merge / (cp + sync) = %.2f x (same durability)\n", c / m, cs / m);
    }
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    run(cmd);
    esft_expert_config_free(&cfg);
    return 0;
}
