"""Intra-distillation for Hugging Face `transformers.Trainer`.

The batch is repeated K times and run through the model in one forward, so each copy gets its own
dropout mask while the weights (and their gradients) are shared. The output is viewed as [K, ...]
and scored with intradistill_kernels' public losses.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from intradistill_kernels import AdaptiveAlpha, consistency_mse, intra_distillation_loss

try:
    import transformers as _hf
except ImportError as exc:  # transformers is optional: say how to get it
    raise ImportError(
        "intradistill_kernels.integrations.transformers needs the `transformers` package; "
        "install it with `pip install transformers`") from exc

__all__ = ["IntraDistillationArguments", "IntraDistillationTrainer", "repeat_batch"]

_QA_KEYS = ("start_positions", "end_positions")


def repeat_batch(batch, passes: int):
    """Repeat every tensor of `batch` `passes` times along dim 0 (copies, never views).

    Accepts a tensor, a Mapping of tensors (dict, BatchEncoding), or a list/tuple of them; values
    that are not tensors are passed through unchanged.
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
        out = {k: repeat_batch(v, passes) if isinstance(v, (Tensor, Mapping, list, tuple)) else v
               for k, v in batch.items()}
        if isinstance(batch, _hf.BatchEncoding):
            return _hf.BatchEncoding(out)
        return out
    if isinstance(batch, (list, tuple)):
        return type(batch)(repeat_batch(v, passes) if isinstance(v, (Tensor, Mapping, list, tuple)) else v
                           for v in batch)
    return batch


@dataclass
class IntraDistillationArguments:
    """Settings of intra-distillation (paper §3): K passes, the divergence weight alpha and its
    adaptive schedule (alpha reaches 1 at step N/q and `alpha` at step N/p)."""

    passes: int = 3
    alpha: float = 1.0
    p: float = 5.0
    q: float = 10.0
    divergence: str = "x"
    adaptive: bool = True
    backend: str = "auto"

    def __post_init__(self):
        if not isinstance(self.passes, int) or isinstance(self.passes, bool) or self.passes < 2:
            raise ValueError(f"passes must be an int >= 2, got {self.passes!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha < 0:
            raise ValueError(f"alpha must be a number >= 0, got {self.alpha!r}")
        if self.divergence not in ("x", "js", "jeffrey"):
            raise ValueError(f"divergence must be 'x', 'js' or 'jeffrey', got {self.divergence!r}")
        if self.adaptive and self.alpha > 1 and not self.q > self.p > 0:
            raise ValueError(f"the adaptive schedule needs q > p > 0, got p={self.p}, q={self.q}")


class IntraDistillationTrainer(_hf.Trainer):
    """A `transformers.Trainer` whose training loss is task loss + alpha * divergence over K passes.

    Sequence classification: intra_distillation_loss on the logits; regression (num_labels == 1):
    MSE + alpha * consistency_mse; token classification: as classification, labels -100 ignored;
    extractive QA: cross-entropy on start and end positions plus the divergence of the start and
    end distributions (padding masked out). Evaluation runs the model once, as usual.
    """

    def __init__(self, *args, intra_args: IntraDistillationArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if intra_args is None:
            intra_args = IntraDistillationArguments()
        if not isinstance(intra_args, IntraDistillationArguments):
            raise TypeError(f"intra_args must be IntraDistillationArguments, got {type(intra_args).__name__}")
        self.intra_args = intra_args
        self._schedule: AdaptiveAlpha | None = None
        self._sums = {"ce": 0.0, "divergence": 0.0, "alpha": 0.0}
        self._count = 0
        self._predicting = False

    def prediction_step(self, *args, **kwargs):
        # evaluation may run on a model still in train mode; it must see one pass all the same
        self._predicting = True
        try:
            return super().prediction_step(*args, **kwargs)
        finally:
            self._predicting = False

    def current_alpha(self) -> float:
        a = self.intra_args
        if not a.adaptive or a.alpha <= 1:
            return float(a.alpha)
        total = max(int(self.state.max_steps or 0), 1)
        if self._schedule is None or self._schedule.total_steps != total:
            self._schedule = AdaptiveAlpha(a.alpha, a.p, a.q, total)
        return self._schedule(int(self.state.global_step))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._predicting or not model.training:  # evaluation / prediction: one pass
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        k = self.intra_args.passes
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        positions = {key: inputs.pop(key) for key in _QA_KEYS if key in inputs}
        outputs = model(**repeat_batch(inputs, k))
        alpha = self.current_alpha()
        if positions:
            if len(positions) != 2:
                raise ValueError("extractive QA needs both start_positions and end_positions")
            ce, div = self._qa_terms(outputs, inputs.get("attention_mask"), positions, alpha)
        elif labels is None:
            raise ValueError("training inputs must contain `labels` (or start/end_positions for QA)")
        else:
            ce, div = self._label_terms(model, outputs.logits, labels, alpha)
        loss = ce + alpha * div
        self._sums["ce"] += float(ce.detach())
        self._sums["divergence"] += float(div.detach())
        self._sums["alpha"] += float(alpha)
        self._count += 1
        return (loss, outputs) if return_outputs else loss

    def _label_terms(self, model, logits: Tensor, labels: Tensor, alpha: float):
        k, a = self.intra_args.passes, self.intra_args
        logits = logits.unflatten(0, (k, -1))
        num_labels = getattr(getattr(model, "config", None), "num_labels", logits.shape[-1])
        if num_labels == 1 and logits.shape[-1] == 1:  # regression head
            preds = logits.squeeze(-1).float()
            ce = torch.nn.functional.mse_loss(preds, labels.to(preds.dtype).expand_as(preds))
            return ce, consistency_mse(preds)
        out = intra_distillation_loss(logits.float(), labels.long(), alpha, divergence=a.divergence,
                                      ignore_index=-100, backend=a.backend)
        return out.ce, out.divergence

    def _qa_terms(self, outputs, attention_mask, positions, alpha: float):
        k, a = self.intra_args.passes, self.intra_args
        ce, div = 0.0, 0.0
        for key, logits in (("start_positions", outputs.start_logits), ("end_positions", outputs.end_logits)):
            logits = logits.unflatten(0, (k, -1)).float()
            if attention_mask is not None:
                # padding gets -inf-like logits so no probability mass (or divergence) lands on it
                pad = ~attention_mask.bool()
                logits = logits.masked_fill(pad.unsqueeze(0), torch.finfo(logits.dtype).min / 4)
            target = positions[key].long().clamp(0, logits.shape[-1] - 1)
            out = intra_distillation_loss(logits, target, alpha, divergence=a.divergence, backend=a.backend)
            ce = ce + out.ce / 2
            div = div + out.divergence / 2
        return ce, div

    def log(self, logs, *args, **kwargs):
        if self._count and "loss" in logs:  # training log: add the averages since the last one
            for name, total in self._sums.items():
                logs[name] = round(total / self._count, 6)
            self._sums = dict.fromkeys(self._sums, 0.0)
            self._count = 0
        return super().log(logs, *args, **kwargs)
