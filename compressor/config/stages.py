"""Per-stage specs. Each stage's options live here (not in the stage module) so that
validating a pipeline never imports torch. Field docs feed docs/reference.md."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(Strict):
    """What one Ray task (or, for distill, one Ray Train worker) of this stage asks for."""

    num_cpus: float = Field(1, ge=0, description="CPUs per task/worker.")
    num_gpus: float = Field(0, ge=0, description="GPUs per task/worker.")
    memory_gb: Optional[float] = Field(None, gt=0, description="Memory reservation in GiB (Ray `memory`).")


# ----------------------------------------------------------------------------- prune
class PruneTarget(Strict):
    """Target shape. Omitted dimensions keep the source's value."""

    hidden_size: Optional[int] = Field(None, gt=0)
    intermediate_size: Optional[int] = Field(None, gt=0)
    num_attention_heads: Optional[int] = Field(None, gt=0)
    num_key_value_heads: Optional[int] = Field(None, gt=0)
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
    """Minitron structured pruning: activation importance, then slicing to `target`."""

    target: PruneTarget
    calibration: Optional[str] = Field(None, description="Name of a data source under `data:`.")
    samples: Optional[int] = Field(None, gt=0, description="Overrides the data source's `samples`.")
    seq_len: Optional[int] = Field(None, gt=0, description="Overrides the data source's `seq_len`.")
    batch_size: int = Field(8, gt=0)
    depth_metric: Literal["bi", "loss"] = Field("bi", description="Layer ranking: block importance or LM-loss increase.")
    kv_heads: Literal["keep_groups", "prune_groups"] = Field(
        "keep_groups", description="With fewer KV heads in the target, drop whole KV groups (prune_groups)."
    )
    aggregation: Literal["l2_mean", "mean_mean", "l2_l2", "mean_l2"] = Field(
        "l2_mean", description="<batch>_<sequence> reduction of activations; Minitron's best is L2 over batch, mean over sequence."
    )
    align: int = Field(32, gt=0, description="Every width must be a multiple of this.")
    quantize_group_size: Optional[int] = Field(None, description="Warn when widths will not divide by it (set from a later quantize stage).")


# ----------------------------------------------------------------------------- distill
class KDLoss(Strict):
    kind: Literal["forward_kl", "reverse_kl"] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.0, ge=0, le=1, description="Weight of the hard-label CE term (0 = logit-only KD, as Minitron).")
    hidden_mse: list[tuple[int, int]] = Field(default_factory=list, description="(student_layer, teacher_layer) pairs of equal width.")
    hidden_weight: float = Field(1.0, ge=0)
    chunk_tokens: int = Field(1024, gt=0, description="Tokens per chunk of the KD loss; bounds the logits held at once.")


class DeepSpeedOptions(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 3
    bf16: Optional[bool] = Field(None, description="Default: on when GPUs support it.")
    offload_optimizer: bool = False


class DistillSpec(Strict):
    """Knowledge distillation from the frozen teacher into the previous stage's output."""

    data: str = Field(description="Name of a data source under `data:`.")
    teacher: Optional[str] = Field(None, description="Teacher model; default: the pipeline teacher.")
    steps: Optional[int] = Field(None, gt=0)
    tokens: Optional[float] = Field(None, gt=0, description="Token budget; steps = tokens / (global_batch * seq_len).")
    seq_len: Optional[int] = Field(None, gt=0)
    global_batch: int = Field(8, gt=0, description="Sequences per optimizer step, across all workers.")
    micro_batch: int = Field(4, gt=0, description="Sequences per worker per forward pass.")
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(40, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    loss: KDLoss = Field(default_factory=KDLoss)
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions)
    workers: int = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    checkpoint_every: int = Field(50, gt=0, description="Steps between DeepSpeed checkpoints reported to Ray Train.")
    max_failures: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _budget(self):
        if self.steps is None and self.tokens is None:
            raise ValueError("give `steps` or `tokens`")
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give only one of `steps` and `tokens`")
        return self


# ----------------------------------------------------------------------------- quantize
class QuantizeSpec(Strict):
    """GPTQ through GPTQModel."""

    method: Literal["gptq"] = "gptq"
    bits: Literal[4, 8] = 4
    group_size: int = Field(128, description="-1 for per-channel.")
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = Field(0.01, gt=0, lt=1)
    batch_size: int = Field(1, gt=0)
    calibration: Optional[str] = Field(None, description="Name of a data source under `data:`.")
    samples: Optional[int] = Field(None, gt=0)
    seq_len: Optional[int] = Field(None, gt=0)
    on_misaligned: Literal["error", "largest_divisor", "int8_kernel"] = "error"
    backend: Optional[str] = Field(None, description="GPTQModel kernel at load time; default: auto.")


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
