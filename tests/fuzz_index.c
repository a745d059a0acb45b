/* fuzz_index.c - libFuzzer target for the sharded-checkpoint index reader:
   the input is model.safetensors.index.json in a directory that also holds two
   small shards (a.safetensors: "model.x", "model.y"; b.safetensors: "model.z"),
   opened with esft_checkpoint_open. Checks: a success lists every tensor of the
   shards it names once, sorted, each found in the shard the index names; the index it writes
   (esft_checkpoint_write_index) opens again to the same checkpoint and leaves no
   temp file; a failure says why and leaves the checkpoint zeroed.

   libFuzzer (tests/fuzz.sh, `make fuzz`):
       clang -g -O1 -fsanitize=fuzzer,address,undefined -DESFT_LIBFUZZER -I. tests/fuzz_index.c -lm
   Plain replay of files (any compiler): cc -I. tests/fuzz_index.c -lm && ./a.out tests/corpus/index/... */
#define _POSIX_C_SOURCE 200809L
#include "esft.h"
#define ESFT_IMPLEMENTATION
#include "esft.h"

#include "fuzz_files.h"

/* The two shards, written once per process. */
static void make_shards(void)
{
    static int done;
    static const float v[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    esft_st_write_tensor a[2], b[1];
    char p[1100];
    if (done) return;
    memset(a, 0, sizeof a);
    memset(b, 0, sizeof b);
    a[0].name = "model.x"; a[0].dtype = ESFT_DTYPE_F32; a[0].n_dims = 1; a[0].shape[0] = 4; a[0].f32 = v;
    a[1].name = "model.y"; a[1].dtype = ESFT_DTYPE_BF16; a[1].n_dims = 2; a[1].shape[0] = 2; a[1].shape[1] = 2; a[1].f32 = v;
    b[0].name = "model.z"; b[0].dtype = ESFT_DTYPE_F16; b[0].n_dims = 1; b[0].shape[0] = 3; b[0].f32 = v;
    REQUIRE(esft_safetensors_write(fuzz_path(p, sizeof p, "index", "a.safetensors"), a, 2, NULL, NULL, 0, NULL) == ESFT_OK);
    REQUIRE(esft_safetensors_write(fuzz_path(p, sizeof p, "index", "b.safetensors"), b, 1, NULL, NULL, 0, NULL) == ESFT_OK);
    done = 1;
}

static void write_file(const char *path, const unsigned char *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    REQUIRE(f != NULL);
    REQUIRE(size == 0 || fwrite(data, 1, size, f) == size);
    REQUIRE(fclose(f) == 0);
}

static void check_open(const esft_checkpoint *ck)
{
    int i, total = 0, shard, index;
    REQUIRE(ck->sharded == 1 && ck->n_shards >= 1);
    for (i = 0; i < ck->n_shards; i++) total += ck->shards[i].n_tensors;
    REQUIRE(ck->n_tensors == total); /* both ways: every tensor of a named shard is listed */
    for (i = 0; i < ck->n_tensors; i++) {
        REQUIRE(i == 0 || strcmp(ck->names[i - 1], ck->names[i]) < 0);
        REQUIRE(esft_checkpoint_find(ck, ck->names[i], &shard, &index));
        REQUIRE(shard == ck->name_shard[i] && index == ck->name_tensor[i]);
        REQUIRE(strcmp(ck->shard_files[shard], strcmp(ck->names[i], "model.z") == 0 ? "b.safetensors" : "a.safetensors") == 0);
    }
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    esft_checkpoint ck, again;
    esft_error err;
    char index[1100], out[1100];
    int i;
    make_shards();
    fuzz_path(index, sizeof index, "index", "model.safetensors.index.json");
    fuzz_path(out, sizeof out, "index", "out.index.json");
    write_file(index, data, size);
    memset(&err, 0, sizeof err);
    if (esft_checkpoint_open(&ck, fuzz_dir("index"), NULL, &err) != ESFT_OK) {
        REQUIRE(err.status != ESFT_OK && err.message[0]);
        REQUIRE(ck.n_tensors == 0 && ck.shards == NULL && ck.names == NULL);
        return 0;
    }
    check_open(&ck);
    REQUIRE(esft_checkpoint_write_index(out, &ck, &err) == ESFT_OK); /* round trip through our writer */
    REQUIRE(!fuzz_temp_left(out));
    REQUIRE(esft_checkpoint_open(&again, out, NULL, &err) == ESFT_OK);
    check_open(&again);
    REQUIRE(again.n_tensors == ck.n_tensors && again.total_bytes == ck.total_bytes);
    for (i = 0; i < ck.n_tensors; i++) {
        REQUIRE(strcmp(again.names[i], ck.names[i]) == 0);
        REQUIRE(strcmp(again.shard_files[again.name_shard[i]], ck.shard_files[ck.name_shard[i]]) == 0);
    }
    esft_checkpoint_close(&again);
    esft_checkpoint_close(&ck);
    return 0;
}

#include "fuzz_main.h"
