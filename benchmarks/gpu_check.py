"""`make gpu-check`: what a lent GPU must prove, in one command and a few minutes.

    python -m benchmarks.gpu_check                  # on a GPU machine
    python -m benchmarks.gpu_check --device cpu --dry-run --out DIR

1. The GPU test subset (every loss test on cuda tensors with compiled Triton and the CUDA kernel,
   no host syncs, CUDA graphs, two GPUs where present), run with pytest; its summary is kept.
2. The benchmark grid (grid.GPU_CHECK_SHAPES, bf16 and fp32, forward / backward / both, peak
   memory) against the paper's eager formula, torch.compile of it (on K = 3, N = 4096 only:
   each shape is a new compilation) and Liger-Kernel's JSD where installed.
3. The performance targets on their own shapes: bf16, K = 3, 8192 tokens, V = 128256, and the
   fused-linear loss at H = 4096 against a plain matmul + the fused loss, Liger's fused-linear JSD
   and cut-cross-entropy's linear_cross_entropy (CE alone: the floor of any fused-linear loss).
4. Next to each measured CE + X forward+backward time of our Triton and CUDA backends, the static
   model's prediction for it (benchmarks/gpu_model.py, its committed table): the first GPU run
   checks the model too.

Optional contenders are used where importable and named with the reason otherwise. Everything
after the tests runs against a deadline (--budget-s): cases left over are written as skipped, so
the command ends in time on any GPU. Writes results.md, results.json, tests.log and plots into
--out (default benchmarks/results/<gpu>-<date>/ in a checkout). --dry-run runs the same code on
tiny shapes without pytest: what `make test` checks on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import intradistill_kernels as idk

from . import gpu_model, measure, report

from .grid import Grid, gpu_check_grid
from .run import base_parser, measure_shape, run_metadata

ROOT = Path(__file__).resolve().parents[1]
# The targets of the request, on H100/H200-class GPUs.
TARGET_SHAPE = {"K": 3, "N": 8192, "V": 128256}
FUSED_LINEAR_SHAPE = {"K": 3, "N": 8192, "H": 4096, "V": 128256}
DRY_TARGET_SHAPE = {"K": 3, "N": 8, "V": 500}
DRY_FUSED_LINEAR_SHAPE = {"K": 3, "N": 8, "H": 32, "V": 500}
THRESHOLDS = {"pct_copy_bw": 85.0, "x_eager": 8.0, "x_compile": 2.0, "x_liger_jsd": 1.0,
              "fused_linear_time_ratio": 1.15, "fused_linear_memory_ratio": 1 / 8}
# The GPU test subset; -k keeps the cuda half of the parametrised loss tests.
TEST_SUBSET = [["tests/test_losses.py", "-k", "cuda"], ["tests/test_gpu_runtime.py"]]


# --------------------------------------------------------------------------- optional contenders

def optional_contenders() -> dict:
    """name -> None where usable, else why not (shown in the report)."""
    found = {}
    for name, module in (("liger_kernel", "liger_kernel.transformers"), ("cut_cross_entropy", "cut_cross_entropy")):
        try:
            __import__(module)
            found[name] = None
        except Exception as e:  # a broken install is reported like a missing one, not fatal
            found[name] = f"not importable: {type(e).__name__}: {e}".splitlines()[0][:200]
    if not torch.cuda.is_available():
        found = {name: why or "needs a GPU" for name, why in found.items()}
    return found


# --------------------------------------------------------------------------- 0. the CUDA extension

def build_cuda_extension() -> dict:
    """Builds (or loads) the C++ CUDA backend before the clock of the tests starts: a first-use
    build of csrc/ takes minutes and would otherwise be charged to the first cuda test."""
    from intradistill_kernels.ops import cpp

    start = time.monotonic()
    ok = cpp.cuda_backend.is_available()
    return {"available": ok, "seconds": round(time.monotonic() - start, 1),
            "error": None if ok else (cpp.build_error("cuda") or "not available")}


# --------------------------------------------------------------------------- 1. tests

def run_tests(out: Path, timeout_s: float, dry_run: bool) -> dict:
    """Runs the GPU test subset with pytest; returns its counts and the log's path."""
    commands = [[sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", "-rfEs"] for args in TEST_SUBSET]
    if dry_run:
        return {"status": "skipped: dry run", "commands": [" ".join(c[1:]) for c in commands]}
    log = out / "tests.log"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled Triton on the GPU
    summary = {"status": "passed", "commands": [], "log": log.name}
    deadline = time.monotonic() + timeout_s
    with log.open("w") as f:
        for cmd in commands:
            summary["commands"].append(" ".join(cmd[1:]))
            f.write(f"$ {' '.join(cmd[1:])}\n")
            f.flush()
            try:
                run = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                     timeout=max(1.0, deadline - time.monotonic()))
                ok = run.returncode in (0, 5)  # 5: nothing selected (no second GPU, say)
                if not ok:
                    summary["status"] = "failed"
            except subprocess.TimeoutExpired:
                summary["status"] = f"timed out after {timeout_s:.0f} s"
                f.write("\n[gpu-check] timed out\n")
                break
    summary["tail"] = log.read_text()[-4000:]
    return summary


# --------------------------------------------------------------------------- 2. the grid

class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _skipped(k, n, v, dtype, why):
    return {"K": k, "N": n, "V": v, "dtype": str(dtype).split(".")[-1], "skipped": why}


def device_copy_bandwidth(device: str, dry_run: bool) -> float:
    """Bytes/s of a device copy of a buffer large enough to leave every cache behind."""
    numel = (1 << 16) if dry_run else (1 << 30)  # 2 GiB of bf16 on a GPU
    buf = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    return measure.copy_bandwidth(buf, device, reps=3)


def run_grid(grid: Grid, device: str, deadline: Deadline, bandwidth: float, dry_run: bool) -> list[dict]:
    rows = []
    for (k, n, v), dtype in grid.jobs():
        if deadline.left() <= 0:
            rows.append(_skipped(k, n, v, dtype, "time budget of the run spent"))
            continue
        compile_here = not dry_run and k == 3 and n == 4096
        # On a CPU the peak memory is measured in a fresh process per contender: too slow for a dry run.
        rows += measure_shape(k, n, v, dtype, grid, device, with_compile=compile_here, with_memory=not dry_run,
                              bandwidth=bandwidth)
        if device == "cuda":
            torch.cuda.empty_cache()  # the next shape may need most of the device
    return rows


# --------------------------------------------------------------------------- 3. targets

def _row(rows, contender, mode="forward+backward", loss="ce+x"):
    return next((r for r in rows if r.get("contender") == contender and r.get("mode") == mode
                 and r.get("loss") == loss and r.get("ms")), None)


def _ours(rows, loss="ce+x"):
    """Our fastest correct backend's row."""
    mine = [r for r in rows if str(r.get("contender", "")).startswith("intradistill[") and r.get("ms")
            and r.get("mode") == "forward+backward" and r.get("loss") == loss and r["contender"] != "intradistill[torch]"]
    return min(mine, key=lambda r: r["ms"], default=None)


def _target(name, value, threshold, higher_is_better, note=""):
    met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
    return {"target": name, "value": value, "threshold": threshold, "met": met, "note": note}


def loss_targets(rows_k3: list[dict], rows_k2: list[dict]) -> list[dict]:
    """The single-loss targets from the rows measured on the target shape (K = 3) and on its
    K = 2 twin (Liger's JSD compares two distributions)."""
    ours = _ours(rows_k3)
    eager = _row(rows_k3, "paper_eager")
    comp = _row(rows_k3, "paper_eager+torch.compile")
    out = [
        _target("% of copy bandwidth on the minimal bytes (CE + X, fwd+bwd)", ours and ours.get("pct_copy_bw"),
                THRESHOLDS["pct_copy_bw"], True, ours["contender"] if ours else "ours not timed"),
        _target("x faster than the eager formula", ours and eager and eager["ms"] / ours["ms"], THRESHOLDS["x_eager"], True,
                "" if eager else "eager not timed (out of memory?)"),
        _target("x faster than torch.compile of it", ours and comp and comp["ms"] / ours["ms"], THRESHOLDS["x_compile"], True,
                "" if comp else "torch.compile not timed"),
    ]
    liger = _row(rows_k2, "liger_jsd", loss="js")
    mine_js = next((r for r in rows_k2 if str(r.get("contender", "")).endswith(".js") and r.get("ms")
                    and r.get("mode") == "forward+backward"), None)
    out.append(_target("x faster than Liger's JSD (K = 2, JS, equal work)",
                       liger and mine_js and liger["ms"] / mine_js["ms"], THRESHOLDS["x_liger_jsd"], True,
                       "" if liger else "liger_kernel not installed or not timed"))
    return out


# --------------------------------------------------------------------------- fused-linear

def _peak_and_time(fn, device, reps) -> tuple[float, float]:
    """(peak extra bytes of one call, median ms); peak None on CPU (the allocator keeps no peak)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = float(torch.cuda.max_memory_allocated() - base)
    else:
        fn()
        peak = None
    return peak, measure.time_ms(fn, device, reps)


def fused_linear_contenders(k, h, v) -> dict:
    """name -> step(hidden, weight, target): a forward+backward of the loss on hidden @ weight.T."""
    def fused(hidden, weight, target):
        idk.fused_linear_intra_distillation_loss(hidden, weight, target, None, 1.0).loss.backward()

    def unfused(hidden, weight, target):
        idk.intra_distillation_loss(hidden @ weight.T, target, 1.0).loss.backward()

    steps = {"intradistill fused-linear": fused, "matmul + intradistill loss": unfused}
    found = optional_contenders()
    if found.get("liger_kernel") is None and k >= 2:
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.5)

        def liger(hidden, weight, target):  # two passes as student and teacher: JS of K = 2
            jsd(hidden[0], weight, hidden[1], weight, None).backward()
        steps["liger fused-linear JSD (K = 2)"] = liger
    if found.get("cut_cross_entropy") is None:
        from cut_cross_entropy import linear_cross_entropy

        def cce(hidden, weight, target):  # CE over the K passes alone: no fused loss can beat it
            linear_cross_entropy(hidden.flatten(0, -2), weight, target.repeat(k)).backward()
        steps["cut-cross-entropy CE only (floor)"] = cce
    return steps


def run_fused_linear(shape: dict, dtype, device: str, deadline: Deadline, reps: int) -> tuple[list[dict], list[dict]]:
    k, n, h, v = shape["K"], shape["N"], shape["H"], shape["V"]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(k, n, h, generator=g, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device, dtype=dtype) / h ** 0.5).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g, device=device)
    rows = []
    for name, step in fused_linear_contenders(k, h, v).items():
        row = {"K": k, "N": n, "H": h, "V": v, "dtype": str(dtype).split(".")[-1], "contender": name}
        if deadline.left() <= 0:
            row["skipped"] = "time budget of the run spent"
        else:
            def call():
                hidden.grad = weight.grad = None
                step(hidden, weight, target)
            try:
                peak, ms = _peak_and_time(call, device, reps)
                row.update(ms=ms, peak_extra_mb=None if peak is None else peak / 2**20)
            except torch.OutOfMemoryError:
                row["skipped"] = "out of memory"
            except Exception as e:  # an optional contender that fails is reported, not fatal
                row["skipped"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
    fused = next((r for r in rows if r["contender"] == "intradistill fused-linear" and r.get("ms")), None)
    plain = next((r for r in rows if r["contender"] == "matmul + intradistill loss" and r.get("ms")), None)
    both = bool(fused and plain)
    mem = both and fused.get("peak_extra_mb") is not None and bool(plain.get("peak_extra_mb"))
    targets = [
        _target("fused-linear time / (matmul + fused loss)", fused["ms"] / plain["ms"] if both else None,
                THRESHOLDS["fused_linear_time_ratio"], False),
        _target("fused-linear peak memory / (matmul + fused loss)",
                fused["peak_extra_mb"] / plain["peak_extra_mb"] if mem else None,
                THRESHOLDS["fused_linear_memory_ratio"], False, "" if mem else "peak memory is measured on GPU only"),
    ]
    return rows, targets


# --------------------------------------------------------------------------- the static model

def model_check(rows: list[dict], path: Path = gpu_model.OUT / "model.json") -> list[dict]:
    """The static model's prediction (benchmarks/gpu_model.py, H100 SXM at 1.98 GHz) for each
    measured CE + X forward+backward row of our Triton and CUDA backends: the two-pass figure for
    the `.two-pass` contenders, the one-pass range for the others. The first GPU run checks the
    model with it: a measured time far above the prediction points at what the model leaves out."""
    try:
        table = gpu_model.load(path)
    except (OSError, ValueError) as e:
        return [{"skipped": f"no model table at {path}: {type(e).__name__}"}]
    out = []
    for r in rows:
        name = str(r.get("contender", ""))
        backend = name[len("intradistill["):].split("]")[0] if name.startswith("intradistill[") else None
        if backend not in ("triton", "cuda") or r.get("mode") != "forward+backward" or r.get("loss") != "ce+x" \
                or not r.get("ms"):
            continue
        variant = gpu_model.Variant(backend, r["K"], r["dtype"], "x", "-")
        found = table.get(variant.key)
        if found is None:
            continue
        clock = gpu_model.predict(variant, found["kernels"], r["N"], r["V"])["clocks"]["1.980 GHz"]
        two_pass = name.endswith(".two-pass")
        low, high = (clock["two_pass_ms"],) * 2 if two_pass else clock["one_pass_ms"]
        out.append({"contender": name, "K": r["K"], "N": r["N"], "V": r["V"], "dtype": r["dtype"], "ms": r["ms"],
                    "predicted_ms": [low, high], "measured_over_predicted": r["ms"] / high})
    return out


def model_markdown(checks: list[dict]) -> list[str]:
    lines = ["## Static model check", "",
             "Predicted by `benchmarks/gpu_model.py` for an H100 SXM at 1.98 GHz from the committed sm_90 counts "
             "(forward+backward, CE + X; one-pass contenders: the range between perfect overlap and L2 misses).", "",
             "| contender | K | N | V | dtype | measured ms | predicted ms | measured / predicted (upper) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in checks:
        if "skipped" in c:
            lines.append(f"| {c['skipped']} | | | | | | | |")
            continue
        low, high = c["predicted_ms"]
        predicted = f"{low:.3g}" if low == high else f"{low:.3g}-{high:.3g}"
        lines.append(f"| {c['contender']} | {c['K']} | {c['N']} | {c['V']} | {c['dtype']} | {c['ms']:.3g} | "
                     f"{predicted} | {c['measured_over_predicted']:.2f} |")
    return lines


# --------------------------------------------------------------------------- writing

def markdown(meta, tests, rows, target_rows, fl_rows, targets, checks=()) -> str:
    lines = [f"# gpu-check: `{meta['device']}`", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta.get('triton')}, backends {meta['backends']}; "
             f"copy bandwidth {meta['copy_gbps']:.0f} GB/s; wall time {meta.get('wall_s', 0):.0f} s"
             + ("; DRY RUN (tiny shapes, no tests)" if meta.get("dry_run") else "") + ".", "",
             *( [f"CUDA extension: {meta['cuda_extension']}.", ""] if "cuda_extension" in meta else []),
             "Optional contenders: " + ", ".join(f"{k}: {'used' if v is None else v}" for k, v in meta["optional"].items()) + ".",
             "", "## Tests", "", f"Status: **{tests['status']}**.", ""]
    lines += [f"- `{c}`" for c in tests.get("commands", [])]
    lines += ["", "## Targets", "", "| target | measured | threshold | met | note |", "| --- | --- | --- | --- | --- |"]
    for t in targets:
        met = {True: "yes", False: "**NO**", None: "not measured"}[t["met"]]
        value = "" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"| {t['target']} | {value} | {t['threshold']:.3g} | {met} | {t['note']} |")
    lines += ["", "## Fused-linear", "", "| K | N | H | V | dtype | contender | ms (fwd+bwd) | peak extra MB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in fl_rows:
        ms = f"{r['ms']:.2f}" if r.get("ms") else f"skipped: {r.get('skipped')}"
        peak = "" if r.get("peak_extra_mb") is None else f"{r['peak_extra_mb']:.0f}"
        lines.append(f"| {r['K']} | {r['N']} | {r['H']} | {r['V']} | {r['dtype']} | {r['contender']} | {ms} | {peak} |")
    lines += ["", *model_markdown(list(checks))]
    lines += ["", "## Target shapes", "", report.markdown(meta, target_rows), "## Grid", "", report.markdown(meta, rows)]
    return "\n".join(lines)


def plot_bandwidth(rows, out: Path) -> Path | None:
    """% of copy bandwidth of our forward+backward (CE + X) against V, one line per (K, N, dtype)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in rows if str(r.get("contender", "")).startswith("intradistill[") and r.get("pct_copy_bw")
            and r.get("mode") == "forward+backward" and r.get("loss") == "ce+x"]
    if not ours:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({(r["contender"], r["K"], r["N"], r["dtype"]) for r in ours}):
        pts = sorted((r["V"], r["pct_copy_bw"]) for r in ours if (r["contender"], r["K"], r["N"], r["dtype"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} K={key[1]} N={key[2]} {key[3]}")
    ax.axhline(THRESHOLDS["pct_copy_bw"], color="k", linestyle="--", linewidth=0.8)
    return report.save_plot(fig, ax, out / "pct_copy_bw.png", xlabel="V", ylabel="% of copy bandwidth (minimal bytes)",
                            title="CE + X forward+backward", legend_size=5)


def write(out: Path, meta, tests, rows, target_rows, fl_rows, targets) -> None:
    out.mkdir(parents=True, exist_ok=True)
    checks = model_check(target_rows + rows)
    payload = {"meta": meta, "tests": tests, "targets": targets, "fused_linear": fl_rows,
               "target_rows": target_rows, "rows": rows, "model_check": checks}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "results.md").write_text(markdown(meta, tests, rows, target_rows, fl_rows, targets, checks))
    report.plot(target_rows + rows, out)
    plot_bandwidth(rows, out)


# --------------------------------------------------------------------------- command line

def run(args) -> Path:
    start = time.monotonic()
    device, dry = args.device, args.dry_run
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device (use --device cpu --dry-run to check the logic)")
    if not dry:
        measure.GPU_TIMING.update(warmup=10, rep=40)  # the grid must fit the budget
    out = Path(args.out) if args.out else report.default_out_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {**run_metadata(device, quick=dry), "triton": triton_version, "dry_run": dry,
            "optional": optional_contenders(), "budget_s": args.budget_s}
    if device == "cuda":
        print(f"[gpu-check] {meta['device']}: building the CUDA extension", flush=True)
        meta["cuda_extension"] = build_cuda_extension()
    print(f"[gpu-check] {meta['device']}: tests", flush=True)
    tests = {"status": "skipped: --skip-tests", "commands": []} if args.skip_tests else run_tests(out, args.tests_timeout_s, dry)
    print(f"[gpu-check] tests {tests['status']}; benchmarks", flush=True)
    deadline = Deadline(args.budget_s - (time.monotonic() - start))
    bandwidth = device_copy_bandwidth(device, dry)
    meta["copy_gbps"] = bandwidth / 1e9
    grid = gpu_check_grid(dry)
    shape = DRY_TARGET_SHAPE if dry else TARGET_SHAPE
    target_grid = Grid([(shape["K"], shape["N"], shape["V"]), (2, shape["N"], shape["V"])], [torch.bfloat16],
                       ("forward+backward",), ("ce+x",), grid.reps)
    # torch.compile takes tens of seconds per shape: left out when the tests ate the budget.
    rows_k3 = measure_shape(shape["K"], shape["N"], shape["V"], torch.bfloat16, target_grid, device,
                            with_compile=not dry and deadline.left() > 90, with_memory=not dry, bandwidth=bandwidth)
    rows_k2 = measure_shape(2, shape["N"], shape["V"], torch.bfloat16, target_grid, device,
                            with_compile=False, with_memory=not dry, bandwidth=bandwidth)
    targets = loss_targets(rows_k3, rows_k2)
    fl_shape = DRY_FUSED_LINEAR_SHAPE if dry else FUSED_LINEAR_SHAPE
    fl_rows, fl_targets = run_fused_linear(fl_shape, torch.float32 if device == "cpu" else torch.bfloat16,
                                           device, deadline, grid.reps)
    targets += fl_targets
    if device != "cuda":  # the figures are kept, the verdict is not given
        for t in targets:
            t["met"] = None
            t["note"] = (t["note"] + "; " if t["note"] else "") + "targets are for H100/H200 GPUs"
    rows = run_grid(grid, device, deadline, bandwidth, dry)
    meta["wall_s"] = time.monotonic() - start
    write(out, meta, tests, rows, rows_k3 + rows_k2, fl_rows, targets)
    if args.out is None:
        report.update_readme(out)
    print((out / "results.md").read_text())
    print(f"[gpu-check] wrote {out}", flush=True)
    return out


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = base_parser(prog, __doc__, "output directory (default: benchmarks/results/<device>-<date>/)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, no pytest: checks the logic anywhere")
    ap.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    ap.add_argument("--tests-timeout-s", type=float, default=240.0, help="time limit of the GPU test subset")
    ap.add_argument("--budget-s", type=float, default=430.0,
                    help="seconds for the whole run; benchmark cases past it are written as skipped")
    return ap


def main(argv=None, *, prog: str | None = None) -> None:
    run(parser(prog).parse_args(argv))


if __name__ == "__main__":
    main(prog="python -m benchmarks.gpu_check")
