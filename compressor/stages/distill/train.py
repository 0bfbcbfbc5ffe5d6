"""The Ray Train `train_func`: one per worker. Builds the DeepSpeed engines, resumes from the latest Ray Train
checkpoint, trains, checkpoints every N steps and finally exports the consolidated student as an HF checkpoint.

Checkpoints are DeepSpeed checkpoints: every worker saves its own shards into a local directory and reports it;
Ray Train merges the workers' directories into one checkpoint in the run's storage. The last checkpoint also holds
`model/`, the student in Hugging Face format, which the driver copies out."""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from compressor.contract.context import MetricsSink
from compressor.errors import UserError
from compressor.stages.distill.batches import BatchPlan, WorkerData
from compressor.stages.distill.engines import Engines, build_engines, lr_at, train_step
from compressor.stages.distill.spec import DistillSpec

EXPORT_DIR = "model"


@dataclass
class DistillJob:
    """Everything a worker needs; pickled into the workers by Ray."""

    spec: DistillSpec
    student_path: str  # a directory, a storage URI or zoo:NAME: each worker materializes it on its own node
    teacher_path: str
    data: str  # the token shard directory (path or URI; compressor.shards); each worker reads its own ids from it
    sequences: int  # the run draws from the first `sequences` sequences of the shards (see data.RunData)
    seq_len: int
    steps: int
    micro_batch: int
    grad_accum: int
    seed: int
    fingerprint: str  # identifies the run's inputs, so a stale checkpoint is never resumed into another run
    sink: Optional[MetricsSink] = None  # rank 0 logs per-step metrics here (MLflow in pipelines)
    progress: Any = None  # a ray.util.queue.Queue the driver reads for its progress line
    trace_dir: Optional[str] = None  # COMPRESSOR_DATA_TRACE of the driver: where workers log the ids they read
    stop: Any = None  # the driver's compressor.interrupt.StopFlag actor: rank 0 asks it once per step
    targets: Optional[str] = None  # teacher targets beside the shards (loss.targets): read instead of a teacher
    tokenizer_path: Optional[str] = None  # the tokenizer the exported student gets (default: the teacher's)

    def open_data(self, rank: int, world: int) -> WorkerData:
        plan = BatchPlan(self.sequences, self.spec.global_batch, world, self.micro_batch, self.seed)
        return WorkerData(self.data, self.sequences, plan, rank, self.steps, self.trace_dir, self.targets)


def train_func(config: dict) -> None:
    import ray
    import ray.train
    from transformers.utils import logging as hf_logging

    job: DistillJob = config["job"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(job.spec.cpus_per_worker)))
    torch.manual_seed(job.seed)
    hf_logging.disable_progress_bar()

    job.student_path, job.teacher_path = local_path(job.student_path), local_path(job.teacher_path)
    engines = build_engines(job.spec, job.student_path, job.teacher_path, world, job.micro_batch, job.grad_accum)
    data = job.open_data(rank, world)
    nodes = [None] * world  # where the workers ran, for the manifest
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    step = resume(engines, job)
    metrics = train_steps(engines, job, data, step, rank, world)
    data.close()
    if metrics.get("stopped"):  # on Ctrl-C / SIGTERM: the checkpoint of the last step is reported, no export
        return
    save_and_report(engines, job, job.steps, {**metrics, "worker_nodes": nodes}, rank, export=True)


def mean_over_workers(values: list[float], device: torch.device, world: int) -> list[float]:
    """All-reduce on the worker's own device: a GPU process group is NCCL, which has no CPU support
    (torch's backend_capability["nccl"] == ["cuda"]), so a CPU tensor there fails at the first step."""
    terms = torch.tensor(values, dtype=torch.float32, device=device)
    torch.distributed.all_reduce(terms)
    return (terms / world).tolist()


def local_path(model: str) -> str:
    """A directory on this worker's node: remote models are downloaded into its mirror (once per node)."""
    from compressor.manifest import ModelRef
    from compressor.models import materialize

    return materialize(ModelRef(path=model, key=model)).path


def train_steps(engines: Engines, job: DistillJob, data: WorkerData, step: int, rank: int, world: int) -> dict:
    """Steps `step`..job.steps, checkpointing on the way; returns the last step's metrics. When the driver asks the
    run to stop, every worker stops after the same step, saves a checkpoint of it and returns metrics with `stopped`."""
    tokens_per_step = job.spec.global_batch * job.seq_len
    metrics: dict = {}
    trained, seconds_total = 0, 0.0
    while step < job.steps:
        start = time.perf_counter()
        lr = lr_at(step, job.spec, job.steps)
        result = train_step(engines, data.batch(step), lr)
        # The loss of the whole global batch: the mean over workers of their (equal-sized) shares.
        # Rank 0's "stop?" rides in the same all-reduce, so that every rank stops after the same step (saving a
        # checkpoint is a collective) at no extra collective per step.
        loss, kd, ce, hidden, features, stop = mean_over_workers(
            [
                result.loss,
                result.kd_loss,
                result.ce_loss,
                result.hidden_mse,
                result.feature_loss,
                stop_requested(job, rank),
            ],
            engines.device,
            world,
        )
        seconds = time.perf_counter() - start
        step, trained, seconds_total = step + 1, trained + 1, seconds_total + seconds
        metrics = {
            "loss": loss,
            "kd_loss": kd,
            "ce_loss": ce,
            "lr": lr,
            "tokens_per_s": tokens_per_step / seconds,
            "step_time": seconds,
            "step": step,
        }
        if job.spec.loss.hidden_mse:
            metrics["hidden_mse"] = hidden
        if job.spec.loss.features:
            metrics["feature_loss"] = features
        if result.grad_norm is not None:
            metrics["grad_norm"] = result.grad_norm
        if rank == 0:
            publish(job, step, metrics)
        if (step % job.spec.checkpoint_every == 0 or stop > 0) and step < job.steps:
            save_and_report(engines, job, step, metrics, rank, export=False)
        if stop > 0 and step < job.steps:
            return {**metrics, "stopped": 1.0}
    if trained:
        metrics["mean_tokens_per_s"] = trained * tokens_per_step / seconds_total
    return metrics


def stop_requested(job: DistillJob, rank: int) -> float:
    """1.0 when the driver asked the run to stop (Ctrl-C / SIGTERM of `compressor run`), else 0.0. Only rank 0 asks,
    once per step: one actor call of about a millisecond, whatever the number of workers. An unreachable flag (the
    driver gone) never stops training."""
    if rank != 0 or job.stop is None:
        return 0.0
    import ray

    try:
        return 1.0 if ray.get(job.stop.is_set.remote(), timeout=30) else 0.0
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"distill: cannot reach the driver's stop flag ({exc}); training goes on", stacklevel=1)
        job.stop = None
        return 0.0


def publish(job: DistillJob, step: int, metrics: dict) -> None:
    """Rank 0's per-step metrics to the tracker and the driver. Neither may stop training if it is unreachable."""
    try:
        if job.sink is not None:
            job.sink.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        if job.progress is not None:
            job.progress.put_nowait((step, metrics))
    except Exception as exc:  # noqa: BLE001  (a tracking server down, the driver gone)
        warnings.warn(f"distill: could not publish the metrics of step {step}: {exc}", stacklevel=1)


def save_and_report(engines: Engines, job: DistillJob, step: int, metrics: dict, rank: int, export: bool) -> None:
    """Every worker saves its DeepSpeed shards and reports them; Ray Train merges them in storage (a barrier)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="distill-ckpt-") as tmp:
        state = {"step": step, "fingerprint": job.fingerprint}
        engines.student.save_checkpoint(tmp, tag=f"step{step}", client_state=state)
        if export:
            export_student(engines, job, Path(tmp) / EXPORT_DIR, rank)
        ray.train.report(
            {**metrics, "step": step},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_step{step:08d}",
        )


def resume(engines: Engines, job: DistillJob) -> int:
    """The step to start from: that of the latest checkpoint of this run (after a worker failure or a re-run)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        _, client_state = engines.student.load_checkpoint(directory)
    if client_state is None or client_state.get("fingerprint") != job.fingerprint:
        raise UserError(
            f"the Ray Train run at {str(Path(checkpoint.path).parent)!r} holds a checkpoint of a different distillation "
            "(other models, data or settings); remove that run directory or choose another output name"
        )
    return int(client_state["step"])


def export_student(engines: Engines, job: DistillJob, out_dir: Path, rank: int) -> None:
    """Write the student as a Hugging Face safetensors checkpoint with the teacher's tokenizer (rank 0 writes)."""
    from transformers import AutoModelForCausalLM

    from compressor.models import load_tokenizer, save_checkpoint

    if engines.zero_stage == 3:
        # A collective: every rank contributes its shards, rank 0 receives the whole 16-bit (or fp32) state dict.
        state = engines.student._zero3_consolidated_16bit_state_dict()
        if rank != 0:
            return
        trained = engines.student_model
        model = AutoModelForCausalLM.from_config(trained.config, dtype=next(iter(state.values())).dtype)
        prefix = "student."
        missing, unexpected = model.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=False
        )
        may_miss = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - may_miss:
            raise RuntimeError(
                f"consolidated state does not fit the student: missing {missing}, unexpected {unexpected}"
            )
    else:
        if rank != 0:
            return
        model = engines.student_model
    tokenizer = load_tokenizer(local_path(job.tokenizer_path or job.teacher_path))
    chat = job.spec.chat
    if chat is not None and chat.template is not None and not getattr(tokenizer, "chat_template", None):
        from compressor.chat_encoding import template_as_jinja

        tokenizer.chat_template = template_as_jinja(tokenizer, chat.template)  # prompted as it was trained
    save_checkpoint(model, tokenizer, out_dir)
