/* Vector helpers shared by the CPU path's C sources (GCC vector extensions: LANES floats are one
 * AVX-512 register, or two AVX2 ones). */
#ifndef COUNTERPOINT_NATIVE_VEC_H
#define COUNTERPOINT_NATIVE_VEC_H
#include <stdint.h>
#include <string.h>

#define LANES 16

typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t vuint __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint16_t vhalf __attribute__((vector_size(LANES * sizeof(uint16_t))));
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));

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

/* one vector of LANES bfloat16 or float32 values */
static inline vfloat load_vec(const void *src, int64_t elem_size) {
    vfloat v;
    load_row(src, &v, LANES, elem_size);
    return v;
}

static inline uint16_t to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even, as torch does */
    return (uint16_t)(bits >> 16);
}

/* x rounded to bfloat16 as to_bf16 rounds it, kept as floats */
static inline vfloat round_bf16(vfloat x) {
    const vuint bits = (vuint)x, nan = (vuint)((bits & 0x7fffffffu) > 0x7f800000u);
    const vuint nearest = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    return (vfloat)((nan & (bits | 0x00400000u) & 0xffff0000u) | (~nan & nearest));
}

/* LANES floats already rounded to bfloat16 (round_bf16), stored as bfloat16 */
static inline void store_bf16(uint16_t *dst, vfloat x) {
    const vhalf h = __builtin_convertvector((vuint)x >> 16, vhalf);
    memcpy(dst, &h, sizeof h);
}

static inline float sum_lanes(vfloat v) { /* a halving tree: 4 adds deep, not 16 */
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    return v[0] + v[1];
}

static inline vfloat vselect(vint mask, vfloat a, vfloat b) { return (vfloat)(((vint)a & mask) | ((vint)b & ~mask)); }

static inline vfloat vmax(vfloat a, vfloat b) { return vselect(a > b, a, b); }

static inline float max_lanes(vfloat v) { /* a halving tree, as sum_lanes */
    v = vmax(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3));
    v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1));
    return v[0] > v[1] ? v[0] : v[1];
}

/* e^x for x <= 0, as 2^n e^f with x = n ln 2 + f, |f| <= ln 2 / 2 (7th-degree Taylor: < 1 ulp);
 * 0 below -87 and for -inf */
static inline vfloat exp_neg(vfloat x) {
    const vint under = x < -87.0f;
    x = vselect(under, (vfloat){0} - 87.0f, x);
    const vfloat n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    const vfloat f = (x - n * 0.693359375f) + n * 2.12194440e-4f;            /* ln 2 in two parts */
    vfloat p = (vfloat){0} + 1.0f / 5040;
    p = p * f + 1.0f / 720;
    p = p * f + 1.0f / 120;
    p = p * f + 1.0f / 24;
    p = p * f + 1.0f / 6;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const vint two_n = (__builtin_convertvector(n, vint) + 127) << 23;
    return (vfloat)((vint)(p * (vfloat)two_n) & ~under);
}

/* ln x for normal x > 0 (no zeros, subnormals, infinities or NaNs): x = 2^e m with m in [√½, √2),
 * ln m = 2 atanh(s) with s = (m − 1) / (m + 1), |s| < 0.172, its odd series to s^9 (< 1 ulp) */
static inline vfloat log_pos(vfloat x) {
    const vint bits = (vint)x;
    vint e = ((bits >> 23) & 0xff) - 127;
    vfloat m = (vfloat)((bits & 0x007fffff) | 0x3f800000);
    const vint high = m > 1.41421356f;
    m = vselect(high, m * 0.5f, m);
    e -= high; /* high is −1 where true */
    const vfloat s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    vfloat series = (vfloat){0} + 2.0f / 9;
    series = series * s2 + 2.0f / 7;
    series = series * s2 + 2.0f / 5;
    series = series * s2 + 2.0f / 3;
    series = series * s2 + 2.0f;
    return __builtin_convertvector(e, vfloat) * 0.693147180559945f + series * s;
}
#endif
