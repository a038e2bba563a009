"""The interface every fused backend (Triton, C++ CPU, CUDA C++) implements.

Tensors (all on the logits' device):
  logits  any strided [K, *B, V] view, float32 / bfloat16 / float16; read without a copy
  target  int64 [N], N = prod(*B): the class of row n, or -1 where the row is inactive
  lse     fp32 [K, N]: each pass's log-sum-exp, saved by forward for backward
  stat    fp32 [K, N]: s_k = <p_k, z_k - z̄> for the X form, KL(p_k ‖ p̄) for JS
  g_ce, g_div  fp32 [N]: the weight of row n's mean cross-entropy and divergence in the
          quantity being differentiated (what autograd hands back for the per-row outputs)
  grad    a [K, *B, V] tensor of the logits' dtype the gradient is written into; it may be the
          logits themselves (each element is read before it is written, by the same program)
Inactive rows produce zeros everywhere, whatever their logits hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class RowsConfig:
    """The per-call constants of the fused row kernels."""
    js: bool = False              # divergence (1/K) Σ KL(p_k ‖ p̄) instead of the X form
    label_smoothing: float = 0.0  # torch's convention: target (1 - ε)·onehot + ε/V
    has_ce: bool = True           # also compute each pass's cross-entropy

    @property
    def smooth(self) -> bool:
        return self.has_ce and self.label_smoothing > 0


class RowStats(NamedTuple):
    ce: Tensor    # fp32 [N]: mean over the K passes of the cross-entropy (0 without has_ce)
    div: Tensor   # fp32 [N]: X or JS of the row
    lse: Tensor   # fp32 [K, N]
    stat: Tensor  # fp32 [K, N]


class FusedBackend(Protocol):
    max_passes: int | None  # the largest K the kernels are instantiated for (None: any)

    def is_available(self) -> bool: ...

    def supports(self, t: Tensor) -> bool:
        """Whether the kernels run on tensors of t's device."""

    def forward(self, logits: Tensor, target: Tensor, cfg: RowsConfig) -> RowStats: ...

    def backward(self, logits: Tensor, target: Tensor, lse: Tensor, stat: Tensor, g_ce: Tensor,
                 g_div: Tensor, cfg: RowsConfig, grad: Tensor) -> None: ...
