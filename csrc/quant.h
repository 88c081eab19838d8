/* quant.h: the C core's GEMMs over GGUF (ggml) quantized weights, kept in their blocks.
 *
 * A weight W [N, K] (N output features, K input features, as a Linear's weight) is stored as
 * ggml stores it: N rows, each row K / block elements of `type` blocks, row after row
 * (quant_row_bytes(type, K) bytes a row). `type` is the ggml type id (enum quant_type, as
 * GGUF files and gguf-py number them). K must be a multiple of the type's block size.
 * Blocks are dequantized exactly as ggml and gguf-py do (float32 operations in their order),
 * a tile at a time into a float panel: never a W-sized float copy.
 * Same conventions as lora_np.h: outputs first, row-major dense arrays, LORA_OK or an error
 * code (LORA_EINVAL also for an unknown type or a K that is not whole blocks), outputs
 * written (=), a NULL pointer only where the comment allows it; _ref: plain single-threaded
 * loops with the same arguments, the reference the tiled functions are tested against
 * (csrc/test_quant_kernels.c). This header is also part of the cffi cdef: declarations only.
 */
#ifndef LORA_NP_QUANT_H
#define LORA_NP_QUANT_H

#include <stdint.h>

#include "lora_np.h"

enum quant_type {
    QUANT_F32 = 0, QUANT_F16 = 1, QUANT_Q4_0 = 2, QUANT_Q4_1 = 3, QUANT_Q5_0 = 6, QUANT_Q5_1 = 7,
    QUANT_Q8_0 = 8, QUANT_Q4_K = 12, QUANT_Q5_K = 13, QUANT_Q6_K = 14, QUANT_BF16 = 30
};

/* Elements per block of `type` (0 for a type these kernels lack), and bytes of a row of K elements
 * (0 when K is not whole blocks or the type is unknown). */
int64_t quant_block_size(int type);
int64_t quant_row_bytes(int type, int64_t K);

/* out [rows, K] = the rows of W (`rows` rows of quant_row_bytes(type, K) bytes). */
int quant_dequantize_f32(float *out, const uint8_t *w, int type, int64_t rows, int64_t K);
int quant_dequantize_f64(double *out, const uint8_t *w, int type, int64_t rows, int64_t K);

/* out [rows, n] = columns k0 .. k0 + n of the same rows (of K elements each; k0 and n whole blocks, within K):
 * a column panel of W, read in place. */
int quant_dequantize_cols_f32(float *out, const uint8_t *w, int type, int64_t rows, int64_t K, int64_t k0,
                              int64_t n);
int quant_dequantize_cols_f64(double *out, const uint8_t *w, int type, int64_t rows, int64_t K, int64_t k0,
                              int64_t n);

/* y [M, N] = x [M, K] @ W^T + bias [N] (bias may be NULL: no bias). M <= 8 takes the decode path
 * (each weight row dequantized once into a small buffer, dotted with every row of x). */
int quant_linear_forward_f32(float *y, const float *x, const uint8_t *w, const float *bias, int type, int64_t M,
                             int64_t N, int64_t K);
int quant_linear_forward_f64(double *y, const double *x, const uint8_t *w, const double *bias, int type,
                             int64_t M, int64_t N, int64_t K);
int quant_linear_forward_ref_f32(float *y, const float *x, const uint8_t *w, const float *bias, int type,
                                 int64_t M, int64_t N, int64_t K);
int quant_linear_forward_ref_f64(double *y, const double *x, const uint8_t *w, const double *bias, int type,
                                 int64_t M, int64_t N, int64_t K);

/* dx [M, K] = dy [M, N] @ W: the input's gradient of the frozen layer (W gets none). */
int quant_linear_backward_f32(float *dx, const float *dy, const uint8_t *w, int type, int64_t M, int64_t N,
                              int64_t K);
int quant_linear_backward_f64(double *dx, const double *dy, const uint8_t *w, int type, int64_t M, int64_t N,
                              int64_t K);
int quant_linear_backward_ref_f32(float *dx, const float *dy, const uint8_t *w, int type, int64_t M, int64_t N,
                                  int64_t K);
int quant_linear_backward_ref_f64(double *dx, const double *dy, const uint8_t *w, int type, int64_t M, int64_t N,
                                  int64_t K);

#endif
