"""The fused per-row loss as torch.library custom ops, so torch.compile traces callers without a
graph break, and autograd calls the fused backward kernel.

intradistill::fused_rows runs a backend's forward kernel and returns, per row, the mean
cross-entropy over the K passes and the divergence (X or JS), plus the saved statistics.
Reductions, masks and alpha stay in ordinary torch code on these [N] vectors; their gradients
arrive here as per-row weights g_ce, g_div, so one backward kernel serves every reduction.
"""

from __future__ import annotations

import torch

from . import backend_impl
from .backend import RowsConfig

Tensor = torch.Tensor


@torch.library.custom_op("intradistill::fused_rows", mutates_args=())
def fused_rows(
    logits: Tensor, target: Tensor, js: bool, label_smoothing: float, has_ce: bool,
    inplace_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(backend_impl(backend).forward(logits, target, RowsConfig(js, label_smoothing, has_ce)))


@fused_rows.register_fake
def _fused_rows_fake(logits, target, js, label_smoothing, has_ce, inplace_grad, backend):
    k, n = logits.shape[0], target.numel()
    def f32(*shape):
        return logits.new_empty(shape, dtype=torch.float32)
    return f32(n), f32(n), f32(k, n), f32(k, n)


@torch.library.custom_op("intradistill::fused_rows_backward", mutates_args=())
def fused_rows_backward(
    logits: Tensor, target: Tensor, lse: Tensor, stat: Tensor, g_ce: Tensor, g_div: Tensor,
    js: bool, label_smoothing: float, has_ce: bool, backend: str,
) -> Tensor:
    grad = torch.empty_like(logits)
    backend_impl(backend).backward(logits, target, lse, stat, g_ce, g_div, RowsConfig(js, label_smoothing, has_ce), grad)
    return grad


@fused_rows_backward.register_fake
def _fused_rows_backward_fake(logits, target, lse, stat, g_ce, g_div, js, label_smoothing, has_ce, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("intradistill::fused_rows_backward_", mutates_args=("logits",))
def fused_rows_backward_(
    logits: Tensor, target: Tensor, lse: Tensor, stat: Tensor, g_ce: Tensor, g_div: Tensor,
    js: bool, label_smoothing: float, has_ce: bool, backend: str,
) -> None:
    """Writes the gradient over the logits themselves (each element is read before it is written,
    by the same program), saving a [K, *B, V] buffer."""
    backend_impl(backend).backward(logits, target, lse, stat, g_ce, g_div, RowsConfig(js, label_smoothing, has_ce), logits)


def _setup_context(ctx, inputs, output):
    logits, target, js, label_smoothing, has_ce, inplace_grad, backend = inputs
    _, _, lse, stat = output
    ctx.save_for_backward(logits, target, lse, stat)
    ctx.config = (js, label_smoothing, has_ce, inplace_grad, backend)
    ctx.mark_non_differentiable(lse, stat)


def _row_grad(g: Tensor | None, like: Tensor) -> Tensor:
    if g is None:
        return torch.zeros_like(like[0])
    return g.to(torch.float32).contiguous()


def _backward(ctx, g_ce, g_div, _g_lse, _g_stat):
    logits, target, lse, stat = ctx.saved_tensors
    js, label_smoothing, has_ce, inplace_grad, backend = ctx.config
    args = (target, lse, stat, _row_grad(g_ce, lse), _row_grad(g_div, lse), js, label_smoothing, has_ce, backend)
    if inplace_grad:
        fused_rows_backward_(logits, *args)
        grad = logits
    else:
        grad = fused_rows_backward(logits, *args)
    return grad, None, None, None, None, None, None


fused_rows.register_autograd(_backward, setup_context=_setup_context)
