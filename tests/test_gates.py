"""Gate bars: min / max / min_recovery / max_drop, direction-aware."""

from compressor.config.schema import GateSpec
from compressor.gates import check_gate

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
    ok = check_gate(gate(**{"ref_next.acc": {"min_recovery": 0.9}, "ref_ppl.word_perplexity": {"min_recovery": 0.9}}),
                    scores, BASE, None)
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
