/* fuzz_safetensors.c - libFuzzer target for the safetensors header parser
   (esft_safetensors_open_memory: length field, UTF-8, JSON, dtypes, shapes,
   offsets, metadata) and the tensor-name parser. The input is a whole file.
   Beyond "no crash, no leak, no UB" it checks what a successful open promises
   and aborts when one promise breaks.

   libFuzzer (tests/fuzz.sh, `make fuzz`):
       clang -g -O1 -fsanitize=fuzzer,address,undefined -DESFT_LIBFUZZER -I. tests/fuzz_safetensors.c -lm
   Plain replay of files (any compiler):
       cc -I. tests/fuzz_safetensors.c -lm && ./a.out tests/corpus/safetensors/FILE... */
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) { fprintf(stderr, "invariant failed: %s (%s:%d)\n", #c, __FILE__, __LINE__); abort(); } } while (0)

/* A name that parses as an MoE tensor formats back to itself. */
static void check_name(const char *name)
{
    esft_tensor_name tn;
    char back[512];
    if (!esft_tensor_name_parse(name, &tn)) {
        REQUIRE(tn.part == ESFT_PART_NONE && tn.layer == -1 && tn.expert == -1);
        return;
    }
    REQUIRE(tn.layer >= 0 && tn.part > ESFT_PART_NONE && tn.part < ESFT_PART_COUNT);
    REQUIRE(esft_tensor_name_format(back, sizeof back, tn.family, tn.part, tn.layer, tn.expert) == ESFT_OK);
    REQUIRE(strcmp(back, name) == 0);
}

/* The layout an open file promises: tensors tile the data area in order, sizes
   agree with shapes, names are unique and found, every tensor reads. */
static void check_file(const esft_safetensors *st, size_t size)
{
    uint64_t at = 8 + st->header_size;
    int i;
    REQUIRE(st->file_size == size && at <= size);
    for (i = 0; i < st->n_tensors; i++) {
        const esft_st_tensor *t = st->tensors + i;
        uint64_t numel = 1;
        int d;
        REQUIRE(t->offset == at);
        REQUIRE(t->n_dims >= 0 && t->n_dims <= ESFT_ST_MAX_DIMS);
        for (d = 0; d < t->n_dims; d++) { REQUIRE(t->shape[d] >= 0); numel *= (uint64_t)t->shape[d]; }
        REQUIRE(numel == t->n_elements && t->n_bytes == numel * esft_dtype_size(t->dtype));
        REQUIRE(esft_safetensors_find(st, t->name) == i);
        at += t->n_bytes;
        if (t->dtype == ESFT_DTYPE_F32 || t->dtype == ESFT_DTYPE_F16 || t->dtype == ESFT_DTYPE_BF16) {
            float *f = (float *)malloc((size_t)t->n_elements * sizeof(float) + 1);
            REQUIRE(f && esft_safetensors_read_f32(st, i, f, NULL) == ESFT_OK);
            free(f);
        } else if (t->dtype == ESFT_DTYPE_I32 || t->dtype == ESFT_DTYPE_I64) {
            int64_t *v = (int64_t *)malloc((size_t)t->n_elements * sizeof(int64_t) + 1);
            REQUIRE(v && esft_safetensors_read_i64(st, i, v, NULL) == ESFT_OK);
            free(v);
        }
        check_name(t->name);
    }
    REQUIRE(at == size);
    for (i = 0; i < st->n_metadata; i++) REQUIRE(esft_safetensors_metadata(st, st->meta_keys[i]) == st->meta_values[i]);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    esft_safetensors st;
    esft_expert_config cfg;
    esft_error err;
    char *text;
    if (esft_safetensors_open_memory(&st, data, size, "fuzz", NULL, &err) == ESFT_OK) {
        check_file(&st, size);
        if (esft_checkpoint_read_config(&st, &cfg, NULL) == ESFT_OK) esft_expert_config_free(&cfg);
        esft_safetensors_close(&st);
    } else {
        REQUIRE(err.message[0] && strcmp(err.file, "fuzz") == 0);
        REQUIRE(st.tensors == NULL && st.n_tensors == 0);
    }
    /* the input as a tensor name too */
    text = (char *)malloc(size + 1);
    REQUIRE(text != NULL);
    memcpy(text, data, size);
    text[size] = 0;
    check_name(text);
    free(text);
    return 0;
}

#include "fuzz_main.h"
