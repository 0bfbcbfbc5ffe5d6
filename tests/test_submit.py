"""`compressor submit` / `compressor jobs` against a real Ray head started on 127.0.0.1 by this module.

The head runs in its own session with its own --temp-dir; teardown ends exactly the processes of that
head (by pid) and checks that none is left. `ray stop` is never used: it would end every Ray on the machine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from compressor import jobs as ray_jobs
from compressor.errors import UserError

BIN = Path(sys.executable).parent
FAILING_PIPELINE = "name: will-fail\nteacher: {model: /nonexistent/teacher}\nstages: [{evaluate: {}}]\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ray_jobs.ADDRESS_ENV}
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        **extra,
    )
    return env


@pytest.fixture(scope="module")
def head(hub_cache):
    """A Ray head on 127.0.0.1 with a dashboard; yields its URL. Its processes (and so its jobs) resolve the hub
    teacher of the session's shared runs (tests/pipeline_runs.py) from the offline Hugging Face cache."""
    temp_dir = tempfile.mkdtemp(prefix="cr-", dir="/tmp")  # short: Ray's unix socket paths live under it
    port, dashboard, agent = free_port(), free_port(), free_port()
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-agent-listen-port={agent}",  # default 52365 may be taken
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env={**clean_env(), **hub_cache["env"]},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 90
        while not _dashboard_up(url):
            assert proc.poll() is None, (Path(temp_dir) / "ray-start.log").read_text()
            assert time.time() < deadline, "Ray head did not come up within 90 s"
            time.sleep(0.5)
        yield url
    finally:
        _stop_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _dashboard_up(url: str) -> bool:
    try:
        return requests.get(f"{url}/api/version", timeout=2).ok
    except requests.RequestException:
        return False


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM to `ray start --block` ends the node's processes. Whatever of its tree, or of any process
    naming its private temp dir, is still alive after that is killed by pid."""

    def ours() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != proc.pid and temp_dir in " ".join(p.info["cmdline"] or []):
                    found.append(p)
            except psutil.Error:
                continue
        return found

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    tree += [p for p in ours() if p not in tree]
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=5)
    alive += [p for p in ours() if p not in alive]
    for leftover in alive:
        leftover.kill()
    _, alive = psutil.wait_procs(alive, timeout=10)
    assert not alive, f"Ray processes left behind: {[p.pid for p in alive]}"


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "compressor"), *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def client(url: str):
    return ray_jobs.connect(url)


# ----------------------------------------------------------------------------- errors before any job
def test_bad_addresses_fail_fast_with_a_clear_message(tmp_path):
    (tmp_path / "p.yaml").write_text(FAILING_PIPELINE)
    refused = cli("submit", "p.yaml", "--address", "http://127.0.0.1:1", cwd=tmp_path)
    assert refused.returncode == 2
    assert "error: --address http://127.0.0.1:1: cannot reach a Ray dashboard there" in refused.stderr
    assert "Traceback" not in refused.stderr
    not_a_url = cli("jobs", "status", "x", "--address", "127.0.0.1:8265", cwd=tmp_path)
    assert not_a_url.returncode == 2 and "expected the dashboard URL http://HOST:8265" in not_a_url.stderr
    missing = cli("jobs", "list", cwd=tmp_path)
    assert missing.returncode == 2 and "--address" in missing.stderr


def test_an_unresponsive_head_times_out(monkeypatch):
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        monkeypatch.setattr(ray_jobs, "CONNECT_TIMEOUT_S", 0.5)
        with pytest.raises(UserError, match="no answer within"):
            ray_jobs.connect(f"http://127.0.0.1:{silent.getsockname()[1]}")


def test_pipeline_outside_the_working_dir_and_bad_env(tmp_path):
    (tmp_path / "wd").mkdir()
    with pytest.raises(UserError, match="inside the uploaded working dir"):
        ray_jobs.entrypoint_for(tmp_path / "p.yaml", tmp_path / "wd", [])
    with pytest.raises(UserError, match="KEY=VALUE"):
        ray_jobs.runtime_env_for(tmp_path, ["NOVALUE"], [])
    entrypoint = ray_jobs.entrypoint_for(tmp_path / "wd" / "my p.yaml", tmp_path / "wd", ["storage=/x y"])
    assert "-m compressor run 'my p.yaml' 'storage=/x y'" in entrypoint  # tests/test_security.py runs it
    assert ray_jobs.storage_warning("./artifacts") and not ray_jobs.storage_warning("/mnt/shared/c")
    assert not ray_jobs.storage_warning("s3://b/c")


# ----------------------------------------------------------------------------- against the head
def test_failing_pipeline_job_exits_non_zero_with_the_remote_error(head, tmp_path):
    (tmp_path / "p.yaml").write_text(FAILING_PIPELINE)
    env = clean_env(RAY_ADDRESS="http://127.0.0.1:1")  # --address must win over the environment
    result = cli("submit", "p.yaml", "--address", head, "--wait", cwd=tmp_path, env=env)
    job_id = result.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert result.returncode == 2, result.stderr  # `compressor run`'s own exit code: bad input
    assert f"error: job {job_id} FAILED (exit code 2)" in result.stderr
    assert "teacher.model" in result.stdout  # the remote error paragraph, streamed with the logs
    status = cli("jobs", "status", job_id, "--address", head, cwd=tmp_path)
    assert status.returncode == 0 and f"{job_id}: FAILED" in status.stdout and "exit code: 2" in status.stdout
    logs = cli("jobs", "logs", job_id, "--address", head, cwd=tmp_path)
    assert "compressor run p.yaml" in logs.stdout and "teacher.model" in logs.stdout


def test_job_exit_code_and_stop(head):
    jobs = client(head)
    failing = ray_jobs.submit_job(jobs, entrypoint="python -c \"print('boom'); raise SystemExit(3)\"")
    assert ray_jobs.wait_for(jobs, failing, follow_logs=False, poll_s=0.2) == "FAILED"
    with pytest.raises(ray_jobs.JobFailed, match="FAILED \\(exit code 3\\)") as failed:
        ray_jobs.raise_unless_succeeded(jobs, failing, head)
    assert failed.value.exit_code == 3
    followed = cli("jobs", "logs", failing, "--follow", "--address", head, cwd=Path.cwd())
    assert followed.returncode == 3 and "boom" in followed.stdout and "FAILED (exit code 3)" in followed.stderr
    not_running = cli("jobs", "stop", failing, "--address", head, cwd=Path.cwd())
    assert not_running.returncode == 0 and "FAILED (was not running)" in not_running.stdout
    sleeper = ray_jobs.submit_job(jobs, entrypoint="sleep 120")
    while jobs.get_job_status(sleeper).value == "PENDING":
        time.sleep(0.2)
    stopped = cli("jobs", "stop", sleeper, "--address", head, cwd=Path.cwd())
    assert stopped.returncode == 0 and f"{sleeper}: STOPPED" in stopped.stdout
    unknown = cli("jobs", "status", "raysubmit_nope", "--address", head, cwd=Path.cwd())
    assert unknown.returncode == 2 and "no such job" in unknown.stderr
    listed = cli("jobs", "list", "--address", head, cwd=Path.cwd())
    assert failing in listed.stdout and sleeper in listed.stdout


# ----------------------------------------------------------------------------- the tiny pipeline, end to end
@pytest.mark.slow
def test_tiny_pipeline_succeeds_with_compressor_submit_and_ray_job_submit(head, tmp_path, tiny_runs):
    """Into the storage of the session's shared runs, with the quantize stage changed: prune and distill come from
    its cache, quantize and its evaluation run as Ray tasks of the job; the second submission finds it all cached."""
    from mlflow.tracking import MlflowClient

    from compressor.commands.pipeline import resolve_pipeline

    work = tmp_path / "job"
    work.mkdir()
    shutil.copy(resolve_pipeline(None), work / "tiny.yaml")  # the small upload: just the pipeline
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        f"storage={tiny_runs.storage}",
        f"tracking.uri={tracking}",
        *tiny_runs.overrides,
        f"stages.prune.target.intermediate_size={tiny_runs.runs[0].intermediate_size}",
        "stages.quantize.damp_percent=0.02",
    ]
    result = cli("submit", "tiny.yaml", *overrides, "--address", head, "--wait", cwd=work, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = result.stdout.splitlines()[0]
    assert client(head).get_job_status(job_id).value == "SUCCEEDED"
    assert f"job {job_id} SUCCEEDED" in result.stderr

    runs = MlflowClient(tracking_uri=tracking).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=tracking).search_experiments()]
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) >= 3 and all(r.info.status == "FINISHED" for r in children)
    cached = {r.info.run_name: r.data.tags.get("cached") for r in children if r.info.run_name != "baseline"}
    assert cached == {"prune": "true", "distill": "true", "quantize": "false"}

    plain = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            head,
            "--working-dir",
            str(work),
            "--",
            "compressor",
            "run",
            "tiny.yaml",
            *overrides,
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    plain_id = next(w.strip("'") for w in plain.stdout.split() if w.strip("'").startswith("raysubmit_"))
    assert client(head).get_job_status(plain_id).value == "SUCCEEDED"
