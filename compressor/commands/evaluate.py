"""`compressor eval`: lm-eval tasks on a checkpoint directory (or a zoo model), as a table and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from compressor.errors import UserError


def parse_tasks(tasks: str, include: Optional[str], limit: Optional[float]):
    from compressor.config.schema import TaskSpec

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks: give at least one task name, e.g. --tasks ref_ppl,ref_next")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit: {limit} must be positive (docs per task, or a fraction below 1)")
    return [TaskSpec(name=n, include=include, limit=limit) for n in names]


def parse_batch_size(value: str) -> int | str:
    """--batch-size: a positive integer or "auto"."""
    if value == "auto":
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise UserError(f'--batch-size {value!r}: give a positive number of sequences, or "auto"')


def resolve(model: str, include: Optional[str]) -> tuple[str, Optional[str]]:
    """(checkpoint dir, include). `zoo:NAME` builds/finds the model and defaults --include to its tasks."""
    from compressor.models import zoo_name

    if (name := zoo_name(model)) is not None:
        from compressor.models import zoo

        return str(zoo.ensure_model(name)), include or model
    if not (Path(model).expanduser() / "config.json").is_file():
        raise UserError(
            f"--model {model!r}: no config.json there; give a Hugging Face checkpoint directory or zoo:NAME"
        )
    return str(Path(model).expanduser()), include


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        model: str = typer.Option(..., "--model", help="Checkpoint directory, or zoo:NAME."),
        tasks: str = typer.Option("ref_ppl,ref_next", "--tasks", help="Comma-separated lm-eval task names."),
        include: Optional[str] = typer.Option(
            None, "--include", help="Directory of task YAMLs, or zoo:NAME (default for a zoo model: its own tasks)."
        ),
        batch_size: str = typer.Option("16", "--batch-size", help='Sequences per forward pass, or "auto".'),
        limit: Optional[float] = typer.Option(None, "--limit", help="Docs per task (or a fraction below 1)."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
        output: Optional[Path] = typer.Option(None, "--output", help="Also write {task: {metric: value}} here."),
    ) -> None:
        """Evaluate a model with lm-eval (offline for local tasks) and print a table of the scores."""
        from rich.console import Console
        from rich.table import Table

        from compressor.evaluation import STDERR_SUFFIX, evaluate, higher_is_better, primary_metric

        model_dir, include = resolve(model, include)
        results = evaluate(
            model_dir, parse_tasks(tasks, include, limit), batch_size=parse_batch_size(batch_size), device=device
        )
        table = Table(title=f"{model}", title_justify="left")
        for col in ("task", "metric", "value", "stderr", "better"):
            table.add_column(col)
        for task, metrics in results.items():
            main = primary_metric(task, metrics) if metrics else None
            for metric, value in metrics.items():
                if metric.endswith(STDERR_SUFFIX):
                    continue
                name = f"[bold]{metric}[/]" if metric == main else metric
                stderr = metrics.get(metric + STDERR_SUFFIX)
                table.add_row(
                    task,
                    name,
                    f"{value:.4f}",
                    "-" if stderr is None else f"±{stderr:.4f}",
                    "higher" if higher_is_better(metric) else "lower",
                )
        Console().print(table)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
