/* train_experts.c - selective expert training (ESFT) on one MoE layer, from
   scratch in a few dozen lines: only the chosen experts get parameters,
   gradients and Adam state; everything else stays frozen and bit-identical.

   Build and run (nothing but a C compiler):
       cc -O2 -I. examples/train_experts.c -o train_experts -lm && ./train_experts

   The task: a "teacher" layer equals the student except experts 2 and 5,
   which differ. Training only those two experts (what ESFT's selection would
   pick here) brings the student's output to the teacher's. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define ESFT_IMPLEMENTATION
#include "esft.h"

enum { D = 32, E = 8, K = 2, F = 24, FS = 16, T = 64 };

static unsigned rng = 7;
static float rnd(void) { rng = rng * 1664525u + 1013904223u; return (float)(rng >> 8) / 8388608.0f - 1.0f; }
static float *make(size_t n, float scale)
{
    float *a = malloc(n * sizeof *a);
    size_t i;
    for (i = 0; i < n; i++) a[i] = scale * rnd();
    return a;
}

int main(void)
{
    size_t efd = (size_t)E * F * D, ws_bytes;
    float *router = make((size_t)E * D, 0.3f), *gate = make(efd, 0.2f), *up = make(efd, 0.2f);
    float *down = make(efd, 0.2f), *sg = make((size_t)FS * D, 0.2f), *su = make((size_t)FS * D, 0.2f);
    float *sd = make((size_t)FS * D, 0.2f), *x = make((size_t)T * D, 1.0f);
    float *teacher_down = malloc(efd * sizeof(float)), *target = malloc(sizeof(float) * T * D);
    float *y = malloc(sizeof(float) * T * D), *dy = malloc(sizeof(float) * T * D), *dx = malloc(sizeof(float) * T * D);
    unsigned char trainable[E] = {0, 0, 1, 0, 0, 1, 0, 0};
    esft_moe_weights w = {router, gate, up, down, sg, su, sd, NULL}, tw;
    esft_moe_config cfg = esft_moe_config_init(D, E, K, F, FS);
    esft_moe student, teacher;
    esft_adamw opt;
    esft_adamw_config ocfg = esft_adamw_config_esft();
    esft_error err;
    void *ws;
    size_t i;
    int step, e;

    /* the teacher: experts 2 and 5 have different down projections */
    memcpy(teacher_down, down, efd * sizeof(float));
    for (e = 2; e <= 5; e += 3)
        for (i = 0; i < (size_t)F * D; i++) teacher_down[e * F * D + i] += 0.2f * rnd();
    tw = w;
    tw.down = teacher_down;

    cfg.aux_alpha = 0.001f; /* ESFT's value */
    cfg.aux_mode = ESFT_AUX_BATCH;
    if (esft_moe_init(&teacher, &cfg, &tw, NULL, &err) != ESFT_OK) { fprintf(stderr, "%s\n", err.message); return 1; }
    cfg.trainable_experts = trainable; /* router and shared block stay frozen */
    if (esft_moe_init(&student, &cfg, &w, NULL, &err) != ESFT_OK) { fprintf(stderr, "%s\n", err.message); return 1; }
    esft_moe_workspace_size(&cfg, T, &ws_bytes, NULL);
    ws = malloc(ws_bytes);
    esft_moe_forward(&teacher, target, NULL, x, ws, ws_bytes, T, NULL);

    ocfg.lr = 3e-3f; /* a toy problem: ESFT's 1e-5 is for a pretrained 16B model */
    esft_adamw_init(&opt, &ocfg, student.n_params, NULL, NULL);
    printf("trainable: %d of %d experts, %lu floats; gradient %lu bytes + Adam %lu bytes\n",
           student.n_trainable_experts, E, (unsigned long)student.n_params,
           (unsigned long)esft_moe_grad_bytes(&student), (unsigned long)esft_adamw_state_bytes(&opt));
    for (step = 0; step <= 200; step++) {
        float aux;
        double loss = 0.0, norm;
        float *blocks[1];
        size_t sizes[1];
        esft_moe_forward(&student, y, &aux, x, ws, ws_bytes, T, NULL);
        for (i = 0; i < (size_t)T * D; i++) { /* L = mean squared error / 2 */
            double d = y[i] - target[i];
            loss += 0.5 * d * d / (T * D);
            dy[i] = (float)(d / (T * D));
        }
        esft_moe_zero_grad(&student);
        memset(dx, 0, sizeof(float) * T * D); /* a real model passes dx on down */
        esft_moe_backward(&student, dx, dy, x, ws, ws_bytes, T, NULL);
        blocks[0] = student.grads;
        sizes[0] = student.n_params;
        esft_clip_grad_norm(blocks, sizes, 1, 1.0f, &norm, NULL);
        esft_adamw_step(&opt, student.params, student.grads, NULL);
        if (step % 40 == 0) printf("step %3d  loss %.3e  aux %.5f  grad norm %.2e\n", step, loss, aux, norm);
    }
    esft_adamw_uninit(&opt);
    esft_moe_uninit(&student);
    esft_moe_uninit(&teacher);
    free(ws); free(router); free(gate); free(up); free(down); free(sg); free(su); free(sd); free(x);
    free(teacher_down); free(target); free(y); free(dy); free(dx);
    return 0;
}
