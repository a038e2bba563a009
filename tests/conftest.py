import os

# Decided before triton or the package is imported. Where a GPU exists the Triton kernels are
# compiled for it and the suite runs them on cuda tensors; the interpreter (Triton on CPU tensors)
# is only for machines without one. The NVML query answers without creating a CUDA context, so
# tests that fork worker processes still can.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # tests/test_properties.py skips itself
    pass
else:
    # The property tests draw this many problems per test: a handful in `make test`, many in
    # `make test-full` (pytest --hypothesis-profile=thorough). The kernels run in the Triton
    # interpreter here, so no draw meets a per-example deadline.
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("quick", max_examples=8, **_common)
    settings.register_profile("thorough", max_examples=200, **_common)
    settings.load_profile("quick")  # --hypothesis-profile, read after this file, overrides it
