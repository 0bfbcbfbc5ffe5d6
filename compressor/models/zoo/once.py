"""A zoo entry is built under a file lock, into a private temp dir, renamed into place when complete.

A final directory therefore exists only when it is whole; a crash leaves a `.tmp-*` dir that the next builder of the
same key (holding the lock) removes."""

from __future__ import annotations

import fcntl
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _locked(final: Path) -> Iterator[None]:
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process builds the same entry
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_once(final: Path, fill: Callable[[Path], None]) -> Path:
    """Run `fill(tmp_dir)` unless `final` exists, then publish tmp_dir as `final` atomically."""
    if final.is_dir():
        return final
    with _locked(final):
        if final.is_dir():  # built by another process while we waited for the lock
            return final
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        work.mkdir()
        try:
            fill(work)
            work.rename(final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return final
