"""Student selection (`candidates` + `bar`): the smallest student that still meets a quality bar after the same short
distillation, found with the budget search's machinery (compressor/stages/prune/search.py).

1. Held-out set. search.heldout, else the `heldout_samples` sequences of the short distillations' data right after
   the ones they train on (no candidate trained on them, and they are not the gate's held-out text). The teacher's
   loss on them is the baseline of the bar.
2. Students. Each candidate becomes a model: a shape is the source pruned to it (the stage's one importance pass); a
   budget is the shape its budget search scores best by pruned loss; a checkpoint is itself. Each is counted,
   measured on the held-out set, and published to the pipeline storage for Ray Train workers (a checkpoint is read
   where it is).
3. Short distillation. Smallest first, each gets `search.steps` steps from the teacher (distill_in_parallel: the
   distill stage's own code, as many at once as the cluster holds). `evaluate: until_pass` stops once every
   candidate smaller than one that passes has failed; `all` measures all of them.
4. Keep. A candidate passes when exp(held-out loss - teacher's), its perplexity ratio, is at most
   bar.max_perplexity_ratio; the one with the fewest parameters that passes is the output (pruned from the source,
   or the checkpoint copied), which the following distill stage trains fully. None passes: exit 2, every candidate
   listed with its parameters and ratio.

Every candidate is a nested run of the stage's (ctx.child_sink) and a row of the manifest's `selection`."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from compressor import storage
from compressor.cache import digest, key_fields
from compressor.contract.context import MetricsSink, StageContext
from compressor.errors import UserError
from compressor.manifest import ModelRef
from compressor.models.loss import lm_loss
from compressor.models.shapes import Shape
from compressor.stages.prune import budget, candidates, search, shapes
from compressor.stages.prune.importance import Importance
from compressor.stages.prune.spec import PruneSpec


@dataclass
class Student:
    index: int  # position in `candidates`
    label: str
    params: int = 0
    shape: Optional[Shape] = None  # a shape or budget candidate: the source pruned to it
    kept_layers: Optional[list[int]] = None
    checkpoint: Optional[ModelRef] = None  # a `model:` candidate, taken as it is
    shapes_scored: Optional[int] = None  # a budget: how many shapes its pick was scored among
    sink: MetricsSink = field(default_factory=MetricsSink)
    heldout_before: Optional[float] = None
    heldout_after: Optional[float] = None
    distill_seconds: Optional[float] = None
    ratio: Optional[float] = None  # held-out perplexity / the teacher's, after the short distillation
    passed: Optional[bool] = None

    def row(self) -> dict:
        return {
            "index": self.index,
            "label": self.label,
            "params": self.params,
            "shape": self.shape.as_dict() if self.shape else None,
            "model": self.checkpoint.path if self.checkpoint else None,
            "shapes_scored": self.shapes_scored,
            "heldout_loss_before": self.heldout_before,
            "heldout_loss_after": self.heldout_after,
            "heldout_perplexity_after": math.exp(self.heldout_after) if self.heldout_after is not None else None,
            "perplexity_ratio": self.ratio,
            "passed": self.passed,
            "distill_seconds": self.distill_seconds,
        }


@dataclass
class Selection:
    chosen: Student
    details: dict  # the manifest's `selection`
    metrics: dict[str, float]
    scratch: list[str]  # candidate checkpoints and Ray Train runs, dropped once the stage is published


def choose_student(
    spec: PruneSpec,
    model_ref: ModelRef,
    ctx: StageContext,
    model,
    tokenizer,
    config: dict,
    blocks: torch.Tensor,
    importance: Optional[Importance],
) -> Selection:
    settings, bar = spec.search_settings(), spec.bar
    start = time.perf_counter()
    data = search.data_name(spec, ctx)
    distill_spec = settings.distill_spec(data) if settings.steps > 0 else None
    teacher = ctx.shared_teacher or ctx.teacher or model_ref
    heldout = heldout_blocks(spec, ctx, ctx.teacher or teacher, data, distill_spec, config)
    teacher_loss = teacher_heldout_loss(spec, ctx, model_ref, model, heldout)
    base = ctx.run_name or f"prune-{digest(model_ref.key, key_fields(spec), ctx.seed)[:12]}"
    root = (
        storage.join(ctx.storage_path, f"{base}-select")
        if ctx.storage_path
        else str(Path(ctx.work_dir).resolve().parent / f"{Path(ctx.work_dir).name}-select")
    )
    students, jobs, scratch = [], {}, [root]
    for i in range(len(spec.candidates)):
        student, jobs[i] = build_student(
            spec, i, model_ref, ctx, (model, tokenizer, config, blocks, importance), heldout, root, base
        )
        student.sink = ctx.child_sink(
            f"candidate {i}: {student.label}", {"index": i, "label": student.label, "params": student.params}
        )
        students.append(student)
    order = sorted(students, key=lambda s: (s.params, s.index))  # smallest first: until_pass stops soonest
    try:
        if distill_spec is not None:
            ctx.info(
                f"prune select: distilling {len(order)} candidates for {settings.steps} steps each, smallest first"
            )
            scratch += short_distills(spec, ctx, model, heldout, teacher_loss, distill_spec, teacher, base, order, jobs)
        else:
            for s in order:
                s.heldout_after = s.heldout_before
        for s in order:
            if s.heldout_after is not None:
                s.ratio = math.exp(s.heldout_after - teacher_loss)
                s.passed = s.ratio <= bar.max_perplexity_ratio
                s.sink.log_metrics(
                    {
                        "params": s.params,
                        "heldout_loss_before": s.heldout_before,
                        "heldout_loss_after": s.heldout_after,
                        "teacher_heldout_loss": teacher_loss,
                        "perplexity_ratio": s.ratio,
                        "passed": float(s.passed),
                    }
                )
    except BaseException:
        for s in students:
            s.sink.finish("FAILED")
        raise
    for s in students:
        s.sink.finish("FINISHED" if s.ratio is not None else "KILLED")  # KILLED: until_pass never needed it
    passing = [s for s in order if s.passed]
    if not passing:
        raise UserError(no_pass_message(order, bar.max_perplexity_ratio, settings.steps))
    chosen, seconds = passing[0], time.perf_counter() - start
    ctx.info(f"prune select: kept {chosen.label} ({chosen.params:,} parameters, perplexity ratio {chosen.ratio:.4f})")
    details = {
        "bar": bar.model_dump(mode="json"),
        "steps": settings.steps,
        "heldout": settings.heldout or f"{data} (the {len(heldout)} sequences after the short distillations' share)",
        "teacher_heldout_loss": teacher_loss,
        "teacher_heldout_perplexity": math.exp(teacher_loss),
        "candidates": [s.row() for s in students],
        "order": [s.index for s in order],
        "chosen": chosen.index,
        "seconds": round(seconds, 3),
    }
    metrics = {
        "select_candidates": float(len(students)),
        "select_evaluated": float(sum(s.ratio is not None for s in students)),
        "select_seconds": round(seconds, 3),
        "select_chosen_perplexity_ratio": chosen.ratio,
        "select_teacher_heldout_loss": teacher_loss,
    }
    return Selection(chosen, details, metrics, scratch)


def no_pass_message(order: list[Student], ratio: float, steps: int) -> str:
    rows = "; ".join(
        f"{s.label}: {s.params:,} parameters, ratio {s.ratio:.4f}" if s.ratio is not None else f"{s.label}: not run"
        for s in order
    )
    return (
        f"prune.bar: no candidate reaches held-out perplexity <= {ratio:g} x the teacher's after {steps} steps of "
        f"distillation ({rows}); raise bar.max_perplexity_ratio or search.steps, or add a larger candidate"
    )


# ----------------------------------------------------------------------------- the students
def build_student(spec, index, model_ref, ctx, source, heldout, root: str, base: str):
    """(Student with its size and held-out loss before distillation, the ModelRef its short distillation starts
    from). `source`: (model, tokenizer, config, calibration blocks, importance). One candidate in memory at a time."""
    from compressor.models import count_params, load_model

    model, tokenizer, config, blocks, importance = source
    candidate = spec.candidates[index]
    student = Student(index, candidate.label())
    if candidate.model is not None:
        student.checkpoint = checkpoint_ref(spec, index, model_ref)
        from compressor.models import materialize

        loaded = load_model(materialize(student.checkpoint).path).to(model.device).eval()
        student.params, student.heldout_before = count_params(loaded), lm_loss(loaded, heldout, spec.batch_size)
        del loaded
        return student, student.checkpoint

    own = candidates.candidate_spec(spec, index)
    src = shapes.source_shape(config)
    if own.searching:
        student.shape, student.kept_layers, student.shapes_scored = best_budget_shape(
            own, ctx, model, config, blocks, importance
        )
    else:
        student.shape = shapes.target_shape(own, config)
        student.kept_layers = shapes.kept_layers_rule(own, src.num_layers)
    pruned = search.pruned_copy(
        model, importance, src, budget.Candidate(student.shape, 0, 0, {}), student.kept_layers, spec.depth_metric
    )
    student.params, student.heldout_before = count_params(pruned), lm_loss(pruned, heldout, spec.batch_size)
    # Published for Ray Train workers on any node, as the budget search publishes its candidates.
    key = digest(model_ref.key, key_fields(spec), student.shape.as_dict(), student.kept_layers, ctx.seed)
    published = search.publish_candidate(pruned, tokenizer, root, base, index, key, model_ref, student.params)
    del pruned
    return student, published


def checkpoint_ref(spec: PruneSpec, index: int, model_ref: ModelRef) -> ModelRef:
    """A `model:` candidate, refused (exit 2) unless it speaks the source's tokenizer: the bar compares perplexities
    on the same token ids."""
    from compressor.models import materialize, tokenizer_dir
    from compressor.shards import tokenizer_digest

    ref = candidates.model_ref(spec, index)
    if tokenizer_digest(tokenizer_dir(materialize(ref))) != tokenizer_digest(tokenizer_dir(materialize(model_ref))):
        raise UserError(
            f"{candidates.where(index)}.model: {ref.path} has another tokenizer than the source; perplexities on "
            "different tokens are not comparable, so a candidate must use the source's tokenizer"
        )
    return ref


def best_budget_shape(own: PruneSpec, ctx, model, config, blocks, importance):
    """A budget candidate's shape: of the aligned shapes it allows, the one whose pruned loss on the first
    score_samples calibration sequences is lowest (the budget search's score, without its short distillations)."""
    space = budget.cached_space(own, config)
    src, score_blocks = shapes.source_shape(config), blocks[: own.search_settings().score_samples]
    if len(space.candidates) == 1:
        return space.candidates[0].shape, space.kept_layers, 1
    losses = []
    for c in ctx.progress(space.candidates, total=len(space.candidates), desc="prune: score budget shapes"):
        pruned = search.pruned_copy(model, importance, src, c, space.kept_layers, own.depth_metric)
        losses.append(lm_loss(pruned, score_blocks, own.batch_size))
        del pruned
    best = space.candidates[min(range(len(losses)), key=losses.__getitem__)]
    return best.shape, space.kept_layers, len(space.candidates)


# ----------------------------------------------------------------------------- held-out set and distillations
def heldout_blocks(spec, ctx, teacher: ModelRef, data: str, distill_spec, config: dict) -> torch.Tensor:
    """search.heldout's sequences, else those of `data` right after the short distillations' share (tokenized with
    it, into the same shards, so the distillations find their data ready)."""
    import numpy as np

    from compressor.shards import ShardReader
    from compressor.stages.distill.batches import prepare_task
    from compressor.stages.distill.layout import budget
    from compressor.text_sources import normalized, token_blocks

    settings = spec.search_settings()
    source = normalized(ctx.data_source(data))
    planned = budget(distill_spec, source) if distill_spec else None
    seq_len = planned.seq_len if planned else (settings.distill.get("seq_len") or source.seq_len)
    trained = planned.sequences if planned else 0
    extra = 0 if settings.heldout else settings.heldout_samples
    if distill_spec is not None or extra:
        shard_dir, index = prepare_task(source, teacher, seq_len, trained + extra, ctx.shards_root)
        if distill_spec is not None and distill_spec.loss.targets is not None:
            from compressor.stages.distill.targets_compute import prepare_targets

            prepare_targets(distill_spec, teacher, shard_dir, min(trained, index.sequences), ctx)
    if settings.heldout:
        from compressor.models import load_tokenizer
        from compressor.models.local import tokenizer_dir

        held = ctx.data_source(settings.heldout)
        try:
            limit = config.get("max_position_embeddings") or held.seq_len
            tokenizer = load_tokenizer(tokenizer_dir(teacher))
            return token_blocks(held, tokenizer, settings.heldout_samples, min(held.seq_len, limit), ctx.seed)
        except UserError as exc:
            raise UserError(f"prune.search.heldout: {exc}") from None
    if index.sequences < trained + extra:
        raise UserError(
            f"prune.search: data source {source.source!r} holds {index.sequences:,} sequences of {seq_len} tokens; "
            f"the short distillations train on {trained:,} and the selection's held-out set is the {extra} after "
            "them. Set search.heldout to a source kept apart from training and evaluation, or lower search.steps"
        )
    ids = np.arange(trained, trained + extra)
    return torch.from_numpy(ShardReader(shard_dir).read(ids).astype(np.int64))


def teacher_heldout_loss(spec, ctx, model_ref: ModelRef, model, heldout: torch.Tensor) -> float:
    """The bar's baseline: the teacher's loss on the held-out sequences (the source when it is the teacher)."""
    teacher = ctx.teacher or model_ref
    if teacher.key == model_ref.key:
        return lm_loss(model, heldout, spec.batch_size)
    from compressor.models import load_model, materialize

    loaded = load_model(materialize(teacher).path).to(model.device).eval()
    try:
        return lm_loss(loaded, heldout, spec.batch_size)
    finally:
        del loaded


def short_distills(spec, ctx, model, heldout, teacher_loss, distill_spec, teacher, base, order, jobs) -> list[str]:
    """Distill each of `order` (smallest first) and set its held-out loss after; returns the scratch URIs left."""
    from compressor.models import load_model
    from compressor.stages.distill.driver import run_storage_uri

    run_jobs = []
    for s in order:
        candidate_ctx = search.short_run_context(
            ctx, Path("select") / f"candidate-{s.index}", f"{base}-select-{s.index}", teacher, s.sink
        )
        run_jobs.append((distill_spec, jobs[s.index], candidate_ctx))
    # Every run's directory, a run until_pass cancels included (it never returns its own list).
    scratch = [run_storage_uri(job_ctx) for _, _, job_ctx in run_jobs]
    runs = search.distill_in_parallel(run_jobs, ctx.ray_address)
    try:
        for i, result in ctx.progress(runs, total=len(run_jobs), desc="prune: short distillations"):
            s = order[i]
            distilled = load_model(result["model_dir"]).to(model.device)
            s.heldout_after, s.distill_seconds = lm_loss(distilled, heldout, spec.batch_size), result["seconds"]
            del distilled
            shutil.rmtree(run_jobs[i][2].work_dir, ignore_errors=True)  # the distilled copy served its purpose
            scratch += [uri for uri in result["scratch"] if uri not in scratch]
            ctx.info(f"prune select: {s.label}: held-out loss {s.heldout_after:.4f} after {distill_spec.steps} steps")
            if spec.bar.evaluate == "until_pass" and decided(order, teacher_loss, spec.bar.max_perplexity_ratio):
                break  # closing the runs cancels the larger candidates still distilling
    finally:  # the stage's work dir is its output: no candidate may stay in it
        runs.close()
        shutil.rmtree(Path(ctx.work_dir) / "select", ignore_errors=True)
    return scratch


def decided(order: list[Student], teacher_loss: float, ratio: float) -> bool:
    """Whether the smallest passing candidate is known: every one smaller than some passing one has its result."""
    for s in order:
        if s.heldout_after is None:
            return False
        if math.exp(s.heldout_after - teacher_loss) <= ratio:
            return True
    return False
