"""Getting the distill workers a place on the Ray cluster before Ray Train starts them.

Ray Train waits for its placement group, gives up after a minute and retries forever, so a worker group the
cluster cannot hold would hang the stage. The driver checks first. A cluster that can place the workers now goes
ahead; otherwise, with `wait_for_resources_s` > 0 (autoscaling clusters, which start with no GPU nodes), it asks
the autoscaler for the workers' bundles and waits, printing a line every 30 s, and refuses when time runs out."""

from __future__ import annotations

import time

from compressor.contract.context import StageContext
from compressor.errors import UserError
from compressor.stages.distill.layout import check_cluster, worker_bundle
from compressor.stages.distill.spec import DistillSpec

POLL_S = 2.0
PROGRESS_EVERY_S = 30.0


def alive_nodes() -> list[dict]:
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def request_workers(bundles: list[dict]) -> None:
    """Ask the autoscaler to keep capacity for `bundles` (replacing any earlier request; [] withdraws it)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def describe(spec: DistillSpec) -> str:
    bundle = ", ".join(f"{amount:g} {resource}" for resource, amount in worker_bundle(spec).items())
    return f"{spec.workers} workers ({bundle} each, {spec.placement_strategy})"


def wait_for_workers(
    spec: DistillSpec, ctx: StageContext, poll_s: float = POLL_S, progress_every_s: float = PROGRESS_EVERY_S
) -> None:
    """Return once the cluster's nodes can hold the worker group; raise UserError if they cannot (at once with
    wait_for_resources_s = 0, else after that many seconds)."""
    problems = check_cluster(spec, alive_nodes())
    if not problems:
        return
    if spec.wait_for_resources_s <= 0:
        raise UserError(
            f"distill.workers: the Ray cluster cannot place {describe(spec)}: {'; '.join(problems)}. Lower workers / "
            "cpus_per_worker / gpus_per_worker, add nodes, or, on an autoscaling cluster, set "
            "distill.wait_for_resources_s (e.g. 1800) to request the nodes and wait for them."
        )
    timeout = spec.wait_for_resources_s
    try:
        request_workers([worker_bundle(spec)] * spec.workers)
    except Exception as exc:  # noqa: BLE001  (no autoscaler to ask: nodes may still join by hand)
        ctx.info(f"distill: could not ask the autoscaler for the workers ({exc}); waiting for nodes to join anyway")
    # A request outlives this process: withdraw it however the wait ends, or an autoscaler keeps the nodes up.
    try:
        ctx.info(
            f"distill: waiting up to {timeout:g} s for the cluster to hold {describe(spec)}, requested from "
            f"the autoscaler: {'; '.join(problems)}"
        )
        start = last_line = time.monotonic()
        while problems:
            now = time.monotonic()
            if now - start >= timeout:
                raise UserError(
                    f"distill.wait_for_resources_s: after {now - start:.0f} s the Ray cluster still cannot place "
                    f"{describe(spec)}: {'; '.join(problems)}. Check that the autoscaler may launch that many nodes "
                    "of a type with these resources (max_workers / maxReplicas, cloud quotas and capacity; `ray "
                    "status` shows pending demands and launch failures), then raise distill.wait_for_resources_s, "
                    "or lower distill.workers / gpus_per_worker / cpus_per_worker."
                )
            if now - last_line >= progress_every_s:
                ctx.info(
                    f"distill: still waiting for the workers' nodes ({now - start:.0f}/{timeout:g} s): "
                    f"{'; '.join(problems)}"
                )
                last_line = now
            time.sleep(min(poll_s, max(0.0, timeout - (now - start))))
            problems = check_cluster(spec, alive_nodes())
        ctx.info(f"distill: the cluster can place the workers after {time.monotonic() - start:.0f} s")
    finally:
        try:
            request_workers([])
        except Exception as exc:  # noqa: BLE001
            ctx.info(
                f"distill: could not withdraw the autoscaler request ({exc}); "
                "run `ray.autoscaler.sdk.request_resources(bundles=[])` on the cluster"
            )
