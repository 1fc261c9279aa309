/*
 * The post-copy handle itself, shared by the files that implement it
 * (lm_postcopy.c: opening, faults, placing, closing; lm_postcopy_discard.c:
 * making pages absent). Not part of the cdef, and not for other layers:
 * they use lm_postcopy_internal.h.
 */
#ifndef LM_POSTCOPY_STATE_H
#define LM_POSTCOPY_STATE_H

#include "livemig.h"

struct lm_postcopy {
    lm_region *region;
    uint8_t *base;
    uint64_t npages;
    uint64_t nwords;
    int fd;
    int flags;                 /* LM_POSTCOPY_CAN_MOVE | LM_POSTCOPY_USER_MODE_ONLY */
    uint64_t npresent;         /* atomic */
    uint64_t *present;         /* atomic words */
    lm_postcopy_stats stats;   /* atomic fields */
};

#define STAT_ADD(p, field, n) __atomic_fetch_add(&(p)->stats.field, (uint64_t)(n), __ATOMIC_RELAXED)

static inline int page_is_present(const lm_postcopy *p, uint64_t page)
{
    uint64_t w = __atomic_load_n(&p->present[page / 64], __ATOMIC_ACQUIRE);
    return (int)((w >> (page % 64)) & 1);
}

#endif /* LM_POSTCOPY_STATE_H */
