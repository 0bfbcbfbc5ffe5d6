"""The stage contract (compressor/contract/kind.py): every registered kind meets it, and a kind declared outside the
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

from compressor import contract, docs_gen
from compressor.contract.kind import CheckResult, StageKind, StageResult
from compressor.contract.spec import Strict

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", list(contract.kinds()))
def test_every_registered_kind_meets_the_contract(name):
    from compressor.config.schema import StageEntry

    kind = contract.get(name)
    assert kind.name == name and kind.summary and kind.runs_as in ("task", "driver")
    assert isinstance(kind, StageKind) and kind.output in ("model", "dataset", "scores")
    assert not getattr(type(kind), "__abstractmethods__", None)  # check, run and flops are its own
    models = docs_gen.spec_models(kind.spec)
    assert models and all(m.model_config.get("extra") == "forbid" for m in models)  # a typo is an error
    assert all(set(m.NOT_IN_KEY) <= set(m.model_fields) for m in models)  # operational fields exist
    assert name in StageEntry.model_fields  # its YAML key
    assert f"| `{name}` |" in docs_gen.generate()
    help_text = subprocess.run([sys.executable, "-m", "compressor", "--help"], capture_output=True, text=True).stdout
    assert (f" {name} " in help_text) == kind.standalone


def test_importing_every_kind_imports_no_torch():
    code = "import sys, compressor.contract as c; c.kinds(); import compressor.config.schema; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# ----------------------------------------------------------------------------- a kind from outside the package
class ToySpec(Strict):
    """Copy the model, scaling nothing: a kind that exists only in this test."""

    copies: int = Field(1, gt=0, description="How many times to say it copied.")


class Toy(StageKind):
    name, spec, summary = "toy", ToySpec, "Copy the model (a test kind)."

    def check(self, spec, config):
        return CheckResult(dict(config))

    def run(self, spec: ToySpec, model, ctx) -> StageResult:
        shutil.copytree(model.path, ctx.model_dir, dirs_exist_ok=True)
        return StageResult(metrics={"copies": float(spec.copies)})

    def flops(self, spec, given):
        return 1e9 * spec.copies

    def result_line(self, manifest):
        return f"copied {manifest.metrics['copies']:g}x"


@pytest.fixture
def toy_kind():
    kind = contract.register(Toy())
    yield kind
    contract.unregister("toy")


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


# ----------------------------------------------------------------------------- a dataset kind in its own package
PLUGIN = '''"""A stage kind of another project: each paragraph of a text source becomes a prompt/response row."""

from pydantic import Field

from compressor.contract import register
from compressor.contract.kind import CheckResult, StageKind, StageResult
from compressor.contract.spec import Strict, data_source


class ParagraphsSpec(Strict):
    """Rows from a text source: the first sentence of a paragraph asks, the paragraph answers."""

    data: str = data_source(description="The data source whose paragraphs become rows.")
    rows: int = Field(8, gt=0, description="Most rows written.")


class Paragraphs(StageKind):
    name, spec = "paragraphs", ParagraphsSpec
    summary = "Turn a text source's paragraphs into prompt/response rows (a plugin kind)."
    output = "dataset"

    def check(self, spec, config):
        return CheckResult(dict(config))

    def run(self, spec, model, ctx):
        import itertools

        import pyarrow as pa
        import pyarrow.parquet as pq

        from compressor.text_sources import documents

        texts = list(itertools.islice(documents(ctx.data[spec.data]), spec.rows))
        rows = {"prompt": [t.split(".")[0] for t in texts], "response": texts}
        (ctx.work_dir / "data").mkdir()
        pq.write_table(pa.table(rows), ctx.work_dir / "data" / "part-0.parquet")
        return StageResult(metrics={"rows": float(len(texts))})

    def flops(self, spec, given):
        return 0.0

    def result_line(self, manifest):
        return f"wrote {manifest.metrics['rows']:g} rows"


register(Paragraphs())
'''


@pytest.fixture
def plugin_path(tmp_path):
    """A package outside compressor, installed the way pip leaves one: its module and a dist-info whose entry point
    in the `compressor.stages` group names it. Nothing in compressor changes."""
    site = tmp_path / "site"
    (site / "paragraphs_kind").mkdir(parents=True)
    (site / "paragraphs_kind" / "__init__.py").write_text(PLUGIN)
    info = site / "paragraphs_kind-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: paragraphs-kind\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[compressor.stages]\nparagraphs = paragraphs_kind\n")
    return site


def test_a_dataset_kind_in_its_own_package_is_found_everywhere(plugin_path, tiny_teacher, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")])}

    def compressor(*args):
        return subprocess.run(
            [sys.executable, "-m", "compressor", *args], capture_output=True, text=True, env={**env, "COLUMNS": "200"}
        )

    pipeline = tmp_path / "plugin.yaml"
    pipeline.write_text(
        f"name: plugin\nteacher: {{model: {tiny_teacher}}}\nstorage: {tmp_path / 'store'}\n"
        "data: {docs: {source: zoo:tiny-test}}\n"
        "stages:\n  - paragraphs: {data: docs, rows: 4}\n  - distill: {data: paragraphs, steps: 2}\n"
    )
    validated = compressor("validate", str(pipeline))
    assert validated.returncode == 0, validated.stderr
    planned = compressor("plan", str(pipeline))
    assert planned.returncode == 0, planned.stderr
    assert re.search(r"paragraphs .*1 CPU .*to run", planned.stdout), planned.stdout
    assert "the dataset of stage 'paragraphs'" in planned.stdout  # distill reads the plugin's output
    bad = compressor("validate", str(pipeline), "stages.0.paragraphs.data=nowhere")
    assert bad.returncode == 2 and "stages.0.paragraphs.data: unknown data source 'nowhere'" in bad.stderr
    assert " paragraphs " in compressor("--help").stdout
    help_text = compressor("paragraphs", "--help").stdout
    assert "--rows" in help_text and "[default: 8]" in help_text
    docs = subprocess.run(
        [sys.executable, "-c", "from compressor import docs_gen; print(docs_gen.generate())"],
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    assert "## ParagraphsSpec" in docs and "| `paragraphs` |" in docs and "| a dataset |" in docs

    out = tmp_path / "rows"
    made = compressor(
        "paragraphs", "--model", str(tiny_teacher), "--out", str(out), "--data", "zoo:tiny-test", "--rows", "4"
    )
    assert made.returncode == 0, made.stderr
    assert "wrote 4 rows" in made.stdout
    import pyarrow.parquet as pq

    table = pq.read_table(out / "data" / "part-0.parquet")
    assert table.num_rows == 4 and table.column_names == ["prompt", "response"]
    assert json.loads((out / "manifest.json").read_text())["dataset_uri"] == "data"
    # and without the plugin on the path, compressor knows no such kind
    assert (
        "paragraphs"
        not in subprocess.run([sys.executable, "-m", "compressor", "--help"], capture_output=True, text=True).stdout
    )
