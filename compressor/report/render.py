"""report.html / report.md of one run and compare.html / compare.md of several: the tables and figures rendered.
The HTML embeds the PNGs (base64), so it is one self-contained file; the Markdown links the PNG files beside it."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Optional

from compressor.report.figures import Plot, figures
from compressor.report.runs import PipelineRun
from compressor.report.tables import Best, comparison, distillation_tables, metric_table, stage_table

CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222} h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left} tr.diff td{background:#fff4b8}
.best{font-weight:bold;color:#06743a} .gate{font-size:82%;color:#555} .FAIL{color:#b00020;font-weight:bold}
.runs{display:flex;gap:2.5em;flex-wrap:wrap} img{max-width:100%} dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}
dt{color:#666}"""


def _cell_html(cell) -> str:
    if isinstance(cell, Best):
        return f"<b class='best'>{html.escape(cell)}</b>"
    if not isinstance(cell, list):
        return html.escape(str(cell))
    first, gates = cell[0], cell[1:]
    return "<br>".join(
        [html.escape(first)] + [f'<span class="gate {g.split(":")[0]}">{html.escape(g)}</span>' for g in gates]
    )


def html_table(header: list[str], rows: list[list], classes: Optional[list[str]] = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f'<tr class="{(classes or [""] * len(rows))[i]}">' + "".join(f"<td>{_cell_html(c)}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(c) -> str:
        text = "<br>".join(c) if isinstance(c, list) else (f"**{c}**" if isinstance(c, Best) else str(c))
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def _facts(run: PipelineRun) -> list[tuple[str, str]]:
    return [
        ("pipeline", run.pipeline),
        ("MLflow run", run.run_id),
        ("started", run.started),
        ("status", f"{run.status}, gates {run.tags.get('gate', '-')}"),
        ("teacher", run.teacher.get("model", "-")),
        ("final model", run.tags.get("final_model", "-")),
        ("wall seconds", f"{run.seconds:.1f}"),
    ]


def _page(title: str, parts: list[str]) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>"
    )


def _figures_html(plots: list[Plot]) -> list[str]:
    return [
        f"<h2>{html.escape(p.title)}</h2><img alt='{p.name}' src='data:image/png;base64,"
        f"{base64.b64encode(p.png).decode()}'>"
        for p in plots
    ]


def _write_plots(plots: list[Plot], out: Path) -> None:
    for plot in plots:
        (out / f"{plot.name}.png").write_bytes(plot.png)
        (out / f"{plot.name}.json").write_text(json.dumps(plot.data, indent=1))


def write_report(run: PipelineRun, out: Path) -> tuple[Path, Path, list[Plot]]:
    """report.html (self-contained), report.md and the PNGs (with the plotted numbers as JSON) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plots = figures([run])
    _write_plots(plots, out)
    stages, metrics = stage_table(run), metric_table(run)
    distillation = distillation_tables(run)
    facts = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in _facts(run))
    page = _page(
        f"{run.pipeline}: pipeline run {run.run_id[:8]}",
        [
            f"<dl>{facts}</dl><h2>Stages</h2>",
            html_table(*stages),
            "<h2>Evaluation (value ± stderr; gate bars and verdicts below)</h2>",
            html_table(*metrics),
            *[part for title, t in distillation for part in (f"<h2>{html.escape(title)}</h2>", html_table(*t))],
            *_figures_html(plots),
        ],
    )
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(page)
    md = [
        f"# {run.pipeline}: pipeline run {run.run_id[:8]}",
        "",
        *[f"- **{k}**: {v}" for k, v in _facts(run)],
        "",
        "## Stages",
        "",
        md_table(*stages),
        "",
        "## Evaluation",
        "",
        md_table(*metrics),
        "",
        *[line for title, t in distillation for line in (f"## {title}", "", md_table(*t), "")],
    ]
    md += [line for p in plots for line in (f"## {p.title}", "", f"![{p.title}]({p.name}.png)", "")]
    md_path.write_text("\n".join(md))
    return html_path, md_path, plots


def write_compare(runs: list[PipelineRun], out: Path) -> tuple[Path, Path, list[Plot]]:
    """compare.html (overlaid plots, differences highlighted, each run's tables side by side) and compare.md."""
    out.mkdir(parents=True, exist_ok=True)
    plots = figures(runs)
    _write_plots(plots, out)
    (h, settings, s_classes), (_, finals, f_classes) = comparison(runs)
    side = "".join(
        f"<div><h3>{html.escape(r.label)}</h3>{html_table(*stage_table(r))}{html_table(*metric_table(r))}</div>"
        for r in runs
    )
    title = "compare: " + " vs ".join(r.label for r in runs)
    page = _page(
        title,
        [
            "<h2>Settings that differ</h2>",
            html_table(h, settings, s_classes) if settings else "<p>none: the runs share every setting</p>",
            "<h2>Final figures (best in bold, differing rows highlighted)</h2>",
            html_table(h, finals, f_classes),
            *_figures_html(plots),
            f"<h2>Each run</h2><div class='runs'>{side}</div>",
        ],
    )
    html_path, md_path = out / "compare.html", out / "compare.md"
    html_path.write_text(page)
    md = [
        f"# {title}",
        "",
        "## Settings that differ",
        "",
        md_table(h, settings) if settings else "none",
        "",
        "## Final figures (best in bold)",
        "",
        md_table(h, finals),
        "",
    ]
    md += [line for p in plots for line in (f"## {p.title}", "", f"![{p.title}]({p.name}.png)", "")]
    for r in runs:
        md += [f"## {r.label}", "", md_table(*stage_table(r)), "", md_table(*metric_table(r)), ""]
    md_path.write_text("\n".join(md))
    return html_path, md_path, plots
