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

import torch

from .backend import EarlyGrad, RowStats, RowWeights
from .spec import LossSpec

Tensor = torch.Tensor
NEG_INF = float("-inf")


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
        return ["the kernels' algorithm in eager torch (intradistill_kernels/ops/eager.py): slower, more memory"]

    def forward(self, logits, target, spec: LossSpec, early: EarlyGrad | None = None) -> RowStats:
        with torch.no_grad():
            t = active_transformed(logits, target, spec)
            stats = row_terms(t, target, spec)
            if early is not None:
                g = row_gradient(t, target, stats.lse, stats.stat, early.weights, spec)
                early.grad.copy_(g.reshape(early.grad.shape))
        return stats

    def backward(self, logits, target, lse, stat, weights: RowWeights, spec: LossSpec, grad) -> None:
        with torch.no_grad():
            t = active_transformed(logits, target, spec)
            grad.copy_(row_gradient(t, target, lse, stat, weights, spec).reshape(grad.shape))


backend = EagerBackend()
