"""The CUDA kernels compile with nvcc for sm_80 and sm_90 (no GPU needed), without register spill
and within the registers their launch bounds promise, and their torch glue compiles against this
torch's headers.

csrc/cuda_kernel.cu depends on raw pointers and CUDA headers only, so a CUDA syntax or type error
cannot land even where torch has no CUDA. The torch glue (csrc/cuda_binding.cpp) is linked only
where the "cuda" backend is built; here it is checked for syntax and types against torch's
headers (a CPU-only torch ships the CUDA headers of c10, all but one generated at build time).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import parse_ptxas_verbose

CSRC = Path(__file__).resolve().parents[1] / "csrc"
REGISTERS_PER_SM = 65536


def _nvcc():
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _cuda_include() -> Path:
    """The CUDA toolkit's headers (nvcc may be a wrapper script outside the toolkit)."""
    roots = [Path(_nvcc()).resolve().parents[1], Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))]
    dryrun = subprocess.run([_nvcc(), "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
    roots += [Path(m) for m in re.findall(r'TOP=(\S+)', dryrun)]
    for root in roots:
        if (root / "include" / "cuda_runtime_api.h").is_file():
            return root / "include"
    pytest.skip("the CUDA toolkit's headers were not found")


def launch_assumption(source: str) -> tuple[int, int]:
    """(threads per block, blocks per SM) that the kernels' __launch_bounds__ promise: the
    occupancy the launch configuration assumes, read from the source so that the check follows it.
    The blocks argument may be a literal or a `constexpr int` of the source."""
    threads = int(re.search(r"constexpr int kThreads = (\d+);", source).group(1))
    bounds = set(re.findall(r"__launch_bounds__\(([^)]*)\)", source))
    assert bounds, "kernels without __launch_bounds__: ptxas may then use registers for any block size"
    min_blocks = 1
    for b in bounds:
        args = [a.strip() for a in b.split(",")]
        assert args[0] == "kThreads", f"__launch_bounds__({b}) is not the launch's kThreads"
        if len(args) > 1:
            named = re.search(rf"constexpr int {re.escape(args[1])} = (\d+);", source)
            min_blocks = max(min_blocks, int(named.group(1) if named else args[1]))
    return threads, min_blocks


def test_launch_assumption_is_read_from_the_source():
    assert launch_assumption("constexpr int kThreads = 128;\n__launch_bounds__(kThreads, 3) f") == (128, 3)
    assert launch_assumption("constexpr int kThreads = 256;\n__launch_bounds__(kThreads) f") == (256, 1)
    assert launch_assumption("constexpr int kThreads = 256;\nconstexpr int kMinBlocks = 2;\n"
                             "__launch_bounds__(kThreads, kMinBlocks) f") == (256, 2)


def test_ptxas_report_is_parsed():
    text = ("ptxas info    : Function properties for _Z3fwdILi8EEv\n"
            "    112 bytes stack frame, 8 bytes spill stores, 16 bytes spill loads\n"
            "ptxas info    : Used 128 registers, used 1 barriers, 112 bytes cumulative stack size\n"
            "ptxas info    : Function properties for _Z3bwdv\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
            "ptxas info    : Used 64 registers, used 0 barriers\n")
    assert parse_ptxas_verbose(text) == [
        {"name": "_Z3fwdILi8EEv", "registers": 128, "stack": 112, "spill_stores": 8, "spill_loads": 16},
        {"name": "_Z3bwdv", "registers": 64, "stack": 0, "spill_stores": 0, "spill_loads": 0}]


@pytest.mark.full
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernel_compiles(arch, tmp_path):
    run = subprocess.run(
        [_nvcc(), "-std=c++17", "-O3", "--use_fast_math", "-Xptxas", "-v", f"-gencode=arch=compute_{arch},code=sm_{arch}",
         "-c", str(CSRC / "cuda_kernel.cu"), "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=1500,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "kernel.o").stat().st_size > 0
    usage = parse_ptxas_verbose(run.stdout + run.stderr)
    # forward (statistics only and one-pass) and backward, per dtype x K bound x vector loads.
    assert len(usage) == 3 * 3 * 2 * 3, run.stderr
    # Every instantiation: no register spill (local-memory traffic on the streaming loop) and no
    # stack (a per-pass array indexed at run time lives in local memory), and registers that let
    # the blocks __launch_bounds__ promises share an SM.
    spilled = [u for u in usage if u["spill_stores"] or u["spill_loads"] or u["stack"]]
    assert not spilled, "\n".join(f"{u['name']}: {u}" for u in spilled)
    threads, blocks = launch_assumption((CSRC / "cuda_kernel.cu").read_text())
    budget = min(255, REGISTERS_PER_SM // (threads * blocks))
    over = [u for u in usage if u["registers"] > budget]
    assert not over, f"more than {budget} registers for {blocks} block(s) of {threads} threads: {over}"


@pytest.mark.full
@pytest.mark.skipif(_nvcc() is None or shutil.which("c++") is None, reason="nvcc or a C++ compiler missing")
def test_cuda_binding_compiles_against_torch(tmp_path):
    from torch.utils.cpp_extension import include_paths

    # Generated by a CUDA build of torch; its macros only matter when linking c10_cuda itself.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    includes = [f"-I{p}" for p in [tmp_path, *include_paths(), _cuda_include()]]
    run = subprocess.run(["c++", "-std=c++20", "-fsyntax-only", "-Werror=return-type", *includes,
                          str(CSRC / "cuda_binding.cpp")], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-6000:]
