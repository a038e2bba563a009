"""The one table of bad arguments at the public API: the error each must raise, a pattern its
message must contain (the argument's name or what was expected), and the call.

Each call takes the backend to ask for: an argument is refused whichever backend would have run
it, so tests/test_api_hardening.py runs every loss entry on every backend. Entries whose call
takes no backend (the schedule, consistency_mse, an unknown backend name) run once.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

import intradistill_kernels as idk


class BadCall(NamedTuple):
    error: type[Exception]
    match: str
    call: Callable[[str], object]  # call(backend)
    per_backend: bool = True


def _logits(k=3, n=4, v=10, seed=0):
    return (torch.randn(k, n, v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3).float()


_Z = _logits()
_Y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(1))
_H, _W = torch.randn(3, 4, 8), torch.randn(10, 8)


def _loss(backend, target=_Y, **options):
    return idk.intra_distillation_loss(_Z, target, backend=backend, **options)


def _fused_linear(backend, weight=_W, *args, **options):
    return idk.fused_linear_intra_distillation_loss(_H, weight, _Y, *args, backend=backend, **options)


BAD_ARGUMENTS: dict[str, BadCall] = {
    # logits
    "one pass": BadCall(ValueError, "K >= 2", lambda b: idk.x_divergence(_Z[:1], backend=b)),
    "no classes": BadCall(ValueError, "V >= 1", lambda b: idk.x_divergence(_Z[..., :0], backend=b)),
    "1-d logits": BadCall(ValueError, r"\[K, \*B, V\]", lambda b: idk.x_divergence(_Z[0, 0], backend=b)),
    "int logits": BadCall(TypeError, "floating-point", lambda b: idk.x_divergence(_Z.long(), backend=b)),
    "not a tensor": BadCall(TypeError, "logits", lambda b: idk.x_divergence(_Z.tolist(), backend=b)),
    # mask and target
    "mask shape": BadCall(ValueError, "mask", lambda b: idk.x_divergence(_Z, torch.ones(5, dtype=torch.bool), backend=b)),
    "mask dtype": BadCall(TypeError, "mask", lambda b: idk.x_divergence(_Z, torch.ones(4), backend=b)),
    "target shape": BadCall(ValueError, "target", lambda b: _loss(b, _Y[:3])),
    "target dtype": BadCall(TypeError, "target", lambda b: _loss(b, _Y.float())),
    "target range": BadCall(ValueError, r"\[0, 10\)", lambda b: _loss(b, _Y + 10)),
    "negative target": BadCall(ValueError, "ignore_index", lambda b: _loss(b, _Y - 20)),
    "huge ignore_index": BadCall(ValueError, "ignore_index", lambda b: _loss(b, ignore_index=2**70)),
    "bool ignore_index": BadCall(TypeError, "ignore_index", lambda b: _loss(b, ignore_index=True)),
    "float ignore_index": BadCall(TypeError, "ignore_index", lambda b: _loss(b, ignore_index=-100.0)),
    # options
    "reduction": BadCall(ValueError, "reduction", lambda b: idk.x_divergence(_Z, reduction="avg", backend=b)),
    "divergence": BadCall(ValueError, "divergence", lambda b: _loss(b, divergence="kl")),
    "negative alpha": BadCall(ValueError, "alpha", lambda b: _loss(b, alpha=-1.0)),
    "alpha nan": BadCall(ValueError, "alpha", lambda b: _loss(b, alpha=float("nan"))),
    "alpha inf": BadCall(ValueError, "alpha", lambda b: _loss(b, alpha=float("inf"))),
    "alpha vector": BadCall(ValueError, "alpha", lambda b: _loss(b, alpha=torch.ones(2))),
    "alpha int tensor": BadCall(TypeError, "alpha", lambda b: _loss(b, alpha=torch.tensor(1))),
    "label smoothing": BadCall(ValueError, "label_smoothing", lambda b: _loss(b, label_smoothing=1.5)),
    "softcap 0": BadCall(ValueError, "softcap", lambda b: _loss(b, softcap=0.0)),
    "softcap negative": BadCall(ValueError, "softcap", lambda b: _loss(b, softcap=-1.0)),
    "softcap nan": BadCall(ValueError, "softcap", lambda b: _loss(b, softcap=float("nan"))),
    "logit_scale 0": BadCall(ValueError, "logit_scale", lambda b: _loss(b, logit_scale=0.0)),
    "logit_scale inf": BadCall(ValueError, "logit_scale", lambda b: _loss(b, logit_scale=float("inf"))),
    "z_loss negative": BadCall(ValueError, "z_loss", lambda b: _loss(b, z_loss=-0.1)),
    "z_loss string": BadCall(TypeError, "z_loss", lambda b: _loss(b, z_loss="0.1")),
    # fused linear
    "weight None": BadCall(TypeError, "weight", lambda b: _fused_linear(b, None)),
    "bias int": BadCall(TypeError, "bias", lambda b: _fused_linear(b, _W, torch.ones(10, dtype=torch.long))),
    "bool chunk_size": BadCall(TypeError, "chunk_size", lambda b: _fused_linear(b, chunk_size=True)),
    "zero chunk_size": BadCall(ValueError, "chunk_size", lambda b: _fused_linear(b, chunk_size=0)),
    # no backend involved
    "backend": BadCall(ValueError, "backend", lambda b: idk.x_divergence(_Z, backend="tpu"), per_backend=False),
    "schedule q <= p": BadCall(ValueError, "q", lambda b: idk.AdaptiveAlpha(5.0, 10, 5, 100), per_backend=False),
    "schedule alpha <= 0": BadCall(ValueError, "alpha", lambda b: idk.AdaptiveAlpha(0.0, 5, 10, 100), per_backend=False),
    "schedule steps": BadCall(ValueError, "total_steps", lambda b: idk.AdaptiveAlpha(5.0, 5, 10, 0), per_backend=False),
    "mse one pass": BadCall(ValueError, "K >= 2", lambda b: idk.consistency_mse(torch.randn(1, 4)), per_backend=False),
}
