"""MLflow tracking: a parent run per pipeline run, a nested child run per stage (and for the teacher baseline).

Runs are addressed by id through MlflowClient, so a stage running in another process (a Ray task, a Ray Train
worker) logs into its child run through a picklable `MlflowSink`.

At the end of a pipeline run, `log_pipeline_summary` makes the parent run the unit of comparison: the final model's
figures, every stage's scores under a `<stage>/` prefix, the distinguishing settings as params, gate verdicts as
tags, each stage's output as an MLflow logged model (pointing at the stage directory; no weights are copied), and
`stages.json`, the record `compressor report` reads."""

from __future__ import annotations

import contextlib
import fcntl
import json
import numbers
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from compressor.contract.context import MetricsSink
from compressor.models import is_zoo
from compressor.records import teacher_record
from compressor.secrets import redact, redact_mapping

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
# log_batch limits of MLflow's REST API, per request
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
# The MLflow 3 UI opens an experiment on its runs (not on the GenAI trace overview) when it carries this tag.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
STAGES_ARTIFACT = "stages.json"  # the parent run's record of every stage, read by `compressor report`


def default_uri(storage_root: Path) -> str:
    return f"sqlite:///{Path(storage_root).resolve() / 'mlflow.db'}"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: nested mappings to dotted keys, the leaves as they are."""
    if not isinstance(value, dict):
        return {prefix.rstrip("."): value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def param_values(params: dict[str, Any]) -> dict[str, str]:
    """MLflow params: flattened, lists as JSON, anything else as text, cut to MLflow's limit."""
    return {
        k: (json.dumps(v) if isinstance(v, (list, tuple)) else str(v))[:MAX_PARAM_CHARS]
        for k, v in flatten(params).items()
    }


def as_number(value: Any) -> Optional[float]:
    """A score as a float: a number (not a boolean) or text that reads as one; else None (aliases, lists, None)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def score_values(scores: Optional[dict]) -> dict[str, float]:
    """{'task': {'metric': v}} -> {'task.metric': v} for the numeric values (lm-eval also reports aliases)."""
    return {k: number for k, v in flatten(scores or {}).items() if (number := as_number(v)) is not None}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if redact(uri) != uri:  # MLflow prints "View run at <tracking URI>/..." to stdout: not with a password in it
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return MlflowClient(tracking_uri=uri)


class MlflowSink(MetricsSink):
    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._c = None

    def __getstate__(self):
        return {"uri": self.uri, "run_id": self.run_id, "_c": None}

    @property
    def client(self):
        if self._c is None:
            self._c = _client(self.uri)
        return self._c

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        rows = [Param(k, v) for k, v in redact_mapping(param_values(params)).items()]  # no secret reaches MLflow
        for i in range(0, len(rows), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=rows[i : i + MAX_PARAMS_PER_BATCH])

    def log_metrics(
        self, metrics: dict[str, float], step: Optional[int] = None, model_id: Optional[str] = None
    ) -> None:
        """`model_id`: also attach the values to that MLflow logged model (shown on its page)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step or 0, model_id=model_id) for k, v in metrics.items() if v is not None]
        for i in range(0, len(rows), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=rows[i : i + MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def child(self, name: str, params: dict[str, Any]) -> MlflowSink:
        """A nested run under this one (the UI shows it beneath its parent), tagged `compressor.nested`."""
        parent = self.client.get_run(self.run_id)
        run = self.client.create_run(
            parent.info.experiment_id,
            run_name=name,
            tags={"mlflow.parentRunId": self.run_id, "compressor.nested": "true"},
        )
        sink = MlflowSink(self.uri, run.info.run_id)
        sink.log_params(params)
        return sink

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class Tracker:
    """One pipeline run in MLflow."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path):
        self.uri = uri
        self.client = _client(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = None if "://" in uri and not uri.startswith("sqlite") else Path(artifact_root).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        else:
            self.experiment_id = found.experiment_id
            if EXPERIMENT_KIND_TAG not in found.tags:  # made by an older compressor, or by hand
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.parent_id: Optional[str] = None
        self.logged_models: dict[str, str] = {}  # stage name -> MLflow logged model id (set by log_pipeline_summary)

    def start_pipeline(
        self,
        name: str,
        pipeline_yaml: str,
        params: dict[str, Any],
        run_name: Optional[str] = None,
        description: str = "",
        datasets: Optional[list] = None,
    ) -> str:
        """The parent run. `run_name` tells runs of one pipeline apart in the UI's list and chart legends (MLflow
        would otherwise show every one as the pipeline's name); `description` is the run page's description."""
        tags = {"compressor.pipeline": name, **({"mlflow.note.content": redact(description)} if description else {})}
        run = self.client.create_run(self.experiment_id, run_name=run_name or name, tags=tags)
        self.parent_id = run.info.run_id
        sink = self.sink(self.parent_id)
        sink.log_params(params)
        self.client.log_text(self.parent_id, redact(pipeline_yaml), "pipeline.yaml")
        if datasets:
            self.client.log_inputs(self.parent_id, datasets=datasets)
        return self.parent_id

    def start_stage(self, name: str, kind: str, key: str, params: dict[str, Any], cached: bool = False) -> str:
        tags = {
            "mlflow.parentRunId": self.parent_id,
            "compressor.stage": name,
            "compressor.kind": kind,
            "compressor.stage_key": key,
            "cached": str(cached).lower(),
        }
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.sink(run.info.run_id).log_params(params)
        return run.info.run_id

    def sink(self, run_id: str) -> MlflowSink:
        return MlflowSink(self.uri, run_id)

    def tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, redact(value))

    def log_json(self, run_id: str, payload: Any, name: str) -> None:
        self.client.log_dict(run_id, json.loads(redact(json.dumps(payload))), name)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


# ------------------------------------------------------------------------------ several runs on one store (issue 14)
@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """A blocking flock on `path` for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def open_tracker(uri: str, experiment: str, artifact_root: Path):
    """A Tracker, safe when several runs start on one store at once. MLflow creates the tables of a
    new sqlite store on first use, and two processes doing so together fail ("duplicate column name", measured with
    MLflow 3.17); so does creating one experiment twice. The first use of a sqlite store is serialized with an flock
    beside the database; an experiment another run created meanwhile is then found instead of created."""
    from mlflow.exceptions import MlflowException

    database = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else None
    with file_lock(Path(database + ".lock")) if database else contextlib.nullcontext():
        try:
            return Tracker(uri, experiment, artifact_root)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return Tracker(uri, experiment, artifact_root)


# ---------------------------------------------------------------------------------------------- pipeline summary

_UNSAFE = re.compile(r"[^\w\-./ ]")  # characters MLflow refuses in metric, param and tag keys


def _key(*parts: str) -> str:
    return "/".join(_UNSAFE.sub("_", p) for p in parts)


def dataset_inputs(spec) -> list:
    """The pipeline's data sources as MLflow dataset inputs, for the runs list's Dataset column: a pointer (where the
    data is, its name in the pipeline, a digest of its settings), never the data itself."""
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    from compressor.cache import digest, key_fields

    inputs = []
    for name, ds in spec.data.items():
        if ds.source.startswith("hf:"):
            from compressor.text_sources import parse_hf

            repo, config, split = parse_hf(ds.source)
            source = HuggingFaceDatasetSource(
                repo, config_name=config, split=split, revision=getattr(ds, "revision", None)
            )
        elif is_zoo(ds.source):
            source = CodeDatasetSource({"compressor.source": ds.source, "split": ds.split})
        else:
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path is a local path
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(redact(ds.source))
        dataset = MetaDataset(source, name=name, digest=digest(key_fields(ds))[:8])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", name)]))
    return inputs


def pipeline_settings(spec) -> dict[str, str]:
    """Flattened settings that tell pipelines apart: each stage's spec and gate under its name, the data sources
    and the evaluation tasks. Unset (None) fields are left out."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None and v != {} and v != []}
        return value

    settings: dict = {
        "data": {n: d.model_dump(mode="json") for n, d in spec.data.items()},
        "evaluation": {"tasks": [t.name for t in spec.evaluation.tasks]},
    }
    for entry in spec.stages:
        settings[entry.name or entry.kind] = {
            **entry.spec.model_dump(mode="json"),
            **({"gate": {m: b.model_dump(mode="json") for m, b in entry.gate.metrics.items()}} if entry.gate else {}),
        }
    return param_values(clean(settings))


def recovery(value: Optional[float], base: Optional[float], metric: str) -> Optional[float]:
    """The fraction of the teacher's score kept, in the sense of the gates' `min_recovery` (for a lower-is-better
    metric, teacher / value): 1.0 is the teacher's quality, the bar passes at >= min_recovery."""
    from compressor.evaluation import higher_is_better

    if value is None or not base or not value:
        return None
    return value / base if higher_is_better(metric) else base / value


def summary_metrics(summary, stages: list[dict], teacher: dict) -> tuple[dict[str, dict[str, float]], Optional[dict]]:
    """Metrics for the parent run, grouped by the stage whose logged model they describe (None: the run itself),
    and the final model's record."""
    from compressor import gates

    groups: dict[Optional[str], dict[str, float]] = {None: {}}
    run = groups[None]
    for name, value in {
        **score_values(teacher["scores"]),
        "num_params": teacher["num_params"],
        "bytes": teacher["bytes"],
    }.items():
        if value is not None:
            run[_key("teacher", name)] = value
    for s in stages:
        group = groups.setdefault(s["name"], {})
        for name, value in {
            **score_values(s["scores"]),
            "num_params": s["num_params"],
            "bytes": s["bytes"],
            "bits": s["bits"],
        }.items():
            if value is not None:
                group[_key(s["name"], name)] = value
        if s["seconds"] is not None:
            run[_key("seconds", s["name"])] = s["seconds"]
    run[_key("seconds", "wall")] = round(summary.seconds, 3)
    final = next((s for s in reversed(stages) if s["model_uri"]), None)
    if final is None:
        return groups, None
    finals = groups[final["name"]]
    for name, value in {
        **score_values(final["scores"]),
        "num_params": final["num_params"],
        "bytes": final["bytes"],
        "bits": final["bits"],
    }.items():
        if value is not None:
            finals[_key("final", name)] = value
    if teacher["num_params"] and final["num_params"]:
        finals["final/param_compression"] = teacher["num_params"] / final["num_params"]
    if teacher["bytes"] and final["bytes"]:
        finals["final/byte_compression"] = teacher["bytes"] / final["bytes"]
    gated = {key for entry in summary.plan.spec.stages if entry.gate for key in entry.gate.metrics}
    for key in sorted(gated):
        name, value = gates.lookup(final["scores"], key)
        kept = recovery(value, gates.lookup(teacher["scores"], key)[1], name)
        if kept is not None:
            run[_key("recovery", name)] = kept
    return groups, final


def _stage_model(tracker: Tracker, pipeline: str, stage: dict) -> str:
    """The MLflow logged model of a stage output: one per stage key (a cached stage reuses the model logged when
    it ran). It records where the checkpoint is (tag compressor.model_uri); the weights stay there."""
    from mlflow.entities import LoggedModelStatus

    key_filter = f"tags.`compressor.stage_key` = '{stage['key']}'"
    found = tracker.client.search_logged_models([tracker.experiment_id], filter_string=key_filter, max_results=1)
    if found:
        return found[0].model_id
    params = {k: str(stage[k]) for k in ("num_params", "bytes", "bits") if stage[k] is not None}
    model = tracker.client.create_logged_model(
        tracker.experiment_id,
        name=f"{stage['name']}-{stage['key'][:12]}",
        source_run_id=stage["run_id"],
        model_type=f"compressor.{stage['kind']}",
        params=params,
        tags={
            "compressor.stage_key": stage["key"],
            "compressor.model_uri": redact(stage["model_uri"]),
            "compressor.pipeline": pipeline,
            "compressor.stage": stage["name"],
        },
    )
    tracker.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def log_pipeline_summary(tracker: Tracker, parent_run_id: str, summary) -> None:
    """Log a finished pipeline run onto its parent run (see the module docstring); `summary` is the orchestrator's
    RunSummary. Metric names: `final/<task>.<metric>`, `final/num_params|bytes|bits|param_compression|
    byte_compression`, `recovery/<gated metric>`, `teacher/...`, `<stage>/...`, `seconds/<stage>|wall`."""
    from mlflow.entities import LoggedModelOutput

    spec = summary.plan.spec
    stages, teacher = summary.records, teacher_record(summary)
    sink = tracker.sink(parent_run_id)
    sink.log_params(pipeline_settings(spec))
    for s in stages:
        if s["model_uri"]:
            tracker.logged_models[s["name"]] = _stage_model(tracker, spec.name, s)
    tracker.client.log_outputs(
        parent_run_id,
        [
            LoggedModelOutput(tracker.logged_models[s["name"]], step=i)
            for i, s in enumerate(stages)
            if s["name"] in tracker.logged_models
        ],
    )
    groups, final = summary_metrics(summary, stages, teacher)
    for stage_name, metrics in groups.items():
        sink.log_metrics(metrics, model_id=tracker.logged_models.get(stage_name))
    tags = {f"gate.{s['name']}": s["gate_verdict"] for s in stages}
    tags.update(
        {
            "teacher": teacher["model"],
            "final_model": final["model_uri"] if final else "",
            "compressor.summary": STAGES_ARTIFACT,
        }
    )
    for key, value in tags.items():
        tracker.tag(parent_run_id, key, value)
    tracker.log_json(
        parent_run_id,
        {
            "pipeline": spec.name,
            "seconds": summary.seconds,
            "teacher": teacher,
            "stages": stages,
            "final": final["name"] if final else None,
        },
        STAGES_ARTIFACT,
    )


def gate_description(summary, final: dict, stages: list[dict], parent_run_id: str) -> str:
    """Markdown for a registered model version: what it is, where it is, and every gate row of the pipeline."""
    size = f"{final['num_params'] / 1e6:.2f}M parameters" if final["num_params"] else "unknown size"
    bits = f", {final['bits']}-bit" if final["bits"] else ""
    lines = [
        f"Final model of pipeline `{summary.plan.spec.name}` (MLflow run `{parent_run_id}`): stage "
        f"`{final['name']}`, {size}{bits}.",
        "",
        f"Checkpoint: `{final['model_uri']}`",
        "",
    ]
    rows = [(s["name"], r) for s in stages for r in s["gate"]]
    if not rows:
        return "\n".join(lines + ["No stage of this pipeline has a gate."])
    lines += ["| stage | metric | value | bar | verdict |", "| --- | --- | --- | --- | --- |"]
    lines += [
        f"| {stage} | {r['metric']} | {'-' if r['value'] is None else format(r['value'], '.4g')} | {r['bar']} | "
        f"{'pass' if r['passed'] else 'FAIL (on_fail: warn)'} |"
        for stage, r in rows
    ]
    return "\n".join(lines)


def register_final_model(tracker: Tracker, name: str, summary, parent_run_id: str) -> Optional[int]:
    """A new version of registered model `name` for the pipeline's final model (its logged model, so nothing is
    copied), described by the gate summary. Returns the version number; None when no stage made a model."""
    import mlflow
    from mlflow.exceptions import MlflowException

    stages = summary.records
    final = next((s for s in reversed(stages) if s["model_uri"]), None)
    if final is None or final["name"] not in tracker.logged_models:
        return None
    model_id = tracker.logged_models[final["name"]]
    try:
        tracker.client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # MLflow's local (sqlite) registry resolves a models:/ source through the global tracking URI.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.uri)
    try:
        version = tracker.client.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=parent_run_id,
            model_id=model_id,
            description=redact(gate_description(summary, final, stages, parent_run_id)),
            tags={
                "compressor.model_uri": redact(final["model_uri"]),
                "compressor.pipeline": summary.plan.spec.name,
                "gate": "passed" if all(s["gate_verdict"] != "warned" for s in stages) else "warned",
            },
        )
    finally:
        mlflow.set_tracking_uri(previous)
    return int(version.version)
