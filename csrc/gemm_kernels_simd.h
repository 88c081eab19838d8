/* gemm_kernels_simd.h: the packing routines and the register-tiled micro-kernel of gemm_kernels.c.
 * gemm_kernels.c instantiates it (instantiate.h) once per element type (`real`, SFX = f32 / f64) and
 * instruction set (ISA = v3: AVX2 + FMA, VBYTES = 32; ISA = base: the baseline, VBYTES = 16), so each
 * function below exists as name_f32_v3, name_f32_base, ...
 *
 * Packed layouts (BLIS's): a block of A [mc, kc] is stored as slivers of MR rows, each [kc][MR]
 * (k-major: the MR values of one k are adjacent), zero-padded to whole slivers; a panel of B [kc, n]
 * as slivers of NR = 2 vectors of columns, each [kc][NR], zero-padded likewise. The micro-kernel
 * reads one sliver of each and holds an MR x NR tile of C in 12 vector registers.
 */
#include "simd_vec.h"

#define NR (2 * VL)

/* The slivers' width NR of this instantiation (the driver sizes its buffers with it). */
static int64_t FN(gemm_nr)(void) { return NR; }

#if IS_F32 && VBYTES == 32
typedef int FN(ivec) __attribute__((vector_size(VBYTES)));
#define ivec FN(ivec)

/* r[0..8) = the 8 x 8 block whose rows are r, transposed (unpack, then shuffle, then swap halves). */
ALWAYS_INLINE void FN(transpose8)(vec r[8])
{
    vec t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shuffle(r[i], r[i + 1], (ivec){0, 8, 1, 9, 4, 12, 5, 13});
        t[i + 1] = __builtin_shuffle(r[i], r[i + 1], (ivec){2, 10, 3, 11, 6, 14, 7, 15});
    }
    for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; h++) {
            u[i + 2 * h] = __builtin_shuffle(t[i + h], t[i + h + 2], (ivec){0, 1, 8, 9, 4, 5, 12, 13});
            u[i + 2 * h + 1] = __builtin_shuffle(t[i + h], t[i + h + 2], (ivec){2, 3, 10, 11, 6, 7, 14, 15});
        }
    for (int i = 0; i < 4; i++) {
        r[i] = __builtin_shuffle(u[i], u[i + 4], (ivec){0, 1, 2, 3, 8, 9, 10, 11});
        r[i + 4] = __builtin_shuffle(u[i], u[i + 4], (ivec){4, 5, 6, 7, 12, 13, 14, 15});
    }
}
#undef ivec
#define TRANSPOSE8 1
#endif

/* Ap: A [mc, kc] (row stride lda) as slivers of MR rows, [kc][MR] each, the last one zero-padded.
 * With 8 x 8 transposes (float32, AVX2) the store of k's MR values writes 8: the next k's store, or
 * the next sliver's, overwrites the 2 extra (the buffer has VPAD reals of slack after it). */
static void FN(gemm_pack_a)(real *restrict Ap, const real *restrict A, int64_t lda, int64_t mc, int64_t kc)
{
    for (int64_t i0 = 0; i0 < mc; i0 += MR) {
        real *restrict dst = Ap + i0 * kc;
        const real *a = A + i0 * lda;
        if (mc - i0 >= MR) {
            int64_t k = 0;
#ifdef TRANSPOSE8
            for (; k + 8 <= kc; k += 8) {
                vec r[8];
                for (int i = 0; i < 8; i++) r[i] = FN(load)(a + (i < MR ? i : MR - 1) * lda + k);
                FN(transpose8)(r);
                for (int l = 0; l < 8; l++) FN(store)(dst + (k + l) * MR, r[l]);
            }
#endif
            for (; k < kc; k++)
                for (int i = 0; i < MR; i++) dst[k * MR + i] = a[i * lda + k];
        } else
            for (int64_t k = 0; k < kc; k++)
                for (int i = 0; i < MR; i++) dst[k * MR + i] = i0 + i < mc ? a[i * lda + k] : 0;
    }
}

/* Bp: the slivers j of scale * B [kc, n], B (k, c) = B[k * rs + c * cs], for j in [j0, j1): sliver j
 * holds columns j * NR .. j * NR + NR at Bp + j * kc * NR, the columns from n on zero. scale = 1 is
 * exact. */
static void FN(gemm_pack_b)(real *restrict Bp, const real *restrict B, int64_t rs, int64_t cs, real scale,
                            int64_t kc, int64_t n, int64_t j0, int64_t j1)
{
    for (int64_t j = j0; j < j1; j++) {
        real *restrict dst = Bp + j * kc * NR;
        const int64_t c0 = j * NR, w = n - c0 < NR ? n - c0 : NR;
        if (w == NR && cs == 1)
            for (int64_t k = 0; k < kc; k++)
                for (int c = 0; c < NR; c++) dst[k * NR + c] = scale * B[k * rs + c0 + c];
        else if (w == NR) {
            int64_t k = 0;
#ifdef TRANSPOSE8
            if (rs == 1)
                for (; k + 8 <= kc; k += 8)
                    for (int h = 0; h < NR; h += 8) {
                        vec v[8];
                        for (int c = 0; c < 8; c++) v[c] = scale * FN(load)(B + (c0 + h + c) * cs + k);
                        FN(transpose8)(v);
                        for (int l = 0; l < 8; l++) FN(store)(dst + (k + l) * NR + h, v[l]);
                    }
#endif
            for (int c = 0; c < NR; c++) {
                const real *b = B + (c0 + c) * cs;
                for (int64_t kk = k; kk < kc; kk++) dst[kk * NR + c] = scale * b[kk * rs];
            }
        } else
            for (int64_t k = 0; k < kc; k++)
                for (int c = 0; c < NR; c++) dst[k * NR + c] = c < w ? scale * B[k * rs + (c0 + c) * cs] : 0;
    }
}

/* c [MR][2] += Ap [kc][MR] @ Bp [kc][NR], k = 0..kc-1 in order: one fused multiply-add per term. */
ALWAYS_INLINE void FN(gemm_accumulate)(vec c[MR][2], const real *restrict Ap, const real *restrict Bp, int64_t kc)
{
    for (int64_t k = 0; k < kc; k++) {
        const vec b0 = FN(load)(Bp + k * NR), b1 = FN(load)(Bp + k * NR + VL);
        for (int i = 0; i < MR; i++) {
            const vec a = Ap[k * MR + i] - (vec){0}; /* a broadcast (x - 0 is x, -0 included) */
            c[i][0] += a * b0;
            c[i][1] += a * b1;
        }
    }
}

/* One MR x NR tile of C (row stride ldc): C (+)= Ap @ Bp over kc, then, when Tp is not NULL,
 * C += Tp [r][MR] @ Ep [r][NR] (the low-rank term, added to the finished tile). Each element is
 * acc = sum over k in order, then C + acc when add, then its r low-rank terms in order. */
ALWAYS_INLINE void FN(gemm_micro)(real *restrict C, int64_t ldc, const real *restrict Ap, const real *restrict Bp,
                                  int64_t kc, int add, const real *restrict Tp, const real *restrict Ep, int64_t r)
{
    vec c[MR][2];
    for (int i = 0; i < MR; i++) { /* the tile's rows, read or written after the loop: from L3 or memory */
        __builtin_prefetch(C + i * ldc, 1, 3);
        __builtin_prefetch(C + i * ldc + NR - 1, 1, 3);
        c[i][0] = c[i][1] = (vec){0};
    }
    FN(gemm_accumulate)(c, Ap, Bp, kc);
    if (add)
        for (int i = 0; i < MR; i++) {
            c[i][0] += FN(load)(C + i * ldc);
            c[i][1] += FN(load)(C + i * ldc + VL);
        }
    if (Tp) FN(gemm_accumulate)(c, Tp, Ep, r);
    for (int i = 0; i < MR; i++) {
        FN(store)(C + i * ldc, c[i][0]);
        FN(store)(C + i * ldc + VL, c[i][1]);
    }
}

/* The tile of C at rows < mr, columns < nr (at most MR x NR) as gemm_micro computes it. */
static void FN(gemm_tile)(real *restrict C, int64_t ldc, const real *restrict Ap, const real *restrict Bp,
                          int64_t kc, int add, const real *restrict Tp, const real *restrict Ep, int64_t r,
                          int64_t mr, int64_t nr)
{
    if (mr == MR && nr == NR) {
        FN(gemm_micro)(C, ldc, Ap, Bp, kc, add, Tp, Ep, r);
        return;
    }
    real buf[MR * NR];
    for (int64_t i = 0; i < MR; i++)
        for (int64_t j = 0; j < NR; j++) buf[i * NR + j] = add && i < mr && j < nr ? C[i * ldc + j] : 0;
    FN(gemm_micro)(buf, NR, Ap, Bp, kc, add, Tp, Ep, r);
    for (int64_t i = 0; i < mr; i++)
        for (int64_t j = 0; j < nr; j++) C[i * ldc + j] = buf[i * NR + j];
}

/* One block of mc rows over one panel of kc: C [mc, n] (+)= A [mc, kc] @ B [kc, n], B packed in Bp
 * (its n columns in nb = ceil(n / NR) slivers). With T (low rank r): when new_t, first T [mc, r] (+)=
 * A @ L, L packed in the slivers after B's (Bp + nb * kc * NR); and on the last panel of K (`last`)
 * the low-rank term C += T @ E, E [r, n] packed in Ep (slivers of r rows, scaled), added to each
 * finished tile. Ap (mc * kc) and Tp (mc * r) are this thread's scratch: A packed, T packed. add: C
 * and T hold the earlier panels' sums. */
static void FN(gemm_block)(real *restrict C, int64_t ldc, real *restrict T, int new_t, real *restrict Ap,
                           real *restrict Tp, const real *restrict A, int64_t lda, const real *restrict Bp,
                           const real *restrict Ep, int64_t mc, int64_t n, int64_t kc, int64_t r, int add, int last)
{
    const int64_t nb = (n + NR - 1) / NR;
    FN(gemm_pack_a)(Ap, A, lda, mc, kc);
    if (T && new_t)
        for (int64_t j0 = 0; j0 < r; j0 += NR)
            for (int64_t i0 = 0; i0 < mc; i0 += MR)
                FN(gemm_tile)(T + i0 * r + j0, r, Ap + i0 * kc, Bp + (nb + j0 / NR) * kc * NR, kc, add, NULL, NULL, 0,
                              mc - i0 < MR ? mc - i0 : MR, r - j0 < NR ? r - j0 : NR);
    const int epilogue = T && last && r > 0;
    if (epilogue) FN(gemm_pack_a)(Tp, T, r, mc, r);
    for (int64_t j = 0; j < nb; j++)
        for (int64_t i0 = 0; i0 < mc; i0 += MR)
            FN(gemm_tile)(C + i0 * ldc + j * NR, ldc, Ap + i0 * kc, Bp + j * kc * NR, kc, add,
                          epilogue ? Tp + i0 * r : NULL, epilogue ? Ep + j * r * NR : NULL, r,
                          mc - i0 < MR ? mc - i0 : MR, n - j * NR < NR ? n - j * NR : NR);
}

#undef NR
#undef TRANSPOSE8
#include "simd_vec_end.h"
