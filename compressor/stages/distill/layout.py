"""Torch-free arithmetic and checks of a distill spec: batch layout, step budget, model compatibility.

Everything here raises UserError before any model is loaded or any worker started."""

from __future__ import annotations

import math
from dataclasses import dataclass

from compressor.errors import UserError
from compressor.stages.distill.spec import DistillSpec

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
    """Optimizer steps: `steps`, or enough global batches to train on at least `tokens` tokens (rounded up)."""
    if spec.steps is not None:
        steps = spec.steps
    else:
        per_step = spec.global_batch * seq_len
        steps = math.ceil(spec.tokens / per_step)
        if spec.tokens < per_step:  # most likely a typo (1e3 for 1e9): refused rather than rounded up to one step
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
            raise UserError(
                f"distill.loss.hidden_mse: student layer {s} does not exist (the student has {layers} layers)"
            )


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
    for _, t in spec.loss.hidden_mse:
        if layers is not None and not 0 <= t < layers:
            raise UserError(
                f"distill.loss.hidden_mse: teacher layer {t} does not exist (the teacher has {layers} layers)"
            )
    if spec.loss.hidden_mse and student.get("hidden_size") != teacher.get("hidden_size"):
        raise UserError(
            f"distill.loss.hidden_mse: the student's hidden_size ({student.get('hidden_size')}) differs from the "
            f"teacher's ({teacher.get('hidden_size')}); hidden-state MSE needs layers of equal width"
        )


def worker_bundle(spec: DistillSpec) -> dict[str, float]:
    """The Ray resources of one distill worker (Ray Train's resources_per_worker)."""
    bundle = {"CPU": float(spec.cpus_per_worker)}
    if spec.gpus_per_worker:
        bundle["GPU"] = float(spec.gpus_per_worker)
    return bundle


def workers_fitting(node: dict, bundle: dict[str, float]) -> int:
    """How many whole workers one node's resources hold (Ray counts resources in units of 1e-4)."""
    return min(math.floor(node.get(resource, 0.0) / amount + 1e-6) for resource, amount in bundle.items())


def check_cluster(spec: DistillSpec, nodes: list[dict]) -> list[str]:
    """Why the alive Ray nodes cannot hold the worker group under `placement_strategy`; empty when they can.
    `nodes` are the nodes' total resources (ray.nodes()' "Resources"): capacity, not what is free right now, since
    Ray Train queues behind running tasks but waits forever for capacity that does not exist."""
    bundle, workers = worker_bundle(spec), spec.workers
    problems = []
    for resource, per_worker in bundle.items():
        total = sum(node.get(resource, 0.0) for node in nodes)
        if total < per_worker * workers:
            problems.append(
                f"{workers} workers x {per_worker:g} {resource} need {per_worker * workers:g} {resource}, "
                f"the cluster has {total:g}"
            )
        elif not any(node.get(resource, 0.0) >= per_worker for node in nodes):
            problems.append(f"no single node has the {per_worker:g} {resource} one worker needs")
    fits = [workers_fitting(node, bundle) for node in nodes]
    if spec.placement_strategy == "STRICT_SPREAD":
        hosts = sum(1 for n in fits if n >= 1)
        if hosts < workers:
            problems.append(
                f"STRICT_SPREAD puts each of the {workers} workers on its own node, and {hosts} of the "
                f"cluster's {len(nodes)} nodes can hold one"
            )
    elif spec.placement_strategy == "STRICT_PACK":
        if max(fits, default=0) < workers:
            problems.append(
                f"STRICT_PACK puts all {workers} workers on one node, and the largest holds {max(fits, default=0)}"
            )
    elif not problems and sum(fits) < workers:  # enough in total, but split across nodes in pieces too small
        problems.append(f"the nodes hold {sum(fits)} of the {workers} workers once split into whole workers")
    return problems
