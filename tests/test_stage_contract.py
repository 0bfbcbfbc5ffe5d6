"""The stage contract (compressor/stages/base.py): every registered kind meets it, and a kind declared outside the
package - here, in this test module - appears in validate, plan, the CLI and the docs with no edit elsewhere."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field
from typer.testing import CliRunner

from compressor import docs_gen, stages
from compressor.config.base import Strict
from compressor.stages.base import CheckResult, StageKind, StageResult

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", list(stages.kinds()))
def test_every_registered_kind_meets_the_contract(name):
    from compressor.config.schema import StageEntry

    kind = stages.get(name)
    assert kind.name == name and kind.summary and kind.runs_as in ("task", "driver")
    assert callable(kind.check) and callable(kind.run) and callable(kind.flops)
    models = docs_gen.spec_models(kind.spec)
    assert models and all(m.model_config.get("extra") == "forbid" for m in models)  # a typo is an error
    assert all(set(m.NOT_IN_KEY) <= set(m.model_fields) for m in models)  # operational fields exist
    assert name in StageEntry.model_fields  # its YAML key
    assert f"| `{name}` |" in docs_gen.generate()
    help_text = subprocess.run([sys.executable, "-m", "compressor", "--help"], capture_output=True, text=True).stdout
    assert (f" {name} " in help_text) == kind.standalone


def test_importing_every_kind_imports_no_torch():
    code = (
        "import sys, compressor.stages as s; s.kinds(); import compressor.config.schema; print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# ----------------------------------------------------------------------------- a kind from outside the package
class ToySpec(Strict):
    """Copy the model, scaling nothing: a kind that exists only in this test."""

    copies: int = Field(1, gt=0, description="How many times to say it copied.")


def toy_run(spec: ToySpec, model, ctx) -> StageResult:
    shutil.copytree(model.path, ctx.model_dir, dirs_exist_ok=True)
    return StageResult(metrics={"copies": float(spec.copies)})


@pytest.fixture
def toy_kind():
    kind = stages.register(
        StageKind(
            name="toy",
            spec=ToySpec,
            summary="Copy the model (a test kind).",
            check=lambda spec, cfg: CheckResult(dict(cfg)),
            run=toy_run,
            flops=lambda spec, given: 1e9 * spec.copies,
            result_line=lambda m: f"copied {m.metrics['copies']:g}x",
        )
    )
    yield kind
    stages.unregister("toy")


def test_a_kind_registered_from_a_test_module_is_everywhere(toy_kind, tiny_teacher, tmp_path):
    from compressor.cli import application

    pipeline = tmp_path / "toy.yaml"
    pipeline.write_text(
        f"name: toy\nteacher: {{model: {tiny_teacher}}}\nstorage: {tmp_path / 'store'}\n"
        "stages:\n  - toy: {copies: 3}\n  - prune: {target: {num_layers: 1}}\n"
    )
    runner = CliRunner()
    validated = runner.invoke(application(), ["validate", str(pipeline)])
    assert validated.exit_code == 0, validated.output
    planned = runner.invoke(application(), ["plan", str(pipeline)], terminal_width=200)
    assert planned.exit_code == 0, planned.output
    assert re.search(r"toy .*1 CPU .*to run .*3\.00e\+09", planned.output), planned.output  # its own FLOPs estimate
    bad = runner.invoke(application(), ["validate", str(pipeline), "stages.0.toy.copies=0"])
    # main(): exit 2; an override's error names the override, not the line of the file it replaced (issue 24)
    assert "override stages.0.toy.copies=0: stages.0.toy.copies: Input should be greater than 0" in str(bad.exception)
    assert "## ToySpec" in docs_gen.generate()

    help_text = runner.invoke(application(), ["toy", "--help"], terminal_width=300).output
    assert "--copies" in help_text and "[default: 1]" in help_text
    out = tmp_path / "copied"
    made = runner.invoke(application(), ["toy", "--model", str(tiny_teacher), "--out", str(out), "--copies", "2"])
    assert made.exit_code == 0, made.output
    assert "copied 2x; wrote" in made.output
    assert json.loads((out / "manifest.json").read_text())["kind"] == "toy"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # OUT is the model


# ----------------------------------------------------------------------------- one default per field
def _reference_defaults(section: str) -> dict[str, str]:
    text = (ROOT / "docs" / "reference.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return {
        m.group(1): m.group(2).replace("`", "")
        for m in re.finditer(r"^\| `(\w+)` \| [^|]*(?:\\\|[^|]*)* \| ([^|]+) \|", body, re.M)
    }


@pytest.mark.parametrize("command, section", [("prune", "PruneSpec"), ("distill", "DistillSpec")])
def test_cli_help_shows_the_defaults_of_docs_reference(command, section):
    env = {**os.environ, "COLUMNS": "400"}
    help_text = subprocess.run(
        [sys.executable, "-m", "compressor", command, "--help"], capture_output=True, text=True, env=env
    ).stdout
    # each option's entry, its wrapped lines joined, without spaces (a wrap may split "1e-05" after its hyphen)
    entries = re.findall(r"^  (--[\w-]+)(.*\n(?:(?!  -)\s{3,}.*\n)*)", help_text, re.M)
    lines = {name: re.sub(r"\s+", "", rest) for name, rest in entries}
    compared = 0
    for field, default in _reference_defaults(section).items():
        line = lines.get("--" + field.replace("_", "-"))
        if (
            line is None
            or "KEY=VALUE" in line
            or default == "see section"
            or field in ("calibration", "data", "teacher")
        ):
            continue  # a data source / teacher flag, or a nested model (its keys are listed in its help)
        if default.strip() == "-":  # None: no default, or the one the description gives in words
            assert "[default:-]" not in line, (field, line)
        else:
            assert f"[default:{default.strip()}]" in line, (field, default, line)
        compared += 1
    assert compared >= 6
