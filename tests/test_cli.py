"""The CLI's contract: exit codes, one-paragraph errors without tracebacks, nothing written on bad input."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PIPELINE = textwrap.dedent("""\
    name: clitest
    teacher: {model: "zoo:tiny-test"}
    data:
      calib: {source: "zoo:tiny-test", samples: 8, seq_len: 64}
    evaluation:
      tasks: [{name: ref_ppl, include: "zoo:tiny-test"}, {name: ref_next, include: "zoo:tiny-test"}]
    stages:
      - evaluate: {}
        gate: {ref_next: {min: 0.0}}
    """)


def compressor(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "compressor", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


@pytest.fixture
def pipeline(tmp_path):
    def write(text=PIPELINE, name="p.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def test_help_everywhere():
    for cmd in (
        [],
        ["run"],
        ["validate"],
        ["plan"],
        ["eval"],
        ["prune"],
        ["distill"],
        ["quantize"],
        ["zoo"],
        ["submit"],
    ):
        result = compressor(*cmd, "--help")
        assert result.returncode == 0, (cmd, result.stderr)
        assert "Usage" in result.stdout


def test_validate_is_light(pipeline):
    code = (
        f"import sys; sys.argv=['compressor','validate',{str(pipeline())!r}]\nfrom compressor.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ok (1 stages" in result.stdout and result.stdout.strip().endswith("NO-TORCH")


BAD_INPUTS = {
    "malformed yaml": (PIPELINE.replace("stages:\n", "stages: [\n"), "not valid YAML"),
    "unknown key": (PIPELINE.replace("seq_len: 64", "seq_len: 64, sampels: 3"), "data.calib.sampels"),
    "wrong type": (PIPELINE.replace("samples: 8", "samples: eight"), "data.calib.samples"),
    "missing model path": (PIPELINE.replace('"zoo:tiny-test"}\ndata', "./no/such/model}\ndata"), "teacher.model"),
    "unknown zoo model": (PIPELINE.replace('model: "zoo:tiny-test"', 'model: "zoo:nope"'), "teacher.model"),
    "unknown task": (PIPELINE.replace("name: ref_ppl", "name: ref_pppl"), "evaluation.tasks.0.name"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("command", ["run", "validate"])
def test_bad_input_exits_2_with_one_paragraph(case, command, pipeline, tmp_path):
    text, needle = BAD_INPUTS[case]
    storage = tmp_path / "storage"
    result = compressor(command, pipeline(text), f"storage={storage}")
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert not storage.exists()


def test_unwritable_storage(pipeline, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = compressor("run", pipeline(), f"storage={blocker}/sub")
    assert result.returncode == 2 and "storage" in result.stderr and "Traceback" not in result.stderr


def test_missing_pipeline_file(tmp_path):
    result = compressor("run", tmp_path / "nope.yaml")
    assert result.returncode == 2 and "nope.yaml" in result.stderr


# ----------------------------------------------------------------------------- exit codes at the CLI boundary
def run_main(monkeypatch, tmp_path, capsys, error: BaseException) -> tuple[object, str]:
    """compressor.cli.main in-process on `validate`, whose planning raises `error`: (exit code, stderr)."""
    from compressor import cli

    def broken(*args, **kwargs):
        raise error

    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(PIPELINE)
    monkeypatch.setattr("compressor.planning.make_plan", broken)
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["compressor", "validate", str(pipeline), f"storage={tmp_path / 's'}"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return exited.value.code, capsys.readouterr().err


def test_an_unexpected_exception_exits_3_with_one_paragraph_and_the_traceback_in_a_log(monkeypatch, tmp_path, capsys):
    code, err = run_main(monkeypatch, tmp_path, capsys, RuntimeError("kaboom\nsecond line"))
    assert code == 3 and err.count("\n") == 1, err
    assert err.startswith("error: unexpected RuntimeError: kaboom second line; the traceback is in "), err
    log = Path(err.strip().rsplit(" ", 1)[1])
    assert log.parent == tmp_path / "cache" / "logs" and log.name.startswith("crash-")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: kaboom" in text and "in broken" in text


@pytest.mark.parametrize(
    "error,code",
    [
        (KeyboardInterrupt(), 130),  # typer's Ctrl-C exit
        (SystemExit(75), 75),  # e.g. a lock not acquired in time: its own code
        ("UserError", 2),
        ("GateFailed", 1),
        ("StageFailed", 3),
    ],
)
def test_known_exits_keep_their_codes_and_write_no_log(error, code, monkeypatch, tmp_path, capsys):
    from compressor import errors

    if isinstance(error, str):
        error = getattr(errors, error)("said in one paragraph")
    got, err = run_main(monkeypatch, tmp_path, capsys, error)
    assert got == code and "unexpected" not in err and "Traceback" not in err, err
    assert not (tmp_path / "cache" / "logs").exists()


def test_missing_cloud_credentials_anywhere_are_bad_input(monkeypatch, tmp_path, capsys):
    from botocore.exceptions import NoCredentialsError

    code, err = run_main(monkeypatch, tmp_path, capsys, NoCredentialsError())
    assert code == 2 and "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE" in err, err


# ----------------------------------------------------------------------------- scripting: plan --json, validate --print
def test_validate_print_emits_the_resolved_pipeline_that_validates_again(pipeline, tmp_path):
    import yaml

    from compressor.config.load import load_pipeline

    result = compressor("validate", pipeline(), "--print", "seed=7", f"storage={tmp_path / 's'}")
    assert result.returncode == 0, result.stderr
    assert "ok (1 stages" in result.stderr  # stdout is the YAML alone
    resolved = yaml.safe_load(result.stdout)
    assert resolved["seed"] == 7 and resolved["stages"][0]["gate"]["metrics"]["ref_next"]["min"] == 0.0
    again = tmp_path / "resolved.yaml"
    again.write_text(result.stdout)
    assert load_pipeline(again) == load_pipeline(pipeline(), ["seed=7", f"storage={tmp_path / 's'}"])
    # the shipped pipeline, with every stage kind's spec (quantize's union included)
    from compressor.commands.pipeline import resolve_pipeline

    result = compressor("validate", "tiny", "--print", "stages.quantize.group_size=64", f"storage={tmp_path / 's'}")
    assert result.returncode == 0, result.stderr
    again.write_text(result.stdout)
    expected = load_pipeline(resolve_pipeline("tiny"), ["stages.quantize.group_size=64", f"storage={tmp_path / 's'}"])
    assert load_pipeline(again) == expected


def test_plan_json_has_stages_resources_cache_and_hours_and_wall_clock_from_the_gpus(tmp_path):
    import json

    root = Path(__file__).resolve().parent.parent
    result = compressor("plan", root / "pipelines" / "llama8b_to_4b.yaml", "--json", "--storage", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [s["name"] for s in plan["stages"]] == ["prune", "distill", "quantize"]
    distill = plan["stages"][1]
    assert distill["gpus"] == 64 and distill["cache"] == "to run" and distill["resources"] == "64 x 8 CPU+1 GPU"
    assert 2_000 < distill["gpu_hours"] < 10_000 and distill["wall_hours"] == pytest.approx(distill["gpu_hours"] / 64)
    assert plan["stages"][0]["params_in"] > 8e9 > plan["stages"][0]["params_out"] > 4e9
    assert plan["gpu_hours"] == pytest.approx(sum(s["gpu_hours"] for s in plan["stages"]))
    assert plan["wall_hours"] == pytest.approx(sum(s["wall_hours"] for s in plan["stages"]))
    assert all(s["flops"] > 0 for s in plan["stages"]) and plan["gpu"] == "H100"
    table = compressor("plan", root / "pipelines" / "llama8b_to_4b.yaml", "--storage", tmp_path / "s").stdout
    assert f"about {plan['wall_hours']:,.0f} h of wall-clock (distill on 64 GPUs)" in table, table


def test_plan_shows_no_gpu_hours_for_stages_on_cpus(pipeline, tmp_path):
    import json

    text = pipeline(PIPELINE.replace("- evaluate: {}", "- prune: {target: {intermediate_size: 256}}"))
    plan = json.loads(compressor("plan", text, "--json", "--storage", tmp_path / "s").stdout)
    assert plan["stages"][0]["gpus"] == 0 and plan["stages"][0]["flops"] > 0
    assert plan["stages"][0]["gpu_hours"] is None and plan["gpu_hours"] is None
    table = compressor("plan", text, "--storage", tmp_path / "s").stdout
    assert "H100-hours" not in table and "every stage runs on CPUs" in table, table
