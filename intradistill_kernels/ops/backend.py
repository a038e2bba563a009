"""The interface every fused backend (Triton, C++ CPU, CUDA C++) implements.

Tensors (all on the logits' device):
  logits  any strided [K, *B, V] view, float32 / bfloat16 / float16; read without a copy
  target  int64 [N], N = prod(*B): the class of row n, or -1 where the row is inactive
  lse     fp32 [K, N]: each pass's log-sum-exp, saved by forward for backward
  stat    fp32 [K, N]: s_k = <p_k, z_k - z̄> for the X form, KL(p_k ‖ p̄) for JS
  weights RowWeights: the weight of each row's terms in the quantity being differentiated
          (what autograd hands back for the per-row outputs, or, for the one-pass forward, what
          the reduction will hand back)
  grad    a [K, *B, V] tensor of the logits' dtype the gradient is written into; it may be the
          logits themselves (each element is read before it is written, by the same program)
Inactive rows produce zeros everywhere, whatever their logits hold.

Every statistic is taken on the transformed logits t = softcap·tanh(logit_scale·z / softcap)
(t = logit_scale·z without softcap; −inf stays −inf). The gradient written for row n is, with
p_k = softmax(t_k), ε the label smoothing and w the row's weights (docs/design.md §1.11):
    (w.ce/K)·(p_k − (1−ε)·onehot(y) − ε/V) + w.div·∂D/∂t_k + (w.z/K)·2·lse_k·p_k
times dt/dz = logit_scale·(1 − (t/softcap)²) (logit_scale without softcap), 0 where t = −inf.
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
    logit_scale: float = 1.0      # t = logit_scale·z before anything else
    softcap: float = 0.0          # > 0: t = softcap·tanh(t / softcap) (Gemma 2/3); 0: off

    @property
    def smooth(self) -> bool:
        return self.has_ce and self.label_smoothing > 0


class RowWeights(NamedTuple):
    ce: Tensor            # fp32 [N]: weight of the row's mean cross-entropy (1/K) Σ_k CE_k
    div: Tensor           # fp32 [N]: weight of the row's divergence (X, or JS with cfg.js)
    z: Tensor | None      # fp32 [N]: weight of the row's (1/K) Σ_k lse_k²; None: no z term


class EarlyGrad(NamedTuple):
    """The one-pass forward's request: write the gradient with these weights while the token's
    rows are still on chip / in cache, so that backward has nothing left to read."""
    weights: RowWeights
    grad: Tensor          # [K, *B, V] of the logits' dtype; may be the logits themselves


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

    def forward(self, logits: Tensor, target: Tensor, cfg: RowsConfig, early: EarlyGrad | None = None) -> RowStats:
        """Each row's statistics; with `early`, also its gradient, written in the same sweep."""

    def backward(self, logits: Tensor, target: Tensor, lse: Tensor, stat: Tensor, weights: RowWeights,
                 cfg: RowsConfig, grad: Tensor) -> None: ...


def run_forward(impl: FusedBackend, logits: Tensor, target: Tensor, cfg: RowsConfig,
                early: EarlyGrad | None = None) -> RowStats:
    """impl.forward, with the one-pass request emulated (forward, then the exact backward) for
    a backend whose kernels do not take one."""
    if early is None:
        return impl.forward(logits, target, cfg)
    if _takes_early(impl):
        return impl.forward(logits, target, cfg, early)
    stats = impl.forward(logits, target, cfg)
    impl.backward(logits, target, stats.lse, stats.stat, early.weights, cfg, early.grad)
    return stats


def _takes_early(impl) -> bool:
    import inspect

    try:
        return "early" in inspect.signature(impl.forward).parameters
    except (TypeError, ValueError):
        return False
