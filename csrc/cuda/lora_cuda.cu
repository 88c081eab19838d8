// lora_cuda.cu: the LoRA low-rank branch on an NVIDIA GPU, float32 and float64.
//
// Like the C core, three building blocks do all the arithmetic, each reading its big
// operand ([N, in] or [N, out]) once, with the small lora_A / lora_B in L2 and shared memory:
//   rows_dot     T [M, R]  = X [M, K] @ W^T            (t = x A^T, g = dy B)
//   rank_update  Y [M, K] += alpha * C [M, R] @ D [R, K] (y, dx, merge)
//   rank_reduce  O [R, K] += alpha * C [M, R]^T @ X [M, K]  (d_lora_A, d_lora_B)
// Sums over a long dimension (K in rows_dot, tokens in rank_reduce) are split into a
// fixed number of slices written to scratch and added in order by a second kernel: no
// atomics, so results are the same from run to run. Small matrices are read through
// strides, so lora_B^T, lora_A^T never need a copy.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

extern "C" {
#include "lora_cuda.h"
}

namespace {

constexpr int RT = 16;             // ranks held in registers per thread (and per tile)
constexpr int TARGET_BLOCKS = 1056; // enough blocks to fill the GPU several times (8 per SM on 132 SMs)

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- rows_dot ---------------------------------------------------------------------------
// P [slice][M, R] = X [M, K-slice] @ W(k, i)^T, W(k, i) = W[k * wk + i * wi], one K slice per
// blockIdx.y. Grid (ceil(M / 64), slices, ceil(R / RT)), 128 threads: rows tid/4 and tid/4 + 32,
// ranks 4 * (tid % 4) .. + 3 of this block's RT ranks. The next tile is loaded into registers
// while the current one is used, so each thread keeps its 20 global loads in flight together.
template <typename T>
__global__ void __launch_bounds__(128, 4) rows_dot_kernel(T *P, const T *__restrict__ X, const T *__restrict__ W,
                                                       int64_t wk, int64_t wi, int64_t M, int64_t K, int64_t R,
                                                       int64_t kslice)
{
    constexpr int BM = 64, BK = 32, XPT = BM * BK / 128, WPT = RT * BK / 128;
    __shared__ T xs[BM][BK + 1];
    __shared__ T ws[BK][RT];  // unpadded, so a thread reads its 4 ranks in one vector load
    const int tid = threadIdx.x, row = tid >> 2, quad = tid & 3;
    const int64_t m0 = (int64_t)blockIdx.x * BM, r0 = (int64_t)blockIdx.z * RT;
    const int64_t k_begin = (int64_t)blockIdx.y * kslice, k_end = min(K, k_begin + kslice);
    T xr[XPT], wr[WPT];
    auto load = [&](int64_t kb) {
        const int64_t m = m0 + tid / BK, i = kb + tid % BK;  // element u is row m + 4u, column i
        const T *x = X + m * K + i;
#pragma unroll
        for (int u = 0; u < XPT; u++) xr[u] = (m + 4 * u < M && i < k_end) ? x[4 * u * K] : T(0);
#pragma unroll
        for (int u = 0; u < WPT; u++) {  // walk W along its contiguous dimension
            const int e = tid + 128 * u, rank = wi == 1 ? e / BK : e % RT, c = wi == 1 ? e % BK : e / RT;
            const int64_t k = r0 + rank, i = kb + c;
            wr[u] = (k < R && i < k_end) ? W[k * wk + i * wi] : T(0);
        }
    };
    T acc[2][4] = {};
    load(k_begin);
    for (int64_t kb = k_begin; kb < k_end; kb += BK) {
#pragma unroll
        for (int u = 0; u < XPT; u++) xs[(tid + 128 * u) / BK][(tid + 128 * u) % BK] = xr[u];
#pragma unroll
        for (int u = 0; u < WPT; u++) {
            const int e = tid + 128 * u;
            ws[wi == 1 ? e % BK : e / RT][wi == 1 ? e / BK : e % RT] = wr[u];
        }
        __syncthreads();
        if (kb + BK < k_end) load(kb + BK);
#pragma unroll 8
        for (int c = 0; c < BK; c++) {
            const T x0 = xs[row][c], x1 = xs[row + 32][c];
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const T w = ws[c][quad * 4 + q];
                acc[0][q] += x0 * w;
                acc[1][q] += x1 * w;
            }
        }
        __syncthreads();
    }
    for (int h = 0; h < 2; h++)
        for (int q = 0; q < 4; q++) {
            const int64_t m = m0 + row + 32 * h, k = r0 + quad * 4 + q;
            if (m < M && k < R) P[((int64_t)blockIdx.y * M + m) * R + k] = acc[h][q];
        }
}

// out (i, j) = beta * out (i, j) + alpha * sum_s P [s][i, j], summed in order s = 0..slices-1;
// out (i, j) is out[i * oi + j * oj]; P is [slices, I, J].
template <typename T>
__global__ void sum_slices_kernel(T *out, int64_t oi, int64_t oj, const T *P, int64_t slices, int64_t I,
                                  int64_t J, T alpha, T beta)
{
    const int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= I * J) return;
    T s = 0;
    for (int64_t sl = 0; sl < slices; sl++) s += P[sl * I * J + e];
    const int64_t i = e / J, j = e % J;
    T *o = out + i * oi + j * oj;
    *o = (beta == T(0) ? T(0) : beta * *o) + alpha * s;  // beta = 0 ignores what out held
}

// ---- rank_update ------------------------------------------------------------------------
// Y [M, K] += alpha * sum over ranks r0..r0+RT-1 of C(m, k) D(k, j); C(m, k) = C[m * cm + k * ck],
// D(k, j) = D[k * dk + j * dj]. Grid (ceil(M / 32), ceil(K / 256)), 256 threads: one column each,
// its RT values of D in registers, 32 rows of C in shared memory.
template <typename T>
__global__ void __launch_bounds__(256) rank_update_kernel(T *Y, const T *C, int64_t cm, int64_t ck, const T *D, int64_t dk, int64_t dj,
                                   T alpha, int64_t M, int64_t K, int64_t R, int64_t r0)
{
    constexpr int BM = 32, U = 8;
    __shared__ T cs[BM][RT];
    const int64_t m0 = (int64_t)blockIdx.x * BM, j = (int64_t)blockIdx.y * 256 + threadIdx.x;
    for (int e = threadIdx.x; e < BM * RT; e += 256) {
        const int rr = e / RT, rank = e % RT;
        const int64_t m = m0 + rr, k = r0 + rank;
        cs[rr][rank] = (m < M && k < R) ? C[m * cm + k * ck] : T(0);
    }
    T d[RT];
#pragma unroll
    for (int q = 0; q < RT; q++) d[q] = (j < K && r0 + q < R) ? D[(r0 + q) * dk + j * dj] : T(0);
    __syncthreads();
    if (j >= K) return;
    const int rows = (int)min((int64_t)BM, M - m0);
    for (int rr0 = 0; rr0 < rows; rr0 += U) {  // U loads in flight, then U updates
        T yv[U];
#pragma unroll
        for (int u = 0; u < U; u++) yv[u] = rr0 + u < rows ? Y[(m0 + rr0 + u) * K + j] : T(0);
#pragma unroll
        for (int u = 0; u < U; u++) {
            T acc = 0;
#pragma unroll
            for (int q = 0; q < RT; q++) acc += cs[rr0 + u][q] * d[q];
            if (rr0 + u < rows) Y[(m0 + rr0 + u) * K + j] = yv[u] + alpha * acc;
        }
    }
}

// ---- rank_reduce ------------------------------------------------------------------------
// P [slice][R, K] = C [M-slice, R]^T @ X [M-slice, K] for ranks r0..r0+RT-1, C and X dense.
// Grid (ceil(K / 256), slices, ceil(R / RT)), 256 threads: one column each, RT sums in registers.
template <typename T>
__global__ void __launch_bounds__(256) rank_reduce_kernel(T *P, const T *__restrict__ C, const T *__restrict__ X,
                                                         int64_t M, int64_t K, int64_t R, int64_t mslice)
{
    constexpr int BM = 32, U = 16;
    __shared__ T cs[BM][RT];
    const int64_t j = (int64_t)blockIdx.x * 256 + threadIdx.x, r0 = (int64_t)blockIdx.z * RT;
    const int64_t m_begin = (int64_t)blockIdx.y * mslice, m_end = min(M, m_begin + mslice);
    T acc[RT] = {};
    for (int64_t mb = m_begin; mb < m_end; mb += BM) {
        for (int e = threadIdx.x; e < BM * RT; e += 256) {
            const int rr = e / RT, rank = e % RT;
            const int64_t m = mb + rr, k = r0 + rank;
            cs[rr][rank] = (m < m_end && k < R) ? C[m * R + k] : T(0);
        }
        __syncthreads();
        if (j < K) {
            const int rows = (int)min((int64_t)BM, m_end - mb);
            for (int rr0 = 0; rr0 < rows; rr0 += U) {  // U loads in flight, then their sums
                T xv[U];
#pragma unroll
                for (int u = 0; u < U; u++) xv[u] = rr0 + u < rows ? X[(mb + rr0 + u) * K + j] : T(0);
#pragma unroll
                for (int u = 0; u < U; u++)
#pragma unroll
                    for (int q = 0; q < RT; q++) acc[q] += cs[rr0 + u][q] * xv[u];
            }
        }
        __syncthreads();
    }
    if (j < K)
        for (int q = 0; q < RT && r0 + q < R; q++) P[((int64_t)blockIdx.y * R + r0 + q) * K + j] = acc[q];
}

// ---- host-side launchers ------------------------------------------------------------------

// Device memory is stream-ordered (cudaMallocAsync on the default stream), so allocating and
// freeing never waits for the GPU; the pool keeps what it has instead of returning it at
// every synchronization.
cudaError_t device_alloc(void **ptr, size_t bytes)
{
    static bool pool_kept = false;
    if (!pool_kept) {
        int device = 0;
        cudaMemPool_t pool;
        uint64_t keep_all = UINT64_MAX;
        if (cudaGetDevice(&device) == cudaSuccess && cudaDeviceGetDefaultMemPool(&pool, device) == cudaSuccess)
            cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep_all);
        pool_kept = true;
    }
    return cudaMallocAsync(ptr, bytes ? bytes : 1, 0);
}

struct Scratch {  // device scratch, freed (stream-ordered) on scope exit
    void *ptr = nullptr;
    cudaError_t status = cudaSuccess;
    explicit Scratch(size_t bytes) { status = device_alloc(&ptr, bytes); }
    ~Scratch() { if (ptr) cudaFreeAsync(ptr, 0); }
};

// T [M, R] (dense) = X [M, K] @ W(k, i)^T.
template <typename T>
cudaError_t rows_dot(T *out, const T *X, const T *W, int64_t wk, int64_t wi, int64_t M, int64_t K, int64_t R)
{
    if (K == 0) return cudaMemsetAsync(out, 0, sizeof(T) * (size_t)(M * R), 0);
    const int64_t mr_blocks = cdiv(M, 64) * cdiv(R, RT);
    const int64_t slices_wanted = std::max<int64_t>(1, std::min(cdiv(TARGET_BLOCKS, mr_blocks), cdiv(K, 256)));
    const int64_t kslice = cdiv(cdiv(K, slices_wanted), 32) * 32, slices = std::max<int64_t>(1, cdiv(K, kslice));
    Scratch partial(sizeof(T) * (size_t)(slices * M * R));
    if (partial.status != cudaSuccess) return partial.status;
    T *P = static_cast<T *>(partial.ptr);
    rows_dot_kernel<T><<<dim3(cdiv(M, 64), slices, cdiv(R, RT)), 128>>>(P, X, W, wk, wi, M, K, R, kslice);
    sum_slices_kernel<T><<<cdiv(M * R, 256), 256>>>(out, R, 1, P, slices, M, R, T(1), T(0));
    return cudaGetLastError();
}

// Y [M, K] += alpha * C(m, k) D(k, j), one pass per RT ranks.
template <typename T>
cudaError_t rank_update(T *Y, const T *C, int64_t cm, int64_t ck, const T *D, int64_t dk, int64_t dj, T alpha,
                        int64_t M, int64_t K, int64_t R)
{
    for (int64_t r0 = 0; r0 < R; r0 += RT)
        rank_update_kernel<T><<<dim3(cdiv(M, 32), cdiv(K, 256)), 256>>>(Y, C, cm, ck, D, dk, dj, alpha, M, K, R, r0);
    return cudaGetLastError();
}

// out (k, j) += alpha * (C [M, R]^T @ X [M, K]) (k, j), out (k, j) at out[k * ok + j * oj].
template <typename T>
cudaError_t rank_reduce(T *out, int64_t ok, int64_t oj, const T *C, const T *X, T alpha, int64_t M, int64_t K,
                        int64_t R)
{
    const int64_t kr_blocks = cdiv(K, 256) * cdiv(R, RT);
    const int64_t slices_wanted = std::max<int64_t>(1, std::min(cdiv(TARGET_BLOCKS, kr_blocks), cdiv(M, 128)));
    const int64_t mslice = cdiv(cdiv(M, slices_wanted), 32) * 32, slices = std::max<int64_t>(1, cdiv(M, mslice));
    Scratch partial(sizeof(T) * (size_t)(slices * R * K));
    if (partial.status != cudaSuccess) return partial.status;
    T *P = static_cast<T *>(partial.ptr);
    rank_reduce_kernel<T><<<dim3(cdiv(K, 256), slices, cdiv(R, RT)), 256>>>(P, C, X, M, K, R, mslice);
    sum_slices_kernel<T><<<cdiv(R * K, 256), 256>>>(out, ok, oj, P, slices, R, K, alpha, T(1));
    return cudaGetLastError();
}

bool bad_sizes(int64_t N, int64_t in, int64_t out, int64_t r) { return N < 0 || in < 0 || out < 0 || r < 0; }

template <typename T>
int forward(T *y, T *t, const T *x, const T *lora_A, const T *lora_B, double scaling, int64_t N, int64_t in,
            int64_t out, int64_t r)
{
    if (bad_sizes(N, in, out, r)) return cudaErrorInvalidValue;
    if (N == 0 || r == 0) return cudaSuccess;
    cudaError_t st = rows_dot<T>(t, x, lora_A, in, 1, N, in, r);  // t = x A^T
    if (st != cudaSuccess || out == 0) return st;
    return rank_update<T>(y, t, r, 1, lora_B, 1, r, (T)scaling, N, out, r);  // y += s t B^T
}

template <typename T>
int backward(T *dx, T *d_lora_A, T *d_lora_B, const T *dy, const T *x, const T *t, const T *lora_A,
             const T *lora_B, double scaling, int64_t N, int64_t in, int64_t out, int64_t r)
{
    if (bad_sizes(N, in, out, r)) return cudaErrorInvalidValue;
    if (N == 0 || r == 0) return cudaSuccess;
    const T s = (T)scaling;
    cudaError_t st = cudaSuccess;
    if (dx || d_lora_A) {
        Scratch g_buf(sizeof(T) * (size_t)(N * r));  // g [N, r] = dy B
        if (g_buf.status != cudaSuccess) return g_buf.status;
        T *g = static_cast<T *>(g_buf.ptr);
        if ((st = rows_dot<T>(g, dy, lora_B, 1, r, N, out, r)) != cudaSuccess) return st;
        if (dx && in && (st = rank_update<T>(dx, g, r, 1, lora_A, in, 1, s, N, in, r)) != cudaSuccess) return st;
        if (d_lora_A && in && (st = rank_reduce<T>(d_lora_A, in, 1, g, x, s, N, in, r)) != cudaSuccess) return st;
    }
    if (d_lora_B && out) st = rank_reduce<T>(d_lora_B, 1, r, t, dy, s, N, out, r);  // (dy^T t)^T layout
    return st;
}

template <typename T>
int merge(T *weight, const T *lora_A, const T *lora_B, double scaling, int fan_in_fan_out, int64_t in,
          int64_t out, int64_t r)
{
    if (bad_sizes(0, in, out, r)) return cudaErrorInvalidValue;
    if (in == 0 || out == 0 || r == 0) return cudaSuccess;
    if (fan_in_fan_out)  // weight [in, out] += s * A^T B^T
        return rank_update<T>(weight, lora_A, 1, in, lora_B, 1, r, (T)scaling, in, out, r);
    return rank_update<T>(weight, lora_B, r, 1, lora_A, in, 1, (T)scaling, out, in, r);  // [out, in] += s B A
}

}  // namespace

extern "C" {

int lora_cuda_device_count(int *count) { return cudaGetDeviceCount(count); }
const char *lora_cuda_error_string(int status) { return cudaGetErrorString((cudaError_t)status); }
int lora_cuda_malloc(void **ptr, size_t bytes) { return device_alloc(ptr, bytes); }
int lora_cuda_free(void *ptr) { return cudaFreeAsync(ptr, 0); }
int lora_cuda_upload(void *dst, const void *src, size_t bytes) { return cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice); }
int lora_cuda_download(void *dst, const void *src, size_t bytes) { return cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost); }
int lora_cuda_synchronize(void) { return cudaDeviceSynchronize(); }

int lora_cuda_forward_f32(float *y, float *t, const float *x, const float *lora_A, const float *lora_B,
                          double scaling, int64_t N, int64_t in, int64_t out, int64_t r)
{
    return forward<float>(y, t, x, lora_A, lora_B, scaling, N, in, out, r);
}
int lora_cuda_forward_f64(double *y, double *t, const double *x, const double *lora_A, const double *lora_B,
                          double scaling, int64_t N, int64_t in, int64_t out, int64_t r)
{
    return forward<double>(y, t, x, lora_A, lora_B, scaling, N, in, out, r);
}
int lora_cuda_backward_f32(float *dx, float *d_lora_A, float *d_lora_B, const float *dy, const float *x,
                           const float *t, const float *lora_A, const float *lora_B, double scaling, int64_t N,
                           int64_t in, int64_t out, int64_t r)
{
    return backward<float>(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, scaling, N, in, out, r);
}
int lora_cuda_backward_f64(double *dx, double *d_lora_A, double *d_lora_B, const double *dy, const double *x,
                           const double *t, const double *lora_A, const double *lora_B, double scaling, int64_t N,
                           int64_t in, int64_t out, int64_t r)
{
    return backward<double>(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, scaling, N, in, out, r);
}
int lora_cuda_merge_f32(float *weight, const float *lora_A, const float *lora_B, double scaling, int fan_in_fan_out,
                        int64_t in, int64_t out, int64_t r)
{
    return merge<float>(weight, lora_A, lora_B, scaling, fan_in_fan_out, in, out, r);
}
int lora_cuda_merge_f64(double *weight, const double *lora_A, const double *lora_B, double scaling,
                        int fan_in_fan_out, int64_t in, int64_t out, int64_t r)
{
    return merge<double>(weight, lora_A, lora_B, scaling, fan_in_fan_out, in, out, r);
}

}  // extern "C"
