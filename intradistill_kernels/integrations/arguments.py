"""The settings of intra-distillation for the Hugging Face integrations, and `repeat_batch`.

Kept apart from `transformers.py` (which imports transformers) so that the language-model forward
(`lm.py`), the per-head scorers (`scorers.py`) and the Trainer classes share them without a cycle.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .._core import BACKENDS, DIVERGENCES

__all__ = ["IGNORE", "IntraDistillationArguments", "repeat_batch"]

IGNORE = -100
_BACKENDS = ("auto",) + BACKENDS


def _repeatable(v) -> bool:
    return isinstance(v, (Tensor, Mapping, list, tuple))


def repeat_batch(batch, passes: int):
    """Repeat every tensor of `batch` `passes` times along dim 0 (copies, never views).

    Accepts a tensor, a Mapping of tensors (dict, OrderedDict, BatchEncoding, ...), or a list /
    tuple / namedtuple of them, and returns the same container type; values that are not tensors
    are passed through unchanged.
    """
    if not isinstance(passes, int) or isinstance(passes, bool):
        raise TypeError(f"passes must be an int, got {passes!r}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise ValueError("batch tensors must have a batch dimension (dim 0), got a 0-d tensor")
        # .repeat (not .expand) so every copy owns its memory and can be changed on its own
        return batch.repeat(passes, *([1] * (batch.dim() - 1)))
    if isinstance(batch, Mapping):
        out = {k: repeat_batch(v, passes) if _repeatable(v) else v for k, v in batch.items()}
        if isinstance(batch, MutableMapping):
            # a shallow copy keeps the type and its own state (OrderedDict order, defaultdict factory,
            # BatchEncoding's encodings), then the repeated values replace the originals
            new = copy.copy(batch)
            new.update(out)
            return new
        return type(batch)(out)
    if isinstance(batch, (list, tuple)):
        items = [repeat_batch(v, passes) if _repeatable(v) else v for v in batch]
        if hasattr(batch, "_fields"):  # a namedtuple takes its fields positionally
            return type(batch)(*items)
        return type(batch)(items)
    return batch


def _real(name: str, value, low: float = -math.inf, high: float = math.inf) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not low <= value < high:
        raise ValueError(f"{name} must be a finite number in [{low}, {high}), got {value!r}")


@dataclass
class IntraDistillationArguments:
    """Settings of intra-distillation (paper §3): K passes, the divergence weight alpha and its
    adaptive schedule (alpha reaches 1 at step N/q and `alpha` at step N/p).

    fused_linear: language models score their final hidden states and the output weight with
    fused_linear_intra_distillation_loss (the [K, B, T, V] logits are never materialised); False
    scores the logits of the model's own forward instead. chunk_size: tokens per chunk of the
    fused path (None: from the free memory). z_loss: weight of the mean squared log-sum-exp added
    to the loss of label-based heads (logged as `z_loss`). label_smoothing: of the cross-entropy;
    the Trainer classes take the Trainer's `label_smoothing_factor` when this is 0, as
    transformers.Trainer does.
    """

    passes: int = 3
    alpha: float = 1.0
    p: float = 5.0
    q: float = 10.0
    divergence: str = "x"
    adaptive: bool = True
    backend: str = "auto"
    fused_linear: bool = True
    chunk_size: int | None = None
    z_loss: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        if not isinstance(self.passes, int) or isinstance(self.passes, bool) or self.passes < 2:
            raise ValueError(f"passes must be an int >= 2, got {self.passes!r}")
        _real("alpha", self.alpha, 0.0)
        _real("p", self.p)
        _real("q", self.q)
        _real("z_loss", self.z_loss, 0.0)
        _real("label_smoothing", self.label_smoothing, 0.0, 1.0)
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got {self.divergence!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        for name in ("adaptive", "fused_linear"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool)
                                            or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {self.chunk_size!r}")
        if self.adaptive and self.alpha > 1 and not self.q > self.p > 0:
            raise ValueError(f"the adaptive schedule needs q > p > 0, got p={self.p}, q={self.q}")

    @property
    def scheduled(self) -> bool:
        """Whether alpha follows the adaptive schedule (which needs the training step)."""
        return self.adaptive and self.alpha > 1

    def loss_options(self) -> dict:
        """Keyword arguments of the package's losses, summed over the label items."""
        return dict(divergence=self.divergence, label_smoothing=float(self.label_smoothing), ignore_index=IGNORE,
                    reduction="sum", backend=self.backend, z_loss=float(self.z_loss))


def per_item(terms, items: Tensor, items_total=None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(loss, ce, divergence, z_loss) of `terms` (an IntraDistillationOutput of sums over `items`
    label items): the loss divided by `items_total` (the items of the whole accumulated batch) or,
    without it, by `items`; the other terms detached, per item of this call, for logging."""
    loss = terms.loss
    local = items.to(loss.device).clamp(min=1).to(loss.dtype)
    total = local if items_total is None else torch.as_tensor(items_total, device=loss.device).clamp(min=1)
    z = None if terms.z_loss is None else terms.z_loss.detach() / local
    return loss / total.to(loss.dtype), terms.ce.detach() / local, terms.divergence.detach() / local, z
