"""The driver side of the distill stage: checks, tokenization, the Ray Train TorchTrainer, progress, the output."""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from pathlib import Path

from compressor.cache import digest
from compressor.config.stages import DistillSpec
from compressor.errors import StageFailed, UserError
from compressor.manifest import ModelRef
from compressor.stages.base import StageResult
from compressor.stages.context import StageContext
from compressor.stages.distill.deepspeed_config import effective_zero_stage
from compressor.stages.distill.layout import batch_layout, budget_steps, check_cluster, check_pair, check_student
from compressor.stages.distill.train import EXPORT_DIR, DistillJob, train_func


def model_config(path: str) -> dict:
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        return json.loads((local / "config.json").read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path).to_dict()
    except Exception as exc:  # not a checkpoint directory, hub unreachable, unknown id
        raise UserError(f"distill: cannot read the config of model {path!r} ({exc})") from None


def teacher_ref(spec: DistillSpec, ctx: StageContext) -> ModelRef:
    from compressor.runner import materialize

    if spec.teacher:
        return materialize(ModelRef(path=spec.teacher, key=f"path:{spec.teacher}"))
    if ctx.teacher is None:
        raise UserError("distill: no teacher; set `teacher:` in the distill stage or the pipeline (CLI: --teacher)")
    return materialize(ctx.teacher)


def distill(spec: DistillSpec, model: ModelRef, ctx: StageContext) -> StageResult:
    import ray

    from compressor.modeling import load_tokenizer
    from compressor.raylocal import ensure_ray
    from compressor.stages.distill.data import pack_blocks

    # Everything that can be wrong with the inputs is found here, before a worker starts.
    teacher = teacher_ref(spec, ctx)
    student_config = model_config(model.path)
    check_student(spec, student_config)
    check_pair(spec, student_config, model_config(teacher.path), teacher.path)
    source = ctx.data_source(spec.data)
    seq_len = spec.seq_len or source.seq_len
    layout = batch_layout(spec)
    steps = budget_steps(spec, seq_len)
    blocks = pack_blocks(source, load_tokenizer(teacher.path), seq_len, steps * spec.global_batch, ctx.seed)
    ensure_ray(ctx.ray_address)
    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    warning = check_cluster(spec, ray.cluster_resources(), alive)
    if warning:
        ctx.info(f"warning: {warning}")
    ctx.info(f"distill: {steps} steps x {spec.global_batch} sequences x {seq_len} tokens on {spec.workers} worker(s), "
             f"{len(blocks)} distinct sequences of {source.source}")

    from ray.util.queue import Queue

    progress = Queue(actor_options={"num_cpus": 0})
    job = DistillJob(
        spec=spec, student_path=model.path, teacher_path=teacher.path, blocks=ray.put(blocks), steps=steps,
        micro_batch=layout.micro_batch, grad_accum=layout.grad_accum, seed=ctx.seed,
        fingerprint=fingerprint(spec, model, teacher, source, seq_len, ctx.seed), sink=ctx.sink, progress=progress,
    )
    try:
        result = fit(trainer_for(spec, job, ctx), progress, steps, ctx)
    finally:
        ray.kill(progress.actor)
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(Path(directory) / EXPORT_DIR, ctx.model_dir, dirs_exist_ok=True)
    # The stage output is published now; the DeepSpeed checkpoints (3x the model with optimizer state) are not needed.
    result.filesystem.delete_dir(result.path)
    final = result.metrics or {}
    metrics = {k: float(v) for k, v in final.items() if isinstance(v, (int, float)) and k != "step"}
    details = {"steps": steps, "tokens": steps * spec.global_batch * seq_len, "seq_len": seq_len,
               "workers": spec.workers, "worker_nodes": final.get("worker_nodes"),
               "zero_stage": effective_zero_stage(spec.deepspeed.zero_stage, spec.workers),
               "micro_batch": layout.micro_batch, "grad_accum": layout.grad_accum, "teacher": teacher.path}
    return StageResult(metrics=metrics, details=details)


# Settings that change how a run is operated, not what it computes: a re-run may change them and still resume.
OPERATIONAL = {"max_failures", "checkpoint_every", "wait_for_resources", "placement_strategy", "cpus_per_worker"}


def fingerprint(spec: DistillSpec, student: ModelRef, teacher: ModelRef, source, seq_len: int, seed: int) -> str:
    return digest(spec.model_dump(mode="json", exclude=OPERATIONAL), student.key, teacher.key, source, seq_len, seed)


def trainer_for(spec: DistillSpec, job: DistillJob, ctx: StageContext):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = spec.gpus_per_worker > 0
    resources = {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if use_gpu else {})}
    storage = ctx.storage_path or str(Path(ctx.work_dir) / "ray")
    if "://" not in storage:  # Ray Train wants an absolute local path (or a URI)
        storage = str(Path(storage).expanduser().resolve())
    return TorchTrainer(
        train_func,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=spec.placement_strategy),
        run_config=RunConfig(
            # A stable name: a re-run of the same stage finds this run's checkpoints and resumes from them.
            name=ctx.run_name or f"distill-{uuid.uuid4().hex[:12]}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def fit(trainer, progress, steps: int, ctx: StageContext):
    """trainer.fit() in a thread while this thread shows rank 0's per-step progress."""
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
            try:
                step, metrics = progress.get(timeout=1.0)
            except Empty:
                continue
            except Exception:  # noqa: BLE001  (the queue actor is gone: training goes on, the progress line stops)
                thread.join()
                return
            if step <= done:  # replayed after a restart from a checkpoint
                continue
            if step % max(1, steps // 10) == 0 or step == steps:
                ctx.info(f"distill step {step}/{steps}: loss {metrics['loss']:.4f} (kd {metrics['kd_loss']:.4f}, "
                         f"ce {metrics['ce_loss']:.4f}), {metrics['tokens_per_s']:.0f} tokens/s")
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
