"""Vocabulary-parallel intra-distillation loss (tensor parallelism, Megatron-LM's convention).

Each rank holds the contiguous vocabulary slice [rank * V_local, (rank + 1) * V_local) of the
logits, [K, *B, V_local]; targets hold global class ids. No rank holds a full row, but everything
the loss needs combines from per-rank partial statistics, a few floats per row and pass:

- the fused kernel gives each shard's log-sum-exp lse_r and s_r = Σ p̂·(z − z̄) with p̂ the shard's
  own softmax (z̄ and p̄ are per class, so local); globally lse = logsumexp_r lse_r and
  s = Σ_r exp(lse_r − lse) · s_r: one all-reduce MAX, then one all-reduce SUM;
- cross-entropy: the target logit lives on one shard and the row sum for label smoothing is a
  sum of shard sums (same SUM all-reduce);
- JS: log p̄ is per class, so KL_k is a sum of shard pieces once the global lse is known (a
  second SUM all-reduce).

The backward needs no communication: the fused backward kernel run on a shard with the global
lse and s gives exactly that shard's divergence gradient; the cross-entropy gradient
(p − (1−ε)·onehot − ε/V) uses the global V and is added in torch (one extra pass over the shard,
as is the row sum when label smoothing is on).

backend="torch" (also what "auto" falls back to where no fused backend takes the tensors, e.g.
float64) computes the same shard statistics and gradients in eager torch, with the same
communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._core import (
    IntraDistillationOutput, REDUCTIONS, check_choice, check_logits, check_loss_options, check_mask, check_target,
    jeffrey_factor, loss_output, pick_backend, reduce_rows,
)
from .ops import backend_impl
from .ops.backend import RowsConfig, RowStats, RowWeights

Tensor = torch.Tensor


def _shard_range(v_local: int, group) -> tuple[int, int, int]:  # (v_start, v_total, rank)
    """(first global class of this shard, global V): shard sizes may differ (all-gathered once)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    sizes = [torch.zeros((), dtype=torch.int64) for _ in range(world)]
    mine = torch.tensor(v_local, dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        sizes = [s.cuda() for s in sizes]
        mine = mine.cuda()
    dist.all_gather(sizes, mine, group=group)
    sizes = [int(s) for s in sizes]
    return sum(sizes[:rank]), sum(sizes), rank


def _local_js_pieces(z: Tensor, lse: Tensor, active: Tensor) -> Tensor:
    """Σ_v over this shard of p_k (log p_k − log p̄) with the global lse: [K, N]."""
    logp = z.to(lse.dtype) - lse[..., None]
    dead = (logp == float("-inf")).all(0)
    mx = torch.where(dead, torch.zeros((), device=z.device), logp.max(0).values)
    lpbar = mx + torch.log(torch.exp(logp - mx).sum(0) / z.shape[0])
    p = logp.exp()
    diff = torch.where(p != 0, logp - lpbar, torch.zeros((), device=z.device))
    return torch.where(active, (p * diff).sum(-1), torch.zeros((), device=z.device))


def _masked_mul(p: Tensor, x: Tensor) -> Tensor:
    """p·x with 0 where p is 0: a class at -inf (in every pass) contributes nothing, not NaN."""
    return torch.where(p != 0, p * x, torch.zeros((), dtype=p.dtype, device=p.device))


class _TorchShard:
    """Eager stand-in for a fused backend on one shard (the two calls _VocabParallelRows makes)."""

    @staticmethod
    def forward(logits, row_target, cfg: RowsConfig) -> RowStats:
        k, v = logits.shape[0], logits.shape[-1]
        z = logits.reshape(k, -1, v).to(torch.promote_types(logits.dtype, torch.float32))
        lse_r = torch.logsumexp(z, -1)
        p_hat = torch.exp(z - lse_r[..., None])
        s_r = _masked_mul(p_hat, z - z.mean(0)).sum(-1)
        return RowStats(None, None, lse_r, s_r)

    @staticmethod
    def backward(logits, row_target, lse, stat, weights: RowWeights, cfg: RowsConfig, grad) -> None:
        k, v = logits.shape[0], logits.shape[-1]
        g_div = weights.div
        z = logits.reshape(k, -1, v).to(lse.dtype)
        logp = z - lse[..., None]
        p = logp.exp()
        if cfg.js:
            # d/dz_j of (1/K) Σ_k KL(p_k ‖ p̄) = (1/K) p_j (log p_j − log p̄ − KL_j)
            lpbar = torch.logsumexp(logp, 0) - torch.log(torch.tensor(float(k), dtype=lse.dtype))
            d = _masked_mul(p, logp - lpbar - stat[..., None])
        else:
            # d/dz_j of (1/K) Σ_k s_k = (1/K) [p_j (z_j − z̄ − s_j) + p_j − p̄]
            d = _masked_mul(p, z - z.mean(0) - stat[..., None]) + p - p.mean(0)
        w = g_div.to(lse.dtype) / k
        # Inactive rows may hold anything (huge or NaN logits): zero them, never multiply by 0.
        keep = (row_target >= 0)[None, :, None]
        grad.copy_(torch.where(keep, d * w[None, :, None], torch.zeros((), dtype=d.dtype)).view(grad.shape))


def _shard_impl(name: str):
    return _TorchShard if name == "torch" else backend_impl(name)


class _VocabParallelRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, active, divergence, eps, has_ce, backend, group, v_start, v_total):
        impl = _shard_impl(backend)
        k, v_local = logits.shape[0], logits.shape[-1]
        z = logits.reshape(k, -1, v_local)
        row_target = torch.where(active, torch.zeros_like(target), torch.full_like(target, -1))
        _, _, lse_r, s_r = impl.forward(logits, row_target, RowsConfig(js=False, label_smoothing=0.0, has_ce=False))
        # Shards whose row is -inf everywhere have lse_r = -inf and s_r = NaN: they contribute 0.
        m = lse_r.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
        w = torch.exp(lse_r - m_safe)
        pieces = [w, torch.where(w > 0, w * s_r, torch.zeros_like(w))]
        if has_ce:
            y_local = target - v_start
            owned = active & (y_local >= 0) & (y_local < v_local)
            idx = torch.where(owned, y_local, torch.zeros_like(y_local))
            z_y = torch.gather(z, 2, idx.view(1, -1, 1).expand(k, -1, 1)).squeeze(2).to(lse_r.dtype)
            pieces.append(torch.where(owned, z_y, torch.zeros_like(z_y)))
            pieces.append(z.to(lse_r.dtype).sum(-1) if eps > 0 else torch.zeros_like(w))
        stacked = torch.stack(pieces)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
        S = stacked[0]
        lse = m_safe + torch.log(S)
        zero = torch.zeros((), device=logits.device)
        if divergence == "js":
            kl = _local_js_pieces(z, lse, active)
            dist.all_reduce(kl, op=dist.ReduceOp.SUM, group=group)
            stat = kl
        else:
            stat = stacked[1] / S
        stat = torch.where(active, stat, zero)
        lse = torch.where(active, lse, zero)
        div = stat.mean(0)
        if divergence == "jeffrey":
            div = div * jeffrey_factor(k)
        ce = zero.expand_as(div)
        if has_ce:
            ce_k = lse - (1 - eps) * stacked[2] - (eps / v_total) * stacked[3]
            ce = torch.where(active, ce_k.mean(0), zero)
        ctx.save_for_backward(logits, target, active, lse.contiguous(), stat.contiguous())
        ctx.config = (divergence, eps, has_ce, backend, v_start, v_total)
        return ce, torch.where(active, div, zero)

    @staticmethod
    def backward(ctx, g_ce, g_div):
        logits, target, active, lse, stat = ctx.saved_tensors
        divergence, eps, has_ce, backend, v_start, v_total = ctx.config
        k, v_local = logits.shape[0], logits.shape[-1]
        g_div = torch.zeros_like(lse[0]) if g_div is None else g_div.to(lse.dtype)
        if divergence == "jeffrey":
            g_div = g_div * jeffrey_factor(k)
        row_target = torch.where(active, torch.zeros_like(target), torch.full_like(target, -1))
        grad = torch.empty_like(logits)
        _shard_impl(backend).backward(logits, row_target, lse, stat, RowWeights(torch.zeros_like(g_div), g_div.contiguous(), None),
                                      RowsConfig(js=divergence == "js", label_smoothing=0.0, has_ce=False), grad)
        if has_ce and g_ce is not None:
            z = logits.reshape(k, -1, v_local).to(lse.dtype)
            w = torch.where(active, g_ce.to(lse.dtype), torch.zeros((), device=z.device)) / k
            d = (torch.exp(z - lse[..., None]) - eps / v_total) * w[None, :, None]
            d = torch.where(active[None, :, None], d, torch.zeros((), dtype=d.dtype, device=d.device))
            y_local = target - v_start
            owned = active & (y_local >= 0) & (y_local < v_local)
            rows = owned.nonzero().squeeze(1)
            d[:, rows, y_local[rows]] -= (1 - eps) * w[rows]
            grad += d.view(grad.shape).to(grad.dtype)
        return grad, None, None, None, None, None, None, None, None, None


def _check_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel_* needs an initialised torch.distributed process group")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None (the default group), got {type(group).__name__} {group!r}")


def vocab_parallel_intra_distillation_loss(
    logits_shard: Tensor, target: Tensor, alpha: float = 1.0, *, divergence: str = "x",
    label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean", group=None,
    backend: str = "auto",
) -> IntraDistillationOutput:
    """intra_distillation_loss over logits sharded along the vocabulary across `group`.

    logits_shard [K, *B, V_local] holds this rank's contiguous slice of the classes (ranks in
    order; shards may differ in size); target [*B] holds global class ids. Every rank gets the
    full loss, and the gradient of its own shard.
    """
    _check_group(group)
    k, batch_shape, v_local = check_logits(logits_shard, "logits_shard")
    opts = check_loss_options(alpha, divergence, label_smoothing, ignore_index, reduction)
    name = pick_backend(backend, logits_shard, k)
    v_start, v_total, _ = _shard_range(v_local, group)
    target_flat, active = check_target(target, batch_shape, v_total, opts.ignore_index, logits_shard.device)
    ce_rows, div_rows = _VocabParallelRows.apply(logits_shard, target_flat, active, opts.divergence,
                                                 opts.label_smoothing, True, name, group, v_start, v_total)
    return loss_output(ce_rows, div_rows, active, batch_shape, opts)


def vocab_parallel_x_divergence(logits_shard: Tensor, mask: Tensor | None = None, reduction: str = "mean",
                                group=None, backend: str = "auto") -> Tensor:
    """x_divergence over logits sharded along the vocabulary (see vocab_parallel_intra_distillation_loss)."""
    _check_group(group)
    k, batch_shape, _ = check_logits(logits_shard, "logits_shard")
    check_choice("reduction", reduction, REDUCTIONS)
    active = check_mask(mask, batch_shape, logits_shard.device)
    name = pick_backend(backend, logits_shard, k)
    target = torch.zeros(active.shape, dtype=torch.long, device=logits_shard.device)
    v_start, v_total, _ = _shard_range(logits_shard.shape[-1], group)
    _, div_rows = _VocabParallelRows.apply(logits_shard, target, active, "x", 0.0, False, name, group, v_start, v_total)
    return reduce_rows(div_rows, active, reduction, batch_shape)
