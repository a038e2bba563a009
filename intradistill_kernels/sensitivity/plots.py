"""The paper's sensitivity figures as PNG files: violins (Figs. 3, 5), top 20% vs rest during
training (Fig. 2), pruning curves (Fig. 6). matplotlib is imported on the first plot."""

from __future__ import annotations

from pathlib import Path

import torch

from .balance import _check_fraction, _flat
from .measure import Sensitivity
from .tracker import SensitivityTracker


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _check_mapping(value, name: str) -> None:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{name} must be a non-empty dict of label -> data")


def plot_sensitivity_violins(sensitivities: dict[str, Sensitivity], path, exclude_top: float = 0.01,
                             max_points: int = 200_000) -> Path:
    """Violin plot of log10 sensitivity per model (the paper's Figs. 3 and 5); zeros (parameters
    the loss does not reach) cannot be drawn on a log scale and are left out."""
    _check_mapping(sensitivities, "sensitivities")
    exclude_top = _check_fraction(exclude_top, "exclude_top", upper_open=True)
    plt = _pyplot()
    data = []
    for label, sens in sensitivities.items():
        v = _flat(sens, f"sensitivities[{label!r}]").cpu().sort().values
        v = v[: v.numel() - int(exclude_top * v.numel())]
        v = v[v > 0]
        if v.numel() == 0:
            raise ValueError(f"sensitivities[{label!r}] has no positive value to plot")
        data.append(torch.log10(v[:: max(1, v.numel() // max_points)]).numpy())
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(data), 4))
    ax.violinplot(data, showmedians=True, showextrema=False)
    # a handful of near-zero sensitivities would stretch the axis over ten decades and squash the
    # bodies; the lowest 0.1% fall below the visible range (the violins are still computed on all)
    low = min(float(torch.quantile(torch.from_numpy(d[:: max(1, d.size // 1_000_000)]).double(), 0.001)) for d in data)
    high = max(float(d.max()) for d in data)
    ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_xticks(range(1, len(data) + 1))
    ax.set_xticklabels(list(sensitivities))
    ax.set_ylabel(f"log10 sensitivity |θ·∇θL| (top {100 * exclude_top:g}% removed)")
    ax.set_title("Parameter sensitivity")
    return _save(fig, plt, path)


def _history(value) -> list[dict]:
    if isinstance(value, SensitivityTracker):
        return value.history
    if isinstance(value, dict) and "history" in value:
        return value["history"]
    return list(value)


def plot_top_vs_rest(histories: dict, path) -> Path:
    """Mean sensitivity of the top 20% (solid) and of the rest (dashed) during training (the
    paper's Fig. 2). Values: a tracker, its to_dict(), or its history list."""
    _check_mapping(histories, "histories")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, value in histories.items():
        history = _history(value)
        if not history:
            raise ValueError(f"histories[{label!r}] has no record")
        steps = [h["step"] for h in history]
        line, = ax.plot(steps, [h["top20_mean"] for h in history], label=f"{label}: top 20%")
        ax.plot(steps, [h["rest_mean"] for h in history], "--", color=line.get_color(), label=f"{label}: rest 80%")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean sensitivity")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_pruning_curves(curves: dict[str, list[tuple[float, float]]], path, ylabel: str = "validation loss") -> Path:
    """Metric after pruning the least sensitive fraction (the paper's Fig. 6)."""
    _check_mapping(curves, "curves")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot([100 * f for f, _ in curve], [m for _, m in curve], marker="o", label=label)
    ax.set_xlabel("parameters pruned, least sensitive first (%)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, path)
