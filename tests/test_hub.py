"""Hub teachers: resolved to a commit once, published to the pipeline storage, and refused clearly when they cannot
be had. The hub is a Hugging Face cache laid out by the test (HF_HUB_OFFLINE=1), as on a machine without network."""

import subprocess
import sys

import pytest

from compressor.config.load import load_pipeline
from compressor.errors import UserError
from compressor.manifest import Manifest
from compressor.models import hub, is_hub_id
from compressor.planning import make_plan

PIPELINE = """\
name: hubbed
teacher: {{model: "{repo}", revision: {revision}}}
storage: {storage}
data:
  calib: {{source: "zoo:tiny-test", samples: 8, seq_len: 64}}
stages:
  - prune: {{target: {{intermediate_size: 256}}, calibration: calib, batch_size: 4}}
"""


def test_a_repo_id_is_told_apart_from_paths_and_zoo(tmp_path, monkeypatch):
    assert is_hub_id("meta-llama/Llama-3.1-8B")
    assert not is_hub_id("zoo:tiny") and not is_hub_id("s3://b/m") and not is_hub_id("./a/b")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    monkeypatch.chdir(tmp_path)  # an existing local directory wins over a repo id of the same spelling
    assert not is_hub_id("org/name")


def test_snapshot_is_published_once_to_storage_with_the_commit_in_its_key(offline_hub, tmp_path):
    ref = hub.publish_snapshot(offline_hub["repo"], "main", str(tmp_path / "store"), "float32")
    commit = offline_hub["commit"]
    assert ref.revision == commit and commit in ref.key
    stage = tmp_path / "store" / "_models" / f"acme--tiny-llama-{commit[:12]}"
    assert ref.path == str(stage / "model")
    assert (stage / "model" / "config.json").is_file() and (stage / "model" / "model.safetensors").is_file()
    assert Manifest.read(stage).details["commit"] == commit
    # a second pipeline reuses it without copying again
    before = (stage / "manifest.json").stat().st_mtime_ns
    assert hub.publish_snapshot(offline_hub["repo"], commit, str(tmp_path / "store"), "float32") == ref
    assert (stage / "manifest.json").stat().st_mtime_ns == before


def test_only_the_files_a_checkpoint_needs_are_published_whatever_else_the_cache_holds(
    hub_cache, tmp_path, monkeypatch
):
    import shutil

    from huggingface_hub import constants

    hf_home = tmp_path / "hf_home"
    shutil.copytree(hub_cache["hf_home"], hf_home, symlinks=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = hf_home / "hub" / "models--acme--tiny-llama" / "snapshots" / hub_cache["commit"]
    (snapshot / "original").mkdir()
    (snapshot / "original" / "consolidated.00.pth").write_bytes(b"\0" * 4096)  # fetched by the user another day
    (snapshot / "pytorch_model.bin").write_bytes(b"\0" * 4096)  # a second copy of the weights: safetensors win
    ref = hub.publish_snapshot(hub_cache["repo"], "main", str(tmp_path / "store"), "float32")
    published = sorted(
        p.relative_to(ref.path).as_posix()
        for p in (tmp_path / "store").rglob("*")
        if p.is_file() and str(p).startswith(ref.path)
    )
    assert "model.safetensors" in published and "config.json" in published
    assert not any(name.startswith("original/") or name.endswith((".pth", ".bin")) for name in published), published


def test_plan_keys_the_teacher_by_commit_without_network(offline_hub, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(repo=offline_hub["repo"], revision="main", storage=tmp_path / "store"))
    plan = make_plan(load_pipeline(path))
    assert plan.teacher.key == hub.model_key(offline_hub["repo"], offline_hub["commit"], "float32")


@pytest.mark.parametrize(
    "repo, revision, words",
    [
        ("acme/tiny-llama", "no-such-branch", ["'no-such-branch'", "acme/tiny-llama", "HF_HUB_OFFLINE"]),
        ("acme/not-there", "main", ["acme/not-there", "local Hugging Face cache"]),
    ],
)
def test_what_cannot_be_had_is_a_one_paragraph_user_error(offline_hub, repo, revision, words):
    with pytest.raises(UserError) as err:
        hub.resolve_commit(repo, revision)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert "\n" not in str(err.value)


def test_run_with_a_wrong_revision_exits_2_naming_it(hub_cache, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(repo=hub_cache["repo"], revision="v9.9", storage=tmp_path / "store"))
    result = subprocess.run(
        [sys.executable, "-m", "compressor", "run", str(path)],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **hub_cache["env"]},
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "'v9.9'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "store" / "hubbed").exists()
