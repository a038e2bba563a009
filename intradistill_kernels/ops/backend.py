"""The interface every backend implements: the Triton kernels, the C++ CPU and CUDA kernels, and
"torch", their eager mirror (ops/eager.py). ops/registry.py lists them.

Tensors (all on the logits' device):
  logits  any strided [K, *B, V] view; float32 / bfloat16 / float16 (and float64 for "torch");
          read without a copy
  target  int64 [N], N = prod(*B): the class of row n, or -1 where the row is inactive. A value
          >= V marks an active row whose target class lies outside these V columns (a shard of a
          vocabulary split over ranks): no column gets the one-hot term
  lse     fp32 [K, N]: each pass's log-sum-exp, saved by forward for backward
  stat    fp32 [K, N]: s_k = <p_k, t_k − t̄> for the X form, KL(p_k ‖ p̄) for JS
  weights RowWeights: the weight of each row's terms in the quantity being differentiated
          (what autograd hands back for the per-row outputs, or, for the one-pass forward, what
          the reduction will hand back)
  grad    a [K, *B, V] tensor of the logits' dtype the gradient is written into; it may be the
          logits themselves (each element is read before it is written, by the same program)
Inactive rows produce zeros everywhere, whatever their logits hold. Of the spec, backends read
js, has_ce, label_smoothing, logit_scale and softcap.

Every statistic is taken on the transformed logits t = softcap·tanh(logit_scale·z / softcap)
(t = logit_scale·z without softcap; −inf stays −inf). The gradient written for row n is, with
p_k = softmax(t_k), ε the label smoothing and w the row's weights (docs/design.md §1.11):
    (w.ce/K)·(p_k − (1−ε)·onehot(y) − ε/V) + w.div·∂D/∂t_k + (w.z/K)·2·lse_k·p_k
times dt/dz = logit_scale·(1 − (t/softcap)²) (logit_scale without softcap), 0 where t = −inf
under softcap (the limit of dt/dz as z → −∞).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from .spec import LossSpec

Tensor = torch.Tensor


class RowWeights(NamedTuple):
    """fp32 (float64 for the "torch" backend on float64 logits)."""
    ce: Tensor            # [N]: weight of the row's mean cross-entropy (1/K) Σ_k CE_k
    div: Tensor           # [N]: weight of the row's divergence (X, or JS with spec.js)
    z: Tensor | None      # [N]: weight of the row's (1/K) Σ_k lse_k²; None: no z term

    def packed(self) -> Tensor:
        """[2, N] or [3, N]: the form a custom op takes."""
        return torch.stack([w for w in self if w is not None])

    @staticmethod
    def unpacked(t: Tensor) -> RowWeights:
        return RowWeights(t[0], t[1], t[2] if t.shape[0] == 3 else None)

    def rows(self, rows: slice) -> RowWeights:
        return RowWeights(*(w if w is None else w[rows] for w in self))


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


class Backend(Protocol):
    name: str
    max_passes: int | None  # the largest K the kernels are instantiated for (None: any)

    def unavailable_reason(self) -> str | None:
        """Why the backend cannot run in this process (None when it can); loads or builds it on
        the first call."""

    def supports(self, t: Tensor) -> bool:
        """Whether it runs on tensors of t's device and dtype."""

    def details(self) -> list[str]:
        """Lines doctor() prints under the backend (where it was loaded from, a build error)."""

    def forward(self, logits: Tensor, target: Tensor, spec: LossSpec, early: EarlyGrad | None = None) -> RowStats:
        """Each row's statistics; with `early`, also its gradient, written in the same sweep
        (the one-pass forward) or right after it."""

    def backward(self, logits: Tensor, target: Tensor, lse: Tensor, stat: Tensor, weights: RowWeights,
                 spec: LossSpec, grad: Tensor) -> None:
        """Writes the gradient with the given row weights into `grad`."""
