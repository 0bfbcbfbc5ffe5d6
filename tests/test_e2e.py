"""End to end: the shipped default pipeline (pipelines/tiny.yaml), run for real with the test-size reference
teacher: prune -> distill -> quantize, each evaluated with lm-eval and gated, tracked in MLflow, then re-run
from the cache without Ray."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "tiny.yaml"

def run(storage: Path, overrides: list[str], env: dict):
    cmd = [sys.executable, "-m", "compressor", "run", str(PIPELINE), f"storage={storage}", *overrides,
           "--summary-json", str(storage / "summary.json")]
    result = subprocess.run(cmd, capture_output=True, text=True,
                            env={**__import__("os").environ, "GPTQMODEL_DISABLE_PACK_EXT": "1", **env})
    summary = json.loads((storage / "summary.json").read_text()) if result.returncode == 0 else None
    return result, summary


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path, tiny_test_overrides, hub_cache):
    """The teacher is a hub id (`acme/tiny-llama@main`) served by an offline Hugging Face cache, as a user with the
    hub would run the flagship recipe: resolved once, published to the storage, read by every stage from there."""
    storage = tmp_path / "artifacts"
    hub_teacher = [f"teacher.model={hub_cache['repo']}", "teacher.revision=main"]
    result, summary = run(storage, [*tiny_test_overrides, *hub_teacher], hub_cache["env"])
    assert result.returncode == 0, result.stderr[-5000:]
    stages = {s["name"]: s for s in summary["stages"]}
    assert [s["status"] for s in summary["stages"]] == ["ran", "ran", "ran"]

    # each stage really did its job
    teacher_bpb = summary["baseline"]["ref_ppl"]["bits_per_byte"]
    pruned, distilled, quantized = (stages[n]["scores"]["ref_ppl"]["bits_per_byte"] for n in ("prune", "distill", "quantize"))
    assert stages["prune"]["num_params"] < 0.8 * 1_049_728
    assert pruned > teacher_bpb, "pruning half the network must cost quality"
    assert distilled < pruned, "distillation must win back part of it"
    assert quantized <= distilled + 0.05
    assert stages["quantize"]["bytes"] < stages["distill"]["bytes"] / 2.5
    assert "gate" in result.stdout + result.stderr and "FAIL" not in result.stdout + result.stderr

    # the final checkpoint loads as a user would, and generates
    final = next((storage / "tiny").glob("quantize-*/model"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    out = model.generate(**tokenizer("The list", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 2

    # MLflow: a parent run, a nested child per stage and for the baseline, with the gate verdicts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"baseline", "prune", "distill", "quantize"}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert children["distill"].data.tags["gate"] == "passed"
    assert children["distill"].data.metrics["ref_ppl.bits_per_byte"] == pytest.approx(distilled)
    assert "loss" in children["distill"].data.metrics  # per-step training loss from rank 0
    assert hub_cache["commit"] in parent.data.params["teacher_key"]  # the resolved commit keys the teacher
    snapshot = storage / "_models" / f"acme--tiny-llama-{hub_cache['commit'][:12]}"
    assert (snapshot / "manifest.json").is_file() and not list((storage / "tiny").glob("pending/*"))

    # a re-run finds everything cached and starts neither Ray nor a new MLflow run
    result, summary = run(storage, [*tiny_test_overrides, *hub_teacher], hub_cache["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [s["status"] for s in summary["stages"]] == ["cached", "cached", "cached"]
    assert "Ray" not in result.stderr and len(client.search_runs([parent.info.experiment_id])) == len(runs)
