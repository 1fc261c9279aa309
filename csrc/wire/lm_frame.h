/*
 * Frames of the livemig wire for native channels (not part of the cdef).
 *
 * A frame is the fixed header of protocol/spec.py (FRAME_HEADER_FORMAT,
 * LM_WIRE_HEADER_BYTES) followed by `length` payload bytes:
 *
 *   0 magic[4]  4 version u16  6 type u16  8 flags u16  10 reserved u16
 *   12 length u32  16 sequence u64  24 xxh3-64 of the payload u64
 *
 * A framer holds the checksum functions of the system's libxxhash and one
 * streaming state; it belongs to one thread at a time. Every check writes a
 * one-line reason and returns -errno: -EPROTO for a header that breaks the
 * protocol, -EBADMSG for a payload whose checksum differs.
 */
#ifndef LM_FRAME_H
#define LM_FRAME_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "wire/lm_wire_gen.h"

struct lm_framer {
    void *dl;
    uint64_t (*oneshot)(const void *data, size_t len);
    void *(*create)(void);
    int (*destroy)(void *state);
    int (*reset)(void *state);
    int (*update)(void *state, const void *data, size_t len);
    uint64_t (*digest)(const void *state);
    void *state;
};

/* What a channel expects of the next frame it receives. */
struct lm_frame_expect {
    uint16_t version;
    uint16_t type;
    uint64_t max_payload_bytes;
    uint64_t sequence;
};

/* Load libxxhash and make a streaming state: 0, or -errno and a reason
 * (-ENOENT: not installed; -ENOSYS: no XXH3; -EPROTO: another XXH3-64). */
int lm_framer_open(struct lm_framer *f, char *reason, size_t reason_cap);
void lm_framer_close(struct lm_framer *f);

/* Fill the header h for a payload made of parts[0..nparts), checksumming
 * them in place. Returns the payload length (the caller keeps it below the
 * peer's cap). */
uint64_t lm_frame_put_header(struct lm_framer *f, uint8_t *h, uint16_t version, uint16_t type,
                             uint16_t flags, uint64_t sequence, const struct iovec *parts,
                             int nparts);
/* Check a received header against want; 0 and the payload length, or -EPROTO. */
int lm_frame_check_header(const uint8_t *h, const struct lm_frame_expect *want,
                          uint32_t *length, char *reason, size_t reason_cap);
/* Check the payload that follows a checked header h: 0, or -EBADMSG. */
int lm_frame_check_payload(struct lm_framer *f, const uint8_t *h, const uint8_t *payload,
                           char *reason, size_t reason_cap);
uint16_t lm_frame_flags(const uint8_t *h);
/* 1 when the first n (< LM_WIRE_HEADER_BYTES) bytes of a buffered partial
 * header can still begin a frame: a stream that cannot is refused at once
 * rather than after a whole header's worth of garbage. */
int lm_frame_could_start(const uint8_t *buf, size_t n);

#endif /* LM_FRAME_H */
