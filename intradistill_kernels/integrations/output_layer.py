"""The output layer of a Hugging Face language model, scored by the fused-linear loss inside the
model's forward.

The fused loss needs the hidden states that enter the output layer and that layer's weight and
bias, while the model's forward must not compute the [K, B, T, V] logits. A forward pre-hook on the
output layer takes its input (so whatever the architecture does before it is kept: T5's
d_model**-0.5 rescale of tied embeddings, a final norm, ...) and hands the layer zero positions, or
one position per row when the result is to be checked against the model's own logits.
What an architecture does after the output layer has to be reproduced explicitly: the bias buffer
of BART / Marian / mBART / Pegasus (`final_logits_bias`), logit soft-capping and logit scales.

The loss itself runs in a second call of the output layer (`layer_loss`), whose forward is the
fused loss: the frameworks that shard the weight gather it around a module call, so the weight is
whole there and its gradient goes to their reduction. FSDP2 unshards the unit (the root, or the
layer's own unit) and hooks the loss for its backward; DeepSpeed ZeRO-3 fetches the module's
parameters, and `GatheredParameters` covers a weight owned by a child module (PEFT's
modules_to_save copy). A weight that is still a DTensor there is sharded by tensor parallelism.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from intradistill_kernels import IntraDistillationOutput, fused_linear_intra_distillation_loss
from intradistill_kernels.distributed import vocab_parallel_fused_linear_intra_distillation_loss

__all__ = ["OutputLayer", "OutputTap", "check_probe", "layer_loss", "output_layer_of", "output_tap",
           "remove_output_tap"]

# Config options that change the logits after the output layer, as read by TRL's fused LM head.
_SCALE_OPTIONS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
_SOFTCAP_OPTION = "final_logit_softcapping"


def _text_config(model):
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _logit_transform(model) -> dict:
    """The softcap / logit_scale keyword arguments that reproduce what `model` does to the output
    layer's result."""
    config = _text_config(model)
    kwargs = {}
    softcap = getattr(config, _SOFTCAP_OPTION, None)
    if softcap is not None:
        kwargs["softcap"] = float(softcap)
    for option in _SCALE_OPTIONS:
        value = getattr(config, option, None)
        if value is None or isinstance(value, bool):
            continue
        scale = float(value)
        if option == "logits_scaling":  # Granite, MiniCPM3 divide; HyperCLOVA X multiplies
            scale = scale if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / scale
        if scale != 1.0:
            kwargs["logit_scale"] = scale
        break
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
    model_name: str

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
        """What the model's logits are for `hidden` (used to check this description, in fp32); for
        a tensor-parallel layer, this rank's columns of them (what the layer returns)."""
        w = _local(self.weight).detach().float()
        hidden = _replicated(hidden)
        b = self.bias()
        b = None if b is None else _local(b)
        z = hidden.detach().float().reshape(-1, w.shape[1]) @ w.T
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
    return OutputLayer(module, linear, extra if isinstance(extra, Tensor) else None, _logit_transform(model), name)


class OutputTap:
    """Takes the output layer's input: a forward pre-hook installed once on the module the model
    calls (so that torch.compile traces it like the model's own code), which does nothing until
    armed. Armed, each call records its input in `.hidden` and runs the layer on no position at
    all (or on the last position only, when probing, whose input is kept in `.probe_hidden` to
    compare the model's logits against)."""

    def __init__(self, module: nn.Module):
        self.armed = self.probe = False
        self.hidden: Tensor | None = None
        self.probe_hidden: Tensor | None = None
        self.autocast_dtype: torch.dtype | None = None
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not self.armed:
            return None
        if not args or not isinstance(args[0], Tensor):
            raise ValueError(f"{type(module).__name__} was called without a hidden-state tensor as first argument")
        hidden = args[0]
        self.calls += 1
        self.hidden = hidden
        # Mixed precision may be on inside the model's forward only (accelerate wraps the forward in
        # autocast): the dtype the output layer would have run in is the one seen here.
        device = hidden.device.type
        self.autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        # A slice keeps the batch dims and H, so the model's code after the layer runs unchanged.
        # DTensor (tensor parallelism) cannot view an empty slice: it gets one position.
        one = self.probe or _dtensor(hidden) or any(_dtensor(p) for p in module.parameters(recurse=False))
        kept = hidden[..., -1:, :] if one else hidden[..., :0, :]
        if self.probe:
            self.probe_hidden = kept
        return (kept, *args[1:]), kwargs

    @contextlib.contextmanager
    def armed_for(self, probe: bool):
        self.armed, self.probe, self.calls = True, probe, 0
        self.hidden = self.probe_hidden = None
        try:
            yield self
        finally:
            self.armed = False


_TAP = "_intra_distillation_tap"


def output_tap(module: nn.Module) -> OutputTap:
    """The module's tap, installed on first use (apply_intra_distillation installs it up front)."""
    tap = module.__dict__.get(_TAP)
    if tap is None:
        tap = OutputTap(module)
        object.__setattr__(module, _TAP, tap)
    return tap


def remove_output_tap(module: nn.Module) -> None:
    tap = module.__dict__.pop(_TAP, None)
    if tap is not None:
        tap.handle.remove()


def check_probe(layer: OutputLayer, probe_hidden: Tensor, model_logits: Tensor, autocast: bool = False) -> None:
    """The model's own logits on the probed positions must equal what the fused path computes: the
    last guard against an architecture doing something after its output layer that is not known here."""
    name = layer.model_name
    want = model_logits.detach().float().reshape(-1, model_logits.shape[-1])
    got = layer.logits(probe_hidden).reshape(-1, want.shape[-1])
    if got.shape != want.shape:
        raise ValueError(f"{name}'s logits have shape {tuple(model_logits.shape)}, not what its output layer "
                         "gives; set IntraDistillationArguments(fused_linear=False)")
    dtypes = (probe_hidden.dtype, layer.weight.dtype, model_logits.dtype)
    sixteen = torch.bfloat16 in dtypes or torch.float16 in dtypes or autocast  # the model's GEMM ran in 16 bits
    tol = 3e-2 if sixteen else 1e-4
    err = (got - want).abs().max().item()
    scale = want.abs().max().item() + 1.0
    if not math.isfinite(err) or err > tol * scale:
        raise ValueError(
            f"{name}'s logits differ from hidden @ lm_head.weight.T (+ bias) by {err:.3g} (at logit scale "
            f"{scale:.3g}): the architecture changes its logits after the output layer in a way the fused-linear "
            "loss does not reproduce. Set IntraDistillationArguments(fused_linear=False).")


# ---------------------------------------------------------------------------- the loss call


def _fsdp_unit(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(module, FSDPModule)


def _dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _zero3_gathered(*params):
    """DeepSpeed ZeRO-3 fetches a module's own parameters around its call; a weight owned by a
    child module (PEFT's modules_to_save copy) is gathered here for the loss (its gradient is
    computed during the forward, so the backward does not read it again)."""
    pending = {id(p): p for p in params if p is not None and hasattr(p, "ds_id")
               and "AVAILABLE" != getattr(getattr(p, "ds_status", None), "name", "AVAILABLE")}
    if not pending:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(pending.values()))


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if _dtensor(t) else t


def _replicated(t: Tensor) -> Tensor:
    """The whole value of a DTensor (a tensor-parallel layer's input is replicated)."""
    return t.full_tensor() if _dtensor(t) else t


def _sharded(layer: OutputLayer) -> bool:
    """Whether a framework (FSDP2, DeepSpeed ZeRO-3) gathers the output weight around its call."""
    return _fsdp_unit(layer.module) or _fsdp_unit(layer.linear) or hasattr(layer.weight, "ds_id")


def tensor_parallel(layer: OutputLayer) -> bool:
    """Whether the output weight is split over the vocabulary by tensor parallelism: a DTensor
    outside an FSDP2 unit (whose call would unshard it). The loss then goes to the
    vocabulary-parallel fused-linear loss, each rank with its shard."""
    return _dtensor(layer.weight) and not (_fsdp_unit(layer.module) or _fsdp_unit(layer.linear))


def _fused(layer: OutputLayer, hidden: Tensor, target: Tensor, alpha, options: dict,
           autocast_dtype: torch.dtype | None) -> IntraDistillationOutput:
    weight, bias = layer.weight, layer.bias()
    loss = fused_linear_intra_distillation_loss
    if _dtensor(weight):  # a shard of the vocabulary on each rank (tensor parallelism)
        loss, hidden = vocab_parallel_fused_linear_intra_distillation_loss, _replicated(hidden)
    # Under autocast the output layer would have run in the autocast dtype: so does the fused GEMM,
    # while the loss itself accumulates in fp32 (the kernels never see autocast).
    dtype = autocast_dtype or weight.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    device_type = hidden.device.type
    off = torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else contextlib.nullcontext()
    with off:
        return loss(hidden, weight, target.to(hidden.device), bias, alpha, **layer.loss_kwargs, **options)


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward):
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


def layer_loss(layer: OutputLayer, hidden: Tensor, passes: int, target: Tensor, alpha, options: dict, *,
               autocast_dtype: torch.dtype | None = None, probe: tuple[Tensor, Tensor] | None = None
               ) -> IntraDistillationOutput:
    """The fused-linear loss of `hidden` ([K*B, ..., H], the output layer's input of the K passes)
    computed in a call of the output layer, so that the weight is whole and its gradient is
    reduced by whatever shards it. probe: (the probed hidden, the model's logits there), checked
    while the weight is whole."""
    # An FSDP2 unit on the trained copy itself is called directly, so that its hooks unshard it.
    caller = layer.linear if layer.linear is not layer.module and _fsdp_unit(layer.linear) else layer.module
    result = []

    def forward(h, *args, **kwargs):
        with _zero3_gathered(layer.weight, getattr(layer.linear, "bias", None)):
            if probe is not None:
                check_probe(layer, *probe, autocast=autocast_dtype is not None)
            out = _fused(layer, h.unflatten(0, (passes, -1)), target, alpha, options, autocast_dtype)
        result.append(out)
        return out.loss

    if tensor_parallel(layer) or (torch.compiler.is_compiling() and not _sharded(layer)):
        # Tensor parallel: each rank holds its shard whole, and the layer's own hooks would turn the
        # loss into logits. Compiled, a plain layer needs no framework hook around the loss, and
        # swapping a module's forward would break the graph.
        loss = forward(hidden)
    else:
        with _forward_replaced(caller, forward):
            # the loss that comes back has been through the framework's hooks (its backward re-gathers)
            loss = caller(hidden)
    out = result[0]
    return IntraDistillationOutput(loss, out.ce.detach(), out.divergence.detach(),
                                   None if out.z_loss is None else out.z_loss.detach())
