"""GLUE metrics in numpy (no `evaluate` dependency): accuracy, F1, Matthews, Pearson/Spearman."""
import numpy as np


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float((pred == gold).mean()) if len(gold) else 0.0


def f1_binary(pred, gold) -> float:
    pred, gold = np.asarray(pred) == 1, np.asarray(gold) == 1
    tp = float((pred & gold).sum())
    denom = float(pred.sum() + gold.sum())
    return 2 * tp / denom if denom else 0.0


def matthews(pred, gold) -> float:
    pred, gold = np.asarray(pred) == 1, np.asarray(gold) == 1
    tp, tn = float((pred & gold).sum()), float((~pred & ~gold).sum())
    fp, fn = float((pred & ~gold).sum()), float((~pred & gold).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom else 0.0


def _ranks(x):
    # average ranks for ties, as Spearman's rho defines them
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x, y) -> float:
    return pearson(_ranks(x), _ranks(y))


# the metrics each GLUE task reports (the paper's Table 1 uses the first one of each)
TASK_METRICS = {
    "cola": ("matthews",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"), "stsb": ("pearson", "spearman"),
    "qqp": ("accuracy", "f1"), "mnli": ("accuracy",), "qnli": ("accuracy",), "rte": ("accuracy",),
}
_FUNCS = {"accuracy": accuracy, "f1": f1_binary, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def glue_metrics(task: str, pred, gold) -> dict:
    if task not in TASK_METRICS:
        raise ValueError(f"task must be one of {sorted(TASK_METRICS)}, got {task!r}")
    return {name: _FUNCS[name](pred, gold) for name in TASK_METRICS[task]}
