"""docs/reference.md is generated from the schema and must be current; every schema field appears in it. Every
command line and pipeline YAML of README.md and docs/ works with the real CLI and schema."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from compressor import docs_gen
from compressor.config.schema import PipelineSpec
from compressor.contract import kinds


def test_reference_is_current():
    current = docs_gen.REFERENCE.read_text()
    assert current == docs_gen.generate(), "docs/reference.md is stale: run `python -m compressor.docs_gen`"
    assert docs_gen.main(["--check"]) == 0


def test_reference_covers_every_model_and_field():
    text = docs_gen.generate()
    for model in [PipelineSpec, *(m for kind in kinds().values() for m in docs_gen.spec_models(kind.spec))]:
        assert f"## {model.__name__}\n" in text
        for name in model.model_fields:
            assert f"| `{name}` |" in text
    assert "| `zero_stage` | `0` \\| `1` \\| `2` \\| `3` | `3` |" in text  # nested DeepSpeedOptions, Literal type
    assert "| `global_batch` | int, > 0 | `8` |" in text  # bounds rendered from Field(gt=0)


def test_check_mode_detects_a_stale_file(tmp_path, monkeypatch):
    stale = tmp_path / "reference.md"
    stale.write_text(docs_gen.generate().replace("global_batch", "global_batch_OLD"))
    monkeypatch.setattr(docs_gen, "REFERENCE", stale)
    assert docs_gen.main(["--check"]) == 1


# ----------------------------------------------------------------------------- README.md and docs/ against the CLI
# Every fenced `compressor ...` command line is parsed by the real CLI (and, for a stage command, its options build
# the stage's spec; for a pipeline command, its overrides apply to the file), and every fenced YAML block with
# `stages:` validates: a whole pipeline as it is, a fragment on top of a shipped pipeline. A doc that drifts from
# the CLI or the schema fails here.
ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SHELL = ("", "bash", "sh", "shell", "console")
ALTERNATIVE = re.compile(r"#\s*or\b")  # a YAML line commented `# or: ...` replaces the entry above it


def fenced(lang: tuple[str, ...]) -> list[tuple[str, str]]:
    """(file:line, body) of every fenced block in one of `lang`."""
    return [
        (f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}", m.group(2))
        for path in DOCS
        for text in [path.read_text()]
        for m in FENCE.finditer(text)
        if m.group(1) in lang
    ]


def command_lines() -> list[tuple[str, str]]:
    found = []
    for where, body in fenced(SHELL):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            line = line.split(" -- ", 1)[1] if " -- compressor " in line else line  # `ray job submit ... -- ...`
            if line.startswith("compressor "):
                found.append((where, line))
    return found


def placeholders(tokens: list[str]) -> list[str]:
    """Usage placeholders made arguments: `[--follow]` -> `--follow`; `[...]` and `...` (more of the same) dropped,
    except `...` as an option's value (`--address ...`), which becomes X."""
    out, optional = [], False
    for token in tokens:
        if token in ("[...]", "..."):
            if token == "..." and out and out[-1].startswith("--"):
                out.append("X")
            continue
        if token.startswith("[") and not optional:
            token, optional = token[1:], True
        if optional and token.endswith("]"):
            token, optional = token[:-1], False
        out.append(token)
    return out


def dry_parse(args: list[str]):
    """The click context of the command `args` name, parsed with the real CLI and not invoked."""
    import typer
    from typer.core import TyperGroup

    from compressor.cli import application

    command = typer.main.get_command(application())
    ctx = command.make_context("compressor", list(args), resilient_parsing=False)
    while isinstance(ctx.command, TyperGroup):
        rest = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        name, sub, rest = ctx.command.resolve_command(ctx, rest)
        ctx = sub.make_context(name, rest, parent=ctx, resilient_parsing=False)
    return ctx


def check_command(line: str) -> None:
    from compressor.commands import stage
    from compressor.commands.pipeline import resolve_pipeline
    from compressor.config.load import load_pipeline
    from compressor.contract import kinds

    ctx = dry_parse(placeholders(shlex.split(line, comments=True)[1:]))
    kind = kinds().get(ctx.command.name)
    if kind is not None and "model" in ctx.params:  # a stage command: its options build the stage's spec
        stage.spec_of(kind, stage._option_specs(kind), ctx.params)
    pipeline = ctx.params.get("pipeline")
    path = ROOT / pipeline if pipeline and (ROOT / pipeline).is_file() else resolve_pipeline(pipeline)
    if "overrides" in ctx.params and path.is_file():  # a pipeline command: its overrides apply to the file
        load_pipeline(path, ctx.params["overrides"] or [])


@pytest.mark.parametrize(
    "where,line", command_lines(), ids=[f"{w} {line.split('#')[0].strip()[:60]}" for w, line in command_lines()]
)
def test_every_documented_command_parses(where, line):
    check_command(line)


def test_a_command_with_a_flag_that_does_not_exist_fails_the_check():
    from compressor.cli import UsageError
    from compressor.errors import UserError

    assert len(command_lines()) > 20
    with pytest.raises(UsageError, match="--asym"):
        check_command("compressor quantize --model IN --out OUT --asym")
    with pytest.raises(UserError, match="--deepspeed: unknown key 'zero'"):
        check_command("compressor distill --teacher T --student S --out O --deepspeed zero=3")
    with pytest.raises(UserError, match="override stages.distill.steps=1e3"):
        check_command("compressor plan pipelines/tiny.yaml stages.distill.steps=1e3")


def pipeline_blocks() -> list[tuple[str, str]]:
    """YAML blocks with `stages:`, each alternative (`# or`) of an entry in its own copy."""
    blocks = []
    for where, body in fenced(("yaml", "yml")):
        if not re.search(r"^stages:", body, re.M):
            continue
        lines = body.splitlines()
        alternatives = [i for i, line in enumerate(lines) if ALTERNATIVE.search(line)]
        blocks.append((where, "\n".join(line for i, line in enumerate(lines) if i not in alternatives)))
        for i in alternatives:
            base = max(j for j in range(i) if j not in alternatives)  # the entry it replaces
            kept = [line if j != base else lines[i] for j, line in enumerate(lines) if j not in alternatives]
            blocks.append((f"{where} (line {i + 1})", "\n".join(kept)))
    return blocks


def as_pipeline(body: str) -> dict:
    """A whole pipeline as it is; a fragment (no `name:`) on top of a shipped pipeline: the tiny one when it uses
    the zoo, else pipelines/llama8b_to_4b.yaml, its stages replaced and its data sources extended."""
    doc = yaml.safe_load(body)
    if "name" in doc:
        return doc
    base = ROOT / ("compressor/pipelines/tiny.yaml" if "zoo:" in body else "pipelines/llama8b_to_4b.yaml")
    shipped = yaml.safe_load(base.read_text())
    return {**shipped, **doc, "data": {**shipped.get("data", {}), **doc.get("data", {})}}


@pytest.mark.parametrize("where,body", pipeline_blocks(), ids=[w for w, _ in pipeline_blocks()])
def test_every_documented_pipeline_validates(where, body, tmp_path, monkeypatch):
    import socket

    from typer.testing import CliRunner

    from compressor.cli import application

    def no_network(*args, **kwargs):
        raise OSError("network access while validating a documented pipeline")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a hub teacher of the docs is not in this cache
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(as_pipeline(body)))
    result = CliRunner().invoke(application(), ["validate", str(path), f"storage={tmp_path / 'storage'}"])
    assert result.exit_code == 0, f"{where}: {result.output}{result.exception!r}"


def test_the_readme_pipeline_is_an_excerpt_of_the_file_it_names():
    where, body = next(b for b in pipeline_blocks() if b[0].startswith("README.md"))
    named = re.search(r"pipelines/\S+\.yaml", body.splitlines()[0]).group(0)
    excerpt, full = yaml.safe_load(body), yaml.safe_load((ROOT / named).read_text())
    assert excerpt["name"] == full["name"] and excerpt["teacher"]["model"] == full["teacher"]["model"]
    for short, whole in zip(excerpt["stages"], full["stages"], strict=True):
        kind = next(k for k in short if k not in ("name", "gate", "resources"))
        assert within(short[kind], whole[kind]), (where, kind, short[kind])


def within(part, whole) -> bool:
    """Every key of `part` is in `whole` with the same value (recursively)."""
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and within(v, whole[k]) for k, v in part.items())
    return part == whole
