"""Prune to a budget: which shape, found as Minitron did (compressor/stages/prune/budget.py enumerates the shapes).

1. Score. Each candidate is the source pruned to it, from the stage's ONE importance pass, and its LM loss on the
   first `score_samples` calibration sequences is its score; no training. One pruned copy at a time, so the peak is
   the source plus one candidate.
2. Short distillation. The `top_k` best are published to the pipeline storage (so Ray Train workers on any node read
   them) and each gets `steps` steps from the teacher with the distill stage's own code (driver.distill: Ray Train +
   DeepSpeed), one Ray task per candidate on this node, as many at once as the cluster holds their workers. This
   task's CPUs return to Ray while it waits (its GPUs do not: the workers need other ones).
3. Pick. The lowest held-out LM loss after it wins (with steps: 0 or top_k: 1, the lowest score). The stage then
   prunes the source to that shape: its output is the pruned model, not the short-distilled copy.

Every candidate is a nested run of the stage's (ctx.child_sink: MLflow in pipelines) and a row of the manifest's
`search` (shape, parameters, score, held-out loss before and after, both rankings)."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from compressor import storage
from compressor.cache import digest, key_fields
from compressor.contract.context import MetricsSink, StageContext
from compressor.errors import CompressorError, UserError
from compressor.manifest import Manifest, ModelRef
from compressor.models.loss import lm_loss
from compressor.models.reference import is_zoo
from compressor.stages.prune import budget as budgets
from compressor.stages.prune import shapes
from compressor.stages.prune.importance import Importance
from compressor.stages.prune.plan import make_plan
from compressor.stages.prune.spec import PruneSpec
from compressor.stages.prune.surgery import apply_plan

CAPACITY_POLL_S = 30.0  # how often a search waiting on its short distillations looks for room to start more


@dataclass
class Scored:
    index: int  # position among the enumerated candidates
    candidate: budgets.Candidate
    pruned_loss: float  # LM loss on calibration data right after pruning
    sink: MetricsSink = field(default_factory=MetricsSink)
    heldout_before: Optional[float] = None  # held-out LM loss, pruned (top_k only)
    heldout_after: Optional[float] = None  # held-out LM loss after the short distillation
    distill_seconds: Optional[float] = None

    def row(self) -> dict:
        return {
            "index": self.index,
            "label": self.candidate.label(),
            **self.candidate.as_dict(),
            "pruned_loss": self.pruned_loss,
            "heldout_loss_before": self.heldout_before,
            "heldout_loss_after": self.heldout_after,
            "distill_seconds": self.distill_seconds,
        }


@dataclass
class Outcome:
    shape: shapes.Shape
    kept_layers: Optional[list[int]]
    details: dict  # the manifest's `search`
    metrics: dict[str, float]
    scratch: list[str]  # candidate checkpoints and Ray Train runs, dropped once the stage is published


def pruned_copy(
    model,
    importance: Importance,
    src: shapes.Shape,
    candidate: budgets.Candidate,
    kept_layers: Optional[list[int]],
    depth_metric: str,
):
    """The source pruned to `candidate`, leaving the source untouched."""
    pruned = copy.deepcopy(model)
    apply_plan(pruned, make_plan(importance, src, candidate.shape, kept_layers, depth_metric))
    return pruned.eval()


def choose_shape(
    spec: PruneSpec,
    model_ref: ModelRef,
    ctx: StageContext,
    model,
    tokenizer,
    config: dict,
    blocks: torch.Tensor,
    importance: Importance,
) -> Outcome:
    settings, src = spec.search_settings(), shapes.source_shape(config)
    space = budgets.cached_space(spec, config)
    start = time.perf_counter()
    ctx.info(f"prune search: {len(space.candidates)} of the {space.total} shapes meeting {space.budget.describe()}")
    score_blocks = blocks[: settings.score_samples]
    scored = []
    for i, candidate in enumerate(
        ctx.progress(space.candidates, total=len(space.candidates), desc="prune: score shapes")
    ):
        pruned = pruned_copy(model, importance, src, candidate, space.kept_layers, spec.depth_metric)
        scored.append(Scored(i, candidate, lm_loss(pruned, score_blocks, spec.batch_size)))
        del pruned
    scoring_seconds = time.perf_counter() - start
    before = sorted(scored, key=lambda s: s.pruned_loss)
    for rank, s in enumerate(before):
        s.sink = ctx.child_sink(
            f"candidate {s.index}: {s.candidate.label()}", {"index": s.index, **s.candidate.as_dict()}
        )
        s.sink.log_metrics(
            {
                "pruned_loss": s.pruned_loss,
                "rank_before": rank,
                "params": s.candidate.params,
                "non_embedding_params": s.candidate.non_embedding_params,
            }
        )
    top = before[: settings.top_k]
    distilling = settings.steps > 0 and len(top) > 1  # one candidate needs no distillation to win
    scratch: list[str] = []
    distill_seconds = 0.0
    try:
        if distilling:
            start_distill = time.perf_counter()
            scratch = short_distills(spec, model_ref, ctx, model, tokenizer, config, importance, space, top)
            distill_seconds = time.perf_counter() - start_distill
        after = sorted(top, key=lambda s: s.heldout_after) if distilling else top
    except BaseException:
        for s in scored:
            s.sink.finish("FAILED")
        raise
    for rank, s in enumerate(after):
        losses = {"heldout_loss_before": s.heldout_before, "heldout_loss_after": s.heldout_after}
        s.sink.log_metrics({"rank_after": rank, **{k: v for k, v in losses.items() if v is not None}})
    for s in scored:
        s.sink.finish()
    chosen, seconds = after[0], time.perf_counter() - start
    ctx.info(f"prune search: chose {chosen.candidate.label()} ({chosen.candidate.params:,} parameters)")
    details = {
        "budget": dataclasses.asdict(space.budget),
        "enumerated": space.total,
        "scored": len(scored),
        "top_k": len(top),
        "steps": settings.steps if distilling else 0,
        "candidates": [s.row() for s in scored],
        "ranking_before": [s.index for s in before],
        "ranking_after": [s.index for s in after],
        "chosen": chosen.index,
        "chosen_shape": chosen.candidate.shape.as_dict(),
        "seconds": {
            "scoring": round(scoring_seconds, 3),
            "short_distills": round(distill_seconds, 3),
            "total": round(seconds, 3),
        },
    }
    metrics = {
        "search_candidates": float(len(scored)),
        "search_distilled": float(len(top) if distilling else 0),
        "search_seconds": round(seconds, 3),
        "search_distill_seconds": round(distill_seconds, 3),
        "search_chosen_pruned_loss": chosen.pruned_loss,
    }
    if chosen.heldout_after is not None:
        metrics["search_chosen_heldout_loss"] = chosen.heldout_after
    return Outcome(chosen.candidate.shape, space.kept_layers, details, metrics, scratch)


# ----------------------------------------------------------------------------- short distillations
def short_distills(
    spec: PruneSpec,
    model_ref: ModelRef,
    ctx: StageContext,
    model,
    tokenizer,
    config: dict,
    importance: Importance,
    space: budgets.Space,
    top: list[Scored],
) -> list[str]:
    """Distill each of `top` briefly and set its held-out losses; returns the scratch URIs it left."""
    from compressor.models import load_model

    settings, src = spec.search_settings(), shapes.source_shape(config)
    data = data_name(spec, ctx)
    distill_spec = settings.distill_spec(data)
    teacher = ctx.shared_teacher or ctx.teacher or model_ref
    heldout = heldout_blocks(spec, ctx, tokenizer, config, data)
    base = ctx.run_name or f"prune-{digest(model_ref.key, key_fields(spec), ctx.seed)[:12]}"
    # Beside the stage's work dir when there is no storage (a test): never inside it, which becomes the stage output.
    root = (
        storage.join(ctx.storage_path, f"{base}-search")
        if ctx.storage_path
        else str(Path(ctx.work_dir).resolve().parent / f"{Path(ctx.work_dir).name}-search")
    )
    scratch, jobs = [root], []
    for s in top:
        pruned = pruned_copy(model, importance, src, s.candidate, space.kept_layers, spec.depth_metric)
        s.heldout_before = lm_loss(pruned, heldout, spec.batch_size)
        key = digest(model_ref.key, key_fields(spec), s.candidate.shape.as_dict(), ctx.seed)
        candidate = publish_candidate(pruned, tokenizer, root, base, s.index, key, model_ref, s.candidate.params)
        del pruned
        candidate_ctx = short_run_context(ctx, Path("search") / f"candidate-{s.index}", f"{base}-candidate-{s.index}",
                                          teacher, s.sink)  # fmt: skip
        jobs.append((distill_spec, candidate, candidate_ctx))
    prepare_data(distill_spec, ctx.teacher or teacher, ctx)  # once, before the runs sharing the shards start together
    ctx.info(f"prune search: distilling the best {len(top)} shapes for {distill_spec.steps} steps each")

    runs = distill_in_parallel(jobs, ctx.ray_address)
    try:
        for i, result in ctx.progress(runs, total=len(jobs), desc="prune: short distillations"):
            s = top[i]
            distilled = load_model(result["model_dir"]).to(model.device)
            s.heldout_after, s.distill_seconds = lm_loss(distilled, heldout, spec.batch_size), result["seconds"]
            del distilled
            shutil.rmtree(jobs[i][2].work_dir, ignore_errors=True)  # the distilled copy served its purpose
            scratch += result["scratch"]
            ctx.info(
                f"prune search: {s.candidate.label()}: held-out loss {s.heldout_before:.4f} pruned, "
                f"{s.heldout_after:.4f} after {distill_spec.steps} steps ({result['seconds']:.0f} s)"
            )
    finally:  # the stage's work dir is its output: no candidate may stay in it
        runs.close()
        shutil.rmtree(Path(ctx.work_dir) / "search", ignore_errors=True)
    return scratch


def data_name(spec: PruneSpec, ctx: StageContext) -> str:
    """The data source of the short distillations: search.data, else the calibration one."""
    name = spec.search_settings().data or spec.calibration
    if name is None:
        ctx.data_source(None)  # the only one, or a UserError naming the choice
        return next(iter(ctx.data))
    ctx.data_source(name)
    return name


def short_run_context(ctx: StageContext, folder: Path, run_name: str, teacher: ModelRef, sink) -> StageContext:
    """The context of one short distillation of a candidate: its own work dir and Ray Train run, the shared teacher,
    its own MLflow child run, and no console of its own (the stage's progress line speaks for all)."""
    return dataclasses.replace(
        ctx,
        work_dir=Path(ctx.work_dir) / folder,
        teacher=teacher,
        shared_teacher=teacher,
        run_name=run_name,
        sink=sink,
        quiet=True,
        progress_queue=None,
    )


def publish_candidate(pruned, tokenizer, root: str, base: str, index: int, key: str, source: ModelRef, params: int):
    """A candidate published as `<root>/candidate-<index>` (the pipeline storage), so that Ray Train workers on any
    node read it; returns its ModelRef."""
    from compressor.models import save_checkpoint

    uri = storage.join(root, f"candidate-{index}")
    work = storage.scratch_dir(uri, f"candidate-{index}")
    save_checkpoint(pruned, tokenizer, work / "model")
    Manifest(
        stage=f"{base}-candidate-{index}", kind="prune", key=key, model_uri="model", input_key=source.key,
        num_params=params,
    ).write(work)  # fmt: skip
    storage.publish_dir(work, uri)
    return ModelRef(path=storage.join(uri, "model"), key=f"prune-candidate:{key}")


def heldout_blocks(spec: PruneSpec, ctx: StageContext, tokenizer, config: dict, data: str) -> torch.Tensor:
    """`heldout_samples` sequences to pick the winner on: search.heldout; else the held-out split of a zoo: `data`
    source; else the calibration source, which the short distillations never train on, drawn with another seed
    than the calibration pass (a calibration source that is also `data` may overlap what they trained on)."""
    from compressor.text_sources import token_blocks

    settings = spec.search_settings()
    source, seed = ctx.data_source(settings.heldout or data), ctx.seed
    if settings.heldout is None:
        if is_zoo(source.source) and source.split == "train":
            source = source.model_copy(update={"split": "heldout"})
        else:
            source, seed = ctx.data_source(spec.calibration), seed + 1
    seq_len = min(source.seq_len, config.get("max_position_embeddings") or source.seq_len)
    try:
        return token_blocks(source, tokenizer, settings.heldout_samples, seq_len, seed)
    except UserError as exc:
        raise UserError(f"prune.search held-out data: {exc}") from None


def prepare_data(distill_spec, teacher: ModelRef, ctx: StageContext) -> None:
    """Tokenize the distillation source into its token shards once (distill's own path; runs starting together
    would each try to write them), and compute teacher targets once when the distillations read them."""
    from compressor.stages.distill.batches import prepare_task
    from compressor.stages.distill.layout import budget
    from compressor.text_sources import normalized

    source = normalized(ctx.data_source(distill_spec.data))
    planned = budget(distill_spec, source)
    seq_len, sequences = planned.seq_len, planned.sequences
    shard_dir, index = prepare_task(source, teacher, seq_len, sequences, ctx.shards_root)
    if distill_spec.loss.targets is not None:  # the teacher's one pass for every candidate (and the distill stage)
        from compressor.stages.distill.targets_compute import prepare_targets

        prepare_targets(distill_spec, teacher, shard_dir, min(sequences, index.sequences), ctx)


def _distill_task(spec, student: ModelRef, ctx: StageContext) -> dict:
    """One short distillation (a Ray task on the search's node: its output lands where the search reads it)."""
    from compressor.stages.distill.driver import distill

    start = time.perf_counter()
    result = distill(spec, student, ctx)
    return {
        "model_dir": str(ctx.model_dir),
        "seconds": time.perf_counter() - start,
        "metrics": result.metrics,
        "scratch": list(result.details.get("scratch") or []),
    }


def runs_at_once(spec, wanted: int) -> int:
    """How many distillations with `spec`'s workers the cluster holds together (at least 1, at most `wanted`). The
    calling task's CPUs count (Ray lends them out while it waits), its GPUs do not."""
    import ray

    context = ray.get_runtime_context()
    total = ray.cluster_resources()
    own = context.get_assigned_resources() if context.worker.mode == ray.WORKER_MODE else {}  # the driver holds none
    fits = wanted
    for resource, each in (("CPU", spec.cpus_per_worker), ("GPU", spec.gpus_per_worker)):
        need = each * spec.workers
        if not need:
            continue
        have = total.get(resource, 0.0) - (own.get(resource, 0.0) if resource == "GPU" else 0.0)
        if have < need:
            if spec.wait_for_resources_s > 0:  # an autoscaling cluster: the run's own wait asks for the nodes
                return 1
            held = f" besides the {own.get(resource, 0):g} this stage holds" if resource == "GPU" else ""
            raise UserError(
                f"prune.search.distill: a short distillation needs {need:g} {resource} ({spec.workers} "
                f"workers), but the Ray cluster has {have:g}{held}; lower search.distill.workers / "
                "gpus_per_worker or the prune stage's resources, or (autoscaling clusters) set "
                "search.distill.wait_for_resources_s"
            )
        fits = min(fits, int(have // need))
    return max(1, fits)


def distill_in_parallel(jobs: list[tuple], ray_address: Optional[str] = None) -> Iterator[tuple[int, dict]]:
    """Run distill(spec, student, ctx) for each (spec, student, ctx) of `jobs`, as Ray tasks on this node, as many
    at once as the cluster holds; yields (index in jobs, result) as each ends. Closing it cancels what still runs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from compressor.ray_runtime import ensure_ray

    ensure_ray(ray_address)
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=0, max_retries=0)(_distill_task)
    waiting, running = list(range(len(jobs))), {}
    try:
        while waiting or running:
            at_once = runs_at_once(jobs[0][0], len(jobs))  # again each time: an autoscaler may have added nodes
            while waiting and len(running) < at_once:
                i = waiting.pop(0)
                running[task.options(scheduling_strategy=here, name=f"short-distill-{i}").remote(*jobs[i])] = i
            done, _ = ray.wait(list(running), num_returns=1, timeout=CAPACITY_POLL_S)
            for ref in done:
                i = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, CompressorError):  # bad data or cluster: the user's to fix, exit 2
                        raise exc.cause from None
                    raise
                yield i, result
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
