"""LongBench's scoring functions (qa F1, ROUGE-L, classification, retrieval, count) plus L-Eval multiple choice.

Definitions follow LongBench's `metrics.py`: an item's score is the maximum over its gold answers,
a task's score is the mean over items times 100. One deliberate difference: ROUGE-L uses the
maintained `rouge_score` package (`RougeScorer(["rougeL"])`, F-measure, no stemming; it lowercases
and keeps alphanumeric tokens), where LongBench used the `rouge` package on whitespace tokens, so
summary scores are comparable in trend but not digit for digit.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop articles, collapse whitespace (SQuAD / LongBench)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def f1_tokens(prediction: Sequence[str], truth: Sequence[str]) -> float:
    """Token-level F1 of two token lists (bag of tokens)."""
    same = sum((Counter(prediction) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, truth: str, **_) -> float:
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(truth).split())


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_score(prediction: str, truth: str, **_) -> float:
    """ROUGE-L F-measure (rouge_score package); 0 when either side has no tokens."""
    if not prediction.strip() or not truth.strip():
        return 0.0
    return float(_rouge().score(truth, prediction)["rougeL"].fmeasure)


def classification_score(prediction: str, truth: str, all_classes: Sequence[str] = (), **_) -> float:
    """LongBench trec: class names found in the prediction; 1/len(matches) if the gold is among them.

    A class name that is a strict substring of the gold label is discarded first. The loop removes
    from the list it iterates, exactly as LongBench does (so it can skip an element): replicated on
    purpose, so scores match LongBench's.
    """
    matches = [c for c in all_classes if c in prediction]
    for term in matches:
        if term in truth and term != truth:
            matches.remove(term)
    return 1.0 / len(matches) if truth in matches else 0.0


def _number_match(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == target for n in numbers) / len(numbers)


def retrieval_score(prediction: str, truth: str, **_) -> float:
    """passage_retrieval_en: the gold "Paragraph N"'s N among the numbers of the prediction (fraction)."""
    found = re.findall(r"Paragraph (\d+)", truth)
    return _number_match(prediction, found[0]) if found else 0.0


def count_score(prediction: str, truth: str, **_) -> float:
    """passage_count: fraction of the prediction's numbers that equal the gold count."""
    return _number_match(prediction, str(truth))


_CHOICE_GOLD = re.compile(r"^\s*\(?([A-Z])\)?(?:[\s.:)]|$)")
_CHOICE_PRED = re.compile(r"(?<![A-Za-z])\(?([A-D])\)?(?![A-Za-z])")


def choice_score(prediction: str, truth: str, **_) -> float:
    """L-Eval multiple choice: the first option letter (A-D) in the prediction equals the gold's letter."""
    gold = _CHOICE_GOLD.match(truth)
    pred = _CHOICE_PRED.search(prediction)
    return float(bool(gold and pred and pred.group(1) == gold.group(1)))


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "rouge_l": rouge_l_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "count": count_score,
    "choice": choice_score,
}


def score_item(metric: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] = (),
               first_line: bool = False) -> float:
    """Max over `answers` of `metric` (0..1). `first_line`: LongBench's cut for trec/triviaqa/samsum."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    if first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = METRICS[metric]
    return max((fn(prediction, a, all_classes=all_classes) for a in answers), default=0.0)


def task_score(scores: Sequence[float]) -> float:
    """Mean item score x 100 (NaN for no items)."""
    return 100.0 * sum(scores) / len(scores) if scores else float("nan")


def mean_kl(base_lp, cached_lp) -> float:
    """Mean over steps of KL(base || cached); rows are log-probabilities `[steps, vocab]` (torch)."""
    kl = (base_lp.exp() * (base_lp - cached_lp)).sum(-1)
    return float(kl.mean())
