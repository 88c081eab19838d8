/* gemm.h: the C core's dense GEMMs, and a LoRA layer with its low-rank branch fused into the GEMM.
 *
 * A frozen float32 / float64 Linear with a LoRA adapter, W [out, in], lora_A [r, in], lora_B [out, r]:
 *   forward   y  = x W^T + scaling * (x lora_A^T) lora_B^T
 *   backward  dx = dy W  + scaling * (dy lora_B) lora_A
 * The fused functions compute x lora_A^T (dy lora_B) from the same packed blocks of x (dy) as the
 * GEMM and add the low-rank term to each output tile before it is stored: x, y, dy and dx make one
 * trip through memory instead of two.
 * Same conventions as lora_np.h: outputs first, row-major dense arrays, LORA_OK or an error code,
 * outputs written (=) unless the comment says "+=". This header is also part of the cffi cdef.
 */
#ifndef LORA_NP_GEMM_H
#define LORA_NP_GEMM_H

#include <stdint.h>

#include "lora_np.h"

/* C [M, N] = A [M, K] @ B^T, B [N, K] (a Linear's forward, B its weight). */
int gemm_nt_f32(float *C, const float *A, const float *B, int64_t M, int64_t N, int64_t K);
int gemm_nt_f64(double *C, const double *A, const double *B, int64_t M, int64_t N, int64_t K);

/* C [M, N] = A [M, K] @ B, B [K, N] (a Linear's input gradient, B its weight). */
int gemm_nn_f32(float *C, const float *A, const float *B, int64_t M, int64_t N, int64_t K);
int gemm_nn_f64(double *C, const double *A, const double *B, int64_t M, int64_t N, int64_t K);

/* y [M, out] = x [M, in] @ weight^T + scaling * t @ lora_B^T, with t [M, r] = x @ lora_A^T also
 * written out (=), as lora_forward_* returns it for the backward. */
int lora_linear_forward_f32(float *y, float *t, const float *x, const float *weight, const float *lora_A,
                            const float *lora_B, double scaling, int64_t M, int64_t in, int64_t out, int64_t r);
int lora_linear_forward_f64(double *y, double *t, const double *x, const double *weight, const double *lora_A,
                            const double *lora_B, double scaling, int64_t M, int64_t in, int64_t out, int64_t r);

/* dx [M, in] = dy [M, out] @ weight + scaling * (dy @ lora_B) @ lora_A (=); d_lora_A [r, in] and
 * d_lora_B [out, r] += exactly what lora_backward_* adds (it computes them). Each output may be NULL
 * (skipped). */
int lora_linear_backward_f32(float *dx, float *d_lora_A, float *d_lora_B, const float *dy, const float *x,
                             const float *t, const float *weight, const float *lora_A, const float *lora_B,
                             double scaling, int64_t M, int64_t in, int64_t out, int64_t r);
int lora_linear_backward_f64(double *dx, double *d_lora_A, double *d_lora_B, const double *dy, const double *x,
                             const double *t, const double *weight, const double *lora_A, const double *lora_B,
                             double scaling, int64_t M, int64_t in, int64_t out, int64_t r);

#endif
