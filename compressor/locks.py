"""One writer per directory: the lease a pipeline run holds on each stage it computes (and on token shards while it
writes them, compressor.shards.prepare).

Two runs of one pipeline (two terminals, a job submitted twice, on one machine or on several) would otherwise write
the same stage: its pending/ copy, its Ray Train run (the checkpoints a re-run resumes from) and its final directory.
A run takes the stage's lease before it computes the stage and keeps it until the stage is published or rejected.
A second run that needs the stage waits, with a line naming the holder (pid, host, since when, its command), and
then finds the stage published and takes it from the cache. COMPRESSOR_LOCK_WAIT_S bounds the wait (0: refuse at
once); past it the run stops with exit 75 (EX_TEMPFAIL) and the same description.

Local and NFS storage: an flock on `<pipeline>/.locks/<stage dir>.lock`, with the holder's description beside it.
The kernel (on NFS the server's lock manager) drops the lock when the holder dies, whatever killed it.

Object storage (s3://, any fsspec URL): a lease object `<pipeline>/.locks/<stage dir>.json` with the holder's
description and a heartbeat counter, rewritten every STALE_S / 4 seconds by a thread of the holder. On s3:// every
write is conditional: created with If-None-Match: * (exactly one of several creators succeeds), renewed and taken
over with If-Match: <ETag> (a compare-and-swap: exactly one of several takers succeeds, and a holder whose lease was
taken over learns it at its next heartbeat). A lease is stale when its holder is a dead process on this host, or
when its heartbeat has not changed for STALE_S seconds as this waiter measured it (no clocks are compared), so a
killed run's lease blocks others for at most STALE_S. Other fsspec stores have no conditional writes through fsspec:
there the lease is written, left to settle and read back, which leaves a window of about a second in which two
runs starting together could both take it (documented in docs/reliability.md)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from compressor import storage
from compressor.errors import CompressorError
from compressor.processes import same_process, started

WAIT_ENV = "COMPRESSOR_LOCK_WAIT_S"  # seconds to wait for a stage another run holds; unset: as long as it takes
STALE_ENV = "COMPRESSOR_LEASE_STALE_S"  # object-store leases: heartbeat silence after which a lease is taken over
STALE_S = 300.0
REMINDER_S = 600.0  # a waiting run repeats its line this often
SETTLE_S = 1.0  # stores without conditional writes: time between writing a lease and reading it back


class StageBusy(CompressorError):
    """Another run holds the stage and COMPRESSOR_LOCK_WAIT_S ran out. Exit 75 (EX_TEMPFAIL): try again later."""

    exit_code = 75


@dataclass
class Owner:
    """Who holds a lease: enough for a person to find the run, and for a waiter on the same host to see it died."""

    pid: int
    host: str
    since: float  # when the lease was taken (epoch seconds)
    command: str
    created: float = 0.0  # the process's start (compressor.processes.started): a reused pid is not the holder
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    beat: int = 0

    @classmethod
    def me(cls) -> Owner:
        from compressor.interrupt import invoked_command

        return cls(os.getpid(), socket.gethostname(), time.time(), invoked_command(), started(os.getpid()))

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on host {self.host}, since {since} (`{self.command}`)"

    def dead_here(self) -> bool:
        """True when the holder ran on this host and its process is gone (or the pid now belongs to another)."""
        return self.host == socket.gethostname() and not same_process(self.pid, self.created)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Optional[Owner]:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):  # torn or foreign: not a lease this code wrote
            return None


UNKNOWN = Owner(0, "?", 0.0, "?")


def lock_uri(stage_uri: str) -> str:
    """`<pipeline>/.locks/<stage dir>`: beside the stage directories, never inside one (a stage dir is replaced whole)."""
    parent, name = stage_uri.rstrip("/").rsplit("/", 1)
    return storage.join(parent, ".locks", name)


class LocalLease:
    """flock(2) on a file: released by the kernel when the holder exits or is killed."""

    def __init__(self, stage_uri: str):
        base = Path(lock_uri(stage_uri))
        self.path, self.owner_path = base.with_name(base.name + ".lock"), base.with_name(base.name + ".owner.json")
        self.fd: Optional[int] = None

    def try_acquire(self) -> Optional[Owner]:
        """None when this process now holds the lease, else the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                return Owner.from_json(self.owner_path.read_text()) or UNKNOWN
            except FileNotFoundError:  # between the holder's flock and its description
                return UNKNOWN
        self.fd = fd
        storage.write_text(str(self.owner_path), Owner.me().to_json())
        return None

    def release(self) -> None:
        if self.fd is None:
            return
        self.owner_path.unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


class ObjectLease:
    """A lease object on an fsspec store, renewed by a heartbeat thread (see the module docstring)."""

    def __init__(self, stage_uri: str):
        self.uri = lock_uri(stage_uri) + ".json"
        self.fs, self.path = storage.filesystem(self.uri)
        self.conditional = "s3" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.stale_s = float(os.environ.get(STALE_ENV, STALE_S))
        self.owner: Optional[Owner] = None
        self.version: Optional[str] = None  # the ETag (s3) or content of our last write
        self.seen: tuple[Optional[str], float] = (None, 0.0)  # the holder's version, and since when (this clock)
        self.lost = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- one round of acquiring
    def try_acquire(self) -> Optional[Owner]:
        me = Owner.me()
        holder, version = self._read()
        if version is None:
            written = self._create(me)
        elif self._stale(holder, version):
            written = self._replace(me, version)
        else:
            return holder or UNKNOWN
        if written is None:  # another run won the race
            holder, _ = self._read()
            return holder or UNKNOWN
        self.owner, self.version = me, written
        self._thread = threading.Thread(target=self._heartbeat, name="stage-lease", daemon=True)
        self._thread.start()
        return None

    def _stale(self, holder: Optional[Owner], version: str) -> bool:
        if holder is not None and holder.dead_here():
            return True
        now = time.monotonic()
        if self.seen[0] != version:
            self.seen = (version, now)
        return now - self.seen[1] >= self.stale_s

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_s / 4):
            self.owner.beat += 1
            written = self._replace(self.owner, self.version)
            if written is None:
                self.lost = True
                sys.stderr.write(
                    f"warning: the lease {self.uri} was taken over by another run (this one was "
                    f"silent for over {self.stale_s:.0f} s); two runs may now write this stage\n"
                )
                return
            self.version = written

    def release(self) -> None:
        if self.owner is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost:
            self._delete(self.version)
        self.owner = None

    # -- the store
    def _read(self) -> tuple[Optional[Owner], Optional[str]]:
        """(holder, version), or (None, None) when there is no lease object."""
        try:
            if self.conditional:
                text, etag = _s3_get(self.fs, self.path)
                return Owner.from_json(text), etag
            text = self.fs.cat_file(self.path)
            return Owner.from_json(text), text.decode(errors="replace")
        except FileNotFoundError:
            return None, None

    def _create(self, me: Owner) -> Optional[str]:
        if self.conditional:
            return self._s3_put(me, IfNoneMatch="*")
        if self.fs.exists(self.path):
            return None
        return self._write_and_check(me)

    def _replace(self, me: Owner, version: str) -> Optional[str]:
        if self.conditional:
            return self._s3_put(me, IfMatch=version)
        _, current = self._read()
        return self._write_and_check(me) if current == version else None

    def _delete(self, version: str) -> None:
        if self.conditional:
            bucket, key, _ = self.fs.split_path(self.path)
            with contextlib.suppress(OSError):  # taken over meanwhile, or gone
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
            self.fs.invalidate_cache(self.path)
            return
        _, current = self._read()
        if current == version:
            self.fs.rm_file(self.path)

    def _s3_put(self, me: Owner, **condition) -> Optional[str]:
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            response = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=me.to_json().encode(), **condition)
        except (FileExistsError, FileNotFoundError, PermissionError):  # If-None-Match failed / the object is gone
            return None
        except OSError as exc:  # 412 PreconditionFailed (If-Match), 409 ConditionalRequestConflict
            if "Precondition" in str(exc) or "Conflict" in str(exc) or getattr(exc, "errno", None) == 22:
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return response["ETag"]

    def _write_and_check(self, me: Owner) -> Optional[str]:
        text = me.to_json()
        self.fs.pipe_file(self.path, text.encode())
        time.sleep(SETTLE_S)  # a concurrent writer's object lands meanwhile; the last write is what everyone reads
        _, current = self._read()
        return current if current == text else None


def _s3_get(fs, path: str) -> tuple[bytes, str]:
    """Body and ETag of one object in one GET (two requests could pair one version's body with another's ETag)."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get():
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with response["Body"] as body:
            return await body.read(), response["ETag"]

    return sync(fs.loop, get)


def lease_for(stage_uri: str) -> LocalLease | ObjectLease:
    return ObjectLease(stage_uri) if storage.is_remote(stage_uri) else LocalLease(stage_uri)


@contextlib.contextmanager
def holding(
    stage_uri: str, label: str, say=None, wait_s: Optional[float] = None, poll_s: float = 2.0
) -> Iterator[bool]:
    """Hold the lease of the stage at `stage_uri` inside the block; yields whether another run held it first (the
    caller then looks for what that run published). `say(line)` tells the user who is waited for."""
    lease = lease_for(stage_uri)
    if wait_s is None and os.environ.get(WAIT_ENV):
        wait_s = float(os.environ[WAIT_ENV])
    start, told, waited = time.monotonic(), 0.0, False
    while (holder := lease.try_acquire()) is not None:
        elapsed = time.monotonic() - start
        if wait_s is not None and elapsed >= wait_s:
            raise StageBusy(
                f"{label} ({stage_uri}) is being written by another run: {holder.describe()}. "
                f"Wait for it to finish and run again (its finished stages are then reused), stop it, or "
                f"unset {WAIT_ENV} to wait for it"
            )
        if not waited or elapsed - told >= REMINDER_S:
            (say or _stderr)(
                f"{label}: waiting for another run, which is writing it: {holder.describe()}; "
                "what it finishes will be reused (Ctrl-C stops waiting)"
            )
            told = elapsed
        waited = True
        time.sleep(poll_s)
    try:
        yield waited
    finally:
        lease.release()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
