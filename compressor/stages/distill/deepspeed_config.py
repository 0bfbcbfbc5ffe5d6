"""DeepSpeed configs for the student (trained, ZeRO 0-3) and the frozen teacher (ZeRO-3 inference). torch-free."""

from __future__ import annotations

from compressor.stages.distill.spec import DistillSpec

QUIET = {"steps_per_print": 1 << 30, "wall_clock_breakdown": False}

# ZeRO-3 keeps a gathered weight when the module trace of the previous micro-batch says it is used again within
# this many parameters. The chunked KD loss calls each output head once per chunk in the forward and again when
# backward recomputes the chunk, back to back, so with any positive distance each 128k-vocabulary head is
# all-gathered once per micro-batch instead of once per call (tests/stages/test_distill_engines.py counts the
# gathers). This is DeepSpeed's default, written out because the loss depends on it.
MAX_REUSE_DISTANCE = 1_000_000_000


def effective_zero_stage(requested: int, world_size: int) -> int:
    """ZeRO-3 partitions the weights across workers. With one worker there is nothing to partition, and its per-module
    gather/release hooks only cost time (about 10% of a step on CPU), so one worker runs ZeRO-2: the same computation
    with the same memory."""
    return 2 if requested == 3 and world_size == 1 else requested


def student_config(
    spec: DistillSpec, world_size: int, micro_batch: int, grad_accum: int, bf16: bool, on_gpu: bool
) -> dict:
    """The student's engine: the global batch as micro-batches x accumulation x workers, clipping, ZeRO, bf16."""
    stage = effective_zero_stage(spec.deepspeed.zero_stage, world_size)
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_max_reuse_distance"] = MAX_REUSE_DISTANCE
        if spec.deepspeed.zero_hpz_partition_size > 1:
            # ZeRO++ hpZ: a second copy of the weights split within each group of consecutive ranks (Ray Train gives
            # the workers of one node consecutive ranks), so backward's all-gathers stay on NVLink.
            zero["zero_hpz_partition_size"] = spec.deepspeed.zero_hpz_partition_size
    config = {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": spec.grad_clip,  # 0 disables it
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        **QUIET,
    }
    if spec.deepspeed.offload_optimizer and on_gpu:  # on CPU workers the optimizer state is in CPU memory anyway
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # ZeRO-Offload steps on the CPU with DeepSpeedCPUAdam (compiled on first use, then cached).
        config["optimizer"] = {"type": "AdamW", "params": {"lr": spec.lr, "weight_decay": spec.weight_decay}}
    else:
        # The caller passes a torch AdamW: DeepSpeed's own "Adam" would JIT-build FusedAdam or DeepSpeedCPUAdam
        # (minutes) on first use, which must not stall a CPU run.
        config["zero_allow_untested_optimizer"] = True
    return config


def teacher_config(micro_batch: int, bf16: bool) -> dict:
    """ZeRO-3 without an optimizer: each worker holds 1/N of the teacher and gathers a layer at a time."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "zero_optimization": {"stage": 3, "stage3_max_reuse_distance": MAX_REUSE_DISTANCE},
        "bf16": {"enabled": bf16},
        **QUIET,
    }
