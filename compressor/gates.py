"""Quality gates: compare a stage's lm-eval scores with absolute bars, the teacher baseline and the previous stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from compressor.config.schema import GateSpec
from compressor.evaluation import higher_is_better, primary_metric

Scores = dict[str, dict[str, float]]  # task -> metric -> value


@dataclass
class GateRow:
    metric: str
    value: Optional[float]
    bar: str
    passed: bool

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "FAIL"


def lookup(scores: Optional[Scores], metric_key: str) -> tuple[str, Optional[float]]:
    """'task' (its primary metric) or 'task.metric' -> ('task.metric', value or None)."""
    task, _, metric = metric_key.partition(".")
    task_scores = (scores or {}).get(task, {})
    metric = metric or primary_metric(task, task_scores)
    return f"{task}.{metric}", task_scores.get(metric)


def check_gate(gate: GateSpec, scores: Scores, baseline: Optional[Scores], previous: Optional[Scores]) -> list[GateRow]:
    rows: list[GateRow] = []
    for key, bars in gate.metrics.items():
        name, value = lookup(scores, key)
        up = higher_is_better(name.split(".", 1)[1])
        if value is None:
            rows.append(GateRow(name, None, "metric missing from the evaluation", False))
            continue
        if bars.min is not None:
            rows.append(GateRow(name, value, f">= {bars.min:g}", value >= bars.min))
        if bars.max is not None:
            rows.append(GateRow(name, value, f"<= {bars.max:g}", value <= bars.max))
        if bars.min_recovery is not None:
            _, base = lookup(baseline, key)
            if base is None:
                rows.append(GateRow(name, value, "recovery: no teacher baseline", False))
            else:
                bar = bars.min_recovery * base if up else base / bars.min_recovery
                sign = ">=" if up else "<="
                rows.append(GateRow(name, value, f"{sign} {bar:.4g} ({bars.min_recovery:g} of teacher {base:.4g})",
                                    value >= bar if up else value <= bar))
        if bars.max_drop is not None:
            _, prev = lookup(previous, key)
            if prev is None:
                rows.append(GateRow(name, value, "max_drop: no previous score", False))
            else:
                bar = prev - bars.max_drop if up else prev + bars.max_drop
                sign = ">=" if up else "<="
                rows.append(GateRow(name, value, f"{sign} {bar:.4g} (previous {prev:.4g}, drop <= {bars.max_drop:g})",
                                    value >= bar if up else value <= bar))
    return rows


def render(stage: str, rows: list[GateRow]):
    from rich.table import Table

    table = Table(title=f"gate: {stage}", title_justify="left")
    for col in ("metric", "value", "bar", "verdict"):
        table.add_column(col)
    for row in rows:
        value = "-" if row.value is None else f"{row.value:.4g}"
        table.add_row(row.metric, value, row.bar, f"[green]{row.verdict}[/]" if row.passed else f"[bold red]{row.verdict}[/]")
    return table
