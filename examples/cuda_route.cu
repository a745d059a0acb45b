/* cuda_route.cu - route tokens on the GPU and count expert use, with esft_backend_cuda().

   Build:  nvcc -I. examples/cuda_route.cu esft_cuda.cu -lcublas -o cuda_route
   (or `make cuda`, which puts it in build/examples/cuda_route).
   Without a GPU it prints the reason and exits 0.

   The pattern: get the backend, put the inputs in its memory (alloc + upload),
   call the same esft_*_with functions as on the CPU, bring results back. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ESFT_IMPLEMENTATION
#include "esft.h" /* -I. from the repository root, or next to a copy of esft.h */

int main(void)
{
    enum { T = 4096 };
    esft_error err;
    const esft_backend *gpu = esft_backend_cuda(&err);
    esft_route_config cfg = esft_route_config_deepseek_v2_lite(); /* E 64, K 6 */
    int E = cfg.n_experts, K = cfg.top_k, t, e, busiest = 0;
    float *logits = (float *)malloc((size_t)T * E * sizeof(float));
    int32_t ids[6];
    float w[6];
    uint64_t count[64];
    void *d_logits = NULL, *d_ids = NULL, *d_w = NULL, *d_count = NULL;
    unsigned seed = 12345;
    esft_status s;

    if (!gpu) {
        printf("%s\n", err.message); /* "no CUDA device: ..." */
        free(logits);
        return 0;
    }
    memset(&err, 0, sizeof err); /* memory entries report by status only */
    for (t = 0; t < T * E; t++) { /* made-up router logits: a small LCG */
        seed = seed * 1664525u + 1013904223u;
        logits[t] = (float)(seed >> 8) / 16777216.0f * 8.0f - 4.0f + (t % E == 7 ? 1.5f : 0.0f);
    }
    s = gpu->alloc(gpu->context, sizeof(float) * T * E, &d_logits);
    if (s == ESFT_OK) s = gpu->alloc(gpu->context, sizeof(int32_t) * T * K, &d_ids);
    if (s == ESFT_OK) s = gpu->alloc(gpu->context, sizeof(float) * T * K, &d_w);
    if (s == ESFT_OK) s = gpu->alloc(gpu->context, sizeof count * 2, &d_count);
    if (s == ESFT_OK) s = gpu->upload(gpu->context, d_logits, logits, sizeof(float) * T * E);
    if (s == ESFT_OK) {
        static const uint64_t zeros[128] = {0};
        s = gpu->upload(gpu->context, d_count, zeros, sizeof zeros);
    }
    if (s == ESFT_OK)
        s = esft_route_with(gpu, &cfg, (int32_t *)d_ids, (float *)d_w, NULL, (const float *)d_logits, T, &err);
    if (s == ESFT_OK) /* histogram of the choices, on the GPU too */
        s = gpu->stats_accumulate(gpu->context, (uint64_t *)d_count, (uint64_t *)d_count + E,
                                  (const int32_t *)d_ids, (const float *)d_w, NULL, T, K, E, &err);
    if (s == ESFT_OK) s = gpu->download(gpu->context, ids, d_ids, sizeof ids);
    if (s == ESFT_OK) s = gpu->download(gpu->context, w, d_w, sizeof w);
    if (s == ESFT_OK) s = gpu->download(gpu->context, count, d_count, sizeof count);
    if (s == ESFT_OK) {
        printf("token 0 -> experts");
        for (e = 0; e < K; e++) printf(" %d (%.3f)", ids[e], w[e]);
        for (e = 1; e < E; e++) busiest = count[e] > count[busiest] ? e : busiest;
        printf("\nbusiest expert of %d tokens: %d, chosen %llu times (uniform would be %d)\n", T, busiest,
               (unsigned long long)count[busiest], T * K / E);
    } else {
        fprintf(stderr, "cuda_route: %s: %s\n", esft_status_string(s), err.message);
    }
    gpu->free(gpu->context, d_logits);
    gpu->free(gpu->context, d_ids);
    gpu->free(gpu->context, d_w);
    gpu->free(gpu->context, d_count);
    free(logits);
    return s == ESFT_OK ? 0 : 1;
}
