"""Fused backends. Each backend object implements the interface documented in
ops/triton/__init__.py: is_available(), supports(tensor), forward(...), backward(...)."""

from __future__ import annotations

import importlib

# name -> (module, attribute or None for the module itself); a backend whose module fails to
# import counts as unavailable.
BACKENDS = {
    "triton": ("intradistill_kernels.ops.triton", None),
    "cuda": ("intradistill_kernels.ops.cpp", "cuda_backend"),
    "cpu": ("intradistill_kernels.ops.cpp", "cpu_backend"),
}


def backend_impl(name: str):
    module_name, attr = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return module if attr is None else getattr(module, attr, None)


def backend_available(name: str) -> bool:
    if name == "torch":
        return True
    impl = backend_impl(name)
    return impl is not None and impl.is_available()


def unavailable_reason(name: str) -> str | None:
    """Why a backend cannot be used in this process (None when it can): the C++ build error,
    "triton not installed", "no CUDA device and TRITON_INTERPRET unset", ... Loads (or builds)
    the backend on the first call, like backend_available; later calls are dictionary lookups."""
    if name == "torch":
        return None
    if name not in BACKENDS:
        raise ValueError(f"name must be one of {list(BACKENDS) + ['torch']}, got {name!r}")
    if name == "triton":
        return _triton_reason()
    module_name = BACKENDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"{module_name} failed to import: {exc}"
    impl = getattr(module, BACKENDS[name][1])
    if impl.is_available():
        return None
    return impl.unavailable_reason() or "not available here"


def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton not installed (pip install triton)"
    except Exception as exc:  # a broken install (mismatched torch/triton, missing driver libraries)
        return f"triton failed to import: {type(exc).__name__}: {exc}"
    if backend_available("triton"):
        return None
    return "no CUDA device and TRITON_INTERPRET unset"
