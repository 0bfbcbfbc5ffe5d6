"""Plan a pipeline without loading weights: resolve the teacher, chain stage keys, predict shapes, find cached work.

Everything here is torch-free, so `validate` and `plan` answer in about a second."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from compressor import cache as cache_mod
from compressor import contract as stage_kinds
from compressor import storage as storage_mod
from compressor.cache import key_fields, stage_key
from compressor.config.schema import PipelineSpec, StageEntry, TaskSpec, TeacherSpec
from compressor.contract.kind import PlanContext, StageKind
from compressor.errors import UserError
from compressor.manifest import Manifest, ModelRef
from compressor.models import is_hub_id, offline_config, read_config, zoo_name, zoo_ref


@dataclass
class PlannedStage:
    entry: StageEntry
    key: str
    input: ModelRef  # the model this stage reads
    output: ModelRef  # the model after it (the input itself for a kind that makes no model)
    in_config: dict
    out_config: dict
    stage_dir: Path  # this node's view of `uri` (the directory itself on local/NFS storage)
    cached: Optional[Manifest]
    warnings: list[str] = field(default_factory=list)
    uri: str = ""  # <storage>/<pipeline>/<stage>-<key12>: a path or a storage URI
    held: Optional[tuple[str, Manifest]] = (
        None  # (where, manifest): ran before, its model kept in pending/ or rejected/
    )
    derived: dict = field(default_factory=dict)  # its kind's figures of it (StageKind.derived), computed here once

    @property
    def name(self) -> str:
        return self.entry.name or self.entry.kind

    @property
    def kind(self) -> str:
        return self.entry.kind

    @property
    def kind_of(self) -> StageKind:
        """Its stage kind (the contract of compressor/contract/kind.py)."""
        return stage_kinds.get(self.kind)

    @property
    def produces_model(self) -> bool:
        return self.kind_of.produces_model


@dataclass
class Plan:
    spec: PipelineSpec
    storage_root: Path  # local: the storage itself; remote (s3://, gs://, ...): this node's mirror of it
    teacher: ModelRef
    teacher_config: dict
    stages: list[PlannedStage]
    storage_uri: str = ""  # the storage as a URI, or the absolute local/NFS path

    @property
    def remote(self) -> bool:
        return storage_mod.is_remote(self.storage_uri)

    @property
    def pipeline_uri(self) -> str:
        return storage_mod.join(self.storage_uri, self.spec.name)

    def pending_uri(self, stage: PlannedStage) -> str:
        """Where a stage's output waits for its gate (kept there if evaluation is interrupted)."""
        return storage_mod.join(self.pipeline_uri, "pending", stage.stage_dir.name)

    def rejected_uri(self, stage: PlannedStage) -> str:
        """Where the output of a stage that missed its gate (or failed evaluation) is kept, with the reason."""
        return storage_mod.join(self.pipeline_uri, "rejected", stage.stage_dir.name)

    def eval_uri(self, model_key: str) -> str:
        from compressor.evaluation import eval_cache_key

        key = eval_cache_key(model_key, self.spec.evaluation.tasks, self.spec.evaluation.batch_size)
        return storage_mod.join(self.storage_uri, "_evals", f"{key[:24]}.json")

    def evaluated_models(self) -> list[ModelRef]:
        """Models whose scores the pipeline needs: the teacher baseline and every stage's output."""
        if not self.spec.evaluation.tasks:
            return []
        models = [self.teacher] if self.spec.evaluation.baseline == "teacher" else []
        return models + [s.output for s in self.stages if s.produces_model]

    def fully_cached(self) -> bool:
        return all(s.cached for s in self.stages) and all(
            storage_mod.exists(self.eval_uri(m.key)) for m in self.evaluated_models()
        )


def _is_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists()


def resolve_teacher(
    teacher: TeacherSpec, storage_uri: str, published: Optional[ModelRef] = None, field: str = "teacher"
) -> tuple[ModelRef, dict]:
    """ModelRef + config.json dict of the teacher, with a content key for the cache. A hub teacher's key is its commit
    hash: `published` (the snapshot `run` put on the storage), else the commit the local HF cache knows for the
    revision (no network, so `validate` and `plan` stay offline and fast), else the revision text."""
    model = teacher.model
    if (name := zoo_name(model)) is not None:
        from compressor.models import zoo

        if name not in zoo.RECIPES:
            raise UserError(
                f"{field}.model: unknown reference model {name!r} (known: {', '.join(sorted(zoo.RECIPES))})"
            )
        return ModelRef(path=model, key=zoo_ref(zoo.model_key(name))), zoo.model_config(name)
    if _is_path(model):
        path = Path(model).expanduser().resolve()
        if not (path / "config.json").is_file():
            what = "no such directory" if not path.exists() else "no config.json there (not a Hugging Face checkpoint)"
            raise UserError(f"{field}.model: {model}: {what}")
        from compressor.models.checkpoint import tensor_shapes

        config_text = (path / "config.json").read_text()
        key = cache_mod.digest({"config": config_text, "shapes": tensor_shapes(path), "dtype": teacher.dtype})
        import json

        return ModelRef(path=str(path), key=f"dir:{key}"), json.loads(config_text)
    from compressor.models import hub

    if not is_hub_id(model):
        raise UserError(
            f"{field}.model: {model!r} is neither a local checkpoint directory, `zoo:NAME`, nor a Hugging "
            "Face repo id (ORG/NAME)"
        )
    if published is not None:
        return published, read_config(published)
    commit = hub.cached_commit(model, teacher.revision)
    if commit is None:
        return (
            ModelRef(path=model, key=f"hub:{model}@{teacher.revision or 'main'}:unresolved", revision=teacher.revision),
            offline_config(teacher) or {},
        )
    uri = hub.snapshot_uri(storage_uri, model, commit)
    ref = ModelRef(
        path=storage_mod.join(uri, "model") if storage_mod.exists(storage_mod.join(uri, "manifest.json")) else model,
        key=hub.model_key(model, commit, teacher.dtype),
        revision=commit,
    )
    return ref, offline_config(teacher) or {}


def check_storage(root: Path) -> None:
    """Fail early (exit 2) when storage cannot be written; probe the deepest existing ancestor, create nothing."""
    probe = root
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"storage: {root}: {probe} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UserError(f"storage: {root}: cannot write there ({exc.strerror})") from None


def local_task_names(include: str) -> set[str]:
    """Task names defined by the YAMLs of a local include dir (`zoo:NAME` -> the shipped task templates)."""
    import yaml

    if (name := zoo_name(include)) is not None:
        from compressor.models import zoo

        zoo.recipe(name)  # unknown name -> UserError
        return set(zoo.TASK_NAMES)
    directory = Path(include).expanduser()
    if not directory.is_dir():
        raise UserError(f"evaluation.tasks: include {include!r}: no such directory")
    names: set[str] = set()
    for f in directory.rglob("*.yaml"):
        try:
            doc = yaml.safe_load(f.read_text())
        except yaml.YAMLError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            names.add(doc["task"])
    return names


def check_local_tasks(tasks: list[TaskSpec]) -> None:
    from compressor.heldout import read_rows

    for i, task in enumerate(tasks):
        if task.data is not None:
            read_rows(task)  # a bad held-out row is refused before any stage runs
        if task.include and task.name not in (known := local_task_names(task.include)):
            raise UserError(
                f"evaluation.tasks.{i}.name: unknown task {task.name!r} in {task.include} "
                f"(defined there: {', '.join(sorted(known)) or 'none'})"
            )


def make_plan(
    spec: PipelineSpec,
    storage: Optional[str] = None,
    teacher: Optional[ModelRef] = None,
    student: Optional[ModelRef] = None,
) -> Plan:
    """`teacher`, `student`: the hub snapshots `run` published (see resolve_teacher)."""
    storage_uri = storage or spec.storage
    remote = storage_mod.is_remote(storage_uri)
    storage_root = storage_mod.local_mirror(storage_uri) if remote else Path(storage_uri).expanduser().resolve()
    storage_uri = storage_uri if remote else str(storage_root)
    teacher, teacher_config = resolve_teacher(spec.teacher, storage_uri, teacher)
    current, config = teacher, teacher_config
    if spec.student is not None:  # the stages start from it; the teacher still teaches and is the baseline
        current, config = resolve_teacher(spec.student, storage_uri, student, field="student")
    planned: list[PlannedStage] = []
    datasets: dict[str, str] = {}  # name -> key of the stages so far that made a dataset (a later `data` names one)
    for i, entry in enumerate(spec.stages):
        kind = stage_kinds.get(entry.kind)
        around = PlanContext(spec, i, teacher.key)
        stage_spec = kind.planned_spec(entry.spec, around)
        # The text it calibrates on or trains on, by content; what else it reads (generate's prompts, a control's
        # labels) its key_extra keys, as it always did.
        named = {ref.name for ref in kind.data_sources(stage_spec) if ref.keyed}
        extra = {
            "seed": spec.seed,
            **kind.key_extra(entry.spec, around),
            "data": {n: key_fields(ds) for n, ds in spec.data.items() if n in named},
        }
        extra["data"].update({n: {"stage": datasets[n]} for n in named if n in datasets and n not in spec.data})
        try:
            checked = kind.check(stage_spec, config) if config else None
            derived = kind.derived(stage_spec, spec.data)
        except UserError as exc:
            raise UserError(f"stages.{i}.{entry.kind}: {exc}") from None
        # A dataset stage reads the teacher (in its key_extra), not the model the stages before it made.
        input_key = "" if kind.produces_dataset else current.key
        key = stage_key(entry.kind, entry.spec, input_key, extra, kind.output_version)
        output = ModelRef(path="", key=f"stage:{key}") if kind.produces_model else current
        name = entry.name or entry.kind
        if kind.produces_dataset:
            datasets[name] = key
        dir_name = f"{name}-{key[:12]}"
        uri = storage_mod.join(storage_uri, spec.name, dir_name)
        cached = _published(uri, key)
        if cached is not None and kind.produces_model:
            output = ModelRef(path=storage_mod.join(uri, cached.model_uri), key=output.key)
        out_config = checked.config if checked else {}
        stage = PlannedStage(
            entry,
            key,
            current,
            output,
            config,
            out_config,
            storage_root / spec.name / dir_name,
            cached,
            checked.warnings if checked else [],
            uri,
            derived=derived,
        )
        # An hf: source without `revision` follows its branch: each run reads the head of its day (the commit is
        # printed and keys the token shards), so two runs of one pipeline may not read the same data.
        stage.warnings = [
            *stage.warnings,
            *(
                f"data.{n}: {ds.source} is not pinned; runs read whatever its default branch holds then. Set "
                f"data.{n}.revision to a commit (a run prints the one it read)"
                for n, ds in spec.data.items()
                if n in extra["data"] and ds.source.startswith("hf:") and ds.revision is None
            ),
        ]
        if cached is None:
            stage.held = next(
                (
                    (where, m)
                    for where in ("pending", "rejected")
                    if (m := _published(storage_mod.join(storage_uri, spec.name, where, dir_name), key))
                ),
                None,
            )
        planned.append(stage)
        current, config = output, out_config
    return Plan(spec, storage_root, teacher, teacher_config, planned, storage_uri)


def _published(uri: str, key: str) -> Optional[Manifest]:
    """The manifest of a complete stage directory with this key, or None (missing, torn, another key, or naming
    files that are not there: storage.finished_manifest, issue 14)."""
    return storage_mod.finished_manifest(uri, key)
