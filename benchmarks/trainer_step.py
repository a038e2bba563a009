"""Time and peak memory of one Trainer step (forward + loss + backward) for a causal LM:

- plain:        transformers.Trainer, one pass (K = 1), the model's own cross-entropy;
- fused:        IntraDistillationTrainer, K passes, fused-linear loss (no [K, B, T, V] logits);
- materialised: IntraDistillationTrainer, K passes, the same loss on the model's logits
                (IntraDistillationArguments(fused_linear=False));
- backbone:     the K passes through the model without its output layer, and a loss that costs
                nothing (the mean square of the final hidden states): what the two K-pass steps
                share. Their peak minus its peak is the peak of the loss (output layer included).

Each contender runs in its own fresh process, the contenders interleaved, `--repeats` rounds: the
machine may be shared, so the ratios are taken within a round. Peak memory is the rise of the
process's resident high-water mark over one step (CPU; large blocks are mmapped so that freed
memory leaves the RSS) or the CUDA allocator's peak over the step above what was allocated before it.

    python -m benchmarks.trainer_step                                  # CPU, scaled shape
    python -m benchmarks.trainer_step --device cuda --dtype bfloat16 --hidden 4096 --vocab 128256 \
        --layers 2 --batch 4 --seq 2048 --passes 3 --chunk-size 0
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("plain", "fused", "materialised", "backbone")


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: VmHWM := VmRSS
        f.write("5")
    return _rss("VmRSS")


def run_one(args) -> dict:
    """One contender in this process: a warm-up step, then `steps` timed steps; the peak of the first."""
    import torch
    import transformers

    from intradistill_kernels.integrations.transformers import IntraDistillationArguments, IntraDistillationTrainer

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=args.seq, attention_dropout=0.1, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # a prompt without loss, as in SFT
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}
    targs = transformers.TrainingArguments(output_dir="/tmp/trainer_step_bench", report_to=[], save_strategy="no",
                                           use_cpu=args.device == "cpu", disable_tqdm=True)
    if args.contender in ("plain", "backbone"):
        trainer = transformers.Trainer(model=model, args=targs)
    else:
        intra = IntraDistillationArguments(passes=args.passes, adaptive=False, fused_linear=args.contender == "fused",
                                           chunk_size=args.chunk_size or None)
        trainer = IntraDistillationTrainer(model=model, args=targs, intra_args=intra)

    trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step reads it

    def backbone_step():
        from intradistill_kernels.integrations.transformers import repeat_batch

        inputs = repeat_batch({k: v for k, v in batch.items() if k != "labels"}, args.passes)
        hidden = model.model(**inputs).last_hidden_state
        loss = hidden.float().square().mean()
        loss.backward()
        return loss.detach()

    def step():
        loss = backbone_step() if args.contender == "backbone" else trainer.training_step(model, dict(batch))
        model.zero_grad(set_to_none=False)  # gradient buffers stay allocated, as between optimiser steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    step()  # warm-up: libraries, kernels, gradient buffers
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak()
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
        if i == 0:
            peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss("VmHWM")) - base
    return {"contender": args.contender, "seconds": statistics.median(times), "times": times, "peak_bytes": peak,
            "loss": loss}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk of the fused path (0: its default)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (median)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of all contenders")
    p.add_argument("--contender", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="directory for results.json and results.md")
    return p.parse_args(argv)


def _child(argv, contender) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "benchmarks.trainer_step", *argv, "--contender", contender],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.contender:
        print(json.dumps(run_one(args)))
        return None
    rounds = []
    for r in range(args.repeats):
        rounds.append({c: _child(argv, c) for c in CONTENDERS})
        print(json.dumps({c: (round(v["seconds"], 3), v["peak_bytes"] >> 20) for c, v in rounds[-1].items()}), flush=True)
    shape = {k: getattr(args, k) for k in ("device", "dtype", "hidden", "vocab", "layers", "batch", "seq", "passes",
                                          "chunk_size")}
    ratios = [{"fused/materialised peak": r["fused"]["peak_bytes"] / r["materialised"]["peak_bytes"],
               "fused/materialised loss peak": (r["fused"]["peak_bytes"] - r["backbone"]["peak_bytes"])
               / (r["materialised"]["peak_bytes"] - r["backbone"]["peak_bytes"]),
               "fused/materialised time": r["fused"]["seconds"] / r["materialised"]["seconds"],
               "fused/plain time": r["fused"]["seconds"] / r["plain"]["seconds"]} for r in rounds]
    result = {"shape": shape, "rounds": rounds, "ratios": ratios,
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version()}}
    lines = [f"One Trainer step of a {args.layers}-layer Llama, H = {args.hidden}, V = {args.vocab}, B = {args.batch}, "
             f"T = {args.seq}, K = {args.passes}, {args.dtype} on {args.device}, fused chunks of {args.chunk_size} "
             f"tokens; median of {args.steps} steps per "
             "process, peak extra memory of one step.", "",
             "| round | contender | step (s) | peak extra memory (MiB) |", "| --- | --- | --- | --- |"]
    for i, r in enumerate(rounds):
        for c in CONTENDERS:
            lines.append(f"| {i} | {c} | {r[c]['seconds']:.3f} | {r[c]['peak_bytes'] / 2**20:.0f} |")
    lines += ["", "| round | fused / materialised peak: step | : loss (step - backbone) | fused / materialised time "
              "| fused / plain (K = 1) time |", "| --- | --- | --- | --- | --- |"]
    for i, q in enumerate(ratios):
        lines.append(f"| {i} | {q['fused/materialised peak']:.3f} | {q['fused/materialised loss peak']:.3f} | "
                     f"{q['fused/materialised time']:.3f} | {q['fused/plain time']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "trainer_step.json").write_text(json.dumps(result, indent=2))
        (out / "trainer_step.md").write_text(text)
    return result


if __name__ == "__main__":
    main()
