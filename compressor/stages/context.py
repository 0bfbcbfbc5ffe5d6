"""StageContext: all a stage may know of the outside world. It is picklable so it rides into Ray tasks.

A stage writes its checkpoint into `ctx.model_dir` (inside a private temp dir the orchestrator
publishes atomically), reports numbers through `ctx.log_*`, and shows progress with `ctx.progress`.
It never imports Ray or MLflow itself (distill uses Ray Train, which is its job, and gets
`ctx.storage_path` / `ctx.run_name` for it)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, TypeVar

from compressor.config.schema import DataSource, TaskSpec
from compressor.config.stages import Resources
from compressor.manifest import ModelRef

T = TypeVar("T")


class MetricsSink:
    """Where metrics go. The default keeps them in memory; the tracker supplies an MLflow sink."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None: ...
    def log_artifact(self, path: Path) -> None: ...


@dataclass
class StageContext:
    work_dir: Path  # private temp dir; becomes <storage>/<pipeline>/<stage>-<key12> on success
    teacher: Optional[ModelRef] = None
    data: dict[str, DataSource] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    seed: int = 0
    storage_path: str = ""  # pipeline storage root (Ray Train storage_path)
    run_name: str = ""  # stable name for resumable training: "<pipeline>-<stage>-<key12>"
    sink: MetricsSink = field(default_factory=MetricsSink)
    quiet: bool = False
    ray_address: Optional[str] = None
    tasks: list[TaskSpec] = field(default_factory=list)  # the pipeline's evaluation tasks (evaluate stage)
    eval_batch_size: int = 16

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

    def save_json_artifact(self, name: str, payload: Any) -> Path:
        """Write JSON next to the model (kept with the stage output) and log it as an artifact."""
        path = Path(self.work_dir) / name
        path.write_text(json.dumps(payload, indent=2))
        self.log_artifact(path)
        return path

    def info(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def progress(self, items: Iterable[T], total: Optional[int] = None, desc: str = "") -> Iterator[T]:
        """Wrap an iterable with a progress bar (tqdm; readable in Ray worker logs too)."""
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, disable=self.quiet, file=sys.stderr, mininterval=1.0)

    def calibration_blocks(self, name: Optional[str], tokenizer, samples: Optional[int], seq_len: Optional[int],
                           max_positions: Optional[int], default_samples: int, stage: str):
        """[n, seq_len] token blocks of data source `name`; the stage's own samples/seq_len win over the source's,
        and seq_len is capped at the model's context."""
        from compressor.data import token_blocks

        source = self.data_source(name)
        seq_len = seq_len or source.seq_len
        if max_positions and seq_len > max_positions:
            self.info(f"{stage}: seq_len {seq_len} is beyond the model's max_position_embeddings; using {max_positions}")
            seq_len = max_positions
        samples = samples or source.samples or default_samples
        blocks = token_blocks(source, tokenizer, samples, seq_len, self.seed)
        if blocks.shape[0] < samples:
            self.info(f"{stage}: the calibration text yields {blocks.shape[0]} sequences of {seq_len} tokens, not {samples}")
        return blocks

    def data_source(self, name: Optional[str]) -> DataSource:
        from compressor.errors import UserError

        if name is None:
            if len(self.data) == 1:
                return next(iter(self.data.values()))
            raise UserError("this stage needs a data source: set `calibration`/`data` to one of the pipeline's `data:` names")
        if name not in self.data:
            raise UserError(f"unknown data source {name!r}; known: {', '.join(self.data) or 'none'}")
        return self.data[name]


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
