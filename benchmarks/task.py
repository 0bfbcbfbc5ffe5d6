"""Benchmark of task distillation (pipelines/task.yaml); prints JSON.

The classic distillation table on the held-out test split of the stdlib-module task: the teacher's accuracy; the
same student (the pipeline's pruned model) fine-tuned on the scarce train split's hard labels alone, with the
teacher's own fine-tuning recipe; the distilled student; and the fraction of the gap recovered,
(distilled - hard-label) / (teacher - hard-label), goal >= 0.6. Also: the student's parameters as a fraction of
the teacher's, seconds of generate and distill, and white-box KD (forward KL at T + CE, the pipeline's loss)
against black-box CE (alpha 1: the teacher's answer tokens only) on the same answers at equal tokens.

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


def hard_label_student(student_dir: Path, teacher_name: str, out: Path, limit) -> float:
    """The pruned student fine-tuned on the train split alone (the teacher's recipe), then evaluated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.config.schema import TaskSpec
    from compressor.evaluation import evaluate
    from compressor.modeling import save_checkpoint
    from compressor.zoo import finetune, module_task, recipe

    r = recipe(teacher_name)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    finetune.finetune(model, tokenizer, module_task.splits(r.seed)["train"], r)
    save_checkpoint(model, tokenizer, out)
    task = TaskSpec(name=TASK, data="zoo:modules/test", labels=list(module_task.LABELS), max_gen_toks=4, limit=limit)
    return accuracy(evaluate(out, [task]))


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
        # black-box: CE on the same answers at the same tokens (generate and prune come from the cache)
        black = None if args.quick else run_pipeline(storage, [*overrides, "stages.distill.loss.alpha=1.0"])
        teacher = accuracy(white["baseline"])
        distilled = accuracy(stage(white, "distill")["scores"])
        prune = stage(white, "prune")
        student_dir = storage / "task" / f"prune-{prune['key'][:12]}" / "model"
        limit = 16 if args.quick else None
        hard = hard_label_student(student_dir, teacher_name, storage / "hard-label-student", limit)
        gap = teacher - hard
        from compressor import zoo

        report = {
            "quick": args.quick,
            "teacher": f"zoo:{teacher_name}",
            "test_accuracy": {"teacher": teacher, "hard_label_student": hard, "distilled_student": distilled},
            "gap_recovered": (distilled - hard) / gap if gap > 0 else None,
            "gap_recovered_goal": 0.6,
            "student_param_fraction": stage(white, "distill")["num_params"] / zoo.param_count(teacher_name),
            "seconds": {"generate": stage(white, "generate")["seconds"], "distill": stage(white, "distill")["seconds"]},
            "white_vs_black_box": {
                "white_box_kd_accuracy": distilled,
                "black_box_ce_accuracy": accuracy(stage(black, "distill")["scores"]) if black else None,
                "tokens_each": "equal: same answers, steps, global_batch and seq_len; only loss.alpha differs",
            },
            "wall_s": round(time.perf_counter() - start, 1),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
