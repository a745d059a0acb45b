/* extract_experts.c - the ESFT checkpoint round trip with esft.h:
   take the experts an expert config selects out of a Hugging Face checkpoint,
   load them as fp32 (where your training loop would update them), save only
   those trained experts, and merge them back into a new full checkpoint.

   Build:  cc -std=c99 -O2 -I. examples/extract_experts.c -o extract_experts -lm
   Run:    ./extract_experts MODEL_DIR config.json WORK_DIR
           (MODEL_DIR: model.safetensors.index.json + shards, or one .safetensors;
            config.json: {"experts": {"1": [3, 17], ...}, "shared_experts": false,
            "non_expert_modules": false}, e.g. from `esft select`)
   Writes WORK_DIR/experts.safetensors, WORK_DIR/trained.safetensors and the
   merged checkpoint WORK_DIR/merged/ (WORK_DIR must exist). */
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, const esft_error *err)
{
    fprintf(stderr, "%s: %s: %s (%s)\n", what, err->file, err->message, esft_status_string(err->status));
    return 1;
}

int main(int argc, char **argv)
{
    char experts[4096], trained[4096], merged[4096];
    esft_expert_config cfg;
    esft_safetensors st;
    esft_st_write_tensor *w;
    float **values;
    esft_error err;
    int i, rc = 0;
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL_DIR config.json WORK_DIR\n", argv[0]);
        return 2;
    }
    snprintf(experts, sizeof experts, "%s/experts.safetensors", argv[3]);
    snprintf(trained, sizeof trained, "%s/trained.safetensors", argv[3]);
    snprintf(merged, sizeof merged, "%s/merged", argv[3]);

    /* 1. the selected experts, bytes unchanged, the config in the metadata */
    if (esft_expert_config_read(argv[2], &cfg, &err) != ESFT_OK) return fail("config", &err);
    if (esft_checkpoint_extract(argv[1], &cfg, experts, NULL, &err) != ESFT_OK) return fail("extract", &err);

    /* 2. as fp32: what an optimizer updates (bf16 in the file, fp32 master weights) */
    if (esft_safetensors_open(&st, experts, NULL, &err) != ESFT_OK) return fail("open", &err);
    w = (esft_st_write_tensor *)calloc((size_t)st.n_tensors, sizeof *w);
    values = (float **)calloc((size_t)st.n_tensors, sizeof *values);
    for (i = 0; i < st.n_tensors && w && values; i++) {
        const esft_st_tensor *t = st.tensors + i;
        values[i] = (float *)malloc(t->n_elements * sizeof(float) + 1);
        if (!values[i] || esft_safetensors_read_f32(&st, i, values[i], &err) != ESFT_OK) { rc = fail("read", &err); break; }
        /* ... your training steps update values[i] here ... */
        w[i].name = t->name;
        w[i].dtype = t->dtype; /* written back in the checkpoint's dtype, rounded to nearest even */
        w[i].n_dims = t->n_dims;
        memcpy(w[i].shape, t->shape, sizeof w[i].shape);
        w[i].f32 = values[i];
    }
    printf("%d tensors of %d experts in %s\n", st.n_tensors, esft_expert_config_count(&cfg), experts);

    /* 3. only the trained tensors, 4. merged into a new checkpoint (shards + index) */
    if (rc == 0 && esft_checkpoint_save_trained(trained, &cfg, w, st.n_tensors, &err) != ESFT_OK) rc = fail("save", &err);
    if (rc == 0 && esft_checkpoint_merge(argv[1], trained, merged, NULL, &err) != ESFT_OK) rc = fail("merge", &err);
    if (rc == 0) printf("merged checkpoint in %s\n", merged);
    for (i = 0; values && i < st.n_tensors; i++) free(values[i]);
    free(values);
    free(w);
    esft_safetensors_close(&st);
    esft_expert_config_free(&cfg);
    return rc;
}
