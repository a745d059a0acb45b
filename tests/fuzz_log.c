/* fuzz_log.c - libFuzzer target for the ESFT routing-log reader
   (esft_stats_read_log_memory), with K = 2 and E = 64 (so slices of the real
   K = 6 logs are valid seeds). Checks: on success every counted token added
   exactly K selections and the token scores of the layer sum to 1; on failure
   the accumulator is untouched and the error names a line.

   libFuzzer (tests/fuzz.sh, `make fuzz`):
       clang -g -O1 -fsanitize=fuzzer,address,undefined -DESFT_LIBFUZZER -I. tests/fuzz_log.c -lm
   Plain replay of files (any compiler): cc -I. tests/fuzz_log.c -lm && ./a.out tests/corpus/log/... */
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) { fprintf(stderr, "invariant failed: %s (%s:%d)\n", #c, __FILE__, __LINE__); abort(); } } while (0)

#define LAYERS 3
#define EXPERTS 64
#define K 2

static int all_zero(const esft_stats *st)
{
    int i;
    for (i = 0; i < LAYERS * EXPERTS; i++)
        if (st->count[i] || st->gate_sum[i] || st->token_frac_sum[i] || st->gate_frac_sum[i]) return 0;
    for (i = 0; i < LAYERS; i++)
        if (st->n_tokens[i] || st->n_samples[i]) return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    esft_stats st;
    esft_error err;
    esft_status s;
    size_t lines = 0, i;
    if (esft_stats_init(&st, LAYERS, EXPERTS, K, NULL) != ESFT_OK) abort();
    s = esft_stats_read_log_memory(&st, 1, (const char *)data, size, "fuzz", &err);
    for (i = 0; i < size; i++) lines += data[i] == '\n';
    if (s == ESFT_OK) {
        uint64_t total = 0;
        int e, norm;
        for (e = 0; e < EXPERTS; e++) total += st.count[EXPERTS + e];
        REQUIRE(st.n_tokens[1] >= 1 && total == (uint64_t)K * st.n_tokens[1]);
        REQUIRE(st.n_samples[1] >= 1 && st.n_samples[1] <= lines + 1);
        REQUIRE(st.n_tokens[0] == 0 && st.n_tokens[2] == 0);
        for (norm = 0; norm < 2; norm++) {
            esft_scores sc;
            double sum = 0.0;
            REQUIRE(esft_stats_scores(&st, (esft_norm)norm, &sc) == ESFT_OK);
            for (e = 0; e < EXPERTS; e++) {
                REQUIRE(isfinite(sc.gate[EXPERTS + e]) && sc.gate[EXPERTS + e] >= 0.0);
                sum += sc.token[EXPERTS + e];
            }
            REQUIRE(fabs(sum - 1.0) < 1e-6);
            esft_scores_free(&sc);
        }
    } else {
        REQUIRE(all_zero(&st));
        REQUIRE(err.status == s && err.message[0] && strcmp(err.file, "fuzz") == 0);
        REQUIRE(err.line >= 0 && (size_t)err.line <= lines + 1);
    }
    esft_stats_uninit(&st);
    return 0;
}

#include "fuzz_main.h"
