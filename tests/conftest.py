"""Shared fixtures: the small reference teacher and its corpus, built once into the normal zoo cache
($COMPRESSOR_HOME/zoo, ~1 min the first time) so that every test file and later runs reuse them."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_teacher() -> Path:
    """HF checkpoint dir of zoo recipe "tiny-test": a ~1M-param Llama (GQA 4/2) trained on CPython's docs."""
    from compressor.models import zoo

    return zoo.ensure_model("tiny-test")


@pytest.fixture(scope="session")
def tiny_corpus() -> Path:
    """Directory with train.txt and heldout.txt (blank-line separated paragraphs) of the tiny-test corpus."""
    from compressor.models import zoo

    return zoo.corpus_dir("tiny-test")


# pipelines/tiny.yaml sized for the test teacher (hidden 128, 4 query / 2 KV heads, MLP 384) and CI's budget.
TINY_PIPELINE_AT_TEST_SIZE = [
    "teacher.model=zoo:tiny-test",
    "data.calib.source=zoo:tiny-test",
    "data.calib.samples=32",
    "data.calib.seq_len=128",
    "data.distill.source=zoo:tiny-test",
    "data.distill.seq_len=128",
    "evaluation.tasks.0.include=zoo:tiny-test",
    "evaluation.tasks.1.include=zoo:tiny-test",
    "stages.prune.target.intermediate_size=192",
    "stages.prune.target.num_attention_heads=2",
    "stages.distill.steps=40",
    "stages.distill.checkpoint_every=20",
    "stages.quantize.group_size=64",
]


@pytest.fixture(scope="session")
def tiny_test_overrides() -> list[str]:
    """KEY=VALUE overrides that run the shipped tiny pipeline on the test-size teacher."""
    return list(TINY_PIPELINE_AT_TEST_SIZE)


HUB_REPO = "acme/tiny-llama"


def lay_out_hf_cache(hf_home: Path, repo_id: str, model_dir: Path, branch: str = "main") -> str:
    """The tree huggingface_hub resolves offline (HF_HOME/hub/models--ORG--NAME/{refs, snapshots/SHA, blobs}),
    filled with a local checkpoint, as `snapshot_download` would have left it. Returns the commit hash."""
    import hashlib
    import shutil

    commit = hashlib.sha1(f"{repo_id}@{branch}".encode()).hexdigest()
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(p for p in model_dir.iterdir() if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return commit


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory, tiny_teacher) -> dict:
    """An offline Hugging Face cache (HF_HOME) holding the test teacher as hub repo `acme/tiny-llama` at `main`.
    Returns the environment a subprocess needs to resolve it, and the commit."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    commit = lay_out_hf_cache(hf_home, HUB_REPO, tiny_teacher)
    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1"}
    return {"env": env, "repo": HUB_REPO, "commit": commit, "hf_home": hf_home}


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> dict:
    """The hub cache above, in this process (huggingface_hub reads HF_HOME when imported: patch its constants)."""
    from huggingface_hub import constants

    for key, value in hub_cache["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache["hf_home"] / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


class ServedBytes(dict):
    """Body bytes the S3 server sent for each object key (GET requests), counted by a WSGI layer around moto."""

    def __init__(self, wsgi_server):
        super().__init__()
        app = wsgi_server.app

        def counting(environ, start_response):
            body = app(environ, start_response)
            if environ.get("REQUEST_METHOD") != "GET":
                return body
            key = environ.get("PATH_INFO", "").lstrip("/")
            chunks = list(body)
            self[key] = self.get(key, 0) + sum(len(c) for c in chunks)
            return chunks

        wsgi_server.app = counting


@pytest.fixture
def s3(monkeypatch):
    """A real S3 endpoint on loopback; AWS_ENDPOINT_URL points s3fs (botocore) and pyarrow (Ray Train) at it."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    served = ServedBytes(server._server)
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    from moto.moto_api._internal.models import moto_api_backend

    moto_api_backend.reset()  # moto keeps buckets per process: start every test's server empty
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients would still talk to an earlier test's server
    fs = s3fs.S3FileSystem()
    fs.mkdir("bucket")
    fs.served = served  # what the server sent back, by object key: tests of what a reader fetches read it
    yield fs
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def simulated_cluster(nodes: int):
    """A real Ray cluster of `nodes` 1-CPU nodes on this machine, connected (a generator for module fixtures).
    Only its own processes are stopped afterwards."""
    import os

    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another test module's connection; this one needs its own cluster
        ray.shutdown()
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_test_overrides, hub_cache):
    """The two shared runs of tests/pipeline_runs.py, the teacher `acme/tiny-llama@main` from the hub cache above."""
    from pipeline_runs import run_twice

    hub_teacher = [f"teacher.model={hub_cache['repo']}", "teacher.revision=main"]
    return run_twice(
        tmp_path_factory.getbasetemp() / "pipeline_runs", [*tiny_test_overrides, *hub_teacher], hub_cache["env"]
    )


@pytest.fixture(scope="session")
def openai_server(tiny_teacher):
    """An OpenAI-compatible server on 127.0.0.1 serving the tiny-test model (tests/openai_server.py). Tests call
    `.reset()` first: it clears the request log, the injected faults and the latency."""
    from openai_server import OpenAIServer

    server = OpenAIServer(str(tiny_teacher), name="tiny-test").start()
    yield server
    server.stop()
