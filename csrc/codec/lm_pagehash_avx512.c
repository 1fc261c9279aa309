/*
 * The page hash of lm_pagehash.h with AVX-512 (F + DQ): the same value,
 * sixteen blocks at a time.
 *
 * The scalar definition runs four multiply-rotate lanes per 256-byte block,
 * one block after another; a page is 16 blocks x 4 lanes = 64 independent
 * 64-bit accumulators, which fit eight zmm registers (register j holds the
 * four lanes of blocks 2j and 2j+1). Each of the eight steps loads 32 bytes
 * from every block (two 256-bit loads per register), xors in word * K2
 * (vpmullq), rotates left by 29 (vprolq) and multiplies by K1: the same
 * operations on the same words in the same order per lane, so the same
 * result. The fold of each block's four lanes (a0 + rotl(a1,17) +
 * rotl(a2,31) + rotl(a3,47)) rotates all lanes at once (vprolvq) and adds
 * them in two within-block shuffles; the sixteen mixes run in two
 * registers; the combine of the sixteen block hashes stays scalar (one
 * dependent chain of sixteen steps).
 *
 * The steps read the blocks interleaved, which the hardware prefetcher does
 * not follow from memory (measured slower than the scalar loop on an
 * uncached page); the page's 64 lines are requested in address order first.
 *
 * Compiled for the baseline like every other file: only the functions here
 * carry the AVX-512 target, and lm_pagehash.c calls them only when the CPU
 * says it has AVX-512 F and DQ.
 */
#include <immintrin.h>

#include "codec/lm_pagehash.h"

#define LM_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl")))

LM_AVX512 static inline __m512i mix64x8(__m512i h)
{
    h = _mm512_xor_si512(h, _mm512_srli_epi64(h, 30));
    h = _mm512_mullo_epi64(h, _mm512_set1_epi64((long long)LM_K3));
    h = _mm512_xor_si512(h, _mm512_srli_epi64(h, 27));
    h = _mm512_mullo_epi64(h, _mm512_set1_epi64((long long)LM_K4));
    return _mm512_xor_si512(h, _mm512_srli_epi64(h, 31));
}

/* Register j's two block sums (lanes 0-3 -> block 2j, 4-7 -> block 2j+1),
 * left in every lane of its 4-lane half. */
LM_AVX512 static inline __m512i fold4(__m512i a)
{
    /* swap neighbours (1 0 3 2) then swap pairs (2 3 0 1), within each 256-bit half */
    a = _mm512_add_epi64(a, _mm512_permutex_epi64(a, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_add_epi64(a, _mm512_permutex_epi64(a, _MM_SHUFFLE(1, 0, 3, 2)));
}

LM_AVX512 uint64_t lm_page_blocks_hash_avx512(const uint8_t *p, uint64_t *blocks)
{
    /* The steps read 32 bytes from each of the 16 blocks in turn: sixteen
     * interleaved streams the hardware prefetcher does not follow from
     * memory. Asking for the page's lines in address order first keeps a
     * page that is not cached from costing more than the scalar loop. */
    for (int i = 0; i < LM_PAGE_SIZE; i += 64)
        _mm_prefetch((const char *)p + i, _MM_HINT_T0);
    const __m512i k1 = _mm512_set1_epi64((long long)LM_K1);
    const __m512i k2 = _mm512_set1_epi64((long long)LM_K2);
    __m512i a[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++)
        a[j] = _mm512_set_epi64((long long)LM_K4, (long long)LM_K3, (long long)LM_K2,
                                (long long)(LM_K1 + 2 * j + 1), (long long)LM_K4,
                                (long long)LM_K3, (long long)LM_K2, (long long)(LM_K1 + 2 * j));
#pragma GCC unroll 8
    for (int i = 0; i < LM_BLOCK_BYTES; i += 32) {
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const uint8_t *q = p + 2 * j * LM_BLOCK_BYTES + i;
            __m512i w = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)q)),
                _mm256_loadu_si256((const __m256i *)(q + LM_BLOCK_BYTES)), 1);
            __m512i x = _mm512_xor_si512(a[j], _mm512_mullo_epi64(w, k2));
            a[j] = _mm512_mullo_epi64(_mm512_rol_epi64(x, 29), k1);
        }
    }
    const __m512i rot = _mm512_set_epi64(47, 31, 17, 0, 47, 31, 17, 0);
    __m512i s[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++)
        s[j] = fold4(_mm512_rolv_epi64(a[j], rot));
    /* Blocks 0..7 from lanes 0 and 4 of s[0..3]; 8..15 from s[4..7]. */
    const __m512i lo2 = _mm512_set_epi64(0, 0, 0, 0, 12, 8, 4, 0);
    __m512i h[2];
#pragma GCC unroll 2
    for (int g = 0; g < 2; g++) {
        /* (s0 lane0, s0 lane4, s1 lane0, s1 lane4) then the same of s2, s3 */
        __m512i ab = _mm512_permutex2var_epi64(s[4 * g], lo2, s[4 * g + 1]);
        __m512i cd = _mm512_permutex2var_epi64(s[4 * g + 2], lo2, s[4 * g + 3]);
        h[g] = _mm512_inserti64x4(ab, _mm512_castsi512_si256(cd), 1);
    }
    _mm512_storeu_si512((void *)blocks, mix64x8(h[0]));
    _mm512_storeu_si512((void *)(blocks + 8), mix64x8(h[1]));
    return combine_blocks(blocks);
}
