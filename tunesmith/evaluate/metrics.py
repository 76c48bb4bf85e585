"""BLEU-4 and ROUGE of a prediction against its reference, computed as LLaMA-Factory computes them.

LLaMA-Factory's `ComputeSimilarity` (and its `scripts/eval_bleu_rouge.py`) score each row on its own and report the
mean over rows, so numbers from either tool can be compared:
- BLEU-4 on characters (for every language: English words become character n-grams), nltk's `sentence_bleu` with the
  default weights (0.25 each for 1–4-grams) and smoothing method 3;
- ROUGE-1/2/L F-scores (rouge-chinese) on jieba's words; if either side has no word, all three are 0;
- each score × 100, rounded to 4 decimals, then the mean over rows.
"""

from __future__ import annotations

from collections.abc import Iterable

from tunesmith.errors import NotSupportedYet

METRIC_NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
EXTRA = "evaluate"


def require_metric_libraries() -> None:
    """One clear line when the optional `evaluate` extra is missing (checked before any model loads)."""
    import importlib.util

    missing = [name for name in ("nltk", "jieba", "rouge_chinese") if importlib.util.find_spec(name) is None]
    if missing:
        raise NotSupportedYet(
            f"scoring predictions needs {', '.join(missing)}: pip install 'tunesmith[{EXTRA}]' "
            "(nltk, jieba, rouge-chinese)"
        )


def similarity(prediction: str, label: str) -> dict[str, float]:
    """The four scores of one row, each × 100 and rounded to 4 decimals."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    scores: dict[str, float] = {}
    hypothesis = " ".join(jieba.cut(prediction))
    reference = " ".join(jieba.cut(label))
    if not hypothesis.split() or not reference.split():
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        result = Rouge().get_scores(hypothesis, reference)[0]
        rouge = {name: result[name]["f"] for name in ("rouge-1", "rouge-2", "rouge-l")}
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    scores.update({name: round(value * 100, 4) for name, value in rouge.items()})
    return scores


def mean_similarity(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """The mean of each score over (prediction, label) pairs; empty when there are none."""
    rows = [similarity(prediction, label) for prediction, label in pairs]
    if not rows:
        return {}
    return {name: sum(row[name] for row in rows) / len(rows) for name in METRIC_NAMES}


def exact_match(prediction: str, label: str) -> float:
    """100 when the prediction equals the label, ignoring whitespace at either end, else 0."""
    return 100.0 if prediction.strip() == label.strip() else 0.0
