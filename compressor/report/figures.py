"""The report's figures, drawn with matplotlib (Agg) into PNGs, each with the numbers it drew."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

from compressor.evaluation import higher_is_better, primary_metric
from compressor.report.runs import CURVES, PipelineRun


@dataclass
class Plot:
    name: str  # file stem of its PNG
    title: str
    png: bytes
    data: dict  # what was drawn, for readers (and tests) that want the numbers


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def plotted_metrics(runs: list[PipelineRun]) -> list[str]:
    """'task.metric' per task, over all runs, by name: the metrics its gates check, else the task's main metric."""
    gated = {r["metric"] for run in runs for s in run.stages for r in s.get("gate") or [] if r.get("value") is not None}
    names = set(gated)
    for run in runs:
        for model in run.models():
            for task, values in (model.get("scores") or {}).items():
                if not any(g.startswith(task + ".") for g in gated):
                    names.add(f"{task}.{primary_metric(task, values)}")
    return sorted(names)


def score(model: dict, metric: str) -> Optional[float]:
    task, _, name = metric.partition(".")
    value = ((model.get("scores") or {}).get(task) or {}).get(name)
    return float(value) if value is not None else None


def score_vs_size(runs: list[PipelineRun]) -> Optional[Plot]:
    """One panel per task's main metric: the score of the teacher and of each stage's model against its bytes on
    disk, joined in pipeline order; one line per run."""
    metrics = plotted_metrics(runs)
    if not metrics:
        return None
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.4 * len(metrics), 4.4), squeeze=False, layout="constrained")
    data: dict = {}
    for ax, metric in zip(axes[0], metrics):
        for i, run in enumerate(runs):
            points = [
                (m["name"], m["bytes"] / 1e6, score(m, metric))
                for m in run.models()
                if m.get("bytes") and score(m, metric) is not None
            ]
            data.setdefault(run.label, {})[metric] = points
            if not points:
                continue
            xs, ys = [p[1] for p in points], [p[2] for p in points]
            ax.plot(xs, ys, marker="os^Dv"[i % 5], linestyle="-", label=run.label if len(runs) > 1 else None)
            for name, x, y in points:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.2, y=0.12)
        ax.set_xlabel("size (MB on disk, log scale)")
        ax.set_ylabel(metric + ("  (lower is better)" if not higher_is_better(metric) else ""))
        ax.grid(True, alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    fig.suptitle("score against size: teacher and each stage")
    return Plot("score_vs_size", "Score against size", _png(fig), data)


def distill_curves(runs: list[PipelineRun]) -> Optional[Plot]:
    """Distillation loss and learning rate per step, one line per run and distill stage."""
    series = {
        f"{run.label}: {stage}" if len(runs) > 1 else stage: curves
        for run in runs
        for stage, curves in run.curves.items()
        if curves
    }
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5.4 * len(CURVES), 3.9), squeeze=False, layout="constrained")
    for ax, metric in zip(axes[0], CURVES):
        for label, curves in series.items():
            if curves.get(metric):
                ax.plot([s for s, _ in curves[metric]], [v for _, v in curves[metric]], label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("distillation")
    return Plot("distill_curves", "Distillation loss and learning rate", _png(fig), series)


def stage_seconds(runs: list[PipelineRun]) -> Optional[Plot]:
    """Seconds each stage took (the run that made it), grouped by stage, one bar per run."""
    names = list(dict.fromkeys(s["name"] for run in runs for s in run.stages))
    data = {run.label: {s["name"]: s["seconds"] for s in run.stages if s.get("seconds")} for run in runs}
    if not any(data.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(names) * len(runs)), 3.6), layout="constrained")
    width = 0.8 / len(runs)
    for i, (label, seconds) in enumerate(data.items()):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [seconds.get(n, 0) for n in names], width=width, label=label if len(runs) > 1 else None)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("seconds")
    ax.grid(True, axis="y", alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    ax.set_title("seconds per stage")
    return Plot("stage_seconds", "Seconds per stage", _png(fig), data)


def search_trials(runs: list[PipelineRun]) -> Optional[Plot]:
    """A distill search's trials: each one's validation loss (lower is better), the best filled, trials ASHA stopped
    or that failed marked at the axis; one panel per searched stage."""
    panels = [(f"{run.label}: {name}" if len(runs) > 1 else name, found) for run in runs for name, found in
              run.searches.items()]  # fmt: skip
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 1.1 * max(len(f["trials"]) for _, f in panels)) *
                             len(panels), 4.2), squeeze=False, layout="constrained")  # fmt: skip
    data = {}
    for ax, (label, found) in zip(axes[0], panels):
        trials = found["trials"]
        scored = [t["validation_loss"] for t in trials if t["validation_loss"] is not None]
        floor = min(scored) if scored else 0.0
        for i, t in enumerate(trials):
            value = t["validation_loss"]
            best = t["index"] == found["best"]
            if value is None:
                ax.annotate(t["status"].lower(), (i, floor), ha="center", fontsize=7, rotation=90)
                continue
            ax.bar(i, value, color="tab:green" if best else "tab:blue", alpha=1.0 if best else 0.6)
        ax.set_xticks(range(len(trials)), [t["label"].replace(", ", "\n") for t in trials], fontsize=7)
        if scored:
            ax.set_ylim(min(scored) * 0.98, max(scored) * 1.01)
        ax.set_ylabel("validation loss (lower is better)")
        ax.set_title(f"{label}: {len(trials)} trials of {found['trial_steps']} steps, best in green", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        data[label] = [{"label": t["label"], "validation_loss": t["validation_loss"], "best": t["index"] ==
                        found["best"]} for t in trials]  # fmt: skip
    fig.suptitle("distill search")
    return Plot("search_trials", "Distill search: the trials", _png(fig), data)


def figures(runs: list[PipelineRun]) -> list[Plot]:
    plots = (score_vs_size(runs), distill_curves(runs), stage_seconds(runs), search_trials(runs))
    return [p for p in plots if p is not None]
