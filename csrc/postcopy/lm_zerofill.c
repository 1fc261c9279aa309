/*
 * Serving a region's faults from this process: the zero page, or a local
 * copy of the pages.
 *
 * Theory of operation
 *   A pre-copy destination registers fresh guest memory with userfaultfd
 *   (MISSING) only so that its bulk streams can place each page's first
 *   version with UFFDIO_COPY, which allocates a page without zeroing it
 *   first (lm_stream_dest_fill). Nothing else may notice the registration:
 *   a zero-fill thread answers every fault on a page still absent with
 *   UFFDIO_ZEROPAGE, as the kernel would have done for plain anonymous
 *   memory (a write then takes an ordinary copy-on-write fault). A page the
 *   zero fill mapped is present from then on, so a stream overwrites it
 *   rather than copying over it.
 *
 *   The loop (lm_serve_faults) poll()s the userfaultfd and an eventfd that
 *   asks it to stop, so it needs no timeout; lm_faultbench.c's fault server
 *   (a test and benchmark floor that copies from a local source buffer) is
 *   the same loop with a source.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "livemig.h"
#include "postcopy/lm_postcopy_internal.h"

int64_t lm_serve_faults(lm_postcopy *p, const uint8_t *src, int stop_fd)
{
    int64_t served = 0;
    uint64_t pages[64];
    struct pollfd fds[2] = {
        {.fd = lm_postcopy_fd(p), .events = POLLIN},
        {.fd = stop_fd, .events = POLLIN},
    };
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (fds[1].revents)
            return served;
        int64_t n = lm_postcopy_read_faults(p, pages, 64);
        if (n < 0)
            return n;
        for (int64_t i = 0; i < n; i++) {
            int64_t rc = src ? lm_postcopy_copy(p, pages[i], src + pages[i] * LM_PAGE_SIZE, 1)
                             : lm_postcopy_zero(p, pages[i], 1);
            if (rc < 0)
                return rc;
            served += rc;
        }
    }
}

struct lm_zerofill {
    pthread_t thread;
    lm_postcopy *pc;
    int stop_fd;
    int64_t served;   /* pages served, or -errno of the failure that ended the thread */
};

static void *zerofill_main(void *arg)
{
    lm_zerofill *z = arg;
    z->served = lm_serve_faults(z->pc, NULL, z->stop_fd);
    return NULL;
}

LM_API int lm_zerofill_start(lm_postcopy *p, lm_zerofill **out)
{
    if (!p || !out)
        return -EINVAL;
    *out = NULL;
    lm_zerofill *z = calloc(1, sizeof(*z));
    if (!z)
        return -ENOMEM;
    z->pc = p;
    z->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (z->stop_fd < 0) {
        int e = errno;
        free(z);
        return -e;
    }
    int rc = pthread_create(&z->thread, NULL, zerofill_main, z);
    if (rc != 0) {
        close(z->stop_fd);
        free(z);
        return -rc;
    }
    pthread_setname_np(z->thread, "lm-zerofill");
    *out = z;
    return 0;
}

LM_API int64_t lm_zerofill_stop(lm_zerofill *z)
{
    uint64_t one = 1;
    while (write(z->stop_fd, &one, sizeof(one)) != sizeof(one) && errno == EINTR)
        ;
    pthread_join(z->thread, NULL);
    int64_t served = z->served;
    close(z->stop_fd);
    free(z);
    return served;
}
