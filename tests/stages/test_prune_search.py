"""Prune to a budget: the candidate shapes (torch-free, as validate and plan see them), bad budgets, the plan's lines,
and one real search on the test teacher at 50% of its non-embedding parameters: scored, short-distilled in Ray Train,
recorded in the manifest and as nested MLflow runs, and its choice distilled against the hand-picked target of
pipelines/tiny.yaml (at test size) for the same steps."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from compressor.errors import UserError
from compressor.stages import prune as prune_stage
from compressor.stages.prune import budget
from compressor.stages.prune.spec import PruneSpec

# pipelines/tiny.yaml's distill settings at test size (tests/conftest.py), one CPU per worker so two run at once.
DISTILL = {
    "global_batch": 8,
    "micro_batch": 8,
    "lr": 1.0e-3,
    "min_lr": 1.0e-4,
    "cpus_per_worker": 1,
    "loss": {"kind": "forward_kl", "temperature": 1.0},
    "deepspeed": {"zero_stage": 3},
}
MAIN_STEPS = 40  # the distill stage of the tiny pipeline at test size
HAND_PICKED = {"intermediate_size": 192, "num_attention_heads": 2}  # its prune target at test size
SEARCH = {"tolerance": 0.1, "top_k": 2, "steps": 10, "data": "distill", "heldout_samples": 32, "distill": DISTILL}


@pytest.fixture(scope="module")
def teacher_config(tiny_teacher) -> dict:
    return json.loads((tiny_teacher / "config.json").read_text())


def search_spec(**target) -> PruneSpec:
    return PruneSpec(target={"params": 0.5, **target}, calibration="calib", align=64, search=SEARCH)


# ----------------------------------------------------------------------------- candidates (no torch)
@pytest.mark.parametrize(
    "target, align",
    [
        ({}, 64),
        ({}, 32),
        ({"num_layers": 4}, 32),
        ({"hidden_size": [64, 96]}, 32),
        ({"num_key_value_heads": [1, 2], "num_layers": [3, 4]}, 32),
    ],
)
def test_every_candidate_meets_the_budget_the_alignment_and_the_constraints(teacher_config, target, align):
    spec = PruneSpec(target={"params": 0.5, **target}, align=align, search={"tolerance": 0.1, "max_candidates": 100})
    space = budget.search_space(spec, teacher_config)
    src = prune_stage.shapes.source_shape(teacher_config)
    assert space.candidates and len(space.candidates) == space.total
    assert len({c.shape for c in space.candidates}) == len(space.candidates)
    assert space.budget.measure == "non_embedding_params" and space.budget.value == 0.5 * 787_584
    for c in space.candidates:
        s = c.shape
        assert space.budget.lo <= c.non_embedding_params <= space.budget.hi
        assert c.non_embedding_params == budget.non_embedding_params(c.config)
        for width, source in ((s.hidden_size, src.hidden_size), (s.intermediate_size, src.intermediate_size)):
            assert width % align == 0 or width == source
        assert s.num_attention_heads % s.num_key_value_heads == 0 and s.heads_per_group <= src.heads_per_group
        assert s.hidden_size % s.num_attention_heads == 0  # LlamaConfig's rule
        prune_stage.KIND.check(PruneSpec(target=_fixed(s), align=align), teacher_config)  # a fixed target of it passes
        if "hidden_size" in target:
            assert 64 <= s.hidden_size <= 96
        if target.get("num_layers") == 4:
            assert s.num_layers == 4
        if "num_key_value_heads" in target:
            assert s.num_key_value_heads in (1, 2) and s.num_layers in (3, 4)
    if "num_key_value_heads" in target:
        assert {c.shape.num_key_value_heads for c in space.candidates} == {1, 2}  # a range is searched, not fixed


def _fixed(shape) -> dict:
    return {k: v for k, v in shape.as_dict().items() if k != "head_dim"}


def test_the_hand_picked_shape_is_a_candidate_at_quantize_alignment(teacher_config):
    shapes = [c.shape for c in budget.search_space(search_spec(), teacher_config).candidates]
    assert any(
        s.intermediate_size == 192 and s.num_attention_heads == 2 and s.hidden_size == 128 and s.num_layers == 4
        for s in shapes
    )


def test_max_candidates_takes_an_even_spread_of_the_space(teacher_config):
    spec = PruneSpec(target={"params": 0.5}, search={"tolerance": 0.1, "max_candidates": 3})
    whole = budget.search_space(
        spec.model_copy(update={"search": spec.search.model_copy(update={"max_candidates": 99})}), teacher_config
    ).candidates
    few = budget.search_space(spec, teacher_config)
    assert few.total == len(whole) > 3 and len(few.candidates) == 3
    assert few.candidates[0] == whole[0] and few.candidates[-1] == whole[-1]


def test_an_absolute_budget_counts_every_parameter(teacher_config):
    space = budget.search_space(PruneSpec(target={"params": 650_000}, search={"tolerance": 0.05}), teacher_config)
    assert space.budget.measure == "params" and all(617_500 <= c.params <= 682_500 for c in space.candidates)


def test_a_fixed_target_dumps_and_keys_as_before():
    spec = PruneSpec(target={"intermediate_size": 384, "num_attention_heads": 4}, calibration="calib")
    dump = spec.model_dump(mode="json")
    assert "params" not in dump["target"] and "search" not in dump
    assert prune_stage.KIND.key_extra(spec, None) == {}


@pytest.mark.parametrize(
    "target, search, message",
    [
        ({"params": 5e6}, {}, "prune.target.params: 5,000,000 is more than the source's 1,049,728 parameters"),
        (
            {"params": 0.001},
            {},
            "no shape meets the budget of 788 non-embedding parameters (0% of the source's 787,584) "
            "+/- 5%, i.e. 749..826; the smallest aligned shape has 11,360",
        ),
        (
            {"params": 0.2, "hidden_size": 128, "num_attention_heads": 4, "num_layers": 4},
            {},
            "the smallest aligned shape with hidden_size 128, num_attention_heads 4, num_layers 4 has 246,912",
        ),
        ({"params": 0.99, "num_layers": 2}, {}, "the largest shape with num_layers 2 has only 393,856"),
        (
            {"params": 0.5, "hidden_size": [256, 512]},
            {},
            "prune.target.hidden_size: no allowed value in [256, 512] (the source has 128",
        ),
        ({"params": 0.5, "num_layers": 8}, {}, "prune.target.num_layers: 8 is larger than the source's 4"),
        (
            {"params": 0.5, "intermediate_size": 100},
            {},
            "prune.target.intermediate_size: 100 is not a multiple of align=32",
        ),
    ],
)
def test_bad_budgets_are_refused_naming_the_numbers(teacher_config, target, search, message):
    with pytest.raises(UserError, match=re.escape(message)):
        prune_stage.KIND.check(PruneSpec(target=target, search=search), teacher_config)


def test_a_search_aligns_to_the_later_group_size_unless_align_is_set(teacher_config):
    spec = PruneSpec(target={"params": 0.5}, search={"tolerance": 0.1}, quantize_group_size=64)
    space = budget.cached_space(spec, teacher_config)
    for c in space.candidates:  # every width quantize groups, o_proj's input (heads x head_dim) included
        s = c.shape
        assert not prune_stage.shapes.group_size_warnings(s, 64), c.label()
    assert prune_stage.KIND.check(spec, teacher_config).config["num_hidden_layers"]
    explicit = spec.model_copy(update={"align": 32})  # the user's own align is kept, and refused with the fix
    with pytest.raises(
        UserError,
        match=re.escape("the later quantize group size 64 does not divide") + ".*" + re.escape("set prune.align to 64"),
    ):
        prune_stage.KIND.check(explicit, teacher_config)


def test_a_fixed_head_count_must_keep_the_attention_width_aligned(teacher_config):
    spec = PruneSpec(target={"params": 0.5, "num_attention_heads": 3}, align=64, search={"tolerance": 0.2})
    with pytest.raises(UserError, match=re.escape("3 heads x head_dim 32 = 96 is not a multiple of align=64")) as exc:
        prune_stage.KIND.check(spec, teacher_config)
    assert "set prune.align" not in str(exc.value)  # never suggest a setting already in place
    fixed = PruneSpec(target={"num_attention_heads": 1, "num_key_value_heads": 1}, align=64)
    with pytest.raises(UserError, match=re.escape("1 heads x head_dim 32 = 32 is not a multiple of align=64")) as exc:
        prune_stage.KIND.check(fixed, teacher_config)
    assert "set prune.align" not in str(exc.value)


def _tiny_plan(tmp_path, monkeypatch, *overrides):
    from importlib.resources import files

    import compressor.models.zoo as zoo
    from compressor.config.load import load_pipeline
    from compressor.planning import make_plan

    monkeypatch.setattr(zoo, "model_key", lambda name: f"golden-{name}")
    spec = load_pipeline(str(files("compressor") / "pipelines" / "tiny.yaml"), list(overrides))
    return spec, make_plan(spec, storage=str(tmp_path))


def test_a_budget_works_on_the_shipped_tiny_pipeline(tmp_path, monkeypatch):
    """Issue 23: the default pipeline refused `target: {params: 0.5}` with and without align=128."""
    spec, plan = _tiny_plan(tmp_path, monkeypatch, "stages.prune.target={params: 0.5}")
    prune = plan.stages[0]
    run_spec = spec.stages[0].spec  # what the stage runs with (the pipeline's own object)
    assert run_spec.search_align == 128 and run_spec.align == 32  # resolved, while the dumped field is unchanged
    space = budget.cached_space(run_spec, prune.in_config)
    assert space.candidates
    for c in space.candidates:
        assert not prune_stage.shapes.group_size_warnings(c.shape, 128), c.label()
    _, explicit = _tiny_plan(tmp_path, monkeypatch, "stages.prune.target={params: 0.5}", "stages.prune.align=128")
    assert budget.cached_space(explicit.stages[0].entry.spec, prune.in_config).candidates == space.candidates
    _, other = _tiny_plan(tmp_path, monkeypatch, "stages.prune.target={params: 0.5}", "stages.quantize.group_size=64")
    assert other.stages[0].key != prune.key  # another later group size, another grid


@pytest.mark.parametrize(
    "target, message",
    [
        ({"hidden_size": [64, 128]}, "a [lo, hi] range bounds a search, which needs a budget"),
        ({"params": 0.5, "hidden_size": [128, 64]}, "range [128, 64] is empty"),
        ({"params": 0.5, "num_layers": 0}, "0: give a positive number"),
    ],
)
def test_malformed_targets_fail_validation(target, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape(message)):
        PruneSpec(target=target)
    with pytest.raises(ValidationError, match="search: set target.params"):
        PruneSpec(target={"intermediate_size": 192}, search={})
    with pytest.raises(ValidationError, match="steps: set by the search itself"):
        PruneSpec(target={"params": 0.5}, search={"distill": {"steps": 5}})


PIPELINE = """\
name: search
teacher: {model: "zoo:tiny-test"}
data:
  calib: {source: "zoo:tiny-test", samples: 32, seq_len: 128}
  distill: {source: "zoo:tiny-test", seq_len: 128}
stages:
  - prune: {target: {params: 0.5}, calibration: calib, align: 64, search: SEARCH}
  - distill: {data: distill, steps: 40, global_batch: 8, micro_batch: 8}
"""


def pipeline(tmp_path, search: dict = SEARCH):
    from compressor.config.load import load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.replace("SEARCH", json.dumps(search)))
    return load_pipeline(path)


def test_plan_shows_the_candidates_and_the_search_cost_beside_the_distill(tmp_path):
    from rich.console import Console

    from compressor.commands.pipeline import print_plan
    from compressor.planning import make_plan

    plan = make_plan(pipeline(tmp_path), str(tmp_path / "storage"))
    console = Console(record=True, width=250)
    print_plan(plan, "H100", 0.4, console)
    text = console.export_text()
    space = budget.search_space(plan.stages[0].entry.spec, plan.teacher_config)
    assert f"prune search: {len(space.candidates)} candidate shapes" in text
    assert "the best 2 distilled 10 steps each, the winner by held-out loss" in text
    assert re.search(
        r"prune search cost: \S+ FLOPs \(\S+ scoring, \S+ short distillations\); the distill stage after "
        r"it: \S+ \(the search is \d+% of it\)",
        text,
    ), text
    assert all(f"  {c.label()}: {c.params:,} parameters" in text for c in space.candidates)
    assert "search: 2 x (1 x 1 CPU)" in text  # the resources column


def test_the_search_is_in_the_key_and_names_its_data(tmp_path):
    from compressor.planning import make_plan

    keys = {
        make_plan(pipeline(tmp_path, {**SEARCH, **change}), str(tmp_path / "s")).stages[0].key
        for change in ({}, {"steps": 11}, {"top_k": 3}, {"distill": {**DISTILL, "lr": 2e-3}})
    }
    assert len(keys) == 4
    with pytest.raises(
        UserError, match=re.escape("stages.0.prune.search.heldout: unknown data source 'held' (known: calib, distill)")
    ):
        make_plan(pipeline(tmp_path, {**SEARCH, "heldout": "held"}), str(tmp_path / "s"))


# ----------------------------------------------------------------------------- one real search
@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_teacher):
    """The search on the test teacher, in a local 2-CPU Ray, logging to a real MLflow store."""
    import ray

    from compressor.config.schema import DataSource
    from compressor.contract.context import StageContext
    from compressor.manifest import ModelRef
    from compressor.tracking import Tracker

    if ray.is_initialized():  # another test module's connection; this one needs its own cluster
        ray.shutdown()
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    root = tmp_path_factory.mktemp("search")
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}", "search", root)
    tracker.start_pipeline("search", "", {})
    stage_run = tracker.start_stage("prune", "prune", "key", {})
    data = {
        "calib": DataSource(source="zoo:tiny-test", samples=32, seq_len=128),
        "distill": DataSource(source="zoo:tiny-test", seq_len=128),
    }

    def context(name: str, sink=None) -> StageContext:
        (root / name).mkdir()
        return StageContext(
            work_dir=root / name,
            teacher=ModelRef(path=str(tiny_teacher), key="zoo:tiny-test"),
            data=data,
            storage_path=str(root / "ray"),
            run_name=name,
            quiet=True,
            **({"sink": sink} if sink else {}),
        )

    teacher = ModelRef(path=str(tiny_teacher), key="zoo:tiny-test")
    ctx = context("prune", tracker.sink(stage_run))
    result = prune_stage.KIND.run(search_spec(), teacher, ctx)
    yield {
        "result": result,
        "ctx": ctx,
        "tracker": tracker,
        "stage_run": stage_run,
        "context": context,
        "teacher": teacher,
        "root": root,
    }
    ray.shutdown()


@pytest.mark.slow
def test_the_search_records_every_candidate_in_the_manifest(searched, teacher_config):
    details = searched["result"].details
    search = details["search"]
    space = budget.search_space(search_spec(), teacher_config)
    rows = search["candidates"]
    assert [r["shape"] for r in rows] == [c.shape.as_dict() for c in space.candidates]
    assert all(space.budget.lo <= r["non_embedding_params"] <= space.budget.hi for r in rows)
    assert sorted(search["ranking_before"]) == list(range(len(rows)))
    assert [rows[i]["pruned_loss"] for i in search["ranking_before"]] == sorted(r["pruned_loss"] for r in rows)
    top = search["ranking_before"][:2]
    assert sorted(search["ranking_after"]) == sorted(top) and search["chosen"] == search["ranking_after"][0]
    for r in rows:
        distilled = r["index"] in top
        assert (r["heldout_loss_after"] is not None) == distilled == (r["heldout_loss_before"] is not None)
    chosen = rows[search["chosen"]]
    assert chosen["heldout_loss_after"] == min(rows[i]["heldout_loss_after"] for i in top)
    assert details["target_shape"] == chosen["shape"] == search["chosen_shape"]
    assert details["params_after"] == chosen["params"]  # the output is the source pruned to the chosen shape
    model_config = json.loads((searched["ctx"].model_dir / "config.json").read_text())
    assert {k: model_config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads")} == {
        k: chosen["shape"][k] for k in ("hidden_size", "intermediate_size", "num_attention_heads")
    }
    assert not (searched["ctx"].work_dir / "search").exists()  # no candidate in the stage's output
    assert json.loads((searched["ctx"].work_dir / "search.json").read_text()) == search
    assert details["scratch"] and all(Path(uri).exists() for uri in details["scratch"])  # until the stage is published


@pytest.mark.slow
def test_the_ranking_after_the_short_distill_is_not_the_ranking_before(searched):
    """Seed 0: the pruned loss prefers the hand-picked shape (4 layers, 2 heads, MLP 192); after 10 steps of
    distillation a 3-layer shape recovers further (Minitron's point: rank after a short distillation)."""
    search = searched["result"].details["search"]
    assert search["ranking_after"] != search["ranking_before"][: len(search["ranking_after"])]


@pytest.mark.slow
def test_every_candidate_is_a_nested_mlflow_run(searched):
    tracker, stage_run = searched["tracker"], searched["stage_run"]
    search = searched["result"].details["search"]
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{stage_run}'")
    assert len(runs) == len(search["candidates"]) and all(r.info.status == "FINISHED" for r in runs)
    by_index = {int(r.data.params["index"]): r for r in runs}
    for row in search["candidates"]:
        run = by_index[row["index"]]
        assert json.loads(run.data.params["shape.hidden_size"]) == row["shape"]["hidden_size"]
        assert run.data.metrics["pruned_loss"] == pytest.approx(row["pruned_loss"])
        assert run.data.metrics["rank_before"] == search["ranking_before"].index(row["index"])
        if row["heldout_loss_after"] is not None:
            assert run.data.metrics["heldout_loss_after"] == pytest.approx(row["heldout_loss_after"])
            history = tracker.client.get_metric_history(run.info.run_id, "loss")  # per step, from the Ray Train worker
            assert [m.step for m in history] == list(range(1, SEARCH["steps"] + 1))


@pytest.mark.slow
def test_the_chosen_shape_distills_no_worse_than_the_hand_picked_one(searched, tiny_corpus):
    """Both pruned from the teacher and distilled for the same 40 steps with the same settings; held-out perplexity
    measured like the pipeline's ref_ppl task (paragraphs from BOS)."""
    from test_distill_quality import paragraph_perplexity

    from compressor.manifest import ModelRef
    from compressor.models import load_tokenizer
    from compressor.stages.distill.spec import DistillSpec
    from compressor.stages.prune.search import distill_in_parallel

    context, teacher = searched["context"], searched["teacher"]
    hand_ctx = context("hand-picked")
    prune_stage.KIND.run(PruneSpec(target=HAND_PICKED, calibration="calib"), teacher, hand_ctx)
    spec = DistillSpec(data="distill", steps=MAIN_STEPS, **DISTILL)
    pruned = {"chosen": searched["ctx"].model_dir, "hand-picked": hand_ctx.model_dir}
    jobs = [
        (spec, ModelRef(path=str(path), key=f"pruned:{name}"), context(f"{name}-distilled"))
        for name, path in pruned.items()
    ]
    results = dict(distill_in_parallel(jobs))
    tokenizer = load_tokenizer(teacher.path)
    paragraphs = [p for p in (tiny_corpus / "heldout.txt").read_text().split("\n\n") if p.strip()][:300]
    ppl = {name: paragraph_perplexity(results[i]["model_dir"], paragraphs, tokenizer) for i, name in enumerate(pruned)}
    print(json.dumps({"perplexity": ppl, "chosen": searched["result"].details["target_shape"]}))
    assert ppl["chosen"] <= ppl["hand-picked"]
