/*
 * Internals shared by the dirty-tracker backends (not part of the cdef).
 *
 * lm_track.c owns the lm_tracker object and its state machine and reaches
 * each backend only through its const struct lm_track_ops, registered in
 * lm_track.c's table by kind. Backends see only this header: the object,
 * and the bitmap helpers of lm_track_bitmap.c.
 */
#ifndef LM_TRACK_INTERNAL_H
#define LM_TRACK_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "livemig.h"

enum lm_track_state { LM_TS_IDLE = 0, LM_TS_ARMED = 1 };

struct lm_tracker;

/* One dirty-tracking backend. lm_track.c checks the state machine (armed or
 * not, output room) before calling, so an op never sees an illegal call. */
struct lm_track_ops {
    int uses_bitmap;   /* the fault path records pages in lm_tracker.bitmap */
    /* 0 when this backend can run here; else -errno and a reason. */
    int (*probe)(char *reason, size_t cap);
    /* Arm every page of t->region. */
    int (*start)(struct lm_tracker *t);
    /* Written pages since the last collect, ascending, re-armed; the count. */
    int64_t (*collect)(struct lm_tracker *t, uint64_t *out);
    /* Disarm: memory writable, no further faults. */
    int (*stop)(struct lm_tracker *t);
    /* Release what outlives stop (may be NULL). */
    void (*destroy)(struct lm_tracker *t);
    /* Set the PAGEMAP_SCAN output length while idle (NULL: not applicable). */
    int (*set_scan_vec)(struct lm_tracker *t, uint64_t vec_len);
};

extern const struct lm_track_ops lm_track_uffd_async_ops;   /* lm_track_uffd.c */
extern const struct lm_track_ops lm_track_uffd_wp_ops;      /* lm_track_uffd.c */
extern const struct lm_track_ops lm_track_mprotect_ops;     /* lm_track_mprotect.c */

struct lm_tracker {
    int kind;
    const struct lm_track_ops *ops;
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

/* ---- lm_track_bitmap.c ---- */
/* Set bits [first, first + n) with whole-word ORs where possible. */
void lm_bitmap_set_range(_Atomic uint64_t *bm, uint64_t first, uint64_t n);

/* Take every set bit (atomic exchange per word), write their indices in
 * ascending order to out, and call protect(t, first, n) for each maximal run
 * of consecutive pages. Returns the count, or the first -errno of protect
 * (the run is then re-marked dirty so nothing is lost). */
typedef int (*lm_protect_run_fn)(lm_tracker *t, uint64_t first_page, uint64_t npages);
int64_t lm_bitmap_take(lm_tracker *t, uint64_t *out, lm_protect_run_fn protect);

#endif /* LM_TRACK_INTERNAL_H */
