"""Edge contracts of every backend: second derivatives, in-place gradients and leaves, the
gradient of a row whose loss is infinite, and the bounds the errors state."""

from __future__ import annotations

import pytest
import torch

import intradistill_kernels as idk
from helpers import all_backends, paper_formulas

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

K, N, V = 3, 5, 11


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(K, N, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (N,), generator=g)
    y[2] = -100
    return z, y


def _penalised_grad(z, call, reduction):
    """z.grad of loss + (d loss / dz)²: a gradient penalty, which needs second derivatives."""
    leaf = z.detach().clone().requires_grad_()
    out = call(leaf)
    weight = torch.linspace(0.5, 1.5, N, dtype=torch.float64).view(z.shape[1:-1]) if reduction == "none" else 1.3
    (g,) = torch.autograd.grad((out.loss * weight).sum(), leaf, create_graph=True)
    assert g.requires_grad, "the gradient is a constant: second derivatives were dropped"
    (out.loss.sum() + g.pow(2).sum()).backward()
    return leaf.grad


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("divergence", ["x", "js"])
def test_gradient_penalty_matches_the_reference(backend, reduction, divergence):
    z, y = _problem()
    opts = dict(divergence=divergence, reduction=reduction, label_smoothing=0.1, softcap=5.0, z_loss=0.01)
    dtype = torch.float64 if backend == "torch" else torch.float32
    got = _penalised_grad(z.to(dtype), lambda t: idk.intra_distillation_loss(t, y, 0.7, backend=backend, **opts),
                          reduction)
    with paper_formulas():
        want = _penalised_grad(z, lambda t: idk.intra_distillation_loss(t, y, 0.7, backend="torch", **opts), reduction)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", all_backends())
def test_fused_linear_gradient_penalty_matches_the_unfused_one(backend):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(K, N, 8, generator=g, dtype=torch.float64)
    w = torch.randn(V, 8, generator=g, dtype=torch.float64) / 3
    _, y = _problem()

    def penalised(call):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = call(hh, ww)
        gh, gw = torch.autograd.grad(out.loss, (hh, ww), create_graph=True)
        (out.loss + gh.pow(2).sum() + gw.pow(2).sum()).backward()
        return hh.grad, ww.grad

    dtype = torch.float64 if backend == "torch" else torch.float32
    got = penalised(lambda hh, ww: idk.fused_linear_intra_distillation_loss(hh.to(dtype), ww.to(dtype), y, None, 0.7,
                                                                           backend=backend, label_smoothing=0.1))
    with paper_formulas():
        want = penalised(lambda hh, ww: idk.intra_distillation_loss(hh @ ww.T, y, 0.7, backend="torch",
                                                                    label_smoothing=0.1))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", all_backends())
def test_in_place_gradient_cannot_be_differentiated_again(backend):
    z, y = _problem()
    logits = (z.float() * 1).requires_grad_()
    work = logits * 1.0  # a non-leaf: inplace_grad writes over it
    out = idk.intra_distillation_loss(work, y, backend=backend, inplace_grad=True)
    with pytest.raises(RuntimeError, match="inplace_grad=True overwrites the logits"):
        torch.autograd.grad(out.loss, logits, create_graph=True)


@pytest.mark.parametrize("backend", all_backends())
def test_in_place_gradient_refused_on_a_leaf(backend):
    z, y = _problem()
    leaf = z.float().requires_grad_()
    with pytest.raises(ValueError, match="inplace_grad=True.*leaf"):
        idk.intra_distillation_loss(leaf, y, backend=backend, inplace_grad=True)
    with pytest.raises(ValueError, match="inplace_grad=True.*leaf"):
        idk.x_divergence(torch.nn.Parameter(z.float()), backend=backend, inplace_grad=True)
    # accepted on a non-leaf, with the same gradient as without it
    grads = []
    for inplace in (False, True):
        base = z.float().requires_grad_()
        idk.intra_distillation_loss(base * 1.0, y, backend=backend, inplace_grad=inplace).loss.backward()
        grads.append(base.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_gradient_of_an_infinite_row_is_the_same_on_every_backend(backend, softcap):
    """A class at -inf in every pass with label smoothing: the row's loss is +inf. Its gradient is
    the formula's, elementwise finite: at the -inf entries -w·ε/(K·V)·logit_scale without softcap
    (the smoothing term is linear in the logit), 0 with softcap (dt/dz → 0 as z → -inf)."""
    z, y = _problem(3)
    z[:, 0, 4] = float("-inf")
    y[0] = 1
    eps, scale = 0.1, 0.8
    call = (lambda b, t: idk.intra_distillation_loss(t, y, 0.7, backend=b, label_smoothing=eps, softcap=softcap,
                                                     logit_scale=scale, reduction="sum"))
    leaf = z.float().requires_grad_()
    out = call(backend, leaf)
    out.loss.backward()
    assert out.loss.item() == float("inf")
    assert torch.isfinite(leaf.grad).all()
    at_inf = leaf.grad[:, 0, 4]
    want_at_inf = torch.zeros(K) if softcap else torch.full((K,), -eps / (K * V) * scale)
    torch.testing.assert_close(at_inf, want_at_inf, rtol=1e-5, atol=1e-8)
    ref = z.clone().requires_grad_()
    with paper_formulas():
        call("torch", ref).loss.backward()
    torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,value,bound", [
    ("softcap", -1.0, r"softcap must be finite and > 0 \(None turns it off\), got -1.0"),
    ("softcap", 0.0, r"softcap must be finite and > 0"),
    ("logit_scale", -1.0, r"logit_scale must be finite and > 0, got -1.0"),
    ("logit_scale", 0.0, r"logit_scale must be finite and > 0, got 0.0"),
    ("label_smoothing", 1.5, r"label_smoothing must be in \[0, 1\], got 1.5"),
    ("z_loss", float("nan"), r"z_loss must be finite and >= 0, got nan"),
])
def test_range_errors_state_the_real_bound(name, value, bound):
    z, y = _problem()
    with pytest.raises(ValueError, match=bound):
        idk.intra_distillation_loss(z.float(), y, **{name: value})
