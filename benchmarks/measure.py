"""Inputs, correctness against the float64 reference, timing and bandwidth of one contender."""

from __future__ import annotations

import statistics
import time

import torch

import intradistill_kernels as idk

from .contenders import ALPHA


def make_inputs(k, n, v, dtype, device, seed=0):
    if device == "cpu":
        g = torch.Generator(device="cpu").manual_seed(seed)
        logits = (torch.randn(k, n, v, generator=g) * 2).to(dtype=dtype)
        return logits, torch.randint(0, v, (n,), generator=g)
    # Drawn on the device in the target dtype: a [4, 16384, 262144] tensor drawn on the CPU and
    # copied would take minutes, and an fp32 copy beside the bf16 one could exhaust the device.
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(k, n, v, generator=g, device=device, dtype=dtype).mul_(2)
    return logits, torch.randint(0, v, (n,), generator=g, device=device)


# Rows a contender is checked on: a float64 copy of a [4, 16384, 262144] input would not fit on
# any device, and the kernels treat every row alike.
CHECK_ROWS = 1024


def check(fn, kind, logits, target) -> float:
    """Relative error of a contender against the float64 reference on the same inputs (their
    first CHECK_ROWS tokens)."""
    logits = logits[:, :CHECK_ROWS]
    target = None if target is None else target[:CHECK_ROWS]
    with torch.no_grad():
        got = float(fn(logits, target))
        ref_logits = logits.double()
        if kind == "js":
            want = float(idk.js_divergence(ref_logits, backend="torch"))
        elif target is None:
            want = float(idk.x_divergence(ref_logits, backend="torch"))
        else:
            want = float(idk.intra_distillation_loss(ref_logits, target, ALPHA, backend="torch").loss)
    return abs(got - want) / max(abs(want), 1e-12)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# Milliseconds do_bench spends warming up and timing each case; gpu_check lowers them to fit its grid.
GPU_TIMING = {"warmup": 25, "rep": 100}


def time_ms(fn, device: str, reps: int) -> float:
    """Median wall time of fn in ms: triton.testing.do_bench on GPU, a warm repeated timer on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=GPU_TIMING["warmup"], rep=GPU_TIMING["rep"], return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


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
    """Bytes any kernel must move (docs/design.md §2.1): the logits read once, and for a gradient
    the gradient written once; forward+backward is one read and one write, what the one-pass
    forward moves."""
    per = k * n * v * elt
    return {"forward": per, "backward": 2 * per, "forward+backward": 2 * per}[mode]


# CPU forward+backward: each case gets this many calls at least, each on fresh logits, so that the
# table's spread (min / median / max) shows the slow calls a training loop pays and a minimum or
# a median of few repetitions hides. Contenders slower than CPU_SLOW_CALL_S a call get the grid's
# repetitions instead (the eager formula takes seconds a call on two cores).
CPU_SPREAD_CALLS = 15
CPU_SLOW_CALL_S = 1.0


def cpu_training_step(fn, logits, target):
    """A zero-argument callable returning the ms of one forward+backward of fn on fresh logits: a
    clone, made untimed, as a training step's model writes new logits each step (the memory a
    call writes first may then be new to the process, as in training). The clone is not a leaf,
    as logits in training are not, and the gradient stops at it."""
    src = logits.detach().requires_grad_()

    def step() -> float:
        x = src.clone()
        t = time.perf_counter()
        torch.autograd.grad(fn(x, target), x)
        return 1e3 * (time.perf_counter() - t)

    return step


def spread(times: list[float]) -> dict:
    """ms (the median), min_ms, max_ms and calls of a list of per-call times in ms."""
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "calls": len(times)}


class CpuFloor:
    """The CPU floor of a two-pass design (docs/design.md §2.2): the larger of 1.5 plain copies
    (2 reads + 1 write) and two torch.exp passes over the logits (exp, not memory, bounds this
    loss on a CPU), written into an existing tensor."""

    def __init__(self, logits):
        self.logits, self.dst = logits, torch.empty_like(logits)

    def once_ms(self) -> float:
        t = time.perf_counter()
        self.dst.copy_(self.logits)
        copy = time.perf_counter() - t
        t = time.perf_counter()
        torch.exp(self.logits, out=self.dst)
        exp = time.perf_counter() - t
        return 1e3 * max(1.5 * copy, 2 * exp)

    def paired(self, step, reps: int, seconds: float) -> dict:
        """spread() of step's per-call ms, with floor_ms (the median floor) and x_floor (the median
        of the per-call ratios to the floor timed right after it): on a shared machine the ratio
        of neighbouring measurements drifts far less than either time. CPU_SPREAD_CALLS calls at
        least (the grid's reps for contenders slower than CPU_SLOW_CALL_S); fast ones get up to 31,
        about `seconds` of calls in all."""
        step()  # warm: the first call of a torch.compile contender compiles
        first = 1e-3 * step()
        calls = reps if first > CPU_SLOW_CALL_S else max(reps, CPU_SPREAD_CALLS, min(31, int(seconds / max(first, 1e-6))))
        times, floors = [], []
        for _ in range(calls):
            times.append(step())
            floors.append(self.once_ms())
        out = spread(times)
        out.update(floor_ms=statistics.median(floors), x_floor=statistics.median(a / b for a, b in zip(times, floors)))
        return out


def copy_bandwidth(logits, device, reps) -> float:
    """Bytes per second of a device copy of `logits` (read + write)."""
    dst = torch.empty_like(logits)
    ms = time_ms(lambda: dst.copy_(logits), device, reps)
    return 2 * logits.numel() * logits.element_size() / (ms * 1e-3)
