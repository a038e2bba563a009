"""Parameter sensitivity and contribution balance: the paper's analysis (§2, §5), as a tool.

The sensitivity of a parameter is |θ ⊙ ∇θ L| (the paper's Eq. 2): the first-order change of the
loss if the parameter were zeroed. Intra-distillation aims at *balanced* contributions: a small
standard deviation of all sensitivities (the paper removes the top 1% first, Appendix B), a small
gap between the top 20% and the rest during training (Fig. 2), and a smaller loss increase when
the least sensitive parameters are pruned (Fig. 6).

    python -m intradistill_kernels.sensitivity CKPT [CKPT ...] --loader module:function --out DIR

where the loader maps a checkpoint path to (model, loss_fn, batches) and optionally a fourth
element evaluate(model) -> float (default: the mean loss over the batches).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

Sensitivity = dict[str, torch.Tensor]


def _named_params(model: nn.Module, params: Iterable[str] | None):
    wanted = None if params is None else set(params)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and (wanted is None or n in wanted)]


def parameter_sensitivity(model: nn.Module, loss_fn: Callable, batches: Iterable, max_batches: int = 100, *,
                          train_mode: bool = False, params: Iterable[str] | None = None,
                          progress: bool = False) -> Sensitivity:
    """name -> |θ ⊙ ∇θ L| averaged over up to max_batches batches (loss_fn(model, batch) -> loss).

    The model runs in eval mode unless train_mode; its mode and the parameters' .grad are
    restored afterwards, so this can run in the middle of training.
    """
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    named = _named_params(model, params)
    if not named:
        raise ValueError("the model has no trainable parameters to measure")
    saved = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in named}
    was_training = model.training
    model.train(train_mode)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    count = 0
    try:
        from tqdm.auto import tqdm
        iterator = tqdm(batches, total=max_batches, desc="sensitivity", disable=not progress, leave=False)
    except ImportError:
        iterator = batches
    try:
        for batch in iterator:
            if count >= max_batches:
                break
            for _, p in named:
                p.grad = None
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (n, p), g in zip(named, grads):
                if g is not None:
                    total[n] += (p.detach().float() * g.float()).abs()
            count += 1
    finally:
        model.train(was_training)
        for n, p in named:
            p.grad = saved[n]
    if count == 0:
        raise ValueError("batches is empty")
    return {n: t / count for n, t in total.items()}


def _flat(sensitivity: Sensitivity) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in sensitivity.values()])


@dataclass
class ContributionBalance:
    std: float          # the paper's degree of contribution balance (lower = more balanced)
    mean: float
    median: float
    q25: float
    q75: float
    q99: float
    count: int          # parameters counted (after removing the top fraction)
    top20_mean: float   # mean sensitivity of the 20% most sensitive parameters (all parameters)
    rest_mean: float    # mean of the other 80%


def _top_vs_rest(values: torch.Tensor) -> tuple[float, float]:
    ordered = values.sort(descending=True).values
    top = max(1, int(math.ceil(0.2 * ordered.numel())))
    rest = ordered[top:]
    return float(ordered[:top].mean()), float(rest.mean()) if rest.numel() else 0.0


def contribution_balance(sensitivity: Sensitivity, exclude_top: float = 0.01) -> ContributionBalance:
    """Standard deviation of all sensitivities after removing the top `exclude_top` fraction
    (the paper's Appendix B), with summary statistics."""
    if not 0 <= exclude_top < 1:
        raise ValueError(f"exclude_top must be in [0, 1), got {exclude_top}")
    values = _flat(sensitivity)
    if values.numel() == 0:
        raise ValueError("sensitivity is empty")
    top20, rest = _top_vs_rest(values)
    ordered = values.sort().values
    kept = ordered[: ordered.numel() - int(math.floor(exclude_top * ordered.numel()))]
    q = torch.quantile(kept.double()[:: max(1, kept.numel() // 10_000_000)], torch.tensor([0.25, 0.5, 0.75, 0.99], dtype=torch.float64))
    return ContributionBalance(std=float(kept.double().std(unbiased=False)), mean=float(kept.double().mean()),
                               median=float(q[1]), q25=float(q[0]), q75=float(q[2]), q99=float(q[3]),
                               count=int(kept.numel()), top20_mean=top20, rest_mean=rest)


class SensitivityTracker:
    """Records, every `every` steps, the mean sensitivity of the current top 20% of parameters
    and of the rest, and the std: call tracker.step(step) after loss.backward() (it reads the
    .grad already there: no extra backward)."""

    def __init__(self, model: nn.Module, every: int = 100, params: Iterable[str] | None = None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model, self.every, self.params = model, every, params
        self.history: list[dict] = []

    def step(self, step: int) -> dict | None:
        if step % self.every:
            return None
        sens = {n: (p.detach() * p.grad.detach()).abs() for n, p in _named_params(self.model, self.params)
                if p.grad is not None}
        if not sens:
            return None
        values = _flat(sens)
        top20, rest = _top_vs_rest(values)
        record = {"step": int(step), "top20_mean": top20, "rest_mean": rest, "std": float(values.double().std(unbiased=False))}
        self.history.append(record)
        return record

    # transformers.TrainerCallback protocol (duck-typed: no dependency on transformers)
    def on_step_end(self, args, state, control, **kwargs):
        self.step(state.global_step)
        return control

    def to_dict(self) -> dict:
        return {"every": self.every, "history": list(self.history)}


class PruneHandle:
    """What prune_by_sensitivity changed; restore() puts the original values back exactly."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]):
        self.model, self.masks, self._originals = model, masks, originals
        self.count = int(sum(int(m.sum()) for m in masks.values()))

    def restore(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, original in self._originals.items():
                params[n].copy_(original)
        self._originals = {}


def prune_by_sensitivity(model: nn.Module, sensitivity: Sensitivity, fraction: float) -> PruneHandle:
    """Zeroes the globally least sensitive `fraction` of the parameters named in `sensitivity`
    (exactly round(fraction * total); ties broken by position, deterministically)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    params = dict(model.named_parameters())
    missing = [n for n in sensitivity if n not in params]
    if missing:
        raise ValueError(f"sensitivity names parameters the model does not have: {missing[:3]}")
    values = _flat(sensitivity)
    k = int(round(fraction * values.numel()))
    order = torch.sort(values, stable=True).indices[:k]
    chosen = torch.zeros(values.numel(), dtype=torch.bool)
    chosen[order] = True
    masks, originals, offset = {}, {}, 0
    with torch.no_grad():
        for n, s in sensitivity.items():
            m = chosen[offset: offset + s.numel()].view(s.shape).to(params[n].device)
            offset += s.numel()
            if m.any():
                originals[n] = params[n].detach().clone()
                params[n].masked_fill_(m, 0)
            masks[n] = m
    return PruneHandle(model, masks, originals)


def pruning_curve(model: nn.Module, sensitivity: Sensitivity, evaluate: Callable[[nn.Module], float],
                  fractions: Iterable[float]) -> list[tuple[float, float]]:
    """[(fraction, evaluate(model) after pruning that fraction)], the model restored after each."""
    curve = []
    for fraction in fractions:
        handle = prune_by_sensitivity(model, sensitivity, fraction)
        try:
            curve.append((float(fraction), float(evaluate(model))))
        finally:
            handle.restore()
    return curve


# --------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sensitivity_violins(sensitivities: dict[str, Sensitivity], path, exclude_top: float = 0.01,
                             max_points: int = 200_000) -> Path:
    """Violin plot of log10 sensitivity per model (the paper's Figs. 3 and 5)."""
    plt = _pyplot()
    data = []
    for sens in sensitivities.values():
        v = _flat(sens).sort().values
        v = v[: v.numel() - int(exclude_top * v.numel())]
        v = v[v > 0][:: max(1, v.numel() // max_points)]
        data.append(torch.log10(v).numpy())
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(data), 4))
    ax.violinplot(data, showmedians=True)
    ax.set_xticks(range(1, len(data) + 1))
    ax.set_xticklabels(list(sensitivities))
    ax.set_ylabel("log10 sensitivity |θ·∇θL| (top 1% removed)")
    ax.set_title("Parameter sensitivity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_top_vs_rest(histories: dict[str, list[dict]], path) -> Path:
    """Mean sensitivity of the top 20% and of the rest during training (the paper's Fig. 2)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, history in histories.items():
        steps = [h["step"] for h in history]
        line, = ax.plot(steps, [h["top20_mean"] for h in history], label=f"{label}: top 20%")
        ax.plot(steps, [h["rest_mean"] for h in history], "--", color=line.get_color(), label=f"{label}: rest 80%")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean sensitivity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_pruning_curves(curves: dict[str, list[tuple[float, float]]], path, ylabel: str = "validation loss") -> Path:
    """Metric after pruning the least sensitive fraction (the paper's Fig. 6)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot([100 * f for f, _ in curve], [m for _, m in curve], marker="o", label=label)
    ax.set_xlabel("parameters pruned, least sensitive first (%)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- CLI

def _load(spec: str):
    if ":" not in spec:
        raise SystemExit(f"--loader must be module:function, got {spec!r}")
    module, func = spec.split(":", 1)
    return getattr(importlib.import_module(module), func)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--loader", required=True, help="module:function mapping a checkpoint to (model, loss_fn, batches[, evaluate])")
    ap.add_argument("--out", default="runs/sensitivity")
    ap.add_argument("--max-batches", type=int, default=100)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    args = ap.parse_args(argv)
    loader = _load(args.loader)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sens, curves, summary = {}, {}, {}
    for ckpt in args.checkpoints:
        loaded = loader(ckpt)
        model, loss_fn, batches = loaded[:3]
        batches = list(batches)
        evaluate = loaded[3] if len(loaded) > 3 else (
            lambda m, loss_fn=loss_fn, batches=batches: sum(float(loss_fn(m, b)) for b in batches) / len(batches))
        label = Path(ckpt).parent.name or Path(ckpt).stem
        sens[label] = parameter_sensitivity(model, loss_fn, batches, args.max_batches, progress=True)
        with torch.no_grad():
            curves[label] = pruning_curve(model, sens[label], evaluate, args.fractions)
        summary[label] = {"balance": asdict(contribution_balance(sens[label])), "pruning": curves[label]}
    plots = [plot_sensitivity_violins(sens, out / "sensitivity_violins.png"),
             plot_pruning_curves(curves, out / "pruning_curves.png")]
    (out / "sensitivity.json").write_text(json.dumps(summary, indent=2))
    print("| model | sensitivity std (top 1% removed) | top-20% mean | rest mean | " +
          " | ".join(f"pruned {100 * f:.0f}%" for f in args.fractions) + " |")
    print("| --- " * (4 + len(args.fractions)) + "|")
    for label, s in summary.items():
        b = s["balance"]
        print(f"| {label} | {b['std']:.3e} | {b['top20_mean']:.3e} | {b['rest_mean']:.3e} | " +
              " | ".join(f"{m:.4f}" for _, m in s["pruning"]) + " |")
    print(f"plots: {', '.join(str(p) for p in plots)}")
    return summary


if __name__ == "__main__":
    main()
