"""Ctrl-C and SIGTERM in `compressor run`: stop without losing work, and say how to go on.

`run` treats SIGTERM (what `kill`, Kubernetes and Slurm send) like Ctrl-C (SIGINT). While a stage that can stop
cleanly is running (distill's training: `graceful_stop`), the first signal asks it to: the Ray Train workers finish
their current step, save and report a checkpoint and return, and the run exits 130 with a paragraph that gives the
command resuming from that step. Any other time, or at a second signal, the run stops at once (exit 130, same
paragraph): finished stages are kept, a model waiting for its evaluation stays in pending/ and is judged by the next
run, and a distillation resumes from its last checkpoint.

The signal handler only sets a flag and writes one line: the stage's own thread forwards the request to the workers
(see compressor/stages/distill/driver.py), so no Ray call runs inside a signal handler."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Optional

from compressor.errors import CompressorError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(CompressorError):
    """The run stopped on Ctrl-C or SIGTERM. Exit 130 (128 + SIGINT, what shells report for Ctrl-C)."""

    exit_code = 130


class StopRequest(threading.Event):
    """Set by the first signal while a stage can stop cleanly; `signal_name` says which signal it was."""

    def __init__(self, what: str):
        super().__init__()
        self.what, self.signal_name = what, ""


_active: Optional[StopRequest] = None  # the clean stop a running stage offers, if any
_received: list[str] = []  # names of the signals received by `handled`
_installed = False  # inside `handled`


def invoked_command() -> str:
    """The command line of this process as the user would type it again."""
    argv0 = sys.argv[0] if sys.argv else ""
    ours = os.path.basename(argv0) == "compressor" or argv0.endswith(os.path.join("compressor", "__main__.py"))
    program = "compressor" if ours else shlex.join(sys.argv[:1])
    return " ".join([program, shlex.join(sys.argv[1:])]).strip()


def resume_hint() -> str:
    return (
        f"Run the same command again to resume: `{invoked_command()}` (finished stages are reused, a model "
        "waiting for its evaluation is judged again, a distillation continues from its last checkpoint)"
    )


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    _received.append(name)
    request = _active
    if request is not None and not request.is_set():
        request.signal_name = name
        request.set()
        os.write(
            2,
            f"\n{name}: {request.what} stops after its current step and saves a checkpoint there; "
            "press Ctrl-C again to stop at once\n".encode(),
        )
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Install the handlers above for the block (in the main thread); a stop at once becomes `Interrupted`."""
    global _installed
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _received.clear()
    _installed = True
    reassert()
    try:
        yield
    except KeyboardInterrupt:
        # A stage thread still running (distill's fit) must not start a new local Ray through Ray's auto-init
        # (a ray.get after the exit's ray.shutdown) while this process exits.
        auto_init = sys.modules.get("ray._private.auto_init_hook")
        if auto_init is not None:
            auto_init.enable_auto_connect = False
        name = _received[-1] if _received else "SIGINT"
        raise Interrupted(
            f"interrupted by {name}: stopped at once; work since the last checkpoint of a running "
            f"distillation is lost. {resume_hint()}"
        ) from None
    finally:
        _installed = False
        for s, handler in previous.items():
            signal.signal(s, handler)


def reassert() -> None:
    """Put `handled`'s handlers back, if it is active: ray.init replaces SIGTERM's handler with its own (sys.exit)."""
    if _installed:
        for s in SIGNALS:
            signal.signal(s, _on_signal)


@contextlib.contextmanager
def graceful_stop(what: str) -> Iterator[StopRequest]:
    """While inside, the first Ctrl-C / SIGTERM of `compressor run` sets the yielded request instead of stopping the
    run; the stage polls it, stops cleanly and raises `Interrupted` (see `stopped`). Outside `run` (the standalone
    stage commands) nothing changes: Ctrl-C stops at once."""
    global _active
    request = StopRequest(what)
    _active = request
    try:
        yield request
    finally:
        _active = None


def stopped(request: StopRequest, detail: str) -> Interrupted:
    """The error a stage raises once it stopped cleanly on `request`."""
    return Interrupted(f"{request.what} stopped on {request.signal_name or 'request'}: {detail}. {resume_hint()}")


class StopFlag:
    """A Ray actor (num_cpus=0, made by the driver) that the workers' rank 0 asks once per step whether to stop."""

    def __init__(self):
        self.value = False

    def set(self) -> None:
        self.value = True

    def is_set(self) -> bool:
        return self.value
