"""Whether a checkpoint's own Python code (config.json `auto_map`) may run when it is loaded. Off by default.

A pipeline turns it on with `teacher.trust_remote_code: true`; the standalone commands with --trust-remote-code.
The setting travels as the environment variable COMPRESSOR_TRUST_REMOTE_CODE, so that every process that loads a
model sees it: Ray tasks and Ray Train workers inherit it from a local head, `ensure_ray` passes it to a cluster's
workers in the job's runtime_env, and `compressor submit` puts it into the submitted job's. Every
`from_pretrained` / `GPTQModel.load` in compressor passes `trust_remote_code=enabled()` explicitly (an explicit
False also keeps transformers from prompting on a terminal). Torch-free."""

from __future__ import annotations

import logging
import os

from compressor.errors import UserError

ENV = "COMPRESSOR_TRUST_REMOTE_CODE"
log = logging.getLogger("compressor")


def enabled() -> bool:
    return os.environ.get(ENV, "") == "1"


def allow(what: str, warn: bool = True) -> None:
    """Turn it on for this process and the processes it starts, with a warning naming what is trusted (a pipeline's
    loader has warned already)."""
    if warn and not enabled():
        log.warning(
            "warning: trust_remote_code is on: Python code shipped with %s will run wherever it is loaded", what
        )
    os.environ[ENV] = "1"


def forwarded_env() -> dict[str, str]:
    """The part of this process's environment that Ray workers on other nodes need to load models alike."""
    return {ENV: "1"} if enabled() else {}


def check_config(config: dict, where: str) -> None:
    """A checkpoint that needs its own code is refused up front (exit 2) unless remote code is allowed."""
    auto_map = config.get("auto_map")
    if auto_map and not enabled():
        raise UserError(
            f"{where}: config.json has `auto_map` ({', '.join(sorted(auto_map))}): loading this model "
            "runs Python code shipped with it. compressor does not run it unless told to: set "
            "`teacher.trust_remote_code: true` in the pipeline (--trust-remote-code for a standalone "
            "command) if you trust its source"
        )
