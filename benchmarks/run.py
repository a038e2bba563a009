"""Benchmark runner: every contender on the same inputs in one run, written as tables and plots.

    python -m benchmarks.run --device cpu [--quick] [--out DIR]   # from the repository root
    python -m benchmarks.run --device cuda                         # the full grid on a GPU

Writes results.md, results.json and a PNG plot into --out (default: benchmarks/results/<device>-
<date>/ in a source checkout, where it also refreshes the generated section of
benchmarks/README.md; ./benchmark-results/<device>-<date>/ elsewhere).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import torch

import intradistill_kernels as idk

from intradistill_kernels._progress import progress_bar
from . import contenders as C
from . import report
from .grid import Grid, grid_for
from .measure import (CpuFloor, check, copy_bandwidth, cpu_training_step, make_inputs, minimal_bytes, mode_callables,
                      time_ms)
from .memory import peak_extra_bytes


def run_metadata(device: str, quick: bool) -> dict:
    return {"device": report.device_name(device), "date": dt.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "backends": idk.available_backends(), "quick": bool(quick),
            # the machine may be shared: its load when the run began and (appended) when it ended
            "load_average": [report.load_average()]}


def _mode_ms(times: dict, fn, logits, target, mode, grid: Grid, device, floor: CpuFloor | None) -> float:
    """Time of `mode`, cached in `times` across the modes of one case. The backward is the
    forward+backward time less the forward's: a fused loss may compute its gradient during the
    forward (then the backward only scales it, in place, and cannot be replayed on its own).
    On CPU, forward+backward is timed call by call on fresh logits, alternately with the floor;
    its spread and floor ratio land in times["spread"]."""
    if mode not in times:
        if mode == "backward":
            both = _mode_ms(times, fn, logits, target, "forward+backward", grid, device, floor)
            times[mode] = max(both - _mode_ms(times, fn, logits, target, "forward", grid, device, floor), 1e-6)
        elif mode == "forward+backward" and floor is not None:
            times["spread"] = floor.paired(cpu_training_step(fn, logits, target), grid.reps, grid.pair_seconds)
            times[mode] = times["spread"]["ms"]
        else:
            times[mode] = time_ms(mode_callables(fn, logits, target, mode), device, grid.reps)
    return times[mode]


def _time_case(row, name, fn, logits, target, mode, grid: Grid, device, bandwidth, floor, with_memory,
               times: dict) -> None:
    """Fills `row` with the time, bandwidth, floor ratio and peak memory of one correct case."""
    k, n, v = logits.shape[0], row["N"], row["V"]
    ms = _mode_ms(times, fn, logits, target, mode, grid, device, floor)
    nbytes = minimal_bytes(k, n, v, logits.element_size(), mode)
    row.update(ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9, pct_copy_bw=100 * nbytes / (ms * 1e-3) / bandwidth)
    if floor is not None and mode == "forward+backward":
        row.update(times["spread"])
    if mode == "forward+backward" and row["loss"] != "x" and with_memory:
        extra = peak_extra_bytes(name, k, n, v, logits.dtype, device, fn, logits, target)
        row["peak_extra_mb"] = None if extra is None else extra / 2**20


def measure_shape(k, n, v, dtype, grid: Grid, device: str, *, with_compile=True, with_memory=True,
                  bandwidth: float | None = None) -> list[dict]:
    """Rows for one (K, N, V, dtype): each contender checked against the reference, then timed in
    every mode of the grid if correct; a wrong contender gets rows marked incorrect and no time.
    `bandwidth`: the device's copy bandwidth (bytes/s), measured on these logits when None."""
    try:
        logits, target = make_inputs(k, n, v, dtype, device)
    except torch.OutOfMemoryError:
        return [{"K": k, "N": n, "V": v, "dtype": str(dtype), "skipped": "out of memory for the inputs"}]
    bandwidth = bandwidth or copy_bandwidth(logits, device, grid.reps)
    floor = CpuFloor(logits) if device == "cpu" else None
    # Each shape, loss and grad mode is a new graph for torch.compile; past its cache limit (8)
    # it silently falls back to eager, which would time the compiler contender as eager.
    torch._dynamo.reset()
    cases = [(name, fn, kind, loss) for name, (fn, kind) in C.contenders(device, k, with_compile=with_compile).items()
             for loss in (("js",) if kind == "js" else grid.losses)]
    rows = []
    for name, fn, kind, loss in cases:
        t = target if loss == "ce+x" else None
        try:
            err = check(fn, kind, logits, t)
        except torch.OutOfMemoryError:
            rows.append({"K": k, "N": n, "V": v, "dtype": str(dtype), "contender": name, "skipped": "out of memory"})
            continue
        ok = err < (1e-3 if dtype == torch.float32 else 2e-2)
        times = {}
        for mode in grid.modes:
            row = {"K": k, "N": n, "V": v, "dtype": str(dtype).split(".")[-1], "loss": loss, "contender": name,
                   "mode": mode, "rel_error": err, "correct": ok}
            if ok:
                try:
                    _time_case(row, name, fn, logits, t, mode, grid, device, bandwidth, floor, with_memory, times)
                except torch.OutOfMemoryError:
                    row["skipped"] = "out of memory"
            rows.append(row)
    _speedups(rows)
    return rows


def _speedups(rows):
    """Adds each timed row's speed-up over paper_eager on the same dtype, mode and loss."""
    def key(r):
        return r["dtype"], r["mode"], r.get("loss")
    base = {key(r): r.get("ms") for r in rows if r.get("contender") == "paper_eager" and "mode" in r}
    for r in rows:
        if r.get("ms") and base.get(key(r)):
            r["speedup_vs_paper_eager"] = base[key(r)] / r["ms"]


def run(args) -> Path:
    device = args.device
    grid = grid_for(device, quick=args.quick, reps=args.reps)
    out = Path(args.out) if args.out else report.default_out_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    meta = run_metadata(device, args.quick)
    rows = []
    for (k, n, v), dtype in progress_bar(grid.jobs(), desc="shapes"):
        rows += measure_shape(k, n, v, dtype, grid, device, with_compile=not args.no_compile,
                              with_memory=not args.no_memory)
    meta["load_average"].append(report.load_average())
    report.write_results(out, meta, rows)
    if args.out is None:
        report.update_readme(out)
    print(report.markdown(meta, rows))
    return out


def base_parser(prog: str | None, description: str | None, out_help: str) -> argparse.ArgumentParser:
    """--device and --out, shared by the benchmark runner and gpu-check."""
    ap = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help=out_help)
    return ap


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = base_parser(prog, __doc__, "output directory (default: see above)")
    ap.add_argument("--quick", action="store_true", help="a small subset (under 2 minutes on CPU)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    return ap


def main(argv=None, *, prog: str | None = None) -> None:
    """The `python -m benchmarks.run` command (argv: its arguments, default sys.argv[1:]). Returns
    nothing: a console script hands the return value to sys.exit."""
    run(parser(prog).parse_args(argv))


if __name__ == "__main__":
    main(prog="python -m benchmarks.run")
