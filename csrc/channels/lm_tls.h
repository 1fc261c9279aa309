/*
 * Mutual TLS on a bulk stream's socket, inside the module (not part of the
 * cdef; the owner's calls are declared in livemig.h).
 *
 * A stream under TLS carries the same frames as a plain one, through
 * SSL_write/SSL_read of OpenSSL (libssl, linked at build time when its
 * headers are there: LM_HAVE_OPENSSL; without it every call says so and the
 * streams stay plain). lm_chan.c and lm_stream_io.c call the two functions
 * below when c->tls is set; the plain path does not change.
 */
#ifndef LM_TLS_H
#define LM_TLS_H

#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

struct lm_chan;

/* The largest TLS record's plaintext (RFC 8446, 5.1): sends are cut and
 * coalesced into records of exactly this much while a frame lasts. */
#define LM_TLS_RECORD_BYTES 16384

/* Send one frame's parts whole through the channel's TLS connection, in
 * records of LM_TLS_RECORD_BYTES (small parts are copied together; a part
 * that fills records is written from where it lies): 0, 1 when stop was asked
 * while waiting, or -errno with c->reason. */
int lm_tls_send(struct lm_chan *c, const struct iovec *iov, int iovcnt);
/* Read up to n bytes: > 0 bytes read, 0 at the end of the stream (the peer's
 * close_notify or its FIN), -EAGAIN with *events_out (POLLIN/POLLOUT) to wait
 * for, or -errno with c->reason. */
ssize_t lm_tls_recv(struct lm_chan *c, void *buf, size_t n, short *events_out);
/* Nonzero when OpenSSL holds bytes of the connection not read yet: the
 * rest of a decrypted record, or whole records read ahead from the socket
 * and not yet processed (a readable-socket test misses both: they have
 * left the socket). */
int lm_tls_pending(struct lm_chan *c);
/* The thread is joined: say close_notify (best effort, never waits) and free
 * the connection; the caller closes the socket. */
void lm_tls_end(struct lm_chan *c);

#endif /* LM_TLS_H */
