"""The loss on materialised logits: torch.library custom ops around a backend (so torch.compile
traces callers without a graph break) and the autograd Function that decides, from the graph
alone, whether the gradient can be produced in the forward.

LogitsLoss returns per row the mean cross-entropy over the K passes, the divergence and the
z-loss term (1/K) Σ_k lse_k², plus the reduced loss of ops/loss_terms.py. When that reduced loss
is what training differentiates (spec.one_pass), the row weights are known before the kernels
run, so the one-pass forward writes the gradient while each token's rows are still in cache, and
backward only scales it by grad_output. Autograd hands backward a gradient for the per-row outputs
only when something else used them (reduction "none", or ce / divergence in another expression);
then the exact two-pass backward runs with those weights. The decision reads no tensor value, so it
costs no host-device synchronisation. A vocabulary split over ranks (spec.group) goes through the
ops of ops/sharded.py instead, with the same Function.

Second derivatives: when the gradient is itself differentiated (create_graph=True), backward
recomputes the rows with the eager backend's differentiable form and lets autograd take the
gradient, so a gradient penalty sees the true Hessian-vector product on every backend.
"""

from __future__ import annotations

import torch

from . import eager, registry
from .backend import EarlyGrad, RowStats, RowWeights
from .loss_terms import any_row_grad, coef_grad, reduced_loss, row_weights
from .scale import scale_
from .sharded import shard_rows, shard_rows_grad
from .spec import LossSpec, spec_of
from .checks import row_targets

Tensor = torch.Tensor


def _stats_fake(logits: Tensor, target: Tensor) -> tuple[Tensor, ...]:
    k, n = logits.shape[0], target.numel()
    dtype = eager.compute_dtype(logits.dtype)
    return (logits.new_empty(n, dtype=dtype), logits.new_empty(n, dtype=dtype),
            logits.new_empty((k, n), dtype=dtype), logits.new_empty((k, n), dtype=dtype))


def _run(logits, target, active, weights, spec: LossSpec, grad) -> tuple[Tensor, ...]:
    row_target = row_targets(target, active, logits.shape[-1], spec)
    early = None if weights is None else EarlyGrad(RowWeights.unpacked(weights), grad)
    return (*registry.get(spec.backend).forward(logits, row_target, spec, early), row_target)


@torch.library.custom_op("intradistill::rows", mutates_args=())
def rows(logits: Tensor, target: Tensor, active: Tensor, weights: Tensor | None, key: str,
         scalars: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(ce [N], div [N], lse [K, N], stat [K, N], row_target [N], grad): with row weights, grad is
    the gradient written in the forward's sweep (the one-pass forward), else empty."""
    grad = logits.new_empty(0) if weights is None else torch.empty_like(logits)
    return (*_run(logits, target, active, weights, spec_of(key, scalars), grad), grad)


@rows.register_fake
def _(logits, target, active, weights, key, scalars):
    grad = logits.new_empty(0) if weights is None else torch.empty_like(logits)
    return (*_stats_fake(logits, target), torch.empty_like(target), grad)


@torch.library.custom_op("intradistill::rows_", mutates_args=("logits",))
def rows_(logits: Tensor, target: Tensor, active: Tensor, weights: Tensor, key: str,
          scalars: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As rows with weights, the gradient written over the logits themselves."""
    return _run(logits, target, active, weights, spec_of(key, scalars), logits)


@rows_.register_fake
def _(logits, target, active, weights, key, scalars):
    return (*_stats_fake(logits, target), torch.empty_like(target))


@torch.library.custom_op("intradistill::rows_grad", mutates_args=())
def rows_grad(logits: Tensor, row_target: Tensor, lse: Tensor, stat: Tensor, weights: Tensor, key: str,
              scalars: list[float]) -> Tensor:
    grad = torch.empty_like(logits)
    spec = spec_of(key, scalars)
    registry.get(spec.backend).backward(logits, row_target, lse, stat, RowWeights.unpacked(weights), spec, grad)
    return grad


@rows_grad.register_fake
def _(logits, row_target, lse, stat, weights, key, scalars):
    return torch.empty_like(logits)


@torch.library.custom_op("intradistill::rows_grad_", mutates_args=("logits",))
def rows_grad_(logits: Tensor, row_target: Tensor, lse: Tensor, stat: Tensor, weights: Tensor, key: str,
               scalars: list[float]) -> None:
    """Writes the gradient over the logits themselves (each element is read before it is written,
    by the same program), saving a [K, *B, V] buffer."""
    spec = spec_of(key, scalars)
    registry.get(spec.backend).backward(logits, row_target, lse, stat, RowWeights.unpacked(weights), spec, logits)


def differentiable_rows(logits: Tensor, row_target: Tensor, spec: LossSpec) -> RowStats:
    """The rows as a differentiable function of the logits (the eager backend's form)."""
    return eager.row_terms(eager.active_transformed(logits, row_target, spec), row_target, spec)


def refuse_second_order(spec: LossSpec) -> None:
    if spec.inplace:
        raise RuntimeError("inplace_grad=True overwrote the logits with their gradient, so that gradient cannot be "
                           "differentiated again (create_graph=True); use inplace_grad=False")
    if spec.group:
        raise RuntimeError("the vocabulary-parallel losses are differentiable once: their gradient cannot be "
                           "differentiated again (create_graph=True)")


class LogitsLoss(torch.autograd.Function):
    """(ce_rows, div_rows, zsq_rows, loss) of logits [K, *B, V]; target int64 [N] (any value where
    `active` is False), active bool [N], coef = [alpha, scale] (alpha may require grad)."""

    @staticmethod
    def forward(ctx, logits, target, active, coef, spec: LossSpec):
        ctx.set_materialize_grads(False)
        k, n = logits.shape[0], target.numel()
        weights = row_weights(spec, k, n, coef).packed() if spec.one_pass else None
        key, scalars = spec.key(), spec.scalars()
        shard = None
        if spec.group:
            ce, div, lse, stat, row_target, shard, grad = shard_rows(logits, target, active, weights, key, scalars)
        elif spec.one_pass and spec.inplace:
            ce, div, lse, stat, row_target = rows_(logits, target, active, weights, key, scalars)
            grad = logits
        else:
            ce, div, lse, stat, row_target, grad = rows(logits, target, active, weights, key, scalars)
        factor = spec.div_factor(k)
        div = div * factor if factor != 1.0 else div
        zsq = lse.square().mean(0)  # 0 at inactive rows: lse is 0 there
        loss = reduced_loss(spec, coef, ce, div, zsq)
        ctx.save_for_backward(logits, row_target, lse, stat, coef, div, grad, shard)
        ctx.spec = spec
        return ce, div, zsq, loss

    @staticmethod
    def backward(ctx, g_ce, g_div, g_zsq, g_loss):
        logits, row_target, lse, stat, coef, div, grad, shard = ctx.saved_tensors
        spec, g_rows = ctx.spec, (g_ce, g_div, g_zsq)
        g_coef = coef_grad(coef, g_loss, div) if ctx.needs_input_grad[3] else None
        if not ctx.needs_input_grad[0] or (g_loss is None and not any_row_grad(g_rows)):
            return None, None, None, g_coef, None
        k, n = logits.shape[0], row_target.numel()
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable
            refuse_second_order(spec)
            terms = differentiable_rows(logits, row_target, spec)
            w = row_weights(spec, k, n, coef, g_rows, g_loss)
            total = (w.ce * terms.ce).sum() + (w.div * terms.div).sum()
            if w.z is not None:
                total = total + (w.z * terms.lse.square().mean(0)).sum()
            (grad,) = torch.autograd.grad(total, logits, create_graph=True)
            return grad, None, None, g_coef, None
        if spec.one_pass and not any_row_grad(g_rows):
            scale_(grad, g_loss)
            return grad, None, None, g_coef, None
        if spec.one_pass and spec.inplace:
            raise RuntimeError(
                "inplace_grad=True wrote the gradient of `loss` over the logits during the forward, so "
                "only `loss` can be differentiated; the per-row terms (ce / divergence with reduction "
                "'none', or used in another expression) need inplace_grad=False")
        weights = row_weights(spec, k, n, coef, g_rows, g_loss).packed()
        key, scalars = spec.key(), spec.scalars()
        if spec.group:
            grad = shard_rows_grad(logits, row_target, shard, lse, stat, weights, key, scalars)
        elif spec.inplace:
            rows_grad_(logits, row_target, lse, stat, weights, key, scalars)
            grad = logits
        else:
            grad = rows_grad(logits, row_target, lse, stat, weights, key, scalars)
        return grad, None, None, g_coef, None
