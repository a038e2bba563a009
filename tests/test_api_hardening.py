"""Regression tests for inputs that used to crash or silently mislead at the public API:
dynamic shapes under torch.compile, tensor-valued options, stride-0 in-place gradients,
ignored rows in the vocabulary-parallel loss, fused-linear alpha gradients and no_grad, argument
errors that name the argument, and host reads that would synchronise an accelerator."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import intradistill_kernels as idk
from intradistill_kernels import _core
from intradistill_kernels.ops import checks
from bad_arguments import BAD_ARGUMENTS
from helpers import all_backends, fused_backends, random_logits

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = all_backends()
FUSED = fused_backends()


def _problem(k=3, n=5, v=11, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return random_logits((k, n, v), dtype=dtype, generator=gen), torch.randint(0, v, (n,), generator=gen)


# --------------------------------------------------------------------------- dynamic shapes

@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_dynamic_shapes_k_n_v_change(backend):
    """dynamic=True used to fail: the backend choice took a symbolic K. K, N and V all change."""
    torch._dynamo.reset()

    def step(z, y):
        return idk.intra_distillation_loss(z, y, 0.3, label_smoothing=0.1, backend=backend).loss

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for seed, (k, n, v) in enumerate([(2, 4, 7), (3, 6, 13), (4, 5, 9), (3, 8, 20)]):
        z, y = _problem(k, n, v, seed)
        leaf = z.clone().requires_grad_()
        got = compiled(leaf, y)
        got.backward()
        ref = z.double().requires_grad_()
        want = idk.intra_distillation_loss(ref, y, 0.3, label_smoothing=0.1, backend="torch").loss
        want.backward()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_recompiles_when_k_changes(backend):
    torch._dynamo.reset()
    compiled = torch.compile(lambda z: idk.x_divergence(z, backend=backend), fullgraph=True, backend="aot_eager")
    for k in (2, 3, 5):
        z, _ = _problem(k, 4, 6, k)
        torch.testing.assert_close(compiled(z).double(), idk.x_divergence(z.double(), backend="torch"), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- in-place gradient on expanded views

@pytest.mark.parametrize("backend", FUSED)
def test_inplace_grad_on_expanded_logits_is_exact(backend):
    """A stride-0 view shares memory between elements; writing the gradient over it was wrong."""
    z, y = _problem(3, 1, 12, 5)
    base = z[:, :1].clone().requires_grad_()
    expanded = base.expand(3, 4, 12)  # four rows that are one row in memory
    target = torch.tensor([1, 4, 7, 11])
    out = idk.intra_distillation_loss(expanded, target, 0.9, backend=backend, inplace_grad=True)
    out.loss.mul(1.3).backward()
    ref = z[:, :1].double().requires_grad_()
    idk.intra_distillation_loss(ref.expand(3, 4, 12), target, 0.9, backend="torch").loss.mul(1.3).backward()
    torch.testing.assert_close(base.grad.double(), ref.grad, rtol=2e-5, atol=1e-6)


def test_may_write_in_place():
    t = torch.empty(3, 4, 5)
    assert _core.may_write_in_place(t)
    assert _core.may_write_in_place(t[:, ::2, 1:4])
    assert _core.may_write_in_place(t.transpose(0, 2))
    assert not _core.may_write_in_place(t[:, :1].expand(3, 4, 5))
    assert not _core.may_write_in_place(torch.empty(6).as_strided((3, 4), (1, 1)))


# --------------------------------------------------------------------------- tensor-valued options

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,value", [("alpha", -0.5), ("alpha", float("nan")), ("alpha", float("inf")),
                                        ("label_smoothing", 1.5), ("label_smoothing", -0.1)])
def test_tensor_options_are_range_checked(backend, name, value):
    z, y = _problem()
    kwargs = {name: torch.tensor(value)}
    with pytest.raises(ValueError, match=name):
        idk.intra_distillation_loss(z, y, backend=backend, **kwargs)


def test_tensor_options_checked_in_fused_linear_and_vocab_parallel_alike():
    h, w, y = torch.randn(2, 4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="label_smoothing"):
        idk.fused_linear_intra_distillation_loss(h, w, y, label_smoothing=torch.tensor(2.0))
    with pytest.raises(ValueError, match="alpha"):
        idk.fused_linear_intra_distillation_loss(h, w, y, alpha=torch.tensor(float("nan")))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_element_alpha_keeps_none_shape(backend):
    """A [1, 1] alpha tensor used to broadcast a reduction="none" result to [1, 1, N]."""
    z, y = _problem()
    out = idk.intra_distillation_loss(z, y, torch.tensor([[0.4]]), reduction="none", backend=backend)
    assert out.loss.shape == y.shape
    torch.testing.assert_close(out.loss, out.ce + 0.4 * out.divergence)


# --------------------------------------------------------------------------- fused linear: alpha gradient, no_grad

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_terms", [False, True])
def test_fused_linear_alpha_tensor_gets_its_gradient(backend, use_terms):
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(3, 6, 8, generator=gen, requires_grad=True)
    w = torch.randn(13, 8, generator=gen, requires_grad=True)
    y = torch.randint(0, 13, (6,), generator=gen)
    y[2] = -100
    grads = []
    for fn in ("fused", "unfused"):
        alpha = torch.tensor(0.7, requires_grad=True)
        hh, ww = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        if fn == "fused":
            out = idk.fused_linear_intra_distillation_loss(hh.float(), ww.float(), y, alpha=alpha, backend=backend)
        else:
            out = idk.intra_distillation_loss(hh @ ww.T, y, alpha.double(), backend="torch")
        total = out.loss * 1.9 + (0.3 * out.ce + 0.2 * out.divergence if use_terms else 0)
        total.backward()
        grads.append((alpha.grad, hh.grad, ww.grad))
    (ga, gh, gw), (wa, wh, ww_) = grads
    assert ga is not None, "alpha.grad stayed None"
    torch.testing.assert_close(ga.double(), wa.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, wh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, ww_, rtol=1e-4, atol=1e-6)


def test_fused_linear_under_no_grad_computes_no_gradient(monkeypatch):
    from intradistill_kernels.ops import linear_loss as fused_linear

    calls = []
    real = fused_linear.chunked_pass
    monkeypatch.setattr(fused_linear, "chunked_pass", lambda *a, **kw: calls.append(a[5] is not None) or real(*a, **kw))
    h, w = torch.randn(3, 4, 8), torch.randn(10, 8, requires_grad=True)
    with torch.no_grad():
        out = idk.fused_linear_intra_distillation_loss(h, w, torch.randint(0, 10, (4,)))
    assert calls == [False], "gradients were computed under torch.no_grad()"
    assert out.loss.grad_fn is None


def test_fused_linear_frozen_weight_skips_its_gradient(monkeypatch):
    """A frozen lm_head (LoRA elsewhere) needs no [V, H] weight-gradient GEMM."""
    from intradistill_kernels.ops import linear_loss as fused_linear

    needs = []
    real = fused_linear.chunked_pass
    monkeypatch.setattr(fused_linear, "chunked_pass", lambda *a, **kw: needs.append(a[6] if len(a) > 6 else kw.get("needs")) or real(*a, **kw))
    h = torch.randn(3, 4, 8, requires_grad=True)
    out = idk.fused_linear_intra_distillation_loss(h, torch.randn(10, 8), torch.randint(0, 10, (4,)))
    out.loss.backward()
    assert needs and tuple(needs[0]) == (True, False, False)


# --------------------------------------------------------------------------- argument errors name the argument

BAD_CASES = [pytest.param(name, backend, id=f"{name}-{backend}" if bad.per_backend else name)
             for name, bad in BAD_ARGUMENTS.items() for backend in (BACKENDS if bad.per_backend else ["auto"])]


@pytest.mark.parametrize("name,backend", BAD_CASES)
def test_bad_arguments_raise_naming_the_argument(name, backend):
    bad = BAD_ARGUMENTS[name]
    with pytest.raises(bad.error, match=bad.match):
        bad.call(backend)


# --------------------------------------------------------------------------- no host reads on accelerators

class _HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's value on the host (on a GPU: a stream synchronisation)."""
    READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "allclose", "item"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused_linear", [False, True])
@pytest.mark.parametrize("use_terms", [False, True])
def test_no_host_reads_where_they_would_synchronise(monkeypatch, backend, fused_linear, use_terms):
    """The loss's forward and backward take the accelerator path here (host reads declared not
    free) and must then never read a tensor's value: the old target check (bool()) and the
    fused-linear backward's allclose would be recorded."""
    monkeypatch.setattr(checks, "host_reads_are_free", lambda device: False)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(3, 6, 8, generator=gen, requires_grad=True)
    w = torch.randn(13, 8, generator=gen, requires_grad=True)
    y = torch.randint(0, 13, (6,), generator=gen)
    y[1] = -100
    alpha = torch.tensor(0.6)
    with _HostReads() as mode:
        if fused_linear:
            out = idk.fused_linear_intra_distillation_loss(h, w, y, alpha=alpha, backend=backend, label_smoothing=0.1)
        else:
            out = idk.intra_distillation_loss(h @ w.T, y, alpha, backend=backend, label_smoothing=0.1)
        total = out.loss * 1.5 + (0.5 * out.ce if use_terms else 0)
        total.backward()
    assert mode.seen == [], f"host reads in the loss: {mode.seen}"
    # and the result is still right
    ref_h, ref_w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = idk.intra_distillation_loss(ref_h @ ref_w.T, y, 0.6, backend="torch", label_smoothing=0.1)
    (ref.loss * 1.5 + (0.5 * ref.ce if use_terms else 0)).backward()
    torch.testing.assert_close(h.grad.double(), ref_h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), ref_w.grad, rtol=1e-4, atol=1e-6)


def test_bad_target_is_caught_on_the_device_path(monkeypatch):
    monkeypatch.setattr(checks, "host_reads_are_free", lambda device: False)
    z, y = _problem()
    with pytest.raises(RuntimeError, match="target values"):
        idk.intra_distillation_loss(z, y + 100)


# --------------------------------------------------------------------------- fallback warning

def test_auto_fallback_warns_once_with_the_reason(monkeypatch):
    from intradistill_kernels import ops

    from intradistill_kernels.ops import registry

    monkeypatch.setattr(_core, "_warned", set())
    monkeypatch.setattr(registry, "available", lambda name: name == "torch")
    monkeypatch.setattr(registry, "unavailable_reason", lambda name: None if name == "torch" else f"{name} broke: no compiler")
    z, y = _problem()
    with pytest.warns(RuntimeWarning, match="cpu broke: no compiler"):
        idk.intra_distillation_loss(z, y)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idk.intra_distillation_loss(z, y)  # once per process
    assert ops.unavailable_reason("torch") is None


# --------------------------------------------------------------------------- vocabulary-parallel ignored rows

@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [1e30, float("nan")])
def test_vocab_parallel_ignored_rows_get_zero_gradient(one_rank_group, backend, bad):
    """Ignored rows holding huge or NaN logits used to get NaN gradients."""
    from intradistill_kernels.distributed import vocab_parallel_intra_distillation_loss

    z, y = _problem(3, 5, 9, 11)
    z[:, 2] = bad
    y[2] = -100
    leaf = z.clone().requires_grad_()
    out = vocab_parallel_intra_distillation_loss(leaf, y, 0.5, label_smoothing=0.1, backend=backend)
    out.loss.mul(1.4).backward()
    assert torch.isfinite(out.loss)
    assert torch.equal(leaf.grad[:, 2], torch.zeros_like(leaf.grad[:, 2]))
    keep = [0, 1, 3, 4]
    ref = z[:, keep].double().requires_grad_()
    want = idk.intra_distillation_loss(ref, y[keep], 0.5, label_smoothing=0.1, backend="torch")
    want.loss.mul(1.4).backward()
    torch.testing.assert_close(out.loss.double(), want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad[:, keep].double(), ref.grad, rtol=2e-5, atol=1e-6)


def test_vocab_parallel_group_must_be_a_group(one_rank_group):
    from intradistill_kernels.distributed import vocab_parallel_intra_distillation_loss

    z, y = _problem()
    with pytest.raises(TypeError, match="group"):
        vocab_parallel_intra_distillation_loss(z, y, group="tp")
