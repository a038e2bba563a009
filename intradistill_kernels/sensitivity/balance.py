"""Statistics of a sensitivity distribution: the paper's degree of contribution balance (the std
after removing the top 1%, Appendix B) and the top-20% vs rest split of its Fig. 2."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .measure import Sensitivity

TOP_FRACTION = 0.2  # the paper's Fig. 2 split: the 20% most sensitive parameters vs the other 80%


def _flat(sensitivity: Sensitivity, name: str = "sensitivity") -> torch.Tensor:
    if not isinstance(sensitivity, dict) or not all(isinstance(t, torch.Tensor) for t in sensitivity.values()):
        raise TypeError(f"{name} must be a dict of name -> tensor (as parameter_sensitivity returns)")
    values = [t.detach().reshape(-1).float() for t in sensitivity.values()]
    device = values[0].device if values else torch.device("cpu")
    flat = torch.cat([v.to(device) for v in values]) if values else torch.zeros(0)
    if flat.numel() == 0:
        raise ValueError(f"{name} is empty")
    return flat


def _split_stats(values: torch.Tensor, exclude_top: float) -> tuple[float, float, float]:
    """(mean of the top 20%, mean of the rest, std with the top `exclude_top` removed), in O(n)
    plus two top-k's, without sorting: the tracker runs this during training."""
    n = values.numel()
    top = max(1, math.ceil(TOP_FRACTION * n))
    v = values.double()
    total = v.sum()
    top_sum = torch.topk(v, top, sorted=False).values.sum()
    rest_mean = float((total - top_sum) / (n - top)) if n > top else 0.0
    drop = int(math.floor(exclude_top * n))
    if drop:
        # the threshold value, then drop exactly `drop` entries (ties at the threshold included)
        dropped = torch.topk(v, drop, sorted=False).values
        kept_n = n - drop
        mean = (total - dropped.sum()) / kept_n
        var = ((v - mean) ** 2).sum() - ((dropped - mean) ** 2).sum()
        std = float((var / kept_n).clamp_min(0).sqrt())
    else:
        std = float(v.std(unbiased=False)) if n > 1 else 0.0
    return float(top_sum / top), rest_mean, std


@dataclass(frozen=True)
class ContributionBalance:
    """Summary of a sensitivity distribution. `std` is the paper's degree of contribution balance
    (lower = more balanced); the statistics other than top20_mean/rest_mean are over the
    parameters left after removing the top `exclude_top` fraction."""
    std: float
    mean: float
    median: float
    q25: float
    q75: float
    q99: float
    count: int          # parameters counted (after removing the top fraction)
    top20_mean: float   # mean sensitivity of the 20% most sensitive parameters (all parameters)
    rest_mean: float    # mean of the other 80%


def _check_fraction(value, name: str, upper_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0 <= value < 1 if upper_open else 0 <= value <= 1):
        raise ValueError(f"{name} must be in [0, {'1)' if upper_open else '1]'}, got {value}")
    return float(value)


def contribution_balance(sensitivity: Sensitivity, exclude_top: float = 0.01) -> ContributionBalance:
    """Standard deviation of all sensitivities after removing the top `exclude_top` fraction
    (the paper's Appendix B), with summary statistics."""
    exclude_top = _check_fraction(exclude_top, "exclude_top", upper_open=True)
    values = _flat(sensitivity)
    top20, rest, _ = _split_stats(values, 0.0)
    ordered = values.double().sort().values
    kept = ordered[: ordered.numel() - int(math.floor(exclude_top * ordered.numel()))]
    # torch.quantile refuses inputs above 2**24 elements; a stride over the sorted values keeps
    # the quantiles exact to within one stride
    sample = kept[:: max(1, math.ceil(kept.numel() / 2 ** 24))]
    q = torch.quantile(sample, torch.tensor([0.25, 0.5, 0.75, 0.99], dtype=torch.float64, device=sample.device))
    return ContributionBalance(std=float(kept.std(unbiased=False)) if kept.numel() > 1 else 0.0,
                               mean=float(kept.mean()), median=float(q[1]), q25=float(q[0]), q75=float(q[2]),
                               q99=float(q[3]), count=int(kept.numel()), top20_mean=top20, rest_mean=rest)
