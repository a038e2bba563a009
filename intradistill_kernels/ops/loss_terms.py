"""The reduced loss and the row weights of its gradient, written once for every entry point (the
logits loss, the fused-linear loss, their vocabulary-parallel forms).

With coef = [alpha, scale] (scale = 1/count for "mean", 1 for "sum") and the per-row outputs
ce, div (X, JS, or jeffrey = K/(K-1)·X) and zsq = (1/K) Σ_k lse_k²:

    loss = scale · Σ_rows (ce + alpha·div + z_loss·zsq)

The kernels produce ce, the raw divergence (X or JS) and lse; `row_weights` turns what autograd
hands back for these outputs into the weights the kernels take (the jeffrey factor folded in).
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


def row_weights(spec: LossSpec, k: int, n: int, coef: Tensor, g_rows=None, g_loss=None) -> RowWeights:
    """Weights of each row's ce, raw divergence and zsq in the quantity differentiated. Without
    g_rows: the reduced loss itself (the one-pass forward, whose gradient backward scales by
    grad_output). With g_rows = (g_ce, g_div, g_zsq), the gradients autograd handed back for the
    per-row outputs (None: unused), plus the reduced loss times g_loss (None: unused)."""
    dtype = coef.dtype  # fp32, float64 for float64 logits
    alpha, scale = coef[0], coef[1]
    g_ce, g_div, g_zsq = (None, None, None) if g_rows is None else g_rows
    on_loss = scale if g_rows is None else None if g_loss is None else g_loss.to(dtype) * scale
    zero = torch.zeros((), dtype=dtype, device=coef.device)

    def plus(g, term):
        return term if g is None else g if term is None else g + term

    w_ce = plus(g_ce, on_loss)
    w_div = plus(g_div, None if on_loss is None else on_loss * alpha)
    w_z = plus(g_zsq, on_loss * spec.z_loss if spec.has_z and on_loss is not None else None)
    factor = spec.div_factor(k)
    w_div = zero if w_div is None else w_div * factor if factor != 1.0 else w_div

    def vec(w):
        return None if w is None else w.to(dtype).expand(n)

    return RowWeights(vec(zero if w_ce is None else w_ce), vec(w_div), vec(w_z))


def coef_grad(coef: Tensor, g_loss: Tensor | None, div: Tensor) -> Tensor | None:
    """d(loss)/d(coef) times g_loss: only alpha may require a gradient (scale is a count)."""
    if g_loss is None:
        return None
    g_alpha = g_loss * coef[1] * div.sum()
    return torch.stack([g_alpha, torch.zeros_like(g_alpha)]).to(coef.dtype)


def any_row_grad(g_rows) -> bool:
    """Whether autograd handed back a gradient for a per-row output: then the one-pass forward's
    gradient (that of the reduced loss alone) is not the one wanted."""
    return any(g is not None for g in g_rows)
