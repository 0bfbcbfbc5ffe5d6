"""Runs one stage: the same code path for `compressor <stage>` on the CLI and for a pipeline stage."""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from pydantic import BaseModel

from compressor import __version__, checkpoint, storage
from compressor.config.schema import DataSource, TaskSpec
from compressor.errors import UserError
from compressor.manifest import Manifest, ModelRef
from compressor.stages import stage_module
from compressor.stages.context import StageContext


def input_config(model: ModelRef) -> dict:
    """config.json of a stage's input, read where it lives (a local directory or a storage URI); {} for a hub id or
    a zoo model not built yet (those are checked when loaded)."""
    import json

    if model.path.startswith("zoo:"):
        return {}
    if storage.is_remote(model.path):
        text = storage.read_text(storage.join(model.path, "config.json"))
        if text is None:
            raise UserError(f"model {model.path}: no config.json there; has the stage that makes it been published?")
        return json.loads(text)
    path = Path(model.path).expanduser()
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
    """A ModelRef whose path is a directory on this node. `zoo:NAME` is built (or found) here; a model on remote
    storage (`s3://.../<stage>-<key>/model`) is downloaded into this node's mirror (once per node, under a lock);
    a hub id not resolved by a pipeline is fetched through the Hugging Face cache."""
    if ref.path.startswith("zoo:"):
        from compressor import zoo

        return ref.model_copy(update={"path": str(zoo.ensure_model(ref.path[len("zoo:"):]))})
    if storage.is_remote(ref.path):
        stage_dir = storage.download_stage(storage.stage_dir_of(ref.path))
        return ref.model_copy(update={"path": str(stage_dir / Path(ref.path.rstrip("/")).name)})
    from compressor import hub

    if hub.is_hub_id(ref.path):
        commit = hub.resolve_commit(ref.path, ref.revision)
        return ref.model_copy(update={"path": str(hub._download(ref.path, commit)), "revision": commit})
    return ref


STAGE_LOG = "stage.log"  # third-party output of a pipeline stage, published with it


@contextmanager
def captured_output(log_file: Optional[Path], fds: bool = True) -> Iterator[None]:
    """Send what libraries print while a pipeline stage runs (tqdm bars, logging, Python warnings and, with `fds`,
    C libraries' messages written to file descriptors 1 and 2) to `log_file` instead of the console; restore all
    afterwards. `fds=False` in the driver process, whose console must keep printing. No-op for None or `run -v`."""
    import logging
    import warnings

    from compressor.raylocal import verbose

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
    consoles = [h for h in root.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s: %(message)s"))
    saved_level = root.level
    for h in consoles:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # the log file is where libraries' INFO lines belong, unlike the console
    saved_showwarning = warnings.showwarning
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: stream.write(
        warnings.formatwarning(message, category, filename, lineno, line))
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


def evaluate_ref(model: ModelRef, tasks: list[TaskSpec], batch_size: int | str,
                 num_gpus: float = 0, log_file: Optional[str] = None) -> tuple[dict, float]:
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
        raise UserError(f"evaluation.tasks: unknown lm-eval task(s) {', '.join(unknown)}; "
                        "`lm_eval --tasks list` shows the registry, or give `include:` for a local task directory")


def execute_stage(name: str, kind: str, spec: BaseModel, model: ModelRef, ctx: StageContext, key: str,
                  publish_to: str) -> Manifest:
    """Run the stage on this node into a private scratch dir, write its manifest last and publish the directory to
    `publish_to` (a path or storage URI) from here, then drop the scratch dir. Returns the manifest."""
    module = stage_module(kind)
    ctx.work_dir = storage.scratch_dir(publish_to, f"{name}-{key[:12]}")
    # In pipeline runs (a progress queue to the driver) libraries' output goes to <stage dir>/stage.log, published
    # with the stage and kept as failed_log_uri(publish_to) when it fails.
    log_file = Path(ctx.work_dir) / STAGE_LOG if ctx.progress_queue is not None else None
    try:
        with captured_output(log_file, fds=module.RUNS_AS == "task"):
            return _execute_stage(module, name, kind, spec, model, ctx, key, publish_to)
    except BaseException:
        if log_file is not None and log_file.is_file():
            storage.write_text(failed_log_uri(publish_to), log_file.read_text(errors="replace"))
        raise
    finally:
        shutil.rmtree(ctx.work_dir, ignore_errors=True)


def failed_log_uri(publish_to: str) -> str:
    """Where the log of a stage that failed is kept (its scratch dir, holding stage.log, is dropped)."""
    return publish_to.rstrip("/") + ".log"


def _execute_stage(module, name: str, kind: str, spec: BaseModel, model: ModelRef, ctx: StageContext, key: str,
                   publish_to: str) -> Manifest:
    if module.RUNS_AS == "task":  # a driver-side stage (distill) leaves the loading to its own workers
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
        num_params=checkpoint.logical_num_params(model_dir) if has_model else None,
        bytes=checkpoint.weight_bytes(model_dir) if has_model else None,
        seconds=round(seconds, 3),
        metrics=result.metrics,
        details=result.details,
        compressor_version=__version__,
    )
    ctx.log_metrics({"seconds": seconds, **({"num_params": manifest.num_params, "bytes": manifest.bytes}
                                            if has_model else {})})
    manifest.write(ctx.work_dir)
    storage.publish_dir(ctx.work_dir, publish_to)
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
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked above); the stage is renamed into its place
    ctx = StageContext(
        teacher=ModelRef(path=teacher, key=f"path:{teacher}") if teacher else None,
        data=data or {},
        seed=seed,
        storage_path=str(out_dir.parent),
        data_root=str(out_dir.parent / "_data"),
        run_name=f"{kind}-{out_dir.name}",
        quiet=quiet,
    )
    from compressor.cache import stage_key

    manifest = execute_stage(kind, kind, spec, model, ctx, stage_key(kind, spec, model.key), str(out_dir))
    drop_scratch(manifest)
    return manifest


def drop_scratch(manifest: Manifest) -> None:
    """Delete what a stage kept only until its output was published (distill's Ray Train checkpoints)."""
    for uri in manifest.details.get("scratch") or []:
        storage.remove(uri)
