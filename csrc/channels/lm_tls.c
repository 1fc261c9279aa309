/*
 * Mutual TLS 1.3 on the bulk streams, with OpenSSL, inside the module.
 *
 * Theory of operation
 *   The kernel here has no kTLS, and the stream threads must not hand their
 *   bytes to Python, so each stream's TLS connection is an OpenSSL SSL object
 *   over the stream's TCP socket:
 *
 *     owner (Python, an executor thread)           stream thread
 *     lm_tls_ctx_create(cert, key, CA)  once per side and migration
 *     lm_tls_handshake(ctx, fd, timeout) ─ SSL_connect / SSL_accept,
 *         both sides verify the peer's chain against the CA; TLS 1.3 only
 *     lm_tls_write / lm_tls_read: the stream's Hello and Welcome, inside TLS
 *     lm_tls_peer_cert: the owner compares it with the control channel's peer
 *     lm_stream_attach_tls(stream, tls) ─────────▶ frames through SSL_write /
 *                                                  SSL_read (lm_tls_send,
 *                                                  lm_tls_recv), on the same
 *                                                  non-blocking socket
 *
 *   Every wait is a poll(2) with an end: before attach, of the socket and a
 *   cancel eventfd (lm_tls_cancel) bounded by the caller's timeout, so an
 *   executor thread never blocks behind a silent peer for longer; after
 *   attach, of the socket and the thread's stop eventfd, as on the plain path.
 *   An SSL object is used by one thread at a time: the owner's executor until
 *   attach, then the stream thread (pthread_create orders the two).
 *
 *   Records: a send cuts a frame into records of exactly
 *   LM_TLS_RECORD_BYTES. The small parts (frame header, run table, masks)
 *   are copied together into the record being built; a part that fills
 *   whole records (the staged pages) is handed to SSL_write where it lies.
 *   The last record of a frame is flushed with it: a frame is never held
 *   back waiting for the next one (the peer may be waiting for a StreamEnd).
 *
 *   End: detach joins the thread, then lm_tls_end says close_notify (best
 *   effort, never waiting) and frees the connection. A peer's close_notify or
 *   a bare FIN both read as the end of the stream (SSL_OP_IGNORE_UNEXPECTED_EOF):
 *   a stream's integrity is in its round counts (StreamEnd, StreamAck), which
 *   a truncation cannot forge, and a stream ended at a frame boundary is the
 *   plain path's normal end too.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "channels/lm_stream_internal.h"
#include "channels/lm_tls.h"

static void say(char *reason, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void say(char *reason, size_t cap, const char *fmt, ...)
{
    if (!reason || cap == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, cap, fmt, ap);
    va_end(ap);
}

#ifndef LM_HAVE_OPENSSL

/* Built without OpenSSL's headers: no TLS streams here, and every entry
 * point says why. */
#define NO_OPENSSL "livemig was built without OpenSSL (libssl-dev was missing at build time)"

LM_API int lm_tls_probe(char *reason, size_t reason_cap)
{
    say(reason, reason_cap, NO_OPENSSL);
    return -ENOSYS;
}

LM_API int lm_tls_ctx_create(int server, const char *cert_path, const char *key_path,
                             const char *ca_path, lm_tls_ctx **out, char *reason,
                             size_t reason_cap)
{
    *out = NULL;
    say(reason, reason_cap, NO_OPENSSL);
    return -ENOSYS;
}

LM_API void lm_tls_ctx_destroy(lm_tls_ctx *x) {}

LM_API int lm_tls_handshake(lm_tls_ctx *x, int sock_fd, int timeout_ms, lm_tls **out,
                            char *reason, size_t reason_cap)
{
    *out = NULL;
    if (sock_fd >= 0)
        close(sock_fd);
    say(reason, reason_cap, NO_OPENSSL);
    return -ENOSYS;
}

LM_API int lm_tls_write(lm_tls *t, const uint8_t *buf, size_t n, int timeout_ms, char *reason,
                        size_t reason_cap) { return -ENOSYS; }
LM_API int lm_tls_read(lm_tls *t, uint8_t *buf, size_t n, int timeout_ms, char *reason,
                       size_t reason_cap) { return -ENOSYS; }
LM_API int64_t lm_tls_peer_cert(const lm_tls *t, uint8_t *der_out, size_t cap) { return -ENOSYS; }
LM_API int lm_tls_describe(const lm_tls *t, char *out, size_t cap) { return -ENOSYS; }
LM_API void lm_tls_cancel(lm_tls *t) {}
LM_API void lm_tls_destroy(lm_tls *t) {}

LM_API int lm_stream_attach_tls(lm_stream *s, lm_tls *t, uint32_t wire_version,
                                uint64_t send_seq, uint64_t recv_seq, uint64_t max_payload_bytes)
{
    return -ENOSYS;
}

int lm_tls_send(struct lm_chan *c, const struct iovec *iov, int iovcnt) { return -ENOSYS; }
ssize_t lm_tls_recv(struct lm_chan *c, void *buf, size_t n, short *events_out) { return -ENOSYS; }
int lm_tls_pending(struct lm_chan *c) { return 0; }
void lm_tls_end(struct lm_chan *c) {}

#else /* LM_HAVE_OPENSSL */

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#if OPENSSL_VERSION_NUMBER < 0x30000000L
/* OpenSSL 1.1.1: the SSL object keeps its own reference to the certificate. */
static X509 *SSL_get0_peer_certificate(const SSL *ssl)
{
    X509 *cert = SSL_get_peer_certificate(ssl);
    X509_free(cert);
    return cert;
}
#endif

struct lm_tls_ctx {
    SSL_CTX *ctx;
    int server;
};

struct lm_tls {
    SSL *ssl;
    int fd;
    int cancel_efd;
    int failed;                          /* a fatal error: no close_notify */
    size_t rec_len;                      /* bytes of the record being built */
    uint8_t rec[LM_TLS_RECORD_BYTES];
};

/* The stream's suites, fastest first on CPUs with AES instructions. */
#define LM_TLS_SUITES "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
/* OpenSSL's read buffer: with read-ahead, one read(2) takes several records. */
#define LM_TLS_READ_BUFFER_BYTES (LM_TLS_RECORD_BYTES * 4 + 512)

LM_API int lm_tls_probe(char *reason, size_t reason_cap)
{
    if (OpenSSL_version_num() < 0x10101000L) {   /* TLS 1.3 came with 1.1.1 */
        say(reason, reason_cap, "OpenSSL %s has no TLS 1.3", OpenSSL_version(OPENSSL_VERSION));
        return -ENOSYS;
    }
    say(reason, reason_cap, "%s", "");
    return 0;
}

/* The last error OpenSSL queued on this thread, in words (queue emptied);
 * a record that cannot be TLS (the peer speaks something else) says so. */
static const char *openssl_error(char *buf, size_t cap)
{
    unsigned long e, last = 0;
    while ((e = ERR_get_error()) != 0)
        last = e;
    if (!last)
        return "no further detail from OpenSSL";
    char detail[160];
    ERR_error_string_n(last, detail, sizeof(detail));
    int r = ERR_GET_REASON(last);
    int not_tls = ERR_GET_LIB(last) == ERR_LIB_SSL &&
                  (r == SSL_R_WRONG_VERSION_NUMBER || r == SSL_R_PACKET_LENGTH_TOO_LONG ||
                   r == SSL_R_HTTP_REQUEST || r == SSL_R_UNEXPECTED_MESSAGE ||
                   r == SSL_R_RECORD_LENGTH_MISMATCH);
    snprintf(buf, cap, "%s%s", not_tls ? "the peer does not speak TLS: " : "", detail);
    return buf;
}

LM_API int lm_tls_ctx_create(int server, const char *cert_path, const char *key_path,
                             const char *ca_path, lm_tls_ctx **out, char *reason,
                             size_t reason_cap)
{
    *out = NULL;
    char detail[200];
    ERR_clear_error();
    lm_tls_ctx *x = calloc(1, sizeof(*x));
    if (!x)
        return -ENOMEM;
    x->server = server != 0;
    x->ctx = SSL_CTX_new(TLS_method());
    if (!x->ctx) {
        free(x);
        say(reason, reason_cap, "SSL_CTX_new: %s", openssl_error(detail, sizeof(detail)));
        return -ENOMEM;
    }
    SSL_CTX *ctx = x->ctx;
    const char *what = NULL;
    if (!SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) ||
        !SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION))
        what = "setting TLS 1.3 only";
    else if (!SSL_CTX_set_ciphersuites(ctx, LM_TLS_SUITES))
        what = "setting the cipher suites";
    else if (SSL_CTX_use_certificate_chain_file(ctx, cert_path) != 1)
        what = "loading the certificate";
    else if (SSL_CTX_use_PrivateKey_file(ctx, key_path, SSL_FILETYPE_PEM) != 1)
        what = "loading the private key";
    else if (SSL_CTX_check_private_key(ctx) != 1)
        what = "matching the key to the certificate";
    else if (SSL_CTX_load_verify_locations(ctx, ca_path, NULL) != 1)
        what = "loading the CA";
    if (what) {
        say(reason, reason_cap, "%s (cert %s, key %s, CA %s): %s", what, cert_path, key_path,
            ca_path, openssl_error(detail, sizeof(detail)));
        lm_tls_ctx_destroy(x);
        return -EINVAL;
    }
    /* Both sides verify: a peer without a certificate chaining to the CA is
     * refused in the handshake (the server side checks it is a client
     * certificate, the client side a server one: OpenSSL's default purpose
     * for each role). */
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (x->server)
        SSL_CTX_set_num_tickets(ctx, 0);   /* one connection per stream: no resumption */
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, LM_TLS_READ_BUFFER_BYTES);
    *out = x;
    return 0;
}

LM_API void lm_tls_ctx_destroy(lm_tls_ctx *x)
{
    if (!x)
        return;
    SSL_CTX_free(x->ctx);   /* connections hold their own reference */
    free(x);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Before attach: wait for events on the socket until deadline_ms, or a
 * cancel. 0, or -ETIMEDOUT / -ECANCELED / -errno. */
static int wait_before_attach(lm_tls *t, short events, int64_t deadline_ms)
{
    struct pollfd pfd[2] = {{.fd = t->cancel_efd, .events = POLLIN},
                            {.fd = t->fd, .events = events}};
    for (;;) {
        int64_t left = deadline_ms - now_ms();
        if (left <= 0)
            return -ETIMEDOUT;
        int n = poll(pfd, 2, left > 60000 ? 60000 : (int)left);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (pfd[0].revents)
            return -ECANCELED;
        if (pfd[1].revents)
            return 0;
    }
}

/* What an SSL call that returned rc failed with, in words and as -errno
 * (-EAGAIN with *events for a call to repeat once the socket is ready). */
static int classify(lm_tls *t, int rc, short *events, char *reason, size_t cap, const char *doing)
{
    int saved = errno;
    int e = SSL_get_error(t->ssl, rc);
    char detail[200];
    switch (e) {
    case SSL_ERROR_WANT_READ:
        *events = POLLIN;
        return -EAGAIN;
    case SSL_ERROR_WANT_WRITE:
        *events = POLLOUT;
        return -EAGAIN;
    case SSL_ERROR_ZERO_RETURN:   /* close_notify, or a FIN (IGNORE_UNEXPECTED_EOF) */
        say(reason, cap, "%s: the peer closed the connection", doing);
        return -ESHUTDOWN;
    case SSL_ERROR_SYSCALL:
        t->failed = 1;
        if (ERR_peek_error() == 0) {
            say(reason, cap, "%s: %s", doing,
                saved ? strerror(saved) : "the peer closed the connection");
            return saved == ECONNRESET || saved == EPIPE || !saved ? -ECONNRESET : -saved;
        }
        break;
    default:
        t->failed = 1;
        break;
    }
    long verify = SSL_get_verify_result(t->ssl);
    if (verify != X509_V_OK) {   /* X509_V_OK also when nothing was verified yet */
        ERR_clear_error();
        say(reason, cap, "%s: the peer's certificate was refused: %s", doing,
            X509_verify_cert_error_string(verify));
        return -EACCES;
    }
    say(reason, cap, "%s: %s", doing, openssl_error(detail, sizeof(detail)));
    return -EPROTO;
}

LM_API int lm_tls_handshake(lm_tls_ctx *x, int sock_fd, int timeout_ms, lm_tls **out,
                            char *reason, size_t reason_cap)
{
    *out = NULL;
    if (!x || sock_fd < 0 || timeout_ms <= 0) {
        if (sock_fd >= 0)
            close(sock_fd);
        return -EINVAL;
    }
    int rc;
    lm_tls *t = calloc(1, sizeof(*t));
    if (!t) {
        close(sock_fd);
        return -ENOMEM;
    }
    t->fd = sock_fd;
    t->cancel_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int fl = fcntl(sock_fd, F_GETFL);
    if (t->cancel_efd < 0 || fl < 0 ||
        (!(fl & O_NONBLOCK) && fcntl(sock_fd, F_SETFL, fl | O_NONBLOCK) < 0)) {
        rc = -errno;
        lm_tls_destroy(t);
        return rc;
    }
    ERR_clear_error();
    t->ssl = SSL_new(x->ctx);
    if (!t->ssl || SSL_set_fd(t->ssl, sock_fd) != 1) {
        char detail[200];
        say(reason, reason_cap, "SSL_new: %s", openssl_error(detail, sizeof(detail)));
        lm_tls_destroy(t);
        return -ENOMEM;
    }
    const char *doing = x->server ? "TLS handshake (accepting)" : "TLS handshake (connecting)";
    int64_t deadline = now_ms() + timeout_ms;
    for (;;) {
        ERR_clear_error();
        int r = x->server ? SSL_accept(t->ssl) : SSL_connect(t->ssl);
        if (r == 1)
            break;
        short events = 0;
        rc = classify(t, r, &events, reason, reason_cap, doing);
        if (rc == -ESHUTDOWN)
            rc = -ECONNRESET;
        if (rc == -EAGAIN)
            rc = wait_before_attach(t, events, deadline);
        if (rc == -ETIMEDOUT)
            say(reason, reason_cap, "%s: not done within %d ms", doing, timeout_ms);
        else if (rc == -ECANCELED)
            say(reason, reason_cap, "%s: cancelled", doing);
        if (rc != 0) {
            t->failed = 1;
            lm_tls_destroy(t);
            return rc;
        }
    }
    *out = t;
    return 0;
}

LM_API int lm_tls_write(lm_tls *t, const uint8_t *buf, size_t n, int timeout_ms, char *reason,
                        size_t reason_cap)
{
    if (!t || timeout_ms <= 0)
        return -EINVAL;
    int64_t deadline = now_ms() + timeout_ms;
    size_t done = 0;
    while (done < n) {
        size_t k = n - done < LM_TLS_RECORD_BYTES ? n - done : LM_TLS_RECORD_BYTES;
        ERR_clear_error();
        int w = SSL_write(t->ssl, buf + done, (int)k);
        if (w > 0) {
            done += (size_t)w;
            continue;
        }
        short events = 0;
        int rc = classify(t, w, &events, reason, reason_cap, "writing the TLS stream");
        if (rc == -ESHUTDOWN)
            rc = -ECONNRESET;
        if (rc == -EAGAIN)
            rc = wait_before_attach(t, events, deadline);
        if (rc == -ETIMEDOUT)
            say(reason, reason_cap, "writing the TLS stream: the peer read nothing for %d ms",
                timeout_ms);
        else if (rc == -ECANCELED)
            say(reason, reason_cap, "writing the TLS stream: cancelled");
        if (rc != 0)
            return rc;
    }
    return 0;
}

LM_API int lm_tls_read(lm_tls *t, uint8_t *buf, size_t n, int timeout_ms, char *reason,
                       size_t reason_cap)
{
    if (!t || timeout_ms <= 0)
        return -EINVAL;
    int64_t deadline = now_ms() + timeout_ms;
    size_t got = 0;
    while (got < n) {
        ERR_clear_error();
        int r = SSL_read(t->ssl, buf + got, (int)(n - got > INT32_MAX ? INT32_MAX : n - got));
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        short events = 0;
        int rc = classify(t, r, &events, reason, reason_cap, "reading the TLS stream");
        if (rc == -ESHUTDOWN)
            rc = -ECONNRESET;
        if (rc == -EAGAIN)
            rc = wait_before_attach(t, events, deadline);
        if (rc == -ETIMEDOUT)
            say(reason, reason_cap, "reading the TLS stream: nothing came for %d ms",
                timeout_ms);
        else if (rc == -ECANCELED)
            say(reason, reason_cap, "reading the TLS stream: cancelled");
        if (rc != 0)
            return rc;
    }
    return 0;
}

LM_API int64_t lm_tls_peer_cert(const lm_tls *t, uint8_t *der_out, size_t cap)
{
    X509 *cert = t ? SSL_get0_peer_certificate(t->ssl) : NULL;
    if (!cert)
        return -ENOENT;
    int len = i2d_X509(cert, NULL);
    if (len <= 0)
        return -EINVAL;
    if (der_out && (size_t)len <= cap) {
        unsigned char *p = der_out;
        i2d_X509(cert, &p);
    }
    return len;
}

LM_API int lm_tls_describe(const lm_tls *t, char *out, size_t cap)
{
    if (!t || !out || cap == 0)
        return -EINVAL;
    snprintf(out, cap, "%s %s", SSL_get_version(t->ssl), SSL_get_cipher_name(t->ssl));
    return 0;
}

LM_API void lm_tls_cancel(lm_tls *t)
{
    uint64_t one = 1;
    if (t && t->cancel_efd >= 0) {
        ssize_t w = write(t->cancel_efd, &one, sizeof(one));
        (void)w;
    }
}

static void tls_free(lm_tls *t)
{
    if (t->ssl) {
        /* close_notify, one attempt: a peer that reads nothing more never
         * makes us wait (the socket is non-blocking), and after a fatal
         * error OpenSSL forbids it. */
        if (!t->failed && SSL_is_init_finished(t->ssl)) {
            ERR_clear_error();
            (void)SSL_shutdown(t->ssl);
        }
        ERR_clear_error();
        SSL_free(t->ssl);
    }
    if (t->cancel_efd >= 0)
        close(t->cancel_efd);
    free(t);
}

LM_API void lm_tls_destroy(lm_tls *t)
{
    if (!t)
        return;
    int fd = t->fd;
    tls_free(t);
    if (fd >= 0) {
        shutdown(fd, SHUT_RDWR);
        close(fd);
    }
}

LM_API int lm_stream_attach_tls(lm_stream *s, lm_tls *t, uint32_t wire_version,
                                uint64_t send_seq, uint64_t recv_seq, uint64_t max_payload_bytes)
{
    if (!t)
        return -EINVAL;
    if (!s || s->ch.attached) {
        lm_tls_destroy(t);
        return s ? -EBUSY : -EINVAL;
    }
    int fd = t->fd;
    t->fd = -1;                  /* the channel owns the socket from here */
    t->rec_len = 0;
    s->ch.tls = t;
    int rc = lm_stream_attach(s, fd, wire_version, send_seq, recv_seq, max_payload_bytes);
    if (rc != 0) {               /* the socket is closed by then */
        s->ch.tls = NULL;
        tls_free(t);
    }
    return rc;
}

/* ---- the stream thread's I/O ------------------------------------------------ */

/* One SSL_write of p[0 .. n), n <= LM_TLS_RECORD_BYTES (one record), retried
 * with the same arguments until taken: 0, 1 (stop), or -errno. */
static int write_record(struct lm_chan *c, const uint8_t *p, size_t n)
{
    lm_tls *t = c->tls;
    for (;;) {
        ERR_clear_error();
        int w = SSL_write(t->ssl, p, (int)n);
        if (w > 0) {
            LM_CHAN_ADD(c, bytes_sent, w);
            return 0;
        }
        short events = 0;
        char why[200];
        int rc = classify(t, w, &events, why, sizeof(why), "writing");
        if (rc == -EAGAIN) {
            rc = lm_chan_wait(c, events);
            if (rc != 0)
                return rc;
            continue;
        }
        if (rc == -ECONNRESET || rc == -ESHUTDOWN)
            return lm_chan_fail(c, ECONNRESET, "the peer closed the %s (TLS)", c->name);
        return lm_chan_fail(c, -rc, "TLS on the %s: %s", c->name, why);
    }
}

int lm_tls_send(struct lm_chan *c, const struct iovec *iov, int iovcnt)
{
    lm_tls *t = c->tls;
    for (int i = 0; i < iovcnt; i++) {
        const uint8_t *p = iov[i].iov_base;
        size_t left = iov[i].iov_len;
        while (left > 0) {
            if (t->rec_len == 0 && left >= LM_TLS_RECORD_BYTES) {
                /* A whole record of this part: written where it lies. */
                int rc = write_record(c, p, LM_TLS_RECORD_BYTES);
                if (rc != 0)
                    return rc;
                p += LM_TLS_RECORD_BYTES;
                left -= LM_TLS_RECORD_BYTES;
                continue;
            }
            size_t k = LM_TLS_RECORD_BYTES - t->rec_len;
            if (k > left)
                k = left;
            memcpy(t->rec + t->rec_len, p, k);
            t->rec_len += k;
            p += k;
            left -= k;
            if (t->rec_len == LM_TLS_RECORD_BYTES) {
                int rc = write_record(c, t->rec, t->rec_len);
                t->rec_len = 0;
                if (rc != 0)
                    return rc;
            }
        }
    }
    if (t->rec_len > 0) {   /* the frame's tail: never held back */
        int rc = write_record(c, t->rec, t->rec_len);
        t->rec_len = 0;
        if (rc != 0)
            return rc;
    }
    return 0;
}

ssize_t lm_tls_recv(struct lm_chan *c, void *buf, size_t n, short *events_out)
{
    lm_tls *t = c->tls;
    ERR_clear_error();
    int r = SSL_read(t->ssl, buf, (int)(n > INT32_MAX ? INT32_MAX : n));
    if (r > 0)
        return r;
    char why[200];
    int rc = classify(t, r, events_out, why, sizeof(why), "reading");
    if (rc == -EAGAIN)
        return rc;
    if (rc == -ESHUTDOWN)
        return 0;
    if (rc == -ECONNRESET)
        return lm_chan_fail(c, ECONNRESET, "the peer reset the %s (TLS)", c->name);
    /* A record that does not authenticate (bad record mac) is the plain
     * path's checksum mismatch: the bytes were altered on the way. */
    return lm_chan_fail(c, rc == -EPROTO ? EBADMSG : -rc, "TLS on the %s: %s", c->name, why);
}

int lm_tls_pending(struct lm_chan *c)
{
    /* SSL_pending counts only the record being processed; with read_ahead
     * (set above) later records may already sit unprocessed in OpenSSL's
     * buffer, which SSL_has_pending also sees (poll(2) on the socket sees
     * neither). */
    return SSL_pending(c->tls->ssl) > 0 || SSL_has_pending(c->tls->ssl);
}

void lm_tls_end(struct lm_chan *c)
{
    if (!c->tls)
        return;
    tls_free(c->tls);
    c->tls = NULL;
}

#endif /* LM_HAVE_OPENSSL */
