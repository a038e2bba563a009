"""What the Trainer's training loss is, by the kind of head it scores; one scorer is chosen per model.

- language models (causal and seq2seq): the model's own forward, with apply_intra_distillation;
- sequence / token classification: intra_distillation_loss on the logits of the K passes;
- regression (one output): MSE plus consistency_mse;
- extractive QA: start and end distributions over the positions, padding masked out.

Every scorer returns sums over its label items divided by `num_items_in_batch` (the items of the
whole accumulated batch), so gradient accumulation is exact, and per-item terms for the logs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES

from intradistill_kernels import IntraDistillationOutput, consistency_mse, intra_distillation_loss

from .arguments import IGNORE, IntraDistillationArguments, per_item, repeat_batch
from .lm import ALPHA_KWARG, _language_model, apply_intra_distillation, language_model_kind

__all__ = ["Step", "scorer_for"]

_QA_KEYS = ("start_positions", "end_positions")


@dataclass
class Step:
    """One training call: `loss` to differentiate, and per-item terms (detached) for the logs."""

    loss: Tensor
    ce: Tensor
    divergence: Tensor
    z_loss: Tensor | None
    outputs: object


def _labels(inputs: dict, model_name: str) -> Tensor:
    labels = inputs.pop("labels", None)
    if labels is None:
        raise ValueError("training inputs must contain `labels` (or start/end_positions for QA)")
    if "shift_labels" in inputs:
        raise ValueError(f"shift_labels is only meaningful for causal language models, not {model_name}")
    return labels


class _Scorer:
    def __init__(self, args: IntraDistillationArguments, model_name: str):
        self.args, self.model_name = args, model_name

    def _passes(self, model, inputs: dict):
        return model(**repeat_batch(inputs, self.args.passes))

    def _step(self, terms: IntraDistillationOutput, items: Tensor, num_items, outputs) -> Step:
        return Step(*per_item(terms, items, num_items), outputs)


class LanguageModelScorer(_Scorer):
    """The applied model's forward computes the loss (inside the model, where FSDP2 and ZeRO-3
    have gathered the output weight)."""

    def __init__(self, args, model_name, model, kind: str):
        super().__init__(args, model_name)
        self.kind = kind
        apply_intra_distillation(model, args)

    def items(self, batch) -> Tensor | None:
        if "shift_labels" in batch:
            return (batch["shift_labels"] != IGNORE).sum()
        if "labels" not in batch:
            return None
        labels = batch["labels"][..., 1:] if self.kind == "causal_lm" else batch["labels"]
        return (labels != IGNORE).sum()

    def step(self, model, inputs: dict, alpha, num_items) -> Step:
        if inputs.get("labels") is None and inputs.get("shift_labels") is None:
            raise ValueError("training inputs of a language model must contain `labels` (or `shift_labels`)")
        outputs = model(**inputs, num_items_in_batch=num_items, **{ALPHA_KWARG: alpha})
        return Step(outputs.loss, outputs.ce, outputs.divergence, outputs.z_loss, outputs)


class LabelScorer(_Scorer):
    """Sequence and token classification: one target class per row."""

    def items(self, batch) -> Tensor | None:
        labels = batch.get("labels")
        return (labels != IGNORE).sum() if isinstance(labels, Tensor) else None

    def step(self, model, inputs: dict, alpha, num_items) -> Step:
        labels = _labels(inputs, self.model_name)
        outputs = self._passes(model, inputs)
        logits = outputs.logits.unflatten(0, (self.args.passes, -1))
        out = intra_distillation_loss(logits, labels.long(), alpha, **self.args.loss_options())
        return self._step(out, (labels != IGNORE).sum(), num_items, outputs)


class RegressionScorer(_Scorer):
    """One output per row: mean squared error of each pass plus consistency_mse between them."""

    def __init__(self, args, model_name):
        super().__init__(args, model_name)
        for option in ("label_smoothing", "z_loss"):
            if getattr(args, option):
                raise ValueError(f"{model_name} is a regression head (num_labels=1): {option} applies to "
                                 f"classification only; set it to 0")

    def items(self, batch) -> Tensor | None:
        labels = batch.get("labels")
        return torch.tensor(labels.numel(), device=labels.device) if isinstance(labels, Tensor) else None

    def step(self, model, inputs: dict, alpha, num_items) -> Step:
        k = self.args.passes
        labels = _labels(inputs, self.model_name)
        outputs = self._passes(model, inputs)
        preds = outputs.logits.unflatten(0, (k, -1)).squeeze(-1).float()
        target = labels.to(preds.dtype).reshape(preds.shape[1:])
        mse = ((preds - target) ** 2).sum() / k
        div = consistency_mse(preds, reduction="sum")
        out = IntraDistillationOutput(mse + alpha * div, mse, div)
        return self._step(out, torch.tensor(target.numel(), device=preds.device), num_items, outputs)


def _qa_targets(positions: Tensor, length: int) -> Tensor:
    """transformers' convention: positions are clamped to [0, T] and T (an answer outside the
    window) is ignored."""
    target = positions.long().clamp(0, length)
    return target.masked_fill(target == length, IGNORE)


class QuestionAnsweringScorer(_Scorer):
    """Start and end distributions over the positions; padding gets no probability mass."""

    def __init__(self, args, model_name):
        super().__init__(args, model_name)
        if args.label_smoothing:
            # smoothing spreads target mass over every position, padding included, where the logits
            # are masked to -inf-like values: the loss would be dominated by the padding
            raise ValueError(f"{model_name} is an extractive QA head: label smoothing over positions is not "
                             "supported (it would put target mass on masked padding); set label_smoothing_factor "
                             "(or IntraDistillationArguments.label_smoothing) to 0")

    def items(self, batch) -> Tensor | None:
        if not all(key in batch for key in _QA_KEYS):
            return None
        length = batch["input_ids"].shape[-1] if "input_ids" in batch else batch["inputs_embeds"].shape[-2]
        return sum((_qa_targets(batch[key], length) != IGNORE).sum() for key in _QA_KEYS)

    def step(self, model, inputs: dict, alpha, num_items) -> Step:
        if not all(key in inputs for key in _QA_KEYS):
            raise ValueError("extractive QA needs both start_positions and end_positions")
        positions = {key: inputs.pop(key) for key in _QA_KEYS}
        inputs.pop("labels", None)
        outputs = self._passes(model, inputs)
        mask = inputs.get("attention_mask")
        sums, items = [0, 0, 0, 0], 0
        for key, logits in (("start_positions", outputs.start_logits), ("end_positions", outputs.end_logits)):
            logits = logits.unflatten(0, (self.args.passes, -1))
            if mask is not None:
                logits = logits.masked_fill(~mask.bool().unsqueeze(0), torch.finfo(logits.dtype).min / 4)
            target = _qa_targets(positions[key], logits.shape[-1])
            out = intra_distillation_loss(logits, target, alpha, **self.args.loss_options())
            sums = [a + b for a, b in zip(sums, (*out, 0 if out.z_loss is None else out.z_loss))]
            items = items + (target != IGNORE).sum()
        total = IntraDistillationOutput(*sums[:3], sums[3] if self.args.z_loss else None)
        return self._step(total, items, num_items, outputs)


def _is_qa(model) -> bool:
    name = type(model).__name__
    return name in MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES.values() or name.endswith("ForQuestionAnswering")


def scorer_for(model, args: IntraDistillationArguments):
    """The scorer of `model`'s head (a language model gets intra-distillation applied to it)."""
    base = _language_model(model)
    name = type(base).__name__
    kind = language_model_kind(base)
    if kind is not None:
        return LanguageModelScorer(args, name, model, kind)
    if _is_qa(base):
        return QuestionAnsweringScorer(args, name)
    config = getattr(base, "config", None)
    problem = getattr(config, "problem_type", None)
    if problem == "multi_label_classification":
        raise ValueError("multi-label classification (problem_type='multi_label_classification') has no "
                         "single target class per row; intra-distillation here needs single-label targets")
    if problem == "regression" or (getattr(config, "num_labels", None) == 1 and problem is None):
        return RegressionScorer(args, name)
    return LabelScorer(args, name)
