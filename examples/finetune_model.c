/* finetune_model.c - the training loop of a Hugging Face checkpoint in one
   page: full fine-tuning (fft) or LoRA on the attention projections, the
   gradient of each step's mean loss accumulated sample by sample, clipped,
   one AdamW step; then the result saved (fft: a safetensors file that
   `esft merge` puts back; lora: a PEFT adapter directory).

   Build and run (nothing but a C compiler), e.g. on a test checkpoint:
       cc -O2 -I. examples/finetune_model.c -o finetune_model -lm
       ./finetune_model tests/models/llama lora 20 out_adapter
       ./finetune_model tests/models/olmoe fft 20 out.safetensors

   esft train (examples/esft_cli.c) is the same loop with batching by tokens,
   schedules, logging and resume. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define ESFT_IMPLEMENTATION
#include "esft.h"

static int fail(const char *what, const esft_error *err)
{
    fprintf(stderr, "finetune_model: %s: %s\n", what, err->message);
    return 1;
}

/* The mean loss of every sample, and its gradient accumulated into tr->grads. */
static esft_status epoch_gradient(const esft_model *m, esft_model_trainable *tr, const esft_dataset *ds,
                                  int64_t scored, double *mean, esft_error *err)
{
    double sum = 0.0;
    int s;
    memset(tr->grads, 0, tr->n_params * sizeof(float));
    for (s = 0; s < ds->n_samples; s++) {
        double loss = 0.0;
        int64_t o = ds->offset[s];
        esft_status st = esft_model_forward_backward(m, tr, ds->ids + o, ds->labels + o, (int)(ds->offset[s + 1] - o),
                                                     (float)(1.0 / (double)scored), &loss, NULL, err);
        if (st != ESFT_OK) return st;
        sum += loss;
    }
    *mean = sum / (double)scored;
    return ESFT_OK;
}

int main(int argc, char **argv)
{
    esft_model m;
    esft_dataset ds;
    esft_model_trainable tr;
    esft_train_spec spec;
    esft_adamw opt;
    esft_adamw_config ac = esft_adamw_config_esft();
    esft_error err;
    char data[4200];
    int64_t scored = 0, t;
    int step, steps;
    double loss = 0.0, norm = 0.0;
    float *g;
    if (argc != 5 || (strcmp(argv[2], "fft") != 0 && strcmp(argv[2], "lora") != 0) || atoi(argv[3]) < 1) {
        fprintf(stderr, "usage: finetune_model MODEL_DIR fft|lora STEPS OUT\n"
                        "  trains on MODEL_DIR/data.jsonl; OUT: a .safetensors file (fft) or a directory (lora)\n");
        return 2;
    }
    steps = atoi(argv[3]);
    snprintf(data, sizeof data, "%s/data.jsonl", argv[1]);
    if (esft_model_open(&m, argv[1], NULL, &err) != ESFT_OK) return fail(argv[1], &err);
    if (esft_dataset_read_jsonl(&ds, data, 0, m.cfg.vocab, NULL, &err) != ESFT_OK) return fail(data, &err);
    for (step = 0; step < ds.n_samples; step++) /* position t predicts labels[t + 1] of its own sample */
        for (t = ds.offset[step] + 1; t < ds.offset[step + 1]; t++) scored += ds.labels[t] != -100;
    memset(&spec, 0, sizeof spec);
    spec.method = strcmp(argv[2], "fft") == 0 ? ESFT_TRAIN_FFT : ESFT_TRAIN_LORA;
    spec.lora_rank = 8;
    spec.lora_alpha = 16.0f;
    spec.lora_targets = ESFT_LORA_ATTN;
    spec.seed = 1;
    if (esft_model_trainable_init_spec(&tr, &m, &spec, NULL, &err) != ESFT_OK) return fail("trainable set", &err);
    ac.lr = 1e-3f; /* a toy run: ESFT's 1e-5 is for real models */
    if (esft_adamw_init(&opt, &ac, tr.n_params, NULL, &err) != ESFT_OK) return fail("AdamW", &err);
    printf("%s: %s, %zu trainable parameters (%d tensors, %d adapters), optimizer %zu bytes\n", argv[1], argv[2],
           tr.n_params, tr.n_modules + 3 * (tr.n_trained + tr.n_shared), tr.n_lora, esft_adamw_state_bytes(&opt));
    for (step = 1; step <= steps; step++) {
        g = tr.grads;
        if (epoch_gradient(&m, &tr, &ds, scored, &loss, &err) != ESFT_OK) return fail("forward-backward", &err);
        if (esft_clip_grad_norm(&g, &tr.n_params, 1, 1.0f, &norm, &err) != ESFT_OK ||
            esft_adamw_step(&opt, tr.params, tr.grads, &err) != ESFT_OK)
            return fail("optimizer", &err);
        if (step == 1 || step == steps) printf("step %d: loss %.4f, gradient norm %.3f\n", step, loss, norm);
    }
    if ((spec.method == ESFT_TRAIN_FFT ? esft_model_trainable_save(&tr, &m, NULL, argv[4], &err)
                                       : esft_model_lora_save(&tr, argv[4], &err)) != ESFT_OK)
        return fail(argv[4], &err);
    printf("-> %s\n", argv[4]);
    esft_adamw_uninit(&opt);
    esft_model_trainable_uninit(&tr);
    esft_dataset_free(&ds);
    esft_model_close(&m);
    return 0;
}
