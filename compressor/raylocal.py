"""Connect to a Ray cluster, or start a private local one that listens on 127.0.0.1 only."""

from __future__ import annotations

import os
from typing import Optional

# Set before a local head starts: without them Ray advertises the machine's public interface and turns on
# token authentication, which local job submission and tests do not want.
LOCAL_HEAD_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def ensure_ray(address: Optional[str] = None) -> None:
    """No-op when Ray is initialised. Otherwise connect to `address` (or $RAY_ADDRESS), or start a local head.

    A local head is always a new one (`address="local"`): it never joins another user's cluster on this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    os.environ.update(LOCAL_HEAD_ENV)
    ray.init(address="local")
