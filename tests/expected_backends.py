"""Which fused backends must be available on this machine: a backend that should build and does
not fails the tests that need it, instead of turning them into skips."""

from __future__ import annotations

import os
import shutil

import pytest

from intradistill_kernels.ops import available as backend_available, unavailable_reason


def why_absent(name: str) -> str | None:
    """Why backend `name` may be missing here, or None where it must be there: Triton runs
    everywhere in the suite (compiled on a GPU, interpreted elsewhere: conftest.py) and the C++
    cpu backend builds wherever a C++ compiler exists, unless INTRADISTILL_DISABLE_CPP asks
    otherwise. The cuda backend is checked on a GPU machine (tests/test_gpu_runtime.py)."""
    if name == "cpu":
        if os.environ.get("INTRADISTILL_DISABLE_CPP", "0") not in ("", "0"):
            return "INTRADISTILL_DISABLE_CPP is set"
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            return f"no C++ compiler (CXX={compiler})"
        return None
    if name == "cuda":
        return "the cuda backend needs a GPU, torch with CUDA and nvcc (tests/test_gpu_runtime.py checks it there)"
    return None


def require(name: str) -> None:
    """Skips the calling test where backend `name` may be absent and is; fails it where the
    backend should be available and is not."""
    if backend_available(name):
        return
    why = why_absent(name)
    if why is None:
        pytest.fail(f"backend {name} unavailable: {unavailable_reason(name)}")
    pytest.skip(f"backend {name} unavailable: {why}")
