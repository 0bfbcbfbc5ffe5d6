"""compressor.storage on fsspec's in-memory filesystem: upload (manifest last), download, local mirrors."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from compressor import storage
from compressor.errors import UserError
from compressor.manifest import MANIFEST, Manifest


@pytest.fixture
def remote():
    """A fresh memory:// root, removed afterwards (the memory filesystem is process-global)."""
    root = f"memory://bucket-{uuid.uuid4().hex[:8]}/compressor"
    yield root
    fs = fsspec.filesystem("memory")
    bucket = fs._strip_protocol(root).rsplit("/compressor", 1)[0]
    if fs.exists(bucket):
        fs.rm(bucket, recursive=True)


def finished_stage(directory: Path, key: str = "k" * 64) -> Path:
    (directory / "model").mkdir(parents=True)
    (directory / "model" / "config.json").write_text('{"hidden_size": 8}')
    (directory / "model" / "model.safetensors").write_bytes(b"\x00" * 1000)
    (directory / "eval.json").write_text("{}")
    Manifest(stage="prune", kind="prune", key=key, model_uri="model").write(directory)
    return directory


def test_is_remote_and_join():
    assert storage.is_remote("s3://b/p") and storage.is_remote("memory://x")
    assert not storage.is_remote("/mnt/shared/compressor") and not storage.is_remote("./artifacts")
    assert not storage.is_remote("file:///tmp/a")
    assert storage.join("s3://b/p/", "pipe", "prune-abc") == "s3://b/p/pipe/prune-abc"
    assert storage.join("/mnt/x", "pipe") == "/mnt/x/pipe"


def test_local_mirror_keeps_protocol_and_path(tmp_path):
    assert storage.local_mirror("/mnt/shared/c") == Path("/mnt/shared/c")
    mirror = storage.local_mirror("s3://bucket/c/pipe/prune-ab12", root=tmp_path)
    assert mirror == tmp_path / "s3" / "bucket" / "c" / "pipe" / "prune-ab12"
    assert storage.local_mirror("memory://b/../x", root=tmp_path).is_relative_to(tmp_path)  # no escaping the root


def test_upload_writes_manifest_last_and_first_publisher_wins(tmp_path, remote, monkeypatch):
    local = finished_stage(tmp_path / "prune-kkk")
    target = storage.join(remote, "pipe", "prune-kkkkkkkkkkkk")
    fs = fsspec.filesystem("memory")
    order: list[str] = []
    real_put = fs.put_file

    def recording_put(lpath, rpath, *args, **kwargs):
        order.append(Path(rpath).name)
        assert storage.read_manifest(target) is None  # nothing counts as published before the manifest
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(type(fs), "put_file", lambda self, *a, **k: recording_put(*a, **k))
    assert storage.upload_stage(local, target) is True
    assert order[-1] == MANIFEST and sorted(order) == sorted(
        ["config.json", "model.safetensors", "eval.json", MANIFEST]
    )
    assert storage.exists(storage.join(target, "model", "model.safetensors"))
    assert storage.read_manifest(target).key == "k" * 64
    assert storage.upload_stage(local, target) is False  # already published: left alone


def test_upload_refuses_an_unfinished_stage(tmp_path, remote):
    (tmp_path / "model").mkdir()
    with pytest.raises(ValueError, match=MANIFEST):
        storage.upload_stage(tmp_path, storage.join(remote, "x"))


def test_download_roundtrip_reuse_and_refresh(tmp_path, remote):
    target = storage.join(remote, "pipe", "prune-kkkkkkkkkkkk")
    storage.upload_stage(finished_stage(tmp_path / "a"), target)
    local = storage.download_stage(target, tmp_path / "mirror" / "prune")
    assert (local / "model" / "model.safetensors").read_bytes() == b"\x00" * 1000
    assert Manifest.read(local).key == "k" * 64
    assert not list((tmp_path / "mirror").glob(".tmp-*"))
    (local / "model" / "config.json").write_text("local edit")
    assert storage.download_stage(target, local) == local  # same key: the local copy is reused
    assert (local / "model" / "config.json").read_text() == "local edit"
    # A republished stage with another key replaces the stale mirror.
    fs, path = storage.filesystem(target)
    fs.rm(path, recursive=True)
    storage.upload_stage(finished_stage(tmp_path / "b", key="z" * 64), target)
    assert Manifest.read(storage.download_stage(target, local)).key == "z" * 64
    assert (local / "model" / "config.json").read_text() == '{"hidden_size": 8}'


def test_download_of_an_unpublished_stage_is_a_user_error(tmp_path, remote):
    with pytest.raises(UserError, match="not been published"):
        storage.download_stage(storage.join(remote, "nothing"), tmp_path / "m")


def test_download_defaults_to_the_local_mirror(tmp_path, remote, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    target = storage.join(remote, "pipe", "prune-kkkkkkkkkkkk")
    storage.upload_stage(finished_stage(tmp_path / "a"), target)
    local = storage.download_stage(target)
    assert local == storage.local_mirror(target) and local.is_relative_to(tmp_path / "cache")


def test_train_storage_for_ray(tmp_path, remote):
    import pyarrow.fs

    assert storage.train_storage(str(tmp_path)) == (str(tmp_path.resolve()), None)
    assert storage.train_storage("s3://bucket/c") == ("s3://bucket/c", None)  # pyarrow's own S3 client
    path, fs = storage.train_storage(remote)
    assert not path.startswith("memory://")
    with fs.open_output_stream(f"{path}/ckpt/x.bin") as out:
        out.write(b"abc")
    assert fs.get_file_info(f"{path}/ckpt/x.bin").type == pyarrow.fs.FileType.File
    assert storage.exists(storage.join(remote, "ckpt", "x.bin"))


def test_missing_filesystem_driver_is_a_user_error():
    with pytest.raises(UserError, match="no filesystem"):
        storage.exists("nosuchproto://bucket/x")


def test_publish_dir_is_atomic_and_the_first_publisher_wins(tmp_path, remote):
    for target in (str(tmp_path / "store" / "prune-k"), storage.join(remote, "prune-k")):
        first = finished_stage(tmp_path / f"work-{uuid.uuid4().hex[:6]}")
        assert storage.publish_dir(first, target) and not first.exists()
        second = finished_stage(tmp_path / f"work-{uuid.uuid4().hex[:6]}", key="z" * 64)
        assert not storage.publish_dir(second, target) and not second.exists()
        assert storage.read_manifest(target).key == "k" * 64


def test_a_leftover_without_manifest_is_replaced(tmp_path):
    target = tmp_path / "prune-k"
    (target / "model").mkdir(parents=True)  # a crash left it half-written
    assert storage.read_manifest(str(target)) is None
    assert storage.publish_dir(finished_stage(tmp_path / "work"), str(target))
    assert storage.read_manifest(str(target)) is not None


def test_move_stage_writes_the_new_manifest_last_and_removes_the_source(tmp_path, remote):
    for root in (str(tmp_path / "store"), remote):
        pending, final = storage.join(root, "pending", "q-k"), storage.join(root, "q-k")
        storage.publish_dir(finished_stage(tmp_path / f"w-{uuid.uuid4().hex[:6]}"), pending)
        record = storage.read_manifest(pending).model_copy(update={"details": {"gate": "passed"}})
        storage.move_stage(pending, final, record)
        assert storage.read_manifest(final).details == {"gate": "passed"}
        assert storage.exists(storage.join(final, "model", "model.safetensors"))
        assert storage.read_manifest(pending) is None and not storage.exists(pending)
        storage.move_stage(final, final, record.model_copy(update={"details": {"gate": "again"}}))  # in place
        assert storage.read_manifest(final).details == {"gate": "again"}


def test_a_manifest_that_is_torn_or_names_missing_files_is_not_a_finished_stage(tmp_path, remote):
    """What planning reuses (storage.finished_manifest): a manifest with the right key whose listed model files are
    all there with their sizes; anything else makes the stage compute again."""
    for root in (str(tmp_path / "store"), remote):
        target = storage.join(root, "prune-k")
        work = finished_stage(tmp_path / f"w-{uuid.uuid4().hex[:6]}")
        manifest = Manifest.read(work).model_copy(update={"files": storage.file_sizes(work / "model")})
        assert manifest.files == {"config.json": 18, "model.safetensors": 1000}
        manifest.write(work)
        storage.publish_dir(work, target)
        assert storage.finished_manifest(target, "k" * 64) == manifest
        assert storage.finished_manifest(target, "z" * 64) is None  # another key
        fs, path = storage.filesystem(target)
        weights = f"{path}/model/model.safetensors"
        fs.pipe_file(weights, b"\x00" * 10)  # a file of another size (a copy that stopped half-way)
        assert storage.missing_files(target, manifest) == ["model.safetensors"]
        assert storage.finished_manifest(target, "k" * 64) is None
        fs.rm(weights)  # a file that is not there
        assert storage.finished_manifest(target, "k" * 64) is None
        fs.pipe_file(weights, b"\x00" * 1000)
        assert storage.finished_manifest(target, "k" * 64) == manifest
        fs.pipe_file(f"{path}/{MANIFEST}", manifest.model_dump_json().encode()[:40])  # torn
        assert storage.finished_manifest(target, "k" * 64) is None
        legacy = manifest.model_copy(update={"files": {}})  # written before manifests listed their files
        fs.pipe_file(f"{path}/{MANIFEST}", legacy.model_dump_json().encode())
        assert storage.finished_manifest(target, "k" * 64) == legacy
        fs.rm(f"{path}/model/config.json")
        assert storage.finished_manifest(target, "k" * 64) is None
