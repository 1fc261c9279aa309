/*
 * A native channel thread's plumbing, shared by the urgent channel and the
 * bulk streams: see lm_chan.h for the theory of operation.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "channels/lm_chan.h"
#include "channels/lm_tls.h"

/* lm_chan_open takes either family's stats as its counters. */
#define LM_CHAN_SAME_AT(stats, f) \
    (offsetof(stats, f) == offsetof(struct lm_chan_counters, f))
#define LM_CHAN_SAME_HEAD(stats)                                                       \
    _Static_assert(LM_CHAN_SAME_AT(stats, frames_sent) &&                              \
                   LM_CHAN_SAME_AT(stats, frames_received) &&                          \
                   LM_CHAN_SAME_AT(stats, bytes_sent) &&                               \
                   LM_CHAN_SAME_AT(stats, bytes_received),                             \
                   #stats " must open with struct lm_chan_counters")
LM_CHAN_SAME_HEAD(lm_urgent_stats);
LM_CHAN_SAME_HEAD(lm_stream_stats);

int lm_chan_probe(char *reason, size_t reason_cap)
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

int lm_chan_open(struct lm_chan *c, const char *name, struct lm_chan_counters *counters,
                 lm_chan_wait_fn wait_writable)
{
    c->name = name;
    c->counters = counters;
    c->wait_writable = wait_writable;
    c->fd = -1;
    c->notify_efd = c->stop_efd = -1;
    char reason[128];
    int rc = lm_framer_open(&c->framer, reason, sizeof(reason));
    if (rc < 0)
        return rc;
    c->notify_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    c->stop_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->notify_efd < 0 || c->stop_efd < 0) {
        rc = -errno;
        lm_chan_close(c);
        return rc;
    }
    return 0;
}

void lm_chan_close(struct lm_chan *c)
{
    lm_framer_close(&c->framer);
    if (c->notify_efd >= 0)
        close(c->notify_efd);
    if (c->stop_efd >= 0)
        close(c->stop_efd);
    c->notify_efd = c->stop_efd = -1;
}

void lm_chan_notify(struct lm_chan *c)
{
    uint64_t one = 1;
    /* EAGAIN only when the counter is at its maximum: the owner is woken anyway. */
    ssize_t w = write(c->notify_efd, &one, sizeof(one));
    (void)w;
}

int lm_chan_fail(struct lm_chan *c, int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->reason, sizeof(c->reason), fmt, ap);
    va_end(ap);
    return -err;
}

int lm_chan_claim(struct lm_chan *c, int sock_fd)
{
    if (!c || sock_fd < 0) {
        if (sock_fd >= 0)
            close(sock_fd);
        return -EINVAL;
    }
    if (c->attached) {
        close(sock_fd);
        return -EBUSY;
    }
    /* The thread waits in poll(2), so the socket stays non-blocking as the
     * transport made it (the flag lives in the shared open file). */
    int fl = fcntl(sock_fd, F_GETFL);
    if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(sock_fd, F_SETFL, fl | O_NONBLOCK) < 0)) {
        int e = errno;
        close(sock_fd);
        return -e;
    }
    return 0;
}

int lm_chan_start(struct lm_chan *c, int sock_fd, uint32_t wire_version, uint64_t send_seq,
                  uint64_t recv_seq, const char *name, void *(*main)(void *), void *arg)
{
    c->fd = sock_fd;
    c->version = wire_version;
    c->send_seq = send_seq;
    c->recv_seq = recv_seq;
    c->reason[0] = '\0';
    uint64_t drain;
    while (read(c->stop_efd, &drain, sizeof(drain)) == sizeof(drain))
        ;
    __atomic_store_n(&c->status, LM_CHAN_RUNNING, __ATOMIC_RELEASE);
    int rc = pthread_create(&c->thread, NULL, main, arg);
    if (rc != 0) {
        __atomic_store_n(&c->status, LM_CHAN_IDLE, __ATOMIC_RELEASE);
        close(sock_fd);
        c->fd = -1;
        return -rc;
    }
    pthread_setname_np(c->thread, name);   /* a name is a convenience: never fatal */
    c->attached = 1;
    return 0;
}

int lm_chan_detach(struct lm_chan *c)
{
    if (!c->attached)
        return 0;
    uint64_t one = 1;
    ssize_t w = write(c->stop_efd, &one, sizeof(one));
    (void)w;
    pthread_join(c->thread, NULL);
    c->attached = 0;
    lm_tls_end(c);
    shutdown(c->fd, SHUT_RDWR);
    close(c->fd);
    c->fd = -1;
    int st = __atomic_load_n(&c->status, __ATOMIC_ACQUIRE);
    return st < 0 ? st : 0;
}

void lm_chan_finish(struct lm_chan *c, int rc, int shutdown_on_failure)
{
    if (rc < 0 && shutdown_on_failure)
        shutdown(c->fd, SHUT_RDWR);
    __atomic_store_n(&c->status, rc < 0 ? rc : LM_CHAN_STOPPED, __ATOMIC_RELEASE);
    lm_chan_notify(c);
}

int lm_chan_status(const struct lm_chan *c, char *reason, size_t reason_cap)
{
    int st = __atomic_load_n(&c->status, __ATOMIC_ACQUIRE);
    if (reason && reason_cap) {
        if (st < 0)
            snprintf(reason, reason_cap, "%s", c->reason);
        else
            reason[0] = '\0';
    }
    return st;
}

static int write_all(struct lm_chan *c, struct iovec *iov, int iovcnt)
{
    while (iovcnt > 0) {
        ssize_t w = writev(c->fd, iov, iovcnt > IOV_MAX ? IOV_MAX : iovcnt);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                int rc = c->wait_writable(c);
                if (rc != 0)
                    return rc;
                continue;
            }
            if (errno == EPIPE || errno == ECONNRESET)
                return lm_chan_fail(c, ECONNRESET, "the peer closed the %s", c->name);
            return lm_chan_fail(c, errno, "writing the %s: %s", c->name, strerror(errno));
        }
        LM_CHAN_ADD(c, bytes_sent, w);
        while (iovcnt > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

int lm_chan_send(struct lm_chan *c, uint16_t type, uint16_t flags, struct iovec *iov,
                 int iovcnt)
{
    lm_frame_put_header(&c->framer, iov[0].iov_base, (uint16_t)c->version, type, flags,
                        c->send_seq++, iov + 1, iovcnt - 1);
    iov[0].iov_len = LM_WIRE_HEADER_BYTES;
    int rc = c->tls ? lm_tls_send(c, iov, iovcnt) : write_all(c, iov, iovcnt);
    if (rc == 0)
        LM_CHAN_ADD(c, frames_sent, 1);
    return rc;
}

void lm_chan_stats_copy(const void *stats, void *out, size_t n_words)
{
    const uint64_t *src = stats;
    uint64_t *dst = out;
    for (size_t i = 0; i < n_words; i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_ACQUIRE);
}

int lm_chan_wait(struct lm_chan *c, short events)
{
    struct pollfd pfd[2] = {{.fd = c->stop_efd, .events = POLLIN},
                            {.fd = c->fd, .events = events}};
    for (;;) {
        int n = poll(pfd, 2, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return lm_chan_fail(c, errno, "poll: %s", strerror(errno));
        if (pfd[0].revents)
            return 1;
        if (pfd[1].revents & POLLNVAL)
            return lm_chan_fail(c, EBADF, "the %s's socket was closed under its thread", c->name);
        if (pfd[1].revents)
            return 0;
    }
}
