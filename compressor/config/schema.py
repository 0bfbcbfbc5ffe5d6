"""The pipeline spec: what a pipeline YAML may contain. Unknown keys are rejected everywhere."""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator, model_serializer, model_validator

from compressor import contract
from compressor.contract.spec import Resources, Strict, neutral

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class TeacherSpec(Strict):
    """The model every stage starts from and the evaluation baseline.

    `model` is a Hugging Face hub id, a local directory, or `zoo:NAME` for a reference
    model that compressor builds offline (see `compressor zoo list`)."""

    model: str
    revision: Optional[str] = Field(None, description="Hub revision (commit, tag or branch).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    config: Optional[str] = Field(
        None, description="A config.json used by `plan` instead of the hub (offline estimates)."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the Python code a checkpoint ships (config.json `auto_map`) when loading it and the "
        "models made from it, on every node. Off by default: only set it for a repository you trust (it is logged "
        "as a warning).",
    )


class DataSource(Strict):
    """Text for calibration or distillation.

    `source` is a local .txt / .jsonl / .parquet file or directory of them, `hf:ORG/NAME[:CONFIG][@SPLIT]`,
    or `zoo:NAME` for the corpus of a reference model. An `hf:` source is read at one commit: `revision`, or the
    branch head resolved once per run (printed, and part of the token shards' key); `validate` warns when unpinned."""

    source: str
    samples: Optional[int] = Field(None, gt=0, description="Number of sequences (calibration).")
    seq_len: int = Field(512, gt=0)
    text_field: str = Field("text", description="Column holding the text in JSONL / parquet / hf sources.")
    split: Literal["train", "heldout"] = Field("train", description="For zoo sources: which side of the split.")
    revision: Optional[str] = Field(
        None,
        description="For hf: sources, the dataset revision (a commit pins it; a branch or tag is resolved to its "
        "commit). Unset: the default branch's head at run time.",
    )

    @field_validator("source")
    @classmethod
    def _zoo_task_split(cls, v: str) -> str:
        from compressor.models.zoo.module_task import resolve

        return resolve(v)  # `zoo:modules/<split>`: the zoo task's split file, written on first use

    @model_validator(mode="after")
    def _revision_for_hub_only(self):
        if self.revision is not None and not self.source.startswith("hf:"):
            raise ValueError("`revision` is for hf: sources only (local and zoo data are keyed by their content)")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_revision(self, handler):
        # Unset, `revision` is left out of every dump: stage keys, shard keys and MLflow params of the sources
        # written before it existed stay byte-identical.
        out = handler(self)
        if isinstance(out, dict) and self.revision is None:
            out.pop("revision", None)
        return out


class TaskSpec(Strict):
    """An lm-eval task: a registry name, or a local task YAML found under `include`."""

    name: str
    num_fewshot: Optional[int] = Field(None, ge=0)
    limit: Optional[float] = Field(None, gt=0, description="Docs per task (int) or fraction (<1).")
    include: Optional[str] = Field(
        None, description="Directory of task YAMLs, or `zoo:NAME` for a reference model's tasks."
    )
    data: Optional[str] = neutral(
        None,
        description="A labelled held-out JSONL (`prompt` or one-turn `messages`, plus `answer`): the task is generated "
        "from it (see docs/task.md): the model answers through its chat template; metrics exact_match, and with "
        "`labels` accuracy and macro f1.",
    )
    labels: Optional[list[str]] = neutral(
        None, description="The label set of a `data` task: accuracy takes the first label named in the answer."
    )
    max_gen_toks: int = neutral(32, gt=0, description="Most tokens the model generates per `data` task answer.")

    @field_validator("data")
    @classmethod
    def _zoo_task_split(cls, v: Optional[str]) -> Optional[str]:
        from compressor.models import is_zoo
        from compressor.models.zoo.module_task import resolve

        if v is None or "://" in v:
            return v
        from pathlib import Path

        # Absolute: the evaluation runs as a Ray task, whose working directory is not the user's.
        return resolve(v) if is_zoo(v) else str(Path(v).expanduser().resolve())

    @model_validator(mode="after")
    def _data_task(self):
        if self.data is not None and self.include is not None:
            raise ValueError("give `data` (a held-out JSONL the task is generated from) or `include`, not both")
        if self.data is None and (self.labels is not None or self.max_gen_toks != 32):
            raise ValueError("`labels` and `max_gen_toks` are options of a task generated from `data`")
        if self.labels is not None and not [label for label in self.labels if label.strip()]:
            raise ValueError("labels: give at least one non-empty label")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_data(self, handler):
        # Tasks without `data` dump as before it existed: their evaluation cache keys stay the same.
        out = handler(self)
        if isinstance(out, dict) and self.data is None:
            for name in ("data", "labels", "max_gen_toks"):
                out.pop(name, None)
        return out


class EvaluationSpec(Strict):
    """lm-eval after each stage (and once for the teacher baseline), as a Ray task with `resources`.

    With `resources.num_gpus` > 0 the model is loaded straight onto the GPU (a GPTQ checkpoint with GPTQModel's
    GPU kernel); otherwise evaluation runs on the CPU."""

    tasks: list[TaskSpec] = Field(default_factory=list)
    baseline: Literal["teacher", "none"] = "teacher"
    batch_size: Union[int, Literal["auto"]] = Field(
        16, description='Sequences per forward pass, or "auto": lm-eval finds the largest that fits (64 down).'
    )
    resources: Resources = Field(default_factory=Resources)

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, v):
        if isinstance(v, int) and v <= 0:
            raise ValueError(f'{v}: give a positive number of sequences, or "auto"')
        return v


class GateBar(Strict):
    """Bars for one metric; every bar given must pass. Direction (higher or lower is better) is known per metric.

    An evaluation score is a sample: on Winogrande (1,267 items) or ARC-Challenge (1,172) its standard error is
    about 0.012-0.014, so an absolute `max_drop: 0.01` can fail a model that lost nothing up to about 30% of the time.
    `max_drop_stderr: k` allows a drop of k standard errors of the difference, sqrt(se_previous² + se_now²),
    with the standard errors lm-eval reports (shown in the gate table, logged to MLflow as `<metric>_stderr`).
    Noise alone fails it with one-sided normal probability: k=2 about 2.3% per metric, k=2.5 about 0.6%
    (four gated metrics: up to about 9% and 2.5% per stage). Both evaluations see the same documents, so the
    true noise of the difference is smaller than this formula says: the rates are upper bounds, and the bar
    is lenient on real drops by the same token. Metrics whose lm-eval aggregation gives no standard error
    (weighted perplexity, bits per byte) fail this bar with a row saying so; gate them with `max_drop`."""

    min: Optional[float] = Field(None, description="Absolute floor (for lower-is-better metrics: ceiling, see `max`).")
    max: Optional[float] = Field(None, description="Absolute ceiling, e.g. for perplexity.")
    min_recovery: Optional[float] = Field(None, gt=0, description="Fraction of the teacher baseline to keep.")
    max_drop: Optional[float] = Field(None, ge=0, description="Allowed quality loss against the previous stage.")
    max_drop_stderr: Optional[float] = Field(
        None,
        gt=0,
        description="Allowed quality loss against the previous stage, in standard errors of the "
        "difference (2.5: noise alone fails it about 0.6% of the time).",
    )

    @model_validator(mode="after")
    def _some_bar(self):
        if all(v is None for v in (self.min, self.max, self.min_recovery, self.max_drop, self.max_drop_stderr)):
            raise ValueError("a gate metric needs at least one of min, max, min_recovery, max_drop, max_drop_stderr")
        return self


class GateSpec(Strict):
    on_fail: Literal["stop", "warn"] = "stop"
    metrics: dict[str, GateBar] = Field(description="`task` (its main metric) or `task.metric` -> bars.")


class StageEntry(Strict):
    """One stage: exactly one stage kind's options (prune, distill, quantize, evaluate, ...), plus its gate and resources."""

    name: Optional[str] = Field(
        None,
        description="Default: the stage kind, numbered if repeated. Letters, digits, "
        "'.', '_' and '-' (it names the stage's directory under the storage root).",
    )
    # One optional field per registered stage kind (prune, distill, ...) is added by _set_stage_kinds below.
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

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: Optional[str]) -> Optional[str]:
        # The name becomes <storage>/<pipeline>/<name>-<key12>: '/', '..' or an absolute path would write elsewhere.
        if v is not None and (not NAME_RE.match(v) or ".." in v):
            raise ValueError(
                f"{v!r}: use letters, digits, '.', '_' and '-' only, without '..' (the name becomes a "
                "directory under the storage root)"
            )
        return v

    @model_validator(mode="after")
    def _exactly_one(self):
        kinds = [k for k in STAGE_KINDS if getattr(self, k, None) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a stage needs exactly one of {', '.join(STAGE_KINDS)} (got {len(kinds) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STAGE_KINDS if getattr(self, k, None) is not None)

    @property
    def spec(self) -> BaseModel:
        return getattr(self, self.kind)


class TrackingSpec(Strict):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; default sqlite:///<storage>/mlflow.db.")
    experiment: Optional[str] = Field(None, description="Default: the pipeline name.")


class PipelineSpec(Strict):
    name: str
    teacher: TeacherSpec
    student: Optional[TeacherSpec] = Field(
        None,
        description="The model the stages start from, when it is not the teacher: e.g. a smaller pretrained model "
        "of the teacher's family (same tokenizer for white-box KD), or one that never saw the task's labels. The "
        "teacher stays the teacher of distill and generate and the evaluation baseline. Default: the teacher.",
    )
    storage: str = Field("./artifacts", description="Local/NFS path or fsspec URI (s3://, gs://).")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    seed: int = Field(
        0,
        ge=0,
        lt=2**32,
        description="Seeds data order, calibration samples and training (numpy and torch take 0 <= seed < 2**32).",
    )
    data: dict[str, DataSource] = Field(default_factory=dict)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    stages: list[StageEntry] = Field(description="The stages, in order (at least one).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v) or ".." in v:
            raise ValueError(
                "use letters, digits, '.', '_' and '-' only, without '..' (it names directories and MLflow experiments)"
            )
        return v

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_range(cls, v):
        # Said before int parsing, which calls 1e30 "exceeded maximum size" and never reaches the bounds.
        try:
            number = v if isinstance(v, int) else float(v) if isinstance(v, (float, str)) else None
        except (ValueError, OverflowError):
            return v
        if number is not None and not 0 <= number < 2**32:
            raise ValueError(f"{v} is out of range: numpy and torch take a seed with 0 <= seed < 2**32")
        return v

    @field_validator("stages")
    @classmethod
    def _some_stage(cls, v: list) -> list:
        if not v:
            raise ValueError(
                f"a pipeline needs at least one stage ({', '.join(STAGE_KINDS)}); one without stages does nothing"
            )
        return v

    @model_validator(mode="after")
    def _references(self):
        task_names = {t.name for t in self.evaluation.tasks}
        seen: set[str] = set()
        datasets: set[str] = set()  # earlier stages that made a dataset (generate): a later `data` may name one
        counts: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            kind = stage.kind
            counts[kind] = counts.get(kind, 0) + 1
            if stage.name is None:
                stage.name = kind if counts[kind] == 1 else f"{kind}{counts[kind]}"
            if stage.name in seen:
                raise ValueError(f"stages.{i}.name: duplicate stage name {stage.name!r}")
            seen.add(stage.name)
            stage_kind = contract.get(kind)
            for ref in stage_kind.data_sources(stage.spec):  # a `dataset` field may name an earlier dataset stage
                if ref.name not in self.data and not (ref.dataset and ref.name in datasets):
                    known = ", ".join(sorted(self.data | dict.fromkeys(datasets))) or "none defined"
                    raise ValueError(
                        f"stages.{i}.{kind}.{ref.field}: unknown data source {ref.name!r} (known: {known})"
                    )
            if stage_kind.produces_dataset:
                datasets.add(stage.name)
            if stage.gate:
                for metric in stage.gate.metrics:
                    if metric.split(".")[0] not in task_names:
                        raise ValueError(
                            f"stages.{i}.gate.{metric}: no evaluation task named {metric.split('.')[0]!r} "
                            f"(tasks: {', '.join(sorted(task_names)) or 'none'})"
                        )
                    _check_label_metric(self.evaluation.tasks, i, metric)
        return self


def _check_label_metric(tasks: list[TaskSpec], index: int, metric: str) -> None:
    """`task.accuracy` or `task.f1` on a held-out task needs its label set."""
    name, _, measure = metric.partition(".")
    task = next(t for t in tasks if t.name == name)
    if task.data is not None and measure in ("accuracy", "f1") and not task.labels:
        raise ValueError(
            f"stages.{index}.gate.{metric}: {measure} needs the label set: add `labels: [...]` to evaluation task "
            f"{name!r} (accuracy takes the first label named in the answer), or gate on {name}.exact_match"
        )


# ----------------------------------------------------------------------------- stage kinds
STAGE_KINDS: dict[str, type] = {}  # kind name -> its spec type, in registry order


def _set_stage_kinds(kinds: dict) -> None:
    """Give StageEntry one optional field per registered stage kind, so a kind declared in its own package (or a
    plugin, or a test) is a YAML key with its spec's validation, with no edit here. The registry calls this on every
    change (it imports nothing of the schema). Pydantic models are classes fixed at definition: the fields are
    replaced and both models rebuilt."""
    from pydantic.fields import FieldInfo

    fields = StageEntry.__pydantic_fields__
    for name in list(STAGE_KINDS):
        fields.pop(name, None)
    STAGE_KINDS.clear()
    STAGE_KINDS.update({name: kind.spec for name, kind in kinds.items()})
    for name, spec in STAGE_KINDS.items():
        fields[name] = FieldInfo(annotation=Optional[spec], default=None)  # type: ignore[valid-type]
    StageEntry.model_rebuild(force=True)
    PipelineSpec.model_rebuild(force=True)


contract.on_change(_set_stage_kinds)
contract.kinds()  # the built-in kinds and the plugins, each a key of StageEntry from here on
