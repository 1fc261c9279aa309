/*
 * Post-copy primitives: userfaultfd in MISSING mode over a guest region.
 *
 * Theory of operation (Documentation/admin-guide/mm/userfaultfd.rst,
 * ioctl_userfaultfd(2), userfaultfd(2)):
 *  - the destination resumes the guest before its memory has arrived; every
 *    page not yet placed is a hole, and a thread touching a hole blocks in the
 *    kernel while a struct uffd_msg (UFFD_EVENT_PAGEFAULT) is queued on the
 *    fd. The fd is O_NONBLOCK: the event loop polls it and read() drains
 *    whatever is queued, many messages per call;
 *  - a page is placed atomically with UFFDIO_COPY (from a buffer),
 *    UFFDIO_ZEROPAGE, or UFFDIO_MOVE (remap the caller's own anonymous page,
 *    no copy); each wakes the threads waiting on the range it placed;
 *  - benign errnos are sorted right where each ioctl returns:
 *      EEXIST  the page is already there (placed twice, or by a racing
 *              placer): counted, skipped, never an error;
 *      EAGAIN  the mapping was changing, or the kernel did part of the run:
 *              the copy/zeropage/move field says how many bytes were done;
 *              the remainder is retried;
 *      ENOENT  (MOVE) the source page is a hole: it reads as zeros, so the
 *              destination page is zero-filled;
 *      EBUSY   (MOVE) the source page is shared or pinned and cannot be
 *              remapped: it is copied instead;
 *    anything else is returned as -errno;
 *  - ordering: a bit of the present bitmap is set only after the ioctl that
 *    installed the page returned, so "bit set" implies "page mapped". A
 *    placing ioctl that wakes a waiter also unlinks its still-unread message
 *    (userfaultfd_wake_function), but a message already taken by read() can
 *    name a page placed meanwhile: such pages are not handed out, and the
 *    page is woken again, which is harmless for a waiter already woken;
 *  - closing unregisters the range; the kernel then wakes every blocked
 *    thread and lets it fault normally, i.e. read zeros. That is corruption
 *    for a live guest, so close refuses while pages are missing unless the
 *    caller explicitly abandons the guest.
 * The handle may be used from several threads at once (an urgent fault
 * channel and a bulk channel): counters and the bitmap are atomics.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#include "livemig.h"
#include "lm_postcopy_internal.h"
#include "lm_postcopy_state.h"

/* /usr/include may predate these (UFFDIO_MOVE arrived in Linux 6.8). */
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1ULL << 16)
#endif
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif
#ifndef UFFDIO_MOVE
struct uffdio_move {
    __u64 dst;
    __u64 src;
    __u64 len;
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
    __u64 mode;
    __s64 move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

/* Retrying EAGAIN forever would hang on a mapping that keeps changing. */
#define LM_PC_MAX_EAGAIN 100000
#define LM_PC_READ_BATCH 64

/* ---- opening the fd --------------------------------------------------------- */

/* userfaultfd(2) first; with vm.unprivileged_userfaultfd=0 and no
 * CAP_SYS_PTRACE it gives EPERM, and /dev/userfaultfd (access governed by its
 * file mode) is the documented alternative; last, UFFD_USER_MODE_ONLY is
 * allowed to everyone but catches no kernel-mode faults (a read(2) into a
 * missing page then fails with EFAULT instead of waiting). */
static int uffd_new(int *user_mode_only, int *first_errno)
{
    *user_mode_only = 0;
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0)
        return fd;
    *first_errno = errno;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        close(dev);
        if (fd >= 0)
            return fd;
    }
    fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd >= 0) {
        *user_mode_only = 1;
        return fd;
    }
    return -*first_errno;
}

/* UFFDIO_API can succeed only once per fd, so the features the kernel offers
 * are learnt on a throwaway fd (features = 0 asks for the list). */
static int uffd_supported_features(uint64_t *features)
{
    int umo, e0 = 0;
    int fd = uffd_new(&umo, &e0);
    if (fd < 0)
        return fd;
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    int rc = ioctl(fd, UFFDIO_API, &api) == 0 ? 0 : -errno;
    close(fd);
    if (rc == 0)
        *features = api.features;
    return rc;
}

static int uffd_open_registered(uint8_t *base, uint64_t length_bytes, uint64_t required,
                                int *flags_out, int *fd_out)
{
    uint64_t offered = 0;
    int rc = uffd_supported_features(&offered);
    if (rc < 0)
        return rc;
    if (required & ~offered)
        return -EOPNOTSUPP;
    uint64_t want = required | (offered & UFFD_FEATURE_MOVE);

    int umo, e0 = 0;
    int fd = uffd_new(&umo, &e0);
    if (fd < 0)
        return fd;
    struct uffdio_api api = {.api = UFFD_API, .features = want};
    if (ioctl(fd, UFFDIO_API, &api) != 0) {
        rc = -errno;
        close(fd);
        return rc == -EINVAL ? -EOPNOTSUPP : rc;
    }
    struct uffdio_register reg = {
        .range = {.start = (uint64_t)(uintptr_t)base, .len = length_bytes},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0) {
        rc = -errno;
        close(fd);
        return rc;
    }
    uint64_t need = (1ULL << _UFFDIO_COPY) | (1ULL << _UFFDIO_ZEROPAGE) | (1ULL << _UFFDIO_WAKE);
    if ((reg.ioctls & need) != need) {
        close(fd); /* closing the fd drops the registration */
        return -EOPNOTSUPP;
    }
    int flags = umo ? LM_POSTCOPY_USER_MODE_ONLY : 0;
    if ((api.features & UFFD_FEATURE_MOVE) && (reg.ioctls & (1ULL << _UFFDIO_MOVE)))
        flags |= LM_POSTCOPY_CAN_MOVE;
    *flags_out = flags;
    *fd_out = fd;
    return 0;
}

LM_API int lm_postcopy_open(lm_region *r, uint64_t required_features, lm_postcopy **out)
{
    if (!r || !out)
        return -EINVAL;
    *out = NULL;
    lm_postcopy *p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    p->region = r;
    p->base = lm_region_base(r);
    p->npages = lm_region_npages(r);
    p->nwords = (p->npages + 63) / 64;
    p->present = calloc(p->nwords, sizeof(uint64_t));
    if (!p->present) {
        free(p);
        return -ENOMEM;
    }
    int rc = uffd_open_registered(p->base, lm_region_length(r), required_features,
                                  &p->flags, &p->fd);
    if (rc < 0) {
        free(p->present);
        free(p);
        return rc;
    }
    *out = p;
    return 0;
}

LM_API int lm_postcopy_fd(const lm_postcopy *p) { return p->fd; }
LM_API int lm_postcopy_flags(const lm_postcopy *p) { return p->flags; }

/* ---- the present bitmap ------------------------------------------------------ */

/* Set bits [first, first + n); returns how many were newly set. */
static uint64_t mark_range(lm_postcopy *p, uint64_t first, uint64_t n)
{
    uint64_t added = 0;
    while (n) {
        uint64_t w = first / 64, bit = first % 64;
        uint64_t take = 64 - bit < n ? 64 - bit : n;
        uint64_t mask = take == 64 ? ~0ULL : (((1ULL << take) - 1) << bit);
        uint64_t old = __atomic_fetch_or(&p->present[w], mask, __ATOMIC_RELEASE);
        added += (uint64_t)__builtin_popcountll(mask & ~old);
        first += take;
        n -= take;
    }
    if (added)
        __atomic_fetch_add(&p->npresent, added, __ATOMIC_RELAXED);
    return added;
}

int lm_postcopy_page_present(const lm_postcopy *p, uint64_t page)
{
    return page_is_present(p, page);
}

uint64_t lm_postcopy_npages(const lm_postcopy *p) { return p->npages; }

LM_API int64_t lm_postcopy_mark_present(lm_postcopy *p, const uint64_t *words, uint64_t nwords)
{
    if (nwords > p->nwords)
        return -ERANGE;
    uint64_t added = 0;
    for (uint64_t w = 0; w < nwords; w++) {
        uint64_t mask = words[w];
        if (w == p->nwords - 1 && p->npages % 64)
            mask &= (1ULL << (p->npages % 64)) - 1;
        if (!mask)
            continue;
        uint64_t old = __atomic_fetch_or(&p->present[w], mask, __ATOMIC_RELEASE);
        added += (uint64_t)__builtin_popcountll(mask & ~old);
    }
    __atomic_fetch_add(&p->npresent, added, __ATOMIC_RELAXED);
    return (int64_t)added;
}

LM_API uint64_t lm_postcopy_missing(const lm_postcopy *p)
{
    return p->npages - __atomic_load_n(&p->npresent, __ATOMIC_ACQUIRE);
}

LM_API int lm_postcopy_present_bitmap(const lm_postcopy *p, uint64_t *words, uint64_t nwords)
{
    if (nwords < p->nwords)
        return -ERANGE;
    for (uint64_t w = 0; w < p->nwords; w++)
        words[w] = __atomic_load_n(&p->present[w], __ATOMIC_ACQUIRE);
    for (uint64_t w = p->nwords; w < nwords; w++)
        words[w] = 0;
    return 0;
}

LM_API int lm_postcopy_stats_get(const lm_postcopy *p, lm_postcopy_stats *out)
{
    const uint64_t *src = (const uint64_t *)&p->stats;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    return 0;
}

/* ---- reading faults ------------------------------------------------------------ */

LM_API int64_t lm_postcopy_read_faults(lm_postcopy *p, uint64_t *pages_out, uint64_t max_pages)
{
    struct uffd_msg msgs[LM_PC_READ_BATCH];
    uint64_t n = 0;
    uint64_t base = (uint64_t)(uintptr_t)p->base;
    while (n < max_pages) {
        uint64_t want = max_pages - n < LM_PC_READ_BATCH ? max_pages - n : LM_PC_READ_BATCH;
        ssize_t got = read(p->fd, msgs, want * sizeof(msgs[0]));
        if (got < 0) {
            if (errno == EAGAIN)   /* nothing queued: the non-blocking "none" */
                break;
            if (errno == EINTR)
                continue;
            return n ? (int64_t)n : -errno;
        }
        size_t nmsg = (size_t)got / sizeof(msgs[0]);
        STAT_ADD(p, faults_read, nmsg);
        for (size_t i = 0; i < nmsg; i++) {
            /* Only PAGEFAULT can arrive: no UFFD_FEATURE_EVENT_* was asked for. */
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t addr = msgs[i].arg.pagefault.address;
            if (addr < base || addr - base >= p->npages * LM_PAGE_SIZE)
                continue;
            uint64_t page = (addr - base) / LM_PAGE_SIZE;
            if (page_is_present(p, page)) {
                STAT_ADD(p, faults_on_present, 1);
                lm_postcopy_wake(p, page, 1);
                continue;
            }
            int dup = 0;
            for (uint64_t j = 0; j < n; j++)
                if (pages_out[j] == page) {
                    dup = 1;
                    break;
                }
            if (!dup)
                pages_out[n++] = page;
        }
        if (nmsg < want)
            break;
    }
    STAT_ADD(p, faults_returned, n);
    return (int64_t)n;
}

/* ---- placing pages ----------------------------------------------------------- */

static int check_range(const lm_postcopy *p, uint64_t first_page, uint64_t npages)
{
    if (first_page > p->npages || npages > p->npages - first_page)
        return -ERANGE;
    return 0;
}

LM_API int lm_postcopy_wake(lm_postcopy *p, uint64_t first_page, uint64_t npages)
{
    int rc = check_range(p, first_page, npages);
    if (rc < 0 || npages == 0)
        return rc;
    struct uffdio_range range = {
        .start = (uint64_t)(uintptr_t)(p->base + first_page * LM_PAGE_SIZE),
        .len = npages * LM_PAGE_SIZE,
    };
    STAT_ADD(p, wakes, 1);
    return ioctl(p->fd, UFFDIO_WAKE, &range) == 0 ? 0 : -errno;
}

/* One placement ioctl over [page, page + n). Sets *done_pages to the pages it
 * placed and returns 0, or a positive errno for the caller to classify. */
enum lm_pc_kind { LM_PC_COPY, LM_PC_ZERO, LM_PC_MOVE };

static int place_once(lm_postcopy *p, enum lm_pc_kind kind, uint64_t page, const uint8_t *src,
                      uint64_t n, uint64_t *done_pages)
{
    uint64_t dst = (uint64_t)(uintptr_t)(p->base + page * LM_PAGE_SIZE);
    uint64_t len = n * LM_PAGE_SIZE;
    int64_t done_bytes;
    int rc;
    STAT_ADD(p, ioctls, 1);
    if (kind == LM_PC_COPY) {
        struct uffdio_copy c = {.dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len};
        rc = ioctl(p->fd, UFFDIO_COPY, &c) == 0 ? 0 : errno;
        done_bytes = c.copy;
    } else if (kind == LM_PC_ZERO) {
        struct uffdio_zeropage z = {.range = {.start = dst, .len = len}};
        rc = ioctl(p->fd, UFFDIO_ZEROPAGE, &z) == 0 ? 0 : errno;
        done_bytes = z.zeropage;
    } else {
        struct uffdio_move m = {.dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len};
        rc = ioctl(p->fd, UFFDIO_MOVE, &m) == 0 ? 0 : errno;
        done_bytes = m.move;
    }
    /* The result field holds the bytes done, or -errno when none were. */
    *done_pages = done_bytes > 0 ? (uint64_t)done_bytes / LM_PAGE_SIZE : 0;
    if (rc == 0 && *done_pages != n)
        rc = EAGAIN; /* defensive: a short success is a partial run */
    return rc;
}

static int64_t place_run(lm_postcopy *p, enum lm_pc_kind kind, uint64_t first_page,
                         const uint8_t *src, uint64_t npages)
{
    int rc = check_range(p, first_page, npages);
    if (rc < 0)
        return rc;
    if (npages && src && ((uintptr_t)src % LM_PAGE_SIZE) && kind == LM_PC_MOVE)
        return -EINVAL;
    /* placed: returned to the caller; by_kind: by this ioctl kind (stats),
     * which excludes pages a MOVE fell back to zero-filling or copying. */
    uint64_t page = first_page, left = npages, placed = 0, by_kind = 0, eagain = 0;
    int saw_eexist = 0;
    int64_t fail = 0; /* -errno that stopped the run; placed pages still count */
    while (left && !fail) {
        uint64_t done = 0;
        int err = place_once(p, kind, page, src, left, &done);
        if (done) {
            uint64_t added = mark_range(p, page, done);
            placed += added;
            by_kind += added;
            page += done;
            left -= done;
            if (src)
                src += done * LM_PAGE_SIZE;
        }
        if (err == 0)
            continue;
        if (err == EAGAIN) {
            /* The mapping changed under us (fork, mremap, or a concurrent
             * placer), or the kernel stopped early: redo the rest. */
            if (done) {
                STAT_ADD(p, partial_runs, 1);
                continue;
            }
            STAT_ADD(p, eagain_retries, 1);
            if (++eagain > LM_PC_MAX_EAGAIN)
                fail = -EAGAIN;
            else
                sched_yield();
            continue;
        }
        if (left == 0)
            break;
        if (err == EEXIST) {
            /* The first page of the remainder is already mapped: whoever put
             * it there woke its waiters; record it and move on. */
            mark_range(p, page, 1);
            STAT_ADD(p, eexist_pages, 1);
            saw_eexist = 1;
        } else if (kind == LM_PC_MOVE && err == ENOENT) {
            /* Source hole: an anonymous hole reads as zeros, so zero-fill -
             * but only if the source is mapped at all (mincore: ENOMEM). */
            unsigned char vec;
            if (mincore((void *)src, LM_PAGE_SIZE, &vec) != 0) {
                fail = errno == ENOMEM ? -EFAULT : -errno;
                break;
            }
            int64_t z = place_run(p, LM_PC_ZERO, page, NULL, 1);
            if (z < 0) {
                fail = z;
                break;
            }
            placed += (uint64_t)z;
            STAT_ADD(p, move_src_holes, 1);
        } else if (kind == LM_PC_MOVE && err == EBUSY) {
            /* Source page shared (after fork, KSM) or pinned: copy it. */
            int64_t c = place_run(p, LM_PC_COPY, page, src, 1);
            if (c < 0) {
                fail = c;
                break;
            }
            placed += (uint64_t)c;
            STAT_ADD(p, move_busy_copies, 1);
        } else {
            fail = -err;
            break;
        }
        page++;
        left--;
        if (src)
            src += LM_PAGE_SIZE;
    }
    if (saw_eexist) {
        /* Cheap insurance: no waiter may stay asleep on a page that is there. */
        int w = lm_postcopy_wake(p, first_page, npages);
        if (w < 0 && !fail)
            fail = w;
    }
    if (kind == LM_PC_COPY)
        STAT_ADD(p, pages_copied, by_kind);
    else if (kind == LM_PC_ZERO)
        STAT_ADD(p, pages_zeroed, by_kind);
    else
        STAT_ADD(p, pages_moved, by_kind);
    return fail ? fail : (int64_t)placed;
}

LM_API int64_t lm_postcopy_copy(lm_postcopy *p, uint64_t first_page, const void *src,
                                uint64_t npages)
{
    if (!src && npages)
        return -EFAULT;
    return place_run(p, LM_PC_COPY, first_page, src, npages);
}

LM_API int64_t lm_postcopy_zero(lm_postcopy *p, uint64_t first_page, uint64_t npages)
{
    return place_run(p, LM_PC_ZERO, first_page, NULL, npages);
}

LM_API int64_t lm_postcopy_move(lm_postcopy *p, uint64_t first_page, void *src, uint64_t npages)
{
    if (!(p->flags & LM_POSTCOPY_CAN_MOVE))
        return -EOPNOTSUPP;
    if (!src && npages)
        return -EFAULT;
    return place_run(p, LM_PC_MOVE, first_page, src, npages);
}

/* ---- closing ------------------------------------------------------------------ */

LM_API int lm_postcopy_close(lm_postcopy *p, int flags)
{
    if (!p)
        return 0;
    if (flags & ~LM_POSTCOPY_CLOSE_ABANDON)
        return -EINVAL;
    if (lm_postcopy_missing(p) && !(flags & LM_POSTCOPY_CLOSE_ABANDON))
        return -EBUSY;
    struct uffdio_range range = {
        .start = (uint64_t)(uintptr_t)p->base,
        .len = p->npages * LM_PAGE_SIZE,
    };
    /* Failure here is not fatal: close() below drops the registration too. */
    (void)ioctl(p->fd, UFFDIO_UNREGISTER, &range);
    close(p->fd);
    free(p->present);
    free(p);
    return 0;
}

/* ---- probing -------------------------------------------------------------------- */

static void explain_open_failure(int err, char *reason, size_t cap)
{
    int sysctl = -1;
    FILE *f = fopen("/proc/sys/vm/unprivileged_userfaultfd", "re");
    if (f) {
        if (fscanf(f, "%d", &sysctl) != 1)
            sysctl = -1;
        fclose(f);
    }
    if (err == ENOSYS)
        snprintf(reason, cap, "userfaultfd(2) is not available (ENOSYS): kernel built without "
                 "CONFIG_USERFAULTFD, or a seccomp filter blocks the syscall");
    else if (err == EPERM || err == EACCES)
        snprintf(reason, cap, "userfaultfd(2) refused (%s): vm.unprivileged_userfaultfd=%d and "
                 "the process lacks CAP_SYS_PTRACE, /dev/userfaultfd is not accessible, or "
                 "seccomp denies it", err == EPERM ? "EPERM" : "EACCES", sysctl);
    else if (err == EOPNOTSUPP)
        snprintf(reason, cap, "the kernel's userfaultfd lacks MISSING registration with "
                 "UFFDIO_COPY/ZEROPAGE on anonymous memory (too old?)");
    else
        snprintf(reason, cap, "opening userfaultfd failed: %s", strerror(err));
}

LM_API int lm_postcopy_probe(char *reason, size_t reason_cap)
{
    char scratch[2];
    if (!reason || reason_cap == 0) {
        reason = scratch;
        reason_cap = sizeof(scratch);
    }
    reason[0] = '\0';
    lm_region *r = NULL;
    int rc = lm_region_create(2 * LM_PAGE_SIZE, LM_REGION_ANON, &r);
    if (rc < 0) {
        snprintf(reason, reason_cap, "cannot map a scratch region: %s", strerror(-rc));
        return 0;
    }
    lm_postcopy *p = NULL;
    rc = lm_postcopy_open(r, 0, &p);
    if (rc < 0) {
        explain_open_failure(-rc, reason, reason_cap);
        lm_region_destroy(r);
        return 0;
    }
    int caps = LM_POSTCOPY_CAN_MISSING;
    if (p->flags & LM_POSTCOPY_USER_MODE_ONLY)
        caps |= LM_POSTCOPY_USER_MODE_ONLY;
    if (p->flags & LM_POSTCOPY_CAN_MOVE) {
        /* Really move one page, since MOVE has its own restrictions. */
        void *src = mmap(NULL, LM_PAGE_SIZE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (src != MAP_FAILED) {
            memset(src, 0x5a, LM_PAGE_SIZE);
            int64_t m = lm_postcopy_move(p, 0, src, 1);
            if (m == 1 && lm_region_base(r)[0] == 0x5a)
                caps |= LM_POSTCOPY_CAN_MOVE;
            else
                snprintf(reason, reason_cap, "UFFDIO_MOVE is offered but failed: %s",
                         m < 0 ? strerror((int)-m) : "wrong contents");
            munmap(src, LM_PAGE_SIZE);
        }
    } else {
        snprintf(reason, reason_cap, "UFFDIO_MOVE is not offered (needs Linux >= 6.8)");
    }
    lm_postcopy_close(p, LM_POSTCOPY_CLOSE_ABANDON);
    lm_region_destroy(r);
    return caps;
}
