"""Call-to-call steadiness of the CPU backend's one-pass forward+backward in a training-like loop.

    python -m benchmarks.cpu_steadiness [--calls 15] [--shape 3 512 32000] [--threads 2] [--out DIR]

Every call gets fresh logits (a clone of the same tensor, the allocation a training step makes
when its model writes new logits), and each call of the loop times, one after the other:
- one-pass: forward + backward of intra_distillation_loss(backend="cpu"), the gradient in a
  fresh buffer;
- in-place: the same with inplace_grad=True on non-leaf logits (the gradient written over them);
- the floors: two torch.exp passes written into an existing tensor of the logits' size (what
  the in-place path must reach), and one torch.exp pass into a fresh tensor (the allocating one).
Per call it also records the process's minor page faults and the kernel's THP and compaction
counters (/proc/vmstat), the evidence of where a slow call's time went. The summary is min /
median / max per variant and how many calls took more than 2x the fastest.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

import intradistill_kernels as idk

from .report import device_name, load_average

VMSTAT_KEYS = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall", "compact_fail", "compact_success",
               "pgmajfault")


def vmstat() -> dict[str, int]:
    """The kernel's THP and compaction counters (empty where /proc/vmstat is unreadable)."""
    try:
        lines = Path("/proc/vmstat").read_text().split("\n")
    except OSError:
        return {}
    pairs = (line.split() for line in lines if line)
    return {k: int(v) for k, v in pairs if k in VMSTAT_KEYS}


def steal_ticks() -> int:
    """Ticks the hypervisor ran something else on this machine's CPUs (0 where unknown)."""
    try:
        return int(Path("/proc/stat").read_text().split("\n")[0].split()[8])
    except (OSError, IndexError, ValueError):
        return 0


def timed(fn) -> dict:
    """fn() timed in ms, with its minor faults and vmstat deltas."""
    before_vm, before_ru, before_steal = vmstat(), resource.getrusage(resource.RUSAGE_SELF), steal_ticks()
    t = time.perf_counter()
    fn()
    ms = 1e3 * (time.perf_counter() - t)
    after_vm, ru = vmstat(), resource.getrusage(resource.RUSAGE_SELF)
    # user and system CPU ms of all threads: a call slowed by other processes has less CPU time
    # than threads x wall time; one slowed in the kernel (page faults) has more system time.
    out = {"ms": ms, "minflt": ru.ru_minflt - before_ru.ru_minflt, "user_ms": 1e3 * (ru.ru_utime - before_ru.ru_utime),
           "sys_ms": 1e3 * (ru.ru_stime - before_ru.ru_stime), "steal_ticks": steal_ticks() - before_steal}
    out.update({k: after_vm[k] - before_vm[k] for k in after_vm if after_vm[k] != before_vm.get(k)})
    return out


def variants(base: torch.Tensor, target: torch.Tensor):
    """name -> a zero-argument callable; each makes its own fresh logits outside the timed part."""
    leaf = base.detach().requires_grad_()
    dst = torch.empty_like(base)

    def fwd_bwd(inplace: bool):
        def run():
            x = leaf.clone()  # non-leaf: inplace_grad=True may overwrite it
            return timed(lambda: torch.autograd.grad(
                idk.intra_distillation_loss(x, target, backend="cpu", inplace_grad=inplace).loss, x))
        return run

    def exp_existing():
        x = base.clone()
        return timed(lambda: (torch.exp(x, out=dst), torch.exp(x, out=dst)))

    def exp_fresh():
        x = base.clone()
        return timed(lambda: torch.exp(x))

    return {"one-pass": fwd_bwd(False), "in-place": fwd_bwd(True),
            "2x exp into existing": exp_existing, "1x exp into fresh": exp_fresh}


def summarize(times: list[float]) -> dict:
    fastest = min(times)
    return {"min": fastest, "median": statistics.median(times), "max": max(times),
            "over_2x_min": sum(t > 2 * fastest for t in times)}


def run(calls: int, shape: tuple[int, int, int], threads: int, verbose: bool, pause: float = 0.0) -> dict:
    torch.set_num_threads(threads)
    k, n, v = shape
    g = torch.Generator().manual_seed(0)
    base = torch.randn(k, n, v, generator=g) * 2
    target = torch.randint(0, v, (n,), generator=g)
    fns = variants(base, target)
    for fn in fns.values():  # first use: the extension's load, torch's pools
        fn()
    per_call = {name: [] for name in fns}
    load_before = load_average()
    for i in range(calls):
        for name, fn in fns.items():
            per_call[name].append(fn())
            time.sleep(pause)
        if verbose:
            print(f"call {i:2d}: " + "  ".join(f"{name} {per_call[name][-1]['ms']:6.1f}" for name in fns), flush=True)
    summary = {name: summarize([c["ms"] for c in rows]) for name, rows in per_call.items()}
    floor = summary["2x exp into existing"]["median"]
    summary["in-place"]["x_floor"] = summary["in-place"]["median"] / floor
    summary["one-pass"]["x_fresh_exp"] = summary["one-pass"]["median"] / summary["1x exp into fresh"]["median"]
    return {"shape": shape, "threads": threads, "calls": calls, "torch": torch.__version__,
            "load_average": [load_before, load_average()], "summary": summary, "per_call": per_call}


def table(result: dict) -> str:
    k, n, v = result["shape"]
    lines = [f"K={k} N={n} V={v} fp32, {result['threads']} threads, {result['calls']} calls, "
             f"load average {result['load_average'][0]} (before) / {result['load_average'][1]} (after)", "",
             "| variant | min ms | median ms | max ms | max/min | calls > 2x min | minor faults/call | system ms/call (median, max) | CPU share |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in result["summary"].items():
        calls = result["per_call"][name]
        faults = statistics.median(c["minflt"] for c in calls)
        sys_ms = [c["sys_ms"] for c in calls]
        # CPU time over threads x wall time: near 1 when the call had every core to itself
        share = statistics.median((c["user_ms"] + c["sys_ms"]) / (result["threads"] * c["ms"]) for c in calls)
        lines.append(f"| {name} | {s['min']:.1f} | {s['median']:.1f} | {s['max']:.1f} | {s['max'] / s['min']:.2f} | "
                     f"{s['over_2x_min']} | {faults:.0f} | {statistics.median(sys_ms):.1f}, {max(sys_ms):.1f} | {share:.2f} |")
    s = result["summary"]
    lines += ["", f"in-place / two exp passes into an existing tensor (medians): {s['in-place']['x_floor']:.2f}x",
              f"one-pass / one exp pass into a fresh tensor (medians): {s['one-pass']['x_fresh_exp']:.2f}x"]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_steadiness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--shape", type=int, nargs=3, default=(3, 512, 32000), metavar=("K", "N", "V"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds between two timed calls (the rest of a training step)")
    ap.add_argument("--out", help="directory for cpu_steadiness.md and cpu_steadiness.json (every call's record)")
    ap.add_argument("--quiet", action="store_true", help="no per-call line")
    args = ap.parse_args(argv)
    result = run(args.calls, tuple(args.shape), args.threads, not args.quiet, args.pause)
    text = f"Device: `{device_name('cpu')}`, torch {result['torch']}.\n\n{table(result)}\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cpu_steadiness.md").write_text(text)
        (out / "cpu_steadiness.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
