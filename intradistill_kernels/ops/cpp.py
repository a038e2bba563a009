"""Loader of the C++ extension (csrc/): the "cpu" backend and, where torch has CUDA and nvcc is
found, the "cuda" backend. Both implement the interface of ops/triton/__init__.py.

The extension is compiled on first use with torch.utils.cpp_extension.load (ninja) into torch's
extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so installing the
package needs no compiler and never builds against a second torch; later imports reuse the build.
Set INTRADISTILL_DISABLE_CPP=1 to skip it.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
_lock = threading.Lock()
_state: dict[str, object] = {}


def _sources_dir() -> Path:
    # Editable installs and source checkouts have csrc/ beside the package; wheels ship it inside.
    inside = Path(__file__).resolve().parent / "csrc"
    return inside if inside.exists() else CSRC


def _build(kind: str) -> bool:
    """Builds (or loads from the cache) one part of the extension; remembers failures."""
    with _lock:
        if kind in _state:
            return _state[kind] is True
        ok = False
        try:
            if os.environ.get("INTRADISTILL_DISABLE_CPP", "0") not in ("", "0"):
                raise RuntimeError("disabled by INTRADISTILL_DISABLE_CPP")
            ok = _compile(kind)
        except Exception as exc:  # no compiler, no ninja, no nvcc...: the backend is unavailable
            _state[f"{kind}_error"] = f"{type(exc).__name__}: {exc}"
        _state[kind] = ok
        return ok


def _compile(kind: str) -> bool:
    from torch.utils.cpp_extension import load

    src = _sources_dir()
    if kind == "cpu":
        if shutil.which("c++") is None and shutil.which("g++") is None:
            raise RuntimeError("no C++ compiler found")
        sources = [src / "cpu_kernel.cpp"]
        # -fno-trapping-math lets GCC vectorise floor() in fast_exp; neither flag changes IEEE results.
        # -fopenmp: at::parallel_for is an inline OpenMP loop in torch's headers; without the flag it
        # silently runs on one thread.
        flags = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
        name = "intradistill_kernels_cpu"
        extra = {"extra_ldflags": ["-fopenmp"]}
    else:
        if not torch.cuda.is_available() or torch.version.cuda is None:
            raise RuntimeError("torch has no CUDA device")
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME)")
        if not _build("cpu"):  # the CPU library defines the operators the CUDA one implements
            raise RuntimeError(f"the cpu part failed first: {build_error('cpu')}")
        sources = [src / "cuda_binding.cpp", src / "cuda_kernel.cu"]
        flags = ["-O3"]
        name = "intradistill_kernels_cuda"
        extra = {"extra_cuda_cflags": ["-O3", "--use_fast_math", "-lineinfo"]}
    if not _cached(name):
        print(f"intradistill-kernels: building the {kind} extension (first use only, about a minute)...",
              file=sys.stderr, flush=True)
    load(name=name, sources=[str(s) for s in sources], extra_cflags=flags, is_python_module=False,
         verbose=False, **extra)
    return True


def _cached(name: str) -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:  # a private helper of torch: only decides whether to print a notice
        return False


def build_error(kind: str) -> str | None:
    """Why a backend could not be built, if it could not."""
    return _state.get(f"{kind}_error")  # type: ignore[return-value]


class _Backend:
    def __init__(self, kind: str):
        self.kind = kind

    def is_available(self) -> bool:
        return _build(self.kind)

    def supports(self, t: torch.Tensor) -> bool:
        return t.device.type == self.kind

    # The CUDA kernels keep a token's K rows in registers, instantiated up to this many passes.
    max_passes = None

    def forward(self, logits, row_off, target, js, label_smoothing, has_ce):
        return torch.ops.intradistill_cpp.forward(logits, row_off, target, bool(js), float(label_smoothing), bool(has_ce))

    def backward(self, logits, row_off, target, lse, stat, g_ce, g_div, js, label_smoothing, has_ce, grad, grad_row_off):
        torch.ops.intradistill_cpp.backward(logits, row_off, target, lse, stat, g_ce, g_div, bool(js),
                                            float(label_smoothing), bool(has_ce), grad, grad_row_off)


cpu_backend = _Backend("cpu")
cuda_backend = _Backend("cuda")
cuda_backend.max_passes = 8  # kMaxPasses in csrc/cuda_kernel.h
