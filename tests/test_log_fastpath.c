/* test_log_fastpath.c - the fast paths of router statistics give the same bits
   as the plain code they replace:
   - weights: (float)(m * 10^-k) == (float)(m / 10^k) for every m < 10^7, k <= 6
     (the parser multiplies; esft__scan_number divides);
   - log lines: every line the one-pass parser accepts gives exactly the ids and
     weights the exact parser gives, and ends where the exact parser's line ends;
     lines it declines go to the exact parser (checked on random, mutated lines);
   - accumulation: the 4-copy histogram kernel equals the textbook loop, and the
     division-free per-sample ratios equal the plain integer division.
   Speed is measured in bench/bench_stats.c, never here. */
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"
#include "harness.h"

TEST(weight_multiply_equals_divide_for_every_mantissa_below_1e7)
{
    int k;
    long mismatches = 0;
    for (k = 0; k <= 6; k++) {
        uint32_t m;
        for (m = 0; m < 10000000u; m++) {
            float a = (float)((double)m / esft__pow10[k]);
            float b = (float)((double)m * esft__inv_pow10[k]);
            mismatches += a != b;
        }
    }
    CHECK_MSG(mismatches == 0, "%ld mantissas round differently", mismatches);
}

TEST(digits8_parses_every_length)
{
    const char *s[] = {"7", "42", "063", "9999", "12345", "654321", "7654321", "87654321"};
    uint32_t want[] = {7, 42, 63, 9999, 12345, 654321, 7654321, 87654321};
    int i;
    for (i = 0; i < 8; i++) {
        char buf[9] = {0};
        memcpy(buf, s[i], strlen(s[i]));
        CHECK_EQ_INT((long)esft__digits8(esft__load8(buf, buf + 8), strlen(s[i])), (long)want[i]);
    }
}

/* A random log line (with tokens of K = 2), sometimes mutated into a bad one. */
static uint64_t rng_state = 0x9e3779b97f4a7c15u;
static uint64_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static size_t random_lines(char *buf, size_t cap)
{
    static const char alphabet[] = "0123456789.\t\n\r-+eEnaif x";
    size_t n = 0;
    int lines = 1 + (int)(rng() % 3), l, t, i;
    for (l = 0; l < lines && n + 4000 < cap; l++) {
        int T = (int)(rng() % 6);
        if (rng() % 6 == 0) T = 30 + (int)(rng() % 60); /* lines over several 64-byte blocks */
        for (t = 0; t < 2 * T; t++) {
            uint64_t big = rng() % 20 == 0, v = rng() % (big ? 100000000u : 64u);
            n += (size_t)sprintf(buf + n, t ? "\t%lu" : "%lu", (unsigned long)v);
        }
        buf[n++] = '\t';
        buf[n++] = '\t';
        for (t = 0; t < 2 * T; t++) {
            static const char *fmt[] = {"%.4f", "%.4f", "%.4f", "%.3f", "%.0f", "%.6f", "%.9f", "%g", "%.2e"};
            uint64_t kind = rng() % 9;
            double w = (double)(rng() % 100000) / 100000.0 * (rng() % 8 == 0 ? 1000.0 : 1.0);
            if (t) buf[n++] = '\t';
            n += (size_t)sprintf(buf + n, fmt[kind], w);
        }
        if (rng() % 8 == 0) buf[n++] = '\r';
        if (l < lines - 1 || rng() % 4) buf[n++] = '\n';
    }
    for (i = (int)(rng() % 3); i > 0 && n > 1; i--) { /* mutations */
        size_t at = (size_t)(rng() % n);
        if (rng() % 2) buf[at] = alphabet[rng() % (sizeof alphabet - 1)];
        else { memmove(buf + at, buf + at + 1, n - at - 1); n--; }
    }
    return n;
}

TEST(fast_line_parser_agrees_with_exact_parser)
{
    static char buf[1 << 16];
    esft__log_line fast, exact;
    long fast_lines = 0, declined = 0;
    int c;
    memset(&fast, 0, sizeof fast);
    memset(&exact, 0, sizeof exact);
    fast.allocator = exact.allocator = esft__allocator_or_default(NULL);
    for (c = 0; c < 20000; c++) {
        size_t n = random_lines(buf, sizeof buf);
        const char *p = buf, *end = buf + n;
        int at_eof = (int)(rng() % 2);
        while (p < end) {
            const char *next = NULL, *nl = (const char *)memchr(p, '\n', (size_t)(end - p));
            const char *line_end = nl ? nl : end;
            int ok = esft__parse_log_line_fast(&fast, p, end, at_eof, &next);
            if (!nl && !at_eof) {
                CHECK_MSG(!ok, "case %d: an incomplete line was accepted", c);
                break;
            }
            if (line_end > p && line_end[-1] == '\r') line_end--;
            if (ok) {
                size_t i;
                fast_lines++;
                CHECK_MSG(next == (nl ? nl + 1 : end), "case %d: the line ends elsewhere", c);
                CHECK_MSG(esft__parse_log_line(&exact, p, line_end, NULL) == ESFT_OK,
                          "case %d: accepted a line the exact parser rejects", c);
                CHECK(fast.n_ids == exact.n_ids && fast.n_weights == exact.n_weights);
                for (i = 0; i < fast.n_ids; i++) CHECK_EQ_INT(fast.ids[i], exact.ids[i]);
                for (i = 0; i < fast.n_weights; i++)
                    CHECK_MSG(memcmp(&fast.weights[i], &exact.weights[i], sizeof(float)) == 0,
                              "case %d: weight %lu %.9g != %.9g", c, (unsigned long)i,
                              (double)fast.weights[i], (double)exact.weights[i]);
            } else declined++;
            p = nl ? nl + 1 : end;
        }
    }
    /* Both paths must really have run. */
    CHECK_MSG(fast_lines > 5000 && declined > 5000, "fast %ld, declined %ld", fast_lines, declined);
    esft__release(&fast.allocator, fast.ids);
    esft__release(&fast.allocator, fast.weights);
    esft__release(&exact.allocator, exact.ids);
    esft__release(&exact.allocator, exact.weights);
}

TEST(histogram_kernel_equals_textbook_loop)
{
    enum { N = 6 * 5000, E = 64 };
    static int32_t ids[N];
    static float w[N];
    uint64_t c1[E], g1[E], c2[E], g2[E];
    size_t lens[] = {0, 1, 3, 255, 256, 257, 1000, 4096, N};
    int i, j;
    for (i = 0; i < N; i++) {
        ids[i] = (int32_t)(rng() % (i % 3 ? E : 6)); /* runs of repeats too */
        w[i] = (float)(rng() % 100000) / 7919.0f;
    }
    for (j = 0; j < (int)(sizeof lens / sizeof lens[0]); j++) {
        size_t n = lens[j];
        memset(c1, 0, sizeof c1); memset(g1, 0, sizeof g1);
        memset(c2, 0, sizeof c2); memset(g2, 0, sizeof g2);
        for (i = 0; i < (int)n; i++) {
            c1[ids[i]]++;
            g1[ids[i]] += esft__to_fixed(w[i]);
        }
        CHECK(esft__hist_copies(c2, g2, ids, w, n, E) == 0);
        CHECK_MSG(memcmp(c1, c2, sizeof c1) == 0 && memcmp(g1, g2, sizeof g1) == 0, "n = %lu",
                  (unsigned long)n);
    }
    ids[300] = E; /* a bad id in the second block: reported, never written */
    CHECK(esft__hist_copies(c2, g2, ids, w, N, E) != 0);
    ids[300] = 0;
    w[N - 1] = -1.0f; /* a bad weight in the partial last block */
    CHECK(esft__hist_copies(c2, g2, ids, w, N, E) != 0);
    w[N - 1] = 1.0f;
    w[700] = 65537.0f; /* above the largest gate weight (2^16), in a full block */
    CHECK(esft__hist_copies(c2, g2, ids, w, N, E) != 0);
    CHECK(esft__hist_simple(c2, g2, ids, w, N, E) != 0);
    w[700] = 65536.0f; /* the largest accepted */
    CHECK(esft__hist_copies(c2, g2, ids, w, N, E) == 0);
}

TEST(division_free_ratios_equal_integer_division)
{
    int it, e;
    for (it = 0; it < 200000; it++) {
        uint64_t num[4], dst[4] = {0, 0, 0, 0}, den = (rng() >> (rng() % 60)) | 1;
        int shift = it % 2 ? 32 : 0;
        for (e = 0; e < 4; e++) {
            num[e] = rng() >> (rng() % 64);
            if (e == 0) num[e] = ((uint64_t)1 << 52) - 1 - den / 2 - (rng() % 4); /* at the threshold */
            if (e == 1) num[e] = den * (rng() % 1000000) + den / 2 - (rng() % 2); /* at a rounding edge */
            if (shift) num[e] &= 0x7fffffff;
        }
        esft__fixed_ratio_add(dst, num, shift, den, 4);
        for (e = 0; e < 4; e++)
            CHECK_MSG(dst[e] == ((num[e] << shift) + den / 2) / den, "num %llu den %llu shift %d",
                      (unsigned long long)num[e], (unsigned long long)den, shift);
    }
}

HARNESS_MAIN()
