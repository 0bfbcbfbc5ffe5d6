"""The stage contract: what a stage kind declares, in its own package, to become part of compressor.

A kind is a package `compressor/stages/<kind>/` (found by its directory) or a plugin's module (found through the
`compressor.stages` entry-point group). Importing it must NOT import torch. It subclasses `StageKind` below and
registers one instance: `register(Prune())`. From that one class come the pipeline YAML key of the stage entry,
`validate`, `plan` (shapes, cache key, FLOPs estimate, cost notes), the standalone CLI command (its options
generated from the spec's fields), docs/reference.md and the orchestrator's handling of its output (a model, a
dataset or scores).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Optional

from compressor.contract.spec import SourceRef, source_refs

if TYPE_CHECKING:
    from compressor.config.schema import PipelineSpec
    from compressor.contract.context import StageContext
    from compressor.contract.spec import Strict
    from compressor.manifest import ModelRef


@dataclass
class CheckResult:
    config: dict  # the output model's config.json as predicted from the spec alone
    warnings: list[str] = field(default_factory=list)


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)  # logged to MLflow and kept in the manifest
    details: dict[str, Any] = field(default_factory=dict)  # shapes, bits, ... kept in the manifest


@dataclass
class EstimateInput:
    """What `plan` knows of a stage without loading anything."""

    in_config: dict  # the model before the stage
    out_config: dict  # the model after it, as `check` predicts
    pipeline: PipelineSpec
    teacher_config: Optional[dict] = None  # the pipeline teacher's, when known offline
    derived: dict = field(default_factory=dict)  # the kind's `derived` figures of this stage, as planned


@dataclass
class PlanContext:
    """What a kind may read of the pipeline while it is planned (for its cache key and its planned spec)."""

    pipeline: PipelineSpec
    index: int  # this stage's position in pipeline.stages
    teacher_key: str


def one_task(spec: Any, resources: Any) -> str:
    """`plan`'s resources column for a kind that runs as one Ray task with the stage entry's `resources`."""
    return f"{resources.num_cpus:g} CPU" + (f"+{resources.num_gpus:g} GPU" if resources.num_gpus else "")


class StageKind(ABC):
    """A stage kind: subclass it in the kind's package, set the class attributes, implement `check`, `run` and
    `flops`, and register an instance (`register(Prune())`). The other methods have defaults that fit a kind which
    reads its input model and the data sources it names, and writes one model."""

    name: ClassVar[str]  # the stage entry's YAML key, the CLI command and the default stage name
    spec: ClassVar[type[Strict]]  # its options: a torch-free pydantic model (extra="forbid"; NOT_IN_KEY fields)
    summary: ClassVar[str]  # one line, for `compressor --help` and the docs
    # What it writes: a model (the next stage's input); a dataset in `<work_dir>/data/` (generate: a later stage names
    # the stage in its `data` field, and the input model passes on to the next stage); or nothing but scores
    # (evaluate judges its input, which the next stage reads).
    output: ClassVar[Literal["model", "dataset", "scores"]] = "model"
    runs_as: ClassVar[Literal["task", "driver"]] = "task"  # a Ray task, or in the driver (it starts Ray Train itself)
    needs_teacher: ClassVar[bool] = False  # run() reads ctx.teacher (the standalone command then takes --teacher)
    standalone: ClassVar[bool] = True  # offer `compressor <name> --model IN --out OUT` (evaluate has `compressor eval`)
    # Part of every key of this kind instead of the package version (compressor/cache.py): bump it when the kind's
    # output for the same spec and input changes, a changed default included, and only then.
    output_version: ClassVar[str] = "0.1.0"

    def __repr__(self) -> str:
        return f"<stage kind {self.name} ({type(self).__module__})>"

    @property
    def produces_model(self) -> bool:
        return self.output == "model"

    @property
    def produces_dataset(self) -> bool:
        return self.output == "dataset"

    # ------------------------------------------------------------------ what every kind implements
    @abstractmethod
    def check(self, spec: Any, config: dict) -> CheckResult:
        """Torch-free; `config` is the input model's config.json as a dict. Raises UserError on a bad spec (exit 2
        before any compute); returns the output config and warnings."""

    @abstractmethod
    def run(self, spec: Any, model: ModelRef, ctx: StageContext) -> StageResult:
        """Reads `model.path`, writes an HF checkpoint + tokenizer into `ctx.model_dir` (output "model"), parquet
        files into `<ctx.work_dir>/data/` (output "dataset"), or nothing (output "scores": its results are in the
        StageResult). The runner adds the key, sizes and timings and writes manifest.json last."""

    @abstractmethod
    def flops(self, spec: Any, given: EstimateInput) -> float:
        """The FLOPs `compressor plan` turns into GPU-hours (compressor/estimate.py has the shared formulas)."""

    # ------------------------------------------------------------------ what it reads
    def data_sources(self, spec: Any) -> list[SourceRef]:
        """The data sources it reads. Validate checks each name, planning keys the `keyed` ones by content. The
        default: the fields its spec (nested specs included) declares with `data_source(...)`, where set."""
        return source_refs(spec)

    def calibration(self, spec: Any) -> tuple[Optional[int], Optional[int]]:
        """(samples, seq_len) it takes from a calibration source, None where the source's own settings apply (the
        standalone command's `--calibration SOURCE`). Default: the source's own."""
        return None, None

    def preflight(self, spec: Any, pipeline: PipelineSpec, index: int) -> None:
        """Checks of what it reads that need local files but no network, made before anything runs (`validate`,
        `run`): raise UserError naming `stages.{index}.<kind>...`. Its data sources' rows are checked for it, as
        they `read`. Default: none."""
        return None

    # ------------------------------------------------------------------ what its output is
    def bits(self, spec: Any) -> Optional[int]:
        """The width of the output's weights, when the kind sets it (quantize); None: the input's dtype."""
        return None

    def group_size(self, spec: Any) -> Optional[int]:
        """The quantization group size it will use, for an earlier prune to align its widths to; None: none."""
        return None

    def params(self, config: dict) -> int:
        """The output's parameter count, from its predicted config (plan's "params" column)."""
        from compressor import estimate

        return estimate.param_count(config)

    # ------------------------------------------------------------------ its plan
    def derived(self, spec: Any, data: dict) -> dict[str, int]:
        """Figures that follow from the spec and its data sources (`data`: name -> DataSource), computed once when
        the stage is planned: its FLOPs estimate reads them, and its run gets them as `ctx.planned` (distill: seq_len,
        steps, sequences, tokens). Default: none."""
        return {}

    def key_extra(self, spec: Any, plan: PlanContext) -> dict:
        """More inputs of its output than the spec, the input model, the seed and its data sources (cache key)."""
        return {}

    def planned_spec(self, spec: Any, plan: PlanContext) -> Any:
        """The spec as it will run, from what the pipeline says around it (prune: a later group size)."""
        return spec

    def describe_resources(self, spec: Any, resources: Any) -> str:
        """What it runs on, for `plan`: (spec, the entry's Resources) -> e.g. "1 CPU+1 GPU" or "8 x 1 CPU+1 GPU"."""
        return one_task(spec, resources)

    def plan_notes(self, plan: Any, stage: Any) -> list[str]:
        """More `plan` lines: (Plan, PlannedStage) -> lines."""
        return []

    # ------------------------------------------------------------------ its command
    def result_line(self, manifest: Any) -> str:
        """The standalone command's last line, from the manifest."""
        return f"done in {manifest.seconds or 0:.1f} s"

    def command(self) -> Optional[Callable]:
        """A plugin's own standalone command (a typer callback), when the generated `--model IN --out OUT` one does
        not fit; None: the generated one. A built-in kind's own command lives in compressor/commands/ instead (a
        stage imports nothing of the CLI), registered before the generated ones."""
        return None
