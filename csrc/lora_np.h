/* lora_np.h: the C core of the LoRA low-rank branch.
 *
 * All matrices are row-major and dense (C-contiguous). Names follow PEFT:
 * lora_A is [r, in], lora_B is [out, r], scaling = lora_alpha / r.
 * Arguments come in a fixed order: outputs, inputs, scalars, sizes.
 * Outputs are written (=) unless the function's comment says "+=": the LoRA functions
 * accumulate (the branch adds to what the frozen layer computed, gradients add up across
 * uses), the fused step ops write (rms_norm_backward's gweight is their one accumulation).
 * A pointer may be NULL only where its comment says so (an optional output: its work is
 * skipped); any other NULL pointer returns LORA_EINVAL. Every function returns LORA_OK or an
 * error code, having written nothing when the code is LORA_EINVAL; none exits or aborts.
 * Outputs must not overlap inputs (the Python wrapper checks this).
 * The _ref functions are plain single-threaded loops with the same arguments and outputs:
 * the C reference the tiled, OpenMP-parallel functions are tested against
 * (csrc/test_lora_kernels.c, csrc/test_step_kernels.c).
 * This header is also the cffi cdef: keep it to declarations without macros.
 */
#ifndef LORA_NP_H
#define LORA_NP_H

#include <stdint.h>

enum lora_status { LORA_OK = 0, LORA_EINVAL = 1, LORA_ENOMEM = 2 };

/* y [N, out] += scaling * t @ lora_B^T, with t [N, r] = x [N, in] @ lora_A^T also written out (=). */
int lora_forward_f32(float *y, float *t, const float *x, const float *lora_A, const float *lora_B,
                     double scaling, int64_t N, int64_t in, int64_t out, int64_t r);
int lora_forward_f64(double *y, double *t, const double *x, const double *lora_A, const double *lora_B,
                     double scaling, int64_t N, int64_t in, int64_t out, int64_t r);
int lora_forward_ref_f32(float *y, float *t, const float *x, const float *lora_A, const float *lora_B,
                         double scaling, int64_t N, int64_t in, int64_t out, int64_t r);
int lora_forward_ref_f64(double *y, double *t, const double *x, const double *lora_A, const double *lora_B,
                         double scaling, int64_t N, int64_t in, int64_t out, int64_t r);

/* With g = dy [N, out] @ lora_B [out, r], each output optional:
 *   dx [N, in] += scaling * g @ lora_A;   d_lora_A [r, in] += scaling * g^T @ x;
 *   d_lora_B [out, r] += scaling * dy^T @ t   (t [N, r] as returned by the forward). */
int lora_backward_f32(float *dx, float *d_lora_A, float *d_lora_B, const float *dy, const float *x,
                      const float *t, const float *lora_A, const float *lora_B, double scaling,
                      int64_t N, int64_t in, int64_t out, int64_t r);
int lora_backward_f64(double *dx, double *d_lora_A, double *d_lora_B, const double *dy, const double *x,
                      const double *t, const double *lora_A, const double *lora_B, double scaling,
                      int64_t N, int64_t in, int64_t out, int64_t r);
int lora_backward_ref_f32(float *dx, float *d_lora_A, float *d_lora_B, const float *dy, const float *x,
                          const float *t, const float *lora_A, const float *lora_B, double scaling,
                          int64_t N, int64_t in, int64_t out, int64_t r);
int lora_backward_ref_f64(double *dx, double *d_lora_A, double *d_lora_B, const double *dy,
                          const double *x, const double *t, const double *lora_A, const double *lora_B,
                          double scaling, int64_t N, int64_t in, int64_t out, int64_t r);

/* weight [out, in] += scaling * lora_B @ lora_A, or with fan_in_fan_out != 0
 * weight [in, out] += scaling * (lora_B @ lora_A)^T. Unmerge is the same call with -scaling.
 * Needs no temporary of weight's size. */
int lora_merge_f32(float *weight, const float *lora_A, const float *lora_B, double scaling,
                   int fan_in_fan_out, int64_t in, int64_t out, int64_t r);
int lora_merge_f64(double *weight, const double *lora_A, const double *lora_B, double scaling,
                   int fan_in_fan_out, int64_t in, int64_t out, int64_t r);
int lora_merge_ref_f32(float *weight, const float *lora_A, const float *lora_B, double scaling,
                       int fan_in_fan_out, int64_t in, int64_t out, int64_t r);
int lora_merge_ref_f64(double *weight, const double *lora_A, const double *lora_B, double scaling,
                       int fan_in_fan_out, int64_t in, int64_t out, int64_t r);

/* ---- step_kernels.c: fused ops of the training step ------------------------------------
 * Element-wise: n elements, all arrays dense. Rows: p [rows, n] dense; row i sees its first
 * vis(i) = clamp(count0 + (i % period) / group, 0, n) columns and the rest become 0
 * (plain rows: count0 = n, period = group = 1). */

/* out [n] = silu(a) * b = a * sigmoid(a) * b. */
int silu_mul_forward_f32(float *out, const float *a, const float *b, int64_t n);
int silu_mul_forward_f64(double *out, const double *a, const double *b, int64_t n);
int silu_mul_forward_ref_f32(float *out, const float *a, const float *b, int64_t n);
int silu_mul_forward_ref_f64(double *out, const double *a, const double *b, int64_t n);
/* With s = sigmoid(a): ga [n] = g * b * s * (1 + a * (1 - s)), gb [n] = g * a * s, both optional
 * (written, not accumulated); b may be NULL when ga is. */
int silu_mul_backward_f32(float *ga, float *gb, const float *g, const float *a, const float *b, int64_t n);
int silu_mul_backward_f64(double *ga, double *gb, const double *g, const double *a, const double *b, int64_t n);
int silu_mul_backward_ref_f32(float *ga, float *gb, const float *g, const float *a, const float *b, int64_t n);
int silu_mul_backward_ref_f64(double *ga, double *gb, const double *g, const double *a, const double *b,
                              int64_t n);
/* p [rows, n] <- scale * softmax over each row's visible columns (0 elsewhere), in place;
 * lse [rows] = log-sum-exp of the visible columns (+inf, with a row of 0, when all are -inf;
 * NaN, with NaN visible columns, when one is NaN or +inf). */
int softmax_rows_f32(float *p, float *lse, double scale, int64_t rows, int64_t n, int64_t period,
                     int64_t count0, int64_t group);
int softmax_rows_f64(double *p, double *lse, double scale, int64_t rows, int64_t n, int64_t period,
                     int64_t count0, int64_t group);
int softmax_rows_ref_f32(float *p, float *lse, double scale, int64_t rows, int64_t n, int64_t period,
                         int64_t count0, int64_t group);
int softmax_rows_ref_f64(double *p, double *lse, double scale, int64_t rows, int64_t n, int64_t period,
                         int64_t count0, int64_t group);
/* p [rows, n] <- exp(p - lse [rows]) on each row's visible columns, 0 elsewhere, in place. */
int exp_rows_f32(float *p, const float *lse, int64_t rows, int64_t n, int64_t period, int64_t count0,
                 int64_t group);
int exp_rows_f64(double *p, const double *lse, int64_t rows, int64_t n, int64_t period, int64_t count0,
                 int64_t group);
int exp_rows_ref_f32(float *p, const float *lse, int64_t rows, int64_t n, int64_t period, int64_t count0,
                     int64_t group);
int exp_rows_ref_f64(double *p, const double *lse, int64_t rows, int64_t n, int64_t period, int64_t count0,
                     int64_t group);

/* Scaled-dot-product attention, softmax(cap(scale * q k^T) [+ causal mask] [+ window]) v, with g query heads
 * per key/value head. k, v, dk, dv are dense [B, Hkv, S, D]; lse is dense [B, Hkv, T, g] (the
 * log-sum-exp of each query row's capped scores). q, out, dq, dout are [B, Hkv * g, T, D]-like with
 * any strides except a unit stride along D: element (b, head h * g + j, position t, e) sits at
 * base + b * s[0] + h * s[1] + t * s[2] + j * s[3] + e, s = the array's four strides in elements.
 * Query t sits at position p = t + S - T (bottom-right aligned). causal: it sees keys s <= p;
 * window > 0 (a sliding window; 0: none): only keys s > p - window; softcap > 0 (0: none): the scores
 * are softcap * tanh(score / softcap). A query row that sees no key gives 0 (lse = +inf). Forward
 * writes out and lse. Backward writes dq, dk, dv (=, not +=: dk and dv are set to their sums over the
 * query rows), each optional. */
int attention_forward_f32(float *out, float *lse, const float *q, const float *k, const float *v, double scale,
                          int causal, double softcap, int64_t window, int64_t B, int64_t Hkv, int64_t g, int64_t T,
                          int64_t S, int64_t D, const int64_t *q_strides, const int64_t *out_strides);
int attention_forward_f64(double *out, double *lse, const double *q, const double *k, const double *v, double scale,
                          int causal, double softcap, int64_t window, int64_t B, int64_t Hkv, int64_t g, int64_t T,
                          int64_t S, int64_t D, const int64_t *q_strides, const int64_t *out_strides);
int attention_backward_f32(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                           const float *v, const float *out, const float *lse, double scale, int causal,
                           double softcap, int64_t window, int64_t B, int64_t Hkv, int64_t g, int64_t T, int64_t S,
                           int64_t D, const int64_t *dq_strides, const int64_t *dout_strides,
                           const int64_t *q_strides, const int64_t *out_strides);
int attention_backward_f64(double *dq, double *dk, double *dv, const double *dout, const double *q, const double *k,
                           const double *v, const double *out, const double *lse, double scale, int causal,
                           double softcap, int64_t window, int64_t B, int64_t Hkv, int64_t g, int64_t T, int64_t S,
                           int64_t D, const int64_t *dq_strides, const int64_t *dout_strides,
                           const int64_t *q_strides, const int64_t *out_strides);
int attention_forward_ref_f32(float *out, float *lse, const float *q, const float *k, const float *v, double scale,
                              int causal, double softcap, int64_t window, int64_t B, int64_t Hkv, int64_t g,
                              int64_t T, int64_t S, int64_t D, const int64_t *q_strides, const int64_t *out_strides);
int attention_forward_ref_f64(double *out, double *lse, const double *q, const double *k, const double *v,
                              double scale, int causal, double softcap, int64_t window, int64_t B, int64_t Hkv,
                              int64_t g, int64_t T, int64_t S, int64_t D, const int64_t *q_strides,
                              const int64_t *out_strides);
int attention_backward_ref_f32(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                               const float *v, const float *out, const float *lse, double scale, int causal,
                               double softcap, int64_t window, int64_t B, int64_t Hkv, int64_t g, int64_t T,
                               int64_t S, int64_t D, const int64_t *dq_strides, const int64_t *dout_strides,
                               const int64_t *q_strides, const int64_t *out_strides);
int attention_backward_ref_f64(double *dq, double *dk, double *dv, const double *dout, const double *q,
                               const double *k, const double *v, const double *out, const double *lse, double scale,
                               int causal, double softcap, int64_t window, int64_t B, int64_t Hkv, int64_t g,
                               int64_t T, int64_t S, int64_t D, const int64_t *dq_strides,
                               const int64_t *dout_strides, const int64_t *q_strides, const int64_t *out_strides);

/* RMSNorm over rows of n: y [rows, n] = x * rstd * weight (weight [n], NULL: none), rstd [rows] =
 * 1 / sqrt(mean(x^2) + eps), both written. Backward, each output optional: gx = rstd * (g w - xhat *
 * mean(g w xhat)) with xhat = x * rstd (written), gweight [n] += sum over rows of g * xhat (accumulated:
 * the one exception among the step ops). */
int rms_norm_forward_f32(float *y, float *rstd, const float *x, const float *weight, double eps, int64_t rows,
                         int64_t n);
int rms_norm_forward_f64(double *y, double *rstd, const double *x, const double *weight, double eps, int64_t rows,
                         int64_t n);
int rms_norm_backward_f32(float *gx, float *gweight, const float *g, const float *x, const float *weight,
                          const float *rstd, int64_t rows, int64_t n);
int rms_norm_backward_f64(double *gx, double *gweight, const double *g, const double *x, const double *weight,
                          const double *rstd, int64_t rows, int64_t n);
int rms_norm_forward_ref_f32(float *y, float *rstd, const float *x, const float *weight, double eps, int64_t rows,
                             int64_t n);
int rms_norm_forward_ref_f64(double *y, double *rstd, const double *x, const double *weight, double eps,
                             int64_t rows, int64_t n);
int rms_norm_backward_ref_f32(float *gx, float *gweight, const float *g, const float *x, const float *weight,
                              const float *rstd, int64_t rows, int64_t n);
int rms_norm_backward_ref_f64(double *gx, double *gweight, const double *g, const double *x,
                              const double *weight, const double *rstd, int64_t rows, int64_t n);
/* Rotary embedding, transformers' rotate-half form, of x [B, H, T, D] (strides x_strides[0..2] in
 * elements for b, h, t; unit along D) into out (strides out_strides); cos, sin dense [T, rd], rd even
 * and <= D: the first rd dims of each row are rotated, out = x cos + rotate_half(x) sin within them,
 * or with transpose != 0 its transpose (the backward); dims rd..D are copied (partial rotary,
 * transformers' Phi-3 / GPT-NeoX: rd = D * partial_rotary_factor). out is written. */
int rotary_f32(float *out, const float *x, const float *cos, const float *sin, int transpose, int64_t B, int64_t H,
               int64_t T, int64_t D, int64_t rd, const int64_t *x_strides, const int64_t *out_strides);
int rotary_f64(double *out, const double *x, const double *cos, const double *sin, int transpose, int64_t B,
               int64_t H, int64_t T, int64_t D, int64_t rd, const int64_t *x_strides, const int64_t *out_strides);
int rotary_ref_f32(float *out, const float *x, const float *cos, const float *sin, int transpose, int64_t B,
                   int64_t H, int64_t T, int64_t D, int64_t rd, const int64_t *x_strides, const int64_t *out_strides);
int rotary_ref_f64(double *out, const double *x, const double *cos, const double *sin, int transpose, int64_t B,
                   int64_t H, int64_t T, int64_t D, int64_t rd, const int64_t *x_strides, const int64_t *out_strides);

/* Threads used by the parallel functions; n <= 0 restores the OpenMP default. */
void lora_set_num_threads(int n);
int lora_get_num_threads(void);
/* 1 when compiled with OpenMP. */
int lora_has_openmp(void);

#endif
