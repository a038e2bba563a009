"""Compare the sensitivity of saved checkpoints: balance statistics, pruning curves, plots.

    intradistill-sensitivity CKPT [CKPT ...] --loader module:function --out DIR
    python -m intradistill_kernels.sensitivity CKPT [CKPT ...] --loader module:function --out DIR

where the loader maps a checkpoint path to (model, loss_fn, batches) and optionally a fourth
element evaluate(model) -> float (default: the mean loss over the batches, model in eval mode).
Writes sensitivity.json, sensitivity_violins.png and pruning_curves.png into --out and prints a
Markdown table. See docs/sensitivity.md.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .balance import contribution_balance
from .measure import parameter_sensitivity
from .plots import plot_pruning_curves, plot_sensitivity_violins
from .pruning import pruning_curve


def _load(spec: str):
    module, sep, func = spec.partition(":")
    if not sep or not module or not func:
        raise SystemExit(f"--loader must be module:function, got {spec!r}")
    # `python -m` puts the current directory on sys.path, an installed console script does not;
    # the loader's module is named relative to where the command runs in both cases
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
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


def _parser(prog: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--loader", required=True,
                    help="module:function mapping a checkpoint path to (model, loss_fn, batches[, evaluate])")
    ap.add_argument("--out", default="runs/sensitivity", help="directory for sensitivity.json and the PNGs")
    ap.add_argument("--max-batches", type=int, default=100, help="batches for the sensitivity and the default metric")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                    help="fractions of parameters to prune, least sensitive first")
    ap.add_argument("--labels", nargs="+", help="one label per checkpoint (default: the checkpoint's directory name)")
    return ap


def _measure_checkpoint(loader, ckpt: str, args) -> tuple[dict, list, dict]:
    """(sensitivity, pruning curve, the summary record) of one checkpoint."""
    loaded = loader(ckpt)
    if not isinstance(loaded, tuple) or len(loaded) not in (3, 4):
        raise SystemExit(f"the loader must return (model, loss_fn, batches[, evaluate]), got {type(loaded).__name__}")
    model, loss_fn, batches = loaded[:3]
    batches = list(itertools.islice(batches, args.max_batches))
    own_metric = len(loaded) == 4
    evaluate = loaded[3] if own_metric else _mean_loss(loss_fn, batches)
    sens = parameter_sensitivity(model, loss_fn, batches, args.max_batches)
    curve = pruning_curve(model, sens, evaluate, args.fractions)
    record = {"checkpoint": ckpt, "batches": len(batches),
              "parameters": int(sum(t.numel() for t in sens.values())),
              "balance": asdict(contribution_balance(sens)),
              "pruning": [list(point) for point in curve],
              "metric": "evaluate(model) from the loader" if own_metric else "mean loss over the batches"}
    return sens, curve, record


def _print_table(models: dict, fractions: list[float]) -> None:
    print("| model | sensitivity std (top 1% removed) | top-20% mean | rest mean | " +
          " | ".join(f"pruned {100 * f:g}%" for f in fractions) + " |")
    print("| --- " * (4 + len(fractions)) + "|")
    for label, s in models.items():
        b = s["balance"]
        print(f"| {label} | {b['std']:.3e} | {b['top20_mean']:.3e} | {b['rest_mean']:.3e} | " +
              " | ".join(f"{m:.4f}" for _, m in s["pruning"]) + " |")


def main(argv=None, *, prog: str | None = None) -> dict:
    """Runs the command line (argv: its arguments, default sys.argv[1:]); returns the summary
    written to sensitivity.json."""
    ap = _parser(prog)
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
        sens[label], curves[label], models[label] = _measure_checkpoint(loader, ckpt, args)
    mean_loss_only = all(m["metric"] == "mean loss over the batches" for m in models.values())
    plots = [plot_sensitivity_violins(sens, out / "sensitivity_violins.png"),
             plot_pruning_curves(curves, out / "pruning_curves.png", ylabel="mean loss" if mean_loss_only else "metric")]
    summary = {"machine": _machine(),
               "loader": args.loader, "fractions": args.fractions, "models": models,
               "plots": [str(p) for p in plots]}
    (out / "sensitivity.json").write_text(json.dumps(summary, indent=2))
    _print_table(models, args.fractions)
    print(f"summary: {out / 'sensitivity.json'}; plots: {', '.join(str(p) for p in plots)}")
    return summary


def command() -> None:
    """The installed `intradistill-sensitivity` command: main() without its return value, which a
    console script hands to sys.exit (a dict there prints it and exits with status 1)."""
    main()
