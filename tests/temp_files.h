/* temp_files.h - does a writer leave a temporary file behind? The library writes
   "<path>.tmp.<pid>.<n>" and renames it; after a failure none may remain. POSIX. */
#ifndef ESFT_TEST_TEMP_FILES_H
#define ESFT_TEST_TEMP_FILES_H

#include <dirent.h>
#include <stdio.h>
#include <string.h>

/* 1 if a temp file of path ("<path>.tmp" and anything after it) is on disk. */
static int temp_left(const char *path)
{
    char dir[1200];
    const char *slash = strrchr(path, '/'), *base = slash ? slash + 1 : path;
    size_t nb = strlen(base);
    DIR *d;
    struct dirent *ent;
    int found = 0;
    snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - path) : 1, slash ? path : ".");
    if ((d = opendir(dir)) == NULL) return 0;
    while ((ent = readdir(d)) != NULL)
        found |= strncmp(ent->d_name, base, nb) == 0 && strncmp(ent->d_name + nb, ".tmp", 4) == 0;
    closedir(d);
    return found;
}

#endif
