"""Quality gates: compare a stage's lm-eval scores with absolute bars, the teacher baseline and the previous stage
(in absolute terms or in standard errors of the difference)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from compressor.config.schema import GateBar, GateSpec
from compressor.evaluation import STDERR_SUFFIX, higher_is_better, primary_metric

Scores = dict[str, dict[str, float]]  # task -> metric -> value


@dataclass
class GateRow:
    metric: str
    value: Optional[float]
    bar: str
    passed: bool
    stderr: Optional[float] = None  # lm-eval's standard error of `value`, when it gives one

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "FAIL"


def lookup(scores: Optional[Scores], metric_key: str) -> tuple[str, Optional[float]]:
    """'task' (its primary metric) or 'task.metric' -> ('task.metric', value or None)."""
    task, _, metric = metric_key.partition(".")
    task_scores = (scores or {}).get(task, {})
    metric = metric or primary_metric(task, task_scores)
    return f"{task}.{metric}", task_scores.get(metric)


def stderr_of(scores: Optional[Scores], name: str) -> Optional[float]:
    """Standard error of 'task.metric' in `scores`; None when lm-eval gave none (or a non-finite one)."""
    task, _, metric = name.partition(".")
    value = (scores or {}).get(task, {}).get(metric + STDERR_SUFFIX)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def check_gate(gate: GateSpec, scores: Scores, baseline: Optional[Scores], previous: Optional[Scores]) -> list[GateRow]:
    rows: list[GateRow] = []
    for key, bars in gate.metrics.items():
        name, value = lookup(scores, key)
        up = higher_is_better(name.split(".", 1)[1])
        if value is None:
            rows.append(GateRow(name, None, "metric missing from the evaluation", False))
            continue
        start = len(rows)
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
                rows.append(
                    GateRow(
                        name,
                        value,
                        f"{sign} {bar:.4g} ({bars.min_recovery:g} of teacher {base:.4g})",
                        value >= bar if up else value <= bar,
                    )
                )
        if bars.max_drop is not None:
            _, prev = lookup(previous, key)
            if prev is None:
                rows.append(GateRow(name, value, "max_drop: no previous score", False))
            else:
                bar = prev - bars.max_drop if up else prev + bars.max_drop
                sign = ">=" if up else "<="
                rows.append(
                    GateRow(
                        name,
                        value,
                        f"{sign} {bar:.4g} (previous {prev:.4g}, drop <= {bars.max_drop:g})",
                        value >= bar if up else value <= bar,
                    )
                )
        if bars.max_drop_stderr is not None:
            rows.append(_drop_in_stderrs(bars, key, name, value, up, scores, previous))
        stderr = stderr_of(scores, name)
        for row in rows[start:]:
            row.stderr = stderr
    return rows


def _drop_in_stderrs(
    bars: GateBar, key: str, name: str, value: float, up: bool, scores: Scores, previous: Optional[Scores]
) -> GateRow:
    """Drop against the previous stage <= k * sqrt(se_previous² + se_now²)."""
    k = bars.max_drop_stderr
    prev_name, prev = lookup(previous, key)
    if prev is None:
        return GateRow(name, value, "max_drop_stderr: no previous score", False)
    now_se, prev_se = stderr_of(scores, name), stderr_of(previous, prev_name)
    if now_se is None or prev_se is None:
        which = " and ".join(w for w, se in (("this stage", now_se), ("the previous one", prev_se)) if se is None)
        return GateRow(
            name,
            value,
            f"max_drop_stderr: no standard error for {which} (lm-eval reports none for "
            "this metric's aggregation; gate it with max_drop)",
            False,
        )
    diff_se = math.hypot(now_se, prev_se)
    bar = prev - k * diff_se if up else prev + k * diff_se
    sign = ">=" if up else "<="
    return GateRow(
        name,
        value,
        f"{sign} {bar:.4g} (previous {prev:.4g}, drop <= {k:g} x {diff_se:.2g}, the stderr of the difference)",
        value >= bar if up else value <= bar,
    )


def render(stage: str, rows: list[GateRow]):
    from rich.table import Table

    table = Table(title=f"gate: {stage}", title_justify="left")
    for col in ("metric", "value", "stderr", "bar", "verdict"):
        table.add_column(col)
    for row in rows:
        value = "-" if row.value is None else f"{row.value:.4g}"
        stderr = "-" if row.stderr is None else f"±{row.stderr:.2g}"
        table.add_row(
            row.metric,
            value,
            stderr,
            row.bar,
            f"[green]{row.verdict}[/]" if row.passed else f"[bold red]{row.verdict}[/]",
        )
    return table
