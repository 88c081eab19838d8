/* gemm_kernels_impl.h: the public functions of gemm_kernels.c for one element type.
 * gemm_kernels.c instantiates it (instantiate.h) with `real` = float, SFX = f32 and `real` = double,
 * SFX = f64. SIMD(name) is the worker of gemm_kernels_simd.h for the instruction set this CPU has.
 */

static real *FN(gemm_alloc)(int64_t count) { return malloc(sizeof(real) * (size_t)(count > 0 ? count : 1)); }

/* C [M, N] = A [M, K] @ B + T @ (scale * E), T [M, r] = A @ L also written out; B (k, c) =
 * B[k * brs + c * bcs] is [K, N], L (k, j) = L[k * lrs + j * lcs] is [K, r], E (j, c) =
 * E[j * ers + c * ecs] is [r, N]. T NULL: the plain GEMM (r = 0). A is dense, row stride K.
 *
 * K is cut into panels of at most KC (a function of K alone), N into chunks of columns whose packed
 * weight, all panels, takes at most PACK_BYTES, or is CHUNK_COLS columns wide. Per chunk, all threads first pack its slivers of B
 * (and, in the first chunk, L's), every panel, together; then each takes whole blocks of rows (mc,
 * from M and the thread count) and for each panel packs its block of A and computes the chunk's
 * columns of it (and T, in the first chunk). Each element of C is the same sum in the same order
 * whatever mc and the thread count: results are bit-identical for any number of threads. */
static int FN(gemm_lora)(real *C, real *T, const real *A, const real *B, int64_t brs, int64_t bcs, const real *L,
                         int64_t lrs, int64_t lcs, const real *E, int64_t ers, int64_t ecs, real scale, int64_t M,
                         int64_t N, int64_t K, int64_t r)
{
    if (M == 0) return LORA_OK;
    if (!T) r = 0;
    const int64_t nr = SIMD(gemm_nr)();
    const int64_t nb = (N + nr - 1) / nr, nbl = (r + nr - 1) / nr;
    const int64_t n_k = K > KC ? (K + KC - 1) / KC : 1, kc_max = (K + n_k - 1) / n_k;
    /* slivers of B per chunk: PACK_BYTES of them, but CHUNK_COLS columns at least (A is packed once per chunk) */
    int64_t chunk = PACK_BYTES / (nr * (K > 0 ? K : 1) * (int64_t)sizeof(real));
    chunk = chunk > CHUNK_COLS / nr ? chunk : CHUNK_COLS / nr;
    chunk = chunk < nb ? chunk : (nb > 1 ? nb : 1);
    const int threads = M * N * K > PARALLEL_WORK ? lora_get_num_threads() : 1;
    /* Blocks of rows: about MC or fewer, a multiple of the threads in number, each a multiple of MR. */
    int64_t n_m = (M + MC - 1) / MC;
    n_m = (n_m + threads - 1) / threads * threads;
    int64_t mc = (M + n_m - 1) / n_m;
    mc = (mc + MR - 1) / MR * MR;
    n_m = (M + mc - 1) / mc;
    /* Bp: a chunk of s slivers; panel p (k0 = p K / n_k, kc of k) at Bp + k0 * s * nr, sliver j at + j * kc * nr. */
    real *Bp = FN(gemm_alloc)((chunk + nbl) * nr * K + VPAD);
    real *Ep = r ? FN(gemm_alloc)(nb * nr * r + VPAD) : NULL;
    real *scratch = FN(gemm_alloc)(threads * (mc * (kc_max + r) + VPAD));
    if (!Bp || (r && !Ep) || !scratch) {
        free(Bp), free(Ep), free(scratch);
        return LORA_ENOMEM;
    }
    if (r) SIMD(gemm_pack_b)(Ep, E, ers, ecs, scale, r, N, 0, nb);
#pragma omp parallel num_threads(threads)
    {
        real *Ap = scratch + thread_id() * (mc * (kc_max + r) + VPAD), *Tp = Ap + mc * kc_max;
        for (int64_t c0 = 0; c0 == 0 || c0 < nb; c0 += chunk) {
            const int64_t cb = min64(chunk, nb - c0), s = cb + (c0 == 0 ? nbl : 0), n0 = c0 * nr;
            const int64_t cols = min64(N - n0, cb * nr);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n_k * s; i++) {
                const int64_t p = i / s, j = i % s, k0 = p * K / n_k, kc = (p + 1) * K / n_k - k0;
                real *panel = Bp + k0 * s * nr;
                if (j < cb)
                    SIMD(gemm_pack_b)(panel, B + k0 * brs + n0 * bcs, brs, bcs, 1, kc, cols, j, j + 1);
                else
                    SIMD(gemm_pack_b)(panel + cb * kc * nr, L + k0 * lrs, lrs, lcs, 1, kc, r, j - cb, j - cb + 1);
            }
#pragma omp for schedule(dynamic)
            for (int64_t b = 0; b < n_m; b++) {
                const int64_t m0 = b * mc, rows = min64(mc, M - m0);
                for (int64_t p = 0; p < n_k; p++) {
                    const int64_t k0 = p * K / n_k, kc = (p + 1) * K / n_k - k0;
                    SIMD(gemm_block)(C + m0 * N + n0, N, T ? T + m0 * r : NULL, c0 == 0, Ap, Tp, A + m0 * K + k0, K,
                                     Bp + k0 * s * nr, r ? Ep + c0 * r * nr : NULL, rows, cols, kc, r, p > 0,
                                     p == n_k - 1);
                }
            }
        }
    }
    free(Bp), free(Ep), free(scratch);
    return LORA_OK;
}

int FN(gemm_nt)(real *C, const real *A, const real *B, int64_t M, int64_t N, int64_t K)
{
    if (M < 0 || N < 0 || K < 0 || !C || !A || !B) return LORA_EINVAL;
    return FN(gemm_lora)(C, NULL, A, B, 1, K, NULL, 0, 0, NULL, 0, 0, 0, M, N, K, 0);
}

int FN(gemm_nn)(real *C, const real *A, const real *B, int64_t M, int64_t N, int64_t K)
{
    if (M < 0 || N < 0 || K < 0 || !C || !A || !B) return LORA_EINVAL;
    return FN(gemm_lora)(C, NULL, A, B, N, 1, NULL, 0, 0, NULL, 0, 0, 0, M, N, K, 0);
}

int FN(lora_linear_forward)(real *y, real *t, const real *x, const real *weight, const real *lora_A,
                            const real *lora_B, double scaling, int64_t M, int64_t in, int64_t out, int64_t r)
{
    if (M < 0 || in < 0 || out < 0 || r < 0 || !y || !t || !x || !weight || !lora_A || !lora_B) return LORA_EINVAL;
    /* B (k, c) = weight[c, k]; L (k, j) = lora_A[j, k]; E (j, c) = lora_B[c, j] */
    return FN(gemm_lora)(y, t, x, weight, 1, in, lora_A, 1, in, lora_B, 1, r, (real)scaling, M, out, in, r);
}

int FN(lora_linear_backward)(real *dx, real *d_lora_A, real *d_lora_B, const real *dy, const real *x,
                             const real *t, const real *weight, const real *lora_A, const real *lora_B,
                             double scaling, int64_t M, int64_t in, int64_t out, int64_t r)
{
    if (M < 0 || in < 0 || out < 0 || r < 0 || !dy || !x || !t || !weight || !lora_A || !lora_B) return LORA_EINVAL;
    if (d_lora_A || d_lora_B) {
        const int status = FN(lora_backward)(NULL, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, scaling, M, in, out, r);
        if (status != LORA_OK) return status;
    }
    if (!dx) return LORA_OK;
    /* g = dy lora_B [M, r], written to scratch; B (k, c) = weight[k, c]; L (k, j) = lora_B[k, j];
     * E (j, c) = lora_A[j, c] */
    real *g = FN(gemm_alloc)(M * r);
    if (!g) return LORA_ENOMEM;
    const int status = FN(gemm_lora)(dx, g, dy, weight, in, 1, lora_B, r, 1, lora_A, in, 1, (real)scaling, M, in,
                                     out, r);
    free(g);
    return status;
}
