"""Supervised fine-tuning of a causal LM with intra-distillation, through TRL's SFTTrainer.

    python -m examples.llm.sft --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --bf16 --passes 3
    python -m examples.llm.sft --model tiny            # offline: tiny Llama, real de-en instructions
    torchrun --nproc-per-node 8 -m examples.llm.sft --model Qwen/Qwen2.5-7B --dataset trl-lib/Capybara --bf16 --fsdp

With a hub id or a local path, the model, its tokenizer and (with --dataset) a hub dataset in a
format TRL reads (`messages`, `prompt`/`completion` or `text` columns) are loaded with transformers
and datasets. `--model tiny` needs no network beyond the Debian package of German-English sentence
pairs: a byte-level BPE tokenizer is trained on them and a small Llama is built from a config.
The loss of the K passes goes through the fused-linear path: the [K, B, T, V] logits are never built.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="hub id or local path of a causal LM, or 'tiny' (offline)")
    p.add_argument("--dataset", default=None, help="hub dataset id (default: the offline de-en instructions)")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--train-split", default="train")
    p.add_argument("--method", choices=("intra-distillation", "baseline"), default="intra-distillation")
    p.add_argument("--passes", type=int, default=3, help="K dropout passes (2 or 3 for LLMs)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--divergence", choices=("x", "js", "jeffrey"), default="x")
    p.add_argument("--dropout", type=float, default=0.1, help="attention dropout set on the model's config")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default 2e-5 for a hub model, 3e-3 for tiny")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=None, help="cap on training rows")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    shard = p.add_mutually_exclusive_group()
    shard.add_argument("--fsdp", action="store_true",
                       help="FSDP2 (fully_shard, one unit per decoder layer) over the processes of torchrun / "
                            "accelerate launch; the loss runs inside the forward, where the output layer is gathered")
    shard.add_argument("--deepspeed", action="store_true",
                       help="DeepSpeed ZeRO-3 over the processes of the launcher (needs `pip install deepspeed`)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (offline runs)")
    p.add_argument("--output-dir", default="runs/llm-sft")
    return p.parse_args(argv)


# ZeRO-3 with the batch sizes, precision and clipping taken from the Trainer's arguments.
ZERO3 = {"zero_optimization": {"stage": 3, "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": True},
         "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
         "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def sharding(args) -> dict:
    """SFTConfig arguments of the --fsdp / --deepspeed strategies."""
    if args.fsdp:
        # each decoder layer (the model's _no_split_modules) is a unit of its own; the
        # embeddings, the final norm and the output layer (tied or not) form the root unit
        return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                              "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}
    if args.deepspeed:
        return {"deepspeed": ZERO3}
    return {}


def tiny_model(tokenizer, dropout: float):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attention_dropout=dropout, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return transformers.LlamaForCausalLM(config)


def load(args):
    """(model, tokenizer, train rows, eval rows)."""
    import datasets
    import transformers

    from examples.llm.data import instruction_rows, train_tokenizer, translation_pairs

    if args.model == "tiny":
        pairs = translation_pairs(seed=args.seed)
        tokenizer = train_tokenizer([s for pair in pairs for s in pair])
        model = tiny_model(tokenizer, args.dropout)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        config = transformers.AutoConfig.from_pretrained(args.model)
        if hasattr(config, "attention_dropout"):
            config.attention_dropout = args.dropout
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, config=config, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    if args.dataset:
        full = datasets.load_dataset(args.dataset, args.dataset_config, split=args.train_split)
        split = full.train_test_split(test_size=min(args.eval_samples, len(full) // 10), seed=args.seed)
        train, evaluation = split["train"], split["test"]
    else:
        pairs = translation_pairs(seed=args.seed)
        evaluation = datasets.Dataset.from_list(instruction_rows(pairs[:args.eval_samples]))
        train = datasets.Dataset.from_list(instruction_rows(pairs[args.eval_samples:]))
    if args.train_samples:
        train = train.select(range(min(args.train_samples, len(train))))
    return model, tokenizer, train, evaluation


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from trl import SFTConfig, SFTTrainer

    from intradistill_kernels.integrations.trl import IntraDistillationArguments, IntraDistillationSFTTrainer

    model, tokenizer, train, evaluation = load(args)
    run_dir = Path(args.output_dir) / f"{'tiny' if args.model == 'tiny' else Path(args.model).name}-{args.method}"
    config = SFTConfig(
        output_dir=str(run_dir), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr or (3e-3 if args.model == "tiny" else 2e-5), lr_scheduler_type="cosine",
        warmup_steps=0.05, max_length=args.max_length, bf16=args.bf16, logging_steps=args.logging_steps,
        gradient_checkpointing=args.gradient_checkpointing, save_strategy="no", report_to=[], seed=args.seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, **sharding(args))
    common = dict(model=model, args=config, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer)
    if args.method == "baseline":
        trainer = SFTTrainer(**common)
    else:
        intra = IntraDistillationArguments(passes=args.passes, alpha=args.alpha, divergence=args.divergence,
                                           adaptive=args.alpha > 1)
        trainer = IntraDistillationSFTTrainer(**common, intra_args=intra)
    if args.fsdp and trainer.accelerator.distributed_type != "FSDP":
        # accelerate shards with FSDP on GPUs (and other accelerators) only: elsewhere it would
        # silently train with plain data parallelism
        raise ValueError(f"--fsdp needs several accelerator processes (torchrun / accelerate launch on GPUs); this "
                         f"launch runs {trainer.accelerator.distributed_type} (accelerate has no FSDP on CPU)")
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    result = {
        "model": args.model, "sharding": "fsdp2" if args.fsdp else "zero3" if args.deepspeed else None,
        "processes": trainer.args.world_size, "wrapped": type(trainer.model_wrapped).__name__, "dataset": args.dataset or "trans-de-en instructions (offline)", "method": args.method,
        "passes": args.passes if args.method != "baseline" else 1, "alpha": args.alpha,
        "steps": trainer.state.global_step, "train_rows": len(train), "eval_rows": len(evaluation),
        "eval_loss": metrics["eval_loss"], "train_seconds": round(train_seconds, 1),
        "train_log": [h for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h],
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }
    if trainer.is_world_process_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: result[k] for k in ("model", "method", "sharding", "steps", "eval_loss", "train_seconds")}))
    return result


if __name__ == "__main__":
    main()
