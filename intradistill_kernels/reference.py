"""The executable specification, in eager PyTorch (float64-capable): what every backend is
tested against (the "torch" backend, ops/eager.py, is the kernels' algorithm; this is the paper's).

Every formula here is written the way the paper states it (both KL directions, log p̄ from the
probabilities), not in the kernels' log-free form, so that tests comparing the kernels with this
module check the algebra of docs/design.md §1 as well as the code.

All functions take logits [K, N, V] and a bool vector `active` [N] and return per-row values [N]
(0 at inactive rows). Inactive rows are replaced by zeros before any arithmetic (rather than
selected out, which would give torch.compile data-dependent shapes), so NaN or -inf in an ignored
row can reach neither the result nor the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _xlogy_diff(p: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """p * (a - b) with 0 wherever p == 0 (also when a - b is NaN or inf there).

    `p != 0` rather than `p > 0` so that a NaN probability stays NaN. The difference itself is
    masked too: with a single where, the backward would multiply a zero gradient by a NaN.
    """
    keep = p != 0
    diff = torch.where(keep, a - b, torch.zeros((), dtype=p.dtype, device=p.device))
    return torch.where(keep, p * diff, torch.zeros((), dtype=p.dtype, device=p.device))


def _log_mean_prob(logp: Tensor) -> Tensor:
    """log p̄ over the pass dimension 0, from log-probabilities.

    Classes at -inf in every pass are taken out of the logsumexp: its backward there would be
    0 * exp(-inf - (-inf)) = NaN, though such a class has a zero gradient.
    """
    k = logp.shape[0]
    dead = (logp == float("-inf")).all(0)
    safe = torch.where(dead, torch.zeros((), dtype=logp.dtype), logp)
    lse = torch.logsumexp(safe, dim=0) - torch.log(torch.tensor(float(k), dtype=logp.dtype))
    return torch.where(dead, torch.full((), float("-inf"), dtype=logp.dtype), lse)


def _masked_rows(values: Tensor, active: Tensor) -> Tensor:
    return torch.where(active, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _active(t: Tensor, active: Tensor) -> Tensor:
    """t [K, N, ...] in the compute dtype with inactive rows zeroed."""
    t = t.to(_compute_dtype(t.dtype))
    keep = active.view(1, -1, *([1] * (t.dim() - 2)))
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _active_logp(logits: Tensor, active: Tensor) -> Tensor:
    return torch.log_softmax(_active(logits, active), dim=-1)


def x_divergence_rows(logits: Tensor, active: Tensor) -> Tensor:
    """X = (1/K) Σ_k [KL(p_k ‖ p̄) + KL(p̄ ‖ p_k)] per row (the paper's Eq. 8)."""
    logp = _active_logp(logits, active)
    p = logp.exp()
    logpbar = _log_mean_prob(logp)
    pbar = p.mean(0)
    kl_k_bar = _xlogy_diff(p, logp, logpbar).sum(-1)
    kl_bar_k = _xlogy_diff(pbar.expand_as(p), logpbar.expand_as(p), logp).sum(-1)
    return _masked_rows((kl_k_bar + kl_bar_k).mean(0), active)


def js_divergence_rows(logits: Tensor, active: Tensor) -> Tensor:
    """(1/K) Σ_k KL(p_k ‖ p̄) per row."""
    logp = _active_logp(logits, active)
    kl = _xlogy_diff(logp.exp(), logp, _log_mean_prob(logp)).sum(-1)
    return _masked_rows(kl.mean(0), active)


def jeffrey_divergence_rows(logits: Tensor, active: Tensor) -> Tensor:
    """Mean over pairs i < j of (KL(p_i ‖ p_j) + KL(p_j ‖ p_i)) / 2 (R-Drop's term for K = 2)."""
    logp = _active_logp(logits, active)
    p = logp.exp()
    k = logp.shape[0]
    pairs = []
    for i in range(k):
        for j in range(i + 1, k):
            sym = _xlogy_diff(p[i], logp[i], logp[j]) + _xlogy_diff(p[j], logp[j], logp[i])
            pairs.append(sym.sum(-1) / 2)
    return _masked_rows(torch.stack(pairs).mean(0), active)


DIVERGENCE_ROWS = {
    "x": x_divergence_rows,
    "js": js_divergence_rows,
    "jeffrey": jeffrey_divergence_rows,
}


def cross_entropy_rows(logits: Tensor, target: Tensor, active: Tensor, label_smoothing: float) -> Tensor:
    """Mean over the K passes of torch's cross-entropy (with its label-smoothing convention)."""
    z = _active(logits, active)
    k, n, v = z.shape
    y = torch.where(active, target, torch.zeros((), dtype=target.dtype, device=target.device)).repeat(k)
    ce = F.cross_entropy(z.reshape(k * n, v), y, reduction="none", label_smoothing=label_smoothing)
    return _masked_rows(ce.reshape(k, n).mean(0), active)


def active_rows(logits: Tensor, active: Tensor) -> Tensor:
    """logits [K, N, V] in the compute dtype with inactive rows zeroed (before any arithmetic)."""
    return _active(logits, active)


def transform_logits(logits: Tensor, logit_scale: float = 1.0, softcap: float = 0.0) -> Tensor:
    """t = softcap·tanh(logit_scale·z / softcap) (t = logit_scale·z without softcap). A logit at
    -inf stays -inf: masked vocabulary padding stays masked (tanh would make it -softcap); under
    softcap its gradient is 0, the limit of dt/dz = 1 − tanh² as z → -inf (design.md §1.10)."""
    t = logits.to(_compute_dtype(logits.dtype))
    if logit_scale != 1.0:
        t = t * logit_scale
    if softcap > 0:
        masked = t == float("-inf")
        capped = softcap * torch.tanh(torch.where(masked, torch.zeros((), dtype=t.dtype), t) / softcap)
        t = torch.where(masked, t.detach(), capped)
    return t


def loss_rows(logits: Tensor, target: Tensor, active: Tensor, spec) -> tuple[Tensor, Tensor, Tensor]:
    """(ce, divergence, (1/K) Σ_k lse_k²) per row of logits [K, *B, V], target [N], active [N].
    spec: anything with divergence, has_ce, label_smoothing, logit_scale and softcap (a LossSpec)."""
    k, v = logits.shape[0], logits.shape[-1]
    t = transform_logits(active_rows(logits.reshape(k, -1, v), active), spec.logit_scale, spec.softcap)
    div = DIVERGENCE_ROWS[spec.divergence](t, active)
    ce = cross_entropy_rows(t, target, active, spec.label_smoothing) if spec.has_ce else torch.zeros_like(div)
    return ce, div, lse_square_rows(t, active)


def lse_square_rows(logits: Tensor, active: Tensor) -> Tensor:
    """(1/K) Σ_k lse_k² per row: the z-loss term (PaLM's auxiliary loss on the normaliser)."""
    z = _active(logits, active)
    return _masked_rows(torch.logsumexp(z, dim=-1).square().mean(0), active)


def consistency_mse_rows(outputs: Tensor, active: Tensor) -> Tensor:
    """(1/K) Σ_k ‖o_k − ō‖² per row; outputs [K, N, D]."""
    o = _active(outputs, active)
    sq = (o - o.mean(0, keepdim=True)).square().sum(-1)
    return _masked_rows(sq.mean(0), active)
