"""Placing the distill workers: what the cluster can hold (pure arithmetic), and on a real simulated Ray cluster the
wait for an autoscaler: the request goes out, the wait ends when a node joins, and a timeout refuses by the numbers."""

import re
import threading
import time

import pytest
from conftest import simulated_cluster

from compressor.contract.context import StageContext
from compressor.errors import UserError
from compressor.stages.distill.cluster import wait_for_workers
from compressor.stages.distill.layout import check_cluster
from compressor.stages.distill.spec import DistillSpec


def spec(**overrides) -> DistillSpec:
    return DistillSpec(**{"data": "d", "steps": 1, "global_batch": 8, "micro_batch": 1, **overrides})


def gpu_node(gpus=8, cpus=96):
    return {"CPU": float(cpus), "GPU": float(gpus), "memory": 1e12}


@pytest.mark.parametrize(
    "overrides,nodes,words",
    [
        ({"workers": 2}, [{"CPU": 2.0}], None),
        ({"workers": 4, "cpus_per_worker": 1}, [{"CPU": 1.5}] * 3, "the nodes hold 3 of the 4 workers"),
        ({"workers": 8, "gpus_per_worker": 1}, [{"CPU": 16.0}], "need 8 GPU, the cluster has 0"),
        ({"workers": 8, "gpus_per_worker": 1, "cpus_per_worker": 8}, [gpu_node()], None),
        ({"workers": 8, "gpus_per_worker": 1, "cpus_per_worker": 16}, [gpu_node()], "need 128 CPU, the cluster has 96"),
        (
            {"workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 150},
            [gpu_node(), gpu_node()],
            "no single node has the 150 CPU",
        ),
        (
            {"workers": 2, "placement_strategy": "STRICT_SPREAD", "gpus_per_worker": 1},
            [gpu_node(), {"CPU": 8.0}],
            "STRICT_SPREAD puts each of the 2 workers on its own node, and 1 of the cluster's 2 nodes can hold one",
        ),
        (
            {"workers": 16, "placement_strategy": "STRICT_PACK", "gpus_per_worker": 1},
            [gpu_node(), gpu_node()],
            "STRICT_PACK puts all 16 workers on one node, and the largest holds 8",
        ),
        ({"workers": 16, "gpus_per_worker": 1}, [gpu_node(), gpu_node()], None),
    ],
)
def test_check_cluster_counts_whole_workers_per_node(overrides, nodes, words):
    problems = check_cluster(spec(**overrides), nodes)
    if words is None:
        assert problems == []
    else:
        assert any(words in p for p in problems), problems


class Lines(StageContext):
    """A StageContext that keeps what the stage prints."""

    def __init__(self, work):
        super().__init__(work_dir=work, quiet=True)
        self.lines = []

    def info(self, message: str) -> None:
        self.lines.append(message)


@pytest.fixture(scope="module")
def head_only():
    """A real Ray cluster of one 1-CPU head node, as an autoscaling cluster looks before its workers come."""
    yield from simulated_cluster(1)


def autoscaler_request() -> list[dict]:
    """The bundles the cluster's autoscaler is currently asked to keep room for (what request_resources wrote)."""
    import json

    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    assert not is_autoscaler_v2(), "this check reads autoscaler v1's request channel"
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def test_refuses_at_once_without_a_wait(head_only, tmp_path):
    ctx = Lines(tmp_path)
    with pytest.raises(UserError, match=r"2 workers x 1 CPU need 2 CPU, the cluster has 1.*wait_for_resources_s"):
        wait_for_workers(spec(workers=2), ctx)
    assert autoscaler_request() == [] and ctx.lines == []


def test_waits_for_the_autoscaler_until_a_node_joins(head_only, tmp_path):
    ctx = Lines(tmp_path)
    outcome = {}

    def stage():
        try:
            wait_for_workers(spec(workers=2, wait_for_resources_s=120), ctx, poll_s=0.5, progress_every_s=1.0)
        except Exception as exc:  # noqa: BLE001  (re-raised below)
            outcome["error"] = exc
        outcome["returned"] = time.monotonic()

    thread = threading.Thread(target=stage, daemon=True)
    thread.start()
    # This thread plays the autoscaler (Ray adds nodes from the main thread only): it sees the request, and a few
    # seconds later a node joins.
    time.sleep(1.5)
    request = autoscaler_request()
    assert thread.is_alive()
    time.sleep(2.5)
    assert thread.is_alive()
    node_added = time.monotonic()
    head_only.add_node(num_cpus=1)
    thread.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    assert request == [{"CPU": 1.0}, {"CPU": 1.0}]  # one bundle per worker
    assert autoscaler_request() == []  # withdrawn once placed
    assert outcome["returned"] > node_added  # it waited for the node, however long that took
    assert "waiting up to 120 s" in ctx.lines[0] and "need 2 CPU, the cluster has 1" in ctx.lines[0]
    assert any(line.startswith("distill: still waiting") for line in ctx.lines[1:-1])
    assert ctx.lines[-1].startswith("distill: the cluster can place the workers after")


def test_a_wait_that_times_out_names_what_is_missing(head_only, tmp_path):
    ctx = Lines(tmp_path)
    start = time.monotonic()
    with pytest.raises(UserError) as raised:
        wait_for_workers(spec(workers=8, wait_for_resources_s=3), ctx, poll_s=0.5)
    assert 3.0 <= time.monotonic() - start < 30
    message = str(raised.value)
    assert message.startswith("distill.wait_for_resources_s: after 3 s")
    assert re.search(r"8 workers x 1 CPU need 8 CPU, the cluster has [12]\b", message)
    assert autoscaler_request() == []  # withdrawn after the timeout too
