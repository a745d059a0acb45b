/* pesc_upcycle.c - upcycle one frozen dense SwiGLU FFN into a PESC adapter MoE
   (Camelidae) and train only the router and adapters for a few AdamW steps.

   Build and run alone:
     cc -O2 -std=c99 -I. examples/pesc_upcycle.c -o pesc_upcycle -lm && ./pesc_upcycle

   The task: a dense FFN's output F must move towards a target F + delta(u),
   delta a fixed random map. The frozen FFN cannot learn it; the adapters can.
   At step 0 the crafted layer returns exactly F (W_up = 0). */
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { T = 64, D = 32, HID = 64 };

static float frand(unsigned *s) { *s = *s * 1664525u + 1013904223u; return (float)(*s >> 8) / 16777216.0f * 2.0f - 1.0f; }

/* The host model's frozen dense FFN: F = (silu(u Wg^T) * (u Wu^T)) Wd^T. */
static void dense_ffn(float *F, const float *u, const float *wg, const float *wu, const float *wd)
{
    int t, i, j;
    float a[HID];
    for (t = 0; t < T; t++) {
        for (j = 0; j < HID; j++) {
            float g = 0.0f, v = 0.0f;
            for (i = 0; i < D; i++) { g += u[t * D + i] * wg[j * D + i]; v += u[t * D + i] * wu[j * D + i]; }
            a[j] = g / (1.0f + expf(-g)) * v;
        }
        for (i = 0; i < D; i++) {
            float o = 0.0f;
            for (j = 0; j < HID; j++) o += a[j] * wd[i * HID + j];
            F[t * D + i] = o;
        }
    }
}

int main(void)
{
    static float u[T * D], F[T * D], y[T * D], target[T * D], dy[T * D], dF[T * D];
    static float wg[HID * D], wu[HID * D], wd[D * HID], mix[D * D];
    esft_pesc_config cfg = esft_pesc_config_init(D, 8, 2, 16); /* Camelidae's n 8, k 2; a small rank */
    esft_pesc_saved saved;
    esft_adamw opt;
    esft_adamw_config ocfg = esft_adamw_config_init();
    esft_error err;
    float *params, *grads, aux;
    size_t n;
    unsigned seed = 1;
    int i, j, t, step;
    char name[128];

    for (i = 0; i < HID * D; i++) { wg[i] = frand(&seed) * 0.3f; wu[i] = frand(&seed) * 0.3f; wd[i] = frand(&seed) * 0.2f; }
    for (i = 0; i < D * D; i++) mix[i] = frand(&seed) * 0.1f;
    for (i = 0; i < T * D; i++) u[i] = frand(&seed);
    dense_ffn(F, u, wg, wu, wd);
    for (t = 0; t < T; t++) /* the target: F plus a map the frozen FFN lacks */
        for (i = 0; i < D; i++) {
            float d = 0.0f;
            for (j = 0; j < D; j++) d += mix[i * D + j] * F[t * D + j];
            target[t * D + i] = F[t * D + i] + tanhf(d);
        }

    n = esft_pesc_param_count(&cfg);
    params = (float *)calloc(n, sizeof(float));
    grads = (float *)calloc(n, sizeof(float));
    ocfg.lr = 3e-3f;
    ocfg.weight_decay = 0.0f;
    if (!params || !grads || esft_pesc_init_weights(&cfg, params, 42, &err) != ESFT_OK ||
        esft_pesc_saved_init(&saved, &cfg, T, NULL, &err) != ESFT_OK ||
        esft_adamw_init(&opt, &ocfg, n, NULL, &err) != ESFT_OK) {
        fprintf(stderr, "setup failed: %s\n", err.message);
        return 1;
    }
    printf("PESC layer: D %d, n %d experts, top-%d, rank %d: %lu trainable floats, layout:\n", D, cfg.n_experts,
           cfg.top_k, cfg.rank, (unsigned long)n);
    esft_pesc_tensor_name(name, sizeof name, 0, ESFT_PESC_ROUTER, 0);
    printf("  %-66s (%d, %d)\n", name, cfg.n_experts, D);
    esft_pesc_tensor_name(name, sizeof name, 0, ESFT_PESC_DOWN, 0);
    printf("  %-66s (%d, %d)\n", name, cfg.rank, D);
    esft_pesc_tensor_name(name, sizeof name, 0, ESFT_PESC_UP, 0);
    printf("  %-66s (%d, %d)  ... expert_1 .. expert_%d\n", name, D, cfg.rank, cfg.n_experts - 1);

    for (step = 0; step <= 200; step++) {
        double loss = 0.0;
        if (esft_pesc_forward(&cfg, y, &aux, F, u, params, &saved, T, &err) != ESFT_OK) {
            fprintf(stderr, "forward: %s\n", err.message);
            return 1;
        }
        if (step == 0) printf("step 0: y == F exactly: %s\n", memcmp(y, F, sizeof y) == 0 ? "yes" : "NO");
        for (i = 0; i < T * D; i++) { /* mean squared error and its gradient */
            double e = (double)y[i] - target[i];
            loss += e * e / (T * D);
            dy[i] = (float)(2.0 * e / (T * D));
        }
        if (step % 40 == 0) printf("step %3d  mse %.5f  aux %.5f\n", step, loss, (double)aux);
        memset(grads, 0, n * sizeof(float));
        memset(dF, 0, sizeof dF); /* dF and du would flow on to earlier layers; unused here */
        if (esft_pesc_backward(&cfg, dF, NULL, grads, dy, 1.0f, &saved, F, u, params, T, &err) != ESFT_OK ||
            esft_adamw_step(&opt, params, grads, &err) != ESFT_OK) {
            fprintf(stderr, "backward/step: %s\n", err.message);
            return 1;
        }
    }
    esft_adamw_uninit(&opt);
    esft_pesc_saved_uninit(&saved);
    free(params);
    free(grads);
    return 0;
}
