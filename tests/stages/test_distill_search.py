"""A distill stage's `search:` (compressor/stages/distill/search.py): the trials it draws (no Ray), how it keys and
refuses, and one real 4-trial grid on the test teacher as Ray Tune trials: one nested MLflow run per trial, the best
trial's settings in the final run, and the gate's held-out text never opened while it runs."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
from distill_helpers import build_llama

from compressor.config.schema import DataSource
from compressor.errors import UserError
from compressor.stages.distill.search import draw_settings, flat, trial_steps
from compressor.stages.distill.spec import DistillSpec

GRID = {"lr": [1e-3, 4e-3], "loss.temperature": [1.0, 2.0]}
STEPS, FRACTION = 16, 0.25  # the full run and each trial's share: 4 steps


def test_a_grid_is_every_combination_and_a_random_search_is_seeded():
    spec = DistillSpec(data="d", steps=STEPS, search={"space": GRID, "fraction": FRACTION})
    grid = [flat(s) for s in draw_settings(spec.search, seed=0)]
    assert spec.search.trials() == 4 and len(grid) == 4
    assert {(s["lr"], s["loss.temperature"]) for s in grid} == {(a, b) for a in GRID["lr"] for b in [1.0, 2.0]}
    assert trial_steps(spec, DataSource(source="zoo:tiny-test", seq_len=64)) == (STEPS, 4)
    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "loss.alpha": [0.0, 0.5]}
    random = DistillSpec(data="d", steps=STEPS, search={"space": space, "samples": 5}).search
    drawn = [flat(s) for s in draw_settings(random, seed=3)]
    assert len(drawn) == 5 and drawn == [flat(s) for s in draw_settings(random, seed=3)]
    assert drawn != [flat(s) for s in draw_settings(random, seed=4)]
    assert all(1e-4 <= s["lr"] <= 1e-2 and s["loss.alpha"] in (0.0, 0.5) for s in drawn)


@pytest.mark.parametrize(
    "search, message",
    [
        ({"space": {"loss.temprature": [1, 2]}}, "space.loss.temprature: not a field a search can vary (did you mean "),
        ({"space": {"data": ["x"]}}, "space.data: not a field a search can vary"),
        ({"space": {"loss.temperature": [1.0, 0.0]}}, "search.space.loss.temperature: 0.0: Input should be greater"),
        ({"space": {"lr": {"low": 1e-4, "high": 1e-2}}}, "space.lr: a range is sampled by a random search"),
        ({"space": {"loss.kind": ["gjsd"]}}, "search.space.loss.kind: 'gjsd': targets: gjsd needs"),
    ],
)
def test_bad_searches_are_refused_naming_the_field(search, message):
    from pydantic import ValidationError

    loss = {"targets": {"kind": "topk", "k": 4}} if "gjsd" in str(search) else {}
    with pytest.raises(ValidationError, match=re.escape(message)):
        DistillSpec(data="d", steps=STEPS, loss=loss, search=search)


PIPELINE = """\
name: search
teacher: {model: "zoo:tiny-test"}
data:
  distill: {source: "zoo:tiny-test", seq_len: 64}
  held: {source: "zoo:tiny-test", split: heldout, seq_len: 64}
  other: {source: CORPUS, seq_len: 64}
evaluation:
  tasks: [{name: ref_ppl, include: "zoo:tiny-test"}]
stages:
  - distill: {data: distill, steps: 16, SEARCH}
"""


def plan_of(tmp_path, search: str):
    from compressor.config.load import load_pipeline
    from compressor.planning import make_plan

    corpus = tmp_path / "other.txt"
    corpus.write_text("Some text kept apart.\n\nAnother paragraph of it.\n")
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.replace("CORPUS", str(corpus)).replace(", SEARCH", search))
    return make_plan(load_pipeline(path), str(tmp_path / "storage"))


def test_a_search_changes_the_key_and_never_picks_on_the_evaluation_text(tmp_path):
    keys = {
        plan_of(tmp_path, search).stages[0].key
        for search in ("", ", search: {space: {lr: [1e-3, 4e-3]}}", ", search: {space: {lr: [1e-3, 2e-3]}}")
    }
    assert len(keys) == 3
    assert plan_of(tmp_path, ", search: {space: {lr: [1e-3]}, validation: other}")
    for name, message in (
        ("held", "'held' (zoo:tiny-test, split heldout) is the text of the pipeline's evaluation tasks"),
        ("distill", "'distill' is the data the trials train on"),
        ("nope", "unknown data source 'nope'"),
    ):
        with pytest.raises(UserError, match=re.escape(f"stages.0.distill.search.validation: {message}")):
            plan_of(tmp_path, f", search: {{space: {{lr: [1e-3]}}, validation: {name}}}")


# ----------------------------------------------------------------------------- one real search
@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_teacher, tiny_corpus):
    """A 4-trial grid, 4 steps each, then 16 steps with the best settings: a random student of the test teacher's
    vocabulary, in a local 2-CPU Ray (two trials at once), logging to a real MLflow store. Every file this process
    opens under the zoo corpus's held-out side (heldout.txt, the evaluation tasks' data) is recorded."""
    import ray

    from compressor.config.schema import DataSource
    from compressor.contract.context import StageContext
    from compressor.manifest import ModelRef
    from compressor.models import load_tokenizer
    from compressor.stages import distill as distill_stage
    from compressor.stages.distill import driver
    from compressor.tracking import Tracker

    if ray.is_initialized():
        ray.shutdown()
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    root = tmp_path_factory.mktemp("distill-search")
    vocab = json.loads((tiny_teacher / "config.json").read_text())["vocab_size"]
    student = build_llama(
        root / "student", load_tokenizer(tiny_teacher), hidden=64, intermediate=64, layers=2, seed=2, vocab=vocab
    )
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}", "distill-search", root)
    tracker.start_pipeline("distill-search", "", {})
    stage_run = tracker.start_stage("distill", "distill", "key", {})
    (root / "stage").mkdir()
    ctx = StageContext(
        work_dir=root / "stage",
        teacher=ModelRef(path=str(tiny_teacher), key="zoo:tiny-test"),
        data={"distill": DataSource(source="zoo:tiny-test", seq_len=64)},
        storage_path=str(root / "ray"),
        run_name="searched",
        sink=tracker.sink(stage_run),
        quiet=True,
    )
    spec = DistillSpec(
        data="distill",
        steps=STEPS,
        global_batch=8,
        micro_batch=8,
        min_lr=1e-4,
        cpus_per_worker=1,
        deepspeed={"zero_stage": 2},
        search={"space": GRID, "fraction": FRACTION, "validation_samples": 16},
    )
    held_out = str(tiny_corpus / "heldout.txt"), str(tiny_corpus / "tasks")
    opened: list[str] = []
    spying = [True]

    def spy(event, args):
        if spying[0] and event == "open" and isinstance(args[0], str) and args[0].startswith(held_out):
            opened.append(args[0])

    sys.addaudithook(spy)  # an audit hook stays for the process: `spying` turns it off
    finals = []
    real = driver.distill

    def recording(spec, model, ctx):  # the trials run in Ray Tune's processes: here only the final run calls it
        finals.append(spec)
        return real(spec, model, ctx)

    driver.distill = recording
    try:
        result = distill_stage.KIND.run(spec, ModelRef(path=str(student), key="random-student"), ctx)
    finally:
        driver.distill = real
    during = list(opened)
    from compressor.text_sources import documents  # the control: a read of the held-out side is seen

    next(documents(DataSource(source="zoo:tiny-test", split="heldout")))
    spying[0] = False
    yield {"result": result, "tracker": tracker, "stage_run": stage_run, "finals": finals, "opened": during,
           "control": opened[len(during):]}  # fmt: skip
    ray.shutdown()


@pytest.mark.slow
def test_four_trials_make_four_nested_runs_and_the_best_settings_train_the_stage(searched):
    search = searched["result"].details["search"]
    tracker, stage_run = searched["tracker"], searched["stage_run"]
    trials = search["trials"]
    assert len(trials) == 4 and all(t["status"] == "FINISHED" and t["steps"] == 4 for t in trials)
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{stage_run}'")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    by_index = {int(r.data.params["index"]): r for r in runs}
    for trial in trials:
        run = by_index[trial["index"]]
        assert float(run.data.params["lr"]) == trial["settings"]["lr"]
        assert float(run.data.params["loss.temperature"]) == trial["settings"]["loss.temperature"]
        assert run.data.metrics["validation_loss"] == pytest.approx(trial["validation_loss"])
        history = tracker.client.get_metric_history(run.info.run_id, "loss")  # per step, from the trial's rank 0
        assert [m.step for m in history] == [1, 2, 3, 4]
    best = min(trials, key=lambda t: t["validation_loss"])
    assert search["best"] == best["index"] and search["best_settings"] == best["settings"]
    assert len({t["validation_loss"] for t in trials}) == 4  # the settings made a difference
    (final,) = searched["finals"]
    assert (final.lr, final.loss.temperature, final.steps) == (best["settings"]["lr"], best["settings"]["loss.temperature"], STEPS)  # fmt: skip
    assert final.search is None
    lr = tracker.client.get_metric_history(stage_run, "lr")  # the stage's own run: the final 16 steps
    assert len(lr) == STEPS and max(m.value for m in lr) == pytest.approx(best["settings"]["lr"])


@pytest.mark.slow
def test_the_search_never_opens_the_gates_held_out_text(searched):
    assert searched["opened"] == [] and searched["control"]  # none during the search; the spy does see reads
    search = searched["result"].details["search"]
    assert search["validation"] == "distill (the 16 sequences after the full run's)"


@pytest.mark.slow
def test_the_report_plots_the_trials(searched):
    from compressor.report import PipelineRun, figures
    from compressor.report.runs import artifact_json

    search = searched["result"].details["search"]
    assert artifact_json(searched["tracker"].client, searched["stage_run"], "search.json") == search  # load_run's
    run = PipelineRun("r", "p", 0, "FINISHED", {}, {}, {}, {}, [], None, 1.0, searches={"distill": search})
    (plot,) = [p for p in figures([run]) if p.name == "search_trials"]
    assert plot.png.startswith(b"\x89PNG")
    drawn = plot.data["distill"]
    assert [d["validation_loss"] for d in drawn] == [t["validation_loss"] for t in search["trials"]]
    assert [d["best"] for d in drawn].index(True) == search["best"]
