/*
 * The urgent channel's source side: PageRequests in, PageBatch(URGENT)
 * replies out, straight from the frozen guest memory.
 *
 * Theory of operation
 *   A request is validated (length, count, reserved, every page inside
 *   memory), its pages sorted and de-duplicated, and answered by replies of
 *   at most LM_URGENT_REQUEST_PAGES pages and LM_URGENT_REPLY_RUNS runs, each
 *   written with one writev(2): frame header, PageBatch prefix, page-batch
 *   header and run table from sbuf, then the guest pages themselves (RAW
 *   runs), never copied. The base must not change while attached (the
 *   source VM is paused), so the hash of each page sent, stored after the
 *   write, is the hash of what the destination received. The requested
 *   indices go to the ring, so the owner's pusher sends their neighbours
 *   next (pre-paging around faults).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "channels/lm_urgent_internal.h"
#include "wire/lm_le.h"

/* The offsets below are those of spec.py's PAGE_REQUEST_FORMAT (<QII),
 * PAGE_BATCH_FORMAT (<IIQ), BATCH_HEADER_FORMAT and BATCH_RUN_FORMAT. */
_Static_assert(LM_WIRE_REQUEST_PREFIX_BYTES == 16 && LM_WIRE_BATCH_PREFIX_BYTES == 16 &&
               LM_BATCH_HEADER_BYTES == 24 && LM_BATCH_RUN_BYTES == 20,
               "page request or batch layout changed: update lm_urgent_source.c");

LM_API int lm_urgent_source_create(const uint8_t *base, uint64_t npages, uint64_t *hashes,
                                   uint32_t round, lm_urgent **out)
{
    if (!base || !npages || !out)
        return -EINVAL;
    int rc = lm_urgent_new(LM_URGENT_SOURCE, npages, hashes, out);
    if (rc < 0)
        return rc;
    (*out)->base = base;
    (*out)->round = round;
    return 0;
}

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
    iov[1].iov_len = LM_WIRE_BATCH_PREFIX_BYTES + LM_BATCH_HEADER_BYTES +
                     nruns * LM_BATCH_RUN_BYTES;
    iov[0].iov_base = f;
    int rc = lm_chan_send(&u->ch, LM_MSG_PAGE_BATCH, LM_WIRE_BATCH_URGENT, iov, (int)(2 + nruns));
    if (rc < 0)
        return rc;
    STAT_ADD(u, replies, 1);
    STAT_ADD(u, pages_replied, n);
    STAT_ADD(u, payload_bytes_replied,
             LM_BATCH_HEADER_BYTES + nruns * LM_BATCH_RUN_BYTES + n * LM_PAGE_SIZE);
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

int lm_urgent_source_on_request(lm_urgent *u, uint16_t flags, const uint8_t *p, uint32_t length)
{
    if (flags != 0)
        return lm_chan_fail(&u->ch, EPROTO, "undefined PageRequest flags %#x", flags);
    if (length < LM_WIRE_REQUEST_PREFIX_BYTES)
        return lm_chan_fail(&u->ch, EPROTO, "PageRequest of %u bytes is shorter than its header",
                            length);
    uint64_t request_id = get64(p);
    uint32_t count = get32(p + 8);
    if (get32(p + 12) != 0 || count == 0 || count > LM_URGENT_MAX_PAGES_IN)
        return lm_chan_fail(&u->ch, EPROTO, "PageRequest count %u or reserved field invalid",
                            count);
    if (length != LM_WIRE_REQUEST_PREFIX_BYTES + (uint64_t)count * 8)
        return lm_chan_fail(&u->ch, EPROTO, "PageRequest of %u pages has %u bytes", count, length);
    uint64_t *pages = u->scratch;
    memcpy(pages, p + LM_WIRE_REQUEST_PREFIX_BYTES, (uint64_t)count * 8);
    for (uint32_t i = 0; i < count; i++)
        if (pages[i] >= u->npages)
            return lm_chan_fail(&u->ch, ERANGE, "a PageRequest names page %llu, outside guest "
                                "memory (%llu pages)", (unsigned long long)pages[i],
                                (unsigned long long)u->npages);
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
    lm_ring_push(&u->ring, pages, n, &u->stats.requests_dropped);
    lm_chan_notify(&u->ch);
    return 0;
}

