/* fuzz_main.h - the plain main() of a fuzz target built without libFuzzer: it
   replays the files named on the command line (a corpus, a crash artifact) through
   LLVMFuzzerTestOneInput, so every target also runs under valgrind and in CI. */
#ifndef ESFT_FUZZ_MAIN_H
#define ESFT_FUZZ_MAIN_H
#ifndef ESFT_LIBFUZZER
#include "slurp.h"

int main(int argc, char **argv)
{
    int i, replayed = 0;
    for (i = 1; i < argc; i++) {
        size_t n;
        char *buf = slurp(argv[i], &n);
        if (!buf) { fprintf(stderr, "cannot read %s\n", argv[i]); return 2; }
        LLVMFuzzerTestOneInput((const uint8_t *)buf, n);
        free(buf);
        replayed++;
    }
    printf("replayed %d inputs\n", replayed);
    return 0;
}
#endif
#endif
