/*
 * livemig.h — the whole contract between the native core and Python.
 *
 * Rules (see docs/architecture.md):
 *  - every entry point is lm_<object>_<verb>, works on an opaque handle and
 *    returns 0, a count, or -errno; it never prints and never calls back into
 *    Python;
 *  - there are no hidden globals, with one documented exception: the
 *    mprotect tracker's region registry, which its SIGSEGV handler must reach;
 *  - the text between LM_CDEF_BEGIN and LM_CDEF_END is fed verbatim to CFFI's
 *    cdef, so it holds only declarations and integer #defines.
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
#define LM_ABI_VERSION 1
#define LM_PAGE_SIZE 4096

int lm_abi_version(void);

/* ---- guest memory regions (lm_region.c) -------------------------------- */
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

/* ---- dirty trackers (lm_track_uffd.c, lm_track_mprotect.c) ------------- */
/* Declarations of the tracker interface follow this line. */

/* ---- vCPUs: the toy ISA interpreter (lm_vcpu.c) ------------------------- */
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

/* ---- post-copy: userfaultfd MISSING primitives (lm_postcopy.c) --------- */
/* Declarations of the post-copy interface follow this line. */

/* ---- page codec hot loops (lm_pagecodec.c) ----------------------------- */
/* Declarations of the page-codec helpers follow this line. */

/* LM_CDEF_END */

#endif /* LIVEMIG_H */
