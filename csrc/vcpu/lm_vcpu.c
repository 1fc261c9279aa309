/*
 * vCPUs: one pthread per vCPU interpreting the toy ISA out of guest memory.
 *
 * Theory of operation
 *  - Every instruction is fetched from the region on every step, so dirty
 *    tracking and post-copy faults see the guest's real accesses (code pages
 *    included). Guest addresses are byte offsets into the region; anything
 *    outside it, a misaligned pc or 64-bit access, a register field >= 16 or
 *    an unknown opcode stops the vCPU with status FAULTED and a code — the
 *    host never dereferences an unchecked guest address.
 *  - Determinism: guest-visible results depend only on retired
 *    instructions. RAND is splitmix64 over a state-struct field, CLOCK is a
 *    function of the step counter, TICK only lets the runtime sleep.
 *  - The interpreter runs in slices of at most LM_SLICE_STEPS instructions
 *    with registers in a local array (guest stores through a uint64_t
 *    pointer could otherwise alias the register file and force reloads).
 *    Between slices it reads the relaxed atomic stop_req, the stop step,
 *    the throttle and the pace: a pause is noticed within one slice (a few
 *    microseconds; a PSUM, which reads a whole page, counts as many steps
 *    towards the slice), and the stop step bounds the slice, so a vCPU parks
 *    with steps exactly equal to it.
 *  - Ownership of `st` and the console tail: the thread while running, the
 *    host while the thread is parked. `parked` is only changed under `lock`,
 *    and the host checks it under `lock` before touching the state (-EBUSY
 *    otherwise); the mutex orders the thread's last writes before the host's
 *    reads.
 *  - Throttle and pacing sleeps are condition-variable waits on cv_cmd with
 *    a CLOCK_MONOTONIC deadline, so a pause interrupts them at once.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "livemig.h"

#define LM_SLICE_STEPS 1024u
#define LM_PSUM_SLICE_COST 64u   /* a PSUM reads 4 KiB: it uses up this many steps of a slice */
#define LM_THROTTLE_PERIOD_NS 10000000ull /* run + sleep cycle of the throttle */
#define LM_PACE_BURST_NS 1000000ull       /* work allowed ahead of schedule */
#define LM_PACE_RESYNC_NS 50000000ull     /* further behind than this: forget the debt */
#define LM_FNV_BASIS 0xcbf29ce484222325ull
#define LM_FNV_PRIME 0x100000001b3ull

struct lm_vcpu {
    uint8_t *mem;
    uint64_t length;
    uint32_t id;

    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cv_cmd;    /* host -> thread: run, pause, quit */
    pthread_cond_t cv_parked; /* thread -> host: parked */
    int want_run;             /* under lock */
    int quit;                 /* under lock */
    int parked;               /* under lock */

    atomic_int stop_req;
    atomic_uint_fast64_t stop_step;
    atomic_uint throttle_pct;
    atomic_uint_fast64_t pace_tps;
    atomic_int status;
    atomic_uint_fast64_t c_steps, c_ticks, c_stores;

    /* owned by the thread while running, by the host while parked */
    lm_vcpu_state st;
    uint64_t ticks, stores;
    uint8_t tail[LM_VCPU_CONSOLE_TAIL];
    uint32_t tail_len, tail_pos;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static struct timespec to_timespec(uint64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ull),
                          .tv_nsec = (long)(ns % 1000000000ull)};
    return ts;
}

LM_API uint64_t lm_vcpu_page_sum(const uint8_t *page)
{
    /* sum (2i+1) w[i] mod 2^64. Odd weights are invertible mod 2^64, so
     * changing any one word always changes the sum; the weights make word
     * swaps visible too. ~0.3 us per page here, about the speed at which a
     * page arrives from DRAM, so cleverer forms (suffix sums, lanes) were
     * measured and did not pay. */
    const uint64_t *w = (const uint64_t *)page;
    uint64_t t = 0;
    for (uint64_t i = 0; i < LM_PAGE_SIZE / 8; i++)
        t += (2 * i + 1) * w[i];
    return t;
}

static inline uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

enum slice_end { END_LIMIT, END_TICKS, END_HALT, END_FAULT };

/*
 * Runs until steps == step_limit, ticks == tick_limit (after a TICK), HALT
 * or a fault. The hot loop: keep it free of calls and shared-memory atomics.
 * Dispatch is threaded (GNU computed goto): every handler ends in its own
 * indirect jump, which predicts better than one shared switch jump, and the
 * 256-entry table needs no bounds check (unknown opcodes go to op_bad).
 */
static enum slice_end interp(lm_vcpu *v, uint64_t step_limit, uint64_t tick_limit)
{
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Woverride-init"
    static const void *const table[256] = {
        [0 ... 255] = &&op_bad,
        [LM_OP_HALT] = &&op_halt, [LM_OP_LI] = &&op_li, [LM_OP_LIH] = &&op_lih,
        [LM_OP_MOV] = &&op_mov, [LM_OP_ADD] = &&op_add, [LM_OP_SUB] = &&op_sub,
        [LM_OP_MUL] = &&op_mul, [LM_OP_AND] = &&op_and, [LM_OP_OR] = &&op_or,
        [LM_OP_XOR] = &&op_xor, [LM_OP_SHL] = &&op_shl, [LM_OP_SHR] = &&op_shr,
        [LM_OP_MODU] = &&op_modu, [LM_OP_ADDI] = &&op_addi, [LM_OP_MULI] = &&op_muli,
        [LM_OP_ANDI] = &&op_andi, [LM_OP_ORI] = &&op_ori, [LM_OP_XORI] = &&op_xori,
        [LM_OP_SHLI] = &&op_shli, [LM_OP_SHRI] = &&op_shri, [LM_OP_MODUI] = &&op_modui,
        [LM_OP_LD] = &&op_ld, [LM_OP_ST] = &&op_st, [LM_OP_LDB] = &&op_ldb,
        [LM_OP_STB] = &&op_stb, [LM_OP_BEQ] = &&op_beq, [LM_OP_BNE] = &&op_bne,
        [LM_OP_BLTU] = &&op_bltu, [LM_OP_BGEU] = &&op_bgeu, [LM_OP_JMP] = &&op_jmp,
        [LM_OP_JAL] = &&op_jal, [LM_OP_JR] = &&op_jr, [LM_OP_RAND] = &&op_rand,
        [LM_OP_OUT] = &&op_out, [LM_OP_CLOCK] = &&op_clock, [LM_OP_PSUM] = &&op_psum,
        [LM_OP_TICK] = &&op_tick, [LM_OP_FAIL] = &&op_fail, [LM_OP_NOP] = &&op_nop,
    };
#pragma GCC diagnostic pop
    uint8_t *const mem = v->mem;
    const uint64_t len = v->length;
    uint64_t r[LM_VCPU_NREGS];
    memcpy(r, v->st.regs, sizeof(r));
    uint64_t pc = v->st.pc, steps = v->st.steps, ticks = v->ticks, stores = v->stores;
    uint64_t rng = v->st.rng;
    enum slice_end end = END_LIMIT;
    uint32_t fcode = 0;
    uint64_t faddr = 0, w, ea;
    unsigned rd, ra, rb;
    int32_t imm;

#define FAULT(code, addr) do { fcode = (code); faddr = (addr); goto fault; } while (0)
#define DISPATCH()                                                            \
    do {                                                                      \
        if (steps >= step_limit)                                              \
            goto out;                                                         \
        if ((pc & 7) || pc > len - 8)                                         \
            FAULT(LM_VCPU_FAULT_BAD_PC, pc);                                  \
        memcpy(&w, mem + pc, 8);                                              \
        if ((w >> 8) & 0xf0f0f0u)                                             \
            FAULT(LM_VCPU_FAULT_BAD_REGISTER, pc);                            \
        rd = (unsigned)(w >> 8) & 0xf;                                        \
        ra = (unsigned)(w >> 16) & 0xf;                                       \
        rb = (unsigned)(w >> 24) & 0xf;                                       \
        imm = (int32_t)(uint32_t)(w >> 32);                                   \
        goto *table[w & 0xff];                                                \
    } while (0)
#define NEXT() do { pc += 8; steps++; DISPATCH(); } while (0)
#define JUMP_IF(cond) do { pc += (cond) ? (uint64_t)(int64_t)imm : 8; steps++; DISPATCH(); } while (0)
#define SIMM ((uint64_t)(int64_t)imm)
#define EA(size, align)                                                       \
    do {                                                                      \
        ea = r[ra] + SIMM;                                                    \
        if (ea > len - (size))                                                \
            FAULT(LM_VCPU_FAULT_BAD_ADDRESS, ea);                             \
        if ((align) && (ea & ((size) - 1)))                                   \
            FAULT(LM_VCPU_FAULT_MISALIGNED, ea);                              \
    } while (0)

    DISPATCH();
op_halt:
    steps++;
    end = END_HALT;
    goto out;
op_li: r[rd] = SIMM; NEXT();
op_lih: r[rd] = (r[rd] & 0xffffffffull) | ((uint64_t)(uint32_t)imm << 32); NEXT();
op_mov: r[rd] = r[ra]; NEXT();
op_add: r[rd] = r[ra] + r[rb]; NEXT();
op_sub: r[rd] = r[ra] - r[rb]; NEXT();
op_mul: r[rd] = r[ra] * r[rb]; NEXT();
op_and: r[rd] = r[ra] & r[rb]; NEXT();
op_or: r[rd] = r[ra] | r[rb]; NEXT();
op_xor: r[rd] = r[ra] ^ r[rb]; NEXT();
op_shl: r[rd] = r[ra] << (r[rb] & 63); NEXT();
op_shr: r[rd] = r[ra] >> (r[rb] & 63); NEXT();
op_modu:
    if (r[rb] == 0)
        FAULT(LM_VCPU_FAULT_DIVIDE, pc);
    r[rd] = r[ra] % r[rb];
    NEXT();
op_addi: r[rd] = r[ra] + SIMM; NEXT();
op_muli: r[rd] = r[ra] * SIMM; NEXT();
op_andi: r[rd] = r[ra] & SIMM; NEXT();
op_ori: r[rd] = r[ra] | SIMM; NEXT();
op_xori: r[rd] = r[ra] ^ SIMM; NEXT();
op_shli: r[rd] = r[ra] << (imm & 63); NEXT();
op_shri: r[rd] = r[ra] >> (imm & 63); NEXT();
op_modui:
    if ((uint32_t)imm == 0)
        FAULT(LM_VCPU_FAULT_DIVIDE, pc);
    r[rd] = r[ra] % (uint32_t)imm;
    NEXT();
op_ld: EA(8, 1); memcpy(&r[rd], mem + ea, 8); NEXT();
op_st: EA(8, 1); memcpy(mem + ea, &r[rd], 8); stores++; NEXT();
op_ldb: EA(1, 0); r[rd] = mem[ea]; NEXT();
op_stb: EA(1, 0); mem[ea] = (uint8_t)r[rd]; stores++; NEXT();
op_beq: JUMP_IF(r[ra] == r[rb]);
op_bne: JUMP_IF(r[ra] != r[rb]);
op_bltu: JUMP_IF(r[ra] < r[rb]);
op_bgeu: JUMP_IF(r[ra] >= r[rb]);
op_jmp: JUMP_IF(1);
op_jal: r[rd] = pc + 8; JUMP_IF(1);
op_jr: pc = r[ra]; steps++; DISPATCH();
op_rand: r[rd] = splitmix64(&rng); NEXT();
op_out: {
    uint8_t b = (uint8_t)r[ra];
    v->tail[v->tail_pos] = b;
    v->tail_pos = (v->tail_pos + 1) % LM_VCPU_CONSOLE_TAIL;
    if (v->tail_len < LM_VCPU_CONSOLE_TAIL)
        v->tail_len++;
    v->st.console_count++;
    v->st.console_hash = (v->st.console_hash ^ b) * LM_FNV_PRIME;
    NEXT();
}
op_clock: r[rd] = v->st.clock_base + steps; NEXT();
op_psum:
    if (r[ra] >= len)
        FAULT(LM_VCPU_FAULT_BAD_ADDRESS, r[ra]);
    r[rd] = lm_vcpu_page_sum(mem + (r[ra] & ~(uint64_t)(LM_PAGE_SIZE - 1)));
    /* End the slice sooner, so pauses stay prompt in PSUM-heavy code; the
     * limit never drops below the next step, nor rises past the stop step. */
    step_limit = step_limit - steps > LM_PSUM_SLICE_COST ? step_limit - LM_PSUM_SLICE_COST
                                                         : steps + 1;
    NEXT();
op_tick:
    if (++ticks >= tick_limit) {
        pc += 8;
        steps++;
        end = END_TICKS;
        goto out;
    }
    NEXT();
op_fail: FAULT((uint32_t)imm, pc);
op_nop: NEXT();
op_bad: FAULT(LM_VCPU_FAULT_BAD_OPCODE, pc);

fault:
    end = END_FAULT;
    v->st.fault_code = fcode;
    v->st.fault_addr = faddr;
    v->st.status = LM_VCPU_FAULTED;
out:
    if (end == END_HALT)
        v->st.status = LM_VCPU_HALTED;
    memcpy(v->st.regs, r, sizeof(r));
    v->st.pc = pc;
    v->st.steps = steps;
    v->st.rng = rng;
    v->ticks = ticks;
    v->stores = stores;
    return end;
#undef EA
#undef SIMM
#undef JUMP_IF
#undef NEXT
#undef DISPATCH
#undef FAULT
}

/* Sleeps until deadline_ns or until the host signals cv_cmd (pause, quit,
 * a new throttle or pace). One wait only: the caller recomputes its
 * schedule afterwards, so an early or spurious wake-up costs a recheck. */
static void sleep_until(lm_vcpu *v, uint64_t deadline_ns)
{
    struct timespec ts = to_timespec(deadline_ns);
    pthread_mutex_lock(&v->lock);
    if (!atomic_load_explicit(&v->stop_req, memory_order_relaxed) && !v->quit)
        pthread_cond_timedwait(&v->cv_cmd, &v->lock, &ts);
    pthread_mutex_unlock(&v->lock);
}

static void settings_changed(lm_vcpu *v)
{
    pthread_mutex_lock(&v->lock);
    pthread_cond_broadcast(&v->cv_cmd);
    pthread_mutex_unlock(&v->lock);
}

static void publish(lm_vcpu *v)
{
    atomic_store_explicit(&v->c_steps, v->st.steps, memory_order_relaxed);
    atomic_store_explicit(&v->c_ticks, v->ticks, memory_order_relaxed);
    atomic_store_explicit(&v->c_stores, v->stores, memory_order_relaxed);
}

/* One run between two parks: slices until a stop request, the stop step,
 * HALT or a fault. */
static void run(lm_vcpu *v)
{
    uint64_t pace_anchor_ns = now_ns(), pace_anchor_ticks = v->ticks, pace_cur = 0;
    uint64_t phase_start_ns = pace_anchor_ns;
    for (;;) {
        if (atomic_load_explicit(&v->stop_req, memory_order_relaxed))
            return;
        uint64_t stop = atomic_load_explicit(&v->stop_step, memory_order_relaxed);
        if (v->st.steps >= stop)
            return;
        uint64_t limit = v->st.steps + LM_SLICE_STEPS;
        if (limit > stop || limit < v->st.steps)
            limit = stop;

        uint32_t pct = atomic_load_explicit(&v->throttle_pct, memory_order_relaxed);
        uint64_t pace = atomic_load_explicit(&v->pace_tps, memory_order_relaxed);
        uint64_t tick_limit = UINT64_MAX;
        if (pct || pace) {
            uint64_t t = now_ns();
            if (pct) {
                uint64_t run_ns = LM_THROTTLE_PERIOD_NS * (100 - pct) / 100;
                if (t - phase_start_ns >= run_ns) {
                    sleep_until(v, t + LM_THROTTLE_PERIOD_NS - run_ns);
                    phase_start_ns = t = now_ns();
                    /* the sleep is not pacing debt */
                    pace_anchor_ns = t;
                    pace_anchor_ticks = v->ticks;
                    continue;
                }
            }
            if (pace) {
                if (pace != pace_cur) {
                    pace_cur = pace;
                    pace_anchor_ns = t;
                    pace_anchor_ticks = v->ticks;
                }
                double elapsed_s = (double)(t - pace_anchor_ns) * 1e-9;
                double allowed = (double)pace_anchor_ticks + elapsed_s * (double)pace +
                                 (double)pace * LM_PACE_BURST_NS * 1e-9 + 1.0;
                if (allowed - (double)v->ticks > (double)pace * LM_PACE_RESYNC_NS * 1e-9) {
                    pace_anchor_ns = t;
                    pace_anchor_ticks = v->ticks;
                    allowed = (double)v->ticks + (double)pace * LM_PACE_BURST_NS * 1e-9 + 1.0;
                }
                if ((double)v->ticks >= allowed - 0.5) {
                    double due_s = ((double)(v->ticks - pace_anchor_ticks) + 1.0) / (double)pace -
                                   LM_PACE_BURST_NS * 1e-9;
                    sleep_until(v, pace_anchor_ns + (uint64_t)(due_s * 1e9));
                    continue;
                }
                tick_limit = (uint64_t)allowed;
            } else {
                pace_cur = 0;
            }
        }
        enum slice_end end = interp(v, limit, tick_limit);
        publish(v);
        if (end == END_HALT || end == END_FAULT)
            return;
    }
}

static int runnable(const lm_vcpu *v)
{
    return v->want_run && !v->quit &&
           v->st.status != LM_VCPU_HALTED && v->st.status != LM_VCPU_FAULTED &&
           v->st.steps < atomic_load_explicit(&v->stop_step, memory_order_relaxed);
}

/* Parked and staying parked: a resume that the thread has not yet acted on
 * already counts as running, so the host never races the thread's start. */
static int quiescent(const lm_vcpu *v)
{
    return v->parked && !runnable(v);
}

/* While the thread is parked the host's commands decide the status: a
 * pending resume reads as RUNNING at once (state access already refuses),
 * and a pause or stop step that lands before the thread woke up reads as
 * parked again. Called under lock. */
static void refresh_status_locked(lm_vcpu *v)
{
    if (v->parked)
        atomic_store(&v->status, runnable(v) ? LM_VCPU_RUNNING : (int)v->st.status);
}

static void *vcpu_main(void *arg)
{
    lm_vcpu *v = arg;
    pthread_mutex_lock(&v->lock);
    for (;;) {
        while (!v->quit && !runnable(v)) {
            if (!v->parked) {
                v->want_run = 0;
                v->parked = 1;
                atomic_store(&v->status, (int)v->st.status);
                pthread_cond_broadcast(&v->cv_parked);
            }
            pthread_cond_wait(&v->cv_cmd, &v->lock);
        }
        if (v->quit)
            break;
        v->parked = 0;
        atomic_store(&v->status, LM_VCPU_RUNNING);
        pthread_mutex_unlock(&v->lock);
        run(v);
        pthread_mutex_lock(&v->lock);
    }
    v->parked = 1;
    atomic_store(&v->status, (int)v->st.status);
    pthread_cond_broadcast(&v->cv_parked);
    pthread_mutex_unlock(&v->lock);
    return NULL;
}

LM_API int lm_vcpu_create(lm_region *region, uint32_t id, lm_vcpu **out)
{
    if (!region || !out)
        return -EINVAL;
    *out = NULL;
    lm_vcpu *v = calloc(1, sizeof(*v));
    if (!v)
        return -ENOMEM;
    v->mem = lm_region_base(region);
    v->length = lm_region_length(region);
    v->id = id;
    v->st.status = LM_VCPU_PARKED;
    v->st.console_hash = LM_FNV_BASIS;
    v->parked = 0; /* the thread announces itself parked */
    atomic_init(&v->stop_req, 0);
    atomic_init(&v->stop_step, UINT64_MAX);
    atomic_init(&v->throttle_pct, 0);
    atomic_init(&v->pace_tps, 0);
    atomic_init(&v->status, LM_VCPU_PARKED);
    atomic_init(&v->c_steps, 0);
    atomic_init(&v->c_ticks, 0);
    atomic_init(&v->c_stores, 0);

    pthread_condattr_t ca;
    int rc = pthread_condattr_init(&ca);
    if (rc == 0)
        rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    if (rc == 0)
        rc = pthread_mutex_init(&v->lock, NULL);
    if (rc == 0)
        rc = pthread_cond_init(&v->cv_cmd, &ca);
    if (rc == 0)
        rc = pthread_cond_init(&v->cv_parked, &ca);
    pthread_condattr_destroy(&ca);
    if (rc == 0)
        rc = pthread_create(&v->thread, NULL, vcpu_main, v);
    if (rc != 0) { /* pthread_* return the errno (EAGAIN: thread limit) */
        free(v);
        return -rc;
    }
    char name[16];
    snprintf(name, sizeof(name), "lm-vcpu-%u", id);
    pthread_setname_np(v->thread, name);
    *out = v;
    return lm_vcpu_wait_parked(v, 5000);
}

LM_API void lm_vcpu_destroy(lm_vcpu *v)
{
    if (!v)
        return;
    pthread_mutex_lock(&v->lock);
    v->quit = 1;
    atomic_store(&v->stop_req, 1);
    pthread_cond_broadcast(&v->cv_cmd);
    pthread_mutex_unlock(&v->lock);
    pthread_join(v->thread, NULL);
    pthread_cond_destroy(&v->cv_cmd);
    pthread_cond_destroy(&v->cv_parked);
    pthread_mutex_destroy(&v->lock);
    free(v);
}

LM_API int lm_vcpu_resume(lm_vcpu *v)
{
    pthread_mutex_lock(&v->lock);
    atomic_store(&v->stop_req, 0);
    v->want_run = 1;
    refresh_status_locked(v);
    pthread_cond_broadcast(&v->cv_cmd);
    pthread_mutex_unlock(&v->lock);
    return 0;
}

static int wait_parked_locked(lm_vcpu *v, int64_t timeout_ms)
{
    if (timeout_ms < 0)
        timeout_ms = 0;
    struct timespec ts = to_timespec(now_ns() + (uint64_t)timeout_ms * 1000000ull);
    while (!quiescent(v)) {
        int rc = pthread_cond_timedwait(&v->cv_parked, &v->lock, &ts);
        if (rc == ETIMEDOUT)
            return quiescent(v) ? 0 : -ETIMEDOUT;
    }
    return 0;
}

LM_API int lm_vcpu_pause(lm_vcpu *v, int64_t timeout_ms)
{
    pthread_mutex_lock(&v->lock);
    v->want_run = 0;
    atomic_store_explicit(&v->stop_req, 1, memory_order_relaxed);
    refresh_status_locked(v);
    pthread_cond_broadcast(&v->cv_cmd); /* interrupts throttle/pace sleeps */
    int rc = wait_parked_locked(v, timeout_ms);
    pthread_mutex_unlock(&v->lock);
    return rc;
}

LM_API int lm_vcpu_wait_parked(lm_vcpu *v, int64_t timeout_ms)
{
    pthread_mutex_lock(&v->lock);
    int rc = wait_parked_locked(v, timeout_ms);
    pthread_mutex_unlock(&v->lock);
    return rc;
}

LM_API int lm_vcpu_set_stop_step(lm_vcpu *v, uint64_t step)
{
    pthread_mutex_lock(&v->lock);
    atomic_store_explicit(&v->stop_step, step, memory_order_relaxed);
    refresh_status_locked(v);
    pthread_cond_broadcast(&v->cv_cmd); /* a raised stop step may make it runnable */
    pthread_mutex_unlock(&v->lock);
    return 0;
}

LM_API int lm_vcpu_set_throttle(lm_vcpu *v, uint32_t pct)
{
    if (pct > 99)
        return -EINVAL;
    atomic_store_explicit(&v->throttle_pct, pct, memory_order_relaxed);
    settings_changed(v);
    return 0;
}

LM_API int lm_vcpu_set_pace(lm_vcpu *v, uint64_t ticks_per_s)
{
    atomic_store_explicit(&v->pace_tps, ticks_per_s, memory_order_relaxed);
    settings_changed(v);
    return 0;
}

LM_API int lm_vcpu_status(const lm_vcpu *v)
{
    return atomic_load(&((lm_vcpu *)v)->status);
}

LM_API int lm_vcpu_counters_read(const lm_vcpu *v, lm_vcpu_counters *out)
{
    lm_vcpu *m = (lm_vcpu *)v;
    out->steps = atomic_load_explicit(&m->c_steps, memory_order_relaxed);
    out->ticks = atomic_load_explicit(&m->c_ticks, memory_order_relaxed);
    out->stores = atomic_load_explicit(&m->c_stores, memory_order_relaxed);
    return 0;
}

LM_API int lm_vcpu_get_state(lm_vcpu *v, lm_vcpu_state *out)
{
    pthread_mutex_lock(&v->lock);
    int rc = -EBUSY;
    if (quiescent(v)) {
        *out = v->st;
        rc = 0;
    }
    pthread_mutex_unlock(&v->lock);
    return rc;
}

LM_API int lm_vcpu_set_state(lm_vcpu *v, const lm_vcpu_state *in)
{
    if (in->status != LM_VCPU_PARKED && in->status != LM_VCPU_HALTED &&
        in->status != LM_VCPU_FAULTED)
        return -EINVAL;
    pthread_mutex_lock(&v->lock);
    int rc = -EBUSY;
    if (quiescent(v)) {
        v->st = *in;
        refresh_status_locked(v);
        publish(v);
        rc = 0;
    }
    pthread_mutex_unlock(&v->lock);
    return rc;
}

LM_API int lm_vcpu_console_read(lm_vcpu *v, uint8_t *buf, size_t cap)
{
    pthread_mutex_lock(&v->lock);
    int rc = -EBUSY;
    if (quiescent(v)) {
        size_t n = v->tail_len < cap ? v->tail_len : cap;
        size_t start = (v->tail_pos + LM_VCPU_CONSOLE_TAIL - n) % LM_VCPU_CONSOLE_TAIL;
        for (size_t i = 0; i < n; i++)
            buf[i] = v->tail[(start + i) % LM_VCPU_CONSOLE_TAIL];
        rc = (int)n;
    }
    pthread_mutex_unlock(&v->lock);
    return rc;
}

LM_API int lm_vcpu_console_set(lm_vcpu *v, const uint8_t *buf, size_t length_bytes)
{
    if (length_bytes > LM_VCPU_CONSOLE_TAIL)
        return -EINVAL;
    pthread_mutex_lock(&v->lock);
    int rc = -EBUSY;
    if (quiescent(v)) {
        memcpy(v->tail, buf, length_bytes);
        v->tail_len = (uint32_t)length_bytes;
        v->tail_pos = (uint32_t)(length_bytes % LM_VCPU_CONSOLE_TAIL);
        rc = 0;
    }
    pthread_mutex_unlock(&v->lock);
    return rc;
}
