"""The tiny pipeline at test size on a 2-node Ray cluster whose storage is s3:// on a real S3-compatible server
(moto's server mode on 127.0.0.1). Each node has its own local disk (its own COMPRESSOR_CACHE, inherited by the
node's processes); stages are pinned to nodes with custom resources, distill spreads one worker per node, and every
local work directory is gone once its stage is published: nothing relies on another node's disk or the driver's."""

import os

import pytest

from compressor.config.load import load_pipeline
from compressor.orchestrator import Orchestrator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ON_TWO_NODES = [
    "storage=s3://bucket/compressor",
    "evaluation.resources.num_cpus=1",
    "evaluation.resources.custom={node_b: 1}",
    "stages.prune.resources.num_cpus=1",
    "stages.prune.resources.custom={node_a: 1}",
    "stages.quantize.resources.num_cpus=1",
    "stages.quantize.resources.custom={node_b: 1}",
    "stages.distill.workers=2",
    "stages.distill.cpus_per_worker=1",
    "stages.distill.placement_strategy=STRICT_SPREAD",
    "stages.distill.steps=6",
    "stages.distill.checkpoint_every=3",
]


@pytest.mark.slow
def test_tiny_pipeline_on_two_nodes_with_s3_storage(s3, tmp_path, monkeypatch, tiny_teacher, tiny_test_overrides):
    import ray
    from ray.cluster_utils import Cluster

    from compressor.ray_runtime import LOCAL_HEAD_ENV

    for key, value in LOCAL_HEAD_ENV.items():
        monkeypatch.setenv(key, value)
    disks = {name: tmp_path / f"disk-{name}" for name in ("driver", "a", "b")}
    cluster = Cluster(initialize_head=False)
    try:
        for name in ("a", "b"):  # a node's processes inherit the environment it was started with: its own disk
            monkeypatch.setenv("COMPRESSOR_CACHE", str(disks[name]))
            cluster.add_node(num_cpus=1, resources={f"node_{name}": 1})
        monkeypatch.setenv("COMPRESSOR_CACHE", str(disks["driver"]))
        ray.init(address=cluster.address)
        spec = load_pipeline(os.path.join(ROOT, "pipelines", "tiny.yaml"), [*tiny_test_overrides, *ON_TWO_NODES])
        summary = Orchestrator(spec, "", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").run()
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert [o.status for o in summary.outcomes] == ["ran", "ran", "ran"]
    distill = next(o for o in summary.outcomes if o.kind == "distill")
    assert len(set(distill.manifest.details["worker_nodes"])) == 2, "one distill worker per node"
    published = {path.rsplit("/", 1)[-1].split("-")[0] for path in s3.ls("bucket/compressor/tiny", refresh=True)}
    assert {"prune", "distill", "quantize"} <= published
    for outcome in summary.outcomes:
        stage = f"bucket/compressor/tiny/{outcome.name}-{outcome.manifest.key[:12]}"
        assert s3.exists(f"{stage}/manifest.json") and s3.exists(f"{stage}/model/config.json"), stage
    assert not s3.exists("bucket/compressor/tiny/pending") or not s3.ls("bucket/compressor/tiny/pending")
    assert s3.ls("bucket/compressor/_evals"), "evaluation results are cached in the shared storage"
    for disk in disks.values():  # scratch directories are removed once their stage is published
        leftovers = list((disk / "work").iterdir()) if (disk / "work").exists() else []
        assert leftovers == [], leftovers
    # the final model is what a user downloads from the bucket and loads
    assert summary.outcomes[-1].manifest.details["bits"] == 4
