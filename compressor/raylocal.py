"""Connect to a Ray cluster, or start a private local one that listens on 127.0.0.1 only."""

from __future__ import annotations

import os
from typing import Optional

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
    from compressor.raywatch import start_local_head, watch_local_head

    watch_local_head()  # issue 14: the head's processes die with this one, even on SIGKILL (compressor.raywatch)
    start_local_head(**LOCAL_HEAD_ARGS, **options)  # issue 14: ray.init, again if its raylet was slow to register
