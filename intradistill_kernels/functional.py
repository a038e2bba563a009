"""Public functional API: each loss checks its arguments, picks a backend, computes per-row
terms and reduces them; the checks, backend choice and reductions live in _core."""

from __future__ import annotations

import torch

from . import reference
from ._core import (
    IntraDistillationOutput, available_backends, check_choice, check_int, check_logits, check_mask,
    check_loss_options, check_target, check_tensor_arg, host_reads_are_free, jeffrey_factor, loss_output, may_write_in_place,
    pick_backend, reduce_rows, REDUCTIONS,
)
from .ops.fused_linear import ChunkConfig, FusedLinearRows, default_chunk_size

Tensor = torch.Tensor

__all__ = [
    "IntraDistillationOutput", "available_backends", "consistency_mse", "fused_linear_intra_distillation_loss",
    "intra_distillation_loss", "js_divergence", "x_divergence",
]


# ----------------------------------------------------------------------------- row computation

def _rows(logits, target, active, divergence, label_smoothing, backend, inplace_grad):
    """Per-row (mean CE over passes or None, divergence), each [N], 0 at inactive rows."""
    k, v = logits.shape[0], logits.shape[-1]
    if backend == "torch":
        flat = logits.reshape(k, -1, v)
        div = reference.DIVERGENCE_ROWS[divergence](flat, active)
        ce = None if target is None else reference.cross_entropy_rows(flat, target, active, label_smoothing)
        return ce, div
    from .ops.fused import fused_rows

    row_target = target if target is not None else torch.zeros_like(active, dtype=torch.long)
    row_target = torch.where(active, row_target, -1)
    # An expanded (stride-0) view shares memory between elements: a gradient written over it
    # would overwrite itself, so such logits get a fresh gradient buffer.
    inplace_grad = bool(inplace_grad) and may_write_in_place(logits)
    ce, div, _, _ = fused_rows(
        logits, row_target, divergence == "js", float(label_smoothing), target is not None, inplace_grad, backend,
    )
    if divergence == "jeffrey":
        div = div * jeffrey_factor(k)
    return (ce if target is not None else None), div


# ----------------------------------------------------------------------------- public functions

def _divergence(logits, mask, reduction, backend, divergence, inplace_grad):
    k, batch_shape, _ = check_logits(logits)
    check_choice("reduction", reduction, REDUCTIONS)
    active = check_mask(mask, batch_shape, logits.device)
    backend = pick_backend(backend, logits, k)
    _, rows = _rows(logits, None, active, divergence, 0.0, backend, inplace_grad)
    return reduce_rows(rows, active, reduction, batch_shape)


def x_divergence(logits: Tensor, mask: Tensor | None = None, reduction: str = "mean", backend: str = "auto",
                 *, inplace_grad: bool = False) -> Tensor:
    """X-divergence (1/K) Σ_k [KL(p_k ‖ p̄) + KL(p̄ ‖ p_k)] of K passes stacked on dim 0.

    logits [K, *B, V]; mask bool [*B] (False rows ignored); reduction "mean" (over kept rows,
    0.0 when none is kept), "sum" or "none" ([*B], 0 at ignored rows). inplace_grad=True lets the
    fused backends write the gradient over `logits` (the logits must not be used after backward).
    """
    return _divergence(logits, mask, reduction, backend, "x", inplace_grad)


def js_divergence(logits: Tensor, mask: Tensor | None = None, reduction: str = "mean", backend: str = "auto",
                  *, inplace_grad: bool = False) -> Tensor:
    """Generalised Jensen-Shannon divergence (1/K) Σ_k KL(p_k ‖ p̄); arguments as x_divergence."""
    return _divergence(logits, mask, reduction, backend, "js", inplace_grad)


def intra_distillation_loss(
    logits: Tensor, target: Tensor, alpha: float = 1.0, *, divergence: str = "x",
    label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
    backend: str = "auto", inplace_grad: bool = False,
) -> IntraDistillationOutput:
    """Cross-entropy averaged over the K passes plus alpha times their divergence.

    logits [K, *B, V], target [*B] (class ids; ignore_index rows are left out of both terms).
    divergence: "x" (the paper's X-divergence), "js" ((1/K) Σ KL(p_k ‖ p̄)) or "jeffrey" (mean over
    pairs of the symmetric KL / 2, R-Drop's term; equal to K/(K-1) times X).
    Returns IntraDistillationOutput(loss, ce, divergence) with loss = ce + alpha * divergence.
    """
    k, batch_shape, v = check_logits(logits)
    opts = check_loss_options(alpha, divergence, label_smoothing, ignore_index, reduction)
    target, active = check_target(target, batch_shape, v, opts.ignore_index, logits.device)
    backend = pick_backend(backend, logits, k)
    ce_rows, div_rows = _rows(logits, target, active, opts.divergence, opts.label_smoothing, backend, inplace_grad)
    return loss_output(ce_rows, div_rows, active, batch_shape, opts)


def consistency_mse(outputs: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Regression form of the divergence (the paper's Eq. 9): (1/K) Σ_k ‖o_k − ō‖².

    outputs [K, *B] (one value per row) or [K, *B, D] (a vector per row). With a mask, *B is the
    mask's shape; without one, outputs of 2 dims are [K, B] and more dims end in D.
    """
    if not isinstance(outputs, Tensor):
        raise TypeError(f"outputs must be a torch.Tensor, got {type(outputs).__name__}")
    if not outputs.is_floating_point():
        raise TypeError(f"outputs must be a floating-point tensor, got {outputs.dtype}")
    if outputs.dim() < 2 or outputs.shape[0] < 2:
        raise ValueError(f"outputs must have shape [K, *B] or [K, *B, D] with K >= 2 passes on dim 0, got {tuple(outputs.shape)}")
    check_choice("reduction", reduction, REDUCTIONS)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
        nb = mask.dim()
        if tuple(outputs.shape[1:1 + nb]) != tuple(mask.shape) or outputs.dim() - 1 - nb > 1:
            raise ValueError(f"mask of shape {list(mask.shape)} must match outputs [K, *B] or [K, *B, D], got outputs {list(outputs.shape)}")
        batch_shape = tuple(mask.shape)
    else:
        batch_shape = tuple(outputs.shape[1:]) if outputs.dim() == 2 else tuple(outputs.shape[1:-1])
    active = check_mask(mask, batch_shape, outputs.device)
    o = outputs.reshape(outputs.shape[0], active.numel(), -1)
    rows = reference.consistency_mse_rows(o, active)
    return reduce_rows(rows, active, reduction, batch_shape)


def fused_linear_intra_distillation_loss(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, alpha: float = 1.0, *,
    divergence: str = "x", label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
    backend: str = "auto", chunk_size: int | None = None,
) -> IntraDistillationOutput:
    """intra_distillation_loss(hidden @ weight.T + bias, target, ...) without materialising the
    [K, *B, V] logits: same values, same gradients for hidden, weight, bias (and a tensor alpha).

    hidden [K, *B, H]; weight [V, H]; bias [V] or None; chunk_size: tokens per chunk (default
    from the free memory). When only `loss` is differentiated (reduction "mean" or "sum"), the
    gradients are computed during the forward, chunk by chunk, and backward only scales them.
    """
    k, batch_shape, hdim = check_logits(hidden, "hidden")
    check_tensor_arg("weight", weight, hidden.device)
    if bias is not None:
        check_tensor_arg("bias", bias, hidden.device)
    if weight.dim() != 2 or weight.shape[1] != hdim or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, H] with H = {hdim} (hidden's last dim) and V >= 1, got {list(weight.shape)}")
    v = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must have shape [V] = [{v}], got {list(bias.shape)}")
    opts = check_loss_options(alpha, divergence, label_smoothing, ignore_index, reduction)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    target_flat, active = check_target(target, batch_shape, v, opts.ignore_index, hidden.device)
    # The GEMM's output is fp32 (float64 for float64): that is what the row kernels read.
    logits_like = hidden.new_empty(0, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    backend = pick_backend(backend, logits_like, k)

    h = hidden.reshape(k, -1, hdim)
    rows_target = torch.where(active, target_flat, -1)
    keep = None
    if host_reads_are_free(hidden.device):
        # Ignored tokens are dropped before any GEMM. (On an accelerator that would need their
        # count on the host, a synchronisation per call: there they are computed and zeroed.)
        keep = active.nonzero().squeeze(1)
        h, rows_target = h[:, keep], rows_target[keep]
    m = h.shape[1]
    rows_dtype = logits_like.dtype
    alpha_t = opts.alpha.to(rows_dtype) if isinstance(opts.alpha, Tensor) else torch.full((), opts.alpha, dtype=rows_dtype, device=hidden.device)
    count = active.sum().clamp(min=1).to(rows_dtype)
    scale = 1.0 / count if opts.reduction == "mean" else torch.ones((), dtype=rows_dtype, device=hidden.device)
    early = opts.reduction != "none" and torch.is_grad_enabled()
    cfg = ChunkConfig(opts.divergence, opts.label_smoothing, backend,
                      chunk_size or default_chunk_size(k, max(m, 1), v, hidden.device))
    ce_rows, div_rows, loss = FusedLinearRows.apply(h, weight, bias, alpha_t, scale, rows_target, cfg, early)
    if opts.reduction == "none":
        if keep is not None:
            zeros = ce_rows.new_zeros(active.numel())
            ce_rows, div_rows = zeros.index_put((keep,), ce_rows), zeros.index_put((keep,), div_rows)
        return loss_output(ce_rows, div_rows, active, batch_shape, opts)
    return IntraDistillationOutput(loss, scale * ce_rows.sum(), scale * div_rows.sum())
