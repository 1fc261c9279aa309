/*
 * The urgent post-copy channel served by native threads, off both event loops.
 *
 * Theory of operation
 *   Python opens the urgent channel and does its handshake; then it dups the
 *   socket, stops reading and writing it, and hands the dup to a thread here
 *   together with the next sequence numbers of each direction. The frames
 *   are exactly those of the Python path (src/livemig/protocol/wire.py: a
 *   32-byte little-endian header, xxh3-64 of the payload), so either peer may
 *   run either path:
 *
 *     destination thread                              source thread
 *     poll(stop, socket, uffd)                        poll(stop, socket)
 *     uffd readable: lm_postcopy_read_faults
 *       (distinct missing pages), those not
 *       outstanding -> PageRequest(64) ─────────────▶ validate, sort, runs
 *                                                      writev(header, batch
 *     socket readable: PageBatch(33, URGENT) ◀──────── prefix, guest pages)
 *       validate, UFFDIO_COPY/ZEROPAGE per run         publish indices in a
 *       (wakes the vCPU), hash into hashes[],          ring for the pusher
 *       latency fault-read -> placed into a ring
 *
 *   Ordering and sharing:
 *    - the destination's Python bulk path places pushed pages through the
 *      same lm_postcopy handle at the same time. lm_postcopy's bitmap and
 *      counters are atomics and a page placed twice comes back EEXIST
 *      (ioctl_userfaultfd(2)), counted and harmless. Both writers store the
 *      same content hash for a page (the source is frozen), so the hash
 *      array tolerates the race; stores here are relaxed atomics;
 *    - a fault message already read may name a page placed meanwhile:
 *      lm_postcopy_read_faults drops those and wakes the page again;
 *    - the outstanding set (per-page fault time) belongs to whichever thread
 *      is attached; attach/detach are serialised by the owner, and the set
 *      survives a detach: the next attach asks again for every outstanding
 *      page that is still missing (post-copy recovery);
 *    - the rings are single-producer (the thread) single-consumer (the
 *      owner) with acquire/release indices; the owner learns of news through
 *      an eventfd (eventfd(2)) it watches with its event loop;
 *    - the thread stops when the stop eventfd becomes readable; detach joins
 *      it and only then shuts the socket down (shutdown(2) reaches the peer
 *      even though Python's transport still holds another descriptor of it).
 *      The caller keeps the region, the postcopy handle and hashes alive
 *      until detach has returned.
 *   Every received frame is checked before it is acted on: magic, version,
 *   type, flags, reserved, length cap, sequence, checksum, and then its
 *   payload (counts, page bounds, run order, byte totals). A violation ends
 *   the thread with -EPROTO (or -ERANGE for a page outside memory, -EBADMSG
 *   for a checksum) and a reason; the peer's socket is then shut down by
 *   detach, as the Python path closes a channel that broke the protocol.
 *   The checksum comes from the system's libxxhash (dlopen(3) at create
 *   time; the prototypes below are declared here, not taken from its
 *   header): no xxh3 implementation lives in this tree.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "livemig.h"
#include "postcopy/lm_postcopy_internal.h"
#include "wire/lm_wire_gen.h"

#define LM_XXHASH_SONAME "libxxhash.so.0"
#define LM_XXH3_EMPTY 0x2D06800538D394C2ULL   /* XXH3_64bits("", 0) */

/* A received frame larger than this is refused whatever was negotiated: a
 * reply to our own requests is at most LM_URGENT_REQUEST_PAGES pages. */
#define LM_URGENT_MAX_FRAME (8u << 20)
#define LM_URGENT_FAULT_BATCH 256

typedef uint64_t (*xxh3_fn)(const void *, size_t);
typedef void *(*xxh3_create_fn)(void);
typedef int (*xxh3_free_fn)(void *);
typedef int (*xxh3_reset_fn)(void *);
typedef int (*xxh3_update_fn)(void *, const void *, size_t);
typedef uint64_t (*xxh3_digest_fn)(const void *);

struct xxh {
    void *dl;
    xxh3_fn oneshot;
    xxh3_create_fn create;
    xxh3_free_fn destroy;
    xxh3_reset_fn reset;
    xxh3_update_fn update;
    xxh3_digest_fn digest;
};

struct ring {
    uint64_t *slots;
    uint64_t head;   /* producer, atomic */
    uint64_t tail;   /* consumer, atomic */
};

enum side { SIDE_DEST, SIDE_SOURCE };

struct lm_urgent {
    enum side side;
    struct xxh xx;
    void *xx_state;
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
    struct ring ring;          /* latencies (dest) or requested pages (source) */
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
    int rt_priority;              /* SCHED_FIFO priority asked for the thread; 0 = none */
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

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* ---- libxxhash ------------------------------------------------------------ */

static int xxh_load(struct xxh *x, char *reason, size_t cap)
{
    memset(x, 0, sizeof(*x));
    x->dl = dlopen(LM_XXHASH_SONAME, RTLD_NOW | RTLD_LOCAL);
    if (!x->dl) {
        const char *e = dlerror();
        snprintf(reason, cap, "cannot load %s: %s", LM_XXHASH_SONAME, e ? e : "unknown error");
        return -ENOENT;
    }
    x->oneshot = (xxh3_fn)dlsym(x->dl, "XXH3_64bits");
    x->create = (xxh3_create_fn)dlsym(x->dl, "XXH3_createState");
    x->destroy = (xxh3_free_fn)dlsym(x->dl, "XXH3_freeState");
    x->reset = (xxh3_reset_fn)dlsym(x->dl, "XXH3_64bits_reset");
    x->update = (xxh3_update_fn)dlsym(x->dl, "XXH3_64bits_update");
    x->digest = (xxh3_digest_fn)dlsym(x->dl, "XXH3_64bits_digest");
    if (!x->oneshot || !x->create || !x->destroy || !x->reset || !x->update || !x->digest) {
        snprintf(reason, cap, "%s lacks the XXH3 64-bit functions", LM_XXHASH_SONAME);
        dlclose(x->dl);
        x->dl = NULL;
        return -ENOSYS;
    }
    if (x->oneshot("", 0) != LM_XXH3_EMPTY) {
        snprintf(reason, cap, "%s computes a different XXH3-64 than the wire format's",
                 LM_XXHASH_SONAME);
        dlclose(x->dl);
        x->dl = NULL;
        return -EPROTO;
    }
    return 0;
}

LM_API int lm_urgent_probe(char *reason, size_t reason_cap)
{
    char scratch[2];
    if (!reason || reason_cap == 0) {
        reason = scratch;
        reason_cap = sizeof(scratch);
    }
    reason[0] = '\0';
    struct xxh x;
    int rc = xxh_load(&x, reason, reason_cap);
    if (rc == 0)
        dlclose(x.dl);
    return rc;
}

/* ---- rings ------------------------------------------------------------------- */

static void ring_push(lm_urgent *u, const uint64_t *v, uint64_t n, uint64_t *dropped)
{
    uint64_t head = __atomic_load_n(&u->ring.head, __ATOMIC_RELAXED);
    uint64_t tail = __atomic_load_n(&u->ring.tail, __ATOMIC_ACQUIRE);
    uint64_t room = LM_URGENT_RING - (head - tail);
    uint64_t take = n < room ? n : room;
    for (uint64_t i = 0; i < take; i++)
        u->ring.slots[(head + i) % LM_URGENT_RING] = v[i];
    __atomic_store_n(&u->ring.head, head + take, __ATOMIC_RELEASE);
    if (take < n)
        __atomic_fetch_add(dropped, n - take, __ATOMIC_RELAXED);
}

static int64_t ring_drain(lm_urgent *u, uint64_t *out, uint64_t max)
{
    uint64_t tail = __atomic_load_n(&u->ring.tail, __ATOMIC_RELAXED);
    uint64_t head = __atomic_load_n(&u->ring.head, __ATOMIC_ACQUIRE);
    uint64_t n = head - tail < max ? head - tail : max;
    for (uint64_t i = 0; i < n; i++)
        out[i] = u->ring.slots[(tail + i) % LM_URGENT_RING];
    __atomic_store_n(&u->ring.tail, tail + n, __ATOMIC_RELEASE);
    return (int64_t)n;
}

static void notify(lm_urgent *u)
{
    uint64_t one = 1;
    /* EAGAIN only when the counter is at its maximum: the owner is woken anyway. */
    ssize_t w = write(u->notify_efd, &one, sizeof(one));
    (void)w;
}

/* ---- creating ---------------------------------------------------------------- */

static int urgent_new(enum side side, uint64_t npages, uint64_t *hashes, lm_urgent **out)
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
    int rc = xxh_load(&u->xx, reason, sizeof(reason));
    if (rc < 0) {
        free(u);
        return rc;
    }
    u->xx_state = u->xx.create();
    u->ring.slots = malloc(LM_URGENT_RING * sizeof(uint64_t));
    u->scratch = malloc(LM_URGENT_MAX_PAGES_IN * sizeof(uint64_t));
    u->notify_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    u->stop_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!u->xx_state || !u->ring.slots || !u->scratch || u->notify_efd < 0 || u->stop_efd < 0) {
        rc = (u->notify_efd < 0 || u->stop_efd < 0) ? -errno : -ENOMEM;
        lm_urgent_destroy(u);
        return rc;
    }
    *out = u;
    return 0;
}

LM_API int lm_urgent_dest_create(lm_postcopy *p, uint64_t *hashes, lm_urgent **out)
{
    if (!p || !out)
        return -EINVAL;
    int rc = urgent_new(SIDE_DEST, lm_postcopy_npages(p), hashes, out);
    if (rc < 0)
        return rc;
    lm_urgent *u = *out;
    u->pc = p;
    u->fault_ns = calloc(u->npages ? u->npages : 1, sizeof(uint64_t));
    static const uint8_t zero_page[LM_PAGE_SIZE];
    if (!u->fault_ns || lm_pages_hash(zero_page, 1, NULL, 1, &u->zero_hash) < 0) {
        lm_urgent_destroy(u);
        *out = NULL;
        return -ENOMEM;
    }
    u->next_request_id = 1;
    return 0;
}

LM_API int lm_urgent_source_create(const uint8_t *base, uint64_t npages, uint64_t *hashes,
                                   uint32_t round, lm_urgent **out)
{
    if (!base || !npages || !out)
        return -EINVAL;
    int rc = urgent_new(SIDE_SOURCE, npages, hashes, out);
    if (rc < 0)
        return rc;
    (*out)->base = base;
    (*out)->round = round;
    return 0;
}

/* ---- sending ----------------------------------------------------------------- */

static int fail(lm_urgent *u, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(lm_urgent *u, int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(u->reason, sizeof(u->reason), fmt, ap);
    va_end(ap);
    return -err;
}

/* Wait until fd is writable or stop is asked: 0, 1 (stop), or -errno. */
static int wait_writable(lm_urgent *u)
{
    struct pollfd pfd[2] = {{.fd = u->stop_efd, .events = POLLIN},
                            {.fd = u->fd, .events = POLLOUT}};
    for (;;) {
        int n = poll(pfd, 2, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (pfd[0].revents)
            return 1;
        if (pfd[1].revents & (POLLERR | POLLHUP))
            return fail(u, ECONNRESET, "the peer closed the urgent channel");
        if (pfd[1].revents & POLLOUT)
            return 0;
    }
}

/* Write the whole iovec (the socket is non-blocking: it is shared with the
 * transport's descriptor, and O_NONBLOCK lives in the open file). */
static int write_all(lm_urgent *u, struct iovec *iov, int iovcnt)
{
    while (iovcnt > 0) {
        ssize_t w = writev(u->fd, iov, iovcnt > IOV_MAX ? IOV_MAX : iovcnt);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                int rc = wait_writable(u);
                if (rc != 0)
                    return rc < 0 ? rc : -ECANCELED;
                continue;
            }
            if (errno == EPIPE || errno == ECONNRESET)
                return fail(u, ECONNRESET, "the peer closed the urgent channel");
            return fail(u, errno, "writing the urgent channel: %s", strerror(errno));
        }
        STAT_ADD(u, bytes_sent, w);
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

/* Fill the 32-byte header in front of a payload made of iov[1..n). */
static void frame_header(lm_urgent *u, uint8_t *h, uint16_t type, uint16_t flags,
                         const struct iovec *payload, int nparts)
{
    uint64_t length = 0, checksum;
    for (int i = 0; i < nparts; i++)
        length += payload[i].iov_len;
    if (nparts == 1) {
        checksum = u->xx.oneshot(payload[0].iov_base, payload[0].iov_len);
    } else {
        u->xx.reset(u->xx_state);
        for (int i = 0; i < nparts; i++)
            u->xx.update(u->xx_state, payload[i].iov_base, payload[i].iov_len);
        checksum = u->xx.digest(u->xx_state);
    }
    memcpy(h, LM_WIRE_MAGIC, 4);
    put16(h + 4, (uint16_t)u->version);
    put16(h + 6, type);
    put16(h + 8, flags);
    put16(h + 10, 0);
    put32(h + 12, (uint32_t)length);
    put64(h + 16, u->send_seq++);
    put64(h + 24, checksum);
}

/* ---- receiving --------------------------------------------------------------- */

typedef int (*frame_fn)(lm_urgent *u, uint16_t flags, const uint8_t *payload, uint32_t length);

/* Check one buffered header: 0 and the payload length, or -errno. */
static int header_check(lm_urgent *u, const uint8_t *h, uint16_t want_type, uint32_t *length)
{
    if (memcmp(h, LM_WIRE_MAGIC, 4) != 0)
        return fail(u, EPROTO, "bad frame magic %02x%02x%02x%02x", h[0], h[1], h[2], h[3]);
    if (get16(h + 4) != u->version)
        return fail(u, EPROTO, "unsupported frame version %u (expected %u)", get16(h + 4),
                    u->version);
    uint16_t type = get16(h + 6);
    if (type != want_type)
        return fail(u, EPROTO, "unexpected frame type %u on the urgent channel (expected %u)",
                    type, want_type);
    if (get16(h + 10) != 0)
        return fail(u, EPROTO, "reserved header field is %#x, must be 0", get16(h + 10));
    *length = get32(h + 12);
    if (*length > u->max_frame)
        return fail(u, EPROTO, "payload length %u exceeds the cap of %llu bytes", *length,
                    (unsigned long long)u->max_frame);
    uint64_t seq = get64(h + 16);
    if (seq != u->recv_seq)
        return fail(u, EPROTO, "sequence %llu out of order (expected %llu)",
                    (unsigned long long)seq, (unsigned long long)u->recv_seq);
    return 0;
}

/* Read what the socket holds and hand each complete frame to fn. */
static int receive(lm_urgent *u, uint16_t want_type, frame_fn fn)
{
    for (;;) {
        /* Never full here: a buffered partial frame passed header_check, so
         * it fits in the header plus the largest payload accepted. */
        ssize_t got = read(u->fd, u->rbuf + u->rlen, u->rbuf_cap - u->rlen);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return 0;
            if (errno == ECONNRESET)
                return fail(u, ECONNRESET, "the peer reset the urgent channel");
            return fail(u, errno, "reading the urgent channel: %s", strerror(errno));
        }
        if (got == 0)
            return fail(u, ECONNRESET, u->rlen ? "the peer closed the urgent channel mid-frame"
                                               : "the peer closed the urgent channel");
        STAT_ADD(u, bytes_received, got);
        u->rlen += (uint64_t)got;
        uint64_t off = 0;
        while (u->rlen - off >= LM_WIRE_HEADER_BYTES) {
            const uint8_t *h = u->rbuf + off;
            uint32_t length = 0;
            int rc = header_check(u, h, want_type, &length);
            if (rc < 0)
                return rc;
            if (u->rlen - off - LM_WIRE_HEADER_BYTES < length)
                break;
            const uint8_t *payload = h + LM_WIRE_HEADER_BYTES;
            if (u->xx.oneshot(payload, length) != get64(h + 24))
                return fail(u, EBADMSG, "payload checksum mismatch in frame %llu (type %u)",
                            (unsigned long long)u->recv_seq, want_type);
            u->recv_seq++;
            STAT_ADD(u, frames_received, 1);
            rc = fn(u, get16(h + 8), payload, length);
            if (rc < 0)
                return rc;
            off += LM_WIRE_HEADER_BYTES + length;
        }
        if (off) {
            memmove(u->rbuf, u->rbuf + off, u->rlen - off);
            u->rlen -= off;
        }
        if (u->rlen && memcmp(u->rbuf, LM_WIRE_MAGIC, u->rlen < 4 ? u->rlen : 4) != 0)
            return fail(u, EPROTO, "bad frame magic");
    }
}

/* ---- destination ------------------------------------------------------------- */

/* Send PageRequests for pages[0..n) (already marked outstanding). */
static int dest_send_requests(lm_urgent *u, const uint64_t *pages, uint64_t n)
{
    while (n) {
        uint64_t take = n < LM_URGENT_REQUEST_PAGES ? n : LM_URGENT_REQUEST_PAGES;
        uint8_t *f = u->sbuf;
        uint64_t id = u->next_request_id++;
        put64(f + LM_WIRE_HEADER_BYTES, id);
        put32(f + LM_WIRE_HEADER_BYTES + 8, (uint32_t)take);
        put32(f + LM_WIRE_HEADER_BYTES + 12, 0);
        memcpy(f + LM_WIRE_HEADER_BYTES + LM_WIRE_REQUEST_PREFIX_BYTES, pages, take * 8);   /* little-endian host */
        struct iovec iov = {.iov_base = f + LM_WIRE_HEADER_BYTES, .iov_len = LM_WIRE_REQUEST_PREFIX_BYTES + take * 8};
        frame_header(u, f, LM_MSG_PAGE_REQUEST, 0, &iov, 1);
        struct iovec whole = {.iov_base = f, .iov_len = LM_WIRE_HEADER_BYTES + iov.iov_len};
        int rc = write_all(u, &whole, 1);
        if (rc < 0)
            return rc;
        STAT_ADD(u, frames_sent, 1);
        STAT_ADD(u, requests, 1);
        STAT_ADD(u, pages_requested, take);
        pages += take;
        n -= take;
    }
    return 0;
}

static int dest_read_faults(lm_urgent *u)
{
    uint64_t *pages = u->scratch;
    for (;;) {
        int64_t n = lm_postcopy_read_faults(u->pc, pages, LM_URGENT_FAULT_BATCH);
        if (n < 0)
            return fail(u, (int)-n, "reading userfaultfd: %s", strerror((int)-n));
        if (n == 0)
            return 0;
        uint64_t t = now_ns(), fresh = 0;
        for (int64_t i = 0; i < n; i++) {
            uint64_t pg = pages[i];
            if (__atomic_load_n(&u->fault_ns[pg], __ATOMIC_RELAXED))
                continue;           /* asked already: the reply is on its way */
            __atomic_store_n(&u->fault_ns[pg], t, __ATOMIC_RELEASE);
            pages[fresh++] = pg;
        }
        STAT_ADD(u, faults_read, n);
        __atomic_fetch_add(&u->noutstanding, fresh, __ATOMIC_RELAXED);
        int rc = dest_send_requests(u, pages, fresh);
        if (rc < 0)
            return rc;
        if (n < LM_URGENT_FAULT_BATCH)
            return 0;
    }
}

/* Latency bookkeeping for pages now present: pages[i] (or first + i when
 * pages is NULL), i < n. Whoever swaps a page's fault time to 0 records it:
 * the thread for its replies, the owner (lm_urgent_dest_settle) for pushed
 * pages, so each fault is counted once. Latencies go to out when given,
 * else to the ring. Returns how many were recorded. */
static uint64_t dest_served(lm_urgent *u, const int64_t *pages, uint64_t first, uint64_t n,
                            uint64_t t, uint64_t *out)
{
    uint64_t lat[64];
    uint64_t k = 0, served = 0, sum = 0, mx = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t pg = pages ? (uint64_t)pages[i] : first + i;
        if (!__atomic_load_n(&u->fault_ns[pg], __ATOMIC_RELAXED))
            continue;
        uint64_t f = __atomic_exchange_n(&u->fault_ns[pg], 0, __ATOMIC_ACQ_REL);
        if (!f)
            continue;
        uint64_t d = t > f ? t - f : 0;
        sum += d;
        if (d > mx)
            mx = d;
        if (out) {
            out[served++] = d;
            continue;
        }
        served++;
        lat[k++] = d;
        if (k == 64) {
            ring_push(u, lat, k, &u->stats.latencies_dropped);
            k = 0;
        }
    }
    if (k)
        ring_push(u, lat, k, &u->stats.latencies_dropped);
    if (!served)
        return 0;
    __atomic_fetch_sub(&u->noutstanding, served, __ATOMIC_RELAXED);
    STAT_ADD(u, faults_served, served);
    STAT_ADD(u, latency_sum_ns, sum);
    STAT_ADD(u, blocked_ns, sum);
    uint64_t cur = __atomic_load_n(&u->stats.latency_max_ns, __ATOMIC_RELAXED);
    while (mx > cur && !__atomic_compare_exchange_n(&u->stats.latency_max_ns, &cur, mx, 0,
                                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
    return served;
}

LM_API int64_t lm_urgent_dest_settle(lm_urgent *u, const int64_t *pages, uint64_t n,
                                     uint64_t *latency_ns_out)
{
    if (!u || u->side != SIDE_DEST)
        return -EINVAL;
    for (uint64_t i = 0; i < n; i++)
        if (pages[i] < 0 || (uint64_t)pages[i] >= u->npages)
            return -ERANGE;
    return (int64_t)dest_served(u, pages, 0, n, now_ns(), latency_ns_out);
}

static int dest_on_batch(lm_urgent *u, uint16_t flags, const uint8_t *p, uint32_t length)
{
    if (flags != LM_WIRE_BATCH_URGENT)
        return fail(u, EPROTO, "a PageBatch on the urgent channel must be flagged URGENT "
                    "only (flags %#x)", flags);
    if (length < LM_WIRE_BATCH_PREFIX_BYTES + LM_BATCH_HEADER_BYTES)
        return fail(u, EPROTO, "PageBatch of %u bytes is shorter than its headers", length);
    uint32_t npages = get32(p + 4);
    uint64_t request_id = get64(p + 8);
    if (request_id == 0 || request_id >= u->next_request_id)
        return fail(u, EPROTO, "PageBatch answers request %llu, which was never sent",
                    (unsigned long long)request_id);
    const uint8_t *b = p + LM_WIRE_BATCH_PREFIX_BYTES;
    uint64_t blen = length - LM_WIRE_BATCH_PREFIX_BYTES;
    if (memcmp(b, LM_BATCH_MAGIC, 4) != 0 || b[4] != LM_BATCH_VERSION || b[5] != 0 || get16(b + 6) != 0)
        return fail(u, EPROTO, "page batch header invalid (magic, version, flags or reserved)");
    uint32_t nruns = get32(b + 8), bpages = get32(b + 12);
    uint64_t payload_bytes = get64(b + 16);
    if (nruns == 0 || bpages != npages)
        return fail(u, EPROTO, "page batch holds %u runs and %u pages, its PageBatch says %u",
                    nruns, bpages, npages);
    uint64_t table_end = LM_BATCH_HEADER_BYTES + (uint64_t)nruns * LM_BATCH_RUN_BYTES;
    if (table_end > blen || blen - table_end != payload_bytes)
        return fail(u, EPROTO, "page batch length %llu does not match %u runs and %llu payload "
                    "bytes", (unsigned long long)blen, nruns, (unsigned long long)payload_bytes);
    /* Validate the whole table before placing anything. */
    uint64_t prev_end = 0, seen = 0, raw_bytes = 0;
    for (uint32_t i = 0; i < nruns; i++) {
        const uint8_t *r = b + LM_BATCH_HEADER_BYTES + (uint64_t)i * LM_BATCH_RUN_BYTES;
        uint64_t first = get64(r);
        uint32_t count = get32(r + 8), pb = get32(r + 16);
        uint8_t enc = r[12];
        if (r[13] || r[14] || r[15])
            return fail(u, EPROTO, "reserved run-table bytes set");
        if (enc != LM_ENC_RAW && enc != LM_ENC_ZERO)
            return fail(u, EPROTO, "urgent reply uses encoding %u (only RAW and ZERO are "
                        "accepted on this path)", enc);
        uint64_t want = enc == LM_ENC_RAW ? (uint64_t)count * LM_PAGE_SIZE : 0;
        if (count == 0 || pb != want)
            return fail(u, EPROTO, "run of %u pages with %u payload bytes", count, pb);
        if (first >= u->npages || count > u->npages - first)
            return fail(u, ERANGE, "reply names pages %llu..%llu outside guest memory (%llu "
                        "pages)", (unsigned long long)first,
                        (unsigned long long)(first + count - 1), (unsigned long long)u->npages);
        if (first < prev_end)
            return fail(u, EPROTO, "page batch runs overlap or are out of order");
        prev_end = first + count;
        seen += count;
        raw_bytes += pb;
    }
    if (seen != npages || raw_bytes != payload_bytes)
        return fail(u, EPROTO, "run counts or payload sizes do not add up to the header");
    const uint8_t *data = b + table_end;
    for (uint32_t i = 0; i < nruns; i++) {
        const uint8_t *r = b + LM_BATCH_HEADER_BYTES + (uint64_t)i * LM_BATCH_RUN_BYTES;
        uint64_t first = get64(r);
        uint32_t count = get32(r + 8);
        int64_t placed;
        /* Hashes first: once the last page is placed the owner may take the
         * digest of the hash array at any moment. */
        if (r[12] == LM_ENC_RAW) {
            if (u->hashes) {
                uint64_t h[64];
                for (uint32_t j = 0; j < count; j += 64) {
                    uint32_t m = count - j < 64 ? count - j : 64;
                    lm_pages_hash(data + (uint64_t)j * LM_PAGE_SIZE, m, NULL, m, h);
                    for (uint32_t k = 0; k < m; k++)
                        __atomic_store_n(&u->hashes[first + j + k], h[k], __ATOMIC_RELEASE);
                }
            }
            placed = lm_postcopy_copy(u->pc, first, data, count);
            data += (uint64_t)count * LM_PAGE_SIZE;
        } else {
            if (u->hashes)
                for (uint32_t k = 0; k < count; k++)
                    __atomic_store_n(&u->hashes[first + k], u->zero_hash, __ATOMIC_RELEASE);
            placed = lm_postcopy_zero(u->pc, first, count);
        }
        if (placed < 0)
            return fail(u, (int)-placed, "placing pages %llu..%llu: %s",
                        (unsigned long long)first, (unsigned long long)(first + count - 1),
                        strerror((int)-placed));
        STAT_ADD(u, pages_placed, placed);
        dest_served(u, NULL, first, count, now_ns(), NULL);
    }
    STAT_ADD(u, replies, 1);
    STAT_ADD(u, pages_replied, npages);
    STAT_ADD(u, payload_bytes_replied, blen);
    if (lm_postcopy_missing(u->pc) == 0 ||
        __atomic_load_n(&u->ring.head, __ATOMIC_RELAXED) -
        __atomic_load_n(&u->ring.tail, __ATOMIC_RELAXED) >= LM_URGENT_RING / 2)
        notify(u);
    return 0;
}

/* After an attach: ask again for every outstanding page still missing. */
static int dest_resend(lm_urgent *u)
{
    uint64_t n = 0, gone = 0;
    int rc = 0;
    for (uint64_t pg = 0; pg < u->npages && rc == 0; pg++) {
        if (!__atomic_load_n(&u->fault_ns[pg], __ATOMIC_ACQUIRE))
            continue;
        if (lm_postcopy_page_present(u->pc, pg)) {
            /* a push landed it while we were away; the vCPU was woken then */
            if (__atomic_exchange_n(&u->fault_ns[pg], 0, __ATOMIC_ACQ_REL))
                gone++;
            continue;
        }
        u->scratch[n++] = pg;
        if (n == LM_URGENT_REQUEST_PAGES) {
            STAT_ADD(u, pages_resent, n);
            rc = dest_send_requests(u, u->scratch, n);
            n = 0;
        }
    }
    if (gone)
        __atomic_fetch_sub(&u->noutstanding, gone, __ATOMIC_RELAXED);
    if (rc == 0 && n) {
        STAT_ADD(u, pages_resent, n);
        rc = dest_send_requests(u, u->scratch, n);
    }
    return rc;
}

/* ---- source ------------------------------------------------------------------ */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* One reply batch over sorted distinct pages[0..n) (at most REPLY_RUNS runs). */
static int source_reply(lm_urgent *u, uint64_t request_id, const uint64_t *pages, uint64_t n,
                        uint64_t nruns)
{
    uint8_t *f = u->sbuf;
    uint8_t *bp = f + LM_WIRE_HEADER_BYTES;                  /* PageBatch prefix */
    uint8_t *bh = bp + LM_WIRE_BATCH_PREFIX_BYTES;           /* page batch header */
    uint8_t *rt = bh + LM_BATCH_HEADER_BYTES;                 /* run table */
    struct iovec iov[1 + LM_URGENT_REPLY_RUNS + 1];
    put32(bp, u->round);
    put32(bp + 4, (uint32_t)n);
    put64(bp + 8, request_id);
    memcpy(bh, LM_BATCH_MAGIC, 4);
    bh[4] = LM_BATCH_VERSION;
    bh[5] = 0;
    put16(bh + 6, 0);
    put32(bh + 8, (uint32_t)nruns);
    put32(bh + 12, (uint32_t)n);
    put64(bh + 16, n * LM_PAGE_SIZE);
    uint64_t r = 0, i = 0;
    while (i < n) {
        uint64_t j = i + 1;
        while (j < n && pages[j] == pages[j - 1] + 1)
            j++;
        uint8_t *e = rt + r * LM_BATCH_RUN_BYTES;
        put64(e, pages[i]);
        put32(e + 8, (uint32_t)(j - i));
        e[12] = LM_ENC_RAW;
        e[13] = e[14] = e[15] = 0;
        put32(e + 16, (uint32_t)((j - i) * LM_PAGE_SIZE));
        iov[2 + r].iov_base = (void *)(u->base + pages[i] * LM_PAGE_SIZE);
        iov[2 + r].iov_len = (j - i) * LM_PAGE_SIZE;
        r++;
        i = j;
    }
    iov[1].iov_base = bp;
    iov[1].iov_len = LM_WIRE_BATCH_PREFIX_BYTES + LM_BATCH_HEADER_BYTES + nruns * LM_BATCH_RUN_BYTES;
    frame_header(u, f, LM_MSG_PAGE_BATCH, LM_WIRE_BATCH_URGENT, iov + 1, (int)(1 + nruns));
    iov[0].iov_base = f;
    iov[0].iov_len = LM_WIRE_HEADER_BYTES;
    int rc = write_all(u, iov, (int)(2 + nruns));
    if (rc < 0)
        return rc;
    STAT_ADD(u, frames_sent, 1);
    STAT_ADD(u, replies, 1);
    STAT_ADD(u, pages_replied, n);
    STAT_ADD(u, payload_bytes_replied, LM_BATCH_HEADER_BYTES + nruns * LM_BATCH_RUN_BYTES + n * LM_PAGE_SIZE);
    if (u->hashes) {
        /* After the write: the page bytes are final (the source VM is paused). */
        for (uint64_t k = 0; k < n; k++) {
            uint64_t h;
            lm_pages_hash(u->base + pages[k] * LM_PAGE_SIZE, 1, NULL, 1, &h);
            __atomic_store_n(&u->hashes[pages[k]], h, __ATOMIC_RELAXED);
        }
    }
    return 0;
}

static int source_on_request(lm_urgent *u, uint16_t flags, const uint8_t *p, uint32_t length)
{
    if (flags != 0)
        return fail(u, EPROTO, "undefined PageRequest flags %#x", flags);
    if (length < LM_WIRE_REQUEST_PREFIX_BYTES)
        return fail(u, EPROTO, "PageRequest of %u bytes is shorter than its header", length);
    uint64_t request_id = get64(p);
    uint32_t count = get32(p + 8);
    if (get32(p + 12) != 0 || count == 0 || count > LM_URGENT_MAX_PAGES_IN)
        return fail(u, EPROTO, "PageRequest count %u or reserved field invalid", count);
    if (length != LM_WIRE_REQUEST_PREFIX_BYTES + (uint64_t)count * 8)
        return fail(u, EPROTO, "PageRequest of %u pages has %u bytes", count, length);
    uint64_t *pages = u->scratch;
    memcpy(pages, p + LM_WIRE_REQUEST_PREFIX_BYTES, (uint64_t)count * 8);
    for (uint32_t i = 0; i < count; i++)
        if (pages[i] >= u->npages)
            return fail(u, ERANGE, "a PageRequest names page %llu, outside guest memory (%llu "
                        "pages)", (unsigned long long)pages[i], (unsigned long long)u->npages);
    if (count > 1)
        qsort(pages, count, sizeof(uint64_t), cmp_u64);
    uint64_t n = 0;
    for (uint32_t i = 0; i < count; i++)
        if (n == 0 || pages[i] != pages[n - 1])
            pages[n++] = pages[i];
    STAT_ADD(u, requests, 1);
    STAT_ADD(u, pages_requested, n);
    /* Chunks of at most REPLY_RUNS runs and REQUEST_PAGES pages. */
    uint64_t start = 0;
    while (start < n) {
        uint64_t end = start + 1, runs = 1;
        while (end < n && end - start < LM_URGENT_REQUEST_PAGES) {
            if (pages[end] != pages[end - 1] + 1) {
                if (runs == LM_URGENT_REPLY_RUNS)
                    break;
                runs++;
            }
            end++;
        }
        int rc = source_reply(u, request_id, pages + start, end - start, runs);
        if (rc < 0)
            return rc;
        start = end;
    }
    ring_push(u, pages, n, &u->stats.requests_dropped);
    notify(u);
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
    int rc = u->side == SIDE_DEST ? dest_resend(u) : 0;
    int uffd = u->side == SIDE_DEST ? lm_postcopy_fd(u->pc) : -1;
    struct pollfd pfd[3] = {{.fd = u->stop_efd, .events = POLLIN},
                            {.fd = u->fd, .events = POLLIN},
                            {.fd = uffd, .events = POLLIN}};
    nfds_t nfds = u->side == SIDE_DEST ? 3 : 2;
    uint64_t spin_ns = (uint64_t)u->spin_us * 1000u, spin_until = 0;
    while (rc == 0) {
        int timeout_ms = -1;
        if (spin_ns && now_ns() < spin_until) {
            timeout_ms = 0;
            STAT_ADD(u, spin_polls, 1);
        }
        int n = poll(pfd, nfds, timeout_ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = fail(u, errno, "poll: %s", strerror(errno));
            break;
        }
        if (n == 0)
            continue;
        if (pfd[0].revents)
            break;
        if (nfds == 3 && pfd[2].revents) {
            if (pfd[2].revents & (POLLERR | POLLNVAL)) {
                rc = fail(u, EBADF, "the userfaultfd was closed under the urgent thread");
                break;
            }
            rc = dest_read_faults(u);
        }
        if (rc == 0 && pfd[1].revents) {
            if (u->side == SIDE_DEST)
                rc = receive(u, LM_MSG_PAGE_BATCH, dest_on_batch);
            else
                rc = receive(u, LM_MSG_PAGE_REQUEST, source_on_request);
        }
        if (spin_ns)
            spin_until = now_ns() + spin_ns;
    }
    if (rc == -ECANCELED)
        rc = 0;   /* stop asked while a write waited */
    __atomic_store_n(&u->status, rc < 0 ? rc : LM_URGENT_STOPPED, __ATOMIC_RELEASE);
    notify(u);
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
    uint64_t sbuf_bytes = u->side == SIDE_DEST
        ? LM_WIRE_HEADER_BYTES + LM_WIRE_REQUEST_PREFIX_BYTES + LM_URGENT_REQUEST_PAGES * 8
        : LM_WIRE_HEADER_BYTES + LM_WIRE_BATCH_PREFIX_BYTES + LM_BATCH_HEADER_BYTES + LM_URGENT_REPLY_RUNS * LM_BATCH_RUN_BYTES;
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
    if (u->side != SIDE_DEST)
        return -EINVAL;
    return ring_drain(u, ns_out, max);
}

LM_API int64_t lm_urgent_requests_drain(lm_urgent *u, uint64_t *pages_out, uint64_t max)
{
    if (u->side != SIDE_SOURCE)
        return -EINVAL;
    return ring_drain(u, pages_out, max);
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
    if (u->xx_state)
        u->xx.destroy(u->xx_state);
    if (u->xx.dl)
        dlclose(u->xx.dl);
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
