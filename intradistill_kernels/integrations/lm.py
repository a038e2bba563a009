"""`apply_intra_distillation`: the intra-distillation loss inside a Hugging Face language model's forward.

The applied model's forward, in training mode and called with labels, repeats the batch K times,
runs the model once on it and returns CE + alpha * divergence of the K passes as `loss`, computed
by the fused-linear loss from the output layer's input and weight (the [K, B, T, V] logits are
never built). Because the loss is computed inside the forward, any training loop works as with the
model's own loss (a plain loop, accelerate, transformers.Trainer, DDP), and the frameworks that
shard the weights (FSDP2, DeepSpeed ZeRO-3) have the output weight gathered when the loss reads it
and reduce its gradient (see output_layer.py). In eval mode, or without labels, the forward is the
model's own.

The loss is the sum over label tokens divided by `num_items_in_batch` when it is passed (the label
tokens of the whole accumulated batch, as transformers.Trainer passes it), else by the label tokens
of the call: what the model's own causal-LM loss does.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from intradistill_kernels import intra_distillation_loss

from .arguments import IGNORE, IntraDistillationArguments, per_item
from .output_layer import layer_loss, output_layer_of, output_tap, remove_output_tap

__all__ = ["ALPHA_KWARG", "IntraDistillationLMOutput", "apply_intra_distillation", "language_model_kind",
           "remove_intra_distillation"]

# A keyword argument of the applied forward: the alpha of this call (an adaptive schedule's value).
ALPHA_KWARG = "intra_distillation_alpha"
_STATE = "_intra_distillation"
# Inputs that are not per-row (never repeated), and those of padding-free packed batches.
_NOT_PER_ROW = frozenset({"cache_position", "logits_to_keep", "num_logits_to_keep", "max_length_q", "max_length_k"})
_PACKED = ("cu_seq_lens_q", "cu_seq_lens_k")


@dataclass
class IntraDistillationLMOutput(ModelOutput):
    """What an applied model returns in training with labels.

    loss: (Σ ce + alpha·Σ divergence [+ z-loss term]) over label tokens / num_items_in_batch (or the
    label tokens of the call), plus the MoE router loss weighted as the model weighs it.
    logits: None (never built). ce, divergence, z_loss: detached means over the call's label tokens,
    for logging. aux_loss: the MoE router loss when the model returns one.
    """

    loss: Tensor | None = None
    logits: Tensor | None = None
    ce: Tensor | None = None
    divergence: Tensor | None = None
    z_loss: Tensor | None = None
    aux_loss: Tensor | None = None


@dataclass
class _Applied:
    args: IntraDistillationArguments
    kind: str
    replaced: object            # the instance-level forward it replaced (e.g. TRL's fused LM head), or None
    signature: inspect.Signature
    enabled: bool = True
    probed: bool = False
    passes_checked: bool = False
    warned_unlabelled: bool = False


def language_model_kind(model: nn.Module) -> str | None:
    """"causal_lm", "seq2seq_lm", or None for other heads (a PEFT-unwrapped Hugging Face model)."""
    name = type(model).__name__
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or name.endswith("ForCausalLM"):
        return "causal_lm"
    config = getattr(model, "config", None)
    if name in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values() or (
            getattr(config, "is_encoder_decoder", False) and name.endswith(("ForConditionalGeneration", "MTModel"))):
        return "seq2seq_lm"
    return None


def _language_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / a DeepSpeed engine / PEFT, whose forward is patched."""
    while not isinstance(model, PreTrainedModel) and not hasattr(model, "peft_config") and isinstance(
            getattr(model, "module", None), nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def apply_intra_distillation(model: nn.Module, intra_args: IntraDistillationArguments | None = None) -> nn.Module:
    """Make `model` (a causal or seq2seq Hugging Face LM, possibly PEFT-wrapped) train with
    intra-distillation: in training mode, called with `labels`, its forward runs the batch K times
    and returns `IntraDistillationLMOutput` whose `loss` is CE + alpha * divergence. Patches the
    model in place and returns it; applying again replaces the settings.

    The forward also takes `intra_distillation_alpha=` (this call's alpha, e.g. an AdaptiveAlpha
    value; needed when `intra_args` asks for the adaptive schedule) and `num_items_in_batch=`.
    """
    if intra_args is None:
        intra_args = IntraDistillationArguments()
    if not isinstance(intra_args, IntraDistillationArguments):
        raise TypeError(f"intra_args must be IntraDistillationArguments, got {type(intra_args).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    base = _language_model(model)
    kind = language_model_kind(base)
    if kind is None:
        raise ValueError(f"apply_intra_distillation takes a causal or sequence-to-sequence language model, got "
                         f"{type(base).__name__}; for classification, regression and question-answering heads use "
                         "IntraDistillationTrainer")
    state = base.__dict__.get(_STATE)
    if state is not None:
        state.args, state.enabled = intra_args, True
        return model
    replaced = base.__dict__.get("forward")
    signature = inspect.signature(replaced if replaced is not None else base.forward)

    def forward(self, *args, **kwargs):
        return _forward(self, *args, **kwargs)

    # the model's own signature: Trainer keeps the dataset columns and passes num_items_in_batch by it
    functools.update_wrapper(forward, type(base).forward)
    forward._intra_distillation = True
    object.__setattr__(base, _STATE, _Applied(intra_args, kind, replaced, signature))
    base.forward = types.MethodType(forward, base)
    _install_tap(base)
    return model


def _install_tap(base: nn.Module) -> None:
    """The output layer's tap, installed before any compiled call traces the model (a hook
    registered during a compiled forward would break the graph). A model without a readable
    output layer is told so at its first training step, where it matters."""
    try:
        output_tap(output_layer_of(base).module)
    except ValueError:
        pass


def remove_intra_distillation(model: nn.Module) -> nn.Module:
    """Undo apply_intra_distillation: the model's forward is its own again."""
    base = _language_model(model)
    state = base.__dict__.get(_STATE)
    if state is None:
        return model
    current = base.__dict__.get("forward")
    if not getattr(getattr(current, "__func__", None), "_intra_distillation", False):
        # something wrapped the patched forward since (accelerate's autocast): it stays, passing through
        state.enabled = False
        return model
    if state.replaced is not None:
        base.forward = state.replaced
    else:
        del base.forward
    object.__delattr__(base, _STATE)
    get = getattr(base, "get_output_embeddings", None)
    module = get() if callable(get) else None
    if module is not None:
        remove_output_tap(module)
    return model


@contextlib.contextmanager
def suspended(model: nn.Module):
    """The model's own forward while active (evaluation with the model left in training mode)."""
    state = _language_model(model).__dict__.get(_STATE)
    if state is None or not state.enabled:
        yield
        return
    state.enabled = False
    try:
        yield
    finally:
        state.enabled = True


# ---------------------------------------------------------------------------- the forward


def _own_forward(model, state: _Applied):
    return state.replaced if state.replaced is not None else functools.partial(type(model).forward, model)


def _keywords(signature: inspect.Signature, args, kwargs) -> dict:
    bound = signature.bind(*args, **kwargs)
    inputs = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("an intra-distillation forward takes its inputs by keyword past the named ones")
        else:
            inputs[name] = value
    return inputs


def _forward(self, *args, **kwargs):
    state: _Applied = self.__dict__[_STATE]
    alpha = kwargs.pop(ALPHA_KWARG, None)
    own = _own_forward(self, state)
    if not (state.enabled and self.training):
        return own(*args, **kwargs)
    items_total = kwargs.pop("num_items_in_batch", None)  # taken here whether or not the model's forward takes it
    inputs = _keywords(state.signature, args, kwargs)
    labels, shift_labels = inputs.pop("labels", None), inputs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        if not state.warned_unlabelled:
            state.warned_unlabelled = True
            warnings.warn(f"{type(self).__name__} has intra-distillation applied but was called in training mode "
                          "without labels: it runs once, as the model's own forward (a Trainer with "
                          "label_smoothing_factor > 0 takes the labels away: set "
                          "IntraDistillationArguments(label_smoothing=...) instead)", UserWarning, stacklevel=3)
        return own(**inputs) if items_total is None else own(**inputs, num_items_in_batch=items_total)
    if inputs.pop("fused_lm_head", False):
        raise ValueError("TRL's SFTTrainer computes its training loss from per-token log-probabilities and would "
                         "ignore the intra-distillation loss: train with "
                         "intradistill_kernels.integrations.trl.IntraDistillationSFTTrainer instead")
    return _training_step(self, state, own, inputs, labels, shift_labels, items_total, alpha)


def _alpha(args: IntraDistillationArguments, alpha):
    if alpha is not None:
        return alpha
    if args.scheduled:
        raise ValueError(f"IntraDistillationArguments(alpha={args.alpha}, adaptive=True) follows a schedule over the "
                         f"training steps: pass this step's value as {ALPHA_KWARG}=AdaptiveAlpha(alpha, p, q, "
                         "total_steps)(step), or set adaptive=False")
    return float(args.alpha)


def _target(model, kind: str, inputs: dict, labels, shift_labels) -> Tensor:
    if kind == "causal_lm":
        if shift_labels is not None:
            return shift_labels
        return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE)
    if shift_labels is not None:
        raise ValueError(f"shift_labels is only meaningful for causal language models, not {type(model).__name__}")
    if inputs.get("decoder_input_ids") is None and inputs.get("decoder_inputs_embeds") is None:
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            raise ValueError(f"{type(model).__name__} cannot build decoder_input_ids from labels: "
                             "pass decoder_input_ids in the batch")
        inputs["decoder_input_ids"] = prepare(labels=labels)
    return labels


def _repeated(inputs: dict, passes: int, rows: int) -> dict:
    if any(inputs.get(name) is not None for name in _PACKED):
        raise ValueError("padding-free packed batches (cu_seq_lens_q / cu_seq_lens_k) cannot be repeated K times "
                         "along the batch: train on padded batches (TRL: padding_free=False, "
                         "packing_strategy='wrapped' or packing=False)")
    out = {}
    for name, value in inputs.items():
        per_row = isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows
        out[name] = value.repeat(passes, *([1] * (value.dim() - 1))) if per_row and name not in _NOT_PER_ROW else value
    return out


_NO_DROPOUT = (
    "intra-distillation: the {k} passes of {name} were identical in a training step (no active dropout{zeros}), so "
    "the divergence is 0 and the loss is plain cross-entropy. Turn dropout on: in the model's config before it is "
    "built or loaded (attention_dropout / hidden_dropout / dropout, by architecture, e.g. 0.1), or with PEFT "
    "through LoraConfig(lora_dropout=0.1).")


def _warn_if_identical(model, state: _Applied, passes: Tensor) -> None:
    """Warn once when the K passes agree: many LLM configs set every dropout to 0."""
    if state.passes_checked:
        return
    state.passes_checked = True
    with torch.no_grad():
        first = passes[:1].float()
        spread = (passes[1:].float() - first).abs().amax()
        identical = bool(spread <= 1e-6 * first.abs().amax())
    if identical:
        config = getattr(model, "config", None)
        zeros = [f"{key}={value}" for key, value in sorted(vars(config).items())
                 if "dropout" in key and isinstance(value, (int, float)) and value == 0] if config is not None else []
        warnings.warn(_NO_DROPOUT.format(k=state.args.passes, name=type(model).__name__,
                                         zeros=f": its config sets {', '.join(zeros)}" if zeros else ""),
                      UserWarning, stacklevel=4)


def _training_step(model, state: _Applied, own, inputs: dict, labels, shift_labels, items_total, alpha):
    a, k = state.args, state.args.passes
    alpha = _alpha(a, alpha)
    target = _target(model, state.kind, inputs, labels, shift_labels)
    inputs.pop("logits_to_keep", None)  # every position is scored
    if "use_cache" in state.signature.parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in state.signature.parameters.values()):
        inputs["use_cache"] = False  # a training forward has no use for a KV cache of K x B rows
    if "return_dict" in state.signature.parameters:
        inputs["return_dict"] = True
    repeated = _repeated(inputs, k, target.shape[0])
    options = a.loss_options()
    if a.fused_linear:
        layer = output_layer_of(model)
        # The probe and the identical-passes check read values on the host: eager steps only
        # (compiled, they would break the graph; the first eager step does them).
        eager = not torch.compiler.is_compiling()
        probe = eager and not state.probed
        with output_tap(layer.module).armed_for(probe) as tap:
            outputs = own(**repeated)
        if tap.calls != 1:
            raise ValueError(f"{type(model).__name__} called its output layer {tap.calls} times in one forward; the "
                             "fused-linear loss needs exactly one call. Set "
                             "IntraDistillationArguments(fused_linear=False).")
        if eager:
            _warn_if_identical(model, state, tap.hidden.unflatten(0, (k, -1)))
        terms = layer_loss(layer, tap.hidden, k, target, alpha, dict(options, chunk_size=a.chunk_size),
                           autocast_dtype=tap.autocast_dtype,
                           probe=(tap.probe_hidden, outputs.logits) if probe else None)
        state.probed = state.probed or probe
    else:
        outputs = own(**repeated)
        logits = outputs.logits.unflatten(0, (k, -1))
        if not torch.compiler.is_compiling():
            _warn_if_identical(model, state, logits)
        terms = intra_distillation_loss(logits, target.to(logits.device), alpha, **options)
    return _output(model, outputs, terms, target, items_total)


def _output(model, outputs, terms, target: Tensor, items_total) -> IntraDistillationLMOutput:
    loss, ce, divergence, z = per_item(terms, (target != IGNORE).sum(), items_total)
    aux = outputs.get("aux_loss") if isinstance(outputs, Mapping) else None
    coef = getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0)
    if aux is not None and coef:
        loss = loss + coef * aux.to(loss.device)  # as the model adds it to its own loss
    return IntraDistillationLMOutput(loss=loss, ce=ce, divergence=divergence, z_loss=z, aux_loss=aux)
