"""One-shot pruning of the least sensitive parameters (the paper's Fig. 6), always undoable."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .._progress import progress_bar
from .balance import _check_fraction, _flat
from .measure import Sensitivity, _check_model


class PruneHandle:
    """What prune_by_sensitivity changed: `masks` (name -> bool tensor, True = zeroed), `count`,
    and restore(), which puts the original values back bit-exactly."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]):
        self.model, self.masks, self._originals = model, masks, originals
        self.count = int(sum(int(m.sum()) for m in masks.values()))

    def restore(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, original in self._originals.items():
                params[n].copy_(original)
        self._originals = {}  # a second restore() must not undo later edits of the caller

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def prune_by_sensitivity(model: nn.Module, sensitivity: Sensitivity, fraction: float) -> PruneHandle:
    """Zeroes the globally least sensitive `fraction` of the parameters named in `sensitivity`:
    exactly round(fraction * total) of them, ties broken by position (the order of the dict, then
    row-major), so the choice is deterministic. Returns a PruneHandle (also a context manager)."""
    _check_model(model)
    fraction = _check_fraction(fraction, "fraction", upper_open=False)
    values = _flat(sensitivity)
    params = dict(model.named_parameters())
    missing = [n for n in sensitivity if n not in params]
    if missing:
        raise ValueError(f"sensitivity names parameters the model does not have: {missing[:3]}")
    wrong = [n for n, s in sensitivity.items() if s.shape != params[n].shape]
    if wrong:
        raise ValueError(f"sensitivity shapes differ from the parameters' for {wrong[:3]}")
    k = int(round(fraction * values.numel()))
    chosen = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    chosen[torch.sort(values, stable=True).indices[:k]] = True
    masks, originals, offset = {}, {}, 0
    with torch.no_grad():
        for n, s in sensitivity.items():
            p = params[n]
            m = chosen[offset: offset + s.numel()].view(s.shape).to(p.device)
            offset += s.numel()
            if m.any():
                originals[n] = p.detach().clone()
                p.masked_fill_(m, 0)
            masks[n] = m
    return PruneHandle(model, masks, originals)


def pruning_curve(model: nn.Module, sensitivity: Sensitivity, evaluate: Callable[[nn.Module], float],
                  fractions: Iterable[float], *, progress: bool | None = None) -> list[tuple[float, float]]:
    """[(fraction, evaluate(model) with that fraction pruned)], the model restored after each
    (and on error). evaluate(model) -> float is the caller's metric, e.g. a validation loss."""
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable as evaluate(model) -> float, got {type(evaluate).__name__}")
    fractions = [_check_fraction(f, "fractions", upper_open=False) for f in fractions]
    curve = []
    for fraction in progress_bar(fractions, enabled=progress, leave=False, desc="pruning"):
        with prune_by_sensitivity(model, sensitivity, fraction):
            curve.append((fraction, float(evaluate(model))))
    return curve
