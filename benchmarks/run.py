"""Benchmark runner: every contender on the same inputs in one run, written as tables and plots.

    python -m benchmarks.run --device cpu [--quick] [--out DIR]
    python -m benchmarks.run --device cuda            # the full grid of the issue on a GPU

Writes results.md, results.json and PNG plots into benchmarks/results/<device-name>-<date>/ (or
--out), and refreshes the generated section of benchmarks/README.md when writing there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import contenders as C

HERE = Path(__file__).resolve().parent
MODES = ("forward", "backward", "forward+backward")
# "ce+x": mean CE over the K passes + alpha * X-divergence (what training calls); "x": the divergence alone.
LOSSES = ("ce+x", "x")

# (K, N, V) grids. GPU: the issue's grid; CPU: what two cores can time in minutes.
GPU_SHAPES = [(k, n, v) for k in (2, 3, 4) for n in (1024, 4096, 8192, 16384) for v in (32000, 50257, 128256, 256000)]
CPU_SHAPES = [(3, 512, 32000), (2, 512, 32000), (4, 128, 50257)]
QUICK_SHAPES = [(3, 128, 8000), (2, 128, 8000)]


def device_name(device: str) -> str:
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


# --------------------------------------------------------------------------- timing

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, reps: int) -> float:
    """Median wall time of fn in ms: triton.testing.do_bench on GPU, a warm repeated timer on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def make_inputs(k, n, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(k, n, v, generator=g) * 2).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=g).to(device)
    return logits, target


def mode_callables(fn, logits, target, mode):
    """A zero-argument callable timing exactly `mode` of fn on these inputs."""
    def forward():
        with torch.no_grad():
            return fn(logits, target)

    def forward_backward():
        x = logits.detach().requires_grad_()
        fn(x, target).backward()

    if mode == "forward":
        return forward
    if mode == "forward+backward":
        return forward_backward
    x = logits.detach().requires_grad_()
    loss = fn(x, target)
    return lambda: torch.autograd.grad(loss, x, retain_graph=True)


def minimal_bytes(k, n, v, elt, mode) -> int:
    per = k * n * v * elt
    return {"forward": per, "backward": 2 * per, "forward+backward": 3 * per}[mode]


def cpu_floor_ms(logits, reps) -> dict:
    """Issue 7's CPU floor: the larger of 1.5 plain copies (2 reads + 1 write) and two torch.exp
    passes over the logits (exp, not memory, bounds this loss on a CPU)."""
    dst = torch.empty_like(logits)
    copy = time_ms(lambda: dst.copy_(logits), "cpu", reps)
    exp = time_ms(lambda: torch.exp(logits, out=dst), "cpu", reps)
    return {"copy_ms": copy, "exp_ms": exp, "floor_ms": max(1.5 * copy, 2 * exp)}


def copy_bandwidth(logits, device, reps) -> float:
    dst = torch.empty_like(logits)
    ms = time_ms(lambda: dst.copy_(logits), device, reps)
    return 2 * logits.numel() * logits.element_size() / (ms * 1e-3)


# --------------------------------------------------------------------------- memory

_MEMORY_PROBE = r"""
import sys, torch, json
sys.path.insert(0, {root!r})
from benchmarks import contenders as C, run as R
k, n, v, dtype, name = {k}, {n}, {v}, getattr(torch, {dtype!r}), {name!r}
fn = dict((key, f) for key, (f, _) in C.contenders("cpu", k, with_compile=False).items())[name]
small = R.make_inputs(k, 8, 64, dtype, "cpu")
R.mode_callables(fn, *small, "forward+backward")()  # loads libraries and extensions, tiny peak
logits, target = R.make_inputs(k, n, v, dtype, "cpu")
import gc; gc.collect()
base = R.reset_peak_rss()
R.mode_callables(fn, logits, target, "forward+backward")()
print(json.dumps(R.peak_rss() - base))
"""


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Resets this process's resident high-water mark to its current RSS (Linux clear_refs) and
    returns that RSS. (getrusage's ru_maxrss cannot be used: it survives exec, so a child
    started by a large parent inherits the parent's peak.)"""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    return _status_bytes("VmHWM")


def peak_extra_bytes(name, k, n, v, dtype, device, fn, logits, target) -> float | None:
    """Peak memory of forward+backward beyond the inputs. GPU: the allocator's peak. CPU: the rise
    of the resident high-water mark above the RSS with the inputs in place, in a fresh subprocess
    per contender (the CPU allocator keeps no peak)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        mode_callables(fn, logits, target, "forward+backward")()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    if "compile" in name:
        return None  # a fresh process would measure the compiler, not the kernel
    code = _MEMORY_PROBE.format(root=str(HERE.parent), k=k, n=n, v=v, dtype=str(dtype).split(".")[-1], name=name)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        return None
    return float(json.loads(run.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------- main

def check(fn, kind, logits, target) -> float:
    """Relative error of a contender against the float64 reference on the same inputs."""
    with torch.no_grad():
        got = float(fn(logits, target))
        ref_logits = logits.double()
        if kind == "js":
            want = float(C.idk.js_divergence(ref_logits, backend="torch"))
        elif target is None:
            want = float(C.idk.x_divergence(ref_logits, backend="torch"))
        else:
            want = float(C.idk.intra_distillation_loss(ref_logits, target, C.ALPHA, backend="torch").loss)
    return abs(got - want) / max(abs(want), 1e-12)


def run(args) -> Path:
    device = args.device
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    dtypes = [torch.float32] if (args.quick or device == "cpu") else [torch.bfloat16, torch.float32]
    modes = ("forward+backward",) if args.quick else MODES
    losses = ("ce+x",) if args.quick else LOSSES
    reps = 3 if args.quick else args.reps
    out = Path(args.out) if args.out else HERE / "results" / f"{device_name(device)}-{dt.date.today().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is optional
        def tqdm(x, **_):
            return x

    rows, meta = [], {"device": device_name(device), "date": dt.datetime.now().isoformat(timespec="seconds"),
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "backends": C.idk.available_backends(), "quick": bool(args.quick)}
    jobs = [(s, d) for s in shapes for d in dtypes]
    for (k, n, v), dtype in tqdm(jobs, desc="shapes"):
        try:
            logits, target = make_inputs(k, n, v, dtype, device)
        except torch.OutOfMemoryError:
            rows.append({"K": k, "N": n, "V": v, "dtype": str(dtype), "skipped": "out of memory for the inputs"})
            continue
        bandwidth = copy_bandwidth(logits, device, reps)
        floor = cpu_floor_ms(logits, reps) if device == "cpu" else None
        elt = logits.element_size()
        # Each shape, loss and grad mode is a new graph for torch.compile; past its cache limit (8)
        # it silently falls back to eager, which would time the compiler contender as eager.
        torch._dynamo.reset()
        cases = [(name, fn, kind, loss) for name, (fn, kind) in C.contenders(device, k, with_compile=not args.no_compile).items()
                 for loss in (("js",) if kind == "js" else losses)]
        for name, fn, kind, loss in cases:
            t = target if loss == "ce+x" else None
            try:
                err = check(fn, kind, logits, t)
            except torch.OutOfMemoryError:
                rows.append({"K": k, "N": n, "V": v, "dtype": str(dtype), "contender": name, "skipped": "out of memory"})
                continue
            ok = err < (1e-3 if dtype == torch.float32 else 2e-2)
            for mode in modes:
                row = {"K": k, "N": n, "V": v, "dtype": str(dtype).split(".")[-1], "loss": loss, "contender": name,
                       "mode": mode, "rel_error": err, "correct": ok}
                if ok:
                    try:
                        ms = time_ms(mode_callables(fn, logits, t, mode), device, reps)
                    except torch.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                        rows.append(row)
                        continue
                    nbytes = minimal_bytes(k, n, v, elt, mode)
                    row.update(ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9,
                               pct_copy_bw=100 * nbytes / (ms * 1e-3) / bandwidth)
                    if floor and mode == "forward+backward":
                        row.update(floor_ms=floor["floor_ms"], x_floor=ms / floor["floor_ms"])
                    if mode == "forward+backward" and loss != "x" and not args.no_memory:
                        row["peak_extra_mb"] = (lambda b: None if b is None else b / 2**20)(
                            peak_extra_bytes(name, k, n, v, dtype, device, fn, logits, t))
                rows.append(row)
        _speedups(rows, k, n, v)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "results.md").write_text(markdown(meta, rows))
    plot(rows, out)
    if args.out is None:
        update_readme(out)
    print(markdown(meta, rows))
    return out


def _speedups(rows, k, n, v):
    def key(r):
        return r["dtype"], r["mode"], r.get("loss")
    base = {key(r): r.get("ms") for r in rows
            if (r["K"], r["N"], r["V"]) == (k, n, v) and r.get("contender") == "paper_eager"}
    for r in rows:
        if (r["K"], r["N"], r["V"]) == (k, n, v) and r.get("ms") and base.get(key(r)):
            r["speedup_vs_paper_eager"] = base[key(r)] / r["ms"]


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def markdown(meta, rows) -> str:
    lines = [f"Device: `{meta['device']}`, {meta['date']}, torch {meta['torch']}, {meta['threads']} threads; "
             f"backends {meta['backends']}.", "",
             "| K | N | V | dtype | loss | mode | contender | ms | GB/s (minimal bytes) | % copy BW | x CPU floor | peak extra MB | speed-up vs paper eager | rel. error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "mode" not in r:
            lines.append(f"| {r['K']} | {r['N']} | {r['V']} | {r['dtype']} | | | {r.get('contender', '')} | skipped: {r['skipped']} | | | | | | |")
            continue
        status = _fmt(r.get("ms"), ".2f") if r["correct"] else "WRONG RESULT: not timed"
        lines.append(
            f"| {r['K']} | {r['N']} | {r['V']} | {r['dtype']} | {r['loss']} | {r['mode']} | {r['contender']} | {status} | "
            f"{_fmt(r.get('gbps'), '.1f')} | {_fmt(r.get('pct_copy_bw'), '.0f')} | {_fmt(r.get('x_floor'), '.2f')} | "
            f"{_fmt(r.get('peak_extra_mb'), '.0f')} | {_fmt(r.get('speedup_vs_paper_eager'), '.1f')} | {r['rel_error']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(rows, out: Path):
    import matplotlib

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
    ax.set_ylabel("forward+backward time (ms, log)")
    ax.set_yscale("log")
    ax.set_title("CE + X-divergence, forward+backward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "time_fwd_bwd.png", dpi=120)
    plt.close(fig)


def update_readme(out: Path):
    readme = HERE / "README.md"
    text = readme.read_text()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    if begin not in text:
        return
    results = sorted((HERE / "results").glob("*/results.md"))
    body = "\n".join(f"### {p.parent.name}\n\n{p.read_text()}" for p in results)
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{begin}\n<!-- written by python -m benchmarks.run; do not edit -->\n\n{body}\n{end}{tail}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a small subset (under 2 minutes on CPU)")
    ap.add_argument("--out", help="output directory (default benchmarks/results/<device>-<date>)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = ap.parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
