/* Attention over the paged KV cache on the CPU, read in place through the block tables (no
 * gathered copy). The cache of one layer is (2, kv_heads, num_blocks, block_size, head_dim): K, then V.
 *
 * Decode: each sequence has one query token; a task is one (sequence, kv head), whose keys and
 * values are read once for all the query heads that share them (GQA).
 *
 *   scores:  S[s, h, t] = scale * q[s, h] . K[s, kv(h), t]   for t < len[s], -inf after
 *   values:  out[s, h]  = sum_t P[s, h, t] * V[s, kv(h), t]   (P = softmax(S))
 *
 * Scores, probabilities and sums are float32; K, V, q and out are bfloat16 or float32 (elem_size 2
 * or 4). head_dim must be a multiple of 16. Built by cpu_kernel.py for the CPU it runs on.
 *
 * Prefill (below): one sequence's chunk of new tokens, causal, one pass with an online softmax.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../native_vec.h"
#include "paged_attention.h"

#define AHEAD 2 /* blocks fetched ahead: they lie anywhere, so the hardware cannot guess the next */

static inline void store_row(const vfloat *src, void *dst, int64_t n, int64_t elem_size) {
    const float *x = (const float *)src;
    for (int64_t i = 0; i < n; i++) {
        if (elem_size == 4)
            ((float *)dst)[i] = x[i];
        else
            ((uint16_t *)dst)[i] = to_bf16(x[i]);
    }
}

/* Block b of a sequence's table in one head's (num_blocks, block_size, head_dim) plane, after
 * prefetching the blocks up to AHEAD further on (of the `used` blocks the sequence holds). */
static inline const char *tile(const char *plane, const int64_t *table, int64_t b, int64_t used, int64_t bytes) {
    for (int64_t a = b ? b + AHEAD : 1; a <= b + AHEAD && a < used; a++)
        for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(plane + table[a] * bytes + i);
    return plane + table[b] * bytes;
}

#define TASK static inline __attribute__((always_inline)) void

/* lane j of the result: the sum of v[j]'s lanes. Pairs of vectors fold their halves, quarters,
 * eighths and sixteenths into each other: 15 pairs of shuffles and adds for 16 sums. */
static inline vfloat sum16(vfloat v[LANES]) {
    for (int i = 0; i < 8; i++)
        v[i] = __builtin_shufflevector(v[i], v[i + 8], 0, 1, 2, 3, 4, 5, 6, 7, 24, 25, 26, 27, 28, 29, 30, 31) +
               __builtin_shufflevector(v[i], v[i + 8], 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23);
    for (int i = 0; i < 4; i++)
        v[i] = __builtin_shufflevector(v[i], v[i + 4], 0, 1, 2, 3, 20, 21, 22, 23, 8, 9, 10, 11, 28, 29, 30, 31) +
               __builtin_shufflevector(v[i], v[i + 4], 4, 5, 6, 7, 16, 17, 18, 19, 12, 13, 14, 15, 24, 25, 26, 27);
    for (int i = 0; i < 2; i++)
        v[i] = __builtin_shufflevector(v[i], v[i + 2], 0, 1, 18, 19, 4, 5, 22, 23, 8, 9, 26, 27, 12, 13, 30, 31) +
               __builtin_shufflevector(v[i], v[i + 2], 2, 3, 16, 17, 6, 7, 20, 21, 10, 11, 24, 25, 14, 15, 28, 29);
    return __builtin_shufflevector(v[0], v[1], 0, 17, 2, 19, 4, 21, 6, 23, 8, 25, 10, 27, 12, 29, 14, 31) +
           __builtin_shufflevector(v[0], v[1], 1, 16, 3, 18, 5, 20, 7, 22, 9, 24, 11, 26, 13, 28, 15, 30);
}

/* The group's scores against keys t0 .. t0 + LANES - 1 (those before len): per key one vector of
 * products per query head, summed 16 keys at a time; -inf from len on. */
TASK score_keys(const Shape *sh, const vfloat *qf, const char *plane, const int64_t *table, int64_t used,
                int64_t t0, int64_t len, float *sc, const int64_t group, const int64_t chunks,
                const int64_t elem_size) {
    const int64_t bs = sh->block_size, row_bytes = chunks * LANES * elem_size;
    vfloat part[group][LANES], row[chunks];
    const char *block = plane + table[t0 / bs] * bs * row_bytes;
    for (int64_t j = 0; j < LANES; j++) {
        const int64_t t = t0 + j;
        if (t < len && t % bs == 0) block = tile(plane, table, t / bs, used, bs * row_bytes);
        if (t < len) load_row(block + (t % bs) * row_bytes, row, chunks * LANES, elem_size);
        else memset(row, 0, sizeof row);
        for (int64_t g = 0; g < group; g++) {
            vfloat acc = qf[g * chunks] * row[0];
            for (int64_t c = 1; c < chunks; c++) acc += qf[g * chunks + c] * row[c];
            part[g][j] = acc;
        }
    }
    vint lane;
    for (int j = 0; j < LANES; j++) lane[j] = (int32_t)(t0 + j);
    for (int64_t g = 0; g < group; g++)
        *(vfloat *)(sc + g * sh->max_len + t0) = vselect(lane < (int32_t)len, sum16(part[g]), (vfloat){0} - INFINITY);
}

/* softmax of a row of scores, n floats (a multiple of LANES) */
static inline void softmax_row(vfloat *row, int64_t n) {
    vfloat top = row[0];
    for (int64_t c = 1; c < n / LANES; c++) top = vmax(top, row[c]);
    const float m = max_lanes(top);
    vfloat total = {0};
    for (int64_t c = 0; c < n / LANES; c++) {
        row[c] = exp_neg(row[c] - m);
        total += row[c];
    }
    const float inv = 1.0f / sum_lanes(total);
    for (int64_t c = 0; c < n / LANES; c++) row[c] *= inv;
}

/* One (sequence, kv head): the scores of its query heads, their softmax, and the sums of values.
 * sc: the group's rows of scratch scores, max_len apart. */
TASK attend_task(const Shape *sh, const char *q, const char *k_plane, const char *v_plane, const int64_t *table,
                 int64_t len, float *sc, char *out, float scale, const int64_t chunks, const int64_t elem_size) {
    const int64_t group = sh->num_heads / sh->num_kv_heads, bs = sh->block_size;
    const int64_t row_bytes = chunks * LANES * elem_size, used = (len + bs - 1) / bs;
    const int64_t padded = (len + LANES - 1) / LANES * LANES;
    vfloat qf[group * chunks], acc[group * chunks], row[chunks];
    load_row(q, qf, group * chunks * LANES, elem_size);
    for (int64_t c = 0; c < group * chunks; c++) qf[c] *= scale;
    for (int64_t t0 = 0; t0 < len; t0 += LANES)
        score_keys(sh, qf, k_plane, table, used, t0, len, sc, group, chunks, elem_size);
    for (int64_t g = 0; g < group; g++) softmax_row((vfloat *)(sc + g * sh->max_len), padded);
    memset(acc, 0, sizeof acc);
    for (int64_t b = 0; b < used; b++) {
        const char *block = tile(v_plane, table, b, used, bs * row_bytes);
        for (int64_t t = b * bs; t < len && t < (b + 1) * bs; t++) {
            load_row(block + (t - b * bs) * row_bytes, row, chunks * LANES, elem_size);
            for (int64_t g = 0; g < group; g++)
                for (int64_t c = 0; c < chunks; c++) acc[g * chunks + c] += sc[g * sh->max_len + t] * row[c];
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

void decode_attention(const char *q, const char *kv, const int64_t *tables, const int32_t *lens, float *scores,
                      char *out, const Shape *sh, float scale) {
    const int64_t group = sh->num_heads / sh->num_kv_heads, head_bytes = sh->head_dim * sh->elem_size;
    const int64_t plane_bytes = sh->num_blocks * sh->block_size * head_bytes;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t s = 0; s < sh->num_seqs; s++) {
        for (int64_t h = 0; h < sh->num_kv_heads; h++) {
            DISPATCH(attend_task, sh, sh, q + (s * sh->q_stride * sh->elem_size) + h * group * head_bytes,
                     kv + h * plane_bytes, kv + (sh->num_kv_heads + h) * plane_bytes, tables + s * sh->table_stride,
                     lens[s], scores + (s * sh->num_heads + h * group) * sh->max_len,
                     out + (s * sh->num_heads + h * group) * head_bytes, scale);
        }
    }
}

/* ---- prefill: one sequence's chunk of new tokens, causal, with an online softmax ----
 *
 *   out[i, h] = sum_t softmax_t(scale * q[i, h] . K[kv(h), t]) V[kv(h), t]   for t <= first + i
 *
 * where first = context - qlen is the position of the chunk's first token (its own keys and values
 * are in the cache already). Keys come LANES at a time by position, transposed so that one vector
 * holds one dimension of LANES keys: a query row's LANES scores are then head_dim FMAs, with no
 * horizontal sums. A task is one kv head and up to QBLOCK query tokens, with all the query heads
 * that share the kv head: each tile of keys and values is read and converted once for all of them.
 */

#define QBLOCK 32 /* query tokens per task */

typedef struct {
    int64_t qlen, context, num_heads, num_kv_heads, head_dim, num_blocks, block_size;
    int64_t q_stride;  /* elements between two tokens' queries (heads and dims are packed) */
    int64_t elem_size; /* 2: bfloat16, 4: float32 */
} PrefillShape;


/* the keys (transposed: kt[d][j]) and values (vv[j]) of positions t0 .. t0 + LANES - 1, zero past n */
static inline void load_tile(const PrefillShape *sh, const char *k_plane, const char *v_plane, const int64_t *table,
                             int64_t t0, int64_t n, float *kt, vfloat *vv, const int64_t chunks,
                             const int64_t elem_size) {
    const int64_t d_size = chunks * LANES, row_bytes = d_size * elem_size, bs = sh->block_size;
    vfloat row[chunks];
    for (int64_t j = 0; j < LANES; j++) {
        if (j < n) {
            const int64_t t = t0 + j, offset = (table[t / bs] * bs + t % bs) * row_bytes;
            load_row(k_plane + offset, row, d_size, elem_size);
            load_row(v_plane + offset, vv + j * chunks, d_size, elem_size);
        } else {
            memset(row, 0, sizeof row);
            memset(vv + j * chunks, 0, sizeof row);
        }
        const float *k = (const float *)row;
        for (int64_t d = 0; d < d_size; d++) kt[d * LANES + j] = k[d];
    }
}

#define RBLOCK 4 /* query rows scored together: independent FMA chains, and each key vector loaded once for them */

/* Scores of rows r .. r + rb - 1 against one tile of keys, the online-softmax update, and their
 * sums of values; masked lanes (keys after a row's position, or past the tile) weigh 0. */
TASK rows_tile(const vfloat *qs, vfloat *acc, float *m, float *l, const int64_t *pos, int64_t t0,
               const vfloat *kt, const vfloat *vv, int64_t n, const int rb, const int64_t chunks) {
    const int64_t d_size = chunks * LANES;
    vfloat s[RBLOCK][2];
    for (int i = 0; i < rb; i++) s[i][0] = s[i][1] = (vfloat){0};
    for (int64_t d = 0; d < d_size; d += 2)
        for (int i = 0; i < rb; i++) {
            const float *qr = (const float *)(qs + i * chunks);
            s[i][0] += qr[d] * kt[d];
            s[i][1] += qr[d + 1] * kt[d + 1];
        }
    vint iota;
    for (int j = 0; j < LANES; j++) iota[j] = (int32_t)(t0 + j);
    vfloat p[RBLOCK];
    for (int i = 0; i < rb; i++) {
        const vfloat scores = vselect(iota <= (int32_t)pos[i], s[i][0] + s[i][1], (vfloat){0} - INFINITY);
        const float top = max_lanes(scores);
        if (top > m[i]) { /* NOTE: a new running max rescales what came before; most tiles keep it */
            const float correction = exp_neg((vfloat){0} + (m[i] - top))[0];
            l[i] *= correction;
            for (int64_t c = 0; c < chunks; c++) acc[i * chunks + c] *= correction;
            m[i] = top;
        }
        p[i] = exp_neg(scores - m[i]);
        l[i] += sum_lanes(p[i]);
    }
    for (int64_t j = 0; j < n; j++)
        for (int64_t c = 0; c < chunks; c++) {
            const vfloat v = vv[j * chunks + c];
            for (int i = 0; i < rb; i++) acc[i * chunks + c] += p[i][j] * v;
        }
}

/* One kv head's query heads for query tokens i0 .. i0 + QBLOCK - 1 of the chunk. */
TASK prefill_task(const PrefillShape *sh, const char *q, const char *k_plane, const char *v_plane,
                  const int64_t *table, char *out, float scale, int64_t i0, const int64_t chunks,
                  const int64_t elem_size) {
    const int64_t group = sh->num_heads / sh->num_kv_heads, d_size = chunks * LANES;
    const int64_t row_bytes = d_size * elem_size, first = sh->context - sh->qlen;
    const int64_t nq = sh->qlen - i0 < QBLOCK ? sh->qlen - i0 : QBLOCK, rows = nq * group;
    const int64_t end = first + i0 + nq; /* keys any row of the task sees */
    vfloat qs[rows * chunks], acc[rows * chunks], kt[d_size], vv[LANES * chunks];
    float m[rows], l[rows];
    int64_t pos[rows]; /* rows are (token, head), so positions never decrease */
    for (int64_t r = 0; r < rows; r++) {
        load_row(q + ((i0 + r / group) * sh->q_stride * elem_size) + (r % group) * row_bytes, qs + r * chunks,
                 d_size, elem_size);
        for (int64_t c = 0; c < chunks; c++) qs[r * chunks + c] *= scale;
        memset(acc + r * chunks, 0, chunks * sizeof(vfloat));
        m[r] = -INFINITY;
        l[r] = 0.0f;
        pos[r] = first + i0 + r / group;
    }
    for (int64_t t0 = 0; t0 < end; t0 += LANES) {
        const int64_t n = end - t0 < LANES ? end - t0 : LANES;
        load_tile(sh, k_plane, v_plane, table, t0, n, (float *)kt, vv, chunks, elem_size);
        for (int64_t r = 0; r < rows; r += RBLOCK) {
            const int rb = rows - r < RBLOCK ? (int)(rows - r) : RBLOCK;
            if (pos[r + rb - 1] < t0) continue;
            const vfloat *qr = qs + r * chunks;
            vfloat *ar = acc + r * chunks;
            switch (rb) {
                case 1: rows_tile(qr, ar, m + r, l + r, pos + r, t0, kt, vv, n, 1, chunks); break;
                case 2: rows_tile(qr, ar, m + r, l + r, pos + r, t0, kt, vv, n, 2, chunks); break;
                case 3: rows_tile(qr, ar, m + r, l + r, pos + r, t0, kt, vv, n, 3, chunks); break;
                default: rows_tile(qr, ar, m + r, l + r, pos + r, t0, kt, vv, n, RBLOCK, chunks); break;
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < chunks; c++) acc[r * chunks + c] *= 1.0f / l[r];
        store_row(acc + r * chunks, out + ((i0 + r / group) * sh->num_heads + r % group) * row_bytes, d_size,
                  elem_size);
    }
}

/* q: the chunk's queries (qlen, num_heads, head_dim), tokens q_stride apart; out: (qlen, num_heads,
 * head_dim), contiguous; table: the sequence's blocks, enough for `context` tokens. */
void prefill(const char *q, const char *kv, const int64_t *table, char *out, const PrefillShape *sh, float scale) {
    const int64_t group = sh->num_heads / sh->num_kv_heads, head_bytes = sh->head_dim * sh->elem_size;
    const int64_t plane_bytes = sh->num_blocks * sh->block_size * head_bytes;
    const int64_t tasks = (sh->qlen + QBLOCK - 1) / QBLOCK;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t h = 0; h < sh->num_kv_heads; h++) {
        for (int64_t b = 0; b < tasks; b++) {
            DISPATCH(prefill_task, sh, sh, q + h * group * head_bytes, kv + h * plane_bytes,
                     kv + (sh->num_kv_heads + h) * plane_bytes, table, out + h * group * head_bytes, scale,
                     b * QBLOCK);
        }
    }
}
