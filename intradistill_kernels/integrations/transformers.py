"""Intra-distillation for Hugging Face models: any training loop through `apply_intra_distillation`,
and `transformers.Trainer` (or a trainer built on it, e.g. TRL's) through `IntraDistillationTrainer`.

The batch is repeated K times and run through the model in one forward, so each copy gets its own
dropout mask while the weights (and their gradients) are shared. What is scored depends on the head:

- causal LM: labels shifted as transformers does (or the batch's `shift_labels`); the final hidden
  states and the output layer go through fused_linear_intra_distillation_loss inside the model's
  forward (apply_intra_distillation), so the output layer never produces the [K, B, T, V] logits
  and FSDP2 / DeepSpeed ZeRO-3 have its weight gathered;
- seq2seq LM (T5, BART, Marian, ...): the decoder's hidden states, the same way;
- sequence / token classification: intra_distillation_loss on the logits; regression: MSE plus
  consistency_mse; extractive QA: start and end distributions, padding masked out.

Gradient accumulation is exact: the loss is the sum over label tokens divided by
`num_items_in_batch`, the number of label tokens in the whole accumulated batch (over all
processes under DDP), so micro-batch 2 x accumulation 4 takes the step of micro-batch 8.
"""
from __future__ import annotations

import dataclasses


from intradistill_kernels import AdaptiveAlpha

try:
    import transformers as _hf
except ImportError as exc:  # transformers is optional: say how to get it
    raise ImportError(
        "intradistill_kernels.integrations.transformers needs the `transformers` package; "
        "install it with `pip install 'transformers>=5'`") from exc

from .arguments import IntraDistillationArguments, repeat_batch
from .lm import IntraDistillationLMOutput, apply_intra_distillation, remove_intra_distillation, suspended
from .scorers import scorer_for

__all__ = ["IntraDistillationArguments", "IntraDistillationLMOutput", "IntraDistillationMixin",
           "IntraDistillationTrainer", "apply_intra_distillation", "remove_intra_distillation", "repeat_batch"]


def _with_trainer_smoothing(intra_args: IntraDistillationArguments, factor: float) -> IntraDistillationArguments:
    """The Trainer's label_smoothing_factor applies to the cross-entropy, as in transformers.Trainer."""
    if not factor:
        return intra_args
    if intra_args.label_smoothing and intra_args.label_smoothing != factor:
        raise ValueError(f"label smoothing is set twice: TrainingArguments(label_smoothing_factor={factor}) and "
                         f"IntraDistillationArguments(label_smoothing={intra_args.label_smoothing}); set one")
    return dataclasses.replace(intra_args, label_smoothing=float(factor))


class IntraDistillationMixin:
    """Turns a `transformers.Trainer` (or a subclass such as TRL's `SFTTrainer`) into one whose
    training loss is task loss + alpha * divergence over K passes; evaluation runs the model once.
    Put it first in the bases: `class T(IntraDistillationMixin, SomeTrainer)`. It adds the alpha
    schedule and logs (ce, divergence, alpha, z_loss) to the head's scorer (see scorers.py).
    """

    def __init__(self, *args, intra_args: IntraDistillationArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if intra_args is None:
            intra_args = IntraDistillationArguments()
        if not isinstance(intra_args, IntraDistillationArguments):
            raise TypeError(f"intra_args must be IntraDistillationArguments, got {type(intra_args).__name__}")
        self.intra_args = _with_trainer_smoothing(intra_args, self.args.label_smoothing_factor)
        self._scorer = scorer_for(self.model, self.intra_args)
        self._schedule: AdaptiveAlpha | None = None
        self._sums = {"ce": 0.0, "divergence": 0.0, "alpha": 0.0}
        if self.intra_args.z_loss:
            self._sums["z_loss"] = 0.0
        self._count = 0
        self._predicting = False
        # compute_loss normalises by num_items_in_batch itself. This flag is what makes every
        # transformers 5.x Trainer count the items of the accumulated batch and not divide the
        # loss by the accumulation steps a second time; the model's own preference is kept for
        # the evaluation loss, which the model computes.
        self._model_takes_loss_kwargs = bool(self.model_accepts_loss_kwargs)
        self.model_accepts_loss_kwargs = True

    def current_alpha(self) -> float:
        a = self.intra_args
        if not a.scheduled:
            return float(a.alpha)
        total = max(int(self.state.max_steps or 0), 1)
        if self._schedule is None or self._schedule.total_steps != total:
            self._schedule = AdaptiveAlpha(a.alpha, a.p, a.q, total)
        return self._schedule(int(self.state.global_step))

    def log(self, logs, *args, **kwargs):
        if self._count and "loss" in logs:  # training log: add the averages since the last one
            for name, total in self._sums.items():
                logs[name] = round(total / self._count, 6)
            self._sums = dict.fromkeys(self._sums, 0.0)
            self._count = 0
        return super().log(logs, *args, **kwargs)

    def _get_num_items_in_batch(self, batch_samples, device):
        counts = [self._scorer.items(batch) for batch in batch_samples]
        if not counts or any(c is None for c in counts):
            return super()._get_num_items_in_batch(batch_samples, device)
        total = sum(counts).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def prediction_step(self, model, *args, **kwargs):
        # evaluation may run on a model still in train mode; it must see one pass all the same
        self._predicting = True
        try:
            with suspended(model):
                return super().prediction_step(model, *args, **kwargs)
        finally:
            self._predicting = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._predicting or not model.training:  # evaluation / prediction: the model's own loss
            with suspended(model):
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs,
                    num_items_in_batch=num_items_in_batch if self._model_takes_loss_kwargs else None)
        alpha = self.current_alpha()
        step = self._scorer.step(model, dict(inputs), alpha, num_items_in_batch)
        loss = step.loss
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            # the count covers every process and DDP averages the gradients over them
            loss = loss * self.accelerator.num_processes
        self._sums["ce"] += float(step.ce)
        self._sums["divergence"] += float(step.divergence)
        self._sums["alpha"] += float(alpha)
        if "z_loss" in self._sums and step.z_loss is not None:
            self._sums["z_loss"] += float(step.z_loss)
        self._count += 1
        return (loss, step.outputs) if return_outputs else loss


class IntraDistillationTrainer(IntraDistillationMixin, _hf.Trainer):
    """A `transformers.Trainer` whose training loss is task loss + alpha * divergence over K passes
    (see the module docstring for each head). Evaluation runs the model once, as usual."""
