"""The Ray driver: plan -> cache lookup -> stage tasks -> evaluation -> gate -> next stage.

It knows nothing of model internals: stages are opaque functions reached through compressor.runner, and it
moves only ModelRefs and manifests between them. A fully cached pipeline never starts Ray or MLflow."""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rich.console import Console

from compressor import gates
from compressor.cache import StageCache
from compressor.config.schema import PipelineSpec
from compressor.errors import CompressorError, GateFailed, StageFailed
from compressor.manifest import Manifest, ModelRef
from compressor.planning import Plan, PlannedStage, check_local_tasks, check_storage, make_plan
from compressor.stages import stage_module
from compressor.stages.context import StageContext
from compressor.tracking import Tracker, default_uri, flatten

Scores = dict[str, dict[str, float]]


@dataclass
class StageOutcome:
    name: str
    kind: str
    status: str  # ran | cached | gate-failed | gate-warned
    manifest: Optional[Manifest] = None
    scores: Optional[Scores] = None
    gate_rows: list = field(default_factory=list)


@dataclass
class RunSummary:
    plan: Plan
    outcomes: list[StageOutcome]
    baseline: Optional[Scores]
    tracking_uri: str
    parent_run_id: Optional[str]
    seconds: float
    stage_seconds: float = 0.0  # time inside stage and evaluation functions (for the overhead benchmark)


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps task exceptions; give back the stage's own error."""
    return getattr(exc, "cause", None) or exc


class Orchestrator:
    def __init__(self, spec: PipelineSpec, pipeline_yaml: str, storage: Optional[str] = None,
                 tracking_uri: Optional[str] = None, address: Optional[str] = None, console: Optional[Console] = None):
        self.spec, self.pipeline_yaml, self.address = spec, pipeline_yaml, address
        self.console = console or Console(stderr=True)
        self.plan = make_plan(spec, storage)
        self.tracking_uri = (tracking_uri or spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or default_uri(self.plan.storage_root))
        self.stage_seconds = 0.0
        self.published: dict[str, str] = {}  # model key -> directory, for stages that ran in this run

    # ------------------------------------------------------------------ entry point
    def run(self) -> RunSummary:
        start = time.perf_counter()
        plan = self.plan
        check_local_tasks(self.spec.evaluation.tasks)
        if not plan.remote:
            check_storage(plan.storage_root)
        if plan.fully_cached():
            return self._cached_summary(start)
        self._check_registry_tasks()
        plan.storage_root.mkdir(parents=True, exist_ok=True)
        self.tracker = Tracker(self.tracking_uri, self.spec.tracking.experiment or self.spec.name, plan.storage_root / "mlartifacts")
        parent = self.tracker.start_pipeline(self.spec.name, self.pipeline_yaml, {
            "teacher": self.spec.teacher.model, "seed": self.spec.seed, "storage": str(plan.storage_root),
            "stages": [s.name for s in plan.stages]})
        from compressor.raylocal import ensure_ray

        ensure_ray(self.address)
        outcomes: list[StageOutcome] = []
        try:
            baseline = self._baseline()
            previous = baseline
            for stage in plan.stages:
                outcome = self._run_stage(stage, baseline, previous)
                outcomes.append(outcome)
                previous = outcome.scores or previous
        except GateFailed:
            self.tracker.tag(parent, "gate", "failed")
            self.tracker.end(parent, "FAILED")
            raise
        except BaseException:
            self.tracker.end(parent, "FAILED")
            raise
        summary = RunSummary(plan, outcomes, baseline, self.tracking_uri, parent, time.perf_counter() - start, self.stage_seconds)
        self.tracker.log_json(parent, summary_dict(summary), "summary.json")
        self.tracker.tag(parent, "gate", "passed" if all(o.status != "gate-warned" for o in outcomes) else "warned")
        self.tracker.end(parent)
        return summary

    # ------------------------------------------------------------------ stages
    def _run_stage(self, stage: PlannedStage, baseline: Optional[Scores], previous: Optional[Scores]) -> StageOutcome:
        if not stage.input.path:  # the previous stage ran in this run: read its published output
            stage.input = stage.input.model_copy(update={"path": self.published[stage.input.key]})
            if stage.kind == "evaluate":
                stage.output = stage.input
        params = {"kind": stage.kind, "key": stage.key, "input_key": stage.input.key, **stage.entry.spec.model_dump(mode="json")}
        if stage.cached:
            if self.plan.remote and stage.kind != "evaluate":  # bring the published output to this node
                from compressor.storage import download_stage

                download_stage(self.plan.remote_stage_uri(stage), stage.stage_dir)
            run_id = self.tracker.start_stage(stage.name, stage.kind, stage.key, params, cached=True)
            self.tracker.sink(run_id).log_metrics({k: v for k, v in {"num_params": stage.cached.num_params,
                                                                     "bytes": stage.cached.bytes}.items() if v})
            scores = self._scores(stage.output, run_id) if stage.kind != "evaluate" else stage.cached.details.get("scores")
            self.tracker.end(run_id)
            self.console.print(f"[dim]{stage.name}: cached ({stage.stage_dir})[/]")
            return StageOutcome(stage.name, stage.kind, "cached", stage.cached, scores)

        run_id = self.tracker.start_stage(stage.name, stage.kind, stage.key, params)
        self.console.rule(f"{stage.name} ({stage.kind})")
        for warning in stage.warnings:
            self.console.print(f"[yellow]warning:[/] {warning}")
        status = "ran"
        try:
            with StageCache(self.plan.pipeline_root).staging(stage.name, stage.key) as work:
                ctx = self._context(stage, work, run_id)
                manifest = self._execute(stage, ctx)
                manifest.mlflow_run_id = run_id
                output = stage.input if stage.kind == "evaluate" else ModelRef(path=str(work / "model"), key=stage.output.key)
                scores = manifest.details.get("scores") if stage.kind == "evaluate" else self._scores(output, run_id, save=False)
                rows = gates.check_gate(stage.entry.gate, scores or {}, baseline, previous) if stage.entry.gate else []
                if rows:
                    self.console.print(gates.render(stage.name, rows))
                    self.tracker.log_json(run_id, [r.__dict__ for r in rows], "gate.json")
                    if not all(r.passed for r in rows):
                        self.tracker.tag(run_id, "gate", "failed")
                        if stage.entry.gate.on_fail == "stop":
                            failed = ", ".join(f"{r.metric} {r.bar}" for r in rows if not r.passed)
                            raise GateFailed(f"stage {stage.name!r} missed its gate ({failed}); the pipeline stopped "
                                             f"and nothing of this stage was published")
                        status = "gate-warned"
                    else:
                        self.tracker.tag(run_id, "gate", "passed")
                manifest.write(work)
                self.tracker.sink(run_id).log_artifact(work / "manifest.json")
        except BaseException as exc:
            self.tracker.end(run_id, "FAILED")
            cause = _unwrap(exc)
            if isinstance(cause, CompressorError):
                raise cause from None
            if isinstance(cause, KeyboardInterrupt):
                raise
            detail = "".join(traceback.format_exception_only(type(cause), cause)).strip()
            raise StageFailed(f"stage {stage.name!r} failed: {detail}\n{_trace(exc)}") from None
        if self.plan.remote:
            from compressor.storage import upload_stage

            upload_stage(stage.stage_dir, self.plan.remote_stage_uri(stage))  # manifest last
        if stage.kind != "evaluate":
            self.published[stage.output.key] = str(stage.stage_dir / "model")
            if scores is not None:
                self._save_scores(stage.output, scores)
        self.tracker.end(run_id)
        published = Manifest.read(stage.stage_dir)
        return StageOutcome(stage.name, stage.kind, status, published, scores, rows)

    def _context(self, stage: PlannedStage, work: Path, run_id: str) -> StageContext:
        return StageContext(
            work_dir=work, teacher=self.plan.teacher, data=self.spec.data, resources=stage.entry.resources,
            seed=self.spec.seed, storage_path=_ray_train_storage(self.plan),
            run_name=f"{self.spec.name}-{stage.name}-{stage.key[:12]}", sink=self.tracker.sink(run_id),
            ray_address=self.address, tasks=self.spec.evaluation.tasks, eval_batch_size=self.spec.evaluation.batch_size,
        )

    def _execute(self, stage: PlannedStage, ctx: StageContext) -> Manifest:
        from compressor.runner import execute_stage

        if stage_module(stage.kind).RUNS_AS == "driver":
            manifest = execute_stage(stage.name, stage.kind, stage.entry.spec, stage.input, ctx, stage.key)
        else:
            import ray

            task = ray.remote(max_retries=0)(execute_stage).options(**_ray_resources(stage.entry.resources), name=stage.name)
            manifest = ray.get(task.remote(stage.name, stage.kind, stage.entry.spec, stage.input, ctx, stage.key))
        self.stage_seconds += manifest.seconds or 0.0
        return manifest

    # ------------------------------------------------------------------ evaluation
    def _baseline(self) -> Optional[Scores]:
        if self.spec.evaluation.baseline != "teacher" or not self.spec.evaluation.tasks:
            return None
        cached = self._cached_scores(self.plan.teacher)
        run_id = self.tracker.start_stage("baseline", "evaluate", self.plan.teacher.key,
                                          {"model": self.spec.teacher.model}, cached=cached is not None)
        try:
            scores = self._scores(self.plan.teacher, run_id)
        except BaseException:
            self.tracker.end(run_id, "FAILED")
            raise
        self.tracker.end(run_id)
        return scores

    def _scores(self, model: ModelRef, run_id: str, save: bool = True) -> Optional[Scores]:
        """The model's lm-eval scores: from the cache, or evaluated now as a Ray task. Logged to `run_id`."""
        if not self.spec.evaluation.tasks:
            return None
        scores = self._cached_scores(model)
        if scores is None:
            import ray

            from compressor.runner import evaluate_ref

            self.console.print(f"[dim]evaluating {model.path} on {', '.join(t.name for t in self.spec.evaluation.tasks)}[/]")
            task = ray.remote(max_retries=0)(evaluate_ref).options(**_ray_resources(self.spec.evaluation.resources))
            scores, seconds = ray.get(task.remote(model, self.spec.evaluation.tasks, self.spec.evaluation.batch_size))
            self.stage_seconds += seconds
            if save:
                self._save_scores(model, scores)
        sink = self.tracker.sink(run_id)
        sink.log_metrics({k: float(v) for k, v in flatten(scores).items() if _is_number(v)})
        self.tracker.log_json(run_id, scores, "eval.json")
        return scores

    def _cached_scores(self, model: ModelRef) -> Optional[Scores]:
        path = self.plan.eval_path(model.key)
        return json.loads(path.read_text()) if path.is_file() else None

    def _save_scores(self, model: ModelRef, scores: Scores) -> None:
        path = self.plan.eval_path(model.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(scores, indent=2, sort_keys=True))
        tmp.replace(path)

    def _check_registry_tasks(self) -> None:
        registry = [t for t in self.spec.evaluation.tasks if not t.include]
        if registry:
            from compressor.runner import check_registry_tasks

            check_registry_tasks([t.name for t in registry])

    def _cached_summary(self, start: float) -> RunSummary:
        outcomes = []
        for stage in self.plan.stages:
            scores = (stage.cached.details.get("scores") if stage.kind == "evaluate"
                      else self._cached_scores(stage.output))
            outcomes.append(StageOutcome(stage.name, stage.kind, "cached", stage.cached, scores))
        baseline = self._cached_scores(self.plan.teacher) if self.spec.evaluation.baseline == "teacher" else None
        return RunSummary(self.plan, outcomes, baseline, self.tracking_uri, None, time.perf_counter() - start)


def _ray_train_storage(plan: Plan) -> str:
    """Ray Train's storage_path: the pipeline storage itself, so checkpoints survive a node (s3://, gs:// or NFS)."""
    from compressor.storage import join

    return join(plan.storage_uri, "ray") if plan.remote else str(plan.storage_root / "ray")


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]


def _ray_resources(resources) -> dict:
    out = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    if resources.memory_gb:
        out["memory"] = int(resources.memory_gb * 2**30)
    return out


def summary_dict(summary: RunSummary) -> dict:
    return {
        "pipeline": summary.plan.spec.name,
        "seconds": round(summary.seconds, 3),
        "baseline": summary.baseline,
        "stages": [{"name": o.name, "kind": o.kind, "status": o.status, "key": o.manifest.key if o.manifest else None,
                    "num_params": o.manifest.num_params if o.manifest else None,
                    "bytes": o.manifest.bytes if o.manifest else None,
                    "seconds": o.manifest.seconds if o.manifest else None, "scores": o.scores} for o in summary.outcomes],
    }
