"""Ray's lifetime in this process: connect to a Ray cluster, or start a private local one that listens on
127.0.0.1 only (`ensure_ray`); a local head then dies with the `compressor` process that started it, even when
that process is SIGKILLed.

Measured with Ray 2.60 on the development machine: after a SIGKILL of the driver, Ray's own fate sharing
(PR_SET_PDEATHSIG) ends gcs_server, raylet, the dashboard and the workers within about 3 s, but the raylet's
DashboardAgent and RuntimeEnvAgent stay about 60 s: they first try to report the raylet's death to the GCS, which is
gone, and wait for that call to time out. A GPU worker stuck in a CUDA call may hold its memory longer still.

So before a local head starts (`watch_local_head`, called by `ensure_ray`):
- this process's environment gets COMPRESSOR_RAY_OWNER=<pid>:<start time>, which every process of the head
  inherits (GCS, raylet, dashboard, agents, workers);
- a watchdog process (`python -m compressor.ray_runtime OWNER`, its own session so a kill of the driver's process
  group spares it) polls the driver twice a second and, once it is gone, SIGKILLs every Ray process carrying its
  mark, then exits;
- leftovers whose owner is dead (a watchdog killed too, e.g. by the OOM killer) are swept first.

Only processes that are Ray's (gcs_server, raylet, `ray::...` workers and agents, Ray's dashboard and monitors) and
carry the mark of a dead owner are touched: never another user's Ray, another run's head, or a cluster's.

`start_local_head` also starts the head again when Ray's fixed 30 s wait for its raylet ran out (several heads
starting at once on a busy machine)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Optional

from compressor.processes import same_process, started

# Set before a local head starts: without them Ray advertises the machine's public interface and turns on
# token authentication, which local job submission and tests do not want.
LOCAL_HEAD_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
LOOPBACK = "127.0.0.1"
# ray.init arguments of a local head: every server it starts (GCS, raylet, workers, dashboard and its agents)
# listens on the loopback interface only, so nothing on the network can submit work to it.
LOCAL_HEAD_ARGS = {"address": "local", "_node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK}
# `compressor run -v` sets it: Ray workers' output is then forwarded to this console as it comes, instead of staying
# in the per-stage log files (and Ray's session logs).
VERBOSE_ENV = "COMPRESSOR_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_driver_logs() -> None:
    """Ray's and MLflow's INFO lines (cluster start, DB migrations, Ray Train's worker group) stay off the console
    unless verbose; warnings and errors still show."""
    import logging

    if verbose():
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    for name in ("ray", "ray.train", "ray.tune", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def ensure_ray(address: Optional[str] = None) -> None:
    """No-op when Ray is initialised. Otherwise connect to `address` (or $RAY_ADDRESS), or start a local head.

    A local head is always a new one (`address="local"`): it never joins another user's cluster on this machine.
    Settings the workers need to load models alike (compressor.remote_code) go to a cluster in the job's
    runtime_env; a local head's workers inherit them from this process."""
    import ray

    from compressor import remote_code

    if ray.is_initialized():
        return
    quiet_driver_logs()
    # Without -v, workers' stdout/stderr (tqdm updates, library warnings) is not streamed line by line to this
    # console: each stage captures it into its own log file (compressor.runner), the rest stays in Ray's logs.
    options = {"log_to_driver": verbose(), "logging_level": "INFO" if verbose() else "WARNING"}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        env = remote_code.forwarded_env()
        ray.init(address=address, **options, **({"runtime_env": {"env_vars": env}} if env else {}))
        return
    os.environ.update(LOCAL_HEAD_ENV)
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is first imported, to decide whether "127.0.0.1"
    # means loopback or "this machine's public address"; ray may have been imported before this call.
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    watch_local_head()  # issue 14: the head's processes die with this one, even on SIGKILL (see below)
    start_local_head(**LOCAL_HEAD_ARGS, **options)  # issue 14: ray.init, again if its raylet was slow to register


# ------------------------------------------------------------------------------ the local head dies with its driver
OWNER_ENV = "COMPRESSOR_RAY_OWNER"
POLL_S = 0.5
TREE_S = 2.0  # how often the watchdog notes the driver's process tree
_RAY_FILES = re.compile(r"/ray/(_private|dashboard|autoscaler|core)/")
_watching: set[str] = set()


def identity(pid: int) -> str:
    return f"{pid}:{started(pid):.2f}"


def alive(owner: str) -> bool:
    pid, start = owner.split(":")
    return same_process(int(pid), float(start))


def is_ray(cmdline: list[str]) -> bool:
    first = cmdline[0] if cmdline else ""
    return (
        first.startswith(("ray::", "ray-dashboard"))
        or os.path.basename(first) in ("gcs_server", "raylet")
        or any(_RAY_FILES.search(arg) for arg in cmdline[:3])
        or ("multiprocessing" in " ".join(cmdline[:3]) and "'ray.dashboard" in " ".join(cmdline))
    )


def mark_of(pid: int) -> str:
    """The process's COMPRESSOR_RAY_OWNER, read from /proc/PID/environ itself: Ray's workers and agents rename
    themselves (setproctitle), which zeroes the start of that block, and psutil's parser then returns nothing."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            block = f.read()
    except OSError:
        return ""
    match = re.search(rb"(?:^|\0)" + OWNER_ENV.encode() + rb"=([^\0]*)", block)
    return match.group(1).decode(errors="replace") if match else ""


def marked(owner_alive=alive) -> list:
    """Ray processes of this user whose mark names an owner for which `owner_alive` is False."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid == os.getpid():
            continue
        try:
            owner = mark_of(process.pid)
            if owner and is_ray(process.info["cmdline"] or []) and not owner_alive(owner):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill(processes: list) -> None:
    import psutil

    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def sweep() -> int:
    """SIGKILL the Ray processes left by local heads whose driver is dead; returns how many there were."""
    leftovers = marked()
    kill(leftovers)
    return len(leftovers)


def watch_local_head() -> None:
    """Mark this process's future local Ray head and start its watchdog (once per process)."""
    owner = identity(os.getpid())
    os.environ[OWNER_ENV] = owner
    if owner in _watching:
        return
    _watching.add(owner)
    sweep()
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    subprocess.Popen(
        [sys.executable, "-m", "compressor.ray_runtime", owner],
        env=env,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def start_local_head(attempts: int = 3, **init_args) -> None:
    """ray.init of a local head, started again when its raylet did not register within Ray's fixed 30 s, which
    happens when several heads start at once on a small busy machine (seen with three runs at once on 2 cores under
    load). The processes of the failed attempt are killed first."""
    import psutil
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(**init_args)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            failed = []
            for process in descendants(os.getpid()):
                try:
                    if is_ray(process.cmdline()):
                        failed.append(process)
                except psutil.Error:
                    continue
            kill(failed)
            ray.shutdown()


def descendants(pid: int) -> list:
    import psutil

    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.pid != os.getpid()]  # not this watchdog
    except psutil.NoSuchProcess:
        return []


def main(owner: str) -> None:
    """Wait for the owner's death, then SIGKILL its head: the processes seen below it (kept every TREE_S; a process
    object refuses to signal a pid reused by another process) and every Ray process carrying its mark."""
    tree, seen = [], 0.0
    while alive(owner):
        if time.monotonic() - seen >= TREE_S:
            tree, seen = descendants(int(owner.split(":")[0])) or tree, time.monotonic()
        time.sleep(POLL_S)
    kill(tree)
    for _ in range(3):  # a process being spawned while a pass ran is caught by the next
        kill(marked(lambda mark: mark != owner and alive(mark)))
        time.sleep(POLL_S)


if __name__ == "__main__":
    main(sys.argv[1])
