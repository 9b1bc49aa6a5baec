/* Which entries torch's CPU sort of |delta| puts in a range of positions, without sorting everything.

mergekit picks TIES' top-k (and Breadcrumbs' band) with torch.argsort of |delta| cast to float32. On
CPU that is std::sort over (value, index) pairs: libstdc++'s introsort (median-of-three pivot moved
to the front, Hoare partition, recursion on the right part, a depth limit of 2*floor(log2 n), blocks of
at most 16 left for one final insertion sort). It is not stable, so among equal magnitudes at the
threshold the picks depend on that exact sequence of partitions. To get mergekit's picks, this file
replays the same sequence, but only on the subranges that hold a wanted boundary (a quickselect that
takes introsort's path): about 2n element visits instead of n log n, with the same arrangement.

Entries equal to the pivot stop both scans in a Hoare partition, and the i-th stop of the left scan is
swapped with the i-th stop of the right scan for as long as they have not crossed. The partition below
finds those stops 128 at a time without branches (the BlockQuicksort idea) and swaps the same pairs, so
it ends in the state the element-by-element loop would reach, which then finishes the partition.

mlc_sort_select returns 0, or 1 when it cannot answer (a NaN in the input, whose order the comparator
special-cases, or a subrange that exhausted the depth limit, where introsort switches to heapsort):
the caller then sorts with torch itself. Tests compare every answer with torch.argsort.
*/
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 128
#define THRESHOLD 16 /* libstdc++'s _S_threshold */

#define DEFINE_SORT(NAME, BEFORE)                                                                            \
    static inline int NAME##_before(float a, float b) { return BEFORE; }                                     \
                                                                                                             \
    static inline void NAME##_swap(float *v, int32_t *ix, int64_t a, int64_t b) {                            \
        float t = v[a];                                                                                      \
        v[a] = v[b];                                                                                         \
        v[b] = t;                                                                                            \
        int32_t u = ix[a];                                                                                   \
        ix[a] = ix[b];                                                                                       \
        ix[b] = u;                                                                                           \
    }                                                                                                        \
                                                                                                             \
    /* The median of v[a], v[b], v[c] is swapped into position r, decided by the same comparisons. */        \
    static void NAME##_median_to_first(float *v, int32_t *ix, int64_t r, int64_t a, int64_t b, int64_t c) {  \
        if (NAME##_before(v[a], v[b])) {                                                                     \
            if (NAME##_before(v[b], v[c]))                                                                   \
                NAME##_swap(v, ix, r, b);                                                                    \
            else if (NAME##_before(v[a], v[c]))                                                              \
                NAME##_swap(v, ix, r, c);                                                                    \
            else                                                                                             \
                NAME##_swap(v, ix, r, a);                                                                    \
        } else if (NAME##_before(v[a], v[c]))                                                                \
            NAME##_swap(v, ix, r, a);                                                                        \
        else if (NAME##_before(v[b], v[c]))                                                                  \
            NAME##_swap(v, ix, r, c);                                                                        \
        else                                                                                                 \
            NAME##_swap(v, ix, r, b);                                                                        \
    }                                                                                                        \
                                                                                                             \
    /* Partition [first, last) around the median of three; returns the cut. */                               \
    static int64_t NAME##_partition(float *v, int32_t *ix, int64_t first, int64_t last) {                    \
        NAME##_median_to_first(v, ix, first, first + 1, first + (last - first) / 2, last - 1);               \
        const float p = v[first];                                                                            \
        int64_t i = first + 1, j = last; /* the element loop's state: next left position, last right stop */ \
        uint8_t left[BLOCK], right[BLOCK];                                                                   \
        int nl = 0, nr = 0, sl = 0, sr = 0;                                                                  \
        int64_t bl = i, br = j; /* left block [bl, bl + BLOCK), right block [br - BLOCK, br) */              \
        while (br - bl >= 2 * BLOCK) {                                                                       \
            if (nl == 0) {                                                                                   \
                sl = 0;                                                                                      \
                for (int k = 0; k < BLOCK; k++) {                                                            \
                    left[nl] = (uint8_t)k;                                                                   \
                    nl += !NAME##_before(v[bl + k], p);                                                      \
                }                                                                                            \
            }                                                                                                \
            if (nr == 0) {                                                                                   \
                sr = 0;                                                                                      \
                for (int k = 0; k < BLOCK; k++) {                                                            \
                    right[nr] = (uint8_t)k;                                                                  \
                    nr += !NAME##_before(p, v[br - 1 - k]);                                                  \
                }                                                                                            \
            }                                                                                                \
            int m = nl < nr ? nl : nr;                                                                       \
            for (int t = 0; t < m; t++) NAME##_swap(v, ix, bl + left[sl + t], br - 1 - right[sr + t]);       \
            if (m) {                                                                                         \
                i = bl + left[sl + m - 1] + 1;                                                               \
                j = br - 1 - right[sr + m - 1];                                                              \
            }                                                                                                \
            nl -= m;                                                                                         \
            nr -= m;                                                                                         \
            sl += m;                                                                                         \
            sr += m;                                                                                         \
            if (nl == 0) bl += BLOCK;                                                                        \
            if (nr == 0) br -= BLOCK;                                                                        \
        }                                                                                                    \
        for (;;) { /* the rest element by element (stops already found above are found again) */            \
            while (NAME##_before(v[i], p)) i++;                                                              \
            j--;                                                                                             \
            while (NAME##_before(p, v[j])) j--;                                                              \
            if (!(i < j)) return i;                                                                          \
            NAME##_swap(v, ix, i, j);                                                                        \
            i++;                                                                                             \
        }                                                                                                    \
    }                                                                                                        \
                                                                                                             \
    /* Stable insertion sort: what the final pass does inside each block partitioning left. */               \
    static void NAME##_insertion(float *v, int32_t *ix, int64_t first, int64_t last) {                       \
        for (int64_t i = first + 1; i < last; i++) {                                                         \
            float x = v[i];                                                                                  \
            int32_t y = ix[i];                                                                               \
            int64_t j = i;                                                                                   \
            while (j > first && NAME##_before(x, v[j - 1])) {                                                \
                v[j] = v[j - 1];                                                                             \
                ix[j] = ix[j - 1];                                                                           \
                j--;                                                                                         \
            }                                                                                                \
            v[j] = x;                                                                                        \
            ix[j] = y;                                                                                       \
        }                                                                                                    \
    }                                                                                                        \
                                                                                                             \
    static int NAME##_select(float *v, int32_t *ix, int64_t first, int64_t last, int depth, int64_t lo,      \
                             int64_t hi) {                                                                   \
        while (last - first > THRESHOLD) {                                                                   \
            if (!splits(first, last, lo, hi)) return 0;                                                      \
            if (depth == 0) return 1;                                                                        \
            depth--;                                                                                         \
            int64_t cut = NAME##_partition(v, ix, first, last);                                              \
            if (splits(cut, last, lo, hi) && NAME##_select(v, ix, cut, last, depth, lo, hi)) return 1;       \
            last = cut;                                                                                      \
        }                                                                                                    \
        if (splits(first, last, lo, hi)) NAME##_insertion(v, ix, first, last);                               \
        return 0;                                                                                            \
    }

/* Does a boundary of the wanted range fall strictly inside [first, last)? Elsewhere the order is moot. */
static inline int splits(int64_t first, int64_t last, int64_t lo, int64_t hi) {
    return (first < lo && lo < last) || (first < hi && hi < last);
}

/* torch's comparators without their NaN clauses (inputs with a NaN never get here). */
DEFINE_SORT(desc, a > b)
DEFINE_SORT(asc, a < b)

/* |delta| as float32 into w (kind 0: delta is float32, 1: bfloat16, 2: w already holds the magnitudes)
   and positions into ix; returns 1 if a NaN is present. */
static int load(const void *delta, int kind, float *w, int32_t *ix, int64_t n) {
    int nan = 0;
    if (kind == 0) {
        const uint32_t *s = (const uint32_t *)delta;
        for (int64_t i = 0; i < n; i++) {
            uint32_t b = s[i] & 0x7fffffffu;
            nan |= b > 0x7f800000u;
            memcpy(&w[i], &b, 4);
            ix[i] = (int32_t)i;
        }
    } else if (kind == 1) {
        const uint16_t *s = (const uint16_t *)delta;
        for (int64_t i = 0; i < n; i++) {
            uint32_t b = (uint32_t)(s[i] & 0x7fffu) << 16;
            nan |= b > 0x7f800000u;
            memcpy(&w[i], &b, 4);
            ix[i] = (int32_t)i;
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            nan |= w[i] != w[i];
            ix[i] = (int32_t)i;
        }
    }
    return nan;
}

/* keep[i] = 1 for the entries that a sort of |delta| (descending or not) puts at positions lo..hi-1, else 0.
   w (n floats) and ix (n int32) are scratch; keep may alias w. n < 2^31. */
int mlc_sort_select(const void *delta, int kind, float *w, int32_t *ix, int64_t n, int64_t lo, int64_t hi,
                    int descending, uint8_t *keep) {
    if (load(delta, kind, w, ix, n)) return 1;
    int depth = 0;
    for (int64_t m = n; m > 1; m >>= 1) depth++; /* floor(log2 n) */
    int failed = descending ? desc_select(w, ix, 0, n, 2 * depth, lo, hi) : asc_select(w, ix, 0, n, 2 * depth, lo, hi);
    if (failed) return 1;
    memset(keep, 0, (size_t)n);
    for (int64_t p = lo; p < hi; p++) keep[ix[p]] = 1;
    return 0;
}

/* delta[i] = +0.0 where keep[i] == 0, on the bits (elem_size 2 or 4), as masked_fill would. */
void mlc_apply_keep(void *delta, int elem_size, const uint8_t *keep, int64_t n) {
    if (elem_size == 2) {
        uint16_t *d = (uint16_t *)delta;
        for (int64_t i = 0; i < n; i++) d[i] &= (uint16_t)-(int32_t)keep[i];
    } else {
        uint32_t *d = (uint32_t *)delta;
        for (int64_t i = 0; i < n; i++) d[i] &= (uint32_t)-(int32_t)keep[i];
    }
}

/* ---- the task-arithmetic combine (TIES' sign election), bfloat16 or float32 ------------------------------

out = base + lambda * sum(agreeing deltas) / sum(their weights), element by element in one pass, with every
intermediate rounded where torch rounds it in mergekit's sequence of tensor operations: the sums over models
accumulate in float32 from +0 in input order and are rounded once to the compute dtype, then each of the
division, the scaling by lambda and the final addition rounds (bfloat16: to nearest even, as torch does).
Returns n, or the (chunk-aligned) count of elements written before a NaN: the caller finishes with torch. */

static inline float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even; NaNs never get here */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define COMBINE_CHUNK 1024
#define MAX_MODELS 64

/* Loops over the models outside, elements inside, without branches, so the compiler vectorises each. The
   agreeing entries of an element all have the elected sign s, so their sum is s times the sum of s * x over
   them, exactly (the torch path below sums the same way). */
#define DEFINE_COMBINE(NAME, T, LOAD, ROUND, STORE)                                                                \
    static int64_t NAME(const void *const *deltas, int m, const float *w, const void *base_, void *out_, int64_t n, \
                        int consensus, int normalize, float divisor, int scale, float lambda_) {                   \
        const T *base = (const T *)base_;                                                                          \
        T *out = (T *)out_;                                                                                        \
        float mixed[COMBINE_CHUNK], div[COMBINE_CHUNK], sign[COMBINE_CHUNK], x[COMBINE_CHUNK];                     \
        for (int64_t start = 0; start < n; start += COMBINE_CHUNK) {                                               \
            const int len = (int)(start + COMBINE_CHUNK < n ? COMBINE_CHUNK : n - start);                          \
            int nan = 0;                                                                                           \
            for (int j = 0; j < len; j++) {                                                                        \
                float b = LOAD(base[start + j]);                                                                   \
                nan |= b != b;                                                                                     \
                mixed[j] = 0.0f;                                                                                   \
            }                                                                                                      \
            for (int i = 0; i < m; i++) {                                                                          \
                const T *d = (const T *)deltas[i] + start;                                                         \
                for (int j = 0; j < len; j++) {                                                                    \
                    float x = LOAD(d[j]);                                                                          \
                    nan |= x != x;                                                                                 \
                    mixed[j] += x;                                                                                 \
                }                                                                                                  \
            }                                                                                                      \
            if (nan) return start;                                                                                 \
            if (consensus) {                                                                                       \
                for (int j = 0; j < len; j++) {                                                                    \
                    sign[j] = ROUND(mixed[j]) >= 0.0f ? 1.0f : -1.0f;                                              \
                    mixed[j] = 0.0f;                                                                               \
                    div[j] = 0.0f;                                                                                 \
                }                                                                                                  \
                for (int i = 0; i < m; i++) {                                                                      \
                    const T *d = (const T *)deltas[i] + start;                                                     \
                    const float wi = w[i];                                                                         \
                    for (int j = 0; j < len; j++) x[j] = LOAD(d[j]);                                               \
                    for (int j = 0; j < len; j++) {                                                                \
                        float a = x[j] * sign[j]; /* > 0 where the entry agrees */                                 \
                        a = a > 0.0f ? a : 0.0f;                                                                   \
                        mixed[j] += a;                                                                             \
                        div[j] += a > 0.0f ? wi : 0.0f;                                                            \
                    }                                                                                              \
                }                                                                                                  \
                for (int j = 0; j < len; j++) {                                                                    \
                    float v = ROUND(div[j]);                                                                       \
                    div[j] = v == 0.0f ? 1.0f : v;                                                                 \
                    mixed[j] = mixed[j] * sign[j] + 0.0f; /* exact signed sum; + 0 turns -0 into +0 */             \
                }                                                                                                  \
            } else {                                                                                               \
                for (int j = 0; j < len; j++) div[j] = divisor;                                                    \
            }                                                                                                      \
            for (int j = 0; j < len; j++) mixed[j] = ROUND(mixed[j]);                                              \
            if (normalize)                                                                                         \
                for (int j = 0; j < len; j++) mixed[j] = ROUND(mixed[j] / div[j]);                                 \
            if (scale)                                                                                             \
                for (int j = 0; j < len; j++) mixed[j] = ROUND(mixed[j] * lambda_);                                \
            for (int j = 0; j < len; j++) out[start + j] = STORE(LOAD(base[start + j]) + mixed[j]);                \
        }                                                                                                          \
        return n;                                                                                                  \
    }

#define F32_LOAD(x) (x)
#define F32_ROUND(x) (x)
#define F32_STORE(x) (x)
#define BF16_ROUND(x) bf2f(f2bf(x))
DEFINE_COMBINE(combine_f32, float, F32_LOAD, F32_ROUND, F32_STORE)
DEFINE_COMBINE(combine_bf16, uint16_t, bf2f, BF16_ROUND, f2bf)

/* kind 0: float32, 1: bfloat16. w: each model's weight, already rounded to the compute dtype. divisor: the
   non-consensus divisor (the rounded sum of the weights, 1 if ~0). out may be base. */
int64_t mlc_combine(int kind, const void *const *deltas, int m, const float *w, const void *base, void *out, int64_t n,
                    int consensus, int normalize, float divisor, int scale, float lambda_) {
    if (m > MAX_MODELS) return 0;
    return kind == 1 ? combine_bf16(deltas, m, w, base, out, n, consensus, normalize, divisor, scale, lambda_)
                     : combine_f32(deltas, m, w, base, out, n, consensus, normalize, divisor, scale, lambda_);
}

/* ---- the linear merge's weighted sum, bfloat16 or float32 -------------------------------------------------

out = (x_0 * w_0 + x_1 * w_1 + ...) / divisor in one pass over the inputs, rounded where mergekit's torch
operations round it: a float32 accumulator from +0 takes each model in input order as torch's addcmul_
does, with one fused multiply-add (acc + x * w rounded once; its CPU kernel uses FMA, tails included),
is divided once (div_), then rounded to the output dtype (bfloat16: to nearest even). On x86 a copy
built for AVX2 + FMA is picked at run time; elsewhere fmaf is the hardware's (aarch64) or libm's.
Returns n, or the (chunk-aligned) count of elements written before a chunk with a NaN result, whose bits
torch's conversions set differently by path: the caller finishes with torch. */

#define DEFINE_LINEAR(NAME, T, LOAD, STORE, TARGET)                                                             \
    TARGET static int64_t NAME(const void *const *xs, int m, const float *w, void *out_, int64_t n,           \
                               int normalize, float divisor) {                                                \
        T *out = (T *)out_;                                                                                   \
        float acc[COMBINE_CHUNK];                                                                             \
        for (int64_t start = 0; start < n; start += COMBINE_CHUNK) {                                          \
            const int len = (int)(start + COMBINE_CHUNK < n ? COMBINE_CHUNK : n - start);                     \
            for (int j = 0; j < len; j++) acc[j] = 0.0f;                                                      \
            for (int i = 0; i < m; i++) {                                                                     \
                const T *x = (const T *)xs[i] + start;                                                        \
                const float wi = w[i];                                                                        \
                for (int j = 0; j < len; j++) acc[j] = fmaf(LOAD(x[j]), wi, acc[j]);                          \
            }                                                                                                 \
            if (normalize)                                                                                    \
                for (int j = 0; j < len; j++) acc[j] = acc[j] / divisor;                                      \
            int nan = 0;                                                                                      \
            for (int j = 0; j < len; j++) nan |= acc[j] != acc[j];                                            \
            if (nan) return start;                                                                            \
            for (int j = 0; j < len; j++) out[start + j] = STORE(acc[j]);                                     \
        }                                                                                                     \
        return n;                                                                                             \
    }

DEFINE_LINEAR(linear_f32, float, F32_LOAD, F32_STORE, )
DEFINE_LINEAR(linear_bf16, uint16_t, bf2f, f2bf, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define X86_FMA 1
DEFINE_LINEAR(linear_f32_fma, float, F32_LOAD, F32_STORE, __attribute__((target("avx2,fma"))))
DEFINE_LINEAR(linear_bf16_fma, uint16_t, bf2f, f2bf, __attribute__((target("avx2,fma"))))
#endif

/* kind 0: float32, 1: bfloat16 (inputs and output). w: each model's weight as float32; divisor: their float32
   sum, used when normalize. */
int64_t mlc_linear(int kind, const void *const *xs, int m, const float *w, void *out, int64_t n, int normalize, float divisor) {
#ifdef X86_FMA
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return kind == 1 ? linear_bf16_fma(xs, m, w, out, n, normalize, divisor) : linear_f32_fma(xs, m, w, out, n, normalize, divisor);
#endif
    return kind == 1 ? linear_bf16(xs, m, w, out, n, normalize, divisor) : linear_f32(xs, m, w, out, n, normalize, divisor);
}
