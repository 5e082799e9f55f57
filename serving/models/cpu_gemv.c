/* A bfloat16 linear layer for a few rows on the CPU, with AVX-512 BF16 dot products:
 *
 *   y (rows, out) = round(x (rows, in) · W (out, in)^T)
 *
 * products and sums in float32, one rounding to bfloat16 at the end, as torch's bfloat16 linear.
 * A decode step multiplies a handful of rows by every weight once, so it is bound by reading the
 * weights; VDPBF16PS multiplies bfloat16 pairs as they are stored, where widening them to float32
 * first costs more instructions than the memory lets through. Each thread takes a contiguous range
 * of 4 weight rows at a time and runs every input row over them while they sit in L1.
 *
 * in must be a multiple of 32 and out a multiple of 4. Built by serving/native.py for the CPU it
 * runs on; without AVX512_BF16 `available()` returns 0 and the caller keeps its own path.
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
        _mm_storel_epi64((__m128i *)(y + r * out), (__m128i)_mm_cvtneps_pbh(sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3])));
}

int available(void) { return 1; }

/* x rows lie x_stride elements apart; y is (rows, out), contiguous */
void linear_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t rows, int64_t out, int64_t in,
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
#else
int available(void) { return 0; }
#endif
