"""The output layer of a Hugging Face language model, read for the fused-linear loss.

The fused loss needs the hidden states that enter the output layer and that layer's weight and
bias, while the model's forward must not compute the [K, B, T, V] logits. A forward pre-hook on the
output layer takes its input (so whatever the architecture does before it is kept: T5's
d_model**-0.5 rescale of tied embeddings, a final norm, ...) and hands the layer zero positions, or
one position per row when the result is to be checked against the model's own logits.
What an architecture does after the output layer has to be reproduced explicitly: the bias buffer
of BART / Marian / mBART / Pegasus (`final_logits_bias`) is; logit soft-capping and logit scales
are passed to the loss when it supports them, and refused otherwise.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from intradistill_kernels import fused_linear_intra_distillation_loss

__all__ = ["OutputLayer", "capture_output_layer_input", "check_not_sharded", "output_layer_of"]

# Config options that change the logits after the output layer, as read by TRL's fused LM head:
# (option, how it maps onto the loss's logit_scale; None for soft-capping).
_SCALE_OPTIONS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
_SOFTCAP_OPTION = "final_logit_softcapping"


def _loss_options() -> set[str]:
    return set(inspect.signature(fused_linear_intra_distillation_loss).parameters)


def _text_config(model):
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _logit_transform(model) -> dict:
    """The softcap / logit_scale keyword arguments that reproduce what `model` does to the output
    layer's result; ValueError when the loss functions cannot express it."""
    config = _text_config(model)
    name = type(model).__name__
    found = {}
    softcap = getattr(config, _SOFTCAP_OPTION, None)
    if softcap is not None:
        found["softcap"] = (float(softcap), f"{_SOFTCAP_OPTION}={softcap}")
    for option in _SCALE_OPTIONS:
        value = getattr(config, option, None)
        if value is None or isinstance(value, bool):
            continue
        scale = float(value)
        if option == "logits_scaling":  # Granite, MiniCPM3 divide; HyperCLOVA X multiplies
            scale = scale if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / scale
        if scale != 1.0:
            found["logit_scale"] = (scale, f"{option}={value}")
        break
    supported = _loss_options()
    kwargs = {}
    for key, (value, where) in found.items():
        if key not in supported:
            raise ValueError(
                f"{name} changes its logits after the output layer ({where} in its config), which this "
                f"version's fused_linear_intra_distillation_loss cannot apply (no `{key}` option): training it "
                "would optimise a different objective. Set IntraDistillationArguments(fused_linear=False) to "
                "use the model's own logits, or use a model without this option.")
        kwargs[key] = value
    return kwargs


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _trained_copy(module: nn.Module) -> nn.Module:
    """PEFT's modules_to_save keeps a trained copy of the layer next to the original; the forward
    uses the active copy unless adapters are disabled."""
    copies = getattr(module, "modules_to_save", None)
    if copies is None or not hasattr(module, "original_module"):
        return module
    if getattr(module, "disable_adapters", False):
        return module.original_module
    active = module.active_adapter
    active = active[0] if isinstance(active, (list, tuple)) else active
    return copies[active] if active in copies else module.original_module


@dataclass
class OutputLayer:
    """The module the model calls on its final hidden states, and what turns its result into logits."""

    module: nn.Module       # the module hooked (what the model calls)
    linear: nn.Module       # the module whose weight and bias are read
    extra_bias: Tensor | None
    loss_kwargs: dict

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    def bias(self) -> Tensor | None:
        b = getattr(self.linear, "bias", None)
        if self.extra_bias is None:
            return b
        extra = self.extra_bias.reshape(-1)
        return extra if b is None else b + extra

    def logits(self, hidden: Tensor) -> Tensor:
        """What the model's logits are for `hidden` (used to check this description, in fp32)."""
        w = self.weight.detach().float()
        b = self.bias()
        z = hidden.detach().float() @ w.T
        if b is not None:
            z = z + b.detach().float()
        z = z * self.loss_kwargs.get("logit_scale", 1.0)
        cap = self.loss_kwargs.get("softcap")
        return z if cap is None else cap * torch.tanh(z / cap)


def output_layer_of(model: nn.Module) -> OutputLayer:
    """The output layer of a (PEFT-unwrapped) language model, or ValueError saying why the fused
    path cannot read it."""
    get = getattr(model, "get_output_embeddings", None)
    module = get() if callable(get) else None
    name = type(model).__name__
    if module is None:
        raise ValueError(f"{name} has no output embeddings (get_output_embeddings() is None): the fused-linear "
                         "loss needs the language-model head; set IntraDistillationArguments(fused_linear=False)")
    if _is_lora_layer(module):
        raise ValueError(
            f"{name}'s output layer carries a LoRA adapter (`lm_head` in target_modules): the fused-linear loss "
            "reads the output weight directly and would miss the adapter. Leave lm_head out of target_modules "
            "(put it in modules_to_save to train it fully), or set IntraDistillationArguments(fused_linear=False).")
    linear = _trained_copy(module)
    if not isinstance(getattr(linear, "weight", None), Tensor) or linear.weight.dim() != 2:
        raise ValueError(f"{name}'s output layer {type(linear).__name__} has no [V, H] weight; set "
                         "IntraDistillationArguments(fused_linear=False)")
    extra = getattr(model, "final_logits_bias", None)
    return OutputLayer(module, linear, extra if isinstance(extra, Tensor) else None, _logit_transform(model))


def check_not_sharded(weight: Tensor, model_name: str) -> None:
    """The fused loss reads the output weight after the model's forward has returned. Under FSDP2 or
    DeepSpeed ZeRO-3 it is then a shard, and a gradient written to it would bypass the framework's
    reduction: refuse instead of training on a slice of the vocabulary."""
    remedy = ("Set IntraDistillationArguments(fused_linear=False) (the loss then runs on the logits the "
              "model's own forward computes, with the weight gathered by the framework), or train with a "
              "strategy that keeps the output layer whole (DDP, FSDP without sharding lm_head, ZeRO stage 1/2).")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        DTensor = ()
    if DTensor and isinstance(weight, DTensor):
        raise ValueError(f"{model_name}'s output weight is a sharded DTensor (FSDP2 / tensor parallel, placements "
                         f"{tuple(weight.placements)}): the fused-linear loss cannot read it outside the module's "
                         f"forward. {remedy}")
    if hasattr(weight, "ds_id") and (weight.numel() == 0 or getattr(weight, "ds_status", None) is not None
                                     and "AVAILABLE" not in str(weight.ds_status)):
        raise ValueError(f"{model_name}'s output weight is partitioned by DeepSpeed ZeRO-3 (ds_shape "
                         f"{tuple(getattr(weight, 'ds_shape', ()))}): the fused-linear loss cannot read it "
                         f"outside the module's forward. {remedy}")


class capture_output_layer_input:
    """Context manager: while active, each call of `module` records its input in `.hidden` and runs
    the layer on no position at all (probe=False) or on the last position only (probe=True, whose
    input is kept in `.probe_hidden` to compare the model's logits against)."""

    def __init__(self, module: nn.Module, probe: bool = False):
        self.module, self.probe = module, probe
        self.hidden: Tensor | None = None
        self.probe_hidden: Tensor | None = None
        self.autocast_dtype: torch.dtype | None = None
        self.calls = 0

    def _hook(self, module, args, kwargs):
        if not args or not isinstance(args[0], Tensor):
            raise ValueError(f"{type(module).__name__} was called without a hidden-state tensor as first argument")
        hidden = args[0]
        self.calls += 1
        self.hidden = hidden
        # Mixed precision may be on inside the model's forward only (accelerate wraps the forward in
        # autocast): the dtype the output layer would have run in is the one seen here.
        device = hidden.device.type
        self.autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        # a slice keeps the batch dims and H, so the model's code after the layer runs unchanged
        kept = hidden[..., -1:, :] if self.probe else hidden[..., :0, :]
        if self.probe:
            self.probe_hidden = kept
        return (kept, *args[1:]), kwargs

    def __enter__(self):
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def check_probe(layer: OutputLayer, probe_hidden: Tensor, model_logits: Tensor, model_name: str,
                autocast: bool = False) -> None:
    """The model's own logits on the probed positions must equal what the fused path computes: the
    last guard against an architecture doing something after its output layer that is not known here."""
    want = model_logits.detach().float().reshape(-1, model_logits.shape[-1])
    got = layer.logits(probe_hidden).reshape(-1, want.shape[-1])
    if got.shape != want.shape:
        raise ValueError(f"{model_name}'s logits have shape {tuple(model_logits.shape)}, not what its output layer "
                         "gives; set IntraDistillationArguments(fused_linear=False)")
    dtypes = (probe_hidden.dtype, layer.weight.dtype, model_logits.dtype)
    sixteen = torch.bfloat16 in dtypes or torch.float16 in dtypes or autocast  # the model's GEMM ran in 16 bits
    tol = 3e-2 if sixteen else 1e-4
    err = (got - want).abs().max().item()
    scale = want.abs().max().item() + 1.0
    if not math.isfinite(err) or err > tol * scale:
        raise ValueError(
            f"{model_name}'s logits differ from hidden @ lm_head.weight.T (+ bias) by {err:.3g} (at logit scale "
            f"{scale:.3g}): the architecture changes its logits after the output layer in a way the fused-linear "
            "loss does not reproduce. Set IntraDistillationArguments(fused_linear=False).")
