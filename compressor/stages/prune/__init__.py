"""Minitron structured pruning (width and depth) of Hugging Face Llama-family checkpoints.

Torch-free at import: `check` reads only config.json; `run` imports the torch parts lazily."""

from __future__ import annotations

from typing import Optional

from compressor.contract import register, stage_flops
from compressor.contract.context import StageContext
from compressor.contract.kind import CheckResult, EstimateInput, PlanContext, StageKind, StageResult, one_task
from compressor.manifest import ModelRef
from compressor.stages.prune.spec import PruneSpec

DEFAULT_SAMPLES = 1024  # Minitron's calibration set


def later_group_size(plan: PlanContext):
    """The group size of the first later stage that has one (a quantize stage), or None."""
    from compressor.contract import get

    later = (get(entry.kind).group_size(entry.spec) for entry in plan.pipeline.stages[plan.index + 1 :])
    group = next((g for g in later if g is not None), None)
    return group if group and group > 0 else None


def selection_notes(plan, stage) -> list[str]:
    """For candidates: what each is, the bar, and the selection's cost."""
    from compressor.stages.prune import candidates

    spec, settings = stage.entry.spec, stage.entry.spec.search_settings()
    configs = candidates.planned_configs(spec, stage.in_config)
    cost = candidates.selection_flops(spec, stage.in_config, plan.spec, plan.teacher_config)
    evaluate = "all of them" if spec.bar.evaluate == "all" else "smallest first, until one passes"
    lines = [
        f"{stage.name} selection: {len(configs)} candidates, each distilled {settings.steps} steps ({evaluate}); "
        f"the smallest with held-out perplexity <= {spec.bar.max_perplexity_ratio:g} x the teacher's is kept "
        f"({cost:.2e} FLOPs at most)"
    ]
    for candidate, config in zip(spec.candidates, configs):
        size = "at most " if candidate.params is not None else ""
        lines.append(f"  {candidate.label()}: {size}{KIND.params(config):,} parameters")
    return lines


class Prune(StageKind):
    name = "prune"
    spec = PruneSpec
    summary = "Minitron structured pruning of width (heads, neurons, channels) and depth."

    def check(self, spec: PruneSpec, config: dict) -> CheckResult:
        """Validate the target against the source config (UserError naming the field) and predict the output config."""
        from compressor.stages.prune import shapes

        if not config:  # a hub id not fetched yet: the same check runs again when the stage starts
            return CheckResult(
                config={}, warnings=["prune: input config.json not available; the target is checked at run time"]
            )
        shapes.architecture(config)
        if spec.selecting:  # the output is one candidate: later stages are planned on the largest
            from compressor.stages.prune import candidates

            configs = candidates.planned_configs(spec, config)
            return CheckResult(config=max(configs, key=self.params))
        if spec.searching:  # a budget: the shape is chosen at run time; later stages are planned on the largest
            from compressor.stages.prune import budget

            space = budget.cached_space(spec, config)
            largest = max(space.candidates, key=lambda c: c.params)
            budget.check_group_size(space, spec)
            return CheckResult(config=largest.config)
        out = shapes.target_shape(spec, config)
        kept = shapes.kept_layers_rule(spec, shapes.source_shape(config).num_layers)
        return CheckResult(
            config=shapes.output_config(config, out, kept),
            warnings=shapes.group_size_warnings(out, spec.quantize_group_size),
        )

    def run(self, spec: PruneSpec, model: ModelRef, ctx: StageContext) -> StageResult:
        from compressor.stages.prune.stage import prune

        return prune(spec, model, ctx)

    def calibration(self, spec: PruneSpec) -> tuple[Optional[int], Optional[int]]:
        return spec.samples, spec.seq_len

    def flops(self, spec: PruneSpec, given: EstimateInput) -> float:
        """One calibration pass gives width and block importance; depth_metric=loss adds a pass per layer dropped; a
        budget adds its search (scoring every candidate, short-distilling the best: budget.search_flops)."""
        from compressor import estimate
        from compressor.stages.prune import budget

        samples, seq_len = estimate.calibration_size(
            spec.calibration, spec.samples, spec.seq_len, given.pipeline, DEFAULT_SAMPLES
        )
        passes = 1
        if spec.selecting:
            from compressor.stages.prune import candidates

            ranked = candidates.ranks_layers(spec, given.in_config)
        elif spec.searching:
            ranked = budget.ranks_layers(spec, given.in_config)
        else:
            ranked = any(getattr(spec.target, n) is not None for n in ("num_layers", "keep_layers", "drop_layers"))
        if spec.depth_metric == "loss" and ranked:
            passes += estimate.shape(given.in_config)["layers"]
        calibration = passes * samples * seq_len * estimate.forward_flops_per_token(given.in_config, seq_len)
        if spec.selecting:
            from compressor.stages.prune import candidates

            selection = candidates.selection_flops(spec, given.in_config, given.pipeline, given.teacher_config)
            return (calibration if candidates.needs_importance(spec) else 0.0) + selection
        if not spec.searching:
            return calibration
        return calibration + budget.search_flops(spec, given.in_config, given.pipeline, given.teacher_config)["total"]

    def key_extra(self, spec: PruneSpec, plan: PlanContext) -> dict:
        """A search also depends on the teacher (its short distillations) and its data sources (refused here, exit 2,
        when the pipeline has no such source). Nothing for a fixed shape: its key stays what it always was."""
        if not spec.searching and not spec.selecting:
            return {}
        from compressor.errors import UserError
        from compressor.stages.prune import budget, candidates

        settings, data = spec.search_settings(), plan.pipeline.data
        for field in ("data", "heldout"):
            name = getattr(settings, field)
            if name is not None and name not in data:
                raise UserError(
                    f"stages.{plan.index}.prune.search.{field}: unknown data source {name!r} (known: "
                    f"{', '.join(sorted(data)) or 'none defined'})"
                )
        names = {budget.search_source(spec, data)[0], settings.heldout} - {None}
        if spec.selecting:
            candidates.refuse_evaluation_data(spec, plan)
            select = candidates.key_extra(spec, plan, names)
            resolved = self.planned_spec(spec, plan).search_align
            if resolved != spec.align:  # a budget candidate's grid follows a later group size
                select["align"] = resolved
            return {"select": select}
        search = {
            "teacher": plan.teacher_key,
            "data": {n: data[n].model_dump(mode="json") for n in sorted(names) if n in data},
        }
        resolved = self.planned_spec(spec, plan).search_align
        if resolved != spec.align:  # align defaulted to a later group size: another candidate grid, another output
            search["align"] = resolved
        return {"search": search}

    def planned_spec(self, spec: PruneSpec, plan: PlanContext) -> PruneSpec:
        """Warn about widths a later stage's quantization group size will not divide, and let a search default its
        align to that group size. The run receives the pipeline's own spec object, not this copy, so the group size is
        also recorded on it (a private attribute: the key of a fixed target does not change; see key_extra)."""
        group = later_group_size(plan)
        spec._later_group_size = group
        if spec.quantize_group_size is not None or group is None:
            return spec
        return spec.model_copy(update={"quantize_group_size": group})

    def describe_resources(self, spec: PruneSpec, resources) -> str:
        task = one_task(spec, resources)
        settings = spec.search_settings()
        if spec.selecting and settings.steps > 0:
            short = settings.distill_spec("search")
            worker = type(resources)(num_cpus=short.cpus_per_worker, num_gpus=short.gpus_per_worker)
            return f"{task}; select: {len(spec.candidates)} x ({short.workers} x {one_task(short, worker)})"
        if not spec.searching or settings.steps == 0 or settings.top_k < 2:
            return task
        short = settings.distill_spec("search")
        worker = type(resources)(num_cpus=short.cpus_per_worker, num_gpus=short.gpus_per_worker)
        return f"{task}; search: {settings.top_k} x ({short.workers} x {one_task(short, worker)})"

    def plan_notes(self, plan, stage) -> list[str]:
        """For a budget: the candidates, the search's cost next to the following distill stage's, the shapes."""
        spec = stage.entry.spec
        if spec.selecting and stage.in_config and not stage.cached:
            return selection_notes(plan, stage)
        if not spec.searching or not stage.in_config or stage.cached:
            return []
        from compressor.stages.prune import budget

        space, settings = budget.cached_space(spec, stage.in_config), spec.search_settings()
        cost = budget.search_flops(spec, stage.in_config, plan.spec, plan.teacher_config)
        distilled = min(settings.top_k, len(space.candidates)) if settings.steps > 0 and settings.top_k > 1 else 0
        how = (
            f"the best {distilled} distilled {settings.steps} steps each, the winner by held-out loss"
            if distilled
            else "the best by pruned loss (no short distillation)"
        )
        lines = [
            f"{stage.name} search: {len(space.candidates)} candidate shapes (of {space.total} within "
            f"{space.budget.describe()}), scored by their pruned loss; {how}"
        ]
        later = [s for s in plan.stages[plan.stages.index(stage) + 1 :] if s.kind == "distill" and s.in_config]
        main = ""
        if later:
            after = later[0]
            flops = stage_flops(
                "distill", after.entry.spec, after.in_config, after.out_config, plan.spec, derived=after.derived
            )
            main = (
                f"; the {later[0].name} stage after it: {flops:.2e} (the search is {cost['total'] / flops:.0%} of it)"
            )
        lines.append(
            f"{stage.name} search cost: {cost['total']:.2e} FLOPs ({cost['scoring']:.2e} scoring, "
            f"{cost['short_distills']:.2e} short distillations){main}"
        )
        lines.append(f"{stage.name} shapes it will try:")
        lines += [
            f"  {c.label()}: {c.params:,} parameters ({c.non_embedding_params:,} non-embedding)"
            for c in space.candidates
        ]
        return lines

    def result_line(self, manifest) -> str:
        d = manifest.details
        if "selection" in d:
            s = d["selection"]
            row = next(r for r in s["candidates"] if r["index"] == s["chosen"])
            return (
                f"selected {row['label']} among {len(s['candidates'])} candidates: {d['params_after']:,} parameters, "
                f"perplexity ratio {row['perplexity_ratio']:.3f} (bar {s['bar']['max_perplexity_ratio']:g})"
            )
        searched = f", searched among {d['search']['scored']} shapes" if "search" in d else ""
        return f"pruned {d['params_before']:,} -> {d['params_after']:,} parameters ({d['target_shape']}{searched})"


KIND = register(Prune())
