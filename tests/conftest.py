import os

# Decided before triton or the package is imported. Where a GPU exists the Triton kernels are
# compiled for it and the suite runs them on cuda tensors; the interpreter (Triton on CPU tensors)
# is only for machines without one. The NVML query answers without creating a CUDA context, so
# tests that fork worker processes still can.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
