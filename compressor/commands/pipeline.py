"""`compressor run | validate | plan`: the pipeline commands."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from compressor.secrets import redact

DEFAULT_PIPELINE = "tiny"
PipelineArg = typer.Argument(
    None,
    help="Pipeline YAML, or the name of a pipeline shipped with compressor (default: the offline 'tiny' pipeline).",
    show_default=False,
)
OverridesArg = typer.Argument(None, help="KEY=VALUE overrides, e.g. stages.distill.steps=20 storage=/tmp/a")


def resolve_pipeline(pipeline: Optional[str]) -> Path:
    """A path, or the name of a pipeline embedded in the package (compressor/pipelines/NAME.yaml)."""
    if pipeline and (Path(pipeline).exists() or pipeline.endswith((".yaml", ".yml"))):
        return Path(pipeline)
    name = pipeline or DEFAULT_PIPELINE
    shipped = Path(str(resources.files("compressor") / "pipelines" / f"{name}.yaml"))
    return shipped if shipped.is_file() else Path(pipeline or name)


def _load(pipeline: Optional[str], overrides: Optional[list[str]]):
    from compressor.config.load import load_pipeline

    path = resolve_pipeline(pipeline)
    return path, load_pipeline(path, overrides or [])


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        pipeline: Optional[str] = PipelineArg,
        overrides: Optional[list[str]] = OverridesArg,
        address: Optional[str] = typer.Option(
            None, envvar="RAY_ADDRESS", help="Ray cluster to join; default: a local Ray on 127.0.0.1."
        ),
        tracking_uri: Optional[str] = typer.Option(
            None, help="MLflow tracking URI; default sqlite:///<storage>/mlflow.db."
        ),
        storage: Optional[str] = typer.Option(None, help="Override the pipeline's storage root."),
        summary_json: Optional[Path] = typer.Option(None, help="Also write the run summary as JSON here."),
        register: Optional[str] = typer.Option(
            None,
            "--register",
            metavar="NAME",
            help="Register the final model in MLflow's model registry as a new "
            "version of NAME, with the gate summary as its description (it points at the stage directory).",
        ),
        verbose: bool = typer.Option(
            False,
            "--verbose",
            "-v",
            help="Show libraries' output (warnings, their progress "
            "bars, Ray workers' lines) live; by default it goes to each stage's stage.log.",
        ),
    ) -> None:
        """Run a pipeline: stages in order, each evaluated and gated; finished stages are taken from the cache."""
        import json

        from compressor.orchestrator import Orchestrator, summary_dict
        from compressor.preflight import check_pipeline
        from compressor.raylocal import VERBOSE_ENV, quiet_driver_logs

        if verbose:
            os.environ[VERBOSE_ENV] = "1"  # read by this process and by local Ray workers (started after this)
        quiet_driver_logs()
        path, spec = _load(pipeline, overrides)
        check_pipeline(spec, path, storage)  # bad input is refused before Ray, MLflow or the storage are touched
        if spec.teacher.trust_remote_code:
            from compressor import remote_code

            remote_code.allow(spec.teacher.model, warn=False)  # this process, its local Ray workers, a cluster's job
        console = Console(stderr=True)
        from compressor import interrupt

        with interrupt.handled():  # issue 14: SIGTERM = Ctrl-C; distill stops after its step; exit 130, how to resume
            summary = Orchestrator(
                spec,
                path.read_text(),
                storage=storage,
                tracking_uri=tracking_uri,
                address=address,
                console=console,
                register=register,
            ).run()
        print_summary(summary, Console())
        if summary_json:
            summary_json.write_text(
                json.dumps(summary_dict(summary) | {"stage_seconds": summary.stage_seconds}, indent=2)
            )

    @app.command()
    def validate(pipeline: Optional[str] = PipelineArg, overrides: Optional[list[str]] = OverridesArg) -> None:
        """Check a pipeline YAML (schema, references, target shapes, storage, data files) without loading any model."""
        from compressor.planning import check_local_tasks, make_plan
        from compressor.preflight import check_pipeline

        path, spec = _load(pipeline, overrides)
        plan = make_plan(spec)
        check_local_tasks(spec.evaluation.tasks)
        check_pipeline(spec, path, plan=plan)  # storage writable with room, data files are text, gate metrics exist
        for stage in plan.stages:
            for warning in stage.warnings:
                Console(stderr=True).print(f"[yellow]warning:[/] {stage.name}: {warning}")
        typer.echo(f"{path}: ok ({len(spec.stages)} stages: {', '.join(s.name for s in plan.stages)})")

    @app.command()
    def plan(
        pipeline: Optional[str] = PipelineArg,
        overrides: Optional[list[str]] = OverridesArg,
        gpu: str = typer.Option("H100", help="GPU type for the estimates (see `compressor.estimate.GPU_TFLOPS`)."),
        mfu: float = typer.Option(0.4, min=0.01, max=1.0, help="Assumed model FLOPs utilisation."),
        storage: Optional[str] = typer.Option(None, help="Override the pipeline's storage root."),
    ) -> None:
        """Stages in order with resources, cache status, parameter counts and FLOP / GPU-hour estimates."""
        from compressor.planning import make_plan

        _, spec = _load(pipeline, overrides)
        print_plan(make_plan(spec, storage), gpu, mfu, Console())


def _fmt_params(n: Optional[float]) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _fmt_hours(hours: Optional[float]) -> str:
    return "-" if not hours else (f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}")


def print_plan(plan, gpu: str, mfu: float, console: Console) -> None:
    from compressor import estimate
    from compressor import stages as stage_kinds

    teacher_params = estimate.param_count(plan.teacher_config) if plan.teacher_config else None
    console.print(
        f"[bold]{plan.spec.name}[/]: teacher {plan.spec.teacher.model} ({_fmt_params(teacher_params)} params), "
        f"storage {redact(plan.pipeline_uri)}",
        soft_wrap=True,
    )
    table = Table(
        caption=f"FLOPs and GPU-hours: estimates for {gpu} at {mfu:.0%} MFU, evaluation not included",
        caption_justify="left",
    )
    for col in ("#", "stage", "resources", "cache", "params", "FLOPs", "GPU-h"):
        table.add_column(col, no_wrap=col not in ("stage", "resources"))
    total_hours = 0.0
    for i, stage in enumerate(plan.stages):
        spec, kind = stage.entry.spec, stage_kinds.get(stage.kind)
        resources_text = kind.describe_resources(spec, stage.entry.resources)
        flops = (
            estimate.stage_flops(stage.kind, spec, stage.in_config, stage.out_config, plan.spec)
            if stage.in_config
            else None
        )
        hours = estimate.gpu_hours(flops, gpu, mfu) if flops else None
        total_hours += hours or 0.0
        params_in = _fmt_params(estimate.param_count(stage.in_config) if stage.in_config else None)
        params_out = _fmt_params(estimate.param_count(stage.out_config) if stage.out_config else None)
        table.add_row(
            str(i),
            stage.name if stage.name == stage.kind else f"{stage.name} ({stage.kind})",
            resources_text,
            "[green]cached[/]"
            if stage.cached
            else f"[yellow]kept in {stage.held[0]}/: re-gate[/]"
            if stage.held
            else "to run",
            params_in if params_in == params_out else f"{params_in} -> {params_out}",
            f"{flops:.2e}" if flops else "-",
            _fmt_hours(hours),
        )
    console.print(table)
    console.print(f"total: {_fmt_hours(total_hours)} {gpu}-hours")
    for stage in plan.stages:
        for line in stage_kinds.get(stage.kind).plan_notes(plan, stage):
            console.print(line, soft_wrap=True)
    for stage in plan.stages:
        for warning in stage.warnings:
            console.print(f"[yellow]warning:[/] {stage.name}: {warning}")


def print_summary(summary, console: Console) -> None:
    """One screen: a row per stage (teacher baseline first) with size, time, each task's gated metrics (else its
    main metric) and the gate. Columns are in a fixed order (by task, then metric); a quantized model shows its real
    parameter count and its bits."""
    from compressor.evaluation import primary_metric
    from compressor.gates import lookup
    from compressor.tracking import stage_records, teacher_record

    gates = {"passed": "pass", "warned": "warn", "none": "-"}
    rows = (
        [{**teacher_record(summary), "status": "baseline", "gate_verdict": "none", "seconds": None}]
        if summary.baseline
        else []
    )
    rows += stage_records(summary)
    gated = {
        tuple(lookup(r["scores"], key)[0].split(".", 1))
        for e in summary.plan.spec.stages
        if e.gate
        for key in e.gate.metrics
        for r in rows
        if r["scores"]
    }
    metrics = sorted(
        gated
        | {
            (t, primary_metric(t, v))
            for r in rows
            for t, v in (r["scores"] or {}).items()
            if not any(g[0] == t for g in gated)
        }
    )
    table = Table(title=f"{summary.plan.spec.name}: {summary.seconds:.1f}s", title_justify="left")
    for col in ("stage", "status", "params", "MB", "s", *(f"{t}\n{m}" for t, m in metrics), "gate"):
        table.add_column(col)
    for r in rows:
        scores = r["scores"] or {}
        values = [f"{scores[t][m]:.4g}" if m in scores.get(t, {}) else "-" for t, m in metrics]
        params = _fmt_params(r["num_params"]) + (f" ({r['bits']}-bit)" if r.get("bits") else "")
        table.add_row(
            r["name"],
            r["status"],
            params,
            f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-",
            f"{r['seconds']:.1f}" if r["seconds"] else "-",
            *values,
            gates[r["gate_verdict"]],
        )
    console.print(table)
    final = next((r for r in reversed(rows) if r.get("model_uri")), None)
    if final:
        console.print(f"final model: {redact(final['model_uri'])}", soft_wrap=True)
    note = "" if summary.parent_run_id else "   (all stages cached: nothing new logged)"
    tracking_uri = redact(summary.tracking_uri)  # a server URI may carry a password or token
    console.print(f"MLflow: mlflow ui --backend-store-uri {tracking_uri}{note}", soft_wrap=True)
    if summary.parent_run_id:
        console.print(
            f"report: compressor report {summary.parent_run_id} --tracking-uri {tracking_uri}", soft_wrap=True
        )
