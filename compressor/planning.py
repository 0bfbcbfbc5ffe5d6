"""Plan a pipeline without loading weights: resolve the teacher, chain stage keys, predict shapes, find cached work.

Everything here is torch-free, so `validate` and `plan` answer in about a second."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from compressor import cache as cache_mod
from compressor import storage as storage_mod
from compressor.cache import StageCache, stage_key
from compressor.config.schema import PipelineSpec, StageEntry, TaskSpec, TeacherSpec
from compressor.errors import UserError
from compressor.manifest import Manifest, ModelRef
from compressor.stages import stage_module


@dataclass
class PlannedStage:
    entry: StageEntry
    key: str
    input: ModelRef  # the model this stage reads
    output: ModelRef  # the model after it (the input itself for evaluate)
    in_config: dict
    out_config: dict
    stage_dir: Path
    cached: Optional[Manifest]
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.entry.name or self.entry.kind

    @property
    def kind(self) -> str:
        return self.entry.kind


@dataclass
class Plan:
    spec: PipelineSpec
    storage_root: Path  # local: the storage itself; remote (s3://, gs://, ...): this node's mirror of it
    teacher: ModelRef
    teacher_config: dict
    stages: list[PlannedStage]
    eval_cache_dir: Path
    storage_uri: str = ""  # what the pipeline asked for; differs from storage_root when remote

    @property
    def pipeline_root(self) -> Path:
        return self.storage_root / self.spec.name

    @property
    def remote(self) -> bool:
        return storage_mod.is_remote(self.storage_uri)

    def remote_stage_uri(self, stage: "PlannedStage") -> str:
        return storage_mod.join(self.storage_uri, self.spec.name, stage.stage_dir.name)

    def eval_path(self, model_key: str) -> Path:
        from compressor.evaluation import eval_cache_key

        key = eval_cache_key(model_key, self.spec.evaluation.tasks, self.spec.evaluation.batch_size)
        return self.eval_cache_dir / f"{key[:24]}.json"

    def evaluated_models(self) -> list[ModelRef]:
        """Models whose scores the pipeline needs: the teacher baseline and every stage's output."""
        if not self.spec.evaluation.tasks:
            return []
        models = [self.teacher] if self.spec.evaluation.baseline == "teacher" else []
        return models + [s.output for s in self.stages if s.kind != "evaluate"]

    def fully_cached(self) -> bool:
        return all(s.cached for s in self.stages) and all(self.eval_path(m.key).is_file() for m in self.evaluated_models())


def _is_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists()


def resolve_teacher(teacher: TeacherSpec) -> tuple[ModelRef, dict]:
    """ModelRef + config.json dict of the teacher, with a content key for the cache."""
    model = teacher.model
    if model.startswith("zoo:"):
        from compressor import zoo

        name = model[len("zoo:"):]
        if name not in zoo.RECIPES:
            raise UserError(f"teacher.model: unknown reference model {name!r} (known: {', '.join(sorted(zoo.RECIPES))})")
        return ModelRef(path=model, key=f"zoo:{zoo.model_key(name)}"), zoo.model_config(name)
    if _is_path(model):
        path = Path(model).expanduser().resolve()
        if not (path / "config.json").is_file():
            what = "no such directory" if not path.exists() else "no config.json there (not a Hugging Face checkpoint)"
            raise UserError(f"teacher.model: {model}: {what}")
        from compressor.checkpoint import tensor_shapes

        config_text = (path / "config.json").read_text()
        key = cache_mod.digest({"config": config_text, "shapes": tensor_shapes(path), "dtype": teacher.dtype})
        import json

        return ModelRef(path=str(path), key=f"dir:{key}"), json.loads(config_text)
    key = cache_mod.digest({"hub": model, "revision": teacher.revision, "dtype": teacher.dtype})
    return ModelRef(path=model, key=f"hub:{key}", revision=teacher.revision), _hub_config(teacher)


def _hub_config(teacher: TeacherSpec) -> dict:
    """A hub teacher's config without the network: TeacherSpec.config or a config shipped with compressor."""
    try:
        from compressor.estimate import teacher_config
    except ImportError:  # pragma: no cover - estimate ships with the package
        return {}
    return teacher_config(teacher) or {}


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

    if include.startswith("zoo:"):
        from compressor import zoo

        zoo.recipe(include[len("zoo:"):])  # unknown name -> UserError
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
    for i, task in enumerate(tasks):
        if task.include and task.name not in (known := local_task_names(task.include)):
            raise UserError(f"evaluation.tasks.{i}.name: unknown task {task.name!r} in {task.include} "
                            f"(defined there: {', '.join(sorted(known)) or 'none'})")


def make_plan(spec: PipelineSpec, storage: Optional[str] = None) -> Plan:
    storage_uri = storage or spec.storage
    remote = storage_mod.is_remote(storage_uri)
    storage_root = storage_mod.local_mirror(storage_uri) if remote else Path(storage_uri).expanduser().resolve()
    teacher, teacher_config = resolve_teacher(spec.teacher)
    cache = StageCache(storage_root / spec.name)
    later_group = _quantize_group_sizes(spec)
    current, config = teacher, teacher_config
    planned: list[PlannedStage] = []
    for i, entry in enumerate(spec.stages):
        stage_spec = entry.spec
        extra = {"seed": spec.seed, "data": {n: ds.model_dump(mode="json") for n, ds in spec.data.items()
                                             if n in (getattr(stage_spec, "calibration", None), getattr(stage_spec, "data", None))}}
        if entry.kind == "distill":
            extra["teacher"] = teacher.key
        if entry.kind == "evaluate":
            extra["tasks"] = [t.model_dump(mode="json") for t in spec.evaluation.tasks]
        if entry.kind == "prune" and stage_spec.quantize_group_size is None and later_group.get(i):
            stage_spec = stage_spec.model_copy(update={"quantize_group_size": later_group[i]})
        try:
            checked = stage_module(entry.kind).check(stage_spec, config) if config else None
        except UserError as exc:
            raise UserError(f"stages.{i}.{entry.kind}: {exc}") from None
        key = stage_key(entry.kind, entry.spec, current.key, extra)
        output = current if entry.kind == "evaluate" else ModelRef(path="", key=f"stage:{key}")
        name = entry.name or entry.kind
        stage_dir = cache.stage_dir(name, key)
        cached = cache.lookup(name, key)
        if cached is None and remote:  # published by another node or an earlier run elsewhere
            cached = storage_mod.read_manifest(storage_mod.join(storage_uri, spec.name, stage_dir.name))
        if cached is not None and entry.kind != "evaluate":
            output = ModelRef(path=str(stage_dir / cached.model_uri), key=output.key)
        out_config = checked.config if checked else {}
        planned.append(PlannedStage(entry, key, current, output, config, out_config, stage_dir, cached,
                                    checked.warnings if checked else []))
        current, config = output, out_config
    return Plan(spec, storage_root, teacher, teacher_config, planned, storage_root / "_evals", storage_uri)


def _quantize_group_sizes(spec: PipelineSpec) -> dict[int, int]:
    """For each prune stage index, the group size of the first quantize stage after it (for its warning)."""
    out: dict[int, int] = {}
    for i, entry in enumerate(spec.stages):
        if entry.kind == "prune":
            later = next((e.quantize for e in spec.stages[i + 1:] if e.kind == "quantize"), None)
            if later is not None and later.group_size > 0:
                out[i] = later.group_size
    return out

