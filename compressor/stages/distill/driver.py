"""The driver side of the distill stage: checks, tokenization, the Ray Train TorchTrainer, progress, the output."""

from __future__ import annotations

import functools
import os
import threading
import uuid
from pathlib import Path
from typing import Optional

from compressor.cache import digest, key_fields
from compressor.contract.context import StageContext
from compressor.contract.kind import StageResult
from compressor.errors import StageFailed, UserError
from compressor.manifest import ModelRef
from compressor.stages.distill.deepspeed_config import effective_zero_stage
from compressor.stages.distill.layout import Budget, batch_layout, budget, check_pair, check_student
from compressor.stages.distill.spec import DistillSpec
from compressor.stages.distill.train import EXPORT_DIR, DistillJob, train_func


def model_config(model: ModelRef) -> dict:
    """config.json of a model wherever it lives (a directory, a storage URI), without downloading its weights."""
    from compressor.models import read_config

    return read_config(model, fetch=True)


def teacher_ref(spec: DistillSpec, ctx: StageContext, student: ModelRef) -> ModelRef:
    """The teacher as a reference: each worker materializes it on its own node (never through the driver's disk).
    A black-box teacher has no weights: the student stands in where a tokenizer is read, and no worker loads it."""
    if spec.black_box:
        return student
    if spec.teacher:
        return ModelRef(path=spec.teacher, key=f"path:{spec.teacher}")
    if ctx.teacher is None:
        raise UserError("distill: no teacher; set `teacher:` in the distill stage or the pipeline (CLI: --teacher)")
    return ctx.teacher


def distill(
    spec: DistillSpec,
    model: ModelRef,
    ctx: StageContext,
    tokenizer_of: Optional[ModelRef] = None,
    planned: Optional[Budget] = None,
) -> StageResult:
    """`tokenizer_of`: the model whose tokenizer renders and tokenizes the data and goes with the exported student
    (default: the teacher's, for a black box the student's); the hard-label control uses its distillation's.
    `planned`: the stage's budget as its plan derived it (ctx.planned); None for a spec no plan saw (a search's
    best settings, the control, prune's short distillations), whose budget is derived here from the spec itself."""
    import ray

    from compressor.models import load_tokenizer
    from compressor.models import tokenizer_dir as tokenizer_files
    from compressor.ray_runtime import ensure_ray
    from compressor.shards import read_index, shard_dir, tokenizer_digest
    from compressor.stages.distill.batches import TRACE_ENV, check_fit, prepare_in_ray, run_data
    from compressor.text_sources import first_sequence_check, normalized

    # Everything that can be wrong with the inputs is found here, before a worker starts.
    ctx.run_name = ctx.run_name or f"distill-{uuid.uuid4().hex[:12]}"  # names the Ray Train run (resume finds it)
    teacher = teacher_ref(spec, ctx, model)
    student_config, teacher_config = model_config(model), model_config(teacher)
    check_student(spec, student_config)
    if not spec.black_box:
        check_pair(spec, student_config, teacher_config, teacher.path)
        check_vocabulary(model, teacher, student_config["vocab_size"], teacher_config["vocab_size"])
    given = ctx.data_source(spec.data)
    source = normalized(given)  # an hf: source pinned to one commit for the whole run (its shards' key holds it)
    if source.revision is not None:
        ctx.log_params({"data_revision": source.revision})
        if given.revision != source.revision:
            ctx.info(
                f"distill: {source.source} {'@ ' + given.revision if given.revision else 'unpinned'}: reading commit "
                f"{source.revision} (set `revision: {source.revision}` on the data source to pin it)"
            )
    layout = batch_layout(spec)
    planned = planned or budget(spec, source)
    seq_len, steps = planned.seq_len, planned.steps
    # The data: token shards under ctx.shards_root, keyed by source, tokenizer and seq_len (compressor.shards).
    needed = steps * spec.global_batch
    speaks = tokenizer_of or teacher
    tokenizer_dir = tokenizer_files(speaks)  # not the weights: only the tokenizer keys and writes the shards
    chat = None  # chat rows: tokens, loss mask and positions, packed whole (compressor.chat_data), small data
    if spec.chat is not None:
        from compressor.chat_data import for_distill

        shards, index, chat = for_distill(
            source.source, tokenizer_dir, seq_len, spec.chat.template, spec.chat.truncate, ctx.shards_root,
            soft=spec.black_box,
        )  # fmt: skip
    else:
        shards = shard_dir(ctx.shards_root, source, tokenizer_digest(tokenizer_dir), seq_len)
        index = read_index(shards)
    ready = chat is not None or (index is not None and (index.exhausted or index.sequences >= needed))
    # A source its first shard shows too small for the budget is refused then, not after tokenizing all of it.
    check = functools.partial(
        check_fit,
        steps=steps,
        global_batch=spec.global_batch,
        seq_len=seq_len,
        max_epochs=spec.max_epochs,
        source=source.source,
    )
    if ready:
        run_data(shards, index, steps, spec.global_batch, spec.max_epochs, source.source)
    elif index is None:  # a missing, empty or too short source is refused before Ray starts
        first_sequence_check(source, load_tokenizer(tokenizer_dir), seq_len)
    elif index.estimated_tokens:
        check(index.estimated_tokens)
    ensure_ray(ctx.ray_address)
    from compressor.stages.distill.cluster import wait_for_workers

    if not spec.wait_for_resources_s:
        wait_for_workers(spec, ctx)  # a cluster that cannot place the workers is refused before any tokenizing
    if not ready:
        ctx.info(f"distill: tokenizing {source.source} into token shards at {shards}")
        shards, index = prepare_in_ray(
            source,
            teacher,
            seq_len,
            needed,
            ctx.shards_root,
            lambda items, total: ctx.progress(items, total, desc="tokenize"),
            check,
        )
    if spec.wait_for_resources_s:
        # Ask the autoscaler for the GPU nodes only now: they would sit idle (and billed) while the data is tokenized.
        wait_for_workers(spec, ctx)
    data = run_data(shards, index, steps, spec.global_batch, spec.max_epochs, source.source)
    ctx.info(
        f"distill: {steps} steps x {spec.global_batch} sequences x {seq_len} tokens on {spec.workers} worker(s), "
        f"{data.sequences:,} distinct sequences of {source.source} ({data.epochs:.2f} epochs)"
    )

    targets = None
    if chat is not None and chat.get("soft_labels"):  # an API teacher's top log-probs, beside the chat shards
        from compressor.soft_labels import targets_of

        targets = targets_of(shards)
        ctx.info(f"distill: soft labels from the teacher's top_logprobs: {soft_line(chat['soft_labels'])}")
    if spec.loss.targets is not None:  # the teacher's one pass over the data; then training runs without it
        from compressor.stages.distill.targets_compute import prepare_targets

        targets = prepare_targets(spec, teacher, shards, data.sequences, ctx)

    from ray.util.queue import Queue

    from compressor import interrupt

    progress = Queue(actor_options={"num_cpus": 0})
    stop_flag = ray.remote(num_cpus=0)(interrupt.StopFlag).remote()  # Ctrl-C / SIGTERM: workers stop after a step
    job = DistillJob(
        spec=spec,
        student_path=model.path,
        teacher_path=teacher.path,
        tokenizer_path=speaks.path,
        data=data.directory,
        sequences=data.sequences,
        seq_len=seq_len,
        steps=steps,
        micro_batch=layout.micro_batch,
        grad_accum=layout.grad_accum,
        seed=ctx.seed,
        # The shard directory's name is the data's content key (source files, tokenizer, seq_len).
        fingerprint=fingerprint(spec, model, teacher, shards.rstrip("/").rsplit("/", 1)[-1], seq_len, ctx.seed),
        sink=ctx.sink,
        progress=progress,
        trace_dir=os.environ.get(TRACE_ENV),
        stop=stop_flag,
        targets=targets,
    )
    try:
        with interrupt.graceful_stop("distill") as request:
            told: list = []  # the signal handler only sets `request`; this thread tells the workers, once
            tell = lambda: request.is_set() and not told and told.append(stop_flag.set.remote())  # noqa: E731
            result = fit(trainer_for(spec, job, ctx), progress, steps, ctx, on_tick=tell)
    finally:
        ray.kill(progress.actor)
        ray.kill(stop_flag)
    if request.is_set():
        step = int((result.metrics or {}).get("step", 0))
        raise interrupt.stopped(
            request, f"after step {step} of {steps}, with a checkpoint of that step in {run_storage_uri(ctx)}"
        )
    # Only the exported student travels to this node, not the DeepSpeed shards (3x the model with optimizer state).
    # Those stay in storage until the pipeline has published the model (manifest `scratch`, see runner.drop_scratch):
    # a failed gate or evaluation after days of training must never cost the training.
    import pyarrow.fs

    pyarrow.fs.copy_files(
        f"{result.checkpoint.path}/{EXPORT_DIR}", str(ctx.model_dir), source_filesystem=result.checkpoint.filesystem
    )
    final = result.metrics or {}
    metrics = {k: float(v) for k, v in final.items() if isinstance(v, (int, float)) and k != "step"}
    metrics.update(distinct_tokens=float(data.distinct_tokens), epochs=data.epochs)
    metrics.update({f"chat_{name}": float(v) for name, v in (chat or {}).items() if isinstance(v, (int, float))})
    soft = (chat or {}).get("soft_labels") or {}
    metrics.update({f"soft_{name}": float(v) for name, v in soft.items() if isinstance(v, (int, float))})
    ctx.log_metrics(
        {
            "tokens": float(planned.tokens),
            "distinct_tokens": float(data.distinct_tokens),
            "epochs": data.epochs,
        }
    )  # per-step metrics came from rank 0; these describe the whole run
    details = {
        "steps": steps,
        "tokens": planned.tokens,
        "seq_len": seq_len,
        "distinct_tokens": data.distinct_tokens,
        "epochs": data.epochs,
        "data": data.directory,
        "data_revision": source.revision,  # hf: the commit read (None for local and zoo data)
        "chat": chat,  # examples, kept, truncated, dropped, sequences, answer tokens (None: plain text)
        "workers": spec.workers,
        "worker_nodes": final.get("worker_nodes"),
        "zero_stage": effective_zero_stage(spec.deepspeed.zero_stage, spec.workers),
        "micro_batch": layout.micro_batch,
        "grad_accum": layout.grad_accum,
        "teacher": spec.teacher if spec.black_box else teacher.path,
        "scratch": [run_storage_uri(ctx)],
    }
    return StageResult(metrics=metrics, details=details)


def soft_line(counts: dict) -> str:
    rate, mass = counts.get("mapping_rate"), counts.get("mapped_mass_rate")
    return (
        f"{counts['aligned_tokens']:,} of {counts['answer_tokens']:,} answer tokens aligned; "
        f"{counts['mapped_alternatives']:,} of {counts['alternatives']:,} alternatives mapped to the student's "
        f"vocabulary ({'-' if rate is None else f'{rate:.1%}'}, {'-' if mass is None else f'{mass:.1%}'} of their mass)"
    )


def check_vocabulary(student: ModelRef, teacher: ModelRef, student_vocab: int, teacher_vocab: int) -> None:
    """A teacher with more vocabulary rows than the student is distilled through its first `student_vocab` logits
    (loss._chunk_sums) only when the two share a tokenizer that never produces the extra ids: the rows are padding
    (vocabularies rounded up to a multiple of 64 or 128). Anything else is a real mismatch, refused naming both sizes."""
    if student_vocab == teacher_vocab:
        return
    from compressor.models import load_tokenizer, tokenizer_dir
    from compressor.shards import tokenizer_digest

    def refuse(why: str) -> UserError:
        return UserError(
            f"distill: the teacher's vocab_size ({teacher_vocab}, {teacher.path}) is larger than the student's "
            f"({student_vocab}), and {why}; KD compares the two models' distributions over the same tokens"
        )

    student_dir, teacher_dir = tokenizer_dir(student), tokenizer_dir(teacher)
    teacher_tokenizer = load_tokenizer(teacher_dir)
    if tokenizer_digest(student_dir) != tokenizer_digest(teacher_dir):
        if load_tokenizer(student_dir).get_vocab() != teacher_tokenizer.get_vocab():
            raise refuse("their tokenizers differ (other tokens or ids), so the extra rows are not mere padding")
    if len(teacher_tokenizer) > student_vocab:
        raise refuse(
            f"their tokenizer has {len(teacher_tokenizer)} tokens, so it produces ids the student has no row for"
        )


def fingerprint(spec: DistillSpec, student: ModelRef, teacher: ModelRef, source, seq_len: int, seed: int) -> str:
    """What a checkpoint must match to be resumed: operational fields (DistillSpec.NOT_IN_KEY) may change."""
    return digest(key_fields(spec), student.key, teacher.key, source, seq_len, seed)


def run_storage_uri(ctx: StageContext) -> str:
    """The Ray Train run's directory (its checkpoints), as a path or storage URI."""
    from compressor import storage

    return storage.join(train_storage_root(ctx), ctx.run_name)


def train_storage_root(ctx: StageContext) -> str:
    from compressor import storage

    root = ctx.storage_path or str(Path(ctx.work_dir) / "ray")
    return root if storage.is_remote(root) else str(Path(root).expanduser().resolve())


def trainer_for(spec: DistillSpec, job: DistillJob, ctx: StageContext):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = spec.gpus_per_worker > 0
    resources = {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if use_gpu else {})}
    from compressor.storage import train_storage

    storage_path, storage_filesystem = train_storage(train_storage_root(ctx))
    return TorchTrainer(
        train_func,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=spec.workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=spec.placement_strategy,
        ),
        run_config=RunConfig(
            # A stable name: a re-run of the same stage finds this run's checkpoints and resumes from them.
            name=ctx.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=tune_report(),
        ),
    )


def tune_report() -> list:
    """In a Ray Tune trial (a distill search, compressor/stages/distill/search.py), the run's reports also go to Tune,
    whose ASHA scheduler reads them; anywhere else, nothing."""
    from ray.tune.integration.ray_train import TuneReportCallback

    try:
        return [TuneReportCallback()]
    except RuntimeError:  # "must be used in a Tune session"
        return []


def fit(trainer, progress, steps: int, ctx: StageContext, on_tick=lambda: None):
    """trainer.fit() in a thread while this thread shows rank 0's per-step progress (and calls `on_tick` each second)."""
    from ray.util.queue import Empty

    outcome: dict = {}

    def target():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="distill-fit", daemon=True)
    thread.start()

    def steps_seen():
        done = 0
        while thread.is_alive() or not progress.empty():
            on_tick()
            try:
                step, metrics = progress.get(timeout=1.0)
            except Empty:
                continue
            except Exception:  # noqa: BLE001  (the queue actor is gone: training goes on, the progress line stops)
                thread.join()
                return
            if step <= done:  # replayed after a restart from a checkpoint
                continue
            if step % max(1, -(-steps // 4)) == 0 or step == steps:  # a loss line each quarter; the bar does the rest
                ctx.info(
                    f"distill step {step}/{steps}: loss {metrics['loss']:.4f} (kd {metrics['kd_loss']:.4f}, "
                    f"ce {metrics['ce_loss']:.4f}), {metrics['tokens_per_s']:.0f} tokens/s"
                )
            yield from range(step - done)
            done = step

    for _ in ctx.progress(steps_seen(), total=steps, desc="distill"):
        pass
    thread.join()
    if "error" in outcome:
        error = outcome["error"]
        failures = list((getattr(error, "worker_failures", None) or {}).values())
        for exc in [error, *failures, *(getattr(f, "cause", None) for f in failures)]:
            if isinstance(exc, UserError):  # e.g. a checkpoint of another run: the user's to fix, not a crash
                raise exc
        raise StageFailed(f"distillation failed: {error}") from error
    return outcome["result"]
