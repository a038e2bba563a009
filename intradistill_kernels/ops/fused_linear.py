"""Fused linear intra-distillation: the loss on hidden states and the output weight, with only a
chunk of the [K, N, V] logits alive at a time.

Per chunk of tokens (all K passes of a token in the same chunk: the divergence couples them):
one GEMM with fp32 output for the K passes, the backend's fused forward kernel, then at once its
backward kernel with the per-row weights known in advance, writing d(logits) over the chunk's
logits; grad_hidden = dlogits @ W and grad_weight / grad_bias accumulate in fp32 across chunks.
The gradients are thus computed during the forward (the loss is normally the last op) and scaled
by grad_output in backward. Tokens whose target is ignore_index are dropped before any GEMM.

When the gradient reaching backward is not a multiple of the one assumed in forward (reduction
"none", or gradients on the ce / divergence outputs themselves), the chunks are recomputed in
backward with the right per-row weights: one more GEMM pass.
"""

from __future__ import annotations

import torch

from .. import functional as F
from .. import reference
from . import backend_impl
from .rows import row_offsets

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


def _chunk_rows_and_grad(logits, target, divergence, label_smoothing, backend, w_ce, w_div):
    """(ce_rows, div_rows) of one chunk and d(Σ w_ce·ce + w_div·div)/d(logits), written in place
    over the chunk's logits when a fused backend runs (None when no gradient is wanted)."""
    k = logits.shape[0]
    active = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
    if backend == "torch":
        want_grad = w_ce is not None
        z = logits.detach().requires_grad_(want_grad)
        with torch.enable_grad():
            ce = reference.cross_entropy_rows(z, target, active, label_smoothing)
            div = reference.DIVERGENCE_ROWS[divergence](z, active)
            if not want_grad:
                return ce.detach(), div.detach(), None
            (grad,) = torch.autograd.grad((w_ce * ce + w_div * div).sum(), z)
        return ce.detach(), div.detach(), grad
    impl = backend_impl(backend)
    off = row_offsets(logits)
    js = divergence == "js"
    ce, div, lse, stat = impl.forward(logits, off, target, js, label_smoothing, True)
    scale = k / (k - 1) if divergence == "jeffrey" else 1.0
    if divergence == "jeffrey":
        div = div * scale
    if w_ce is None:
        return ce, div, None
    impl.backward(logits, off, target, lse, stat, w_ce.float().contiguous(), (w_div * scale).float().contiguous(),
                  js, label_smoothing, True, logits, off)
    return ce, div, logits


def chunked_pass(hidden, weight, bias, target, divergence, label_smoothing, backend, chunk, w_ce=None, w_div=None):
    """Runs every chunk; returns per-row (ce, div) and, when row weights are given, the gradients
    (grad_hidden [K, M, H] in hidden's dtype, grad_weight and grad_bias in fp32)."""
    k, m, hdim = hidden.shape
    rows_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    ce_rows = hidden.new_empty(m, dtype=rows_dtype)
    div_rows = hidden.new_empty(m, dtype=rows_dtype)
    grads = None
    if w_ce is not None:
        grads = (torch.empty_like(hidden), torch.zeros(weight.shape, dtype=rows_dtype, device=weight.device),
                 None if bias is None else torch.zeros(bias.shape, dtype=rows_dtype, device=bias.device))
    w_fp = weight if weight.is_cuda or weight.dtype in (torch.float32, torch.float64) else weight.to(torch.float32)
    for start in range(0, m, chunk):
        end = min(m, start + chunk)
        h = hidden[:, start:end]
        logits = _logits_f32(h, w_fp, bias)
        sel = slice(start, end)
        ce, div, dlogits = _chunk_rows_and_grad(
            logits, target[sel], divergence, label_smoothing, backend,
            None if w_ce is None else w_ce[sel], None if w_div is None else w_div[sel])
        ce_rows[sel], div_rows[sel] = ce, div
        if dlogits is not None:
            g_hidden, g_weight, g_bias = grads
            d = dlogits.reshape(-1, dlogits.shape[-1])
            g_hidden[:, sel] = _mm_f32(d, w_fp).view(k, end - start, hdim).to(hidden.dtype)
            g_weight += _mm_f32(d.T, h.reshape(-1, hdim))
            if g_bias is not None:
                g_bias += d.sum(0)
        del logits, dlogits
    return ce_rows, div_rows, grads


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, alpha, divergence, label_smoothing, backend, chunk, reduction, count):
        # Weights of the per-row terms in loss = ce + alpha * div for "mean" and "sum".
        assume = reduction != "none" and any(ctx.needs_input_grad[:3])
        scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0
        m = hidden.shape[1]
        w_ce = torch.full((m,), scale, device=hidden.device) if assume else None
        w_div = torch.full((m,), scale * alpha, device=hidden.device) if assume else None
        ce_rows, div_rows, grads = chunked_pass(hidden, weight, bias, target, divergence, label_smoothing, backend,
                                                chunk, w_ce, w_div)
        ctx.save_for_backward(hidden, weight, bias, target)
        ctx.config = (alpha, divergence, label_smoothing, backend, chunk, reduction, scale)
        ctx.grads = grads
        return ce_rows, div_rows

    @staticmethod
    def backward(ctx, g_ce_rows, g_div_rows):
        hidden, weight, bias, target = ctx.saved_tensors
        alpha, divergence, label_smoothing, backend, chunk, reduction, scale = ctx.config
        m = hidden.shape[1]
        zeros = torch.zeros(m, device=hidden.device)
        g_ce_rows = zeros if g_ce_rows is None else g_ce_rows.float()
        g_div_rows = zeros if g_div_rows is None else g_div_rows.float()
        grads = ctx.grads
        factor = None
        if grads is not None and m > 0:
            # The forward assumed row weights (scale, scale * alpha); reuse its gradients when the
            # incoming ones are a common multiple of them.
            f = g_ce_rows[0] / scale
            if torch.allclose(g_ce_rows, torch.full_like(g_ce_rows, float(f) * scale), rtol=0, atol=0) and \
               torch.allclose(g_div_rows, torch.full_like(g_div_rows, float(f) * scale * alpha), rtol=1e-6, atol=0):
                factor = float(f)
        if factor is None:
            _, _, grads = chunked_pass(hidden, weight, bias, target, divergence, label_smoothing, backend, chunk,
                                       g_ce_rows, g_div_rows)
            factor = 1.0
        ctx.grads = None
        g_hidden, g_weight, g_bias = grads
        g_hidden = g_hidden * factor if factor != 1.0 else g_hidden
        g_weight = (g_weight * factor).to(weight.dtype)
        g_bias = None if g_bias is None else (g_bias * factor).to(bias.dtype)
        return g_hidden, g_weight, g_bias, None, None, None, None, None, None, None, None


def fused_linear_intra_distillation_loss(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, alpha: float = 1.0, *,
    divergence: str = "x", label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
    backend: str = "auto", chunk_size: int | None = None,
) -> F.IntraDistillationOutput:
    """intra_distillation_loss(hidden @ weight.T + bias, target, ...) without materialising the
    [K, *B, V] logits: same values, same gradients for hidden, weight and bias.

    hidden [K, *B, H]; weight [V, H]; bias [V] or None; chunk_size: tokens per chunk (default
    from the free memory).
    """
    k, batch_shape, hdim = F._check_logits(hidden, "hidden")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if weight.dim() != 2 or weight.shape[1] != hdim or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, H] with H = {hdim} (hidden's last dim) and V >= 1, got {list(weight.shape)}")
    v = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must have shape [V] = [{v}], got {list(bias.shape)}")
    F._check_choice("reduction", reduction, F.REDUCTIONS)
    F._check_choice("divergence", divergence, F.DIVERGENCES)
    F._check_float("alpha", alpha, 0.0)
    F._check_float("label_smoothing", label_smoothing, 0.0, 1.0)
    if isinstance(alpha, Tensor):
        alpha = float(alpha)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    target_flat, active = F._check_target(target, batch_shape, v, ignore_index, hidden.device)
    logits_dtype = "float64" if hidden.dtype == torch.float64 else "float32"
    F._check_choice("backend", backend, ("auto",) + F.BACKENDS)
    backend = F._pick_backend(backend, str(hidden.device), logits_dtype, k)

    keep = active.nonzero().squeeze(1)
    h = hidden.reshape(k, -1, hdim)[:, keep]
    y = target_flat[keep]
    m = int(keep.numel())
    chunk = chunk_size or default_chunk_size(k, max(m, 1), v, hidden.device)
    ce_kept, div_kept = _FusedLinearLoss.apply(h, weight, bias, y, float(alpha), divergence, float(label_smoothing),
                                               backend, chunk, reduction, m)
    zeros = ce_kept.new_zeros(active.numel())
    ce_rows = zeros.index_put((keep,), ce_kept)
    div_rows = zeros.index_put((keep,), div_kept)
    ce = F._reduce(ce_rows, active, reduction, batch_shape)
    div = F._reduce(div_rows, active, reduction, batch_shape)
    return F.IntraDistillationOutput(ce + alpha * div, ce, div)


class FusedLinearIntraDistillationLoss(torch.nn.Module):
    """Module form of fused_linear_intra_distillation_loss; forward(hidden, weight, target, bias=None)."""

    def __init__(self, alpha: float = 1.0, *, divergence: str = "x", label_smoothing: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto", chunk_size: int | None = None):
        super().__init__()
        self.alpha, self.kwargs = alpha, dict(divergence=divergence, label_smoothing=label_smoothing,
                                              ignore_index=ignore_index, reduction=reduction, backend=backend,
                                              chunk_size=chunk_size)

    def forward(self, hidden, weight, target, bias=None, *, alpha=None):
        return fused_linear_intra_distillation_loss(hidden, weight, target, bias,
                                                    self.alpha if alpha is None else alpha, **self.kwargs)
