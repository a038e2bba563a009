"""Kernel hardening: element offsets beyond 2^31, common logit offsets, and the -inf rule.

Every fused backend is checked against the float64 reference on inputs that break naive kernels:
- logits whose elements lie more than 2^31 elements apart (an untouched torch.empty, sliced, so
  nothing is allocated): 32-bit index arithmetic wraps there and reads a wild address. Each
  backend runs in a subprocess, so a crash fails its test instead of killing the suite;
- a common offset of every logit, which changes no result: the kernels must stay as accurate as
  torch's own fp32 computation, however large the offset;
- a class at -inf in some passes and far below the maximum in the others: X is +inf exactly,
  even where the finite passes' probabilities underflow in fp32.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import intradistill_kernels as idk
from intradistill_kernels.ops import registry
from intradistill_kernels.ops.backend import EarlyGrad, RowWeights
from intradistill_kernels.ops.spec import LossSpec
from helpers import (
    all_backends, assert_close_grads, assert_close_values, fused_backends, loss_and_grad, reference_of,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the Triton interpreter

FUSED = fused_backends()
DIVERGENCES = ["x", "js", "jeffrey"]


# --------------------------------------------------------------------------- 64-bit addressing

def _pass_stride_2_30(gen) -> torch.Tensor:
    """[3, 1, 16] bf16 whose passes are 2^30 elements apart (pass 2 at element 2^31); only the
    48 used elements are written (6 GiB of address space, a few pages of memory)."""
    logits = torch.empty(3, 2**26, 16, dtype=torch.bfloat16)[:, :1]
    logits.copy_(torch.randn(3, 1, 16, generator=gen) * 3)
    return logits


def _class_stride_2_30(gen) -> torch.Tensor:
    """[3, 1, 3] bf16 whose classes are 2^30 elements apart (class 2 of pass 2 at 2^31 + 2)."""
    storage = torch.empty(2 * 2**30 + 3, dtype=torch.bfloat16)
    logits = storage.as_strided((3, 1, 3), (1, 1, 2**30))
    logits.copy_(torch.randn(3, 1, 3, generator=gen) * 3)
    return logits


def _outputs_and_grad(leaf: torch.Tensor, call, weights):
    """(outputs in float64, gradient) of a weighted sum of call(leaf)'s outputs; unlike
    helpers.loss_and_grad, the leaf is not copied, so the kernels read its own strides."""
    outs = call(leaf)
    outs = tuple(outs) if isinstance(outs, tuple) else (outs,)
    sum((o.double() * w).sum() for o, w in zip(outs, weights)).backward()
    return [o.detach().double() for o in outs], leaf.grad


def _check_huge_offsets(backend: str) -> None:
    """Values and gradients on the far-apart elements match the float64 reference, for the loss
    with label smoothing in each divergence, and for the gradient written over the logits."""
    gen = torch.Generator().manual_seed(31)
    for make in (_pass_stride_2_30, _class_stride_2_30):
        logits = make(gen)
        values = logits.clone()  # a dense copy of the 48 (or 9) used elements
        target = torch.randint(0, logits.shape[-1], (1,), generator=gen)
        for divergence in DIVERGENCES:
            def call(b, divergence=divergence):
                return lambda z: idk.intra_distillation_loss(z, target, 0.7, divergence=divergence,
                                                             label_smoothing=0.1, backend=b)
            weights = [torch.rand((), generator=gen, dtype=torch.float64) + 0.5 for _ in range(3)]
            want, want_grad = reference_of(values, call("torch"), weights)
            got, grad = _outputs_and_grad(logits.detach().requires_grad_(), call(backend), weights)
            assert_close_values(got, want, logits.dtype)
            assert_close_grads(grad, want_grad, logits.dtype)
        if backend == "torch":
            continue
        for fn, divergence in ((idk.x_divergence, "x"), (idk.js_divergence, "js")):
            # The gradient written over the logits (what inplace_grad=True does to a non-leaf)
            # goes through the same far-apart offsets it reads.
            w = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
            _, want_grad = reference_of(values, lambda z: fn(z, backend="torch"), [w])
            n = logits[0, ..., 0].numel()
            weights = RowWeights(torch.zeros(n), torch.full((n,), float(w)), None)
            registry.get(backend).forward(logits, torch.zeros(n, dtype=torch.long),
                                          LossSpec(backend, divergence=divergence, has_ce=False),
                                          EarlyGrad(weights, logits))
            assert_close_grads(logits.detach().clone(), want_grad, logits.dtype)
            logits.copy_(values)


@pytest.mark.parametrize("backend", all_backends())
def test_element_offsets_beyond_2_31(backend):
    run = subprocess.run([sys.executable, str(Path(__file__)), backend], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"exit status {run.returncode}\n{run.stdout}\n{run.stderr}"
    assert run.stdout.strip().endswith(f"huge offsets ok: {backend}"), run.stdout + run.stderr


# --------------------------------------------------------------------------- common offsets

def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    # Relative to the value, or absolute where the value is below 1 (X = 0 at identical passes).
    return float(((got.double() - want).abs() / want.abs().clamp(min=1.0)).max())


OFFSETS = [1e2, 1e4, -1e4, 1e30]


@pytest.mark.parametrize("offset", OFFSETS, ids=lambda o: f"{o:g}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", FUSED)
def test_offset_invariance(backend, divergence, offset):
    """X, JS and CE of logits + c stay within 10x torch fp32's own error against the float64
    reference on the same fp32 values (at c = 1e30 every pass of a row rounds to the same logits,
    where X and JS are 0 exactly)."""
    gen = torch.Generator().manual_seed(17)
    k, n, v = 3, 5, 3000
    z = (torch.randn(k, n, v, generator=gen, dtype=torch.float64) * 3 + offset).float()
    target = torch.randint(0, v, (n,), generator=gen)

    def call(b):
        return lambda t: idk.intra_distillation_loss(t, target, 0.7, divergence=divergence, label_smoothing=0.1,
                                                     reduction="none", backend=b)

    want, _ = reference_of(z, call("torch"), [1.0] * 3)
    with torch.no_grad():
        torch_fp32 = call("torch")(z)
        got = call(backend)(z)
    for name, g, t, w in zip(("loss", "ce", "divergence"), got, torch_fp32, want):
        # One ulp of fp32 as the floor of torch's error: it can be 0 by luck on a few rows.
        bound = 10 * max(_max_rel_err(t, w), 2.0**-23)
        err = _max_rel_err(g, w)
        assert err <= bound, f"{name}: error {err:.2e} at offset {offset:g}, torch fp32's x10 {bound:.2e}"
    assert (got.divergence >= 0).all()


@pytest.mark.parametrize("backend", FUSED)
def test_offset_gradients(backend):
    """Gradients at a common offset of 100 stay within the suite's fp32 tolerance. (The saved
    lse_k is one fp32 number: its rounding, 2^-24·|lse_k| relative, bounds the backward's p_k.)"""
    gen = torch.Generator().manual_seed(23)
    k, n, v = 3, 4, 2100
    z = (torch.randn(k, n, v, generator=gen, dtype=torch.float64) * 3 + 100.0).float()
    target = torch.randint(0, v, (n,), generator=gen)
    weights = [torch.rand(n, generator=gen, dtype=torch.float64) + 0.5 for _ in range(3)]
    for divergence in DIVERGENCES:
        def call(b, divergence=divergence):
            return lambda t: idk.intra_distillation_loss(t, target, 1.3, divergence=divergence, label_smoothing=0.1,
                                                         reduction="none", backend=b)
        got, grad = loss_and_grad(z, call(backend), weights)
        want, want_grad = reference_of(z, call("torch"), weights)
        assert_close_values(got, want, torch.float32)
        assert_close_grads(grad, want_grad, torch.float32)


# --------------------------------------------------------------------------- the -inf rule

@pytest.mark.parametrize("below_max", [90.0, 110.0])
@pytest.mark.parametrize("backend", FUSED)
def test_cpu_exp_subnormal_inf_rule(backend, below_max):
    """A class at -inf in one pass and `below_max` under its row's maximum in the others: e^-90 is
    subnormal in fp32 (flushed by a fast exp), e^-110 below even the subnormals, yet the float64
    reference gives X = +inf, as the exact value is. JS stays finite, as do unaffected rows."""
    gen = torch.Generator().manual_seed(5)
    k, n, v = 3, 3, 700
    logits = torch.randn(k, n, v, generator=gen) * 2
    row_max = logits[:, 0].max(-1).values
    logits[:, 0, 123] = row_max - below_max
    logits[1, 0, 123] = float("-inf")
    target = torch.tensor([4, 5, 6])
    want_x = idk.x_divergence(logits.double(), reduction="none", backend="torch")
    assert want_x[0].item() == float("inf")
    x = idk.x_divergence(logits, reduction="none", backend=backend)
    assert x[0].item() == float("inf")
    assert_close_values([x[1:].double()], [want_x[1:]], torch.float32)
    out = idk.intra_distillation_loss(logits, target, divergence="jeffrey", reduction="none", backend=backend)
    assert out.divergence[0].item() == float("inf") and torch.isfinite(out.ce).all()
    want_js = idk.js_divergence(logits.double(), reduction="none", backend="torch")
    assert_close_values([idk.js_divergence(logits, reduction="none", backend=backend).double()], [want_js],
                        torch.float32)



@pytest.mark.parametrize("k", [2, 3, 5, 7])
@pytest.mark.parametrize("backend", all_backends())
def test_one_class_js_is_exactly_zero(backend, k):
    """With one class every p_k is 1 and p̄ = p_k: log p̄ must cancel log p_k exactly, so JS and
    its gradient are 0 however many rows are summed (Triton once subtracted tl.log(K) from its
    own log of Σ_k p_k, one unit in the last place apart: 1.2e-7 per row)."""
    logits = (torch.randn(k, 64, 1, generator=torch.Generator().manual_seed(k)) * 8).requires_grad_()
    out = idk.js_divergence(logits, reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(out * 1.7, logits)
    assert out.item() == 0.0
    assert not bool(grad.any())

if __name__ == "__main__":  # the subprocess of test_element_offsets_beyond_2_31
    _check_huge_offsets(sys.argv[1])
    print(f"huge offsets ok: {sys.argv[1]}")
