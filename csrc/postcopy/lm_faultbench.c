/*
 * Native helpers for post-copy tests and latency-floor benchmarks.
 *
 * A *toucher* is a pthread that reads one 64-bit word from each page of a
 * list, timing each read with CLOCK_MONOTONIC. On a missing page the read
 * blocks in the kernel until someone places the page, so the recorded time is
 * the fault-to-resume latency. It must be a native thread: a Python thread
 * blocked on a fault would hold the GIL that the fault's server needs.
 *
 * A *fault server* is a pthread that poll()s a post-copy fd and answers each
 * fault by UFFDIO_COPY from a local source buffer holding the same page
 * index: the floor any remote page server is measured against. Its loop is
 * lm_zerofill.c's (lm_serve_faults), stopped by an eventfd.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "livemig.h"
#include "postcopy/lm_postcopy_internal.h"

static void pin_to_cpu(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    (void)sched_setaffinity(0, sizeof(set), &set); /* best effort: timing only */
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- toucher ------------------------------------------------------------------ */

struct lm_toucher {
    pthread_t thread;
    const uint8_t *base;
    uint64_t npages;
    uint64_t offset_bytes;
    int cpu;
    uint64_t done; /* atomic */
    /* Owned copies, so that nothing the caller frees early is written to. */
    uint64_t *pages;
    uint64_t *values;
    uint64_t *latency_ns;
};

static void toucher_free(lm_toucher *t)
{
    free(t->pages);
    free(t->values);
    free(t->latency_ns);
    free(t);
}

static void *toucher_main(void *arg)
{
    lm_toucher *t = arg;
    pin_to_cpu(t->cpu);
    for (uint64_t i = 0; i < t->npages; i++) {
        const volatile uint64_t *word =
            (const volatile uint64_t *)(t->base + t->pages[i] * LM_PAGE_SIZE + t->offset_bytes);
        uint64_t t0 = now_ns();
        uint64_t v = *word;
        uint64_t t1 = now_ns();
        t->values[i] = v;
        t->latency_ns[i] = t1 - t0;
        __atomic_store_n(&t->done, i + 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

LM_API int lm_toucher_start(const uint8_t *base, const uint64_t *pages, uint64_t npages,
                            uint64_t offset_bytes, int cpu, lm_toucher **out)
{
    if (!base || !out || (npages && !pages) || offset_bytes > LM_PAGE_SIZE - 8 ||
        offset_bytes % 8 || npages > SIZE_MAX / sizeof(uint64_t) - 1)
        return -EINVAL;
    *out = NULL;
    lm_toucher *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->base = base;
    t->npages = npages;
    t->offset_bytes = offset_bytes;
    t->cpu = cpu;
    size_t bytes = (size_t)(npages ? npages : 1) * sizeof(uint64_t);
    t->pages = malloc(bytes);
    t->values = calloc(1, bytes);
    t->latency_ns = calloc(1, bytes);
    if (!t->pages || !t->values || !t->latency_ns) {
        toucher_free(t);
        return -ENOMEM;
    }
    if (npages)
        memcpy(t->pages, pages, (size_t)npages * sizeof(uint64_t));
    int rc = pthread_create(&t->thread, NULL, toucher_main, t);
    if (rc != 0) {
        toucher_free(t);
        return -rc;
    }
    *out = t;
    return 0;
}

LM_API uint64_t lm_toucher_done(const lm_toucher *t)
{
    return __atomic_load_n(&t->done, __ATOMIC_ACQUIRE);
}

LM_API int lm_toucher_join(lm_toucher *t, int timeout_ms, uint64_t *values_out,
                           uint64_t *latency_ns_out)
{
    if (timeout_ms >= 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += timeout_ms / 1000;
        ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        int rc = pthread_timedjoin_np(t->thread, NULL, &ts);
        if (rc != 0)
            return -rc; /* ETIMEDOUT: still blocked; the handle stays valid */
    } else {
        int rc = pthread_join(t->thread, NULL);
        if (rc != 0)
            return -rc;
    }
    if (values_out)
        memcpy(values_out, t->values, (size_t)t->npages * sizeof(uint64_t));
    if (latency_ns_out)
        memcpy(latency_ns_out, t->latency_ns, (size_t)t->npages * sizeof(uint64_t));
    toucher_free(t);
    return 0;
}

/* ---- local fault server ---------------------------------------------------------- */

struct lm_faultserver {
    pthread_t thread;
    lm_postcopy *pc;
    const uint8_t *src;
    int cpu;
    int stop_fd;
    int64_t served; /* pages placed, or -errno of the first failure */
};

static void *faultserver_main(void *arg)
{
    lm_faultserver *s = arg;
    pin_to_cpu(s->cpu);
    s->served = lm_serve_faults(s->pc, s->src, s->stop_fd);
    return NULL;
}

LM_API int lm_faultserver_start(lm_postcopy *p, const uint8_t *src, int cpu,
                                lm_faultserver **out)
{
    if (!p || !src || !out)
        return -EINVAL;
    *out = NULL;
    lm_faultserver *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->pc = p;
    s->src = src;
    s->cpu = cpu;
    s->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->stop_fd < 0) {
        int e = errno;
        free(s);
        return -e;
    }
    int rc = pthread_create(&s->thread, NULL, faultserver_main, s);
    if (rc != 0) {
        close(s->stop_fd);
        free(s);
        return -rc;
    }
    *out = s;
    return 0;
}

LM_API int64_t lm_faultserver_stop(lm_faultserver *s)
{
    uint64_t one = 1;
    if (write(s->stop_fd, &one, sizeof(one)) != sizeof(one))
        return -errno;
    pthread_join(s->thread, NULL);
    int64_t served = s->served;
    close(s->stop_fd);
    free(s);
    return served;
}
