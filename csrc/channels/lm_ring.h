/*
 * A single-producer single-consumer ring of u64 values (not part of the cdef).
 *
 * The producer (a native channel thread) and the consumer (the owner, from
 * Python) each advance their own index; the release store of one paired with
 * the acquire load by the other orders the slot contents, so no lock is
 * taken on either side. A full ring drops what does not fit and counts it:
 * the producer never waits on the owner.
 */
#ifndef LM_RING_H
#define LM_RING_H

#include <stdint.h>

struct lm_ring {
    uint64_t *slots;
    uint64_t capacity;
    uint64_t head;   /* producer, atomic */
    uint64_t tail;   /* consumer, atomic */
};

static inline uint64_t lm_ring_used(const struct lm_ring *r)
{
    return __atomic_load_n(&r->head, __ATOMIC_RELAXED) -
           __atomic_load_n(&r->tail, __ATOMIC_RELAXED);
}

/* Producer: append what fits of v[0..n); add the rest to *dropped. */
static inline void lm_ring_push(struct lm_ring *r, const uint64_t *v, uint64_t n,
                                uint64_t *dropped)
{
    uint64_t head = __atomic_load_n(&r->head, __ATOMIC_RELAXED);
    uint64_t tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
    uint64_t room = r->capacity - (head - tail);
    uint64_t take = n < room ? n : room;
    for (uint64_t i = 0; i < take; i++)
        r->slots[(head + i) % r->capacity] = v[i];
    __atomic_store_n(&r->head, head + take, __ATOMIC_RELEASE);
    if (take < n)
        __atomic_fetch_add(dropped, n - take, __ATOMIC_RELAXED);
}

/* Consumer: take up to max values, oldest first; returns how many. */
static inline int64_t lm_ring_drain(struct lm_ring *r, uint64_t *out, uint64_t max)
{
    uint64_t tail = __atomic_load_n(&r->tail, __ATOMIC_RELAXED);
    uint64_t head = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
    uint64_t n = head - tail < max ? head - tail : max;
    for (uint64_t i = 0; i < n; i++)
        out[i] = r->slots[(tail + i) % r->capacity];
    __atomic_store_n(&r->tail, tail + n, __ATOMIC_RELEASE);
    return (int64_t)n;
}

#endif /* LM_RING_H */
