// LDLIBS: -lopenblas -lm
/* bench_gemm.c - esft's own CPU GEMM (esft__sgemm) against OpenBLAS cblas_sgemm
   at the shapes the MoE layer runs, and a square 2048, one thread and all
   cores, in the same run.

   Build (bench/run_all.sh does this; needs libopenblas-dev):
     cc -O3 -march=native -std=c99 -fopenmp -I. bench/bench_gemm.c -o build/bench/bench_gemm -lopenblas -lm
   Run:
     build/bench/bench_gemm [--reps N] [--quick]
   CFLAGS: -fopenmp

   Shapes (DeepSeek-V2-Lite layer: D 2048, F 1408 per routed expert, FS 2816
   shared; M = tokens routed to one expert, 48 on average at T 512, top-6 of 64):
     fwd   x W^T      (M, F) = (M, D) (F, D)^T     trans_b
     bwd   dY W       (M, D) = (M, F) (F, D)       no transpose
     dW    dY^T X     (F, D) = (M, F)^T (M, D)     trans_a
   Each row is validated against OpenBLAS first (max |diff| / max |ref|, exit 1
   above 1e-4), then timed: the median of --reps (default 5) measurements, each
   a loop of calls lasting at least 30 ms. esft and OpenBLAS are timed in turn
   with a pause between, so one library's idle spinning threads do not slow the
   other. "ratio" is esft / OpenBLAS throughput. The bottom line sums FLOPs and
   times over the MoE rows (the square one left out). */
#define _POSIX_C_SOURCE 200809L
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct shape {
    const char *what;
    int M, N, K, ta, tb;
} shape;

static const shape shapes[] = {
    {"fwd gate/up M=10", 10, 1408, 2048, 0, 1},
    {"fwd gate/up M=48", 48, 1408, 2048, 0, 1},
    {"fwd gate/up M=600", 600, 1408, 2048, 0, 1},
    {"fwd down M=48", 48, 2048, 1408, 0, 1},
    {"bwd dX(down) M=48", 48, 1408, 2048, 0, 0},
    {"bwd dX(gate) M=48", 48, 2048, 1408, 0, 0},
    {"dW gate/up M=48", 1408, 2048, 48, 1, 0},
    {"dW down M=48", 2048, 1408, 48, 1, 0},
    {"dW gate/up M=600", 1408, 2048, 600, 1, 0},
    {"shared fwd gate/up", 512, 2816, 2048, 0, 1},
    {"shared fwd down", 512, 2048, 2816, 0, 1},
    {"shared bwd dX", 512, 2048, 2816, 0, 0},
    {"shared dW", 2816, 2048, 512, 1, 0},
    {"square 2048", 2048, 2048, 2048, 0, 0},
};

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void pause_ms(int ms)
{
    struct timespec t;
    t.tv_sec = 0;
    t.tv_nsec = (long)ms * 1000000L;
    nanosleep(&t, NULL);
}

static void fill(float *x, size_t n, unsigned seed)
{
    size_t i;
    for (i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)((seed >> 8) / 8388608.0 - 1.0);
    }
}

typedef struct operands {
    const shape *s;
    float *A, *B, *C;
    int lda, ldb;
} operands;

static void call(const operands *o, int blas)
{
    const shape *s = o->s;
    if (blas)
        cblas_sgemm(CblasRowMajor, s->ta ? CblasTrans : CblasNoTrans,
                    s->tb ? CblasTrans : CblasNoTrans, s->M, s->N, s->K, 1.0f, o->A, o->lda,
                    o->B, o->ldb, 0.0f, o->C, s->N);
    else
        esft__sgemm(s->ta, s->tb, s->M, s->N, s->K, 1.0f, o->A, o->lda, o->B, o->ldb, 0.0f,
                    o->C, s->N);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median seconds per call over reps measurements of >= 30 ms each. */
static double time_calls(const operands *o, int blas, int reps)
{
    double t[64], t0;
    int r, n = 1, i;
    call(o, blas); /* warm-up: caches, scratch, thread pool */
    for (;;) {
        t0 = now();
        for (i = 0; i < n; i++) call(o, blas);
        if (now() - t0 >= 0.03) break;
        n *= 2;
    }
    for (r = 0; r < reps; r++) {
        t0 = now();
        for (i = 0; i < n; i++) call(o, blas);
        t[r] = (now() - t0) / n;
    }
    qsort(t, (size_t)reps, sizeof t[0], cmp_double);
    return t[reps / 2];
}

int main(int argc, char **argv)
{
    int reps = 5, quick = 0, a, s, all, n_shapes = (int)(sizeof shapes / sizeof shapes[0]);
    double sum_flop = 0, sum_t[2][2] = {{0, 0}, {0, 0}}; /* [threads][blas] */
    for (a = 1; a < argc; a++) {
        if (!strcmp(argv[a], "--reps") && a + 1 < argc) reps = atoi(argv[++a]);
        else if (!strcmp(argv[a], "--quick")) quick = 1;
        else {
            fprintf(stderr, "usage: %s [--reps N] [--quick]\n", argv[0]);
            return 2;
        }
    }
    if (reps < 1) reps = 1;
    if (reps > 64) reps = 64;
    if (quick) reps = 1;
    esft_set_num_threads(0);
    all = esft_get_num_threads();
    printf("esft__sgemm vs OpenBLAS cblas_sgemm; fp32, row-major, alpha 1, beta 0; "
           "GFLOP/s, median of %d; all cores = %d threads\n\n",
           reps, all);
    /* which OpenBLAS kernel ran: OPENBLAS_CORETYPE can pin an older one (bench/run_all.sh unsets it) */
    printf("OpenBLAS: core %s; %s\n", openblas_get_corename(), openblas_get_config());
    printf("%-20s %5s %5s %5s %2s | %8s %8s %6s | %8s %8s %6s\n", "shape", "M", "N", "K", "op",
           "esft 1t", "blas 1t", "ratio", "esft all", "blas all", "ratio");
    for (s = 0; s < n_shapes; s++) {
        const shape *sh = &shapes[s];
        operands o;
        size_t na = (size_t)sh->M * sh->K, nb = (size_t)sh->K * sh->N, nc = (size_t)sh->M * sh->N, i;
        float *ref;
        double flop = 2.0 * sh->M * sh->N * sh->K, maxdiff = 0, maxref = 0, g[2][2];
        int th, blas;
        if (quick && s != 1 && s != 9) continue;
        o.s = sh;
        o.A = (float *)malloc(na * sizeof(float));
        o.B = (float *)malloc(nb * sizeof(float));
        o.C = (float *)malloc(nc * sizeof(float));
        ref = (float *)malloc(nc * sizeof(float));
        if (!o.A || !o.B || !o.C || !ref) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        o.lda = sh->ta ? sh->M : sh->K;
        o.ldb = sh->tb ? sh->K : sh->N;
        fill(o.A, na, 1u + (unsigned)s);
        fill(o.B, nb, 100u + (unsigned)s);
        call(&o, 1);
        memcpy(ref, o.C, nc * sizeof(float));
        call(&o, 0);
        for (i = 0; i < nc; i++) {
            double d = o.C[i] - ref[i], r = ref[i];
            if (d < 0) d = -d;
            if (r < 0) r = -r;
            if (d > maxdiff) maxdiff = d;
            if (r > maxref) maxref = r;
        }
        if (!(maxdiff <= 1e-4 * maxref)) {
            printf("FAIL %s: max |esft - blas| = %g, max |blas| = %g\n", sh->what, maxdiff, maxref);
            return 1;
        }
        for (th = 0; th < 2; th++) {
            int n = th ? all : 1;
            esft_set_num_threads(n);
            openblas_set_num_threads(n);
            for (blas = 0; blas < 2; blas++) {
                double t;
                pause_ms(200);
                t = time_calls(&o, blas, reps);
                g[th][blas] = flop / t * 1e-9;
                if (s != n_shapes - 1) sum_t[th][blas] += t;
            }
        }
        if (s != n_shapes - 1) sum_flop += flop;
        printf("%-20s %5d %5d %5d %s%s | %8.1f %8.1f %6.2f | %8.1f %8.1f %6.2f\n", sh->what,
               sh->M, sh->N, sh->K, sh->ta ? "T" : "N", sh->tb ? "T" : "N", g[0][0], g[0][1],
               g[0][0] / g[0][1], g[1][0], g[1][1], g[1][0] / g[1][1]);
        fflush(stdout);
        free(o.A), free(o.B), free(o.C), free(ref);
    }
    if (sum_flop > 0)
        printf("%-20s %20s | %8.1f %8.1f %6.2f | %8.1f %8.1f %6.2f\n", "MoE rows together", "",
               sum_flop / sum_t[0][0] * 1e-9, sum_flop / sum_t[0][1] * 1e-9,
               sum_t[0][1] / sum_t[0][0], sum_flop / sum_t[1][0] * 1e-9,
               sum_flop / sum_t[1][1] * 1e-9, sum_t[1][1] / sum_t[1][0]);
    esft_set_num_threads(0);
    esft_release_thread_scratch();
    return 0;
}
