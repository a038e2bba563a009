"""Shared helpers of the test suite: the device axis, the float64 reference run and the tolerance
checks (one table per dtype)."""

from __future__ import annotations

import contextlib
import re
import socket
from dataclasses import dataclass
from unittest import mock

import torch

import intradistill_kernels as idk
from intradistill_kernels import reference
from intradistill_kernels.ops.logits_loss import LogitsLoss, RowTerms
from intradistill_kernels.ops.loss_terms import reduced_loss

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# cpu everywhere; cuda where a GPU exists (there Triton is compiled, not interpreted: conftest.py).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass(frozen=True)
class Tolerance:
    """Bounds of a result against the float64 reference on the same (rounded) input values.

    value_rtol/value_atol: each output value. grad_rel: every gradient element, relative to the
    largest |gradient| (the kernels accumulate in fp32; 16-bit gradients are also rounded when
    stored). eager_rtol/eager_atol: the elementwise 16-bit criterion on gradients,
    |ours - exact| <= |torch eager in the same dtype - exact| + eager_rtol * |exact| + eager_atol * max|exact|.
    """
    value_rtol: float
    value_atol: float
    grad_rel: float
    eager_rtol: float | None = None
    eager_atol: float | None = None
    grad_atol: float = 0.0  # an absolute floor on every gradient element


# The absolute parts cover values and gradients that cancel to ~0 (V = 1) at small logits; for
# values, value_floor gives the part that grows with the logits' spread and a sum's rows. The
# 16-bit eager bound is one unit in the last place of the stored gradient: rounding to it costs
# half of one. The fp32
# gradient floor: the saved lse_k is one fp32 number, so p_k = exp(t − lse_k) carries a relative
# error of up to 2^-24·|lse_k| (design.md §1.9), and p_k − 1 near p_k = 1 keeps it absolute:
# 2^-24 · 40 · (row weight ≤ 1.5) ≈ 4e-6 for the |logits| ≤ 40 the tests draw (randn · 8).
TOLERANCES = {
    torch.float32: Tolerance(1e-5, 1e-6, 2e-5, grad_atol=4e-6),
    torch.bfloat16: Tolerance(1e-3, 1e-4, 1e-2, eager_rtol=2.0**-7, eager_atol=1e-6),
    torch.float16: Tolerance(1e-3, 1e-4, 2e-3, eager_rtol=2.0**-10, eager_atol=1e-6),
}


def backends_on(device: str, *, fused_only: bool = False) -> list[str]:
    """The backends that take tensors on `device`: on cpu as before (the interpreter's Triton
    where no GPU exists, the C++ cpu kernel, torch); on cuda compiled Triton, the CUDA kernel
    and torch."""
    names = idk.available_backends()
    if device == "cuda":
        keep = [b for b in names if b in ("triton", "cuda", "torch")]
    else:
        keep = [b for b in names if b != "cuda" and (b != "triton" or not torch.cuda.is_available())]
    return [b for b in keep if b != "torch"] if fused_only else keep


def fused_backends(device: str = "cpu") -> list[str]:
    return backends_on(device, fused_only=True)


def all_backends(device: str = "cpu") -> list[str]:
    return backends_on(device)


def device_backend_params(*, fused_only: bool = False):
    """(device, backend) pairs for pytest.mark.parametrize("device,backend", ...)."""
    import pytest

    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in backends_on(d, fused_only=fused_only)]


def random_logits(shape, dtype=torch.float32, scale=3.0, generator=None, device="cpu") -> torch.Tensor:
    # Drawn on the CPU from the seeded generator, so every device sees the same values.
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def upstream(reduction: str, batch_shape, generator=None, device="cpu") -> torch.Tensor:
    """A gradient that is not 1: random weights per row for "none", a random scalar otherwise."""
    if reduction == "none":
        w = torch.rand(batch_shape, generator=generator, dtype=torch.float64) * 2 + 0.25
    else:
        w = torch.rand((), generator=generator, dtype=torch.float64) * 2 + 0.25
    return w.to(device)


def loss_and_grad(logits: torch.Tensor, call, weights):
    """Runs call(leaf) -> IntraDistillationOutput or tensor, backpropagates a weighted sum of every
    output (so gradients reach each term on its own), returns (outputs in float64, grad)."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = call(leaf)
    outs = tuple(out) if isinstance(out, tuple) else (out,)
    total = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    total.backward()
    return [o.detach().double() for o in outs], leaf.grad


@contextlib.contextmanager
def paper_formulas():
    """While active, backend "torch" computes the logits losses with reference.py (the paper's
    formulas, through autograd) instead of the kernels' algorithm in eager torch: the oracle the
    backends are compared with is independent of their algebra."""
    real_loss, real_rows = LogitsLoss.apply, RowTerms.apply

    def loss_apply(logits, target, active, coef, spec):
        if spec.backend != "torch" or spec.group:
            return real_loss(logits, target, active, coef, spec)
        rows = torch.stack(reference.loss_rows(logits, target, active, spec))
        return reduced_loss(spec, coef, *rows), rows, None, None, None

    def rows_apply(logits, rows, lse_stat, row_target, shard, spec):
        if lse_stat is None:  # the reference's rows, differentiable already
            return rows
        return real_rows(logits, rows, lse_stat, row_target, shard, spec)

    with mock.patch.object(LogitsLoss, "apply", loss_apply), mock.patch.object(RowTerms, "apply", rows_apply):
        yield


def reference_of(logits: torch.Tensor, call, weights):
    """The float64 reference on the same (possibly rounded) values: backend "torch" on float64,
    computed by the paper's formulas (paper_formulas)."""
    with paper_formulas():
        return loss_and_grad(logits.detach().double(), call, weights)


@contextlib.contextmanager
def eager_in_input_dtype():
    """The paper's formulas computed in the input's own dtype (they upcast 16-bit inputs to fp32
    otherwise): what a user's eager 16-bit loss gets, the yardstick of the 16-bit criterion."""
    with paper_formulas(), mock.patch.object(reference, "_compute_dtype", lambda dtype: dtype):
        yield


def eager_of(logits: torch.Tensor, call, weights):
    """Outputs and gradient of `call` run eagerly in the logits' dtype."""
    with eager_in_input_dtype():
        return loss_and_grad(logits, call, weights)


def assert_close_values(got, want, dtype, atol: float = 0.0):
    """Each value within TOLERANCES; `atol` raises the absolute part where the caller knows the
    values' rounding floor is larger (value_floor)."""
    tol = TOLERANCES[dtype]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol.value_rtol, atol=max(tol.value_atol, atol), equal_nan=True)


def value_floor(logits: torch.Tensor, target: torch.Tensor, alpha: float, reduction: str) -> float:
    """The absolute rounding floor of the loss values in fp32. The kernels form X and Jeffrey from
    d_k = t_k − t̄, numbers of the size of the logits' spread across passes, each rounded by up
    to 2^-24·|t|: a row whose terms cancel to 0 (V = 1, where every exact divergence is 0) keeps
    an error of that size, which no relative tolerance covers, and a sum adds the rows' errors.
    Measured on V = 1, K 2-5, every divergence and reduction, cpu and triton: up to 0.97 of
    2^-24 · spread · (1 + alpha) per row (Jeffrey, a multiple of X); the floor allows 4 times that."""
    finite = logits[torch.isfinite(logits)].double()
    spread = float(finite.max() - finite.min()) if finite.numel() else 0.0
    rows = int((target >= 0).sum()) if reduction == "sum" else 1
    return 2.0**-22 * spread * (1.0 + alpha) * rows


def assert_close_grads(got: torch.Tensor, want: torch.Tensor, dtype, eager: torch.Tensor | None = None):
    """`want` is the float64 gradient on the same input values. For 16-bit inputs with `eager`
    (the gradient of torch eager in that dtype) each element is also held to the criterion of
    TOLERANCES: no worse than eager plus about one unit in the last place."""
    assert got.dtype == dtype, f"gradient dtype {got.dtype}, expected {dtype}"
    assert got.shape == want.shape
    tol = TOLERANCES[dtype]
    scale = float(want.abs().max()) if want.numel() else 1.0
    atol = max(tol.grad_rel * max(scale, 0.01), tol.grad_atol)
    torch.testing.assert_close(got.double(), want, rtol=tol.grad_rel, atol=atol)
    if eager is not None and tol.eager_rtol is not None:
        assert_within_eager_error(got, want, eager, tol.eager_rtol, tol.eager_atol * max(scale, 1e-30))


def assert_within_eager_error(got: torch.Tensor, exact: torch.Tensor, eager: torch.Tensor, rtol: float, atol: float):
    """|got - exact| <= |eager - exact| + rtol * |exact| + atol, elementwise (cut-cross-entropy's
    criterion for 16-bit results); non-finite elements must agree with exact."""
    got, exact, eager = got.double(), exact.double(), eager.double()
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(got), finite), "non-finite elements differ from the float64 result"
    err = (got - exact).abs()[finite]
    bound = ((eager - exact).abs().nan_to_num(float("inf")) + rtol * exact.abs() + atol)[finite]
    bad = err > bound
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {err.numel()} elements beyond torch eager's error + tolerance; "
        f"worst excess {float((err - bound).max()):.3g} at |exact| {float(exact.abs()[finite][(err - bound).argmax()]):.3g}")


def parse_ptxas_verbose(text: str) -> list[dict]:
    """One {name, registers, spill_stores, spill_loads, stack} per function in `ptxas -v` output."""
    out = []
    for block in re.split(r"(?=Function properties for )", text)[1:]:
        name = block.split("Function properties for ", 1)[1].split()[0]
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        if spill and regs:
            out.append({"name": name, "registers": int(regs.group(1)), "stack": int(spill.group(1)),
                        "spill_stores": int(spill.group(2)), "spill_loads": int(spill.group(3))})
    return out


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for a process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
