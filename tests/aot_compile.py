"""Compiles the Triton kernels ahead of time for a GPU target, with the real compiler.

Run as a script (tests/test_compile_ahead.py does) so that TRITON_INTERPRET is off from the first
import of triton: the interpreter, which the rest of the suite uses, patches triton's own modules.

    python tests/aot_compile.py KERNEL DTYPE CAPABILITY
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from intradistill_kernels.ops.triton import kernels, launch_config  # noqa: E402

TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# (K, V) pairs covering every K_PAD and both the tiny-V and the looping-V block shapes.
SHAPES = [(2, 3), (3, 32000), (4, 128256), (5, 50257), (8, 1000)]
FLAGS = [  # (HAS_CE, SMOOTH, JS) as the dispatcher combines them
    (False, False, False), (False, False, True), (True, False, False), (True, True, False),
    (True, False, True), (True, True, True),
]


def signature(kernel, dtype, constexprs):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("logits_ptr", "grad_ptr"):
            sig[name] = "*" + TRITON_DTYPES[dtype]
        elif name.endswith("row_off_ptr") or name == "target_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "label_smoothing":
            sig[name] = "fp32"
        elif "stride" in name:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def variants():
    """Every flag combination on one shape, every shape with the two heaviest combinations, and
    the strided layouts the host can pass (any alignment, vocabulary stride != 1)."""
    yield from (((3, 32000), f, None, True) for f in FLAGS)
    yield from ((s, f, None, True) for s in SHAPES if s != (3, 32000) for f in FLAGS[3:5])
    yield from (((3, 32000), FLAGS[3], a, False) for a in (1, 2, 4))


def compile_variant(kernel, dtype, cap, shape, flags, align, contiguous):
    """As the launcher specialises at run time: a unit vocabulary stride becomes a constant,
    pointers and 16-divisible integers carry tt.divisibility."""
    cfg = launch_config(*shape, ELEMENT_BYTES[dtype])
    num_warps = cfg.pop("num_warps")
    has_ce, smooth, js = flags
    constexprs = dict(cfg, HAS_CE=has_ce, SMOOTH=smooth, JS=js, ALIGN=align or 16 // ELEMENT_BYTES[dtype])
    divisible = [n for n in kernel.arg_names if n.endswith("_ptr")]
    if contiguous:
        constexprs.update({n: 1 for n in ("stride_v", "grad_stride_v") if n in kernel.arg_names})
        divisible += [n for n in ("stride_k", "grad_stride_k") if n in kernel.arg_names]
        if shape[1] % 16 == 0:
            divisible.append("V")
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs), constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": num_warps})


def main(kernel_name, dtype, cap):
    kernel = getattr(kernels, kernel_name)
    count = 0
    for shape, flags, align, contiguous in variants():
        compiled = compile_variant(kernel, dtype, cap, shape, flags, align, contiguous)
        ptx = compiled.asm["ptx"]
        assert ".entry" in ptx and len(compiled.asm["cubin"]) > 0
        if contiguous and shape[1] % 16 == 0:
            # Aligned contiguous rows must be read with 16-byte vector loads (bandwidth), and
            # the reductions over passes must stay in registers: no barrier in the backward.
            assert "ld.global.v4" in ptx, f"no 16-byte loads in {kernel_name} {dtype} {shape} {flags}"
            if kernel_name == "_backward_kernel":
                assert "bar.sync" not in ptx, f"barrier in {kernel_name} {dtype} {shape} {flags}"
        count += 1
    print(f"compiled {count} variants of {kernel_name} for {dtype} on sm_{cap}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
