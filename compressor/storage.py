"""Pipeline storage on local disks, NFS, or any fsspec URL (s3://, gs://, ...).

A stage always works in a local directory. With remote storage, a finished stage directory is uploaded
to `<storage>/<pipeline>/<stage>-<key12>/` with manifest.json LAST - object stores have no atomic rename,
so, as on disk, a stage directory counts as done only once its manifest is there. The next stage (possibly
on another node) downloads it into a local mirror first. Ray Train gets the same storage through
`train_storage`. s3:// needs `pip install compressor[s3]` (s3fs), gs:// needs `compressor[gcs]` (gcsfs)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import fsspec

from compressor.errors import UserError
from compressor.manifest import MANIFEST, Manifest

LOCAL_PROTOCOLS = ("file", "local")
NATIVE_ARROW_PROTOCOLS = ("s3", "gs", "gcs")  # pyarrow (hence Ray Train) has its own clients for these


def is_remote(uri: str | os.PathLike) -> bool:
    """True for fsspec URLs other than file:// (NFS mounts are local paths)."""
    return fsspec.utils.get_protocol(str(uri)) not in LOCAL_PROTOCOLS


def join(base: str, *parts: str) -> str:
    """Join path segments onto a local path or URL."""
    if not is_remote(base):
        return str(Path(base, *parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it). A missing driver (s3fs, gcsfs) becomes a clear UserError."""
    try:
        return fsspec.core.url_to_fs(str(uri))
    except (ImportError, ValueError) as exc:
        protocol = fsspec.utils.get_protocol(str(uri))
        extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
        hint = f"; install it with `pip install 'compressor[{extra}]'`" if extra else ""
        raise UserError(f"storage {uri}: no filesystem for {protocol}:// ({exc}){hint}") from None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def mirror_root() -> Path:
    """Where remote stage directories are cached on this node (COMPRESSOR_CACHE, else ~/.cache/compressor)."""
    return Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor")) / "remote"


def local_mirror(uri: str, root: Optional[Path] = None) -> Path:
    """The local directory that stands for `uri`: the path itself when local, else a cache path that
    keeps protocol, bucket and key, e.g. s3://b/p/prune-ab12 -> ~/.cache/compressor/remote/s3/b/p/prune-ab12."""
    if not is_remote(uri):
        return Path(fsspec.core.url_to_fs(str(uri))[1])
    protocol, path = fsspec.core.split_protocol(str(uri))  # textual: no filesystem driver needed
    return Path(root or mirror_root(), protocol, *[p for p in path.split("/") if p not in ("", ".", "..")])


def read_manifest(stage_uri: str) -> Optional[Manifest]:
    """The manifest of a published stage directory, or None when it is not (yet) complete."""
    fs, path = filesystem(stage_uri)
    target = f"{path.rstrip('/')}/{MANIFEST}"
    if not fs.exists(target):
        return None
    return Manifest.model_validate_json(fs.cat_file(target))


def _relative_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def upload_stage(local_dir: Path, stage_uri: str) -> bool:
    """Copy a finished local stage directory to `stage_uri`, manifest.json last. Returns False (and
    uploads nothing) when a complete copy is already there: the first publisher of a key wins."""
    local_dir = Path(local_dir)
    if not (local_dir / MANIFEST).is_file():
        raise ValueError(f"{local_dir} has no {MANIFEST}: only finished stages are uploaded")
    if read_manifest(stage_uri) is not None:
        return False
    fs, root = filesystem(stage_uri)
    files = [f for f in _relative_files(local_dir) if f != MANIFEST] + [MANIFEST]
    for rel in files:
        target = f"{root.rstrip('/')}/{rel}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(local_dir / rel), target)
    return True


def download_stage(stage_uri: str, local_dir: Optional[Path] = None) -> Path:
    """Bring a published remote stage directory to local disk (default: its `local_mirror`) and return it.
    Reuses an existing local copy with the same manifest key; writes into a temp dir renamed into place,
    manifest last, so an interrupted download is never taken for a finished one."""
    remote = read_manifest(stage_uri)
    if remote is None:
        raise UserError(f"{stage_uri}: no {MANIFEST} there; the stage has not been published")
    local_dir = Path(local_dir) if local_dir else local_mirror(stage_uri)
    if (local_dir / MANIFEST).is_file() and Manifest.read(local_dir).key == remote.key:
        return local_dir
    fs, root = filesystem(stage_uri)
    root = fs._strip_protocol(root).rstrip("/")
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    work = local_dir.parent / f".tmp-{local_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        files = sorted(p[len(root) + 1:] for p in fs.find(root) if p.startswith(root + "/"))
        for rel in [f for f in files if f != MANIFEST] + [MANIFEST]:
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{rel}", str(work / rel))
        if local_dir.exists():
            shutil.rmtree(local_dir)
        work.rename(local_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return local_dir


def train_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig. Local/NFS paths go as absolute
    paths; s3:// and gs:// use pyarrow's native clients (storage_filesystem None); any other fsspec
    protocol is wrapped for pyarrow, with the protocol stripped from the path as Ray expects."""
    if not is_remote(uri):
        return str(local_mirror(uri).resolve()), None
    if fsspec.utils.get_protocol(uri) in NATIVE_ARROW_PROTOCOLS:
        return str(uri), None
    import pyarrow.fs

    fs, path = filesystem(uri)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
