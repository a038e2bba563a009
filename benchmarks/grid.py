"""What the runner measures on a device: the (K, N, V) shapes, dtypes, modes and losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("forward", "backward", "forward+backward")
# "ce+x": mean CE over the K passes + alpha * X-divergence (what training calls); "x": the divergence alone.
LOSSES = ("ce+x", "x")

# GPU: the vocabularies of current LLMs (Llama 2, GPT-2, Llama 3, Gemma) at training batch sizes;
# CPU (float32 only): what two cores can time in minutes; quick: a smoke run under two minutes.
GPU_SHAPES = [(k, n, v) for k in (2, 3, 4) for n in (1024, 4096, 8192, 16384) for v in (32000, 50257, 128256, 256000)]
CPU_SHAPES = [(3, 512, 32000), (2, 512, 32000), (4, 128, 50257)]
QUICK_SHAPES = [(3, 128, 8000), (2, 128, 8000)]


# `make gpu-check`: the grid a GPU is validated on in a few minutes (peak memory included), and
# the tiny stand-in its CPU-side logic is tested with (--device cpu --dry-run).
GPU_CHECK_SHAPES = [(k, n, v) for k in (2, 3, 4) for n in (4096, 16384) for v in (32000, 128256, 152064, 262144)]
DRY_RUN_SHAPES = [(2, 8, 256), (3, 4, 300)]


@dataclass(frozen=True)
class Grid:
    shapes: list[tuple[int, int, int]]
    dtypes: list[torch.dtype]
    modes: tuple[str, ...]
    losses: tuple[str, ...]
    reps: int  # timed repetitions on CPU (the GPU timer picks its own)
    # CPU: fast contenders get more repetitions, up to about this many seconds each
    pair_seconds: float = 2.0

    def jobs(self) -> list[tuple[tuple[int, int, int], torch.dtype]]:
        """(shape, dtype) pairs in the order they are measured: each one gets fresh inputs."""
        return [(s, d) for s in self.shapes for d in self.dtypes]


def grid_for(device: str, quick: bool = False, reps: int = 5) -> Grid:
    if quick:
        return Grid(QUICK_SHAPES, [torch.float32], ("forward+backward",), ("ce+x",), 3, pair_seconds=0.0)
    if device == "cuda":
        return Grid(GPU_SHAPES, [torch.bfloat16, torch.float32], MODES, LOSSES, reps)
    return Grid(CPU_SHAPES, [torch.float32], MODES, LOSSES, reps)


def gpu_check_grid(dry_run: bool = False) -> Grid:
    """bf16 and fp32, forward, backward and forward+backward, CE + X and X alone."""
    return Grid(DRY_RUN_SHAPES if dry_run else GPU_CHECK_SHAPES, [torch.bfloat16, torch.float32], MODES, LOSSES,
                1 if dry_run else 5, pair_seconds=0.0 if dry_run else 2.0)
