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
