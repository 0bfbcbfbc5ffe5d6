"""Help at 80 columns for every command (the stage commands' generated options included), -h, --version and shell
completion; the pipelines shipped in the package (`compressor recipes`, names where a pipeline file goes)."""

import re
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from compressor import __version__
from compressor.cli import application, main
from compressor.commands import recipes
from compressor.contract import kinds
from compressor.docs_gen import spec_models

ROOT = Path(__file__).resolve().parents[1]


def commands() -> dict[tuple[str, ...], object]:
    """Command path -> click command, for `compressor` and every command and subcommand under it."""
    found = {}

    def walk(command, path):
        found[path] = command
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(get_command(application()), ())
    return found


def render(*args: str, columns: int = 80):
    return CliRunner().invoke(application(), list(args), env={"COLUMNS": str(columns)}, prog_name="compressor")


def sections(text: str) -> dict[str, str]:
    """Help text by section heading ("Common options", "GPTQ options", ...)."""
    parts = re.split(r"^(\S[^\n]*):\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`compressor ARGS` through main(): its exit code (errors: 2 for bad input), stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["compressor", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        main()
    out = capsys.readouterr()
    return exit.value.code, out.out, out.err


@pytest.mark.parametrize("path", list(commands()), ids=lambda p: " ".join(p) or "compressor")
def test_help_reads_at_80_columns(path):
    result = render(*path, "--help")
    assert result.exit_code == 0, result.output
    text, command = result.output, commands()[path]
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert not too_wide, too_wide
    assert "…" not in text
    for param in command.params:
        for name in (*param.opts, *param.secondary_opts) if param.param_type_name == "option" else ():
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{name} is cut or missing"
    assert "-h, --help" in text
    assert not re.search(r"<(str|int|float|bool|path|list\[\w+\])>", text), "placeholders are words: TEXT, INT"
    assert not re.search(r"\(default[: ]", text), "defaults are shown one way: [default: X]"
    example = sections(text)["Example"].strip()
    assert example.startswith("compressor " + " ".join(path)), example
    if not getattr(command, "commands", None):  # the example's flags are the command's own
        declared = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        assert set(re.findall(r"\s(--[\w-]+)", example)) <= declared, example


def test_stage_help_keeps_brackets_and_groups_quantize_options_by_method():
    for name in ("prune", "distill", "quantize"):
        assert "hf:ORG/NAME[:CONFIG][@SPLIT]" in render(name, "--help").output  # not taken for markup
    quantize = sections(render("quantize", "--help").output)
    assert "--method [gptq|awq|gguf]" in quantize["Common options"]
    assert "--bits [4|8]" in quantize["GPTQ and AWQ options"]
    assert (
        "--damp-percent FLOAT >0 <1" in quantize["GPTQ options"]
        and "--desc-act / --no-desc-act" in quantize["GPTQ options"]
    )
    assert "--zero-point" in quantize["AWQ options"] and "--zero-point" not in quantize["GPTQ options"]
    assert "--quant-type" in quantize["GGUF options"]
    distill = sections(render("distill", "--help").output)["Distill options"]
    assert "--lr FLOAT >0" in distill and "[default: 0.0001]" in distill
    assert "--placement-strategy [PACK|SPREAD|STRICT_PACK|STRICT_SPREAD]" in distill


@pytest.mark.parametrize("name", ["prune", "distill", "quantize"])
def test_override_example_is_a_field_of_the_stage(name):
    example = re.search(r"e\.g\.\s+([\w.]+)=", render(name, "--help").output).group(1)
    fields = {f for model in spec_models(kinds()[name].spec) for f in model.model_fields}
    assert example.split(".")[0] in fields, example


def test_short_help_version_and_completion():
    assert render("-h").output == render("--help").output
    assert render("distill", "-h").output == render("distill", "--help").output
    version = render("--version")
    assert version.exit_code == 0 and version.output.strip() == f"compressor {__version__}"
    root = render("--help").output
    assert "--install-completion" in root and "--show-completion" in root and "recipes" in root


def test_plain_help_at_any_width():
    for columns in (60, 200):
        assert all(len(line) <= 80 for line in render("quantize", "--help", columns=columns).output.splitlines())


def test_recipes_list_their_header_line(monkeypatch, capsys):
    shipped = recipes.shipped()
    assert {"tiny", "llama8b_to_4b", "llama8b_to_4b_depth", "smollm2_135m"} <= set(shipped)
    code, out, _ = cli(monkeypatch, capsys, "recipes")
    assert code == 0
    for name, path in shipped.items():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) < 70, f"{name}: open with a one-line description"
        assert re.search(rf"^{name}\s+{re.escape(first[2:])}$", out, re.M), out
    assert cli(monkeypatch, capsys, "recipes", "list")[1] == out


def test_recipes_copy_never_overwrites(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    shipped = recipes.shipped()["smollm2_135m"]
    code, out, _ = cli(monkeypatch, capsys, "recipes", "copy", "smollm2_135m")
    assert code == 0 and (tmp_path / "smollm2_135m.yaml").read_text() == shipped.read_text(), out
    (tmp_path / "edits").mkdir()
    assert cli(monkeypatch, capsys, "recipes", "copy", "tiny", "edits")[0] == 0
    assert (tmp_path / "edits" / "tiny.yaml").read_text() == recipes.shipped()["tiny"].read_text()

    (tmp_path / "mine.yaml").write_text("name: mine\n")
    code, _, err = cli(monkeypatch, capsys, "recipes", "copy", "tiny", "mine.yaml")
    assert code == 2 and "mine.yaml" in err and "already exists" in err
    assert (tmp_path / "mine.yaml").read_text() == "name: mine\n"
    code, _, err = cli(monkeypatch, capsys, "recipes", "copy", "smollm2_135m")  # the default DEST, now there
    assert code == 2 and "smollm2_135m.yaml" in err

    code, _, err = cli(monkeypatch, capsys, "recipes", "copy", "llama8b")
    assert code == 2 and "llama8b" in err and "llama8b_to_4b" in err  # names what there is


def test_pipeline_commands_take_a_shipped_name(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # no pipelines/ here: the name is looked up in the package
    code, out, err = cli(monkeypatch, capsys, "plan", "llama8b_to_4b", "--storage", tmp_path / "store")
    assert code == 0, err
    assert "llama-3.1-8b-to-4b" in out.lower()
    code, _, err = cli(monkeypatch, capsys, "validate", "llama8b_to_4")
    assert code == 2 and "'llama8b_to_4'" in err and "llama8b_to_4b" in err


def test_top_level_pipelines_are_the_shipped_ones():
    top = sorted((ROOT / "pipelines").glob("*.yaml"))
    assert [p.stem for p in top] == sorted(recipes.shipped())
    for path in top:  # links into the package: one copy to edit
        assert path.resolve() == recipes.shipped()[path.stem].resolve(), path
