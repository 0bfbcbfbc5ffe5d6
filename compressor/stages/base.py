"""The stage contract: what a stage kind declares, in its own package, to become part of compressor.

A kind is a package `compressor/stages/<kind>/` (or any module of a plugin) whose import does NOT import torch,
and which calls `compressor.stages.register(StageKind(...))` once. From that one declaration come the pipeline
YAML key of the stage entry, `validate`, `plan` (shapes, cache key, FLOPs estimate), the standalone CLI command
(its options generated from the spec's fields), docs/reference.md and the orchestrator's handling of its output.

    check(spec, config) -> CheckResult
        torch-free; `config` is the input model's config.json as a dict. Raises UserError on a bad spec
        (exit 2 before any compute); returns the output config and warnings.
    run(spec, model: ModelRef, ctx: StageContext) -> StageResult
        reads `model.path`, writes an HF checkpoint + tokenizer into `ctx.model_dir` (a kind that makes no
        model writes nothing there and returns its results in StageResult.details; a kind with
        `produces_dataset` writes parquet files into `<ctx.work_dir>/data/` instead).
    flops(spec, EstimateInput) -> float
        the FLOPs `compressor plan` turns into GPU-hours (compressor/estimate.py has the shared formulas).

The runner adds the key, sizes and timings and writes manifest.json last. Spec fields named `calibration` or
`data` name a data source under the pipeline's `data:` (checked at validate, and part of the cache key).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional

if TYPE_CHECKING:
    from compressor.config.base import Strict
    from compressor.config.schema import PipelineSpec
    from compressor.manifest import ModelRef
    from compressor.stages.context import StageContext


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


@dataclass
class PlanContext:
    """What a kind may read of the pipeline while it is planned (for its cache key and its planned spec)."""

    pipeline: PipelineSpec
    index: int  # this stage's position in pipeline.stages
    teacher_key: str


def _no_extra(spec: Any, plan: PlanContext) -> dict:
    return {}


def _as_given(spec: Any, plan: PlanContext) -> Any:
    return spec


def _no_lines(plan: Any, stage: Any) -> list[str]:
    return []


def _seconds(manifest: Any) -> str:
    return f"done in {manifest.seconds or 0:.1f} s"


def one_task(spec: Any, resources: Any) -> str:
    """`plan`'s resources column for a kind that runs as one Ray task with the stage entry's `resources`."""
    return f"{resources.num_cpus:g} CPU" + (f"+{resources.num_gpus:g} GPU" if resources.num_gpus else "")


@dataclass(frozen=True)
class StageKind:
    name: str  # the stage entry's YAML key, the CLI command and the default stage name
    spec: type[Strict]  # its options: a torch-free pydantic model (extra="forbid"; NOT_IN_KEY fields)
    summary: str  # one line, for `compressor --help` and the docs
    check: Callable[[Any, dict], CheckResult]
    run: Callable[[Any, ModelRef, StageContext], StageResult]
    flops: Callable[[Any, EstimateInput], float]
    produces_model: bool = True  # False: the stage judges its input (evaluate); the next stage reads that input
    # True: it writes a dataset into `<work_dir>/data/` (generate), published like a model; a later stage names the
    # stage in its `data` field. Its input model passes through to the next stage (produces_model False).
    produces_dataset: bool = False
    runs_as: Literal["task", "driver"] = "task"  # a Ray task, or in the driver (it starts Ray Train itself)
    # More inputs of its output than the spec, the input model, the seed and its data sources (cache key).
    key_extra: Callable[[Any, PlanContext], dict] = _no_extra
    # The spec as it will run, from what the pipeline says around it (e.g. prune warns about a later group size).
    planned_spec: Callable[[Any, PlanContext], Any] = _as_given
    # What it runs on, for `plan`: (spec, the entry's Resources) -> e.g. "1 CPU+1 GPU" or "8 x 1 CPU+1 GPU".
    describe_resources: Callable[[Any, Any], str] = one_task
    plan_notes: Callable[[Any, Any], list[str]] = _no_lines  # more `plan` lines: (Plan, PlannedStage) -> lines
    needs_teacher: bool = False  # run() reads ctx.teacher (the standalone command then takes --teacher)
    standalone: bool = True  # offer `compressor <name> --model IN --out OUT` (evaluate has `compressor eval`)
    result_line: Callable[[Any], str] = _seconds  # the standalone command's last line, from the manifest
    # Part of every key of this kind instead of the package version (compressor/cache.py): bump it when the kind's
    # output for the same spec and input changes, a changed default included, and only then.
    output_version: str = "0.1.0"
    # The standalone command, when the generated `--model IN --out OUT` one does not fit: (kind) -> a typer callback.
    command: Optional[Callable[[Any], Callable]] = None
