"""The CUDA kernels compile with nvcc for sm_80 and sm_90 (no GPU needed), without register spill
and within the registers their launch bounds promise.

csrc/cuda_kernel.cu depends on raw pointers and CUDA headers only, so a CUDA syntax or type error
cannot land even where torch has no CUDA. The torch glue (csrc/cuda_binding.cpp) needs a CUDA build
of torch and is compiled where the "cuda" backend is built.
"""

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


def launch_assumption(source: str) -> tuple[int, int]:
    """(threads per block, blocks per SM) that the kernels' __launch_bounds__ promise: the
    occupancy the launch configuration assumes, read from the source so that the check follows it."""
    threads = int(re.search(r"constexpr int kThreads = (\d+);", source).group(1))
    bounds = set(re.findall(r"__launch_bounds__\(([^)]*)\)", source))
    assert bounds, "kernels without __launch_bounds__: ptxas may then use registers for any block size"
    min_blocks = 1
    for b in bounds:
        args = [a.strip() for a in b.split(",")]
        assert args[0] == "kThreads", f"__launch_bounds__({b}) is not the launch's kThreads"
        if len(args) > 1:
            min_blocks = max(min_blocks, int(args[1]))
    return threads, min_blocks


def test_launch_assumption_is_read_from_the_source():
    assert launch_assumption("constexpr int kThreads = 128;\n__launch_bounds__(kThreads, 3) f") == (128, 3)
    assert launch_assumption("constexpr int kThreads = 256;\n__launch_bounds__(kThreads) f") == (256, 1)


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


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernel_compiles(arch, tmp_path):
    run = subprocess.run(
        [_nvcc(), "-std=c++17", "-O3", "--use_fast_math", "-Xptxas", "-v", f"-gencode=arch=compute_{arch},code=sm_{arch}",
         "-c", str(CSRC / "cuda_kernel.cu"), "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "kernel.o").stat().st_size > 0
    usage = parse_ptxas_verbose(run.stdout + run.stderr)
    assert usage, run.stderr
    # Every instantiation: no register spill (local-memory traffic on the streaming loop), and
    # registers that let the blocks __launch_bounds__ promises share an SM.
    spilled = [u for u in usage if u["spill_stores"] or u["spill_loads"]]
    assert not spilled, "\n".join(f"{u['name']}: {u}" for u in spilled)
    threads, blocks = launch_assumption((CSRC / "cuda_kernel.cu").read_text())
    budget = min(255, REGISTERS_PER_SM // (threads * blocks))
    over = [u for u in usage if u["registers"] > budget]
    assert not over, f"more than {budget} registers for {blocks} block(s) of {threads} threads: {over}"
