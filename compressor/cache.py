"""Content-addressed stage cache and atomic publishing.

A stage's key hashes (kind, spec, input model key, extra inputs, compressor version). Its output lives at
<storage>/<pipeline>/<stage>-<key12>/ and counts as done only when manifest.json is there. Work happens in
a hidden temp dir beside it, renamed into place when the stage succeeded; a failure deletes it."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from pydantic import BaseModel

from compressor import __version__
from compressor.manifest import MANIFEST, Manifest


def canonical(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(canonical(p) for p in parts).encode()).hexdigest()


def stage_key(kind: str, spec: BaseModel | dict, input_key: str, extra: Optional[dict] = None) -> str:
    """Same spec + same input + same compressor version -> same key. Anything else -> new key."""
    return digest({"kind": kind, "spec": spec, "input": input_key, "extra": extra or {}, "version": __version__})


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def stage_dir(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key[:12]}"

    def lookup(self, name: str, key: str) -> Optional[Manifest]:
        directory = self.stage_dir(name, key)
        if not (directory / MANIFEST).is_file():
            return None
        manifest = Manifest.read(directory)
        return manifest if manifest.key == key else None

    @contextmanager
    def staging(self, name: str, key: str) -> Iterator[Path]:
        """Yield a private work dir. On success the caller writes the manifest there, then we rename it
        into place; on any exception it is removed and nothing is published."""
        self.root.mkdir(parents=True, exist_ok=True)
        work = self.root / f".tmp-{name}-{key[:12]}-{uuid.uuid4().hex[:8]}"
        work.mkdir()
        try:
            yield work
            if not (work / MANIFEST).is_file():
                raise RuntimeError(f"stage {name} finished without writing {MANIFEST}")
            publish(work, self.stage_dir(name, key))
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise


def publish(work: Path, final: Path) -> None:
    """Rename `work` to `final`. A leftover `final` without a manifest is an old failure: replace it."""
    if final.exists():
        if (final / MANIFEST).is_file():
            shutil.rmtree(work, ignore_errors=True)  # someone published the same key first; theirs stands
            return
        shutil.rmtree(final)
    work.rename(final)
