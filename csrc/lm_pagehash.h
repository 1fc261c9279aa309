/*
 * The 64-bit page content hash shared by the page-codec loops (see
 * lm_pagecodec.c for why it is built this way). Internal to the native
 * module; the same function must hash pages everywhere, since both peers'
 * digests are made of it.
 */
#ifndef LM_PAGEHASH_H
#define LM_PAGEHASH_H

#include <stdint.h>
#include <string.h>

#include "livemig.h"

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v); /* payload buffers need not be aligned */
    return v;
}

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

#define LM_K1 0x9E3779B97F4A7C15ull /* 2^64 / golden ratio */
#define LM_K2 0xD6E8FEB86659FD93ull
#define LM_K3 0xBF58476D1CE4E5B9ull /* splitmix64 mixer constants */
#define LM_K4 0x94D049BB133111EBull

static inline uint64_t lm_mix64(uint64_t h)
{
    h ^= h >> 30;
    h *= LM_K3;
    h ^= h >> 27;
    h *= LM_K4;
    h ^= h >> 31;
    return h;
}

static inline uint64_t page_hash(const uint8_t *p)
{
    uint64_t a0 = LM_K1, a1 = LM_K2, a2 = LM_K3, a3 = LM_K4;
    for (int i = 0; i < LM_PAGE_SIZE; i += 32) {
        a0 = rotl64(a0 ^ (load64(p + i) * LM_K2), 29) * LM_K1;
        a1 = rotl64(a1 ^ (load64(p + i + 8) * LM_K2), 29) * LM_K1;
        a2 = rotl64(a2 ^ (load64(p + i + 16) * LM_K2), 29) * LM_K1;
        a3 = rotl64(a3 ^ (load64(p + i + 24) * LM_K2), 29) * LM_K1;
    }
    return lm_mix64(a0 + rotl64(a1, 17) + rotl64(a2, 31) + rotl64(a3, 47));
}

#endif /* LM_PAGEHASH_H */
