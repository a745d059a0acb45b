/* fuzz_files.h - for fuzz targets whose code under test reads or writes files
   (heatmap, config round trip, checkpoint index): a private scratch directory
   "$TMPDIR/esft_fuzz_<target>_<pid>", created on first use, emptied of the
   files named through fuzz_path and removed at exit; REQUIRE, which aborts
   (so libFuzzer keeps the input) when an invariant breaks; slurp. Include after
   esft.h's implementation. */
#ifndef ESFT_FUZZ_FILES_H
#define ESFT_FUZZ_FILES_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "slurp.h"

#define REQUIRE(c) do { if (!(c)) { fprintf(stderr, "invariant failed: %s (%s:%d)\n", #c, __FILE__, __LINE__); abort(); } } while (0)

static char fuzz_dir_[512];
static const char *fuzz_names_[16];
static int fuzz_n_names_;

static void fuzz_cleanup_(void)
{
    char p[1024];
    int i;
    for (i = 0; i < fuzz_n_names_; i++) {
        snprintf(p, sizeof p, "%s/%s", fuzz_dir_, fuzz_names_[i]);
        remove(p);
    }
    rmdir(fuzz_dir_);
}

/* The scratch directory, made on the first call. */
static const char *fuzz_dir(const char *target)
{
    if (!fuzz_dir_[0]) {
        const char *tmp = getenv("TMPDIR");
        snprintf(fuzz_dir_, sizeof fuzz_dir_, "%s/esft_fuzz_%s_%ld", tmp && tmp[0] ? tmp : "/tmp", target,
                 (long)getpid());
        if (mkdir(fuzz_dir_, 0700) != 0) {
            fprintf(stderr, "cannot create %s\n", fuzz_dir_);
            abort();
        }
        atexit(fuzz_cleanup_);
    }
    return fuzz_dir_;
}

/* dir/name into out (remembered for the cleanup at exit). */
static const char *fuzz_path(char *out, size_t cap, const char *target, const char *name)
{
    int i;
    for (i = 0; i < fuzz_n_names_ && strcmp(fuzz_names_[i], name) != 0; i++) {}
    if (i == fuzz_n_names_ && fuzz_n_names_ < 16) fuzz_names_[fuzz_n_names_++] = name;
    snprintf(out, cap, "%s/%s", fuzz_dir(target), name);
    return out;
}

/* 1 if a temp file of path ("<path>.tmp.*") is left in the scratch directory. */
static int fuzz_temp_left(const char *path)
{
    char p[1100];
    int n;
    for (n = 0; n < 4; n++) {
        snprintf(p, sizeof p, "%s.tmp.%ld.%d", path, (long)getpid(), n);
        if (access(p, F_OK) == 0) return 1;
    }
    return 0;
}

#endif
