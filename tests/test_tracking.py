"""MLflow tracking: the pipeline's parent run is the unit of comparison (final metrics, distinguishing params, gate
tags), each stage output is an MLflow logged model, `run --register` makes a model version; all read back through a
real `mlflow server` after two test-size runs of the tiny pipeline (see tests/pipeline_runs.py)."""

import json
from pathlib import Path

import pytest
from conftest import HUB_REPO
from mlflow.entities import LoggedModelStatus
from pipeline_runs import REGISTERED_NAME, MlflowServer

from compressor import estimate
from compressor.models import checkpoint
from compressor.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker


def test_an_existing_experiment_gets_the_kind_that_opens_the_ui_on_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("made-before", artifact_location=(tmp_path / "a").as_uri())
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    Tracker(uri, "made-before", tmp_path / "a")
    new = Tracker(uri, "made-now", tmp_path / "a").experiment_id
    for experiment in (old, new):
        assert client.get_experiment(experiment).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


@pytest.fixture(scope="module")
def server(tiny_runs):
    with MlflowServer(tiny_runs.store, tiny_runs.base / "server-tracking.log") as running:
        yield running, tiny_runs.runs


def _client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server[0].uri)


def _final_stage(run):
    return run.summary["stages"][-1]


@pytest.mark.slow
def test_parent_run_carries_the_final_figures_settings_and_verdicts(server):
    client, runs = _client(server), server[1]
    for run in runs:
        parent = client.get_run(run.run_id)
        metrics, params, tags = parent.data.metrics, parent.data.params, parent.data.tags
        final = _final_stage(run)
        teacher = run.summary["baseline"]
        assert final["name"] == "quantize"
        assert metrics["final/ref_ppl.bits_per_byte"] == pytest.approx(final["scores"]["ref_ppl"]["bits_per_byte"])
        assert metrics["final/ref_next.acc"] == pytest.approx(final["scores"]["ref_next"]["acc"])
        for stage in run.summary["stages"]:
            assert metrics[f"{stage['name']}/ref_next.acc"] == pytest.approx(stage["scores"]["ref_next"]["acc"])
            assert metrics[f"seconds/{stage['name']}"] == pytest.approx(stage["seconds"])
        assert metrics["teacher/ref_ppl.bits_per_byte"] == pytest.approx(teacher["ref_ppl"]["bits_per_byte"])
        assert metrics["seconds/wall"] > sum(s["seconds"] for s in run.summary["stages"])
        # recovery in the gates' min_recovery sense: higher-is-better value / teacher, lower-is-better teacher / value
        assert metrics["recovery/ref_next.acc"] == pytest.approx(
            final["scores"]["ref_next"]["acc"] / teacher["ref_next"]["acc"]
        )
        assert metrics["recovery/ref_ppl.bits_per_byte"] == pytest.approx(
            teacher["ref_ppl"]["bits_per_byte"] / final["scores"]["ref_ppl"]["bits_per_byte"]
        )

        # the quantized model's real parameter count, not its packed int32 storage
        model_dir = Path(tags["final_model"])
        config = json.loads((model_dir / "config.json").read_text())
        assert config["intermediate_size"] == run.intermediate_size
        assert metrics["final/num_params"] == checkpoint.logical_num_params(model_dir) == estimate.param_count(config)
        assert metrics["final/num_params"] == metrics["distill/num_params"]  # quantizing keeps every parameter
        assert checkpoint.num_params(model_dir) < 0.6 * metrics["final/num_params"]  # what the manifest counted
        assert metrics["final/bits"] == 4 and metrics["final/bytes"] < metrics["distill/bytes"] / 2.5
        assert metrics["final/param_compression"] == pytest.approx(
            metrics["teacher/num_params"] / metrics["final/num_params"]
        )
        assert metrics["final/byte_compression"] > metrics["final/param_compression"]

        assert params["prune.target.intermediate_size"] == str(run.intermediate_size)
        assert params["distill.steps"] == "40" and params["quantize.bits"] == "4"
        assert params["distill.loss.kind"] == "forward_kl" and params["distill.gate.ref_next.acc.min_recovery"] == "0.8"
        assert tags["gate.distill"] == "passed" and tags["gate.quantize"] == "passed" and tags["gate.prune"] == "none"
        assert tags["gate"] == "passed" and tags["teacher"] == f"{HUB_REPO}@main"


@pytest.mark.slow
def test_search_runs_orders_pipeline_runs_by_a_final_metric(server):
    client, runs = _client(server), server[1]
    experiment = client.get_experiment_by_name("tiny")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    for metric, key in (
        ("final/ref_ppl.bits_per_byte", lambda r: _final_stage(r)["scores"]["ref_ppl"]["bits_per_byte"]),
        ("final/num_params", lambda r: r.intermediate_size),
    ):
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string="tags.`compressor.summary` = 'stages.json'",
            order_by=[f"metrics.`{metric}` ASC"],
        )
        assert [r.info.run_id for r in found] == [r.run_id for r in sorted(runs, key=key)]


@pytest.mark.slow
def test_stage_outputs_are_logged_models_and_the_final_one_is_registered(server):
    client, runs = _client(server), server[1]
    experiment = client.get_experiment_by_name("tiny").experiment_id
    models = client.search_logged_models([experiment])
    by_uri = {m.tags["compressor.model_uri"]: m for m in models}
    for run in runs:
        stages = json.loads(_download(client, run.run_id, "stages.json").read_text())["stages"]
        for stage in stages:
            model = by_uri[stage["model_uri"]]  # a pointer to the stage directory: no weights were copied
            assert (Path(stage["model_uri"]) / "config.json").is_file()
            assert model.source_run_id == stage["run_id"] and model.status == LoggedModelStatus.READY
            assert model.model_type == f"compressor.{stage['kind']}"
            assert not client.list_logged_model_artifacts(model.model_id)
        outputs = {o.model_id for o in client.get_run(run.run_id).outputs.model_outputs}
        assert outputs == {by_uri[s["model_uri"]].model_id for s in stages}

    versions = sorted(client.search_model_versions(f"name = '{REGISTERED_NAME}'"), key=lambda v: int(v.version))
    assert [v.run_id for v in versions] == [r.run_id for r in runs]
    for version, run in zip(versions, runs):
        final_uri = client.get_run(run.run_id).data.tags["final_model"]
        assert version.tags["compressor.model_uri"] == final_uri
        assert version.source == f"models:/{by_uri[final_uri].model_id}"
        assert "| quantize | ref_next.acc |" in version.description and "pass" in version.description


@pytest.mark.slow
def test_real_parameter_count_is_read_from_object_storage_too(server, s3):
    """On s3:// storage the summary reads a quantized model's size from its safetensors headers by range reads."""
    model_dir = Path(_client(server).get_run(server[1][0].run_id).data.tags["final_model"])
    s3.put(str(model_dir), "bucket/final", recursive=True)
    assert checkpoint.logical_num_params("s3://bucket/final") == checkpoint.logical_num_params(model_dir)
    assert checkpoint.checkpoint_bytes("s3://bucket/final") == checkpoint.weight_bytes(model_dir)
    assert checkpoint.quantized_bits("s3://bucket/final") == 4


def _download(client, run_id: str, name: str) -> Path:
    import tempfile

    return Path(client.download_artifacts(run_id, name, tempfile.mkdtemp()))
