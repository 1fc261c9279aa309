/*
 * The source side of a bulk stream: one round's pages out as page batches.
 *
 * Theory of operation
 *   The guest may be running, so a page can change between the moment it is
 *   read and the moment its bytes leave; a frame's checksum must match the
 *   bytes it carries. Each non-zero page is therefore copied once into a
 *   staging buffer and hashed and checksummed from the copy (as the Python
 *   encoder does); the dirty tracker reports a page written after its copy,
 *   so it is sent again next round. The zero test reads live memory: a page
 *   found zero travels as a ZERO run (no bytes), its recorded hash is the
 *   zero page's, and a write racing with the test is, again, reported by the
 *   tracker. hashes[page] is the hash of exactly what was sent, so the
 *   digest over the array covers what the destination will hold.
 *
 *   A batch is the page-batch format of codec/batchformat.py (numbers from
 *   the generated wire header): header, run table (consecutive pages of the
 *   same encoding form one run, in ascending order), then the RAW pages. It
 *   is sent with one writev(2) of frame header, prefix + header + run table,
 *   BLOCK masks and blocks, LZ4 blocks, staged RAW pages (empty parts cost
 *   nothing; the RAW pages of runs that went LZ4 are skipped, one part per
 *   stretch of the staging buffer still RAW). A batch is 64 pages so that
 *   its staged copy is still in L2 when it is checksummed and sent.
 *
 *   LZ4 (docs/codec.md): with lm_stream_source_lz4, RAW runs are cut at its
 *   chunk, and a batch whose sample runs say compression pays (lz4_pays,
 *   the Python encoder's rule) has each RAW run that shrinks enough sent as
 *   one LZ4 block of its staged pages. The hash is still that of the staged
 *   copy, which is exactly what the block decodes to.
 *
 *   Rounds (lm_stream.c, "Window"): a round's batches and its StreamEnd go
 *   out in one go; the acks of earlier rounds are taken every few batches
 *   and whenever the thread has nothing more to send, and must come in the
 *   order the rounds were sent, each repeating its StreamEnd's page count.
 *
 *   BLOCK (docs/codec.md): given the block fingerprints of what the
 *   receiver holds, the copy and its sixteen block hashes are made in one
 *   pass; a page sent exactly before with at most LM_STREAM_BLOCK_MAX_BLOCKS
 *   changed blocks travels as a mask and those blocks. Every page sent
 *   updates its fingerprint (ZERO pages get the zero page's), which is what
 *   the receiver will hold once the batch is placed: a stream's batches are
 *   placed in order, and a page always travels on the same stream.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "channels/lm_pace.h"
#include "channels/lm_stream_internal.h"
#include "channels/lm_tls.h"
#include "codec/lm_pagehash.h"
#include "wire/lm_le.h"

struct round_totals {
    uint64_t pages;
    uint64_t bytes;   /* page-batch bytes */
};

/* One page's encoding: ZERO, BLOCK (its changed blocks appended to the
 * BLOCK section) or RAW (copied to staging slot *nraw). Records its hash. */
struct batch_build {
    uint32_t nraw, nzero, nblock;
    uint64_t block_bytes;   /* masks + blocks */
};

static int encode_page(lm_stream *s, uint64_t page, struct batch_build *b, uint32_t *run_bytes)
{
    const uint8_t *src = s->base + page * LM_PAGE_SIZE;
    uint64_t h;
    int enc;
    if (lm_page_is_zero(src)) {
        enc = LM_ENC_ZERO;
        h = s->zero_hash;
        b->nzero++;
        *run_bytes = 0;
        if (s->fp) {
            memcpy(s->fp + page * LM_BLOCKS_PER_PAGE, s->zero_blocks, sizeof(s->zero_blocks));
            s->fp_valid[page] = 1;
        }
    } else if (s->fp) {
        /* Copy and fingerprint in one pass; the mask names the blocks that
         * differ from what the receiver holds (all of them if unknown). */
        uint8_t *copy = s->staging + (uint64_t)b->nraw * LM_PAGE_SIZE;
        int64_t row = (int64_t)page, zero_off = 0;
        uint16_t mask;
        lm_pages_snapshot_fingerprint(s->base, s->npages, &row, 1, copy, s->fp, s->npages, &row,
                                      s->fp_valid, &mask, &h);
        s->fp_valid[page] = 1;   /* sent exactly: the copy is what travels */
        int nblocks = __builtin_popcount(mask);
        if (nblocks <= LM_STREAM_BLOCK_MAX_BLOCKS) {
            enc = LM_ENC_BLOCK;
            put16(s->masks + 2 * (uint64_t)b->nblock, mask);
            uint64_t off = b->block_bytes - 2 * (uint64_t)b->nblock;
            lm_pages_gather_blocks(copy, 1, NULL, &mask, &zero_off, 1, s->blocks + off,
                                   LM_STREAM_BLOCKS_BYTES - off);
            b->nblock++;
            *run_bytes = 2 + (uint32_t)nblocks * LM_BLOCK_BYTES;
            b->block_bytes += *run_bytes;
        } else {
            enc = LM_ENC_RAW;
            b->nraw++;
            *run_bytes = LM_PAGE_SIZE;
        }
    } else {
        uint8_t *copy = s->staging + (uint64_t)b->nraw * LM_PAGE_SIZE;
        memcpy(copy, src, LM_PAGE_SIZE);
        h = page_hash(copy);
        enc = LM_ENC_RAW;
        b->nraw++;
        *run_bytes = LM_PAGE_SIZE;
    }
    if (s->hashes)
        s->hashes[page] = h;
    return enc;
}

static double monotonic_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The Python encoder's rule (codec/encoder.py, _lz4_pays), per batch:
 * compress up to LM_STREAM_LZ4_PROBE_RUNS RAW runs spread over the batch;
 * LZ4 pays when one of them would be sent compressed and, on a link whose
 * bandwidth is known, the sending time saved exceeds 1.5x the probe's time
 * (compressing, and decompressing taken as half as much again). A miss
 * skips the probe for the next LM_STREAM_LZ4_SKIP_BATCHES batches. */
static int lz4_pays(lm_stream *s, const uint8_t *runs, uint32_t nruns, const uint32_t *slot)
{
    if (s->lz4_skip_batches > 0) {
        s->lz4_skip_batches--;
        return 0;
    }
    uint32_t raw[LM_STREAM_BATCH_PAGES], nraw = 0;
    for (uint32_t i = 0; i < nruns; i++)
        if (runs[(uint64_t)i * LM_BATCH_RUN_BYTES + 12] == LM_ENC_RAW)
            raw[nraw++] = i;
    uint32_t k = nraw < LM_STREAM_LZ4_PROBE_RUNS ? nraw : LM_STREAM_LZ4_PROBE_RUNS;
    STREAM_ADD(s, lz4_probes, 1);
    double t0 = monotonic_s();
    uint64_t saved = 0;
    int worth = 0;
    int64_t prev = -1;
    for (uint32_t j = 0; j < k; j++) {
        /* numpy.linspace(0, nraw - 1, k) truncated, each run once */
        int64_t at = k == 1 ? 0 : (int64_t)((double)j * (nraw - 1) / (k - 1));
        if (at == prev)
            continue;
        prev = at;
        const uint8_t *r = runs + (uint64_t)raw[at] * LM_BATCH_RUN_BYTES;
        int in = (int)(get32(r + 8) * LM_PAGE_SIZE);
        int out = s->lz4.compress((const char *)(s->staging + (uint64_t)slot[raw[at]] * LM_PAGE_SIZE),
                                  (char *)s->lz4buf, in, (int)s->lz4buf_bytes);
        if (out <= 0)
            continue;
        if (out < in)
            saved += (uint64_t)(in - out);
        worth |= (double)out <= s->lz4_max_ratio * in;
    }
    uint64_t link = __atomic_load_n(&s->link_bytes_per_s, __ATOMIC_RELAXED);
    if (worth && link)
        worth = (double)saved / (double)link > 1.5 * (monotonic_s() - t0);
    if (!worth)
        s->lz4_skip_batches = LM_STREAM_LZ4_SKIP_BATCHES;
    return worth;
}

/* Turn the RAW runs that compress well enough into LZ4 runs (their table
 * entries rewritten), their blocks appended to s->lz4buf; returns the LZ4
 * section's bytes, *lz4_pages its pages. */
static uint64_t compress_runs(lm_stream *s, uint8_t *runs, uint32_t nruns, const uint32_t *slot,
                              uint64_t *lz4_pages)
{
    uint64_t used = 0;
    *lz4_pages = 0;
    for (uint32_t i = 0; i < nruns; i++) {
        uint8_t *r = runs + (uint64_t)i * LM_BATCH_RUN_BYTES;
        if (r[12] != LM_ENC_RAW)
            continue;
        uint32_t count = get32(r + 8);
        int in = (int)(count * LM_PAGE_SIZE);
        int out = s->lz4.compress((const char *)(s->staging + (uint64_t)slot[i] * LM_PAGE_SIZE),
                                  (char *)s->lz4buf + used, in, (int)(s->lz4buf_bytes - used));
        if (out <= 0 || (double)out > s->lz4_max_ratio * in)
            continue;
        r[12] = LM_ENC_LZ4;
        put32(r + 16, (uint32_t)out);
        used += (uint64_t)out;
        *lz4_pages += count;
    }
    return used;
}

/* Build and send one batch of pages[0 .. n), n <= LM_STREAM_BATCH_PAGES. */
static int send_batch(lm_stream *s, uint32_t round, const uint64_t *pages, uint64_t n,
                      struct round_totals *t)
{
    uint8_t *prefix = s->table;
    uint8_t *bh = prefix + LM_WIRE_BATCH_PREFIX_BYTES;
    uint8_t *runs = bh + LM_BATCH_HEADER_BYTES;
    struct batch_build b = {0, 0, 0, 0};
    uint32_t nruns = 0;
    uint32_t slot[LM_STREAM_BATCH_PAGES];   /* a RAW run's first staging slot */
    uint32_t staged = 0;                    /* RAW pages in runs closed so far */
    uint64_t run_first = 0, run_count = 0, run_payload = 0;
    int run_enc = 0;
    /* With LZ4 on, RAW runs are cut at its chunk: the unit it compresses. */
    uint64_t raw_cut = s->lz4_chunk_pages ? s->lz4_chunk_pages : UINT64_MAX;
    for (uint64_t i = 0; i <= n; i++) {
        int enc = 0;
        uint64_t page = 0;
        uint32_t page_bytes = 0;
        if (i < n) {
            page = pages[i];
            enc = encode_page(s, page, &b, &page_bytes);
            if (run_count && enc == run_enc && page == run_first + run_count &&
                !(enc == LM_ENC_RAW && run_count == raw_cut)) {
                run_count++;
                run_payload += page_bytes;
                continue;
            }
        }
        if (run_count) {
            uint8_t *r = runs + (uint64_t)nruns * LM_BATCH_RUN_BYTES;
            memset(r, 0, LM_BATCH_RUN_BYTES);
            put64(r, run_first);
            put32(r + 8, (uint32_t)run_count);
            r[12] = (uint8_t)run_enc;
            put32(r + 16, (uint32_t)run_payload);
            slot[nruns] = staged;
            if (run_enc == LM_ENC_RAW)
                staged += (uint32_t)run_count;
            nruns++;
        }
        run_first = page;
        run_count = 1;
        run_enc = enc;
        run_payload = page_bytes;
    }
    uint64_t lz4_bytes = 0, lz4_pages = 0;
    if (s->lz4_chunk_pages && b.nraw && lz4_pays(s, runs, nruns, slot))
        lz4_bytes = compress_runs(s, runs, nruns, slot, &lz4_pages);
    /* Sections in the batch format's order: BLOCK (masks, then blocks), LZ4,
     * RAW (the staged pages of the runs still RAW: one part per stretch). */
    struct iovec iov[5 + LM_STREAM_BATCH_PAGES] = {
        {.iov_base = NULL},
        {.iov_base = prefix},
        {.iov_base = s->masks, .iov_len = 2 * (uint64_t)b.nblock},
        {.iov_base = s->blocks, .iov_len = b.block_bytes - 2 * (uint64_t)b.nblock},
        {.iov_base = s->lz4buf, .iov_len = lz4_bytes},
    };
    int niov = 5;
    uint64_t raw_bytes = 0;
    if (lz4_pages == 0) {
        raw_bytes = (uint64_t)b.nraw * LM_PAGE_SIZE;
        iov[niov++] = (struct iovec){.iov_base = s->staging, .iov_len = raw_bytes};
    } else {
        for (uint32_t i = 0; i < nruns; i++) {
            const uint8_t *r = runs + (uint64_t)i * LM_BATCH_RUN_BYTES;
            if (r[12] != LM_ENC_RAW)
                continue;
            uint8_t *at = s->staging + (uint64_t)slot[i] * LM_PAGE_SIZE;
            uint64_t len = (uint64_t)get32(r + 8) * LM_PAGE_SIZE;
            struct iovec *last = &iov[niov - 1];
            if (niov > 5 && (uint8_t *)last->iov_base + last->iov_len == at)
                last->iov_len += len;
            else
                iov[niov++] = (struct iovec){.iov_base = at, .iov_len = len};
            raw_bytes += len;
        }
    }
    uint64_t payload = b.block_bytes + lz4_bytes + raw_bytes;
    put32(prefix, round);
    put32(prefix + 4, (uint32_t)n);
    put64(prefix + 8, 0);   /* request_id: pushed, not requested */
    memcpy(bh, LM_BATCH_MAGIC, 4);
    bh[4] = LM_BATCH_VERSION;
    bh[5] = 0;
    put16(bh + 6, 0);
    put32(bh + 8, nruns);
    put32(bh + 12, (uint32_t)n);
    put64(bh + 16, payload);
    uint64_t table_bytes = LM_BATCH_HEADER_BYTES + (uint64_t)nruns * LM_BATCH_RUN_BYTES;
    uint8_t header[LM_WIRE_HEADER_BYTES];
    iov[0].iov_base = header;
    iov[1].iov_len = LM_WIRE_BATCH_PREFIX_BYTES + table_bytes;
    int rc = lm_pace_take(s->pace, &s->ch, LM_WIRE_HEADER_BYTES + iov[1].iov_len + payload);
    if (rc == 0)
        rc = lm_chan_send(&s->ch, LM_MSG_PAGE_BATCH, s->batch_flags, iov, niov);
    if (rc != 0)
        return rc;
    STREAM_ADD(s, batches, 1);
    STREAM_ADD(s, pages, n);
    STREAM_ADD(s, zero_pages, b.nzero);
    STREAM_ADD(s, raw_pages, b.nraw - lz4_pages);
    STREAM_ADD(s, block_pages, b.nblock);
    STREAM_ADD(s, block_bytes, b.block_bytes);
    STREAM_ADD(s, lz4_pages, lz4_pages);
    STREAM_ADD(s, lz4_bytes, lz4_bytes);
    STREAM_ADD(s, batch_bytes, table_bytes + payload);
    t->pages += n;
    t->bytes += table_bytes + payload;
    return 0;
}

/* Read the next StreamAck: it closes the oldest round in flight, with the
 * pages its StreamEnd counted (a stream is one ordered connection, and the
 * destination answers each StreamEnd in turn). The round is published
 * (stats, release order) and its slot freed before the owner is woken. */
int lm_stream_source_take_ack(lm_stream *s)
{
    struct lm_stream_job *job = &s->jobs[s->jobs_acked % LM_STREAM_WINDOW_MAX];
    uint16_t type;
    uint32_t length;
    int rc = lm_stream_receive(s, LM_MSG_STREAM_ACK, LM_MSG_STREAM_ACK, &type, &length);
    if (rc == 2)
        return lm_chan_fail(&s->ch, ECONNRESET, "the destination closed the bulk stream before "
                            "acknowledging round %u", job->round);
    if (rc != 0)
        return rc;
    const uint8_t *p = s->rbuf + LM_WIRE_HEADER_BYTES;
    if (lm_frame_flags(s->rbuf) != 0 || length != LM_WIRE_STREAM_ACK_BYTES || get32(p + 4) != 0)
        return lm_chan_fail(&s->ch, EPROTO, "malformed StreamAck (%u bytes)", length);
    if (get32(p) != job->round || get64(p + 8) != job->sent_pages)
        return lm_chan_fail(&s->ch, EPROTO, "round %u (%llu pages) acknowledged as round %u with "
                            "%llu pages", job->round, (unsigned long long)job->sent_pages,
                            get32(p), (unsigned long long)get64(p + 8));
    lm_stream_account_cpu(s);
    STREAM_SET(s, last_round, job->round);
    STREAM_SET(s, last_round_pages, job->sent_pages);
    STREAM_SET(s, last_round_bytes, job->sent_bytes);
    /* The slot is read no more: free it before the owner can see the round
     * closed (it may queue the next one at once). */
    __atomic_store_n(&s->jobs_acked, s->jobs_acked + 1, __ATOMIC_RELEASE);
    __atomic_fetch_add(&s->stats.rounds, 1, __ATOMIC_RELEASE);
    lm_chan_notify(&s->ch);
    return 0;
}

/* Take the acks already here without waiting (a round sent earlier may be
 * closed while this one is still going out: the owner then queues the next
 * without waiting for this one). 0 or what failed. */
static int take_ready_acks(lm_stream *s)
{
    while (s->jobs_sent > s->jobs_acked) {
        /* Under TLS an ack may already be out of the socket, in OpenSSL. */
        if (!(s->ch.tls && lm_tls_pending(&s->ch))) {
            struct pollfd pfd = {.fd = s->ch.fd, .events = POLLIN};
            int n = poll(&pfd, 1, 0);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                return lm_chan_fail(&s->ch, errno, "poll: %s", strerror(errno));
            if (n == 0)
                return 0;
        }
        int rc = lm_stream_source_take_ack(s);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* Acks are looked for every this many batches of a round (1 MiB of RAW
 * pages): often enough that a closed round's slot is freed long before this
 * one ends, seldom enough that the poll(2) costs nothing. */
#define ACK_LOOK_BATCHES 4

int lm_stream_source_send_next(lm_stream *s)
{
    struct lm_stream_job *job = &s->jobs[s->jobs_sent % LM_STREAM_WINDOW_MAX];
    const uint64_t *pages = job->pages;
    uint64_t n = job->n;
    uint32_t round = job->round;
    struct round_totals t = {0, 0};
    uint64_t batches = 0;
    for (uint64_t off = 0; off < n; off += LM_STREAM_BATCH_PAGES) {
        uint64_t k = n - off < LM_STREAM_BATCH_PAGES ? n - off : LM_STREAM_BATCH_PAGES;
        int rc = send_batch(s, round, pages + off, k, &t);
        if (rc == 0 && ++batches % ACK_LOOK_BATCHES == 0)
            rc = take_ready_acks(s);
        if (rc != 0)
            return rc;
    }
    uint8_t header[LM_WIRE_HEADER_BYTES], end[LM_WIRE_STREAM_END_BYTES];
    put32(end, round);
    put32(end + 4, 0);
    put64(end + 8, t.pages);
    put64(end + 16, t.bytes);
    struct iovec iov[2] = {{.iov_base = header}, {.iov_base = end, .iov_len = sizeof(end)}};
    int rc = lm_chan_send(&s->ch, LM_MSG_STREAM_END, 0, iov, 2);
    if (rc != 0)
        return rc;
    job->sent_pages = t.pages;
    job->sent_bytes = t.bytes;
    s->jobs_sent++;
    uint64_t in_flight = s->jobs_sent - s->jobs_acked;
    if (in_flight > __atomic_load_n(&s->stats.in_flight_max, __ATOMIC_RELAXED))
        STREAM_SET(s, in_flight_max, in_flight);
    return take_ready_acks(s);
}
