"""Pipeline runs read back from MLflow: `compressor report`, `compare` and `runs`.

A finished pipeline run's parent carries `stages.json` (written by tracking.log_pipeline_summary): each stage's
model, size, seconds, scores and gate rows, and the teacher's. The distill curves come from the metric history of
the run that trained the student. Figures are drawn with matplotlib (Agg) into PNGs; the HTML embeds them (base64),
so it is one self-contained file; the Markdown links the PNG files beside it."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from compressor.errors import UserError
from compressor.evaluation import STDERR_SUFFIX, higher_is_better, primary_metric
from compressor.tracking import STAGES_ARTIFACT

PIPELINE_TAG = "compressor.pipeline"  # set on every pipeline parent run when it starts
SUMMARY_TAG = "compressor.summary"  # set once the run's summary (stages.json) is logged
CURVES = ("loss", "lr")  # distill metrics drawn per step


@dataclass
class PipelineRun:
    run_id: str
    pipeline: str
    start_time: int  # ms since the epoch
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    teacher: dict
    stages: list[dict]
    final: Optional[str]
    seconds: float
    curves: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)  # stage -> metric -> points
    searches: dict[str, dict] = field(default_factory=dict)  # distill stage -> its search.json (trials, best)
    label: str = ""

    @property
    def started(self) -> str:
        return datetime.fromtimestamp(self.start_time / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def models(self) -> list[dict]:
        """The teacher, then each stage that made a model, in order."""
        return [self.teacher] + [s for s in self.stages if s.get("model_uri")]


@dataclass
class Plot:
    name: str  # file stem of its PNG
    title: str
    png: bytes
    data: dict  # what was drawn, for readers (and tests) that want the numbers


# ---------------------------------------------------------------------------------------------- finding runs
def default_tracking_uri() -> str:
    """As `compressor run` with the shipped pipelines: MLFLOW_TRACKING_URI, else ./artifacts/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('artifacts', 'mlflow.db').resolve()}"


def client_for(uri: str):
    """An MlflowClient; a sqlite store that does not exist is an error (MLflow would create an empty one)."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per small JSON otherwise
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise UserError(
            f"--tracking-uri {uri}: no MLflow store there; run a pipeline first, or pass the store it "
            "logged to with --tracking-uri (or MLFLOW_TRACKING_URI)"
        )
    return MlflowClient(tracking_uri=uri)


def _stage_manifest(ref: str):
    """The manifest of a stage directory (or of the stage holding a model directory), or None."""
    from compressor import storage

    if not (storage.is_remote(ref) or Path(ref).exists()):
        return None
    for where in (ref, storage.stage_dir_of(ref)):
        try:
            manifest = storage.read_manifest(where)
        except ValueError:
            manifest = None
        if manifest is not None:
            return manifest
    return None


def tracking_uri_for(ref: Optional[str], given: Optional[str]) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else for a local stage directory the store beside its storage
    (<storage>/mlflow.db, where `run` logs by default), else ./artifacts/mlflow.db."""
    if given or os.environ.get("MLFLOW_TRACKING_URI") or not ref or not Path(ref).is_dir():
        return given or default_tracking_uri()
    stage_dir = Path(ref).resolve()
    for storage_root in (stage_dir.parent.parent, stage_dir.parent.parent.parent):  # a stage dir or its model/
        if (storage_root / "mlflow.db").is_file():
            return f"sqlite:///{storage_root / 'mlflow.db'}"
    return default_tracking_uri()


def pipeline_runs(client, limit: int = 20, finished_only: bool = False) -> list:
    """Parent runs of pipelines in every experiment, newest first (with a summary only, if `finished_only`)."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000)]
    if not experiments:
        return []
    tag = SUMMARY_TAG if finished_only else PIPELINE_TAG
    return list(
        client.search_runs(
            experiments,
            filter_string=f"tags.`{tag}` LIKE '%'",
            order_by=["attributes.start_time DESC"],
            max_results=limit,
        )
    )


def resolve_run_id(client, ref: Optional[str], uri: str) -> str:
    """A pipeline parent run id from: nothing (the latest finished pipeline run), a run id (a stage's child run
    leads to its parent), or a stage directory (its manifest names the run that made it)."""
    from mlflow.exceptions import MlflowException

    if not ref:
        latest = pipeline_runs(client, limit=1, finished_only=True)
        if not latest:
            raise UserError(f"no finished pipeline run in {uri}; run `compressor run` first or pass --tracking-uri")
        return latest[0].info.run_id
    manifest = _stage_manifest(ref)
    run_id = ref
    if manifest is not None:
        if not manifest.mlflow_run_id:
            raise UserError(
                f"{ref}: its manifest.json names no MLflow run (the stage was run alone, outside a "
                "pipeline); pass a pipeline run id instead"
            )
        run_id = manifest.mlflow_run_id
    try:
        run = client.get_run(run_id)
    except MlflowException:
        if manifest is not None:
            raise UserError(
                f"{ref}: made by MLflow run {run_id}, which is not in {uri}; pass the store it was "
                "logged to with --tracking-uri"
            ) from None
        raise UserError(
            f"run {ref!r}: no such MLflow run in {uri}, and no stage directory (with manifest.json) "
            "there; `compressor runs` lists pipeline runs, --tracking-uri picks another store"
        ) from None
    parent = run.data.tags.get("mlflow.parentRunId")
    return parent or run.info.run_id


def _artifact_json(client, run_id: str, name: str) -> Optional[dict]:
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, name, tmp)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(path).read_text())


def _curves(client, run_id: Optional[str]) -> dict[str, list[tuple[int, float]]]:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}
    out = {}
    for name in CURVES:
        try:
            history = client.get_metric_history(run_id, name)
        except MlflowException:  # the run that trained it is in another store
            return {}
        if history:
            out[name] = sorted((m.step, m.value) for m in history)
    return out


def load_run(client, run_id: str) -> PipelineRun:
    run = client.get_run(run_id)
    record = _artifact_json(client, run_id, STAGES_ARTIFACT) if SUMMARY_TAG in run.data.tags else None
    if record is None:
        raise UserError(
            f"run {run_id}: no pipeline summary ({STAGES_ARTIFACT}); it is not a compressor pipeline run, "
            f"or it did not finish (status {run.info.status})"
        )
    result = PipelineRun(
        run_id,
        record["pipeline"],
        run.info.start_time,
        run.info.status,
        dict(run.data.params),
        dict(run.data.metrics),
        dict(run.data.tags),
        record["teacher"],
        record["stages"],
        record.get("final"),
        record["seconds"],
        label=f"{record['pipeline']} {run_id[:8]}",
    )
    for stage in result.stages:  # stages that log training curves (distill)
        if curves := _curves(client, stage.get("run_id")):
            result.curves[stage["name"]] = curves
        if stage.get("kind") == "distill" and stage.get("run_id"):  # a search's trials (distill `search:`)
            if found := _artifact_json(client, stage["run_id"], "search.json"):
                result.searches[stage["name"]] = found
    return result


# ---------------------------------------------------------------------------------------------- figures
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


# ---------------------------------------------------------------------------------------------- tables
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


# ---------------------------------------------------------------------------------------------- HTML and Markdown
CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222} h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left} tr.diff td{background:#fff4b8}
.best{font-weight:bold;color:#06743a} .gate{font-size:82%;color:#555} .FAIL{color:#b00020;font-weight:bold}
.runs{display:flex;gap:2.5em;flex-wrap:wrap} img{max-width:100%} dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}
dt{color:#666}"""


class Best(str):
    """A table cell holding the best value of its row (bold in HTML and Markdown)."""


def _cell_html(cell) -> str:
    if isinstance(cell, Best):
        return f"<b class='best'>{html.escape(cell)}</b>"
    if not isinstance(cell, list):
        return html.escape(str(cell))
    first, gates = cell[0], cell[1:]
    return "<br>".join(
        [html.escape(first)] + [f'<span class="gate {g.split(":")[0]}">{html.escape(g)}</span>' for g in gates]
    )


def html_table(header: list[str], rows: list[list], classes: Optional[list[str]] = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f'<tr class="{(classes or [""] * len(rows))[i]}">' + "".join(f"<td>{_cell_html(c)}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(c) -> str:
        text = "<br>".join(c) if isinstance(c, list) else (f"**{c}**" if isinstance(c, Best) else str(c))
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def _facts(run: PipelineRun) -> list[tuple[str, str]]:
    return [
        ("pipeline", run.pipeline),
        ("MLflow run", run.run_id),
        ("started", run.started),
        ("status", f"{run.status}, gates {run.tags.get('gate', '-')}"),
        ("teacher", run.teacher.get("model", "-")),
        ("final model", run.tags.get("final_model", "-")),
        ("wall seconds", f"{run.seconds:.1f}"),
    ]


def _page(title: str, parts: list[str]) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>"
    )


def _figures_html(plots: list[Plot]) -> list[str]:
    return [
        f"<h2>{html.escape(p.title)}</h2><img alt='{p.name}' src='data:image/png;base64,"
        f"{base64.b64encode(p.png).decode()}'>"
        for p in plots
    ]


def _write_plots(plots: list[Plot], out: Path) -> None:
    for plot in plots:
        (out / f"{plot.name}.png").write_bytes(plot.png)
        (out / f"{plot.name}.json").write_text(json.dumps(plot.data, indent=1))


def write_report(run: PipelineRun, out: Path) -> tuple[Path, Path, list[Plot]]:
    """report.html (self-contained), report.md and the PNGs (with the plotted numbers as JSON) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plots = figures([run])
    _write_plots(plots, out)
    stages, metrics = stage_table(run), metric_table(run)
    distillation = distillation_tables(run)
    facts = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in _facts(run))
    page = _page(
        f"{run.pipeline}: pipeline run {run.run_id[:8]}",
        [
            f"<dl>{facts}</dl><h2>Stages</h2>",
            html_table(*stages),
            "<h2>Evaluation (value ± stderr; gate bars and verdicts below)</h2>",
            html_table(*metrics),
            *[part for title, t in distillation for part in (f"<h2>{html.escape(title)}</h2>", html_table(*t))],
            *_figures_html(plots),
        ],
    )
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(page)
    md = [
        f"# {run.pipeline}: pipeline run {run.run_id[:8]}",
        "",
        *[f"- **{k}**: {v}" for k, v in _facts(run)],
        "",
        "## Stages",
        "",
        md_table(*stages),
        "",
        "## Evaluation",
        "",
        md_table(*metrics),
        "",
        *[line for title, t in distillation for line in (f"## {title}", "", md_table(*t), "")],
    ]
    md += [line for p in plots for line in (f"## {p.title}", "", f"![{p.title}]({p.name}.png)", "")]
    md_path.write_text("\n".join(md))
    return html_path, md_path, plots


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


def write_compare(runs: list[PipelineRun], out: Path) -> tuple[Path, Path, list[Plot]]:
    """compare.html (overlaid plots, differences highlighted, each run's tables side by side) and compare.md."""
    out.mkdir(parents=True, exist_ok=True)
    plots = figures(runs)
    _write_plots(plots, out)
    (h, settings, s_classes), (_, finals, f_classes) = comparison(runs)
    side = "".join(
        f"<div><h3>{html.escape(r.label)}</h3>{html_table(*stage_table(r))}{html_table(*metric_table(r))}</div>"
        for r in runs
    )
    title = "compare: " + " vs ".join(r.label for r in runs)
    page = _page(
        title,
        [
            "<h2>Settings that differ</h2>",
            html_table(h, settings, s_classes) if settings else "<p>none: the runs share every setting</p>",
            "<h2>Final figures (best in bold, differing rows highlighted)</h2>",
            html_table(h, finals, f_classes),
            *_figures_html(plots),
            f"<h2>Each run</h2><div class='runs'>{side}</div>",
        ],
    )
    html_path, md_path = out / "compare.html", out / "compare.md"
    html_path.write_text(page)
    md = [
        f"# {title}",
        "",
        "## Settings that differ",
        "",
        md_table(h, settings) if settings else "none",
        "",
        "## Final figures (best in bold)",
        "",
        md_table(h, finals),
        "",
    ]
    md += [line for p in plots for line in (f"## {p.title}", "", f"![{p.title}]({p.name}.png)", "")]
    for r in runs:
        md += [f"## {r.label}", "", md_table(*stage_table(r)), "", md_table(*metric_table(r)), ""]
    md_path.write_text("\n".join(md))
    return html_path, md_path, plots


def log_report(client, run_id: str, out: Path) -> None:
    """The report files as artifacts of the pipeline run, under report/ (the MLflow UI shows the HTML)."""
    for path in sorted(out.iterdir()):
        if path.suffix in (".html", ".md", ".png"):
            client.log_artifact(run_id, str(path), "report")
