/* lora_kernels_simd.h: the SIMD building blocks and per-block workers of lora_kernels.c.
 * lora_kernels.c includes it once per element type (`real`, SFX = f32 / f64) and instruction
 * set (ISA = v3: AVX2 + FMA with VBYTES = 32, under #pragma GCC target; ISA = base: the
 * compiler's baseline with VBYTES = 16), so each function below exists as name_f32_v3,
 * name_f32_base, ... and the public functions pick the set the CPU has at run time.
 * Matrices are row-major; a shape comment names each argument's shape.
 */
#include "simd_vec.h"

/* ---- rows_dot: T [M, R] = X [M, K] @ W [R, K]^T ------------------------------------- */

/* One tile of MB <= 2 rows of X against KB <= 4 rows of W (MB, KB compile-time constants).
 * T is [MB, KB] with row stride ldt; X is [MB, K] with row stride ldx; W is [KB, K], stride ldw. */
ALWAYS_INLINE void FN(dot_tile)(real *restrict T, int64_t ldt, const real *restrict X, int64_t ldx,
                                const real *restrict W, int64_t ldw, int64_t K, const int MB, const int KB)
{
    vec acc[2][4];
    for (int m = 0; m < MB; m++)
        for (int k = 0; k < KB; k++) acc[m][k] = (vec){0};
    int64_t i = 0;
    for (; i + VL <= K; i += VL) {
        vec xv[2];
        for (int m = 0; m < MB; m++) xv[m] = FN(load)(X + m * ldx + i);
        for (int k = 0; k < KB; k++) {
            vec w = FN(load)(W + k * ldw + i);
            for (int m = 0; m < MB; m++) acc[m][k] += xv[m] * w;
        }
    }
    for (int m = 0; m < MB; m++)
        for (int k = 0; k < KB; k++) {
            real s = FN(hsum)(acc[m][k]);
            for (int64_t j = i; j < K; j++) s += X[m * ldx + j] * W[k * ldw + j];
            T[m * ldt + k] = s;
        }
}

/* T [M, R] = X [M, K] @ W [R, K]^T; all three dense. */
ALWAYS_INLINE void FN(rows_dot)(real *restrict T, const real *restrict X, const real *restrict W,
                                int64_t M, int64_t K, int64_t R)
{
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
        int64_t k = 0;
        for (; k + 4 <= R; k += 4) FN(dot_tile)(T + m * R + k, R, X + m * K, K, W + k * K, K, K, 2, 4);
        for (; k < R; k++) FN(dot_tile)(T + m * R + k, R, X + m * K, K, W + k * K, K, K, 2, 1);
    }
    for (; m < M; m++) {
        int64_t k = 0;
        for (; k + 4 <= R; k += 4) FN(dot_tile)(T + m * R + k, R, X + m * K, K, W + k * K, K, K, 1, 4);
        for (; k < R; k++) FN(dot_tile)(T + m * R + k, R, X + m * K, K, W + k * K, K, K, 1, 1);
    }
}

/* ---- rows_update: Y [M, K] += C [M, R] @ D [R, K] ----------------------------------- */

/* D is packed by column tiles of JW = 2 * VL: tile jt holds D[0..R, jt*JW .. jt*JW + JW) as R
 * contiguous rows of JW, so a tile's R rows are one sequential read whatever K is (rows of D a
 * power of two apart would otherwise fall into the same cache sets); the K % JW last columns
 * follow as a dense [R, K % JW] block. pack_scaled writes this layout. */
#define JW (2 * VL)

/* Dp = scale * S packed as above, where S (k, j) = src[k * sk + j * sj] for k < R, j < K. */
static void FN(pack_scaled)(real *restrict Dp, const real *restrict src, int64_t sk, int64_t sj, real scale,
                            int64_t R, int64_t K)
{
    const int64_t full = K / JW * JW, tail = K - full;
    for (int64_t k = 0; k < R; k++) {
        for (int64_t j = 0; j < full; j++) Dp[(j / JW * R + k) * JW + j % JW] = scale * src[k * sk + j * sj];
        for (int64_t j = full; j < K; j++) Dp[full * R + k * tail + (j - full)] = scale * src[k * sk + j * sj];
    }
}

/* MB <= 4 rows of Y (row stride ldy); C[m, k] is C[m * csm + k * csk], so C may be a
 * transposed view; Dp is D [R, K] packed. Each element adds its R terms in order k = 0..R-1. */
ALWAYS_INLINE void FN(update_tile)(real *restrict Y, int64_t ldy, const real *restrict C, int64_t csm,
                                   int64_t csk, const real *restrict Dp, int64_t K, int64_t R, const int MB)
{
    const int64_t full = K / JW * JW, tail = K - full;
    for (int64_t j = 0; j < full; j += JW) {
        const real *d = Dp + j * R;
        vec acc[4][2];
        for (int m = 0; m < MB; m++) {
            acc[m][0] = FN(load)(Y + m * ldy + j);
            acc[m][1] = FN(load)(Y + m * ldy + j + VL);
        }
        for (int64_t k = 0; k < R; k++) {
            vec d0 = FN(load)(d + k * JW), d1 = FN(load)(d + k * JW + VL);
            for (int m = 0; m < MB; m++) {
                real c = C[m * csm + k * csk];
                acc[m][0] += c * d0;
                acc[m][1] += c * d1;
            }
        }
        for (int m = 0; m < MB; m++) {
            FN(store)(Y + m * ldy + j, acc[m][0]);
            FN(store)(Y + m * ldy + j + VL, acc[m][1]);
        }
    }
    for (int64_t j = full; j < K; j++)
        for (int m = 0; m < MB; m++) {
            real s = Y[m * ldy + j];
            for (int64_t k = 0; k < R; k++) s += C[m * csm + k * csk] * Dp[full * R + k * tail + (j - full)];
            Y[m * ldy + j] = s;
        }
}

ALWAYS_INLINE void FN(rows_update)(real *restrict Y, const real *restrict C, int64_t csm, int64_t csk,
                                   const real *restrict Dp, int64_t M, int64_t K, int64_t R)
{
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) FN(update_tile)(Y + m * K, K, C + m * csm, csm, csk, Dp, K, R, 4);
    for (; m < M; m++) FN(update_tile)(Y + m * K, K, C + m * csm, csm, csk, Dp, K, R, 1);
}

/* ---- rows_reduce: P [R, W] += C [M, R]^T @ X [M, W] --------------------------------- */

/* KB <= 8 rows of P, VL columns (P row stride ldp); C is [M, KB] (row stride ldc); X is
 * [M, VL] (row stride ldx). Each element adds its M terms in order m = 0..M-1. */
ALWAYS_INLINE void FN(reduce_tile)(real *restrict P, int64_t ldp, const real *restrict C, int64_t ldc,
                                   const real *restrict X, int64_t ldx, int64_t M, const int KB)
{
    vec acc[8];
    for (int k = 0; k < KB; k++) acc[k] = FN(load)(P + k * ldp);
    for (int64_t m = 0; m < M; m++) {
        vec xv = FN(load)(X + m * ldx);
        for (int k = 0; k < KB; k++) acc[k] += C[m * ldc + k] * xv;
    }
    for (int k = 0; k < KB; k++) FN(store)(P + k * ldp, acc[k]);
}

/* P [R, W] (row stride ldp) += C [M, R]^T @ X [M, W] (row stride ldx); C is dense.
 * The tiles walk X down its columns. Rows of X a power of two apart share cache sets and the
 * prefetcher does not follow that walk, so the block's full column tiles are first copied, row
 * by row, into `packed` [W / VL][M][VL] (M * W reals), which the tiles then read in order. */
ALWAYS_INLINE void FN(rows_reduce)(real *restrict P, int64_t ldp, const real *restrict C, const real *restrict X,
                                   int64_t ldx, int64_t M, int64_t W, int64_t R, real *restrict packed)
{
    const int64_t full = W / VL * VL;
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < full; j += VL) FN(store)(packed + (j * M + m * VL), FN(load)(X + m * ldx + j));
    for (int64_t j = 0; j < full; j += VL) {
        const real *xp = packed + j * M;
        int64_t k = 0;
        for (; k + 8 <= R; k += 8) FN(reduce_tile)(P + k * ldp + j, ldp, C + k, R, xp, VL, M, 8);
        for (; k + 4 <= R; k += 4) FN(reduce_tile)(P + k * ldp + j, ldp, C + k, R, xp, VL, M, 4);
        for (; k < R; k++) FN(reduce_tile)(P + k * ldp + j, ldp, C + k, R, xp, VL, M, 1);
    }
    for (int64_t j = full; j < W; j++)
        for (int64_t k = 0; k < R; k++) {
            real s = P[k * ldp + j];
            for (int64_t m = 0; m < M; m++) s += C[m * R + k] * X[m * ldx + j];
            P[k * ldp + j] = s;
        }
}

/* ---- per-block workers: the SIMD code, one clone per instruction set ------------------ */

/* M token rows: t [M, r] = x [M, in] @ lora_A^T;  y [M, out] += t @ sBt, sBt = scaling * lora_B^T [r, out] packed. */
static void FN(forward_block)(real *restrict y, real *restrict t, const real *restrict x,
                                          const real *restrict lora_A, const real *restrict sBt,
                                          int64_t M, int64_t in, int64_t out, int64_t r)
{
    FN(rows_dot)(t, x, lora_A, M, in, r);
    FN(rows_update)(y, t, r, 1, sBt, M, out, r);
}

/* Backward, first pass over M token rows: g [M, r] = dy [M, out] @ Bt^T (Bt = lora_B^T [r, out]);
 * dx [M, in] += g @ sA (sA = scaling * lora_A, packed), skipped when dx is NULL. */
static void FN(backward_rows)(real *restrict dx, real *restrict g, const real *restrict dy,
                                          const real *restrict Bt, const real *restrict sA,
                                          int64_t M, int64_t in, int64_t out, int64_t r)
{
    FN(rows_dot)(g, dy, Bt, M, out, r);
    if (dx) FN(rows_update)(dx, g, r, 1, sA, M, in, r);
}

/* Backward, second pass: P [r, W] (row stride ldp) += C [M, r]^T @ X [M, W] (row stride ldx). */
static void FN(reduce_block)(real *restrict P, int64_t ldp, const real *restrict C,
                                         const real *restrict X, int64_t ldx, int64_t M, int64_t W, int64_t r,
                                         real *restrict packed)
{
    FN(rows_reduce)(P, ldp, C, X, ldx, M, W, r, packed);
}

/* P [r, K] += C [M, r]^T @ X [M, K] over one chunk of M tokens, in column panels (at most
 * PANEL_COLS wide) whose slice of P (about PANEL_BYTES) stays in cache while the chunk's
 * ROWS-row blocks stream by: P is not re-read from memory for every block however large r * K.
 * packed: ROWS * PANEL_COLS reals of scratch. */
static void FN(reduce_chunk)(real *P, const real *C, const real *X, int64_t M, int64_t K, int64_t r, real *packed)
{
    int64_t width = min64(PANEL_COLS, PANEL_BYTES / (r * (int64_t)sizeof(real)) / VL * VL);
    if (width < VL) width = VL;
    for (int64_t j0 = 0; j0 < K; j0 += width)
        for (int64_t m0 = 0; m0 < M; m0 += ROWS)
            FN(reduce_block)(P + j0, K, C + m0 * r, X + m0 * K + j0, K, min64(ROWS, M - m0), min64(width, K - j0),
                             r, packed);
}

static void FN(update_block)(real *restrict Y, const real *restrict C, int64_t csm, int64_t csk,
                                         const real *restrict Dp, int64_t M, int64_t K, int64_t R)
{
    FN(rows_update)(Y, C, csm, csk, Dp, M, K, R);
}

#undef JW
#include "simd_vec_end.h"
