/*
 * The destination side of a bulk stream: check a page batch whole, then place it.
 *
 * Theory of operation
 *   Everything a peer sends is checked before a page is touched, as the
 *   Python decoder checks it: the PageBatch prefix (request_id 0, a round not
 *   older than the last one closed, the same round until its StreamEnd), the
 *   batch header (magic, version, reserved fields, sizes adding up to the
 *   frame exactly), and every run (reserved bytes 0, count > 0, inside
 *   memory, ascending and disjoint, an encoding a stream carries: ZERO with
 *   no payload, RAW with exactly count pages, BLOCK (with fingerprints)
 *   with exactly its masks and the blocks they name, LZ4 (with liblz4) of
 *   at most LZ4's bound that decompresses to exactly count pages, at most
 *   one batch's pages of them). A violation ends the thread
 *   with -EPROTO (-ERANGE for a page outside memory) and a reason; nothing of
 *   that batch is placed. The arithmetic is done in 64 bits on values the
 *   header bounds (a frame is at most LM_STREAM_MAX_FRAME bytes), so no
 *   count can wrap a check.
 *
 *   Placing: RAW pages are hashed from the frame
 *   buffer whose checksum was just checked, still in cache (LZ4 pages from
 *   the buffer they were decoded into), then copied into guest memory with
 *   non-temporal stores: the copy is of a private buffer, so what lands is
 *   exactly what was hashed, and the stores neither read the old page into
 *   the cache nor evict the frame (measured: the thread's CPU per GiB a
 *   fifth lower than copying first and hashing the landed page); BLOCK
 *   pages' blocks are written over the
 *   page held and only those blocks rehashed (lm_blockdelta.c). The block
 *   hashes of a page are kept only from its first BLOCK version on: a RAW,
 *   LZ4 or ZERO page marks them stale, and the next BLOCK page hashes its
 *   whole page once. Most pages never see a BLOCK version, and storing
 *   sixteen hashes for every page placed (and faulting in a table of 3 %
 *   of guest memory) cost more than those few whole-page hashes; ZERO pages
 *   are written only where memory is not zero already (a page never written
 *   reads as the shared zero page, and writing it would allocate memory for
 *   nothing). hashes[] and held[]
 *   are what the digest and a later post-copy switch read.
 *
 *   With a fill (lm_stream_dest_fill: fresh memory registered MISSING),
 *   a RAW or LZ4 page not yet present is not written: consecutive such
 *   pages of a run are placed together by UFFDIO_COPY, which allocates
 *   them without the zeroing a first write would cost, and an absent ZERO
 *   page is left absent (it reads zero).
 *
 *   StreamEnd closes this stream's part of a round: its counts must equal
 *   what arrived since the previous marker. The round is published (stats,
 *   release order) before the StreamAck leaves, which is what lets the
 *   owner trust its counters once the source's RoundEnd arrives.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include "channels/lm_stream_internal.h"
#include "channels/lm_urgent_internal.h"
#include "codec/lm_pagehash.h"
#include "postcopy/lm_postcopy_internal.h"
#include "wire/lm_le.h"

static int check_round(lm_stream *s, uint32_t round, const char *what)
{
    if (s->round_open && round != s->open_round)
        return lm_chan_fail(&s->ch, EPROTO, "%s of round %u inside round %u", what, round,
                            s->open_round);
    if ((int64_t)round <= s->last_closed)
        return lm_chan_fail(&s->ch, EPROTO, "%s of round %u after round %lld was closed", what,
                            round, (long long)s->last_closed);
    return 0;
}

/* Validate the run table of a batch of npages pages whose payload (after the
 * table) is payload_bytes; 0 or -errno with a reason. *block_pages and
 * *block_section get the BLOCK pages and the BLOCK section's length. */
static int check_runs(lm_stream *s, const uint8_t *runs, uint32_t nruns, uint64_t npages,
                      uint64_t payload_bytes, uint64_t *block_pages, uint64_t *block_section,
                      uint64_t *lz4_pages, uint64_t *lz4_section)
{
    uint64_t pages = 0, bytes = 0, next_free = 0;
    *block_pages = *block_section = *lz4_pages = *lz4_section = 0;
    for (uint32_t i = 0; i < nruns; i++) {
        const uint8_t *r = runs + (uint64_t)i * LM_BATCH_RUN_BYTES;
        uint64_t first = get64(r), count = get32(r + 8), pb = get32(r + 16);
        uint8_t enc = r[12];
        if (r[13] | r[14] | r[15])
            return lm_chan_fail(&s->ch, EPROTO,
                                "page batch: reserved run-table bytes set in run %u", i);
        if (count == 0)
            return lm_chan_fail(&s->ch, EPROTO, "page batch: run %u is empty", i);
        if (first >= s->npages || count > s->npages - first)
            return lm_chan_fail(&s->ch, ERANGE, "page batch: run %u (pages %llu+%llu) outside "
                                "memory of %llu pages", i, (unsigned long long)first,
                                (unsigned long long)count, (unsigned long long)s->npages);
        if (first < next_free)
            return lm_chan_fail(&s->ch, EPROTO, "page batch: run %u is not after the previous one "
                                "(a stream's runs ascend)", i);
        if (enc == LM_ENC_ZERO) {
            if (pb != 0)
                return lm_chan_fail(&s->ch, EPROTO, "page batch: ZERO run %u has %llu payload "
                                    "bytes", i, (unsigned long long)pb);
        } else if (enc == LM_ENC_RAW) {
            if (pb != count * LM_PAGE_SIZE)
                return lm_chan_fail(&s->ch, EPROTO, "page batch: RAW run %u has %llu payload bytes "
                                    "for %llu pages", i, (unsigned long long)pb,
                                    (unsigned long long)count);
        } else if (enc == LM_ENC_BLOCK && s->fp) {
            /* Each page: a 2-byte mask and at most all 16 blocks; the masks
             * themselves are checked against pb in check_blocks. */
            if (pb < 2 * count || pb > count * (2 + LM_PAGE_SIZE))
                return lm_chan_fail(&s->ch, EPROTO, "page batch: BLOCK run %u has %llu payload "
                                    "bytes for %llu pages", i, (unsigned long long)pb,
                                    (unsigned long long)count);
            *block_pages += count;
            *block_section += pb;
        } else if (enc == LM_ENC_LZ4 && s->lz4.dl) {
            /* Decoded into a staging buffer of one batch's pages before any
             * is placed; a block is at most LZ4's bound of its input. */
            if (count > LM_STREAM_BATCH_PAGES - *lz4_pages)
                return lm_chan_fail(&s->ch, EPROTO, "page batch: LZ4 runs hold more than the %u "
                                    "pages a stream batch may carry", LM_STREAM_BATCH_PAGES);
            uint64_t raw = count * LM_PAGE_SIZE;
            if (pb == 0 || pb > raw + raw / 255 + 16)
                return lm_chan_fail(&s->ch, EPROTO, "page batch: LZ4 run %u has %llu payload "
                                    "bytes for %llu pages", i, (unsigned long long)pb,
                                    (unsigned long long)count);
            *lz4_pages += count;
            *lz4_section += pb;
        } else {
            return lm_chan_fail(&s->ch, EPROTO, "page batch: encoding %u in run %u is not carried "
                                "on a bulk stream", enc, i);
        }
        next_free = first + count;
        pages += count;
        bytes += pb;
    }
    if (pages != npages)
        return lm_chan_fail(&s->ch, EPROTO,
                            "page batch: runs hold %llu pages, the header says %llu",
                            (unsigned long long)pages, (unsigned long long)npages);
    if (bytes != payload_bytes)
        return lm_chan_fail(&s->ch, EPROTO, "page batch: runs hold %llu payload bytes, the header "
                            "says %llu", (unsigned long long)bytes,
                            (unsigned long long)payload_bytes);
    return 0;
}

/* The BLOCK section (masks of every BLOCK page in run order, then their
 * blocks): each BLOCK run's payload must be exactly its pages' masks plus
 * the blocks they name. */
static int check_blocks(lm_stream *s, const uint8_t *runs, uint32_t nruns, const uint8_t *masks)
{
    uint64_t k = 0;
    for (uint32_t i = 0; i < nruns; i++) {
        const uint8_t *r = runs + (uint64_t)i * LM_BATCH_RUN_BYTES;
        if (r[12] != LM_ENC_BLOCK)
            continue;
        uint64_t count = get32(r + 8), need = 0;
        for (uint64_t j = 0; j < count; j++, k++)
            need += 2 + (uint64_t)__builtin_popcount(get16(masks + 2 * k)) * LM_BLOCK_BYTES;
        if (need != get32(r + 16))
            return lm_chan_fail(&s->ch, EPROTO, "page batch: BLOCK masks of run %u name %llu "
                                "bytes, the run holds %u", i, (unsigned long long)need,
                                get32(r + 16));
    }
    return 0;
}

static void land(lm_stream *s, uint64_t page, uint64_t h)
{
    if (s->hashes)
        s->hashes[page] = h;
    if (s->held)
        s->held[page] = 1;
}

/* Decode every LZ4 run (the LZ4 section, in run order) into s->lz4buf, in
 * run order: 0, or -EPROTO when a block does not give exactly its pages. */
static int decode_lz4(lm_stream *s, const uint8_t *runs, uint32_t nruns, const uint8_t *section)
{
    uint64_t out = 0;
    for (uint32_t i = 0; i < nruns; i++) {
        const uint8_t *r = runs + (uint64_t)i * LM_BATCH_RUN_BYTES;
        if (r[12] != LM_ENC_LZ4)
            continue;
        uint32_t pb = get32(r + 16);
        int want = (int)(get32(r + 8) * LM_PAGE_SIZE);
        int got = s->lz4.decompress((const char *)section, (char *)s->lz4buf + out, (int)pb, want);
        if (got != want)
            return lm_chan_fail(&s->ch, EPROTO, "page batch: LZ4 run %u does not decompress to "
                                "its %d bytes (%d)", i, want, got);
        section += pb;
        out += (uint64_t)want;
    }
    return 0;
}

/* Copy a page into guest memory without reading its old contents into the
 * cache (non-temporal stores on x86-64: the landed page is not read again by
 * this thread); place_runs fences once after the batch. */
static inline void page_copy_stream(uint8_t *dst, const uint8_t *src)
{
#if defined(__x86_64__)
    for (int i = 0; i < LM_PAGE_SIZE; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
#else
    memcpy(dst, src, LM_PAGE_SIZE);
#endif
}

/* The pages of a run not yet present, placed with fill (pre-copy's first
 * version of a page): [first, first + n) from src, contiguous, all absent
 * when looked at. UFFDIO_COPY allocates them without zeroing them first.
 * Where it places fewer (a page became present meanwhile: the zero fill
 * served someone's access to it) or fails, the run is written over as a
 * present page is: every page then holds src either way. */
static void place_absent(lm_stream *s, uint64_t first, uint64_t n, const uint8_t *src)
{
    if (n == 0)
        return;
    if (lm_postcopy_copy(s->fill, first, src, n) == (int64_t)n)
        return;
    for (uint64_t j = 0; j < n; j++)
        page_copy_stream(s->base + (first + j) * LM_PAGE_SIZE, src + j * LM_PAGE_SIZE);
}

static void place_runs(lm_stream *s, const uint8_t *runs, uint32_t nruns, const uint8_t *masks,
                       const uint8_t *blocks, const uint8_t *raw)
{
    const uint8_t *unpacked = s->lz4buf;   /* the decoded LZ4 pages, in run order */
    for (uint32_t i = 0; i < nruns; i++) {
        const uint8_t *r = runs + (uint64_t)i * LM_BATCH_RUN_BYTES;
        uint64_t first = get64(r), count = get32(r + 8);
        uint8_t enc = r[12];
        uint64_t absent_first = 0, absent_n = 0;   /* fill: absent pages held back */
        const uint8_t *absent_src = NULL;
        for (uint64_t page = first; page < first + count; page++) {
            uint8_t *dst = s->base + page * LM_PAGE_SIZE;
            int64_t row = (int64_t)page;
            uint64_t h;
            if (enc == LM_ENC_RAW || enc == LM_ENC_LZ4) {
                const uint8_t *from = enc == LM_ENC_RAW ? raw : unpacked;
                /* Hashed from the verified private buffer (still in cache),
                 * then copied: what lands is exactly what was hashed. */
                h = page_hash(from);
                if (s->fp)
                    s->fp_valid[page] = 0;   /* block hashes made when a BLOCK page needs them */
                if (s->fill && !lm_postcopy_page_present(s->fill, page)) {
                    if (absent_n == 0) {
                        absent_first = page;
                        absent_src = from;
                    }
                    absent_n++;
                } else {
                    place_absent(s, absent_first, absent_n, absent_src);
                    absent_n = 0;
                    page_copy_stream(dst, from);
                }
                if (enc == LM_ENC_RAW)
                    raw += LM_PAGE_SIZE;
                else
                    unpacked += LM_PAGE_SIZE;
            } else if (enc == LM_ENC_BLOCK) {
                uint16_t mask = get16(masks);
                uint64_t len = (uint64_t)__builtin_popcount(mask) * LM_BLOCK_BYTES;
                /* Lengths were checked whole (check_blocks): this cannot refuse. */
                lm_pages_apply_blocks_fingerprint(s->base, s->npages, &row, &mask, 1, blocks, len,
                                                  s->fp, s->fp_valid, &h);
                masks += 2;
                blocks += len;
            } else {
                /* An absent page reads as zero already (and reading it would
                 * only make the zero fill map one). */
                if ((!s->fill || lm_postcopy_page_present(s->fill, page)) && !lm_page_is_zero(dst))
                    memset(dst, 0, LM_PAGE_SIZE);
                h = s->zero_hash;
                if (s->fp)
                    s->fp_valid[page] = 0;
            }
            land(s, page, h);
        }
        place_absent(s, absent_first, absent_n, absent_src);
        if (enc == LM_ENC_RAW)
            STREAM_ADD(s, raw_pages, count);
        else if (enc == LM_ENC_LZ4)
            STREAM_ADD(s, lz4_pages, count);
        else if (enc == LM_ENC_BLOCK)
            STREAM_ADD(s, block_pages, count);
        else
            STREAM_ADD(s, zero_pages, count);
    }
#if defined(__x86_64__)
    _mm_sfence();   /* the streamed stores are ordered before the round is published */
#endif
}

/* Post-copy push: every run lands through userfaultfd (UFFDIO_COPY from the
 * verified receive buffer, or ZEROPAGE), which maps it atomically and wakes
 * any vCPU blocked on it. Hashes are stored first: once the last page is
 * placed the owner may take the digest of the array at any moment. A page
 * the urgent path placed first comes back EEXIST, skipped and counted by
 * lm_postcopy; its hash is the same either way (the source's memory is
 * frozen since the switchover). */
_Static_assert(LM_STREAM_BATCH_PAGES <= 64, "a push run must fit lm_urgent_dest_settle_run");

static int place_runs_postcopy(lm_stream *s, const uint8_t *runs, uint32_t nruns,
                               const uint8_t *raw)
{
    for (uint32_t i = 0; i < nruns; i++) {
        const uint8_t *r = runs + (uint64_t)i * LM_BATCH_RUN_BYTES;
        uint64_t first = get64(r), count = get32(r + 8);
        int64_t placed;
        if (r[12] == LM_ENC_RAW) {
            for (uint64_t j = 0; s->hashes && j < count; j++)
                __atomic_store_n(&s->hashes[first + j], page_hash(raw + j * LM_PAGE_SIZE),
                                 __ATOMIC_RELEASE);
            placed = lm_postcopy_copy(s->pc, first, raw, count);
            raw += count * LM_PAGE_SIZE;
            STREAM_ADD(s, raw_pages, count);
        } else {
            for (uint64_t j = 0; s->hashes && j < count; j++)
                __atomic_store_n(&s->hashes[first + j], s->zero_hash, __ATOMIC_RELEASE);
            placed = lm_postcopy_zero(s->pc, first, count);
            STREAM_ADD(s, zero_pages, count);
        }
        if (placed < 0)
            return lm_chan_fail(&s->ch, (int)-placed, "placing pushed pages %llu..%llu: %s",
                                (unsigned long long)first,
                                (unsigned long long)(first + count - 1), strerror((int)-placed));
        if (s->urgent) {
            uint64_t lat[64];   /* a run is at most a batch: LM_STREAM_BATCH_PAGES */
            int64_t k = lm_urgent_dest_settle_run(s->urgent, s->pc, first, count, lat);
            if (k > 0)
                lm_ring_push(&s->lat_ring, lat, (uint64_t)k, &s->stats.latencies_dropped);
        }
    }
    return 0;
}

int lm_stream_dest_on_batch(lm_stream *s, const uint8_t *p, uint32_t length)
{
    if (length < LM_WIRE_BATCH_PREFIX_BYTES + LM_BATCH_HEADER_BYTES)
        return lm_chan_fail(&s->ch, EPROTO, "PageBatch of %u bytes is shorter than its headers",
                            length);
    uint32_t round = get32(p), npages = get32(p + 4);
    if (get64(p + 8) != 0)
        return lm_chan_fail(&s->ch, EPROTO, "PageBatch on a bulk stream with request id %llu",
                            (unsigned long long)get64(p + 8));
    int rc = check_round(s, round, "page batch");
    if (rc < 0)
        return rc;
    const uint8_t *bh = p + LM_WIRE_BATCH_PREFIX_BYTES;
    uint64_t batch_len = length - LM_WIRE_BATCH_PREFIX_BYTES;
    if (memcmp(bh, LM_BATCH_MAGIC, 4) != 0)
        return lm_chan_fail(&s->ch, EPROTO, "page batch: bad magic");
    if (bh[4] != LM_BATCH_VERSION)
        return lm_chan_fail(&s->ch, EPROTO, "page batch: unsupported version %u", bh[4]);
    if (bh[5] != 0 || get16(bh + 6) != 0)
        return lm_chan_fail(&s->ch, EPROTO, "page batch: reserved header bits set");
    uint64_t nruns = get32(bh + 8), bnpages = get32(bh + 12), payload = get64(bh + 16);
    if (bnpages != npages)
        return lm_chan_fail(&s->ch, EPROTO, "PageBatch announces %u pages, its batch %llu", npages,
                            (unsigned long long)bnpages);
    /* nruns <= 2^32 and payload is compared against a length below 2^32:
     * neither sum below can wrap. */
    uint64_t table_end = LM_BATCH_HEADER_BYTES + nruns * LM_BATCH_RUN_BYTES;
    if (table_end > batch_len || payload != batch_len - table_end)
        return lm_chan_fail(&s->ch, EPROTO, "page batch: length %llu does not match the header "
                            "(%llu runs, %llu payload bytes)", (unsigned long long)batch_len,
                            (unsigned long long)nruns, (unsigned long long)payload);
    const uint8_t *runs = bh + LM_BATCH_HEADER_BYTES;
    uint64_t block_pages, block_section, lz4_pages, lz4_section;
    rc = check_runs(s, runs, (uint32_t)nruns, npages, payload, &block_pages, &block_section,
                    &lz4_pages, &lz4_section);
    if (rc < 0)
        return rc;
    const uint8_t *masks = bh + table_end;   /* sections: BLOCK, LZ4, RAW */
    rc = check_blocks(s, runs, (uint32_t)nruns, masks);
    if (rc == 0 && lz4_pages)
        rc = decode_lz4(s, runs, (uint32_t)nruns, masks + block_section);
    if (rc < 0)
        return rc;
    if (s->pc) {
        rc = place_runs_postcopy(s, runs, (uint32_t)nruns, masks);
        if (rc < 0)
            return rc;
    } else {
        place_runs(s, runs, (uint32_t)nruns, masks, masks + 2 * block_pages,
                   masks + block_section + lz4_section);
    }
    STREAM_ADD(s, block_bytes, block_section);
    STREAM_ADD(s, lz4_bytes, lz4_section);
    s->round_open = 1;
    s->open_round = round;
    s->round_pages += npages;
    s->round_bytes += batch_len;
    STREAM_ADD(s, batches, 1);
    STREAM_ADD(s, pages, npages);
    STREAM_ADD(s, batch_bytes, batch_len);
    return 0;
}

int lm_stream_dest_on_end(lm_stream *s, const uint8_t *p, uint32_t length)
{
    if (length != LM_WIRE_STREAM_END_BYTES || get32(p + 4) != 0)
        return lm_chan_fail(&s->ch, EPROTO, "malformed StreamEnd (%u bytes)", length);
    uint32_t round = get32(p);
    uint64_t pages = get64(p + 8), bytes = get64(p + 16);
    int rc = check_round(s, round, "StreamEnd");
    if (rc < 0)
        return rc;
    if (pages != s->round_pages || bytes != s->round_bytes)
        return lm_chan_fail(&s->ch, EPROTO,
                            "StreamEnd of round %u counts %llu pages in %llu bytes, "
                            "%llu pages in %llu bytes arrived", round,
                            (unsigned long long)pages, (unsigned long long)bytes,
                            (unsigned long long)s->round_pages,
                            (unsigned long long)s->round_bytes);
    lm_stream_account_cpu(s);
    STREAM_SET(s, last_round, round);
    STREAM_SET(s, last_round_pages, pages);
    STREAM_SET(s, last_round_bytes, bytes);
    __atomic_fetch_add(&s->stats.rounds, 1, __ATOMIC_RELEASE);
    s->last_closed = round;
    s->round_open = 0;
    s->round_pages = s->round_bytes = 0;
    uint8_t header[LM_WIRE_HEADER_BYTES], ack[LM_WIRE_STREAM_ACK_BYTES];
    put32(ack, round);
    put32(ack + 4, 0);
    put64(ack + 8, pages);
    struct iovec iov[2] = {{.iov_base = header}, {.iov_base = ack, .iov_len = sizeof(ack)}};
    return lm_chan_send(&s->ch, LM_MSG_STREAM_ACK, 0, iov, 2);
}
