"""Feature terms against logit-only KD: how much of the pruning's bits-per-byte gap each recovers at equal steps.

The zoo "tiny" teacher (hidden 256) is width-pruned by the prune stage to hidden 192 (heads, MLP and layers kept),
then distilled for the same steps and data with (a) the logit-only forward KL of the tiny pipeline, and (b, c) the same
plus hidden-state terms on TinyBERT's uniform layer map (hidden_mse, hidden_cosine), through a learned 192 -> 256
projector per layer pair. Each run uses the stage's own loss module (engines.StudentWithLoss, the chunked loss and the
projectors) in one process with AdamW and the stage's lr schedule, without DeepSpeed or Ray (they change where the
numbers are computed, not the numbers).

recovered = (bpb_pruned - bpb_distilled) / (bpb_pruned - bpb_teacher), bits per byte on the zoo corpus's held-out
paragraphs (each up to seq_len tokens; the bytes of the predicted tokens).

    python benchmarks/losses.py [--steps 120]   # the zoo tiny teacher (built on first use, ~5 min)
    python benchmarks/losses.py --quick         # random 2-layer models, 2 steps: checks it runs (< 15 s)

--search measures a distill stage's `search:` (Ray Tune trials of the stage's Ray Train runs, in a local 2-CPU Ray):
the wall time of a 4-trial grid (lr 1e-4 / 1e-3 x temperature 1 / 2, each on `fraction` of the steps) against one
full run with the stage's defaults (lr 1e-4, T 1), and the held-out bits per byte of the student trained with the
searched settings against the defaults'. The held-out paragraphs are the zoo corpus's (the evaluation tasks' text),
which the search never reads: it picks on the sequences of the distill data after the full run's.

    python benchmarks/losses.py --search [--steps 120]   # zoo tiny-test teacher, width-pruned student
    python benchmarks/losses.py --search --quick         # random 2-layer models, a few steps (about 2 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before transformers imports deepspeed (it prints its guess)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VARIANTS = {
    "logits_only": {"kind": "forward_kl"},
    "hidden_mse": {"kind": "forward_kl", "features": [{"kind": "hidden_mse"}], "layer_map": "uniform"},
    "hidden_cosine": {"kind": "forward_kl", "features": [{"kind": "hidden_cosine"}], "layer_map": "uniform"},
}


def quick_teacher(root: Path) -> tuple[Path, list[str], list[str]]:
    """A random 2-layer Llama with a small BPE tokenizer trained on CPython's help topics."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from compressor.models import save_checkpoint

    paragraphs = [p for k in sorted(topics) for p in topics[k].split("\n\n") if len(p) > 80]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(paragraphs[:300], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    save_checkpoint(LlamaForCausalLM(config), tokenizer, root / "teacher")
    return root / "teacher", paragraphs[:-40], paragraphs[-40:]


def zoo_teacher() -> tuple[Path, list[str], list[str]]:
    from compressor.models import zoo

    corpus = zoo.corpus_dir("tiny")

    def paragraphs(name: str) -> list[str]:
        return [p for p in (corpus / name).read_text().split("\n\n") if p.strip()]

    return zoo.ensure_model("tiny"), paragraphs("train.txt"), paragraphs("heldout.txt")


def prune_width(teacher: Path, train: list[str], hidden: int, root: Path, samples: int) -> Path:
    from compressor.config.schema import DataSource
    from compressor.contract.context import StageContext
    from compressor.manifest import ModelRef
    from compressor.stages import prune
    from compressor.stages.prune.spec import PruneSpec

    (root / "calib.txt").write_text("\n\n".join(train[:2000]))
    ctx = StageContext(
        work_dir=root / "pruned", data={"calib": DataSource(source=str(root / "calib.txt"), seq_len=128)}, quiet=True
    )
    spec = PruneSpec(target={"hidden_size": hidden}, calibration="calib", samples=samples, batch_size=8)
    prune.KIND.run(spec, ModelRef(path=str(teacher), key="bench"), ctx)
    return root / "pruned" / "model"


def packed(tokenizer, paragraphs: list[str], seq_len: int, count: int) -> torch.Tensor:
    """`count` sequences of seq_len tokens: paragraphs tokenized, joined with EOS, cut into blocks."""
    ids: list[int] = []
    for text in paragraphs:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= count * seq_len:
            break
    if len(ids) < count * seq_len:
        raise SystemExit(f"the corpus holds {len(ids)} tokens, fewer than {count} x {seq_len}")
    return torch.tensor(ids[: count * seq_len]).view(count, seq_len)


@torch.no_grad()
def bits_per_byte(model, tokenizer, paragraphs: list[str], seq_len: int) -> float:
    nats, size = 0.0, 0
    for text in paragraphs:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :seq_len]
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids).logits[0, :-1].float()
        nats += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        size += len(tokenizer.decode(ids[0, 1:]).encode())
    return nats / math.log(2) / size


def distill(teacher_dir: Path, student_dir: Path, loss: dict, data: torch.Tensor, steps: int, batch: int, lr: float):
    """The stage's loss module trained in this process; returns the student and seconds per step."""
    from transformers import AutoModelForCausalLM

    from compressor.stages.distill.engines import StudentWithLoss, TeacherStates, lr_at, wanted_outputs
    from compressor.stages.distill.layout import feature_pairs
    from compressor.stages.distill.spec import DistillSpec

    spec = DistillSpec(data="bench", steps=steps, lr=lr, min_lr=lr / 10, global_batch=batch, loss=loss)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(student_dir).train()
    pairs = feature_pairs(spec.loss, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    model = StudentWithLoss(student, teacher.get_output_embeddings(), spec, pairs, teacher.config.hidden_size)
    teacher_states = TeacherStates(teacher, *wanted_outputs(spec, pairs))
    optimizer = torch.optim.AdamW(model.parameter_groups(), lr=lr)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, spec, steps) * group.get("lr_scale", 1.0)
        tokens = data[order[(torch.arange(batch) + step * batch) % len(data)]]
        model(tokens, teacher_states(tokens)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return student.eval(), (time.perf_counter() - start) / steps


def search_benchmark(quick: bool, steps: int) -> dict:
    """A 4-trial search against one full run with the defaults, both through the distill stage itself."""
    import ray
    from transformers import AutoModelForCausalLM

    from compressor.config.schema import DataSource
    from compressor.contract.context import StageContext
    from compressor.manifest import ModelRef
    from compressor.models import load_tokenizer
    from compressor.stages import distill as distill_stage
    from compressor.stages.distill.spec import DistillSpec

    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if quick:
            teacher_dir, train, heldout = quick_teacher(root)
            hidden, steps, seq_len, heldout = 32, 8, 64, heldout[:8]
        else:
            from compressor.models import zoo

            corpus = zoo.corpus_dir("tiny-test")
            teacher_dir = zoo.ensure_model("tiny-test")
            train = [p for p in (corpus / "train.txt").read_text().split("\n\n") if p.strip()]
            heldout = [p for p in (corpus / "heldout.txt").read_text().split("\n\n") if p.strip()][:200]
            hidden, seq_len = 64, 128
        (root / "train.txt").write_text("\n\n".join(train))
        student = prune_width(teacher_dir, train, hidden, root, 16 if quick else 64)
        tokenizer = load_tokenizer(teacher_dir)
        common = dict(data="text", steps=steps, global_batch=8, micro_batch=8, cpus_per_worker=1,
                      deepspeed={"zero_stage": 2})  # fmt: skip
        space = {"lr": [1e-4, 1e-3], "loss.temperature": [1.0, 2.0]}  # the defaults are one of the 4 trials
        runs = {
            "defaults": DistillSpec(**common),
            "searched": DistillSpec(**common, search={"space": space, "fraction": 0.25, "validation_samples": 32}),
        }
        out: dict = {"quick": quick, "search": {}}
        for name, spec in runs.items():
            ctx = StageContext(
                work_dir=root / name,
                teacher=ModelRef(path=str(teacher_dir), key="bench-teacher"),
                data={"text": DataSource(source=str(root / "train.txt"), seq_len=seq_len)},
                storage_path=str(root / "ray"),
                run_name=f"bench-{name}",
                quiet=True,
            )
            (root / name).mkdir()
            start = time.perf_counter()
            result = distill_stage.KIND.run(spec, ModelRef(path=str(student), key="bench-student"), ctx)
            seconds = time.perf_counter() - start
            model = AutoModelForCausalLM.from_pretrained(ctx.model_dir).eval()
            row = {"seconds": round(seconds, 1), "heldout_bits_per_byte": round(
                bits_per_byte(model, tokenizer, heldout, seq_len), 4)}  # fmt: skip
            if "search" in result.details:
                search = result.details["search"]
                row.update(
                    search_seconds=search["seconds"],
                    trials=[
                        {"settings": t["settings"], "validation_loss": round(t["validation_loss"], 4)}
                        for t in search["trials"]
                    ],  # fmt: skip
                    best_settings=search["best_settings"],
                )
            out["search"][name] = row
        d, s = out["search"]["defaults"], out["search"]["searched"]
        out["setup"] = (
            f"{'random 2-layer Llama (quick)' if quick else 'zoo tiny-test teacher'}, hidden -> {hidden} by the prune "
            f"stage; {steps} steps x 8 x {seq_len} tokens on 1 CPU worker; search: 4 trials of {max(1, steps // 4)} "
            "steps, 2 at a time, then the full run with the best settings"
        )
        out["search_over_full_run"] = round(s["search_seconds"] / d["seconds"], 2)
        out["searched_beats_defaults"] = s["heldout_bits_per_byte"] < d["heldout_bits_per_byte"]
    ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="random tiny models, 2 steps: checks the code runs")
    parser.add_argument("--steps", type=int, default=120, help="distillation steps per variant")
    parser.add_argument("--search", action="store_true", help="a 4-trial distill search against one full run")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.search:
        print(json.dumps(search_benchmark(args.quick, args.steps)))
        return
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from compressor.models import load_tokenizer

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.quick:
            teacher_dir, train, heldout = quick_teacher(root)
            hidden, steps, batch, seq_len, samples, heldout = 32, 2, 2, 64, 8, heldout[:8]
        else:
            teacher_dir, train, heldout = zoo_teacher()
            hidden, steps, batch, seq_len, samples, heldout = 192, args.steps, 8, 256, 64, heldout[:200]
        tokenizer = load_tokenizer(teacher_dir)
        student_dir = prune_width(teacher_dir, train, hidden, root, samples)
        data = packed(tokenizer, train, seq_len, steps * batch)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
        bpb = {
            "teacher": bits_per_byte(teacher, tokenizer, heldout, seq_len),
            "pruned": bits_per_byte(
                AutoModelForCausalLM.from_pretrained(student_dir).eval(), tokenizer, heldout, seq_len
            ),
        }
        gap = bpb["pruned"] - bpb["teacher"]
        out: dict = {
            "quick": args.quick,
            "setup": f"{'random 2-layer Llama (quick)' if args.quick else 'zoo tiny teacher'}, hidden "
            f"{teacher.config.hidden_size} -> {hidden} by the prune stage; {steps} steps x {batch} x {seq_len} "
            "tokens, lr 1e-3 -> 1e-4 cosine, same data order for every variant",
            "bits_per_byte": {k: round(v, 4) for k, v in bpb.items()},
            "variants": {},
        }
        for name, loss in VARIANTS.items():
            student, seconds = distill(teacher_dir, student_dir, loss, data, steps, batch, 1e-3)
            value = bits_per_byte(student, tokenizer, heldout, seq_len)
            out["variants"][name] = {
                "bits_per_byte": round(value, 4),
                "gap_recovered": round((bpb["pruned"] - value) / gap, 4) if gap else None,
                "seconds_per_step": round(seconds, 3),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
