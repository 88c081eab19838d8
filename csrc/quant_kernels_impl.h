/* quant_kernels_impl.h: the public functions of quant_kernels.c for one element type.
 * quant_kernels.c instantiates it (instantiate.h) with `real` = float, SFX = f32 and `real` = double,
 * SFX = f64, so each function below exists as name_f32 and name_f64. QSIMD(name) is the worker of
 * quant_kernels_simd.h for the instruction set this CPU has; the _ref loops use the baseline's
 * dequantization (tested bit-exact against gguf-py's in tests/kernels/test_quant_kernels.py).
 */
#define DEQUANT_BASE CAT(dequant, CAT(SFX, base))

static real *FN(alloc)(int64_t count) { return malloc(sizeof(real) * (size_t)(count > 0 ? count : 1)); }

/* ---- public, tiled and parallel ------------------------------------------------------ */

int FN(quant_dequantize_cols)(real *out, const uint8_t *w, int type, int64_t rows, int64_t K, int64_t k0, int64_t n)
{
    if (bad_call(type, rows, 0, K) || !out || !w || k0 < 0 || n < 0 || k0 > K - n ||
        k0 % quant_block_size(type) || n % quant_block_size(type))
        return LORA_EINVAL;
    const int64_t rb = quant_row_bytes(type, K);
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (rows * n > PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) QSIMD(dequant)(out + r * n, w + r * rb, type, k0, n);
    return LORA_OK;
}

int FN(quant_dequantize)(real *out, const uint8_t *w, int type, int64_t rows, int64_t K)
{
    return FN(quant_dequantize_cols)(out, w, type, rows, K, 0, K);
}

int FN(quant_linear_forward)(real *y, const real *x, const uint8_t *w, const real *bias, int type, int64_t M,
                             int64_t N, int64_t K)
{
    if (bad_call(type, M, N, K) || !y || !x || !w) return LORA_EINVAL;
    if (M == 0) return LORA_OK;
    const int64_t rb = quant_row_bytes(type, K);
    const int threads = lora_get_num_threads();
    if (M <= DECODE_ROWS) { /* no scratch: each thread takes contiguous chunks of weight rows */
        const int64_t chunk = 16, n_chunks = (N + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(threads) if (M * N * K > PARALLEL_WORK)
        for (int64_t c = 0; c < n_chunks; c++)
            QSIMD(decode)(y, x, w, bias, type, rb, M, c * chunk, min64(N, c * chunk + chunk), N, K);
        return LORA_OK;
    }
    real *scratch = calloc((size_t)threads * (KT * NT + KT), sizeof(real)); /* per thread: panel, buf */
    if (!scratch) return LORA_ENOMEM;
    const int64_t n_tiles = (N + NT - 1) / NT, m_blocks = (M + MBLK - 1) / MBLK;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (M * N * K > PARALLEL_WORK)
    for (int64_t t = 0; t < m_blocks * n_tiles; t++) {
        const int64_t m0 = t / n_tiles * MBLK, n0 = t % n_tiles * NT;
        real *panel = scratch + thread_id() * (KT * NT + KT);
        QSIMD(forward_tile)(y, x, w, bias, type, rb, m0, min64(M, m0 + MBLK), n0, min64(NT, N - n0), N, K, panel,
                           panel + KT * NT);
    }
    free(scratch);
    return LORA_OK;
}

int FN(quant_linear_backward)(real *dx, const real *dy, const uint8_t *w, int type, int64_t M, int64_t N, int64_t K)
{
    if (bad_call(type, M, N, K) || !dx || !dy || !w) return LORA_EINVAL;
    const int64_t rb = quant_row_bytes(type, K);
    const int threads = lora_get_num_threads();
    real *scratch = calloc((size_t)threads * NT * KT, sizeof(real)); /* per thread: a panel */
    if (!scratch) return LORA_ENOMEM;
    const int64_t k_tiles = (K + KT - 1) / KT, m_blocks = (M + MBLK - 1) / MBLK;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (M * N * K > PARALLEL_WORK)
    for (int64_t t = 0; t < m_blocks * k_tiles; t++) {
        const int64_t m0 = t / k_tiles * MBLK, k0 = t % k_tiles * KT;
        QSIMD(backward_tile)(dx, dy, w, type, rb, m0, min64(M, m0 + MBLK), k0, min64(KT, K - k0), N, K,
                            scratch + thread_id() * NT * KT);
    }
    free(scratch);
    return LORA_OK;
}

/* ---- reference loops ------------------------------------------------------------------ */

int FN(quant_linear_forward_ref)(real *y, const real *x, const uint8_t *w, const real *bias, int type, int64_t M,
                                 int64_t N, int64_t K)
{
    if (bad_call(type, M, N, K) || !y || !x || !w) return LORA_EINVAL;
    real *row = FN(alloc)(K);
    if (!row) return LORA_ENOMEM;
    const int64_t rb = quant_row_bytes(type, K);
    for (int64_t n = 0; n < N; n++) {
        DEQUANT_BASE(row, w + n * rb, type, 0, K);
        for (int64_t m = 0; m < M; m++) {
            real s = 0;
            for (int64_t k = 0; k < K; k++) s += x[m * K + k] * row[k];
            y[m * N + n] = s + (bias ? bias[n] : 0);
        }
    }
    free(row);
    return LORA_OK;
}

int FN(quant_linear_backward_ref)(real *dx, const real *dy, const uint8_t *w, int type, int64_t M, int64_t N,
                                  int64_t K)
{
    if (bad_call(type, M, N, K) || !dx || !dy || !w) return LORA_EINVAL;
    real *row = FN(alloc)(K);
    if (!row) return LORA_ENOMEM;
    const int64_t rb = quant_row_bytes(type, K);
    for (int64_t i = 0; i < M * K; i++) dx[i] = 0;
    for (int64_t n = 0; n < N; n++) {
        DEQUANT_BASE(row, w + n * rb, type, 0, K);
        for (int64_t m = 0; m < M; m++)
            for (int64_t k = 0; k < K; k++) dx[m * K + k] += dy[m * N + n] * row[k];
    }
    free(row);
    return LORA_OK;
}

#undef DEQUANT_BASE
