/*
 * userfaultfd dirty trackers: uffd-async and uffd-wp.
 *
 * uffd-async (Documentation/admin-guide/mm/userfaultfd.rst, "Write Protect
 * Notifications", and Documentation/admin-guide/mm/pagemap.rst, "Pagemap Scan
 * IOCTL"): with UFFD_FEATURE_WP_ASYNC the kernel resolves a write fault on a
 * write-protected page by itself — it clears the uffd-wp bit and lets the
 * write go on — so no thread has to read the uffd. A cleared bit on a
 * registered page is what PAGEMAP_SCAN calls PAGE_IS_WRITTEN. One ioctl with
 * PM_SCAN_WP_MATCHING reports the written pages and write-protects them again
 * under the page-table lock, so collect-and-rearm is atomic per page: a write
 * is either seen by this scan (and re-armed after it) or faults afterwards and
 * is seen by the next one. UFFD_FEATURE_WP_UNPOPULATED makes the kernel put
 * pte markers on never-touched pages, so a first write to them counts too.
 *
 * Scan loop trap (measured on this kernel): once a scan has refilled the
 * kernel's internal buffer more than once, the walk_end it returns can lag
 * behind what it reported, and a loop driven by walk_end < end re-reports
 * pages. The loop below ends on a SHORT vector (fewer entries than vec_len)
 * and restarts only after a full vector, from the furthest of walk_end and
 * the last reported page; indices below the last one reported are dropped,
 * which keeps the output strictly ascending. Dropping is safe: such a page was
 * already reported by this collect and the caller copies it afterwards.
 *
 * uffd-wp: the same registration without WP_ASYNC. A write to a protected
 * page blocks the writer and queues a uffd_msg; the handler thread un-protects
 * the page (UFFDIO_WRITEPROTECT, DONTWAKE), then sets the page's bit, then
 * wakes the writer (UFFDIO_WAKE). collect takes the bits (atomic exchange per word)
 * and re-protects exactly those pages before returning them.
 *
 * Race-freedom of uffd-wp, for a page p:
 *  - the writer's store happens after the handler's un-protect, which happens
 *    before the handler sets bit p; so a set bit always means "p may have
 *    been written", and a store to p while p is writable is covered by a bit
 *    that was set earlier (not yet taken), or that will be set after the
 *    un-protect that made the store possible;
 *  - collect takes bit p and then re-protects p. A store between the two is
 *    captured by the caller's copy, which follows collect. A store after the
 *    re-protect faults and sets bit p again: it lands in the next round;
 *  - if collect takes the word before the handler set bit p, p is neither
 *    reported nor re-protected now; the bit is set afterwards and the next
 *    collect reports it. The handler only un-protects and collect only
 *    protects, and each does its page-table change before its bit operation,
 *    so no interleaving leaves p writable with its bit clear after a write.
 *  - a stale duplicate message (two threads faulted on p) un-protects p once
 *    more and sets the bit: a spurious report, never a lost one.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "lm_track_internal.h"

/* Linux 6.4+ / 6.7+ uapi that the installed headers may predate. */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

#ifndef PAGEMAP_SCAN
struct page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};
struct pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#endif

#define LM_PAGE_SHIFT 12

/* userfaultfd(2) first; /dev/userfaultfd (Linux 6.1+) when the syscall is
 * refused (vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE). */
static int uffd_open(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0)
        return fd;
    int first = errno;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -first;
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    int e = errno;
    close(dev);
    return fd >= 0 ? fd : -(first == ENOSYS ? e : first);
}

/* A uffd after UFFDIO_API with exactly `features`; -errno when refused. */
static int uffd_open_api(uint64_t features)
{
    int fd = uffd_open();
    if (fd < 0)
        return fd;
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

LM_API int lm_uffd_features(uint64_t *features_out, uint64_t *ioctls_out)
{
    int fd = uffd_open();
    if (fd < 0)
        return fd;
    /* features = 0 asks the kernel to report everything it supports; the
     * handshake can be done once per fd, so this fd is only for asking. */
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    int rc = ioctl(fd, UFFDIO_API, &api) == 0 ? 0 : -errno;
    close(fd);
    if (rc == 0) {
        if (features_out)
            *features_out = api.features;
        if (ioctls_out)
            *ioctls_out = api.ioctls;
    }
    return rc;
}

static int uffd_register_wp(int fd, void *base, uint64_t length)
{
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)base, .len = length},
        .mode = UFFDIO_REGISTER_MODE_WP,
    };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0)
        return -errno;
    if (!(reg.ioctls & (1ull << _UFFDIO_WRITEPROTECT)))
        return -EOPNOTSUPP;
    return 0;
}

/* UFFDIO_WRITEPROTECT: protect > 0 protects, 0 un-protects and wakes the
 * range's blocked writers, < 0 un-protects without waking them. EAGAIN means
 * the mm was changing underneath (mremap, fork in progress): the ioctl did
 * nothing and must be retried. */
static int uffd_wp_range(int fd, uint64_t start, uint64_t length, int protect)
{
    struct uffdio_writeprotect wp = {
        .range = {.start = start, .len = length},
        .mode = protect > 0 ? UFFDIO_WRITEPROTECT_MODE_WP
              : protect < 0 ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : 0,
    };
    for (;;) {
        if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) == 0)
            return 0;
        if (errno != EAGAIN)
            return -errno;
    }
}

static uint64_t wanted_features(int kind, int shmem)
{
    uint64_t f = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED;
    if (kind == LM_TRACK_UFFD_ASYNC)
        f |= UFFD_FEATURE_WP_ASYNC;
    if (shmem)
        f |= UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    return f;
}

static int features_reason(uint64_t need, char *reason, size_t cap)
{
    uint64_t have = 0;
    int rc = lm_uffd_features(&have, NULL);
    if (rc == -EPERM || rc == -EACCES) {
        snprintf(reason, cap, "userfaultfd refused (%s): needs root, CAP_SYS_PTRACE, "
                 "vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd", strerror(-rc));
        return rc;
    }
    if (rc == -ENOSYS) {
        snprintf(reason, cap, "kernel built without CONFIG_USERFAULTFD");
        return rc;
    }
    if (rc < 0) {
        snprintf(reason, cap, "UFFDIO_API failed: %s", strerror(-rc));
        return rc;
    }
    uint64_t missing = need & ~have;
    if (missing & UFFD_FEATURE_WP_ASYNC) {
        snprintf(reason, cap, "kernel lacks UFFD_FEATURE_WP_ASYNC (Linux 6.7+)");
        return -EOPNOTSUPP;
    }
    if (missing & UFFD_FEATURE_WP_UNPOPULATED) {
        snprintf(reason, cap, "kernel lacks UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4+)");
        return -EOPNOTSUPP;
    }
    if (missing) {
        snprintf(reason, cap, "kernel lacks userfaultfd write-protect (features 0x%llx, "
                 "Linux 5.7+)", (unsigned long long)missing);
        return -EOPNOTSUPP;
    }
    return 0;
}

LM_API int lm_pagemap_scan_probe(void)
{
    const uint64_t npages = 16;
    const uint64_t length = npages << LM_PAGE_SHIFT;
    uint8_t *m = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return -errno;
    int rc, pm = -1;
    int fd = uffd_open_api(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED);
    if (fd < 0) {
        rc = fd;
        goto out;
    }
    if ((rc = uffd_register_wp(fd, m, length)) != 0 ||
        (rc = uffd_wp_range(fd, (uintptr_t)m, length, 1)) != 0)
        goto out;
    pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0) {
        rc = -errno;
        goto out;
    }
    m[3 << LM_PAGE_SHIFT] = 1;
    m[9 << LM_PAGE_SHIFT] = 1;
    struct page_region vec[4];
    for (int pass = 0; pass < 2; pass++) {
        struct pm_scan_arg a = {
            .size = sizeof(a), .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            .start = (uintptr_t)m, .end = (uintptr_t)m + length,
            .vec = (uintptr_t)vec, .vec_len = 4,
            .category_mask = PAGE_IS_WRITTEN, .return_mask = PAGE_IS_WRITTEN,
        };
        long n = ioctl(pm, PAGEMAP_SCAN, &a);
        if (n < 0) {
            rc = (errno == EINVAL || errno == ENOTTY) ? -EOPNOTSUPP : -errno;
            goto out;
        }
        /* First pass sees pages 3 and 9; the second, after re-arming, none. */
        int ok = pass == 0
            ? (n == 2 && vec[0].start == (uintptr_t)m + (3 << LM_PAGE_SHIFT) &&
               vec[1].start == (uintptr_t)m + (9 << LM_PAGE_SHIFT))
            : n == 0;
        if (!ok) {
            rc = -EPROTO;
            goto out;
        }
    }
    rc = 0;
out:
    if (pm >= 0)
        close(pm);
    if (fd >= 0)
        close(fd);
    munmap(m, length);
    return rc;
}

static int uffd_async_probe(char *reason, size_t cap)
{
    int rc = features_reason(wanted_features(LM_TRACK_UFFD_ASYNC, 0), reason, cap);
    if (rc)
        return rc;
    rc = lm_pagemap_scan_probe();
    if (rc == -EOPNOTSUPP)
        snprintf(reason, cap, "kernel lacks the PAGEMAP_SCAN ioctl (Linux 6.7+)");
    else if (rc == -EPROTO)
        snprintf(reason, cap, "PAGEMAP_SCAN with PM_SCAN_WP_MATCHING misreported a "
                 "self-test write");
    else if (rc)
        snprintf(reason, cap, "PAGEMAP_SCAN self-test failed: %s", strerror(-rc));
    return rc;
}

static int uffd_wp_probe(char *reason, size_t cap)
{
    return features_reason(wanted_features(LM_TRACK_UFFD_WP, 0), reason, cap);
}

static int uffd_arm(lm_tracker *t)
{
    int shmem = (lm_region_flags(t->region) & LM_REGION_MEMFD) != 0;
    int fd = uffd_open_api(wanted_features(t->kind, shmem));
    if (fd < 0)
        return fd;
    int rc = uffd_register_wp(fd, t->base, t->length);
    if (rc == 0)
        rc = uffd_wp_range(fd, (uintptr_t)t->base, t->length, 1);
    if (rc != 0) {
        close(fd); /* closing unregisters and wakes anything blocked */
        return rc;
    }
    t->uffd = fd;
    return 0;
}

static int uffd_async_start(lm_tracker *t)
{
    if (!t->scan_vec) {
        t->scan_vec = calloc(t->scan_vec_len, sizeof(struct page_region));
        if (!t->scan_vec)
            return -ENOMEM;
    }
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0)
        return -errno;
    int rc = uffd_arm(t);
    if (rc != 0) {
        close(pm);
        return rc;
    }
    t->pagemap_fd = pm;
    return 0;
}

static int64_t uffd_async_collect(lm_tracker *t, uint64_t *out)
{
    struct page_region *vec = t->scan_vec;
    const uint64_t base = (uintptr_t)t->base, end = base + t->length;
    uint64_t count = 0, next_page = 0, start = base;
    for (;;) {
        struct pm_scan_arg a = {
            .size = sizeof(a), .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            .start = start, .end = end,
            .vec = (uintptr_t)vec, .vec_len = t->scan_vec_len,
            .category_mask = PAGE_IS_WRITTEN, .return_mask = PAGE_IS_WRITTEN,
        };
        long n = ioctl(t->pagemap_fd, PAGEMAP_SCAN, &a);
        t->stats.scan_ioctls++;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            /* Pages reported by earlier iterations are re-armed already;
             * failing here is fatal for the tracker (the caller must stop). */
            return -errno;
        }
        for (long i = 0; i < n; i++) {
            uint64_t first = (vec[i].start - base) >> LM_PAGE_SHIFT;
            uint64_t stop = (vec[i].end - base) >> LM_PAGE_SHIFT;
            if (first < next_page)
                first = next_page;
            if (stop > t->npages)
                stop = t->npages;
            for (uint64_t p = first; p < stop; p++)
                out[count++] = p;
            if (stop > next_page)
                next_page = stop;
        }
        if ((uint64_t)n < t->scan_vec_len)
            break; /* a short vector: the walk reached `end` */
        uint64_t resume = base + (next_page << LM_PAGE_SHIFT);
        if (a.walk_end > resume)
            resume = a.walk_end;
        if (resume >= end)
            break;
        start = resume;
    }
    return (int64_t)count;
}

/* ---- synchronous write-protect: the handler thread ------------------------ */

static void wp_handle_fault(lm_tracker *t, uint64_t addr)
{
    uint64_t page_addr = addr & ~(uint64_t)(LM_PAGE_SIZE - 1);
    uint64_t page = (page_addr - (uintptr_t)t->base) >> LM_PAGE_SHIFT;
    if (page >= t->npages)
        return;
    /* Un-protect BEFORE setting the bit (see the proof above), and wake the
     * writer only AFTER it: then a writer whose store has returned is already
     * in the bitmap, so a collect that follows it in program order reports it. */
    if (uffd_wp_range(t->uffd, page_addr, LM_PAGE_SIZE, -1) != 0)
        atomic_fetch_add(&t->handler_errors, 1); /* it re-faults after the wake */
    lm_bitmap_set(t->bitmap, page);
    atomic_fetch_add(&t->faults, 1);
    struct uffdio_range r = {.start = page_addr, .len = LM_PAGE_SIZE};
    if (ioctl(t->uffd, UFFDIO_WAKE, &r) != 0)
        atomic_fetch_add(&t->handler_errors, 1);
}

static void *wp_handler_main(void *arg)
{
    lm_tracker *t = arg;
    struct uffd_msg msgs[64];
    struct pollfd fds[2] = {{.fd = t->uffd, .events = POLLIN}, {.fd = t->stop_efd, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            atomic_fetch_add(&t->handler_errors, 1);
            return NULL;
        }
        if (fds[1].revents)
            return NULL;
        for (;;) {
            ssize_t got = read(t->uffd, msgs, sizeof(msgs));
            if (got < 0) {
                if (errno != EAGAIN && errno != EINTR)
                    atomic_fetch_add(&t->handler_errors, 1);
                break;
            }
            size_t nmsg = (size_t)got / sizeof(msgs[0]);
            for (size_t i = 0; i < nmsg; i++) {
                if (msgs[i].event == UFFD_EVENT_PAGEFAULT &&
                    (msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP))
                    wp_handle_fault(t, msgs[i].arg.pagefault.address);
            }
            if (nmsg < sizeof(msgs) / sizeof(msgs[0]))
                break;
        }
    }
}

static int uffd_wp_start(lm_tracker *t)
{
    int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (efd < 0)
        return -errno;
    int rc = uffd_arm(t);
    if (rc != 0) {
        close(efd);
        return rc;
    }
    t->stop_efd = efd;
    rc = -pthread_create(&t->handler, NULL, wp_handler_main, t);
    if (rc != 0) {
        (void)uffd_wp_range(t->uffd, (uintptr_t)t->base, t->length, 0);
        close(t->uffd);
        close(efd);
        t->uffd = t->stop_efd = -1;
        return rc;
    }
    pthread_setname_np(t->handler, "lm-wp-fault");
    t->handler_running = 1;
    return 0;
}

static int wp_protect_run(lm_tracker *t, uint64_t first_page, uint64_t npages)
{
    return uffd_wp_range(t->uffd, (uintptr_t)t->base + (first_page << LM_PAGE_SHIFT),
                         npages << LM_PAGE_SHIFT, 1);
}

static int64_t uffd_wp_collect(lm_tracker *t, uint64_t *out)
{
    return lm_bitmap_take(t, out, wp_protect_run);
}

static int uffd_stop(lm_tracker *t)
{
    /* Un-protect everything first: mode 0 also wakes every writer blocked in
     * the range, so the handler thread can leave without stranding anyone. */
    int rc = uffd_wp_range(t->uffd, (uintptr_t)t->base, t->length, 0);
    if (t->handler_running) {
        uint64_t one = 1;
        if (write(t->stop_efd, &one, sizeof(one)) != sizeof(one) && rc == 0)
            rc = -errno;
        pthread_join(t->handler, NULL);
        t->handler_running = 0;
    }
    struct uffdio_range r = {.start = (uintptr_t)t->base, .len = t->length};
    if (ioctl(t->uffd, UFFDIO_UNREGISTER, &r) != 0 && rc == 0)
        rc = -errno;
    /* close() releases the context and wakes any straggling faulter, which
     * then retries its fault as an ordinary one. */
    close(t->uffd);
    t->uffd = -1;
    if (t->stop_efd >= 0)
        close(t->stop_efd);
    t->stop_efd = -1;
    if (t->pagemap_fd >= 0)
        close(t->pagemap_fd);
    t->pagemap_fd = -1;
    return rc;
}

static void uffd_async_destroy(lm_tracker *t)
{
    free(t->scan_vec);
    t->scan_vec = NULL;
}

/* The vector is allocated at the next start, at the new length. */
static int uffd_async_set_scan_vec(lm_tracker *t, uint64_t vec_len)
{
    uffd_async_destroy(t);
    t->scan_vec_len = vec_len;
    return 0;
}

const struct lm_track_ops lm_track_uffd_async_ops = {
    .uses_bitmap = 0,
    .probe = uffd_async_probe,
    .start = uffd_async_start,
    .collect = uffd_async_collect,
    .stop = uffd_stop,
    .destroy = uffd_async_destroy,
    .set_scan_vec = uffd_async_set_scan_vec,
};

const struct lm_track_ops lm_track_uffd_wp_ops = {
    .uses_bitmap = 1,
    .probe = uffd_wp_probe,
    .start = uffd_wp_start,
    .collect = uffd_wp_collect,
    .stop = uffd_stop,
};
