"""nn.Module wrappers of the functional API."""

from __future__ import annotations

import torch

from . import functional as F
from ._core import DIVERGENCES, PLAIN_DIVERGENCES, REDUCTIONS, check_choice


class XDivergenceLoss(torch.nn.Module):
    """Module form of x_divergence (or js_divergence with divergence="js")."""

    def __init__(self, reduction: str = "mean", backend: str = "auto", divergence: str = "x"):
        super().__init__()
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("divergence", divergence, PLAIN_DIVERGENCES)
        self.reduction, self.backend, self.divergence = reduction, backend, divergence

    def forward(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        fn = F.x_divergence if self.divergence == "x" else F.js_divergence
        return fn(logits, mask, reduction=self.reduction, backend=self.backend)


class IntraDistillationLoss(torch.nn.Module):
    """Module form of intra_distillation_loss. `alpha` may be a number or an AdaptiveAlpha, in
    which case forward needs the current `step`; forward(..., alpha=...) overrides either."""

    def __init__(self, alpha=1.0, *, divergence: str = "x", label_smoothing: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        check_choice("divergence", divergence, DIVERGENCES)
        check_choice("reduction", reduction, REDUCTIONS)
        self.alpha, self.divergence, self.label_smoothing = alpha, divergence, label_smoothing
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend

    def current_alpha(self, step: int | None = None) -> float:
        if callable(self.alpha):
            if step is None:
                raise ValueError("IntraDistillationLoss with an adaptive alpha needs forward(..., step=...)")
            return self.alpha(step)
        return self.alpha

    def forward(self, logits, target, *, step: int | None = None, alpha=None) -> F.IntraDistillationOutput:
        return F.intra_distillation_loss(
            logits, target, self.current_alpha(step) if alpha is None else alpha,
            divergence=self.divergence, label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
        )


class FusedLinearIntraDistillationLoss(torch.nn.Module):
    """Module form of fused_linear_intra_distillation_loss; forward(hidden, weight, target, bias=None)."""

    def __init__(self, alpha: float = 1.0, *, divergence: str = "x", label_smoothing: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto", chunk_size: int | None = None):
        super().__init__()
        check_choice("divergence", divergence, DIVERGENCES)
        check_choice("reduction", reduction, REDUCTIONS)
        self.alpha, self.kwargs = alpha, dict(divergence=divergence, label_smoothing=label_smoothing,
                                              ignore_index=ignore_index, reduction=reduction, backend=backend,
                                              chunk_size=chunk_size)

    def forward(self, hidden, weight, target, bias=None, *, alpha=None) -> F.IntraDistillationOutput:
        return F.fused_linear_intra_distillation_loss(hidden, weight, target, bias,
                                                      self.alpha if alpha is None else alpha, **self.kwargs)
