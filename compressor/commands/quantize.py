"""`compressor quantize`: the GPTQ stage on its own, from a checkpoint directory to a new GPTQ checkpoint."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from compressor.config.stages import GPTQ_BACKENDS
from compressor.errors import UserError

Backend = Enum("Backend", {name: name for name in GPTQ_BACKENDS}, type=str)


class OnMisaligned(str, Enum):
    error = "error"
    largest_divisor = "largest_divisor"
    int8_kernel = "int8_kernel"


class Dtype(str, Enum):
    auto = "auto"
    float16 = "float16"
    bfloat16 = "bfloat16"


def register(app: typer.Typer) -> None:
    @app.command()
    def quantize(
        model: str = typer.Option(..., "--model", help="Checkpoint directory, a stage output directory, or zoo:NAME."),
        out: str = typer.Option(..., "--out", help="New directory for the GPTQ checkpoint (+ manifest.json)."),
        bits: int = typer.Option(4, "--bits", help="4 or 8."),
        group_size: int = typer.Option(128, "--group-size", help="Input channels per scale; -1 = per output channel."),
        calibration: Optional[str] = typer.Option(
            None, "--calibration",
            help="Text/JSONL/parquet path, hf:ORG/NAME[:CONFIG][@SPLIT] or zoo:NAME (default for zoo models: their corpus).",
        ),
        samples: int = typer.Option(128, "--samples", min=1, help="Calibration sequences."),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="Tokens per sequence (default 512, capped at the model's context)."),
        desc_act: bool = typer.Option(False, "--desc-act/--no-desc-act", help="Act-order: columns by decreasing activation."),
        sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric (no zero point) or asymmetric quantization."),
        damp_percent: float = typer.Option(0.01, "--damp-percent", help="Hessian dampening (fraction of its mean diagonal)."),
        batch_size: int = typer.Option(1, "--batch-size", min=1, help="Calibration sequences per forward pass."),
        on_misaligned: OnMisaligned = typer.Option(
            OnMisaligned.error, "--on-misaligned", help="When group_size does not divide a layer's width."
        ),
        backend: Optional[Backend] = typer.Option(None, "--backend", help="Pin the GPTQModel kernel used at load time (default: auto)."),
        dtype: Dtype = typer.Option(Dtype.auto, "--dtype", help="Dtype of the non-quantized weights and activations."),
        text_field: str = typer.Option("text", "--text-field", help="Text column of JSONL / parquet / hf data."),
        seed: int = typer.Option(0, "--seed"),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
        trust_remote_code: bool = typer.Option(
            False, "--trust-remote-code", help="Run Python code the checkpoint ships (config.json auto_map); only for "
                                                "a source you trust."),
    ) -> None:
        """GPTQ through GPTQModel: a 4/8-bit checkpoint that GPTQModel, transformers, lm-eval and vLLM load."""
        from pydantic import ValidationError

        from compressor import remote_code
        from compressor.config.schema import DataSource
        from compressor.config.stages import QuantizeSpec
        from compressor.preflight import check_standalone
        from compressor.runner import resolve_model, run_standalone

        if trust_remote_code:
            remote_code.allow(model)

        model_dir, zoo_name = resolve_model(model)
        if calibration is None:
            if zoo_name is None:
                raise UserError("--calibration: required for a model outside the zoo (a text/JSONL/parquet file, directory, or hf: dataset)")
            calibration = f"zoo:{zoo_name}"
        try:
            spec = QuantizeSpec(
                bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, damp_percent=damp_percent,
                batch_size=batch_size, calibration="calib", samples=samples, seq_len=seq_len,
                on_misaligned=on_misaligned.value, backend=backend.value if backend else None, dtype=dtype.value,
            )
            data = {"calib": DataSource(source=calibration, samples=samples, text_field=text_field,
                                        **({"seq_len": seq_len} if seq_len else {}))}
        except ValidationError as exc:
            error = exc.errors()[0]
            flag = "--" + str(error["loc"][0]).replace("_", "-") if error["loc"] else "options"
            raise UserError(f"{flag}: {error['msg'].removeprefix('Value error, ')}") from None
        check_standalone("quantize", spec, model_dir, out, data["calib"], "--calibration", samples, seq_len)
        manifest = run_standalone("quantize", spec, model_dir, out, data=data, seed=seed, quiet=quiet)
        d = manifest.details
        typer.echo(
            f"quantized to {d['bits']}-bit, group size {d['group_size']}: linear weights "
            f"{d['linear_bytes_in'] or '?'} -> {d['linear_bytes_out']} bytes ({d['linear_compression'] or '?'}x), "
            f"kernel here {d['kernel_here']}; wrote {Path(out).expanduser().resolve()}"
        )
