"""Every shipped pipeline YAML validates: schema, references, and stage shape checks from config alone."""

from pathlib import Path

import pytest

from compressor.config.load import load_pipeline
from compressor.planning import check_local_tasks, make_plan

ROOT = Path(__file__).resolve().parents[1]
# pipelines/ links to the package's files (compressor recipes): each file once
PIPELINES = sorted(
    {p.resolve() for p in (ROOT / "pipelines").glob("*.yaml")} | set((ROOT / "compressor" / "pipelines").glob("*.yaml"))
)


def test_there_are_pipelines():
    assert any(p.name == "tiny.yaml" for p in PIPELINES)


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_validates(path, tmp_path):
    spec = load_pipeline(path)
    plan = make_plan(spec, storage=str(tmp_path))
    check_local_tasks(spec.evaluation.tasks)
    assert plan.teacher_config, f"{path.name}: the teacher's architecture must be known offline"
    assert [s.name for s in plan.stages] == [s.name for s in spec.stages]
