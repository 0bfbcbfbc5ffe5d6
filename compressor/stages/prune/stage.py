"""The prune stage body: calibrate, rank, slice, write. Same code for `compressor prune` and pipelines."""

from __future__ import annotations

import time

import torch

from compressor import text_sources
from compressor.contract.context import StageContext
from compressor.contract.kind import StageResult
from compressor.manifest import ModelRef
from compressor.models import count_params, load_model, load_tokenizer, read_config, save_checkpoint
from compressor.stages.prune import KIND, budget, candidates, search, select, shapes
from compressor.stages.prune.importance import estimate, loss_increase
from compressor.stages.prune.plan import make_plan
from compressor.stages.prune.spec import PruneSpec
from compressor.stages.prune.surgery import apply_plan

DEFAULT_SAMPLES = 1024  # the Minitron paper's calibration set size


def non_embedding_params(model) -> int:
    embeddings = {
        id(p): p.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()
    }
    return count_params(model) - sum(embeddings.values())  # a tied lm_head is one Parameter, counted once


def calibration_blocks(spec: PruneSpec, ctx: StageContext, tokenizer, config: dict) -> torch.Tensor:
    return text_sources.calibration_blocks(
        ctx,
        spec.calibration,
        tokenizer,
        spec.samples,
        spec.seq_len,
        config.get("max_position_embeddings"),
        DEFAULT_SAMPLES,
        "prune",
    )


def prune(spec: PruneSpec, model_ref: ModelRef, ctx: StageContext) -> StageResult:
    config = read_config(model_ref, fetch=True)
    warnings = KIND.check(spec, config).warnings
    for warning in warnings:
        ctx.info(f"warning: {warning}")
    src = shapes.source_shape(config)
    if spec.searching or spec.selecting:  # the shape is chosen after the importance pass (search.py, select.py)
        out, kept = None, None
    else:
        out, kept = shapes.target_shape(spec, config), shapes.kept_layers_rule(spec, src.num_layers)

    model = load_model(model_ref.path, dtype="auto", revision=model_ref.revision)
    if torch.cuda.is_available():  # inside Ray, only when the stage's resources ask for a GPU
        model.to("cuda")
    tokenizer = load_tokenizer(model_ref.path, revision=model_ref.revision)
    params_before, non_embedding_before = count_params(model), non_embedding_params(model)
    if spec.selecting and not candidates.needs_importance(spec):  # checkpoints only: nothing is pruned
        return selected_checkpoint(spec, model_ref, ctx, model, tokenizer, config, params_before, warnings)
    blocks = calibration_blocks(spec, ctx, tokenizer, config)

    start = time.perf_counter()
    importance = estimate(model, blocks, src.head_dim, spec.batch_size, spec.aggregation, ctx.progress)
    if spec.selecting:
        ranks_layers = candidates.ranks_layers(spec, config)
    else:
        ranks_layers = budget.ranks_layers(spec, config) if spec.searching else kept is None
    if ranks_layers and spec.depth_metric == "loss":
        importance.base_loss, importance.loss_increase = loss_increase(model, blocks, spec.batch_size, ctx.progress)
    importance_seconds = time.perf_counter() - start
    if spec.selecting:
        selection = select.choose_student(spec, model_ref, ctx, model, tokenizer, config, blocks, importance)
        ctx.save_json_artifact("selection.json", selection.details)
        if selection.chosen.checkpoint is not None:
            return copied_checkpoint(selection, ctx, config, params_before, warnings)
        out, kept = selection.chosen.shape, selection.chosen.kept_layers
    found = (
        search.choose_shape(spec, model_ref, ctx, model, tokenizer, config, blocks, importance)
        if spec.searching
        else None
    )
    if found is not None:
        out, kept = found.shape, found.kept_layers
        ctx.save_json_artifact("search.json", found.details)

    start = time.perf_counter()
    plan = make_plan(importance, src, out, kept, spec.depth_metric)
    apply_plan(model, plan)
    surgery_seconds = time.perf_counter() - start
    save_checkpoint(model, tokenizer, ctx.model_dir)

    ctx.save_json_artifact(
        "importance.json",
        {
            "aggregation": spec.aggregation,
            "depth_metric": spec.depth_metric,
            "calibration": {"samples": int(blocks.shape[0]), "seq_len": int(blocks.shape[1])},
            "scores": importance.to_json(),
            "plan": plan.summary(),
        },
    )
    metrics = {
        "params_before": params_before,
        "params_after": count_params(model),
        "non_embedding_params_before": non_embedding_before,
        "non_embedding_params_after": non_embedding_params(model),
        "importance_seconds": round(importance_seconds, 3),
        "surgery_seconds": round(surgery_seconds, 3),
        "calibration_tokens": blocks.numel(),
        **(found.metrics if found else {}),
        **(selection.metrics if spec.selecting else {}),
    }
    ctx.log_metrics(metrics)
    ctx.info(f"prune: {params_before:,} -> {metrics['params_after']:,} parameters, layers kept {plan.layers}")
    return StageResult(
        metrics=metrics,
        details={
            "source_shape": src.as_dict(),
            "target_shape": out.as_dict(),
            "kept_layers": plan.layers,
            "params_before": params_before,
            "params_after": metrics["params_after"],
            "warnings": warnings,
            **({"search": found.details, "scratch": found.scratch} if found else {}),
            **({"selection": selection.details, "scratch": selection.scratch} if spec.selecting else {}),
        },
    )


def selected_checkpoint(spec, model_ref, ctx, model, tokenizer, config, params_before, warnings) -> StageResult:
    """A selection among checkpoints only: no calibration pass, the winner copied."""
    selection = select.choose_student(spec, model_ref, ctx, model, tokenizer, config, None, None)
    ctx.save_json_artifact("selection.json", selection.details)
    return copied_checkpoint(selection, ctx, config, params_before, warnings)


def copied_checkpoint(selection: select.Selection, ctx: StageContext, config: dict, params_before: int, warnings):
    """The stage's output when a `model:` candidate won: that checkpoint, as it is."""
    import shutil

    from compressor.models import materialize

    chosen = selection.chosen
    source = materialize(chosen.checkpoint).path
    shutil.copytree(source, ctx.model_dir, dirs_exist_ok=True)
    out_config = read_config(ModelRef(path=str(ctx.model_dir), key="selected"))
    metrics = {"params_before": params_before, "params_after": chosen.params, **selection.metrics}
    ctx.log_metrics(metrics)
    ctx.info(f"prune: selected checkpoint {chosen.checkpoint.path} ({chosen.params:,} parameters)")
    return StageResult(
        metrics=metrics,
        details={
            "source_shape": shapes.source_shape(config).as_dict(),
            "target_shape": shapes.source_shape(out_config).as_dict(),
            "selected_model": chosen.checkpoint.path,
            "params_before": params_before,
            "params_after": chosen.params,
            "warnings": warnings,
            "selection": selection.details,
            "scratch": selection.scratch,
        },
    )
