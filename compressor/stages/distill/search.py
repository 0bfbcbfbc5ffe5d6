"""A distill stage's `search:` (search_spec.DistillSearch): short distillations over loss / optimizer settings as Ray
Tune trials, then the stage's run with the best settings.

1. Draw. The settings of every trial come from Ray Tune's search space (tune.grid_search, tune.choice,
   tune.uniform / loguniform) resolved here, seeded, before any trial starts: each trial's nested MLflow run exists
   from the start (an ASHA-stopped trial's process is killed, so the driver closes its run).
2. Prepare once. The token shards (plus the validation sequences after the full run's share) are written, and the
   teacher targets (`loss.targets`) computed for each temperature the trials use, before the trials: no trial
   tokenizes, and with targets no trial runs the teacher.
3. Trials. A Ray Tune trial per setting (tune.Tuner): a zero-CPU driver pinned to this node (Ray's advice: the
   Train driver on a safe node; its outputs land where this stage reads them) that runs the distill stage's own
   code (driver.distill: a Ray Train TorchTrainer with the stage's workers and resources) for `fraction` of the
   steps, then scores the student's LM loss on the validation sequences and reports it. Ray Train's reports reach
   Tune (driver.trainer_for adds TuneReportCallback in a trial), which ASHA reads when `early_stopping` is set.
   As many trials run at once as the cluster holds their workers.
4. Pick. The lowest validation loss wins; the stage trains from its input with those settings (`then: retrain`) or
   from the winner's student for the remaining steps (`then: continue`)."""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from compressor import storage
from compressor.contract.context import MetricsSink, StageContext
from compressor.contract.kind import StageResult
from compressor.errors import CompressorError, StageFailed, UserError
from compressor.manifest import ModelRef
from compressor.stages.distill.layout import budget
from compressor.stages.distill.search_spec import DistillSearch, Range, with_settings
from compressor.stages.distill.spec import DistillSpec


@dataclass
class Trial:
    index: int
    settings: dict[str, Any]  # field as in the YAML -> value
    spec: DistillSpec  # the stage's spec with the settings, the trial's steps and no search
    sink: MetricsSink = field(default_factory=MetricsSink)
    validation_loss: Optional[float] = None
    steps: int = 0  # trained (fewer than spec.steps when ASHA stopped it)
    seconds: Optional[float] = None
    status: str = "FINISHED"  # FINISHED, STOPPED (ASHA), FAILED

    def label(self) -> str:
        return ", ".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}" for name, value in
                         self.settings.items())  # fmt: skip

    def row(self) -> dict:
        return {
            "index": self.index,
            "label": self.label(),
            "settings": self.settings,
            "validation_loss": self.validation_loss,
            "steps": self.steps,
            "seconds": self.seconds,
            "status": self.status,
        }


@dataclass
class SearchJob:
    """What every trial reads (one object in Ray's object store, shared by the trials through tune.with_parameters)."""

    trials: list[Trial]
    student: ModelRef
    ctx: StageContext
    root: str  # the trials' work dirs: beside the stage's, never inside it (the stage's work dir is its output)
    validation: Any  # [n, seq_len] token ids
    run_prefix: str
    search: DistillSearch


def draw_settings(search: DistillSearch, seed: int) -> list[dict[str, Any]]:
    """The trials' settings through Ray Tune's search space: a grid, or `samples` seeded random draws."""
    import numpy as np
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants

    def domain(values):
        if search.samples is None:
            return tune.grid_search(list(values))
        if isinstance(values, Range):
            return (tune.loguniform if values.log else tune.uniform)(values.low, values.high)
        return tune.choice(list(values))

    space = {name: domain(values) for name, values in search.space.items()}
    if search.samples is None:
        return [resolved for _, resolved in generate_variants(space)]
    state = np.random.RandomState(seed)
    return [next(generate_variants(space, random_state=state))[1] for _ in range(search.samples)]


def trial_steps(spec: DistillSpec, source) -> tuple[int, int]:
    """(steps of the full run, steps of one trial)."""
    full = budget(spec, source).steps
    return full, max(1, math.ceil(spec.search.fraction * full))


def trial_spec(spec: DistillSpec, settings: dict, steps: int) -> DistillSpec:
    search = spec.search
    grace = search.early_stopping and (search.early_stopping.grace_steps or max(1, steps // 4))
    base = spec.model_dump(exclude={"search", "steps", "tokens"})
    # Without ASHA, a trial checkpoints only at its end; with it, every grace_steps: each report is a rung check.
    out = DistillSpec.model_validate({**with_settings(base, settings), "steps": steps})
    return out.model_copy(update={"checkpoint_every": grace or steps})


def search_then_distill(spec: DistillSpec, model: ModelRef, ctx: StageContext) -> StageResult:
    from compressor.stages.distill.driver import distill

    best, details, scratch, student, remaining = run_search(spec, model, ctx)
    final = DistillSpec.model_validate(with_settings(spec.model_dump(exclude={"search"}), best.settings))
    if spec.search.then == "continue":
        final = final.model_copy(update={"steps": remaining, "tokens": None, "warmup_steps": None})
        model = student
    ctx.info(f"distill search: training with {best.label()} ({spec.search.then})")
    result = distill(final, model, ctx)
    ctx.save_json_artifact("search.json", details)
    result.details["search"] = details
    result.details["scratch"] = list(result.details.get("scratch") or []) + scratch
    result.metrics.update(
        search_trials=float(len(details["trials"])),
        search_seconds=details["seconds"],
        search_best_validation_loss=best.validation_loss,
    )
    return result


def run_search(spec: DistillSpec, model: ModelRef, ctx: StageContext):
    """Runs the trials; returns (best trial, the manifest's `search`, scratch URIs, the best student, the steps a
    continuation still has to train)."""
    from compressor.ray_runtime import ensure_ray
    from compressor.stages.distill.driver import teacher_ref, train_storage_root
    from compressor.text_sources import normalized

    search, start = spec.search, time.perf_counter()
    teacher = teacher_ref(spec, ctx, model)
    source = normalized(ctx.data_source(spec.data))
    seq_len = budget(spec, source).seq_len
    full, steps = trial_steps(spec, source)
    settings = draw_settings(search, ctx.seed)
    trials = [Trial(i, flat(s), trial_spec(spec, flat(s), steps)) for i, s in enumerate(settings)]
    ensure_ray(ctx.ray_address)
    validation = prepare(spec, trials, teacher, source, seq_len, full, ctx)
    for t in trials:
        t.sink = ctx.child_sink(f"trial {t.index}: {t.label()}", {"index": t.index, **t.settings, "steps": steps})
    run_prefix = ctx.run_name or "distill"
    root = str(Path(ctx.work_dir).resolve().parent / f"{Path(ctx.work_dir).name}-search")
    job = SearchJob(trials, model, ctx, root, validation, run_prefix, search)
    ctx.info(
        f"distill search: {len(trials)} trials of {steps} steps ({search.fraction:g} of {full}), scored on "
        f"{len(validation)} validation sequences"
    )
    try:
        tune_trials(job, steps, ctx)
    except BaseException:
        for t in trials:
            if t.status != "FINISHED" or t.validation_loss is None:
                t.sink.finish("FAILED")
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)
    scored = sorted((t for t in trials if t.validation_loss is not None), key=lambda t: t.validation_loss)
    if not scored:
        raise StageFailed(f"distill search: none of the {len(trials)} trials finished; see the trials' logs")
    best = scored[0]
    ctx.info(f"distill search: best {best.label()} (validation loss {best.validation_loss:.4f})")
    # The trials' Ray Train runs and the Tune experiment: dropped once the stage is published (runner.drop_scratch).
    scratch = [run_storage(ctx, t) for t in trials] + [storage.join(train_storage_root(ctx), f"{run_prefix}-search")]
    details = {
        "space": {k: v.model_dump() if isinstance(v, Range) else v for k, v in search.space.items()},
        "mode": "grid" if search.samples is None else "random",
        "trial_steps": steps,
        "full_steps": full,
        "validation": search.validation or f"{spec.data} (the {len(validation)} sequences after the full run's)",
        "trials": [t.row() for t in trials],
        "ranking": [t.index for t in scored],
        "best": best.index,
        "best_settings": best.settings,
        "then": search.then,
        "seconds": round(time.perf_counter() - start, 3),
    }
    student = ModelRef(path=storage.join(run_storage(ctx, best), f"checkpoint_step{steps:08d}", "model"),
                       key=f"distill-trial:{best.spec.model_dump_json()}:{model.key}")  # fmt: skip
    return best, details, scratch, student, max(1, full - steps)


def flat(resolved: dict, prefix: str = "") -> dict[str, Any]:
    """{"loss": {"temperature": 2}} -> {"loss.temperature": 2}; numpy scalars to Python ones."""
    out = {}
    for key, value in resolved.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value.item() if hasattr(value, "item") else value
    return out


def run_storage(ctx: StageContext, trial: Trial) -> str:
    from compressor.stages.distill.driver import train_storage_root

    return storage.join(train_storage_root(ctx), f"{ctx.run_name or 'distill'}-trial-{trial.index}")


def prepare(spec: DistillSpec, trials: list[Trial], teacher: ModelRef, source, seq_len: int, full: int, ctx):
    """Token shards for the full run plus the validation sequences, teacher targets per temperature; returns the
    validation token ids."""
    import numpy as np
    import torch

    from compressor.shards import ShardReader
    from compressor.stages.distill.batches import prepare_in_ray

    search, needed = spec.search, full * spec.global_batch
    extra = 0 if search.validation else search.validation_samples
    show = lambda items, total: ctx.progress(items, total, desc="tokenize")  # noqa: E731
    shards, index = prepare_in_ray(source, teacher, seq_len, needed + extra, ctx.shards_root, show)
    if spec.loss.targets is not None:
        from compressor.stages.distill.targets_compute import prepare_targets

        temperatures = {t.spec.loss.temperature: t.spec for t in trials}
        for each in temperatures.values():  # the teacher's passes, here: the trials only read them
            prepare_targets(each, teacher, shards, min(needed, index.sequences), ctx)
    if search.validation:
        from compressor.models import load_tokenizer, tokenizer_dir
        from compressor.text_sources import token_blocks

        try:
            return token_blocks(
                ctx.data_source(search.validation),
                load_tokenizer(tokenizer_dir(teacher)),
                search.validation_samples,
                seq_len,
                ctx.seed,
            )
        except UserError as exc:
            raise UserError(f"distill.search.validation: {exc}") from None
    if index.sequences < needed + extra:
        raise UserError(
            f"distill.search: data source {source.source!r} holds {index.sequences:,} sequences of {seq_len} tokens; "
            f"the full run trains on {needed:,} and the default validation split is the {extra} after them. Set "
            "search.validation to a data source kept apart from training and evaluation, or lower the budget"
        )
    ids = np.arange(needed, needed + extra)
    return torch.from_numpy(ShardReader(shards).read(ids).astype(np.int64))


def concurrent_trials(spec: DistillSpec, wanted: int) -> int:
    """How many trials' Train runs the cluster holds at once (at least 1): more would only wait for workers."""
    import ray

    total, fits = ray.cluster_resources(), wanted
    for resource, each in (("CPU", spec.cpus_per_worker), ("GPU", spec.gpus_per_worker)):
        if each:
            fits = min(fits, int(total.get(resource, 0.0) // (each * spec.workers)))
    return max(1, fits)


def tune_trials(job: SearchJob, steps: int, ctx: StageContext) -> None:
    """The trials as a Ray Tune experiment; fills each Trial's score, steps, seconds and status."""
    import ray
    from ray import tune

    from compressor.stages.distill.driver import train_storage_root
    from compressor.storage import train_storage

    first = job.trials[0].spec
    # The trial is only the Train run's driver: no CPU of its own, on this node (its student lands here).
    here = {"CPU": 0.0, f"node:{ray.util.get_node_ip_address()}": 0.001}
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), tune.PlacementGroupFactory([here]))
    scheduler = None
    stopping = job.search.early_stopping
    if stopping is not None:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="step",
            metric="ce_loss",
            mode="min",
            max_t=steps,
            grace_period=first.checkpoint_every,
            reduction_factor=stopping.reduction_factor,
        )
    storage_path, filesystem = train_storage(train_storage_root(ctx))
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([{"index": t.index, **t.settings} for t in job.trials])},
        tune_config=tune.TuneConfig(
            scheduler=scheduler, max_concurrent_trials=concurrent_trials(first, len(job.trials))
        ),
        run_config=tune.RunConfig(
            name=f"{job.run_prefix}-search",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            verbose=0,
        ),
    )
    results = tuner.fit()
    for result in results:
        trial = job.trials[result.config["trial"]["index"]]
        metrics = result.metrics or {}
        trial.steps = int(metrics.get("step") or 0)
        trial.validation_loss = metrics.get("validation_loss")
        trial.seconds = metrics.get("trial_seconds")
        if result.error is not None:
            cause = getattr(result.error, "cause", result.error)
            if isinstance(cause, CompressorError):  # bad data or cluster: the user's to fix, exit 2
                raise cause
            trial.status = "FAILED"
            ctx.info(f"distill search: trial {trial.index} ({trial.label()}) failed: {result.error}")
            trial.sink.finish("FAILED")
        elif trial.validation_loss is None:  # ASHA stopped it: its process was killed before it closed its run
            trial.status = "STOPPED"
            trial.sink.log_metrics({"stopped_at_step": float(trial.steps)})
            trial.sink.finish("KILLED")


def run_trial(config: dict, job: SearchJob) -> None:
    """One Tune trial: the distill stage's run for the trial's steps, then its validation score."""
    from ray import tune

    from compressor.models import load_model
    from compressor.models.loss import lm_loss
    from compressor.stages.distill.driver import distill

    trial = job.trials[config["trial"]["index"]]
    ctx = dataclasses.replace(
        job.ctx,
        work_dir=Path(job.root) / f"trial-{trial.index}",
        run_name=f"{job.run_prefix}-trial-{trial.index}",
        sink=trial.sink,
        quiet=True,
        progress_queue=None,
    )
    start = time.perf_counter()
    try:
        result = distill(trial.spec, job.student, ctx)
        import torch

        with torch.no_grad():
            score = lm_loss(load_model(str(ctx.model_dir)).eval(), job.validation)
    except BaseException:
        trial.sink.finish("FAILED")
        raise
    metrics = {"validation_loss": score, "trial_seconds": time.perf_counter() - start}
    trial.sink.log_metrics(metrics)
    trial.sink.finish()
    shutil.rmtree(ctx.work_dir, ignore_errors=True)
    tune.report({**metrics, "step": trial.spec.steps, "ce_loss": result.metrics.get("ce_loss", float("nan"))})
