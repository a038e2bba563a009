"""Compile every Triton kernel variant the dispatcher can pick for sm_80 and sm_90, without a GPU.

The interpreter accepts code the real compiler rejects; this test makes CI catch that.
"""

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from intradistill_kernels.ops.triton import kernels, launch_config  # noqa: E402

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# (K, V) pairs covering every K_PAD and both the tiny-V and the looping-V block shapes.
SHAPES = [(2, 3), (3, 32000), (4, 128256), (5, 50257), (8, 1000)]
FLAGS = [  # (HAS_CE, SMOOTH, JS) as the dispatcher combines them
    (False, False, False), (False, False, True), (True, False, False), (True, True, False),
    (True, False, True), (True, True, True),
]


def _signature(kernel, dtype, cfg):
    sig, constexprs = {}, {}
    for name in kernel.arg_names:
        if name in cfg:
            sig[name], constexprs[name] = "constexpr", cfg[name]
        elif name in ("HAS_CE", "SMOOTH", "JS"):
            sig[name] = "constexpr"
        elif name == "logits_ptr" or name == "grad_ptr":
            sig[name] = "*" + dtype
        elif name.endswith("row_off_ptr"):
            sig[name] = "*i64"
        elif name == "target_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "label_smoothing":
            sig[name] = "fp32"
        elif name.startswith("stride") or name.startswith("grad_stride"):
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig, constexprs


@pytest.mark.parametrize("cap", [80, 90])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kernel_name", ["_forward_kernel", "_backward_kernel"])
def test_kernels_compile_for_gpu(cap, dtype, kernel_name):
    kernel = getattr(kernels, kernel_name)
    # Every flag combination on one shape, every shape with the two heaviest combinations.
    combos = [((3, 32000), f) for f in FLAGS] + [(s, f) for s in SHAPES for f in FLAGS[-3:-1:1] if s != (3, 32000)]
    for (k, v), (has_ce, smooth, js) in combos:
        cfg = launch_config(k, v)
        num_warps = cfg.pop("num_warps")
        sig, constexprs = _signature(kernel, DTYPES[dtype], cfg)
        constexprs.update(HAS_CE=has_ce, SMOOTH=smooth, JS=js)
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": num_warps})
        assert ".entry" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0
