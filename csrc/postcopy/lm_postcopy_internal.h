/*
 * Shared between lm_postcopy.c and channels/lm_urgent_dest.c only (not part
 * of the cdef):
 * the urgent fault thread asks whether one page is present without copying
 * the whole bitmap.
 */
#ifndef LM_POSTCOPY_INTERNAL_H
#define LM_POSTCOPY_INTERNAL_H

#include "livemig.h"

/* 1 when page is present (placed or marked), 0 otherwise; acquire load, so a
 * set bit implies the page is mapped. page must be < the region's npages. */
int lm_postcopy_page_present(const lm_postcopy *p, uint64_t page);
uint64_t lm_postcopy_npages(const lm_postcopy *p);

#endif
