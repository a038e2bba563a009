"""Peak extra memory of a contender's forward+backward: the CUDA allocator's peak on GPU, the
rise of the resident high-water mark in a fresh process on CPU (the CPU allocator keeps no peak)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from .measure import mode_callables

# the repository root (it holds the package and benchmarks/): a fresh process imports the same copy
PACKAGE_PARENT = Path(__file__).resolve().parents[1]

_CONTENDER_PROBE = r"""
import gc, json, torch
from benchmarks import contenders as C, measure as M, memory as R
k, n, v, dtype, name = {k}, {n}, {v}, getattr(torch, {dtype!r}), {name!r}
fn = dict((key, f) for key, (f, _) in C.contenders("cpu", k, with_compile=False).items())[name]
small = M.make_inputs(k, 8, 64, dtype, "cpu")
M.mode_callables(fn, *small, "forward+backward")()  # loads libraries and extensions, tiny peak
logits, target = M.make_inputs(k, n, v, dtype, "cpu")
gc.collect()
base = R.reset_peak_rss()
M.mode_callables(fn, logits, target, "forward+backward")()
print(json.dumps(R.peak_rss() - base))
"""


def run_fresh_process(code: str, timeout: float):
    """Runs `code` in a new interpreter that imports this copy of the package and returns the
    JSON value on its last line of output; RuntimeError with its stderr when it fails."""
    preamble = f"import sys\nsys.path.insert(0, {str(PACKAGE_PARENT)!r})\n"
    run = subprocess.run([sys.executable, "-c", preamble + code], capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Resets this process's resident high-water mark to its current RSS (Linux clear_refs) and
    returns that RSS. (getrusage's ru_maxrss cannot be used: it survives exec, so a child
    started by a large parent inherits the parent's peak.)"""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    return _status_bytes("VmHWM")


def peak_extra_bytes(name, k, n, v, dtype, device, fn, logits, target) -> float | None:
    """Peak memory of forward+backward beyond the inputs; None where it cannot be measured."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        mode_callables(fn, logits, target, "forward+backward")()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    if "compile" in name:
        return None  # a fresh process would measure the compiler, not the kernel
    code = _CONTENDER_PROBE.format(k=k, n=n, v=v, dtype=str(dtype).split(".")[-1], name=name)
    try:
        return float(run_fresh_process(code, timeout=900))
    except RuntimeError:
        return None
