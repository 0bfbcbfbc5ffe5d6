"""A pipeline whose storage is an fsspec URL: stages are published there (manifest last) and a node
without a local copy takes them from there as cached work. memory:// stands in for s3:// or gs://."""

import shutil
import textwrap

import fsspec
import pytest

from compressor.config.load import load_pipeline
from compressor.orchestrator import Orchestrator

PIPELINE = textwrap.dedent("""\
    name: remote
    teacher: {model: "zoo:tiny-test"}
    storage: memory://bucket/compressor
    data:
      calib: {source: "zoo:tiny-test", samples: 8, seq_len: 64}
    stages:
      - prune: {target: {intermediate_size: 256}, calibration: calib, batch_size: 4}
    """)


@pytest.mark.slow
def test_stages_are_published_to_and_reused_from_remote_storage(tmp_path, monkeypatch, tiny_teacher):
    import ray

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "mirror"))
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE)
    spec = load_pipeline(path)
    try:
        first = Orchestrator(spec, PIPELINE, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").run()
        assert [o.status for o in first.outcomes] == ["ran"]
        fs = fsspec.filesystem("memory")
        stage_dir = f"/bucket/compressor/remote/{first.outcomes[0].name}-{first.outcomes[0].manifest.key[:12]}"
        assert fs.exists(f"{stage_dir}/manifest.json") and fs.exists(f"{stage_dir}/model/model.safetensors")

        shutil.rmtree(tmp_path / "mirror")  # another node: nothing local
        second = Orchestrator(load_pipeline(path), PIPELINE, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").run()
        assert [o.status for o in second.outcomes] == ["cached"]
    finally:
        ray.shutdown()
        fsspec.filesystem("memory").rm("/bucket", recursive=True)
