"""Safe defaults: no remote code unless asked, no code from YAML, loopback-only local servers, no secret in MLflow
or on the console, no path out of the storage root, and `submit` independent of the head's PATH."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import requests

from compressor import remote_code, secrets
from compressor.config.load import load_pipeline
from compressor.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = textwrap.dedent("""\
    name: sec
    teacher: {model: "zoo:tiny-test"}
    data:
      calib: {source: "zoo:tiny-test", samples: 8, seq_len: 64}
    stages:
      - prune: {target: {intermediate_size: 192}, calibration: calib}
    """)


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- remote code
def test_trust_remote_code_is_off_unless_the_pipeline_sets_it(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv(remote_code.ENV, "")  # restored (removed) after the test, whatever allow() sets
    assert load_pipeline(write(tmp_path, PIPELINE)).teacher.trust_remote_code is False
    assert not remote_code.enabled()
    with caplog.at_level("WARNING", logger="compressor"):
        spec = load_pipeline(
            write(tmp_path, PIPELINE.replace('"zoo:tiny-test"}', '"zoo:tiny-test", trust_remote_code: true}', 1))
        )
    assert spec.teacher.trust_remote_code and "trust_remote_code is on" in caplog.text
    with pytest.raises(UserError, match="auto_map"):
        remote_code.check_config({"auto_map": {"AutoConfig": "x.Config"}}, "--model m")
    remote_code.allow("zoo:tiny-test")
    assert os.environ[remote_code.ENV] == "1" and remote_code.forwarded_env() == {remote_code.ENV: "1"}
    remote_code.check_config({"auto_map": {"AutoConfig": "x.Config"}}, "--model m")  # allowed now


def test_every_model_load_in_compressor_passes_trust_remote_code():
    """from_pretrained / GPTQModel.load without an explicit trust_remote_code would fall back to the library's
    default (and prompt on a terminal): each call must pass the pipeline's setting."""
    calls = []
    for file in (ROOT / "compressor").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and (
                    node.func.attr == "from_pretrained"
                    or (node.func.attr == "load" and getattr(node.func.value, "id", "") == "GPTQModel")
                )
            ):
                calls.append(
                    (
                        f"{file.relative_to(ROOT)}:{node.lineno}",
                        any(k.arg == "trust_remote_code" for k in node.keywords),
                    )
                )
    assert len(calls) >= 8, calls  # modeling, evaluation, prune, quantize (2), distill engines (2)
    assert all(passed for _, passed in calls), [where for where, passed in calls if not passed]


def test_checkpoint_code_runs_only_when_allowed(tmp_path, tiny_teacher, monkeypatch):
    """A checkpoint whose config.json points at its own modeling code: refused by default, run when allowed."""
    import shutil

    from compressor.models import load_model

    model = tmp_path / "custom"
    shutil.copytree(tiny_teacher, model)
    marker = tmp_path / "code-ran"
    (model / "modeling_custom.py").write_text(
        textwrap.dedent(f"""\
        from pathlib import Path
        from transformers import LlamaConfig, LlamaForCausalLM
        Path({str(marker)!r}).write_text("imported")

        class CustomConfig(LlamaConfig):
            model_type = "custom-llama"

        class CustomForCausalLM(LlamaForCausalLM):
            config_class = CustomConfig
        """)
    )
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="custom-llama",
        auto_map={
            "AutoConfig": "modeling_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    )
    (model / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv(remote_code.ENV, "")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(model)
    assert not marker.exists()
    monkeypatch.setenv(remote_code.ENV, "1")
    assert type(load_model(model)).__name__ == "CustomForCausalLM" and marker.exists()


# ----------------------------------------------------------------------------- YAML
def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    marker = tmp_path / "ran"
    for tag in (
        f'!!python/object/apply:os.system ["touch {marker}"]',
        "!!python/name:os.system",
        f'!!python/object/new:subprocess.Popen [["touch", "{marker}"]]',
    ):
        path = write(tmp_path, PIPELINE.replace('{model: "zoo:tiny-test"}', tag))
        with pytest.raises(UserError, match="p.yaml:2: tag .* refused: .*safe loader"):
            load_pipeline(path)
    assert not marker.exists()


def test_stage_names_cannot_leave_the_storage_root(tmp_path):
    for name in ("../up", "..", "a/b", "/etc", "~root", "x/../../y", "a\\b"):
        with pytest.raises(UserError, match="stages.0.name"):
            load_pipeline(write(tmp_path, PIPELINE.replace("  - prune:", f"  - name: {json.dumps(name)}\n    prune:")))
    with pytest.raises(UserError, match="name:"):
        load_pipeline(write(tmp_path, PIPELINE.replace("name: sec", "name: ../sec")))
    spec = load_pipeline(write(tmp_path, PIPELINE.replace("  - prune:", "  - name: prune-v1.2_a\n    prune:")))
    assert spec.stages[0].name == "prune-v1.2_a"


# ----------------------------------------------------------------------------- bind addresses
LISTENERS = textwrap.dedent("""\
    import json, time
    import psutil
    import ray  # imported before ensure_ray, as in the CLI: Ray reads its loopback switch at import
    from compressor.ray_runtime import ensure_ray
    ensure_ray()
    ray.get(ray.remote(lambda: 1).remote())
    time.sleep(2)  # let the dashboard's agents bind
    me = psutil.Process()
    found = []
    for p in [me, *me.children(recursive=True)]:
        try:
            found += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections("inet") if c.status == "LISTEN"]
        except psutil.Error:
            pass
    print(json.dumps(found))
    ray.shutdown()
    """)


def test_the_local_ray_head_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    listeners = json.loads(done.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners  # the servers were seen at all
    exposed = [entry for entry in listeners if entry[1].removeprefix("::ffff:") not in ("127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_ensure_ray_passes_remote_code_to_a_cluster(monkeypatch):
    import ray

    from compressor import ray_runtime

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv(remote_code.ENV, "1")
    monkeypatch.delenv("COMPRESSOR_VERBOSE", raising=False)
    ray_runtime.ensure_ray("ray://head:10001")
    assert seen["address"] == "ray://head:10001" and seen["runtime_env"] == {"env_vars": {remote_code.ENV: "1"}}
    assert (
        ray_runtime.LOCAL_HEAD_ARGS["dashboard_host"] == ray_runtime.LOCAL_HEAD_ARGS["_node_ip_address"] == "127.0.0.1"
    )


def test_mlflow_commands_the_project_prints_bind_loopback():
    """compressor starts no MLflow server itself; the `mlflow ui` it suggests listens on MLflow's default,
    127.0.0.1 (a server for a cluster is configured in clusters/, inside the cluster's network)."""
    mentions = [
        line
        for file in (ROOT / "compressor").rglob("*.py")
        for line in file.read_text().splitlines()
        if "mlflow ui" in line or "mlflow server" in line
    ]
    assert mentions and not [m for m in mentions if "--host" in m and "127.0.0.1" not in m]


# ----------------------------------------------------------------------------- secrets
def test_redaction():
    r = secrets.redact
    assert r("http://alice:pa55word@mlflow:5000/x") == "http://alice:***@mlflow:5000/x"
    assert r("https://ghp_tokenvalue@github.com/a") == "https://***@github.com/a"
    assert (
        r("https://b.s3.amazonaws.com/k?X-Amz-Signature=abc123&x=1")
        == "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&x=1"
    )
    assert r("token hf_abcdefghijklmnopqrstuvwxyz0123 used") == "token *** used"
    assert (
        r("sqlite:////tmp/a/mlflow.db and s3://bucket/key and http://mlflow:5000")
        == "sqlite:////tmp/a/mlflow.db and s3://bucket/key and http://mlflow:5000"
    )
    os.environ["MY_SERVICE_TOKEN"] = "s3cr3t-value-42"
    try:
        assert r("value s3cr3t-value-42 here") == "value *** here"
        assert secrets.redact_mapping({"a.password": "x", "b": "s3cr3t-value-42", "tokens": "94e9"}) == {
            "a.password": "***",
            "b": "***",
            "tokens": "94e9",
        }
    finally:
        del os.environ["MY_SERVICE_TOKEN"]
    secrets.register("registered-secret-1")
    assert r("x registered-secret-1 y") == "x *** y" and r("seed 0, 1, true") == "seed 0, 1, true"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow server on loopback, its store (sqlite + artifacts) under tmp_path/server."""
    store = tmp_path / "server"
    store.mkdir()
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not come up"
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        yield port, store
    finally:
        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
        proc.wait(timeout=30)
        for child in psutil.wait_procs(tree, timeout=10)[1]:
            child.kill()


@pytest.mark.slow
def test_planted_secrets_reach_neither_mlflow_nor_the_console(tmp_path, mlflow_server, tiny_teacher):
    port, store = mlflow_server
    planted = {
        "HF_TOKEN": "hf_PlantedHubToken0123456789abcdef",
        "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-9f8e7d",
        "uri": "planted-uri-password-31337",
    }
    text = PIPELINE.replace(
        "data:",
        f"tracking: {{uri: 'http://compressor:{planted['uri']}@127.0.0.1:{port}'}}\n"
        f"# hub token for later: {planted['HF_TOKEN']}\ndata:",
    )
    pipeline = write(tmp_path, text + "evaluation: {tasks: []}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_TOKEN=planted["HF_TOKEN"],
        AWS_SECRET_ACCESS_KEY=planted["AWS_SECRET_ACCESS_KEY"],
    )
    done = subprocess.run(
        [sys.executable, "-m", "compressor", "run", str(pipeline), f"storage={tmp_path / 'store'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = [p for p in store.rglob("*") if p.is_file()] + [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    logged_yaml = [p for p in files if p.name == "pipeline.yaml"]
    assert logged_yaml and "compressor:***@127.0.0.1" in logged_yaml[0].read_text()  # the scan sees the artifacts
    assert any(p.name == "mlflow.db" for p in files)
    haystacks = {str(p): p.read_bytes() for p in files}
    haystacks.update(stdout=done.stdout.encode(), stderr=done.stderr.encode())
    leaks = [
        (where, name, [line for line in data.decode(errors="replace").splitlines() if secret in line][:3])
        for where, data in haystacks.items()
        for name, secret in planted.items()
        if secret.encode() in data
    ]
    assert not leaks, leaks


# ----------------------------------------------------------------------------- submit
def test_submit_entrypoint_runs_compressor_through_python_whatever_the_path(tmp_path):
    """The job's command starts the Python that has compressor (`python -m compressor`), found without relying on
    `compressor` being on the head's PATH; with no such Python it says so (exit 2), never `command not found`."""
    from compressor import jobs as ray_jobs

    (tmp_path / "p.yaml").write_text("name: x\nteacher: {model: /no/such/teacher}\nstages: [{evaluate: {}}]\n")
    entrypoint = ray_jobs.entrypoint_for(tmp_path / "p.yaml", tmp_path, ["seed=1"])
    assert entrypoint.startswith(f"for py in {sys.executable} python3 python; do")
    assert 'exec "$py" -m compressor run p.yaml seed=1' in entrypoint
    bare = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        ["/bin/sh", "-c", entrypoint], cwd=tmp_path, env=bare, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "teacher.model: /no/such/teacher" in done.stderr, done.stderr  # compressor ran
    missing = ray_jobs.run_command(["run", "p.yaml"], python="/no/such/python")
    done = subprocess.run(
        ["/bin/sh", "-c", missing],
        cwd=tmp_path,
        env={"PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "no Python on the Ray head can run compressor" in done.stderr
    assert "not found" not in done.stderr


class FakeJobs:
    """Stands in for Ray's JobSubmissionClient: records what would be submitted."""

    def __init__(self, fail: bool = False):
        self.fail, self.submitted = fail, {}

    def get_address(self):
        return "http://127.0.0.1:8265"

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        if self.fail:  # Ray's errors may echo the runtime env
            raise RuntimeError(f"rejected runtime_env {kwargs['runtime_env']}")
        return "raysubmit_fake"


def test_submit_never_prints_env_values(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from compressor.cli import app
    from compressor.commands import submit
    from compressor.jobs import runtime_env_for

    (tmp_path / "p.yaml").write_text(
        PIPELINE.replace('"zoo:tiny-test"}', '"zoo:tiny-test", trust_remote_code: true}', 1)
        + "storage: /shared/store\n"
    )
    secret = "hf_SubmitEnvSecret0123456789abc"
    args = [
        "submit",
        str(tmp_path / "p.yaml"),
        "--working-dir",
        str(tmp_path),
        "--address",
        "http://127.0.0.1:8265",
        "--env",
        f"HF_TOKEN={secret}",
        "--env",
        f"EXTRA=tracking.uri=http://u:{secret[3:]}@h",
    ]
    jobs = FakeJobs()
    monkeypatch.setattr("compressor.jobs.connect", lambda address: jobs)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "raysubmit_fake" in result.output, result.output
    assert secret not in result.output and secret[3:] not in result.output, result.output
    env_vars = jobs.submitted["runtime_env"]["env_vars"]
    assert env_vars["HF_TOKEN"] == secret  # the job itself gets the value
    assert env_vars[remote_code.ENV] == "1"  # and the pipeline's trust_remote_code
    assert "-m compressor run p.yaml" in jobs.submitted["entrypoint"]
    jobs = FakeJobs(fail=True)
    with pytest.raises(UserError, match="rejected runtime_env") as refused:
        submit.submit_pipeline("http://127.0.0.1:8265", tmp_path / "p.yaml", [], tmp_path, [f"HF_TOKEN={secret}"])
    assert secret not in str(refused.value)
    with pytest.raises(UserError, match="--env number 2") as malformed:
        runtime_env_for(tmp_path, ["A=1", "NOVALUE-" + secret], [])
    assert secret not in str(malformed.value)


def test_the_api_teachers_key_reaches_the_server_and_nothing_else(tmp_path, openai_server):
    """A generate stage with an API teacher in a real pipeline run (MLflow's default sqlite store, artifacts,
    stage log, the answers store): the key in the variable `api_key_env` names is sent as the Authorization header
    and appears in no file and no console line. The variable's name is not secret-looking on purpose: the stage
    itself must register the value for redaction."""
    planted = "sk-planted-teacher-key-5b8e1d"
    openai_server.reset()
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "Say {i}"}}\n' for i in range(5)))
    text = PIPELINE.replace("data:\n", f"data:\n  asks: {{source: {tmp_path / 'prompts.jsonl'}}}\n").replace(
        "  - prune: {target: {intermediate_size: 192}, calibration: calib}",
        f"  - generate: {{prompts: asks, teacher: 'openai:tiny-test', base_url: '{openai_server.base_url}', "
        "api_key_env: GEN_AUTH, max_new_tokens: 4}",
    )
    pipeline = write(tmp_path, text + "evaluation: {tasks: []}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GEN_AUTH=planted)
    done = subprocess.run(
        [sys.executable, "-m", "compressor", "run", str(pipeline), f"storage={tmp_path / 'store'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {entry["auth"] for entry in openai_server.log} == {f"Bearer {planted}"}
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "review.md" for p in files)
    haystacks = {str(p): p.read_bytes() for p in files}
    haystacks.update(stdout=done.stdout.encode(), stderr=done.stderr.encode())
    assert not [where for where, data in haystacks.items() if planted.encode() in data]

    # the dataset was published like a model: a second run finds it cached and sends nothing
    stage_dir = next((tmp_path / "store" / "sec").glob("generate-*"))
    assert json.loads((stage_dir / "manifest.json").read_text())["dataset_uri"] == "data"
    before = len(openai_server.log)
    again = subprocess.run(done.args, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "cached" in again.stderr + again.stdout, again.stderr[-2000:]
    assert len(openai_server.log) == before and planted not in again.stdout + again.stderr
