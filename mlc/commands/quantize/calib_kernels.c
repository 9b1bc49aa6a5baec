/* The elementwise work and the attention of a calibration forward pass (mlc quantize, LLM.int8's statistic), fused
 * into a few passes over memory, each also taking max |y| per feature of what it writes: that maximum is the
 * statistic of the Linear the output feeds. Built by mlc/commands/quantize/calib_forward.py on first use, for the
 * CPU it runs on, only where the compiler targets AVX512_BF16; callers fall back to torch's ops otherwise.
 *
 * Rounding follows the bf16 model's forward op by op (each torch op on bf16 rounds its result to bf16): RMSNorm
 * normalises in fp32, rounds, scales by the bf16 weight and rounds; SiLU rounds, then the product with up rounds;
 * RoPE rounds x*cos, roll(x)*sin and their sum. The attention is causal, with fp32 scores and softmax, the
 * probabilities rounded to bf16 for the product with V (accumulated in fp32), as torch's CPU flash kernel does;
 * sums run in another order than torch's, so a result can differ from torch's in its last bf16 bit.
 *
 * Rows (tokens) are split across OpenMP threads, linked against the libgomp torch has already loaded. Each thread
 * keeps its own maxima and merges them at the end (a maximum does not depend on the order).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX512BF16__)
#error "calib_kernels.c needs AVX512_BF16"
#endif

static inline __m512 widen(const uint16_t *p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

static inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); } /* nearest even */

static inline __m512 round_bf16_ps(__m512 v) { /* fp32 -> nearest bf16 -> fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}

static inline __m512 abs_ps(__m512 v) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)));
}

/* e^x in fp32 (Cephes' expf polynomial, about 1 ulp), 0 below -87.3 and +inf above 88.7. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
}

/* amax[f] = max(amax[f], local[f]) for the features of one thread, under a lock. */
static void merge_max(float *amax, const float *local, int64_t dim) {
#pragma omp critical(mlc_calib_amax)
    for (int64_t i = 0; i < dim; i++)
        if (local[i] > amax[i]) amax[i] = local[i];
}

static float *zeroed(int64_t n) {
    float *p = (float *)malloc((size_t)n * sizeof(float));
    if (p) memset(p, 0, (size_t)n * sizeof(float));
    return p;
}

/* h = bf16(x + r) (into h when r is given; h = x otherwise), y = bf16(w * bf16(h * rsqrt(mean(h^2) + eps))), and
 * amax = max |y| per feature (when amax is given). x, r, h, y: [rows, dim] bf16; w: [dim] bf16; dim % 16 == 0.
 * Returns 0, or -1 when memory for the per-thread maxima could not be allocated (nothing merged). */
int mlc_calib_add_rms_norm(const uint16_t *x, const uint16_t *r, uint16_t *h, const uint16_t *w, uint16_t *y,
                           float *amax, int64_t rows, int64_t dim, float eps, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *local = amax ? zeroed(dim) : NULL;
        if (amax && !local) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++) {
            const uint16_t *xr = x + row * dim;
            uint16_t *yr = y + row * dim;
            if (r) {
                const uint16_t *rr = r + row * dim;
                uint16_t *hr = h + row * dim;
                for (int64_t i = 0; i < dim; i += 16)
                    _mm256_storeu_si256((__m256i *)(hr + i), to_bf16(_mm512_add_ps(widen(xr + i, 0xffff), widen(rr + i, 0xffff))));
                xr = hr;
            }
            __m512 ss = _mm512_setzero_ps();
            for (int64_t i = 0; i < dim; i += 16) {
                const __m512 v = widen(xr + i, 0xffff);
                ss = _mm512_fmadd_ps(v, v, ss);
            }
            const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)dim + eps));
            for (int64_t i = 0; i < dim; i += 16) {
                const __m512 n = round_bf16_ps(_mm512_mul_ps(widen(xr + i, 0xffff), scale));
                const __m256i out = to_bf16(_mm512_mul_ps(widen(w + i, 0xffff), n));
                _mm256_storeu_si256((__m256i *)(yr + i), out);
                if (local) {
                    const __m512 a = abs_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(out), 16)));
                    _mm512_storeu_ps(local + i, _mm512_max_ps(_mm512_loadu_ps(local + i), a));
                }
            }
        }
        if (local && !failed) merge_max(amax, local, dim);
        free(local);
    }
    return failed ? -1 : 0;
}

/* y = bf16(bf16(silu(g)) * u) and amax = max |y| per feature. g, u, y: [rows, dim] bf16, dim % 16 == 0. */
int mlc_calib_silu_mul(const uint16_t *g, const uint16_t *u, uint16_t *y, float *amax, int64_t rows, int64_t dim, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *local = amax ? zeroed(dim) : NULL;
        if (amax && !local) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++) {
            const uint16_t *gr = g + row * dim, *ur = u + row * dim;
            uint16_t *yr = y + row * dim;
            for (int64_t i = 0; i < dim; i += 16) {
                const __m512 gv = widen(gr + i, 0xffff);
                const __m512 s = round_bf16_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv)))));
                const __m256i out = to_bf16(_mm512_mul_ps(s, widen(ur + i, 0xffff)));
                _mm256_storeu_si256((__m256i *)(yr + i), out);
                if (local) {
                    const __m512 a = abs_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(out), 16)));
                    _mm512_storeu_ps(local + i, _mm512_max_ps(_mm512_loadu_ps(local + i), a));
                }
            }
        }
        if (local && !failed) merge_max(amax, local, dim);
        free(local);
    }
    return failed ? -1 : 0;
}

/* dst[0..d) = bf16(bf16(x * cos) + bf16(roll(x, d/2) * sin)) for one head's row (d % 32 == 0). */
static inline void rope_row(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, uint16_t *dst, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < d; i += 16) {
        const int64_t j = i < half ? i + half : i - half;
        const __m512 a = round_bf16_ps(_mm512_mul_ps(widen(x + i, 0xffff), widen(cos + i, 0xffff)));
        const __m512 b = round_bf16_ps(_mm512_mul_ps(widen(x + j, 0xffff), widen(sin + i, 0xffff)));
        _mm256_storeu_si256((__m256i *)(dst + i), to_bf16(_mm512_add_ps(a, b)));
    }
}

/* Which of the 16 keys j0..j0+15 lie before `seen`. */
static inline __mmask16 visible(int64_t seen, int64_t j0) {
    return j0 >= seen ? 0 : (seen - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (seen - j0)) - 1u));
}

#define QROWS 8 /* query rows per score tile */
#define PROWS 4 /* query rows per output tile */

/* out[r][c*16..] += sum over key pairs of P[r][pair] * V[pair][c*16..], for PROWS rows and NC chunks of 16 features. */
static inline __attribute__((always_inline)) void pv_tile(const uint16_t *p, int64_t ldp, const uint16_t *vp, int64_t d, int64_t c0, int64_t pairs,
                           __m512 acc[PROWS][4], const int nc) {
    for (int r = 0; r < PROWS; r++)
        for (int c = 0; c < nc; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t jp = 0; jp < pairs; jp++) {
        __m512bh vv[4];
        for (int c = 0; c < nc; c++) vv[c] = (__m512bh)_mm512_loadu_si512(vp + (jp * d + c0 + c * 16) * 2);
        for (int r = 0; r < PROWS; r++) {
            uint32_t pair;
            memcpy(&pair, p + r * ldp + 2 * jp, sizeof pair);
            const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int c = 0; c < nc; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
        }
    }
}

/* Causal attention with RoPE for one chunk of sequences, all starting at position 0.
 * q: [b * t, hq * d] bf16 with rows ldq apart (a Linear's output), k and v: [b * t, hkv * d] with rows ldk / ldv
 * apart; cos, sin: [t, d] bf16 (sin signed, as in mlc.models.rope); out: [b * t, hq * d] bf16, contiguous; amax:
 * [hq * d] or NULL. d % 32 == 0, hq % hkv == 0. Returns 0, or -1 when scratch memory could not be allocated. */
int mlc_calib_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *cos, const uint16_t *sin,
                        uint16_t *out, float *amax, int64_t b, int64_t t, int64_t hq, int64_t hkv, int64_t d,
                        int64_t ldq, int64_t ldk, int64_t ldv, float scale, int threads) {
    const int64_t tp = (t + 15) & ~(int64_t)15; /* keys padded to whole tiles of 16 */
    const int64_t rep = hq / hkv, width = hq * d;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        uint16_t *kt = (uint16_t *)aligned_alloc(64, (size_t)(tp * d * 2 + 64));  /* K^T in pairs: [d/2][tp][2] */
        uint16_t *vp = (uint16_t *)aligned_alloc(64, (size_t)(tp * d * 2 + 64));  /* V in key pairs: [tp/2][d][2] */
        uint16_t *qb = (uint16_t *)aligned_alloc(64, (size_t)(QROWS * d * 2 + 64));
        float *s = (float *)aligned_alloc(64, (size_t)(QROWS * tp * 4 + 64));
        uint16_t *pr = (uint16_t *)aligned_alloc(64, (size_t)(QROWS * tp * 2 + 64));
        float *local = amax ? zeroed(width) : NULL;
        uint16_t row[512];
        if (!kt || !vp || !qb || !s || !pr || (amax && !local) || d > 512) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < b * hkv; task++) {
            if (failed) continue;
            const int64_t bi = task / hkv, g = task % hkv;
            memset(kt, 0, (size_t)(tp * d * 2));
            memset(vp, 0, (size_t)(tp * d * 2));
            for (int64_t j = 0; j < t; j++) {
                const int64_t tok = bi * t + j;
                rope_row(k + tok * ldk + g * d, cos + j * d, sin + j * d, row, d);
                uint32_t *kt32 = (uint32_t *)kt;
                const uint32_t *row32 = (const uint32_t *)row;
                for (int64_t p = 0; p < d / 2; p++) kt32[p * tp + j] = row32[p];
                const uint16_t *vr = v + tok * ldv + g * d;
                for (int64_t i = 0; i < d; i++) vp[((j / 2) * d + i) * 2 + (j & 1)] = vr[i];
            }
            for (int64_t hh = 0; hh < rep; hh++) {
                const int64_t h = g * rep + hh;
                for (int64_t i0 = 0; i0 < t; i0 += QROWS) {
                    const int64_t rows = t - i0 < QROWS ? t - i0 : QROWS;
                    memset(qb, 0, (size_t)(QROWS * d * 2));
                    for (int64_t r = 0; r < rows; r++) {
                        const int64_t tok = bi * t + i0 + r;
                        rope_row(q + tok * ldq + h * d, cos + (i0 + r) * d, sin + (i0 + r) * d, qb + r * d, d);
                    }
                    const int64_t kend = (i0 + rows + 15) & ~(int64_t)15; /* keys this tile can see, in whole tiles */
                    const uint32_t *q32 = (const uint32_t *)qb;
                    for (int64_t j0 = 0; j0 < kend; j0 += 16) {
                        __m512 acc[QROWS];
                        for (int r = 0; r < QROWS; r++) acc[r] = _mm512_setzero_ps();
                        for (int64_t p = 0; p < d / 2; p++) {
                            const __m512bh kv = (__m512bh)_mm512_load_si512(kt + (p * tp + j0) * 2);
                            for (int r = 0; r < QROWS; r++)
                                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)q32[r * (d / 2) + p]), kv);
                        }
                        for (int r = 0; r < QROWS; r++) _mm512_store_ps(s + r * tp + j0, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)));
                    }
                    for (int64_t r = 0; r < QROWS; r++) {
                        float *sr = s + r * tp;
                        uint16_t *prr = pr + r * tp;
                        const int64_t seen = r < rows ? i0 + r + 1 : 0; /* keys 0..i0+r */
                        __m512 mv = _mm512_set1_ps(-INFINITY);
                        for (int64_t j0 = 0; j0 < kend; j0 += 16)
                            mv = _mm512_mask_max_ps(mv, visible(seen, j0), mv, _mm512_load_ps(sr + j0));
                        mv = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
                        __m512 sum = _mm512_setzero_ps();
                        for (int64_t j0 = 0; j0 < kend; j0 += 16) {
                            const __mmask16 keep = visible(seen, j0);
                            const __m512 e = _mm512_maskz_mov_ps(keep, exp_ps(_mm512_sub_ps(_mm512_load_ps(sr + j0), mv)));
                            sum = _mm512_add_ps(sum, e);
                            _mm256_storeu_si256((__m256i *)(prr + j0), to_bf16(e));
                        }
                        sr[0] = seen ? 1.0f / _mm512_reduce_add_ps(sum) : 0.0f; /* the scores are spent: keep 1 / sum */
                    }
                    for (int64_t r0 = 0; r0 < QROWS; r0 += PROWS) {
                        if (r0 >= rows) break;
                        for (int64_t c0 = 0; c0 < d; c0 += 64) {
                            const int nc = d - c0 >= 64 ? 4 : 2;
                            __m512 acc[PROWS][4];
                            if (nc == 4)
                                pv_tile(pr + r0 * tp, tp, vp, d, c0, kend / 2, acc, 4);
                            else
                                pv_tile(pr + r0 * tp, tp, vp, d, c0, kend / 2, acc, 2);
                            for (int64_t r = r0; r < r0 + PROWS && r < rows; r++) {
                                const __m512 inv = _mm512_set1_ps(s[r * tp]);
                                uint16_t *orow = out + (bi * t + i0 + r) * width + h * d + c0;
                                for (int c = 0; c < nc; c++) {
                                    const __m256i o = to_bf16(_mm512_mul_ps(acc[r - r0][c], inv));
                                    _mm256_storeu_si256((__m256i *)(orow + c * 16), o);
                                    if (local) {
                                        float *lf = local + h * d + c0 + c * 16;
                                        const __m512 a = abs_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(o), 16)));
                                        _mm512_storeu_ps(lf, _mm512_max_ps(_mm512_loadu_ps(lf), a));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if (local && !failed) merge_max(amax, local, width);
        free(kt);
        free(vp);
        free(qb);
        free(s);
        free(pr);
        free(local);
    }
    return failed ? -1 : 0;
}
