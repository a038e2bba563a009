// Launchers of the CUDA kernels of the fused K-pass loss. Raw pointers only (no torch headers),
// so the kernel translation unit compiles with plain nvcc (tests/test_cuda_compiles.py).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace intradistill {

enum class DType { Float32, Float16, BFloat16 };

// The largest K the CUDA kernels are instantiated for (K rows of a token live in registers).
constexpr int kMaxPasses = 8;

struct RowsArgs {
  const void* logits;      // element (k, n, v) at logits + row_off[n] + k * stride_k + v * stride_v
  const int64_t* row_off;  // [N]
  const int64_t* target;   // [N]; < 0: inactive row
  int64_t K, N, V, stride_k, stride_v;
  float eps;               // label smoothing
  bool js, has_ce;
  bool vectorized;         // stride_v == 1 and every row start 16-byte aligned
  DType dtype;
};

cudaError_t launch_forward(const RowsArgs& a, float* ce_row, float* div_row, float* lse, float* stat,
                           cudaStream_t stream);

cudaError_t launch_backward(const RowsArgs& a, const float* lse, const float* stat, const float* g_ce,
                            const float* g_div, void* grad, const int64_t* grad_row_off, int64_t grad_stride_k,
                            int64_t grad_stride_v, bool grad_vectorized, cudaStream_t stream);

}  // namespace intradistill
