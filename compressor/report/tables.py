"""The report's tables as header and rows of text cells (a cell may be lines: a value and its gate bars), and the
numbers `runs` and `compare` line up; render.py turns them into HTML and Markdown."""

from __future__ import annotations

from typing import Optional

from compressor.evaluation import STDERR_SUFFIX, higher_is_better, primary_metric
from compressor.report.runs import PipelineRun


class Best(str):
    """A table cell holding the best value of its row (bold in HTML and Markdown)."""


def fmt_params(n: Optional[float]) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def fmt(value, digits: str = ".4g") -> str:
    return "-" if value is None else format(value, digits)


def stage_table(run: PipelineRun) -> tuple[list[str], list[list[str]]]:
    header = ["stage", "kind", "status", "params", "bits", "MB", "seconds", "gate"]
    rows = [
        [
            "teacher",
            "baseline",
            "-",
            fmt_params(run.teacher.get("num_params")),
            "-",
            fmt(run.teacher["bytes"] / 1e6, ".2f") if run.teacher.get("bytes") else "-",
            "-",
            "-",
        ]
    ]
    for s in run.stages:
        rows.append(
            [
                s["name"],
                s["kind"],
                s["status"],
                fmt_params(s.get("num_params")),
                fmt(s.get("bits"), "d"),
                fmt(s["bytes"] / 1e6, ".2f") if s.get("bytes") else "-",
                fmt(s.get("seconds"), ".1f"),
                {"none": "-", "passed": "pass", "warned": "warn"}.get(s.get("gate_verdict"), "-"),
            ]
        )
    return header, rows


def metric_table(run: PipelineRun) -> tuple[list[str], list[list[list[str]]]]:
    """Rows: every eval metric; columns: the teacher and each stage. A cell is lines: the value (± stderr),
    then each gate bar on that metric at that stage with its verdict."""
    models = [run.teacher] + run.stages
    names = sorted(
        {
            f"{t}.{m}"
            for model in models
            for t, values in (model.get("scores") or {}).items()
            for m in values
            if not m.endswith(STDERR_SUFFIX)
        }
    )
    rows = []
    for name in names:
        task, _, metric = name.partition(".")
        row = [[name]]
        for model in models:
            values = (model.get("scores") or {}).get(task) or {}
            value, stderr = values.get(metric), values.get(metric + STDERR_SUFFIX)
            cell = [fmt(value) + (f" ± {stderr:.2g}" if isinstance(stderr, (int, float)) and value is not None else "")]
            cell += [
                f"{'pass' if r['passed'] else 'FAIL'}: {r['bar']}"
                for r in model.get("gate") or []
                if r["metric"] == name
            ]
            row.append(cell)
        rows.append(row)
    return ["metric"] + [m["name"] for m in models], rows


def headline_scores(metrics: dict[str, float]) -> dict[str, float]:
    """The final model's score per task from a parent run's metrics: its gated metrics (those with a recovery/
    figure), else the task's main metric."""
    by_task: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith("final/") and "." in key:
            task, _, metric = key.removeprefix("final/").partition(".")
            by_task.setdefault(task, {})[metric] = value
    gated = {k.removeprefix("recovery/") for k in metrics if k.startswith("recovery/")}
    out = {}
    for task, values in by_task.items():
        names = [f"{task}.{m}" for m in values if f"{task}.{m}" in gated] or [f"{task}.{primary_metric(task, values)}"]
        out.update({name: values[name.partition(".")[2]] for name in names})
    return dict(sorted(out.items()))


def final_figures(run: PipelineRun) -> dict[str, float]:
    """The parent run's final/, recovery/ and seconds/wall metrics (what `runs` and `compare` line up)."""
    keep = ("final/", "recovery/")
    return {k: v for k, v in sorted(run.metrics.items()) if k.startswith(keep) and not k.endswith(STDERR_SUFFIX)} | (
        {"seconds/wall": run.metrics["seconds/wall"]} if "seconds/wall" in run.metrics else {}
    )


def fmt_figure(name: str, value: Optional[float]) -> str:
    """A final figure as a person reads it: parameters in M/B, bytes in MB, compression as a factor."""
    if value is None:
        return "-"
    if name.endswith("/num_params"):
        return fmt_params(value)
    if name.endswith("/bytes"):
        return f"{value / 1e6:.2f} MB"
    if name.endswith("_compression"):
        return f"{value:.2f}x"
    return f"{value:.1f}" if name.startswith("seconds/") else fmt(value)


def differing_settings(runs: list[PipelineRun]) -> dict[str, list[Optional[str]]]:
    keys = sorted({k for run in runs for k in run.params})
    return {k: [run.params.get(k) for run in runs] for k in keys if len({run.params.get(k) for run in runs}) > 1}


def better(metric: str, values: list[Optional[float]]) -> Optional[int]:
    """Index of the best value of a final figure; None when they are all equal."""
    present = [(v, i) for i, v in enumerate(values) if v is not None]
    if len({v for v, _ in present}) < 2:
        return None
    kind, _, name = metric.partition("/")
    if kind == "recovery" or name in ("param_compression", "byte_compression"):
        lower = False
    elif kind == "seconds" or name in ("num_params", "bytes", "bits"):
        lower = True
    else:
        lower = not higher_is_better(name)
    return (min(present) if lower else max(present))[1]


def distillation_tables(run: PipelineRun) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    """(title, table) of each stage with a hard-label control: teacher, hard labels, distilled, gap recovered."""
    from compressor.recovery import distillation_rows, table

    return [
        (f"Distillation: {stage['name']} (teacher, the same student on the labels alone, distilled)", table(rows))
        for stage in run.stages
        if (rows := distillation_rows(run.teacher.get("scores"), stage))
    ]


def comparison(runs: list[PipelineRun]) -> tuple[tuple[list, list, list], tuple[list, list, list]]:
    """(settings that differ, final figures): each as (header, rows, row classes); the best final figure is a
    `Best` cell and rows whose values differ get class `diff`."""
    header = ["", *[r.label for r in runs]]
    settings = [[k, *["-" if v is None else v for v in values]] for k, values in differing_settings(runs).items()]
    names = sorted({k for run in runs for k in final_figures(run)}, key=lambda k: (not k.startswith("final/"), k))
    finals, classes = [], []
    for name in names:
        values = [final_figures(run).get(name) for run in runs]
        best = better(name, values)
        cells = [fmt_figure(name, v) for v in values]
        finals.append([name, *[Best(c) if i == best else c for i, c in enumerate(cells)]])
        classes.append("diff" if len(set(cells)) > 1 else "")
    return (header, settings, ["diff"] * len(settings)), (header, finals, classes)
