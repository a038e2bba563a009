"""fused_linear_intra_distillation_loss against the unfused float64 reference."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import intradistill_kernels as idk
from helpers import all_backends

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

K, B, T, H, V = 3, 2, 5, 16, 97


def _problem(dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(K, B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    target = torch.randint(0, V, (B, T), generator=g)
    target[0, 1] = target[1, 4] = -100
    return hidden, weight, b, target


def _run(fn, hidden, weight, bias, target, weights, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = fn(h, w, target, b, **kw)
    sum((o.double() * wt).sum() for o, wt in zip(out, weights)).backward()
    return out, (h.grad, w.grad, None if b is None else b.grad)


def _unfused(h, w, target, b, alpha=0.8, chunk_size=None, backend="torch", **kw):
    logits = h @ w.T + (0 if b is None else b)
    return idk.intra_distillation_loss(logits, target, alpha, backend="torch", **kw)


def _fused(backend, chunk_size):
    def fn(h, w, target, b, alpha=0.8, **kw):
        return idk.fused_linear_intra_distillation_loss(h, w, target, b, alpha, backend=backend, chunk_size=chunk_size, **kw)
    return fn


def _compare(got, want, dtype):
    (gout, ggrads), (wout, wgrads) = got, want
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(gout, wout):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=rtol * 0.1)
    for a, b in zip(ggrads, wgrads):
        if b is None:
            assert a is None
            continue
        scale = float(b.abs().max())
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol * 5, atol=rtol * 5 * scale)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 100])
@pytest.mark.parametrize("divergence", ["x", "js", "jeffrey"])
def test_matches_unfused(backend, chunk_size, divergence):
    hidden, weight, bias, target = _problem(seed=chunk_size)
    weights = [1.3, 0.4, 0.7]  # gradient flows into loss, ce and divergence separately
    kw = dict(divergence=divergence, label_smoothing=0.1)
    got = _run(_fused(backend, chunk_size), hidden, weight, bias, target, weights, **kw)
    want = _run(_unfused, hidden.double(), weight.double(), bias.double(), target, weights, **kw)
    _compare(got, want, torch.float32)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_loss_only_gradient(backend, reduction):
    hidden, weight, bias, target = _problem(seed=5, bias=False)
    g = torch.Generator().manual_seed(1)
    upstream = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5 if reduction == "none" else 1.7
    weights = [upstream, 0.0, 0.0]  # the common case: only the loss is differentiated
    got = _run(_fused(backend, 4), hidden, weight, None, target, weights, reduction=reduction)
    want = _run(_unfused, hidden.double(), weight.double(), None, target, weights, reduction=reduction)
    _compare(got, want, torch.float32)


@pytest.mark.parametrize("backend", all_backends())
def test_bf16_inputs(backend):
    hidden, weight, bias, target = _problem(torch.bfloat16, seed=2)
    weights = [1.0, 0.0, 0.0]
    got = _run(_fused(backend, 5), hidden, weight, bias, target, weights, label_smoothing=0.1)
    want = _run(_unfused, hidden.double(), weight.double(), bias.double(), target, weights, label_smoothing=0.1)
    (gout, ggrads), (wout, wgrads) = got, want
    torch.testing.assert_close(gout.loss.double(), wout.loss, rtol=1e-3, atol=1e-4)  # fp32 logits: no bf16 rounding
    assert ggrads[0].dtype == torch.bfloat16 and ggrads[1].dtype == torch.bfloat16
    for a, b in zip(ggrads, wgrads):
        torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", all_backends())
def test_never_allocates_full_logits(backend):
    g = torch.Generator().manual_seed(3)
    n = 48
    hidden = torch.randn(K, n, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    target = torch.randint(0, V, (n,), generator=g)
    with _LargestAllocation() as mode:
        out = idk.fused_linear_intra_distillation_loss(hidden, weight, target, backend=backend, chunk_size=2)
        out.loss.backward()
    full = K * n * V
    # The largest tensors are the weight-sized ones and a few chunks of logits, never [K, N, V].
    assert 0 < mode.largest <= max(V * H, 8 * K * 2 * V) < full, (mode.largest, full)


def test_module_and_errors():
    hidden, weight, bias, target = _problem(seed=4)
    module = idk.FusedLinearIntraDistillationLoss(0.5, label_smoothing=0.1, chunk_size=3)
    torch.testing.assert_close(module(hidden, weight, target, bias).loss,
                               idk.fused_linear_intra_distillation_loss(hidden, weight, target, bias, 0.5, label_smoothing=0.1).loss)
    with pytest.raises(ValueError, match="weight"):
        idk.fused_linear_intra_distillation_loss(hidden, weight[:, :-1], target)
    with pytest.raises(ValueError, match="bias"):
        idk.fused_linear_intra_distillation_loss(hidden, weight, target, bias[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        idk.fused_linear_intra_distillation_loss(hidden, weight, target, chunk_size=0)
    with pytest.raises(ValueError, match="target"):
        idk.fused_linear_intra_distillation_loss(hidden, weight, target + V)
    all_ignored = torch.full_like(target, -100)
    out = idk.fused_linear_intra_distillation_loss(hidden.requires_grad_(), weight, all_ignored)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0
