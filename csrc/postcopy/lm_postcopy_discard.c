/*
 * Post-copy pages made absent again: the holes left before the guest
 * resumes (lm_postcopy_discard_absent) and pages the source's guest wrote
 * after they were sent (lm_postcopy_invalidate, hybrid migration).
 *
 * Theory of operation
 *   A page the destination holds but the source's guest wrote again must be
 *   made to fault. MADV_DONTNEED on private anonymous memory drops the page, so
 *   the next access is a MISSING fault (madvise(2)); on THP-backed memory each
 *   isolated 4 KiB discard also splits its huge page, which is most of the cost.
 *   Scattered pages mean one run per page: process_madvise(2) takes up to
 *   UIO_MAXIOV runs per call and, since Linux 6.13, any advice when the target
 *   is the calling process. It works on a pidfd of our own pid; if the kernel
 *   refuses it (ENOSYS, or EINVAL/EPERM before 6.13), madvise(2) per run is
 *   used. The present bit is cleared only after the kernel confirmed the
 *   discard, so a bit that is clear never guards a stale page that a later
 *   placement would find "already there" (EEXIST) and keep.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "lm_postcopy_state.h"

#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#define LM_PC_IOV_BATCH 1024 /* UIO_MAXIOV */

struct lm_pc_runs {
    struct iovec iov[LM_PC_IOV_BATCH];
    uint64_t first[LM_PC_IOV_BATCH];
    uint64_t count[LM_PC_IOV_BATCH];
    int n;
    int clear;    /* clear the present bits of discarded runs (invalidate) */
    int pidfd;    /* -1: not opened yet; -2: process_madvise unusable, madvise per run */
};

static void clear_range(lm_postcopy *p, uint64_t first, uint64_t n)
{
    if (!n)
        return;
    uint64_t cleared = 0;
    while (n) {
        uint64_t w = first / 64, bit = first % 64;
        uint64_t take = 64 - bit < n ? 64 - bit : n;
        uint64_t mask = take == 64 ? ~0ULL : (((1ULL << take) - 1) << bit);
        uint64_t old = __atomic_fetch_and(&p->present[w], ~mask, __ATOMIC_RELEASE);
        cleared += (uint64_t)__builtin_popcountll(mask & old);
        first += take;
        n -= take;
    }
    __atomic_fetch_sub(&p->npresent, cleared, __ATOMIC_RELAXED);
    STAT_ADD(p, pages_invalidated, cleared);
}

/* Discard the batched runs (and clear their bits when b->clear); 0 or -errno. */
static int flush_runs(lm_postcopy *p, struct lm_pc_runs *b)
{
    int *pidfd = &b->pidfd;
    int advice = (lm_region_flags(p->region) & LM_REGION_MEMFD) ? MADV_REMOVE : MADV_DONTNEED;
    int done = 0;
    if (*pidfd == -1) {
        *pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
        if (*pidfd < 0)
            *pidfd = -2;
    }
    while (*pidfd >= 0 && done < b->n) {
        STAT_ADD(p, discard_calls, 1);
        ssize_t got = syscall(SYS_process_madvise, *pidfd, &b->iov[done],
                              (size_t)(b->n - done), advice, 0U);
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            if (errno == ENOSYS || errno == EINVAL || errno == EPERM || errno == EOPNOTSUPP) {
                close(*pidfd);   /* this kernel refuses it for this advice: madvise from now */
                *pidfd = -2;
                break;
            }
            return -errno;
        }
        /* got = bytes advised, whole runs first; a run cut short is redone. */
        uint64_t left = (uint64_t)got;
        while (done < b->n && left >= b->iov[done].iov_len) {
            left -= b->iov[done].iov_len;
            clear_range(p, b->first[done], b->clear ? b->count[done] : 0);
            done++;
        }
    }
    for (; done < b->n; done++) {
        STAT_ADD(p, discard_calls, 1);
        if (madvise(b->iov[done].iov_base, b->iov[done].iov_len, advice) != 0)
            return -errno;
        clear_range(p, b->first[done], b->clear ? b->count[done] : 0);
    }
    b->n = 0;
    return 0;
}

static int add_run(lm_postcopy *p, struct lm_pc_runs *b, uint64_t first, uint64_t n)
{
    if (b->n == LM_PC_IOV_BATCH) {
        int rc = flush_runs(p, b);
        if (rc < 0)
            return rc;
    }
    b->iov[b->n].iov_base = p->base + first * LM_PAGE_SIZE;
    b->iov[b->n].iov_len = n * LM_PAGE_SIZE;
    b->first[b->n] = first;
    b->count[b->n] = n;
    b->n++;
    return 0;
}

static struct lm_pc_runs *runs_new(int clear, int flags)
{
    struct lm_pc_runs *b = malloc(sizeof(*b));
    if (b) {
        b->n = 0;
        b->clear = clear;
        b->pidfd = (flags & LM_POSTCOPY_INVALIDATE_MADVISE) ? -2 : -1;
    }
    return b;
}

/* Flush what is batched and free; 0 or the flush's -errno. */
static int runs_finish(lm_postcopy *p, struct lm_pc_runs *b)
{
    int rc = b->n ? flush_runs(p, b) : 0;
    if (b->pidfd >= 0)
        close(b->pidfd);
    free(b);
    return rc;
}

LM_API int lm_postcopy_discard_absent(lm_postcopy *p)
{
    struct lm_pc_runs *b = runs_new(0, 0);
    if (!b)
        return -ENOMEM;
    uint64_t page = 0;
    int rc = 0;
    while (page < p->npages && rc == 0) {
        if (page_is_present(p, page)) {
            page++;
            continue;
        }
        uint64_t end = page + 1;
        while (end < p->npages && !page_is_present(p, end))
            end++;
        rc = add_run(p, b, page, end - page);
        page = end;
    }
    int fin = runs_finish(p, b);
    return rc < 0 ? rc : fin;
}

LM_API int64_t lm_postcopy_invalidate(lm_postcopy *p, const uint64_t *words, uint64_t nwords,
                                      int flags)
{
    if (flags & ~LM_POSTCOPY_INVALIDATE_MADVISE)
        return -EINVAL;
    if (nwords > p->nwords)
        return -ERANGE;
    struct lm_pc_runs *b = runs_new(1, flags);
    if (!b)
        return -ENOMEM;
    uint64_t before = __atomic_load_n(&p->npresent, __ATOMIC_ACQUIRE);
    uint64_t run_first = 0, run_n = 0;
    int rc = 0;
    for (uint64_t w = 0; w < nwords && rc == 0; w++) {
        uint64_t m = words[w] & __atomic_load_n(&p->present[w], __ATOMIC_ACQUIRE);
        if (w == p->nwords - 1 && p->npages % 64)
            m &= (1ULL << (p->npages % 64)) - 1;
        while (m && rc == 0) {
            uint64_t bit = (uint64_t)__builtin_ctzll(m);
            uint64_t page = w * 64 + bit;
            /* the run of set bits starting here, within this word */
            uint64_t shifted = m >> bit;
            uint64_t ones = ~shifted == 0 ? 64 : (uint64_t)__builtin_ctzll(~shifted);
            if (run_n && run_first + run_n == page) {
                run_n += ones;
            } else {
                if (run_n)
                    rc = add_run(p, b, run_first, run_n);
                run_first = page;
                run_n = ones;
            }
            m = (bit + ones >= 64) ? 0 : m & ~(((1ULL << ones) - 1) << bit);
        }
    }
    if (rc == 0 && run_n)
        rc = add_run(p, b, run_first, run_n);
    if (rc == 0)
        rc = runs_finish(p, b);
    else
        runs_finish(p, b);
    if (rc < 0)
        return rc;
    return (int64_t)(before - __atomic_load_n(&p->npresent, __ATOMIC_ACQUIRE));
}

