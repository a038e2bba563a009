"""Intra-distillation for Hugging Face `transformers.Trainer` (and trainers built on it, e.g. TRL's).

The batch is repeated K times and run through the model in one forward, so each copy gets its own
dropout mask while the weights (and their gradients) are shared. What is scored depends on the head:

- causal LM: labels shifted as transformers does (or the batch's `shift_labels`); the final hidden
  states and the output layer go through fused_linear_intra_distillation_loss, so the output layer
  never produces the [K, B, T, V] logits;
- seq2seq LM (T5, BART, Marian, ...): the decoder's hidden states, the same way;
- sequence / token classification: intra_distillation_loss on the logits; regression: MSE plus
  consistency_mse; extractive QA: start and end distributions, padding masked out.

Gradient accumulation is exact: the loss is the sum over label tokens divided by
`num_items_in_batch`, the number of label tokens in the whole accumulated batch (over all
processes under DDP), so micro-batch 2 x accumulation 4 takes the step of micro-batch 8.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import torch
from torch import Tensor

from intradistill_kernels import (
    AdaptiveAlpha, consistency_mse, fused_linear_intra_distillation_loss, intra_distillation_loss)

try:
    import transformers as _hf
except ImportError as exc:  # transformers is optional: say how to get it
    raise ImportError(
        "intradistill_kernels.integrations.transformers needs the `transformers` package; "
        "install it with `pip install 'transformers>=5'`") from exc

from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
from transformers.trainer_utils import unwrap_peft_model

from .._core import BACKENDS, DIVERGENCES
from .output_layer import capture_output_layer_input, check_not_sharded, check_probe, output_layer_of

__all__ = ["IntraDistillationArguments", "IntraDistillationMixin", "IntraDistillationTrainer", "repeat_batch"]

_QA_KEYS = ("start_positions", "end_positions")
_BACKENDS = ("auto",) + BACKENDS
IGNORE = -100


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


def _real(name: str, value, low: float = -math.inf, strict: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


@dataclass
class IntraDistillationArguments:
    """Settings of intra-distillation (paper §3): K passes, the divergence weight alpha and its
    adaptive schedule (alpha reaches 1 at step N/q and `alpha` at step N/p).

    fused_linear: language models score their final hidden states and the output weight with
    fused_linear_intra_distillation_loss (the [K, B, T, V] logits are never materialised); False
    scores the logits of the model's own forward instead. chunk_size: tokens per chunk of the
    fused path (None: from the free memory). z_loss: weight of the mean squared log-sum-exp added
    to the loss of label-based heads (logged as `z_loss`). The Trainer's
    `label_smoothing_factor` applies to the cross-entropy, as in transformers.Trainer.
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

    def __post_init__(self):
        if not isinstance(self.passes, int) or isinstance(self.passes, bool) or self.passes < 2:
            raise ValueError(f"passes must be an int >= 2, got {self.passes!r}")
        _real("alpha", self.alpha, 0.0)
        _real("p", self.p)
        _real("q", self.q)
        _real("z_loss", self.z_loss, 0.0)
        if self.z_loss and "z_loss" not in inspect.signature(intra_distillation_loss).parameters:
            raise ValueError("z_loss needs an intradistill_kernels version whose losses take `z_loss`")
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


@dataclass
class _Terms:
    """Sums over the micro-batch's label items: `loss` = Σ ce + alpha Σ divergence, and its parts."""

    loss: Tensor
    ce: Tensor
    divergence: Tensor
    items: Tensor
    outputs: object
    z_loss: Tensor | None = None


def _terms_of(out, items: Tensor, outputs) -> _Terms:
    return _Terms(out.loss, out.ce, out.divergence, items, outputs, getattr(out, "z_loss", None))


def _count(mask: Tensor) -> Tensor:
    return mask.sum()


def _qa_targets(positions: Tensor, length: int) -> Tensor:
    """transformers' convention: positions are clamped to [0, T] and T (an answer outside the
    window) is ignored."""
    target = positions.long().clamp(0, length)
    return target.masked_fill(target == length, IGNORE)


class IntraDistillationMixin:
    """Turns a `transformers.Trainer` (or a subclass such as TRL's `SFTTrainer`) into one whose
    training loss is task loss + alpha * divergence over K passes; evaluation runs the model once.
    Put it first in the bases: `class T(IntraDistillationMixin, SomeTrainer)`.
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
        if intra_args.z_loss:
            self._sums["z_loss"] = 0.0
        self._count = 0
        self._predicting = False
        self._probed: set[int] = set()
        # compute_loss normalises by num_items_in_batch itself. This flag is what makes every
        # transformers 5.x Trainer count the items of the accumulated batch and not divide the
        # loss by the accumulation steps a second time; the model's own preference is kept for
        # the evaluation loss, which the model computes.
        self._model_takes_loss_kwargs = bool(self.model_accepts_loss_kwargs)
        self.model_accepts_loss_kwargs = True

    # ------------------------------------------------------------------ schedule and logs

    def current_alpha(self) -> float:
        a = self.intra_args
        if not a.adaptive or a.alpha <= 1:
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

    # ------------------------------------------------------------------ heads

    def _base_model(self, model):
        return unwrap_peft_model(self.accelerator.unwrap_model(model))

    def _head(self, base) -> str:
        name = type(base).__name__
        if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or name.endswith("ForCausalLM"):
            return "causal_lm"
        config = getattr(base, "config", None)
        if name in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values() or (
                getattr(config, "is_encoder_decoder", False) and name.endswith(("ForConditionalGeneration", "MTModel"))):
            return "seq2seq_lm"
        return "labels"

    def _label_items(self, batch, head: str) -> Tensor | None:
        """Items the loss of `batch` is a sum over (what num_items_in_batch counts)."""
        if all(key in batch for key in _QA_KEYS):
            length = batch["input_ids"].shape[-1] if "input_ids" in batch else batch["inputs_embeds"].shape[-2]
            return sum(_count(_qa_targets(batch[key], length) != IGNORE) for key in _QA_KEYS)
        if head == "causal_lm":
            if "shift_labels" in batch:
                return _count(batch["shift_labels"] != IGNORE)
            if "labels" in batch:
                return _count(batch["labels"][..., 1:] != IGNORE)
            return None
        labels = batch.get("labels")
        if not isinstance(labels, Tensor):
            return None
        if labels.is_floating_point():  # regression: every value is a target
            return torch.tensor(labels.numel(), device=labels.device)
        return _count(labels != IGNORE)

    def _get_num_items_in_batch(self, batch_samples, device):
        head = self._head(self._base_model(self.model))
        counts = [self._label_items(batch, head) for batch in batch_samples]
        if not counts or any(c is None for c in counts):
            return super()._get_num_items_in_batch(batch_samples, device)
        total = sum(counts).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    # ------------------------------------------------------------------ loss

    def prediction_step(self, *args, **kwargs):
        # evaluation may run on a model still in train mode; it must see one pass all the same
        self._predicting = True
        try:
            return super().prediction_step(*args, **kwargs)
        finally:
            self._predicting = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._predicting or not model.training:  # evaluation / prediction: the model's own loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch if self._model_takes_loss_kwargs else None)
        alpha = self.current_alpha()
        terms = self._terms(model, dict(inputs), alpha)
        local = terms.items.clamp(min=1)
        if num_items_in_batch is None:  # no accumulated count: the mean over this micro-batch
            loss = terms.loss / local
        else:
            total = torch.as_tensor(num_items_in_batch, device=terms.loss.device).clamp(min=1)
            loss = terms.loss / total.to(terms.loss.dtype)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # the count covers every process and DDP averages the gradients over them
                loss = loss * self.accelerator.num_processes
        self._sums["ce"] += float(terms.ce.detach() / local)
        self._sums["divergence"] += float(terms.divergence.detach() / local)
        self._sums["alpha"] += float(alpha)
        if "z_loss" in self._sums and terms.z_loss is not None:
            self._sums["z_loss"] += float(terms.z_loss.detach() / local)
        self._count += 1
        return (loss, terms.outputs) if return_outputs else loss

    def _terms(self, model, inputs: dict, alpha: float) -> _Terms:
        k = self.intra_args.passes
        if any(key in inputs for key in _QA_KEYS):
            if not all(key in inputs for key in _QA_KEYS):
                raise ValueError("extractive QA needs both start_positions and end_positions")
            positions = {key: inputs.pop(key) for key in _QA_KEYS}
            inputs.pop("labels", None)
            outputs = model(**repeat_batch(inputs, k))
            return self._qa_terms(outputs, inputs.get("attention_mask"), positions, alpha)
        base = self._base_model(model)
        head = self._head(base)
        labels = inputs.pop("labels", None)
        shift_labels = inputs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            raise ValueError("training inputs must contain `labels` (or start/end_positions for QA)")
        if head == "labels":
            if shift_labels is not None:
                raise ValueError(f"shift_labels is only meaningful for causal language models, not {type(base).__name__}")
            outputs = model(**repeat_batch(inputs, k))
            return self._label_terms(base, outputs, labels, alpha)
        if head == "causal_lm":
            target = shift_labels if shift_labels is not None else \
                torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE)
        else:
            if shift_labels is not None:
                raise ValueError(f"shift_labels is only meaningful for causal language models, not {type(base).__name__}")
            target = labels
            if "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs:
                prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
                if prepare is None:
                    raise ValueError(f"{type(base).__name__} cannot build decoder_input_ids from labels: "
                                     "pass decoder_input_ids in the batch")
                inputs["decoder_input_ids"] = prepare(labels=labels)
        return self._lm_terms(model, base, inputs, target, alpha)

    def _lm_terms(self, model, base, inputs: dict, target: Tensor, alpha: float) -> _Terms:
        a, k = self.intra_args, self.intra_args.passes
        items = _count(target != IGNORE)
        inputs.setdefault("use_cache", False)  # a training forward has no use for a KV cache of K x B rows
        options = self._loss_options()
        if not a.fused_linear:
            outputs = model(**repeat_batch(inputs, k))
            out = intra_distillation_loss(outputs.logits.unflatten(0, (k, -1)), target, alpha, **options)
            return _terms_of(out, items, outputs)
        name = type(base).__name__
        layer = output_layer_of(base)
        check_not_sharded(layer.weight, name)
        probe = id(layer.module) not in self._probed
        with capture_output_layer_input(layer.module, probe=probe) as tap:
            outputs = model(**repeat_batch(inputs, k))
        if tap.calls != 1:
            raise ValueError(f"{name} called its output layer {tap.calls} times in one forward; the fused-linear "
                             "loss needs exactly one call. Set IntraDistillationArguments(fused_linear=False).")
        if probe:
            check_probe(layer, tap.probe_hidden, outputs.logits, name, autocast=tap.autocast_dtype is not None)
            self._probed.add(id(layer.module))
        hidden, weight, bias = tap.hidden, layer.weight, layer.bias()
        device_type = hidden.device.type
        # Under autocast the output layer would have run in the autocast dtype: so does the fused
        # GEMM, while the loss itself accumulates in fp32 (the kernels never see autocast).
        dtype = tap.autocast_dtype or weight.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        autocast = torch.is_autocast_enabled(device_type)
        ctx = torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext()
        with ctx:
            out = fused_linear_intra_distillation_loss(
                hidden.unflatten(0, (k, -1)), weight, target, bias, alpha, chunk_size=a.chunk_size,
                **layer.loss_kwargs, **options)
        return _terms_of(out, items, outputs)

    def _loss_options(self) -> dict:
        a = self.intra_args
        options = dict(divergence=a.divergence, ignore_index=IGNORE, reduction="sum", backend=a.backend,
                       label_smoothing=float(self.args.label_smoothing_factor))
        if a.z_loss:  # only when asked, so that losses without the option still work
            options["z_loss"] = a.z_loss
        return options

    def _label_terms(self, base, outputs, labels: Tensor, alpha: float) -> _Terms:
        k = self.intra_args.passes
        logits = outputs.logits.unflatten(0, (k, -1))
        config = getattr(base, "config", None)
        if getattr(config, "problem_type", None) == "multi_label_classification":
            raise ValueError("multi-label classification (problem_type='multi_label_classification') has no "
                             "single target class per row; intra-distillation here needs single-label targets")
        num_labels = getattr(config, "num_labels", logits.shape[-1])
        if num_labels == 1 and logits.shape[-1] == 1:  # regression head
            preds = logits.squeeze(-1).float()
            target = labels.to(preds.dtype).reshape(preds.shape[1:])
            mse = ((preds - target) ** 2).sum() / k
            div = consistency_mse(preds, reduction="sum")
            return _Terms(mse + alpha * div, mse, div, torch.tensor(target.numel(), device=preds.device), outputs)
        out = intra_distillation_loss(logits, labels.long(), alpha, **self._loss_options())
        return _terms_of(out, _count(labels != IGNORE), outputs)

    def _qa_terms(self, outputs, attention_mask, positions, alpha: float) -> _Terms:
        a, k = self.intra_args, self.intra_args.passes
        ce = div = loss = items = 0
        for key, logits in (("start_positions", outputs.start_logits), ("end_positions", outputs.end_logits)):
            logits = logits.unflatten(0, (k, -1))
            if attention_mask is not None:
                # padding gets -inf-like logits so no probability mass (or divergence) lands on it
                pad = ~attention_mask.bool()
                logits = logits.masked_fill(pad.unsqueeze(0), torch.finfo(logits.dtype).min / 4)
            target = _qa_targets(positions[key], logits.shape[-1])
            out = intra_distillation_loss(logits, target, alpha, divergence=a.divergence, ignore_index=IGNORE,
                                          reduction="sum", backend=a.backend)
            ce, div, loss = ce + out.ce, div + out.divergence, loss + out.loss
            items = items + _count(target != IGNORE)
        return _Terms(loss, ce, div, items, outputs)


class IntraDistillationTrainer(IntraDistillationMixin, _hf.Trainer):
    """A `transformers.Trainer` whose training loss is task loss + alpha * divergence over K passes
    (see the module docstring for each head). Evaluation runs the model once, as usual."""
