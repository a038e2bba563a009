"""TyDiQA-GoldP with intra-distillation (paper §4.3, XTREME set-up): extractive QA trained on
English, SQuAD F1/EM on every language. The divergence is taken over the start and end position
distributions of the K passes.

Real data:  python examples/xtreme/run_tydiqa.py --model xlm-roberta-base
Offline:    python examples/xtreme/run_tydiqa.py --data tests/data/tydiqa_goldp_fixture.jsonl   (plumbing only)
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import xtreme_common as common  # noqa: E402
from squad_metrics import squad_scores  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=common.OFFLINE, help=f"hub name/path, or {common.OFFLINE} (small random XLM-R)")
    ap.add_argument("--data", default=None, help="a TyDiQA-GoldP-format JSON-lines file with a split field "
                    "instead of downloading tydiqa/secondary_task with `datasets`")
    ap.add_argument("--train-language", default="english")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--doc-stride", type=int, default=128)
    ap.add_argument("--max-answer-length", type=int, default=30, help="in tokens")
    ap.add_argument("--output-dir", default="runs/tydiqa")
    common.add_common_args(ap, lr=3e-5, epochs=15, batch_size=32)
    args = ap.parse_args(argv)
    if not 0 < args.doc_stride < args.max_length:
        ap.error("--doc-stride must be between 0 and --max-length")
    return args


def language(row) -> str:
    return row["id"].split("-", 1)[0]  # TyDiQA-GoldP ids start with the language name


def load_rows(args):
    if args.data:
        rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
        train = [r for r in rows if r["split"] == "train"]
        dev = [r for r in rows if r["split"] == "test"]
    else:
        import datasets
        data = datasets.load_dataset("tydiqa", "secondary_task")
        train, dev = list(data["train"]), list(data["validation"])
    train = [r for r in train if language(r) == args.train_language]
    by_lang = {}
    for r in dev:
        by_lang.setdefault(language(r), []).append(r)
    return train, by_lang


def encode(rows, tokenizer, args):
    """Overlapping windows of (question, context); start/end token positions of the answer, or 0
    (the <s> token) when the window does not hold it, as in SQuAD v1 fine-tuning."""
    enc = tokenizer([r["question"].lstrip() for r in rows], [r["context"] for r in rows], truncation="only_second",
                    max_length=args.max_length, stride=args.doc_stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True, padding="max_length")
    starts, ends, example, offsets = [], [], [], []
    for i, offs in enumerate(enc["offset_mapping"]):
        row = rows[enc["overflow_to_sample_mapping"][i]]
        seq = enc.sequence_ids(i)
        ctx = [j for j, s in enumerate(seq) if s == 1]
        a_start = row["answers"]["answer_start"][0]
        a_end = a_start + len(row["answers"]["text"][0])
        s = e = 0
        if ctx and offs[ctx[0]][0] <= a_start and offs[ctx[-1]][1] >= a_end:
            s = next(j for j in ctx if offs[j][1] > a_start)
            e = next(j for j in reversed(ctx) if offs[j][0] < a_end)
        starts.append(s)
        ends.append(e)
        example.append(enc["overflow_to_sample_mapping"][i])
        offsets.append([o if seq[j] == 1 else None for j, o in enumerate(offs)])
    return enc, starts, ends, example, offsets


class Features(torch.utils.data.Dataset):
    def __init__(self, rows, tokenizer, args):
        self.enc, self.starts, self.ends, self.example, self.offsets = encode(rows, tokenizer, args)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        return {"input_ids": torch.tensor(self.enc["input_ids"][i]),
                "attention_mask": torch.tensor(self.enc["attention_mask"][i]),
                "start_positions": torch.tensor(self.starts[i]), "end_positions": torch.tensor(self.ends[i])}


def predict_answers(trainer, rows, feats, max_answer_length, n_best=20) -> dict:
    start_logits, end_logits = trainer.predict(feats).predictions[:2]
    best = {}
    for f, ex in enumerate(feats.example):
        offs = feats.offsets[f]
        s_top = np.argsort(start_logits[f])[::-1][:n_best]
        e_top = np.argsort(end_logits[f])[::-1][:n_best]
        for s in s_top:
            for e in e_top:
                if offs[s] is None or offs[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = start_logits[f][s] + end_logits[f][e]
                if ex not in best or score > best[ex][0]:
                    best[ex] = (score, rows[ex]["context"][offs[s][0]:offs[e][1]].strip())
    return {rows[ex]["id"]: text for ex, (_, text) in best.items()}


def main(argv=None):
    args = parse_args(argv)
    import transformers
    train_rows, dev_rows = common.start(args, load_rows, args.train_language)
    tokenizer, model = common.load_model(transformers.AutoModelForQuestionAnswering, args.model)
    out_dir = Path(args.output_dir) / f"tydiqa-{args.method}"
    trainer = common.make_trainer(args, model, Features(train_rows, tokenizer, args),
                                  transformers.default_data_collator, out_dir)
    start = time.time()
    trainer.train()
    per_lang = {}
    for lang, rows in sorted(dev_rows.items()):
        rows = rows[:args.max_eval_samples] if args.max_eval_samples else rows
        feats = Features(rows, tokenizer, args)
        preds = predict_answers(trainer, rows, feats, args.max_answer_length)
        per_lang[lang] = squad_scores(preds, {r["id"]: r["answers"]["text"] for r in rows})
    result = {
        "task": "tydiqa-goldp", "method": args.method, "model": args.model, "data": args.data or "tydiqa",
        "passes": 1 if args.method == "baseline" else args.passes, "alpha": args.alpha,
        "train_examples": len(train_rows), "steps": trainer.state.global_step, "per_language": per_lang,
        "average": {k: float(np.mean([m[k] for m in per_lang.values()])) for k in ("f1", "exact_match")} if per_lang else None,
        "train_log": [h for h in trainer.state.log_history if "loss" in h],
        "seconds": round(time.time() - start, 1), "machine": common.machine(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({"per_language": per_lang, "average": result["average"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
