/* Attention of a paged step's decode rows, fused with their RoPE and the cache write (mlc/kernels/decode_attention.py).
 * Built with gemv_bf16.c and quant_int4.c into one library by mlc/kernels/native.py.
 *
 * The torch path runs about twenty small ops per layer for this: rotate q and k (four bf16 ops), index_copy_ k and v
 * into their slots, gather every key and value of each sequence through its slot table (index_select copies),
 * scaled-dot-product attention and the transposes around it. Here it is one call, for each decode row i (one new
 * token of one sequence):
 *   - q and k rotated in transformers' bf16 order (x*cos and rotate_half(x)*sin each rounded to bf16, then their
 *     sum rounded): the same bits as models/rope.py's apply_rope; k and v written to slot write_slots[i] of the
 *     (kv_heads, slots, head_dim) store;
 *   - for each kv head, the q heads that share it (GQA) attend over the sequence's positions lo..len-1 (lo = len -
 *     window with a sliding window), read in place through the sequence's slot table: scores q.k * scale with
 *     VDPBF16PS (exact bf16 products, fp32 sums), an online softmax in fp32 over chunks of CHUNK keys, the weighted
 *     sum of values in fp32, rounded once to bf16.
 * torch's CPU flash attention rounds the probabilities to bf16 before multiplying the values; keeping them in fp32
 * is at least as close to the exact result, so outputs can differ from the torch path in the last bf16 bit.
 * The (row, kv head) pairs are split over OpenMP threads only when there are many keys to read: a batch-1 step of a
 * small model is a few microseconds of work, less than waking a thread costs.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX512BF16__)
#error "decode_attention.c needs AVX512_BF16"
#endif

#define CHUNK 64             /* keys per online-softmax step */
#define MAX_REP 16           /* q heads per kv head (decode_attention.py checks) */
#define MAX_DIM 256          /* head_dim, a multiple of 32 (decode_attention.py checks) */
#define PARALLEL_WORK 4096  /* (kv head, key) pairs in a step from which the threads share it (~60 us of work) */

static inline __m512 widen16(const uint16_t *p) { /* 16 bf16 -> fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 round_bf16(__m512 v) { /* fp32 -> nearest bf16 -> fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

static inline void store16(uint16_t *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v)); }

/* One head of d values rotated by its position's cos and signed sin: x*cos + roll(x, d/2)*sin, each step in bf16. */
static void rope_head(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, uint16_t *out, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < d; i += 16) {
        const __m512 a = round_bf16(_mm512_mul_ps(widen16(x + i), widen16(cos + i)));
        const __m512 b = round_bf16(_mm512_mul_ps(widen16(x + (i + half) % d), widen16(sin + i)));
        store16(out + i, _mm512_add_ps(a, b));
    }
}

/* e^x for x <= 0 (scores minus their running maximum): Cephes' expf polynomial, scaled by 2^n with VSCALEFPS. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
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

/* rep q heads (q: rep * d bf16, already rotated) over positions lo..len-1 of one kv head (k, v: that head's [slots, d]
 * rows; table: the sequence's slot of each position); the rep output heads (bf16) go to out. */
static void attend_group(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *table, int64_t lo,
                         int64_t len, int64_t rep, int64_t d, float scale, uint16_t *out) {
    float acc[MAX_REP * MAX_DIM] __attribute__((aligned(64)));
    float p[MAX_REP][CHUNK] __attribute__((aligned(64)));
    float m[MAX_REP], l[MAX_REP];
    memset(acc, 0, (size_t)(rep * d) * sizeof(float));
    for (int64_t r = 0; r < rep; r++) m[r] = -INFINITY, l[r] = 0.0f;
    for (int64_t j0 = lo; j0 < len; j0 += CHUNK) {
        const int64_t n = len - j0 < CHUNK ? len - j0 : CHUNK;
        for (int64_t j = 0; j < n; j++) { /* scores */
            const uint16_t *kj = k + table[j0 + j] * d;
            for (int64_t r = 0; r < rep; r++) {
                __m512 s = _mm512_setzero_ps();
                for (int64_t c = 0; c < d; c += 32)
                    s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512((const void *)(q + r * d + c)),
                                         (__m512bh)_mm512_loadu_si512((const void *)(kj + c)));
                p[r][j] = _mm512_reduce_add_ps(s) * scale;
            }
        }
        for (int64_t r = 0; r < rep; r++) { /* online softmax: rescale what came before to the new maximum */
            float top = m[r];
            for (int64_t j = 0; j < n; j++) top = p[r][j] > top ? p[r][j] : top;
            if (top > m[r]) {
                const float alpha = expf(m[r] - top); /* 0 on the first chunk (m = -inf) */
                l[r] *= alpha;
                for (int64_t c = 0; c < d; c += 16)
                    _mm512_store_ps(acc + r * d + c, _mm512_mul_ps(_mm512_load_ps(acc + r * d + c), _mm512_set1_ps(alpha)));
                m[r] = top;
            }
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; j += 16) {
                const __mmask16 live = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1u);
                const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, p[r] + j), _mm512_set1_ps(top)));
                _mm512_mask_storeu_ps(p[r] + j, live, e);
                sum = _mm512_mask_add_ps(sum, live, sum, e);
            }
            l[r] += _mm512_reduce_add_ps(sum);
        }
        for (int64_t j = 0; j < n; j++) { /* weighted values */
            const uint16_t *vj = v + table[j0 + j] * d;
            for (int64_t c = 0; c < d; c += 16) {
                const __m512 vv = widen16(vj + c);
                for (int64_t r = 0; r < rep; r++)
                    _mm512_store_ps(acc + r * d + c, _mm512_fmadd_ps(_mm512_set1_ps(p[r][j]), vv, _mm512_load_ps(acc + r * d + c)));
            }
        }
    }
    for (int64_t r = 0; r < rep; r++) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        for (int64_t c = 0; c < d; c += 16) store16(out + r * d + c, _mm512_mul_ps(_mm512_load_ps(acc + r * d + c), inv));
    }
}

/* One decode step of one layer: qkv: b rows (row stride qkv_stride) of [hq q heads | hkv k heads | hkv v heads] x d, bf16,
 * before RoPE; cos, sin: [b, d] bf16 (sin signed as in models/rope.py); k_cache, v_cache: [hkv, slots, d] bf16;
 * write_slots[i]: row i's slot; table: [b, table_stride] slots of each row's positions; lens[i]: row i's positions
 * (its new token's included); window <= 0: none; out: [b, hq * d] bf16. */
typedef struct {
    const uint16_t *qkv, *cos, *sin;
    uint16_t *k_cache, *v_cache, *out;
    const int64_t *write_slots, *table, *lens;
    int64_t qkv_stride, slots, table_stride, b, hq, hkv, d, window;
    float scale;
} decode_step;

/* Rotated q into out (attend_unit reads it back), rotated k and v into the store; gives the (kv head, key) pairs to read. */
static int64_t rope_and_store(const decode_step *s) {
    const int64_t d = s->d, hq = s->hq, hkv = s->hkv;
    int64_t work = 0;
    for (int64_t i = 0; i < s->b; i++) {
        const uint16_t *row = s->qkv + i * s->qkv_stride, *c = s->cos + i * d, *sn = s->sin + i * d;
        for (int64_t h = 0; h < hq; h++) rope_head(row + h * d, c, sn, s->out + (i * hq + h) * d, d);
        for (int64_t g = 0; g < hkv; g++) {
            const int64_t at = (g * s->slots + s->write_slots[i]) * d;
            rope_head(row + (hq + g) * d, c, sn, s->k_cache + at, d);
            memcpy(s->v_cache + at, row + (hq + hkv + g) * d, (size_t)d * sizeof(uint16_t));
        }
        work += hkv * (s->window > 0 && s->lens[i] > s->window ? s->window : s->lens[i]);
    }
    return work;
}

/* Unit u = (row u / hkv, kv head u % hkv): its q heads' attention, written over their rotated q in out. */
static void attend_unit(const decode_step *s, int64_t u) {
    const int64_t i = u / s->hkv, g = u % s->hkv, rep = s->hq / s->hkv, d = s->d;
    const int64_t len = s->lens[i], lo = s->window > 0 && len > s->window ? len - s->window : 0;
    uint16_t *heads = s->out + (i * s->hq + g * rep) * d;
    uint16_t q[MAX_REP * MAX_DIM];
    memcpy(q, heads, (size_t)(rep * d) * sizeof(uint16_t));
    attend_group(q, s->k_cache + g * s->slots * d, s->v_cache + g * s->slots * d, s->table + i * s->table_stride, lo, len,
                 rep, d, s->scale, heads);
}

void mlc_decode_attention_bf16(const uint16_t *qkv, int64_t qkv_stride, const uint16_t *cos, const uint16_t *sin,
                               uint16_t *k_cache, uint16_t *v_cache, int64_t slots, const int64_t *write_slots,
                               const int64_t *table, int64_t table_stride, const int64_t *lens, int64_t b, int64_t hq,
                               int64_t hkv, int64_t d, int64_t window, float scale, uint16_t *out, int threads) {
    const decode_step s = {qkv, cos, sin, k_cache, v_cache, out, write_slots, table, lens,
                           qkv_stride, slots, table_stride, b, hq, hkv, d, window, scale};
    const int64_t work = rope_and_store(&s); /* always: it writes the cache (not inside the && below, which skips it at 1 thread) */
    const int parallel = threads > 1 && work >= PARALLEL_WORK;
    #pragma omp parallel for num_threads(parallel ? threads : 1) schedule(dynamic, 1) if (parallel)
    for (int64_t u = 0; u < b * hkv; u++) attend_unit(&s, u);
}

/* ---- A whole decoder layer of a decode step, for int4 weights (models/transformer.py's DecoderLayer.native_decode) ----
 * x -> h = RMSNorm1(x) -> qkv = h Wqkv^T -> attention as above -> o = att Wo^T -> x2 = x + o, h = RMSNorm2(x2)
 *   -> gu = h Wgu^T -> act = silu(gate) * up -> out = x2 + act Wdown^T,
 * with the same kernels the modules call one by one (gemv_bf16.c, quant_int4.c), so the same bits, in one call and one
 * OpenMP parallel region: the products split their 64-row tiles over the team, the small steps run on one thread. */
void mlc_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t dim, float eps);
void mlc_add_rms_norm_bf16(const uint16_t *x, const uint16_t *h, const uint16_t *w, uint16_t *sum, uint16_t *y,
                           int64_t rows, int64_t dim, float eps);
void mlc_silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inter);
void mlc_int4_group_sums(const uint16_t *x, float *xsum, int64_t m, int64_t k, int64_t g);
void mlc_int4pack_mm_team(const uint8_t *tiles, const uint16_t *scales_zeros, const uint16_t *x, const float *xsum,
                          uint16_t *y, int64_t m, int64_t n, int64_t k, int64_t g, int has_zero);

typedef struct { /* an int4 weight in torch's tiles: see quant_int4.c */
    int64_t tiles, scales_zeros, n, k, g, has_zero;
} int4_weight;

static void team_mm(const int4_weight *w, const uint16_t *x, float *xsum, uint16_t *y, int64_t m) {
    mlc_int4pack_mm_team((const uint8_t *)(intptr_t)w->tiles, (const uint16_t *)(intptr_t)w->scales_zeros, x, xsum, y, m,
                         w->n, w->k, w->g, (int)w->has_zero);
}

static void group_sums(const int4_weight *w, const uint16_t *x, float *xsum, int64_t m) { /* before each product, on one thread */
    if (!w->has_zero) return;
    memset(xsum, 0, (size_t)(m * (w->k / w->g)) * sizeof(float));
    mlc_int4_group_sums(x, xsum, m, w->k, w->g);
}

static inline void add_rows(const uint16_t *a, const uint16_t *b, uint16_t *out, int64_t n) { /* bf16(a + b), as torch's add */
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) store16(out + i, _mm512_add_ps(widen16(a + i), widen16(b + i)));
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        const __m512 va = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a + i)), 16));
        const __m512 vb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b + i)), 16));
        _mm256_mask_storeu_epi16(out + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(va, vb)));
    }
}

/* x, out: [b, hidden] bf16; ln1, ln2: the two norms' [hidden] bf16 weights; w: qkv, o, gate_up, down as int4_weight;
 * cos ... scale: the attention's step as in mlc_decode_attention_bf16 (q, k, v from the qkv product). */
void mlc_decode_layer_int4(const uint16_t *x, uint16_t *out, int64_t b, int64_t hidden, const uint16_t *ln1,
                           const uint16_t *ln2, float eps1, float eps2, const int4_weight *w, const uint16_t *cos,
                           const uint16_t *sin, uint16_t *k_cache, uint16_t *v_cache, int64_t slots,
                           const int64_t *write_slots, const int64_t *table, int64_t table_stride, const int64_t *lens,
                           int64_t hq, int64_t hkv, int64_t d, int64_t window, float scale, int threads) {
    const int64_t width = (hq + 2 * hkv) * d, inter = w[2].n / 2;
    int64_t groups = 0;
    for (int i = 0; i < 4; i++) groups = w[i].k / w[i].g > groups ? w[i].k / w[i].g : groups;
    const size_t elems = (size_t)(b * (2 * hidden + width + hq * d + hidden + 2 * inter + inter + hidden));
    uint16_t *h = (uint16_t *)malloc(elems * sizeof(uint16_t));
    float *xsum = (float *)malloc((size_t)(b * groups) * sizeof(float) + 64);
    uint16_t *qkv = h + b * hidden, *att = qkv + b * width, *o = att + b * hq * d, *x2 = o + b * hidden;
    uint16_t *gu = x2 + b * hidden, *act = gu + b * 2 * inter, *dn = act + b * inter;
    const decode_step s = {qkv, cos, sin, k_cache, v_cache, att, write_slots, table, lens,
                           width, slots, table_stride, b, hq, hkv, d, window, scale};
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp single
        {
            mlc_rms_norm_bf16(x, ln1, h, b, hidden, eps1);
            group_sums(&w[0], h, xsum, b);
        }
        team_mm(&w[0], h, xsum, qkv, b);
        #pragma omp barrier
        #pragma omp single
        rope_and_store(&s);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < b * hkv; u++) attend_unit(&s, u);
        #pragma omp single
        group_sums(&w[1], att, xsum, b);
        team_mm(&w[1], att, xsum, o, b);
        #pragma omp barrier
        #pragma omp single
        {
            mlc_add_rms_norm_bf16(x, o, ln2, x2, h, b, hidden, eps2);
            group_sums(&w[2], h, xsum, b);
        }
        team_mm(&w[2], h, xsum, gu, b);
        #pragma omp barrier
        #pragma omp single
        {
            mlc_silu_mul_bf16(gu, act, b, inter);
            group_sums(&w[3], act, xsum, b);
        }
        team_mm(&w[3], act, xsum, dn, b);
        #pragma omp barrier
        #pragma omp single nowait
        add_rows(x2, dn, out, b * hidden);
    }
    free(xsum);
    free(h);
}
