"""Offline estimates for `compressor plan`: parameters, FLOPs and GPU-hours from config.json alone.

Torch-free and network-free. Parameter counts are exact for Llama / Mistral / Qwen2-style decoders.
FLOPs follow the PaLM appendix-B convention (the one MFU figures are quoted against): a forward pass
costs 2 FLOPs per matmul weight per token plus 4 * layers * seq_len * attention width for QK^T and AV;
backward costs twice the forward. Everything else (norms, softmax, optimizer) is ignored: it is a few
percent, well inside the MFU guess."""

from __future__ import annotations

from typing import Optional

from compressor.errors import UserError
from compressor.models.shapes import Shape, vocab_size

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s from the vendors' datasheets.
GPU_PEAK_TFLOPS: dict[str, float] = {
    "b200": 2250.0,
    "h200": 989.0,
    "h100": 989.0,  # SXM; the PCIe card is listed separately
    "h100-sxm": 989.0,
    "h100-pcie": 756.0,
    "a100": 312.0,
    "l40s": 362.0,
    "l4": 121.0,
    "a10g": 125.0,
    "mi300x": 1307.0,
}
GPU_TFLOPS = GPU_PEAK_TFLOPS  # the name `compressor plan --help` points to

# lm-eval tasks the recipes use: (documents, choices per document, mean tokens of one example). A request
# holds num_fewshot + 1 examples and is one forward per choice. Rough by design; other tasks get the default.
TASK_SHAPES: dict[str, tuple[int, int, int]] = {
    "mmlu": (14042, 4, 115),
    "hellaswag": (10042, 4, 82),
    "winogrande": (1267, 2, 33),
    "arc_challenge": (1172, 4, 70),
    "arc_easy": (2376, 4, 60),
}
DEFAULT_TASK_SHAPE = (1000, 4, 128)


# ----------------------------------------------------------------------------- shapes
def shape(config: dict) -> dict[str, int]:
    """The numbers every estimate needs (compressor.models.shapes, with HF's defaults filled in), in short names."""
    s = Shape.from_config(config)
    return {
        "vocab": vocab_size(config),
        "hidden": s.hidden_size,
        "intermediate": s.intermediate_size,
        "layers": s.num_layers,
        "heads": s.num_attention_heads,
        "kv_heads": s.num_key_value_heads,
        "head_dim": s.head_dim,
    }


def _linears(config: dict) -> list[tuple[str, int, int]]:
    """(name, d_in, d_out) of the linear layers of ONE decoder layer."""
    return [(name, d_in, d_out) for name, d_in, d_out, _ in Shape.from_config(config).linears()]


def _layer_biases(config: dict) -> int:
    s = shape(config)
    q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    qwen2 = config.get("model_type") == "qwen2"  # q/k/v carry biases by construction
    total = q + 2 * kv if (qwen2 or config.get("attention_bias")) else 0
    if config.get("attention_bias"):
        total += s["hidden"]  # o_proj
    if config.get("mlp_bias"):
        total += 2 * s["intermediate"] + s["hidden"]
    return total


def param_count(config: dict) -> int:
    """Exact parameter count of a Llama/Mistral/Qwen2 decoder: embeddings (once if tied), per-layer
    attention + MLP + two RMSNorms, the final norm, and an untied lm_head."""
    s = shape(config)
    per_layer = sum(d_in * d_out for _, d_in, d_out in _linears(config)) + _layer_biases(config) + 2 * s["hidden"]
    embedding = s["vocab"] * s["hidden"]
    lm_head = 0 if config.get("tie_word_embeddings", False) else embedding
    return embedding + s["layers"] * per_layer + s["hidden"] + lm_head


def matmul_params(config: dict) -> int:
    """Weights that take part in a matmul per token: all layer linears plus the lm_head
    (the embedding lookup is a gather, free)."""
    s = shape(config)
    return s["layers"] * sum(d_in * d_out for _, d_in, d_out in _linears(config)) + s["vocab"] * s["hidden"]


def forward_flops_per_token(config: dict, seq_len: int) -> float:
    s = shape(config)
    attention = 4 * s["layers"] * seq_len * s["heads"] * s["head_dim"]
    return 2.0 * matmul_params(config) + attention


# ----------------------------------------------------------------------------- stages
def calibration_size(
    name: Optional[str], samples: Optional[int], seq_len: Optional[int], pipeline, default_samples: int
) -> tuple[int, int]:
    """(samples, seq_len) a stage calibrating on data source `name` (default: the pipeline's only one) will use,
    resolved like the stage does: its own `samples`/`seq_len`, else the source's, else the defaults."""
    if name is None and len(pipeline.data) == 1:
        name = next(iter(pipeline.data))
    source = pipeline.data.get(name) if name else None
    samples = samples or (source.samples if source else None) or default_samples
    seq_len = seq_len or (source.seq_len if source else 512)
    return samples, seq_len


def eval_flops(config: dict, tasks) -> float:
    """Rough cost of one lm-eval pass over `tasks` (TaskSpec list): one forward per (document, choice)."""
    total = 0.0
    for task in tasks:
        docs, choices, per_example = TASK_SHAPES.get(task.name, DEFAULT_TASK_SHAPE)
        tokens = (1 + (task.num_fewshot or 0)) * per_example
        if task.limit is not None:
            docs = min(docs, int(task.limit)) if task.limit >= 1 else int(docs * task.limit)
        total += docs * choices * tokens * forward_flops_per_token(config, tokens)
    return total


def gptq_flops(config: dict, samples: int, seq_len: int) -> float:
    """GPTQ goes layer by layer: a calibration forward before and after quantizing each layer, a Hessian
    X^T X per linear (2 * d_in^2 per token), Cholesky of it (~d_in^3) and the column sweep (~d_in^2 * d_out)."""
    tokens = samples * seq_len
    s = shape(config)
    forwards = 2 * tokens * forward_flops_per_token(config, seq_len)
    per_layer = sum(2.0 * d_in**2 * tokens + d_in**3 + d_in**2 * d_out for _, d_in, d_out in _linears(config))
    return forwards + s["layers"] * per_layer


def gpu_hours(flops: float, gpu: str, mfu: float) -> float:
    """GPU-hours to execute `flops` on `gpu` at model-FLOPs utilisation `mfu` (0.3-0.5 is typical for
    well-tuned LLM training; calibration and eval passes run lower)."""
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu}: give a fraction in (0, 1], e.g. 0.4")
    return flops / (gpu_peak_tflops(gpu) * 1e12 * mfu) / 3600.0


def gpu_peak_tflops(gpu: str) -> float:
    key = gpu.strip().lower().replace("_", "-").replace(" ", "-")
    if key not in GPU_PEAK_TFLOPS:
        raise UserError(f"--gpu {gpu!r}: unknown GPU type; known: {', '.join(GPU_PEAK_TFLOPS)}")
    return GPU_PEAK_TFLOPS[key]
