"""The one internal layer under the public functions: argument checks, the LossSpec they build,
backend choice, the coefficients and the output assembly. Every entry point (the logits loss,
the divergence functions, fused-linear, the vocabulary-parallel losses, the modules) checks its
arguments here, builds one spec, and runs `logits_loss` or `linear_loss`; nothing here imports
the public layer.
"""

from __future__ import annotations

import numbers
import warnings
from typing import NamedTuple

import torch

from .ops import registry
from .ops.linear_loss import LinearLoss, LinearRowTerms
from .ops.logits_loss import LogitsLoss, RowTerms
from .ops.checks import BOUNDS, checked_scalar
from .ops.eager import compute_dtype
from .ops.spec import DIVERGENCES, REDUCTIONS, LossSpec

Tensor = torch.Tensor

BACKENDS = registry.NAMES
PLAIN_DIVERGENCES = ("x", "js")  # those with a function of their own (jeffrey is K/(K-1)·X)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _OutputFields(NamedTuple):
    loss: Tensor
    ce: Tensor
    divergence: Tensor


class IntraDistillationOutput(_OutputFields):
    """(loss, ce, divergence): loss = ce + alpha·divergence (+ the z-loss term). Unpacks as three
    values; `z_loss` holds the z-loss term that `loss` includes (None when z_loss=0)."""

    def __new__(cls, loss, ce, divergence, z_loss=None):
        self = super().__new__(cls, loss, ce, divergence)
        self.z_loss = z_loss
        return self

    def __getnewargs__(self):
        return (*self, self.z_loss)


def available_backends() -> list[str]:
    """Backends usable in this process, fastest first; "torch" is always there."""
    return registry.available_names()


# ----------------------------------------------------------------------------- argument checks

def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """An int (bool refused: True would silently mean 1) within [low, high]."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return int(value)


def check_logits(logits, name: str = "logits") -> tuple[int, tuple[int, ...], int]:
    """(K, batch shape, V) of a [K, *B, V] tensor."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"{name} must have shape [K, *B, V] with the K passes on dim 0, got shape {tuple(logits.shape)}")
    k, v = logits.shape[0], logits.shape[-1]
    if k < 2:
        raise ValueError(f"{name} must hold K >= 2 passes on dim 0, got K = {k} (shape {tuple(logits.shape)})")
    if v == 0:
        raise ValueError(f"{name} must have V >= 1 classes on the last dim, got V = 0 (shape {tuple(logits.shape)})")
    return k, tuple(logits.shape[1:-1]), v


def check_tensor_arg(name: str, t, device, *, floating: bool = True) -> Tensor:
    if not isinstance(t, Tensor) or (floating and not t.is_floating_point()):
        kind = "a floating-point torch.Tensor" if floating else "a torch.Tensor"
        got = f"{t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{name} must be {kind}, got {got}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}")
    return t


def check_output_layer(hidden: Tensor, weight, bias, name: str = "weight") -> int:
    """V of an output layer weight [V, H] (and bias [V]) applied to hidden [K, *B, H]."""
    hdim = hidden.shape[-1]
    check_tensor_arg(name, weight, hidden.device)
    if bias is not None:
        check_tensor_arg("bias", bias, hidden.device)
    if weight.dim() != 2 or weight.shape[1] != hdim or weight.shape[0] == 0:
        raise ValueError(f"{name} must have shape [V, H] with H = {hdim} (hidden's last dim) and V >= 1, got {list(weight.shape)}")
    v = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must have shape [V] = [{v}], got {list(bias.shape)}")
    return v


def check_mask(mask, batch_shape, device) -> Tensor:
    """The kept rows as a bool vector [N]."""
    n = 1
    for s in batch_shape:
        n *= s
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor of shape {list(batch_shape)}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if tuple(mask.shape) != tuple(batch_shape):
        raise ValueError(f"mask must have the batch shape {list(batch_shape)} of logits [K, *B, V], got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but logits are on {device}")
    return mask.reshape(-1)


def check_target(target, batch_shape, ignore_index: int, device) -> tuple[Tensor, Tensor]:
    """Flat int64 targets [N] and the bool vector of rows that are not ignore_index. Their values
    are checked inside the ops (ops/targets.py), where they can be read."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be an integer torch.Tensor of shape {list(batch_shape)}, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices (torch.long), got {target.dtype}")
    if tuple(target.shape) != tuple(batch_shape):
        raise ValueError(f"target must have the batch shape {list(batch_shape)} of logits [K, *B, V], got {list(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but logits are on {device}")
    check_int("ignore_index", ignore_index, INT64_MIN, INT64_MAX)
    target = target.reshape(-1).long()
    return target, target != ignore_index


def check_scalar(name: str, value):
    """A real number within BOUNDS[name] (ops/checks.py), or a one-element floating tensor
    (returned 0-d, its value checked inside an op where it can be read)."""
    bound = BOUNDS[name]
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {list(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor or a real number, got {value.dtype}")
        return checked_scalar(value.reshape(()), name)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not bound.holds(value):
        if torch.compiler.is_compiling():  # the value may be symbolic: no formatting
            raise ValueError(name + " must be " + bound.text)
        raise ValueError(f"{name} must be {bound.text}, got {value}")
    return value


def build_spec(**options) -> LossSpec:
    """The LossSpec of a call, from its public arguments, each checked (ValueError / TypeError
    naming it). Numeric options given as one-element tensors are read here: the kernels take
    them as launch constants."""
    check_choice("reduction", options.get("reduction", "mean"), REDUCTIONS)
    check_choice("divergence", options.get("divergence", "x"), DIVERGENCES)
    if "ignore_index" in options:
        options["ignore_index"] = check_int("ignore_index", options["ignore_index"], INT64_MIN, INT64_MAX)
    for name in ("label_smoothing", "logit_scale", "softcap", "z_loss"):
        if options.get(name) is not None:
            options[name] = float(check_scalar(name, options[name]))
    if "softcap" in options and options["softcap"] is None:
        options["softcap"] = 0.0  # None: off
    if options.get("chunk_size") is not None:
        check_int("chunk_size", options["chunk_size"], 1)
    options["chunk_size"] = options.get("chunk_size") or 0
    return LossSpec(**options)


def check_inplace(inplace_grad, logits: Tensor) -> bool:
    """Whether the gradient may be written over the logits: asked for, and every element of the
    logits has its own memory (a stride-0 view would overwrite itself). A leaf that requires grad
    (a Parameter, or logits a user made a leaf) is refused, as torch refuses in-place operations
    on it: its data would be replaced by its gradient."""
    if not isinstance(inplace_grad, bool):
        raise TypeError(f"inplace_grad must be a bool, got {type(inplace_grad).__name__}")
    if inplace_grad and logits.is_leaf and logits.requires_grad:
        raise ValueError("inplace_grad=True would overwrite the logits with their gradient, but the logits are a leaf "
                         "tensor that requires grad (a Parameter or a tensor made with requires_grad=True), whose "
                         "data would be lost; use inplace_grad=False, or pass the output of an operation (e.g. the "
                         "model's logits)")
    return inplace_grad and may_write_in_place(logits)


def one_pass_applies(reduction: str, *inputs: Tensor) -> bool:
    """The one-pass forward applies when the reduced loss is what gets differentiated: known only
    for reductions "mean" and "sum", and only while autograd records."""
    return reduction != "none" and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)


# ----------------------------------------------------------------------------- backend choice

def pick_backend(backend, t: Tensor, k) -> str:
    """The backend that runs on tensors like t with K passes (the fused ones take t's dtype)."""
    check_choice("backend", backend, ("auto",) + BACKENDS)
    candidates = _candidates(backend, str(t.device), str(t.dtype).removeprefix("torch."))
    for name, limit in candidates:
        if limit == 0 or k <= limit:  # a plain comparison: under torch.compile a guard on K
            return name
        if backend != "auto":
            raise ValueError(f"backend {backend!r} supports at most {limit} passes, got K = {k}")
    if backend == "auto" and candidates == () and t.dtype in FUSED_DTYPES:
        _warn_fallback(t.device.type)
    return registry.FALLBACK


@torch.compiler.assume_constant_result
def _candidates(backend: str, device: str, dtype_name: str) -> tuple[tuple[str, int], ...]:
    """The fused backends to try, in order, with their pass limits (0: none). A plain function
    of strings so torch.compile evaluates it once at trace time; K, possibly symbolic, is
    compared with the limits by the caller. () means the fallback."""
    probe = torch.empty(0, dtype=getattr(torch, dtype_name), device=device)
    if backend == "auto":
        names = registry.AUTO_ORDER.get(probe.device.type, ())
        return tuple((n, registry.get(n).max_passes or 0) for n in names
                     if registry.available(n) and registry.get(n).supports(probe))
    if backend == registry.FALLBACK:
        return ()
    reason = registry.unavailable_reason(backend)
    if reason is not None:
        raise ValueError(f"backend {backend!r} is not available here ({reason}); "
                         f"available backends: {available_backends()}")
    if probe.dtype not in FUSED_DTYPES:
        raise TypeError(f"backend {backend!r} takes float32, bfloat16 or float16 logits, got {probe.dtype}; "
                        f"use backend={registry.FALLBACK!r} for it")
    if not registry.get(backend).supports(probe):
        raise ValueError(f"backend {backend!r} cannot run on {device} tensors ({registry.get(backend).unavailable_reason() or 'see doctor()'}"
                         f"{'; set TRITON_INTERPRET=1 to run Triton on CPU tensors' if backend == 'triton' else ''})")
    return ((backend, registry.get(backend).max_passes or 0),)


_warned: set[str] = set()


def _warn_fallback(device_type: str) -> None:
    """Once per process and device type: "auto" runs the slow eager backend where a fused backend
    should exist (the C++ build failed, Triton is missing on a GPU, ...)."""
    expected = registry.AUTO_ORDER.get(device_type, ())
    if not expected or device_type in _warned or torch.compiler.is_compiling():
        return
    _warned.add(device_type)
    reasons = "; ".join(f"{n}: {registry.unavailable_reason(n) or 'does not take these tensors'}" for n in expected)
    warnings.warn(
        f"intradistill_kernels: backend='auto' falls back to the eager backend on {device_type} "
        f"(an order of magnitude slower on a CPU, see benchmarks/; more memory on a GPU) "
        f"because no fused backend is usable: {reasons}. "
        "Run `python -m intradistill_kernels` for a diagnosis.", RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------- running and assembling

def coefficients(alpha, active: Tensor, spec: LossSpec, dtype: torch.dtype) -> Tensor:
    """coef = [alpha, scale]: the loss is scale·Σ(ce + alpha·div + z_loss·zsq) over the rows, with
    scale = 1/(kept rows) for "mean" (1 when none is kept) and 1 otherwise. alpha keeps its graph."""
    device = active.device
    alpha = alpha.to(device=device, dtype=dtype) if isinstance(alpha, Tensor) else torch.full((), alpha, dtype=dtype, device=device)
    if spec.reduction == "mean":
        scale = 1.0 / active.sum().clamp(min=1).to(dtype)
    else:
        scale = torch.ones((), dtype=dtype, device=device)
    return torch.stack([alpha.reshape(()), scale])


def assemble(spec: LossSpec, rows, loss: Tensor, coef: Tensor, batch_shape) -> IntraDistillationOutput:
    """The output of the per-row (ce, div, zsq) and the reduced loss: reduced by scale for "mean"
    and "sum"; for "none" each row's loss = ce + alpha·div + z_loss·zsq ([*B], 0 at ignored rows)."""
    ce, div, zsq = rows
    if spec.reduction == "none":
        ce, div, zsq = (r.reshape(batch_shape) for r in rows)
        z = spec.z_loss * zsq if spec.has_z else None
        loss = ce + coef[0] * div + (0 if z is None else z)
        return IntraDistillationOutput(loss, ce, div, z)
    scale = coef[1]
    z = scale * spec.z_loss * zsq.sum() if spec.has_z else None
    return IntraDistillationOutput(loss, scale * ce.sum(), scale * div.sum(), z)


def logits_loss(logits: Tensor, target: Tensor | None, alpha, options: dict, name: str = "logits") -> IntraDistillationOutput:
    """The loss of logits [K, *B, V] (or this rank's shard of them, with options["group"]).
    options: the public keyword options (backend and inplace_grad among them); target None with
    options["mask"]: a divergence function (no cross-entropy term)."""
    k, batch_shape, _ = check_logits(logits, name)
    mask = options.pop("mask", None)
    if target is None:
        active = check_mask(mask, batch_shape, logits.device)
        target = torch.zeros(active.shape, dtype=torch.long, device=logits.device)
        options["has_ce"] = False
    else:
        target, active = check_target(target, batch_shape, options.get("ignore_index", -100), logits.device)
    spec = build_spec(backend=pick_backend(options.pop("backend"), logits, k),
                      inplace=check_inplace(options.pop("inplace_grad", False), logits),
                      one_pass=one_pass_applies(options.get("reduction", "mean"), logits), **options)
    coef = coefficients(check_scalar("alpha", alpha), active, spec, compute_dtype(logits.dtype))
    loss, rows, lse_stat, row_target, shard = LogitsLoss.apply(logits, target, active, coef, spec)
    rows = RowTerms.apply(logits, rows, lse_stat, row_target, shard, spec)
    return assemble(spec, rows, loss, coef, batch_shape)


def linear_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, alpha,
                options: dict) -> IntraDistillationOutput:
    """The loss of hidden [K, *B, H] @ weight.T + bias, chunk by chunk (ops/linear_loss.py);
    options as for logits_loss."""
    k, batch_shape, _ = check_logits(hidden, "hidden")
    check_output_layer(hidden, weight, bias)
    target, active = check_target(target, batch_shape, options.get("ignore_index", -100), hidden.device)
    # The GEMM's output is fp32 (float64 for float64): that is what the backend reads.
    rows_dtype = compute_dtype(hidden.dtype)
    spec = build_spec(backend=pick_backend(options.pop("backend"), hidden.new_empty(0, dtype=rows_dtype), k),
                      one_pass=one_pass_applies(options.get("reduction", "mean"), hidden, weight, bias), **options)
    coef = coefficients(check_scalar("alpha", alpha), active, spec, rows_dtype)
    loss, rows = LinearLoss.apply(hidden, weight, bias, target, active, coef, spec)
    rows = LinearRowTerms.apply(hidden, weight, bias, target, active, rows, spec)
    return assemble(spec, rows, loss, coef, batch_shape)


def reduce_rows(rows: Tensor, active: Tensor, reduction: str, batch_shape) -> Tensor:
    """"none" -> [*B] (0 at inactive rows), "sum", or "mean" over the active rows (0 when none)."""
    if reduction == "none":
        return rows.reshape(batch_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / active.sum().clamp(min=1).to(total.dtype)


def may_write_in_place(t: Tensor) -> bool:
    """Whether every element of t has its own memory (no stride-0 or otherwise overlapping
    view), the condition for writing a gradient over it element by element."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    reach = 0  # the largest offset reachable with the dims seen so far
    for stride, size in dims:
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True
