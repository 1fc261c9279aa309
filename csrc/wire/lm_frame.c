/*
 * Framing for native channels: libxxhash loading, frame headers, checks.
 *
 * Theory of operation
 *   The frame checksum is XXH3-64 of the payload, the same function the
 *   Python side takes from the xxhash package. It comes from the system's
 *   libxxhash, loaded with dlopen(3) when a framer is opened (the prototypes
 *   are declared in lm_frame.h, not taken from xxhash.h), so no xxh3
 *   implementation lives in this tree and building needs no xxhash headers.
 *   A library that computes another XXH3-64 than the wire's (a known value of
 *   the empty input) is refused at load rather than discovered on the wire.
 *
 *   A payload may be scattered (a prefix, a run table, guest pages): the
 *   header is computed over the parts with the streaming state, so nothing
 *   is copied to checksum it. Received headers are checked field by field in
 *   wire order (magic, version, type, reserved, length cap, sequence) before
 *   any payload byte is trusted; the length cap is checked before the
 *   receiver waits for that many bytes.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "wire/lm_frame.h"
#include "wire/lm_le.h"

#define LM_XXHASH_SONAME "libxxhash.so.0"
#define LM_XXH3_EMPTY 0x2D06800538D394C2ULL   /* XXH3_64bits("", 0) */

/* The offsets in lm_frame.h are those of a 32-byte header. */
_Static_assert(LM_WIRE_HEADER_BYTES == 32, "frame header layout changed: update lm_frame.c");

static int framer_refuse(struct lm_framer *f, int err)
{
    dlclose(f->dl);
    f->dl = NULL;
    return -err;
}

/* libxxhash built with its x86 dispatcher also exports *_dispatch entry
 * points that pick the widest vector unit at run time (AVX2 here: twice the
 * default SSE2 code's speed over a page batch). XXH3's value does not depend
 * on the unit; they are used only if they agree with the plain functions on
 * an input long enough to take the vector path, one-shot and streamed. */
static void use_dispatch(struct lm_framer *f)
{
    uint64_t (*oneshot)(const void *, size_t) =
        (uint64_t (*)(const void *, size_t))dlsym(f->dl, "XXH3_64bits_dispatch");
    int (*update)(void *, const void *, size_t) =
        (int (*)(void *, const void *, size_t))dlsym(f->dl, "XXH3_64bits_update_dispatch");
    if (!oneshot || !update)
        return;
    uint8_t probe[4096 + 7];
    for (size_t i = 0; i < sizeof(probe); i++)
        probe[i] = (uint8_t)(i * 131u ^ (i >> 3));
    uint64_t want = f->oneshot(probe, sizeof(probe));
    f->reset(f->state);
    update(f->state, probe, 1000);
    update(f->state, probe + 1000, sizeof(probe) - 1000);
    if (oneshot(probe, sizeof(probe)) != want || f->digest(f->state) != want)
        return;
    f->oneshot = oneshot;
    f->update = update;
}

int lm_framer_open(struct lm_framer *f, char *reason, size_t reason_cap)
{
    memset(f, 0, sizeof(*f));
    f->dl = dlopen(LM_XXHASH_SONAME, RTLD_NOW | RTLD_LOCAL);
    if (!f->dl) {
        const char *e = dlerror();
        snprintf(reason, reason_cap, "cannot load %s: %s", LM_XXHASH_SONAME,
                 e ? e : "unknown error");
        return -ENOENT;
    }
    f->oneshot = (uint64_t (*)(const void *, size_t))dlsym(f->dl, "XXH3_64bits");
    f->create = (void *(*)(void))dlsym(f->dl, "XXH3_createState");
    f->destroy = (int (*)(void *))dlsym(f->dl, "XXH3_freeState");
    f->reset = (int (*)(void *))dlsym(f->dl, "XXH3_64bits_reset");
    f->update = (int (*)(void *, const void *, size_t))dlsym(f->dl, "XXH3_64bits_update");
    f->digest = (uint64_t (*)(const void *))dlsym(f->dl, "XXH3_64bits_digest");
    if (!f->oneshot || !f->create || !f->destroy || !f->reset || !f->update || !f->digest) {
        snprintf(reason, reason_cap, "%s lacks the XXH3 64-bit functions", LM_XXHASH_SONAME);
        return framer_refuse(f, ENOSYS);
    }
    if (f->oneshot("", 0) != LM_XXH3_EMPTY) {
        snprintf(reason, reason_cap, "%s computes a different XXH3-64 than the wire format's",
                 LM_XXHASH_SONAME);
        return framer_refuse(f, EPROTO);
    }
    f->state = f->create();
    if (!f->state) {
        snprintf(reason, reason_cap, "out of memory for an XXH3 state");
        return framer_refuse(f, ENOMEM);
    }
    use_dispatch(f);
    return 0;
}

void lm_framer_close(struct lm_framer *f)
{
    if (f->state)
        f->destroy(f->state);
    if (f->dl)
        dlclose(f->dl);
    memset(f, 0, sizeof(*f));
}

uint64_t lm_frame_put_header(struct lm_framer *f, uint8_t *h, uint16_t version, uint16_t type,
                             uint16_t flags, uint64_t sequence, const struct iovec *parts,
                             int nparts)
{
    uint64_t length = 0, checksum;
    for (int i = 0; i < nparts; i++)
        length += parts[i].iov_len;
    if (nparts == 1) {
        checksum = f->oneshot(parts[0].iov_base, parts[0].iov_len);
    } else {
        f->reset(f->state);
        for (int i = 0; i < nparts; i++)
            f->update(f->state, parts[i].iov_base, parts[i].iov_len);
        checksum = f->digest(f->state);
    }
    memcpy(h, LM_WIRE_MAGIC, 4);
    put16(h + 4, version);
    put16(h + 6, type);
    put16(h + 8, flags);
    put16(h + 10, 0);
    put32(h + 12, (uint32_t)length);
    put64(h + 16, sequence);
    put64(h + 24, checksum);
    return length;
}

int lm_frame_check_header(const uint8_t *h, const struct lm_frame_expect *want,
                          uint32_t *length, char *reason, size_t reason_cap)
{
    if (memcmp(h, LM_WIRE_MAGIC, 4) != 0) {
        snprintf(reason, reason_cap, "bad frame magic %02x%02x%02x%02x", h[0], h[1], h[2], h[3]);
        return -EPROTO;
    }
    if (get16(h + 4) != want->version) {
        snprintf(reason, reason_cap, "unsupported frame version %u (expected %u)", get16(h + 4),
                 want->version);
        return -EPROTO;
    }
    uint16_t type = get16(h + 6);
    if (type != want->type) {
        snprintf(reason, reason_cap, "unexpected frame type %u on this channel (expected %u)",
                 type, want->type);
        return -EPROTO;
    }
    if (get16(h + 10) != 0) {
        snprintf(reason, reason_cap, "reserved header field is %#x, must be 0", get16(h + 10));
        return -EPROTO;
    }
    *length = get32(h + 12);
    if (*length > want->max_payload_bytes) {
        snprintf(reason, reason_cap, "payload length %u exceeds the cap of %llu bytes", *length,
                 (unsigned long long)want->max_payload_bytes);
        return -EPROTO;
    }
    uint64_t seq = get64(h + 16);
    if (seq != want->sequence) {
        snprintf(reason, reason_cap, "sequence %llu out of order (expected %llu)",
                 (unsigned long long)seq, (unsigned long long)want->sequence);
        return -EPROTO;
    }
    return 0;
}

int lm_frame_check_payload(struct lm_framer *f, const uint8_t *h, const uint8_t *payload,
                           char *reason, size_t reason_cap)
{
    if (f->oneshot(payload, get32(h + 12)) != get64(h + 24)) {
        snprintf(reason, reason_cap, "payload checksum mismatch in frame %llu (type %u)",
                 (unsigned long long)get64(h + 16), get16(h + 6));
        return -EBADMSG;
    }
    return 0;
}

uint16_t lm_frame_flags(const uint8_t *h) { return get16(h + 8); }

int lm_frame_could_start(const uint8_t *buf, size_t n)
{
    return memcmp(buf, LM_WIRE_MAGIC, n < 4 ? n : 4) == 0;
}
