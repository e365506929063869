/* tbfunc's CPU noise kernel: counter-based, so every segment of noise is a pure function of its
 * 64-bit key and each element a pure function of (key, index).
 *
 * Element i of a segment keyed by words (w0, w1) comes from block b = i / 4 of Philox-4x32-10
 * (Salmon et al. 2011) with key (w0, w1) and counter (b mod 2**32, b / 2**32, 0, 0); the block's
 * four words (x0, x1, x2, x3) give elements 4b..4b+3:
 *   normal:  Box-Muller on (x0, x1) and (x2, x3): r cos(theta), r sin(theta) with
 *            r = sqrt(-2 ln u), u = (x >> 1) * 2**-31 + 2**-32 in (0, 1], theta = 2 pi y / 2**32;
 *   uniform: (x >> 8) * 2**-24 in [0, 1).
 * The arithmetic is float32 with a fixed order of operations and no contraction into FMAs
 * (built with -ffp-contract=off), using only +, -, *, sqrt, int<->float conversions and bit
 * operations, all exactly rounded by IEEE 754. So tbfunc._philox, the same steps written in
 * torch tensor ops, reproduces it bit for bit, and the vectorised and scalar parts of a loop
 * agree. ln, sin and cos are Cephes' float32 polynomials (Moshier); theta's range reduction is
 * exact because it is done on the integer. float64 outputs widen the float32 noise.
 *
 * Segments: "nodes" l = 0..L-1 of numels[l] elements times "samples" s = 0..S-1; each node's
 * output has its own address and sample stride. Segment (l, s) is keyed by
 * fold_in(keys[s], hashes[l]) (Threefry-2x32, 20 rounds) when hashes is given, else by
 * keys[s * L + l].
 * With mus/sigmas (addresses of each node's contiguous mu and sigma), the kernel writes
 * mu + sigma * eps (one rounding after the product, one after the sum) instead of eps.
 * tb_fill writes elements [begin, end) of the concatenated segments, so callers split the work
 * over threads; each node's segments go to its own output buffer. */

#include <stdint.h>
#include <string.h>

#include "_cephes.h"
#include "_parts.h"
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#define BLOCKS 64 /* Philox blocks per batch: 256 elements, small enough to stay in L1 */

static const uint32_t PHILOX_M0 = 0xD2511F53u, PHILOX_M1 = 0xCD9E8D57u;
static const uint32_t PHILOX_W0 = 0x9E3779B9u, PHILOX_W1 = 0xBB67AE85u;

static inline uint32_t rotl(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

static void threefry(uint32_t k0, uint32_t k1, uint64_t data, int64_t *out) {
    /* Threefry-2x32, 20 rounds, of the counter (data >> 32, data & 0xFFFFFFFF) */
    static const int rot[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
    uint32_t k[3] = {k0, k1, k0 ^ k1 ^ 0x1BD11BDAu};
    uint32_t x0 = (uint32_t)(data >> 32) + k[0], x1 = (uint32_t)data + k[1];
    for (int block = 0; block < 5; block++) {
        for (int j = 0; j < 4; j++) {
            x0 += x1;
            x1 = rotl(x1, rot[block % 2][j]) ^ x0;
        }
        x0 += k[(block + 1) % 3];
        x1 += k[(block + 2) % 3] + (uint32_t)(block + 1);
    }
    out[0] = x0;
    out[1] = x1;
}

void tb_fold_in(int64_t n, const int64_t *triples, int64_t *out) {
    /* out[i] = fold_in((triples[3i], triples[3i+1]), triples[3i+2]) */
    for (int64_t i = 0; i < n; i++)
        threefry((uint32_t)triples[3 * i], (uint32_t)triples[3 * i + 1],
                 (uint64_t)triples[3 * i + 2], out + 2 * i);
}

void tb_split(int64_t k0, int64_t k1, int64_t num, int64_t *out) {
    /* out[i] = split(key, num)[i] = fold_in(key, i) */
    for (int64_t i = 0; i < num; i++) threefry((uint32_t)k0, (uint32_t)k1, (uint64_t)i, out + 2 * i);
}

#if defined(__AVX2__)
#include <immintrin.h>

/* (hi, lo) halves of the 32 x 32 -> 64-bit products of 8 lanes by one constant */
static inline void mul_wide(__m256i x, __m256i m, __m256i *hi, __m256i *lo) {
    __m256i even = _mm256_mul_epu32(x, m);
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#endif

static void philox(uint32_t k0, uint32_t k1, uint64_t first, int count, uint32_t x[4][BLOCKS]) {
    uint32_t *restrict x0 = x[0], *restrict x1 = x[1], *restrict x2 = x[2], *restrict x3 = x[3];
    for (int i = 0; i < count; i++) {
        uint64_t block = first + (uint64_t)i;
        x0[i] = (uint32_t)block;
        x1[i] = (uint32_t)(block >> 32);
        x2[i] = 0;
        x3[i] = 0;
    }
#if defined(__AVX2__)
    const __m256i m0 = _mm256_set1_epi32((int)PHILOX_M0), m1 = _mm256_set1_epi32((int)PHILOX_M1);
    for (int i = 0; i < count; i += 8) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(x0 + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(x1 + i));
        __m256i c = _mm256_loadu_si256((const __m256i *)(x2 + i));
        __m256i d = _mm256_loadu_si256((const __m256i *)(x3 + i));
        uint32_t r0 = k0, r1 = k1;
        for (int round = 0; round < 10; round++) {
            __m256i hi0, lo0, hi1, lo1;
            mul_wide(a, m0, &hi0, &lo0);
            mul_wide(c, m1, &hi1, &lo1);
            a = _mm256_xor_si256(_mm256_xor_si256(hi1, b), _mm256_set1_epi32((int)r0));
            c = _mm256_xor_si256(_mm256_xor_si256(hi0, d), _mm256_set1_epi32((int)r1));
            b = lo1;
            d = lo0;
            r0 += PHILOX_W0;
            r1 += PHILOX_W1;
        }
        _mm256_storeu_si256((__m256i *)(x0 + i), a);
        _mm256_storeu_si256((__m256i *)(x1 + i), b);
        _mm256_storeu_si256((__m256i *)(x2 + i), c);
        _mm256_storeu_si256((__m256i *)(x3 + i), d);
    }
#else
    for (int round = 0; round < 10; round++) {
        for (int i = 0; i < count; i++) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * x0[i];
            uint64_t p1 = (uint64_t)PHILOX_M1 * x2[i];
            uint32_t y0 = (uint32_t)(p1 >> 32) ^ x1[i] ^ k0;
            uint32_t y2 = (uint32_t)(p0 >> 32) ^ x3[i] ^ k1;
            x1[i] = (uint32_t)p1;
            x3[i] = (uint32_t)p0;
            x0[i] = y0;
            x2[i] = y2;
        }
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
#endif
}

void tb_philox(int64_t k0, int64_t k1, int64_t block, int64_t *out) {
    /* The four words of one block, for known-answer tests. */
    uint32_t x[4][BLOCKS];
    philox((uint32_t)k0, (uint32_t)k1, (uint64_t)block, 8, x);
    for (int j = 0; j < 4; j++) out[j] = x[j][0];
}

/* Constants: float32 values, spelled in hex so that tbfunc._philox uses the very same ones
 * (the log's are in _cephes.h, shared with the training kernels). */
#define SIN_P0 -0x1.9943f2p-13f
#define SIN_P1 0x1.11073cp-7f
#define SIN_P2 -0x1.555546p-3f
#define COS_P0 0x1.99eb9cp-16f
#define COS_P1 -0x1.6c0c34p-10f
#define COS_P2 0x1.55554ap-5f
#define OCTANT_STEP 0x1.921fb6p-30f /* (pi / 4) / 2**29 */

static inline float radius(uint32_t word) {
    /* sqrt(-2 ln u), u = (word >> 1) * 2**-31 + 2**-32 in (0, 1] */
    return __builtin_sqrtf(-2.0f * ln32((float)(int32_t)(word >> 1) * 0x1p-31f + 0x1p-32f));
}

static inline void polar(uint32_t word, float r, float *cos_out, float *sin_out) {
    /* r cos(theta), r sin(theta) for theta = 2 pi word / 2**32 */
    uint32_t octant = word >> 29;
    int32_t frac = (int32_t)(word & 0x1FFFFFFFu);
    int32_t odd = (int32_t)(octant & 1u);
    /* odd octants measure the angle back from the next quarter turn: exact in integers */
    int32_t steps = odd ? 0x20000000 - frac : frac;
    float x = (float)steps * OCTANT_STEP; /* [0, pi/4] */
    float z = x * x;
    float s = SIN_P0;
    s = s * z + SIN_P1;
    s = s * z + SIN_P2;
    s = s * z * x + x;
    float c = COS_P0;
    c = c * z + COS_P1;
    c = c * z + COS_P2;
    c = c * z * z + -0.5f * z + 1.0f;
    float sin_q = odd ? c : s, cos_q = odd ? s : c; /* within the quarter turn */
    uint32_t q = octant >> 1;                        /* then q quarter turns on */
    float cv = (q & 1u) ? sin_q : cos_q, sv = (q & 1u) ? cos_q : sin_q;
    *cos_out = r * ((q == 1u || q == 2u) ? -cv : cv);
    *sin_out = r * (q >= 2u ? -sv : sv);
}

/* Values of blocks [first, first + count) (count a multiple of 8, at most BLOCKS), in order. */
static void batch(int uniform, uint32_t k0, uint32_t k1, uint64_t first, int count,
                  float *restrict out) {
    uint32_t x[4][BLOCKS];
    float y[4][BLOCKS];
    philox(k0, k1, first, count, x);
    if (uniform) {
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < count; i++) y[j][i] = (float)(int32_t)(x[j][i] >> 8) * 0x1p-24f;
    } else {
        for (int j = 0; j < 4; j += 2)
            for (int i = 0; i < count; i++) polar(x[j + 1][i], radius(x[j][i]), &y[j][i], &y[j + 1][i]);
    }
#if defined(__SSE__)
    for (int i = 0; i < count; i += 4) { /* a 4 x 4 transpose: element 4i + j is word j of block i */
        __m128 a = _mm_loadu_ps(y[0] + i), b = _mm_loadu_ps(y[1] + i);
        __m128 c = _mm_loadu_ps(y[2] + i), d = _mm_loadu_ps(y[3] + i);
        _MM_TRANSPOSE4_PS(a, b, c, d);
        _mm_storeu_ps(out + 4 * i, a);
        _mm_storeu_ps(out + 4 * i + 4, b);
        _mm_storeu_ps(out + 4 * i + 8, c);
        _mm_storeu_ps(out + 4 * i + 12, d);
    }
#else
    for (int i = 0; i < count; i++)
        for (int j = 0; j < 4; j++) out[4 * i + j] = y[j][i];
#endif
}

/* Elements [a, b) of one segment, written to dst[0 .. b-a). */
static void segment(int uniform, int dtype, uint32_t k0, uint32_t k1, int64_t a, int64_t b,
                    void *dst, const void *mu, const void *sigma, void *eps_dst) {
    float eps[4 * BLOCKS];
    int64_t first = a / 4;
    while (a < b) {
        int64_t lo = a - 4 * first, hi = b - 4 * first;
        if (hi > 4 * BLOCKS) hi = 4 * BLOCKS;
        int count = (int)(((hi + 3) / 4 + 7) / 8 * 8); /* the blocks needed, rounded up to 8 */
        batch(uniform, k0, k1, (uint64_t)first, count, eps);
        int64_t n = hi - lo;
        if (dtype == 0 && mu) {
            const float *m = (const float *)mu + a, *s = (const float *)sigma + a;
            float *o = (float *)dst;
            for (int64_t i = 0; i < n; i++) {
                float t = s[i] * eps[lo + i];
                o[i] = m[i] + t;
            }
            if (eps_dst) memcpy(eps_dst, eps + lo, (size_t)n * sizeof(float));
        } else if (dtype == 0) {
            memcpy(dst, eps + lo, (size_t)n * sizeof(float));
        } else if (mu) {
            const double *m = (const double *)mu + a, *s = (const double *)sigma + a;
            double *o = (double *)dst;
            for (int64_t i = 0; i < n; i++) {
                double t = s[i] * (double)eps[lo + i];
                o[i] = m[i] + t;
            }
            if (eps_dst) {
                double *e = (double *)eps_dst;
                for (int64_t i = 0; i < n; i++) e[i] = (double)eps[lo + i];
            }
        } else {
            double *o = (double *)dst;
            for (int64_t i = 0; i < n; i++) o[i] = (double)eps[lo + i];
        }
        dst = (char *)dst + n * (dtype == 0 ? 4 : 8);
        if (eps_dst) eps_dst = (char *)eps_dst + n * (dtype == 0 ? 4 : 8);
        a += n;
        first += BLOCKS;
    }
}

/* Write elements [begin, end) of the virtual concatenation of all segments, (l, s) in
 * node-major order. Segment (l, s) goes to address outs[l] + s * strides[l] elements (strides
 * NULL: numels[l], the node's segments back to back). With eps_outs (and mus), the noise
 * itself also goes to eps_outs[l] + s * numels[l], for a backward pass that needs it. */
void tb_fill(int32_t uniform, int32_t dtype, const int64_t *outs, const int64_t *strides,
             int64_t begin, int64_t end, int64_t samples, const int64_t *keys, int64_t nodes,
             const int64_t *hashes, const int64_t *numels, const int64_t *mus,
             const int64_t *sigmas, const int64_t *eps_outs) {
    int64_t start = 0;
    size_t width = dtype == 0 ? 4 : 8;
    for (int64_t l = 0; l < nodes && start < end; l++) {
        int64_t n = numels[l], stride = strides ? strides[l] : numels[l];
        char *out = (char *)(intptr_t)outs[l];
        for (int64_t s = 0; s < samples; s++, start += n) {
            int64_t a = begin > start ? begin - start : 0;
            int64_t b = end < start + n ? end - start : n;
            if (a >= b) continue;
            int64_t word[2];
            if (hashes) {
                threefry((uint32_t)keys[2 * s], (uint32_t)keys[2 * s + 1], (uint64_t)hashes[l], word);
            } else { /* keys sample-major: keys[s * nodes + l] */
                word[0] = keys[2 * (s * nodes + l)];
                word[1] = keys[2 * (s * nodes + l) + 1];
            }
            const void *mu = mus ? (const void *)(intptr_t)mus[l] : 0;
            const void *sigma = sigmas ? (const void *)(intptr_t)sigmas[l] : 0;
            char *eps = eps_outs ? (char *)(intptr_t)eps_outs[l] + (s * n + a) * (int64_t)width : 0;
            segment(uniform, dtype, (uint32_t)word[0], (uint32_t)word[1], a, b,
                    out + (s * stride + a) * (int64_t)width, mu, sigma, eps);
        }
    }
}

/* tb_fill over `parts` parts of [0, total) (_parts.h). */
void tb_fill_parts(int32_t uniform, int32_t dtype, const int64_t *outs, const int64_t *strides,
                   int64_t samples, const int64_t *keys, int64_t nodes, const int64_t *hashes,
                   const int64_t *numels, const int64_t *mus, const int64_t *sigmas,
                   const int64_t *eps_outs, int64_t total, int64_t parts) {
    OVER_PARTS(total, parts,
               tb_fill(uniform, dtype, outs, strides, begin, end, samples, keys, nodes, hashes,
                       numels, mus, sigmas, eps_outs));
}

/* Where the library was built with OpenMP, the address its calls into the OpenMP runtime
 * reach (omp_get_max_threads), so tbfunc can check that the runtime is torch's; else NULL. */
#if defined(_OPENMP)
#include <omp.h>
#endif
void *tb_openmp(void) {
#if defined(_OPENMP)
    return (void *)&omp_get_max_threads;
#else
    return 0;
#endif
}
