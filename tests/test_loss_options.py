"""The LLM options (softcap, logit_scale, z_loss) and the one-pass path through the public API, on
every backend, against the float64 reference computed independently here with plain torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import intradistill_kernels as idk
from helpers import all_backends, assert_close_grads, assert_close_values, random_logits

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = all_backends()


def _independent_reference(z, y, alpha, *, divergence, label_smoothing, ignore_index, softcap, logit_scale, z_loss,
                           classes=None):
    """loss, ce, div (means over kept rows) written from the definitions, float64. Classes past
    `classes` are vocabulary padding at -inf: they carry no probability and are left out."""
    t = z.double()[..., :classes] * logit_scale
    if softcap:
        t = torch.where(t == float("-inf"), t, softcap * torch.tanh(t / softcap))
    keep = y != ignore_index
    t = t[:, keep]
    k = t.shape[0]
    logp = torch.log_softmax(t, -1)
    p = logp.exp()
    ce = torch.stack([F.cross_entropy(t[i], y[keep], label_smoothing=label_smoothing, reduction="none") for i in range(k)]).mean(0)
    pbar = p.mean(0)
    logpbar = torch.log(pbar)
    kl_k_bar = torch.where(p > 0, p * (logp - logpbar), 0.0).sum(-1)
    kl_bar_k = torch.where(pbar > 0, pbar * (logpbar - logp), 0.0).sum(-1)
    if divergence == "x":
        div = (kl_k_bar + kl_bar_k).mean(0)
    elif divergence == "js":
        div = kl_k_bar.mean(0)
    else:
        div = (kl_k_bar + kl_bar_k).mean(0) * k / (k - 1)
    zsq = torch.logsumexp(t, -1).square().mean(0)
    n = max(int(keep.sum()), 1)
    ce, div, zsq = ce.sum() / n, div.sum() / n, zsq.sum() / n
    return ce + alpha * div + z_loss * zsq, ce, div


CASES = [
    dict(softcap=None, logit_scale=1.0, z_loss=0.0),
    dict(softcap=5.0, logit_scale=1.0, z_loss=0.0),
    dict(softcap=None, logit_scale=0.7, z_loss=0.0),
    dict(softcap=None, logit_scale=1.0, z_loss=0.05),
    dict(softcap=4.0, logit_scale=1.3, z_loss=0.02),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["x", "js", "jeffrey"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_options_match_independent_reference(backend, divergence, case):
    opts = CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    z = random_logits((3, 7, 37), scale=4.0, generator=gen)
    z[..., 35:] = float("-inf")  # vocabulary padding
    y = torch.randint(0, 35, (7,), generator=gen)
    y[3] = -100
    leaf = z.clone().requires_grad_()
    out = idk.intra_distillation_loss(leaf, y, 0.6, divergence=divergence, label_smoothing=0.0, backend=backend, **opts)
    out.loss.mul(1.7).backward()  # only the loss: the one-pass path on the fused backends
    ref = z.double().requires_grad_()
    want = _independent_reference(ref, y, 0.6, divergence=divergence, label_smoothing=0.0, ignore_index=-100,
                                  classes=35, **opts)
    want[0].mul(1.7).backward()
    assert_close_values([o.double() for o in out], [w.detach() for w in want], torch.float32)
    assert_close_grads(leaf.grad, ref.grad, torch.float32)
    if opts["z_loss"]:
        torch.testing.assert_close(out.z_loss.double(), want[0].detach() - want[1].detach() - 0.6 * want[2].detach(),
                                   rtol=1e-5, atol=1e-6)
    else:
        assert out.z_loss is None
    loss, ce, div = out  # still unpacks as three
    assert loss is out.loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_terms", [False, True])
def test_one_pass_and_exact_paths_match_reference(backend, dtype, reduction, use_terms):
    """use_terms=False differentiates only `loss` (the one-pass path for mean/sum); True also uses
    ce and divergence (the exact backward must run, with the right per-row weights)."""
    gen = torch.Generator().manual_seed(7)
    z = random_logits((4, 2, 5, 203), dtype=dtype, generator=gen)
    y = torch.randint(0, 203, (2, 5), generator=gen)
    y[1, 2] = -100
    opts = dict(softcap=6.0, logit_scale=0.9, z_loss=0.03, label_smoothing=0.1)

    def run(zz, b):
        leaf = zz.detach().clone().requires_grad_()
        out = idk.intra_distillation_loss(leaf, y, 0.8, reduction=reduction, backend=b, **opts)
        w = torch.linspace(0.5, 1.5, out.loss.numel(), dtype=torch.float64).reshape(out.loss.shape)
        total = (out.loss.double() * w).sum() * 1.3
        if use_terms:
            total = total + 0.4 * out.ce.double().sum() - 0.2 * out.divergence.double().sum()
        total.backward()
        return [o.detach().double() for o in out], leaf.grad

    got, grad = run(z, backend)
    want, want_grad = run(z.double(), "torch")
    assert_close_values(got, want, dtype)
    assert_close_grads(grad, want_grad, dtype)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_one_pass_in_place_gradient(backend):
    gen = torch.Generator().manual_seed(9)
    z = random_logits((3, 6, 150), generator=gen)
    y = torch.randint(0, 150, (6,), generator=gen)
    leaf = z.clone().requires_grad_()
    buf = leaf * 1.0  # a non-leaf the loss may overwrite
    out = idk.intra_distillation_loss(buf, y, 0.5, backend=backend, inplace_grad=True, softcap=8.0, z_loss=0.01)
    out.loss.mul(0.8).backward()
    ref = z.double().requires_grad_()
    idk.intra_distillation_loss(ref, y, 0.5, backend="torch", softcap=8.0, z_loss=0.01).loss.mul(0.8).backward()
    assert_close_grads(leaf.grad, ref.grad, torch.float32)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_in_place_one_pass_refuses_per_row_gradients(backend):
    z, y = random_logits((2, 4, 30)), torch.randint(0, 30, (4,))
    buf = z.clone().requires_grad_() * 1.0
    out = idk.intra_distillation_loss(buf, y, backend=backend, inplace_grad=True)
    with pytest.raises(RuntimeError, match="inplace_grad"):
        (out.loss + out.ce).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_options_match_unfused(backend):
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(3, 8, 16, generator=gen)
    w = torch.randn(97, 16, generator=gen) / 4
    b = torch.randn(97, generator=gen) * 0.1
    y = torch.randint(0, 97, (8,), generator=gen)
    y[0] = -100
    opts = dict(softcap=3.0, logit_scale=1.2, z_loss=0.04, label_smoothing=0.1, divergence="js")
    grads = []
    for fused in (True, False):
        hh, ww, bb = (t.clone().double().requires_grad_() for t in (h, w, b))
        if fused:
            out = idk.fused_linear_intra_distillation_loss(hh.float(), ww.float(), y, bb.float(), 0.7, backend=backend,
                                                           chunk_size=3, **opts)
        else:
            out = idk.intra_distillation_loss(hh @ ww.T + bb, y, 0.7, backend="torch", **opts)
        out.loss.mul(1.1).backward()
        grads.append(([o.detach().double() for o in out], hh.grad, ww.grad, bb.grad, out.z_loss))
    (got, *g), (want, *wg) = grads
    assert_close_values(got, want, torch.float32)
    for a, c in zip(g[:3], wg[:3]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g[3].double(), wg[3], rtol=1e-5, atol=1e-7)
