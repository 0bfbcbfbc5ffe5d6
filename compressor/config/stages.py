"""Per-stage specs. Each stage's options live here (not in the stage module) so that
validating a pipeline never imports torch. Field docs feed docs/reference.md."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Fields that change how a stage is operated, not what it outputs: left out of its cache key (compressor.cache).
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset()


class Resources(Strict):
    """What one Ray task (or, for distill, one Ray Train worker) of this stage asks for."""

    num_cpus: float = Field(1, ge=0, description="CPUs per task/worker.")
    num_gpus: float = Field(0, ge=0, description="GPUs per task/worker.")
    memory_gb: Optional[float] = Field(None, gt=0, description="Memory reservation in GiB (Ray `memory`).")
    custom: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources, e.g. {node_type_a100: 1} to place a stage on the "
        "nodes that advertise them.")


# ----------------------------------------------------------------------------- prune
class PruneTarget(Strict):
    """Target shape. Omitted dimensions keep the source's value; head_dim never changes."""

    hidden_size: Optional[int] = Field(None, gt=0, description="Embedding channels to keep (Minitron width).")
    intermediate_size: Optional[int] = Field(None, gt=0, description="MLP neurons to keep in every layer.")
    num_attention_heads: Optional[int] = Field(
        None, gt=0, description="Query heads to keep in every layer, ranked within their KV group."
    )
    num_key_value_heads: Optional[int] = Field(
        None, gt=0, description="KV heads to keep; fewer than the source drops whole KV groups (with their query heads)."
    )
    num_layers: Optional[int] = Field(None, gt=0, description="Keep this many layers, dropping the least important.")
    keep_layers: Optional[list[int]] = Field(None, description="Explicit layer indices to keep (0-based).")
    drop_layers: Optional[list[int]] = Field(None, description="Explicit layer indices to drop (0-based).")

    @model_validator(mode="after")
    def _one_depth_rule(self):
        given = [n for n in ("num_layers", "keep_layers", "drop_layers") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of num_layers, keep_layers, drop_layers (got {', '.join(given)})")
        return self


class PruneSpec(Strict):
    """Minitron structured pruning: activation importance from one calibration pass, then slicing to `target`."""

    target: PruneTarget = Field(description="The output shape.")
    calibration: Optional[str] = Field(
        None, description="Name of a data source under `data:`; default: the only one defined."
    )
    samples: Optional[int] = Field(
        None, gt=0, description="Overrides the data source's `samples` (default 1024, as in the Minitron paper)."
    )
    seq_len: Optional[int] = Field(None, gt=0, description="Overrides the data source's `seq_len`.")
    batch_size: int = Field(8, gt=0, description="Calibration sequences per forward pass.")
    depth_metric: Literal["bi", "loss"] = Field(
        "bi",
        description="Layer ranking for `num_layers`: block importance (1 - cosine of a layer's input and output, "
        "from the same pass) or the LM-loss increase when the layer is dropped (one more pass per layer).",
    )
    aggregation: Literal["l2_mean", "mean_mean", "l2_l2", "mean_l2"] = Field(
        "l2_mean", description="<batch>_<sequence> reduction of activations; Minitron's best is L2 over batch, mean over sequence."
    )
    align: int = Field(32, gt=0, description="A pruned hidden_size / intermediate_size must be a multiple of this.")
    quantize_group_size: Optional[int] = Field(None, description="Warn when widths will not divide by it (set from a later quantize stage).")


# ----------------------------------------------------------------------------- distill
class KDLoss(Strict):
    """The distillation loss: (1 - alpha) * T^2 * KL + alpha * CE (+ hidden_weight * hidden-state MSE)."""

    kind: Literal["forward_kl", "reverse_kl"] = Field(
        "forward_kl",
        description="forward_kl = KL(teacher || student), mass-covering (Minitron); reverse_kl = KL(student || teacher), mode-seeking.",
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature T of both models' logits; the KL is scaled by T^2.")
    alpha: float = Field(0.0, ge=0, le=1, description="Weight of the hard-label CE term (0 = logit-only KD, as Minitron).")
    hidden_mse: list[tuple[int, int]] = Field(
        default_factory=list,
        description="(student_layer, teacher_layer) pairs (0-based decoder layers) whose outputs are pulled together "
        "by MSE; both models need the same hidden_size.",
    )
    hidden_weight: float = Field(1.0, ge=0, description="Weight of the hidden-state MSE term.")
    chunk_tokens: int = Field(
        1024, gt=0, description="Tokens per chunk of the KD loss; only one chunk's [tokens, vocab] logits exist at a time."
    )


class DeepSpeedOptions(Strict):
    """DeepSpeed settings of the student (the teacher is always a ZeRO-3 inference engine)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        3, description="ZeRO stage of the student: 2 shards gradients and optimizer state, 3 also the weights."
    )
    bf16: Optional[bool] = Field(None, description="Train in bf16 (fp32 master weights). Default: on when the GPUs support it, off on CPU.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO-Offload).")
    zero_hpz_partition_size: int = Field(
        1, ge=1, description="ZeRO++ hierarchical partitioning (ZeRO-3 only): each group of this many consecutive "
        "workers also keeps a copy of the weights split among themselves, so the backward pass all-gathers within "
        "the group. For multi-node GPU runs: set it to the GPUs per node (8); it must divide `workers`.",
    )


class DistillSpec(Strict):
    """Knowledge distillation from the frozen teacher into the previous stage's output, in Ray Train with DeepSpeed."""

    # A re-run may change these and still resume the same Ray Train run from its checkpoints. `workers` stays in the
    # key: ZeRO checkpoints are sharded per worker and do not load into another world size.
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({
        "max_failures", "checkpoint_every", "wait_for_resources_s", "placement_strategy",
        "cpus_per_worker", "max_epochs", "gradient_checkpointing"})

    data: str = Field(description="Name of a data source under `data:`; tokenized with the teacher's tokenizer.")
    teacher: Optional[str] = Field(None, description="Teacher model (directory or hub id); default: the pipeline teacher.")
    steps: Optional[int] = Field(None, gt=0, description="Optimizer steps to train (give this or `tokens`).")
    tokens: Optional[float] = Field(None, gt=0, description="Token budget; steps = ceil(tokens / (global_batch * seq_len)), "
                                    "so at least this many tokens are trained.")
    seq_len: Optional[int] = Field(None, gt=0, description="Tokens per packed sequence; default: the data source's seq_len.")
    max_epochs: float = Field(
        1.0, ge=1.0, description="How many times the run may see its data. With the default 1, a budget larger than "
        "the source is refused before training (exit 2, naming both numbers); e.g. 3 lets each sequence come up to "
        "3 times (a new seeded order each epoch).",
    )
    global_batch: int = Field(8, gt=0, description="Sequences per optimizer step, across all workers.")
    micro_batch: int = Field(
        4, gt=0, description="Sequences per worker per forward pass (at most global_batch / workers); the rest is gradient accumulation."
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
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker; > 0 trains on GPU with NCCL, 0 on CPU with gloo.")
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
    max_failures: int = Field(2, ge=0, description="Worker-group restarts (from the last checkpoint) before the stage fails.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute the student's decoder layers in the backward pass instead of keeping their "
        "activations: about 1/3 more student compute for far less activation memory (longer seq_len or micro_batch).",
    )

    @model_validator(mode="after")
    def _hierarchical_partitioning(self):
        hpz = self.deepspeed.zero_hpz_partition_size
        if hpz > 1 and self.deepspeed.zero_stage != 3:
            raise ValueError(f"deepspeed.zero_hpz_partition_size {hpz} needs deepspeed.zero_stage 3 (it partitions "
                             "the weights, which only ZeRO-3 does)")
        if hpz > 1 and self.workers % hpz:
            raise ValueError(f"deepspeed.zero_hpz_partition_size {hpz} does not divide workers {self.workers}: the "
                             "workers split into groups of that size (the GPUs of one node)")
        return self

    @model_validator(mode="after")
    def _budget(self):
        if self.steps is None and self.tokens is None:
            raise ValueError("give `steps` or `tokens`")
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give only one of `steps` and `tokens`")
        return self


# ----------------------------------------------------------------------------- quantize
# Group sizes GPTQModel accepts, and the GPTQ kernels it can be told to load with (gptqmodel.utils.backend.BACKEND).
GPTQ_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
GPTQ_BACKENDS = (
    "auto", "gptq_torch", "gptq_torch_int8", "gptq_torch_aten", "gptq_torch_fused", "gptq_triton",
    "gptq_exllama_v2", "gptq_marlin", "gptq_machete", "gptq_bitblas",
)


class QuantizeSpec(Strict):
    """GPTQ weight-only quantization through GPTQModel; writes a GPTQ-format checkpoint (quantize_config.json)."""

    method: Literal["gptq"] = Field("gptq", description="Quantization algorithm (GPTQ is the only one).")
    bits: Literal[4, 8] = Field(4, description="Bits per weight of every linear layer in the decoder blocks.")
    group_size: int = Field(
        128, description="Input channels sharing one scale/zero point; -1 = one per output channel. "
        f"One of {', '.join(map(str, GPTQ_GROUP_SIZES))}."
    )
    desc_act: bool = Field(False, description="Quantize columns in order of decreasing activation (act-order); "
                           "slightly better quality, slower kernels.")
    sym: bool = Field(True, description="Symmetric grid around zero (vLLM's Marlin kernels need it); false fits a "
                      "zero point per group.")
    damp_percent: float = Field(0.01, gt=0, lt=1, description="Hessian dampening, as a fraction of its mean diagonal.")
    batch_size: int = Field(1, gt=0, description="Calibration sequences per forward pass while quantizing.")
    calibration: Optional[str] = Field(None, description="Name of a data source under `data:`; default: the only one defined.")
    samples: Optional[int] = Field(None, gt=0, description="Calibration sequences; default: the data source's `samples`, else 128.")
    seq_len: Optional[int] = Field(None, gt=0, description="Tokens per calibration sequence; default: the data source's "
                                   "`seq_len`, capped at the model's context.")
    on_misaligned: Literal["error", "largest_divisor", "int8_kernel"] = Field(
        "error",
        description="When group_size does not divide a layer's in_features: `error` (refused before any compute, "
        "naming the layers and an aligned prune target), `largest_divisor` (use the largest group size that divides "
        "every layer), or `int8_kernel` (keep group_size; the checkpoint loads with GPTQModel's CPU int8 kernel).",
    )
    backend: Optional[Literal[GPTQ_BACKENDS]] = Field(  # type: ignore[valid-type]
        None, description="GPTQModel kernel to load the output with, written into config.json so transformers and "
        "lm-eval use it too; default: chosen at load time for the device (on_misaligned=int8_kernel sets gptq_torch_int8).",
    )
    dtype: Literal["auto", "float16", "bfloat16"] = Field(
        "auto", description="Dtype of the non-quantized weights (embeddings, norms) and activations; "
        "auto = GPTQModel's choice (bfloat16 from a float32 source on CPU, else the source dtype).",
    )

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v not in GPTQ_GROUP_SIZES:
            raise ValueError(f"group_size {v} is not one of {', '.join(map(str, GPTQ_GROUP_SIZES))} (GPTQModel's choices)")
        return v


# ----------------------------------------------------------------------------- evaluate
class EvaluateSpec(Strict):
    """Evaluate the previous stage's model on the pipeline's tasks (no new model)."""

    tasks: Optional[list[str]] = Field(None, description="Subset of the pipeline's evaluation task names; default all.")


STAGE_SPECS: dict[str, type[BaseModel]] = {
    "prune": PruneSpec,
    "distill": DistillSpec,
    "quantize": QuantizeSpec,
    "evaluate": EvaluateSpec,
}
