"""`compressor run | validate | plan`: the pipeline commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from compressor import storage as storage_mod
from compressor.secrets import redact

DEFAULT_PIPELINE = "tiny"
PipelineArg = typer.Argument(
    None,
    help="Pipeline YAML, or the name of a pipeline shipped with compressor (default: the offline 'tiny' pipeline).",
    show_default=False,
)
OverridesArg = typer.Argument(None, help="KEY=VALUE overrides, e.g. stages.distill.steps=20 storage=/tmp/a")


def resolve_pipeline(pipeline: Optional[str]) -> Path:
    """A path, or the name of a pipeline shipped in the package (compressor/pipelines/NAME.yaml, `compressor recipes`)."""
    from compressor.commands.recipes import find

    if pipeline and (
        Path(pipeline).exists() or pipeline.endswith((".yaml", ".yml")) or Path(pipeline).name != pipeline
    ):
        return Path(pipeline)  # a path (a missing one is named by load_pipeline's error)
    return find(pipeline or DEFAULT_PIPELINE, "no such file, nor a pipeline shipped with compressor")


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
        from compressor.ray_runtime import VERBOSE_ENV, quiet_driver_logs

        if verbose:
            os.environ[VERBOSE_ENV] = "1"  # read by this process and by local Ray workers (started after this)
        quiet_driver_logs()
        path, spec = _load(pipeline, overrides)
        with storage_mod.credentials(storage or spec.storage):
            from compressor.planning import make_plan

            plan = make_plan(spec, storage)
            check_pipeline(spec, path, storage, plan)  # bad input is refused before Ray, MLflow or storage are touched
        for model in (spec.teacher, spec.student):
            if model is not None and model.trust_remote_code:
                from compressor import remote_code

                remote_code.allow(model.model, warn=False)  # this process, its local Ray workers, a cluster's job
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
                overrides=overrides or (),
                plan=plan,
            ).run()
        print_summary(summary, Console())
        if summary_json:
            summary_json.write_text(
                json.dumps(summary_dict(summary) | {"stage_seconds": summary.stage_seconds}, indent=2)
            )
        if (ray := sys.modules.get("ray")) is not None and ray.is_initialized():
            ray.shutdown()  # now: Ray's own exit hook first sleeps 0.5 s for output the workers no longer send here

    @app.command()
    def validate(
        pipeline: Optional[str] = PipelineArg,
        overrides: Optional[list[str]] = OverridesArg,
        print_yaml: bool = typer.Option(
            False, "--print", help="Print the resolved pipeline (overrides applied, defaults filled in) as YAML."
        ),
    ) -> None:
        """Check a pipeline YAML (schema, references, target shapes, storage, data files) without loading any model."""
        from compressor.planning import check_local_tasks, make_plan
        from compressor.preflight import check_pipeline

        path, spec = _load(pipeline, overrides)
        with storage_mod.credentials(spec.storage):
            plan = make_plan(spec)
            check_local_tasks(spec.evaluation.tasks)
            check_pipeline(spec, path, plan=plan)  # storage writable with room, data files are text, gate metrics
        for stage in plan.stages:
            for warning in stage.warnings:
                Console(stderr=True).print(f"[yellow]warning:[/] {stage.name}: {warning}")
        if print_yaml:  # stdout is the YAML alone, for scripts; no Optional field defaults to a value: nulls go
            import yaml

            typer.echo(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False), nl=False)
        typer.echo(f"{path}: ok ({len(spec.stages)} stages: {', '.join(s.name for s in plan.stages)})", err=print_yaml)

    @app.command()
    def plan(
        pipeline: Optional[str] = PipelineArg,
        overrides: Optional[list[str]] = OverridesArg,
        gpu: str = typer.Option("H100", help="GPU type for the estimates (see `compressor.estimate.GPU_TFLOPS`)."),
        mfu: float = typer.Option(0.4, min=0.01, max=1.0, help="Assumed model FLOPs utilisation."),
        storage: Optional[str] = typer.Option(None, help="Override the pipeline's storage root."),
        as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (for scripts) instead of a table."),
    ) -> None:
        """Stages in order with resources, cache status, parameter counts and FLOP / GPU-hour estimates."""
        import json

        from compressor.planning import make_plan

        _, spec = _load(pipeline, overrides)
        with storage_mod.credentials(storage or spec.storage):
            made = make_plan(spec, storage)
        if as_json:
            typer.echo(json.dumps(plan_dict(made, gpu, mfu), indent=2))
        else:
            print_plan(made, gpu, mfu, Console())


def _fmt_params(n: Optional[float]) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _fmt_hours(hours: Optional[float]) -> str:
    return "-" if not hours else (f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}")


def _fmt_wall(hours: Optional[float]) -> str:
    return "-" if not hours else f"{hours:,.0f} h" if hours >= 10 else f"{hours:.2g} h"


def stage_gpus(stage) -> float:
    """GPUs a stage holds while it runs: distill's workers x gpus_per_worker, else its Ray task's num_gpus."""
    spec = stage.entry.spec
    if hasattr(spec, "workers") and hasattr(spec, "gpus_per_worker"):
        return spec.workers * spec.gpus_per_worker
    return stage.entry.resources.num_gpus


def plan_dict(plan, gpu: str, mfu: float) -> dict:
    """The plan as data: what `plan` prints and `plan --json` emits. GPU-hours are left out (None) for a stage that
    runs on CPUs only (an H100 estimate says nothing of it); wall-hours divide GPU-hours by the stage's GPUs."""
    from compressor import contract as stage_kinds
    from compressor import estimate

    def params(config: dict) -> Optional[int]:
        return estimate.param_count(config) if config else None

    stages = []
    for i, stage in enumerate(plan.stages):
        spec, kind = stage.entry.spec, stage_kinds.get(stage.kind)
        flops = (
            stage_kinds.stage_flops(
                stage.kind, spec, stage.in_config, stage.out_config, plan.spec, derived=stage.derived
            )
            if stage.in_config
            else None
        )
        gpus = stage_gpus(stage)
        hours = estimate.gpu_hours(flops, gpu, mfu) if flops and gpus else None
        stages.append(
            {
                "index": i,
                "name": stage.name,
                "kind": stage.kind,
                "resources": kind.describe_resources(spec, stage.entry.resources),
                "gpus": gpus,
                "cache": "cached" if stage.cached else f"kept in {stage.held[0]}" if stage.held else "to run",
                "uri": redact(stage.uri),
                "params_in": params(stage.in_config),
                "params_out": params(stage.out_config),
                "flops": flops,
                "gpu_hours": hours,
                "wall_hours": hours / gpus if hours else None,
                "warnings": list(stage.warnings),
                "notes": [str(line) for line in kind.plan_notes(plan, stage)],
            }
        )
    hours = [s["gpu_hours"] for s in stages if s["gpu_hours"]]
    return {
        "pipeline": plan.spec.name,
        "teacher": {"model": plan.spec.teacher.model, "params": params(plan.teacher_config)},
        "storage": redact(plan.pipeline_uri),
        "gpu": gpu,
        "mfu": mfu,
        "stages": stages,
        "gpu_hours": sum(hours) if hours else None,
        "wall_hours": sum(s["wall_hours"] for s in stages if s["wall_hours"]) if hours else None,
    }


def print_plan(plan, gpu: str, mfu: float, console: Console) -> None:
    data = plan_dict(plan, gpu, mfu)
    console.print(
        f"[bold]{data['pipeline']}[/]: teacher {data['teacher']['model']} ({_fmt_params(data['teacher']['params'])} "
        f"params), storage {data['storage']}",
        soft_wrap=True,
    )
    table = Table(
        caption=f"FLOPs and GPU-hours: estimates for {gpu} at {mfu:.0%} MFU, evaluation not included; "
        "(wall-clock hours) on a stage's GPUs",
        caption_justify="left",
    )
    for col in ("#", "stage", "resources", "cache", "params", "FLOPs", "GPU-h"):
        table.add_column(col, no_wrap=col not in ("stage", "resources"))
    cache = {"cached": "[green]cached[/]", "to run": "to run"}
    for stage in data["stages"]:
        params_in, params_out = _fmt_params(stage["params_in"]), _fmt_params(stage["params_out"])
        table.add_row(
            str(stage["index"]),
            stage["name"] if stage["name"] == stage["kind"] else f"{stage['name']} ({stage['kind']})",
            stage["resources"],
            cache.get(stage["cache"], f"[yellow]{stage['cache']}/: re-gate[/]"),
            params_in if params_in == params_out else f"{params_in} -> {params_out}",
            f"{stage['flops']:.2e}" if stage["flops"] else "-",
            "CPU"
            if not stage["gpus"]
            else _fmt_hours(stage["gpu_hours"]) + (f" ({_fmt_wall(stage['wall_hours'])})" if stage["gpus"] > 1 else ""),
        )
    console.print(table)
    if data["gpu_hours"]:
        widest = max(data["stages"], key=lambda s: s["gpus"])
        console.print(
            f"total: {_fmt_hours(data['gpu_hours'])} {gpu}-hours, about {_fmt_wall(data['wall_hours'])} of wall-clock "
            f"({widest['name']} on {widest['gpus']:g} GPU{'s' if widest['gpus'] != 1 else ''})"
        )
    else:
        console.print("total: every stage runs on CPUs (set resources.num_gpus or gpus_per_worker for GPU estimates)")
    for stage in data["stages"]:
        for line in stage["notes"]:
            console.print(line, soft_wrap=True)
    for stage in data["stages"]:
        for warning in stage["warnings"]:
            console.print(f"[yellow]warning:[/] {stage['name']}: {warning}")


def _summary_tables(title: str, rows: list[dict], metrics: list[tuple[str, str]], width: int) -> list[Table]:
    """One table, a row per stage; where its metric columns do not fit the console (80 columns, long names such as
    ref_ppl bits_per_byte), the stages' sizes and gates first, then the metrics with a column per stage."""
    gates = {"passed": "pass", "warned": "warn", "none": "-"}

    def cells(r: dict) -> tuple[list[str], list[str]]:
        scores = r["scores"] or {}
        params = _fmt_params(r["num_params"]) + (f" ({r['bits']}-bit)" if r.get("bits") else "")
        size = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-"
        seconds = f"{r['seconds']:.1f}" if r["seconds"] else "-"
        values = [f"{scores[t][m]:.4g}" if m in scores.get(t, {}) else "-" for t, m in metrics]
        return [r["name"], r["status"], params, size, seconds], values + [gates[r["gate_verdict"]]]

    wide = Table(title=title, title_justify="left")
    for col in ("stage", "status", "params", "MB", "s", *(f"{t}\n{m}" for t, m in metrics), "gate"):
        wide.add_column(col, no_wrap=True)
    for r in rows:
        head, tail = cells(r)
        wide.add_row(*head, *tail)
    measuring = Console(width=10_000)  # its natural width, not the one it would be squeezed into
    if Measurement.get(measuring, measuring.options, wide).maximum <= width:
        return [wide]
    stages = Table(title=title, title_justify="left")
    for col in ("stage", "status", "params", "MB", "s", "gate"):
        stages.add_column(col)
    scores = Table(title="scores", title_justify="left")
    scores.add_column("metric", overflow="fold")
    for r in rows:
        head, tail = cells(r)
        stages.add_row(*head, tail[-1])
        scores.add_column(r["name"], overflow="fold")
    for i, (t, m) in enumerate(metrics):
        scores.add_row(f"{t} {m}", *[cells(r)[1][i] for r in rows])
    return [stages, scores]


def _print_distillation(baseline, rows: list[dict], console: Console) -> None:
    """The distillation table of each stage that trained a hard-label control (compressor/recovery.py)."""
    from compressor.recovery import CONTROL, distillation_rows, table

    for r in rows:
        found = distillation_rows(baseline, r)
        if not found:
            continue
        control = r["references"][CONTROL]
        out = Table(
            title=f"distillation: {r['name']} (hard labels: the same student, {control['steps']} steps on "
            f"{control['data']} alone)",
            title_justify="left",
        )
        header, cells = table(found)
        for col in header:
            out.add_column(col, overflow="fold")
        for row in cells:
            out.add_row(*row)
        console.print(out)


def print_summary(summary, console: Console) -> None:
    """One screen: a row per stage (teacher baseline first) with size, time, each task's gated metrics (else its
    main metric) and the gate. Columns are in a fixed order (by task, then metric); a quantized model shows its real
    parameter count and its bits."""
    from compressor.evaluation import primary_metric
    from compressor.gates import lookup
    from compressor.records import teacher_record

    rows = (
        [{**teacher_record(summary), "status": "baseline", "gate_verdict": "none", "seconds": None}]
        if summary.baseline
        else []
    )
    rows += summary.records
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
    title = f"{summary.plan.spec.name}: {summary.seconds:.1f}s"
    for table in _summary_tables(title, rows, metrics, console.width):
        console.print(table)
    _print_distillation(summary.baseline, rows, console)
    final = next((r for r in reversed(rows) if r.get("model_uri")), None)
    if final:
        console.print(f"final model: {redact(final['model_uri'])}", soft_wrap=True)
    tracking_uri = redact(summary.tracking_uri)  # a server URI may carry a password or token
    if "://" in summary.tracking_uri and not summary.tracking_uri.startswith(("sqlite:", "file:")):
        console.print(f"MLflow: {tracking_uri}", soft_wrap=True)  # a server: open it
    else:  # job execution off: 2 processes instead of 9 (about 2 GB less)
        console.print(
            f"MLflow: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {tracking_uri}",
            soft_wrap=True,
        )
    if summary.experiment_id:  # MLflow 3 keeps "GenAI" or "Model training" per browser: the address picks the latter
        base = tracking_uri.rstrip("/") if tracking_uri.startswith("http") else "http://127.0.0.1:5000"
        console.print(
            f"  then open {base}/#/experiments/{summary.experiment_id}/runs?workflowType=machine_learning",
            soft_wrap=True,
        )
    if summary.parent_run_id:
        console.print(
            f"report: compressor report {summary.parent_run_id} --tracking-uri {tracking_uri}", soft_wrap=True
        )
