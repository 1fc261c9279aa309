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
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "channels/lm_urgent_internal.h"

LM_API int lm_urgent_probe(char *reason, size_t reason_cap)
{
    char scratch[2];
    if (!reason || reason_cap == 0) {
        reason = scratch;
        reason_cap = sizeof(scratch);
    }
    reason[0] = '\0';
    struct lm_framer f;
    int rc = lm_framer_open(&f, reason, reason_cap);
    if (rc == 0)
        lm_framer_close(&f);
    return rc;
}

void lm_urgent_notify(lm_urgent *u)
{
    uint64_t one = 1;
    /* EAGAIN only when the counter is at its maximum: the owner is woken anyway. */
    ssize_t w = write(u->notify_efd, &one, sizeof(one));
    (void)w;
}

int lm_urgent_fail(lm_urgent *u, int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(u->reason, sizeof(u->reason), fmt, ap);
    va_end(ap);
    return -err;
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
    u->fd = -1;
    u->notify_efd = u->stop_efd = -1;
    char reason[128];
    int rc = lm_framer_open(&u->framer, reason, sizeof(reason));
    if (rc < 0) {
        free(u);
        return rc;
    }
    u->ring.capacity = LM_URGENT_RING;
    u->ring.slots = malloc(LM_URGENT_RING * sizeof(uint64_t));
    u->scratch = malloc(LM_URGENT_MAX_PAGES_IN * sizeof(uint64_t));
    u->notify_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    u->stop_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!u->ring.slots || !u->scratch || u->notify_efd < 0 || u->stop_efd < 0) {
        rc = (u->notify_efd < 0 || u->stop_efd < 0) ? -errno : -ENOMEM;
        lm_urgent_destroy(u);
        return rc;
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
    struct pollfd pfd[3] = {{.fd = u->stop_efd, .events = POLLIN},
                            {.fd = u->fd, .events = POLLIN},
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
            rc = lm_urgent_fail(u, errno, "poll: %s", strerror(errno));
            break;
        }
        if (n == 0)
            continue;
        if (pfd[0].revents)
            break;
        if (nfds == 3 && pfd[2].revents) {
            if (pfd[2].revents & (POLLERR | POLLNVAL)) {
                rc = lm_urgent_fail(u, EBADF, "the userfaultfd was closed under the urgent thread");
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
    __atomic_store_n(&u->status, rc < 0 ? rc : LM_URGENT_STOPPED, __ATOMIC_RELEASE);
    lm_urgent_notify(u);
    return NULL;
}

LM_API int lm_urgent_attach(lm_urgent *u, int sock_fd, uint32_t wire_version, uint64_t send_seq,
                            uint64_t recv_seq, uint64_t max_payload_bytes, int cpu,
                            uint32_t spin_us)
{
    if (!u || sock_fd < 0) {
        if (sock_fd >= 0)
            close(sock_fd);
        return -EINVAL;
    }
    if (u->attached) {
        close(sock_fd);
        return -EBUSY;
    }
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
    /* The thread reads until EAGAIN; a transport's socket is non-blocking
     * already (the flag lives in the shared open file). */
    int fl = fcntl(sock_fd, F_GETFL);
    if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(sock_fd, F_SETFL, fl | O_NONBLOCK) < 0)) {
        int e = errno;
        close(sock_fd);
        return -e;
    }
    u->fd = sock_fd;
    u->version = wire_version;
    u->send_seq = send_seq;
    u->recv_seq = recv_seq;
    u->max_frame = max_frame;
    u->spin_us = spin_us;
    u->rlen = 0;
    u->reason[0] = '\0';
    uint64_t drain;
    while (read(u->stop_efd, &drain, sizeof(drain)) == sizeof(drain))
        ;
    __atomic_store_n(&u->status, LM_URGENT_RUNNING, __ATOMIC_RELEASE);
    int rc = pthread_create(&u->thread, NULL, urgent_main, u);
    if (rc != 0) {
        __atomic_store_n(&u->status, LM_URGENT_IDLE, __ATOMIC_RELEASE);
        close(sock_fd);
        u->fd = -1;
        return -rc;
    }
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        /* A hint: failing to pin (CPU offline, cpuset) leaves the thread unpinned. */
        (void)pthread_setaffinity_np(u->thread, sizeof(set), &set);
    }
    u->attached = 1;
    STAT_ADD(u, attaches, 1);
    return 0;
}

LM_API int lm_urgent_detach(lm_urgent *u)
{
    if (!u || !u->attached)
        return 0;
    uint64_t one = 1;
    ssize_t w = write(u->stop_efd, &one, sizeof(one));
    (void)w;
    pthread_join(u->thread, NULL);
    u->attached = 0;
    /* shutdown reaches the peer although the transport holds another fd. */
    shutdown(u->fd, SHUT_RDWR);
    close(u->fd);
    u->fd = -1;
    int st = __atomic_load_n(&u->status, __ATOMIC_ACQUIRE);
    return st < 0 ? st : 0;
}

LM_API int lm_urgent_notify_fd(const lm_urgent *u) { return u->notify_efd; }

LM_API int lm_urgent_status(const lm_urgent *u, char *reason, size_t reason_cap)
{
    int st = __atomic_load_n(&u->status, __ATOMIC_ACQUIRE);
    if (reason && reason_cap) {
        if (st < 0)
            snprintf(reason, reason_cap, "%s", u->reason);
        else
            reason[0] = '\0';
    }
    return st;
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
    const uint64_t *src = (const uint64_t *)&u->stats;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    return 0;
}

LM_API void lm_urgent_destroy(lm_urgent *u)
{
    if (!u)
        return;
    lm_urgent_detach(u);
    lm_framer_close(&u->framer);
    if (u->notify_efd >= 0)
        close(u->notify_efd);
    if (u->stop_efd >= 0)
        close(u->stop_efd);
    free(u->ring.slots);
    free(u->scratch);
    free(u->fault_ns);
    free(u->rbuf);
    free(u->sbuf);
    free(u);
}
