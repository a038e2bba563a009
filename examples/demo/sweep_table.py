"""The table of every regime tried for the demo, from the runs' own reports.

    python -m examples.demo.sweep_table examples/demo/results

Each folder under the results directory is one `python -m examples.demo.run --no-sensitivity ...`
output (its <method>-seed<seed>/report.json files); the regime columns are read from the reports,
so a row cannot disagree with the run it describes.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _mean_sd(values, scale=100.0) -> str:
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def load_runs(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*-seed*/report.json"))]


def overfits(run: dict) -> bool:
    """Validation loss passes its minimum before the last evaluation and ends above it."""
    losses = [h["valid_loss"] for h in run["history"]]
    return losses.index(min(losses)) < len(losses) - 1 and losses[-1] > min(losses)


def row(name: str, runs: list[dict]) -> str | None:
    by = {m: sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
          for m in ("baseline", "intra-distillation")}
    if not by["baseline"] or not by["intra-distillation"]:
        return None
    g = by["baseline"][0]["regime"]
    seeds = sorted({r["seed"] for r in by["baseline"]} & {r["seed"] for r in by["intra-distillation"]})
    pick = {m: [r for r in by[m] if r["seed"] in seeds] for m in by}
    paired = [i["best"]["test_accuracy"] - b["best"]["test_accuracy"]
              for b, i in zip(pick["baseline"], pick["intra-distillation"])]
    paired_final = [i["final"]["test_accuracy"] - b["final"]["test_accuracy"]
                    for b, i in zip(pick["baseline"], pick["intra-distillation"])]
    cells = [name, g["task"], str(g["train_size"]), str(g["layers"] or 6), f"{by['baseline'][0]['dropout']:g}", f"{g['epochs']:g}",
             str(pick["baseline"][0]["steps"]), f"{g['lr']:g}", f"{g['alpha']:g}", str(g["passes"]), str(len(seeds)),
             f"{sum(overfits(r) for r in pick['baseline'])}/{len(seeds)}"]
    # Validation first: the regime is chosen on these; the test columns only report.
    cells += [" / ".join(f"{statistics.mean(r['best']['valid_loss'] for r in pick[m]):.3f}" for m in by),
              " / ".join(f"{100 * statistics.mean(r['history'][-1]['valid_accuracy'] for r in pick[m]):.1f}" for m in by)]
    for m in by:
        cells += [_mean_sd([r["best"]["test_accuracy"] for r in pick[m]]),
                  _mean_sd([r["final"]["test_accuracy"] for r in pick[m]])]
    cells += [_mean_sd(paired), _mean_sd(paired_final)]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| run | task | train | layers | dropout | epochs | steps | lr | alpha | K | seeds | baseline overfits | "
          "valid loss, best ckpt (baseline / intra-dist.) | valid acc, final (baseline / intra-dist.) | "
          "baseline acc, best ckpt | baseline acc, final | intra-dist. acc, best ckpt | intra-dist. acc, final | "
          "difference, best ckpt | difference, final |")


def table(results_dir: Path) -> str:
    lines = [HEADER, "|" + " --- |" * (HEADER.count("|") - 1)]
    for folder in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        line = row(folder.name, load_runs(folder))
        if line:
            lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results_dir = Path(argv[0] if argv else Path(__file__).parent / "results")
    if not results_dir.is_dir():
        raise SystemExit(f"no results directory at {results_dir}")
    print(table(results_dir), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
