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
 * Backends sit behind struct lm_track_ops (lm_track_internal.h), one table
 * entry per LM_TRACK_* kind below; this file checks the state machine and
 * keeps the statistics, so a backend only arms, collects and disarms. The
 * bitmap backends (uffd-wp, mprotect) share lm_track_bitmap.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lm_track_internal.h"

static const struct lm_track_ops *const lm_track_backends[] = {
    [LM_TRACK_UFFD_ASYNC] = &lm_track_uffd_async_ops,
    [LM_TRACK_UFFD_WP] = &lm_track_uffd_wp_ops,
    [LM_TRACK_MPROTECT] = &lm_track_mprotect_ops,
};

static const struct lm_track_ops *backend(int kind)
{
    int n = (int)(sizeof(lm_track_backends) / sizeof(lm_track_backends[0]));
    return kind >= 0 && kind < n ? lm_track_backends[kind] : NULL;
}

LM_API int lm_tracker_probe(int kind, char *reason, size_t reason_cap)
{
    char scratch[8];
    if (!reason || reason_cap == 0) {
        reason = scratch;
        reason_cap = sizeof(scratch);
    }
    reason[0] = '\0';
    const struct lm_track_ops *ops = backend(kind);
    if (!ops) {
        snprintf(reason, reason_cap, "unknown tracker kind %d", kind);
        return -EINVAL;
    }
    return ops->probe(reason, reason_cap);
}

LM_API int lm_tracker_create(int kind, lm_region *region, lm_tracker **out)
{
    const struct lm_track_ops *ops = backend(kind);
    if (!out || !region || !ops)
        return -EINVAL;
    *out = NULL;
    lm_tracker *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->kind = kind;
    t->ops = ops;
    t->region = region;
    t->base = lm_region_base(region);
    t->length = lm_region_length(region);
    t->npages = lm_region_npages(region);
    t->uffd = -1;
    t->stop_efd = -1;
    t->pagemap_fd = -1;
    t->slot = -1;
    t->scan_vec_len = 1024;
    if (ops->uses_bitmap) {
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
    int rc = t->ops->start(t);
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
    int64_t n = t->ops->collect(t, pages_out);
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
    int rc = t->ops->stop(t);
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
    if (!t->ops->set_scan_vec)
        return -EOPNOTSUPP;
    if (vec_len == 0 || vec_len > (1u << 20))
        return -EINVAL;
    if (t->state == LM_TS_ARMED)
        return -EBUSY;
    return t->ops->set_scan_vec(t, vec_len);
}

LM_API void lm_tracker_destroy(lm_tracker *t)
{
    if (!t)
        return;
    if (t->state == LM_TS_ARMED)
        (void)lm_tracker_stop(t);
    if (t->ops->destroy)
        t->ops->destroy(t);
    free((void *)t->bitmap);
    free(t);
}
