"""GPTQ and AWQ through GPTQModel: calibration text -> GPTQModel -> a GPTQ or AWQ (GEMM) checkpoint with its tokenizer.

The two methods share everything but GPTQModel's QuantizeConfig, the kernel AWQ packs with on CPU, and what the
manifest records. Same code for `compressor quantize` and pipelines. GPTQModel prints a lot to stdout (tables,
its own bars); that goes to gptqmodel.log beside the model, and the user sees one progress bar over decoder layers."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

from compressor import text_sources
from compressor.contract.context import StageContext
from compressor.contract.kind import StageResult
from compressor.manifest import ModelRef
from compressor.models import read_config
from compressor.stages.quantize import alignment, footprint
from compressor.stages.quantize.spec import AWQSpec, GPTQSpec

DEFAULT_SAMPLES = 128  # GPTQ's customary calibration size (the paper used 128 x 2048 tokens); AWQ's too
# GPTQModel packs AWQ weights with its portable torch kernel on CPU; its default AWQ packer (awq_gemm) is CUDA-only.
# The layout written (GEMM) is the same whichever packs it.
AWQ_PACK_BACKEND = "awq_torch"


def prepare_environment() -> None:
    """Settings GPTQModel reads when its thread pool starts; call before the first `import gptqmodel`."""
    # Its pool carves a 2-worker "model_loader:cpu" pool out of the "cpu" pool, whose default size is
    # (cores + 1) // 2. On 1-2 cores that is 1, and loading fails: "Virtual pool ... requests 2 workers but
    # parent 'cpu' only has 1". Two workers is the minimum that works; more cores keep GPTQModel's default.
    workers = os.environ.get("GPTQMODEL_CPU_WORKERS", "")
    if (workers.isdigit() and int(workers) < 2) or (not workers and (os.cpu_count() or 1) < 3):
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"


def source_dir(model: ModelRef) -> Optional[Path]:
    """The input checkpoint on local disk (a hub model is in the HF cache once GPTQModel has loaded it)."""
    if Path(model.path).is_dir():
        return Path(model.path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model.path, revision=model.revision, local_files_only=True))
    except Exception:  # not cached (or not a hub id): sizes are then reported without the input side
        return None


def calibration(spec: GPTQSpec | AWQSpec, ctx: StageContext, tokenizer, config: dict) -> list[dict]:
    """[{input_ids, attention_mask}] rows of seq_len tokens from the pipeline data source."""
    blocks = text_sources.calibration_blocks(
        ctx,
        spec.calibration,
        tokenizer,
        spec.samples,
        spec.seq_len,
        config.get("max_position_embeddings"),
        DEFAULT_SAMPLES,
        "quantize",
    )
    return [{"input_ids": row, "attention_mask": [1] * len(row)} for row in blocks.tolist()]


def quantize_config(spec: GPTQSpec | AWQSpec, group_size: int, offload_dir: Optional[Path] = None):
    from gptqmodel import QuantizeConfig

    kwargs = {"offload_to_disk_path": str(offload_dir)} if offload_dir else {}
    if spec.method == "awq":
        return QuantizeConfig(
            quant_method="awq", format="gemm", bits=spec.bits, group_size=group_size, sym=not spec.zero_point, **kwargs
        )
    return QuantizeConfig(
        bits=spec.bits,
        group_size=group_size,
        desc_act=spec.desc_act,
        sym=spec.sym,
        damp_percent=spec.damp_percent,
        **kwargs,
    )


def load_dtype(spec: GPTQSpec | AWQSpec):
    import torch

    return None if spec.dtype == "auto" else getattr(torch, spec.dtype)


def kernel_here(spec: GPTQSpec | AWQSpec, resolution: alignment.Resolution) -> str:
    """The kernel class GPTQModel picks for this checkpoint on this machine (a GPU node may pick another)."""
    import torch
    from gptqmodel.utils.importer import hf_select_quant_linear_v2

    device = "cuda" if torch.cuda.is_available() else "cpu"
    awq = spec.method == "awq"
    try:
        cls = hf_select_quant_linear_v2(
            bits=spec.bits,
            group_size=resolution.group_size,
            desc_act=False if awq else spec.desc_act,
            sym=not spec.zero_point if awq else spec.sym,
            format="gemm" if awq else "gptq",
            quant_method=spec.method,
            pack=False,
            device_map=device,
            backend=resolution.backend or "auto",
        )
    except (ValueError, NotImplementedError) as exc:  # e.g. a pinned GPU kernel, quantized on CPU for GPU serving
        return f"none on {device} ({exc})"
    return cls.__name__


def pin_backend(model_dir: Path, backend: str) -> None:
    """transformers (and so lm-eval) read `quantization_config.backend` from config.json when loading."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["backend"] = backend
    path.write_text(json.dumps(config, indent=2))


def layer_losses(model_dir: Path, work_dir: Path, method: str = "gptq") -> list[float]:
    """Move GPTQModel's per-module log (layer, module, loss, ...) out of the checkpoint; return the losses."""
    src = model_dir / "quant_log.csv"
    if not src.is_file():
        return []
    dst = work_dir / f"{method}_modules.csv"
    shutil.move(src, dst)
    with dst.open() as fh:  # AWQ logs "not applicable" for layers it scales together with another
        return [float(row["loss"]) for row in csv.DictReader(fh) if _is_number(row.get("loss"))]


def _is_number(text: Optional[str]) -> bool:
    try:
        float(text or "")
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def gptqmodel_output(log_path: Path):
    """Send GPTQModel's stdout to a file; on failure show its tail, since the work dir is then deleted.

    GPTQModel also writes per-layer stats under ./logs/ of the current directory, so run it from the stage's
    work dir: they stay with the stage output instead of littering wherever the user started compressor."""
    cwd = os.getcwd()
    with open(log_path, "w") as log:
        try:
            os.chdir(log_path.parent)
            with contextlib.redirect_stdout(log):
                yield
        except BaseException:
            log.flush()
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            print("GPTQModel's last output:\n" + "\n".join(tail), file=sys.stderr, flush=True)
            raise
        finally:
            os.chdir(cwd)


def run_gptqmodel(
    spec: GPTQSpec | AWQSpec,
    model: ModelRef,
    resolution: alignment.Resolution,
    rows: list[dict],
    num_layers: Optional[int],
    ctx: StageContext,
) -> tuple[str, str]:
    """GPTQModel load -> quantize -> save into ctx.model_dir; returns (kernel here, dtype of the saved model)."""
    work = Path(ctx.work_dir)
    offload = work / "offload"  # GPTQModel parks finished layers on disk to bound memory
    with gptqmodel_output(work / "gptqmodel.log"):
        from gptqmodel import GPTQModel

        from compressor import remote_code

        extra = {"revision": model.revision} if model.revision else {}
        qmodel = GPTQModel.load(
            model.path,
            quantize_config(spec, resolution.group_size, offload),
            dtype=load_dtype(spec),
            trust_remote_code=remote_code.enabled(),
            **extra,
        )
        ticks = ctx.progress(range(num_layers or 0), total=num_layers, desc=f"{spec.method.upper()} layers")
        next(ticks, None)  # draws 0/N; each quantized layer advances it (a layer is reported twice: done, finalized)
        qmodel.layer_callback = lambda layer_idx, submodule_finalized: (
            None if submodule_finalized else next(ticks, None)
        )
        packer = {"backend": AWQ_PACK_BACKEND} if spec.method == "awq" else {}
        qmodel.quantize(rows, batch_size=spec.batch_size, **packer)
        for _ in ticks:  # close the bar
            pass
        qmodel.save(str(ctx.model_dir))
        kernel = kernel_here(spec, resolution)
    shutil.rmtree(offload, ignore_errors=True)
    return kernel, str(qmodel.model.dtype).removeprefix("torch.")


def quantize(spec: GPTQSpec | AWQSpec, model: ModelRef, ctx: StageContext) -> StageResult:
    prepare_environment()
    from compressor.models import load_tokenizer, save_tokenizer

    config = read_config(model, fetch=True)
    resolution = alignment.resolve(spec, config)
    for warning in resolution.warnings:
        ctx.info(f"warning: {warning}")
    tokenizer = load_tokenizer(model.path, revision=model.revision)
    rows = calibration(spec, ctx, tokenizer, config)
    kernel, dtype = run_gptqmodel(spec, model, resolution, rows, config.get("num_hidden_layers"), ctx)

    out, work = ctx.model_dir, Path(ctx.work_dir)
    save_tokenizer(tokenizer, out)  # GPTQModel's copy carries a tokenizer_class older transformers cannot read
    if resolution.backend:
        pin_backend(out, resolution.backend)
    losses = layer_losses(out, work, spec.method)
    ctx.log_artifact(work / "gptqmodel.log")

    details = describe(spec, model, resolution, rows, out, kernel, dtype)
    metrics = {
        k: float(details[k])
        for k in ("linear_compression", "compression", "linear_bytes_out", "bytes_out")
        if details[k] is not None
    }
    metrics["group_size_used"] = float(resolution.group_size)  # the spec (logged as params) has the requested one
    if losses:
        metrics.update({f"{spec.method}_loss_mean": sum(losses) / len(losses), f"{spec.method}_loss_max": max(losses)})
    ctx.log_metrics(metrics)
    ctx.info(
        f"quantize: {spec.method} {spec.bits}-bit g{resolution.group_size}, linear weights "
        f"{details['linear_bytes_in'] or '?'} -> {details['linear_bytes_out']} bytes ({details['linear_compression'] or '?'}x), kernel here: {kernel}"
    )
    return StageResult(metrics=metrics, details=details)


def describe(
    spec: GPTQSpec | AWQSpec,
    model: ModelRef,
    resolution: alignment.Resolution,
    rows: list[dict],
    out: Path,
    kernel: str,
    dtype: str,
) -> dict:
    """The manifest details: settings as applied, kernel, calibration, and bytes against the input."""
    src = source_dir(model)
    linear_in = footprint.linear_bytes(src) if src else None
    total_in = footprint.total_bytes(src) if src else None
    linear_out, total_out = footprint.linear_bytes(out), footprint.total_bytes(out)
    settings = (
        {"zero_point": spec.zero_point, "format": "gemm"}
        if spec.method == "awq"
        else {"desc_act": spec.desc_act, "sym": spec.sym, "damp_percent": spec.damp_percent, "format": "gptq"}
    )
    return {
        "method": spec.method,
        "bits": spec.bits,
        "group_size": resolution.group_size,
        "requested_group_size": spec.group_size,
        **settings,
        "dtype": dtype,
        "backend": resolution.backend or "auto",
        "kernel_here": kernel,
        "misaligned_layers": [lin.name for lin in resolution.misaligned],
        "on_misaligned": spec.on_misaligned,
        "calibration": {"samples": len(rows), "seq_len": len(rows[0]["input_ids"]) if rows else 0},
        "linear_bytes_in": linear_in,
        "linear_bytes_out": linear_out,
        "bytes_in": total_in,
        "bytes_out": total_out,
        "linear_compression": round(linear_in / linear_out, 3) if linear_in else None,
        "compression": round(total_in / total_out, 3) if total_in else None,
        "gptqmodel_version": metadata.version("gptqmodel"),
    }
