/*
 * Page codec hot loops: zero-page scan, 64-bit page hashing, XOR delta
 * encode/apply. Everything else about page batches (choice of encoding, run
 * table, LZ4, the delta cache's replacement policy) is policy and lives in
 * Python (src/livemig/codec.py); these loops are here because doing them per
 * page from Python costs more than the work itself (see bench/bench_codec.py).
 *
 * Page hash. The verification digest keeps one 64-bit hash per page on both
 * sides, so hashing runs on every page sent and every page received. It must
 * be fast and good at telling different pages apart, not cryptographic: a
 * tree of sixteen multiply-rotate block hashes (lm_pagehash.h). Calling
 * xxhash from Python per page costs 0.5-1.6 us per page (load-dependent,
 * mostly interpreter overhead); one C call over a batch runs close to memory
 * bandwidth.
 *
 * XOR delta (in the spirit of QEMU's XBZRLE, own format): the delta of a new
 * page against an old one is a list of records
 *     uleb128 skip, uleb128 nlit, nlit bytes (new XOR old)
 * meaning "leave `skip` bytes, then XOR the next `nlit` bytes". Bytes after
 * the last record are unchanged; an empty delta means an unchanged page. A
 * literal run only ends at >= 3 equal bytes, since a shorter gap costs more
 * as a new record header than as literal bytes.
 *
 * Ordering hazard: the guest may write a page while it is being encoded. The
 * encoder therefore copies the live page once into a local snapshot and
 * derives both the delta and the new cached base from that snapshot, so the
 * base kept for next time is exactly what the receiver reconstructs.
 */
#include <errno.h>
#include <string.h>

#include "livemig.h"
#include "lm_pagehash.h"

#define LM_WORDS_PER_PAGE (LM_PAGE_SIZE / 8)
#define LM_MIN_GAP 3


static int check_indices(uint64_t npages, const int64_t *indices, uint64_t n)
{
    if (!indices)
        return n <= npages ? 0 : -ERANGE;
    for (uint64_t i = 0; i < n; i++)
        if (indices[i] < 0 || (uint64_t)indices[i] >= npages)
            return -ERANGE;
    return 0;
}

static inline const uint8_t *page_at(const uint8_t *base, const int64_t *indices, uint64_t i)
{
    uint64_t idx = indices ? (uint64_t)indices[i] : i;
    return base + idx * LM_PAGE_SIZE;
}

/* ---- zero scan ---------------------------------------------------------- */

LM_API int lm_pages_zero_scan(const uint8_t *base, uint64_t npages, const int64_t *indices,
                              uint64_t n, uint8_t *out_zero)
{
    int rc = check_indices(npages, indices, n);
    if (rc)
        return rc;
    if (n > INT32_MAX)
        return -EOVERFLOW;
    int count = 0;
    for (uint64_t i = 0; i < n; i++) {
        int z = lm_page_is_zero(page_at(base, indices, i));
        out_zero[i] = (uint8_t)z;
        count += z;
    }
    return count;
}

/* ---- page hash ---------------------------------------------------------- */

LM_API int lm_pages_hash(const uint8_t *base, uint64_t npages, const int64_t *indices,
                         uint64_t n, uint64_t *out_hashes)
{
    int rc = check_indices(npages, indices, n);
    if (rc)
        return rc;
    for (uint64_t i = 0; i < n; i++)
        out_hashes[i] = page_hash(page_at(base, indices, i));
    return 0;
}

/* ---- XOR delta ---------------------------------------------------------- */

static inline int put_uleb(uint8_t *out, uint64_t cap, uint64_t *pos, uint32_t v)
{
    do {
        if (*pos >= cap)
            return -1;
        uint8_t b = v & 0x7f;
        v >>= 7;
        out[(*pos)++] = b | (v ? 0x80 : 0);
    } while (v);
    return 0;
}

/* Encode new against old into out[0..cap); returns the length or -1 when it
 * does not fit. */
static int64_t delta_encode_page(const uint8_t *nw, const uint8_t *old, uint8_t *out, uint64_t cap)
{
    uint64_t pos = 0;
    uint32_t i = 0, prev_end = 0;
    while (i < LM_PAGE_SIZE) {
        while (i + 8 <= LM_PAGE_SIZE && load64(nw + i) == load64(old + i))
            i += 8;
        while (i < LM_PAGE_SIZE && nw[i] == old[i])
            i++;
        if (i >= LM_PAGE_SIZE)
            break;
        uint32_t start = i, j = i;
        while (j < LM_PAGE_SIZE) {
            if (nw[j] != old[j]) {
                j++;
                continue;
            }
            uint32_t k = j;
            while (k < LM_PAGE_SIZE && k - j < LM_MIN_GAP && nw[k] == old[k])
                k++;
            if (k - j >= LM_MIN_GAP || k == LM_PAGE_SIZE)
                break;
            j = k;
        }
        if (put_uleb(out, cap, &pos, start - prev_end) || put_uleb(out, cap, &pos, j - start))
            return -1;
        if (cap - pos < j - start)
            return -1;
        for (uint32_t b = start; b < j; b++)
            out[pos++] = nw[b] ^ old[b];
        prev_end = i = j;
    }
    return (int64_t)pos;
}

LM_API int lm_pages_delta_encode(const uint8_t *base, uint64_t npages, const int64_t *indices,
                                 uint8_t *slab, uint64_t nslots, const int64_t *slots, uint64_t n,
                                 uint8_t *out, uint64_t out_cap, uint32_t max_page_bytes,
                                 int32_t *out_lengths)
{
    int rc = check_indices(npages, indices, n);
    if (rc)
        return rc;
    if (!slots || check_indices(nslots, slots, n))
        return -ERANGE;
    if (out_cap > INT32_MAX)
        out_cap = INT32_MAX;
    uint8_t snap[LM_PAGE_SIZE];
    uint64_t off = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint8_t *old = slab + (uint64_t)slots[i] * LM_PAGE_SIZE;
        memcpy(snap, page_at(base, indices, i), LM_PAGE_SIZE);
        uint64_t cap = out_cap - off;
        if (cap > max_page_bytes)
            cap = max_page_bytes;
        int64_t len = delta_encode_page(snap, old, out + off, cap);
        if (len < 0) {
            out_lengths[i] = LM_DELTA_TOO_BIG;
        } else {
            out_lengths[i] = (int32_t)len;
            off += (uint64_t)len;
        }
        memcpy(old, snap, LM_PAGE_SIZE);
    }
    return (int)off;
}

static inline int get_uleb(const uint8_t *in, uint64_t len, uint64_t *pos, uint32_t *v)
{
    uint32_t val = 0;
    for (int shift = 0; shift < 21; shift += 7) { /* page offsets fit in 3 bytes */
        if (*pos >= len)
            return -1;
        uint8_t b = in[(*pos)++];
        val |= (uint32_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = val;
            return 0;
        }
    }
    return -1;
}

static int delta_apply_page(uint8_t *page, const uint8_t *in, uint64_t len)
{
    uint64_t pos = 0;
    uint32_t at = 0;
    while (pos < len) {
        uint32_t skip, nlit;
        if (get_uleb(in, len, &pos, &skip) || get_uleb(in, len, &pos, &nlit))
            return -EINVAL;
        if (skip > LM_PAGE_SIZE - at || nlit > LM_PAGE_SIZE - at - skip || nlit > len - pos)
            return -EINVAL;
        at += skip;
        for (uint32_t b = 0; b < nlit; b++)
            page[at + b] ^= in[pos + b];
        at += nlit;
        pos += nlit;
    }
    return 0;
}

LM_API int lm_pages_delta_apply(uint8_t *pages, uint64_t n, const uint8_t *enc, uint64_t enc_len,
                                const uint16_t *lengths)
{
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++)
        total += lengths[i];
    if (total != enc_len)
        return -EINVAL;
    uint64_t off = 0;
    for (uint64_t i = 0; i < n; i++) {
        int rc = delta_apply_page(pages + i * LM_PAGE_SIZE, enc + off, lengths[i]);
        if (rc)
            return rc;
        off += lengths[i];
    }
    return 0;
}
