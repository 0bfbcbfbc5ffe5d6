"""compressor.models: where a model is, and what of it a reader fetches."""

import subprocess
import sys

import pytest

from compressor import models, shards
from compressor.manifest import ModelRef


@pytest.mark.parametrize(
    "text, name, hub",
    [
        ("zoo:tiny", "tiny", False),
        ("meta-llama/Llama-3.1-8B", None, True),
        ("s3://bucket/store/teacher/model", None, False),
        ("./checkpoints/teacher", None, False),
    ],
)
def test_a_reference_is_a_zoo_name_a_hub_id_or_neither(text, name, hub):
    assert models.zoo_name(text) == name and models.is_zoo(text) == (name is not None)
    assert models.is_hub_id(text) == hub
    if name is not None:
        assert models.zoo_ref(name) == text


def test_importing_models_imports_no_torch():
    """validate and plan read configs and parse references through compressor.models: without torch."""
    code = "import sys, compressor.models; print('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_the_tokenizer_of_a_model_on_s3_is_read_without_its_weights(s3, tiny_teacher, tmp_path, monkeypatch):
    """The distill driver keys and writes token shards with the teacher's tokenizer (issue 18: it downloaded the
    whole teacher for that). The bytes the S3 server sends show what was fetched."""
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    s3.put(str(tiny_teacher), "bucket/store/teacher/model", recursive=True)
    uri = "s3://bucket/store/teacher/model"
    weights = sum(p.stat().st_size for p in tiny_teacher.glob("*.safetensors"))
    s3.served.clear()

    local = models.tokenizer_dir(ModelRef(path=uri, key="k1"))
    key = shards.tokenizer_digest(local)
    sent = sum(s3.served.values())
    assert not any(name.endswith(".safetensors") for name in s3.served), s3.served
    assert 0 < sent < weights / 4, (sent, weights)
    assert key == shards.tokenizer_digest(str(tiny_teacher)) == shards.tokenizer_digest(uri)  # same tokenizer, same key
    from compressor.models import load_tokenizer

    assert load_tokenizer(local)("def f(): pass").input_ids  # a working tokenizer, not a set of file names

    s3.served.clear()  # a second reader on this node (another pipeline, a re-run) fetches nothing again
    assert models.tokenizer_dir(ModelRef(path=uri, key="k1")) == local and not s3.served
