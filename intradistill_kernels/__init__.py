"""Fused kernels for intra-distillation (Xu, Koehn, Murray 2022)."""

from .functional import (
    IntraDistillationOutput,
    available_backends,
    consistency_mse,
    fused_linear_intra_distillation_loss,
    intra_distillation_loss,
    js_divergence,
    x_divergence,
)
from .modules import FusedLinearIntraDistillationLoss, IntraDistillationLoss, JSDivergenceLoss, XDivergenceLoss
from ._doctor import doctor
from .schedule import AdaptiveAlpha

__all__ = [
    "x_divergence", "js_divergence", "intra_distillation_loss", "consistency_mse",
    "XDivergenceLoss", "IntraDistillationLoss", "AdaptiveAlpha", "available_backends",
    "IntraDistillationOutput", "fused_linear_intra_distillation_loss", "FusedLinearIntraDistillationLoss",
    "doctor", "JSDivergenceLoss",
]
__version__ = "0.1.0"
