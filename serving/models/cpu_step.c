/* A decode step's decoder layers on the CPU in one call: for each layer of a Llama in bfloat16,
 *
 *   residual += x;  h = rms_norm(residual)                      (add_rms_norm, cpu_norm.c)
 *   q, k, v = h · Wqkv^T;  rotate q, k;  store k, v             (linear_bf16, cpu_gemv.c)
 *   a = attention(q, cached K, V)                              (decode_attention, paged_attention.c)
 *   x = a · Wo^T
 *   residual += x;  h = rms_norm(residual)
 *   x = (silu(h · Wgate^T) * (h · Wup^T)) · Wdown^T
 *
 * Each row is one decoding sequence (its new token). At a few rows, the torch code that strings
 * these kernels together costs as much as they do: some 15 ops and 8 C calls a layer from Python.
 * Here they run back to back, with the rounding points of the torch path: rotary as transformers
 * computes it in bfloat16 (each product and the sum rounded), the softmax in float32, and
 * silu(gate) rounded before it multiplies up. Built with the three kernels' files by serving/native.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../attention/paged_attention.h"
#include "../native_vec.h"

void linear_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t rows, int64_t out, int64_t in,
                 int64_t x_stride);
void add_rms_norm(const char *x, const char *residual, const char *weight, char *out, char *total, int64_t rows,
                  int64_t dim, float eps, int64_t elem_size);

typedef struct {
    const uint16_t *input_norm, *qkv, *o, *post_norm, *gate_up, *down; /* row-major weights */
} Layer;

typedef struct {
    int64_t rows, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    int64_t num_blocks, block_size, table_stride, max_len; /* max_len: the longest context */
    int64_t layer_bytes; /* one layer's (2, kv_heads, blocks, block, head_dim) cache */
    float eps, scale;
} StepShape;

static inline float bf16_value(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static inline float rounded(float x) { return bf16_value(to_bf16(x)); }

/* Rotate-half rotary on one head (in place), as transformers in bfloat16: x·cos and
 * rotate_half(x)·sin each rounded, then their sum; cos and sin already rounded to bfloat16. */
static void rotate(uint16_t *x, const float *cos, const float *sin, int64_t head_dim) {
    const int64_t half = head_dim / 2;
    if (half % LANES == 0) { /* rotate_half(x) is (-second half, first half) */
        for (int64_t c = 0; c < half; c += LANES) {
            vfloat first, second, co, si;
            load_row(x + c, &first, LANES, 2);
            load_row(x + half + c, &second, LANES, 2);
            memcpy(&co, cos + c, sizeof co);
            memcpy(&si, sin + c, sizeof si);
            store_bf16(x + c, round_bf16(round_bf16(first * co) + round_bf16(-second * si)));
            store_bf16(x + half + c, round_bf16(round_bf16(second * co) + round_bf16(first * si)));
        }
        return;
    }
    float in[head_dim];
    for (int64_t i = 0; i < head_dim; i++) in[i] = bf16_value(x[i]);
    for (int64_t i = 0; i < head_dim; i++) {
        const float turned = i < half ? -in[i + half] : in[i - half];
        x[i] = to_bf16(rounded(in[i] * cos[i % half]) + rounded(turned * sin[i % half]));
    }
}

/* Rotates each row's query and key heads and stores its key and value heads at its cache slot. */
static void rotate_and_store(uint16_t *qkv, char *kv, const StepShape *sh, const int64_t *positions,
                             const float *cos_sin, const int64_t *slots) {
    const int64_t d = sh->head_dim, width = (sh->num_heads + 2 * sh->num_kv_heads) * d;
    const int64_t plane = sh->num_blocks * sh->block_size * d; /* elements of one head's K (or V) */
    uint16_t *cache = (uint16_t *)kv;
#pragma omp parallel for if (sh->rows >= 8) schedule(static)
    for (int64_t r = 0; r < sh->rows; r++) {
        uint16_t *row = qkv + r * width;
        float cs[d]; /* the row's position's cos then sin, rounded once for all its heads */
        for (int64_t i = 0; i < d; i++) cs[i] = rounded(cos_sin[positions[r] * d + i]);
        for (int64_t h = 0; h < sh->num_heads + sh->num_kv_heads; h++) rotate(row + h * d, cs, cs + d / 2, d);
        const int64_t at = slots[r] * d; /* slot = block * block_size + offset: a row of the (blocks, block, d) plane */
        for (int64_t h = 0; h < sh->num_kv_heads; h++) {
            memcpy(cache + h * plane + at, row + (sh->num_heads + h) * d, d * sizeof(uint16_t));
            memcpy(cache + (sh->num_kv_heads + h) * plane + at, row + (sh->num_heads + sh->num_kv_heads + h) * d,
                   d * sizeof(uint16_t));
        }
    }
}

/* act = round(round(silu(gate)) * up), gate and up the two halves of each row of gu */
static void silu_mul(const uint16_t *gu, uint16_t *act, int64_t rows, int64_t inter) {
#pragma omp parallel for if (rows >= 8) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < inter; c += LANES) {
            vfloat g, u;
            load_row(gu + r * 2 * inter + c, &g, LANES, 2);
            load_row(gu + r * 2 * inter + inter + c, &u, LANES, 2);
            const vfloat negative = vselect(g < 0.0f, g, -g);    /* -|g| */
            const vfloat e = exp_neg(negative);                /* e^-|g| */
            const vfloat silu = vselect(g < 0.0f, g * e / (1.0f + e), g / (1.0f + e));
            store_bf16(act + r * inter + c, round_bf16(round_bf16(silu) * u));
        }
    }
}

/* Layers [0, count) of `layers` over the residual stream: x (rows, hidden) is the last layer's
 * output (the embeddings before the first, with residual all zeros), residual the stream; both
 * are updated in place. kv: the first of the layers' caches, layer_bytes apart. */
void decode_layers(const Layer *layers, int64_t count, const StepShape *sh, char *kv, uint16_t *x,
                   uint16_t *residual, const int64_t *positions, const float *cos_sin, const int64_t *slots,
                   const int64_t *tables, const int32_t *lens) {
    const int64_t rows = sh->rows, d = sh->head_dim, hidden = sh->hidden, inter = sh->intermediate;
    const int64_t width = (sh->num_heads + 2 * sh->num_kv_heads) * d, len = (sh->max_len + LANES - 1) / LANES * LANES;
    uint16_t *h = malloc(rows * (hidden + width + 3 * inter + sh->num_heads * d) * sizeof(uint16_t));
    uint16_t *qkv = h + rows * hidden, *attn = qkv + rows * width, *gu = attn + rows * sh->num_heads * d;
    uint16_t *act = gu + rows * 2 * inter;
    float *scores = aligned_alloc(64, rows * sh->num_heads * len * sizeof(float));
    const Shape attention = {rows, sh->num_heads, sh->num_kv_heads, d, sh->num_blocks, sh->block_size, width,
                             sh->table_stride, len, 2};
    for (int64_t i = 0; i < count; i++) {
        const Layer *l = layers + i;
        char *cache = kv + i * sh->layer_bytes;
        add_rms_norm((char *)x, (char *)residual, (const char *)l->input_norm, (char *)h, (char *)residual, rows,
                     hidden, sh->eps, 2);
        linear_bf16(l->qkv, h, qkv, rows, width, hidden, hidden);
        rotate_and_store(qkv, cache, sh, positions, cos_sin, slots);
        decode_attention((const char *)qkv, cache, tables, lens, scores, (char *)attn, &attention, sh->scale);
        linear_bf16(l->o, attn, x, rows, hidden, sh->num_heads * d, sh->num_heads * d);
        add_rms_norm((char *)x, (char *)residual, (const char *)l->post_norm, (char *)h, (char *)residual, rows,
                     hidden, sh->eps, 2);
        linear_bf16(l->gate_up, h, gu, rows, 2 * inter, hidden, hidden);
        silu_mul(gu, act, rows, inter);
        linear_bf16(l->down, act, x, rows, hidden, inter, inter);
    }
    free(h);
    free(scores);
}
