/*
 * mprotect dirty tracker: PROT_READ + a SIGSEGV handler. Works on any kernel.
 *
 * start makes the region read-only. A write faults; the kernel delivers
 * SIGSEGV (si_code SEGV_ACCERR, si_addr = the address) to the writing thread,
 * whose handler finds the tracker owning the address, makes that one page
 * writable again and only then sets its bit (the same ordering, and the same
 * race-freedom argument, as the uffd-wp tracker in lm_track_uffd.c: the
 * store is retried after the handler returns, so it follows the bit).
 * collect takes the bits and re-protects the collected runs.
 *
 * The handler is process-wide, so it reaches trackers through the one global
 * of the native core: a fixed registry of LM_TRACK_MAX_REGIONS slots, each an
 * atomic tracker pointer. The handler only loads from it (lock-free, async-
 * signal-safe); slots are claimed under a mutex outside signal context. A
 * handler announces itself in `inflight` before reading the registry, and
 * releasing a slot waits for inflight to drain, so a tracker is never freed
 * under a running handler. A slot stays registered (disarmed) from stop until
 * destroy, so a write that faulted just before stop is absorbed, not taken
 * for a crash. Faults outside every tracked region go to the handler that was
 * installed before ours (pytest's faulthandler, for one): its sa_sigaction or
 * sa_handler is called, or, when it was SIG_DFL/SIG_IGN, the default action is
 * restored and the handler returns so the instruction faults again and the
 * process dies with SIGSEGV as it would have without us.
 *
 * Known trap: every isolated writable page splits the VMA in three, and past
 * vm.max_map_count (65530 by default) mprotect fails with ENOMEM, around 32k
 * isolated dirty pages. The handler then makes the surrounding 2 MiB block,
 * or failing that the whole region, writable and marks all of it dirty
 * (conservative, counted in degraded_pages); collect, when re-protecting a run
 * fails with ENOMEM, re-protects the whole region with one call — that merges
 * its VMAs and so cannot need a split.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "lm_track_internal.h"

#define LM_BLOCK_PAGES 512 /* 2 MiB */

static _Atomic(lm_tracker *) lm_mp_registry[LM_TRACK_MAX_REGIONS];
static _Atomic int lm_mp_inflight;
static struct sigaction lm_mp_prev;
static pthread_mutex_t lm_mp_lock = PTHREAD_MUTEX_INITIALIZER;

static void mp_record_fault(lm_tracker *t, uintptr_t addr)
{
    uintptr_t base = (uintptr_t)t->base;
    uint64_t page = (addr - base) / LM_PAGE_SIZE;
    if (mprotect(t->base + page * LM_PAGE_SIZE, LM_PAGE_SIZE, PROT_READ | PROT_WRITE) == 0) {
        lm_bitmap_set(t->bitmap, page);
        atomic_fetch_add(&t->faults, 1);
        return;
    }
    /* ENOMEM: the map count is exhausted. Coarser blocks split less. */
    uint64_t first = page & ~(uint64_t)(LM_BLOCK_PAGES - 1), n = LM_BLOCK_PAGES;
    if (first + n > t->npages)
        n = t->npages - first;
    if (mprotect(t->base + first * LM_PAGE_SIZE, n * LM_PAGE_SIZE, PROT_READ | PROT_WRITE) != 0) {
        first = 0;
        n = t->npages;
        if (mprotect(t->base, t->length, PROT_READ | PROT_WRITE) != 0) {
            /* Nothing made writable: the store faults again; count it. */
            atomic_fetch_add(&t->handler_errors, 1);
            return;
        }
    }
    lm_bitmap_set_range(t->bitmap, first, n);
    atomic_fetch_add(&t->degraded_pages, n);
    atomic_fetch_add(&t->faults, 1);
}

static void mp_chain(int sig, siginfo_t *si, void *ctx)
{
    struct sigaction prev = lm_mp_prev;
    if (prev.sa_flags & SA_SIGINFO) {
        prev.sa_sigaction(sig, si, ctx);
        return;
    }
    if (prev.sa_handler == SIG_DFL || prev.sa_handler == SIG_IGN) {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof(dfl));
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        sigaction(sig, &dfl, NULL);
        return; /* the faulting instruction runs again and takes the default action */
    }
    prev.sa_handler(sig);
}

static void mp_handler(int sig, siginfo_t *si, void *ctx)
{
    int saved_errno = errno;
    uintptr_t addr = (uintptr_t)si->si_addr;
    int handled = 0;
    atomic_fetch_add(&lm_mp_inflight, 1);
    for (int i = 0; i < LM_TRACK_MAX_REGIONS && !handled; i++) {
        lm_tracker *t = atomic_load(&lm_mp_registry[i]);
        if (!t || addr < (uintptr_t)t->base || addr - (uintptr_t)t->base >= t->length)
            continue;
        handled = 1;
        if (atomic_load(&t->fault_armed))
            mp_record_fault(t, addr);
        /* disarmed: the region is writable again; the store simply retries */
    }
    atomic_fetch_sub(&lm_mp_inflight, 1);
    if (!handled)
        mp_chain(sig, si, ctx);
    errno = saved_errno;
}

/* Install our handler unless it is the current one (someone — faulthandler
 * being re-enabled, say — may have replaced it since); remember the previous
 * one for chaining. Called under lm_mp_lock. */
static int mp_install(void)
{
    struct sigaction cur;
    if (sigaction(SIGSEGV, NULL, &cur) != 0)
        return -errno;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == mp_handler)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = mp_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    lm_mp_prev = cur;
    if (sigaction(SIGSEGV, &sa, NULL) != 0)
        return -errno;
    return 0;
}

static int mp_register(lm_tracker *t)
{
    if (t->slot >= 0)
        return 0;
    pthread_mutex_lock(&lm_mp_lock);
    int rc = mp_install();
    if (rc == 0) {
        rc = -ENOSPC;
        for (int i = 0; i < LM_TRACK_MAX_REGIONS; i++) {
            if (atomic_load(&lm_mp_registry[i]) == NULL) {
                atomic_store(&lm_mp_registry[i], t);
                t->slot = i;
                rc = 0;
                break;
            }
        }
    }
    pthread_mutex_unlock(&lm_mp_lock);
    return rc;
}

/* Release the slot and wait until no handler can still be looking at t. */
static void mp_unregister(lm_tracker *t)
{
    if (t->slot < 0)
        return;
    pthread_mutex_lock(&lm_mp_lock);
    atomic_store(&lm_mp_registry[t->slot], NULL);
    t->slot = -1;
    pthread_mutex_unlock(&lm_mp_lock);
    while (atomic_load(&lm_mp_inflight) != 0)
        sched_yield();
}

static int mprotect_probe(char *reason, size_t cap)
{
    if (sysconf(_SC_PAGESIZE) != LM_PAGE_SIZE) {
        snprintf(reason, cap, "page size is not %d bytes", LM_PAGE_SIZE);
        return -EOPNOTSUPP;
    }
    return 0;
}

static int mprotect_start(lm_tracker *t)
{
    int rc = mp_register(t);
    if (rc != 0)
        return rc;
    atomic_store(&t->fault_armed, 1);
    if (mprotect(t->base, t->length, PROT_READ) != 0) {
        rc = -errno;
        atomic_store(&t->fault_armed, 0);
        return rc;
    }
    return 0;
}

static int mp_protect_run(lm_tracker *t, uint64_t first_page, uint64_t npages)
{
    if (t->reprotect_all)
        return 0; /* the whole region is re-protected after the scan */
    if (mprotect(t->base + first_page * LM_PAGE_SIZE, npages * LM_PAGE_SIZE, PROT_READ) == 0)
        return 0;
    if (errno == ENOMEM) {
        t->reprotect_all = 1;
        return 0;
    }
    return -errno;
}

static int64_t mprotect_collect(lm_tracker *t, uint64_t *out)
{
    t->reprotect_all = 0;
    int64_t n = lm_bitmap_take(t, out, mp_protect_run);
    if (t->reprotect_all) {
        /* Protecting pages that are clean, or dirty but not yet taken, only
         * adds faults: their bits survive and the next collect reports them. */
        t->stats.coarse_protects++;
        t->stats.protect_calls++;
        if (mprotect(t->base, t->length, PROT_READ) != 0) {
            lm_bitmap_set_range(t->bitmap, 0, t->npages);
            atomic_fetch_add(&t->degraded_pages, t->npages);
        }
        t->reprotect_all = 0;
    }
    return n;
}

static int mprotect_stop(lm_tracker *t)
{
    /* Writable first, then disarm: a fault racing with stop is still recorded
     * (harmless) or absorbed as a retry, never chained as a crash. */
    int rc = mprotect(t->base, t->length, PROT_READ | PROT_WRITE) == 0 ? 0 : -errno;
    atomic_store(&t->fault_armed, 0);
    return rc;
}

const struct lm_track_ops lm_track_mprotect_ops = {
    .uses_bitmap = 1,
    .probe = mprotect_probe,
    .start = mprotect_start,
    .collect = mprotect_collect,
    .stop = mprotect_stop,
    /* The slot stays registered from stop until here (see above). */
    .destroy = mp_unregister,
};
