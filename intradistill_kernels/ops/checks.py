"""Values (targets, scalar tensors) checked where they can be read: inside the custom ops, so that eager calls and
torch.compile'd ones raise the same ValueError naming the offending value on the CPU. On an
accelerator reading a value would wait for the device, so the check runs there
(torch._assert_async) and fails at the next synchronising call."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .spec import LossSpec

Tensor = torch.Tensor


def host_reads_are_free(device: torch.device) -> bool:
    """Whether a value may be read on the host: on the CPU. On an accelerator, reading a device
    tensor (bool(), .item(), nonzero) waits for the stream and breaks CUDA-graph capture, so
    checks run on the device and shapes never depend on values."""
    return device.type == "cpu"


def check_target_values(target: Tensor, active: Tensor, v: int, spec: LossSpec) -> None:
    bad = active & ((target < 0) | (target >= v))
    message = f"target values must lie in [0, {v}) or equal ignore_index={spec.ignore_index}"
    if host_reads_are_free(target.device):
        if bool(bad.any()):
            raise ValueError(f"{message}; found {int(target[bad][0])}")
    else:
        torch._assert_async(~bad.any(), message)


def row_targets(target: Tensor, active: Tensor, v: int, spec: LossSpec) -> Tensor:
    """int64 [N]: the class of each active row, -1 where the row is inactive (what kernels take)."""
    if spec.has_ce:
        check_target_values(target, active, v, spec)
        return torch.where(active, target, -1)
    return torch.where(active, 0, -1)


class Bound(NamedTuple):
    low: float
    high: float
    strict: bool  # low itself excluded
    text: str     # the bound in words (kept as text: torch.compile cannot format a symbolic float)

    def holds(self, value) -> bool:
        above = value > self.low if self.strict else value >= self.low
        return bool(above and value <= self.high and value != math.inf)  # NaN fails both comparisons


BOUNDS = {
    "alpha": Bound(0.0, math.inf, False, "finite and >= 0"),
    "label_smoothing": Bound(0.0, 1.0, False, "in [0, 1]"),
    "logit_scale": Bound(0.0, math.inf, True, "finite and > 0"),
    "softcap": Bound(0.0, math.inf, True, "finite and > 0 (None turns it off)"),
    "z_loss": Bound(0.0, math.inf, False, "finite and >= 0"),
}


@torch.library.custom_op("intradistill::checked_scalar", mutates_args=())
def checked_scalar(value: Tensor, name: str) -> Tensor:
    """A copy of the 0-d tensor `value` (alpha, a label smoothing, ...) after checking it against
    BOUNDS[name]: on the CPU a ValueError naming the value, on an accelerator a device-side assert."""
    bound = BOUNDS[name]
    if host_reads_are_free(value.device):
        if not bound.holds(float(value)):
            raise ValueError(f"{name} must be {bound.text}, got {float(value)}")
    else:
        low = value > bound.low if bound.strict else value >= bound.low
        torch._assert_async(torch.isfinite(value) & low & (value <= bound.high), f"{name} must be {bound.text}")
    return value.clone()


@checked_scalar.register_fake
def _(value, name):
    return torch.empty_like(value)


def _checked_scalar_backward(ctx, grad):
    return grad, None


checked_scalar.register_autograd(_checked_scalar_backward)
