"""End to end: the shipped default pipeline (pipelines/tiny.yaml), run for real with the test-size reference
teacher: prune -> distill -> quantize, each evaluated with lm-eval and gated, tracked in MLflow, then re-run
from the cache without Ray. The run is the first of the session's shared runs (tests/pipeline_runs.py): the
teacher is a hub id (`acme/tiny-llama@main`) served by an offline Hugging Face cache, as a user with the hub
would run the flagship recipe: resolved once, published to the storage, read by every stage from there."""

import json

import pytest
from pipeline_runs import PIPELINE, compressor


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tiny_runs, hub_cache, tmp_path):
    first = tiny_runs.runs[0]
    summary, console = first.summary, first.stdout + first.stderr
    stages = {s["name"]: s for s in summary["stages"]}
    assert [s["status"] for s in summary["stages"]] == ["ran", "ran", "ran"]

    # each stage really did its job
    teacher_bpb = summary["baseline"]["ref_ppl"]["bits_per_byte"]
    pruned, distilled, quantized = (
        stages[n]["scores"]["ref_ppl"]["bits_per_byte"] for n in ("prune", "distill", "quantize")
    )
    assert stages["prune"]["num_params"] < 0.8 * 1_049_728
    assert pruned > teacher_bpb, "pruning half the network must cost quality"
    assert distilled < pruned, "distillation must win back part of it"
    assert quantized <= distilled + 0.05
    assert stages["quantize"]["bytes"] < stages["distill"]["bytes"] / 2.5
    assert "gate" in console and "FAIL" not in console

    # the final checkpoint loads as a user would, and generates
    storage = tiny_runs.storage
    final = storage / "tiny" / f"quantize-{stages['quantize']['key'][:12]}" / "model"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    out = model.generate(**tokenizer("The list", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 2

    # MLflow: a parent run, a nested child per stage and for the baseline, with the gate verdicts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_runs.store.db}")
    parent = client.get_run(first.run_id)
    runs = client.search_runs([parent.info.experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.run_id}
    assert set(children) == {"baseline", "prune", "distill", "quantize"}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert children["distill"].data.tags["gate"] == "passed"
    assert children["distill"].data.metrics["ref_ppl.bits_per_byte"] == pytest.approx(distilled)
    assert "loss" in children["distill"].data.metrics  # per-step training loss from rank 0
    assert hub_cache["commit"] in parent.data.params["teacher_key"]  # the resolved commit keys the teacher
    snapshot = storage / "_models" / f"acme--tiny-llama-{hub_cache['commit'][:12]}"
    assert (snapshot / "manifest.json").is_file() and not list((storage / "tiny").glob("pending/*"))

    # a re-run finds everything cached and starts no Ray; its one MLflow run is a parent tagged `cached` with the final
    # figures of the stages it reused, listed by `compressor runs` (its own store: the shared one stays as the two
    # runs left it for the report and tracking tests)
    summary_path = tmp_path / "summary.json"
    rerun_store = f"sqlite:///{tmp_path / 'rerun-mlflow.db'}"
    result = compressor(
        "run",
        str(PIPELINE),
        f"storage={storage}",
        *tiny_runs.overrides,
        f"stages.prune.target.intermediate_size={first.intermediate_size}",
        "--tracking-uri",
        rerun_store,
        "--summary-json",
        str(summary_path),
        env=tiny_runs.env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [s["status"] for s in json.loads(summary_path.read_text())["stages"]] == ["cached", "cached", "cached"]
    assert "Ray" not in result.stderr
    rerun_client = MlflowClient(tracking_uri=rerun_store)
    new = rerun_client.search_runs([rerun_client.get_experiment_by_name("tiny").experiment_id])
    assert len(new) == 1 and new[0].data.tags["cached"] == "true" and "mlflow.parentRunId" not in new[0].data.tags
    finals = {k: v for k, v in parent.data.metrics.items() if k.startswith(("final/", "recovery/"))}
    assert finals and {k: new[0].data.metrics.get(k) for k in finals} == pytest.approx(finals)
    assert new[0].info.status == "FINISHED" and new[0].data.tags["gate"] == "passed"
    listed = compressor("runs", "--tracking-uri", rerun_store, env={**tiny_runs.env, "COLUMNS": "400"})
    assert listed.returncode == 0 and new[0].info.run_id in listed.stdout and "(cached)" in listed.stdout, (
        listed.stdout + listed.stderr
    )
