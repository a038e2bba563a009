// Launchers of the CUDA kernels of the fused K-pass loss. Raw pointers only (no torch headers),
// so the kernel translation unit compiles with plain nvcc (tests/test_cuda_compiles.py).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace intradistill {

enum class DType { Float32, Float16, BFloat16 };

// The largest K the CUDA kernels are instantiated for (K rows of a token live in registers).
constexpr int kMaxPasses = 8;

// The logits and the per-call constants (RowsConfig in ops/backend.py).
struct RowsArgs {
  const void* logits;      // element (k, n, v) at logits + row_off[n] + k * stride_k + v * stride_v
  const int64_t* row_off;  // [N]
  const int64_t* target;   // [N]; < 0: inactive row
  int64_t K, N, V, stride_k, stride_v;
  float eps;               // label smoothing
  float logit_scale;       // t = logit_scale * z first
  float softcap;           // > 0: t = softcap * tanh(t / softcap); 0: off
  bool js, has_ce;
  bool vectorized;         // stride_v == 1 and every row start 16-byte aligned
  DType dtype;
};

// The weight of each row's terms in the differentiated quantity (RowWeights in ops/backend.py).
struct RowWeights {
  const float* ce;   // [N]: weight of the row's mean cross-entropy (read only with has_ce)
  const float* div;  // [N]: weight of the row's divergence
  const float* z;    // [N]: weight of the row's (1/K) Σ_k lse_k²; nullptr: no z term
};

// Where a gradient of the logits' shape and dtype is written (it may be the logits themselves).
struct GradArgs {
  void* data;              // element (k, n, v) at data + row_off[n] + k * stride_k + v * stride_v
  const int64_t* row_off;  // [N]
  int64_t stride_k, stride_v;
  bool vectorized;         // as RowsArgs::vectorized, for the gradient
};

// The one-pass forward's request (EarlyGrad in ops/backend.py).
struct EarlyGrad {
  RowWeights weights;
  GradArgs grad;
};

// early == nullptr: statistics only; otherwise the gradient too, in the same thread block.
cudaError_t launch_forward(const RowsArgs& a, float* ce_row, float* div_row, float* lse, float* stat,
                           const EarlyGrad* early, cudaStream_t stream);

cudaError_t launch_backward(const RowsArgs& a, const float* lse, const float* stat, const RowWeights& weights,
                            const GradArgs& grad, cudaStream_t stream);

}  // namespace intradistill
