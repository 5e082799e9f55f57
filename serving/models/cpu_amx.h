/* The bfloat16 linear of cpu_gemv.c on AMX tiles, for CPUs that have them (Sapphire Rapids on):
 *
 *   y (rows, out) = round(x (rows, in) · W (out, in)^T)
 *
 * TDPBF16PS multiplies a 16 × 32 bfloat16 tile A by a 32 × 16 tile B stored as 16 rows of 16
 * pairs, into 16 × 16 float32 sums: 8,192 products an instruction, where VDPBF16PS does 32. A
 * tile of 16 weight rows is A as the weight lies in memory (16 rows of 32 values, a row stride
 * apart), so the weights need no second copy; the input rows, a few, are laid out as B once per
 * call. The sums come out as (weight row, input row) and are transposed in registers as they are
 * rounded. Tile loads read the weights more slowly than the VDPBF16PS loop does (about 30 against
 * 45 GB/s on a 2-core Xeon VM; neither prefetching nor double-buffered tiles changed that), so at
 * fewer than AMX_ROWS rows that loop runs instead. Included by cpu_gemv.c where the compiler
 * targets AMX.
 */
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_ROWS 6 /* input rows from which the tiles beat the VDPBF16PS loop (4: 0.8x, 6: 1.1x, 8: 1.3-1.6x) */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux gives a process AMX tile state only once it asks; the answer does not change */
static int amx_usable(void) {
    static int usable = -1;
    if (usable < 0) usable = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return usable;
}

/* Tiles 0-3: sums (16 × 16 floats); 4-5: weight rows (A); 6-7: input rows (B). All 16 rows of 64 bytes. */
static void configure_tiles(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t bytes_per_row[16];
        uint8_t rows[16];
    } __attribute__((aligned(64))) config = {.palette = 1};
    for (int t = 0; t < 8; t++) {
        config.bytes_per_row[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

/* a 16 × 16 block of 32-bit values, transposed in registers: the off-diagonal halves, then quarters,
 * eighths and sixteenths of each block swap places (64 two-source permutes). Row pairs (i, i + h)
 * take their lanes as SWAP_LOW / SWAP_HIGH[level] say (0-15: row i's, 16-31: row i + h's), for h =
 * 8 >> level. Unrolled in full, with the tables as constants, so that the 16 rows stay in registers:
 * the loop that built its tables on the stack spilled them, and took a 32-row linear 1.7x longer. */
static const int32_t SWAP_LOW[4][16] __attribute__((aligned(64))) = {
    {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
    {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
    {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
    {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
static const int32_t SWAP_HIGH[4][16] __attribute__((aligned(64))) = {
    {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
    {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
    {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
    {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}};

static inline __attribute__((always_inline)) void transpose16(__m512i v[16]) {
#pragma GCC unroll 4
    for (int level = 0; level < 4; level++) {
        const int h = 8 >> level;
        const __m512i lo = _mm512_load_si512(SWAP_LOW[level]), hi = _mm512_load_si512(SWAP_HIGH[level]);
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            if (i & h) continue;
            const __m512i a = v[i], b = v[i + h];
            v[i] = _mm512_permutex2var_epi32(a, lo, b);
            v[i + h] = _mm512_permutex2var_epi32(a, hi, b);
        }
    }
}

/* x's rows as B tiles: per group of 16 rows and per 32 columns, a 1 KiB tile whose row kk holds
 * each input row's bfloat16 pair kk (as one uint32), zeros for rows past the last */
static void lay_out_rows(const uint16_t *x, uint32_t *b, int64_t rows, int64_t in, int64_t x_stride) {
    const int64_t chunks = in / 32;
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        for (int64_t c = 0; c < chunks; c++) {
            __m512i v[16];
            for (int r = 0; r < 16; r++)
                v[r] = r0 + r < rows ? _mm512_loadu_si512(x + (r0 + r) * x_stride + c * 32) : _mm512_setzero_si512();
            transpose16(v);
            uint32_t *tile = b + ((r0 / 16) * chunks + c) * 256;
            for (int k = 0; k < 16; k++) _mm512_store_si512(tile + k * 16, v[k]);
        }
    }
}

/* 16 × 16 sums (weight row i, input row r) to y rows r0.. (at most `n`), columns o..o+15 */
static inline void store_sums(const float *sums, uint16_t *y, int64_t r0, int64_t n, int64_t o, int64_t out) {
    __m512i v[16];
    for (int i = 0; i < 16; i++) v[i] = _mm512_load_si512(sums + i * 16);
    transpose16(v);
    for (int64_t r = 0; r < n && r < 16; r++)
        _mm256_storeu_si256((__m256i *)(y + (r0 + r) * out + o), (__m256i)_mm512_cvtneps_pbh((__m512)v[r]));
}

/* Weight rows o..o+16·na-1 by input row groups g..g+nb-1 (na, nb ≤ 2); the compiler specialises it
 * per (na, nb), since tile numbers must be constants. */
static inline __attribute__((always_inline)) void amx_block(const uint16_t *w, const uint32_t *b, uint16_t *y,
                                                            int64_t o, int64_t g, int64_t rows, int64_t out,
                                                            int64_t in, const int na, const int nb) {
    const int64_t chunks = in / 32, stride = in * sizeof(uint16_t);
    const uint16_t *a0 = w + o * in, *a1 = a0 + 16 * in;
    const uint32_t *b0 = b + g * chunks * 256, *b1 = b0 + chunks * 256;
    _tile_zero(0);
    if (nb > 1) _tile_zero(1);
    if (na > 1) _tile_zero(2);
    if (na > 1 && nb > 1) _tile_zero(3);
    for (int64_t c = 0; c < chunks; c++) {
        _tile_loadd(4, a0 + c * 32, stride);
        _tile_loadd(6, b0 + c * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (nb > 1) {
            _tile_loadd(7, b1 + c * 256, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (na > 1) {
            _tile_loadd(5, a1 + c * 32, stride);
            _tile_dpbf16ps(2, 5, 6);
            if (nb > 1) _tile_dpbf16ps(3, 5, 7);
        }
    }
    float sums[4][256] __attribute__((aligned(64)));
    const int64_t r0 = g * 16;
    _tile_stored(0, sums[0], 64);
    store_sums(sums[0], y, r0, rows - r0, o, out);
    if (nb > 1) {
        _tile_stored(1, sums[1], 64);
        store_sums(sums[1], y, r0 + 16, rows - r0 - 16, o, out);
    }
    if (na > 1) {
        _tile_stored(2, sums[2], 64);
        store_sums(sums[2], y, r0, rows - r0, o + 16, out);
    }
    if (na > 1 && nb > 1) {
        _tile_stored(3, sums[3], 64);
        store_sums(sums[3], y, r0 + 16, rows - r0 - 16, o + 16, out);
    }
}

/* out a multiple of 16, in of 32; each thread takes 32 weight rows at a time with all input rows */
static void linear_amx(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t rows, int64_t out, int64_t in,
                       int64_t x_stride) {
    const int64_t groups = (rows + 15) / 16;
    uint32_t *b = aligned_alloc(64, groups * (in / 32) * 256 * sizeof(uint32_t));
    lay_out_rows(x, b, rows, in, x_stride);
    #pragma omp parallel
    {
        configure_tiles();
        #pragma omp for schedule(static)
        for (int64_t o = 0; o < out; o += 32) {
            for (int64_t g = 0; g < groups; g += 2) {
                const int two_a = out - o >= 32, two_b = groups - g >= 2;
                if (two_a && two_b) amx_block(w, b, y, o, g, rows, out, in, 2, 2);
                else if (two_a) amx_block(w, b, y, o, g, rows, out, in, 2, 1);
                else if (two_b) amx_block(w, b, y, o, g, rows, out, in, 1, 2);
                else amx_block(w, b, y, o, g, rows, out, in, 1, 1);
            }
        }
        _tile_release();
    }
    free(b);
}
