/*
 * Shared inside the module (not part of the cdef): the urgent fault thread
 * and the bulk streams ask whether one page is present without copying the
 * whole bitmap; the fault-serving loop of lm_zerofill.c.
 */
#ifndef LM_POSTCOPY_INTERNAL_H
#define LM_POSTCOPY_INTERNAL_H

#include "livemig.h"

/* 1 when page is present (placed or marked), 0 otherwise; acquire load, so a
 * set bit implies the page is mapped. page must be < the region's npages. */
int lm_postcopy_page_present(const lm_postcopy *p, uint64_t page);
uint64_t lm_postcopy_npages(const lm_postcopy *p);
/* Answer p's faults until stop_fd is readable: with the page's copy from
 * src (src + page * LM_PAGE_SIZE), or with the zero page when src is NULL.
 * Returns the pages placed, or the -errno that ended it. */
int64_t lm_serve_faults(lm_postcopy *p, const uint8_t *src, int stop_fd);

#endif
