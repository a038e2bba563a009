"""Launchers of the Triton kernels: the "triton" backend (interface: ops/backend.py).

One program per token; element offsets of the rows come from ops.rows.row_offsets, so any
strided view is read without a copy.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..backend import EarlyGrad, RowStats, RowWeights
from ..rows import row_offsets
from ..spec import LossSpec

# fp32 values a thread holds per [K_PAD, BLOCK_V] temporary; above this the compiler spills.
# 16-bit inputs at K_PAD = 8 need all 64 to keep one 16-byte load per row with every warp along V:
# at 32, Triton still vectorises by 16 bytes and puts warps across K, and the backward then
# reduces over passes through shared memory with a barrier on every block (measured, sm_90).
# At 64 the 16-bit forward with JS at K = 6 still spills 32 bytes (sm_90; the AOT test says so).
VALUES_PER_THREAD = 64
NUM_WARPS = 8
# The occupancy launch_config assumes: at least two programs resident per SM, so that one streams
# its rows while the other finishes its reductions and stores. With NUM_WARPS warps that caps a
# thread at 65536 / (2 * 256) = 128 registers; tests/aot_compile.py checks every compiled variant
# against it (and for 0 bytes of spill) with ptxas -v, and names those that get one program
# (16-bit inputs at K_PAD = 8 among them: 64 values per thread and tile, up to 254 registers).
MIN_PROGRAMS_PER_SM = 2
REGISTERS_PER_SM = 65536  # sm_80 and sm_90 alike
MAX_REGISTERS_PER_THREAD = 255


def programs_per_sm(forward: bool, k: int, element_size: int, smooth: bool, softcap: bool, early: bool) -> int:
    """MIN_PROGRAMS_PER_SM, except where it was measured not to hold (ptxas -v, sm_90): the forward
    with label smoothing from K = 5 (K_PAD = 8) keeps the smoothing row sum as one more tile (up to
    166 registers, fp32, K = 8); 16-bit inputs at K_PAD = 8 hold 64 values per thread and tile for
    16-byte loads without a barrier (up to 254, bf16 backward, K = 8); softcap from K = 4 (its tanh
    and dt/dz over the whole tile: up to 206) and the one-pass forward's gradient sweep from K = 5
    (up to 195). One program per SM there."""
    if (forward and smooth and k >= 5) or (element_size == 2 and k >= 5) or (softcap and k >= 4) or (early and k >= 5):
        return 1
    return MIN_PROGRAMS_PER_SM


def register_limit(num_warps: int, programs: int) -> int:
    """Registers per thread that let `programs` programs of num_warps warps share an SM (allocated
    per warp in units of 256, i.e. 8 per thread)."""
    per_thread = REGISTERS_PER_SM // (programs * num_warps * 32)
    return min(MAX_REGISTERS_PER_THREAD, per_thread - per_thread % 8)


def forward_register_limit(num_warps: int, k: int, element_size: int, smooth: bool, softcap: bool, early: bool) -> int:
    """maxnreg for the forward kernel. Left to itself, ptxas (through Triton) capped some forward
    variants below the budget and spilled (16-bit, JS: K = 3 at 64 registers with 8 bytes of
    spill, K = 6 at 128 with 32); given the budget it allocates what they need (101 and 145, no
    spill). The backward is left to ptxas's own choice, which fits the budget without spilling
    where an explicit limit made it spill (bf16, K = 3, smoothing: 12 bytes at 128): the static
    check in tests/aot_compile.py holds both to 0 bytes."""
    return register_limit(num_warps, programs_per_sm(True, k, element_size, smooth, softcap, early))


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def launch_config(k: int, v: int, element_size: int = 4) -> dict:
    """Compile-time constants and launch options for K passes of V classes.

    BLOCK_V is sized so that every warp lies along V, each thread holding all K_PAD rows of its
    columns with one 16-byte load per row: the reductions over passes (z̄, p̄, log p̄) then stay
    in registers, and the backward loop needs no shared memory or barrier at all. (With warps
    split across K, the compiler reduced over passes through shared memory on every iteration.)
    """
    k_pad = _next_pow2(k)
    per_row = max(1, min(16 // element_size, VALUES_PER_THREAD // k_pad))
    full = per_row * 32 * NUM_WARPS
    block_v = min(max(_next_pow2(v), 16), full)
    num_warps = max(1, min(NUM_WARPS, block_v // (per_row * 32)))
    return {"K": k, "K_PAD": k_pad, "BLOCK_V": block_v, "num_warps": num_warps}


def row_alignment(*tensors) -> int:
    """Largest power of two (at most 16 bytes' worth of elements) dividing every row offset of
    every tensor: the batch strides and the data pointer (in elements)."""
    align = 16
    for t in tensors:
        align = min(align, 16 // t.element_size())
        for value in (*t.stride()[1:-1], t.data_ptr() // t.element_size()):
            while align > 1 and value % align:
                align //= 2
        if t.data_ptr() % t.element_size():
            align = 1
    return align


def _on_device(t: torch.Tensor):
    """Launch on t's own GPU (Triton launches on the current device otherwise)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _constants(cfg: LossSpec, k: int, v: int, element_size: int, has_z: bool, forward: bool = False,
               early: bool = False) -> dict:
    launch = launch_config(k, v, element_size)
    if forward:
        launch["maxnreg"] = forward_register_limit(launch["num_warps"], k, element_size, cfg.smooth, cfg.softcap > 0, early)
    return dict(HAS_CE=cfg.has_ce, SMOOTH=cfg.smooth, JS=cfg.js, SCALE=cfg.logit_scale != 1.0, SOFTCAP=cfg.softcap > 0,
                HAS_Z=has_z, **launch)


def _options(cfg: LossSpec) -> tuple:
    return cfg.label_smoothing, cfg.logit_scale, cfg.softcap


def _weight_ptrs(weights: RowWeights) -> tuple:
    """(ce, div, z) as contiguous fp32 vectors the kernels index by row; without a z term its
    slot holds div, which HAS_Z = False never reads."""
    ce, div = (w.to(torch.float32).contiguous() for w in weights[:2])
    z = div if weights.z is None else weights.z.to(torch.float32).contiguous()
    return ce, div, z


def _forward(logits: torch.Tensor, target: torch.Tensor, cfg: LossSpec, early: EarlyGrad | None = None) -> RowStats:
    """Each row's statistics; with `early`, also the gradient with early.weights, written into
    early.grad by the same program right after (the one-pass forward of kernels.py)."""
    from .kernels import _forward_kernel

    k, v = logits.shape[0], logits.shape[-1]
    n = target.numel()
    f32 = dict(device=logits.device, dtype=torch.float32)
    out = RowStats(torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(k, n, **f32), torch.empty(k, n, **f32))
    if n == 0:
        return out
    offsets = row_offsets(logits)
    if early is None:
        # EARLY off: the gradient arguments are never read; any pointers of the right kinds do.
        grad, grad_offsets, weights, has_z = logits, offsets, (out.ce, out.ce, out.ce), False
    else:
        grad = early.grad
        if grad.shape != logits.shape or grad.dtype != logits.dtype or grad.device != logits.device:
            raise ValueError(f"early.grad must have the logits' shape, dtype and device {tuple(logits.shape)}, "
                             f"{logits.dtype}, {logits.device}; got {tuple(grad.shape)}, {grad.dtype}, {grad.device}")
        grad_offsets = offsets if grad is logits else row_offsets(grad)
        weights, has_z = _weight_ptrs(early.weights), early.weights.z is not None
    with _on_device(logits):
        _forward_kernel[(n,)](
            logits, offsets, target, *out, *weights, grad, grad_offsets,
            n, v, logits.stride(0), logits.stride(-1), grad.stride(0), grad.stride(-1), *_options(cfg),
            ALIGN=row_alignment(logits, grad), EARLY=early is not None,
            **_constants(cfg, k, v, logits.element_size(), has_z, forward=True, early=early is not None),
        )
    return out


def _backward(logits, target, lse, stat, weights: RowWeights, cfg: LossSpec, grad) -> None:
    from .kernels import _backward_kernel

    k, v = logits.shape[0], logits.shape[-1]
    n = target.numel()
    if n == 0:
        return
    with _on_device(logits):
        _backward_kernel[(n,)](
            logits, row_offsets(logits), target, lse, stat, *_weight_ptrs(weights), grad, row_offsets(grad),
            n, v, logits.stride(0), logits.stride(-1), grad.stride(0), grad.stride(-1), *_options(cfg),
            ALIGN=row_alignment(logits, grad), **_constants(cfg, k, v, logits.element_size(), weights.z is not None),
        )


class TritonBackend:
    """The "triton" backend: compiled kernels on CUDA tensors, the interpreter on CPU tensors
    under TRITON_INTERPRET=1."""

    name = "triton"
    max_passes = None  # any K: a token's rows are one [K_PAD, BLOCK_V] tile whose width shrinks as K grows

    def unavailable_reason(self) -> str | None:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton not installed (pip install triton)"
        except Exception as exc:  # a broken install (mismatched torch/triton, missing driver libraries)
            return f"triton failed to import: {type(exc).__name__}: {exc}"
        if interpret_mode() or torch.cuda.is_available():
            return None
        return "no CUDA device and TRITON_INTERPRET unset"

    def supports(self, t: torch.Tensor) -> bool:
        return t.dtype != torch.float64 and (t.is_cuda or (interpret_mode() and t.device.type == "cpu"))

    def details(self) -> list[str]:
        if interpret_mode() and self.unavailable_reason() is None:
            return ["TRITON_INTERPRET is set: the kernels run in the (slow) interpreter on CPU tensors"]
        return []

    forward = staticmethod(_forward)
    backward = staticmethod(_backward)


backend = TritonBackend()
