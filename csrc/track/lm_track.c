/*
 * Dirty-page trackers: the one interface over three backends.
 *
 * A tracker is IDLE (created or stopped) or ARMED (between start and stop).
 * collect is legal only while ARMED; start only while IDLE. The caller
 * serialises start/collect/stop/destroy on one tracker (the Python wrapper
 * does); the fault paths run concurrently on other threads and touch only the
 * bitmap and the atomic counters.
 *
 * Contract shared by every backend: a write made while ARMED is reported by
 * the collect that follows it or by the next one, never lost; each collect
 * lists page indices in ascending order, each at most once, and re-arms them
 * before it returns, so the caller may copy the reported pages afterwards and
 * hold a copy at least as new as every write the report covers.
 *
 * The bitmap backends (uffd-wp, mprotect) share lm_bitmap_take: its cost is
 * one load per 64 pages plus work proportional to the dirty pages, and it
 * re-protects maximal runs of consecutive pages with one call each.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lm_track_internal.h"

void lm_bitmap_set_range(_Atomic uint64_t *bm, uint64_t first, uint64_t n)
{
    uint64_t p = first, end = first + n;
    while (p < end) {
        uint64_t bit = p & 63;
        uint64_t take = 64 - bit;
        if (take > end - p)
            take = end - p;
        uint64_t mask = (take == 64) ? ~0ull : (((1ull << take) - 1) << bit);
        atomic_fetch_or_explicit(&bm[p >> 6], mask, memory_order_seq_cst);
        p += take;
    }
}

static void flush_run(lm_tracker *t, lm_protect_run_fn protect, uint64_t first, uint64_t n)
{
    if (n == 0)
        return;
    t->stats.protect_calls++;
    if (protect(t, first, n) != 0) {
        /* The run stays writable: report it again next round, conservatively,
         * so a write made after this collect cannot go unnoticed. */
        lm_bitmap_set_range(t->bitmap, first, n);
        atomic_fetch_add(&t->degraded_pages, n);
    }
}

int64_t lm_bitmap_take(lm_tracker *t, uint64_t *out, lm_protect_run_fn protect)
{
    uint64_t count = 0, run_first = 0, run_n = 0;
    for (uint64_t i = 0; i < t->nwords; i++) {
        /* A plain load first keeps an idle collect from dirtying cache lines. */
        if (atomic_load_explicit(&t->bitmap[i], memory_order_relaxed) == 0)
            continue;
        uint64_t w = atomic_exchange_explicit(&t->bitmap[i], 0, memory_order_seq_cst);
        while (w) {
            uint64_t page = (i << 6) + (uint64_t)__builtin_ctzll(w);
            w &= w - 1;
            out[count++] = page;
            if (run_n && page == run_first + run_n) {
                run_n++;
            } else {
                flush_run(t, protect, run_first, run_n);
                run_first = page;
                run_n = 1;
            }
        }
    }
    flush_run(t, protect, run_first, run_n);
    return (int64_t)count;
}

static int kind_valid(int kind)
{
    return kind == LM_TRACK_UFFD_ASYNC || kind == LM_TRACK_UFFD_WP || kind == LM_TRACK_MPROTECT;
}

LM_API int lm_tracker_probe(int kind, char *reason, size_t reason_cap)
{
    char scratch[8];
    if (!reason || reason_cap == 0) {
        reason = scratch;
        reason_cap = sizeof(scratch);
    }
    reason[0] = '\0';
    switch (kind) {
    case LM_TRACK_UFFD_ASYNC:
        return lm_uffd_async_probe(reason, reason_cap);
    case LM_TRACK_UFFD_WP:
        return lm_uffd_wp_probe(reason, reason_cap);
    case LM_TRACK_MPROTECT:
        return lm_mprotect_probe(reason, reason_cap);
    default:
        snprintf(reason, reason_cap, "unknown tracker kind %d", kind);
        return -EINVAL;
    }
}

LM_API int lm_tracker_create(int kind, lm_region *region, lm_tracker **out)
{
    if (!out || !region || !kind_valid(kind))
        return -EINVAL;
    *out = NULL;
    lm_tracker *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->kind = kind;
    t->region = region;
    t->base = lm_region_base(region);
    t->length = lm_region_length(region);
    t->npages = lm_region_npages(region);
    t->uffd = -1;
    t->stop_efd = -1;
    t->pagemap_fd = -1;
    t->slot = -1;
    t->scan_vec_len = 1024;
    if (kind != LM_TRACK_UFFD_ASYNC) {
        t->nwords = (t->npages + 63) / 64;
        t->bitmap = calloc(t->nwords, sizeof(uint64_t));
        if (!t->bitmap) {
            free(t);
            return -ENOMEM;
        }
    }
    *out = t;
    return 0;
}

LM_API int lm_tracker_start(lm_tracker *t)
{
    if (t->state == LM_TS_ARMED)
        return -EBUSY;
    uint64_t t0 = lm_now_ns();
    int rc;
    switch (t->kind) {
    case LM_TRACK_UFFD_ASYNC: rc = lm_uffd_async_start(t); break;
    case LM_TRACK_UFFD_WP: rc = lm_uffd_wp_start(t); break;
    default: rc = lm_mprotect_start(t); break;
    }
    if (rc == 0) {
        t->state = LM_TS_ARMED;
        t->stats.arm_ns = lm_now_ns() - t0;
    }
    return rc;
}

LM_API int64_t lm_tracker_collect(lm_tracker *t, uint64_t *pages_out, uint64_t max_pages)
{
    if (t->state != LM_TS_ARMED)
        return -EINVAL;
    if (!pages_out || max_pages < t->npages)
        return -ENOSPC;
    uint64_t t0 = lm_now_ns();
    int64_t n;
    switch (t->kind) {
    case LM_TRACK_UFFD_ASYNC: n = lm_uffd_async_collect(t, pages_out); break;
    case LM_TRACK_UFFD_WP: n = lm_uffd_wp_collect(t, pages_out); break;
    default: n = lm_mprotect_collect(t, pages_out); break;
    }
    if (n < 0)
        return n;
    t->stats.last_collect_ns = lm_now_ns() - t0;
    t->stats.collects++;
    t->stats.pages_reported += (uint64_t)n;
    uint64_t degraded = atomic_load(&t->degraded_pages);
    if (degraded != t->degraded_seen) {
        t->stats.degraded_collects++;
        t->degraded_seen = degraded;
    }
    return n;
}

LM_API int lm_tracker_stop(lm_tracker *t)
{
    if (t->state != LM_TS_ARMED)
        return -EINVAL;
    int rc = (t->kind == LM_TRACK_MPROTECT) ? lm_mprotect_stop(t) : lm_uffd_stop(t);
    t->state = LM_TS_IDLE;
    if (t->bitmap)
        memset((void *)t->bitmap, 0, t->nwords * sizeof(uint64_t));
    return rc;
}

LM_API int lm_tracker_stats_get(const lm_tracker *t, lm_tracker_stats *out)
{
    *out = t->stats;
    out->faults = atomic_load(&((lm_tracker *)t)->faults);
    out->degraded_pages = atomic_load(&((lm_tracker *)t)->degraded_pages);
    out->handler_errors = atomic_load(&((lm_tracker *)t)->handler_errors);
    return 0;
}

LM_API int lm_tracker_kind(const lm_tracker *t) { return t->kind; }

LM_API int lm_tracker_set_scan_vec(lm_tracker *t, uint64_t vec_len)
{
    if (t->kind != LM_TRACK_UFFD_ASYNC)
        return -EOPNOTSUPP;
    if (vec_len == 0 || vec_len > (1u << 20))
        return -EINVAL;
    if (t->state == LM_TS_ARMED)
        return -EBUSY;
    free(t->scan_vec);
    t->scan_vec = NULL;
    t->scan_vec_len = vec_len;
    return 0;
}

LM_API void lm_tracker_destroy(lm_tracker *t)
{
    if (!t)
        return;
    if (t->state == LM_TS_ARMED)
        (void)lm_tracker_stop(t);
    lm_mprotect_unregister(t);
    free(t->scan_vec);
    free((void *)t->bitmap);
    free(t);
}
