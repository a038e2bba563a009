"""The "torch" backend: the kernels' algorithm in eager PyTorch, on any device and dtype (float64
included), always available.

It computes what the fused kernels compute (ops/backend.py) with the same formulas: the row
statistics in the log-free form of docs/design.md §1 and the explicit gradient of §1.9, so it
serves wherever a backend is called (the logits loss, the fused-linear chunks, a vocabulary shard)
when no fused backend takes the tensors. reference.py, the paper's own formulas, is what all of
them are tested against.

`row_terms` is also the differentiable form of the loss: built from autograd-safe operations
(every NaN a masked class could produce is replaced before it is multiplied), so autograd through
it gives first and second derivatives. The custom ops' backward uses it when a gradient is itself
differentiated (create_graph=True).
"""

from __future__ import annotations

import math

import torch

from .backend import EarlyGrad, RowStats, RowWeights
from .spec import LossSpec

Tensor = torch.Tensor
NEG_INF = float("-inf")

# Elements of one [K, rows, V] temporary: the backend works through the logits a few rows at a
# time. On a CPU its ~20 temporaries then stay in cache and are reused from the heap, where
# whole-size ones are each a fresh mapping whose every page faults on first touch (several times
# slower: the runner's intradistill[torch] rows); elsewhere the bound caps the extra memory.
CHUNK_ELEMENTS = {"cpu": 1 << 20}
DEFAULT_CHUNK_ELEMENTS = 1 << 26


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def transform(z: Tensor, spec: LossSpec) -> Tensor:
    """t = softcap·tanh(logit_scale·z / softcap) in the compute dtype; -inf stays -inf (masked
    padding stays masked) and, under softcap, passes no gradient (dt/dz → 0 as z → -inf)."""
    t = z.to(compute_dtype(z.dtype))
    if spec.logit_scale != 1.0:
        t = t * spec.logit_scale
    if spec.softcap > 0:
        masked = t == NEG_INF
        capped = spec.softcap * torch.tanh(torch.where(masked, 0.0, t) / spec.softcap)
        t = torch.where(masked, t.detach(), capped)
    return t


def chain(g: Tensor, t: Tensor, spec: LossSpec) -> Tensor:
    """g·dt/dz for the transform above, from the transformed t."""
    if spec.softcap > 0:
        q = t / spec.softcap
        g = torch.where(t == NEG_INF, 0.0, g * ((1 - q) * (1 + q)))
    return g * spec.logit_scale if spec.logit_scale != 1.0 else g


def deviation(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """d = t − t̄ per class, taken against the class's largest logit (exact where the K logits
    of a class are close, however large), with 0 where a pass is -inf; and, per class, whether
    some pass is -inf and whether every pass is."""
    inf = t == NEG_INF
    some, every = inf.any(0), inf.all(0)
    top = t.max(0).values
    shifted = torch.where(some, 0.0, t - torch.where(every, 0.0, top))
    return shifted - shifted.mean(0), some, every


def log_mean_prob(logp: Tensor) -> Tensor:
    """log p̄ per class over the pass dim 0 (-inf where every pass is -inf)."""
    top = logp.max(0).values
    top = torch.where(top == NEG_INF, 0.0, top)
    return top + torch.log(torch.exp(logp - top).sum(0) / logp.shape[0])


def masked_product(p: Tensor, x: Tensor) -> Tensor:
    """p·x with 0 where p is 0; x is made finite there first, so no NaN reaches a gradient."""
    zero = p == 0
    return torch.where(zero, 0.0, p * torch.where(zero, 0.0, x))


def _rows(x: Tensor, active: Tensor) -> Tensor:
    return torch.where(active, x, 0.0)


def row_terms(t: Tensor, target: Tensor, spec: LossSpec) -> RowStats:
    """Statistics of transformed logits t [K, N, V] (inactive rows already zeroed), differentiable."""
    k, _, v = t.shape
    active = target >= 0
    m = t.max(-1).values.detach()
    m = torch.where(m == NEG_INF, 0.0, m)
    e = torch.exp(t - m[..., None])
    s = e.sum(-1)
    lse = m + torch.log(s)
    p = e / s[..., None]
    if spec.js:
        logp = t - lse[..., None]
        stat = masked_product(p, logp - log_mean_prob(logp)).sum(-1)
    else:
        # A class at -inf in some passes but not all makes KL(p̄ ‖ p_k), so X, +inf (design.md §1.10).
        d, some, every = deviation(t)
        stat = torch.where(some, torch.where(every, 0.0, float("inf")), masked_product(p, d)).sum(-1)
    ce = torch.zeros_like(lse)
    if spec.has_ce:
        # Relative to the target logit, as the kernels (exact whatever the logits' common offset).
        t_y = t.gather(-1, target.clamp(0, v - 1).view(1, -1, 1).expand(k, -1, 1)).squeeze(-1)
        ref = torch.where(t_y == NEG_INF, 0.0, t_y).detach()
        ce = (m - ref) + torch.log(s) - (1 - spec.label_smoothing) * (t_y - ref)
        if spec.smooth:
            ce = ce - spec.label_smoothing / v * (t - ref[..., None]).sum(-1)
    lse, stat = _rows(lse, active), _rows(stat, active)
    return RowStats(_rows(ce.mean(0), active), stat.mean(0), lse, stat)


def row_gradient(t: Tensor, target: Tensor, lse: Tensor, stat: Tensor, weights: RowWeights, spec: LossSpec) -> Tensor:
    """The explicit gradient (ops/backend.py) w.r.t. the raw logits, from transformed t [K, N, V]."""
    k, _, v = t.shape
    lse, stat = lse.to(t.dtype), stat.to(t.dtype)
    w_ce, w_div = (w.to(t.dtype)[None, :, None] / k for w in weights[:2])
    logp = t - lse[..., None]
    p = torch.exp(logp)
    if spec.js:
        d_div = masked_product(p, logp - log_mean_prob(logp)[None] - stat[..., None])
    else:
        d, _, _ = deviation(t)
        d_div = masked_product(p, d - stat[..., None] + 1) - p.mean(0)
    g = w_div * d_div
    if spec.has_ce:
        onehot = (torch.arange(v, device=t.device) == target[:, None]).to(t.dtype) * (1 - spec.label_smoothing)
        g = g + w_ce * (p - onehot - (spec.label_smoothing / v if spec.smooth else 0.0))
    if weights.z is not None:
        g = g + (2 * weights.z.to(t.dtype)[None, :] / k * lse)[..., None] * p
    g = chain(g, t, spec)
    return torch.where((target >= 0)[None, :, None], g, 0.0)


def row_chunks(k: int, n: int, v: int, device: torch.device) -> list[slice]:
    """Row ranges of at most CHUNK_ELEMENTS elements per [K, rows, V] tensor (one row at least)."""
    rows = max(1, CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS) // max(1, k * v))
    return [slice(a, min(n, a + rows)) for a in range(0, max(n, 1), rows)]


def transformed_rows(logits: Tensor, target: Tensor, spec: LossSpec):
    """(rows, t) for each chunk of rows: t the transformed [K, rows, V] logits, inactive rows zeroed."""
    k, v = logits.shape[0], logits.shape[-1]
    z = logits.reshape(k, -1, v)
    for rows in row_chunks(k, z.shape[1], v, z.device):
        yield rows, active_transformed(z[:, rows], target[rows], spec)


class _GradRows:
    """A [K, *B, V] gradient as [K, N, V] rows to write into: a view where the strides allow, else a
    buffer copied into it by done()."""

    def __init__(self, grad: Tensor):
        self.grad = grad
        k, v = grad.shape[0], grad.shape[-1]
        try:
            self.rows, self.copy = grad.view(k, -1, v), False
        except RuntimeError:
            self.rows, self.copy = grad.new_empty((k, math.prod(grad.shape[1:-1]), v)), True

    def done(self) -> None:
        if self.copy:
            self.grad.copy_(self.rows.view(self.grad.shape))


def active_transformed(logits: Tensor, target: Tensor, spec: LossSpec) -> Tensor:
    """[K, N, V] transformed logits with inactive rows zeroed before any arithmetic."""
    k, v = logits.shape[0], logits.shape[-1]
    z = logits.reshape(k, -1, v)
    return transform(torch.where((target >= 0)[None, :, None], z, 0.0), spec)


class EagerBackend:
    """The "torch" backend (interface: ops/backend.py)."""

    name = "torch"
    max_passes = None

    def unavailable_reason(self) -> str | None:
        return None

    def supports(self, t: Tensor) -> bool:
        return True

    def details(self) -> list[str]:
        return ["the kernels' algorithm as eager torch operations, a few rows at a time "
                "(intradistill_kernels/ops/eager.py)"]

    def forward(self, logits, target, spec: LossSpec, early: EarlyGrad | None = None) -> RowStats:
        out = _GradRows(early.grad) if early is not None else None
        parts = []
        with torch.no_grad():
            for rows, t in transformed_rows(logits, target, spec):
                stats = row_terms(t, target[rows], spec)
                if out is not None:
                    out.rows[:, rows] = row_gradient(t, target[rows], stats.lse, stats.stat,
                                                     early.weights.rows(rows), spec)
                parts.append(stats)
        if out is not None:
            out.done()
        return RowStats(*(torch.cat(p, dim=-1) for p in zip(*parts)))

    def backward(self, logits, target, lse, stat, weights: RowWeights, spec: LossSpec, grad) -> None:
        out = _GradRows(grad)
        with torch.no_grad():
            for rows, t in transformed_rows(logits, target, spec):
                out.rows[:, rows] = row_gradient(t, target[rows], lse[:, rows], stat[:, rows], weights.rows(rows), spec)
        out.done()


backend = EagerBackend()
