/* Decode attention over the paged KV cache on the CPU, in two passes around a softmax left to torch.
 *
 * The cache of one layer is (2, kv_heads, num_blocks, block_size, head_dim): K, then V. Each
 * sequence has one query token; its keys are found through its block table and read in place (no
 * gathered copy), once per kv head for all the query heads that share it (GQA).
 *
 *   scores:  S[s, h, t] = scale * q[s, h] . K[s, kv(h), t]   for t < len[s], -inf after
 *   values:  out[s, h]  = sum_t P[s, h, t] * V[s, kv(h), t]   (P = softmax(S), by torch)
 *
 * Scores, probabilities and sums are float32; K, V, q and out are bfloat16 or float32 (elem_size 2
 * or 4). head_dim must be a multiple of 16. Built by cpu_kernel.py for the CPU it runs on.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16 /* floats per vector: one AVX-512 register, two AVX2 ones (GCC vector extensions) */
#define AHEAD 2  /* blocks fetched ahead: they lie anywhere, so the hardware cannot guess the next */

typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t vuint __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint16_t vhalf __attribute__((vector_size(LANES * sizeof(uint16_t))));

typedef struct {
    int64_t num_seqs, num_heads, num_kv_heads, head_dim, num_blocks, block_size;
    int64_t q_stride;     /* elements between two sequences' queries (heads and dims are packed) */
    int64_t table_stride; /* entries between two rows of the block table */
    int64_t max_len;      /* the scores' last dimension */
    int64_t elem_size;    /* 2: bfloat16, 4: float32 */
} Shape;

/* n / LANES vectors from a row of n bfloat16 or float32 values (n a multiple of LANES) */
static inline void load_row(const void *src, vfloat *dst, int64_t n, int64_t elem_size) {
    for (int64_t c = 0; c < n / LANES; c++) {
        if (elem_size == 4) {
            memcpy(&dst[c], (const float *)src + c * LANES, sizeof(vfloat));
        } else {
            vhalf half;
            memcpy(&half, (const uint16_t *)src + c * LANES, sizeof half);
            dst[c] = (vfloat)(__builtin_convertvector(half, vuint) << 16); /* bfloat16 = a float's top half */
        }
    }
}

static inline uint16_t to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even, as torch does */
    return (uint16_t)(bits >> 16);
}

static inline void store_row(const vfloat *src, void *dst, int64_t n, int64_t elem_size) {
    const float *x = (const float *)src;
    for (int64_t i = 0; i < n; i++) {
        if (elem_size == 4)
            ((float *)dst)[i] = x[i];
        else
            ((uint16_t *)dst)[i] = to_bf16(x[i]);
    }
}

static inline float sum_lanes(vfloat v) { /* a halving tree: 4 adds deep, not 16 */
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    return v[0] + v[1];
}

static inline float dot(const vfloat *a, const vfloat *b, int64_t chunks) {
    vfloat acc = a[0] * b[0];
    for (int64_t c = 1; c < chunks; c++) acc += a[c] * b[c];
    return sum_lanes(acc);
}

/* Block b of a sequence's table in one head's (num_blocks, block_size, head_dim) plane, after
 * prefetching the blocks up to AHEAD further on (of the `used` blocks the sequence holds). */
static inline const char *tile(const char *plane, const int64_t *table, int64_t b, int64_t used, int64_t bytes) {
    for (int64_t a = b ? b + AHEAD : 1; a <= b + AHEAD && a < used; a++)
        for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(plane + table[a] * bytes + i);
    return plane + table[b] * bytes;
}

#define TASK static inline __attribute__((always_inline)) void

/* One (sequence, kv head) of the scores pass. */
TASK scores_task(const Shape *sh, const char *q, const char *plane, const int64_t *table, int64_t len,
                 float *out, float scale, const int64_t chunks, const int64_t elem_size) {
    const int64_t group = sh->num_heads / sh->num_kv_heads, bs = sh->block_size;
    const int64_t row_bytes = chunks * LANES * elem_size, used = (len + bs - 1) / bs;
    vfloat qf[group * chunks], row[chunks];
    load_row(q, qf, group * chunks * LANES, elem_size);
    for (int64_t c = 0; c < group * chunks; c++) qf[c] *= scale;
    for (int64_t b = 0; b < used; b++) {
        const char *block = tile(plane, table, b, used, bs * row_bytes);
        for (int64_t t = b * bs; t < len && t < (b + 1) * bs; t++) {
            load_row(block + (t - b * bs) * row_bytes, row, chunks * LANES, elem_size);
            for (int64_t g = 0; g < group; g++) out[g * sh->max_len + t] = dot(qf + g * chunks, row, chunks);
        }
    }
    for (int64_t g = 0; g < group; g++)
        for (int64_t t = len; t < sh->max_len; t++) out[g * sh->max_len + t] = -INFINITY;
}

/* One (sequence, kv head) of the values pass. */
TASK values_task(const Shape *sh, const float *p, const char *plane, const int64_t *table, int64_t len, char *out,
                 const int64_t chunks, const int64_t elem_size) {
    const int64_t group = sh->num_heads / sh->num_kv_heads, bs = sh->block_size;
    const int64_t row_bytes = chunks * LANES * elem_size, used = (len + bs - 1) / bs;
    vfloat acc[group * chunks], row[chunks];
    memset(acc, 0, sizeof acc);
    for (int64_t b = 0; b < used; b++) {
        const char *block = tile(plane, table, b, used, bs * row_bytes);
        for (int64_t t = b * bs; t < len && t < (b + 1) * bs; t++) {
            load_row(block + (t - b * bs) * row_bytes, row, chunks * LANES, elem_size);
            for (int64_t g = 0; g < group; g++)
                for (int64_t c = 0; c < chunks; c++) acc[g * chunks + c] += p[g * sh->max_len + t] * row[c];
        }
    }
    store_row(acc, out, group * chunks * LANES, elem_size);
}

/* Calls TASK(args..., chunks, elem_size) with both as constants for the common head dims (64, 128)
 * and dtypes, so the compiler unrolls the row loops and keeps rows in registers. */
#define DISPATCH(TASK, sh, ...)                                                                             \
    do {                                                                                                    \
        const int64_t chunks_ = (sh)->head_dim / LANES, size_ = (sh)->elem_size;                            \
        if (chunks_ == 4 && size_ == 2) TASK(__VA_ARGS__, 4, 2);                                            \
        else if (chunks_ == 8 && size_ == 2) TASK(__VA_ARGS__, 8, 2);                                       \
        else if (chunks_ == 4 && size_ == 4) TASK(__VA_ARGS__, 4, 4);                                       \
        else if (chunks_ == 8 && size_ == 4) TASK(__VA_ARGS__, 8, 4);                                       \
        else TASK(__VA_ARGS__, chunks_, size_);                                                             \
    } while (0)

void decode_scores(const char *q, const char *kv, const int64_t *tables, const int32_t *lens, float *scores,
                   const Shape *sh, float scale) {
    const int64_t group = sh->num_heads / sh->num_kv_heads, head_bytes = sh->head_dim * sh->elem_size;
    const int64_t plane_bytes = sh->num_blocks * sh->block_size * head_bytes;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t s = 0; s < sh->num_seqs; s++) {
        for (int64_t h = 0; h < sh->num_kv_heads; h++) {
            DISPATCH(scores_task, sh, sh, q + (s * sh->q_stride * sh->elem_size) + h * group * head_bytes,
                     kv + h * plane_bytes, tables + s * sh->table_stride, lens[s],
                     scores + (s * sh->num_heads + h * group) * sh->max_len, scale);
        }
    }
}

void decode_values(const float *probs, const char *kv, const int64_t *tables, const int32_t *lens, char *out,
                   const Shape *sh) {
    const int64_t group = sh->num_heads / sh->num_kv_heads, head_bytes = sh->head_dim * sh->elem_size;
    const int64_t plane_bytes = sh->num_blocks * sh->block_size * head_bytes;
    const char *v_cache = kv + sh->num_kv_heads * plane_bytes;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t s = 0; s < sh->num_seqs; s++) {
        for (int64_t h = 0; h < sh->num_kv_heads; h++) {
            DISPATCH(values_task, sh, sh, probs + (s * sh->num_heads + h * group) * sh->max_len,
                     v_cache + h * plane_bytes, tables + s * sh->table_stride, lens[s],
                     out + (s * sh->num_heads + h * group) * head_bytes);
        }
    }
}
