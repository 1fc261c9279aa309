/*
 * The urgent channel's byte stream: the wait of a send, checked frames in.
 *
 * Theory of operation
 *   The socket is non-blocking (it is a dup of the transport's, and
 *   O_NONBLOCK lives in the shared open file), so a send that finds it full
 *   polls for POLLOUT together with the stop eventfd: a detach never waits
 *   behind a peer that stopped reading. Receiving reads until EAGAIN into
 *   one buffer sized for the header plus the largest payload accepted;
 *   every complete frame is checked (lm_frame.c) and handed on in order, and
 *   a partial frame's bytes stay buffered for the next readable event.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

#include "channels/lm_urgent_internal.h"

int lm_urgent_wait_writable(struct lm_chan *c)
{
    struct pollfd pfd[2] = {{.fd = c->stop_efd, .events = POLLIN},
                            {.fd = c->fd, .events = POLLOUT}};
    for (;;) {
        int n = poll(pfd, 2, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (pfd[0].revents)
            return -ECANCELED;
        if (pfd[1].revents & (POLLERR | POLLHUP))
            return lm_chan_fail(c, ECONNRESET, "the peer closed the urgent channel");
        if (pfd[1].revents & POLLOUT)
            return 0;
    }
}

int lm_urgent_receive(lm_urgent *u, uint16_t want_type, lm_urgent_frame_fn fn)
{
    for (;;) {
        /* Never full here: a buffered partial frame passed its header check,
         * so it fits in the header plus the largest payload accepted. */
        ssize_t got = read(u->ch.fd, u->rbuf + u->rlen, u->rbuf_cap - u->rlen);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return 0;
            if (errno == ECONNRESET)
                return lm_chan_fail(&u->ch, ECONNRESET, "the peer reset the urgent channel");
            return lm_chan_fail(&u->ch, errno, "reading the urgent channel: %s", strerror(errno));
        }
        if (got == 0)
            return lm_chan_fail(&u->ch, ECONNRESET, "%s", u->rlen
                                ? "the peer closed the urgent channel mid-frame"
                                : "the peer closed the urgent channel");
        STAT_ADD(u, bytes_received, got);
        u->rlen += (uint64_t)got;
        uint64_t off = 0;
        while (u->rlen - off >= LM_WIRE_HEADER_BYTES) {
            const uint8_t *h = u->rbuf + off;
            const struct lm_frame_expect want = {
                .version = (uint16_t)u->ch.version, .type = want_type,
                .max_payload_bytes = u->ch.max_frame, .sequence = u->ch.recv_seq,
            };
            uint32_t length = 0;
            int rc = lm_frame_check_header(h, &want, &length, u->ch.reason, sizeof(u->ch.reason));
            if (rc < 0)
                return rc;
            if (u->rlen - off - LM_WIRE_HEADER_BYTES < length)
                break;
            const uint8_t *payload = h + LM_WIRE_HEADER_BYTES;
            rc = lm_frame_check_payload(&u->ch.framer, h, payload, u->ch.reason,
                                        sizeof(u->ch.reason));
            if (rc < 0)
                return rc;
            u->ch.recv_seq++;
            STAT_ADD(u, frames_received, 1);
            rc = fn(u, lm_frame_flags(h), payload, length);
            if (rc < 0)
                return rc;
            off += LM_WIRE_HEADER_BYTES + length;
        }
        if (off) {
            memmove(u->rbuf, u->rbuf + off, u->rlen - off);
            u->rlen -= off;
        }
        if (u->rlen && !lm_frame_could_start(u->rbuf, u->rlen))
            return lm_chan_fail(&u->ch, EPROTO, "bad frame magic");
    }
}
