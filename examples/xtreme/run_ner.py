"""Cross-lingual NER on PAN-X (WikiANN) with intra-distillation (paper §4.3, XTREME set-up):
train on English, evaluate entity F1 on every language.

Real data:  python examples/xtreme/run_ner.py --model xlm-roberta-large
Offline:    python examples/xtreme/run_ner.py --data tests/data/wikiann_fixture.jsonl   (plumbing only)
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
from ner_metrics import entity_f1  # noqa: E402

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]  # WikiANN's ner_tags ids
PANX_LANGS = ("ar he vi id jv ms tl eu ml ta te af nl en de el bn hi mr ur fa fr it pt es bg ru ja ka ko th sw "
              "yo my zh kk tr et fi hu").split()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=common.OFFLINE, help=f"hub name/path, or {common.OFFLINE} (small random XLM-R)")
    ap.add_argument("--data", default=None, help="a WikiANN-format JSON-lines file (tokens, ner_tags, langs, "
                    "split) instead of downloading wikiann with `datasets`")
    ap.add_argument("--languages", default=",".join(PANX_LANGS), help="evaluation languages (real data)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--output-dir", default="runs/panx")
    common.add_common_args(ap, lr=2e-5, epochs=10, batch_size=32)
    return ap.parse_args(argv)


def load_rows(args):
    """(English training rows, {language: evaluation rows})."""
    if args.data:
        rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
        train = [r for r in rows if r["split"] == "train" and r["langs"][0] == "en"]
        test = {}
        for r in rows:
            if r["split"] == "test":
                test.setdefault(r["langs"][0], []).append(r)
        return train, test
    import datasets
    train = list(datasets.load_dataset("wikiann", "en", split="train"))
    test = {lang: list(datasets.load_dataset("wikiann", lang, split="test")) for lang in args.languages.split(",")}
    return train, test


class Encoded(torch.utils.data.Dataset):
    """Word-level tags put on each word's first sub-word; the other pieces get -100 (ignored)."""

    def __init__(self, rows, tokenizer, max_length):
        self.enc = tokenizer([r["tokens"] for r in rows], is_split_into_words=True, truncation=True,
                             max_length=max_length)
        self.labels, self.first_piece = [], []
        for i, r in enumerate(rows):
            labels, firsts, prev = [], [], None
            for j, w in enumerate(self.enc.word_ids(i)):
                first = w is not None and w != prev
                labels.append(int(r["ner_tags"][w]) if first else -100)
                if first:
                    firsts.append(j)
                prev = w
            self.labels.append(labels)
            self.first_piece.append(firsts)
        self.n_words = [len(r["tokens"]) for r in rows]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


def evaluate(trainer, dataset, rows) -> dict:
    logits = trainer.predict(dataset).predictions
    pred, gold = [], []
    for i, r in enumerate(rows):
        tags = [LABELS[int(np.argmax(logits[i, j]))] for j in dataset.first_piece[i]]
        tags += ["O"] * (len(r["tokens"]) - len(tags))  # words cut off by max_length count as "O"
        pred.append(tags)
        gold.append([LABELS[int(t)] for t in r["ner_tags"]])
    return entity_f1(pred, gold)


def main(argv=None):
    args = parse_args(argv)
    import transformers
    train_rows, test_rows = common.start(args, load_rows, "English")
    tokenizer, model = common.load_model(transformers.AutoModelForTokenClassification, args.model,
                                         num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                                         label2id={t: i for i, t in enumerate(LABELS)})
    collator = transformers.DataCollatorForTokenClassification(tokenizer)
    out_dir = Path(args.output_dir) / f"panx-{args.method}"
    trainer = common.make_trainer(args, model, Encoded(train_rows, tokenizer, args.max_length), collator, out_dir)
    start = time.time()
    trainer.train()
    per_lang = {}
    for lang, rows in sorted(test_rows.items()):
        rows = rows[:args.max_eval_samples] if args.max_eval_samples else rows
        per_lang[lang] = evaluate(trainer, Encoded(rows, tokenizer, args.max_length), rows)
    result = {
        "task": "panx", "method": args.method, "model": args.model, "data": args.data or "wikiann",
        "passes": 1 if args.method == "baseline" else args.passes, "alpha": args.alpha,
        "train_examples": len(train_rows), "steps": trainer.state.global_step,
        "f1": {lang: m["f1"] for lang, m in per_lang.items()},
        "average_f1": float(np.mean([m["f1"] for m in per_lang.values()])) if per_lang else None,
        "per_language": per_lang, "train_log": [h for h in trainer.state.log_history if "loss" in h],
        "seconds": round(time.time() - start, 1), "machine": common.machine(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({"f1": result["f1"], "average_f1": result["average_f1"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
