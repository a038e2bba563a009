"""Parameter sensitivity and contribution balance: the paper's analysis (§2, §5), as a tool.

The sensitivity of a parameter is |θ ⊙ ∇θ L| (the paper's Eq. 2): the first-order change of the
loss if the parameter were zeroed. Intra-distillation aims at *balanced* contributions: a small
standard deviation of all sensitivities (the paper removes the top 1% first, Appendix B), a small
gap between the top 20% and the rest during training (Fig. 2), and a smaller loss increase when
the least sensitive parameters are pruned (Fig. 6).

    python -m intradistill_kernels.sensitivity CKPT [CKPT ...] --loader module:function --out DIR

where the loader maps a checkpoint path to (model, loss_fn, batches) and optionally a fourth
element evaluate(model) -> float (default: the mean loss over the batches, model in eval mode).
See docs/sensitivity.md.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import numbers
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

Sensitivity = dict[str, torch.Tensor]

TOP_FRACTION = 0.2  # the paper's Fig. 2 split: the 20% most sensitive parameters vs the other 80%


def _progress(iterable, progress: bool | None, **kwargs):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the library; the CLI's requirements include it
        return iterable
    # disable=None is tqdm's "only on a terminal", so logs of batch jobs stay clean
    return tqdm(iterable, disable=None if progress is None else not progress, leave=False, **kwargs)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _named_params(model: nn.Module, params: Iterable[str] | None) -> list[tuple[str, nn.Parameter]]:
    if isinstance(params, str):
        raise TypeError("params must be an iterable of parameter names, not a single string")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return named
    wanted = set(params)
    unknown = wanted - {n for n, _ in named}
    if unknown:
        raise ValueError(f"params names no trainable parameter of the model: {sorted(unknown)[:3]}")
    return [(n, p) for n, p in named if n in wanted]


def parameter_sensitivity(model: nn.Module, loss_fn: Callable, batches: Iterable, max_batches: int = 100, *,
                          train_mode: bool = False, params: Iterable[str] | None = None,
                          progress: bool | None = None) -> Sensitivity:
    """name -> |θ ⊙ ∇θ L| (float32), averaged over the first `max_batches` batches.

    loss_fn(model, batch) must return a scalar loss tensor; batches may be any iterable (a list,
    a DataLoader, a generator: at most max_batches items are drawn). The model runs in eval mode
    unless train_mode (dropout then differs per batch); its mode and every parameter's .grad are
    restored afterwards, so this can run in the middle of training. `params` restricts the
    measurement to the named trainable parameters. A parameter the loss does not reach gets
    sensitivity zero. progress: tqdm bar (None: only on a terminal).
    """
    _check_model(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be a positive int, got {max_batches!r}")
    named = _named_params(model, params)
    if not named:
        raise ValueError("the model has no trainable parameters to measure")
    tensors = [p for _, p in named]
    # torch.autograd.grad leaves .grad alone; the copies guard against a loss_fn that calls backward
    saved = [None if p.grad is None else p.grad.detach().clone() for p in tensors]
    was_training = model.training
    total = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    count = 0
    total_hint = min(max_batches, len(batches)) if hasattr(batches, "__len__") else max_batches
    try:
        model.train(train_mode)
        with torch.enable_grad():
            for batch in _progress(itertools.islice(batches, max_batches), progress,
                                   total=total_hint, desc="sensitivity"):
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError("loss_fn must return a scalar tensor, got "
                                     f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
                if not loss.requires_grad:
                    raise ValueError("the loss returned by loss_fn does not depend on the parameters "
                                     "(it has no grad_fn: was it computed under torch.no_grad()?)")
                grads = torch.autograd.grad(loss.reshape(()), tensors, allow_unused=True)
                for acc, p, g in zip(total, tensors, grads):
                    if g is not None:
                        acc.add_((p.detach().float() * g.float()).abs_())
                count += 1
    finally:
        model.train(was_training)
        for p, g in zip(tensors, saved):
            p.grad = g
    if count == 0:
        raise ValueError("batches is empty: no batch to measure the sensitivity on")
    return {n: t.div_(count) for (n, _), t in zip(named, total)}


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


class SensitivityTracker:
    """The paper's Fig. 2 during training: every `every` steps, the mean sensitivity of the
    current top 20% of parameters, of the other 80%, and the std (top `exclude_top` removed).

        loss.backward()
        tracker.step(step)        # reads the .grad already there: no extra backward
        optimizer.step()

    Call it before optimizer.step() (after it, θ has moved and θ·∇ mixes two steps) and after
    unscaling when using a GradScaler (scaled gradients scale every number). With gradient
    accumulation, .grad holds the whole step's gradient, which is what is measured. With loss_fn
    given, tracker.step(step, batch) measures on that batch instead, with its own backward
    (parameter_sensitivity, in the model's current mode), leaving .grad untouched.
    With transformers: trainer.add_callback(tracker.as_trainer_callback()).
    """

    def __init__(self, model: nn.Module, every: int = 100, loss_fn: Callable | None = None, *,
                 params: Iterable[str] | None = None, exclude_top: float = 0.01):
        _check_model(model)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) or None, got {type(loss_fn).__name__}")
        self.model, self.every, self.loss_fn = model, every, loss_fn
        self.params = None if params is None else list(params)
        self.exclude_top = _check_fraction(exclude_top, "exclude_top", upper_open=True)
        _named_params(model, self.params)  # fail now on unknown names, not mid-training
        self.history: list[dict] = []

    def _current(self, batch) -> Sensitivity:
        if batch is not None:
            if self.loss_fn is None:
                raise ValueError("a batch was given but the tracker has no loss_fn to compute its loss")
            return parameter_sensitivity(self.model, self.loss_fn, [batch], 1, train_mode=self.model.training,
                                         params=self.params, progress=False)
        sens = {n: (p.detach() * p.grad.detach()).abs() for n, p in _named_params(self.model, self.params)
                if p.grad is not None}
        if not sens:
            raise ValueError("no parameter has a .grad: call tracker.step() after loss.backward() and before "
                             "optimizer.zero_grad(), or give the tracker a loss_fn and pass a batch")
        return sens

    def step(self, step: int, batch=None) -> dict | None:
        """Record step `step` if it is a multiple of `every`; returns the record or None."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if step % self.every:
            return None
        top20, rest, std = _split_stats(_flat(self._current(batch)), self.exclude_top)
        record = {"step": step, "top20_mean": top20, "rest_mean": rest, "std": std}
        self.history.append(record)
        return record

    def to_dict(self) -> dict:
        return {"every": self.every, "exclude_top": self.exclude_top, "history": [dict(h) for h in self.history]}

    def as_trainer_callback(self):
        """A transformers.TrainerCallback feeding this tracker (transformers is imported only here).

        It records in on_pre_optimizer_step (transformers >= 4.42), the one event at which the
        step's gradients exist and θ has not moved yet; by on_step_end the Trainer has zeroed them.
        The step recorded is the global step the update completes (state.global_step + 1).
        """
        try:
            from transformers import TrainerCallback
        except ImportError as e:
            raise ImportError("as_trainer_callback needs `pip install transformers`") from e
        tracker = self

        class _SensitivityCallback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                tracker.step(int(state.global_step) + 1)
                return control

        return _SensitivityCallback()


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
    for fraction in _progress(fractions, progress, desc="pruning"):
        with prune_by_sensitivity(model, sensitivity, fraction):
            curve.append((fraction, float(evaluate(model))))
    return curve


# --------------------------------------------------------------------------- plots

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


# --------------------------------------------------------------------------- CLI

def _load(spec: str):
    module, sep, func = spec.partition(":")
    if not sep or not module or not func:
        raise SystemExit(f"--loader must be module:function, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--loader {spec!r}: {e}") from e


def _labels(checkpoints: list[str], given: list[str] | None) -> list[str]:
    if given is not None:
        if len(given) != len(checkpoints) or len(set(given)) != len(given):
            raise SystemExit("--labels must give one distinct label per checkpoint")
        return given
    # runs/<name>/checkpoint.pt -> <name>; a directory -> its name; collisions fall back to the path
    labels = [Path(c).name if Path(c).is_dir() else (Path(c).parent.name or Path(c).stem) for c in checkpoints]
    if len(set(labels)) != len(labels):
        labels = [str(Path(c)) for c in checkpoints]
    return labels


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() is often empty there
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}"


def _mean_loss(loss_fn, batches):
    @torch.no_grad()
    def evaluate(model):
        was_training = model.training
        model.eval()
        try:
            return sum(float(loss_fn(model, b)) for b in batches) / len(batches)
        finally:
            model.train(was_training)
    return evaluate


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m intradistill_kernels.sensitivity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--loader", required=True,
                    help="module:function mapping a checkpoint path to (model, loss_fn, batches[, evaluate])")
    ap.add_argument("--out", default="runs/sensitivity", help="directory for sensitivity.json and the PNGs")
    ap.add_argument("--max-batches", type=int, default=100, help="batches for the sensitivity and the default metric")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                    help="fractions of parameters to prune, least sensitive first")
    ap.add_argument("--labels", nargs="+", help="one label per checkpoint (default: the checkpoint's directory name)")
    args = ap.parse_args(argv)
    if args.max_batches < 1:
        ap.error("--max-batches must be >= 1")
    if any(not 0 <= f <= 1 for f in args.fractions):
        ap.error("--fractions must lie in [0, 1]")
    loader = _load(args.loader)
    labels = _labels(args.checkpoints, args.labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sens, curves, models = {}, {}, {}
    for label, ckpt in zip(labels, args.checkpoints):
        loaded = loader(ckpt)
        if not isinstance(loaded, tuple) or len(loaded) not in (3, 4):
            raise SystemExit(f"the loader must return (model, loss_fn, batches[, evaluate]), got {type(loaded).__name__}")
        model, loss_fn, batches = loaded[:3]
        batches = list(itertools.islice(batches, args.max_batches))
        evaluate = loaded[3] if len(loaded) == 4 else _mean_loss(loss_fn, batches)
        sens[label] = parameter_sensitivity(model, loss_fn, batches, args.max_batches)
        curves[label] = pruning_curve(model, sens[label], evaluate, args.fractions)
        models[label] = {"checkpoint": ckpt, "batches": len(batches),
                         "parameters": int(sum(t.numel() for t in sens[label].values())),
                         "balance": asdict(contribution_balance(sens[label])),
                         "pruning": [list(point) for point in curves[label]],
                         "metric": "evaluate(model) from the loader" if len(loaded) == 4 else "mean loss over the batches"}
    plots = [plot_sensitivity_violins(sens, out / "sensitivity_violins.png"),
             plot_pruning_curves(curves, out / "pruning_curves.png",
                                 ylabel="mean loss" if len(loaded) == 3 else "metric")]
    summary = {"machine": _machine(),
               "loader": args.loader, "fractions": args.fractions, "models": models,
               "plots": [str(p) for p in plots]}
    (out / "sensitivity.json").write_text(json.dumps(summary, indent=2))
    print("| model | sensitivity std (top 1% removed) | top-20% mean | rest mean | " +
          " | ".join(f"pruned {100 * f:g}%" for f in args.fractions) + " |")
    print("| --- " * (4 + len(args.fractions)) + "|")
    for label, s in models.items():
        b = s["balance"]
        print(f"| {label} | {b['std']:.3e} | {b['top20_mean']:.3e} | {b['rest_mean']:.3e} | " +
              " | ".join(f"{m:.4f}" for _, m in s["pruning"]) + " |")
    print(f"summary: {out / 'sensitivity.json'}; plots: {', '.join(str(p) for p in plots)}")
    return summary


if __name__ == "__main__":
    main()
