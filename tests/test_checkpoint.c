/* test_checkpoint.c - safetensors I/O, Hugging Face names, extract / save /
   merge on a synthetic sharded DeepSeek-V2-style checkpoint, bad files.
   Files go to $BUILD/test-tmp/checkpoint (BUILD defaults to build). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <dirent.h>
#include <unistd.h>
#include "harness.h"
#include "slurp.h"
#include "temp_files.h"
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"

/* ---- scratch files ---------------------------------------------------- */

static char g_tmp[1024];

static const char *tmp_dir(void)
{
    if (!g_tmp[0]) {
        const char *b = getenv("BUILD");
        snprintf(g_tmp, sizeof g_tmp, "%s", b && *b ? b : "build");
        mkdir(g_tmp, 0755);
        strcat(g_tmp, "/test-tmp");
        mkdir(g_tmp, 0755);
        strcat(g_tmp, "/checkpoint");
        mkdir(g_tmp, 0755);
    }
    return g_tmp;
}

/* A path under the scratch directory; 256 rotating buffers, so a test may
   hold on to the paths it asked for. */
static const char *tmp_path(const char *name)
{
    static char buf[256][1200];
    static int k;
    k = (k + 1) % 256;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmp_dir(), name);
    return buf[k];
}

/* Empties dir (plain files only): scratch directories outlive a run, and
   merge refuses a directory holding another checkpoint. */
static void clear_dir(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *ent;
    char p[1400];
    if (!d) return;
    while ((ent = readdir(d)) != NULL)
        if (ent->d_name[0] != '.' && (size_t)snprintf(p, sizeof p, "%s/%s", dir, ent->d_name) < sizeof p) remove(p);
    closedir(d);
}

static int exists(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

/* Whole file into memory (malloc'd), size in *n; NULL if missing. */
static unsigned char *slurp_bytes(const char *path, long *n)
{
    size_t size;
    char *p = slurp(path, &size);
    *n = (long)size;
    return (unsigned char *)p;
}

static int spit(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    int ok;
    if (!f) return 0;
    ok = fwrite(data, 1, n, f) == n;
    return fclose(f) == 0 && ok;
}

/* A file from a header text and `data` zero bytes (header not padded). */
static int craft(const char *path, const char *header, size_t data)
{
    size_t h = strlen(header), i;
    unsigned char *p = (unsigned char *)calloc(8 + h + data + 1, 1);
    int ok;
    for (i = 0; i < 8; i++) p[i] = (unsigned char)((uint64_t)h >> (8 * i));
    memcpy(p + 8, header, h);
    ok = spit(path, p, 8 + h + data);
    free(p);
    return ok;
}

/* ---- a synthetic DeepSeek-V2-style checkpoint ------------------------- */

enum { L = 4, E = 8, D = 16, F = 8, FS = 16, V = 32, MAXT = 160 };

typedef struct spec {
    char name[128];
    esft_dtype dtype;
    int n_dims;
    int64_t shape[2];
    int shard; /* 0, 1, 2 */
} spec;

static spec g_specs[MAXT];
static int g_n;

static void add(const char *name, esft_dtype dt, int64_t r, int64_t c, int shard)
{
    spec *s = g_specs + g_n++;
    snprintf(s->name, sizeof s->name, "%s", name);
    s->dtype = dt;
    s->n_dims = c ? 2 : 1;
    s->shape[0] = r;
    s->shape[1] = c;
    s->shard = shard;
}

/* Layer 0 dense, layers 1..3 MoE (E routed + shared experts), DeepSeek-V2's
   names. Shards: embeddings + layers 0-1 | layer 2 | layer 3 + norm + head.
   BF16 like the real model, except layer 3's experts and the final norm (F32). */
static void make_specs(void)
{
    char n[128];
    int l, e, p;
    static const char *parts[3] = {"gate_proj", "up_proj", "down_proj"};
    g_n = 0;
    add("model.embed_tokens.weight", ESFT_DTYPE_BF16, V, D, 0);
    for (l = 0; l < L; l++) {
        int shard = l <= 1 ? 0 : l == 2 ? 1 : 2;
        esft_dtype edt = l == 3 ? ESFT_DTYPE_F32 : ESFT_DTYPE_BF16;
        snprintf(n, sizeof n, "model.layers.%d.input_layernorm.weight", l); add(n, ESFT_DTYPE_BF16, D, 0, shard);
        snprintf(n, sizeof n, "model.layers.%d.self_attn.q_proj.weight", l); add(n, ESFT_DTYPE_BF16, D, D, shard);
        if (l == 0) {
            for (p = 0; p < 3; p++) {
                snprintf(n, sizeof n, "model.layers.0.mlp.%s.weight", parts[p]);
                add(n, ESFT_DTYPE_BF16, p == 2 ? D : 4 * F, p == 2 ? 4 * F : D, shard);
            }
            continue;
        }
        snprintf(n, sizeof n, "model.layers.%d.mlp.gate.weight", l); add(n, ESFT_DTYPE_BF16, E, D, shard);
        for (e = 0; e < E; e++)
            for (p = 0; p < 3; p++) {
                snprintf(n, sizeof n, "model.layers.%d.mlp.experts.%d.%s.weight", l, e, parts[p]);
                add(n, edt, p == 2 ? D : F, p == 2 ? F : D, shard);
            }
        for (p = 0; p < 3; p++) {
            snprintf(n, sizeof n, "model.layers.%d.mlp.shared_experts.%s.weight", l, parts[p]);
            add(n, ESFT_DTYPE_BF16, p == 2 ? D : FS, p == 2 ? FS : D, shard);
        }
    }
    add("model.norm.weight", ESFT_DTYPE_F32, D, 0, 2);
    add("lm_head.weight", ESFT_DTYPE_BF16, V, D, 2);
}

static const char *shard_file(int s)
{
    static char buf[3][64];
    snprintf(buf[s], sizeof buf[s], "model-%05d-of-%05d.safetensors", s + 1, 3);
    return buf[s];
}

/* Deterministic values in [-1, 1). */
static void fill(float *x, size_t n, unsigned seed)
{
    uint32_t r = 2463534242u ^ (seed * 2654435761u);
    size_t i;
    for (i = 0; i < n; i++) {
        r ^= r << 13; r ^= r >> 17; r ^= r << 5;
        x[i] = (float)((double)r / 2147483648.0 - 1.0);
    }
}

/* Writes the three shards and an index (by hand: an independent writer) into dir. */
static int make_checkpoint(const char *dir)
{
    const char *keys[1] = {"format"}, *vals[1] = {"pt"};
    char path[1400];
    float *buf[MAXT];
    int s, i, ok = 1;
    unsigned long long total = 0;
    FILE *f;
    make_specs();
    mkdir(dir, 0755);
    for (i = 0; i < g_n; i++) {
        size_t n = (size_t)g_specs[i].shape[0] * (size_t)(g_specs[i].n_dims == 2 ? g_specs[i].shape[1] : 1);
        buf[i] = (float *)malloc(n * sizeof(float));
        fill(buf[i], n, (unsigned)i + 1);
        total += n * esft_dtype_size(g_specs[i].dtype);
    }
    for (s = 0; s < 3 && ok; s++) {
        esft_st_write_tensor t[MAXT];
        int m = 0;
        for (i = 0; i < g_n; i++) {
            if (g_specs[i].shard != s) continue;
            memset(t + m, 0, sizeof t[m]);
            t[m].name = g_specs[i].name;
            t[m].dtype = g_specs[i].dtype;
            t[m].n_dims = g_specs[i].n_dims;
            t[m].shape[0] = g_specs[i].shape[0];
            t[m].shape[1] = g_specs[i].shape[1];
            t[m].f32 = buf[i];
            m++;
        }
        snprintf(path, sizeof path, "%s/%s", dir, shard_file(s));
        ok = esft_safetensors_write(path, t, m, keys, vals, 1, NULL) == ESFT_OK;
    }
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    f = fopen(path, "w");
    if (!f) ok = 0;
    else {
        fprintf(f, "{\"metadata\": {\"total_size\": %llu}, \"weight_map\": {", total);
        for (i = g_n - 1; i >= 0; i--) /* reverse order: the reader must not rely on order */
            fprintf(f, "\"%s\": \"%s\"%s", g_specs[i].name, shard_file(g_specs[i].shard), i ? ", " : "");
        fprintf(f, "}}\n");
        ok = fclose(f) == 0 && ok;
    }
    for (i = 0; i < g_n; i++) free(buf[i]);
    return ok;
}

static esft_expert_config parse_config(const char *json)
{
    esft_expert_config c;
    esft_status s = esft_expert_config_parse(json, strlen(json), "test", &c, NULL);
    if (s != ESFT_OK) memset(&c, 0, sizeof c);
    return c;
}

/* ---- conversions ------------------------------------------------------ */

/* The checkpoint writer creates its temp file exclusively under a fresh name: a
   file at "<path>.tmp" (the old fixed name, e.g. another writer's) or at the
   first candidate "<path>.tmp.<pid>.0" is neither truncated nor renamed. */
TEST(writer_never_opens_an_existing_temp_name)
{
    const char *path = tmp_path("excl.safetensors");
    char old_tmp[1300], first[1300];
    float a[2] = {1.5f, -2.0f};
    esft_st_write_tensor t;
    char *text;
    memset(&t, 0, sizeof t);
    t.name = "w"; t.dtype = ESFT_DTYPE_F32; t.n_dims = 1; t.shape[0] = 2; t.f32 = a;
    snprintf(old_tmp, sizeof old_tmp, "%s.tmp", path);
    snprintf(first, sizeof first, "%s.tmp.%ld.0", path, (long)getpid());
    CHECK(spit(old_tmp, "keep", 4));
    CHECK(spit(first, "mine", 4));
    CHECK_STATUS(esft_safetensors_write(path, &t, 1, NULL, NULL, 0, NULL), ESFT_OK);
    text = slurp(old_tmp, NULL);
    CHECK_MSG(text && strcmp(text, "keep") == 0, "the old fixed temp name was overwritten");
    free(text);
    text = slurp(first, NULL);
    CHECK_MSG(text && strcmp(text, "mine") == 0, "an existing .tmp.<pid>.0 was overwritten");
    free(text);
    {
        esft_safetensors st;
        CHECK_STATUS(esft_safetensors_open(&st, path, NULL, NULL), ESFT_OK);
        esft_safetensors_close(&st);
    }
    remove(old_tmp);
    remove(first);
    CHECK(!temp_left(path));
}

TEST(dtype_names_sizes_and_parse)
{
    esft_dtype d;
    int i;
    for (i = 0; i < (int)ESFT_DTYPE_COUNT; i++) {
        CHECK_STATUS(esft_dtype_parse(esft_dtype_name((esft_dtype)i), &d), ESFT_OK);
        CHECK_EQ_INT(d, i);
        CHECK(esft_dtype_size((esft_dtype)i) >= 1);
    }
    CHECK_EQ_INT(esft_dtype_size(ESFT_DTYPE_BF16), 2);
    CHECK_EQ_INT(esft_dtype_size(ESFT_DTYPE_F32), 4);
    CHECK_STATUS(esft_dtype_parse("F99", &d), ESFT_ERR_UNSUPPORTED);
    CHECK_STATUS(esft_dtype_parse("bf16", &d), ESFT_ERR_UNSUPPORTED);
    CHECK(strcmp(esft_dtype_name((esft_dtype)99), "?") == 0);
}

static uint32_t bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static float from_bits(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

TEST(f16_all_65536_values_round_trip)
{
    uint32_t h;
    for (h = 0; h < 65536; h++) {
        float x = esft_f16_to_f32((uint16_t)h);
        int e = (int)((h >> 10) & 31), m = (int)(h & 1023);
        CHECK_MSG(esft_f32_to_f16(x) == h, "fp16 %04x -> %08x -> %04x", (unsigned)h, (unsigned)bits(x),
                  (unsigned)esft_f32_to_f16(x));
        if (e == 31) {
            CHECK_MSG(m ? x != x : isinf(x), "fp16 %04x special", (unsigned)h);
        } else { /* the value, computed independently */
            double want = e ? ldexp(1024 + m, e - 25) : ldexp(m, -24);
            if (h & 0x8000) want = -want;
            CHECK_MSG((double)x == want && !!signbit(x) == !!(h & 0x8000), "fp16 %04x = %.9g, want %.9g", (unsigned)h,
                      (double)x, want);
        }
    }
}

TEST(bf16_all_65536_values_round_trip)
{
    uint32_t h;
    for (h = 0; h < 65536; h++) {
        float x = esft_bf16_to_f32((uint16_t)h);
        CHECK_MSG(bits(x) == h << 16, "bf16 %04x widened to %08x", (unsigned)h, (unsigned)bits(x));
        CHECK_MSG(esft_f32_to_bf16(x) == h, "bf16 %04x -> %04x", (unsigned)h, (unsigned)esft_f32_to_bf16(x));
    }
}

TEST(rounding_to_nearest_even_and_specials)
{
    /* fp16: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 -> even (1); 1 + 3*2^-11 -> up */
    CHECK_EQ_INT(esft_f32_to_f16(1.0f + ldexpf(1, -11)), 0x3C00);
    CHECK_EQ_INT(esft_f32_to_f16(1.0f + 3 * ldexpf(1, -11)), 0x3C02);
    CHECK_EQ_INT(esft_f32_to_f16(1.0f + ldexpf(1, -11) + ldexpf(1, -20)), 0x3C01);
    CHECK_EQ_INT(esft_f32_to_f16(65504.0f), 0x7BFF);
    CHECK_EQ_INT(esft_f32_to_f16(65519.99f), 0x7BFF);
    CHECK_EQ_INT(esft_f32_to_f16(65520.0f), 0x7C00);
    CHECK_EQ_INT(esft_f32_to_f16(-1e10f), 0xFC00);
    CHECK_EQ_INT(esft_f32_to_f16(ldexpf(1, -25)), 0x0000);           /* tie with 0 -> 0 */
    CHECK_EQ_INT(esft_f32_to_f16(ldexpf(1.5f, -25)), 0x0001);        /* above the tie */
    CHECK_EQ_INT(esft_f32_to_f16(ldexpf(3, -25)), 0x0002);           /* 1.5 ulp -> even 2 */
    CHECK_EQ_INT(esft_f32_to_f16(ldexpf(1023.5f, -24)), 0x0400);     /* rounds up into the normals */
    CHECK_EQ_INT(esft_f32_to_f16(-0.0f), 0x8000);
    CHECK_EQ_INT(esft_f32_to_f16(from_bits(0x7F800001u)) & 0x7C00, 0x7C00); /* NaN with low payload */
    CHECK(esft_f32_to_f16(from_bits(0x7F800001u)) & 0x3FF);
    CHECK_EQ_INT(esft_f32_to_f16(from_bits(0xFFC00000u)), 0xFE00);
    /* bf16 */
    CHECK_EQ_INT(esft_f32_to_bf16(from_bits(0x3F808000u)), 0x3F80); /* tie -> even */
    CHECK_EQ_INT(esft_f32_to_bf16(from_bits(0x3F818000u)), 0x3F82); /* tie -> even (up) */
    CHECK_EQ_INT(esft_f32_to_bf16(from_bits(0x3F808001u)), 0x3F81);
    CHECK_EQ_INT(esft_f32_to_bf16(from_bits(0x7F7FFFFFu)), 0x7F80);  /* largest float -> Inf */
    CHECK_EQ_INT(esft_f32_to_bf16(from_bits(0xFF800000u)), 0xFF80);
    CHECK_EQ_INT(esft_f32_to_bf16(from_bits(0x7F800001u)) & 0x7F80, 0x7F80); /* NaN stays NaN */
    CHECK(esft_f32_to_bf16(from_bits(0x7F800001u)) & 0x7F);
    CHECK_EQ_INT(esft_f32_to_bf16(from_bits(0x7FFFFFFFu)), 0x7FFF);   /* no carry into the sign */
}

/* ---- names ------------------------------------------------------------ */

TEST(names_parse_and_format_every_table_entry)
{
    int f, p;
    for (f = 0; f < (int)ESFT_FAMILY_COUNT; f++)
        for (p = 1; p < (int)ESFT_PART_COUNT; p++) {
            char name[256];
            esft_tensor_name tn;
            esft_status s = esft_tensor_name_format(name, sizeof name, (esft_family)f, (esft_part)p, 12, 63);
            if (s == ESFT_ERR_UNSUPPORTED) continue;
            CHECK_STATUS(s, ESFT_OK);
            CHECK_MSG(esft_tensor_name_parse(name, &tn) == 1, "%s does not parse", name);
            CHECK_EQ_INT(tn.part, p);
            CHECK_EQ_INT(tn.layer, 12);
            CHECK_EQ_INT(tn.expert, strstr(name, ".63.") || strstr(name, "expert_63") ? 63 : -1);
            /* Qwen's routed experts (one by one or fused) and router carry DeepSeek-V2's names */
            CHECK_EQ_INT(tn.family, (f == ESFT_FAMILY_QWEN_MOE && (p <= ESFT_PART_ROUTER || p == ESFT_PART_FUSED_GATE_UP ||
                                                                  p == ESFT_PART_FUSED_DOWN)) ? ESFT_FAMILY_DEEPSEEK_V2 : f);
        }
}

TEST(names_of_real_models)
{
    esft_tensor_name tn;
    char buf[128];
    CHECK(esft_tensor_name_parse("model.layers.26.mlp.experts.63.down_proj.weight", &tn));
    CHECK(tn.family == ESFT_FAMILY_DEEPSEEK_V2 && tn.part == ESFT_PART_EXPERT_DOWN && tn.layer == 26 && tn.expert == 63);
    CHECK(esft_tensor_name_parse("model.layers.1.mlp.gate.weight", &tn) && tn.part == ESFT_PART_ROUTER && tn.expert == -1);
    CHECK(esft_tensor_name_parse("model.layers.3.mlp.shared_experts.up_proj.weight", &tn) && tn.part == ESFT_PART_SHARED_UP);
    CHECK(esft_tensor_name_parse("model.layers.31.block_sparse_moe.experts.7.w3.weight", &tn));
    CHECK(tn.family == ESFT_FAMILY_MIXTRAL && tn.part == ESFT_PART_EXPERT_UP && tn.expert == 7);
    CHECK(esft_tensor_name_parse("model.layers.0.block_sparse_moe.experts.0.w2.weight", &tn) && tn.part == ESFT_PART_EXPERT_DOWN);
    CHECK(esft_tensor_name_parse("model.layers.0.block_sparse_moe.gate.weight", &tn) && tn.part == ESFT_PART_ROUTER);
    CHECK(esft_tensor_name_parse("model.layers.5.mlp.shared_expert.gate_proj.weight", &tn));
    CHECK(tn.family == ESFT_FAMILY_QWEN_MOE && tn.part == ESFT_PART_SHARED_GATE);
    CHECK(esft_tensor_name_parse("model.layers.5.mlp.shared_expert_gate.weight", &tn) && tn.part == ESFT_PART_SHARED_ROUTER);
    CHECK(esft_tensor_name_parse("model.layers.2.mlp.moe_adapter.experts.expert_3.adapter_up.weight", &tn));
    CHECK(tn.family == ESFT_FAMILY_CAMELIDAE && tn.part == ESFT_PART_ADAPTER_UP && tn.expert == 3);
    CHECK(esft_tensor_name_parse("model.layers.2.mlp.moe_adapter.router.weight", &tn) && tn.part == ESFT_PART_ROUTER);
    /* not MoE tensors, or not quite the pattern */
    CHECK(!esft_tensor_name_parse("model.layers.0.mlp.gate_proj.weight", &tn) && tn.part == ESFT_PART_NONE && tn.layer == -1);
    CHECK(!esft_tensor_name_parse("model.embed_tokens.weight", &tn));
    CHECK(!esft_tensor_name_parse("model.layers.01.mlp.gate.weight", &tn));
    CHECK(!esft_tensor_name_parse("model.layers.1.mlp.experts.2.gate_proj.weight.bak", &tn));
    CHECK(!esft_tensor_name_parse("model.layers.1.mlp.experts..gate_proj.weight", &tn));
    CHECK(!esft_tensor_name_parse("model.layers.1234567.mlp.gate.weight", &tn));
    CHECK(!esft_tensor_name_parse("", &tn));
    CHECK_STATUS(esft_tensor_name_format(buf, sizeof buf, ESFT_FAMILY_MIXTRAL, ESFT_PART_SHARED_UP, 1, -1), ESFT_ERR_UNSUPPORTED);
    CHECK_STATUS(esft_tensor_name_format(buf, 10, ESFT_FAMILY_DEEPSEEK_V2, ESFT_PART_ROUTER, 1, -1), ESFT_ERR_RANGE);
    CHECK_STATUS(esft_tensor_name_format(buf, sizeof buf, ESFT_FAMILY_DEEPSEEK_V2, ESFT_PART_EXPERT_UP, 1, -1), ESFT_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(esft_tensor_name_format(buf, sizeof buf, ESFT_FAMILY_MIXTRAL, ESFT_PART_EXPERT_GATE, 3, 5), ESFT_OK);
    CHECK(strcmp(buf, "model.layers.3.block_sparse_moe.experts.5.w1.weight") == 0);
}

TEST(config_trains_follows_esft_rules)
{
    esft_expert_config c = parse_config("{\"experts\": {\"1\": [2, 5], \"3\": []}, \"shared_experts\": false, \"non_expert_modules\": false}");
    CHECK(c.offset != NULL);
    CHECK(esft_expert_config_trains(&c, "model.layers.1.mlp.experts.5.up_proj.weight"));
    CHECK(!esft_expert_config_trains(&c, "model.layers.1.mlp.experts.4.up_proj.weight"));
    CHECK(!esft_expert_config_trains(&c, "model.layers.2.mlp.experts.2.up_proj.weight"));
    CHECK(!esft_expert_config_trains(&c, "model.layers.1.mlp.shared_experts.up_proj.weight"));
    CHECK(!esft_expert_config_trains(&c, "model.layers.1.mlp.gate.weight"));
    CHECK(!esft_expert_config_trains(&c, "model.embed_tokens.weight"));
    c.shared_experts = 1;
    CHECK(esft_expert_config_trains(&c, "model.layers.7.mlp.shared_experts.up_proj.weight"));
    CHECK(!esft_expert_config_trains(&c, "model.layers.1.mlp.gate.weight"));
    c.non_expert_modules = 1;
    CHECK(esft_expert_config_trains(&c, "model.layers.1.mlp.gate.weight"));
    CHECK(esft_expert_config_trains(&c, "model.embed_tokens.weight"));
    CHECK(!esft_expert_config_trains(&c, "model.layers.1.mlp.experts.4.up_proj.weight"));
    esft_expert_config_free(&c);
}

/* ---- reading and writing ---------------------------------------------- */

TEST(write_read_round_trip_file_and_memory)
{
    float a[6] = {1, -2, 3.5f, 0, -0.0f, 1e-3f}, back[6];
    int32_t ids[3] = {7, -1, 2147483647};
    int64_t got[3];
    esft_st_write_tensor t[3];
    const char *k[2] = {"format", "x"}, *v[2] = {"pt", "y \"z\""};
    esft_safetensors st, sm;
    const char *path = tmp_path("rt.safetensors");
    unsigned char *bytes;
    long n;
    int i;
    memset(t, 0, sizeof t);
    t[0].name = "b16"; t[0].dtype = ESFT_DTYPE_BF16; t[0].n_dims = 2; t[0].shape[0] = 2; t[0].shape[1] = 3; t[0].f32 = a;
    t[1].name = "f32"; t[1].dtype = ESFT_DTYPE_F32; t[1].n_dims = 1; t[1].shape[0] = 6; t[1].f32 = a;
    t[2].name = "ids"; t[2].dtype = ESFT_DTYPE_I32; t[2].n_dims = 1; t[2].shape[0] = 3; t[2].data = ids;
    CHECK_STATUS(esft_safetensors_write(path, t, 3, k, v, 2, NULL), ESFT_OK);
    CHECK(!temp_left(tmp_path("rt.safetensors")));
    bytes = slurp_bytes(path, &n);
    CHECK(bytes != NULL);
    CHECK_EQ_INT((8 + (bytes[0] | bytes[1] << 8)) % 8, 0); /* data area 8-aligned, as the reference pads */
    CHECK_STATUS(esft_safetensors_open(&st, path, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_safetensors_open_memory(&sm, bytes, (size_t)n, "mem", NULL, NULL), ESFT_OK);
    CHECK_EQ_INT(st.n_tensors, 3);
    CHECK_EQ_INT(st.file_size, n);
    CHECK(strcmp(esft_safetensors_metadata(&st, "x"), "y \"z\"") == 0);
    CHECK(esft_safetensors_metadata(&st, "nope") == NULL);
    for (i = 0; i < 3; i++) {
        CHECK(strcmp(st.tensors[i].name, sm.tensors[i].name) == 0 && st.tensors[i].offset == sm.tensors[i].offset);
        CHECK_EQ_INT(esft_safetensors_find(&st, t[i].name) >= 0, 1);
    }
    CHECK_EQ_INT(esft_safetensors_find(&st, "missing"), -1);
    CHECK_STATUS(esft_safetensors_read_f32(&st, esft_safetensors_find(&st, "f32"), back, NULL), ESFT_OK);
    CHECK(memcmp(back, a, sizeof a) == 0);
    CHECK_STATUS(esft_safetensors_read_f32(&sm, esft_safetensors_find(&sm, "b16"), back, NULL), ESFT_OK);
    for (i = 0; i < 6; i++) CHECK(bits(back[i]) == bits(esft_bf16_to_f32(esft_f32_to_bf16(a[i]))));
    CHECK_STATUS(esft_safetensors_read_i64(&st, esft_safetensors_find(&st, "ids"), got, NULL), ESFT_OK);
    CHECK(got[0] == 7 && got[1] == -1 && got[2] == 2147483647);
    CHECK_STATUS(esft_safetensors_read_f32(&st, esft_safetensors_find(&st, "ids"), back, NULL), ESFT_ERR_UNSUPPORTED);
    CHECK_STATUS(esft_safetensors_read(&st, 0, back, 20, 8, NULL), ESFT_ERR_RANGE);
    esft_safetensors_close(&st);
    esft_safetensors_close(&sm);
    free(bytes);
}

TEST(write_refuses_bad_tensors_and_leaves_nothing)
{
    float a[2] = {1, 2};
    esft_st_write_tensor t[2];
    const char *path = tmp_path("refused.safetensors");
    esft_error err;
    remove(path);
    memset(t, 0, sizeof t);
    t[0].name = "w"; t[0].dtype = ESFT_DTYPE_F32; t[0].n_dims = 1; t[0].shape[0] = 2; t[0].f32 = a;
    t[1] = t[0];
    CHECK_STATUS(esft_safetensors_write(path, t, 2, NULL, NULL, 0, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "duplicate") != NULL);
    t[1].name = "__metadata__";
    CHECK_STATUS(esft_safetensors_write(path, t, 2, NULL, NULL, 0, NULL), ESFT_ERR_INVALID_ARGUMENT);
    t[1].name = "\xff\xfe";
    CHECK_STATUS(esft_safetensors_write(path, t, 2, NULL, NULL, 0, NULL), ESFT_ERR_INVALID_ARGUMENT);
    t[1].name = "v"; t[1].dtype = ESFT_DTYPE_I32;
    CHECK_STATUS(esft_safetensors_write(path, t, 2, NULL, NULL, 0, NULL), ESFT_ERR_UNSUPPORTED);
    t[1].dtype = ESFT_DTYPE_F16; t[1].shape[0] = -1;
    CHECK_STATUS(esft_safetensors_write(path, t, 2, NULL, NULL, 0, NULL), ESFT_ERR_INVALID_ARGUMENT);
    t[1].shape[0] = 2; t[1].f32 = NULL;
    CHECK_STATUS(esft_safetensors_write(path, t, 2, NULL, NULL, 0, NULL), ESFT_ERR_INVALID_ARGUMENT);
    CHECK(!exists(path));
    CHECK(!temp_left(tmp_path("refused.safetensors")));
    CHECK_STATUS(esft_safetensors_write(tmp_path("nodir/x.safetensors"), t, 1, NULL, NULL, 0, &err), ESFT_ERR_IO);
}

/* Each malformed file: the status, a word of the message, and that extract
   (as base) and merge (as trained) write nothing. */
static void expect_bad(const char *file, esft_status want, const char *word)
{
    esft_safetensors st;
    esft_error err;
    unsigned char *bytes;
    long n;
    char msg[300];
    esft_expert_config c = parse_config("{\"experts\": {\"1\": [0]}, \"shared_experts\": false, \"non_expert_modules\": false}");
    char out[1200], outdir[1200];
    esft_status s;
    snprintf(out, sizeof out, "%s", tmp_path("bad_out.safetensors"));
    snprintf(outdir, sizeof outdir, "%s", tmp_path("bad_outdir"));
    remove(out);
    s = esft_safetensors_open(&st, file, NULL, &err);
    snprintf(msg, sizeof msg, "%s", err.message);
    if (s != want) { esft_expert_config_free(&c); HARNESS_FAIL_("%s: status %d (%s), wanted %d", file, s, msg, want); }
    if (!strstr(msg, word)) { esft_expert_config_free(&c); HARNESS_FAIL_("%s: message '%s' lacks '%s'", file, msg, word); }
    if (strcmp(err.file, file) != 0) { esft_expert_config_free(&c); HARNESS_FAIL_("error names file '%s'", err.file); }
    bytes = slurp_bytes(file, &n);
    s = esft_safetensors_open_memory(&st, bytes, (size_t)n, "m", NULL, NULL);
    free(bytes);
    if (s != want) { esft_expert_config_free(&c); HARNESS_FAIL_("%s from memory: status %d", file, s); }
    s = esft_checkpoint_extract(file, &c, out, NULL, NULL);
    esft_expert_config_free(&c);
    CHECK_STATUS(s, want);
    CHECK(!exists(out));
    CHECK(!temp_left(tmp_path("bad_out.safetensors")));
    CHECK_STATUS(esft_checkpoint_merge(tmp_path("good_small.safetensors"), file, outdir, NULL, NULL), want);
    CHECK(!exists(tmp_path("bad_outdir/good_small.safetensors")));
    CHECK(!temp_left(tmp_path("bad_outdir/good_small.safetensors")));
}

#define EXPECT_BAD(file, want, word)                   \
    do {                                               \
        expect_bad(file, want, word);                  \
        if (harness_state) return;                     \
    } while (0)

TEST(bad_files_clear_status_no_crash_no_output)
{
    const char *T = "\"model.layers.1.mlp.experts.0.up_proj.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}";
    char h[512];
    unsigned char *bytes;
    long n;
    char good[1200], bad[1200];
    snprintf(good, sizeof good, "%s", tmp_path("good_small.safetensors"));
    snprintf(bad, sizeof bad, "%s", tmp_path("bad.safetensors"));
    snprintf(h, sizeof h, "{%s}", T);
    CHECK(craft(good, h, 8));
    {
        esft_safetensors st;
        CHECK_STATUS(esft_safetensors_open(&st, good, NULL, NULL), ESFT_OK);
        esft_safetensors_close(&st);
    }
    bytes = slurp_bytes(good, &n);
    CHECK(spit(bad, bytes, (size_t)n - 3));                 /* truncated data */
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "truncated");
    CHECK(spit(bad, bytes, 5));                             /* shorter than the length field */
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "truncated");
    bytes[0] = (unsigned char)(n - 7); bytes[1] = 0;       /* header length beyond the file */
    CHECK(spit(bad, bytes, (size_t)n));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "beyond the end");
    bytes[5] = 1;                                           /* 2^40: over the 100 MB limit */
    CHECK(spit(bad, bytes, (size_t)n));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "100 MB");
    free(bytes);
    CHECK(craft(bad, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "overlap");
    CHECK(craft(bad, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "unused bytes");
    CHECK(craft(bad, "{\"a\":{\"dtype\":\"F99\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8));
    EXPECT_BAD(bad, ESFT_ERR_UNSUPPORTED, "unknown dtype 'F99'");
    CHECK(craft(bad, "{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,8]}}", 8));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "12 bytes but data_offsets span 8");
    CHECK(craft(bad, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "duplicate key \"a\""); /* the JSON reader refuses it */
    CHECK(craft(bad, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 12));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "after the last tensor");
    CHECK(craft(bad, "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "non-negative integer");
    CHECK(craft(bad, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}", 4));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "non-negative integer");
    CHECK(craft(bad, "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,4]}}", 4));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "overflows");
    CHECK(craft(bad, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", 4));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "unknown field");
    CHECK(craft(bad, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "lacks data_offsets");
    CHECK(craft(bad, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 4));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "begin <= end");
    CHECK(craft(bad, "{\"__metadata__\":{\"k\":1}}", 0));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "strings");
    CHECK(craft(bad, "{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}", 0));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "duplicate key \"k\"");
    CHECK(craft(bad, "{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "NUL");
    CHECK(craft(bad, "{\"\xc3\x28\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "UTF-8");
    CHECK(craft(bad, "[1, 2]", 0));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "not a JSON object");
    CHECK(craft(bad, "{\"a\": ", 0));
    EXPECT_BAD(bad, ESFT_ERR_PARSE, "header");
    CHECK(craft(bad, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4));
    EXPECT_BAD(bad, ESFT_ERR_UNSUPPORTED, "dimensions");
}

TEST(error_detail_has_file_and_byte_offset)
{
    esft_safetensors st;
    esft_error err;
    const char *bad = tmp_path("offset.safetensors");
    const char *h = "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"Q7\",\"shape\":[1],\"data_offsets\":[4,8]}}";
    CHECK(craft(bad, h, 8));
    CHECK_STATUS(esft_safetensors_open(&st, bad, NULL, &err), ESFT_ERR_UNSUPPORTED);
    CHECK_EQ_INT(err.offset, 8 + (long)(strstr(h, "Q7") - h));
    CHECK(strcmp(err.file, bad) == 0);
    CHECK(strstr(err.message, "tensor 'b'") != NULL);
}

/* ---- checkpoints ------------------------------------------------------ */

static void progress_count(void *user, uint64_t done, uint64_t total)
{
    uint64_t *p = (uint64_t *)user;
    p[0]++;
    p[1] = done;
    p[2] = total;
}

TEST(checkpoint_open_sharded_and_single)
{
    esft_checkpoint ck, one;
    int s, i;
    const char *dir = tmp_path("base_open");
    CHECK(make_checkpoint(dir));
    CHECK_STATUS(esft_checkpoint_open(&ck, dir, NULL, NULL), ESFT_OK);
    CHECK_EQ_INT(ck.sharded, 1);
    CHECK_EQ_INT(ck.n_shards, 3);
    CHECK_EQ_INT(ck.n_tensors, g_n);
    CHECK(strcmp(ck.dir, dir) == 0);
    for (i = 0; i < g_n; i++) {
        CHECK(esft_checkpoint_find(&ck, g_specs[i].name, &s, NULL));
        CHECK(strcmp(ck.shard_files[s], shard_file(g_specs[i].shard)) == 0);
    }
    CHECK(!esft_checkpoint_find(&ck, "model.nope", NULL, NULL));
    esft_checkpoint_close(&ck);
    CHECK_STATUS(esft_checkpoint_open(&ck, tmp_path("base_open/model.safetensors.index.json"), NULL, NULL), ESFT_OK);
    CHECK_EQ_INT(ck.n_shards, 3);
    esft_checkpoint_close(&ck);
    CHECK_STATUS(esft_checkpoint_open(&one, tmp_path("base_open/model-00002-of-00003.safetensors"), NULL, NULL), ESFT_OK);
    CHECK_EQ_INT(one.sharded, 0);
    CHECK_EQ_INT(one.n_shards, 1);
    CHECK(strcmp(one.shard_files[0], "model-00002-of-00003.safetensors") == 0);
    esft_checkpoint_close(&one);
    CHECK_STATUS(esft_checkpoint_open(&one, tmp_path("no_such_dir"), NULL, NULL), ESFT_ERR_IO);
}

/* An index of g_specs with entry `wrong` put in shard `to` (-1: none) and entry
   `drop` left out (-1: none). */
static int write_index(const char *path, int wrong, int to, int drop)
{
    FILE *f = fopen(path, "w");
    int i, first = 1;
    if (!f) return 0;
    fprintf(f, "{\"weight_map\": {");
    for (i = 0; i < g_n; i++) {
        if (i == drop) continue;
        fprintf(f, "%s\"%s\": \"%s\"", first ? "" : ", ", g_specs[i].name, shard_file(i == wrong ? to : g_specs[i].shard));
        first = 0;
    }
    fprintf(f, "}}");
    return fclose(f) == 0;
}

TEST(checkpoint_index_must_match_shards)
{
    char dir[1200], index[1200];
    esft_checkpoint ck;
    esft_error err;
    const char *text;
    snprintf(dir, sizeof dir, "%s", tmp_path("base_badindex"));
    snprintf(index, sizeof index, "%s", tmp_path("base_badindex/model.safetensors.index.json"));
    CHECK(make_checkpoint(dir));
    CHECK(write_index(index, 0, 1, -1));
    CHECK_STATUS(esft_checkpoint_open(&ck, dir, NULL, &err), ESFT_ERR_PARSE);
    CHECK_MSG(strstr(err.message, "puts tensor 'model.embed_tokens.weight' in model-00002-of-00003.safetensors, but it is in model-00001") != NULL, "%s", err.message);
    CHECK(write_index(index, -1, -1, 5));
    CHECK_STATUS(esft_checkpoint_open(&ck, dir, NULL, &err), ESFT_ERR_PARSE);
    CHECK_MSG(strstr(err.message, "that the index does not list") != NULL, "%s", err.message);
    text = "{\"weight_map\": {\"x\": \"../model-00001-of-00003.safetensors\"}}";
    CHECK(spit(index, text, strlen(text)));
    CHECK_STATUS(esft_checkpoint_open(&ck, dir, NULL, &err), ESFT_ERR_PARSE);
    CHECK(strstr(err.message, "file name in the same directory") != NULL);
    text = "{\"weight_map\": {\"x\": \"missing.safetensors\"}}";
    CHECK(spit(index, text, strlen(text)));
    CHECK_STATUS(esft_checkpoint_open(&ck, dir, NULL, &err), ESFT_ERR_IO);
    CHECK(strstr(err.file, "missing.safetensors") != NULL);
    text = "{\"weight_map\": {\"x\": \"a.safetensors\", \"x\": \"b.safetensors\"}}";
    CHECK(spit(index, text, strlen(text)));
    CHECK_STATUS(esft_checkpoint_open(&ck, dir, NULL, &err), ESFT_ERR_PARSE);
    CHECK_MSG(strstr(err.message, "duplicate key \"x\"") != NULL, "%s", err.message);
    CHECK(strstr(err.file, "index") != NULL);
    CHECK(spit(index, "{\"metadata\": {}}", 16));
    CHECK_STATUS(esft_checkpoint_open(&ck, dir, NULL, &err), ESFT_ERR_PARSE);
    CHECK(strstr(err.message, "weight_map") != NULL);
}

/* Bytes of tensor `name` of checkpoint ck (malloc'd). */
static unsigned char *tensor_bytes(const esft_checkpoint *ck, const char *name, size_t *n)
{
    int s, i;
    unsigned char *p;
    if (!esft_checkpoint_find(ck, name, &s, &i)) return NULL;
    *n = (size_t)ck->shards[s].tensors[i].n_bytes;
    p = (unsigned char *)malloc(*n + 1);
    if (esft_safetensors_read(ck->shards + s, i, p, 0, *n, NULL) != ESFT_OK) { free(p); return NULL; }
    return p;
}

/* extract -> one AdamW step on a synthetic loss -> save -> merge; then tensor by
   tensor: the trained experts hold exactly the saved bytes (and changed), every
   other tensor is bit-identical to the base, an untouched shard is the same file. */
TEST(extract_train_save_merge_changes_exactly_the_trained_experts)
{
    const char *base = tmp_path("base"), *experts = tmp_path("experts.safetensors");
    const char *trained = tmp_path("trained.safetensors"), *out = tmp_path("merged");
    esft_expert_config cfg = parse_config("{\"experts\": {\"1\": [2, 5], \"2\": [], \"3\": [7, 1]}, \"shared_experts\": false, \"non_expert_modules\": false}");
    esft_expert_config back;
    esft_safetensors ex;
    esft_checkpoint b, m;
    esft_st_write_tensor w[32];
    esft_adamw opt;
    esft_adamw_config oc = esft_adamw_config_init();
    esft_checkpoint_options o;
    uint64_t prog[3] = {0, 0, 0};
    float *params, *grads, *target;
    size_t total = 0, off;
    int i, changed = 0;
    CHECK(cfg.offset != NULL);
    CHECK(make_checkpoint(base));
    clear_dir(out);
    memset(&o, 0, sizeof o);
    o.progress = progress_count;
    o.user = prog;
    CHECK_STATUS(esft_checkpoint_extract(base, &cfg, experts, &o, NULL), ESFT_OK);
    CHECK(prog[0] > 0 && prog[1] == prog[2] && prog[2] > 0);
    CHECK_STATUS(esft_safetensors_open(&ex, experts, NULL, NULL), ESFT_OK);
    CHECK_EQ_INT(ex.n_tensors, 4 * 3);
    CHECK(strcmp(esft_safetensors_metadata(&ex, "format"), "pt") == 0);
    CHECK_STATUS(esft_checkpoint_read_config(&ex, &back, NULL), ESFT_OK);
    CHECK_EQ_INT(esft_expert_config_count(&back), 4);
    CHECK(esft_expert_config_has(&back, 3, 7) && esft_expert_config_has(&back, 1, 2) && !esft_expert_config_has(&back, 2, 0));
    esft_expert_config_free(&back);
    for (i = 0; i < ex.n_tensors; i++) total += ex.tensors[i].n_elements;
    params = (float *)malloc(total * sizeof(float));
    grads = (float *)malloc(total * sizeof(float));
    target = (float *)malloc(total * sizeof(float));
    /* the loss sum (p - target)^2 over the trained experts; one AdamW step */
    for (i = 0, off = 0; i < ex.n_tensors; off += ex.tensors[i].n_elements, i++)
        CHECK_STATUS(esft_safetensors_read_f32(&ex, i, params + off, NULL), ESFT_OK);
    fill(target, total, 99);
    for (off = 0; off < total; off++) grads[off] = 2.0f * (params[off] - target[off]);
    oc.lr = 0.05f;
    CHECK_STATUS(esft_adamw_init(&opt, &oc, total, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_adamw_step(&opt, params, grads, NULL), ESFT_OK);
    esft_adamw_uninit(&opt);
    memset(w, 0, sizeof w);
    for (i = 0, off = 0; i < ex.n_tensors; off += ex.tensors[i].n_elements, i++) {
        w[i].name = ex.tensors[i].name;
        w[i].dtype = ex.tensors[i].dtype; /* back to the base's dtype */
        w[i].n_dims = ex.tensors[i].n_dims;
        memcpy(w[i].shape, ex.tensors[i].shape, sizeof w[i].shape);
        w[i].f32 = params + off;
    }
    CHECK_STATUS(esft_checkpoint_save_trained(trained, &cfg, w, ex.n_tensors, NULL), ESFT_OK);
    esft_safetensors_close(&ex);
    CHECK_STATUS(esft_checkpoint_merge(base, trained, out, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_checkpoint_open(&b, base, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_checkpoint_open(&m, out, NULL, NULL), ESFT_OK);
    CHECK_EQ_INT(m.sharded, 1);
    CHECK_EQ_INT(m.n_shards, 3);
    CHECK_EQ_INT(m.n_tensors, b.n_tensors);
    CHECK(m.total_bytes == b.total_bytes);
    for (i = 0; i < b.n_tensors; i++) {
        const char *name = b.names[i];
        size_t nb = 0, nm = 0;
        unsigned char *pb = tensor_bytes(&b, name, &nb), *pm = tensor_bytes(&m, name, &nm);
        int trained_here = esft_expert_config_trains(&cfg, name);
        CHECK_MSG(pb && pm && nb == nm, "%s missing or resized", name);
        if (!trained_here) {
            CHECK_MSG(memcmp(pb, pm, nb) == 0, "%s changed but was not trained", name);
        } else {
            esft_safetensors tr;
            int j;
            float *got = (float *)malloc(nm / 2 * sizeof(float) + 4), *want;
            CHECK_MSG(memcmp(pb, pm, nb) != 0, "%s was trained but did not change", name);
            CHECK_STATUS(esft_safetensors_open(&tr, trained, NULL, NULL), ESFT_OK);
            j = esft_safetensors_find(&tr, name);
            CHECK(j >= 0);
            want = (float *)malloc(tr.tensors[j].n_elements * sizeof(float));
            CHECK_STATUS(esft_safetensors_read_f32(&tr, j, want, NULL), ESFT_OK);
            {
                int s_, t_;
                esft_checkpoint_find(&m, name, &s_, &t_);
                CHECK_STATUS(esft_safetensors_read_f32(m.shards + s_, t_, got, NULL), ESFT_OK);
            }
            CHECK_MSG(memcmp(got, want, tr.tensors[j].n_elements * sizeof(float)) == 0, "%s differs from the trained file", name);
            esft_safetensors_close(&tr);
            free(got);
            free(want);
            changed++;
        }
        free(pb);
        free(pm);
    }
    CHECK_EQ_INT(changed, 12);
    {   /* layer 2 (shard 2) was not trained: the same file, byte for byte */
        long n1, n2;
        unsigned char *f1 = slurp_bytes(tmp_path("base/model-00002-of-00003.safetensors"), &n1);
        unsigned char *f2 = slurp_bytes(tmp_path("merged/model-00002-of-00003.safetensors"), &n2);
        CHECK(f1 && f2 && n1 == n2 && memcmp(f1, f2, (size_t)n1) == 0);
        free(f1);
        free(f2);
    }
    CHECK(!temp_left(tmp_path("merged/model-00001-of-00003.safetensors")));
    CHECK(!temp_left(tmp_path("merged/model.safetensors.index.json")));
    esft_checkpoint_close(&b);
    esft_checkpoint_close(&m);
    free(params);
    free(grads);
    free(target);
    esft_expert_config_free(&cfg);
}

TEST(extract_with_shared_experts_and_single_file_base)
{
    const char *base = tmp_path("base_shared"), *out = tmp_path("shared.safetensors");
    esft_expert_config cfg = parse_config("{\"experts\": {\"1\": [0]}, \"shared_experts\": true, \"non_expert_modules\": false}");
    esft_safetensors st;
    int i;
    CHECK(make_checkpoint(base));
    CHECK_STATUS(esft_checkpoint_extract(base, &cfg, out, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_safetensors_open(&st, out, NULL, NULL), ESFT_OK);
    CHECK_EQ_INT(st.n_tensors, 3 + 3 * 3); /* expert 0 of layer 1 + shared experts of layers 1..3 */
    for (i = 0; i < st.n_tensors; i++) CHECK(esft_expert_config_trains(&cfg, st.tensors[i].name));
    esft_safetensors_close(&st);
    /* one shard as a single-file base: layer 1's experts are in shard 1 only */
    cfg.shared_experts = 0;
    CHECK_STATUS(esft_checkpoint_extract(tmp_path("base_shared/model-00001-of-00003.safetensors"), &cfg, out, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_safetensors_open(&st, out, NULL, NULL), ESFT_OK);
    CHECK_EQ_INT(st.n_tensors, 3);
    esft_safetensors_close(&st);
    esft_expert_config_free(&cfg);
}

TEST(extract_refuses_experts_missing_from_base)
{
    const char *base = tmp_path("base_missing"), *out = tmp_path("missing.safetensors");
    esft_expert_config cfg = parse_config("{\"experts\": {\"1\": [0], \"3\": [8]}, \"shared_experts\": false, \"non_expert_modules\": false}");
    esft_error err;
    remove(out);
    CHECK(make_checkpoint(base));
    CHECK_STATUS(esft_checkpoint_extract(base, &cfg, out, NULL, &err), ESFT_ERR_RANGE);
    CHECK_MSG(strstr(err.message, "expert 8 of layer 3") != NULL, "%s", err.message);
    CHECK(!exists(out));
    esft_expert_config_free(&cfg);
    cfg = parse_config("{\"experts\": {\"9\": [1]}, \"shared_experts\": false, \"non_expert_modules\": false}");
    CHECK_STATUS(esft_checkpoint_extract(base, &cfg, out, NULL, &err), ESFT_ERR_RANGE);
    CHECK(!exists(out));
    esft_expert_config_free(&cfg);
}

TEST(save_trained_refuses_untrained_tensors)
{
    esft_expert_config cfg = parse_config("{\"experts\": {\"1\": [2]}, \"shared_experts\": false, \"non_expert_modules\": false}");
    float a[4] = {0};
    esft_st_write_tensor w;
    esft_error err;
    const char *path = tmp_path("untrained.safetensors");
    remove(path);
    memset(&w, 0, sizeof w);
    w.name = "model.layers.1.mlp.experts.3.up_proj.weight";
    w.dtype = ESFT_DTYPE_BF16;
    w.n_dims = 2; w.shape[0] = 2; w.shape[1] = 2;
    w.f32 = a;
    CHECK_STATUS(esft_checkpoint_save_trained(path, &cfg, &w, 1, &err), ESFT_ERR_RANGE);
    CHECK(strstr(err.message, "experts.3.up_proj") != NULL);
    CHECK(!exists(path));
    w.name = "model.layers.1.mlp.experts.2.up_proj.weight";
    CHECK_STATUS(esft_checkpoint_save_trained(path, &cfg, &w, 1, &err), ESFT_OK);
    esft_expert_config_free(&cfg);
}

/* A trained file with one tensor, to try merges that must be refused. */
static int one_tensor_file(const char *path, const char *name, esft_dtype dt, int rows, int cols)
{
    static float z[1024];
    esft_st_write_tensor w;
    memset(&w, 0, sizeof w);
    w.name = name;
    w.dtype = dt;
    w.n_dims = 2; w.shape[0] = rows; w.shape[1] = cols;
    w.f32 = z;
    return esft_safetensors_write(path, &w, 1, NULL, NULL, 0, NULL) == ESFT_OK;
}

static int dir_has_outputs(const char *dir)
{
    char p[1400];
    int s;
    for (s = 0; s < 3; s++) {
        snprintf(p, sizeof p, "%s/%s", dir, shard_file(s));
        if (exists(p)) return 1;
        if (temp_left(p)) return 1;
    }
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    return exists(p);
}

TEST(merge_refuses_mismatches_and_writes_nothing)
{
    const char *base = tmp_path("base_refuse"), *t = tmp_path("refuse.safetensors"), *out = tmp_path("refused_merge");
    const char *name = "model.layers.1.mlp.experts.2.gate_proj.weight";
    esft_error err;
    CHECK(make_checkpoint(base));
    CHECK(one_tensor_file(t, name, ESFT_DTYPE_BF16, F + 1, D));
    CHECK_STATUS(esft_checkpoint_merge(base, t, out, NULL, &err), ESFT_ERR_SHAPE);
    CHECK_MSG(strstr(err.message, "trained BF16 [9, 16], base BF16 [8, 16]") != NULL, "%s", err.message);
    CHECK(!dir_has_outputs(out));
    CHECK(one_tensor_file(t, name, ESFT_DTYPE_F32, F, D));
    CHECK_STATUS(esft_checkpoint_merge(base, t, out, NULL, &err), ESFT_ERR_SHAPE);
    CHECK_MSG(strstr(err.message, "trained F32 [8, 16], base BF16 [8, 16]") != NULL, "%s", err.message);
    CHECK(!dir_has_outputs(out));
    CHECK(one_tensor_file(t, "model.layers.1.mlp.experts.8.gate_proj.weight", ESFT_DTYPE_BF16, F, D));
    CHECK_STATUS(esft_checkpoint_merge(base, t, out, NULL, &err), ESFT_ERR_RANGE);
    CHECK(strstr(err.message, "not in the base") != NULL);
    CHECK(!dir_has_outputs(out));
    CHECK(one_tensor_file(t, name, ESFT_DTYPE_BF16, F, D));
    CHECK_STATUS(esft_checkpoint_merge(base, t, base, NULL, &err), ESFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err.message, "output directory") != NULL);
    CHECK_STATUS(esft_checkpoint_merge(base, t, tmp_path("no/such/parent"), NULL, &err), ESFT_ERR_IO);
}

TEST(write_index_round_trips)
{
    const char *base = tmp_path("base_index");
    esft_checkpoint ck, again;
    int i;
    CHECK(make_checkpoint(base));
    CHECK_STATUS(esft_checkpoint_open(&ck, base, NULL, NULL), ESFT_OK);
    CHECK_STATUS(esft_checkpoint_write_index(tmp_path("base_index/model.safetensors.index.json"), &ck, NULL), ESFT_OK);
    CHECK_STATUS(esft_checkpoint_open(&again, base, NULL, NULL), ESFT_OK);
    CHECK_EQ_INT(again.n_tensors, ck.n_tensors);
    for (i = 0; i < ck.n_tensors; i++) {
        CHECK(strcmp(again.names[i], ck.names[i]) == 0);
        CHECK(strcmp(again.shard_files[again.name_shard[i]], ck.shard_files[ck.name_shard[i]]) == 0);
    }
    esft_checkpoint_close(&ck);
    esft_checkpoint_close(&again);
}

/* ---- fused 3-D experts (transformers v5: mlp.experts.gate_up_proj / down_proj) ---- */

TEST(fused_slice_geometry)
{
    const int64_t gu[3] = {8, 48, 64}, dn[3] = {8, 64, 24}, odd[3] = {8, 47, 64};
    int64_t shape[2];
    uint64_t at;
    CHECK(esft_fused_slice(gu, 3, ESFT_PART_EXPERT_GATE, 3, &at, shape));
    CHECK(at == (uint64_t)3 * 48 * 64 && shape[0] == 24 && shape[1] == 64);
    CHECK(esft_fused_slice(gu, 3, ESFT_PART_EXPERT_UP, 3, &at, shape));
    CHECK(at == (uint64_t)3 * 48 * 64 + 24 * 64 && shape[0] == 24 && shape[1] == 64);
    CHECK(esft_fused_slice(dn, 3, ESFT_PART_EXPERT_DOWN, 7, &at, shape));
    CHECK(at == (uint64_t)7 * 64 * 24 && shape[0] == 64 && shape[1] == 24);
    CHECK(!esft_fused_slice(gu, 3, ESFT_PART_EXPERT_GATE, 8, &at, shape));  /* e >= E */
    CHECK(!esft_fused_slice(gu, 3, ESFT_PART_EXPERT_GATE, -1, &at, shape));
    CHECK(!esft_fused_slice(odd, 3, ESFT_PART_EXPERT_UP, 0, &at, shape));  /* 2F odd */
    CHECK(!esft_fused_slice(gu, 2, ESFT_PART_EXPERT_GATE, 0, &at, shape));  /* not 3-D */
    CHECK(!esft_fused_slice(gu, 3, ESFT_PART_ROUTER, 0, &at, shape));
}

TEST(fused_names_parse_and_are_never_trained_whole)
{
    esft_tensor_name tn;
    esft_expert_config all = parse_config("{\"experts\": {\"0\": [0, 1, 2, 3, 4, 5, 6, 7]}, \"shared_experts\": true, \"non_expert_modules\": true}");
    CHECK(esft_tensor_name_parse("model.layers.12.mlp.experts.gate_up_proj", &tn));
    CHECK(tn.part == ESFT_PART_FUSED_GATE_UP && tn.layer == 12 && tn.expert == -1);
    CHECK(esft_tensor_name_parse("model.layers.0.mlp.experts.down_proj", &tn));
    CHECK(tn.part == ESFT_PART_FUSED_DOWN && tn.layer == 0);
    CHECK(!esft_expert_config_trains(&all, "model.layers.0.mlp.experts.gate_up_proj"));
    CHECK(esft_expert_config_trains(&all, "model.layers.0.mlp.experts.3.gate_proj.weight"));
    esft_expert_config_free(&all);
}

/* Bytes [at, at + n) of a file tensor. */
static int read_span(const esft_checkpoint *ck, const char *name, uint64_t at, void *dst, size_t n)
{
    int s, i;
    return esft_checkpoint_find(ck, name, &s, &i) && esft_safetensors_read(ck->shards + s, i, dst, at, n, NULL) == ESFT_OK;
}

/* Extract from a fused base gives per-expert tensors equal to the slices; a
   trained file of per-expert tensors merges back into exactly those slices:
   every other byte of every file is the base's. */
TEST(fused_extract_and_merge_touch_exactly_the_slices)
{
    const char *base = "tests/models/qwen2_moe_fused", *ex = tmp_path("fused_experts.safetensors");
    const char *trained = tmp_path("fused_trained.safetensors"), *out = tmp_path("fused_merged");
    const char *both = tmp_path("fused_both.safetensors");
    esft_expert_config cfg = parse_config("{\"experts\": {\"0\": [1, 5], \"1\": [7]}, \"shared_experts\": false, \"non_expert_modules\": false}");
    static const char *parts[3] = {"gate_proj", "up_proj", "down_proj"};
    static const int layer_of[3] = {0, 0, 1}, expert_of[3] = {1, 5, 7};
    esft_safetensors st;
    esft_checkpoint b, m;
    esft_st_write_tensor w[9];
    char names[9][128];
    int64_t shapes[9][2];
    float *vals[9];
    unsigned char *fb, *mb;
    long nb, nm;
    int k, p, i, differing = 0;
    esft_error err;
    char path[1300];
    clear_dir(out); /* a run before may have left its merge */
    CHECK_STATUS(esft_checkpoint_extract(base, &cfg, ex, NULL, &err), ESFT_OK);
    CHECK_STATUS(esft_safetensors_open(&st, ex, NULL, NULL), ESFT_OK);
    CHECK_EQ_INT(st.n_tensors, 9);
    CHECK_STATUS(esft_checkpoint_open(&b, base, NULL, NULL), ESFT_OK);
    for (k = 0; k < 3; k++)
        for (p = 0; p < 3; p++) {
            int j = k * 3 + p, idx;
            char fused[96];
            uint64_t at = (p == 2 ? (uint64_t)expert_of[k] * 64 * 24 : ((uint64_t)expert_of[k] * 48 + (p == 1 ? 24 : 0)) * 64) * 4;
            float got[24 * 64], want[24 * 64];
            snprintf(names[j], sizeof names[j], "model.layers.%d.mlp.experts.%d.%s.weight", layer_of[k], expert_of[k], parts[p]);
            snprintf(fused, sizeof fused, "model.layers.%d.mlp.experts.%s", layer_of[k], p == 2 ? "down_proj" : "gate_up_proj");
            idx = esft_safetensors_find(&st, names[j]);
            CHECK_MSG(idx >= 0, "tensor %d missing from the extract", j);
            if (idx < 0) continue;
            CHECK(st.tensors[idx].shape[0] == (p == 2 ? 64 : 24) && st.tensors[idx].shape[1] == (p == 2 ? 24 : 64));
            CHECK_STATUS(esft_safetensors_read(&st, idx, got, 0, sizeof got, NULL), ESFT_OK);
            CHECK(read_span(&b, fused, at, want, sizeof want));
            CHECK_MSG(memcmp(got, want, sizeof got) == 0, "tensor %d is not its slice", j);
            shapes[j][0] = st.tensors[idx].shape[0];
            shapes[j][1] = st.tensors[idx].shape[1];
            vals[j] = (float *)malloc(sizeof got);
            for (i = 0; i < 24 * 64; i++) vals[j][i] = got[i] + 1.0f + (float)j; /* "trained" */
            memset(&w[j], 0, sizeof w[j]);
            w[j].name = names[j]; w[j].dtype = ESFT_DTYPE_F32; w[j].n_dims = 2; w[j].shape[0] = shapes[j][0]; w[j].shape[1] = shapes[j][1]; w[j].f32 = vals[j];
        }
    esft_safetensors_close(&st);
    CHECK_STATUS(esft_checkpoint_save_trained(trained, &cfg, w, 9, NULL), ESFT_OK);
    CHECK_STATUS(esft_checkpoint_merge(base, trained, out, NULL, &err), ESFT_OK);
    CHECK_STATUS(esft_checkpoint_open(&m, out, NULL, NULL), ESFT_OK);
    for (k = 0; k < 9; k++) { /* each slice holds the trained values */
        float got[24 * 64];
        int L = layer_of[k / 3], E = expert_of[k / 3], P = k % 3;
        char fused[96];
        uint64_t at = (P == 2 ? (uint64_t)E * 64 * 24 : ((uint64_t)E * 48 + (P == 1 ? 24 : 0)) * 64) * 4;
        snprintf(fused, sizeof fused, "model.layers.%d.mlp.experts.%s", L, P == 2 ? "down_proj" : "gate_up_proj");
        CHECK(read_span(&m, fused, at, got, sizeof got));
        CHECK_MSG(memcmp(got, vals[k], sizeof got) == 0, "slice %d of the merge is not the trained tensor", k);
    }
    /* byte by byte: the merged file differs from the base exactly in 9 slices */
    snprintf(path, sizeof path, "%s/model.safetensors", base);
    fb = slurp_bytes(path, &nb);
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    mb = slurp_bytes(path, &nm);
    CHECK(fb && mb && nb == nm);
    if (fb && mb && nb == nm)
        for (i = 0; i < nb; i++) differing += fb[i] != mb[i];
    printf("     %d bytes differ; the 9 slices hold %d bytes\n", differing, 9 * 24 * 64 * 4);
    CHECK(differing > 0 && differing <= 9 * 24 * 64 * 4);
    free(fb); free(mb);
    esft_checkpoint_close(&m);
    /* the whole fused tensor and one of its slices in one trained file: refused */
    {
        esft_st_write_tensor two[2];
        int64_t fs[3] = {8, 48, 64};
        float *whole = (float *)calloc(8 * 48 * 64, 4);
        two[0] = w[0];
        memset(&two[1], 0, sizeof two[1]);
        two[1].name = "model.layers.0.mlp.experts.gate_up_proj"; two[1].dtype = ESFT_DTYPE_F32; two[1].n_dims = 3;
        memcpy(two[1].shape, fs, sizeof fs); two[1].f32 = whole;
        CHECK_STATUS(esft_safetensors_write(both, two, 2, NULL, NULL, 0, NULL), ESFT_OK);
        CHECK_STATUS(esft_checkpoint_merge(base, both, tmp_path("fused_merged_both"), NULL, &err), ESFT_ERR_INVALID_ARGUMENT);
        CHECK(strstr(err.message, "same bytes") != NULL);
        free(whole);
    }
    /* a slice of the wrong shape */
    w[0].shape[0] = 12;
    CHECK_STATUS(esft_safetensors_write(both, w, 1, NULL, NULL, 0, NULL), ESFT_OK);
    CHECK_STATUS(esft_checkpoint_merge(base, both, tmp_path("fused_merged_bad"), NULL, &err), ESFT_ERR_SHAPE);
    CHECK(strstr(err.message, "fused") != NULL);
    for (k = 0; k < 9; k++) free(vals[k]);
    esft_checkpoint_close(&b);
    esft_expert_config_free(&cfg);
}

HARNESS_MAIN()
