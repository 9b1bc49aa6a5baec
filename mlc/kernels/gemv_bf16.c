/* bf16 kernels for the few-row steps of decoding on a CPU, where torch's per-call overhead or its
 * widening of bf16 dominates. Built by mlc/kernels/native.py on first use, for the CPU it runs on,
 * only where the compiler targets AVX512_BF16.
 *
 * mlc_gemv_bf16: y = W x for one row, the weight-streaming product of a decode step at batch 1. One
 * VDPBF16PS multiplies 32 bf16 pairs and accumulates in fp32; torch's bf16 mv widens each element
 * first. Accumulation is fp32, the result is rounded to bf16 (nearest even) like torch's. Rows are
 * split across OpenMP threads; linked against the libgomp torch has already loaded, so both share one
 * thread pool.
 *
 * mlc_rms_norm_bf16: RMSNorm of a few rows in one call instead of torch's seven ops, in transformers'
 * bf16 order: n = bf16(x * rsqrt(mean(x^2) + eps)) in fp32, then y = bf16(w * n).
 * mlc_add_rms_norm_bf16: the residual sum s = bf16(x + h) and its RMSNorm, in one call (a decoder layer's
 * x + attention(x), then post_attention_layernorm).
 * mlc_silu_mul_bf16: SwiGLU's bf16(bf16(silu(gate)) * up) from the fused gate/up projection's rows, in torch's
 * order (silu = g / (1 + e^-g) in fp32, rounded; then the product, rounded), one call instead of three ops.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#if !defined(__AVX512BF16__)
#error "gemv_bf16.c needs AVX512_BF16"
#endif

static inline uint16_t round_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m512bh load_bf16(const uint16_t *p, __mmask32 mask) {
    return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

/* Rows r0..r1-1, four at a time so each load of x serves four rows. */
static void gemv_rows(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t r0, int64_t r1, int64_t k) {
    const int64_t full = k & ~(int64_t)31;
    const __mmask32 tail = (__mmask32)((1ull << (k - full)) - 1ull);
    int64_t n = r0;
    for (; n + 4 <= r1; n += 4) {
        const uint16_t *w0 = w + n * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < full; i += 32) {
            const __m512bh xv = load_bf16(x + i, 0xffffffffu);
            a0 = _mm512_dpbf16_ps(a0, load_bf16(w0 + i, 0xffffffffu), xv);
            a1 = _mm512_dpbf16_ps(a1, load_bf16(w1 + i, 0xffffffffu), xv);
            a2 = _mm512_dpbf16_ps(a2, load_bf16(w2 + i, 0xffffffffu), xv);
            a3 = _mm512_dpbf16_ps(a3, load_bf16(w3 + i, 0xffffffffu), xv);
        }
        if (tail) {
            const __m512bh xv = load_bf16(x + full, tail);
            a0 = _mm512_dpbf16_ps(a0, load_bf16(w0 + full, tail), xv);
            a1 = _mm512_dpbf16_ps(a1, load_bf16(w1 + full, tail), xv);
            a2 = _mm512_dpbf16_ps(a2, load_bf16(w2 + full, tail), xv);
            a3 = _mm512_dpbf16_ps(a3, load_bf16(w3 + full, tail), xv);
        }
        y[n] = round_to_bf16(_mm512_reduce_add_ps(a0));
        y[n + 1] = round_to_bf16(_mm512_reduce_add_ps(a1));
        y[n + 2] = round_to_bf16(_mm512_reduce_add_ps(a2));
        y[n + 3] = round_to_bf16(_mm512_reduce_add_ps(a3));
    }
    for (; n < r1; n++) {
        const uint16_t *w0 = w + n * k;
        __m512 a0 = _mm512_setzero_ps();
        for (int64_t i = 0; i < full; i += 32)
            a0 = _mm512_dpbf16_ps(a0, load_bf16(w0 + i, 0xffffffffu), load_bf16(x + i, 0xffffffffu));
        if (tail) a0 = _mm512_dpbf16_ps(a0, load_bf16(w0 + full, tail), load_bf16(x + full, tail));
        y[n] = round_to_bf16(_mm512_reduce_add_ps(a0));
    }
}

/* w: [n, k] row-major bf16, x: [k] bf16, y: [n] bf16. */
void mlc_gemv_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t n, int64_t k, int threads) {
    if (threads <= 1 || n < 64) {
        gemv_rows(w, x, y, 0, n, k);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t per = (((n + nt - 1) / nt) + 3) & ~(int64_t)3;
        const int64_t r0 = t * per, r1 = r0 + per < n ? r0 + per : n;
        if (r0 < r1) gemv_rows(w, x, y, r0, r1, k);
    }
}

static inline __m512 widen(const uint16_t *p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

static inline __m512 round_bf16_ps(__m512 v) { /* fp32 -> nearest bf16 -> fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* x, y: [rows, dim] bf16 (row-major), w: [dim] bf16. */
void mlc_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t dim, float eps) {
    const int64_t full = dim & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (dim - full)) - 1u);
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim;
        uint16_t *yr = y + r * dim;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < full; i += 16) {
            const __m512 v = widen(xr + i, 0xffff);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        if (tail) {
            const __m512 v = widen(xr + full, tail);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)dim + eps));
        for (int64_t i = 0; i < dim; i += 16) {
            const __mmask16 m = i < full ? (__mmask16)0xffff : tail;
            const __m512 n = round_bf16_ps(_mm512_mul_ps(widen(xr + i, m), scale));
            _mm256_mask_storeu_epi16(yr + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(widen(w + i, m), n)));
        }
    }
}

/* x, h, sum, y: [rows, dim] bf16, w: [dim] bf16; sum = x + h, y = RMSNorm(sum). */
void mlc_add_rms_norm_bf16(const uint16_t *x, const uint16_t *h, const uint16_t *w, uint16_t *sum, uint16_t *y,
                           int64_t rows, int64_t dim, float eps) {
    const int64_t full = dim & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (dim - full)) - 1u);
    for (int64_t i = 0; i < rows * dim; i += dim)
        for (int64_t c = 0; c < dim; c += 16) {
            const __mmask16 m = c < full ? (__mmask16)0xffff : tail;
            _mm256_mask_storeu_epi16(sum + i + c, m,
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(widen(x + i + c, m), widen(h + i + c, m))));
        }
    mlc_rms_norm_bf16(sum, w, y, rows, dim, eps);
}

static inline __m512 exp_ps(__m512 x) { /* e^x: Cephes' expf polynomial, scaled by 2^n with VSCALEFPS */
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* gate_up: [rows, 2 * inter] bf16 (gate, then up), out: [rows, inter] bf16. */
void mlc_silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inter) {
    const int64_t full = inter & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (inter - full)) - 1u);
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gate_up + r * 2 * inter, *u = g + inter;
        for (int64_t c = 0; c < inter; c += 16) {
            const __mmask16 m = c < full ? (__mmask16)0xffff : tail;
            const __m512 gv = widen(g + c, m);
            const __m512 silu = round_bf16_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv)))));
            _mm256_mask_storeu_epi16(out + r * inter + c, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, widen(u + c, m))));
        }
    }
}
