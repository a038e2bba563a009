"""Writing a run: results.json, results.md, the plot, and the generated results section of
benchmarks/README.md when the run writes into a source checkout's benchmarks/results/."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
from pathlib import Path

import torch

CHECKOUT_BENCHMARKS = Path(__file__).resolve().parent
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def device_name(device: str) -> str:
    """A file-name-safe name of the device: the GPU's name, or the CPU model and core count."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        model = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"{model} {os.cpu_count()}-core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_out_dir(device: str) -> Path:
    """benchmarks/results/<device>-<date> in a source checkout (where results are committed),
    else benchmark-results/<device>-<date> under the current directory."""
    results = CHECKOUT_BENCHMARKS / "results"
    base = results if results.is_dir() else Path.cwd() / "benchmark-results"
    return base / f"{device_name(device)}-{dt.date.today().isoformat()}"


def load_average() -> str | None:
    """The 1, 5 and 15 minute load averages ("0.52 0.61 0.70"), None where unknown."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return None


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def _spread(r) -> str:
    """The per-call spread of a CPU forward+backward row: "min-max (calls)"."""
    if r.get("min_ms") is None:
        return ""
    return f"{r['min_ms']:.2f}-{r['max_ms']:.2f} ({r['calls']})"


def _load_note(meta) -> str:
    loads = meta.get("load_average") or []
    return f" Load average at the start and end: {' / '.join(str(x) for x in loads)}." if any(loads) else ""


def markdown(meta, rows) -> str:
    lines = [f"Device: `{meta['device']}`, {meta['date']}, torch {meta['torch']}, {meta['threads']} threads; "
             f"backends {meta['backends']}." + _load_note(meta), "",
             "| K | N | V | dtype | loss | mode | contender | ms | min-max ms (calls) | GB/s (minimal bytes) | % copy BW | x CPU floor | peak extra MB | speed-up vs paper eager | rel. error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "mode" not in r:
            lines.append(f"| {r['K']} | {r['N']} | {r['V']} | {r['dtype']} | | | {r.get('contender', '')} | skipped: {r['skipped']} | | | | | | | |")
            continue
        status = _fmt(r.get("ms"), ".2f") if r["correct"] else "WRONG RESULT: not timed"
        lines.append(
            f"| {r['K']} | {r['N']} | {r['V']} | {r['dtype']} | {r['loss']} | {r['mode']} | {r['contender']} | {status} | {_spread(r)} | "
            f"{_fmt(r.get('gbps'), '.1f')} | {_fmt(r.get('pct_copy_bw'), '.0f')} | {_fmt(r.get('x_floor'), '.2f')} | "
            f"{_fmt(r.get('peak_extra_mb'), '.0f')} | {_fmt(r.get('speedup_vs_paper_eager'), '.1f')} | {r['rel_error']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(rows, out: Path) -> Path | None:
    """Bar chart of CE + X forward+backward time per shape and contender (log scale)."""
    try:
        import matplotlib
    except ImportError:  # the tables are the result; the plot is a view of them
        print("matplotlib is not installed: no plot written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("ms") and r["mode"] == "forward+backward" and r["loss"] == "ce+x"]
    shapes = sorted({(r["K"], r["N"], r["V"], r["dtype"]) for r in timed})
    names = sorted({r["contender"] for r in timed})
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(shapes)), 4))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        ys = [next((r["ms"] for r in timed if (r["K"], r["N"], r["V"], r["dtype"]) == s and r["contender"] == name), 0)
              for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"K={k} N={n}\nV={v} {d}" for k, n, v, d in shapes], fontsize=8)
    ax.set_yscale("log")
    return save_plot(fig, ax, out / "time_fwd_bwd.png", ylabel="forward+backward time (ms, log)",
                     title="CE + X-divergence, forward+backward", legend_size=7)


def save_plot(fig, ax, path: Path, *, ylabel: str, title: str, legend_size: int, xlabel: str | None = None) -> Path:
    """Labels, legend, and the PNG written (dpi 120); the figure is closed."""
    import matplotlib.pyplot as plt

    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "results.md").write_text(markdown(meta, rows))
    plot(rows, out)


def _index_line(folder: Path) -> str:
    """- `folder`: [results.md](results/folder/results.md), ... (its first line: device and date)."""
    files = sorted(f for f in folder.iterdir() if f.suffix in (".md", ".png"))
    links = ", ".join(f"[{f.name}](results/{folder.name}/{f.name})" for f in files)
    first = (folder / "results.md").read_text().splitlines()[0] if (folder / "results.md").is_file() else ""
    return f"- `{folder.name}`: {links}" + (f"  \n  {first}" if first else "")


def update_readme(out: Path) -> bool:
    """Rewrites the generated section of benchmarks/README.md, an index of every results folder
    (device, date and links to its tables and plots; the tables stay in their own files), if
    `out` lies in this checkout's benchmarks/results/; returns whether it did."""
    readme, results = CHECKOUT_BENCHMARKS / "README.md", CHECKOUT_BENCHMARKS / "results"
    if out.resolve().parent != results.resolve() or not readme.is_file():
        return False
    text = readme.read_text()
    if README_BEGIN not in text:
        return False
    body = "\n".join(_index_line(folder) for folder in sorted(p for p in results.iterdir() if p.is_dir()))
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_BEGIN}\n<!-- written by python -m benchmarks.run; do not edit -->\n\n"
                      f"{body}\n{README_END}{tail}")
    return True

