/* The decode kernels of paged_attention.c, for the C sources that call them (cpu_step.c). */
#ifndef COUNTERPOINT_PAGED_ATTENTION_H
#define COUNTERPOINT_PAGED_ATTENTION_H
#include <stdint.h>

typedef struct {
    int64_t num_seqs, num_heads, num_kv_heads, head_dim, num_blocks, block_size;
    int64_t q_stride;     /* elements between two sequences' queries (heads and dims are packed) */
    int64_t table_stride; /* entries between two rows of the block table */
    int64_t max_len;      /* the scratch scores' last dimension: a multiple of 16, at least every len */
    int64_t elem_size;    /* 2: bfloat16, 4: float32 */
} Shape;

/* out (num_seqs, num_heads, head_dim) = attention of each sequence's query over its cached keys and
 * values; scores: scratch of (num_seqs, num_heads, max_len) floats, 64-byte aligned */
void decode_attention(const char *q, const char *kv, const int64_t *tables, const int32_t *lens, float *scores,
                      char *out, const Shape *sh, float scale);

#endif
