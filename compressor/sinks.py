"""Where a stage's numbers go. Stages write to a MetricsSink (handed to them in their StageContext); the tracker
(compressor/tracking.py) supplies one that logs to MLflow. Neither side imports the other."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


class MetricsSink:
    """The default drops everything (a standalone command); the tracker's logs to the stage's MLflow run."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None: ...
    def log_artifact(self, path: Path) -> None: ...

    def child(self, name: str, params: dict[str, Any]) -> MetricsSink:
        """A sink for a nested run under this one (e.g. one candidate of prune's shape search) with `params` logged;
        close it with `finish`. Without tracking, one that drops everything too."""
        return MetricsSink()

    def finish(self, status: str = "FINISHED") -> None:
        """End the run this sink logs to (a `child`); FINISHED or FAILED."""
