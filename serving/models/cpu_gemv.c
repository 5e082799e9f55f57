/* A bfloat16 linear layer for a few rows on the CPU, with AVX-512 BF16 dot products or AVX2 FMAs:
 *
 *   y (rows, out) = round(x (rows, in) · W (out, in)^T)
 *
 * products and sums in float32, one rounding to bfloat16 at the end, as torch's bfloat16 linear.
 * A decode step multiplies a handful of rows by every weight once, so it is bound by reading the
 * weights; VDPBF16PS multiplies bfloat16 pairs as they are stored, where widening them to float32
 * first costs more instructions than the memory lets through. Without them (AVX2), the weights are
 * widened in registers, which still reads half the bytes of a float32 copy. Each thread takes a
 * contiguous range of 4 weight rows at a time and runs every input row over them while they sit in L1.
 *
 * in must be a multiple of 32 and out a multiple of 4. Built by serving/native.py for the CPU it
 * runs on; `available()` says which path was built: 2 AVX512_BF16, 1 AVX2 with FMA, 0 neither,
 * where the caller keeps its own path.
 */
#include <stdint.h>
#include <string.h>

#ifdef __AVX512BF16__
#include <immintrin.h>

#define PAIRS 32 /* bfloat16 values per dot-product instruction */
#define TILE 4   /* weight rows, and input rows, per block of accumulators */

/* the sums of four accumulators' lanes, as four floats */
static inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xee));
    s = _mm512_add_ps(s, _mm512_shuffle_f32x4(s, s, 0x4e));
    s = _mm512_add_ps(s, _mm512_shuffle_f32x4(s, s, 0xb1));
    return _mm512_castps512_ps128(s);
}

static inline __m512bh load_pairs(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512(p); }

/* n (≤ TILE) input rows by TILE weight rows; the compiler specialises it per n */
static inline __attribute__((always_inline)) void tile(const uint16_t *w, const uint16_t *x, uint16_t *y,
                                                       int64_t in, int64_t x_stride, int64_t out, const int n) {
    __m512 acc[TILE][TILE];
    for (int r = 0; r < n; r++)
        for (int k = 0; k < TILE; k++) acc[r][k] = _mm512_setzero_ps();
    for (int64_t c = 0; c < in; c += PAIRS) {
        __m512bh wv[TILE];
        for (int k = 0; k < TILE; k++) {
            wv[k] = load_pairs(w + k * in + c);
            _mm_prefetch((const char *)(w + (TILE + k) * in + c), _MM_HINT_T0);
        }
        for (int r = 0; r < n; r++) {
            const __m512bh xv = load_pairs(x + r * x_stride + c);
            for (int k = 0; k < TILE; k++) acc[r][k] = _mm512_dpbf16_ps(acc[r][k], xv, wv[k]);
        }
    }
    for (int r = 0; r < n; r++) /* VCVTNEPS2BF16 rounds to nearest even, as torch does */
        _mm_storel_epi64((__m128i *)(y + r * out),
                         (__m128i)_mm_cvtneps_pbh(sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3])));
}

/* one VDPBF16PS pass over the weights: 4 weight rows at a time with every input row */
static void linear_dot(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t rows, int64_t out, int64_t in,
                       int64_t x_stride) {
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o += TILE) {
        for (int64_t r = 0; r < rows; r += TILE) {
            const uint16_t *xs = x + r * x_stride;
            uint16_t *ys = y + r * out + o;
            switch (rows - r >= TILE ? TILE : rows - r) {
                case 1: tile(w + o * in, xs, ys, in, x_stride, out, 1); break;
                case 2: tile(w + o * in, xs, ys, in, x_stride, out, 2); break;
                case 3: tile(w + o * in, xs, ys, in, x_stride, out, 3); break;
                default: tile(w + o * in, xs, ys, in, x_stride, out, 4); break;
            }
        }
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include "cpu_amx.h"

int available(void) { return amx_usable() ? 3 : 2; }

/* x rows lie x_stride elements apart; y is (rows, out), contiguous */
void linear_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t rows, int64_t out, int64_t in,
                 int64_t x_stride) {
    if (rows >= AMX_ROWS && out % 16 == 0 && amx_usable()) linear_amx(w, x, y, rows, out, in, x_stride);
    else linear_dot(w, x, y, rows, out, in, x_stride);
}
#else
int available(void) { return 2; }

void linear_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t rows, int64_t out, int64_t in,
                 int64_t x_stride) {
    linear_dot(w, x, y, rows, out, in, x_stride);
}
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <stdlib.h>

/* Without bfloat16 dot products, a bfloat16 is the top half of a float: a weight vector of 16
 * values gives its 8 even ones by a shift and its 8 odd ones by a mask, as floats, with no
 * shuffles. The input rows are widened once per call into the same even/odd order. */
#define PAIRS 32 /* values per step along a row: one cache line of each weight row */
#define TILE 4   /* weight rows per block */
#define ROWS 2   /* input rows per block: 8 accumulators, 4 input vectors and a weight fit 16 registers */

static inline __m256 evens(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline __m256 odds(__m256i v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

/* a bfloat16 row as floats, every 16 values as their 8 even then their 8 odd ones */
static void widen(const uint16_t *x, float *xw, int64_t in) {
    for (int64_t c = 0; c < in; c += 16) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(x + c));
        _mm256_store_ps(xw + c, evens(v));
        _mm256_store_ps(xw + c + 8, odds(v));
    }
}

/* the sums of four accumulators' lanes, as four floats */
static inline __m128 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* four floats rounded to nearest even bfloat16, NaN to torch's quiet NaN, as four uint16 in the low 8 bytes */
static inline __m128i to_bf16(__m128 s) {
    const __m128i bits = _mm_castps_si128(s);
    const __m128i odd = _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1));
    __m128i r = _mm_srli_epi32(_mm_add_epi32(bits, _mm_add_epi32(odd, _mm_set1_epi32(0x7fff))), 16);
    r = _mm_blendv_epi8(r, _mm_set1_epi32(0x7fc0), _mm_castps_si128(_mm_cmpunord_ps(s, s)));
    return _mm_packus_epi32(r, r);
}

/* n (≤ ROWS) widened input rows by TILE weight rows; the compiler specialises it per n */
static inline __attribute__((always_inline)) void tile(const uint16_t *w, const float *xw, uint16_t *y,
                                                       int64_t in, int64_t out, const int n) {
    __m256 acc[ROWS][TILE];
    for (int r = 0; r < n; r++)
        for (int k = 0; k < TILE; k++) acc[r][k] = _mm256_setzero_ps();
    for (int64_t c = 0; c < in; c += PAIRS) {
        for (int k = 0; k < TILE; k++) _mm_prefetch((const char *)(w + (TILE + k) * in + c), _MM_HINT_T0);
        for (int64_t h = c; h < c + PAIRS; h += 16) {
            __m256 xe[ROWS], xo[ROWS];
            for (int r = 0; r < n; r++) {
                xe[r] = _mm256_load_ps(xw + r * in + h);
                xo[r] = _mm256_load_ps(xw + r * in + h + 8);
            }
            for (int k = 0; k < TILE; k++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k * in + h));
                const __m256 we = evens(wv), wo = odds(wv);
                for (int r = 0; r < n; r++)
                    acc[r][k] = _mm256_fmadd_ps(wo, xo[r], _mm256_fmadd_ps(we, xe[r], acc[r][k]));
            }
        }
    }
    for (int r = 0; r < n; r++)
        _mm_storel_epi64((__m128i *)(y + r * out), to_bf16(sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3])));
}

int available(void) { return 1; }

void linear_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t rows, int64_t out, int64_t in,
                 int64_t x_stride) {
    float *xw = aligned_alloc(64, (size_t)(rows * in) * sizeof(float));
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) widen(x + r * x_stride, xw + r * in, in);
        #pragma omp for schedule(static)
        for (int64_t o = 0; o < out; o += TILE) {
            for (int64_t r = 0; r < rows; r += ROWS) {
                if (rows - r >= ROWS) tile(w + o * in, xw + r * in, y + r * out + o, in, out, ROWS);
                else tile(w + o * in, xw + r * in, y + r * out + o, in, out, 1);
            }
        }
    }
    free(xw);
}
#else
int available(void) { return 0; }
#endif
