"""Intra-distillation inside TRL's `SFTTrainer` (trl 1.x).

`IntraDistillationSFTTrainer` is SFTTrainer with IntraDistillationMixin's training loss: TRL still
prepares the data (chat templates, completion-only labels, packing), the training step scores K
passes through the fused-linear loss. TRL's own training metrics that need the logits (token
accuracy, entropy) are not computed in training; evaluation is SFTTrainer's, unchanged.
"""
from __future__ import annotations

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as exc:  # trl is optional: say how to get it
    raise ImportError("intradistill_kernels.integrations.trl needs the `trl` package; install it with "
                      "`pip install 'trl>=1,<2'`") from exc

from .transformers import IntraDistillationArguments, IntraDistillationMixin

__all__ = ["IntraDistillationArguments", "IntraDistillationSFTTrainer", "SFTConfig"]


class IntraDistillationSFTTrainer(IntraDistillationMixin, SFTTrainer):
    """`trl.SFTTrainer` whose training loss is cross-entropy + alpha * divergence over K dropout
    passes; takes `intra_args=IntraDistillationArguments(...)` next to SFTTrainer's arguments."""
