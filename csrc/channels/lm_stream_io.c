/*
 * A bulk stream's byte stream: the wait of a send, whole checked frames in.
 *
 * Theory of operation
 *   The socket is non-blocking (a dup of the transport's; O_NONBLOCK lives in
 *   the shared open file), so every wait is a poll(2) together with the stop
 *   eventfd: a detach never waits behind a peer that stopped reading or
 *   writing. Frames are sent by lm_chan_send (lm_chan.c) with writev(2)
 *   straight from the caller's parts (header, run table, staged pages): no
 *   copy is made to send. A frame is
 *   received with two exact reads, its header and then its payload, into one
 *   buffer sized for the largest payload accepted; the header is checked
 *   (lm_frame.c: magic, version, type, reserved, length cap, sequence) before
 *   the payload is read, so a hostile length never makes us wait for or
 *   buffer more than the cap, and the checksum before anything is handed on.
 *   Under TLS the same reads go through SSL_read (lm_tls.c), and a wait is
 *   for whichever direction OpenSSL asks (a TLS read may need to write).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

#include "channels/lm_stream_internal.h"
#include "channels/lm_tls.h"
#include "wire/lm_le.h"

int lm_stream_wait_writable(struct lm_chan *c)
{
    return lm_chan_wait(c, POLLOUT);
}

/* Read exactly n bytes: 0, 1 (stop), 2 (end of stream before the first
 * byte, when at_boundary), or -errno. */
static int read_exact(lm_stream *s, uint8_t *buf, uint64_t n, int at_boundary)
{
    uint64_t got = 0;
    while (got < n) {
        if (s->ch.tls) {
            short events = 0;
            ssize_t r = lm_tls_recv(&s->ch, buf + got, n - got, &events);
            if (r == -EAGAIN) {
                int rc = lm_chan_wait(&s->ch, events);
                if (rc != 0)
                    return rc;
                continue;
            }
            if (r < 0)
                return (int)r;   /* the reason is recorded */
            if (r == 0) {
                if (at_boundary && got == 0)
                    return 2;
                return lm_chan_fail(&s->ch, ECONNRESET, "the bulk stream ended inside a frame");
            }
            STREAM_ADD(s, bytes_received, r);
            got += (uint64_t)r;
            continue;
        }
        ssize_t r = read(s->ch.fd, buf + got, n - got);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                int rc = lm_chan_wait(&s->ch, POLLIN);
                if (rc != 0)
                    return rc;
                continue;
            }
            if (errno == ECONNRESET)
                return lm_chan_fail(&s->ch, ECONNRESET, "the peer reset the bulk stream");
            return lm_chan_fail(&s->ch, errno, "reading the bulk stream: %s", strerror(errno));
        }
        if (r == 0) {
            if (at_boundary && got == 0)
                return 2;
            /* A peer that went away mid-frame (a source dropping its streams
             * at a link break shuts them down wherever they are): a lost
             * connection, as on the urgent channel. Nothing of the frame is
             * placed, so a resumed pre-copy may go on after it. */
            return lm_chan_fail(&s->ch, ECONNRESET, "the bulk stream ended inside a frame");
        }
        STREAM_ADD(s, bytes_received, r);
        got += (uint64_t)r;
    }
    return 0;
}

int lm_stream_receive(lm_stream *s, uint16_t type_a, uint16_t type_b, uint16_t *type_out,
                      uint32_t *length_out)
{
    uint8_t *h = s->rbuf;
    int rc = read_exact(s, h, LM_WIRE_HEADER_BYTES, 1);
    if (rc != 0)
        return rc;
    uint16_t type = get16(h + 6);
    const struct lm_frame_expect want = {
        .version = (uint16_t)s->ch.version, .type = type == type_b ? type_b : type_a,
        .max_payload_bytes = s->ch.max_frame, .sequence = s->ch.recv_seq,
    };
    uint32_t length = 0;
    rc = lm_frame_check_header(h, &want, &length, s->ch.reason, sizeof(s->ch.reason));
    if (rc < 0)
        return rc;
    rc = read_exact(s, h + LM_WIRE_HEADER_BYTES, length, 0);
    if (rc != 0)
        return rc;
    rc = lm_frame_check_payload(&s->ch.framer, h, h + LM_WIRE_HEADER_BYTES, s->ch.reason,
                                sizeof(s->ch.reason));
    if (rc < 0)
        return rc;
    s->ch.recv_seq++;
    STREAM_ADD(s, frames_received, 1);
    *type_out = type;
    *length_out = length;
    return 0;
}
