/* oracle_moe_driver.c - runs one small MoE layer forward + backward and writes
   its inputs and results to a file for tests/oracle_moe.py, which recomputes
   them independently with numpy (float64, dense over all experts). Built and
   run by that script; not a test on its own.

   usage: oracle_moe_driver D E K F FS T renorm alpha aux_mode seq_len seed
                            train_router train_shared trainable(0/1 string) out.bin
   out.bin, float32 unless noted, in this order:
     x (T,D)  dy (T,D)  router (E,D)  gate (E,F,D)  up (E,F,D)  down (E,D,F)
     shared gate (FS,D)  shared up (FS,D)  shared down (D,FS)
     y (T,D)  aux (1)  ids (T,K) int32  dx (T,D)  N (1) int32  grads (N) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define ESFT_IMPLEMENTATION
#include "esft.h"

static uint32_t rng_state;
static float rnd(void) /* xorshift32 -> [-1, 1) */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return (float)((rng_state >> 8) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

static float *make(size_t n, float scale)
{
    float *a = (float *)malloc(n ? n * sizeof(float) : 1);
    size_t i;
    for (i = 0; i < n; i++) a[i] = scale * rnd();
    return a;
}

int main(int argc, char **argv)
{
    int D, E, K, F, FS, T, e;
    esft_moe_config c;
    esft_moe_weights w;
    esft_moe m;
    esft_error err;
    float *x, *dy, *y, *dx, aux = 0.0f;
    int32_t *ids;
    void *ws;
    size_t bytes;
    FILE *out;
    unsigned char train[256];
    if (argc != 16) { fprintf(stderr, "usage: see the top of oracle_moe_driver.c\n"); return 2; }
    D = atoi(argv[1]); E = atoi(argv[2]); K = atoi(argv[3]); F = atoi(argv[4]); FS = atoi(argv[5]);
    T = atoi(argv[6]);
    c = esft_moe_config_init(D, E, K, F, FS);
    c.route.renormalize = atoi(argv[7]);
    c.aux_alpha = (float)atof(argv[8]);
    c.aux_mode = atoi(argv[9]) ? ESFT_AUX_SEQUENCE : ESFT_AUX_BATCH;
    c.aux_seq_len = atoi(argv[10]);
    rng_state = (uint32_t)strtoul(argv[11], NULL, 10);
    c.train_router = atoi(argv[12]);
    c.train_shared = atoi(argv[13]);
    if (E > 256 || (int)strlen(argv[14]) != E) { fprintf(stderr, "trainable string must have E chars\n"); return 2; }
    for (e = 0; e < E; e++) train[e] = argv[14][e] == '1';
    c.trainable_experts = train;
    x = make((size_t)T * D, 1.0f);
    dy = make((size_t)T * D, 1.0f);
    w.router = make((size_t)E * D, 0.5f);
    w.gate = make((size_t)E * F * D, 0.4f);
    w.up = make((size_t)E * F * D, 0.4f);
    w.down = make((size_t)E * D * F, 0.4f);
    w.shared_gate = make((size_t)FS * D, 0.4f);
    w.shared_up = make((size_t)FS * D, 0.4f);
    w.shared_down = make((size_t)D * FS, 0.4f);
    y = make((size_t)T * D, 0.0f);
    dx = make((size_t)T * D, 0.0f);
    if (esft_moe_init(&m, &c, &w, NULL, &err) != ESFT_OK ||
        esft_moe_workspace_size(&c, T, &bytes, &err) != ESFT_OK) {
        fprintf(stderr, "init: %s\n", err.message);
        return 1;
    }
    ws = malloc(bytes);
    ids = (int32_t *)malloc((size_t)T * K * sizeof(int32_t));
    if (esft_moe_forward(&m, y, &aux, x, ws, bytes, T, &err) != ESFT_OK ||
        esft_moe_backward(&m, dx, dy, x, ws, bytes, T, &err) != ESFT_OK) {
        fprintf(stderr, "forward/backward: %s\n", err.message);
        return 1;
    }
    { /* the ids, from the routing the layer saved: recompute them the public way */
        float *logits = make((size_t)T * E, 0.0f), *wts = make((size_t)T * K, 0.0f);
        int t, d;
        for (t = 0; t < T; t++)
            for (e = 0; e < E; e++) {
                float s = 0.0f;
                for (d = 0; d < D; d++) s += x[t * D + d] * w.router[e * D + d];
                logits[t * E + e] = s;
            }
        esft_route(&c.route, ids, wts, NULL, logits, T, NULL);
        free(logits); free(wts);
    }
    out = fopen(argv[15], "wb");
    if (!out) { perror(argv[15]); return 1; }
    fwrite(x, 4, (size_t)T * D, out); fwrite(dy, 4, (size_t)T * D, out);
    fwrite(w.router, 4, (size_t)E * D, out); fwrite(w.gate, 4, (size_t)E * F * D, out);
    fwrite(w.up, 4, (size_t)E * F * D, out); fwrite(w.down, 4, (size_t)E * D * F, out);
    fwrite(w.shared_gate, 4, (size_t)FS * D, out); fwrite(w.shared_up, 4, (size_t)FS * D, out);
    fwrite(w.shared_down, 4, (size_t)D * FS, out);
    fwrite(y, 4, (size_t)T * D, out); fwrite(&aux, 4, 1, out); fwrite(ids, 4, (size_t)T * K, out);
    fwrite(dx, 4, (size_t)T * D, out);
    { int32_t n = (int32_t)m.n_params; fwrite(&n, 4, 1, out); }
    fwrite(m.grads, 4, m.n_params, out);
    if (fclose(out) != 0) { perror(argv[15]); return 1; }
    esft_moe_uninit(&m);
    free(x); free(dy); free(y); free(dx); free(ws); free(ids);
    free((void *)w.router); free((void *)w.gate); free((void *)w.up); free((void *)w.down);
    free((void *)w.shared_gate); free((void *)w.shared_up); free((void *)w.shared_down);
    return 0;
}
