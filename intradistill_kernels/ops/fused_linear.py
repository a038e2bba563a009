"""Fused linear intra-distillation: the loss on hidden states and the output weight, with only a
chunk of the [K, N, V] logits alive at a time.

Per chunk of tokens (all K passes of a token in the same chunk: the divergence couples them):
one GEMM with fp32 output for the K passes, the backend's fused forward kernel, then at once its
backward kernel with the per-row weights of the reduced loss, writing d(logits) over the chunk's
logits; grad_hidden = dlogits @ W and grad_weight / grad_bias accumulate in fp32 across chunks.
So when the reduced loss is what gets differentiated (the usual last op of a step) the
gradients exist at the end of the forward and backward only scales them by grad_output.

Whether that holds is known from the graph, not from values: autograd hands backward a gradient
for the per-row outputs only when something other than the reduced loss used them (reduction
"none", or the ce / divergence terms in another expression). Then the chunks are recomputed with
the exact per-row weights: one more pass of GEMMs, and no host-device synchronisation either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import reference
from .._core import jeffrey_factor
from . import backend_impl
from .backend import EarlyGrad, RowsConfig, RowWeights, run_forward

Tensor = torch.Tensor

CPU_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk (and as much again for the kernels)


def default_chunk_size(k: int, n: int, v: int, device: torch.device) -> int:
    """Tokens per chunk: the chunk's fp32 logits take at most 1/8 of free GPU memory (at most
    2 GiB), or 256 MiB on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 8, 2 * 2**30)
    else:
        budget = CPU_CHUNK_BYTES
    return int(max(1, min(n, budget // (k * v * 4))))


@dataclass(frozen=True)
class ChunkConfig:
    divergence: str
    label_smoothing: float
    backend: str
    chunk: int
    logit_scale: float = 1.0
    softcap: float = 0.0
    z_loss: float = 0.0

    @property
    def rows(self) -> RowsConfig:
        return RowsConfig(js=self.divergence == "js", label_smoothing=self.label_smoothing, has_ce=True,
                          logit_scale=self.logit_scale, softcap=self.softcap)


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 (float64 for float64) result. 16-bit CUDA operands use the GEMM's fp32
    output directly; elsewhere the operands are upcast."""
    if b.is_cuda and b.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return a.to(dtype) @ b.to(dtype)


def _logits_f32(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """[K, c, H] @ [V, H].T -> fp32 [K, c, V] without rounding the products to 16 bits."""
    k, c, hdim = h.shape
    out = _mm_f32(h.reshape(k * c, hdim), w.T)
    if b is not None:
        out = out + b.to(out.dtype)
    return out.view(k, c, -1)


def _chunk_rows_and_grad(logits, target, cfg: ChunkConfig, w: RowWeights | None):
    """(ce_rows, div_rows, zsq_rows) of one chunk and, with row weights w, the gradient
    d(Σ w.ce·ce + w.div·div + w.z·zsq)/d(logits), written over the chunk's logits in the same
    sweep when a fused backend runs (None without weights)."""
    k = logits.shape[0]
    factor = jeffrey_factor(k) if cfg.divergence == "jeffrey" else 1.0
    if cfg.backend == "torch":
        active = target >= 0
        z = logits.detach().requires_grad_(w is not None)
        with torch.enable_grad():
            t = reference.transform_logits(z, cfg.logit_scale, cfg.softcap)
            ce = reference.cross_entropy_rows(t, target.clamp(min=0), active, cfg.label_smoothing)
            div = reference.DIVERGENCE_ROWS[cfg.divergence](t, active)
            zsq = reference.lse_square_rows(t, active)
            if w is None:
                return ce.detach(), div.detach(), zsq.detach(), None
            total = w.ce * ce + w.div * div + (0 if w.z is None else w.z * zsq)
            (grad,) = torch.autograd.grad(total.sum(), z)
        return ce.detach(), div.detach(), zsq.detach(), grad
    impl = backend_impl(cfg.backend)
    early = None
    if w is not None:
        early = EarlyGrad(RowWeights(w.ce.float().contiguous(), (w.div * factor).float().contiguous(),
                                     None if w.z is None else w.z.float().contiguous()), logits)
    stats = run_forward(impl, logits, target, cfg.rows, early)
    div = stats.div * factor if factor != 1.0 else stats.div
    return stats.ce, div, stats.lse.square().mean(0), None if w is None else logits


def chunked_pass(hidden, weight, bias, target, cfg: ChunkConfig, w: RowWeights | None = None, needs=(True, True, True)):
    """Runs every chunk; returns per-row (ce, div, zsq) and, when row weights are given, the
    gradients (grad_hidden [K, M, H] in hidden's dtype, grad_weight and grad_bias in fp32; each
    None where `needs` says that input wants none). Rows whose target is -1 contribute nothing."""
    k, m, hdim = hidden.shape
    rows_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out_rows = [hidden.new_empty(m, dtype=rows_dtype) for _ in range(3)]
    grads = None
    if w is not None:
        need_h, need_w, need_b = needs
        grads = [torch.empty_like(hidden) if need_h else None,
                 torch.zeros(weight.shape, dtype=rows_dtype, device=weight.device) if need_w else None,
                 torch.zeros(bias.shape, dtype=rows_dtype, device=bias.device) if need_b and bias is not None else None]
    w_fp = weight if weight.is_cuda or weight.dtype in (torch.float32, torch.float64) else weight.to(torch.float32)
    for start in range(0, m, cfg.chunk):
        end = min(m, start + cfg.chunk)
        sel = slice(start, end)
        h = hidden[:, sel]
        logits = _logits_f32(h, w_fp, bias)
        w_sel = None if w is None else RowWeights(w.ce[sel], w.div[sel], None if w.z is None else w.z[sel])
        *chunk_rows, dlogits = _chunk_rows_and_grad(logits, target[sel], cfg, w_sel)
        for rows, values in zip(out_rows, chunk_rows):
            rows[sel] = values
        if dlogits is not None:
            g_hidden, g_weight, g_bias = grads
            d = dlogits.reshape(-1, dlogits.shape[-1])
            if g_hidden is not None:
                g_hidden[:, sel] = _mm_f32(d, w_fp).view(k, end - start, hdim).to(hidden.dtype)
            if g_weight is not None:
                g_weight += _mm_f32(d.T, h.reshape(-1, hdim))
            if g_bias is not None:
                g_bias += d.sum(0)
        del logits, dlogits
    return (*out_rows, grads)


def _row_weights(m: int, w_ce, w_div, w_z) -> RowWeights:
    def vec(w):
        return None if w is None else w.float().expand(m).contiguous()
    return RowWeights(vec(w_ce), vec(w_div), vec(w_z))


class FusedLinearRows(torch.autograd.Function):
    """(ce_rows, div_rows, zsq_rows, loss) of hidden @ weight.T + bias, where
    loss = Σ_rows scale·(ce + alpha·div + z_loss·zsq) is the reduced loss for "mean"
    (scale = 1/count) and "sum" (scale = 1)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, alpha, scale, target, cfg: ChunkConfig, early: bool):
        ctx.set_materialize_grads(False)
        m = hidden.shape[1]
        needs = ctx.needs_input_grad[:3]
        w = None
        if early and any(needs):
            w = _row_weights(m, scale, scale * alpha, scale * cfg.z_loss if cfg.z_loss > 0 else None)
        ce_rows, div_rows, zsq_rows, grads = chunked_pass(hidden, weight, bias, target, cfg, w, needs)
        loss = scale * (ce_rows.sum() + alpha * div_rows.sum() + cfg.z_loss * zsq_rows.sum())
        ctx.save_for_backward(hidden, weight, bias, alpha, scale, target, div_rows)
        ctx.cfg, ctx.grads = cfg, grads
        ctx.mark_non_differentiable(scale)
        return ce_rows, div_rows, zsq_rows, loss

    @staticmethod
    def backward(ctx, g_ce_rows, g_div_rows, g_zsq_rows, g_loss):
        hidden, weight, bias, alpha, scale, target, div_rows = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        needs = ctx.needs_input_grad[:3]
        g_alpha = None
        if ctx.needs_input_grad[3] and g_loss is not None:
            g_alpha = (g_loss * scale * div_rows.sum()).to(alpha.dtype)
        rows_used = g_ce_rows is not None or g_div_rows is not None or g_zsq_rows is not None
        if g_loss is None and not rows_used:
            return None, None, None, g_alpha, None, None, None, None
        if not rows_used and grads is not None:
            factor = g_loss  # the forward's gradients are those of `loss`
        else:
            zero = hidden.new_zeros((), dtype=torch.float32)
            w_ce = zero if g_ce_rows is None else g_ce_rows
            w_div = zero if g_div_rows is None else g_div_rows
            w_z = g_zsq_rows
            if g_loss is not None:
                w_ce = w_ce + g_loss * scale
                w_div = w_div + g_loss * scale * alpha
                if ctx.cfg.z_loss > 0:
                    w_z = (zero if w_z is None else w_z) + g_loss * scale * ctx.cfg.z_loss
            *_, grads = chunked_pass(hidden, weight, bias, target, ctx.cfg,
                                     _row_weights(hidden.shape[1], w_ce, w_div, w_z), needs)
            factor = None
        g_hidden, g_weight, g_bias = grads
        if factor is not None:
            g_hidden = None if g_hidden is None else (g_hidden * factor).to(hidden.dtype)
            g_weight = None if g_weight is None else g_weight * factor
            g_bias = None if g_bias is None else g_bias * factor
        g_weight = None if g_weight is None else g_weight.to(weight.dtype)
        g_bias = None if g_bias is None else g_bias.to(bias.dtype)
        return g_hidden, g_weight, g_bias, g_alpha, None, None, None, None
