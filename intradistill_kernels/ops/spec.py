"""LossSpec: the one description of a loss call that every layer below the public functions
hands down (the checks that build it live in _core.build_spec).

A new option is one field here plus its use in the kernels: the autograd Functions, the custom
ops and the backends all take (tensors, spec). Custom ops cannot take a dataclass, so a spec
crosses into one as two arguments that torch.compile can trace: `key`, a string of the discrete
fields (constant while tracing), and `scalars`, a list of the numeric ones (which may be symbolic
under dynamic shapes and so cannot be formatted into a string).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace

DIVERGENCES = ("x", "js", "jeffrey")
REDUCTIONS = ("mean", "sum", "none")

# The fields that travel in `key` and in `scalars`, in order.
_DISCRETE = ("backend", "divergence", "has_ce", "reduction", "one_pass", "inplace", "group")
_NUMERIC = ("label_smoothing", "logit_scale", "softcap", "z_loss", "ignore_index", "chunk_size")


@dataclass(frozen=True)
class LossSpec:
    """What is constant about one call of a K-pass loss (tensors and alpha are not)."""
    backend: str                  # the backend object's name in the registry
    divergence: str = "x"         # "x", "js" or "jeffrey" (= K/(K-1)·X, computed as X)
    has_ce: bool = True           # cross-entropy term (False: the divergence functions)
    reduction: str = "mean"
    one_pass: bool = False        # gradient of the reduced loss written during the forward
    inplace: bool = False         # that gradient written over the logits
    group: str = ""               # vocabulary-parallel: the process group's name ("": unsharded)
    label_smoothing: float = 0.0  # torch's convention: target (1 − ε)·onehot + ε/V
    logit_scale: float = 1.0      # t = logit_scale·z before anything else
    softcap: float = 0.0          # > 0: t = softcap·tanh(t / softcap) (Gemma 2/3); 0: off
    z_loss: float = 0.0           # weight of (1/K) Σ_k lse_k² in the loss
    ignore_index: int = -100      # named in error messages only: rows are masked by the caller
    chunk_size: int = 0           # fused-linear: tokens per chunk (0: from the free memory)

    @property
    def js(self) -> bool:
        """The kernels' divergence: (1/K) Σ KL(p_k ‖ p̄) instead of the X form."""
        return self.divergence == "js"

    @property
    def smooth(self) -> bool:
        return self.has_ce and self.label_smoothing > 0

    @property
    def has_z(self) -> bool:
        return self.z_loss > 0

    def div_factor(self, k: int) -> float:
        """"jeffrey" (mean over pairs of the symmetric KL / 2) = K/(K-1)·X exactly (design.md §1.6)."""
        return k / (k - 1) if self.divergence == "jeffrey" else 1.0

    def key(self) -> str:
        return ";".join(f"{name}={getattr(self, name)}" for name in _DISCRETE)

    def scalars(self) -> list[float]:
        return [float(getattr(self, name)) for name in _NUMERIC]

    def with_(self, **changes) -> LossSpec:
        return replace(self, **changes)


@functools.lru_cache(maxsize=256)
def _discrete_fields(key: str) -> dict:
    types = {f.name: f.type for f in fields(LossSpec)}
    out = {}
    for item in key.split(";"):
        name, value = item.split("=", 1)
        out[name] = value == "True" if types[name] == "bool" else value
    return out


def spec_of(key: str, scalars: list[float]) -> LossSpec:
    """The spec a custom op was called with (inverse of key() and scalars())."""
    numeric = dict(zip(_NUMERIC, scalars))
    numeric["ignore_index"] = int(numeric["ignore_index"])
    numeric["chunk_size"] = int(numeric["chunk_size"])
    return LossSpec(**_discrete_fields(key), **numeric)
