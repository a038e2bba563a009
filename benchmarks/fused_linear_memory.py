"""Peak memory (and time) of the fused-linear loss against the unfused path, side by side.

    python -m benchmarks.fused_linear_memory --device cpu   # K=3, N=2048, H=256, V=50000 fp32
    python -m benchmarks.fused_linear_memory --device cuda  # K=3, N=8192, H=4096, V=128256 bf16
    python -m benchmarks.fused_linear_memory ...                           # the same, from a source checkout

Unfused: logits = hidden @ weight.T, then intra_distillation_loss (fused kernel), backward.
Fused: fused_linear_intra_distillation_loss, backward. Each variant runs in a fresh process; the
peak is the rise of the process's resident high-water mark above its RSS with the inputs (CPU) or of the CUDA allocator's peak
above the inputs (GPU), so both include everything each path allocates. Writes
fused_linear_memory.md into --out (default: the runner's results directory, see run.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import torch

from .memory import run_fresh_process
from .report import default_out_dir, device_name

PROBE = r"""
import gc, json, time, torch
import intradistill_kernels as idk
from benchmarks.memory import peak_rss, reset_peak_rss
k, n, h, v, device, dtype, variant = {k}, {n}, {h}, {v}, {device!r}, getattr(torch, {dtype!r}), {variant!r}
def make(n):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(k, n, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, target
def step(hidden, weight, target):
    if variant == "fused":
        out = idk.fused_linear_intra_distillation_loss(hidden, weight, target, None, 1.0)
    else:
        out = idk.intra_distillation_loss(hidden @ weight.T, target, 1.0)
    out.loss.backward()
    return float(out.loss)
step(*make(4))  # loads the libraries and the extension with a tiny peak
inputs = make(n)
gc.collect()
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = reset_peak_rss()
t = time.perf_counter()
loss = step(*inputs)
if device == "cuda":
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
else:
    peak = peak_rss() - base
print(json.dumps({{"variant": variant, "peak_bytes": peak, "seconds": time.perf_counter() - t, "loss": loss,
                  "backend": idk.available_backends()}}))
"""

SHAPES = {"cpu": (3, 2048, 256, 50000, "float32"), "cuda": (3, 8192, 4096, 128256, "bfloat16")}


def measure(device: str) -> list[dict]:
    k, n, h, v, dtype = SHAPES[device]
    results = []
    for variant in ("unfused", "fused"):
        code = PROBE.format(k=k, n=n, h=h, v=v, device=device, dtype=dtype, variant=variant)
        try:
            results.append(run_fresh_process(code, timeout=1800))
        except RuntimeError as e:
            raise RuntimeError(f"{variant} failed:\n{e}") from e
    return results


def main(argv=None, *, prog: str | None = None) -> None:
    """Measures both paths, writes and prints the table into --out."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", help="output directory (default: the runner's, <device>-<date>)")
    args = ap.parse_args(argv)
    results = measure(args.device)
    k, n, h, v, dtype = SHAPES[args.device]
    unfused, fused = results
    lines = [f"Fused-linear vs unfused, K={k}, N={n}, H={h}, V={v}, {dtype}, device `{device_name(args.device)}`, "
             f"{dt.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, backends {fused['backend']}.", "",
             "| path | peak extra memory (MiB) | forward+backward (s) | loss |", "| --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['peak_bytes'] / 2**20:.0f} | {r['seconds']:.2f} | {r['loss']:.6f} |")
    lines += ["", f"fused / unfused peak memory: {fused['peak_bytes'] / unfused['peak_bytes']:.3f}; "
                  f"time ratio: {fused['seconds'] / unfused['seconds']:.2f}"]
    text = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else default_out_dir(args.device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fused_linear_memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(prog="python -m benchmarks.fused_linear_memory")
