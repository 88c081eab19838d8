/* lora_kernels_simd.h: the SIMD building blocks and per-block workers of lora_kernels.c.
 * lora_kernels.c instantiates it (instantiate.h) once per element type (`real`, SFX = f32 / f64) and instruction
 * set (ISA = v3: AVX2 + FMA with VBYTES = 32, under #pragma GCC target; ISA = base: the
 * compiler's baseline with VBYTES = 16), so each function below exists as name_f32_v3,
 * name_f32_base, ... and the public functions pick the set the CPU has at run time.
 * Matrices are row-major; a shape comment names each argument's shape.
 */
#include "simd_vec.h"

#define LINE ((int64_t)(64 / sizeof(real))) /* reals per cache line */

/* ---- rows_dot: T [M, R] = X [M, K] @ W [R, K]^T ------------------------------------- */

/* One tile of MB <= 3 rows of X against KB <= 4 rows of W (MB, KB compile-time constants).
 * T is [MB, KB] with row stride ldt; X is [MB, K] with row stride ldx; W is [KB, K], stride ldw.
 * Each element is the sum of its own vector of lane partial sums, then the K % VL last terms, so
 * the tile shape does not change any result; add: T += that sum (a later panel of K). */
ALWAYS_INLINE void FN(dot_tile)(real *restrict T, int64_t ldt, const real *restrict X, int64_t ldx,
                                const real *restrict W, int64_t ldw, int64_t K, int64_t pf, int add, const int MB,
                                const int KB)
{
    vec acc[3][4];
    for (int m = 0; m < MB; m++)
        for (int k = 0; k < KB; k++) acc[m][k] = (vec){0};
    int64_t i = 0;
    for (; i + VL <= K; i += VL) {
        vec xv[3];
        if (pf && i % LINE == 0)
            for (int m = 0; m < MB; m++) prefetch_ahead(X + m * ldx + i, pf * ldx * (int64_t)sizeof(real));
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
            T[m * ldt + k] = add ? T[m * ldt + k] + s : s;
        }
}

/* MB rows of T [M, R] (+)= X [M, K] @ W [R, K]^T, X and W with row stride ld: 3 x 4 tiles (12
 * accumulators, 7 loads for 12 multiply-adds), then the R % 4 last columns one at a time. */
ALWAYS_INLINE void FN(dot_rows)(real *restrict T, const real *restrict X, const real *restrict W, int64_t ld,
                                int64_t K, int64_t R, int64_t pf, int add, const int MB)
{
    int64_t k = 0;
    for (; k + 4 <= R; k += 4) FN(dot_tile)(T + k, R, X, ld, W + k * ld, ld, K, k ? 0 : pf, add, MB, 4);
    for (; k < R; k++) FN(dot_tile)(T + k, R, X, ld, W + k * ld, ld, K, k ? 0 : pf, add, MB, 1);
}

/* T [M, R] = X [M, K] @ W [R, K]^T; all three dense. In panels of K whose slice of W (about
 * SMALL_BYTES) stays in cache while the M rows use it (W is re-read from L2, not L3, for each
 * row tile when r * K is large). pf > 0: prefetch the rows of X pf rows further on as these are
 * read (the next block's, which the caller knows to exist). */
ALWAYS_INLINE void FN(rows_dot)(real *restrict T, const real *restrict X, const real *restrict W,
                                int64_t M, int64_t K, int64_t R, int64_t pf)
{
    int64_t width = SMALL_BYTES / ((R > 0 ? R : 1) * (int64_t)sizeof(real)) / LINE * LINE;
    if (width < LINE) width = LINE;
    for (int64_t p0 = 0; p0 == 0 || p0 < K; p0 += width) {
        const int64_t kk = min64(width, K - p0);
        const int add = p0 > 0;
        int64_t m = 0;
        for (; m + 3 <= M; m += 3) FN(dot_rows)(T + m * R, X + m * K + p0, W + p0, K, kk, R, pf, add, 3);
        for (; m + 2 <= M; m += 2) FN(dot_rows)(T + m * R, X + m * K + p0, W + p0, K, kk, R, pf, add, 2);
        for (; m < M; m++) FN(dot_rows)(T + m * R, X + m * K + p0, W + p0, K, kk, R, pf, add, 1);
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

/* MB <= 6 rows of Y (row stride ldy); C[m, k] is C[m * csm + k * csk], so C may be a
 * transposed view; Dp is D [R, K] packed. Each element adds its R terms in order k = 0..R-1.
 * RC is R as a compile-time constant (0: use R), so the k loop unrolls for the common ranks. */
ALWAYS_INLINE void FN(update_tile)(real *restrict Y, int64_t ldy, const real *restrict C, int64_t csm,
                                   int64_t csk, const real *restrict Dp, int64_t K, int64_t R, int64_t pf,
                                   const int MB, const int RC)
{
    if (RC) R = RC;
    const int64_t full = K / JW * JW, tail = K - full;
    for (int64_t j = 0; j < full; j += JW) {
        const real *d = Dp + j * R;
        vec acc[6][2];
        if (pf)
            for (int m = 0; m < MB; m++) prefetch_ahead(Y + m * ldy + j, pf * ldy * (int64_t)sizeof(real));
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

/* Y [M, K] (row stride ldy) += C @ Dp: tiles of 6 rows (12 accumulators, 8 loads for 12
 * multiply-adds), then 3, then 1; in panels of K whose slice of Dp (about SMALL_BYTES) stays in
 * cache while the M rows use it. A panel of whole column tiles of Dp is itself a packed D. */
ALWAYS_INLINE void FN(update_rows)(real *restrict Y, const real *restrict C, int64_t csm, int64_t csk,
                                   const real *restrict Dp, int64_t M, int64_t K, int64_t R, int64_t pf, const int RC)
{
    int64_t width = SMALL_BYTES / ((R > 0 ? R : 1) * (int64_t)sizeof(real)) / JW * JW;
    if (width < JW) width = JW;
    for (int64_t j0 = 0; j0 == 0 || j0 < K; j0 += width) {
        real *Yp = Y + j0;
        const real *Dpp = Dp + j0 * R;
        const int64_t kk = min64(width, K - j0);
        int64_t m = 0;
        for (; m + 6 <= M; m += 6) FN(update_tile)(Yp + m * K, K, C + m * csm, csm, csk, Dpp, kk, R, pf, 6, RC);
        for (; m + 3 <= M; m += 3) FN(update_tile)(Yp + m * K, K, C + m * csm, csm, csk, Dpp, kk, R, pf, 3, RC);
        for (; m < M; m++) FN(update_tile)(Yp + m * K, K, C + m * csm, csm, csk, Dpp, kk, R, pf, 1, RC);
    }
}

/* Y [M, K] += C @ Dp, with the k loop unrolled for dense C and r = 4, 8 or 16; pf as in rows_dot. */
ALWAYS_INLINE void FN(rows_update)(real *restrict Y, const real *restrict C, int64_t csm, int64_t csk,
                                   const real *restrict Dp, int64_t M, int64_t K, int64_t R, int64_t pf)
{
    if (csk == 1 && R == 8)
        FN(update_rows)(Y, C, csm, 1, Dp, M, K, R, pf, 8);
    else if (csk == 1 && R == 16)
        FN(update_rows)(Y, C, csm, 1, Dp, M, K, R, pf, 16);
    else if (csk == 1 && R == 4)
        FN(update_rows)(Y, C, csm, 1, Dp, M, K, R, pf, 4);
    else
        FN(update_rows)(Y, C, csm, csk, Dp, M, K, R, pf, 0);
}

/* ---- rows_reduce: P [R, W] += C [M, R]^T @ X [M, W] --------------------------------- */

/* KB <= 4 rows of P, JV <= 3 vectors of columns (P row stride ldp); C is [M, KB] (row stride
 * ldc); X is [M, JV * VL] (row stride ldx). Each element adds its M terms in order m = 0..M-1. */
ALWAYS_INLINE void FN(reduce_tile)(real *restrict P, int64_t ldp, const real *restrict C, int64_t ldc,
                                   const real *restrict X, int64_t ldx, int64_t M, int64_t pf, const int KB,
                                   const int JV)
{
    vec acc[4][3];
    for (int k = 0; k < KB; k++)
        for (int v = 0; v < JV; v++) acc[k][v] = FN(load)(P + k * ldp + v * VL);
    for (int64_t m = 0; m < M; m++) {
        vec xv[3];
        if (pf) /* the first and the last line of a 3-vector strip (96 bytes of float32) */
            for (int v = 0; v < JV; v += 2) prefetch_ahead(X + m * ldx + v * VL, pf * ldx * (int64_t)sizeof(real));
        for (int v = 0; v < JV; v++) xv[v] = FN(load)(X + m * ldx + v * VL);
        for (int k = 0; k < KB; k++) {
            real c = C[m * ldc + k];
            for (int v = 0; v < JV; v++) acc[k][v] += c * xv[v];
        }
    }
    for (int k = 0; k < KB; k++)
        for (int v = 0; v < JV; v++) FN(store)(P + k * ldp + v * VL, acc[k][v]);
}

/* The R rows of P for one column strip of JV vectors: 4 x JV tiles, then one row at a time.
 * From r = 32 on (8 tiles or more), the strip (M <= ROWS rows) is first copied into a small
 * dense buffer that stays in L1: rows of X a power of two apart share cache sets, so each tile
 * reading X in place would fetch the strip again from L2 or L3. */
ALWAYS_INLINE void FN(reduce_strip)(real *restrict P, int64_t ldp, const real *restrict C, const real *restrict X,
                                    int64_t ldx, int64_t M, int64_t R, int64_t pf, const int JV)
{
    real buf[ROWS * 3 * VL];
    if (R >= 32) {
        for (int64_t m = 0; m < M; m++) {
            if (pf)
                for (int v = 0; v < JV; v += 2) prefetch_ahead(X + m * ldx + v * VL, pf * ldx * (int64_t)sizeof(real));
            for (int v = 0; v < JV; v++) FN(store)(buf + (m * JV + v) * VL, FN(load)(X + m * ldx + v * VL));
        }
        X = buf, ldx = JV * VL, pf = 0;
    }
    int64_t k = 0;
    for (; k + 4 <= R; k += 4) FN(reduce_tile)(P + k * ldp, ldp, C + k, R, X, ldx, M, k ? 0 : pf, 4, JV);
    for (; k < R; k++) FN(reduce_tile)(P + k * ldp, ldp, C + k, R, X, ldx, M, k ? 0 : pf, 1, JV);
}

/* P [R, W] (row stride ldp) += C [M, R]^T @ X [M, W] (row stride ldx), M <= ROWS; C is dense.
 * The tiles walk column strips of three vectors (12 accumulators, 7 loads for 12 multiply-adds)
 * down the M rows. */
ALWAYS_INLINE void FN(rows_reduce)(real *restrict P, int64_t ldp, const real *restrict C, const real *restrict X,
                                   int64_t ldx, int64_t M, int64_t W, int64_t R, int64_t pf)
{
    int64_t j = 0;
    for (; j + 3 * VL <= W; j += 3 * VL) FN(reduce_strip)(P + j, ldp, C, X + j, ldx, M, R, pf, 3);
    for (; j + VL <= W; j += VL) FN(reduce_strip)(P + j, ldp, C, X + j, ldx, M, R, pf, 1);
    for (; j < W; j++)
        for (int64_t k = 0; k < R; k++) {
            real s = P[k * ldp + j];
            for (int64_t m = 0; m < M; m++) s += C[m * R + k] * X[m * ldx + j];
            P[k * ldp + j] = s;
        }
}

/* ---- per-block workers: the SIMD code, one clone per instruction set ------------------ */
/* pf: the rows of x, y, dy and dx pf rows further on are the next block's, which this thread
 * takes next: prefetch them while this block computes (0 for a thread's last block). */

/* M token rows: t [M, r] = x [M, in] @ lora_A^T;  y [M, out] += t @ sBt, sBt = scaling * lora_B^T [r, out] packed. */
static void FN(forward_block)(real *restrict y, real *restrict t, const real *restrict x,
                              const real *restrict lora_A, const real *restrict sBt, int64_t M, int64_t in,
                              int64_t out, int64_t r, int64_t pf)
{
    FN(rows_dot)(t, x, lora_A, M, in, r, pf);
    FN(rows_update)(y, t, r, 1, sBt, M, out, r, pf);
}

/* Backward, one block of M token rows: g [M, r] = dy [M, out] @ Bt^T (Bt = lora_B^T [r, out]);
 * dx [M, in] += g @ sA (sA = scaling * lora_A, packed), skipped when dx is NULL. */
static void FN(backward_rows)(real *restrict dx, real *restrict g, const real *restrict dy,
                              const real *restrict Bt, const real *restrict sA, int64_t M, int64_t in,
                              int64_t out, int64_t r, int64_t pf)
{
    FN(rows_dot)(g, dy, Bt, M, out, r, pf);
    if (dx) FN(rows_update)(dx, g, r, 1, sA, M, in, r, pf);
}

/* Backward, one group of M token rows' terms of a sum over tokens: P [r, W] += C [M, r]^T @ X [M, W]
 * (rows of W), in column panels whose slice of P (about PANEL_BYTES) stays in cache while the
 * rows go by; pf as above, for the rows of X. */
static void FN(reduce_rows)(real *restrict P, const real *restrict C, const real *restrict X, int64_t M,
                            int64_t W, int64_t r, int64_t pf)
{
    int64_t width = PANEL_BYTES / (r * (int64_t)sizeof(real)) / (3 * VL) * (3 * VL);
    if (width < 3 * VL) width = 3 * VL;
    for (int64_t j0 = 0; j0 < W; j0 += width) FN(rows_reduce)(P + j0, W, C, X + j0, W, M, min64(width, W - j0), r, pf);
}

static void FN(update_block)(real *restrict Y, const real *restrict C, int64_t csm, int64_t csk,
                             const real *restrict Dp, int64_t M, int64_t K, int64_t R, int64_t pf)
{
    FN(rows_update)(Y, C, csm, csk, Dp, M, K, R, pf);
}

#undef JW
#undef LINE
#include "simd_vec_end.h"
