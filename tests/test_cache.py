"""Stage cache: keys change with spec and input only; publishing is atomic and manifest-last."""

import pytest

from compressor.cache import StageCache, stage_key
from compressor.config.stages import QuantizeSpec
from compressor.manifest import Manifest


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


def manifest(key):
    return Manifest(stage="s", kind="quantize", key=key, model_uri="model")


def test_staging_publishes_only_with_manifest(tmp_path):
    cache = StageCache(tmp_path)
    with cache.staging("s", "k" * 20) as work:
        (work / "model").mkdir()
        manifest("k" * 20).write(work)
    assert cache.lookup("s", "k" * 20).key == "k" * 20
    assert not list(tmp_path.glob(".tmp-*"))


def test_failed_stage_publishes_nothing(tmp_path):
    cache = StageCache(tmp_path)
    with pytest.raises(ValueError):
        with cache.staging("s", "f" * 20) as work:
            (work / "model").mkdir()
            raise ValueError("boom")
    assert cache.lookup("s", "f" * 20) is None
    assert list(tmp_path.iterdir()) == []


def test_dir_without_manifest_is_not_done_and_is_replaced(tmp_path):
    cache = StageCache(tmp_path)
    cache.stage_dir("s", "a" * 20).mkdir(parents=True)  # leftover of a crash
    assert cache.lookup("s", "a" * 20) is None
    with cache.staging("s", "a" * 20) as work:
        manifest("a" * 20).write(work)
    assert cache.lookup("s", "a" * 20) is not None
