/*
 * The dirty bitmap shared by the bitmap backends (uffd-wp, mprotect).
 *
 * The fault path sets a page's bit with an atomic OR after making the page
 * writable; collect takes whole words with an atomic exchange and then
 * re-protects what it took (see each backend for why that order loses no
 * write). lm_bitmap_take's cost is one load per 64 pages plus work
 * proportional to the dirty pages, and it re-protects maximal runs of
 * consecutive pages with one call each.
 */
#include "lm_track_internal.h"

void lm_bitmap_set_range(_Atomic uint64_t *bm, uint64_t first, uint64_t n)
{
    uint64_t p = first, end = first + n;
    while (p < end) {
        uint64_t bit = p & 63;
        uint64_t take = 64 - bit;
        if (take > end - p)
            take = end - p;
        uint64_t mask = (take == 64) ? ~0ull : (((1ull << take) - 1) << bit);
        atomic_fetch_or_explicit(&bm[p >> 6], mask, memory_order_seq_cst);
        p += take;
    }
}

static void flush_run(lm_tracker *t, lm_protect_run_fn protect, uint64_t first, uint64_t n)
{
    if (n == 0)
        return;
    t->stats.protect_calls++;
    if (protect(t, first, n) != 0) {
        /* The run stays writable: report it again next round, conservatively,
         * so a write made after this collect cannot go unnoticed. */
        lm_bitmap_set_range(t->bitmap, first, n);
        atomic_fetch_add(&t->degraded_pages, n);
    }
}

int64_t lm_bitmap_take(lm_tracker *t, uint64_t *out, lm_protect_run_fn protect)
{
    uint64_t count = 0, run_first = 0, run_n = 0;
    for (uint64_t i = 0; i < t->nwords; i++) {
        /* A plain load first keeps an idle collect from dirtying cache lines. */
        if (atomic_load_explicit(&t->bitmap[i], memory_order_relaxed) == 0)
            continue;
        uint64_t w = atomic_exchange_explicit(&t->bitmap[i], 0, memory_order_seq_cst);
        while (w) {
            uint64_t page = (i << 6) + (uint64_t)__builtin_ctzll(w);
            w &= w - 1;
            out[count++] = page;
            if (run_n && page == run_first + run_n) {
                run_n++;
            } else {
                flush_run(t, protect, run_first, run_n);
                run_first = page;
                run_n = 1;
            }
        }
    }
    flush_run(t, protect, run_first, run_n);
    return (int64_t)count;
}
