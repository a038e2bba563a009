"""Public functional API: argument checking, shapes, reductions and dispatch to a backend."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from . import reference
from .ops import backend_available, backend_impl

Tensor = torch.Tensor

BACKENDS = ("triton", "cuda", "cpu", "torch")
REDUCTIONS = ("mean", "sum", "none")
DIVERGENCES = ("x", "js", "jeffrey")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class IntraDistillationOutput(NamedTuple):
    loss: Tensor
    ce: Tensor
    divergence: Tensor


def available_backends() -> list[str]:
    """Backends usable in this process, fastest first; "torch" is always there."""
    return [b for b in BACKENDS if backend_available(b)]


# ----------------------------------------------------------------------------- argument checks

def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_logits(logits, name: str = "logits") -> tuple[int, tuple[int, ...], int]:
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


def _check_mask(mask, batch_shape, device) -> Tensor:
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


def _check_target(target, batch_shape, v: int, ignore_index: int, device) -> tuple[Tensor, Tensor]:
    """Flat int64 targets [N] and the bool vector of rows that are not ignore_index."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be an integer torch.Tensor of shape {list(batch_shape)}, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices (torch.long), got {target.dtype}")
    if tuple(target.shape) != tuple(batch_shape):
        raise ValueError(f"target must have the batch shape {list(batch_shape)} of logits [K, *B, V], got {list(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but logits are on {device}")
    if not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    target = target.reshape(-1).long()
    active = target != ignore_index
    bad = active & ((target < 0) | (target >= v))
    if torch.compiler.is_compiling():
        # A traced graph cannot branch on data; the check becomes an (async) runtime assert.
        torch._assert_async(~bad.any(), f"target values must lie in [0, {v}) or equal ignore_index={ignore_index}")
    elif bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"target values must lie in [0, {v}) or equal ignore_index={ignore_index}; found {value}")
    return target, active


def _check_float(name: str, value, low: float, high: float | None = None) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {list(value.shape)}")
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (value >= low and (high is None or value <= high)):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _resolve_backend(backend, logits: Tensor) -> str:
    _check_choice("backend", backend, ("auto",) + BACKENDS)
    return _pick_backend(backend, str(logits.device), str(logits.dtype).removeprefix("torch."), int(logits.shape[0]))


@torch.compiler.assume_constant_result
def _pick_backend(backend: str, device: str, dtype_name: str, k: int) -> str:
    """The backend that runs; a plain function of strings so torch.compile evaluates it once at
    trace time instead of tracing the import machinery behind it."""
    probe = torch.empty(0, dtype=getattr(torch, dtype_name), device=device)
    if backend == "auto":
        if probe.dtype not in _FUSED_DTYPES:
            return "torch"
        for name in ("triton", "cuda") if probe.is_cuda else ("cpu",):
            if backend_available(name) and backend_impl(name).supports(probe) and k <= _max_passes(name):
                return name
        return "torch"
    if backend == "torch":
        return backend
    if not backend_available(backend):
        raise ValueError(f"backend {backend!r} is not available here; available backends: {available_backends()}")
    if probe.dtype not in _FUSED_DTYPES:
        raise TypeError(f"backend {backend!r} takes float32, bfloat16 or float16 logits, got {probe.dtype}; use backend='torch' for it")
    if not backend_impl(backend).supports(probe):
        hint = " (set TRITON_INTERPRET=1 to run Triton on CPU tensors)" if backend == "triton" else ""
        raise ValueError(f"backend {backend!r} cannot run on {device} tensors{hint}")
    if k > _max_passes(backend):
        raise ValueError(f"backend {backend!r} supports at most {_max_passes(backend)} passes, got K = {k}")
    return backend


def _max_passes(name: str) -> float:
    return getattr(backend_impl(name), "max_passes", None) or float("inf")


# ----------------------------------------------------------------------------- row computation

def _rows(logits, target, active, divergence, label_smoothing, backend, inplace_grad):
    """Per-row (mean CE over passes or None, divergence), each [N], 0 at inactive rows."""
    k, v = logits.shape[0], logits.shape[-1]
    if backend == "torch":
        flat = logits.reshape(k, -1, v)
        div = reference.DIVERGENCE_ROWS[divergence](flat, active)
        ce = None if target is None else reference.cross_entropy_rows(flat, target, active, label_smoothing)
        return ce, div
    from .ops.fused import fused_rows

    row_target = target if target is not None else torch.zeros_like(active, dtype=torch.long)
    row_target = torch.where(active, row_target, -1)
    ce, div, _, _ = fused_rows(
        logits, row_target, divergence == "js", float(label_smoothing), target is not None,
        bool(inplace_grad), backend,
    )
    if divergence == "jeffrey":
        div = div * (k / (k - 1))
    return (ce if target is not None else None), div


def _reduce(rows: Tensor, active: Tensor, reduction: str, batch_shape) -> Tensor:
    if reduction == "none":
        return rows.reshape(batch_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / active.sum().clamp(min=1).to(total.dtype)


# ----------------------------------------------------------------------------- public functions

def _divergence(logits, mask, reduction, backend, divergence, inplace_grad):
    _, batch_shape, _ = _check_logits(logits)
    _check_choice("reduction", reduction, REDUCTIONS)
    active = _check_mask(mask, batch_shape, logits.device)
    backend = _resolve_backend(backend, logits)
    _, rows = _rows(logits, None, active, divergence, 0.0, backend, inplace_grad)
    return _reduce(rows, active, reduction, batch_shape)


def x_divergence(logits: Tensor, mask: Tensor | None = None, reduction: str = "mean", backend: str = "auto",
                 *, inplace_grad: bool = False) -> Tensor:
    """X-divergence (1/K) Σ_k [KL(p_k ‖ p̄) + KL(p̄ ‖ p_k)] of K passes stacked on dim 0.

    logits [K, *B, V]; mask bool [*B] (False rows ignored); reduction "mean" (over kept rows,
    0.0 when none is kept), "sum" or "none" ([*B], 0 at ignored rows). inplace_grad=True lets the
    fused backends write the gradient over `logits` (the logits must not be used after backward).
    """
    return _divergence(logits, mask, reduction, backend, "x", inplace_grad)


def js_divergence(logits: Tensor, mask: Tensor | None = None, reduction: str = "mean", backend: str = "auto",
                  *, inplace_grad: bool = False) -> Tensor:
    """Generalised Jensen-Shannon divergence (1/K) Σ_k KL(p_k ‖ p̄); arguments as x_divergence."""
    return _divergence(logits, mask, reduction, backend, "js", inplace_grad)


def intra_distillation_loss(
    logits: Tensor, target: Tensor, alpha: float = 1.0, *, divergence: str = "x",
    label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
    backend: str = "auto", inplace_grad: bool = False,
) -> IntraDistillationOutput:
    """Cross-entropy averaged over the K passes plus alpha times their divergence.

    logits [K, *B, V], target [*B] (class ids; ignore_index rows are left out of both terms).
    divergence: "x" (the paper's X-divergence), "js" ((1/K) Σ KL(p_k ‖ p̄)) or "jeffrey" (mean over
    pairs of the symmetric KL / 2, R-Drop's term; equal to K/(K-1) times X).
    Returns IntraDistillationOutput(loss, ce, divergence) with loss = ce + alpha * divergence.
    """
    _, batch_shape, v = _check_logits(logits)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_float("alpha", alpha, 0.0)
    _check_float("label_smoothing", label_smoothing, 0.0, 1.0)
    if isinstance(label_smoothing, Tensor):
        label_smoothing = float(label_smoothing)
    target, active = _check_target(target, batch_shape, v, ignore_index, logits.device)
    backend = _resolve_backend(backend, logits)
    ce_rows, div_rows = _rows(logits, target, active, divergence, label_smoothing, backend, inplace_grad)
    ce = _reduce(ce_rows, active, reduction, batch_shape)
    div = _reduce(div_rows, active, reduction, batch_shape)
    return IntraDistillationOutput(ce + alpha * div, ce, div)


def consistency_mse(outputs: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Regression form of the divergence (the paper's Eq. 9): (1/K) Σ_k ‖o_k − ō‖².

    outputs [K, *B] (one value per row) or [K, *B, D] (a vector per row). With a mask, *B is the
    mask's shape; without one, outputs of 2 dims are [K, B] and more dims end in D.
    """
    if not isinstance(outputs, Tensor):
        raise TypeError(f"outputs must be a torch.Tensor, got {type(outputs).__name__}")
    if not outputs.is_floating_point():
        raise TypeError(f"outputs must be a floating-point tensor, got {outputs.dtype}")
    if outputs.dim() < 2 or outputs.shape[0] < 2:
        raise ValueError(f"outputs must have shape [K, *B] or [K, *B, D] with K >= 2 passes on dim 0, got {tuple(outputs.shape)}")
    _check_choice("reduction", reduction, REDUCTIONS)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
        nb = mask.dim()
        if tuple(outputs.shape[1:1 + nb]) != tuple(mask.shape) or outputs.dim() - 1 - nb > 1:
            raise ValueError(f"mask of shape {list(mask.shape)} must match outputs [K, *B] or [K, *B, D], got outputs {list(outputs.shape)}")
        batch_shape = tuple(mask.shape)
    else:
        batch_shape = tuple(outputs.shape[1:]) if outputs.dim() == 2 else tuple(outputs.shape[1:-1])
    active = _check_mask(mask, batch_shape, outputs.device)
    o = outputs.reshape(outputs.shape[0], active.numel(), -1)
    rows = reference.consistency_mse_rows(o, active)
    return _reduce(rows, active, reduction, batch_shape)
