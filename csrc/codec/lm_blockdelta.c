/*
 * Block fingerprints: a delta for re-sent pages that needs no copy of them.
 *
 * DELTA (lm_pagecodec.c) XORs a page against the version last sent, which the
 * source must keep: a bounded cache, so a guest dirtying more memory than the
 * cache holds gets few DELTA hits and re-sends whole pages. Here the source
 * keeps only a fingerprint of what the receiver holds: one 64-bit hash per
 * 256-byte block, 16 per page (128 bytes per 4 KiB page, 3 % of guest
 * memory). When a page is sent again, the blocks whose hash changed are the
 * only ones that must travel (a BLOCK page: a 16-bit mask and those blocks);
 * the receiver writes them over its own copy. A guest that changes one word
 * of a page then costs 258 bytes on the wire instead of 4096.
 *
 * The page hash every digest is made of is itself a tree over the same
 * block hashes (lm_pagehash.h), so one pass per page gives both; the block
 * hashes are compared with the stored fingerprint and replace it: after the
 * batch is sent the receiver holds exactly the bytes hashed. The receiver
 * keeps the block hashes of what it holds too, so after writing a BLOCK
 * page's blocks it rehashes only those to get the new page hash. The caller hashes
 * a snapshot of a live page (a staging copy), never memory the guest may be
 * writing, or the fingerprint could describe bytes that never left.
 *
 * Correctness does not rest on the block hashes: a collision (2^-64 per
 * changed block) would leave a stale block at the receiver, which the
 * end-of-migration digest of full-page hashes detects, and the migration
 * fails safe (the source resumes).
 */
#include <errno.h>
#include <string.h>

#include "livemig.h"
#include "lm_pagehash.h"

#define WORDS_PER_BLOCK (LM_BLOCK_BYTES / 8)

_Static_assert(LM_BLOCKS_PER_PAGE * LM_BLOCK_BYTES == LM_PAGE_SIZE, "blocks tile a page");
_Static_assert(LM_BLOCKS_PER_PAGE <= 16, "a block mask is 16 bits");

static int rows_in_range(uint64_t nrows, const int64_t *rows, uint64_t n)
{
    if (!rows)
        return n <= nrows;
    for (uint64_t i = 0; i < n; i++)
        if (rows[i] < 0 || (uint64_t)rows[i] >= nrows)
            return 0;
    return 1;
}

static inline uint64_t row_of(const int64_t *rows, uint64_t i)
{
    return rows ? (uint64_t)rows[i] : i;
}

/* Block hashes of p into fp[LM_BLOCKS_PER_PAGE]; returns the page hash
 * (lm_pagehash.h). With copy_to, each block is first copied there and hashed
 * from the copy (still in L1), so a snapshot costs no second pass over guest
 * memory and the hashes describe the snapshot even if the guest writes p
 * meanwhile. */
static uint64_t fingerprint_page(const uint8_t *p, uint64_t *fp, uint8_t *copy_to)
{
    if (!copy_to)
        return page_blocks_hash(p, fp);
    for (int b = 0; b < LM_BLOCKS_PER_PAGE; b++) {
        memcpy(copy_to + b * LM_BLOCK_BYTES, p + b * LM_BLOCK_BYTES, LM_BLOCK_BYTES);
        fp[b] = block_hash(copy_to + b * LM_BLOCK_BYTES, b);
    }
    return combine_blocks(fp);
}

LM_API int lm_pages_snapshot_fingerprint(const uint8_t *base, uint64_t npages,
                                         const int64_t *rows, uint64_t n, uint8_t *out_pages,
                                         uint64_t *fp, uint64_t fp_npages,
                                         const int64_t *fp_rows, const uint8_t *fp_valid,
                                         uint16_t *out_changed, uint64_t *out_hashes)
{
    if (!fp_rows || !rows_in_range(npages, rows, n) || !rows_in_range(fp_npages, fp_rows, n))
        return -ERANGE;
    uint64_t nw[LM_BLOCKS_PER_PAGE];
    for (uint64_t i = 0; i < n; i++) {
        uint64_t r = (uint64_t)fp_rows[i];
        uint64_t *old = fp + r * LM_BLOCKS_PER_PAGE;
        out_hashes[i] = fingerprint_page(base + row_of(rows, i) * LM_PAGE_SIZE, nw,
                                         out_pages ? out_pages + i * LM_PAGE_SIZE : NULL);
        uint16_t changed = 0;
        for (int b = 0; b < LM_BLOCKS_PER_PAGE; b++)
            changed |= (uint16_t)((nw[b] != old[b]) << b);
        out_changed[i] = (fp_valid && fp_valid[r]) ? changed
                                                  : (uint16_t)((1u << LM_BLOCKS_PER_PAGE) - 1);
        memcpy(old, nw, sizeof nw);
    }
    return 0;
}

LM_API int lm_pages_set_fingerprint(uint64_t *fp, uint64_t fp_npages, const int64_t *fp_rows,
                                    uint64_t n, const uint8_t *page)
{
    if (!fp_rows || !rows_in_range(fp_npages, fp_rows, n))
        return -ERANGE;
    uint64_t nw[LM_BLOCKS_PER_PAGE];
    fingerprint_page(page, nw, NULL);
    for (uint64_t i = 0; i < n; i++)
        memcpy(fp + (uint64_t)fp_rows[i] * LM_BLOCKS_PER_PAGE, nw, sizeof nw);
    return 0;
}

LM_API int64_t lm_pages_gather_blocks(const uint8_t *base, uint64_t npages, const int64_t *rows,
                                      const uint16_t *masks, const int64_t *out_offsets,
                                      uint64_t n, uint8_t *out, uint64_t out_cap)
{
    if (!rows_in_range(npages, rows, n))
        return -ERANGE;
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        const uint8_t *p = base + row_of(rows, i) * LM_PAGE_SIZE;
        uint64_t off = (uint64_t)out_offsets[i];
        uint64_t need = (uint64_t)__builtin_popcount(masks[i]) * LM_BLOCK_BYTES;
        if (out_offsets[i] < 0 || off > out_cap || need > out_cap - off)
            return -ENOSPC;
        for (int b = 0; b < LM_BLOCKS_PER_PAGE; b++) {
            if (masks[i] & (1u << b)) {
                memcpy(out + off, p + b * LM_BLOCK_BYTES, LM_BLOCK_BYTES);
                off += LM_BLOCK_BYTES;
            }
        }
        total += need;
    }
    return (int64_t)total;
}

static int apply_blocks(uint8_t *base, uint64_t npages, const int64_t *rows,
                                 const uint16_t *masks, uint64_t n, const uint8_t *data,
                                 uint64_t data_len)
{
    if (!rows_in_range(npages, rows, n))
        return -ERANGE;
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (masks[i] >> LM_BLOCKS_PER_PAGE)
            return -EINVAL;
        total += (uint64_t)__builtin_popcount(masks[i]) * LM_BLOCK_BYTES;
    }
    if (total != data_len)
        return -EINVAL;
    uint64_t off = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint8_t *p = base + row_of(rows, i) * LM_PAGE_SIZE;
        for (int b = 0; b < LM_BLOCKS_PER_PAGE; b++) {
            if (masks[i] & (1u << b)) {
                memcpy(p + b * LM_BLOCK_BYTES, data + off, LM_BLOCK_BYTES);
                off += LM_BLOCK_BYTES;
            }
        }
    }
    return 0;
}

/* ---- the receiver's side ----------------------------------------------------- */

LM_API int lm_pages_place_fingerprint(uint8_t *base, uint64_t npages, const int64_t *rows,
                                      uint64_t n, const uint8_t *src, uint64_t *fp,
                                      uint8_t *fp_valid, uint64_t *out_hashes)
{
    if (!rows || !rows_in_range(npages, rows, n))
        return -ERANGE;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t r = (uint64_t)rows[i];
        uint8_t *dst = base + r * LM_PAGE_SIZE;
        memcpy(dst, src + i * LM_PAGE_SIZE, LM_PAGE_SIZE);
        /* hashed as it landed, read back while in cache */
        out_hashes[i] = page_blocks_hash(dst, fp + r * LM_BLOCKS_PER_PAGE);
        fp_valid[r] = 1;
    }
    return 0;
}

LM_API int lm_pages_apply_blocks_fingerprint(uint8_t *base, uint64_t npages, const int64_t *rows,
                                             const uint16_t *masks, uint64_t n,
                                             const uint8_t *data, uint64_t data_len,
                                             uint64_t *fp, uint8_t *fp_valid,
                                             uint64_t *out_hashes)
{
    int rc = apply_blocks(base, npages, rows, masks, n, data, data_len);
    if (rc)
        return rc;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t r = (uint64_t)row_of(rows, i);
        uint8_t *p = base + r * LM_PAGE_SIZE;
        uint64_t *row = fp + r * LM_BLOCKS_PER_PAGE;
        if (!fp_valid[r]) {
            out_hashes[i] = page_blocks_hash(p, row);
            fp_valid[r] = 1;
            continue;
        }
        for (int b = 0; b < LM_BLOCKS_PER_PAGE; b++)
            if (masks[i] & (1u << b))
                row[b] = block_hash(p + b * LM_BLOCK_BYTES, b);
        out_hashes[i] = combine_blocks(row);
    }
    return 0;
}
