"""Teacher targets (loss.targets) against the live teacher: bytes per token, distill speed, and quality. Prints JSON.

1. bytes: the files one part of targets takes per position (ids, fp16 log-probs, and the tail or the counts), written by
   the stage's own writer for a random teacher with a 32k vocabulary, against dense fp16 logits (2 x 32,000 bytes).
   Goal at k=64: <= 0.5%.
2. speed: tokens/s of the stage's training step (engines.StudentWithLoss, one process, AdamW) reading sparse targets,
   against the same step with the live teacher's forward pass, for a teacher twice the student's size. Goal >= 1.3x on
   CPU. Steps of the two alternate so both see the same load; the median counts.
3. quality: the zoo "tiny" teacher width-pruned to hidden 192 (benchmarks/losses.py's setup), distilled for equal steps
   from sampled and top-k targets at k = 16 and 64 and from the live teacher (full KD); the fraction of the pruning's
   bits-per-byte gap each recovers. Goal: sampled at k=64 within 0.02 of full KD.

    python benchmarks/targets.py [--steps 60]   # the zoo tiny teacher (built on first use, ~5 min)
    python benchmarks/targets.py --quick        # tiny sizes, 2 steps: checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before transformers imports deepspeed (it prints its guess)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from compressor import targets as tg  # noqa: E402
from compressor.stages.distill.targets_compute import teacher_targets  # noqa: E402


def random_llama(root: Path, name: str, vocab: int, hidden: int, layers: int, mlp: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(len(name))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=1024,
    )
    LlamaForCausalLM(config).save_pretrained(root / name)
    return root / name


def index_for(kind: str, k: int, vocab: int, seq_len: int) -> dict:
    return {
        "kind": kind,
        "k": k,
        "temperature": 1.0,
        "seed": 0,
        "vocab_size": vocab,
        "id_dtype": "<u2" if vocab <= 1 << 16 else "<u4",
    }


def measured_bytes(root: Path, seq_len: int, sequences: int) -> dict:
    from transformers import AutoModelForCausalLM

    vocab = 32_000
    teacher = AutoModelForCausalLM.from_pretrained(random_llama(root, "wide", vocab, 64, 1, 128)).eval()
    tokens = torch.randint(0, vocab, (sequences, seq_len), generator=torch.Generator().manual_seed(0))
    out = {}
    for kind in ("topk", "sampled"):
        for k in (16, 64):
            directory = root / f"bytes-{kind}-{k}"
            tg.write_part(str(directory), 0, teacher_targets(teacher, tokens, 0, index_for(kind, k, vocab, seq_len)))
            per_position = sum(f.stat().st_size for f in directory.iterdir()) / (sequences * seq_len)
            out[f"{kind}_k{k}"] = {
                "bytes_per_token": per_position,
                "ratio_to_dense_fp16": round(per_position / (2 * vocab), 5),
            }
    out["goal"] = "<= 0.005 at k=64"
    return out


def loop(student_dir: Path, teacher_dir: Path, kind: str, steps: int, batches: list, sparse: list, lr: float = 1e-3):
    """(the student, the per-step seconds) of `steps` steps of the stage's loss module in this process."""
    from transformers import AutoModelForCausalLM

    from compressor.stages.distill.engines import StudentWithLoss, TeacherStates, lr_at
    from compressor.stages.distill.spec import DistillSpec

    loss = {"kind": "forward_kl"} | ({"targets": {"kind": kind, "k": sparse[0]["ids"].shape[-1]}} if sparse else {})
    spec = DistillSpec(data="bench", steps=steps, lr=lr, min_lr=lr / 10, global_batch=len(batches[0]), loss=loss)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(student_dir).train()
    teacher = None if sparse else AutoModelForCausalLM.from_pretrained(teacher_dir).eval().requires_grad_(False)
    model = StudentWithLoss(
        student, teacher.get_output_embeddings() if teacher else None, spec, [], student.config.hidden_size
    )
    states = TeacherStates(teacher, False, False) if teacher else None
    optimizer = torch.optim.AdamW(model.parameter_groups(), lr=lr)
    seconds = []
    for step in range(steps):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, spec, steps)
        tokens = batches[step % len(batches)]
        if sparse:
            terms = model(tokens, None, {n: t for n, t in sparse[step % len(batches)].items()})
        else:
            with torch.no_grad():
                outputs = states(tokens)
            terms = model(tokens, outputs)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return student.eval(), seconds


def sparse_batches(teacher, batches: list, kind: str, k: int, vocab: int) -> list[dict]:
    out = []
    for i, tokens in enumerate(batches):
        arrays = teacher_targets(teacher, tokens, i * len(tokens), index_for(kind, k, vocab, tokens.shape[1]))
        out.append(
            {n: torch.from_numpy(a.astype("int64" if a.dtype.kind == "u" else a.dtype)) for n, a in arrays.items()}
        )
    return out


def speed(root: Path, steps: int, seq_len: int) -> dict:
    from transformers import AutoModelForCausalLM

    vocab = 4096
    student_dir = random_llama(root, "student", vocab, 256, 4, 512)
    teacher_dir = random_llama(root, "teacher2x", vocab, 256, 8, 1024)  # twice the student's layers and MLP
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (4, seq_len), generator=gen) for _ in range(2)]
    sparse = sparse_batches(teacher, batches, "sampled", 64, vocab)
    _, live = loop(student_dir, teacher_dir, "", steps + 1, batches, [])
    _, cached = loop(student_dir, teacher_dir, "sampled", steps + 1, batches, sparse)
    tokens = 4 * seq_len
    params = [
        sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(d).parameters()) for d in (teacher_dir, student_dir)
    ]
    live_tps, cached_tps = tokens / statistics.median(live[1:]), tokens / statistics.median(cached[1:])
    return {
        "teacher_params": params[0],
        "student_params": params[1],
        "live_teacher_tokens_per_s": round(live_tps, 1),
        "targets_tokens_per_s": round(cached_tps, 1),
        "ratio": round(cached_tps / live_tps, 3),
        "goal": ">= 1.3",
    }


def quality(root: Path, steps: int, quick: bool) -> dict:
    from losses import bits_per_byte, packed, prune_width, quick_teacher, zoo_teacher
    from transformers import AutoModelForCausalLM

    from compressor.models import load_tokenizer

    if quick:
        teacher_dir, train, heldout = quick_teacher(root)
        hidden, batch, seq_len, samples, heldout, ks = 32, 2, 64, 8, heldout[:8], (16,)
    else:
        teacher_dir, train, heldout = zoo_teacher()
        hidden, batch, seq_len, samples, heldout, ks = 192, 8, 256, 64, heldout[:200], (16, 64)
    tokenizer = load_tokenizer(teacher_dir)
    student_dir = prune_width(teacher_dir, train, hidden, root, samples)
    data = packed(tokenizer, train, seq_len, steps * batch)
    batches = list(data.split(batch))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    vocab = len(tokenizer)
    bpb = {
        "teacher": bits_per_byte(teacher, tokenizer, heldout, seq_len),
        "pruned": bits_per_byte(AutoModelForCausalLM.from_pretrained(student_dir).eval(), tokenizer, heldout, seq_len),
    }
    gap = bpb["pruned"] - bpb["teacher"]
    variants = {"full_kd": ("", 0)} | {f"{kind}_k{k}": (kind, k) for kind in ("sampled", "topk") for k in ks}
    out = {}
    for name, (kind, k) in variants.items():
        sparse = sparse_batches(teacher, batches, kind, k, vocab) if kind else []
        student, _ = loop(student_dir, teacher_dir, kind, steps, batches, sparse)
        value = bits_per_byte(student, tokenizer, heldout, seq_len)
        out[name] = {
            "bits_per_byte": round(value, 4),
            "gap_recovered": round((bpb["pruned"] - value) / gap, 4) if gap else None,
        }
    return {
        "setup": f"hidden {teacher.config.hidden_size} -> {hidden}, {steps} steps x {batch} x {seq_len} tokens",
        "bits_per_byte": {k: round(v, 4) for k, v in bpb.items()},
        "variants": out,
        "goal": "sampled_k64 within 0.02 of full_kd's gap_recovered",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps: checks it runs")
    parser.add_argument("--steps", type=int, default=60, help="distillation steps per quality variant")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report = {
            "quick": args.quick,
            "bytes": measured_bytes(root, 32 if args.quick else 256, 2),
            "speed": speed(root, 2 if args.quick else 8, 64 if args.quick else 256),
            "quality": quality(root, 2 if args.quick else args.steps, args.quick),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
