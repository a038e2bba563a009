"""Peak memory per rank of the vocabulary-parallel fused-linear loss against the vocabulary-parallel
loss on materialised local logits, side by side (gloo process group on CPU).

    python -m benchmarks.vocab_parallel_memory            # K=3, N=4096, H=256, V=32000, world 2, fp32

Each rank holds rows [V_r, V_{r+1}) of the output weight and the whole hidden states. Materialised:
local logits = hidden @ weight_shard.T, then vocab_parallel_intra_distillation_loss, backward.
Fused: vocab_parallel_fused_linear_intra_distillation_loss, backward. Each variant runs in fresh
rank processes; the peak is the rise of each process's resident high-water mark above its RSS with
the inputs, and is set beside that rank's [K, N, V/world] fp32 logits. Writes
vocab_parallel_memory.md into --out (default: the runner's results directory).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .memory import peak_rss, reset_peak_rss
from .report import default_out_dir, device_name

K, N, H, V, WORLD = 3, 4096, 256, 32000, 2


def _inputs(n: int, v_start: int, v_local: int):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(K, n, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    target = torch.randint(0, V, (n,), generator=g)
    return hidden.requires_grad_(), weight[v_start:v_start + v_local].clone().requires_grad_(), target


def _step(variant: str, hidden, weight, target) -> float:
    from intradistill_kernels.distributed import (
        vocab_parallel_fused_linear_intra_distillation_loss, vocab_parallel_intra_distillation_loss)

    if variant == "fused":
        out = vocab_parallel_fused_linear_intra_distillation_loss(hidden, weight, target, None, 1.0)
    else:
        out = vocab_parallel_intra_distillation_loss(hidden @ weight.T, target, 1.0)
    out.loss.backward()
    return float(out.loss)


def _rank(rank: int, variant: str, port: int, out_dir: str) -> None:
    import time

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    v_local = V // WORLD + (rank < V % WORLD)
    v_start = rank * (V // WORLD) + min(rank, V % WORLD)
    _step(variant, *_inputs(8, v_start, v_local))  # loads the extension with a tiny peak
    inputs = _inputs(N, v_start, v_local)
    dist.barrier()
    base = reset_peak_rss()
    t = time.perf_counter()
    loss = _step(variant, *inputs)
    seconds = time.perf_counter() - t
    result = {"peak_bytes": peak_rss() - base, "seconds": seconds, "loss": loss, "v_local": v_local}
    Path(out_dir, f"{variant}-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure() -> dict[str, list[dict]]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("materialised", "fused"):
            mp.spawn(_rank, args=(variant, _free_port(), tmp), nprocs=WORLD, join=True)
            results[variant] = [json.loads(Path(tmp, f"{variant}-{r}.json").read_text()) for r in range(WORLD)]
    return results


def table(results: dict[str, list[dict]]) -> str:
    import intradistill_kernels as idk

    lines = [f"Vocabulary-parallel loss per rank, K={K}, N={N}, H={H}, V={V}, world {WORLD} (gloo), fp32, "
             f"device `{device_name('cpu')}`, {dt.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, "
             f"backends {idk.available_backends()}.", "",
             "| path | rank | V on the rank | its [K, N, V/world] fp32 logits (MiB) | peak extra memory (MiB) | "
             "peak / logits | forward+backward (s) | loss |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for variant, ranks in results.items():
        for rank, r in enumerate(ranks):
            logits = K * N * r["v_local"] * 4
            lines.append(f"| {variant} | {rank} | {r['v_local']} | {logits / 2**20:.0f} | {r['peak_bytes'] / 2**20:.0f} | "
                         f"{r['peak_bytes'] / logits:.3f} | {r['seconds']:.2f} | {r['loss']:.6f} |")
    return "\n".join(lines) + "\n"


def main(argv=None, *, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output directory (default: the runner's, <device>-<date>)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # two ranks on the machine's cores
    text = table(measure())
    out = Path(args.out) if args.out else default_out_dir("cpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab_parallel_memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(prog="python -m benchmarks.vocab_parallel_memory")
