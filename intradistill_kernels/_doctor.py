"""doctor(): what this installation can run, and why not where it cannot.

Printed by `python -m intradistill_kernels`. It answers the questions of a slow or failing setup:
which versions are installed, which devices torch sees, which fused backend `backend="auto"` can
use on each device, and, for one that cannot be used, the reason (the C++ compiler's error, a
missing triton, no GPU, ...), plus where the C++ library was loaded from.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import TextIO

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
    from .ops.registry import AUTO_ORDER, FALLBACK, NAMES, get, unavailable_reason

    lines = [f"intradistill-kernels {__version__} ({os.path.dirname(package_file)})"]
    lines += _versions(torch)
    lines += ["", "devices"] + _devices(torch)
    settings = [f"  {name}={os.environ[name]}" for name in ENV_VARS if name in os.environ]
    if settings:
        lines += ["", "settings"] + settings
    order = "; ".join(f"{', then '.join(names)} on {device.upper() if device == 'cpu' else 'CUDA'} tensors"
                      for device, names in AUTO_ORDER.items())
    lines += ["", f"backends (backend='auto' uses {order}; {FALLBACK} otherwise)"]
    for name in NAMES:
        reason = unavailable_reason(name)
        lines.append(f"  {name:<7} " + ("available" if reason is None else f"unavailable: {reason}"))
        lines += [f"          {line}" for line in get(name).details()]
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
