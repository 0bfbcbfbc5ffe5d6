"""Pipeline runs read back from MLflow: `compressor report`, `compare` and `runs`.

- runs.py: finding pipeline runs in an MLflow store and loading one (`PipelineRun`);
- figures.py: the figures (matplotlib PNGs);
- tables.py: the tables and the figures `runs` / `compare` line up;
- render.py: report.html / report.md and compare.html / compare.md."""

from compressor.report.figures import Plot, figures
from compressor.report.render import write_compare, write_report
from compressor.report.runs import (
    PipelineRun,
    client_for,
    default_tracking_uri,
    load_run,
    log_report,
    pipeline_runs,
    resolve_run_id,
    tracking_uri_for,
)
from compressor.report.tables import Best, comparison, fmt, fmt_params, headline_scores

__all__ = [
    "Best",
    "PipelineRun",
    "Plot",
    "client_for",
    "comparison",
    "default_tracking_uri",
    "figures",
    "fmt",
    "fmt_params",
    "headline_scores",
    "load_run",
    "log_report",
    "pipeline_runs",
    "resolve_run_id",
    "tracking_uri_for",
    "write_compare",
    "write_report",
]
