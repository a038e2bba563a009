"""Losses over a vocabulary split across the ranks of a process group (tensor parallelism,
Megatron-LM's convention): each rank holds the contiguous classes [V_0, V_1) of the logits or of
the output layer's weight, ranks in order, shards possibly of different sizes; targets hold
global class ids and, like the hidden states, are the same on every rank of the group.

Every function takes every option of its unsharded counterpart and runs through the same ops
(ops/sharded.py combines the shards' partial statistics; docs/distributed.md gives the
communication and its cost), so it is traced by torch.compile and takes the one-pass path when
only the loss is differentiated. Every rank gets the full loss; the gradient of its own shard
(and, for the fused-linear form, the full gradient of the hidden states).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._core import IntraDistillationOutput, linear_loss, logits_loss

Tensor = torch.Tensor

__all__ = ["vocab_parallel_intra_distillation_loss", "vocab_parallel_x_divergence",
           "vocab_parallel_fused_linear_intra_distillation_loss"]


def _group_name(group) -> str:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("the vocab_parallel_* losses need an initialised torch.distributed process group")
    if group is None:
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None (the default group), got {type(group).__name__} {group!r}")
    return group.group_name


def vocab_parallel_intra_distillation_loss(
    logits_shard: Tensor, target: Tensor, alpha: float = 1.0, *, divergence: str = "x",
    label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean", group=None,
    backend: str = "auto", softcap: float | None = None, logit_scale: float = 1.0, z_loss: float = 0.0,
) -> IntraDistillationOutput:
    """intra_distillation_loss over logits sharded along the vocabulary across `group`.

    logits_shard [K, *B, V_local] holds this rank's contiguous slice of the classes (ranks in
    order; shards may differ in size); target [*B] holds global class ids. Label smoothing is over
    the global V. Every rank gets the full loss, and the gradient of its own shard.
    """
    options = dict(divergence=divergence, label_smoothing=label_smoothing, ignore_index=ignore_index,
                   reduction=reduction, backend=backend, softcap=softcap, logit_scale=logit_scale, z_loss=z_loss,
                   group=_group_name(group))
    return logits_loss(logits_shard, target, alpha, options, "logits_shard")


def vocab_parallel_x_divergence(logits_shard: Tensor, mask: Tensor | None = None, reduction: str = "mean",
                                group=None, backend: str = "auto", *, divergence: str = "x") -> Tensor:
    """x_divergence (or, with divergence="js", js_divergence) over logits sharded along the
    vocabulary (see vocab_parallel_intra_distillation_loss)."""
    options = dict(mask=mask, reduction=reduction, backend=backend, divergence=divergence, group=_group_name(group))
    return logits_loss(logits_shard, None, 1.0, options, "logits_shard").loss


def _local_shard(weight, bias, group):
    """(local weight, local bias, group) of an output layer given as DTensors sharded on the
    vocabulary dimension (torch's ColwiseParallel on lm_head), or as plain tensors."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # a torch without DTensor
        return weight, bias, group
    if not isinstance(weight, DTensor):
        if isinstance(bias, DTensor):
            raise TypeError("bias is a DTensor but weight is not: give both as DTensors or both as local shards")
        return weight, bias, group
    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"a DTensor weight must be sharded on the vocabulary dimension over a 1-D mesh "
                         f"(placements (Shard(dim=0),)), got placements {tuple(weight.placements)} on a {mesh.ndim}-D mesh")
    if bias is not None:
        if not isinstance(bias, DTensor) or tuple(bias.placements) != (Shard(0),):
            raise ValueError("with a DTensor weight, bias must be None or a DTensor sharded on dim 0 like it")
        bias = bias.to_local()
    mesh_group = mesh.get_group()
    if group is not None and group != mesh_group:
        raise ValueError("group differs from the process group of the DTensor weight's mesh: leave group=None")
    return weight.to_local(), bias, mesh_group


def vocab_parallel_fused_linear_intra_distillation_loss(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, alpha: float = 1.0, *,
    group=None, divergence: str = "x", label_smoothing: float = 0.0, ignore_index: int = -100,
    reduction: str = "mean", backend: str = "auto", chunk_size: int | None = None, softcap: float | None = None,
    logit_scale: float = 1.0, z_loss: float = 0.0,
) -> IntraDistillationOutput:
    """fused_linear_intra_distillation_loss with the output layer split along the vocabulary.

    weight [V_local, H] (and bias [V_local]) are this rank's contiguous rows of the output layer,
    ranks of `group` in order (shards may differ in size), or DTensors sharded on dim 0 (their
    local shard and mesh group are used); hidden [K, *B, H] and target [*B] (global class ids)
    are the same on every rank. No rank materialises more than one chunk of its [K, N, V_local]
    logits. hidden.grad is the full gradient on every rank (all-reduced once); weight.grad and
    bias.grad are this rank's slice of the unsharded gradient.
    """
    weight, bias, group = _local_shard(weight, bias, group)
    options = dict(divergence=divergence, label_smoothing=label_smoothing, ignore_index=ignore_index,
                   reduction=reduction, backend=backend, chunk_size=chunk_size, softcap=softcap,
                   logit_scale=logit_scale, z_loss=z_loss, group=_group_name(group))
    return linear_loss(hidden, weight, bias, target, alpha, options)
