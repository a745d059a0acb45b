/* test_gemm.c - the CPU GEMM under the MoE layer (esft__sgemm, esft__sgemm_ws)
   against a double-precision reference: the four transpose combinations, odd
   sizes that cross every tile and cache-block edge, strides wider than the
   matrices, alpha/beta cases (beta 0 ignores NaN in C), degenerate sizes, the
   fallback when scratch cannot be allocated, and the same bits for any thread
   count. Speed is in bench/bench_gemm.c, not here.
   Build: cc -std=c99 -O2 -I. tests/test_gemm.c -lm (make does it, with -fopenmp
   when the compiler has it). */
#include <float.h>
#include <stdlib.h>

/* An allocator that can be told to fail, to reach the no-scratch fallback. */
static int fail_alloc;
static void *test_malloc(size_t n) { return fail_alloc ? NULL : malloc(n); }

#define ESFT_MALLOC(n) test_malloc(n)
#define ESFT_REALLOC(p, n) realloc(p, n)
#define ESFT_FREE(p) free(p)

#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"
#include "harness.h"

static unsigned rng_state;
static float uniform(void) /* in [-1, 1) */
{
    rng_state = rng_state * 1664525u + 1013904223u;
    return (float)((rng_state >> 8) / 8388608.0 - 1.0);
}

/* A test problem: op(A) (M, K), op(B) (K, N), C (M, N), each stored with `pad`
   extra columns that must never change. */
typedef struct problem {
    int ta, tb, M, N, K, lda, ldb, ldc;
    float *A, *B, *C, *C0;
} problem;

static void problem_make(problem *p, int ta, int tb, int M, int N, int K, int pad,
                         unsigned seed)
{
    size_t i, na, nb, nc;
    p->ta = ta, p->tb = tb, p->M = M, p->N = N, p->K = K;
    p->lda = (ta ? M : K) + pad;
    p->ldb = (tb ? K : N) + pad;
    p->ldc = N + pad;
    na = (size_t)(ta ? K : M) * p->lda;
    nb = (size_t)(tb ? N : K) * p->ldb;
    nc = (size_t)M * p->ldc;
    p->A = (float *)malloc((na + 1) * sizeof(float));
    p->B = (float *)malloc((nb + 1) * sizeof(float));
    p->C = (float *)malloc((nc + 1) * sizeof(float));
    p->C0 = (float *)malloc((nc + 1) * sizeof(float));
    rng_state = seed;
    for (i = 0; i < na; i++) p->A[i] = uniform();
    for (i = 0; i < nb; i++) p->B[i] = uniform();
    for (i = 0; i < nc; i++) p->C0[i] = uniform();
    memcpy(p->C, p->C0, nc * sizeof(float));
}

static void problem_free(problem *p)
{
    free(p->A), free(p->B), free(p->C), free(p->C0);
}

static double a_at(const problem *p, int i, int k)
{
    return p->ta ? p->A[(size_t)k * p->lda + i] : p->A[(size_t)i * p->lda + k];
}

static double b_at(const problem *p, int k, int j)
{
    return p->tb ? p->B[(size_t)j * p->ldb + k] : p->B[(size_t)k * p->ldb + j];
}

static void run(const problem *p, float alpha, float beta)
{
    esft__sgemm(p->ta, p->tb, p->M, p->N, p->K, alpha, p->A, p->lda, p->B, p->ldb, beta, p->C,
                p->ldc);
}

/* Compares C with alpha * op(A) op(B) + beta * C0 in double. The bound is the
   classic one for a sum of K products in fp32, (K + 2) eps sum |terms|; any
   misplaced or missing term is far outside it. The padding columns must hold
   C0. Returns 0, or writes the first failure into msg and returns 1. */
static int verify(const problem *p, float alpha, float beta, char *msg, size_t cap)
{
    int i, j, k;
    for (i = 0; i < p->M; i++) {
        for (j = 0; j < p->ldc; j++) {
            size_t at = (size_t)i * p->ldc + j;
            double got = p->C[at], want = 0.0, mag = 0.0, tol;
            if (j >= p->N) {
                if (memcmp(&p->C[at], &p->C0[at], sizeof(float)) != 0) {
                    snprintf(msg, cap, "padding C[%d][%d] changed", i, j);
                    return 1;
                }
                continue;
            }
            for (k = 0; k < p->K; k++) {
                double t = a_at(p, i, k) * b_at(p, k, j);
                want += t;
                mag += fabs(t);
            }
            want *= alpha;
            mag *= fabs(alpha);
            if (beta != 0.0f) {
                want += (double)beta * p->C0[at];
                mag += fabs((double)beta * p->C0[at]);
            }
            tol = (p->K + 2) * FLT_EPSILON * mag + 1e-30;
            if (!(fabs(got - want) <= tol)) {
                snprintf(msg, cap,
                         "ta=%d tb=%d M=%d N=%d K=%d alpha=%g beta=%g: C[%d][%d] = %.9g, "
                         "want %.9g (tol %.3g)",
                         p->ta, p->tb, p->M, p->N, p->K, alpha, beta, i, j, got, want, tol);
                return 1;
            }
        }
    }
    return 0;
}

/* Sizes around the tiles (MR is 4, 6 or 12; NR 16 or 32) and the cache blocks
   (KC 384, MC 12 MR, NC 64 NR): 1, primes, 2^n +- 1, more than one K block
   (K 400, 800), more than one M block (M 300), more than one N panel (N 2100). */
static const int sizes[][3] = {
    {1, 1, 1},     {1, 7, 17},    {7, 1, 63},    {17, 65, 1},   {63, 17, 65},
    {65, 129, 7},  {129, 63, 257}, {12, 32, 384}, {13, 33, 385}, {257, 65, 129},
    {31, 300, 400}, {300, 47, 800}, {5, 2100, 3},  {150, 70, 17},
};

TEST(all_transposes_odd_sizes_wide_strides_vs_double)
{
    char msg[400];
    int t, s, pad;
    for (t = 0; t < 4; t++)
        for (s = 0; s < (int)(sizeof sizes / sizeof sizes[0]); s++)
            for (pad = 0; pad <= 3; pad += 3) {
                problem p;
                int bad;
                problem_make(&p, t & 1, t >> 1, sizes[s][0], sizes[s][1], sizes[s][2], pad,
                             (unsigned)(100 * t + s));
                run(&p, 1.0f, 0.0f);
                bad = verify(&p, 1.0f, 0.0f, msg, sizeof msg);
                problem_free(&p);
                CHECK_MSG(!bad, "%s", msg);
            }
}

TEST(alpha_beta_cases)
{
    static const float ab[][2] = {{1, 1}, {0.5f, 0}, {-2, 0.25f}, {1, -1}, {0.125f, 3}};
    char msg[400];
    int t, c;
    for (t = 0; t < 4; t++)
        for (c = 0; c < (int)(sizeof ab / sizeof ab[0]); c++) {
            problem p;
            int bad;
            problem_make(&p, t & 1, t >> 1, 37, 71, 450, 2, (unsigned)(7 * t + c));
            run(&p, ab[c][0], ab[c][1]);
            bad = verify(&p, ab[c][0], ab[c][1], msg, sizeof msg);
            problem_free(&p);
            CHECK_MSG(!bad, "%s", msg);
        }
}

/* beta = 0 overwrites C: NaN (and Inf) already in C must not leak into it. */
TEST(beta_zero_ignores_nan_in_c)
{
    problem p;
    char msg[400];
    int i, j, bad;
    problem_make(&p, 0, 1, 29, 45, 70, 1, 3u);
    for (i = 0; i < p.M; i++)
        for (j = 0; j < p.N; j++) p.C[(size_t)i * p.ldc + j] = (i + j) % 2 ? NAN : INFINITY;
    run(&p, 1.5f, 0.0f);
    bad = verify(&p, 1.5f, 0.0f, msg, sizeof msg);
    problem_free(&p);
    CHECK_MSG(!bad, "%s", msg);
}

/* alpha = 0 or K = 0: C = beta C, and with beta = 0 exactly zero even over NaN;
   A and B are not read (NULL here). M = 0 or N = 0 touches nothing. */
TEST(degenerate_sizes_and_alpha_zero)
{
    float C[6] = {1, 2, NAN, 4, 5, INFINITY}, A[4] = {NAN, NAN, NAN, NAN};
    int i;
    esft__sgemm(0, 0, 2, 3, 0, 1.0f, NULL, 1, NULL, 3, 0.0f, C, 3);
    for (i = 0; i < 6; i++) CHECK_EQ_INT(C[i] == 0.0f, 1);
    for (i = 0; i < 6; i++) C[i] = (float)(i + 1);
    esft__sgemm(1, 1, 2, 3, 2, 0.0f, A, 2, A, 2, 2.0f, C, 3);
    for (i = 0; i < 6; i++) CHECK_NEAR(C[i], 2.0 * (i + 1), 0);
    esft__sgemm(0, 0, 0, 3, 2, 1.0f, A, 2, A, 3, 0.0f, C, 3);
    esft__sgemm(0, 0, 2, 0, 2, 1.0f, A, 2, A, 1, 0.0f, C, 3);
    for (i = 0; i < 6; i++) CHECK_NEAR(C[i], 2.0 * (i + 1), 0);
}

/* The workspace entry gives the bits of the convenience entry, for any number
   of parts: the split is on tile boundaries and never cuts K. This runs the
   parts one after another when OpenMP is off, so it tests the partition itself. */
TEST(workspace_entry_same_bits_for_any_split)
{
    static const int shapes[][5] = {{200, 300, 500, 0, 1}, {700, 90, 333, 1, 0},
                                    {45, 1500, 400, 0, 0}, {333, 222, 111, 1, 1}};
    int s, n;
    for (s = 0; s < 4; s++) {
        problem p;
        size_t bytes;
        float *first, *ws;
        problem_make(&p, shapes[s][3], shapes[s][4], shapes[s][0], shapes[s][1], shapes[s][2],
                     1, (unsigned)(40 + s));
        bytes = (size_t)p.M * p.ldc * sizeof(float);
        first = (float *)malloc(bytes);
        esft_set_num_threads(1);
        run(&p, 0.75f, 0.5f);
        memcpy(first, p.C, bytes);
        for (n = 1; n <= 5; n++) {
            ws = (float *)malloc(esft__sgemm_ws_floats(p.M, p.N, p.K, n) * sizeof(float));
            memcpy(p.C, p.C0, bytes);
            esft__sgemm_ws(p.ta, p.tb, p.M, p.N, p.K, 0.75f, p.A, p.lda, p.B, p.ldb, 0.5f, p.C,
                           p.ldc, ws, n);
            free(ws);
            if (memcmp(first, p.C, bytes) != 0) break;
        }
        free(first);
        problem_free(&p);
        esft_set_num_threads(0);
        CHECK_MSG(n > 5, "shape %d: %d parts give other bits than 1", s, n);
    }
}

/* The real thing: 1 thread and 2 threads (OpenMP) give identical bits. */
TEST(same_bits_for_one_and_two_threads)
{
#ifndef _OPENMP
    SKIP("built without OpenMP: one thread only (the split itself is tested above)");
#else
    static const int shapes[][5] = {{48, 1408, 512, 0, 1}, {512, 48, 300, 1, 0},
                                    {100, 700, 900, 0, 0}};
    int s, same = 1;
    for (s = 0; s < 3 && same; s++) {
        problem p;
        size_t bytes;
        float *one;
        problem_make(&p, shapes[s][3], shapes[s][4], shapes[s][0], shapes[s][1], shapes[s][2],
                     0, (unsigned)(90 + s));
        bytes = (size_t)p.M * p.ldc * sizeof(float);
        one = (float *)malloc(bytes);
        esft_set_num_threads(1);
        CHECK_EQ_INT(esft_get_num_threads(), 1);
        run(&p, 1.0f, 0.0f);
        memcpy(one, p.C, bytes);
        esft_set_num_threads(2);
        CHECK_EQ_INT(esft_get_num_threads(), 2);
        memcpy(p.C, p.C0, bytes);
        run(&p, 1.0f, 0.0f);
        same = memcmp(one, p.C, bytes) == 0;
        free(one);
        problem_free(&p);
    }
    esft_set_num_threads(0);
    CHECK_MSG(same, "shape %d: 2 threads give other bits than 1", s - 1);
#endif
}

/* With no memory for scratch, esft__sgemm still computes the right result
   (unpacked loop); after esft_release_thread_scratch it allocates again. */
TEST(no_scratch_fallback_and_release)
{
    char msg[400];
    int bad, t;
    for (t = 0; t < 4; t++) {
        problem p;
        problem_make(&p, t & 1, t >> 1, 33, 40, 50, 2, (unsigned)(60 + t));
        esft_release_thread_scratch();
        fail_alloc = 1;
        run(&p, -1.0f, 2.0f);
        fail_alloc = 0;
        bad = verify(&p, -1.0f, 2.0f, msg, sizeof msg);
        if (!bad) {
            memcpy(p.C, p.C0, (size_t)p.M * p.ldc * sizeof(float));
            run(&p, -1.0f, 2.0f);
            bad = verify(&p, -1.0f, 2.0f, msg, sizeof msg);
        }
        problem_free(&p);
        CHECK_MSG(!bad, "%s", msg);
    }
    esft_release_thread_scratch();
}

TEST(num_threads_knob)
{
    esft_set_num_threads(1);
    CHECK_EQ_INT(esft_get_num_threads(), 1);
    esft_set_num_threads(-3);
    CHECK(esft_get_num_threads() >= 1);
    esft_set_num_threads(0);
    CHECK(esft_get_num_threads() >= 1);
    esft_set_num_threads(2000000000); /* had no bound: OpenMP was asked for 2e9 threads */
    CHECK(esft_get_num_threads() >= 1 && esft_get_num_threads() <= ESFT_MAX_THREADS);
#if defined(_OPENMP)
    CHECK_EQ_INT(esft_get_num_threads(), ESFT_MAX_THREADS);
#endif
    esft_set_num_threads(0);
}

HARNESS_MAIN()
