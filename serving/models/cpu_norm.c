/* The pre-norm step of a Llama layer on the CPU, one call for what takes five torch ops:
 *
 *   h = x (+ residual, rounded to the storage dtype)       total = h   (when a residual is given)
 *   out = round(weight * round(h * 1 / sqrt(mean(h^2) + eps)))
 *
 * with the sum of squares and the products in float32, and round() to the storage dtype (bfloat16
 * or float32, elem_size 2 or 4), the rounding points of transformers' LlamaRMSNorm. dim must be a
 * multiple of 16. Built by serving/native.py for the CPU it runs on.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../native_vec.h"

/* float32 -> the nearest bfloat16 (ties to even, NaN kept), still as float32 bits */
static inline vfloat round_to(vfloat x, int64_t elem_size) { return elem_size == 4 ? x : round_bf16(x); }

static inline void store(char *p, vfloat x, int64_t elem_size) { /* x already rounded */
    if (elem_size == 4) memcpy(p, &x, sizeof x);
    else store_bf16((uint16_t *)p, x);
}

/* lane by lane, in order, as this file always summed: a tree (native_vec.h) would move roundings */
static inline float sum_in_order(vfloat v) {
    float total = 0.0f;
    for (int j = 0; j < LANES; j++) total += v[j];
    return total;
}

void add_rms_norm(const char *x, const char *residual, const char *weight, char *out, char *total, int64_t rows,
                  int64_t dim, float eps, int64_t elem_size) {
    const int64_t chunks = dim / LANES, step = LANES * elem_size, row_bytes = dim * elem_size;
#pragma omp parallel for if (rows >= 16) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        vfloat h[chunks], squares = {0};
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t at = r * row_bytes + c * step;
            vfloat v = load_vec(x + at, elem_size);
            if (residual) {
                v = round_to(v + load_vec(residual + at, elem_size), elem_size);
                store(total + at, v, elem_size);
            }
            h[c] = v;
            squares += v * v;
        }
        const float inv = 1.0f / sqrtf(sum_in_order(squares) / (float)dim + eps);
        for (int64_t c = 0; c < chunks; c++) {
            const vfloat normed = round_to(h[c] * inv, elem_size);
            store(out + r * row_bytes + c * step, round_to(load_vec(weight + c * step, elem_size) * normed, elem_size),
                  elem_size);
        }
    }
}
