"""The CLI's contract: exit codes, one-paragraph errors without tracebacks, nothing written on bad input."""

import subprocess
import sys
import textwrap

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
