"""`make gpu-check`'s CPU-side logic, on tiny shapes: the grid, the targets, the fused-linear
comparison, the optional contenders reported (not fatal) where absent, and the files written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.grid import DRY_RUN_SHAPES, GPU_CHECK_SHAPES, gpu_check_grid

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_grid_is_the_requested_one():
    grid = gpu_check_grid()
    assert {k for k, _, _ in grid.shapes} == {2, 3, 4}
    assert {n for _, n, _ in grid.shapes} == {4096, 16384}
    assert {v for _, _, v in grid.shapes} == {32000, 128256, 152064, 262144}
    assert len(grid.shapes) == len(GPU_CHECK_SHAPES) == 24
    assert grid.dtypes == [torch.bfloat16, torch.float32]
    assert set(grid.modes) == {"forward", "backward", "forward+backward"}


def test_targets_are_judged_and_missing_figures_are_not_met():
    rows = [{"contender": "intradistill[triton]", "mode": "forward+backward", "loss": "ce+x", "ms": 2.0, "pct_copy_bw": 90.0},
            {"contender": "paper_eager", "mode": "forward+backward", "loss": "ce+x", "ms": 10.0}]
    got = {t["target"].split(" (")[0]: t for t in gpu_check.loss_targets(rows, [])}
    assert got["% of copy bandwidth on the minimal bytes"]["met"] is True
    assert got["x faster than the eager formula"]["value"] == 5.0 and got["x faster than the eager formula"]["met"] is False
    assert got["x faster than torch.compile of it"]["met"] is None  # not measured: no verdict
    assert got["x faster than Liger's JSD"]["met"] is None


@pytest.mark.full
@pytest.mark.filterwarnings("ignore")
def test_dry_run_writes_results(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--dry-run",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["dry_run"] and data["tests"]["status"] == "skipped: dry run"
    # Optional contenders absent (or unusable without a GPU) are named with the reason, not fatal.
    assert set(data["meta"]["optional"]) == {"liger_kernel", "cut_cross_entropy"}
    assert all(why for why in data["meta"]["optional"].values())
    timed = [r for r in data["rows"] if r.get("ms")]
    shapes = {(r["K"], r["N"], r["V"], r["dtype"]) for r in timed}
    assert shapes == {(k, n, v, d) for k, n, v in DRY_RUN_SHAPES for d in ("bfloat16", "float32")}
    assert {r["mode"] for r in timed} == {"forward", "backward", "forward+backward"}
    assert all(r["correct"] for r in data["rows"] if "correct" in r)
    assert {r["contender"] for r in data["fused_linear"]} == {"intradistill fused-linear", "matmul + intradistill loss"}
    assert all(r["ms"] > 0 for r in data["fused_linear"])
    assert len(data["targets"]) == 6 and all(t["met"] is None for t in data["targets"])  # not a GPU: no verdict
    md = (tmp_path / "results.md").read_text()
    assert "## Targets" in md and "## Fused-linear" in md and "DRY RUN" in md
    assert (tmp_path / "time_fwd_bwd.png").stat().st_size > 0
    assert (tmp_path / "pct_copy_bw.png").stat().st_size > 0


def test_time_budget_skips_what_is_left():
    spent = gpu_check.Deadline(0)
    rows = gpu_check.run_grid(gpu_check_grid(dry_run=True), "cpu", spent, 1e9, dry_run=True)
    assert len(rows) == 2 * len(DRY_RUN_SHAPES)
    assert all(r["skipped"] == "time budget of the run spent" for r in rows)
    fl_rows, targets = gpu_check.run_fused_linear(gpu_check.DRY_FUSED_LINEAR_SHAPE, torch.float32, "cpu", spent, 1)
    assert fl_rows and all(r.get("skipped") for r in fl_rows)
    assert all(t["met"] is None and t["value"] is None for t in targets)
