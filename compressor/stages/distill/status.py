"""What a planned distill stage reads, and whether it is ready: its token shards (compressor.shards) and, with
`loss.targets`, the teacher's targets (compressor.targets). `compressor plan` shows both lines (the kind's
`plan_notes`); `compressor data prepare` tokenizes what `stage_data` names ahead of a run. Nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from compressor.models.reference import is_zoo, zoo_name


@dataclass
class StageData:
    """What one distill stage of a plan reads: its source, at which seq_len, how many sequences, with whose tokenizer."""

    source: object  # DataSource, normalized (absolute local paths)
    seq_len: int
    steps: int
    sequences: int  # steps x global_batch
    teacher: object  # ModelRef of the teacher whose tokenizer is used
    data_root: str


def distill_stages(plan) -> list:
    """The plan's distill stages, in order."""
    return [s for s in plan.stages if s.kind == "distill"]


def stage_data(plan, stage) -> StageData:
    from compressor.manifest import ModelRef
    from compressor.shards import data_root_for
    from compressor.stages.distill.layout import Budget
    from compressor.text_sources import normalized

    spec = stage.entry.spec
    source = normalized(plan.spec.data[spec.data])
    planned = Budget(**stage.derived)  # as the plan derived it
    teacher = ModelRef(path=spec.teacher, key=f"path:{spec.teacher}") if spec.teacher else plan.teacher
    return StageData(
        source, planned.seq_len, planned.steps, planned.sequences, teacher, data_root_for(plan.storage_uri)
    )


def tokenizer_on_disk(teacher) -> Optional[str]:
    """The teacher's tokenizer location if it is readable without building or downloading anything, else None."""
    from compressor import storage

    path = teacher.path
    if is_zoo(path):
        from compressor.models import zoo

        name = zoo_name(path)
        return str(zoo.model_path(name)) if zoo.is_built(name) else None
    if storage.is_remote(path):
        return path if storage.exists(storage.join(path, "config.json")) else None
    from pathlib import Path

    return path if (Path(path).expanduser() / "config.json").is_file() else None


def shard_status(plan, stage) -> str:
    """One line for `plan`: are this distill stage's token shards there, and how many sequences do they hold?"""
    from compressor.errors import UserError
    from compressor.shards import read_index, shard_dir, tokenizer_digest

    try:
        need = stage_data(plan, stage)
        tokenizer = tokenizer_on_disk(need.teacher)
        if tokenizer is None:
            return f"{need.source.source}: unknown until the teacher {need.teacher.path} is on this machine"
        directory = shard_dir(need.data_root, need.source, tokenizer_digest(tokenizer), need.seq_len)
        index = read_index(directory)
    except UserError as exc:
        return f"cannot tell ({exc})"
    wanted = f"{need.sequences:,} sequences of {need.seq_len} tokens needed"
    if index is None:
        return f"{need.source.source}: not tokenized yet ({wanted}; `compressor data prepare` does it ahead)"
    state = (
        "cached"
        if index.sequences >= need.sequences
        else "cached, the whole source (fewer than needed: see distill.max_epochs)"
        if index.exhausted
        else "partly cached (the run extends it)"
    )
    # The source's size as extrapolated from its first shard (shards.ShardIndex.estimated_tokens), before all is read.
    estimate = "" if index.exhausted or not index.estimated_tokens else f", source ~{index.estimated_tokens:,} tokens"
    return (
        f"{need.source.source}: {state}: {index.sequences:,} sequences ({index.tokens:,} tokens){estimate}, {wanted}, "
        f"at {directory}"
    )


def _size(n: float) -> str:
    return f"{n / 1e12:,.1f} TB" if n >= 1e12 else f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def targets_status(plan, stage) -> Optional[str]:
    """One line for `plan` when the stage distils from teacher targets (loss.targets): their size and whether the
    teacher's one pass over the data is still to run."""
    from compressor import estimate, models
    from compressor import targets as tg
    from compressor.shards import read_index, shard_dir, tokenizer_digest

    wanted = stage.entry.spec.loss.targets
    if wanted is None:
        return None
    need = stage_data(plan, stage)
    config = models.read_config(need.teacher)
    vocab = config.get("vocab_size") or 0
    per_position = tg.bytes_per_position(wanted.kind, wanted.k, vocab)
    tokens = need.sequences * need.seq_len
    teacher_flops = tokens * estimate.forward_flops_per_token(config, need.seq_len) if config else 0.0
    state = "to compute"
    tokenizer = tokenizer_on_disk(need.teacher)
    if tokenizer is not None:
        directory = shard_dir(need.data_root, need.source, tokenizer_digest(tokenizer), need.seq_len)
        t = stage.entry.spec.loss.temperature
        found = wanted.path or tg.targets_dir(directory, wanted.kind, wanted.k, t, wanted.seed, need.teacher.key)
        index = tg.read_index(found) if read_index(directory) is not None else None
        if index is not None and not tg.missing_parts(index, need.sequences):
            state = "cached: no teacher pass"
    return (
        f"{stage.name} targets: {wanted.kind} k={wanted.k}, {per_position} B/token "
        f"({per_position / (2 * vocab):.2%} of dense fp16 logits), {_size(per_position * tokens)} for "
        f"{tokens:,} tokens; the teacher's pass over them ({teacher_flops:.2e} FLOPs, in the GPU-hours above) runs "
        f"once: {state}"
    )
