"""`compressor report | compare | runs`: finished pipeline runs read back from MLflow."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

TrackingOption = typer.Option(
    None,
    "--tracking-uri",
    help="MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///./artifacts/mlflow.db (where `run` logs).",
)
RunHelp = "An MLflow run id (a pipeline run or one of its stage runs) or a stage directory."


def register(app: typer.Typer) -> None:
    @app.command()
    def report(
        run: Optional[str] = typer.Argument(
            None, help=RunHelp + " Default: the latest finished pipeline run.", show_default=False
        ),
        tracking_uri: Optional[str] = TrackingOption,
        out: Optional[Path] = typer.Option(None, help="Output directory; default ./reports/<pipeline>-<run8>."),
    ) -> None:
        """A pipeline run as report.html (self-contained) and report.md, with plots; also logged to the run."""
        from compressor import report as rep

        uri = rep.tracking_uri_for(run, tracking_uri)
        client = rep.client_for(uri)
        run_id = rep.resolve_run_id(client, run, uri)
        data = rep.load_run(client, run_id)
        out = out or Path("reports") / f"{data.pipeline}-{run_id[:8]}"
        html_path, md_path, plots = rep.write_report(data, out)
        rep.log_report(client, run_id, out)
        console = Console()
        console.print(
            f"{data.pipeline} run {run_id}: {html_path} and {md_path} "
            f"({len(plots)} figures; logged to the run under report/)",
            soft_wrap=True,
        )

    @app.command()
    def compare(
        runs: list[str] = typer.Argument(..., help="Two or more pipeline runs: " + RunHelp, show_default=False),
        tracking_uri: Optional[str] = TrackingOption,
        out: Optional[Path] = typer.Option(None, help="Output directory; default ./reports/compare-<run8>-<run8>..."),
    ) -> None:
        """Pipeline runs side by side: settings that differ, final figures, overlaid plots (compare.html/.md)."""
        from compressor import report as rep
        from compressor.errors import UserError

        if len(runs) < 2:
            raise UserError("compare: give at least two runs (`compressor runs` lists them)")
        uri = rep.tracking_uri_for(runs[0], tracking_uri)
        client = rep.client_for(uri)
        loaded = [rep.load_run(client, rep.resolve_run_id(client, ref, uri)) for ref in runs]
        for letter, run in zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", loaded):
            run.label = f"{letter}: {run.pipeline} {run.run_id[:8]}"
        out = out or Path("reports") / ("compare-" + "-".join(r.run_id[:8] for r in loaded))
        html_path, md_path, _ = rep.write_compare(loaded, out)
        (header, settings, _), (_, finals, classes) = rep.comparison(loaded)
        console = Console()
        print_table(console, "settings that differ", header, settings, ["diff"] * len(settings))
        print_table(console, "final figures (best in bold)", header, finals, classes)
        console.print(f"{html_path} and {md_path}", soft_wrap=True)

    @app.command(name="runs")
    def runs_command(
        tracking_uri: Optional[str] = TrackingOption,
        limit: int = typer.Option(20, min=1, help="How many runs, newest first."),
    ) -> None:
        """Recent pipeline runs with their final figures, newest first."""
        from compressor import report as rep

        uri = tracking_uri or rep.default_tracking_uri()
        found = rep.pipeline_runs(rep.client_for(uri), limit=limit)
        Console().print(runs_table(found, uri))


def print_table(console: Console, title: str, header: list[str], rows: list[list], classes: list[str]) -> None:
    from compressor.report import Best

    if not rows:
        console.print(f"{title}: none")
        return
    table = Table(title=title, title_justify="left")
    for col in header:
        table.add_column(col, overflow="fold")
    for row, cls in zip(rows, classes):
        cells = [f"[bold green]{c}[/]" if isinstance(c, Best) else str(c) for c in row]
        table.add_row(*cells, style="yellow" if cls == "diff" else None)
    console.print(table)


def runs_table(found: list, uri: str) -> Table:
    from compressor.report import fmt, fmt_params, headline_scores

    columns = sorted({name for run in found for name in headline_scores(run.data.metrics)})
    table = Table(title=f"pipeline runs in {uri}", title_justify="left")
    for col in ("run", "pipeline", "started", "status", "gate", "params", "MB", "x smaller", *columns, "s"):
        table.add_column(col, no_wrap=col in ("run", "started"))
    for run in found:
        m, tags = run.data.metrics, run.data.tags
        values = headline_scores(m)
        started = datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        bits = f" ({m['final/bits']:.0f}-bit)" if "final/bits" in m else ""
        table.add_row(
            run.info.run_id,
            tags.get("compressor.pipeline", "-"),
            started,
            run.info.status + (" (cached)" if tags.get("cached") == "true" else ""),  # reused every stage
            tags.get("gate", "-"),
            fmt_params(m.get("final/num_params")) + bits,
            fmt(m["final/bytes"] / 1e6, ".2f") if "final/bytes" in m else "-",
            fmt(m.get("final/byte_compression"), ".2f"),
            *[fmt(values.get(c)) for c in columns],
            fmt(m.get("seconds/wall"), ".0f"),
        )
    return table
