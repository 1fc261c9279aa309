/*
 * Internals of the bulk streams shared by their files (not part of the cdef):
 * lm_stream.c (the handle, the thread, attach/detach), lm_stream_io.c (the
 * send's wait, exact reads in), lm_stream_source.c and lm_stream_dest.c (what
 * each side does with them); the thread's plumbing is lm_chan.h's.
 */
#ifndef LM_STREAM_INTERNAL_H
#define LM_STREAM_INTERNAL_H

#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>

#include "livemig.h"
#include "channels/lm_chan.h"
#include "channels/lm_ring.h"
#include "codec/lm_lz4.h"

enum lm_stream_side { LM_STREAM_DEST, LM_STREAM_SOURCE };

/* The source's page-batch bytes before the pages: PageBatch prefix, batch
 * header and a run table with room for one run per page; then the BLOCK
 * section's masks and blocks. */
#define LM_STREAM_TABLE_BYTES                           \
    (LM_WIRE_BATCH_PREFIX_BYTES + LM_BATCH_HEADER_BYTES + \
     LM_STREAM_BATCH_PAGES * LM_BATCH_RUN_BYTES)
#define LM_STREAM_MASK_BYTES (LM_STREAM_BATCH_PAGES * 2)
#define LM_STREAM_BLOCKS_BYTES \
    ((uint64_t)LM_STREAM_BATCH_PAGES * LM_STREAM_BLOCK_MAX_BLOCKS * LM_BLOCK_BYTES)
/* LZ4: at most this many sample runs are compressed to judge a batch (as the
 * Python encoder's probe), and after a probe found LZ4 does not pay, this
 * many batches go without one (pages, not batches, are what a probe costs:
 * 8 runs of one 64-page batch in 32 batches is 1 page in 32 compressed for
 * nothing on incompressible memory). */
#define LM_STREAM_LZ4_PROBE_RUNS 8
#define LM_STREAM_LZ4_SKIP_BATCHES 31
/* Post-copy push, destination: fault latencies waiting for the owner (a full
 * ring drops and counts, as the urgent thread's does). */
#define LM_STREAM_LATENCY_RING 65536

/* A round queued on a source stream: its pages (the owner keeps the array
 * unchanged until the round is acked) and, once sent, what its StreamEnd
 * counted (the ack must repeat the pages). */
struct lm_stream_job {
    const uint64_t *pages;
    uint64_t n;
    uint32_t round;
    uint64_t sent_pages;
    uint64_t sent_bytes;
};

struct lm_stream {
    struct lm_chan ch;          /* the thread, its socket and eventfds */
    enum lm_stream_side side;
    uint8_t *base;
    uint64_t npages;
    uint64_t *hashes;
    uint8_t *held;              /* dest */
    uint64_t zero_hash;         /* page hash of an all-zero page */
    uint64_t *fp;               /* block fingerprints (may be NULL: no BLOCK) */
    uint8_t *fp_valid;
    uint64_t zero_blocks[LM_BLOCKS_PER_PAGE];   /* an all-zero page's block hashes */
    int work_efd;               /* source: a round was queued */
    /* source: the rounds queued by the owner, a ring of LM_STREAM_WINDOW_MAX
     * slots with one producer (the owner) and one consumer (the thread).
     * Slot k % LM_STREAM_WINDOW_MAX holds round k; k < jobs_queued was
     * queued, k < jobs_sent sent whole (StreamEnd out), k < jobs_acked
     * acknowledged (its slot free again). */
    struct lm_stream_job jobs[LM_STREAM_WINDOW_MAX];
    uint32_t window;            /* owner: rounds queued or in flight at most */
    uint64_t jobs_queued;       /* atomic: written by the owner after the slot */
    uint64_t jobs_acked;        /* atomic: written by the thread after the ack */
    uint64_t jobs_sent;         /* the thread's own */
    /* dest: the round being received */
    int round_open;
    uint32_t open_round;
    int64_t last_closed;        /* -1 before the first round */
    uint64_t round_pages;
    uint64_t round_bytes;
    uint8_t *rbuf;              /* header + the largest payload accepted */
    uint8_t *table;             /* source: LM_STREAM_TABLE_BYTES */
    uint8_t *staging;           /* source: LM_STREAM_BATCH_PAGES pages */
    uint8_t *masks;             /* source: the BLOCK section's masks ... */
    uint8_t *blocks;            /* ... and its blocks */
    lm_pace *pace;              /* source: the migration's bandwidth cap, or NULL */
    /* LZ4 (source: compress where it pays; dest: decode). lz4.dl NULL: no
     * liblz4; lz4_chunk_pages 0: the source sends no LZ4 */
    struct lm_lz4 lz4;
    uint32_t lz4_chunk_pages;
    double lz4_max_ratio;       /* compressed / raw at most this to be sent */
    uint64_t link_bytes_per_s;  /* atomic; 0: unknown (judge by ratio alone) */
    uint32_t lz4_skip_batches;
    uint8_t *lz4buf;            /* source: compressed runs; dest: decompressed pages */
    uint64_t lz4buf_bytes;
    /* post-copy push: frames flagged POSTCOPY; dest places through pc and
     * settles the urgent path's outstanding faults (urgent may be NULL) */
    uint16_t batch_flags;
    lm_postcopy *pc;
    lm_urgent *urgent;
    /* pre-copy dest: guest memory registered MISSING (lm_stream_dest_fill):
     * a page's first version lands by UFFDIO_COPY, never zeroed first */
    lm_postcopy *fill;
    struct lm_ring lat_ring;    /* dest push: latencies of faults a push served (ns) */
    lm_stream_stats stats;      /* atomic fields */
};

#define STREAM_ADD(s, f, n) __atomic_fetch_add(&(s)->stats.f, (uint64_t)(n), __ATOMIC_RELAXED)
#define STREAM_SET(s, f, v) __atomic_store_n(&(s)->stats.f, (uint64_t)(v), __ATOMIC_RELAXED)

/* lm_stream.c */
void lm_stream_account_cpu(lm_stream *s);

/* lm_stream_io.c */
/* The wait of lm_chan_send: 1 when stop was asked meanwhile. */
int lm_stream_wait_writable(struct lm_chan *c);
/* Receive the next frame whole into s->rbuf, its header and checksum checked
 * against the expected sequence and one of the two types: 0 and *type_out,
 * *length_out; 1 when stop was asked; 2 on end of stream at a frame boundary;
 * -errno otherwise. */
int lm_stream_receive(lm_stream *s, uint16_t type_a, uint16_t type_b, uint16_t *type_out,
                      uint32_t *length_out);

/* lm_stream_source.c */
/* Send the next queued round whole (its batches, then StreamEnd), taking the
 * acks that arrive meanwhile; 0 or what stopped it. */
int lm_stream_source_send_next(lm_stream *s);
/* Read one StreamAck (of the oldest round in flight) and publish it: 0, 1
 * (stop), or -errno. */
int lm_stream_source_take_ack(lm_stream *s);

/* lm_stream_dest.c */
int lm_stream_dest_on_batch(lm_stream *s, const uint8_t *p, uint32_t length);
int lm_stream_dest_on_end(lm_stream *s, const uint8_t *p, uint32_t length);

#endif /* LM_STREAM_INTERNAL_H */
