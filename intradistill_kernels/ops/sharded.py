"""A vocabulary split over the ranks of a process group (tensor parallelism, Megatron-LM's
convention): each rank holds the contiguous classes [V_0, V_1) of every row, ranks in order,
shards possibly of different sizes; targets are global class ids.

No rank holds a full row, but everything the loss needs combines from per-rank partial
statistics, a few floats per row and pass (docs/design.md §1.13, docs/distributed.md):
- the backend's forward on the shard gives its log-sum-exp lse_r and s_r = Σ p̂·(t − t̄) with p̂
  the shard's own softmax (t̄ is per class, so local); globally lse = logsumexp_r lse_r and
  s = Σ_r exp(lse_r − lse)·s_r: one all-reduce MAX, then one all-reduce SUM that also carries
  the target logit (from the one shard that owns it) and, with label smoothing, the row sums;
- JS: log p̄ is per class, so KL_k is a sum of shard pieces once the global lse is known (a
  second SUM).
The gradient needs no communication: the backend's backward on a shard with the global lse and s
is exactly that shard's slice. Two terms differ from an unsharded row: the one-hot term belongs
to the shard that owns the target (others get a target >= V_local, which matches no column), and
label smoothing's ε/V uses the global V (the backward is given ε' = ε·V_local/V; the owner then
adds (ε − ε')·w_ce/K at its target column, where the kernel applied 1 − ε' instead of 1 − ε).

The ops below are what LogitsLoss calls when spec.group names a process group; the fused-linear
loss calls `combine` and `shard_gradient` chunk by chunk.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import eager, registry
from .backend import RowStats, RowWeights
from .spec import LossSpec, spec_of
from .checks import check_target_values

Tensor = torch.Tensor


def process_group(spec: LossSpec):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(spec.group)


def _comm_device(group, t: Tensor) -> torch.device:
    """Where the group's collectives take tensors: gloo on the CPU, NCCL on the GPU."""
    return t.device if dist.get_backend(group) != "gloo" else torch.device("cpu")


def all_reduce(t: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    """t reduced over the group (returned on t's device; gloo reduces a CPU copy)."""
    buf = t.to(_comm_device(group, t), copy=True)  # the caller keeps t
    dist.all_reduce(buf, op=op, group=group)
    return buf.to(t.device)


def shard_range(v_local: int, group, like: Tensor) -> tuple[int, int]:
    """(first global class of this rank's shard, global V), from every rank's shard size."""
    sizes = [torch.zeros((), dtype=torch.int64, device=_comm_device(group, like)) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor(v_local, dtype=torch.int64, device=sizes[0].device), group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def local_targets(target: Tensor, active: Tensor, v_start: int, v_local: int, v_total: int, spec: LossSpec) -> Tensor:
    """-1 for inactive rows, the local column of the target where this shard owns it, and v_local
    (a column no kernel matches) where another shard does."""
    if spec.has_ce:
        check_target_values(target, active, v_total, spec)
    local = target - v_start
    owned = (local >= 0) & (local < v_local)
    return torch.where(active, torch.where(owned & spec.has_ce, local, v_local), -1)


def _owned(local_target: Tensor, v_local: int) -> Tensor:
    return (local_target >= 0) & (local_target < v_local)


def _target_logits(logits: Tensor, local_target: Tensor, spec: LossSpec) -> Tensor:
    """Transformed target logit t_y [K, N] where this shard owns the target, 0 elsewhere."""
    k, v_local = logits.shape[0], logits.shape[-1]
    owned = _owned(local_target, v_local)
    idx = torch.where(owned, local_target, 0).view(1, -1, 1).expand(k, -1, 1)
    t_y = eager.transform(logits.reshape(k, -1, v_local).gather(-1, idx).squeeze(-1), spec)
    return torch.where(owned, t_y, 0.0)


def _kl_to_mean(t: Tensor, lse: Tensor) -> Tensor:
    """This shard's part of KL(p_k ‖ p̄) per row, from the global log-sum-exp."""
    logp = t - lse[..., None].to(t.dtype)
    return eager.masked_product(logp.exp(), logp - eager.log_mean_prob(logp)).sum(-1)


def combine(logits: Tensor, local_target: Tensor, spec: LossSpec, group, v_total: int) -> RowStats:
    """The global statistics of every row from this rank's shard of its logits (collective)."""
    active = local_target >= 0
    impl = registry.get(spec.backend)
    _, _, lse_r, s_r = impl.forward(logits, torch.where(active, 0, -1), spec.with_(has_ce=False, divergence="x"))
    m = all_reduce(lse_r, group, dist.ReduceOp.MAX)
    m = torch.where(m == float("-inf"), 0.0, m)
    w = torch.exp(lse_r - m)
    # A shard whose row is -inf everywhere has lse_r = -inf and s_r = NaN: it contributes 0.
    pieces = [w, torch.where(w > 0, w * s_r, 0.0)]
    if spec.has_ce:
        pieces.append(_target_logits(logits, local_target, spec))
        if spec.smooth:
            pieces.append(torch.cat([t.sum(-1) for _, t in eager.transformed_rows(logits, local_target, spec)], -1))
    summed = all_reduce(torch.stack(pieces), group)
    lse = m + torch.log(summed[0])
    if spec.js:
        chunks = eager.transformed_rows(logits, local_target, spec)
        kl = torch.cat([_kl_to_mean(t, lse[:, rows]) for rows, t in chunks], -1)
        stat = all_reduce(kl.to(lse.dtype), group)
    else:
        stat = summed[1] / summed[0]
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    lse, stat = torch.where(active, lse, zero), torch.where(active, stat, zero)
    ce = torch.zeros_like(lse[0])
    if spec.has_ce:
        ce_k = lse - (1 - spec.label_smoothing) * summed[2]
        if spec.smooth:
            ce_k = ce_k - spec.label_smoothing / v_total * summed[3]
        ce = torch.where(active, ce_k.mean(0), zero)
    return RowStats(ce, stat.mean(0), lse.contiguous(), stat.contiguous())


def shard_gradient(logits: Tensor, local_target: Tensor, lse: Tensor, stat: Tensor, weights: RowWeights,
                   spec: LossSpec, v_total: int, grad: Tensor) -> None:
    """This shard's slice of the gradient, written into grad (which may be the logits: the target
    logits the smoothing correction needs are read first)."""
    k, v_local = logits.shape[0], logits.shape[-1]
    eps = spec.label_smoothing if spec.smooth else 0.0
    eps_local = eps * v_local / v_total
    t_y = _target_logits(logits, local_target, spec) if eps > 0 else None
    registry.get(spec.backend).backward(logits, local_target, lse, stat, weights,
                                        spec.with_(label_smoothing=eps_local), grad)
    if t_y is not None:
        owned = _owned(local_target, v_local)
        fix = (eps - eps_local) * weights.ce.to(t_y.dtype) / k * eager.chain(torch.ones_like(t_y), t_y, spec)
        fix = torch.where(owned, fix, 0.0)
        g = grad.view(k, -1, v_local)  # grad is dense here: allocated by the caller
        idx = torch.where(owned, local_target, 0).view(1, -1, 1).expand(k, -1, 1)
        g.scatter_add_(-1, idx, fix.unsqueeze(-1).to(g.dtype))


def _shard_stats_fake(logits: Tensor, target: Tensor):
    k, n = logits.shape[0], target.numel()
    dtype = eager.compute_dtype(logits.dtype)
    return (logits.new_empty(n, dtype=dtype), logits.new_empty(n, dtype=dtype),
            logits.new_empty((k, n), dtype=dtype), logits.new_empty((k, n), dtype=dtype))


@torch.library.custom_op("intradistill::shard_rows", mutates_args=())
def shard_rows(logits: Tensor, target: Tensor, active: Tensor, weights: Tensor | None, key: str,
               scalars: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(ce, div, lse, stat, local_target, shard = [V_0, V], grad) of this rank's shard: the rows
    as LogitsLoss's `rows` op gives them for the whole vocabulary; with weights, also the gradient
    (after the statistics are combined: a second sweep over the shard)."""
    spec = spec_of(key, scalars)
    group = process_group(spec)
    v_local = logits.shape[-1]
    v_start, v_total = shard_range(v_local, group, logits)
    local = local_targets(target, active, v_start, v_local, v_total, spec)
    stats = combine(logits, local, spec, group, v_total)
    grad = logits.new_empty(0)
    if weights is not None:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        shard_gradient(logits, local, stats.lse, stats.stat, RowWeights.unpacked(weights), spec, v_total, grad)
    return (*stats, local, torch.tensor([v_start, v_total]), grad)


@shard_rows.register_fake
def _(logits, target, active, weights, key, scalars):
    grad = logits.new_empty(0) if weights is None else logits.new_empty(logits.shape)
    return (*_shard_stats_fake(logits, target), torch.empty_like(target), torch.empty(2, dtype=torch.int64), grad)


@torch.library.custom_op("intradistill::shard_rows_grad", mutates_args=())
def shard_rows_grad(logits: Tensor, local_target: Tensor, shard: Tensor, lse: Tensor, stat: Tensor, weights: Tensor,
                    key: str, scalars: list[float]) -> Tensor:
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    shard_gradient(logits, local_target, lse, stat, RowWeights.unpacked(weights), spec_of(key, scalars),
                   int(shard[1]), grad)
    return grad


@shard_rows_grad.register_fake
def _(logits, local_target, shard, lse, stat, weights, key, scalars):
    return logits.new_empty(logits.shape)

