"""Compile every Triton kernel variant the dispatcher can pick for sm_80 and sm_90, without a GPU.

The interpreter accepts code the real compiler rejects (Python control flow on tensor values,
non-constexpr shapes); this test makes CI catch that.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("aot_compile.py")


def _compile(*args):
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_variant_with_every_option_compiles_for_hopper():
    """The fast tier's one compile: both kernels with every flag and option on, bf16, sm_90,
    with the register, spill, vector-load and barrier checks."""
    out = _compile("--all-options", "bfloat16", "90")
    assert out.count("compiled 1 variants of") == 2, out


@pytest.mark.full
@pytest.mark.parametrize("cap", [80, 90])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("kernel_name", ["_forward_kernel", "_backward_kernel"])
def test_kernels_compile_for_gpu(cap, dtype, kernel_name):
    assert "compiled" in _compile(kernel_name, dtype, str(cap))
