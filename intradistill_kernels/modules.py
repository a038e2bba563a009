"""nn.Module wrappers of the functional API: each module's __init__ takes every option of its
function (tests/test_modules.py walks the signatures), checks them at construction, keeps them as
attributes and passes them on in forward."""

from __future__ import annotations

import warnings

import torch

from . import functional as F
from ._core import BACKENDS, build_spec, check_choice


class _OptionsModule(torch.nn.Module):
    """Keeps the keyword options of `fn` as attributes, checked once here."""

    def __init__(self, **options):
        super().__init__()
        check_choice("backend", options.get("backend", "auto"), ("auto",) + BACKENDS)
        if not isinstance(options.get("inplace_grad", False), bool):
            raise TypeError(f"inplace_grad must be a bool, got {options['inplace_grad']!r}")
        checked = {k: v for k, v in options.items() if k not in ("backend", "inplace_grad")}
        build_spec(backend="torch", **checked)  # raises the functions' own errors for bad values
        self._option_names = tuple(options)
        for name, value in options.items():
            setattr(self, name, value)

    def options(self) -> dict:
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options().items())


class XDivergenceLoss(_OptionsModule):
    """Module form of x_divergence: forward(logits, mask=None)."""

    def __init__(self, reduction: str = "mean", backend: str = "auto", divergence: str = "x", *,
                 inplace_grad: bool = False):
        if divergence == "js":
            warnings.warn("XDivergenceLoss(divergence='js') computes the JS divergence: use JSDivergenceLoss",
                          DeprecationWarning, stacklevel=2)
        check_choice("divergence", divergence, ("x", "js"))
        super().__init__(reduction=reduction, backend=backend, inplace_grad=inplace_grad)
        self.divergence = divergence

    def forward(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        fn = F.x_divergence if self.divergence == "x" else F.js_divergence
        return fn(logits, mask, **self.options())


class JSDivergenceLoss(_OptionsModule):
    """Module form of js_divergence: forward(logits, mask=None)."""

    def __init__(self, reduction: str = "mean", backend: str = "auto", *, inplace_grad: bool = False):
        super().__init__(reduction=reduction, backend=backend, inplace_grad=inplace_grad)

    def forward(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.js_divergence(logits, mask, **self.options())


class _AlphaModule(_OptionsModule):
    """`alpha` may be a number or an AdaptiveAlpha, in which case forward needs the current
    `step`; forward(..., alpha=...) overrides either."""

    def __init__(self, alpha, **options):
        super().__init__(**options)
        self.alpha = alpha

    def current_alpha(self, step: int | None = None, alpha=None):
        if alpha is not None:
            return alpha
        if callable(self.alpha):
            if step is None:
                raise ValueError(f"{type(self).__name__} with an adaptive alpha needs forward(..., step=...)")
            return self.alpha(step)
        return self.alpha


class IntraDistillationLoss(_AlphaModule):
    """Module form of intra_distillation_loss: forward(logits, target, *, step=None, alpha=None)."""

    def __init__(self, alpha=1.0, *, divergence: str = "x", label_smoothing: float = 0.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto", inplace_grad: bool = False,
                 softcap: float | None = None, logit_scale: float = 1.0, z_loss: float = 0.0):
        super().__init__(alpha, divergence=divergence, label_smoothing=label_smoothing, ignore_index=ignore_index,
                         reduction=reduction, backend=backend, inplace_grad=inplace_grad, softcap=softcap,
                         logit_scale=logit_scale, z_loss=z_loss)

    def forward(self, logits, target, *, step: int | None = None, alpha=None) -> F.IntraDistillationOutput:
        return F.intra_distillation_loss(logits, target, self.current_alpha(step, alpha), **self.options())


class FusedLinearIntraDistillationLoss(_AlphaModule):
    """Module form of fused_linear_intra_distillation_loss:
    forward(hidden, weight, target, bias=None, *, step=None, alpha=None)."""

    def __init__(self, alpha=1.0, *, divergence: str = "x", label_smoothing: float = 0.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto", chunk_size: int | None = None,
                 softcap: float | None = None, logit_scale: float = 1.0, z_loss: float = 0.0):
        super().__init__(alpha, divergence=divergence, label_smoothing=label_smoothing, ignore_index=ignore_index,
                         reduction=reduction, backend=backend, chunk_size=chunk_size, softcap=softcap,
                         logit_scale=logit_scale, z_loss=z_loss)

    def forward(self, hidden, weight, target, bias=None, *, step: int | None = None, alpha=None) -> F.IntraDistillationOutput:
        return F.fused_linear_intra_distillation_loss(hidden, weight, target, bias, self.current_alpha(step, alpha),
                                                      **self.options())
