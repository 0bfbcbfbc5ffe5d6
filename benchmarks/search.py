"""Prune to a budget (the shape search) against the hand-picked target on the reference teacher. Prints JSON.

    .venv/bin/python benchmarks/search.py [--budget 0.5] [--top-k 3] [--steps 20] [--storage DIR]
    .venv/bin/python benchmarks/search.py --quick   # the test teacher, 1 shape x 1 step, 2 distill steps

pipelines/tiny.yaml (teacher zoo:tiny, ~8M parameters) without its quantize stage and gates, run with `compressor run`
three times into one storage (the teacher's scores and identical stages come from the cache):
  search         prune to `{params: budget}`: the search short-distills its best `top_k` shapes for `steps` steps with
                 the distill stage's own settings (one CPU per worker, so two run at once here), then the distill stage
  hand_picked    the pipeline as written: its hand-picked target, the same distill stage
  equal_compute  the hand-picked target, its distill stage lengthened by the search's compute (scoring, short
                 distillations, held-out losses; compressor.estimate FLOPs) in steps of the hand-picked student
Quality: held-out bits per byte of the pipeline's ref_ppl task after the distill stage (lower is better).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPRESSOR = [sys.executable, "-m", "compressor"]
# --quick: pipelines/tiny.yaml at the test teacher's size (zoo:tiny-test, tests/conftest.py), 2 distill steps and
# one short evaluation task; with --top-k 1 --steps 1 the same three runs take about a minute rather than an hour.
QUICK_OVERRIDES = [
    "teacher.model=zoo:tiny-test",
    "data.calib={source: 'zoo:tiny-test', samples: 8, seq_len: 64}",
    "data.distill={source: 'zoo:tiny-test', seq_len: 64}",
    "evaluation.tasks=[{name: ref_ppl, include: 'zoo:tiny-test', limit: 20}]",
    "stages.prune.target={intermediate_size: 192, num_attention_heads: 2}",
    "stages.distill.steps=2",
    "stages.distill.checkpoint_every=2",
    "stages.quantize.group_size=64",
]


def pipelines(budget: float, top_k: int, steps: int, overrides: list[str] = ()) -> tuple[dict, dict]:
    """(the search pipeline, the hand-picked one) from pipelines/tiny.yaml with KEY=VALUE overrides."""
    from compressor.config.load import apply_override

    tiny = yaml.safe_load((ROOT / "pipelines" / "tiny.yaml").read_text())
    for override in overrides:
        apply_override(tiny, override)
    prune, distill = (dict(tiny["stages"][i]) for i in (0, 1))
    distill.pop("gate", None)
    short = json.loads(
        json.dumps({k: v for k, v in distill["distill"].items() if k not in ("data", "steps", "checkpoint_every")})
    )
    hand = {**tiny, "name": "bench-search", "stages": [prune, distill]}
    search_prune = {
        **prune,
        "prune": {
            "target": {"params": budget},
            "calibration": prune["prune"]["calibration"],
            "align": tiny["stages"][2]["quantize"]["group_size"],  # what the quantize stage needs of every width
            "search": {
                "top_k": top_k,
                "steps": steps,
                "data": distill["distill"]["data"],
                "tolerance": 0.1,
                "distill": {**short, "cpus_per_worker": 1},
            },
        },
    }
    return {**hand, "stages": [search_prune, distill]}, hand


def run(spec: dict, storage: Path, label: str) -> dict:
    path = storage / f"{label}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    summary = storage / f"{label}.json"
    subprocess.run(
        [*COMPRESSOR, "run", str(path), f"storage={storage}", "--summary-json", str(summary)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(summary.read_text())


def bits_per_byte(scores: dict) -> float:
    return float(scores["ref_ppl"]["bits_per_byte"])


def stage_manifest(storage: Path, pipeline: str, summary: dict, kind: str) -> dict:
    key = next(s["key"] for s in summary["stages"] if s["kind"] == kind)
    return json.loads(next((storage / pipeline).glob(f"{kind}-{key[:12]}/manifest.json")).read_text())


def flops_per_step(teacher: dict, student: dict, distill: dict, seq_len: int) -> float:
    """A distillation step: the teacher's forward and the student's forward and backward (compressor.estimate)."""
    from compressor import estimate

    per_token = estimate.forward_flops_per_token(teacher, seq_len) + 3 * estimate.forward_flops_per_token(
        student, seq_len
    )
    return distill["global_batch"] * seq_len * per_token


def config_of(teacher: dict, shape: dict) -> dict:
    from compressor.models.shapes import Shape
    from compressor.stages.prune.shapes import output_config

    return output_config(teacher, Shape(**shape), None)


def search_flops(search: dict, teacher: dict, prune: dict, data: dict, distill: dict) -> float:
    """What the search computed: a forward per scored shape over its calibration sequences, and for each distilled
    shape its short distillation and two held-out passes (before and after)."""
    from compressor import estimate
    from compressor.stages.prune.spec import PruneSpec

    calib, settings = data[prune["calibration"]], PruneSpec(**prune).search_settings()
    seq_len = data[settings.data]["seq_len"]
    total = 0.0
    for row in search["candidates"]:
        config = config_of(teacher, row["shape"])
        scored = min(settings.score_samples, calib["samples"]) * calib["seq_len"]
        total += scored * estimate.forward_flops_per_token(config, calib["seq_len"])
        if row["heldout_loss_after"] is not None:
            total += search["steps"] * flops_per_step(teacher, config, distill, seq_len)
            total += 2 * settings.heldout_samples * seq_len * estimate.forward_flops_per_token(config, seq_len)
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=0.5, help="target.params: a fraction of non-embedding params")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="short-distillation steps per candidate")
    parser.add_argument("--storage", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="test-size teacher, 1 shape x 1 step (the test suite)")
    args = parser.parse_args()
    if args.quick:  # as defaults, so that flags given explicitly still win
        parser.set_defaults(top_k=1, steps=1)
        args = parser.parse_args()
    storage = args.storage or Path(tempfile.mkdtemp(prefix="compressor-search-bench-"))
    storage.mkdir(parents=True, exist_ok=True)
    from compressor.models import zoo

    searched_spec, hand_spec = pipelines(args.budget, args.top_k, args.steps, QUICK_OVERRIDES if args.quick else [])
    teacher = zoo.model_config(hand_spec["teacher"]["model"].removeprefix("zoo:"))
    distill = hand_spec["stages"][1]["distill"]
    seq_len = hand_spec["data"][distill["data"]]["seq_len"]

    searched = run(searched_spec, storage, "search")
    hand = run(hand_spec, storage, "hand_picked")
    prune_manifest = stage_manifest(storage, hand_spec["name"], searched, "prune")
    search = prune_manifest["details"]["search"]
    hand_prune = stage_manifest(storage, hand_spec["name"], hand, "prune")["details"]
    hand_config = config_of(teacher, hand_prune["target_shape"])
    cost = search_flops(search, teacher, searched_spec["stages"][0]["prune"], searched_spec["data"], distill)
    extra_steps = math.ceil(cost / flops_per_step(teacher, hand_config, distill, seq_len))
    equal_spec = json.loads(json.dumps(hand_spec))
    equal_spec["stages"][1]["distill"]["steps"] = distill["steps"] + extra_steps
    # --quick checks that the script runs: its third pipeline (the same as the second with more steps) adds a minute
    # of Ray start-up and evaluation to the suite and exercises nothing new.
    equal = None if args.quick else run(equal_spec, storage, "equal_compute")

    def stage(summary: dict, kind: str) -> dict:
        return next(s for s in summary["stages"] if s["kind"] == kind)

    rows = search["candidates"]
    distilled = len(search["ranking_after"])
    print(
        json.dumps(
            {
                "teacher": hand_spec["teacher"]["model"],
                "quick": args.quick,
                "budget": search["budget"],
                "candidates_enumerated": search["enumerated"],
                "candidates_scored": search["scored"],
                "candidates_distilled": distilled,
                "short_distill_steps": search["steps"],
                "ranking_before": search["ranking_before"][:distilled],
                "ranking_after": search["ranking_after"],
                "ranking_changed": search["ranking_after"] != search["ranking_before"][:distilled],
                "chosen_shape": search["chosen_shape"],
                "chosen_params": rows[search["chosen"]]["params"],
                "hand_picked_shape": hand_prune["target_shape"],
                "hand_picked_params": hand_prune["params_after"],
                "search_seconds": search["seconds"]["total"],
                "search_short_distill_seconds": search["seconds"]["short_distills"],
                "final_distill_seconds": stage(searched, "distill")["seconds"],
                "search_over_final_distill_time": round(
                    search["seconds"]["total"] / stage(searched, "distill")["seconds"], 3
                ),
                "search_flops": cost,
                "final_distill_flops": distill["steps"]
                * flops_per_step(teacher, config_of(teacher, search["chosen_shape"]), distill, seq_len),
                "main_distill_steps": distill["steps"],
                "equal_compute_steps": distill["steps"] + extra_steps,
                "heldout_bits_per_byte": {
                    "teacher": bits_per_byte(searched["baseline"]),
                    "chosen": bits_per_byte(stage(searched, "distill")["scores"]),
                    "hand_picked_same_steps": bits_per_byte(stage(hand, "distill")["scores"]),
                    "hand_picked_equal_compute": bits_per_byte(stage(equal, "distill")["scores"]) if equal else None,
                },
                "storage": str(storage),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
