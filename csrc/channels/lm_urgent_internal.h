/*
 * Internals of the urgent channel shared by its files (not part of the cdef):
 * lm_urgent.c (the handle, the thread, attach/detach), lm_urgent_stream.c
 * (sending and receiving frames), lm_urgent_dest.c and lm_urgent_source.c
 * (what each side does with them).
 */
#ifndef LM_URGENT_INTERNAL_H
#define LM_URGENT_INTERNAL_H

#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>
#include <time.h>

#include "livemig.h"
#include "channels/lm_ring.h"
#include "wire/lm_frame.h"

/* A received frame larger than this is refused whatever was negotiated: a
 * reply to our own requests is at most LM_URGENT_REQUEST_PAGES pages. */
#define LM_URGENT_MAX_FRAME (8u << 20)
#define LM_URGENT_FAULT_BATCH 256   /* fault messages read per lm_postcopy_read_faults */

enum lm_urgent_side { LM_URGENT_DEST, LM_URGENT_SOURCE };

struct lm_urgent {
    enum lm_urgent_side side;
    struct lm_framer framer;
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
    int notify_efd;
    int stop_efd;
    /* the attached connection */
    pthread_t thread;
    int attached;
    int fd;
    uint32_t version;
    uint64_t send_seq;
    uint64_t recv_seq;
    uint64_t max_frame;
    uint32_t spin_us;
    int rt_priority;           /* SCHED_FIFO priority asked for the thread; 0 = none */
    uint8_t *rbuf;
    uint64_t rbuf_cap;
    uint64_t rlen;
    uint8_t *sbuf;             /* dest: PageRequest frames; source: reply prefixes */
    uint64_t *scratch;         /* page indices being handled */
    int status;                /* atomic: LM_URGENT_* or -errno */
    char reason[256];
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
/* Record why the thread ends (u->reason) and return -err. */
int lm_urgent_fail(lm_urgent *u, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Wake the owner's event loop (notify eventfd). */
void lm_urgent_notify(lm_urgent *u);

/* lm_urgent_stream.c */
typedef int (*lm_urgent_frame_fn)(lm_urgent *u, uint16_t flags, const uint8_t *payload,
                                  uint32_t length);
/* Send one frame: iov[0] is room for its header (LM_WIRE_HEADER_BYTES),
 * filled here; iov[1..iovcnt) is the payload. Written whole, waiting while
 * the socket is full; -ECANCELED when stop was asked meanwhile. iov is
 * consumed. */
int lm_urgent_send(lm_urgent *u, uint16_t type, uint16_t flags, struct iovec *iov, int iovcnt);
/* Read what the socket holds; hand each complete, checked frame of
 * want_type to fn. */
int lm_urgent_receive(lm_urgent *u, uint16_t want_type, lm_urgent_frame_fn fn);

/* lm_urgent_dest.c */
int lm_urgent_dest_resend(lm_urgent *u);
int lm_urgent_dest_read_faults(lm_urgent *u);
int lm_urgent_dest_on_batch(lm_urgent *u, uint16_t flags, const uint8_t *p, uint32_t length);

/* lm_urgent_source.c */
int lm_urgent_source_on_request(lm_urgent *u, uint16_t flags, const uint8_t *p,
                                uint32_t length);

#endif /* LM_URGENT_INTERNAL_H */
