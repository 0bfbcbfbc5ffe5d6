"""MLflow tracking: a parent run per pipeline run, a nested child run per stage (and for the teacher baseline).

Runs are addressed by id through MlflowClient, so a stage running in another process (a Ray task, a Ray Train
worker) logs into its child run through a picklable `MlflowSink`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from compressor.stages.context import MetricsSink

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def default_uri(storage_root: Path) -> str:
    return f"sqlite:///{Path(storage_root).resolve() / 'mlflow.db'}"


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists become JSON strings."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        out[prefix.rstrip(".")] = text[:MAX_PARAM_CHARS]
    return out


def _client(uri: str):
    from mlflow.tracking import MlflowClient

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

        flat = flatten(params)
        if flat:
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()])

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if rows:
            self.client.log_batch(self.run_id, metrics=rows)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))


class Tracker:
    """One pipeline run in MLflow."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path):
        self.uri = uri
        self.client = _client(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = None if "://" in uri and not uri.startswith("sqlite") else Path(artifact_root).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        self.parent_id: Optional[str] = None

    def start_pipeline(self, name: str, pipeline_yaml: str, params: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"compressor.pipeline": name})
        self.parent_id = run.info.run_id
        sink = self.sink(self.parent_id)
        sink.log_params(params)
        self.client.log_text(self.parent_id, pipeline_yaml, "pipeline.yaml")
        return self.parent_id

    def start_stage(self, name: str, kind: str, key: str, params: dict[str, Any], cached: bool = False) -> str:
        tags = {"mlflow.parentRunId": self.parent_id, "compressor.stage": name, "compressor.kind": kind,
                "compressor.stage_key": key, "cached": str(cached).lower()}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.sink(run.info.run_id).log_params(params)
        return run.info.run_id

    def sink(self, run_id: str) -> MlflowSink:
        return MlflowSink(self.uri, run_id)

    def tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def log_json(self, run_id: str, payload: Any, name: str) -> None:
        self.client.log_dict(run_id, payload, name)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
