/*
 * Guest memory regions.
 *
 * A region is one anonymous (or memfd-backed) private mapping whose start is
 * aligned to 2 MiB, so that transparent huge pages can back it and so that
 * userfaultfd registration covers whole PMDs. We over-map by 2 MiB and trim
 * the unaligned head and tail, which is the usual way to get alignment from
 * mmap without MAP_FIXED guesses.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "livemig.h"

#define LM_ALIGN_BYTES (2u << 20)

struct lm_region {
    uint8_t *base;
    uint64_t length;
    int flags;
    int memfd;
};

LM_API int lm_abi_version(void) { return LM_ABI_VERSION; }

LM_API int lm_region_create(uint64_t length_bytes, int flags, lm_region **out)
{
    if (!out)
        return -EINVAL;
    *out = NULL;
    if (length_bytes == 0 || length_bytes % LM_PAGE_SIZE != 0)
        return -EINVAL;
    if (flags & ~(LM_REGION_MEMFD | LM_REGION_HUGEPAGE))
        return -EINVAL;
    if (sysconf(_SC_PAGESIZE) != LM_PAGE_SIZE)
        return -EOPNOTSUPP;
    if (length_bytes > UINT64_MAX - LM_ALIGN_BYTES)
        return -EOVERFLOW;

    lm_region *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->memfd = -1;

    uint64_t span = length_bytes + LM_ALIGN_BYTES;
    uint8_t *raw = mmap(NULL, span, PROT_NONE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) {
        int e = errno;
        free(r);
        return -e;
    }
    uintptr_t aligned = ((uintptr_t)raw + LM_ALIGN_BYTES - 1) & ~(uintptr_t)(LM_ALIGN_BYTES - 1);
    uint8_t *base = (uint8_t *)aligned;
    size_t head = (size_t)(base - raw);
    size_t tail = span - head - length_bytes;
    if (head)
        munmap(raw, head);
    if (tail)
        munmap(base + length_bytes, tail);

    void *m;
    if (flags & LM_REGION_MEMFD) {
        int fd = memfd_create("livemig-guest", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, (off_t)length_bytes) != 0) {
            int e = errno;
            if (fd >= 0)
                close(fd);
            munmap(base, length_bytes);
            free(r);
            return -e;
        }
        r->memfd = fd;
        m = mmap(base, length_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
    } else {
        m = mmap(base, length_bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    }
    if (m == MAP_FAILED) {
        int e = errno;
        if (r->memfd >= 0)
            close(r->memfd);
        munmap(base, length_bytes);
        free(r);
        return -e;
    }
    if (flags & LM_REGION_HUGEPAGE)
        (void)madvise(base, length_bytes, MADV_HUGEPAGE); /* advice only */
    r->base = base;
    r->length = length_bytes;
    r->flags = flags;
    *out = r;
    return 0;
}

LM_API void lm_region_destroy(lm_region *r)
{
    if (!r)
        return;
    if (r->base)
        munmap(r->base, r->length);
    if (r->memfd >= 0)
        close(r->memfd);
    free(r);
}

LM_API uint8_t *lm_region_base(const lm_region *r) { return r->base; }
LM_API uint64_t lm_region_length(const lm_region *r) { return r->length; }
LM_API uint64_t lm_region_npages(const lm_region *r) { return r->length / LM_PAGE_SIZE; }
LM_API int lm_region_flags(const lm_region *r) { return r->flags; }

static int pages_in_region(const lm_region *r, uint64_t first_page, uint64_t npages)
{
    uint64_t total = r->length / LM_PAGE_SIZE;
    return first_page <= total && npages <= total - first_page;
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

LM_API int lm_region_populate(lm_region *r, uint64_t first_page, uint64_t npages)
{
    if (!pages_in_region(r, first_page, npages))
        return -ERANGE;
    if (npages == 0)
        return 0;
    /* EINTR: a signal arrived mid-way; what was populated stays, so retry. */
    int rc;
    do {
        rc = madvise(r->base + first_page * LM_PAGE_SIZE, npages * LM_PAGE_SIZE,
                     MADV_POPULATE_WRITE);
    } while (rc != 0 && errno == EINTR);
    return rc == 0 ? 0 : -errno;
}

LM_API int lm_region_discard(lm_region *r, uint64_t first_page, uint64_t npages)
{
    if (!pages_in_region(r, first_page, npages))
        return -ERANGE;
    if (npages == 0)
        return 0;
    int advice = (r->flags & LM_REGION_MEMFD) ? MADV_REMOVE : MADV_DONTNEED;
    if (madvise(r->base + first_page * LM_PAGE_SIZE, npages * LM_PAGE_SIZE, advice) != 0)
        return -errno;
    return 0;
}
