/* step_kernels_impl.h: the public functions of step_kernels.c for one element type (`real`,
 * SFX = f32 or f64). SIMD(name) is the worker of step_kernels_simd.h for this CPU. */

int FN(silu_mul_forward)(real *out, const real *a, const real *b, int64_t n)
{
    if (n < 0 || !out || !a || !b) return LORA_EINVAL;
    int64_t n_chunks = (n + ELEMENT_CHUNK - 1) / ELEMENT_CHUNK;
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (n > PARALLEL_WORK)
    for (int64_t c = 0; c < n_chunks; c++) {
        int64_t i = c * ELEMENT_CHUNK, m = n - i < ELEMENT_CHUNK ? n - i : ELEMENT_CHUNK;
        SIMD(silu_mul_fwd)(out + i, a + i, b + i, m);
    }
    return LORA_OK;
}

int FN(silu_mul_backward)(real *ga, real *gb, const real *g, const real *a, const real *b, int64_t n)
{
    if (n < 0 || !g || !a || (ga && !b)) return LORA_EINVAL;
    if (!ga && !gb) return LORA_OK;
    int64_t n_chunks = (n + ELEMENT_CHUNK - 1) / ELEMENT_CHUNK;
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (n > PARALLEL_WORK)
    for (int64_t c = 0; c < n_chunks; c++) {
        int64_t i = c * ELEMENT_CHUNK, m = n - i < ELEMENT_CHUNK ? n - i : ELEMENT_CHUNK;
        SIMD(silu_mul_bwd)(ga ? ga + i : NULL, gb ? gb + i : NULL, g + i, a + i, b ? b + i : NULL, m);
    }
    return LORA_OK;
}

int FN(softmax_rows)(real *p, real *lse, double scale, int64_t rows, int64_t n, int64_t period, int64_t count0,
                     int64_t group)
{
    if (bad_rows(rows, n, period, group) || !p || !lse) return LORA_EINVAL;
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (rows * n > PARALLEL_WORK)
    for (int64_t i = 0; i < rows; i++)
        SIMD(softmax_row)(p + i * n, lse + i, (real)scale, row_vis(i, n, period, count0, group), n);
    return LORA_OK;
}

int FN(exp_rows)(real *p, const real *lse, int64_t rows, int64_t n, int64_t period, int64_t count0, int64_t group)
{
    if (bad_rows(rows, n, period, group) || !p || !lse) return LORA_EINVAL;
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (rows * n > PARALLEL_WORK)
    for (int64_t i = 0; i < rows; i++) SIMD(exp_row)(p + i * n, lse[i], row_vis(i, n, period, count0, group), n);
    return LORA_OK;
}

static int FN(bad_attention)(int64_t B, int64_t Hkv, int64_t g, int64_t T, int64_t S, int64_t D)
{
    return B < 0 || Hkv < 0 || g < 1 || T < 0 || S < 0 || D < 1;
}

int FN(attention_forward)(real *out, real *lse, const real *q, const real *k, const real *v, double scale,
                          int causal, int64_t B, int64_t Hkv, int64_t g, int64_t T, int64_t S, int64_t D,
                          const int64_t *q_strides, const int64_t *out_strides)
{
    if (FN(bad_attention)(B, Hkv, g, T, S, D) || !out || !lse || !q || !k || !v || !q_strides || !out_strides)
        return LORA_EINVAL;
    const int64_t tb = ATTN_ROWS / g > 0 ? ATTN_ROWS / g : 1, tasks = B * Hkv;
    const attn_dims d = {T, S, D, g, tb, causal != 0, scale};
    const int64_t *qs = q_strides, *os = out_strides;
    int status = LORA_OK;
#pragma omp parallel num_threads(lora_get_num_threads()) if (tasks > 1 && tasks * T * S * D > PARALLEL_WORK)
    {
        real *scratch = malloc(sizeof(real) * (size_t)(tb * g * (2 * D + S) + D * S + 1));
        if (!scratch) {
#pragma omp atomic write
            status = LORA_ENOMEM;
        }
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < tasks; task++) {
            if (!scratch) continue;
            const int64_t b = task / Hkv, h = task % Hkv;
            SIMD(attn_fwd_head)(out + b * os[0] + h * os[1], os[2], os[3], lse + task * T * g,
                                q + b * qs[0] + h * qs[1], qs[2], qs[3], k + task * S * D, v + task * S * D, &d,
                                scratch);
        }
        free(scratch);
    }
    return status;
}

int FN(attention_backward)(real *dq, real *dk, real *dv, const real *dout, const real *q, const real *k,
                           const real *v, const real *out, const real *lse, double scale, int causal, int64_t B,
                           int64_t Hkv, int64_t g, int64_t T, int64_t S, int64_t D, const int64_t *dq_strides,
                           const int64_t *dout_strides, const int64_t *q_strides, const int64_t *out_strides)
{
    if (FN(bad_attention)(B, Hkv, g, T, S, D) || !dout || !q || !k || !v || !out || !lse || !dq_strides ||
        !dout_strides || !q_strides || !out_strides)
        return LORA_EINVAL;
    if (!dq && !dk && !dv) return LORA_OK;
    const int64_t tb = ATTN_ROWS / g > 0 ? ATTN_ROWS / g : 1, tasks = B * Hkv, R = tb * g;
    const attn_dims d = {T, S, D, g, tb, causal != 0, scale};
    const int64_t *qs = q_strides, *os = out_strides, *dqs = dq_strides, *dos = dout_strides;
    int status = LORA_OK;
#pragma omp parallel num_threads(lora_get_num_threads()) if (tasks > 1 && tasks * T * S * D > PARALLEL_WORK)
    {
        real *scratch = malloc(sizeof(real) * (size_t)(R * (3 * D + 2 * S + 1) + 2 * D * S + 1));
        if (!scratch) {
#pragma omp atomic write
            status = LORA_ENOMEM;
        }
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < tasks; task++) {
            if (!scratch) continue;
            const int64_t b = task / Hkv, h = task % Hkv;
            SIMD(attn_bwd_head)(dq ? dq + b * dqs[0] + h * dqs[1] : NULL, dqs[2], dqs[3],
                                dk ? dk + task * S * D : NULL, dv ? dv + task * S * D : NULL,
                                dout + b * dos[0] + h * dos[1], dos[2], dos[3], q + b * qs[0] + h * qs[1], qs[2],
                                qs[3], k + task * S * D, v + task * S * D, out + b * os[0] + h * os[1], os[2], os[3],
                                lse + task * T * g, &d, scratch);
        }
        free(scratch);
    }
    return status;
}

int FN(rms_norm_forward)(real *y, real *rstd, const real *x, const real *weight, double eps, int64_t rows, int64_t n)
{
    if (rows < 0 || n < 1 || !y || !rstd || !x) return LORA_EINVAL;
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (rows * n > PARALLEL_WORK)
    for (int64_t i = 0; i < rows; i++) SIMD(rms_norm_row)(y + i * n, rstd + i, x + i * n, weight, (real)eps, n);
    return LORA_OK;
}

int FN(rms_norm_backward)(real *gx, real *gweight, const real *g, const real *x, const real *weight,
                          const real *rstd, int64_t rows, int64_t n)
{
    if (rows < 0 || n < 1 || !g || !x || !rstd) return LORA_EINVAL;
    int status = LORA_OK;
    if (gx) {
#pragma omp parallel num_threads(lora_get_num_threads()) if (rows * n > PARALLEL_WORK)
        {
            real *gh = malloc(sizeof(real) * (size_t)n);
            if (!gh) {
#pragma omp atomic write
                status = LORA_ENOMEM;
            }
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows; i++)
                if (gh) SIMD(rms_norm_grad_row)(gx + i * n, g + i * n, x + i * n, weight, rstd[i], n, gh);
            free(gh);
        }
    }
    if (gweight) /* += sum over rows of g * xhat, rows in order: one thread */
        for (int64_t i = 0; i < rows; i++)
            for (int64_t j = 0; j < n; j++) gweight[j] += g[i * n + j] * (x[i * n + j] * rstd[i]);
    return status;
}

int FN(rotary)(real *out, const real *x, const real *cos, const real *sin, int transpose, int64_t B, int64_t H,
               int64_t T, int64_t D, const int64_t *x_strides, const int64_t *out_strides)
{
    if (B < 0 || H < 0 || T < 0 || D < 0 || D % 2 || !out || !x || !cos || !sin || !x_strides || !out_strides)
        return LORA_EINVAL;
    const int64_t *xs = x_strides, *os = out_strides, rows = B * H * T;
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (rows * D > PARALLEL_WORK)
    for (int64_t i = 0; i < rows; i++) {
        const int64_t b = i / (H * T), h = i / T % H, t = i % T;
        SIMD(rotary_row)(out + b * os[0] + h * os[1] + t * os[2], x + b * xs[0] + h * xs[1] + t * xs[2],
                         cos + t * D, sin + t * D, transpose, D);
    }
    return LORA_OK;
}
