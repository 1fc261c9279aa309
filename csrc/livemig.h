/*
 * livemig.h — the whole contract between the native core and Python.
 *
 * Rules (see docs/architecture.md):
 *  - every entry point is lm_<object>_<verb>, works on an opaque handle and
 *    returns 0, a count, or -errno; it never prints and never calls back into
 *    Python;
 *  - there are no hidden globals, with two documented exceptions: the
 *    mprotect tracker's region registry, which its SIGSEGV handler must reach,
 *    and the page hash implementation chosen once at load (codec/lm_pagehash.c);
 *  - the text between LM_CDEF_BEGIN and LM_CDEF_END is fed verbatim to CFFI's
 *    cdef, so it holds only declarations and integer #defines;
 *  - wire numbers (frame and page-batch layout, message ids, encodings) are
 *    never written here or in any C file: "wire/lm_wire_gen.h" is generated
 *    from src/livemig/protocol/spec.py at build time and csrc/build_ffi.py
 *    adds its names (LM_WIRE_*, LM_MSG_*, LM_BATCH_*, LM_ENC_*) to the cdef.
 *
 * LM_ABI_VERSION changes whenever a declaration below changes; the Python
 * side refuses a compiled module whose lm_abi_version() differs from the one
 * it was written for.
 */
#ifndef LIVEMIG_H
#define LIVEMIG_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define LM_API __attribute__((visibility("default")))
#else
#define LM_API
#endif

/* LM_CDEF_BEGIN */
#define LM_ABI_VERSION 19
#define LM_PAGE_SIZE 4096

int lm_abi_version(void);

/* ---- guest memory regions (memory/lm_region.c) -------------------------- */
#define LM_REGION_ANON 0
#define LM_REGION_MEMFD 1      /* back the region with a memfd (shareable) */
#define LM_REGION_HUGEPAGE 2   /* madvise(MADV_HUGEPAGE) on the region */

typedef struct lm_region lm_region;

/* length_bytes must be a positive multiple of LM_PAGE_SIZE. The mapping is
 * 2 MiB aligned; it is reserved lazily (MAP_NORESERVE), so pages cost memory
 * only once touched. */
int lm_region_create(uint64_t length_bytes, int flags, lm_region **out);
void lm_region_destroy(lm_region *r);
uint8_t *lm_region_base(const lm_region *r);
uint64_t lm_region_length(const lm_region *r);
uint64_t lm_region_npages(const lm_region *r);
int lm_region_flags(const lm_region *r);
/* MADV_DONTNEED over [first_page, first_page + npages): the pages read as
 * zero afterwards and give their memory back. */
int lm_region_discard(lm_region *r, uint64_t first_page, uint64_t npages);
/* MADV_POPULATE_WRITE over the pages: fault them in writable without changing
 * their contents (Linux 5.14+; -EINVAL before). Safe while others write them. */
int lm_region_populate(lm_region *r, uint64_t first_page, uint64_t npages);

/* ---- dirty trackers (track/) -------------------------------------------- */
/* Declarations of the tracker interface follow this line. */
#define LM_TRACK_UFFD_ASYNC 1   /* uffd WP_ASYNC + PAGEMAP_SCAN: collect-and-rearm in the kernel */
#define LM_TRACK_UFFD_WP 2      /* synchronous uffd write-protect + a handler thread */
#define LM_TRACK_MPROTECT 3     /* PROT_READ + SIGSEGV handler, any kernel */
#define LM_TRACK_MAX_REGIONS 64 /* capacity of the mprotect tracker's global registry */

typedef struct lm_tracker lm_tracker;

typedef struct {
    uint64_t collects;          /* successful lm_tracker_collect calls */
    uint64_t pages_reported;    /* page indices returned by all collects */
    uint64_t faults;            /* write faults handled (uffd-wp, mprotect; 0 for uffd-async) */
    uint64_t degraded_collects; /* collects that reported conservatively-dirtied pages */
    uint64_t degraded_pages;    /* pages marked dirty without proof of a write */
    uint64_t scan_ioctls;       /* PAGEMAP_SCAN calls (uffd-async) */
    uint64_t protect_calls;     /* re-protect syscalls/ioctls issued by collects */
    uint64_t handler_errors;    /* un-protect failures inside the fault path */
    uint64_t coarse_protects;   /* collects that re-protected the whole region at once */
    uint64_t last_collect_ns;   /* wall time of the latest collect */
    uint64_t arm_ns;            /* wall time of the latest start */
} lm_tracker_stats;

/* 0 when `kind` can run here; else -errno and a NUL-terminated reason. */
int lm_tracker_probe(int kind, char *reason, size_t reason_cap);
int lm_tracker_create(int kind, lm_region *region, lm_tracker **out);
/* Arm every page: from now on each write is recorded. -EBUSY when armed. */
int lm_tracker_start(lm_tracker *t);
/* Ascending page indices written since the previous collect (or start);
 * re-arms them before returning. max_pages must be >= the region's npages
 * (-ENOSPC otherwise: nothing re-armed may go unreported). -EINVAL unless armed. */
int64_t lm_tracker_collect(lm_tracker *t, uint64_t *pages_out, uint64_t max_pages);
/* Disarm: memory fully writable, no further faults. -EINVAL unless armed. */
int lm_tracker_stop(lm_tracker *t);
int lm_tracker_stats_get(const lm_tracker *t, lm_tracker_stats *out);
int lm_tracker_kind(const lm_tracker *t);
/* PAGEMAP_SCAN output vector length in entries (uffd-async only; tests shrink it). */
int lm_tracker_set_scan_vec(lm_tracker *t, uint64_t vec_len);
void lm_tracker_destroy(lm_tracker *t);
/* What UFFDIO_API offers on this kernel. */
int lm_uffd_features(uint64_t *features_out, uint64_t *ioctls_out);
/* 0 when PAGEMAP_SCAN with PM_SCAN_WP_MATCHING works on a WP_ASYNC range. */
int lm_pagemap_scan_probe(void);

/* Test and benchmark drivers (track/lm_track_writer.c): writes issued from C. */
/* Store value ^ page into word 0 of each listed page; count or -ERANGE. */
int64_t lm_region_poke_pages(lm_region *r, const uint64_t *pages, uint64_t n, uint64_t value);
typedef struct lm_writer lm_writer;
/* A pthread storing a running counter into a pseudo-random word of a
 * pseudo-random page of [first_page, first_page + npages) until stopped,
 * recording each page it wrote in a bitmap. pause_ns sleeps between writes (0 = none). */
int lm_writer_start(lm_region *r, uint64_t first_page, uint64_t npages, uint64_t seed,
                    uint64_t pause_ns, lm_writer **out);
/* Stop and join; returns the number of writes made. */
int64_t lm_writer_stop(lm_writer *w);
/* Copy the written-pages bitmap (region npages bits, little-endian words). */
int lm_writer_bitmap(const lm_writer *w, uint64_t *words_out, uint64_t nwords);
void lm_writer_destroy(lm_writer *w);

/* ---- vCPUs: the toy ISA interpreter (vcpu/lm_vcpu.c) -------------------- */
/* Declarations of the vCPU interface follow this line. */
/* Instructions are 8 bytes, little-endian: u8 opcode, u8 rd, u8 ra, u8 rb,
 * i32 imm. 16 general 64-bit registers. Branch and jump targets are byte
 * offsets relative to the branching instruction. Opcode 0 is invalid, so a
 * vCPU that runs into zeroed memory faults instead of spinning. */
#define LM_VCPU_NREGS 16
#define LM_VCPU_CONSOLE_TAIL 4096   /* console bytes kept per vCPU */

#define LM_OP_HALT 1     /* stop: status HALTED */
#define LM_OP_LI 2       /* rd = sext(imm) */
#define LM_OP_LIH 3      /* rd = low32(rd) | imm << 32 */
#define LM_OP_MOV 4      /* rd = ra */
#define LM_OP_ADD 5      /* rd = ra + rb */
#define LM_OP_SUB 6
#define LM_OP_MUL 7
#define LM_OP_AND 8
#define LM_OP_OR 9
#define LM_OP_XOR 10
#define LM_OP_SHL 11     /* rd = ra << (rb & 63) */
#define LM_OP_SHR 12     /* logical */
#define LM_OP_MODU 13    /* rd = ra % rb (unsigned); rb == 0 faults */
#define LM_OP_ADDI 14    /* rd = ra + sext(imm) */
#define LM_OP_MULI 15
#define LM_OP_ANDI 16
#define LM_OP_ORI 17
#define LM_OP_XORI 18
#define LM_OP_SHLI 19    /* rd = ra << (imm & 63) */
#define LM_OP_SHRI 20
#define LM_OP_MODUI 21   /* rd = ra % (u32)imm; imm == 0 faults */
#define LM_OP_LD 22      /* rd = u64 at [ra + imm], 8-byte aligned */
#define LM_OP_ST 23      /* u64 at [ra + imm] = rd */
#define LM_OP_LDB 24     /* rd = u8 at [ra + imm] */
#define LM_OP_STB 25     /* u8 at [ra + imm] = low8(rd) */
#define LM_OP_BEQ 26     /* if ra == rb: pc += imm */
#define LM_OP_BNE 27
#define LM_OP_BLTU 28
#define LM_OP_BGEU 29
#define LM_OP_JMP 30     /* pc += imm */
#define LM_OP_JAL 31     /* rd = pc + 8; pc += imm */
#define LM_OP_JR 32      /* pc = ra */
#define LM_OP_RAND 33    /* rd = splitmix64(state.rng) */
#define LM_OP_OUT 34     /* console <- low8(ra) */
#define LM_OP_CLOCK 35   /* rd = state.clock_base + state.steps (virtual ns) */
#define LM_OP_PSUM 36    /* rd = sum (2i+1) * word[i] over the page holding ra */
#define LM_OP_TICK 37    /* one unit of paced work (timing only) */
#define LM_OP_FAIL 38    /* status FAULTED, fault_code = (u32)imm */
#define LM_OP_NOP 39
#define LM_OP_COUNT 40

#define LM_VCPU_PARKED 1     /* not running; resumable */
#define LM_VCPU_RUNNING 2
#define LM_VCPU_HALTED 3     /* executed HALT */
#define LM_VCPU_FAULTED 4    /* see fault_code / fault_addr */

/* Native fault codes have the top bit set; FAIL imm reports imm itself. */
#define LM_VCPU_FAULT_BAD_OPCODE 0x80000001
#define LM_VCPU_FAULT_BAD_ADDRESS 0x80000002   /* data access outside the region */
#define LM_VCPU_FAULT_BAD_PC 0x80000003        /* pc misaligned or outside the region */
#define LM_VCPU_FAULT_MISALIGNED 0x80000004    /* 64-bit access not 8-byte aligned */
#define LM_VCPU_FAULT_BAD_REGISTER 0x80000005  /* register field >= 16 */
#define LM_VCPU_FAULT_DIVIDE 0x80000006        /* MODU by zero */

typedef struct lm_vcpu lm_vcpu;

typedef struct lm_vcpu_state {
    uint64_t regs[16];
    uint64_t pc;             /* byte address of the next instruction */
    uint64_t steps;          /* retired instructions */
    uint64_t rng;            /* splitmix64 state used by RAND */
    uint64_t clock_base;     /* CLOCK reads clock_base + steps */
    uint64_t console_count;  /* bytes ever written by OUT */
    uint64_t console_hash;   /* FNV-1a 64 over all of them */
    uint64_t fault_addr;
    uint32_t status;         /* LM_VCPU_* (RUNNING is never stored) */
    uint32_t fault_code;
} lm_vcpu_state;

typedef struct lm_vcpu_counters {
    uint64_t steps;   /* published at least every few thousand instructions */
    uint64_t ticks;
    uint64_t stores;
} lm_vcpu_counters;

/* The vCPU thread starts at once and parks; state is zero except
 * console_hash (the FNV offset basis) until lm_vcpu_set_state. The region
 * must outlive the vCPU. */
int lm_vcpu_create(lm_region *region, uint32_t id, lm_vcpu **out);
/* Stops (waits for the thread to park) and joins it. */
void lm_vcpu_destroy(lm_vcpu *v);
int lm_vcpu_resume(lm_vcpu *v);
/* Requests a stop at the next instruction boundary and waits up to
 * timeout_ms for it: 0, or -ETIMEDOUT (the request stays in force). */
int lm_vcpu_pause(lm_vcpu *v, int64_t timeout_ms);
/* 0 once the thread is parked (paused, at its stop step, halted or
 * faulted), -ETIMEDOUT otherwise. */
int lm_vcpu_wait_parked(lm_vcpu *v, int64_t timeout_ms);
/* The vCPU parks itself when steps == step (UINT64_MAX: never). */
int lm_vcpu_set_stop_step(lm_vcpu *v, uint64_t step);
int lm_vcpu_set_throttle(lm_vcpu *v, uint32_t pct);          /* 0..99 */
int lm_vcpu_set_pace(lm_vcpu *v, uint64_t ticks_per_s);       /* 0 = unpaced */
int lm_vcpu_status(const lm_vcpu *v);                         /* LM_VCPU_* */
int lm_vcpu_counters_read(const lm_vcpu *v, lm_vcpu_counters *out);
/* State and console: only while parked, -EBUSY otherwise. */
int lm_vcpu_get_state(lm_vcpu *v, lm_vcpu_state *out);
int lm_vcpu_set_state(lm_vcpu *v, const lm_vcpu_state *in);
/* Copies the last min(count, LM_VCPU_CONSOLE_TAIL, cap) console bytes,
 * oldest first; returns how many. */
int lm_vcpu_console_read(lm_vcpu *v, uint8_t *buf, size_t cap);
int lm_vcpu_console_set(lm_vcpu *v, const uint8_t *buf, size_t length_bytes);
/* The page checksum PSUM computes, for the host side of checks. */
uint64_t lm_vcpu_page_sum(const uint8_t *page);

/* ---- post-copy: userfaultfd MISSING primitives (postcopy/) -------------- */
/* Declarations of the post-copy interface follow this line. */
/* A post-copy handle registers a region with userfaultfd in MISSING mode and
 * places pages into it (UFFDIO_COPY / ZEROPAGE / MOVE), keeping an atomic
 * bitmap of the pages present. Bitmaps are uint64 words, bit (i % 64) of
 * word (i / 64) standing for page i. */
#define LM_POSTCOPY_CAN_MISSING 1   /* lm_postcopy_probe: MISSING + COPY + ZEROPAGE work */
#define LM_POSTCOPY_CAN_MOVE 2      /* lm_postcopy_probe: UFFDIO_MOVE works */
#define LM_POSTCOPY_USER_MODE_ONLY 4 /* fd only catches user-mode faults */
#define LM_POSTCOPY_CLOSE_ABANDON 1 /* close even with pages missing (see lm_postcopy_close) */

typedef struct lm_postcopy lm_postcopy;

typedef struct lm_postcopy_stats {
    uint64_t faults_read;        /* fault messages read from the fd */
    uint64_t faults_returned;    /* distinct missing pages handed to the caller */
    uint64_t faults_on_present;  /* faults on pages already placed (woken, not returned) */
    uint64_t pages_copied;       /* placed by UFFDIO_COPY */
    uint64_t pages_zeroed;       /* placed by UFFDIO_ZEROPAGE */
    uint64_t pages_moved;        /* placed by UFFDIO_MOVE */
    uint64_t eexist_pages;       /* placements that found the page already there */
    uint64_t eagain_retries;     /* ioctls redone after EAGAIN with nothing done (mapping changing) */
    uint64_t partial_runs;       /* runs the kernel cut short (at a present page): remainder redone */
    uint64_t move_src_holes;     /* MOVE source pages that were holes: zero-filled */
    uint64_t move_busy_copies;   /* MOVE source pages shared/pinned (EBUSY): copied */
    uint64_t wakes;              /* explicit UFFDIO_WAKE calls */
    uint64_t ioctls;             /* placement ioctls issued */
    uint64_t pages_invalidated;  /* present pages made absent (lm_postcopy_invalidate) */
    uint64_t discard_calls;      /* madvise / process_madvise calls made for them */
} lm_postcopy_stats;

/* Capability mask (LM_POSTCOPY_CAN_*) of this process on this kernel, found
 * by really registering a scratch mapping; reason gets a one-line
 * explanation of anything missing ("" when all works). */
int lm_postcopy_probe(char *reason, size_t reason_cap);
/* Open userfaultfd (syscall, then /dev/userfaultfd, then user-mode-only),
 * negotiate the API with required_features (raw UFFD_FEATURE_* bits; MOVE is
 * added when the kernel has it) and register the whole region MISSING.
 * -EOPNOTSUPP when the kernel lacks a required feature. */
int lm_postcopy_open(lm_region *r, uint64_t required_features, lm_postcopy **out);
int lm_postcopy_fd(const lm_postcopy *p);
int lm_postcopy_flags(const lm_postcopy *p);   /* LM_POSTCOPY_CAN_MOVE | USER_MODE_ONLY */
/* Read pending fault messages without blocking; write distinct missing page
 * indices (in arrival order) to pages_out; 0 when none are pending. */
int64_t lm_postcopy_read_faults(lm_postcopy *p, uint64_t *pages_out, uint64_t max_pages);
/* Place npages contiguous pages; each returns the pages newly placed by this
 * call (pages found already present count in stats.eexist_pages). */
int64_t lm_postcopy_copy(lm_postcopy *p, uint64_t first_page, const void *src, uint64_t npages);
int64_t lm_postcopy_zero(lm_postcopy *p, uint64_t first_page, uint64_t npages);
/* src must be private anonymous memory of this process, page aligned; its
 * pages are taken (src reads as zero afterwards). -EOPNOTSUPP without MOVE. */
int64_t lm_postcopy_move(lm_postcopy *p, uint64_t first_page, void *src, uint64_t npages);
int lm_postcopy_wake(lm_postcopy *p, uint64_t first_page, uint64_t npages);
/* Record pages valid before registration (pre-copied); returns how many
 * were newly marked. */
int64_t lm_postcopy_mark_present(lm_postcopy *p, const uint64_t *words, uint64_t nwords);
/* MADV_DONTNEED every page not marked present, so that it faults. */
int lm_postcopy_discard_absent(lm_postcopy *p);
/* Make absent every present page whose bit is set in words: discard it
 * (MADV_DONTNEED; runs coalesced and handed to the kernel in batches through
 * process_madvise(2) on this process, or one madvise(2) per run with
 * LM_POSTCOPY_INVALIDATE_MADVISE or where process_madvise is refused), then
 * clear its present bit, so that its next access faults. Only while no thread
 * uses the memory (before the guest resumes): a discarded page loses its
 * contents. Returns the pages made absent. */
#define LM_POSTCOPY_INVALIDATE_MADVISE 1
int64_t lm_postcopy_invalidate(lm_postcopy *p, const uint64_t *words, uint64_t nwords,
                               int flags);
uint64_t lm_postcopy_missing(const lm_postcopy *p);
int lm_postcopy_present_bitmap(const lm_postcopy *p, uint64_t *words, uint64_t nwords);
int lm_postcopy_stats_get(const lm_postcopy *p, lm_postcopy_stats *out);
/* Unregister and close. -EBUSY while pages are missing unless flags has
 * LM_POSTCOPY_CLOSE_ABANDON: unregistering wakes blocked threads and any
 * later access to a missing page then reads zeros. */
int lm_postcopy_close(lm_postcopy *p, int flags);

/* A thread serving every fault on p's region with the zero page
 * (UFFDIO_ZEROPAGE; a write then takes an ordinary copy-on-write fault):
 * while it runs, the region behaves as anonymous memory does, so any access
 * to a page still absent proceeds as it would without userfaultfd
 * (postcopy/lm_zerofill.c). Stop it before p is closed; stop returns the
 * pages served, or the -errno that ended the thread early. */
typedef struct lm_zerofill lm_zerofill;
int lm_zerofill_start(lm_postcopy *p, lm_zerofill **out);
int64_t lm_zerofill_stop(lm_zerofill *z);

/* Test and benchmark helpers (postcopy/lm_faultbench.c): a native thread that touches
 * pages (so faults block it, not Python), and a native fault server that
 * answers faults by copying from a local source buffer. cpu < 0: no pinning. */
typedef struct lm_toucher lm_toucher;
/* pages is copied; the handle keeps values and latencies until joined. */
int lm_toucher_start(const uint8_t *base, const uint64_t *pages, uint64_t npages,
                     uint64_t offset_bytes, int cpu, lm_toucher **out);
uint64_t lm_toucher_done(const lm_toucher *t);   /* touches completed so far */
/* Wait (timeout_ms < 0: forever); on success copy the npages values and
 * latencies out (either may be NULL) and free the handle. -ETIMEDOUT leaves
 * the thread running and the handle valid. */
int lm_toucher_join(lm_toucher *t, int timeout_ms, uint64_t *values_out,
                    uint64_t *latency_ns_out);

typedef struct lm_faultserver lm_faultserver;
int lm_faultserver_start(lm_postcopy *p, const uint8_t *src, int cpu, lm_faultserver **out);
int64_t lm_faultserver_stop(lm_faultserver *s);  /* pages served; frees */

/* ---- page codec hot loops (codec/lm_pagecodec.c) ------------------------ */
/* Declarations of the page-codec helpers follow this line. */
/* Pages are addressed as base + index * LM_PAGE_SIZE; every function checks
 * each index against npages (and each slot against nslots) before touching
 * memory and returns -ERANGE otherwise. indices == NULL means 0 .. n-1. */
#define LM_DELTA_TOO_BIG -1  /* out_lengths[i]: delta larger than allowed */

/* out_zero[i] = 1 when page indices[i] is all zero bytes. Returns the number
 * of zero pages. */
int lm_pages_zero_scan(const uint8_t *base, uint64_t npages, const int64_t *indices,
                       uint64_t n, uint8_t *out_zero);
/* out_hashes[i] = the 64-bit content hash of page indices[i]. */
int lm_pages_hash(const uint8_t *base, uint64_t npages, const int64_t *indices,
                  uint64_t n, uint64_t *out_hashes);
/* For each i: snapshot page indices[i] of base, XOR-delta it against the old
 * version in slab[slots[i]] into out (appended), then store the snapshot in
 * slab[slots[i]]. out_lengths[i] = the delta length, or LM_DELTA_TOO_BIG (no
 * bytes appended) when it would exceed max_page_bytes or the space left in
 * out. Returns the total bytes appended. */
int lm_pages_delta_encode(const uint8_t *base, uint64_t npages, const int64_t *indices,
                          uint8_t *slab, uint64_t nslots, const int64_t *slots, uint64_t n,
                          uint8_t *out, uint64_t out_cap, uint32_t max_page_bytes,
                          int32_t *out_lengths);
/* Apply n concatenated deltas (lengths[i] bytes each, enc_len in total) in
 * place onto n contiguous pages. Returns 0, or -EINVAL for a malformed delta
 * (the pages may then hold partial results and must be discarded). */
int lm_pages_delta_apply(uint8_t *pages, uint64_t n, const uint8_t *enc, uint64_t enc_len,
                         const uint16_t *lengths);

/* ---- block fingerprints (codec/lm_blockdelta.c) ------------------------- */
/* A page is 16 blocks of 256 bytes; the source keeps one 64-bit hash per
 * block of what the receiver holds (fp: fp_npages x LM_BLOCKS_PER_PAGE) and
 * re-sends only the blocks that changed. rows == NULL means 0 .. n-1; every
 * row is checked against its table before use (-ERANGE). */
#define LM_BLOCK_BYTES 256
#define LM_BLOCKS_PER_PAGE 16

/* For each i: hash page rows[i] of base (its 16 block hashes and the page
 * hash, out_hashes[i], equal to lm_pages_hash's), first copying the page to
 * out_pages + i * LM_PAGE_SIZE and hashing the copy when out_pages is not NULL
 * (a snapshot of a running guest's pages and its fingerprint in one pass);
 * out_changed[i] = mask of blocks whose hash differs from fp[fp_rows[i]] (all
 * 16 when fp_valid is NULL or fp_valid[fp_rows[i]] == 0); then store the new
 * hashes in fp. */
int lm_pages_snapshot_fingerprint(const uint8_t *base, uint64_t npages, const int64_t *rows,
                                  uint64_t n, uint8_t *out_pages, uint64_t *fp,
                                  uint64_t fp_npages, const int64_t *fp_rows,
                                  const uint8_t *fp_valid, uint16_t *out_changed,
                                  uint64_t *out_hashes);
/* Store the fingerprint of one page's content (e.g. the zero page) at fp_rows. */
int lm_pages_set_fingerprint(uint64_t *fp, uint64_t fp_npages, const int64_t *fp_rows,
                             uint64_t n, const uint8_t *page);
/* Copy the blocks masks[i] names of page rows[i] to out + out_offsets[i], in
 * block order. Returns the bytes written, -ENOSPC past out_cap. */
int64_t lm_pages_gather_blocks(const uint8_t *base, uint64_t npages, const int64_t *rows,
                               const uint16_t *masks, const int64_t *out_offsets,
                               uint64_t n, uint8_t *out, uint64_t out_cap);
/* Receiver: copy n contiguous pages from src to pages rows[i] of base, store
 * each landed page's block hashes in fp[rows[i]] (fp_valid[rows[i]] = 1) and
 * its page hash in out_hashes[i]. */
int lm_pages_place_fingerprint(uint8_t *base, uint64_t npages, const int64_t *rows,
                               uint64_t n, const uint8_t *src, uint64_t *fp,
                               uint8_t *fp_valid, uint64_t *out_hashes);
/* Receiver: write the concatenated blocks in data over pages rows[i] as
 * masks[i] says, then rehash only the written blocks of each page (all of a
 * page whose fp row is not valid yet) and give its page hash. -EINVAL, and
 * nothing written, unless data_len is exactly what the masks need. */
int lm_pages_apply_blocks_fingerprint(uint8_t *base, uint64_t npages, const int64_t *rows,
                                      const uint16_t *masks, uint64_t n, const uint8_t *data,
                                      uint64_t data_len, uint64_t *fp, uint8_t *fp_valid,
                                      uint64_t *out_hashes);

/* ---- page hash implementations (codec/lm_pagehash.c) -------------------- */
/* Every page and block hash above (and the streams' digests) has one value,
 * the scalar definition's; how it is computed is chosen once at load: the
 * AVX-512 form where the CPU has AVX-512 F, DQ and VL, unless the
 * environment says LIVEMIG_PAGEHASH=scalar. */
#define LM_PAGEHASH_SCALAR 0
#define LM_PAGEHASH_AVX512 1
/* The implementation this process uses (LM_PAGEHASH_*). */
int lm_pagehash_impl(void);
/* 1 when impl can run on this CPU. */
int lm_pagehash_available(int impl);
/* Hash one page with impl: its 16 block hashes and page hash; -ENOSYS when
 * impl cannot run here. */
int lm_pagehash_page(int impl, const uint8_t *page, uint64_t *blocks_out, uint64_t *hash_out);
/* Page hashes of npages contiguous pages with impl: npages, or -ENOSYS. */
int64_t lm_pagehash_pages(int impl, const uint8_t *base, uint64_t npages, uint64_t *hashes_out);

/* ---- native urgent fault channel (channels/) ---------------------------- */
/* Declarations of the urgent-channel threads follow this line. */
/* After the urgent channel's handshake, its socket (a dup) is handed to a
 * native thread: on the destination it reads uffd faults, sends PageRequest
 * frames and places the PageBatch(URGENT) replies; on the source it answers
 * PageRequests straight from (frozen) guest memory. Frames are the wire
 * format of src/livemig/protocol/wire.py; the checksum is xxh3-64 from the
 * system's libxxhash, loaded at run time. A handle outlives connections:
 * lm_urgent_attach starts a thread on one socket, lm_urgent_detach stops it;
 * the destination's outstanding requests survive and are sent again on the
 * next attach. */
#define LM_URGENT_REQUEST_PAGES 1024   /* most pages one sent PageRequest names */
#define LM_URGENT_MAX_PAGES_IN 65536   /* most pages one received PageRequest may name */
#define LM_URGENT_REPLY_RUNS 256       /* most runs in one sent reply batch */
#define LM_URGENT_RING 65536           /* entries of the latency and request rings */
#define LM_URGENT_IDLE 0               /* lm_urgent_status: no thread attached */
#define LM_URGENT_RUNNING 1
#define LM_URGENT_STOPPED 2            /* thread ended by lm_urgent_detach's request */

typedef struct lm_urgent lm_urgent;

typedef struct lm_urgent_stats {
    uint64_t frames_sent;
    uint64_t frames_received;
    uint64_t bytes_sent;          /* header + payload */
    uint64_t bytes_received;
    uint64_t requests;            /* PageRequests sent (dest) / answered (source) */
    uint64_t pages_requested;     /* pages they named */
    uint64_t pages_resent;        /* dest: outstanding pages asked again after an attach */
    uint64_t replies;             /* reply batches received (dest) / sent (source) */
    uint64_t pages_replied;       /* pages those batches carried */
    uint64_t payload_bytes_replied; /* their page-batch bytes (PageBatch payload minus its prefix) */
    uint64_t pages_placed;        /* dest: pages newly placed by the thread */
    uint64_t faults_read;         /* dest: distinct missing pages read from the uffd */
    uint64_t faults_served;       /* dest: faults whose page the thread saw placed */
    uint64_t latency_sum_ns;      /* dest: over faults_served, fault read -> placed */
    uint64_t latency_max_ns;
    uint64_t blocked_ns;          /* dest: sum of those latencies (see docs/postcopy.md) */
    uint64_t latencies_dropped;   /* dest: latencies lost to a full ring */
    uint64_t requests_dropped;    /* source: requested indices lost to a full ring */
    uint64_t attaches;
    uint64_t spin_polls;          /* zero-timeout polls made while spinning */
    uint64_t rt_priority;         /* SCHED_FIFO priority the thread runs at (0: normal) */
    uint64_t rt_errno;            /* why it was refused (EPERM...), 0 if not */
} lm_urgent_stats;

/* 0 when the native urgent path can run (libxxhash loads and agrees with a
 * known xxh3-64 value); else -errno and a reason. */
int lm_urgent_probe(char *reason, size_t reason_cap);
/* Destination: faults of p are read and answered by the thread; hashes (npages
 * entries, may be NULL) receive the content hash of every page it places. */
int lm_urgent_dest_create(lm_postcopy *p, uint64_t *hashes, lm_urgent **out);
/* Source: requests are answered from base[0 .. npages) (must stay unchanged
 * while attached); hashes (may be NULL) receive the hash of each page sent;
 * round goes into every reply's PageBatch.round. */
int lm_urgent_source_create(const uint8_t *base, uint64_t npages, uint64_t *hashes,
                            uint32_t round, lm_urgent **out);
/* Run the thread (from the next attach) at SCHED_FIFO rt_priority (1..99;
 * 0 = normal scheduling). A refusal by the kernel shows in the stats. */
int lm_urgent_set_priority(lm_urgent *u, int rt_priority);
/* Start the thread on sock_fd (ownership passes, even on failure), whose
 * next frame to send has sequence send_seq and next to receive recv_seq.
 * cpu >= 0 pins the thread; spin_us > 0 polls without sleeping that long
 * after each activity before blocking. -EBUSY when attached. */
int lm_urgent_attach(lm_urgent *u, int sock_fd, uint32_t wire_version, uint64_t send_seq,
                     uint64_t recv_seq, uint64_t max_payload_bytes, int cpu, uint32_t spin_us);
/* Stop (via an eventfd) and join the thread, shut down and close the socket.
 * Returns what the thread ended with: 0, or the -errno that stopped it. */
int lm_urgent_detach(lm_urgent *u);
/* An eventfd that becomes readable when the thread has news for the owner:
 * it ended, requested pages or latencies wait in a ring, or (dest) no page is
 * missing any more. Read 8 bytes to clear. */
int lm_urgent_notify_fd(const lm_urgent *u);
/* LM_URGENT_IDLE / RUNNING / STOPPED, or the -errno the thread failed with
 * (then reason holds a one-line explanation). */
int lm_urgent_status(const lm_urgent *u, char *reason, size_t reason_cap);
/* Take up to max queued entries: fault latencies in ns (dest), requested page
 * indices in arrival order (source). Returns the count. */
int64_t lm_urgent_latencies_drain(lm_urgent *u, uint64_t *ns_out, uint64_t max);
int64_t lm_urgent_requests_drain(lm_urgent *u, uint64_t *pages_out, uint64_t max);
/* Dest, called by the owner after it placed pages itself (pushed batches):
 * every listed page a fault waited for is settled, its latency (fault read
 * -> now) written to latency_ns_out (room for n). Returns how many. */
int64_t lm_urgent_dest_settle(lm_urgent *u, const int64_t *pages, uint64_t n,
                              uint64_t *latency_ns_out);
/* Dest: pages with a request in flight (asked, not yet seen placed). */
uint64_t lm_urgent_outstanding(const lm_urgent *u);
int lm_urgent_stats_get(const lm_urgent *u, lm_urgent_stats *out);
/* Detaches if needed, then frees. */
void lm_urgent_destroy(lm_urgent *u);

/* ---- native bulk streams (channels/lm_stream*.c) ------------------------ */
/* Declarations of the bulk-stream threads follow this line. */
/* Pre-copy pages travel on N bulk channels (wire version 2), each handshaked
 * in Python and then handed (a dup of its socket) to a thread here, on both
 * sides. The owner hands the source thread one round's page indices at a
 * time; the thread sends them as PageBatch frames (ZERO and RAW runs of the
 * page-batch format, LZ4 runs where compression pays, and BLOCK runs given
 * the block fingerprints of codec/lm_blockdelta.c on both sides), ends its
 * part of the round with StreamEnd; the destination thread's StreamAck closes it. A
 * source may have up to its window of rounds queued or in flight (1, stop-and-wait,
 * unless lm_stream_source_window says more): it sends the next round without
 * waiting for the previous one's ack and takes acks as they come. The
 * destination thread checks every frame and batch, places the pages and
 * answers each StreamEnd once all of that round's pages are in place. Both
 * threads record the per-page hash of what they sent or placed in the
 * owner's hash array (the digest's input).
 * The owner learns of news (a round closed, the thread ended) through an
 * eventfd it watches with its event loop. */
#define LM_STREAM_BATCH_PAGES 64          /* most pages in one sent PageBatch (256 KiB: in L2) */
#define LM_STREAM_MAX_FRAME 4194304       /* largest payload a stream thread accepts (4 MiB) */
#define LM_STREAM_WINDOW_MAX 8            /* most rounds a source stream keeps in flight */
#define LM_STREAM_BLOCK_MAX_BLOCKS 12     /* more changed blocks than this: the page goes RAW */
#define LM_STREAM_IDLE 0                  /* lm_stream_status: no thread attached */
#define LM_STREAM_RUNNING 1
#define LM_STREAM_STOPPED 2               /* ended by detach, or (dest) the source closed */

typedef struct lm_stream lm_stream;

typedef struct lm_stream_stats {
    uint64_t frames_sent;
    uint64_t frames_received;
    uint64_t bytes_sent;          /* header + payload */
    uint64_t bytes_received;
    uint64_t batches;             /* PageBatch frames sent (source) / placed (dest) */
    uint64_t pages;               /* pages sent / placed */
    uint64_t zero_pages;          /* of which ZERO */
    uint64_t raw_pages;           /* of which RAW */
    uint64_t block_pages;         /* of which BLOCK */
    uint64_t block_bytes;         /* their masks and blocks */
    uint64_t batch_bytes;         /* page-batch bytes (PageBatch payloads minus their prefix) */
    uint64_t rounds;              /* rounds closed: acked (source) / marked and acked (dest) */
    uint64_t last_round;          /* the latest closed round (valid when rounds > 0) */
    uint64_t last_round_pages;    /* its pages on this stream */
    uint64_t last_round_bytes;    /* its page-batch bytes on this stream */
    uint64_t cpu_ns;              /* the thread's CPU time (CLOCK_THREAD_CPUTIME_ID) */
    uint64_t lz4_pages;           /* pages sent / placed as LZ4 */
    uint64_t lz4_bytes;           /* their compressed bytes */
    uint64_t lz4_probes;          /* source: batches whose sample runs were compressed */
    uint64_t latencies_dropped;   /* dest push: fault latencies the full ring dropped */
    uint64_t in_flight_max;       /* source: most rounds sent whole and not yet acked at once */
    uint64_t ack_wait_ns;         /* source: time blocked with rounds in flight and none to send */
} lm_stream_stats;

/* 0 when native streams can run here (libxxhash loads and agrees with a known
 * XXH3-64 value); else -errno and a reason. */
int lm_stream_probe(char *reason, size_t reason_cap);
/* Source: pages are read from base[0 .. npages) while the guest may run
 * (each page is copied before it is hashed and checksummed); hashes (npages
 * entries, may be NULL) receive the hash of each page as sent. fp and
 * fp_valid (npages x LM_BLOCKS_PER_PAGE and npages entries, both or neither
 * NULL) are the block fingerprints of what the receiver holds: with them, a
 * page sent before whose changed blocks are at most LM_STREAM_BLOCK_MAX_BLOCKS
 * goes as a BLOCK page, and every page sent updates them. */
int lm_stream_source_create(const uint8_t *base, uint64_t npages, uint64_t *hashes,
                            uint64_t *fp, uint8_t *fp_valid, lm_stream **out);
/* Destination: pages land in base[0 .. npages); hashes (may be NULL) receive
 * the hash of each page as placed and held[page] (may be NULL) is set to 1;
 * fp and fp_valid (both or neither NULL) keep the block hashes of what is
 * held. Without them BLOCK runs are refused. */
int lm_stream_dest_create(uint8_t *base, uint64_t npages, uint64_t *hashes, uint8_t *held,
                          uint64_t *fp, uint8_t *fp_valid, lm_stream **out);
/* Destination, before attach: guest memory is registered with fill (an
 * lm_postcopy over base, MISSING mode, fresh memory). A RAW or LZ4 page not
 * yet present lands by UFFDIO_COPY, which allocates without zeroing (a
 * plain first write pays the kernel's zeroing of the page first); a present
 * page is overwritten as before, and a ZERO page that is absent stays so. An
 * access by anyone else to a page still absent is fill's owner's to serve
 * (lm_zerofill_start). fill must outlive the thread. -EBUSY when attached,
 * -EINVAL for a source or post-copy stream or a fill of another size. */
int lm_stream_dest_fill(lm_stream *s, lm_postcopy *fill);
/* Destination, post-copy push (docs/postcopy.md): pages land through p
 * (UFFDIO_COPY / ZEROPAGE, which wake any vCPU blocked on them; a page
 * already placed by the urgent path is skipped, EEXIST); hashes (may be
 * NULL) receive each page's hash before it is placed; with urgent (the
 * destination's lm_urgent over the same p, or NULL) a fault outstanding on a
 * pushed page is settled (counted once, as served by the push). base and
 * npages are p's region. Accepts PageBatch flagged POSTCOPY, ZERO and RAW
 * runs only. p and urgent must outlive the thread. */
int lm_stream_dest_postcopy_create(uint8_t *base, uint64_t npages, uint64_t *hashes,
                                   lm_postcopy *p, lm_urgent *urgent, lm_stream **out);
/* Destination push: latencies (ns, fault read -> placed by a push) of the
 * faults this thread's placements served since the last call; returns how
 * many (0 for any other stream). */
int64_t lm_stream_latencies_drain(lm_stream *s, uint64_t *ns_out, uint64_t max);
/* Source, before attach: flag every PageBatch POSTCOPY (the push after the
 * switchover) and send no LZ4; with no fingerprints there is no BLOCK either,
 * so the batches are ZERO and RAW only. -EBUSY when attached. */
int lm_stream_source_postcopy(lm_stream *s);
/* Source, before attach: send runs of RAW pages (cut at chunk_pages) as LZ4
 * where that saves at least min_saving_pct of their bytes, judged per batch
 * as the Python encoder does (docs/codec.md). 0, -ENOSYS without liblz4
 * (reason says why), -EBUSY when attached, -EINVAL for a bad argument. */
int lm_stream_source_lz4(lm_stream *s, uint32_t chunk_pages, double min_saving_pct,
                         char *reason, size_t reason_cap);
/* Source, from the owner at any time: queue up to rounds (1 ..
 * LM_STREAM_WINDOW_MAX) rounds at once; the thread sends each without
 * waiting for the previous one's ack. 1 (the default) is stop-and-wait.
 * -EINVAL for another value. */
int lm_stream_source_window(lm_stream *s, uint32_t rounds);
/* Source, at any time: the link's measured bandwidth (0: unknown). Known,
 * LZ4 must also save more sending time than 1.5x its probe's CPU time. */
void lm_stream_source_link(lm_stream *s, uint64_t link_bytes_per_s);
/* Start the thread on sock_fd (ownership passes, even on failure), whose
 * next frame to send has sequence send_seq and next to receive recv_seq;
 * received payloads above min(max_payload_bytes, LM_STREAM_MAX_FRAME) are
 * refused. -EBUSY when attached. */
int lm_stream_attach(lm_stream *s, int sock_fd, uint32_t wire_version, uint64_t send_seq,
                     uint64_t recv_seq, uint64_t max_payload_bytes);
/* Source: send pages[0 .. n) (ascending page indices; the array must stay
 * unchanged until the round is acked) as this stream's part of round, then
 * StreamEnd; the StreamAck closes it (stats: rounds, last_round*). Rounds
 * queued go out in order and must ascend. Returns at once: 0, -EBUSY while
 * the window's rounds are queued or in flight, -EINVAL when not attached or
 * not a source, -ERANGE for an index outside memory (nothing queued). */
int lm_stream_send_round(lm_stream *s, uint32_t round, const uint64_t *pages, uint64_t n);
/* Stop (via an eventfd) and join the thread, shut down and close the socket.
 * Returns what the thread ended with: 0, or the -errno that stopped it. */
int lm_stream_detach(lm_stream *s);
/* Readable when the thread has news: a round closed, or it ended. Read 8
 * bytes to clear. */
int lm_stream_notify_fd(const lm_stream *s);
/* LM_STREAM_IDLE / RUNNING / STOPPED, or the -errno the thread failed with
 * (then reason holds a one-line explanation). */
int lm_stream_status(const lm_stream *s, char *reason, size_t reason_cap);
int lm_stream_stats_get(const lm_stream *s, lm_stream_stats *out);
/* Detaches if needed, then frees. */
void lm_stream_destroy(lm_stream *s);

/* ---- bandwidth cap of the bulk streams (channels/lm_pace.c) ------------- */
/* One token bucket shared by every source stream thread of a migration:
 * before each PageBatch a thread waits until the balance is not negative,
 * then takes the frame's bytes (header + payload). Settable at any time from
 * any thread; a change applies within LM_PACE_SLICE_MS (20 ms). */
typedef struct lm_pace lm_pace;

typedef struct lm_pace_stats {
    uint64_t bytes;               /* frame bytes taken */
    uint64_t waits;               /* frames that had to wait for tokens */
    uint64_t waited_ns;           /* their time waiting */
} lm_pace_stats;

/* A new pace, unlimited. */
int lm_pace_create(lm_pace **out);
/* Cap at rate_bytes_per_s with a bucket of burst_bytes; rate 0 lifts the
 * cap. -EINVAL for a negative or non-finite rate or a zero burst. */
int lm_pace_set(lm_pace *p, double rate_bytes_per_s, uint64_t burst_bytes);
int lm_pace_stats_get(const lm_pace *p, lm_pace_stats *out);
/* The caller destroys it only after every stream using it is detached. */
void lm_pace_destroy(lm_pace *p);
/* Source: pace this stream's frames with p (NULL: none); before attach
 * only (-EBUSY after), p must outlive the thread. */
int lm_stream_set_pace(lm_stream *s, lm_pace *p);

/* ---- mutual TLS on the bulk streams (channels/lm_tls.c) ------------------ */
/* A stream under TLS is a TCP connection the owner made (source) or accepted
 * (destination) whose TLS 1.3 handshake runs here (OpenSSL), both sides
 * verifying the peer against the CA; the owner then speaks the stream's
 * Hello and Welcome through lm_tls_write/lm_tls_read and hands the
 * connection to a stream thread, which sends and receives its frames
 * through it. The blocking calls wait at most timeout_ms (or until
 * lm_tls_cancel) and are meant for a thread other than the event loop's. */
typedef struct lm_tls_ctx lm_tls_ctx;
typedef struct lm_tls lm_tls;

/* 0 when TLS streams can run here (built with OpenSSL 1.1.1 or later);
 * else -ENOSYS and a reason. */
int lm_tls_probe(char *reason, size_t reason_cap);
/* The certificate (chain), key and CA files of one side (server 1: accepts,
 * 0: connects): 0, or -errno with a reason naming what did not load. */
int lm_tls_ctx_create(int server, const char *cert_path, const char *key_path,
                      const char *ca_path, lm_tls_ctx **out, char *reason, size_t reason_cap);
/* Connections made from it keep what they need. */
void lm_tls_ctx_destroy(lm_tls_ctx *x);
/* Handshake on the connected sock_fd (ownership passes, even on failure):
 * 0, -ETIMEDOUT, -ECANCELED, -EACCES (the peer's certificate was refused),
 * -ECONNRESET (the peer went away), -EPROTO (anything else: a peer that is
 * not TLS, a TLS version or suite not shared, our certificate refused),
 * each with a reason. */
int lm_tls_handshake(lm_tls_ctx *x, int sock_fd, int timeout_ms, lm_tls **out, char *reason,
                     size_t reason_cap);
/* Write all of buf / read exactly n bytes into buf: 0 or -errno (reason). */
int lm_tls_write(lm_tls *t, const uint8_t *buf, size_t n, int timeout_ms, char *reason,
                 size_t reason_cap);
int lm_tls_read(lm_tls *t, uint8_t *buf, size_t n, int timeout_ms, char *reason,
                size_t reason_cap);
/* The peer certificate's DER bytes: their length (written to der_out when
 * it fits cap), or -ENOENT. */
int64_t lm_tls_peer_cert(const lm_tls *t, uint8_t *der_out, size_t cap);
/* "TLSv1.3 TLS_AES_128_GCM_SHA256": the version and suite agreed. */
int lm_tls_describe(const lm_tls *t, char *out, size_t cap);
/* Make a blocking call on t (in another thread) return -ECANCELED now. */
void lm_tls_cancel(lm_tls *t);
/* Free t and close its socket (one not handed to a stream). */
void lm_tls_destroy(lm_tls *t);
/* lm_stream_attach over t's connection (ownership of t passes, even on
 * failure): the thread's frames go through TLS. */
int lm_stream_attach_tls(lm_stream *s, lm_tls *t, uint32_t wire_version, uint64_t send_seq,
                         uint64_t recv_seq, uint64_t max_payload_bytes);

/* LM_CDEF_END */

#endif /* LIVEMIG_H */
