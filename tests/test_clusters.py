"""clusters/ and pipelines/: every YAML parses and validates, the cluster configs have the structure a
compressor run needs (GPU workers, shared storage, MLflow, EFA for NCCL), the Llama recipes match the Minitron paper
and wait for the GPU nodes the autoscaling clusters start without."""

from __future__ import annotations

import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from compressor.config.load import load_pipeline

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml")) + sorted((ROOT / "compressor" / "pipelines").glob("*.yaml"))
SHARED = "/mnt/shared"
MINITRON_TASKS = {"mmlu", "hellaswag", "winogrande", "arc_challenge"}


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> dict[str, list[dict]]:
    """kind -> documents, over every KubeRay manifest."""
    by_kind: dict[str, list[dict]] = {}
    for path in sorted((CLUSTERS / "kuberay").glob("*.yaml")):
        for doc in load_docs(path):
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


@pytest.mark.parametrize("path", sorted(CLUSTERS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cluster_yaml_parses(path):
    assert load_docs(path)


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_pipeline_yaml_validates(path):
    spec = load_pipeline(path)
    assert spec.stages
    assert path.read_text().startswith("#"), "start each pipeline with a comment saying how to run it"


# ----------------------------------------------------------------------------- Ray cluster launcher
def launcher_config() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTERS / "aws-gpu.yaml").read_text()))
    validate_config(config)  # Ray's own schema, as `ray up` checks it
    return config


def test_aws_launcher_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher_config()
    broken = yaml.safe_load((CLUSTERS / "aws-gpu.yaml").read_text())
    broken["available_node_types"]["gpu_h100"]["min_workerz"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_aws_launcher_has_gpu_workers_shared_storage_and_mlflow():
    config = launcher_config()
    assert config["provider"]["type"] == "aws"
    nodes = config["available_node_types"]
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    gpu_types = [
        n
        for n in workers
        if n["node_config"]["InstanceType"].split(".")[0] in {"p4d", "p4de", "p5", "p5e", "g5", "g6", "g6e"}
    ]
    assert gpu_types and sum(n["max_workers"] for n in gpu_types) * 8 >= 64  # room for the 64 distill workers
    host_setup = " ".join(config["initialization_commands"])
    assert "mount -t nfs4" in host_setup and SHARED in host_setup
    assert f"-v {SHARED}:{SHARED}" in config["docker"]["run_options"]
    head_start, worker_start = (
        " ".join(config["head_start_ray_commands"]),
        " ".join(config["worker_start_ray_commands"]),
    )
    assert "mlflow server" in head_start and f"{SHARED}/mlflow" in head_start
    assert "MLFLOW_TRACKING_URI=" in head_start and "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker_start
    assert "--dashboard-host=0.0.0.0" in head_start  # `compressor submit` talks to the dashboard
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")


# ----------------------------------------------------------------------------- KubeRay
def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def cluster_specs() -> list[tuple[str, dict]]:
    kinds = manifests()
    specs = [("RayCluster", doc["spec"]) for doc in kinds["RayCluster"]]
    return specs + [("RayJob", doc["spec"]["rayClusterSpec"]) for doc in kinds["RayJob"]]


def test_kuberay_manifests_define_the_pieces():
    kinds = manifests()
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim", "Deployment", "Service"} <= set(kinds)
    for doc in kinds["RayCluster"] + kinds["RayJob"]:
        assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    (claim,) = kinds["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "compressor-shared" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (service,) = kinds["Service"]
    assert service["metadata"]["name"] == "mlflow" and service["spec"]["ports"][0]["port"] == 5000


@pytest.mark.parametrize("kind,spec", cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_cluster_structure(kind, spec):
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (group,) = spec["workerGroupSpecs"]
    assert group["maxReplicas"] >= group.get("minReplicas", 0)
    worker_limits = containers(group["template"])[0]["resources"]["limits"]
    assert int(worker_limits["nvidia.com/gpu"]) * group["maxReplicas"] >= 64
    for template in (head["template"], group["template"]):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in template["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        for container in containers(template):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI") == "http://mlflow:5000"
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims.get(mounts.get(SHARED)) == "compressor-shared"
            assert container["image"] == containers(head["template"])[0]["image"]


def test_rayjob_runs_a_shipped_pipeline_on_the_shared_storage():
    (job,) = manifests()["RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["compressor", "run"]
    pipeline = ROOT / "pipelines" / Path(argv[2]).name  # mounted from a ConfigMap of pipelines/
    assert Path(argv[2]).parent.as_posix() == "/etc/compressor/pipelines" and pipeline.is_file()
    assert "--tracking-uri" in argv
    spec = load_pipeline(pipeline)
    assert spec.storage.startswith(SHARED + "/")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    config_maps = [v["configMap"]["name"] for v in head["spec"]["volumes"] if "configMap" in v]
    assert config_maps == ["compressor-pipelines"]


# ----------------------------------------------------------------------------- recipes
def test_width_recipe_is_faithful_to_minitron_4b_width():
    spec = load_pipeline(ROOT / "pipelines" / "llama8b_to_4b.yaml")
    assert spec.teacher.model == "meta-llama/Llama-3.1-8B" and spec.storage.startswith(SHARED)
    prune, distill, quantize = (s.spec for s in spec.stages)
    assert prune.target.model_dump(exclude_none=True) == {"hidden_size": 3072, "intermediate_size": 9216}
    calib = spec.data[prune.calibration]
    assert (calib.samples, calib.seq_len) == (1024, 4096)
    assert distill.loss.kind == "forward_kl" and distill.loss.temperature == 1.0 and distill.loss.alpha == 0.0
    assert (distill.lr, distill.min_lr, distill.warmup_steps) == (1e-4, 1e-5, 40)
    assert (distill.global_batch, distill.seq_len, distill.tokens) == (1152, 8192, 94e9)
    assert distill.deepspeed.zero_stage == 3 and distill.workers > 1 and distill.gpus_per_worker == 1
    assert distill.global_batch % (distill.workers * distill.micro_batch) == 0
    assert (quantize.method, quantize.bits, quantize.group_size) == ("gptq", 4, 128)
    assert_minitron_gates(spec)


def test_depth_recipe_drops_16_layers():
    spec = load_pipeline(ROOT / "pipelines" / "llama8b_to_4b_depth.yaml")
    target = spec.stages[0].spec.target
    assert len(set(target.drop_layers)) == 16 and all(0 <= i < 32 for i in target.drop_layers)
    assert target.hidden_size is None and target.intermediate_size is None
    assert_minitron_gates(spec)


def assert_minitron_gates(spec):
    assert {t.name for t in spec.evaluation.tasks} == MINITRON_TASKS
    distill_gate, quantize_gate = spec.stages[1].gate, spec.stages[2].gate
    assert {m: b.min_recovery for m, b in distill_gate.metrics.items()} == dict.fromkeys(MINITRON_TASKS, 0.90)
    assert {m: b.max_drop_stderr for m, b in quantize_gate.metrics.items()} == dict.fromkeys(MINITRON_TASKS, 2.5)
    assert distill_gate.on_fail == quantize_gate.on_fail == "stop"


def test_single_gpu_hub_pipeline():
    spec = load_pipeline(ROOT / "pipelines" / "smollm2_135m.yaml")
    distill = spec.stages[1].spec
    assert distill.workers * max(distill.gpus_per_worker, 1) == 1
    assert all(s.resources.num_gpus <= 1 for s in spec.stages)


# ----------------------------------------------------------------------------- EFA and autoscaling
EFA_CARDS = {"p5.48xlarge": 32, "p5e.48xlarge": 32, "p4d.24xlarge": 4, "p4de.24xlarge": 4}  # network cards


def test_aws_gpu_workers_have_efa_in_one_subnet_group_and_placement_group():
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces

    config = launcher_config()
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]["node_config"]
    workers = [n["node_config"] for name, n in nodes.items() if name != config["head_node_type"]]
    assert workers
    for node in workers:
        interfaces = node["NetworkInterfaces"]
        assert len(interfaces) == EFA_CARDS[node["InstanceType"]]  # one EFA per network card
        assert sorted(i["NetworkCardIndex"] for i in interfaces) == list(range(len(interfaces)))
        for i in interfaces:
            assert i["InterfaceType"] == "efa" and i["DeviceIndex"] == (0 if i["NetworkCardIndex"] == 0 else 1)
        assert node["Placement"]["GroupName"]  # a cluster placement group
        # What Ray's AWS bootstrap makes of the interfaces: one subnet, and the head's security group, whose
        # self-referencing rules EFA needs and which also opens head <-> workers.
        resolved = _configure_subnets_and_groups_from_network_interfaces(node)
        assert set(resolved["SubnetIds"]) == set(head["SubnetIds"]) and len(set(resolved["SubnetIds"])) == 1
        assert set(resolved["SecurityGroupIds"]) == set(head["SecurityGroupIds"])
    assert config["provider"]["use_internal_ips"] is True  # instances with several interfaces get no public IP
    assert "," not in config["provider"]["availability_zone"]  # EFA and placement groups live in one zone
    assert {"--privileged", "--ulimit memlock=-1:-1"} <= set(config["docker"]["worker_run_options"])
    assert "bash /home/ray/compressor/clusters/efa.sh" in config["worker_setup_commands"]
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "FI_PROVIDER=efa" in worker_start and "/opt/amazon/ofi-nccl/lib" in worker_start


def test_the_image_installs_efa_and_the_nccl_plugin():
    import subprocess

    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    script = (CLUSTERS / "efa.sh").read_text()
    assert "COPY clusters/efa.sh /tmp/efa.sh" in dockerfile and "bash /tmp/efa.sh" in dockerfile
    assert "FI_PROVIDER=efa" in dockerfile and "NCCL_NET_PLUGIN=ofi" in dockerfile
    assert "--skip-kmod" in script and "/opt/amazon/ofi-nccl/lib" in script  # the install fails without the plugin
    assert subprocess.run(["bash", "-n", str(CLUSTERS / "efa.sh")]).returncode == 0


def test_recipes_wait_for_the_gpu_nodes_the_clusters_start_without():
    from compressor.stages.distill.spec import DistillSpec

    config = launcher_config()
    gpu_types = [n for name, n in config["available_node_types"].items() if name != config["head_node_type"]]
    assert all(n["min_workers"] == 0 for n in gpu_types)
    (raycluster,) = manifests()["RayCluster"]
    assert raycluster["spec"]["workerGroupSpecs"][0]["minReplicas"] == 0
    for recipe in ("llama8b_to_4b.yaml", "llama8b_to_4b_depth.yaml"):
        (distill,) = [
            s.spec for s in load_pipeline(ROOT / "pipelines" / recipe).stages if isinstance(s.spec, DistillSpec)
        ]
        assert distill.wait_for_resources_s >= 900  # booting 8 p5 nodes and pulling the image takes minutes
