"""The one registry of backends: every backend is an object behind the interface of
ops/backend.py, and nothing outside this module refers to one by name."""

from __future__ import annotations

import importlib

from .backend import Backend

# name -> (module, attribute); fastest first. A backend whose module fails to import counts as
# unavailable (with the import error as the reason).
_WHERE = {
    "triton": ("intradistill_kernels.ops.triton", "backend"),
    "cuda": ("intradistill_kernels.ops.cpp", "cuda_backend"),
    "cpu": ("intradistill_kernels.ops.cpp", "cpu_backend"),
    "torch": ("intradistill_kernels.ops.eager", "backend"),
}
NAMES = tuple(_WHERE)
# The fused backends backend="auto" tries, in order, for tensors on each device type; "torch"
# takes whatever none of them takes.
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
FALLBACK = "torch"


def _import(name: str):
    module_name, attr = _WHERE[name]
    try:
        return getattr(importlib.import_module(module_name), attr), None
    except ImportError as exc:
        return None, f"{module_name} failed to import: {exc}"


def get(name: str) -> Backend:
    """The backend object (ValueError for an unknown name; it may still be unavailable)."""
    if name not in _WHERE:
        raise ValueError(f"backend must be one of {list(NAMES)}, got {name!r}")
    impl, reason = _import(name)
    if impl is None:
        raise ValueError(f"backend {name!r} is not usable here: {reason}")
    return impl


def unavailable_reason(name: str) -> str | None:
    """Why a backend cannot be used in this process (None when it can): the C++ build error,
    "triton not installed", "no CUDA device and TRITON_INTERPRET unset", ... Loads (or builds)
    the backend on the first call; later calls are dictionary lookups."""
    if name not in _WHERE:
        raise ValueError(f"name must be one of {list(NAMES)}, got {name!r}")
    impl, reason = _import(name)
    return reason if impl is None else impl.unavailable_reason()


def available(name: str) -> bool:
    return unavailable_reason(name) is None


def available_names() -> list[str]:
    """Backends usable in this process, fastest first; "torch" is always there."""
    return [n for n in NAMES if available(n)]
