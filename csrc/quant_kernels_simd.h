/* quant_kernels_simd.h: dequantization, the micro-kernel and the per-tile workers of quant_kernels.c.
 * quant_kernels.c instantiates it (instantiate.h) once per element type (`real`, SFX = f32 / f64) and
 * instruction set (ISA = v3: AVX2 + FMA, VBYTES = 32; ISA = base: the compiler's baseline, VBYTES = 16),
 * so each function below exists as name_f32_v3, name_f32_base, ... Matrices are row-major.
 */
#include "simd_vec.h"

#define MR 6 /* rows of the micro-kernel's register tile (x 2 vectors of columns: 12 accumulators) */

#if VBYTES == 32 && defined(__x86_64__)
#pragma GCC target("f16c") /* halves -> floats; this build runs only where the CPU has it (quant_kernels.c, QSIMD) */
/* AVX2 dequantization of Q8_0, Q4_0, Q4_1, Q6_K and F16: GCC's own vectorization of their scalar loops
 * converts element by element, or not at all (measured 4-10x slower than this). */
#define AVX2_BLOCKS 1

/* 8 floats to y [8]: stored, or widened to doubles. */
ALWAYS_INLINE void FN(store8)(real *y, __m256 v)
{
#if IS_F32
    _mm256_storeu_ps(y, v);
#else
    _mm256_storeu_pd(y, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    _mm256_storeu_pd(y + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
#endif
}

/* The 8 low bytes of v, unsigned (or signed), as 8 floats. */
ALWAYS_INLINE __m256 FN(u8_floats)(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
ALWAYS_INLINE __m256 FN(i8_floats)(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

/* Q4_0 (x = d (q - 8)) and Q4_1 (x = d q + m: the product is exact, so fused as ggml rounds it). */
ALWAYS_INLINE void FN(q4_avx2)(real *y, const uint8_t *b, int q4_1)
{
    const __m256 d = _mm256_set1_ps(half_to_float(b)), m = _mm256_set1_ps(q4_1 ? half_to_float(b + 2) : 0);
    const __m128i qs = _mm_loadu_si128((const __m128i *)(b + 2 + 2 * q4_1)), low = _mm_set1_epi8(0xF);
    const __m128i nib[2] = {_mm_and_si128(qs, low), _mm_and_si128(_mm_srli_epi16(qs, 4), low)};
    for (int i = 0; i < 4; i++) {
        const __m256 q = FN(u8_floats)(i & 1 ? _mm_srli_si128(nib[i / 2], 8) : nib[i / 2]);
        FN(store8)(y + 8 * i, q4_1 ? _mm256_fmadd_ps(d, q, m) : _mm256_mul_ps(d, _mm256_sub_ps(q, _mm256_set1_ps(8))));
    }
}

ALWAYS_INLINE void FN(q8_0_avx2)(real *y, const uint8_t *b)
{
    const __m256 d = _mm256_set1_ps(half_to_float(b));
    for (int i = 0; i < 4; i++)
        FN(store8)(y + 8 * i, _mm256_mul_ps(d, FN(i8_floats)(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * i)))));
}
/* Q6_K: x = (d scale) (q - 32), q 6 bits from ql and qh, a scale per 16 elements. */
ALWAYS_INLINE void FN(q6_k_avx2)(real *y, const uint8_t *b)
{
    const float d = half_to_float(b + 208);
    const int8_t *sc = (const int8_t *)(b + 192);
    const __m128i low = _mm_set1_epi8(0xF), two = _mm_set1_epi8(3);
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l += 16) { /* elements 128 h + 32 k + l .. + 16, k = 0..3 */
            const __m128i ql0 = _mm_loadu_si128((const __m128i *)(b + 64 * h + l));
            const __m128i ql1 = _mm_loadu_si128((const __m128i *)(b + 64 * h + 32 + l));
            const __m128i qh = _mm_loadu_si128((const __m128i *)(b + 128 + 32 * h + l));
            const __m128i q[4] = {
                _mm_or_si128(_mm_and_si128(ql0, low), _mm_slli_epi16(_mm_and_si128(qh, two), 4)),
                _mm_or_si128(_mm_and_si128(ql1, low), _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(qh, 2), two), 4)),
                _mm_or_si128(_mm_and_si128(_mm_srli_epi16(ql0, 4), low),
                             _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(qh, 4), two), 4)),
                _mm_or_si128(_mm_and_si128(_mm_srli_epi16(ql1, 4), low),
                             _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(qh, 6), two), 4))};
            for (int k = 0; k < 4; k++) {
                const __m256 scale = _mm256_set1_ps(d * (float)sc[8 * h + 2 * k + l / 16]), off = _mm256_set1_ps(32);
                real *yk = y + 128 * h + 32 * k + l;
                FN(store8)(yk, _mm256_mul_ps(scale, _mm256_sub_ps(FN(u8_floats)(q[k]), off)));
                FN(store8)(yk + 8, _mm256_mul_ps(scale, _mm256_sub_ps(FN(u8_floats)(_mm_srli_si128(q[k], 8)), off)));
            }
        }
}

/* 8 halves at p -> 8 floats, exactly: half_to_float's bit manipulation, 8 lanes at a time. */
ALWAYS_INLINE __m256 FN(f16_avx2)(const uint8_t *p)
{
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    const __m256i exp = _mm256_and_si256(_mm256_srli_epi32(h, 10), _mm256_set1_epi32(0x1f));
    const __m256i mant = _mm256_and_si256(h, _mm256_set1_epi32(0x3ff)), mant13 = _mm256_slli_epi32(mant, 13);
    const __m256i biased = _mm256_add_epi32(exp, _mm256_set1_epi32(112));
    const __m256i normal = _mm256_or_si256(_mm256_slli_epi32(biased, 23), mant13);
    const __m256i special = _mm256_or_si256(_mm256_set1_epi32(0x7f800000), mant13);
    const __m256 tiny = _mm256_mul_ps(_mm256_cvtepi32_ps(mant), _mm256_set1_ps(5.9604644775390625e-8f)); /* exact */
    const __m256i sub = _mm256_castps_si256(tiny);
    __m256i bits = _mm256_blendv_epi8(normal, special, _mm256_cmpeq_epi32(exp, _mm256_set1_epi32(0x1f)));
    bits = _mm256_blendv_epi8(bits, sub, _mm256_cmpeq_epi32(exp, _mm256_setzero_si256()));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(0x8000)), 16);
    return _mm256_castsi256_ps(_mm256_or_si256(bits, sign));
}
#else
#define AVX2_BLOCKS 0
#endif

/* One block of `type` at b -> its elements y [block size], as ggml's dequantize_row_*: plain loops that
 * GCC vectorizes. Where ggml adds a min (Q4_1, Q5_1, Q4_K, Q5_K) the product before it is exact in
 * float32 (a half's 11 bits times at most 11 more), so a fused multiply-add rounds as ggml's
 * multiply, then add. */
ALWAYS_INLINE void FN(dequant_block)(real *restrict y, const uint8_t *restrict b, const int type)
{
    switch (type) {
    case QUANT_Q8_0: {
#if AVX2_BLOCKS
        FN(q8_0_avx2)(y, b);
#else
        const float d = half_to_float(b);
        for (int j = 0; j < 32; j++) y[j] = d * (float)(int8_t)b[2 + j];
#endif
        return;
    }
    case QUANT_Q4_0: {
#if AVX2_BLOCKS
        FN(q4_avx2)(y, b, 0);
#else
        const float d = half_to_float(b);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((b[2 + j] & 0xF) - 8);
            y[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
        }
#endif
        return;
    }
    case QUANT_Q4_1: {
#if AVX2_BLOCKS
        FN(q4_avx2)(y, b, 1);
#else
        const float d = half_to_float(b), m = half_to_float(b + 2);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)(b[4 + j] & 0xF) + m;
            y[j + 16] = d * (float)(b[4 + j] >> 4) + m;
        }
#endif
        return;
    }
    case QUANT_Q5_0:
    case QUANT_Q5_1: { /* q = nibble | fifth bit from qh: x = d (q - 16), or d q + m */
        const int q5_1 = type == QUANT_Q5_1, offset = q5_1 ? 0 : 16;
        const float d = half_to_float(b), m = q5_1 ? half_to_float(b + 2) : 0;
        const uint32_t qh = load_u32(b + 2 + 2 * q5_1);
        const uint8_t *qs = b + 6 + 2 * q5_1;
        for (int j = 0; j < 16; j++) {
            const int h0 = (int)((qh >> j) << 4 & 0x10), h1 = (int)(qh >> (j + 12) & 0x10);
            const float q0 = (float)(((qs[j] & 0xF) | h0) - offset), q1 = (float)(((qs[j] >> 4) | h1) - offset);
            y[j] = q5_1 ? d * q0 + m : d * q0;
            y[j + 16] = q5_1 ? d * q1 + m : d * q1;
        }
        return;
    }
    case QUANT_Q4_K:
    case QUANT_Q5_K: { /* 8 sub-blocks of 32: x = d sc q - dmin m, q 4 bits (+ a fifth from qh) */
        const int q5 = type == QUANT_Q5_K;
        const float d = half_to_float(b), dmin = half_to_float(b + 2);
        const uint8_t *scales = b + 4, *qh = b + 16, *qs = b + 16 + 32 * q5;
        for (int j = 0; j < 8; j += 2) {
            uint8_t sc1, m1, sc2, m2;
            scale_min_k4(j, scales, &sc1, &m1);
            scale_min_k4(j + 1, scales, &sc2, &m2);
            const float d1 = d * (float)sc1, d2 = d * (float)sc2, dm1 = dmin * (float)m1, dm2 = dmin * (float)m2;
            const uint8_t *q = qs + 16 * j;
            for (int l = 0; l < 32; l++) {
                const int h1 = q5 ? (qh[l] >> j & 1) << 4 : 0, h2 = q5 ? (qh[l] >> (j + 1) & 1) << 4 : 0;
                y[32 * j + l] = d1 * (float)((q[l] & 0xF) + h1) - dm1;
                y[32 * j + 32 + l] = d2 * (float)((q[l] >> 4) + h2) - dm2;
            }
        }
        return;
    }
    case QUANT_Q6_K: { /* 16 sub-blocks of 16: x = d scale (q - 32), q 6 bits from ql and qh */
#if AVX2_BLOCKS
        FN(q6_k_avx2)(y, b);
#else
        const float d = half_to_float(b + 208);
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
            const int8_t *sc = (const int8_t *)(b + 192) + 8 * h;
            real *yh = y + 128 * h;
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0xF) | ((qh[l] >> 0) & 3) << 4) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4) - 32;
                const int q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
                const int q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
                yh[l] = d * (float)sc[is] * (float)q1;
                yh[l + 32] = d * (float)sc[is + 2] * (float)q2;
                yh[l + 64] = d * (float)sc[is + 4] * (float)q3;
                yh[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
#endif
        return;
    }
    }
}

/* Blocks of one type, the switch on the type taken once (ALWAYS_INLINE with a constant type). */
#define EACH_BLOCK(TYPE)                                                                                         \
    case TYPE:                                                                                                   \
        for (int64_t e = 0; e < n; e += bs, b += bb) FN(dequant_block)(out + e, b, TYPE);                      \
        return;

/* out [n] = elements k0 .. k0 + n of a row of W (k0 and n whole blocks). */
static void FN(dequant)(real *restrict out, const uint8_t *restrict row, int type, int64_t k0, int64_t n)
{
    const int64_t bs = quant_block_size(type), bb = block_bytes(type);
    const uint8_t *b = row + k0 / bs * bb;
    int64_t i = 0;
    switch (type) {
    case QUANT_F32:
        for (; i < n; i++) {
            float f;
            memcpy(&f, b + 4 * i, sizeof f);
            out[i] = f;
        }
        return;
    case QUANT_F16:
#if AVX2_BLOCKS
        for (; i + 8 <= n; i += 8) FN(store8)(out + i, FN(f16_avx2)(b + 2 * i));
#endif
        for (; i < n; i++) out[i] = half_to_float(b + 2 * i);
        return;
    case QUANT_BF16: /* the top half of a float32 */
        for (; i < n; i++) {
            const uint32_t bits = ((uint32_t)b[2 * i] | (uint32_t)b[2 * i + 1] << 8) << 16;
            float f;
            memcpy(&f, &bits, sizeof f);
            out[i] = f;
        }
        return;
    EACH_BLOCK(QUANT_Q8_0)
    EACH_BLOCK(QUANT_Q4_0)
    EACH_BLOCK(QUANT_Q4_1)
    EACH_BLOCK(QUANT_Q5_0)
    EACH_BLOCK(QUANT_Q5_1)
    EACH_BLOCK(QUANT_Q4_K)
    EACH_BLOCK(QUANT_Q5_K)
    EACH_BLOCK(QUANT_Q6_K)
    }
}

#undef EACH_BLOCK

/* The micro-kernel: C [mr, nc] += A [mr, L] @ B [L, 2 VL]; A's rows lda apart, B's ldb apart, C's
 * ldc apart; mr <= MR rows and nc <= 2 VL columns are stored (B is read in full, A's last row
 * stands in for the missing ones). Each element is summed over l in order. */
static void FN(kernel)(real *restrict C, int64_t ldc, const real *restrict A, int64_t lda, const real *restrict B,
                       int64_t ldb, int64_t L, int mr, int64_t nc)
{
    const real *a[MR];
    vec acc[MR][2];
    for (int i = 0; i < MR; i++) {
        a[i] = A + (i < mr ? i : mr - 1) * lda;
        acc[i][0] = acc[i][1] = (vec){0};
    }
    for (int64_t l = 0; l < L; l++) {
        const vec b0 = FN(load)(B + l * ldb), b1 = FN(load)(B + l * ldb + VL);
        for (int i = 0; i < MR; i++) {
            const vec ai = FN(splat)(a[i][l]);
            acc[i][0] += ai * b0;
            acc[i][1] += ai * b1;
        }
    }
    for (int i = 0; i < mr; i++) {
        real *c = C + i * ldc;
        if (nc == 2 * VL) {
            FN(store)(c, FN(load)(c) + acc[i][0]);
            FN(store)(c + VL, FN(load)(c + VL) + acc[i][1]);
        } else {
            for (int64_t j = 0; j < nc; j++) c[j] += j < VL ? acc[i][0][j] : acc[i][1][j - VL];
        }
    }
}

/* Forward, one task: y [m0:m1, n0:n0+nn] = x [m0:m1, :] @ W [n0:n0+nn, :]^T + bias. W's rows are
 * rb bytes; panel [KT, NT] and buf [KT] are this thread's scratch (panel's columns past nn are
 * read but not stored). */
static void FN(forward_tile)(real *y, const real *x, const uint8_t *w, const real *bias, int type, int64_t rb,
                             int64_t m0, int64_t m1, int64_t n0, int64_t nn, int64_t N, int64_t K, real *panel,
                             real *buf)
{
    for (int64_t m = m0; m < m1; m++)
        for (int64_t j = 0; j < nn; j++) y[m * N + n0 + j] = bias ? bias[n0 + j] : 0;
    for (int64_t k0 = 0; k0 < K; k0 += KT) {
        const int64_t kk = min64(KT, K - k0);
        for (int64_t r = 0; r < nn; r++) {
            FN(dequant)(buf, w + (n0 + r) * rb, type, k0, kk);
            for (int64_t l = 0; l < kk; l++) panel[l * NT + r] = buf[l]; /* [kk, NT] */
        }
        for (int64_t j = 0; j < nn; j += 2 * VL)
            for (int64_t m = m0; m < m1; m += MR)
                FN(kernel)(y + m * N + n0 + j, N, x + m * K + k0, K, panel + j, NT, kk, (int)min64(MR, m1 - m),
                           min64(2 * VL, nn - j));
    }
}

/* Backward, one task: dx [m0:m1, k0:k0+kk] = dy [m0:m1, :] @ W [:, k0:k0+kk]; panel [NT, KT]. */
static void FN(backward_tile)(real *dx, const real *dy, const uint8_t *w, int type, int64_t rb, int64_t m0,
                              int64_t m1, int64_t k0, int64_t kk, int64_t N, int64_t K, real *panel)
{
    for (int64_t m = m0; m < m1; m++)
        for (int64_t j = 0; j < kk; j++) dx[m * K + k0 + j] = 0;
    for (int64_t n0 = 0; n0 < N; n0 += NT) {
        const int64_t nn = min64(NT, N - n0);
        for (int64_t r = 0; r < nn; r++) FN(dequant)(panel + r * KT, w + (n0 + r) * rb, type, k0, kk);
        for (int64_t j = 0; j < kk; j += 2 * VL)
            for (int64_t m = m0; m < m1; m += MR)
                FN(kernel)(dx + m * K + k0 + j, K, dy + m * N + n0, N, panel + j, KT, nn, (int)min64(MR, m1 - m),
                           min64(2 * VL, kk - j));
    }
}

/* Decode: y [0:ROWS, n0:n1] = x [ROWS, K] @ W [n0:n1, :]^T + bias, ROWS <= DECODE_ROWS a constant.
 * The baseline's: each weight row is dequantized a superblock at a time into a buffer in L1 and dotted
 * with every row of x there: W is read once. */
ALWAYS_INLINE void FN(decode_rows)(real *y, const real *x, const uint8_t *w, const real *bias, int type, int64_t rb,
                                   int64_t n0, int64_t n1, int64_t N, int64_t K, const int ROWS)
{
    real buf[KT];
    for (int64_t n = n0; n < n1; n++) {
        vec acc[DECODE_ROWS][2];
        real tail[DECODE_ROWS];
        for (int m = 0; m < ROWS; m++) acc[m][0] = acc[m][1] = (vec){0}, tail[m] = 0;
        for (int64_t k0 = 0; k0 < K; k0 += KT) {
            const int64_t kk = min64(KT, K - k0);
            FN(dequant)(buf, w + n * rb, type, k0, kk);
            int64_t l = 0;
            for (; l + 2 * VL <= kk; l += 2 * VL) {
                const vec w0 = FN(load)(buf + l), w1 = FN(load)(buf + l + VL);
                for (int m = 0; m < ROWS; m++) {
                    acc[m][0] += FN(load)(x + m * K + k0 + l) * w0;
                    acc[m][1] += FN(load)(x + m * K + k0 + l + VL) * w1;
                }
            }
            for (; l < kk; l++)
                for (int m = 0; m < ROWS; m++) tail[m] += x[m * K + k0 + l] * buf[l];
        }
        for (int m = 0; m < ROWS; m++) y[m * N + n] = FN(hsum)(acc[m][0] + acc[m][1]) + tail[m] + (bias ? bias[n] : 0);
    }
}

#if AVX2_BLOCKS
/* ---- AVX2 decode in registers: a row of W 32 weights at a time (a group), as 4 vectors of 8 floats that go
 * from the dequantization straight into the multiply-adds with x (no store and reload through a buffer). */

/* 8 bytes at p, widened to 8 unsigned (or signed) 32-bit lanes. */
ALWAYS_INLINE __m256i FN(u8x8)(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
ALWAYS_INLINE __m256i FN(i8x8)(const uint8_t *p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }

/* The scales of a K-quant superblock b, as ggml rounds them: s [g], mn [g] = d sc_g, dmin m_g of group g (Q4_K,
 * Q5_K); s [j] = d sc_j of the 16 sub-blocks of 16 (Q6_K). The other types read their scales in group(). */
ALWAYS_INLINE void FN(span_scales)(float *s, float *mn, const uint8_t *b, const int type)
{
    if (type == QUANT_Q4_K || type == QUANT_Q5_K) {
        const float d = half_to_float(b), dmin = half_to_float(b + 2);
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            scale_min_k4(j, b + 4, &sc, &m);
            s[j] = d * (float)sc, mn[j] = dmin * (float)m;
        }
    } else if (type == QUANT_Q6_K) {
        const __m256 d = _mm256_set1_ps(half_to_float(b + 208));
        _mm256_storeu_ps(s, _mm256_mul_ps(d, _mm256_cvtepi32_ps(FN(i8x8)(b + 192))));
        _mm256_storeu_ps(s + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(FN(i8x8)(b + 200))));
    }
}

/* wv [4] = 32 weights, each the value ggml's dequantization gives (products that ggml rounds before adding a min
 * are exact, so the fused multiply-adds round as ggml does): the 32-element block at b (Q4_0, Q4_1, Q5_0, Q5_1,
 * Q8_0), the 32 values at b (F32, F16, BF16), or group g (0 .. 7) of the superblock at b with its scales s, mn
 * (K-quants: group_at() says where each vector lies in the superblock). */
ALWAYS_INLINE void FN(group)(__m256 wv[4], const uint8_t *b, const int type, int g, const float *s, const float *mn)
{
    const __m256i low = _mm256_set1_epi32(0xF);
    switch (type) {
    case QUANT_F32:
        for (int i = 0; i < 4; i++) wv[i] = _mm256_loadu_ps((const float *)(b + 32 * i));
        return;
    case QUANT_F16: /* F16C converts halves exactly */
        for (int i = 0; i < 4; i++) wv[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16 * i)));
        return;
    case QUANT_BF16: /* the top half of a float32 */
        for (int i = 0; i < 4; i++)
            wv[i] = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(b + 16 * i))), 16));
        return;
    case QUANT_Q8_0: {
        const __m256 d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int)load_u32(b))));
        for (int i = 0; i < 4; i++) wv[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(FN(i8x8)(b + 2 + 8 * i)));
        return;
    }
    case QUANT_Q4_0: case QUANT_Q4_1: case QUANT_Q5_0: case QUANT_Q5_1: {
        /* elements 0..15: the low nibbles of qs [0..15], 16..31 the high ones; Q5: the fifth bit of element e is
         * bit e of qh */
        const int has_m = type == QUANT_Q4_1 || type == QUANT_Q5_1, q5 = type == QUANT_Q5_0 || type == QUANT_Q5_1;
        const uint8_t *qs = b + 2 + 2 * has_m + 4 * q5;
        const __m256i lo = FN(u8x8)(qs), hi = FN(u8x8)(qs + 8);
        const __m256i q[4] = {_mm256_and_si256(lo, low), _mm256_and_si256(hi, low), _mm256_srli_epi32(lo, 4),
                              _mm256_srli_epi32(hi, 4)};
        const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)load_u32(b))); /* d, and m for Q4_1 and Q5_1 */
        const __m256 d = _mm256_broadcastss_ps(dm), m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
        const __m256i qh = _mm256_set1_epi32(q5 ? (int)load_u32(b + 2 + 2 * has_m) : 0);
        for (int i = 0; i < 4; i++) {
            __m256i qi = q[i];
            if (q5) {
                const __m256i bits = _mm256_setr_epi32(1 << (8 * i), 2 << (8 * i), 4 << (8 * i), 8 << (8 * i),
                                                       16 << (8 * i), 32 << (8 * i), 64 << (8 * i),
                                                       (int)(128u << (8 * i))); /* 1 << e, e of vector i */
                const __m256i hit = _mm256_cmpeq_epi32(_mm256_and_si256(qh, bits), bits);
                qi = _mm256_or_si256(qi, _mm256_and_si256(hit, _mm256_set1_epi32(16)));
            }
            wv[i] = has_m ? _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(qi), m)
                          : _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(qi, _mm256_set1_epi32(q5 ? 16 : 8))));
        }
        return;
    }
    case QUANT_Q4_K: case QUANT_Q5_K: { /* group g: 16 bytes of qs, low nibbles (sub-block 2 p), high (2 p + 1) */
        const int q5 = type == QUANT_Q5_K, p = g / 2, c = g % 2;
        const uint8_t *qs = b + 16 + 32 * q5 + 32 * p + 16 * c, *qh = b + 16 + 16 * c;
        for (int i = 0; i < 4; i++) {
            const int j = 2 * p + i / 2; /* the sub-block */
            const __m256i raw = FN(u8x8)(qs + 8 * (i % 2));
            __m256i qi = i < 2 ? _mm256_and_si256(raw, low) : _mm256_srli_epi32(raw, 4);
            if (q5) { /* fifth bit: bit j of qh [l] */
                const __m256i h = _mm256_srl_epi32(FN(u8x8)(qh + 8 * (i % 2)), _mm_cvtsi32_si128(j));
                qi = _mm256_or_si256(qi, _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32(1)), 4));
            }
            wv[i] = _mm256_fmsub_ps(_mm256_set1_ps(s[j]), _mm256_cvtepi32_ps(qi), _mm256_set1_ps(mn[j]));
        }
        return;
    }
    case QUANT_Q6_K: { /* group g = 4 h + i: l = 8 i .. 8 i + 7 of the four quarters k of half h, from one load
                        * each of ql [64 h + l], ql [64 h + 32 + l] (low nibbles for k = 0, 1, high for 2, 3) and
                        * qh [32 h + l] (bits 2 k, 2 k + 1) */
        const int h = g / 4, i = g % 4;
        const __m256i ql0 = FN(u8x8)(b + 64 * h + 8 * i), ql1 = FN(u8x8)(b + 64 * h + 32 + 8 * i);
        const __m256i qh = FN(u8x8)(b + 128 + 32 * h + 8 * i), bits = _mm256_set1_epi32(0x30);
        const __m256i q[4] = {
            _mm256_or_si256(_mm256_and_si256(ql0, low), _mm256_and_si256(_mm256_slli_epi32(qh, 4), bits)),
            _mm256_or_si256(_mm256_and_si256(ql1, low), _mm256_and_si256(_mm256_slli_epi32(qh, 2), bits)),
            _mm256_or_si256(_mm256_srli_epi32(ql0, 4), _mm256_and_si256(qh, bits)),
            _mm256_or_si256(_mm256_srli_epi32(ql1, 4), _mm256_and_si256(_mm256_srli_epi32(qh, 2), bits))};
        for (int k = 0; k < 4; k++)
            wv[k] = _mm256_mul_ps(_mm256_set1_ps(s[8 * h + 2 * k + i / 2]),
                                  _mm256_cvtepi32_ps(_mm256_sub_epi32(q[k], _mm256_set1_epi32(32))));
        return;
    }
    }
}

/* Where vector i of group g of a K-quant superblock (group()) starts in it. */
ALWAYS_INLINE int FN(group_at)(const int type, int g, int i)
{
    if (type == QUANT_Q6_K) return 128 * (g / 4) + 32 * i + 8 * (g % 4);
    return 64 * (g / 2) + 32 * (i / 2) + 16 * (g % 2) + 8 * (i % 2);
}

/* acc [u % NV] += x [8 weights] * w for the vectors u of these 8 weights (one of floats, two of doubles). */
ALWAYS_INLINE void FN(fma8)(vec *acc, const int NV, int u, const real *x, __m256 w)
{
#if IS_F32
    acc[u % NV] = (vec)_mm256_fmadd_ps((__m256)FN(load)(x), w, (__m256)acc[u % NV]);
#else
    acc[2 * u % NV] = (vec)_mm256_fmadd_pd((__m256d)FN(load)(x), _mm256_cvtps_pd(_mm256_castps256_ps128(w)),
                                            (__m256d)acc[2 * u % NV]);
    acc[(2 * u + 1) % NV] = (vec)_mm256_fmadd_pd((__m256d)FN(load)(x + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(w, 1)),
                                                  (__m256d)acc[(2 * u + 1) % NV]);
#endif
}

/* The sum of v's lanes as a tree of vector adds (halves, then quarters, ...): a short dependency chain. */
ALWAYS_INLINE real FN(hsum_tree)(vec v)
{
#if IS_F32
    __m128 h = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#else
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128((__m256d)v), _mm256_extractf128_pd((__m256d)v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
#endif
}

/* decode_rows in registers, for one type (a constant): NV accumulators a row of x, enough independent
 * multiply-add chains to hide their latency. K % 32 last weights (F32, F16, BF16 only) one at a time. */
ALWAYS_INLINE void FN(decode_regs)(real *y, const real *x, const uint8_t *w, const real *bias, const int type,
                                   int64_t rb, int64_t n0, int64_t n1, int64_t N, int64_t K, const int ROWS)
{
    enum { NV = DECODE_ROWS }; /* room for the most; ROWS decides how many are used */
    const int nv = ROWS <= 2 ? 4 : ROWS <= 4 ? 2 : 1;
    const int kquant = type == QUANT_Q4_K || type == QUANT_Q5_K || type == QUANT_Q6_K;
    const int64_t bs = quant_block_size(type), bb = block_bytes(type), K32 = K / 32 * 32;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * rb;
        vec acc[DECODE_ROWS][NV];
        real tail[DECODE_ROWS];
        for (int m = 0; m < ROWS; m++) {
            for (int v = 0; v < nv; v++) acc[m][v] = (vec){0};
            tail[m] = 0;
        }
        if (kquant) {
            for (int64_t k0 = 0; k0 < K; k0 += 256) {
                const uint8_t *b = row + k0 / 256 * bb;
                float s[16], mn[8];
                FN(span_scales)(s, mn, b, type);
#pragma GCC unroll 8
                for (int g = 0; g < 8; g++) { /* unrolled: the offsets in the superblock become constants */
                    __m256 wv[4];
                    FN(group)(wv, b, type, g, s, mn);
                    for (int i = 0; i < 4; i++)
                        for (int m = 0; m < ROWS; m++)
                            FN(fma8)(acc[m], nv, i, x + m * K + k0 + FN(group_at)(type, g, i), wv[i]);
                }
            }
        } else {
            for (int64_t k0 = 0; k0 < K32; k0 += 32) {
                __m256 wv[4];
                FN(group)(wv, row + k0 / bs * bb, type, 0, NULL, NULL);
                for (int i = 0; i < 4; i++)
                    for (int m = 0; m < ROWS; m++) FN(fma8)(acc[m], nv, i, x + m * K + k0 + 8 * i, wv[i]);
            }
        }
        for (int64_t k = K32; k < K; k++) {
            real e;
            FN(dequant)(&e, row, type, k, 1);
            for (int m = 0; m < ROWS; m++) tail[m] += x[m * K + k] * e;
        }
        for (int m = 0; m < ROWS; m++) {
            for (int v = 1; v < nv; v++) acc[m][0] += acc[m][v];
            y[m * N + n] = FN(hsum_tree)(acc[m][0]) + tail[m] + (bias ? bias[n] : 0);
        }
    }
}

#define DECODE_TYPE(TYPE)                                                                                        \
    case TYPE: FN(decode_regs)(y, x, w, bias, TYPE, rb, n0, n1, N, K, ROWS); return;

/* decode_regs with the type made a constant. */
ALWAYS_INLINE void FN(decode_m)(real *y, const real *x, const uint8_t *w, const real *bias, int type, int64_t rb,
                                int64_t n0, int64_t n1, int64_t N, int64_t K, const int ROWS)
{
    switch (type) {
    DECODE_TYPE(QUANT_F32)
    DECODE_TYPE(QUANT_F16)
    DECODE_TYPE(QUANT_BF16)
    DECODE_TYPE(QUANT_Q8_0)
    DECODE_TYPE(QUANT_Q4_0)
    DECODE_TYPE(QUANT_Q4_1)
    DECODE_TYPE(QUANT_Q5_0)
    DECODE_TYPE(QUANT_Q5_1)
    DECODE_TYPE(QUANT_Q4_K)
    DECODE_TYPE(QUANT_Q5_K)
    DECODE_TYPE(QUANT_Q6_K)
    }
}

#undef DECODE_TYPE
#else
ALWAYS_INLINE void FN(decode_m)(real *y, const real *x, const uint8_t *w, const real *bias, int type, int64_t rb,
                                int64_t n0, int64_t n1, int64_t N, int64_t K, const int ROWS)
{
    FN(decode_rows)(y, x, w, bias, type, rb, n0, n1, N, K, ROWS);
}
#endif

/* The decode worker with its row count made a constant (1 .. DECODE_ROWS), so the accumulators live in registers. */
static void FN(decode)(real *y, const real *x, const uint8_t *w, const real *bias, int type, int64_t rb, int64_t M,
                       int64_t n0, int64_t n1, int64_t N, int64_t K)
{
    switch (M) {
    case 1: FN(decode_m)(y, x, w, bias, type, rb, n0, n1, N, K, 1); return;
    case 2: FN(decode_m)(y, x, w, bias, type, rb, n0, n1, N, K, 2); return;
    case 3: FN(decode_m)(y, x, w, bias, type, rb, n0, n1, N, K, 3); return;
    case 4: FN(decode_m)(y, x, w, bias, type, rb, n0, n1, N, K, 4); return;
    case 5: FN(decode_m)(y, x, w, bias, type, rb, n0, n1, N, K, 5); return;
    case 6: FN(decode_m)(y, x, w, bias, type, rb, n0, n1, N, K, 6); return;
    case 7: FN(decode_m)(y, x, w, bias, type, rb, n0, n1, N, K, 7); return;
    default: FN(decode_m)(y, x, w, bias, type, rb, n0, n1, N, K, 8); return;
    }
}
#undef MR
#undef AVX2_BLOCKS
#include "simd_vec_end.h"
