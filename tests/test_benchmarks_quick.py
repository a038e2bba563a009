"""The benchmark runner end to end on CPU (results are not committed from CI): every contender
checked against the reference, timed, and written as tables and a plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The fast tier's run: `--quick` on shapes small enough for seconds, without the peak-memory
# measurement (a fresh process per contender: most of a --quick run's time).
TINY_GRID = ("import sys; from benchmarks import grid; grid.QUICK_SHAPES[:] = [(3, 16, 512), (2, 16, 512)]; "
             "from benchmarks.run import main; main(sys.argv[1:])")


def _run_runner(command, out):
    run = subprocess.run([sys.executable, *command, "--device", "cpu", "--quick", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    rows = [r for r in data["rows"] if "mode" in r]
    names = {r["contender"] for r in rows}
    assert {"paper_eager", "intradistill[torch]", "rdrop_eager"} <= names
    assert all(r["correct"] for r in rows), [r for r in rows if not r["correct"]]
    assert all(r["ms"] > 0 and r["speedup_vs_paper_eager"] > 0 for r in rows)
    assert (out / "results.md").read_text().count("| forward+backward |") == len(rows)
    assert (out / "time_fwd_bwd.png").stat().st_size > 0
    return rows


@pytest.mark.filterwarnings("ignore")
def test_runner_on_tiny_shapes(tmp_path):
    rows = _run_runner(["-c", TINY_GRID, "--no-memory"], tmp_path)
    assert {(r["K"], r["N"], r["V"]) for r in rows} == {(3, 16, 512), (2, 16, 512)}


@pytest.mark.full
@pytest.mark.filterwarnings("ignore")
def test_quick_cpu_benchmark_runs(tmp_path):
    rows = _run_runner(["-m", "benchmarks.run"], tmp_path)
    assert any(r.get("peak_extra_mb") is not None for r in rows)
