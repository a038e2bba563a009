"""The fused per-row loss: torch.library custom ops around a backend's kernels (so torch.compile
traces callers without a graph break) and the autograd Function that decides, from the graph
alone, whether the gradient can be produced in the forward.

FusedRows returns per row the mean cross-entropy over the K passes, the divergence and the
z-loss term (1/K) Σ_k lse_k², plus the reduced loss Σ scale·(ce + alpha·div + z_loss·zsq)
("mean": scale = 1/count; "sum": 1). When that reduced loss is what training differentiates, the
row weights are known before the kernels run, so the one-pass forward writes the gradient while
each token's rows are still in cache, and backward only scales it by grad_output. Autograd hands
backward a gradient for the per-row outputs only when something else used them (reduction
"none", or ce / divergence in another expression); then the exact two-pass backward runs with
those weights. The decision reads no tensor value, so it costs no host-device synchronisation.
"""

from __future__ import annotations

import torch

from . import backend_impl
from .backend import EarlyGrad, RowsConfig, RowWeights, run_forward

Tensor = torch.Tensor


def _cfg(js, label_smoothing, has_ce, logit_scale, softcap) -> RowsConfig:
    return RowsConfig(js=js, label_smoothing=label_smoothing, has_ce=has_ce, logit_scale=logit_scale, softcap=softcap)


def _stats_fake(logits, target):
    k, n = logits.shape[0], target.numel()
    def f32(*shape):
        return logits.new_empty(shape, dtype=torch.float32)
    return f32(n), f32(n), f32(k, n), f32(k, n)


@torch.library.custom_op("intradistill::rows", mutates_args=())
def rows(logits: Tensor, target: Tensor, js: bool, label_smoothing: float, has_ce: bool, logit_scale: float,
         softcap: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ce [N], div [N], lse [K, N], stat [K, N]) of the rows."""
    return tuple(backend_impl(backend).forward(logits, target, _cfg(js, label_smoothing, has_ce, logit_scale, softcap)))


@rows.register_fake
def _rows_fake(logits, target, js, label_smoothing, has_ce, logit_scale, softcap, backend):
    return _stats_fake(logits, target)


@torch.library.custom_op("intradistill::rows_early", mutates_args=())
def rows_early(logits: Tensor, target: Tensor, w_ce: Tensor, w_div: Tensor, w_z: Tensor | None, js: bool,
               label_smoothing: float, has_ce: bool, logit_scale: float, softcap: float,
               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The row statistics and, from the same sweep, the gradient with the given row weights."""
    grad = torch.empty_like(logits)
    stats = run_forward(backend_impl(backend), logits, target, _cfg(js, label_smoothing, has_ce, logit_scale, softcap),
                        EarlyGrad(RowWeights(w_ce, w_div, w_z), grad))
    return (*stats, grad)


@rows_early.register_fake
def _rows_early_fake(logits, target, w_ce, w_div, w_z, js, label_smoothing, has_ce, logit_scale, softcap, backend):
    return (*_stats_fake(logits, target), torch.empty_like(logits))


@torch.library.custom_op("intradistill::rows_early_", mutates_args=("logits",))
def rows_early_(logits: Tensor, target: Tensor, w_ce: Tensor, w_div: Tensor, w_z: Tensor | None, js: bool,
                label_smoothing: float, has_ce: bool, logit_scale: float, softcap: float,
                backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """As rows_early, with the gradient written over the logits themselves."""
    return tuple(run_forward(backend_impl(backend), logits, target, _cfg(js, label_smoothing, has_ce, logit_scale, softcap),
                             EarlyGrad(RowWeights(w_ce, w_div, w_z), logits)))


@rows_early_.register_fake
def _rows_early__fake(logits, target, w_ce, w_div, w_z, js, label_smoothing, has_ce, logit_scale, softcap, backend):
    return _stats_fake(logits, target)


@torch.library.custom_op("intradistill::rows_backward", mutates_args=())
def rows_backward(logits: Tensor, target: Tensor, lse: Tensor, stat: Tensor, w_ce: Tensor, w_div: Tensor,
                  w_z: Tensor | None, js: bool, label_smoothing: float, has_ce: bool, logit_scale: float,
                  softcap: float, backend: str) -> Tensor:
    grad = torch.empty_like(logits)
    backend_impl(backend).backward(logits, target, lse, stat, RowWeights(w_ce, w_div, w_z),
                                   _cfg(js, label_smoothing, has_ce, logit_scale, softcap), grad)
    return grad


@rows_backward.register_fake
def _rows_backward_fake(logits, target, lse, stat, w_ce, w_div, w_z, js, label_smoothing, has_ce, logit_scale,
                        softcap, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("intradistill::rows_backward_", mutates_args=("logits",))
def rows_backward_(logits: Tensor, target: Tensor, lse: Tensor, stat: Tensor, w_ce: Tensor, w_div: Tensor,
                   w_z: Tensor | None, js: bool, label_smoothing: float, has_ce: bool, logit_scale: float,
                   softcap: float, backend: str) -> None:
    """Writes the gradient over the logits themselves (each element is read before it is written,
    by the same program), saving a [K, *B, V] buffer."""
    backend_impl(backend).backward(logits, target, lse, stat, RowWeights(w_ce, w_div, w_z),
                                   _cfg(js, label_smoothing, has_ce, logit_scale, softcap), logits)


@torch.library.custom_op("intradistill::scale_", mutates_args=("grad",))
def scale_(grad: Tensor, factor: Tensor) -> None:
    """grad *= factor, leaving grad untouched where factor == 1 (what loss.backward() passes).

    On the CPU the factor is read directly. On a GPU reading it would synchronise, so the test
    runs on the device: the scaling kernel's programs load the factor and return at once when it
    is 1 (only their launch costs anything) — see ops/triton/scale.py."""
    if grad.device.type == "cpu":
        if float(factor) != 1.0:
            grad.mul_(factor.to(grad.dtype))
        return
    from .triton import scale as triton_scale

    if triton_scale.usable(grad):
        triton_scale.scale_unless_one_(grad, factor)
    else:
        grad.mul_(factor.to(grad.dtype))


def _weights(n: int, w_ce, w_div, w_z):
    def vec(w):
        return None if w is None else w.to(torch.float32).expand(n).contiguous()
    return vec(w_ce), vec(w_div), vec(w_z)


class FusedRows(torch.autograd.Function):
    """(ce_rows, div_rows, zsq_rows, loss) of a backend's fused kernels; see the module docstring.

    Inputs: logits [K, *B, V]; target int64 [N] (-1: inactive row); alpha and scale 0-d tensors
    (alpha may require grad); then the Python constants."""

    @staticmethod
    def forward(ctx, logits, target, alpha, scale, z_loss: float, div_factor: float, js: bool,
                label_smoothing: float, has_ce: bool, logit_scale: float, softcap: float, inplace: bool,
                early: bool, backend: str):
        ctx.set_materialize_grads(False)
        consts = (js, label_smoothing, has_ce, logit_scale, softcap)
        n = target.numel()
        grad = None
        if early:
            w = _weights(n, scale, scale * alpha * div_factor, scale * z_loss if z_loss > 0 else None)
            if inplace:
                ce, div, lse, stat = rows_early_(logits, target, *w, *consts, backend)
                grad = logits
            else:
                ce, div, lse, stat, grad = rows_early(logits, target, *w, *consts, backend)
        else:
            ce, div, lse, stat = rows(logits, target, *consts, backend)
        div = div * div_factor if div_factor != 1.0 else div
        zsq = lse.square().mean(0)  # 0 at inactive rows: the kernels write lse = 0 there
        loss = scale * (ce.sum() + alpha * div.sum() + z_loss * zsq.sum())
        ctx.save_for_backward(logits, target, lse, stat, alpha, scale, div, grad)
        ctx.consts = (z_loss, div_factor, consts, inplace, early, backend)
        return ce, div, zsq, loss

    @staticmethod
    def backward(ctx, g_ce, g_div, g_zsq, g_loss):
        logits, target, lse, stat, alpha, scale, div, grad = ctx.saved_tensors
        z_loss, div_factor, consts, inplace, early, backend = ctx.consts
        g_alpha = None
        if ctx.needs_input_grad[2] and g_loss is not None:
            g_alpha = (g_loss * scale * div.sum()).to(alpha.dtype)
        rows_used = g_ce is not None or g_div is not None or g_zsq is not None
        if not ctx.needs_input_grad[0] or (g_loss is None and not rows_used):
            return (None, None, g_alpha) + (None,) * 11
        if early and not rows_used:
            scale_(grad, g_loss)
            return (grad, None, g_alpha) + (None,) * 11
        if early and inplace:
            raise RuntimeError(
                "inplace_grad=True wrote the gradient of `loss` over the logits during the forward, so "
                "only `loss` can be differentiated; the per-row terms (ce / divergence with reduction "
                "'none', or used in another expression) need inplace_grad=False")
        n = target.numel()
        zero = lse.new_zeros(())
        w_ce = zero if g_ce is None else g_ce
        w_div = zero if g_div is None else g_div * div_factor
        w_z = g_zsq
        if g_loss is not None:
            w_ce = w_ce + g_loss * scale
            w_div = w_div + g_loss * scale * alpha * div_factor
            if z_loss > 0:
                w_z = (zero if w_z is None else w_z) + g_loss * scale * z_loss
        w = _weights(n, w_ce, w_div, w_z)
        if inplace:
            rows_backward_(logits, target, lse, stat, *w, *consts, backend)
            grad = logits
        else:
            grad = rows_backward(logits, target, lse, stat, *w, *consts, backend)
        return (grad, None, g_alpha) + (None,) * 11
