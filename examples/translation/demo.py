"""`make demo-translation`: baseline vs intra-distillation on real German->English pairs.

Trains the demo preset twice with the same seed and the same number of steps, once with the
plain label-smoothed cross-entropy and once with intra-distillation (K = 3 passes, X-divergence,
adaptive alpha), evaluates both on the same held-out test pairs, and prints a table. Everything is
measured by this run; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import intradistill_kernels as idk

from . import train

PRUNE_FRACTIONS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--steps", type=int, default=None, help="training steps per method (preset default)")
    ap.add_argument("--max-test-pairs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    # One thread: the demo model is too small to gain from more, and on a busy machine extra
    # threads spin-wait for each other (30x slower steps measured on a shared 2-core box).
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true")
    opts = ap.parse_args(argv)
    out = Path(opts.out)
    started = time.perf_counter()
    print(f"intradistill-kernels demo: backends available here: {idk.available_backends()}", flush=True)

    reports = []
    for method in ("baseline", "intra-distillation"):
        argv_run = ["--preset", "demo", "--method", method, "--seed", str(opts.seed), "--out", str(out / method)]
        if opts.steps:
            argv_run += ["--max-steps", str(opts.steps)]
        if opts.max_test_pairs:
            argv_run += ["--max-test-pairs", str(opts.max_test_pairs)]
        if opts.no_progress:
            argv_run.append("--no-progress")
        if opts.threads:
            argv_run += ["--threads", str(opts.threads)]
        print(f"\n== {method} ==", flush=True)
        reports.append(train.run(train.parse_args(argv_run)))

    plot = train.plot_validation(reports, out / "valid_loss.png")
    table = train.markdown_report(reports)
    (out / "summary.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k not in ("history", "examples")} for r in reports], indent=2))
    extra = _sensitivity(reports, out)
    print(f"\nGerman->English (Debian trans-de-en), {reports[0]['train_pairs']} training pairs, "
          f"{reports[0]['test_pairs']} held-out test pairs, {reports[0]['steps']} steps each, seed {opts.seed}:\n")
    print(table)
    print(f"validation-loss plot: {plot}")
    for line in extra:
        print(line)
    print(f"reports: {out}/<method>/report.json, {out}/summary.md; total time {time.perf_counter() - started:.0f} s")
    return 0


def _sensitivity(reports, out: Path) -> list[str]:
    """The paper's contribution-balance comparison: sensitivity std and one-shot pruning curves
    (validation loss after zeroing the least sensitive parameters)."""
    try:
        from intradistill_kernels import sensitivity
    except ImportError:  # the sensitivity toolkit is optional for the demo
        return ["(intradistill_kernels.sensitivity not importable: sensitivity comparison skipped)"]

    curves, sens, lines = {}, {}, []
    for r in reports:
        model, loss_fn, batches = train.sensitivity_inputs(r["checkpoint"])
        s = sensitivity.parameter_sensitivity(model, loss_fn, batches)
        sens[r["method"]] = s
        balance = sensitivity.contribution_balance(s)
        lines.append(f"{r['method']}: sensitivity std (top 1% removed) {balance.std:.3e}, "
                     f"top-20% mean {balance.top20_mean:.3e}, rest mean {balance.rest_mean:.3e}")

        @torch.no_grad()
        def evaluate(m, loss_fn=loss_fn, batches=batches):
            m.eval()
            return sum(float(loss_fn(m, b)) for b in batches) / len(batches)

        curves[r["method"]] = sensitivity.pruning_curve(model, s, evaluate, PRUNE_FRACTIONS)
        lines.append(f"{r['method']}: validation loss after pruning " + ", ".join(
            f"{100 * f:.0f}%: {m:.3f}" for f, m in curves[r["method"]]))
    lines.append(f"sensitivity violins: {sensitivity.plot_sensitivity_violins(sens, out / 'sensitivity_violins.png')}")
    lines.append(f"pruning curves: {sensitivity.plot_pruning_curves(curves, out / 'pruning_curves.png')}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
