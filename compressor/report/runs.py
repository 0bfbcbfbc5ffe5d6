"""Pipeline runs read back from MLflow: finding them (the latest, a run id, a stage directory), loading one into a
`PipelineRun`, and logging a report back as artifacts.

A finished pipeline run's parent carries `stages.json` (written by tracking.log_pipeline_summary): each stage's
model, size, seconds, scores and gate rows, and the teacher's. The distill curves come from the metric history of
the run that trained the student."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from compressor.errors import UserError
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


def artifact_json(client, run_id: str, name: str) -> Optional[dict]:
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
    record = artifact_json(client, run_id, STAGES_ARTIFACT) if SUMMARY_TAG in run.data.tags else None
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
            if found := artifact_json(client, stage["run_id"], "search.json"):
                result.searches[stage["name"]] = found
    return result


def log_report(client, run_id: str, out: Path) -> None:
    """The report files as artifacts of the pipeline run, under report/ (the MLflow UI shows the HTML)."""
    for path in sorted(out.iterdir()):
        if path.suffix in (".html", ".md", ".png"):
            client.log_artifact(run_id, str(path), "report")
