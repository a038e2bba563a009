"""The loss on materialised logits: torch.library custom ops around a backend (so torch.compile
traces callers without a graph break) and the autograd Function that decides, from the graph
alone, whether the gradient can be produced in the forward.

LogitsLoss returns the reduced loss of ops/loss_terms.py; RowTerms, a node of its own, the per-row
mean cross-entropy over the K passes, divergence and z-loss term (1/K) Σ_k lse_k². When the
reduced loss is what training differentiates (spec.one_pass), its row weights are known before
the kernels run, so the one-pass forward writes the gradient while each token's rows are still in
cache, and backward only scales it by grad_output. Only when something uses the per-row terms
(reduction "none", or ce / divergence in another expression) does RowTerms' backward run the exact
second sweep, with their weights; autograd adds the two gradients (the gradient is linear in the
weights). Nothing reads a tensor value to decide, so there is no host-device synchronisation. A
vocabulary split over ranks (spec.group) goes through the ops of ops/sharded.py instead.

Second derivatives: when the gradient is itself differentiated (create_graph=True), backward
recomputes the rows with the eager backend's differentiable form and lets autograd take the
gradient, so a gradient penalty sees the true Hessian-vector product on every backend.
"""

from __future__ import annotations

import torch

from . import eager, registry
from .backend import EarlyGrad, RowStats, RowWeights
from .loss_terms import coef_grad, loss_weights, reduced_loss, rows_weights
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


def weighted_rows(logits: Tensor, row_target: Tensor, spec: LossSpec, weights: RowWeights) -> Tensor:
    """Σ_rows w.ce·ce + w.div·div + w.z·zsq as a differentiable function of the logits: what
    backward differentiates with create_graph=True, so that the gradient is differentiable too."""
    if spec.inplace:
        raise RuntimeError("inplace_grad=True overwrites the logits with their gradient, so that gradient cannot be "
                           "differentiated again (create_graph=True); use inplace_grad=False")
    if spec.group:
        raise RuntimeError("the vocabulary-parallel losses are differentiable once: their gradient cannot be "
                           "differentiated again (create_graph=True)")
    terms = differentiable_rows(logits, row_target, spec)
    total = (weights.ce * terms.ce).sum() + (weights.div * terms.div).sum()
    if weights.z is not None:
        total = total + (weights.z * terms.lse.square().mean(0)).sum()
    return total


def _gradient(logits, row_target, lse_stat, shard, spec: LossSpec, weights: RowWeights) -> Tensor:
    """The gradient with the given row weights: the exact backward of the rows' backend (a second
    sweep over the logits), or, when it is to be differentiated again, autograd's."""
    if torch.is_grad_enabled():  # create_graph=True
        (grad,) = torch.autograd.grad(weighted_rows(logits, row_target, spec, weights), logits, create_graph=True)
        return grad
    lse, stat = lse_stat
    key, scalars, packed = spec.key(), spec.scalars(), weights.packed()
    if spec.group:
        return shard_rows_grad(logits, row_target, shard, lse, stat, packed, key, scalars)
    if spec.inplace:
        rows_grad_(logits, row_target, lse, stat, packed, key, scalars)
        return logits
    return rows_grad(logits, row_target, lse, stat, packed, key, scalars)


class LogitsLoss(torch.autograd.Function):
    """The reduced loss of logits [K, *B, V] (target int64 [N], any value where `active` is False;
    coef = [alpha, scale], alpha may require grad), and, not differentiable here, what RowTerms
    needs: rows = [ce, div, zsq] [3, N], lse_stat [2, K, N], the row targets and the shard."""

    @staticmethod
    def forward(ctx, logits, target, active, coef, spec: LossSpec):
        k, n = logits.shape[0], target.numel()
        weights = loss_weights(spec, k, n, coef).packed() if spec.one_pass else None
        key, scalars = spec.key(), spec.scalars()
        shard = logits.new_empty(0, dtype=torch.int64)
        if spec.group:
            ce, div, lse, stat, row_target, shard, grad = shard_rows(logits, target, active, weights, key, scalars)
        elif spec.one_pass and spec.inplace:
            ce, div, lse, stat, row_target = rows_(logits, target, active, weights, key, scalars)
            grad = logits
        else:
            ce, div, lse, stat, row_target, grad = rows(logits, target, active, weights, key, scalars)
        factor = spec.div_factor(k)
        div = div * factor if factor != 1.0 else div
        rows_out = torch.stack([ce, div, lse.square().mean(0)])  # zsq is 0 at inactive rows: lse is 0 there
        lse_stat = torch.stack([lse, stat])
        loss = reduced_loss(spec, coef, *rows_out)
        ctx.mark_non_differentiable(rows_out, lse_stat, row_target, shard)
        ctx.save_for_backward(logits, row_target, lse_stat, shard, coef, div, grad)
        ctx.spec = spec
        return loss, rows_out, lse_stat, row_target, shard

    @staticmethod
    def backward(ctx, g_loss, *_):
        logits, row_target, lse_stat, shard, coef, div, grad = ctx.saved_tensors
        spec = ctx.spec
        g_coef = coef_grad(coef, g_loss, div) if ctx.needs_input_grad[3] else None
        if not ctx.needs_input_grad[0] or g_loss is None:
            return None, None, None, g_coef, None
        if spec.one_pass and not torch.is_grad_enabled():
            scale_(grad, g_loss)  # the forward wrote the gradient of the loss
            return grad, None, None, g_coef, None
        weights = loss_weights(spec, logits.shape[0], row_target.numel(), coef, g_loss)
        return _gradient(logits, row_target, lse_stat, shard, spec, weights), None, None, g_coef, None


class RowTerms(torch.autograd.Function):
    """The per-row [ce, div, zsq] of LogitsLoss as a differentiable function of the logits. A node
    of its own, so that its backward (one exact sweep with the rows' weights) runs only when
    something uses the rows: never in a step that differentiates the loss alone, compiled or not
    (AOTAutograd would hand a single node zeros for its unused outputs, and run the sweep)."""

    @staticmethod
    def forward(ctx, logits, rows, lse_stat, row_target, shard, spec: LossSpec):
        ctx.save_for_backward(logits, row_target, lse_stat, shard)
        ctx.spec = spec
        return rows.clone()

    @staticmethod
    def backward(ctx, g_rows):
        logits, row_target, lse_stat, shard = ctx.saved_tensors
        spec = ctx.spec
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        if spec.one_pass and spec.inplace:
            raise RuntimeError(
                "inplace_grad=True wrote the gradient of `loss` over the logits during the forward, so "
                "only `loss` can be differentiated; the per-row terms (ce / divergence with reduction "
                "'none', or used in another expression) need inplace_grad=False")
        weights = rows_weights(spec, logits.shape[0], g_rows)
        return _gradient(logits, row_target, lse_stat, shard, spec, weights), None, None, None, None, None
