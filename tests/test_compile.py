"""torch.compile(fullgraph=True) of the losses: the same values and gradients as eager, with no
graph break (fullgraph fails on one), static and dynamic shapes, and no [K, N, V] logits in the
fused-linear loss's compiled graphs."""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import intradistill_kernels as idk
from intradistill_kernels.ops import linear_loss
from helpers import all_backends

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

K, N, H, V = 3, 10, 16, 53
OPTIONS = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.1),
    "softcap-z": dict(softcap=4.0, z_loss=0.01),
    "jeffrey-scale": dict(divergence="jeffrey", logit_scale=0.7),
    "js-all": dict(divergence="js", label_smoothing=0.05, softcap=6.0, z_loss=0.02, logit_scale=1.3),
}


def _problem(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(K, n, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    bias = torch.randn(V, generator=g) * 0.1
    target = torch.randint(0, V, (n,), generator=g)
    target[1] = target[n - 2] = -100  # ignored rows: the case a peer's compiled loss got wrong
    return hidden, weight, bias, target


def _step(fn, hidden, weight, bias, target, exact: bool):
    """loss (and, for the exact path, ce in another expression) differentiated by a factor != 1."""
    h, w, b = (x.detach().clone().requires_grad_() for x in (hidden, weight, bias))
    out = fn(h, w, b, target)
    total = out.loss * 1.7 + (0.3 * out.ce if exact else 0)
    total.backward()
    return out.loss.detach(), out.ce.detach(), h.grad, w.grad, b.grad


def _assert_same(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _compile_cases():
    """Every option static on the cpu and torch backends, dynamic shapes for the plain and
    all-options cases; Triton (the interpreter is slow) static, plain and all options."""
    cases = []
    for backend in all_backends():
        for name in OPTIONS:
            for dynamic in (False, True):
                if (backend == "triton" or dynamic) and name not in ("plain", "js-all"):
                    continue
                if backend == "triton" and dynamic:
                    continue
                cases.append(pytest.param(backend, name, dynamic, id=f"{backend}-{name}-{'dynamic' if dynamic else 'static'}"))
    return cases


@pytest.mark.parametrize("backend,name,dynamic", _compile_cases())
@pytest.mark.parametrize("exact", [False, True], ids=["one-pass", "exact"])
def test_fused_linear_compiles_fullgraph(backend, name, dynamic, exact):
    torch._dynamo.reset()

    def fn(h, w, b, y):
        return idk.fused_linear_intra_distillation_loss(h, w, y, b, 0.8, backend=backend, chunk_size=4,
                                                        **OPTIONS[name])

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for seed, n in enumerate((N, N + 3) if dynamic else (N,)):
        problem = _problem(seed, n)
        _assert_same(_step(compiled, *problem, exact), _step(fn, *problem, exact))


def _recording_backend(sizes: list[int]):
    """aot_eager that records the element count of every tensor in the forward and backward graphs."""
    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            vals = node.meta.get("val")
            for v in vals if isinstance(vals, (tuple, list)) else (vals,):
                if isinstance(v, torch.Tensor):
                    sizes.append(v.numel())
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


@pytest.mark.parametrize("exact", [False, True], ids=["one-pass", "exact"])
def test_compiled_fused_linear_never_builds_the_logits(monkeypatch, exact):
    """Neither the compiled graphs nor the op's chunks hold [K, N, V] logits."""
    torch._dynamo.reset()
    n, chunk = 40, 4
    chunks = []
    real = linear_loss._logits_f32
    monkeypatch.setattr(linear_loss, "_logits_f32", lambda h, w, b: chunks.append(h.shape[1]) or real(h, w, b))
    sizes: list[int] = []

    def fn(h, w, b, y):
        return idk.fused_linear_intra_distillation_loss(h, w, y, b, 0.8, chunk_size=chunk, label_smoothing=0.1)

    compiled = torch.compile(fn, fullgraph=True, backend=_recording_backend(sizes))
    _step(compiled, *_problem(5, n), exact)
    assert sizes and chunks and max(chunks) <= chunk
    assert max(sizes) < K * n * V, (max(sizes), K * n * V)


@pytest.mark.parametrize("backend", all_backends())
def test_logits_loss_errors_name_the_value_when_compiled(backend):
    """A target out of range raises the same ValueError, naming the value, compiled or not (the
    check runs inside the op, where the CPU value can be read); so does a tensor alpha."""
    torch._dynamo.reset()
    z = torch.randn(2, 4, 7)
    bad = torch.tensor([1, 2, 9, -100])
    for fn in (lambda z, y: idk.intra_distillation_loss(z, y, backend=backend).loss,
               torch.compile(lambda z, y: idk.intra_distillation_loss(z, y, backend=backend).loss, fullgraph=True,
                             backend="aot_eager")):
        with pytest.raises(ValueError, match=r"target values must lie in \[0, 7\) or equal ignore_index=-100; found 9"):
            fn(z, bad)
    for fn in (lambda z, a: idk.intra_distillation_loss(z, bad.clamp(0, 6), a, backend=backend).loss,
               torch.compile(lambda z, a: idk.intra_distillation_loss(z, bad.clamp(0, 6), a, backend=backend).loss,
                             fullgraph=True, backend="aot_eager")):
        with pytest.raises(ValueError, match=r"alpha must be finite and >= 0, got -0.5"):
            fn(z, torch.tensor(-0.5))
