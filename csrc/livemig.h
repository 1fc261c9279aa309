/*
 * livemig.h — the whole contract between the native core and Python.
 *
 * Rules (see docs/architecture.md):
 *  - every entry point is lm_<object>_<verb>, works on an opaque handle and
 *    returns 0, a count, or -errno; it never prints and never calls back into
 *    Python;
 *  - there are no hidden globals, with one documented exception: the
 *    mprotect tracker's region registry, which its SIGSEGV handler must reach;
 *  - the text between LM_CDEF_BEGIN and LM_CDEF_END is fed verbatim to CFFI's
 *    cdef, so it holds only declarations and integer #defines.
 *
 * LM_ABI_VERSION changes whenever a declaration below changes; the Python
 * side refuses a compiled module whose lm_abi_version() differs from the one
 * it was written for.
 */
#ifndef LIVEMIG_H
#define LIVEMIG_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define LM_API __attribute__((visibility("default")))
#else
#define LM_API
#endif

/* LM_CDEF_BEGIN */
#define LM_ABI_VERSION 1
#define LM_PAGE_SIZE 4096

int lm_abi_version(void);

/* ---- guest memory regions (lm_region.c) -------------------------------- */
#define LM_REGION_ANON 0
#define LM_REGION_MEMFD 1      /* back the region with a memfd (shareable) */
#define LM_REGION_HUGEPAGE 2   /* madvise(MADV_HUGEPAGE) on the region */

typedef struct lm_region lm_region;

/* length_bytes must be a positive multiple of LM_PAGE_SIZE. The mapping is
 * 2 MiB aligned; it is reserved lazily (MAP_NORESERVE), so pages cost memory
 * only once touched. */
int lm_region_create(uint64_t length_bytes, int flags, lm_region **out);
void lm_region_destroy(lm_region *r);
uint8_t *lm_region_base(const lm_region *r);
uint64_t lm_region_length(const lm_region *r);
uint64_t lm_region_npages(const lm_region *r);
int lm_region_flags(const lm_region *r);
/* MADV_DONTNEED over [first_page, first_page + npages): the pages read as
 * zero afterwards and give their memory back. */
int lm_region_discard(lm_region *r, uint64_t first_page, uint64_t npages);

/* ---- dirty trackers (lm_track_uffd.c, lm_track_mprotect.c) ------------- */
/* Declarations of the tracker interface follow this line. */

/* ---- vCPUs: the toy ISA interpreter (lm_vcpu.c) ------------------------- */
/* Declarations of the vCPU interface follow this line. */

/* ---- post-copy: userfaultfd MISSING primitives (lm_postcopy.c) --------- */
/* Declarations of the post-copy interface follow this line. */

/* ---- page codec hot loops (lm_pagecodec.c) ----------------------------- */
/* Declarations of the page-codec helpers follow this line. */
/* Pages are addressed as base + index * LM_PAGE_SIZE; every function checks
 * each index against npages (and each slot against nslots) before touching
 * memory and returns -ERANGE otherwise. indices == NULL means 0 .. n-1. */
#define LM_DELTA_TOO_BIG -1  /* out_lengths[i]: delta larger than allowed */

/* out_zero[i] = 1 when page indices[i] is all zero bytes. Returns the number
 * of zero pages. */
int lm_pages_zero_scan(const uint8_t *base, uint64_t npages, const int64_t *indices,
                       uint64_t n, uint8_t *out_zero);
/* out_hashes[i] = the 64-bit content hash of page indices[i]. */
int lm_pages_hash(const uint8_t *base, uint64_t npages, const int64_t *indices,
                  uint64_t n, uint64_t *out_hashes);
/* For each i: snapshot page indices[i] of base, XOR-delta it against the old
 * version in slab[slots[i]] into out (appended), then store the snapshot in
 * slab[slots[i]]. out_lengths[i] = the delta length, or LM_DELTA_TOO_BIG (no
 * bytes appended) when it would exceed max_page_bytes or the space left in
 * out. Returns the total bytes appended. */
int lm_pages_delta_encode(const uint8_t *base, uint64_t npages, const int64_t *indices,
                          uint8_t *slab, uint64_t nslots, const int64_t *slots, uint64_t n,
                          uint8_t *out, uint64_t out_cap, uint32_t max_page_bytes,
                          int32_t *out_lengths);
/* Apply n concatenated deltas (lengths[i] bytes each, enc_len in total) in
 * place onto n contiguous pages. Returns 0, or -EINVAL for a malformed delta
 * (the pages may then hold partial results and must be discarded). */
int lm_pages_delta_apply(uint8_t *pages, uint64_t n, const uint8_t *enc, uint64_t enc_len,
                         const uint16_t *lengths);

/* LM_CDEF_END */

#endif /* LIVEMIG_H */
