"""One record per stage of a finished pipeline run, and one for its teacher: what the console summary, the
`--summary-json` file, the MLflow parent run (its `stages.json` artifact, metrics and tags) and `compressor report`
all show, built in one place from the plan and the outcomes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, TypedDict

from compressor.models import zoo_name

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


class GateRow(TypedDict):
    metric: str
    value: Optional[float]
    bar: str
    passed: bool


class StageRecord(TypedDict):
    """A stage as it ended (from its manifest, or the plan's key when it did not run)."""

    name: str
    kind: str
    status: str  # ran, cached, failed, gated, skipped, ...
    key: str
    stage_uri: str  # its directory in storage
    model_uri: Optional[str]  # its model, for a kind whose output is one (else None)
    num_params: Optional[int]  # a quantized model's logical count, not its packed storage
    bits: Optional[int]  # a quantized model's width
    bytes: Optional[int]  # its model's weight bytes
    seconds: Optional[float]
    scores: Optional[dict]  # task -> metric -> value
    gate: list[GateRow]
    gate_verdict: str  # none, passed or warned
    run_id: Optional[str]  # the MLflow run that made it (an earlier one when cached)
    references: dict  # models made beside it to compare it with (distill's hard-label control), with their scores


# What `compressor run --summary-json` keeps of each record (paths and gate rows are in stages.json on MLflow).
SUMMARY_FIELDS = ("name", "kind", "status", "key", "num_params", "bytes", "seconds", "scores")


def _gate_rows(outcome) -> list[GateRow]:
    """This run's gate rows, or, for a stage taken from the cache, those its manifest kept from the run that made it."""
    if outcome.gate_rows:
        return [dict(r.__dict__) for r in outcome.gate_rows]
    return list(((outcome.manifest.details if outcome.manifest else {}).get("gate") or {}).get("rows") or [])


def _verdict(rows: list[dict]) -> str:
    return "none" if not rows else ("passed" if all(r["passed"] for r in rows) else "warned")


def stage_records(summary) -> list[StageRecord]:
    """One dict per stage of a finished pipeline run, in order: where its model is, its real size (a quantized
    model's logical parameter count and bits, not its packed storage), seconds, scores, gate rows and verdict."""
    from compressor.models import checkpoint
    from compressor.storage import join

    records = []
    for planned, outcome in zip(summary.plan.stages, summary.outcomes):
        m = outcome.manifest
        model_uri = join(planned.uri, m.model_uri) if m and planned.produces_model else None
        num_params, bits = (m.num_params if m else None), None
        if model_uri and (bits := checkpoint.quantized_bits(model_uri)):
            num_params = checkpoint.logical_num_params(model_uri)
        rows = _gate_rows(outcome)
        records.append(
            StageRecord(
                **{
                    "name": outcome.name,
                    "kind": outcome.kind,
                    "status": outcome.status,
                    "key": m.key if m else planned.key,
                    "stage_uri": planned.uri,
                    "model_uri": model_uri,
                    "num_params": num_params,
                    "bits": bits,
                    "bytes": m.bytes if m and model_uri else None,
                    "seconds": m.seconds if m else None,
                    "scores": outcome.scores,
                    "gate": rows,
                    "gate_verdict": _verdict(rows),
                    "run_id": m.mlflow_run_id if m else None,  # the run that made it (an earlier one when cached)
                    # models made beside it to compare it with (distill's hard-label control), with their scores
                    "references": (m.details.get("references") or {}) if m else {},
                }
            )
        )
    return records


def teacher_record(summary) -> dict:
    """The teacher's size (parameters from its config; bytes of its checkpoint where this process can see it,
    else parameters x dtype width) and its baseline scores."""
    from compressor import estimate, storage
    from compressor.models import checkpoint, zoo

    plan, spec = summary.plan, summary.plan.spec.teacher
    num_params = estimate.param_count(plan.teacher_config) if plan.teacher_config else None
    path = plan.teacher.path
    if (name := zoo_name(path)) is not None:
        path = str(zoo.model_path(name)) if zoo.is_built(name) else ""
    measured = bool(path) and (storage.is_remote(path) or Path(path).is_dir()) and storage.exists(path)
    size = checkpoint.checkpoint_bytes(path) if measured else None
    if not size and num_params:
        size = num_params * DTYPE_BYTES[spec.dtype]
    return {
        "name": "teacher",
        "kind": "teacher",
        "model": spec.model + (f"@{spec.revision}" if spec.revision else ""),
        "key": plan.teacher.key,
        "num_params": num_params,
        "bytes": size,
        "bytes_measured": measured,
        "scores": summary.baseline,
    }


def summary_records(summary) -> list[dict]:
    """The stages as `--summary-json` and the parent run's summary.json show them: SUMMARY_FIELDS of each record."""
    return [{k: record[k] for k in SUMMARY_FIELDS} for record in summary.records]
