"""Launchers of the Triton kernels, with the backend interface shared by every fused backend.

    forward(logits, row_off, target, js, label_smoothing, has_ce) -> (ce_row, div_row, lse, stat)
    backward(logits, row_off, target, lse, stat, g_ce, g_div, js, label_smoothing, has_ce,
             grad, grad_row_off) -> None    (writes grad; grad may be logits itself)

logits is any strided [K, *B, V] tensor, row_off int64 [N] the element offset of row n of pass 0
(see ops.rows.row_offsets), target int64 [N] with -1 at inactive rows. ce_row and div_row are fp32
[N]; lse and stat fp32 [K, N] (stat is s_k for the X form, KL(p_k ‖ p̄) for JS).
"""

from __future__ import annotations

import os

import torch

# fp32 values a thread holds per [K_PAD, BLOCK_V] temporary; above this the compiler spills.
VALUES_PER_THREAD = 64
NUM_WARPS = 8


def is_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return interpret_mode() or torch.cuda.is_available()


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(t: torch.Tensor) -> bool:
    return t.is_cuda or (interpret_mode() and t.device.type == "cpu")


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


def forward(logits, row_off, target, js, label_smoothing, has_ce):
    from .kernels import _forward_kernel

    k, v = logits.shape[0], logits.shape[-1]
    n = row_off.numel()
    f32 = dict(device=logits.device, dtype=torch.float32)
    ce_row, div_row = torch.empty(n, **f32), torch.empty(n, **f32)
    lse, stat = torch.empty(k, n, **f32), torch.empty(k, n, **f32)
    if n == 0:
        return ce_row, div_row, lse, stat
    _forward_kernel[(n,)](
        logits, row_off, target, ce_row, div_row, lse, stat,
        n, v, logits.stride(0), logits.stride(-1), float(label_smoothing),
        HAS_CE=bool(has_ce), SMOOTH=bool(has_ce and label_smoothing > 0), JS=bool(js),
        ALIGN=row_alignment(logits), **launch_config(k, v, logits.element_size()),
    )
    return ce_row, div_row, lse, stat


def backward(logits, row_off, target, lse, stat, g_ce, g_div, js, label_smoothing, has_ce, grad, grad_row_off):
    from .kernels import _backward_kernel

    k, v = logits.shape[0], logits.shape[-1]
    n = row_off.numel()
    if n == 0:
        return
    _backward_kernel[(n,)](
        logits, row_off, target, lse, stat, g_ce, g_div, grad, grad_row_off,
        n, v, logits.stride(0), logits.stride(-1), grad.stride(0), grad.stride(-1),
        float(label_smoothing),
        HAS_CE=bool(has_ce), SMOOTH=bool(has_ce and label_smoothing > 0), JS=bool(js),
        ALIGN=row_alignment(logits, grad), **launch_config(k, v, logits.element_size()),
    )
