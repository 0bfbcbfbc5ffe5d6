"""Distillation benchmarks; prints one JSON object.

1. throughput_ratio: tokens/s of the distill stage's training step (compressor.stages.distill.engines.train_step,
   DeepSpeed engines, 1 worker) divided by a plain single-process PyTorch KD loop (full logits, forward KL, AdamW,
   clipping) on the same models and batches. Goal >= 0.9. Steps of the two alternate, one thread each; the median
   step time counts, by wall clock and by process CPU time.
2. memory_ratio: peak memory of the chunked KD loss (forward + backward) divided by the naive full-logit loss, at
   vocab 32k x seq 2048. Goal <= 0.5. Each variant runs in a fresh process and reports its peak RSS growth.

GPU MFU is not measured: this machine has no GPU.

    python benchmarks/distill.py [--steps 16] [--zero 3]   # --zero: the student's deepspeed.zero_stage
    python benchmarks/distill.py --quick   # 2 steps of 64 tokens, loss memory at vocab 4096 x seq 512: checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# CPU only; set before transformers imports deepspeed, which would otherwise print its accelerator guess to stdout.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VOCAB, HIDDEN, SEQ = 32000, 512, 2048  # the memory benchmark's shape
QUICK = dict(steps=2, seq_len=64, vocab=4096, memory_seq=512)  # --quick: same measurements, tiny sizes


# ----------------------------------------------------------------------------- throughput
def tiny_llamas(root: Path, vocab: int = 4096) -> tuple[str, str]:
    """A teacher of the zoo "tiny" shape and a half-MLP student, random weights (speed does not depend on them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for name, mlp, seed in (("teacher", 768, 1), ("student", 384, 2)):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=256,
            intermediate_size=mlp,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=512,
        )
        LlamaForCausalLM(config).save_pretrained(root / name)
        paths.append(str(root / name))
    return paths[0], paths[1]


def plain_kd_step(student, teacher, optimizer, batches, clip: float) -> None:
    """The baseline: what one writes without DeepSpeed or chunking."""
    for tokens in batches:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=tokens).logits[:, :-1].float()
        student_logits = student(input_ids=tokens).logits[:, :-1].float()
        loss = F.kl_div(
            F.log_softmax(student_logits, -1).flatten(0, 1),
            F.log_softmax(teacher_logits, -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
        (loss / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def throughput(steps: int, zero: int, seq: int = 256) -> dict:
    from transformers import AutoModelForCausalLM

    from compressor.stages.distill.engines import build_engines, train_step
    from compressor.stages.distill.spec import DistillSpec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    micro, accum = 4, 2
    spec = DistillSpec(
        data="bench",
        steps=steps,
        global_batch=micro * accum,
        micro_batch=micro,
        lr=1e-4,
        deepspeed={"zero_stage": zero},
    )
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 4096, (micro, seq), generator=gen) for _ in range(accum)]
    tokens_per_step = micro * accum * seq
    with tempfile.TemporaryDirectory() as tmp:
        teacher_path, student_path = tiny_llamas(Path(tmp))
        engines = build_engines(spec, student_path, teacher_path, 1, micro, accum)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval().requires_grad_(False)
        student = AutoModelForCausalLM.from_pretrained(student_path).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def stage():
        train_step(engines, batches, 1e-4)

    def plain():
        plain_kd_step(student, teacher, optimizer, batches, 1.0)

    for fn in (stage, plain):  # warm-up: allocator, DeepSpeed's first-step buffers
        fn()
    # Steps alternate between the two loops so that both see the same load from other processes. Wall time and the
    # process's CPU time are both kept: on a shared machine CPU time is the steadier measure of the work per token.
    times: dict[str, dict[str, list[float]]] = {"stage": {"wall": [], "cpu": []}, "plain": {"wall": [], "cpu": []}}
    for _ in range(steps):
        for name, fn in (("stage", stage), ("plain", plain)):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    params = [sum(p.numel() for p in m.parameters()) for m in (teacher, student)]
    out = {
        "zero_stage": zero,
        "zero_stage_run": engines.zero_stage,
        "model": f"Llama 8 layers x 256: teacher {params[0] / 1e6:.1f}M params, MLP-halved student {params[1] / 1e6:.1f}M",
        "batch": f"{accum} x {micro} x {seq} tokens per optimizer step",
        "steps_timed": steps,
    }
    for clock in ("wall", "cpu"):
        stage_tps = tokens_per_step / statistics.median(times["stage"][clock])
        plain_tps = tokens_per_step / statistics.median(times["plain"][clock])
        out[f"stage_tokens_per_s_{clock}"] = round(stage_tps, 1)
        out[f"plain_tokens_per_s_{clock}"] = round(plain_tps, 1)
        out[f"throughput_ratio_{clock}"] = round(stage_tps / plain_tps, 3)
    out["throughput_goal"] = ">= 0.9"
    return out


# ----------------------------------------------------------------------------- memory
def memory_probe(variant: str, chunk_tokens: int, vocab: int = VOCAB, seq: int = SEQ) -> dict:
    """Runs in a fresh process: peak RSS growth of one forward + backward of the KD loss."""
    from compressor.stages.distill.loss import kd_loss
    from compressor.stages.distill.spec import KDLoss

    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(HIDDEN, vocab, bias=False), torch.nn.Linear(HIDDEN, vocab, bias=False)
    head_t.requires_grad_(False)
    h_s = torch.randn(seq, HIDDEN, requires_grad=True)
    h_t = torch.randn(seq, HIDDEN)
    targets = torch.randint(0, vocab, (seq,))
    # Warm up the ops on a few tokens so that library and allocator set-up is not counted.
    kd_loss(h_s[:8], h_t[:8], targets[:8], head_s, head_t, KDLoss(chunk_tokens=4)).loss.backward()
    head_s.weight.grad = None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    current = _rss_kib()
    if variant == "naive":
        s_logits, t_logits = head_s(h_s).float(), head_t(h_t).float()
        loss = F.kl_div(
            F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="batchmean"
        )
    else:
        loss = kd_loss(h_s, h_t, targets, head_s, head_t, KDLoss(chunk_tokens=chunk_tokens)).loss
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_growth_mib": (max(peak, base) - current) / 1024, "loss": loss.item()}


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def memory(chunk_tokens: list[int], vocab: int = VOCAB, seq: int = SEQ) -> dict:
    # glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so RSS would not fall when tensors
    # are freed; a low fixed threshold returns every large tensor to the OS on free and RSS tracks live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}

    def probe(variant, chunk=0):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-probe", variant, "--chunk", str(chunk), "--vocab", str(vocab)]
            + ["--memory-seq", str(seq)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    naive = probe("naive")
    result = {
        "shape": f"vocab {vocab} x seq {seq}, hidden {HIDDEN}, fp32",
        "naive_peak_mib": round(naive["peak_growth_mib"], 1),
    }
    for chunk in chunk_tokens:
        chunked = probe("chunked", chunk)
        assert abs(chunked["loss"] - naive["loss"]) < 1e-3 * max(1.0, abs(naive["loss"])), (chunked, naive)
        result[f"chunked_{chunk}_peak_mib"] = round(chunked["peak_growth_mib"], 1)
        result[f"memory_ratio_chunk_{chunk}"] = round(chunked["peak_growth_mib"] / naive["peak_growth_mib"], 3)
    result["memory_goal"] = "<= 0.5"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16, help="Timed steps of each loop.")
    parser.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence of the throughput batches.")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="Vocabulary of the memory benchmark.")
    parser.add_argument("--memory-seq", type=int, default=SEQ, help="Tokens of the memory benchmark.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes and 2 steps (the test suite runs this).")
    parser.add_argument("--memory-probe", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:  # as defaults, so that flags given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.chunk, args.vocab, args.memory_seq)))
        return
    from compressor.stages.distill.spec import KDLoss

    # Chunks smaller than the sequence, or the chunked loss has nothing to save.
    chunks = [c for c in (KDLoss().chunk_tokens, 256) if c < args.memory_seq] or [args.memory_seq // 4]
    report = {
        "quick": args.quick,
        "memory": memory(chunks, args.vocab, args.memory_seq),
        "throughput": throughput(args.steps, args.zero, args.seq_len),
        "gpu_mfu": "not measured: no GPU on this machine",
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
