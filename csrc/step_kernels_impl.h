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

static int FN(bad_attention)(double softcap, int64_t window, int64_t B, int64_t Hkv, int64_t g, int64_t T,
                             int64_t S, int64_t D)
{
    return !(softcap >= 0) || window < 0 || B < 0 || Hkv < 0 || g < 1 || T < 0 || S < 0 || D < 1;
}

int FN(attention_forward)(real *out, real *lse, const real *q, const real *k, const real *v, double scale,
                          int causal, double softcap, int64_t window, int64_t B, int64_t Hkv, int64_t g, int64_t T,
                          int64_t S, int64_t D, const int64_t *q_strides, const int64_t *out_strides)
{
    if (FN(bad_attention)(softcap, window, B, Hkv, g, T, S, D) || !out || !lse || !q || !k || !v || !q_strides ||
        !out_strides)
        return LORA_EINVAL;
    const int64_t tb = ATTN_ROWS / g > 0 ? ATTN_ROWS / g : 1, tasks = B * Hkv;
    const attn_dims d = {T, S, D, g, tb, window, causal != 0, scale, softcap};
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
                           const real *v, const real *out, const real *lse, double scale, int causal, double softcap,
                           int64_t window, int64_t B, int64_t Hkv, int64_t g, int64_t T, int64_t S, int64_t D,
                           const int64_t *dq_strides, const int64_t *dout_strides, const int64_t *q_strides,
                           const int64_t *out_strides)
{
    if (FN(bad_attention)(softcap, window, B, Hkv, g, T, S, D) || !dout || !q || !k || !v || !out || !lse ||
        !dq_strides || !dout_strides || !q_strides || !out_strides)
        return LORA_EINVAL;
    if (!dq && !dk && !dv) return LORA_OK;
    const int64_t tb = ATTN_ROWS / g > 0 ? ATTN_ROWS / g : 1, tasks = B * Hkv, R = tb * g;
    const attn_dims d = {T, S, D, g, tb, window, causal != 0, scale, softcap};
    const int64_t *qs = q_strides, *os = out_strides, *dqs = dq_strides, *dos = dout_strides;
    int status = LORA_OK;
#pragma omp parallel num_threads(lora_get_num_threads()) if (tasks > 1 && tasks * T * S * D > PARALLEL_WORK)
    {
        real *scratch = malloc(sizeof(real) * (size_t)(R * (3 * D + 3 * S + 1) + 2 * D * S + 1));
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
               int64_t T, int64_t D, int64_t rd, const int64_t *x_strides, const int64_t *out_strides)
{
    if (bad_rotary(B, H, T, D, rd) || !out || !x || !cos || !sin || !x_strides || !out_strides) return LORA_EINVAL;
    const int64_t *xs = x_strides, *os = out_strides, rows = B * H * T;
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (rows * D > PARALLEL_WORK)
    for (int64_t i = 0; i < rows; i++) {
        const int64_t b = i / (H * T), h = i / T % H, t = i % T;
        SIMD(rotary_row)(out + b * os[0] + h * os[1] + t * os[2], x + b * xs[0] + h * xs[1] + t * xs[2],
                         cos + t * rd, sin + t * rd, transpose, D, rd);
    }
    return LORA_OK;
}

/* ---- public, plain reference loops ---------------------------------------------------------
 * One thread, the definitions of lora_np.h written out element by element, libm's exp in double:
 * the C reference that test_step_kernels.c checks beside the functions above. Same arguments, same
 * checks, same outputs written or accumulated; no scratch memory. */

int FN(silu_mul_forward_ref)(real *out, const real *a, const real *b, int64_t n)
{
    if (n < 0 || !out || !a || !b) return LORA_EINVAL;
    for (int64_t i = 0; i < n; i++) {
        const real s = (real)(1 / (1 + exp(-(double)a[i])));
        out[i] = a[i] * s * b[i];
    }
    return LORA_OK;
}

int FN(silu_mul_backward_ref)(real *ga, real *gb, const real *g, const real *a, const real *b, int64_t n)
{
    if (n < 0 || !g || !a || (ga && !b)) return LORA_EINVAL;
    for (int64_t i = 0; i < n; i++) {
        const real s = (real)(1 / (1 + exp(-(double)a[i])));
        if (ga) ga[i] = g[i] * b[i] * s * (1 + a[i] * (1 - s));
        if (gb) gb[i] = g[i] * a[i] * s;
    }
    return LORA_OK;
}

/* The largest of p [vis], NaN when one is NaN, -inf when vis == 0. */
static real FN(max_ref)(const real *p, int64_t vis)
{
    real m = -INFINITY;
    for (int64_t j = 0; j < vis; j++) {
        if (p[j] != p[j]) return p[j];
        if (p[j] > m) m = p[j];
    }
    return m;
}

int FN(softmax_rows_ref)(real *p, real *lse, double scale, int64_t rows, int64_t n, int64_t period,
                         int64_t count0, int64_t group)
{
    if (bad_rows(rows, n, period, group) || !p || !lse) return LORA_EINVAL;
    for (int64_t i = 0; i < rows; i++) {
        real *row = p + i * n;
        const int64_t vis = row_vis(i, n, period, count0, group);
        const real m = FN(max_ref)(row, vis);
        double sum = 0;
        if (m == -INFINITY) /* no column, or all -inf: a row of 0 */
            lse[i] = INFINITY;
        else {
            for (int64_t j = 0; j < vis; j++) sum += exp((double)(row[j] - m));
            for (int64_t j = 0; j < vis; j++) row[j] = (real)(scale * exp((double)(row[j] - m)) / sum);
            lse[i] = m + (real)log(sum);
        }
        for (int64_t j = m == -INFINITY ? 0 : vis; j < n; j++) row[j] = 0;
    }
    return LORA_OK;
}

int FN(exp_rows_ref)(real *p, const real *lse, int64_t rows, int64_t n, int64_t period, int64_t count0,
                     int64_t group)
{
    if (bad_rows(rows, n, period, group) || !p || !lse) return LORA_EINVAL;
    for (int64_t i = 0; i < rows; i++) {
        real *row = p + i * n;
        const int64_t vis = lse[i] == INFINITY ? 0 : row_vis(i, n, period, count0, group);
        for (int64_t j = 0; j < n; j++) row[j] = j < vis ? (real)exp((double)(row[j] - lse[i])) : 0;
    }
    return LORA_OK;
}

/* The score of a query row and a key: scale * q . k over D, then with softcap > 0 its cap
 * softcap * tanh(score / softcap); *dcap = the cap's derivative 1 - tanh^2 (1 without a cap). */
static real FN(score_ref)(const real *q, const real *k, double scale, double softcap, int64_t D, real *dcap)
{
    real acc = 0;
    for (int64_t e = 0; e < D; e++) acc += q[e] * k[e];
    acc = (real)scale * acc;
    *dcap = 1;
    if (softcap == 0) return acc;
    const real t = (real)tanh((double)(acc / (real)softcap));
    *dcap = 1 - t * t;
    return (real)softcap * t;
}

int FN(attention_forward_ref)(real *out, real *lse, const real *q, const real *k, const real *v, double scale,
                              int causal, double softcap, int64_t window, int64_t B, int64_t Hkv, int64_t g,
                              int64_t T, int64_t S, int64_t D, const int64_t *q_strides, const int64_t *out_strides)
{
    if (FN(bad_attention)(softcap, window, B, Hkv, g, T, S, D) || !out || !lse || !q || !k || !v || !q_strides ||
        !out_strides)
        return LORA_EINVAL;
    const int64_t *qs = q_strides, *os = out_strides;
    real dcap;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hkv; h++)
            for (int64_t t = 0; t < T; t++)
                for (int64_t j = 0; j < g; j++) {
                    const real *qr = q + b * qs[0] + h * qs[1] + t * qs[2] + j * qs[3];
                    const real *kh = k + (b * Hkv + h) * S * D, *vh = v + (b * Hkv + h) * S * D;
                    real *o = out + b * os[0] + h * os[1] + t * os[2] + j * os[3];
                    real *l = lse + ((b * Hkv + h) * T + t) * g + j;
                    int64_t lo;
                    const int64_t hi = keys_seen(t, T, S, causal, window, &lo);
                    real m = -INFINITY;
                    for (int64_t s = lo; s < hi; s++) {
                        const real sc = FN(score_ref)(qr, kh + s * D, scale, softcap, D, &dcap);
                        if (sc != sc || m != m) m = NAN;
                        else if (sc > m) m = sc;
                    }
                    for (int64_t e = 0; e < D; e++) o[e] = 0;
                    if (m == -INFINITY) { /* no key, or all scores -inf: out = 0 */
                        *l = INFINITY;
                        continue;
                    }
                    double sum = 0;
                    for (int64_t s = lo; s < hi; s++) {
                        const real p = (real)exp((double)(FN(score_ref)(qr, kh + s * D, scale, softcap, D, &dcap) - m));
                        sum += p;
                        for (int64_t e = 0; e < D; e++) o[e] += p * vh[s * D + e];
                    }
                    for (int64_t e = 0; e < D; e++) o[e] = (real)(o[e] / sum);
                    *l = m + (real)log(sum);
                }
    return LORA_OK;
}

int FN(attention_backward_ref)(real *dq, real *dk, real *dv, const real *dout, const real *q, const real *k,
                               const real *v, const real *out, const real *lse, double scale, int causal,
                               double softcap, int64_t window, int64_t B, int64_t Hkv, int64_t g, int64_t T,
                               int64_t S, int64_t D, const int64_t *dq_strides, const int64_t *dout_strides,
                               const int64_t *q_strides, const int64_t *out_strides)
{
    if (FN(bad_attention)(softcap, window, B, Hkv, g, T, S, D) || !dout || !q || !k || !v || !out || !lse ||
        !dq_strides || !dout_strides || !q_strides || !out_strides)
        return LORA_EINVAL;
    if (!dq && !dk && !dv) return LORA_OK;
    const int64_t *qs = q_strides, *os = out_strides, *dqs = dq_strides, *dos = dout_strides;
    for (int64_t i = 0; i < B * Hkv * S * D; i++) {
        if (dk) dk[i] = 0;
        if (dv) dv[i] = 0;
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hkv; h++)
            for (int64_t t = 0; t < T; t++)
                for (int64_t j = 0; j < g; j++) {
                    const real *qr = q + b * qs[0] + h * qs[1] + t * qs[2] + j * qs[3];
                    const real *o = out + b * os[0] + h * os[1] + t * os[2] + j * os[3];
                    const real *dor = dout + b * dos[0] + h * dos[1] + t * dos[2] + j * dos[3];
                    const real *kh = k + (b * Hkv + h) * S * D, *vh = v + (b * Hkv + h) * S * D;
                    real *dqr = dq ? dq + b * dqs[0] + h * dqs[1] + t * dqs[2] + j * dqs[3] : NULL;
                    real *dkh = dk ? dk + (b * Hkv + h) * S * D : NULL, *dvh = dv ? dv + (b * Hkv + h) * S * D : NULL;
                    const real l = lse[((b * Hkv + h) * T + t) * g + j];
                    int64_t lo;
                    const int64_t hi = l == INFINITY ? 0 : keys_seen(t, T, S, causal, window, &lo);
                    real delta = 0; /* dout . out */
                    for (int64_t e = 0; e < D; e++) delta += dor[e] * o[e];
                    if (dqr)
                        for (int64_t e = 0; e < D; e++) dqr[e] = 0;
                    for (int64_t s = hi ? lo : 0; s < hi; s++) {
                        real dcap;
                        const real p = (real)exp((double)(FN(score_ref)(qr, kh + s * D, scale, softcap, D, &dcap) - l));
                        real dp = 0; /* dout . v_s */
                        for (int64_t e = 0; e < D; e++) dp += dor[e] * vh[s * D + e];
                        const real ds = p * (dp - delta) * dcap;
                        for (int64_t e = 0; e < D; e++) {
                            if (dqr) dqr[e] += (real)scale * ds * kh[s * D + e];
                            if (dkh) dkh[s * D + e] += (real)scale * ds * qr[e];
                            if (dvh) dvh[s * D + e] += p * dor[e];
                        }
                    }
                }
    return LORA_OK;
}

int FN(rms_norm_forward_ref)(real *y, real *rstd, const real *x, const real *weight, double eps, int64_t rows,
                             int64_t n)
{
    if (rows < 0 || n < 1 || !y || !rstd || !x) return LORA_EINVAL;
    for (int64_t i = 0; i < rows; i++) {
        const real *xr = x + i * n;
        real ss = 0;
        for (int64_t j = 0; j < n; j++) ss += xr[j] * xr[j];
        const real r = (real)(1 / sqrt((double)(ss / (real)n + (real)eps)));
        rstd[i] = r;
        for (int64_t j = 0; j < n; j++) y[i * n + j] = xr[j] * r * (weight ? weight[j] : 1);
    }
    return LORA_OK;
}

int FN(rms_norm_backward_ref)(real *gx, real *gweight, const real *g, const real *x, const real *weight,
                              const real *rstd, int64_t rows, int64_t n)
{
    if (rows < 0 || n < 1 || !g || !x || !rstd) return LORA_EINVAL;
    for (int64_t i = 0; i < rows; i++) {
        const real *gr = g + i * n, *xr = x + i * n, r = rstd[i];
        real c = 0; /* mean(g w xhat) */
        for (int64_t j = 0; j < n; j++) c += gr[j] * (weight ? weight[j] : 1) * xr[j] * r;
        c /= (real)n;
        for (int64_t j = 0; j < n; j++) {
            if (gx) gx[i * n + j] = r * (gr[j] * (weight ? weight[j] : 1) - xr[j] * r * c);
            if (gweight) gweight[j] += gr[j] * (xr[j] * r);
        }
    }
    return LORA_OK;
}

int FN(rotary_ref)(real *out, const real *x, const real *cos, const real *sin, int transpose, int64_t B, int64_t H,
                   int64_t T, int64_t D, int64_t rd, const int64_t *x_strides, const int64_t *out_strides)
{
    if (bad_rotary(B, H, T, D, rd) || !out || !x || !cos || !sin || !x_strides || !out_strides) return LORA_EINVAL;
    const int64_t *xs = x_strides, *os = out_strides, half = rd / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++) {
                const real *xr = x + b * xs[0] + h * xs[1] + t * xs[2], *c = cos + t * rd, *s = sin + t * rd;
                real *o = out + b * os[0] + h * os[1] + t * os[2];
                /* rotate_half(x) [e] = sign * x[partner]: -x2 in the first half, x1 in the second;
                 * its transpose moves sin to the partner: out = x cos - sign * x[partner] sin[partner];
                 * dims rd.. pass through. */
                for (int64_t e = rd; e < D; e++) o[e] = xr[e];
                for (int64_t e = 0; e < rd; e++) {
                    const int64_t partner = e < half ? e + half : e - half;
                    const real sign = e < half ? -1 : 1;
                    o[e] = transpose ? xr[e] * c[e] - sign * xr[partner] * s[partner]
                                     : xr[e] * c[e] + sign * xr[partner] * s[e];
                }
            }
    return LORA_OK;
}
