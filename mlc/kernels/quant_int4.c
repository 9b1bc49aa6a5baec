/* Dequantise torch's CPU int4 tiles to bf16 for the prefill GEMM (mlc/kernels/quant_linear.py IntLinear).
 * Built with gemv_bf16.c into one library by mlc/kernels/native.py.
 *
 * torch's `_convert_weight_to_int4pack_for_cpu` layout: for each tile of 64 output rows and each input
 * column kk, 32 bytes; byte j holds row j in its low nibble and row j + 32 in its high nibble, as the
 * unsigned u = q + 8. scales_and_zeros is bf16 [K/G][N][2] and the weight is (u - 8) * scale + zero.
 *
 * The output is W^T for rows r0..r1 (multiples of 64), [K][r1 - r0] in bf16: for one kk the 64 values
 * of a tile are contiguous, so each 32-byte load becomes four 16-lane converts, one FMA each and 128
 * bytes of stores, with no transpose. torch's path (unpack, cast, subtract, multiply, add) makes five
 * passes over the weight; this makes one, and the caller keeps its block in cache for the GEMM
 * (benchmarks/quant_prefill.py). (u - 8) * scale + zero is one fp32 FMA rounded once to bf16 (nearest
 * even); torch's bf16 ops round after the multiply and again after the add, so asymmetric weights can
 * differ in the last bf16 bit; symmetric ones (zero = 0) are equal.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX512BF16__)
#error "quant_int4.c needs AVX512_BF16"
#endif

void mlc_dequant_int4pack_t(const uint8_t *tiles, const uint16_t *scales_zeros, uint16_t *out,
                            int64_t n, int64_t k, int64_t g, int64_t r0, int64_t r1, int threads) {
    const int64_t width = r1 - r0;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = r0 / 64; t < r1 / 64; t++) {
        const uint8_t *tile = tiles + t * k * 32;
        uint16_t *column = out + (t * 64 - r0);
        __m512 scale[4], zero[4];
        for (int64_t kk = 0; kk < k; kk++) {
            if (kk % g == 0) { /* a new group: its 64 (scale, zero) pairs, bf16 -> fp32 by a shift */
                const uint16_t *pairs = scales_zeros + ((kk / g) * n + t * 64) * 2;
                for (int q = 0; q < 4; q++) {
                    const __m512i p = _mm512_loadu_si512((const void *)(pairs + q * 32));
                    scale[q] = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
                    zero[q] = _mm512_castsi512_ps(_mm512_and_si512(p, _mm512_set1_epi32((int)0xffff0000u)));
                }
            }
            const __m256i bytes = _mm256_loadu_si256((const __m256i *)(tile + kk * 32));
            const __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi8(15));
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(15));
            const __m128i rows[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                                     _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
            uint16_t *dst = column + kk * width;
            for (int q = 0; q < 4; q++) {
                const __m512 u = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(rows[q]));
                const __m512 w = _mm512_fmadd_ps(_mm512_sub_ps(u, _mm512_set1_ps(8.0f)), scale[q], zero[q]);
                _mm256_storeu_si256((__m256i *)(dst + q * 16), (__m256i)_mm512_cvtneps_pbh(w));
            }
        }
    }
}

/* int4 decode: y = x W^T for a few rows of bf16 x (M < 16, a decode step), straight from the same tiles.
 *
 * torch's `_weight_int4pack_mm_for_cpu` is far from memory bandwidth on wide layers (benchmarks/int4_decode.py);
 * this reads each weight byte once and keeps the arithmetic exact up to fp32 accumulation: u - 8 is an
 * integer in [-8, 7], exact in bf16, and x is bf16, so one VDPBF16PS multiplies 32 (weight, x) pairs
 * exactly and accumulates in fp32. Per group of G columns and each row n,
 *     y[n] += scale[n] * sum_kk (u[n,kk] - 8) x[kk]  +  zero[n] * sum_kk x[kk],
 * the same value as x @ ((u - 8) * scale + zero)^T in fp32, in another order. Activations stay bf16:
 * nothing is rounded to int8.
 *
 * VDPBF16PS wants two adjacent columns (kk, kk + 1) of one row in each 32-bit lane. A 64-byte load holds
 * columns kk and kk + 1 of a tile; one byte permute puts row j's two bytes side by side, nibble masks
 * split rows j and j + 32, two byte shuffles look up the bf16 bytes of u - 8 and two unpacks make the
 * 16-bit words. The permute is chosen so the four operands hold rows 0-15, 16-31, 32-47, 48-63 in order,
 * the order of the scales. Tiles of 64 rows are split across OpenMP threads.
 */
#define TILE 64
#define ROW_CHUNK 4 /* rows of x whose accumulators stay in registers */

typedef struct {
    __m512i permute, lut_lo, lut_hi, nibble;
} decode_consts;

static decode_consts make_consts(void) {
    decode_consts c;
    uint8_t idx[64], lo[64], hi[64];
    for (int p = 0; p < 32; p++) { /* pair p -> row j: operand (p/4 % 2) of the lane's low/high half, lane p/8 */
        const int j = ((p / 4) % 2) * 16 + 4 * (p / 8) + p % 4;
        idx[2 * p] = (uint8_t)j;
        idx[2 * p + 1] = (uint8_t)(32 + j);
    }
    for (int i = 0; i < 64; i++) { /* bf16 of the integer u - 8: the top half of its fp32 bits */
        const float f = (float)((i % 16) - 8);
        uint32_t bits;
        memcpy(&bits, &f, sizeof bits);
        lo[i] = (uint8_t)(bits >> 16);
        hi[i] = (uint8_t)(bits >> 24);
    }
    c.permute = _mm512_loadu_si512(idx);
    c.lut_lo = _mm512_loadu_si512(lo);
    c.lut_hi = _mm512_loadu_si512(hi);
    c.nibble = _mm512_set1_epi8(15);
    return c;
}

/* Columns kk, kk + 1 of a tile (64 bytes at src) as four bf16 operands: rows 0-15, 16-31, 32-47, 48-63. */
static inline __attribute__((always_inline)) void decode_pair(const uint8_t *src, const decode_consts *c, __m512i b[4]) {
    const __m512i v = _mm512_permutexvar_epi8(c->permute, _mm512_loadu_si512((const void *)src));
    const __m512i lo = _mm512_and_si512(v, c->nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), c->nibble);
    const __m512i lo_l = _mm512_shuffle_epi8(c->lut_lo, lo), lo_h = _mm512_shuffle_epi8(c->lut_hi, lo);
    const __m512i hi_l = _mm512_shuffle_epi8(c->lut_lo, hi), hi_h = _mm512_shuffle_epi8(c->lut_hi, hi);
    b[0] = _mm512_unpacklo_epi8(lo_l, lo_h);
    b[1] = _mm512_unpackhi_epi8(lo_l, lo_h);
    b[2] = _mm512_unpacklo_epi8(hi_l, hi_h);
    b[3] = _mm512_unpackhi_epi8(hi_l, hi_h);
}

static inline __m512bh x_pair(const uint16_t *x) { /* x[kk], x[kk + 1] in every 32-bit lane */
    int32_t v;
    memcpy(&v, x, sizeof v);
    return (__m512bh)_mm512_set1_epi32(v);
}

/* tot[r] += scale * part[r] + zero * xsum[r] for the group's 64 (scale, zero) pairs at sz. */
static inline __attribute__((always_inline)) void add_group(float *tot, const __m512 part[][4], const uint16_t *sz,
                                                            const float *xsum, int64_t groups, int has_zero, const int rows) {
    for (int q = 0; q < 4; q++) {
        const __m512i p = _mm512_loadu_si512((const void *)(sz + q * 32));
        const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
        const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(p, _mm512_set1_epi32((int)0xffff0000u)));
        for (int r = 0; r < rows; r++) {
            __m512 t = _mm512_fmadd_ps(part[r][q], scale, _mm512_loadu_ps(tot + r * TILE + q * 16));
            if (has_zero) t = _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[r * groups]), t);
            _mm512_storeu_ps(tot + r * TILE + q * 16, t);
        }
    }
}

/* Up to ROW_CHUNK rows, decoding each pair of columns as it goes (the batch-1 path). */
static inline __attribute__((always_inline)) void tile_direct(const uint8_t *tile, const uint16_t *sz, const uint16_t *x,
                                                              const float *xsum, float *tot, int64_t n, int64_t k,
                                                              int64_t g, int has_zero, const decode_consts *c, const int rows) {
    for (int64_t k0 = 0; k0 < k; k0 += g) {
        __m512 part[ROW_CHUNK][4];
        for (int r = 0; r < rows; r++)
            for (int q = 0; q < 4; q++) part[r][q] = _mm512_setzero_ps();
        for (int64_t kk = k0; kk < k0 + g; kk += 2) {
            __m512i b[4];
            decode_pair(tile + kk * 32, c, b);
            for (int r = 0; r < rows; r++) {
                const __m512bh xv = x_pair(x + r * k + kk);
                for (int q = 0; q < 4; q++) part[r][q] = _mm512_dpbf16_ps(part[r][q], (__m512bh)b[q], xv);
            }
        }
        add_group(tot, part, sz + (k0 / g) * n * 2, xsum + k0 / g, k / g, has_zero, rows);
    }
}

/* Rows r0..r0+rows of one group from operands decoded once into buf (more rows than ROW_CHUNK). */
static inline __attribute__((always_inline)) void group_rows(const __m512i *buf, const uint16_t *sz, const uint16_t *x,
                                                             const float *xsum, float *tot, int64_t k, int64_t k0,
                                                             int64_t g, int has_zero, const int rows) {
    __m512 part[ROW_CHUNK][4];
    for (int r = 0; r < rows; r++)
        for (int q = 0; q < 4; q++) part[r][q] = _mm512_setzero_ps();
    for (int64_t p = 0; p < g / 2; p++) {
        for (int r = 0; r < rows; r++) {
            const __m512bh xv = x_pair(x + r * k + k0 + 2 * p);
            for (int q = 0; q < 4; q++) part[r][q] = _mm512_dpbf16_ps(part[r][q], (__m512bh)buf[p * 4 + q], xv);
        }
    }
    add_group(tot, part, sz, xsum, k / g, has_zero, rows);
}

static void tile_mm(const uint8_t *tile, const uint16_t *sz, const uint16_t *x, const float *xsum, uint16_t *y,
                    int64_t m, int64_t n, int64_t k, int64_t g, int has_zero, const decode_consts *c, __m512i *buf) {
    float tot[16 * TILE] __attribute__((aligned(64)));
    for (int64_t m0 = 0; m0 < m; m0 += 16) {
        const int64_t rows = m - m0 < 16 ? m - m0 : 16;
        const uint16_t *xm = x + m0 * k;
        const float *xs = xsum + m0 * (k / g);
        memset(tot, 0, sizeof tot);
        if (rows <= ROW_CHUNK) {
            switch (rows) { /* constant row counts: the accumulators become registers */
            case 1: tile_direct(tile, sz, xm, xs, tot, n, k, g, has_zero, c, 1); break;
            case 2: tile_direct(tile, sz, xm, xs, tot, n, k, g, has_zero, c, 2); break;
            case 3: tile_direct(tile, sz, xm, xs, tot, n, k, g, has_zero, c, 3); break;
            default: tile_direct(tile, sz, xm, xs, tot, n, k, g, has_zero, c, 4); break;
            }
        } else {
            for (int64_t k0 = 0; k0 < k; k0 += g) {
                for (int64_t kk = k0; kk < k0 + g; kk += 2) decode_pair(tile + kk * 32, c, buf + (kk - k0) * 2);
                const uint16_t *szg = sz + (k0 / g) * n * 2;
                for (int64_t r0 = 0; r0 < rows; r0 += ROW_CHUNK) {
                    const uint16_t *xr = xm + r0 * k;
                    const float *xsr = xs + r0 * (k / g) + k0 / g;
                    float *tr = tot + r0 * TILE;
                    switch (rows - r0 < ROW_CHUNK ? rows - r0 : ROW_CHUNK) {
                    case 1: group_rows(buf, szg, xr, xsr, tr, k, k0, g, has_zero, 1); break;
                    case 2: group_rows(buf, szg, xr, xsr, tr, k, k0, g, has_zero, 2); break;
                    case 3: group_rows(buf, szg, xr, xsr, tr, k, k0, g, has_zero, 3); break;
                    default: group_rows(buf, szg, xr, xsr, tr, k, k0, g, has_zero, 4); break;
                    }
                }
            }
        }
        for (int64_t r = 0; r < rows; r++)
            for (int q = 0; q < 4; q++)
                _mm256_storeu_si256((__m256i *)(y + (m0 + r) * n + q * 16), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(tot + r * TILE + q * 16)));
    }
}

/* The sum of each row's x over each group, for the zero terms: xsum [m, k/g], zeroed by the caller. */
void mlc_int4_group_sums(const uint16_t *x, float *xsum, int64_t m, int64_t k, int64_t g) {
    for (int64_t r = 0; r < m; r++)
        for (int64_t i = 0; i < k; i++) {
            const uint32_t bits = (uint32_t)x[r * k + i] << 16;
            float f;
            memcpy(&f, &bits, sizeof f);
            xsum[r * (k / g) + i / g] += f;
        }
}

/* The product below from inside an OpenMP parallel region (decode_attention.c's decoder layer): each thread of the
 * team calls it with the same arguments and computes its share of the tiles; no barrier at the end. */
void mlc_int4pack_mm_team(const uint8_t *tiles, const uint16_t *scales_zeros, const uint16_t *x, const float *xsum,
                          uint16_t *y, int64_t m, int64_t n, int64_t k, int64_t g, int has_zero) {
    const decode_consts c = make_consts();
    __m512i *buf = m > ROW_CHUNK ? (__m512i *)aligned_alloc(64, (size_t)g * 2 * sizeof(__m512i)) : NULL;
    #pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < n / TILE; t++)
        tile_mm(tiles + t * k * 32, scales_zeros + t * TILE * 2, x, xsum, y + t * TILE, m, n, k, g, has_zero, &c, buf);
    free(buf);
}

/* x: [m, k] bf16, tiles and scales_zeros as above (g even, k a multiple of g, n of 64), y: [m, n] bf16.
 * has_zero = 0 skips the zero terms (symmetric weights: every zero is 0). */
void mlc_int4pack_mm_bf16(const uint8_t *tiles, const uint16_t *scales_zeros, const uint16_t *x, uint16_t *y,
                          int64_t m, int64_t n, int64_t k, int64_t g, int has_zero, int threads) {
    const int64_t groups = k / g;
    float *xsum = (float *)calloc((size_t)(m * groups), sizeof(float));
    if (has_zero) mlc_int4_group_sums(x, xsum, m, k, g);
    const decode_consts c = make_consts();
    const int64_t tiles_n = n / TILE;
    const int nt = threads < tiles_n ? threads : (int)tiles_n;
    #pragma omp parallel num_threads(nt > 1 ? nt : 1) if (nt > 1)
    {
        __m512i *buf = m > ROW_CHUNK ? (__m512i *)aligned_alloc(64, (size_t)g * 2 * sizeof(__m512i)) : NULL;
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles_n; t++)
            tile_mm(tiles + t * k * 32, scales_zeros + t * TILE * 2, x, xsum, y + t * TILE, m, n, k, g, has_zero, &c, buf);
        free(buf);
    }
    free(xsum);
}
