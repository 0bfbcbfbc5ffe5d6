"""Stage keys change with the output-relevant spec and the input only."""

from compressor.cache import stage_key
from compressor.stages.distill.spec import DistillSpec
from compressor.stages.quantize.spec import GPTQSpec as QuantizeSpec


def test_key_is_stable_and_sensitive():
    spec = QuantizeSpec(bits=4, group_size=32)
    key = stage_key("quantize", spec, "input-a")
    assert key == stage_key("quantize", QuantizeSpec(bits=4, group_size=32), "input-a")
    assert key == stage_key("quantize", spec.model_copy(), "input-a", None)
    assert key != stage_key("quantize", QuantizeSpec(bits=8, group_size=32), "input-a")  # spec changed
    assert key != stage_key("quantize", spec, "input-b")  # input changed
    assert key != stage_key("quantize", spec, "input-a", {"seed": 1})  # extra inputs changed


def test_key_changes_with_version(monkeypatch):
    import compressor.cache as cache

    before = stage_key("quantize", QuantizeSpec(), "x")
    monkeypatch.setattr(cache, "__version__", "999")
    assert stage_key("quantize", QuantizeSpec(), "x") != before


def test_operational_fields_and_gates_are_not_in_the_key():
    base = DistillSpec(data="d", steps=10)
    operated = DistillSpec(data="d", steps=10, checkpoint_every=7, max_failures=0, placement_strategy="SPREAD")
    assert stage_key("distill", base, "x") == stage_key("distill", operated, "x")
    assert stage_key("distill", base, "x") != stage_key("distill", DistillSpec(data="d", steps=11), "x")
    assert stage_key("distill", base, "x") != stage_key("distill", DistillSpec(data="d", steps=10, workers=2), "x")
