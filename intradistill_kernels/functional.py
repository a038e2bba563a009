"""Public functional API: each loss checks its arguments, picks a backend, computes per-row
terms and reduces them; the checks, backend choice and reductions live in _core."""

from __future__ import annotations

import torch

from . import reference
from ._core import (
    IntraDistillationOutput, LossOptions, available_backends, check_choice, check_int, check_logits, check_mask,
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

def _rows_and_loss(logits, target, active, batch_shape, opts: LossOptions, has_ce, backend, inplace_grad):
    """IntraDistillationOutput of the rows (ce is None without has_ce)."""
    k, v = logits.shape[0], logits.shape[-1]
    if backend == "torch":
        flat = reference.transform_logits(reference.active_rows(logits.reshape(k, -1, v), active),
                                          opts.logit_scale, opts.softcap)
        div = reference.DIVERGENCE_ROWS[opts.divergence](flat, active)
        ce = reference.cross_entropy_rows(flat, target, active, opts.label_smoothing) if has_ce else torch.zeros_like(div)
        zsq = reference.lse_square_rows(flat, active) if opts.z_loss > 0 else None
        return loss_output(ce, div, active, batch_shape, opts, zsq)
    from .ops.fused import FusedRows

    row_target = torch.where(active, target, -1) if has_ce else torch.where(active, 0, -1)
    # An expanded (stride-0) view shares memory between elements: a gradient written over it
    # would overwrite itself, so such logits get a fresh gradient buffer.
    inplace = bool(inplace_grad) and may_write_in_place(logits)
    # The one-pass forward applies when the reduced loss is what gets differentiated.
    early = opts.reduction != "none" and torch.is_grad_enabled() and logits.requires_grad
    count = active.sum().clamp(min=1).to(torch.float32)
    scale = 1.0 / count if opts.reduction == "mean" else torch.ones((), device=logits.device)
    alpha = opts.alpha.to(torch.float32) if isinstance(opts.alpha, Tensor) else \
        torch.full((), opts.alpha, dtype=torch.float32, device=logits.device)
    div_factor = jeffrey_factor(k) if opts.divergence == "jeffrey" else 1.0
    ce, div, zsq, loss = FusedRows.apply(
        logits, row_target, alpha, scale, opts.z_loss, div_factor, opts.divergence == "js", opts.label_smoothing,
        has_ce, opts.logit_scale, opts.softcap, inplace, early, backend)
    if opts.reduction == "none":
        return loss_output(ce, div, active, batch_shape, opts, zsq)
    z = scale * opts.z_loss * zsq.sum() if opts.z_loss > 0 else None
    return IntraDistillationOutput(loss, scale * ce.sum(), scale * div.sum(), z)


# ----------------------------------------------------------------------------- public functions

def _divergence(logits, mask, reduction, backend, divergence, inplace_grad):
    k, batch_shape, _ = check_logits(logits)
    opts = check_loss_options(1.0, divergence, 0.0, -100, reduction)
    active = check_mask(mask, batch_shape, logits.device)
    backend = pick_backend(backend, logits, k)
    return _rows_and_loss(logits, None, active, batch_shape, opts, False, backend, inplace_grad).loss


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
    backend: str = "auto", inplace_grad: bool = False, softcap: float | None = None, logit_scale: float = 1.0,
    z_loss: float = 0.0,
) -> IntraDistillationOutput:
    """Cross-entropy averaged over the K passes plus alpha times their divergence.

    logits [K, *B, V], target [*B] (class ids; ignore_index rows are left out of both terms).
    divergence: "x" (the paper's X-divergence), "js" ((1/K) Σ KL(p_k ‖ p̄)) or "jeffrey" (mean over
    pairs of the symmetric KL / 2, R-Drop's term; equal to K/(K-1) times X).
    Returns IntraDistillationOutput(loss, ce, divergence) with loss = ce + alpha * divergence.

    LLM options: logit_scale multiplies the logits first; softcap (Gemma 2/3) maps them to
    softcap·tanh(logits / softcap) before every softmax (-inf stays -inf); z_loss adds
    z_loss · mean over passes and rows of lse² to `loss` (also reported as `out.z_loss`).
    When only `loss` is differentiated (reduction "mean" or "sum"), the fused backends compute
    the gradient in the forward's sweep over the logits; inplace_grad=True then writes it over
    the logits at once (they must not be used after the call).
    """
    k, batch_shape, v = check_logits(logits)
    opts = check_loss_options(alpha, divergence, label_smoothing, ignore_index, reduction, logit_scale, softcap, z_loss)
    target, active = check_target(target, batch_shape, v, opts.ignore_index, logits.device)
    backend = pick_backend(backend, logits, k)
    return _rows_and_loss(logits, target, active, batch_shape, opts, True, backend, inplace_grad)


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
    backend: str = "auto", chunk_size: int | None = None, softcap: float | None = None, logit_scale: float = 1.0,
    z_loss: float = 0.0,
) -> IntraDistillationOutput:
    """intra_distillation_loss(hidden @ weight.T + bias, target, ...) without materialising the
    [K, *B, V] logits: same values, same gradients for hidden, weight, bias (and a tensor alpha).

    hidden [K, *B, H]; weight [V, H]; bias [V] or None; chunk_size: tokens per chunk (default
    from the free memory). softcap, logit_scale and z_loss as in intra_distillation_loss.
    When only `loss` is differentiated (reduction "mean" or "sum"), the gradients are computed
    during the forward, chunk by chunk, and backward only scales them.
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
    opts = check_loss_options(alpha, divergence, label_smoothing, ignore_index, reduction, logit_scale, softcap, z_loss)
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
                      chunk_size or default_chunk_size(k, max(m, 1), v, hidden.device),
                      opts.logit_scale, opts.softcap, opts.z_loss)
    ce_rows, div_rows, zsq_rows, loss = FusedLinearRows.apply(h, weight, bias, alpha_t, scale, rows_target, cfg, early)
    if opts.reduction == "none":
        if keep is not None:
            zeros = ce_rows.new_zeros(active.numel())
            ce_rows, div_rows, zsq_rows = (zeros.index_put((keep,), r) for r in (ce_rows, div_rows, zsq_rows))
        return loss_output(ce_rows, div_rows, active, batch_shape, opts, zsq_rows)
    z = scale * opts.z_loss * zsq_rows.sum() if opts.z_loss > 0 else None
    return IntraDistillationOutput(loss, scale * ce_rows.sum(), scale * div_rows.sum(), z)
