/*
 * Which page hash implementation runs (the one documented global of the
 * codec: chosen once, when the module loads, and read by every stream
 * thread after that).
 *
 * The value is fixed by the scalar definition in lm_pagehash.h; an
 * implementation only changes how fast it is computed. At load the module
 * takes the AVX-512 form (lm_pagehash_avx512.c) when the CPU reports
 * AVX-512 F and DQ and LIVEMIG_PAGEHASH is not "scalar", else the scalar
 * one. lm_pagehash_impl names the choice (livemig probe shows it);
 * lm_pagehash_page hashes a page with a named implementation, so tests can
 * compare the two in one process.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "codec/lm_pagehash.h"

uint64_t lm_page_blocks_hash_scalar(const uint8_t *p, uint64_t *blocks)
{
    return page_blocks_hash_scalar(p, blocks);
}

/* Scalar until the constructor below has run: always a valid choice. */
lm_page_blocks_hash_fn lm_page_blocks_hash_chosen = lm_page_blocks_hash_scalar;
static int chosen_impl = LM_PAGEHASH_SCALAR;

static int cpu_has_avx512(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

__attribute__((constructor)) static void lm_pagehash_choose(void)
{
    const char *forced = getenv("LIVEMIG_PAGEHASH");
    if (forced && strcmp(forced, "scalar") == 0)
        return;
    if (cpu_has_avx512()) {
        lm_page_blocks_hash_chosen = lm_page_blocks_hash_avx512;
        chosen_impl = LM_PAGEHASH_AVX512;
    }
}

LM_API int lm_pagehash_impl(void) { return chosen_impl; }

LM_API int lm_pagehash_available(int impl)
{
    if (impl == LM_PAGEHASH_SCALAR)
        return 1;
    if (impl == LM_PAGEHASH_AVX512)
        return cpu_has_avx512();
    return 0;
}

LM_API int lm_pagehash_page(int impl, const uint8_t *page, uint64_t *blocks_out,
                            uint64_t *hash_out)
{
    if (!lm_pagehash_available(impl))
        return -ENOSYS;
    *hash_out = impl == LM_PAGEHASH_AVX512 ? lm_page_blocks_hash_avx512(page, blocks_out)
                                           : lm_page_blocks_hash_scalar(page, blocks_out);
    return 0;
}

LM_API int64_t lm_pagehash_pages(int impl, const uint8_t *base, uint64_t npages,
                                 uint64_t *hashes_out)
{
    if (!lm_pagehash_available(impl))
        return -ENOSYS;
    lm_page_blocks_hash_fn fn =
        impl == LM_PAGEHASH_AVX512 ? lm_page_blocks_hash_avx512 : lm_page_blocks_hash_scalar;
    uint64_t blocks[LM_BLOCKS_PER_PAGE];
    for (uint64_t i = 0; i < npages; i++)
        hashes_out[i] = fn(base + i * LM_PAGE_SIZE, blocks);
    return (int64_t)npages;
}
