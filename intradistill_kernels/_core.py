"""The internal layer under the public functions and ops/: argument checks, backend choice,
reductions and the output type. Everything the loss entry points share is defined here once;
nothing here imports the public layer.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .ops import backend_available, backend_impl, unavailable_reason

Tensor = torch.Tensor

BACKENDS = ("triton", "cuda", "cpu", "torch")
REDUCTIONS = ("mean", "sum", "none")
DIVERGENCES = ("x", "js", "jeffrey")
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


def jeffrey_factor(k) -> float:
    """"jeffrey" (mean over pairs of the symmetric KL / 2) = K/(K-1) * X, exactly (docs/design.md §1)."""
    return k / (k - 1)


def available_backends() -> list[str]:
    """Backends usable in this process, fastest first; "torch" is always there."""
    return [b for b in BACKENDS if backend_available(b)]


# ----------------------------------------------------------------------------- argument checks

def host_reads_are_free(device) -> bool:
    """Whether a value may be read on the host here. On an accelerator, reading a device tensor
    (bool(), .item(), nonzero) waits for the stream and breaks CUDA-graph capture, so the checks
    run on the device instead (torch._assert_async) and shapes never depend on values."""
    return torch.device(device).type == "cpu" and not torch.compiler.is_compiling()


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


def check_target(target, batch_shape, v: int, ignore_index: int, device) -> tuple[Tensor, Tensor]:
    """Flat int64 targets [N] and the bool vector of rows that are not ignore_index."""
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
    active = target != ignore_index
    bad = active & ((target < 0) | (target >= v))
    message = f"target values must lie in [0, {v}) or equal ignore_index={ignore_index}"
    if not host_reads_are_free(target.device):
        torch._assert_async(~bad.any(), message)  # fails at the next synchronising call
    elif bool(bad.any()):
        raise ValueError(f"{message}; found {int(target[bad][0])}")
    return target, active


def check_scalar(name: str, value, low: float, high: float | None = None):
    """A finite real number in [low, high], or a one-element floating tensor (returned 0-d).

    A tensor on an accelerator is checked on the device (torch._assert_async) so that a schedule
    kept on the GPU costs no host synchronisation; on the CPU it is checked here.
    """
    bound = f"in [{low}, {high}]" if high is not None else f"finite and >= {low}"
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {list(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor or a real number, got {value.dtype}")
        value = value.reshape(())
        ok = torch.isfinite(value) & (value >= low)
        if high is not None:
            ok = ok & (value <= high)
        if not host_reads_are_free(value.device):
            torch._assert_async(ok, f"{name} must be {bound}")
        elif not bool(ok):
            raise ValueError(f"{name} must be {bound}, got {float(value)}")
        return value
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (value >= low and (high is None or value <= high)) or value != value or abs(value) == float("inf"):
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


@dataclass(frozen=True)
class LossOptions:
    """The checked scalar options of a K-pass loss call."""
    alpha: float | Tensor
    divergence: str
    label_smoothing: float
    ignore_index: int
    reduction: str
    logit_scale: float = 1.0
    softcap: float = 0.0   # 0: off
    z_loss: float = 0.0


def _launch_constant(name: str, value, low: float, high: float | None = None) -> float:
    value = check_scalar(name, value, low, high)
    # The kernels take it as a launch constant: a host read, only for a tensor-valued argument.
    return float(value)


def check_loss_options(alpha, divergence, label_smoothing, ignore_index, reduction,
                       logit_scale=1.0, softcap=None, z_loss=0.0) -> LossOptions:
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("divergence", divergence, DIVERGENCES)
    alpha = check_scalar("alpha", alpha, 0.0)
    label_smoothing = _launch_constant("label_smoothing", label_smoothing, 0.0, 1.0)
    check_int("ignore_index", ignore_index, INT64_MIN, INT64_MAX)
    logit_scale = _launch_constant("logit_scale", logit_scale, 0.0)
    if logit_scale == 0:
        raise ValueError("logit_scale must be > 0, got 0 (every class would be equally likely)")
    if softcap is not None:
        softcap = _launch_constant("softcap", softcap, 0.0)
        if softcap == 0:
            raise ValueError("softcap must be None (off) or > 0, got 0")
    z_loss = _launch_constant("z_loss", z_loss, 0.0)
    return LossOptions(alpha, divergence, label_smoothing, int(ignore_index), reduction, logit_scale,
                       softcap or 0.0, z_loss)


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
    return "torch"


@torch.compiler.assume_constant_result
def _candidates(backend: str, device: str, dtype_name: str) -> tuple[tuple[str, int], ...]:
    """The fused backends to try, in order, with their pass limits (0: none). A plain function
    of strings so torch.compile evaluates it once at trace time; K, possibly symbolic, is
    compared with the limits by the caller."""
    probe = torch.empty(0, dtype=getattr(torch, dtype_name), device=device)
    if backend == "auto":
        if probe.dtype not in FUSED_DTYPES:
            return ()
        order = ("triton", "cuda") if probe.is_cuda else ("cpu",)
        return tuple((n, max_passes(n) or 0) for n in order if backend_available(n) and backend_impl(n).supports(probe))
    if backend == "torch":
        return ()
    if not backend_available(backend):
        raise ValueError(f"backend {backend!r} is not available here ({unavailable_reason(backend)}); "
                         f"available backends: {available_backends()}")
    if probe.dtype not in FUSED_DTYPES:
        raise TypeError(f"backend {backend!r} takes float32, bfloat16 or float16 logits, got {probe.dtype}; use backend='torch' for it")
    if not backend_impl(backend).supports(probe):
        hint = " (set TRITON_INTERPRET=1 to run Triton on CPU tensors)" if backend == "triton" else ""
        raise ValueError(f"backend {backend!r} cannot run on {device} tensors{hint}")
    return ((backend, max_passes(backend) or 0),)


def max_passes(name: str) -> int | None:
    return None if name == "torch" else backend_impl(name).max_passes


_warned: set[str] = set()


def _warn_fallback(device_type: str) -> None:
    """Once per process and device type: "auto" runs the slow reference where a fused backend
    should exist (the C++ build failed, Triton is missing on a GPU, ...)."""
    expected = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}.get(device_type, ())
    if not expected or device_type in _warned or torch.compiler.is_compiling():
        return
    _warned.add(device_type)
    reasons = "; ".join(f"{n}: {unavailable_reason(n) or 'does not take these tensors'}" for n in expected)
    warnings.warn(
        f"intradistill_kernels: backend='auto' falls back to the eager reference on {device_type} "
        f"(several times slower, more memory) because no fused backend is usable: {reasons}. "
        "Run `python -m intradistill_kernels` for a diagnosis.", RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------- reductions and output

def reduce_rows(rows: Tensor, active: Tensor, reduction: str, batch_shape) -> Tensor:
    """"none" -> [*B] (0 at inactive rows), "sum", or "mean" over the active rows (0 when none)."""
    if reduction == "none":
        return rows.reshape(batch_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / active.sum().clamp(min=1).to(total.dtype)


def loss_output(ce_rows: Tensor, div_rows: Tensor, active: Tensor, batch_shape, opts: LossOptions,
                zsq_rows: Tensor | None = None) -> IntraDistillationOutput:
    """The per-row terms reduced and combined: loss = ce + alpha·divergence + z_loss·mean lse²."""
    ce = reduce_rows(ce_rows, active, opts.reduction, batch_shape)
    div = reduce_rows(div_rows, active, opts.reduction, batch_shape)
    loss = ce + opts.alpha * div
    z = None
    if zsq_rows is not None and opts.z_loss > 0:
        z = opts.z_loss * reduce_rows(zsq_rows, active, opts.reduction, batch_shape)
        loss = loss + z
    return IntraDistillationOutput(loss, ce, div, z)


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
