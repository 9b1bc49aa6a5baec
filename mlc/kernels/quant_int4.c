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
