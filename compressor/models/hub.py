"""Hugging Face hub models, resolved once per pipeline into one snapshot on the pipeline storage.

A teacher given as `ORG/NAME` (with an optional `revision`) is resolved to a commit hash, downloaded once through
`huggingface_hub.snapshot_download` (so HF_TOKEN, HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE work as users expect), and
published to `<storage>/_models/<ORG>--<NAME>-<commit12>/{model/, manifest.json}`, manifest last, exactly like a stage
output. Every loader (prune, the distill workers, evaluation, quantize) then reads that one snapshot, from any node,
instead of 8 nodes each pulling 16 GB from the hub. The commit hash is the teacher's cache key, so a moving branch
(`main`) never silently reuses stages built from an older commit.

Hub errors (no such repo, a gated repo without a token, no such revision, an offline machine with nothing cached)
become one-paragraph UserErrors (exit 2)."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional

from compressor import storage
from compressor.errors import UserError
from compressor.manifest import Manifest, ModelRef

COMMIT = re.compile(r"^[0-9a-f]{40}$")
# What a checkpoint needs. Llama repos also ship `original/*.pth` (a second copy of the weights): never fetched.
WANTED = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "tokenizer*", "*.py"]
WEIGHTS_FALLBACK = ["*.bin"]  # only for repos without safetensors
SKIPPED = ["original/*", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.ot"]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _where(repo_id: str, revision: Optional[str]) -> str:
    return f"teacher.model {repo_id!r}" + (f" at revision {revision!r}" if revision else "")


def _explain(exc: Exception, repo_id: str, revision: Optional[str]) -> UserError:
    from huggingface_hub import errors

    where = _where(repo_id, revision)
    if isinstance(exc, errors.GatedRepoError):
        return UserError(
            f"{where}: the repository is gated; accept its licence on huggingface.co and set HF_TOKEN "
            "(on every node) to a token that has access"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return UserError(
            f"{where}: no such revision in the repository; set teacher.revision to an existing branch, "
            "tag or commit hash"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return UserError(
            f"{where}: no such repository on the hub (or it is private: set HF_TOKEN to a token with access)"
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        if offline():
            return UserError(
                f"{where}: not in the local Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE=1 "
                "forbids downloading it; run once with network access, or check the revision"
            )
        return UserError(
            f"{where}: the hub cannot be reached and nothing is cached ({exc}); check the network, or "
            "set HF_HUB_OFFLINE=1 to use the local cache"
        )
    return UserError(f"{where}: cannot be fetched from the Hugging Face hub ({type(exc).__name__}: {exc})")


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_commit(repo_id: str, revision: Optional[str]) -> Optional[str]:
    """The commit a revision points to, from the local HF cache only (no network); None when unknown."""
    if revision and COMMIT.match(revision):
        return revision
    ref = Path(_cache_dir(), f"models--{repo_id.replace('/', '--')}", "refs", revision or "main")
    return ref.read_text().strip() if ref.is_file() else None


def resolve_commit(repo_id: str, revision: Optional[str]) -> str:
    """The commit hash `revision` (default: main) points to now: asked of the hub, or of the cache when offline."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        if offline():
            path = snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=["config.json"])
            return Path(path).name
        return HfApi().model_info(repo_id, revision=revision).sha
    except Exception as exc:  # noqa: BLE001  (every hub failure becomes one paragraph)
        raise _explain(exc, repo_id, revision) from None


def snapshot_uri(storage_uri: str, repo_id: str, commit: str) -> str:
    return storage.join(storage_uri, "_models", f"{repo_id.replace('/', '--')}-{commit[:12]}")


def model_key(repo_id: str, commit: str, dtype: str) -> str:
    return f"hub:{repo_id}@{commit}:{dtype}"


def _download(repo_id: str, commit: str) -> tuple[Path, list[str]]:
    """The snapshot in the local HF cache (downloaded now unless cached), safetensors preferred over .bin, and the
    relative paths of the files fetched for it: the snapshot directory may hold more that the user fetched another
    day (Llama's `original/*.pth`, 16 GB), which is never published."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    allow = WANTED
    try:
        path = Path(snapshot_download(repo_id, revision=commit, allow_patterns=allow, ignore_patterns=SKIPPED))
        if not any(path.glob("*.safetensors")):
            allow = WANTED + WEIGHTS_FALLBACK
            path = Path(snapshot_download(repo_id, revision=commit, allow_patterns=allow, ignore_patterns=SKIPPED))
    except Exception as exc:  # noqa: BLE001
        raise _explain(exc, repo_id, commit) from None
    if not (path / "config.json").is_file():
        raise UserError(f"{_where(repo_id, commit)}: the snapshot has no config.json; is it a transformers model?")
    present = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink())
    return path, list(filter_repo_objects(present, allow_patterns=allow, ignore_patterns=SKIPPED))


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link a cached file into storage on the same filesystem (no second 16 GB), else copy it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    real = source.resolve()  # HF cache snapshots are symlinks into blobs/
    try:
        os.link(real, target)
    except OSError:
        shutil.copyfile(real, target)


def publish_snapshot(repo_id: str, revision: Optional[str], storage_uri: str, dtype: str) -> ModelRef:
    """Resolve, download (once) and publish the snapshot to the pipeline storage; returns the ModelRef every stage
    reads. A snapshot already published for this commit is reused without touching the hub's files."""
    commit = resolve_commit(repo_id, revision)
    uri = snapshot_uri(storage_uri, repo_id, commit)
    ref = ModelRef(path=storage.join(uri, "model"), key=model_key(repo_id, commit, dtype), revision=commit)
    if storage.read_manifest(uri) is not None:
        return ref
    source, files = _download(repo_id, commit)
    manifest = Manifest(
        stage="teacher",
        kind="hub",
        key=ref.key,
        model_uri="model",
        details={"repo_id": repo_id, "revision": revision, "commit": commit},
    )
    if storage.is_remote(uri):
        work = storage.mirror_root() / "work" / uuid.uuid4().hex
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        work = Path(uri).parent / f".tmp-{Path(uri).name}-{uuid.uuid4().hex[:8]}"
    try:
        for name in files:
            _link_or_copy(source / name, work / "model" / name)
        manifest.write(work)
        storage.publish_dir(work, uri)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ref
