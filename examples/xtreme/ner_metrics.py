"""Entity-level precision/recall/F1 over IOB2 tags (what seqeval's default mode reports on IOB2)."""


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans; an I- tag that does not continue its type starts a new entity."""
    spans, kind, start = set(), None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, i
    return spans


def entity_f1(pred: list[list[str]], gold: list[list[str]]) -> dict:
    if len(pred) != len(gold):
        raise ValueError(f"pred and gold must hold the same number of sentences, got {len(pred)} and {len(gold)}")
    tp = n_pred = n_gold = 0
    for i, (p, g) in enumerate(zip(pred, gold)):
        if len(p) != len(g):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(g)} gold tags")
        ps, gs = {(i, *e) for e in entities(p)}, {(i, *e) for e in entities(g)}
        tp, n_pred, n_gold = tp + len(ps & gs), n_pred + len(ps), n_gold + len(gs)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
