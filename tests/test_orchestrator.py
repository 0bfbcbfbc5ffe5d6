"""The orchestrator's preparation of a run: what it resolves once before any stage runs."""

from compressor.config.load import load_pipeline
from compressor.orchestrator import Orchestrator

PIPELINE = """\
name: pinned
teacher: {{model: "zoo:tiny-test"}}
storage: {storage}
data:
  distill: {{source: "hf:acme/docs", seq_len: 64{revision}}}
stages:
  - distill: {{data: distill, steps: 2, global_batch: 2, micro_batch: 1}}
"""


def distill_key(tmp_path, monkeypatch, commit: str, revision: str = "") -> tuple[str, str]:
    """(the key `plan` shows, the key the run uses) with the hub answering `commit` for the dataset's branch."""
    import compressor.text_sources as data

    monkeypatch.setattr(data, "_hf_commit", lambda name, rev: rev if rev and len(rev) == 40 else commit)
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(storage=tmp_path / "store", revision=revision))
    orchestrator = Orchestrator(load_pipeline(path), path.read_text(), console=None)
    planned = orchestrator.plan.stages[0].key
    orchestrator._pin_hub_data()
    return planned, orchestrator.plan.stages[0].key


def test_an_hf_source_is_pinned_to_its_commit_in_the_stage_key_before_the_run(tmp_path, monkeypatch):
    a, b = "a" * 40, "b" * 40
    planned, run_a = distill_key(tmp_path, monkeypatch, a)
    _, run_b = distill_key(tmp_path, monkeypatch, b)
    assert run_a != run_b  # the dataset moved upstream: new shards, a new distill, never a mix
    assert planned != run_a  # plan, offline, keys the branch; the run keys the commit it resolved
    _, run_pinned = distill_key(tmp_path, monkeypatch, b, revision=f", revision: {a}")
    assert run_pinned == run_a  # pinning the commit in the YAML is the same stage as resolving it
