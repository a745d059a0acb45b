/* own_memory.h - a backend with memory of its own, for the tests: the CPU's
   ops, but alloc/free/upload/download of its own, counted (own_live blocks
   alive). Objects moved onto it by their _set_backend take the path a GPU
   backend's take, on a machine without a GPU. */
#ifndef OWN_MEMORY_H
#define OWN_MEMORY_H
#include <stdlib.h>
#include <string.h>

static int own_live, own_allocs, own_copies;

static esft_status own_alloc(void *c, size_t bytes, void **out)
{
    (void)c;
    *out = malloc(bytes ? bytes : 1);
    if (!*out) return ESFT_ERR_OUT_OF_MEMORY;
    own_live++;
    own_allocs++;
    return ESFT_OK;
}

static void own_free(void *c, void *p)
{
    (void)c;
    if (!p) return;
    own_live--;
    free(p);
}

static esft_status own_copy(void *c, void *dst, const void *src, size_t bytes)
{
    (void)c;
    own_copies++;
    memmove(dst, src, bytes);
    return ESFT_OK;
}

static esft_backend own_memory_backend(void)
{
    esft_backend b = *esft_backend_cpu();
    b.name = "own-memory";
    b.alloc = own_alloc;
    b.free = own_free;
    b.upload = own_copy;
    b.download = own_copy;
    return b;
}
#endif
