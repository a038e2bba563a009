"""Everything below the public functions' checks.

    registry.py      the backends, by name: the only place that lists them
    backend.py       the interface every backend implements
    spec.py          LossSpec: the constants of one loss call, handed down to every layer
    logits_loss.py   custom ops and the autograd Function of the loss on logits
    linear_loss.py   the same for the fused-linear loss (hidden states @ output weight)
    sharded.py       a vocabulary split over ranks: partial statistics combined across a group
    loss_terms.py    the reduced loss and its backward row weights, once for all of them
    targets.py       target values checked inside the ops (same error eager and compiled)
    scale.py         grad *= grad_output without a host read
    eager.py         the "torch" backend; triton/ and cpp.py the fused ones
    rows.py          row offsets: any strided [K, *B, V] view read without a copy

Calls go down only: _core -> logits_loss / linear_loss -> sharded -> a backend -> its kernels.
"""

from .registry import available, get, unavailable_reason

__all__ = ["available", "get", "unavailable_reason"]
