"""Runs one stage: the same code path for `compressor <stage>` on the CLI and for a pipeline stage."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from compressor import __version__, checkpoint
from compressor.config.schema import DataSource, TaskSpec
from compressor.errors import UserError
from compressor.manifest import Manifest, ModelRef
from compressor.stages import stage_module
from compressor.stages.context import StageContext


def input_config(model: ModelRef) -> dict:
    """config.json of a local input (hub ids are checked when loaded)."""
    import json

    path = Path(model.path)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise UserError(f"model {model.path}: no config.json there; is it a Hugging Face checkpoint directory?")
        return json.loads(cfg.read_text())
    if path.exists() or model.path.startswith((".", "/", "~")):
        raise UserError(f"model {model.path}: not a checkpoint directory")
    return {}


def resolve_model(model: str) -> tuple[str, Optional[str]]:
    """(checkpoint dir, zoo name or None). Accepts a checkpoint dir, a stage output dir, or zoo:NAME."""
    if model.startswith("zoo:"):
        from compressor import zoo

        name = model[len("zoo:"):]
        return str(zoo.ensure_model(name)), name
    path = Path(model).expanduser()
    if not (path / "config.json").is_file() and (path / "manifest.json").is_file():
        return model_path(Manifest.read(path), path), None
    return model, None


def materialize(ref: ModelRef) -> ModelRef:
    """A ModelRef whose path is a local directory: `zoo:NAME` references are built (or found) on this node."""
    if ref.path.startswith("zoo:"):
        from compressor import zoo

        return ref.model_copy(update={"path": str(zoo.ensure_model(ref.path[len("zoo:"):]))})
    return ref


def evaluate_ref(model: ModelRef, tasks: list[TaskSpec], batch_size: int) -> tuple[dict, float]:
    """lm-eval scores of a model loaded from disk, and the seconds it took (a Ray task in pipelines)."""
    from compressor.evaluation import evaluate

    os.environ.setdefault("TQDM_MININTERVAL", "10")  # lm-eval's bars, forwarded line by line from Ray workers
    path = materialize(model).path
    start = time.perf_counter()
    return evaluate(path, tasks, batch_size=batch_size), time.perf_counter() - start


def check_registry_tasks(names: list[str]) -> None:
    """Unknown lm-eval registry task names fail before any stage runs (indexing the registry takes a few s)."""
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"evaluation.tasks: unknown lm-eval task(s) {', '.join(unknown)}; "
                        "`lm_eval --tasks list` shows the registry, or give `include:` for a local task directory")


def execute_stage(name: str, kind: str, spec: BaseModel, model: ModelRef, ctx: StageContext, key: str) -> Manifest:
    """Run the stage into ctx.work_dir and return its manifest (the caller writes it, last)."""
    module = stage_module(kind)
    model = materialize(model)
    if ctx.teacher is not None:
        ctx.teacher = materialize(ctx.teacher)
    start = time.perf_counter()
    result = module.run(spec, model, ctx)
    seconds = time.perf_counter() - start
    model_dir = Path(ctx.work_dir) / "model"
    has_model = (model_dir / "config.json").is_file()
    manifest = Manifest(
        stage=name,
        kind=kind,
        key=key,
        input_key=model.key,
        model_uri="model" if has_model else model.path,
        num_params=checkpoint.num_params(model_dir) if has_model else None,
        bytes=checkpoint.weight_bytes(model_dir) if has_model else None,
        seconds=round(seconds, 3),
        metrics=result.metrics,
        details=result.details,
        compressor_version=__version__,
    )
    ctx.log_metrics({"seconds": seconds, **({"num_params": manifest.num_params, "bytes": manifest.bytes} if has_model else {})})
    return manifest


def model_path(manifest: Manifest, stage_dir: Path) -> str:
    """Absolute model location of a published stage (model_uri is relative to its dir when produced there)."""
    return str(stage_dir / manifest.model_uri) if manifest.model_uri == "model" else manifest.model_uri


def run_standalone(
    kind: str,
    spec: BaseModel,
    model_path_in: str,
    out: str,
    data: Optional[dict[str, DataSource]] = None,
    teacher: Optional[str] = None,
    seed: int = 0,
    quiet: bool = False,
) -> Manifest:
    """`compressor prune|distill|quantize --model IN --out OUT`: check, run, publish OUT atomically."""
    out_dir = Path(out).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"--out {out}: directory exists and is not empty; choose a new one")
    local = Path(model_path_in).expanduser().resolve()
    model = ModelRef(path=str(local) if local.exists() else model_path_in, key=f"path:{local}")
    stage_module(kind).check(spec, input_config(model))
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create it ({exc.strerror})") from None
    work = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        ctx = StageContext(
            work_dir=work,
            teacher=ModelRef(path=teacher, key=f"path:{teacher}") if teacher else None,
            data=data or {},
            seed=seed,
            storage_path=str(out_dir.parent),
            run_name=f"{kind}-{out_dir.name}",
            quiet=quiet,
        )
        from compressor.cache import stage_key

        manifest = execute_stage(kind, kind, spec, model, ctx, stage_key(kind, spec, model.key))
        manifest.write(work)
        if out_dir.exists():
            out_dir.rmdir()
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest
