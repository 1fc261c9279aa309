/*
 * The urgent channel's destination side: faults out as PageRequests,
 * PageBatch(URGENT) replies placed with UFFDIO_COPY / ZEROPAGE.
 *
 * Theory of operation
 *   uffd readable: lm_postcopy_read_faults gives the distinct missing pages;
 *   each not already outstanding gets its fault time in fault_ns[] and is
 *   named in a PageRequest. A reply is validated whole (prefix, batch
 *   header, every run) before any page is placed; each page's content hash
 *   is stored before the page is placed, because once the last page lands
 *   the owner may take the digest of the hash array at any moment. Placing
 *   wakes the faulting vCPU.
 *
 *   The owner's bulk path places pushed pages through the same lm_postcopy
 *   handle at the same time. lm_postcopy's bitmap and counters are atomics
 *   and a page placed twice comes back EEXIST (ioctl_userfaultfd(2)),
 *   counted and harmless; both writers store the same content hash for a
 *   page (the source is frozen), so the hash array tolerates the race. A
 *   fault's latency is recorded by whoever swaps its fault time to 0: this
 *   thread for its replies, the owner (lm_urgent_dest_settle) for pushed
 *   pages, so each fault is counted once. The outstanding set survives a
 *   detach: the next attach asks again for every page still missing
 *   (post-copy recovery).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "channels/lm_urgent_internal.h"
#include "postcopy/lm_postcopy_internal.h"
#include "wire/lm_le.h"

/* The offsets below are those of spec.py's PAGE_REQUEST_FORMAT (<QII),
 * PAGE_BATCH_FORMAT (<IIQ), BATCH_HEADER_FORMAT and BATCH_RUN_FORMAT. */
_Static_assert(LM_WIRE_REQUEST_PREFIX_BYTES == 16 && LM_WIRE_BATCH_PREFIX_BYTES == 16 &&
               LM_BATCH_HEADER_BYTES == 24 && LM_BATCH_RUN_BYTES == 20,
               "page request or batch layout changed: update lm_urgent_dest.c");

LM_API int lm_urgent_dest_create(lm_postcopy *p, uint64_t *hashes, lm_urgent **out)
{
    if (!p || !out)
        return -EINVAL;
    int rc = lm_urgent_new(LM_URGENT_DEST, lm_postcopy_npages(p), hashes, out);
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

/* Send PageRequests for pages[0..n) (already marked outstanding). */
static int dest_send_requests(lm_urgent *u, const uint64_t *pages, uint64_t n)
{
    while (n) {
        uint64_t take = n < LM_URGENT_REQUEST_PAGES ? n : LM_URGENT_REQUEST_PAGES;
        uint8_t *f = u->sbuf;
        uint8_t *body = f + LM_WIRE_HEADER_BYTES;
        put64(body, u->next_request_id++);
        put32(body + 8, (uint32_t)take);
        put32(body + 12, 0);
        memcpy(body + LM_WIRE_REQUEST_PREFIX_BYTES, pages, take * 8);   /* little-endian host */
        struct iovec iov[2] = {{.iov_base = f},
                               {.iov_base = body,
                                .iov_len = LM_WIRE_REQUEST_PREFIX_BYTES + take * 8}};
        int rc = lm_chan_send(&u->ch, LM_MSG_PAGE_REQUEST, 0, iov, 2);
        if (rc < 0)
            return rc;
        STAT_ADD(u, requests, 1);
        STAT_ADD(u, pages_requested, take);
        pages += take;
        n -= take;
    }
    return 0;
}

int lm_urgent_dest_read_faults(lm_urgent *u)
{
    uint64_t *pages = u->scratch;
    for (;;) {
        int64_t n = lm_postcopy_read_faults(u->pc, pages, LM_URGENT_FAULT_BATCH);
        if (n < 0)
            return lm_chan_fail(&u->ch, (int)-n, "reading userfaultfd: %s", strerror((int)-n));
        if (n == 0)
            return 0;
        uint64_t t = lm_urgent_now_ns(), fresh = 0;
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
            lm_ring_push(&u->ring, lat, k, &u->stats.latencies_dropped);
            k = 0;
        }
    }
    if (k)
        lm_ring_push(&u->ring, lat, k, &u->stats.latencies_dropped);
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
    if (!u || u->side != LM_URGENT_DEST)
        return -EINVAL;
    for (uint64_t i = 0; i < n; i++)
        if (pages[i] < 0 || (uint64_t)pages[i] >= u->npages)
            return -ERANGE;
    return (int64_t)dest_served(u, pages, 0, n, lm_urgent_now_ns(), latency_ns_out);
}

int64_t lm_urgent_dest_settle_run(lm_urgent *u, const lm_postcopy *pc, uint64_t first,
                                  uint64_t n, uint64_t *out)
{
    if (!u || u->side != LM_URGENT_DEST || u->pc != pc || n > 64 || first > u->npages ||
        n > u->npages - first)
        return -EINVAL;
    return (int64_t)dest_served(u, NULL, first, n, lm_urgent_now_ns(), out);
}

int lm_urgent_dest_on_batch(lm_urgent *u, uint16_t flags, const uint8_t *p, uint32_t length)
{
    if (flags != LM_WIRE_BATCH_URGENT)
        return lm_chan_fail(&u->ch, EPROTO, "a PageBatch on the urgent channel must be flagged "
                            "URGENT only (flags %#x)", flags);
    if (length < LM_WIRE_BATCH_PREFIX_BYTES + LM_BATCH_HEADER_BYTES)
        return lm_chan_fail(&u->ch, EPROTO, "PageBatch of %u bytes is shorter than its headers",
                            length);
    uint32_t npages = get32(p + 4);
    uint64_t request_id = get64(p + 8);
    if (request_id == 0 || request_id >= u->next_request_id)
        return lm_chan_fail(&u->ch, EPROTO, "PageBatch answers request %llu, which was never sent",
                            (unsigned long long)request_id);
    const uint8_t *b = p + LM_WIRE_BATCH_PREFIX_BYTES;
    uint64_t blen = length - LM_WIRE_BATCH_PREFIX_BYTES;
    if (memcmp(b, LM_BATCH_MAGIC, 4) != 0 || b[4] != LM_BATCH_VERSION || b[5] != 0 ||
        get16(b + 6) != 0)
        return lm_chan_fail(&u->ch, EPROTO, "page batch header invalid (magic, version, flags or "
                            "reserved)");
    uint32_t nruns = get32(b + 8), bpages = get32(b + 12);
    uint64_t payload_bytes = get64(b + 16);
    if (nruns == 0 || bpages != npages)
        return lm_chan_fail(&u->ch, EPROTO, "page batch holds %u runs and %u pages, its PageBatch "
                            "says %u", nruns, bpages, npages);
    uint64_t table_end = LM_BATCH_HEADER_BYTES + (uint64_t)nruns * LM_BATCH_RUN_BYTES;
    if (table_end > blen || blen - table_end != payload_bytes)
        return lm_chan_fail(&u->ch, EPROTO,
                            "page batch length %llu does not match %u runs and %llu "
                            "payload bytes", (unsigned long long)blen, nruns,
                            (unsigned long long)payload_bytes);
    /* Validate the whole table before placing anything. */
    uint64_t prev_end = 0, seen = 0, raw_bytes = 0;
    for (uint32_t i = 0; i < nruns; i++) {
        const uint8_t *r = b + LM_BATCH_HEADER_BYTES + (uint64_t)i * LM_BATCH_RUN_BYTES;
        uint64_t first = get64(r);
        uint32_t count = get32(r + 8), pb = get32(r + 16);
        uint8_t enc = r[12];
        if (r[13] || r[14] || r[15])
            return lm_chan_fail(&u->ch, EPROTO, "reserved run-table bytes set");
        if (enc != LM_ENC_RAW && enc != LM_ENC_ZERO)
            return lm_chan_fail(&u->ch, EPROTO, "urgent reply uses encoding %u (only RAW and ZERO "
                                "are accepted on this path)", enc);
        uint64_t want = enc == LM_ENC_RAW ? (uint64_t)count * LM_PAGE_SIZE : 0;
        if (count == 0 || pb != want)
            return lm_chan_fail(&u->ch, EPROTO, "run of %u pages with %u payload bytes", count, pb);
        if (first >= u->npages || count > u->npages - first)
            return lm_chan_fail(&u->ch, ERANGE, "reply names pages %llu..%llu outside guest memory "
                                "(%llu pages)", (unsigned long long)first,
                                (unsigned long long)(first + count - 1),
                                (unsigned long long)u->npages);
        if (first < prev_end)
            return lm_chan_fail(&u->ch, EPROTO, "page batch runs overlap or are out of order");
        prev_end = first + count;
        seen += count;
        raw_bytes += pb;
    }
    if (seen != npages || raw_bytes != payload_bytes)
        return lm_chan_fail(&u->ch, EPROTO,
                            "run counts or payload sizes do not add up to the header");
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
            return lm_chan_fail(&u->ch, (int)-placed, "placing pages %llu..%llu: %s",
                                (unsigned long long)first,
                                (unsigned long long)(first + count - 1),
                                strerror((int)-placed));
        STAT_ADD(u, pages_placed, placed);
        dest_served(u, NULL, first, count, lm_urgent_now_ns(), NULL);
    }
    STAT_ADD(u, replies, 1);
    STAT_ADD(u, pages_replied, npages);
    STAT_ADD(u, payload_bytes_replied, blen);
    if (lm_postcopy_missing(u->pc) == 0 || lm_ring_used(&u->ring) >= u->ring.capacity / 2)
        lm_chan_notify(&u->ch);
    return 0;
}

/* After an attach: ask again for every outstanding page still missing. */
int lm_urgent_dest_resend(lm_urgent *u)
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

