"""`make demo`: baseline vs intra-distillation where the baseline overfits.

Fine-tunes the real pretrained all-MiniLM-L6-v2 (its first 3 layers by default) on a few hundred
real labelled movie-review snippets (positive or negative), once with plain cross-entropy and
once with intra-distillation (K = 3, X-divergence, alpha 5 reached adaptively), for several seeds,
with the same model, data, batches, steps and dropout (0.3). Each run keeps its checkpoint with the
lowest validation loss; the test split is read only at the end, for that checkpoint and for the
final one. Prints one table (mean and spread over seeds), writes the validation curves and
compares parameter sensitivity. Everything printed is measured by this run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path

import torch

import intradistill_kernels as idk
from intradistill_kernels._progress import progress_bar

from . import finetune

PRUNE_FRACTIONS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
TASK_NAMES = {"sst5": "five-class sentiment", "sst2": "binary sentiment"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    # Seeds 1-4 chose the regime (examples/demo/README.md); the default ones played no part in it.
    ap.add_argument("--seeds", default="5,6,7", help="comma-separated training seeds (data splits do not change)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="runs trained at the same time, each in its own process")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run (default: the CPU cores divided among the jobs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cache-dir", default=None, help="where the vaderSentiment archive is fetched")
    ap.add_argument("--no-sensitivity", action="store_true", help="skip the parameter-sensitivity comparison")
    ap.add_argument("--no-progress", action="store_true")
    defaults = finetune.Regime()
    for f in fields(finetune.Regime):
        kind = str if f.name == "task" else (float if isinstance(getattr(defaults, f.name), float) else int)
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=getattr(defaults, f.name),
                        help=f"(default {getattr(defaults, f.name)})")
    opts = ap.parse_args(argv)
    try:
        opts.seeds = [int(s) for s in opts.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {opts.seeds!r}")
    if not opts.seeds or len(set(opts.seeds)) != len(opts.seeds):
        ap.error("--seeds must name at least one seed, each once")
    if opts.jobs < 1 or (opts.threads is not None and opts.threads < 1):
        ap.error("--jobs and --threads must be >= 1")
    opts.regime = finetune.Regime(**{f.name: getattr(opts, f.name) for f in fields(finetune.Regime)})
    try:
        opts.regime.check()
    except ValueError as exc:
        ap.error(str(exc))
    return opts


# --------------------------------------------------------------------------- training runs

def _worker(method, seed, regime, data, device, threads, run_dir, save_model, updates):
    torch.set_num_threads(threads)
    result = finetune.run(method, seed, regime, data, device=device, progress=False,
                          keep_model=save_model, on_step=updates.put if updates else None)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if save_model:
        torch.save(result.pop("model").state_dict(), run_dir / "best.pt")
        result.pop("final_model")
        result["checkpoint"] = str(run_dir / "best.pt")
    # written as soon as the run ends: a long demo interrupted later keeps what it measured
    (run_dir / "report.json").write_text(json.dumps(result, indent=1))
    return result


def train_all(opts, data) -> list[dict]:
    """Every (method, seed) run, `jobs` at a time in separate processes: one process per run also
    makes each run's peak memory its own."""
    jobs = [(m, s) for s in opts.seeds for m in finetune.METHODS]
    # The K-pass runs first: they are the longest, and the short ones fill in behind them.
    jobs.sort(key=lambda job: job[0] == "baseline")
    threads = opts.threads or max(1, (os.cpu_count() or 1) // min(opts.jobs, len(jobs)))
    out = Path(opts.out)
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with ctx.Manager() as manager, ProcessPoolExecutor(min(opts.jobs, len(jobs)), mp_context=ctx) as pool:
        updates = manager.Queue()
        futures = [pool.submit(_worker, m, s, opts.regime, data, opts.device, threads, out / f"{m}-seed{s}",
                               not opts.no_sensitivity and s == opts.seeds[0], updates) for m, s in jobs]
        bar = progress_bar(total=len(jobs) * opts.regime.steps, desc=f"{len(jobs)} runs, {opts.regime.steps} steps each",
                           enabled=not opts.no_progress, dynamic_ncols=True)
        while not all(f.done() for f in futures):
            try:
                bar.update(updates.get(timeout=0.5))
            except queue.Empty:
                pass
        bar.close()
        results = [f.result() for f in futures]
    order = {(m, s): i for i, (s, m) in enumerate((s, m) for s in opts.seeds for m in finetune.METHODS)}
    return sorted(results, key=lambda r: order[(r["method"], r["seed"])])


# --------------------------------------------------------------------------- report

def _mean_sd(values) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summary_table(results: list[dict]) -> str:
    """One row per method: mean ± sample standard deviation over seeds."""
    lines = ["| method | K | seeds | test accuracy, best ckpt | test accuracy, final | valid loss, best | "
             "valid loss, final | best step | train time (s) | peak memory (MB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in finetune.METHODS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        col = lambda f: _mean_sd([f(r) for r in runs])  # noqa: E731
        lines.append(
            f"| {method} | {runs[0]['passes']} | {len(runs)} | {col(lambda r: r['best']['test_accuracy'])} | "
            f"{col(lambda r: r['final']['test_accuracy'])} | {col(lambda r: r['best']['valid_loss'])} | "
            f"{col(lambda r: r['final']['valid_loss'])} | {statistics.mean(r['best']['step'] for r in runs):.0f} | "
            f"{statistics.mean(r['train_time_s'] for r in runs):.0f} | "
            f"{statistics.mean(r['peak_memory_mb'] for r in runs):.0f} |")
    return "\n".join(lines) + "\n"


def per_seed_lines(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        lines.append(f"{r['method']:>18} seed {r['seed']}: test accuracy {r['best']['test_accuracy']:.3f} at best step "
                     f"{r['best']['step']} (valid loss {r['best']['valid_loss']:.3f}), "
                     f"{r['final']['test_accuracy']:.3f} at the end (valid loss {r['final']['valid_loss']:.3f})")
    return lines


def plot_curves(results: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"baseline": "tab:blue", "intra-distillation": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    seeds = sorted({r["seed"] for r in results})
    for r in results:
        epochs = [h["epoch"] for h in r["history"]]
        style = dict(color=colors[r["method"]], linestyle=styles[seeds.index(r["seed"]) % len(styles)],
                     label=f"{r['method']} (seed {r['seed']})")
        ax_loss.plot(epochs, [h["valid_loss"] for h in r["history"]], **style)
        ax_acc.plot(epochs, [h["valid_accuracy"] for h in r["history"]], **style)
        best = next(h for h in r["history"] if h["step"] == r["best"]["step"])
        ax_loss.plot([best["epoch"]], [best["valid_loss"]], marker="o", color=colors[r["method"]])
    ax_loss.set_ylabel("validation cross-entropy (o: best checkpoint)")
    ax_acc.set_ylabel("validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sensitivity_lines(results: list[dict], data: dict, regime, out: Path, device) -> list[str]:
    """The paper's contribution-balance comparison on each method's best checkpoint (first seed):
    sensitivity std and one-shot pruning curves (validation loss after zeroing the least sensitive
    parameters)."""
    try:
        from intradistill_kernels import sensitivity
    except ImportError:  # the sensitivity toolkit is optional for the demo
        return ["(intradistill_kernels.sensitivity not importable: sensitivity comparison skipped)"]
    from . import sentiment

    pad = data["pad_id"]
    valid = data["valid"]
    batches = [sentiment.collate(valid[i:i + 32], pad) for i in range(0, len(valid), 32)]

    def loss_fn(m, batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        return torch.nn.functional.cross_entropy(m(**batch).logits.float(), labels)

    sens, curves, lines = {}, {}, []
    for r in results:
        if "checkpoint" not in r:
            continue
        model = sentiment.load_model(data["num_labels"], regime.layers, regime.dropout).to(device)
        model.load_state_dict(torch.load(r["checkpoint"], map_location=device))
        s = sensitivity.parameter_sensitivity(model, loss_fn, batches, progress=False)
        sens[r["method"]] = s
        balance = sensitivity.contribution_balance(s)
        lines.append(f"{r['method']}: sensitivity std (top 1% removed) {balance.std:.3e}, "
                     f"top-20% mean {balance.top20_mean:.3e}, rest mean {balance.rest_mean:.3e}")
        curves[r["method"]] = sensitivity.pruning_curve(
            model, s, lambda m: finetune.evaluate(m, valid, pad, device)["loss"], PRUNE_FRACTIONS, progress=False)
        lines.append(f"{r['method']}: validation loss after pruning " + ", ".join(
            f"{100 * f:.0f}%: {v:.3f}" for f, v in curves[r["method"]]))
    if sens:
        lines.append(f"sensitivity violins: {sensitivity.plot_sensitivity_violins(sens, out / 'sensitivity_violins.png')}")
        lines.append(f"pruning curves: {sensitivity.plot_pruning_curves(curves, out / 'pruning_curves.png')}")
    return lines


def _model_name(regime) -> str:
    return "all-MiniLM-L6-v2" + (f" (first {regime.layers} layers)" if regime.layers else "")


def main(argv=None) -> int:
    opts = parse_args(argv)
    started = time.perf_counter()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    regime = opts.regime
    print(f"intradistill-kernels demo: backends available here: {idk.available_backends()}", flush=True)
    data = finetune.prepare(regime, opts.cache_dir)
    print(f"{TASK_NAMES[regime.task]} ({regime.task}): {len(data['train'])} training, {len(data['valid'])} validation, "
          f"{len(data['test'])} test snippets; {_model_name(regime)}; {regime.steps} steps of batch {regime.batch_size} "
          f"({regime.epochs:g} epochs) per run; seeds {opts.seeds}", flush=True)

    results = train_all(opts, data)
    table = summary_table(results)
    (out / "summary.md").write_text(table)
    (out / "summary.json").write_text(json.dumps({"regime": asdict(regime), "seeds": opts.seeds, "runs": results},
                                                 indent=1))
    title = (f"{regime.task}, {len(data['train'])} training snippets, {_model_name(regime)}: "
             f"validation loss and accuracy")
    plot = plot_curves(results, out / "validation_curves.png", title)
    extra = [] if opts.no_sensitivity else sensitivity_lines(results, data, regime, out, opts.device)

    threads = results[0]["threads"]
    print(f"\n{TASK_NAMES[regime.task]} on real movie-review snippets (vaderSentiment 3.3.2), {_model_name(regime)}, "
          f"{len(data['train'])} training / {len(data['valid'])} validation / {len(data['test'])} test snippets, "
          f"{regime.steps} steps each, dropout {results[0]['dropout']:g}, intra-distillation alpha {regime.alpha:g} "
          f"(p {regime.p:g}, q {regime.q:g}), seeds {opts.seeds}; test accuracy of the checkpoint with the "
          f"lowest validation loss and of the last one; mean ± sd over seeds "
          f"({min(opts.jobs, len(results))} runs at a time, {threads} thread(s) each):\n")
    print(table)
    for line in per_seed_lines(results):
        print(line)
    print(f"validation curves: {plot}")
    for line in extra:
        print(line)
    print(f"reports: {out}/<method>-seed<seed>/report.json, {out}/summary.md; "
          f"total time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
