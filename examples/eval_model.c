/* eval_model.c - a Hugging Face MoE checkpoint over JSONL samples: the mean
   loss, and the router statistics of the model's own routing (ESFT's token
   scores of the first MoE layer). docs/models.md explains each call.

   Build: cc -O2 -std=c99 -I. examples/eval_model.c -o eval_model -lm
   Run:   ./eval_model tests/models/olmoe tests/models/olmoe/data.jsonl */
#include <stdio.h>

#define ESFT_IMPLEMENTATION
#include "esft.h"

int main(int argc, char **argv)
{
    esft_model m;
    esft_dataset ds;
    esft_stats st;
    esft_error err;
    esft_model_run run;
    double loss = 0;
    int64_t n = 0;
    int s, l, e, status = 0;
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL_DIR DATA.jsonl\n", argv[0]);
        return 2;
    }
    if (esft_model_open(&m, argv[1], NULL, &err) != ESFT_OK) {
        fprintf(stderr, "%s: %s\n", err.file, err.message);
        return 1;
    }
    if (esft_dataset_read_jsonl(&ds, argv[2], 0, m.cfg.vocab, NULL, &err) != ESFT_OK) {
        fprintf(stderr, "%s:%ld: %s\n", err.file, err.line, err.message);
        esft_model_close(&m);
        return 1;
    }
    esft_stats_init(&st, m.cfg.n_layers, m.cfg.route.n_experts, m.cfg.route.top_k, NULL);
    memset(&run, 0, sizeof run);
    run.stats = &st; /* every token of every sample, as ESFT's scoring counted */
    for (s = 0; s < ds.n_samples && !status; s++) {
        int64_t o = ds.offset[s], scored = 0;
        double sample_loss = 0;
        run.labels = ds.labels + o;
        if (esft_model_forward(&m, ds.ids + o, (int)(ds.offset[s + 1] - o), &run, &sample_loss, &scored, &err) !=
            ESFT_OK) {
            fprintf(stderr, "sample %d: %s\n", s, err.message);
            status = 1;
        }
        loss += sample_loss; /* pooled over every scored target, as transformers pools a batch */
        n += scored;
    }
    if (!status) {
        printf("%s, %d samples: loss %.6f over %lld targets\n", esft_model_family_name(m.cfg.family),
               ds.n_samples, n ? loss / (double)n : 0.0, (long long)n);
        for (l = 0; l < m.cfg.n_layers && !m.cfg.is_moe[l]; l++) {}
        printf("layer %d token scores:", l);
        for (e = 0; e < st.n_experts; e++)
            printf(" %.3f", (double)st.count[(size_t)l * st.n_experts + e] /
                                 ((double)st.n_tokens[l] * st.top_k));
        printf("\n");
    }
    esft_stats_uninit(&st);
    esft_dataset_free(&ds);
    esft_model_close(&m);
    return status;
}
