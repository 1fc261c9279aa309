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
 *   BLOCK masks and blocks, staged RAW pages (empty parts cost nothing).
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
#include <string.h>

#include "channels/lm_pace.h"
#include "channels/lm_stream_internal.h"
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

/* Build and send one batch of pages[0 .. n), n <= LM_STREAM_BATCH_PAGES. */
static int send_batch(lm_stream *s, uint32_t round, const uint64_t *pages, uint64_t n,
                      struct round_totals *t)
{
    uint8_t *prefix = s->table;
    uint8_t *bh = prefix + LM_WIRE_BATCH_PREFIX_BYTES;
    uint8_t *runs = bh + LM_BATCH_HEADER_BYTES;
    struct batch_build b = {0, 0, 0, 0};
    uint32_t nruns = 0;
    uint64_t run_first = 0, run_count = 0, run_payload = 0;
    int run_enc = 0;
    for (uint64_t i = 0; i <= n; i++) {
        int enc = 0;
        uint64_t page = 0;
        uint32_t page_bytes = 0;
        if (i < n) {
            page = pages[i];
            enc = encode_page(s, page, &b, &page_bytes);
            if (run_count && enc == run_enc && page == run_first + run_count) {
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
            nruns++;
        }
        run_first = page;
        run_count = 1;
        run_enc = enc;
        run_payload = page_bytes;
    }
    /* Sections in the batch format's order: BLOCK (masks, then blocks), RAW. */
    uint64_t raw_bytes = (uint64_t)b.nraw * LM_PAGE_SIZE;
    uint64_t payload = b.block_bytes + raw_bytes;
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
    struct iovec iov[5] = {
        {.iov_base = header},
        {.iov_base = prefix, .iov_len = LM_WIRE_BATCH_PREFIX_BYTES + table_bytes},
        {.iov_base = s->masks, .iov_len = 2 * (uint64_t)b.nblock},
        {.iov_base = s->blocks, .iov_len = b.block_bytes - 2 * (uint64_t)b.nblock},
        {.iov_base = s->staging, .iov_len = raw_bytes},
    };
    int rc = lm_pace_take(s->pace, &s->ch, LM_WIRE_HEADER_BYTES + iov[1].iov_len + payload);
    if (rc == 0)
        rc = lm_chan_send(&s->ch, LM_MSG_PAGE_BATCH, 0, iov, 5);
    if (rc != 0)
        return rc;
    STREAM_ADD(s, batches, 1);
    STREAM_ADD(s, pages, n);
    STREAM_ADD(s, zero_pages, b.nzero);
    STREAM_ADD(s, raw_pages, b.nraw);
    STREAM_ADD(s, block_pages, b.nblock);
    STREAM_ADD(s, block_bytes, b.block_bytes);
    STREAM_ADD(s, batch_bytes, table_bytes + payload);
    t->pages += n;
    t->bytes += table_bytes + payload;
    return 0;
}

/* Wait for the destination's StreamAck of round with the count we sent. */
static int await_ack(lm_stream *s, uint32_t round, uint64_t pages)
{
    uint16_t type;
    uint32_t length;
    int rc = lm_stream_receive(s, LM_MSG_STREAM_ACK, LM_MSG_STREAM_ACK, &type, &length);
    if (rc == 2)
        return lm_chan_fail(&s->ch, ECONNRESET, "the destination closed the bulk stream before "
                            "acknowledging round %u", round);
    if (rc != 0)
        return rc;
    const uint8_t *p = s->rbuf + LM_WIRE_HEADER_BYTES;
    if (lm_frame_flags(s->rbuf) != 0 || length != LM_WIRE_STREAM_ACK_BYTES || get32(p + 4) != 0)
        return lm_chan_fail(&s->ch, EPROTO, "malformed StreamAck (%u bytes)", length);
    if (get32(p) != round || get64(p + 8) != pages)
        return lm_chan_fail(&s->ch, EPROTO, "round %u (%llu pages) acknowledged as round %u with "
                            "%llu pages", round, (unsigned long long)pages, get32(p),
                            (unsigned long long)get64(p + 8));
    return 0;
}

int lm_stream_source_round(lm_stream *s)
{
    const uint64_t *pages = s->job_pages;
    uint64_t n = s->job_n;
    uint32_t round = s->job_round;
    struct round_totals t = {0, 0};
    for (uint64_t off = 0; off < n; off += LM_STREAM_BATCH_PAGES) {
        uint64_t k = n - off < LM_STREAM_BATCH_PAGES ? n - off : LM_STREAM_BATCH_PAGES;
        int rc = send_batch(s, round, pages + off, k, &t);
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
    if (rc == 0)
        rc = await_ack(s, round, t.pages);
    if (rc != 0)
        return rc;
    lm_stream_account_cpu(s);
    /* Free for the next round before the owner can see this one closed. */
    __atomic_store_n(&s->job_busy, 0, __ATOMIC_RELEASE);
    STREAM_SET(s, last_round, round);
    STREAM_SET(s, last_round_pages, t.pages);
    STREAM_SET(s, last_round_bytes, t.bytes);
    __atomic_fetch_add(&s->stats.rounds, 1, __ATOMIC_RELEASE);
    return 0;
}
