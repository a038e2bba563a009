"""Compiles the Triton kernels ahead of time for a GPU target, with the real compiler.

Run as a script (tests/test_compile_ahead.py does) so that TRITON_INTERPRET is off from the first
import of triton: the interpreter, which the rest of the suite uses, patches triton's own modules.

    python tests/aot_compile.py KERNEL DTYPE CAPABILITY            every variant of KERNEL
    python tests/aot_compile.py --all-options DTYPE CAPABILITY     both kernels, every option on
"""

import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from helpers import parse_ptxas_verbose  # noqa: E402  (this script's folder is on sys.path)
from intradistill_kernels.ops.triton import (  # noqa: E402
    MIN_PROGRAMS_PER_SM, kernels, launch_config, programs_per_sm, register_limit,
)

# Registers and spills are read (ptxas -v, 0.4 s a variant) for the Hopper target the performance
# is judged on; sm_80 is compiled only.
RESOURCE_CHECKED_CAPS = (90,)


def programs_per_sm_assumed(kernel_name, shape, flags, options=None, dtype_bytes=4) -> int:
    """The occupancy the launcher assumes for this variant (ops/triton: programs_per_sm)."""
    options = options or {}
    return programs_per_sm(kernel_name == "_forward_kernel", shape[0], dtype_bytes, flags[1],
                           bool(options.get("SOFTCAP")), bool(options.get("EARLY")))


TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# (K, V) pairs covering every K from 2 to 8 (K is a compile-time constant), every K_PAD and both
# the tiny-V and the looping-V block shapes.
SHAPES = [(2, 3), (3, 32000), (4, 128256), (5, 50257), (6, 262144), (7, 152064), (8, 1000)]
FLAGS = [  # (HAS_CE, SMOOTH, JS) as the dispatcher combines them
    (False, False, False), (False, False, True), (True, False, False), (True, True, False),
    (True, False, True), (True, True, True),
]
# The logit transforms, the z-loss gradient and the one-pass forward all on: their code is a
# superset of every other combination of these constexprs (EARLY only exists in the forward).
ALL_OPTIONS = {"SCALE": True, "SOFTCAP": True, "HAS_Z": True, "EARLY": True}


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
        elif name in ("label_smoothing", "logit_scale", "softcap"):
            sig[name] = "fp32"
        elif "stride" in name:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


# The one variant of each kernel `make test` compiles: every flag and every option on, on an
# aligned contiguous row that loops over the vocabulary (the vector-load and barrier checks apply).
ALL_ON = ((3, 32000), FLAGS[5], None, True, ALL_OPTIONS)


def variants():
    """Every flag combination on one shape, every shape with the two heaviest combinations, and
    the strided layouts the host can pass (any alignment, vocabulary stride != 1)."""
    for options in ({}, ALL_OPTIONS):
        yield from (((3, 32000), f, None, True, options) for f in FLAGS)
        yield from ((s, f, None, True, options) for s in SHAPES if s != (3, 32000) for f in FLAGS[3:5])
        yield from (((3, 32000), FLAGS[3], a, False, options) for a in (1, 2, 4))


def compile_variant(kernel, dtype, cap, shape, flags, align, contiguous, options=None):
    """As the launcher specialises at run time: a unit vocabulary stride becomes a constant,
    pointers and 16-divisible integers carry tt.divisibility."""
    cfg = launch_config(*shape, ELEMENT_BYTES[dtype])
    num_warps = cfg.pop("num_warps")
    options_ = {"num_warps": num_warps}
    if kernel is kernels._forward_kernel:  # as the launcher: ops/triton forward_register_limit
        options_["maxnreg"] = register_limit(num_warps, programs_per_sm_assumed("_forward_kernel", shape, flags, options,
                                                                                ELEMENT_BYTES[dtype]))
    has_ce, smooth, js = flags
    constexprs = dict(cfg, HAS_CE=has_ce, SMOOTH=smooth, JS=js, ALIGN=align or 16 // ELEMENT_BYTES[dtype])
    constexprs.update({n: bool((options or {}).get(n)) for n in ALL_OPTIONS if n in kernel.arg_names})
    divisible = [n for n in kernel.arg_names if n.endswith("_ptr")]
    if contiguous:
        constexprs.update({n: 1 for n in ("stride_v", "grad_stride_v") if n in kernel.arg_names})
        divisible += [n for n in ("stride_k", "grad_stride_k") if n in kernel.arg_names]
        if shape[1] % 16 == 0:
            divisible.append("V")
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs), constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options_)


def register_budget(num_warps: int, programs_per_sm: int = MIN_PROGRAMS_PER_SM) -> int:
    return register_limit(num_warps, programs_per_sm)


def ptxas_usage(ptx: str, cap: int) -> dict:
    """Registers and spill bytes of the kernel in `ptx`, from `ptxas -v` (the compiled kernel
    only reports them once loaded on a GPU). Uses the ptxas Triton itself compiles with."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"  # Triton targets the arch-specific sm_90a
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([get_ptxas(cap).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    return parse_ptxas_verbose(run.stdout + run.stderr)[0]


def main(kernel_name, dtype, cap, chosen=None):
    kernel = getattr(kernels, kernel_name)
    count = 0
    most_registers = 0
    for shape, flags, align, contiguous, options in chosen or variants():
        compiled = compile_variant(kernel, dtype, cap, shape, flags, align, contiguous, options)
        ptx = compiled.asm["ptx"]
        if cap in RESOURCE_CHECKED_CAPS:
            usage = ptxas_usage(ptx, cap)
            what = f"{kernel_name} {dtype} sm_{cap} K,V={shape} (CE, smooth, JS)={flags} align={align} {sorted(options)}"
            assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, f"register spill in {what}: {usage}"
            programs = programs_per_sm_assumed(kernel_name, shape, flags, options, ELEMENT_BYTES[dtype])
            budget = register_budget(compiled.metadata.num_warps, programs)
            assert usage["registers"] <= budget, (
                f"{what}: {usage['registers']} registers > {budget}, too many for {programs} programs of "
                f"{compiled.metadata.num_warps} warps per SM (MIN_PROGRAMS_PER_SM in ops/triton/__init__.py)")
            most_registers = max(most_registers, usage["registers"])
        assert ".entry" in ptx and len(compiled.asm["cubin"]) > 0
        if contiguous and shape[1] % 16 == 0:
            # Aligned contiguous rows must be read with 16-byte vector loads (bandwidth), and
            # the reductions over passes must stay in registers: no barrier in the backward.
            assert "ld.global.v4" in ptx, f"no 16-byte loads in {kernel_name} {dtype} {shape} {flags}"
            if kernel_name == "_backward_kernel":
                assert "bar.sync" not in ptx, f"barrier in {kernel_name} {dtype} {shape} {flags}"
        count += 1
    checked = f": 0 bytes spilled, at most {most_registers} registers per thread" if cap in RESOURCE_CHECKED_CAPS else ""
    print(f"compiled {count} variants of {kernel_name} for {dtype} on sm_{cap}{checked}")


if __name__ == "__main__":
    if sys.argv[1] == "--all-options":
        for name in ("_forward_kernel", "_backward_kernel"):
            main(name, sys.argv[2], int(sys.argv[3]), [ALL_ON])
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
