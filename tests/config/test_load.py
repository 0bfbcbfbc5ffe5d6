"""Pipeline YAML loading: errors name the file, field and line; overrides; unknown keys rejected."""

import pytest

from compressor.config.load import apply_override, load_pipeline
from compressor.errors import UserError

GOOD = """\
name: t
teacher: {model: zoo:tiny-test}
data:
  calib: {source: zoo:tiny-test, samples: 8, seq_len: 64}
evaluation:
  tasks: [{name: ref_ppl, include: "zoo:tiny-test"}]
stages:
  - prune:
      target: {intermediate_size: 256}
      calibration: calib
    gate: {ref_ppl: {max: 1000}}
  - quantize: {bits: 4, group_size: 32, calibration: calib}
"""


def write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path, text, overrides=()):
    with pytest.raises(UserError) as info:
        load_pipeline(write(tmp_path, text), list(overrides))
    return str(info.value)


def test_good_pipeline_loads_with_gate_shorthand(tmp_path):
    spec = load_pipeline(write(tmp_path, GOOD))
    assert [s.name for s in spec.stages] == ["prune", "quantize"]
    assert spec.stages[0].gate.metrics["ref_ppl"].max == 1000
    assert spec.stages[0].gate.on_fail == "stop"


def test_unknown_key_names_field_and_line(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("calibration: calib\n    gate", "calibraton: calib\n    gate"))
    assert "stages.0.prune.calibraton" in msg and "p.yaml:10" in msg and "unknown key" in msg


def test_wrong_type_names_field_and_line(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("samples: 8", "samples: many"))
    assert "data.calib.samples" in msg and "p.yaml:4" in msg


def test_malformed_yaml_names_line(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("stages:\n", "stages: [\n"))
    assert "not valid YAML" in msg and "p.yaml:" in msg


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_pipeline(tmp_path / "nope.yaml")


def test_unknown_data_source_and_gate_task(tmp_path):
    assert "unknown data source 'calibX'" in error_of(
        tmp_path, GOOD.replace("calibration: calib\n    gate", "calibration: calibX\n    gate")
    )
    assert "no evaluation task named 'mmlu'" in error_of(tmp_path, GOOD.replace("gate: {ref_ppl", "gate: {mmlu"))


def test_overrides_by_index_and_stage_name(tmp_path):
    spec = load_pipeline(
        write(tmp_path, GOOD),
        ["stages.quantize.bits=8", "stages.0.prune.target.intermediate_size=128", "storage=/tmp/x", "seed=3"],
    )
    assert spec.stages[1].quantize.bits == 8
    assert spec.stages[0].prune.target.intermediate_size == 128
    assert spec.storage == "/tmp/x" and spec.seed == 3


def test_bad_override(tmp_path):
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_pipeline(write(tmp_path, GOOD), ["seed"])
    assert "stages.nope" in error_of(tmp_path, GOOD, ["stages.nope.bits=8"])
    assert "unknown key" in error_of(tmp_path, GOOD, ["stages.quantize.bitz=8"])


def test_apply_override_parses_yaml_values():
    data = {"a": {"b": 1}}
    apply_override(data, "a.c=[1, 2]")
    apply_override(data, "a.d=text")
    assert data == {"a": {"b": 1, "c": [1, 2], "d": "text"}}


def test_override_by_kind_reaches_the_spec_of_an_entry_with_resources_and_gate():
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[2] / "pipelines" / "tiny.yaml"
    spec = load_pipeline(tiny, ["stages.quantize.group_size=64", "stages.prune.samples=16"])
    quantize = next(s for s in spec.stages if s.kind == "quantize")
    assert quantize.spec.group_size == 64 and "group_size" not in quantize.resources.model_dump()
    assert next(s for s in spec.stages if s.kind == "prune").spec.samples == 16


def test_every_schema_error_of_a_file_is_listed_with_its_line(tmp_path):
    text = GOOD.replace("samples: 8", "samples: many").replace("group_size: 32", "group_size: 33")
    text = text.replace("teacher: {model: zoo:tiny-test}", "teacher: zoo:tiny-test\nseed: -1")
    msg = error_of(tmp_path, text)
    lines = msg.splitlines()
    assert lines[0] == "invalid pipeline: 4 errors:", msg
    assert "p.yaml:2: teacher: " in lines[1] and "write `teacher: {model: zoo:tiny-test}`" in lines[1]
    assert "p.yaml:3: seed: " in lines[2] and "0 <= seed < 2**32" in lines[2]
    assert "p.yaml:5: data.calib.samples: " in lines[3]
    assert "p.yaml:13: stages.1.quantize.group_size: " in lines[4]


def test_an_override_error_names_the_override_not_the_line_it_replaced(tmp_path):
    msg = error_of(tmp_path, GOOD, ["stages.quantize.group_size=1e3"])
    assert msg.startswith("invalid pipeline: override stages.quantize.group_size=1e3: stages.1.quantize.group_size: ")
    assert "p.yaml" not in msg and "YAML reads 1e3 as text: write 1.0e+03" in msg
    # a mistake left in the file is still told with its line, beside the override's
    msg = error_of(tmp_path, GOOD.replace("samples: 8", "samples: many"), ["seed=x"])
    assert "p.yaml:4: data.calib.samples" in msg and "override seed=x: seed" in msg


@pytest.mark.parametrize(
    "override,where",
    [
        ("seed=1", ("seed",)),
        ("stages.quantize.bits=8", ("stages", 1, "quantize", "bits")),
        ("stages.prune=", ("stages", 0, "prune")),
        ("stages.0=", ("stages", 0)),
        ("stages.0.gate.on_fail=warn", ("stages", 0, "gate", "on_fail")),
        ("evaluation.tasks.ref_ppl.limit=5", ("evaluation", "tasks", 0, "limit")),
    ],
)
def test_apply_override_returns_the_location_it_set(override, where):
    import yaml

    data = yaml.safe_load(GOOD)
    assert apply_override(data, override) == where


@pytest.mark.parametrize(
    "override,message",
    [
        ("=5", "no KEY before '='"),
        ("a..b=1", "an empty part in the key 'a..b'"),
        ("stages.X=", "no stage named 'X'"),
        ("stages.7=", "index 7 is past the end of stages"),
        ("evaluation.tasks.mmlu.limit=3", "no entry named 'mmlu' in evaluation.tasks"),
        ("name.x=1", "override name.x: name is not a mapping"),
    ],
)
def test_odd_overrides_are_refused_naming_them(tmp_path, override, message):
    assert message in error_of(tmp_path, GOOD, [override])
