"""Public functional API. Each function checks its tensors, builds one LossSpec and runs the loss
through _core (checks, backend choice, output assembly) and ops/ (autograd and custom ops)."""

from __future__ import annotations

import torch

from . import reference
from ._core import (
    IntraDistillationOutput, available_backends, check_choice, check_mask, linear_loss, logits_loss, reduce_rows, REDUCTIONS,
)

Tensor = torch.Tensor

__all__ = [
    "IntraDistillationOutput", "available_backends", "consistency_mse", "fused_linear_intra_distillation_loss",
    "intra_distillation_loss", "js_divergence", "x_divergence",
]


def _divergence(logits, mask, reduction, backend, divergence, inplace_grad) -> Tensor:
    options = dict(mask=mask, reduction=reduction, backend=backend, divergence=divergence, inplace_grad=inplace_grad)
    return logits_loss(logits, None, 1.0, options).loss


def x_divergence(logits: Tensor, mask: Tensor | None = None, reduction: str = "mean", backend: str = "auto",
                 *, inplace_grad: bool = False) -> Tensor:
    """X-divergence (1/K) Σ_k [KL(p_k ‖ p̄) + KL(p̄ ‖ p_k)] of K passes stacked on dim 0.

    logits [K, *B, V]; mask bool [*B] (False rows ignored); reduction "mean" (over kept rows,
    0.0 when none is kept), "sum" or "none" ([*B], 0 at ignored rows). inplace_grad=True lets the
    fused backends write the gradient over `logits` (the logits must not be used after backward;
    refused for a leaf that requires grad).
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
    the logits at once (they must not be used after the call; refused for a leaf that requires
    grad). The gradient is differentiable again (create_graph=True) except with inplace_grad.
    """
    options = dict(divergence=divergence, label_smoothing=label_smoothing, ignore_index=ignore_index,
                   reduction=reduction, backend=backend, inplace_grad=inplace_grad, softcap=softcap,
                   logit_scale=logit_scale, z_loss=z_loss)
    return logits_loss(logits, target, alpha, options)


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
    options = dict(divergence=divergence, label_smoothing=label_smoothing, ignore_index=ignore_index,
                   reduction=reduction, backend=backend, chunk_size=chunk_size, softcap=softcap,
                   logit_scale=logit_scale, z_loss=z_loss)
    return linear_loss(hidden, weight, bias, target, alpha, options)
