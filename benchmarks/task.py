"""Benchmark of task distillation (pipelines/task.yaml); prints JSON.

The classic distillation table on the held-out test split of the stdlib-module task, as the pipeline's summary
gives it (distill's `hard_labels` control): the teacher's accuracy; the same student (the pipeline's pruned model)
trained on the scarce train split's hard labels alone, with the distill stage's settings; the distilled student;
and the fraction of the gap recovered, (distilled - hard-label) / (teacher - hard-label), goal >= 0.6. Also: the
student's parameters as a fraction of the teacher's, seconds of generate and distill, and white-box KD (forward KL
at T + CE, the pipeline's loss) against black-box CE (alpha 1: the teacher's answer tokens only) on the
same answers at equal tokens.

`--quick` runs the pipeline once at test size (the test teacher, few steps, 16 test rows; no black-box run) for
the suite: its numbers mean nothing, and it takes about a minute (a whole pipeline), not 20 s."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK = "stdlib_module"
QUICK = [
    "teacher.model=zoo:tiny-test-modules",
    "student.model=zoo:tiny-test",
    "data.calib.source=zoo:tiny-test",
    "data.calib.samples=16",
    "data.calib.seq_len=128",
    "stages.prune.target.intermediate_size=192",
    "stages.prune.target.num_attention_heads=2",
    "stages.distill.steps=4",
    "stages.distill.checkpoint_every=4",
    "stages.quantize.group_size=64",
    "evaluation.tasks.0.limit=16",
]


def run_pipeline(storage: Path, overrides: list[str]) -> dict:
    summary = storage / f"summary-{len(list(storage.glob('summary-*')))}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GPTQMODEL_DISABLE_PACK_EXT": "1"}
    args = [sys.executable, "-m", "compressor", "run", "task", f"storage={storage}", *overrides]
    done = subprocess.run([*args, "--summary-json", str(summary)], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode not in (0, 1):  # 1: a gate failed; the scores are still in the summary
        raise SystemExit(f"pipeline failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(summary.read_text())


def stage(summary: dict, kind: str) -> dict:
    return next(s for s in summary["stages"] if s["kind"] == kind)


def accuracy(scores: dict) -> float:
    return scores[TASK]["accuracy"]


def module_task_rows(split: str) -> list:
    from compressor.models.zoo import module_task

    return module_task.splits(0)[split]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="test size: the test teacher, few steps")
    parser.add_argument("--storage", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    overrides = QUICK if args.quick else []
    teacher_name = "tiny-test-modules" if args.quick else "tiny-modules"
    # stdout carries the JSON alone: libraries imported on the way (DeepSpeed's logger) print there
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        storage = Path(args.storage or tmp).resolve()
        storage.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        white = run_pipeline(storage, overrides)
        # black-box: CE on the same answers at the same tokens, rendered the same way (alpha 1: the teacher's logits
        # take no part in the loss, as with `teacher: none`, whose student here would need a template of its own;
        # generate and prune come from the cache)
        black = None if args.quick else run_pipeline(storage, [*overrides, "stages.distill.loss.alpha=1.0"])
        (row,) = [r for r in white["distillation"]["distill"] if r["metric"] == f"{TASK}.accuracy"]
        from compressor.models import zoo

        report = {
            "quick": args.quick,
            "teacher": f"zoo:{teacher_name}",
            "test_accuracy": {
                "teacher": row["teacher"],
                "hard_label_student": row["hard_labels"],
                "distilled_student": row["distilled"],
            },
            "test_rows": 16 if args.quick else len(module_task_rows("test")),
            "gap_recovered": row["gap_recovered"],
            "gap_recovered_goal": 0.6,
            "student_param_fraction": stage(white, "distill")["num_params"] / zoo.param_count(teacher_name),
            "seconds": {
                "generate": stage(white, "generate")["seconds"],
                "distill": stage(white, "distill")["seconds"],
                "note": "distill includes the hard-label control's run",
            },  # fmt: skip
            "white_vs_black_box": {
                "white_box_kd_accuracy": row["distilled"],
                "black_box_ce_accuracy": accuracy(stage(black, "distill")["scores"]) if black else None,
                "tokens_each": "equal: same answers, steps, global_batch and seq_len; only loss.alpha differs (1: CE only)",
            },
            "wall_s": round(time.perf_counter() - start, 1),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
