/*
 * The 64-bit page content hash shared by every native loop (internal to the
 * module; both peers' digests are made of it, so it must be this one
 * function everywhere), and the zero-page test beside it.
 *
 * A page hash is built from the hashes of the page's sixteen 256-byte
 * blocks: page_hash = combine(block_hash(block 0), ..., block_hash(block 15)).
 * Each block hash is four independent multiply-rotate lanes over the block's
 * 32 words (independent lanes keep the multiplier pipelined), seeded with
 * the block's index, folded and finished with the splitmix64 mixer; combine
 * folds the sixteen in order through one more lane and the mixer. Hashing a
 * whole page costs the same as a flat four-lane hash (the same multiplies,
 * plus 17 mixes). What the tree buys: whoever keeps the block hashes of a
 * page (the source's fingerprints of what the receiver holds, the
 * receiver's of what it holds) gets the new page hash after a few blocks
 * changed by rehashing only those blocks (blockdelta.py).
 */
#ifndef LM_PAGEHASH_H
#define LM_PAGEHASH_H

#include <stdint.h>
#include <string.h>

#include "livemig.h"

#define LM_K1 0x9E3779B97F4A7C15ull /* 2^64 / golden ratio */
#define LM_K2 0xD6E8FEB86659FD93ull
#define LM_K3 0xBF58476D1CE4E5B9ull /* splitmix64 mixer constants */
#define LM_K4 0x94D049BB133111EBull

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v); /* payload buffers need not be aligned */
    return v;
}

/* 1 when the page is all zero bytes. ORs 8 words at a time: one branch per
 * 64 bytes, out at the first non-zero block (most non-zero pages are
 * non-zero near the start). */
static inline int lm_page_is_zero(const uint8_t *p)
{
    for (int i = 0; i < LM_PAGE_SIZE; i += 64) {
        uint64_t acc = load64(p + i) | load64(p + i + 8) | load64(p + i + 16) |
                       load64(p + i + 24) | load64(p + i + 32) | load64(p + i + 40) |
                       load64(p + i + 48) | load64(p + i + 56);
        if (acc)
            return 0;
    }
    return 1;
}

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t lm_mix64(uint64_t h)
{
    h ^= h >> 30;
    h *= LM_K3;
    h ^= h >> 27;
    h *= LM_K4;
    h ^= h >> 31;
    return h;
}

/* Hash of the 256-byte block q, the index-th of its page. */
static inline uint64_t block_hash(const uint8_t *q, int index)
{
    uint64_t a0 = LM_K1 + (uint64_t)index, a1 = LM_K2, a2 = LM_K3, a3 = LM_K4;
    for (int i = 0; i < LM_BLOCK_BYTES; i += 32) {
        a0 = rotl64(a0 ^ (load64(q + i) * LM_K2), 29) * LM_K1;
        a1 = rotl64(a1 ^ (load64(q + i + 8) * LM_K2), 29) * LM_K1;
        a2 = rotl64(a2 ^ (load64(q + i + 16) * LM_K2), 29) * LM_K1;
        a3 = rotl64(a3 ^ (load64(q + i + 24) * LM_K2), 29) * LM_K1;
    }
    return lm_mix64(a0 + rotl64(a1, 17) + rotl64(a2, 31) + rotl64(a3, 47));
}

/* The page hash from its sixteen block hashes, in block order. */
static inline uint64_t combine_blocks(const uint64_t *blocks)
{
    uint64_t a = LM_K3;
    for (int b = 0; b < LM_BLOCKS_PER_PAGE; b++)
        a = rotl64(a ^ (blocks[b] * LM_K2), 31) * LM_K1;
    return lm_mix64(a + LM_PAGE_SIZE);
}

/* Block hashes of page p into blocks[LM_BLOCKS_PER_PAGE]; returns the page
 * hash. The definition: every other implementation must give exactly this. */
static inline uint64_t page_blocks_hash_scalar(const uint8_t *p, uint64_t *blocks)
{
    for (int b = 0; b < LM_BLOCKS_PER_PAGE; b++)
        blocks[b] = block_hash(p + b * LM_BLOCK_BYTES, b);
    return combine_blocks(blocks);
}

/* The implementations of page_blocks_hash (codec/lm_pagehash.c chooses one
 * once, when the module loads: AVX-512 where the CPU has it, unless
 * LIVEMIG_PAGEHASH=scalar). Same value from each, bit for bit. */
typedef uint64_t (*lm_page_blocks_hash_fn)(const uint8_t *p, uint64_t *blocks);
uint64_t lm_page_blocks_hash_scalar(const uint8_t *p, uint64_t *blocks);
/* All sixteen blocks at once in eight zmm registers (codec/lm_pagehash_avx512.c);
 * call only where the CPU has AVX-512 F and DQ. */
uint64_t lm_page_blocks_hash_avx512(const uint8_t *p, uint64_t *blocks);
extern lm_page_blocks_hash_fn lm_page_blocks_hash_chosen;

static inline uint64_t page_blocks_hash(const uint8_t *p, uint64_t *blocks)
{
    return lm_page_blocks_hash_chosen(p, blocks);
}

static inline uint64_t page_hash(const uint8_t *p)
{
    uint64_t blocks[LM_BLOCKS_PER_PAGE];
    return page_blocks_hash(p, blocks);
}

#endif /* LM_PAGEHASH_H */
