/*
 * The urgent post-copy channel served by native threads, off both event loops.
 *
 * Theory of operation
 *   Python opens the urgent channel and does its handshake; then it dups the
 *   socket, stops reading and writing it, and hands the dup to a thread here
 *   together with the next sequence numbers of each direction. The frames
 *   are exactly those of the Python path (protocol/spec.py, framed by
 *   wire/lm_frame.c), so either peer may run either path:
 *
 *     destination thread                              source thread
 *     (lm_urgent_dest.c)                              (lm_urgent_source.c)
 *     poll(stop, socket, uffd)                        poll(stop, socket)
 *     uffd readable: lm_postcopy_read_faults
 *       (distinct missing pages), those not
 *       outstanding -> PageRequest ─────────────────▶ validate, sort, runs
 *                                                      writev(header, batch
 *     socket readable: PageBatch(URGENT) ◀──────────── prefix, guest pages)
 *       validate, UFFDIO_COPY/ZEROPAGE per run         publish indices in a
 *       (wakes the vCPU), hash into hashes[],          ring for the pusher
 *       latency fault-read -> placed into a ring
 *
 *   This file holds what both sides share: the handle, the thread's poll
 *   loop, attach/detach and the owner's calls. Ordering and sharing:
 *    - the outstanding set (per-page fault time) belongs to whichever thread
 *      is attached; attach/detach are serialised by the owner;
 *    - the ring (lm_ring.h) is single-producer (the thread) single-consumer
 *      (the owner); the owner learns of news through an eventfd (eventfd(2))
 *      it watches with its event loop;
 *    - the thread stops when the stop eventfd becomes readable; detach joins
 *      it and only then shuts the socket down (shutdown(2) reaches the peer
 *      even though Python's transport still holds another descriptor of it).
 *      The caller keeps the region, the postcopy handle and hashes alive
 *      until detach has returned.
 *   Every received frame is checked before it is acted on: its header and
 *   checksum (lm_frame.c), then its payload (counts, page bounds, run order,
 *   byte totals). A violation ends the thread with -EPROTO (or -ERANGE for a
 *   page outside memory, -EBADMSG for a checksum) and a reason; the peer's
 *   socket is then shut down by detach, as the Python path closes a channel
 *   that broke the protocol.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "channels/lm_urgent_internal.h"

LM_API int lm_urgent_probe(char *reason, size_t reason_cap)
{
    return lm_chan_probe(reason, reason_cap);
}

int lm_urgent_new(enum lm_urgent_side side, uint64_t npages, uint64_t *hashes, lm_urgent **out)
{
    *out = NULL;
    lm_urgent *u = calloc(1, sizeof(*u));
    if (!u)
        return -ENOMEM;
    u->side = side;
    u->npages = npages;
    u->hashes = hashes;
    int rc = lm_chan_open(&u->ch, "urgent channel", (struct lm_chan_counters *)&u->stats,
                          lm_urgent_wait_writable);
    if (rc < 0) {
        free(u);
        return rc;
    }
    u->ring.capacity = LM_URGENT_RING;
    u->ring.slots = malloc(LM_URGENT_RING * sizeof(uint64_t));
    u->scratch = malloc(LM_URGENT_MAX_PAGES_IN * sizeof(uint64_t));
    if (!u->ring.slots || !u->scratch) {
        lm_urgent_destroy(u);
        return -ENOMEM;
    }
    *out = u;
    return 0;
}

/* ---- the thread -------------------------------------------------------------- */

/* A fault blocks a vCPU until this thread has run: on a busy machine a woken
 * normal-priority thread may wait a scheduler slice (milliseconds) for a CPU.
 * SCHED_FIFO runs it at once. Its work per wake-up is bounded (one poll's
 * worth of frames), and RT throttling (sched_rt_runtime_us) caps what a
 * runaway could take. Refusal (no CAP_SYS_NICE, a container) is recorded,
 * not fatal: the thread then runs at normal priority. */
static void apply_priority(lm_urgent *u)
{
    if (u->rt_priority <= 0)
        return;
    struct sched_param sp = {.sched_priority = u->rt_priority};
    int rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);
    __atomic_store_n(&u->stats.rt_priority, rc == 0 ? (uint64_t)u->rt_priority : 0,
                     __ATOMIC_RELAXED);
    __atomic_store_n(&u->stats.rt_errno, (uint64_t)rc, __ATOMIC_RELAXED);
}

LM_API int lm_urgent_set_priority(lm_urgent *u, int rt_priority)
{
    if (!u || rt_priority < 0 || rt_priority > 99)
        return -EINVAL;
    u->rt_priority = rt_priority;
    return 0;
}

static void *urgent_main(void *arg)
{
    lm_urgent *u = arg;
    apply_priority(u);
    int rc = u->side == LM_URGENT_DEST ? lm_urgent_dest_resend(u) : 0;
    int uffd = u->side == LM_URGENT_DEST ? lm_postcopy_fd(u->pc) : -1;
    struct pollfd pfd[3] = {{.fd = u->ch.stop_efd, .events = POLLIN},
                            {.fd = u->ch.fd, .events = POLLIN},
                            {.fd = uffd, .events = POLLIN}};
    nfds_t nfds = u->side == LM_URGENT_DEST ? 3 : 2;
    uint64_t spin_ns = (uint64_t)u->spin_us * 1000u, spin_until = 0;
    while (rc == 0) {
        int timeout_ms = -1;
        if (spin_ns && lm_urgent_now_ns() < spin_until) {
            timeout_ms = 0;
            STAT_ADD(u, spin_polls, 1);
        }
        int n = poll(pfd, nfds, timeout_ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = lm_chan_fail(&u->ch, errno, "poll: %s", strerror(errno));
            break;
        }
        if (n == 0)
            continue;
        if (pfd[0].revents)
            break;
        if (nfds == 3 && pfd[2].revents) {
            if (pfd[2].revents & (POLLERR | POLLNVAL)) {
                rc = lm_chan_fail(&u->ch, EBADF,
                                  "the userfaultfd was closed under the urgent thread");
                break;
            }
            rc = lm_urgent_dest_read_faults(u);
        }
        if (rc == 0 && pfd[1].revents) {
            if (u->side == LM_URGENT_DEST)
                rc = lm_urgent_receive(u, LM_MSG_PAGE_BATCH, lm_urgent_dest_on_batch);
            else
                rc = lm_urgent_receive(u, LM_MSG_PAGE_REQUEST, lm_urgent_source_on_request);
        }
        if (spin_ns)
            spin_until = lm_urgent_now_ns() + spin_ns;
    }
    if (rc == -ECANCELED)
        rc = 0;   /* stop asked while a write waited */
    lm_chan_finish(&u->ch, rc, 0);
    return NULL;
}

LM_API int lm_urgent_attach(lm_urgent *u, int sock_fd, uint32_t wire_version, uint64_t send_seq,
                            uint64_t recv_seq, uint64_t max_payload_bytes, int cpu,
                            uint32_t spin_us)
{
    int rc = lm_chan_claim(u ? &u->ch : NULL, sock_fd);
    if (rc != 0)
        return rc;
    uint64_t max_frame = max_payload_bytes < LM_URGENT_MAX_FRAME ? max_payload_bytes
                                                                  : LM_URGENT_MAX_FRAME;
    uint64_t sbuf_bytes = u->side == LM_URGENT_DEST
        ? LM_WIRE_HEADER_BYTES + LM_WIRE_REQUEST_PREFIX_BYTES + LM_URGENT_REQUEST_PAGES * 8
        : LM_WIRE_HEADER_BYTES + LM_WIRE_BATCH_PREFIX_BYTES + LM_BATCH_HEADER_BYTES +
          LM_URGENT_REPLY_RUNS * LM_BATCH_RUN_BYTES;
    if (!u->rbuf || u->rbuf_cap != LM_WIRE_HEADER_BYTES + max_frame) {
        free(u->rbuf);
        u->rbuf_cap = LM_WIRE_HEADER_BYTES + max_frame;
        u->rbuf = malloc(u->rbuf_cap);
    }
    if (!u->sbuf)
        u->sbuf = malloc(sbuf_bytes);
    if (!u->rbuf || !u->sbuf) {
        close(sock_fd);
        return -ENOMEM;
    }
    u->ch.max_frame = max_frame;
    u->spin_us = spin_us;
    u->rlen = 0;
    rc = lm_chan_start(&u->ch, sock_fd, wire_version, send_seq, recv_seq,
                       u->side == LM_URGENT_SOURCE ? "lm-urgent-src" : "lm-urgent-dst",
                       urgent_main, u);
    if (rc != 0)
        return rc;
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        /* A hint: failing to pin (CPU offline, cpuset) leaves the thread unpinned. */
        (void)pthread_setaffinity_np(u->ch.thread, sizeof(set), &set);
    }
    STAT_ADD(u, attaches, 1);
    return 0;
}

LM_API int lm_urgent_detach(lm_urgent *u)
{
    return u ? lm_chan_detach(&u->ch) : 0;
}

LM_API int lm_urgent_notify_fd(const lm_urgent *u) { return u->ch.notify_efd; }

LM_API int lm_urgent_status(const lm_urgent *u, char *reason, size_t reason_cap)
{
    return lm_chan_status(&u->ch, reason, reason_cap);
}

LM_API int64_t lm_urgent_latencies_drain(lm_urgent *u, uint64_t *ns_out, uint64_t max)
{
    if (u->side != LM_URGENT_DEST)
        return -EINVAL;
    return lm_ring_drain(&u->ring, ns_out, max);
}

LM_API int64_t lm_urgent_requests_drain(lm_urgent *u, uint64_t *pages_out, uint64_t max)
{
    if (u->side != LM_URGENT_SOURCE)
        return -EINVAL;
    return lm_ring_drain(&u->ring, pages_out, max);
}

LM_API uint64_t lm_urgent_outstanding(const lm_urgent *u)
{
    return __atomic_load_n(&u->noutstanding, __ATOMIC_RELAXED);
}

LM_API int lm_urgent_stats_get(const lm_urgent *u, lm_urgent_stats *out)
{
    lm_chan_stats_copy(&u->stats, out, sizeof(*out) / sizeof(uint64_t));
    return 0;
}

LM_API void lm_urgent_destroy(lm_urgent *u)
{
    if (!u)
        return;
    lm_urgent_detach(u);
    lm_chan_close(&u->ch);
    free(u->ring.slots);
    free(u->scratch);
    free(u->fault_ns);
    free(u->rbuf);
    free(u->sbuf);
    free(u);
}
