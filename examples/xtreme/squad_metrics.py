"""SQuAD-style exact match and token F1 (the official normalisation: lower case, no punctuation,
no English articles, single spaces), best over the gold answers."""
import collections
import re
import string

_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if not p or not g:
        return float(p == g)
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict, answers: dict) -> dict:
    """predictions {id: text}, answers {id: [gold texts]} -> {"exact_match", "f1"} in percent."""
    if not answers:
        raise ValueError("answers must not be empty")
    em = f1 = 0.0
    for qid, golds in answers.items():
        pred = predictions.get(qid, "")
        em += max(float(normalize(pred) == normalize(g)) for g in golds)
        f1 += max(token_f1(pred, g) for g in golds)
    return {"exact_match": 100 * em / len(answers), "f1": 100 * f1 / len(answers)}
