"""Torch-free arithmetic and checks of a distill spec: batch layout, step budget, model compatibility.

Everything here raises UserError before any model is loaded or any worker started."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from compressor.config.stages import DistillSpec
from compressor.errors import UserError

# Heads whose logits are not lm_head(hidden): the chunked loss would distill the wrong distribution.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass(frozen=True)
class Layout:
    per_worker: int  # sequences per worker per optimizer step
    micro_batch: int  # sequences per forward pass
    grad_accum: int  # forward passes per optimizer step


def batch_layout(spec: DistillSpec) -> Layout:
    if spec.global_batch % spec.workers:
        raise UserError(
            f"distill.global_batch: {spec.global_batch} sequences do not split evenly over {spec.workers} workers; "
            f"use a multiple of {spec.workers}"
        )
    per_worker = spec.global_batch // spec.workers
    micro = min(spec.micro_batch, per_worker)
    if per_worker % micro:
        raise UserError(
            f"distill.micro_batch: each worker gets {per_worker} sequences per step (global_batch / workers), "
            f"which micro_batch {micro} does not divide; pick a divisor of {per_worker}"
        )
    return Layout(per_worker, micro, per_worker // micro)


def budget_steps(spec: DistillSpec, seq_len: int) -> int:
    """Optimizer steps: `steps`, or the token budget over the tokens of one global batch."""
    if spec.steps is not None:
        steps = spec.steps
    else:
        per_step = spec.global_batch * seq_len
        steps = int(spec.tokens // per_step)
        if steps == 0:
            raise UserError(
                f"distill.tokens: a budget of {spec.tokens:g} tokens is less than one optimizer step "
                f"(global_batch {spec.global_batch} x seq_len {seq_len} = {per_step} tokens); nothing would be trained"
            )
    if spec.warmup_steps is not None and spec.warmup_steps >= steps:
        raise UserError(
            f"distill.warmup_steps: {spec.warmup_steps} warm-up steps leave none of the {steps} steps for training"
        )
    return steps


def check_logits(config: dict, who: str) -> None:
    for key in LOGIT_TRANSFORMS:
        if config.get(key):
            raise UserError(
                f"distill: the {who}'s config sets {key}={config[key]}, so its logits are not its output head's "
                f"output; distilling such models ({', '.join(config.get('architectures') or ['?'])}) is not supported"
            )


def check_student(spec: DistillSpec, config: dict) -> None:
    check_logits(config, "student")
    layers = config.get("num_hidden_layers")
    for s, _ in spec.loss.hidden_mse:
        if layers is not None and not 0 <= s < layers:
            raise UserError(f"distill.loss.hidden_mse: student layer {s} does not exist (the student has {layers} layers)")


def check_pair(spec: DistillSpec, student: dict, teacher: dict, teacher_name: str) -> None:
    """The student can learn from this teacher: same vocabulary; hidden-MSE layers exist and have equal widths."""
    check_logits(teacher, "teacher")
    sv, tv = student.get("vocab_size"), teacher.get("vocab_size")
    if sv != tv:
        raise UserError(
            f"distill: the student's vocab_size ({sv}) differs from the teacher's ({tv}, {teacher_name}); "
            "KD compares the two models' distributions over the same tokens, so the student must use the teacher's "
            "tokenizer and vocabulary"
        )
    layers = teacher.get("num_hidden_layers")
    for s, t in spec.loss.hidden_mse:
        if layers is not None and not 0 <= t < layers:
            raise UserError(f"distill.loss.hidden_mse: teacher layer {t} does not exist (the teacher has {layers} layers)")
    if spec.loss.hidden_mse and student.get("hidden_size") != teacher.get("hidden_size"):
        raise UserError(
            f"distill.loss.hidden_mse: the student's hidden_size ({student.get('hidden_size')}) differs from the "
            f"teacher's ({teacher.get('hidden_size')}); hidden-state MSE needs layers of equal width"
        )


def check_cluster(spec: DistillSpec, total: dict, nodes: list[dict]) -> Optional[str]:
    """Refuse a worker group the cluster cannot place (Ray would otherwise wait forever). `total` is
    ray.cluster_resources(), `nodes` the alive nodes' resource dicts. With `wait_for_resources`, return a warning."""
    need = {"CPU": spec.cpus_per_worker, "GPU": spec.gpus_per_worker}
    problems = []
    for resource, per_worker in need.items():
        if per_worker and total.get(resource, 0) < per_worker * spec.workers:
            problems.append(
                f"{spec.workers} workers x {per_worker:g} {resource} need {per_worker * spec.workers:g} {resource}, "
                f"the cluster has {total.get(resource, 0):g}"
            )
        elif per_worker and not any(n.get(resource, 0) >= per_worker for n in nodes):
            problems.append(f"no single node has the {per_worker:g} {resource} one worker needs")
    if spec.placement_strategy == "STRICT_SPREAD" and len(nodes) < spec.workers:
        problems.append(
            f"STRICT_SPREAD puts each of the {spec.workers} workers on its own node, the cluster has {len(nodes)}"
        )
    if not problems:
        return None
    message = "distill.workers: the Ray cluster cannot place the workers: " + "; ".join(problems)
    if spec.wait_for_resources:
        return message + " (waiting for more nodes: wait_for_resources is set)"
    raise UserError(message + ". Lower workers / cpus_per_worker / gpus_per_worker, or add nodes.")
