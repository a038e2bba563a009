"""The backend interface of ops/backend.py, tested on each fused backend directly.

Every backend's forward(logits, target, cfg, early) and backward(logits, target, lse, stat,
weights, cfg, grad) are compared with float64 autograd of the formulas themselves: transform the
logits (t = softcap·tanh(logit_scale·z / softcap), -inf kept), then mean cross-entropy, X or JS,
and (1/K) Σ_k lse_k², weighted per row by random RowWeights. The one-pass forward (early) must
return the same statistics and write the gradient the exact backward writes, into a separate
buffer or over the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from expected_backends import require, why_absent
from helpers import TOLERANCES, assert_close_grads
from intradistill_kernels import reference
from intradistill_kernels.ops import eager, registry
from intradistill_kernels.ops.backend import EarlyGrad, RowWeights
from intradistill_kernels.ops.spec import LossSpec

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the Triton interpreter

CONTRACT_BACKENDS = list(registry.NAMES)  # cuda: CUDA tensors, skipped without a GPU
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The C++ CPU one-pass forward keeps exp(t − σ) from its statistics sweep (σ: the running max) and
# rescales it, where its exact backward recomputes exp(t − lse): the same gradient to fp32
# rounding, within this many units of 2^-24 of the largest element rather than bit for bit.
ONE_PASS_FP32_ULPS = {"cpu": 8}


@pytest.mark.parametrize("name", ["triton", "cpu"])
def test_backend_is_available_where_it_can_be_built(name):
    """A C++ build that fails where a compiler exists fails the suite here (and in every contract
    test below) rather than quietly dropping the backend from the tests."""
    why = why_absent(name)
    if why is not None:
        pytest.skip(why)
    assert registry.available(name), f"backend {name} unavailable: {registry.unavailable_reason(name)}"


def _backend(name: str):
    require(name)
    device = "cuda" if torch.cuda.is_available() and name in ("triton", "cuda") else "cpu"
    return registry.get(name), device


@dataclass(frozen=True)
class Case:
    k: int
    v: int
    js: bool = False
    smoothing: float = 0.0
    has_ce: bool = True
    logit_scale: float = 1.0
    softcap: float = 0.0
    z: bool = False
    pad: int = 0  # classes at -inf in every pass (vocabulary padding)

    def cfg(self, backend: str) -> LossSpec:
        return LossSpec(backend, divergence="js" if self.js else "x", label_smoothing=self.smoothing,
                        has_ce=self.has_ce, logit_scale=self.logit_scale, softcap=self.softcap)

    def __str__(self):
        opts = [f"K{self.k}", f"V{self.v}", "js" if self.js else "x"]
        opts += [f"ls{self.smoothing}"] * (self.smoothing > 0) + ["noce"] * (not self.has_ce)
        opts += [f"scale{self.logit_scale}"] * (self.logit_scale != 1) + [f"cap{self.softcap}"] * (self.softcap > 0)
        opts += ["z"] * self.z + [f"pad{self.pad}"] * (self.pad > 0)
        return "-".join(opts)


# K in {2, 3, 5, 8}, V in {1, 17, 1000, 4099}; each option on and off, in both divergences.
# (Label smoothing with -inf padding makes the cross-entropy +inf: that pair is left out.)
CASES = [
    Case(2, 17),
    Case(3, 1000, logit_scale=0.7, z=True),
    Case(3, 1000, js=True, softcap=5.0, z=True),
    Case(5, 17, smoothing=0.1, logit_scale=0.7, softcap=5.0, z=True),
    Case(8, 1000, js=True, smoothing=0.1, logit_scale=0.7),
    Case(2, 4099, softcap=5.0, z=True, pad=3),
    Case(3, 17, js=True, logit_scale=0.7, softcap=5.0, z=True, pad=2),
    Case(3, 17, has_ce=False, softcap=5.0, z=True),
    Case(5, 1, z=True),
    Case(2, 1, js=True, softcap=5.0),
]
# Every case in every dtype, but the 16-bit runs of the largest V (the slowest in the Triton
# interpreter; tests/test_losses.py loops over V in 16 bits in the fast tier) only in the full tier.
CASE_DTYPES = [pytest.param(case, dtype, id=f"{case}-{dtype}",
                            marks=[pytest.mark.full] if case.v > 1000 and dtype != torch.float32 else [])
               for case in CASES for dtype in DTYPES]


def _transform(z: torch.Tensor, case: Case) -> torch.Tensor:
    t = z * case.logit_scale
    if case.softcap > 0:
        finite = torch.where(t == float("-inf"), 0.0, t)  # keeps tanh's backward off -inf
        t = torch.where(t == float("-inf"), t, case.softcap * torch.tanh(finite / case.softcap))
    return t


def _reference(z: torch.Tensor, target: torch.Tensor, weights: RowWeights, case: Case):
    """[ce, div, lse, stat] in float64 and the gradient of Σ_n (w.ce·ce + w.div·div + w.z·zsq)."""
    k, v = z.shape[0], z.shape[-1]
    leaf = z.detach().double().reshape(k, -1, v).requires_grad_(True)
    active = target >= 0
    zero = torch.zeros((), dtype=torch.float64)
    # Inactive rows (NaN logits here) are zeroed before the transform, whose backward would
    # otherwise multiply their zero gradient by NaN.
    t = _transform(torch.where(active.view(1, -1, 1), leaf, zero), case)
    lse = torch.logsumexp(t, -1)
    logp = t - lse[..., None]
    p = logp.exp()
    if case.js:
        div = reference.js_divergence_rows(t, active)
        stat = reference._xlogy_diff(p, logp, reference._log_mean_prob(logp)).sum(-1)
    else:
        div = reference.x_divergence_rows(t, active)
        stat = reference._xlogy_diff(p, t - t.mean(0, keepdim=True), zero).sum(-1)
    ce = reference.cross_entropy_rows(t, target, active, case.smoothing) if case.has_ce else torch.zeros_like(div)
    zsq = torch.where(active, (lse**2).mean(0), zero)
    total = (weights.div.double().cpu() * div).sum() + (weights.ce.double().cpu() * ce).sum() * case.has_ce
    if weights.z is not None:
        total = total + (weights.z.double().cpu() * zsq).sum()
    (grad,) = torch.autograd.grad(total, leaf)
    lse, stat = (torch.where(active.view(1, -1), x, zero).detach() for x in (lse, stat))
    return [ce.detach(), div.detach(), lse, stat], grad.reshape(z.shape)


def _nan_rows(z: torch.Tensor, rows: list[int]) -> None:
    for n in rows:
        index = torch.unravel_index(torch.tensor(n), z.shape[1:-1])
        z[(slice(None), *(int(i) for i in index))] = float("nan")


def _problem(case: Case, dtype, device, gen, strided: bool):
    """Random logits (strided: batch dims transposed and classes 2 apart, read without a copy),
    targets with inactive rows whose logits are NaN (nothing of them may reach a result), and
    random row weights."""
    k, v = case.k, case.v
    if strided:
        base = (torch.randn(k, 3, 2, 2 * v, generator=gen, dtype=torch.float64) * 3).to(dtype)
        z = base.transpose(1, 2)[..., ::2]
    else:
        z = (torch.randn(k, 5, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    n = z[0, ..., 0].numel()
    target = torch.randint(0, v - case.pad, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < 0.3] = -1
    target[0] = v - case.pad - 1
    if case.pad:
        z[..., v - case.pad:] = float("-inf")
    _nan_rows(z, (target < 0).nonzero().flatten().tolist())

    def w():
        return (torch.rand(n, generator=gen, dtype=torch.float32) * 2 + 0.25).to(device)

    return z.to(device), target.to(device), RowWeights(w(), w(), w() if case.z else None)


def _same_layout(z: torch.Tensor, fill: float | None = None) -> torch.Tensor:
    """A new tensor with z's strides (a strided view stays strided), holding z or `fill`."""
    out = torch.empty_strided(z.shape, z.stride(), dtype=z.dtype, device=z.device)
    return out.copy_(z) if fill is None else out.fill_(fill)


def _seed(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate("-".join(map(str, parts)))))


def _check_reference(stats, grad, z, target, weights, case, dtype):
    want, want_grad = _reference(z.cpu(), target.cpu(), weights, case)
    n, tol = target.numel(), TOLERANCES[dtype]
    got = [x.cpu().double() for x in stats]
    assert [tuple(g.shape) for g in got] == [(n,), (n,), (case.k, n), (case.k, n)]
    for name, g, w in zip(("ce", "div", "lse", "stat"), got, want):
        torch.testing.assert_close(g, w, rtol=tol.value_rtol, atol=tol.value_atol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    inactive = target.cpu() < 0
    assert bool((grad.cpu().reshape(case.k, n, case.v)[:, inactive] == 0).all())
    assert_close_grads(grad.cpu(), want_grad, dtype)


@pytest.mark.parametrize("backend", CONTRACT_BACKENDS)
@pytest.mark.parametrize("case,dtype", CASE_DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_exact_backward_matches_float64(backend, dtype, case, strided):
    impl, device = _backend(backend)
    z, target, weights = _problem(case, dtype, device, _seed(case, dtype, strided), strided)
    stats = impl.forward(z, target, case.cfg(impl.name))
    grad = _same_layout(z, fill=7.0)
    impl.backward(z, target, stats.lse, stats.stat, weights, case.cfg(impl.name), grad)
    _check_reference(stats, grad, z, target, weights, case, dtype)


@pytest.mark.parametrize("backend", CONTRACT_BACKENDS)
@pytest.mark.parametrize("case,dtype", CASE_DTYPES)
@pytest.mark.parametrize("inplace,strided", [(False, False), (True, True)], ids=["buffer", "inplace-strided"])
def test_one_pass_forward_writes_the_exact_gradient(backend, dtype, case, inplace, strided):
    impl, device = _backend(backend)
    z, target, weights = _problem(case, dtype, device, _seed(case, dtype, inplace, strided), strided)
    cfg = case.cfg(impl.name)
    stats = impl.forward(z, target, cfg)
    exact = _same_layout(z, fill=7.0)
    impl.backward(z, target, stats.lse, stats.stat, weights, cfg, exact)

    logits = _same_layout(z)
    grad = logits if inplace else _same_layout(z, fill=7.0)
    early = impl.forward(logits, target, cfg, EarlyGrad(weights, grad))
    for name, a, b in zip(stats._fields, early, stats):
        assert torch.equal(a, b), f"{name} differs with early"
    # The same gradient up to fp32 rounding of the same formula: within one unit in the last
    # place of the stored dtype, relative to the element or to the largest one.
    ulp = torch.finfo(dtype).eps
    scale = float(exact.abs().max())
    atol = max(ulp / 64, ONE_PASS_FP32_ULPS.get(backend, 0) * 2.0**-24) * max(scale, 1e-30)
    torch.testing.assert_close(grad.double(), exact.double(), rtol=ulp, atol=atol)
    if not inplace:
        torch.testing.assert_close(logits, z, rtol=0, atol=0, equal_nan=True, msg="the one-pass forward wrote its logits")


@pytest.mark.parametrize("backend", CONTRACT_BACKENDS)
def test_one_pass_forward_matches_float64(backend):
    """The one-pass gradient against the reference directly, with every option on."""
    impl, device = _backend(backend)
    case = Case(3, 1000, js=True, smoothing=0.1, logit_scale=0.7, softcap=5.0, z=True)
    z, target, weights = _problem(case, torch.float32, device, _seed("early", case), False)
    grad = torch.full_like(z, 7.0)
    stats = impl.forward(z, target, case.cfg(impl.name), EarlyGrad(weights, grad))
    _check_reference(stats, grad, z, target, weights, case, torch.float32)


@pytest.mark.parametrize("js", [False, True], ids=["x", "js"])
def test_cpu_one_pass_rows_beyond_the_cache_budget(js):
    """Rows whose kept exponentials exceed the CPU kernel's per-thread cache budget (sized from
    this machine's caches) recompute exp(t − lse) in the one-pass forward: the exact backward's
    gradient, bit for bit."""
    impl, device = _backend("cpu")
    budget = torch.ops.intradistill_cpp.one_pass_cache_bytes(torch.empty(0))
    v = budget // (2 * 4) + 1  # K = 2 keeps 2K (X) or K + 1 (JS) floats per class: past the budget
    if v > 1 << 23:
        pytest.skip(f"a {budget >> 20} MiB per-thread budget needs rows too large for a unit test")
    case = Case(2, v, js=js, smoothing=0.1, logit_scale=0.7, z=True)
    z, target, weights = _problem(case, torch.float32, device, _seed("budget", case), False)
    stats = impl.forward(z, target, case.cfg(impl.name))
    exact = torch.full_like(z, 7.0)
    impl.backward(z, target, stats.lse, stats.stat, weights, case.cfg(impl.name), exact)
    grad = torch.full_like(z, 7.0)
    early = impl.forward(z, target, case.cfg(impl.name), EarlyGrad(weights, grad))
    for name, a, b in zip(stats._fields, early, stats):
        assert torch.equal(a, b), f"{name} differs with early"
    assert torch.equal(grad, exact)
    _check_reference(stats, grad, z, target, weights, case, torch.float32)


def test_cpu_softcap_of_huge_logits_stays_finite():
    """tanh through exp(−2|u|) cannot overflow: logits far beyond softcap saturate at ±softcap
    with a gradient that goes to 0, never inf or NaN."""
    impl, device = _backend("cpu")
    case = Case(3, 64, softcap=30.0, z=True)
    z, target, weights = _problem(case, torch.float32, device, _seed("huge", case), False)
    z = z * 3e3
    stats = impl.forward(z, target, case.cfg(impl.name))
    grad = torch.full_like(z, 7.0)
    impl.backward(z, target, stats.lse, stats.stat, weights, case.cfg(impl.name), grad)
    assert bool(torch.isfinite(grad).all())
    _check_reference(stats, grad, z, target, weights, case, torch.float32)


@pytest.mark.parametrize("rows_per_chunk", [1, 2])
@pytest.mark.parametrize("js", [False, True], ids=["x", "js"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_torch_backend_rows_in_chunks_equal_one_chunk(monkeypatch, rows_per_chunk, js, strided):
    """The "torch" backend works through the logits a few rows at a time (eager.CHUNK_ELEMENTS):
    statistics, the exact gradient and the one-pass gradient (written over strided logits, which
    no [K, N, V] view reaches) are those of the whole tensor at once, bit for bit."""
    impl, device = _backend("torch")
    case = Case(3, 1000, js=js, smoothing=0.1, logit_scale=0.7, softcap=5.0, z=True)
    z, target, weights = _problem(case, torch.float32, device, _seed("chunks", case, strided), strided)
    cfg = case.cfg(impl.name)

    def run():
        stats = impl.forward(z, target, cfg)
        exact = _same_layout(z, fill=7.0)
        impl.backward(z, target, stats.lse, stats.stat, weights, cfg, exact)
        logits = _same_layout(z)
        early = impl.forward(logits, target, cfg, EarlyGrad(weights, logits))
        return [*stats, exact, *early, logits]

    monkeypatch.setattr(eager, "CHUNK_ELEMENTS", {device: z.numel()})
    whole = run()
    monkeypatch.setattr(eager, "CHUNK_ELEMENTS", {device: rows_per_chunk * case.k * case.v})
    assert len(eager.row_chunks(case.k, target.numel(), case.v, z.device)) > 1
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _check_reference(whole[:4], whole[4], z, target, weights, case, torch.float32)
