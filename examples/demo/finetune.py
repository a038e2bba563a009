"""Fine-tune the demo's classifier with one method (baseline or intra-distillation) and seed.

Both methods see the same model, data, batches, steps and dropout; intra-distillation runs the
batch K times in one forward (each copy gets its own dropout mask) and adds alpha times the
X-divergence of the K predictions to their mean cross-entropy. The validation split is scored
every `eval_every` steps; the checkpoint with the lowest validation loss is kept, and the test
split is read only at the end, for that best checkpoint and for the final one.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from intradistill_kernels import AdaptiveAlpha, intra_distillation_loss
from intradistill_kernels._progress import progress_bar

from . import sentiment

METHODS = ("baseline", "intra-distillation")


@dataclass
class Regime:
    """What both methods share, chosen by the validation loss of the regimes in
    examples/demo/README.md. alpha, p and q are the paper's translation settings (alpha 5, reached
    by the adaptive schedule of Eq. 11-12 with p = 5, q = 10), K its 3, and the optimiser its GLUE
    fine-tuning optimiser (Adamax, lr 2e-4; batch 16 here). Dropout 0.3 for both methods: at the
    model's own 0.1 the K predictions of a binary classifier barely differ (X-divergence ~0.003)
    and the term had no measurable effect at any alpha tried."""
    task: str = "sst2"
    train_size: int = 240
    valid_size: int = 200
    test_size: int = 1000
    layers: int | None = 3  # the first 3 of the 6 pretrained layers: half the cost per step
    dropout: float = 0.3  # hidden, attention and head dropout (the model's own is 0.1)
    max_length: int = 48  # tokens; longer than all but a few snippets
    batch_size: int = 16
    lr: float = 2e-4
    epochs: float = 8.0
    eval_every: int = 15  # once an epoch at 240 examples
    passes: int = 3
    alpha: float = 5.0
    p: float = 5.0
    q: float = 10.0

    def check(self) -> "Regime":
        if self.task not in sentiment.TASKS:
            raise ValueError(f"task must be one of {sorted(sentiment.TASKS)}, got {self.task!r}")
        for name in ("train_size", "valid_size", "test_size", "max_length", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.passes < 2:
            raise ValueError(f"passes must be >= 2 (K passes for intra-distillation), got {self.passes}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.epochs > 0 or not self.lr > 0 or self.alpha < 0:
            raise ValueError(f"epochs and lr must be > 0 and alpha >= 0, got {self.epochs}, {self.lr}, {self.alpha}")
        return self

    @property
    def steps(self) -> int:
        return max(1, round(self.epochs * self.train_size / self.batch_size))


class PeakMemory:
    """Peak extra memory of a block of code, in MiB: the CUDA allocator's high-water mark on a GPU;
    on a CPU the resident set size sampled every few milliseconds (the process-wide ru_maxrss
    would carry one run's peak into the next), minus its value at the start."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = (max(self._peak, _rss_bytes()) - self._start) / 2**20


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: the process high-water mark is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def evaluate(model, examples, pad_id: int, device, batch_size: int = 128) -> dict:
    """Mean cross-entropy (dropout off, one pass) and accuracy."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    # Length-sorted batches pad less; the order does not change a sum.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    for start in range(0, len(order), batch_size):
        batch = sentiment.collate([examples[i] for i in order[start:start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        total += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int(logits.argmax(-1).eq(labels).sum())
    model.train(was_training)
    return {"loss": total / len(examples), "accuracy": correct / len(examples)}


def training_loss(model, batch, method: str, passes: int, alpha: float):
    """(loss, ce, divergence) for one batch."""
    labels = batch.pop("labels")
    if method == "baseline":
        ce = F.cross_entropy(model(**batch).logits.float(), labels)
        return ce, ce, torch.zeros(())
    repeated = {k: v.repeat(passes, 1) for k, v in batch.items()}
    logits = model(**repeated).logits.unflatten(0, (passes, -1))  # [K, B, C]
    out = intra_distillation_loss(logits, labels, alpha)
    return out.loss, out.ce, out.divergence


def run(method: str, seed: int, regime: Regime, data: dict, *, device="cpu", progress: bool | None = None,
        keep_model: bool = False, on_step: Callable[[int], None] | None = None) -> dict:
    """Train one model; data = {"train"|"valid"|"test": encoded examples, "pad_id", "num_labels"}.
    keep_model: also return the best-checkpoint model ("model") and the final one ("final_model").
    on_step(1) is called after every training step (a progress bar in another process)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    device = torch.device(device)
    torch.manual_seed(seed)
    model = sentiment.load_model(data["num_labels"], regime.layers, regime.dropout).to(device)
    model.train()
    opt = torch.optim.Adamax(model.parameters(), lr=regime.lr)
    total = regime.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)  # linear decay, as HF's Trainer
    alpha_at = AdaptiveAlpha(regime.alpha, regime.p, regime.q, total)
    order = torch.Generator().manual_seed(seed)
    train, pad = data["train"], data["pad_id"]

    history, best, step, train_time = [], None, 0, 0.0
    bar = progress_bar(total=total, desc=f"{method} seed {seed}", enabled=progress, dynamic_ncols=True)
    with PeakMemory(device) as memory:
        while step < total:
            for idx in batches(len(train), regime.batch_size, order):
                if step >= total:
                    break
                started = time.perf_counter()
                batch = {k: v.to(device) for k, v in sentiment.collate([train[i] for i in idx], pad).items()}
                alpha = alpha_at(step) if method != "baseline" else 0.0
                loss, ce, div = training_loss(model, batch, method, regime.passes, alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                ce, div = ce.item(), div.item()
                opt.step()
                sched.step()
                step += 1
                train_time += time.perf_counter() - started
                bar.update(1)
                if on_step is not None:
                    on_step(1)
                if step % regime.eval_every == 0 or step == total:
                    valid = evaluate(model, data["valid"], pad, device)
                    history.append({"step": step, "epoch": step * regime.batch_size / len(train),
                                    "valid_loss": valid["loss"], "valid_accuracy": valid["accuracy"],
                                    "train_ce": ce, "divergence": div, "alpha": alpha})
                    if best is None or valid["loss"] < best["valid_loss"]:
                        best = {"step": step, "valid_loss": valid["loss"],
                                "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
                    bar.set_postfix(valid_loss=f"{valid['loss']:.3f}", acc=f"{valid['accuracy']:.3f}")
    bar.close()

    final = {"step": step, "valid_loss": history[-1]["valid_loss"], **_prefixed(evaluate(model, data["test"], pad, device))}
    final_model = copy.deepcopy(model) if keep_model else None
    model.load_state_dict(best.pop("state"))
    best.update(_prefixed(evaluate(model, data["test"], pad, device)))
    result = {"method": method, "passes": 1 if method == "baseline" else regime.passes, "seed": seed,
              "regime": asdict(regime), "steps": step, "best": best, "final": final, "history": history,
              "train_time_s": train_time, "peak_memory_mb": memory.peak_mb, "device": str(device),
              "dropout": model.config.hidden_dropout_prob, "attention_dropout": model.config.attention_probs_dropout_prob,
              "threads": torch.get_num_threads()}
    if keep_model:
        result["model"], result["final_model"] = model, final_model
    return result


def _prefixed(metrics: dict) -> dict:
    return {f"test_{k}": v for k, v in metrics.items()}


def prepare(regime: Regime, cache_dir=None) -> dict:
    regime.check()
    splits = sentiment.load_splits(regime.task, regime.train_size, regime.valid_size, regime.test_size, cache_dir)
    tokenizer = sentiment.load_tokenizer()
    return {name: sentiment.encode(tokenizer, getattr(splits, name), regime.max_length)
            for name in ("train", "valid", "test")} | {"pad_id": tokenizer.pad_token_id,
                                                       "num_labels": splits.num_labels}
