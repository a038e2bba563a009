"""Intra-distillation inside TRL's `SFTTrainer` (trl 1.x).

`IntraDistillationSFTTrainer` is SFTTrainer with IntraDistillationMixin's training loss: TRL still
prepares the data (chat templates, completion-only labels), the training step runs the model with
intra-distillation applied (the K passes scored by the fused-linear loss inside its forward).
TRL's own training metrics that need per-token log-probabilities (token accuracy, entropy) are not
computed in training; evaluation is SFTTrainer's, unchanged (TRL's fused log-probability head).

SFTConfig settings that would train another objective, or that the K-fold batch cannot carry, are
refused when the trainer is made: `loss_type="dft"` (a reweighted NLL), `compute_loss_func`,
padding-free batches (`padding_free=True`, or `packing=True` with the "bfd" strategies: one packed
row whose attention boundaries are carried by `cu_seq_lens`), and a config that disables dropout.
TRL's own fused LM head stays for evaluation; Liger's layer kernels are compatible (TRL keeps
Liger's fused cross-entropy, which would replace the forward, off).
"""
from __future__ import annotations

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as exc:  # trl is optional: say how to get it
    raise ImportError("intradistill_kernels.integrations.trl needs the `trl` package; install it with "
                      "`pip install 'trl>=1,<2'`") from exc

from .transformers import IntraDistillationArguments, IntraDistillationMixin

__all__ = ["IntraDistillationArguments", "IntraDistillationSFTTrainer", "SFTConfig", "check_sft_config"]

_PACKED_STRATEGIES = ("bfd", "bfd_split")


def check_sft_config(args, compute_loss_func=None) -> None:
    """ValueError for the SFTConfig settings that conflict with intra-distillation, naming the remedy."""
    if getattr(args, "loss_type", "nll") not in ("nll", "chunked_nll"):
        raise ValueError(f"SFTConfig(loss_type={args.loss_type!r}) trains another objective than cross-entropy; "
                         "intra-distillation adds its divergence to the cross-entropy: set loss_type='nll'")
    if compute_loss_func is not None:
        raise ValueError("compute_loss_func would be ignored: the training loss is intra-distillation's "
                         "(cross-entropy + alpha * divergence); drop compute_loss_func")
    packed = getattr(args, "packing", False) and getattr(args, "packing_strategy", None) in _PACKED_STRATEGIES
    if getattr(args, "padding_free", False) or packed:
        raise ValueError("padding-free batches (padding_free=True, or packing with packing_strategy in "
                         f"{_PACKED_STRATEGIES}) pack every sequence into one row that cannot be repeated K times "
                         "along the batch: set padding_free=False and packing=False, or "
                         "packing_strategy='wrapped'")
    if getattr(args, "disable_dropout", False):
        raise ValueError("disable_dropout=True makes the K passes identical (the divergence is 0): "
                         "intra-distillation needs dropout; set disable_dropout=False")


class IntraDistillationSFTTrainer(IntraDistillationMixin, SFTTrainer):
    """`trl.SFTTrainer` whose training loss is cross-entropy + alpha * divergence over K dropout
    passes; takes `intra_args=IntraDistillationArguments(...)` next to SFTTrainer's arguments."""

    def __init__(self, model=None, args=None, *rest, **kwargs):
        if args is not None:  # before TRL prepares the dataset: fail fast
            check_sft_config(args, kwargs.get("compute_loss_func"))
        super().__init__(model, args, *rest, **kwargs)
