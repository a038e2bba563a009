"""The reduced loss and the row weights of its gradient, written once for every entry point (the
logits loss, the fused-linear loss, their vocabulary-parallel forms).

With coef = [alpha, scale] (scale = 1/count for "mean", 1 for "sum") and the per-row outputs
ce, div (X, JS, or jeffrey = K/(K-1)·X) and zsq = (1/K) Σ_k lse_k²:

    loss = scale · Σ_rows (ce + alpha·div + z_loss·zsq)

The kernels produce ce, the raw divergence (X or JS) and lse; `loss_weights` and `rows_weights`
turn what autograd hands back for the loss and for the per-row outputs into the weights the
kernels take (the jeffrey factor folded in). The gradient is linear in these weights, so the
loss's gradient (often written by the one-pass forward) and the rows' (computed only when
something uses them) are produced apart and summed by autograd.
"""

from __future__ import annotations

import torch

from .backend import RowWeights
from .spec import LossSpec

Tensor = torch.Tensor


def reduced_loss(spec: LossSpec, coef: Tensor, ce: Tensor, div: Tensor, zsq: Tensor) -> Tensor:
    alpha, scale = coef[0], coef[1]
    loss = ce.sum() + alpha * div.sum()
    if spec.has_z:
        loss = loss + spec.z_loss * zsq.sum()
    return scale * loss


def loss_weights(spec: LossSpec, k: int, n: int, coef: Tensor, g_loss: Tensor | None = None) -> RowWeights:
    """Weights of each row's ce, raw divergence and zsq in the reduced loss times g_loss (the
    one-pass forward passes none: grad_output is applied in backward, by scaling)."""
    alpha, scale = coef[0], coef[1]
    on_loss = scale if g_loss is None else g_loss.to(coef.dtype) * scale
    w_div = on_loss * alpha * spec.div_factor(k)
    w_z = on_loss * spec.z_loss if spec.has_z else None
    return RowWeights(*(None if w is None else w.expand(n) for w in (on_loss, w_div, w_z)))


def rows_weights(spec: LossSpec, k: int, g_rows: Tensor) -> RowWeights:
    """Weights of the same terms from g_rows [3, N], the gradient of the per-row outputs
    (ce, div, zsq) stacked."""
    factor = spec.div_factor(k)
    return RowWeights(g_rows[0], g_rows[1] * factor if factor != 1.0 else g_rows[1], g_rows[2] if spec.has_z else None)


def coef_grad(coef: Tensor, g_loss: Tensor | None, div: Tensor) -> Tensor | None:
    """d(loss)/d(coef) times g_loss: only alpha may require a gradient (scale is a count)."""
    if g_loss is None:
        return None
    g_alpha = g_loss * coef[1] * div.sum()
    return torch.stack([g_alpha, torch.zeros_like(g_alpha)]).to(coef.dtype)
