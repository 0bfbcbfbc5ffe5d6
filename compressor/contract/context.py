"""StageContext: all a stage may know of the outside world. It is picklable so it rides into Ray tasks.

A stage writes its checkpoint into `ctx.model_dir` (inside a private temp dir the orchestrator
publishes atomically), reports numbers through `ctx.log_*`, and shows progress with `ctx.progress`.
It never imports Ray or MLflow itself (distill uses Ray Train, which is its job, and gets
`ctx.storage_path` / `ctx.run_name` for it)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from compressor.contract.spec import Resources
from compressor.manifest import ModelRef

if TYPE_CHECKING:  # the pipeline schema imports the stage kinds, which import this module
    from compressor.config.schema import DataSource, TaskSpec

T = TypeVar("T")


class MetricsSink:
    """Where a stage's numbers go (StageContext.sink). This one drops everything (a standalone command); in a
    pipeline the tracker hands the stage compressor.tracking.MlflowSink, which logs to the stage's MLflow run."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None: ...
    def log_artifact(self, path: Path) -> None: ...

    def child(self, name: str, params: dict[str, Any]) -> MetricsSink:
        """A sink for a nested run under this one (e.g. one candidate of prune's shape search) with `params` logged;
        close it with `finish`. Without tracking, one that drops everything too."""
        return MetricsSink()

    def finish(self, status: str = "FINISHED") -> None:
        """End the run this sink logs to (a `child`); FINISHED or FAILED."""


@dataclass
class StageContext:
    # Private scratch dir on the node that runs the stage, set there by runner.execute_stage; published to
    # <storage>/<pipeline>/pending/<stage>-<key12> once the stage returns.
    work_dir: Optional[Path] = None
    teacher: Optional[ModelRef] = None
    # The teacher as the pipeline names it (zoo:, a storage URI, a hub id, a shared path): the runner replaces
    # `teacher` by a copy on the stage's node, which Ray workers elsewhere cannot read; hand them this one.
    shared_teacher: Optional[ModelRef] = None
    data: dict[str, DataSource] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    seed: int = 0
    storage_path: str = ""  # pipeline storage root (Ray Train storage_path)
    data_root: str = ""  # where token shards are kept: <storage>/_data, a path or a storage URI
    run_name: str = ""  # stable name for resumable training: "<pipeline>-<stage>-<key12>"
    sink: MetricsSink = field(default_factory=MetricsSink)
    quiet: bool = False
    # The figures the plan derived for this stage (StageKind.derived): the run reads them rather than deriving
    # them again. A standalone command, which has no plan, derives them before the run (compressor.runner).
    planned: dict[str, int] = field(default_factory=dict)
    ray_address: Optional[str] = None
    tasks: list[TaskSpec] = field(default_factory=list)  # the pipeline's evaluation tasks (evaluate stage)
    eval_batch_size: int | str = 16  # or "auto" (lm-eval finds the largest that fits)
    # In pipeline runs, a ray.util.queue.Queue the driver drains (DriverProgress): `info` and `progress` go there, one
    # progress line per stage on the console, whichever node the stage runs on. None (the stage CLIs) prints here.
    progress_queue: Any = None
    # Where the runner publishes this stage (a pipeline's pending/<stage>-<key12>): a stage keeps resumable work
    # beside it (generate's committed answers), found again by a re-run with the same key.
    publish_uri: str = ""

    @property
    def model_dir(self) -> Path:
        path = Path(self.work_dir) / "model"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_params(self, params: dict[str, Any]) -> None:
        self.sink.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.sink.log_metrics(metrics, step)

    def log_artifact(self, path: Path) -> None:
        self.sink.log_artifact(Path(path))

    def child_sink(self, name: str, params: dict[str, Any]) -> MetricsSink:
        """A nested run under the stage's (MLflow in pipelines; dropped otherwise) for one part of its work, e.g. a
        candidate of prune's shape search. End it with `.finish()`."""
        return self.sink.child(name, params)

    def save_json_artifact(self, name: str, payload: Any) -> Path:
        """Write JSON next to the model (kept with the stage output) and log it as an artifact."""
        path = Path(self.work_dir) / name
        path.write_text(json.dumps(payload, indent=2))
        self.log_artifact(path)
        return path

    def info(self, message: str) -> None:
        if self.quiet:
            return
        if self.progress_queue is not None and self._send(("info", message)):
            return
        print(message, file=sys.stderr, flush=True)

    def progress(self, items: Iterable[T], total: Optional[int] = None, desc: str = "") -> Iterator[T]:
        """Wrap an iterable with a progress bar: tqdm here, or (pipeline runs) the stage's line on the driver's console,
        updated at most once a second."""
        if self.progress_queue is None:
            from tqdm.auto import tqdm

            yield from tqdm(items, total=total, desc=desc, disable=self.quiet, file=sys.stderr, mininterval=1.0)
            return
        if total is None and hasattr(items, "__len__"):
            total = len(items)
        done, sent = 0, 0.0
        for item in items:
            yield item
            done += 1
            if time.monotonic() - sent >= 1.0:
                self._send(("progress", desc, done, total))
                sent = time.monotonic()
        self._send(("progress", desc, done, total))

    def _send(self, message: tuple) -> bool:
        try:
            self.progress_queue.put(message, timeout=5)
            return True
        except Exception:  # noqa: BLE001  (the driver's queue is gone: the stage goes on without a progress line)
            return False

    @property
    def shards_root(self) -> str:
        """Where token shards are kept: `data_root`, else `_data` beside the work dir."""
        return self.data_root or str(Path(self.work_dir).expanduser().resolve().parent / "_data")

    def data_source(self, name: Optional[str]) -> DataSource:
        from compressor.errors import UserError

        if name is None:
            if len(self.data) == 1:
                return next(iter(self.data.values()))
            raise UserError(
                "this stage needs a data source: set `calibration`/`data` to one of the pipeline's `data:` names"
            )
        if name not in self.data:
            raise UserError(f"unknown data source {name!r}; known: {', '.join(self.data) or 'none'}")
        return self.data[name]


POLL_S = 0.5  # how often the driver shows a running stage's progress


class DriverProgress:
    """The driver's view of one running stage: drains its `progress_queue` into one rich progress line with ETA on a
    terminal, or (no TTY, e.g. CI) into one plain line every `interval` seconds; `info` messages print as they come."""

    def __init__(self, console, label: str, queue, interval: float = 30.0):
        self.console, self.label, self.queue, self.interval = console, label, queue, interval
        self.start = time.monotonic()
        self.last_line = self.start
        self.state: Optional[tuple] = None  # (desc, done, total)
        self.bar = None

    def wait(self, finished) -> None:
        """Drain until `finished(timeout)` is true, then whatever is left. `finished` blocks up to `timeout` seconds
        for the stage's task or thread to end and returns as soon as it does: the next stage starts at once, not at
        the next poll of the queue (which the messages wait for, at most POLL_S)."""
        from ray.util.queue import Empty

        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.bar.add_task(self.label, total=None)
            self.bar.start()
        try:
            while True:
                stop = finished(POLL_S)
                try:
                    while True:
                        self._show(self.queue.get_nowait())
                except Empty:
                    pass
                except Exception:  # noqa: BLE001  (the queue actor died: keep waiting for the stage itself)
                    pass
                if stop:
                    break
                self._line()
        finally:
            if self.bar is not None:
                self.bar.stop()

    def _show(self, message: tuple) -> None:
        if message[0] == "info":
            self.console.print(f"[dim]{message[1]}[/]", soft_wrap=True, highlight=False)
            return
        _, desc, done, total = message
        self.state = (desc, done, total)
        if self.bar is not None:
            self.bar.update(self.task, description=f"{self.label}: {desc}", completed=done, total=total)

    def _line(self) -> None:
        now = time.monotonic()
        if self.bar is not None or now - self.last_line < self.interval:
            return
        self.last_line = now
        elapsed = now - self.start
        text = f"{self.label}: running, {elapsed:.0f} s"
        if self.state:
            desc, done, total = self.state
            text = f"{self.label}: {desc} {done}/{total or '?'}, {elapsed:.0f} s"
            if total and done:
                text += f", about {elapsed * (total - done) / done:.0f} s left"
        self.console.print(f"[dim]{text}[/]", highlight=False)
