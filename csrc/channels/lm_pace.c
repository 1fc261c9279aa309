/*
 * A bandwidth cap shared by every bulk stream thread of one migration.
 *
 * Theory of operation
 *   One token bucket per migration (the Python path's aio/ratelimit.py, in
 *   C): tokens refill at rate bytes/s up to burst bytes; the owner chooses
 *   the burst with the Python path's one rule (TokenBucket.burst_bytes_for)
 *   and may change rate and burst at any time (lm_pace_set), from any
 *   thread. Before a source thread sends a frame it calls lm_pace_take: it
 *   waits until the balance is not negative and then takes the frame's
 *   bytes, possibly into debt, so a frame larger than the burst still
 *   passes and the debt delays whichever frame comes next, on any stream.
 *   Over any interval T the streams send at most burst + rate x T plus one
 *   frame per thread (each thread may take on the same non-negative
 *   balance), so the long-run rate is the cap's.
 *
 *   The wait is a poll(2) on the stream's stop eventfd in slices of at most
 *   LM_PACE_SLICE_MS, re-reading rate and balance after each: a cap raised,
 *   lowered or lifted by the owner applies within one slice, and a detach
 *   never waits behind a slow cap. A mutex guards the bucket: it is taken
 *   once per frame (of up to 1 MiB), far below any contention that matters.
 *
 *   Changing the cap keeps the balance (clamped to the new burst), so a
 *   debt is paid at the new rate; lifting it forgets the debt, and a cap set
 *   on an unlimited pace starts with a full bucket, as a new TokenBucket.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "channels/lm_pace.h"
#include "channels/lm_stream_internal.h"

struct lm_pace {
    pthread_mutex_t mu;
    double rate;          /* bytes/s; 0: unlimited */
    double burst;         /* bytes */
    double tokens;        /* may be negative: a debt */
    uint64_t stamp_ns;    /* when tokens was last refilled */
    lm_pace_stats stats;  /* atomic fields */
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Caller holds p->mu. */
static void refill(lm_pace *p, uint64_t now)
{
    if (now > p->stamp_ns) {
        p->tokens = fmin(p->burst, p->tokens + (double)(now - p->stamp_ns) * 1e-9 * p->rate);
        p->stamp_ns = now;
    }
}

LM_API int lm_pace_create(lm_pace **out)
{
    *out = NULL;
    lm_pace *p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    int rc = pthread_mutex_init(&p->mu, NULL);
    if (rc != 0) {
        free(p);
        return -rc;
    }
    p->stamp_ns = now_ns();
    *out = p;
    return 0;
}

LM_API int lm_pace_set(lm_pace *p, double rate_bytes_per_s, uint64_t burst_bytes)
{
    if (!p || !(rate_bytes_per_s >= 0) || !isfinite(rate_bytes_per_s)
        || (rate_bytes_per_s > 0 && burst_bytes == 0))
        return -EINVAL;
    pthread_mutex_lock(&p->mu);
    uint64_t now = now_ns();
    if (p->rate > 0)
        refill(p, now);
    int was_unlimited = p->rate == 0;
    p->rate = rate_bytes_per_s;
    p->burst = (double)burst_bytes;
    p->stamp_ns = now;
    if (rate_bytes_per_s == 0 || was_unlimited)
        p->tokens = p->burst;
    else
        p->tokens = fmin(p->tokens, p->burst);
    pthread_mutex_unlock(&p->mu);
    return 0;
}

LM_API int lm_pace_stats_get(const lm_pace *p, lm_pace_stats *out)
{
    lm_chan_stats_copy(&p->stats, out, sizeof(*out) / sizeof(uint64_t));
    return 0;
}

LM_API void lm_pace_destroy(lm_pace *p)
{
    if (!p)
        return;
    pthread_mutex_destroy(&p->mu);
    free(p);
}

int lm_pace_take(lm_pace *p, struct lm_chan *c, uint64_t nbytes)
{
    if (!p)
        return 0;
    uint64_t waited_from = 0;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        uint64_t now = now_ns();
        double wait_s = 0;
        if (p->rate > 0) {
            refill(p, now);
            if (p->tokens >= 0)
                p->tokens -= (double)nbytes;
            else
                wait_s = -p->tokens / p->rate;
        }
        pthread_mutex_unlock(&p->mu);
        if (wait_s == 0) {
            __atomic_fetch_add(&p->stats.bytes, nbytes, __ATOMIC_RELAXED);
            if (waited_from)
                __atomic_fetch_add(&p->stats.waited_ns, now - waited_from, __ATOMIC_RELAXED);
            return 0;
        }
        if (!waited_from) {
            waited_from = now;
            __atomic_fetch_add(&p->stats.waits, 1, __ATOMIC_RELAXED);
        }
        double ms = ceil(wait_s * 1e3);
        struct pollfd pfd = {.fd = c->stop_efd, .events = POLLIN};
        int n = poll(&pfd, 1, ms < LM_PACE_SLICE_MS ? (int)ms : LM_PACE_SLICE_MS);
        if (n < 0 && errno != EINTR)
            return lm_chan_fail(c, errno, "waiting for the bandwidth cap: %s", strerror(errno));
        if (n > 0)
            return 1;
    }
}

LM_API int lm_stream_set_pace(lm_stream *s, lm_pace *p)
{
    if (!s || s->side != LM_STREAM_SOURCE)
        return -EINVAL;
    if (s->ch.attached)
        return -EBUSY;
    s->pace = p;
    return 0;
}
