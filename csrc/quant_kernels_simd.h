/* quant_kernels_simd.h: dequantization, the micro-kernel and the per-tile workers of quant_kernels.c.
 * quant_kernels.c instantiates it (instantiate.h) once per element type (`real`, SFX = f32 / f64) and
 * instruction set (ISA = v3: AVX2 + FMA, VBYTES = 32; ISA = base: the compiler's baseline, VBYTES = 16),
 * so each function below exists as name_f32_v3, name_f32_base, ... Matrices are row-major.
 */
#include "simd_vec.h"

#define MR 6 /* rows of the micro-kernel's register tile (x 2 vectors of columns: 12 accumulators) */

#if VBYTES == 32 && defined(__x86_64__)
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
 * Each weight row is dequantized a superblock at a time into buf [KT] and dotted with every row of
 * x while it is in L1: W is read once. */
ALWAYS_INLINE void FN(decode_rows)(real *y, const real *x, const uint8_t *w, const real *bias, int type, int64_t rb,
                                   int64_t n0, int64_t n1, int64_t N, int64_t K, real *buf, const int ROWS)
{
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

/* decode_rows with its row count made a constant (1 .. DECODE_ROWS), so the accumulators live in registers. */
static void FN(decode)(real *y, const real *x, const uint8_t *w, const real *bias, int type, int64_t rb, int64_t M,
                       int64_t n0, int64_t n1, int64_t N, int64_t K, real *buf)
{
    switch (M) {
    case 1: FN(decode_rows)(y, x, w, bias, type, rb, n0, n1, N, K, buf, 1); return;
    case 2: FN(decode_rows)(y, x, w, bias, type, rb, n0, n1, N, K, buf, 2); return;
    case 3: FN(decode_rows)(y, x, w, bias, type, rb, n0, n1, N, K, buf, 3); return;
    case 4: FN(decode_rows)(y, x, w, bias, type, rb, n0, n1, N, K, buf, 4); return;
    case 5: FN(decode_rows)(y, x, w, bias, type, rb, n0, n1, N, K, buf, 5); return;
    case 6: FN(decode_rows)(y, x, w, bias, type, rb, n0, n1, N, K, buf, 6); return;
    case 7: FN(decode_rows)(y, x, w, bias, type, rb, n0, n1, N, K, buf, 7); return;
    default: FN(decode_rows)(y, x, w, bias, type, rb, n0, n1, N, K, buf, 8); return;
    }
}

#undef MR
#undef AVX2_BLOCKS
#include "simd_vec_end.h"
