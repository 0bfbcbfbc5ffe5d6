"""Torch-free arithmetic and checks of a distill spec: batch layout, step budget, model compatibility.

Everything here raises UserError before any model is loaded or any worker started."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from compressor.errors import UserError
from compressor.stages.distill.spec import DistillSpec, KDLoss

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


@dataclass(frozen=True)
class Budget:
    """What a distill spec's budget comes to on its data: the one place steps, sequences and tokens are derived."""

    seq_len: int
    steps: int
    sequences: int  # steps x global_batch
    tokens: int  # sequences x seq_len


def budget(spec: DistillSpec, source) -> Budget:
    """The budget of `spec` on its data source (a DataSource; None for a generate stage's dataset, read at a data
    source's default seq_len). A search trial's spec has its own steps: call it with the spec that will train."""
    from compressor.config.schema import DataSource

    seq_len = spec.seq_len or (source or DataSource(source=spec.data)).seq_len
    steps = budget_steps(spec, seq_len)
    return Budget(seq_len, steps, steps * spec.global_batch, steps * spec.global_batch * seq_len)


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


@dataclass(frozen=True)
class FeaturePair:
    """One feature term on resolved layers (0-based decoder layers of each model)."""

    student: int
    teacher: int
    kind: str
    weight: float

    @property
    def name(self) -> str:  # the key of its projector (a ModuleDict key: no dots)
        return f"{self.kind}_s{self.student}_t{self.teacher}"


def uniform_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """TinyBERT's uniform map, layers counted from 1: student layer i <-> teacher layer floor(i * N_t / N_s), so the
    last layers pair; returned 0-based."""
    return [(i - 1, i * teacher_layers // student_layers - 1) for i in range(1, student_layers + 1)]


def feature_pairs(loss: KDLoss, student_layers: int, teacher_layers: int) -> list[FeaturePair]:
    """spec.features on concrete layers (explicit: as given; uniform / last: the map's pairs, for each term)."""
    pairs = []
    for term in loss.features:
        if loss.layer_map == "explicit":
            layers = [(term.student_layer, term.teacher_layer)]
        elif loss.layer_map == "uniform":
            layers = uniform_map(student_layers, teacher_layers)
        else:
            layers = [(student_layers - 1, teacher_layers - 1)]
        pairs += [FeaturePair(s, t, term.kind, term.weight) for s, t in layers]
    return pairs


def _check_layers(field: str, who: str, index: int, layers: Optional[int]) -> None:
    if layers is not None and not 0 <= index < layers:
        raise UserError(f"distill.loss.{field}: {who} layer {index} does not exist (the {who} has {layers} layers)")


def check_student(spec: DistillSpec, config: dict) -> None:
    check_logits(config, "student")
    layers = config.get("num_hidden_layers")
    for s, _ in spec.loss.hidden_mse:
        _check_layers("hidden_mse", "student", s, layers)
    for i, term in enumerate(spec.loss.features):
        if term.student_layer is not None:
            _check_layers(f"features.{i}.student_layer", "student", term.student_layer, layers)


def check_pair(spec: DistillSpec, student: dict, teacher: dict, teacher_name: str) -> list[FeaturePair]:
    """The student can learn from this teacher: the teacher's vocabulary holds the student's (check_vocabulary
    decides whether a larger one is a padded copy); hidden-MSE layers exist and have equal widths; feature layers
    exist. Returns the resolved feature pairs."""
    check_logits(teacher, "teacher")
    sv, tv = student.get("vocab_size"), teacher.get("vocab_size")
    if sv != tv and not (isinstance(sv, int) and isinstance(tv, int) and tv > sv):
        raise UserError(
            f"distill: the student's vocab_size ({sv}) differs from the teacher's ({tv}, {teacher_name}); "
            "KD compares the two models' distributions over the same tokens, so the student must use the teacher's "
            "tokenizer and vocabulary (a teacher may only have more rows, as padding its tokenizer never produces)"
        )
    layers = teacher.get("num_hidden_layers")
    for _, t in spec.loss.hidden_mse:
        _check_layers("hidden_mse", "teacher", t, layers)
    if spec.loss.hidden_mse and student.get("hidden_size") != teacher.get("hidden_size"):
        raise UserError(
            f"distill.loss.hidden_mse: the student's hidden_size ({student.get('hidden_size')}) differs from the "
            f"teacher's ({teacher.get('hidden_size')}); hidden-state MSE needs layers of equal width (loss.features "
            "learns a projector between different widths)"
        )
    for i, term in enumerate(spec.loss.features):
        if term.teacher_layer is not None:
            _check_layers(f"features.{i}.teacher_layer", "teacher", term.teacher_layer, layers)
    return feature_pairs(spec.loss, student["num_hidden_layers"], teacher["num_hidden_layers"])


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
