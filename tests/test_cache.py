"""Stage keys change with the output-relevant spec, the input and the kind's output version only."""

from contextlib import contextmanager

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


# The tiny pipeline's keys, with the zoo teacher's key fixed (it hashes the Python docs it is trained on, which differ
# between Python versions). These are the keys compressor 0.1.0 wrote: a change here re-keys every user's cache and
# restarts their distillations. Change them only with a bump of the kind's output_version, and say so in the notes.
GOLDEN = {
    "prune": "99b246569b458c62a40614fc9025af9e16a84a1ed7d7655b1b7ad8f4cbe5df2a",
    "distill": "09e2d4c16ddda29f21aeddb05b723ea59b5913af7c8d42365f3af135628dd724",
    "quantize": "1188750ccf64d3bc76e295e0b6a8817f826a0566d901803e3c87aa2bd17a2c29",
}


def tiny_keys(tmp_path, monkeypatch, *overrides) -> dict[str, str]:
    from importlib.resources import files

    import compressor.models.zoo as zoo
    from compressor.config.load import load_pipeline
    from compressor.planning import make_plan

    monkeypatch.setattr(zoo, "model_key", lambda name: f"golden-{name}")
    spec = load_pipeline(str(files("compressor") / "pipelines" / "tiny.yaml"), list(overrides))
    return {s.name: s.key for s in make_plan(spec, storage=str(tmp_path)).stages}


def test_the_tiny_pipelines_keys_are_pinned_and_do_not_change_with_the_package_version(tmp_path, monkeypatch):
    import compressor

    assert tiny_keys(tmp_path, monkeypatch) == GOLDEN
    monkeypatch.setattr(compressor, "__version__", "9.9.9")
    assert tiny_keys(tmp_path, monkeypatch) == GOLDEN


@contextmanager
def kind_replaced(name: str, **changes):
    from compressor import contract

    kind = contract.get(name)
    contract.register(type(type(kind).__name__, (type(kind),), changes)())  # the same kind, those attributes changed
    try:
        yield
    finally:
        contract.register(kind)


def test_a_kinds_output_version_re_keys_that_kind_and_what_follows_it_only(tmp_path, monkeypatch):
    with kind_replaced("distill", output_version="2"):
        keys = tiny_keys(tmp_path, monkeypatch)
    assert keys["prune"] == GOLDEN["prune"]
    assert keys["distill"] != GOLDEN["distill"] and keys["quantize"] != GOLDEN["quantize"]  # its input changed


def test_a_field_added_with_a_neutral_default_leaves_every_key_unchanged(tmp_path, monkeypatch):
    from compressor import contract
    from compressor.contract.spec import Strict, neutral

    distill_spec = contract.get("distill").spec
    loss_spec = distill_spec.model_fields["loss"].annotation

    class NewLoss(loss_spec):  # a nested spec grows a field too
        new_term_weight: float = neutral(0.0)

    class NewDistill(distill_spec):
        new_knob: int = neutral(0)
        loss: NewLoss = NewLoss()

    class Unmarked(distill_spec):
        new_knob: int = 0

    assert issubclass(NewDistill, Strict)
    with kind_replaced("distill", spec=NewDistill):
        assert tiny_keys(tmp_path, monkeypatch) == GOLDEN
        assert tiny_keys(tmp_path, monkeypatch, "stages.distill.new_knob=0") == GOLDEN  # said, at its default
        changed = tiny_keys(tmp_path, monkeypatch, "stages.distill.new_knob=3")
        assert changed["distill"] != GOLDEN["distill"] and changed["prune"] == GOLDEN["prune"]
        assert (
            tiny_keys(tmp_path, monkeypatch, "stages.distill.loss.new_term_weight=0.5")["distill"] != GOLDEN["distill"]
        )
    with kind_replaced("distill", spec=Unmarked):  # what the golden keys catch: a field added without `neutral`
        assert tiny_keys(tmp_path, monkeypatch)["distill"] != GOLDEN["distill"]


def test_operational_fields_and_gates_are_not_in_the_key():
    base = DistillSpec(data="d", steps=10)
    operated = DistillSpec(data="d", steps=10, checkpoint_every=7, max_failures=0, placement_strategy="SPREAD")
    assert stage_key("distill", base, "x") == stage_key("distill", operated, "x")
    assert stage_key("distill", base, "x") != stage_key("distill", DistillSpec(data="d", steps=11), "x")
    assert stage_key("distill", base, "x") != stage_key("distill", DistillSpec(data="d", steps=10, workers=2), "x")
