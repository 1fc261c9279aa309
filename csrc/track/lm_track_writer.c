/*
 * Writers driven from C, for tests and benchmarks of the dirty trackers.
 *
 * Python cannot store to guest memory fast enough (nor from several threads
 * at once without the GIL) to probe a tracker's race-freedom or to time a
 * first write to a clean page. lm_region_poke_pages stores one word per
 * listed page; lm_writer runs a pthread that keeps storing to pseudo-random
 * pages and records each page it wrote, so a test can compare what the
 * tracker reported with what was written.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "livemig.h"

#define LM_WORDS_PER_PAGE (LM_PAGE_SIZE / 8)

LM_API int64_t lm_region_poke_pages(lm_region *r, const uint64_t *pages, uint64_t n, uint64_t value)
{
    uint64_t npages = lm_region_npages(r);
    for (uint64_t i = 0; i < n; i++)
        if (pages[i] >= npages)
            return -ERANGE;
    volatile uint64_t *words = (volatile uint64_t *)lm_region_base(r);
    for (uint64_t i = 0; i < n; i++)
        words[pages[i] * LM_WORDS_PER_PAGE] = value ^ pages[i];
    return (int64_t)n;
}

struct lm_writer {
    lm_region *region;
    uint64_t first_page, npages, pause_ns, rng;
    pthread_t thread;
    _Atomic int stop;
    _Atomic uint64_t writes;
    _Atomic uint64_t *bitmap;
    uint64_t nwords;
};

static uint64_t xorshift64s(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static void *writer_main(void *arg)
{
    lm_writer *w = arg;
    volatile uint64_t *words = (volatile uint64_t *)lm_region_base(w->region);
    struct timespec pause = {.tv_sec = (time_t)(w->pause_ns / 1000000000ull),
                             .tv_nsec = (long)(w->pause_ns % 1000000000ull)};
    uint64_t counter = 0;
    while (!atomic_load_explicit(&w->stop, memory_order_relaxed)) {
        uint64_t r = xorshift64s(&w->rng);
        uint64_t page = w->first_page + (r >> 9) % w->npages;
        uint64_t word = r & (LM_WORDS_PER_PAGE - 1);
        words[page * LM_WORDS_PER_PAGE + word] = ++counter;
        atomic_fetch_or_explicit(&w->bitmap[page >> 6], 1ull << (page & 63), memory_order_relaxed);
        if (w->pause_ns)
            nanosleep(&pause, NULL);
    }
    atomic_store(&w->writes, counter);
    return NULL;
}

LM_API int lm_writer_start(lm_region *r, uint64_t first_page, uint64_t npages, uint64_t seed,
                           uint64_t pause_ns, lm_writer **out)
{
    if (!out || !r)
        return -EINVAL;
    *out = NULL;
    uint64_t total = lm_region_npages(r);
    if (npages == 0 || first_page > total || npages > total - first_page)
        return -ERANGE;
    lm_writer *w = calloc(1, sizeof(*w));
    if (!w)
        return -ENOMEM;
    w->region = r;
    w->first_page = first_page;
    w->npages = npages;
    w->pause_ns = pause_ns;
    w->rng = seed ? seed : 0x9E3779B97F4A7C15ull;
    w->nwords = (total + 63) / 64;
    w->bitmap = calloc(w->nwords, sizeof(uint64_t));
    if (!w->bitmap) {
        free(w);
        return -ENOMEM;
    }
    int rc = pthread_create(&w->thread, NULL, writer_main, w);
    if (rc != 0) {
        free((void *)w->bitmap);
        free(w);
        return -rc;
    }
    *out = w;
    return 0;
}

LM_API int64_t lm_writer_stop(lm_writer *w)
{
    if (!atomic_exchange(&w->stop, 1))
        pthread_join(w->thread, NULL);
    return (int64_t)atomic_load(&w->writes);
}

LM_API int lm_writer_bitmap(const lm_writer *w, uint64_t *words_out, uint64_t nwords)
{
    if (nwords < w->nwords)
        return -ENOSPC;
    for (uint64_t i = 0; i < w->nwords; i++)
        words_out[i] = atomic_load(&((lm_writer *)w)->bitmap[i]);
    return 0;
}

LM_API void lm_writer_destroy(lm_writer *w)
{
    if (!w)
        return;
    (void)lm_writer_stop(w);
    free((void *)w->bitmap);
    free(w);
}
