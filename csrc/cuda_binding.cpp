// Connects the raw-pointer CUDA kernels (cuda_kernel.cu) to the intradistill_cpp operators that
// cpu_kernel.cpp defines; built only where torch has CUDA and nvcc is found (ops/cpp.py).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "cuda_kernel.h"

namespace {

using intradistill::DType;
using intradistill::EarlyGrad;
using intradistill::GradArgs;
using intradistill::RowsArgs;
using intradistill::RowWeights;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "intradistill cuda kernel: logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// 16-byte vector access is valid when classes are contiguous and every row starts 16-byte aligned.
bool rows_vectorized(const at::Tensor& t) {
  if (t.stride(-1) != 1 || reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  const int64_t per_vector = 16 / t.element_size();
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % per_vector != 0) return false;
  return true;
}

void check_offsets(const at::Tensor& off, const at::Tensor& like, const char* name) {
  TORCH_CHECK(off.device() == like.device(), name, " must be on the logits' device");
  TORCH_CHECK(off.scalar_type() == at::kLong && off.is_contiguous(), name, " must be contiguous int64");
}

RowsArgs rows_args(const at::Tensor& logits, const at::Tensor& row_off, const at::Tensor& target, bool js,
                   double eps, bool has_ce, double logit_scale, double softcap) {
  TORCH_CHECK(logits.is_cuda(), "intradistill cuda kernel: CUDA tensors expected");
  check_offsets(row_off, logits, "row_off");
  TORCH_CHECK(target.device() == logits.device(), "target must be on the logits' device");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous(), "target must be contiguous int64");
  TORCH_CHECK(logits.size(0) >= 2 && logits.size(0) <= intradistill::kMaxPasses,
              "intradistill cuda kernel supports 2 to ", intradistill::kMaxPasses, " passes, got ", logits.size(0));
  TORCH_CHECK(target.numel() == row_off.numel(), "target and row_off must have one entry per row");
  return RowsArgs{logits.const_data_ptr(), row_off.const_data_ptr<int64_t>(), target.const_data_ptr<int64_t>(),
                  logits.size(0), row_off.numel(), logits.size(-1), logits.stride(0), logits.stride(-1),
                  static_cast<float>(eps), static_cast<float>(logit_scale), static_cast<float>(softcap),
                  js, has_ce, rows_vectorized(logits), dtype_of(logits)};
}

const float* row_weight(const at::Tensor& w, const RowsArgs& a, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(w.device() == logits.device(), name, " must be on the logits' device");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == a.N, name,
              " must be a contiguous float32 tensor of one weight per row");
  return w.const_data_ptr<float>();
}

RowWeights row_weights(const std::optional<at::Tensor>& w_ce, const at::Tensor& w_div,
                       const std::optional<at::Tensor>& w_z, const RowsArgs& a, const at::Tensor& logits) {
  TORCH_CHECK(!a.has_ce || w_ce.has_value(), "w_ce is required with has_ce");
  return RowWeights{a.has_ce ? row_weight(*w_ce, a, logits, "w_ce") : nullptr, row_weight(w_div, a, logits, "w_div"),
                    w_z.has_value() ? row_weight(*w_z, a, logits, "w_z") : nullptr};
}

GradArgs grad_args(const at::Tensor& grad, const at::Tensor& grad_row_off, const RowsArgs& a, const at::Tensor& logits) {
  TORCH_CHECK(grad.device() == logits.device(), "grad must be on the logits' device");
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type() && grad.sizes() == logits.sizes(),
              "grad must match logits in shape and dtype");
  check_offsets(grad_row_off, logits, "grad_row_off");
  TORCH_CHECK(grad_row_off.numel() == a.N, "grad_row_off must have one entry per row");
  return GradArgs{grad.data_ptr(), grad_row_off.const_data_ptr<int64_t>(), grad.stride(0), grad.stride(-1),
                  rows_vectorized(grad)};
}

void check_saved(const at::Tensor& t, const RowsArgs& a, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), name, " must be on the logits' device");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == a.K * a.N, name,
              " must be the contiguous float32 [K, N] tensor the forward saved");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& logits, const at::Tensor& row_off, const at::Tensor& target, bool js, double label_smoothing,
    bool has_ce, double logit_scale, double softcap, const std::optional<at::Tensor>& w_ce,
    const std::optional<at::Tensor>& w_div, const std::optional<at::Tensor>& w_z, const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& grad_row_off) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowsArgs a = rows_args(logits, row_off, target, js, label_smoothing, has_ce, logit_scale, softcap);
  std::optional<EarlyGrad> early;
  if (grad.has_value()) {
    // The one-pass forward: the gradient is written with weights known before the loss is.
    TORCH_CHECK(grad_row_off.has_value() && w_div.has_value(), "grad needs grad_row_off and w_div");
    early = EarlyGrad{row_weights(w_ce, *w_div, w_z, a, logits), grad_args(*grad, *grad_row_off, a, logits)};
  }
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor ce = at::empty({a.N}, f32), div = at::empty({a.N}, f32), lse = at::empty({a.K, a.N}, f32),
             stat = at::empty({a.K, a.N}, f32);
  const cudaError_t err = intradistill::launch_forward(a, ce.data_ptr<float>(), div.data_ptr<float>(),
                                                       lse.data_ptr<float>(), stat.data_ptr<float>(),
                                                       early ? &*early : nullptr,
                                                       c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "intradistill forward kernel: ", cudaGetErrorString(err));
  return {ce, div, lse, stat};
}

void backward(const at::Tensor& logits, const at::Tensor& row_off, const at::Tensor& target, const at::Tensor& lse,
              const at::Tensor& stat, const at::Tensor& w_ce, const at::Tensor& w_div,
              const std::optional<at::Tensor>& w_z, bool js, double label_smoothing, bool has_ce, double logit_scale,
              double softcap, at::Tensor grad, const at::Tensor& grad_row_off) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowsArgs a = rows_args(logits, row_off, target, js, label_smoothing, has_ce, logit_scale, softcap);
  check_saved(lse, a, logits, "lse");
  check_saved(stat, a, logits, "stat");
  const RowWeights w = row_weights(w_ce, w_div, w_z, a, logits);
  const GradArgs g = grad_args(grad, grad_row_off, a, logits);
  const cudaError_t err = intradistill::launch_backward(a, lse.const_data_ptr<float>(), stat.const_data_ptr<float>(),
                                                        w, g, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "intradistill backward kernel: ", cudaGetErrorString(err));
}

int64_t max_passes(const at::Tensor&) { return intradistill::kMaxPasses; }

}  // namespace

TORCH_LIBRARY_IMPL(intradistill_cpp, CUDA, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
  m.impl("max_passes", &max_passes);
}
