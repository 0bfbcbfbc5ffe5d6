"""`compressor data prepare PIPELINE`: tokenize each distill stage's data into token shards ahead of a run.

A run prepares missing shards itself, first thing in its distill stage; doing it ahead (for the 94B-token recipe,
hours on one node) keeps the GPUs from waiting. `compressor plan` shows whether the shards are there
(compressor/stages/distill/status.py). Nothing here imports torch at import time."""

from __future__ import annotations

import functools
from typing import Optional

import typer

from compressor.commands.pipeline import OverridesArg, PipelineArg, _load


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
        from compressor.stages.distill.batches import check_fit, run_data
        from compressor.stages.distill.status import distill_stages, stage_data

        _, spec = _load(pipeline, overrides)
        plan = make_plan(spec, storage)
        console = Console(stderr=True)
        stages = distill_stages(plan)
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
                from compressor.contract.context import StageContext
                from compressor.ray_runtime import ensure_ray
                from compressor.stages.distill.targets_compute import prepare_targets

                ensure_ray(None)
                found = prepare_targets(distill, need.teacher, directory, data.sequences, StageContext())
                typer.echo(f"{stage.name}: teacher targets for {data.sequences:,} sequences at {found}")
