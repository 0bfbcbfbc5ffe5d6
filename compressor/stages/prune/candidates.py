"""Student selection's candidates as `validate` and `plan` see them (torch-free): each one's own prune spec, the
checkpoint a `model:` candidate names, the configs later stages are planned on, the cache key's share.
compressor/stages/prune/select.py runs the selection."""

from __future__ import annotations

from typing import Optional

from compressor import estimate
from compressor.errors import UserError
from compressor.manifest import ModelRef
from compressor.models import is_zoo
from compressor.stages.prune import budget, shapes
from compressor.stages.prune.spec import PruneSpec, PruneTarget


def where(index: int) -> str:
    return f"prune.candidates.{index}"


def candidate_spec(spec: PruneSpec, index: int) -> PruneSpec:
    """The prune spec of a shape or budget candidate: the stage's, with that candidate as its target (a budget keeps
    the search settings that enumerate and score its shapes)."""
    candidate = spec.candidates[index]
    target = PruneTarget(**candidate.model_dump(exclude={"model"}, exclude_none=True))
    update = {"target": target, "candidates": None, "bar": None}
    if target.params is None:
        update["search"] = None
    copy = spec.model_copy(update=update)
    copy._later_group_size = spec._later_group_size
    return copy


def model_ref(spec: PruneSpec, index: int) -> ModelRef:
    """The checkpoint a `model:` candidate names, with a content key (as the pipeline keys a local teacher)."""
    from compressor.config.schema import TeacherSpec
    from compressor.planning import _is_path, resolve_teacher

    model = spec.candidates[index].model
    if not (is_zoo(model) or _is_path(model)):
        raise UserError(
            f"{where(index)}.model: {model!r} is neither a local checkpoint directory nor `zoo:NAME`; download a "
            "hub model first and name its directory"
        )
    return resolve_teacher(TeacherSpec(model=model), "", field=where(index))[0]


def model_config(spec: PruneSpec, index: int) -> dict:
    from compressor.models import read_config

    return read_config(model_ref(spec, index))


def planned_config(spec: PruneSpec, index: int, config: dict) -> dict:
    """The output config of one candidate, or a UserError naming its field: a shape's, the largest shape a budget
    allows (the one chosen is known at run time), a checkpoint's own."""
    candidate = spec.candidates[index]
    try:
        if candidate.model is not None:
            found = model_config(spec, index)
            shapes.architecture(found)
            return found
        own = candidate_spec(spec, index)
        if own.searching:
            return max(budget.cached_space(own, config).candidates, key=lambda c: c.params).config
        out = shapes.target_shape(own, config)
        return shapes.output_config(config, out, shapes.kept_layers_rule(own, shapes.source_shape(config).num_layers))
    except UserError as exc:
        raise UserError(str(exc).replace("prune.target", where(index), 1)) from None


def planned_configs(spec: PruneSpec, config: dict) -> list[dict]:
    return [planned_config(spec, i, config) for i in range(len(spec.candidates))]


def ranks_layers(spec: PruneSpec, config: dict) -> bool:
    """Whether some candidate drops layers chosen by importance (depth_metric=loss then adds a pass per layer)."""
    n = shapes.source_shape(config).num_layers
    for i, candidate in enumerate(spec.candidates):
        if candidate.model is not None:
            continue
        own = candidate_spec(spec, i)
        if budget.ranks_layers(own, config) if own.searching else shapes.kept_layers_rule(own, n) is None:
            return True
    return False


def needs_importance(spec: PruneSpec) -> bool:
    """Only checkpoints: no calibration pass is needed (nothing is pruned)."""
    return any(c.model is None for c in spec.candidates)


def refuse_evaluation_data(spec: PruneSpec, plan) -> None:
    """search.heldout picks the student: refuse (exit 2) a source that is the text of the pipeline's evaluation tasks,
    the gate's held-out set, which a selection must never read."""
    name = spec.search_settings().heldout
    if name is None or name not in plan.pipeline.data:
        return
    source, tasks = plan.pipeline.data[name], plan.pipeline.evaluation.tasks
    if source.source in {t.data for t in tasks if t.data} or (
        source.split == "heldout" and source.source in {t.include for t in tasks if t.include}
    ):
        raise UserError(
            f"stages.{plan.index}.prune.search.heldout: {name!r} is the held-out text of the pipeline's evaluation "
            "tasks (the gate's); student selection must not pick on it. Leave heldout unset (the sequences of "
            "search.data after the short distillations' share) or name another source"
        )


def key_extra(spec: PruneSpec, plan, data_names: set) -> dict:
    """The selection's share of the stage key: its teacher, data and each checkpoint's content key."""
    data = plan.pipeline.data
    models = {str(i): model_ref(spec, i).key for i, c in enumerate(spec.candidates) if c.model is not None}
    return {
        "teacher": plan.teacher_key,
        "data": {n: data[n].model_dump(mode="json") for n in sorted(data_names) if n in data},
        "models": models,
    }


def selection_flops(spec: PruneSpec, config: dict, pipeline, teacher_config: Optional[dict]) -> float:
    """Estimated FLOPs of the short distillations (teacher forward + student forward and backward per token) and the
    held-out passes of every candidate (an upper bound for evaluate: until_pass)."""
    settings = spec.search_settings()
    name, source = budget.search_source(spec, pipeline.data)
    seq = settings.distill.get("seq_len") or (source.seq_len if source else 2048)
    batch = settings.distill.get("global_batch") or 0
    if settings.steps and not batch:
        batch = settings.distill_spec(name or "search").global_batch
    teacher = teacher_config or config
    total = 0.0
    for cfg in planned_configs(spec, config):
        student = estimate.forward_flops_per_token(cfg, seq)
        total += settings.steps * batch * seq * (estimate.forward_flops_per_token(teacher, seq) + 3 * student)
        total += 2 * settings.heldout_samples * seq * student
    return total
