// Connects the raw-pointer CUDA kernels (cuda_kernel.cu) to the intradistill_cpp operators that
// cpu_kernel.cpp defines; built only where torch has CUDA and nvcc is found (ops/cpp.py).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda_kernel.h"

namespace {

using intradistill::DType;
using intradistill::RowsArgs;

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

RowsArgs rows_args(const at::Tensor& logits, const at::Tensor& row_off, const at::Tensor& target, bool js,
                   double eps, bool has_ce) {
  TORCH_CHECK(logits.is_cuda() && row_off.is_cuda() && target.is_cuda(), "intradistill cuda kernel: CUDA tensors expected");
  TORCH_CHECK(row_off.scalar_type() == at::kLong && row_off.is_contiguous(), "row_off must be contiguous int64");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous(), "target must be contiguous int64");
  TORCH_CHECK(logits.size(0) >= 2 && logits.size(0) <= intradistill::kMaxPasses,
              "intradistill cuda kernel supports 2 to ", intradistill::kMaxPasses, " passes, got ", logits.size(0));
  return RowsArgs{logits.const_data_ptr(), row_off.const_data_ptr<int64_t>(), target.const_data_ptr<int64_t>(),
                  logits.size(0), row_off.numel(), logits.size(-1), logits.stride(0), logits.stride(-1),
                  static_cast<float>(eps), js, has_ce, rows_vectorized(logits), dtype_of(logits)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& logits, const at::Tensor& row_off, const at::Tensor& target, bool js, double eps, bool has_ce) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowsArgs a = rows_args(logits, row_off, target, js, eps, has_ce);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor ce = at::empty({a.N}, f32), div = at::empty({a.N}, f32), lse = at::empty({a.K, a.N}, f32),
             stat = at::empty({a.K, a.N}, f32);
  const cudaError_t err = intradistill::launch_forward(a, ce.data_ptr<float>(), div.data_ptr<float>(),
                                                       lse.data_ptr<float>(), stat.data_ptr<float>(),
                                                       c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "intradistill forward kernel: ", cudaGetErrorString(err));
  return {ce, div, lse, stat};
}

void backward(const at::Tensor& logits, const at::Tensor& row_off, const at::Tensor& target, const at::Tensor& lse,
              const at::Tensor& stat, const at::Tensor& g_ce, const at::Tensor& g_div, bool js, double eps, bool has_ce,
              at::Tensor grad, const at::Tensor& grad_row_off) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowsArgs a = rows_args(logits, row_off, target, js, eps, has_ce);
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type() && grad.sizes() == logits.sizes(),
              "grad must match logits in shape and dtype");
  for (const at::Tensor* t : {&lse, &stat, &g_ce, &g_div})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "saved statistics must be contiguous float32");
  const cudaError_t err = intradistill::launch_backward(
      a, lse.const_data_ptr<float>(), stat.const_data_ptr<float>(), g_ce.const_data_ptr<float>(),
      g_div.const_data_ptr<float>(), grad.data_ptr(), grad_row_off.const_data_ptr<int64_t>(), grad.stride(0),
      grad.stride(-1), rows_vectorized(grad), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "intradistill backward kernel: ", cudaGetErrorString(err));
}

int64_t max_passes(const at::Tensor&) { return intradistill::kMaxPasses; }

}  // namespace

TORCH_LIBRARY_IMPL(intradistill_cpp, CUDA, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
  m.impl("max_passes", &max_passes);
}
