/*
 * Bulk page streams served by native threads: the data plane of pre-copy.
 *
 * Theory of operation
 *   Python opens each bulk stream (a TCP connection of the migration's
 *   session) and does its handshake; then it dups the socket, stops using it,
 *   and hands the dup to a thread here together with the next sequence
 *   numbers of each direction (as for the urgent channel). Python stays the
 *   control plane: it runs the rounds on the control channel and gives each
 *   source thread its share of a round's pages; the pages themselves never
 *   become Python objects.
 *
 *     source thread (lm_stream_source.c)   destination thread (lm_stream_dest.c)
 *     poll(stop, work[, socket])           poll(stop, socket)
 *     per batch of <= LM_STREAM_BATCH_PAGES:
 *       zero pages -> ZERO runs; others copied
 *       into staging, hashed (hashes[]), RAW,
 *       or BLOCK when few blocks changed;
 *       RAW runs LZ4 where it pays
 *       writev(header, runs, pages) ──────▶ read frame, check header, checksum,
 *                                           the batch whole; then place pages,
 *                                           hash them (hashes[]), held[]
 *       StreamEnd(round, pages, bytes) ───▶ counts agree? publish, notify owner
 *     take StreamAck, publish, notify   ◀─ StreamAck(round, pages)
 *
 *   Window: the owner may queue up to `window` rounds (a ring of slots, one
 *   producer and one consumer, LM_STREAM_WINDOW_MAX at most). The thread
 *   sends each queued round whole without waiting for the previous one's
 *   ack, and takes acks as they arrive: between batches (a poll(2) that
 *   does not wait) and, with nothing left to send, in its one blocking
 *   poll(2) together with stop and work. An ack frees its round's slot
 *   and wakes the owner, who can queue the next while the rounds still in
 *   flight keep the link and the destination's thread busy. With window 1
 *   (pre-copy) this is the old stop-and-wait: one round, its ack, the next.
 *
 *   Ordering: a page always travels on the same stream (the owner partitions
 *   by index), and a stream is one ordered TCP connection, so a page's
 *   versions land in the order they were sent. A destination thread
 *   publishes a closed round (its stats, with release stores) before it sends
 *   the StreamAck, and the source sends the control channel's RoundEnd only
 *   after every stream's ack: when the destination's owner reads RoundEnd,
 *   every stream's part of the round is in place and counted.
 *
 *   This file holds what both sides share: the handle, the thread's loop,
 *   attach/detach and the owner's calls. The thread stops when the stop
 *   eventfd becomes readable; detach joins it and only then shuts the socket
 *   down (shutdown(2) reaches the peer although Python's transport still
 *   holds another descriptor of it). A thread that fails shuts its socket
 *   down at once, so the peer's thread fails too instead of waiting. The
 *   caller keeps memory, hashes and held alive until detach has returned.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "channels/lm_stream_internal.h"
#include "channels/lm_tls.h"
#include "channels/lm_urgent_internal.h"
#include "codec/lm_pagehash.h"
#include "postcopy/lm_postcopy_internal.h"

LM_API int lm_stream_probe(char *reason, size_t reason_cap)
{
    return lm_chan_probe(reason, reason_cap);
}

void lm_stream_account_cpu(lm_stream *s)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0)
        STREAM_SET(s, cpu_ns, (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec);
}

static int stream_new(enum lm_stream_side side, uint8_t *base, uint64_t npages,
                      uint64_t *hashes, uint64_t *fp, uint8_t *fp_valid, lm_stream **out)
{
    *out = NULL;
    if (!base || npages == 0 || !fp != !fp_valid)
        return -EINVAL;
    lm_stream *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->side = side;
    s->base = base;
    s->npages = npages;
    s->hashes = hashes;
    s->fp = fp;
    s->fp_valid = fp_valid;
    s->last_closed = -1;
    s->work_efd = -1;
    s->window = 1;
    int rc = lm_chan_open(&s->ch, "bulk stream", (struct lm_chan_counters *)&s->stats,
                          lm_stream_wait_writable);
    if (rc < 0) {
        free(s);
        return rc;
    }
    static const uint8_t zero_page[LM_PAGE_SIZE];
    s->zero_hash = page_blocks_hash(zero_page, s->zero_blocks);
    s->work_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->work_efd < 0) {
        rc = -errno;
        lm_stream_destroy(s);
        return rc;
    }
    if (side == LM_STREAM_SOURCE) {
        /* The source needs to know at once whether it can send LZ4; the
         * destination loads the library on its thread (stream_buffers). */
        char reason[128];
        (void)lm_lz4_open(&s->lz4, reason, sizeof(reason));   /* without it: no LZ4 */
        if (s->lz4.dl) {   /* every page of a batch compressed */
            s->lz4buf_bytes = (uint64_t)s->lz4.bound(LM_STREAM_BATCH_PAGES * LM_PAGE_SIZE);
            s->lz4buf = malloc(s->lz4buf_bytes);
            if (!s->lz4buf) {
                lm_stream_destroy(s);
                return -ENOMEM;
            }
        }
    }
    if (side == LM_STREAM_SOURCE) {
        s->table = malloc(LM_STREAM_TABLE_BYTES);
        s->staging = malloc((size_t)LM_STREAM_BATCH_PAGES * LM_PAGE_SIZE);
        s->masks = malloc(LM_STREAM_MASK_BYTES);
        s->blocks = malloc(LM_STREAM_BLOCKS_BYTES);
        if (!s->table || !s->staging || !s->masks || !s->blocks) {
            lm_stream_destroy(s);
            return -ENOMEM;
        }
    }
    *out = s;
    return 0;
}

LM_API int lm_stream_source_create(const uint8_t *base, uint64_t npages, uint64_t *hashes,
                                   uint64_t *fp, uint8_t *fp_valid, lm_stream **out)
{
    /* The source only reads guest memory; the handle's field is shared. */
    return stream_new(LM_STREAM_SOURCE, (uint8_t *)base, npages, hashes, fp, fp_valid, out);
}

LM_API int lm_stream_source_lz4(lm_stream *s, uint32_t chunk_pages, double min_saving_pct,
                                char *reason, size_t reason_cap)
{
    if (!s || s->side != LM_STREAM_SOURCE || chunk_pages == 0 ||
        !(min_saving_pct >= 0.0 && min_saving_pct <= 100.0))
        return -EINVAL;
    if (s->ch.attached)
        return -EBUSY;
    if (!s->lz4.dl) {
        char scratch[2];
        if (!reason || reason_cap == 0) {
            reason = scratch;
            reason_cap = sizeof(scratch);
        }
        struct lm_lz4 probe;
        int rc = lm_lz4_open(&probe, reason, reason_cap);
        lm_lz4_close(&probe);
        return rc < 0 ? rc : -ENOSYS;
    }
    /* A run never spans more pages than a batch holds. */
    s->lz4_chunk_pages = chunk_pages < LM_STREAM_BATCH_PAGES ? chunk_pages : LM_STREAM_BATCH_PAGES;
    s->lz4_max_ratio = 1.0 - min_saving_pct / 100.0;
    return 0;
}

LM_API void lm_stream_source_link(lm_stream *s, uint64_t link_bytes_per_s)
{
    __atomic_store_n(&s->link_bytes_per_s, link_bytes_per_s, __ATOMIC_RELAXED);
}

LM_API int lm_stream_dest_create(uint8_t *base, uint64_t npages, uint64_t *hashes,
                                 uint8_t *held, uint64_t *fp, uint8_t *fp_valid,
                                 lm_stream **out)
{
    int rc = stream_new(LM_STREAM_DEST, base, npages, hashes, fp, fp_valid, out);
    if (rc == 0)
        (*out)->held = held;
    return rc;
}

LM_API int lm_stream_dest_fill(lm_stream *s, lm_postcopy *fill)
{
    if (!s || s->side != LM_STREAM_DEST || s->pc ||
        (fill && lm_postcopy_npages(fill) != s->npages))
        return -EINVAL;
    if (s->ch.attached)
        return -EBUSY;
    s->fill = fill;
    return 0;
}

LM_API int lm_stream_dest_postcopy_create(uint8_t *base, uint64_t npages, uint64_t *hashes,
                                          lm_postcopy *p, lm_urgent *urgent, lm_stream **out)
{
    if (!p || npages != lm_postcopy_npages(p) ||
        (urgent && lm_urgent_dest_settle_run(urgent, p, 0, 0, NULL) != 0)) {
        if (out)
            *out = NULL;
        return -EINVAL;
    }
    int rc = stream_new(LM_STREAM_DEST, base, npages, hashes, NULL, NULL, out);
    if (rc < 0)
        return rc;
    lm_stream *s = *out;
    s->pc = p;
    s->urgent = urgent;
    s->batch_flags = LM_WIRE_BATCH_POSTCOPY;
    s->lat_ring.capacity = LM_STREAM_LATENCY_RING;
    s->lat_ring.slots = malloc(LM_STREAM_LATENCY_RING * sizeof(uint64_t));
    if (!s->lat_ring.slots) {
        lm_stream_destroy(s);
        *out = NULL;
        return -ENOMEM;
    }
    return 0;
}

LM_API int64_t lm_stream_latencies_drain(lm_stream *s, uint64_t *ns_out, uint64_t max)
{
    if (!s || !s->lat_ring.slots)
        return 0;
    return lm_ring_drain(&s->lat_ring, ns_out, max);
}

LM_API int lm_stream_source_postcopy(lm_stream *s)
{
    if (!s || s->side != LM_STREAM_SOURCE)
        return -EINVAL;
    if (s->ch.attached)
        return -EBUSY;
    s->batch_flags = LM_WIRE_BATCH_POSTCOPY;
    s->lz4_chunk_pages = 0;
    return 0;
}

/* ---- the thread -------------------------------------------------------------- */

static uint64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Send every queued round as soon as it is queued; between rounds (and
 * inside them, see lm_stream_source_send_next) take the acks of the rounds
 * in flight. With nothing to send the thread sleeps in poll(2) on stop, work
 * and, while a round is in flight, the socket: no polling. An ack closing a
 * round frees its slot and wakes the owner, who may queue the next. */
static int source_loop(lm_stream *s)
{
    struct pollfd pfd[3] = {{.fd = s->ch.stop_efd, .events = POLLIN},
                            {.fd = s->work_efd, .events = POLLIN},
                            {.fd = s->ch.fd, .events = POLLIN}};
    for (;;) {
        if (s->jobs_sent < __atomic_load_n(&s->jobs_queued, __ATOMIC_ACQUIRE)) {
            int rc = lm_stream_source_send_next(s);
            if (rc != 0)
                return rc;
            continue;
        }
        int in_flight = s->jobs_sent > s->jobs_acked;
        if (in_flight && s->ch.tls && lm_tls_pending(&s->ch)) {
            /* An ack OpenSSL already read from the socket: poll(2) would
             * not wake for it. */
            int rc = lm_stream_source_take_ack(s);
            if (rc != 0)
                return rc;
            continue;
        }
        uint64_t t0 = in_flight ? monotonic_ns() : 0;
        int n = poll(pfd, in_flight ? 3 : 2, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return lm_chan_fail(&s->ch, errno, "poll: %s", strerror(errno));
        if (in_flight)
            STREAM_ADD(s, ack_wait_ns, monotonic_ns() - t0);
        if (pfd[0].revents)
            return 1;
        if (pfd[1].revents) {
            uint64_t drain;
            ssize_t r = read(s->work_efd, &drain, sizeof(drain));
            (void)r;
        }
        if (in_flight && pfd[2].revents) {
            int rc = lm_stream_source_take_ack(s);
            if (rc != 0)
                return rc;
        }
    }
}

static int dest_loop(lm_stream *s)
{
    for (;;) {
        uint16_t type;
        uint32_t length;
        int rc = lm_stream_receive(s, LM_MSG_PAGE_BATCH, LM_MSG_STREAM_END, &type, &length);
        if (rc != 0)
            return rc;
        const uint8_t *payload = s->rbuf + LM_WIRE_HEADER_BYTES;
        if (type == LM_MSG_PAGE_BATCH) {
            if (lm_frame_flags(s->rbuf) != s->batch_flags)
                return lm_chan_fail(&s->ch, EPROTO, "PageBatch flags %#x on a bulk stream, which "
                                    "carries %s batches only", lm_frame_flags(s->rbuf),
                                    s->pc ? "post-copy (flags 0x2)" : "pre-copy (flags 0)");
            rc = lm_stream_dest_on_batch(s, payload, length);
        } else {
            if (lm_frame_flags(s->rbuf) != 0)
                return lm_chan_fail(&s->ch, EPROTO, "StreamEnd flags %#x, must be 0",
                                    lm_frame_flags(s->rbuf));
            rc = lm_stream_dest_on_end(s, payload, length);
            if (rc == 0)
                lm_chan_notify(&s->ch);
        }
        if (rc != 0)
            return rc;
    }
}

/* The thread's large buffers, made on the thread: at the destination the
 * owner's event loop must not wait for them. Mapping memory (malloc of a
 * large buffer, dlopen) takes the address space's lock for writing, which
 * waits behind the pre-faulting of guest memory the destination runs at the
 * same time (MADV_POPULATE_WRITE holds it for reading): measured under load,
 * 40-140 ms per stream on the event loop, one stream after another. */
static int stream_buffers(lm_stream *s)
{
    free(s->rbuf);
    s->rbuf = malloc(LM_WIRE_HEADER_BYTES + s->ch.max_frame);
    if (!s->rbuf)
        return lm_chan_fail(&s->ch, ENOMEM, "no memory for the stream's receive buffer");
    if (s->side == LM_STREAM_DEST && !s->pc && !s->lz4.dl) {   /* no LZ4 in post-copy */
        char reason[128];
        if (lm_lz4_open(&s->lz4, reason, sizeof(reason)) == 0) {   /* else LZ4 is refused */
            s->lz4buf_bytes = (uint64_t)LM_STREAM_BATCH_PAGES * LM_PAGE_SIZE;
            s->lz4buf = malloc(s->lz4buf_bytes);   /* one batch's decoded pages */
            if (!s->lz4buf)
                return lm_chan_fail(&s->ch, ENOMEM, "no memory for decoding LZ4 runs");
        }
    }
    return 0;
}

static void *stream_main(void *arg)
{
    lm_stream *s = arg;
    int rc = stream_buffers(s);
    if (rc == 0)
        rc = s->side == LM_STREAM_SOURCE ? source_loop(s) : dest_loop(s);
    lm_stream_account_cpu(s);
    lm_chan_finish(&s->ch, rc, 1);   /* the peer's thread must not wait for us */
    return NULL;
}

LM_API int lm_stream_attach(lm_stream *s, int sock_fd, uint32_t wire_version, uint64_t send_seq,
                            uint64_t recv_seq, uint64_t max_payload_bytes)
{
    int rc = lm_chan_claim(s ? &s->ch : NULL, sock_fd);
    if (rc != 0)
        return rc;
    s->ch.max_frame = max_payload_bytes < LM_STREAM_MAX_FRAME ? max_payload_bytes
                                                          : LM_STREAM_MAX_FRAME;
    const char *name = s->side == LM_STREAM_SOURCE ? "lm-bulk-send"
                       : s->pc ? "lm-push-recv" : "lm-bulk-recv";
    return lm_chan_start(&s->ch, sock_fd, wire_version, send_seq, recv_seq, name, stream_main, s);
}

LM_API int lm_stream_send_round(lm_stream *s, uint32_t round, const uint64_t *pages, uint64_t n)
{
    if (!s || s->side != LM_STREAM_SOURCE || !s->ch.attached || (n && !pages))
        return -EINVAL;
    for (uint64_t i = 0; i < n; i++)
        if (pages[i] >= s->npages)
            return -ERANGE;
    /* Only the owner writes jobs_queued; the acquire on jobs_acked orders
     * the thread's last reads of a freed slot before we fill it again. */
    uint64_t queued = s->jobs_queued;
    if (queued - __atomic_load_n(&s->jobs_acked, __ATOMIC_ACQUIRE) >= s->window)
        return -EBUSY;
    struct lm_stream_job *job = &s->jobs[queued % LM_STREAM_WINDOW_MAX];
    job->pages = pages;
    job->n = n;
    job->round = round;
    job->sent_pages = job->sent_bytes = 0;
    /* Published with release: the thread reads the slot after its acquire. */
    __atomic_store_n(&s->jobs_queued, queued + 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(s->work_efd, &one, sizeof(one)) != sizeof(one))
        return -errno;   /* cannot happen short of a counter overflow; the round stays queued */
    return 0;
}

LM_API int lm_stream_source_window(lm_stream *s, uint32_t rounds)
{
    if (!s || s->side != LM_STREAM_SOURCE || rounds < 1 || rounds > LM_STREAM_WINDOW_MAX)
        return -EINVAL;
    s->window = rounds;
    return 0;
}

LM_API int lm_stream_detach(lm_stream *s)
{
    return s ? lm_chan_detach(&s->ch) : 0;
}

LM_API int lm_stream_notify_fd(const lm_stream *s) { return s->ch.notify_efd; }

LM_API int lm_stream_status(const lm_stream *s, char *reason, size_t reason_cap)
{
    return lm_chan_status(&s->ch, reason, reason_cap);
}

LM_API int lm_stream_stats_get(const lm_stream *s, lm_stream_stats *out)
{
    lm_chan_stats_copy(&s->stats, out, sizeof(*out) / sizeof(uint64_t));
    return 0;
}

LM_API void lm_stream_destroy(lm_stream *s)
{
    if (!s)
        return;
    lm_stream_detach(s);
    lm_chan_close(&s->ch);
    if (s->work_efd >= 0)
        close(s->work_efd);
    free(s->rbuf);
    free(s->table);
    free(s->staging);
    free(s->masks);
    free(s->blocks);
    free(s->lz4buf);
    free(s->lat_ring.slots);
    lm_lz4_close(&s->lz4);
    free(s);
}
