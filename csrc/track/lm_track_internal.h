/*
 * Internals shared by the dirty-tracker backends (not part of the cdef).
 *
 * lm_track.c owns the lm_tracker object, its state machine and the bitmap
 * helpers; each backend file provides the five operations below.
 */
#ifndef LM_TRACK_INTERNAL_H
#define LM_TRACK_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "livemig.h"

enum lm_track_state { LM_TS_IDLE = 0, LM_TS_ARMED = 1 };

struct page_region_lm; /* PAGEMAP_SCAN output entry, defined in lm_track_uffd.c */

struct lm_tracker {
    int kind;
    int state;
    lm_region *region;
    uint8_t *base;
    uint64_t length;
    uint64_t npages;

    /* Bitmap of dirty pages (uffd-wp, mprotect): set by the fault path with
     * atomic OR, taken by collect with atomic exchange per word. */
    _Atomic uint64_t *bitmap;
    uint64_t nwords;

    /* uffd backends */
    int uffd;
    int stop_efd;            /* eventfd that tells the uffd-wp handler thread to leave */
    pthread_t handler;
    int handler_running;
    int pagemap_fd;
    uint64_t scan_vec_len;
    void *scan_vec;          /* struct page_region[scan_vec_len] */

    /* mprotect backend: slot in the global registry, -1 when not registered */
    int slot;
    _Atomic int fault_armed; /* the SIGSEGV handler records faults in this region */

    /* counters; the fault path updates them from other threads */
    _Atomic uint64_t faults;
    _Atomic uint64_t degraded_pages;
    _Atomic uint64_t handler_errors;
    int reprotect_all;       /* a run could not be re-protected alone (mprotect ENOMEM) */
    uint64_t degraded_seen;  /* degraded_pages value at the previous collect */
    lm_tracker_stats stats;
};

static inline uint64_t lm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void lm_bitmap_set(_Atomic uint64_t *bm, uint64_t page)
{
    atomic_fetch_or_explicit(&bm[page >> 6], 1ull << (page & 63), memory_order_seq_cst);
}

/* Set bits [first, first + n) with whole-word ORs where possible. */
void lm_bitmap_set_range(_Atomic uint64_t *bm, uint64_t first, uint64_t n);

/* Take every set bit (atomic exchange per word), write their indices in
 * ascending order to out, and call protect(t, first, n) for each maximal run
 * of consecutive pages. Returns the count, or the first -errno of protect
 * (the run is then re-marked dirty so nothing is lost). */
typedef int (*lm_protect_run_fn)(lm_tracker *t, uint64_t first_page, uint64_t npages);
int64_t lm_bitmap_take(lm_tracker *t, uint64_t *out, lm_protect_run_fn protect);

/* uffd backends (lm_track_uffd.c) */
int lm_uffd_async_probe(char *reason, size_t cap);
int lm_uffd_wp_probe(char *reason, size_t cap);
int lm_uffd_async_start(lm_tracker *t);
int lm_uffd_wp_start(lm_tracker *t);
int64_t lm_uffd_async_collect(lm_tracker *t, uint64_t *out);
int64_t lm_uffd_wp_collect(lm_tracker *t, uint64_t *out);
int lm_uffd_stop(lm_tracker *t);

/* mprotect backend (lm_track_mprotect.c) */
int lm_mprotect_probe(char *reason, size_t cap);
int lm_mprotect_start(lm_tracker *t);
int64_t lm_mprotect_collect(lm_tracker *t, uint64_t *out);
int lm_mprotect_stop(lm_tracker *t);
void lm_mprotect_unregister(lm_tracker *t);

#endif /* LM_TRACK_INTERNAL_H */
