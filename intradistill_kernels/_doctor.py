"""doctor(): what this installation can run, and why not where it cannot.

Printed by `python -m intradistill_kernels`. It answers the questions of a slow or failing setup:
which versions are installed, which devices torch sees, which fused backend `backend="auto"` can
use on each device, and, for one that cannot be used, the reason (the C++ compiler's error, a
missing triton, no GPU, ...), plus where the C++ library was loaded from.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from importlib import metadata
from typing import TextIO

ORDER = ("triton", "cuda", "cpu", "torch")
# Settings that change what the backends do; printed when set.
ENV_VARS = ("TRITON_INTERPRET", "INTRADISTILL_DISABLE_CPP", "TORCH_EXTENSIONS_DIR", "CUDA_HOME", "CXX",
            "CUDA_VISIBLE_DEVICES")


def doctor(file: TextIO | None = None) -> None:
    """Prints versions, devices, each backend's availability (and why not) and where the C++
    library was loaded from. Loads, or on first use builds, the backends to find out."""
    print("\n".join(report_lines()), file=file or sys.stdout, flush=True)


def report_lines() -> list[str]:
    import torch

    from . import __file__ as package_file, __version__
    from .ops import unavailable_reason

    lines = [f"intradistill-kernels {__version__} ({os.path.dirname(package_file)})"]
    lines += _versions(torch)
    lines += ["", "devices"] + _devices(torch)
    settings = [f"  {name}={os.environ[name]}" for name in ENV_VARS if name in os.environ]
    if settings:
        lines += ["", "settings"] + settings
    lines += ["", "backends (backend='auto' uses triton, then cuda, on CUDA tensors; cpu on CPU tensors; "
              "torch otherwise)"]
    for name in ORDER:
        reason = unavailable_reason(name)
        lines.append(f"  {name:<7} " + ("available" if reason is None else f"unavailable: {reason}"))
        lines += [f"          {line}" for line in _details(name, reason)]
    return lines


def _versions(torch) -> list[str]:
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    rows = [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__} ({cuda})"),
        ("triton", _version("triton")),
        ("transformers", _version("transformers")),
    ]
    return [f"  {name:<13}{value}" for name, value in rows]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices(torch) -> list[str]:
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    lines = [f"  cpu     {_cpu_model()}, {cores} cores ({usable} usable, torch uses {torch.get_num_threads()} threads)"]
    if torch.version.cuda is None:
        lines.append("  cuda    none (this torch has no CUDA)")
    elif not torch.cuda.is_available():
        lines.append("  cuda    none visible to torch")
    else:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i:<3} {props.name}, capability {props.major}.{props.minor}, "
                         f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
    return lines


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _details(name: str, reason: str | None) -> list[str]:
    """Extra lines under a backend: where its library came from, what it needs to build, and the
    full build error when the one-line reason left part of it out."""
    if name == "triton":
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        return ["TRITON_INTERPRET is set: the kernels run in the (slow) interpreter on CPU tensors"] \
            if reason is None and interpret else []
    if name == "torch":
        return ["the eager reference (intradistill_kernels/reference.py): slower, more memory"]
    from .ops import cpp

    lines = []
    origin = cpp.library_origin(name)
    if origin is not None:
        lines.append(f"loaded from the {origin}")
    if cpp.aot_skipped(name):
        lines.append(cpp.aot_skipped(name))
    if reason is not None:
        error = cpp.build_error(name) or ""
        if error and error != reason:
            lines.append("build error:")
            lines += [f"  {line}" for line in error.splitlines()[-40:]]
        if _could_build(name):
            lines += _build_tools(name)
    return lines


def _could_build(name: str) -> bool:
    """Whether a build was attempted, so that the tools it needs are worth listing."""
    import torch

    if os.environ.get("INTRADISTILL_DISABLE_CPP", "0") not in ("", "0"):
        return False
    return name == "cpu" or torch.cuda.is_available()


def _build_tools(name: str) -> list[str]:
    if name == "cpu":
        compiler = os.environ.get("CXX", "c++")
        tools = {f"C++ compiler ({compiler})": shutil.which(compiler), "ninja": shutil.which("ninja")}
    else:
        tools = {"nvcc": shutil.which("nvcc") or _cuda_home_nvcc()}
    return [f"{tool}: {path or 'not found'}" for tool, path in tools.items()]


def _cuda_home_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    path = os.path.join(home, "bin", "nvcc") if home else None
    return path if path and os.path.exists(path) else None
