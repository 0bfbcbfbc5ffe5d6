"""A pipeline whose storage is s3:// (moto's S3 server on 127.0.0.1): the prune task publishes its stage there from
its own node (manifest last), and a node without any local copy takes it from there as cached work."""

import shutil
import textwrap

import pytest

from compressor.config.load import load_pipeline
from compressor.orchestrator import Orchestrator

PIPELINE = textwrap.dedent("""\
    name: remote
    teacher: {model: "zoo:tiny-test"}
    storage: s3://bucket/compressor
    data:
      calib: {source: "zoo:tiny-test", samples: 8, seq_len: 64}
    stages:
      - prune: {target: {intermediate_size: 256}, calibration: calib, batch_size: 4}
    """)


@pytest.mark.slow
def test_stages_are_published_to_and_reused_from_remote_storage(tmp_path, monkeypatch, s3, tiny_teacher):
    import ray

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "mirror"))
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE)
    try:
        first = Orchestrator(load_pipeline(path), PIPELINE, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").run()
        assert [o.status for o in first.outcomes] == ["ran"]
        stage_dir = f"bucket/compressor/remote/{first.outcomes[0].name}-{first.outcomes[0].manifest.key[:12]}"
        assert s3.exists(f"{stage_dir}/manifest.json") and s3.exists(f"{stage_dir}/model/model.safetensors")
        assert not s3.exists("bucket/compressor/remote/pending") or not s3.ls("bucket/compressor/remote/pending")
    finally:
        ray.shutdown()
    shutil.rmtree(tmp_path / "mirror", ignore_errors=True)  # another node: nothing local
    second = Orchestrator(load_pipeline(path), PIPELINE, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").run()
    assert [o.status for o in second.outcomes] == ["cached"]
