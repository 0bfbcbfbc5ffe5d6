"""The distill stage's options (torch-free: validating a pipeline imports this, never torch)."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from compressor.config.base import Strict


class KDLoss(Strict):
    """The distillation loss: (1 - alpha) * T^2 * KL + alpha * CE (+ hidden_weight * hidden-state MSE)."""

    kind: Literal["forward_kl", "reverse_kl"] = Field(
        "forward_kl",
        description="forward_kl = KL(teacher || student), mass-covering (Minitron); reverse_kl = KL(student || teacher), mode-seeking.",
    )
    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature T of both models' logits; the KL is scaled by T^2."
    )
    alpha: float = Field(
        0.0, ge=0, le=1, description="Weight of the hard-label CE term (0 = logit-only KD, as Minitron)."
    )
    hidden_mse: list[tuple[int, int]] = Field(
        default_factory=list,
        description="(student_layer, teacher_layer) pairs (0-based decoder layers) whose outputs are pulled together "
        "by MSE; both models need the same hidden_size.",
    )
    hidden_weight: float = Field(1.0, ge=0, description="Weight of the hidden-state MSE term.")
    chunk_tokens: int = Field(
        1024,
        gt=0,
        description="Tokens per chunk of the KD loss; only one chunk's [tokens, vocab] logits exist at a time.",
    )


class DeepSpeedOptions(Strict):
    """DeepSpeed settings of the student (the teacher is always a ZeRO-3 inference engine)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        3, description="ZeRO stage of the student: 2 shards gradients and optimizer state, 3 also the weights."
    )
    bf16: Optional[bool] = Field(
        None, description="Train in bf16 (fp32 master weights). Default: on when the GPUs support it, off on CPU."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO-Offload).")
    zero_hpz_partition_size: int = Field(
        1,
        ge=1,
        description="ZeRO++ hierarchical partitioning (ZeRO-3 only): each group of this many consecutive "
        "workers also keeps a copy of the weights split among themselves, so the backward pass all-gathers within "
        "the group. For multi-node GPU runs: set it to the GPUs per node (8); it must divide `workers`.",
    )


class DistillSpec(Strict):
    """Knowledge distillation from the frozen teacher into the previous stage's output, in Ray Train with DeepSpeed."""

    # A re-run may change these and still resume the same Ray Train run from its checkpoints. `workers` stays in the
    # key: ZeRO checkpoints are sharded per worker and do not load into another world size.
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset(
        {
            "max_failures",
            "checkpoint_every",
            "wait_for_resources_s",
            "placement_strategy",
            "cpus_per_worker",
            "max_epochs",
            "gradient_checkpointing",
        }
    )

    data: str = Field(description="Name of a data source under `data:`; tokenized with the teacher's tokenizer.")
    teacher: Optional[str] = Field(
        None, description="Teacher model (directory or hub id); default: the pipeline teacher."
    )
    steps: Optional[int] = Field(None, gt=0, description="Optimizer steps to train (give this or `tokens`).")
    tokens: Optional[float] = Field(
        None,
        gt=0,
        description="Token budget; steps = ceil(tokens / (global_batch * seq_len)), "
        "so at least this many tokens are trained.",
    )
    seq_len: Optional[int] = Field(
        None, gt=0, description="Tokens per packed sequence; default: the data source's seq_len."
    )
    max_epochs: float = Field(
        1.0,
        ge=1.0,
        description="How many times the run may see its data. With the default 1, a budget larger than "
        "the source is refused before training (exit 2, naming both numbers); e.g. 3 lets each sequence come up to "
        "3 times (a new seeded order each epoch).",
    )
    global_batch: int = Field(8, gt=0, description="Sequences per optimizer step, across all workers.")
    micro_batch: int = Field(
        4,
        gt=0,
        description="Sequences per worker per forward pass (at most global_batch / workers); the rest is gradient accumulation.",
    )
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW), reached after the warm-up.")
    min_lr: float = Field(1e-5, ge=0, description="Learning rate at the last step, after the cosine decay.")
    warmup_steps: Optional[int] = Field(
        None, ge=0, description="Linear warm-up steps; default: 10% of the steps, at most 40 (Minitron's value)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = no clipping).")
    loss: KDLoss = Field(default_factory=KDLoss, description="The loss.")
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions, description="DeepSpeed settings.")
    workers: int = Field(1, gt=0, description="Ray Train workers (one process each; one GPU each on GPU clusters).")
    gpus_per_worker: float = Field(
        0, ge=0, description="GPUs per worker; > 0 trains on GPU with NCCL, 0 on CPU with gloo."
    )
    cpus_per_worker: float = Field(1, gt=0, description="CPUs per worker (also its torch thread count on CPU).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers on nodes (STRICT_SPREAD: one worker per node)."
    )
    wait_for_resources_s: float = Field(
        0,
        ge=0,
        description="When the Ray cluster cannot place the workers yet, ask its autoscaler for them and wait up to "
        "this many seconds, with a progress line every 30 s (0 = refuse at once; autoscaling clusters: e.g. 1800).",
    )
    checkpoint_every: int = Field(50, gt=0, description="Steps between DeepSpeed checkpoints reported to Ray Train.")
    max_failures: int = Field(
        2, ge=0, description="Worker-group restarts (from the last checkpoint) before the stage fails."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the student's decoder layers in the backward pass instead of keeping their "
        "activations: about 1/3 more student compute for far less activation memory (longer seq_len or micro_batch).",
    )

    @model_validator(mode="after")
    def _hierarchical_partitioning(self):
        hpz = self.deepspeed.zero_hpz_partition_size
        if hpz > 1 and self.deepspeed.zero_stage != 3:
            raise ValueError(
                f"deepspeed.zero_hpz_partition_size {hpz} needs deepspeed.zero_stage 3 (it partitions "
                "the weights, which only ZeRO-3 does)"
            )
        if hpz > 1 and self.workers % hpz:
            raise ValueError(
                f"deepspeed.zero_hpz_partition_size {hpz} does not divide workers {self.workers}: the "
                "workers split into groups of that size (the GPUs of one node)"
            )
        return self

    @model_validator(mode="after")
    def _budget(self):
        if self.steps is None and self.tokens is None:
            raise ValueError("give `steps` or `tokens`")
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give only one of `steps` and `tokens`")
        return self
