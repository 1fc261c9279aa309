/*
 * A native channel thread: what the urgent channel (lm_urgent*.c) and the
 * bulk streams (lm_stream*.c) share (not part of the cdef).
 *
 * Theory of operation
 *   Python does a channel's handshake, dups its socket and hands the dup to
 *   a thread here with the next sequence numbers of each direction. The
 *   thread tells its owner of news through the notify eventfd (eventfd(2)),
 *   which the owner watches with its event loop, and stops when the stop
 *   eventfd becomes readable. A thread that fails leaves -errno in status
 *   and a reason. Detach joins the thread and only then shuts the socket
 *   down: shutdown(2) reaches the peer although Python's transport still
 *   holds another descriptor of it. Frames go out whole with writev(2)
 *   straight from the caller's parts; each family says how to wait while
 *   the socket is full, and what a stop request then means. A bulk stream
 *   under TLS (tls set at attach) sends through lm_tls_send instead, and
 *   detach ends its TLS connection before the socket is shut down.
 *
 *   Each channel family embeds a struct lm_chan as its member `ch` and adds
 *   what its own frames need. Both families' statistics open with the same
 *   four counters (livemig.h), which lm_chan_send keeps here.
 */
#ifndef LM_CHAN_H
#define LM_CHAN_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "livemig.h"
#include "wire/lm_frame.h"

/* The status values, equal for both families (LM_URGENT_*, LM_STREAM_*). */
enum { LM_CHAN_IDLE = 0, LM_CHAN_RUNNING = 1, LM_CHAN_STOPPED = 2 };

/* The counters both families' statistics open with. */
struct lm_chan_counters {
    uint64_t frames_sent;
    uint64_t frames_received;
    uint64_t bytes_sent;
    uint64_t bytes_received;
};

struct lm_chan;
/* Wait until the socket is writable: 0 to try again, else what the send
 * returns (the family decides what a stop request means). */
typedef int (*lm_chan_wait_fn)(struct lm_chan *c);

struct lm_chan {
    const char *name;          /* in reasons: "urgent channel", "bulk stream" */
    struct lm_framer framer;
    struct lm_chan_counters *counters;   /* the head of the family's stats */
    lm_chan_wait_fn wait_writable;
    int notify_efd;
    int stop_efd;
    /* the attached connection */
    pthread_t thread;
    int attached;
    int fd;
    struct lm_tls *tls;        /* NULL: plain TCP; else frames go through TLS (lm_tls.h) */
    uint32_t version;
    uint64_t send_seq;
    uint64_t recv_seq;
    uint64_t max_frame;
    int status;                /* atomic: LM_CHAN_* or -errno */
    char reason[256];
};

#define LM_CHAN_ADD(c, f, n) \
    __atomic_fetch_add(&(c)->counters->f, (uint64_t)(n), __ATOMIC_RELAXED)

/* Whether the checksum library loads: 0 or -errno with a reason. */
int lm_chan_probe(char *reason, size_t reason_cap);
/* Open the framer and both eventfds: 0, or -errno with nothing left open. */
int lm_chan_open(struct lm_chan *c, const char *name, struct lm_chan_counters *counters,
                 lm_chan_wait_fn wait_writable);
void lm_chan_close(struct lm_chan *c);
/* Wake the owner's event loop. */
void lm_chan_notify(struct lm_chan *c);
/* Record why the thread ends (c->reason) and return -err. */
int lm_chan_fail(struct lm_chan *c, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Wait for events on the socket or a stop request: 0 (ready, or an error the
 * next call reports), 1 (stop), or -errno with c->reason. */
int lm_chan_wait(struct lm_chan *c, short events);
/* First step of an attach, c NULL allowed: refuse a bad or busy handle and
 * make the socket non-blocking. sock_fd is closed whenever this fails. */
int lm_chan_claim(struct lm_chan *c, int sock_fd);
/* Start main(arg) on the claimed socket, in a thread named name (at most
 * 15 characters: what top -H, perf and gdb show): 0 or -errno (sock_fd
 * closed). */
int lm_chan_start(struct lm_chan *c, int sock_fd, uint32_t wire_version, uint64_t send_seq,
                  uint64_t recv_seq, const char *name, void *(*main)(void *), void *arg);
/* Ask the thread to stop, join it, close the socket: 0 or the thread's -errno. */
int lm_chan_detach(struct lm_chan *c);
/* The thread's end, from the thread: publish status, shut the socket down on
 * failure when asked (so the peer's thread fails too), wake the owner. */
void lm_chan_finish(struct lm_chan *c, int rc, int shutdown_on_failure);
/* LM_CHAN_* or -errno, with the reason of a failure. */
int lm_chan_status(const struct lm_chan *c, char *reason, size_t reason_cap);
/* Send one frame: iov[0] is room for its header (LM_WIRE_HEADER_BYTES),
 * filled here; iov[1..iovcnt) is the payload. Written whole, waiting with
 * c->wait_writable while the socket is full. iov is consumed. */
int lm_chan_send(struct lm_chan *c, uint16_t type, uint16_t flags, struct iovec *iov,
                 int iovcnt);
/* Copy an atomic stats struct of n_words uint64_t fields. */
void lm_chan_stats_copy(const void *stats, void *out, size_t n_words);

#endif /* LM_CHAN_H */
