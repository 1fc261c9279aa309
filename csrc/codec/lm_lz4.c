/*
 * Loading liblz4 for the bulk streams: see lm_lz4.h.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "codec/lm_lz4.h"

#define LM_LZ4_SONAME "liblz4.so.1"

int lm_lz4_open(struct lm_lz4 *l, char *reason, size_t reason_cap)
{
    memset(l, 0, sizeof(*l));
    void *dl = dlopen(LM_LZ4_SONAME, RTLD_NOW | RTLD_LOCAL);
    if (!dl) {
        const char *e = dlerror();
        snprintf(reason, reason_cap, "cannot load %s: %s", LM_LZ4_SONAME,
                 e ? e : "unknown error");
        return -ENOENT;
    }
    l->compress = (int (*)(const char *, char *, int, int))dlsym(dl, "LZ4_compress_default");
    l->decompress = (int (*)(const char *, char *, int, int))dlsym(dl, "LZ4_decompress_safe");
    l->bound = (int (*)(int))dlsym(dl, "LZ4_compressBound");
    if (!l->compress || !l->decompress || !l->bound) {
        snprintf(reason, reason_cap, "%s lacks the LZ4 block functions", LM_LZ4_SONAME);
        dlclose(dl);
        memset(l, 0, sizeof(*l));
        return -ENOSYS;
    }
    l->dl = dl;
    return 0;
}

void lm_lz4_close(struct lm_lz4 *l)
{
    if (l->dl)
        dlclose(l->dl);
    memset(l, 0, sizeof(*l));
}
