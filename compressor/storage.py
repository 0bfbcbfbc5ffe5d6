"""Pipeline storage on local disks, NFS, or any fsspec URL (s3://, gs://, ...).

A stage's output directory lives at `<storage>/<pipeline>/<stage>-<key12>/` and counts as done only once its
manifest.json is there. The task that produced it publishes it from the node it ran on (`publish_dir`): on a local
or NFS path by renaming its temp dir into place, on an object store by uploading manifest.json LAST, since object
stores have no atomic rename. A consumer on any node reads it from there (`download_stage` into this node's mirror,
under a lock so several workers of one node download once). Nothing relies on the driver's disk.
s3:// needs `pip install compressor[s3]` (s3fs), gs:// needs `compressor[gcs]` (gcsfs)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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


# Raised on the first request, not when the filesystem is made: botocore's and google-auth's "no credentials".
CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
GOOGLE_CREDENTIAL_ERRORS = {"DefaultCredentialsError", "RefreshError"}


def credentials_error(exc: BaseException, uri: Optional[str] = None) -> Optional[UserError]:
    """A UserError naming what to set when `exc` (or what caused it) says cloud credentials are missing, else None."""
    while exc is not None:
        names = {c.__name__ for c in type(exc).__mro__}
        where = f"storage {uri}" if uri else "storage"
        if names & CREDENTIAL_ERRORS:
            return UserError(
                f"{where}: no AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE (a profile of ~/.aws/credentials), on this machine and every node"
            )
        if names & GOOGLE_CREDENTIAL_ERRORS:
            return UserError(
                f"{where}: no Google Cloud credentials ({exc}); set GOOGLE_APPLICATION_CREDENTIALS to a "
                "service-account key file, or run `gcloud auth application-default login`"
            )
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def credentials(uri: str) -> Iterator[None]:
    """Missing credentials for `uri` inside the block become a UserError (exit 2) instead of a traceback."""
    try:
        yield
    except Exception as exc:
        error = credentials_error(exc, uri)
        if error is None:
            raise
        raise error from None


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


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_manifest(stage_uri: str) -> Optional[Manifest]:
    """The manifest of a published stage directory, or None when it is not (yet) complete."""
    fs, path = filesystem(stage_uri)
    target = f"{path.rstrip('/')}/{MANIFEST}"
    if not fs.exists(target):
        return None
    return Manifest.model_validate_json(fs.cat_file(target))


def finished_manifest(stage_uri: str, key: str) -> Optional[Manifest]:
    """The manifest of a complete stage directory with this key, else None: no manifest, a torn or foreign one,
    another key, or one whose listed files are missing or of another size (a directory emptied by hand, a copy
    that stopped half-way): such a stage is computed again."""
    try:
        manifest = read_manifest(stage_uri)
    except ValueError:  # a truncated manifest.json
        return None
    if manifest is None or manifest.key != key or missing_files(stage_uri, manifest):
        return None
    return manifest


def missing_files(stage_uri: str, manifest: Manifest) -> list[str]:
    """Files of the stage's model that the manifest lists (`files`: path inside model_uri -> bytes) and that are absent
    or of another size. A manifest written before `files` existed is checked for its model's config.json only. One
    listing (one LIST request on object stores); no file is read."""
    dataset = getattr(manifest, "dataset_uri", None)  # a dataset stage's files (generate): listed relative to it
    if dataset:
        fs, root = filesystem(join(stage_uri, dataset))
    elif manifest.model_uri not in ("model", "."):  # a stage that made no model of its own (it names its input)
        return []
    else:
        fs, root = filesystem(join(stage_uri, manifest.model_uri) if manifest.model_uri != "." else stage_uri)
    root = fs._strip_protocol(root).rstrip("/")
    if not manifest.files:
        return [] if fs.exists(f"{root}/config.json") else ["config.json"]
    found = {path[len(root) + 1 :]: info.get("size") for path, info in fs.find(root, detail=True).items()}
    return [rel for rel, size in manifest.files.items() if found.get(rel) != size]


def file_sizes(directory: Path) -> dict[str, int]:
    """Bytes of every file under a local directory, by relative path (what a manifest lists of its model)."""
    return {rel: (Path(directory) / rel).stat().st_size for rel in _relative_files(Path(directory))}


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
    from filelock import FileLock

    local_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(local_dir.parent / f".{local_dir.name}.lock")):  # workers of one node download once
        if (local_dir / MANIFEST).is_file() and Manifest.read(local_dir).key == remote.key:
            return local_dir
        fs, root = filesystem(stage_uri)
        root = fs._strip_protocol(root).rstrip("/")
        work = local_dir.parent / f".tmp-{local_dir.name}-{uuid.uuid4().hex[:8]}"
        try:
            files = sorted(p[len(root) + 1 :] for p in fs.find(root) if p.startswith(root + "/"))
            for rel in [f for f in files if f != MANIFEST] + [MANIFEST]:
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{rel}", str(work / rel))
            if local_dir.exists():
                shutil.rmtree(local_dir)
            work.rename(local_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return local_dir


def scratch_dir(target_uri: str, name: str) -> Path:
    """A private local directory to build `target_uri` in: beside it on local/NFS storage (so publishing is an
    atomic rename on one filesystem), else under this node's mirror root."""
    if is_remote(target_uri):
        path = mirror_root() / "work" / f"{name}-{uuid.uuid4().hex[:8]}"
    else:
        path = Path(target_uri).parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def publish_dir(work: Path, target_uri: str) -> bool:
    """Publish a finished local directory (manifest.json inside) as `target_uri` and remove `work`. Returns False when
    a complete copy was already there (the first publisher of a key wins; ours is dropped)."""
    work = Path(work)
    if not (work / MANIFEST).is_file():
        raise ValueError(f"{work} has no {MANIFEST}: only finished stages are published")
    try:
        if is_remote(target_uri):
            return upload_stage(work, target_uri)
        final = Path(target_uri)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            if (final / MANIFEST).is_file():
                return False
            shutil.rmtree(final)  # a leftover without a manifest is an old failure
        work.rename(final)
        return True
    finally:
        shutil.rmtree(work, ignore_errors=True)


def move_stage(source_uri: str, target_uri: str, manifest: Manifest) -> None:
    """Move a published stage directory (pending/ -> final or rejected/), writing `manifest` last at the target.
    Local: one rename. Object stores: copy every file (server-side), manifest last, then delete the source."""
    if source_uri.rstrip("/") == target_uri.rstrip("/"):  # judged again where it was kept: only the record changes
        write_text(join(target_uri, MANIFEST), manifest.model_dump_json(indent=2))
        return
    if not is_remote(target_uri):
        source, target = Path(source_uri), Path(target_uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        (source / MANIFEST).unlink(missing_ok=True)  # mid-move, neither place claims to be complete
        source.rename(target)
        manifest.write(target)
        return
    fs, src = filesystem(source_uri)
    _, dst = filesystem(target_uri)
    src, dst = fs._strip_protocol(src).rstrip("/"), fs._strip_protocol(dst).rstrip("/")
    if fs.exists(dst):
        fs.rm(dst, recursive=True)
    for path in sorted(fs.find(src)):
        rel = path[len(src) + 1 :]
        if rel != MANIFEST:
            fs.copy(path, f"{dst}/{rel}")
    fs.pipe_file(f"{dst}/{MANIFEST}", manifest.model_dump_json(indent=2).encode())
    fs.rm(src, recursive=True)


def remove(uri: str) -> None:
    """Delete a directory tree (a no-op when it is not there)."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def read_text(uri: str) -> Optional[str]:
    fs, path = filesystem(uri)
    return fs.cat_file(path).decode() if fs.exists(path) else None


def write_text(uri: str, text: str) -> None:
    """Write a small file whole: a temp file renamed into place locally; one PUT on object stores (atomic there)."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        fs.pipe_file(path, text.encode())
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def stage_dir_of(model_uri: str) -> str:
    """The stage directory that holds a model URI `<stage dir>/model`."""
    return model_uri.rstrip("/").rsplit("/", 1)[0]


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
