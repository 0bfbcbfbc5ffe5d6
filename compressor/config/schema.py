"""The pipeline spec: what a pipeline YAML may contain. Unknown keys are rejected everywhere."""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator, model_validator

from compressor.config.stages import STAGE_SPECS, Resources, Strict

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class TeacherSpec(Strict):
    """The model every stage starts from and the evaluation baseline.

    `model` is a Hugging Face hub id, a local directory, or `zoo:NAME` for a reference
    model that compressor builds offline (see `compressor zoo list`)."""

    model: str
    revision: Optional[str] = Field(None, description="Hub revision (commit, tag or branch).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    config: Optional[str] = Field(None, description="A config.json used by `plan` instead of the hub (offline estimates).")


class DataSource(Strict):
    """Text for calibration or distillation.

    `source` is a local .txt / .jsonl / .parquet file or directory of them, `hf:ORG/NAME[:CONFIG][@SPLIT]`,
    or `zoo:NAME` for the corpus of a reference model."""

    source: str
    samples: Optional[int] = Field(None, gt=0, description="Number of sequences (calibration).")
    seq_len: int = Field(512, gt=0)
    text_field: str = Field("text", description="Column holding the text in JSONL / parquet / hf sources.")
    split: Literal["train", "heldout"] = Field("train", description="For zoo sources: which side of the split.")


class TaskSpec(Strict):
    """An lm-eval task: a registry name, or a local task YAML found under `include`."""

    name: str
    num_fewshot: Optional[int] = Field(None, ge=0)
    limit: Optional[float] = Field(None, gt=0, description="Docs per task (int) or fraction (<1).")
    include: Optional[str] = Field(None, description="Directory of task YAMLs, or `zoo:NAME` for a reference model's tasks.")


class EvaluationSpec(Strict):
    tasks: list[TaskSpec] = Field(default_factory=list)
    baseline: Literal["teacher", "none"] = "teacher"
    batch_size: int = Field(16, gt=0)
    resources: Resources = Field(default_factory=Resources)


class GateBar(Strict):
    """Bars for one metric. Direction (higher or lower is better) is known per metric."""

    min: Optional[float] = Field(None, description="Absolute floor (for lower-is-better metrics: ceiling, see `max`).")
    max: Optional[float] = Field(None, description="Absolute ceiling, e.g. for perplexity.")
    min_recovery: Optional[float] = Field(None, gt=0, description="Fraction of the teacher baseline to keep.")
    max_drop: Optional[float] = Field(None, ge=0, description="Allowed quality loss against the previous stage.")

    @model_validator(mode="after")
    def _some_bar(self):
        if all(v is None for v in (self.min, self.max, self.min_recovery, self.max_drop)):
            raise ValueError("a gate metric needs at least one of min, max, min_recovery, max_drop")
        return self


class GateSpec(Strict):
    on_fail: Literal["stop", "warn"] = "stop"
    metrics: dict[str, GateBar] = Field(description="`task` (its main metric) or `task.metric` -> bars.")


class StageEntry(Strict):
    """One stage: exactly one of prune / distill / quantize / evaluate, plus its gate and resources."""

    name: Optional[str] = Field(None, description="Default: the stage kind, numbered if repeated.")
    prune: Optional[STAGE_SPECS["prune"]] = None  # type: ignore[valid-type]
    distill: Optional[STAGE_SPECS["distill"]] = None  # type: ignore[valid-type]
    quantize: Optional[STAGE_SPECS["quantize"]] = None  # type: ignore[valid-type]
    evaluate: Optional[STAGE_SPECS["evaluate"]] = None  # type: ignore[valid-type]
    gate: Optional[GateSpec] = None
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="before")
    @classmethod
    def _gate_shorthand(cls, data):
        # `gate: {mmlu: {min_recovery: 0.9}}` is shorthand for `gate: {metrics: {...}}`.
        if isinstance(data, dict) and isinstance(data.get("gate"), dict) and "metrics" not in data["gate"]:
            gate = dict(data["gate"])
            on_fail = gate.pop("on_fail", "stop")
            data = {**data, "gate": {"on_fail": on_fail, "metrics": gate}}
        return data

    @model_validator(mode="after")
    def _exactly_one(self):
        kinds = [k for k in STAGE_SPECS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a stage needs exactly one of {', '.join(STAGE_SPECS)} (got {len(kinds) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STAGE_SPECS if getattr(self, k) is not None)

    @property
    def spec(self) -> BaseModel:
        return getattr(self, self.kind)


class TrackingSpec(Strict):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; default sqlite:///<storage>/mlflow.db.")
    experiment: Optional[str] = Field(None, description="Default: the pipeline name.")


class PipelineSpec(Strict):
    name: str
    teacher: TeacherSpec
    storage: str = Field("./artifacts", description="Local/NFS path or fsspec URI (s3://, gs://).")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    seed: int = 0
    data: dict[str, DataSource] = Field(default_factory=dict)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    stages: list[StageEntry] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names directories and MLflow experiments)")
        return v

    @model_validator(mode="after")
    def _references(self):
        task_names = {t.name for t in self.evaluation.tasks}
        seen: set[str] = set()
        counts: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            kind = stage.kind
            counts[kind] = counts.get(kind, 0) + 1
            if stage.name is None:
                stage.name = kind if counts[kind] == 1 else f"{kind}{counts[kind]}"
            if stage.name in seen:
                raise ValueError(f"stages.{i}.name: duplicate stage name {stage.name!r}")
            seen.add(stage.name)
            for field in ("calibration", "data"):
                ref = getattr(stage.spec, field, None)
                if ref is not None and ref not in self.data:
                    known = ", ".join(sorted(self.data)) or "none defined"
                    raise ValueError(f"stages.{i}.{kind}.{field}: unknown data source {ref!r} (known: {known})")
            if stage.gate:
                for metric in stage.gate.metrics:
                    if metric.split(".")[0] not in task_names:
                        raise ValueError(
                            f"stages.{i}.gate.{metric}: no evaluation task named {metric.split('.')[0]!r} "
                            f"(tasks: {', '.join(sorted(task_names)) or 'none'})"
                        )
        return self

    def stage_names(self) -> list[str]:
        return [s.name or s.kind for s in self.stages]


AnyStageSpec = Union[tuple(STAGE_SPECS.values())]  # type: ignore[misc]
