"""`compressor prune`: the prune stage on its own, from a checkpoint directory to a new one."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from compressor.errors import UserError

TARGET_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_layers")


class DepthMetric(str, Enum):
    bi = "bi"
    loss = "loss"


def parse_target(text: str) -> dict[str, int]:
    """`hidden_size=3072,intermediate_size=9216` -> {"hidden_size": 3072, ...}."""
    target: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in TARGET_KEYS:
            raise UserError(f"--target: {item!r} is not KEY=VALUE with KEY one of {', '.join(TARGET_KEYS)}")
        if not value.strip().isdigit() or int(value) <= 0:
            raise UserError(f"--target: {key}={value!r} must be a positive integer")
        target[key] = int(value)
    return target


def parse_layers(flag: str, text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a comma-separated list of layer indices") from None


def build_spec(target: str, keep_layers: Optional[str], drop_layers: Optional[str], **options):
    from pydantic import ValidationError

    from compressor.config.stages import PruneSpec, PruneTarget

    if keep_layers is not None and drop_layers is not None:
        raise UserError("--keep-layers and --drop-layers: give only one of them (the layers to keep, or to drop)")
    layers = {"keep_layers": parse_layers("--keep-layers", keep_layers), "drop_layers": parse_layers("--drop-layers", drop_layers)}
    try:
        shape = PruneTarget(**parse_target(target), **{k: v for k, v in layers.items() if v is not None})
        return PruneSpec(target=shape, calibration="calib", **options)
    except ValidationError as exc:
        raise UserError(f"prune options: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def register(app: typer.Typer) -> None:
    @app.command()
    def prune(
        model: str = typer.Option(..., "--model", help="Checkpoint directory, a stage output directory, or zoo:NAME."),
        out: str = typer.Option(..., "--out", help="New directory for the pruned checkpoint (+ manifest.json)."),
        target: str = typer.Option("", "--target", help="KEY=VALUE,... with KEY in " + ", ".join(TARGET_KEYS) + "."),
        keep_layers: Optional[str] = typer.Option(None, "--keep-layers", help="Comma-separated layer indices to keep."),
        drop_layers: Optional[str] = typer.Option(None, "--drop-layers", help="Comma-separated layer indices to drop."),
        calibration: Optional[str] = typer.Option(
            None, "--calibration",
            help="Text/JSONL/parquet path, hf:ORG/NAME[:CONFIG][@SPLIT] or zoo:NAME (default for zoo models: their corpus).",
        ),
        samples: int = typer.Option(256, "--samples", min=1, help="Calibration sequences."),
        seq_len: Optional[int] = typer.Option(
            None, "--seq-len", min=1, help="Tokens per sequence (default 512, capped at the model's context)."
        ),
        depth_metric: DepthMetric = typer.Option(DepthMetric.bi, "--depth-metric", help="Layer ranking for num_layers."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Calibration sequences per forward pass."),
        align: int = typer.Option(32, "--align", min=1, help="Pruned widths must be multiples of this."),
        group_size: Optional[int] = typer.Option(
            None, "--quantize-group-size", help="Warn when widths will not divide by it."
        ),
        text_field: str = typer.Option("text", "--text-field", help="Text column of JSONL / parquet / hf data."),
        seed: int = typer.Option(0, "--seed"),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
        trust_remote_code: bool = typer.Option(
            False, "--trust-remote-code", help="Run Python code the checkpoint ships (config.json auto_map); only for "
                                                "a source you trust."),
    ) -> None:
        """Minitron structured pruning: rank heads, neurons, channels and layers on calibration text, then slice."""
        from compressor import remote_code
        from compressor.config.schema import DataSource
        from compressor.preflight import check_standalone
        from compressor.runner import resolve_model, run_standalone

        if trust_remote_code:
            remote_code.allow(model)

        spec = build_spec(target, keep_layers, drop_layers, samples=samples, seq_len=seq_len,
                          depth_metric=depth_metric.value, batch_size=batch_size, align=align, quantize_group_size=group_size)
        model_dir, zoo_name = resolve_model(model)
        if calibration is None:
            if zoo_name is None:
                raise UserError("--calibration: required for a model outside the zoo "
                                "(a text/JSONL/parquet file or directory, or an hf: dataset)")
            calibration = f"zoo:{zoo_name}"
        source = DataSource(source=calibration, samples=samples, text_field=text_field, **({"seq_len": seq_len} if seq_len else {}))
        data = {"calib": source}
        check_standalone("prune", spec, model_dir, out, source, "--calibration", samples, seq_len)  # before loading
        manifest = run_standalone("prune", spec, model_dir, out, data=data, seed=seed, quiet=quiet)
        details = manifest.details
        typer.echo(f"pruned {details['params_before']:,} -> {details['params_after']:,} parameters "
                   f"({details['target_shape']}); wrote {Path(out).expanduser().resolve()}")
