"""Runs one stage: the same code path for `compressor <stage>` on the CLI and for a pipeline stage."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from compressor import __version__, storage
from compressor import contract as stage_kinds
from compressor.config.schema import DataSource, TaskSpec
from compressor.contract.context import StageContext
from compressor.errors import UserError
from compressor.manifest import Manifest, ModelRef
from compressor.models import checkpoint, materialize, read_config

STAGE_LOG = "stage.log"  # third-party output of a pipeline stage, published with it


@contextmanager
def captured_output(log_file: Optional[Path], fds: bool = True) -> Iterator[None]:
    """Send what libraries print while a pipeline stage runs (tqdm bars, logging, Python warnings and, with `fds`,
    C libraries' messages written to file descriptors 1 and 2) to `log_file` instead of the console; restore all
    afterwards. `fds=False` in the driver process, whose console must keep printing. No-op for None or `run -v`."""
    import logging
    import warnings

    from compressor.ray_runtime import verbose

    if log_file is None or verbose():
        yield
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    stream = open(log_file, "a", buffering=1, errors="replace")
    saved_fds = []
    sys.stdout.flush(), sys.stderr.flush()
    if fds:
        for fd in (1, 2):
            saved_fds.append((fd, os.dup(fd)))
            os.dup2(stream.fileno(), fd)
    saved_streams = sys.stdout, sys.stderr
    if fds:
        sys.stdout = sys.stderr = stream
    root = logging.getLogger()
    consoles = [
        h for h in root.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s: %(message)s"))
    saved_level = root.level
    for h in consoles:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # the log file is where libraries' INFO lines belong, unlike the console
    saved_showwarning = warnings.showwarning
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: stream.write(
        warnings.formatwarning(message, category, filename, lineno, line)
    )
    try:
        yield
    finally:
        warnings.showwarning = saved_showwarning
        root.removeHandler(handler)
        root.setLevel(saved_level)
        for h in consoles:
            root.addHandler(h)
        sys.stdout, sys.stderr = saved_streams
        stream.flush()
        for fd, saved in saved_fds:
            os.dup2(saved, fd)
            os.close(saved)
        stream.close()


def evaluate_ref(
    model: ModelRef, tasks: list[TaskSpec], batch_size: int | str, num_gpus: float = 0, log_file: Optional[str] = None
) -> tuple[dict, float]:
    """lm-eval scores of a model loaded from disk, and the seconds it took (a Ray task in pipelines).

    `num_gpus` is what the task reserved (evaluation.resources.num_gpus): > 0 evaluates on that GPU. lm-eval's
    output goes to `log_file` (a path on the node that evaluates), when given."""
    from compressor.evaluation import device_for, evaluate

    os.environ.setdefault("TQDM_MININTERVAL", "10")  # lm-eval's bars: a line each 10 s in the log, not per batch
    with captured_output(Path(log_file) if log_file else None):
        path = materialize(model).path
        start = time.perf_counter()
        scores = evaluate(path, tasks, batch_size=batch_size, device=device_for(num_gpus))
    return scores, time.perf_counter() - start


def check_registry_tasks(names: list[str]) -> None:
    """Unknown lm-eval registry task names fail before any stage runs (indexing the registry takes a few s)."""
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(
            f"evaluation.tasks: unknown lm-eval task(s) {', '.join(unknown)}; "
            "`lm_eval --tasks list` shows the registry, or give `include:` for a local task directory"
        )


def execute_stage(
    name: str, kind: str, spec: BaseModel, model: ModelRef, ctx: StageContext, key: str, publish_to: str
) -> Manifest:
    """Run the stage on this node into a private scratch dir, write its manifest last and publish the directory to
    `publish_to` (a path or storage URI) from here, then drop the scratch dir. Returns the manifest."""
    stage_kind = stage_kinds.get(kind)
    ctx.work_dir = storage.scratch_dir(publish_to, f"{name}-{key[:12]}")
    ctx.publish_uri = publish_to
    # In pipeline runs (a progress queue to the driver) libraries' output goes to <stage dir>/stage.log, published
    # with the stage and kept as failed_log_uri(publish_to) when it fails.
    log_file = Path(ctx.work_dir) / STAGE_LOG if ctx.progress_queue is not None else None
    try:
        with captured_output(log_file, fds=stage_kind.runs_as == "task"):
            return _execute_stage(stage_kind, name, spec, model, ctx, key, publish_to)
    except BaseException:
        if log_file is not None and log_file.is_file():
            storage.write_text(failed_log_uri(publish_to), log_file.read_text(errors="replace"))
        raise
    finally:
        shutil.rmtree(ctx.work_dir, ignore_errors=True)


def failed_log_uri(publish_to: str) -> str:
    """Where the log of a stage that failed is kept (its scratch dir, holding stage.log, is dropped)."""
    return publish_to.rstrip("/") + ".log"


def _execute_stage(
    stage_kind, name: str, spec: BaseModel, model: ModelRef, ctx: StageContext, key: str, publish_to: str
) -> Manifest:
    if stage_kind.runs_as == "task":  # a driver-side stage (distill) leaves the loading to its own workers
        model = materialize(model)
        if ctx.teacher is not None:
            ctx.teacher = materialize(ctx.teacher)
    start = time.perf_counter()
    result = stage_kind.run(spec, model, ctx)
    seconds = time.perf_counter() - start
    model_dir = Path(ctx.work_dir) / "model"
    has_model = (model_dir / "config.json").is_file()
    data_dir = Path(ctx.work_dir) / "data"  # a dataset stage's output (StageKind.produces_dataset)
    has_data = not has_model and stage_kind.produces_dataset and data_dir.is_dir()
    manifest = Manifest(
        stage=name,
        kind=stage_kind.name,
        key=key,
        input_key=model.key,
        model_uri="model" if has_model else model.path,
        num_params=checkpoint.logical_num_params(model_dir) if has_model else None,
        bytes=checkpoint.weight_bytes(model_dir) if has_model else None,
        seconds=round(seconds, 3),
        metrics=result.metrics,
        details=result.details,
        compressor_version=__version__,
        files=storage.file_sizes(model_dir) if has_model else {},  # issue 14: checked before the stage is reused
    )
    if has_data:  # an extra manifest field: a model stage's manifest.json stays byte for byte as it was
        manifest.dataset_uri = "data"
        manifest.files = storage.file_sizes(data_dir)
    ctx.log_metrics(
        {"seconds": seconds, **({"num_params": manifest.num_params, "bytes": manifest.bytes} if has_model else {})}
    )
    manifest.write(ctx.work_dir)
    storage.publish_dir(ctx.work_dir, publish_to)
    return manifest


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
    """`compressor KIND --model IN --out OUT`: check, run, and make OUT the output checkpoint itself (what
    `from_pretrained(OUT)` loads), with the stage's manifest.json beside the weights. Nothing appears at OUT until
    the stage finished: it runs into a hidden sibling directory that is renamed into place."""
    out_dir = Path(out).expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty directory; choose a new one")
    local = Path(model_path_in).expanduser().resolve()
    model = ModelRef(path=str(local) if local.exists() else model_path_in, key=f"path:{local}")
    stage_kind = stage_kinds.get(kind)
    stage_kind.check(spec, read_config(model))
    planned = stage_kind.derived(spec, data or {})  # no plan: its figures are derived here, before anything runs
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create it ({exc.strerror})") from None
    ctx = StageContext(
        teacher=ModelRef(path=teacher, key=f"path:{teacher}") if teacher else None,
        data=data or {},
        seed=seed,
        storage_path=str(out_dir.parent),
        data_root=str(out_dir.parent / "_data"),
        run_name=f"{kind}-{out_dir.name}",
        quiet=quiet,
        planned=planned,
    )
    from compressor.cache import stage_key

    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        manifest = execute_stage(
            kind,
            kind,
            spec,
            model,
            ctx,
            stage_key(kind, spec, model.key, output_version=stage_kinds.get(kind).output_version),
            str(staging),
        )
        drop_scratch(manifest)
        if (staging / "model" / "config.json").is_file():  # the checkpoint becomes OUT; the stage's files join it
            for item in staging.iterdir():
                if item.name not in ("model", "manifest.json"):
                    item.rename(staging / "model" / item.name)
            manifest.model_uri = "."
            manifest.write(staging / "model")
            staging = staging / "model"
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}", ignore_errors=True)
    return manifest


def drop_scratch(manifest: Manifest) -> None:
    """Delete what a stage kept only until its output was published (distill's Ray Train checkpoints)."""
    for uri in manifest.details.get("scratch") or []:
        storage.remove(uri)
