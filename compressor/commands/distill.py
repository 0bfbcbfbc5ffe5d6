"""`compressor distill`: the distill stage on its own, from a student checkpoint to a new one."""

from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from compressor.errors import UserError


class LossKind(str, Enum):
    forward_kl = "forward_kl"
    reverse_kl = "reverse_kl"


class Zero(str, Enum):
    zero0 = "0"
    zero1 = "1"
    zero2 = "2"
    zero3 = "3"


def build_spec(**options):
    from pydantic import ValidationError

    from compressor.config.stages import DistillSpec

    try:
        return DistillSpec(data="distill", **options)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = f"--{str(error['loc'][-1]).replace('_', '-')}" if error["loc"] else "options"
        # "give only one of `steps` and `tokens`" -> "... `--steps` and `--tokens`": the names on this command line
        message = re.sub(r"`(\w+)`", lambda m: f"`--{m.group(1).replace('_', '-')}`",
                         error["msg"].removeprefix("Value error, "))
        raise UserError(f"distill {where}: {message}") from None


def register(app: typer.Typer) -> None:
    @app.command()
    def distill(
        teacher: str = typer.Option(..., "--teacher", help="Teacher checkpoint directory, stage output directory, or zoo:NAME."),
        student: str = typer.Option(..., "--student", help="Student checkpoint directory (e.g. a prune output) or zoo:NAME."),
        out: str = typer.Option(..., "--out", help="New directory for the distilled checkpoint (+ manifest.json)."),
        data: Optional[str] = typer.Option(
            None, "--data", help="Text/JSONL/parquet path, hf:ORG/NAME[:CONFIG][@SPLIT] or zoo:NAME (default for zoo teachers: their corpus)."
        ),
        steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (or give --tokens)."),
        tokens: Optional[float] = typer.Option(None, "--tokens", help="Token budget, e.g. 2e6 (or give --steps)."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per packed sequence."),
        global_batch: int = typer.Option(8, "--global-batch", help="Sequences per optimizer step over all workers."),
        micro_batch: int = typer.Option(4, "--micro-batch", help="Sequences per worker per forward pass."),
        lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate."),
        min_lr: float = typer.Option(1e-5, "--min-lr", help="Final learning rate of the cosine decay."),
        warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Default: 10% of the steps, at most 40."),
        loss: LossKind = typer.Option(LossKind.forward_kl, "--loss", help="KL direction."),
        temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature (KL scaled by T^2)."),
        alpha: float = typer.Option(0.0, "--alpha", help="Weight of the hard-label CE term (0 = logit-only KD)."),
        chunk_tokens: int = typer.Option(1024, "--chunk-tokens", help="Tokens per chunk of the KD loss."),
        workers: int = typer.Option(1, "--workers", help="Ray Train workers."),
        zero: Zero = typer.Option(Zero.zero3, "--zero", help="ZeRO stage of the student."),
        bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="Default: bf16 on GPUs that support it."),
        gpus_per_worker: float = typer.Option(0, "--gpus-per-worker", help="0 trains on CPU (gloo)."),
        cpus_per_worker: float = typer.Option(1, "--cpus-per-worker", help="CPUs (and torch threads) per worker."),
        checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Steps between checkpoints."),
        max_failures: int = typer.Option(2, "--max-failures", help="Worker-group restarts before giving up."),
        text_field: str = typer.Option("text", "--text-field", help="Text column of JSONL / parquet / hf data."),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)."),
        seed: int = typer.Option(0, "--seed"),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
        trust_remote_code: bool = typer.Option(
            False, "--trust-remote-code", help="Run Python code the checkpoint ships (config.json auto_map); only for "
                                                "a source you trust."),
    ) -> None:
        """Knowledge distillation: train the student on the frozen teacher's logits (DeepSpeed ZeRO in Ray Train)."""
        from compressor import remote_code
        from compressor.config.schema import DataSource
        from compressor.preflight import check_standalone
        from compressor.runner import resolve_model, run_standalone

        if trust_remote_code:
            remote_code.allow(teacher)

        spec = build_spec(
            steps=steps, tokens=tokens, seq_len=seq_len, global_batch=global_batch, micro_batch=micro_batch, lr=lr,
            min_lr=min_lr, warmup_steps=warmup_steps, workers=workers, gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker, checkpoint_every=checkpoint_every, max_failures=max_failures,
            loss={"kind": loss.value, "temperature": temperature, "alpha": alpha, "chunk_tokens": chunk_tokens},
            deepspeed={"zero_stage": int(zero.value), "bf16": bf16},
        )
        teacher_dir, zoo_name = resolve_model(teacher)
        student_dir, _ = resolve_model(student)
        if data is None:
            if zoo_name is None:
                raise UserError("--data: required for a teacher outside the zoo (a text/JSONL/parquet file or directory, or an hf: dataset)")
            data = f"zoo:{zoo_name}"
        if address:
            os.environ["RAY_ADDRESS"] = address
        source = DataSource(source=data, seq_len=seq_len, text_field=text_field)
        check_standalone("distill", spec, student_dir, out, source, "--data", 1, seq_len, teacher_dir=teacher_dir,
                         model_flag="--student")  # one sequence here; the driver checks the whole budget
        manifest = run_standalone("distill", spec, student_dir, out, data={"distill": source}, teacher=teacher_dir,
                                  seed=seed, quiet=quiet)
        metrics, details = manifest.metrics, manifest.details
        typer.echo(f"distilled {details['steps']} steps ({details['tokens']:,} tokens) on {details['workers']} worker(s): "
                   f"loss {metrics.get('loss', float('nan')):.4f}, {metrics.get('mean_tokens_per_s', 0):.0f} tokens/s; "
                   f"wrote {Path(out).expanduser().resolve()}")
