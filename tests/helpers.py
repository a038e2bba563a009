"""Shared helpers of the test suite: the float64 reference run and tolerance checks."""

from __future__ import annotations

import torch

import intradistill_kernels as idk

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_backends() -> list[str]:
    return [b for b in idk.available_backends() if b != "torch" and b != "cuda"]


def all_backends() -> list[str]:
    return [b for b in idk.available_backends() if b != "cuda"]


def random_logits(shape, dtype=torch.float32, scale=3.0, generator=None) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def upstream(reduction: str, batch_shape, generator=None) -> torch.Tensor:
    """A gradient that is not 1: random weights per row for "none", a random scalar otherwise."""
    if reduction == "none":
        return torch.rand(batch_shape, generator=generator, dtype=torch.float64) * 2 + 0.25
    return torch.rand((), generator=generator, dtype=torch.float64) * 2 + 0.25


def loss_and_grad(logits: torch.Tensor, call, weights):
    """Runs call(leaf) -> IntraDistillationOutput or tensor, backpropagates a weighted sum of every
    output (so gradients reach each term on its own), returns (outputs in float64, grad)."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = call(leaf)
    outs = tuple(out) if isinstance(out, tuple) else (out,)
    total = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    total.backward()
    return [o.detach().double() for o in outs], leaf.grad


def reference_of(logits: torch.Tensor, call, weights):
    """The float64 reference on the same (possibly rounded) values: backend "torch" on float64."""
    return loss_and_grad(logits.detach().double(), call, weights)


def assert_close_values(got, want, dtype):
    # The kernels accumulate in fp32 whatever the input dtype; 16-bit inputs get the looser bound
    # docs/design.md §5.3 sets for them. The absolute part covers values that cancel to ~0 (V = 1).
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-3, 1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True)


def assert_close_grads(got: torch.Tensor, want: torch.Tensor, dtype):
    assert got.dtype == dtype, f"gradient dtype {got.dtype}, expected {dtype}"
    assert got.shape == want.shape
    scale = float(want.abs().max()) if want.numel() else 1.0
    # fp32 kernels accumulate in fp32; the 16-bit ones also round the stored gradient.
    rel = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rel, atol=rel * max(scale, 0.01))  # floor: gradients that cancel to 0 (V = 1)
