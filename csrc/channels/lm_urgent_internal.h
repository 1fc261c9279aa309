/*
 * Internals of the urgent channel shared by its files (not part of the cdef):
 * lm_urgent.c (the handle, the thread, attach/detach), lm_urgent_stream.c
 * (the send's wait, receiving frames), lm_urgent_dest.c and lm_urgent_source.c
 * (what each side does with them); the thread's plumbing is lm_chan.h's.
 */
#ifndef LM_URGENT_INTERNAL_H
#define LM_URGENT_INTERNAL_H

#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>
#include <time.h>

#include "livemig.h"
#include "channels/lm_chan.h"
#include "channels/lm_ring.h"

/* A received frame larger than this is refused whatever was negotiated: a
 * reply to our own requests is at most LM_URGENT_REQUEST_PAGES pages. */
#define LM_URGENT_MAX_FRAME (8u << 20)
#define LM_URGENT_FAULT_BATCH 256   /* fault messages read per lm_postcopy_read_faults */

enum lm_urgent_side { LM_URGENT_DEST, LM_URGENT_SOURCE };

struct lm_urgent {
    struct lm_chan ch;         /* the thread, its socket and eventfds */
    enum lm_urgent_side side;
    /* dest */
    lm_postcopy *pc;
    uint64_t *fault_ns;        /* per page: CLOCK_MONOTONIC ns of the fault read, 0 = none */
    uint64_t noutstanding;     /* atomic */
    uint64_t next_request_id;
    uint64_t zero_hash;
    /* source */
    const uint8_t *base;
    uint32_t round;
    /* both */
    uint64_t npages;
    uint64_t *hashes;
    struct lm_ring ring;       /* latencies (dest) or requested pages (source) */
    uint32_t spin_us;
    int rt_priority;           /* SCHED_FIFO priority asked for the thread; 0 = none */
    uint8_t *rbuf;
    uint64_t rbuf_cap;
    uint64_t rlen;
    uint8_t *sbuf;             /* dest: PageRequest frames; source: reply prefixes */
    uint64_t *scratch;         /* page indices being handled */
    lm_urgent_stats stats;     /* atomic fields */
};

#define STAT_ADD(u, f, n) __atomic_fetch_add(&(u)->stats.f, (uint64_t)(n), __ATOMIC_RELAXED)

static inline uint64_t lm_urgent_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* lm_urgent.c */
int lm_urgent_new(enum lm_urgent_side side, uint64_t npages, uint64_t *hashes, lm_urgent **out);

/* lm_urgent_stream.c */
typedef int (*lm_urgent_frame_fn)(lm_urgent *u, uint16_t flags, const uint8_t *payload,
                                  uint32_t length);
/* The wait of lm_chan_send: -ECANCELED when stop was asked meanwhile. */
int lm_urgent_wait_writable(struct lm_chan *c);
/* Read what the socket holds; hand each complete, checked frame of
 * want_type to fn. */
int lm_urgent_receive(lm_urgent *u, uint16_t want_type, lm_urgent_frame_fn fn);

/* lm_urgent_dest.c */
int lm_urgent_dest_resend(lm_urgent *u);
int lm_urgent_dest_read_faults(lm_urgent *u);
int lm_urgent_dest_on_batch(lm_urgent *u, uint16_t flags, const uint8_t *p, uint32_t length);
/* For the post-copy push threads (lm_stream_dest.c): pages first .. first+n
 * (n <= 64) are present now; settle the faults outstanding on them (each is
 * counted once). Their latencies go to out (64 entries), not to the urgent
 * ring, whose one producer is the urgent thread. Returns how many, or
 * -EINVAL when u is no destination of pc. */
int64_t lm_urgent_dest_settle_run(lm_urgent *u, const lm_postcopy *pc, uint64_t first,
                                  uint64_t n, uint64_t *out);

/* lm_urgent_source.c */
int lm_urgent_source_on_request(lm_urgent *u, uint16_t flags, const uint8_t *p,
                                uint32_t length);

#endif /* LM_URGENT_INTERNAL_H */
