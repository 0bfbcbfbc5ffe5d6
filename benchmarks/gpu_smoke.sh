#!/usr/bin/env bash
# GPU smoke test: the tiny pipeline (compressor/pipelines/tiny.yaml) on a machine with an NVIDIA GPU, every stage on
# the GPU: prune, distill (NCCL, bf16; one run under ZeRO-2, one with ZeRO-3), evaluation and GPTQ. Prints one JSON
# object on stdout: per run each stage's seconds and status, distill tokens/s and MFU, the GPTQ kernel GPTQModel
# picked, each gate's outcome, and the peak GPU memory (nvidia-smi, sampled every 200 ms). Logs and summaries stay
# in WORKDIR. Gates only warn here: a tiny model's quality after 60 steps says nothing about the GPU path, and every
# stage should still run and be timed.
#
#   make setup GPU=1 && benchmarks/gpu_smoke.sh [WORKDIR]   # env: STEPS (distill steps, default 60),
#                                                            #      PYTHON (default .venv/bin/python)
#
# MFU = 6 x student parameters x tokens/s over the GPUs' peak dense bf16 FLOP/s (compressor.estimate's table, picked
# by nvidia-smi's GPU name); mfu_with_teacher adds the teacher's forward pass (2 x its parameters per token). The
# tiny models (a few million parameters) cannot fill a GPU: the MFU says that the path works, not how fast an 8B runs.
# With one GPU the ZeRO-3 run has one worker, which runs ZeRO-2 (distill's effective_zero_stage: nothing to
# partition, and NCCL refuses two ranks on one GPU); with two or more GPUs it uses 2 workers and really shards.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
compressor=("$python" -m compressor)  # not a path next to $python: PYTHON=python3 has none
steps="${STEPS:-60}"
work="${1:-$(mktemp -d /tmp/gpu-smoke.XXXXXX)}"

die() {
    echo "gpu_smoke.sh: $*" >&2
    exit 1
}

# The checks that need no GPU time come first, each with what to do about it.
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this benchmark needs an NVIDIA GPU and its driver"
gpus="$(nvidia-smi --query-gpu=name --format=csv,noheader)" || die "nvidia-smi failed: no usable NVIDIA GPU"
[ -n "$gpus" ] || die "nvidia-smi lists no GPU: this benchmark needs an NVIDIA GPU"
gpu_count="$(printf '%s\n' "$gpus" | wc -l)"
gpu_name="$(printf '%s\n' "$gpus" | head -n 1)"
command -v "$python" >/dev/null || die "$python not found: run 'make setup GPU=1' or set PYTHON"
"$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "torch under $python sees no CUDA device (a CPU-only build? 'make setup GPU=1' installs the CUDA one)"
"$python" -c 'import compressor.cli' 2>/dev/null \
    || die "compressor does not import under $python: run 'make setup GPU=1' or set PYTHON to its venv's python"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$work"
storage="$work/artifacts"
zero3_workers=1
if [ "$gpu_count" -ge 2 ]; then
    zero3_workers=2
fi
on_gpu=(
    "stages.prune.resources.num_gpus=1"
    "stages.quantize.resources.num_gpus=1"
    "evaluation.resources.num_gpus=1"
    "stages.distill.gpus_per_worker=1"
    "stages.distill.deepspeed.bf16=true"
    "stages.distill.steps=$steps"
    "stages.distill.gate.on_fail=warn"  # the tiny pipeline's gated stages
    "stages.quantize.gate.on_fail=warn"
)

sampler=""
stop_sampler() {
    if [ -n "$sampler" ]; then
        kill "$sampler" 2>/dev/null || true
        wait "$sampler" 2>/dev/null || true
        sampler=""
    fi
}
trap stop_sampler EXIT

run() {  # run NAME OVERRIDE...: one pipeline run; leaves NAME.summary.json, NAME.log and NAME.mem in $work
    local name="$1"
    shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$work/$name.mem" &
    sampler=$!
    if ! "${compressor[@]}" run --storage "$storage" --summary-json "$work/$name.summary.json" \
        "$repo/compressor/pipelines/tiny.yaml" "${on_gpu[@]}" "$@" >"$work/$name.log" 2>&1; then
        stop_sampler
        tail -n 40 "$work/$name.log" >&2
        die "the $name run failed (log: $work/$name.log)"
    fi
    stop_sampler
}

echo "gpu_smoke.sh: $gpu_count x $gpu_name; work dir $work" >&2
run zero2 "stages.distill.deepspeed.zero_stage=2" "stages.distill.workers=1"
run zero3 "stages.distill.deepspeed.zero_stage=3" "stages.distill.workers=$zero3_workers"

# The generate stage's vLLM backend (ray.data.llm), GPU-only, when vLLM is installed: the test teacher answers the
# documented prompts; its seconds go into the JSON below ("generate_vllm"; null without vLLM).
if "$python" -c 'import vllm' 2>/dev/null; then
    start=$(date +%s)
    if "${compressor[@]}" generate --teacher zoo:tiny-test --prompts "$repo/docs/stages/generate-prompts.jsonl"         --out "$work/generate-vllm" --backend vllm --max-new-tokens 32 >"$work/generate-vllm.log" 2>&1; then
        echo "$(($(date +%s) - start))" >"$work/generate-vllm.seconds"
    else
        tail -n 40 "$work/generate-vllm.log" >&2
        echo "gpu_smoke.sh: the vllm generate run failed (log: $work/generate-vllm.log)" >&2
        echo "failed" >"$work/generate-vllm.seconds"
    fi
fi

"$python" - "$work" "$storage" "$gpu_name" "$gpu_count" <<'PY'
import json
import sys
from pathlib import Path

from compressor.estimate import GPU_PEAK_TFLOPS

work, storage, gpu_name, gpu_count = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])


def peak_key(name: str):
    """compressor.estimate's key for an nvidia-smi GPU name, e.g. 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    name = name.lower()
    for family in ("h200", "h100", "a100", "b200", "l40s", "l4", "a10g"):
        if family in name:
            return "h100-pcie" if family == "h100" and "pcie" in name else family
    return None


manifests = {}  # key -> manifest, wherever the storage layout keeps it
for path in storage.rglob("manifest.json"):
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        continue
    manifests.setdefault(manifest.get("key"), manifest)

key = peak_key(gpu_name)
peak = GPU_PEAK_TFLOPS[key] * 1e12 if key else None
report = {"gpu": gpu_name, "gpus": gpu_count, "peak_bf16_tflops": peak / 1e12 if peak else None, "runs": {}}
for run in ("zero2", "zero3"):
    summary = json.loads((work / f"{run}.summary.json").read_text())
    samples = [int(v) for v in (work / f"{run}.mem").read_text().split() if v.isdigit()]
    stages, teacher_params = {}, None
    entry = {"pipeline_seconds": summary["seconds"], "stages": stages,
             "peak_gpu_memory_mib": max(samples) if samples else None}
    for stage in summary["stages"]:
        manifest = manifests.get(stage["key"]) or {}
        metrics, details = manifest.get("metrics", {}), manifest.get("details", {})
        stages[stage["name"]] = {"status": stage["status"], "seconds": stage["seconds"],
                                 "gate": details.get("gate", {}).get("status")}
        if stage["kind"] == "prune":
            teacher_params = details.get("params_before")
        elif stage["kind"] == "distill":
            tokens_per_s = metrics.get("mean_tokens_per_s", metrics.get("tokens_per_s"))
            params, workers = manifest.get("num_params"), details.get("workers") or 1
            gpus_used = workers  # one GPU per worker (gpus_per_worker=1)
            mfu = mfu_teacher = None
            if peak and tokens_per_s and params:
                mfu = 6 * params * tokens_per_s / (peak * gpus_used)
                if teacher_params:
                    mfu_teacher = (6 * params + 2 * teacher_params) * tokens_per_s / (peak * gpus_used)
            stages[stage["name"]].update(
                tokens_per_s=tokens_per_s, mfu=mfu, mfu_with_teacher=mfu_teacher, student_params=params,
                teacher_params=teacher_params, workers=workers, zero_stage_run=details.get("zero_stage"))
        elif stage["kind"] == "quantize":
            stages[stage["name"]].update(gptq_kernel=details.get("kernel_here"), backend=details.get("backend"))
    entry["evaluation_and_other_seconds"] = summary["seconds"] - sum(s["seconds"] or 0 for s in summary["stages"]
                                                                     if s["status"] != "cached")
    report["runs"][run] = entry
vllm = work / "generate-vllm.seconds"
report["generate_vllm"] = vllm.read_text().strip() if vllm.exists() else None  # seconds, "failed", or no vLLM
print(json.dumps(report, indent=2))
PY
