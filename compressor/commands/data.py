"""`compressor data prepare PIPELINE`: tokenize each distill stage's data into token shards ahead of a run.

A run prepares missing shards itself, first thing in its distill stage; doing it ahead (for the 94B-token recipe,
hours on one node) keeps the GPUs from waiting. `compressor plan` shows whether the shards are there
(`shard_status`). Nothing here imports torch at import time."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import typer

from compressor.commands.pipeline import OverridesArg, PipelineArg, _load


@dataclass
class StageData:
    """What one distill stage of a plan reads: its source, at which seq_len, how many sequences, with whose tokenizer."""

    source: object  # DataSource, normalized (absolute local paths)
    seq_len: int
    steps: int
    sequences: int  # steps x global_batch
    teacher: object  # ModelRef of the teacher whose tokenizer is used
    data_root: str


def stage_data(plan, stage) -> StageData:
    from compressor.data import normalized
    from compressor.manifest import ModelRef
    from compressor.shards import data_root_for
    from compressor.stages.distill.layout import budget_steps

    spec = stage.entry.spec
    source = normalized(plan.spec.data[spec.data])
    seq_len = spec.seq_len or source.seq_len
    steps = budget_steps(spec, seq_len)
    teacher = ModelRef(path=spec.teacher, key=f"path:{spec.teacher}") if spec.teacher else plan.teacher
    return StageData(source, seq_len, steps, steps * spec.global_batch, teacher, data_root_for(plan.storage_uri))


def local_tokenizer(teacher) -> Optional[str]:
    """The teacher's tokenizer location if it is readable without building or downloading anything, else None."""
    from compressor import storage

    path = teacher.path
    if path.startswith("zoo:"):
        from compressor import zoo

        name = path[len("zoo:") :]
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
        tokenizer = local_tokenizer(need.teacher)
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


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Token shards of the distill data (tokenized once, reused by every pipeline).", no_args_is_help=True
    )
    app.add_typer(group, name="data")

    @group.command("prepare")
    def prepare(
        pipeline: Optional[str] = PipelineArg,
        overrides: Optional[list[str]] = OverridesArg,
        storage: Optional[str] = typer.Option(None, help="Override the pipeline's storage root."),
    ) -> None:
        """Tokenize each distill stage's data into token shards under <storage>/_data, with a progress bar."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from compressor import shards
        from compressor.models import tokenizer_dir
        from compressor.planning import make_plan
        from compressor.stages.distill.data import check_fit, run_data

        _, spec = _load(pipeline, overrides)
        plan = make_plan(spec, storage)
        console = Console(stderr=True)
        stages = [s for s in plan.stages if s.kind == "distill"]
        if not stages:
            console.print(f"{spec.name}: no distill stage, nothing to tokenize")
        for stage in stages:
            need = stage_data(plan, stage)
            if need.source.revision is not None:
                typer.echo(f"{stage.name}: {need.source.source} at commit {need.source.revision}")
            distill = stage.entry.spec
            check = functools.partial(
                check_fit,
                steps=need.steps,
                global_batch=distill.global_batch,
                seq_len=need.seq_len,
                max_epochs=distill.max_epochs,
                source=need.source.source,
            )
            tokenizer = tokenizer_dir(need.teacher)
            columns = [
                TextColumn(f"{stage.name}: tokenizing {need.source.source}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("sequences"),
                TimeElapsedColumn(),
            ]
            with Progress(*columns, console=console, transient=True) as bar:
                task = bar.add_task("tokenize", total=need.sequences)
                directory, index = shards.prepare(
                    need.source,
                    tokenizer,
                    need.seq_len,
                    need.sequences,
                    need.data_root,
                    progress=lambda done, task=task: bar.update(task, completed=done),
                    check=check,
                )
            typer.echo(
                f"{stage.name}: {index.sequences:,} sequences of {need.seq_len} tokens ({index.tokens:,} tokens"
                f"{', the whole source' if index.exhausted else ''}) at {directory}"
            )
            data = run_data(
                directory,
                index,
                need.steps,
                stage.entry.spec.global_batch,
                stage.entry.spec.max_epochs,
                need.source.source,
            )  # a source too small for the budget: the same exit 2 the run would give
            if distill.loss.targets is not None:  # the teacher's one pass, ahead of the run too
                from compressor.raylocal import ensure_ray
                from compressor.stages.context import StageContext
                from compressor.stages.distill.targets_compute import prepare_targets

                ensure_ray(None)
                found = prepare_targets(distill, need.teacher, directory, data.sequences, StageContext())
                typer.echo(f"{stage.name}: teacher targets for {data.sequences:,} sequences at {found}")


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
    tokenizer = local_tokenizer(need.teacher)
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
