"""CI runs the benchmark runner's quick CPU subset (results are not committed from CI)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.filterwarnings("ignore")
def test_quick_cpu_benchmark_runs(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.run", "--device", "cpu", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    rows = [r for r in data["rows"] if "mode" in r]
    names = {r["contender"] for r in rows}
    assert {"paper_eager", "intradistill[torch]", "rdrop_eager"} <= names
    assert all(r["correct"] for r in rows), [r for r in rows if not r["correct"]]
    assert all(r["ms"] > 0 and r["speedup_vs_paper_eager"] > 0 for r in rows)
    assert (tmp_path / "results.md").read_text().count("| forward+backward |") == len(rows)
    assert (tmp_path / "time_fwd_bwd.png").stat().st_size > 0
