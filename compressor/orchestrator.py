"""The Ray driver: plan -> cache lookup -> stage tasks -> evaluation -> gate -> next stage.

It knows nothing of model internals: stages are opaque functions reached through compressor.runner, and it
moves only ModelRefs and manifests between them. A fully cached pipeline never starts Ray; it logs one parent
run, tagged `cached`, with the figures of what it reused."""

from __future__ import annotations

import contextlib
import functools
import os
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rich.console import Console

from compressor import contract as stage_kinds
from compressor import gates
from compressor.config.schema import PipelineSpec
from compressor.contract.context import StageContext
from compressor.errors import CompressorError, GateFailed, StageFailed
from compressor.manifest import Manifest, ModelRef
from compressor.models import zoo_name
from compressor.planning import Plan, PlannedStage, check_local_tasks, check_storage, make_plan
from compressor.records import StageRecord, stage_records
from compressor.runner import drop_scratch
from compressor.storage import join, move_stage
from compressor.tracking import default_uri, log_pipeline_summary, score_values

Scores = dict[str, dict[str, float]]


@dataclass
class StageOutcome:
    name: str
    kind: str
    status: str  # ran | cached | re-gated (an earlier run's model judged again) | gate-warned
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
    experiment_id: Optional[str] = None  # the MLflow experiment of the parent run (for the UI's address)

    @functools.cached_property
    def records(self) -> list[StageRecord]:
        """One record per stage, built once (it reads quantized checkpoints' headers, maybe on object storage): the
        summary JSON, MLflow and the console table all read these."""
        return stage_records(self)


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps task exceptions; give back the stage's own error."""
    return getattr(exc, "cause", None) or exc


class Orchestrator:
    def __init__(
        self,
        spec: PipelineSpec,
        pipeline_yaml: str,
        storage: Optional[str] = None,
        tracking_uri: Optional[str] = None,
        address: Optional[str] = None,
        console: Optional[Console] = None,
        register: Optional[str] = None,
        overrides: Sequence[str] = (),
        plan: Optional[Plan] = None,
    ):
        self.spec, self.pipeline_yaml, self.address = spec, pipeline_yaml, address
        self.overrides = list(overrides)  # KEY=VALUE given on the command line: named in the run's description
        self.register = register  # registered model name for the final model (`run --register NAME`)
        self.console = console or Console(stderr=True)
        self.plan = plan or make_plan(spec, storage)  # the one `run` checked, or a new one
        self.tracking_uri = (
            tracking_uri
            or spec.tracking.uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or default_uri(self.plan.storage_root)
        )
        self.stage_seconds = 0.0
        self.hub_teacher: Optional[ModelRef] = None  # the snapshot of a hub teacher, once published to the storage
        self.hub_student: Optional[ModelRef] = None  # and of a hub student
        self.published: dict[str, str] = {}  # model key -> directory, for stages that ran in this run

    # ------------------------------------------------------------------ entry point
    def run(self) -> RunSummary:
        start = time.perf_counter()
        check_local_tasks(self.spec.evaluation.tasks)
        if not self.plan.remote:
            check_storage(self.plan.storage_root)
        self._publish_hub_teacher()
        self._pin_hub_data()
        plan = self.plan
        if plan.fully_cached():
            return self._record_cached(start)
        self._check_registry_tasks()
        # Before Ray starts: its processes would take CPU from the minutes of training on a small machine.
        self._build_reference_models()
        parent = self._start_ray_and_parent_run()
        from compressor import interrupt

        interrupt.reassert()  # issue 14: ray.init put its own SIGTERM handler (sys.exit) in place of `run`'s
        outcomes: list[StageOutcome] = []
        try:
            baseline = self._baseline()
            previous = baseline
            for stage in plan.stages:
                with stage_lease(
                    self, stage
                ):  # issue 14: one writer per stage dir; what another run finished is reused
                    outcome = self._run_stage(stage, baseline, previous)
                outcomes.append(outcome)
                previous = outcome.scores or previous
        except GateFailed:
            self.tracker.tag(parent, "gate", "failed")
            self.tracker.end(parent, "FAILED")
            raise
        except BaseException as exc:
            self.tracker.end(parent, "FAILED")
            cause = _unwrap(exc)
            if isinstance(cause, CompressorError):  # e.g. a user error raised inside an evaluation task
                raise cause from None
            raise
        summary = RunSummary(
            plan, outcomes, baseline, self.tracking_uri, parent, time.perf_counter() - start, self.stage_seconds
        )
        self._finish_parent_run(summary, parent)
        return summary

    def _publish_hub_teacher(self) -> None:
        """A hub teacher is resolved to a commit and put on the pipeline storage once, before anything else runs;
        the plan is then re-made with the commit in the teacher's key and the snapshot as every stage's source."""
        from compressor.models import hub, is_hub_id

        published = {}
        for role, model in (("teacher", self.spec.teacher), ("student", self.spec.student)):
            if model is None or not is_hub_id(model.model):
                continue
            self.console.print(f"[dim]{role} {model.model}: resolving revision {model.revision or 'main'}[/]")
            published[role] = hub.publish_snapshot(model.model, model.revision, self.plan.storage_uri, model.dtype)
        if not published:
            return
        self.hub_teacher, self.hub_student = published.get("teacher"), published.get("student")
        self.plan = make_plan(self.spec, self.plan.storage_uri, teacher=self.hub_teacher, student=self.hub_student)

    def _pin_hub_data(self) -> None:
        """An `hf:` data source is read at one commit, resolved now, once: the commit goes into the shard and stage
        keys (an upstream change makes new shards and stages, never a mix of two versions) and MLflow's params."""
        from compressor.text_sources import pinned

        unpinned = {n: ds for n, ds in self.spec.data.items() if ds.source.startswith("hf:")}
        if not unpinned:
            return
        for name, ds in unpinned.items():
            self.spec.data[name] = pinned(ds)
            if self.spec.data[name].revision != ds.revision:
                self.console.print(
                    f"[dim]data {name}: {ds.source} at commit {self.spec.data[name].revision} "
                    f"(set data.{name}.revision to it to pin it)[/]"
                )
        self.plan = make_plan(self.spec, self.plan.storage_uri, teacher=self.hub_teacher, student=self.hub_student)

    # ------------------------------------------------------------------ stages
    def _run_stage(self, stage: PlannedStage, baseline: Optional[Scores], previous: Optional[Scores]) -> StageOutcome:
        if not stage.input.path:  # the previous stage ran in this run: read its published output
            stage.input = stage.input.model_copy(update={"path": self.published[stage.input.key]})
            if not stage.produces_model:
                stage.output = stage.input
        params = {
            "kind": stage.kind,
            "key": stage.key,
            "input_key": stage.input.key,
            **stage.entry.spec.model_dump(mode="json"),
        }
        if stage.cached:
            return self._reuse_stage(stage, params)

        run_id = self.tracker.start_stage(stage.name, stage.kind, stage.key, params)
        self.console.rule(f"{stage.name} ({stage.kind})")
        for warning in stage.warnings:
            self.console.print(f"[yellow]warning:[/] {warning}")
        status, rows, where, manifest = "ran", [], None, None
        try:
            if stage.held:  # it ran before and missed its gate or its evaluation: judge that model again
                held_in, manifest = stage.held
                where = self.plan.rejected_uri(stage) if held_in == "rejected" else self.plan.pending_uri(stage)
                status = "re-gated"
                self.console.print(
                    f"{stage.name}: reusing the model it made in an earlier run ({where}); "
                    "evaluating and gating it again without re-running the stage"
                )
            else:
                where = self.plan.pending_uri(stage)
                manifest = self._execute(stage, run_id, where)
            manifest.mlflow_run_id = run_id
            if stage.produces_model:
                scores = self._scores(ModelRef(path=join(where, manifest.model_uri), key=stage.output.key), run_id)
                self._score_references(stage, where, manifest, run_id)
            else:  # the stage judged its input: its scores are its result
                scores = manifest.details.get("scores")
            rows = self._gate(stage, run_id, scores, baseline, previous)
            if rows and not all(r.passed for r in rows):
                status = "gate-warned"  # on_fail: warn (stop raised GateFailed)
        except GateFailed as exc:
            self.tracker.end(run_id, "FAILED")
            kept = self._reject(stage, where, manifest, str(exc), rows)
            raise GateFailed(
                f"{exc}; the pipeline stopped. Its model is kept under {kept}: after changing the bar or "
                "the evaluation, run the pipeline again to judge that model anew without re-running "
                "the stage"
            ) from None
        except BaseException as exc:
            self.tracker.end(run_id, "FAILED")
            cause = _unwrap(exc)
            if isinstance(cause, KeyboardInterrupt):
                raise  # a produced model stays in pending/; the next run picks it up
            detail = "".join(traceback.format_exception_only(type(cause), cause)).strip()
            if manifest is not None:  # the stage's work is done; only its evaluation failed
                kept = self._reject(stage, where, manifest, f"evaluation failed: {detail}", rows)
                self.console.print(f"[yellow]{stage.name}: its evaluation failed; the model is kept under {kept}[/]")
            if isinstance(cause, CompressorError):
                raise cause from None
            raise StageFailed(f"stage {stage.name!r} failed: {detail}\n{_trace(exc)}") from None
        return self._publish_stage(stage, run_id, status, where, manifest, scores, rows)

    def _reuse_stage(self, stage: PlannedStage, params: dict) -> StageOutcome:
        """A stage whose output is in the storage: its child run (tagged cached) gets its sizes and scores."""
        run_id = self.tracker.start_stage(stage.name, stage.kind, stage.key, params, cached=True)
        self.tracker.sink(run_id).log_metrics(
            {k: v for k, v in {"num_params": stage.cached.num_params, "bytes": stage.cached.bytes}.items() if v}
        )
        scores = self._scores(stage.output, run_id) if stage.produces_model else stage.cached.details.get("scores")
        self.tracker.end(run_id)
        self.console.print(f"[dim]{stage.name}: cached ({stage.uri})[/]")
        return StageOutcome(stage.name, stage.kind, "cached", stage.cached, scores)

    def _gate(self, stage: PlannedStage, run_id: str, scores, baseline, previous) -> list:
        """The stage's gate rows, shown and logged; GateFailed when one misses and on_fail is stop."""
        if not stage.entry.gate:
            return []
        rows = gates.check_gate(stage.entry.gate, scores or {}, baseline, previous)
        if rows:
            self.console.print(gates.render(stage.name, rows))
            self.tracker.log_json(run_id, [r.__dict__ for r in rows], "gate.json")
            passed = all(r.passed for r in rows)
            self.tracker.tag(run_id, "gate", "passed" if passed else "failed")
            if not passed and stage.entry.gate.on_fail == "stop":
                failed = ", ".join(f"{r.metric} {r.bar}" for r in rows if not r.passed)
                raise GateFailed(f"stage {stage.name!r} missed its gate ({failed})")
        return rows

    def _publish_stage(self, stage: PlannedStage, run_id: str, status: str, where, manifest, scores, rows):
        """Move the judged output from pending/ to the stage's directory, with its gate rows in its manifest."""
        manifest.details["gate"] = {"status": status, "rows": [r.__dict__ for r in rows]}
        move_stage(where, stage.uri, manifest)
        drop_scratch(manifest)  # distill's Ray Train checkpoints, kept until the model was published
        if stage.produces_model:
            self.published[stage.output.key] = join(stage.uri, manifest.model_uri)
        self.tracker.log_json(run_id, manifest.model_dump(mode="json"), "manifest.json")
        self.tracker.end(run_id)
        return StageOutcome(stage.name, stage.kind, status, manifest, scores, rows)

    def _reject(
        self, stage: PlannedStage, where: Optional[str], manifest: Optional[Manifest], reason: str, rows: list
    ) -> Optional[str]:
        """Keep a produced model under rejected/ with a manifest that says why (never delete finished work)."""
        if where is None or manifest is None:
            return None
        target = self.plan.rejected_uri(stage)
        manifest.details["rejected"] = {"reason": reason, "gate": [r.__dict__ for r in rows]}
        move_stage(where, target, manifest)
        return target

    def _context(self, stage: PlannedStage, run_id: str) -> StageContext:
        return StageContext(
            teacher=self.plan.teacher,
            shared_teacher=self.plan.teacher,
            data={**self._datasets(), **self.spec.data},
            resources=stage.entry.resources,
            seed=self.spec.seed,
            storage_path=join(self.plan.storage_uri, "ray"),
            data_root=join(self.plan.storage_uri, "_data"),
            run_name=f"{self.spec.name}-{stage.name}-{stage.key[:12]}",
            sink=self.tracker.sink(run_id),
            ray_address=self.address,
            tasks=self.spec.evaluation.tasks,
            eval_batch_size=self.spec.evaluation.batch_size,
            planned=stage.derived,
        )

    def _datasets(self) -> dict:
        """The datasets of dataset stages (generate), by stage name, as data sources a later stage's `data` names:
        the answers of its published parquet files (a later stage runs once the earlier one is published)."""
        from compressor.config.schema import DataSource

        return {
            s.name: DataSource(source=join(s.uri, "data"), text_field="response")
            for s in self.plan.stages
            if stage_kinds.get(s.kind).produces_dataset
        }

    def _execute(self, stage: PlannedStage, run_id: str, publish_to: str) -> Manifest:
        from compressor.runner import STAGE_LOG, execute_stage, failed_log_uri

        ctx = self._context(stage, run_id)
        ctx.progress_queue = self._progress_queue()
        args = (stage.name, stage.kind, stage.entry.spec, stage.input, ctx, stage.key, publish_to)
        runs_in_driver = stage_kinds.get(stage.kind).runs_as == "driver"
        try:
            if runs_in_driver:
                manifest = self._in_thread(stage.name, lambda: execute_stage(*args))
            else:
                import ray

                task = ray.remote(max_retries=0)(execute_stage).options(
                    **_ray_resources(stage.entry.resources), name=stage.name
                )
                manifest = self._await(stage.name, task.remote(*args))
        except BaseException:
            workers = (
                ("; its Ray Train workers' output is in Ray's session logs (/tmp/ray/session_latest/logs on each node)")
                if runs_in_driver
                else ""
            )
            self.console.print(
                f"{stage.name}: its log is {failed_log_uri(publish_to)}{workers}", soft_wrap=True, highlight=False
            )
            raise
        self.stage_seconds += manifest.seconds or 0.0
        self.console.print(
            f"[dim]{stage.name}: done in {manifest.seconds or 0:.1f} s (log: {join(stage.uri, STAGE_LOG)})[/]",
            soft_wrap=True,
            highlight=False,
        )
        return manifest

    # ------------------------------------------------------------------ console: one progress line per stage
    def _progress_queue(self):
        """The queue stages send `ctx.info` / `ctx.progress` to (from any node); drained by _await/_in_thread."""
        if getattr(self, "_queue", None) is None:
            from ray.util.queue import Queue

            self._queue = Queue(actor_options={"num_cpus": 0})
        return self._queue

    def _drain(self, label: str, finished) -> None:
        from compressor.contract.context import DriverProgress

        DriverProgress(
            self.console, label, self._progress_queue(), float(os.environ.get("COMPRESSOR_PROGRESS_SECONDS", "30"))
        ).wait(finished)

    def _await(self, label: str, ref):
        """ray.get(ref), showing the task's progress meanwhile."""
        import ray

        self._drain(label, lambda timeout: bool(ray.wait([ref], timeout=timeout)[0]))
        return ray.get(ref)

    def _in_thread(self, label: str, work):
        """work() (a driver-side stage) in a thread while this one shows its progress; its error is re-raised here."""
        import threading

        outcome: dict = {}

        def target():
            try:
                outcome["value"] = work()
            except BaseException as exc:  # re-raised in the calling thread
                outcome["error"] = exc

        thread = threading.Thread(target=target, name=f"stage-{label}", daemon=True)
        thread.start()

        def ended(timeout: float) -> bool:
            thread.join(timeout)
            return not thread.is_alive()

        self._drain(label, ended)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    # ------------------------------------------------------------------ evaluation
    def _build_reference_models(self) -> None:
        """On a fresh machine `make run` first trains the offline reference teacher (minutes): say so, with the
        build's own progress, instead of letting the time pass for the teacher's evaluation. A zoo student too."""
        from compressor.models import zoo

        for role, given in (("teacher", self.spec.teacher), ("student", self.spec.student)):
            name = zoo_name(given.model) if given is not None else None
            if name is None or zoo.is_built(name):
                continue
            self.console.print(
                f"building the reference {role} {given.model}, once: a few minutes on 2 cores, then cached for every "
                "run"
            )
            zoo.ensure_model(name)

    def _baseline(self) -> Optional[Scores]:
        if self.spec.evaluation.baseline != "teacher" or not self.spec.evaluation.tasks:
            return None
        cached = self._cached_scores(self.plan.teacher)
        run_id = self.tracker.start_stage(
            "baseline", "evaluate", self.plan.teacher.key, {"model": self.spec.teacher.model}, cached=cached is not None
        )
        try:
            scores = self._scores(self.plan.teacher, run_id)
        except BaseException:
            self.tracker.end(run_id, "FAILED")
            raise
        self.tracker.end(run_id)
        return scores

    def _score_references(self, stage: PlannedStage, where: str, manifest: Manifest, run_id: str) -> None:
        """Models a stage made beside its output to compare it with (distill's hard-label control): scored like
        it, their scores kept in the manifest and logged under their name."""
        for name, reference in (manifest.details.get("references") or {}).items():
            model = ModelRef(path=join(where, reference["model_uri"]), key=f"{stage.output.key}:{name}")
            reference["scores"] = self._scores(model, run_id, prefix=f"{name}.")

    def _scores(self, model: ModelRef, run_id: str, prefix: str = "") -> Optional[Scores]:
        """The model's lm-eval scores: from the cache, or evaluated now as a Ray task. Logged to `run_id` (metric
        names after `prefix`)."""
        if not self.spec.evaluation.tasks:
            return None
        scores = self._cached_scores(model)
        if scores is None:
            import ray

            from compressor.runner import evaluate_ref

            self.console.print(
                f"[dim]evaluating {model.path} on {', '.join(t.name for t in self.spec.evaluation.tasks)}[/]",
                soft_wrap=True,
                highlight=False,
            )
            task = ray.remote(max_retries=0)(evaluate_ref).options(**_ray_resources(self.spec.evaluation.resources))
            evaluation = self.spec.evaluation
            log_file = self._eval_log(model)
            try:
                scores, seconds = self._await(
                    "evaluate",
                    task.remote(
                        model, evaluation.tasks, evaluation.batch_size, evaluation.resources.num_gpus, log_file
                    ),
                )
            except BaseException:
                self.console.print(f"evaluation log: {log_file}", soft_wrap=True, highlight=False)
                raise
            self.console.print(
                f"[dim]evaluated in {seconds:.1f} s (log: {log_file})[/]", soft_wrap=True, highlight=False
            )
            self.stage_seconds += seconds
            self._save_scores(model, scores)  # keyed by the model's content: valid whatever its gate says
        sink = self.tracker.sink(run_id)
        sink.log_metrics({f"{prefix}{k}": v for k, v in score_values(scores).items()})
        self.tracker.log_json(run_id, scores, f"eval-{prefix.rstrip('.')}.json" if prefix else "eval.json")
        return scores

    def _eval_log(self, model: ModelRef) -> str:
        """A path on the evaluating node for lm-eval's output: <storage>/_logs/ when the storage is a local path."""
        import tempfile

        root = Path(tempfile.gettempdir()) / "compressor-logs" if self.plan.remote else self.plan.storage_root / "_logs"
        import re

        return str(
            root / f"{self.spec.name}-evaluate-{re.sub(r'[^A-Za-z0-9]+', '-', model.key.split(':', 1)[-1])[:12]}.log"
        )

    def _cached_scores(self, model: ModelRef) -> Optional[Scores]:
        from compressor.evaluation import load_cached

        return load_cached(self.plan.eval_uri(model.key))

    def _save_scores(self, model: ModelRef, scores: Scores) -> None:
        from compressor.evaluation import save_cached

        save_cached(self.plan.eval_uri(model.key), scores)

    def _check_registry_tasks(self) -> None:
        registry = [t for t in self.spec.evaluation.tasks if not t.include and not t.data]
        if registry:
            from compressor.runner import check_registry_tasks

            check_registry_tasks([t.name for t in registry])

    def _start_ray_and_parent_run(self) -> str:
        """Ray's start is mostly waiting for its processes, and MLflow's (a sqlite store's migrations, the parent
        run) mostly Python: the parent run starts in a thread meanwhile (Ray must start in the main thread, where
        it sets its signal handlers). Returns the parent run's id."""
        from concurrent.futures import ThreadPoolExecutor

        from compressor.ray_runtime import ensure_ray

        with ThreadPoolExecutor(1, thread_name_prefix="mlflow-start") as pool:
            parent = pool.submit(self._start_parent_run)
            try:
                ensure_ray(self.address)
            finally:
                started = parent.result()  # an error of either is raised; the run is started before Ray's is
        return started

    def _start_parent_run(self, cached: bool = False) -> str:
        from compressor.tracking import open_tracker

        self.plan.storage_root.mkdir(parents=True, exist_ok=True)
        # issue 14: open_tracker = Tracker, safe when several runs start on one sqlite store at once
        self.tracker = open_tracker(
            self.tracking_uri, self.spec.tracking.experiment or self.spec.name, self.plan.storage_root / "mlartifacts"
        )
        from compressor.tracking import dataset_inputs

        stages = [s.name for s in self.plan.stages]
        changed = f"; overrides: {' '.join(self.overrides)}" if self.overrides else ""
        parent = self.tracker.start_pipeline(
            self.spec.name,
            self.pipeline_yaml,
            {
                "teacher": self.spec.teacher.model,
                "teacher_key": self.plan.teacher.key,
                "seed": self.spec.seed,
                "storage": self.plan.storage_uri,
                "stages": stages,
            },
            run_name=f"{self.spec.name} {time.strftime('%m-%d %H:%M:%S')}" + (" cached" if cached else ""),
            description=f"compressor run of `{self.spec.name}` ({' -> '.join(stages)}), teacher "
            f"{self.spec.teacher.model}{changed}" + ("; every stage came from the cache" if cached else ""),
            datasets=dataset_inputs(self.spec),
        )
        self.tracker.tag(parent, "cached", str(cached).lower())
        return parent

    def _record_cached(self, start: float) -> RunSummary:
        """A run that found every stage finished computes nothing and starts no Ray, but it is still a run: its parent
        run (tagged `cached`) carries the final figures of the stages it reused, so it shows in `compressor runs`
        and can be compared with the run that did the work, or a later one."""
        outcomes = []
        for stage in self.plan.stages:
            scores = self._cached_scores(stage.output) if stage.produces_model else stage.cached.details.get("scores")
            outcomes.append(StageOutcome(stage.name, stage.kind, "cached", stage.cached, scores))
        baseline = self._cached_scores(self.plan.teacher) if self.spec.evaluation.baseline == "teacher" else None
        parent = self._start_parent_run(cached=True)
        summary = RunSummary(self.plan, outcomes, baseline, self.tracking_uri, parent, time.perf_counter() - start)
        self._finish_parent_run(summary, parent)
        return summary

    def _finish_parent_run(self, summary: RunSummary, parent: str) -> None:
        log_pipeline_summary(self.tracker, parent, summary)
        self._register(summary, parent)
        self.tracker.log_json(parent, summary_dict(summary), "summary.json")
        summary.experiment_id = self.tracker.experiment_id
        warned = any(o.status == "gate-warned" for o in summary.outcomes)
        self.tracker.tag(parent, "gate", "warned" if warned else "passed")
        self.tracker.end(parent)

    def _register(self, summary: RunSummary, parent: str) -> None:
        """`run --register NAME`: the final model becomes a new version of registered model NAME in MLflow,
        described by the gate summary (it points at the stage's logged model; no weights are copied)."""
        if not self.register:
            return
        from compressor.tracking import register_final_model

        version = register_final_model(self.tracker, self.register, summary, parent)
        self.console.print(
            f"registered model {self.register!r}: version {version}"
            if version
            else f"[yellow]--register {self.register}: no stage of this pipeline made a model[/]"
        )


# ------------------------------------------------------------------------------ one writer per stage (compressor.locks)
@contextlib.contextmanager
def stage_lease(orchestrator, stage) -> Iterator[None]:
    """The orchestrator's stage loop runs each stage inside this. A stage found cached at planning needs no lease.
    Once the lease is held, what another run finished meanwhile is taken as it would have been at planning: the
    stage becomes cached (or held: kept in pending/ or rejected/), and the leftovers of killed attempts at this
    stage (their private scratch directories) are removed, since no one else may be writing them now."""
    if stage.cached:
        yield
        return
    from compressor import storage
    from compressor.locks import holding

    say = lambda line: orchestrator.console.print(line, soft_wrap=True, highlight=False)  # noqa: E731
    with holding(stage.uri, stage.name, say):
        manifest = storage.finished_manifest(stage.uri, stage.key)
        if manifest is not None:
            stage.cached, stage.held = manifest, None
            if stage.output.key != stage.input.key:  # a stage that makes a model (evaluate passes its input on)
                stage.output = stage.output.model_copy(update={"path": storage.join(stage.uri, manifest.model_uri)})
                orchestrator.published[stage.output.key] = stage.output.path
        elif stage.held is None:
            plan = orchestrator.plan
            stage.held = next(
                (
                    (where, m)
                    for where, uri in (("pending", plan.pending_uri(stage)), ("rejected", plan.rejected_uri(stage)))
                    if (m := storage.finished_manifest(uri, stage.key))
                ),
                None,
            )
        remove_scratch(orchestrator.plan.pending_uri(stage), f"{stage.name}-{stage.key[:12]}")
        yield


def remove_scratch(publish_to: str, name: str) -> None:
    """Private scratch directories of earlier, killed attempts at one stage (storage.scratch_dir names them). Only on
    local/NFS storage, where they sit beside the stage's pending/ directory; with object storage they are on the
    disk of whichever node ran the attempt (its mirror's work/ directory), out of this process's reach."""
    import shutil

    from compressor import storage

    if not storage.is_remote(publish_to):
        for path in Path(publish_to).parent.glob(f".tmp-{name}-*"):
            shutil.rmtree(path, ignore_errors=True)


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]


def _ray_resources(resources) -> dict:
    out = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    if resources.memory_gb:
        out["memory"] = int(resources.memory_gb * 2**30)
    if resources.custom:
        out["resources"] = dict(resources.custom)
    return out


def summary_dict(summary: RunSummary) -> dict:
    from compressor.records import summary_records
    from compressor.recovery import distillation_rows

    controlled = [o for o in summary.outcomes if o.manifest and o.manifest.details.get("references")]
    return {
        "distillation": {
            o.name: distillation_rows(
                summary.baseline, {"scores": o.scores, "references": o.manifest.details["references"]}
            )
            for o in controlled
        },
        "pipeline": summary.plan.spec.name,
        "seconds": round(summary.seconds, 3),
        "baseline": summary.baseline,
        "stages": summary_records(summary),
    }
