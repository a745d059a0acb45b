/* safetensors_tool.c - the C side of tests/oracle_safetensors.py (built by the
   script with cc; not a test by itself).

   safetensors_tool dump FILE       every tensor and metadata pair, hex-encoded:
                                    "M key value" and "T name dtype shape bytes f32bits"
   safetensors_tool write OUT       a file of every written dtype from fixed fp32
                                    values (also OUT.f32: those values, raw)
   safetensors_tool copy IN OUT     reads IN tensor by tensor, writes OUT
   safetensors_tool check FILE      exit 0 if FILE is valid, 1 (and why) if not */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define ESFT_IMPLEMENTATION
#include "esft.h"

static void hex(const void *p, size_t n)
{
    const unsigned char *b = (const unsigned char *)p;
    size_t i;
    if (n == 0) putchar('-');
    for (i = 0; i < n; i++) printf("%02x", b[i]);
}

static int fail(const esft_error *e)
{
    fprintf(stderr, "%s: %s (%s, offset %ld)\n", e->file, e->message, esft_status_string(e->status), e->offset);
    return 1;
}

static int dump(const char *path)
{
    esft_safetensors st;
    esft_error e;
    int i, d;
    if (esft_safetensors_open(&st, path, NULL, &e) != ESFT_OK) return fail(&e);
    for (i = 0; i < st.n_metadata; i++) {
        printf("M ");
        hex(st.meta_keys[i], strlen(st.meta_keys[i]));
        putchar(' ');
        hex(st.meta_values[i], strlen(st.meta_values[i]));
        putchar('\n');
    }
    for (i = 0; i < st.n_tensors; i++) {
        const esft_st_tensor *t = st.tensors + i;
        void *raw = malloc(t->n_bytes + 1);
        float *f = (float *)malloc(t->n_elements * sizeof(float) + 1);
        if (!raw || !f || esft_safetensors_read(&st, i, raw, 0, (size_t)t->n_bytes, &e) != ESFT_OK) return fail(&e);
        printf("T ");
        hex(t->name, strlen(t->name));
        printf(" %s ", esft_dtype_name(t->dtype));
        for (d = 0; d < t->n_dims; d++) printf("%s%lld", d ? "," : "", (long long)t->shape[d]);
        if (t->n_dims == 0) putchar('-');
        putchar(' ');
        hex(raw, (size_t)t->n_bytes);
        putchar(' ');
        if (esft_safetensors_read_f32(&st, i, f, &e) == ESFT_OK) {
            size_t k;
            for (k = 0; k < t->n_elements; k++) { /* fp32 bit patterns, big-endian hex */
                uint32_t u;
                memcpy(&u, f + k, 4);
                printf("%08x", (unsigned)u);
            }
            if (t->n_elements == 0) putchar('-');
        } else if (t->dtype == ESFT_DTYPE_I32 || t->dtype == ESFT_DTYPE_I64) {
            int64_t *v = (int64_t *)malloc(t->n_elements * 8 + 8);
            size_t k;
            if (!v || esft_safetensors_read_i64(&st, i, v, &e) != ESFT_OK) return fail(&e);
            for (k = 0; k < t->n_elements; k++) printf("%s%lld", k ? "," : "", (long long)v[k]);
            if (t->n_elements == 0) putchar('-');
            free(v);
        } else {
            putchar('-');
        }
        putchar('\n');
        free(raw);
        free(f);
    }
    esft_safetensors_close(&st);
    return 0;
}

/* Fixed fp32 values: specials, halfway cases of fp16/bf16, subnormals, then a
   deterministic pseudo-random tail of varied magnitudes. */
#define N_VALUES 4096
static void values(float *v)
{
    static const uint32_t special[] = {
        0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u, 0xFFC00000u, 0x7F7FFFFFu,
        0x3F800000u, 0x3F808000u, 0x3F818000u, 0x3F801000u, 0x3F803000u, 0x477FE000u, 0x477FF000u,
        0x477FEFFFu, 0x38800000u, 0x38000000u, 0x33800000u, 0x33000000u, 0x33000001u, 0x00000001u,
        0x387FC000u, 0x387FE000u, 0x7F7F8000u, 0x7F7F7FFFu, 0xC0490FDBu, 0x3EAAAAABu};
    uint32_t x = 12345u;
    size_t i, n = sizeof special / sizeof special[0];
    for (i = 0; i < N_VALUES; i++) {
        uint32_t u;
        if (i < n) u = special[i];
        else {
            x = x * 1664525u + 1013904223u;
            /* exponents 100..150 mostly (fp16 range and around it), any mantissa */
            u = (x & 0x807FFFFFu) | ((100u + (x >> 8) % 51u) << 23);
            if (i % 7 == 0) u = (u & 0xFFFF0000u) | 0x8000u; /* bf16 ties */
            if (i % 11 == 0) u = (u & 0xFFFFE000u) | 0x1000u; /* fp16 ties */
        }
        memcpy(v + i, &u, 4);
    }
}

static int write_file(const char *path)
{
    static float v[N_VALUES];
    static int32_t i32[7] = {0, 1, -1, 2147483647, -2147483647 - 1, 42, -42};
    static int64_t i64[4] = {0, -1, 9007199254740993LL, -9223372036854775807LL - 1};
    esft_st_write_tensor t[7];
    const char *keys[3] = {"format", "note", "esft_expert_config"};
    const char *vals[3] = {"pt", "written by esft \"quoted\" \\ and \xc3\xa9", "{\"experts\": {\"1\": [3]}}"};
    char side[4096];
    FILE *f;
    esft_error e;
    values(v);
    memset(t, 0, sizeof t);
    t[0].name = "values.f32"; t[0].dtype = ESFT_DTYPE_F32; t[0].n_dims = 2; t[0].shape[0] = 64; t[0].shape[1] = 64; t[0].f32 = v;
    t[1].name = "values.f16"; t[1].dtype = ESFT_DTYPE_F16; t[1].n_dims = 1; t[1].shape[0] = N_VALUES; t[1].f32 = v;
    t[2].name = "values.bf16"; t[2].dtype = ESFT_DTYPE_BF16; t[2].n_dims = 3; t[2].shape[0] = 16; t[2].shape[1] = 16; t[2].shape[2] = 16; t[2].f32 = v;
    t[3].name = "ints.i32"; t[3].dtype = ESFT_DTYPE_I32; t[3].n_dims = 1; t[3].shape[0] = 7; t[3].data = i32;
    t[4].name = "ints.i64"; t[4].dtype = ESFT_DTYPE_I64; t[4].n_dims = 2; t[4].shape[0] = 2; t[4].shape[1] = 2; t[4].data = i64;
    t[5].name = "scalar"; t[5].dtype = ESFT_DTYPE_F32; t[5].n_dims = 0; t[5].f32 = v + 7;
    t[6].name = "empty \xe2\x9c\x93"; t[6].dtype = ESFT_DTYPE_BF16; t[6].n_dims = 2; t[6].shape[0] = 0; t[6].shape[1] = 5;
    if (esft_safetensors_write(path, t, 7, keys, vals, 3, &e) != ESFT_OK) return fail(&e);
    snprintf(side, sizeof side, "%s.f32", path);
    f = fopen(side, "wb");
    if (!f || fwrite(v, 4, N_VALUES, f) != N_VALUES || fclose(f) != 0) return 1;
    return 0;
}

static int copy_file(const char *in, const char *out)
{
    esft_safetensors st;
    esft_st_write_tensor *t;
    void **data;
    esft_error e;
    int i, rc;
    if (esft_safetensors_open(&st, in, NULL, &e) != ESFT_OK) return fail(&e);
    t = (esft_st_write_tensor *)calloc((size_t)st.n_tensors + 1, sizeof *t);
    data = (void **)calloc((size_t)st.n_tensors + 1, sizeof *data);
    for (i = 0; i < st.n_tensors; i++) {
        const esft_st_tensor *s = st.tensors + i;
        data[i] = malloc(s->n_bytes + 1);
        if (esft_safetensors_read(&st, i, data[i], 0, (size_t)s->n_bytes, &e) != ESFT_OK) return fail(&e);
        t[i].name = s->name;
        t[i].dtype = s->dtype;
        t[i].n_dims = s->n_dims;
        memcpy(t[i].shape, s->shape, sizeof s->shape);
        t[i].data = data[i];
    }
    rc = esft_safetensors_write(out, t, st.n_tensors, st.meta_keys, st.meta_values, st.n_metadata, &e) == ESFT_OK ? 0 : fail(&e);
    for (i = 0; i < st.n_tensors; i++) free(data[i]);
    free(data);
    free(t);
    esft_safetensors_close(&st);
    return rc;
}

static int check(const char *path)
{
    esft_safetensors st;
    esft_error e;
    if (esft_safetensors_open(&st, path, NULL, &e) != ESFT_OK) return fail(&e);
    esft_safetensors_close(&st);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "dump") == 0) return dump(argv[2]);
    if (argc == 3 && strcmp(argv[1], "write") == 0) return write_file(argv[2]);
    if (argc == 4 && strcmp(argv[1], "copy") == 0) return copy_file(argv[2], argv[3]);
    if (argc == 3 && strcmp(argv[1], "check") == 0) return check(argv[2]);
    fprintf(stderr, "usage: safetensors_tool dump FILE | write OUT | copy IN OUT | check FILE\n");
    return 2;
}
