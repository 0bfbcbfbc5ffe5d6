"""docs/reference.md is generated from the schema and must be current; every schema field appears in it."""

from __future__ import annotations

from compressor import docs_gen
from compressor.config.schema import PipelineSpec
from compressor.stages import kinds


def test_reference_is_current():
    current = docs_gen.REFERENCE.read_text()
    assert current == docs_gen.generate(), "docs/reference.md is stale: run `python -m compressor.docs_gen`"
    assert docs_gen.main(["--check"]) == 0


def test_reference_covers_every_model_and_field():
    text = docs_gen.generate()
    for model in [PipelineSpec, *(m for kind in kinds().values() for m in docs_gen.spec_models(kind.spec))]:
        assert f"## {model.__name__}\n" in text
        for name in model.model_fields:
            assert f"| `{name}` |" in text
    assert "| `zero_stage` | `0` \\| `1` \\| `2` \\| `3` | `3` |" in text  # nested DeepSpeedOptions, Literal type
    assert "| `global_batch` | int, > 0 | `8` |" in text  # bounds rendered from Field(gt=0)


def test_check_mode_detects_a_stale_file(tmp_path, monkeypatch):
    stale = tmp_path / "reference.md"
    stale.write_text(docs_gen.generate().replace("global_batch", "global_batch_OLD"))
    monkeypatch.setattr(docs_gen, "REFERENCE", stale)
    assert docs_gen.main(["--check"]) == 1
