"""Two runs of the shipped tiny pipeline at test size, differing only in the prune target (192 and 256 MLP neurons),
tracked by a real `mlflow server` on loopback, with the teacher a hub id served by an offline Hugging Face cache (as
a user with the hub runs the flagship recipe). The runs happen once per pytest session (the `tiny_runs` fixture of
conftest.py) and are shared: the end-to-end and console tests read the first run, tracking and report start their
own server on the same store, and the AWQ / GGUF chains take prune and distill from its caches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "tiny.yaml"
PRUNE_TARGETS = (192, 256)  # MLP neurons kept (the teacher has 384)
REGISTERED_NAME = "tiny-final"


@dataclass
class PipelineRun:
    intermediate_size: int
    summary: dict  # --summary-json of `compressor run`
    stdout: str
    stderr: str
    run_id: str  # the MLflow parent run


@dataclass
class Store:
    """A sqlite backend plus the artifact directory an `mlflow server` serves."""

    db: Path
    artifacts: Path


class MlflowServer:
    def __init__(self, store: Store, log: Path):
        self.store, self.log = store, log
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def __enter__(self) -> MlflowServer:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # 2 processes instead of ~9
        env.pop("MLFLOW_TRACKING_URI", None)
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.store.db}",
                "--artifacts-destination",
                str(self.store.artifacts),
                "--workers",
                "1",
            ],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.time() + 180  # the first start migrates the sqlite schema
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"mlflow server not healthy after 180 s: {self.log.read_text()[-3000:]}")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 15)  # its own session: the server and its worker, nothing else
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compressor(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m compressor ARGS` offline, without a TTY, on a wide console (tables on one line); `env` adds to
    this process's environment."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "GPTQMODEL_DISABLE_PACK_EXT": "1",
        "COLUMNS": "250",
        **(env or {}),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "compressor", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


@dataclass
class TinyRuns:
    base: Path  # storage is base / "artifacts"
    store: Store
    runs: list[PipelineRun]
    overrides: list[str]  # the KEY=VALUE overrides of both runs, except the prune target
    env: dict  # the environment that resolves the hub teacher

    @property
    def storage(self) -> Path:
        return self.base / "artifacts"


def run_twice(base: Path, overrides: list[str], env: dict) -> TinyRuns:
    """The shared store and the two pipeline runs (tiny_runs in conftest.py calls this once per session)."""
    base.mkdir(parents=True, exist_ok=True)
    store = Store(base / "mlflow.db", base / "mlartifacts")
    runs = []
    with MlflowServer(store, base / "server.log") as server:
        for size in PRUNE_TARGETS:
            summary_path = base / f"summary-{size}.json"
            result = compressor(
                "run",
                str(PIPELINE),
                f"storage={base / 'artifacts'}",
                *overrides,
                f"stages.prune.target.intermediate_size={size}",
                "--tracking-uri",
                server.uri,
                "--register",
                REGISTERED_NAME,
                "--summary-json",
                str(summary_path),
                timeout=1800,
                env=env,
            )
            assert result.returncode == 0, f"pipeline (intermediate_size={size}) failed:\n{result.stderr[-6000:]}"
            summary = json.loads(summary_path.read_text())
            run_id = next(line.split()[3] for line in result.stdout.splitlines() if line.startswith("report: "))
            runs.append(PipelineRun(size, summary, result.stdout, result.stderr, run_id))
    return TinyRuns(base, store, runs, list(overrides), dict(env))
