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
 * One pass per page computes the 16 block hashes and the page hash (the one
 * every digest is made of, lm_pagehash.h) from the same loads, compares the
 * block hashes with the stored fingerprint and stores the new one: after the
 * batch is sent the receiver holds exactly the bytes hashed. The caller hashes
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

/* Block hashes of p into fp[LM_BLOCKS_PER_PAGE]; returns the page hash. The
 * page lanes are exactly page_hash()'s; the block lanes restart every block.
 * With copy_to, each block is first copied there and hashed from the copy
 * (still in L1), so a snapshot costs no second pass over guest memory and
 * the hashes describe the snapshot even if the guest writes p meanwhile. */
static uint64_t fingerprint_page(const uint8_t *p, uint64_t *fp, uint8_t *copy_to)
{
    uint64_t a0 = LM_K1, a1 = LM_K2, a2 = LM_K3, a3 = LM_K4;
    for (int b = 0; b < LM_BLOCKS_PER_PAGE; b++) {
        uint64_t b0 = LM_K4 + (uint64_t)b, b1 = LM_K3, b2 = LM_K2, b3 = LM_K1;
        const uint8_t *q = p + b * LM_BLOCK_BYTES;
        if (copy_to) {
            memcpy(copy_to + b * LM_BLOCK_BYTES, q, LM_BLOCK_BYTES);
            q = copy_to + b * LM_BLOCK_BYTES;
        }
        for (int i = 0; i < LM_BLOCK_BYTES; i += 32) {
            uint64_t w0 = load64(q + i) * LM_K2, w1 = load64(q + i + 8) * LM_K2;
            uint64_t w2 = load64(q + i + 16) * LM_K2, w3 = load64(q + i + 24) * LM_K2;
            a0 = rotl64(a0 ^ w0, 29) * LM_K1;
            a1 = rotl64(a1 ^ w1, 29) * LM_K1;
            a2 = rotl64(a2 ^ w2, 29) * LM_K1;
            a3 = rotl64(a3 ^ w3, 29) * LM_K1;
            b0 = rotl64(b0 ^ w0, 31) * LM_K3;
            b1 = rotl64(b1 ^ w1, 31) * LM_K3;
            b2 = rotl64(b2 ^ w2, 31) * LM_K3;
            b3 = rotl64(b3 ^ w3, 31) * LM_K3;
        }
        fp[b] = lm_mix64(b0 + rotl64(b1, 19) + rotl64(b2, 37) + rotl64(b3, 53));
    }
    return lm_mix64(a0 + rotl64(a1, 17) + rotl64(a2, 31) + rotl64(a3, 47));
}

LM_API int lm_pages_fingerprint(const uint8_t *base, uint64_t npages, const int64_t *rows,
                                uint64_t n, uint64_t *fp, uint64_t fp_npages,
                                const int64_t *fp_rows, const uint8_t *fp_valid,
                                uint16_t *out_changed, uint64_t *out_hashes)
{
    return lm_pages_snapshot_fingerprint(base, npages, rows, n, NULL, fp, fp_npages, fp_rows,
                                         fp_valid, out_changed, out_hashes);
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

LM_API int lm_pages_apply_blocks(uint8_t *base, uint64_t npages, const int64_t *rows,
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
