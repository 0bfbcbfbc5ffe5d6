"""`compressor generate --teacher T --prompts P --out OUT [--FIELD VALUE ...] [KEY=VALUE ...]`: the generate stage alone.

The teacher is a checkpoint directory, a stage directory or zoo:NAME (local weights, `--backend hf|vllm`), or
`openai:MODEL` with `--base-url URL --api-key-env NAME` (an API). The other options are generated from the spec, as
for every stage command. OUT becomes the dataset: data/*.parquet, review.md and manifest.json. The committed answers
are kept beside OUT (`.answers-<key>`), so a re-run of an interrupted command sends only what has no answer yet."""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path
from typing import Optional

import typer

from compressor.errors import UserError

TEACHER_HELP = "Checkpoint directory, stage directory or zoo:NAME; or openai:MODEL for an OpenAI-compatible API."
PROMPTS_HELP = ".jsonl / .parquet file or directory (local or storage URI), or hf:ORG/NAME[:CONFIG][@SPLIT]."


def _signature(options: dict) -> inspect.Signature:
    from compressor.commands import stage

    P = inspect.Parameter
    params = [
        P("teacher", P.KEYWORD_ONLY, annotation=str, default=typer.Option(..., "--teacher", help=TEACHER_HELP)),
        P("prompts", P.KEYWORD_ONLY, annotation=str, default=typer.Option(..., "--prompts", help=PROMPTS_HELP)),
        P(
            "out",
            P.KEYWORD_ONLY,
            annotation=str,
            default=typer.Option(..., "--out", help="New directory for the dataset."),
        ),
    ]
    for path, entry in options.items():
        decl = f"{stage.flag(path)}/--no-{stage.flag(path)[2:]}" if entry["type"] is bool else stage.flag(path)
        params.append(
            P(
                "opt__" + "__".join(path),
                P.KEYWORD_ONLY,
                annotation=Optional[entry["type"]],
                default=typer.Option(None, decl, help=stage._help(path, entry), show_default=False),
            )
        )
    params += [
        P(
            "address",
            P.KEYWORD_ONLY,
            annotation=Optional[str],
            default=typer.Option(None, "--address", help="Ray cluster address (local teachers)."),
        ),
        P("quiet", P.KEYWORD_ONLY, annotation=bool, default=typer.Option(False, "--quiet", help="No progress bars.")),
        P(
            "overrides",
            P.KEYWORD_ONLY,
            annotation=Optional[list[str]],
            default=typer.Argument(
                None, help="KEY=VALUE spec fields, e.g. filters.labels=[yes,no].", show_default=False
            ),
        ),
    ]
    return inspect.Signature(params)


def make_command(kind):
    from compressor.commands import stage

    options = {p: e for p, e in stage._option_specs(kind).items() if p != ("prompts",)}

    def command(**given) -> None:
        data = stage._spec_data(options, given, given["overrides"] or [])
        if given["teacher"].startswith("openai:"):
            data["teacher"] = given["teacher"]
        spec = stage.build_spec(kind, {**data, "prompts": "prompts"})
        manifest = run_generate(
            spec, given["teacher"], given["prompts"], given["out"], 0, given["quiet"], given["address"]
        )
        typer.echo(f"{kind.result_line(manifest)}; wrote {Path(given['out']).expanduser().resolve()}")

    command.__signature__ = _signature(options)
    command.__doc__ = kind.summary
    return command


def run_generate(spec, teacher: str, prompts: str, out: str, seed: int = 0, quiet: bool = False, address=None):
    """Check, run into a hidden sibling of OUT, and rename it into place; the answers store stays beside OUT."""
    from compressor import contract
    from compressor.cache import stage_key
    from compressor.config.schema import DataSource
    from compressor.contract.context import StageContext
    from compressor.manifest import ModelRef
    from compressor.runner import execute_stage
    from compressor.stages.generate.job import api_key, teacher_identity

    out_dir = Path(out).expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty directory; choose a new one")
    if spec.api_model:
        api_key(spec)  # an unset variable: exit 2 before anything is read or written
        ref = ModelRef(path=teacher, key=f"api:{spec.base_url}:{spec.api_model}")
    else:
        ref = _local_teacher(teacher)
    from compressor.text_sources import source_identity

    source = DataSource(source=prompts)
    try:
        identity = source_identity(source)
    except UserError as exc:
        raise UserError(f"--prompts: {exc}") from None
    if address:
        os.environ["RAY_ADDRESS"] = address
    extra = {"prompts": {"content": identity}, "teacher": teacher_identity(spec, ref), "seed": seed}
    key = stage_key("generate", spec, "", extra, contract.get("generate").output_version)
    ctx = StageContext(
        teacher=ref, shared_teacher=ref, data={"prompts": source}, seed=seed, quiet=quiet, ray_address=address
    )
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        manifest = execute_stage("generate", "generate", spec, ref, ctx, key, str(staging))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _local_teacher(teacher: str):
    from compressor.config.schema import TeacherSpec
    from compressor.models import resolve_model, zoo_ref
    from compressor.planning import resolve_teacher

    path, zoo_name = resolve_model(teacher)
    if not zoo_name and not (Path(path) / "config.json").is_file():
        raise UserError(f"--teacher {teacher}: no checkpoint there (config.json missing); or give openai:MODEL")
    return resolve_teacher(TeacherSpec(model=zoo_ref(zoo_name) if zoo_name else path), "")[0]


def register(app: typer.Typer) -> None:
    """The generate stage's command: its own options (a teacher and prompts, not --model), before the generated ones
    of compressor/commands/stage.py."""
    from compressor.commands import stage
    from compressor.contract import get

    kind = get("generate")
    stage.add_command(app, kind, make_command(kind))
