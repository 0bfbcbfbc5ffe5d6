"""Gate bars: min / max / min_recovery / max_drop / max_drop_stderr, direction-aware."""

import json

import pytest
from pydantic import ValidationError

from compressor.config.schema import GateBar, GateSpec
from compressor.gates import check_gate, render

BASE = {"ref_next": {"acc": 0.60}, "ref_ppl": {"word_perplexity": 20.0}}


def gate(**metrics):
    return GateSpec(metrics=metrics)


def test_min_and_max():
    rows = check_gate(gate(**{"ref_next.acc": {"min": 0.5}, "ref_ppl.word_perplexity": {"max": 25}}), BASE, None, None)
    assert all(r.passed for r in rows)
    rows = check_gate(gate(**{"ref_next.acc": {"min": 0.7}}), BASE, None, None)
    assert not rows[0].passed and rows[0].verdict == "FAIL"


def test_recovery_for_higher_and_lower_is_better():
    scores = {"ref_next": {"acc": 0.55}, "ref_ppl": {"word_perplexity": 21.0}}
    ok = check_gate(
        gate(**{"ref_next.acc": {"min_recovery": 0.9}, "ref_ppl.word_perplexity": {"min_recovery": 0.9}}),
        scores,
        BASE,
        None,
    )
    assert [r.passed for r in ok] == [True, True]  # 0.55 >= 0.54; 21 <= 20/0.9
    bad = check_gate(gate(**{"ref_ppl.word_perplexity": {"min_recovery": 0.99}}), scores, BASE, None)
    assert not bad[0].passed


def test_max_drop_against_previous():
    previous = {"ref_next": {"acc": 0.58}}
    rows = check_gate(gate(**{"ref_next.acc": {"max_drop": 0.01}}), {"ref_next": {"acc": 0.575}}, BASE, previous)
    assert rows[0].passed
    rows = check_gate(gate(**{"ref_next.acc": {"max_drop": 0.01}}), {"ref_next": {"acc": 0.56}}, BASE, previous)
    assert not rows[0].passed


def test_missing_metric_or_baseline_fails_closed():
    rows = check_gate(gate(**{"ref_next.f1": {"min": 0}}), BASE, None, None)
    assert not rows[0].passed
    rows = check_gate(gate(**{"ref_next.acc": {"min_recovery": 0.5}}), BASE, None, None)
    assert not rows[0].passed


# Standard errors as lm-eval reports them beside each metric ("<metric>_stderr"). The difference's stderr is
# sqrt(0.012² + 0.016²) = 0.02 for acc, sqrt(0.06² + 0.08²) = 0.1 for perplexity, so k=2 allows 0.04 and 0.2.
PREVIOUS = {"ref_next": {"acc": 0.60, "acc_stderr": 0.012}, "lambada": {"perplexity": 3.50, "perplexity_stderr": 0.06}}


def scores_now(acc=None, perplexity=None):
    out = {}
    if acc is not None:
        out["ref_next"] = {"acc": acc, "acc_stderr": 0.016}
    if perplexity is not None:
        out["lambada"] = {"perplexity": perplexity, "perplexity_stderr": 0.08}
    return out


@pytest.mark.parametrize("acc,passed", [(0.61, True), (0.565, True), (0.5605, True), (0.5595, False), (0.50, False)])
def test_max_drop_stderr_for_a_higher_is_better_metric(acc, passed):
    rows = check_gate(gate(**{"ref_next.acc": {"max_drop_stderr": 2}}), scores_now(acc=acc), None, PREVIOUS)
    assert [r.passed for r in rows] == [passed]
    assert rows[0].stderr == 0.016 and ">= 0.56 " in rows[0].bar and "2 x 0.02" in rows[0].bar


@pytest.mark.parametrize("ppl,passed", [(3.2, True), (3.69, True), (3.71, False), (4.5, False)])
def test_max_drop_stderr_for_a_lower_is_better_metric(ppl, passed):
    rows = check_gate(
        gate(**{"lambada.perplexity": {"max_drop_stderr": 2}}), scores_now(perplexity=ppl), None, PREVIOUS
    )
    assert [r.passed for r in rows] == [passed]
    assert "<= 3.7 " in rows[0].bar


def test_max_drop_stderr_scales_with_k_and_sits_beside_the_absolute_bar():
    now = scores_now(acc=0.55)  # a drop of 0.05 = 2.5 stderrs of the difference
    assert check_gate(gate(**{"ref_next.acc": {"max_drop_stderr": 2.6}}), now, None, PREVIOUS)[0].passed
    assert not check_gate(gate(**{"ref_next.acc": {"max_drop_stderr": 2.4}}), now, None, PREVIOUS)[0].passed
    both = check_gate(gate(**{"ref_next.acc": {"max_drop": 0.01, "max_drop_stderr": 2.6}}), now, None, PREVIOUS)
    assert [r.passed for r in both] == [False, True]  # every bar is its own row; the stage passes only if all do


def test_plain_task_name_uses_the_primary_metric_and_its_stderr():
    previous = {"arc": {"acc": 0.5, "acc_stderr": 0.01, "acc_norm": 0.55, "acc_norm_stderr": 0.0145}}
    now = {"arc": {"acc": 0.49, "acc_stderr": 0.01, "acc_norm": 0.53, "acc_norm_stderr": 0.0145}}
    rows = check_gate(gate(arc={"max_drop_stderr": 2.5}), now, None, previous)
    assert rows[0].metric == "arc.acc_norm" and rows[0].stderr == 0.0145 and rows[0].passed


@pytest.mark.parametrize(
    "now,previous,missing",
    [
        (
            {"ref_ppl": {"bits_per_byte": 2.0}},
            {"ref_ppl": {"bits_per_byte": 2.0, "bits_per_byte_stderr": 0.01}},
            "this stage",
        ),
        (
            {"ref_ppl": {"bits_per_byte": 2.0, "bits_per_byte_stderr": 0.01}},
            {"ref_ppl": {"bits_per_byte": 2.0}},
            "the previous one",
        ),
        ({"ref_ppl": {"bits_per_byte": 2.0}}, {"ref_ppl": {"bits_per_byte": 2.0}}, "this stage and the previous one"),
        (
            {"ref_ppl": {"bits_per_byte": 2.0, "bits_per_byte_stderr": float("nan")}},
            {"ref_ppl": {"bits_per_byte": 2.0, "bits_per_byte_stderr": 0.01}},
            "this stage",
        ),
    ],
)
def test_missing_stderr_is_a_fail_row_that_says_so(now, previous, missing):
    rows = check_gate(gate(**{"ref_ppl.bits_per_byte": {"max_drop_stderr": 2.5}}), now, None, previous)
    assert len(rows) == 1 and not rows[0].passed and rows[0].value == 2.0
    assert f"no standard error for {missing} " in rows[0].bar and "max_drop" in rows[0].bar


def test_max_drop_stderr_without_a_previous_score_fails():
    rows = check_gate(gate(**{"ref_next.acc": {"max_drop_stderr": 2.5}}), scores_now(acc=0.6), None, None)
    assert not rows[0].passed and "no previous score" in rows[0].bar


def test_gate_table_and_json_carry_the_stderr():
    from rich.console import Console

    rows = check_gate(
        gate(**{"ref_next.acc": {"min": 0.5, "max_drop_stderr": 2}}), scores_now(acc=0.59), None, PREVIOUS
    )
    assert [r.stderr for r in rows] == [0.016, 0.016]
    assert json.loads(json.dumps([r.__dict__ for r in rows]))[1]["stderr"] == 0.016  # the gate.json artifact
    console = Console(width=200, record=True)
    console.print(render("quantize", rows))
    text = console.export_text()
    assert "stderr" in text and "±0.016" in text
    no_stderr = check_gate(gate(**{"ref_next.acc": {"min": 0.5}}), BASE, None, None)
    assert no_stderr[0].stderr is None


def test_max_drop_stderr_must_be_positive_and_counts_as_a_bar():
    assert GateBar(max_drop_stderr=2.5).max_drop_stderr == 2.5
    with pytest.raises(ValidationError, match="greater than 0"):
        GateBar(max_drop_stderr=0)
    with pytest.raises(ValidationError, match="max_drop_stderr"):
        GateBar()
