"""Addressing of the rows of a strided [K, *B, V] tensor without copying it."""

from __future__ import annotations

import torch


def row_offsets(t: torch.Tensor) -> torch.Tensor:
    """int64 [N]: element offset (from t's data pointer) of row n = flat index over *B, pass 0.

    Folding the batch strides into one offset per row lets the kernels read any view, including
    ones that cannot be flattened to [K, N, V] without a copy (e.g. transposed batch dims).
    """
    batch_shape, batch_strides = t.shape[1:-1], t.stride()[1:-1]
    off = torch.zeros((), dtype=torch.int64, device=t.device)
    for i, (size, stride) in enumerate(zip(batch_shape, batch_strides)):
        shape = [1] * len(batch_shape)
        shape[i] = size
        off = off + (torch.arange(size, dtype=torch.int64, device=t.device) * stride).view(shape)
    return off.expand(batch_shape).reshape(-1)
