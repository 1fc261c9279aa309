/*
 * LZ4 block compression for the bulk streams, from the system's liblz4
 * (internal to the module, not part of the cdef).
 *
 * The library is loaded with dlopen(3) when a stream is created, as libxxhash
 * is for the frame checksum (wire/lm_frame.c): the three functions of the
 * LZ4 block API used here are declared below, so building needs no lz4
 * headers and no lz4 code lives in this tree. The format is the LZ4 block
 * format without a size prefix, what the Python codec's lz4.block makes with
 * store_size=False, so either side may be the Python codec.
 * Without the library the streams still run; they just never send LZ4 and
 * refuse LZ4 runs they receive (the source offers none it cannot decode).
 */
#ifndef LM_LZ4_H
#define LM_LZ4_H

#include <stddef.h>

struct lm_lz4 {
    void *dl;                   /* NULL: no liblz4 here */
    int (*compress)(const char *src, char *dst, int src_size, int dst_capacity);
    int (*decompress)(const char *src, char *dst, int compressed_size, int dst_capacity);
    int (*bound)(int input_size);
};

/* Load liblz4: 0, or -errno with a reason (then l->dl is NULL). */
int lm_lz4_open(struct lm_lz4 *l, char *reason, size_t reason_cap);
void lm_lz4_close(struct lm_lz4 *l);

#endif /* LM_LZ4_H */
