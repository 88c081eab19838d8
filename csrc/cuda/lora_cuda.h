/* lora_cuda.h: the optional CUDA build of the LoRA low-rank branch (see ../lora_np.h).
 *
 * Same operations and argument order as the C core; every pointer to an array is a device
 * pointer from lora_cuda_malloc. Work, allocation and freeing are all queued on the default
 * stream (stream-ordered memory), so nothing waits for the GPU except the copies to the host
 * and lora_cuda_synchronize. Every function returns 0 or a CUDA error code, whose text
 * lora_cuda_error_string gives; none exits.
 * This header is also the cffi cdef: lora_np/_cuda_build.py installs it beside the library and
 * lora_np/_cuda.py reads it from there. Keep it to C declarations without macros (lora_cuda.cu
 * wraps it in extern "C").
 */
#ifndef LORA_CUDA_H
#define LORA_CUDA_H

#include <stddef.h>
#include <stdint.h>

int lora_cuda_device_count(int *count);
const char *lora_cuda_error_string(int status);
int lora_cuda_malloc(void **ptr, size_t bytes);
int lora_cuda_free(void *ptr);
int lora_cuda_upload(void *dst, const void *src, size_t bytes);
int lora_cuda_download(void *dst, const void *src, size_t bytes);
int lora_cuda_synchronize(void);

/* y [N, out] += scaling * t @ lora_B^T, with t [N, r] = x [N, in] @ lora_A^T also written out. */
int lora_cuda_forward_f32(float *y, float *t, const float *x, const float *lora_A, const float *lora_B,
                          double scaling, int64_t N, int64_t in, int64_t out, int64_t r);
int lora_cuda_forward_f64(double *y, double *t, const double *x, const double *lora_A,
                          const double *lora_B, double scaling, int64_t N, int64_t in, int64_t out, int64_t r);

/* g = dy [N, out] @ lora_B: dx [N, in] += s g lora_A; d_lora_A [r, in] += s g^T x;
 * d_lora_B [out, r] += s dy^T t. NULL outputs are skipped. */
int lora_cuda_backward_f32(float *dx, float *d_lora_A, float *d_lora_B, const float *dy, const float *x,
                           const float *t, const float *lora_A, const float *lora_B, double scaling,
                           int64_t N, int64_t in, int64_t out, int64_t r);
int lora_cuda_backward_f64(double *dx, double *d_lora_A, double *d_lora_B, const double *dy,
                           const double *x, const double *t, const double *lora_A, const double *lora_B,
                           double scaling, int64_t N, int64_t in, int64_t out, int64_t r);

/* weight [out, in] += scaling * lora_B @ lora_A, or weight [in, out] += scaling * (lora_B @ lora_A)^T. */
int lora_cuda_merge_f32(float *weight, const float *lora_A, const float *lora_B, double scaling,
                        int fan_in_fan_out, int64_t in, int64_t out, int64_t r);
int lora_cuda_merge_f64(double *weight, const double *lora_A, const double *lora_B, double scaling,
                        int fan_in_fan_out, int64_t in, int64_t out, int64_t r);

#endif
