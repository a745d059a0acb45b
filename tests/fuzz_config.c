/* fuzz_config.c - libFuzzer target for the expert-config round trip: whatever
   esft_expert_config_parse accepts, esft_expert_config_write writes and
   esft_expert_config_read reads back as the same config (layers, which are
   present, ids in order, both flags), and writing that again gives the same
   bytes. A write never leaves a temp file; a parse failure says where.

   libFuzzer (tests/fuzz.sh, `make fuzz`):
       clang -g -O1 -fsanitize=fuzzer,address,undefined -DESFT_LIBFUZZER -I. tests/fuzz_config.c -lm
   Plain replay of files (any compiler): cc -I. tests/fuzz_config.c -lm && ./a.out tests/corpus/config/... */
#define _POSIX_C_SOURCE 200809L
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include "fuzz_files.h"

static void require_same(const esft_expert_config *a, const esft_expert_config *b)
{
    int l;
    REQUIRE(a->n_layers == b->n_layers);
    REQUIRE(a->shared_experts == b->shared_experts && a->non_expert_modules == b->non_expert_modules);
    REQUIRE(memcmp(a->offset, b->offset, (size_t)(a->n_layers + 1) * sizeof *a->offset) == 0);
    for (l = 0; l < a->n_layers; l++) REQUIRE(!a->layer_present[l] == !b->layer_present[l]);
    REQUIRE(a->offset[a->n_layers] == 0 ||
            memcmp(a->ids, b->ids, (size_t)a->offset[a->n_layers] * sizeof *a->ids) == 0);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    esft_expert_config cfg, back;
    esft_error err;
    char p1[1100], p2[1100];
    char *b1, *b2;
    size_t n1, n2;
    memset(&err, 0, sizeof err);
    if (esft_expert_config_parse((const char *)data, size, "fuzz", &cfg, &err) != ESFT_OK) {
        REQUIRE(err.message[0] && strcmp(err.file, "fuzz") == 0 && err.line >= 1);
        return 0;
    }
    fuzz_path(p1, sizeof p1, "config", "one.json");
    fuzz_path(p2, sizeof p2, "config", "two.json");
    REQUIRE(esft_expert_config_write(p1, &cfg, &err) == ESFT_OK);
    REQUIRE(!fuzz_temp_left(p1));
    REQUIRE(esft_expert_config_read(p1, &back, &err) == ESFT_OK); /* what we write, we read */
    require_same(&cfg, &back);
    REQUIRE(esft_expert_config_write(p2, &back, &err) == ESFT_OK);
    b1 = slurp(p1, &n1);
    b2 = slurp(p2, &n2);
    REQUIRE(b1 && b2 && n1 == n2 && memcmp(b1, b2, n1) == 0); /* a fixed point after one write */
    free(b1);
    free(b2);
    esft_expert_config_free(&back);
    esft_expert_config_free(&cfg);
    return 0;
}

#include "fuzz_main.h"
