/* slurp.h - read a whole file into memory, for tests, fuzz replays and benches.
   Returns a malloc'd buffer with a NUL after the last byte (so text can be used as
   a C string), or NULL when the file cannot be read. size (optional) gets the length. */
#ifndef ESFT_TEST_SLURP_H
#define ESFT_TEST_SLURP_H

#include <stdio.h>
#include <stdlib.h>

static char *slurp(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    long n;
    if (size) *size = 0;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
        buf = (char *)malloc((size_t)n + 1);
        if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); buf = NULL; }
        if (buf) {
            buf[n] = 0;
            if (size) *size = (size_t)n;
        }
    }
    fclose(f);
    return buf;
}

#endif
