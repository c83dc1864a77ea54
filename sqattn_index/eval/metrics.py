"""Answer-quality metrics of the eval runner.

- :func:`normalize_answer`: SQuAD/LongBench-style normalisation (lowercase, no punctuation,
  no articles a/an/the, single spaces).
- :func:`qa_f1`: LongBench QA-F1, the best token-level F1 of the prediction against any gold answer.
- :func:`contains_accuracy`: 1.0 when a gold answer occurs in the prediction (case-insensitive).
- :func:`agreement`: how close a sparse prediction is to the dense one.
- :func:`summarize`: mean of each numeric field over per-item result rows.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Iterable, Mapping, Sequence

__all__ = ["normalize_answer", "qa_f1", "token_f1", "contains_accuracy", "agreement", "summarize"]

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace.

    >>> normalize_answer("  The Amber-Vault, a code!  ")
    'ambervault code'
    """
    text = text.lower().translate(_PUNCT_TABLE)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between two strings after :func:`normalize_answer` (bag of words, with counts).

    0.0 when the two share no token, including when either side is empty after normalisation.
    """
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(ground_truth).split()
    overlap = sum((Counter(pred) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred)
    recall = overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, ground_truths: str | Sequence[str]) -> float:
    """LongBench QA-F1: the maximum :func:`token_f1` of ``prediction`` over the gold answers.

    A single string is taken as one gold answer; no gold answers gives 0.0.
    """
    if isinstance(ground_truths, str):
        ground_truths = [ground_truths]
    return max((token_f1(prediction, gold) for gold in ground_truths), default=0.0)


def contains_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if any non-blank gold answer occurs as a substring of ``prediction`` (case-insensitive,
    surrounding whitespace of the answer ignored), else 0.0."""
    if isinstance(answers, str):
        answers = [answers]
    haystack = prediction.casefold()
    for answer in answers:
        needle = answer.strip().casefold()
        if needle and needle in haystack:
            return 1.0
    return 0.0


def agreement(pred_a: str, pred_b: str) -> float:
    """Agreement of two predictions (e.g. sparse vs dense), in [0, 1].

    1.0 when the two are equal after :func:`normalize_answer` (two empty predictions agree);
    otherwise their symmetric token-level F1 (:func:`token_f1`), so a near-identical answer that
    differs in one word scores close to 1 and unrelated answers score 0.
    """
    if normalize_answer(pred_a) == normalize_answer(pred_b):
        return 1.0
    return token_f1(pred_a, pred_b)


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (int, float)):
        return not math.isnan(value)
    return False


def summarize(rows: Iterable[Mapping[str, object]]) -> dict:
    """Average per-item result rows into one dict.

    Every key whose values are numbers (bools count as 0/1) becomes the mean over the rows that
    have a number there; ``None``, NaN, missing and non-numeric values are left out of that key's
    mean, and a key with no number at all is left out. ``"n"`` is the number of rows.

    >>> summarize([{"qa_f1": 1.0, "accuracy": True}, {"qa_f1": 0.5, "accuracy": False, "gold_nll": None}])
    {'qa_f1': 0.75, 'accuracy': 0.5, 'n': 2}
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    n = 0
    for row in rows:
        n += 1
        for key, value in row.items():
            if _is_number(value):
                sums[key] = sums.get(key, 0.0) + float(value)
                counts[key] = counts.get(key, 0) + 1
            else:
                sums.setdefault(key, 0.0)
                counts.setdefault(key, 0)
    out: dict = {key: sums[key] / counts[key] for key in sums if counts[key] > 0}
    out["n"] = n
    return out
