"""Ray Jobs client: pipelines as Ray jobs on a cluster, for `compressor submit` and `compressor jobs ...`
(compressor/commands/submit.py, which only parses options and prints).

Built on Ray's JobSubmissionClient: the working dir is uploaded, `python -m compressor run PIPELINE [overrides]`
is the entrypoint, and the job's driver joins the cluster through the RAY_ADDRESS Ray sets for it.

The entrypoint never relies on `compressor` being on the head's PATH (a head started as `.venv/bin/ray start`
without the venv activated has none): it runs through the first Python that can import compressor, trying
--python (default: this interpreter, right when the head shares this machine or image), then python3 and python.

Secrets: `--env` values and URI credentials are never printed (compressor.secrets)."""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from compressor.errors import CompressorError, UserError
from compressor.secrets import redact
from compressor.secrets import register as register_secret

ADDRESS_ENV = ["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"]  # the variables `ray job submit` reads too
CONNECT_TIMEOUT_S = 10.0
AGENT_WAIT_S = 60.0  # how long a freshly started head may take to accept jobs
# Never worth uploading: Ray also honours the working dir's .gitignore.
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "artifacts", "mlruns", "__pycache__", "*.pyc", ".pytest_cache"]


class JobFailed(CompressorError):
    """The Ray job ended FAILED or STOPPED. Exits with the remote `compressor run` exit code when known."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- connecting
def check_address(address: Optional[str]) -> str:
    """A usable dashboard URL, or a UserError saying what is wrong with it."""
    if not address:
        raise UserError(
            "--address: give the Ray head's dashboard URL, e.g. --address http://HEAD:8265 "
            "(or set RAY_API_SERVER_ADDRESS)"
        )
    address = address.strip().rstrip("/")
    if not address.startswith(("http://", "https://")):
        raise UserError(
            f"--address {address!r}: expected the dashboard URL http://HOST:8265 (not the GCS "
            f"address HOST:6379 or a ray:// client address)"
        )
    return address


def probe(address: str) -> None:
    """Fail fast (JobSubmissionClient waits for the OS TCP timeout) and say which side is wrong."""
    import requests

    try:
        reply = requests.get(f"{address}/api/version", timeout=CONNECT_TIMEOUT_S)
    except requests.exceptions.Timeout:
        raise UserError(
            f"--address {address}: no answer within {CONNECT_TIMEOUT_S:.0f} s; is the head up and "
            f"its dashboard port reachable from here (firewall, port-forward)?"
        ) from None
    except requests.exceptions.RequestException as exc:
        reason = type(exc).__name__ if not str(exc) else str(exc).split("(Caused by")[-1].strip(" )")
        raise UserError(
            f"--address {address}: cannot reach a Ray dashboard there ({reason}); is the head running "
            f"and is this its dashboard URL (port 8265 by default)?"
        ) from None
    if reply.status_code in (401, 403):
        raise UserError(
            f"--address {address}: the dashboard refused the request (HTTP {reply.status_code}); this "
            f"cluster uses token authentication: set RAY_AUTH_TOKEN"
        )
    try:
        reply.json()["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"--address {address}: HTTP {reply.status_code} from something that is not a Ray "
            f"dashboard; check host and port"
        ) from None


@contextmanager
def explicit_address() -> Iterator[None]:
    """JobSubmissionClient lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its argument; --address wins here."""
    saved = {k: os.environ.pop(k) for k in ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: Optional[str]):
    address = check_address(address)
    probe(address)
    from ray.job_submission import JobSubmissionClient

    with explicit_address():
        try:
            return JobSubmissionClient(address)
        except Exception as exc:  # version mismatch, auth: Ray's own message is the clearest
            raise UserError(f"--address {address}: {exc}") from None


def call(what: str, job_id: str, fn, *args):
    """Run a client call; a missing job or a server error becomes one clear line."""
    try:
        return fn(*args)
    except RuntimeError as exc:
        text = str(exc)
        if "404" in text or "does not exist" in text:
            raise UserError(f"job {job_id!r}: no such job on this cluster (see `compressor jobs list`)") from None
        raise UserError(f"{what} job {job_id!r} failed: {text}") from None


# ----------------------------------------------------------------------------- submitting and watching
def run_command(args: list[str], python: Optional[str] = None) -> str:
    """A POSIX shell command that runs `python -m compressor <args>` with the first of `python` (default: this
    interpreter), python3 and python that can import compressor on the node, or says which were tried (exit 2)."""
    candidates = list(dict.fromkeys([python or sys.executable, "python3", "python"]))
    missing = (
        f"error: no Python on the Ray head can run compressor (tried {', '.join(candidates)}); install "
        f"compressor there or pass `compressor submit --python /path/to/bin/python`. The job's PATH: "
    )
    return (
        f"for py in {' '.join(map(shlex.quote, candidates))}; do "
        f'"$py" -c "import compressor.cli" >/dev/null 2>&1 && exec "$py" {shlex.join(["-m", "compressor", *args])}; '
        f'done; echo {shlex.quote(missing)}"$PATH" >&2; exit 2'
    )


def entrypoint_for(pipeline: Path, working_dir: Path, overrides: list[str], python: Optional[str] = None) -> str:
    """`python -m compressor run <pipeline relative to the working dir> <overrides>` (see run_command)."""
    try:
        relative = pipeline.resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise UserError(
            f"{pipeline}: the pipeline must be inside the uploaded working dir {working_dir} (pass --working-dir)"
        ) from None
    return run_command(["run", relative.as_posix(), *overrides], python)


def runtime_env_for(working_dir: Path, env: list[str], excludes: list[str]) -> dict:
    env_vars = {}
    for n, item in enumerate(env, 1):
        key, sep, value = item.partition("=")
        if not sep or not key:  # the item may be a secret with a typo: never echo it
            raise UserError(f"--env number {n} (starting {item[:3]!r}...): expected KEY=VALUE")
        env_vars[key] = value
        register_secret(value)  # never shown on the console from now on
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": DEFAULT_EXCLUDES + list(excludes)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def storage_warning(storage: str) -> Optional[str]:
    from compressor import storage as storage_mod

    if storage_mod.is_remote(storage) or Path(storage).expanduser().is_absolute():
        return None
    return (
        f"storage {storage!r} is relative: on the cluster it lands inside the job's unpacked working dir on "
        f"the head node and is lost with it; set an absolute shared path (NFS) or s3:// / gs://"
    )


def wait_for(client, job_id: str, follow_logs: bool = True, poll_s: float = 1.0, warn=None) -> str:
    """Stream the job's logs to stdout (optional), then wait for a terminal status and return it. `warn(line)` tells
    of a log stream that ended early (default: stderr)."""
    import asyncio

    from ray.job_submission import JobStatus

    if follow_logs:

        async def stream() -> None:
            async for chunk in client.tail_job_logs(job_id):
                sys.stdout.write(redact(chunk))  # Ray echoes the entrypoint, overrides and all
                sys.stdout.flush()

        try:
            asyncio.run(stream())
        except RuntimeError as exc:  # the socket dropped: keep polling, the job itself may be fine
            (warn or _stderr)(f"warning: log stream ended early ({exc}); waiting for the job")
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        time.sleep(poll_s)


def raise_unless_succeeded(client, job_id: str, address: str) -> None:
    info = client.get_job_info(job_id)
    status = str(info.status.value)
    if status == "SUCCEEDED":
        return
    code = info.driver_exit_code
    # Ray appends the log tail to the message; the logs were streamed already, keep the first sentence.
    detail = (info.message or "").strip().split(", last available logs")[0].split("\n")[0].rstrip(".")
    raise JobFailed(
        f"job {job_id} {status}"
        + (f" (exit code {code})" if code else "")
        + (f": {detail}" if detail else "")
        + f". Full logs: compressor jobs logs {job_id} --address {address}",
        exit_code=code if code and code > 0 else 1,
    )


def submit_job(client, retry_s: float = AGENT_WAIT_S, **kwargs) -> str:
    """client.submit_job, retried while the head's job agent is still starting: for a few seconds after a
    head comes up its dashboard answers but refuses jobs with 'No available agent to submit job'."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
