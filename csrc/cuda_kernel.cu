// CUDA kernels of the fused K-pass loss (docs/design.md §1.9), the same algorithm as the Triton and CPU
// kernels. One thread block per token; each thread owns groups of 16 bytes of consecutive classes
// and reads the K passes of its group together (z̄ and p̄ need them), keeping a thread-local
// online max / sum-exp / Σe·d per pass. The block then combines the per-thread states: a max
// reduction, a rescale, a sum reduction (warp shuffles, then one value per warp through shared
// memory), always in the same order, so results are bitwise reproducible. No atomics.
//
// Raw pointers only: this file compiles with plain nvcc; cuda_binding.cpp connects it to torch.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <type_traits>

#include "cuda_kernel.h"

namespace intradistill {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// A macro-free -inf usable in constant expressions on host and device.
constexpr float kNegInf = -__builtin_huge_valf();

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Classes per thread group: one 16-byte load.
template <typename T>
struct Group {
  static constexpr int W = 16 / sizeof(T);
};

// Classes [v, v + W) of one pass row into out (out-of-range classes read -inf).
template <typename T, bool VEC>
__device__ __forceinline__ void load_group(const T* row, int64_t v, int64_t V, int64_t stride_v, float* out) {
  constexpr int W = Group<T>::W;
  if (VEC && v + W <= V) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + v));
    const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < W; ++j) out[j] = to_float(vals[j]);
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) out[j] = v + j < V ? to_float(row[(v + j) * stride_v]) : kNegInf;
  }
}

// Classes [v, v + W) of all passes; passes K..KT-1 (compile-time padding) read as -inf.
template <typename T, int KT, bool VEC>
__device__ __forceinline__ void load_passes(const T* row, const RowsArgs& a, int64_t v, int K, float (&z)[KT][Group<T>::W]) {
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    if (k < K) {
      load_group<T, VEC>(row + k * a.stride_k, v, a.V, a.stride_v, z[k]);
    } else {
#pragma unroll
      for (int j = 0; j < Group<T>::W; ++j) z[k][j] = kNegInf;
    }
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store_group(T* row, int64_t v, int64_t V, int64_t stride_v, const float* in) {
  constexpr int W = Group<T>::W;
  if (VEC && v + W <= V) {
    uint4 raw;
    T* vals = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < W; ++j) vals[j] = from_float<T>(in[j]);
    *reinterpret_cast<uint4*>(row + v) = raw;
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j)
      if (v + j < V) row[(v + j) * stride_v] = from_float<T>(in[j]);
  }
}

// Block-wide reductions of KT values at once; every thread gets the results.
template <int KT, bool MAX>
__device__ __forceinline__ void block_reduce(float (&x)[KT], float* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < KT; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, x[k], o);
      x[k] = MAX ? fmaxf(x[k], other) : x[k] + other;
    }
    if (lane == 0) smem[k * kWarps + warp] = x[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    float r = smem[k * kWarps];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) r = MAX ? fmaxf(r, smem[k * kWarps + w]) : r + smem[k * kWarps + w];
    x[k] = r;
  }
  __syncthreads();
}

// log p̄ of each class of the group from the [KT][W] log-probabilities (padded passes are -inf).
template <int KT, int W>
__device__ __forceinline__ void log_mean_prob(const float (&lp)[KT][W], int K, float* out) {
#pragma unroll
  for (int j = 0; j < W; ++j) {
    float mx = kNegInf;
#pragma unroll
    for (int k = 0; k < KT; ++k) mx = fmaxf(mx, lp[k][j]);
    const float safe = mx == kNegInf ? 0.0f : mx;
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < KT; ++k) s += __expf(lp[k][j] - safe);
    out[j] = safe + __logf(s / K);
  }
}

// KT is a compile-time bound on the number of passes; passes K..KT-1 are padding read as -inf.
template <typename T, int KT, bool VEC>
__global__ void __launch_bounds__(kThreads) forward_kernel(RowsArgs a, float* ce_row, float* div_row,
                                                           float* lse_out, float* stat_out) {
  constexpr int W = Group<T>::W;
  __shared__ float smem[KT * kWarps];
  const int64_t n = blockIdx.x, N = a.N, V = a.V;
  const int K = static_cast<int>(a.K);
  const int64_t y = a.target[n];
  if (y < 0) {
    if (threadIdx.x == 0) {
      ce_row[n] = div_row[n] = 0.0f;
      for (int k = 0; k < K; ++k) lse_out[k * N + n] = stat_out[k * N + n] = 0.0f;
    }
    return;
  }
  const T* row = static_cast<const T*>(a.logits) + a.row_off[n];
  const bool smooth = a.has_ce && a.eps > 0.0f;
  float m[KT], S[KT], A[KT], zs[KT], z[KT][W];
#pragma unroll
  for (int k = 0; k < KT; ++k) m[k] = kNegInf, S[k] = A[k] = zs[k] = 0.0f;

  for (int64_t v = static_cast<int64_t>(threadIdx.x) * W; v < V; v += static_cast<int64_t>(kThreads) * W) {
    load_passes<T, KT, VEC>(row, a, v, K, z);
    float zbar[W];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      float s = 0.0f;
#pragma unroll
      for (int k = 0; k < KT; ++k) s += k < K ? z[k][j] : 0.0f;
      zbar[j] = s / K;
    }
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      float bm = kNegInf;
#pragma unroll
      for (int j = 0; j < W; ++j) bm = fmaxf(bm, z[k][j]);
      const float m_new = fmaxf(m[k], bm);
      const float shift = m_new == kNegInf ? 0.0f : m_new;  // avoids (-inf) - (-inf)
      float s = 0.0f, acc = 0.0f, zsum = 0.0f;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const float e = __expf(z[k][j] - shift);
        s += e;
        // e == 0: class at -inf in this pass (z - z̄ may be NaN): term 0. NaN logits stay NaN.
        acc += e == 0.0f ? 0.0f : e * (z[k][j] - zbar[j]);
        zsum += v + j < V ? z[k][j] : 0.0f;
      }
      const float scale = __expf(m[k] - shift);
      S[k] = S[k] * scale + s;
      A[k] = A[k] * scale + acc;
      if (smooth) zs[k] += zsum;
      m[k] = m_new;
    }
  }

  float M[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) M[k] = m[k];
  block_reduce<KT, true>(M, smem);
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    const float f = __expf(m[k] - (M[k] == kNegInf ? 0.0f : M[k]));
    S[k] *= f;
    A[k] *= f;
  }
  block_reduce<KT, false>(S, smem);
  block_reduce<KT, false>(A, smem);
  if (smooth) block_reduce<KT, false>(zs, smem);
  float lse[KT], stat[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    lse[k] = k < K ? M[k] + __logf(S[k]) : 0.0f;
    stat[k] = A[k] / S[k];
  }

  if (a.js) {
    // Second pass: KL_k = Σ p_k (log p_k − log p̄).
    float kl[KT];
#pragma unroll
    for (int k = 0; k < KT; ++k) kl[k] = 0.0f;
    for (int64_t v = static_cast<int64_t>(threadIdx.x) * W; v < V; v += static_cast<int64_t>(kThreads) * W) {
      load_passes<T, KT, VEC>(row, a, v, K, z);
#pragma unroll
      for (int k = 0; k < KT; ++k)
#pragma unroll
        for (int j = 0; j < W; ++j) z[k][j] -= lse[k];
      float lpbar[W];
      log_mean_prob<KT, W>(z, K, lpbar);
#pragma unroll
      for (int k = 0; k < KT; ++k)
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const float p = __expf(z[k][j]);
          kl[k] += p == 0.0f ? 0.0f : p * (z[k][j] - lpbar[j]);
        }
    }
    block_reduce<KT, false>(kl, smem);
#pragma unroll
    for (int k = 0; k < KT; ++k) stat[k] = kl[k];
  }

  if (threadIdx.x == 0) {
    float div = 0.0f, ce = 0.0f;
    for (int k = 0; k < K; ++k) {
      div += stat[k];
      lse_out[k * N + n] = lse[k];
      stat_out[k * N + n] = stat[k];
      if (a.has_ce) {
        const float zy = to_float(row[k * a.stride_k + y * a.stride_v]);
        ce += smooth ? lse[k] - (1.0f - a.eps) * zy - (a.eps / V) * zs[k] : lse[k] - zy;
      }
    }
    div_row[n] = div / K;
    ce_row[n] = a.has_ce ? ce / K : 0.0f;
  }
}

template <typename T, int KT, bool VEC, bool GVEC>
__global__ void __launch_bounds__(kThreads) backward_kernel(RowsArgs a, const float* lse_in, const float* stat_in,
                                                            const float* g_ce_row, const float* g_div_row, T* grad,
                                                            const int64_t* grad_row_off, int64_t gstride_k,
                                                            int64_t gstride_v) {
  constexpr int W = Group<T>::W;
  const int64_t n = blockIdx.x, N = a.N, V = a.V;
  const int K = static_cast<int>(a.K);
  const int64_t y = a.target[n];
  T* grow = grad + grad_row_off[n];
  float g[W];
  if (y < 0) {
#pragma unroll
    for (int j = 0; j < W; ++j) g[j] = 0.0f;
    for (int64_t v = static_cast<int64_t>(threadIdx.x) * W; v < V; v += static_cast<int64_t>(kThreads) * W)
      for (int k = 0; k < K; ++k) store_group<T, GVEC>(grow + k * gstride_k, v, V, gstride_v, g);
    return;
  }
  const T* row = static_cast<const T*>(a.logits) + a.row_off[n];
  float lse[KT], stat[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    lse[k] = k < K ? lse_in[k * N + n] : 0.0f;
    stat[k] = k < K ? stat_in[k * N + n] : 0.0f;
  }
  const float g_div = g_div_row[n] / K;
  const float g_ce = a.has_ce ? g_ce_row[n] / K : 0.0f;
  const float smooth_term = a.has_ce ? a.eps / V : 0.0f;
  float z[KT][W], p[KT][W];
  for (int64_t v = static_cast<int64_t>(threadIdx.x) * W; v < V; v += static_cast<int64_t>(kThreads) * W) {
    // All K passes of the group are read before any is written: safe when grad aliases logits.
    load_passes<T, KT, VEC>(row, a, v, K, z);
#pragma unroll
    for (int k = 0; k < KT; ++k)
#pragma unroll
      for (int j = 0; j < W; ++j) p[k][j] = __expf(z[k][j] - lse[k]);
    float aux[W], pbar[W];
    if (a.js) {
#pragma unroll
      for (int k = 0; k < KT; ++k)
#pragma unroll
        for (int j = 0; j < W; ++j) z[k][j] -= lse[k];  // log p_k
      log_mean_prob<KT, W>(z, K, aux);
    } else {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        float zs = 0.0f, ps = 0.0f;
#pragma unroll
        for (int k = 0; k < KT; ++k) {
          zs += k < K ? z[k][j] : 0.0f;
          ps += p[k][j];
        }
        aux[j] = zs / K;
        pbar[j] = ps / K;
      }
    }
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k >= K) continue;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const float pk = p[k][j];
        float t;
        if (a.js) {
          t = pk == 0.0f ? 0.0f : pk * (z[k][j] - aux[j] - stat[k]);  // p_j (r_j − KL_j)
        } else {
          t = (pk == 0.0f ? 0.0f : pk * (z[k][j] - aux[j] - stat[k] + 1.0f)) - pbar[j];  // p_j (d_j − s_j + 1) − p̄
        }
        float gj = g_div * t;
        if (a.has_ce) gj += g_ce * (pk - (v + j == y ? 1.0f - a.eps : 0.0f) - smooth_term);
        g[j] = gj;
      }
      store_group<T, GVEC>(grow + k * gstride_k, v, V, gstride_v, g);
    }
  }
}

template <typename T, int KT>
cudaError_t forward_for(const RowsArgs& a, float* ce, float* div, float* lse, float* stat, cudaStream_t s) {
  if (a.vectorized)
    forward_kernel<T, KT, true><<<a.N, kThreads, 0, s>>>(a, ce, div, lse, stat);
  else
    forward_kernel<T, KT, false><<<a.N, kThreads, 0, s>>>(a, ce, div, lse, stat);
  return cudaGetLastError();
}

template <typename T, int KT>
cudaError_t backward_for(const RowsArgs& a, const float* lse, const float* stat, const float* g_ce, const float* g_div,
                         void* grad, const int64_t* goff, int64_t gk, int64_t gv, bool gvec, cudaStream_t s) {
  T* gp = static_cast<T*>(grad);
  if (a.vectorized && gvec)
    backward_kernel<T, KT, true, true><<<a.N, kThreads, 0, s>>>(a, lse, stat, g_ce, g_div, gp, goff, gk, gv);
  else
    backward_kernel<T, KT, false, false><<<a.N, kThreads, 0, s>>>(a, lse, stat, g_ce, g_div, gp, goff, gk, gv);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_dtype(const RowsArgs& a, float* ce, float* div, float* lse, float* stat, cudaStream_t s) {
  if (a.K <= 2) return forward_for<T, 2>(a, ce, div, lse, stat, s);
  if (a.K <= 4) return forward_for<T, 4>(a, ce, div, lse, stat, s);
  return forward_for<T, 8>(a, ce, div, lse, stat, s);
}

template <typename T>
cudaError_t backward_dtype(const RowsArgs& a, const float* lse, const float* stat, const float* g_ce,
                           const float* g_div, void* grad, const int64_t* goff, int64_t gk, int64_t gv, bool gvec,
                           cudaStream_t s) {
  if (a.K <= 2) return backward_for<T, 2>(a, lse, stat, g_ce, g_div, grad, goff, gk, gv, gvec, s);
  if (a.K <= 4) return backward_for<T, 4>(a, lse, stat, g_ce, g_div, grad, goff, gk, gv, gvec, s);
  return backward_for<T, 8>(a, lse, stat, g_ce, g_div, grad, goff, gk, gv, gvec, s);
}

}  // namespace

cudaError_t launch_forward(const RowsArgs& a, float* ce_row, float* div_row, float* lse, float* stat,
                           cudaStream_t stream) {
  if (a.K < 2 || a.K > kMaxPasses) return cudaErrorInvalidValue;
  if (a.N == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::Float32: return forward_dtype<float>(a, ce_row, div_row, lse, stat, stream);
    case DType::Float16: return forward_dtype<__half>(a, ce_row, div_row, lse, stat, stream);
    case DType::BFloat16: return forward_dtype<__nv_bfloat16>(a, ce_row, div_row, lse, stat, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(const RowsArgs& a, const float* lse, const float* stat, const float* g_ce,
                            const float* g_div, void* grad, const int64_t* grad_row_off, int64_t grad_stride_k,
                            int64_t grad_stride_v, bool grad_vectorized, cudaStream_t stream) {
  if (a.K < 2 || a.K > kMaxPasses) return cudaErrorInvalidValue;
  if (a.N == 0) return cudaSuccess;
  const auto args = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return backward_dtype<T>(a, lse, stat, g_ce, g_div, grad, grad_row_off, grad_stride_k, grad_stride_v,
                             grad_vectorized, stream);
  };
  switch (a.dtype) {
    case DType::Float32: return args(static_cast<float*>(nullptr));
    case DType::Float16: return args(static_cast<__half*>(nullptr));
    case DType::BFloat16: return args(static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

}  // namespace intradistill
