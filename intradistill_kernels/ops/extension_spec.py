"""What the C++ extension is built from and with, in one place for both of its builds: the
first-use build (ops/cpp.py, torch.utils.cpp_extension.load) and the ahead-of-time build at
install time (setup.py with INTRADISTILL_BUILD_EXT=1).

This module imports neither torch nor the package: setup.py loads it by file path, so a default
install stays pure Python and never imports (or pulls into build isolation) a torch.

A build's identity (sources, torch version, flags and, for -march=native, the CPU's instruction
set) names the first-use build directory and is recorded next to an ahead-of-time library, so a
library is only ever loaded by the torch, sources and CPU it was compiled for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

PARTS = ("cpu", "cuda")

# Files of csrc/ each part compiles; its headers only feed the identity (cpp_extension.load
# compiles .cpp/.cu files and finds headers next to them).
SOURCES = {"cpu": ("cpu_kernel.cpp",), "cuda": ("cuda_binding.cpp", "cuda_kernel.cu")}
HEADERS = {"cpu": (), "cuda": ("cuda_kernel.h",)}
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")

# First-use builds: torch's extension cache holds <name>_<identity hash>/<name>_<hash>.so.
FIRST_USE_NAMES = {"cpu": "intradistill_kernels_cpu", "cuda": "intradistill_kernels_cuda"}
# Ahead-of-time builds: intradistill_kernels/<module><EXT_SUFFIX>, described by AOT_INFO beside it.
AOT_MODULES = {"cpu": "_cpu_ops", "cuda": "_cuda_ops"}
AOT_INFO = "_aot_build.json"

# -march for an ahead-of-time build. "native" (the default) suits `pip install` on the machine
# that runs the code; a wheel meant for other machines needs a baseline such as x86-64-v3.
ARCH_ENV = "INTRADISTILL_CPU_ARCH"


def csrc_files(csrc: Path) -> list[Path]:
    """Every source and header of csrc/: what a wheel or sdist must carry."""
    return sorted(p for p in Path(csrc).iterdir() if p.is_file() and p.suffix in SOURCE_SUFFIXES)


def cxx_flags(kind: str, arch: str = "native") -> list[str]:
    if kind == "cpu":
        # -fno-trapping-math lets GCC vectorise floor() in fast_exp; neither it nor -fno-math-errno
        # changes IEEE results. -fopenmp: at::parallel_for is an inline OpenMP loop in torch's
        # headers; without the flag it silently runs on one thread.
        return ["-O3", f"-march={arch}", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    return ["-O3"]


def cuda_flags(kind: str) -> list[str]:
    return ["-O3", "--use_fast_math", "-lineinfo"] if kind == "cuda" else []


def ld_flags(kind: str) -> list[str]:
    return ["-fopenmp"] if kind == "cpu" else []


def cpu_features() -> str | None:
    """The instruction-set flags of this CPU (Linux), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return None


def _digest(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(len(chunk).to_bytes(8, "little"))
        h.update(chunk)
    return h.hexdigest()[:16]


def build_identity(kind: str, csrc: Path, torch_version: str, cxx: list[str], cuda: list[str]) -> dict:
    """What a library of this part depends on; two builds with equal identities are the same."""
    files = [Path(csrc) / name for name in SOURCES[kind] + HEADERS[kind]]
    sources = _digest(*(part for f in files for part in (f.name.encode(), f.read_bytes())))
    native = any(flag == "-march=native" for flag in cxx)
    cpu = _digest(cpu_features().encode()) if native and cpu_features() is not None else None
    return {"sources": sources, "torch": torch_version, "cxx": list(cxx), "cuda": list(cuda), "cpu": cpu}


def identity_key(identity: dict) -> str:
    return _digest(json.dumps(identity, sort_keys=True).encode())


def identity_mismatch(recorded: dict, current: dict) -> list[str]:
    """The parts of a recorded identity that differ from the current one, in words."""
    words = {"sources": "other sources", "torch": f"torch {recorded.get('torch')}", "cxx": "other flags",
             "cuda": "other flags", "cpu": "another CPU (-march=native)"}
    return list(dict.fromkeys(words[k] for k in words if recorded.get(k) != current.get(k)))
