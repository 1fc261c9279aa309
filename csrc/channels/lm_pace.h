/*
 * The bulk streams' side of the bandwidth cap (lm_pace.c): what a stream
 * thread calls before it sends a frame. Not part of the cdef.
 */
#ifndef LM_PACE_H
#define LM_PACE_H

#include <stdint.h>

#include "livemig.h"
#include "channels/lm_chan.h"

/* Longest single sleep while waiting for tokens: a cap changed (or lifted)
 * by the owner takes effect within this long. */
#define LM_PACE_SLICE_MS 20

/* Wait until the bucket's balance is not negative, then take nbytes (the
 * balance may go negative: the debt delays the next frame of any thread).
 * p == NULL or an unlimited pace returns at once. 0 when taken, 1 when
 * c's stop was asked meanwhile (nothing taken), -errno (c failed with a
 * reason) when poll(2) fails. */
int lm_pace_take(lm_pace *p, struct lm_chan *c, uint64_t nbytes);

#endif /* LM_PACE_H */
