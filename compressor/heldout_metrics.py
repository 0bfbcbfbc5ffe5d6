"""Metrics of a task generated from a labelled held-out JSONL (compressor.heldout).

This file is copied, with its LABELS line filled in, into the generated lm-eval task directory as `metrics.py`, so
the task runs through the `lm_eval` CLI without compressor: it imports only the standard library.

- exact_match: the normalized answer equals the normalized reference (lowercase, punctuation dropped, spaces collapsed).
- accuracy: the first label found in the answer (word-bounded, earliest position; the longer label on a tie) is
  the reference's label.
- f1: macro F1 over the labels that occur as a reference or a prediction (an answer naming no label is a miss)."""

import re
import string

LABELS: list = []  # replaced by the generated copy

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def first_label(answer: str, labels: list) -> str:
    """The label named first in `answer` (normalized), or "" when it names none."""
    text = f" {normalize(answer)} "
    best = None
    for label in labels:
        at = text.find(f" {normalize(label)} ")
        if at >= 0 and (best is None or (at, -len(label)) < best[:2]):
            best = (at, -len(label), label)
    return best[2] if best else ""


def process_results(doc: dict, results: list) -> dict:
    answer, reference = results[0], doc["answer"]
    out = {"exact_match": float(normalize(answer) == normalize(reference))}
    if LABELS:
        predicted = first_label(answer, LABELS)
        out["accuracy"] = float(predicted == first_label(reference, LABELS))
        out["f1"] = (predicted, first_label(reference, LABELS))
    return out


def macro_f1(pairs: list) -> float:
    """Mean over the labels seen (as reference or prediction) of 2TP / (2TP + FP + FN)."""
    seen = {gold for _, gold in pairs} | {pred for pred, _ in pairs if pred}
    scores = []
    for label in seen:
        tp = sum(pred == label == gold for pred, gold in pairs)
        fp = sum(pred == label != gold for pred, gold in pairs)
        fn = sum(gold == label != pred for pred, gold in pairs)
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0
