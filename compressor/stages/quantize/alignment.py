"""Which group size, kernel or per-tensor type a quantize spec really gets for a model, decided from config.json
alone (torch-free, so `compressor validate` and `plan` report it before anything is loaded).

GPTQ and AWQ groups run along a linear layer's input channels. A width that the group size does not divide
quantizes fine for GPTQ, but the int4 kernels refuse it at load or forward time (CPU: "_weight_int4pack_mm_cpu:
expect K divisible by qGroupSize"; vLLM likewise); AWQ cannot quantize it at all. GGUF stores each row in blocks:
256 weights for the K types (Q4_K, Q5_K, Q6_K), 32 for Q4_0 / Q8_0 (ggml's QK_K and QK4_0 / QK8_0), and llama.cpp
refuses a row that is not a whole number of blocks of its type (llama-quantize falls back to another type)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from compressor.errors import UserError
from compressor.models.shapes import Shape
from compressor.stages.quantize import gguf_plan
from compressor.stages.quantize.spec import QuantizeSpec

# Candidates for on_misaligned=largest_divisor, largest first. GPTQModel also accepts 16, but the CPU int4
# kernel (TorchAten, picked by default on CPU) refuses it, so it is never chosen automatically.
DIVISOR_CANDIDATES = (1024, 512, 256, 128, 64, 32)
INT8_BACKEND = "gptq_torch_int8"  # GPTQModel's CPU kernel that accepts a partial last group
INT8_MAX_GROUP = 128  # its largest supported group size
AWQ_DIVISOR_CANDIDATES = (128, 64, 32)  # AWQ's group sizes (spec.AWQ_GROUP_SIZES)
ROPE_TYPES = ("default", "linear", "llama3")  # what the GGUF writer carries over to llama.cpp


@dataclass(frozen=True)
class Linear:
    """One kind of linear layer in every decoder block, with the config field that sets its input width."""

    name: str  # e.g. "mlp.down_proj"
    in_features: int
    source: str  # e.g. "intermediate_size"


@dataclass
class Resolution:
    group_size: Optional[int]  # what GPTQ / AWQ run with; for GGUF the base type's block
    backend: Optional[str]  # kernel pinned into the checkpoint, or None for GPTQModel's automatic choice
    misaligned: list[Linear] = field(default_factory=list)  # layers the requested group / block did not divide
    warnings: list[str] = field(default_factory=list)
    tensors: list[gguf_plan.Tensor] = field(default_factory=list)  # GGUF: every tensor with its ggml type


def linear_layers(config: dict) -> Optional[list[Linear]]:
    """The decoder's linear layers (compressor.models.shapes); None when config.json lacks the fields."""
    try:
        shape = Shape.from_config(config)
    except (UserError, TypeError, ValueError, ZeroDivisionError):
        return None
    return [Linear(name, in_features, source) for name, in_features, _, source in shape.linears()]


def misaligned(layers: list[Linear], group_size: int) -> list[Linear]:
    return [] if group_size == -1 else [lin for lin in layers if lin.in_features % group_size]


def largest_divisor(layers: list[Linear], group_size: int, candidates: tuple[int, ...] = DIVISOR_CANDIDATES) -> int:
    """The largest candidate group size <= the requested one that divides every layer; -1 (per channel) if none."""
    widths = {lin.in_features for lin in layers}
    for g in candidates:
        if g <= group_size and all(w % g == 0 for w in widths):
            return g
    return -1


def prune_suggestion(config: dict, lin: Linear, group_size: int) -> str:
    """An aligned prune target for this layer's width, e.g. "intermediate_size=384"."""
    if lin.source in ("hidden_size", "intermediate_size"):
        aligned = max(group_size, lin.in_features // group_size * group_size)
        return f"{lin.source}={aligned}"
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = lin.in_features // heads
    # Fewer query heads, kept a multiple of the KV heads so that every KV group keeps the same size.
    for n in range(heads, 0, -1):
        if n % kv == 0 and (n * head_dim) % group_size == 0:
            return f"num_attention_heads={n}"
    return f"a head count whose heads*head_dim ({head_dim}) is a multiple of {group_size}"


def describe(lin: Linear, num_layers: Optional[int]) -> str:
    where = f"model.layers.*.{lin.name}" + (f" (all {num_layers} layers)" if num_layers else "")
    return f"{where}: in_features {lin.in_features} from {lin.source}"


def resolve(spec: QuantizeSpec, config: dict) -> Resolution:
    """Group size / kernel (GPTQ, AWQ) or per-tensor types (GGUF) for this model; UserError for on_misaligned=error
    with a misaligned layer, and for what a method cannot take."""
    if spec.method == "gguf":
        return resolve_gguf(spec, config)
    layers = linear_layers(config) if config else None
    pinned = getattr(spec, "backend", None) if getattr(spec, "backend", None) not in (None, "auto") else None
    if layers is None:
        note = (
            []
            if not config
            else [
                "quantize: config.json has no hidden_size/intermediate_size/num_attention_heads; group-size alignment "
                "is not checked before quantizing"
            ]
        )
        return Resolution(spec.group_size, pinned, warnings=note)
    bad = misaligned(layers, spec.group_size)
    if not bad:
        note = (
            []
            if spec.method != "gptq" or spec.group_size != 16 or pinned
            else [
                "quantize: group_size 16: GPTQModel's CPU int4 kernel refuses it at run time; on CPU load the output "
                "with backend gptq_torch or gptq_torch_int8 (GPU kernels accept it)"
            ]
        )
        return Resolution(spec.group_size, pinned, warnings=note)
    g = spec.group_size
    listing = "; ".join(describe(lin, config.get("num_hidden_layers")) for lin in bad)
    candidates = DIVISOR_CANDIDATES if spec.method == "gptq" else AWQ_DIVISOR_CANDIDATES
    fit = largest_divisor(layers, g, candidates)
    if spec.on_misaligned == "error" or (spec.method == "awq" and fit == -1):
        targets = ", ".join(dict.fromkeys(prune_suggestion(config, lin, g) for lin in bad))
        if spec.method == "gptq":
            why, options = "The int4 kernels (CPU and vLLM) refuse such layers.", "largest_divisor or int8_kernel"
            fits = f"largest here: {fit}" if fit > 0 else "here only -1, per channel"
        else:
            why, options = "AWQ quantizes whole groups only.", "largest_divisor"
            fits = f"largest here: {fit}" if fit > 0 else "none of 128, 64, 32 does here"
        also = f", or set quantize.on_misaligned to {options}" if spec.on_misaligned == "error" else ""
        raise UserError(
            f"quantize.group_size: {g} does not divide the input width of {listing}. {why} Prune to {targets}, "
            f"or choose a group size that divides every width ({fits}){also}."
        )
    if spec.on_misaligned == "largest_divisor":
        per = "per-channel (-1)" if fit == -1 else str(fit)
        return Resolution(
            fit,
            pinned,
            bad,
            [
                f"quantize: group_size {g} does not divide {listing}; using group_size {per} for every layer "
                f"(on_misaligned=largest_divisor)"
            ],
        )
    if g > INT8_MAX_GROUP:
        raise UserError(
            f"quantize.on_misaligned: int8_kernel needs group_size <= {INT8_MAX_GROUP} ({INT8_BACKEND} supports no "
            f"larger groups), but group_size is {g} and does not divide {listing}."
        )
    return Resolution(
        g,
        pinned or INT8_BACKEND,
        bad,
        [
            f"quantize: group_size {g} does not divide {listing}; keeping {g} and pinning the {INT8_BACKEND} kernel "
            f"(on_misaligned=int8_kernel). It runs on CPU only; vLLM and the GPU int4 kernels cannot load this checkpoint."
        ],
    )


def rope_settings(config: dict) -> dict:
    """rope_theta, rope_type and the scaling factors, from transformers 5's `rope_parameters` or 4.x's `rope_theta`
    plus `rope_scaling`."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    rope["rope_theta"] = float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
    return rope


def resolve_gguf(spec: QuantizeSpec, config: dict) -> Resolution:
    """Each tensor's ggml type (llama-quantize's mixture, gguf_plan.py); refuses a row that the file's base type
    cannot store unless on_misaligned=fallback, and a model llama.cpp's `llama` architecture does not describe."""
    if not config:
        return Resolution(None, None)
    model_type = config.get("model_type")
    if model_type not in gguf_plan.ARCHITECTURES:
        raise UserError(
            f"quantize.method: gguf writes llama.cpp's `llama` architecture (model_type "
            f"{' or '.join(gguf_plan.ARCHITECTURES)}); this model's model_type is {model_type!r}. "
            "Use method gptq or awq for it."
        )
    if config.get("quantization_config"):
        raise UserError(
            f"quantize.method: gguf encodes float weights; the input is already quantized "
            f"({config['quantization_config'].get('quant_method', '?')}). Put the gguf stage after a "
            "stage that outputs a float model (prune, distill), or quantize the teacher itself."
        )
    biased = [k for k in ("attention_bias", "mlp_bias") if config.get(k)]
    rope = rope_settings(config)
    if biased or rope["rope_type"] not in ROPE_TYPES:
        what = f"{' and '.join(biased)} true" if biased else f"rope type {rope['rope_type']!r}"
        raise UserError(
            f"quantize.method: the GGUF writer covers Llama models without biases and with rope type "
            f"{', '.join(ROPE_TYPES)}; this model has {what}. Use method gptq or awq for it."
        )
    if gguf_plan.shapes(config) is None:
        raise UserError(
            "quantize.method: gguf needs hidden_size, intermediate_size, num_attention_heads, "
            "num_hidden_layers and vocab_size in the input's config.json"
        )
    tensors = gguf_plan.plan(config, spec.quant_type)
    block = gguf_plan.BLOCK[gguf_plan.BASE[spec.quant_type]]
    bad_tensors = gguf_plan.misaligned(tensors, spec.quant_type)
    bad = misaligned(linear_layers(config), block)
    if not bad_tensors:
        return Resolution(block, None, tensors=tensors)
    listing = "; ".join(describe(lin, config.get("num_hidden_layers")) for lin in bad)
    base = gguf_plan.BASE[spec.quant_type]
    if spec.on_misaligned == "error":
        # a width below one block cannot be pruned into shape: suggest targets only for the wider layers
        targets = ", ".join(
            dict.fromkeys(prune_suggestion(config, lin, block) for lin in bad if lin.in_features > block)
        )
        prune = f"Prune to {targets}, or choose" if targets else "Choose"
        other = " (Q4_0 / Q8_0: blocks of 32)" if block > 32 else ""
        raise UserError(
            f"quantize.quant_type: {spec.quant_type} stores rows in blocks of {block} weights ({base}), and {block} "
            f"does not divide the input width of {listing}. {prune} a quant type whose block divides every "
            f"width{other}, or set quantize.on_misaligned to fallback (llama-quantize's per-tensor fallback: "
            f"{gguf_plan.FALLBACK.get(base, 'F16')} for those tensors)."
        )
    fallen = sorted({f"{t.wanted} -> {t.ggml_type}" for t in bad_tensors})
    return Resolution(
        block,
        None,
        bad,
        [
            f"quantize: {spec.quant_type}: {block} does not divide {listing}; {len(bad_tensors)} tensors fall back "
            f"({', '.join(fallen)}) as llama-quantize does (on_misaligned=fallback)"
        ],
        tensors=tensors,
    )


def output_config(config: dict, spec: QuantizeSpec, resolution: Resolution) -> dict:
    """config.json of the quantized checkpoint as far as known without running (the quantization_config part)."""
    if spec.method == "gguf":
        return {**config, "quantization_config": gguf_plan.quantization_config(spec.quant_type, resolution.tensors)}
    if spec.method == "awq":
        quant = {
            "quant_method": "awq",
            "bits": spec.bits,
            "group_size": resolution.group_size,
            "zero_point": spec.zero_point,
            "version": "gemm",
            "format": "gemm",
        }
        return {**config, "quantization_config": quant}
    quant = {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": resolution.group_size,
        "desc_act": spec.desc_act,
        "sym": spec.sym,
        "checkpoint_format": "gptq",
    }
    if resolution.backend:
        quant["backend"] = resolution.backend
    return {**config, "quantization_config": quant}
