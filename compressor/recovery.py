"""The distillation table: the teacher, the student trained on the labels alone (distill's `hard_labels` control),
the distilled student, and the fraction of the gap between the first two that distillation recovered:

    recovered = (distilled - hard labels) / (teacher - hard labels)

1 means the student does as well as the teacher; 0 that the teacher taught it nothing beyond the labels (negative:
worse). For a metric where lower is better (perplexity, bits per byte) the same ratio holds with the signs as they
come. With teacher and control equal the fraction is undefined (None)."""

from __future__ import annotations

from typing import Optional

CONTROL = "hard_labels"


def _values(scores: Optional[dict]) -> dict[str, float]:
    """task.metric -> value, without the standard errors."""
    return {
        f"{task}.{metric}": float(value)
        for task, metrics in (scores or {}).items()
        for metric, value in metrics.items()
        if not metric.endswith("_stderr") and isinstance(value, (int, float))
    }


def recovered(teacher: float, control: float, distilled: float) -> Optional[float]:
    gap = teacher - control
    return None if abs(gap) < 1e-12 else (distilled - control) / gap


def distillation_rows(teacher_scores: Optional[dict], stage: dict) -> list[dict]:
    """One row per metric the teacher, the stage's control and its distilled model all have (a stage record of
    tracking.stage_records); [] for a stage without a control."""
    control = (stage.get("references") or {}).get(CONTROL)
    if not control or not teacher_scores:
        return []
    t, c, d = _values(teacher_scores), _values(control.get("scores")), _values(stage.get("scores"))
    return [
        {
            "metric": metric,
            "teacher": t[metric],
            "hard_labels": c[metric],
            "distilled": d[metric],
            "gap_recovered": recovered(t[metric], c[metric], d[metric]),
        }
        for metric in sorted(set(t) & set(c) & set(d))
    ]


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, cells) for the console, HTML and Markdown."""

    def fmt(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.4g}"

    header = ["metric", "teacher", "hard labels", "distilled", "gap recovered"]
    return header, [
        [r["metric"], fmt(r["teacher"]), fmt(r["hard_labels"]), fmt(r["distilled"]), fmt(r["gap_recovered"])]
        for r in rows
    ]
